//! Helpers for the reliability suites (`tests/tests/reliability_*.rs`): a raw HTTP/1.1 client
//! for the agent's Unix socket, `/v1/health` and `/v1/metrics` readers, a switchable loopback
//! TCP forwarder (to put several upstreams — or a closed port — behind one endpoint),
//! `/proc` readers for a process's descriptors and peak memory, and curl run as another user.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// A parsed HTTP response.
#[derive(Clone, Debug)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Header lines `(lower-case name, value)`.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: String,
}

impl Response {
    /// First header named `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON (panics with the body when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

/// Parses one complete response (`Connection: close` style: everything up to EOF).
pub fn parse_response(raw: &[u8]) -> io::Result<Response> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("no head: {text:?}")))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, status_line.to_string()))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(Response {
        status,
        headers,
        body: body.to_string(),
    })
}

/// `GET target` over the agent's Unix socket with `Connection: close` (10 s I/O timeouts).
pub fn unix_get(socket: &Path, target: &str) -> io::Result<Response> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_response(&raw)
}

/// `/v1/health` as JSON, with its status code.
pub fn health(socket: &Path) -> io::Result<(u16, serde_json::Value)> {
    let r = unix_get(socket, "/v1/health")?;
    let v =
        serde_json::from_str(&r.body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok((r.status, v))
}

/// The value of one metric sample (the exact series text before the value, e.g.
/// `iotcred_refresh_total{role="default",outcome="success"}`), from `/v1/metrics`.
pub fn metric(socket: &Path, series: &str) -> io::Result<f64> {
    let r = unix_get(socket, "/v1/metrics")?;
    metric_in(&r.body, series)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{series} not in metrics")))
}

/// One sample from a Prometheus text body.
pub fn metric_in(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Number of open file descriptors of `pid`.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A `/proc/PID/status` field in kB (`VmHWM`, `VmRSS`, …).
pub fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find_map(|l| {
        l.strip_prefix(field)?
            .strip_prefix(':')?
            .trim()
            .trim_end_matches(" kB")
            .trim()
            .parse()
            .ok()
    })
}

/// Where a [`Forwarder`] sends new connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// To backend `i`.
    Backend(usize),
    /// Nothing listens: the port is closed (connections are refused by the kernel).
    Closed,
}

const CLOSED: usize = usize::MAX;

/// A loopback TCP forwarder with switchable backends: puts several fake providers (good,
/// untrusted or expired server certificate, client-certificate rejecting) behind one port, or
/// closes the port. Existing connections keep their backend; the route applies to new ones.
#[derive(Debug)]
pub struct Forwarder {
    addr: SocketAddr,
    route: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Connections accepted so far (all routes).
    pub accepted: Arc<AtomicUsize>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Forwarder {
    /// Listens on `127.0.0.1:0`, forwarding to `backends[0]` at first.
    pub fn start(backends: Vec<SocketAddr>) -> io::Result<Forwarder> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let route = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (route, stop, accepted, conns) =
                (route.clone(), stop.clone(), accepted.clone(), conns.clone());
            std::thread::spawn(move || {
                accept_loop(listener, addr, backends, route, stop, accepted, conns)
            })
        };
        Ok(Forwarder {
            addr,
            route,
            stop,
            thread: Some(thread),
            accepted,
            conns,
        })
    }

    /// `localhost:PORT`.
    pub fn endpoint(&self) -> String {
        format!("localhost:{}", self.addr.port())
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Switches new connections to `route` (closing or re-opening the port as needed) and
    /// closes the connections forwarded so far (so a kept-alive upstream connection does not
    /// outlive the switch).
    pub fn set_route(&self, route: Route) {
        let v = match route {
            Route::Backend(i) => i,
            Route::Closed => CLOSED,
        };
        self.route.store(v, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.set_route(Route::Closed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    addr: SocketAddr,
    backends: Vec<SocketAddr>,
    route: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
) {
    let mut listener = Some(listener);
    while !stop.load(Ordering::SeqCst) {
        let r = route.load(Ordering::SeqCst);
        if r == CLOSED {
            // A really closed port: connect() gets ECONNREFUSED.
            listener = None;
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        let l = match &listener {
            Some(l) => l,
            None => {
                // Re-open the same port (std sets SO_REUSEADDR).
                match TcpListener::bind(addr) {
                    Ok(l) => listener.insert(l),
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                }
            }
        };
        l.set_nonblocking(true).ok();
        match l.accept() {
            Ok((client, _)) => {
                accepted.fetch_add(1, Ordering::SeqCst);
                client.set_nonblocking(false).ok();
                let Some(backend) = backends.get(r).copied() else {
                    continue;
                };
                let Ok(server) = TcpStream::connect(backend) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                if let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) {
                    let mut list = conns.lock().unwrap();
                    if let (Ok(a), Ok(b)) = (client.try_clone(), server.try_clone()) {
                        list.push(a);
                        list.push(b);
                    }
                    drop(list);
                    std::thread::spawn(move || pipe(client, s2));
                    std::thread::spawn(move || pipe(server, c2));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

/// Every regular file name in `dir`.
pub fn file_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// `dir/name`.
pub fn join(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// curl as `uid` (via `setpriv`, no supplementary groups) or as ourselves, with `args` (no
/// proxy from the environment; 20 s at most): (status, body).
pub fn curl_as(uid: Option<u32>, args: &[&str]) -> (u16, String) {
    let mut cmd = match uid {
        Some(u) => {
            let mut c = std::process::Command::new("setpriv");
            c.args([
                format!("--reuid={u}"),
                format!("--regid={u}"),
                "--clear-groups".into(),
                "curl".into(),
            ]);
            c
        }
        None => std::process::Command::new("curl"),
    };
    let out = cmd
        .args(["-sS", "--max-time", "20", "-w", "\n%{http_code}"])
        .args(args)
        .env_remove("http_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("all_proxy")
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}
