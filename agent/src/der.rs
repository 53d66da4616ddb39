//! The one DER reader and the little DER writing the agent does.
//!
//! Reading ([`read`], [`expect`]) serves the certificate facts of `cert.rs` and the key code:
//! SubjectPublicKeyInfo ([`parse_spki`]), RSA key sizes, `CKA_EC_POINT` values. Definite
//! lengths only (up to 4 length bytes), single-byte tags; nothing is allocated.
//!
//! Writing is what rustls and `rustls-pki-types` do not provide: SubjectPublicKeyInfo comes from
//! [`rustls::sign::public_key_to_spki`] with the AlgorithmIdentifiers of
//! [`rustls_pki_types::alg_id`]; this module adds the PKCS#1 `RSAPublicKey`, the ECDSA
//! signature conversion, and the pieces of a PKCS#10 request (names, BIT STRINGs).

use rustls_pki_types::{AlgorithmIdentifier, SubjectPublicKeyInfoDer, alg_id};

/// Universal tags used here.
pub const INTEGER: u8 = 0x02;
/// BIT STRING.
pub const BIT_STRING: u8 = 0x03;
/// OCTET STRING.
pub const OCTET_STRING: u8 = 0x04;
/// OBJECT IDENTIFIER.
pub const OID: u8 = 0x06;
/// UTF8String.
pub const UTF8_STRING: u8 = 0x0c;
/// PrintableString.
pub const PRINTABLE_STRING: u8 = 0x13;
/// SEQUENCE (constructed).
pub const SEQUENCE: u8 = 0x30;
/// SET (constructed).
pub const SET: u8 = 0x31;

/// Why DER input was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DerError {
    /// The input ends inside an element.
    #[error("truncated")]
    Truncated,
    /// An indefinite length (BER, not DER) or one longer than 4 bytes.
    #[error("bad length")]
    BadLength,
    /// A tag of more than one byte (not used by anything read here).
    #[error("multi-byte tag")]
    MultiByteTag,
    /// An element other than the one the structure has there.
    #[error("unexpected element (tag 0x{got:02x}, wanted 0x{want:02x})")]
    Unexpected {
        /// The tag wanted.
        want: u8,
        /// The tag found.
        got: u8,
    },
    /// The element is well-formed but its value is not what the structure allows.
    #[error("invalid value")]
    Value,
}

/// One element: tag, contents, and its whole encoding (header included).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tlv<'a> {
    /// The tag byte.
    pub tag: u8,
    /// The contents octets.
    pub contents: &'a [u8],
    /// Tag, length and contents.
    pub raw: &'a [u8],
}

/// Reads one element from the front of `input`; returns it and the rest.
pub fn read(input: &[u8]) -> Result<(Tlv<'_>, &[u8]), DerError> {
    let (&tag, rest) = input.split_first().ok_or(DerError::Truncated)?;
    if tag & 0x1f == 0x1f {
        return Err(DerError::MultiByteTag);
    }
    let (&first, rest) = rest.split_first().ok_or(DerError::Truncated)?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return Err(DerError::BadLength);
        }
        let (bytes, rest) = rest.split_at_checked(n).ok_or(DerError::Truncated)?;
        let len = bytes
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, rest)
    };
    let (contents, rest) = rest.split_at_checked(len).ok_or(DerError::Truncated)?;
    let raw = &input[..input.len() - rest.len()];
    Ok((Tlv { tag, contents, raw }, rest))
}

/// Reads one element that must have tag `want`.
pub fn expect(input: &[u8], want: u8) -> Result<(Tlv<'_>, &[u8]), DerError> {
    let (t, rest) = read(input)?;
    if t.tag != want {
        return Err(DerError::Unexpected { want, got: t.tag });
    }
    Ok((t, rest))
}

// ---- writing ----

/// One element with `tag` around `contents`.
pub fn tlv(tag: u8, contents: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(contents.len() + 6);
    out.push(tag);
    let len = contents.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|&&b| b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(contents);
    out
}

/// A non-negative INTEGER from big-endian magnitude bytes.
pub fn unsigned_integer(magnitude: &[u8]) -> Vec<u8> {
    let start = magnitude
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(magnitude.len());
    let m = &magnitude[start..];
    let mut contents = Vec::with_capacity(m.len() + 1);
    if m.first().is_none_or(|&b| b & 0x80 != 0) {
        contents.push(0);
    }
    contents.extend_from_slice(m);
    tlv(INTEGER, &contents)
}

/// SEQUENCE of already-encoded parts.
pub fn sequence(parts: &[&[u8]]) -> Vec<u8> {
    tlv(SEQUENCE, &parts.concat())
}

/// SET of already-encoded parts, in DER order (sorted by their encodings, X.690 §11.6).
pub fn set_of(parts: &[&[u8]]) -> Vec<u8> {
    let mut sorted = parts.to_vec();
    sorted.sort_unstable();
    tlv(SET, &sorted.concat())
}

