//! End-to-end: `iotcred run` (real binary) against the fake provider: readiness, file sinks,
//! scheduled refresh, upstream failure, `get`, SIGHUP, SIGTERM, secret hygiene.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use iotcred_tests::Fault;
use iotcred_tests::agent::{Env, poll};
use iotcred_tests::hostile;

const LIMIT: Duration = Duration::from_secs(30);

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn sinks(env: &Env) -> String {
    let run = env.runtime_dir();
    format!(
        r#"
[[role]]
name = "default"
role_alias = "GatewayRole"
  [[role.file]]
  path = "{r}/credentials"
  format = "ini"
  mode = "0640"
  [[role.file]]
  path = "{r}/creds.json"
  format = "json"
  mode = "0600"
  [[role.file]]
  path = "{r}/creds.process.json"
  format = "credential-process"
  mode = "0644"
  [[role.file]]
  path = "{r}/creds.env"
  format = "env"
  mode = "0600"
"#,
        r = run.display()
    )
}

fn assert_files_hold(env: &Env, access_key_id: &str) {
    let r = env.runtime_dir();
    let issued = env
        .provider
        .issued()
        .into_iter()
        .find(|c| c.access_key_id == access_key_id)
        .unwrap();
    let ini = std::fs::read_to_string(r.join("credentials")).unwrap();
    assert_eq!(
        ini.lines().take(4).collect::<Vec<_>>(),
        vec![
            "[default]".to_string(),
            format!("aws_access_key_id = {}", issued.access_key_id),
            format!("aws_secret_access_key = {}", issued.secret_access_key),
            format!("aws_session_token = {}", issued.session_token),
        ]
    );
    assert_eq!(mode(&r.join("credentials")), 0o640);
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(r.join("creds.json")).unwrap()).unwrap();
    assert_eq!(json["AccessKeyId"], issued.access_key_id.as_str());
    assert_eq!(json["Token"], issued.session_token.as_str());
    assert_eq!(mode(&r.join("creds.json")), 0o600);
    let cp: serde_json::Value =
        serde_json::from_slice(&std::fs::read(r.join("creds.process.json")).unwrap()).unwrap();
    assert_eq!(cp["Version"], 1);
    assert_eq!(cp["SecretAccessKey"], issued.secret_access_key.as_str());
    assert_eq!(mode(&r.join("creds.process.json")), 0o644);
    let envf = std::fs::read_to_string(r.join("creds.env")).unwrap();
    assert!(
        envf.contains(&format!(
            "export AWS_ACCESS_KEY_ID={}",
            issued.access_key_id
        )),
        "{envf}"
    );
    assert_eq!(mode(&r.join("creds.env")), 0o600);
    // No temporary file left behind.
    for e in std::fs::read_dir(&r).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.ends_with(".tmp"), "leftover {name}");
    }
}

fn current_file_key(env: &Env) -> Option<String> {
    let ini = std::fs::read_to_string(env.runtime_dir().join("credentials")).ok()?;
    ini.lines()
        .find_map(|l| l.strip_prefix("aws_access_key_id = "))
        .map(str::to_string)
}

