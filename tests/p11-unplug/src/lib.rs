//! `libiotcred_p11_unplug.so`: a PKCS#11 module for tests that wraps a real module (SoftHSM2)
//! and makes its tokens disappear and come back, as if the HSM or smart card were unplugged,
//! and holds `C_Sign` at a gate, as a slow token would.
//!
//! Nothing can unplug a SoftHSM token, so this module sits between the application and
//! SoftHSM. It is configured through the environment of the process that loads it:
//!
//! - `IOTCRED_P11_UNPLUG_MODULE` (required): path of the real module, loaded on the first
//!   `C_GetFunctionList`.
//! - `IOTCRED_P11_UNPLUG_FILE` (required): the control file. While it exists every token of
//!   the real module is "unplugged"; once it is removed they are "plugged in" again.
//! - `IOTCRED_P11_UNPLUG_LOG` (optional): a file to which one line per intercepted call is
//!   appended, `<function> <plugged|unplugged> rv=0x<rv>`, so a test can count `C_Login` or
//!   `C_OpenSession` calls. Arguments (a PIN!) are never written.
//!
//! - `IOTCRED_P11_UNPLUG_SIGN_GATE` (optional): a slow token. While a FIFO exists at this
//!   path, every `C_Sign` first opens it, logs `C_Sign(gated) plugged rv=0x0` (so a test knows
//!   a signature is waiting) and then waits until something is written to the FIFO (or 120 s
//!   pass, so a broken test cannot hang the process for ever); then it signs. A test releases
//!   the waiting signatures by renaming the FIFO away (later calls pass) and writing a byte to
//!   it.
//!
//! While unplugged, what a removable token's module answers:
//!
//! - `C_GetSlotList(tokenPresent = TRUE)` lists no slot; `C_GetSlotInfo` clears
//!   `CKF_TOKEN_PRESENT`;
//! - slot functions that need the token (`C_GetTokenInfo`, `C_GetMechanismList`,
//!   `C_GetMechanismInfo`, `C_InitToken`, `C_OpenSession`) return `CKR_TOKEN_NOT_PRESENT`;
//! - session functions (`C_CloseSession`, `C_GetSessionInfo`, `C_Login`, `C_Logout`,
//!   `C_GetAttributeValue`, `C_FindObjects*`, `C_Sign*`) return `CKR_DEVICE_REMOVED`.
//!
//! The first call that notices the control file closes every session of the real module's
//! tokens (`C_CloseAllSessions`, which in SoftHSM also logs the user out), so once the token is
//! back the old session handles are really invalid and a login is needed again, as after a real
//! replug. (SoftHSM reuses session handle numbers, so a stale handle may even name a newer
//! session: an application must not close sessions it lost.) Every other function is the real
//! module's, unchanged.

use std::ffi::{OsString, c_void};
use std::io::Write as _;
use std::path::PathBuf;
use std::ptr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use cryptoki_sys::{
    CK_ATTRIBUTE, CK_BBOOL, CK_BYTE, CK_FLAGS, CK_FUNCTION_LIST, CK_MECHANISM, CK_MECHANISM_INFO,
    CK_MECHANISM_TYPE, CK_NOTIFY, CK_OBJECT_HANDLE, CK_RV, CK_SESSION_HANDLE, CK_SESSION_INFO,
    CK_SLOT_ID, CK_SLOT_INFO, CK_TOKEN_INFO, CK_TRUE, CK_ULONG, CK_USER_TYPE, CK_UTF8CHAR,
    CKF_TOKEN_PRESENT, CKR_ARGUMENTS_BAD, CKR_CRYPTOKI_NOT_INITIALIZED, CKR_DEVICE_REMOVED,
    CKR_FUNCTION_NOT_SUPPORTED, CKR_GENERAL_ERROR, CKR_OK, CKR_TOKEN_NOT_PRESENT,
};

