#![no_main]
//! The response parser on arbitrary bytes, fed in pieces whose size the first byte chooses.
use iotcred_core::http::{Limits, ResponseParser};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, data)) = data.split_first() else {
        return;
    };
    let limits = Limits {
        max_head: 1024,
        max_body: 2048,
    };
    let mut parser = ResponseParser::with_limits(limits);
    let mut ok = true;
    for piece in data.chunks(usize::from(cut).max(1)) {
        match parser.feed(piece) {
            Ok(used) => assert!(used <= piece.len()),
            Err(_) => {
                ok = false;
                break;
            }
        }
    }
    if ok && parser.finish().is_ok() {
        let response = parser.take_response().expect("complete after finish");
        assert!(response.body.len() <= limits.max_body);
    }
});
