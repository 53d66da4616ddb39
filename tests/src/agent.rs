//! Harness for end-to-end tests of the real `iotcred` binary against the fake provider.
//!
//! - [`iotcred_bin`] builds (once per test process) and locates the binary.
//! - [`Env`] is a temp directory with a PKI, a running [`BlockingProvider`] and helpers to write
//!   agent configurations.
//! - [`Agent`] runs `iotcred run` with a private `NOTIFY_SOCKET`, so tests wait for the agent's
//!   own `READY=1`/`STATUS=` messages (systemd's protocol) instead of sleeping.
//! - Every command's stderr (at `IOTCRED_LOG=trace`) is kept so [`Env::assert_no_secrets`] can
//!   search it for every secret the provider issued.

use std::io::Read;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::pki::Pki;
use crate::provider::{BlockingProvider, ProviderConfig};

/// Path of the `iotcred` binary, built on first use with the same profile as the tests.
pub fn iotcred_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| cargo_build("iotcred")).clone()
}

/// Builds this workspace with the tests' profile and returns
/// `target/<profile>/<artifact>`, which it must have produced.
///
/// The build is the same as the test runner's own (`--workspace --all-features --all-targets`),
/// so it finds everything up to date: building one package alone would resolve features
/// differently (dev-dependencies' features are only unified when test targets are built),
/// rebuild rustls, tokio and the agent, and the next test build would rebuild them back.
pub(crate) fn cargo_build(artifact: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> → target/<profile>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps")
        .to_path_buf();
    let out = profile_dir.join(artifact);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--quiet",
        "--workspace",
        "--all-features",
        "--all-targets",
    ])
    .arg("--manifest-path")
    .arg(&manifest);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let status = cmd.status().expect("running cargo build");
    assert!(status.success(), "cargo build for {artifact} failed");
    assert!(out.exists(), "{} missing after build", out.display());
    out
}

/// Output of one `iotcred` command.
#[derive(Debug)]
pub struct Output {
    /// Exit code (`-1` when killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// A test environment: temp dir, PKI, fake provider, and the logs of every command run.
#[derive(Debug)]
pub struct Env {
    /// The temp dir (removed on drop).
    pub dir: tempfile::TempDir,
    /// Generated PKI (thing name `gateway-0042`).
    pub pki: Pki,
    /// Running fake provider.
    pub provider: BlockingProvider,
    logs: Mutex<Vec<String>>,
    /// Values of the role token files seen so far (a restart replaces the files, a reload
    /// removes those of dropped roles).
    role_tokens: Mutex<Vec<String>>,
    extra_env: Vec<(String, String)>,
}

/// Every test that uses an [`Env`] gets the secret search, whether or not it asks for it: when
/// the test has passed so far, dropping the `Env` searches every kept log, every agent log file
/// in its directory (also of agents the test never stopped) for the issued secrets and the
/// values of the role token files (those still on disk, and those [`Agent::stop`] saw).
impl Drop for Env {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        self.remember_role_tokens();
        if let Ok(dir) = std::fs::read_dir(self.path()) {
            for e in dir.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with("agent-") && name.ends_with(".log") {
                    if let Ok(text) = std::fs::read_to_string(e.path()) {
                        self.keep_log(text);
                    }
                }
            }
        }
        self.assert_no_secrets(&[]);
    }
}

/// Thing name used by [`Env`].
pub const THING: &str = "gateway-0042";

impl Env {
    /// A PKI and a provider with default settings.
    pub fn new() -> Env {
        Env::with_provider(|_| {})
    }

