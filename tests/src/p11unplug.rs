//! A PKCS#11 token that can be unplugged: the fault-injecting module of `tests/p11-unplug`
//! (`libiotcred_p11_unplug.so`) wrapped around SoftHSM2.
//!
//! Point a `pkcs11:` URI's `module-path` at [`Unplug::module`] and give the process that loads
//! it [`Unplug::env`] (besides SoftHSM's own `SOFTHSM2_CONF`). [`Unplug::unplug`] makes every
//! token of the module disappear (sessions closed, login lost, `CKR_TOKEN_NOT_PRESENT` /
//! `CKR_DEVICE_REMOVED`), [`Unplug::replug`] brings them back; [`Unplug::calls`] reads the
//! module's log of intercepted calls. [`Unplug::hold_signatures`] makes it a slow token: every
//! `C_Sign` waits (logged as `C_Sign(gated)`) until [`SignGate::release`] or the gate is dropped.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::softhsm::{FixtureError, SOFTHSM_MODULE, require_file};

/// Path of `libiotcred_p11_unplug.so`, built on first use with the same profile as the tests.
pub fn module_path() -> PathBuf {
    static MODULE: OnceLock<PathBuf> = OnceLock::new();
    MODULE
        .get_or_init(|| crate::agent::cargo_build("libiotcred_p11_unplug.so"))
        .clone()
}

/// One call the module intercepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    /// The PKCS#11 function, e.g. `C_Login`.
    pub function: String,
    /// Whether the token was unplugged at the time.
    pub unplugged: bool,
    /// What the application got back (`CK_RV`).
    pub rv: u64,
}

/// The control and log files of one unpluggable module (in a directory of the test).
#[derive(Debug)]
pub struct Unplug {
    module: PathBuf,
    control: PathBuf,
    log: PathBuf,
    sign_gate: PathBuf,
}

impl Unplug {
    /// Builds the module (once per process); its control and log files go to `dir`. The token
    /// starts plugged in.
    pub fn new(dir: &Path) -> Result<Unplug, FixtureError> {
        require_file(SOFTHSM_MODULE, "softhsm2")?;
        Ok(Unplug {
            module: module_path(),
            control: dir.join("p11-unplugged"),
            log: dir.join("p11-calls.log"),
            sign_gate: dir.join("p11-sign-gate"),
        })
    }

    /// The module to name in `module-path=`.
    pub fn module(&self) -> &Path {
        &self.module
    }

    /// The environment the loading process needs (the real module, the control and log files).
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            (
                "IOTCRED_P11_UNPLUG_MODULE".to_owned(),
                SOFTHSM_MODULE.to_owned(),
            ),
            (
                "IOTCRED_P11_UNPLUG_FILE".to_owned(),
                self.control.display().to_string(),
            ),
            (
                "IOTCRED_P11_UNPLUG_LOG".to_owned(),
                self.log.display().to_string(),
            ),
            (
                "IOTCRED_P11_UNPLUG_SIGN_GATE".to_owned(),
                self.sign_gate.display().to_string(),
            ),
        ]
    }

    /// Closes the `C_Sign` gate: from now on every signature waits in the module until the
    /// returned gate is released (or dropped, so a failing test never leaves the agent stuck).
    pub fn hold_signatures(&self) -> SignGate {
        let path = std::ffi::CString::new(self.sign_gate.as_os_str().as_encoded_bytes())
            .expect("gate path without NUL");
        // SAFETY: `path` is a NUL-terminated string that outlives the call.
        let rc = unsafe { libc::mkfifo(path.as_ptr(), 0o600) };
        assert_eq!(rc, 0, "mkfifo {}", self.sign_gate.display());
        SignGate {
            path: self.sign_gate.clone(),
            released: false,
        }
    }

    /// How many `C_Sign` calls have reached the closed gate so far.
    pub fn signatures_held(&self) -> usize {
        self.calls()
            .iter()
            .filter(|c| c.function == "C_Sign(gated)")
            .count()
    }

    /// Unplugs the token: the module's next call notices.
    pub fn unplug(&self) {
        std::fs::write(&self.control, b"unplugged\n").expect("write the unplug control file");
    }

    /// Plugs the token back in.
    pub fn replug(&self) {
        std::fs::remove_file(&self.control).expect("remove the unplug control file");
    }

    /// Every call intercepted so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let mut parts = l.split(' ');
                let function = parts.next()?.to_owned();
                let unplugged = parts.next()? == "unplugged";
                let rv = u64::from_str_radix(parts.next()?.strip_prefix("rv=0x")?, 16).ok()?;
                Some(Call {
                    function,
                    unplugged,
                    rv,
                })
            })
            .collect()
    }
}

/// A closed `C_Sign` gate (see [`Unplug::hold_signatures`]).
#[derive(Debug)]
pub struct SignGate {
    path: PathBuf,
    released: bool,
}

impl SignGate {
    /// Lets every waiting and later signature through: the FIFO is renamed away (later
    /// `C_Sign` calls find no gate) and a byte written to it wakes those waiting on it.
    pub fn release(&mut self) {
        if self.released {
            return;
        }
        self.released = true;
        let open = self.path.with_extension("open");
        if std::fs::rename(&self.path, &open).is_err() {
            return;
        }
        // Non-blocking: with nobody waiting there is no reader, and nothing to wake.
        if let Ok(mut w) = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&open)
        {
            let _ = w.write_all(b"go");
        }
        let _ = std::fs::remove_file(&open);
    }
}

impl Drop for SignGate {
    fn drop(&mut self) {
        self.release();
    }
}
