//! A rustls [`SigningKey`] backed by a private key object in a PKCS#11 token.
//!
//! One long-lived session per key, behind a `Mutex` (a cryptoki `Session` is `Send`, not
//! `Sync`), logged in once. After a session or device error the session is reopened, the user
//! logged in again and the operation retried once. A wrong PIN is never retried.
//!
//! Hashing is done in software (ring) and the token signs the digest: `CKM_ECDSA` (raw r‖s,
//! converted to DER), `CKM_RSA_PKCS_PSS` and `CKM_RSA_PKCS` over a DigestInfo. These work on
//! SoftHSM2, tpm2-pkcs11 and most HSMs, unlike the combined hash-and-sign mechanisms.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::{AuthPin, Ulong};
use rustls::sign::{Signer, SigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};
use rustls_pki_types::SubjectPublicKeyInfoDer;
use zeroize::Zeroizing;

use super::der;
use super::{KeyError, ObjectType, PinSource, Pkcs11Uri};

/// The kind of key in the token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// ECDSA on P-256.
    EcP256,
    /// ECDSA on P-384.
    EcP384,
    /// RSA with this many modulus bits.
    Rsa(usize),
}

/// Attributes of the private key object, as the token reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyAttributes {
    /// `CKA_TOKEN`
    pub token: bool,
    /// `CKA_PRIVATE`
    pub private: bool,
    /// `CKA_SENSITIVE`
    pub sensitive: bool,
    /// `CKA_EXTRACTABLE`
    pub extractable: bool,
    /// `CKA_ALWAYS_SENSITIVE`
    pub always_sensitive: bool,
    /// `CKA_NEVER_EXTRACTABLE`
    pub never_extractable: bool,
    /// `CKA_SIGN`
    pub sign: bool,
}

/// A private key in a PKCS#11 token, usable by rustls.
pub struct Pkcs11Key {
    inner: Arc<Inner>,
    kind: KeyKind,
    spki: Vec<u8>,
    pss: bool,
}

struct Inner {
    ctx: Pkcs11,
    module: PathBuf,
    uri: Pkcs11Uri,
    pin: Option<Zeroizing<String>>,
    /// Set once the token refused the PIN: it is never presented again by this key (a wrong
    /// PIN tried on every reconnect would lock the token). Reloading the key resets it.
    pin_rejected: AtomicBool,
    /// The token's label and slot, as last found.
    token: Mutex<(String, Slot)>,
    state: Mutex<Option<Open>>,
}

struct Open {
    session: Session,
    key: ObjectHandle,
}

