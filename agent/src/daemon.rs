//! `iotcred run`: wires configuration, identity, refreshers, the local server, systemd
//! notification and signals together.

use std::os::unix::fs::DirBuilderExt;
use std::sync::Arc;
use std::time::Duration;

use iotcred_core::UnixTime;
use iotcred_core::schedule::Mode;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::commands::{EXIT_CONFIG, EXIT_OK, EXIT_OTHER};
use crate::config::{Config, RoleSource};
use crate::metrics::Metrics;
use crate::refresh::{Clock, Refresher, schedule_config};
use crate::state::{RoleHandle, RolePublisher, role_channel};
use crate::upstream::Upstream;
use crate::{sdnotify, server, tls};

/// How long in-flight local requests may take to finish after SIGTERM.
const DRAIN_GRACE: Duration = Duration::from_secs(6);

/// The roles and refreshers of one configuration generation.
struct Generation {
    config: Config,
    cert_pem: Vec<u8>,
    handles: Vec<RoleHandle>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<(String, RolePublisher)>,
}

/// Chained roles (SPEC §9) are parsed and validated, but no refresher serves them yet.
fn chained_not_supported(config: &Config) -> Option<String> {
    let chained: Vec<&str> = config
        .roles
        .iter()
        .filter(|r| matches!(r.source, RoleSource::Chained(_)))
        .map(|r| r.name.as_str())
        .collect();
    (!chained.is_empty()).then(|| {
        format!(
            "role(s) {} use source_role: chained roles are not supported yet by `run`; remove them or give them a role_alias",
            chained.join(", ")
        )
    })
}

/// Runs the agent until SIGTERM/SIGINT. Returns the exit code.
pub async fn run(config: Config) -> u8 {
    if let Some(e) = chained_not_supported(&config) {
        eprintln!("iotcred: {e}");
        return EXIT_CONFIG;
    }
    let identity = match wait_for_identity(&config).await {
        Ok(i) => i,
        Err(code) => return code,
    };
    if let Err(e) = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o750)
        .create(&config.runtime_dir)
    {
        eprintln!(
            "iotcred: cannot create runtime_dir {}: {e}",
            config.runtime_dir.display()
        );
        return EXIT_CONFIG;
    }
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        endpoint = %config.endpoint,
        certificate = %identity.cert.subject,
        certificate_expires = %identity.cert.not_after.rfc3339(),
        key = %config.key,
        roles = config.roles.len(),
        "starting"
    );
    let upstream = Arc::new(Upstream::new(&config, identity.client_config));
    let names: Vec<&str> = config.roles.iter().map(|r| r.name.as_str()).collect();
    let metrics = Arc::new(Metrics::new(&names));
    let clock = Clock::new();

    let cert_pem = std::fs::read(&config.certificate).unwrap_or_default();
    let mut generation = start_generation(config, upstream, cert_pem, &metrics, clock, Vec::new());
    let serve_cfg = server::ServeConfig::from_config(&generation.config);
    let listeners = match server::bind(&serve_cfg, &generation.handles).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("iotcred: {e}");
            return EXIT_CONFIG;
        }
    };
    let server_state =
        server::ServerState::new(generation.handles.clone(), metrics.clone(), &serve_cfg);
    let (server_stop_tx, server_stop_rx) = watch::channel(false);
    let server_task = {
        let state = server_state.clone();
        let mut rx = server_stop_rx.clone();
        tokio::spawn(async move {
            server::serve(listeners, state, async move {
                let _ = rx.wait_for(|s| *s).await;
            })
            .await
        })
    };

    let mut status = StatusReporter::new();
    let (mut sigterm, mut sigint, mut sighup) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(a), Ok(b), Ok(c)) => (a, b, c),
        _ => {
            eprintln!("iotcred: cannot install signal handlers");
            return EXIT_OTHER;
        }
    };
    let watchdog = sdnotify::watchdog_interval().map(|d| d / 2);
    let mut watchdog_tick = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    watchdog_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut changes = merged_changes(&generation.handles);

    loop {
        status.report(&generation.handles);
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = sighup.recv() => {
                sdnotify::reloading();
                generation = reload(generation, &metrics, clock, &server_state).await;
                changes = merged_changes(&generation.handles);
                status.reloaded();
            }
            _ = watchdog_tick.tick(), if watchdog.is_some() => sdnotify::watchdog(),
            _ = changes.changed() => {}
        }
    }

    tracing::info!("stopping");
    sdnotify::stopping();
    let _ = generation.stop.send(true);
    let _ = server_stop_tx.send(true);
    let _ = tokio::time::timeout(DRAIN_GRACE, server_task).await;
    generation.tasks.shutdown().await;
    EXIT_OK
}

