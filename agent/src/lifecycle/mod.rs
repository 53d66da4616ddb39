//! The device identity's life (SPEC §8): fleet provisioning by claim, and certificate
//! rotation, both over AWS IoT's fleet provisioning MQTT API, as durable step machines.
//!
//! - [`provision`]: key → CSR → certificate (CreateCertificateFromCsr) → thing (RegisterThing)
//!   → `identity.toml`. Each step's result is recorded in `<state_dir>/provision.toml` before
//!   the next starts; a re-run resumes there, reusing the key, and the ownership token while it
//!   is younger than an hour.
//! - [`rotate`]: a new key next to the current one → certificate and RegisterThing (rotation
//!   template) over a connection authenticated with the current certificate → one
//!   credentials-provider exchange with the new identity (the proof) → atomic switch of
//!   `identity.toml`. The old key is destroyed by [`retire`] once the switch is durable and
//!   nothing uses the old key any more.
//!
//! Both take `<state_dir>/lock`, so one process changes the identity at a time.

pub mod pending;
mod status;
pub(crate) mod worker;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use iotcred_core::{ThingName, UnixTime};
use zeroize::Zeroizing;

use crate::config::{Config, Provision, RoleSource};
use crate::exit::Exit;
use crate::identity::{self, IdentityRecord, StateLock};
use crate::keys::pkcs11::off_worker as blocking;
use crate::keys::{self, KeySource};
use crate::mqtt::{MqttError, MqttSession, MqttTarget};
use crate::tls;
use pending::{Issued, Pending};
pub use status::{IdentityState, RotationState, Status};

/// CreateCertificateFromCsr's request topic.
pub const CREATE_FROM_CSR: &str = "$aws/certificates/create-from-csr/json";
/// How long AWS IoT honours a certificate ownership token.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
/// The progress record of a provisioning.
pub const PROVISION_FILE: &str = "provision.toml";
/// The progress record of a rotation.
pub const ROTATION_FILE: &str = "rotation.toml";

/// RegisterThing's request topic for `template`.
pub fn register_topic(template: &str) -> String {
    format!("$aws/provisioning-templates/{template}/provision/json")
}

/// Which step machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `provision`.
    Provision,
    /// `rotate`.
    Rotation,
}

/// The steps, for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Configuration and the credentials to connect with.
    Setup,
    /// The device key and its CSR.
    Key,
    /// CreateCertificateFromCsr.
    Certificate,
    /// RegisterThing.
    Thing,
    /// One credentials-provider exchange with the new identity (rotation).
    Proof,
    /// Writing `identity.toml`.
    Identity,
}

impl Step {
    fn describe(self) -> &'static str {
        match self {
            Step::Setup => "setup",
            Step::Key => "step 1 (key and CSR)",
            Step::Certificate => "step 2 (certificate: CreateCertificateFromCsr)",
            Step::Thing => "step 3 (thing: RegisterThing)",
            Step::Proof => "step 4 (proof: one credentials exchange with the new certificate)",
            Step::Identity => "the switch of identity.toml",
        }
    }
}

/// Why a provisioning or rotation stopped. `Display`: which machine, which step, what
/// happened, what to fix.
#[derive(Debug)]
pub struct LifecycleError {
    /// Which machine.
    pub kind: Kind,
    /// Which step.
    pub step: Step,
    /// The exit code of SPEC §5 this maps to.
    pub exit: Exit,
    /// What happened and what to fix.
    pub message: String,
    /// RegisterThing refused the ownership token: the next run requests a new certificate.
    pub token_refused: bool,
    /// A `/rejected` reply that a later try may not get: throttling (429) or an AWS-side
    /// error (5xx). It still exits 3 (SPEC §8.1), but the agent retries it like a transient
    /// failure rather than waiting as after a refusal.
    pub throttled: bool,
}

impl std::fmt::Display for LifecycleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.kind {
            Kind::Provision => "provisioning",
            Kind::Rotation => "rotation",
        };
        write!(
            f,
            "{what} failed at {}: {}",
            self.step.describe(),
            self.message
        )
    }
}

impl std::error::Error for LifecycleError {}

