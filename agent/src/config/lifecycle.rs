//! `[provision]` and `[rotation]` (SPEC §6, §8).

use std::path::PathBuf;
use std::time::Duration;

use super::read::{Cx, Table};
use super::{ProxySetting, proxy_for};
use crate::keys::{Algorithm, KeySource, PinSource};
use crate::net::{Proxy, ProxyEnv, TlsServer};

/// Default `[provision] startup_jitter_seconds` (core's fleet analysis: 0–300 s spreads a batch
/// powered on at once; see BENCHMARKS.md).
pub const DEFAULT_START_JITTER: u64 = iotcred_core::lifecycle::PROVISION_STARTUP_JITTER.as_secs();

/// The MQTT port of AWS IoT's data endpoint.
pub const MQTT_PORT: u16 = 8883;

/// `[provision]`: fleet provisioning by claim over MQTT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Provision {
    /// AWS IoT data endpoint, `host[:port]` (port 8883 unless given; 443 uses ALPN).
    pub endpoint: TlsServer,
    /// The claim certificate (needed only while the device has no identity).
    pub claim_certificate: Option<PathBuf>,
    /// The claim key (PEM path or `pkcs11:` URI).
    pub claim_key: Option<KeySource>,
    /// Trust anchors for the MQTT endpoint; `None` = the built-in Amazon roots.
    pub ca: Option<PathBuf>,
    /// The provisioning template (needed only while the device has no identity).
    pub template: Option<String>,
    /// CSR subject.
    pub subject: String,
    /// MQTT client id; `None` = `iotcred-<16 random hex digits>` per connection.
    pub client_id: Option<String>,
    /// RegisterThing parameters.
    pub parameters: Vec<(String, String)>,
    /// Where the device key is made; `None` = a new PEM file in `<state_dir>/keys/`.
    pub key: Option<KeySource>,
    /// Key algorithm.
    pub algorithm: Algorithm,
    /// Bound of every MQTT wait (connect, SUBACK, PUBACK, reply).
    pub timeout: Duration,
    /// The CONNECT proxy for the MQTT endpoint, resolved like the credentials endpoint's.
    pub proxy: Option<Proxy>,
    /// `run`'s first provisioning try waits a random time up to this (a fleet powered on at
    /// once spreads its requests); also bounds the wait of a rotation already due at start.
    pub start_jitter: Duration,
}

/// `[rotation]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rotation {
    /// Rotate when the leaf certificate expires within this many days.
    pub before_days: u32,
    /// The RegisterThing template of a rotation.
    pub template: String,
    /// RegisterThing parameters (the agent adds `ThingName`).
    pub parameters: Vec<(String, String)>,
}

impl Rotation {
    /// `before_days` as a duration.
    pub fn before(&self) -> Duration {
        Duration::from_secs(u64::from(self.before_days) * 86_400)
    }
}

