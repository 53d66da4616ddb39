//! The few facts the agent reads from an X.509 certificate — subject, validity and the
//! SubjectPublicKeyInfo — with the crate's DER reader (`der.rs`). rustls/webpki do the
//! real verification; this only serves start-up checks and messages, and keeps a full X.509
//! parser out of the binary.

use iotcred_core::UnixTime;

use crate::der::{self, DerError, SEQUENCE, Tlv, expect, read};

/// What `check` and the start-up checks need from the leaf certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeafInfo {
    /// Subject as `CN=…, O=…` text (known attribute names; others as dotted OIDs).
    pub subject: String,
    /// The first common name of the subject.
    pub subject_cn: Option<String>,
    /// Start of validity.
    pub not_before: UnixTime,
    /// End of validity.
    pub not_after: UnixTime,
    /// The SubjectPublicKeyInfo, DER (tag and length included).
    pub spki: Vec<u8>,
}

const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;
/// `[0] EXPLICIT Version` of a TBSCertificate.
const VERSION: u8 = 0xa0;

/// Why a certificate cannot be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LeafError {
    /// The DER structure is broken.
    #[error("cannot parse the certificate ({0})")]
    Der(#[from] DerError),
    /// A validity time is not the `YYMMDDHHMMSSZ` / `YYYYMMDDHHMMSSZ` RFC 5280 requires.
    #[error("cannot parse the certificate (bad validity time)")]
    Time,
}

/// Parses the leaf certificate's subject, validity and public key.
pub fn parse_leaf(der: &[u8]) -> Result<LeafInfo, LeafError> {
    let (cert, _) = expect(der, SEQUENCE)?;
    let (tbs, _) = expect(cert.contents, SEQUENCE)?;
    let mut rest = tbs.contents;
    let (first, after) = read(rest)?;
    if first.tag == VERSION {
        rest = after;
    }
    let (_serial, r) = expect(rest, der::INTEGER)?;
    let (_sig_alg, r) = expect(r, SEQUENCE)?;
    let (_issuer, r) = expect(r, SEQUENCE)?;
    let (validity, r) = expect(r, SEQUENCE)?;
    let (subject, r) = expect(r, SEQUENCE)?;
    let (spki, _) = expect(r, SEQUENCE)?;
    let (nb, vr) = read(validity.contents)?;
    let (na, _) = read(vr)?;
    let (subject_text, subject_cn) = name(subject.contents)?;
    Ok(LeafInfo {
        subject: subject_text,
        subject_cn,
        not_before: time(&nb)?,
        not_after: time(&na)?,
        spki: spki.raw.to_vec(),
    })
}

/// `Time ::= UTCTime | GeneralizedTime`, both `…Z` in certificates (RFC 5280 §4.1.2.5).
fn time(t: &Tlv<'_>) -> Result<UnixTime, LeafError> {
    let Some((&b'Z', digits)) = t.contents.split_last() else {
        return Err(LeafError::Time);
    };
    // All ASCII digits, so the text below slices on character boundaries.
    let digits = core::str::from_utf8(digits).map_err(|_| LeafError::Time)?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(LeafError::Time);
    }
    let number = |s: &str| s.parse::<u32>().map_err(|_| LeafError::Time);
    let (year, rest) = match (t.tag, digits.len()) {
        (UTC_TIME, 12) => {
            let yy = number(&digits[..2])?;
            // RFC 5280: YY ≥ 50 is 19YY, otherwise 20YY.
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &digits[2..])
        }
        (GENERALIZED_TIME, 14) => (number(&digits[..4])?, &digits[4..]),
        _ => return Err(LeafError::Time),
    };
    let text = format!(
        "{year:04}-{}-{}T{}:{}:{}Z",
        &rest[0..2],
        &rest[2..4],
        &rest[4..6],
        &rest[6..8],
        &rest[8..10]
    );
    UnixTime::parse_rfc3339(&text).map_err(|_| LeafError::Time)
}

