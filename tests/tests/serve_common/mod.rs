//! Shared harness for the `serve_*` tests: starts the agent's HTTP server in-process on a temp
//! dir socket and a 127.0.0.1:0 listener, with roles whose credentials the test publishes.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use iotcred_agent::metrics::Metrics;
use iotcred_agent::server::{self, ServeConfig, ServerState};
use iotcred_agent::source::Obtained;
use iotcred_agent::state::{Clock, RoleHandle, RolePublisher, role_channel};
use iotcred_core::schedule::{Mode, ScheduleConfig, Unservable};
use iotcred_core::{Credentials, Secret, UnixTime};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub const SECRET: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY";
pub const SESSION: &str = "FwoGZXIvYXdzEXAMPLESESSIONTOKEN+/=";

/// One role of the harness.
#[derive(Clone, Debug)]
pub struct RoleSpec {
    pub name: &'static str,
    pub mode: Mode,
    pub allow_uids: Vec<u32>,
    pub allow_gids: Vec<u32>,
}

impl RoleSpec {
    pub fn new(name: &'static str) -> Self {
        RoleSpec {
            name,
            mode: Mode::Proactive,
            allow_uids: Vec::new(),
            allow_gids: Vec::new(),
        }
    }
}

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub tcp: Option<SocketAddr>,
    pub tokens: Vec<(String, String)>,
    pub publishers: Vec<RolePublisher>,
    pub handles: Vec<RoleHandle>,
    pub state: Arc<ServerState>,
    pub metrics: Arc<Metrics>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

pub async fn start(roles: &[RoleSpec]) -> Harness {
    start_with(roles, |_| {}).await
}

pub async fn start_with(roles: &[RoleSpec], tweak: impl FnOnce(&mut ServeConfig)) -> Harness {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("agent.sock");
    let mut cfg = ServeConfig::new(socket.clone(), dir.path().join("run"));
    cfg.listen = Some("127.0.0.1:0".parse().expect("addr"));
    cfg.request_wait = Duration::ZERO;
    tweak(&mut cfg);
    let mut publishers = Vec::new();
    let mut handles = Vec::new();
    let clock = Clock::new();
    for r in roles {
        let config = ScheduleConfig {
            mode: r.mode,
            ..ScheduleConfig::default()
        };
        let (p, h) = role_channel(r.name, config, clock, &r.allow_uids, &r.allow_gids);
        publishers.push(p);
        handles.push(h);
    }
    let listeners = server::bind(&cfg, &handles).await.expect("bind");
    let tcp = listeners.tcp_addr();
    let tokens = roles
        .iter()
        .map(|r| {
            let t = std::fs::read_to_string(cfg.runtime_dir.join(format!("{}.token", r.name)))
                .expect("token file");
            assert_eq!(listeners.token(r.name).expect("token").as_str(), t);
            (r.name.to_owned(), t)
        })
        .collect();
    let names: Vec<&str> = roles.iter().map(|r| r.name).collect();
    let metrics = Arc::new(Metrics::new(&names));
    let state = ServerState::new(handles.clone(), metrics.clone(), &cfg);
    let (stop, stop_rx) = oneshot::channel();
    let task = tokio::spawn(server::serve(listeners, state.clone(), async move {
        let _ = stop_rx.await;
    }));
    Harness {
        dir,
        socket,
        tcp,
        tokens,
        publishers,
        handles,
        state,
        metrics,
        stop: Some(stop),
        task: Some(task),
    }
}

impl Harness {
    pub fn token(&self, role: &str) -> &str {
        &self
            .tokens
            .iter()
            .find(|(n, _)| n == role)
            .expect("role token")
            .1
    }

    /// Publishes credentials valid for `lifetime` (refresh window from half of it), as the
    /// role's refresher does when its source answers.
    pub fn publish(&self, role: usize, key_id: &str, lifetime: Duration) {
        publish(&self.publishers[role], key_id, lifetime);
    }

    pub async fn tcp_request(&self, raw: &str) -> Reply {
        let mut s = TcpStream::connect(self.tcp.expect("tcp listener"))
            .await
            .expect("connect tcp");
        exchange(&mut s, raw).await
    }

    pub async fn unix_request(&self, raw: &str) -> Reply {
        let mut s = UnixStream::connect(&self.socket)
            .await
            .expect("connect unix");
        exchange(&mut s, raw).await
    }