#[test]
fn run_writes_every_sink_and_serves_get() {
    let env = Env::new();
    let k = env.pki.device_ec.key.display().to_string();
    let cfg = env.config_with(&env.pki.device_ec.cert, &k, "", &sinks(&env));
    let mut agent = env.start_agent(&cfg);
    assert!(agent.wait_ready(LIMIT), "no READY=1; log:\n{}", agent.log());
    let issued = env.provider.last_issued().unwrap();
    assert_files_hold(&env, &issued.access_key_id);

    // The token file exists even without `listen`, mode 0640, no newline.
    let token = env.runtime_dir().join("default.token");
    assert_eq!(mode(&token), 0o640);
    let t = std::fs::read_to_string(&token).unwrap();
    assert!(t.len() >= 22 && !t.ends_with('\n'), "{t:?}");

    let sock = env.socket().display().to_string();
    let out = env.run(&["get", "--socket", &sock]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(v["AccessKeyId"], issued.access_key_id.as_str());
    assert_eq!(v["SecretAccessKey"], issued.secret_access_key.as_str());
    let out = env.run(&["credential-process", "--socket", &sock, "--role", "default"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(v["Version"], 1);
    assert_eq!(v["SessionToken"], issued.session_token.as_str());
    let out = env.run(&["get", "--socket", &sock, "--role", "nope"]);
    assert_eq!(out.code, 2, "{}", out.stderr);

    assert_eq!(
        env.provider.stats().requests,
        1,
        "one fetch at start-up, no more"
    );
    let (code, log) = agent.stop(&env);
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("credentials refreshed"), "{log}");
    let out = env.run(&["get", "--socket", &sock]);
    assert_eq!(out.code, 5, "agent stopped: {}", out.stderr);
    env.assert_no_secrets(&[&t]);
}

#[test]
fn refreshes_on_schedule_and_keeps_files_through_upstream_failure() {
    // 66 s credentials, refresh_before 0, no jitter: refresh at max(L/4, L - L/2) = 33 s.
    let env = Env::with_provider(|c| c.ttl = Duration::from_secs(66));
    let k = env.pki.device_ec.key.display().to_string();
    let cfg = env.config_with(
        &env.pki.device_ec.cert,
        &k,
        "[refresh]\nrefresh_before_seconds = 0\njitter_seconds = 0\nmax_backoff_seconds = 2\n",
        "",
    );
    let mut agent = env.start_agent(&cfg);
    assert!(agent.wait_ready(LIMIT), "{}", agent.log());
    let first = env.provider.last_issued().unwrap().access_key_id;
    assert_eq!(current_file_key(&env).as_deref(), Some(first.as_str()));
    // At the refresh, the provider closes the kept-alive connection without answering (as an
    // idle-timed-out server would): the agent must retry at once on a new connection.
    env.provider.push_fault(Fault::CloseBeforeResponse);

    // The scheduled refresh replaces the file with the second credentials.
    let second = poll(Duration::from_secs(60), || {
        current_file_key(&env).filter(|k| *k != first)
    })
    .expect("no refresh within 60 s");
    let complete: Vec<_> = env
        .provider
        .issued()
        .into_iter()
        .filter(|c| c.complete)
        .collect();
    assert_eq!(complete.len(), 2, "exactly one refresh");
    assert_eq!(complete[1].access_key_id, second);
    let reqs = env.provider.requests();
    assert_eq!(reqs.len(), 3, "{reqs:#?}");
    assert_eq!(
        reqs[1].connection, reqs[0].connection,
        "keep-alive connection reused"
    );
    assert_ne!(
        reqs[2].connection, reqs[1].connection,
        "retried on a new connection"
    );
    assert_eq!(reqs[2].status, Some(200));
    let gap = reqs[1].received_unix - reqs[0].received_unix;
    // Not before the refresh point (33 s after issue; whole seconds), and before expiry.
    assert!(
        (32..66).contains(&gap),
        "refresh after {gap} s, expected at 33 s"
    );

    // Upstream fails from now on: the file keeps the last good credentials.
    env.provider.set_fault(Fault::status(503));
    let failures_before = env.provider.stats().requests;
    assert!(
        env.provider.wait_until(
            |s| s.requests >= failures_before + 2,
            Duration::from_secs(60)
        ),
        "agent did not retry"
    );
    assert_eq!(current_file_key(&env).as_deref(), Some(second.as_str()));
    let (code, log) = agent.stop(&env);
    assert_eq!(code, Some(0));
    assert!(log.contains("refresh failed"), "{log}");
    assert!(log.contains("(503)"), "{log}");
    env.assert_no_secrets(&[]);
}

#[test]
fn run_refuses_bad_config_with_exit_2() {
    let env = Env::new();
    let k = env.pki.device_ec.key.display().to_string();
    let cfg = env.config_with(
        &env.pki.device_ec.cert,
        &k,
        "[serve]\nlisten = \"0.0.0.0:2773\"\n",
        "",
    );
    let out = env.run(&["run", "--config", &cfg.display().to_string()]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("loopback"), "{}", out.stderr);
}

#[test]
fn check_reports_every_config_mistake_at_once() {
    let env = Env::new();
    let k = env.pki.device_ec.key.display().to_string();
    // Three mistakes, on lines 8, 10 and 13 (the top-level keys take lines 1-7).
    let cfg = env.config_with(
        &env.pki.device_ec.cert,
        &k,
        "state_dir = \"\"",
        "[serve]\nlisten = \"0.0.0.0:2773\"\n[[role]]\nname = \"default\"\nrole_alias = \"Bad Alias\"\n",
    );
    let out = env.run(&["check", "--config", &cfg.display().to_string()]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 3, "{}", out.stderr);
    let at = format!("iotcred: config {} line", cfg.display());
    for (line, (n, what)) in
        lines
            .iter()
            .zip([(8, "state_dir"), (10, "loopback"), (13, "role_alias")])
    {
        assert!(line.starts_with(&format!("{at} {n}: ")), "{line}");
        assert!(line.contains(what), "{line}");
    }
}

#[test]
fn sighup_reloads_and_keeps_credentials_of_unchanged_roles() {
    let env = Env::new();
    let k = env.pki.device_ec.key.display().to_string();
    let cfg = env.config_with(&env.pki.device_ec.cert, &k, "", "");
    let mut agent = env.start_agent(&cfg);
    assert!(agent.wait_ready(LIMIT), "{}", agent.log());
    assert_eq!(env.provider.stats().requests, 1);
    let (code, before) = hostile::health(&env.socket()).unwrap();
    assert_eq!(code, 200, "{before}");
    let before = before["roles"][0].clone();
    assert_eq!(before["state"], "healthy", "{before}");

    // Add a second role; the first keeps its credentials (no new fetch for it).
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        format!("{text}\n[[role]]\nname = \"second\"\nrole_alias = \"GatewayRole\"\n"),
    )
    .unwrap();
    agent.signal(libc::SIGHUP);
    assert!(
        agent
            .wait_notify(LIMIT, |m| m.contains("second: valid until"))
            .is_some(),
        "{}",
        agent.log()
    );
    assert_eq!(
        env.provider.stats().requests,
        2,
        "only the new role fetched"
    );
    // The kept role's plan is unchanged: same refresh point and expiry (the wall-clock
    // renderings of the same monotonic instants, so at most a second of rounding apart), and
    // still healthy.
    let (code, after) = hostile::health(&env.socket()).unwrap();
    assert_eq!(code, 200, "{after}");
    let after = after["roles"][0].clone();
    assert_eq!(after["state"], "healthy", "{after}");
    for field in ["refresh_at", "expiration", "last_refresh"] {
        let secs = |v: &serde_json::Value| {
            let text = v[field].as_str().unwrap_or_else(|| panic!("{field}: {v}"));
            iotcred_core::UnixTime::parse_rfc3339(text)
                .unwrap()
                .as_secs()
        };
        let (b, a) = (secs(&before), secs(&after));
        assert!(b.abs_diff(a) <= 1, "{field} moved from {before} to {after}");
    }
    let sock = env.socket().display().to_string();
    assert_eq!(
        env.run(&["get", "--socket", &sock, "--role", "second"])
            .code,
        0
    );

    // An invalid config is refused and the agent keeps running.
    std::fs::write(&cfg, "this is not toml").unwrap();
    agent.signal(libc::SIGHUP);
    assert!(
        poll(LIMIT, || agent
            .log()
            .contains("reload refused")
            .then_some(()))
        .is_some()
    );
    assert_eq!(env.run(&["get", "--socket", &sock]).code, 0);
    let (code, _) = agent.stop(&env);
    assert_eq!(code, Some(0));
    env.assert_no_secrets(&[]);
}

#[test]
fn on_demand_mode_stays_quiet_until_asked() {
    let env = Env::new();
    let k = env.pki.device_ec.key.display().to_string();
    let cfg = env.config_with(
        &env.pki.device_ec.cert,
        &k,
        "[refresh]\nmode = \"on-demand\"\n",
        "",
    );
    let mut agent = env.start_agent(&cfg);
    // Ready at once: an on-demand role nobody asked for counts as ready, and nothing is fetched.
    assert!(agent.wait_ready(LIMIT), "{}", agent.log());
    assert_eq!(env.provider.stats().requests, 0);
    assert!(!env.runtime_dir().join("credentials").exists());

    // The first request triggers the (single) fetch and waits for it.
    let sock = env.socket().display().to_string();
    let out = env.run(&["get", "--socket", &sock]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let issued = env.provider.last_issued().unwrap();
    assert!(out.stdout.contains(&issued.access_key_id));
    assert_eq!(
        current_file_key(&env).as_deref(),
        Some(issued.access_key_id.as_str())
    );
    // Later requests are served from the cache.
    assert_eq!(env.run(&["get", "--socket", &sock]).code, 0);
    assert_eq!(env.provider.stats().requests, 1);
    agent.stop(&env);
    env.assert_no_secrets(&[]);
}
