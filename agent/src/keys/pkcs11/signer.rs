//! The rustls side: [`SigningKey`] for [`Pkcs11Key`] and the [`Signer`] the handshake calls.
//!
//! Hashing is done in software (ring) and the token signs the digest: `CKM_ECDSA` (raw r‖s,
//! converted to DER), `CKM_RSA_PKCS_PSS` and `CKM_RSA_PKCS` over a DigestInfo. These work on
//! SoftHSM2, tpm2-pkcs11 and most HSMs, unlike the combined hash-and-sign mechanisms.
//!
//! rustls calls [`Signer::sign`] synchronously inside the handshake, on whatever thread drives
//! the connection; the session runs the token call off the async workers (see `session.rs`).

use std::fmt;
use std::sync::Arc;

use cryptoki::error::Error as CkError;
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;
use cryptoki::types::Ulong;
use rustls::sign::{Signer, SigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};
use rustls_pki_types::SubjectPublicKeyInfoDer;

use super::session::KeySession;
use super::{KeyKind, Pkcs11Key};
use crate::der;
use crate::keys::{KeyError, SignFailure};

impl SigningKey for Pkcs11Key {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        let scheme = self.schemes().into_iter().find(|s| offered.contains(s))?;
        Some(Box::new(Pkcs11Signer {
            session: Arc::clone(&self.session),
            op: SignOp::for_scheme(self.kind, scheme)?,
            scheme,
        }))
    }

    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        Some(SubjectPublicKeyInfoDer::from(self.spki.as_slice()))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        match self.kind {
            KeyKind::EcP256 | KeyKind::EcP384 => SignatureAlgorithm::ECDSA,
            KeyKind::Rsa(_) => SignatureAlgorithm::RSA,
        }
    }
}

impl Pkcs11Key {
    /// The schemes this key can sign with, preferred first.
    fn schemes(&self) -> Vec<SignatureScheme> {
        match self.kind {
            KeyKind::EcP256 => vec![SignatureScheme::ECDSA_NISTP256_SHA256],
            KeyKind::EcP384 => vec![SignatureScheme::ECDSA_NISTP384_SHA384],
            KeyKind::Rsa(_) => {
                let mut v = Vec::new();
                if self.pss {
                    v.extend([
                        SignatureScheme::RSA_PSS_SHA256,
                        SignatureScheme::RSA_PSS_SHA384,
                    ]);
                }
                v.extend([
                    SignatureScheme::RSA_PKCS1_SHA256,
                    SignatureScheme::RSA_PKCS1_SHA384,
                ]);
                v
            }
        }
    }

    /// Signs `message` with `scheme` (hashing it first). ECDSA signatures are DER.
    pub fn sign_with(&self, scheme: SignatureScheme, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        let op =
            SignOp::for_scheme(self.kind, scheme).ok_or(KeyError::Sign(SignFailure::Scheme {
                scheme,
                kind: self.kind.name(),
            }))?;
        op.sign(&self.session, message)
    }
}

struct Pkcs11Signer {
    session: Arc<KeySession>,
    op: SignOp,
    scheme: SignatureScheme,
}

impl fmt::Debug for Pkcs11Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Signer")
            .field("token", &self.session.token_label())
            .field("scheme", &self.scheme)
            .finish()
    }
}

impl Signer for Pkcs11Signer {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        self.op.sign(&self.session, message).map_err(|e| {
            // The caller reports the failure (one line per failed exchange): it finds the
            // `KeyError` itself in the TLS error.
            tracing::debug!(error = %e, "PKCS#11 signing failed");
            rustls::Error::Other(rustls::OtherError(Arc::new(e)))
        })
    }

    fn scheme(&self) -> SignatureScheme {
        self.scheme
    }
}

/// How to produce a signature for one scheme.
#[derive(Clone, Copy, Debug)]
enum SignOp {
    Ecdsa(Hash),
    RsaPss(Hash),
    RsaPkcs1(Hash),
}

