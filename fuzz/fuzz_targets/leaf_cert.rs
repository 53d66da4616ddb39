#![no_main]
//! The leaf certificate facts (`cert.rs`): any bytes give the facts or an error, never a
//! panic. Facts that parse are consistent: the SubjectPublicKeyInfo is one whole DER element,
//! the validity times are in the range a certificate can express, and the first `CN=` of the
//! subject text is the common name.
use iotcred_agent::cert::parse_leaf;
use iotcred_agent::fuzzing::{parse_spki, read};
use iotcred_core::UnixTime;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|der: &[u8]| {
    let Ok(leaf) = parse_leaf(der) else {
        return;
    };
    let (spki, rest) = read(&leaf.spki).expect("the SPKI is one element");
    assert!(rest.is_empty() && spki.tag == 0x30);
    let _ = parse_spki(&leaf.spki);
    for t in [leaf.not_before, leaf.not_after] {
        // UTCTime covers 1950–2049, GeneralizedTime 0000–9999.
        assert!(t >= UnixTime::MIN_FORMATTABLE && t <= UnixTime::MAX_FORMATTABLE);
    }
    match &leaf.subject_cn {
        Some(cn) => assert!(
            leaf.subject.starts_with(&format!("CN={cn}"))
                || leaf.subject.contains(&format!(", CN={cn}"))
        ),
        None => assert!(!leaf.subject.starts_with("CN=")),
    }
});
