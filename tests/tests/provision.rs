//! End-to-end: `iotcred provision` and `iotcred run` on a device without an identity (real
//! binary, real TLS, real mosquitto) against the fake AWS IoT of tests/src/fakeiot (SPEC §8.1).

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use iotcred_tests::agent::{iotcred_bin, poll};
use iotcred_tests::fakeiot::device::{
    DeviceEnv, HSM_PIN, HSM_TOKEN, SERIAL, THING_NAME, cert_public_key, softhsm_private_keys,
    softhsm_public_key,
};
use iotcred_tests::fakeiot::{
    CSR_TOPIC, CertStatus, FLEET_TEMPLATE, FakeIotOptions, Step, StepFault, provision_topic,
};
use iotcred_tests::hostile;

const LIMIT: Duration = Duration::from_secs(60);

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// Asserts the identity is complete, registered ACTIVE on the thing, and returns it.
fn assert_provisioned(d: &DeviceEnv) -> iotcred_tests::fakeiot::device::Identity {
    let id = d.identity().expect("identity.toml");
    assert_eq!(id.thing_name, THING_NAME);
    assert!(id.certificate.is_absolute());
    assert_eq!(
        id.device_configuration.get("region").map(String::as_str),
        Some("eu-west-1")
    );
    let active = d.registry.active_certificates_of(THING_NAME);
    assert_eq!(active.len(), 1, "one ACTIVE certificate on the thing");
    let der_pk = cert_public_key(&id.certificate);
    assert_eq!(
        der_pk, active[0].public_key,
        "identity certificate = the ACTIVE one"
    );
    if let Some(cid) = &id.certificate_id {
        assert_eq!(cid, &active[0].id);
    }
    let name = id.certificate.file_name().unwrap().to_string_lossy();
    assert_eq!(name, format!("{}.pem.crt", active[0].id));
    assert_eq!(
        id.certificate.parent().unwrap(),
        d.state_dir().join("certificates")
    );
    assert_eq!(mode(&id.certificate), 0o644);
    d.check_state_files();
    id
}

/// `iotcred run` on the provisioned device serves credentials obtained with the new identity.
fn assert_serves(d: &DeviceEnv, config: &Path) {
    let mut agent = d.env.start_agent(config);
    assert!(agent.wait_ready(LIMIT), "agent not ready: {}", agent.log());
    let socket = d.env.socket();
    let r = hostile::unix_get(&socket, "/v1/credentials").expect("socket");
    assert_eq!(r.status, 200, "{}", r.body);
    let (status, health) = hostile::health(&socket).expect("health");
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["identity"]["state"], "provisioned");
    assert_eq!(health["identity"]["thing_name"], THING_NAME);
    let cert = &d.registry.active_certificates_of(THING_NAME)[0];
    assert!(
        d.registry.provider_seen().contains(&cert.id),
        "the provider saw the provisioned certificate"
    );
    let req = d.env.provider.requests();
    assert!(
        req.iter()
            .any(|r| r.thing_name.as_deref() == Some(THING_NAME) && r.status == Some(200))
    );
    agent.stop(&d.env);
}

#[test]
fn provision_with_a_pem_key_then_run_serves() {
    let d = DeviceEnv::new();
    let config = d.config("", "");
    let out = d.provision(&config);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let id = assert_provisioned(&d);
    // No [provision].key: a new PEM key under <state_dir>/keys, 0600; state_dir 0700.
    let key = Path::new(&id.key);
    assert!(key.is_absolute(), "{}", id.key);
    assert_eq!(key.parent().unwrap(), d.state_dir().join("keys"));
    assert_eq!(mode(key), 0o600);
    assert_eq!(mode(&d.state_dir()), 0o700);
    // The certificate is for our key.
    let kp = rcgen::KeyPair::from_pem(&std::fs::read_to_string(key).unwrap()).unwrap();
    assert_eq!(
        cert_public_key(&id.certificate),
        rcgen::PublicKeyData::subject_public_key_info(&kp)
    );
    // Output names the thing and the certificate id.
    let cid = &d.registry.active_certificates_of(THING_NAME)[0].id;
    assert!(out.stdout.contains(THING_NAME) || out.stderr.contains(THING_NAME));
    assert!(out.stdout.contains(cid.as_str()) || out.stderr.contains(cid.as_str()));
    // Thing created by the template.
    let thing = d.registry.thing(THING_NAME).unwrap();
    assert_eq!(
        thing.attributes.get("SerialNumber").map(String::as_str),
        Some(SERIAL)
    );
    // No in-progress state left.
    assert!(!d.state_dir().join("provision.toml").exists());
    assert_serves(&d, &config);
    d.assert_no_secrets();
}

