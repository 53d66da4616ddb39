//! The command-line tools behind `iotcred`: each returns the SPEC §5 exit code and prints its
//! errors to stderr in one or two lines.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use iotcred_core::UnixTime;
use iotcred_core::render::Format;

use crate::config::{self, Config, RoleSource};
use crate::tls::{self, Identity};
use crate::upstream::{Fetched, Upstream};

/// Exit code: success.
pub const EXIT_OK: u8 = 0;
/// Exit code: anything else.
pub const EXIT_OTHER: u8 = 1;
/// Exit code: usage or configuration error.
pub const EXIT_CONFIG: u8 = 2;
/// Exit code: permanent upstream rejection.
pub const EXIT_PERMANENT: u8 = 3;
/// Exit code: transient failure.
pub const EXIT_TRANSIENT: u8 = 4;
/// Exit code: agent unreachable, refusing, or without credentials.
pub const EXIT_AGENT: u8 = 5;

/// Logs to stderr; level from `IOTCRED_LOG` (a level such as `debug`, or `target=level`
/// directives like `info,iotcred_agent=trace`), else `default`.
pub fn init_logging(default: &str) {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::layer::SubscriberExt;
    let fallback = || {
        default
            .parse::<Targets>()
            .unwrap_or_else(|_| Targets::new().with_default(LevelFilter::INFO))
    };
    let (filter, bad) = match std::env::var("IOTCRED_LOG") {
        Ok(v) if !v.trim().is_empty() => match v.trim().parse::<Targets>() {
            Ok(t) => (t, None),
            Err(e) => (fallback(), Some(format!("{v:?} ({e})"))),
        },
        _ => (fallback(), None),
    };
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let subscriber = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false)
        .with_max_level(LevelFilter::TRACE)
        .finish()
        .with(filter);
    let _ = tracing::subscriber::set_global_default(subscriber);
    if let Some(bad) = bad {
        tracing::warn!(
            "ignoring IOTCRED_LOG={bad}: use a level (error, warn, info, debug, trace) or directives like info,iotcred_agent=debug"
        );
    }
}

fn fail(code: u8, message: impl std::fmt::Display) -> u8 {
    eprintln!("iotcred: {message}");
    code
}

/// Loads the configuration named by `--config` / `IOTCRED_CONFIG` / the default; on failure
/// prints every problem, one line each.
pub fn load_config(path: Option<&Path>) -> Result<Config, u8> {
    let path = config::resolve_path(path);
    Config::load(&path).map_err(|e| {
        for line in e.lines() {
            eprintln!("iotcred: {line}");
        }
        EXIT_CONFIG
    })
}

fn load_identity(config: &Config) -> Result<Identity, u8> {
    tls::load_identity(config).map_err(|e| fail(EXIT_CONFIG, e))
}

fn runtime() -> Result<tokio::runtime::Runtime, u8> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| fail(EXIT_OTHER, format!("cannot start the runtime: {e}")))
}

async fn fetch_role(upstream: &Upstream, role: &config::Role) -> Result<Fetched, u8> {
    let request = match &role.source {
        RoleSource::Provider(p) => p,
        RoleSource::Chained(c) => {
            return Err(fail(
                EXIT_CONFIG,
                format!(
                    "role {}: chained through STS from role {}: fetching chained roles is not supported yet",
                    role.name, c.source_role
                ),
            ));
        }
    };
    upstream
        .fetch(request)
        .await
        .map_err(|e| fail(e.exit_code() as u8, format!("role {}: {e}", role.name)))
}

/// `iotcred fetch`: one exchange, printed in `format`.
pub fn fetch(config: Option<&Path>, role: Option<&str>, format: Format) -> u8 {
    let inner = || -> Result<(), u8> {
        let config = load_config(config)?;
        let (_, role) = config.role(role).ok_or_else(|| {
            let names: Vec<&str> = config.roles.iter().map(|r| r.name.as_str()).collect();
            fail(
                EXIT_CONFIG,
                format!(
                    "no role {:?} in the config; roles: {}",
                    role.unwrap_or(""),
                    names.join(", ")
                ),
            )
        })?;
        let identity = load_identity(&config)?;
        let upstream = Upstream::new(&config, identity.client_config);
        let fetched = runtime()?.block_on(fetch_role(&upstream, role))?;
        let expiration = fetched.arrived_wall.saturating_add(fetched.issued.lifetime);
        let text = format.render(&role.name, &fetched.issued.credentials, expiration);
        let mut out = std::io::stdout().lock();
        out.write_all(text.as_bytes())
            .and_then(|_| {
                if text.ends_with('\n') {
                    Ok(())
                } else {
                    out.write_all(b"\n")
                }
            })
            .and_then(|_| out.flush())
            .map_err(|e| fail(EXIT_OTHER, format!("cannot write output: {e}")))
    };
    match inner() {
        Ok(()) => EXIT_OK,
        Err(c) => c,
    }
}

