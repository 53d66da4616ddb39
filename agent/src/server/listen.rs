//! Creating the listeners: the Unix socket (with its final mode from the start), the optional
//! TCP listener (loopback or a link-local address of SPEC §4.5), systemd socket activation,
//! and the per-role token files.

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

use super::{ActivationError, Listeners, ServeConfig, ServeError, Token};
use crate::config::Listener;
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
                return Err(ActivationError::NotOpen {
                    fd,
                    source: io::Error::last_os_error(),
                }
                .into());
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
        .map_err(|_| ActivationError::Pid(pid.to_owned()))?;
    if pid != my_pid {
        return Ok(None);
    }
    let n: u16 = n
        .trim()
        .parse()
        .map_err(|_| ActivationError::Count(n.to_owned()))?;
    let names: Vec<Option<String>> = match listen_fdnames {
        Some(s) if !s.is_empty() => s.split(':').map(|x| Some(x.to_owned())).collect(),
        _ => vec![None; usize::from(n)],
    };
    if names.len() != usize::from(n) {
        return Err(ActivationError::Names {
            names: names.len(),
            fds: n,
        }
        .into());
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
        check_listen(addr)?;
    }
    let mut unix = None;
    let mut tcp = None;
    for (fd, name) in activation.map(|a| a.fds).unwrap_or_default() {
        let label = name.as_deref().unwrap_or("unnamed").to_owned();
        let described = format!("{label} (fd {})", fd.as_raw_fd());
        let socket_error = |source| ActivationError::Socket {
            label: described.clone(),
            source,
        };
        match classify(&fd).map_err(&socket_error)? {
            Kind::Unix if unix.is_none() => {
                let l = std::os::unix::net::UnixListener::from(fd);
                l.set_nonblocking(true).map_err(&socket_error)?;
                unix = Some(UnixListener::from_std(l).map_err(&socket_error)?);
            }
            Kind::Tcp if tcp.is_none() => {
                let l = std::net::TcpListener::from(fd);
                let addr = l.local_addr().map_err(&socket_error)?;
                check_listen(addr)?;
                l.set_nonblocking(true).map_err(&socket_error)?;
                tcp = Some(TcpListener::from_std(l).map_err(&socket_error)?);
            }
            _ => {
                return Err(ActivationError::Unexpected(label).into());
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
            tcp = Some(TcpListener::bind(addr).await.map_err(|source| {
                bind_error(addr, source, |source| ServeError::Listen { addr, source })
            })?);
        }
    }

    let tokens = write_tokens(&cfg.runtime_dir, roles)?;
    prune_tokens(&cfg.runtime_dir, roles);
    Ok(Listeners {
        unix,
        tcp,
        tokens,
        created_socket,
        limits: cfg.limits(),
        imds: None,
    })
}

/// What a failed bind of `addr` means for the user: a link-local address that no interface
/// carries, a privileged port, or else `other`.
pub(super) fn bind_error(
    addr: SocketAddr,
    source: io::Error,
    other: impl FnOnce(io::Error) -> ServeError,
) -> ServeError {
    if source.kind() == io::ErrorKind::AddrNotAvailable && !addr.ip().is_loopback() {
        ServeError::AddressMissing(addr)
    } else if source.kind() == io::ErrorKind::PermissionDenied && addr.port() < 1024 {
        ServeError::PrivilegedPort(addr)
    } else {
        other(source)
    }
}

