//! The little DER the key code needs: ECDSA signature conversion, SubjectPublicKeyInfo
//! building and parsing, RSA modulus sizes, and the pieces of a PKCS#10 request (names,
//! algorithm identifiers, BIT STRINGs). Definite-length DER only.

/// OID 1.2.840.10045.2.1 (id-ecPublicKey), encoded with tag and length.
const OID_EC_PUBLIC_KEY: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
/// OID 1.2.840.10045.3.1.7 (prime256v1 / P-256).
pub(crate) const OID_P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// OID 1.3.132.0.34 (secp384r1 / P-384).
pub(crate) const OID_P384: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
/// OID 1.2.840.113549.1.1.1 (rsaEncryption), without tag and length.
const OID_RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];

/// DigestInfo prefixes (RFC 8017 §9.2 note 1) for `CKM_RSA_PKCS` signatures.
pub(crate) const DIGEST_INFO_SHA256: &[u8] = &[
    0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05,
    0x00, 0x04, 0x20,
];
pub(crate) const DIGEST_INFO_SHA384: &[u8] = &[
    0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02, 0x05,
    0x00, 0x04, 0x30,
];

pub(crate) fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 6);
    out.push(tag);
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|&&b| b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
    out
}

/// A non-negative INTEGER from big-endian magnitude bytes.
pub(crate) fn unsigned_integer(magnitude: &[u8]) -> Vec<u8> {
    let start = magnitude
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(magnitude.len());
    let m = &magnitude[start..];
    let mut content = Vec::with_capacity(m.len() + 1);
    if m.is_empty() || m[0] & 0x80 != 0 {
        content.push(0);
    }
    content.extend_from_slice(m);
    tlv(0x02, &content)
}

/// SEQUENCE of already-encoded parts.
pub(crate) fn sequence(parts: &[&[u8]]) -> Vec<u8> {
    tlv(0x30, &parts.concat())
}

/// SET of already-encoded parts, in DER order (sorted by their encodings, X.690 §11.6).
pub(crate) fn set_of(parts: &[&[u8]]) -> Vec<u8> {
    let mut sorted = parts.to_vec();
    sorted.sort_unstable();
    tlv(0x31, &sorted.concat())
}

/// BIT STRING with no unused bits.
pub(crate) fn bit_string(bytes: &[u8]) -> Vec<u8> {
    let mut content = Vec::with_capacity(bytes.len() + 1);
    content.push(0);
    content.extend_from_slice(bytes);
    tlv(0x03, &content)
}

/// PKCS#11 returns ECDSA signatures as r‖s; TLS and X.509 want `SEQUENCE { r, s }`.
pub(crate) fn ecdsa_raw_to_der(raw: &[u8]) -> Option<Vec<u8>> {
    if raw.is_empty() || raw.len() % 2 != 0 {
        return None;
    }
    let (r, s) = raw.split_at(raw.len() / 2);
    Some(sequence(&[&unsigned_integer(r), &unsigned_integer(s)]))
}

/// SubjectPublicKeyInfo for an EC key; `curve_oid` is a full OID TLV such as [`OID_P256`].
pub(crate) fn spki_ec(curve_oid: &[u8], point: &[u8]) -> Vec<u8> {
    let alg = sequence(&[OID_EC_PUBLIC_KEY, curve_oid]);
    sequence(&[&alg, &bit_string(point)])
}

/// PKCS#1 RSAPublicKey.
pub(crate) fn rsa_public_key(modulus: &[u8], exponent: &[u8]) -> Vec<u8> {
    sequence(&[&unsigned_integer(modulus), &unsigned_integer(exponent)])
}

/// SubjectPublicKeyInfo for an RSA key.
pub(crate) fn spki_rsa(modulus: &[u8], exponent: &[u8]) -> Vec<u8> {
    let alg = sequence(&[&tlv(0x06, OID_RSA_ENCRYPTION), &[0x05, 0x00]]);
    sequence(&[&alg, &bit_string(&rsa_public_key(modulus, exponent))])
}

