//! The local HTTP API (SPEC §4.1): container-credentials compatible, on a Unix socket and an
//! optional loopback TCP listener.
//!
//! [`bind`] creates the listeners (or takes them from systemd socket activation) and writes the
//! per-role token files; [`serve`] answers until its shutdown future resolves, then drains.
//!
//! The IMDSv2-compatible endpoint (SPEC §4.4, module `imds`) is one more listener of the same server:
//! the same accept loop, connection limit, header timeout and eviction of idle connections;
//! only the routes differ.
//!
//! Each connection is its own task running hyper's HTTP/1.1 server with keep-alive and
//! pipelining; the number of connections is bounded (connections over the limit are closed at
//! once), request heads are limited to 8 KiB and must arrive within `header_read_timeout`
//! (hyper starts that timer whenever the connection waits for a request head, so it also closes
//! idle keep-alive connections).

mod handler;
mod imds;
mod listen;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Semaphore, mpsc, watch};
use zeroize::Zeroizing;

pub use imds::ImdsConfig;
pub(crate) use listen::hex;
pub use listen::{Activation, TOKEN_DIRS, parse_listen_env};

use crate::metrics::Metrics;
use crate::peer::TcpPeer;
use crate::state::RoleHandle;

/// Largest request head accepted (hyper answers 431 above it).
pub const MAX_HEADER_BYTES: usize = 8192;

/// Where and how to serve.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Unix socket path (ignored when systemd passes a Unix socket).
    pub socket: PathBuf,
    /// Mode of the socket file, e.g. `0o660`.
    pub socket_mode: u32,
    /// Optional TCP listener: loopback, or a link-local address of SPEC §4.5 (ignored when
    /// systemd passes a TCP socket).
    pub listen: Option<SocketAddr>,
    /// Where `<role>.token` files and the `tokens/<role>/token` directories are written.
    pub runtime_dir: PathBuf,
    /// Longest a credentials request waits for a fetch under way (`timeout_seconds`).
    pub request_wait: Duration,
    /// Connections served at once; more are closed as soon as accepted.
    pub max_connections: usize,
    /// Longest wait for a complete request head, including idle time between keep-alive
    /// requests.
    pub header_read_timeout: Duration,
    /// On shutdown, how long requests under way may take to finish.
    pub shutdown_grace: Duration,
    /// The IMDSv2-compatible listener (`[serve.imds]`), if configured.
    pub imds: Option<ImdsConfig>,
}

impl ServeConfig {
    /// Defaults for everything but the paths: mode 0660, no TCP, 10 s request wait, 1024
    /// connections, 30 s header/idle timeout, 5 s shutdown grace.
    pub fn new(socket: PathBuf, runtime_dir: PathBuf) -> Self {
        ServeConfig {
            socket,
            socket_mode: 0o660,
            listen: None,
            runtime_dir,
            request_wait: Duration::from_secs(10),
            max_connections: 1024,
            header_read_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(5),
            imds: None,
        }
    }

    /// The `[serve]` section, `runtime_dir` and `timeout_seconds` of the agent configuration,
    /// with the default limits.
    pub fn from_config(config: &crate::config::Config) -> Self {
        ServeConfig {
            socket_mode: config.serve.socket_mode,
            listen: config.serve.listen,
            request_wait: config.timeout,
            imds: ImdsConfig::from_config(config),
            ..ServeConfig::new(config.serve.socket.clone(), config.runtime_dir.clone())
        }
    }

