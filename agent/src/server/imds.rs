//! The IMDSv2-compatible endpoint (SPEC §4.4): one more listener of the same server (same
//! accept loop, limits and hostile-client protection), with EC2 instance-metadata routes for one
//! role.
//!
//! Order of checks: 400 (`Host` not a loopback name/address nor the listener's own address) →
//! 405 (method) → for the token `PUT`: 403 (`X-Forwarded-For`) → 400 (TTL) → 403 (peer uid,
//! §4.6); for every `GET`: 401 (no valid token) → 403 (peer uid) → 404 (path or role name) →
//! 503 (no servable credentials, with `Retry-After`). A `GET` needs a token whatever its path,
//! as on EC2 with IMDSv2 required: unauthenticated clients learn nothing, not even which paths
//! exist.
//!
//! Tokens are self-authenticating: 8 bytes of expiry (milliseconds on this process's monotonic
//! clock) and an HMAC-SHA256 over them with a key drawn at start-up, hex-encoded (80
//! characters). Nothing is stored per token; a restart invalidates them all (SDKs then ask for a
//! new one); a wall-clock jump changes nothing.
//!
//! `Host`: SDKs send the address of `AWS_EC2_METADATA_SERVICE_ENDPOINT` (an IP literal, or
//! `localhost`). A web page that rebinds its DNS name to 127.0.0.1 can send the token `PUT` and
//! the `GET`s from a browser on the gateway (same-origin, so no CORS preflight stops it); its
//! requests carry its own name in `Host`. Such requests are refused with 400, as on the §4.1
//! listener.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use iotcred_core::UnixTime;
use iotcred_core::render::Format;
use ring::hmac;
use tokio::net::{TcpListener, TcpSocket};
use zeroize::Zeroizing;

use super::handler::{Body, BodyCache, Chunk, loopback_host, tcp_peer_allowed};
use super::{ServeError, Shared};
use crate::peer::TcpPeer;
use crate::state::{NotReady, RoleHandle, Served};

/// `[serve.imds]` as the server uses it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImdsConfig {
    /// Listening address.
    pub listen: SocketAddr,
    /// The role served.
    pub role: Arc<str>,
    /// IP TTL / IPv6 unicast hop limit of every connection.
    pub hop_limit: u8,
    /// Peers allowed (SPEC §4.6); empty = anyone holding a token.
    pub allow_uids: Arc<[u32]>,
    /// What `placement/region` answers (`None`: 404).
    pub region: Option<Arc<str>>,
}

impl ImdsConfig {
    /// The `[serve.imds]` section (its region already defaults to the endpoint host's).
    pub fn from_config(config: &crate::config::Config) -> Option<ImdsConfig> {
        let i = config.serve.imds.as_ref()?;
        let region = i.region.as_deref();
        Some(ImdsConfig {
            listen: i.listen,
            role: i.role.as_str().into(),
            hop_limit: i.hop_limit,
            allow_uids: i.allow_uids.as_slice().into(),
            region: region.map(Arc::from),
        })
    }
}

/// The running endpoint: its settings and token key.
#[derive(Debug)]
pub(super) struct Imds {
    cfg: ImdsConfig,
    tokens: Tokens,
}

impl Imds {
    pub(super) fn hop_limit(&self) -> u8 {
        self.cfg.hop_limit
    }
}

/// Binds the IMDS listener with the hop limit already set (so that the handshake's SYN-ACK
/// carries it, and accepted sockets inherit it), and draws the token key.
pub(super) async fn bind(cfg: &ImdsConfig) -> Result<(TcpListener, Arc<Imds>), ServeError> {
    let addr = cfg.listen;
    // Defence in depth: the configuration refused anything else already (SPEC §4.5, §7).
    if !crate::config::Listener::Imds.allows(addr.ip()) {
        return Err(ServeError::ImdsNotAllowed(addr));
    }
    let err = |source| ServeError::ImdsListen { addr, source };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    set_hop_limit(&socket, addr.is_ipv4(), cfg.hop_limit).map_err(err)?;
    socket
        .bind(addr)
        .map_err(|source| super::listen::bind_error(addr, source, err))?;
    let listener = socket.listen(1024).map_err(err)?;
    let imds = Imds {
        cfg: cfg.clone(),
        tokens: Tokens::new()?,
    };
    Ok((listener, Arc::new(imds)))
}

