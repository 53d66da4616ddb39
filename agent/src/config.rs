//! Configuration (SPEC §6): TOML, unknown keys refused with their name and line, every value
//! validated at start-up with a message that says what to fix.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use iotcred_core::render::Format;
use iotcred_core::schedule::Mode;
use iotcred_core::{CredentialDuration, RoleAlias, ThingName};
use serde::Deserialize;
use toml::Spanned;

use crate::keys::KeySource;

/// Default configuration path.
pub const DEFAULT_PATH: &str = "/etc/iotcred/config.toml";
/// Default runtime directory (tmpfs).
pub const DEFAULT_RUNTIME_DIR: &str = "/run/iotcred";

/// A configuration problem: where it is and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config {path}: {source}; pass --config PATH or set IOTCRED_CONFIG")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A syntax error, unknown key, wrong type or invalid value, with the line it is on.
    #[error("config {path}{}: {message}", line.map(|l| format!(" line {l}")).unwrap_or_default())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// 1-based line, when known.
        line: Option<usize>,
        /// What is wrong and what to do.
        message: String,
    },
}

/// The upstream endpoint, `host[:port]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Host name or IP address (no brackets).
    pub host: String,
    /// TCP port (443 unless given).
    pub port: u16,
}

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where it was read from.
    pub path: PathBuf,
    /// Credentials-provider endpoint.
    pub endpoint: Endpoint,
    /// Thing name sent as `x-amzn-iot-thingname`.
    pub thing_name: Option<ThingName>,
    /// Device certificate chain (PEM, leaf first).
    pub certificate: PathBuf,
    /// Private key: PEM file or PKCS#11 URI.
    pub key: KeySource,
    /// Trust anchors (PEM); `None` = built-in Amazon roots.
    pub ca: Option<PathBuf>,
    /// Explicit proxy URL (`http://host:port`); `None` = from the environment.
    pub proxy: Option<String>,
    /// Upstream timeout (connect, handshake, whole exchange) and the longest a local request
    /// waits for a fetch.
    pub timeout: Duration,
    /// Runtime directory (tokens, default socket and files).
    pub runtime_dir: PathBuf,
    /// `[refresh]`.
    pub refresh: Refresh,
    /// `[serve]`.
    pub serve: Serve,
    /// `[[role]]`, at least one; the first is the default role.
    pub roles: Vec<Role>,
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
    /// Optional loopback TCP listener.
    pub listen: Option<SocketAddr>,
}

