//! Tests of the fake provider itself, with a plain rustls client.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use iotcred_tests::timefmt;
use iotcred_tests::{
    BlockingProvider, CertKey, FakeProvider, Fault, KeyAlgorithm, Pki, ProviderConfig,
    ProviderHandle, ServerCert, TlsVersions,
};
use rcgen::PublicKeyData as _;
use rustls::ClientConfig;
use rustls::SupportedProtocolVersion;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

const THING: &str = "gateway-0042";
const PATH: &str = "/role-aliases/GatewayRole/credentials";

/// One PKI for the whole test binary (RSA key generation is not free).
fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("fake-provider-pki-{}", std::process::id()));
        Pki::generate(&dir, THING).expect("generating the test PKI")
    })
}

fn tls_both() -> Vec<&'static SupportedProtocolVersion> {
    vec![&rustls::version::TLS13, &rustls::version::TLS12]
}

fn client_config(
    identity: Option<&CertKey>,
    versions: &[&'static SupportedProtocolVersion],
    ca: &std::path::Path,
) -> Arc<ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots);
    let config = match identity {
        Some(id) => {
            let chain = CertificateDer::pem_file_iter(&id.cert)
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_file(&id.key).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

fn device_client() -> Arc<ClientConfig> {
    client_config(Some(&pki().device_ec), &tls_both(), &pki().ca_cert)
}

async fn connect(addr: SocketAddr, config: Arc<ClientConfig>) -> io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    chunked: bool,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }

    fn message(&self) -> String {
        self.json()["message"].as_str().unwrap().to_owned()
    }
}

fn request(path: &str, extra: &[(&str, &str)], close: bool) -> String {
    let mut r = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: iotcred-test/1\r\nx-amzn-iot-thingname: {THING}\r\n"
    );
    for (n, v) in extra {
        r.push_str(&format!("{n}: {v}\r\n"));
    }
    if close {
        r.push_str("Connection: close\r\n");
    }
    r.push_str("\r\n");
    r
}

