#![no_main]
//! `pkcs11:` URIs (RFC 7512, the attributes iotcred takes): any text gives a URI or an error,
//! never a panic; a parsed URI's `Display` parses back to the same URI (with a `pin-value`
//! shown as `***`, so compared with that PIN); no error message echoes a `pin-value`.
use iotcred_agent::keys::{KeySource, PinSource, Pkcs11Uri};
use libfuzzer_sys::fuzz_target;
use zeroize::Zeroizing;

fuzz_target!(|text: &str| {
    // The configuration's `key` setting goes through `KeySource::parse` first.
    let _ = KeySource::parse(text);
    match Pkcs11Uri::parse(text) {
        Ok(uri) => {
            let shown = uri.to_string();
            let again = Pkcs11Uri::parse(&shown)
                .unwrap_or_else(|e| panic!("{shown:?} does not parse back: {e}"));
            let mut want = uri.clone();
            if let Some(PinSource::Value(_)) = want.pin {
                want.pin = Some(PinSource::Value(Zeroizing::new("***".to_owned())));
                assert!(!shown.contains("pin-value=") || shown.contains("pin-value=***"));
            }
            assert_eq!(again, want, "{text:?} -> {shown:?}");
            let _ = (uri.token_selector(), uri.object_selector());
        }
        Err(e) => {
            let message = e.to_string();
            assert!(!message.is_empty());
            // A `pin-value` is never echoed: the same input with each PIN replaced by a marker
            // (plain, and with a bad percent escape) gives no message that shows the marker.
            if let Some((path, query)) = text.split_once('?') {
                let attrs: Vec<&str> = query.split('&').collect();
                for (i, attr) in attrs.iter().enumerate() {
                    if !attr.starts_with("pin-value=") {
                        continue;
                    }
                    for marker in ["\u{7f}PIN\u{7f}", "%zz\u{7f}PIN\u{7f}"] {
                        let mut marked = attrs.clone();
                        let replacement = format!("pin-value={marker}");
                        marked[i] = &replacement;
                        let marked = format!("{path}?{}", marked.join("&"));
                        if let Err(e) = Pkcs11Uri::parse(&marked) {
                            let m = e.to_string();
                            assert!(!m.contains("\u{7f}PIN"), "{marked:?}: {m:?} echoes the PIN");
                        }
                    }
                }
            }
        }
    }
});
