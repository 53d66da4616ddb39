//! A throwaway SoftHSM2 token store per test.
//!
//! SoftHSM reads `SOFTHSM2_CONF` once, when the module is initialised, so a process sees one
//! token store. Tests therefore pass [`SoftHsm::env`] to the child processes that load the
//! module (the `iotcred` binary, `pkcs11-tool`, or the test binary re-run as a child); setting
//! it in the current process is possible only through the explicitly unsafe
//! [`SoftHsm::export_to_current_process`].

use std::ffi::OsString;
use std::fmt;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The SoftHSM2 module on Debian.
pub const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// OpenSC's logging PKCS#11 proxy: set `PKCS11SPY` to the real module and `PKCS11SPY_OUTPUT`
/// to a log file; every call is written to the log.
pub const PKCS11_SPY_MODULE: &str = "/usr/lib/x86_64-linux-gnu/pkcs11/pkcs11-spy.so";

/// A fixture could not be set up (a tool missing or failing). The message says which.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FixtureError(pub String);

impl fmt::Display for FixtureError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FixtureError {}

pub(crate) fn require_file(path: &str, package: &str) -> Result<(), FixtureError> {
    if Path::new(path).exists() {
        Ok(())
    } else {
        Err(FixtureError(format!(
            "{path} is missing: install the Debian package `{package}`"
        )))
    }
}

pub(crate) fn require_tool(tool: &str, package: &str) -> Result<(), FixtureError> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    if found {
        Ok(())
    } else {
        Err(FixtureError(format!(
            "`{tool}` is not on PATH: install the Debian package `{package}`"
        )))
    }
}

/// Runs `cmd`, failing with its stderr when it does not succeed.
pub(crate) fn run(cmd: &mut Command, what: &str) -> Result<Output, FixtureError> {
    let out = cmd
        .output()
        .map_err(|e| FixtureError(format!("{what}: cannot start: {e}")))?;
    if !out.status.success() {
        return Err(FixtureError(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        )));
    }
    Ok(out)
}

/// Writes a file with mode 0600.
pub(crate) fn write_private(path: &Path, data: &[u8]) -> Result<(), FixtureError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| FixtureError(format!("cannot write {}: {e}", path.display())))?;
    f.write_all(data)
        .map_err(|e| FixtureError(format!("cannot write {}: {e}", path.display())))
}

/// A SoftHSM2 token directory and its configuration file, removed on drop.
#[derive(Debug)]
pub struct SoftHsm {
    dir: tempfile::TempDir,
    conf: PathBuf,
}

impl SoftHsm {
    /// Creates an empty token store (no tokens yet).
    pub fn new() -> Result<Self, FixtureError> {
        require_file(SOFTHSM_MODULE, "softhsm2")?;
        require_tool("softhsm2-util", "softhsm2")?;
        let dir = tempfile::Builder::new()
            .prefix("iotcred-softhsm-")
            .tempdir()
            .map_err(|e| FixtureError(format!("cannot create a temporary directory: {e}")))?;
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens)
            .map_err(|e| FixtureError(format!("cannot create {}: {e}", tokens.display())))?;
        let conf = dir.path().join("softhsm2.conf");
        let text = format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
            tokens.display()
        );
        std::fs::write(&conf, text)
            .map_err(|e| FixtureError(format!("cannot write {}: {e}", conf.display())))?;
        Ok(SoftHsm { dir, conf })
    }

    /// The fixture's directory (for pin files, logs and keys of the test).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The configuration file.
    pub fn conf_path(&self) -> &Path {
        &self.conf
    }

    /// The environment a process needs to see these tokens.
    pub fn env(&self) -> Vec<(String, OsString)> {
        vec![(
            "SOFTHSM2_CONF".to_owned(),
            self.conf.clone().into_os_string(),
        )]
    }

    /// A command with [`Self::env`] set.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.envs(self.env());
        cmd
    }

    /// Sets `SOFTHSM2_CONF` in the current process.
    ///
    /// # Safety
    /// Changing the environment is only sound while no other thread reads or writes it: call
    /// this in a single-threaded process (e.g. a test child run with `--test-threads=1`) before
    /// anything loads the SoftHSM module.
    pub unsafe fn export_to_current_process(&self) {
        // SAFETY: the caller guarantees no concurrent environment access.
        unsafe { std::env::set_var("SOFTHSM2_CONF", &self.conf) };
    }

    /// A fresh SoftHSM with token `iotcred` (user PIN `pin`) holding the private key in the PEM
    /// file `key_pem` as object `device`, CKA_ID 01: the setup of the end-to-end PKCS#11 tests.
    pub fn with_device_key(key_pem: &Path, pin: &str, so_pin: &str) -> Result<Self, FixtureError> {
        let hsm = SoftHsm::new()?;
        hsm.init_token("iotcred", pin, so_pin)?;
        let pem = std::fs::read_to_string(key_pem)
            .map_err(|e| FixtureError(format!("read {}: {e}", key_pem.display())))?;
        hsm.import_key("iotcred", &pem, "device", "01", pin)?;
        Ok(hsm)
    }

    /// Initialises a token in the first free slot.
    pub fn init_token(&self, label: &str, pin: &str, so_pin: &str) -> Result<(), FixtureError> {
        run(
            self.command("softhsm2-util").args([
                "--init-token",
                "--free",
                "--label",
                label,
                "--pin",
                pin,
                "--so-pin",
                so_pin,
            ]),
            "softhsm2-util --init-token",
        )?;
        Ok(())
    }

    /// Imports a private key (any PEM form openssl reads; converted to PKCS#8, which SoftHSM
    /// wants) into token `token` as `label` with CKA_ID `id_hex` (e.g. "01"). SoftHSM creates
    /// both the private and the public key object.
    pub fn import_key(
        &self,
        token: &str,
        key_pem: &str,
        label: &str,
        id_hex: &str,
        pin: &str,
    ) -> Result<(), FixtureError> {
        require_tool("openssl", "openssl")?;
        let src = self.dir().join(format!("import-{label}.pem"));
        let p8 = self.dir().join(format!("import-{label}.p8"));
        write_private(&src, key_pem.as_bytes())?;
        run(
            Command::new("openssl")
                .args(["pkcs8", "-topk8", "-nocrypt", "-in"])
                .arg(&src)
                .arg("-out")
                .arg(&p8),
            "openssl pkcs8 -topk8",
        )?;
        let result = run(
            self.command("softhsm2-util")
                .arg("--import")
                .arg(&p8)
                .args([
                    "--token", token, "--label", label, "--id", id_hex, "--pin", pin,
                ]),
            "softhsm2-util --import",
        );
        let _ = std::fs::remove_file(&src);
        let _ = std::fs::remove_file(&p8);
        result.map(|_| ())
    }

    /// Writes `pin` to a 0600 file in the fixture directory and returns its path.
    pub fn write_pin_file(&self, name: &str, pin: &str) -> Result<PathBuf, FixtureError> {
        let path = self.dir().join(name);
        write_private(&path, format!("{pin}\n").as_bytes())?;
        Ok(path)
    }

    /// A `pkcs11:` URI for object `label` in `token`, PIN from `pin_file`.
    pub fn uri(&self, token: &str, label: &str, pin_file: &Path) -> String {
        format!(
            "pkcs11:token={token};object={label}?module-path={SOFTHSM_MODULE}&pin-source=file:{}",
            pin_file.display()
        )
    }
}
