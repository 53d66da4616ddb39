//! Configuration (SPEC §6): TOML, read once at start-up (and at `SIGHUP`). Every value is parsed
//! into its type here — addresses, the proxy, the provider request of each role — so nothing is
//! parsed again later. Every problem is reported at once, each with its line: unknown keys by
//! name, wrong types, missing keys, invalid values, and the relations between roles.

mod lifecycle;
mod read;
mod roles;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use iotcred_core::render::Format;
use iotcred_core::schedule::Mode;
use iotcred_core::{CredentialDuration, PreparedRequest, RoleAlias, ThingName};
use toml::de::DeTable;

use crate::keys::KeySource;
use crate::net::{AddressError, HttpsUrl, Proxy, ProxyEnv, TlsServer};
pub use lifecycle::{MQTT_PORT, Provision, Rotation, valid_template};
use read::{Cx, Table};
use roles::{Roles, read_roles};
pub use roles::{StsValueError, check_external_id, check_role_arn, check_session_name};

use crate::identity::IdentityRecord;

/// Default configuration path.
pub const DEFAULT_PATH: &str = "/etc/iotcred/config.toml";
/// Default runtime directory (tmpfs).
pub const DEFAULT_RUNTIME_DIR: &str = "/run/iotcred";
/// Default state directory (provisioning and rotation state).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/iotcred";
/// `[serve.imds] listen` port when the address names none (the port of EC2's IMDS).
pub const IMDS_DEFAULT_PORT: u16 = 80;

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file cannot be read.
    #[error("cannot read config {path}: {source}; pass --config PATH or set IOTCRED_CONFIG")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// One or more problems in the file, in file order; `Display` gives one line each.
    #[error("{}", problem_lines(path, problems).join("\n"))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, where.
        problems: Vec<Problem>,
    },
}

impl LoadError {
    /// One line per problem: `config PATH line N: what is wrong and what to do`.
    pub fn lines(&self) -> Vec<String> {
        match self {
            LoadError::Read { .. } => vec![self.to_string()],
            LoadError::Invalid { path, problems } => problem_lines(path, problems),
        }
    }
}

fn problem_lines(path: &Path, problems: &[Problem]) -> Vec<String> {
    problems
        .iter()
        .map(|p| match p.line {
            Some(l) => format!("config {} line {l}: {}", path.display(), p.message),
            None => format!("config {}: {}", path.display(), p.message),
        })
        .collect()
}

/// One problem in the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line, when the problem has one (a missing top-level key has none).
    pub line: Option<usize>,
    /// What is wrong and what to do.
    pub message: String,
}

/// The credentials-provider endpoint, `host[:port]`: a TLS server whose host core's request
/// validation accepts, so every request to it can be built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    server: TlsServer,
}

impl Endpoint {
    /// Parses `host[:port]` (port 443 unless given).
    pub fn parse(s: &str) -> Result<Endpoint, AddressError> {
        let server = TlsServer::parse(s, 443)?;
        iotcred_core::request::validate_host(server.addr().host())
            .map_err(|_| AddressError::Host(server.addr().host().to_string()))?;
        Ok(Endpoint { server })
    }

    /// Host name or IP address (no brackets).
    pub fn host(&self) -> &str {
        self.server.addr().host()
    }

    /// TCP port.
    pub fn port(&self) -> u16 {
        self.server.addr().port()
    }

    /// Address and TLS name.
    pub fn server(&self) -> &TlsServer {
        &self.server
    }

    /// The region in an AWS IoT credentials endpoint host,
    /// `<prefix>.credentials.iot.<region>.amazonaws.com` (or `.amazonaws.com.cn`).
    pub fn region(&self) -> Option<String> {
        region_in(self.host(), |rest| match rest {
            [_, .., "credentials", "iot", region] => Some(*region),
            _ => None,
        })
    }
}

/// `host:port` (`[v6]:port`).
impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.server.fmt(f)
    }
}

/// The region of an `…amazonaws.com[.cn]` host: `pick` gets the labels before that suffix.
fn region_in(host: &str, pick: impl for<'a> Fn(&[&'a str]) -> Option<&'a str>) -> Option<String> {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let labels: Vec<&str> = host.split('.').collect();
    let rest = labels
        .strip_suffix(&["amazonaws", "com", "cn"])
        .or_else(|| labels.strip_suffix(&["amazonaws", "com"]))?;
    pick(rest).filter(|r| valid_region(r)).map(str::to_string)
}

/// An AWS region name as it appears in host names: `eu-west-1`, `us-gov-west-1`, `cn-north-1`.
fn valid_region(r: &str) -> bool {
    (2..=32).contains(&r.len())
        && r.starts_with(|c: char| c.is_ascii_lowercase())
        && !r.ends_with('-')
        && r.contains('-')
        && r.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where it was read from.
    pub path: PathBuf,
    /// Credentials-provider endpoint.
    pub endpoint: Endpoint,
    /// Thing name sent as `x-amzn-iot-thingname` (from `identity.toml` when it exists).
    pub thing_name: Option<ThingName>,
    /// The device certificate and key (from `identity.toml` when it exists); `None` only with
    /// `[provision]` on a device that has no identity yet.
    pub device: Option<Device>,
    /// Where each part of the identity came from.
    pub origins: Origins,
    /// `identity.toml`, when it exists.
    pub record: Option<IdentityRecord>,
    /// Trust anchors (PEM); `None` = built-in Amazon roots.
    pub ca: Option<PathBuf>,
    /// The CONNECT proxy for the endpoint: `proxy`, else `HTTPS_PROXY` unless `NO_PROXY`
    /// matches the endpoint host (resolved at load time); `None` = direct.
    pub proxy: Option<Proxy>,
    /// Upstream timeout (connect, handshake, whole exchange) and the longest a local request
    /// waits for a fetch.
    pub timeout: Duration,
    /// Runtime directory (tokens, default socket and files).
    pub runtime_dir: PathBuf,
    /// State directory (provisioning and rotation state, SPEC §8).
    pub state_dir: PathBuf,
    /// `[refresh]`.
    pub refresh: Refresh,
    /// `[serve]`.
    pub serve: Serve,
    /// `[sts]`: present when configured or when a chained role needs it.
    pub sts: Option<Sts>,
    /// `[provision]` (SPEC §8).
    pub provision: Option<Provision>,
    /// `[rotation]` (SPEC §8).
    pub rotation: Option<Rotation>,
    /// `[[role]]`, at least one; the first is the default role.
    pub roles: Vec<Role>,
}

/// The device certificate and its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    /// Device certificate chain (PEM, leaf first).
    pub certificate: PathBuf,
    /// Private key: PEM file or PKCS#11 URI.
    pub key: KeySource,
}

/// Where a part of the device identity came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The configuration file.
    Config,
    /// `<state_dir>/identity.toml` (written by `provision` or `rotate`).
    IdentityFile,
    /// Nowhere (yet): `[provision]` will make it.
    Missing,
}

impl Origin {
    /// For `check`.
    pub fn describe(self) -> &'static str {
        match self {
            Origin::Config => "from the configuration file",
            Origin::IdentityFile => "from identity.toml (provision/rotate)",
            Origin::Missing => "not provisioned yet",
        }
    }
}

/// Where the thing name, the certificate and the key came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Origins {
    /// `thing_name`.
    pub thing_name: Origin,
    /// `certificate`.
    pub certificate: Origin,
    /// `key`.
    pub key: Origin,
}

/// `[refresh]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refresh {
    /// Proactive or on-demand.
    pub mode: Mode,
    /// Refresh when this much lifetime is left (or half the lifetime, whichever is more).
    pub refresh_before: Duration,
    /// Maximum random jitter subtracted from the refresh point.
    pub jitter: Duration,
    /// Backoff cap.
    pub max_backoff: Duration,
}

/// `[serve]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Serve {
    /// Unix socket path.
    pub socket: PathBuf,
    /// Socket file mode.
    pub socket_mode: u32,
    /// Optional TCP listener: loopback or an ECS/EKS link-local address (SPEC §4.5).
    pub listen: Option<SocketAddr>,
    /// `[serve.imds]`: the IMDSv2-compatible endpoint (SPEC §4.4).
    pub imds: Option<Imds>,
}

/// `[serve.imds]` (SPEC §4.4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Imds {
    /// Listener: loopback, or an ECS/EKS/IMDS link-local address (port 80 when omitted).
    pub listen: SocketAddr,
    /// The one role it serves (default: the default role); it exists.
    pub role: String,
    /// IP TTL / hop limit of its connections, 1–255.
    pub hop_limit: u8,
    /// Peers allowed (SPEC §4.6); empty = any peer with a token.
    pub allow_uids: Vec<u32>,
    /// Served at `placement/region`: `region` if set, else the credentials endpoint's region;
    /// `None` = neither (404).
    pub region: Option<String>,
}

