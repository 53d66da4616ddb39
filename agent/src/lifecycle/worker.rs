//! The agent's identity worker: provisions a device that has no identity, rotates the
//! certificate when it comes within `before_days` of its expiry, and runs the jobs asked for
//! over the Unix socket — one at a time. A finished job goes to the daemon's loop, which
//! reloads onto a switched identity and then retires the old key.

use std::sync::Arc;
use std::time::Duration;

use iotcred_core::UnixTime;
use tokio::sync::{mpsc, oneshot, watch};

use iotcred_core::lifecycle::{self, Backoff};

use super::{IdentityState, LifecycleError, Outcome, RotationState, Status};
use crate::config::Config;
use crate::exit::Exit;
use crate::server::{IdentityJob, JobKind};

/// The longest the worker sleeps before looking at the wall clock again.
const RECHECK: Duration = Duration::from_secs(3600);

/// A job the worker finished, for the daemon's loop.
#[derive(Debug)]
pub(crate) struct Finished {
    /// How it ended.
    pub result: Result<Outcome, LifecycleError>,
    /// The socket client waiting for the answer, if any.
    pub reply: Option<oneshot::Sender<(Exit, String)>>,
    /// Told when the daemon has reloaded (the worker then sees the new configuration).
    pub ack: oneshot::Sender<()>,
}

/// A random draw for core's timing functions.
fn random() -> u32 {
    let mut b = [0u8; 4];
    let _ = getrandom::fill(&mut b);
    u32::from_le_bytes(b)
}

/// The leaf certificate's validity and its rotation draw (`None` when it cannot be read).
struct Leaf {
    not_before: UnixTime,
    not_after: UnixTime,
    draw: u32,
}

fn leaf(config: &Config) -> Option<Leaf> {
    let device = config.device.as_ref()?;
    let chain = crate::tls::load_chain(&device.certificate).ok()?;
    let der = chain.first()?;
    let parsed = crate::cert::parse_leaf(der.as_ref()).ok()?;
    Some(Leaf {
        not_before: parsed.not_before,
        not_after: parsed.not_after,
        draw: lifecycle::rotation_random(der.as_ref()),
    })
}

/// What the worker does next on its own, and when (device wall clock).
#[derive(Debug, Clone, Copy)]
struct Plan {
    kind: JobKind,
    at: UnixTime,
}

struct Worker {
    status: Status,
    started: UnixTime,
    start_jitter: Duration,
    failures: u32,
    retry_at: Option<UnixTime>,
}

impl Worker {
    /// `leaf` is the current certificate's ([`leaf`] of `config`).
    fn plan(&self, config: &Config, leaf: Option<&Leaf>) -> Option<Plan> {
        let now = UnixTime::now();
        if config.device.is_none() {
            let p = config.provision.as_ref()?;
            p.claim_certificate.as_ref()?;
            let at = self
                .retry_at
                .unwrap_or_else(|| self.started.saturating_add(self.start_jitter));
            return Some(Plan {
                kind: JobKind::Provision,
                at,
            });
        }
        let rotation = config.rotation.as_ref()?;
        config.provision.as_ref()?;
        if let Some(at) = self.retry_at {
            return Some(Plan {
                kind: JobKind::Rotate { force: false },
                at,
            });
        }
        let leaf = leaf?;
        // A point in the rotation window that is the same across restarts and differs between
        // devices (core's `rotation_at`), so a fleet that becomes due while running spreads
        // its rotations. A certificate already in its window when the agent started (a device
        // powered on late, or a certificate shorter-lived than before_days) rotates at once,
        // after the start-up jitter.
        let (window_start, _) =
            lifecycle::rotation_window(leaf.not_before, leaf.not_after, rotation.before_days);
        let at = if window_start > self.started {
            lifecycle::rotation_at(
                leaf.not_before,
                leaf.not_after,
                rotation.before_days,
                leaf.draw,
            )
        } else {
            now.max(self.started.saturating_add(self.start_jitter))
        };
        Some(Plan {
            kind: JobKind::Rotate { force: false },
            at,
        })
    }

