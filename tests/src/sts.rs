//! Fixtures for chained roles (SPEC §9): STS servers the agent can call over real TLS.
//!
//! - [`FakeSts`] runs `tests/sts/fake_sts.py`: AssumeRole with every SigV4 signature recomputed
//!   independently by botocore (from `tests/.deps/py`), source credentials looked up on the fake
//!   IoT provider's admin listener, and switchable faults.
//! - [`MotoSts`] runs `tests/sts/moto_sts.py`: moto's STS (PyPI, `tests/.deps/moto`), a real
//!   independent implementation of the XML API, served with TLS by werkzeug.
//! - [`ConnectProxy`]: a minimal HTTP CONNECT proxy that records the targets it tunnelled to.
//!
//! All of them listen on 127.0.0.1 only, on ephemeral ports they report themselves, and stop
//! when dropped.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::pki::CertKey;

/// `tests/.deps`, where `tests/install-deps.sh` installs the Python packages.
pub fn deps() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(".deps")
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("sts").join(name)
}

/// A Python child process that prints one JSON line when it listens and exits when its stdin
/// closes.
#[derive(Debug)]
struct PyServer {
    child: Child,
    stdin: Option<ChildStdin>,
    hello: Value,
}

impl PyServer {
    fn start(python_path: &Path, script: &Path, args: &[&str]) -> PyServer {
        let package = python_path.display().to_string();
        assert!(
            python_path.is_dir(),
            "{package} is missing: run tests/install-deps.sh"
        );
        let mut child = Command::new("python3")
            .arg(script)
            .args(args)
            .env("PYTHONPATH", python_path)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start python3");
        let stdin = child.stdin.take();
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read the server's first line");
        let hello: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("{} did not start ({e}): {line:?}", script.display()));
        PyServer {
            child,
            stdin,
            hello,
        }
    }

    fn port(&self, key: &str) -> u16 {
        self.hello[key]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .expect("port")
    }
}

impl Drop for PyServer {
    fn drop(&mut self) {
        self.stdin.take();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fault of the fake STS (`kind` of its admin API).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StsFault {
    /// 403 `AccessDenied` (the trust policy does not allow the caller).
    AccessDenied,
    /// 400 `Throttling`.
    Throttling,
    /// 500 `InternalFailure`.
    Status500,
    /// 400 `ExpiredToken`, and the caller's access key is expired from then on.
    ExpiredToken,
}

impl StsFault {
    fn kind(self) -> &'static str {
        match self {
            StsFault::AccessDenied => "access_denied",
            StsFault::Throttling => "throttling",
            StsFault::Status500 => "status_500",
            StsFault::ExpiredToken => "expired_token",
        }
    }
}

/// Options of [`FakeSts::start`].
#[derive(Clone, Debug)]
pub struct FakeStsOptions {
    /// Signing region it expects. Default `eu-west-1`.
    pub region: String,
    /// The fake provider's admin listener, to look up the source credentials.
    pub provider_admin: Option<SocketAddr>,
    /// The `ExternalId` the target role's trust policy requires, if any.
    pub external_id: Option<String>,
}

impl Default for FakeStsOptions {
    fn default() -> Self {
        FakeStsOptions {
            region: "eu-west-1".into(),
            provider_admin: None,
            external_id: None,
        }
    }
}

/// One set of credentials the fake STS issued.
#[derive(Clone, Debug)]
pub struct StsIssued {
    /// `ASIA…`.
    pub access_key_id: String,
    /// Secret.
    pub secret_access_key: String,
    /// Session token.
    pub session_token: String,
    /// The access key id that signed the call.
    pub source_access_key_id: String,
    /// `RoleSessionName`.
    pub session_name: String,
}

/// The signature-verifying fake STS (see the module docs).
#[derive(Debug)]
pub struct FakeSts {
    server: PyServer,
}

impl FakeSts {
    /// Starts it with the server certificate `cert` (for `localhost` and `127.0.0.1`).
    pub fn start(cert: &CertKey, options: &FakeStsOptions) -> FakeSts {
        let (c, k) = (
            cert.cert.display().to_string(),
            cert.key.display().to_string(),
        );
        let mut args = vec![
            "--cert".to_string(),
            c,
            "--key".to_string(),
            k,
            "--region".to_string(),
            options.region.clone(),
        ];
        if let Some(a) = options.provider_admin {
            args.push("--provider-admin".into());
            args.push(format!("http://{a}"));
        }
        if let Some(id) = &options.external_id {
            args.push("--external-id".into());
            args.push(id.clone());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        FakeSts {
            server: PyServer::start(&deps().join("py"), &script("fake_sts.py"), &args),
        }
    }

    /// The STS port.
    pub fn port(&self) -> u16 {
        self.server.port("port")
    }

    /// `https://localhost:PORT` (a name, so SNI and the certificate's name are checked).
    pub fn endpoint(&self) -> String {
        format!("https://localhost:{}", self.port())
    }

    fn admin(&self, method: &str, path: &str, body: &str) -> Value {
        admin_request(self.server.port("admin_port"), method, path, body)
    }

    /// Applies `fault` to every request until [`FakeSts::clear_faults`].
    pub fn set_fault(&self, fault: StsFault) {
        self.admin(
            "POST",
            "/fault",
            &format!("{{\"kind\":\"{}\"}}", fault.kind()),
        );
    }

    /// Applies `fault` to the next request only (queued in order).
    pub fn push_fault(&self, fault: StsFault) {
        self.admin(
            "POST",
            "/fault/once",
            &format!("{{\"kind\":\"{}\"}}", fault.kind()),
        );
    }

    /// Makes the fake's clock run `seconds` ahead of the real one (its `Date` header and its
    /// check of `X-Amz-Date`).
    pub fn set_clock_skew(&self, seconds: i64) {
        self.admin(
            "POST",
            "/fault",
            &format!("{{\"kind\":\"clock_skew\",\"seconds\":{seconds}}}"),
        );
    }

    /// Removes every fault and the clock skew.
    pub fn clear_faults(&self) {
        self.admin("DELETE", "/fault", "");
    }

    /// Every request: `access_key_id`, `signature_ok`, `form`, `status`, `code`, `issued`.
    pub fn requests(&self) -> Vec<Value> {
        self.admin("GET", "/requests", "")
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// `(connections, requests)` so far.
    pub fn stats(&self) -> (u64, u64) {
        let s = self.admin("GET", "/stats", "");
        (
            s["connections"].as_u64().unwrap_or(0),
            s["requests"].as_u64().unwrap_or(0),
        )
    }

    /// Every credential set issued.
    pub fn issued(&self) -> Vec<StsIssued> {
        self.admin("GET", "/issued", "")
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|v| {
                let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
                StsIssued {
                    access_key_id: s("access_key_id"),
                    secret_access_key: s("secret_access_key"),
                    session_token: s("session_token"),
                    source_access_key_id: s("source_access_key_id"),
                    session_name: s("session_name"),
                }
            })
            .collect()
    }

    /// The secrets it issued, for a secret search of logs.
    pub fn secrets(&self) -> Vec<String> {
        self.issued()
            .into_iter()
            .flat_map(|i| [i.secret_access_key, i.session_token])
            .collect()
    }
}

/// moto's STS over HTTPS (see the module docs).
#[derive(Debug)]
pub struct MotoSts {
    server: PyServer,
}

impl MotoSts {
    /// Starts it with the server certificate `cert`.
    pub fn start(cert: &CertKey) -> MotoSts {
        let (c, k) = (
            cert.cert.display().to_string(),
            cert.key.display().to_string(),
        );
        MotoSts {
            server: PyServer::start(
                &deps().join("moto"),
                &script("moto_sts.py"),
                &["--cert", &c, "--key", &k],
            ),
        }
    }