/// `iotcred check [--fetch]`: validates everything that can be validated locally, and with
/// `--fetch` does one exchange per role. Never prints a secret.
pub fn check(config: Option<&Path>, do_fetch: bool) -> u8 {
    let inner = || -> Result<(), u8> {
        let config = load_config(config)?;
        println!(
            "config: {} OK ({} role(s))",
            config.path.display(),
            config.roles.len()
        );
        let identity = load_identity(&config)?;
        let c = &identity.cert;
        println!(
            "certificate: {} (subject {}, {} in chain), valid {} to {}",
            config.certificate.display(),
            c.subject,
            c.chain_len,
            c.not_before.rfc3339(),
            c.not_after.rfc3339()
        );
        let now = UnixTime::now();
        if let Some(left) = c.not_after.checked_duration_since(now) {
            if left.as_secs() < 30 * 86_400 {
                println!(
                    "warning: the device certificate expires in {} day(s): plan its rotation",
                    left.as_secs() / 86_400
                );
            }
        }
        if let (Some(cn), Some(thing)) = (&c.subject_cn, &config.thing_name) {
            if cn != thing.as_str() {
                println!(
                    "note: thing_name {:?} differs from the certificate CN {cn:?} (fine if the certificate is attached to that thing)",
                    thing.as_str()
                );
            }
        }
        println!("key: {} OK (certificate matches the key)", config.key);
        match &config.ca {
            Some(ca) => println!("trust anchors: {}", ca.display()),
            None => println!("trust anchors: built-in Amazon roots"),
        }
        println!("endpoint: {}", config.endpoint);
        if let Some(p) = &config.proxy {
            println!("proxy: {}", p.addr);
        }
        if let Some(imds) = &config.serve.imds {
            println!(
                "imds: {} serves role {} (hop limit {}, region {})",
                imds.listen,
                imds.role,
                imds.hop_limit,
                imds.region.as_deref().unwrap_or("none")
            );
        }
        if let Some(sts) = &config.sts {
            println!("sts: {} (region {})", sts.endpoint, sts.region);
        }
        if !do_fetch {
            return Ok(());
        }
        let upstream = Arc::new(Upstream::new(&config, identity.client_config));
        let rt = runtime()?;
        let mut worst: Option<u8> = None;
        for role in &config.roles {
            match rt.block_on(fetch_role(&upstream, role)) {
                Ok(f) => {
                    let id = &f.issued.credentials.access_key_id;
                    let last4: String = id
                        .chars()
                        .rev()
                        .take(4)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect();
                    let expiration = f.arrived_wall.saturating_add(f.issued.lifetime);
                    println!(
                        "role {}: OK, credentials expire {} (in {} s), access key id …{last4}",
                        role.name,
                        expiration.rfc3339(),
                        f.issued.lifetime.as_secs()
                    );
                }
                Err(code) => worst = Some(worst.map_or(code, |w| w.min(code))),
            }
        }
        worst.map_or(Ok(()), Err)
    };
    match inner() {
        Ok(()) => EXIT_OK,
        Err(c) => c,
    }
}

/// Where `get` finds the agent: `--socket`, `IOTCRED_SOCKET`, the config's `[serve] socket`
/// (when the config is readable), else the default.
pub fn socket_path(cli: Option<&Path>) -> std::path::PathBuf {
    if let Some(p) = cli {
        return p.to_path_buf();
    }
    if let Some(p) = std::env::var_os("IOTCRED_SOCKET").filter(|p| !p.is_empty()) {
        return p.into();
    }
    let cfg = config::resolve_path(None);
    if let Ok(c) = Config::load(&cfg) {
        return c.serve.socket;
    }
    Path::new(config::DEFAULT_RUNTIME_DIR).join("agent.sock")
}

/// `iotcred get` / `iotcred credential-process`.
pub fn get(socket: Option<&Path>, role: Option<&str>, format: Format) -> u8 {
    let socket = socket_path(socket);
    match crate::client::get(&socket, role, format) {
        Ok(text) => {
            let mut out = std::io::stdout().lock();
            let r = out
                .write_all(text.as_bytes())
                .and_then(|_| {
                    if text.ends_with('\n') {
                        Ok(())
                    } else {
                        out.write_all(b"\n")
                    }
                })
                .and_then(|_| out.flush());
            match r {
                Ok(()) => EXIT_OK,
                Err(e) => fail(EXIT_OTHER, format!("cannot write output: {e}")),
            }
        }
        Err(e) => fail(e.exit_code(), e),
    }
}

/// `iotcred keygen`.
pub fn keygen(
    key: &str,
    subject: &str,
    algorithm: crate::keys::Algorithm,
    csr_out: Option<&Path>,
    overwrite: bool,
) -> u8 {
    let src = match crate::keys::KeySource::parse(key) {
        Ok(s) => s,
        Err(e) => return fail(EXIT_CONFIG, format!("--key: {e}")),
    };
    let csr = match crate::keys::keygen(&src, subject, algorithm, overwrite) {
        Ok(c) => c,
        Err(e) => return fail(EXIT_CONFIG, e),
    };
    let written = match csr_out {
        Some(p) => crate::sinks::write_atomic(p, 0o644, csr.as_bytes())
            .map_err(|e| format!("cannot write {}: {e}", p.display())),
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(csr.as_bytes())
                .and_then(|_| out.flush())
                .map_err(|e| e.to_string())
        }
    };
    match written {
        Ok(()) => {
            eprintln!(
                "iotcred: key generated in {src}; CSR {}",
                csr_out.map_or("written to stdout".into(), |p| format!(
                    "written to {}",
                    p.display()
                ))
            );
            EXIT_OK
        }
        Err(e) => fail(EXIT_OTHER, e),
    }
}

/// `iotcred run`.
pub fn run(config: Option<&Path>) -> u8 {
    let config = match load_config(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(EXIT_OTHER, format!("cannot start the runtime: {e}")),
    };
    rt.block_on(crate::daemon::run(config))
}
