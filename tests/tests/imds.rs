//! SPEC §4.4 (the IMDSv2-compatible endpoint) and §4.6 (peer identity on loopback TCP) against
//! the real `iotcred run` and the fake provider, over raw HTTP: every row of §4.4's table and
//! every bullet under it, and the uid checks with real processes of another user.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use iotcred_core::UnixTime;
use iotcred_tests::agent::{Agent, Env, poll};
use iotcred_tests::hostile::curl_as as curl;
use iotcred_tests::provider::Fault;

const LIMIT: Duration = Duration::from_secs(30);
const CREDS: &str = "/latest/meta-data/iam/security-credentials/";
/// A uid no account uses here: the §4.6 tests run curl as this user.
const OTHER_UID: u32 = 4242;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {:?}", self.body))
    }
}

/// Sends `head` (request line and header lines, without the final blank line) with
/// `Connection: close` and reads the whole answer.
fn http(addr: SocketAddr, head: &str) -> Reply {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(LIMIT)).unwrap();
    write!(s, "{head}\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read answer");
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(n) = resp.parse(&raw).expect("HTTP answer") else {
        panic!("incomplete answer: {:?}", String::from_utf8_lossy(&raw));
    };
    Reply {
        status: resp.code.unwrap(),
        headers: resp
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_owned(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect(),
        body: String::from_utf8_lossy(&raw[n..]).into_owned(),
    }
}

fn put_token(addr: SocketAddr, ttl: &str) -> Reply {
    http(
        addr,
        &format!(
            "PUT /latest/api/token HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nX-aws-ec2-metadata-token-ttl-seconds: {ttl}",
            addr.port()
        ),
    )
}

fn token(addr: SocketAddr) -> String {
    let r = put_token(addr, "21600");
    assert_eq!(r.status, 200, "{r:?}");
    r.body
}

fn get(addr: SocketAddr, path: &str, token: &str) -> Reply {
    http(
        addr,
        &format!(
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nX-aws-ec2-metadata-token: {token}",
            addr.port()
        ),
    )
}

/// An agent with `[serve] listen` and `[serve.imds]` (`imds_extra` appended to that section,
/// `tables` after it: roles, `[refresh]`, …).
fn start(env: &Env, imds_extra: &str, tables: &str) -> (Agent, SocketAddr, SocketAddr) {
    let (tcp, imds) = (free_port(), free_port());
    let k = env.pki.device_ec.key.display().to_string();
    let cfg = env.config_with(
        &env.pki.device_ec.cert,
        &k,
        "",
        &format!(
            "[serve]\nlisten = \"127.0.0.1:{tcp}\"\n[serve.imds]\nlisten = \"127.0.0.1:{imds}\"\nrole = \"default\"\n{imds_extra}\n{tables}"
        ),
    );
    let mut agent = env.start_agent(&cfg);
    assert!(agent.wait_ready(LIMIT), "{}", agent.log());
    (
        agent,
        format!("127.0.0.1:{tcp}").parse().unwrap(),
        format!("127.0.0.1:{imds}").parse().unwrap(),
    )
}

