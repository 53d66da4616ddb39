#![no_main]
//! The agent's TOML configuration: any text gives a `Config` or an error whose message names a
//! line, never a panic; a configuration that parses still parses when read again.
use std::path::Path;

use iotcred_agent::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let path = Path::new("/etc/iotcred/config.toml");
    match Config::parse(text, path) {
        Ok(_) => assert!(Config::parse(text, path).is_ok()),
        Err(e) => {
            let message = e.to_string();
            assert!(!message.is_empty());
        }
    }
});
