//! Network addresses as the configuration gives them, parsed once: `host[:port]`, a TLS server
//! (address plus the name its certificate must carry), `https://` URLs, and the HTTP CONNECT
//! proxy with its `HTTPS_PROXY`/`NO_PROXY` fallback.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

use rustls_pki_types::ServerName;

/// Why an address was refused. `Display` says what is wrong and what to write instead; the
/// caller adds which key (and value) it was.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// Nothing given.
    #[error("it is empty: give host[:port]")]
    Empty,
    /// `scheme://` where a bare `host[:port]` belongs.
    #[error("give host[:port] only, without a scheme")]
    Scheme,
    /// A character that has no place in `host[:port]` (space, `/`, `@`, …).
    #[error("{0:?} has no place in host[:port]")]
    Character(char),
    /// An IPv6 address without brackets.
    #[error("put an IPv6 address in brackets, e.g. [::1]:8443")]
    Unbracketed,
    /// `[…]` that is not an IPv6 address.
    #[error("[{0}] is not an IPv6 address")]
    Ipv6(String),
    /// The host is not a DNS name or IPv4 address.
    #[error(
        "{0:?} is not a host name: use letters, digits, '-', '_' and dots (labels of 1-63 characters)"
    )]
    Host(String),
    /// The port is not 1–65535.
    #[error("port {0:?} is not a TCP port (1-65535)")]
    Port(String),
    /// A URL that does not start with `https://`.
    #[error("use an https:// URL")]
    NotHttps,
    /// A URL with a query or fragment.
    #[error("give scheme, host, port and path only (no query or fragment)")]
    UrlExtras,
}

/// A `host:port` pair. The host is a DNS name, an IPv4 address or an IPv6 address (stored
/// without brackets; [`Display`](fmt::Display) adds them back).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HostPort {
    host: String,
    port: u16,
}

impl HostPort {
    /// Parses `host[:port]`, with IPv6 addresses in brackets (`[::1]:8443`); `default_port`
    /// when no port is given. Host names are ASCII (no IDNA).
    pub fn parse(s: &str, default_port: u16) -> Result<HostPort, AddressError> {
        if s.is_empty() {
            return Err(AddressError::Empty);
        }
        if s.contains("://") {
            return Err(AddressError::Scheme);
        }
        if let Some(c) = s
            .chars()
            .find(|c| c.is_whitespace() || c.is_control() || matches!(c, '/' | '@' | '?' | '#'))
        {
            return Err(AddressError::Character(c));
        }
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (h, after) = rest
                .split_once(']')
                .ok_or_else(|| AddressError::Ipv6(rest.to_string()))?;
            if h.parse::<Ipv6Addr>().is_err() {
                return Err(AddressError::Ipv6(h.to_string()));
            }
            match after {
                "" => (h, None),
                p => match p.strip_prefix(':') {
                    Some(p) => (h, Some(p)),
                    None => return Err(AddressError::Port(p.to_string())),
                },
            }
        } else {
            match s.split_once(':') {
                Some((_, p)) if p.contains(':') => return Err(AddressError::Unbracketed),
                Some((h, p)) => (valid_name(h)?, Some(p)),
                None => (valid_name(s)?, None),
            }
        };
        let port = match port {
            None => default_port,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => n,
                _ => return Err(AddressError::Port(p.to_string())),
            },
        };
        Ok(HostPort {
            host: host.to_string(),
            port,
        })
    }

    /// The host: a DNS name, or an IP address without brackets.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The host as an IP address, when it is one.
    pub fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }
}

/// `host:port`, `[v6]:port`: the form for `CONNECT` and messages.
impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// A DNS name or IPv4 address: labels of 1–63 of `[A-Za-z0-9_-]`, not starting or ending with
/// `-`, at most 253 characters, an optional trailing dot.
fn valid_name(host: &str) -> Result<&str, AddressError> {
    let bad = || AddressError::Host(host.to_string());
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.is_empty() || name.len() > 253 {
        return Err(if host.is_empty() {
            AddressError::Empty
        } else {
            bad()
        });
    }
    for label in name.split('.') {
        let ok = (1..=63).contains(&label.len())
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(bad());
        }
    }
    Ok(host)
}

/// A server reached over TLS: its address, and the name (DNS name or IP address) its
/// certificate is checked against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsServer {
    addr: HostPort,
    name: ServerName<'static>,
}

impl TlsServer {
    /// Parses `host[:port]` (see [`HostPort::parse`]) and checks that the host can name a TLS
    /// server.
    pub fn parse(s: &str, default_port: u16) -> Result<TlsServer, AddressError> {
        TlsServer::new(HostPort::parse(s, default_port)?)
    }

    fn new(addr: HostPort) -> Result<TlsServer, AddressError> {
        let name = ServerName::try_from(addr.host.clone())
            .map_err(|_| AddressError::Host(addr.host.clone()))?;
        Ok(TlsServer { addr, name })
    }