impl fmt::Debug for Pkcs11Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Key")
            .field("module", &self.inner.module)
            .field("token", &self.token_label())
            .field("object", &self.inner.uri.object_selector())
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl Pkcs11Key {
    /// Loads the module, finds the token and the private key, logs in.
    pub fn open(uri: &Pkcs11Uri) -> Result<Self, KeyError> {
        if let Some(t) = uri.object_type {
            if t != ObjectType::Private {
                return Err(KeyError::WrongObjectType(match t {
                    ObjectType::Public => "public",
                    ObjectType::Cert => "cert",
                    ObjectType::SecretKey => "secret-key",
                    ObjectType::Data => "data",
                    ObjectType::Private => "private",
                }));
            }
        }
        let module = uri.module_path.clone().ok_or(KeyError::MissingModulePath)?;
        let ctx = load_module(&module)?;
        let (label, slot) = find_token(&ctx, uri, &module)?;
        let pin = read_pin(uri)?;
        let inner = Arc::new(Inner {
            ctx,
            module,
            uri: uri.clone(),
            pin,
            pin_rejected: AtomicBool::new(false),
            token: Mutex::new((label, slot)),
            state: Mutex::new(None),
        });
        let (kind, spki) = {
            let mut state = lock(&inner.state);
            let open = inner.open_session()?;
            let (kind, spki) = inner.describe(&open)?;
            *state = Some(open);
            (kind, spki)
        };
        let pss = match kind {
            KeyKind::Rsa(_) => inner.mechanism_supported(MechanismType::RSA_PKCS_PSS),
            _ => false,
        };
        tracing::debug!(module = %inner.module.display(), token = %inner.token_label(), object = %uri.object_selector(), ?kind, "PKCS#11 key ready");
        Ok(Pkcs11Key {
            inner,
            kind,
            spki,
            pss,
        })
    }

    /// The kind of key.
    pub fn kind(&self) -> KeyKind {
        self.kind
    }

    /// The label of the token holding the key.
    pub fn token_label(&self) -> String {
        self.inner.token_label()
    }

    /// The slot the token is in.
    pub fn slot_id(&self) -> u64 {
        lock(&self.inner.token).1.id()
    }

    /// The SubjectPublicKeyInfo of the key (DER).
    pub fn spki(&self) -> &[u8] {
        &self.spki
    }

    /// Reads the private key object's security attributes (for `check` and tests).
    pub fn attributes(&self) -> Result<KeyAttributes, KeyError> {
        self.inner.with_session(|open| {
            let attrs = open.session.get_attributes(
                open.key,
                &[
                    AttributeType::Token,
                    AttributeType::Private,
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::AlwaysSensitive,
                    AttributeType::NeverExtractable,
                    AttributeType::Sign,
                ],
            )?;
            let mut a = KeyAttributes {
                token: false,
                private: false,
                sensitive: false,
                extractable: true,
                always_sensitive: false,
                never_extractable: false,
                sign: false,
            };
            for attr in attrs {
                match attr {
                    Attribute::Token(v) => a.token = v,
                    Attribute::Private(v) => a.private = v,
                    Attribute::Sensitive(v) => a.sensitive = v,
                    Attribute::Extractable(v) => a.extractable = v,
                    Attribute::AlwaysSensitive(v) => a.always_sensitive = v,
                    Attribute::NeverExtractable(v) => a.never_extractable = v,
                    Attribute::Sign(v) => a.sign = v,
                    _ => {}
                }
            }
            Ok(a)
        })
    }

    /// Signs `message` with `scheme` (hashing it first). ECDSA signatures are DER.
    pub fn sign_with(&self, scheme: SignatureScheme, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        let op = SignOp::for_scheme(self.kind, scheme).ok_or_else(|| {
            KeyError::Sign(format!(
                "scheme {scheme:?} does not fit a {:?} key",
                self.kind
            ))
        })?;
        self.inner.sign(op, message)
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        match self.kind {
            KeyKind::EcP256 => vec![SignatureScheme::ECDSA_NISTP256_SHA256],
            KeyKind::EcP384 => vec![SignatureScheme::ECDSA_NISTP384_SHA384],
            KeyKind::Rsa(_) => {
                let mut v = Vec::new();
                if self.pss {
                    v.extend([
                        SignatureScheme::RSA_PSS_SHA256,
                        SignatureScheme::RSA_PSS_SHA384,
                    ]);
                }
                v.extend([
                    SignatureScheme::RSA_PKCS1_SHA256,
                    SignatureScheme::RSA_PKCS1_SHA384,
                ]);
                v
            }
        }
    }
}

impl SigningKey for Pkcs11Key {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        let scheme = self.schemes().into_iter().find(|s| offered.contains(s))?;
        Some(Box::new(Pkcs11Signer {
            inner: Arc::clone(&self.inner),
            op: SignOp::for_scheme(self.kind, scheme)?,
            scheme,
        }))
    }

    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        Some(SubjectPublicKeyInfoDer::from(self.spki.as_slice()))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        match self.kind {
            KeyKind::EcP256 | KeyKind::EcP384 => SignatureAlgorithm::ECDSA,
            KeyKind::Rsa(_) => SignatureAlgorithm::RSA,
        }
    }
}

struct Pkcs11Signer {
    inner: Arc<Inner>,
    op: SignOp,
    scheme: SignatureScheme,
}

impl fmt::Debug for Pkcs11Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Signer")
            .field("token", &self.inner.token_label())
            .field("scheme", &self.scheme)
            .finish()
    }
}

impl Signer for Pkcs11Signer {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        self.inner.sign(self.op, message).map_err(|e| {
            // The caller reports the failure (one line per failed exchange): it finds the
            // `KeyError` itself in the TLS error.
            tracing::debug!(error = %e, "PKCS#11 signing failed");
            rustls::Error::Other(rustls::OtherError(Arc::new(e)))
        })
    }

    fn scheme(&self) -> SignatureScheme {
        self.scheme
    }
}