#[derive(Clone, Copy, Debug)]
enum Hash {
    Sha256,
    Sha384,
}

impl Hash {
    fn digest(self, message: &[u8]) -> Vec<u8> {
        let alg = match self {
            Hash::Sha256 => &ring::digest::SHA256,
            Hash::Sha384 => &ring::digest::SHA384,
        };
        ring::digest::digest(alg, message).as_ref().to_vec()
    }
}

impl SignOp {
    fn for_scheme(kind: KeyKind, scheme: SignatureScheme) -> Option<SignOp> {
        use SignatureScheme as S;
        Some(match (kind, scheme) {
            (KeyKind::EcP256, S::ECDSA_NISTP256_SHA256) => SignOp::Ecdsa(Hash::Sha256),
            (KeyKind::EcP384, S::ECDSA_NISTP384_SHA384) => SignOp::Ecdsa(Hash::Sha384),
            (KeyKind::Rsa(_), S::RSA_PSS_SHA256) => SignOp::RsaPss(Hash::Sha256),
            (KeyKind::Rsa(_), S::RSA_PSS_SHA384) => SignOp::RsaPss(Hash::Sha384),
            (KeyKind::Rsa(_), S::RSA_PKCS1_SHA256) => SignOp::RsaPkcs1(Hash::Sha256),
            (KeyKind::Rsa(_), S::RSA_PKCS1_SHA384) => SignOp::RsaPkcs1(Hash::Sha384),
            _ => return None,
        })
    }

    /// Signs with the key's long-lived session (off the async workers, reopened if lost).
    fn sign(self, session: &KeySession, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        session.with_session(|open| self.sign_in(&open.session, open.key, message))
    }

    /// Signs in an open session.
    fn sign_in(
        self,
        session: &Session,
        key: ObjectHandle,
        message: &[u8],
    ) -> Result<Vec<u8>, CkError> {
        match self {
            SignOp::Ecdsa(h) => {
                let raw = session.sign(&Mechanism::Ecdsa, key, &h.digest(message))?;
                der::ecdsa_raw_to_der(&raw).ok_or(CkError::InvalidValue)
            }
            SignOp::RsaPss(h) => {
                let params = match h {
                    Hash::Sha256 => PkcsPssParams {
                        hash_alg: MechanismType::SHA256,
                        mgf: PkcsMgfType::MGF1_SHA256,
                        s_len: Ulong::from(32 as std::os::raw::c_ulong),
                    },
                    Hash::Sha384 => PkcsPssParams {
                        hash_alg: MechanismType::SHA384,
                        mgf: PkcsMgfType::MGF1_SHA384,
                        s_len: Ulong::from(48 as std::os::raw::c_ulong),
                    },
                };
                session.sign(&Mechanism::RsaPkcsPss(params), key, &h.digest(message))
            }
            SignOp::RsaPkcs1(h) => {
                let mut info = match h {
                    Hash::Sha256 => der::DIGEST_INFO_SHA256.to_vec(),
                    Hash::Sha384 => der::DIGEST_INFO_SHA384.to_vec(),
                };
                info.extend_from_slice(&h.digest(message));
                session.sign(&Mechanism::RsaPkcs, key, &info)
            }
        }
    }
}

/// Signs in an already open session (`keygen`, for the CSR; a one-shot command, so the call
/// runs where it is).
pub(in crate::keys) fn sign_once(
    session: &Session,
    key: ObjectHandle,
    kind: KeyKind,
    scheme: SignatureScheme,
    message: &[u8],
) -> Result<Vec<u8>, KeyError> {
    let op = SignOp::for_scheme(kind, scheme).ok_or(KeyError::Sign(SignFailure::Scheme {
        scheme,
        kind: kind.name(),
    }))?;
    op.sign_in(session, key, message)
        .map_err(|e| KeyError::Sign(e.into()))
}
