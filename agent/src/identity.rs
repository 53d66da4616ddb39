//! The record of the live device identity (SPEC §8): `<state_dir>/identity.toml`, written by
//! `provision` and `rotate`, read with the configuration; the state directory and its lock.
//!
//! Every file here is written atomically (`sinks::write_atomic`): a reader sees the old
//! or the new file, never a partial one.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use iotcred_core::ThingName;

use crate::keys::KeySource;

/// `identity.toml`'s name in `state_dir`.
pub const IDENTITY_FILE: &str = "identity.toml";
/// Where certificates go in `state_dir`.
pub const CERTIFICATES_DIR: &str = "certificates";
/// Where new PEM keys go in `state_dir`.
pub const KEYS_DIR: &str = "keys";
/// The lock file in `state_dir`.
pub const LOCK_FILE: &str = "lock";

/// What `identity.toml` says: the thing name, the certificate and the key, and the device
/// configuration of the template that registered the thing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityRecord {
    /// The thing the certificate is attached to.
    pub thing_name: ThingName,
    /// The certificate chain file (absolute).
    pub certificate: PathBuf,
    /// The key: an absolute PEM path or a full `pkcs11:` URI.
    pub key: KeySource,
    /// AWS IoT's certificate id, when known.
    pub certificate_id: Option<String>,
    /// `deviceConfiguration` of the RegisterThing reply (values as text).
    pub device_configuration: BTreeMap<String, String>,
}

/// Why `identity.toml` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// It cannot be read.
    #[error("cannot read {path}: {source}; check state_dir and its permissions")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// It does not hold a valid record.
    #[error(
        "{path} is not a valid identity record ({detail}): restore it, or remove it and run `iotcred provision` again"
    )]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRecord {
    thing_name: String,
    certificate: PathBuf,
    key: String,
    #[serde(default)]
    certificate_id: Option<String>,
    #[serde(default)]
    device_configuration: BTreeMap<String, String>,
}

impl IdentityRecord {
    /// The path of `identity.toml` in `state_dir`.
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(IDENTITY_FILE)
    }

    /// Reads `<state_dir>/identity.toml`; `None` when it does not exist.
    pub fn load(state_dir: &Path) -> Result<Option<IdentityRecord>, RecordError> {
        let path = Self::path(state_dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(RecordError::Read { path, source }),
        };
        Self::parse(&text, &path).map(Some)
    }

    /// Parses the text of an identity record read from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<IdentityRecord, RecordError> {
        let invalid = |detail: String| RecordError::Invalid {
            path: path.to_path_buf(),
            detail,
        };
        let raw: RawRecord =
            toml::from_str(text).map_err(|e| invalid(e.message().trim().to_string()))?;
        let thing_name =
            ThingName::new(&raw.thing_name).map_err(|e| invalid(format!("thing_name: {e}")))?;
        if !raw.certificate.is_absolute() {
            return Err(invalid("certificate is not an absolute path".into()));
        }
        let key = KeySource::parse(&raw.key).map_err(|e| invalid(format!("key: {e}")))?;
        if let KeySource::Pem(p) = &key {
            if !p.is_absolute() {
                return Err(invalid(
                    "key is not an absolute path or a pkcs11: URI".into(),
                ));
            }
        }
        Ok(IdentityRecord {
            thing_name,
            certificate: raw.certificate,
            key,
            certificate_id: raw.certificate_id,
            device_configuration: raw.device_configuration,
        })
    }

    /// The record as TOML.
    pub fn to_toml(&self) -> String {
        let mut s =
            String::from("# Written by iotcred provision/rotate: the live device identity.\n");
        s.push_str(&format!(
            "thing_name = {}\n",
            toml_string(self.thing_name.as_str())
        ));
        s.push_str(&format!(
            "certificate = {}\n",
            toml_string(&self.certificate.to_string_lossy())
        ));
        s.push_str(&format!("key = {}\n", toml_string(&self.key.to_string())));
        if let Some(id) = &self.certificate_id {
            s.push_str(&format!("certificate_id = {}\n", toml_string(id)));
        }
        s.push_str("\n[device_configuration]\n");
        for (k, v) in &self.device_configuration {
            s.push_str(&format!("{} = {}\n", toml_string(k), toml_string(v)));
        }
        s
    }

    /// Writes the record to `<state_dir>/identity.toml` atomically (mode 0600: a `pkcs11:` URI
    /// may name where the PIN is).
    pub fn write(&self, state_dir: &Path) -> io::Result<()> {
        crate::sinks::write_atomic(&Self::path(state_dir), 0o600, self.to_toml().as_bytes())
    }
}

/// A TOML basic string: JSON's string escapes are TOML's, except that TOML also wants DEL
/// escaped.
pub fn toml_string(s: &str) -> String {
    serde_json::to_string(s)
        .unwrap_or_default()
        .replace('\u{7f}', "\\u007F")
}

/// Creates `state_dir` (mode 0700) and its `certificates` and `keys` directories if missing.
pub fn ensure_state_dir(state_dir: &Path) -> io::Result<()> {
    if !state_dir.is_dir() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)?;
    }
    for (sub, mode) in [(CERTIFICATES_DIR, 0o755), (KEYS_DIR, 0o700)] {
        let d = state_dir.join(sub);
        if !d.is_dir() {
            std::fs::DirBuilder::new()
                .mode(mode)
                .create(&d)
                .or_else(|e| {
                    if e.kind() == io::ErrorKind::AlreadyExists {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })?;
        }
    }
    Ok(())
}

