//! The fake AWS IoT credentials provider (SPEC §2) with switchable faults.
//!
//! ```no_run
//! # async fn demo() -> Result<(), iotcred_tests::Error> {
//! use iotcred_tests::{FakeProvider, Fault, Pki};
//! let (_dir, pki) = Pki::generate_temp("gateway-0042")?;
//! let provider = FakeProvider::start(pki.provider_config()).await?;
//! provider.push_fault(Fault::status_retry_after(503, 2)); // next request only
//! // … point the agent at provider.addr() with pki.device_ec and pki.ca_cert …
//! let issued = provider.issued();
//! provider.shutdown().await;
//! # let _ = issued; Ok(()) }
//! ```

mod admin;
mod conn;
mod http;

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::ops::Deref;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_std::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// Errors starting the provider or generating a PKI.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The TLS configuration could not be built.
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// Invalid configuration or input.
    #[error("{0}")]
    Config(String),
}

impl Error {
    pub(crate) fn io(context: String, source: io::Error) -> Self {
        Error::Io { context, source }
    }
}

/// Which TLS versions the provider accepts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TlsVersions {
    /// TLS 1.2 and TLS 1.3 (like the real endpoint).
    #[default]
    Both,
    /// TLS 1.2 only.
    Tls12Only,
    /// TLS 1.3 only.
    Tls13Only,
}

/// How to start a [`FakeProvider`].
#[derive(Clone, Debug)]
pub struct ProviderConfig {
    /// TLS listener; loopback only. Default `127.0.0.1:0` (an ephemeral port).
    pub listen: SocketAddr,
    /// Optional plain-HTTP admin listener (loopback only), see the crate docs. Default none.
    pub admin: Option<SocketAddr>,
    /// CA certificates (PEM) that client certificates must chain to.
    pub client_ca: PathBuf,
    /// Server certificate chain (PEM, leaf first).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// Known role aliases; any other alias gets 404. Default `["GatewayRole"]`.
    pub aliases: Vec<String>,
    /// Lifetime of issued credentials when the request names no duration. Default 3600 s.
    pub ttl: Duration,
    /// Whether a request without `x-amzn-iot-thingname` is served (it gets 400 otherwise).
    /// Default false.
    pub allow_missing_thing_name: bool,
    /// TLS versions offered. Default both.
    pub tls_versions: TlsVersions,
    /// Whether connections are kept open between requests. When false every response carries
    /// `Connection: close` and the connection is closed after it, so each exchange needs a new
    /// TLS handshake. Default true.
    pub keep_alive: bool,
    /// Whether TLS sessions can be resumed (TLS 1.2 session ids, TLS 1.3 tickets). When false
    /// every handshake is a full one, in which the client proves its key again (a signature).
    /// Default true.
    pub resumption: bool,
    /// When set, a client certificate gets credentials only while the fake AWS IoT's registry
    /// has it ACTIVE and attached to the thing named in `x-amzn-iot-thingname` (otherwise 403,
    /// `{"message":"Access Denied"}` or `{"message":"Invalid thing name passed"}`), instead of
    /// the default check (thing name = the certificate's CN). Default none.
    pub registry: Option<std::sync::Arc<crate::fakeiot::Registry>>,
}

impl ProviderConfig {
    /// A configuration with the defaults documented on each field.
    pub fn new(
        client_ca: impl Into<PathBuf>,
        cert: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
    ) -> Self {
        ProviderConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin: None,
            client_ca: client_ca.into(),
            cert: cert.into(),
            key: key.into(),
            aliases: vec!["GatewayRole".to_owned()],
            ttl: Duration::from_secs(3600),
            allow_missing_thing_name: false,
            tls_versions: TlsVersions::Both,
            keep_alive: true,
            resumption: true,
            registry: None,
        }
    }
}

