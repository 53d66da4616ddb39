//! A software TPM 2.0 with a tpm2-pkcs11 token and an ECC P-256 key, per test.
//!
//! swtpm (TCP) ← tpm2-abrmd on a private D-Bus session bus ← tpm2-pkcs11 / tpm2-tools. No
//! systemd needed. The module reads its store and TCTI from the environment, so processes that
//! load it get [`Tpm::env`]. Dropping the fixture stops every daemon it started.

use std::ffi::OsString;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::softhsm::{FixtureError, require_file, require_tool, run, write_private};

/// The tpm2-pkcs11 module on Debian (x86_64).
pub const TPM2_PKCS11_MODULE: &str = "/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so";

/// Token label, key label and PINs of the fixture.
pub const TOKEN_LABEL: &str = "tpm-iot";
/// The key's CKA_LABEL.
pub const KEY_LABEL: &str = "device-ec";
/// The user PIN.
pub const USER_PIN: &str = "4321";
const SO_PIN: &str = "87654321";

/// How long the daemons get to come up.
const STARTUP: Duration = Duration::from_secs(30);

/// A running software TPM with one token and one ECC P-256 key.
#[derive(Debug)]
pub struct Tpm {
    // Declared first so the daemons stop before the directory goes.
    daemons: Vec<(&'static str, Child)>,
    dir: tempfile::TempDir,
    env: Vec<(String, OsString)>,
    uri: String,
    spki: Vec<u8>,
}

/// Two free consecutive loopback ports: the swtpm TCTI expects the control port at `port + 1`.
fn free_port_pair() -> Result<u16, FixtureError> {
    for _ in 0..100 {
        let first = TcpListener::bind("127.0.0.1:0")
            .map_err(|e| FixtureError(format!("cannot find a free port: {e}")))?;
        let port = first
            .local_addr()
            .map_err(|e| FixtureError(format!("cannot find a free port: {e}")))?
            .port();
        if port < u16::MAX && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return Ok(port);
        }
    }
    Err(FixtureError(
        "cannot find two free consecutive loopback ports".into(),
    ))
}

