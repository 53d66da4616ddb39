//! The command-line tools behind `iotcred`: each returns the SPEC §5 exit code and prints its
//! errors to stderr in one or two lines.

use std::io::Write;
use std::path::Path;

use iotcred_core::UnixTime;
use iotcred_core::render::Format;

use crate::config::{self, Config, RoleSource};
use crate::exit::Exit;
use crate::source::{BoxFuture, Obtained, SourceError};
use crate::sts::{AssumeRole, ChainedError, StsClient};
use crate::tls::{self, Identity};
use crate::upstream::Upstream;
use iotcred_core::schedule::ScheduleConfig;

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

fn fail(code: Exit, message: impl std::fmt::Display) -> Exit {
    eprintln!("iotcred: {message}");
    code
}

/// Loads the configuration named by `--config` / `IOTCRED_CONFIG` / the default; on failure
/// prints every problem, one line each.
pub fn load_config(path: Option<&Path>) -> Result<Config, Exit> {
    let path = config::resolve_path(path);
    Config::load(&path).map_err(|e| {
        for line in e.lines() {
            eprintln!("iotcred: {line}");
        }
        Exit::Config
    })
}

fn load_identity(config: &Config) -> Result<Identity, Exit> {
    tls::load_identity(config).map_err(|e| fail(Exit::Config, e))
}

fn runtime() -> Result<tokio::runtime::Runtime, Exit> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| fail(Exit::Other, format!("cannot start the runtime: {e}")))
}

/// Where the commands obtain credentials, like the agent: the credentials provider, and STS for
/// chained roles.
struct Sources<'a> {
    config: &'a Config,
    upstream: Upstream,
    sts: Option<StsClient>,
}

impl<'a> Sources<'a> {
    fn new(config: &'a Config, identity: Identity) -> Result<Sources<'a>, Exit> {
        let sts = config
            .sts
            .as_ref()
            .map(|s| StsClient::new(s, config.timeout))
            .transpose()
            .map_err(|e| fail(Exit::Config, e))?;
        Ok(Sources {
            config,
            upstream: Upstream::new(config, identity.client_config),
            sts,
        })
    }

    /// `role`'s credentials: from the provider, or for a chained role from STS, signed with its
    /// source role's credentials (obtained the same way first).
    fn obtain<'b>(
        &'b self,
        role: &'b config::Role,
    ) -> BoxFuture<'b, Result<Obtained, SourceError>> {
        Box::pin(async move {
            match &role.source {
                RoleSource::Provider(p) => Ok(self.upstream.fetch(p).await?),
                RoleSource::Chained(c) => {
                    let missing = |what: &str| ChainedError::SourceUnavailable {
                        source_role: c.source_role.clone(),
                        reason: Some(what.into()),
                    };
                    let (_, source) = self
                        .config
                        .role(Some(&c.source_role))
                        .ok_or_else(|| missing("no such role"))?;
                    let sts = self.sts.as_ref().ok_or_else(|| missing("no [sts]"))?;
                    let source = self.obtain(source).await?;
                    let obtained = sts
                        .assume_role(&source.credentials, &AssumeRole::new(c))
                        .await
                        .map_err(ChainedError::from)?;
                    Ok(obtained)
                }
            }
        })
    }
}

/// One exchange for `role` (for a chained role, one per role of its chain), refused (like the
/// agent would) when the credentials could not be served: a command never hands out what the
/// agent would not.
async fn fetch_role(sources: &Sources<'_>, role: &config::Role) -> Result<Obtained, Exit> {
    let obtained = sources
        .obtain(role)
        .await
        .map_err(|e| fail(e.class().into(), format!("role {}: {e}", role.name)))?;
    ScheduleConfig::default()
        .check_lifetime(obtained.lifetime)
        .map_err(|e| fail(Exit::Transient, format!("role {}: {e}", role.name)))?;
    Ok(obtained)
}

/// When credentials obtained at `obtained.arrived` expire, on the device's wall clock now.
fn wall_expiration(obtained: &Obtained) -> UnixTime {
    let left = obtained.lifetime.saturating_sub(obtained.arrived.elapsed());
    UnixTime::now().saturating_add(left)
}

/// `iotcred fetch`: one exchange, printed in `format`.
pub fn fetch(config: Option<&Path>, role: Option<&str>, format: Format) -> Exit {
    let inner = || -> Result<(), Exit> {
        let config = load_config(config)?;
        let (_, role) = config.role(role).ok_or_else(|| {
            let names: Vec<&str> = config.roles.iter().map(|r| r.name.as_str()).collect();
            fail(
                Exit::Config,
                format!(
                    "no role {:?} in the config; roles: {}",
                    role.unwrap_or(""),
                    names.join(", ")
                ),
            )
        })?;
        let identity = load_identity(&config)?;
        let sources = Sources::new(&config, identity)?;
        let fetched = runtime()?.block_on(fetch_role(&sources, role))?;
        let text = format.render(&role.name, &fetched.credentials, wall_expiration(&fetched));
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
            .map_err(|e| fail(Exit::Other, format!("cannot write output: {e}")))
    };
    match inner() {
        Ok(()) => Exit::Ok,
        Err(c) => c,
    }
}