    /// Where to connect.
    pub fn addr(&self) -> &HostPort {
        &self.addr
    }

    /// The name the server's certificate must carry.
    pub fn server_name(&self) -> &ServerName<'static> {
        &self.name
    }
}

impl fmt::Display for TlsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.addr.fmt(f)
    }
}

/// An `https://host[:port][/path]` URL (no user info, query or fragment).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpsUrl {
    server: TlsServer,
    path: String,
}

impl HttpsUrl {
    /// Parses an `https://` URL; the port defaults to 443 and the path to `/`.
    pub fn parse(s: &str) -> Result<HttpsUrl, AddressError> {
        let rest = match s.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("https") => rest,
            _ => return Err(AddressError::NotHttps),
        };
        if rest.contains(['?', '#']) {
            return Err(AddressError::UrlExtras);
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, "/"),
        };
        if let Some(c) = path
            .chars()
            .find(|c| c.is_whitespace() || c.is_control() || !c.is_ascii())
        {
            return Err(AddressError::Character(c));
        }
        Ok(HttpsUrl {
            server: TlsServer::parse(authority, 443)?,
            path: path.to_string(),
        })
    }

    /// The server.
    pub fn server(&self) -> &TlsServer {
        &self.server
    }

    /// The path, starting with `/`.
    pub fn path(&self) -> &str {
        &self.path
    }
}

/// `https://host[:port]/path`, the port only when it is not 443.
impl fmt::Display for HttpsUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let a = self.server.addr();
        let host = if a.host().contains(':') {
            format!("[{}]", a.host())
        } else {
            a.host().to_string()
        };
        if a.port() == 443 {
            write!(f, "https://{host}{}", self.path)
        } else {
            write!(f, "https://{host}:{}{}", a.port(), self.path)
        }
    }
}

/// Why a proxy URL was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// Not `http://`.
    #[error("scheme {0:?} is not supported: use an http:// CONNECT proxy")]
    Scheme(String),
    /// `user:password@`.
    #[error("credentials in the proxy URL are not supported")]
    Credentials,
    /// A path other than `/`.
    #[error("give http://host[:port] without a path")]
    Path,
    /// The host or port.
    #[error("{0}")]
    Address(#[from] AddressError),
}

/// An HTTP CONNECT proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proxy {
    /// Where the proxy listens.
    pub addr: HostPort,
}

impl Proxy {
    /// The port when the URL names none.
    pub const DEFAULT_PORT: u16 = 3128;

    /// Parses `[http://]host[:port][/]`. Only plain-HTTP CONNECT proxies are supported.
    pub fn parse(url: &str) -> Result<Proxy, ProxyError> {
        let rest = match url.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some((scheme, _)) => return Err(ProxyError::Scheme(scheme.to_string())),
            None => url,
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('@') {
            return Err(ProxyError::Credentials);
        }
        if rest.contains('/') {
            return Err(ProxyError::Path);
        }
        Ok(Proxy {
            addr: HostPort::parse(rest, Self::DEFAULT_PORT)?,
        })
    }
}

/// The proxy variables of the environment, read once: `HTTPS_PROXY`/`https_proxy` and
/// `NO_PROXY`/`no_proxy` (empty values count as unset).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProxyEnv {
    /// `HTTPS_PROXY`, else `https_proxy`.
    pub https_proxy: Option<String>,
    /// `NO_PROXY`, else `no_proxy`.
    pub no_proxy: Option<String>,
}

