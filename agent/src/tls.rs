//! The device's TLS identity and the rustls client configuration (ring provider only).

use std::path::Path;
use std::sync::Arc;

use iotcred_core::UnixTime;
use rustls::client::ResolvesClientCert;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, SignatureScheme};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::config::Config;
use crate::keys::{self, KeyError};

/// What went wrong while setting up the TLS identity. Every message says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The certificate file cannot be read or holds no certificate.
    #[error("certificate {path}: {message}")]
    Certificate {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The trust anchors cannot be loaded.
    #[error("ca {path}: {message}")]
    Ca {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The key cannot be used.
    #[error("key: {0}")]
    Key(#[from] KeyError),
    /// The certificate does not belong to the key.
    #[error(
        "certificate {path} does not match the private key {key}: configure the certificate issued for this key"
    )]
    Mismatch {
        /// Certificate file.
        path: String,
        /// Key description (never a PIN).
        key: String,
    },
    /// The certificate is not valid at the device's current time.
    #[error("{0}")]
    Validity(String),
    /// The device's clock is before the certificate's notBefore: the clock is wrong (a gateway
    /// without RTC booting in 1970), not the certificate. `run` waits for time sync on it.
    #[error("{0}")]
    ClockBehind(String),
    /// rustls refused the configuration.
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
    /// The device has no identity yet (`[provision]` makes it).
    #[error(
        "not provisioned: the device has no certificate yet; `iotcred provision` (or `iotcred run`) makes one with [provision]"
    )]
    NotProvisioned,
}

/// Facts about the device certificate, for `check` and logs.
#[derive(Clone, Debug)]
pub struct CertInfo {
    /// Subject common name, if any.
    pub subject_cn: Option<String>,
    /// Subject DN, as text.
    pub subject: String,
    /// Start of validity.
    pub not_before: UnixTime,
    /// End of validity.
    pub not_after: UnixTime,
    /// Number of certificates in the chain file.
    pub chain_len: usize,
}

/// A loaded identity: the chain, the signing key and the TLS client configuration.
#[derive(Debug, Clone)]
pub struct Identity {
    /// rustls client configuration (trust anchors, client certificate, ALPN none).
    pub client_config: Arc<ClientConfig>,
    /// Facts about the leaf certificate.
    pub cert: CertInfo,
}

/// Loads the certificate chain (leaf first) from a PEM file.
pub fn load_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let err = |message: String| IdentityError::Certificate {
        path: path.display().to_string(),
        message,
    };
    let data = std::fs::read(path).map_err(|e| {
        err(format!(
            "{e}: check the `certificate` path and its permissions"
        ))
    })?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<_, _>>()
        .map_err(|e| err(format!("not a PEM certificate file ({e})")))?;
    if chain.is_empty() {
        return Err(err(
            "no CERTIFICATE block found: expected the device certificate in PEM".into(),
        ));
    }
    Ok(chain)
}

/// Reads the leaf certificate's subject and validity, and checks it against `wall_now`.
pub fn inspect_leaf(
    chain: &[CertificateDer<'static>],
    path: &Path,
    wall_now: UnixTime,
) -> Result<CertInfo, IdentityError> {
    let err = |message: String| IdentityError::Certificate {
        path: path.display().to_string(),
        message,
    };
    let leaf = chain.first().ok_or_else(|| err("empty chain".into()))?;
    let leaf = crate::cert::parse_leaf(leaf.as_ref()).map_err(|e| err(e.to_string()))?;
    let info = CertInfo {
        subject_cn: leaf.subject_cn,
        subject: leaf.subject,
        not_before: leaf.not_before,
        not_after: leaf.not_after,
        chain_len: chain.len(),
    };
    if wall_now < info.not_before {
        return Err(IdentityError::ClockBehind(format!(
            "certificate {} is not valid before {}, but the system clock says {}: set the clock (NTP/RTC) or wait for time sync",
            path.display(),
            info.not_before.rfc3339(),
            wall_now.rfc3339()
        )));
    }
    if wall_now > info.not_after {
        return Err(IdentityError::Validity(format!(
            "certificate {} expired at {} (system clock: {}): install a renewed device certificate",
            path.display(),
            info.not_after.rfc3339(),
            wall_now.rfc3339()
        )));
    }
    Ok(info)
}

/// The leaf's SubjectPublicKeyInfo DER.
fn leaf_spki(leaf: &CertificateDer<'_>) -> Option<Vec<u8>> {
    crate::cert::parse_leaf(leaf.as_ref()).ok().map(|l| l.spki)
}

/// Trust anchors: the configured CA file, else the Amazon roots built in.
pub fn root_store(ca: Option<&Path>) -> Result<RootCertStore, IdentityError> {
    let mut roots = RootCertStore::empty();
    match ca {
        Some(path) => {
            let err = |message: String| IdentityError::Ca {
                path: path.display().to_string(),
                message,
            };
            let data = std::fs::read(path).map_err(|e| err(format!("{e}: check the `ca` path")))?;
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&data)
                .collect::<Result<_, _>>()
                .map_err(|e| err(format!("not a PEM file ({e})")))?;
            let (added, _ignored) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(err("no usable CA certificate in the file".into()));
            }
        }
        None => roots.extend(amazon_roots()),
    }
    Ok(roots)
}