/// What a finished run did.
#[derive(Debug)]
pub struct Outcome {
    /// Lines for the user.
    pub lines: Vec<String>,
    /// Whether the identity changed (`identity.toml` was switched).
    pub switched: bool,
    /// Rotation: the key (and certificate file) replaced, to [`retire`] once nothing uses it.
    pub retired: Option<Retired>,
}

impl Outcome {
    fn unchanged(line: String) -> Outcome {
        Outcome {
            lines: vec![line],
            switched: false,
            retired: None,
        }
    }
}

/// The identity a rotation replaced.
#[derive(Debug, Clone)]
pub struct Retired {
    /// The old key.
    pub key: KeySource,
}

/// A step's error builder.
struct Ctx {
    kind: Kind,
}

impl Ctx {
    fn err(&self, step: Step, exit: Exit, message: impl Into<String>) -> LifecycleError {
        LifecycleError {
            kind: self.kind,
            step,
            exit,
            message: message.into(),
            token_refused: false,
            throttled: false,
        }
    }

    fn io(&self, step: Step, what: &str, path: &Path, e: std::io::Error) -> LifecycleError {
        self.err(
            step,
            Exit::Other,
            format!(
                "cannot {what} {}: {e}; check state_dir's permissions and free space",
                path.display()
            ),
        )
    }

    fn key(&self, e: keys::KeyError) -> LifecycleError {
        self.err(Step::Key, Exit::Config, e.to_string())
    }

    /// An MQTT failure of `step` on `topic`, with what usually fixes it.
    fn mqtt(&self, step: Step, topic: &str, e: MqttError) -> LifecycleError {
        let exit = e.exit();
        let throttled = matches!(
            &e,
            MqttError::Rejected { status_code: Some(c), .. } if *c == 429 || *c >= 500
        );
        let token_refused = matches!(
            (&e, step),
            (MqttError::Rejected { error_code, .. }, Step::Thing)
                if error_code.to_ascii_lowercase().contains("token")
        );
        let hint = match (&e, step) {
            _ if throttled => {
                "AWS IoT throttled the request or failed on its side: try again later (the agent retries with backoff); a batch of devices powered on together needs [provision] startup_jitter_seconds or a higher quota".to_string()
            }
            _ if token_refused => {
                "the certificate ownership token was refused (expired or used): a re-run requests a new certificate".to_string()
            }
            (MqttError::Rejected { .. }, Step::Certificate) => {
                "check the CSR's key algorithm and subject ([provision] algorithm, subject) and that the policy allows iot:Publish/iot:Receive on $aws/certificates/create-from-csr/*".to_string()
            }
            (MqttError::Rejected { .. }, _) => format!(
                "check that the template exists and is enabled, its parameters (the config's parameters), its pre-provisioning hook, and that the policy allows iot:Publish/iot:Receive on {topic}/*"
            ),
            _ => String::new(),
        };
        let message = if hint.is_empty() {
            e.to_string()
        } else {
            format!("{e}; {hint}")
        };
        LifecycleError {
            token_refused,
            throttled,
            ..self.err(step, exit, message)
        }
    }
}

/// A fresh MQTT client id: `iotcred-` and 16 random hex digits.
fn random_client_id() -> String {
    format!("iotcred-{}", random_hex(8))
}

/// `n` random bytes in hex.
fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    let _ = getrandom::fill(&mut b);
    crate::server::hex(&b)
}

fn mqtt_target(p: &Provision) -> MqttTarget {
    MqttTarget {
        server: p.endpoint.clone(),
        proxy: p.proxy.clone(),
        client_id: p.client_id.clone().unwrap_or_else(random_client_id),
        timeout: p.timeout,
    }
}

async fn connect(
    cx: &Ctx,
    step: Step,
    p: &Provision,
    tls: Arc<rustls::ClientConfig>,
) -> Result<MqttSession, LifecycleError> {
    MqttSession::connect(&mqtt_target(p), tls)
        .await
        .map_err(|e| cx.mqtt(step, &p.endpoint.to_string(), e))
}

