//! Start-up side of the server: token files (and the per-role token directories of §4.5), the
//! socket file and its mode, stale and busy sockets, loopback-or-link-local-only TCP, and
//! systemd socket activation.

mod serve_common;

use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::sync::Arc;
use std::time::Duration;

use iotcred_agent::metrics::Metrics;
use iotcred_agent::server::{
    self, Activation, ServeConfig, ServeError, ServerState, parse_listen_env,
};
use iotcred_agent::state::{Clock, role_channel};
use iotcred_core::schedule::ScheduleConfig;
use serve_common::*;
use tokio::net::{TcpStream, UnixStream};

fn mode_of(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[tokio::test]
async fn token_files_are_private_random_and_kept_across_restarts() {
    let mut h = start(&[RoleSpec::new("default"), RoleSpec::new("telemetry")]).await;
    let run = h.dir.path().join("run");
    let mut first = Vec::new();
    for role in ["default", "telemetry"] {
        let path = run.join(format!("{role}.token"));
        let meta = std::fs::metadata(&path).unwrap();
        assert!(meta.is_file());
        assert_eq!(meta.permissions().mode() & 0o7777, 0o640, "{role}");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.ends_with('\n') && !text.ends_with('\r'));
        assert!(text.len() >= 32, "at least 128 bits of hex");
        assert!(text.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(text, h.token(role));
        // The bind-mountable copy (§4.5): same value, same mode, alone in its 0750 directory.
        let dir = run.join("tokens").join(role);
        assert_eq!(mode_of(&dir), 0o750);
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["token"]);
        assert_eq!(std::fs::read_to_string(dir.join("token")).unwrap(), text);
        assert_eq!(mode_of(&dir.join("token")), 0o640);
        first.push(text);
    }
    assert_ne!(first[0], first[1]);
    // No temp files left behind.
    let mut names: Vec<String> = std::fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["default.token", "telemetry.token", "tokens"]);

    // A new start (the first stopped) keeps the valid tokens it finds, so running apps keep
    // working; a damaged file is replaced by a new token. (The temp dir outlives the harness.)
    let kept_dir = std::mem::replace(&mut h.dir, tempfile::tempdir().unwrap());
    let dir = kept_dir.path().to_owned();
    let cfg = {
        let mut c = ServeConfig::new(dir.join("agent.sock"), run.clone());
        c.socket_mode = 0o600;
        c
    };
    h.shutdown().await;
    let (_p, handle) = role_channel("default", ScheduleConfig::default(), Clock::new(), &[], &[]);
    let l = server::bind(&cfg, std::slice::from_ref(&handle))
        .await
        .unwrap();
    let again = std::fs::read_to_string(run.join("default.token")).unwrap();
    assert_eq!(again, first[0]);
    assert_eq!(l.token("default").unwrap().as_str(), again);
    assert_eq!(mode_of(&run.join("default.token")), 0o640);
    // The token never shows in Debug output.
    assert!(!format!("{l:?}").contains(&again));
    // `telemetry` is no longer configured: its token files are gone, its directory stays.
    assert!(!run.join("telemetry.token").exists());
    assert!(!run.join("tokens/telemetry/token").exists());
    assert!(run.join("tokens/telemetry").is_dir());
    drop(l);

    std::fs::write(run.join("tokens/default/token"), "not a token").unwrap();
    std::fs::write(run.join("default.token"), "not a token").unwrap();
    let l = server::bind(&cfg, std::slice::from_ref(&handle))
        .await
        .unwrap();
    let fresh = std::fs::read_to_string(run.join("default.token")).unwrap();
    assert_ne!(fresh, first[0]);
    assert_eq!(fresh.len(), 64);
    assert_eq!(l.token("default").unwrap().as_str(), fresh);
    assert_eq!(
        std::fs::read_to_string(run.join("tokens/default/token")).unwrap(),
        fresh
    );
}

#[tokio::test]
async fn socket_has_the_configured_mode() {
    for mode in [0o600, 0o660, 0o666] {
        let h = start_with(&[RoleSpec::new("default")], |c| c.socket_mode = mode).await;
        let meta = std::fs::symlink_metadata(&h.socket).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o7777, mode);
        // Nothing else left in the socket's directory (the private bind dir is gone).
        let names: Vec<String> = std::fs::read_dir(h.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        let mut names = names;
        names.sort();
        assert_eq!(names, ["agent.sock", "run"]);
        h.publish(0, "ASIAMODE", Duration::from_secs(3600));
        let r = h.unix_request(&get("/v1/health", "")).await;
        assert_eq!(r.status, 200);
        h.shutdown().await;
    }
}