/// Path of the real module.
const MODULE_VAR: &str = "IOTCRED_P11_UNPLUG_MODULE";
/// Path of the control file.
const FILE_VAR: &str = "IOTCRED_P11_UNPLUG_FILE";
/// Path of the call log.
const LOG_VAR: &str = "IOTCRED_P11_UNPLUG_LOG";
/// Path of the `C_Sign` gate.
const SIGN_GATE_VAR: &str = "IOTCRED_P11_UNPLUG_SIGN_GATE";
/// The longest a `C_Sign` waits at the gate.
const SIGN_GATE_LIMIT_MS: libc::c_int = 120_000;

/// The real module and our function list.
struct Shim {
    /// Keeps the real module loaded: the function pointers in `real` point into it.
    _lib: libloading::Library,
    /// The real module's function list (a copy).
    real: CK_FUNCTION_LIST,
    /// What the application gets: `real` with the token-touching functions replaced.
    ours: CK_FUNCTION_LIST,
    control: PathBuf,
    log: Option<PathBuf>,
    sign_gate: Option<PathBuf>,
}

/// Loaded by the first `C_GetFunctionList`; an error is kept (and reported on every call).
static SHIM: OnceLock<Result<Shim, String>> = OnceLock::new();

/// Whether the last look at the control file found it: set by the call that first sees the
/// token unplugged (which closes the sessions), cleared once it is back.
static UNPLUGGED: AtomicBool = AtomicBool::new(false);

fn load() -> Result<Shim, String> {
    let var = |name: &str| -> Result<OsString, String> {
        std::env::var_os(name).ok_or_else(|| format!("{name} is not set"))
    };
    let module = var(MODULE_VAR)?;
    let control = PathBuf::from(var(FILE_VAR)?);
    let log = std::env::var_os(LOG_VAR).map(PathBuf::from);
    let sign_gate = std::env::var_os(SIGN_GATE_VAR).map(PathBuf::from);
    // SAFETY: loading runs the module's initialisers; the module is the PKCS#11 library the
    // test names (SoftHSM2), whose initialisers have no requirements on the caller.
    let lib = unsafe { libloading::Library::new(&module) }
        .map_err(|e| format!("cannot load {}: {e}", module.to_string_lossy()))?;
    // SAFETY: every PKCS#11 module exports `C_GetFunctionList` with exactly this signature.
    let get_list = unsafe {
        lib.get::<unsafe extern "C" fn(*mut *mut CK_FUNCTION_LIST) -> CK_RV>(b"C_GetFunctionList\0")
    }
    .map(|sym| *sym)
    .map_err(|e| format!("{}: {e}", module.to_string_lossy()))?;
    let mut list = ptr::null_mut();
    // SAFETY: `list` is a valid place for the pointer the module writes.
    let rv = unsafe { get_list(&mut list) };
    if rv != CKR_OK || list.is_null() {
        return Err(format!(
            "{}: C_GetFunctionList failed (rv=0x{rv:x})",
            module.to_string_lossy()
        ));
    }
    // SAFETY: the module returned a valid function list, which stays valid while it is loaded
    // (and `lib` keeps it loaded); it is copied, not kept.
    let real = unsafe { *list };
    let mut ours = real;
    ours.C_GetFunctionList = Some(C_GetFunctionList);
    ours.C_GetSlotList = Some(get_slot_list);
    ours.C_GetSlotInfo = Some(get_slot_info);
    ours.C_GetTokenInfo = Some(get_token_info);
    ours.C_GetMechanismList = Some(get_mechanism_list);
    ours.C_GetMechanismInfo = Some(get_mechanism_info);
    ours.C_InitToken = Some(init_token);
    ours.C_OpenSession = Some(open_session);
    ours.C_CloseSession = Some(close_session);
    ours.C_GetSessionInfo = Some(get_session_info);
    ours.C_Login = Some(login);
    ours.C_Logout = Some(logout);
    ours.C_GetAttributeValue = Some(get_attribute_value);
    ours.C_FindObjectsInit = Some(find_objects_init);
    ours.C_FindObjects = Some(find_objects);
    ours.C_FindObjectsFinal = Some(find_objects_final);
    ours.C_SignInit = Some(sign_init);
    ours.C_Sign = Some(sign);
    ours.C_SignUpdate = Some(sign_update);
    ours.C_SignFinal = Some(sign_final);
    Ok(Shim {
        _lib: lib,
        real,
        ours,
        control,
        log,
        sign_gate,
    })
}

