//! `iotcred run`: wires configuration, identity, refreshers, the local server, systemd
//! notification and signals together.

use std::os::unix::fs::DirBuilderExt;
use std::sync::Arc;
use std::time::Duration;

use iotcred_core::UnixTime;
use iotcred_core::schedule::{Mode, ScheduleConfig};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::{Config, Role, RoleSource};
use crate::exit::Exit;
use crate::metrics::Metrics;
use crate::refresh::{Refresher, schedule_config};
use crate::source::Source;
use crate::state::{Clock, RoleHandle, RolePublisher, role_channel};
use crate::sts::{AssumeRole, ChainedSource, StsClient, StsSetupError};
use crate::upstream::{ProviderSource, Upstream};
use crate::{sdnotify, server, tls};

/// How long in-flight local requests may take to finish after SIGTERM.
const DRAIN_GRACE: Duration = Duration::from_secs(6);

/// One configuration generation: its settings and its running roles.
struct Generation {
    config: Config,
    cert_pem: Vec<u8>,
    roles: RoleSet,
}

/// The running roles: a refresher task per role, and the consumers' handles.
#[derive(Debug)]
pub(crate) struct RoleSet {
    handles: Vec<RoleHandle>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<RolePublisher>,
}

impl RoleSet {
    /// Starts a refresher for every role of `roles`, in order. A role whose publisher is in
    /// `carried` continues with its schedule and credentials; the others start empty. Every
    /// role's handle exists before any source is made, so a chained role's source can watch
    /// its source role whatever their order.
    pub(crate) fn start(
        roles: &[Role],
        config: ScheduleConfig,
        clock: Clock,
        metrics: &Arc<Metrics>,
        mut carried: Vec<RolePublisher>,
        mut source_for: impl FnMut(&Role, &[RoleHandle]) -> Arc<dyn Source>,
    ) -> RoleSet {
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let publishers: Vec<RolePublisher> = roles
            .iter()
            .map(
                |role| match carried.iter().position(|p| p.name() == role.name) {
                    Some(i) => {
                        let publisher = carried.swap_remove(i);
                        publisher.carry_over(config);
                        publisher
                    }
                    None => role_channel(&role.name, config, clock, &[], &[]).0,
                },
            )
            .collect();
        let handles: Vec<RoleHandle> = roles
            .iter()
            .zip(&publishers)
            .map(|(role, p)| p.handle(&role.allow_uids, &role.allow_gids))
            .collect();
        for (role, publisher) in roles.iter().zip(publishers) {
            let refresher = Refresher {
                index: metrics.role_index(&role.name).unwrap_or(usize::MAX),
                source: source_for(role, &handles),
                files: role.files.clone(),
                publisher,
                metrics: metrics.clone(),
            };
            tasks.spawn(refresher.run(stop_rx.clone()));
        }
        RoleSet {
            handles,
            stop,
            tasks,
        }
    }

    /// The consumers' handles, in configuration order.
    pub(crate) fn handles(&self) -> &[RoleHandle] {
        &self.handles
    }

    /// Stops every refresher (abandoning fetches under way) and hands back the roles' states.
    pub(crate) async fn stop(mut self) -> Vec<RolePublisher> {
        let _ = self.stop.send(true);
        let mut stopped = Vec::with_capacity(self.handles.len());
        while let Some(done) = self.tasks.join_next().await {
            if let Ok(publisher) = done {
                stopped.push(publisher);
            }
        }
        stopped
    }
}

/// The roles of `stopped` (the old generation's) that the new generation continues: those
/// with the same name and the same source of credentials (role alias and duration, or the same
/// chained role). When the device identity changed, the credentials of provider roles stay
/// servable while valid, but are refreshed at once with the new identity (chained roles'
/// credentials come from STS and do not depend on it).
pub(crate) fn carried(
    old: &[Role],
    new: &[Role],
    stopped: Vec<RolePublisher>,
    identity_changed: bool,
) -> Vec<RolePublisher> {
    let same = |name: &str| {
        let o = old.iter().find(|r| r.name == name)?;
        let n = new.iter().find(|r| r.name == name)?;
        same_source(o, n).then_some(n)
    };
    stopped
        .into_iter()
        .filter_map(|p| {
            let role = same(p.name())?;
            if identity_changed && matches!(role.source, RoleSource::Provider(_)) {
                p.handle_stale();
            }
            Some(p)
        })
        .collect()
}