fn spawn(
    name: &'static str,
    cmd: &mut Command,
    daemons: &mut Vec<(&'static str, Child)>,
    log: &Path,
) -> Result<(), FixtureError> {
    let log = std::fs::File::create(log)
        .map_err(|e| FixtureError(format!("cannot create {}: {e}", log.display())))?;
    let err = log
        .try_clone()
        .map_err(|e| FixtureError(format!("cannot clone a log handle: {e}")))?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .spawn()
        .map_err(|e| FixtureError(format!("cannot start {name}: {e}")))?;
    daemons.push((name, child));
    Ok(())
}

/// Polls `ready` until it returns true, a daemon exits, or the deadline passes.
fn wait_until(
    what: &str,
    daemons: &mut [(&'static str, Child)],
    log: &Path,
    mut ready: impl FnMut() -> bool,
) -> Result<(), FixtureError> {
    let deadline = Instant::now() + STARTUP;
    loop {
        if ready() {
            return Ok(());
        }
        for (name, child) in daemons.iter_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(log).unwrap_or_default();
                return Err(FixtureError(format!(
                    "{name} exited ({status}) while waiting for {what}: {log}"
                )));
            }
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            return Err(FixtureError(format!(
                "{what} not ready after {STARTUP:?}: {log}"
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Tpm {
    /// Starts swtpm, a D-Bus session bus and tpm2-abrmd, and provisions the token and key.
    pub fn start() -> Result<Self, FixtureError> {
        for (tool, package) in [
            ("swtpm", "swtpm"),
            ("dbus-daemon", "dbus"),
            ("tpm2-abrmd", "tpm2-abrmd"),
            ("tpm2_ptool", "libtpm2-pkcs11-tools"),
            ("tpm2_getrandom", "tpm2-tools"),
            ("pkcs11-tool", "opensc"),
        ] {
            // tpm2-abrmd lives in /usr/sbin, which may not be on PATH.
            if tool == "tpm2-abrmd" && Path::new("/usr/sbin/tpm2-abrmd").exists() {
                continue;
            }
            require_tool(tool, package)?;
        }
        require_file(TPM2_PKCS11_MODULE, "libtpm2-pkcs11-1")?;

        let dir = tempfile::Builder::new()
            .prefix("iotcred-tpm-")
            .tempdir()
            .map_err(|e| FixtureError(format!("cannot create a temporary directory: {e}")))?;
        let b = dir.path().to_owned();
        let mut tpm = Tpm {
            daemons: Vec::new(),
            dir,
            env: Vec::new(),
            uri: String::new(),
            spki: Vec::new(),
        };

        // 1. swtpm on two free loopback ports.
        let state = b.join("state");
        std::fs::create_dir(&state)
            .map_err(|e| FixtureError(format!("cannot create {}: {e}", state.display())))?;
        let port = free_port_pair()?;
        let ctrl = port + 1;
        let swtpm_log = b.join("swtpm.log");
        spawn(
            "swtpm",
            Command::new("swtpm")
                .args(["socket", "--tpm2", "--tpmstate"])
                .arg(format!("dir={}", state.display()))
                .arg("--server")
                .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
                .arg("--ctrl")
                .arg(format!("type=tcp,port={ctrl},bindaddr=127.0.0.1"))
                .args(["--flags", "not-need-init,startup-clear"]),
            &mut tpm.daemons,
            &swtpm_log,
        )?;
        wait_until("swtpm", &mut tpm.daemons, &swtpm_log, || {
            TcpStream::connect(("127.0.0.1", ctrl)).is_ok()
        })?;

        // 2. A private D-Bus session bus and tpm2-abrmd on it.
        let bus_sock = b.join("dbus.sock");
        let bus = format!("unix:path={}", bus_sock.display());
        let dbus_log = b.join("dbus.log");
        spawn(
            "dbus-daemon",
            Command::new("dbus-daemon")
                .args(["--session", "--nofork", "--nopidfile"])
                .arg(format!("--address={bus}")),
            &mut tpm.daemons,
            &dbus_log,
        )?;
        wait_until("the D-Bus socket", &mut tpm.daemons, &dbus_log, || {
            bus_sock.exists()
        })?;

        let tcti = "tabrmd:bus_type=session".to_owned();
        let store = b.join("store");
        std::fs::create_dir(&store)
            .map_err(|e| FixtureError(format!("cannot create {}: {e}", store.display())))?;
        tpm.env = vec![
            ("DBUS_SESSION_BUS_ADDRESS".into(), bus.clone().into()),
            ("TPM2TOOLS_TCTI".into(), tcti.clone().into()),
            ("TPM2_PKCS11_TCTI".into(), tcti.into()),
            ("TPM2_PKCS11_STORE".into(), store.clone().into_os_string()),
            // tpm2-pkcs11 logs warnings about its store otherwise.
            ("TPM2_PKCS11_LOG_LEVEL".into(), "0".into()),
        ];

        let abrmd = if Path::new("/usr/sbin/tpm2-abrmd").exists() {
            "/usr/sbin/tpm2-abrmd"
        } else {
            "tpm2-abrmd"
        };
        let abrmd_log = b.join("abrmd.log");
        let mut cmd = Command::new(abrmd);
        cmd.args(["--session", "--flush-all"])
            .arg(format!("--tcti=swtpm:host=127.0.0.1,port={port}"))
            .envs(tpm.env.iter().cloned());
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            cmd.arg("--allow-root");
        }
        spawn("tpm2-abrmd", &mut cmd, &mut tpm.daemons, &abrmd_log)?;
        let env = tpm.env.clone();
        wait_until("tpm2-abrmd", &mut tpm.daemons, &abrmd_log, || {
            Command::new("tpm2_getrandom")
                .arg("4")
                .envs(env.iter().cloned())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })?;

        // 3. Token and key.
        let path_arg = format!("--path={}", store.display());
        run(
            tpm.command("tpm2_ptool").args(["init", &path_arg]),
            "tpm2_ptool init",
        )?;
        run(
            tpm.command("tpm2_ptool").args([
                "addtoken",
                "--pid=1",
                &format!("--label={TOKEN_LABEL}"),
                &format!("--sopin={SO_PIN}"),
                &format!("--userpin={USER_PIN}"),
                &path_arg,
            ]),
            "tpm2_ptool addtoken",
        )?;
        run(
            tpm.command("tpm2_ptool").args([
                "addkey",
                &format!("--label={TOKEN_LABEL}"),
                &format!("--key-label={KEY_LABEL}"),
                "--id=01",
                "--algorithm=ecc256",
                &format!("--userpin={USER_PIN}"),
                &path_arg,
            ]),
            "tpm2_ptool addkey",
        )?;

        // 4. The public key, through the module itself. pkcs11-tool now and then fails to
        // convert the point it read ("cannot create EVP_PKEY") when the suite runs many TPM
        // fixtures at once; reading again succeeds, so up to three reads are made.
        let pub_der = b.join("device-ec.pub.der");
        let read_public = || {
            run(
                tpm.command("pkcs11-tool")
                    .args(["--module", TPM2_PKCS11_MODULE, "--token-label", TOKEN_LABEL])
                    .args(["--read-object", "--type", "pubkey", "--label", KEY_LABEL])
                    .arg("--output-file")
                    .arg(&pub_der),
                "pkcs11-tool --read-object (TPM public key)",
            )
        };
        read_public()
            .or_else(|_| read_public())
            .or_else(|_| read_public())?;
        tpm.spki = std::fs::read(&pub_der)
            .map_err(|e| FixtureError(format!("cannot read {}: {e}", pub_der.display())))?;

        let pin_file = b.join("pin");
        write_private(&pin_file, format!("{USER_PIN}\n").as_bytes())?;
        // `--id=01` is stored as the ASCII text "01", so CKA_ID is 0x30 0x31.
        tpm.uri = format!(
            "pkcs11:token={TOKEN_LABEL};object={KEY_LABEL};id=%30%31?module-path={TPM2_PKCS11_MODULE}&pin-source=file:{}",
            pin_file.display()
        );
        Ok(tpm)
    }

    /// The environment a process needs to use the token (pass it to child processes).
    pub fn env(&self) -> Vec<(String, OsString)> {
        self.env.clone()
    }

    /// A command with [`Self::env`] set.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.envs(self.env.iter().cloned());
        cmd
    }

    /// The `pkcs11:` URI of the key (with module path and PIN file).
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The key's SubjectPublicKeyInfo (DER), to issue a device certificate for it.
    pub fn spki(&self) -> &[u8] {
        &self.spki
    }

    /// The fixture's directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The tpm2-pkcs11 store directory.
    pub fn store(&self) -> PathBuf {
        self.dir.path().join("store")
    }
}

impl Drop for Tpm {
    fn drop(&mut self) {
        // Reverse order: abrmd, then the bus, then swtpm.
        while let Some((_, mut child)) = self.daemons.pop() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
