//! End-to-end: chained roles (SPEC §9) in `iotcred run` (the real binary). The source role comes
//! from the fake IoT credentials provider; the chained role from the signature-verifying fake
//! STS (or moto's STS), over TLS with `[sts] ca`. A chained role gets everything roles have:
//! `/v1/credentials/<name>` on the socket and on TCP with its own token, allow-lists, health,
//! metrics and file sinks; and its faults are classified per §9.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use iotcred_tests::Fault;
use iotcred_tests::agent::{Env, poll};
use iotcred_tests::hostile;
use iotcred_tests::sts::{ConnectProxy, FakeSts, FakeStsOptions, MotoSts, StsFault};

const LIMIT: Duration = Duration::from_secs(30);
const ARN: &str = "arn:aws:iam::210987654321:role/GatewayAnalytics";

fn env() -> Env {
    Env::with_provider(|c| c.admin = Some("127.0.0.1:0".parse().unwrap()))
}

fn fake_sts(env: &Env, external_id: Option<&str>) -> FakeSts {
    FakeSts::start(
        &env.pki.server,
        &FakeStsOptions {
            provider_admin: env.provider.admin_addr(),
            external_id: external_id.map(str::to_string),
            ..FakeStsOptions::default()
        },
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn my_uid() -> u32 {
    // SAFETY: getuid has no preconditions.
    unsafe { libc::getuid() }
}

/// `[sts]` for `endpoint`, the default provider role and a chained role `analytics` (with a
/// json file sink), after `top` (e.g. `[serve]`).
fn config(env: &Env, top: &str, endpoint: &str, chained_extra: &str) -> std::path::PathBuf {
    let run = env.runtime_dir();
    let extra = format!(
        r#"
[sts]
endpoint = "{endpoint}"
region = "eu-west-1"
ca = "{ca}"

[[role]]
name = "default"
role_alias = "GatewayRole"

[[role]]
name = "analytics"
source_role = "default"
assume_role_arn = "{ARN}"
{chained_extra}
  [[role.file]]
  path = "{run}/analytics.json"
  format = "json"
  mode = "0600"
"#,
        ca = env.pki.ca_cert.display(),
        run = run.display(),
    );
    let k = env.pki.device_ec.key.display().to_string();
    env.config_with(&env.pki.device_ec.cert, &k, top, &extra)
}

/// Role `name`'s entry of `/v1/health` (null while the agent is not listening yet).
fn role_health(env: &Env, name: &str) -> serde_json::Value {
    let Ok((_, h)) = hostile::health(&env.socket()) else {
        return serde_json::Value::Null;
    };
    h["roles"]
        .as_array()
        .and_then(|roles| roles.iter().find(|r| r["name"] == name).cloned())
        .unwrap_or(serde_json::Value::Null)
}

/// Waits until `pred` holds for role `name`'s health entry; returns it.
fn wait_role(
    env: &Env,
    name: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    poll(LIMIT, || {
        let r = role_health(env, name);
        pred(&r).then_some(r)
    })
    .unwrap_or_else(|| panic!("role {name} never got there: {}", role_health(env, name)))
}

fn tcp_get(port: u16, path: &str, token: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = token
        .map(|t| format!("Authorization: {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status).unwrap();
    let mut rest = String::new();
    r.read_to_string(&mut rest).unwrap();
    let code = status.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = rest
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

#[test]
fn a_chained_role_is_served_like_any_other_role() {
    let env = env();
    let sts = fake_sts(&env, Some("ext-0042"));
    let port = free_port();
    let cfg = config(
        &env,
        &format!("[serve]\nlisten = \"127.0.0.1:{port}\"\n"),
        &sts.endpoint(),
        &format!(
            "external_id = \"ext-0042\"\nsession_name = \"gw-0042\"\nduration_seconds = 1800\nallow_uids = [{}]",
            my_uid()
        ),
    );
    let mut agent = env.start_agent(&cfg);
    assert!(agent.wait_ready(LIMIT), "no READY=1; log:\n{}", agent.log());
    let h = wait_role(&env, "analytics", |r| r["healthy"] == true);
    let remaining = h["remaining_seconds"].as_u64().unwrap();
    assert!((1700..=1800).contains(&remaining), "{h}");

    // What STS was asked, and with whose credentials.
    let issued = sts.issued();
    let source = env.provider.last_issued().unwrap();
    assert_eq!(issued.len(), 1);
    assert_eq!(issued[0].source_access_key_id, source.access_key_id);
    assert_eq!(issued[0].session_name, "gw-0042");
    let req = &sts.requests()[0];
    assert_eq!(req["signature_ok"], true, "{req}");
    assert_eq!(req["form"]["RoleArn"], ARN);
    assert_eq!(req["form"]["DurationSeconds"], "1800");
    assert_eq!(req["form"]["ExternalId"], "ext-0042");

    // The socket (`iotcred get`), with the allow-list letting this uid in.
    let sock = env.socket().display().to_string();
    let out = env.run(&["get", "--socket", &sock, "--role", "analytics"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(v["AccessKeyId"], issued[0].access_key_id.as_str());
    assert_eq!(v["Token"], issued[0].session_token.as_str());

    // TCP with the role's own token; the source role's token does not open it.
    let token = std::fs::read_to_string(env.runtime_dir().join("analytics.token")).unwrap();
    let other = std::fs::read_to_string(env.runtime_dir().join("default.token")).unwrap();
    let (code, body) = tcp_get(port, "/v1/credentials/analytics", Some(&token));
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["SecretAccessKey"], issued[0].secret_access_key.as_str());
    assert_eq!(
        tcp_get(port, "/v1/credentials/analytics", Some(&other)).0,
        401
    );
    assert_eq!(tcp_get(port, "/v1/credentials/analytics", None).0, 401);

    // File sink, metrics.
    let file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.runtime_dir().join("analytics.json")).unwrap())
            .unwrap();
    assert_eq!(file["AccessKeyId"], issued[0].access_key_id.as_str());
    let metrics = hostile::unix_get(&env.socket(), "/v1/metrics").unwrap();
    assert!(
        metrics.body.contains("role=\"analytics\""),
        "{}",
        metrics.body
    );

    let (code, log) = agent.stop(&env);
    assert_eq!(code, Some(0), "{log}");
    let secrets = sts.secrets();
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    env.assert_no_secrets(&secrets);
}

#[test]
fn access_denied_is_permanent_and_health_says_what_to_fix() {
    let env = env();
    let sts = fake_sts(&env, None);
    sts.set_fault(StsFault::AccessDenied);
    let cfg = config(&env, "", &sts.endpoint(), "");
    let agent = env.start_agent(&cfg);
    let h = wait_role(&env, "analytics", |r| r["failures"].as_u64() >= Some(1));
    assert_eq!(h["healthy"], false);
    let e = h["last_error"].as_str().unwrap();
    assert!(
        e.contains("AccessDenied") && e.contains("trust policy of"),
        "{e}"
    );
    assert_eq!(
        wait_role(&env, "default", |r| r["healthy"] == true)["healthy"],
        true
    );
    let permanent = hostile::metric(
        &env.socket(),
        "iotcred_refresh_total{role=\"analytics\",outcome=\"permanent_error\"}",
    )
    .unwrap();
    assert!(permanent >= 1.0, "{permanent}");
    drop(agent);
}

#[test]
fn throttling_and_500_back_off_then_recover() {
    let env = env();
    let sts = fake_sts(&env, None);
    sts.push_fault(StsFault::Throttling);
    sts.push_fault(StsFault::Status500);
    let cfg = config(&env, "", &sts.endpoint(), "");
    let agent = env.start_agent(&cfg);
    let h = wait_role(&env, "analytics", |r| r["healthy"] == true);
    assert_eq!(h["failures"], 0);
    let codes: Vec<_> = sts
        .requests()
        .iter()
        .map(|q| q["status"].as_u64().unwrap())
        .collect();
    assert_eq!(codes, [400, 500, 200]);
    let transient = hostile::metric(
        &env.socket(),
        "iotcred_refresh_total{role=\"analytics\",outcome=\"transient_error\"}",
    )
    .unwrap();
    assert_eq!(transient, 2.0);
    drop(agent);
}

#[test]
fn a_source_role_that_is_down_holds_the_chained_role_back_until_it_recovers() {
    let env = env();
    let sts = fake_sts(&env, None);
    env.provider.set_fault(Fault::status(503));
    let cfg = config(&env, "", &sts.endpoint(), "");
    let agent = env.start_agent(&cfg);
    let h = wait_role(&env, "analytics", |r| r["failures"].as_u64() >= Some(1));
    assert_eq!(h["healthy"], false);
    let e = h["last_error"].as_str().unwrap();
    assert!(
        e.contains("source role default has no valid credentials"),
        "{e}"
    );
    assert!(
        sts.requests().is_empty(),
        "nothing to sign with, nothing sent"
    );

    env.provider.clear_faults();
    wait_role(&env, "default", |r| r["healthy"] == true);
    wait_role(&env, "analytics", |r| r["healthy"] == true);
    assert_eq!(sts.requests().len(), 1);
    drop(agent);
}

#[test]
fn the_proxy_carries_both_the_provider_and_sts() {
    let env = env();
    let sts = fake_sts(&env, None);
    let proxy = ConnectProxy::start();
    let cfg = config(
        &env,
        &format!("proxy = \"{}\"", proxy.url()),
        &sts.endpoint(),
        "",
    );
    let agent = env.start_agent(&cfg);
    wait_role(&env, "analytics", |r| r["healthy"] == true);
    let seen = proxy.seen();
    assert!(
        seen.contains(&format!("CONNECT {} HTTP/1.1", env.endpoint())),
        "{seen:?}"
    );
    assert!(
        seen.contains(&format!("CONNECT localhost:{} HTTP/1.1", sts.port())),
        "{seen:?}"
    );
    drop(agent);
}

#[test]
fn moto_sts_serves_a_chained_role() {
    let env = env();
    let moto = MotoSts::start(&env.pki.server);
    let cfg = config(&env, "", &moto.endpoint(), "duration_seconds = 900");
    let agent = env.start_agent(&cfg);
    let h = wait_role(&env, "analytics", |r| r["healthy"] == true);
    let remaining = h["remaining_seconds"].as_u64().unwrap();
    assert!((800..=900).contains(&remaining), "{h}");
    let sock = env.socket().display().to_string();
    let out = env.run(&[
        "get",
        "--socket",
        &sock,
        "--role",
        "analytics",
        "--format",
        "env",
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout.contains("export AWS_ACCESS_KEY_ID=ASIA"),
        "{}",
        out.stdout
    );
    drop(agent);
}

#[test]
fn fetch_and_check_follow_the_chain() {
    let env = env();
    let sts = fake_sts(&env, None);
    let cfg = config(&env, "", &sts.endpoint(), "");
    let c = cfg.display().to_string();
    let out = env.run(&["fetch", "--config", &c, "--role", "analytics"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    let issued = sts.issued();
    assert_eq!(v["AccessKeyId"], issued[0].access_key_id.as_str());
    assert_eq!(
        issued[0].source_access_key_id,
        env.provider.last_issued().unwrap().access_key_id
    );

    let out = env.run(&["check", "--config", &c, "--fetch"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout.contains("sts: https://localhost:"),
        "{}",
        out.stdout
    );
    let suffix = &sts.issued()[1].access_key_id[16..];
    assert!(out.stdout.contains(suffix), "{}", out.stdout);

    // A permanent refusal is exit code 3, with the fix on stderr.
    sts.set_fault(StsFault::AccessDenied);
    let out = env.run(&["fetch", "--config", &c, "--role", "analytics"]);
    assert_eq!(out.code, 3, "{}", out.stderr);
    assert!(out.stderr.contains("trust policy of"), "{}", out.stderr);
    let secrets = sts.secrets();
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    env.assert_no_secrets(&secrets);
}

#[test]
fn sighup_keeps_a_chained_role_and_chains_can_be_chained() {
    let env = env();
    let sts = fake_sts(&env, None);
    let cfg = config(&env, "", &sts.endpoint(), "");
    let mut agent = env.start_agent(&cfg);
    assert!(agent.wait_ready(LIMIT), "{}", agent.log());
    wait_role(&env, "analytics", |r| r["healthy"] == true);
    assert_eq!(sts.issued().len(), 1);

    // A role chained from the chained role; the running roles are kept as they are.
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        format!(
            "{text}\n[[role]]\nname = \"reports\"\nsource_role = \"analytics\"\nassume_role_arn = \"arn:aws:iam::345678901234:role/Reports\"\n"
        ),
    )
    .unwrap();
    agent.signal(libc::SIGHUP);
    assert!(
        agent
            .wait_notify(LIMIT, |m| m.contains("reports: valid until"))
            .is_some(),
        "{}",
        agent.log()
    );
    let issued = sts.issued();
    assert_eq!(issued.len(), 2, "only the new role called STS");
    assert_eq!(env.provider.stats().requests, 1, "the source role was kept");
    // Signed with the chained role's own STS credentials, and verified by the fake.
    assert_eq!(issued[1].source_access_key_id, issued[0].access_key_id);
    assert!(sts.requests().iter().all(|q| q["signature_ok"] == true));
    assert_eq!(
        wait_role(&env, "analytics", |r| r["healthy"] == true)["failures"],
        0
    );
    let (code, log) = agent.stop(&env);
    assert_eq!(code, Some(0), "{log}");
    let secrets = sts.secrets();
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    env.assert_no_secrets(&secrets);
}

#[test]
fn expired_token_refreshes_the_source_role_then_retries_once() {
    let env = env();
    let sts = fake_sts(&env, None);
    // The first AssumeRole finds the source's token expired (and that key stays refused).
    sts.push_fault(StsFault::ExpiredToken);
    let cfg = config(&env, "", &sts.endpoint(), "");
    let agent = env.start_agent(&cfg);
    let h = wait_role(&env, "analytics", |r| r["healthy"] == true);
    assert_eq!(
        h["failures"], 0,
        "the retry succeeded within the same attempt: {h}"
    );
    let issued = env.provider.issued();
    assert_eq!(issued.len(), 2, "the source role was refreshed");
    let reqs = sts.requests();
    let keys: Vec<_> = reqs.iter().map(|q| q["access_key_id"].clone()).collect();
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    assert_eq!(reqs[0]["code"], "ExpiredToken");
    assert_eq!(keys[0], issued[0].access_key_id.as_str());
    assert_eq!(keys[1], issued[1].access_key_id.as_str());
    assert_eq!(reqs[1]["status"], 200);
    drop(agent);
}

#[test]
fn expired_again_after_the_refresh_is_transient_and_recovers() {
    let env = env();
    let sts = fake_sts(&env, None);
    sts.push_fault(StsFault::ExpiredToken);
    sts.push_fault(StsFault::ExpiredToken);
    let cfg = config(&env, "", &sts.endpoint(), "");
    let agent = env.start_agent(&cfg);
    let h = wait_role(&env, "analytics", |r| r["failures"].as_u64() >= Some(1));
    let e = h["last_error"].as_str().unwrap();
    assert!(e.contains("also after refreshing them"), "{e}");
    // Retried with backoff (a third source refresh, since the second key is refused too).
    wait_role(&env, "analytics", |r| r["healthy"] == true);
    let codes: Vec<_> = sts
        .requests()
        .iter()
        .map(|q| q["status"].as_u64().unwrap())
        .collect();
    assert_eq!(codes, [400, 400, 400, 200]);
    drop(agent);
}