/// `[sts]` (SPEC §9).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sts {
    /// The STS endpoint (default `https://sts.<region>.amazonaws.com`).
    pub endpoint: HttpsUrl,
    /// The SigV4 signing region.
    pub region: String,
    /// Trust anchors (PEM); `None` = built-in roots.
    pub ca: Option<PathBuf>,
    /// The CONNECT proxy for the STS endpoint, resolved like [`Config::proxy`].
    pub proxy: Option<Proxy>,
}

/// One `[[role]]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Role {
    /// Name used in routes, token files and INI profiles.
    pub name: String,
    /// Where its credentials come from.
    pub source: RoleSource,
    /// Peers allowed: Unix-socket uids, and TCP peers (SPEC §4.6).
    pub allow_uids: Vec<u32>,
    /// Unix-socket gids allowed.
    pub allow_gids: Vec<u32>,
    /// File sinks.
    pub files: Vec<FileSink>,
}

/// Where a role's credentials come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RoleSource {
    /// The AWS IoT credentials provider (`role_alias`).
    Provider(ProviderRole),
    /// STS `AssumeRole` with another role's credentials (`source_role`, SPEC §9).
    Chained(ChainedRole),
}

/// A role from the credentials provider.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProviderRole {
    /// Role alias.
    pub role_alias: RoleAlias,
    /// Requested credential duration.
    pub duration: Option<CredentialDuration>,
    /// The request for it (endpoint, alias, thing name, duration), built once.
    pub request: PreparedRequest,
}

/// A role chained through STS `AssumeRole` (SPEC §9).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainedRole {
    /// The role whose credentials sign the call; it exists, and the chain has no cycle.
    pub source_role: String,
    /// `arn:aws…:iam::<account>:role/<name>`.
    pub role_arn: String,
    /// `RoleSessionName` (default: the thing name).
    pub session_name: String,
    /// `ExternalId`, when set.
    pub external_id: Option<String>,
    /// `DurationSeconds`, 900–3600 (default 3600).
    pub duration: Duration,
}

/// One `[[role.file]]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileSink {
    /// Target path.
    pub path: PathBuf,
    /// Format.
    pub format: Format,
    /// File mode.
    pub mode: u32,
}

/// The configuration path to use: `--config`, else `IOTCRED_CONFIG`, else the default.
pub fn resolve_path(cli: Option<&Path>) -> PathBuf {
    if let Some(p) = cli {
        return p.to_path_buf();
    }
    match std::env::var_os("IOTCRED_CONFIG") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(DEFAULT_PATH),
    }
}

impl Config {
    /// Reads and validates a configuration file. Relative paths inside it are resolved against
    /// the file's directory; the proxy falls back to this process's `HTTPS_PROXY`/`NO_PROXY`.
    pub fn load(path: &Path) -> Result<Config, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Validates configuration text read from `path`, with this process's proxy environment.
    pub fn parse(text: &str, path: &Path) -> Result<Config, LoadError> {
        Self::parse_with_env(text, path, &ProxyEnv::from_process())
    }

    /// Validates configuration text read from `path`, with the proxy environment `env`.
    pub fn parse_with_env(text: &str, path: &Path, env: &ProxyEnv) -> Result<Config, LoadError> {
        let cx = Cx::new(text, path);
        let (doc, syntax) = DeTable::parse_recoverable(text);
        let config = if syntax.is_empty() {
            let mut root = Table::root(&cx, &doc);
            let config = read_config(&cx, &mut root, env, path);
            root.finish();
            config
        } else {
            for e in &syntax {
                cx.report_at(e.span(), e.message().trim_end().replace('\n', " "));
            }
            None
        };
        match config {
            Some(c) if !cx.has_problems() => Ok(c),
            _ => {
                let mut problems = cx.into_problems();
                if problems.is_empty() {
                    // Every path that gives no configuration reports why; this is a fallback.
                    problems.push(Problem {
                        line: None,
                        message: "the configuration is incomplete".into(),
                    });
                }
                Err(LoadError::Invalid {
                    path: path.to_path_buf(),
                    problems,
                })
            }
        }
    }

    /// Looks a role up by name; `None` = the default (first) role.
    pub fn role(&self, name: Option<&str>) -> Option<(usize, &Role)> {
        match name {
            None => self.roles.first().map(|r| (0, r)),
            Some(n) => self.roles.iter().enumerate().find(|(_, r)| r.name == n),
        }
    }
}

/// The whole file: each part reads its keys and reports its problems; `None` when any part
/// could not give a value.
fn read_config(
    cx: &Cx<'_>,
    root: &mut Table<'_, '_>,
    env: &ProxyEnv,
    path: &Path,
) -> Option<Config> {
    let runtime_dir = dir(cx, root, "runtime_dir", DEFAULT_RUNTIME_DIR);
    let state_dir = dir(cx, root, "state_dir", DEFAULT_STATE_DIR);
    let record = match &state_dir {
        Some(d) => match IdentityRecord::load(d) {
            Ok(r) => Some(r),
            Err(e) => {
                cx.report_at(None, e.to_string());
                None
            }
        },
        None => None,
    };
    let proxy_setting = read_proxy_setting(cx, root);
    let provision = match root.table("provision") {
        None => Some(None),
        Some(mut t) => {
            let p = lifecycle::read_provision(cx, &mut t, env, proxy_setting.as_ref());
            t.finish();
            p.map(Some)
        }
    };
    let rotation = match root.table("rotation") {
        None => Some(None),
        Some(mut t) => {
            let r = lifecycle::read_rotation(cx, &mut t);
            t.finish();
            r.map(Some)
        }
    };
    let has_provision = root.has("provision");
    let identity = read_identity(
        cx,
        root,
        record.as_ref().and_then(|r| r.as_ref()),
        has_provision,
    );
    if let (Some(Some(p)), Some(None)) = (&provision, &record) {
        // Not provisioned yet: provisioning needs the claim and the template.
        for (missing, key, hint) in [
            (
                p.claim_certificate.is_none(),
                "claim_certificate",
                "the claim certificate's PEM file",
            ),
            (
                p.claim_key.is_none(),
                "claim_key",
                "the claim key's PEM file or pkcs11: URI",
            ),
            (
                p.template.is_none(),
                "template",
                "the fleet provisioning template's name",
            ),
        ] {
            if missing && identity.device_missing {
                cx.report_at(
                    None,
                    format!("`provision.{key}` is missing: the device has no identity yet; give {key} ({hint})"),
                );
            }
        }
    }
    if root.has("rotation") && !has_provision {
        cx.report_at(
            None,
            "[rotation] needs [provision] with the AWS IoT data `endpoint` (rotation uses the fleet provisioning MQTT API)",
        );
    }
    let proxy = match (&proxy_setting, &identity.endpoint) {
        (Some(setting), Some(ep)) => proxy_for(cx, setting, env, ep.host()),
        _ => None,
    };
    let timeout = root.int_in("timeout_seconds", 10, 1, 300);
    let refresh = {
        let mut t = root.section("refresh");
        let r = read_refresh(cx, &mut t);
        t.finish();
        r
    };
    let roles = read_roles(cx, root, &identity);
    let region = identity.endpoint.as_ref().and_then(Endpoint::region);
    let serve = {
        let mut t = root.section("serve");
        let default_socket = runtime_dir.as_ref().map(|d| d.join("agent.sock"));
        let s = read_serve(cx, &mut t, default_socket, &roles.names, region.as_deref());
        t.finish();
        s
    };
    let mut sts_table = root.table("sts");
    let sts = read_sts(
        cx,
        sts_table.as_mut(),
        env,
        proxy_setting.as_ref(),
        &roles,
        region,
    );
    if let Some(t) = sts_table {
        t.finish();
    }
    roles::check_file_sinks(cx, &roles.roles);
    Some(Config {
        path: path.to_path_buf(),
        endpoint: identity.endpoint?,
        thing_name: identity.thing_name?,
        device: identity.device?,
        origins: identity.origins,
        record: record?,
        ca: identity.ca?,
        proxy: proxy?,
        timeout: Duration::from_secs(timeout?),
        runtime_dir: runtime_dir?,
        state_dir: state_dir?,
        refresh: refresh?,
        serve: serve?,
        sts: sts?,
        provision: provision?,
        rotation: rotation?,
        roles: roles.roles,
    })
}

fn dir(cx: &Cx<'_>, t: &mut Table<'_, '_>, key: &'static str, default: &str) -> Option<PathBuf> {
    match t.str(key) {
        Some(v) => cx.path(&v, key),
        None => Some(PathBuf::from(default)),
    }
}

