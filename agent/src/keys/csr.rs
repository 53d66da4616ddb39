//! PKCS#10 certification requests (RFC 2986), DER-encoded by hand:
//!
//! ```text
//! CertificationRequest ::= SEQUENCE {
//!     certificationRequestInfo  SEQUENCE {
//!         version        INTEGER 0,
//!         subject        Name,
//!         subjectPKInfo  SubjectPublicKeyInfo,
//!         attributes     [0] IMPLICIT SET OF Attribute   -- empty: A0 00
//!     },
//!     signatureAlgorithm  AlgorithmIdentifier,
//!     signature           BIT STRING }
//! ```
//!
//! The signature comes from a callback (the token, or ring for a file key) and is checked
//! against the request's own public key before the request is handed out.

use rustls_pki_types::alg_id;

use super::{KeyError, SignFailure};
use crate::der::{self, EcCurve, SpkiKey};

/// The attribute types a subject may carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AttrType {
    /// CN (2.5.4.3).
    CommonName,
    /// O (2.5.4.10).
    Organization,
    /// OU (2.5.4.11).
    OrganizationalUnit,
    /// C (2.5.4.6), a two-letter country code.
    Country,
    /// ST (2.5.4.8).
    StateOrProvince,
    /// L (2.5.4.7).
    Locality,
}

impl AttrType {
    /// The type for a short name such as `CN` (case-insensitive).
    pub(crate) fn from_short_name(name: &str) -> Option<Self> {
        Some(match name.to_ascii_uppercase().as_str() {
            "CN" => AttrType::CommonName,
            "O" => AttrType::Organization,
            "OU" => AttrType::OrganizationalUnit,
            "C" => AttrType::Country,
            "ST" => AttrType::StateOrProvince,
            "L" => AttrType::Locality,
            _ => return None,
        })
    }

    /// The short name, as in `CN=…`.
    fn short_name(self) -> &'static str {
        match self {
            AttrType::CommonName => "CN",
            AttrType::Organization => "O",
            AttrType::OrganizationalUnit => "OU",
            AttrType::Country => "C",
            AttrType::StateOrProvince => "ST",
            AttrType::Locality => "L",
        }
    }

    /// The OID, with tag and length.
    fn oid(self) -> &'static [u8] {
        der::name_attribute_oid(self.short_name()).unwrap_or_default()
    }

    /// Checks that `value` can be encoded for this type; the error says why not.
    pub(crate) fn check_value(self, value: &str) -> Result<(), String> {
        if value.is_empty() {
            return Err("is empty".into());
        }
        // X.520 CountryName is a PrintableString of SIZE(2): an ISO 3166 alpha-2 code.
        if self == AttrType::Country
            && !(value.len() == 2 && value.bytes().all(|b| b.is_ascii_alphabetic()))
        {
            return Err(format!(
                "\"{value}\" is not a two-letter country code (e.g. DE)"
            ));
        }
        Ok(())
    }

    /// The directory string type: PrintableString for C, UTF8String for the others.
    fn string_tag(self) -> u8 {
        match self {
            AttrType::Country => der::PRINTABLE_STRING,
            _ => der::UTF8_STRING,
        }
    }
}

/// A subject name: one RDN per attribute, in the order pushed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Subject {
    attrs: Vec<(AttrType, String)>,
}

impl Subject {
    pub(crate) fn push(&mut self, ty: AttrType, value: impl Into<String>) {
        self.attrs.push((ty, value.into()));
    }

    /// The value of the first attribute of type `ty`.
    pub(crate) fn get(&self, ty: AttrType) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(t, _)| *t == ty)
            .map(|(_, v)| v.as_str())
    }

    /// The attributes in order.
    #[cfg(test)]
    pub(crate) fn attrs(&self) -> impl Iterator<Item = (AttrType, &str)> {
        self.attrs.iter().map(|(t, v)| (*t, v.as_str()))
    }

    /// `Name ::= SEQUENCE OF SET OF SEQUENCE { type OID, value DirectoryString }`.
    pub(crate) fn to_der(&self) -> Vec<u8> {
        let rdns: Vec<Vec<u8>> = self
            .attrs
            .iter()
            .map(|(ty, value)| {
                let atv = der::sequence(&[ty.oid(), &der::tlv(ty.string_tag(), value.as_bytes())]);
                der::set_of(&[&atv])
            })
            .collect();
        let parts: Vec<&[u8]> = rdns.iter().map(Vec::as_slice).collect();
        der::sequence(&parts)
    }
}