/// The loaded shim, once `C_GetFunctionList` succeeded (an application only has our other
/// functions from the list it returned, so this is `None` only for a misbehaving caller).
fn shim() -> Option<&'static Shim> {
    SHIM.get().and_then(|s| s.as_ref().ok())
}

impl Shim {
    /// Whether the tokens are unplugged now. The first call that finds the control file
    /// closes every session of the real module's tokens, as a removal would.
    fn unplugged(&self) -> bool {
        let now = self.control.exists();
        if !now {
            UNPLUGGED.store(false, Ordering::SeqCst);
        } else if !UNPLUGGED.swap(true, Ordering::SeqCst) {
            self.close_all_sessions();
        }
        now
    }

    fn close_all_sessions(&self) {
        let (Some(get_slots), Some(close_all)) =
            (self.real.C_GetSlotList, self.real.C_CloseAllSessions)
        else {
            return;
        };
        let mut slots: [CK_SLOT_ID; 64] = [0; 64];
        let mut count = slots.len() as CK_ULONG;
        // SAFETY: `slots` has room for `count` slot ids.
        if unsafe { get_slots(CK_TRUE, slots.as_mut_ptr(), &mut count) } != CKR_OK {
            return;
        }
        for &slot in slots.iter().take(count as usize) {
            // SAFETY: a slot id the module just listed.
            let rv = unsafe { close_all(slot) };
            self.record("C_CloseAllSessions", true, rv);
        }
    }

    /// Waits at the `C_Sign` gate while it is closed (a FIFO exists at its path) until the test
    /// writes to it, bounded by [`SIGN_GATE_LIMIT_MS`].
    fn wait_at_sign_gate(&self) {
        use std::os::unix::ffi::OsStrExt as _;
        let Some(gate) = &self.sign_gate else {
            return;
        };
        let Ok(path) = std::ffi::CString::new(gate.as_os_str().as_bytes()) else {
            return;
        };
        // Non-blocking, so the open itself never waits for a writer.
        // SAFETY: `path` is a NUL-terminated string that outlives the call.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return; // no gate: open
        }
        self.record("C_Sign(gated)", false, CKR_OK);
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // A FIFO whose writer has not come yet is neither readable nor hung up; a regular file
        // is readable at once (not a gate).
        loop {
            // SAFETY: one valid pollfd.
            let rc = unsafe { libc::poll(&mut pfd, 1, SIGN_GATE_LIMIT_MS) };
            if rc >= 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted
            {
                break;
            }
        }
        // SAFETY: the descriptor opened above, closed once.
        unsafe { libc::close(fd) };
    }

    /// Appends one line about a call to the log, when there is one. Never arguments.
    fn record(&self, function: &str, unplugged: bool, rv: CK_RV) -> CK_RV {
        if let Some(path) = &self.log {
            let state = if unplugged { "unplugged" } else { "plugged" };
            let line = format!("{function} {state} rv=0x{rv:x}\n");
            // One write of a short line to an O_APPEND file: lines of concurrent calls do not
            // interleave. A log that cannot be written is not the application's problem.
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                let _ = f.write_all(line.as_bytes());
            }
        }
        rv
    }
}

