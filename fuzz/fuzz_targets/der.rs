#![no_main]
//! The agent's DER reader and the key-format readers on top of it: any bytes give a value or
//! an error, never a panic, and what is read is consistent with the input.
//!
//! - `read` splits the input into the element (tag, length, contents: `raw`) and the rest;
//!   re-encoding the element gives `raw` back whenever its length was minimally encoded.
//! - A walk of nested constructed elements terminates and stays inside the input.
//! - `parse_spki`, the RSA size readers and `unwrap_ec_point` never panic; a point found is a
//!   part of the input; an EC SubjectPublicKeyInfo built from it reads back as the same key.
//! - `ecdsa_raw_to_der` turns r‖s into a SEQUENCE of two INTEGERs with the same magnitudes.
use iotcred_agent::fuzzing::{
    SpkiKey, ecdsa_raw_to_der, expect, parse_spki, pkcs8_rsa_bits, read, rsa_private_key_bits, tlv,
    unwrap_ec_point,
};
use libfuzzer_sys::fuzz_target;

/// Reads every element of `input`, descending into constructed ones (bounded depth).
fn walk(mut input: &[u8], depth: u32) {
    while !input.is_empty() {
        let Ok((el, rest)) = read(input) else {
            return;
        };
        assert_eq!(el.raw.len() + rest.len(), input.len());
        assert!(el.raw.ends_with(el.contents) && el.raw[0] == el.tag);
        let header = el.raw.len() - el.contents.len();
        let minimal_header = if el.contents.len() < 0x80 {
            2
        } else {
            2 + (usize::BITS / 8 - el.contents.len().leading_zeros() / 8) as usize
        };
        if header == minimal_header {
            assert_eq!(tlv(el.tag, el.contents), el.raw);
        }
        if el.tag & 0x20 != 0 && depth < 16 {
            walk(el.contents, depth + 1);
        }
        input = rest;
    }
}

/// Big-endian magnitude without leading zeros.
fn magnitude(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|&x| x != 0).unwrap_or(b.len());
    &b[start..]
}

fuzz_target!(|data: &[u8]| {
    walk(data, 0);

    if let Ok(SpkiKey::Ec { curve, point }) = parse_spki(data) {
        let rebuilt = curve.spki(point);
        assert_eq!(
            parse_spki(rebuilt.as_ref()),
            Ok(SpkiKey::Ec { curve, point })
        );
    }
    let _ = rsa_private_key_bits(data);
    let _ = pkcs8_rsa_bits(data);
    if let Some(point) = unwrap_ec_point(data) {
        let start = point.as_ptr() as usize - data.as_ptr() as usize;
        assert!(start + point.len() <= data.len() && point.first() == Some(&0x04));
    }

    if let Some(sig) = ecdsa_raw_to_der(data) {
        let (r, s) = data.split_at(data.len() / 2);
        let (seq, rest) = expect(&sig, 0x30).expect("a SEQUENCE");
        assert!(rest.is_empty());
        let (ri, rest) = expect(seq.contents, 0x02).expect("r");
        let (si, rest) = expect(rest, 0x02).expect("s");
        assert!(rest.is_empty());
        assert_eq!(magnitude(ri.contents), magnitude(r));
        assert_eq!(magnitude(si.contents), magnitude(s));
        // Positive: no leading 1 bit, and no needless leading zero byte.
        for i in [ri.contents, si.contents] {
            assert!(i[0] & 0x80 == 0);
            assert!(i.len() == 1 || i[0] != 0 || i[1] & 0x80 != 0);
        }
    } else {
        assert!(data.is_empty() || data.len() % 2 == 1);
    }
});
