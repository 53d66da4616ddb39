//! A device on a factory line: an [`Env`] whose fake provider checks the registry, a
//! [`FakeIot`], a `state_dir`, and the agent configuration of SPEC §6/§8 without a device
//! identity (`[provision]` instead of `thing_name`/`certificate`/`key`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_std::Deserialize;

use super::{FLEET_TEMPLATE, FakeIot, FakeIotOptions, ROTATION_TEMPLATE, Registry};
use crate::agent::{Env, Output};

/// The serial number every [`DeviceEnv`] config sends; the fleet template makes the thing
/// `gw-<serial>`.
pub const SERIAL: &str = "0042";
/// The thing [`SERIAL`] becomes.
pub const THING_NAME: &str = "gw-0042";
/// The SoftHSM token of [`DeviceEnv::softhsm_key`].
pub const HSM_TOKEN: &str = "iotcred";
/// Its user PIN.
pub const HSM_PIN: &str = "1234";

/// `<state_dir>/identity.toml` (SPEC §8).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(crate = "serde_std")]
pub struct Identity {
    /// Thing name.
    pub thing_name: String,
    /// Absolute path of the certificate.
    pub certificate: PathBuf,
    /// Absolute path of a PEM key, or a full `pkcs11:` URI.
    pub key: String,
    /// The certificate id, when recorded.
    #[serde(default)]
    pub certificate_id: Option<String>,
    /// `deviceConfiguration` of the RegisterThing reply.
    #[serde(default)]
    pub device_configuration: BTreeMap<String, String>,
}

/// An [`Env`] plus a fake AWS IoT sharing one registry.
#[derive(Debug)]
pub struct DeviceEnv {
    /// The fake IoT (declared first: dropped before the env's temp dir).
    pub iot: FakeIot,
    /// The registry shared by the responder and the provider.
    pub registry: Arc<Registry>,
    /// PKI, provider, logs.
    pub env: Env,
}

impl DeviceEnv {
    /// A SoftHSM token [`HSM_TOKEN`] (user PIN [`HSM_PIN`]) whose environment the agent gets,
    /// and the `pkcs11:` URI of the key labelled `device` in it (not made yet).
    pub fn softhsm_key(&mut self) -> (crate::softhsm::SoftHsm, String) {
        let hsm = crate::softhsm::SoftHsm::new().expect("SoftHSM");
        hsm.init_token(HSM_TOKEN, HSM_PIN, "5678").unwrap();
        let pin = hsm.write_pin_file("pin", HSM_PIN).unwrap();
        for (k, v) in hsm.env() {
            self.env.env(&k, &v.to_string_lossy());
        }
        let uri = hsm.uri(HSM_TOKEN, "device", &pin);
        (hsm, uri)
    }

    /// Default fake IoT.
    pub fn new() -> DeviceEnv {
        DeviceEnv::with_options(FakeIotOptions::default())
    }

    /// With broker options (e.g. denied topics).
    pub fn with_options(options: FakeIotOptions) -> DeviceEnv {
        let registry = Registry::new();
        let env = Env::with_provider(|c| c.registry = Some(registry.clone()));
        let iot = FakeIot::start(&env.pki, &env.path().join("iot"), registry.clone(), options)
            .expect("fake IoT");
        DeviceEnv { iot, registry, env }
    }

    /// `<tmp>/state` (not created: the agent creates it, 0700).
    pub fn state_dir(&self) -> PathBuf {
        self.env.path().join("state")
    }

    /// `<state_dir>/identity.toml`.
    pub fn identity_path(&self) -> PathBuf {
        self.state_dir().join("identity.toml")
    }

    /// The parsed identity, if the file exists (panics when it does not parse).
    pub fn identity(&self) -> Option<Identity> {
        let text = std::fs::read_to_string(self.identity_path()).ok()?;
        Some(toml::from_str(&text).unwrap_or_else(|e| panic!("identity.toml: {e}\n{text}")))
    }

    /// A configuration: provider endpoint, `state_dir`, `[serve] socket`, the default role with
    /// an ini sink, `[provision]` against the fake IoT (fleet template, `SerialNumber`,
    /// `timeout_seconds = 5`, no start-up jitter) with `provision_extra` appended inside the table, then `extra`
    /// (e.g. a `[rotation]` table). Returns the path.
    pub fn config(&self, provision_extra: &str, extra: &str) -> PathBuf {
        let run = self.env.runtime_dir();
        let text = format!(
            r#"endpoint = "{endpoint}"
ca = "{ca}"
timeout_seconds = 5
runtime_dir = "{run}"
state_dir = "{state}"

[serve]
socket = "{socket}"

[provision]
endpoint = "{iot}"
claim_certificate = "{claim_cert}"
claim_key = "{claim_key}"
ca = "{ca}"
template = "{FLEET_TEMPLATE}"
parameters = {{ SerialNumber = "{SERIAL}" }}
timeout_seconds = 5
# No start-up jitter: one device, and the tests wait for its first try.
startup_jitter_seconds = 0
{provision_extra}

{extra}

[[role]]
name = "default"
role_alias = "GatewayRole"
  [[role.file]]
  path = "{run}/credentials"
  format = "ini"
  mode = "0640"
"#,
            endpoint = self.env.endpoint(),
            ca = self.env.pki.ca_cert.display(),
            run = run.display(),
            state = self.state_dir().display(),
            socket = self.env.socket().display(),
            iot = self.iot.endpoint(),
            claim_cert = self.iot.claim.cert.display(),
            claim_key = self.iot.claim.key.display(),
        );
        let n = std::fs::read_dir(self.env.path())
            .map(|d| d.count())
            .unwrap_or(0);
        let path = self.env.path().join(format!("device-config-{n}.toml"));
        std::fs::write(&path, text).expect("write config");
        path
    }