/// Sets `IP_TTL` (IPv4) or `IPV6_UNICAST_HOPS` (IPv6) on a socket.
pub(super) fn set_hop_limit(s: &impl AsRawFd, ipv4: bool, hops: u8) -> std::io::Result<()> {
    let value = libc::c_int::from(hops);
    let (level, name) = if ipv4 {
        (libc::IPPROTO_IP, libc::IP_TTL)
    } else {
        (libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS)
    };
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from `value`, which lives across the
    // call; the descriptor is borrowed from a live socket.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

const TOKEN_PATH: &str = "/latest/api/token";
const CREDENTIALS_PATH: &str = "/latest/meta-data/iam/security-credentials/";
const REGION_PATH: &str = "/latest/meta-data/placement/region";
const TTL_HEADER: HeaderName = HeaderName::from_static("x-aws-ec2-metadata-token-ttl-seconds");
const TOKEN_HEADER: HeaderName = HeaderName::from_static("x-aws-ec2-metadata-token");
const MAX_TTL: u32 = 21_600;

/// Answers one request on the IMDS listener.
pub(super) async fn handle(
    shared: &Shared,
    peer: &TcpPeer,
    cache: &BodyCache,
    req: &Request<Incoming>,
) -> Response<Body> {
    let Some(imds) = shared.imds.as_deref() else {
        return text(StatusCode::NOT_FOUND, NOT_FOUND);
    };
    if !host_ok(req, imds.cfg.listen) {
        return text(StatusCode::BAD_REQUEST, BAD_HOST);
    }
    let path = req.uri().path();
    let headers = req.headers();
    if path == TOKEN_PATH {
        if req.method() != Method::PUT {
            return not_allowed("PUT");
        }
        return put_token(imds, peer, headers);
    }
    if req.method() != Method::GET {
        return not_allowed("GET");
    }
    let token_ok = {
        let mut given = headers.get_all(TOKEN_HEADER).iter();
        match (given.next(), given.next()) {
            (Some(t), None) => imds.tokens.valid(t.as_bytes(), imds.tokens.now_ms()),
            _ => false,
        }
    };
    if !token_ok {
        return text(StatusCode::UNAUTHORIZED, UNAUTHORIZED);
    }
    if !tcp_peer_allowed(&imds.cfg.allow_uids, peer) {
        return text(StatusCode::FORBIDDEN, FORBIDDEN);
    }
    if path == CREDENTIALS_PATH {
        let mut r = Response::new(Full::new(Chunk::Owned(
            imds.cfg.role.as_bytes().to_vec(),
            0,
        )));
        set_text(&mut r);
        return r;
    }
    if path == REGION_PATH {
        return match &imds.cfg.region {
            Some(region) => {
                let mut r = Response::new(Full::new(Chunk::Owned(region.as_bytes().to_vec(), 0)));
                set_text(&mut r);
                r
            }
            None => text(StatusCode::NOT_FOUND, NO_REGION),
        };
    }
    match path.strip_prefix(CREDENTIALS_PATH) {
        Some(name) if name == &*imds.cfg.role => credentials(shared, imds, cache).await,
        _ => text(StatusCode::NOT_FOUND, NOT_FOUND),
    }
}

fn put_token(imds: &Imds, peer: &TcpPeer, headers: &HeaderMap) -> Response<Body> {
    if headers.contains_key("x-forwarded-for") {
        return text(StatusCode::FORBIDDEN, FORWARDED);
    }
    let mut values = headers.get_all(TTL_HEADER).iter();
    let ttl = match (values.next(), values.next()) {
        (Some(v), None) => parse_ttl(v.as_bytes()),
        _ => None,
    };
    let Some(ttl) = ttl else {
        return text(StatusCode::BAD_REQUEST, BAD_TTL);
    };
    if !tcp_peer_allowed(&imds.cfg.allow_uids, peer) {
        return text(StatusCode::FORBIDDEN, FORBIDDEN);
    }
    let token = imds.tokens.issue(imds.tokens.now_ms(), ttl);
    let bytes = Arc::new(Zeroizing::new(token.as_bytes().to_vec()));
    let mut r = Response::new(Full::new(Chunk::Secret(bytes, 0)));
    set_text(&mut r);
    r.headers_mut().insert(TTL_HEADER, HeaderValue::from(ttl));
    r
}

/// `1..=21600`, in decimal digits only.
fn parse_ttl(v: &[u8]) -> Option<u32> {
    if v.is_empty() || v.len() > 10 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(v).ok()?.parse().ok()?;
    u32::try_from(n).ok().filter(|n| (1..=MAX_TTL).contains(n))
}

// What the endpoint needs of the role state, in two functions: the one place that knows how
// role state is read.

/// Servable credentials with the skew-corrected expiration (§3), or why not (with the wait
/// and single flight of §4.1).
async fn servable(role: &RoleHandle, wait: Duration) -> Result<Served, NotReady> {
    role.credentials(wait).await
}

/// When the agent obtained `served`, on the device's wall clock. Read only when a body is
/// rendered (once per connection and credentials); if the role was refreshed in between, the
/// time is now (the body then carries the previous credentials, which are still valid).
fn obtained(role: &RoleHandle, served: &Served) -> UnixTime {
    let wall = UnixTime::now();
    let state = role.state();
    match &state.credentials {
        Some(c) if Arc::ptr_eq(c, &served.credentials) => {
            state.last_refresh(role.now(), wall).unwrap_or(wall)
        }
        _ => wall,
    }
}

async fn credentials(shared: &Shared, imds: &Imds, cache: &BodyCache) -> Response<Body> {
    let table = shared.state.table();
    let Some(role) = table.roles.iter().find(|r| r.name == imds.cfg.role) else {
        // The role went away in a reload; `[serve]` changes wait for a restart.
        return unavailable(Duration::from_secs(60));
    };
    match servable(role, shared.state.request_wait).await {
        Ok(served) => {
            let body = cache.body_with(&served, |s| render(s, obtained(role, s)));
            let mut r = Response::new(Full::new(Chunk::Secret(body, 0)));
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r
        }
        Err(not_ready) => unavailable(not_ready.retry_after),
    }
}

/// `{"Code":"Success","LastUpdated":…,"Type":"AWS-HMAC",` followed by the §4.1 body's fields.
fn render(served: &Served, obtained: UnixTime) -> Zeroizing<Vec<u8>> {
    let inner = Format::ContainerJson.render("", &served.credentials, served.expiration);
    let prefix = format!(
        "{{\"Code\":\"Success\",\"LastUpdated\":\"{}\",\"Type\":\"AWS-HMAC\",",
        obtained.rfc3339()
    );
    let fields = inner.as_bytes().get(1..).unwrap_or_default();
    let mut out = Zeroizing::new(Vec::with_capacity(prefix.len() + fields.len()));
    out.extend_from_slice(prefix.as_bytes());
    out.extend_from_slice(fields);
    out
}

/// `Host` (exactly one) and an absolute-form target's authority must be a loopback name or
/// address, or the listener's own address.
fn host_ok(req: &Request<Incoming>, listen: SocketAddr) -> bool {
    let ok = |h: &str| loopback_host(h) || own_address(h, listen.ip());
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host_ok = match (hosts.next(), hosts.next()) {
        (Some(h), None) => h.to_str().map(ok).unwrap_or(false),
        _ => false,
    };
    host_ok && req.uri().authority().is_none_or(|a| ok(a.as_str()))
}

/// `host[:port]` naming `ip` literally (IPv6 in brackets).
fn own_address(host: &str, ip: IpAddr) -> bool {
    let (addr, port) = match host.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((a, after)) => (a, after.strip_prefix(':').map(Some).unwrap_or(None)),
            None => return false,
        },
        None => match host.split_once(':') {
            Some((a, p)) => (a, Some(p)),
            None => (host, None),
        },
    };
    let port_ok =
        port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()));
    let bracket_ok = host.starts_with('[') == ip.is_ipv6();
    port_ok && bracket_ok && addr.parse::<IpAddr>().is_ok_and(|a| a == ip)
}