/// `Name ::= SEQUENCE OF SET OF AttributeTypeAndValue` → (`CN=…, O=…`, first CN).
fn name(mut rdns: &[u8]) -> Result<(String, Option<String>), DerError> {
    let mut parts = Vec::new();
    let mut cn = None;
    while !rdns.is_empty() {
        let (set, r) = expect(rdns, der::SET)?;
        rdns = r;
        let mut atvs = set.contents;
        while !atvs.is_empty() {
            let (atv, r) = expect(atvs, SEQUENCE)?;
            atvs = r;
            let (oid, r) = expect(atv.contents, der::OID)?;
            let (value, _) = read(r)?;
            let text = String::from_utf8_lossy(value.contents).into_owned();
            let label = der::NAME_ATTRIBUTES
                .iter()
                .find(|(o, _)| *o == oid.raw)
                .map(|(_, short)| *short);
            if label == Some("CN") && cn.is_none() {
                cn = Some(text.clone());
            }
            let label = label.map_or_else(|| der::dotted_oid(oid.contents), str::to_owned);
            parts.push(format!("{label}={text}"));
        }
    }
    Ok((parts.join(", "), cn))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(not_before: &str, not_after: &str, cn: &str) -> rcgen::CertifiedKey<rcgen::KeyPair> {
        let mut p = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name
            .push(rcgen::DnType::OrganizationName, "Example Fleet");
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        let parse = |s: &str| {
            let t = UnixTime::parse_rfc3339(s).unwrap().as_secs();
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(t as u64)
        };
        p.not_before = parse(not_before).into();
        p.not_after = parse(not_after).into();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = p.self_signed(&key).unwrap();
        rcgen::CertifiedKey {
            cert,
            signing_key: key,
        }
    }

    #[test]
    fn reads_subject_validity_and_spki() {
        // 2049 is encoded as UTCTime, 2050 and later as GeneralizedTime (RFC 5280).
        for (nb, na) in [
            ("2026-01-02T03:04:05Z", "2049-12-31T23:59:59Z"),
            ("1999-06-01T00:00:00Z", "2099-01-01T00:00:00Z"),
        ] {
            let c = cert(nb, na, "gateway-0042");
            let info = parse_leaf(c.cert.der()).unwrap();
            assert_eq!(info.subject_cn.as_deref(), Some("gateway-0042"));
            assert_eq!(info.subject, "O=Example Fleet, CN=gateway-0042");
            assert_eq!(info.not_before, UnixTime::parse_rfc3339(nb).unwrap());
            assert_eq!(info.not_after, UnixTime::parse_rfc3339(na).unwrap());
            use rcgen::PublicKeyData;
            assert_eq!(info.spki, c.signing_key.subject_public_key_info());
        }
    }

    #[test]
    fn times_with_non_ascii_are_refused() {
        // 13 bytes of UTCTime whose 2nd character is multi-byte: no slicing inside it.
        for contents in [
            "aé34567890Z".as_bytes(),
            "2é345678901Z".as_bytes(),
            b"991231235959z",
        ] {
            let t = Tlv {
                tag: UTC_TIME,
                contents,
                raw: &[],
            };
            assert_eq!(time(&t), Err(LeafError::Time), "{contents:?}");
        }
        let ok = Tlv {
            tag: UTC_TIME,
            contents: b"491231235959Z",
            raw: &[],
        };
        assert_eq!(
            time(&ok),
            UnixTime::parse_rfc3339("2049-12-31T23:59:59Z").map_err(|_| LeafError::Time)
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let c = cert("2026-01-02T03:04:05Z", "2027-01-02T03:04:05Z", "x");
        let der = c.cert.der().to_vec();
        for cut in 0..der.len() {
            let _ = parse_leaf(&der[..cut]);
        }
        assert!(parse_leaf(&[]).is_err());
        assert!(parse_leaf(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]).is_err());
        let mut flipped = der.clone();
        for i in 0..flipped.len() {
            flipped[i] ^= 0xff;
            let _ = parse_leaf(&flipped);
            flipped[i] ^= 0xff;
        }
    }
}
