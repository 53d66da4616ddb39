//! End-to-end: certificate rotation (SPEC §8.2) with the real binary against the fake AWS IoT:
//! automatic in `iotcred run`, forced with `iotcred rotate --force` (with and without a running
//! agent), failing at each step, and with the key in SoftHSM.
//!

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use iotcred_tests::agent::{Agent, poll};
use iotcred_tests::fakeiot::device::{
    DeviceEnv, HSM_PIN, HSM_TOKEN, THING_NAME, cert_public_key, softhsm_private_keys,
    softhsm_public_key,
};
use iotcred_tests::fakeiot::{CertStatus, Step, StepFault};
use iotcred_tests::hostile;

const LIMIT: Duration = Duration::from_secs(60);
const DAY: i64 = 86_400;

/// Provisions with a certificate valid for `validity_days`, then restores a year's validity
/// for later certificates. Returns the config path.
fn provisioned(
    d: &DeviceEnv,
    provision_extra: &str,
    before_days: u32,
    validity_days: i64,
) -> std::path::PathBuf {
    d.registry.set_certificate_validity(validity_days * DAY);
    let config = d.config(provision_extra, &DeviceEnv::rotation_table(before_days));
    let out = d.provision(&config);
    assert_eq!(out.code, 0, "provision: {}", out.stderr);
    d.registry.set_certificate_validity(365 * DAY);
    config
}

fn start(d: &DeviceEnv, config: &Path) -> Agent {
    let mut agent = d.env.start_agent(config);
    assert!(agent.wait_ready(LIMIT), "agent not ready: {}", agent.log());
    agent
}

/// The health body. Its status may be 503 for a moment after a switch: the roles then refresh
/// with the new identity (inside their refresh window) while they keep serving.
fn health(d: &DeviceEnv) -> serde_json::Value {
    let (status, h) = hostile::health(&d.env.socket()).expect("health");
    assert!(status == 200 || status == 503, "{status}: {h}");
    h
}

fn credentials_status(d: &DeviceEnv) -> u16 {
    hostile::unix_get(&d.env.socket(), "/v1/credentials")
        .map(|r| r.status)
        .unwrap_or(0)
}

/// The registry's id of the certificate identity.toml names.
fn identity_certificate_id(d: &DeviceEnv) -> String {
    let new = d.identity().expect("identity.toml");
    d.registry
        .active_certificates_of(THING_NAME)
        .into_iter()
        .find(|c| c.public_key == cert_public_key(&new.certificate))
        .expect("the identity's certificate is ACTIVE on the thing")
        .id
}

/// A client asking the agent for credentials over its socket, again and again, until stopped.
struct Poller {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<u16>>,
}

impl Poller {
    fn start(d: &DeviceEnv) -> Poller {
        let stop = Arc::new(AtomicBool::new(false));
        let socket = d.env.socket();
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut statuses = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    statuses.push(
                        hostile::unix_get(&socket, "/v1/credentials")
                            .map(|r| r.status)
                            .unwrap_or(0),
                    );
                }
                statuses
            })
        };
        Poller { stop, thread }
    }

    /// Stops it and asserts that it got answers, every one a 200.
    fn assert_all_200(self) {
        self.stop.store(true, Ordering::Relaxed);
        let statuses = self.thread.join().unwrap();
        assert!(!statuses.is_empty());
        assert!(
            statuses.iter().all(|s| *s == 200),
            "a client saw a non-200 answer: {:?}",
            statuses.iter().filter(|s| **s != 200).collect::<Vec<_>>()
        );
    }
}

