//! The device key: a PEM file or a PKCS#11 object, as a rustls [`SigningKey`], and key
//! generation with a PKCS#10 CSR.
//!
//! - [`KeySource::parse`] turns the configuration's `key` string into a source: `pkcs11:…`
//!   is an RFC 7512 URI ([`Pkcs11Uri`]), anything else a path to a PEM file.
//! - [`load_signing_key`] gives the key to rustls; [`public_key_spki`] gives its public key so
//!   the caller can check that the certificate belongs to the key.
//! - [`keygen`] creates a key (inside the token: sensitive and never extractable) and a CSR.
//!
//! PINs never appear in errors or logs.

mod csr;
mod keygen;
mod pem;
pub mod pkcs11;
mod uri;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::SignatureAlgorithm;
use rustls::sign::SigningKey;
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;

pub use keygen::{Algorithm, csr_for_existing, destroy_key, key_exists, keygen, keygen_exact};
pub use uri::{ObjectType, PinSource, Pkcs11Uri, UriError};

/// Where the device key lives.
#[derive(Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A PEM file: PKCS#8, SEC1 (`EC PRIVATE KEY`) or PKCS#1 (`RSA PRIVATE KEY`).
    Pem(PathBuf),
    /// An object in a PKCS#11 token.
    Pkcs11(Pkcs11Uri),
}

impl KeySource {
    /// Parses the configuration's `key` value: a `pkcs11:` URI or a file path.
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        let t = s.trim();
        if uri::strip_prefix_ci(t, "pkcs11:").is_some() {
            return Pkcs11Uri::parse(t)
                .map(KeySource::Pkcs11)
                .map_err(KeyError::InvalidUri);
        }
        if t.is_empty() {
            return Err(KeyError::EmptySource);
        }
        Ok(KeySource::Pem(PathBuf::from(s)))
    }
}

impl std::str::FromStr for KeySource {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        KeySource::parse(s)
    }
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::Pem(p) => write!(f, "{}", p.display()),
            KeySource::Pkcs11(u) => write!(f, "{u}"),
        }
    }
}

impl fmt::Debug for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::Pem(p) => f.debug_tuple("Pem").field(p).finish(),
            KeySource::Pkcs11(u) => f.debug_tuple("Pkcs11").field(u).finish(),
        }
    }
}