#[test]
fn provision_with_the_key_generated_in_softhsm() {
    let mut d = DeviceEnv::new();
    let (hsm, uri) = d.softhsm_key();
    let config = d.config(&format!("key = \"{uri}\"\nalgorithm = \"ec-p256\""), "");
    let out = d.provision(&config);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let id = assert_provisioned(&d);
    assert!(id.key.starts_with("pkcs11:"), "{}", id.key);
    // One key object: sensitive, never extractable.
    let keys = softhsm_private_keys(&hsm, HSM_TOKEN, HSM_PIN);
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert_eq!(keys[0].label, "device");
    assert!(keys[0].access.contains("sensitive"), "{keys:?}");
    assert!(keys[0].access.contains("never extractable"), "{keys:?}");
    // The responder verified the CSR's signature (rcgen refuses a bad one: InvalidCSR) and
    // signed the token's public key.
    let spki = softhsm_public_key(&hsm, HSM_TOKEN, HSM_PIN, &keys[0].id);
    assert_eq!(cert_public_key(&id.certificate), spki);
    assert_serves(&d, &config);
    d.assert_no_secrets();
}

#[test]
fn a_provisioned_device_sends_nothing() {
    let d = DeviceEnv::new();
    let config = d.config("", "");
    assert_eq!(d.provision(&config).code, 0);
    let before = d.registry.counters();
    let identity = std::fs::read(d.identity_path()).unwrap();
    let connections = d.iot.broker_logs().matches("New client connected").count();
    let out = d.provision(&config);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(d.registry.counters(), before, "zero publishes");
    assert_eq!(std::fs::read(d.identity_path()).unwrap(), identity);
    assert_eq!(
        d.iot.broker_logs().matches("New client connected").count(),
        connections,
        "no connection opened"
    );
}

/// A rejection at `step` exits 3 and names the step, the errorCode and AWS's errorMessage.
fn rejected_at(step: Step, status: u16, code: &str, message: &str, step_name: &str) {
    let d = DeviceEnv::new();
    d.registry
        .push_fault(step, StepFault::reject(status, code, message));
    let config = d.config("", "");
    let out = d.provision(&config);
    assert_eq!(out.code, 3, "{}", out.stderr);
    assert!(out.stderr.contains(step_name), "step named: {}", out.stderr);
    assert!(out.stderr.contains(code), "errorCode: {}", out.stderr);
    assert!(out.stderr.contains(message), "errorMessage: {}", out.stderr);
    if status == 429 {
        assert!(out.stderr.contains("throttled"), "{}", out.stderr);
    }
    assert!(d.identity().is_none());
    d.check_state_files();
    // A later run (fault consumed) succeeds.
    let out = d.provision(&config);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_provisioned(&d);
    d.assert_no_secrets();
}

#[test]
fn every_rejected_reply_exits_3_naming_step_and_message() {
    rejected_at(
        Step::CreateCertificateFromCsr,
        400,
        "InvalidCSR",
        "The CSR could not be parsed",
        "CreateCertificateFromCsr",
    );
    rejected_at(
        Step::CreateCertificateFromCsr,
        403,
        "AccessDeniedException",
        "Not authorized to create certificates",
        "CreateCertificateFromCsr",
    );
    rejected_at(
        Step::CreateCertificateFromCsr,
        429,
        "ThrottlingException",
        "Rate exceeded",
        "CreateCertificateFromCsr",
    );
    rejected_at(
        Step::RegisterThing,
        400,
        "InvalidParameters",
        "Missing required parameter SerialNumber.",
        "RegisterThing",
    );
    rejected_at(
        Step::RegisterThing,
        404,
        "ResourceNotFoundException",
        "Template GatewayFleetTemplate not found",
        "RegisterThing",
    );
    rejected_at(
        Step::RegisterThing,
        400,
        "InvalidCertificateOwnershipToken",
        "Certificate ownership token cannot be empty.",
        "RegisterThing",
    );
}

