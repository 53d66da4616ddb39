//! `loadgen`: a small closed-loop HTTP/1.1 load generator for the local-serving benchmark
//! (tests/bench/compare.sh). wrk cannot talk to a Unix socket; this does both TCP and Unix
//! sockets with the same code, so iotcred and nginx are measured by the same client.
//!
//! N keep-alive connections each send one fixed GET, read the whole response (status line,
//! `Content-Length` body), record the latency and send the next. Requests answered during the
//! warm-up are not counted. Prints one line:
//! `requests=… errors=… seconds=… rps=… p50_us=… p90_us=… p99_us=… max_us=…`
//!
//! ```text
//! loadgen (--tcp 127.0.0.1:PORT | --unix PATH) [--path /v1/credentials] [--host 127.0.0.1]
//!         [--header 'Name: value']... [--connections 64] [--duration 10] [--warmup 1]
//!         [--requests N] [--threads 1]
//! ```
//! `--requests N` stops after N answered requests (then `--duration` is only a safety limit).

use std::io;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

#[derive(Clone, Debug)]
enum Target {
    Tcp(String),
    Unix(String),
}

#[derive(Debug)]
struct Opts {
    target: Target,
    path: String,
    host: String,
    headers: Vec<String>,
    connections: usize,
    duration: Duration,
    warmup: Duration,
    requests: Option<u64>,
    threads: usize,
}

const USAGE: &str = "usage: loadgen (--tcp HOST:PORT | --unix PATH) [--path P] [--host H] \
[--header 'N: v']... [--connections 64] [--duration SECS] [--warmup SECS] [--requests N] [--threads 1]";

fn parse() -> Result<Opts, String> {
    let mut target = None;
    let mut o = Opts {
        target: Target::Tcp(String::new()),
        path: "/v1/credentials".into(),
        host: "127.0.0.1".into(),
        headers: Vec::new(),
        connections: 64,
        duration: Duration::from_secs(10),
        warmup: Duration::from_secs(1),
        requests: None,
        threads: 1,
    };
    let mut args = std::env::args().skip(1);
    let secs = |v: String| -> Result<Duration, String> {
        v.parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(Duration::from_secs_f64)
            .ok_or_else(|| format!("not a number of seconds: {v}"))
    };
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--tcp" => target = Some(Target::Tcp(val()?)),
            "--unix" => target = Some(Target::Unix(val()?)),
            "--path" => o.path = val()?,
            "--host" => o.host = val()?,
            "--header" => o.headers.push(val()?),
            "--connections" => {
                o.connections = val()?.parse().map_err(|e| format!("--connections: {e}"))?
            }
            "--duration" => o.duration = secs(val()?)?,
            "--warmup" => o.warmup = secs(val()?)?,
            "--requests" => {
                o.requests = Some(val()?.parse().map_err(|e| format!("--requests: {e}"))?)
            }
            "--threads" => o.threads = val()?.parse().map_err(|e| format!("--threads: {e}"))?,
            "-h" | "--help" => return Err(String::new()),
            _ => return Err(format!("unknown argument {a}")),
        }
    }
    o.target = target.ok_or("--tcp or --unix is required")?;
    if o.connections == 0 || o.threads == 0 {
        return Err("--connections and --threads must be at least 1".into());
    }
    Ok(o)
}

/// What every connection shares.
struct Run {
    request: Vec<u8>,
    counting: AtomicBool,
    stop: AtomicBool,
    answered: AtomicU64,
    limit: Option<u64>,
}

#[derive(Default)]
struct ConnResult {
    latencies_ns: Vec<u32>,
    errors: u64,
}

fn main() -> ExitCode {
    let opts = match parse() {
        Ok(o) => o,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("loadgen: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let rt = if opts.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(opts.threads)
            .enable_all()
            .build()
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadgen: runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(opts)) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::from(1)
        }
    }
}

