//! Reliability: crash consistency of the file sinks. The agent is SIGKILLed at random moments
//! of its start-up (fetch, then every sink rewritten: temp file, fsync, rename, directory
//! fsync); after every kill each sink is absent (never written yet) or complete, parseable and
//! of its configured mode, no temporary file is visible under a sink's name, and temporary
//! files left by a kill are cleaned up by the next start. A final start serves again.
//!
//! `IOTCRED_CRASH_KILLS` sets the number of kills (default 50; tests/bench/reliability/crash.sh
//! runs 1000).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use iotcred_tests::agent::{Env, poll};
use iotcred_tests::hostile;

const SINKS: [(&str, &str, u32); 4] = [
    ("credentials", "ini", 0o640),
    ("creds.json", "json", 0o600),
    ("creds.process.json", "credential-process", 0o644),
    ("creds.env", "env", 0o600),
];

fn sinks(dir: &Path) -> String {
    let mut s = String::from("[[role]]\nname = \"default\"\nrole_alias = \"GatewayRole\"\n");
    for (name, format, mode) in SINKS {
        s.push_str(&format!(
            "  [[role.file]]\n  path = \"{}\"\n  format = \"{format}\"\n  mode = \"{mode:04o}\"\n",
            dir.join(name).display()
        ));
    }
    s
}

/// Checks every sink in `dir`; returns the access key ids found.
fn check_sinks(dir: &Path, known: &[String]) -> Vec<String> {
    let mut keys = Vec::new();
    for (name, format, mode) in SINKS {
        let p = dir.join(name);
        let Ok(text) = std::fs::read_to_string(&p) else {
            continue;
        };
        let m = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(m, mode, "{name}: mode {m:o}");
        let key = match format {
            "ini" => {
                assert!(text.starts_with("[default]\n"), "{name}: {text:?}");
                for k in [
                    "aws_access_key_id = ",
                    "aws_secret_access_key = ",
                    "aws_session_token = ",
                ] {
                    assert!(text.contains(k), "{name}: incomplete: {text:?}");
                }
                assert!(text.ends_with('\n'), "{name}: truncated: {text:?}");
                text.lines()
                    .find_map(|l| l.strip_prefix("aws_access_key_id = "))
                    .unwrap()
                    .to_string()
            }
            "json" | "credential-process" => {
                let v: serde_json::Value = serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("{name}: not JSON ({e}): {text:?}"));
                let tok = if format == "json" {
                    "Token"
                } else {
                    "SessionToken"
                };
                assert!(v[tok].as_str().is_some_and(|s| !s.is_empty()), "{name}");
                assert!(
                    v["Expiration"].as_str().is_some_and(|s| s.ends_with('Z')),
                    "{name}"
                );
                v["AccessKeyId"].as_str().unwrap().to_string()
            }
            _ => {
                for k in [
                    "AWS_ACCESS_KEY_ID=",
                    "AWS_SECRET_ACCESS_KEY=",
                    "AWS_SESSION_TOKEN=",
                ] {
                    assert!(text.contains(k), "{name}: incomplete: {text:?}");
                }
                assert!(text.ends_with('\n'), "{name}: truncated: {text:?}");
                text.lines()
                    .find_map(|l| l.strip_prefix("export AWS_ACCESS_KEY_ID="))
                    .unwrap()
                    .to_string()
            }
        };
        assert!(known.contains(&key), "{name}: unknown key {key}");
        keys.push(key);
    }
    keys
}

fn temp_files(dir: &Path) -> usize {
    hostile::file_names(dir)
        .iter()
        .filter(|n| n.ends_with(".tmp"))
        .count()
}

/// xorshift, seeded from the clock: random kill moments (the seed is printed for replay).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn sigkill_during_refresh_and_write_never_leaves_a_broken_sink() {
    let kills: usize = std::env::var("IOTCRED_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let env = Env::new();
    let dir = env.runtime_dir();
    let k = env.pki.device_ec.key.display().to_string();
    let cfg = env.config_with(&env.pki.device_ec.cert, &k, "", &sinks(&dir));

    // One full start to learn how long a start-up (fetch + writes) takes here (the binary is
    // built first, so the build is not counted).
    let _ = iotcred_tests::agent::iotcred_bin();
    let t = Instant::now();
    let mut agent = env.start_agent(&cfg);
    assert!(agent.wait_ready(Duration::from_secs(30)), "{}", agent.log());
    let ready = t.elapsed();
    agent.signal(libc::SIGKILL);
    drop(agent);

    let seed = std::env::var("IOTCRED_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    let mut rng = Rng(seed);
    let window_us = (ready.as_micros() as u64 * 3 / 2).clamp(1000, 3_000_000);
    let mut max_temps = 0;
    let mut mid_write = 0;
    for i in 0..kills {
        let mut agent = env.start_agent(&cfg);
        let delay = Duration::from_micros(rng.next() % window_us);
        // The random kill moment (not a synchronisation: any moment is a valid test).
        std::thread::sleep(delay);
        agent.signal(libc::SIGKILL);
        let pid = agent.pid();
        assert!(
            poll(Duration::from_secs(10), || agent.exited().then_some(())).is_some(),
            "kill {i}: pid {pid} still running"
        );
        let known: Vec<String> = env
            .provider
            .issued()
            .into_iter()
            .map(|c| c.access_key_id)
            .collect();
        let keys = check_sinks(&dir, &known);
        if keys.windows(2).any(|w| w[0] != w[1]) {
            // Killed between two sinks' renames: each file is still whole.
            mid_write += 1;
        }
        max_temps = max_temps.max(temp_files(&dir));
        drop(agent);
    }

    // A restart serves again, and cleans up what the kills left behind.
    let mut agent = env.start_agent(&cfg);
    assert!(agent.wait_ready(Duration::from_secs(30)), "{}", agent.log());
    let last = env.provider.last_issued().unwrap().access_key_id;
    let keys = check_sinks(&dir, std::slice::from_ref(&last));
    assert_eq!(keys.len(), SINKS.len());
    let r = hostile::unix_get(&env.socket(), "/v1/credentials").unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["AccessKeyId"], last.as_str());
    assert_eq!(
        temp_files(&dir),
        0,
        "stale temp files: {:?}",
        hostile::file_names(&dir)
    );
    let (code, _) = agent.stop(&env);
    assert_eq!(code, Some(0));
    eprintln!(
        "crash: {kills} kills (seed {seed}, window {window_us} µs, start-up {ready:?}), {} fetches, {mid_write} kills between two sinks' renames, up to {max_temps} temp files left by a kill",
        env.provider.stats().issued
    );
    env.assert_no_secrets(&[]);
}
