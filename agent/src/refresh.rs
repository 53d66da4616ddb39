//! One refresher task per role: drives the role's schedule with tokio timers, asks the role's
//! [`Source`] when the schedule says so, and rewrites the role's file sinks.
//!
//! The refresher keeps no state of its own: the schedule lives in the role's published state
//! ([`crate::state`]), and every outcome goes there through the [`RolePublisher`].

use std::sync::Arc;

use iotcred_core::schedule::{Action, ScheduleConfig};
use iotcred_core::{ErrorClass, MIN_REMAINING};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::{Config, FileSink};
use crate::metrics::{Metrics, RefreshOutcome};
use crate::source::Source;
use crate::state::{Failure, RolePublisher, RoleState};

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
    /// Where the role's credentials come from.
    pub source: Arc<dyn Source>,
    /// The role's file sinks.
    pub files: Vec<FileSink>,
    /// The role's state.
    pub publisher: RolePublisher,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

impl Refresher {
    /// Runs until `shutdown` turns true, then hands back the role's publisher, so that a reload
    /// can continue the role with its schedule and credentials. A fetch under way at shutdown
    /// is abandoned (its future dropped).
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> RolePublisher {
        let Refresher {
            index,
            source,
            files,
            publisher,
            metrics,
        } = self;
        let role = publisher.name().to_owned();
        // A previous run killed mid-write may have left temporary files next to the sinks.
        for sink in &files {
            crate::sinks::remove_stale_temps(&sink.path);
        }
        loop {
            if *shutdown.borrow() {
                return publisher;
            }
            if let Some(Action::Fetch) = publisher.poll_action() {
                let started = Instant::now();
                let result = tokio::select! {
                    r = source.fetch() => r,
                    _ = shutdown.changed() => continue,
                };
                let failure = match result {
                    Ok(obtained) => {
                        let latency = obtained.latency;
                        let lifetime = obtained.lifetime;
                        let issued = publisher.handle_issued(obtained, random_u32(), |state| {
                            write_files(&role, &files, state, publisher.clock_now());
                            log_refreshed(&role, state, lifetime, latency);
                        });
                        match issued {
                            Ok(()) => {
                                metrics.refresh_result(index, RefreshOutcome::Success, latency);
                                continue;
                            }
                            Err(unservable) => {
                                metrics.refresh_result(index, RefreshOutcome::Transient, latency);
                                unservable.to_string()
                            }
                        }
                    }
                    Err(e) => {
                        let outcome = match e.class() {
                            ErrorClass::Permanent => RefreshOutcome::Permanent,
                            ErrorClass::Transient => RefreshOutcome::Transient,
                        };
                        metrics.refresh_result(index, outcome, started.elapsed());
                        let message: Arc<str> = e.to_string().into();
                        publisher.handle_failure(
                            Failure {
                                class: e.class(),
                                retry_after: e.retry_after(),
                                message: message.clone(),
                            },
                            random_u32(),
                        );
                        message.to_string()
                    }
                };
                let state = publisher.state();
                let now = publisher.clock_now();
                tracing::warn!(
                    role = %role,
                    failures = state.schedule.failures(),
                    retry_in_s = state
                        .schedule
                        .poll_timeout()
                        .map(|t| t.saturating_duration_since(now).as_secs()),
                    still_serving = state.schedule.servable(now),
                    "refresh failed: {failure}"
                );
                continue;
            }
            let deadline = publisher.poll_timeout();
            tokio::select! {
                _ = sleep_until_opt(deadline) => {}
                _ = publisher.next_signal() => {}
                _ = shutdown.changed() => {}
            }
        }
    }
}

fn log_refreshed(
    role: &str,
    state: &RoleState,
    lifetime: std::time::Duration,
    latency: std::time::Duration,
) {
    let schedule = &state.schedule;
    let next_refresh_in_s = match (schedule.refresh_at(), schedule.issued_at()) {
        (Some(at), Some(issued)) => at.saturating_duration_since(issued).as_secs(),
        _ => 0,
    };
    tracing::info!(
        role,
        lifetime_s = lifetime.as_secs(),
        latency_ms = latency.as_millis() as u64,
        next_refresh_in_s,
        "credentials refreshed"
    );
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Rewrites every file sink of a role from its state; failures are logged and do not stop the
/// agent (the previous file stays whole).
pub fn write_files(role: &str, files: &[FileSink], state: &RoleState, now: iotcred_core::Instant) {
    let Some(served) = state.servable(now, iotcred_core::UnixTime::now()) else {
        return;
    };
    for sink in files {
        if let Err(e) = crate::sinks::write_sink(sink, role, &served) {
            tracing::error!(
                role,
                path = %sink.path.display(),
                "cannot write credentials file: {e}; the previous file (if any) is left as it was"
            );
        }
    }
}

#[cfg(test)]
mod tests;