/// The entry point: loads the real module (named by `IOTCRED_P11_UNPLUG_MODULE`) and hands out
/// its function list with the token-touching functions replaced.
///
/// # Safety
///
/// `list` must be null or valid for writing one pointer (the PKCS#11 contract). The function
/// list written there must not be modified by the caller.
#[allow(non_snake_case, reason = "the PKCS#11 symbol name")]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn C_GetFunctionList(list: *mut *mut CK_FUNCTION_LIST) -> CK_RV {
    if list.is_null() {
        return CKR_ARGUMENTS_BAD;
    }
    match SHIM.get_or_init(load) {
        Ok(shim) => {
            // SAFETY: `list` is non-null and, by the caller's contract, writable. The list
            // lives in a static and PKCS#11 applications only read it.
            unsafe { *list = ptr::from_ref(&shim.ours).cast_mut() };
            CKR_OK
        }
        Err(e) => {
            eprintln!("iotcred_p11_unplug: {e}");
            CKR_GENERAL_ERROR
        }
    }
}

/// `C_GetSlotList`: while unplugged, no slot has a token.
unsafe extern "C" fn get_slot_list(
    token_present: CK_BBOOL,
    slots: *mut CK_SLOT_ID,
    count: *mut CK_ULONG,
) -> CK_RV {
    let Some(shim) = shim() else {
        return CKR_CRYPTOKI_NOT_INITIALIZED;
    };
    let Some(real) = shim.real.C_GetSlotList else {
        return CKR_FUNCTION_NOT_SUPPORTED;
    };
    if token_present != 0 && shim.unplugged() {
        if count.is_null() {
            return CKR_ARGUMENTS_BAD;
        }
        // SAFETY: `count` is non-null and, by the PKCS#11 contract, writable. Zero slots fit
        // any buffer, so `slots` is not touched.
        unsafe { *count = 0 };
        return shim.record("C_GetSlotList", true, CKR_OK);
    }
    // SAFETY: the caller's arguments, unchanged, to the real function of the same signature.
    let rv = unsafe { real(token_present, slots, count) };
    shim.record("C_GetSlotList", false, rv)
}

/// `C_GetSlotInfo`: while unplugged, the slot (the reader) is there without a token.
unsafe extern "C" fn get_slot_info(slot: CK_SLOT_ID, info: *mut CK_SLOT_INFO) -> CK_RV {
    let Some(shim) = shim() else {
        return CKR_CRYPTOKI_NOT_INITIALIZED;
    };
    let Some(real) = shim.real.C_GetSlotInfo else {
        return CKR_FUNCTION_NOT_SUPPORTED;
    };
    // SAFETY: the caller's arguments, unchanged, to the real function of the same signature.
    let rv = unsafe { real(slot, info) };
    let unplugged = shim.unplugged();
    if rv == CKR_OK && unplugged && !info.is_null() {
        // SAFETY: the real module just filled `*info`, so it is valid for reads and writes.
        unsafe { (*info).flags &= !CKF_TOKEN_PRESENT };
    }
    shim.record("C_GetSlotInfo", unplugged, rv)
}

/// Wrappers of slot functions that need the token: `CKR_TOKEN_NOT_PRESENT` while unplugged.
macro_rules! slot_fn {
    ($($wrapper:ident => $field:ident($($arg:ident: $ty:ty),*);)*) => {$(
        unsafe extern "C" fn $wrapper(slot: CK_SLOT_ID, $($arg: $ty),*) -> CK_RV {
            let Some(shim) = shim() else {
                return CKR_CRYPTOKI_NOT_INITIALIZED;
            };
            if shim.unplugged() {
                return shim.record(stringify!($field), true, CKR_TOKEN_NOT_PRESENT);
            }
            let Some(real) = shim.real.$field else {
                return CKR_FUNCTION_NOT_SUPPORTED;
            };
            // SAFETY: the caller's arguments, unchanged, to the real function of the same
            // signature; the caller upholds its PKCS#11 contract.
            let rv = unsafe { real(slot, $($arg),*) };
            shim.record(stringify!($field), false, rv)
        }
    )*};
}

