//! The fake AWS IoT's state: certificates, things, ownership tokens, templates, counters and the
//! fault knobs. Shared by the MQTT responder (which calls [`Registry::create_certificate_from_csr`]
//! and [`Registry::register_thing`]) and the fake credentials provider (which calls
//! [`Registry::provider_allows`]).
//!
//! What it mimics of AWS IoT, and where it deliberately differs:
//! - A certificate made from a CSR is signed by the test CA, keeps the CSR's subject (AWS may
//!   replace it: the agent must not depend on either), gets a random serial, `clientAuth`, and a
//!   validity of [`Registry::set_certificate_validity`] from one minute ago. Its id is the hex
//!   SHA-256 of its DER (64 hex digits, like AWS's certificateId), its status `PENDING_ACTIVATION`.
//! - The ownership token is 64 random bytes (base64), opaque, valid for
//!   [`Registry::set_token_lifetime`] (default 1 h, may be zero or negative: already expired).
//!   A token may be presented again while it is valid: the second RegisterThing with the same
//!   token answers the same (an agent killed after publishing RegisterThing re-sends it with the
//!   token it saved); [`Registry::set_single_use_tokens`] makes a second use a rejection.
//! - Templates enforce their parameters, create (or reuse) the thing, activate the certificate
//!   and attach it. Rejections carry `{"statusCode","errorCode","errorMessage"}`.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use rcgen::{
    CertificateSigningRequestParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData as _, SerialNumber,
};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use crate::pki::Pki;
use crate::provider::Error;
use crate::timefmt;

/// The two request/reply operations of the fleet-provisioning MQTT API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Step {
    /// `$aws/certificates/create-from-csr/json`.
    CreateCertificateFromCsr,
    /// `$aws/provisioning-templates/<template>/provision/json`.
    RegisterThing,
}

/// What the responder does to a request instead of answering it normally.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StepFault {
    /// Answer on `<topic>/rejected` with this body.
    Reject {
        /// `statusCode`.
        status: u16,
        /// `errorCode`.
        code: String,
        /// `errorMessage`.
        message: String,
    },
    /// Count the request, answer nothing (like a broker dropping a reply).
    Drop,
}

impl StepFault {
    /// A rejection.
    pub fn reject(status: u16, code: &str, message: &str) -> StepFault {
        StepFault::Reject {
            status,
            code: code.to_owned(),
            message: message.to_owned(),
        }
    }
}

/// Status of a certificate in the registry (AWS's names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertStatus {
    /// Created from a CSR, not yet used by RegisterThing.
    PendingActivation,
    /// Activated by a template.
    Active,
    /// Deactivated ([`Registry::set_status`]).
    Inactive,
}

/// A certificate the fake IoT issued.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertRecord {
    /// Hex SHA-256 of the DER.
    pub id: String,
    /// The certificate, PEM.
    pub pem: String,
    /// The certificate, DER.
    pub der: Vec<u8>,
    /// SubjectPublicKeyInfo (DER) in the certificate.
    pub public_key: Vec<u8>,
    /// SubjectPublicKeyInfo (DER) of the CSR it was made from (differs from `public_key` only
    /// under [`Registry::set_wrong_public_key`]).
    pub csr_public_key: Vec<u8>,
    /// Status.
    pub status: CertStatus,
    /// The thing it is attached to.
    pub thing: Option<String>,
    /// notAfter, Unix seconds.
    pub not_after_unix: i64,
}

/// A thing in the registry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Thing {
    /// Thing name.
    pub name: String,
    /// Attributes set by the template (e.g. `SerialNumber`).
    pub attributes: BTreeMap<String, String>,
    /// Ids of the certificates attached to it, in attachment order.
    pub certificates: Vec<String>,
}