/// BIT STRING with no unused bits.
pub fn bit_string(bytes: &[u8]) -> Vec<u8> {
    let mut contents = Vec::with_capacity(bytes.len() + 1);
    contents.push(0);
    contents.extend_from_slice(bytes);
    tlv(BIT_STRING, &contents)
}

/// An AlgorithmIdentifier as it appears in a structure (pki-types keeps it without the
/// SEQUENCE header).
pub fn algorithm_identifier(alg: &AlgorithmIdentifier) -> Vec<u8> {
    tlv(SEQUENCE, alg.as_ref())
}

/// PKCS#11 returns ECDSA signatures as r‖s; TLS and X.509 want `SEQUENCE { r, s }`.
pub fn ecdsa_raw_to_der(raw: &[u8]) -> Option<Vec<u8>> {
    if raw.is_empty() || raw.len() % 2 != 0 {
        return None;
    }
    let (r, s) = raw.split_at(raw.len() / 2);
    Some(sequence(&[&unsigned_integer(r), &unsigned_integer(s)]))
}

/// PKCS#1 `RSAPublicKey ::= SEQUENCE { modulus, publicExponent }`.
pub fn rsa_public_key(modulus: &[u8], exponent: &[u8]) -> Vec<u8> {
    sequence(&[&unsigned_integer(modulus), &unsigned_integer(exponent)])
}

/// SubjectPublicKeyInfo of an RSA key.
pub fn spki_rsa(modulus: &[u8], exponent: &[u8]) -> SubjectPublicKeyInfoDer<'static> {
    rustls::sign::public_key_to_spki(&alg_id::RSA_ENCRYPTION, rsa_public_key(modulus, exponent))
}

// ---- keys ----

/// The named curves iotcred uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EcCurve {
    /// prime256v1 / secp256r1.
    P256,
    /// secp384r1.
    P384,
}

impl EcCurve {
    /// `ECParameters` (the curve's OID, tag and length included), as in `CKA_EC_PARAMS`.
    pub fn params(self) -> &'static [u8] {
        match self {
            // 1.2.840.10045.3.1.7
            EcCurve::P256 => &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07],
            // 1.3.132.0.34
            EcCurve::P384 => &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22],
        }
    }

    /// The curve named by `CKA_EC_PARAMS`, if it is one of ours.
    pub fn from_params(params: &[u8]) -> Option<EcCurve> {
        [EcCurve::P256, EcCurve::P384]
            .into_iter()
            .find(|c| c.params() == params)
    }

    /// The SubjectPublicKeyInfo AlgorithmIdentifier (id-ecPublicKey with this curve).
    pub fn alg_id(self) -> AlgorithmIdentifier {
        match self {
            EcCurve::P256 => alg_id::ECDSA_P256,
            EcCurve::P384 => alg_id::ECDSA_P384,
        }
    }

    /// SubjectPublicKeyInfo of the uncompressed `point` on this curve.
    pub fn spki(self, point: &[u8]) -> SubjectPublicKeyInfoDer<'static> {
        rustls::sign::public_key_to_spki(&self.alg_id(), point)
    }
}

/// The key inside a SubjectPublicKeyInfo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SpkiKey<'a> {
    /// An EC key on P-256 or P-384, with its point.
    Ec {
        /// The curve.
        curve: EcCurve,
        /// The encoded point.
        point: &'a [u8],
    },
    /// An RSA key: the RSAPublicKey DER and the modulus size in bits.
    Rsa {
        /// PKCS#1 RSAPublicKey.
        public_key: &'a [u8],
        /// Modulus bits.
        bits: usize,
    },
    /// Any other algorithm or curve.
    Other,
}

/// Reads a SubjectPublicKeyInfo (the whole input must be one).
pub fn parse_spki(spki: &[u8]) -> Result<SpkiKey<'_>, DerError> {
    let (outer, trailing) = expect(spki, SEQUENCE)?;
    if !trailing.is_empty() {
        return Err(DerError::Value);
    }
    let (alg, rest) = expect(outer.contents, SEQUENCE)?;
    let (bits, _) = expect(rest, BIT_STRING)?;
    let Some((0, key)) = bits.contents.split_first() else {
        return Err(DerError::Value);
    };
    let is = |id: AlgorithmIdentifier| alg.contents == id.as_ref();
    Ok(if is(alg_id::ECDSA_P256) {
        SpkiKey::Ec {
            curve: EcCurve::P256,
            point: key,
        }
    } else if is(alg_id::ECDSA_P384) {
        SpkiKey::Ec {
            curve: EcCurve::P384,
            point: key,
        }
    } else if is(alg_id::RSA_ENCRYPTION) {
        let (seq, _) = expect(key, SEQUENCE)?;
        let (n, _) = expect(seq.contents, INTEGER)?;
        SpkiKey::Rsa {
            public_key: key,
            bits: integer_bits(n.contents),
        }
    } else {
        SpkiKey::Other
    })
}

