//! Routing and answers of SPEC §4.1.
//!
//! Order of checks: (TCP only) 400 for a `Host` that does not name the listener (a loopback
//! name on a loopback listener, the listener's own address on a link-local listener of §4.5) or
//! any `X-Forwarded-For` → 405 for anything but `GET` → 404 for an unknown route or role → 401
//! (TCP: token) → 403 (socket: peer credentials; TCP: peer uid of §4.6 when the role has
//! `allow_uids`) → 503 when no credentials can be served. The query string and any request body
//! are ignored.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex, Weak};

use bytes::Buf;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use iotcred_core::render::Format;
use iotcred_core::schedule::Health;
use iotcred_core::{Credentials, UnixTime};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::Shared;
use crate::metrics::Route;
use crate::peer::TcpPeer;
use crate::state::{RoleHandle, Served};

/// Who is on the other end of a connection.
#[derive(Clone, Debug)]
pub(super) enum Peer {
    /// The TCP listener (loopback or link-local, §4.5): token authorization, `Host` checks
    /// against the connection's local address, and the peer's uid (§4.6) for roles with
    /// `allow_uids`.
    Tcp(Arc<TcpPeer>),
    /// The IMDS listener (§4.4).
    Imds(Arc<TcpPeer>),
    /// The Unix socket, with the peer's credentials (`SO_PEERCRED`) when the kernel gave them.
    Unix { uid: Option<u32>, gid: Option<u32> },
}

/// A response body chunk: static text, owned bytes, or secret bytes (shared with the
/// connection's [`BodyCache`]) zeroized when the last reference is dropped.
#[derive(Debug)]
pub(super) enum Chunk {
    Static(&'static [u8]),
    Owned(Vec<u8>, usize),
    Secret(Arc<Zeroizing<Vec<u8>>>, usize),
}

impl Buf for Chunk {
    fn remaining(&self) -> usize {
        match self {
            Chunk::Static(s) => s.len(),
            Chunk::Owned(v, pos) => v.len() - pos,
            Chunk::Secret(v, pos) => v.len() - pos,
        }
    }

    fn chunk(&self) -> &[u8] {
        match self {
            Chunk::Static(s) => s,
            Chunk::Owned(v, pos) => &v[*pos..],
            Chunk::Secret(v, pos) => &v[*pos..],
        }
    }

    fn advance(&mut self, cnt: usize) {
        match self {
            Chunk::Static(s) => *s = &s[cnt.min(s.len())..],
            Chunk::Owned(v, pos) => *pos = (*pos + cnt).min(v.len()),
            Chunk::Secret(v, pos) => *pos = (*pos + cnt).min(v.len()),
        }
    }
}

pub(super) type Body = Full<Chunk>;

const JSON: HeaderValue = HeaderValue::from_static("application/json");
const NO_STORE: HeaderValue = HeaderValue::from_static("no-store");
const PROMETHEUS: HeaderValue =
    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8");

/// Answers one request; never fails (every problem is an HTTP error response).
pub(super) async fn handle(
    shared: &Shared,
    peer: &Peer,
    cache: &BodyCache,
    req: Request<Incoming>,
) -> Response<Body> {
    let (route, resp) = match peer {
        Peer::Imds(p) => (
            Route::Imds,
            super::imds::handle(shared, p, cache, &req).await,
        ),
        _ => route(shared, peer, cache, &req).await,
    };
    shared.state.metrics.request(route, resp.status().as_u16());
    resp
}

/// The last credentials body a connection answered with, reused while the role still holds
/// the same credentials and the expiration shown (whole seconds) is the same: rendering the
/// JSON (escaping it character by character) was the largest user-space cost of serving.
///
/// One per connection (requests on a connection are answered one at a time, so the lock is
/// never contended). It does not keep the credentials alive (`Weak`); the rendered bytes are
/// zeroized when the connection closes or the entry is replaced.
#[derive(Debug, Default)]
pub(super) struct BodyCache(Mutex<Option<CachedBody>>);

#[derive(Debug)]
struct CachedBody {
    credentials: Weak<Credentials>,
    expiration: UnixTime,
    body: Arc<Zeroizing<Vec<u8>>>,
}

impl BodyCache {
    /// The body for `served` of `role`: the cached one when it was rendered from the same
    /// credentials and expiration, else a new rendering (which replaces the cached one).
    fn body(&self, role: &str, served: &Served) -> Arc<Zeroizing<Vec<u8>>> {
        self.body_with(served, |served| {
            let mut text =
                Format::ContainerJson.render(role, &served.credentials, served.expiration);
            Zeroizing::new(std::mem::take(&mut *text).into_bytes())
        })
    }