/// The device identity and where it talks to: each `None` when invalid (reported).
struct Identity {
    endpoint: Option<Endpoint>,
    thing_name: Option<Option<ThingName>>,
    device: Option<Option<Device>>,
    /// No certificate and key anywhere (allowed with `[provision]`).
    device_missing: bool,
    origins: Origins,
    ca: Option<Option<PathBuf>>,
}

/// The identity: `identity.toml`'s thing name, certificate and key override the file's;
/// with `[provision]`, the certificate and key may be missing (not provisioned yet).
fn read_identity(
    cx: &Cx<'_>,
    root: &mut Table<'_, '_>,
    record: Option<&IdentityRecord>,
    has_provision: bool,
) -> Identity {
    let endpoint = root
        .required_str(
            "endpoint",
            "give the iot:CredentialProvider endpoint host, e.g. \"xxxx.credentials.iot.eu-west-1.amazonaws.com\"",
        )
        .and_then(|v| {
            cx.check(
                &v,
                format_args!("endpoint = {:?}", v.value),
                Endpoint::parse(v.value),
            )
        });
    let thing_name = match root.str("thing_name") {
        None => Some(None),
        Some(v) => cx
            .check(&v, "thing_name", ThingName::new(v.value))
            .map(Some),
    };
    let optional = record.is_some() || has_provision;
    let certificate = if optional && !root.has("certificate") {
        root.skip(&["certificate"]);
        Some(None)
    } else {
        root.required_str(
            "certificate",
            "give the device certificate's PEM file (or configure [provision])",
        )
        .and_then(|v| cx.path(&v, "certificate"))
        .map(Some)
    };
    let key = if optional && !root.has("key") {
        root.skip(&["key"]);
        Some(None)
    } else {
        root.required_str(
            "key",
            "give the device key's PEM file or a pkcs11: URI (or configure [provision])",
        )
        .and_then(|v| {
            if v.value
                .trim_start()
                .to_ascii_lowercase()
                .starts_with("pkcs11:")
            {
                cx.check(&v, "key", KeySource::parse(v.value))
            } else {
                cx.path(&v, "key").map(KeySource::Pem)
            }
        })
        .map(Some)
    };
    let ca = match root.str("ca") {
        None => Some(None),
        Some(v) => cx.path(&v, "ca").map(Some),
    };
    let from_config = |present: bool| {
        if present {
            Origin::Config
        } else {
            Origin::Missing
        }
    };
    match record {
        Some(r) => Identity {
            endpoint,
            thing_name: thing_name.map(|_| Some(r.thing_name.clone())),
            device: Some(Some(Device {
                certificate: r.certificate.clone(),
                key: r.key.clone(),
            })),
            device_missing: false,
            origins: Origins {
                thing_name: Origin::IdentityFile,
                certificate: Origin::IdentityFile,
                key: Origin::IdentityFile,
            },
            ca,
        },
        None => {
            let origins = Origins {
                thing_name: from_config(matches!(thing_name, Some(Some(_)))),
                certificate: from_config(matches!(certificate, Some(Some(_)))),
                key: from_config(matches!(key, Some(Some(_)))),
            };
            let (device, device_missing) = match (certificate, key) {
                (Some(Some(certificate)), Some(Some(key))) => {
                    (Some(Some(Device { certificate, key })), false)
                }
                (Some(None), Some(None)) => (Some(None), true),
                (Some(None), Some(Some(_))) => {
                    cx.report_at(None, "`key` is set but `certificate` is missing: give both, or neither and let [provision] make them");
                    (None, false)
                }
                (Some(Some(_)), Some(None)) => {
                    cx.report_at(None, "`certificate` is set but `key` is missing: give both, or neither and let [provision] make them");
                    (None, false)
                }
                _ => (None, false),
            };
            Identity {
                endpoint,
                thing_name,
                device,
                device_missing,
                origins,
                ca,
            }
        }
    }
}

/// `proxy`, as configured.
enum ProxySetting {
    /// `proxy = "http://…"`: used for every upstream.
    Explicit(Proxy),
    /// Not set: `HTTPS_PROXY`/`NO_PROXY`.
    Environment,
}

fn read_proxy_setting(cx: &Cx<'_>, root: &mut Table<'_, '_>) -> Option<ProxySetting> {
    match root.str("proxy") {
        None => Some(ProxySetting::Environment),
        Some(v) => cx
            .check(
                &v,
                format_args!("proxy = {:?}", v.value),
                Proxy::parse(v.value),
            )
            .map(ProxySetting::Explicit),
    }
}

/// The proxy for `host`; `None` when `HTTPS_PROXY` is unusable (reported).
fn proxy_for(
    cx: &Cx<'_>,
    setting: &ProxySetting,
    env: &ProxyEnv,
    host: &str,
) -> Option<Option<Proxy>> {
    match setting {
        ProxySetting::Explicit(p) => Some(Some(p.clone())),
        ProxySetting::Environment => env
            .proxy_for(host)
            .map_err(|e| {
                cx.report_at(
                    None,
                    format!(
                        "HTTPS_PROXY = {:?}: {e}; fix or unset it, or set `proxy` in the config",
                        env.https_proxy.as_deref().unwrap_or_default()
                    ),
                )
            })
            .ok(),
    }
}

fn read_refresh(cx: &Cx<'_>, t: &mut Table<'_, '_>) -> Option<Refresh> {
    let mode = match t.str("mode") {
        None => Some(Mode::Proactive),
        Some(v) => match v.value {
            "proactive" => Some(Mode::Proactive),
            "on-demand" => Some(Mode::OnDemand),
            other => {
                cx.report(
                    &v,
                    format!("refresh.mode = {other:?}: use \"proactive\" or \"on-demand\""),
                );
                None
            }
        },
    };
    let refresh_before = t.int_in("refresh_before_seconds", 900, 0, 43_200);
    let jitter = t.int_in("jitter_seconds", 120, 0, 3600);
    let max_backoff = t.int_in("max_backoff_seconds", 300, 1, 3600);
    Some(Refresh {
        mode: mode?,
        refresh_before: Duration::from_secs(refresh_before?),
        jitter: Duration::from_secs(jitter?),
        max_backoff: Duration::from_secs(max_backoff?),
    })
}

fn read_serve(
    cx: &Cx<'_>,
    t: &mut Table<'_, '_>,
    default_socket: Option<PathBuf>,
    roles: &[String],
    region: Option<&str>,
) -> Option<Serve> {
    let socket = match t.str("socket") {
        Some(v) => cx.path(&v, "serve.socket"),
        None => default_socket,
    };
    let socket_mode = match t.str("socket_mode") {
        Some(v) => cx.check(&v, "serve.socket_mode", parse_mode(v.value)),
        None => Some(0o660),
    };
    let listen = match t.str("listen") {
        None => Some(None),
        Some(v) => cx
            .check(
                &v,
                format_args!("serve.listen = {:?}", v.value),
                parse_listen(v.value, Listener::Credentials),
            )
            .map(Some),
    };
    let imds = match t.table("imds") {
        None => Some(None),
        Some(mut i) => {
            let imds = read_imds(cx, &mut i, roles, region);
            if let (Some(Some(l)), Some(imds)) = (&listen, &imds) {
                if *l == imds.listen {
                    cx.report_at(
                        Some(i.span()),
                        format!(
                            "serve.imds.listen = {l} is also serve.listen: give each its own port"
                        ),
                    );
                }
            }
            i.finish();
            imds.map(Some)
        }
    };
    Some(Serve {
        socket: socket?,
        socket_mode: socket_mode?,
        listen: listen?,
        imds: imds?,
    })
}

fn read_imds(
    cx: &Cx<'_>,
    t: &mut Table<'_, '_>,
    roles: &[String],
    region: Option<&str>,
) -> Option<Imds> {
    let listen = t
        .required_str(
            "listen",
            "give the address to listen on, e.g. \"127.0.0.1:2774\"",
        )
        .and_then(|v| {
            cx.check(
                &v,
                format_args!("serve.imds.listen = {:?}", v.value),
                parse_listen(v.value, Listener::Imds),
            )
        });
    let role = match t.str("role") {
        None => roles.first().cloned(),
        Some(v) if roles.iter().any(|r| r == v.value) => Some(v.value.to_string()),
        Some(v) => {
            // Roles whose names are invalid were reported where they are.
            if valid_role_name(v.value) {
                cx.report(
                    &v,
                    format!(
                        "serve.imds.role = {:?}: no such [[role]]; roles: {}",
                        v.value,
                        roles.join(", ")
                    ),
                );
            } else {
                cx.report(
                    &v,
                    format!("serve.imds.role = {:?}: no such [[role]]", v.value),
                );
            }
            None
        }
    };
    let hop_limit = t
        .int_in("hop_limit", 1, 1, 255)
        .and_then(|h| u8::try_from(h).ok());
    let allow_uids = t.ids("allow_uids");
    let own_region = match t.str("region") {
        None => Some(None),
        Some(v) if valid_region(v.value) => Some(Some(v.value.to_string())),
        Some(v) => {
            cx.report(
                &v,
                format!(
                    "serve.imds.region = {:?}: give an AWS region name like \"eu-west-1\"",
                    v.value
                ),
            );
            None
        }
    };
    Some(Imds {
        listen: listen?,
        role: role?,
        hop_limit: hop_limit?,
        allow_uids: allow_uids?,
        region: own_region?.or_else(|| region.map(str::to_string)),
    })
}