/// Self-authenticating session tokens: expiry and MAC, no table.
#[derive(Debug)]
struct Tokens {
    key: hmac::Key,
    epoch: std::time::Instant,
}

/// Hex of 8 bytes of expiry and 32 bytes of HMAC-SHA256.
const TOKEN_LEN: usize = 2 * (8 + 32);

impl Tokens {
    fn new() -> Result<Tokens, ServeError> {
        let mut seed = Zeroizing::new([0u8; 32]);
        getrandom::fill(&mut *seed).map_err(|e| ServeError::Random(e.to_string()))?;
        Ok(Tokens::with_key(&*seed))
    }

    fn with_key(key: &[u8]) -> Tokens {
        Tokens {
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
            epoch: std::time::Instant::now(),
        }
    }

    /// Milliseconds since this process drew the key (the monotonic clock).
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// A token valid for `ttl` seconds from `now_ms`.
    fn issue(&self, now_ms: u64, ttl: u32) -> Zeroizing<String> {
        let expiry = now_ms.saturating_add(u64::from(ttl) * 1000).to_be_bytes();
        let tag = hmac::sign(&self.key, &expiry);
        let mut out = Zeroizing::new(String::with_capacity(TOKEN_LEN));
        push_hex(&mut out, &expiry);
        push_hex(&mut out, tag.as_ref());
        out
    }

