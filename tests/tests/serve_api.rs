//! SPEC §4.1 over real sockets: every status, the order of checks, bodies and headers, health,
//! metrics and the connection limits.

mod serve_common;

use std::time::Duration;

use iotcred_agent::state::Failure;
use iotcred_core::schedule::Mode;
use iotcred_core::{ErrorClass, UnixTime};
use serve_common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, UnixStream};

fn auth(token: &str) -> String {
    format!("Authorization: {token}\r\n")
}

/// Yields to the server's tasks until `cond` holds (no sleeping, no timing).
async fn until(mut cond: impl FnMut() -> bool) {
    while !cond() {
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn tcp_token_required_and_checked() {
    let h = start(&[RoleSpec::new("default")]).await;
    h.publish(0, "ASIAKEY1", Duration::from_secs(3600));

    let r = h.tcp_request(&get("/v1/credentials", "")).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.code(), "Unauthorized");
    assert_eq!(r.header("content-type"), Some("application/json"));

    let r = h.tcp_request(&get("/v1/credentials", &auth("wrong"))).await;
    assert_eq!(r.status, 401);
    // A prefix of the right token is still wrong.
    let prefix = &h.token("default")[..10];
    let r = h.tcp_request(&get("/v1/credentials", &auth(prefix))).await;
    assert_eq!(r.status, 401);
    assert!(!r.body.contains(h.token("default")));

    let r = h
        .tcp_request(&get("/v1/credentials", &auth(h.token("default"))))
        .await;
    assert_eq!(r.status, 200);
    h.shutdown().await;
}

#[tokio::test]
async fn two_roles_side_by_side_and_tokens_do_not_cross() {
    let h = start(&[RoleSpec::new("default"), RoleSpec::new("telemetry")]).await;
    h.publish(0, "ASIADEFAULT", Duration::from_secs(3600));
    h.publish(1, "ASIATELEMETRY", Duration::from_secs(3600));
    assert_ne!(h.token("default"), h.token("telemetry"));

    let r = h
        .tcp_request(&get("/v1/credentials/telemetry", &auth(h.token("default"))))
        .await;
    assert_eq!(r.status, 401);
    let r = h
        .tcp_request(&get("/v1/credentials", &auth(h.token("telemetry"))))
        .await;
    assert_eq!(
        r.status, 401,
        "the default route needs the default role's token"
    );

    let r = h
        .tcp_request(&get(
            "/v1/credentials/telemetry",
            &auth(h.token("telemetry")),
        ))
        .await;
    assert_eq!(
        (r.status, r.json()["AccessKeyId"].as_str()),
        (200, Some("ASIATELEMETRY"))
    );
    let r = h
        .tcp_request(&get("/v1/credentials/default", &auth(h.token("default"))))
        .await;
    assert_eq!(
        (r.status, r.json()["AccessKeyId"].as_str()),
        (200, Some("ASIADEFAULT"))
    );
    let r = h.unix_request(&get("/v1/credentials/telemetry", "")).await;
    assert_eq!(
        (r.status, r.json()["AccessKeyId"].as_str()),
        (200, Some("ASIATELEMETRY"))
    );
    let r = h.unix_request(&get("/v1/credentials", "")).await;
    assert_eq!(
        (r.status, r.json()["AccessKeyId"].as_str()),
        (200, Some("ASIADEFAULT"))
    );
    h.shutdown().await;
}

#[tokio::test]
async fn unix_peer_credentials_decide() {
    let other_uid = my_uid().wrapping_add(4242);
    let other_gid = my_gid().wrapping_add(4242);
    let mut by_uid = RoleSpec::new("by-uid");
    by_uid.allow_uids = vec![my_uid()];
    let mut by_gid = RoleSpec::new("by-gid");
    by_gid.allow_uids = vec![other_uid];
    by_gid.allow_gids = vec![my_gid()];
    let mut denied = RoleSpec::new("denied");
    denied.allow_uids = vec![other_uid];
    denied.allow_gids = vec![other_gid];
    let open = RoleSpec::new("open");
    let h = start(&[by_uid, by_gid, denied, open]).await;
    for i in 0..4 {
        h.publish(i, "ASIAKEY", Duration::from_secs(3600));
    }
    for (role, want) in [
        ("by-uid", 200),
        ("by-gid", 200),
        ("denied", 403),
        ("open", 200),
    ] {
        let r = h
            .unix_request(&get(&format!("/v1/credentials/{role}"), ""))
            .await;
        assert_eq!(r.status, want, "{role}");
        if want == 403 {
            assert_eq!(r.code(), "Forbidden");
            assert!(!r.body.contains(SECRET));
        }
    }
    // The socket needs no token, and the TCP-only Host rule does not apply to it.
    let r = h
        .unix_request(
            "GET /v1/credentials/open HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
        )
        .await;
    assert_eq!(r.status, 200);
    h.shutdown().await;
}

#[tokio::test]
async fn not_found_method_and_bad_request_in_order() {
    let h = start(&[RoleSpec::new("default")]).await;
    h.publish(0, "ASIAKEY", Duration::from_secs(3600));
    let tok = auth(h.token("default"));

    // 404: unknown role (before the token check), unknown route, empty role.
    for path in [
        "/v1/credentials/nope",
        "/v1/nope",
        "/v1/credentials/",
        "/",
        "/v1/credentials/default/x",
    ] {
        let r = h.tcp_request(&get(path, "")).await;
        assert_eq!((r.status, r.code().as_str()), (404, "NotFound"), "{path}");
        let r = h.unix_request(&get(path, "")).await;
        assert_eq!(r.status, 404, "unix {path}");
    }

    // 405 for anything but GET, even on an unknown route (405 comes before 404).
    for (method, path) in [
        ("POST", "/v1/credentials"),
        ("PUT", "/v1/credentials/default"),
        ("DELETE", "/v1/health"),
        ("HEAD", "/v1/credentials"),
        ("POST", "/v1/nope"),
    ] {
        let raw = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{tok}Content-Length: 2\r\nConnection: close\r\n\r\n{{}}"
        );
        let mut s = TcpStream::connect(h.tcp.unwrap()).await.unwrap();
        s.write_all(raw.as_bytes()).await.unwrap();
        let r = Reader::default()
            .read(&mut s, method == "HEAD")
            .await
            .unwrap();
        assert_eq!(r.status, 405, "{method} {path}");
        assert_eq!(r.header("allow"), Some("GET"));
        if method != "HEAD" {
            assert_eq!(r.code(), "MethodNotAllowed");
        }
    }

    // 400 comes first: non-loopback Host or X-Forwarded-For, whatever the method or route.
    for raw in [
        format!(
            "GET /v1/credentials HTTP/1.1\r\nHost: evil.example\r\n{tok}Connection: close\r\n\r\n"
        ),
        format!(
            "GET /v1/credentials HTTP/1.1\r\nHost: evil.example:2773\r\n{tok}Connection: close\r\n\r\n"
        ),
        format!("GET /v1/credentials HTTP/1.1\r\nHost: 10.0.0.1\r\n{tok}Connection: close\r\n\r\n"),
        format!(
            "GET /v1/credentials HTTP/1.1\r\nHost: localhost\r\nX-Forwarded-For: 10.1.1.1\r\n{tok}Connection: close\r\n\r\n"
        ),
        format!(
            "GET http://evil.example/v1/credentials HTTP/1.1\r\nHost: localhost\r\n{tok}Connection: close\r\n\r\n"
        ),
        format!("GET /v1/health HTTP/1.1\r\n{tok}Connection: close\r\n\r\n"),
        "POST /v1/nope HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n".to_owned(),
    ] {
        let r = h.tcp_request(&raw).await;
        assert_eq!((r.status, r.code().as_str()), (400, "BadRequest"), "{raw}");
    }

    // Loopback spellings are accepted; the query string is ignored.
    for host in [
        "localhost",
        "localhost:2773",
        "127.0.0.1",
        "127.0.0.1:1",
        "[::1]:2773",
        "[::1]",
    ] {
        let raw = format!(
            "GET /v1/credentials?x=1 HTTP/1.1\r\nHost: {host}\r\n{tok}Connection: close\r\n\r\n"
        );
        let r = h.tcp_request(&raw).await;
        assert_eq!(r.status, 200, "{host}");
    }
    h.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn unavailable_before_first_credentials_with_retry_after() {
    let h = start(&[RoleSpec::new("default")]).await;
    let r = h
        .tcp_request(&get("/v1/credentials", &auth(h.token("default"))))
        .await;
    assert_eq!((r.status, r.code().as_str()), (503, "Unavailable"));
    let retry: u64 = r
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .expect("seconds");
    assert!(retry >= 1);
    // 401 is decided before 503.
    let r = h.tcp_request(&get("/v1/credentials", "")).await;
    assert_eq!(r.status, 401);
    let r = h.unix_request(&get("/v1/credentials", "")).await;
    assert_eq!(r.status, 503);
    assert!(r.header("retry-after").is_some());

    // Credentials with less than 60 s left are never served: refused on arrival ...
    assert!(issue(&h.publishers[0], "ASIASHORT", Duration::from_secs(59)).is_err());
    let r = h.unix_request(&get("/v1/credentials", "")).await;
    assert_eq!(r.status, 503);
    // ... and no longer served once they get there.
    h.publish(0, "ASIAKEY", Duration::from_secs(120));
    let r = h.unix_request(&get("/v1/credentials", "")).await;
    assert_eq!(r.status, 200);
    tokio::time::advance(Duration::from_secs(61)).await;
    let r = h.unix_request(&get("/v1/credentials", "")).await;
    assert_eq!(r.status, 503);
    assert!(r.header("retry-after").is_some());
    h.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_request_waits_for_the_fetch_then_gives_up_with_503() {
    let mut od = RoleSpec::new("default");
    od.mode = Mode::OnDemand;
    let h = start_with(&[od], |c| c.request_wait = Duration::from_secs(10)).await;

    // On demand: the request wakes the refresher and gets the credentials it publishes.
    let mut s = UnixStream::connect(&h.socket).await.unwrap();
    s.write_all(get("/v1/credentials", "").as_bytes())
        .await
        .unwrap();
    h.publishers[0].next_signal().await;
    h.publish(0, "ASIAFRESH", Duration::from_secs(3600));
    let r = read_reply(&mut s).await.unwrap();
    assert_eq!(
        (r.status, r.json()["AccessKeyId"].as_str()),
        (200, Some("ASIAFRESH"))
    );

    // Nothing arrives within request_wait (virtual time): 503 with Retry-After.
    let mut od2 = RoleSpec::new("other");
    od2.mode = Mode::OnDemand;
    let h2 = start_with(&[od2], |c| c.request_wait = Duration::from_secs(10)).await;
    let before = tokio::time::Instant::now();
    let r = h2.unix_request(&get("/v1/credentials", "")).await;
    assert_eq!(r.status, 503);
    assert!(r.header("retry-after").is_some());
    assert!(tokio::time::Instant::now() - before >= Duration::from_secs(10));
    h.shutdown().await;
    h2.shutdown().await;
}

#[tokio::test]
async fn credentials_body_and_headers_are_exact() {
    let h = start(&[RoleSpec::new("default")]).await;
    let lifetime = Duration::from_secs(3600);
    h.publish(0, "ASIAEXACTKEY", lifetime);
    let wall_before = UnixTime::now();
    let started = std::time::Instant::now();
    let r = h
        .tcp_request(&get("/v1/credentials", &auth(h.token("default"))))
        .await;
    let elapsed = started.elapsed().as_secs() + 1;
    let wall_after = UnixTime::now();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert_eq!(
        r.header("content-length"),
        Some(r.body.len().to_string().as_str())
    );

    let v = r.json();
    let obj = v.as_object().unwrap();
    let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    assert_eq!(keys.len(), 4);
    for k in ["AccessKeyId", "SecretAccessKey", "Token", "Expiration"] {
        assert!(obj.contains_key(k), "{k}");
    }
    let exp = v["Expiration"].as_str().unwrap();
    let expected_body = format!(
        r#"{{"AccessKeyId":"ASIAEXACTKEY","SecretAccessKey":"{}","Token":"{}","Expiration":"{exp}"}}"#,
        SECRET, SESSION
    );
    assert_eq!(r.body, expected_body);

    // `YYYY-MM-DDTHH:MM:SSZ`, and skew-corrected: the device's clock plus the remaining
    // lifetime, not the provider's `expiration` (2033).
    assert_eq!(exp.len(), 20, "{exp}");
    assert!(exp.ends_with('Z') && !exp.contains('.'), "{exp}");
    let t = UnixTime::parse_rfc3339(exp).unwrap();
    let lo = wall_before.saturating_add(lifetime).as_secs() - elapsed as i64;
    let hi = wall_after.saturating_add(lifetime).as_secs();
    assert!((lo..=hi).contains(&t.as_secs()), "{exp}");
    h.shutdown().await;
}

#[tokio::test]
async fn health_reports_every_role_without_secrets() {
    let mut lazy = RoleSpec::new("lazy");
    lazy.mode = Mode::OnDemand;
    let h = start(&[RoleSpec::new("default"), RoleSpec::new("second"), lazy]).await;
    h.publish(0, "ASIAHEALTHKEY", Duration::from_secs(3600));

    // `second` has nothing yet: 503.
    let mut bodies = Vec::new();
    let r = h.tcp_request(&get("/v1/health", "")).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = r.json();
    assert_eq!(v["status"], "unhealthy");
    let roles = v["roles"].as_array().unwrap();
    assert_eq!(roles.len(), 3);
    bodies.push(r.body.clone());
    assert_eq!(roles[0]["name"], "default");
    assert_eq!(roles[0]["state"], "healthy");
    assert!(roles[0]["expiration"].as_str().unwrap().ends_with('Z'));
    assert!(roles[0]["last_refresh"].as_str().unwrap().ends_with('Z'));
    assert_eq!(roles[1]["state"], "unavailable");
    assert!(roles[1]["expiration"].is_null());
    // An on-demand role never asked for counts as healthy.
    assert_eq!(roles[2]["healthy"], true);

    h.publish(1, "ASIAHEALTHKEY2", Duration::from_secs(3600));
    for _ in 0..2 {
        h.publishers[1].handle_failure(
            Failure {
                class: ErrorClass::Permanent,
                retry_after: None,
                message: "provider answered 403: check role_alias".into(),
            },
            0,
        );
    }
    let r = h.unix_request(&get("/v1/health", "")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    bodies.push(r.body.clone());
    assert_eq!(v["status"], "healthy");
    assert_eq!(v["roles"][1]["failures"], 2);
    assert_eq!(
        v["roles"][1]["last_error"],
        "provider answered 403: check role_alias"
    );

    // Inside the refresh window: servable but not healthy.
    h.publishers[0].handle_stale();
    let r = h.unix_request(&get("/v1/health", "")).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["roles"][0]["state"], "refreshing");

    bodies.push(r.body);
    for body in &bodies {
        assert!(!body.contains(SECRET) && !body.contains(SESSION));
        assert!(!body.contains(h.token("default")) && !body.contains("ASIAHEALTHKEY"));
    }
    h.shutdown().await;
}

#[tokio::test]
async fn metrics_are_prometheus_text_without_secrets() {
    let h = start(&[RoleSpec::new("default")]).await;
    h.publish(0, "ASIAMETRICS", Duration::from_secs(3600));
    h.metrics.refresh_result(
        0,
        iotcred_agent::metrics::RefreshOutcome::Success,
        Duration::from_millis(120),
    );
    let _ = h.unix_request(&get("/v1/credentials", "")).await;
    let _ = h.tcp_request(&get("/v1/credentials", "")).await;
    let r = h.tcp_request(&get("/v1/metrics", "")).await;
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    assert!(!r.body.contains(SECRET) && !r.body.contains(SESSION));
    assert!(!r.body.contains(h.token("default")) && !r.body.contains("ASIAMETRICS"));

    let mut samples = std::collections::HashMap::new();
    for line in r.body.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix('#') {
            let mut w = rest.split_whitespace();
            let kind = w.next().unwrap();
            assert!(kind == "HELP" || kind == "TYPE", "{line}");
            if kind == "TYPE" {
                w.next().unwrap();
                let t = w.next().unwrap();
                assert!(["gauge", "counter", "histogram"].contains(&t), "{line}");
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("name value");
        value
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("value of {line}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
                && !name.as_bytes()[0].is_ascii_digit(),
            "{line}"
        );
        if name_end < series.len() {
            let labels = &series[name_end..];
            assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
            for pair in labels[1..labels.len() - 1].split("\",") {
                let (k, v) = pair.split_once('=').expect("label=value");
                assert!(
                    k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
                    "{line}"
                );
                assert!(v.starts_with('"'), "{line}");
            }
        }
        samples.insert(series.to_owned(), value.to_owned());
    }
    for series in [
        "iotcred_credentials_expiry_timestamp_seconds{role=\"default\"}",
        "iotcred_credentials_remaining_seconds{role=\"default\"}",
        "iotcred_role_healthy{role=\"default\"}",
        "iotcred_refresh_total{role=\"default\",outcome=\"success\"}",
        "iotcred_upstream_latency_seconds_count{role=\"default\"}",
        "iotcred_http_requests_total{route=\"credentials\",status=\"200\"}",
        "iotcred_http_requests_total{route=\"credentials\",status=\"401\"}",
        "iotcred_connections_open",
        "iotcred_connections_total",
    ] {
        assert!(
            samples.contains_key(series),
            "missing {series} in\n{}",
            r.body
        );
    }
    assert_eq!(samples["iotcred_role_healthy{role=\"default\"}"], "1");
    assert_eq!(
        samples["iotcred_refresh_total{role=\"default\",outcome=\"success\"}"],
        "1"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn keep_alive_and_pipelining() {
    let h = start(&[RoleSpec::new("default")]).await;
    h.publish(0, "ASIAPIPE", Duration::from_secs(3600));
    let tok = auth(h.token("default"));
    let mut s = TcpStream::connect(h.tcp.unwrap()).await.unwrap();
    let one = format!("GET /v1/credentials HTTP/1.1\r\nHost: localhost\r\n{tok}\r\n");
    s.write_all(format!("{one}{one}GET /v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut reader = Reader::default();
    for want in ["ASIAPIPE", "ASIAPIPE", "healthy"] {
        let r = reader.read(&mut s, false).await.unwrap();
        assert_eq!(r.status, 200);
        assert!(r.body.contains(want));
    }
    // Still open for another request.
    let r = exchange(&mut s, &one).await;
    assert_eq!(r.status, 200);
    h.shutdown().await;
}

#[tokio::test]
async fn oversized_headers_are_rejected_and_others_still_served() {
    let h = start(&[RoleSpec::new("default")]).await;
    h.publish(0, "ASIABIG", Duration::from_secs(3600));
    let big = format!("X-Padding: {}\r\n", "a".repeat(16 * 1024));
    let mut s = TcpStream::connect(h.tcp.unwrap()).await.unwrap();
    let _ = s.write_all(get("/v1/health", &big).as_bytes()).await;
    // Either a 431 or a close without an answer.
    if let Some(r) = read_reply(&mut s).await {
        assert_eq!(r.status, 431);
    }
    let mut u = UnixStream::connect(&h.socket).await.unwrap();
    let _ = u.write_all(get("/v1/credentials", &big).as_bytes()).await;
    if let Some(r) = read_reply(&mut u).await {
        assert_eq!(r.status, 431);
    }
    let r = h.unix_request(&get("/v1/credentials", "")).await;
    assert_eq!(r.status, 200);
    h.shutdown().await;
}

#[tokio::test]
async fn connection_limit_evicts_idle_connections_first() {
    let h = start_with(&[RoleSpec::new("default"), RoleSpec::new("later")], |c| {
        c.max_connections = 2;
        c.request_wait = Duration::from_secs(600);
    })
    .await;
    h.publish(0, "ASIALIMIT", Duration::from_secs(3600));
    let keep = "GET /v1/credentials HTTP/1.1\r\nHost: localhost\r\n\r\n";

    // Two idle keep-alive connections hold both slots (each answered, so each was accepted).
    let mut a = UnixStream::connect(&h.socket).await.unwrap();
    assert_eq!(exchange(&mut a, keep).await.status, 200);
    let mut b = UnixStream::connect(&h.socket).await.unwrap();
    assert_eq!(exchange(&mut b, keep).await.status, 200);
    assert_eq!(h.metrics.connections_open(), 2);

    // A new client is served: the oldest idle connection (a) makes room for it.
    let mut c = UnixStream::connect(&h.socket).await.unwrap();
    assert_eq!(exchange(&mut c, keep).await.status, 200);
    assert!(
        closed_without_reply(&mut a).await,
        "the oldest idle connection was closed"
    );
    assert_eq!(exchange(&mut b, keep).await.status, 200);
    assert_eq!(h.metrics.connections_rejected(), 0);

    // When every connection has a request in progress, a new one is refused at once.
    let wait = "GET /v1/credentials/later HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let watching = h.publishers[1].receivers();
    b.write_all(wait.as_bytes()).await.unwrap();
    c.write_all(wait.as_bytes()).await.unwrap();
    // Both requests are under way once each waits on the role's channel.
    until(|| h.publishers[1].receivers() == watching + 2).await;
    let mut d = UnixStream::connect(&h.socket).await.unwrap();
    let _ = d.write_all(keep.as_bytes()).await;
    assert!(closed_without_reply(&mut d).await);
    assert_eq!(h.metrics.connections_rejected(), 1);

    // The waiting requests are answered once the role has credentials.
    h.publish(1, "ASIALATER", Duration::from_secs(3600));
    let rb = read_reply(&mut b).await.expect("b answered");
    let rc = read_reply(&mut c).await.expect("c answered");
    assert_eq!((rb.status, rc.status), (200, 200));
    h.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn slow_header_and_idle_connections_time_out() {
    let h = start_with(&[RoleSpec::new("default")], |c| {
        c.header_read_timeout = Duration::from_secs(5)
    })
    .await;
    h.publish(0, "ASIASLOW", Duration::from_secs(3600));
    // A client that never finishes its head is dropped after the timeout (virtual time)...
    let mut slow = UnixStream::connect(&h.socket).await.unwrap();
    slow.write_all(b"GET /v1/credentials HTTP/1.1\r\nHost: loc")
        .await
        .unwrap();
    // ...while another client is served meanwhile.
    let r = h.unix_request(&get("/v1/credentials", "")).await;
    assert_eq!(r.status, 200);
    let before = tokio::time::Instant::now();
    let mut rest = Vec::new();
    let _ = tokio::io::AsyncReadExt::read_to_end(&mut slow, &mut rest).await;
    assert!(rest.is_empty() || rest.starts_with(b"HTTP/1.1 408"));
    assert!(tokio::time::Instant::now() - before <= Duration::from_secs(5));

    // An idle keep-alive connection is closed too.
    let mut idle = UnixStream::connect(&h.socket).await.unwrap();
    let r = exchange(
        &mut idle,
        "GET /v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(closed_without_reply(&mut idle).await);
    h.shutdown().await;
}

#[tokio::test]
async fn shutdown_lets_requests_under_way_finish() {
    let mut od = RoleSpec::new("default");
    od.mode = Mode::OnDemand;
    let mut h = start_with(&[od], |c| c.request_wait = Duration::from_secs(30)).await;
    let mut s = UnixStream::connect(&h.socket).await.unwrap();
    s.write_all(get("/v1/credentials", "").as_bytes())
        .await
        .unwrap();
    h.publishers[0].next_signal().await;

    // Stop while the request waits for the fetch; the fetch then completes.
    h.stop();
    tokio::task::yield_now().await;
    h.publish(0, "ASIADRAIN", Duration::from_secs(3600));
    let r = read_reply(&mut s).await.unwrap();
    assert_eq!(
        (r.status, r.json()["AccessKeyId"].as_str()),
        (200, Some("ASIADRAIN"))
    );
    h.stopped().await;

    // Listeners are closed and the socket file is gone.
    assert!(!h.socket.exists());
    assert!(TcpStream::connect(h.tcp.unwrap()).await.is_err());
}
