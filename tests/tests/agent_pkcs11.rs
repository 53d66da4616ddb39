//! End-to-end: the `iotcred` binary with the device key inside a real PKCS#11 module (SoftHSM2)
//! and a real TPM 2.0 stack (swtpm + tpm2-abrmd + tpm2-pkcs11), over real mTLS.

use std::process::Command;

use iotcred_tests::TlsVersions;
use iotcred_tests::agent::{Env, Output, THING};
use iotcred_tests::softhsm::SoftHsm;
use iotcred_tests::tpm::Tpm;

/// A PIN distinctive enough to search logs for.
const PIN: &str = "pin-7391-5820-secret";
const SO_PIN: &str = "so-pin-2244";

fn fetch(env: &Env, cfg: &std::path::Path) -> Output {
    env.run(&["fetch", "--config", &cfg.display().to_string()])
}

fn assert_fetched(env: &Env, out: &Output) {
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    let issued = env.provider.last_issued().unwrap();
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(v["AccessKeyId"], issued.access_key_id.as_str());
    assert_eq!(v["Token"], issued.session_token.as_str());
    let req = env.provider.requests().pop().unwrap();
    assert_eq!(req.client_cn.as_deref(), Some(THING));
    assert_eq!(req.thing_name.as_deref(), Some(THING));
    assert!(req.user_agent.unwrap().starts_with("iotcred/"));
}

/// A SoftHSM token holding `key_pem`, and the env var the agent needs.
fn softhsm_with(env: &mut Env, rsa: bool) -> (SoftHsm, String) {
    let key_pem = if rsa {
        env.pki.device_rsa.key.clone()
    } else {
        env.pki.device_ec.key.clone()
    };
    let hsm = SoftHsm::with_device_key(&key_pem, PIN, SO_PIN).expect("SoftHSM fixture");
    let pin_file = hsm.write_pin_file("pin", PIN).unwrap();
    env.env("SOFTHSM2_CONF", &hsm.conf_path().display().to_string());
    let uri = hsm.uri("iotcred", "device", &pin_file);
    (hsm, uri)
}

#[test]
fn softhsm_ec_key_tls13_and_tls12() {
    for versions in [TlsVersions::Tls13Only, TlsVersions::Tls12Only] {
        let mut env = Env::with_provider(|c| c.tls_versions = versions);
        let (_hsm, uri) = softhsm_with(&mut env, false);
        let cfg = env.config_with(&env.pki.device_ec.cert, &uri, "", "");
        assert_fetched(&env, &fetch(&env, &cfg));
        let want = if versions == TlsVersions::Tls13Only {
            "TLSv1.3"
        } else {
            "TLSv1.2"
        };
        assert_eq!(env.provider.requests()[0].tls_version, want);
        env.assert_no_secrets(&[PIN]);
    }
}

#[test]
fn softhsm_rsa_key_tls13_and_tls12() {
    for versions in [TlsVersions::Tls13Only, TlsVersions::Tls12Only] {
        let mut env = Env::with_provider(|c| c.tls_versions = versions);
        let (_hsm, uri) = softhsm_with(&mut env, true);
        let cfg = env.config_with(&env.pki.device_rsa.cert, &uri, "", "");
        assert_fetched(&env, &fetch(&env, &cfg));
        env.assert_no_secrets(&[PIN]);
    }
}

#[test]
fn softhsm_pin_value_in_uri_is_never_printed() {
    let mut env = Env::new();
    let (_hsm, _) = softhsm_with(&mut env, false);
    let uri = format!(
        "pkcs11:token=iotcred;object=device?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-value={PIN}"
    );
    let cfg = env.config_with(&env.pki.device_ec.cert, &uri, "", "");
    let out = env.run(&["check", "--config", &cfg.display().to_string(), "--fetch"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(!out.stdout.contains(PIN), "{}", out.stdout);
    env.keep_log(out.stdout);
    env.assert_no_secrets(&[PIN]);
}

#[test]
fn softhsm_wrong_pin_is_a_config_error_without_the_pin() {
    let mut env = Env::new();
    let (hsm, _) = softhsm_with(&mut env, false);
    let wrong = "wrong-pin-8830-secret";
    let pin_file = hsm.write_pin_file("wrong", wrong).unwrap();
    let uri = hsm.uri("iotcred", "device", &pin_file);
    let cfg = env.config_with(&env.pki.device_ec.cert, &uri, "", "");
    let out = fetch(&env, &cfg);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("wrong PIN"), "{}", out.stderr);
    assert_eq!(env.provider.stats().requests, 0);
    env.assert_no_secrets(&[PIN, wrong]);
}

#[test]
fn softhsm_missing_module_and_token_are_config_errors() {
    let mut env = Env::new();
    let (hsm, _) = softhsm_with(&mut env, false);
    let pin_file = hsm.write_pin_file("pin2", PIN).unwrap();
    let uri = format!(
        "pkcs11:token=iotcred;object=device?module-path=/nonexistent/libnope.so&pin-source=file:{}",
        pin_file.display()
    );
    let out = fetch(
        &env,
        &env.config_with(&env.pki.device_ec.cert, &uri, "", ""),
    );
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr.contains("/nonexistent/libnope.so"),
        "{}",
        out.stderr
    );
    let uri = hsm.uri("no-such-token", "device", &pin_file);
    let out = fetch(
        &env,
        &env.config_with(&env.pki.device_ec.cert, &uri, "", ""),
    );
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("no-such-token"), "{}", out.stderr);
}