/// Whether two roles ask for the same credentials (the device identity is compared apart).
fn same_source(a: &Role, b: &Role) -> bool {
    match (&a.source, &b.source) {
        (RoleSource::Provider(a), RoleSource::Provider(b)) => {
            a.role_alias == b.role_alias && a.duration == b.duration
        }
        (a, b) => a == b,
    }
}

/// What the roles' sources run on: the device's upstream (none before provisioning), and STS
/// for chained roles.
#[derive(Debug)]
struct Backends {
    upstream: Option<Arc<Upstream>>,
    sts: Option<Arc<StsClient>>,
    /// How long a chained role waits for its source role's credentials.
    wait: Duration,
}

impl Backends {
    fn new(config: &Config, identity: Option<tls::Identity>) -> Result<Backends, StsSetupError> {
        let sts = match &config.sts {
            Some(s) => Some(Arc::new(StsClient::new(s, config.timeout)?)),
            None => None,
        };
        Ok(Backends {
            upstream: identity.map(|i| Arc::new(Upstream::new(config, i.client_config))),
            sts,
            wait: config.timeout,
        })
    }

    /// The source of `role`; `handles` are every role's (a chained role reads its source's).
    fn source_for(&self, role: &Role, handles: &[RoleHandle]) -> Arc<dyn Source> {
        match &role.source {
            RoleSource::Provider(p) => match &self.upstream {
                Some(upstream) => Arc::new(ProviderSource::new(upstream.clone(), p.clone())),
                None => Arc::new(NotProvisioned),
            },
            RoleSource::Chained(c) => {
                let source = handles.iter().find(|h| *h.name == *c.source_role);
                match (&self.sts, source) {
                    (Some(sts), Some(source)) => Arc::new(ChainedSource::new(
                        sts.clone(),
                        AssumeRole::new(c),
                        source.clone(),
                        self.wait,
                    )),
                    // The configuration guarantees both; a source that always fails says so.
                    _ => Arc::new(crate::sts::MissingSource::new(&c.source_role)),
                }
            }
        }
    }
}

/// The source of a provider role before the device has an identity.
#[derive(Debug)]
struct NotProvisioned;

/// A provider role's error before provisioning.
#[derive(Debug, thiserror::Error)]
#[error(
    "not provisioned: the device has no identity yet (provisioning by claim is under way; see the identity section of /v1/health)"
)]
struct NotProvisionedError;

impl crate::source::SourceFailure for NotProvisionedError {
    fn class(&self) -> iotcred_core::ErrorClass {
        iotcred_core::ErrorClass::Transient
    }
    fn retry_after(&self) -> Option<Duration> {
        Some(Duration::from_secs(60))
    }
}

impl Source for NotProvisioned {
    fn fetch(
        &self,
    ) -> crate::source::BoxFuture<'_, Result<crate::source::Obtained, crate::source::SourceError>>
    {
        Box::pin(async { Err(NotProvisionedError.into()) })
    }
}

/// How `run` notices an `identity.toml` switched by another process.
enum IdentityWatch {
    /// inotify on `state_dir`.
    Inotify(crate::identity::DirWatch),
    /// inotify failed: a look every [`IDENTITY_POLL`].
    Poll,
    /// No `[provision]` and no `identity.toml`: nothing can switch it.
    Off,
}

/// How often `run` looks at `identity.toml` for a switch made by another process when it
/// cannot watch `state_dir`.
const IDENTITY_POLL: Duration = Duration::from_secs(2);

/// What identifies one version of `identity.toml`: an atomic replacement changes the inode.
type FileStamp = Option<(u64, u64, i64, i64, u64)>;

fn stamp(path: &std::path::Path) -> FileStamp {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.dev(), m.ino(), m.mtime(), m.mtime_nsec(), m.len()))
}