/// AWS IoT provisioning template names: 1–36 of `[0-9A-Za-z_-]`.
pub fn valid_template(name: &str) -> bool {
    (1..=36).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn template(cx: &Cx<'_>, t: &mut Table<'_, '_>, section: &str) -> Option<Option<String>> {
    match t.str("template") {
        None => Some(None),
        Some(v) if valid_template(v.value) => Some(Some(v.value.to_string())),
        Some(v) => {
            cx.report(
                &v,
                format!(
                    "{section}.template = {:?}: a template name is 1 to 36 letters, digits, '_' or '-'",
                    v.value
                ),
            );
            None
        }
    }
}

fn key_source(cx: &Cx<'_>, t: &mut Table<'_, '_>, key: &'static str) -> Option<Option<KeySource>> {
    let Some(v) = t.str(key) else {
        return Some(None);
    };
    if v.value
        .trim_start()
        .to_ascii_lowercase()
        .starts_with("pkcs11:")
    {
        let src = cx.check(
            &v,
            format_args!("provision.{key}"),
            KeySource::parse(v.value),
        )?;
        if let KeySource::Pkcs11(uri) = &src {
            if matches!(uri.pin, Some(PinSource::Value(_))) {
                cx.report(
                    &v,
                    format!(
                        "provision.{key}: pin-value cannot be used here (the URI is recorded in identity.toml): use pin-source=file:PATH"
                    ),
                );
                return None;
            }
            if key == "key" && uri.object.is_none() {
                cx.report(
                    &v,
                    "provision.key: the pkcs11: URI needs object= (the key's label) so the key can be found again",
                );
                return None;
            }
        }
        Some(Some(src))
    } else {
        cx.path(&v, key).map(|p| Some(KeySource::Pem(p)))
    }
}

/// Reads `[provision]`; `endpoint_host` is the credentials endpoint's, for the proxy
/// environment.
pub(super) fn read_provision(
    cx: &Cx<'_>,
    t: &mut Table<'_, '_>,
    env: &ProxyEnv,
    proxy_setting: Option<&ProxySetting>,
) -> Option<Provision> {
    let endpoint = t
        .required_str(
            "endpoint",
            "give the AWS IoT data endpoint, e.g. \"a1example-ats.iot.eu-west-1.amazonaws.com\" (`aws iot describe-endpoint --endpoint-type iot:Data-ATS`)",
        )
        .and_then(|v| {
            cx.check(
                &v,
                format_args!("provision.endpoint = {:?}", v.value),
                TlsServer::parse(v.value, MQTT_PORT),
            )
        });
    let claim_certificate = match t.str("claim_certificate") {
        None => Some(None),
        Some(v) => cx.path(&v, "claim_certificate").map(Some),
    };
    let claim_key = key_source(cx, t, "claim_key");
    let ca = match t.str("ca") {
        None => Some(None),
        Some(v) => cx.path(&v, "ca").map(Some),
    };
    let template = template(cx, t, "provision");
    let subject = t
        .str("subject")
        .map_or_else(|| "CN=iotcred".to_string(), |v| v.value.to_string());
    let client_id = match t.str("client_id") {
        None => Some(None),
        Some(v)
            if (1..=128).contains(&v.value.len())
                && v.value.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            Some(Some(v.value.to_string()))
        }
        Some(v) => {
            cx.report(
                &v,
                "provision.client_id: give 1 to 128 printable ASCII characters without spaces",
            );
            None
        }
    };
    let parameters = t.strings("parameters");
    let key = key_source(cx, t, "key");
    let algorithm = match t.str("algorithm") {
        None => Some(Algorithm::EcP256),
        Some(v) => cx.check(
            &v,
            format_args!("provision.algorithm = {:?}", v.value),
            v.value.parse::<Algorithm>(),
        ),
    };
    if let (Some(Some(KeySource::Pem(_))) | Some(None), Some(Algorithm::Rsa2048)) =
        (&key, &algorithm)
    {
        cx.report_at(
            Some(t.span()),
            "provision.algorithm = \"rsa-2048\" needs a pkcs11: key (RSA keys are made only in a token): use ec-p256 for a PEM key",
        );
    }
    let timeout = t.int_in("timeout_seconds", 30, 1, 300);
    let start_jitter = t.int_in("startup_jitter_seconds", DEFAULT_START_JITTER, 0, 86_400);
    let endpoint = endpoint?;
    let proxy = match proxy_setting {
        Some(s) => proxy_for(cx, s, env, endpoint.addr().host())?,
        None => None,
    };
    Some(Provision {
        endpoint,
        claim_certificate: claim_certificate?,
        claim_key: claim_key?,
        ca: ca?,
        template: template?,
        subject,
        client_id: client_id?,
        parameters: parameters?,
        key: key?,
        algorithm: algorithm?,
        timeout: Duration::from_secs(timeout?),
        proxy,
        start_jitter: Duration::from_secs(start_jitter?),
    })
}

/// Reads `[rotation]`.
pub(super) fn read_rotation(cx: &Cx<'_>, t: &mut Table<'_, '_>) -> Option<Rotation> {
    let before_days = t
        .int_in("before_days", 30, 1, 3650)
        .and_then(|d| u32::try_from(d).ok());
    let template = match template(cx, t, "rotation") {
        Some(Some(tpl)) => Some(tpl),
        Some(None) => {
            cx.report_at(
                Some(t.span()),
                "`rotation.template` is missing: give the RegisterThing template for rotations, e.g. \"GatewayRotationTemplate\"",
            );
            None
        }
        None => None,
    };
    let parameters = t.strings("parameters");
    if let Some(p) = &parameters {
        if p.iter().any(|(k, _)| k == "ThingName") {
            cx.report_at(
                Some(t.span()),
                "rotation.parameters: ThingName is added by the agent (the current thing); remove it",
            );
        }
    }
    Some(Rotation {
        before_days: before_days?,
        template: template?,
        parameters: parameters?,
    })
}