/// One `[[role]]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Role {
    /// Name used in routes, token files and INI profiles.
    pub name: String,
    /// Role alias.
    pub role_alias: RoleAlias,
    /// Requested credential duration.
    pub duration: Option<CredentialDuration>,
    /// Unix-socket uids allowed.
    pub allow_uids: Vec<u32>,
    /// Unix-socket gids allowed.
    pub allow_gids: Vec<u32>,
    /// File sinks.
    pub files: Vec<FileSink>,
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    endpoint: Spanned<String>,
    thing_name: Option<Spanned<String>>,
    certificate: Spanned<String>,
    key: Spanned<String>,
    ca: Option<Spanned<String>>,
    proxy: Option<Spanned<String>>,
    timeout_seconds: Option<Spanned<i64>>,
    runtime_dir: Option<Spanned<String>>,
    #[serde(default)]
    refresh: RawRefresh,
    #[serde(default)]
    serve: RawServe,
    #[serde(default)]
    role: Vec<RawRole>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRefresh {
    mode: Option<Spanned<String>>,
    refresh_before_seconds: Option<Spanned<i64>>,
    jitter_seconds: Option<Spanned<i64>>,
    max_backoff_seconds: Option<Spanned<i64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServe {
    socket: Option<Spanned<String>>,
    socket_mode: Option<Spanned<String>>,
    listen: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRole {
    name: Spanned<String>,
    role_alias: Spanned<String>,
    duration_seconds: Option<Spanned<i64>>,
    #[serde(default)]
    allow_uids: Vec<Spanned<i64>>,
    #[serde(default)]
    allow_gids: Vec<Spanned<i64>>,
    #[serde(default)]
    file: Vec<RawFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    path: Spanned<String>,
    format: Option<Spanned<String>>,
    mode: Option<Spanned<String>>,
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
    /// the file's directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Validates configuration text read from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let cx = Cx { text, path };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            cx.err_at(
                e.span().map(|s| s.start),
                e.message().trim_end().replace('\n', " "),
            )
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |s: &Spanned<String>, what: &str| -> Result<PathBuf, ConfigError> {
            if s.get_ref().is_empty() {
                return Err(cx.err(s, format!("`{what}` is empty: give a file path")));
            }
            Ok(base.join(s.get_ref()))
        };

        let endpoint =
            parse_endpoint(raw.endpoint.get_ref()).map_err(|m| cx.err(&raw.endpoint, m))?;
        let thing_name = raw
            .thing_name
            .as_ref()
            .map(|t| ThingName::new(t.get_ref()).map_err(|e| cx.err(t, format!("thing_name: {e}"))))
            .transpose()?;
        let certificate = resolve(&raw.certificate, "certificate")?;
        let key = if raw.key.get_ref().starts_with("pkcs11:") {
            KeySource::parse(raw.key.get_ref())
                .map_err(|e| cx.err(&raw.key, format!("key: {e}")))?
        } else {
            KeySource::Pem(resolve(&raw.key, "key")?)
        };
        let ca = raw.ca.as_ref().map(|c| resolve(c, "ca")).transpose()?;
        let proxy = match &raw.proxy {
            Some(p) => {
                crate::upstream::Proxy::parse(p.get_ref())
                    .map_err(|m| cx.err(p, format!("proxy: {m}")))?;
                Some(p.get_ref().clone())
            }
            None => None,
        };
        let timeout = Duration::from_secs(seconds(
            &cx,
            raw.timeout_seconds.as_ref(),
            "timeout_seconds",
            10,
            1,
            300,
        )?);
        let runtime_dir = match &raw.runtime_dir {
            Some(r) => resolve(r, "runtime_dir")?,
            None => PathBuf::from(DEFAULT_RUNTIME_DIR),
        };

        let mode = match &raw.refresh.mode {
            None => Mode::Proactive,
            Some(m) => match m.get_ref().as_str() {
                "proactive" => Mode::Proactive,
                "on-demand" => Mode::OnDemand,
                other => {
                    return Err(cx.err(
                        m,
                        format!("refresh.mode = {other:?}: use \"proactive\" or \"on-demand\""),
                    ));
                }
            },
        };
        let refresh = Refresh {
            mode,
            refresh_before: Duration::from_secs(seconds(
                &cx,
                raw.refresh.refresh_before_seconds.as_ref(),
                "refresh.refresh_before_seconds",
                900,
                0,
                43_200,
            )?),
            jitter: Duration::from_secs(seconds(
                &cx,
                raw.refresh.jitter_seconds.as_ref(),
                "refresh.jitter_seconds",
                120,
                0,
                3600,
            )?),
            max_backoff: Duration::from_secs(seconds(
                &cx,
                raw.refresh.max_backoff_seconds.as_ref(),
                "refresh.max_backoff_seconds",
                300,
                1,
                3600,
            )?),
        };

        let serve = Serve {
            socket: match &raw.serve.socket {
                Some(s) => resolve(s, "serve.socket")?,
                None => runtime_dir.join("agent.sock"),
            },
            socket_mode: match &raw.serve.socket_mode {
                Some(m) => parse_mode(m.get_ref())
                    .map_err(|e| cx.err(m, format!("serve.socket_mode: {e}")))?,
                None => 0o660,
            },
            listen: raw
                .serve
                .listen
                .as_ref()
                .map(|l| {
                    parse_listen(l.get_ref()).map_err(|e| cx.err(l, format!("serve.listen: {e}")))
                })
                .transpose()?,
        };

        if raw.role.is_empty() {
            return Err(cx.err_at(
                None,
                "no [[role]] configured: add at least one [[role]] with `name` and `role_alias`"
                    .into(),
            ));
        }
        let mut roles: Vec<Role> = Vec::with_capacity(raw.role.len());
        for r in &raw.role {
            let name = r.name.get_ref();
            if !valid_role_name(name) {
                return Err(cx.err(
                    &r.name,
                    format!("role name {name:?}: use 1-64 characters of A-Z a-z 0-9 _ - . (not starting with .)"),
                ));
            }
            if roles.iter().any(|o| &o.name == name) {
                return Err(cx.err(
                    &r.name,
                    format!("role name {name:?} is used twice: names must be unique"),
                ));
            }
            let role_alias = RoleAlias::new(r.role_alias.get_ref())
                .map_err(|e| cx.err(&r.role_alias, format!("role_alias: {e}")))?;
            let duration = match &r.duration_seconds {
                Some(d) => {
                    let v = u32::try_from(*d.get_ref()).unwrap_or(0);
                    Some(
                        CredentialDuration::new(v)
                            .map_err(|e| cx.err(d, format!("duration_seconds: {e}")))?,
                    )
                }
                None => None,
            };
            let ids = |v: &[Spanned<i64>], what: &str| -> Result<Vec<u32>, ConfigError> {
                v.iter()
                    .map(|i| {
                        u32::try_from(*i.get_ref()).map_err(|_| {
                            cx.err(i, format!("{what}: {} is not a valid id", i.get_ref()))
                        })
                    })
                    .collect()
            };
            let mut files = Vec::new();
            for f in &r.file {
                let format = match &f.format {
                    Some(s) => s.get_ref().parse::<Format>().map_err(|_| {
                        cx.err(
                            s,
                            format!(
                                "role.file.format = {:?}: use \"ini\", \"json\", \"credential-process\" or \"env\"",
                                s.get_ref()
                            ),
                        )
                    })?,
                    None => Format::Ini,
                };
                let mode = match &f.mode {
                    Some(m) => parse_mode(m.get_ref())
                        .map_err(|e| cx.err(m, format!("role.file.mode: {e}")))?,
                    None => 0o600,
                };
                let p = resolve(&f.path, "role.file.path")?;
                if p.file_name().is_none() {
                    return Err(cx.err(&f.path, "role.file.path must name a file".into()));
                }
                files.push(FileSink {
                    path: p,
                    format,
                    mode,
                });
            }
            roles.push(Role {
                name: name.clone(),
                role_alias,
                duration,
                allow_uids: ids(&r.allow_uids, "allow_uids")?,
                allow_gids: ids(&r.allow_gids, "allow_gids")?,
                files,
            });
        }
        let all_files: Vec<&PathBuf> = roles
            .iter()
            .flat_map(|r| r.files.iter().map(|f| &f.path))
            .collect();
        for (i, p) in all_files.iter().enumerate() {
            if all_files[..i].contains(p) {
                return Err(cx.err_at(
                    None,
                    format!(
                        "file {} is written by two sinks: give each its own path",
                        p.display()
                    ),
                ));
            }
        }

        Ok(Config {
            path: path.to_path_buf(),
            endpoint,
            thing_name,
            certificate,
            key,
            ca,
            proxy,
            timeout,
            runtime_dir,
            refresh,
            serve,
            roles,
        })
    }

    /// Looks a role up by name; `None` = the default (first) role.
    pub fn role(&self, name: Option<&str>) -> Option<(usize, &Role)> {
        match name {
            None => self.roles.first().map(|r| (0, r)),
            Some(n) => self.roles.iter().enumerate().find(|(_, r)| r.name == n),
        }
    }
}