/// How to produce a signature for one scheme.
#[derive(Clone, Copy, Debug)]
enum SignOp {
    Ecdsa(Hash),
    RsaPss(Hash),
    RsaPkcs1(Hash),
}

#[derive(Clone, Copy, Debug)]
enum Hash {
    Sha256,
    Sha384,
}

impl Hash {
    fn digest(self, message: &[u8]) -> Vec<u8> {
        let alg = match self {
            Hash::Sha256 => &ring::digest::SHA256,
            Hash::Sha384 => &ring::digest::SHA384,
        };
        ring::digest::digest(alg, message).as_ref().to_vec()
    }
}

impl SignOp {
    fn for_scheme(kind: KeyKind, scheme: SignatureScheme) -> Option<SignOp> {
        use SignatureScheme as S;
        Some(match (kind, scheme) {
            (KeyKind::EcP256, S::ECDSA_NISTP256_SHA256) => SignOp::Ecdsa(Hash::Sha256),
            (KeyKind::EcP384, S::ECDSA_NISTP384_SHA384) => SignOp::Ecdsa(Hash::Sha384),
            (KeyKind::Rsa(_), S::RSA_PSS_SHA256) => SignOp::RsaPss(Hash::Sha256),
            (KeyKind::Rsa(_), S::RSA_PSS_SHA384) => SignOp::RsaPss(Hash::Sha384),
            (KeyKind::Rsa(_), S::RSA_PKCS1_SHA256) => SignOp::RsaPkcs1(Hash::Sha256),
            (KeyKind::Rsa(_), S::RSA_PKCS1_SHA384) => SignOp::RsaPkcs1(Hash::Sha384),
            _ => return None,
        })
    }
}