/// Everything that can go wrong with the device key. Each message says what to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The `key` setting is empty.
    #[error("the key setting is empty: give a PEM file path or a pkcs11: URI")]
    EmptySource,
    /// The `pkcs11:` URI is malformed.
    #[error("invalid pkcs11: URI: {0}")]
    InvalidUri(#[source] UriError),
    /// The PEM key file does not exist.
    #[error(
        "key file {} does not exist: check `key` in the configuration, or create one with `iotcred keygen`",
        .0.display()
    )]
    KeyFileMissing(PathBuf),
    /// The PEM key file cannot be read.
    #[error("cannot read key file {}: {source} (check its permissions and owner)", path.display())]
    KeyFileUnreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No private key in the PEM file.
    #[error(
        "no private key in {}: expected a PEM block `PRIVATE KEY`, `EC PRIVATE KEY` or `RSA PRIVATE KEY`",
        .0.display()
    )]
    NoPrivateKeyInFile(PathBuf),
    /// A key of a type iotcred cannot use.
    #[error(
        "unsupported key type: {0}; use an EC P-256 or P-384 key, or RSA with at least 2048 bits"
    )]
    UnsupportedKeyType(String),
    /// An RSA key below 2048 bits.
    #[error(
        "the RSA key has {0} bits; at least 2048 are required: generate a new key (`iotcred keygen`)"
    )]
    RsaTooSmall(usize),
    /// The URI has no `module-path`.
    #[error(
        "the pkcs11: URI has no module-path: add ?module-path=/path/to/module.so (e.g. /usr/lib/softhsm/libsofthsm2.so)"
    )]
    MissingModulePath,
    /// The PKCS#11 module cannot be loaded or initialised.
    #[error("cannot load the PKCS#11 module {}: {detail}; check module-path and that the library is installed", path.display())]
    ModuleLoad {
        /// The module.
        path: PathBuf,
        /// Why.
        detail: String,
    },
    /// No token matches the URI.
    #[error(
        "no PKCS#11 token matches {selector}; list the tokens with `pkcs11-tool --module {} --list-token-slots`",
        module.display()
    )]
    NoToken {
        /// The token part of the URI.
        selector: String,
        /// The module.
        module: PathBuf,
    },
    /// The token was found before and is gone now: removed, disconnected, its reader
    /// unplugged. Transient: the key is found again once the token is back.
    #[error(
        "PKCS#11 token \"{token}\" is not present (removed or disconnected?): reconnect it; the key is used again as soon as the token is back (module {})",
        module.display()
    )]
    TokenNotPresent {
        /// The token label, as last found.
        token: String,
        /// The module.
        module: PathBuf,
    },
    /// Several tokens match the URI.
    #[error("{count} PKCS#11 tokens match {selector}: add token=, serial= or slot-id= to the URI")]
    AmbiguousToken {
        /// The token part of the URI.
        selector: String,
        /// How many matched.
        count: usize,
    },
    /// No private key object matches the URI.
    #[error(
        "no private key matches {selector} in token \"{token}\"; list the objects with `pkcs11-tool --module {} --token-label '{token}' --login --list-objects`",
        module.display()
    )]
    NoKey {
        /// The object part of the URI.
        selector: String,
        /// The token label.
        token: String,
        /// The module.
        module: PathBuf,
    },
    /// Several private keys match the URI.
    #[error(
        "{count} private keys match {selector} in token \"{token}\": add object= or id= to the URI"
    )]
    AmbiguousKey {
        /// The object part of the URI.
        selector: String,
        /// The token label.
        token: String,
        /// How many matched.
        count: usize,
    },
    /// The public half of the key cannot be found.
    #[error("cannot find the public key for {selector} in token \"{token}\": {detail}")]
    NoPublicKey {
        /// The object part of the URI.
        selector: String,
        /// The token label.
        token: String,
        /// Why.
        detail: String,
    },
    /// The URI's `type` is not `private`.
    #[error(
        "the pkcs11: URI names type={0}, but the device key must be a private key: use type=private or leave type out"
    )]
    WrongObjectType(&'static str),
    /// The token needs a PIN and none was given.
    #[error("token \"{0}\" needs a user PIN: add ?pin-source=file:/path/to/pin to the key URI")]
    MissingPin(String),
    /// The PIN file cannot be read.
    #[error("cannot read the PIN file {}: {source} (check its permissions and owner)", path.display())]
    PinFileUnreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// CKR_PIN_INCORRECT. Never retried: repeated wrong PINs lock tokens.
    #[error(
        "wrong PIN for token \"{0}\": fix the PIN (it was tried once and is not retried, since repeated failures lock the token)"
    )]
    WrongPin(String),
    /// CKR_PIN_LOCKED / CKR_PIN_EXPIRED.
    #[error(
        "the user PIN of token \"{0}\" is locked or expired: reset it with the SO PIN (e.g. `pkcs11-tool --init-pin --login --login-type so`)"
    )]
    PinLocked(String),
    /// Any other PKCS#11 failure.
    #[error("PKCS#11 {op} failed: {detail}")]
    Pkcs11 {
        /// The operation.
        op: &'static str,
        /// The module's error.
        detail: String,
    },
    /// `keygen` found an existing key and `--overwrite` was not given.
    #[error("{0} already exists; pass --overwrite to replace it (the old key is destroyed)")]
    KeyExists(String),
    /// `keygen` needs something the URI or arguments lack.
    #[error("keygen: {0}")]
    Keygen(String),
    /// The subject DN cannot be parsed.
    #[error(
        "invalid subject \"{subject}\": {detail} (expected e.g. \"CN=gateway-0042,O=Example\")"
    )]
    InvalidSubject {
        /// The subject given.
        subject: String,
        /// Why.
        detail: String,
    },
    /// The PEM key file cannot be written.
    #[error("cannot write key file {}: {source}", path.display())]
    WriteKey {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Signing failed.
    #[error("signing with the device key failed: {0}")]
    Sign(#[from] SignFailure),
}

/// Why the device key did not sign.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SignFailure {
    /// The PKCS#11 module refused or failed the operation.
    #[error("the token answered {0}")]
    Token(#[from] cryptoki::error::Error),
    /// The session to the token was lost and could not be opened again.
    #[error("no session with the token (it was lost and could not be reopened)")]
    NoSession,
    /// The signature scheme asked for does not fit the key.
    #[error("scheme {scheme:?} does not fit a {kind} key")]
    Scheme {
        /// The scheme the peer asked for.
        scheme: rustls::SignatureScheme,
        /// The key's kind.
        kind: &'static str,
    },
    /// The software (PEM) signer failed.
    #[error("the software signer failed")]
    Software,
    /// A CSR signature did not verify with the key's own public key (a token that signs with
    /// another key than the one it reports).
    #[error("the CSR signature does not verify with the key's own public key")]
    SelfCheck,
}

/// Loads the device key for rustls.
///
/// A PKCS#11 key keeps one session open (logged in once) for the life of the returned key.
pub fn load_signing_key(src: &KeySource) -> Result<Arc<dyn SigningKey>, KeyError> {
    match src {
        KeySource::Pem(path) => load_pem(path),
        KeySource::Pkcs11(uri) => Ok(Arc::new(pkcs11::Pkcs11Key::open(uri)?)),
    }
}

/// The SubjectPublicKeyInfo (DER) of the key at `src`, for comparing with the certificate's.
///
/// This opens the key (and, for PKCS#11, logs in); a caller that already holds the key uses
/// [`spki_of`] instead.
pub fn public_key_spki(src: &KeySource) -> Result<Vec<u8>, KeyError> {
    spki_of(load_signing_key(src)?.as_ref())
}

/// The SubjectPublicKeyInfo (DER) of a loaded key.
pub fn spki_of(key: &dyn SigningKey) -> Result<Vec<u8>, KeyError> {
    key.public_key()
        .map(|spki| spki.as_ref().to_vec())
        .ok_or_else(|| KeyError::UnsupportedKeyType("key without a public key".into()))
}

fn read_file(path: &Path) -> Result<Vec<u8>, KeyError> {
    std::fs::read(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            KeyError::KeyFileMissing(path.to_owned())
        } else {
            KeyError::KeyFileUnreadable {
                path: path.to_owned(),
                source,
            }
        }
    })
}

