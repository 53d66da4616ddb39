//! Outbound HTTPS connections, shared by the credentials-provider exchange
//! ([`upstream`](crate::upstream)) and STS ([`sts`](crate::sts)): TCP (direct, or through an
//! HTTP CONNECT proxy), TLS with rustls, and one idle connection kept for reuse.
//!
//! Addresses and proxies come parsed from the configuration ([`crate::net`]). Callers turn
//! [`ConnectError`] into their own errors; its messages name the service's configuration keys.

use std::io;
use std::sync::{Arc, Mutex};

use rustls::ClientConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::net::{HostPort, Proxy, TlsServer};

/// A TLS connection to an endpoint.
pub type Conn = TlsStream<TcpStream>;

/// Which service a connection is for: error messages name its configuration keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    /// The AWS IoT credentials provider (`endpoint`, `ca`).
    Provider,
    /// STS, for chained roles (`[sts] endpoint`, `[sts] ca`).
    Sts,
    /// The AWS IoT MQTT broker, for provisioning and rotation (`[provision] endpoint`,
    /// `[provision] ca`).
    Mqtt,
}

impl Service {
    /// How messages name the peer before its address: nothing, or `STS at `.
    fn peer(self) -> &'static str {
        match self {
            Service::Provider => "",
            Service::Sts => "STS at ",
            Service::Mqtt => "the MQTT broker at ",
        }
    }

    fn endpoint_key(self) -> &'static str {
        match self {
            Service::Provider => "`endpoint`",
            Service::Sts => "[sts] endpoint",
            Service::Mqtt => "[provision] endpoint",
        }
    }

    fn ca_key(self) -> &'static str {
        match self {
            Service::Provider => "`ca`",
            Service::Sts => "[sts] ca",
            Service::Mqtt => "[provision] ca",
        }
    }
}

/// Why a connection could not be set up, or broke at the TLS layer. `Display` names the fix.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Name resolution failed.
    #[error("cannot resolve {host}: {source}; check {} and DNS", service.endpoint_key())]
    Resolve {
        /// Whose endpoint.
        service: Service,
        /// Host.
        host: String,
        /// Why.
        source: io::Error,
    },
    /// TCP connection failed.
    #[error(
        "cannot connect to {}{target}: {source}; check {} and the network",
        service.peer(),
        service.endpoint_key()
    )]
    Connect {
        /// Whose endpoint.
        service: Service,
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
    /// TLS failed (the handshake, or a later read or write).
    #[error(transparent)]
    Tls(#[from] TlsFailure),
}

/// TLS with an endpoint failed. `Display` says why in one line and names the likely fix.
#[derive(Debug)]
pub struct TlsFailure {
    /// Whose endpoint.
    pub service: Service,
    /// host:port.
    pub target: String,
    /// The I/O error carrying rustls' reason (see [`tls_cause`]).
    pub source: io::Error,
}

impl std::fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use rustls::{AlertDescription as A, CertificateError as C, Error as E};
        let TlsFailure {
            service,
            target,
            source,
        } = self;
        let (peer, endpoint, ca) = (service.peer(), service.endpoint_key(), service.ca_key());
        let clock = || iotcred_core::UnixTime::now().rfc3339();
        match tls_cause(source) {
            Some(E::AlertReceived(
                A::BadCertificate
                | A::CertificateRequired
                | A::UnknownCA
                | A::CertificateUnknown
                | A::AccessDenied
                | A::CertificateRevoked
                | A::CertificateExpired
                | A::UnsupportedCertificate,
            )) if *service != Service::Sts => match service {
                Service::Mqtt => write!(
                    f,
                    "the MQTT broker at {target} rejected the client certificate during TLS: check that the certificate (the claim certificate when provisioning, else the device certificate) is registered and ACTIVE in AWS IoT, matches the key, and has a policy attached"
                ),
                _ => write!(
                    f,
                    "{target} rejected the device certificate during TLS: check that the certificate is registered and ACTIVE in AWS IoT and matches the key"
                ),
            },
            Some(E::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. })) => write!(
                f,
                "the server certificate of {peer}{target} is not valid yet by this device's clock ({}): set the system clock (NTP/RTC)",
                clock()
            ),
            Some(E::InvalidCertificate(C::Expired | C::ExpiredContext { .. })) => write!(
                f,
                "the server certificate of {peer}{target} has expired by this device's clock ({}): check the system clock, or {endpoint}",
                clock()
            ),
            Some(E::InvalidCertificate(C::UnknownIssuer)) => write!(
                f,
                "the server certificate of {peer}{target} is not trusted: check {ca} (default: the built-in Amazon roots) and {endpoint}"
            ),
            Some(E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. })) => {
                write!(
                    f,
                    "the server certificate of {peer}{target} is not valid for that name: check {endpoint}"
                )?;
                if *service == Service::Provider {
                    f.write_str(" (use the iot:CredentialProvider endpoint)")?;
                }
                Ok(())
            }
            Some(E::Other(other)) if other.0.downcast_ref::<crate::keys::KeyError>().is_some() => {
                write!(
                    f,
                    "TLS with {peer}{target} failed: the device key cannot sign: {}",
                    other.0
                )
            }
            Some(other) => write!(f, "TLS with {peer}{target} failed: {other}"),
            None => write!(f, "TLS with {peer}{target} failed: {source}"),
        }
    }
}