/// How often `run` re-checks the clock while it is before the certificate's notBefore.
const CLOCK_RETRY: Duration = Duration::from_secs(5);

/// Loads the identity. A clock before the certificate's notBefore (a gateway without RTC that
/// booted in 1970 and has no time sync yet) is not a configuration error for the daemon: it
/// logs one line naming the clock, then retries until the clock is sane (or SIGTERM/SIGINT).
/// Any other error is a configuration error (exit 2).
async fn wait_for_identity(config: &Config) -> Result<tls::Identity, u8> {
    let mut logged = false;
    loop {
        match tls::load_identity(config) {
            Ok(i) => {
                if logged {
                    tracing::info!(
                        "system clock is now after the certificate's notBefore; starting"
                    );
                }
                return Ok(i);
            }
            Err(tls::IdentityError::ClockBehind(message)) => {
                if !logged {
                    tracing::error!(
                        "{message}; the system clock looks wrong: waiting for time sync (checking every {} s)",
                        CLOCK_RETRY.as_secs()
                    );
                    sdnotify::status(
                        "waiting for the system clock (before the certificate's notBefore)",
                    );
                    logged = true;
                }
                let (Ok(mut term), Ok(mut int)) = (
                    signal(SignalKind::terminate()),
                    signal(SignalKind::interrupt()),
                ) else {
                    return Err(EXIT_OTHER);
                };
                tokio::select! {
                    _ = tokio::time::sleep(CLOCK_RETRY) => {}
                    _ = term.recv() => return Err(EXIT_OK),
                    _ = int.recv() => return Err(EXIT_OK),
                }
            }
            Err(e) => {
                eprintln!("iotcred: {e}");
                return Err(EXIT_CONFIG);
            }
        }
    }
}

fn start_generation(
    config: Config,
    upstream: Arc<Upstream>,
    cert_pem: Vec<u8>,
    metrics: &Arc<Metrics>,
    clock: Clock,
    carried: Vec<(String, RolePublisher)>,
) -> Generation {
    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let mut handles = Vec::with_capacity(config.roles.len());
    let sched = schedule_config(&config);
    let mut carried = carried;
    for role in &config.roles {
        let (publisher, handle) = match carried.iter().position(|(n, _)| n == &role.name) {
            Some(i) => {
                let (_, publisher) = carried.swap_remove(i);
                let handle =
                    publisher.handle(config.refresh.mode, &role.allow_uids, &role.allow_gids);
                (publisher, handle)
            }
            None => role_channel(
                &role.name,
                config.refresh.mode,
                &role.allow_uids,
                &role.allow_gids,
            ),
        };
        handles.push(handle);
        let refresher = Refresher {
            index: metrics.role_index(&role.name).unwrap_or(usize::MAX),
            role: role.clone(),
            schedule: sched,
            upstream: upstream.clone(),
            publisher,
            metrics: metrics.clone(),
            clock,
        };
        tasks.spawn(refresher.run(stop_rx.clone()));
    }
    Generation {
        config,
        cert_pem,
        handles,
        stop,
        tasks,
    }
}

