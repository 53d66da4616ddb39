//! Creating the listeners: the Unix socket (with its final mode from the start), the optional
//! loopback TCP listener, systemd socket activation, and the per-role token files.

use std::fs;
use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::{TcpListener, UnixListener};
use zeroize::Zeroizing;

use super::{Listeners, ServeConfig, ServeError, Token};
use crate::state::RoleHandle;

/// Listening sockets handed over by systemd (`LISTEN_PID`/`LISTEN_FDS`/`LISTEN_FDNAMES`).
#[derive(Debug, Default)]
pub struct Activation {
    fds: Vec<(OwnedFd, Option<String>)>,
}

/// The first file descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

static ACTIVATION_TAKEN: AtomicBool = AtomicBool::new(false);

impl Activation {
    /// Sockets passed by systemd to this process, read from the environment.
    ///
    /// Takes ownership of the inherited descriptors (marked close-on-exec), so only the first
    /// call in a process can return any; later calls return `Ok(None)`. The variables are left
    /// in place (removing them is not thread-safe); they name this process's pid, so children
    /// ignore them.
    pub fn from_env() -> Result<Option<Activation>, ServeError> {
        let var = |k| std::env::var(k).ok();
        let parsed = parse_listen_env(
            var("LISTEN_PID").as_deref(),
            var("LISTEN_FDS").as_deref(),
            var("LISTEN_FDNAMES").as_deref(),
            std::process::id(),
        )?;
        let Some(list) = parsed else {
            return Ok(None);
        };
        if ACTIVATION_TAKEN.swap(true, Ordering::SeqCst) {
            return Ok(None);
        }
        let mut fds = Vec::with_capacity(list.len());
        for (fd, name) in list {
            // SAFETY: systemd passed these descriptors to this process (LISTEN_PID is ours) and
            // nothing else in the process owns them; the static guard above makes sure they
            // are taken once.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: fcntl on a descriptor we own.
            if unsafe { libc::fcntl(owned.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
                return Err(ServeError::Activation(format!(
                    "fd {fd} from LISTEN_FDS is not open: {}",
                    io::Error::last_os_error()
                )));
            }
            fds.push((owned, name));
        }
        Ok(Some(Activation { fds }))
    }

    /// Activation from already-owned listening sockets (tests, or a caller that did its own
    /// `sd_listen_fds`).
    pub fn from_fds(fds: Vec<OwnedFd>) -> Activation {
        Activation {
            fds: fds.into_iter().map(|fd| (fd, None)).collect(),
        }
    }

    /// Number of sockets passed.
    pub fn len(&self) -> usize {
        self.fds.len()
    }

    /// Whether no socket was passed.
    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }
}

/// Descriptors passed by systemd, with their `LISTEN_FDNAMES` names.
pub type ListenFds = Vec<(RawFd, Option<String>)>;

/// Parses the socket-activation variables (sd_listen_fds(3)): `Ok(None)` when they are absent
/// or meant for another process, else the descriptors `3..3+LISTEN_FDS` with their names.
pub fn parse_listen_env(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    listen_fdnames: Option<&str>,
    my_pid: u32,
) -> Result<Option<ListenFds>, ServeError> {
    let (Some(pid), Some(n)) = (listen_pid, listen_fds) else {
        return Ok(None);
    };
    let pid: u32 = pid
        .trim()
        .parse()
        .map_err(|_| ServeError::Activation(format!("LISTEN_PID={pid:?} is not a pid")))?;
    if pid != my_pid {
        return Ok(None);
    }
    let n: u16 = n.trim().parse().map_err(|_| {
        ServeError::Activation(format!("LISTEN_FDS={n:?} is not a descriptor count"))
    })?;
    let names: Vec<Option<String>> = match listen_fdnames {
        Some(s) if !s.is_empty() => s.split(':').map(|x| Some(x.to_owned())).collect(),
        _ => vec![None; usize::from(n)],
    };
    if names.len() != usize::from(n) {
        return Err(ServeError::Activation(format!(
            "LISTEN_FDNAMES has {} names for LISTEN_FDS={n}",
            names.len()
        )));
    }
    Ok(Some(
        names
            .into_iter()
            .enumerate()
            .map(|(i, name)| (LISTEN_FDS_START + i as RawFd, name))
            .collect(),
    ))
}

