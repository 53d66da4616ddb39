//! Real, unmodified AWS SDKs consume credentials from `iotcred run`, configured only through
//! environment variables or an AWS config file: botocore (PyPI) and the AWS SDK for JavaScript
//! v3 (npm), installed into `tests/.deps` by `tests/install-deps.sh`, and the AWS SDK for Rust
//! (`aws-config` from crates.io, built from `tests/sdk-rust`, its own workspace).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use iotcred_tests::agent::{Env, iotcred_bin, poll};

const LIMIT: Duration = Duration::from_secs(30);

fn deps() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(".deps")
}

fn consumers() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("consumers")
}

/// The aws-config consumer, built on first use (tests/run-all.sh builds it beforehand).
fn rust_sdk_bin() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("sdk-rust");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--locked", "--quiet", "--manifest-path"])
            .arg(dir.join("Cargo.toml"))
            .env_remove("CARGO_TARGET_DIR")
            .status()
            .expect("cargo build of tests/sdk-rust");
        assert!(status.success(), "building the aws-config consumer failed");
        dir.join("target/debug/iotcred-sdk-rust-consumer")
    })
    .clone()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A consumer process speaking one JSON line per request.
struct Consumer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Consumer {
    fn start(mut cmd: Command, env: &[(&str, String)], home: &Path) -> Consumer {
        // Only what we set: no ambient AWS configuration can leak in.
        for (k, _) in std::env::vars() {
            if k.starts_with("AWS_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("HOME", home)
            .env("AWS_CONFIG_FILE", home.join("no-config"))
            .env("AWS_SHARED_CREDENTIALS_FILE", home.join("no-credentials"))
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_REGION", "eu-west-1");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start consumer");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Consumer {
            child,
            stdin,
            stdout,
        }
    }

    fn python(env: &[(&str, String)], home: &Path) -> Consumer {
        let mut cmd = Command::new("python3");
        cmd.arg(consumers().join("botocore_creds.py"))
            .env("PYTHONPATH", deps().join("py"))
            .env("PYTHONDONTWRITEBYTECODE", "1");
        Consumer::start(cmd, env, home)
    }

    fn node(env: &[(&str, String)], home: &Path) -> Consumer {
        // ESM resolves packages from the script's directory upwards: run it beside node_modules.
        let script = deps().join("node").join("js_creds.mjs");
        std::fs::copy(consumers().join("js_creds.mjs"), &script).unwrap();
        let mut cmd = Command::new("node");
        cmd.arg(&script);
        Consumer::start(cmd, env, home)
    }

    fn rust(env: &[(&str, String)], home: &Path) -> Consumer {
        Consumer::start(Command::new(rust_sdk_bin()), env, home)
    }

    fn read(&mut self) -> serde_json::Value {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        serde_json::from_str(line.trim())
            .unwrap_or_else(|e| panic!("consumer printed {line:?}: {e}"))
    }

    fn again(&mut self) -> serde_json::Value {
        self.stdin.write_all(b"again\n").unwrap();
        self.stdin.flush().unwrap();
        self.read()
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent_env(env: &Env, port: u16, role: &str) -> Vec<(&'static str, String)> {
    vec![
        (
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            format!("http://127.0.0.1:{port}/v1/credentials/{role}"),
        ),
        (
            "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
            env.runtime_dir()
                .join(format!("{role}.token"))
                .display()
                .to_string(),
        ),
    ]
}

fn assert_is(v: &serde_json::Value, c: &iotcred_tests::IssuedCredentials) {
    assert_eq!(v["AccessKeyId"], c.access_key_id.as_str(), "{v}");
    assert_eq!(v["SecretAccessKey"], c.secret_access_key.as_str());
    assert_eq!(v["Token"], c.session_token.as_str());
}

fn start(env: &Env, top: &str, roles: &str, port: u16) -> iotcred_tests::agent::Agent {
    let k = env.pki.device_ec.key.display().to_string();
    let cfg = env.config_with(
        &env.pki.device_ec.cert,
        &k,
        top,
        &format!("[serve]\nlisten = \"127.0.0.1:{port}\"\n{roles}"),
    );
    let mut agent = env.start_agent(&cfg);
    assert!(agent.wait_ready(LIMIT), "{}", agent.log());
    agent
}

#[test]
fn botocore_container_provider_and_credential_process() {
    let env = Env::new();
    let port = free_port();
    let agent = start(&env, "", "", port);
    let issued = env.provider.last_issued().unwrap();

    let mut py = Consumer::python(&agent_env(&env, port, "default"), env.path());
    let v = py.read();
    assert_eq!(v["method"], "container-role");
    assert_is(&v, &issued);

    // credential_process in an AWS config file.
    let cfg = env.path().join("aws-config");
    std::fs::write(
        &cfg,
        format!(
            "[profile gw]\ncredential_process = {} credential-process --socket {} --role default\n",
            iotcred_bin().display(),
            env.socket().display()
        ),
    )
    .unwrap();
    let mut py = Consumer::python(
        &[
            ("AWS_CONFIG_FILE", cfg.display().to_string()),
            ("AWS_PROFILE", "gw".into()),
        ],
        env.path(),
    );
    let v = py.read();
    assert_eq!(v["method"], "custom-process");
    assert_is(&v, &issued);
    assert_eq!(
        env.provider.stats().requests,
        1,
        "consumers are served from the agent's cache"
    );
    agent.stop(&env);
    env.assert_no_secrets(&[]);
}

#[test]
fn javascript_sdk_default_chain() {
    let env = Env::new();
    let port = free_port();
    let agent = start(&env, "", "", port);
    let issued = env.provider.last_issued().unwrap();
    let mut js = Consumer::node(&agent_env(&env, port, "default"), env.path());
    let v = js.read();
    assert!(v.get("error").is_none(), "{v}");
    assert_is(&v, &issued);
    let exp = v["Expiration"].as_str().unwrap();
    assert!(exp.ends_with("Z"), "{exp}");
    agent.stop(&env);
}

#[test]
fn two_roles_side_by_side_each_with_its_own_token() {
    let env = Env::with_provider(|c| c.aliases = vec!["GatewayRole".into(), "OtherRole".into()]);
    let port = free_port();
    let roles = "[[role]]\nname = \"a\"\nrole_alias = \"GatewayRole\"\n[[role]]\nname = \"b\"\nrole_alias = \"OtherRole\"\n";
    let agent = start(&env, "", roles, port);
    let issued = env.provider.issued();
    let of = |alias: &str| issued.iter().find(|c| c.alias == alias).unwrap().clone();

    let mut py = Consumer::python(&agent_env(&env, port, "b"), env.path());
    assert_is(&py.read(), &of("OtherRole"));
    let mut js = Consumer::node(&agent_env(&env, port, "a"), env.path());
    assert_is(&js.read(), &of("GatewayRole"));

    // Role a's token does not open role b.
    let mut crossed = agent_env(&env, port, "b");
    crossed[1].1 = env.runtime_dir().join("a.token").display().to_string();
    let mut py = Consumer::python(&crossed, env.path());
    let v = py.read();
    assert!(
        v["error"].as_str().is_some_and(|e| e.contains("401")),
        "role a's token opened role b: {v}"
    );
    agent.stop(&env);
}

#[test]
fn sdks_pick_up_refreshed_credentials() {
    // 66 s credentials refreshed at 33 s; both SDKs see < 15 min left and ask again each time.
    let env = Env::with_provider(|c| c.ttl = Duration::from_secs(66));
    // Build the Rust SDK consumer before the 66 s credentials exist: when it is not built yet
    // (a bare `cargo nextest run`), building it takes longer than the 33 s to the refresh.
    rust_sdk_bin();
    let port = free_port();
    let agent = start(
        &env,
        "[refresh]\nrefresh_before_seconds = 0\njitter_seconds = 0\n",
        "",
        port,
    );
    let first = env.provider.last_issued().unwrap();
    let mut py = Consumer::python(&agent_env(&env, port, "default"), env.path());
    let mut js = Consumer::node(&agent_env(&env, port, "default"), env.path());
    let mut rs = Consumer::rust(&agent_env(&env, port, "default"), env.path());
    assert_is(&py.read(), &first);
    assert_is(&js.read(), &first);
    let v = rs.read();
    assert_is(&v, &first);
    // The Rust SDK exposes the expiration it was given: the agent's clock plus the lifetime left.
    let exp = v["ExpirationUnix"].as_i64().unwrap();
    let now = iotcred_core::UnixTime::now().as_secs();
    assert!(
        exp > now && exp <= now + 66,
        "expiration {exp} vs now {now}"
    );

    assert!(
        env.provider
            .wait_until(|s| s.issued >= 2, Duration::from_secs(90)),
        "agent did not refresh"
    );
    let second = env.provider.issued()[1].clone();
    // Wait until the agent serves the new credentials (it publishes right after the exchange).
    let sock = env.socket().display().to_string();
    poll(LIMIT, || {
        let out = env.run(&["get", "--socket", &sock]);
        out.stdout.contains(&second.access_key_id).then_some(())
    })
    .expect("agent never served the refreshed credentials");
    // botocore refreshes synchronously when < 15 min are left: the next call has them.
    assert_is(&py.again(), &second);
    // The JS SDK refreshes in the background when < 5 min are left and returns the still-valid
    // credentials meanwhile; the Rust SDK's cache refreshes when they are near expiry: a later
    // call has the new ones.
    until_refreshed(&mut js, "JS", &first, &second);
    until_refreshed(&mut rs, "Rust", &first, &second);
    agent.stop(&env);
}

/// Asks `c` again until it hands out `second`; everything it handed out meanwhile must have been
/// `first` (still valid) or `second`.
fn until_refreshed(
    c: &mut Consumer,
    sdk: &str,
    first: &iotcred_tests::IssuedCredentials,
    second: &iotcred_tests::IssuedCredentials,
) {
    let mut seen = Vec::new();
    let got = poll(LIMIT, || {
        let v = c.again();
        seen.push(v["AccessKeyId"].as_str().unwrap_or("").to_string());
        (v["AccessKeyId"] == second.access_key_id.as_str()).then_some(v)
    })
    .unwrap_or_else(|| panic!("the {sdk} SDK never picked up the refresh: {seen:?}"));
    assert_is(&got, second);
    assert!(
        seen.iter()
            .all(|k| *k == first.access_key_id || *k == second.access_key_id),
        "{sdk}: {seen:?}"
    );
}