impl std::error::Error for TlsFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Connects to one endpoint and keeps one idle connection for the next request.
pub struct Connector {
    service: Service,
    server: TlsServer,
    tls: TlsConnector,
    proxy: Option<Proxy>,
    idle: Mutex<Option<Conn>>,
}

impl Connector {
    /// A connector for `server` (SNI and certificate name: its host), with `client_config`'s
    /// trust anchors (and client certificate, if any), through `proxy` when given.
    pub fn new(
        service: Service,
        server: TlsServer,
        client_config: Arc<ClientConfig>,
        proxy: Option<Proxy>,
    ) -> Connector {
        Connector {
            service,
            server,
            tls: TlsConnector::from(client_config),
            proxy,
            idle: Mutex::new(None),
        }
    }

    /// `host:port` of the endpoint, for messages.
    pub fn target(&self) -> String {
        self.server.to_string()
    }

    /// The idle connection kept from the last exchange, if any (the caller owns it now).
    pub fn take_idle(&self) -> Option<Conn> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Keeps `conn` for the next exchange (after a response that allows keep-alive).
    pub fn keep_idle(&self, conn: Conn) {
        *self.idle.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn);
    }

    /// Drops the idle connection (after a connection or TLS error, or on reload).
    pub fn reset(&self) {
        self.take_idle();
    }

    /// A new connection: TCP to the endpoint or to the proxy (then `CONNECT`), then TLS.
    pub async fn connect(&self) -> Result<Conn, ConnectError> {
        let tcp = match &self.proxy {
            None => tcp_connect(self.service, self.server.addr()).await?,
            Some(p) => {
                let mut s =
                    tcp_connect(self.service, &p.addr)
                        .await
                        .map_err(|e| ConnectError::Proxy {
                            proxy: p.addr.to_string(),
                            message: e.to_string(),
                        })?;
                proxy_connect(&mut s, p, &self.target()).await?;
                s
            }
        };
        self.tls
            .connect(self.server.server_name().clone(), tcp)
            .await
            .map_err(|source| self.tls_failure(source).into())
    }

    /// A TLS failure with this endpoint (the handshake, or a later read or write).
    pub fn tls_failure(&self, source: io::Error) -> TlsFailure {
        TlsFailure {
            service: self.service,
            target: self.target(),
            source,
        }
    }
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("target", &self.target())
            .field("proxy", &self.proxy)
            .finish_non_exhaustive()
    }
}

/// rustls' reason for a TLS failure carried in an I/O error.
pub fn tls_cause(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

/// Whether an I/O error on a reused connection means the peer had closed it (retry on a new
/// connection) rather than a failure of this exchange.
pub fn closed_by_peer(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
    )
}

async fn tcp_connect(service: Service, addr: &HostPort) -> Result<TcpStream, ConnectError> {
    let addrs: Vec<_> = tokio::net::lookup_host((addr.host(), addr.port()))
        .await
        .map_err(|source| ConnectError::Resolve {
            service,
            host: addr.host().to_string(),
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
    Err(ConnectError::Connect {
        service,
        target: addr.to_string(),
        source: last,
    })
}

async fn proxy_connect(s: &mut TcpStream, proxy: &Proxy, target: &str) -> Result<(), ConnectError> {
    let perr = |message: String| ConnectError::Proxy {
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
