#![no_main]
//! HTTP date parsing; whatever parses formats as IMF-fixdate and parses back to the same time.
use iotcred_core::UnixTime;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|s: &str| {
    if let Ok(t) = UnixTime::parse_http_date(s) {
        assert_eq!(UnixTime::parse_http_date(&t.http_date().to_string()), Ok(t));
    }
});
