//! The few facts the agent reads from an X.509 certificate — subject, validity and the
//! SubjectPublicKeyInfo — with a small DER reader (definite lengths only, no allocation but the
//! subject text). rustls/webpki do the real verification; this only serves start-up checks and
//! messages, and keeps a full X.509 parser out of the binary.

use iotcred_core::UnixTime;

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

/// One DER element: tag, contents, and the whole encoding.
struct Tlv<'a> {
    tag: u8,
    contents: &'a [u8],
    raw: &'a [u8],
}

/// Reads one element from the front of `input`; returns it and the rest.
fn read(input: &[u8]) -> Result<(Tlv<'_>, &[u8]), &'static str> {
    let (&tag, rest) = input.split_first().ok_or("truncated")?;
    if tag & 0x1f == 0x1f {
        return Err("multi-byte tags are not used in certificates");
    }
    let (&first, rest) = rest.split_first().ok_or("truncated")?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return Err("bad length");
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return Err("truncated");
    }
    let header = input.len() - rest.len();
    Ok((
        Tlv {
            tag,
            contents: &rest[..len],
            raw: &input[..header + len],
        },
        &rest[len..],
    ))
}

fn expect(input: &[u8], tag: u8) -> Result<(Tlv<'_>, &[u8]), &'static str> {
    let (t, rest) = read(input)?;
    if t.tag != tag {
        return Err("unexpected element");
    }
    Ok((t, rest))
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;

/// Parses the leaf certificate's subject, validity and public key.
pub fn parse_leaf(der: &[u8]) -> Result<LeafInfo, String> {
    parse(der).map_err(|e| format!("cannot parse the certificate ({e})"))
}

fn parse(der: &[u8]) -> Result<LeafInfo, &'static str> {
    let (cert, _) = expect(der, SEQUENCE)?;
    let (tbs, _) = expect(cert.contents, SEQUENCE)?;
    let mut rest = tbs.contents;
    // [0] EXPLICIT version, optional.
    let (first, after) = read(rest)?;
    if first.tag == 0xa0 {
        rest = after;
    }
    let (_serial, r) = expect(rest, 0x02)?;
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
fn time(t: &Tlv<'_>) -> Result<UnixTime, &'static str> {
    let s = core::str::from_utf8(t.contents).map_err(|_| "bad time")?;
    let (year, rest) = match t.tag {
        UTC_TIME if s.len() == 13 => {
            let yy: i32 = s[..2].parse().map_err(|_| "bad time")?;
            // RFC 5280: YY ≥ 50 is 19YY, otherwise 20YY.
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &s[2..])
        }
        GENERALIZED_TIME if s.len() == 15 => (s[..4].parse().map_err(|_| "bad time")?, &s[4..]),
        _ => return Err("bad time"),
    };
    if !rest.ends_with('Z') || !rest[..rest.len() - 1].bytes().all(|b| b.is_ascii_digit()) {
        return Err("bad time");
    }
    let text = format!(
        "{year:04}-{}-{}T{}:{}:{}Z",
        &rest[0..2],
        &rest[2..4],
        &rest[4..6],
        &rest[6..8],
        &rest[8..10]
    );
    UnixTime::parse_rfc3339(&text).map_err(|_| "bad time")
}

/// `Name ::= SEQUENCE OF SET OF AttributeTypeAndValue` → (`CN=…, O=…`, first CN).
fn name(mut rdns: &[u8]) -> Result<(String, Option<String>), &'static str> {
    let mut parts = Vec::new();
    let mut cn = None;
    while !rdns.is_empty() {
        let (set, r) = expect(rdns, SET)?;
        rdns = r;
        let mut atvs = set.contents;
        while !atvs.is_empty() {
            let (atv, r) = expect(atvs, SEQUENCE)?;
            atvs = r;
            let (oid, r) = expect(atv.contents, OID)?;
            let (value, _) = read(r)?;
            let text = String::from_utf8_lossy(value.contents).into_owned();
            let label = match oid.contents {
                [0x55, 0x04, 0x03] => "CN",
                [0x55, 0x04, 0x06] => "C",
                [0x55, 0x04, 0x07] => "L",
                [0x55, 0x04, 0x08] => "ST",
                [0x55, 0x04, 0x0a] => "O",
                [0x55, 0x04, 0x0b] => "OU",
                [0x55, 0x04, 0x05] => "serialNumber",
                _ => "",
            };
            if label == "CN" && cn.is_none() {
                cn = Some(text.clone());
            }
            let label = if label.is_empty() {
                dotted(oid.contents)
            } else {
                label.to_string()
            };
            parts.push(format!("{label}={text}"));
        }
    }
    Ok((parts.join(", "), cn))
}

/// Dotted form of an OID's contents.
fn dotted(oid: &[u8]) -> String {
    let mut arcs = Vec::new();
    let mut acc: u64 = 0;
    for (i, &b) in oid.iter().enumerate() {
        acc = (acc << 7) | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            if arcs.is_empty() {
                let (a, b) = if acc < 80 {
                    (acc / 40, acc % 40)
                } else {
                    (2, acc - 80)
                };
                arcs.push(a.to_string());
                arcs.push(b.to_string());
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

    #[test]
    fn dotted_oids() {
        assert_eq!(
            dotted(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x01]),
            "1.2.840.113549.1.9.1"
        );
        assert_eq!(dotted(&[0x55, 0x04, 0x03]), "2.5.4.3");
    }
}