/// Which listener an address is for: each may bind loopback and the container link-local
/// addresses of SPEC §4.5; IMDS also the EC2 metadata addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    /// `[serve] listen`: the credentials API.
    Credentials,
    /// `[serve.imds] listen`.
    Imds,
}

/// ECS (`169.254.170.2`) and EKS (`169.254.170.23`, `fd00:ec2::23`) container-credentials
/// addresses.
const CONTAINER_ADDRESSES: [IpAddr; 3] = [
    IpAddr::V4(Ipv4Addr::new(169, 254, 170, 2)),
    IpAddr::V4(Ipv4Addr::new(169, 254, 170, 23)),
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23)),
];

/// EC2 instance metadata addresses.
const IMDS_ADDRESSES: [IpAddr; 2] = [
    IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)),
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)),
];

impl Listener {
    /// Whether this listener may bind `ip`.
    pub fn allows(self, ip: IpAddr) -> bool {
        ip.is_loopback()
            || CONTAINER_ADDRESSES.contains(&ip)
            || (self == Listener::Imds && IMDS_ADDRESSES.contains(&ip))
    }

    fn allowed_list(self) -> String {
        let mut list = vec!["loopback (127.0.0.0/8, ::1)".to_string()];
        let extra = match self {
            Listener::Credentials => &[][..],
            Listener::Imds => &IMDS_ADDRESSES[..],
        };
        for ip in CONTAINER_ADDRESSES.iter().chain(extra) {
            list.push(match ip {
                IpAddr::V4(v4) => v4.to_string(),
                IpAddr::V6(v6) => format!("[{v6}]"),
            });
        }
        list.join(", ")
    }
}

/// Why a listen address was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ListenError {
    /// Not `address:port`.
    #[error("not an address: use 127.0.0.1:PORT or [::1]:PORT")]
    Syntax,
    /// Not an address this listener may bind.
    #[error("{ip} is not an address this listener may bind: use {allowed} (SPEC §4.5)")]
    NotAllowed {
        /// The address given.
        ip: IpAddr,
        /// What is allowed.
        allowed: String,
    },
}

/// Parses a listen address and checks it is one `listener` may bind. `[serve] listen` needs a
/// port; `[serve.imds] listen` defaults to port 80.
pub fn parse_listen(s: &str, listener: Listener) -> Result<SocketAddr, ListenError> {
    let addr = match listener {
        Listener::Credentials => s.parse::<SocketAddr>().map_err(|_| ListenError::Syntax)?,
        Listener::Imds => {
            let hp = crate::net::HostPort::parse(s, IMDS_DEFAULT_PORT)
                .map_err(|_| ListenError::Syntax)?;
            SocketAddr::new(hp.ip().ok_or(ListenError::Syntax)?, hp.port())
        }
    };
    if !listener.allows(addr.ip()) {
        return Err(ListenError::NotAllowed {
            ip: addr.ip(),
            allowed: listener.allowed_list(),
        });
    }
    Ok(addr)
}

/// `[sts]`, or its defaults when a chained role needs it. `None` when invalid (reported).
fn read_sts(
    cx: &Cx<'_>,
    mut t: Option<&mut Table<'_, '_>>,
    env: &ProxyEnv,
    proxy: Option<&ProxySetting>,
    roles: &Roles,
    endpoint_region: Option<String>,
) -> Option<Option<Sts>> {
    let chained = roles
        .roles
        .iter()
        .any(|r| matches!(r.source, RoleSource::Chained(_)));
    let mut ok = true;
    let endpoint = match t.as_mut().and_then(|t| t.str("endpoint")) {
        None => None,
        Some(v) => {
            let url = cx.check(
                &v,
                format_args!("sts.endpoint = {:?}", v.value),
                HttpsUrl::parse(v.value),
            );
            ok &= url.is_some();
            url
        }
    };
    let region = match t.as_mut().and_then(|t| t.str("region")) {
        None => None,
        Some(v) if valid_region(v.value) => Some(v.value.to_string()),
        Some(v) => {
            cx.report(
                &v,
                format!(
                    "sts.region = {:?}: give an AWS region name like \"eu-west-1\"",
                    v.value
                ),
            );
            ok = false;
            None
        }
    };
    let ca = match t.as_mut().and_then(|t| t.str("ca")) {
        None => None,
        Some(v) => {
            let p = cx.path(&v, "sts.ca");
            ok &= p.is_some();
            p
        }
    };
    if !ok {
        return None;
    }
    let region = region
        .or_else(|| {
            endpoint
                .as_ref()
                .and_then(|u| sts_region(u.server().addr().host()))
        })
        .or(endpoint_region);
    let Some(region) = region else {
        if chained {
            let at = t.as_ref().map(|t| t.span());
            cx.report_at(
                at,
                "chained roles need the STS region, and the endpoint host names none: set [sts] region",
            );
            return None;
        }
        return Some(None);
    };
    if t.is_none() && !chained {
        return Some(None);
    }
    let endpoint = match endpoint {
        Some(e) => e,
        None => {
            let suffix = if region.starts_with("cn-") { ".cn" } else { "" };
            let url = format!("https://sts.{region}.amazonaws.com{suffix}");
            // A valid region always gives a valid URL; should it not, say so like any value.
            let at = t.as_ref().map(|t| t.span());
            match HttpsUrl::parse(&url) {
                Ok(u) => u,
                Err(e) => {
                    cx.report_at(at, format!("sts.endpoint {url:?}: {e}: set sts.endpoint"));
                    return None;
                }
            }
        }
    };
    let proxy = match proxy? {
        ProxySetting::Explicit(p) => Some(p.clone()),
        setting => proxy_for(cx, setting, env, endpoint.server().addr().host())?,
    };
    Some(Some(Sts {
        endpoint,
        region,
        ca,
        proxy,
    }))
}

/// The region of a regional STS host (`sts.<region>.amazonaws.com`, `sts-fips.…`); the global
/// `sts.amazonaws.com` signs in `us-east-1`.
fn sts_region(host: &str) -> Option<String> {
    if host.eq_ignore_ascii_case("sts.amazonaws.com") {
        return Some("us-east-1".into());
    }
    region_in(host, |rest| match rest {
        ["sts" | "sts-fips", region] => Some(*region),
        _ => None,
    })
}

fn valid_role_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name != "."
        && name != ".."
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// Why a file mode was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an octal file mode: write it as a string like \"0640\"")]
pub struct ModeError(String);

