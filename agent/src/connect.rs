//! Outbound HTTPS connections, shared by the credentials-provider exchange
//! ([`upstream`](crate::upstream)) and STS ([`sts`](crate::sts)): TCP (direct, or through an
//! HTTP CONNECT proxy), TLS with rustls, and one idle connection kept for reuse.
//!
//! Callers turn [`ConnectError`] into their own errors, with hints that name their own
//! configuration keys.

use std::io;
use std::sync::{Arc, Mutex};

use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// A TLS connection to an endpoint.
pub type Conn = TlsStream<TcpStream>;

/// An HTTP CONNECT proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proxy {
    /// Proxy host.
    pub host: String,
    /// Proxy port.
    pub port: u16,
}

impl Proxy {
    /// Parses `http://host[:port][/]`. Only plain-HTTP CONNECT proxies are supported.
    pub fn parse(url: &str) -> Result<Proxy, String> {
        let rest = match url.split_once("://") {
            Some(("http", rest)) => rest,
            Some((scheme, _)) => {
                return Err(format!(
                    "scheme {scheme:?} is not supported: use an http:// CONNECT proxy"
                ));
            }
            None => url,
        };
        let rest = rest.trim_end_matches('/');
        if rest.contains('@') {
            return Err("credentials in the proxy URL are not supported".into());
        }
        if rest.contains('/') {
            return Err(format!("{url:?}: give http://host:port"));
        }
        let ep = crate::config::parse_endpoint(rest)
            .map_err(|_| format!("{url:?}: give http://host:port"))?;
        let port = if rest.ends_with(']') || !rest.contains(':') {
            3128
        } else {
            ep.port
        };
        Ok(Proxy {
            host: ep.host,
            port,
        })
    }

    /// The proxy for `host` from `HTTPS_PROXY`/`https_proxy`, honouring `NO_PROXY`/`no_proxy`.
    pub fn from_env(host: &str) -> Option<Proxy> {
        let var = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()))
        };
        let url = var(&["HTTPS_PROXY", "https_proxy"])?;
        if let Some(no) = var(&["NO_PROXY", "no_proxy"]) {
            if no_proxy_matches(&no, host) {
                return None;
            }
        }
        match Proxy::parse(&url) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!("ignoring HTTPS_PROXY: {e}");
                None
            }
        }
    }

    /// The configured proxy (`proxy = …`, already validated) or the one from the environment
    /// for `host`.
    pub fn resolve(configured: Option<&str>, host: &str) -> Result<Option<Proxy>, String> {
        match configured {
            Some(url) => Proxy::parse(url).map(Some),
            None => Ok(Proxy::from_env(host)),
        }
    }

    fn target(&self) -> String {
        host_port(&self.host, self.port)
    }
}

/// `NO_PROXY` matching: `*`, exact host, or domain suffix (`.example.com` or `example.com`).
pub fn no_proxy_matches(list: &str, host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    list.split(',')
        .map(|e| e.trim().to_ascii_lowercase())
        .any(|e| {
            if e.is_empty() {
                return false;
            }
            if e == "*" {
                return true;
            }
            let e = e
                .split(':')
                .next()
                .unwrap_or("")
                .trim_start_matches("*.")
                .trim_start_matches('.');
            host == e || host.ends_with(&format!(".{e}"))
        })
}

/// `host:port`, with IPv6 literals in brackets.
pub fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

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

/// The host name is neither a DNS name nor an IP address.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a valid DNS name or IP address")]
pub struct InvalidHost(pub String);

/// Connects to one endpoint and keeps one idle connection for the next request.
pub struct Connector {
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    tls: TlsConnector,
    proxy: Option<Proxy>,
    idle: Mutex<Option<Conn>>,
}

impl Connector {
    /// A connector for `host:port` (SNI and certificate name: `host`), with `client_config`'s
    /// trust anchors (and client certificate, if any), through `proxy` when given.
    pub fn new(
        host: &str,
        port: u16,
        client_config: Arc<ClientConfig>,
        proxy: Option<Proxy>,
    ) -> Result<Connector, InvalidHost> {
        let server_name =
            ServerName::try_from(host.to_string()).map_err(|_| InvalidHost(host.to_string()))?;
        Ok(Connector {
            host: host.to_string(),
            port,
            server_name,
            tls: TlsConnector::from(client_config),
            proxy,
            idle: Mutex::new(None),
        })
    }

    /// The endpoint host.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The endpoint port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The proxy in use, if any.
    pub fn proxy(&self) -> Option<&Proxy> {
        self.proxy.as_ref()
    }

    /// `host:port` of the endpoint, for messages.
    pub fn target(&self) -> String {
        host_port(&self.host, self.port)
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
            None => tcp_connect(&self.host, self.port).await?,
            Some(p) => {
                let mut s =
                    tcp_connect(&p.host, p.port)
                        .await
                        .map_err(|e| ConnectError::Proxy {
                            proxy: p.target(),
                            message: e.to_string(),
                        })?;
                proxy_connect(&mut s, p, &self.target()).await?;
                s
            }
        };
        self.tls
            .connect(self.server_name.clone(), tcp)
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

async fn tcp_connect(host: &str, port: u16) -> Result<TcpStream, ConnectError> {
    let addrs: Vec<_> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|source| ConnectError::Resolve {
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
    Err(ConnectError::Connect {
        target: host_port(host, port),
        source: last,
    })
}

async fn proxy_connect(s: &mut TcpStream, proxy: &Proxy, target: &str) -> Result<(), ConnectError> {
    let perr = |message: String| ConnectError::Proxy {
        proxy: proxy.target(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_urls() {
        assert_eq!(
            Proxy::parse("http://p.local:3128").unwrap(),
            Proxy {
                host: "p.local".into(),
                port: 3128
            }
        );
        assert_eq!(Proxy::parse("http://p.local/").unwrap().port, 3128);
        assert_eq!(Proxy::parse("p:8080").unwrap().port, 8080);
        assert!(Proxy::parse("https://p:1").is_err());
        assert!(Proxy::parse("http://u:pw@p:1").is_err());
    }

    #[test]
    fn no_proxy() {
        assert!(no_proxy_matches("*", "x.y"));
        assert!(no_proxy_matches(
            "a.com, .amazonaws.com",
            "c2.credentials.iot.eu-west-1.amazonaws.com"
        ));
        assert!(no_proxy_matches("amazonaws.com", "x.amazonaws.com"));
        assert!(no_proxy_matches("localhost,127.0.0.1", "127.0.0.1"));
        assert!(!no_proxy_matches("amazonaws.com", "notamazonaws.com"));
        assert!(!no_proxy_matches("", "x"));
    }

    #[test]
    fn host_ports() {
        assert_eq!(host_port("::1", 443), "[::1]:443");
        assert_eq!(host_port("a.b", 8443), "a.b:8443");
    }
}