    fn limits(&self) -> Limits {
        Limits {
            max_connections: self.max_connections.max(1),
            header_read_timeout: self.header_read_timeout,
            shutdown_grace: self.shutdown_grace,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Limits {
    max_connections: usize,
    header_read_timeout: Duration,
    shutdown_grace: Duration,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// `listen` is neither loopback nor a link-local address of SPEC §4.5.
    #[error(
        "serve.listen = {0}: only loopback (127.0.0.1:PORT, [::1]:PORT) or the container \
         addresses 169.254.170.2, 169.254.170.23, [fd00:ec2::23] are allowed"
    )]
    NotLoopback(SocketAddr),
    /// `[serve.imds] listen` is neither loopback nor a link-local address of SPEC §4.5.
    #[error(
        "serve.imds.listen = {0}: only loopback or the link-local addresses 169.254.169.254, \
         [fd00:ec2::254], 169.254.170.2, 169.254.170.23, [fd00:ec2::23] are allowed"
    )]
    ImdsNotAllowed(SocketAddr),
    /// A link-local listen address is not configured on any interface of the host.
    #[error(
        "cannot listen on {0}: the address is not on this host; install the iotcred0 \
         dummy interface (systemd/iotcred0.netdev, iotcred0.network) and order iotcred after it"
    )]
    AddressMissing(SocketAddr),
    /// Binding a port below 1024 needs a privilege the agent does not have.
    #[error(
        "cannot listen on {0}: ports below 1024 need privilege, which the agent does not have; \
         use a port from 1024 up (it goes in the URL), or let systemd bind it (iotcred-tcp.socket)"
    )]
    PrivilegedPort(SocketAddr),
    /// Binding the TCP listener failed.
    #[error("cannot listen on {addr}: {source}; is another agent using the port?")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// Creating the Unix socket failed.
    #[error("cannot create socket {}: {source}; check serve.socket and its directory", path.display())]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Another process listens on the socket.
    #[error("socket {} is in use: another iotcred agent is running; stop it first", .0.display())]
    SocketInUse(PathBuf),
    /// The socket path exists and is not a socket.
    #[error("{} exists and is not a socket; remove it or change serve.socket", .0.display())]
    NotASocket(PathBuf),
    /// The runtime directory cannot be created.
    #[error("cannot create runtime directory {}: {source}; check runtime_dir", path.display())]
    RuntimeDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A token file cannot be written.
    #[error("cannot write token file {}: {source}; check runtime_dir", path.display())]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A role name cannot be used as a token file name.
    #[error("role name {0:?} cannot name a token file; use letters, digits, '-' and '_'")]
    BadRoleName(String),
    /// The IMDS listener cannot be bound.
    #[error(
        "cannot listen on serve.imds.listen = {addr}: {source}; is another process using the port?"
    )]
    ImdsListen {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The system random source failed.
    #[error("cannot read the system random source: {0}")]
    Random(String),
    /// Socket activation variables or descriptors are wrong.
    #[error("systemd socket activation: {0}")]
    Activation(#[from] ActivationError),
}

/// What is wrong with the sockets systemd passed (SPEC §7: the same listener rules hold).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ActivationError {
    /// `LISTEN_PID` is not a number.
    #[error("LISTEN_PID={0:?} is not a pid")]
    Pid(String),
    /// `LISTEN_FDS` is not a number.
    #[error("LISTEN_FDS={0:?} is not a descriptor count")]
    Count(String),
    /// `LISTEN_FDNAMES` does not name every descriptor.
    #[error("LISTEN_FDNAMES has {names} names for LISTEN_FDS={fds}")]
    Names {
        /// Names given.
        names: usize,
        /// Descriptors passed.
        fds: u16,
    },
    /// A passed descriptor is not open.
    #[error("fd {fd} from LISTEN_FDS is not open: {source}")]
    NotOpen {
        /// The descriptor.
        fd: i32,
        /// Why.
        source: std::io::Error,
    },
    /// A passed socket cannot be inspected or used.
    #[error("socket {label}: {source}")]
    Socket {
        /// Its name (`LISTEN_FDNAMES`) or `unnamed`, and descriptor.
        label: String,
        /// Why.
        source: std::io::Error,
    },
    /// More sockets, or other kinds, than one Unix and one TCP listener.
    #[error(
        "socket {0}: expected at most one Unix and one TCP listening socket; fix ListenStream= in iotcred.socket"
    )]
    Unexpected(String),
}

