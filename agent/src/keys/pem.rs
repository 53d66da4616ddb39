//! Base64 (RFC 4648 §4, with padding) and PEM armour (RFC 7468) for what `keygen` writes:
//! the CSR and the PKCS#8 private key. Encoding only; reading PEM is rustls-pki-types' job.

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Characters per line inside a PEM block.
const LINE: usize = 64;

/// The length of the base64 encoding of `n` bytes.
fn encoded_len(n: usize) -> usize {
    n.div_ceil(3) * 4
}

/// Appends the base64 encoding of `data` to `out`.
fn base64_into(out: &mut String, data: &[u8]) {
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 0x3f]));
            } else {
                out.push('=');
            }
        }
    }
}

/// The base64 encoding of `data`.
#[cfg(test)]
pub(crate) fn base64(data: &[u8]) -> String {
    let mut out = String::with_capacity(encoded_len(data.len()));
    base64_into(&mut out, data);
    out
}

/// A PEM block: `-----BEGIN {label}-----`, base64 in 64-character lines, `-----END {label}-----`,
/// each line ending in `\n`.
///
/// The string is allocated once at its final size, so a caller that wraps it in `Zeroizing`
/// (private keys) leaves no stray copies behind from reallocation.
pub(crate) fn encode(label: &str, der: &[u8]) -> String {
    let b64 = encoded_len(der.len());
    let lines = b64.div_ceil(LINE);
    let frame = "-----BEGIN -----\n".len() + "-----END -----\n".len() + 2 * label.len();
    let mut out = String::with_capacity(frame + b64 + lines);
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    // 48 input bytes are exactly one 64-character line.
    for chunk in der.chunks(LINE / 4 * 3) {
        base64_into(&mut out, chunk);
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    debug_assert_eq!(out.len(), out.capacity());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc4648_vectors() {
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), expected, "{input:?}");
        }
    }

    #[test]
    fn whole_alphabet_and_high_bytes() {
        // 0x00 0x10 0x83 0x10 0x51 0x87 … maps to "ABCDEFGH…": every 6-bit value once.
        let mut bits = Vec::new();
        for v in 0u32..64 {
            bits.push(v);
        }
        let mut bytes = Vec::new();
        for quad in bits.chunks(4) {
            let n = (quad[0] << 18) | (quad[1] << 12) | (quad[2] << 6) | quad[3];
            bytes.extend_from_slice(&n.to_be_bytes()[1..]);
        }
        assert_eq!(base64(&bytes).as_bytes(), ALPHABET);
        assert_eq!(base64(&[0xff, 0xfe, 0xfd]), "//79");
        assert_eq!(base64(&[0xfb, 0xff]), "+/8=");
    }

    #[test]
    fn pem_lines_and_round_trip() {
        use rustls_pki_types::pem::PemObject;

        for len in [0usize, 1, 47, 48, 49, 96, 300] {
            let der: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let pem = encode("CERTIFICATE REQUEST", &der);
            let lines: Vec<&str> = pem.lines().collect();
            assert_eq!(lines[0], "-----BEGIN CERTIFICATE REQUEST-----");
            assert_eq!(*lines.last().unwrap(), "-----END CERTIFICATE REQUEST-----");
            assert!(pem.ends_with("-----\n"));
            let body = &lines[1..lines.len() - 1];
            assert_eq!(body.len(), len.div_ceil(48), "len {len}");
            for (i, l) in body.iter().enumerate() {
                if i + 1 < body.len() {
                    assert_eq!(l.len(), 64);
                } else {
                    assert!(!l.is_empty() && l.len() <= 64);
                }
            }
            if len > 0 {
                let back =
                    rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
                        .unwrap();
                assert_eq!(back.as_ref(), der.as_slice(), "len {len}");
            }
        }
    }
}