    /// The `[rotation]` table with `before_days` and the rotation template.
    pub fn rotation_table(before_days: u32) -> String {
        format!("[rotation]\nbefore_days = {before_days}\ntemplate = \"{ROTATION_TEMPLATE}\"\n")
    }

    /// `iotcred provision --config <config>` (bounded by [`Env::run`]).
    pub fn provision(&self, config: &Path) -> Output {
        self.env
            .run(&["provision", "--config", &config.display().to_string()])
    }

    /// `iotcred rotate --config <config> [--force]`.
    pub fn rotate(&self, config: &Path, force: bool) -> Output {
        let c = config.display().to_string();
        let mut args = vec!["rotate", "--config", &c];
        if force {
            args.push("--force");
        }
        self.env.run(&args)
    }

    /// Asserts that no ownership token the fake issued, nor any provider secret, is in any
    /// kept log or output.
    pub fn assert_no_secrets(&self) {
        let tokens = self.registry.tokens();
        let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
        self.env.assert_no_secrets(&refs);
    }

    /// Every file under `state_dir`: no temporary file (`.tmp-` in the name) and every file of
    /// a known kind parses (TOML; PEM certificates; PEM private keys). Returns the relative paths.
    pub fn check_state_files(&self) -> Vec<String> {
        let root = self.state_dir();
        let mut out = Vec::new();
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in rd.flatten() {
                let p = e.path();
                let rel = p.strip_prefix(&root).unwrap().display().to_string();
                if p.is_dir() {
                    stack.push(p);
                    continue;
                }
                assert!(!rel.contains(".tmp-"), "temporary file left: {rel}");
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                if rel.ends_with(".toml") {
                    assert!(
                        text.parse::<toml::Table>().is_ok(),
                        "{rel} does not parse:\n{text}"
                    );
                } else if rel.ends_with(".pem.crt") {
                    assert!(
                        parse_cert_pem(&text).is_some(),
                        "{rel} is not a PEM certificate"
                    );
                } else if rel.ends_with(".key") {
                    assert!(
                        rcgen::KeyPair::from_pem(&text).is_ok(),
                        "{rel} is not a PEM private key"
                    );
                }
                out.push(rel);
            }
        }
        out.sort();
        out
    }
}

impl Default for DeviceEnv {
    fn default() -> Self {
        DeviceEnv::new()
    }
}

/// DER of the first certificate in a PEM text.
pub fn parse_cert_pem(text: &str) -> Option<Vec<u8>> {
    use rustls_pki_types::pem::PemObject as _;
    let der = rustls_pki_types::CertificateDer::pem_slice_iter(text.as_bytes())
        .next()?
        .ok()?;
    x509_parser::parse_x509_certificate(&der).ok()?;
    Some(der.to_vec())
}

/// SubjectPublicKeyInfo (DER) of the first certificate in a PEM file.
pub fn cert_public_key(path: &Path) -> Vec<u8> {
    let text = std::fs::read_to_string(path).expect("certificate file");
    let der = parse_cert_pem(&text).expect("PEM certificate");
    let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("X.509");
    cert.public_key().raw.to_vec()
}

/// A private-key object of a PKCS#11 token, as `pkcs11-tool --list-objects` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct P11Key {
    /// `CKA_LABEL`.
    pub label: String,
    /// `CKA_ID`, hex.
    pub id: String,
    /// The "Access:" line (e.g. `sensitive, always sensitive, never extractable, local`).
    pub access: String,
}

/// Runs OpenSC's `pkcs11-tool` logged in to SoftHSM token `token` with user PIN `pin`, with
/// `args`; asserts success and returns its standard output.
fn pkcs11_tool(hsm: &crate::softhsm::SoftHsm, token: &str, pin: &str, args: &[&str]) -> Vec<u8> {
    let out = hsm
        .command("pkcs11-tool")
        .args([
            "--module",
            crate::softhsm::SOFTHSM_MODULE,
            "--token-label",
            token,
            "--login",
            "--pin",
            pin,
        ])
        .args(args)
        .output()
        .expect("pkcs11-tool");
    assert!(
        out.status.success(),
        "pkcs11-tool {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The private keys in SoftHSM token `token` (OpenSC's `pkcs11-tool`, user PIN `pin`).
pub fn softhsm_private_keys(hsm: &crate::softhsm::SoftHsm, token: &str, pin: &str) -> Vec<P11Key> {
    let out = pkcs11_tool(hsm, token, pin, &["--list-objects", "--type", "privkey"]);
    let mut keys: Vec<P11Key> = Vec::new();
    for line in String::from_utf8_lossy(&out).lines() {
        if line.starts_with("Private Key Object") {
            keys.push(P11Key::default());
            continue;
        }
        let Some(k) = keys.last_mut() else { continue };
        let t = line.trim();
        if let Some(v) = t.strip_prefix("label:") {
            k.label = v.trim().to_owned();
        } else if let Some(v) = t.strip_prefix("ID:") {
            k.id = v.trim().to_owned();
        } else if let Some(v) = t.strip_prefix("Access:") {
            k.access = v.trim().to_owned();
        }
    }
    keys
}

/// The public key (SubjectPublicKeyInfo DER) of the object with CKA_ID `id_hex`.
pub fn softhsm_public_key(
    hsm: &crate::softhsm::SoftHsm,
    token: &str,
    pin: &str,
    id_hex: &str,
) -> Vec<u8> {
    pkcs11_tool(
        hsm,
        token,
        pin,
        &["--read-object", "--type", "pubkey", "--id", id_hex],
    )
}
