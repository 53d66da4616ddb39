//! The durable state of an unfinished provisioning or rotation: `<state_dir>/provision.toml`
//! or `<state_dir>/rotation.toml`. Each step's result is recorded here (atomically) before the
//! next step starts, so a re-run resumes where the last durable step ended.

use std::io;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::identity::toml_string;
use crate::keys::KeySource;

/// What an unfinished run has made so far.
#[derive(Clone, PartialEq, Eq)]
pub struct Pending {
    /// Where the new key is (recorded before it is made, so a key is never made twice).
    pub key: KeySource,
    /// The certificate obtained for it, once obtained.
    pub certificate: Option<Issued>,
    /// Rotation: the certificate being replaced (a record left for another identity is stale).
    pub replaces: Option<PathBuf>,
}

/// A certificate from CreateCertificateFromCsr, and its ownership token.
#[derive(Clone, PartialEq, Eq)]
pub struct Issued {
    /// AWS IoT's certificate id.
    pub certificate_id: String,
    /// The file it was written to.
    pub path: PathBuf,
    /// The ownership token (a secret: never logged).
    pub ownership_token: Zeroizing<String>,
    /// When the token was received (device wall clock, Unix seconds).
    pub token_received_at: u64,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("certificate_id", &self.certificate_id)
            .field("path", &self.path)
            .field("token_received_at", &self.token_received_at)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("key", &self.key)
            .field(
                "certificate_id",
                &self.certificate.as_ref().map(|c| &c.certificate_id),
            )
            .field("replaces", &self.replaces)
            .finish_non_exhaustive()
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    key: String,
    #[serde(default)]
    certificate_id: Option<String>,
    #[serde(default)]
    certificate: Option<PathBuf>,
    #[serde(default)]
    ownership_token: Option<String>,
    #[serde(default)]
    token_received_at: Option<u64>,
    #[serde(default)]
    replaces: Option<PathBuf>,
}

impl Pending {
    /// Reads the record at `path`; `None` when there is none, or when it cannot be understood
    /// (then it is set aside as `<path>.invalid` and the run starts afresh).
    pub fn load(path: &Path) -> io::Result<Option<Pending>> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => Zeroizing::new(t),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        match Self::parse(&text) {
            Some(p) => Ok(Some(p)),
            None => {
                tracing::warn!(
                    path = %path.display(),
                    "unreadable progress record set aside; starting this step machine afresh"
                );
                let mut aside = path.as_os_str().to_owned();
                aside.push(".invalid");
                std::fs::rename(path, aside)?;
                Ok(None)
            }
        }
    }

    fn parse(text: &str) -> Option<Pending> {
        let raw: Raw = toml::from_str(text).ok()?;
        let key = KeySource::parse(&raw.key).ok()?;
        let certificate = match (
            raw.certificate_id,
            raw.certificate,
            raw.ownership_token,
            raw.token_received_at,
        ) {
            (Some(id), Some(path), Some(token), Some(at)) => Some(Issued {
                certificate_id: id,
                path,
                ownership_token: Zeroizing::new(token),
                token_received_at: at,
            }),
            (None, None, None, None) => None,
            _ => return None,
        };
        Some(Pending {
            key,
            certificate,
            replaces: raw.replaces,
        })
    }

    fn to_toml(&self) -> Zeroizing<String> {
        let mut s = Zeroizing::new(String::from(
            "# iotcred: an unfinished provisioning or rotation (removed when it completes).\n",
        ));
        s.push_str(&format!("key = {}\n", toml_string(&self.key.to_string())));
        if let Some(r) = &self.replaces {
            s.push_str(&format!(
                "replaces = {}\n",
                toml_string(&r.to_string_lossy())
            ));
        }
        if let Some(c) = &self.certificate {
            s.push_str(&format!(
                "certificate_id = {}\n",
                toml_string(&c.certificate_id)
            ));
            s.push_str(&format!(
                "certificate = {}\n",
                toml_string(&c.path.to_string_lossy())
            ));
            s.push_str(&format!(
                "ownership_token = {}\n",
                toml_string(&c.ownership_token)
            ));
            s.push_str(&format!("token_received_at = {}\n", c.token_received_at));
        }
        s
    }

    /// Records this state at `path` atomically, mode 0600 (the token is a secret).
    pub fn save(&self, path: &Path) -> io::Result<()> {
        crate::sinks::write_atomic(path, 0o600, self.to_toml().as_bytes())
    }

    /// Removes the record (the step machine finished), and syncs the directory.
    pub fn remove(path: &Path) -> io::Result<()> {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        }
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_a_broken_one_is_set_aside() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("provision.toml");
        assert!(Pending::load(&path).unwrap().is_none());
        let mut p = Pending {
            key: KeySource::Pem(d.path().join("keys/device.key")),
            certificate: None,
            replaces: None,
        };
        p.save(&path).unwrap();
        assert_eq!(Pending::load(&path).unwrap(), Some(p.clone()));
        p.certificate = Some(Issued {
            certificate_id: "ab12".into(),
            path: d.path().join("certificates/ab12.pem.crt"),
            ownership_token: Zeroizing::new("tok\"en".into()),
            token_received_at: 1_700_000_000,
        });
        p.replaces = Some("/old.pem".into());
        p.save(&path).unwrap();
        assert_eq!(Pending::load(&path).unwrap(), Some(p.clone()));
        assert!(!format!("{p:?}").contains("tok"), "token in Debug");
        std::fs::write(&path, "key = 1\n").unwrap();
        assert!(Pending::load(&path).unwrap().is_none());
        assert!(!path.exists());
        assert!(d.path().join("provision.toml.invalid").exists());
        Pending::remove(&path).unwrap();
    }
}