    /// A PKI and a provider configured by `f`.
    pub fn with_provider(f: impl FnOnce(&mut ProviderConfig)) -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = Pki::generate(&dir.path().join("pki"), THING).expect("PKI");
        let mut cfg = pki.provider_config();
        f(&mut cfg);
        let provider = BlockingProvider::start(cfg).expect("fake provider");
        Env {
            dir,
            pki,
            provider,
            logs: Mutex::new(Vec::new()),
            role_tokens: Mutex::new(Vec::new()),
            extra_env: Vec::new(),
        }
    }

    /// Adds an environment variable for every command (e.g. `SOFTHSM2_CONF`).
    pub fn env(&mut self, k: &str, v: &str) {
        self.extra_env.push((k.into(), v.into()));
    }

    /// `localhost:PORT` of the provider (a name, so SNI is exercised).
    pub fn endpoint(&self) -> String {
        format!("localhost:{}", self.provider.addr().port())
    }

    /// The temp dir path.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Runtime dir used by [`Env::config`].
    pub fn runtime_dir(&self) -> PathBuf {
        self.path().join("run")
    }

    /// Agent socket used by [`Env::config`].
    pub fn socket(&self) -> PathBuf {
        self.runtime_dir().join("agent.sock")
    }

    /// A configuration for the device key `cert`/`key` (key may be a `pkcs11:` URI), with
    /// `extra` TOML appended after the top-level keys (put sections and roles there; when it
    /// contains no `[[role]]`, a default role with alias `GatewayRole` and an ini file sink is
    /// added). Returns the config path.
    pub fn config_with(&self, cert: &Path, key: &str, top: &str, extra: &str) -> PathBuf {
        let mut t = format!(
            "endpoint = \"{}\"\nthing_name = \"{THING}\"\ncertificate = \"{}\"\nkey = \"{}\"\nca = \"{}\"\ntimeout_seconds = 5\nruntime_dir = \"{}\"\n{top}\n",
            self.endpoint(),
            cert.display(),
            key,
            self.pki.ca_cert.display(),
            self.runtime_dir().display(),
        );
        t.push_str(extra);
        if !extra.contains("[[role]]") {
            t.push_str(&format!(
                "\n[[role]]\nname = \"default\"\nrole_alias = \"GatewayRole\"\n  [[role.file]]\n  path = \"{}\"\n  format = \"ini\"\n  mode = \"0640\"\n",
                self.runtime_dir().join("credentials").display()
            ));
        }
        let path = self
            .path()
            .join(format!("config-{}.toml", self.logs.lock().unwrap().len()));
        std::fs::write(&path, t).expect("write config");
        path
    }

    /// [`Env::config_with`] for the EC PEM device key and no extra settings.
    pub fn config(&self) -> PathBuf {
        self.config_with(
            &self.pki.device_ec.cert,
            &self.pki.device_ec.key.display().to_string(),
            "",
            "",
        )
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(iotcred_bin());
        cmd.args(args)
            .env_remove("IOTCRED_CONFIG")
            .env_remove("IOTCRED_SOCKET")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env("IOTCRED_LOG", "trace")
            .stdin(Stdio::null());
        for (k, v) in &self.extra_env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Runs `iotcred args…` to completion (bounded: killed after 60 s).
    pub fn run(&self, args: &[&str]) -> Output {
        let mut child = self
            .command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn iotcred");
        let mut out = child.stdout.take().expect("stdout");
        let mut err = child.stderr.take().expect("stderr");
        let t_out = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        let t_err = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        let status = wait_bounded(&mut child, Duration::from_secs(60));
        let stdout = t_out.join().unwrap_or_default();
        let stderr = t_err.join().unwrap_or_default();
        // stdout of fetch/get legitimately carries credentials; stderr never may.
        self.logs.lock().unwrap().push(stderr.clone());
        Output {
            code: status.unwrap_or(-1),
            stdout,
            stderr,
        }
    }

    /// Starts `iotcred run --config config`.
    pub fn start_agent(&self, config: &Path) -> Agent {
        let notify_path = self
            .path()
            .join(format!("notify-{}.sock", self.logs.lock().unwrap().len()));
        let _ = std::fs::remove_file(&notify_path);
        let notify = UnixDatagram::bind(&notify_path).expect("notify socket");
        let log_path = self
            .path()
            .join(format!("agent-{}.log", self.logs.lock().unwrap().len()));
        let log = std::fs::File::create(&log_path).expect("log file");
        let child = self
            .command(&["run", "--config", &config.display().to_string()])
            .env("NOTIFY_SOCKET", &notify_path)
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("spawn iotcred run");
        Agent {
            child: Some(child),
            notify,
            log_path,
            messages: Vec::new(),
        }
    }

    /// Records an agent's log for the secret search.
    pub fn keep_log(&self, text: String) {
        self.logs.lock().unwrap().push(text);
    }

    /// Every log and output kept so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// Adds the values of the role token files now in the runtime directory to the secrets
    /// that [`Env::assert_no_secrets`] searches for.
    pub fn remember_role_tokens(&self) {
        let Ok(dir) = std::fs::read_dir(self.runtime_dir()) else {
            return;
        };
        let mut known = self.role_tokens.lock().unwrap();
        for e in dir.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "token") {
                if let Ok(t) = std::fs::read_to_string(&p) {
                    let t = t.trim().to_string();
                    if !known.contains(&t) {
                        known.push(t);
                    }
                }
            }
        }
    }

    /// Asserts that no secret the provider issued (secret key, session token), no role token
    /// value seen so far (see [`Env::remember_role_tokens`]), nor any of `extra` (PINs, tokens),
    /// appears in any kept log or output (outputs whose job is to print credentials are not
    /// kept).
    pub fn assert_no_secrets(&self, extra: &[&str]) {
        let issued = self.provider.issued();
        let logs = self.logs();
        let role_tokens = self.role_tokens.lock().unwrap().clone();
        let secrets: Vec<&str> = extra
            .iter()
            .copied()
            .chain(role_tokens.iter().map(String::as_str))
            .collect();
        for (i, log) in logs.iter().enumerate() {
            for c in &issued {
                assert!(
                    !log.contains(&c.secret_access_key),
                    "log {i} contains a secret access key:\n{log}"
                );
                assert!(
                    !log.contains(&c.session_token),
                    "log {i} contains a session token:\n{log}"
                );
            }
            for s in &secrets {
                assert!(
                    s.is_empty() || !log.contains(s),
                    "log {i} contains a secret {s:?}"
                );
            }
        }
    }
}