impl ProxyEnv {
    /// Reads this process's environment.
    pub fn from_process() -> ProxyEnv {
        let var = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()))
        };
        ProxyEnv {
            https_proxy: var(&["HTTPS_PROXY", "https_proxy"]),
            no_proxy: var(&["NO_PROXY", "no_proxy"]),
        }
    }

    /// The proxy to use for `host`: none when `HTTPS_PROXY` is unset or `NO_PROXY` matches.
    pub fn proxy_for(&self, host: &str) -> Result<Option<Proxy>, ProxyError> {
        let Some(url) = &self.https_proxy else {
            return Ok(None);
        };
        if self
            .no_proxy
            .as_deref()
            .is_some_and(|no| no_proxy_matches(no, host))
        {
            return Ok(None);
        }
        Proxy::parse(url).map(Some)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn hp(s: &str) -> Result<(String, u16), AddressError> {
        HostPort::parse(s, 443).map(|h| (h.host().to_string(), h.port()))
    }

    #[test]
    fn host_port() {
        assert_eq!(hp("a.b:8443").unwrap(), ("a.b".into(), 8443));
        assert_eq!(hp("a.b").unwrap(), ("a.b".into(), 443));
        assert_eq!(hp("[::1]:9").unwrap(), ("::1".into(), 9));
        assert_eq!(hp("[::1]").unwrap(), ("::1".into(), 443));
        assert_eq!(hp("127.0.0.1:1").unwrap(), ("127.0.0.1".into(), 1));
        assert_eq!(hp("under_score.example").unwrap().1, 443);
        assert_eq!(hp("https://a.b"), Err(AddressError::Scheme));
        assert_eq!(hp(""), Err(AddressError::Empty));
        assert_eq!(hp("::1"), Err(AddressError::Unbracketed));
        assert!(matches!(hp("[::1"), Err(AddressError::Ipv6(_))));
        assert!(matches!(hp("[zz]:1"), Err(AddressError::Ipv6(_))));
        assert!(matches!(hp("[::1]x"), Err(AddressError::Port(_))));
        for bad_port in ["a.b:0", "a.b:x", "a.b:", "a.b:65536", "a.b:+1"] {
            assert!(
                matches!(hp(bad_port), Err(AddressError::Port(_))),
                "{bad_port}"
            );
        }
        for bad_host in ["-a.b", "a..b", ".a", "a b", "a/b", "ä.com", ":1"] {
            assert!(hp(bad_host).is_err(), "{bad_host}");
        }
        assert_eq!(hp("a b"), Err(AddressError::Character(' ')));
        assert_eq!(hp("u@h"), Err(AddressError::Character('@')));
        let long = format!("{}.com", "a".repeat(64));
        assert!(matches!(hp(&long), Err(AddressError::Host(_))));
    }

    #[test]
    fn display_adds_brackets() {
        assert_eq!(
            HostPort::parse("[::1]", 80).unwrap().to_string(),
            "[::1]:80"
        );
        assert_eq!(HostPort::parse("h", 80).unwrap().to_string(), "h:80");
        let ip = HostPort::parse("[fd00:ec2::23]:1", 80).unwrap().ip();
        assert_eq!(ip, Some("fd00:ec2::23".parse().unwrap()));
    }

    #[test]
    fn tls_server_and_urls() {
        let s = TlsServer::parse("sts.eu-west-1.amazonaws.com", 443).unwrap();
        assert_eq!(
            s.server_name(),
            &ServerName::try_from("sts.eu-west-1.amazonaws.com").unwrap()
        );
        let u = HttpsUrl::parse("https://sts.eu-west-1.amazonaws.com").unwrap();
        assert_eq!(u.path(), "/");
        assert_eq!(u.server().addr().port(), 443);
        assert_eq!(u.to_string(), "https://sts.eu-west-1.amazonaws.com/");
        let u = HttpsUrl::parse("HTTPS://[::1]:8443/sts").unwrap();
        assert_eq!(u.to_string(), "https://[::1]:8443/sts");
        assert_eq!(
            HttpsUrl::parse("http://sts.amazonaws.com"),
            Err(AddressError::NotHttps)
        );
        assert_eq!(
            HttpsUrl::parse("sts.amazonaws.com"),
            Err(AddressError::NotHttps)
        );
        assert_eq!(
            HttpsUrl::parse("https://h/?a=b"),
            Err(AddressError::UrlExtras)
        );
        assert_eq!(
            HttpsUrl::parse("https://u@h/"),
            Err(AddressError::Character('@'))
        );
        assert_eq!(HttpsUrl::parse("https:///"), Err(AddressError::Empty));
    }

    #[test]
    fn proxy_urls() {
        let p = |s: &str| Proxy::parse(s).map(|p| p.addr.to_string());
        assert_eq!(p("http://p.local:8080").unwrap(), "p.local:8080");
        assert_eq!(p("http://p.local/").unwrap(), "p.local:3128");
        assert_eq!(p("p:8080").unwrap(), "p:8080");
        assert_eq!(p("http://[::1]").unwrap(), "[::1]:3128");
        assert_eq!(p("https://p:1"), Err(ProxyError::Scheme("https".into())));
        assert_eq!(p("http://u:pw@p:1"), Err(ProxyError::Credentials));
        assert_eq!(p("http://p:1/x"), Err(ProxyError::Path));
        assert!(matches!(p("http://p:0"), Err(ProxyError::Address(_))));
    }

    #[test]
    fn proxy_from_env() {
        let env = ProxyEnv {
            https_proxy: Some("http://proxy:3128".into()),
            no_proxy: Some("localhost, .internal".into()),
        };
        assert_eq!(
            env.proxy_for("a.amazonaws.com")
                .unwrap()
                .unwrap()
                .addr
                .host(),
            "proxy"
        );
        assert_eq!(env.proxy_for("x.internal").unwrap(), None);
        assert_eq!(ProxyEnv::default().proxy_for("a").unwrap(), None);
        let bad = ProxyEnv {
            https_proxy: Some("socks5://p".into()),
            no_proxy: None,
        };
        assert!(bad.proxy_for("a").is_err());
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
}