/// Parses an octal file mode like `"0640"`.
pub fn parse_mode(s: &str) -> Result<u32, ModeError> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 && !digits.is_empty() && !digits.starts_with('+') => Ok(m),
        _ => Err(ModeError(s.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
endpoint = "abc.credentials.iot.eu-west-1.amazonaws.com"
certificate = "device.pem"
key = "device.key"
[[role]]
name = "default"
role_alias = "GatewayRole"
"#;

    fn parse(t: &str) -> Result<Config, LoadError> {
        Config::parse_with_env(
            t,
            Path::new("/etc/iotcred/config.toml"),
            &ProxyEnv::default(),
        )
    }

    /// The problems, as `(line, message)`.
    fn problems(t: &str) -> Vec<(Option<usize>, String)> {
        match parse(t) {
            Ok(_) => panic!("accepted:\n{t}"),
            Err(LoadError::Invalid { problems, .. }) => {
                problems.into_iter().map(|p| (p.line, p.message)).collect()
            }
            Err(e) => panic!("{e}"),
        }
    }

    /// The one problem, as `line N: message`.
    fn one(t: &str) -> String {
        let p = problems(t);
        assert_eq!(p.len(), 1, "{p:#?}");
        match &p[0] {
            (Some(l), m) => format!("line {l}: {m}"),
            (None, m) => m.clone(),
        }
    }

    fn with_serve(serve: &str) -> String {
        MINIMAL.replace("[[role]]", &format!("{serve}\n[[role]]"))
    }

    #[test]
    fn minimal_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.endpoint.port(), 443);
        assert_eq!(c.endpoint.region().as_deref(), Some("eu-west-1"));
        assert_eq!(
            c.device.as_ref().unwrap().certificate,
            PathBuf::from("/etc/iotcred/device.pem")
        );
        assert_eq!(
            c.device.as_ref().unwrap().key,
            KeySource::Pem("/etc/iotcred/device.key".into())
        );
        assert_eq!(c.timeout, Duration::from_secs(10));
        assert_eq!(c.runtime_dir, PathBuf::from("/run/iotcred"));
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/iotcred"));
        assert_eq!(c.serve.socket, PathBuf::from("/run/iotcred/agent.sock"));
        assert_eq!(c.serve.socket_mode, 0o660);
        assert_eq!((c.serve.listen, &c.serve.imds), (None, &None));
        assert_eq!(c.refresh.mode, Mode::Proactive);
        assert_eq!(c.refresh.refresh_before, Duration::from_secs(900));
        assert_eq!(c.refresh.jitter, Duration::from_secs(120));
        assert_eq!(c.refresh.max_backoff, Duration::from_secs(300));
        assert_eq!((&c.proxy, &c.sts), (&None, &None));
        assert_eq!(c.roles.len(), 1);
        assert_eq!(c.role(None).unwrap().1.name, "default");
    }

    #[test]
    fn provider_request_is_built_at_load() {
        let t = MINIMAL
            .replace("device.pem\"", "device.pem\"\nthing_name = \"gw-1\"")
            .replace("GatewayRole\"", "GatewayRole\"\nduration_seconds = 7200");
        let c = parse(&t).unwrap();
        let RoleSource::Provider(p) = &c.roles[0].source else {
            panic!("not a provider role")
        };
        let text = String::from_utf8(p.request.as_bytes().to_vec()).unwrap();
        assert!(
            text.starts_with("GET /role-aliases/GatewayRole/credentials HTTP/1.1\r\nHost: abc.credentials.iot.eu-west-1.amazonaws.com\r\n"),
            "{text}"
        );
        assert!(
            text.contains("\r\nx-amzn-iot-thingname: gw-1\r\n"),
            "{text}"
        );
        assert!(
            text.contains("\r\nx-amzn-iot-credential-duration-seconds: 7200\r\n"),
            "{text}"
        );
        assert_eq!(p.duration.map(|d| d.as_secs()), Some(7200));
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let t = format!("{MINIMAL}bogus_key = 1\n");
        // After [[role]], the key belongs to the role.
        assert!(
            one(&t).starts_with("line 8: unknown key `role.bogus_key` in [role]"),
            "{}",
            one(&t)
        );
        let t = format!("bogus_key = 1\n{MINIMAL}");
        assert!(one(&t).starts_with("line 1: unknown key `bogus_key` at the top level"));
    }

    #[test]
    fn unknown_key_in_section() {
        let e = one(&with_serve("[serve]\nsockett = \"x\""));
        assert!(e.starts_with("line 6: unknown key `serve.sockett`"), "{e}");
        assert!(e.contains("socket_mode"), "{e}");
        let e = one(&with_serve(
            "[serve.imds]\nlisten = \"127.0.0.1:1\"\nhops = 2",
        ));
        assert!(
            e.starts_with("line 7: unknown key `serve.imds.hops`"),
            "{e}"
        );
        let e = one(&with_serve("[sts]\nregon = \"eu-west-1\""));
        assert!(e.starts_with("line 6: unknown key `sts.regon`"), "{e}");
    }

    #[test]
    fn syntax_and_type_errors_name_the_line() {
        let p = problems(&format!("{MINIMAL}x = = 1\n"));
        assert!(p.iter().all(|p| p.0 == Some(8)), "{p:#?}");
        let e = one(&format!("timeout_seconds = \"10\"\n{MINIMAL}"));
        assert_eq!(
            e,
            "line 1: `timeout_seconds` must be a whole number, not a string"
        );
        let e = one(&with_serve("serve = 1"));
        assert!(e.contains("`serve` must be a table"), "{e}");
        let e = one(&MINIMAL.replace("\"GatewayRole\"", "[\"GatewayRole\"]"));
        assert_eq!(
            e,
            "line 7: `role.role_alias` must be a string, not an array"
        );
    }

    #[test]
    fn missing_keys() {
        let t = MINIMAL.replace(
            "endpoint = \"abc.credentials.iot.eu-west-1.amazonaws.com\"\n",
            "",
        );
        let e = one(&t);
        assert!(e.starts_with("`endpoint` is missing"), "{e}");
        let t = MINIMAL.replace("name = \"default\"\n", "");
        assert!(
            one(&t).starts_with("line 5: `role.name` is missing"),
            "{}",
            one(&t)
        );
    }

    #[test]
    fn every_problem_at_once_in_file_order() {
        let t = "\
endpoint = \"https://abc.credentials.iot.eu-west-1.amazonaws.com\"
certificate = \"device.pem\"
key = \"device.key\"
timeout_seconds = 0
[serve]
listen = \"0.0.0.0:2773\"
[[role]]
name = \"default\"
role_alias = \"Gateway Role\"
colour = \"blue\"
";
        let p = problems(t);
        let lines: Vec<Option<usize>> = p.iter().map(|p| p.0).collect();
        assert_eq!(
            lines,
            [Some(1), Some(4), Some(6), Some(9), Some(10)],
            "{p:#?}"
        );
        assert!(p[0].1.contains("without a scheme"), "{p:#?}");
        assert!(p[1].1.contains("timeout_seconds = 0"), "{p:#?}");
        assert!(p[2].1.contains("loopback"), "{p:#?}");
        assert!(p[3].1.contains("role_alias"), "{p:#?}");
        assert!(p[4].1.contains("colour"), "{p:#?}");
        let e = parse(t).unwrap_err();
        assert_eq!(e.lines().len(), 5);
        assert!(
            e.lines()[0].starts_with("config /etc/iotcred/config.toml line 1: "),
            "{}",
            e
        );
    }

    #[test]
    fn bad_role_alias_names_line() {
        let e = one(&MINIMAL.replace("GatewayRole", "Gateway Role!"));
        assert!(e.starts_with("line 7: role_alias:"), "{e}");
    }

    #[test]
    fn listen_loopback_or_link_local() {
        let listen = |s: &str| parse(&with_serve(&format!("[serve]\nlisten = \"{s}\"")));
        for ok in [
            "127.0.0.1:2773",
            "127.3.0.1:1",
            "[::1]:2773",
            "169.254.170.2:80",
            "169.254.170.23:80",
            "[fd00:ec2::23]:80",
        ] {
            let c = listen(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert_eq!(c.serve.listen, Some(ok.parse().unwrap()));
        }
        for bad in [
            "0.0.0.0:2773",
            "10.0.0.1:80",
            "169.254.169.254:80",
            "[fd00:ec2::254]:80",
            "169.254.170.3:80",
            "[::]:80",
        ] {
            let e = listen(bad).unwrap_err().to_string();
            assert!(
                e.contains("line 6") && e.contains("may bind: use loopback (127.0.0.0/8, ::1)"),
                "{bad}: {e}"
            );
            assert!(
                e.contains("169.254.170.2, 169.254.170.23, [fd00:ec2::23] (SPEC §4.5)"),
                "{e}"
            );
        }
        // The credentials API needs a port; garbage is named.
        assert!(
            listen("127.0.0.1")
                .unwrap_err()
                .to_string()
                .contains("not an address")
        );
        assert!(listen("localhost:80").is_err());
    }

    #[test]
    fn imds_section() {
        let t = format!(
            "{}[[role]]\nname = \"second\"\nrole_alias = \"B\"\n",
            with_serve(
                "[serve]\nlisten = \"127.0.0.1:2773\"\n[serve.imds]\nlisten = \"169.254.169.254\"\nrole = \"second\"\nhop_limit = 2\nallow_uids = [1000, 1001]\nregion = \"us-east-2\""
            )
        );
        let imds = parse(&t).unwrap().serve.imds.unwrap();
        assert_eq!(
            imds,
            Imds {
                listen: "169.254.169.254:80".parse().unwrap(),
                role: "second".into(),
                hop_limit: 2,
                allow_uids: vec![1000, 1001],
                region: Some("us-east-2".into()),
            }
        );
        // Defaults: the default role, hop limit 1, any uid, the endpoint's region.
        let imds = parse(&with_serve("[serve.imds]\nlisten = \"[::1]:2774\""))
            .unwrap()
            .serve
            .imds
            .unwrap();
        assert_eq!(imds.listen, "[::1]:2774".parse().unwrap());
        assert_eq!(imds.role, "default");
        assert_eq!((imds.hop_limit, imds.allow_uids.len()), (1, 0));
        assert_eq!(imds.region.as_deref(), Some("eu-west-1"));
        for ok in ["[fd00:ec2::254]:80", "169.254.170.2:8080", "[fd00:ec2::23]"] {
            assert!(
                parse(&with_serve(&format!("[serve.imds]\nlisten = \"{ok}\""))).is_ok(),
                "{ok}"
            );
        }
        // No region anywhere: none.
        let t = with_serve("[serve.imds]\nlisten = \"127.0.0.1:2774\"").replace(
            "abc.credentials.iot.eu-west-1.amazonaws.com",
            "localhost:8443",
        );
        assert_eq!(parse(&t).unwrap().serve.imds.unwrap().region, None);
    }

    #[test]
    fn imds_errors() {
        let imds = |body: &str| one(&with_serve(&format!("[serve.imds]\n{body}")));
        assert_eq!(
            imds("role = \"default\""),
            "line 5: `serve.imds.listen` is missing: give the address to listen on, e.g. \"127.0.0.1:2774\""
        );
        let e = imds("listen = \"0.0.0.0:80\"");
        assert!(
            e.starts_with(
                "line 6: serve.imds.listen = \"0.0.0.0:80\": 0.0.0.0 is not an address this listener may bind: use loopback"
            ),
            "{e}"
        );
        assert!(e.contains("169.254.169.254, [fd00:ec2::254]"), "{e}");
        let e = imds("listen = \"127.0.0.1:1\"\nrole = \"nope\"");
        assert_eq!(
            e,
            "line 7: serve.imds.role = \"nope\": no such [[role]]; roles: default"
        );
        for bad in ["0", "256", "-1"] {
            let e = imds(&format!("listen = \"127.0.0.1:1\"\nhop_limit = {bad}"));
            assert!(e.starts_with("line 7: serve.imds.hop_limit"), "{e}");
            assert!(e.contains("from 1 to 255"), "{e}");
        }
        let e = imds("listen = \"127.0.0.1:1\"\nallow_uids = [-1]");
        assert!(e.starts_with("line 7: serve.imds.allow_uids: -1"), "{e}");
        let e = imds("listen = \"127.0.0.1:1\"\nregion = \"Europe\"");
        assert!(e.starts_with("line 7: serve.imds.region"), "{e}");
        let e = one(&with_serve(
            "[serve]\nlisten = \"127.0.0.1:1\"\n[serve.imds]\nlisten = \"127.0.0.1:1\"",
        ));
        assert!(e.contains("is also serve.listen"), "{e}");
    }

    #[test]
    fn endpoints_and_regions() {
        let ep = |s: &str| Endpoint::parse(s);
        assert_eq!(ep("a.b:8443").unwrap().to_string(), "a.b:8443");
        assert_eq!(ep("[::1]:9").unwrap().host(), "::1");
        assert_eq!(ep("[::1]").unwrap().port(), 443);
        assert_eq!(ep("https://a.b"), Err(AddressError::Scheme));
        for bad in ["a.b:0", "a.b:x", "::1", "", "a b", "a/b", "-a"] {
            assert!(ep(bad).is_err(), "{bad}");
        }
        let region = |s: &str| ep(s).unwrap().region();
        assert_eq!(
            region("c2x.credentials.iot.eu-west-1.amazonaws.com").as_deref(),
            Some("eu-west-1")
        );
        assert_eq!(
            region("C2X.Credentials.IoT.cn-north-1.amazonaws.com.cn:443").as_deref(),
            Some("cn-north-1")
        );
        assert_eq!(
            region("a.b.credentials.iot.us-gov-west-1.amazonaws.com.").as_deref(),
            Some("us-gov-west-1")
        );
        for none in [
            "localhost",
            "127.0.0.1:8443",
            "credentials.iot.eu-west-1.amazonaws.com",
            "x.credentials.iot.eu-west-1.example.com",
            "x.iot.eu-west-1.amazonaws.com",
            "x.credentials.iot.eu_west.amazonaws.com",
        ] {
            assert_eq!(region(none), None, "{none}");
        }
        assert_eq!(
            sts_region("sts.eu-west-1.amazonaws.com").as_deref(),
            Some("eu-west-1")
        );
        assert_eq!(
            sts_region("sts.amazonaws.com").as_deref(),
            Some("us-east-1")
        );
        assert_eq!(
            sts_region("sts-fips.us-east-2.amazonaws.com").as_deref(),
            Some("us-east-2")
        );
        assert_eq!(sts_region("localhost"), None);
    }

    #[test]
    fn modes_and_ranges() {
        assert_eq!(parse_mode("0640").unwrap(), 0o640);
        assert_eq!(parse_mode("0o640").unwrap(), 0o640);
        for bad in ["0999", "", "+7", "01777"] {
            assert!(parse_mode(bad).is_err(), "{bad}");
        }
        let e = one(&format!("timeout_seconds = 0\n{MINIMAL}"));
        assert_eq!(
            e,
            "line 1: timeout_seconds = 0: use a whole number from 1 to 300"
        );
        let e = one(&MINIMAL.replace("GatewayRole\"", "GatewayRole\"\nduration_seconds = 60"));
        assert!(
            e.starts_with("line 8: duration_seconds = 60: use 900 to 43200"),
            "{e}"
        );
        let e = one(&with_serve("[refresh]\nmode = \"lazy\""));
        assert!(
            e.starts_with("line 6: refresh.mode") && e.contains("on-demand"),
            "{e}"
        );
        let e = one(&with_serve("[refresh]\njitter_seconds = 3601"));
        assert!(
            e.starts_with("line 6: refresh.jitter_seconds = 3601"),
            "{e}"
        );
        let e = one(&with_serve("[serve]\nsocket_mode = \"777\"\nsocket = \"\""));
        assert!(e.starts_with("line 7: `serve.socket` is empty"), "{e}");
    }

    #[test]
    fn dirs() {
        let c = parse(&format!(
            "runtime_dir = \"run\"\nstate_dir = \"state\"\n{MINIMAL}"
        ))
        .unwrap();
        assert_eq!(c.runtime_dir, PathBuf::from("/etc/iotcred/run"));
        assert_eq!(c.serve.socket, PathBuf::from("/etc/iotcred/run/agent.sock"));
        assert_eq!(c.state_dir, PathBuf::from("/etc/iotcred/state"));
        let e = one(&format!("state_dir = \"\"\n{MINIMAL}"));
        assert_eq!(e, "line 1: `state_dir` is empty: give a path");
    }

    #[test]
    fn roles_unique_and_required() {
        let t = format!("{MINIMAL}[[role]]\nname = \"default\"\nrole_alias = \"B\"\n");
        assert!(one(&t).starts_with("line 9: role name \"default\" is used twice"));
        let t = MINIMAL.replace(
            "[[role]]\nname = \"default\"\nrole_alias = \"GatewayRole\"\n",
            "",
        );
        assert!(one(&t).starts_with("no [[role]] configured"));
        for bad in ["../x", ".hidden", ""] {
            let e = one(&MINIMAL.replace("\"default\"", &format!("{bad:?}")));
            assert!(e.starts_with("line 6: role name"), "{e}");
        }
        let e = one(&MINIMAL.replace("role_alias = \"GatewayRole\"\n", ""));
        assert!(
            e.starts_with("line 5: role \"default\": give role_alias"),
            "{e}"
        );
    }

    #[test]
    fn file_sinks() {
        let t = format!(
            "{MINIMAL}  [[role.file]]\n  path = \"/run/x/creds\"\n  format = \"env\"\n  mode = \"0640\"\n  [[role.file]]\n  path = \"c.json\"\n  format = \"json\"\n"
        );
        let c = parse(&t).unwrap();
        let f = &c.roles[0].files;
        assert_eq!(
            f[0],
            FileSink {
                path: "/run/x/creds".into(),
                format: Format::Env,
                mode: 0o640
            }
        );
        assert_eq!(f[1].path, PathBuf::from("/etc/iotcred/c.json"));
        assert_eq!(f[1].mode, 0o600);
        let e = one(&t.replace("\"env\"", "\"yaml\""));
        assert!(e.starts_with("line 10: role.file.format = \"yaml\""), "{e}");
        let e = one(&t.replace("c.json", "/run/x/creds"));
        assert!(e.contains("written by two sinks"), "{e}");
        let e = one(&t.replace("  path = \"c.json\"\n", ""));
        assert!(e.starts_with("line 12: `role.file.path` is missing"), "{e}");
    }

    #[test]
    fn pkcs11_key() {
        let t = MINIMAL.replace(
            "\"device.key\"",
            "\"pkcs11:token=iotcred;object=device?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-value=1234\"",
        );
        let c = parse(&t).unwrap();
        assert!(matches!(
            c.device.as_ref().unwrap().key,
            KeySource::Pkcs11(_)
        ));
        assert!(!format!("{:?}", c.device.as_ref().unwrap().key).contains("1234"));
        let e = one(&MINIMAL.replace("\"device.key\"", "\"pkcs11:bogus=1\""));
        assert!(e.starts_with("line 4: key:"), "{e}");
    }

    #[test]
    fn proxy_resolved_at_load() {
        let path = Path::new("/etc/iotcred/config.toml");
        let env = ProxyEnv {
            https_proxy: Some("http://envproxy:8080".into()),
            no_proxy: Some(".internal".into()),
        };
        let c = Config::parse_with_env(MINIMAL, path, &env).unwrap();
        assert_eq!(c.proxy.unwrap().addr.to_string(), "envproxy:8080");
        let t = MINIMAL.replace("abc.credentials.iot.eu-west-1.amazonaws.com", "x.internal");
        assert_eq!(Config::parse_with_env(&t, path, &env).unwrap().proxy, None);
        let t = format!("proxy = \"http://[::1]\"\n{MINIMAL}");
        let c = Config::parse_with_env(&t, path, &env).unwrap();
        assert_eq!(c.proxy.unwrap().addr.to_string(), "[::1]:3128");
        let e = one(&format!("proxy = \"https://p:1\"\n{MINIMAL}"));
        assert!(
            e.starts_with("line 1: proxy = \"https://p:1\": scheme \"https\""),
            "{e}"
        );
        let bad = ProxyEnv {
            https_proxy: Some("socks5://p".into()),
            no_proxy: None,
        };
        let e = Config::parse_with_env(MINIMAL, path, &bad)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("HTTPS_PROXY = \"socks5://p\"") && e.contains("set `proxy`"),
            "{e}"
        );
    }

    const CHAINED: &str = r#"
