//! `iotcred keygen`: a new device key and a PKCS#10 CSR for it.
//!
//! In a token the key pair is generated inside it (`C_GenerateKeyPair`), the private half
//! `CKA_SENSITIVE`, not `CKA_EXTRACTABLE`, `CKA_PRIVATE`, `CKA_TOKEN`, sign-only; the CSR is
//! signed by the token. To a file, an EC P-256 key is written as PKCS#8 PEM with mode 0600 from
//! the moment the file exists.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use cryptoki::types::Ulong;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};
use rustls::SignatureScheme;

use super::csr::{self, AttrType, SignatureAlg, Subject};
use super::pem;
use super::pkcs11::{self, KeyKind};
use super::{KeyError, KeySource, Pkcs11Uri, SignFailure};
use crate::der::{self, EcCurve};

/// The kind of key `keygen` makes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Algorithm {
    /// ECDSA P-256 (the default).
    #[default]
    EcP256,
    /// RSA 2048 (tokens only: ring cannot generate RSA keys).
    Rsa2048,
}

impl std::str::FromStr for Algorithm {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        match s {
            "ec-p256" => Ok(Algorithm::EcP256),
            "rsa-2048" => Ok(Algorithm::Rsa2048),
            _ => Err(KeyError::Keygen(format!(
                "unknown algorithm \"{s}\": use ec-p256 or rsa-2048"
            ))),
        }
    }
}

/// Generates a key at `src` and returns a PEM CSR for `subject` (e.g. `CN=gateway-0042,O=Example`)
/// signed by it. An existing key (same label or id in the token, or an existing file) is refused
/// unless `overwrite`, which destroys it first.
pub fn keygen(
    src: &KeySource,
    subject: &str,
    algorithm: Algorithm,
    overwrite: bool,
) -> Result<String, KeyError> {
    let mode = if overwrite {
        Existing::Overwrite
    } else {
        Existing::RefuseAny
    };
    keygen_with(src, subject, algorithm, mode)
}

/// Generates a key at `src` like [`keygen`] without overwrite, for rotation: in a token it is
/// refused only when a key object carries **all** of the URI's label and id, so a new key with
/// the current key's label and a new id (see [`Pkcs11Uri::with_new_id`]) can be made next to
/// it. A file is refused when it exists.
pub fn keygen_exact(
    src: &KeySource,
    subject: &str,
    algorithm: Algorithm,
) -> Result<String, KeyError> {
    keygen_with(src, subject, algorithm, Existing::RefuseExact)
}

/// What keygen does with a key already at the place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Existing {
    /// Refuse when a key object has the URI's label or its id (or the file exists).
    RefuseAny,
    /// Refuse when a key object has the URI's label and its id (or the file exists).
    RefuseExact,
    /// Destroy key objects with the URI's label or id (replace the file).
    Overwrite,
}

fn keygen_with(
    src: &KeySource,
    subject: &str,
    algorithm: Algorithm,
    mode: Existing,
) -> Result<String, KeyError> {
    let dn = parse_dn(subject)?;
    match src {
        KeySource::Pem(path) => keygen_pem(path, &dn, algorithm, mode == Existing::Overwrite),
        KeySource::Pkcs11(uri) => keygen_token(uri, &dn, algorithm, mode),
    }
}

/// A PEM CSR for `subject` signed by the key that already exists at `src` (a key kept from an
/// interrupted provisioning or rotation). The signature algorithm follows the key: ECDSA with
/// SHA-256 (P-256) or SHA-384 (P-384), or RSA PKCS#1 v1.5 with SHA-256.
pub fn csr_for_existing(src: &KeySource, subject: &str) -> Result<String, KeyError> {
    let dn = parse_dn(subject)?;
    let key = super::load_signing_key(src)?;
    let spki = super::spki_of(key.as_ref())?;
    let (alg, scheme, kind) = match der::parse_spki(&spki) {
        Ok(der::SpkiKey::Ec {
            curve: EcCurve::P256,
            ..
        }) => (
            SignatureAlg::EcdsaP256Sha256,
            SignatureScheme::ECDSA_NISTP256_SHA256,
            "EC P-256",
        ),
        Ok(der::SpkiKey::Ec {
            curve: EcCurve::P384,
            ..
        }) => (
            SignatureAlg::EcdsaP384Sha384,
            SignatureScheme::ECDSA_NISTP384_SHA384,
            "EC P-384",
        ),
        Ok(der::SpkiKey::Rsa { .. }) => (
            SignatureAlg::RsaPkcs1Sha256,
            SignatureScheme::RSA_PKCS1_SHA256,
            "RSA",
        ),
        _ => {
            return Err(KeyError::UnsupportedKeyType(
                "not an EC P-256/P-384 or RSA public key".into(),
            ));
        }
    };
    let signer = key
        .choose_scheme(&[scheme])
        .ok_or(KeyError::Sign(SignFailure::Scheme { scheme, kind }))?;
    let csr = csr::build(&dn, &spki, alg, |info| {
        signer.sign(info).map_err(|e| match src {
            // The token's own error is inside (see the PKCS#11 signer).
            KeySource::Pkcs11(_) => KeyError::Pkcs11 {
                op: "C_Sign",
                detail: match &e {
                    rustls::Error::Other(o) => o.0.to_string(),
                    other => other.to_string(),
                },
            },
            KeySource::Pem(_) => KeyError::Sign(SignFailure::Software),
        })
    })?;
    Ok(pem::encode(CSR_LABEL, &csr))
}

