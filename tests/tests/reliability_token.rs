//! Reliability: the PKCS#11 token disappears while `iotcred run` is running, and comes back.
//!
//! Nothing can unplug a SoftHSM token, so the key is reached through `libiotcred_p11_unplug.so`
//! (`tests/p11-unplug`), a PKCS#11 module wrapping SoftHSM2 that behaves like a removable
//! token's module while a control file exists: the slot lists no token, the sessions are
//! closed (SoftHSM logs the user out with them) and every call answers `CKR_TOKEN_NOT_PRESENT`
//! or `CKR_DEVICE_REMOVED`. It logs each call it intercepts (never arguments).
//!
//! The provider closes every connection after its answer and never resumes a TLS session, so
//! each refresh is a full handshake in which the key signs. Timeline: the provider issues
//! 120 s credentials; with `refresh_before_seconds = 90` and no jitter the refresh window opens
//! at `max(L/4, L − max(L/2, 90)) = 30 s` after issue, and the credentials stay servable (≥ 60 s
//! left) until 60 s after issue. The token is unplugged right after `READY=1`; every refresh
//! from 30 s on must fail, clearly, with backoff (`max_backoff_seconds = 2`), while the agent
//! keeps serving the credentials it holds. Once two failures have been seen the token is
//! plugged back in and the agent must recover without a restart: one new session, one login,
//! new credentials, health back to 200. Every wait polls the agent or the provider.

use std::path::Path;
use std::time::{Duration, Instant};

use iotcred_core::UnixTime;
use iotcred_tests::agent::{Agent, Env, poll};
use iotcred_tests::hostile;
use iotcred_tests::p11unplug::Unplug;
use iotcred_tests::softhsm::SoftHsm;

const PIN: &str = "pin-8203-1177-secret";
const SO_PIN: &str = "so-pin-3319";
const READY: Duration = Duration::from_secs(30);
/// From READY to the second failed refresh: about 32 s, generously.
const FAILING: Duration = Duration::from_secs(90);

/// Reads the sd_notify messages queued so far (the agent must never block on a full queue).
fn drain(agent: &mut Agent) {
    agent.wait_notify(Duration::from_millis(1), |_| false);
}

fn role_health(socket: &Path) -> Option<(u16, serde_json::Value)> {
    let (code, v) = hostile::health(socket).ok()?;
    Some((code, v["roles"][0].clone()))
}

fn failures(socket: &Path) -> u64 {
    role_health(socket)
        .and_then(|(_, r)| r["failures"].as_u64())
        .unwrap_or(0)
}

fn outcome(socket: &Path, o: &str) -> f64 {
    hostile::metric(
        socket,
        &format!("iotcred_refresh_total{{role=\"default\",outcome=\"{o}\"}}"),
    )
    .unwrap_or(-1.0)
}

/// The access key id served by `/v1/credentials`, or `None` for a 503 (anything else fails).
fn served_key(socket: &Path) -> Option<String> {
    let r = hostile::unix_get(socket, "/v1/credentials").expect("GET /v1/credentials");
    match r.status {
        200 => Some(r.json()["AccessKeyId"].as_str().unwrap_or("").to_owned()),
        503 => None,
        other => panic!("unexpected status {other}: {}", r.body),
    }
}