struct Cx<'a> {
    text: &'a str,
    path: &'a Path,
}

impl Cx<'_> {
    fn err<T>(&self, at: &Spanned<T>, message: String) -> ConfigError {
        self.err_at(Some(at.span().start), message)
    }

    fn err_at(&self, offset: Option<usize>, message: String) -> ConfigError {
        let line = offset.map(|o| self.text[..o.min(self.text.len())].matches('\n').count() + 1);
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            line,
            message,
        }
    }
}

fn seconds(
    cx: &Cx<'_>,
    v: Option<&Spanned<i64>>,
    what: &str,
    default: u64,
    min: u64,
    max: u64,
) -> Result<u64, ConfigError> {
    match v {
        None => Ok(default),
        Some(s) => match u64::try_from(*s.get_ref()) {
            Ok(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(cx.err(
                s,
                format!(
                    "{what} = {}: use a whole number from {min} to {max}",
                    s.get_ref()
                ),
            )),
        },
    }
}

fn valid_role_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// Parses `host[:port]` (IPv6 literals in brackets).
pub fn parse_endpoint(s: &str) -> Result<Endpoint, String> {
    let bad = || {
        format!(
            "endpoint {s:?}: use host[:port], e.g. \"xxxx.credentials.iot.eu-west-1.amazonaws.com\""
        )
    };
    if s.contains("://") {
        return Err(format!(
            "endpoint {s:?}: give the host name only, without a scheme"
        ));
    }
    if s.contains('/') || s.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad());
    }
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or_else(bad)?;
        match after {
            "" => (h, None),
            p => (h, Some(p.strip_prefix(':').ok_or_else(bad)?)),
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h, Some(p)),
            Some(_) => {
                return Err(format!(
                    "endpoint {s:?}: put an IPv6 address in brackets, e.g. [::1]:8443"
                ));
            }
            None => (s, None),
        }
    };
    if host.is_empty() {
        return Err(bad());
    }
    let port = match port {
        None => 443,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => n,
            _ => return Err(format!("endpoint {s:?}: port {p:?} is not a TCP port")),
        },
    };
    Ok(Endpoint {
        host: host.to_string(),
        port,
    })
}