/// Bit length of a DER INTEGER's contents (leading zero bytes ignored).
fn integer_bits(contents: &[u8]) -> usize {
    let start = contents
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(contents.len());
    let m = &contents[start..];
    match m.first() {
        Some(&b) => (m.len() - 1) * 8 + (8 - b.leading_zeros() as usize),
        None => 0,
    }
}

/// The modulus size of a PKCS#1 RSAPrivateKey (`SEQUENCE { version, n, … }`).
pub fn rsa_private_key_bits(pkcs1: &[u8]) -> Result<usize, DerError> {
    let (key, _) = expect(pkcs1, SEQUENCE)?;
    let (_version, rest) = expect(key.contents, INTEGER)?;
    let (n, _) = expect(rest, INTEGER)?;
    Ok(integer_bits(n.contents))
}

/// The modulus size of a PKCS#8 key, if it is an RSA key (`None` for other algorithms).
pub fn pkcs8_rsa_bits(pkcs8: &[u8]) -> Result<Option<usize>, DerError> {
    let (info, _) = expect(pkcs8, SEQUENCE)?;
    let (_version, rest) = expect(info.contents, INTEGER)?;
    let (alg, rest) = expect(rest, SEQUENCE)?;
    if alg.contents != alg_id::RSA_ENCRYPTION.as_ref() {
        return Ok(None);
    }
    let (inner, _) = expect(rest, OCTET_STRING)?;
    rsa_private_key_bits(inner.contents).map(Some)
}

/// `CKA_EC_POINT` is specified as a DER OCTET STRING around the point, but some modules return
/// the bare point; accept both.
pub fn unwrap_ec_point(value: &[u8]) -> Option<&[u8]> {
    let uncompressed = |p: &[u8]| p.first() == Some(&0x04) && p.len() % 2 == 1;
    // Bare uncompressed P-256 / P-384 points (the wrapped forms are 67 / 99 bytes).
    if value.first() == Some(&0x04) && (value.len() == 65 || value.len() == 97) {
        return Some(value);
    }
    if let Ok((wrapped, rest)) = expect(value, OCTET_STRING) {
        if rest.is_empty() && uncompressed(wrapped.contents) {
            return Some(wrapped.contents);
        }
    }
    uncompressed(value).then_some(value)
}

/// DigestInfo prefixes (RFC 8017 §9.2 note 1) for `CKM_RSA_PKCS` signatures.
pub const DIGEST_INFO_SHA256: &[u8] = &[
    0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05,
    0x00, 0x04, 0x20,
];
/// DigestInfo prefix for SHA-384.
pub const DIGEST_INFO_SHA384: &[u8] = &[
    0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02, 0x05,
    0x00, 0x04, 0x30,
];

/// Attribute type OIDs of names (X.520, arc 2.5.4), with tag and length: (OID, short name).
pub const NAME_ATTRIBUTES: [(&[u8], &str); 7] = [
    (&[OID, 0x03, 0x55, 0x04, 0x03], "CN"),
    (&[OID, 0x03, 0x55, 0x04, 0x06], "C"),
    (&[OID, 0x03, 0x55, 0x04, 0x07], "L"),
    (&[OID, 0x03, 0x55, 0x04, 0x08], "ST"),
    (&[OID, 0x03, 0x55, 0x04, 0x0a], "O"),
    (&[OID, 0x03, 0x55, 0x04, 0x0b], "OU"),
    (&[OID, 0x03, 0x55, 0x04, 0x05], "serialNumber"),
];

/// The OID (with tag and length) of the name attribute with `short` name, e.g. `CN`.
pub fn name_attribute_oid(short: &str) -> Option<&'static [u8]> {
    NAME_ATTRIBUTES
        .iter()
        .find(|(_, s)| *s == short)
        .map(|(oid, _)| *oid)
}