/// A misbehaviour, applied to one request ([`ProviderHandle::push_fault`]) or to every request
/// ([`ProviderHandle::set_fault`]).
///
/// *Failures* (everything but the four modifiers) decide what happens to the response; at most
/// one applies to a request — a one-shot failure wins over a persistent one. *Modifiers*
/// ([`Fault::DateSkew`], [`Fault::NoDate`], [`Fault::Chunked`], [`Fault::Ttl`]) change how a
/// response is made and combine with a failure and with each other.
///
/// JSON form (admin listener): `{"kind":"status","status":503,"retry_after":"2"}`,
/// `{"kind":"slow_body","delay_ms":1500}`, `{"kind":"date_skew","seconds":-7200}`, …
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(crate = "serde_std", tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Fault {
    /// Answer with this status and a `{"message":"…"}` body (400, 403, 404, 429, 500, 503, …),
    /// with a `Retry-After` header when given (seconds, or an HTTP date, verbatim).
    Status {
        /// HTTP status code.
        status: u16,
        /// `Retry-After` header value.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after: Option<String>,
        /// The message; a default per status otherwise.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
    /// Accept the TCP connection and reset it (RST) before the TLS handshake: like a refused
    /// connection. Consumed per connection rather than per request.
    RefuseConnection,
    /// Read the request, then close the connection (TCP FIN, no TLS close_notify) without answering.
    CloseBeforeResponse,
    /// Send the first half of the response head, then reset the connection.
    ResetMidHeaders,
    /// Send the head and half of the body, then reset the connection (SO_LINGER 0).
    ResetMidBody,
    /// Wait this long before sending anything.
    SlowHeaders {
        /// The delay.
        #[serde(rename = "delay_ms", with = "millis")]
        delay: Duration,
    },
    /// Send the head and half the body, wait this long, then send the rest.
    SlowBody {
        /// The delay.
        #[serde(rename = "delay_ms", with = "millis")]
        delay: Duration,
    },
    /// 200 with a body that is not valid JSON (truncated).
    MalformedJson,
    /// 200 with valid credentials padded past 64 KiB (`bytes` total, default 70 000).
    OversizedBody {
        /// Total body size.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bytes: Option<usize>,
    },
    /// 200 without this field of `credentials` (`accessKeyId`, `secretAccessKey`,
    /// `sessionToken`, `expiration`), or without the `credentials` object itself.
    MissingField {
        /// The field to leave out.
        field: String,
    },
    /// 200 with this `expiration` value (default `not-a-time`), not a valid RFC 3339 UTC time.
    BadExpiration {
        /// The expiration string sent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        value: Option<String>,
    },
    /// 200 with credentials that expired an hour before the server's `Date`.
    Expired,
    /// Send this raw text as the response (after the TLS handshake and request), then close.
    Raw {
        /// Bytes sent verbatim.
        data: String,
    },
    /// Modifier: the server clock (`Date` and the expiration) is off by this many seconds.
    DateSkew {
        /// Seconds added to the real clock (negative: behind).
        seconds: i64,
    },
    /// Modifier: no `Date` header.
    NoDate,
    /// Modifier: `Transfer-Encoding: chunked` instead of `Content-Length`.
    Chunked,
    /// Modifier: issued credentials live this long (may be tiny or negative), overriding both the
    /// configured TTL and `x-amzn-iot-credential-duration-seconds`.
    Ttl {
        /// Lifetime in seconds.
        seconds: i64,
    },
}

impl Fault {
    /// `Status` with the default message and no `Retry-After`.
    pub fn status(status: u16) -> Fault {
        Fault::Status {
            status,
            retry_after: None,
            message: None,
        }
    }

    /// `Status` with `Retry-After: <seconds>`.
    pub fn status_retry_after(status: u16, seconds: u64) -> Fault {
        Fault::Status {
            status,
            retry_after: Some(seconds.to_string()),
            message: None,
        }
    }

    /// Modifiers occupy one slot each; all failures share slot 0.
    fn slot(&self) -> u8 {
        match self {
            Fault::DateSkew { .. } => 1,
            Fault::NoDate => 2,
            Fault::Chunked => 3,
            Fault::Ttl { .. } => 4,
            _ => 0,
        }
    }
}

mod millis {
    use serde_std::{Deserialize as _, Deserializer, Serializer};
    use std::time::Duration;

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// One request the provider received (recorded before it is answered).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(crate = "serde_std")]
pub struct RequestRecord {
    /// 1-based sequence number over the provider's lifetime.
    pub seq: u64,
    /// 1-based number of the TCP connection it arrived on.
    pub connection: u64,
    /// Request method.
    pub method: String,
    /// Request target as sent.
    pub path: String,
    /// Role alias from the path, when the path has the credentials shape.
    pub alias: Option<String>,
    /// `x-amzn-iot-thingname`.
    pub thing_name: Option<String>,
    /// `User-Agent`.
    pub user_agent: Option<String>,
    /// `x-amzn-iot-credential-duration-seconds`, verbatim.
    pub duration_seconds: Option<String>,
    /// `Host`.
    pub host: Option<String>,
    /// `TLSv1.2` or `TLSv1.3`.
    pub tls_version: String,
    /// Whether the TLS session was resumed.
    pub resumed: bool,
    /// SNI sent by the client.
    pub sni: Option<String>,
    /// Subject CN of the verified client certificate.
    pub client_cn: Option<String>,
    /// Status answered; `None` when the connection was closed or reset instead (or not yet).
    pub status: Option<u16>,
    /// The failure fault applied to this request, if any.
    pub fault: Option<Fault>,
    /// Real wall-clock time of arrival, Unix seconds.
    pub received_unix: i64,
}

/// One credential set the provider generated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(crate = "serde_std")]
pub struct IssuedCredentials {
    /// The request ([`RequestRecord::seq`]) it answered.
    pub seq: u64,
    /// Role alias.
    pub alias: String,
    /// Thing name header of the request.
    pub thing_name: Option<String>,
    /// `ASIA…`.
    pub access_key_id: String,
    /// Secret access key (random, unique).
    pub secret_access_key: String,
    /// Session token (random, unique).
    pub session_token: String,
    /// `expiration` as sent.
    pub expiration: String,
    /// Expiration on the server clock, Unix seconds.
    pub expiration_unix: i64,
    /// The server clock when issued (what `Date` says, skew included), Unix seconds.
    pub server_time_unix: i64,
    /// `Date` header sent, if any.
    pub date_header: Option<String>,
    /// True when a complete, well-formed, unexpired 200 response carrying these credentials was
    /// written (no body fault, no reset): what a correct client ends up holding.
    pub complete: bool,
}

/// Counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(crate = "serde_std")]
pub struct Stats {
    /// TCP connections accepted.
    pub connections: u64,
    /// TLS handshakes completed.
    pub handshakes: u64,
    /// TLS handshakes failed (e.g. no or untrusted client certificate).
    pub handshake_failures: u64,
    /// Requests read.
    pub requests: u64,
    /// Credential sets generated.
    pub issued: u64,
}

/// What to do with one request, from the faults in force.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    pub(crate) failure: Option<Fault>,
    pub(crate) skew: i64,
    pub(crate) no_date: bool,
    pub(crate) chunked: bool,
    pub(crate) ttl: Option<i64>,
}

impl Plan {
    fn apply(&mut self, f: &Fault) {
        match f {
            Fault::DateSkew { seconds } => self.skew = *seconds,
            Fault::NoDate => self.no_date = true,
            Fault::Chunked => self.chunked = true,
            Fault::Ttl { seconds } => self.ttl = Some(*seconds),
            other => self.failure = Some(other.clone()),
        }
    }
}

#[derive(Debug, Default)]
struct State {
    persistent: Vec<Fault>,
    once: VecDeque<Fault>,
    requests: Vec<RequestRecord>,
    issued: Vec<IssuedCredentials>,
    handshake_errors: Vec<String>,
}

/// State shared by the listeners and the handle.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) aliases: Vec<String>,
    pub(crate) ttl: Duration,
    pub(crate) allow_missing_thing_name: bool,
    pub(crate) keep_alive: bool,
    pub(crate) registry: Option<Arc<crate::fakeiot::Registry>>,
    state: Mutex<State>,
    stats: watch::Sender<Stats>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called per accepted connection: whether to refuse (reset) it.
    pub(crate) fn on_connection(&self) -> (u64, bool) {
        let mut n = 0;
        self.stats.send_modify(|s| {
            s.connections += 1;
            n = s.connections;
        });
        let mut st = self.lock();
        if st.once.front() == Some(&Fault::RefuseConnection) {
            st.once.pop_front();
            return (n, true);
        }
        (n, st.persistent.contains(&Fault::RefuseConnection))
    }

    pub(crate) fn on_handshake(&self, result: Result<(), String>) {
        match result {
            Ok(()) => self.stats.send_modify(|s| s.handshakes += 1),
            Err(e) => {
                self.lock().handshake_errors.push(e);
                self.stats.send_modify(|s| s.handshake_failures += 1);
            }
        }
    }

    /// Records a request and takes the faults for it. Returns the record's index.
    pub(crate) fn on_request(&self, mut record: RequestRecord) -> (usize, Plan) {
        let mut st = self.lock();
        let mut plan = Plan::default();
        let once = st.once.pop_front();
        for f in st.persistent.iter().chain(once.iter()) {
            plan.apply(f);
        }
        record.seq = st.requests.len() as u64 + 1;
        record.fault = plan.failure.clone();
        st.requests.push(record);
        let idx = st.requests.len() - 1;
        drop(st);
        self.stats.send_modify(|s| s.requests += 1);
        (idx, plan)
    }

    pub(crate) fn seq_of(&self, idx: usize) -> u64 {
        self.lock().requests[idx].seq
    }

    pub(crate) fn on_answer(&self, idx: usize, status: Option<u16>) {
        self.lock().requests[idx].status = status;
    }

    pub(crate) fn on_issue(&self, issued: IssuedCredentials) {
        self.lock().issued.push(issued);
        self.stats.send_modify(|s| s.issued += 1);
    }

    fn set_fault(&self, fault: Fault) {
        let mut st = self.lock();
        let slot = fault.slot();
        st.persistent.retain(|f| f.slot() != slot);
        st.persistent.push(fault);
    }

    fn push_fault(&self, fault: Fault) {
        self.lock().once.push_back(fault);
    }

    fn clear_faults(&self) {
        let mut st = self.lock();
        st.persistent.clear();
        st.once.clear();
    }

    fn reset(&self) {
        let mut st = self.lock();
        st.persistent.clear();
        st.once.clear();
        st.requests.clear();
        st.issued.clear();
        st.handshake_errors.clear();
    }

    fn requests(&self) -> Vec<RequestRecord> {
        self.lock().requests.clone()
    }

    fn issued(&self) -> Vec<IssuedCredentials> {
        self.lock().issued.clone()
    }

    fn faults(&self) -> (Vec<Fault>, Vec<Fault>) {
        let st = self.lock();
        (st.persistent.clone(), st.once.iter().cloned().collect())
    }

    fn handshake_errors(&self) -> Vec<String> {
        self.lock().handshake_errors.clone()
    }
}

/// The fake credentials provider. Start it with [`FakeProvider::start`] (inside a tokio runtime)
/// or [`FakeProvider::start_blocking`] (from plain code; it brings its own runtime).
#[derive(Debug)]
pub struct FakeProvider(());

impl FakeProvider {
    /// Binds the listeners and starts serving on the current tokio runtime.
    pub async fn start(config: ProviderConfig) -> Result<ProviderHandle, Error> {
        let tls = conn::server_config(&config)?;
        for addr in [Some(config.listen), config.admin].into_iter().flatten() {
            if !addr.ip().is_loopback() {
                return Err(Error::Config(format!(
                    "{addr} is not a loopback address: the fake provider listens on loopback only"
                )));
            }
        }
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| Error::io(format!("binding {}", config.listen), e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::io("local address".into(), e))?;
        let admin = match config.admin {
            Some(a) => Some(
                TcpListener::bind(a)
                    .await
                    .map_err(|e| Error::io(format!("binding admin listener {a}"), e))?,
            ),
            None => None,
        };
        let admin_addr = match &admin {
            Some(l) => Some(
                l.local_addr()
                    .map_err(|e| Error::io("local address".into(), e))?,
            ),
            None => None,
        };
        let shared = Arc::new(Shared {
            aliases: config.aliases.clone(),
            ttl: config.ttl,
            allow_missing_thing_name: config.allow_missing_thing_name,
            keep_alive: config.keep_alive,
            registry: config.registry.clone(),
            state: Mutex::new(State::default()),
            stats: watch::Sender::new(Stats::default()),
        });
        let (stop, stop_rx) = watch::channel(false);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let mut tasks = vec![tokio::spawn(accept_loop(
            listener,
            stop_rx.clone(),
            Arc::clone(&shared),
            move |shared, tcp| conn::serve(shared, acceptor.clone(), tcp),
        ))];
        if let Some(admin) = admin {
            tasks.push(tokio::spawn(accept_loop(
                admin,
                stop_rx,
                Arc::clone(&shared),
                admin::serve,
            )));
        }
        Ok(ProviderHandle {
            shared,
            addr,
            admin_addr,
            stop,
            tasks: Mutex::new(tasks),
        })
    }

    /// Starts the provider on a runtime of its own (one worker thread), for `#[test]` functions
    /// and other synchronous code. Do not call it from inside a tokio runtime.
    pub fn start_blocking(config: ProviderConfig) -> Result<BlockingProvider, Error> {
        BlockingProvider::start(config)
    }
}

async fn accept_loop<F, Fut>(
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
    shared: Arc<Shared>,
    serve: F,
) where
    F: Fn(Arc<Shared>, tokio::net::TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let mut conn_stop = stop.clone();
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            accepted = listener.accept() => {
                let Ok((tcp, _peer)) = accepted else { continue };
                let fut = serve(Arc::clone(&shared), tcp);
                conns.spawn(async move {
                    tokio::select! {
                        _ = fut => {}
                        _ = conn_stop.wait_for(|s| *s) => {}
                    }
                });
            }
        }
    }
    drop(listener);
    conns.shutdown().await;
}