/// Creates the listeners and writes the role tokens (see [`super::bind`]).
pub(super) async fn bind_with(
    cfg: &ServeConfig,
    roles: &[RoleHandle],
    activation: Option<Activation>,
) -> Result<Listeners, ServeError> {
    if let Some(addr) = cfg.listen {
        check_loopback(addr)?;
    }
    let mut unix = None;
    let mut tcp = None;
    for (fd, name) in activation.map(|a| a.fds).unwrap_or_default() {
        let label = name.as_deref().unwrap_or("unnamed").to_owned();
        match classify(&fd).map_err(|e| {
            ServeError::Activation(format!("socket {label} (fd {}): {e}", fd.as_raw_fd()))
        })? {
            Kind::Unix if unix.is_none() => {
                let l = std::os::unix::net::UnixListener::from(fd);
                l.set_nonblocking(true).map_err(ServeError::activation_io)?;
                unix = Some(UnixListener::from_std(l).map_err(ServeError::activation_io)?);
            }
            Kind::Tcp if tcp.is_none() => {
                let l = std::net::TcpListener::from(fd);
                let addr = l.local_addr().map_err(ServeError::activation_io)?;
                check_loopback(addr)?;
                l.set_nonblocking(true).map_err(ServeError::activation_io)?;
                tcp = Some(TcpListener::from_std(l).map_err(ServeError::activation_io)?);
            }
            _ => {
                return Err(ServeError::Activation(format!(
                    "socket {label}: expected at most one Unix and one TCP listening socket; \
                     fix ListenStream= in iotcred.socket"
                )));
            }
        }
    }

    let mut created_socket = None;
    if unix.is_none() {
        let (l, id) = bind_unix(&cfg.socket, cfg.socket_mode)?;
        unix = Some(l);
        created_socket = Some(id);
    }
    if tcp.is_none() {
        if let Some(addr) = cfg.listen {
            tcp = Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| ServeError::Listen { addr, source })?,
            );
        }
    }

    let tokens = write_tokens(&cfg.runtime_dir, roles)?;
    Ok(Listeners {
        unix,
        tcp,
        tokens,
        created_socket,
        limits: cfg.limits(),
        imds: None,
    })
}

fn check_loopback(addr: SocketAddr) -> Result<(), ServeError> {
    if addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(ServeError::NotLoopback(addr))
    }
}

enum Kind {
    Unix,
    Tcp,
}