/// Request counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// CreateCertificateFromCsr requests received (answered or not).
    pub csr_requests: u64,
    /// Of those, answered on `/accepted`.
    pub csr_accepted: u64,
    /// RegisterThing requests received (any template).
    pub register_requests: u64,
    /// Of those, answered on `/accepted`.
    pub register_accepted: u64,
    /// Credentials-provider exchanges checked against the registry.
    pub provider_checks: u64,
    /// Of those, refused (403).
    pub provider_refusals: u64,
}

/// What a template does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TemplateKind {
    /// Fleet provisioning: requires `parameter`; thing name = `prefix` + its value; the value is
    /// stored as a thing attribute of the same name.
    Fleet {
        /// The required parameter, e.g. `SerialNumber`.
        parameter: String,
        /// Thing name prefix, e.g. `gw-`.
        prefix: String,
    },
    /// Rotation: requires `ThingName` naming an existing thing.
    Rotation,
}

/// A provisioning template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    /// Template name (the topic's `<template>`).
    pub name: String,
    /// Behaviour.
    pub kind: TemplateKind,
    /// `deviceConfiguration` of the accepted reply.
    pub device_configuration: BTreeMap<String, String>,
}

/// Name of the default fleet template.
pub const FLEET_TEMPLATE: &str = "GatewayFleetTemplate";
/// Name of the default rotation template.
pub const ROTATION_TEMPLATE: &str = "GatewayRotationTemplate";

impl Template {
    /// `GatewayFleetTemplate`: `SerialNumber` required, thing `gw-<SerialNumber>`,
    /// deviceConfiguration `{"region":"eu-west-1"}`.
    pub fn fleet_default() -> Template {
        Template {
            name: FLEET_TEMPLATE.to_owned(),
            kind: TemplateKind::Fleet {
                parameter: "SerialNumber".to_owned(),
                prefix: "gw-".to_owned(),
            },
            device_configuration: BTreeMap::from([("region".to_owned(), "eu-west-1".to_owned())]),
        }
    }

    /// `GatewayRotationTemplate`: `ThingName` of an existing thing required; empty
    /// deviceConfiguration.
    pub fn rotation_default() -> Template {
        Template {
            name: ROTATION_TEMPLATE.to_owned(),
            kind: TemplateKind::Rotation,
            device_configuration: BTreeMap::new(),
        }
    }
}

#[derive(Debug)]
struct Token {
    certificate_id: String,
    expires: Instant,
    /// The template and parameters of the first RegisterThing, and its answer.
    used: Option<(String, BTreeMap<String, String>, Value)>,
}

#[derive(Debug, Default)]
struct Faults {
    persistent: Option<StepFault>,
    once: VecDeque<StepFault>,
}

#[derive(Debug)]
struct Inner {
    certs: BTreeMap<String, CertRecord>,
    cert_order: Vec<String>,
    things: BTreeMap<String, Thing>,
    tokens: HashMap<String, Token>,
    templates: BTreeMap<String, Template>,
    counters: Counters,
    faults: HashMap<Step, Faults>,
    token_lifetime: i64,
    validity: i64,
    wrong_public_key: bool,
    single_use_tokens: bool,
    provider_frozen: Option<HashSet<String>>,
    provider_seen: Vec<String>,
}

/// The fake IoT's registry and knobs. Cheap to share (`Arc`); every method takes `&self`.
#[derive(Debug)]
pub struct Registry {
    inner: Mutex<Inner>,
    changed: Condvar,
    ca: Mutex<Option<Issuer<'static, KeyPair>>>,
}

/// A reply the responder sends (or not).
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    /// Publish this JSON on `<topic>/accepted`.
    Accepted(Value),
    /// Publish this JSON on `<topic>/rejected`.
    Rejected(Value),
    /// Publish nothing.
    Nothing,
}

fn rejected(status: u16, code: &str, message: &str) -> Reply {
    Reply::Rejected(json!({"statusCode": status, "errorCode": code, "errorMessage": message}))
}

