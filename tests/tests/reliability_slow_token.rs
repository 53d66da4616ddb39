//! Reliability: a slow token delays refreshes, never serving.
//!
//! rustls asks the device key for its signature synchronously, in the middle of the TLS
//! handshake. The key is reached through `libiotcred_p11_unplug.so` (`tests/p11-unplug`)
//! wrapped around SoftHSM2, whose `C_Sign` waits at a gate the test holds closed: a token that
//! takes as long as the test wants. The agent has two async worker threads, so the test makes
//! two signatures wait at once: two roles asked for at the same time in `on-demand` mode, each
//! refresh a full handshake (the provider keeps no connection open and resumes no session). One
//! handshake waits in `C_Sign` (the module logs it), the other for the key's session.
//!
//! While both wait, the agent must answer `/v1/health`, `/v1/credentials` (the credentials of
//! the role fetched before the gate closed) and `/v1/metrics`. An agent that ran token calls on
//! its async workers answers nothing until the gate opens: every request below would time out.
//! Once the gate opens both roles get their credentials.

use std::thread;
use std::time::Duration;

use iotcred_tests::agent::{Env, poll};
use iotcred_tests::hostile;
use iotcred_tests::p11unplug::Unplug;
use iotcred_tests::softhsm::SoftHsm;

const PIN: &str = "pin-5520-9137-secret";
const SO_PIN: &str = "so-pin-4471";

#[test]
fn a_slow_token_never_delays_serving() {
    let mut env = Env::with_provider(|c| {
        c.aliases = vec!["GatewayRole".into(), "RoleB".into(), "RoleC".into()];
        c.keep_alive = false;
        c.resumption = false;
    });
    let hsm =
        SoftHsm::with_device_key(&env.pki.device_ec.key, PIN, SO_PIN).expect("SoftHSM fixture");
    env.env("SOFTHSM2_CONF", &hsm.conf_path().display().to_string());
    let token = Unplug::new(hsm.dir()).expect("token module");
    for (k, v) in token.env() {
        env.env(&k, &v);
    }
    let pin_file = hsm.write_pin_file("pin", PIN).unwrap();
    let uri = format!(
        "pkcs11:token=iotcred;object=device?module-path={}&pin-source=file:{}",
        token.module().display(),
        pin_file.display()
    );
    let roles = "[[role]]\nname = \"default\"\nrole_alias = \"GatewayRole\"\n\
                 [[role]]\nname = \"b\"\nrole_alias = \"RoleB\"\n\
                 [[role]]\nname = \"c\"\nrole_alias = \"RoleC\"\n";
    let cfg = env.config_with(
        &env.pki.device_ec.cert,
        &uri,
        "[refresh]\nmode = \"on-demand\"\nmax_backoff_seconds = 2\n",
        roles,
    );
    let mut agent = env.start_agent(&cfg);
    assert!(
        agent.wait_ready(Duration::from_secs(30)),
        "no READY=1:\n{}",
        agent.log()
    );
    let socket = env.socket();

    // The default role's credentials, fetched with the gate open.
    let first = hostile::unix_get(&socket, "/v1/credentials").expect("GET /v1/credentials");
    assert_eq!(first.status, 200, "{}\n{}", first.body, agent.log());
    let held = first.json()["AccessKeyId"].as_str().unwrap().to_owned();
    let connections = env.provider.stats().connections;

    // Close the gate and ask for the two other roles at once: two handshakes, two signatures.
    let mut gate = token.hold_signatures();
    let askers: Vec<_> = ["/v1/credentials/b", "/v1/credentials/c"]
        .into_iter()
        .map(|target| {
            let socket = socket.clone();
            thread::spawn(move || hostile::unix_get(&socket, target).map(|r| r.status))
        })
        .collect();
    poll(Duration::from_secs(30), || {
        (token.signatures_held() >= 1 && env.provider.stats().connections >= connections + 2)
            .then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "the two refreshes did not reach the token: {:?}\n{}",
            token.calls(),
            agent.log()
        )
    });

    // Both signatures wait (one in C_Sign, one for the key's session): the agent serves.
    for round in 0..3 {
        let health = hostile::unix_get(&socket, "/v1/health").unwrap_or_else(|e| {
            panic!(
                "round {round}: /v1/health not answered while the token signs: {e}\n{}",
                agent.log()
            )
        });
        // b and c are being fetched: unhealthy, and saying so.
        assert_eq!(health.status, 503, "{}", health.body);
        let roles = health.json()["roles"].clone();
        assert_eq!(roles[0]["name"], "default", "{roles}");
        assert_eq!(roles[0]["healthy"], true, "{roles}");

        let creds = hostile::unix_get(&socket, "/v1/credentials").unwrap_or_else(|e| {
            panic!(
                "round {round}: /v1/credentials not answered while the token signs: {e}\n{}",
                agent.log()
            )
        });
        assert_eq!(creds.status, 200, "{}", creds.body);
        assert_eq!(creds.json()["AccessKeyId"], held.as_str());

        let metrics = hostile::unix_get(&socket, "/v1/metrics").unwrap_or_else(|e| {
            panic!(
                "round {round}: /v1/metrics not answered while the token signs: {e}\n{}",
                agent.log()
            )
        });
        assert_eq!(metrics.status, 200, "{}", metrics.body);
    }
    // Still held: nothing above waited for the token.
    assert_eq!(token.signatures_held(), 1, "{:?}", token.calls());

    // Open the gate: both roles get credentials (a refresh that outlived its timeout while
    // waiting is retried).
    gate.release();
    for asker in askers {
        // 200, or 503 when the wait outlasted the agent's request wait; either way answered.
        let status = asker
            .join()
            .unwrap()
            .expect("the waiting request was answered");
        assert!(status == 200 || status == 503, "{status}");
    }
    for role in ["b", "c"] {
        let target = format!("/v1/credentials/{role}");
        poll(Duration::from_secs(30), || {
            let r = hostile::unix_get(&socket, &target).ok()?;
            (r.status == 200).then_some(())
        })
        .unwrap_or_else(|| {
            panic!(
                "{role}: no credentials after the gate opened:\n{}",
                agent.log()
            )
        });
    }
    let (code, _log) = agent.stop(&env);
    assert_eq!(code, Some(0));
    env.assert_no_secrets(&[PIN]);
}
