//! The module, the session and the login: loading and initialising the module, the PIN, and
//! one long-lived logged-in session per key that is reopened after the token went away.
//!
//! # Token calls never run on an async worker
//!
//! A token call can take long: a slow HSM, a TPM behind a busy resource manager, a smart card
//! reader that stalls. The agent's runtime has two worker threads that also serve local
//! consumers, so a token call must not occupy one of them. Every call into the module goes
//! through [`off_worker`]:
//!
//! - on tokio's multi-thread runtime (`iotcred run`) it runs in
//!   [`tokio::task::block_in_place`]: the worker hands its queue of tasks to a fresh thread
//!   before the call blocks, so serving continues while the token works; the blocked thread
//!   returns to the pool afterwards;
//! - anywhere else (the one-shot commands' current-thread runtime, no runtime at all) blocking
//!   the caller is harmless and the call runs directly.
//!
//! `block_in_place` rather than a token thread fed by a channel: rustls asks for the signature
//! synchronously (`Signer::sign`, in the middle of the handshake), so whoever waits for a token
//! thread's answer blocks its own thread all the same and would need `block_in_place` anyway;
//! the channel would only add a thread and a copy. It also keeps every caller covered, the
//! handshake's signer as well as loading the key on start-up or reload. The one place
//! `block_in_place` is not allowed, a `LocalSet` on a multi-thread runtime, is not used by the
//! agent. Waiting for this key's session (another handshake signing) is a blocking call too,
//! and happens inside the same section.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::MechanismType;
use cryptoki::object::ObjectHandle;
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

use super::KeyKind;
use super::lookup::{describe_key, find_private_key, find_token};
use crate::keys::{KeyError, PinSource, Pkcs11Uri, SignFailure};

/// Runs a blocking token call so that it never occupies an async worker (see the module
/// documentation). Also used for the other blocking work of provisioning and rotation (key
/// generation, durable writes, the state lock).
pub(crate) fn off_worker<T>(call: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(call),
        _ => call(),
    }
}