/// Where a new PEM key goes: a fresh file name in `<state_dir>/keys/`.
fn new_pem_key(state_dir: &Path) -> KeySource {
    KeySource::Pem(
        state_dir
            .join(identity::KEYS_DIR)
            .join(format!("device-{}.key", random_hex(8))),
    )
}

/// Where a key made next to `like` goes: in its token under the same label with a new random
/// `CKA_ID`, or a new PEM file in `<state_dir>/keys/`.
fn new_key_beside(
    cx: &Ctx,
    like: &KeySource,
    state_dir: &Path,
) -> Result<KeySource, LifecycleError> {
    match like {
        KeySource::Pkcs11(uri) => uri.with_new_id().map(KeySource::Pkcs11).map_err(|e| {
            cx.err(
                Step::Key,
                Exit::Other,
                format!("no randomness for a new key id: {e}"),
            )
        }),
        KeySource::Pem(_) => Ok(new_pem_key(state_dir)),
    }
}

/// Step 1: the key at `src` (made when missing, reused when a run left it) and a CSR for it,
/// with the key's SubjectPublicKeyInfo.
fn key_and_csr(
    cx: &Ctx,
    src: &KeySource,
    subject: &str,
    algorithm: keys::Algorithm,
) -> Result<(String, Vec<u8>), LifecycleError> {
    blocking(|| {
        let csr = if keys::key_exists(src).map_err(|e| cx.key(e))? {
            tracing::info!(key = %src, "reusing the key an earlier run made");
            keys::csr_for_existing(src, subject).map_err(|e| cx.key(e))?
        } else {
            tracing::info!(key = %src, "making the device key");
            keys::keygen_exact(src, subject, algorithm).map_err(|e| cx.key(e))?
        };
        let spki = keys::public_key_spki(src).map_err(|e| cx.key(e))?;
        Ok((csr, spki))
    })
}

