//! Reliability: clock faults (libfaketime) and PKCS#11 faults (SoftHSM2, OpenSC's pkcs11-spy).
//!
//! - Wall clock before the certificates' notBefore: `fetch`/`check` exit 2 with one line naming
//!   the clock; `run` logs one line naming the clock, keeps running and starts once the clock
//!   is right (a gateway without RTC boots in 1970 and gets time from NTP later).
//! - PKCS#11: wrong module path, absent token and wrong PIN at `run` start are configuration
//!   errors (exit 2) naming what to fix, with exactly one `C_Login` for the wrong PIN (a token
//!   locks after a few wrong PINs: never retried in a loop), and never the PIN in any output.

use std::path::Path;
use std::time::Duration;

use iotcred_tests::agent::{Env, poll};
use iotcred_tests::hostile;
use iotcred_tests::softhsm::SoftHsm;

const FAKETIME_LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
const SPY: &str = "/usr/lib/x86_64-linux-gnu/pkcs11/pkcs11-spy.so";
const SOFTHSM: &str = "/usr/lib/softhsm/libsofthsm2.so";
const PIN: &str = "pin-5521-0937-secret";
const SO_PIN: &str = "so-pin-7781";

/// Runs every command of `env` under libfaketime, reading the fake time from `file` on every
/// clock call (the monotonic clock is left alone). Returns false when libfaketime is missing.
fn faketime(env: &mut Env, file: &Path, spec: &str) -> bool {
    if !Path::new(FAKETIME_LIB).exists() {
        eprintln!("skipping: {FAKETIME_LIB} missing (Debian package libfaketime)");
        return false;
    }
    std::fs::write(file, spec).unwrap();
    env.env("LD_PRELOAD", FAKETIME_LIB);
    env.env("FAKETIME_TIMESTAMP_FILE", &file.display().to_string());
    env.env("FAKETIME_NO_CACHE", "1");
    env.env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
    true
}

#[test]
fn clock_before_not_before_fetch_and_check_exit_2_naming_the_clock() {
    let mut env = Env::new();
    let file = env.path().join("faketime");
    if !faketime(&mut env, &file, "@2000-01-01 00:00:00") {
        return;
    }
    let cfg = env.config().display().to_string();
    for args in [
        vec!["fetch", "--config", &cfg],
        vec!["check", "--config", &cfg],
    ] {
        let out = env.run(&args);
        assert_eq!(out.code, 2, "{args:?}: {}", out.stderr);
        assert!(out.stderr.contains("clock"), "{args:?}: {}", out.stderr);
        assert!(
            out.stderr.contains("2000-01-01"),
            "{args:?}: {}",
            out.stderr
        );
        assert!(out.stderr.lines().count() <= 2, "{args:?}: {}", out.stderr);
    }
    assert_eq!(env.provider.stats().connections, 0);
    // Once the clock is right, the same commands work.
    std::fs::write(&file, "+0").unwrap();
    let out = env.run(&["fetch", "--config", &cfg]);
    assert_eq!(out.code, 0, "{}", out.stderr);
}

#[test]
fn run_waits_for_the_clock_then_starts() {
    let mut env = Env::new();
    let file = env.path().join("faketime");
    if !faketime(&mut env, &file, "@1970-01-01 00:00:10") {
        return;
    }
    let cfg = env.config();
    let mut agent = env.start_agent(&cfg);
    let waiting = poll(Duration::from_secs(30), || {
        agent.log().contains("waiting for time sync").then_some(())
    });
    assert!(waiting.is_some(), "no clock message:\n{}", agent.log());
    assert!(
        !agent.exited(),
        "run exited instead of waiting:\n{}",
        agent.log()
    );
    assert_eq!(env.provider.stats().connections, 0);
    // NTP arrives.
    std::fs::write(&file, "+0").unwrap();
    assert!(
        agent.wait_ready(Duration::from_secs(30)),
        "no start after the clock was set:\n{}",
        agent.log()
    );
    let r = hostile::unix_get(&env.socket(), "/v1/credentials").unwrap();
    assert_eq!(r.status, 200);
    let (code, log) = agent.stop(&env);
    assert_eq!(code, Some(0));
    assert_eq!(
        log.matches("waiting for time sync").count(),
        1,
        "one line naming the clock:\n{log}"
    );
    assert!(log.contains("system clock"), "{log}");
    env.assert_no_secrets(&[]);
}

fn softhsm(env: &mut Env) -> SoftHsm {
    let hsm =
        SoftHsm::with_device_key(&env.pki.device_ec.key, PIN, SO_PIN).expect("SoftHSM fixture");
    env.env("SOFTHSM2_CONF", &hsm.conf_path().display().to_string());
    hsm
}

#[test]
fn pkcs11_faults_at_run_start_are_clear_and_never_retry_a_wrong_pin() {
    let mut env = Env::new();
    let hsm = softhsm(&mut env);
    let good = hsm.write_pin_file("pin", PIN).unwrap();
    let wrong_pin = "wrong-pin-4410-secret";
    let wrong = hsm.write_pin_file("wrong", wrong_pin).unwrap();
    let spy_log = hsm.dir().join("spy.log");
    env.env("PKCS11SPY", SOFTHSM);
    env.env("PKCS11SPY_OUTPUT", &spy_log.display().to_string());
    let cert = env.pki.device_ec.cert.clone();
    let run = |env: &Env, uri: &str| {
        let cfg = env.config_with(&cert, uri, "", "");
        env.run(&["run", "--config", &cfg.display().to_string()])
    };

    // Wrong module path.
    let out = run(
        &env,
        &format!(
            "pkcs11:token=iotcred;object=device?module-path=/nonexistent/libnope.so&pin-source=file:{}",
            good.display()
        ),
    );
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr.contains("/nonexistent/libnope.so"),
        "{}",
        out.stderr
    );

    // Token absent.
    let out = run(&env, &hsm.uri("no-such-token", "device", &good));
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("no-such-token"), "{}", out.stderr);

    // Wrong PIN, through the spy: exactly one C_Login, then exit 2.
    let _ = std::fs::remove_file(&spy_log);
    let uri = format!(
        "pkcs11:token=iotcred;object=device?module-path={SPY}&pin-source=file:{}",
        wrong.display()
    );
    let out = run(&env, &uri);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("PIN"), "{}", out.stderr);
    let spy = std::fs::read_to_string(&spy_log).unwrap_or_default();
    let logins = spy.lines().filter(|l| l.ends_with("C_Login")).count();
    assert_eq!(logins, 1, "expected exactly one C_Login:\n{spy}");
    assert_eq!(env.provider.stats().connections, 0);

    // The right PIN through the spy: the agent runs, logs in once, serves.
    let _ = std::fs::remove_file(&spy_log);
    let uri = format!(
        "pkcs11:token=iotcred;object=device?module-path={SPY}&pin-source=file:{}",
        good.display()
    );
    let cfg = env.config_with(&cert, &uri, "", "");
    let mut agent = env.start_agent(&cfg);
    assert!(agent.wait_ready(Duration::from_secs(30)), "{}", agent.log());
    let r = hostile::unix_get(&env.socket(), "/v1/credentials").unwrap();
    assert_eq!(r.status, 200);
    let (code, _) = agent.stop(&env);
    assert_eq!(code, Some(0));
    env.assert_no_secrets(&[PIN, wrong_pin]);
}