#[test]
fn the_template_enforces_its_parameters() {
    // The registry's own check (no fault): parameters without SerialNumber.
    let d = DeviceEnv::new();
    let config = d.config("", "");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(&format!("SerialNumber = \"{SERIAL}\""), "Serial = \"x\"");
    std::fs::write(&config, text).unwrap();
    let out = d.provision(&config);
    assert_eq!(out.code, 3, "{}", out.stderr);
    assert!(out.stderr.contains("InvalidParameters"), "{}", out.stderr);
    assert!(out.stderr.contains("SerialNumber"), "{}", out.stderr);
    assert!(d.identity().is_none());
}

/// A publish the policy denies is dropped: exit 4, naming the topic and the policy action.
fn denied(topic: &str) {
    let d = DeviceEnv::with_options(FakeIotOptions {
        deny: vec![topic.to_owned()],
        ..FakeIotOptions::default()
    });
    let config = d.config("", "");
    let out = d.provision(&config);
    assert_eq!(out.code, 4, "{}", out.stderr);
    assert!(out.stderr.contains(topic), "topic named: {}", out.stderr);
    assert!(
        out.stderr.contains("iot:Publish"),
        "policy action: {}",
        out.stderr
    );
    assert!(d.identity().is_none());
    d.check_state_files();
}

#[test]
fn a_denied_publish_times_out_naming_the_topic() {
    denied(CSR_TOPIC);
    denied(&provision_topic(FLEET_TEMPLATE));
}

#[test]
fn the_broker_closing_mid_flow_exits_4_and_a_rerun_succeeds() {
    let mut d = DeviceEnv::new();
    let config = d.config("", "");
    // The first CSR gets no reply; the broker dies while the agent waits for it.
    d.registry
        .push_fault(Step::CreateCertificateFromCsr, StepFault::Drop);
    let mut child = Command::new(iotcred_bin())
        .args(["provision", "--config", &config.display().to_string()])
        .env_remove("IOTCRED_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(
        d.registry.wait_counters(LIMIT, |c| c.csr_requests >= 1),
        "the agent sent its CSR"
    );
    d.iot.kill_broker();
    let status = poll(LIMIT, || child.try_wait().ok().flatten()).expect("provision exits");
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    d.env.keep_log(stderr.clone());
    assert_eq!(status.code(), Some(4), "{stderr}");
    assert!(d.identity().is_none());
    d.check_state_files();
    d.iot.restart_broker().unwrap();
    let out = d.provision(&config);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_provisioned(&d);
    d.assert_no_secrets();
}

#[test]
fn an_expired_token_makes_the_rerun_request_a_new_certificate() {
    let d = DeviceEnv::new();
    let config = d.config("", "");
    // Run 1: certificate and token saved, RegisterThing unanswered (exit 4).
    d.registry.push_fault(Step::RegisterThing, StepFault::Drop);
    let out = d.provision(&config);
    assert_eq!(out.code, 4, "{}", out.stderr);
    assert_eq!(d.registry.counters().csr_accepted, 1);
    // The token expires in the cloud before the re-run.
    d.registry.expire_tokens();
    // Run 2: RegisterThing is rejected (InvalidCertificateOwnershipToken); the agent goes back
    // to step 2 (same key, new CSR) and finishes.
    let out = d.provision(&config);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let c = d.registry.counters();
    assert_eq!(c.csr_accepted, 2, "a new certificate was requested");
    let certs = d.registry.certificates();
    assert_eq!(certs[0].csr_public_key, certs[1].csr_public_key, "same key");
    let id = assert_provisioned(&d);
    assert_eq!(
        id.certificate_id.as_deref().unwrap_or(&certs[1].id),
        certs[1].id
    );
    assert_eq!(
        d.registry.certificate(&certs[0].id).unwrap().status,
        CertStatus::PendingActivation
    );
    d.assert_no_secrets();
}

#[test]
fn a_certificate_for_another_key_is_refused() {
    // Asserted exit code: 4. SPEC §5 puts "protocol error" under 4 (transient), and a reply
    // that does not match the request is one: nothing was rejected by AWS (3), and a new try
    // (new CSR) can succeed.
    let d = DeviceEnv::new();
    d.registry.set_wrong_public_key(true);
    let config = d.config("", "");
    let out = d.provision(&config);
    assert_eq!(out.code, 4, "{}", out.stderr);
    assert!(
        out.stderr.to_lowercase().contains("public key"),
        "{}",
        out.stderr
    );
    assert!(d.identity().is_none(), "nothing written as identity");
    assert_eq!(
        d.registry.counters().register_requests,
        0,
        "no RegisterThing"
    );
    d.check_state_files();
    d.registry.set_wrong_public_key(false);
    let out = d.provision(&config);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_provisioned(&d);
}