impl Default for Env {
    fn default() -> Self {
        Env::new()
    }
}

fn wait_bounded(child: &mut Child, limit: Duration) -> Option<i32> {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return s.code(),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(_) => return None,
        }
    }
}

/// A running `iotcred run`.
#[derive(Debug)]
pub struct Agent {
    child: Option<Child>,
    notify: UnixDatagram,
    log_path: PathBuf,
    /// Every sd_notify message received so far.
    pub messages: Vec<String>,
}

impl Agent {
    /// Waits (at most `limit`) for an sd_notify message for which `pred` holds; returns it.
    pub fn wait_notify(
        &mut self,
        limit: Duration,
        mut pred: impl FnMut(&str) -> bool,
    ) -> Option<String> {
        if let Some(m) = self.messages.iter().find(|m| pred(m)) {
            return Some(m.clone());
        }
        let deadline = Instant::now() + limit;
        let mut buf = vec![0u8; 4096];
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            self.notify
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .ok()?;
            match self.notify.recv(&mut buf) {
                Ok(n) => {
                    let m = String::from_utf8_lossy(&buf[..n]).into_owned();
                    self.messages.push(m.clone());
                    if pred(&m) {
                        return Some(m);
                    }
                }
                Err(_) => {
                    if self.exited() {
                        return None;
                    }
                }
            }
        }
    }

    /// Waits for `READY=1` (at most `limit`).
    pub fn wait_ready(&mut self, limit: Duration) -> bool {
        self.wait_notify(limit, |m| m.lines().any(|l| l == "READY=1"))
            .is_some()
    }

    /// Whether the process has exited.
    pub fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|c| matches!(c.try_wait(), Ok(Some(_))))
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Sends a signal.
    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
        }
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// SIGTERM, wait (bounded), and return (exit code, log). The log is also kept in `env`.
    pub fn stop(mut self, env: &Env) -> (Option<i32>, String) {
        // The next start replaces the token files: remember these for the secret search.
        env.remember_role_tokens();
        self.signal(libc::SIGTERM);
        let code = self
            .child
            .take()
            .and_then(|mut c| wait_bounded(&mut c, Duration::from_secs(20)));
        let log = self.log();
        env.keep_log(log.clone());
        (code, log)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Polls `f` until it returns `Some` or `limit` passes (for state another process writes, such
/// as files; every poll checks the condition, nothing relies on the sleep's length).
pub fn poll<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