async fn run(o: Opts) -> io::Result<String> {
    let mut req = format!("GET {} HTTP/1.1\r\nHost: {}\r\n", o.path, o.host);
    for h in &o.headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    let run = Arc::new(Run {
        request: req.into_bytes(),
        counting: AtomicBool::new(o.warmup.is_zero()),
        stop: AtomicBool::new(false),
        answered: AtomicU64::new(0),
        limit: o.requests,
    });
    // Connect everything first, so connection set-up is not part of the measurement.
    let mut tasks = Vec::with_capacity(o.connections);
    for _ in 0..o.connections {
        let run = run.clone();
        let task = match &o.target {
            Target::Tcp(addr) => {
                let s = tokio::net::TcpStream::connect(addr).await?;
                s.set_nodelay(true)?;
                tokio::spawn(async move { connection(s, run).await })
            }
            Target::Unix(path) => {
                let s = tokio::net::UnixStream::connect(path).await?;
                tokio::spawn(async move { connection(s, run).await })
            }
        };
        tasks.push(task);
    }
    if !o.warmup.is_zero() {
        tokio::time::sleep(o.warmup).await;
        run.counting.store(true, Ordering::SeqCst);
    }
    let started = Instant::now();
    let deadline = started + o.duration;
    loop {
        let now = Instant::now();
        if now >= deadline || run.stop.load(Ordering::Relaxed) {
            break;
        }
        let wait = (deadline - now).min(Duration::from_millis(20));
        tokio::time::sleep(wait).await;
    }
    run.stop.store(true, Ordering::SeqCst);
    let elapsed = started.elapsed();
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let r = t.await.map_err(io::Error::other)?;
        errors += r.errors;
        all.extend_from_slice(&r.latencies_ns);
    }
    all.sort_unstable();
    let pct = |p: f64| -> f64 {
        if all.is_empty() {
            return 0.0;
        }
        let i = ((all.len() as f64 * p).ceil() as usize).clamp(1, all.len()) - 1;
        f64::from(all[i]) / 1000.0
    };
    let n = all.len() as u64;
    Ok(format!(
        "requests={n} errors={errors} seconds={:.3} rps={:.0} p50_us={:.1} p90_us={:.1} p99_us={:.1} max_us={:.1}",
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64(),
        pct(0.50),
        pct(0.90),
        pct(0.99),
        all.last().map_or(0.0, |&x| f64::from(x) / 1000.0),
    ))
}

/// One keep-alive connection: request, whole response, repeat until told to stop.
async fn connection<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, run: Arc<Run>) -> ConnResult {
    let mut out = ConnResult {
        latencies_ns: Vec::with_capacity(1 << 16),
        ..Default::default()
    };
    let mut buf = vec![0u8; 64 * 1024];
    while !run.stop.load(Ordering::Relaxed) {
        let t0 = Instant::now();
        let ok = match exchange(&mut s, &run.request, &mut buf).await {
            Ok(status) => status == 200,
            Err(_) => {
                out.errors += 1;
                return out; // the connection is gone
            }
        };
        let ns = u32::try_from(t0.elapsed().as_nanos()).unwrap_or(u32::MAX);
        if run.counting.load(Ordering::Relaxed) {
            if ok {
                out.latencies_ns.push(ns);
            } else {
                out.errors += 1;
            }
            let total = run.answered.fetch_add(1, Ordering::Relaxed) + 1;
            if run.limit.is_some_and(|l| total >= l) {
                run.stop.store(true, Ordering::Relaxed);
            }
        }
    }
    out
}

/// Sends the request and reads one response; returns its status.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    request: &[u8],
    buf: &mut [u8],
) -> io::Result<u16> {
    s.write_all(request).await?;
    let mut have = 0;
    loop {
        if have == buf.len() {
            return Err(io::Error::other("response head too large"));
        }
        let n = s.read(&mut buf[have..]).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        have += n;
        if let Some(end) = find(&buf[..have], b"\r\n\r\n") {
            let head = &buf[..end];
            let status = head
                .get(9..12)
                .and_then(|s| std::str::from_utf8(s).ok())
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| io::Error::other("bad status line"))?;
            let length =
                content_length(head).ok_or_else(|| io::Error::other("no Content-Length"))?;
            let mut body_have = have - (end + 4);
            while body_have < length {
                let want = (length - body_have).min(buf.len());
                let n = s.read(&mut buf[..want]).await?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                body_have += n;
            }
            if body_have > length {
                return Err(io::Error::other(
                    "more bytes than Content-Length (pipelining?)",
                ));
            }
            return Ok(status);
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn content_length(head: &[u8]) -> Option<usize> {
    let text = std::str::from_utf8(head).ok()?;
    text.split("\r\n").skip(1).find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse().ok())?
    })
}
