//! The upstream exchange over mutual TLS: core's request/response code driven over a connection
//! from [`connect`](crate::connect) (direct or through an HTTP CONNECT proxy, kept alive).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use embedded_io_adapters::tokio_1::FromTokio;
use iotcred_core::exchange::{ExchangeError, parse_response};
use iotcred_core::{ErrorClass, ThingName, UnixTime};
use iotcred_core::{FetchError, HttpError};
use rustls::ClientConfig;
use tokio::time::Instant;

use crate::config::{Config, ProviderRole};
use crate::connect::{Conn, ConnectError, Connector, Service, closed_by_peer, tls_cause};
use crate::source::{BoxFuture, Obtained, Source, SourceError, SourceFailure};

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
    /// The connection could not be set up, or broke at the TLS layer.
    #[error(transparent)]
    Connection(#[from] ConnectError),
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

impl SourceFailure for UpstreamError {
    fn class(&self) -> ErrorClass {
        UpstreamError::class(self)
    }

    fn retry_after(&self) -> Option<Duration> {
        UpstreamError::retry_after(self)
    }
}

/// A role whose credentials come from the AWS IoT credentials provider through a role alias.
#[derive(Debug)]
pub struct ProviderSource {
    upstream: Arc<Upstream>,
    request: ProviderRole,
}

impl ProviderSource {
    /// The source of one role on the device's shared upstream.
    pub fn new(upstream: Arc<Upstream>, request: ProviderRole) -> Self {
        ProviderSource { upstream, request }
    }
}

impl Source for ProviderSource {
    fn fetch(&self) -> BoxFuture<'_, Result<Obtained, SourceError>> {
        Box::pin(async move { Ok(self.upstream.fetch(&self.request).await?) })
    }
}

/// The upstream: endpoint, TLS configuration, and one idle connection kept for reuse.
pub struct Upstream {
    thing_name: Option<ThingName>,
    conn: Connector,
    timeout: Duration,
}

impl Upstream {
    /// Builds the upstream for `config` (endpoint and proxy as parsed at load time) with a
    /// loaded TLS configuration.
    pub fn new(config: &Config, client_config: Arc<ClientConfig>) -> Upstream {
        Upstream {
            thing_name: config.thing_name.clone(),
            conn: Connector::new(
                Service::Provider,
                config.endpoint.server().clone(),
                client_config,
                config.proxy.clone(),
            ),
            timeout: config.timeout,
        }
    }

    fn target(&self) -> String {
        self.conn.target()
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
        let reused = self.conn.take_idle();
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
        self.conn.reset();
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

    async fn connect(&self) -> Result<Conn, UpstreamError> {
        self.conn.connect().await.map_err(UpstreamError::from)
    }

    async fn exchange(
        &self,
        conn: Conn,
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
                if reused && closed_by_peer(&e) {
                    return Err(ExchangeFailure::StaleConnection);
                }
                if tls_cause(&e).is_some() {
                    let failure = ConnectError::from(self.conn.tls_failure(e));
                    return Err(ExchangeFailure::Error(failure.into()));
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
            self.conn.keep_idle(stream.into_inner());
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
            .field("conn", &self.conn)
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