/// A role's bearer token for the TCP listener. `Debug` never shows it; zeroized on drop.
pub struct Token(Zeroizing<String>);

impl Token {
    /// The token text (as written to the token file).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(***)")
    }
}

/// Bound listeners and the tokens written for this start, ready for [`serve`].
#[derive(Debug)]
pub struct Listeners {
    unix: Option<UnixListener>,
    tcp: Option<TcpListener>,
    /// One per role passed to [`bind`].
    tokens: Vec<(Arc<str>, Token)>,
    created_socket: Option<listen::SocketId>,
    limits: Limits,
    imds: Option<(TcpListener, Arc<imds::Imds>)>,
}

impl Listeners {
    /// Address of the TCP listener, if any (useful with port 0).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Address of the IMDS listener, if any.
    pub fn imds_addr(&self) -> Option<SocketAddr> {
        self.imds.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// Whether a Unix socket listener is present.
    pub fn has_unix(&self) -> bool {
        self.unix.is_some()
    }

    /// The token generated for `role` at this start (also in `<runtime_dir>/<role>.token`).
    pub fn token(&self, role: &str) -> Option<&Token> {
        self.tokens
            .iter()
            .find(|(name, _)| &**name == role)
            .map(|(_, t)| t)
    }
}

/// What the handlers read: the roles (first = default) with their tokens, and the metrics.
/// The role set can be replaced on reload ([`ServerState::set_roles`]).
#[derive(Debug)]
pub struct ServerState {
    table: RwLock<Arc<RoleTable>>,
    metrics: Arc<Metrics>,
    lifecycle: std::sync::OnceLock<Lifecycle>,
    request_wait: Duration,
    runtime_dir: PathBuf,
}

/// The roles served, each with its TCP token (`None` until [`serve`] installs the tokens
/// [`bind`] wrote).
#[derive(Debug, Default)]
struct RoleTable {
    roles: Box<[RoleHandle]>,
    tokens: Box<[Option<Arc<Token>>]>,
}

impl ServerState {
    /// State for these roles (the first is the default role of `/v1/credentials`);
    /// `request_wait` and `runtime_dir` come from `cfg`.
    pub fn new(roles: Vec<RoleHandle>, metrics: Arc<Metrics>, cfg: &ServeConfig) -> Arc<Self> {
        let tokens = vec![None; roles.len()].into_boxed_slice();
        Arc::new(ServerState {
            table: RwLock::new(Arc::new(RoleTable {
                roles: roles.into_boxed_slice(),
                tokens,
            })),
            metrics,
            lifecycle: std::sync::OnceLock::new(),
            request_wait: cfg.request_wait,
            runtime_dir: cfg.runtime_dir.clone(),
        })
    }