/// A running provider. Dropping it stops the provider (without waiting); prefer
/// [`ProviderHandle::shutdown`] where the port must be closed before going on.
#[derive(Debug)]
pub struct ProviderHandle {
    shared: Arc<Shared>,
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl ProviderHandle {
    /// The TLS listener's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:PORT` — suitable for the agent's `endpoint` (the server certificate also
    /// names `localhost`).
    pub fn endpoint(&self) -> String {
        self.addr.to_string()
    }

    /// The admin listener's address, when configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.requests()
    }

    /// Every credential set generated so far, in order (see [`IssuedCredentials::complete`]).
    pub fn issued(&self) -> Vec<IssuedCredentials> {
        self.shared.issued()
    }

    /// The last credential set delivered completely and well-formed.
    pub fn last_issued(&self) -> Option<IssuedCredentials> {
        self.shared.issued().into_iter().rev().find(|i| i.complete)
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        *self.shared.stats.borrow()
    }

    /// Number of requests received.
    pub fn request_count(&self) -> u64 {
        self.stats().requests
    }

    /// Number of TLS handshakes completed.
    pub fn handshake_count(&self) -> u64 {
        self.stats().handshakes
    }

    /// Errors of failed TLS handshakes, in order.
    pub fn handshake_errors(&self) -> Vec<String> {
        self.shared.handshake_errors()
    }