    /// Whether `token` was issued with this key and has not expired at `now_ms`. The MAC is
    /// checked in constant time (`ring::hmac::verify`).
    fn valid(&self, token: &[u8], now_ms: u64) -> bool {
        if token.len() != TOKEN_LEN {
            return false;
        }
        let (Some(expiry), Some(tag)) = (unhex::<8>(&token[..16]), unhex::<32>(&token[16..]))
        else {
            return false;
        };
        hmac::verify(&self.key, &expiry, &tag).is_ok() && now_ms < u64::from_be_bytes(expiry)
    }
}

fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 15)]));
    }
}

/// Lowercase hex of exactly `N` bytes.
fn unhex<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    fn digit(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (o, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
        *o = (digit(pair[0])? << 4) | digit(pair[1])?;
    }
    Some(out)
}

const BAD_HOST: &str =
    "Bad Request: the Host header must be a loopback name or address, or this listener's address\n";
const BAD_TTL: &str =
    "Bad Request: send X-aws-ec2-metadata-token-ttl-seconds with a value from 1 to 21600\n";
const FORWARDED: &str = "Forbidden: a token request must not carry X-Forwarded-For\n";
const UNAUTHORIZED: &str = "Unauthorized: IMDSv2 only; PUT /latest/api/token first and send its answer in X-aws-ec2-metadata-token\n";
const FORBIDDEN: &str =
    "Forbidden: this local user is not allowed; add its uid to [serve.imds] allow_uids\n";
const NOT_FOUND: &str = "Not Found\n";
const NO_REGION: &str = "Not Found: no region is known; set [serve.imds] region\n";
const UNAVAILABLE: &str =
    "Service Unavailable: no valid credentials yet; retry after the time in Retry-After\n";

fn set_text(r: &mut Response<Body>) {
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(Full::new(Chunk::Static(body.as_bytes())));
    *r.status_mut() = status;
    set_text(&mut r);
    r
}

fn not_allowed(allow: &'static str) -> Response<Body> {
    let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed\n");
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}