/// AlgorithmIdentifier for ecdsa-with-SHA256 (1.2.840.10045.4.3.2, parameters absent).
pub(crate) const ALG_ECDSA_SHA256: &[u8] = &[
    0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02,
];
/// AlgorithmIdentifier for ecdsa-with-SHA384 (1.2.840.10045.4.3.3, parameters absent).
pub(crate) const ALG_ECDSA_SHA384: &[u8] = &[
    0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03,
];
/// AlgorithmIdentifier for sha256WithRSAEncryption (1.2.840.113549.1.1.11, NULL parameters).
pub(crate) const ALG_RSA_PKCS1_SHA256: &[u8] = &[
    0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b, 0x05, 0x00,
];

/// Attribute type OIDs (X.520, arc 2.5.4), encoded with tag and length.
pub(crate) const OID_COMMON_NAME: &[u8] = &[0x06, 0x03, 0x55, 0x04, 0x03];
pub(crate) const OID_COUNTRY_NAME: &[u8] = &[0x06, 0x03, 0x55, 0x04, 0x06];
pub(crate) const OID_LOCALITY_NAME: &[u8] = &[0x06, 0x03, 0x55, 0x04, 0x07];
pub(crate) const OID_STATE_OR_PROVINCE_NAME: &[u8] = &[0x06, 0x03, 0x55, 0x04, 0x08];
pub(crate) const OID_ORGANIZATION_NAME: &[u8] = &[0x06, 0x03, 0x55, 0x04, 0x0a];
pub(crate) const OID_ORGANIZATIONAL_UNIT_NAME: &[u8] = &[0x06, 0x03, 0x55, 0x04, 0x0b];

/// Universal tags of the directory string types iotcred writes.
pub(crate) const TAG_UTF8_STRING: u8 = 0x0c;
pub(crate) const TAG_PRINTABLE_STRING: u8 = 0x13;

/// Reads one TLV: (tag, content, rest).
pub(crate) fn read_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// Bit length of a DER INTEGER's content (leading zero bytes ignored).
fn integer_bits(content: &[u8]) -> usize {
    let start = content
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(content.len());
    let m = &content[start..];
    match m.first() {
        Some(&b) => (m.len() - 1) * 8 + (8 - b.leading_zeros() as usize),
        None => 0,
    }
}

/// The modulus size of a PKCS#1 RSAPrivateKey (`SEQUENCE { version, n, … }`).
pub(crate) fn rsa_private_key_bits(pkcs1: &[u8]) -> Option<usize> {
    let (0x30, body, _) = read_tlv(pkcs1)? else {
        return None;
    };
    let (0x02, _version, rest) = read_tlv(body)? else {
        return None;
    };
    let (0x02, n, _) = read_tlv(rest)? else {
        return None;
    };
    Some(integer_bits(n))
}

/// If `pkcs8` is a PKCS#8 RSA key, its modulus size.
pub(crate) fn pkcs8_rsa_bits(pkcs8: &[u8]) -> Option<usize> {
    let (0x30, body, _) = read_tlv(pkcs8)? else {
        return None;
    };
    let (0x02, _version, rest) = read_tlv(body)? else {
        return None;
    };
    let (0x30, alg, rest) = read_tlv(rest)? else {
        return None;
    };
    let (0x06, oid, _) = read_tlv(alg)? else {
        return None;
    };
    if oid != OID_RSA_ENCRYPTION {
        return None;
    }
    let (0x04, inner, _) = read_tlv(rest)? else {
        return None;
    };
    rsa_private_key_bits(inner)
}

/// The key inside a SubjectPublicKeyInfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SpkiKey<'a> {
    /// An EC key on a named curve (`curve_oid` with tag and length) with its point.
    Ec {
        curve_oid: &'a [u8],
        point: &'a [u8],
    },
    /// An RSA key: the RSAPublicKey DER and the modulus size in bits.
    Rsa { public_key: &'a [u8], bits: usize },
    /// Anything else.
    Other,
}