    /// Applies `fault` to every following request until [`ProviderHandle::clear_faults`]. A
    /// persistent fault of the same kind (failure, or the same modifier) is replaced.
    pub fn set_fault(&self, fault: Fault) {
        self.shared.set_fault(fault);
    }

    /// Queues `fault` for one request (one connection for [`Fault::RefuseConnection`]); queued
    /// faults are used in order, before persistent ones.
    pub fn push_fault(&self, fault: Fault) {
        self.shared.push_fault(fault);
    }

    /// Removes persistent and queued faults.
    pub fn clear_faults(&self) {
        self.shared.clear_faults();
    }

    /// `(persistent, queued)` faults.
    pub fn faults(&self) -> (Vec<Fault>, Vec<Fault>) {
        self.shared.faults()
    }

    /// Forgets faults, requests, issued credentials and handshake errors (not the counters).
    pub fn reset(&self) {
        self.shared.reset();
    }

    /// Waits until `pred` holds for the counters (no polling: woken on every change).
    pub async fn wait_until(&self, mut pred: impl FnMut(&Stats) -> bool) {
        let mut rx = self.shared.stats.subscribe();
        // The sender lives in `self`, so this cannot fail.
        let _ = rx.wait_for(|s| pred(s)).await;
    }

    /// Waits until at least `n` requests have been received.
    pub async fn wait_for_requests(&self, n: u64) {
        self.wait_until(|s| s.requests >= n).await;
    }