/// Whether the key at `src` exists: the file (a dangling symlink counts), or in the token a
/// private key object carrying all of the URI's label and id.
pub fn key_exists(src: &KeySource) -> Result<bool, KeyError> {
    match src {
        KeySource::Pem(path) => match path.symlink_metadata() {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(KeyError::KeyFileUnreadable {
                path: path.clone(),
                source,
            }),
        },
        KeySource::Pkcs11(uri) => {
            let (session, _label) = token_session(uri, false)?;
            let found = exact_objects(&session, uri, ObjectClass::PRIVATE_KEY)
                .map_err(ck("C_FindObjects"))?;
            Ok(!found.is_empty())
        }
    }
}

/// Destroys the key at `src`; a missing key is not an error.
///
/// A file is removed and its directory synced. In a token, the one private key object carrying
/// all of the URI's label and id is destroyed with its public key object (same id); another
/// key that only shares the label is never touched, and a URI that matches several private keys
/// is refused ([`KeyError::AmbiguousKey`]).
pub fn destroy_key(src: &KeySource) -> Result<(), KeyError> {
    match src {
        KeySource::Pem(path) => destroy_file(path),
        KeySource::Pkcs11(uri) => destroy_token_key(uri),
    }
}

fn destroy_file(path: &Path) -> Result<(), KeyError> {
    let werr = |source| KeyError::WriteKey {
        path: path.to_owned(),
        source,
    };
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(werr(e)),
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(werr)
}

fn destroy_token_key(uri: &Pkcs11Uri) -> Result<(), KeyError> {
    let (session, token) = token_session(uri, true)?;
    let privates =
        exact_objects(&session, uri, ObjectClass::PRIVATE_KEY).map_err(ck("C_FindObjects"))?;
    let private = match privates.as_slice() {
        [] => None,
        [h] => Some(*h),
        _ => {
            return Err(KeyError::AmbiguousKey {
                selector: uri.object_selector(),
                token,
                count: privates.len(),
            });
        }
    };
    // The public key: the one with the private key's id (and the URI's label, if any); without
    // a private key, public keys matching the whole URI (left by an interrupted generation).
    let id = match private {
        Some(h) => session
            .get_attributes(h, &[AttributeType::Id])
            .map_err(ck("C_GetAttributeValue"))?
            .into_iter()
            .find_map(|a| match a {
                Attribute::Id(v) if !v.is_empty() => Some(v),
                _ => None,
            }),
        None => uri.id.clone(),
    };
    let publics = match id {
        Some(id) => {
            let mut t = vec![Attribute::Class(ObjectClass::PUBLIC_KEY), Attribute::Id(id)];
            if let Some(l) = &uri.object {
                t.push(Attribute::Label(l.as_bytes().to_vec()));
            }
            session.find_objects(&t).map_err(ck("C_FindObjects"))?
        }
        // No id anywhere: the label alone would reach other keys' public halves.
        None if private.is_none() => Vec::new(),
        // A private key without CKA_ID: its public key only when the URI names exactly one.
        None => {
            let found = exact_objects(&session, uri, ObjectClass::PUBLIC_KEY)
                .map_err(ck("C_FindObjects"))?;
            if found.len() == 1 { found } else { Vec::new() }
        }
    };
    for h in publics.into_iter().chain(private) {
        session.destroy_object(h).map_err(ck("C_DestroyObject"))?;
    }
    tracing::debug!(token = %token, object = %uri.object_selector(), "destroyed the key objects");
    Ok(())
}