/// Dotted form of an OID's contents, e.g. `1.2.840.113549.1.9.1`.
pub fn dotted_oid(oid: &[u8]) -> String {
    let mut arcs = Vec::new();
    let mut acc: u64 = 0;
    for (i, &b) in oid.iter().enumerate() {
        acc = (acc << 7) | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            if arcs.is_empty() {
                let (first, second) = if acc < 80 {
                    (acc / 40, acc % 40)
                } else {
                    (2, acc - 80)
                };
                arcs.push(first.to_string());
                arcs.push(second.to_string());
            } else {
                arcs.push(acc.to_string());
            }
            acc = 0;
        } else if i == oid.len() - 1 {
            arcs.push("?".into());
        }
    }
    arcs.join(".")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ecdsa_conversion() {
        let mut raw = vec![0u8; 64];
        raw[0] = 0x80; // r needs a leading zero
        raw[32] = 0x00;
        raw[33] = 0x01; // s has a leading zero to strip
        let der = ecdsa_raw_to_der(&raw).unwrap();
        let (sig, rest) = expect(&der, SEQUENCE).unwrap();
        assert!(rest.is_empty());
        let (r, rest) = expect(sig.contents, INTEGER).unwrap();
        let (s, _) = expect(rest, INTEGER).unwrap();
        assert_eq!(r.contents.len(), 33);
        assert_eq!(r.contents[0], 0);
        assert_eq!(s.contents.len(), 31);
        assert_eq!(s.contents[0], 1);
        assert!(ecdsa_raw_to_der(&[1, 2, 3]).is_none());
    }

    #[test]
    fn long_lengths_and_raw() {
        let t = tlv(OCTET_STRING, &[0u8; 300]);
        assert_eq!(&t[..4], &[0x04, 0x82, 0x01, 0x2c]);
        let mut input = t.clone();
        input.push(0xff);
        let (el, rest) = read(&input).unwrap();
        assert_eq!(
            (el.contents.len(), el.raw, rest),
            (300, t.as_slice(), &[0xff][..])
        );
    }

    #[test]
    fn bad_input_is_an_error() {
        assert_eq!(read(&[]), Err(DerError::Truncated));
        assert_eq!(read(&[0x30]), Err(DerError::Truncated));
        assert_eq!(read(&[0x30, 0x80]), Err(DerError::BadLength));
        assert_eq!(read(&[0x30, 0x85, 1, 1, 1, 1, 1]), Err(DerError::BadLength));
        assert_eq!(
            read(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]),
            Err(DerError::Truncated)
        );
        assert_eq!(read(&[0x1f, 0x01, 0x00]), Err(DerError::MultiByteTag));
        assert_eq!(
            expect(&[0x02, 0x00], SEQUENCE),
            Err(DerError::Unexpected {
                want: SEQUENCE,
                got: INTEGER
            })
        );
    }

    #[test]
    fn spki_round_trip() {
        let point = [4u8; 65];
        let spki = EcCurve::P256.spki(&point);
        assert_eq!(
            parse_spki(spki.as_ref()),
            Ok(SpkiKey::Ec {
                curve: EcCurve::P256,
                point: &point
            })
        );
        let mut n = vec![0xc0u8; 256];
        n[255] = 1;
        let spki = spki_rsa(&n, &[1, 0, 1]);
        match parse_spki(spki.as_ref()) {
            Ok(SpkiKey::Rsa { bits, .. }) => assert_eq!(bits, 2048),
            other => panic!("{other:?}"),
        }
        assert!(parse_spki(&[0x30, 0x00]).is_err());
    }

    #[test]
    fn spki_matches_ring_and_rcgen() {
        use rcgen::PublicKeyData;
        for (alg, curve) in [
            (&rcgen::PKCS_ECDSA_P256_SHA256, EcCurve::P256),
            (&rcgen::PKCS_ECDSA_P384_SHA384, EcCurve::P384),
        ] {
            let kp = rcgen::KeyPair::generate_for(alg).unwrap();
            let spki = kp.subject_public_key_info();
            let SpkiKey::Ec { curve: c, point } = parse_spki(&spki).unwrap() else {
                panic!("not EC")
            };
            assert_eq!(c, curve);
            assert_eq!(curve.spki(point).as_ref(), spki.as_slice());
        }
    }

    #[test]
    fn curve_params() {
        assert_eq!(
            EcCurve::from_params(EcCurve::P384.params()),
            Some(EcCurve::P384)
        );
        assert_eq!(EcCurve::from_params(&[0x06, 0x01, 0x00]), None);
        // The id-ecPublicKey AlgorithmIdentifier ends with the curve's parameters.
        for c in [EcCurve::P256, EcCurve::P384] {
            assert!(c.alg_id().as_ref().ends_with(c.params()));
        }
    }

    #[test]
    fn ec_point_forms() {
        let point = [4u8; 65];
        assert_eq!(unwrap_ec_point(&point).unwrap(), point);
        assert_eq!(unwrap_ec_point(&tlv(OCTET_STRING, &point)).unwrap(), point);
        assert!(unwrap_ec_point(&[1, 2]).is_none());
    }

    #[test]
    fn dotted_oids() {
        assert_eq!(
            dotted_oid(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x01]),
            "1.2.840.113549.1.9.1"
        );
        assert_eq!(dotted_oid(&[0x55, 0x04, 0x03]), "2.5.4.3");
        assert_eq!(dotted_oid(&[0x55, 0x84]), "2.5.?");
    }
}