    /// The served roles.
    pub fn roles(&self) -> Vec<RoleHandle> {
        self.table().roles.to_vec()
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Connects the identity's status (health, metrics) and the queue of provisioning and
    /// rotation requests (the Unix socket's `POST /v1/identity/…`). Set once.
    pub fn set_lifecycle(&self, lifecycle: Lifecycle) {
        let _ = self.lifecycle.set(lifecycle);
    }

    fn lifecycle(&self) -> Option<&Lifecycle> {
        self.lifecycle.get()
    }

    /// Replaces the served roles (configuration reload). Roles that stay keep their token; a
    /// new role gets a token file (a valid one left on disk is kept); the token files of a
    /// removed role are deleted (its `tokens/<role>/` directory stays, empty, so a bind mount
    /// of it sees the new token if the role comes back).
    pub fn set_roles(&self, roles: Vec<RoleHandle>) {
        let old = self.table();
        let tokens = roles
            .iter()
            .map(|r| {
                // A role that stays keeps its token (or, before `serve` installed the tokens
                // `bind` wrote, gets it then).
                if let Some(i) = old.roles.iter().position(|o| o.name == r.name) {
                    return old.tokens[i].clone();
                }
                match listen::write_tokens(&self.runtime_dir, std::slice::from_ref(r)) {
                    Ok(mut t) => t.pop().map(|(_, t)| Arc::new(t)),
                    Err(e) => {
                        tracing::error!(role = %r.name, "{e}");
                        None
                    }
                }
            })
            .collect();
        for o in old.roles.iter() {
            if !roles.iter().any(|r| r.name == o.name) {
                listen::remove_token(&self.runtime_dir, &o.name);
            }
        }
        self.replace(RoleTable {
            roles: roles.into_boxed_slice(),
            tokens,
        });
    }

    /// Installs the tokens written by [`bind`], by role name.
    fn adopt_tokens(&self, tokens: Vec<(Arc<str>, Token)>) {
        let old = self.table();
        let mut tokens: Vec<_> = tokens.into_iter().map(|(n, t)| (n, Arc::new(t))).collect();
        let aligned = old
            .roles
            .iter()
            .zip(old.tokens.iter())
            .map(|(r, existing)| {
                if existing.is_some() {
                    return existing.clone();
                }
                let i = tokens.iter().position(|(name, _)| *name == r.name)?;
                Some(tokens.swap_remove(i).1)
            })
            .collect();
        self.replace(RoleTable {
            roles: old.roles.clone(),
            tokens: aligned,
        });
    }

    fn table(&self) -> Arc<RoleTable> {
        match self.table.read() {
            Ok(t) => t.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn replace(&self, table: RoleTable) {
        let table = Arc::new(table);
        match self.table.write() {
            Ok(mut t) => *t = table,
            Err(poisoned) => *poisoned.into_inner() = table,
        }
    }
}

/// Binds the listeners and writes the token files. Socket activation (from the environment)
/// takes precedence over binding: a passed Unix socket replaces `socket`, a passed TCP socket
/// replaces `listen`.
pub async fn bind(cfg: &ServeConfig, roles: &[RoleHandle]) -> Result<Listeners, ServeError> {
    let activation = Activation::from_env()?;
    bind_with_activation(cfg, roles, activation).await
}

/// [`bind`] with explicit socket activation instead of reading the environment.
pub async fn bind_with_activation(
    cfg: &ServeConfig,
    roles: &[RoleHandle],
    activation: Option<Activation>,
) -> Result<Listeners, ServeError> {
    let imds = match &cfg.imds {
        Some(c) => Some(imds::bind(c).await?),
        None => None,
    };
    let mut listeners = listen::bind_with(cfg, roles, activation).await?;
    listeners.imds = imds;
    Ok(listeners)
}

/// The identity's status and the daemon's queue of identity jobs.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    /// What health and metrics show.
    pub status: crate::lifecycle::Status,
    /// Where `POST /v1/identity/provision|rotate` sends its job.
    pub jobs: tokio::sync::mpsc::Sender<IdentityJob>,
}

/// A provisioning or rotation asked for over the Unix socket.
#[derive(Debug)]
pub struct IdentityJob {
    /// Which.
    pub kind: JobKind,
    /// Where the result goes: the exit code of SPEC §5 and the lines to print.
    pub reply: Option<tokio::sync::oneshot::Sender<(crate::exit::Exit, String)>>,
}

/// What an identity job does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobKind {
    /// `iotcred provision`.
    Provision,
    /// `iotcred rotate [--force]`.
    Rotate {
        /// Even if not due.
        force: bool,
    },
}

/// Per-connection context shared by all connections.
struct Shared {
    state: Arc<ServerState>,
    http: http1::Builder,
    imds: Option<Arc<imds::Imds>>,
}

/// Open connections in accept order, so that a full server can close the oldest connection
/// that has no request in progress (an idle keep-alive or a slow, unfinished request head)
/// to make room for a new client: a flood of idle connections cannot lock legitimate clients
/// out.
#[derive(Default)]
struct ConnRegistry {
    next_id: std::sync::atomic::AtomicU64,
    conns: std::sync::Mutex<std::collections::VecDeque<ConnSlot>>,
}

struct ConnSlot {
    id: u64,
    busy: Arc<std::sync::atomic::AtomicUsize>,
    evict: Arc<tokio::sync::Notify>,
}

impl ConnRegistry {
    fn register(
        &self,
    ) -> (
        u64,
        Arc<std::sync::atomic::AtomicUsize>,
        Arc<tokio::sync::Notify>,
    ) {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let busy = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let evict = Arc::new(tokio::sync::Notify::new());
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(ConnSlot {
                id,
                busy: busy.clone(),
                evict: evict.clone(),
            });
        (id, busy, evict)
    }