    /// Tells the server to stop (it drains in the background).
    pub fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }

    /// Waits for the server task to end.
    pub async fn stopped(&mut self) {
        if let Some(t) = self.task.take() {
            t.await.expect("server task");
        }
    }

    /// Stops the server and waits for it to drain.
    pub async fn shutdown(mut self) {
        self.stop();
        self.stopped().await;
    }
}

/// `GET path` on TCP with `Host: localhost` and the given extra header lines.
pub fn get(path: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{extra}Connection: close\r\n\r\n")
}

/// A parsed HTTP response.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).expect("JSON body")
    }

    pub fn code(&self) -> String {
        self.json()["code"].as_str().expect("code").to_owned()
    }
}

/// Sends `raw` and reads one response.
pub async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, raw: &str) -> Reply {
    s.write_all(raw.as_bytes()).await.expect("write");
    read_reply(s).await.expect("a response")
}

/// Reads one response (framed by Content-Length); `None` when the connection closed first.
/// Use [`Reader`] when several responses may arrive in one read (pipelining).
pub async fn read_reply<S: AsyncRead + Unpin>(s: &mut S) -> Option<Reply> {
    Reader::default().read(s, false).await
}

/// A response reader that keeps bytes read past the end of one response for the next.
#[derive(Default)]
pub struct Reader {
    buf: Vec<u8>,
}

impl Reader {
    /// Reads one response; `head_only` for answers to `HEAD` (no body follows).
    pub async fn read<S: AsyncRead + Unpin>(
        &mut self,
        s: &mut S,
        head_only: bool,
    ) -> Option<Reply> {
        let mut chunk = [0u8; 4096];
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(head_len) =
                resp.parse(&self.buf).expect("valid response head")
            {
                let status = resp.code.expect("status");
                let headers: Vec<(String, String)> = resp
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_owned(),
                            String::from_utf8(h.value.to_vec()).expect("ascii header"),
                        )
                    })
                    .collect();
                let len: usize = if head_only {
                    0
                } else {
                    headers
                        .iter()
                        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                        .map(|(_, v)| v.parse().expect("content-length"))
                        .unwrap_or(0)
                };
                while self.buf.len() < head_len + len {
                    let n = s.read(&mut chunk).await.expect("read body");
                    assert!(n > 0, "connection closed inside the body");
                    self.buf.extend_from_slice(&chunk[..n]);
                }
                let body =
                    String::from_utf8(self.buf[head_len..head_len + len].to_vec()).expect("utf8");
                self.buf.drain(..head_len + len);
                return Some(Reply {
                    status,
                    headers,
                    body,
                });
            }
            let n = match s.read(&mut chunk).await {
                Ok(n) => n,
                Err(_) => return None,
            };
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// Whether the peer closed the connection (EOF or reset) without sending anything.
pub async fn closed_without_reply<S: AsyncRead + Unpin>(s: &mut S) -> bool {
    let mut b = [0u8; 1];
    matches!(s.read(&mut b).await, Ok(0) | Err(_))
}

pub fn my_uid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

pub fn my_gid() -> u32 {
    // SAFETY: getgid has no preconditions and cannot fail.
    unsafe { libc::getgid() }
}

/// Feeds `publisher` credentials valid for `lifetime`, as a refresher does after a fetch (no
/// jitter: the refresh window opens at half the lifetime for lifetimes up to 30 minutes and
/// beyond).
pub fn publish(publisher: &RolePublisher, key_id: &str, lifetime: Duration) {
    issue(publisher, key_id, lifetime).expect("servable credentials");
}

/// What a refresher does with credentials valid for `lifetime` that its source obtained.
pub fn issue(
    publisher: &RolePublisher,
    key_id: &str,
    lifetime: Duration,
) -> Result<(), Unservable> {
    let _ = publisher.poll_action();
    let obtained = Obtained {
        credentials: Credentials {
            access_key_id: key_id.to_owned(),
            secret_access_key: Secret::from(SECRET),
            session_token: Secret::from(SESSION),
            // The provider's clock, deliberately far off: consumers must not see it.
            expiration: UnixTime::from_secs(2_000_000_000),
        },
        lifetime,
        arrived: Instant::now(),
        latency: Duration::ZERO,
    };
    publisher.handle_issued(obtained, 0, |_| {})
}
