//! Reliability: hostile local clients against the real `iotcred run` (loopback and the Unix
//! socket only). Idle connections, slowloris, wrong-token floods, oversized headers, pipelined
//! floods and a peer uid that is not allowed — while a legitimate client keeps asking.
//!
//! The suite runs small counts and asserts correctness only: every legitimate request gets a
//! 200, the agent stays up, its descriptor count returns to the baseline. With
//! `IOTCRED_HOSTILE_FULL=1` (tests/bench/reliability/hostile.sh, after raising `ulimit -n`) it
//! runs the full counts and prints the figures: the legitimate client's p50/p99/max, the
//! agent's peak RSS (VmHWM) and peak descriptor count.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use iotcred_tests::agent::{Env, poll};
use iotcred_tests::hostile;

struct Scale {
    idle: usize,
    slowloris: usize,
    slowloris_tick: Duration,
    wrong_tokens: usize,
    oversized: usize,
    pipelined: usize,
    nobody: usize,
    legit: usize,
}

fn scale() -> Scale {
    if std::env::var_os("IOTCRED_HOSTILE_FULL").is_some() {
        Scale {
            idle: 5000,
            slowloris: 200,
            slowloris_tick: Duration::from_secs(1),
            wrong_tokens: 100_000,
            oversized: 1000,
            pipelined: 20_000,
            nobody: 200,
            legit: 2000,
        }
    } else {
        Scale {
            idle: 300,
            slowloris: 20,
            slowloris_tick: Duration::from_millis(200),
            wrong_tokens: 2000,
            oversized: 20,
            pipelined: 500,
            nobody: 3,
            legit: 100,
        }
    }
}