#[test]
fn every_row_of_the_table() {
    let env = Env::new();
    let (agent, _, addr) = start(&env, "region = \"eu-west-1\"", "");
    let issued = env.provider.last_issued().unwrap();

    // PUT /latest/api/token with a TTL of 1-21600: the token, and the TTL echoed.
    for ttl in ["1", "21600", "300"] {
        let r = put_token(addr, ttl);
        assert_eq!(r.status, 200, "{r:?}");
        assert!(r.header("content-type").unwrap().starts_with("text/plain"));
        assert_eq!(r.header("x-aws-ec2-metadata-token-ttl-seconds"), Some(ttl));
        assert!((16..=128).contains(&r.body.len()), "{:?}", r.body);
        assert!(r.body.bytes().all(|b| b.is_ascii_graphic()), "{:?}", r.body);
    }
    // Missing or out of range: 400.
    let host = format!("Host: 127.0.0.1:{}", addr.port());
    let r = http(addr, &format!("PUT /latest/api/token HTTP/1.1\r\n{host}"));
    assert_eq!(r.status, 400);
    for bad in ["0", "21601", "-1", "abc", "1.5", ""] {
        assert_eq!(put_token(addr, bad).status, 400, "TTL {bad:?}");
    }
    // X-Forwarded-For on the PUT: 403.
    let r = http(
        addr,
        &format!(
            "PUT /latest/api/token HTTP/1.1\r\n{host}\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\nX-Forwarded-For: 10.0.0.1"
        ),
    );
    assert_eq!(r.status, 403);

    let tok = token(addr);
    // The role listing.
    let r = get(addr, CREDS, &tok);
    assert_eq!((r.status, r.body.as_str()), (200, "default"));
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));

    // The credentials.
    let before = UnixTime::now().as_secs();
    let r = get(addr, &format!("{CREDS}default"), &tok);
    let after = UnixTime::now().as_secs();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = r.json();
    assert_eq!(v["Code"], "Success");
    assert_eq!(v["Type"], "AWS-HMAC");
    assert_eq!(v["AccessKeyId"], issued.access_key_id.as_str());
    assert_eq!(v["SecretAccessKey"], issued.secret_access_key.as_str());
    assert_eq!(v["Token"], issued.session_token.as_str());
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys.len(), 7, "{keys:?}");
    // LastUpdated: when the agent obtained them (before this request, not before the test).
    let last = UnixTime::parse_rfc3339(v["LastUpdated"].as_str().unwrap()).unwrap();
    assert!(v["LastUpdated"].as_str().unwrap().ends_with('Z'));
    assert!(
        last.as_secs() <= after && last.as_secs() + 60 >= before,
        "{v}"
    );
    // Expiration: the agent's clock plus the lifetime left (§3), whole seconds, UTC.
    let exp_text = v["Expiration"].as_str().unwrap();
    assert!(
        exp_text.ends_with('Z') && !exp_text.contains('.'),
        "{exp_text}"
    );
    let exp = UnixTime::parse_rfc3339(exp_text).unwrap().as_secs();
    let lifetime = issued.expiration_unix - issued.server_time_unix;
    assert!(exp > before && exp <= after + lifetime + 1, "{exp_text}");
    // Any other name: 404.
    assert_eq!(get(addr, &format!("{CREDS}other"), &tok).status, 404);
    assert_eq!(get(addr, &format!("{CREDS}default/"), &tok).status, 404);

    // The region.
    let r = get(addr, "/latest/meta-data/placement/region", &tok);
    assert_eq!((r.status, r.body.as_str()), (200, "eu-west-1"));

    // Any other path: 404, including the paths that would need invented instance facts.
    for path in [
        "/latest/meta-data/iam/security-credentials-extended/",
        "/latest/meta-data/iam/security-credentials-extended/default",
        "/latest/meta-data/placement/availability-zone",
        "/latest/dynamic/instance-identity/document",
        "/latest/meta-data/",
        "/latest/meta-data/iam/security-credentials",
        "/",
        "/v1/credentials",
    ] {
        assert_eq!(get(addr, path, &tok).status, 404, "{path}");
    }

    // Any other method: 405.
    for (method, path) in [
        ("POST", "/latest/api/token"),
        ("GET", "/latest/api/token"),
        ("DELETE", "/latest/api/token"),
        ("PUT", "/latest/meta-data/iam/security-credentials/default"),
        ("POST", "/latest/meta-data/iam/security-credentials/"),
        ("DELETE", "/anything"),
    ] {
        let r = http(
            addr,
            &format!(
                "{method} {path} HTTP/1.1\r\n{host}\r\nX-aws-ec2-metadata-token: {tok}\r\nX-aws-ec2-metadata-token-ttl-seconds: 60"
            ),
        );
        assert_eq!(r.status, 405, "{method} {path}");
    }
    agent.stop(&env);
}