/// Signs with an open session; shared by the rustls signer and `keygen`.
fn sign_in_session(
    session: &Session,
    key: ObjectHandle,
    op: SignOp,
    message: &[u8],
) -> Result<Vec<u8>, CkError> {
    match op {
        SignOp::Ecdsa(h) => {
            let raw = session.sign(&Mechanism::Ecdsa, key, &h.digest(message))?;
            der::ecdsa_raw_to_der(&raw).ok_or(CkError::InvalidValue)
        }
        SignOp::RsaPss(h) => {
            let params = match h {
                Hash::Sha256 => PkcsPssParams {
                    hash_alg: MechanismType::SHA256,
                    mgf: PkcsMgfType::MGF1_SHA256,
                    s_len: Ulong::from(32 as std::os::raw::c_ulong),
                },
                Hash::Sha384 => PkcsPssParams {
                    hash_alg: MechanismType::SHA384,
                    mgf: PkcsMgfType::MGF1_SHA384,
                    s_len: Ulong::from(48 as std::os::raw::c_ulong),
                },
            };
            session.sign(&Mechanism::RsaPkcsPss(params), key, &h.digest(message))
        }
        SignOp::RsaPkcs1(h) => {
            let mut info = match h {
                Hash::Sha256 => der::DIGEST_INFO_SHA256.to_vec(),
                Hash::Sha384 => der::DIGEST_INFO_SHA384.to_vec(),
            };
            info.extend_from_slice(&h.digest(message));
            session.sign(&Mechanism::RsaPkcs, key, &info)
        }
    }
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

/// A generic PKCS#11 failure as a [`KeyError`].
fn ck(op: &'static str) -> impl Fn(CkError) -> KeyError {
    move |e| KeyError::Pkcs11 {
        op,
        detail: e.to_string(),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub(super) fn load_module(module: &Path) -> Result<Pkcs11, KeyError> {
    let ctx = Pkcs11::new(module).map_err(|e| KeyError::ModuleLoad {
        path: module.to_owned(),
        detail: e.to_string(),
    })?;
    initialize(&ctx).map_err(|e| KeyError::ModuleLoad {
        path: module.to_owned(),
        detail: e.to_string(),
    })?;
    Ok(ctx)
}

fn initialize(ctx: &Pkcs11) -> Result<(), CkError> {
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Finds the one token matching the URI: its label and slot.
pub(super) fn find_token(
    ctx: &Pkcs11,
    uri: &Pkcs11Uri,
    module: &Path,
) -> Result<(String, Slot), KeyError> {
    let slots = ctx.get_slots_with_token().map_err(ck("C_GetSlotList"))?;
    let mut found = Vec::new();
    for slot in slots {
        if uri.slot_id.is_some_and(|id| id != slot.id()) {
            continue;
        }
        let info = match ctx.get_token_info(slot) {
            Ok(i) => i,
            Err(e) => {
                tracing::debug!(slot = slot.id(), error = %e, "skipping slot");
                continue;
            }
        };
        let label = info.label().trim_end().to_owned();
        let matches = |want: &Option<String>, have: &str| {
            want.as_deref()
                .is_none_or(|w| w.trim_end() == have.trim_end())
        };
        if matches(&uri.token, &label)
            && matches(&uri.manufacturer, info.manufacturer_id())
            && matches(&uri.serial, info.serial_number())
            && matches(&uri.model, info.model())
        {
            tracing::debug!(slot = slot.id(), token = %label, "token matches");
            found.push((label, slot));
        }
    }
    match found.len() {
        0 => Err(KeyError::NoToken {
            selector: uri.token_selector(),
            module: module.to_owned(),
        }),
        1 => Ok(found.remove(0)),
        count => Err(KeyError::AmbiguousToken {
            selector: uri.token_selector(),
            count,
        }),
    }
}

pub(super) fn read_pin(uri: &Pkcs11Uri) -> Result<Option<Zeroizing<String>>, KeyError> {
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
pub(super) fn login(
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
pub(super) fn open_logged_in(
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

/// Finds the one private key matching the URI.
pub(super) fn find_private_key(
    session: &Session,
    uri: &Pkcs11Uri,
    token_label: &str,
    module: &Path,
) -> Result<ObjectHandle, KeyError> {
    let mut template = vec![Attribute::Class(ObjectClass::PRIVATE_KEY)];
    if let Some(label) = &uri.object {
        template.push(Attribute::Label(label.as_bytes().to_vec()));
    }
    if let Some(id) = &uri.id {
        template.push(Attribute::Id(id.clone()));
    }
    let mut keys = session
        .find_objects(&template)
        .map_err(ck("C_FindObjects"))?;
    match keys.len() {
        0 => Err(KeyError::NoKey {
            selector: uri.object_selector(),
            token: token_label.to_owned(),
            module: module.to_owned(),
        }),
        1 => Ok(keys.remove(0)),
        count => Err(KeyError::AmbiguousKey {
            selector: uri.object_selector(),
            token: token_label.to_owned(),
            count,
        }),
    }
}

/// The kind and SubjectPublicKeyInfo of a private key object (looking at its public key
/// object for EC keys).
pub(super) fn describe_key(
    session: &Session,
    key: ObjectHandle,
    selector: &str,
    token_label: &str,
) -> Result<(KeyKind, Vec<u8>), KeyError> {
    let no_public = |detail: String| KeyError::NoPublicKey {
        selector: selector.to_owned(),
        token: token_label.to_owned(),
        detail,
    };
    let attrs = session
        .get_attributes(
            key,
            &[
                AttributeType::KeyType,
                AttributeType::Id,
                AttributeType::Label,
            ],
        )
        .map_err(ck("C_GetAttributeValue"))?;
    let mut key_type = None;
    let mut id = Vec::new();
    let mut label = Vec::new();
    for a in attrs {
        match a {
            Attribute::KeyType(t) => key_type = Some(t),
            Attribute::Id(v) => id = v,
            Attribute::Label(v) => label = v,
            _ => {}
        }
    }
    match key_type {
        Some(t) if t == KeyType::RSA => {
            let attrs = session
                .get_attributes(
                    key,
                    &[AttributeType::Modulus, AttributeType::PublicExponent],
                )
                .map_err(ck("C_GetAttributeValue"))?;
            let (mut n, mut e) = (Vec::new(), Vec::new());
            for a in attrs {
                match a {
                    Attribute::Modulus(v) => n = v,
                    Attribute::PublicExponent(v) => e = v,
                    _ => {}
                }
            }
            if n.is_empty() || e.is_empty() {
                return Err(no_public("the token does not show the RSA modulus".into()));
            }
            let spki = der::spki_rsa(&n, &e);
            let bits = match der::parse_spki(&spki) {
                Some(der::SpkiKey::Rsa { bits, .. }) => bits,
                _ => 0,
            };
            if bits < 2048 {
                return Err(KeyError::RsaTooSmall(bits));
            }
            Ok((KeyKind::Rsa(bits), spki))
        }
        Some(t) if t == KeyType::EC => {
            let params = session
                .get_attributes(key, &[AttributeType::EcParams])
                .map_err(ck("C_GetAttributeValue"))?
                .into_iter()
                .find_map(|a| match a {
                    Attribute::EcParams(v) => Some(v),
                    _ => None,
                })
                .unwrap_or_default();
            let (kind, oid) = if params == der::OID_P256 {
                (KeyKind::EcP256, der::OID_P256)
            } else if params == der::OID_P384 {
                (KeyKind::EcP384, der::OID_P384)
            } else {
                return Err(KeyError::UnsupportedKeyType(
                    "EC key on a curve other than P-256 or P-384".into(),
                ));
            };
            let point = ec_point(session, key, &id, &label).ok_or_else(|| {
                no_public("no public key object with the same id or label, and the private key does not show CKA_EC_POINT".into())
            })?;
            Ok((kind, der::spki_ec(oid, &point)))
        }
        Some(t) => Err(KeyError::UnsupportedKeyType(format!(
            "PKCS#11 key type {t}"
        ))),
        None => Err(KeyError::UnsupportedKeyType(
            "the token does not tell the key type".into(),
        )),
    }
}

fn ec_point(session: &Session, key: ObjectHandle, id: &[u8], label: &[u8]) -> Option<Vec<u8>> {
    let point_of = |h: ObjectHandle| -> Option<Vec<u8>> {
        session
            .get_attributes(h, &[AttributeType::EcPoint])
            .ok()?
            .into_iter()
            .find_map(|a| match a {
                Attribute::EcPoint(v) => der::unwrap_ec_point(&v),
                _ => None,
            })
    };
    let mut templates = Vec::new();
    if !id.is_empty() {
        templates.push(vec![
            Attribute::Class(ObjectClass::PUBLIC_KEY),
            Attribute::Id(id.to_vec()),
        ]);
    }
    if !label.is_empty() {
        templates.push(vec![
            Attribute::Class(ObjectClass::PUBLIC_KEY),
            Attribute::Label(label.to_vec()),
        ]);
    }
    for t in templates {
        if let Ok(handles) = session.find_objects(&t) {
            if let [h] = handles.as_slice() {
                if let Some(p) = point_of(*h) {
                    return Some(p);
                }
            }
        }
    }
    point_of(key)
}

impl Inner {
    fn token_label(&self) -> String {
        lock(&self.token).0.clone()
    }

    fn mechanism_supported(&self, mech: MechanismType) -> bool {
        let slot = lock(&self.token).1;
        match self.ctx.get_mechanism_list(slot) {
            Ok(list) => list.contains(&mech),
            Err(_) => true,
        }
    }

    /// Opens a new session, logs in and finds the key. Called with `state` locked.
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

    fn describe(&self, open: &Open) -> Result<(KeyKind, Vec<u8>), KeyError> {
        describe_key(
            &open.session,
            open.key,
            &self.uri.object_selector(),
            &self.token_label(),
        )
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

    /// Runs `f` on the session, reopening it and retrying once after a session error.
    fn with_session<T>(&self, f: impl Fn(&Open) -> Result<T, CkError>) -> Result<T, KeyError> {
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
                    .ok_or_else(|| KeyError::Sign("no session".into()))?;
                f(open).map_err(|e| KeyError::Sign(e.to_string()))
            }
            Err(e) => Err(KeyError::Sign(e.to_string())),
        }
    }

    fn sign(&self, op: SignOp, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        self.with_session(|open| sign_in_session(&open.session, open.key, op, message))
    }
}

/// Signs in an already open session (used by `keygen` for the CSR).
pub(super) fn sign_once(
    session: &Session,
    key: ObjectHandle,
    kind: KeyKind,
    scheme: SignatureScheme,
    message: &[u8],
) -> Result<Vec<u8>, KeyError> {
    let op = SignOp::for_scheme(kind, scheme)
        .ok_or_else(|| KeyError::Sign(format!("scheme {scheme:?} does not fit {kind:?}")))?;
    sign_in_session(session, key, op, message).map_err(|e| KeyError::Sign(e.to_string()))
}
