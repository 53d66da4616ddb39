//! A private key object in a PKCS#11 token, as a rustls [`SigningKey`](rustls::sign::SigningKey).
//!
//! - `lookup`: the token and the key object a `pkcs11:` URI names, and what the key is
//!   (shared with `keygen`);
//! - `session`: the module, the login and the key's long-lived session, reopened after the
//!   token went away; every token call runs off the async workers (see there why and how);
//! - `signer`: the rustls signing key and signer.

mod lookup;
mod session;
mod signer;

use std::fmt;
use std::sync::Arc;

use cryptoki::mechanism::MechanismType;
use cryptoki::object::{Attribute, AttributeType};

pub(super) use lookup::{describe_key, find_token};
pub(super) use session::{load_module, open_logged_in, read_pin};
pub(super) use signer::sign_once;

use super::{KeyError, ObjectType, Pkcs11Uri};
use session::KeySession;
pub(crate) use session::off_worker;

/// The kind of key in the token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// ECDSA on P-256.
    EcP256,
    /// ECDSA on P-384.
    EcP384,
    /// RSA with this many modulus bits.
    Rsa(usize),
}

impl KeyKind {
    /// The kind's name in messages: `EC P-256`, `EC P-384` or `RSA`.
    pub fn name(self) -> &'static str {
        match self {
            KeyKind::EcP256 => "EC P-256",
            KeyKind::EcP384 => "EC P-384",
            KeyKind::Rsa(_) => "RSA",
        }
    }
}

/// Attributes of the private key object, as the token reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyAttributes {
    /// `CKA_TOKEN`
    pub token: bool,
    /// `CKA_PRIVATE`
    pub private: bool,
    /// `CKA_SENSITIVE`
    pub sensitive: bool,
    /// `CKA_EXTRACTABLE`
    pub extractable: bool,
    /// `CKA_ALWAYS_SENSITIVE`
    pub always_sensitive: bool,
    /// `CKA_NEVER_EXTRACTABLE`
    pub never_extractable: bool,
    /// `CKA_SIGN`
    pub sign: bool,
}

/// A private key in a PKCS#11 token, usable by rustls.
pub struct Pkcs11Key {
    session: Arc<KeySession>,
    kind: KeyKind,
    spki: Vec<u8>,
    pss: bool,
}

impl fmt::Debug for Pkcs11Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Key")
            .field("module", &self.session.module)
            .field("token", &self.token_label())
            .field("object", &self.session.uri.object_selector())
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl Pkcs11Key {
    /// Loads the module, finds the token and the private key, logs in (off the async workers).
    pub fn open(uri: &Pkcs11Uri) -> Result<Self, KeyError> {
        if let Some(t) = uri.object_type {
            if t != ObjectType::Private {
                return Err(KeyError::WrongObjectType(match t {
                    ObjectType::Public => "public",
                    ObjectType::Cert => "cert",
                    ObjectType::SecretKey => "secret-key",
                    ObjectType::Data => "data",
                    ObjectType::Private => "private",
                }));
            }
        }
        let (session, kind, spki, pss) = off_worker(|| {
            let (session, kind, spki) = KeySession::open(uri)?;
            let pss = matches!(kind, KeyKind::Rsa(_))
                && session.mechanism_supported(MechanismType::RSA_PKCS_PSS);
            Ok::<_, KeyError>((session, kind, spki, pss))
        })?;
        tracing::debug!(module = %session.module.display(), token = %session.token_label(), object = %uri.object_selector(), ?kind, "PKCS#11 key ready");
        Ok(Pkcs11Key {
            session: Arc::new(session),
            kind,
            spki,
            pss,
        })
    }

    /// The kind of key.
    pub fn kind(&self) -> KeyKind {
        self.kind
    }

    /// The label of the token holding the key.
    pub fn token_label(&self) -> String {
        self.session.token_label()
    }

    /// The slot the token is in.
    pub fn slot_id(&self) -> u64 {
        self.session.slot_id()
    }

    /// The SubjectPublicKeyInfo of the key (DER).
    pub fn spki(&self) -> &[u8] {
        &self.spki
    }

    /// Reads the private key object's security attributes (for `check` and tests).
    pub fn attributes(&self) -> Result<KeyAttributes, KeyError> {
        self.session.with_session(|open| {
            let attrs = open.session.get_attributes(
                open.key,
                &[
                    AttributeType::Token,
                    AttributeType::Private,
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::AlwaysSensitive,
                    AttributeType::NeverExtractable,
                    AttributeType::Sign,
                ],
            )?;
            let mut a = KeyAttributes {
                token: false,
                private: false,
                sensitive: false,
                extractable: true,
                always_sensitive: false,
                never_extractable: false,
                sign: false,
            };
            for attr in attrs {
                match attr {
                    Attribute::Token(v) => a.token = v,
                    Attribute::Private(v) => a.private = v,
                    Attribute::Sensitive(v) => a.sensitive = v,
                    Attribute::Extractable(v) => a.extractable = v,
                    Attribute::AlwaysSensitive(v) => a.always_sensitive = v,
                    Attribute::NeverExtractable(v) => a.never_extractable = v,
                    Attribute::Sign(v) => a.sign = v,
                    _ => {}
                }
            }
            Ok(a)
        })
    }
}