pub(crate) fn parse_spki(spki: &[u8]) -> Option<SpkiKey<'_>> {
    let (0x30, body, _) = read_tlv(spki)? else {
        return None;
    };
    let (0x30, alg, rest) = read_tlv(body)? else {
        return None;
    };
    let (0x03, bits, _) = read_tlv(rest)? else {
        return None;
    };
    let (0, key) = bits.split_first()? else {
        return None;
    };
    let (0x06, oid, params) = read_tlv(alg)? else {
        return None;
    };
    if tlv(0x06, oid) == OID_EC_PUBLIC_KEY {
        let (0x06, _, _) = read_tlv(params)? else {
            return None;
        };
        let curve_len = params.len() - read_tlv(params)?.2.len();
        return Some(SpkiKey::Ec {
            curve_oid: &params[..curve_len],
            point: key,
        });
    }
    if oid == OID_RSA_ENCRYPTION {
        let (0x30, seq, _) = read_tlv(key)? else {
            return None;
        };
        let (0x02, n, _) = read_tlv(seq)? else {
            return None;
        };
        return Some(SpkiKey::Rsa {
            public_key: key,
            bits: integer_bits(n),
        });
    }
    Some(SpkiKey::Other)
}

/// `CKA_EC_POINT` is specified as a DER OCTET STRING around the point, but some modules return
/// the bare point; accept both.
pub(crate) fn unwrap_ec_point(value: &[u8]) -> Option<Vec<u8>> {
    // Bare uncompressed P-256 / P-384 points (the wrapped forms are 67 / 99 bytes).
    if value.first() == Some(&0x04) && (value.len() == 65 || value.len() == 97) {
        return Some(value.to_vec());
    }
    if let Some((0x04, inner, rest)) = read_tlv(value) {
        if rest.is_empty() && inner.first() == Some(&0x04) && inner.len() % 2 == 1 {
            return Some(inner.to_vec());
        }
    }
    if value.first() == Some(&0x04) && value.len() % 2 == 1 {
        return Some(value.to_vec());
    }
    None
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
        let (tag, body, rest) = read_tlv(&der).unwrap();
        assert_eq!((tag, rest.len()), (0x30, 0));
        let (_, r, rest) = read_tlv(body).unwrap();
        let (_, s, _) = read_tlv(rest).unwrap();
        assert_eq!(r.len(), 33);
        assert_eq!(r[0], 0);
        assert_eq!(s.len(), 31);
        assert_eq!(s[0], 1);
        assert!(ecdsa_raw_to_der(&[1, 2, 3]).is_none());
    }

    #[test]
    fn long_lengths() {
        let t = tlv(0x04, &[0u8; 300]);
        assert_eq!(&t[..4], &[0x04, 0x82, 0x01, 0x2c]);
        let (_, c, rest) = read_tlv(&t).unwrap();
        assert_eq!((c.len(), rest.len()), (300, 0));
    }

    #[test]
    fn spki_round_trip() {
        let point = [4u8; 65];
        let spki = spki_ec(OID_P256, &point);
        assert_eq!(
            parse_spki(&spki),
            Some(SpkiKey::Ec {
                curve_oid: OID_P256,
                point: &point
            })
        );
        let mut n = vec![0xc0u8; 256];
        n[255] = 1;
        let spki = spki_rsa(&n, &[1, 0, 1]);
        match parse_spki(&spki) {
            Some(SpkiKey::Rsa { bits, .. }) => assert_eq!(bits, 2048),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ec_point_forms() {
        let point = [4u8; 65];
        assert_eq!(unwrap_ec_point(&point).unwrap(), point);
        assert_eq!(unwrap_ec_point(&tlv(0x04, &point)).unwrap(), point);
        assert!(unwrap_ec_point(&[1, 2]).is_none());
    }
}