#[tokio::test]
async fn stale_socket_replaced_busy_socket_and_other_files_refused() {
    let h = start(&[RoleSpec::new("default")]).await;
    let (_p, handle) = role_channel("default", ScheduleConfig::default(), Clock::new(), &[], &[]);
    let roles = std::slice::from_ref(&handle);

    // Someone listens: refuse, and leave the socket alone.
    let cfg = ServeConfig::new(h.socket.clone(), h.dir.path().join("run2"));
    let err = server::bind(&cfg, roles).await.unwrap_err();
    assert!(matches!(err, ServeError::SocketInUse(_)), "{err}");
    assert!(err.to_string().contains("another iotcred agent"));
    let r = h.unix_request(&get("/v1/metrics", "")).await;
    assert_eq!(r.status, 200);

    // A stale socket (nothing listening) is replaced.
    let stale = h.dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let cfg = ServeConfig::new(stale.clone(), h.dir.path().join("run3"));
    let l = server::bind(&cfg, roles).await.unwrap();
    assert!(l.has_unix());
    assert!(UnixStream::connect(&stale).await.is_ok());

    // A regular file is never removed.
    let file = h.dir.path().join("file.sock");
    std::fs::write(&file, b"keep me").unwrap();
    let cfg = ServeConfig::new(file.clone(), h.dir.path().join("run4"));
    let err = server::bind(&cfg, roles).await.unwrap_err();
    assert!(matches!(err, ServeError::NotASocket(_)), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    h.shutdown().await;
}

#[tokio::test]
async fn only_loopback_and_link_local_tcp_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let (_p, handle) = role_channel("default", ScheduleConfig::default(), Clock::new(), &[], &[]);
    // Neither a wildcard, nor a public or private address, nor the IMDS address (for the
    // `[serve.imds]` listener only), nor a link-local address that is not one of §4.5.
    for addr in [
        "0.0.0.0:0",
        "192.0.2.1:2773",
        "[::]:0",
        "169.254.169.254:80",
        "169.254.170.3:80",
        "[fd00:ec2::254]:80",
        "[fe80::1]:80",
    ] {
        let mut cfg = ServeConfig::new(dir.path().join("a.sock"), dir.path().join("run"));
        cfg.listen = Some(addr.parse().unwrap());
        let err = server::bind(&cfg, std::slice::from_ref(&handle))
            .await
            .unwrap_err();
        assert!(matches!(err, ServeError::NotLoopback(_)), "{addr}: {err}");
        assert!(err.to_string().contains("loopback"));
        assert!(
            !dir.path().join("a.sock").exists(),
            "nothing created before the refusal"
        );
    }
    let mut cfg = ServeConfig::new(dir.path().join("a.sock"), dir.path().join("run"));
    cfg.listen = Some("[::1]:0".parse().unwrap());
    // [::1] may be unavailable in a container without IPv6: then binding fails, not the check.
    match server::bind(&cfg, std::slice::from_ref(&handle)).await {
        Ok(l) => assert!(l.tcp_addr().unwrap().ip().is_loopback()),
        Err(e) => assert!(matches!(e, ServeError::Listen { .. }), "{e}"),
    }
    // A link-local address of §4.5 passes the check; when no interface carries it (the usual
    // case on a test machine: the netns test adds it only for its own run), the error says
    // what to install.
    for addr in ["169.254.170.23:0", "[fd00:ec2::23]:0"] {
        cfg.listen = Some(addr.parse().unwrap());
        match server::bind(&cfg, std::slice::from_ref(&handle)).await {
            Ok(l) => assert_eq!(l.tcp_addr().unwrap().ip(), cfg.listen.unwrap().ip()),
            Err(e) => {
                assert!(matches!(e, ServeError::AddressMissing(_)), "{addr}: {e}");
                assert!(e.to_string().contains("iotcred0"), "{e}");
            }
        }
    }
}

#[test]
fn listen_env_parsing() {
    assert_eq!(parse_listen_env(None, None, None, 42).unwrap(), None);
    assert_eq!(
        parse_listen_env(Some("41"), Some("2"), None, 42).unwrap(),
        None,
        "other pid"
    );
    assert_eq!(
        parse_listen_env(Some("42"), Some("2"), None, 42).unwrap(),
        Some(vec![(3, None), (4, None)])
    );
    assert_eq!(
        parse_listen_env(Some("42"), Some("2"), Some("iotcred.socket:http"), 42).unwrap(),
        Some(vec![
            (3, Some("iotcred.socket".to_owned())),
            (4, Some("http".to_owned()))
        ])
    );
    assert_eq!(
        parse_listen_env(Some("42"), Some("0"), Some(""), 42).unwrap(),
        Some(vec![])
    );
    assert!(parse_listen_env(Some("x"), Some("1"), None, 42).is_err());
    assert!(parse_listen_env(Some("42"), Some("-1"), None, 42).is_err());
    assert!(parse_listen_env(Some("42"), Some("2"), Some("only-one"), 42).is_err());
}