/// Refuses (again, after the configuration did) any address but loopback and the link-local
/// addresses of §4.5; also applied to a TCP socket passed by systemd.
fn check_listen(addr: SocketAddr) -> Result<(), ServeError> {
    if Listener::Credentials.allows(addr.ip()) {
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

/// Name of the directory under `runtime_dir` that holds one directory per role, each holding
/// only `token` (SPEC §4.5: meant to be bind-mounted into containers).
pub const TOKEN_DIRS: &str = "tokens";

/// Mode of the token files.
const TOKEN_FILE_MODE: u32 = 0o640;
/// Mode of `tokens/` and `tokens/<role>/` (group: the agent's, `iotcred` under systemd).
const TOKEN_DIR_MODE: u32 = 0o750;
/// Length of a token as [`Token::generate`] makes it (256 bits as lowercase hex).
const TOKEN_LEN: usize = 64;

/// Writes every role's token to `<runtime_dir>/<role>.token` and
/// `<runtime_dir>/tokens/<role>/token` (mode 0640 from creation, no trailing newline, each
/// atomically replaced). The token is the one already on disk when that is valid (see
/// [`read_token`]; the `tokens/` copy first, then `<role>.token`), else a new random one, so a
/// restart does not break running apps and containers.
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
        .map(|role| Ok((role.name.clone(), role_token(runtime_dir, &role.name)?)))
        .collect()
}

/// The token of role `name`: kept from disk when valid, else new; written to both files.
fn role_token(runtime_dir: &Path, name: &str) -> Result<Token, ServeError> {
    if name.is_empty() || name.starts_with('.') || name.contains(['/', '\0']) {
        return Err(ServeError::BadRoleName(name.to_owned()));
    }
    let dirs = runtime_dir.join(TOKEN_DIRS);
    let dir = dirs.join(name);
    for d in [&dirs, &dir] {
        private_dir(d).map_err(|source| ServeError::TokenFile {
            path: d.clone(),
            source,
        })?;
    }
    let mounted = dir.join("token");
    let flat = runtime_dir.join(format!("{name}.token"));
    let kept = [&mounted, &flat]
        .into_iter()
        .find_map(|path| match read_token(path) {
            Ok(token) => Some(token),
            Err(TokenRejected::Missing) => None,
            Err(why) => {
                tracing::info!(
                    role = name,
                    "token file {} {why}; not reusing it",
                    path.display()
                );
                None
            }
        });
    let token = match kept {
        Some(t) => t,
        None => Token::generate()?,
    };
    for path in [&mounted, &flat] {
        write_atomic(path, token.as_bytes(), TOKEN_FILE_MODE).map_err(|source| {
            ServeError::TokenFile {
                path: path.clone(),
                source,
            }
        })?;
    }
    Ok(token)
}

/// Deletes the token files of roles that are no longer configured: `<name>.token` for every
/// `tokens/<name>/` directory whose role is not in `roles`, and that directory's `token`. The
/// directories themselves stay (empty), so a container's bind mount of one sees the token again
/// if the role comes back. Best effort: failures are logged.
pub(super) fn prune_tokens(runtime_dir: &Path, roles: &[RoleHandle]) {
    prune_tokens_except(runtime_dir, |name| roles.iter().any(|r| &*r.name == name));
}

fn prune_tokens_except(runtime_dir: &Path, keep: impl Fn(&str) -> bool) {
    let Ok(entries) = fs::read_dir(runtime_dir.join(TOKEN_DIRS)) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') || keep(name) {
            continue;
        }
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_token(runtime_dir, name);
        }
    }
}

/// Deletes both token files of role `name` (keeping its `tokens/<name>/` directory).
pub(super) fn remove_token(runtime_dir: &Path, name: &str) {
    for path in [
        runtime_dir.join(TOKEN_DIRS).join(name).join("token"),
        runtime_dir.join(format!("{name}.token")),
    ] {
        match fs::remove_file(&path) {
            Ok(()) => tracing::info!(role = name, "removed token file {}", path.display()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(
                role = name,
                "cannot remove token file {}: {e}",
                path.display()
            ),
        }
    }
}

/// Creates `dir` (one level) with mode 0750, or checks an existing one is a directory (not a
/// symlink) and sets its mode to 0750.
fn private_dir(dir: &Path) -> io::Result<()> {
    match fs::DirBuilder::new().mode(TOKEN_DIR_MODE).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            if !fs::symlink_metadata(dir)?.is_dir() {
                return Err(io::Error::other("exists and is not a directory"));
            }
        }
        Err(e) => return Err(e),
    }
    // The umask (0077 under systemd) narrowed the creation mode; widen to exactly 0750.
    fs::set_permissions(dir, fs::Permissions::from_mode(TOKEN_DIR_MODE))
}

/// Why a token file on disk is not reused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(super) enum TokenRejected {
    /// There is no such file.
    #[error("does not exist")]
    Missing,
    /// It cannot be opened or read (or is a symlink).
    #[error("cannot be read ({0})")]
    Unreadable(io::ErrorKind),
    /// Not a regular file.
    #[error("is not a regular file")]
    NotAFile,
    /// Owned by another user than the agent.
    #[error("is owned by another user")]
    Owner,
    /// Readable or writable beyond owner read-write, group read.
    #[error("has a mode wider than 0640")]
    Mode,
    /// Not a token the agent makes (length or characters).
    #[error("does not hold a valid token")]
    Format,
}

