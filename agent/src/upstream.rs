//! The upstream exchange over mutual TLS: connection (direct or through an HTTP CONNECT proxy),
//! TLS, and core's request/response code driven over the TLS stream.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use embedded_io_adapters::tokio_1::FromTokio;
use iotcred_core::exchange::{ExchangeError, parse_response};
use iotcred_core::{ErrorClass, ThingName, UnixTime};
use iotcred_core::{FetchError, HttpError};
use rustls::ClientConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::config::{Config, Endpoint, ProviderRole};
use crate::net::Proxy;
use crate::source::Obtained;

/// Why an exchange failed. `Display` is one line that says what is wrong and what to do; it
/// never contains a secret.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The provider answered, with an error status or an unusable body.
    #[error("{message}")]
    Exchange {
        /// Classified error from core.
        error: ExchangeError,
        /// Human message with the fix.
        message: String,
    },
    /// Name resolution failed.
    #[error("cannot resolve {host}: {source}; check `endpoint` and DNS")]
    Resolve {
        /// Host.
        host: String,
        /// Why.
        source: io::Error,
    },
    /// TCP connection failed.
    #[error("cannot connect to {target}: {source}")]
    Connect {
        /// host:port tried.
        target: String,
        /// Why.
        source: io::Error,
    },
    /// The proxy refused or failed.
    #[error("proxy {proxy}: {message}")]
    Proxy {
        /// Proxy host:port.
        proxy: String,
        /// What happened.
        message: String,
    },
    /// TLS failed (handshake or record layer).
    #[error("{0}")]
    Tls(String),
    /// Connection dropped or I/O failed mid-exchange.
    #[error("connection to {target} failed: {source}")]
    Io {
        /// host:port.
        target: String,
        /// Why.
        source: io::Error,
    },
    /// No answer in time.
    #[error(
        "no answer from {target} within {secs} s (timeout_seconds); check the network path to the endpoint"
    )]
    Timeout {
        /// host:port.
        target: String,
        /// Timeout.
        secs: u64,
    },
}

impl UpstreamError {
    /// Permanent (fix the configuration) or transient (retry).
    pub fn class(&self) -> ErrorClass {
        match self {
            UpstreamError::Exchange { error, .. } => error.class(),
            _ => ErrorClass::Transient,
        }
    }

    /// The provider's `Retry-After`, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            UpstreamError::Exchange { error, .. } => error.retry_after(),
            _ => None,
        }
    }
}

/// The upstream: endpoint, TLS configuration, and one idle connection kept for reuse.
pub struct Upstream {
    endpoint: Endpoint,
    thing_name: Option<ThingName>,
    connector: TlsConnector,
    proxy: Option<Proxy>,
    timeout: Duration,
    idle: Mutex<Option<TlsStream<TcpStream>>>,
}

impl Upstream {
    /// Builds the upstream for `config` (endpoint and proxy as parsed at load time) with a
    /// loaded TLS configuration.
    pub fn new(config: &Config, client_config: Arc<ClientConfig>) -> Upstream {
        Upstream {
            endpoint: config.endpoint.clone(),
            thing_name: config.thing_name.clone(),
            connector: TlsConnector::from(client_config),
            proxy: config.proxy.clone(),
            timeout: config.timeout,
            idle: Mutex::new(None),
        }
    }

    fn target(&self) -> String {
        self.endpoint.to_string()
    }

    /// One exchange: reuse the idle connection if there is one (falling back to a new
    /// connection if it turns out dead before any answer), else connect. After a failure other
    /// than an answer from the provider, no idle connection is kept (the next fetch connects
    /// anew).
    pub async fn fetch(&self, role: &ProviderRole) -> Result<Obtained, UpstreamError> {
        let result = self.attempt(role).await;
        if matches!(&result, Err(e) if !matches!(e, UpstreamError::Exchange { .. })) {
            self.reset();
        }
        result
    }