fn load_pem(path: &Path) -> Result<Arc<dyn SigningKey>, KeyError> {
    let bytes = zeroize::Zeroizing::new(read_file(path)?);
    let der = PrivateKeyDer::from_pem_slice(&bytes)
        .map_err(|_| KeyError::NoPrivateKeyInFile(path.to_owned()))?;
    key_from_der(&der)
}

/// A rustls signing key from a private key in DER, with the checks iotcred wants.
pub(crate) fn key_from_der(der: &PrivateKeyDer<'_>) -> Result<Arc<dyn SigningKey>, KeyError> {
    // Size check before ring sees the key: ring rejects small RSA keys with a vague error.
    let rsa_bits = match der {
        PrivateKeyDer::Pkcs1(k) => crate::der::rsa_private_key_bits(k.secret_pkcs1_der()).ok(),
        PrivateKeyDer::Pkcs8(k) => crate::der::pkcs8_rsa_bits(k.secret_pkcs8_der())
            .ok()
            .flatten(),
        _ => None,
    };
    if let Some(bits) = rsa_bits {
        if bits < 2048 {
            return Err(KeyError::RsaTooSmall(bits));
        }
    }
    let key = rustls::crypto::ring::sign::any_supported_type(der).map_err(|_| {
        KeyError::UnsupportedKeyType(
            "the key is not an EC P-256/P-384 or RSA key ring can use".into(),
        )
    })?;
    match key.algorithm() {
        SignatureAlgorithm::ECDSA | SignatureAlgorithm::RSA => Ok(key),
        other => Err(KeyError::UnsupportedKeyType(format!("{other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_parse() {
        assert!(matches!(
            KeySource::parse("/etc/iotcred/device.key").unwrap(),
            KeySource::Pem(p) if p == Path::new("/etc/iotcred/device.key")
        ));
        assert!(matches!(
            KeySource::parse("PKCS11:token=a;object=b").unwrap(),
            KeySource::Pkcs11(u) if u.object.as_deref() == Some("b")
        ));
        assert!(matches!(
            KeySource::parse("pkcs11:bogus=1"),
            Err(KeyError::InvalidUri(_))
        ));
        assert!(matches!(KeySource::parse(" "), Err(KeyError::EmptySource)));
        // A multi-byte character where `pkcs11:` would end is a file name, not a panic.
        assert!(matches!(
            KeySource::parse("pkcs11é.pem").unwrap(),
            KeySource::Pem(p) if p == Path::new("pkcs11é.pem")
        ));
    }

    #[test]
    fn pem_missing_and_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let e = load_signing_key(&KeySource::Pem(missing)).unwrap_err();
        assert!(matches!(e, KeyError::KeyFileMissing(_)), "{e}");
        assert!(e.to_string().contains("does not exist"));
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "hello").unwrap();
        let e = load_signing_key(&KeySource::Pem(garbage)).unwrap_err();
        assert!(matches!(e, KeyError::NoPrivateKeyInFile(_)), "{e}");
    }

    #[test]
    fn pem_ec_formats_load() {
        let dir = tempfile::tempdir().unwrap();
        for alg in [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
        ] {
            let kp = rcgen::KeyPair::generate_for(alg).unwrap();
            let path = dir.path().join("k.pem");
            std::fs::write(&path, kp.serialize_pem()).unwrap();
            let key = load_signing_key(&KeySource::Pem(path)).unwrap();
            assert_eq!(key.algorithm(), SignatureAlgorithm::ECDSA);
            let spki = spki_of(key.as_ref()).unwrap();
            assert_eq!(spki, rcgen::PublicKeyData::subject_public_key_info(&kp));
        }
    }
}
