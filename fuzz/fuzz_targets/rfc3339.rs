#![no_main]
//! RFC 3339 parsing; whatever parses formats and parses back to the same time.
use iotcred_core::UnixTime;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|s: &str| {
    if let Ok(t) = UnixTime::parse_rfc3339(s) {
        assert_eq!(UnixTime::parse_rfc3339(&t.rfc3339().to_string()), Ok(t));
    }
});