#[tokio::test]
async fn socket_activation_takes_precedence() {
    let dir = tempfile::tempdir().unwrap();
    let activated_path = dir.path().join("activated.sock");
    let unix = std::os::unix::net::UnixListener::bind(&activated_path).unwrap();
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let tcp_addr = tcp.local_addr().unwrap();
    let fds: Vec<OwnedFd> = vec![OwnedFd::from(tcp), OwnedFd::from(unix)];

    let mut cfg = ServeConfig::new(dir.path().join("configured.sock"), dir.path().join("run"));
    cfg.listen = Some("127.0.0.1:0".parse().unwrap());
    let (p, handle) = role_channel("default", ScheduleConfig::default(), Clock::new(), &[], &[]);
    let listeners = server::bind_with_activation(
        &cfg,
        std::slice::from_ref(&handle),
        Some(Activation::from_fds(fds)),
    )
    .await
    .unwrap();
    assert_eq!(listeners.tcp_addr(), Some(tcp_addr));
    assert!(!cfg.socket.exists(), "the configured socket is not created");
    let token = std::fs::read_to_string(dir.path().join("run/default.token")).unwrap();

    let state = ServerState::new(vec![handle], Arc::new(Metrics::new(&["default"])), &cfg);
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server::serve(listeners, state, async move {
        let _ = stop_rx.await;
    }));
    publish(&p, "ASIAACTIVATED", Duration::from_secs(3600));

    let mut u = UnixStream::connect(&activated_path).await.unwrap();
    let r = exchange(&mut u, &get("/v1/credentials", "")).await;
    assert_eq!(
        (r.status, r.json()["AccessKeyId"].as_str()),
        (200, Some("ASIAACTIVATED"))
    );
    let mut t = TcpStream::connect(tcp_addr).await.unwrap();
    let r = exchange(
        &mut t,
        &get("/v1/credentials", &format!("Authorization: {token}\r\n")),
    )
    .await;
    assert_eq!(r.status, 200);

    let _ = stop.send(());
    task.await.unwrap();
    // systemd owns the activated socket file: it stays.
    assert!(activated_path.exists());
}

#[tokio::test]
async fn activation_refuses_wrong_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ServeConfig::new(dir.path().join("a.sock"), dir.path().join("run"));
    let (_p, handle) = role_channel("default", ScheduleConfig::default(), Clock::new(), &[], &[]);
    let roles = std::slice::from_ref(&handle);

    let public = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let err =
        server::bind_with_activation(&cfg, roles, Some(Activation::from_fds(vec![public.into()])))
            .await
            .unwrap_err();
    assert!(matches!(err, ServeError::NotLoopback(_)), "{err}");

    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let err =
        server::bind_with_activation(&cfg, roles, Some(Activation::from_fds(vec![udp.into()])))
            .await
            .unwrap_err();
    assert!(matches!(err, ServeError::Activation(_)), "{err}");

    let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let err = server::bind_with_activation(
        &cfg,
        roles,
        Some(Activation::from_fds(vec![a.into(), b.into()])),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ServeError::Activation(_)), "{err}");
}

#[tokio::test]
async fn reload_keeps_tokens_of_kept_roles_and_writes_new_ones() {
    let mut h = start(&[RoleSpec::new("default"), RoleSpec::new("gone")]).await;
    let run = h.dir.path().join("run");
    let old_default = h.token("default").to_owned();
    let (p_new, new_handle) =
        role_channel("added", ScheduleConfig::default(), Clock::new(), &[], &[]);
    h.state.set_roles(vec![h.handles[0].clone(), new_handle]);
    assert_eq!(
        std::fs::read_to_string(run.join("default.token")).unwrap(),
        old_default
    );
    assert!(!run.join("gone.token").exists());
    assert!(!run.join("tokens/gone/token").exists());
    assert!(run.join("tokens/gone").is_dir(), "kept for bind mounts");
    let added = std::fs::read_to_string(run.join("added.token")).unwrap();
    assert_eq!(mode_of(&run.join("added.token")), 0o640);
    assert_eq!(
        std::fs::read_to_string(run.join("tokens/added/token")).unwrap(),
        added
    );

    h.publish(0, "ASIADEFAULT", Duration::from_secs(3600));
    let r = h
        .tcp_request(&get(
            "/v1/credentials",
            &format!("Authorization: {old_default}\r\n"),
        ))
        .await;
    assert_eq!(r.status, 200);
    let r = h
        .tcp_request(&get(
            "/v1/credentials/added",
            &format!("Authorization: {added}\r\n"),
        ))
        .await;
    assert_eq!(r.status, 503, "known role, authorized, no credentials yet");
    let r = h.tcp_request(&get("/v1/credentials/gone", "")).await;
    assert_eq!(r.status, 404);
    drop(p_new);
    h.stop();
    h.stopped().await;
}