    /// [`BodyCache::body`] with the rendering given by the caller (one connection serves one
    /// kind of body).
    pub(super) fn body_with(
        &self,
        served: &Served,
        render: impl FnOnce(&Served) -> Zeroizing<Vec<u8>>,
    ) -> Arc<Zeroizing<Vec<u8>>> {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = slot.as_ref() {
            if c.expiration == served.expiration
                && std::ptr::eq(c.credentials.as_ptr(), Arc::as_ptr(&served.credentials))
            {
                return c.body.clone();
            }
        }
        let body = Arc::new(render(served));
        *slot = Some(CachedBody {
            credentials: Arc::downgrade(&served.credentials),
            expiration: served.expiration,
            body: body.clone(),
        });
        body
    }
}

enum Target<'a> {
    Credentials(Option<&'a str>),
    Health,
    Metrics,
}

fn target(path: &str) -> Option<Target<'_>> {
    match path {
        "/v1/credentials" => Some(Target::Credentials(None)),
        "/v1/health" => Some(Target::Health),
        "/v1/metrics" => Some(Target::Metrics),
        _ => path
            .strip_prefix("/v1/credentials/")
            .filter(|r| !r.is_empty() && !r.contains('/'))
            .map(|r| Target::Credentials(Some(r))),
    }
}

async fn route(
    shared: &Shared,
    peer: &Peer,
    cache: &BodyCache,
    req: &Request<Incoming>,
) -> (Route, Response<Body>) {
    let target = target(req.uri().path());
    let route = match target {
        Some(Target::Credentials(_)) => Route::Credentials,
        Some(Target::Health) => Route::Health,
        Some(Target::Metrics) => Route::Metrics,
        None => Route::Other,
    };
    if let Peer::Tcp(tcp) = peer {
        if !loopback_request(req, tcp.local().ip()) {
            return (route, error(StatusCode::BAD_REQUEST, BAD_REQUEST));
        }
    }
    if let (Peer::Unix { uid, .. }, Some(kind)) = (peer, identity_target(req)) {
        return (
            Route::Other,
            identity_job(shared, *uid, kind, req.method()).await,
        );
    }
    if req.method() != Method::GET {
        let mut r = error(StatusCode::METHOD_NOT_ALLOWED, METHOD_NOT_ALLOWED);
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET"));
        return (route, r);
    }
    let resp = match target {
        None => error(StatusCode::NOT_FOUND, NOT_FOUND),
        Some(Target::Health) => health(
            &shared.state.table().roles,
            shared.state.lifecycle().map(|l| &l.status),
        ),
        Some(Target::Metrics) => metrics(shared),
        Some(Target::Credentials(name)) => {
            credentials(shared, peer, cache, name, req.headers()).await
        }
    };
    (route, resp)
}

/// TCP only: `Host` (and an absolute-form target's authority) must name the listener (see
/// [`listener_host`]), and no `X-Forwarded-For` may be present — this defeats DNS rebinding
/// and requests relayed by a proxy on the device.
fn loopback_request(req: &Request<Incoming>, local: IpAddr) -> bool {
    let headers = req.headers();
    if headers.contains_key("x-forwarded-for") {
        return false;
    }
    let mut hosts = headers.get_all(header::HOST).iter();
    let host_ok = match (hosts.next(), hosts.next()) {
        (Some(h), None) => h.to_str().is_ok_and(|h| listener_host(h, local)),
        _ => false,
    };
    host_ok
        && req
            .uri()
            .authority()
            .is_none_or(|a| listener_host(a.as_str(), local))
}