/// Parses an octal file mode like `"0640"`.
pub fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 && !digits.is_empty() => Ok(m),
        _ => Err(format!(
            "{s:?} is not an octal file mode: write it as a string like \"0640\""
        )),
    }
}

/// Parses and checks a listen address: loopback, or a link-local address of SPEC §4.5.
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = s
        .parse()
        .map_err(|_| format!("{s:?} is not an address: use 127.0.0.1:PORT or [::1]:PORT"))?;
    let kind = crate::server::ListenerKind::Credentials;
    if !crate::server::listen_allowed(addr.ip(), kind) {
        return Err(format!(
            "{s:?} is not a loopback address: the credentials API binds only to 127.0.0.0/8, ::1 \
             or the container addresses {}",
            kind.link_local_text()
        ));
    }
    Ok(addr)
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

    fn parse(t: &str) -> Result<Config, ConfigError> {
        Config::parse(t, Path::new("/etc/iotcred/config.toml"))
    }

    #[test]
    fn minimal_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.endpoint.port, 443);
        assert_eq!(c.certificate, PathBuf::from("/etc/iotcred/device.pem"));
        assert_eq!(c.timeout, Duration::from_secs(10));
        assert_eq!(c.runtime_dir, PathBuf::from("/run/iotcred"));
        assert_eq!(c.serve.socket, PathBuf::from("/run/iotcred/agent.sock"));
        assert_eq!(c.serve.socket_mode, 0o660);
        assert_eq!(c.refresh.mode, Mode::Proactive);
        assert_eq!(c.refresh.refresh_before, Duration::from_secs(900));
        assert_eq!(c.refresh.jitter, Duration::from_secs(120));
        assert_eq!(c.refresh.max_backoff, Duration::from_secs(300));
        assert_eq!(c.roles.len(), 1);
        assert_eq!(c.role(None).unwrap().1.name, "default");
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let t = format!("{MINIMAL}bogus_key = 1\n");
        let e = parse(&t).unwrap_err().to_string();
        assert!(e.contains("bogus_key"), "{e}");
        assert!(e.contains("line 8"), "{e}");
    }

    #[test]
    fn unknown_key_in_section() {
        let t = MINIMAL.replace("[[role]]", "[serve]\nsockett = \"x\"\n[[role]]");
        let e = parse(&t).unwrap_err().to_string();
        assert!(e.contains("sockett") && e.contains("line 6"), "{e}");
    }

    #[test]
    fn bad_role_alias_names_line() {
        let t = MINIMAL.replace("GatewayRole", "Gateway Role!");
        let e = parse(&t).unwrap_err().to_string();
        assert!(e.contains("role_alias") && e.contains("line 7"), "{e}");
    }

    #[test]
    fn listen_must_be_loopback() {
        let t = MINIMAL.replace("[[role]]", "[serve]\nlisten = \"0.0.0.0:2773\"\n[[role]]");
        let e = parse(&t).unwrap_err().to_string();
        assert!(e.contains("loopback"), "{e}");
        let t = MINIMAL.replace("[[role]]", "[serve]\nlisten = \"[::1]:2773\"\n[[role]]");
        assert!(parse(&t).unwrap().serve.listen.unwrap().ip().is_loopback());
    }

    #[test]
    fn endpoints() {
        assert_eq!(
            parse_endpoint("a.b:8443").unwrap(),
            Endpoint {
                host: "a.b".into(),
                port: 8443
            }
        );
        assert_eq!(
            parse_endpoint("[::1]:9").unwrap(),
            Endpoint {
                host: "::1".into(),
                port: 9
            }
        );
        assert_eq!(parse_endpoint("[::1]").unwrap().port, 443);
        assert!(
            parse_endpoint("https://a.b")
                .unwrap_err()
                .contains("scheme")
        );
        assert!(parse_endpoint("a.b:0").is_err());
        assert!(parse_endpoint("a.b:x").is_err());
        assert!(parse_endpoint("::1").is_err());
        assert!(parse_endpoint("").is_err());
    }

    #[test]
    fn modes_and_ranges() {
        assert_eq!(parse_mode("0640").unwrap(), 0o640);
        assert!(parse_mode("0999").is_err());
        assert!(parse_mode("").is_err());
        let t = format!("timeout_seconds = 0\n{MINIMAL}");
        assert!(
            parse(&t)
                .unwrap_err()
                .to_string()
                .contains("timeout_seconds")
        );
        let t = MINIMAL.replace("GatewayRole\"", "GatewayRole\"\nduration_seconds = 60");
        assert!(
            parse(&t)
                .unwrap_err()
                .to_string()
                .contains("duration_seconds")
        );
        let t = MINIMAL.replace("[[role]]", "[refresh]\nmode = \"lazy\"\n[[role]]");
        assert!(parse(&t).unwrap_err().to_string().contains("on-demand"));
    }

    #[test]
    fn roles_unique_and_required() {
        let t = format!("{MINIMAL}[[role]]\nname = \"default\"\nrole_alias = \"B\"\n");
        assert!(parse(&t).unwrap_err().to_string().contains("twice"));
        let t = MINIMAL.replace(
            "[[role]]\nname = \"default\"\nrole_alias = \"GatewayRole\"\n",
            "",
        );
        assert!(parse(&t).unwrap_err().to_string().contains("[[role]]"));
        let t = MINIMAL.replace("\"default\"", "\"../x\"");
        assert!(parse(&t).unwrap_err().to_string().contains("role name"));
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
        let bad = t.replace("\"env\"", "\"yaml\"");
        assert!(parse(&bad).unwrap_err().to_string().contains("yaml"));
    }

    #[test]
    fn pkcs11_key() {
        let t = MINIMAL.replace(
            "\"device.key\"",
            "\"pkcs11:token=iotcred;object=device?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-value=1234\"",
        );
        let c = parse(&t).unwrap();
        assert!(matches!(c.key, KeySource::Pkcs11(_)));
        assert!(!format!("{:?}", c.key).contains("1234"));
    }
}
