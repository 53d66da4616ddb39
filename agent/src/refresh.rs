//! One refresher task per role: drives core's [`Schedule`] with tokio timers, runs the upstream
//! exchange, publishes results on the role's watch channel and rewrites its file sinks.

use std::sync::Arc;
use std::time::Duration;

use iotcred_core::schedule::{Action, Schedule, ScheduleConfig};
use iotcred_core::{ErrorClass, MIN_REMAINING, UnixTime};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::{Config, FileSink, Role, RoleSource};
use crate::metrics::{Metrics, RefreshOutcome};
use crate::state::{Held, RolePublisher};
use crate::upstream::Upstream;

/// Maps tokio's monotonic clock onto core's [`iotcred_core::Instant`].
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    origin: Instant,
}

impl Clock {
    /// A clock whose origin is now.
    pub fn new() -> Clock {
        Clock {
            origin: Instant::now(),
        }
    }

    /// Core's view of `t`.
    pub fn to_core(&self, t: Instant) -> iotcred_core::Instant {
        let ms = t.saturating_duration_since(self.origin).as_millis();
        iotcred_core::Instant::from_millis(u64::try_from(ms).unwrap_or(u64::MAX))
    }

    /// Core's view of now.
    pub fn now(&self) -> iotcred_core::Instant {
        self.to_core(Instant::now())
    }