/// Wrappers of session functions: `CKR_DEVICE_REMOVED` while unplugged.
macro_rules! session_fn {
    ($($wrapper:ident => $field:ident($($arg:ident: $ty:ty),*);)*) => {$(
        unsafe extern "C" fn $wrapper(session: CK_SESSION_HANDLE, $($arg: $ty),*) -> CK_RV {
            let Some(shim) = shim() else {
                return CKR_CRYPTOKI_NOT_INITIALIZED;
            };
            if shim.unplugged() {
                return shim.record(stringify!($field), true, CKR_DEVICE_REMOVED);
            }
            let Some(real) = shim.real.$field else {
                return CKR_FUNCTION_NOT_SUPPORTED;
            };
            // SAFETY: the caller's arguments, unchanged, to the real function of the same
            // signature; the caller upholds its PKCS#11 contract.
            let rv = unsafe { real(session, $($arg),*) };
            shim.record(stringify!($field), false, rv)
        }
    )*};
}

slot_fn! {
    get_token_info => C_GetTokenInfo(info: *mut CK_TOKEN_INFO);
    get_mechanism_list => C_GetMechanismList(list: *mut CK_MECHANISM_TYPE, count: *mut CK_ULONG);
    get_mechanism_info => C_GetMechanismInfo(mechanism: CK_MECHANISM_TYPE, info: *mut CK_MECHANISM_INFO);
    init_token => C_InitToken(so_pin: *mut CK_UTF8CHAR, so_pin_len: CK_ULONG, label: *mut CK_UTF8CHAR);
    open_session => C_OpenSession(flags: CK_FLAGS, app: *mut c_void, notify: CK_NOTIFY, session: *mut CK_SESSION_HANDLE);
}

session_fn! {
    close_session => C_CloseSession();
    get_session_info => C_GetSessionInfo(info: *mut CK_SESSION_INFO);
    login => C_Login(user: CK_USER_TYPE, pin: *mut CK_UTF8CHAR, pin_len: CK_ULONG);
    logout => C_Logout();
    get_attribute_value => C_GetAttributeValue(object: CK_OBJECT_HANDLE, template: *mut CK_ATTRIBUTE, count: CK_ULONG);
    find_objects_init => C_FindObjectsInit(template: *mut CK_ATTRIBUTE, count: CK_ULONG);
    find_objects => C_FindObjects(objects: *mut CK_OBJECT_HANDLE, max: CK_ULONG, count: *mut CK_ULONG);
    find_objects_final => C_FindObjectsFinal();
    sign_init => C_SignInit(mechanism: *mut CK_MECHANISM, key: CK_OBJECT_HANDLE);
    sign_update => C_SignUpdate(part: *mut CK_BYTE, part_len: CK_ULONG);
    sign_final => C_SignFinal(signature: *mut CK_BYTE, signature_len: *mut CK_ULONG);
}

/// `C_Sign`: waits at the gate (see the crate documentation), then as the other session
/// functions: `CKR_DEVICE_REMOVED` while unplugged, else the real module's.
unsafe extern "C" fn sign(
    session: CK_SESSION_HANDLE,
    data: *mut CK_BYTE,
    data_len: CK_ULONG,
    signature: *mut CK_BYTE,
    signature_len: *mut CK_ULONG,
) -> CK_RV {
    let Some(shim) = shim() else {
        return CKR_CRYPTOKI_NOT_INITIALIZED;
    };
    shim.wait_at_sign_gate();
    if shim.unplugged() {
        return shim.record("C_Sign", true, CKR_DEVICE_REMOVED);
    }
    let Some(real) = shim.real.C_Sign else {
        return CKR_FUNCTION_NOT_SUPPORTED;
    };
    // SAFETY: the caller's arguments, unchanged, to the real function of the same signature;
    // the caller upholds its PKCS#11 contract.
    let rv = unsafe { real(session, data, data_len, signature, signature_len) };
    shim.record("C_Sign", false, rv)
}