/// Runs the agent until SIGTERM/SIGINT. Returns the exit code.
pub async fn run(config: Config) -> Exit {
    let identity = if config.device.is_some() {
        match wait_for_identity(&config).await {
            Ok(i) => Some(i),
            Err(code) => return code,
        }
    } else {
        tracing::info!("not provisioned yet: serving 503 until provisioning by claim succeeds");
        None
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
        return Exit::Config;
    }
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        endpoint = %config.endpoint,
        certificate = %identity.as_ref().map(|i| i.cert.subject.as_str()).unwrap_or("none (not provisioned)"),
        certificate_expires = %identity.as_ref().map(|i| i.cert.not_after.rfc3339().to_string()).unwrap_or_default(),
        key = %config.device.as_ref().map(|d| d.key.to_string()).unwrap_or_default(),
        roles = config.roles.len(),
        "starting"
    );
    let backends = match Backends::new(&config, identity) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("iotcred: {e}");
            return Exit::Config;
        }
    };
    let names: Vec<&str> = config.roles.iter().map(|r| r.name.as_str()).collect();
    let metrics = Arc::new(Metrics::new(&names));
    let clock = Clock::new();

    let cert_pem = device_cert_pem(&config);
    let roles = RoleSet::start(
        &config.roles,
        schedule_config(&config),
        clock,
        &metrics,
        Vec::new(),
        |role, handles| backends.source_for(role, handles),
    );
    let mut generation = Generation {
        config,
        cert_pem,
        roles,
    };
    let serve_cfg = server::ServeConfig::from_config(&generation.config);
    let listeners = match server::bind(&serve_cfg, generation.roles.handles()).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("iotcred: {e}");
            return Exit::Config;
        }
    };
    let server_state = server::ServerState::new(
        generation.roles.handles().to_vec(),
        metrics.clone(),
        &serve_cfg,
    );
    let identity_status = crate::lifecycle::Status::default();
    if generation.config.device.is_none() {
        identity_status.update(|s| s.identity = crate::lifecycle::IdentityState::NotProvisioned);
    }
    let (jobs_tx, jobs_rx) = tokio::sync::mpsc::channel(8);
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel(1);
    let (config_tx, config_rx) = watch::channel(Arc::new(generation.config.clone()));
    let (worker_stop_tx, worker_stop_rx) = watch::channel(false);
    server_state.set_lifecycle(server::Lifecycle {
        status: identity_status.clone(),
        jobs: jobs_tx,
    });
    let worker = tokio::spawn(crate::lifecycle::worker::run(
        config_rx,
        jobs_rx,
        done_tx,
        identity_status,
        worker_stop_rx,
    ));
    let identity_file = crate::identity::IdentityRecord::path(&generation.config.state_dir);
    let mut identity_stamp = stamp(&identity_file);
    // identity.toml switched by another process: inotify on state_dir (created now if missing,
    // SPEC §8), else a poll every IDENTITY_POLL. Only where provisioning or rotation can happen.
    let follows = generation.config.provision.is_some() || generation.config.record.is_some();
    let state_watch = if follows {
        let dir = &generation.config.state_dir;
        match crate::identity::ensure_state_dir(dir)
            .and_then(|()| crate::identity::DirWatch::new(dir))
        {
            Ok(w) => IdentityWatch::Inotify(w),
            Err(e) => {
                tracing::warn!(
                    state_dir = %dir.display(),
                    error = %e,
                    "cannot watch state_dir: checking identity.toml every 2 s instead"
                );
                IdentityWatch::Poll
            }
        }
    } else {
        IdentityWatch::Off
    };
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
    if generation.config.device.is_none() {
        // Up and answering (503 until provisioned): systemd must not time the start out.
        status.ready = true;
        sdnotify::ready();
        sdnotify::status("not provisioned: provisioning by claim");
    }
    let mut identity_poll = tokio::time::interval(IDENTITY_POLL);
    identity_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let identity_changed =
        async |watch: &IdentityWatch, poll: &mut tokio::time::Interval| match watch {
            IdentityWatch::Inotify(w) => {
                if w.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            IdentityWatch::Poll => {
                poll.tick().await;
            }
            IdentityWatch::Off => std::future::pending::<()>().await,
        };
    let (mut sigterm, mut sigint, mut sighup) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(a), Ok(b), Ok(c)) => (a, b, c),
        _ => {
            eprintln!("iotcred: cannot install signal handlers");
            return Exit::Other;
        }
    };
    let watchdog = sdnotify::watchdog_interval().map(|d| d / 2);
    let mut watchdog_tick = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    watchdog_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut changes = merged_changes(generation.roles.handles());

    loop {
        status.report(generation.roles.handles());
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = sighup.recv() => {
                sdnotify::reloading();
                identity_stamp = stamp(&identity_file);
                (generation, changes) =
                    reload_and_tell(generation, &metrics, clock, &server_state, &config_tx).await;
                status.reloaded();
            }
            _ = watchdog_tick.tick(), if watchdog.is_some() => sdnotify::watchdog(),
            _ = changes.changed() => {}
            _ = identity_changed(&state_watch, &mut identity_poll) => {
                let now = stamp(&identity_file);
                if now != identity_stamp {
                    identity_stamp = now;
                    tracing::info!(path = %identity_file.display(), "identity.toml changed: reloading");
                    (generation, changes) =
                        reload_and_tell(generation, &metrics, clock, &server_state, &config_tx).await;
                }
            }
            Some(finished) = done_rx.recv() => {
                let crate::lifecycle::worker::Finished { result, reply, ack } = finished;
                if matches!(&result, Ok(o) if o.switched) {
                    identity_stamp = stamp(&identity_file);
                    (generation, changes) =
                        reload_and_tell(generation, &metrics, clock, &server_state, &config_tx).await;
                    status.reloaded();
                }
                if let Ok(crate::lifecycle::Outcome { retired: Some(old), .. }) = &result {
                    // The running generation no longer uses the old key: destroy it.
                    let in_use = generation.config.device.as_ref().is_some_and(|d| d.key == old.key);
                    if in_use {
                        tracing::warn!("the reload onto the new identity failed: the old key is kept");
                    } else {
                        crate::lifecycle::retire(old);
                    }
                }
                let answer = match &result {
                    Ok(o) => (Exit::Ok, o.lines.join("\n")),
                    Err(e) => (e.exit, e.to_string()),
                };
                if let Some(reply) = reply {
                    let _ = reply.send(answer);
                }
                let _ = ack.send(());
            }
        }
    }
    let _ = worker_stop_tx.send(true);
    worker.abort();

    tracing::info!("stopping");
    sdnotify::stopping();
    let _ = server_stop_tx.send(true);
    let _ = tokio::time::timeout(DRAIN_GRACE, server_task).await;
    generation.roles.stop().await;
    Exit::Ok
}