/// Whether `host` (a `Host` value, optional port) names a listener whose connection arrived on
/// `local`: on a loopback listener, a loopback name or address ([`loopback_host`]); on a
/// link-local listener of §4.5, that very address (IPv6 in brackets), and nothing else.
pub(super) fn listener_host(host: &str, local: IpAddr) -> bool {
    let local = local.to_canonical();
    if local.is_loopback() {
        return loopback_host(host);
    }
    if !crate::config::Listener::Imds.allows(local) {
        return false;
    }
    if let Some(rest) = host.strip_prefix('[') {
        let Some((addr, after)) = rest.split_once(']') else {
            return false;
        };
        return (after.is_empty() || after.strip_prefix(':').is_some_and(port))
            && addr
                .parse::<Ipv6Addr>()
                .is_ok_and(|a| IpAddr::V6(a) == local);
    }
    let name = match host.split_once(':') {
        Some((name, p)) if port(p) => name,
        Some(_) => return false,
        None => host,
    };
    name.parse::<Ipv4Addr>()
        .is_ok_and(|a| IpAddr::V4(a) == local)
}

/// `localhost`, `127.x.y.z` or `[::1]`, each with an optional port.
pub(super) fn loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        let Some((addr, after)) = rest.split_once(']') else {
            return false;
        };
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(port)) {
            return false;
        }
        return addr == "::1";
    } else {
        match host.split_once(':') {
            Some((name, p)) if port(p) => name,
            Some(_) => return false,
            None => host,
        }
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<Ipv4Addr>()
            .is_ok_and(|ip| ip.octets()[0] == 127)
}

fn port(p: &str) -> bool {
    !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit())
}

async fn credentials(
    shared: &Shared,
    peer: &Peer,
    cache: &BodyCache,
    name: Option<&str>,
    headers: &HeaderMap,
) -> Response<Body> {
    let table = shared.state.table();
    let roles = &table.roles;
    let index = match name {
        None => (!roles.is_empty()).then_some(0),
        Some(n) => roles.iter().position(|r| &*r.name == n),
    };
    let Some(index) = index else {
        return error(StatusCode::NOT_FOUND, UNKNOWN_ROLE);
    };
    let role = &roles[index];
    match peer {
        Peer::Tcp(tcp) => {
            let given = headers
                .get(header::AUTHORIZATION)
                .map(HeaderValue::as_bytes)
                .unwrap_or(b"");
            let ok = table.tokens[index]
                .as_ref()
                .is_some_and(|t| bool::from(t.as_bytes().ct_eq(given)));
            if !ok {
                return error(StatusCode::UNAUTHORIZED, UNAUTHORIZED);
            }
            if !tcp_peer_allowed(&role.allow_uids, tcp) {
                return error(StatusCode::FORBIDDEN, FORBIDDEN_TCP);
            }
        }
        Peer::Unix { uid, gid } => {
            if !peer_allowed(role, *uid, *gid) {
                return error(StatusCode::FORBIDDEN, FORBIDDEN);
            }
        }
        // Routed to the IMDS handler before this point.
        Peer::Imds(_) => return error(StatusCode::NOT_FOUND, NOT_FOUND),
    }
    match role.credentials(shared.state.request_wait).await {
        Ok(served) => {
            let bytes = cache.body(&role.name, &served);
            let mut r = Response::new(Full::new(Chunk::Secret(bytes, 0)));
            let h = r.headers_mut();
            h.insert(header::CONTENT_TYPE, JSON);
            h.insert(header::CACHE_CONTROL, NO_STORE);
            r
        }
        Err(not_ready) => {
            let mut r = error(StatusCode::SERVICE_UNAVAILABLE, UNAVAILABLE);
            let secs = not_ready.retry_after.as_secs()
                + u64::from(not_ready.retry_after.subsec_nanos() > 0);
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
            r
        }
    }
}