/// A certificate id usable as a file name: AWS's are 64 hex digits.
fn valid_certificate_id(id: &str) -> bool {
    (1..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// Step 2: CreateCertificateFromCsr; the certificate must carry our key. Writes it to
/// `<state_dir>/certificates/<id>.pem.crt` and returns it with the token.
async fn create_certificate(
    cx: &Ctx,
    session: &mut MqttSession,
    csr: &str,
    spki: &[u8],
    state_dir: &Path,
) -> Result<Issued, LifecycleError> {
    let step = Step::Certificate;
    let reply = session
        .call(
            CREATE_FROM_CSR,
            &serde_json::json!({ "certificateSigningRequest": csr }),
        )
        .await
        .map_err(|e| cx.mqtt(step, CREATE_FROM_CSR, e))?;
    let field = |name: &str| {
        reply
            .get(name)
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .ok_or_else(|| {
                cx.err(
                    step,
                    Exit::Transient,
                    format!("the accepted reply on {CREATE_FROM_CSR}/accepted has no {name}"),
                )
            })
    };
    let id = field("certificateId")?;
    let pem = field("certificatePem")?;
    let token = Zeroizing::new(field("certificateOwnershipToken")?);
    if !valid_certificate_id(&id) {
        return Err(cx.err(
            step,
            Exit::Transient,
            "the reply's certificateId is not an AWS IoT certificate id",
        ));
    }
    match tls::certificate_spki(pem.as_bytes()) {
        Some(k) if k == spki => {}
        Some(_) => {
            return Err(cx.err(
                step,
                Exit::Transient,
                format!(
                    "the certificate in the reply (id {id}) carries another public key than this device's key: refused, nothing recorded; a re-run requests a new one"
                ),
            ));
        }
        None => {
            return Err(cx.err(
                step,
                Exit::Transient,
                format!("the certificatePem of the reply (id {id}) is not a PEM certificate"),
            ));
        }
    }
    let path = state_dir
        .join(identity::CERTIFICATES_DIR)
        .join(format!("{id}.pem.crt"));
    blocking(|| crate::sinks::write_atomic(&path, 0o644, pem.as_bytes()))
        .map_err(|e| cx.io(step, "write the certificate", &path, e))?;
    tracing::info!(certificate_id = %id, path = %path.display(), "certificate received");
    Ok(Issued {
        certificate_id: id,
        path,
        ownership_token: token,
        token_received_at: u64::try_from(UnixTime::now().as_secs()).unwrap_or(0),
    })
}

/// Whether a token received at `at` can still be used for a RegisterThing sent now and
/// answered within `timeout` (with a minute's margin for clock steps).
fn token_usable(at: u64, timeout: Duration) -> bool {
    let now = u64::try_from(UnixTime::now().as_secs()).unwrap_or(0);
    let margin = 60 + 2 * timeout.as_secs();
    now >= at && now - at + margin < TOKEN_LIFETIME.as_secs()
}

/// Step 3: RegisterThing; returns the thing name and the device configuration.
async fn register_thing(
    cx: &Ctx,
    session: &mut MqttSession,
    template: &str,
    parameters: &[(String, String)],
    token: &str,
) -> Result<(ThingName, BTreeMap<String, String>), LifecycleError> {
    let step = Step::Thing;
    let topic = register_topic(template);
    let params: serde_json::Map<String, serde_json::Value> = parameters
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    let reply = session
        .call(
            &topic,
            &serde_json::json!({ "certificateOwnershipToken": token, "parameters": params }),
        )
        .await
        .map_err(|e| cx.mqtt(step, &topic, e))?;
    let thing = reply
        .get("thingName")
        .and_then(|v| v.as_str())
        .and_then(|t| ThingName::new(t).ok())
        .ok_or_else(|| {
            cx.err(
                step,
                Exit::Transient,
                format!("the accepted reply on {topic}/accepted has no valid thingName"),
            )
        })?;
    let config = reply
        .get("deviceConfiguration")
        .and_then(|v| v.as_object())
        .map(|o| {
            o.iter()
                .map(|(k, v)| {
                    let v = match v {
                        serde_json::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    (k.clone(), v)
                })
                .collect()
        })
        .unwrap_or_default();
    Ok((thing, config))
}

/// Steps 2 and 3 over one connection authenticated by `tls`: the certificate (reused from
/// `pending` while its token is usable, else requested and recorded), then RegisterThing with
/// `template` and `parameters`. A token that RegisterThing refuses is forgotten; when this run
/// did not request the certificate itself, it requests one new certificate and registers again
/// (so at most one certificate is requested per run). Returns the certificate, the thing name
/// and the device configuration.
#[allow(clippy::too_many_arguments)]
async fn certificate_and_thing(
    cx: &Ctx,
    p: &Provision,
    tls: &Arc<rustls::ClientConfig>,
    pending: &mut Pending,
    record_path: &Path,
    (csr, spki): (&str, &[u8]),
    template: &str,
    parameters: &[(String, String)],
) -> Result<(Issued, ThingName, BTreeMap<String, String>), LifecycleError> {
    let state_dir = record_path.parent().unwrap_or(Path::new("."));
    let mut session: Option<MqttSession> = None;
    let mut requested = false;
    let result = loop {
        let issued = match pending.certificate.take() {
            Some(i) if token_usable(i.token_received_at, p.timeout) && i.path.is_file() => {
                tracing::info!(certificate_id = %i.certificate_id, "reusing the certificate and ownership token of an earlier run");
                i
            }
            stale => {
                if stale.is_some() {
                    tracing::info!(
                        "the ownership token of the earlier run is too old: requesting a new certificate"
                    );
                }
                let s = match &mut session {
                    Some(s) => s,
                    None => session.insert(connect(cx, Step::Certificate, p, tls.clone()).await?),
                };
                let issued = match create_certificate(cx, s, csr, spki, state_dir).await {
                    Ok(i) => i,
                    Err(e) => break Err(e),
                };
                requested = true;
                pending.certificate = Some(issued.clone());
                if let Err(e) = blocking(|| pending.save(record_path)) {
                    break Err(cx.io(Step::Certificate, "record progress in", record_path, e));
                }
                issued
            }
        };
        let s = match &mut session {
            Some(s) => s,
            None => match connect(cx, Step::Thing, p, tls.clone()).await {
                Ok(s) => session.insert(s),
                Err(e) => {
                    pending.certificate = Some(issued);
                    return Err(e);
                }
            },
        };
        match register_thing(cx, s, template, parameters, &issued.ownership_token).await {
            Ok((thing, config)) => break Ok((issued, thing, config)),
            Err(e) if e.token_refused => {
                // The token is spent or expired: the certificate it owned is of no use.
                pending.certificate = None;
                if let Err(io) = blocking(|| pending.save(record_path)) {
                    break Err(cx.io(Step::Thing, "record progress in", record_path, io));
                }
                if requested {
                    break Err(e);
                }
                tracing::info!("the ownership token was refused: requesting a new certificate");
            }
            Err(e) => {
                pending.certificate = Some(issued);
                break Err(e);
            }
        }
    };
    if let Some(s) = session.take() {
        s.close().await;
    }
    result
}

/// The last step: `identity.toml` replaced atomically by `record`, then the progress record
/// removed. A kill in between leaves a progress record for an identity already in place: the
/// next `provision` removes it; the next rotation discards it (it names another certificate),
/// and the key the interrupted rotation replaced is then not destroyed.
fn switch(
    cx: &Ctx,
    state_dir: &Path,
    record_path: &Path,
    record: &IdentityRecord,
) -> Result<(), LifecycleError> {
    blocking(|| {
        record.write(state_dir)?;
        Pending::remove(record_path)
    })
    .map_err(|e| cx.io(Step::Identity, "write", &IdentityRecord::path(state_dir), e))
}

fn lock(cx: &Ctx, state_dir: &Path, wait: Duration) -> Result<StateLock, LifecycleError> {
    blocking(|| {
        identity::ensure_state_dir(state_dir)
            .map_err(|e| cx.io(Step::Setup, "create", state_dir, e))?;
        StateLock::acquire(state_dir, wait).map_err(|e| {
            if e.kind() == std::io::ErrorKind::WouldBlock {
                cx.err(Step::Setup, Exit::Transient, e.to_string())
            } else {
                cx.io(Step::Setup, "lock", &state_dir.join(identity::LOCK_FILE), e)
            }
        })
    })
}

/// `iotcred provision` (SPEC §8.1). A device that has an identity sends nothing.
pub async fn provision(config: &Config, dry_run: bool) -> Result<Outcome, LifecycleError> {
    let cx = Ctx {
        kind: Kind::Provision,
    };
    let setup = |m: String| cx.err(Step::Setup, Exit::Config, m);
    let p = config
        .provision
        .as_ref()
        .ok_or_else(|| setup("no [provision] in the configuration: add it (SPEC §6)".into()))?;
    if let Some(done) = already_provisioned(config) {
        // A run killed between the switch and the removal of its progress record left it.
        let _ = blocking(|| Pending::remove(&config.state_dir.join(PROVISION_FILE)));
        return Ok(Outcome::unchanged(done));
    }
    let (Some(claim_cert), Some(claim_key), Some(template)) =
        (&p.claim_certificate, &p.claim_key, &p.template)
    else {
        return Err(setup(
            "[provision] needs claim_certificate, claim_key and template on a device without an identity".into(),
        ));
    };
    let claim = blocking(|| tls::load_device(claim_cert, claim_key, p.ca.as_deref()))
        .map_err(|e| setup(format!("claim {e}")))?;
    if dry_run {
        let session = connect(&cx, Step::Setup, p, claim.client_config).await?;
        session.close().await;
        return Ok(Outcome::unchanged(format!(
            "dry run: configuration, claim certificate ({}, valid to {}) and claim key OK; MQTT connection to {} OK; nothing sent",
            claim_cert.display(),
            claim.cert.not_after.rfc3339(),
            p.endpoint
        )));
    }
    let state_dir = &config.state_dir;
    let _lock = lock(&cx, state_dir, p.timeout)?;
    let record_path = state_dir.join(PROVISION_FILE);
    // Another process may have finished while we waited for the lock.
    if let Ok(Some(r)) = IdentityRecord::load(state_dir) {
        let _ = blocking(|| Pending::remove(&record_path));
        return Ok(Outcome::unchanged(format!(
            "already provisioned: thing {} (identity.toml); nothing sent",
            r.thing_name.as_str()
        )));
    }
    let mut pending = match Pending::load(&record_path)
        .map_err(|e| cx.io(Step::Setup, "read", &record_path, e))?
    {
        Some(p) => {
            tracing::info!(progress = ?p, "resuming an unfinished provisioning");
            p
        }
        None => {
            let key = match &p.key {
                None => new_pem_key(state_dir),
                // A label without an id gets a new random id, so that this key stays apart
                // from the keys later rotations make under the same label — unless a key with
                // that label already exists (made by the user): then it is used as configured.
                Some(src @ KeySource::Pkcs11(uri)) if uri.id.is_none() => {
                    if blocking(|| keys::key_exists(src)).map_err(|e| cx.key(e))? {
                        src.clone()
                    } else {
                        new_key_beside(&cx, src, state_dir)?
                    }
                }
                Some(k) => k.clone(),
            };
            let fresh = Pending {
                key,
                certificate: None,
                replaces: None,
            };
            // Recorded before the key is made: a kill after that finds and reuses the key.
            blocking(|| fresh.save(&record_path))
                .map_err(|e| cx.io(Step::Key, "record progress in", &record_path, e))?;
            fresh
        }
    };
    let (csr, spki) = key_and_csr(&cx, &pending.key, &p.subject, p.algorithm)?;

    let (issued, thing, device_configuration) = certificate_and_thing(
        &cx,
        p,
        &claim.client_config,
        &mut pending,
        &record_path,
        (&csr, &spki),
        template,
        &p.parameters,
    )
    .await?;
    let lines = vec![
        format!("provisioned: thing {}", thing.as_str()),
        format!(
            "certificate: {} (id {})",
            issued.path.display(),
            issued.certificate_id
        ),
        format!("key: {}", pending.key),
        format!("identity: {}", IdentityRecord::path(state_dir).display()),
    ];
    let record = IdentityRecord {
        thing_name: thing,
        certificate: issued.path,
        key: pending.key,
        certificate_id: Some(issued.certificate_id),
        device_configuration,
    };
    switch(&cx, state_dir, &record_path, &record)?;
    Ok(Outcome {
        lines,
        switched: true,
        retired: None,
    })
}

/// `Some(message)` when the device already has an identity (nothing to provision).
fn already_provisioned(config: &Config) -> Option<String> {
    let device = config.device.as_ref()?;
    let thing = config
        .thing_name
        .as_ref()
        .map_or("(no thing name)", |t| t.as_str());
    Some(format!(
        "already provisioned: thing {thing}, certificate {} ({}); nothing sent",
        device.certificate.display(),
        config.origins.certificate.describe()
    ))
}

/// When a certificate expiring at `not_after` is due for rotation with `before`.
pub fn rotation_due_at(not_after: UnixTime, before: Duration) -> UnixTime {
    not_after.saturating_sub(before)
}

/// `iotcred rotate` and the agent's rotation (SPEC §8.2). Unless `force`, nothing happens
/// before the certificate is within `before_days` of its expiry.
pub async fn rotate(config: &Config, force: bool) -> Result<Outcome, LifecycleError> {
    let cx = Ctx {
        kind: Kind::Rotation,
    };
    let setup = |m: String| cx.err(Step::Setup, Exit::Config, m);
    let (Some(p), Some(rot)) = (&config.provision, &config.rotation) else {
        return Err(setup(
            "rotation needs [rotation] (before_days, template) and [provision] (the AWS IoT data endpoint) in the configuration".into(),
        ));
    };
    let (Some(device), Some(thing)) = (&config.device, &config.thing_name) else {
        return Err(setup(
            "the device has no identity (or no thing name) to rotate: run `iotcred provision` first, or set thing_name".into(),
        ));
    };
    let current = blocking(|| tls::load_device(&device.certificate, &device.key, p.ca.as_deref()))
        .map_err(|e| {
            cx.err(
                Step::Setup,
                Exit::Config,
                format!("the current identity cannot connect: {e}"),
            )
        })?;
    let not_after = current.cert.not_after;
    let due = rotation_due_at(not_after, rot.before());
    if !force && !iotcred_core::lifecycle::rotation_due(not_after, UnixTime::now(), rot.before_days)
    {
        return Ok(Outcome::unchanged(format!(
            "not due: the certificate expires {}; rotation starts {} (before_days = {}); use --force to rotate now",
            not_after.rfc3339(),
            due.rfc3339(),
            rot.before_days
        )));
    }
    let state_dir = &config.state_dir;
    let _lock = lock(&cx, state_dir, p.timeout)?;
    if let Ok(Some(r)) = IdentityRecord::load(state_dir) {
        if r.certificate != device.certificate {
            return Ok(Outcome::unchanged(format!(
                "the identity changed meanwhile (now {}): nothing to do",
                r.certificate.display()
            )));
        }
    }
    let record_path = state_dir.join(ROTATION_FILE);
    let loaded =
        Pending::load(&record_path).map_err(|e| cx.io(Step::Setup, "read", &record_path, e))?;
    let mut pending = match loaded {
        Some(pd) if pd.replaces.as_ref() == Some(&device.certificate) && pd.key != device.key => {
            tracing::info!(progress = ?pd, "resuming an unfinished rotation");
            pd
        }
        other => {
            if let Some(stale) = other {
                tracing::warn!(progress = ?stale, "discarding a rotation record made for another identity");
                if stale.key != device.key {
                    let _ = blocking(|| keys::destroy_key(&stale.key));
                }
            }
            let key = new_key_beside(&cx, &device.key, state_dir)?;
            let fresh = Pending {
                key,
                certificate: None,
                replaces: Some(device.certificate.clone()),
            };
            blocking(|| fresh.save(&record_path))
                .map_err(|e| cx.io(Step::Key, "record progress in", &record_path, e))?;
            fresh
        }
    };
    let subject = &p.subject;
    let (csr, spki) = key_and_csr(&cx, &pending.key, subject, p.algorithm)?;
    let mut parameters = rot.parameters.clone();
    parameters.push(("ThingName".into(), thing.as_str().to_string()));
    let (issued, registered_thing, device_configuration) = certificate_and_thing(
        &cx,
        p,
        &current.client_config,
        &mut pending,
        &record_path,
        (&csr, &spki),
        &rot.template,
        &parameters,
    )
    .await?;
    if registered_thing != *thing {
        return Err(cx.err(
            Step::Thing,
            Exit::Permanent,
            format!(
                "template {} registered the new certificate with thing {:?}, not {:?}: the rotation template must attach it to the existing thing (its ThingName parameter)",
                rot.template,
                registered_thing.as_str(),
                thing.as_str()
            ),
        ));
    }
    prove(&cx, config, &issued.path, &pending.key).await?;
    let device_configuration = if device_configuration.is_empty() {
        config
            .record
            .as_ref()
            .map(|r| r.device_configuration.clone())
            .unwrap_or_default()
    } else {
        device_configuration
    };
    let record = IdentityRecord {
        thing_name: thing.clone(),
        certificate: issued.path.clone(),
        key: pending.key.clone(),
        certificate_id: Some(issued.certificate_id.clone()),
        device_configuration,
    };
    switch(&cx, state_dir, &record_path, &record)?;
    Ok(Outcome {
        lines: vec![
            format!("rotated: thing {}", thing.as_str()),
            format!(
                "certificate: {} (id {}), replaces {} (expiring {})",
                issued.path.display(),
                issued.certificate_id,
                device.certificate.display(),
                not_after.rfc3339()
            ),
            format!("key: {}", pending.key),
        ],
        switched: true,
        retired: Some(Retired {
            key: device.key.clone(),
        }),
    })
}

/// Step 4 of a rotation: one exchange with the credentials provider using the new certificate
/// and key, for the first provider role.
async fn prove(
    cx: &Ctx,
    config: &Config,
    certificate: &Path,
    key: &KeySource,
) -> Result<(), LifecycleError> {
    let step = Step::Proof;
    let identity = blocking(|| tls::load_device(certificate, key, config.ca.as_deref()))
        .map_err(|e| cx.err(step, Exit::Transient, e.to_string()))?;
    let Some(role) = config.roles.iter().find_map(|r| match &r.source {
        RoleSource::Provider(p) => Some(p),
        RoleSource::Chained(_) => None,
    }) else {
        return Err(cx.err(
            step,
            Exit::Config,
            "no [[role]] with role_alias to prove the new identity with",
        ));
    };
    let upstream = crate::upstream::Upstream::new(config, identity.client_config);
    match upstream.fetch(role).await {
        Ok(_) => Ok(()),
        Err(e) => Err(cx.err(
            step,
            e.class().into(),
            format!(
                "the new certificate does not work with the credentials provider yet: {e}; the old identity stays in use and a later try repeats the proof"
            ),
        )),
    }
}

/// After a rotation's switch is durable and nothing uses the old identity: destroys the old
/// key. A failure is logged: the new identity is in use either way. (The old certificate file
/// stays: it is public, and it stays ACTIVE in AWS IoT until the cloud deactivates it.)
pub fn retire(old: &Retired) {
    blocking(|| match keys::destroy_key(&old.key) {
        Ok(()) => tracing::info!(key = %old.key, "old key destroyed"),
        Err(e) => tracing::warn!(key = %old.key, error = %e, "cannot destroy the old key"),
    });
}

/// `check`'s lines about provisioning.
pub fn check_lines(config: &Config) {
    if let Some(p) = &config.provision {
        println!(
            "provision: MQTT endpoint {} (template {}, state_dir {})",
            p.endpoint,
            p.template.as_deref().unwrap_or("none"),
            config.state_dir.display()
        );
        if config.device.is_none() {
            match (&p.claim_certificate, &p.claim_key) {
                (Some(c), Some(k)) => match tls::load_device(c, k, p.ca.as_deref()) {
                    Ok(i) => println!(
                        "claim certificate: {} OK (valid to {}), claim key {k} matches",
                        c.display(),
                        i.cert.not_after.rfc3339()
                    ),
                    Err(e) => println!("claim certificate: problem: {e}"),
                },
                _ => println!("claim certificate: not configured"),
            }
        }
    }
}

/// `check`'s line about rotation for a certificate expiring at `not_after`.
pub fn check_rotation(config: &Config, not_after: UnixTime) {
    match &config.rotation {
        Some(rot) => {
            let due = rotation_due_at(not_after, rot.before());
            let state = if UnixTime::now() >= due {
                "due now"
            } else {
                "not due"
            };
            println!(
                "rotation: {state}: certificate expires {}, rotation from {} (before_days = {}, template {})",
                not_after.rfc3339(),
                due.rfc3339(),
                rot.before_days,
                rot.template
            );
            if config.state_dir.join(ROTATION_FILE).exists() {
                println!(
                    "rotation: an unfinished rotation is recorded in {}",
                    config.state_dir.join(ROTATION_FILE).display()
                );
            }
        }
        None => println!("rotation: off (no [rotation])"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_age_limits() {
        let now = u64::try_from(UnixTime::now().as_secs()).unwrap();
        let t = Duration::from_secs(30);
        assert!(token_usable(now, t));
        assert!(token_usable(now - 3000, t));
        assert!(!token_usable(now - 3500, t));
        assert!(
            !token_usable(now + 100, t),
            "a token from the future (clock stepped back)"
        );
    }

    #[test]
    fn certificate_ids_are_file_names() {
        assert!(valid_certificate_id(&"ab".repeat(32)));
        for bad in ["", "../x", "a/b", "a.b", &"a".repeat(129)] {
            assert!(!valid_certificate_id(bad), "{bad}");
        }
    }

    #[test]
    fn due_point() {
        let na = UnixTime::from_secs(100 * 86_400);
        assert_eq!(
            rotation_due_at(na, Duration::from_secs(30 * 86_400)),
            UnixTime::from_secs(70 * 86_400)
        );
        assert_eq!(
            rotation_due_at(UnixTime::from_secs(5), Duration::from_secs(30 * 86_400)),
            UnixTime::from_secs(5 - 30 * 86_400)
        );
    }
}
