//! End-to-end: `iotcred fetch` and `iotcred check` (real binary, real mTLS, fake provider).

use std::time::Duration;

use iotcred_tests::agent::{Env, THING};
use iotcred_tests::{Fault, ServerCert, TlsVersions};

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

fn fetch(env: &Env, config: &std::path::Path, extra: &[&str]) -> iotcred_tests::agent::Output {
    let c = config.display().to_string();
    let mut args = vec!["fetch", "--config", c.as_str()];
    args.extend_from_slice(extra);
    env.run(&args)
}

/// Asserts a successful fetch printed exactly what the provider issued last.
fn assert_fetched(env: &Env, out: &iotcred_tests::agent::Output) {
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    let issued = env
        .provider
        .last_issued()
        .expect("provider issued credentials");
    let v = json(&out.stdout);
    assert_eq!(v["AccessKeyId"], issued.access_key_id.as_str());
    assert_eq!(v["SecretAccessKey"], issued.secret_access_key.as_str());
    assert_eq!(v["Token"], issued.session_token.as_str());
    let exp = v["Expiration"].as_str().unwrap();
    assert!(exp.ends_with('Z') && exp.len() == 20, "{exp}");
    let req = env.provider.requests().pop().unwrap();
    assert_eq!(req.thing_name.as_deref(), Some(THING));
    assert_eq!(
        req.user_agent.as_deref(),
        Some(concat!("iotcred/", env!("CARGO_PKG_VERSION")))
    );
    assert_eq!(req.alias.as_deref(), Some("GatewayRole"));
    assert_eq!(req.client_cn.as_deref(), Some(THING));
    assert_eq!(req.sni.as_deref(), Some("localhost"));
    assert_eq!(req.method, "GET");
    assert_eq!(req.path, "/role-aliases/GatewayRole/credentials");
}

#[test]
fn fetch_with_pem_ec_key_tls13_and_tls12() {
    for versions in [TlsVersions::Tls13Only, TlsVersions::Tls12Only] {
        let env = Env::with_provider(|c| c.tls_versions = versions);
        let out = fetch(&env, &env.config(), &[]);
        assert_fetched(&env, &out);
        let want = if versions == TlsVersions::Tls13Only {
            "TLSv1.3"
        } else {
            "TLSv1.2"
        };
        assert_eq!(env.provider.requests()[0].tls_version, want);
        env.assert_no_secrets(&[]);
    }
}

#[test]
fn fetch_with_pem_rsa_key() {
    for versions in [TlsVersions::Tls13Only, TlsVersions::Tls12Only] {
        let env = Env::with_provider(|c| c.tls_versions = versions);
        let k = env.pki.device_rsa.key.display().to_string();
        let cfg = env.config_with(&env.pki.device_rsa.cert, &k, "", "");
        assert_fetched(&env, &fetch(&env, &cfg, &[]));
        env.assert_no_secrets(&[]);
    }
}

#[test]
fn fetch_with_chain_and_duration() {
    let env = Env::new();
    let k = env.pki.device_chain.key.display().to_string();
    let cfg = env.config_with(
        &env.pki.device_chain.cert,
        &k,
        "",
        "[[role]]\nname = \"default\"\nrole_alias = \"GatewayRole\"\nduration_seconds = 900\n",
    );
    let out = fetch(&env, &cfg, &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        env.provider.requests()[0].duration_seconds.as_deref(),
        Some("900")
    );
    let issued = env.provider.last_issued().unwrap();
    assert_eq!(issued.expiration_unix - issued.server_time_unix, 900);
}