/// Reads a token file left by an earlier run. It is reused only when it is a regular file (not
/// a symlink) owned by the agent's user, with no permission beyond 0640, holding exactly 64
/// lowercase hex digits (no newline): what the agent writes. Anything else may have been
/// tampered with or exposed, and is replaced by a new token.
pub(super) fn read_token(path: &Path) -> Result<Token, TokenRejected> {
    use std::io::Read as _;
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => TokenRejected::Missing,
            k => TokenRejected::Unreadable(k),
        })?;
    let meta = f
        .metadata()
        .map_err(|e| TokenRejected::Unreadable(e.kind()))?;
    if !meta.file_type().is_file() {
        return Err(TokenRejected::NotAFile);
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if meta.uid() != unsafe { libc::geteuid() } {
        return Err(TokenRejected::Owner);
    }
    if meta.mode() & 0o7777 & !TOKEN_FILE_MODE != 0 {
        return Err(TokenRejected::Mode);
    }
    if meta.len() != TOKEN_LEN as u64 {
        return Err(TokenRejected::Format);
    }
    let mut text = Zeroizing::new(String::with_capacity(TOKEN_LEN + 1));
    f.take(TOKEN_LEN as u64 + 1)
        .read_to_string(&mut text)
        .map_err(|e| match e.kind() {
            io::ErrorKind::InvalidData => TokenRejected::Format,
            k => TokenRejected::Unreadable(k),
        })?;
    if !valid_token_text(&text) {
        return Err(TokenRejected::Format);
    }
    Ok(Token(text))
}