/// Reads one HTTP/1.1 response from a kept-alive stream; returns the status.
fn read_one(r: &mut impl BufRead) -> std::io::Result<u16> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let status: u16 = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or(std::io::ErrorKind::InvalidData)?;
    let mut len = 0usize;
    loop {
        line.clear();
        r.read_line(&mut line)?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some((n, v)) = line.split_once(':') {
            if n.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(status)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn tcp_get(port: u16, path: &str, token: &str) -> std::io::Result<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: {token}\r\nConnection: close\r\n\r\n"
    )?;
    read_one(&mut BufReader::new(s))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[test]
fn hostile_local_clients_do_not_starve_a_legitimate_one() {
    let sc = scale();
    let env = Env::new();
    let port = free_port();
    let k = env.pki.device_ec.key.display().to_string();
    let cfg = env.config_with(
        &env.pki.device_ec.cert,
        &k,
        &format!("[serve]\nlisten = \"127.0.0.1:{port}\"\nsocket_mode = \"0666\"\n"),
        "[[role]]\nname = \"default\"\nrole_alias = \"GatewayRole\"\nallow_uids = [0]\n",
    );
    let mut agent = env.start_agent(&cfg);
    assert!(agent.wait_ready(Duration::from_secs(30)), "{}", agent.log());
    let pid = agent.pid();
    let socket: PathBuf = env.socket();
    let token = std::fs::read_to_string(env.runtime_dir().join("default.token")).unwrap();
    assert_eq!(tcp_get(port, "/v1/credentials", &token).unwrap(), 200);
    assert_eq!(
        hostile::unix_get(&socket, "/v1/credentials")
            .unwrap()
            .status,
        200
    );
    let baseline_fds = hostile::fd_count(pid);

    let stop = Arc::new(AtomicBool::new(false));
    let wrong_401 = Arc::new(AtomicUsize::new(0));
    let mut attackers = Vec::new();

    // 1. Idle connections, half on TCP, half on the socket, held for the whole attack.
    let mut idle_tcp = Vec::new();
    let mut idle_unix = Vec::new();
    for i in 0..sc.idle {
        if i % 2 == 0 {
            if let Ok(s) = TcpStream::connect(("127.0.0.1", port)) {
                idle_tcp.push(s);
            }
        } else if let Ok(s) = UnixStream::connect(&socket) {
            idle_unix.push(s);
        }
    }
    // 2. Slowloris: request heads one byte per tick, never finished.
    {
        let stop = stop.clone();
        let n = sc.slowloris;
        let tick = sc.slowloris_tick;
        attackers.push(std::thread::spawn(move || {
            let head =
                format!("GET /v1/credentials HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Slow: ");
            let mut conns: Vec<TcpStream> = (0..n)
                .filter_map(|_| TcpStream::connect(("127.0.0.1", port)).ok())
                .collect();
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let b = head.as_bytes().get(i).copied().unwrap_or(b'a');
                conns.retain_mut(|c| c.write_all(&[b]).is_ok());
                i += 1;
                std::thread::sleep(tick); // pacing of the attack, not synchronisation
            }
        }));
    }
    // 3. Wrong tokens over kept-alive connections (4 attackers).
    for _ in 0..4 {
        let n = sc.wrong_tokens / 4;
        let wrong_401 = wrong_401.clone();
        attackers.push(std::thread::spawn(move || {
            let mut sent = 0;
            while sent < n {
                let Ok(s) = TcpStream::connect(("127.0.0.1", port)) else {
                    continue;
                };
                let mut w = s.try_clone().unwrap();
                let mut r = BufReader::new(s);
                while sent < n {
                    sent += 1;
                    let req = format!(
                        "GET /v1/credentials HTTP/1.1\r\nHost: localhost\r\nAuthorization: wrong-{sent}\r\n\r\n"
                    );
                    if w.write_all(req.as_bytes()).is_err() {
                        break;
                    }
                    match read_one(&mut r) {
                        Ok(401) => {
                            wrong_401.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(other) => panic!("wrong token answered {other}"),
                        Err(_) => break,
                    }
                }
            }
        }));
    }
    // 4. Oversized headers.
    {
        let n = sc.oversized;
        attackers.push(std::thread::spawn(move || {
            let big = "a".repeat(32 * 1024);
            for _ in 0..n {
                let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
                    continue;
                };
                s.set_read_timeout(Some(Duration::from_secs(10))).ok();
                let _ = write!(
                    s,
                    "GET /v1/health HTTP/1.1\r\nHost: localhost\r\nX-Big: {big}\r\n\r\n"
                );
                let mut r = BufReader::new(s);
                match read_one(&mut r) {
                    Ok(431) | Err(_) => {}
                    Ok(other) => panic!("oversized head answered {other}"),
                }
            }
        }));
    }
    // 5. A pipelined flood on one socket connection.
    {
        let n = sc.pipelined;
        let socket = socket.clone();
        attackers.push(std::thread::spawn(move || {
            let s = UnixStream::connect(&socket).unwrap();
            let mut w = s.try_clone().unwrap();
            let writer = std::thread::spawn(move || {
                let one = b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n";
                for _ in 0..n {
                    if w.write_all(one).is_err() {
                        break;
                    }
                }
            });
            let mut r = BufReader::new(s);
            let mut got = 0;
            while got < n && read_one(&mut r).is_ok() {
                got += 1;
            }
            let _ = writer.join();
            assert_eq!(got, n, "pipelined responses");
        }));
    }
    // 6. A peer whose uid is not allowed (nobody), through the real `iotcred get`.
    let mut nobody_codes = Vec::new();
    if unsafe { libc::geteuid() } == 0 {
        // nobody must reach the socket: open the directories on the way.
        let mut p: &Path = &socket;
        while let Some(parent) = p.parent() {
            if parent == Path::new("/") || parent == Path::new("/tmp") {
                break;
            }
            let mode = std::fs::metadata(parent).unwrap().permissions().mode();
            std::fs::set_permissions(parent, std::fs::Permissions::from_mode(mode | 0o011))
                .unwrap();
            p = parent;
        }
        let bin = iotcred_tests::agent::iotcred_bin();
        for _ in 0..sc.nobody {
            let out = std::process::Command::new("setpriv")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(&bin)
                .args(["get", "--socket"])
                .arg(&socket)
                .env("IOTCRED_LOG", "trace")
                .output()
                .expect("setpriv");
            env.keep_log(String::from_utf8_lossy(&out.stderr).into_owned());
            assert!(out.stdout.is_empty(), "nobody got credentials");
            nobody_codes.push(out.status.code());
        }
    }

    // The legitimate client, on both listeners, during the attack.
    let mut lat = Vec::with_capacity(sc.legit);
    let mut peak_fds = 0;
    for i in 0..sc.legit {
        let t = Instant::now();
        let status = if i % 2 == 0 {
            tcp_get(port, "/v1/credentials", &token).unwrap_or(0)
        } else {
            hostile::unix_get(&socket, "/v1/credentials")
                .map(|r| r.status)
                .unwrap_or(0)
        };
        lat.push(t.elapsed());
        assert_eq!(status, 200, "legitimate request {i} during the attack");
        peak_fds = peak_fds.max(hostile::fd_count(pid));
    }
    assert!(!agent.exited(), "agent died under attack:\n{}", agent.log());

    stop.store(true, Ordering::SeqCst);
    for a in attackers {
        a.join().expect("attacker");
    }
    drop(idle_tcp);
    drop(idle_unix);
    let wrong = wrong_401.load(Ordering::Relaxed);
    assert!(wrong > 0, "no wrong-token request was answered");
    for c in &nobody_codes {
        assert_eq!(*c, Some(5), "nobody: `get` must be refused (403 → exit 5)");
    }

    // Descriptors return to the baseline once the attackers are gone.
    let back = poll(Duration::from_secs(40), || {
        (hostile::fd_count(pid) <= baseline_fds).then_some(())
    });
    assert!(
        back.is_some(),
        "fd count {} did not return to {baseline_fds}",
        hostile::fd_count(pid)
    );
    assert_eq!(
        hostile::unix_get(&socket, "/v1/credentials")
            .unwrap()
            .status,
        200
    );
    let hwm = hostile::status_kb(pid, "VmHWM").unwrap_or(0);
    let rejected = hostile::metric(&socket, "iotcred_connections_rejected_total").unwrap_or(-1.0);
    lat.sort();
    eprintln!(
        "hostile: legit n={} p50={:?} p99={:?} max={:?}; wrong-token 401s={wrong}; VmHWM={} KiB; fds baseline={baseline_fds} peak={peak_fds}; rejected connections={rejected}",
        lat.len(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or_default(),
        hwm
    );
    let (code, log) = agent.stop(&env);
    assert_eq!(code, Some(0), "{log}");
    env.assert_no_secrets(&[&token]);
}