#[test]
fn every_get_needs_a_valid_token() {
    let env = Env::new();
    let (agent, _, addr) = start(&env, "", "");
    let tok = token(addr);
    let host = format!("Host: 127.0.0.1:{}", addr.port());
    for path in [
        CREDS,
        "/latest/meta-data/iam/security-credentials/default",
        "/latest/meta-data/placement/region",
        "/latest/meta-data/nothing-here",
    ] {
        // No token (IMDSv1): 401, on every path.
        let r = http(addr, &format!("GET {path} HTTP/1.1\r\n{host}"));
        assert_eq!(r.status, 401, "{path}");
        assert!(!r.body.contains("AccessKeyId"));
        // A wrong, truncated or altered token: 401.
        for bad in [
            "x".to_string(),
            tok[..tok.len() - 1].to_string(),
            format!(
                "{}{}",
                &tok[..tok.len() - 1],
                if tok.ends_with('0') { '1' } else { '0' }
            ),
            tok.to_uppercase(),
            format!("{tok}{tok}"),
        ] {
            assert_eq!(get(addr, path, &bad).status, 401, "{path} {bad}");
        }
        // Two token headers: 401.
        let r = http(
            addr,
            &format!(
                "GET {path} HTTP/1.1\r\n{host}\r\nX-aws-ec2-metadata-token: {tok}\r\nX-aws-ec2-metadata-token: {tok}"
            ),
        );
        assert_eq!(r.status, 401);
    }
    // Without a region setting and with an endpoint host that names none: 404.
    assert_eq!(
        get(addr, "/latest/meta-data/placement/region", &tok).status,
        404
    );
    // Header names in any case; SDKs ask for gzip, the answer is plain.
    let r = http(
        addr,
        &format!(
            "GET {CREDS}default HTTP/1.1\r\nhost: 127.0.0.1\r\nx-AWS-ec2-METADATA-token: {tok}\r\nAccept-Encoding: gzip\r\nUser-Agent: aws-sdk-go-v2/1.17.1"
        ),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("content-encoding"), None);
    assert_eq!(r.json()["Code"], "Success");
    let r = http(
        addr,
        "PUT /latest/api/token HTTP/1.1\r\nHOST: localhost\r\nX-AWS-EC2-METADATA-TOKEN-TTL-SECONDS: 5\r\nAccept-Encoding: gzip",
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("X-aws-ec2-metadata-token-ttl-seconds"), Some("5"));

    // A page that rebinds its DNS name to 127.0.0.1 sends its own name as Host: 400.
    for h in [
        "Host: evil.example",
        "Host: evil.example:80",
        "Host: 10.0.0.1",
    ] {
        let r = http(
            addr,
            &format!(
                "PUT /latest/api/token HTTP/1.1\r\n{h}\r\nX-aws-ec2-metadata-token-ttl-seconds: 60"
            ),
        );
        assert_eq!(r.status, 400, "{h}");
        let r = http(
            addr,
            &format!("GET {CREDS}default HTTP/1.1\r\n{h}\r\nX-aws-ec2-metadata-token: {tok}"),
        );
        assert_eq!(r.status, 400, "{h}");
    }
    agent.stop(&env);
}

/// A 1-second token stops working once the agent's clock has passed its expiry: checked by
/// asking until the agent refuses it (bounded), then a fresh token still works on the same path.
#[test]
fn tokens_expire() {
    let env = Env::new();
    let (agent, _, addr) = start(&env, "", "");
    let r = put_token(addr, "1");
    assert_eq!(r.status, 200);
    let short = r.body;
    let path = format!("{CREDS}default");
    let refused = poll(Duration::from_secs(10), || {
        (get(addr, &path, &short).status == 401).then_some(())
    });
    assert!(
        refused.is_some(),
        "a 1 s token was still accepted after 10 s"
    );
    assert_eq!(get(addr, &path, &token(addr)).status, 200);
    agent.stop(&env);
}

/// No servable credentials: 503 with Retry-After, never the stale ones.
#[test]
fn no_credentials_is_503_with_retry_after() {
    let env = Env::new();
    env.provider.set_fault(Fault::status(500));
    let (agent, _, addr) = start(&env, "", "[refresh]\nmode = \"on-demand\"\n");
    let tok = token(addr);
    let r = get(addr, &format!("{CREDS}default"), &tok);
    assert_eq!(r.status, 503, "{r:?}");
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!(retry >= 1);
    assert!(!r.body.contains("AccessKeyId"));
    // The role listing needs no credentials.
    assert_eq!(get(addr, CREDS, &tok).status, 200);
    agent.stop(&env);
}

/// The IMDS listener is the same server: the header limit and the idle-connection eviction
/// apply to it as to the §4.1 listener.
#[test]
fn same_limits_as_the_main_listener() {
    let env = Env::new();
    let (agent, _, addr) = start(&env, "", "");
    // An oversized request head is not answered 200 (hyper answers 431 or closes), and while
    // it and a client that never finishes its head are open, others are served.
    let big = "a".repeat(16 * 1024);
    let mut huge = TcpStream::connect(addr).unwrap();
    let _ = write!(
        huge,
        "GET {CREDS} HTTP/1.1\r\nHost: localhost\r\nX-Big: {big}\r\n\r\n"
    );
    let mut first = [0u8; 12];
    huge.set_read_timeout(Some(LIMIT)).unwrap();
    let n = huge.read(&mut first).unwrap_or(0);
    assert!(
        n == 0 || first[..n].starts_with(b"HTTP/1.1 431"),
        "{first:?}"
    );
    // A client that never finishes its request head does not stop others.
    let mut slow = TcpStream::connect(addr).unwrap();
    slow.write_all(b"GET /latest/meta").unwrap();
    assert_eq!(put_token(addr, "60").status, 200);
    drop(slow);
    drop(huge);
    agent.stop(&env);
}