#[test]
fn fetch_formats() {
    let env = Env::new();
    let cfg = env.config();
    let out = fetch(&env, &cfg, &["--format", "credential-process"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v = json(&out.stdout);
    let issued = env.provider.last_issued().unwrap();
    assert_eq!(v["Version"], 1);
    assert_eq!(v["SessionToken"], issued.session_token.as_str());

    let out = fetch(&env, &cfg, &["--format", "ini"]);
    let issued = env.provider.last_issued().unwrap();
    assert!(out.stdout.starts_with("[default]\n"), "{}", out.stdout);
    assert!(
        out.stdout
            .contains(&format!("aws_access_key_id = {}\n", issued.access_key_id))
    );

    let out = fetch(&env, &cfg, &["--format", "env"]);
    let issued = env.provider.last_issued().unwrap();
    assert!(
        out.stdout.contains(&format!(
            "export AWS_ACCESS_KEY_ID={}",
            issued.access_key_id
        )),
        "{}",
        out.stdout
    );

    let out = fetch(&env, &cfg, &["--role", "nope"]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("nope"));
}

#[test]
fn thing_mismatch_is_permanent_with_fix() {
    let env = Env::new();
    let k = env.pki.device_ec.key.display().to_string();
    let cfg = env.config_with(&env.pki.device_ec.cert, &k, "", "");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(THING, "other-thing");
    std::fs::write(&cfg, text).unwrap();
    let out = fetch(&env, &cfg, &[]);
    assert_eq!(out.code, 3, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("the certificate is not attached to thing other-thing, or the IoT policy denies iot:AssumeRoleWithCertificate for role alias GatewayRole"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("Invalid thing name passed"),
        "{}",
        out.stderr
    );
}

#[test]
fn unknown_alias_is_permanent() {
    let env = Env::new();
    let k = env.pki.device_ec.key.display().to_string();
    let cfg = env.config_with(
        &env.pki.device_ec.cert,
        &k,
        "",
        "[[role]]\nname = \"default\"\nrole_alias = \"NoSuchAlias\"\n",
    );
    let out = fetch(&env, &cfg, &[]);
    assert_eq!(out.code, 3, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("role alias NoSuchAlias not found (404)"),
        "{}",
        out.stderr
    );
}

#[test]
fn transient_failures_exit_4() {
    let cases: Vec<(Fault, &str)> = vec![
        (Fault::status(503), "(503)"),
        (Fault::status_retry_after(429, 3), "throttling (429)"),
        (Fault::status(500), "(500)"),
        (Fault::ResetMidBody, "failed"),
        (Fault::ResetMidHeaders, "failed"),
        (Fault::CloseBeforeResponse, "failed"),
        (Fault::MalformedJson, "unusable"),
        (Fault::OversizedBody { bytes: None }, "unusable"),
        (Fault::Expired, "unusable"),
        (
            Fault::SlowHeaders {
                delay: Duration::from_secs(30),
            },
            "within 2 s",
        ),
    ];
    let env = Env::new();
    let k = env.pki.device_ec.key.display().to_string();
    let cfg = env.config_with(&env.pki.device_ec.cert, &k, "timeout_seconds = 2", "");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("timeout_seconds = 5\n", "");
    std::fs::write(&cfg, text).unwrap();
    for (fault, expect) in cases {
        env.provider.clear_faults();
        env.provider.set_fault(fault.clone());
        let out = fetch(&env, &cfg, &[]);
        assert_eq!(out.code, 4, "{fault:?}: {}", out.stderr);
        assert!(out.stderr.contains(expect), "{fault:?}: {}", out.stderr);
        assert!(
            out.stderr
                .lines()
                .filter(|l| l.starts_with("iotcred:"))
                .count()
                == 1,
            "{}",
            out.stderr
        );
    }
    env.provider.clear_faults();
    assert_eq!(fetch(&env, &cfg, &[]).code, 0);
    env.assert_no_secrets(&[]);
}

#[test]
fn untrusted_or_expired_server_certificate_exit_4() {
    for (server, expect) in [
        (ServerCert::Untrusted, "not trusted"),
        (ServerCert::Expired, "expired"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let pki = iotcred_tests::Pki::generate(dir.path(), THING).unwrap();
        let provider =
            iotcred_tests::BlockingProvider::start(pki.provider_config_with(server)).unwrap();
        let env = Env::new();
        let cfg = env.config();
        // Point the config at the misbehaving provider, trusting the first PKI's CA.
        let text = std::fs::read_to_string(&cfg)
            .unwrap()
            .replace(&env.endpoint(), &provider.endpoint())
            .replace(
                &env.pki.ca_cert.display().to_string(),
                &pki.ca_cert.display().to_string(),
            )
            .replace(
                &env.pki.device_ec.cert.display().to_string(),
                &pki.device_ec.cert.display().to_string(),
            )
            .replace(
                &env.pki.device_ec.key.display().to_string(),
                &pki.device_ec.key.display().to_string(),
            );
        std::fs::write(&cfg, text).unwrap();
        let out = fetch(&env, &cfg, &[]);
        assert_eq!(out.code, 4, "{server:?}: {}", out.stderr);
        assert!(out.stderr.contains(expect), "{server:?}: {}", out.stderr);
        assert_eq!(provider.stats().requests, 0);
    }
}

#[test]
fn client_certificate_rejected_by_endpoint() {
    let env = Env::new();
    let k = env.pki.untrusted_device.key.display().to_string();
    let cfg = env.config_with(&env.pki.untrusted_device.cert, &k, "", "");
    let out = fetch(&env, &cfg, &[]);
    assert_eq!(out.code, 4, "{}", out.stderr);
    assert!(
        out.stderr.contains("rejected the device certificate"),
        "{}",
        out.stderr
    );
}

#[test]
fn connection_refused_exit_4() {
    let env = Env::new();
    let cfg = env.config();
    // A port nothing listens on: bind, learn the port, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(&env.endpoint(), &format!("localhost:{port}"));
    std::fs::write(&cfg, text).unwrap();
    let out = fetch(&env, &cfg, &[]);
    assert_eq!(out.code, 4, "{}", out.stderr);
    assert!(out.stderr.contains("cannot connect"), "{}", out.stderr);
}

#[test]
fn bad_config_exit_2_naming_the_key() {
    let env = Env::new();
    let cfg = env.config();
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, format!("colour = \"blue\"\n{text}")).unwrap();
    let out = fetch(&env, &cfg, &[]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr.contains("colour") && out.stderr.contains("line 1"),
        "{}",
        out.stderr
    );

    let out = env.run(&["fetch", "--config", "/nonexistent/iotcred.toml"]);
    assert_eq!(out.code, 2);
    assert!(
        out.stderr.contains("/nonexistent/iotcred.toml"),
        "{}",
        out.stderr
    );

    // Certificate that does not match the key.
    let k = env.pki.device_rsa.key.display().to_string();
    let cfg = env.config_with(&env.pki.device_ec.cert, &k, "", "");
    let out = fetch(&env, &cfg, &[]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr.contains("does not match the private key"),
        "{}",
        out.stderr
    );

    // Expired and not-yet-valid device certificates.
    let k = env.pki.expired_device.key.display().to_string();
    let out = fetch(
        &env,
        &env.config_with(&env.pki.expired_device.cert, &k, "", ""),
        &[],
    );
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("expired"), "{}", out.stderr);
    let k = env.pki.not_yet_valid_device.key.display().to_string();
    let out = fetch(
        &env,
        &env.config_with(&env.pki.not_yet_valid_device.cert, &k, "", ""),
        &[],
    );
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("clock"), "{}", out.stderr);

    // Missing key file.
    let out = fetch(
        &env,
        &env.config_with(&env.pki.device_ec.cert, "/nonexistent/key.pem", "", ""),
        &[],
    );
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr.contains("/nonexistent/key.pem"),
        "{}",
        out.stderr
    );
    assert_eq!(env.provider.stats().requests, 0);
}