#[test]
fn token_unplugged_while_running_fails_clearly_then_recovers() {
    let mut env = Env::with_provider(|c| {
        c.ttl = Duration::from_secs(120);
        c.keep_alive = false;
        c.resumption = false;
    });
    let hsm =
        SoftHsm::with_device_key(&env.pki.device_ec.key, PIN, SO_PIN).expect("SoftHSM fixture");
    env.env("SOFTHSM2_CONF", &hsm.conf_path().display().to_string());
    let token = Unplug::new(hsm.dir()).expect("unplug module");
    for (k, v) in token.env() {
        env.env(&k, &v);
    }
    let pin_file = hsm.write_pin_file("pin", PIN).unwrap();
    let uri = format!(
        "pkcs11:token=iotcred;object=device?module-path={}&pin-source=file:{}",
        token.module().display(),
        pin_file.display()
    );
    let cfg = env.config_with(
        &env.pki.device_ec.cert,
        &uri,
        "[refresh]\nrefresh_before_seconds = 90\njitter_seconds = 0\nmax_backoff_seconds = 2\n",
        "",
    );
    let mut agent = env.start_agent(&cfg);
    assert!(agent.wait_ready(READY), "no READY=1:\n{}", agent.log());
    let issued_at = Instant::now();
    let socket = env.socket();
    let first = env.provider.last_issued().expect("first credentials");
    assert_eq!(served_key(&socket).as_deref(), Some(&*first.access_key_id));
    assert_eq!(hostile::health(&socket).unwrap().0, 200);
    assert_eq!(count(&token, "C_Login", false), 1, "{:?}", token.calls());
    let connections_before = env.provider.stats().connections;

    // Unplug. Nothing happens until the refresh window opens (the agent does not poll the
    // token); then every refresh fails when the handshake needs the key's signature, and the
    // agent keeps serving what it holds.
    token.unplug();
    let mut served_while_failing = 0u32;
    let reached = poll(FAILING, || {
        drain(&mut agent);
        let f = failures(&socket);
        match served_key(&socket) {
            Some(k) => {
                assert_eq!(k, first.access_key_id, "served something else");
                if f > 0 {
                    served_while_failing += 1;
                }
            }
            // Only once the first credentials have less than 60 s left.
            None => assert!(
                issued_at.elapsed() >= Duration::from_secs(59),
                "503 while the credentials were servable:\n{}",
                agent.log()
            ),
        }
        (f >= 2).then_some(())
    });
    assert!(
        reached.is_some(),
        "no failed refresh while unplugged:\n{}",
        agent.log()
    );
    assert!(!agent.exited(), "the agent died:\n{}", agent.log());
    assert!(served_while_failing > 0, "{}", agent.log());
    let (code, role) = role_health(&socket).unwrap();
    assert_eq!(code, 503, "refreshing, not healthy: {role}");
    let last_error = role["last_error"].as_str().unwrap_or("").to_owned();
    assert!(
        last_error.contains("the device key cannot sign")
            && last_error.contains("PKCS#11 token \"iotcred\" is not present (removed"),
        "unclear last_error: {last_error:?}"
    );
    // While the token is away the agent never opens a session or presents the PIN.
    assert_eq!(count(&token, "C_Login", true), 0, "{:?}", token.calls());
    assert_eq!(
        count(&token, "C_OpenSession", true),
        0,
        "{:?}",
        token.calls()
    );
    assert!(
        count(&token, "C_CloseAllSessions", true) >= 1,
        "the unplug did not close the sessions: {:?}",
        token.calls()
    );

    // Plug it back in: the next retry finds the token, opens one session, logs in once and
    // signs; no restart.
    token.replug();
    let recovered = poll(Duration::from_secs(30), || {
        drain(&mut agent);
        served_key(&socket).filter(|k| *k != first.access_key_id)
    })
    .unwrap_or_else(|| panic!("no recovery after the replug:\n{}", agent.log()));
    assert_eq!(env.provider.last_issued().unwrap().access_key_id, recovered);
    let (code, role) = role_health(&socket).unwrap();
    assert_eq!(code, 200, "{role}");
    assert_eq!(role["state"], "healthy", "{role}");
    assert_eq!(role["failures"], 0, "{role}");
    assert!(role["last_error"].is_null(), "{role}");
    assert_eq!(outcome(&socket, "success"), 2.0);
    let failed = outcome(&socket, "transient_error") + outcome(&socket, "permanent_error");
    assert_eq!(
        outcome(&socket, "permanent_error"),
        0.0,
        "a removed token is transient"
    );
    assert!(failed >= 2.0);
    let calls = token.calls();
    assert_eq!(count(&token, "C_OpenSession", false), 2, "{calls:?}");
    assert_eq!(count(&token, "C_Login", false), 2, "{calls:?}");
    // No tight loop: each failed refresh made one connection (one handshake) and a few token
    // calls (the first one's failed signature; each one's look for the token, which is
    // C_GetSlotList twice: the count, then the list).
    assert_eq!(
        env.provider.stats().connections - connections_before,
        failed as u64 + 1
    );
    let unplugged_calls = calls
        .iter()
        .filter(|c| c.unplugged && c.function != "C_CloseAllSessions")
        .count();
    assert!(
        unplugged_calls as f64 <= 3.0 * failed,
        "{unplugged_calls} token calls for {failed} failed refreshes: {calls:?}"
    );

    for target in ["/v1/health", "/v1/metrics"] {
        env.keep_log(hostile::unix_get(&socket, target).unwrap().body);
    }
    let (code, log) = agent.stop(&env);
    assert_eq!(code, Some(0), "{log}");
    // One line per failure, naming the token, and nothing else above INFO.
    let loud: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    assert_eq!(loud.len() as f64, failed, "one line per failure:\n{log}");
    for l in &loud {
        assert!(
            l.contains("refresh failed") && l.contains("\"iotcred\" is not present"),
            "{l}"
        );
    }
    // Backoff: the failures are at least MIN_BACKOFF (1 s) apart, by the agent's own clock
    // (900 ms: the schedule counts whole milliseconds).
    let times: Vec<f64> = loud.iter().filter_map(|l| log_time(l)).collect();
    assert_eq!(times.len(), loud.len(), "{log}");
    for w in times.windows(2) {
        assert!(
            w[1] - w[0] >= 0.9,
            "retried after {:.3} s:\n{log}",
            w[1] - w[0]
        );
    }
    // The role token is searched for too: `Agent::stop` remembered it.
    env.assert_no_secrets(&[PIN]);
}

/// How many times `function` was called with the token plugged (`false`) or unplugged.
fn count(token: &Unplug, function: &str, unplugged: bool) -> usize {
    token
        .calls()
        .iter()
        .filter(|c| c.function == function && c.unplugged == unplugged)
        .count()
}

/// The timestamp of an agent log line (`2026-01-02T03:04:05.123456Z  WARN …`), in Unix
/// seconds with the fraction.
fn log_time(line: &str) -> Option<f64> {
    let stamp = line.split_whitespace().next()?;
    let whole = UnixTime::parse_rfc3339(stamp).ok()?.as_secs() as f64;
    let fraction = match stamp.split_once('.') {
        Some((_, f)) => format!("0.{}", f.trim_end_matches('Z')).parse().ok()?,
        None => 0.0,
    };
    Some(whole + fraction)
}