/// SIGHUP: re-read the configuration and certificate. An invalid new configuration is logged
/// and the running one kept. Roles whose identity (endpoint, certificate and its content, key,
/// thing name, CA, role alias, duration) did not change keep their credentials.
async fn reload(
    old: Generation,
    metrics: &Arc<Metrics>,
    clock: Clock,
    server: &server::ServerState,
) -> Generation {
    let refuse = |e: &dyn std::fmt::Display| {
        tracing::error!("reload refused, keeping the running configuration: {e}")
    };
    let new_config = match Config::load(&old.config.path) {
        Ok(c) => c,
        Err(e) => {
            refuse(&e);
            return old;
        }
    };
    let identity = match tls::load_identity(&new_config) {
        Ok(i) => i,
        Err(e) => {
            refuse(&e);
            return old;
        }
    };
    if let Some(e) = chained_not_supported(&new_config) {
        refuse(&e);
        return old;
    }
    let upstream = Arc::new(Upstream::new(&new_config, identity.client_config));
    if new_config.serve != old.config.serve || new_config.runtime_dir != old.config.runtime_dir {
        tracing::warn!("[serve] and runtime_dir changes take effect at the next restart");
    }
    let cert_pem = std::fs::read(&new_config.certificate).unwrap_or_default();
    let same_identity = new_config.endpoint == old.config.endpoint
        && new_config.certificate == old.config.certificate
        && cert_pem == old.cert_pem
        && new_config.key.to_string() == old.config.key.to_string()
        && new_config.thing_name == old.config.thing_name
        && new_config.ca == old.config.ca;
    let Generation {
        config: old_config,
        stop,
        mut tasks,
        ..
    } = old;
    let _ = stop.send(true);
    let mut carried = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let Ok((name, publisher)) = done else {
            continue;
        };
        let unchanged = |n: &crate::config::Role| {
            old_config
                .roles
                .iter()
                .any(|o| o.name == n.name && o.source == n.source)
        };
        if same_identity
            && new_config
                .roles
                .iter()
                .any(|n| n.name == name && unchanged(n))
        {
            carried.push((name, publisher));
        }
    }
    tracing::info!(
        kept = carried.len(),
        identity_changed = !same_identity,
        "reloading configuration"
    );
    let generation = start_generation(new_config, upstream, cert_pem, metrics, clock, carried);
    server.set_roles(generation.handles.clone());
    tracing::info!(roles = generation.handles.len(), "configuration reloaded");
    generation
}

/// A receiver that changes whenever any role's snapshot changes.
fn merged_changes(handles: &[RoleHandle]) -> watch::Receiver<()> {
    let (tx, rx) = watch::channel(());
    for h in handles {
        let mut w = h.watch();
        let tx = tx.clone();
        tokio::spawn(async move {
            while w.changed().await.is_ok() {
                if tx.send(()).is_err() {
                    return;
                }
            }
        });
    }
    rx
}

/// Sends READY=1 once every role holds credentials (on-demand roles count as ready) and STATUS
/// lines with the next refresh.
struct StatusReporter {
    ready: bool,
    last: String,
}

impl StatusReporter {
    fn new() -> Self {
        StatusReporter {
            ready: false,
            last: String::new(),
        }
    }

    fn reloaded(&mut self) {
        if self.ready {
            sdnotify::ready();
        }
    }

    fn report(&mut self, handles: &[RoleHandle]) {
        let now = Instant::now();
        let wall = UnixTime::now();
        let mut parts = Vec::with_capacity(handles.len());
        let mut all_ready = true;
        for h in handles {
            let snap = h.snapshot();
            let servable = snap.held.as_ref().is_some_and(|x| x.servable(now));
            if !servable && h.mode == Mode::Proactive {
                all_ready = false;
            }
            let part = match (&snap.held, snap.next_attempt) {
                (Some(held), next) if servable => {
                    let exp = held.consumer_expiration(now, wall).rfc3339();
                    match next {
                        Some(n) => format!(
                            "{}: valid until {exp}, next refresh in {}s",
                            h.name,
                            n.saturating_duration_since(now).as_secs()
                        ),
                        None => format!("{}: valid until {exp}", h.name),
                    }
                }
                _ if h.mode == Mode::OnDemand && !snap.demanded => format!("{}: on demand", h.name),
                _ => match &snap.last_error {
                    Some(e) => format!(
                        "{}: no credentials ({} failure(s): {e})",
                        h.name, snap.failures
                    ),
                    None => format!("{}: fetching", h.name),
                },
            };
            parts.push(part);
        }
        if all_ready && !self.ready {
            self.ready = true;
            tracing::info!("ready: every role holds credentials");
            sdnotify::ready();
        }
        let line = parts.join("; ");
        if line != self.last {
            sdnotify::status(&line);
            self.last = line;
        }
    }
}