    /// Stops accepting, closes every connection and waits until the listeners are closed.
    pub async fn shutdown(&self) {
        self.stop.send_replace(true);
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for t in tasks {
            let _ = t.await;
        }
    }
}

impl Drop for ProviderHandle {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

/// A provider on its own runtime thread, for synchronous tests. Derefs to [`ProviderHandle`].
/// Dropping it shuts the provider down and waits for that.
#[derive(Debug)]
pub struct BlockingProvider {
    handle: Option<ProviderHandle>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl BlockingProvider {
    /// Starts a provider on a new one-worker runtime.
    pub fn start(config: ProviderConfig) -> Result<BlockingProvider, Error> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fake-provider")
            .enable_all()
            .build()
            .map_err(|e| Error::io("starting a tokio runtime".into(), e))?;
        let handle = runtime.block_on(FakeProvider::start(config))?;
        Ok(BlockingProvider {
            handle: Some(handle),
            runtime: Some(runtime),
        })
    }

    /// Blocks until `pred` holds for the counters, or `timeout` passes; returns whether it held.
    pub fn wait_until(&self, pred: impl FnMut(&Stats) -> bool, timeout: Duration) -> bool {
        let (Some(rt), Some(h)) = (&self.runtime, &self.handle) else {
            return false;
        };
        rt.block_on(async { tokio::time::timeout(timeout, h.wait_until(pred)).await })
            .is_ok()
    }