/// Exactly what [`Token::generate`] makes: 64 lowercase hex digits.
fn valid_token_text(text: &str) -> bool {
    text.len() == TOKEN_LEN
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
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

pub(crate) fn hex(bytes: &[u8]) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn both_token_files_hold_one_value_with_final_modes() {
        let d = tempfile::tempdir().unwrap();
        let run = d.path();
        let t = role_token(run, "default").unwrap();
        assert!(valid_token_text(t.as_str()));
        let flat = run.join("default.token");
        let mounted = run.join("tokens/default/token");
        assert_eq!(fs::read_to_string(&flat).unwrap(), t.as_str());
        assert_eq!(fs::read_to_string(&mounted).unwrap(), t.as_str());
        assert_eq!(mode_of(&flat), 0o640);
        assert_eq!(mode_of(&mounted), 0o640);
        assert_eq!(mode_of(&run.join("tokens")), 0o750);
        assert_eq!(mode_of(&run.join("tokens/default")), 0o750);
        // The role's directory holds only `token` (no temp file left).
        assert_eq!(files(&run.join("tokens/default")), ["token"]);
    }

    #[test]
    fn a_valid_token_is_kept_and_rewritten_to_both_paths() {
        let d = tempfile::tempdir().unwrap();
        let run = d.path();
        let first = role_token(run, "r").unwrap().as_str().to_owned();
        let again = role_token(run, "r").unwrap();
        assert_eq!(again.as_str(), first, "kept across restarts");

        // Only the flat file left (e.g. an earlier version of the agent): kept, and the
        // mounted copy is written with it.
        fs::remove_file(run.join("tokens/r/token")).unwrap();
        assert_eq!(role_token(run, "r").unwrap().as_str(), first);
        assert_eq!(
            fs::read_to_string(run.join("tokens/r/token")).unwrap(),
            first
        );

        // The mounted copy wins when the two differ (containers cannot be told of a change).
        let other = "0123456789abcdef".repeat(4);
        write_atomic(&run.join("tokens/r/token"), other.as_bytes(), 0o640).unwrap();
        assert_eq!(role_token(run, "r").unwrap().as_str(), other);
        assert_eq!(fs::read_to_string(run.join("r.token")).unwrap(), other);

        // A narrower mode (0600, 0400) is fine, and is reset to 0640.
        fs::set_permissions(run.join("r.token"), fs::Permissions::from_mode(0o400)).unwrap();
        fs::set_permissions(
            run.join("tokens/r/token"),
            fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        assert_eq!(role_token(run, "r").unwrap().as_str(), other);
        assert_eq!(mode_of(&run.join("r.token")), 0o640);
        assert_eq!(mode_of(&run.join("tokens/r/token")), 0o640);
    }

    #[test]
    fn an_invalid_token_file_is_replaced() {
        let d = tempfile::tempdir().unwrap();
        let run = d.path();
        let good = "0123456789abcdef".repeat(4);
        let cases: Vec<(&str, Vec<u8>, u32, TokenRejected)> = vec![
            (
                "short",
                b"0123456789abcdef".to_vec(),
                0o640,
                TokenRejected::Format,
            ),
            (
                "newline",
                format!("{good}\n").into(),
                0o640,
                TokenRejected::Format,
            ),
            (
                "upper",
                good.to_uppercase().into(),
                0o640,
                TokenRejected::Format,
            ),
            (
                "not-hex",
                "g".repeat(64).into(),
                0o640,
                TokenRejected::Format,
            ),
            ("empty", Vec::new(), 0o640, TokenRejected::Format),
            (
                "world-readable",
                good.clone().into(),
                0o644,
                TokenRejected::Mode,
            ),
            (
                "group-writable",
                good.clone().into(),
                0o660,
                TokenRejected::Mode,
            ),
        ];
        for (name, data, mode, why) in &cases {
            let dir = run.join(TOKEN_DIRS).join(name);
            fs::create_dir_all(&dir).unwrap();
            for p in [dir.join("token"), run.join(format!("{name}.token"))] {
                write_atomic(&p, data, *mode).unwrap();
                assert_eq!(read_token(&p).unwrap_err(), *why, "{name}");
            }
            let t = role_token(run, name).unwrap();
            assert_ne!(t.as_str().as_bytes(), &data[..], "{name}");
            assert!(valid_token_text(t.as_str()), "{name}");
            assert_eq!(read_token(&dir.join("token")).unwrap().as_str(), t.as_str());
        }

        // Owned by another user: as root the test can make one.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            let p = run.join("owner.token");
            write_atomic(&p, good.as_bytes(), 0o640).unwrap();
            std::os::unix::fs::chown(&p, Some(1), None).unwrap();
            assert_eq!(read_token(&p).unwrap_err(), TokenRejected::Owner);
        }

        // A symlink is never followed (even to a valid token), a directory is not a file.
        let target = run.join("elsewhere");
        write_atomic(&target, good.as_bytes(), 0o640).unwrap();
        let link = run.join("link.token");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(matches!(
            read_token(&link),
            Err(TokenRejected::Unreadable(_))
        ));
        fs::create_dir(run.join("dir.token")).unwrap();
        assert!(read_token(&run.join("dir.token")).is_err());
        assert_eq!(
            read_token(&run.join("missing.token")).unwrap_err(),
            TokenRejected::Missing
        );
        let t = role_token(run, "link").unwrap();
        assert_ne!(t.as_str(), good);
        assert_eq!(
            fs::read_to_string(&target).unwrap(),
            good,
            "target untouched"
        );
        assert!(!fs::symlink_metadata(&link).unwrap().is_symlink());
    }

    #[test]
    fn bad_role_names_and_a_file_in_place_of_the_directory() {
        let d = tempfile::tempdir().unwrap();
        let run = d.path();
        for bad in ["", ".hidden", "a/b", "..", "a\0b"] {
            assert!(matches!(
                role_token(run, bad),
                Err(ServeError::BadRoleName(_))
            ));
        }
        fs::create_dir_all(run.join(TOKEN_DIRS)).unwrap();
        fs::write(run.join("tokens/x"), b"").unwrap();
        assert!(matches!(
            role_token(run, "x"),
            Err(ServeError::TokenFile { .. })
        ));
    }

    #[test]
    fn pruning_removes_token_files_of_other_roles_and_keeps_their_directories() {
        let d = tempfile::tempdir().unwrap();
        let run = d.path();
        let kept = role_token(run, "kept").unwrap().as_str().to_owned();
        let gone = role_token(run, "gone").unwrap().as_str().to_owned();
        fs::write(run.join("unrelated.token"), b"not ours").unwrap();
        prune_tokens_except(run, |n| n == "kept");
        assert_eq!(fs::read_to_string(run.join("kept.token")).unwrap(), kept);
        assert!(run.join("tokens/kept/token").exists());
        assert!(!run.join("gone.token").exists());
        assert!(!run.join("tokens/gone/token").exists());
        assert!(
            run.join("tokens/gone").is_dir(),
            "directory stays for bind mounts"
        );
        assert!(
            run.join("unrelated.token").exists(),
            "no tokens/ dir: not ours"
        );
        // The role comes back: a new token, in the same directory.
        let back = role_token(run, "gone").unwrap();
        assert_ne!(back.as_str(), gone);
        assert_eq!(
            fs::read_to_string(run.join("tokens/gone/token")).unwrap(),
            back.as_str()
        );
    }
}