/// SPEC §4.6: with `allow_uids` set, a TCP peer must be one of those users (a peer whose uid
/// cannot be found is refused); without it, the token alone decides.
pub(super) fn tcp_peer_allowed(allow_uids: &[u32], peer: &TcpPeer) -> bool {
    allow_uids.is_empty() || peer.uid().is_some_and(|u| allow_uids.contains(&u))
}

fn peer_allowed(role: &RoleHandle, uid: Option<u32>, gid: Option<u32>) -> bool {
    if role.allow_uids.is_empty() && role.allow_gids.is_empty() {
        return true;
    }
    uid.is_some_and(|u| role.allow_uids.contains(&u))
        || gid.is_some_and(|g| role.allow_gids.contains(&g))
}

/// `POST /v1/identity/provision` and `POST /v1/identity/rotate[?force=true]` (Unix socket only).
fn identity_target(req: &Request<Incoming>) -> Option<super::JobKind> {
    match req.uri().path() {
        "/v1/identity/provision" => Some(super::JobKind::Provision),
        "/v1/identity/rotate" => Some(super::JobKind::Rotate {
            force: req
                .uri()
                .query()
                .is_some_and(|q| q.split('&').any(|kv| kv == "force=true" || kv == "force=1")),
        }),
        _ => None,
    }
}

/// Runs an identity job for a peer that is root or the agent's own user, and answers
/// `{"exit":N,"message":"…"}` when it has finished.
async fn identity_job(
    shared: &Shared,
    uid: Option<u32>,
    kind: super::JobKind,
    method: &Method,
) -> Response<Body> {
    if method != Method::POST {
        let mut r = error(StatusCode::METHOD_NOT_ALLOWED, METHOD_NOT_ALLOWED_POST);
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return r;
    }
    // SAFETY: geteuid has no preconditions.
    let own = unsafe { libc::geteuid() };
    if !uid.is_some_and(|u| u == 0 || u == own) {
        return error(StatusCode::FORBIDDEN, IDENTITY_FORBIDDEN);
    }
    let Some(lifecycle) = shared.state.lifecycle() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, IDENTITY_UNAVAILABLE);
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job = super::IdentityJob {
        kind,
        reply: Some(tx),
    };
    if lifecycle.jobs.send(job).await.is_err() {
        return error(StatusCode::SERVICE_UNAVAILABLE, IDENTITY_UNAVAILABLE);
    }
    let (exit, message) = match rx.await {
        Ok(r) => r,
        Err(_) => (
            crate::exit::Exit::Other,
            "the agent stopped before the job finished".to_string(),
        ),
    };
    let body = serde_json::json!({ "exit": exit.code(), "message": message });
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    let mut r = Response::new(Full::new(Chunk::Owned(bytes, 0)));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, JSON);
    h.insert(header::CACHE_CONTROL, NO_STORE);
    r
}

fn health(roles: &[RoleHandle], identity: Option<&crate::lifecycle::Status>) -> Response<Body> {
    let wall = UnixTime::now();
    let mut all_healthy = true;
    let list: Vec<serde_json::Value> = roles
        .iter()
        .map(|role| {
            let now = role.now();
            let state = role.state();
            let schedule = &state.schedule;
            let healthy = schedule.healthy(now);
            all_healthy &= healthy;
            let label = match schedule.health(now) {
                Health::Fresh => "healthy",
                Health::Refreshing => "refreshing",
                Health::Empty if healthy => "idle",
                Health::Empty | Health::Expired => "unavailable",
            };
            let remaining = schedule.remaining(now).filter(|d| !d.is_zero());
            serde_json::json!({
                "name": &*role.name,
                "mode": schedule.config().mode.as_str(),
                "state": label,
                "healthy": healthy,
                "expiration": remaining.map(|d| wall.saturating_add(d).rfc3339().to_string()),
                "remaining_seconds": remaining.map(|d| d.as_secs()),
                "refresh_at": schedule.refresh_at().map(|t| state.wall_time(t, now, wall).rfc3339().to_string()),
                "last_refresh": state.last_refresh(now, wall).map(|t| t.rfc3339().to_string()),
                "last_failure": state.last_failure.map(|t| t.rfc3339().to_string()),
                "last_error": state.last_error.as_deref(),
                "failures": schedule.failures(),
                "fetching": schedule.in_flight(),
                "next_attempt_in_seconds": schedule.poll_timeout().map(|t| t.saturating_duration_since(now).as_secs()),
            })
        })
        .collect();
    let mut body = serde_json::json!({
        "status": if all_healthy { "healthy" } else { "unhealthy" },
        "roles": list,
    });
    if let Some(status) = identity {
        let provisioned =
            status.snapshot().identity == crate::lifecycle::IdentityState::Provisioned;
        if !provisioned {
            all_healthy = false;
            body["status"] = serde_json::Value::from("unhealthy");
        }
        body["identity"] = status.health_json();
    }
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    let mut r = Response::new(Full::new(Chunk::Owned(bytes, 0)));
    if !all_healthy {
        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    }
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, JSON);
    h.insert(header::CACHE_CONTROL, NO_STORE);
    r
}