    async fn attempt(&self, role: &ProviderRole) -> Result<Obtained, UpstreamError> {
        let start = Instant::now();
        let deadline = start + self.timeout;
        let reused = self.idle.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(conn) = reused {
            match self.exchange(conn, role, deadline, true).await {
                Err(ExchangeFailure::StaleConnection) => {}
                other => {
                    return other
                        .map_err(|f| self.failure(f))
                        .map(|f| with_latency(f, start));
                }
            }
        }
        let conn = tokio::time::timeout_at(deadline, self.connect())
            .await
            .map_err(|_| self.timeout_error())??;
        self.exchange(conn, role, deadline, false)
            .await
            .map_err(|f| self.failure(f))
            .map(|f| with_latency(f, start))
    }

    /// Drops the idle connection.
    fn reset(&self) {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    fn timeout_error(&self) -> UpstreamError {
        UpstreamError::Timeout {
            target: self.target(),
            secs: self.timeout.as_secs(),
        }
    }

    fn failure(&self, f: ExchangeFailure) -> UpstreamError {
        match f {
            ExchangeFailure::Error(e) => e,
            ExchangeFailure::StaleConnection => UpstreamError::Io {
                target: self.target(),
                source: io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "connection closed by the endpoint",
                ),
            },
        }
    }

    async fn connect(&self) -> Result<TlsStream<TcpStream>, UpstreamError> {
        let tcp = match &self.proxy {
            None => tcp_connect(self.endpoint.host(), self.endpoint.port()).await?,
            Some(p) => {
                let mut s = tcp_connect(p.addr.host(), p.addr.port())
                    .await
                    .map_err(|e| UpstreamError::Proxy {
                        proxy: p.addr.to_string(),
                        message: e.to_string(),
                    })?;
                proxy_connect(&mut s, p, &self.target()).await?;
                s
            }
        };
        self.connector
            .connect(self.endpoint.server().server_name().clone(), tcp)
            .await
            .map_err(|e| UpstreamError::Tls(tls_message(&e, &self.target())))
    }

    async fn exchange(
        &self,
        conn: TlsStream<TcpStream>,
        role: &ProviderRole,
        deadline: Instant,
        reused: bool,
    ) -> Result<Obtained, ExchangeFailure> {
        let mut stream = FromTokio::new(conn);
        let wall_now = UnixTime::now();
        let result = tokio::time::timeout_at(
            deadline,
            iotcred_core::asynch::round_trip(
                &mut stream,
                &role.request,
                iotcred_core::Limits::DEFAULT,
            ),
        )
        .await;
        let arrived = Instant::now();
        let target = self.target();
        let response = match result {
            Err(_) => return Err(ExchangeFailure::Error(self.timeout_error())),
            Ok(Ok(response)) => response,
            Ok(Err(FetchError::Exchange(ExchangeError::Http(HttpError::ClosedBeforeResponse))))
                if reused =>
            {
                return Err(ExchangeFailure::StaleConnection);
            }
            Ok(Err(FetchError::Exchange(error))) => {
                let message = error
                    .explain(self.thing_name.as_ref(), &role.role_alias)
                    .to_string();
                return Err(ExchangeFailure::Error(UpstreamError::Exchange {
                    error,
                    message,
                }));
            }
            Ok(Err(FetchError::Io(e))) => {
                if reused
                    && matches!(
                        e.kind(),
                        io::ErrorKind::UnexpectedEof
                            | io::ErrorKind::ConnectionReset
                            | io::ErrorKind::BrokenPipe
                    )
                {
                    return Err(ExchangeFailure::StaleConnection);
                }
                if tls_cause(&e).is_some() {
                    return Err(ExchangeFailure::Error(UpstreamError::Tls(tls_message(
                        &e, &target,
                    ))));
                }
                return Err(ExchangeFailure::Error(UpstreamError::Io {
                    target,
                    source: e,
                }));
            }
            Ok(Err(_)) => {
                let source = io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the connection stopped accepting data",
                );
                return Err(ExchangeFailure::Error(UpstreamError::Io { target, source }));
            }
        };
        if response.keep_alive {
            *self.idle.lock().unwrap_or_else(|e| e.into_inner()) = Some(stream.into_inner());
        }
        match parse_response(&response, wall_now) {
            Ok(issued) => Ok(Obtained {
                credentials: issued.credentials,
                lifetime: issued.lifetime,
                arrived,
                latency: Duration::ZERO,
            }),
            Err(error) => {
                let message = error
                    .explain(self.thing_name.as_ref(), &role.role_alias)
                    .to_string();
                Err(ExchangeFailure::Error(UpstreamError::Exchange {
                    error,
                    message,
                }))
            }
        }
    }
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("endpoint", &self.endpoint)
            .field("proxy", &self.proxy)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