/// How often `run` re-checks the clock while it is before the certificate's notBefore.
const CLOCK_RETRY: Duration = Duration::from_secs(5);

/// Loads the identity. A clock before the certificate's notBefore (a gateway without RTC that
/// booted in 1970 and has no time sync yet) is not a configuration error for the daemon: it
/// logs one line naming the clock, then retries until the clock is sane (or SIGTERM/SIGINT).
/// Any other error is a configuration error (exit 2).
async fn wait_for_identity(config: &Config) -> Result<tls::Identity, Exit> {
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
                    return Err(Exit::Other);
                };
                tokio::select! {
                    _ = tokio::time::sleep(CLOCK_RETRY) => {}
                    _ = term.recv() => return Err(Exit::Ok),
                    _ = int.recv() => return Err(Exit::Ok),
                }
            }
            Err(e) => {
                eprintln!("iotcred: {e}");
                return Err(Exit::Config);
            }
        }
    }
}

/// SIGHUP: re-read the configuration and certificate. An invalid new configuration is logged
/// and the running one kept. Roles whose source of credentials did not change continue with
/// their schedule and credentials ([`carried`]); when the device identity (endpoint,
/// certificate and its content, key, thing name, CA) changed, they are refreshed at once with
/// the new one and served meanwhile.
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
    let identity = match new_config.device {
        None => None,
        Some(_) => match tls::load_identity(&new_config) {
            Ok(i) => Some(i),
            Err(e) => {
                refuse(&e);
                return old;
            }
        },
    };
    let backends = match Backends::new(&new_config, identity) {
        Ok(b) => b,
        Err(e) => {
            refuse(&e);
            return old;
        }
    };
    if new_config.serve != old.config.serve || new_config.runtime_dir != old.config.runtime_dir {
        tracing::warn!("[serve] and runtime_dir changes take effect at the next restart");
    }
    let cert_pem = device_cert_pem(&new_config);
    let identity_changed = !(new_config.endpoint == old.config.endpoint
        && new_config.device == old.config.device
        && cert_pem == old.cert_pem
        && new_config.thing_name == old.config.thing_name
        && new_config.ca == old.config.ca);
    let Generation {
        config: old_config,
        roles,
        ..
    } = old;
    let mut stopped = roles.stop().await;
    if old_config.device.is_none() {
        // Nothing was ever fetched without an identity: start every role afresh.
        stopped.clear();
    }
    let kept = carried(
        &old_config.roles,
        &new_config.roles,
        stopped,
        identity_changed,
    );
    tracing::info!(
        kept = kept.len(),
        identity_changed,
        "reloading configuration"
    );
    let roles = RoleSet::start(
        &new_config.roles,
        schedule_config(&new_config),
        clock,
        metrics,
        kept,
        |role, handles| backends.source_for(role, handles),
    );
    server.set_roles(roles.handles().to_vec());
    tracing::info!(roles = roles.handles().len(), "configuration reloaded");
    Generation {
        config: new_config,
        cert_pem,
        roles,
    }
}