/// A logged-in session on the URI's token (which must name the key by object= or id=), and
/// the token's label.
fn token_session(uri: &Pkcs11Uri, read_write: bool) -> Result<(Session, String), KeyError> {
    if uri.object.is_none() && uri.id.is_none() {
        return Err(KeyError::Keygen(
            "the pkcs11: URI needs object= (a label) or id= to name one key".into(),
        ));
    }
    let module = uri.module_path.clone().ok_or(KeyError::MissingModulePath)?;
    let ctx = pkcs11::load_module(&module)?;
    let (label, slot) = pkcs11::find_token(&ctx, uri, &module)?;
    let pin = pkcs11::read_pin(uri)?;
    let session = pkcs11::open_logged_in(&ctx, slot, &label, pin.as_ref(), read_write)?;
    Ok((session, label))
}

/// Objects of `class` carrying all of the URI's label and id.
fn exact_objects(
    session: &Session,
    uri: &Pkcs11Uri,
    class: ObjectClass,
) -> Result<Vec<ObjectHandle>, cryptoki::error::Error> {
    let mut t = vec![Attribute::Class(class)];
    if let Some(l) = &uri.object {
        t.push(Attribute::Label(l.as_bytes().to_vec()));
    }
    if let Some(id) = &uri.id {
        t.push(Attribute::Id(id.clone()));
    }
    session.find_objects(&t)
}

fn ck(op: &'static str) -> impl Fn(cryptoki::error::Error) -> KeyError {
    move |e| KeyError::Pkcs11 {
        op,
        detail: e.to_string(),
    }
}

/// PEM label of a PKCS#10 request.
const CSR_LABEL: &str = "CERTIFICATE REQUEST";

/// Parses `CN=a,O=b` (RFC 4514 order and `\,` escapes; types CN, O, OU, C, ST, L). The
/// attributes stay in the order given, one RDN each.
fn parse_dn(subject: &str) -> Result<Subject, KeyError> {
    let bad = |detail: String| KeyError::InvalidSubject {
        subject: subject.to_owned(),
        detail,
    };
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = subject.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(n) => cur.push(n),
                None => return Err(bad("ends with a lone backslash".into())),
            },
            ',' => parts.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    parts.push(cur);
    let mut dn = Subject::default();
    for part in parts {
        let Some((ty, value)) = part.split_once('=') else {
            return Err(bad(format!("\"{}\" is not TYPE=value", part.trim())));
        };
        let ty = ty.trim();
        let value = value.trim();
        if value.is_empty() {
            return Err(bad(format!("{ty} has an empty value")));
        }
        let Some(attr) = AttrType::from_short_name(ty) else {
            return Err(bad(format!(
                "unsupported attribute type \"{ty}\" (use CN, O, OU, C, ST, L)"
            )));
        };
        if dn.get(attr).is_some() {
            return Err(bad(format!("{ty} is given twice")));
        }
        attr.check_value(value)
            .map_err(|detail| bad(format!("{ty} {detail}")))?;
        dn.push(attr, value);
    }
    Ok(dn)
}

// ---- PEM file ----

fn keygen_pem(
    path: &Path,
    subject: &Subject,
    algorithm: Algorithm,
    overwrite: bool,
) -> Result<String, KeyError> {
    if algorithm == Algorithm::Rsa2048 {
        return Err(KeyError::Keygen(
            "RSA keys can only be generated inside a PKCS#11 token; for a file use ec-p256 \
             (or make one with `openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048`)"
                .into(),
        ));
    }
    if !overwrite && path.symlink_metadata().is_ok() {
        return Err(KeyError::KeyExists(format!("key file {}", path.display())));
    }
    let rng = ring::rand::SystemRandom::new();
    let alg = &ECDSA_P256_SHA256_ASN1_SIGNING;
    let ring_err = |what: &str| KeyError::Keygen(format!("cannot {what} an EC P-256 key"));
    // PKCS#8 v1 with the public key, as `openssl pkey` and rustls read it.
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).map_err(|_| ring_err("generate"))?;
    let kp = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).map_err(|_| ring_err("load"))?;
    let spki = EcCurve::P256.spki(kp.public_key().as_ref());
    let csr = csr::build(
        subject,
        spki.as_ref(),
        SignatureAlg::EcdsaP256Sha256,
        |info| {
            kp.sign(&rng, info)
                .map(|sig| sig.as_ref().to_vec())
                .map_err(|_| KeyError::Sign(SignFailure::Software))
        },
    )?;
    let key_pem = zeroize::Zeroizing::new(pem::encode("PRIVATE KEY", pkcs8.as_ref()));
    write_private(path, key_pem.as_bytes(), overwrite)?;
    Ok(pem::encode(CSR_LABEL, &csr))
}

