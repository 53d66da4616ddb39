//! Reliability: the upstream fault matrix against the real `iotcred run` binary.
//!
//! Timeline used by the transient matrices (no sleeps as synchronisation: every wait polls the
//! agent's socket or the provider's counters):
//!
//! - the provider issues 100 s credentials; the agent runs with `refresh_before_seconds = 75`,
//!   `jitter_seconds = 0`, `max_backoff_seconds = 2`, `timeout_seconds = 2`, so the refresh
//!   window opens at `max(L/4, L − max(L/2, 75)) = 25 s` after issue and the credentials stay
//!   servable (≥ 60 s left) until 40 s after issue. (With `refresh_before_seconds = 0` the
//!   window would open at L/2, which for any L < 120 s is after the 60 s floor is crossed, so
//!   no failure could ever be observed *while* serving; for L ≥ 120 s a test would last over a
//!   minute.)
//! - the first fault is set right after `READY=1`, so every refresh from 25 s on fails; the
//!   faults of the table are switched in turn, each until the agent has counted two more
//!   failures (the second one surely under the new fault) and `/v1/health` names it;
//! - meanwhile every `/v1/credentials` answer is checked: 200 only with the last good
//!   credentials and ≥ 60 s left, otherwise 503 with `Retry-After`, and the 503 must come once
//!   40 s have passed;
//! - then the faults are cleared and the agent must recover (new credentials, health 200).

use std::path::Path;
use std::time::{Duration, Instant};

use iotcred_core::UnixTime;
use iotcred_tests::agent::{Agent, Env, poll};
use iotcred_tests::hostile::{self, Forwarder, Route};
use iotcred_tests::{BlockingProvider, Fault, ServerCert};

const READY: Duration = Duration::from_secs(30);

/// What one case does to the upstream.
#[derive(Clone, Debug)]
enum Apply {
    /// A persistent provider fault.
    Fault(Fault),
    /// Route the endpoint (through the forwarder) elsewhere.
    Route(Route),
}

struct Case {
    apply: Apply,
    /// Substring `/v1/health`'s `last_error` (and the log line) must contain; `|` separates
    /// alternatives where the kernel decides which step sees the fault first.
    expect: &'static str,
}

fn case(apply: Apply, expect: &'static str) -> Case {
    Case { apply, expect }
}

impl Case {
    /// Whether `text` contains the expected substring (or one of its alternatives).
    fn matches(&self, text: &str) -> bool {
        self.expect.split('|').any(|e| text.contains(e))
    }
}

fn slow_headers() -> Fault {
    Fault::SlowHeaders {
        delay: Duration::from_secs(4),
    }
}

fn slow_body() -> Fault {
    Fault::SlowBody {
        delay: Duration::from_secs(4),
    }
}

/// Checks one `/v1/credentials` answer against the invariants; returns whether it was a 200.
fn check_credentials_answer(socket: &Path, good_key: &str) -> Option<bool> {
    let r = hostile::unix_get(socket, "/v1/credentials").ok()?;
    match r.status {
        200 => {
            let v = r.json();
            for k in ["AccessKeyId", "SecretAccessKey", "Token", "Expiration"] {
                let s = v[k].as_str().unwrap_or("");
                assert!(!s.is_empty(), "200 without {k}: {}", r.body);
            }
            assert_eq!(v["AccessKeyId"], good_key, "served something else");
            let exp = UnixTime::parse_rfc3339(v["Expiration"].as_str().unwrap())
                .unwrap()
                .as_secs();
            let left = exp - UnixTime::now().as_secs();
            // Whole seconds on both sides: ≥ 60 s left, rounded down once.
            assert!(left >= 59, "served credentials with only {left} s left");
            Some(true)
        }
        503 => {
            assert!(r.header("retry-after").is_some(), "503 without Retry-After");
            assert_eq!(r.json()["code"], "Unavailable", "{}", r.body);
            Some(false)
        }
        other => panic!("unexpected status {other}: {}", r.body),
    }
}

