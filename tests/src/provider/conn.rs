//! One TLS connection of the fake provider: handshake, requests, faults.

use std::os::fd::AsRawFd as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::{ProtocolVersion, ServerConfig};
use tokio::io::{AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::http::{self, ReadError, Request};
use super::{
    Error, Fault, IssuedCredentials, Plan, ProviderConfig, RequestRecord, Shared, TlsVersions,
};
use crate::timefmt;

/// Largest response body a client must accept (SPEC §2).
const BODY_LIMIT: usize = 64 * 1024;

pub(crate) fn server_config(config: &ProviderConfig) -> Result<ServerConfig, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&'static rustls::SupportedProtocolVersion] = match config.tls_versions {
        TlsVersions::Both => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersions::Tls12Only => &[&rustls::version::TLS12],
        TlsVersions::Tls13Only => &[&rustls::version::TLS13],
    };
    let verifier = super::client_verifier(&config.client_ca, Arc::clone(&provider))?;
    let (chain, key) = super::load_identity(&config.cert, &config.key)?;
    let mut tls = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| Error::Tls(e.to_string()))?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    if !config.resumption {
        // No session cache, no tickets: every handshake is full (client signature included).
        tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        tls.send_tls13_tickets = 0;
    }
    Ok(tls)
}

/// What the TLS session tells about the client.
struct Peer {
    tls_version: String,
    resumed: bool,
    sni: Option<String>,
    client_cn: Option<String>,
    /// DER of the verified client certificate (leaf).
    leaf: Option<Vec<u8>>,
}

impl Peer {
    fn of(conn: &rustls::ServerConnection) -> Peer {
        let tls_version = match conn.protocol_version() {
            Some(ProtocolVersion::TLSv1_3) => "TLSv1.3".to_owned(),
            Some(ProtocolVersion::TLSv1_2) => "TLSv1.2".to_owned(),
            other => format!("{other:?}"),
        };
        let leaf = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|leaf| leaf.as_ref().to_vec());
        let client_cn = leaf.as_deref().and_then(common_name);
        Peer {
            tls_version,
            resumed: conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
            sni: conn.server_name().map(str::to_owned),
            client_cn,
            leaf,
        }
    }
}

/// Subject CN of a DER certificate.
pub(crate) fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