/// The new identity is a different certificate on the same thing, ACTIVE, made through the
/// rotation template; the old one stays ACTIVE (the agent calls no control-plane API).
fn assert_rotated(d: &DeviceEnv, old: &iotcred_tests::fakeiot::device::Identity) {
    let new = d.identity().expect("identity.toml");
    assert_eq!(new.thing_name, THING_NAME);
    assert_ne!(new.certificate, old.certificate);
    assert_ne!(new.key, old.key, "a new key");
    let active = d.registry.active_certificates_of(THING_NAME);
    assert_eq!(active.len(), 2, "old and new ACTIVE: {active:?}");
    let new_cert = active
        .iter()
        .find(|c| c.public_key == cert_public_key(&new.certificate))
        .expect("new certificate registered");
    let old_cert = active
        .iter()
        .find(|c| c.public_key == cert_public_key(&old.certificate))
        .expect("old certificate registered");
    assert_eq!(old_cert.status, CertStatus::Active);
    assert!(
        d.registry.provider_seen().contains(&new_cert.id),
        "proof exchange with the new certificate"
    );
    d.check_state_files();
    assert!(!d.state_dir().join("rotation.toml").exists());
}

#[test]
fn automatic_rotation_without_a_gap() {
    let d = DeviceEnv::new();
    // Validity 29 days < before_days 30: due as soon as the agent starts.
    let config = provisioned(&d, "", 30, 29);
    let old = d.identity().unwrap();
    let agent = start(&d, &config);
    let old_expiry = health(&d)["identity"]["certificate_expiration"].clone();
    assert!(old_expiry.is_string(), "expiry in health");
    // Clients poll credentials over the socket during the whole rotation.
    let poller = Poller::start(&d);
    let rotated = poll(LIMIT * 2, || {
        let h = health(&d);
        let r = &h["identity"]["rotation"];
        (r["state"] == "idle"
            && !r["last_rotation"].is_null()
            && h["identity"]["certificate_expiration"] != old_expiry)
            .then_some(h)
    });
    poller.assert_all_200();
    let h = rotated.unwrap_or_else(|| panic!("no rotation: {}", agent.log()));
    assert_eq!(h["identity"]["thing_name"], THING_NAME);
    assert_eq!(h["identity"]["rotation"]["failures"], 0);
    let m = hostile::metric(
        &d.env.socket(),
        "iotcred_rotations_total{result=\"success\"}",
    )
    .expect("metric");
    assert!(m >= 1.0);
    agent.stop(&d.env);
    assert_rotated(&d, &old);
    // The old PEM key is destroyed after the switch.
    assert!(
        poll(LIMIT, || (!Path::new(&old.key).exists()).then_some(())).is_some(),
        "old key {} still there",
        old.key
    );
    let regs = d.registry.counters().register_requests;
    assert_eq!(regs, 2, "one provisioning and one rotation RegisterThing");
    d.assert_no_secrets();
}

#[test]
fn forced_rotation_without_an_agent() {
    let d = DeviceEnv::new();
    let config = provisioned(&d, "", 30, 365);
    let old = d.identity().unwrap();
    // Not due: `rotate` without --force sends nothing.
    let before = d.registry.counters();
    let out = d.rotate(&config, false);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(d.registry.counters(), before);
    assert_eq!(d.identity().unwrap(), old);
    // Forced.
    let out = d.rotate(&config, true);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_rotated(&d, &old);
    assert!(!Path::new(&old.key).exists(), "old PEM key destroyed");
    let new = d.identity().unwrap();
    assert_eq!(
        Path::new(&new.key).parent().unwrap(),
        d.state_dir().join("keys")
    );
    // And it serves.
    let agent = start(&d, &config);
    assert_eq!(credentials_status(&d), 200);
    agent.stop(&d.env);
    d.assert_no_secrets();
}

#[test]
fn forced_rotation_through_a_running_agent() {
    let d = DeviceEnv::new();
    let config = provisioned(&d, "", 30, 365);
    let old = d.identity().unwrap();
    let agent = start(&d, &config);
    let out = d.rotate(&config, true);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_rotated(&d, &old);
    let new_id = identity_certificate_id(&d);
    // The running agent follows identity.toml by itself.
    let followed = poll(LIMIT, || {
        (health(&d)["identity"]["certificate_id"] == new_id.as_str()).then_some(())
    });
    assert!(followed.is_some(), "agent did not switch: {}", agent.log());
    assert_eq!(credentials_status(&d), 200);
    agent.stop(&d.env);
    d.assert_no_secrets();
}

