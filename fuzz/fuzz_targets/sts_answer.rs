#![no_main]
//! STS `AssumeRole` answers (XML, from the network): any bytes give an `Answer` or a protocol
//! error, never a panic; the credentials of an answer are read without panicking either.
use iotcred_agent::sts::parse_answer;
use iotcred_core::UnixTime;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    if let Ok(answer) = parse_answer(body) {
        let _ = answer.into_credentials(UnixTime::from_secs(1_767_268_800));
    }
});