impl Registry {
    /// An empty registry with the two default templates, token lifetime 1 h, certificate
    /// validity 365 days, no faults. The CA is set by [`Registry::set_ca`] (the fake IoT does it
    /// when it starts).
    pub fn new() -> Arc<Registry> {
        let templates = [Template::fleet_default(), Template::rotation_default()]
            .into_iter()
            .map(|t| (t.name.clone(), t))
            .collect();
        Arc::new(Registry {
            inner: Mutex::new(Inner {
                certs: BTreeMap::new(),
                cert_order: Vec::new(),
                things: BTreeMap::new(),
                tokens: HashMap::new(),
                templates,
                counters: Counters::default(),
                faults: HashMap::new(),
                token_lifetime: 3600,
                validity: 365 * 86_400,
                wrong_public_key: false,
                single_use_tokens: false,
                provider_frozen: None,
                provider_seen: Vec::new(),
            }),
            changed: Condvar::new(),
            ca: Mutex::new(None),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn notify(&self) {
        self.changed.notify_all();
    }

    /// Signs with the root CA of `pki`.
    pub fn set_ca(&self, pki: &Pki) -> Result<(), Error> {
        let read = |p: &std::path::Path| {
            std::fs::read_to_string(p).map_err(|e| Error::io(format!("reading {}", p.display()), e))
        };
        let bad = |e: rcgen::Error| Error::Config(format!("test CA: {e}"));
        let key = KeyPair::from_pem(&read(&pki.ca_key)?).map_err(bad)?;
        let issuer = Issuer::from_ca_cert_pem(&read(&pki.ca_cert)?, key).map_err(bad)?;
        *self.ca.lock().unwrap_or_else(|p| p.into_inner()) = Some(issuer);
        Ok(())
    }

    // ---- knobs ----

    /// Applies `fault` to every request of `step` until cleared (`None`).
    pub fn set_fault(&self, step: Step, fault: Option<StepFault>) {
        self.lock().faults.entry(step).or_default().persistent = fault;
    }

    /// Applies `fault` to the next request of `step` only (queued before persistent faults).
    pub fn push_fault(&self, step: Step, fault: StepFault) {
        self.lock()
            .faults
            .entry(step)
            .or_default()
            .once
            .push_back(fault);
    }

    /// Removes every fault.
    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    /// Lifetime of the ownership tokens issued from now on (seconds; ≤ 0: already expired).
    pub fn set_token_lifetime(&self, seconds: i64) {
        self.lock().token_lifetime = seconds;
    }

    /// Makes every token issued so far expire now.
    pub fn expire_tokens(&self) {
        let now = Instant::now();
        for t in self.lock().tokens.values_mut() {
            t.expires = now;
        }
    }

    /// Validity of certificates issued from now on, in seconds from issuance.
    pub fn set_certificate_validity(&self, seconds: i64) {
        self.lock().validity = seconds;
    }

    /// When true, certificates are issued for a fresh random key instead of the CSR's.
    pub fn set_wrong_public_key(&self, on: bool) {
        self.lock().wrong_public_key = on;
    }

    /// When true, a token presented to RegisterThing a second time is rejected.
    pub fn set_single_use_tokens(&self, on: bool) {
        self.lock().single_use_tokens = on;
    }

    /// Adds or replaces a template.
    pub fn add_template(&self, template: Template) {
        self.lock()
            .templates
            .insert(template.name.clone(), template);
    }

    /// Names of the known templates.
    pub fn template_names(&self) -> Vec<String> {
        self.lock().templates.keys().cloned().collect()
    }

    /// From now on the credentials provider accepts only the certificates that it would accept
    /// now (ACTIVE and attached): a certificate activated later gets 403 (e.g. the proof exchange
    /// of a rotation). Undone by [`Registry::unfreeze_provider`].
    pub fn freeze_provider(&self) {
        let mut st = self.lock();
        let ok = st
            .certs
            .values()
            .filter(|c| c.status == CertStatus::Active && c.thing.is_some())
            .map(|c| c.id.clone())
            .collect();
        st.provider_frozen = Some(ok);
    }

    /// Ends [`Registry::freeze_provider`].
    pub fn unfreeze_provider(&self) {
        self.lock().provider_frozen = None;
    }

    /// Sets a certificate's status (e.g. INACTIVE, as a cloud-side hook would).
    pub fn set_status(&self, certificate_id: &str, status: CertStatus) {
        if let Some(c) = self.lock().certs.get_mut(certificate_id) {
            c.status = status;
        }
        self.notify();
    }

    // ---- observation ----

    /// The counters.
    pub fn counters(&self) -> Counters {
        self.lock().counters
    }

    /// Every certificate issued, in issuance order.
    pub fn certificates(&self) -> Vec<CertRecord> {
        let st = self.lock();
        st.cert_order
            .iter()
            .filter_map(|id| st.certs.get(id).cloned())
            .collect()
    }

    /// One certificate.
    pub fn certificate(&self, id: &str) -> Option<CertRecord> {
        self.lock().certs.get(id).cloned()
    }

    /// One thing.
    pub fn thing(&self, name: &str) -> Option<Thing> {
        self.lock().things.get(name).cloned()
    }

    /// Every thing.
    pub fn things(&self) -> Vec<Thing> {
        self.lock().things.values().cloned().collect()
    }

    /// The ACTIVE certificates attached to `thing`.
    pub fn active_certificates_of(&self, thing: &str) -> Vec<CertRecord> {
        self.certificates()
            .into_iter()
            .filter(|c| c.status == CertStatus::Active && c.thing.as_deref() == Some(thing))
            .collect()
    }

    /// Every ownership token issued (secrets: for the tests' search of logs).
    pub fn tokens(&self) -> Vec<String> {
        self.lock().tokens.keys().cloned().collect()
    }

    /// Ids of the client certificates the credentials provider checked, in order (an id that
    /// is not in the registry too).
    pub fn provider_seen(&self) -> Vec<String> {
        self.lock().provider_seen.clone()
    }

    /// Blocks until `pred` holds for the counters or `limit` passes; returns whether it held.
    /// Woken on every change (no polling).
    pub fn wait_counters(&self, limit: Duration, mut pred: impl FnMut(&Counters) -> bool) -> bool {
        let deadline = Instant::now() + limit;
        let mut st = self.lock();
        loop {
            if pred(&st.counters) {
                return true;
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return false;
            };
            st = self
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    // ---- the API ----

    fn take_fault(st: &mut Inner, step: Step) -> Option<StepFault> {
        let f = st.faults.get_mut(&step)?;
        f.once.pop_front().or_else(|| f.persistent.clone())
    }

    /// Handles a CreateCertificateFromCsr request payload.
    pub fn create_certificate_from_csr(&self, payload: &[u8]) -> Reply {
        let (fault, validity, wrong_key, lifetime) = {
            let mut st = self.lock();
            st.counters.csr_requests += 1;
            let fault = Self::take_fault(&mut st, Step::CreateCertificateFromCsr);
            (fault, st.validity, st.wrong_public_key, st.token_lifetime)
        };
        self.notify();
        match fault {
            Some(StepFault::Drop) => return Reply::Nothing,
            Some(StepFault::Reject {
                status,
                code,
                message,
            }) => return rejected(status, &code, &message),
            None => {}
        }
        let Ok(body) = serde_json::from_slice::<Value>(payload) else {
            return rejected(400, "InvalidPayload", "The payload is not valid JSON.");
        };
        let Some(csr_pem) = body
            .get("certificateSigningRequest")
            .and_then(Value::as_str)
        else {
            return rejected(
                400,
                "InvalidPayload",
                "certificateSigningRequest is missing.",
            );
        };
        let cert = match self.sign(csr_pem, validity, wrong_key) {
            Ok(c) => c,
            Err(msg) => return rejected(400, "InvalidCSR", &msg),
        };
        let token = random_token();
        let reply = json!({
            "certificateId": cert.id,
            "certificatePem": cert.pem,
            "certificateOwnershipToken": token,
        });
        {
            let mut st = self.lock();
            let expires = instant_after(lifetime);
            st.tokens.insert(
                token,
                Token {
                    certificate_id: cert.id.clone(),
                    expires,
                    used: None,
                },
            );
            st.cert_order.push(cert.id.clone());
            st.certs.insert(cert.id.clone(), cert);
            st.counters.csr_accepted += 1;
        }
        self.notify();
        Reply::Accepted(reply)
    }

    fn sign(&self, csr_pem: &str, validity: i64, wrong_key: bool) -> Result<CertRecord, String> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| format!("The CSR could not be parsed or its signature is invalid: {e}"))?;
        let now = timefmt::unix_seconds(SystemTime::now());
        let ts = |s: i64| time::OffsetDateTime::from_unix_timestamp(s).map_err(|e| e.to_string());
        let p = &mut csr.params;
        p.not_before = ts(now - 60)?;
        p.not_after = ts(now + validity)?;
        let mut serial = [0u8; 16];
        getrandom::fill(&mut serial).map_err(|e| e.to_string())?;
        serial[0] = (serial[0] & 0x7f) | 0x01;
        p.serial_number = Some(SerialNumber::from_slice(&serial));
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.subject_alt_names.clear();
        p.use_authority_key_identifier_extension = true;
        let ca = self.ca.lock().unwrap_or_else(|p| p.into_inner());
        let ca = ca
            .as_ref()
            .ok_or("the fake IoT has no CA (Registry::set_ca)")?;
        let csr_public_key = csr.public_key.subject_public_key_info();
        let (cert, public_key) = if wrong_key {
            let other =
                KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
            let cert = csr
                .params
                .signed_by(&other, ca)
                .map_err(|e| e.to_string())?;
            (cert, other.subject_public_key_info())
        } else {
            let cert = csr.signed_by(ca).map_err(|e| e.to_string())?;
            (cert, csr_public_key.clone())
        };
        let der = cert.der().to_vec();
        Ok(CertRecord {
            id: certificate_id(&der),
            pem: cert.pem(),
            der,
            public_key,
            csr_public_key,
            status: CertStatus::PendingActivation,
            thing: None,
            not_after_unix: now + validity,
        })
    }

    /// Handles a RegisterThing request for `template`.
    pub fn register_thing(&self, template: &str, payload: &[u8]) -> Reply {
        let mut st = self.lock();
        st.counters.register_requests += 1;
        let fault = Self::take_fault(&mut st, Step::RegisterThing);
        let reply = match fault {
            Some(StepFault::Drop) => Reply::Nothing,
            Some(StepFault::Reject {
                status,
                code,
                message,
            }) => rejected(status, &code, &message),
            None => Self::register_locked(&mut st, template, payload),
        };
        if matches!(reply, Reply::Accepted(_)) {
            st.counters.register_accepted += 1;
        }
        drop(st);
        self.notify();
        reply
    }

    fn register_locked(st: &mut Inner, template_name: &str, payload: &[u8]) -> Reply {
        let Some(template) = st.templates.get(template_name).cloned() else {
            return rejected(
                404,
                "ResourceNotFoundException",
                &format!("Template {template_name} not found"),
            );
        };
        let Ok(body) = serde_json::from_slice::<Value>(payload) else {
            return rejected(400, "InvalidPayload", "The payload is not valid JSON.");
        };
        let token = body
            .get("certificateOwnershipToken")
            .and_then(Value::as_str)
            .unwrap_or("");
        if token.is_empty() {
            return rejected(
                400,
                "InvalidCertificateOwnershipToken",
                "Certificate ownership token cannot be empty.",
            );
        }
        let mut params = BTreeMap::new();
        if let Some(obj) = body.get("parameters").and_then(Value::as_object) {
            for (k, v) in obj {
                let Some(v) = v.as_str() else {
                    return rejected(
                        400,
                        "InvalidParameters",
                        &format!("Parameter {k} must be a string."),
                    );
                };
                params.insert(k.clone(), v.to_owned());
            }
        }
        let single_use = st.single_use_tokens;
        let Some(tok) = st.tokens.get(token) else {
            return rejected(
                400,
                "InvalidCertificateOwnershipToken",
                "Certificate ownership token is invalid.",
            );
        };
        if Instant::now() >= tok.expires {
            return rejected(
                400,
                "InvalidCertificateOwnershipToken",
                "Certificate ownership token has expired.",
            );
        }
        if let Some((t, p, answer)) = &tok.used {
            if single_use || t != template_name || p != &params {
                return rejected(
                    400,
                    "InvalidCertificateOwnershipToken",
                    "Certificate ownership token has already been used.",
                );
            }
            return Reply::Accepted(answer.clone());
        }
        let cert_id = tok.certificate_id.clone();
        let (thing_name, attributes) = match &template.kind {
            TemplateKind::Fleet { parameter, prefix } => {
                let Some(v) = params.get(parameter).filter(|v| !v.is_empty()) else {
                    return rejected(
                        400,
                        "InvalidParameters",
                        &format!("Missing required parameter {parameter}."),
                    );
                };
                (
                    format!("{prefix}{v}"),
                    BTreeMap::from([(parameter.clone(), v.clone())]),
                )
            }
            TemplateKind::Rotation => {
                let Some(name) = params.get("ThingName").filter(|v| !v.is_empty()) else {
                    return rejected(
                        400,
                        "InvalidParameters",
                        "Missing required parameter ThingName.",
                    );
                };
                if !st.things.contains_key(name) {
                    return rejected(
                        400,
                        "InvalidParameters",
                        &format!("Thing {name} does not exist."),
                    );
                }
                (name.clone(), BTreeMap::new())
            }
        };
        let thing = st
            .things
            .entry(thing_name.clone())
            .or_insert_with(|| Thing {
                name: thing_name.clone(),
                ..Thing::default()
            });
        thing.attributes.extend(attributes);
        if !thing.certificates.contains(&cert_id) {
            thing.certificates.push(cert_id.clone());
        }
        if let Some(c) = st.certs.get_mut(&cert_id) {
            c.status = CertStatus::Active;
            c.thing = Some(thing_name.clone());
        }
        let answer = json!({
            "thingName": thing_name,
            "deviceConfiguration": template.device_configuration,
        });
        if let Some(tok) = st.tokens.get_mut(token) {
            tok.used = Some((template_name.to_owned(), params, answer.clone()));
        }
        Reply::Accepted(answer)
    }

    /// The credentials provider's check: whether the client certificate (leaf DER) may get
    /// credentials for `thing_name`. `Err(message)` is the 403 body's message.
    pub fn provider_allows(&self, leaf_der: &[u8], thing_name: Option<&str>) -> Result<(), String> {
        let id = certificate_id(leaf_der);
        let mut st = self.lock();
        st.counters.provider_checks += 1;
        st.provider_seen.push(id.clone());
        let verdict = match st.certs.get(&id) {
            Some(c) if c.status != CertStatus::Active => Err("Access Denied".to_owned()),
            Some(c) if thing_name.is_some() && c.thing.as_deref() != thing_name => {
                Err("Invalid thing name passed".to_owned())
            }
            Some(_)
                if st
                    .provider_frozen
                    .as_ref()
                    .is_some_and(|ok| !ok.contains(&id)) =>
            {
                Err("Access Denied".to_owned())
            }
            Some(_) => Ok(()),
            None => Err("Access Denied".to_owned()),
        };
        if verdict.is_err() {
            st.counters.provider_refusals += 1;
        }
        drop(st);
        self.notify();
        verdict
    }
}

/// Hex SHA-256 of a certificate's DER: AWS IoT's certificateId.
pub fn certificate_id(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn instant_after(seconds: i64) -> Instant {
    let now = Instant::now();
    if seconds <= 0 {
        now
    } else {
        now + Duration::from_secs(seconds as u64)
    }
}

fn random_token() -> String {
    const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bytes = [0u8; 96];
    getrandom::fill(&mut bytes).expect("the OS random source failed");
    bytes
        .iter()
        .map(|b| B64[(*b & 63) as usize] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DistinguishedName, DnType};

    fn csr(key: &KeyPair) -> String {
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "iotcred");
        p.distinguished_name = dn;
        p.serialize_request(key).unwrap().pem().unwrap()
    }

    fn setup() -> (tempfile::TempDir, Arc<Registry>) {
        let (dir, pki) = Pki::generate_temp("t").unwrap();
        let r = Registry::new();
        r.set_ca(&pki).unwrap();
        (dir, r)
    }

    fn accepted(r: Reply) -> Value {
        match r {
            Reply::Accepted(v) => v,
            other => panic!("not accepted: {other:?}"),
        }
    }

    #[test]
    fn provision_flow_and_idempotent_register() {
        let (_d, r) = setup();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let req = json!({"certificateSigningRequest": csr(&key)}).to_string();
        let a = accepted(r.create_certificate_from_csr(req.as_bytes()));
        let id = a["certificateId"].as_str().unwrap().to_owned();
        assert_eq!(id.len(), 64);
        let c = r.certificate(&id).unwrap();
        assert_eq!(c.status, CertStatus::PendingActivation);
        assert_eq!(c.public_key, key.subject_public_key_info());
        let reg = json!({"certificateOwnershipToken": a["certificateOwnershipToken"],
                         "parameters": {"SerialNumber": "42"}})
        .to_string();
        let b = accepted(r.register_thing(FLEET_TEMPLATE, reg.as_bytes()));
        assert_eq!(b["thingName"], "gw-42");
        assert_eq!(b["deviceConfiguration"]["region"], "eu-west-1");
        assert_eq!(r.active_certificates_of("gw-42").len(), 1);
        assert!(r.provider_allows(&c.der, Some("gw-42")).is_ok());
        assert!(r.provider_allows(&c.der, Some("other")).is_err());
        // Same token, same request: same answer.
        assert_eq!(
            accepted(r.register_thing(FLEET_TEMPLATE, reg.as_bytes())),
            b
        );
        r.set_single_use_tokens(true);
        assert!(matches!(
            r.register_thing(FLEET_TEMPLATE, reg.as_bytes()),
            Reply::Rejected(_)
        ));
    }

    #[test]
    fn rejections() {
        let (_d, r) = setup();
        let bad = r.create_certificate_from_csr(br#"{"certificateSigningRequest":"junk"}"#);
        let Reply::Rejected(v) = bad else { panic!() };
        assert_eq!(v["errorCode"], "InvalidCSR");
        assert_eq!(v["statusCode"], 400);
        let Reply::Rejected(v) = r.register_thing("Nope", b"{}") else {
            panic!()
        };
        assert_eq!(v["statusCode"], 404);
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        r.set_token_lifetime(0);
        let a = accepted(
            r.create_certificate_from_csr(
                json!({"certificateSigningRequest": csr(&key)})
                    .to_string()
                    .as_bytes(),
            ),
        );
        let reg = json!({"certificateOwnershipToken": a["certificateOwnershipToken"],
                         "parameters": {"SerialNumber": "1"}})
        .to_string();
        let Reply::Rejected(v) = r.register_thing(FLEET_TEMPLATE, reg.as_bytes()) else {
            panic!()
        };
        assert_eq!(v["errorCode"], "InvalidCertificateOwnershipToken");
        r.set_wrong_public_key(true);
        let a = accepted(
            r.create_certificate_from_csr(
                json!({"certificateSigningRequest": csr(&key)})
                    .to_string()
                    .as_bytes(),
            ),
        );
        let c = r.certificate(a["certificateId"].as_str().unwrap()).unwrap();
        assert_ne!(c.public_key, key.subject_public_key_info());
    }
}