/// A rotation done by another process (here `iotcred rotate` with a config whose socket no agent
/// answers on, so it works by itself under the state_dir lock): the running agent notices the new
/// identity.toml by itself (no SIGHUP) and serves with the new certificate, with no gap; the old
/// key is destroyed by the process that rotated.
#[test]
fn the_agent_follows_a_rotation_made_by_another_process() {
    let d = DeviceEnv::new();
    let config = provisioned(&d, "", 30, 365);
    let old = d.identity().unwrap();
    let agent = start(&d, &config);
    let other = config.with_file_name("no-agent.toml");
    let socket = d.env.socket().display().to_string();
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&other, text.replace(&socket, &format!("{socket}.none"))).unwrap();
    let poller = Poller::start(&d);
    // Counted before the rotation: the agent may notice the switch (inotify) and refresh with
    // the new certificate before `rotate` has even exited.
    let requests_before = d.env.provider.requests().len();
    let out = d.rotate(&other, true);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_rotated(&d, &old);
    let new_id = identity_certificate_id(&d);
    // The proof exchange of `rotate`, then the agent's own refresh with the new identity.
    let followed = poll(LIMIT, || {
        let h = health(&d);
        (h["identity"]["certificate_id"] == new_id.as_str()
            && d.env.provider.requests().len() >= requests_before + 2)
            .then_some(())
    });
    poller.assert_all_200();
    assert!(followed.is_some(), "agent did not switch: {}", agent.log());
    assert!(
        agent.log().contains("identity.toml changed"),
        "{}",
        agent.log()
    );
    assert_eq!(credentials_status(&d), 200);
    agent.stop(&d.env);
}

/// Identity jobs over the socket are refused to a peer that is neither root nor the agent's
/// user (SPEC §8), even when the socket's mode lets it connect; GET routes stay open to it.
#[test]
fn identity_jobs_are_refused_to_other_users() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP identity_jobs_are_refused_to_other_users: needs root (setpriv)");
        return;
    }
    let d = DeviceEnv::new();
    let config = provisioned(&d, "", 30, 365);
    // A socket another user can reach: a world-traversable directory, mode 0666.
    let dir = tempfile::Builder::new()
        .prefix("iotcred-sock")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = dir.path().join("agent.sock");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        &format!("socket = \"{}\"", d.env.socket().display()),
        &format!("socket = \"{}\"\nsocket_mode = \"0666\"", socket.display()),
    );
    std::fs::write(&config, text).unwrap();
    let agent = start(&d, &config);
    let before = d.registry.counters();
    let socket_arg = socket.display().to_string();
    let curl = |uid: Option<u32>, method: &str, path: &str| {
        let url = format!("http://localhost{path}");
        hostile::curl_as(uid, &["-X", method, "--unix-socket", &socket_arg, &url])
    };
    let (status, body) = curl(Some(65534), "POST", "/v1/identity/rotate?force=true");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("root or the agent"), "{body}");
    let (status, _) = curl(Some(65534), "GET", "/v1/health");
    assert!(status == 200 || status == 503, "{status}");
    let (status, _) = curl(None, "GET", "/v1/identity/rotate");
    assert_eq!(status, 405);
    let after = d.registry.counters();
    assert_eq!(
        (after.csr_requests, after.register_requests),
        (before.csr_requests, before.register_requests),
        "nothing sent for a refused job"
    );
    // Root may: the job runs in the agent.
    let (status, body) = curl(None, "POST", "/v1/identity/rotate");
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["exit"], 0, "{body}");
    assert!(
        answer["message"].as_str().unwrap().contains("not due"),
        "{body}"
    );
    agent.stop(&d.env);
}