[[role]]
name = "analytics"
source_role = "default"
assume_role_arn = "arn:aws:iam::210987654321:role/GatewayAnalytics"
"#;

    fn chained(extra: &str) -> String {
        format!("thing_name = \"gateway-0042\"\n{MINIMAL}{CHAINED}{extra}")
    }

    #[test]
    fn chained_role_defaults() {
        let c = parse(&chained("")).unwrap();
        let (_, role) = c.role(Some("analytics")).unwrap();
        assert_eq!(
            role.source,
            RoleSource::Chained(ChainedRole {
                source_role: "default".into(),
                role_arn: "arn:aws:iam::210987654321:role/GatewayAnalytics".into(),
                session_name: "gateway-0042".into(),
                external_id: None,
                duration: Duration::from_secs(3600),
            })
        );
        let sts = c.sts.unwrap();
        assert_eq!(
            sts.endpoint.to_string(),
            "https://sts.eu-west-1.amazonaws.com/"
        );
        assert_eq!(sts.region, "eu-west-1");
        assert_eq!((sts.ca, sts.proxy), (None, None));
    }

    #[test]
    fn chained_role_all_keys() {
        let t = chained(
            "session_name = \"gw@site-1\"\nexternal_id = \"ext:id/1\"\nduration_seconds = 900\nallow_uids = [1000]\n[sts]\nendpoint = \"https://sts.us-east-2.amazonaws.com\"\nca = \"sts-ca.pem\"\n",
        );
        let c = parse(&t).unwrap();
        let RoleSource::Chained(ch) = &c.roles[1].source else {
            panic!("not chained")
        };
        assert_eq!(ch.session_name, "gw@site-1");
        assert_eq!(ch.external_id.as_deref(), Some("ext:id/1"));
        assert_eq!(ch.duration, Duration::from_secs(900));
        assert_eq!(c.roles[1].allow_uids, [1000]);
        let sts = c.sts.unwrap();
        // The region of an explicit STS endpoint wins over the credentials endpoint's.
        assert_eq!(sts.region, "us-east-2");
        assert_eq!(sts.ca, Some(PathBuf::from("/etc/iotcred/sts-ca.pem")));
        // Explicit region, custom endpoint, and a proxy for STS resolved on its own host.
        let t =
            chained("[sts]\nendpoint = \"https://127.0.0.1:8443/\"\nregion = \"eu-central-1\"\n")
                .replace("abc.credentials.iot.eu-west-1.amazonaws.com", "localhost");
        let env = ProxyEnv {
            https_proxy: Some("http://p:1".into()),
            no_proxy: Some("localhost".into()),
        };
        let c = Config::parse_with_env(&t, Path::new("/c.toml"), &env).unwrap();
        assert_eq!(c.proxy, None);
        let sts = c.sts.unwrap();
        assert_eq!(sts.region, "eu-central-1");
        assert_eq!(sts.endpoint.server().addr().to_string(), "127.0.0.1:8443");
        assert_eq!(sts.proxy.unwrap().addr.to_string(), "p:1");
        // China regions get the .cn STS host.
        let t = chained("").replace("eu-west-1.amazonaws.com", "cn-north-1.amazonaws.com.cn");
        assert_eq!(
            parse(&t).unwrap().sts.unwrap().endpoint.to_string(),
            "https://sts.cn-north-1.amazonaws.com.cn/"
        );
    }

    #[test]
    fn sts_region_required_for_chained_roles() {
        let t = chained("").replace("abc.credentials.iot.eu-west-1.amazonaws.com", "localhost");
        let e = one(&t);
        assert!(e.starts_with("chained roles need the STS region"), "{e}");
        let e = one(&format!("{t}[sts]\nendpoint = \"https://localhost:1\"\n"));
        assert!(
            e.starts_with("line 14: chained roles need the STS region"),
            "{e}"
        );
        // Without chained roles an [sts] without region is harmless.
        let t = MINIMAL.replace("abc.credentials.iot.eu-west-1.amazonaws.com", "localhost");
        assert_eq!(parse(&format!("{t}[sts]\n")).unwrap().sts, None);
        // [sts] alone, with a region, is kept.
        assert_eq!(
            parse(&format!("{MINIMAL}[sts]\n"))
                .unwrap()
                .sts
                .unwrap()
                .region,
            "eu-west-1"
        );
        let e = one(&format!(
            "{MINIMAL}[sts]\nendpoint = \"http://sts.amazonaws.com\"\n"
        ));
        assert!(
            e.starts_with(
                "line 9: sts.endpoint = \"http://sts.amazonaws.com\": use an https:// URL"
            ),
            "{e}"
        );
        let e = one(&format!("{MINIMAL}[sts]\nregion = \"EU\"\n"));
        assert!(e.starts_with("line 9: sts.region"), "{e}");
    }

    #[test]
    fn chained_role_errors() {
        let e = one(&chained("").replace(
            "arn:aws:iam::210987654321:role/GatewayAnalytics",
            "arn:aws:iam::2109:role/X",
        ));
        assert!(
            e.starts_with(
                "line 13: assume_role_arn = \"arn:aws:iam::2109:role/X\": use an IAM role ARN"
            ),
            "{e}"
        );
        let e = one(&chained("").replace(
            "assume_role_arn = \"arn:aws:iam::210987654321:role/GatewayAnalytics\"\n",
            "",
        ));
        assert!(
            e.starts_with("line 10: `role.assume_role_arn` is missing"),
            "{e}"
        );
        let e = one(&chained("session_name = \"a b\"\n"));
        assert!(
            e.starts_with("line 14: session_name = \"a b\": ' ' is not allowed"),
            "{e}"
        );
        let e = one(&chained("session_name = \"a\"\n"));
        assert!(e.contains("use 2 to 64 characters, not 1"), "{e}");
        let e = one(&chained("external_id = \"x\"\n"));
        assert!(e.starts_with("line 14: external_id: use 2 to 1224"), "{e}");
        let e = one(&chained("external_id = \"a b\"\n"));
        assert!(!e.contains("a b"), "the external id is not echoed: {e}");
        for bad in ["899", "3601"] {
            let e = one(&chained(&format!("duration_seconds = {bad}\n")));
            assert!(
                e.starts_with(&format!(
                    "line 14: role.duration_seconds = {bad}: use a whole number from 900 to 3600"
                )),
                "{e}"
            );
        }
        // The session name defaults to the thing name: it must exist and be a valid one.
        let no_thing = format!("{MINIMAL}{CHAINED}");
        let e = one(&no_thing);
        assert!(
            e.starts_with("line 11: a chained role needs a session name"),
            "{e}"
        );
        let e = one(&chained("").replace("gateway-0042", "gw:1"));
        assert!(
            e.contains("thing_name \"gw:1\"") && e.contains("set session_name"),
            "{e}"
        );
        // One kind or the other.
        let e = one(&chained("role_alias = \"X\"\n"));
        assert!(
            e.starts_with("line 12: a role has either role_alias"),
            "{e}"
        );
        let e = one(&format!("{MINIMAL}session_name = \"s1\"\n"));
        assert!(
            e.starts_with("line 8: session_name is for chained roles"),
            "{e}"
        );
    }

    #[test]
    fn arn_session_and_external_id_rules() {
        for ok in [
            "arn:aws:iam::123456789012:role/R",
            "arn:aws-cn:iam::123456789012:role/path/to/R+=,.@_-",
            "arn:aws-us-gov:iam::123456789012:role/R",
        ] {
            assert!(check_role_arn(ok).is_ok(), "{ok}");
        }
        let long_name = format!("arn:aws:iam::123456789012:role/{}", "r".repeat(65));
        for bad in [
            "",
            "arn:aws:iam::123456789012:user/R",
            "arn:aws:iam:us-east-1:123456789012:role/R",
            "arn:azure:iam::123456789012:role/R",
            "arn:aws:iam::12345678901a:role/R",
            "arn:aws:iam::123456789012:role/",
            "arn:aws:iam::123456789012:role/a b",
            "arn:aws:sts::123456789012:role/R",
            long_name.as_str(),
        ] {
            assert_eq!(check_role_arn(bad), Err(StsValueError::RoleArn), "{bad}");
        }
        assert!(check_session_name("ab").is_ok());
        assert!(check_session_name(&"a".repeat(64)).is_ok());
        assert!(check_session_name(&"a".repeat(65)).is_err());
        assert!(check_session_name("a:b").is_err());
        assert!(check_external_id("a:b/c").is_ok());
        assert!(check_external_id(&"a".repeat(1225)).is_err());
    }

    #[test]
    fn source_roles_exist_and_do_not_cycle() {
        let e = one(&chained("").replace("source_role = \"default\"", "source_role = \"nope\""));
        assert!(
            e.starts_with("line 12: source_role = \"nope\": no such [[role]]; roles: default"),
            "{e}"
        );
        let e =
            one(&chained("").replace("source_role = \"default\"", "source_role = \"analytics\""));
        assert!(
            e.starts_with("line 12: source_role = \"analytics\": a role cannot be its own source"),
            "{e}"
        );
        // a -> b -> a, reported once; c -> a is fine by itself (its chain ends in the cycle).
        let arn = "assume_role_arn = \"arn:aws:iam::210987654321:role/R\"";
        let t = format!(
            "thing_name = \"gw\"\n{MINIMAL}[[role]]\nname = \"a\"\nsource_role = \"b\"\n{arn}\n[[role]]\nname = \"b\"\nsource_role = \"a\"\n{arn}\n[[role]]\nname = \"c\"\nsource_role = \"a\"\n{arn}\n"
        );
        let e = one(&t);
        assert_eq!(
            e,
            "line 11: source_role: the roles a -> b -> a form a cycle: one of them needs a role_alias"
        );
        // A chain of chains that ends at a provider role is fine.
        let t = format!(
            "thing_name = \"gw\"\n{MINIMAL}[[role]]\nname = \"a\"\nsource_role = \"b\"\n{arn}\n[[role]]\nname = \"b\"\nsource_role = \"default\"\n{arn}\n"
        );
        assert_eq!(parse(&t).unwrap().roles.len(), 3);
        // IMDS may serve a chained role.
        let t = chained("").replace("[[role]]\nname = \"default\"", "[serve.imds]\nlisten = \"127.0.0.1:1\"\nrole = \"analytics\"\n[[role]]\nname = \"default\"");
        assert_eq!(parse(&t).unwrap().serve.imds.unwrap().role, "analytics");
    }

    const PROVISIONING: &str = r#"