#[test]
fn softhsm_agent_run_and_get() {
    let mut env = Env::new();
    let (_hsm, uri) = softhsm_with(&mut env, false);
    let cfg = env.config_with(&env.pki.device_ec.cert, &uri, "", "");
    let mut agent = env.start_agent(&cfg);
    assert!(
        agent.wait_ready(std::time::Duration::from_secs(30)),
        "{}",
        agent.log()
    );
    let out = env.run(&["get", "--socket", &env.socket().display().to_string()]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout
            .contains(&env.provider.last_issued().unwrap().access_key_id)
    );
    agent.stop(&env);
    env.assert_no_secrets(&[PIN]);
}

/// keygen in the token → the CSR verifies → the test CA signs it → fetch with that certificate
/// and the token key succeeds; pkcs11-tool shows the key never extractable.
#[test]
fn keygen_in_token_then_fetch() {
    let mut env = Env::new();
    let hsm = SoftHsm::new().expect("SoftHSM fixture");
    hsm.init_token("fleet", PIN, SO_PIN).unwrap();
    let pin_file = hsm.write_pin_file("pin", PIN).unwrap();
    env.env("SOFTHSM2_CONF", &hsm.conf_path().display().to_string());
    let uri = hsm.uri("fleet", "device", &pin_file).replacen(
        "object=device",
        "object=device;id=%a1%b2",
        1,
    );
    let csr = env.path().join("device.csr");
    let out = env.run(&[
        "keygen",
        "--key",
        &uri,
        "--subject",
        &format!("CN={THING},O=Example Fleet"),
        "--csr-out",
        &csr.display().to_string(),
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);

    let verify = Command::new("openssl")
        .args(["req", "-verify", "-noout", "-subject", "-in"])
        .arg(&csr)
        .output()
        .unwrap();
    let verify_out = format!(
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(verify.status.success(), "{verify_out}");
    assert!(verify_out.contains(THING), "{verify_out}");

    // The CA signs the CSR's public key.
    let pubkey = Command::new("openssl")
        .args(["req", "-pubkey", "-noout", "-in"])
        .arg(&csr)
        .output()
        .unwrap();
    assert!(pubkey.status.success());
    let cert = env.path().join("device-from-csr.pem");
    env.pki
        .issue_for_public_key(THING, &pubkey.stdout, &cert)
        .unwrap();
    let cfg = env.config_with(&cert, &uri, "", "");
    assert_fetched(&env, &fetch(&env, &cfg));

    // The key is sensitive and never extractable, as the token reports it.
    let tool = hsm
        .command("pkcs11-tool")
        .args([
            "--module",
            "/usr/lib/softhsm/libsofthsm2.so",
            "--token-label",
            "fleet",
            "--login",
            "--pin",
            PIN,
            "-O",
            "--type",
            "privkey",
        ])
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&tool.stdout);
    assert!(tool.status.success(), "{listing}");
    assert!(listing.contains("sensitive"), "{listing}");
    assert!(listing.contains("never extractable"), "{listing}");

    // A second keygen for the same id is refused unless forced.
    let again = env.run(&["keygen", "--key", &uri, "--subject", "CN=x"]);
    assert_eq!(again.code, 2, "{}", again.stderr);
    assert!(again.stderr.contains("already exists"), "{}", again.stderr);
    env.assert_no_secrets(&[PIN]);
}

#[test]
fn tpm_ec_key_fetch() {
    let mut env = Env::new();
    let tpm = Tpm::start().expect("TPM fixture (swtpm, tpm2-abrmd, tpm2-pkcs11)");
    for (k, v) in tpm.env() {
        env.env(&k, &v.to_string_lossy());
    }
    let cert = env.path().join("tpm-device.pem");
    env.pki
        .issue_for_public_key(THING, tpm.spki(), &cert)
        .unwrap();
    let cfg = env.config_with(&cert, tpm.uri(), "", "");
    assert_fetched(&env, &fetch(&env, &cfg));
}