// ------------------------------------------------------------------ §4.6

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn imds_token_as(uid: Option<u32>, addr: SocketAddr) -> (u16, String) {
    curl(
        uid,
        &[
            "-X",
            "PUT",
            "-H",
            "X-aws-ec2-metadata-token-ttl-seconds: 60",
            &format!("http://{addr}/latest/api/token"),
        ],
    )
}

#[test]
fn allow_uids_guard_tcp_and_imds_by_peer_uid() {
    if !is_root() {
        eprintln!(
            "SKIP allow_uids_guard_tcp_and_imds_by_peer_uid: needs root (setpriv to another uid)"
        );
        return;
    }
    let env = Env::new();
    let roles = format!(
        "[[role]]\nname = \"default\"\nrole_alias = \"GatewayRole\"\nallow_uids = [{OTHER_UID}]\n[[role]]\nname = \"open\"\nrole_alias = \"GatewayRole\"\n"
    );
    let (agent, tcp, imds) = start(&env, &format!("allow_uids = [{OTHER_UID}]"), &roles);
    let tok = |role: &str| {
        std::fs::read_to_string(env.runtime_dir().join(format!("{role}.token"))).unwrap()
    };
    let creds = |uid: Option<u32>, role: &str, token: &str| {
        curl(
            uid,
            &[
                "-H",
                &format!("Authorization: {token}"),
                &format!("http://{tcp}/v1/credentials/{role}"),
            ],
        )
    };
    let default_token = tok("default");
    // TCP: the right token from uid 0 is refused; the same request from the listed uid passes.
    let (status, body) = creds(None, "default", &default_token);
    assert_eq!(status, 403, "{body}");
    assert!(!body.contains("AccessKeyId"));
    let (status, body) = creds(Some(OTHER_UID), "default", &default_token);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("AccessKeyId"));
    // The token is still checked first: the listed uid with a wrong token gets 401.
    assert_eq!(creds(Some(OTHER_UID), "default", "wrong").0, 401);
    // A role without allow_uids keeps the token-only rule, for any user.
    assert_eq!(creds(None, "open", &tok("open")).0, 200);
    assert_eq!(creds(Some(OTHER_UID), "open", &tok("open")).0, 200);

    // IMDS: the token PUT and every GET.
    let (status, _) = imds_token_as(None, imds);
    assert_eq!(status, 403, "uid 0 got an IMDS token");
    let (status, other_token) = imds_token_as(Some(OTHER_UID), imds);
    assert_eq!(status, 200);
    let imds_get = |uid: Option<u32>, path: &str| {
        curl(
            uid,
            &[
                "-H",
                &format!("X-aws-ec2-metadata-token: {other_token}"),
                &format!("http://{imds}{path}"),
            ],
        )
    };
    for path in [CREDS, "/latest/meta-data/iam/security-credentials/default"] {
        let (status, body) = imds_get(None, path);
        assert_eq!(status, 403, "uid 0 with a valid token on {path}: {body}");
        assert!(!body.contains("AccessKeyId"));
        let (status, body) = imds_get(Some(OTHER_UID), path);
        assert_eq!(status, 200, "{path}: {body}");
    }
    agent.stop(&env);
    env.assert_no_secrets(&[&other_token]);
}

/// A network namespace with a veth pair to this one, torn down on drop (also on failure). The
/// host end carries `169.254.169.254/32` (the IMDS address) and `169.254.171.1/30`; the other end
/// `169.254.171.2/30` with a route to the IMDS address. (This kernel has no `dummy` link type;
/// gateways use the systemd-networkd dummy unit.)
struct Netns {
    name: String,
    host_if: String,
}