fn metrics(shared: &Shared) -> Response<Body> {
    let mut text = shared
        .state
        .metrics
        .render(&shared.state.table().roles, UnixTime::now());
    if let Some(l) = shared.state.lifecycle() {
        l.status.render_metrics(&mut text);
    }
    let mut r = Response::new(Full::new(Chunk::Owned(text.into_bytes(), 0)));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, PROMETHEUS);
    h.insert(header::CACHE_CONTROL, NO_STORE);
    r
}

const BAD_REQUEST: &str = r#"{"code":"BadRequest","message":"requests on the TCP listener must name it in Host (localhost, 127.0.0.1 or [::1] on loopback; the listener's own address, e.g. 169.254.170.2, on a link-local listener) and carry no X-Forwarded-For"}"#;
const METHOD_NOT_ALLOWED: &str = r#"{"code":"MethodNotAllowed","message":"only GET is allowed"}"#;
const METHOD_NOT_ALLOWED_POST: &str = r#"{"code":"MethodNotAllowed","message":"use POST for /v1/identity/provision and /v1/identity/rotate"}"#;
const IDENTITY_FORBIDDEN: &str = r#"{"code":"Forbidden","message":"only root or the agent's own user may ask for provisioning or rotation"}"#;
const IDENTITY_UNAVAILABLE: &str =
    r#"{"code":"Unavailable","message":"the agent does not take identity jobs right now"}"#;
const NOT_FOUND: &str = r#"{"code":"NotFound","message":"no such route; use /v1/credentials, /v1/credentials/{role}, /v1/health or /v1/metrics"}"#;
const UNKNOWN_ROLE: &str = r#"{"code":"NotFound","message":"unknown role; the configured roles are listed by /v1/health"}"#;
const UNAUTHORIZED: &str = r#"{"code":"Unauthorized","message":"missing or wrong Authorization token; send the contents of <runtime_dir>/<role>.token (AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE)"}"#;
const FORBIDDEN: &str = r#"{"code":"Forbidden","message":"this user is not allowed for the role; add its uid or gid to allow_uids/allow_gids"}"#;
const FORBIDDEN_TCP: &str = r#"{"code":"Forbidden","message":"this local user is not allowed for the role (the connection's owner, SPEC 4.6); add its uid to the role's allow_uids"}"#;
const UNAVAILABLE: &str = r#"{"code":"Unavailable","message":"no valid credentials yet; retry after the time in Retry-After (see /v1/health for the last error)"}"#;