#[test]
fn a_failing_step_leaves_the_old_identity_serving() {
    let d = DeviceEnv::new();
    let config = provisioned(&d, "", 30, 365);
    let agent = start(&d, &config);
    type Setup = fn(&DeviceEnv);
    let failures: [(&str, Setup, Setup); 3] = [
        (
            "CreateCertificateFromCsr rejected",
            |d| {
                d.registry.push_fault(
                    Step::CreateCertificateFromCsr,
                    StepFault::reject(400, "InvalidCSR", "bad CSR"),
                )
            },
            |_| {},
        ),
        (
            "RegisterThing rejected",
            |d| {
                d.registry.push_fault(
                    Step::RegisterThing,
                    StepFault::reject(400, "InvalidParameters", "Thing gw-0042 does not exist."),
                )
            },
            |_| {},
        ),
        (
            "provider 403 on the proof exchange",
            |d| d.registry.freeze_provider(),
            |d| d.registry.unfreeze_provider(),
        ),
    ];
    for (what, arm, disarm) in failures {
        let identity = std::fs::read(d.identity_path()).unwrap();
        let served_id = health(&d)["identity"]["certificate_id"].clone();
        arm(&d);
        let out = d.rotate(&config, true);
        disarm(&d);
        assert_eq!(out.code, 3, "{what}: {}", out.stderr);
        assert_eq!(
            std::fs::read(d.identity_path()).unwrap(),
            identity,
            "{what}: identity.toml changed"
        );
        assert_eq!(
            credentials_status(&d),
            200,
            "{what}: old identity not serving"
        );
        assert_eq!(
            health(&d)["identity"]["certificate_id"],
            served_id,
            "{what}"
        );
        assert!(
            !d.state_dir().join("rotation.toml").exists()
                || std::fs::read_to_string(d.state_dir().join("rotation.toml"))
                    .unwrap()
                    .parse::<toml::Table>()
                    .is_ok()
        );
        d.check_state_files();
        // A later try succeeds.
        let old = d.identity().unwrap();
        let out = d.rotate(&config, true);
        assert_eq!(out.code, 0, "{what}, retry: {}", out.stderr);
        assert_ne!(d.identity().unwrap().certificate, old.certificate);
        assert_eq!(credentials_status(&d), 200);
    }
    let h = health(&d);
    assert!(h["identity"]["rotation"]["state"] == "idle", "{h}");
    agent.stop(&d.env);
    d.assert_no_secrets();
}

#[test]
fn rotation_with_the_key_in_softhsm_destroys_the_old_key_object() {
    let mut d = DeviceEnv::new();
    let (hsm, uri) = d.softhsm_key();
    let config = provisioned(&d, &format!("key = \"{uri}\""), 30, 365);
    let old = d.identity().unwrap();
    let keys = softhsm_private_keys(&hsm, HSM_TOKEN, HSM_PIN);
    assert_eq!(keys.len(), 1, "{keys:?}");
    let old_id = keys[0].id.clone();

    let out = d.rotate(&config, true);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let new = d.identity().unwrap();
    assert!(
        new.key.starts_with("pkcs11:") && new.key.contains("id="),
        "{}",
        new.key
    );
    let keys = softhsm_private_keys(&hsm, HSM_TOKEN, HSM_PIN);
    assert_eq!(keys.len(), 1, "old key object destroyed: {keys:?}");
    assert_eq!(keys[0].label, "device", "same label");
    assert_ne!(keys[0].id, old_id, "new CKA_ID");
    assert!(keys[0].access.contains("never extractable"), "{keys:?}");
    assert_eq!(
        cert_public_key(&new.certificate),
        softhsm_public_key(&hsm, HSM_TOKEN, HSM_PIN, &keys[0].id)
    );
    assert_ne!(new.certificate, old.certificate);
    assert!(
        d.registry
            .certificates()
            .iter()
            .any(|c| c.thing.as_deref() == Some(THING_NAME) && c.status == CertStatus::Active)
    );
    let agent = start(&d, &config);
    assert_eq!(credentials_status(&d), 200);
    agent.stop(&d.env);
    d.assert_no_secrets();
}
