//! Real, unmodified SDKs against the IMDSv2-compatible endpoint (SPEC §4.4) and, for the Go
//! SDK, the §4.1 TCP endpoint: botocore's instance-metadata provider (PyPI, in `tests/.deps`)
//! through `AWS_EC2_METADATA_SERVICE_ENDPOINT`, and the AWS SDK for Go v2 from Debian's
//! packages (`ec2rolecreds`, `endpointcreds`), built in GOPATH mode by the test run.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use iotcred_tests::IssuedCredentials;
use iotcred_tests::agent::{Agent, Env};

const LIMIT: Duration = Duration::from_secs(30);
/// Debian's Go packages live here (GOPATH mode).
const DEBIAN_GOPATH: &str = "/usr/share/gocode";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start(env: &Env) -> (Agent, u16, u16) {
    let (tcp, imds) = (free_port(), free_port());
    let k = env.pki.device_ec.key.display().to_string();
    let cfg = env.config_with(
        &env.pki.device_ec.cert,
        &k,
        "",
        &format!(
            "[serve]\nlisten = \"127.0.0.1:{tcp}\"\n[serve.imds]\nlisten = \"127.0.0.1:{imds}\"\nrole = \"default\"\nregion = \"eu-west-1\"\n"
        ),
    );
    let mut agent = env.start_agent(&cfg);
    assert!(agent.wait_ready(LIMIT), "{}", agent.log());
    (agent, tcp, imds)
}

/// Runs a consumer with only the AWS variables given (nothing ambient), stdin closed; parses
/// its one JSON line.
fn run_consumer(mut cmd: Command, env: &[(&str, String)], home: &Path) -> serde_json::Value {
    for (k, _) in std::env::vars() {
        if k.starts_with("AWS_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("HOME", home)
        .env("AWS_CONFIG_FILE", home.join("no-config"))
        .env("AWS_SHARED_CREDENTIALS_FILE", home.join("no-credentials"))
        .env("AWS_REGION", "eu-west-1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("start consumer");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().next().unwrap_or("");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("consumer printed {text:?}: {e}"))
}

fn assert_is(v: &serde_json::Value, c: &IssuedCredentials) {
    assert!(v.get("error").is_none(), "{v}");
    assert_eq!(v["AccessKeyId"], c.access_key_id.as_str(), "{v}");
    assert_eq!(v["SecretAccessKey"], c.secret_access_key.as_str());
    assert_eq!(v["Token"], c.session_token.as_str());
}

fn tests_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn botocore_instance_metadata_provider() {
    let env = Env::new();
    let (agent, _, imds) = start(&env);
    let issued = env.provider.last_issued().unwrap();
    let mut cmd = Command::new("python3");
    cmd.arg(tests_dir().join("consumers/botocore_creds.py"))
        .env("PYTHONPATH", tests_dir().join(".deps/py"))
        .env("PYTHONDONTWRITEBYTECODE", "1");
    let v = run_consumer(
        cmd,
        &[
            (
                "AWS_EC2_METADATA_SERVICE_ENDPOINT",
                format!("http://127.0.0.1:{imds}/"),
            ),
            ("AWS_EC2_METADATA_DISABLED", "false".into()),
        ],
        env.path(),
    );
    assert_eq!(v["method"], "iam-role", "{v}");
    assert_is(&v, &issued);
    agent.stop(&env);
}

/// The Go consumer (tests/consumers/go), built once per test run into
/// `target/go-consumer/` with Debian's Go and SDK packages (GOPATH mode, no module proxy).
fn go_consumer() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // target/<profile>/deps/<test> → target
        let target = std::env::current_exe()
            .ok()
            .and_then(|p| Some(p.parent()?.parent()?.parent()?.to_path_buf()))
            .expect("test binary lives in target/<profile>/deps");
        let dir = target.join("go-consumer");
        std::fs::create_dir_all(dir.join("gopath")).unwrap();
        let out = dir.join("iotcred-go-consumer");
        // Build beside, then rename: concurrent test processes never see a partial binary.
        let tmp = dir.join(format!("iotcred-go-consumer.{}", std::process::id()));
        let status = Command::new("go")
            .arg("build")
            .arg("-o")
            .arg(&tmp)
            .arg(tests_dir().join("consumers/go/main.go"))
            .env("GO111MODULE", "off")
            .env(
                "GOPATH",
                format!("{DEBIAN_GOPATH}:{}", dir.join("gopath").display()),
            )
            .env("GOCACHE", dir.join("cache"))
            .env("GOPROXY", "off")
            .env("GOFLAGS", "")
            .status()
            .expect("go (Debian golang-go; run tests/install-deps.sh)");
        assert!(
            status.success(),
            "building the Go consumer failed (needs golang-github-aws-aws-sdk-go-v2-dev)"
        );
        std::fs::rename(&tmp, &out).unwrap();
        out
    })
    .clone()
}

#[test]
fn go_sdk_ec2rolecreds_and_endpointcreds() {
    let bin = go_consumer();
    let env = Env::new();
    let (agent, tcp, imds) = start(&env);
    let issued = env.provider.last_issued().unwrap();

    // ec2rolecreds: token PUT, role listing, credentials, through the environment variable.
    let v = run_consumer(
        {
            let mut c = Command::new(&bin);
            c.arg("ec2");
            c
        },
        &[(
            "AWS_EC2_METADATA_SERVICE_ENDPOINT",
            format!("http://127.0.0.1:{imds}/"),
        )],
        env.path(),
    );
    assert_is(&v, &issued);
    assert_eq!(v["Source"], "EC2RoleProvider");
    assert_eq!(v["CanExpire"], true);
    // The SDK's expiry is the agent's (skew-corrected) expiration, minus its own window.
    let now = iotcred_core::UnixTime::now().as_secs();
    let lifetime = issued.expiration_unix - issued.server_time_unix;
    let expires = v["ExpiresUnix"].as_i64().unwrap();
    assert!(
        expires > now - 600 && expires <= now + lifetime,
        "{v} vs now {now}"
    );

    // endpointcreds: the §4.1 TCP endpoint with the role's token.
    let token_file = env.runtime_dir().join("default.token");
    let url = format!("http://127.0.0.1:{tcp}/v1/credentials/default");
    let v = run_consumer(
        {
            let mut c = Command::new(&bin);
            c.arg("endpoint").arg(&url).arg(&token_file);
            c
        },
        &[],
        env.path(),
    );
    assert_is(&v, &issued);
    assert_eq!(v["CanExpire"], true);
    // A wrong token is refused (401), and the SDK says so.
    let wrong = env.path().join("wrong.token");
    std::fs::write(&wrong, "not-the-token").unwrap();
    let v = run_consumer(
        {
            let mut c = Command::new(&bin);
            c.arg("endpoint").arg(&url).arg(&wrong);
            c
        },
        &[],
        env.path(),
    );
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("Unauthorized")),
        "{v}"
    );
    assert_eq!(
        env.provider.stats().requests,
        1,
        "every consumer was served from the agent's cache"
    );
    agent.stop(&env);
}