/// Serves one accepted TCP connection until it closes.
pub(crate) async fn serve(shared: Arc<Shared>, acceptor: TlsAcceptor, tcp: TcpStream) {
    let _ = tcp.set_nodelay(true);
    let (conn_no, refuse) = shared.on_connection();
    if refuse {
        reset(&tcp);
        return;
    }
    let mut tls = match acceptor.accept(tcp).await {
        Ok(tls) => {
            shared.on_handshake(Ok(()));
            tls
        }
        Err(e) => {
            shared.on_handshake(Err(e.to_string()));
            return;
        }
    };
    let peer = Peer::of(tls.get_ref().1);
    let mut buf = Vec::new();
    loop {
        let req = match http::read_request(&mut tls, &mut buf, BODY_LIMIT).await {
            Ok(Some(req)) => req,
            Ok(None) | Err(ReadError::Gone) => return,
            Err(ReadError::Bad(status)) => {
                let resp = Response::message(status, http::reason(status), None);
                let _ = write_all(&mut tls, &resp.head(false, None, true), &resp.body).await;
                let _ = tls.shutdown().await;
                return;
            }
        };
        let keep_alive = req.keep_alive() && shared.keep_alive;
        let alias = alias_of(&req.path);
        let record = RequestRecord {
            seq: 0,
            connection: conn_no,
            method: req.method.clone(),
            path: req.path.clone(),
            alias: alias.clone(),
            thing_name: req.header("x-amzn-iot-thingname").map(str::to_owned),
            user_agent: req.header("user-agent").map(str::to_owned),
            duration_seconds: req
                .header("x-amzn-iot-credential-duration-seconds")
                .map(str::to_owned),
            host: req.header("host").map(str::to_owned),
            tls_version: peer.tls_version.clone(),
            resumed: peer.resumed,
            sni: peer.sni.clone(),
            client_cn: peer.client_cn.clone(),
            status: None,
            fault: None,
            received_unix: timefmt::unix_seconds(SystemTime::now()),
        };
        let (idx, plan) = shared.on_request(record);

        let mut delivery = Delivery::Normal;
        match &plan.failure {
            Some(Fault::RefuseConnection) => {
                reset(tls.get_ref().0);
                return;
            }
            Some(Fault::CloseBeforeResponse) => {
                // Dropping without close_notify: the client sees a bare TCP FIN.
                return;
            }
            Some(Fault::Raw { data }) => {
                let _ = write_all(&mut tls, data.as_bytes(), &[]).await;
                let _ = tls.shutdown().await;
                return;
            }
            Some(Fault::SlowHeaders { delay }) => tokio::time::sleep(*delay).await,
            Some(Fault::SlowBody { delay }) => delivery = Delivery::SlowBody(*delay),
            Some(Fault::ResetMidHeaders) => delivery = Delivery::ResetMidHeaders,
            Some(Fault::ResetMidBody) => delivery = Delivery::ResetMidBody,
            _ => {}
        }

        let server_now = timefmt::unix_seconds(SystemTime::now()) + plan.skew;
        let date = (!plan.no_date)
            .then(|| httpdate::fmt_http_date(timefmt::from_unix_seconds(server_now)));
        let resp = respond(&shared, idx, &req, alias, &peer, &plan, server_now, &date);
        if let Some(mut issued) = resp.issued.clone() {
            issued.complete &=
                !matches!(delivery, Delivery::ResetMidHeaders | Delivery::ResetMidBody);
            shared.on_issue(issued);
        }
        let sent_status = match delivery {
            Delivery::ResetMidHeaders => None,
            _ => Some(resp.status),
        };
        shared.on_answer(idx, sent_status);

        let close = !keep_alive;
        let head = resp.head(plan.chunked, date.as_deref(), close);
        let body = if plan.chunked {
            chunked(&resp.body)
        } else {
            resp.body.clone()
        };
        match delivery {
            Delivery::Normal => {
                if write_all(&mut tls, &head, &body).await.is_err() {
                    return;
                }
            }
            Delivery::ResetMidHeaders => {
                let _ = write_all(&mut tls, &head[..head.len() / 2], &[]).await;
                reset(tls.get_ref().0);
                return;
            }
            Delivery::ResetMidBody => {
                let _ = write_all(&mut tls, &head, &body[..body.len() / 2]).await;
                reset(tls.get_ref().0);
                return;
            }
            Delivery::SlowBody(delay) => {
                let half = body.len() / 2;
                if write_all(&mut tls, &head, &body[..half]).await.is_err() {
                    return;
                }
                tokio::time::sleep(delay).await;
                if write_all(&mut tls, &body[half..], &[]).await.is_err() {
                    return;
                }
            }
        }
        if close {
            let _ = tls.shutdown().await;
            return;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivery {
    Normal,
    ResetMidHeaders,
    ResetMidBody,
    SlowBody(Duration),
}

/// `Some(alias)` for `/role-aliases/{alias}/credentials` (query string ignored).
fn alias_of(path: &str) -> Option<String> {
    let path = path.split('?').next().unwrap_or("");
    let rest = path.strip_prefix("/role-aliases/")?;
    let alias = rest.strip_suffix("/credentials")?;
    (!alias.is_empty() && !alias.contains('/')).then(|| alias.to_owned())
}

/// A response before framing.
#[derive(Debug, Clone)]
struct Response {
    status: u16,
    extra: Vec<(String, String)>,
    body: Vec<u8>,
    issued: Option<IssuedCredentials>,
}

impl Response {
    fn message(status: u16, message: &str, retry_after: Option<String>) -> Response {
        let mut extra = Vec::new();
        if let Some(ra) = retry_after {
            extra.push(("Retry-After".to_owned(), ra));
        }
        if status == 405 {
            extra.push(("Allow".to_owned(), "GET".to_owned()));
        }
        Response {
            status,
            extra,
            body: http::message_body(message),
            issued: None,
        }
    }

    fn head(&self, chunked: bool, date: Option<&str>, close: bool) -> Vec<u8> {
        let mut h = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\n",
            self.status,
            http::reason(self.status)
        );
        if let Some(date) = date {
            h.push_str(&format!("Date: {date}\r\n"));
        }
        if chunked {
            h.push_str("Transfer-Encoding: chunked\r\n");
        } else {
            h.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        }
        h.push_str(&format!("x-amzn-RequestId: {}\r\n", random_string(HEX, 32)));
        for (n, v) in &self.extra {
            h.push_str(&format!("{n}: {v}\r\n"));
        }
        if close {
            h.push_str("Connection: close\r\n");
        }
        h.push_str("\r\n");
        h.into_bytes()
    }
}

fn default_message(status: u16) -> &'static str {
    match status {
        400 => "Bad request",
        401 => "Unauthorized",
        403 => "Access Denied",
        404 => "Role alias does not exist",
        429 => "Rate exceeded",
        500 => "Internal failure",
        503 => "Service unavailable",
        _ => http::reason(status),
    }
}

#[allow(clippy::too_many_arguments)]
fn respond(
    shared: &Shared,
    idx: usize,
    req: &Request,
    alias: Option<String>,
    peer: &Peer,
    plan: &Plan,
    server_now: i64,
    date: &Option<String>,
) -> Response {
    if let Some(Fault::Status {
        status,
        retry_after,
        message,
    }) = &plan.failure
    {
        let msg = message.as_deref().unwrap_or(default_message(*status));
        return Response::message(*status, msg, retry_after.clone());
    }
    let Some(alias) = alias else {
        return Response::message(404, "Not Found", None);
    };
    if req.method != "GET" {
        return Response::message(405, "Method Not Allowed", None);
    }
    let thing = req.header("x-amzn-iot-thingname");
    match thing {
        None if !shared.allow_missing_thing_name => {
            return Response::message(400, "Missing thing name", None);
        }
        _ if shared.registry.is_some() => {
            let registry = shared.registry.as_ref().expect("checked");
            let leaf = peer.leaf.as_deref().unwrap_or_default();
            if let Err(message) = registry.provider_allows(leaf, thing) {
                return Response::message(403, &message, None);
            }
        }
        Some(t) if Some(t) != peer.client_cn.as_deref() => {
            return Response::message(403, "Invalid thing name passed", None);
        }
        _ => {}
    }
    if !shared.aliases.contains(&alias) {
        return Response::message(404, "Role alias does not exist", None);
    }
    let mut ttl = shared.ttl.as_secs() as i64;
    if let Some(d) = req.header("x-amzn-iot-credential-duration-seconds") {
        match d.trim().parse::<i64>() {
            Ok(n) if (900..=43_200).contains(&n) => ttl = n,
            _ => {
                return Response::message(
                    400,
                    "Invalid credential duration: must be between 900 and 43200 seconds",
                    None,
                );
            }
        }
    }
    if let Some(t) = plan.ttl {
        ttl = t;
    }
    if plan.failure == Some(Fault::Expired) {
        ttl = -3600;
    }

    let access_key_id = format!("ASIA{}", random_string(BASE32, 16));
    let secret_access_key = random_string(BASE64ISH, 40);
    let session_token = random_string(BASE64ISH, 320);
    let expiration_unix = server_now + ttl;
    let mut expiration = timefmt::rfc3339(expiration_unix);
    let mut complete = ttl > 0;
    let mut fields = vec![
        ("accessKeyId", json_str(&access_key_id)),
        ("secretAccessKey", json_str(&secret_access_key)),
        ("sessionToken", json_str(&session_token)),
        ("expiration", json_str(&expiration)),
    ];
    let mut drop_object = false;
    match &plan.failure {
        Some(Fault::MissingField { field }) => {
            complete = false;
            if field == "credentials" {
                drop_object = true;
            }
            fields.retain(|(n, _)| n != field);
        }
        Some(Fault::BadExpiration { value }) => {
            complete = false;
            expiration = value.clone().unwrap_or_else(|| "not-a-time".to_owned());
            fields[3].1 = json_str(&expiration);
        }
        _ => {}
    }
    let inner = fields
        .iter()
        .map(|(n, v)| format!("\"{n}\":{v}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut body = if drop_object {
        String::from("{\"message\":\"no credentials here\"}")
    } else {
        format!("{{\"credentials\":{{{inner}}}}}")
    };
    match &plan.failure {
        Some(Fault::MalformedJson) => {
            complete = false;
            body.truncate(body.len() * 2 / 3);
        }
        Some(Fault::OversizedBody { bytes }) => {
            complete = false;
            let target = bytes.unwrap_or(70_000);
            let pad = target.saturating_sub(body.len() + 14);
            body.truncate(body.len() - 1);
            body.push_str(&format!(",\"padding\":\"{}\"}}", "x".repeat(pad)));
        }
        _ => {}
    }
    let issued = IssuedCredentials {
        seq: shared.seq_of(idx),
        alias,
        thing_name: thing.map(str::to_owned),
        access_key_id,
        secret_access_key,
        session_token,
        expiration,
        expiration_unix,
        server_time_unix: server_now,
        date_header: date.clone(),
        complete,
    };
    Response {
        status: 200,
        extra: Vec::new(),
        body: body.into_bytes(),
        issued: Some(issued),
    }
}

fn json_str(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// Chunked encoding in three chunks (or fewer for tiny bodies), then the last-chunk.
fn chunked(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 64);
    let size = body.len().div_ceil(3).max(1);
    for chunk in body.chunks(size) {
        out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        out.extend_from_slice(chunk);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

async fn write_all<S: AsyncWrite + Unpin>(s: &mut S, a: &[u8], b: &[u8]) -> std::io::Result<()> {
    s.write_all(a).await?;
    if !b.is_empty() {
        s.write_all(b).await?;
    }
    s.flush().await
}

/// Sets SO_LINGER to zero so that closing the socket sends RST instead of FIN.
fn reset(tcp: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: the fd is a valid open socket owned by `tcp` for the duration of the call, and
    // `linger` is a properly initialised `struct linger` whose size is passed alongside it.
    unsafe {
        libc::setsockopt(
            tcp.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

const BASE32: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
const BASE64ISH: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const HEX: &[u8] = b"0123456789abcdef";

/// `len` characters drawn uniformly from `alphabet` (a power-of-two size) by the OS RNG.
fn random_string(alphabet: &[u8], len: usize) -> String {
    debug_assert!(alphabet.len().is_power_of_two() && alphabet.len() <= 256);
    let mut bytes = vec![0u8; len];
    getrandom::fill(&mut bytes).expect("the OS random source failed");
    bytes
        .iter()
        .map(|b| alphabet[*b as usize % alphabet.len()] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alias_paths() {
        assert_eq!(
            alias_of("/role-aliases/GatewayRole/credentials").as_deref(),
            Some("GatewayRole")
        );
        assert_eq!(
            alias_of("/role-aliases/A/credentials?x=1").as_deref(),
            Some("A")
        );
        assert_eq!(alias_of("/role-aliases//credentials"), None);
        assert_eq!(alias_of("/role-aliases/a/b/credentials"), None);
        assert_eq!(alias_of("/"), None);
    }

    #[test]
    fn chunked_framing() {
        assert_eq!(
            chunked(b"abcdef"),
            b"2\r\nab\r\n2\r\ncd\r\n2\r\nef\r\n0\r\n\r\n"
        );
        assert_eq!(chunked(b""), b"0\r\n\r\n");
    }

    #[test]
    fn random_strings_differ() {
        let a = random_string(BASE64ISH, 40);
        let b = random_string(BASE64ISH, 40);
        assert_eq!(a.len(), 40);
        assert_ne!(a, b);
    }
}