/// The Amazon Trust Services roots (and the Starfield root they are cross-signed by), taken from
/// the Mozilla root program bundle: the anchors of every AWS IoT credentials endpoint.
pub fn amazon_roots() -> impl Iterator<Item = rustls_pki_types::TrustAnchor<'static>> {
    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }
    webpki_roots::TLS_SERVER_ROOTS
        .iter()
        .filter(|ta| {
            let s: &[u8] = ta.subject.as_ref();
            contains(s, b"Amazon Root CA")
                || contains(s, b"Starfield Services Root Certificate Authority")
        })
        .cloned()
}

/// Always presents the device certificate.
#[derive(Debug)]
struct DeviceCert(Arc<CertifiedKey>);

impl ResolvesClientCert for DeviceCert {
    fn resolve(
        &self,
        _hints: &[&[u8]],
        sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.0.key.choose_scheme(sigschemes).map(|_| self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Builds the client configuration for `chain` + `key` with `roots`.
pub fn client_config(
    roots: RootCertStore,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<dyn rustls::sign::SigningKey>,
) -> Result<Arc<ClientConfig>, IdentityError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots)
        .with_client_cert_resolver(Arc::new(DeviceCert(Arc::new(CertifiedKey::new(
            chain, key,
        )))));
    cfg.enable_sni = true;
    Ok(Arc::new(cfg))
}

/// Loads and checks everything the exchange needs: chain, key (and that they match), validity
/// against the wall clock, trust anchors.
pub fn load_identity(config: &Config) -> Result<Identity, IdentityError> {
    let device = config
        .device
        .as_ref()
        .ok_or(IdentityError::NotProvisioned)?;
    load_device(&device.certificate, &device.key, config.ca.as_deref())
}

/// Loads and checks a certificate chain and its key (they must match, and the leaf be valid
/// now), with the trust anchors `ca` (`None` = the built-in Amazon roots).
pub fn load_device(
    certificate: &Path,
    key_source: &keys::KeySource,
    ca: Option<&Path>,
) -> Result<Identity, IdentityError> {
    let chain = load_chain(certificate)?;
    let cert = inspect_leaf(&chain, certificate, UnixTime::now())?;
    let key = keys::load_signing_key(key_source)?;
    let key_spki = keys::spki_of(key.as_ref())?;
    if leaf_spki(&chain[0]).as_deref() != Some(key_spki.as_slice()) {
        return Err(IdentityError::Mismatch {
            path: certificate.display().to_string(),
            key: key_source.to_string(),
        });
    }
    let roots = root_store(ca)?;
    let client_config = client_config(roots, chain, key)?;
    Ok(Identity {
        client_config,
        cert,
    })
}

/// The leaf's SubjectPublicKeyInfo DER of a PEM certificate.
pub fn certificate_spki(pem: &[u8]) -> Option<Vec<u8>> {
    let leaf = CertificateDer::pem_slice_iter(pem).next()?.ok()?;
    leaf_spki(&leaf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amazon_roots_are_built_in() {
        // Amazon Root CA 1-4 and the Starfield Services root.
        assert!(amazon_roots().count() >= 5);
    }
}