/// The lock on `state_dir`: only one process changes the identity at a time. Released when
/// dropped (and by the kernel when the process dies).
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

impl StateLock {
    /// Takes the lock, waiting up to `wait` for another holder to finish.
    pub fn acquire(state_dir: &Path, wait: Duration) -> io::Result<StateLock> {
        let path = state_dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(&path)?;
        let deadline = Instant::now() + wait;
        loop {
            // SAFETY: flock on a descriptor this function owns.
            let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if r == 0 {
                return Ok(StateLock { _file: file });
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(e);
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!(
                        "another iotcred process holds {} (it is changing the device identity): wait for it and try again",
                        path.display()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Wakes when anything changes in a directory (inotify): how a running agent learns that
/// another process switched `identity.toml`, without waking up while nothing happens.
#[derive(Debug)]
pub struct DirWatch {
    fd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
}

impl DirWatch {
    /// Watches `dir` for files created, written, moved in or out, or deleted.
    pub fn new(dir: &Path) -> io::Result<DirWatch> {
        use std::os::fd::FromRawFd;
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
        // SAFETY: inotify_init1 has no preconditions; the descriptor is owned below.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        let mask = libc::IN_CLOSE_WRITE
            | libc::IN_MOVED_TO
            | libc::IN_MOVED_FROM
            | libc::IN_CREATE
            | libc::IN_DELETE
            | libc::IN_DELETE_SELF
            | libc::IN_MOVE_SELF;
        // SAFETY: a valid inotify descriptor and a NUL-terminated path.
        if unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), mask) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: an OwnedFd: open, and the same descriptor for as long as the AsyncFd owns it.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        }
        .map_err(|e| e.into_parts().1)?;
        Ok(DirWatch { fd })
    }

    /// Waits for the next change(s), and drains every event queued so far.
    pub async fn changed(&self) -> io::Result<()> {
        loop {
            let mut guard = self.fd.readable().await?;
            let mut buf = [0u8; 4096];
            let mut got = false;
            loop {
                // SAFETY: reading into a buffer of its stated length from our descriptor.
                let n = unsafe {
                    libc::read(
                        self.fd.get_ref().as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                    )
                };
                if n > 0 {
                    got = true;
                    continue;
                }
                let e = io::Error::last_os_error();
                if n < 0 && e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                if n < 0 && e.kind() != io::ErrorKind::WouldBlock {
                    return Err(e);
                }
                break;
            }
            guard.clear_ready();
            if got {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> IdentityRecord {
        IdentityRecord {
            thing_name: ThingName::new("gw-0042").unwrap(),
            certificate: "/var/lib/iotcred/certificates/ab.pem.crt".into(),
            key: KeySource::parse(
                "pkcs11:token=iotcred;object=device;id=%01%02?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/iotcred/pin",
            )
            .unwrap(),
            certificate_id: Some("ab".into()),
            device_configuration: [
                ("region".to_string(), "eu-west-1".to_string()),
                ("odd \"key\"".to_string(), "line\nbreak\u{7f}".to_string()),
            ]
            .into_iter()
            .collect(),
        }
    }

    #[test]
    fn a_record_round_trips_through_its_toml() {
        let r = record();
        let text = r.to_toml();
        let back = IdentityRecord::parse(&text, Path::new("/x/identity.toml")).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn invalid_records_say_what_to_do() {
        for (text, want) in [
            ("thing_name = \"a\"\n", "missing field"),
            (
                "thing_name = \"a\"\ncertificate = \"rel.pem\"\nkey = \"/k\"\n",
                "absolute",
            ),
            (
                "thing_name = \"a\"\ncertificate = \"/c\"\nkey = \"k\"\n",
                "absolute",
            ),
            (
                "thing_name = \"a\"\ncertificate = \"/c\"\nkey = \"/k\"\nextra = 1\n",
                "unknown field",
            ),
        ] {
            let e = IdentityRecord::parse(text, Path::new("/x/identity.toml")).unwrap_err();
            let m = e.to_string();
            assert!(m.contains(want), "{text:?}: {m}");
            assert!(m.contains("iotcred provision"), "{m}");
        }
    }

    #[tokio::test]
    async fn a_directory_watch_wakes_on_an_atomic_replacement() {
        let d = tempfile::tempdir().unwrap();
        let watch = DirWatch::new(d.path()).unwrap();
        let record = d.path().join(IDENTITY_FILE);
        crate::sinks::write_atomic(&record, 0o600, b"x").unwrap();
        // The events of the write are queued: this returns without waiting.
        watch.changed().await.unwrap();
        crate::sinks::write_atomic(&record, 0o600, b"y").unwrap();
        watch.changed().await.unwrap();
    }

    #[test]
    fn state_dir_is_private_and_the_lock_is_exclusive() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join("state");
        ensure_state_dir(&state).unwrap();
        let mode = std::fs::metadata(&state).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert!(state.join(CERTIFICATES_DIR).is_dir());
        assert!(state.join(KEYS_DIR).is_dir());
        let held = StateLock::acquire(&state, Duration::ZERO).unwrap();
        // flock locks belong to the open file description: a second open conflicts.
        let e = StateLock::acquire(&state, Duration::ZERO).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert!(e.to_string().contains("another iotcred process"), "{e}");
        drop(held);
        StateLock::acquire(&state, Duration::ZERO).unwrap();
    }
}