/// The signature algorithm of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SignatureAlg {
    /// ecdsa-with-SHA256, for P-256 keys.
    EcdsaP256Sha256,
    /// ecdsa-with-SHA384, for P-384 keys.
    EcdsaP384Sha384,
    /// sha256WithRSAEncryption (PKCS#1 v1.5), for RSA keys.
    RsaPkcs1Sha256,
}

impl SignatureAlg {
    /// The AlgorithmIdentifier DER.
    fn identifier(self) -> Vec<u8> {
        der::algorithm_identifier(&match self {
            SignatureAlg::EcdsaP256Sha256 => alg_id::ECDSA_SHA256,
            SignatureAlg::EcdsaP384Sha384 => alg_id::ECDSA_SHA384,
            SignatureAlg::RsaPkcs1Sha256 => alg_id::RSA_PKCS1_SHA256,
        })
    }

    /// Whether `signature` over `message` verifies with the key in `spki`.
    fn verify(self, spki: &[u8], message: &[u8], signature: &[u8]) -> bool {
        use ring::signature::{self as sig, UnparsedPublicKey, VerificationAlgorithm};

        let (alg, key): (&dyn VerificationAlgorithm, &[u8]) = match (self, der::parse_spki(spki)) {
            (
                SignatureAlg::EcdsaP256Sha256,
                Ok(SpkiKey::Ec {
                    curve: EcCurve::P256,
                    point,
                }),
            ) => (&sig::ECDSA_P256_SHA256_ASN1, point),
            (
                SignatureAlg::EcdsaP384Sha384,
                Ok(SpkiKey::Ec {
                    curve: EcCurve::P384,
                    point,
                }),
            ) => (&sig::ECDSA_P384_SHA384_ASN1, point),
            (SignatureAlg::RsaPkcs1Sha256, Ok(SpkiKey::Rsa { public_key, .. })) => {
                (&sig::RSA_PKCS1_2048_8192_SHA256, public_key)
            }
            _ => return false,
        };
        UnparsedPublicKey::new(alg, key)
            .verify(message, signature)
            .is_ok()
    }
}

/// The DER of `CertificationRequestInfo` for `subject` and the public key `spki`, no attributes.
pub(crate) fn request_info(subject: &Subject, spki: &[u8]) -> Vec<u8> {
    const VERSION_1: &[u8] = &[0x02, 0x01, 0x00];
    const NO_ATTRIBUTES: &[u8] = &[0xa0, 0x00];
    der::sequence(&[VERSION_1, &subject.to_der(), spki, NO_ATTRIBUTES])
}