impl Netns {
    fn create() -> Option<Netns> {
        let id = std::process::id() % 100_000;
        let ns = Netns {
            name: format!("iotcred-imds-{id}"),
            host_if: format!("ivh{id}"),
        };
        let peer_if = format!("ivc{id}");
        let steps: Vec<Vec<String>> = vec![
            vec!["netns".into(), "add".into(), ns.name.clone()],
            vec![
                "link".into(),
                "add".into(),
                ns.host_if.clone(),
                "type".into(),
                "veth".into(),
                "peer".into(),
                "name".into(),
                peer_if.clone(),
                "netns".into(),
                ns.name.clone(),
            ],
            vec![
                "addr".into(),
                "add".into(),
                "169.254.171.1/30".into(),
                "dev".into(),
                ns.host_if.clone(),
            ],
            vec![
                "addr".into(),
                "add".into(),
                "169.254.169.254/32".into(),
                "dev".into(),
                ns.host_if.clone(),
            ],
            vec!["link".into(), "set".into(), ns.host_if.clone(), "up".into()],
            ns.exec_args(&["ip", "addr", "add", "169.254.171.2/30", "dev", &peer_if]),
            ns.exec_args(&["ip", "link", "set", &peer_if, "up"]),
            ns.exec_args(&["ip", "link", "set", "lo", "up"]),
            ns.exec_args(&["ip", "route", "add", "169.254.169.254/32", "dev", &peer_if]),
        ];
        for args in steps {
            let ok = Command::new("ip")
                .args(&args)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                eprintln!("netns setup failed at: ip {}", args.join(" "));
                return None; // `ns` is dropped here: what was made is removed.
            }
        }
        Some(ns)
    }

    fn exec_args(&self, cmd: &[&str]) -> Vec<String> {
        ["netns", "exec", &self.name]
            .iter()
            .chain(cmd)
            .map(|s| s.to_string())
            .collect()
    }

    /// curl inside the namespace: (status, body).
    fn curl(&self, args: &[&str]) -> (u16, String) {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.name,
                "curl",
                "-sS",
                "--max-time",
                "20",
            ])
            .args(["-w", "\n%{http_code}"])
            .args(args)
            .output()
            .expect("ip netns exec curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.trim().parse().unwrap_or(0), body.to_owned())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// §4.6: a peer in another network namespace has no socket the agent can look up. With
/// `allow_uids` set it is refused, even as the same uid (root) that is allowed from the host;
/// without `allow_uids` the token alone decides. The IMDS listener binds 169.254.169.254 on the
/// host end of a veth pair; hop limit 1 is enough for the directly connected namespace.
#[test]
fn peer_in_another_network_namespace_is_refused_when_allow_uids_is_set() {
    if !is_root() {
        eprintln!("SKIP peer_in_another_network_namespace_...: needs root (ip netns)");
        return;
    }
    let Some(ns) = Netns::create() else {
        panic!("cannot create a network namespace with a veth pair (iproute2, root)");
    };
    let port = free_port();
    let addr: SocketAddr = format!("169.254.169.254:{port}").parse().unwrap();
    for (allow, from_ns) in [("allow_uids = [0]", 403), ("", 200)] {
        let env = Env::new();
        let k = env.pki.device_ec.key.display().to_string();
        let cfg = env.config_with(
            &env.pki.device_ec.cert,
            &k,
            "",
            &format!("[serve.imds]\nlisten = \"{addr}\"\nrole = \"default\"\n{allow}\n"),
        );
        let mut agent = env.start_agent(&cfg);
        assert!(agent.wait_ready(LIMIT), "{}", agent.log());
        let put = [
            "-X",
            "PUT",
            "-H",
            "X-aws-ec2-metadata-token-ttl-seconds: 60",
        ];
        let url = format!("http://{addr}/latest/api/token");
        // From the host (uid 0, same namespace): a token.
        let (status, host_token) = curl(None, &[&put[..], &[url.as_str()]].concat());
        assert_eq!(status, 200, "{allow:?}: from the host");
        // From the other namespace (also uid 0): refused when allow_uids is set.
        let (status, body) = ns.curl(&[&put[..], &[url.as_str()]].concat());
        assert_eq!(status, from_ns, "{allow:?}: from the namespace: {body}");
        let creds = format!("http://{addr}{CREDS}default");
        let header = format!("X-aws-ec2-metadata-token: {host_token}");
        let (status, body) = ns.curl(&["-H", &header, &creds]);
        assert_eq!(status, from_ns, "{allow:?}: GET from the namespace");
        if from_ns == 200 {
            assert!(body.contains("AccessKeyId"));
        }
        assert_eq!(curl(None, &["-H", &header, &creds]).0, 200);
        agent.stop(&env);
        env.assert_no_secrets(&[&host_token]);
    }
}