/// Writes `data` to `path` with mode 0600, never visible with a wider mode: created with
/// `O_EXCL`; with `overwrite`, a fresh temporary file in the same directory renamed over it.
fn write_private(path: &Path, data: &[u8], overwrite: bool) -> Result<(), KeyError> {
    let werr = |source| KeyError::WriteKey {
        path: path.to_owned(),
        source,
    };
    let create = |p: &Path| {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(p)
    };
    if !overwrite {
        let mut f = create(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                KeyError::KeyExists(format!("key file {}", path.display()))
            } else {
                werr(e)
            }
        })?;
        f.write_all(data)
            .and_then(|()| f.sync_all())
            .map_err(werr)?;
        return Ok(());
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => std::path::PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| werr(std::io::Error::other("not a file name")))?
        .to_string_lossy()
        .into_owned();
    let mut rnd = [0u8; 8];
    getrandom::fill(&mut rnd).map_err(|e| werr(std::io::Error::other(e.to_string())))?;
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{:016x}",
        std::process::id(),
        u64::from_le_bytes(rnd)
    ));
    let result = (|| {
        let mut f = create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(werr)
}

// ---- PKCS#11 token ----

fn keygen_token(
    uri: &Pkcs11Uri,
    subject: &Subject,
    algorithm: Algorithm,
    mode: Existing,
) -> Result<String, KeyError> {
    if uri.object.is_none() && uri.id.is_none() {
        return Err(KeyError::Keygen(
            "the pkcs11: URI needs object= (a label) or id= so the agent can find the key again"
                .into(),
        ));
    }
    let module = uri.module_path.clone().ok_or(KeyError::MissingModulePath)?;
    let ctx = pkcs11::load_module(&module)?;
    let (label, slot) = pkcs11::find_token(&ctx, uri, &module)?;
    let pin = pkcs11::read_pin(uri)?;
    let session = pkcs11::open_logged_in(&ctx, slot, &label, pin.as_ref(), true)?;

    let existing = if mode == Existing::RefuseExact {
        let mut found =
            exact_objects(&session, uri, ObjectClass::PRIVATE_KEY).map_err(ck("C_FindObjects"))?;
        found.extend(
            exact_objects(&session, uri, ObjectClass::PUBLIC_KEY).map_err(ck("C_FindObjects"))?,
        );
        found
    } else {
        existing_objects(&session, uri).map_err(ck("C_FindObjects"))?
    };
    if !existing.is_empty() {
        if mode != Existing::Overwrite {
            return Err(KeyError::KeyExists(format!(
                "a key with {} in token \"{label}\"",
                uri.object_selector()
            )));
        }
        for h in existing {
            session.destroy_object(h).map_err(ck("C_DestroyObject"))?;
        }
        tracing::debug!(token = %label, "destroyed the old key objects");
    }

    let mut common = vec![Attribute::Token(true)];
    if let Some(l) = &uri.object {
        common.push(Attribute::Label(l.as_bytes().to_vec()));
    }
    if let Some(id) = &uri.id {
        common.push(Attribute::Id(id.clone()));
    }
    let mut public = common.clone();
    public.extend([Attribute::Private(false), Attribute::Verify(true)]);
    let mut private = common;
    private.extend([
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        Attribute::Decrypt(false),
        Attribute::Derive(false),
    ]);
    let mechanism = match algorithm {
        Algorithm::EcP256 => {
            public.push(Attribute::EcParams(EcCurve::P256.params().to_vec()));
            Mechanism::EccKeyPairGen
        }
        Algorithm::Rsa2048 => {
            public.extend([
                Attribute::ModulusBits(Ulong::from(2048 as std::os::raw::c_ulong)),
                Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
            ]);
            Mechanism::RsaPkcsKeyPairGen
        }
    };
    let (pub_h, priv_h) = session
        .generate_key_pair(&mechanism, &public, &private)
        .map_err(ck("C_GenerateKeyPair"))?;

    let (kind, spki) = pkcs11::describe_key(&session, priv_h, &uri.object_selector(), &label)?;
    if uri.id.is_none() {
        // Like pkcs11-tool and OpenSSH: an id derived from the public key.
        let id = ring::digest::digest(&ring::digest::SHA256, &spki).as_ref()[..20].to_vec();
        for h in [pub_h, priv_h] {
            session
                .update_attributes(h, &[Attribute::Id(id.clone())])
                .map_err(ck("C_SetAttributeValue"))?;
        }
    }
    tracing::debug!(token = %label, ?kind, "generated a key pair in the token");

    let (alg, scheme) = token_csr_algorithm(kind, &spki)?;
    let csr = csr::build(subject, &spki, alg, |info| {
        // ECDSA comes back DER-encoded; RSA is CKM_RSA_PKCS over the SHA-256 DigestInfo.
        pkcs11::sign_once(&session, priv_h, kind, scheme, info).inspect_err(|e| {
            tracing::warn!(error = %e, "signing the CSR in the token failed");
        })
    })?;
    Ok(pem::encode(CSR_LABEL, &csr))
}

/// The CSR signature algorithm for the generated key, and the scheme the token signs with.
fn token_csr_algorithm(
    kind: KeyKind,
    spki: &[u8],
) -> Result<(SignatureAlg, SignatureScheme), KeyError> {
    match (kind, der::parse_spki(spki)) {
        (KeyKind::EcP256, Ok(der::SpkiKey::Ec { .. })) => Ok((
            SignatureAlg::EcdsaP256Sha256,
            SignatureScheme::ECDSA_NISTP256_SHA256,
        )),
        (KeyKind::EcP384, Ok(der::SpkiKey::Ec { .. })) => Ok((
            SignatureAlg::EcdsaP384Sha384,
            SignatureScheme::ECDSA_NISTP384_SHA384,
        )),
        (KeyKind::Rsa(_), Ok(der::SpkiKey::Rsa { .. })) => Ok((
            SignatureAlg::RsaPkcs1Sha256,
            SignatureScheme::RSA_PKCS1_SHA256,
        )),
        _ => Err(KeyError::Keygen(
            "cannot read the generated public key".into(),
        )),
    }
}

/// Key objects (private or public) that carry the URI's label or id.
fn existing_objects(
    session: &Session,
    uri: &Pkcs11Uri,
) -> Result<Vec<ObjectHandle>, cryptoki::error::Error> {
    let mut found = Vec::new();
    for class in [ObjectClass::PRIVATE_KEY, ObjectClass::PUBLIC_KEY] {
        let mut templates = Vec::new();
        if let Some(l) = &uri.object {
            templates.push(vec![
                Attribute::Class(class),
                Attribute::Label(l.as_bytes().to_vec()),
            ]);
        }
        if let Some(id) = &uri.id {
            templates.push(vec![Attribute::Class(class), Attribute::Id(id.clone())]);
        }
        for t in templates {
            for h in session.find_objects(&t)? {
                if !found.contains(&h) {
                    found.push(h);
                }
            }
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn dn_parsing() {
        let dn = parse_dn("CN=gateway-0042, O=Example\\, Inc.,C=DE").unwrap();
        assert_eq!(dn.get(AttrType::Organization), Some("Example, Inc."));
        assert_eq!(
            dn.attrs().collect::<Vec<_>>(),
            [
                (AttrType::CommonName, "gateway-0042"),
                (AttrType::Organization, "Example, Inc."),
                (AttrType::Country, "DE"),
            ]
        );
        let dn = parse_dn("l=Berlin,st=Berlin,ou=Ops,cn=x").unwrap();
        assert_eq!(
            dn.attrs().map(|(t, _)| t).collect::<Vec<_>>(),
            [
                AttrType::Locality,
                AttrType::StateOrProvince,
                AttrType::OrganizationalUnit,
                AttrType::CommonName,
            ]
        );
        for bad in [
            "",
            "CN",
            "CN=",
            "XX=1",
            "CN=a,CN=b",
            "CN=a\\",
            "CN=a,C=Germany",
            "CN=a,C=D1",
        ] {
            let e = parse_dn(bad).unwrap_err();
            assert!(matches!(e, KeyError::InvalidSubject { .. }), "{bad}: {e}");
        }
    }

    #[test]
    fn pem_keygen_writes_0600_and_refuses_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device.key");
        let src = KeySource::Pem(path.clone());
        let csr = keygen(&src, "CN=gw", Algorithm::EcP256, false).unwrap();
        assert!(csr.starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let first = std::fs::read(&path).unwrap();
        let e = keygen(&src, "CN=gw", Algorithm::EcP256, false).unwrap_err();
        assert!(matches!(e, KeyError::KeyExists(_)), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), first);
        keygen(&src, "CN=gw", Algorithm::EcP256, true).unwrap();
        assert_ne!(std::fs::read(&path).unwrap(), first);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Only the key is left in the directory (no temporary files).
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // And it loads.
        let key = super::super::load_signing_key(&src).unwrap();
        let spki = super::super::spki_of(key.as_ref()).unwrap();
        // The CSR verifies, carries the key and the subject, and is signed with ECDSA SHA-256.
        let csr = keygen(
            &src,
            "CN=gw,O=Example\\, Inc.,C=DE",
            Algorithm::EcP256,
            true,
        )
        .unwrap();
        let parsed = rcgen::CertificateSigningRequestParams::from_pem(&csr).unwrap();
        {
            use rcgen::PublicKeyData;
            assert_eq!(
                parsed.public_key.algorithm(),
                &rcgen::PKCS_ECDSA_P256_SHA256
            );
            let key = super::super::load_signing_key(&src).unwrap();
            let new_spki = super::super::spki_of(key.as_ref()).unwrap();
            assert_ne!(new_spki, spki);
            assert_eq!(parsed.public_key.subject_public_key_info(), new_spki);
        }
        let dn = &parsed.params.distinguished_name;
        assert_eq!(
            dn.get(&rcgen::DnType::OrganizationName),
            Some(&rcgen::DnValue::Utf8String("Example, Inc.".into()))
        );
        assert_eq!(
            dn.get(&rcgen::DnType::CountryName),
            Some(&rcgen::DnValue::PrintableString("DE".try_into().unwrap()))
        );
        // The key file is a PKCS#8 PEM block.
        let key_pem = std::fs::read_to_string(&path).unwrap();
        assert!(key_pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        assert!(key_pem.ends_with("-----END PRIVATE KEY-----\n"));
        let e = keygen(&src, "CN=gw", Algorithm::Rsa2048, true).unwrap_err();
        assert!(e.to_string().contains("RSA"), "{e}");
    }

    #[test]
    fn pem_csr_for_existing_exists_and_destroy() {
        use rcgen::PublicKeyData;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device.key");
        let src = KeySource::Pem(path.clone());
        assert!(!key_exists(&src).unwrap());
        // A missing key is destroyed without complaint.
        destroy_key(&src).unwrap();
        for alg in [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
        ] {
            let kp = rcgen::KeyPair::generate_for(alg).unwrap();
            std::fs::write(&path, kp.serialize_pem()).unwrap();
            assert!(key_exists(&src).unwrap());
            let csr = csr_for_existing(&src, "CN=gw,O=Example").unwrap();
            assert!(csr.starts_with("-----BEGIN CERTIFICATE REQUEST-----\n"));
            // rcgen verifies the signature while parsing.
            let parsed = rcgen::CertificateSigningRequestParams::from_pem(&csr).unwrap();
            assert_eq!(parsed.public_key.algorithm(), alg);
            assert_eq!(
                parsed.public_key.subject_public_key_info(),
                kp.subject_public_key_info()
            );
            assert_eq!(
                parsed
                    .params
                    .distinguished_name
                    .get(&rcgen::DnType::CommonName),
                Some(&rcgen::DnValue::Utf8String("gw".into()))
            );
        }
        // keygen_exact refuses an existing file and leaves it alone.
        let before = std::fs::read(&path).unwrap();
        let e = keygen_exact(&src, "CN=gw", Algorithm::EcP256).unwrap_err();
        assert!(matches!(e, KeyError::KeyExists(_)), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), before);
        destroy_key(&src).unwrap();
        assert!(!key_exists(&src).unwrap());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        // And makes a new one where there is none.
        keygen_exact(&src, "CN=gw", Algorithm::EcP256).unwrap();
        assert!(key_exists(&src).unwrap());
        let e = csr_for_existing(&KeySource::Pem(dir.path().join("nope")), "CN=gw").unwrap_err();
        assert!(matches!(e, KeyError::KeyFileMissing(_)), "{e}");
        let e = csr_for_existing(&src, "XX=1").unwrap_err();
        assert!(matches!(e, KeyError::InvalidSubject { .. }), "{e}");
    }
}