enum ExchangeFailure {
    /// A reused connection was closed by the peer before any answer: retry on a new one.
    StaleConnection,
    Error(UpstreamError),
}

fn with_latency(mut obtained: Obtained, start: Instant) -> Obtained {
    obtained.latency = obtained.arrived.saturating_duration_since(start);
    obtained
}

async fn tcp_connect(host: &str, port: u16) -> Result<TcpStream, UpstreamError> {
    let target = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let addrs: Vec<_> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|source| UpstreamError::Resolve {
            host: host.to_string(),
            source,
        })?
        .collect();
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = e,
        }
    }
    Err(UpstreamError::Connect {
        target,
        source: last,
    })
}

async fn proxy_connect(
    s: &mut TcpStream,
    proxy: &Proxy,
    target: &str,
) -> Result<(), UpstreamError> {
    let perr = |message: String| UpstreamError::Proxy {
        proxy: proxy.addr.to_string(),
        message,
    };
    let req = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: {}\r\n\r\n",
        crate::USER_AGENT
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| perr(e.to_string()))?;
    // Read the response head byte by byte so no TLS byte is consumed (a CONNECT 2xx has no body).
    let mut head = Vec::with_capacity(256);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= 8192 {
            return Err(perr("response header too large".into()));
        }
        let b = s
            .read_u8()
            .await
            .map_err(|e| perr(format!("closed during CONNECT: {e}")))?;
        head.push(b);
    }
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(&head) {
        Ok(httparse::Status::Complete(_)) => match resp.code {
            Some(c) if (200..300).contains(&c) => Ok(()),
            Some(c) => Err(perr(format!("CONNECT refused with status {c}"))),
            None => Err(perr("malformed response".into())),
        },
        _ => Err(perr("malformed response to CONNECT".into())),
    }
}

fn tls_cause(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

/// One line for a TLS failure, naming the likely fix.
fn tls_message(e: &io::Error, target: &str) -> String {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    match tls_cause(e) {
        Some(E::AlertReceived(
            A::BadCertificate
            | A::CertificateRequired
            | A::UnknownCA
            | A::CertificateUnknown
            | A::AccessDenied
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::UnsupportedCertificate,
        )) => format!(
            "{target} rejected the device certificate during TLS: check that the certificate is registered and ACTIVE in AWS IoT and matches the key"
        ),
        Some(E::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. })) => format!(
            "the server certificate of {target} is not valid yet by this device's clock ({}): set the system clock (NTP/RTC)",
            UnixTime::now().rfc3339()
        ),
        Some(E::InvalidCertificate(C::Expired | C::ExpiredContext { .. })) => format!(
            "the server certificate of {target} has expired by this device's clock ({}): check the system clock, or the endpoint",
            UnixTime::now().rfc3339()
        ),
        Some(E::InvalidCertificate(C::UnknownIssuer)) => format!(
            "the server certificate of {target} is not trusted: check `ca` (default: the built-in Amazon roots) and `endpoint`"
        ),
        Some(E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. })) => {
            format!(
                "the server certificate of {target} is not valid for that name: check `endpoint` (use the iot:CredentialProvider endpoint)"
            )
        }
        Some(E::Other(other)) if other.0.downcast_ref::<crate::keys::KeyError>().is_some() => {
            format!(
                "TLS with {target} failed: the device key cannot sign: {}",
                other.0
            )
        }
        Some(other) => format!("TLS with {target} failed: {other}"),
        None => format!("TLS with {target} failed: {e}"),
    }
}