fn unavailable(retry_after: Duration) -> Response<Body> {
    let mut r = text(StatusCode::SERVICE_UNAVAILABLE, UNAVAILABLE);
    let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_expire_on_the_injected_clock() {
        let t = Tokens::with_key(b"k");
        let tok = t.issue(5_000, 1);
        assert_eq!(tok.len(), TOKEN_LEN);
        assert!(tok.bytes().all(|b| b.is_ascii_graphic()));
        assert!(t.valid(tok.as_bytes(), 5_000));
        assert!(t.valid(tok.as_bytes(), 5_999));
        assert!(!t.valid(tok.as_bytes(), 6_000), "expired at issue + TTL");
        let long = t.issue(0, MAX_TTL);
        assert!(t.valid(long.as_bytes(), 21_599_999));
        assert!(!t.valid(long.as_bytes(), 21_600_000));
    }

    #[test]
    fn tokens_cannot_be_forged_or_extended() {
        let t = Tokens::with_key(b"k");
        let tok = t.issue(0, 60);
        // Another key (another agent, or this one after a restart) does not accept it.
        assert!(!Tokens::with_key(b"other").valid(tok.as_bytes(), 0));
        // A later expiry with the old MAC is refused.
        let mut extended = tok.as_bytes().to_vec();
        extended[0] = b'f';
        assert!(!t.valid(&extended, 0));
        // Every single-character change is refused; so are truncation and other lengths.
        for i in 0..tok.len() {
            let mut bad = tok.as_bytes().to_vec();
            bad[i] = if bad[i] == b'0' { b'1' } else { b'0' };
            assert!(!t.valid(&bad, 0), "position {i}");
        }
        assert!(!t.valid(&tok.as_bytes()[..TOKEN_LEN - 1], 0));
        assert!(!t.valid(b"", 0));
        assert!(!t.valid(tok.to_uppercase().as_bytes(), 0));
    }

    #[test]
    fn ttl_values() {
        for (v, want) in [
            ("1", Some(1)),
            ("21600", Some(21600)),
            ("0060", Some(60)),
            ("0", None),
            ("21601", None),
            ("", None),
            ("-1", None),
            ("1.5", None),
            ("99999999999", None),
            ("6O", None),
        ] {
            assert_eq!(parse_ttl(v.as_bytes()), want, "{v:?}");
        }
    }

    #[test]
    fn own_addresses() {
        let v4: IpAddr = "169.254.169.254".parse().unwrap();
        let v6: IpAddr = "fd00:ec2::254".parse().unwrap();
        assert!(own_address("169.254.169.254", v4));
        assert!(own_address("169.254.169.254:80", v4));
        assert!(!own_address("169.254.169.253", v4));
        assert!(!own_address("169.254.169.254:", v4));
        assert!(!own_address("evil.example", v4));
        assert!(own_address("[fd00:ec2::254]", v6));
        assert!(own_address("[fd00:ec2::254]:80", v6));
        assert!(!own_address("fd00:ec2::254", v6));
        assert!(!own_address("[fd00:ec2::254", v6));
    }

    #[test]
    fn hop_limit_is_set_on_accepted_sockets() {
        use std::os::fd::AsRawFd;
        fn get(fd: &impl AsRawFd, level: libc::c_int, name: libc::c_int) -> libc::c_int {
            let mut v: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: getsockopt writes at most `len` bytes into `v`.
            let rc = unsafe {
                libc::getsockopt(
                    fd.as_raw_fd(),
                    level,
                    name,
                    (&raw mut v).cast(),
                    &raw mut len,
                )
            };
            assert_eq!(rc, 0);
            v
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            for (addr, level, name, hops) in [
                ("127.0.0.1:0", libc::IPPROTO_IP, libc::IP_TTL, 1u8),
                ("127.0.0.1:0", libc::IPPROTO_IP, libc::IP_TTL, 7),
                ("[::1]:0", libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS, 1),
            ] {
                let cfg = ImdsConfig {
                    listen: addr.parse().unwrap(),
                    role: "default".into(),
                    hop_limit: hops,
                    allow_uids: Arc::from([]),
                    region: None,
                };
                let Ok((l, imds)) = bind(&cfg).await else {
                    eprintln!("skipping {addr}: cannot bind");
                    continue;
                };
                let client = tokio::net::TcpStream::connect(l.local_addr().unwrap());
                let (accepted, _) = tokio::join!(
                    super::super::accept_tcp(Some(&l), Some(imds.hop_limit())),
                    client
                );
                let (s, peer) = accepted.unwrap();
                assert_eq!(get(&s, level, name), libc::c_int::from(hops), "{addr}");
                assert_eq!(peer.remote(), s.peer_addr().unwrap());
            }
        });
    }
}