    fn remove(&self, id: u64) {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = conns.iter().position(|c| c.id == id) {
            conns.remove(i);
        }
    }

    /// Asks the oldest connection without a request in progress to close; false if every
    /// connection is busy.
    fn evict_oldest_idle(&self) -> bool {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let Some(i) = conns
            .iter()
            .position(|c| c.busy.load(std::sync::atomic::Ordering::Acquire) == 0)
        else {
            return false;
        };
        if let Some(slot) = conns.remove(i) {
            slot.evict.notify_one();
        }
        true
    }
}

/// Decrements a connection's in-progress request count when a request is done.
struct BusyGuard(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Release);
    }
}

/// How long a new connection waits for the slot of an evicted idle one.
const EVICTION_WAIT: Duration = Duration::from_millis(500);

/// Drain phases broadcast to connection tasks.
const RUNNING: u8 = 0;
const DRAINING: u8 = 1;
const ABORT: u8 = 2;

/// Answers requests until `shutdown` resolves; then stops accepting, lets requests under way
/// finish (up to the configured grace), closes every connection, removes the socket file it
/// created, and returns.
pub async fn serve(
    listeners: Listeners,
    state: Arc<ServerState>,
    shutdown: impl Future<Output = ()>,
) {
    let Listeners {
        unix,
        tcp,
        tokens,
        created_socket,
        limits,
        imds,
    } = listeners;
    let (imds_listener, imds) = match imds {
        Some((l, i)) => (Some(l), Some(i)),
        None => (None, None),
    };
    let hop_limit = imds.as_ref().map(|i| i.hop_limit());

    state.adopt_tokens(tokens);

    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_HEADER_BYTES)
        .keep_alive(true)
        .pipeline_flush(true);
    let shared = Arc::new(Shared {
        state: state.clone(),
        http,
        imds,
    });

    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let registry = Arc::new(ConnRegistry::default());
    let (drain_tx, drain_rx) = watch::channel(RUNNING);
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let metrics = state.metrics.clone();

    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            biased;
            () = &mut shutdown => break,
            r = accept_unix(unix.as_ref()) => r.map(|(s, peer)| Conn::Unix(s, peer)),
            r = accept_tcp(tcp.as_ref(), None) => r.map(|(s, p)| Conn::Tcp(s, p)),
            r = accept_tcp(imds_listener.as_ref(), hop_limit) => r.map(|(s, p)| Conn::Imds(s, p)),
        };
        let conn = match accepted {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors or similar: back off briefly instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) if registry.evict_oldest_idle() => {
                match tokio::time::timeout(EVICTION_WAIT, slots.clone().acquire_owned()).await {
                    Ok(Ok(p)) => p,
                    _ => {
                        metrics.connection_rejected();
                        drop(conn);
                        continue;
                    }
                }
            }
            Err(_) => {
                metrics.connection_rejected();
                drop(conn);
                continue;
            }
        };
        metrics.connection_opened();
        let shared = shared.clone();
        let drain = drain_rx.clone();
        let done = done_tx.clone();
        let registry = registry.clone();
        let (id, busy, evict) = registry.register();
        tokio::spawn(async move {
            let _permit = permit;
            let _done = done;
            let _open = OpenGuard(&shared.state.metrics);
            let conn_task = async {
                match conn {
                    Conn::Unix(s, peer) => run_connection(&shared, s, peer, drain, busy).await,
                    Conn::Tcp(s, peer) => {
                        run_connection(&shared, s, handler::Peer::Tcp(peer), drain, busy).await
                    }
                    Conn::Imds(s, peer) => {
                        run_connection(&shared, s, handler::Peer::Imds(peer), drain, busy).await
                    }
                }
            };
            tokio::select! {
                () = conn_task => {}
                () = evict.notified() => {}
            }
            registry.remove(id);
        });
    }

    // Stop accepting; close listeners so new clients are refused at once.
    drop(unix);
    drop(tcp);
    drop(imds_listener);
    let _ = drain_tx.send(DRAINING);
    drop(done_tx);
    if tokio::time::timeout(limits.shutdown_grace, done_rx.recv())
        .await
        .is_err()
    {
        let _ = drain_tx.send(ABORT);
        let _ = done_rx.recv().await;
    }
    if let Some(id) = created_socket {
        id.remove();
    }
}