/// [`reload`], then what follows every reload: the change signal of the new roles, and the
/// new configuration handed to the identity worker.
async fn reload_and_tell(
    old: Generation,
    metrics: &Arc<Metrics>,
    clock: Clock,
    server: &server::ServerState,
    worker_config: &watch::Sender<Arc<Config>>,
) -> (Generation, watch::Receiver<()>) {
    let generation = reload(old, metrics, clock, server).await;
    let changes = merged_changes(generation.roles.handles());
    let _ = worker_config.send(Arc::new(generation.config.clone()));
    (generation, changes)
}

/// A receiver that changes whenever any role's state changes.
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
    /// READY=1 was sent.
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
        let wall = UnixTime::now();
        let mut parts = Vec::with_capacity(handles.len());
        let mut all_ready = true;
        for h in handles {
            let now = h.now();
            let state = h.state();
            let schedule = &state.schedule;
            let on_demand = schedule.config().mode == Mode::OnDemand;
            let served = state.servable(now, wall);
            if served.is_none() && !on_demand {
                all_ready = false;
            }
            let part = match served {
                Some(served) => {
                    let exp = served.expiration.rfc3339();
                    match schedule.poll_timeout() {
                        Some(n) => format!(
                            "{}: valid until {exp}, next refresh in {}s",
                            h.name,
                            n.saturating_duration_since(now).as_secs()
                        ),
                        None => format!("{}: valid until {exp}", h.name),
                    }
                }
                None if on_demand && !schedule.demanded() => format!("{}: on demand", h.name),
                None => match &state.last_error {
                    Some(e) => format!(
                        "{}: no credentials ({} failure(s): {e})",
                        h.name,
                        schedule.failures()
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

/// The device certificate file's bytes (empty when unreadable or not provisioned).
fn device_cert_pem(config: &Config) -> Vec<u8> {
    config
        .device
        .as_ref()
        .and_then(|d| std::fs::read(&d.certificate).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    //! Reloads driven with scripted sources in tokio's paused time.

    use std::path::Path;

    use iotcred_core::schedule::Health;

    use super::*;
    use crate::source::fake::{FakeSource, Reply};

    const HOUR: Duration = Duration::from_secs(3600);
    const MS: Duration = Duration::from_millis(100);

    fn roles(alias: &str) -> Vec<Role> {
        let text = format!(
            "endpoint = \"c2.credentials.iot.eu-west-1.amazonaws.com\"\n\
             certificate = \"device.pem\"\nkey = \"device.key\"\n\
             [[role]]\nname = \"default\"\nrole_alias = \"{alias}\"\n"
        );
        Config::parse(&text, Path::new("/etc/iotcred/config.toml"))
            .expect("config")
            .roles
    }

    fn start(roles: &[Role], carried: Vec<RolePublisher>, source: &Arc<FakeSource>) -> RoleSet {
        let metrics = Arc::new(Metrics::new(&["default"]));
        RoleSet::start(
            roles,
            ScheduleConfig::default(),
            Clock::new(),
            &metrics,
            carried,
            |_, _| source.clone(),
        )
    }

    /// (refresh point, health, access key id) of the only role, at its clock's now.
    fn plan(set: &RoleSet) -> (Option<iotcred_core::Instant>, Health, Option<String>) {
        let h = &set.handles()[0];
        let state = h.state();
        (
            state.schedule.refresh_at(),
            state.schedule.health(h.now()),
            state.credentials.map(|c| c.access_key_id.clone()),
        )
    }

    /// A role running for 20 minutes on one-hour credentials, then stopped for a reload.
    async fn twenty_minutes_in() -> (Vec<Role>, Vec<RolePublisher>, RolePlan) {
        let old_roles = roles("GatewayRole");
        let source = FakeSource::new([(MS, Reply::Issue(HOUR))]);
        let set = start(&old_roles, Vec::new(), &source);
        tokio::time::sleep(Duration::from_secs(1200)).await;
        let before = plan(&set);
        assert_eq!(before.1, Health::Fresh);
        let stopped = set.stop().await;
        (old_roles, stopped, before)
    }

    type RolePlan = (Option<iotcred_core::Instant>, Health, Option<String>);

    #[tokio::test(start_paused = true)]
    async fn a_reload_of_an_unchanged_role_keeps_its_refresh_time_and_health() {
        let (old_roles, stopped, before) = twenty_minutes_in().await;
        let new_roles = roles("GatewayRole");
        let kept = carried(&old_roles, &new_roles, stopped, false);
        assert_eq!(kept.len(), 1);
        let source = FakeSource::new([]);
        let set = start(&new_roles, kept, &source);
        assert_eq!(
            plan(&set),
            before,
            "refresh point, health and credentials kept"
        );
        // Nothing is fetched until the original refresh point.
        let refresh_at = before.0.expect("a refresh point");
        let now = set.handles()[0].now();
        let until = refresh_at.saturating_duration_since(now);
        tokio::time::sleep(until - Duration::from_secs(1)).await;
        assert_eq!(
            source.fetches(),
            0,
            "fetched before the original refresh point"
        );
        source.push(MS, Reply::Issue(HOUR));
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(source.fetches(), 1);
        set.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_changed_identity_keeps_serving_and_refreshes_at_once() {
        let (old_roles, stopped, before) = twenty_minutes_in().await;
        let new_roles = roles("GatewayRole");
        let kept = carried(&old_roles, &new_roles, stopped, true);
        let source = FakeSource::new([(MS, Reply::Issue(HOUR))]);
        let set = start(&new_roles, kept, &source);
        let (_, health, key) = plan(&set);
        assert_eq!(health, Health::Refreshing);
        assert_eq!(key, before.2, "the old credentials are still held");
        let served = set.handles()[0]
            .credentials(Duration::ZERO)
            .await
            .expect("served during the refresh");
        assert_eq!(Some(served.credentials.access_key_id.clone()), before.2);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            source.fetches(),
            1,
            "refreshed at once with the new identity"
        );
        let (_, health, key) = plan(&set);
        assert_eq!(health, Health::Fresh);
        assert_ne!(key, before.2);
        set.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_role_asking_for_other_credentials_starts_afresh() {
        let (old_roles, stopped, _) = twenty_minutes_in().await;
        let new_roles = roles("OtherRole");
        let kept = carried(&old_roles, &new_roles, stopped, false);
        assert!(kept.is_empty());
        let source = FakeSource::new([(Duration::from_secs(5), Reply::Issue(HOUR))]);
        let set = start(&new_roles, kept, &source);
        let refused = set.handles()[0].credentials(Duration::ZERO).await;
        assert!(refused.is_err(), "credentials of the old role alias served");
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(source.fetches(), 1);
        set.stop().await;
    }
}