/// A generic PKCS#11 failure as a [`KeyError`].
pub(super) fn ck(op: &'static str) -> impl Fn(CkError) -> KeyError {
    move |e| KeyError::Pkcs11 {
        op,
        detail: e.to_string(),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Loads and initialises the module.
pub(in crate::keys) fn load_module(module: &Path) -> Result<Pkcs11, KeyError> {
    let load_error = |e: CkError| KeyError::ModuleLoad {
        path: module.to_owned(),
        detail: e.to_string(),
    };
    let ctx = Pkcs11::new(module).map_err(load_error)?;
    initialize(&ctx).map_err(load_error)?;
    Ok(ctx)
}

fn initialize(ctx: &Pkcs11) -> Result<(), CkError> {
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// The user PIN the URI gives (`pin-value`, or the first line of `pin-source`'s file).
pub(in crate::keys) fn read_pin(uri: &Pkcs11Uri) -> Result<Option<Zeroizing<String>>, KeyError> {
    match &uri.pin {
        None => Ok(None),
        Some(PinSource::Value(v)) => Ok(Some(v.clone())),
        Some(PinSource::File(path)) => {
            let bytes = Zeroizing::new(std::fs::read(path).map_err(|source| {
                KeyError::PinFileUnreadable {
                    path: path.clone(),
                    source,
                }
            })?);
            let text = std::str::from_utf8(&bytes).map_err(|_| KeyError::PinFileUnreadable {
                path: path.clone(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8"),
            })?;
            let line = text.lines().next().unwrap_or("");
            Ok(Some(Zeroizing::new(line.to_owned())))
        }
    }
}

/// Logs the user in on `session`; `UserAlreadyLoggedIn` is success; a wrong PIN is final.
fn login(
    session: &Session,
    pin: Option<&Zeroizing<String>>,
    token_label: &str,
    protected_path: bool,
) -> Result<(), KeyError> {
    let result = match pin {
        Some(p) => {
            let auth = AuthPin::from(p.as_str().to_owned());
            session.login(UserType::User, Some(&auth))
        }
        None if protected_path => session.login(UserType::User, None),
        None => return Err(KeyError::MissingPin(token_label.to_owned())),
    };
    match result {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
        Err(CkError::Pkcs11(
            RvError::PinIncorrect | RvError::PinInvalid | RvError::PinLenRange,
            _,
        )) => Err(KeyError::WrongPin(token_label.to_owned())),
        Err(CkError::Pkcs11(RvError::PinLocked | RvError::PinExpired, _)) => {
            Err(KeyError::PinLocked(token_label.to_owned()))
        }
        Err(e) => Err(ck("C_Login")(e)),
    }
}

/// Opens a session on `slot` and logs in when the token wants it.
pub(in crate::keys) fn open_logged_in(
    ctx: &Pkcs11,
    slot: Slot,
    token_label: &str,
    pin: Option<&Zeroizing<String>>,
    read_write: bool,
) -> Result<Session, KeyError> {
    let info = ctx.get_token_info(slot).map_err(ck("C_GetTokenInfo"))?;
    let session = if read_write {
        ctx.open_rw_session(slot)
    } else {
        ctx.open_ro_session(slot)
    }
    .map_err(ck("C_OpenSession"))?;
    if info.login_required() || pin.is_some() {
        login(
            &session,
            pin,
            token_label,
            info.protected_authentication_path(),
        )?;
    }
    Ok(session)
}

/// Errors after which a fresh session (and login) may succeed.
fn is_recoverable(e: &CkError) -> bool {
    matches!(
        e,
        CkError::Pkcs11(
            RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::UserNotLoggedIn
                | RvError::DeviceRemoved
                | RvError::DeviceError
                | RvError::TokenNotPresent
                | RvError::CryptokiNotInitialized
                | RvError::KeyHandleInvalid
                | RvError::ObjectHandleInvalid,
            _
        )
    )
}

/// After these the session handle is gone; closing it again could hit a reused handle.
fn session_is_gone(e: &CkError) -> bool {
    matches!(
        e,
        CkError::Pkcs11(
            RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::DeviceRemoved
                | RvError::TokenNotPresent
                | RvError::CryptokiNotInitialized,
            _
        )
    )
}

/// An open, logged-in session and the key found in it.
pub(super) struct Open {
    pub(super) session: Session,
    pub(super) key: ObjectHandle,
}

/// The module, the token and one long-lived session for one key.
///
/// The session sits behind a `Mutex` (a cryptoki `Session` is `Send`, not `Sync`) and is
/// logged in once. After a session or device error it is reopened, the user logged in again
/// and the operation retried once. A wrong PIN is never retried.
pub(super) struct KeySession {
    ctx: Pkcs11,
    pub(super) module: PathBuf,
    pub(super) uri: Pkcs11Uri,
    pin: Option<Zeroizing<String>>,
    /// Set once the token refused the PIN: it is never presented again by this key (a wrong
    /// PIN tried on every reconnect would lock the token). Reloading the key resets it.
    pin_rejected: AtomicBool,
    /// The token's label and slot, as last found.
    token: Mutex<(String, Slot)>,
    state: Mutex<Option<Open>>,
}

impl KeySession {
    /// Loads the module, finds the token, opens a session, logs in and finds the key; returns
    /// the session and what the key is. Blocking (call it through [`off_worker`]).
    pub(super) fn open(uri: &Pkcs11Uri) -> Result<(KeySession, KeyKind, Vec<u8>), KeyError> {
        let module = uri.module_path.clone().ok_or(KeyError::MissingModulePath)?;
        let ctx = load_module(&module)?;
        let (label, slot) = find_token(&ctx, uri, &module)?;
        let pin = read_pin(uri)?;
        let this = KeySession {
            ctx,
            module,
            uri: uri.clone(),
            pin,
            pin_rejected: AtomicBool::new(false),
            token: Mutex::new((label, slot)),
            state: Mutex::new(None),
        };
        let open = this.open_session()?;
        let (kind, spki) = describe_key(
            &open.session,
            open.key,
            &this.uri.object_selector(),
            &this.token_label(),
        )?;
        *lock(&this.state) = Some(open);
        Ok((this, kind, spki))
    }

    pub(super) fn token_label(&self) -> String {
        lock(&self.token).0.clone()
    }

    pub(super) fn slot_id(&self) -> u64 {
        lock(&self.token).1.id()
    }

    /// Whether the token offers `mech` (true when it cannot tell). Blocking.
    pub(super) fn mechanism_supported(&self, mech: MechanismType) -> bool {
        let slot = lock(&self.token).1;
        match self.ctx.get_mechanism_list(slot) {
            Ok(list) => list.contains(&mech),
            Err(_) => true,
        }
    }

    /// Opens a new session, logs in and finds the key.
    fn open_session(&self) -> Result<Open, KeyError> {
        let (label, slot) = lock(&self.token).clone();
        if self.pin_rejected.load(Ordering::Acquire) {
            return Err(KeyError::WrongPin(label));
        }
        let session = open_logged_in(&self.ctx, slot, &label, self.pin.as_ref(), false)
            .inspect_err(|e| {
                if matches!(e, KeyError::WrongPin(_) | KeyError::PinLocked(_)) {
                    self.pin_rejected.store(true, Ordering::Release);
                }
            })?;
        let key = find_private_key(&session, &self.uri, &label, &self.module)?;
        Ok(Open { session, key })
    }

    /// Recovers from `error`: forgets the old session, reinitialises the module if needed,
    /// finds the token again (it may be in another slot after a replug), reopens and logs in.
    fn reopen(&self, state: &mut Option<Open>, error: &CkError) -> Result<(), KeyError> {
        match state.take() {
            Some(old) => {
                tracing::debug!(
                    token = %self.token_label(),
                    %error,
                    "PKCS#11 session lost; reopening"
                );
                if session_is_gone(error) {
                    // Its handle is dead; closing it could close a newer session that reuses it.
                    std::mem::forget(old.session);
                } else {
                    drop(old);
                }
            }
            // Lost earlier, and reopening failed then (e.g. the token was not back yet).
            None => {
                tracing::debug!(token = %self.token_label(), "no PKCS#11 session; opening one")
            }
        }
        if matches!(error, CkError::Pkcs11(RvError::CryptokiNotInitialized, _)) {
            initialize(&self.ctx).map_err(|e| KeyError::ModuleLoad {
                path: self.module.clone(),
                detail: e.to_string(),
            })?;
        }
        let found = find_token(&self.ctx, &self.uri, &self.module).map_err(|e| match e {
            // The token was there when the key was opened: it has been removed.
            KeyError::NoToken { .. } => KeyError::TokenNotPresent {
                token: self.token_label(),
                module: self.module.clone(),
            },
            e => e,
        })?;
        *lock(&self.token) = found;
        *state = Some(self.open_session()?);
        Ok(())
    }

    /// Runs `f` on the session, off the async workers, reopening the session and retrying once
    /// after a session error.
    pub(super) fn with_session<T>(
        &self,
        f: impl Fn(&Open) -> Result<T, CkError>,
    ) -> Result<T, KeyError> {
        off_worker(|| {
            let mut state = lock(&self.state);
            let first = match state.as_ref() {
                Some(open) => f(open),
                None => Err(CkError::Pkcs11(
                    RvError::SessionClosed,
                    cryptoki::context::Function::Sign,
                )),
            };
            match first {
                Ok(v) => Ok(v),
                Err(e) if is_recoverable(&e) => {
                    self.reopen(&mut state, &e)?;
                    let open = state
                        .as_ref()
                        .ok_or(KeyError::Sign(SignFailure::NoSession))?;
                    f(open).map_err(|e| KeyError::Sign(e.into()))
                }
                Err(e) => Err(KeyError::Sign(e.into())),
            }
        })
    }
}