fn error(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(Full::new(Chunk::Static(body.as_bytes())));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, JSON);
    h.insert(header::CACHE_CONTROL, NO_STORE);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_peer_uid_rule() {
        // SAFETY: getuid has no preconditions and cannot fail.
        let me = unsafe { libc::getuid() };
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, remote) = l.accept().unwrap();
        let local = s.local_addr().unwrap();
        let known = TcpPeer::new(local, remote);
        assert!(tcp_peer_allowed(&[], &known), "no allow_uids: token only");
        assert!(tcp_peer_allowed(&[me], &known));
        assert!(!tcp_peer_allowed(&[me.wrapping_add(1)], &known));
        // A peer the kernel does not know in this namespace: refused when allow_uids is set.
        let unknown = TcpPeer::new(local, "127.0.0.1:1".parse().unwrap());
        assert_eq!(unknown.uid(), None);
        assert!(!tcp_peer_allowed(&[me], &unknown));
        assert!(tcp_peer_allowed(&[], &unknown));
        drop(c);
    }

    #[test]
    fn loopback_hosts() {
        for ok in [
            "localhost",
            "LOCALHOST:2773",
            "127.0.0.1",
            "127.0.0.1:80",
            "127.1.2.3:65535",
            "[::1]",
            "[::1]:2773",
        ] {
            assert!(loopback_host(ok), "{ok}");
        }
        for bad in [
            "",
            "evil.example",
            "localhost.evil.example",
            "128.0.0.1",
            "127.0.0.1:",
            "127.0.0.1:x",
            "[::2]",
            "[::1",
            "[::1]x",
            "::1",
            "localhost:80:80",
            "0.0.0.0",
        ] {
            assert!(!loopback_host(bad), "{bad}");
        }
    }

    #[test]
    fn loopback_listener_accepts_loopback_names_only() {
        for local in ["127.0.0.1", "::1", "::ffff:127.0.0.1"] {
            let local: IpAddr = local.parse().unwrap();
            for ok in ["localhost:2773", "127.0.0.1", "[::1]:2773"] {
                assert!(listener_host(ok, local), "{ok} on {local}");
            }
            for bad in ["169.254.170.2", "169.254.170.2:80", "evil.example", ""] {
                assert!(!listener_host(bad, local), "{bad} on {local}");
            }
        }
    }

    #[test]
    fn link_local_listener_accepts_its_own_address_only() {
        let ecs: IpAddr = "169.254.170.2".parse().unwrap();
        for ok in ["169.254.170.2", "169.254.170.2:80", "169.254.170.2:2773"] {
            assert!(listener_host(ok, ecs), "{ok}");
        }
        // The same listener reached through an IPv4-mapped local address.
        assert!(listener_host(
            "169.254.170.2:80",
            "::ffff:169.254.170.2".parse().unwrap()
        ));
        for bad in [
            "",
            "localhost",
            "127.0.0.1:2773",
            "[::1]",
            "169.254.170.23",
            "169.254.170.2:",
            "169.254.170.2:x",
            "169.254.170.2:80:80",
            "169.254.170.02",
            "[169.254.170.2]",
            "evil.example",
            "169.254.170.2.evil.example",
            "[::ffff:169.254.170.2]",
        ] {
            assert!(!listener_host(bad, ecs), "{bad:?}");
        }

        let eks: IpAddr = "fd00:ec2::23".parse().unwrap();
        for ok in [
            "[fd00:ec2::23]",
            "[fd00:ec2::23]:2773",
            "[FD00:EC2:0::23]:80",
        ] {
            assert!(listener_host(ok, eks), "{ok}");
        }
        for bad in [
            "fd00:ec2::23",
            "[fd00:ec2::23",
            "[fd00:ec2::23]x",
            "[fd00:ec2::23]:",
            "[fd00:ec2::254]",
            "169.254.170.23",
            "localhost",
            "[::1]",
        ] {
            assert!(!listener_host(bad, eks), "{bad:?}");
        }

        let imds: IpAddr = "169.254.169.254".parse().unwrap();
        assert!(listener_host("169.254.169.254", imds));
        assert!(!listener_host("169.254.170.2", imds));
    }

    #[test]
    fn any_other_local_address_accepts_nothing() {
        // Never bound (start-up refuses it), but the check does not lean on that.
        for local in ["10.0.0.1", "0.0.0.0", "192.168.1.2", "fe80::1"] {
            let local: IpAddr = local.parse().unwrap();
            for host in [
                "10.0.0.1",
                "0.0.0.0",
                "192.168.1.2",
                "[fe80::1]",
                "localhost",
            ] {
                assert!(!listener_host(host, local), "{host} on {local}");
            }
        }
    }
}