    /// `https://localhost:PORT`.
    pub fn endpoint(&self) -> String {
        format!("https://localhost:{}", self.server.port("port"))
    }
}

/// One request to a plain-HTTP admin listener on 127.0.0.1 (HTTP/1.0, the server closes);
/// the JSON body of the answer.
pub fn admin_request(port: u16, method: &str, path: &str, body: &str) -> Value {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to admin listener");
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("write admin request");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read admin answer");
    let (head, json) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{method} {path}: {head}"
    );
    serde_json::from_str(json).unwrap_or(Value::Null)
}

/// A minimal HTTP CONNECT proxy on 127.0.0.1: records each request line, then tunnels bytes.
/// `localhost` targets are dialled as 127.0.0.1.
#[derive(Debug)]
pub struct ConnectProxy {
    port: u16,
    seen: Arc<Mutex<Vec<String>>>,
}

impl ConnectProxy {
    /// Starts it (a thread per connection; it lives as long as the test process).
    pub fn start() -> ConnectProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let seen = seen2.clone();
                std::thread::spawn(move || tunnel(client, &seen));
            }
        });
        ConnectProxy { port, seen }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The `CONNECT …` request lines seen so far.
    pub fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

fn tunnel(client: TcpStream, seen: &Mutex<Vec<String>>) {
    let Ok(read_half) = client.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let target = line.split_whitespace().nth(1).unwrap_or("").to_string();
    loop {
        let mut h = String::new();
        match reader.read_line(&mut h) {
            Ok(n) if n > 2 => {}
            _ => break,
        }
    }
    seen.lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(line.trim().to_string());
    let Ok(upstream) = TcpStream::connect(target.replace("localhost", "127.0.0.1")) else {
        return;
    };
    let mut c = client;
    if c.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .is_err()
    {
        return;
    }
    let (Ok(mut c2), Ok(mut u2)) = (c.try_clone(), upstream.try_clone()) else {
        return;
    };
    let mut upstream = upstream;
    let t = std::thread::spawn(move || {
        let _ = std::io::copy(&mut u2, &mut c2);
        let _ = c2.shutdown(std::net::Shutdown::Write);
    });
    let _ = std::io::copy(&mut reader, &mut upstream);
    let _ = upstream.shutdown(std::net::Shutdown::Write);
    let _ = t.join();
}