/// splitmix64: a seeded, dependency-free generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[test]
fn sigkill_at_random_moments_then_one_clean_run() {
    const RUNS: usize = 100;
    let seed = std::env::var("IOTCRED_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("crash test seed: {seed} (IOTCRED_SEED={seed} repeats it)");
    let mut rng = Rng(seed);

    // A clean run's duration, measured once on this machine, on a separate device.
    let clean = {
        let m = DeviceEnv::new();
        let config = m.config("", "");
        let t = Instant::now();
        let out = m.provision(&config);
        assert_eq!(out.code, 0, "{}", out.stderr);
        t.elapsed()
    };
    println!("clean provisioning run: {clean:?}");

    let d = DeviceEnv::new();
    let config = d.config("", "");
    let mut runs_with_a_csr = 0u64;
    for i in 0..RUNS {
        let before = d.registry.counters().csr_requests;
        let delay = Duration::from_nanos(rng.next() % (clean.as_nanos() as u64 + 1));
        let log = d.env.path().join(format!("killed-{i}.log"));
        let mut child = Command::new(iotcred_bin())
            .args(["provision", "--config", &config.display().to_string()])
            .env_remove("IOTCRED_CONFIG")
            .env("IOTCRED_LOG", "trace")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        // The kill moment is the random variable here, not a synchronisation.
        std::thread::sleep(delay);
        let _ = child.kill();
        let _ = child.wait();
        d.env
            .keep_log(std::fs::read_to_string(&log).unwrap_or_default());
        if d.registry.counters().csr_requests > before {
            runs_with_a_csr += 1;
        }
        // Whatever the moment, the state on disk is never partial.
        d.check_state_files();
        if let Some(id) = d.identity() {
            // Once identity.toml exists, it is complete and valid.
            assert_eq!(id.thing_name, THING_NAME);
        }
    }
    let t = Instant::now();
    let out = d.provision(&config);
    assert_eq!(out.code, 0, "clean run: {}", out.stderr);
    assert!(t.elapsed() < LIMIT);

    // Exactly one working identity.
    let files = d.check_state_files();
    assert_eq!(
        files
            .iter()
            .filter(|f| f.ends_with("identity.toml"))
            .count(),
        1
    );
    assert_provisioned(&d);
    assert!(!d.state_dir().join("provision.toml").exists());
    // The same key for every request: a key left by an interrupted run was reused.
    let certs = d.registry.certificates();
    assert!(
        certs
            .iter()
            .all(|c| c.csr_public_key == certs[0].csr_public_key),
        "one device key across all runs"
    );
    // Certificates requested ≤ runs that sent a CSR (seen from outside: the counter rose while
    // the run lived) + the clean run.
    let total = d.registry.counters().csr_requests;
    println!("CSR requests: {total}; killed runs that sent one: {runs_with_a_csr}");
    assert!(
        total <= runs_with_a_csr + 1,
        "{total} requests for {runs_with_a_csr} killed runs that sent one + 1"
    );
    assert!(total <= RUNS as u64 + 1, "at most one request per run");
    d.assert_no_secrets();
}

#[test]
fn dry_run_checks_the_connection_and_sends_nothing() {
    let d = DeviceEnv::new();
    let config = d.config("", "");
    let out = d.env.run(&[
        "provision",
        "--config",
        &config.display().to_string(),
        "--dry-run",
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("dry run"), "{}", out.stdout);
    assert!(out.stdout.contains("MQTT connection"), "{}", out.stdout);
    assert_eq!(d.registry.counters().csr_requests, 0, "nothing sent");
    assert!(d.identity().is_none());
    // A claim key that does not match its certificate is a configuration error (2), found
    // before any connection.
    let wrong = d.env.pki.device_ec.key.display().to_string();
    let claim = d.iot.claim.key.display().to_string();
    let bad = config.with_file_name("wrong-claim-key.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&bad, text.replace(&claim, &wrong)).unwrap();
    let out = d.env.run(&[
        "provision",
        "--config",
        &bad.display().to_string(),
        "--dry-run",
    ]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("claim"), "{}", out.stderr);
}

#[test]
fn check_says_where_the_identity_comes_from() {
    let d = DeviceEnv::new();
    let config = d.config("", "");
    let c = config.display().to_string();
    let out = d.env.run(&["check", "--config", &c]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("not provisioned"), "{}", out.stdout);
    assert!(out.stdout.contains("claim certificate"), "{}", out.stdout);
    assert_eq!(d.provision(&config).code, 0);
    let out = d.env.run(&["check", "--config", &c]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    for part in ["thing_name", "certificate", "key"] {
        let line = out
            .stdout
            .lines()
            .find(|l| l.starts_with(&format!("{part}:")))
            .unwrap_or_else(|| panic!("no {part} line: {}", out.stdout));
        assert!(line.contains("identity.toml"), "{line}");
    }
    assert!(out.stdout.contains("rotation: off"), "{}", out.stdout);
}

/// `iotcred run` on a device with no identity serves 503 and says "not provisioned" until
/// provisioning succeeds; `iotcred provision` then goes through the running agent, which
/// switches to the new identity with no restart.
#[test]
fn run_without_an_identity_serves_503_then_provisions_through_the_agent() {
    let d = DeviceEnv::new();
    // The agent's own first try is rejected (a rejection waits long before the next try).
    d.registry.push_fault(
        Step::CreateCertificateFromCsr,
        StepFault::reject(400, "InvalidCSR", "the CSR is refused for this test"),
    );
    let config = d.config("", "");
    let mut agent = d.env.start_agent(&config);
    assert!(
        agent.wait_ready(LIMIT),
        "READY=1 while not provisioned (systemd must not time the start out): {}",
        agent.log()
    );
    let socket = d.env.socket();
    let failed = poll(LIMIT, || {
        let (status, h) = hostile::health(&socket).ok()?;
        (h["identity"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("InvalidCSR")))
        .then_some((status, h))
    });
    let (status, h) = failed.unwrap_or_else(|| panic!("no failed try: {}", agent.log()));
    assert_eq!(status, 503, "{h}");
    assert_eq!(h["identity"]["state"], "not provisioned", "{h}");
    let r = hostile::unix_get(&socket, "/v1/credentials").unwrap();
    assert_eq!(r.status, 503, "{}", r.body);
    let m = hostile::metric(&socket, "iotcred_provisioning_total{result=\"failure\"}").unwrap();
    assert_eq!(m, 1.0);
    // Through the agent (its socket answers): the job runs there, and it switches at once.
    let out = d.provision(&config);
    assert_eq!(out.code, 0, "{}\n{}", out.stderr, agent.log());
    assert!(out.stdout.contains(THING_NAME), "{}", out.stdout);
    assert!(
        agent.log().contains("provisioned: thing"),
        "the agent ran the job: {}",
        agent.log()
    );
    assert_provisioned(&d);
    let served = poll(LIMIT, || {
        let r = hostile::unix_get(&socket, "/v1/credentials").ok()?;
        (r.status == 200).then_some(())
    });
    assert!(
        served.is_some(),
        "no credentials after provisioning: {}",
        agent.log()
    );
    let (_, h) = hostile::health(&socket).unwrap();
    assert_eq!(h["identity"]["state"], "provisioned", "{h}");
    assert_eq!(h["identity"]["thing_name"], THING_NAME, "{h}");
    assert!(h["identity"]["certificate_expiration"].is_string(), "{h}");
    agent.stop(&d.env);
    d.assert_no_secrets();
}

/// With no start-up jitter and nothing in the way, the agent provisions itself.
#[test]
fn run_provisions_by_itself() {
    let d = DeviceEnv::new();
    let config = d.config("", "");
    let mut agent = d.env.start_agent(&config);
    assert!(agent.wait_ready(LIMIT), "{}", agent.log());
    let socket = d.env.socket();
    let served = poll(LIMIT, || {
        let r = hostile::unix_get(&socket, "/v1/credentials").ok()?;
        (r.status == 200).then_some(())
    });
    assert!(served.is_some(), "no credentials: {}", agent.log());
    assert_provisioned(&d);
    let m = hostile::metric(&socket, "iotcred_provisioning_total{result=\"success\"}").unwrap();
    assert_eq!(m, 1.0);
    agent.stop(&d.env);
}