/// What kind of listening stream socket `fd` is.
fn classify(fd: &OwnedFd) -> io::Result<Kind> {
    let raw = fd.as_raw_fd();
    let int_opt = |opt| -> io::Result<libc::c_int> {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `v`.
        let rc = unsafe {
            libc::getsockopt(
                raw,
                libc::SOL_SOCKET,
                opt,
                (&raw mut v).cast(),
                &raw mut len,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(v)
        }
    };
    if int_opt(libc::SO_TYPE)? != libc::SOCK_STREAM {
        return Err(io::Error::other("not a stream socket"));
    }
    if int_opt(libc::SO_ACCEPTCONN)? == 0 {
        return Err(io::Error::other("not a listening socket"));
    }
    match int_opt(libc::SO_DOMAIN)? {
        libc::AF_UNIX => Ok(Kind::Unix),
        libc::AF_INET | libc::AF_INET6 => Ok(Kind::Tcp),
        d => Err(io::Error::other(format!("unsupported address family {d}"))),
    }
}

/// Identity of the socket file we created, so that only that file is removed at exit.
#[derive(Debug)]
pub(super) struct SocketId {
    pub(super) path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketId {
    /// Removes the socket file if it is still the one we created.
    pub(super) fn remove(&self) {
        if let Ok(m) = fs::symlink_metadata(&self.path) {
            if m.dev() == self.dev && m.ino() == self.ino {
                let _ = fs::remove_file(&self.path);
            }
        }
    }
}

/// Binds the Unix socket at `path` with `mode`, without ever exposing it with a wider mode:
/// it is bound inside a fresh private (0700) directory next to `path`, chmod-ed, then renamed
/// into place. An existing socket file is replaced only when nothing listens on it.
fn bind_unix(path: &Path, mode: u32) -> Result<(UnixListener, SocketId), ServeError> {
    let err = |source| ServeError::Socket {
        path: path.to_owned(),
        source,
    };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    if !parent.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&parent)
            .map_err(err)?;
    }
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            // Replaced (atomically, by the rename below) only when nothing listens on it.
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ServeError::SocketInUse(path.to_owned()));
            }
        }
        Ok(_) => return Err(ServeError::NotASocket(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }

    let tmp_dir = parent.join(format!(".iotcred-{}", hex(&random::<6>()?)));
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&tmp_dir)
        .map_err(err)?;
    let tmp_sock = tmp_dir.join("s");
    let result = (|| {
        let l = std::os::unix::net::UnixListener::bind(&tmp_sock)?;
        fs::set_permissions(&tmp_sock, fs::Permissions::from_mode(mode & 0o7777))?;
        fs::rename(&tmp_sock, path)?;
        let m = fs::symlink_metadata(path)?;
        l.set_nonblocking(true)?;
        Ok::<_, io::Error>((l, m))
    })();
    let _ = fs::remove_file(&tmp_sock);
    let _ = fs::remove_dir(&tmp_dir);
    let (l, m) = result.map_err(err)?;
    let listener = UnixListener::from_std(l).map_err(err)?;
    Ok((
        listener,
        SocketId {
            path: path.to_owned(),
            dev: m.dev(),
            ino: m.ino(),
        },
    ))
}

/// Generates a new token for every role and writes `<runtime_dir>/<role>.token` (mode 0640 from
/// creation, no trailing newline, atomically replaced).
pub(super) fn write_tokens(
    runtime_dir: &Path,
    roles: &[RoleHandle],
) -> Result<Vec<(Arc<str>, Token)>, ServeError> {
    if !runtime_dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(runtime_dir)
            .map_err(|source| ServeError::RuntimeDir {
                path: runtime_dir.to_owned(),
                source,
            })?;
    }
    roles
        .iter()
        .map(|role| {
            let name: &str = &role.name;
            if name.is_empty() || name.starts_with('.') || name.contains(['/', '\0']) {
                return Err(ServeError::BadRoleName(name.to_owned()));
            }
            let token = Token::generate()?;
            let path = runtime_dir.join(format!("{name}.token"));
            write_atomic(&path, token.as_bytes(), 0o640).map_err(|source| {
                ServeError::TokenFile {
                    path: path.clone(),
                    source,
                }
            })?;
            Ok((role.name.clone(), token))
        })
        .collect()
}

/// Writes `data` to `path` through a temp file in the same directory created with `mode`,
/// fsynced, renamed over `path`, directory fsynced.
fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{file_name}.{}",
        hex(&random::<6>().map_err(io::Error::other)?)
    ));
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have narrowed the mode; set it exactly (never wider than `mode`).
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    fs::File::open(dir)?.sync_all()
}

pub(super) fn random<const N: usize>() -> Result<[u8; N], ServeError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| ServeError::Random(e.to_string()))?;
    Ok(b)
}

pub(super) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

impl Token {
    /// A fresh random token: 256 bits, lowercase hex.
    fn generate() -> Result<Token, ServeError> {
        let bytes = Zeroizing::new(random::<32>()?);
        Ok(Token(Zeroizing::new(hex(&*bytes))))
    }
}