enum Conn {
    Unix(tokio::net::UnixStream, handler::Peer),
    Tcp(tokio::net::TcpStream, Arc<TcpPeer>),
    Imds(tokio::net::TcpStream, Arc<TcpPeer>),
}

struct OpenGuard<'a>(&'a Metrics);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.connection_closed();
    }
}

async fn accept_unix(
    l: Option<&UnixListener>,
) -> std::io::Result<(tokio::net::UnixStream, handler::Peer)> {
    match l {
        Some(l) => {
            let (s, _) = l.accept().await?;
            let peer = match s.peer_cred() {
                Ok(c) => handler::Peer::Unix {
                    uid: Some(c.uid()),
                    gid: Some(c.gid()),
                },
                Err(_) => handler::Peer::Unix {
                    uid: None,
                    gid: None,
                },
            };
            Ok((s, peer))
        }
        None => std::future::pending().await,
    }
}

/// Accepts a TCP connection, with `TCP_NODELAY` and (IMDS) the hop limit set, and its
/// addresses for the peer uid lookup of §4.6 (made later, only when a request needs it).
async fn accept_tcp(
    l: Option<&TcpListener>,
    hop_limit: Option<u8>,
) -> std::io::Result<(tokio::net::TcpStream, Arc<TcpPeer>)> {
    match l {
        Some(l) => {
            let (s, remote) = l.accept().await?;
            let _ = s.set_nodelay(true);
            if let Some(h) = hop_limit {
                imds::set_hop_limit(&s, remote.is_ipv4(), h)?;
            }
            let local = s.local_addr()?;
            Ok((s, Arc::new(TcpPeer::new(local, remote))))
        }
        None => std::future::pending().await,
    }
}

async fn run_connection<S>(
    shared: &Arc<Shared>,
    stream: S,
    peer: handler::Peer,
    mut drain: watch::Receiver<u8>,
    busy: Arc<std::sync::atomic::AtomicUsize>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc_shared = shared.clone();
    let cache = Arc::new(handler::BodyCache::default());
    let svc = hyper::service::service_fn(move |req| {
        let shared = svc_shared.clone();
        let cache = cache.clone();
        let peer = peer.clone();
        busy.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let guard = BusyGuard(busy.clone());
        async move {
            let _guard = guard;
            Ok::<_, std::convert::Infallible>(handler::handle(&shared, &peer, &cache, req).await)
        }
    });
    let conn = shared.http.serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = drain.wait_for(|&p| p >= DRAINING) => {}
    }
    conn.as_mut().graceful_shutdown();
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = drain.wait_for(|&p| p >= ABORT) => {}
    }
}
