#![no_main]
//! A success body and an error body through the exchange, and the renderers on what comes out.
use iotcred_core::{Format, UnixTime, parse_credentials};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let now = UnixTime::from_secs(1_767_225_600);
    if let Ok(issued) = parse_credentials(200, None, data, now) {
        assert!(!issued.lifetime.is_zero());
        for format in [
            Format::ContainerJson,
            Format::CredentialProcess,
            Format::Ini,
            Format::Env,
        ] {
            let _ = format.render("p", &issued.credentials, issued.credentials.expiration);
        }
    }
    if let Err(e) = parse_credentials(403, None, data, now) {
        assert!(
            e.message()
                .is_none_or(|m| m.chars().count() <= 256 && !m.contains(char::is_control))
        );
    }
});