    fn show(&self, config: &Config, leaf: Option<&Leaf>, plan: Option<Plan>) {
        let not_after = leaf.map(|l| l.not_after);
        self.status.update(|s| {
            s.identity = if config.device.is_some() {
                IdentityState::Provisioned
            } else {
                IdentityState::NotProvisioned
            };
            s.thing_name = config.thing_name.as_ref().map(|t| t.as_str().to_string());
            s.certificate_id = config
                .record
                .as_ref()
                .and_then(|r| r.certificate_id.clone());
            s.certificate_expiration = not_after;
            s.rotation = match (&config.device, &config.rotation) {
                (Some(_), Some(_)) if self.failures == 0 => match plan {
                    Some(p) if UnixTime::now() >= p.at => RotationState::Due,
                    _ => RotationState::Idle,
                },
                (Some(_), Some(_)) => RotationState::Failed,
                _ => RotationState::Off,
            };
            s.next_rotation = plan
                .filter(|p| matches!(p.kind, JobKind::Rotate { .. }))
                .map(|p| p.at);
            s.failures = self.failures;
        });
    }
}

/// Runs until `stop`: the current configuration comes from `config`, jobs from the socket
/// through `jobs`; finished jobs go to `done`.
pub(crate) async fn run(
    mut config: watch::Receiver<Arc<Config>>,
    mut jobs: mpsc::Receiver<IdentityJob>,
    done: mpsc::Sender<Finished>,
    status: Status,
    mut stop: watch::Receiver<bool>,
) {
    let start_jitter = {
        let c = config.borrow();
        c.provision.as_ref().map_or(Duration::ZERO, |p| {
            lifecycle::startup_delay(p.start_jitter, random())
        })
    };
    let mut w = Worker {
        status,
        started: UnixTime::now(),
        start_jitter,
        failures: 0,
        retry_at: None,
    };
    loop {
        let current = config.borrow_and_update().clone();
        // The certificate is read once per look at the configuration.
        let leaf = leaf(&current);
        let plan = w.plan(&current, leaf.as_ref());
        w.show(&current, leaf.as_ref(), plan);
        let wait = plan.map(|p| p.at.saturating_duration_since(UnixTime::now()));
        let (kind, reply) = tokio::select! {
            _ = stop.changed() => return,
            changed = config.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
            job = jobs.recv() => match job {
                Some(j) => (j.kind, j.reply),
                None => return,
            },
            _ = tokio::time::sleep(wait.unwrap_or(RECHECK).min(RECHECK)), if wait.is_some() => {
                match plan {
                    Some(p) if UnixTime::now() >= p.at => (p.kind, None),
                    _ => continue,
                }
            }
        };
        let automatic = reply.is_none();
        w.status.update(|s| match kind {
            JobKind::Provision => s.identity = IdentityState::Provisioning,
            JobKind::Rotate { .. } => s.rotation = RotationState::Rotating,
        });
        let result = match kind {
            JobKind::Provision => super::provision(&current, false).await,
            JobKind::Rotate { force } => super::rotate(&current, force).await,
        };
        match &result {
            Ok(o) => {
                w.failures = 0;
                w.retry_at = None;
                w.status.update(|s| {
                    s.last_error = None;
                    if o.switched {
                        match kind {
                            JobKind::Provision => s.provisionings.0 += 1,
                            JobKind::Rotate { .. } => {
                                s.rotations.0 += 1;
                                s.last_rotation = Some(UnixTime::now());
                            }
                        }
                    }
                });
                for line in &o.lines {
                    tracing::info!("{line}");
                }
            }
            Err(e) => {
                tracing::error!("{e}");
                // A job asked for over the socket reports its failure to its client; only the
                // agent's own tries back off.
                if automatic {
                    w.failures = w.failures.saturating_add(1);
                    let policy = match kind {
                        JobKind::Provision => Backoff::PROVISION,
                        JobKind::Rotate { .. } => Backoff::ROTATION,
                    };
                    // A rejection a retry will not cure waits long; anything else (throttling
                    // included) backs off.
                    let delay = if e.exit == Exit::Permanent && !e.throttled {
                        policy.permanent_delay(random())
                    } else {
                        policy.delay(w.failures, random())
                    };
                    w.retry_at = Some(UnixTime::now().saturating_add(delay));
                    tracing::info!(
                        retry_in_seconds = delay.as_secs(),
                        "the current identity stays in use; trying again later"
                    );
                }
                w.status.update(|s| {
                    s.last_error = Some(e.to_string());
                    match kind {
                        JobKind::Provision => {
                            s.provisionings.1 += 1;
                            s.identity = IdentityState::NotProvisioned;
                        }
                        JobKind::Rotate { .. } => {
                            s.rotations.1 += 1;
                            s.rotation = RotationState::Failed;
                        }
                    }
                });
            }
        }
        let (ack, acked) = oneshot::channel();
        let finished = Finished { result, reply, ack };
        if done.send(finished).await.is_err() {
            return;
        }
        let _ = acked.await;
    }
}