/// Reads one response; `buf` keeps bytes between responses on a connection.
async fn read_response<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut Vec<u8>,
) -> io::Result<Resp> {
    let eof = || io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed early");
    let (status, headers) = loop {
        let mut hs = [httparse::EMPTY_HEADER; 32];
        let mut r = httparse::Response::new(&mut hs);
        if let httparse::Status::Complete(n) = r
            .parse(buf)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
        {
            let status = r.code.unwrap();
            let headers = r
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_owned(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect::<Vec<_>>();
            buf.drain(..n);
            break (status, headers);
        }
        if s.read_buf(buf).await? == 0 {
            return Err(eof());
        }
    };
    let find = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let chunked = find("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    let mut body = Vec::new();
    if chunked {
        loop {
            let line_end = loop {
                if let Some(p) = buf.windows(2).position(|w| w == b"\r\n") {
                    break p;
                }
                if s.read_buf(buf).await? == 0 {
                    return Err(eof());
                }
            };
            let size = usize::from_str_radix(std::str::from_utf8(&buf[..line_end]).unwrap(), 16)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            buf.drain(..line_end + 2);
            while buf.len() < size + 2 {
                if s.read_buf(buf).await? == 0 {
                    return Err(eof());
                }
            }
            body.extend_from_slice(&buf[..size]);
            buf.drain(..size + 2);
            if size == 0 {
                break;
            }
        }
    } else if let Some(len) = find("content-length") {
        let len: usize = len.parse().unwrap();
        while buf.len() < len {
            if s.read_buf(buf).await? == 0 {
                return Err(eof());
            }
        }
        body = buf.drain(..len).collect();
    } else {
        s.read_to_end(buf).await?;
        body = std::mem::take(buf);
    }
    Ok(Resp {
        status,
        headers,
        body,
        chunked,
    })
}

/// One request on a fresh connection with `Connection: close`.
async fn get_with(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    raw_request: &str,
) -> io::Result<Resp> {
    let mut tls = connect(addr, config).await?;
    tls.write_all(raw_request.as_bytes()).await?;
    tls.flush().await?;
    let mut buf = Vec::new();
    read_response(&mut tls, &mut buf).await
}

async fn get(addr: SocketAddr) -> io::Result<Resp> {
    get_with(addr, device_client(), &request(PATH, &[], true)).await
}

async fn start() -> ProviderHandle {
    FakeProvider::start(pki().provider_config()).await.unwrap()
}

/// Nothing listens on `addr` any more. (A connect may still succeed by TCP self-connect when the
/// kernel happens to pick the same port as the source port; that is not a listener.)
fn assert_closed(addr: SocketAddr) {
    if let Ok(s) = std::net::TcpStream::connect(addr) {
        assert_eq!(
            s.local_addr().unwrap(),
            s.peer_addr().unwrap(),
            "{addr} still listens"
        );
    }
}

fn now() -> i64 {
    timefmt::unix_seconds(SystemTime::now())
}

fn date_of(resp: &Resp) -> i64 {
    let d = httpdate::parse_http_date(resp.header("date").expect("a Date header")).unwrap();
    timefmt::unix_seconds(d)
}

/// Checks a success response against the spec and what the provider recorded.
fn check_success(provider: &ProviderHandle, resp: &Resp, ttl: i64) {
    assert_eq!(
        resp.status,
        200,
        "body: {}",
        String::from_utf8_lossy(&resp.body)
    );
    assert_eq!(resp.header("content-type"), Some("application/json"));
    let json = resp.json();
    let c = &json["credentials"];
    let key = c["accessKeyId"].as_str().unwrap();
    assert!(key.starts_with("ASIA") && key.len() == 20, "{key}");
    let exp = c["expiration"].as_str().unwrap();
    let exp_unix = timefmt::parse_rfc3339(exp).expect("RFC 3339 UTC expiration");
    assert_eq!(exp_unix - date_of(resp), ttl);
    let issued = provider.last_issued().expect("recorded");
    assert_eq!(issued.access_key_id, key);
    assert_eq!(c["secretAccessKey"], issued.secret_access_key.as_str());
    assert_eq!(c["sessionToken"], issued.session_token.as_str());
    assert_eq!(issued.expiration, exp);
}

#[tokio::test]
async fn mtls_success_with_ec_and_rsa_keys_on_both_tls_versions() {
    let provider = start().await;
    let versions: [&'static SupportedProtocolVersion; 2] =
        [&rustls::version::TLS13, &rustls::version::TLS12];
    let mut keys = Vec::new();
    for id in [&pki().device_ec, &pki().device_rsa, &pki().device_chain] {
        for v in versions {
            let cfg = client_config(Some(id), &[v], &pki().ca_cert);
            let resp = get_with(provider.addr(), cfg, &request(PATH, &[], true))
                .await
                .unwrap();
            check_success(&provider, &resp, 3600);
            assert!((date_of(&resp) - now()).abs() <= 2);
            keys.push(provider.last_issued().unwrap());
        }
    }
    // Fresh, unique values per issue.
    for (i, a) in keys.iter().enumerate() {
        for b in &keys[i + 1..] {
            assert_ne!(a.access_key_id, b.access_key_id);
            assert_ne!(a.secret_access_key, b.secret_access_key);
            assert_ne!(a.session_token, b.session_token);
        }
    }
    let reqs = provider.requests();
    assert_eq!(reqs.len(), 6);
    let tls: Vec<_> = reqs.iter().map(|r| r.tls_version.as_str()).collect();
    assert_eq!(
        tls,
        [
            "TLSv1.3", "TLSv1.2", "TLSv1.3", "TLSv1.2", "TLSv1.3", "TLSv1.2"
        ]
    );
    for r in &reqs {
        assert_eq!(r.alias.as_deref(), Some("GatewayRole"));
        assert_eq!(r.thing_name.as_deref(), Some(THING));
        assert_eq!(r.client_cn.as_deref(), Some(THING));
        assert_eq!(r.user_agent.as_deref(), Some("iotcred-test/1"));
        assert_eq!(r.sni.as_deref(), Some("localhost"));
        assert_eq!(r.status, Some(200));
    }
    let stats = provider.stats();
    assert_eq!((stats.handshakes, stats.requests, stats.issued), (6, 6, 6));
    provider.shutdown().await;
    assert_closed(provider.addr());
}

#[tokio::test]
async fn client_without_certificate_or_with_a_bad_one_is_rejected() {
    let provider = start().await;
    let p = pki();
    let bad = [
        client_config(None, &tls_both(), &p.ca_cert),
        client_config(Some(&p.untrusted_device), &tls_both(), &p.ca_cert),
        client_config(Some(&p.expired_device), &tls_both(), &p.ca_cert),
        client_config(Some(&p.not_yet_valid_device), &tls_both(), &p.ca_cert),
        client_config(None, &[&rustls::version::TLS12], &p.ca_cert),
    ];
    for cfg in bad {
        let res = get_with(provider.addr(), cfg, &request(PATH, &[], true)).await;
        assert!(res.is_err(), "{res:?}");
    }
    provider.wait_until(|s| s.handshake_failures == 5).await;
    assert_eq!(provider.request_count(), 0);
    assert!(provider.issued().is_empty());
    assert_eq!(provider.handshake_errors().len(), 5);
}

#[tokio::test]
async fn thing_name_alias_and_duration_are_checked() {
    let provider = start().await;
    let addr = provider.addr();
    let call = |path: &'static str, extra: Vec<(&'static str, &'static str)>| async move {
        get_with(addr, device_client(), &request(path, &extra, true))
            .await
            .unwrap()
    };
    let r = call(PATH, vec![]).await;
    assert_eq!(r.status, 200);

    // Mismatch against the certificate's CN.
    let raw = request(PATH, &[], true).replace(THING, "someone-else");
    let r = get_with(addr, device_client(), &raw).await.unwrap();
    assert_eq!(
        (r.status, r.message().as_str()),
        (403, "Invalid thing name passed")
    );

    // Missing header: refused unless configured.
    let raw = request(PATH, &[], true).replace(&format!("x-amzn-iot-thingname: {THING}\r\n"), "");
    let r = get_with(addr, device_client(), &raw).await.unwrap();
    assert_eq!(r.status, 400);

    let r = call("/role-aliases/NoSuchRole/credentials", vec![]).await;
    assert_eq!(
        (r.status, r.message().as_str()),
        (404, "Role alias does not exist")
    );
    let r = call("/", vec![]).await;
    assert_eq!(r.status, 404);
    let r = call("/role-aliases/GatewayRole/other", vec![]).await;
    assert_eq!(r.status, 404);

    let raw = request(PATH, &[], true).replacen("GET", "POST", 1);
    let r = get_with(addr, device_client(), &raw).await.unwrap();
    assert_eq!(r.status, 405);

    let r = call(
        PATH,
        vec![("x-amzn-iot-credential-duration-seconds", "1800")],
    )
    .await;
    check_success(&provider, &r, 1800);
    for bad in ["899", "43201", "abc", "-1"] {
        let raw = request(
            PATH,
            &[("x-amzn-iot-credential-duration-seconds", bad)],
            true,
        );
        let r = get_with(addr, device_client(), &raw).await.unwrap();
        assert_eq!(r.status, 400, "{bad}");
        assert!(r.message().contains("duration"));
    }
    let durations: Vec<_> = provider
        .requests()
        .iter()
        .map(|r| r.duration_seconds.clone())
        .collect();
    assert_eq!(durations.iter().flatten().count(), 5);
    // Only the two successful requests issued credentials.
    assert_eq!(provider.issued().len(), 2);
}

#[tokio::test]
async fn missing_thing_name_allowed_when_configured() {
    let mut config = pki().provider_config();
    config.allow_missing_thing_name = true;
    config.aliases = vec!["A".into(), "B".into()];
    config.ttl = Duration::from_secs(1200);
    let provider = FakeProvider::start(config).await.unwrap();
    let raw = request("/role-aliases/B/credentials", &[], true)
        .replace(&format!("x-amzn-iot-thingname: {THING}\r\n"), "");
    let r = get_with(provider.addr(), device_client(), &raw)
        .await
        .unwrap();
    check_success(&provider, &r, 1200);
    assert_eq!(provider.requests()[0].thing_name, None);
    let r = get(provider.addr()).await.unwrap();
    assert_eq!(r.status, 404, "GatewayRole is not configured here");
}

#[tokio::test]
async fn status_faults_once_and_persistent() {
    let provider = start().await;
    let addr = provider.addr();
    for status in [400u16, 403, 404, 429, 500, 503] {
        provider.push_fault(Fault::status(status));
        let r = get(addr).await.unwrap();
        assert_eq!(r.status, status);
        assert!(r.header("retry-after").is_none());
        assert!(!r.message().is_empty());
    }
    provider.push_fault(Fault::status_retry_after(429, 7));
    provider.push_fault(Fault::Status {
        status: 503,
        retry_after: Some("Wed, 21 Oct 2026 07:28:00 GMT".into()),
        message: Some("slow down".into()),
    });
    let r = get(addr).await.unwrap();
    assert_eq!((r.status, r.header("retry-after")), (429, Some("7")));
    let r = get(addr).await.unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(
        r.header("retry-after"),
        Some("Wed, 21 Oct 2026 07:28:00 GMT")
    );
    assert_eq!(r.message(), "slow down");
    // Queue drained: success again.
    check_success(&provider, &get(addr).await.unwrap(), 3600);

    provider.set_fault(Fault::status(500));
    for _ in 0..2 {
        assert_eq!(get(addr).await.unwrap().status, 500);
    }
    // A one-shot fault wins over the persistent one.
    provider.push_fault(Fault::status(403));
    assert_eq!(get(addr).await.unwrap().status, 403);
    assert_eq!(get(addr).await.unwrap().status, 500);
    provider.clear_faults();
    assert_eq!(get(addr).await.unwrap().status, 200);
    let faults: Vec<_> = provider
        .requests()
        .iter()
        .map(|r| r.fault.clone())
        .collect();
    assert_eq!(faults[0], Some(Fault::status(400)));
    assert_eq!(faults.last().unwrap(), &None);
}

#[tokio::test]
async fn connection_faults_break_the_exchange_once() {
    let provider = start().await;
    let addr = provider.addr();
    for fault in [
        Fault::RefuseConnection,
        Fault::CloseBeforeResponse,
        Fault::ResetMidHeaders,
        Fault::ResetMidBody,
    ] {
        provider.push_fault(fault.clone());
        let res = get(addr).await;
        assert!(res.is_err(), "{fault:?}: {res:?}");
        check_success(&provider, &get(addr).await.unwrap(), 3600);
    }
    let stats = provider.stats();
    assert_eq!(stats.connections, 8);
    assert_eq!(
        stats.handshakes, 7,
        "the refused connection never got to TLS"
    );
    // The partly sent credentials are recorded, but not as complete.
    let issued = provider.issued();
    assert_eq!(issued.len(), 6);
    assert_eq!(issued.iter().filter(|i| i.complete).count(), 4);
    let reqs = provider.requests();
    assert_eq!(
        reqs[0].fault, None,
        "the refused connection carried no request"
    );
    assert_eq!(reqs[1].fault, Some(Fault::CloseBeforeResponse));
    assert_eq!(reqs[1].status, None);

    provider.set_fault(Fault::RefuseConnection);
    assert!(get(addr).await.is_err());
    assert!(get(addr).await.is_err());
    provider.clear_faults();
    assert_eq!(get(addr).await.unwrap().status, 200);
}

#[tokio::test]
async fn slow_faults_delay_but_complete() {
    let provider = start().await;
    let delay = Duration::from_millis(300);
    for fault in [Fault::SlowHeaders { delay }, Fault::SlowBody { delay }] {
        provider.push_fault(fault);
        let t = Instant::now();
        let r = get(provider.addr()).await.unwrap();
        assert!(t.elapsed() >= delay);
        check_success(&provider, &r, 3600);
    }
}

#[tokio::test]
async fn slow_body_sends_the_head_first() {
    let provider = start().await;
    provider.push_fault(Fault::SlowBody {
        delay: Duration::from_secs(600),
    });
    let mut tls = connect(provider.addr(), device_client()).await.unwrap();
    tls.write_all(request(PATH, &[], true).as_bytes())
        .await
        .unwrap();
    let mut buf = vec![0u8; 64];
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tls.read(&mut buf).await.unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 200 OK\r\n"));
    // Shutting down does not wait for the sleeping connection.
    provider.shutdown().await;
}

#[tokio::test]
async fn body_faults_are_well_framed_but_wrong() {
    let provider = start().await;
    let addr = provider.addr();

    provider.push_fault(Fault::MalformedJson);
    let r = get(addr).await.unwrap();
    assert_eq!(r.status, 200);
    assert!(serde_json::from_slice::<serde_json::Value>(&r.body).is_err());

    provider.push_fault(Fault::OversizedBody { bytes: None });
    let r = get(addr).await.unwrap();
    assert!(r.body.len() > 64 * 1024);
    assert!(r.json()["credentials"]["accessKeyId"].is_string());

    for field in [
        "accessKeyId",
        "secretAccessKey",
        "sessionToken",
        "expiration",
    ] {
        provider.push_fault(Fault::MissingField {
            field: field.into(),
        });
        let r = get(addr).await.unwrap();
        let c = r.json()["credentials"].clone();
        assert!(c.get(field).is_none(), "{field}");
        assert_eq!(c.as_object().unwrap().len(), 3);
    }
    provider.push_fault(Fault::MissingField {
        field: "credentials".into(),
    });
    assert!(get(addr).await.unwrap().json().get("credentials").is_none());

    provider.push_fault(Fault::BadExpiration { value: None });
    let r = get(addr).await.unwrap();
    assert_eq!(r.json()["credentials"]["expiration"], "not-a-time");
    provider.push_fault(Fault::BadExpiration {
        value: Some("2026-01-01T12:00:00+02:00".into()),
    });
    let r = get(addr).await.unwrap();
    assert_eq!(
        r.json()["credentials"]["expiration"],
        "2026-01-01T12:00:00+02:00"
    );

    provider.push_fault(Fault::Expired);
    let r = get(addr).await.unwrap();
    let exp = timefmt::parse_rfc3339(r.json()["credentials"]["expiration"].as_str().unwrap());
    assert_eq!(exp.unwrap() - date_of(&r), -3600);

    provider.push_fault(Fault::Raw {
        data: "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}".into(),
    });
    let r = get(addr).await.unwrap();
    assert_eq!(r.body, b"{}");

    assert!(provider.issued().iter().all(|i| !i.complete));
    assert_eq!(provider.last_issued(), None);
}

#[tokio::test]
async fn modifiers_skew_date_ttl_and_chunked() {
    let provider = start().await;
    let addr = provider.addr();

    provider.set_fault(Fault::DateSkew { seconds: 7200 });
    let r = get(addr).await.unwrap();
    check_success(&provider, &r, 3600);
    assert!((date_of(&r) - now() - 7200).abs() <= 2);
    let issued = provider.last_issued().unwrap();
    assert_eq!(issued.server_time_unix, date_of(&r));

    provider.set_fault(Fault::DateSkew { seconds: -86_400 });
    provider.set_fault(Fault::Chunked);
    provider.set_fault(Fault::Ttl { seconds: 120 });
    let r = get(addr).await.unwrap();
    assert!(r.chunked && r.header("content-length").is_none());
    check_success(&provider, &r, 120);
    assert!((date_of(&r) - now() + 86_400).abs() <= 2);

    // Modifiers combine with a one-shot failure.
    provider.push_fault(Fault::status_retry_after(503, 1));
    let r = get(addr).await.unwrap();
    assert!(r.chunked);
    assert_eq!(r.status, 503);

    // TTL override beats the duration header.
    let raw = request(
        PATH,
        &[("x-amzn-iot-credential-duration-seconds", "3600")],
        true,
    );
    let r = get_with(addr, device_client(), &raw).await.unwrap();
    check_success(&provider, &r, 120);

    provider.clear_faults();
    provider.push_fault(Fault::NoDate);
    let r = get(addr).await.unwrap();
    assert_eq!(r.status, 200);
    assert!(r.header("date").is_none());
    assert_eq!(provider.last_issued().unwrap().date_header, None);

    provider.push_fault(Fault::Chunked);
    provider.push_fault(Fault::OversizedBody {
        bytes: Some(100_000),
    });
    let r = get(addr).await.unwrap();
    assert!(r.chunked && r.body.len() < 1000);
    let r = get(addr).await.unwrap();
    assert!(!r.chunked, "one-shot faults apply to one request each");
    assert!(r.body.len() >= 99_000);
}

#[tokio::test]
async fn keep_alive_serves_several_requests_on_one_connection() {
    let provider = start().await;
    let mut tls = connect(provider.addr(), device_client()).await.unwrap();
    let mut buf = Vec::new();
    let mut seen = Vec::new();
    for i in 0..3 {
        if i == 1 {
            provider.push_fault(Fault::Chunked);
        }
        tls.write_all(request(PATH, &[], false).as_bytes())
            .await
            .unwrap();
        let r = read_response(&mut tls, &mut buf).await.unwrap();
        check_success(&provider, &r, 3600);
        assert!(r.header("connection").is_none());
        seen.push(provider.last_issued().unwrap().access_key_id);
    }
    // Pipelined: two requests in one write.
    let two = format!("{}{}", request(PATH, &[], false), request(PATH, &[], true));
    tls.write_all(two.as_bytes()).await.unwrap();
    let a = read_response(&mut tls, &mut buf).await.unwrap();
    let b = read_response(&mut tls, &mut buf).await.unwrap();
    assert_eq!((a.status, b.status), (200, 200));
    assert_eq!(b.header("connection"), Some("close"));
    // `Connection: close` honoured: the server closes (cleanly) after the response.
    let mut rest = Vec::new();
    assert_eq!(tls.read_to_end(&mut rest).await.unwrap(), 0);

    let stats = provider.stats();
    assert_eq!(
        (stats.connections, stats.handshakes, stats.requests),
        (1, 1, 5)
    );
    assert!(provider.requests().iter().all(|r| r.connection == 1));
    seen.dedup();
    assert_eq!(seen.len(), 3);
}

#[tokio::test]
async fn tls_version_can_be_forced() {
    for (only, other, name) in [
        (TlsVersions::Tls12Only, &rustls::version::TLS13, "TLSv1.2"),
        (TlsVersions::Tls13Only, &rustls::version::TLS12, "TLSv1.3"),
    ] {
        let mut config = pki().provider_config();
        config.tls_versions = only;
        let provider = FakeProvider::start(config).await.unwrap();
        let wrong = client_config(Some(&pki().device_ec), &[other], &pki().ca_cert);
        assert!(
            get_with(provider.addr(), wrong, &request(PATH, &[], true))
                .await
                .is_err()
        );
        let r = get(provider.addr()).await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(provider.requests()[0].tls_version, name);
    }
}

#[tokio::test]
async fn alternate_server_certificates_are_not_trusted() {
    for which in [ServerCert::Untrusted, ServerCert::Expired] {
        let provider = FakeProvider::start(pki().provider_config_with(which))
            .await
            .unwrap();
        let err = get(provider.addr()).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{which:?}: {err}");
        // A client that trusts the other CA gets through to the untrusted server.
        if which == ServerCert::Untrusted {
            let cfg = client_config(
                Some(&pki().device_ec),
                &tls_both(),
                &pki().untrusted_ca_cert,
            );
            let r = get_with(provider.addr(), cfg, &request(PATH, &[], true))
                .await
                .unwrap();
            assert_eq!(r.status, 200);
        }
    }
}

#[tokio::test]
async fn device_cert_for_an_external_public_key() {
    let p = pki();
    // EC: key made elsewhere, only its public half handed to the PKI (DER SubjectPublicKeyInfo).
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let ec_cert = p
        .issue_for_public_key(
            THING,
            &key.subject_public_key_info(),
            &p.dir.join("ext-ec.pem"),
        )
        .unwrap();
    std::fs::write(p.dir.join("ext-ec.key"), key.serialize_pem()).unwrap();
    // RSA: public key as PEM from openssl.
    let rsa = p
        .issue_device("ext-rsa-src", "ignored", KeyAlgorithm::Rsa2048)
        .unwrap();
    let out = std::process::Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&rsa.key)
        .output()
        .unwrap();
    assert!(out.status.success());
    let rsa_cert = p
        .issue_for_public_key(THING, &out.stdout, &p.dir.join("ext-rsa.pem"))
        .unwrap();

    let provider = start().await;
    for (cert, key) in [
        (ec_cert, p.dir.join("ext-ec.key")),
        (rsa_cert, rsa.key.clone()),
    ] {
        let cfg = client_config(Some(&CertKey { cert, key }), &tls_both(), &p.ca_cert);
        let r = get_with(provider.addr(), cfg, &request(PATH, &[], true))
            .await
            .unwrap();
        check_success(&provider, &r, 3600);
    }
    assert!(
        p.issue_for_public_key(THING, b"junk", &p.dir.join("x.pem"))
            .is_err()
    );
}

#[tokio::test]
async fn admin_listener_controls_faults_and_reports() {
    let mut config = pki().provider_config();
    config.admin = Some("127.0.0.1:0".parse().unwrap());
    let provider = FakeProvider::start(config).await.unwrap();
    let admin = provider.admin_addr().unwrap();

    let post = |path: &'static str, body: &'static str| async move {
        let mut s = TcpStream::connect(admin).await.unwrap();
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.unwrap();
        read_response(&mut s, &mut Vec::new()).await.unwrap()
    };
    let fetch = |path: &'static str| async move {
        let mut s = TcpStream::connect(admin).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        read_response(&mut s, &mut Vec::new()).await.unwrap()
    };

    let r = post(
        "/fault/once",
        r#"{"kind":"status","status":503,"retry_after":"2"}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    let r = post("/fault", r#"{"kind":"date_skew","seconds":-600}"#).await;
    assert_eq!(r.status, 200);
    assert_eq!(post("/fault", r#"{"kind":"nonsense"}"#).await.status, 400);
    let faults = fetch("/faults").await.json();
    assert_eq!(faults["persistent"][0]["kind"], "date_skew");
    assert_eq!(faults["queued"][0]["status"], 503);

    let r = get(provider.addr()).await.unwrap();
    assert_eq!((r.status, r.header("retry-after")), (503, Some("2")));
    let r = get(provider.addr()).await.unwrap();
    assert_eq!(r.status, 200);

    let reqs = fetch("/requests").await.json();
    assert_eq!(reqs.as_array().unwrap().len(), 2);
    assert_eq!(reqs[0]["status"], 503);
    assert_eq!(reqs[1]["client_cn"], THING);
    let issued = fetch("/issued").await.json();
    let key = r.json()["credentials"]["accessKeyId"].clone();
    assert_eq!(issued[0]["access_key_id"], key);
    let stats = fetch("/stats").await.json();
    assert_eq!(stats["requests"], 2);

    post("/fault/once", r#"{"kind":"slow_headers","delay_ms":1}"#).await;
    assert_eq!(
        provider.faults().1,
        vec![Fault::SlowHeaders {
            delay: Duration::from_millis(1)
        }]
    );
    assert_eq!(post("/fault/clear", "").await.status, 200);
    assert_eq!(provider.faults(), (vec![], vec![]));
    assert_eq!(post("/reset", "").await.status, 200);
    assert!(provider.requests().is_empty());
    assert_eq!(fetch("/nope").await.status, 404);
}

#[test]
fn blocking_provider_works_from_plain_tests() {
    let provider = BlockingProvider::start(pki().provider_config()).unwrap();
    let addr = provider.addr();
    provider.push_fault(Fault::status(429));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let statuses: Vec<u16> = rt.block_on(async {
        vec![
            get(addr).await.unwrap().status,
            get(addr).await.unwrap().status,
        ]
    });
    assert_eq!(statuses, [429, 200]);
    assert!(provider.wait_for_requests(2, Duration::from_secs(5)));
    assert!(!provider.wait_for_requests(3, Duration::from_millis(1)));
    assert_eq!(provider.issued().len(), 1);
    provider.shutdown();
    assert_closed(addr);
}

#[test]
fn config_refuses_non_loopback_addresses() {
    let mut config: ProviderConfig = pki().provider_config();
    config.listen = "0.0.0.0:0".parse().unwrap();
    assert!(BlockingProvider::start(config).is_err());
}

#[test]
fn binary_prints_its_port_and_serves() {
    use std::io::BufRead as _;
    let p = pki();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fake-provider"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--ttl",
            "1000",
        ])
        .arg("--ca")
        .arg(&p.ca_cert)
        .arg("--cert")
        .arg(&p.server.cert)
        .arg("--key")
        .arg(&p.server.key)
        .args(["--alias", "GatewayRole", "--tls-version", "1.3"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let addr: SocketAddr = first
        .strip_prefix("listening on ")
        .unwrap()
        .parse()
        .unwrap();
    let second = lines.next().unwrap().unwrap();
    let admin: SocketAddr = second.strip_prefix("admin on ").unwrap().parse().unwrap();
    assert_ne!(addr.port(), 0);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let r = get(addr).await.unwrap();
        assert_eq!(r.status, 200);
        let exp = timefmt::parse_rfc3339(r.json()["credentials"]["expiration"].as_str().unwrap());
        assert_eq!(exp.unwrap() - date_of(&r), 1000);
        let mut s = TcpStream::connect(admin).await.unwrap();
        s.write_all(b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let stats = read_response(&mut s, &mut Vec::new()).await.unwrap().json();
        assert_eq!(stats["issued"], 1);
    });
    child.kill().unwrap();
    child.wait().unwrap();

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fake-provider"))
        .arg("--bogus")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test]
async fn certs_example_script_makes_a_working_pki() {
    let dir = tempfile::tempdir().unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../certs-example/make-certs.sh"
    );
    for _ in 0..2 {
        // Twice: the second run keeps the set (idempotent).
        let out = std::process::Command::new("bash")
            .arg(script)
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let f = |n: &str| dir.path().join(n);
    let mut config = ProviderConfig::new(f("ca.pem"), f("server.pem"), f("server.key"));
    config.tls_versions = TlsVersions::Both;
    let provider = FakeProvider::start(config).await.unwrap();
    for (cert, key) in [
        ("device.pem.crt", "device.key"),
        ("device-rsa.pem.crt", "device-rsa.key"),
    ] {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(f(key)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{key}");
        let id = CertKey {
            cert: f(cert),
            key: f(key),
        };
        let cfg = client_config(Some(&id), &tls_both(), &f("ca.pem"));
        let r = get_with(provider.addr(), cfg, &request(PATH, &[], true))
            .await
            .unwrap();
        check_success(&provider, &r, 3600);
    }
    // The example configuration names exactly these files.
    let example = include_str!("../../certs-example/config.toml");
    for name in [
        "out/device.pem.crt",
        "out/device.key",
        "out/ca.pem",
        "GatewayRole",
    ] {
        assert!(example.contains(name), "{name}");
    }
}