/// `iotcred check [--fetch]`: validates everything that can be validated locally, and with
/// `--fetch` does one exchange per role. Never prints a secret.
pub fn check(config: Option<&Path>, do_fetch: bool) -> Exit {
    let inner = || -> Result<(), Exit> {
        let config = load_config(config)?;
        println!(
            "config: {} OK ({} role(s))",
            config.path.display(),
            config.roles.len()
        );
        let o = &config.origins;
        match &config.thing_name {
            Some(t) => println!("thing_name: {} ({})", t.as_str(), o.thing_name.describe()),
            None => println!("thing_name: none ({})", o.thing_name.describe()),
        }
        crate::lifecycle::check_lines(&config);
        let Some(device) = &config.device else {
            println!(
                "identity: not provisioned yet: `iotcred provision` (or `iotcred run`) makes it with [provision]"
            );
            return Ok(());
        };
        let identity = load_identity(&config)?;
        let c = &identity.cert;
        println!(
            "certificate: {} ({}; subject {}, {} in chain), valid {} to {}",
            device.certificate.display(),
            o.certificate.describe(),
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
        println!(
            "key: {} ({}) OK (certificate matches the key)",
            device.key,
            o.key.describe()
        );
        crate::lifecycle::check_rotation(&config, c.not_after);
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
        let sources = Sources::new(&config, identity)?;
        let rt = runtime()?;
        let mut worst: Option<Exit> = None;
        for role in &config.roles {
            match rt.block_on(fetch_role(&sources, role)) {
                Ok(f) => {
                    let id = &f.credentials.access_key_id;
                    let last4: String = id
                        .chars()
                        .rev()
                        .take(4)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect();
                    println!(
                        "role {}: OK, credentials expire {} (in {} s), access key id …{last4}",
                        role.name,
                        wall_expiration(&f).rfc3339(),
                        f.lifetime.as_secs()
                    );
                }
                Err(code) => worst = Some(worst.map_or(code, |w| w.min(code))),
            }
        }
        worst.map_or(Ok(()), Err)
    };
    match inner() {
        Ok(()) => Exit::Ok,
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
pub fn get(socket: Option<&Path>, role: Option<&str>, format: Format) -> Exit {
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
                Ok(()) => Exit::Ok,
                Err(e) => fail(Exit::Other, format!("cannot write output: {e}")),
            }
        }
        Err(e) => fail(e.exit(), e),
    }
}

/// `iotcred keygen`.
pub fn keygen(
    key: &str,
    subject: &str,
    algorithm: crate::keys::Algorithm,
    csr_out: Option<&Path>,
    overwrite: bool,
) -> Exit {
    let src = match crate::keys::KeySource::parse(key) {
        Ok(s) => s,
        Err(e) => return fail(Exit::Config, format!("--key: {e}")),
    };
    let csr = match crate::keys::keygen(&src, subject, algorithm, overwrite) {
        Ok(c) => c,
        Err(e) => return fail(Exit::Config, e),
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
            Exit::Ok
        }
        Err(e) => fail(Exit::Other, e),
    }
}

/// `iotcred run`.
pub fn run(config: Option<&Path>) -> Exit {
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
        Err(e) => return fail(Exit::Other, format!("cannot start the runtime: {e}")),
    };
    rt.block_on(crate::daemon::run(config))
}

/// `iotcred provision [--dry-run]` (SPEC §8.1): through the running agent when one answers on
/// its socket, else in this process.
pub fn provision(config: Option<&Path>, dry_run: bool) -> Exit {
    identity_command(config, "/v1/identity/provision", dry_run, |config| {
        Box::pin(crate::lifecycle::provision(config, dry_run))
    })
}

/// `iotcred rotate [--force]` (SPEC §8.2): through the running agent when one answers on its
/// socket, else in this process (which then destroys the old key itself).
pub fn rotate(config: Option<&Path>, force: bool) -> Exit {
    let path = if force {
        "/v1/identity/rotate?force=true"
    } else {
        "/v1/identity/rotate"
    };
    identity_command(config, path, false, |config| {
        Box::pin(crate::lifecycle::rotate(config, force))
    })
}

type JobFuture<'a> = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Result<crate::lifecycle::Outcome, crate::lifecycle::LifecycleError>,
            > + 'a,
    >,
>;

fn identity_command(
    config: Option<&Path>,
    agent_path: &str,
    local_only: bool,
    job: impl for<'a> FnOnce(&'a Config) -> JobFuture<'a>,
) -> Exit {
    let config = match load_config(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if !local_only {
        use crate::client::JobAnswer;
        match crate::client::identity_job(&config.serve.socket, agent_path) {
            JobAnswer::NoAgent => {}
            JobAnswer::Done(Exit::Ok, text) => {
                println!("{text}");
                return Exit::Ok;
            }
            JobAnswer::Done(code, text) | JobAnswer::Refused(code, text) => {
                return fail(code, text);
            }
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(Exit::Other, format!("cannot start the runtime: {e}")),
    };
    match rt.block_on(job(&config)) {
        Ok(outcome) => {
            if let Some(old) = &outcome.retired {
                // No agent runs (it would have taken the job): nothing uses the old key now.
                crate::lifecycle::retire(old);
            }
            for line in &outcome.lines {
                println!("{line}");
            }
            Exit::Ok
        }
        Err(e) => fail(e.exit, e),
    }
}