#[test]
fn check_and_check_fetch() {
    let env = Env::new();
    let cfg = env.config();
    let c = cfg.display().to_string();
    let out = env.run(&["check", "--config", &c]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout.contains("certificate matches the key"),
        "{}",
        out.stdout
    );
    assert_eq!(
        env.provider.stats().requests,
        0,
        "check without --fetch must not call upstream"
    );

    let out = env.run(&["check", "--config", &c, "--fetch"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let issued = env.provider.last_issued().unwrap();
    let last4 = &issued.access_key_id[issued.access_key_id.len() - 4..];
    assert!(out.stdout.contains(&format!("…{last4}")), "{}", out.stdout);
    assert!(
        !out.stdout.contains(&issued.access_key_id),
        "full access key id printed"
    );
    env.keep_log(out.stdout.clone());
    env.assert_no_secrets(&[]);

    env.provider.set_fault(Fault::status(403));
    let out = env.run(&["check", "--config", &c, "--fetch"]);
    assert_eq!(out.code, 3, "{}", out.stderr);
}

#[test]
fn fetch_through_connect_proxy() {
    let env = Env::new();
    let proxy = iotcred_tests::sts::ConnectProxy::start();
    let k = env.pki.device_ec.key.display().to_string();
    let cfg = env.config_with(
        &env.pki.device_ec.cert,
        &k,
        &format!("proxy = \"{}\"", proxy.url()),
        "",
    );
    assert_fetched(&env, &fetch(&env, &cfg, &[]));
    assert_eq!(
        proxy.seen(),
        vec![format!("CONNECT {} HTTP/1.1", env.endpoint())]
    );
}

#[test]
fn credentials_with_less_than_a_minute_left_are_refused() {
    let env = Env::new();
    env.provider.set_fault(Fault::Ttl { seconds: 30 });
    let out = fetch(&env, &env.config(), &[]);
    assert_eq!(out.code, 4, "{}", out.stderr);
    assert!(out.stderr.contains("valid for only 30 s"), "{}", out.stderr);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
}