    /// Blocks until at least `n` requests arrived, or `timeout` passes; returns whether they did.
    pub fn wait_for_requests(&self, n: u64, timeout: Duration) -> bool {
        self.wait_until(|s| s.requests >= n, timeout)
    }

    /// Stops the provider and waits until its listeners are closed.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let (Some(rt), Some(h)) = (self.runtime.take(), self.handle.take()) {
            rt.block_on(h.shutdown());
            drop(h);
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

impl Deref for BlockingProvider {
    type Target = ProviderHandle;

    fn deref(&self) -> &ProviderHandle {
        self.handle
            .as_ref()
            .expect("BlockingProvider used after shutdown")
    }
}

impl Drop for BlockingProvider {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Loads the certificate chain and key named by a config.
pub(crate) fn load_identity(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), Error> {
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| Error::Tls(format!("reading {}: {e}", cert.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Tls(format!("reading {}: {e}", cert.display())))?;
    if chain.is_empty() {
        return Err(Error::Tls(format!("{}: no certificate", cert.display())));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| Error::Tls(format!("reading {}: {e}", key.display())))?;
    Ok((chain, key))
}

/// Builds the client-certificate verifier for a CA file.
pub(crate) fn client_verifier(
    ca: &std::path::Path,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, Error> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)
        .map_err(|e| Error::Tls(format!("reading {}: {e}", ca.display())))?
    {
        let cert = cert.map_err(|e| Error::Tls(format!("reading {}: {e}", ca.display())))?;
        roots
            .add(cert)
            .map_err(|e| Error::Tls(format!("{}: {e}", ca.display())))?;
    }
    if roots.is_empty() {
        return Err(Error::Tls(format!("{}: no CA certificate", ca.display())));
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| Error::Tls(e.to_string()))
}
