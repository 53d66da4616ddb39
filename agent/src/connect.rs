//! Outbound HTTPS connections, shared by the credentials-provider exchange
//! ([`upstream`](crate::upstream)) and STS ([`sts`](crate::sts)): TCP (direct, or through an
//! HTTP CONNECT proxy), TLS with rustls, and one idle connection kept for reuse.
//!
//! Addresses and proxies come parsed from the configuration ([`crate::net`]). Callers turn
//! [`ConnectError`] into their own errors, with hints that name their own configuration keys.

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

/// Why a connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Name resolution failed.
    #[error("cannot resolve {host}: {source}")]
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
    /// The TLS handshake failed; [`tls_cause`] gives rustls' reason.
    #[error("TLS with {target} failed: {source}")]
    Tls {
        /// host:port.
        target: String,
        /// Why.
        source: io::Error,
    },
}

/// Connects to one endpoint and keeps one idle connection for the next request.
pub struct Connector {
    server: TlsServer,
    tls: TlsConnector,
    proxy: Option<Proxy>,
    idle: Mutex<Option<Conn>>,
}

impl Connector {
    /// A connector for `server` (SNI and certificate name: its host), with `client_config`'s
    /// trust anchors (and client certificate, if any), through `proxy` when given.
    pub fn new(
        server: TlsServer,
        client_config: Arc<ClientConfig>,
        proxy: Option<Proxy>,
    ) -> Connector {
        Connector {
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
            None => tcp_connect(self.server.addr()).await?,
            Some(p) => {
                let mut s = tcp_connect(&p.addr)
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
            .map_err(|source| ConnectError::Tls {
                target: self.target(),
                source,
            })
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

async fn tcp_connect(addr: &HostPort) -> Result<TcpStream, ConnectError> {
    let addrs: Vec<_> = tokio::net::lookup_host((addr.host(), addr.port()))
        .await
        .map_err(|source| ConnectError::Resolve {
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