    /// Tokio's view of a core instant.
    pub fn to_tokio(&self, t: iotcred_core::Instant) -> Instant {
        self.origin + Duration::from_millis(t.as_millis())
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// A uniformly random `u32` from the OS.
pub fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    // getrandom only fails when the OS has no randomness at all; a fixed draw is then still a
    // valid (unjittered) schedule.
    let _ = getrandom::fill(&mut b);
    u32::from_le_bytes(b)
}

/// The schedule configuration for `config`.
pub fn schedule_config(config: &Config) -> ScheduleConfig {
    ScheduleConfig {
        mode: config.refresh.mode,
        refresh_before: config.refresh.refresh_before,
        jitter: config.refresh.jitter,
        max_backoff: config.refresh.max_backoff,
        min_remaining: MIN_REMAINING,
    }
}

/// Everything one refresher needs.
#[derive(Debug)]
pub struct Refresher {
    /// Index of the role (metrics label position).
    pub index: usize,
    /// The role.
    pub role: Role,
    /// Schedule settings.
    pub schedule: ScheduleConfig,
    /// Shared upstream (one device identity for all roles).
    pub upstream: Arc<Upstream>,
    /// Where results go.
    pub publisher: RolePublisher,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Clock mapping.
    pub clock: Clock,
}

impl Refresher {
    /// Runs until `shutdown` turns true, then hands back the role name and its publisher (so a
    /// reload can keep the role's credentials). A publisher that already holds servable
    /// credentials (carried over a reload) is refreshed on their remaining lifetime.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> (String, RolePublisher) {
        let Refresher {
            index,
            role,
            schedule: sched_cfg,
            upstream,
            publisher,
            metrics,
            clock,
        } = self;
        // `daemon::run` refuses chained roles before any refresher starts.
        let RoleSource::Provider(request) = role.source.clone() else {
            return (role.name, publisher);
        };
        let mut schedule = Schedule::new(sched_cfg, clock.now());
        // A previous run killed mid-write may have left temporary files next to the sinks.
        for sink in &role.files {
            crate::sinks::remove_stale_temps(&sink.path);
        }
        if let Some(held) = publisher
            .snapshot()
            .held
            .filter(|h| h.servable(Instant::now()))
        {
            // Carried over from before a reload: keep its plan.
            let remaining = held.remaining(Instant::now());
            schedule.handle_issued(clock.now(), remaining, random_u32());
        }
        loop {
            if *shutdown.borrow() {
                publisher.update(|s| s.fetching = false);
                return (role.name, publisher);
            }
            let now = clock.now();
            if let Some(Action::Fetch) = schedule.poll_action(now) {
                publisher.update(|s| s.fetching = true);
                let started = Instant::now();
                let result = tokio::select! {
                    r = upstream.fetch(&request) => r,
                    _ = shutdown.changed() => continue,
                };
                let done = Instant::now();
                match result {
                    Ok(f) => {
                        let lifetime = f.issued.lifetime;
                        let arrived_core = clock.to_core(f.arrived);
                        schedule.handle_issued(arrived_core, lifetime, random_u32());
                        let expires_at = f.arrived + lifetime;
                        let refresh_at = schedule
                            .refresh_at()
                            .map(|t| clock.to_tokio(t))
                            .unwrap_or(expires_at);
                        let held = Arc::new(Held {
                            credentials: f.issued.credentials,
                            expires_at,
                            refresh_at,
                            issued_wall: f.arrived_wall,
                        });
                        metrics.refresh_result(index, RefreshOutcome::Success, f.latency);
                        tracing::info!(
                            role = %role.name,
                            alias = request.role_alias.as_str(),
                            lifetime_s = lifetime.as_secs(),
                            latency_ms = f.latency.as_millis() as u64,
                            next_refresh_in_s = refresh_at.saturating_duration_since(done).as_secs(),
                            "credentials refreshed"
                        );
                        write_files(&role.name, &role.files, &held);
                        publisher.update(|s| {
                            s.held = Some(held);
                            s.fetching = false;
                            s.failures = 0;
                            s.last_error = None;
                            s.last_refresh = Some(UnixTime::now());
                            s.next_attempt = schedule.poll_timeout().map(|t| clock.to_tokio(t));
                        });
                    }
                    Err(e) => {
                        if !matches!(e, crate::upstream::UpstreamError::Exchange { .. }) {
                            upstream.reset();
                        }
                        schedule.handle_failure(
                            clock.now(),
                            e.class(),
                            e.retry_after(),
                            random_u32(),
                        );
                        let outcome = match e.class() {
                            ErrorClass::Permanent => RefreshOutcome::Permanent,
                            ErrorClass::Transient => RefreshOutcome::Transient,
                        };
                        metrics.refresh_result(
                            index,
                            outcome,
                            done.saturating_duration_since(started),
                        );
                        let next = schedule.poll_timeout().map(|t| clock.to_tokio(t));
                        let retry_in = next.map(|t| t.saturating_duration_since(done).as_secs());
                        let message: Arc<str> = e.to_string().into();
                        publisher.update(|s| {
                            s.fetching = false;
                            s.failures += 1;
                            s.last_error = Some(message.clone());
                            s.last_failure = Some(UnixTime::now());
                            s.next_attempt = next;
                        });
                        let snap = publisher.snapshot();
                        let serving = snap.held.as_ref().is_some_and(|h| h.servable(done));
                        tracing::warn!(
                            role = %role.name,
                            failures = snap.failures,
                            retry_in_s = retry_in,
                            still_serving = serving,
                            "refresh failed: {message}"
                        );
                    }
                }
                continue;
            }
            let deadline = schedule.poll_timeout().map(|t| clock.to_tokio(t));
            publisher.update_if(|s| {
                let changed = s.next_attempt != deadline;
                s.next_attempt = deadline;
                changed
            });
            tokio::select! {
                _ = sleep_until_opt(deadline) => {}
                _ = publisher.demanded() => {
                    publisher.update(|s| s.demanded = true);
                    schedule.handle_demand(clock.now());
                }
                _ = shutdown.changed() => {}
            }
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Rewrites every file sink of a role; failures are logged and do not stop the agent.
pub fn write_files(role: &str, files: &[FileSink], held: &Held) {
    let expiration = held.consumer_expiration(Instant::now(), UnixTime::now());
    for sink in files {
        if let Err(e) = crate::sinks::write_sink(sink, role, held, expiration) {
            tracing::error!(
                role,
                path = %sink.path.display(),
                "cannot write credentials file: {e}; the previous file (if any) is left as it was"
            );
        }
    }
}