/// Reads the sd_notify messages queued so far. The agent sends them with a blocking send and
/// the kernel queues only `net.unix.max_dgram_qlen` (often 10) unread datagrams, so a test that
/// stops reading would stall the agent's main loop (systemd always reads).
fn drain(agent: &mut Agent) {
    agent.wait_notify(Duration::from_millis(1), |_| false);
}

fn failures(socket: &Path) -> u64 {
    hostile::health(socket)
        .map(|(_, v)| v["roles"][0]["failures"].as_u64().unwrap_or(0))
        .unwrap_or(0)
}

fn last_error(socket: &Path) -> String {
    hostile::health(socket)
        .map(|(_, v)| {
            v["roles"][0]["last_error"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default()
}

fn outcome(socket: &Path, o: &str) -> f64 {
    hostile::metric(
        socket,
        &format!("iotcred_refresh_total{{role=\"default\",outcome=\"{o}\"}}"),
    )
    .unwrap_or(-1.0)
}

/// Extra upstreams behind the forwarder: [good, untrusted server cert, expired server cert,
/// rejects the device certificate].
struct Upstreams {
    _bad: Vec<BlockingProvider>,
    forwarder: Forwarder,
}

const UNTRUSTED: Route = Route::Backend(1);
const EXPIRED: Route = Route::Backend(2);
const REJECTS_CLIENT: Route = Route::Backend(3);

fn upstreams(env: &Env) -> Upstreams {
    let untrusted =
        BlockingProvider::start(env.pki.provider_config_with(ServerCert::Untrusted)).unwrap();
    let expired =
        BlockingProvider::start(env.pki.provider_config_with(ServerCert::Expired)).unwrap();
    let mut cfg = env.pki.provider_config();
    cfg.client_ca = env.pki.untrusted_ca_cert.clone();
    let rejects = BlockingProvider::start(cfg).unwrap();
    let forwarder = Forwarder::start(vec![
        env.provider.addr(),
        untrusted.addr(),
        expired.addr(),
        rejects.addr(),
    ])
    .unwrap();
    Upstreams {
        _bad: vec![untrusted, expired, rejects],
        forwarder,
    }
}

fn start(env: &Env, endpoint: Option<&str>) -> Agent {
    let k = env.pki.device_ec.key.display().to_string();
    let cfg = env.config_with(
        &env.pki.device_ec.cert,
        &k,
        "[refresh]\nrefresh_before_seconds = 75\njitter_seconds = 0\nmax_backoff_seconds = 2\n",
        "",
    );
    let mut text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("timeout_seconds = 5", "timeout_seconds = 2");
    if let Some(e) = endpoint {
        text = text.replace(&env.endpoint(), e);
    }
    std::fs::write(&cfg, text).unwrap();
    let mut agent = env.start_agent(&cfg);
    assert!(agent.wait_ready(READY), "no READY=1:\n{}", agent.log());
    agent
}

/// Runs the table on one agent (see the module docs) and returns a one-line summary.
fn run_matrix(cases: Vec<Case>, forwarded: bool) -> String {
    let env = Env::with_provider(|c| c.ttl = Duration::from_secs(100));
    let ups = forwarded.then(|| upstreams(&env));
    let endpoint = ups.as_ref().map(|u| u.forwarder.endpoint());
    let mut agent = start(&env, endpoint.as_deref());
    let socket = env.socket();
    let issued_at = Instant::now();
    let first = env.provider.last_issued().unwrap();
    assert_eq!(
        check_credentials_answer(&socket, &first.access_key_id),
        Some(true)
    );
    assert_eq!(hostile::health(&socket).unwrap().0, 200);

    let apply = |a: &Apply| match a {
        Apply::Fault(f) => {
            if let Some(u) = &ups {
                u.forwarder.set_route(Route::Backend(0));
            }
            env.provider.clear_faults();
            env.provider.set_fault(f.clone());
        }
        Apply::Route(r) => {
            env.provider.clear_faults();
            ups.as_ref()
                .expect("route cases need the forwarder")
                .forwarder
                .set_route(*r);
        }
    };

    let mut served_while_failing = 0u32;
    let mut unavailable = 0u32;
    let mut first_failure: Option<Instant> = None;
    for c in &cases {
        apply(&c.apply);
        let base = failures(&socket);
        let reached = poll(Duration::from_secs(40), || {
            drain(&mut agent);
            match check_credentials_answer(&socket, &first.access_key_id) {
                Some(true) if failures(&socket) > 0 => served_while_failing += 1,
                Some(false) => unavailable += 1,
                _ => {}
            }
            let f = failures(&socket);
            if f > 0 && first_failure.is_none() {
                first_failure = Some(Instant::now());
            }
            (f >= base + 2).then_some(())
        });
        assert!(
            reached.is_some(),
            "{:?}: the agent did not retry (failures {} → {}):\n{}",
            c.apply,
            base,
            failures(&socket),
            agent.log()
        );
        let err = last_error(&socket);
        assert!(
            c.matches(&err),
            "{:?}: last_error {err:?} does not contain {:?}",
            c.apply,
            c.expect
        );
        assert!(!agent.exited(), "agent died under {:?}", c.apply);
    }

    // Still failing: once 40 s have passed since issue, the old credentials are no longer
    // servable and the answer must be 503 (never expired credentials, never an empty 200).
    let got_503 = poll(Duration::from_secs(45), || {
        drain(&mut agent);
        (check_credentials_answer(&socket, &first.access_key_id) == Some(false)).then_some(())
    });
    assert!(got_503.is_some(), "never answered 503");
    assert!(
        issued_at.elapsed() >= Duration::from_secs(39),
        "503 while the credentials still had a minute left"
    );
    let (code, h) = hostile::health(&socket).unwrap();
    assert_eq!(code, 503, "{h}");
    assert_eq!(h["roles"][0]["state"], "unavailable", "{h}");
    assert!(h["roles"][0]["failures"].as_u64().unwrap() >= 2, "{h}");

    // Backoff is bounded: at most one attempt per MIN_BACKOFF (1 s) since the first failure.
    let attempts = outcome(&socket, "transient_error") + outcome(&socket, "permanent_error");
    let window = first_failure.unwrap().elapsed().as_secs_f64();
    assert!(
        attempts <= window + 2.0,
        "{attempts} attempts in {window:.0} s: no backoff"
    );
    // Retry-After is honoured: no request before it.
    let reqs = env.provider.requests();
    for w in reqs.windows(2) {
        if let Some(Fault::Status {
            retry_after: Some(ra),
            ..
        }) = &w[0].fault
        {
            let ra: i64 = ra.parse().unwrap();
            let gap = w[1].received_unix - w[0].received_unix;
            assert!(
                gap >= ra - 1,
                "request {} came {gap} s after a Retry-After: {ra}",
                w[1].seq
            );
        }
    }

    // Recovery once the fault clears.
    env.provider.clear_faults();
    if let Some(u) = &ups {
        u.forwarder.set_route(Route::Backend(0));
    }
    let recovered = poll(Duration::from_secs(20), || {
        drain(&mut agent);
        let r = hostile::unix_get(&socket, "/v1/credentials").ok()?;
        (r.status == 200).then(|| r.json()["AccessKeyId"].as_str().unwrap().to_string())
    })
    .expect("no recovery after the fault cleared");
    assert_ne!(recovered, first.access_key_id);
    assert_eq!(env.provider.last_issued().unwrap().access_key_id, recovered);
    let (code, h) = hostile::health(&socket).unwrap();
    assert_eq!(code, 200, "{h}");
    assert_eq!(h["roles"][0]["failures"], 0, "{h}");
    assert!(h["roles"][0]["last_error"].is_null(), "{h}");
    assert_eq!(outcome(&socket, "success"), 2.0);
    // Every failed attempt, including one that was under way while the faults were cleared.
    let attempts = outcome(&socket, "transient_error") + outcome(&socket, "permanent_error");

    // Health and metrics carry no secret either: keep them for the secret search.
    for target in ["/v1/health", "/v1/metrics"] {
        env.keep_log(hostile::unix_get(&socket, target).unwrap().body);
    }
    let (code, log) = agent.stop(&env);
    assert_eq!(code, Some(0), "{log}");
    // Exactly one log line per failed attempt, each naming the failure.
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("refresh failed"))
        .collect();
    assert_eq!(
        lines.len() as f64,
        attempts,
        "log lines vs failed attempts:\n{log}"
    );
    for c in &cases {
        assert!(
            lines.iter().any(|l| c.matches(l)),
            "no log line for {:?}",
            c.apply
        );
    }
    // The role token is searched for too: `Agent::stop` remembered it.
    env.assert_no_secrets(&[]);
    format!(
        "{} faults, {attempts} failed attempts in {window:.0} s, served {served_while_failing}× while failing, {unavailable}× 503",
        cases.len()
    )
}

/// HTTP status faults, with and without Retry-After, and unusable credentials.
#[test]
fn transient_status_faults_keep_serving_then_503_then_recover() {
    let summary = run_matrix(
        vec![
            case(Apply::Fault(Fault::status(500)), "(500)"),
            case(Apply::Fault(Fault::status(503)), "(503)"),
            case(Apply::Fault(Fault::status(429)), "throttling (429)"),
            case(
                Apply::Fault(Fault::status_retry_after(429, 4)),
                "throttling (429)",
            ),
            case(Apply::Fault(Fault::status_retry_after(503, 3)), "(503)"),
            case(Apply::Fault(Fault::Expired), "unusable"),
            case(Apply::Fault(Fault::Ttl { seconds: 30 }), "less than 60 s"),
        ],
        false,
    );
    eprintln!("status matrix: {summary}");
}

/// Connection-level faults: refused, resets, closes, slow answers beyond `timeout_seconds`.
#[test]
fn transient_connection_faults_keep_serving_then_503_then_recover() {
    let summary = run_matrix(
        vec![
            // The provider accepts, then resets: the reset may reach the agent at connect or in
            // the TLS handshake, depending on scheduling.
            case(
                Apply::Fault(Fault::RefuseConnection),
                "cannot connect|Connection reset by peer",
            ),
            case(Apply::Fault(Fault::ResetMidHeaders), "failed"),
            case(Apply::Fault(Fault::ResetMidBody), "failed"),
            case(Apply::Fault(Fault::CloseBeforeResponse), "failed"),
            case(Apply::Fault(slow_headers()), "within 2 s"),
            case(Apply::Fault(slow_body()), "within 2 s"),
        ],
        false,
    );
    eprintln!("connection matrix: {summary}");
}

/// TLS failures (through a forwarder in front of misconfigured providers), a closed port, and
/// unusable bodies.
#[test]
fn tls_port_and_body_faults_keep_serving_then_503_then_recover() {
    let summary = run_matrix(
        vec![
            case(Apply::Route(UNTRUSTED), "not trusted"),
            case(Apply::Route(EXPIRED), "expired"),
            case(
                Apply::Route(REJECTS_CLIENT),
                "rejected the device certificate",
            ),
            case(Apply::Route(Route::Closed), "cannot connect"),
            case(Apply::Fault(Fault::MalformedJson), "unusable"),
            case(
                Apply::Fault(Fault::OversizedBody { bytes: None }),
                "unusable",
            ),
            case(
                Apply::Fault(Fault::MissingField {
                    field: "sessionToken".into(),
                }),
                "unusable",
            ),
            case(
                Apply::Fault(Fault::BadExpiration { value: None }),
                "unusable",
            ),
        ],
        true,
    );
    eprintln!("tls/body matrix: {summary}");
}

/// 400, 403, 404 from the start: one clear failure, 503 with a long Retry-After, no request
/// for a minute (permanent errors are retried slowly), recovery once the cloud side is fixed.
#[test]
fn permanent_errors_are_retried_slowly_and_recover() {
    let threads: Vec<_> = [(400, "(400)"), (403, "(403)"), (404, "not found (404)")]
        .into_iter()
        .map(|(status, expect)| {
            std::thread::spawn(move || {
                let env = Env::new();
                env.provider.set_fault(Fault::status(status));
                let k = env.pki.device_ec.key.display().to_string();
                let cfg = env.config_with(
                    &env.pki.device_ec.cert,
                    &k,
                    "[refresh]\nrefresh_before_seconds = 0\njitter_seconds = 0\nmax_backoff_seconds = 2\n",
                    "",
                );
                let mut agent = env.start_agent(&cfg);
                let socket = env.socket();
                let f = poll(READY, || (failures(&socket) >= 1).then_some(()));
                assert!(f.is_some(), "{status}: no failure reported:\n{}", agent.log());
                let err = last_error(&socket);
                assert!(err.contains(expect), "{status}: {err}");
                let r = hostile::unix_get(&socket, "/v1/credentials").unwrap();
                assert_eq!(r.status, 503, "{}", r.body);
                let ra: u64 = r.header("retry-after").unwrap().parse().unwrap();
                assert!(ra >= 30, "{status}: Retry-After {ra} for a permanent error");
                assert_eq!(outcome(&socket, "permanent_error"), 1.0);
                assert_eq!(hostile::health(&socket).unwrap().0, 503);
                // The cloud side is fixed; the agent finds out on its slow retry.
                env.provider.clear_faults();
                assert!(
                    agent.wait_ready(Duration::from_secs(90)),
                    "{status}: no recovery:\n{}",
                    agent.log()
                );
                let reqs = env.provider.requests();
                assert_eq!(reqs.len(), 2, "{status}: {reqs:#?}");
                let gap = reqs[1].received_unix - reqs[0].received_unix;
                assert!(gap >= 59, "{status}: permanent error retried after {gap} s");
                let (code, log) = agent.stop(&env);
                assert_eq!(code, Some(0));
                assert_eq!(log.matches("refresh failed").count(), 1, "{log}");
                env.assert_no_secrets(&[]);
                gap
            })
        })
        .collect();
    for t in threads {
        let gap = t.join().expect("permanent case");
        eprintln!("permanent error retried after {gap} s");
    }
}

/// Provider clock skewed ±2 h, with 900 s and 43 200 s credentials: the lifetime is
/// `expiration − Date`, and consumers get `Expiration = now + remaining` on the device clock.
#[test]
fn date_skew_and_long_ttls_keep_the_lifetime_right() {
    let threads: Vec<_> = [(7200i64, 900u64), (-7200, 43200), (0, 43200), (-7200, 900)]
        .into_iter()
        .map(|(skew, ttl)| {
            std::thread::spawn(move || {
                let env = Env::new();
                env.provider.set_fault(Fault::DateSkew { seconds: skew });
                let k = env.pki.device_ec.key.display().to_string();
                let cfg = env.config_with(
                    &env.pki.device_ec.cert,
                    &k,
                    "[refresh]\nrefresh_before_seconds = 0\njitter_seconds = 0\n",
                    &format!("[[role]]\nname = \"default\"\nrole_alias = \"GatewayRole\"\nduration_seconds = {ttl}\n"),
                );
                let mut agent = env.start_agent(&cfg);
                assert!(agent.wait_ready(READY), "{}", agent.log());
                let issued = env.provider.last_issued().unwrap();
                assert!((issued.server_time_unix - UnixTime::now().as_secs() - skew).abs() <= 2, "skew applied");
                let r = hostile::unix_get(&env.socket(), "/v1/credentials").unwrap();
                assert_eq!(r.status, 200);
                let exp = UnixTime::parse_rfc3339(r.json()["Expiration"].as_str().unwrap())
                    .unwrap()
                    .as_secs();
                let want = UnixTime::now().as_secs() + ttl as i64;
                assert!(
                    (want - exp).abs() <= 30,
                    "skew {skew}, ttl {ttl}: Expiration {exp}, expected ≈ {want}"
                );
                let (code, h) = hostile::health(&env.socket()).unwrap();
                assert_eq!(code, 200, "{h}");
                let left = h["roles"][0]["remaining_seconds"].as_u64().unwrap();
                assert!(left + 30 >= ttl && left <= ttl, "{h}");
                let next = h["roles"][0]["next_attempt_in_seconds"].as_u64().unwrap();
                assert!(next + 30 >= ttl / 2 && next <= ttl / 2, "refresh at L/2: {h}");
                let (code, _) = agent.stop(&env);
                assert_eq!(code, Some(0));
                env.assert_no_secrets(&[]);
            })
        })
        .collect();
    for t in threads {
        t.join().expect("skew case");
    }
}