endpoint = "abc.credentials.iot.eu-west-1.amazonaws.com"
state_dir = "STATE"
[provision]
endpoint = "a1-ats.iot.eu-west-1.amazonaws.com"
claim_certificate = "claim.pem"
claim_key = "claim.key"
template = "GatewayFleetTemplate"
parameters = { SerialNumber = "SN-0042" }
startup_jitter_seconds = 0
[rotation]
before_days = 20
template = "GatewayRotationTemplate"
[[role]]
name = "default"
role_alias = "GatewayRole"
"#;

    #[test]
    fn provision_without_an_identity_and_identity_toml_overrides() {
        let d = tempfile::tempdir().unwrap();
        let text = PROVISIONING.replace("STATE", &d.path().display().to_string());
        let c = parse(&text).unwrap();
        assert!(c.device.is_none());
        assert_eq!(c.origins.certificate, Origin::Missing);
        let p = c.provision.as_ref().unwrap();
        assert_eq!(p.endpoint.addr().port(), MQTT_PORT);
        assert_eq!(
            p.parameters,
            vec![("SerialNumber".to_string(), "SN-0042".to_string())]
        );
        assert_eq!(p.subject, "CN=iotcred");
        assert_eq!(p.timeout, Duration::from_secs(30));
        assert_eq!(c.rotation.as_ref().unwrap().before_days, 20);
        // A record written by provision/rotate takes over.
        let record = IdentityRecord {
            thing_name: ThingName::new("gw-SN-0042").unwrap(),
            certificate: d.path().join("certificates/ab.pem.crt"),
            key: KeySource::Pem(d.path().join("keys/device.key")),
            certificate_id: Some("ab".into()),
            device_configuration: Default::default(),
        };
        record.write(d.path()).unwrap();
        let c = parse(&text).unwrap();
        assert_eq!(c.thing_name.as_ref().unwrap().as_str(), "gw-SN-0042");
        assert_eq!(c.device.as_ref().unwrap().certificate, record.certificate);
        assert_eq!(c.origins.key, Origin::IdentityFile);
        // The roles' requests carry the recorded thing name.
        match &c.roles[0].source {
            RoleSource::Provider(p) => {
                assert!(
                    format!("{:?}", p.request).contains("gw-SN-0042"),
                    "{:?}",
                    p.request
                )
            }
            RoleSource::Chained(_) => unreachable!(),
        }
        // A broken record is a configuration problem naming the file and the fix.
        std::fs::write(d.path().join("identity.toml"), "thing_name = 1\n").unwrap();
        let m = one(&text);
        assert!(
            m.contains("identity.toml") && m.contains("iotcred provision"),
            "{m}"
        );
    }

    #[test]
    fn provision_and_rotation_problems() {
        let d = tempfile::tempdir().unwrap();
        let base = PROVISIONING.replace("STATE", &d.path().display().to_string());
        let m = one(&base.replace("claim_certificate = \"claim.pem\"\n", ""));
        assert!(
            m.contains("provision.claim_certificate") && m.contains("no identity"),
            "{m}"
        );
        let m = one(&base.replace(
            "template = \"GatewayFleetTemplate\"",
            "template = \"bad name\"",
        ));
        assert!(m.contains("provision.template"), "{m}");
        let m = one(&base.replace(
            "parameters = { SerialNumber = \"SN-0042\" }",
            "parameters = { SerialNumber = 42 }",
        ));
        assert!(
            m.contains("provision.parameters.SerialNumber") && m.contains("string"),
            "{m}"
        );
        let m = one(&base.replace(
            "before_days = 20\n",
            "before_days = 20\nparameters = { ThingName = \"x\" }\n",
        ));
        assert!(m.contains("ThingName"), "{m}");
        let m = one(&base.replace("template = \"GatewayRotationTemplate\"\n", ""));
        assert!(m.contains("rotation.template"), "{m}");
        let m = one(&base.replace(
            "startup_jitter_seconds = 0",
            "startup_jitter_seconds = 0\nfoo = 1",
        ));
        assert!(m.contains("unknown key `provision.foo`"), "{m}");
        let m = one(&base.replace(
            "claim_key = \"claim.key\"",
            "claim_key = \"claim.key\"\nkey = \"pkcs11:token=t;object=o?pin-value=1234\"",
        ));
        assert!(m.contains("pin-source") && !m.contains("1234"), "{m}");
        // [rotation] needs [provision]'s endpoint.
        let m = one(&MINIMAL.replace("[[role]]", "[rotation]\ntemplate = \"T\"\n[[role]]"));
        assert!(m.contains("[rotation] needs [provision]"), "{m}");
        // Without [provision], certificate and key stay required.
        let m = one(&MINIMAL.replace("certificate = \"device.pem\"\n", ""));
        assert!(m.contains("`certificate` is missing"), "{m}");
    }
}