/// A DER `CertificationRequest`. `sign` gets the DER of the request info and returns the
/// signature as X.509 carries it (ECDSA as `SEQUENCE { r, s }`, RSA as the PKCS#1 block).
pub(crate) fn build(
    subject: &Subject,
    spki: &[u8],
    alg: SignatureAlg,
    sign: impl FnOnce(&[u8]) -> Result<Vec<u8>, KeyError>,
) -> Result<Vec<u8>, KeyError> {
    let info = request_info(subject, spki);
    let signature = sign(&info)?;
    if !alg.verify(spki, &info, &signature) {
        return Err(KeyError::Sign(SignFailure::SelfCheck));
    }
    Ok(der::sequence(&[
        &info,
        &alg.identifier(),
        &der::bit_string(&signature),
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{self as sig, EcdsaKeyPair, KeyPair};
    use rustls_pki_types::CertificateSigningRequestDer;

    fn subject() -> Subject {
        let mut s = Subject::default();
        s.push(AttrType::CommonName, "gateway-0042");
        s.push(AttrType::Organization, "Example, Inc.");
        s.push(AttrType::OrganizationalUnit, "Fleet ü");
        s.push(AttrType::Country, "DE");
        s.push(AttrType::StateOrProvince, "Bayern");
        s.push(AttrType::Locality, "München");
        s
    }

    fn ec_csr(
        alg: &'static sig::EcdsaSigningAlgorithm,
        curve: EcCurve,
        sig_alg: SignatureAlg,
    ) -> (Vec<u8>, Vec<u8>) {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
        let kp = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap();
        let spki = curve.spki(kp.public_key().as_ref()).as_ref().to_vec();
        let csr = build(&subject(), &spki, sig_alg, |m| {
            Ok(kp.sign(&rng, m).unwrap().as_ref().to_vec())
        })
        .unwrap();
        (csr, spki)
    }

    /// Parses (and verifies the signature of) a CSR with rcgen/x509-parser.
    fn parse(csr: &[u8]) -> rcgen::CertificateSigningRequestParams {
        rcgen::CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(
            csr.to_vec(),
        ))
        .unwrap()
    }

    fn check_subject(parsed: &rcgen::CertificateSigningRequestParams) {
        use rcgen::{DnType, DnValue};
        let got: Vec<(DnType, DnValue)> = parsed
            .params
            .distinguished_name
            .iter()
            .map(|(t, v)| (t.clone(), v.clone()))
            .collect();
        let utf8 = |s: &str| DnValue::Utf8String(s.into());
        assert_eq!(
            got,
            vec![
                (DnType::CommonName, utf8("gateway-0042")),
                (DnType::OrganizationName, utf8("Example, Inc.")),
                (DnType::OrganizationalUnitName, utf8("Fleet ü")),
                (
                    DnType::CountryName,
                    DnValue::PrintableString("DE".try_into().unwrap())
                ),
                (DnType::StateOrProvinceName, utf8("Bayern")),
                (DnType::LocalityName, utf8("München")),
            ]
        );
    }

    #[test]
    fn p256_csr_parses_and_verifies() {
        use rcgen::PublicKeyData;
        let (csr, spki) = ec_csr(
            &sig::ECDSA_P256_SHA256_ASN1_SIGNING,
            EcCurve::P256,
            SignatureAlg::EcdsaP256Sha256,
        );
        let parsed = parse(&csr);
        check_subject(&parsed);
        assert_eq!(
            parsed.public_key.algorithm(),
            &rcgen::PKCS_ECDSA_P256_SHA256
        );
        assert_eq!(parsed.public_key.subject_public_key_info(), spki);
    }

    #[test]
    fn p384_csr_parses_and_verifies() {
        use rcgen::PublicKeyData;
        let (csr, spki) = ec_csr(
            &sig::ECDSA_P384_SHA384_ASN1_SIGNING,
            EcCurve::P384,
            SignatureAlg::EcdsaP384Sha384,
        );
        let parsed = parse(&csr);
        check_subject(&parsed);
        assert_eq!(
            parsed.public_key.algorithm(),
            &rcgen::PKCS_ECDSA_P384_SHA384
        );
        assert_eq!(parsed.public_key.subject_public_key_info(), spki);
    }

    #[test]
    fn structure_is_exact() {
        let (csr, spki) = ec_csr(
            &sig::ECDSA_P256_SHA256_ASN1_SIGNING,
            EcCurve::P256,
            SignatureAlg::EcdsaP256Sha256,
        );
        let (body, rest) = der::expect(&csr, der::SEQUENCE).unwrap();
        assert!(rest.is_empty());
        let (info, rest) = der::expect(body.contents, der::SEQUENCE).unwrap();
        let info = info.contents;
        let (alg, rest) = der::expect(rest, der::SEQUENCE).unwrap();
        assert_eq!(alg.contents, alg_id::ECDSA_SHA256.as_ref());
        let (bits, rest) = der::expect(rest, der::BIT_STRING).unwrap();
        let bits = bits.contents;
        assert!(rest.is_empty());
        assert_eq!(bits[0], 0);
        // The info: version 0, Name, the SPKI verbatim, then the empty [0] attributes.
        let (version, rest) = info.split_at(3);
        assert_eq!(version, [0x02, 0x01, 0x00]);
        let name = subject().to_der();
        assert_eq!(&rest[..name.len()], name.as_slice());
        let rest = &rest[name.len()..];
        assert_eq!(&rest[..spki.len()], spki.as_slice());
        assert_eq!(&rest[spki.len()..], [0xa0, 0x00]);
    }

    #[test]
    fn every_attribute_type_has_its_oid() {
        for (ty, oid) in [
            (AttrType::CommonName, [0x55, 0x04, 0x03]),
            (AttrType::Organization, [0x55, 0x04, 0x0a]),
            (AttrType::OrganizationalUnit, [0x55, 0x04, 0x0b]),
            (AttrType::Country, [0x55, 0x04, 0x06]),
            (AttrType::StateOrProvince, [0x55, 0x04, 0x08]),
            (AttrType::Locality, [0x55, 0x04, 0x07]),
        ] {
            assert_eq!(ty.oid(), der::tlv(der::OID, &oid), "{ty:?}");
        }
    }

    #[test]
    fn name_encoding() {
        let mut s = Subject::default();
        s.push(AttrType::CommonName, "a");
        s.push(AttrType::Country, "DE");
        assert_eq!(
            s.to_der(),
            [
                0x30, 0x19, // Name
                0x31, 0x0a, 0x30, 0x08, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x01, b'a', // CN
                0x31, 0x0b, 0x30, 0x09, 0x06, 0x03, 0x55, 0x04, 0x06, 0x13, 0x02, b'D',
                b'E', // C
            ]
        );
        assert_eq!(Subject::default().to_der(), [0x30, 0x00]);
    }

    #[test]
    fn a_bad_signature_is_refused() {
        let rng = SystemRandom::new();
        let alg = &sig::ECDSA_P256_SHA256_ASN1_SIGNING;
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
        let kp = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap();
        let spki = EcCurve::P256.spki(kp.public_key().as_ref());
        let spki = spki.as_ref();
        let e = build(&subject(), spki, SignatureAlg::EcdsaP256Sha256, |m| {
            let mut s = kp.sign(&rng, m).unwrap().as_ref().to_vec();
            let last = s.len() - 1;
            s[last] ^= 1;
            Ok(s)
        })
        .unwrap_err();
        assert!(matches!(e, KeyError::Sign(_)), "{e}");
        // The wrong algorithm for the key is refused too.
        let e = build(&subject(), spki, SignatureAlg::EcdsaP384Sha384, |m| {
            Ok(kp.sign(&rng, m).unwrap().as_ref().to_vec())
        })
        .unwrap_err();
        assert!(matches!(e, KeyError::Sign(_)), "{e}");
    }

    /// `openssl`, if installed; the tests that need it are skipped without it.
    fn openssl(args: &[&str], stdin: Option<&[u8]>) -> Option<String> {
        use std::io::Write;
        use std::process::{Command, Stdio};
        let mut child = match Command::new("openssl")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(c) => c,
            Err(_) => {
                eprintln!("openssl not found: skipped");
                return None;
            }
        };
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.unwrap_or_default())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(String::from_utf8(out.stdout).unwrap())
    }

    #[test]
    fn openssl_verifies_p256_csr() {
        let (csr, _) = ec_csr(
            &sig::ECDSA_P256_SHA256_ASN1_SIGNING,
            EcCurve::P256,
            SignatureAlg::EcdsaP256Sha256,
        );
        let pem = super::super::pem::encode("CERTIFICATE REQUEST", &csr);
        let Some(text) = openssl(
            &["req", "-verify", "-noout", "-text", "-nameopt", "utf8"],
            Some(pem.as_bytes()),
        ) else {
            return;
        };
        assert!(
            text.contains("Signature Algorithm: ecdsa-with-SHA256"),
            "{text}"
        );
        assert!(text.contains("CN=gateway-0042") || text.contains("CN = gateway-0042"));
        assert!(text.contains("München"), "{text}");
        assert!(text.contains("NIST CURVE: P-256") || text.contains("prime256v1"));
    }

    /// RSA with a key from openssl (ring cannot generate RSA keys), signed by ring with
    /// PKCS#1 v1.5 SHA-256, as a token's `CKM_RSA_PKCS` over the DigestInfo would.
    #[test]
    fn rsa_csr_parses_and_verifies() {
        use rcgen::PublicKeyData;
        use rustls_pki_types::PrivatePkcs8KeyDer;
        use rustls_pki_types::pem::PemObject;

        let Some(key_pem) = openssl(
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
            ],
            None,
        ) else {
            return;
        };
        let pkcs8 = PrivatePkcs8KeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
        let kp = sig::RsaKeyPair::from_pkcs8(pkcs8.secret_pkcs8_der()).unwrap();
        // The SPKI from ring's RSAPublicKey { n, e }.
        let (seq, _) = der::expect(kp.public_key().as_ref(), der::SEQUENCE).unwrap();
        let (n, rest) = der::expect(seq.contents, der::INTEGER).unwrap();
        let (e, _) = der::expect(rest, der::INTEGER).unwrap();
        let spki = der::spki_rsa(n.contents, e.contents).as_ref().to_vec();
        let rng = SystemRandom::new();
        let csr = build(&subject(), &spki, SignatureAlg::RsaPkcs1Sha256, |m| {
            let mut s = vec![0u8; kp.public().modulus_len()];
            kp.sign(&sig::RSA_PKCS1_SHA256, &rng, m, &mut s).unwrap();
            Ok(s)
        })
        .unwrap();
        let parsed = parse(&csr);
        check_subject(&parsed);
        assert_eq!(parsed.public_key.algorithm(), &rcgen::PKCS_RSA_SHA256);
        assert_eq!(parsed.public_key.subject_public_key_info(), spki);

        let pem = super::super::pem::encode("CERTIFICATE REQUEST", &csr);
        let text = openssl(&["req", "-verify", "-noout", "-text"], Some(pem.as_bytes())).unwrap();
        assert!(
            text.contains("Signature Algorithm: sha256WithRSAEncryption"),
            "{text}"
        );
    }
}
