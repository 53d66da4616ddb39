//! Per-role credential state shared between the refresher task (writer) and every consumer
//! (HTTP server, file sinks, health, metrics, systemd status).
//!
//! The refresher publishes a [`Snapshot`] on a `tokio::sync::watch` channel after every change;
//! readers never block the refresher and never see a half-updated state.

use std::sync::Arc;
use std::time::Duration;

use iotcred_core::schedule::Mode;
use iotcred_core::{Credentials, MIN_REMAINING, UnixTime};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

/// Credentials the refresher obtained, with their lifetime pinned to the monotonic clock.
pub struct Held {
    /// The credentials as issued (the `expiration` field is the provider's clock).
    pub credentials: Credentials,
    /// When they expire, on the monotonic clock (`arrival + (expiration − Date)`).
    pub expires_at: Instant,
    /// When the refresher will (or did) start refreshing them (start of the refresh window).
    pub refresh_at: Instant,
    /// Wall-clock time they arrived.
    pub issued_wall: UnixTime,
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held")
            .field("credentials", &self.credentials)
            .field("expires_at", &self.expires_at)
            .field("refresh_at", &self.refresh_at)
            .finish()
    }
}

impl Held {
    /// Time left at `now` (zero once expired).
    pub fn remaining(&self, now: Instant) -> Duration {
        self.expires_at.saturating_duration_since(now)
    }

    /// May these be handed out at `now`? (≥ 60 s left, SPEC §3.)
    pub fn servable(&self, now: Instant) -> bool {
        self.remaining(now) >= MIN_REMAINING
    }

    /// The `Expiration` to hand to consumers: the device's wall clock now plus the remaining
    /// lifetime, so consumers refresh on time even when the wall clock is skewed (SPEC §3).
    pub fn consumer_expiration(&self, now: Instant, wall_now: UnixTime) -> UnixTime {
        wall_now.saturating_add(self.remaining(now))
    }
}

/// What consumers can see of one role at one moment. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The last good credentials, if any (they may have expired: check [`Held::servable`]).
    pub held: Option<Arc<Held>>,
    /// Wall-clock time of the last successful refresh.
    pub last_refresh: Option<UnixTime>,
    /// Wall-clock time of the last failed attempt.
    pub last_failure: Option<UnixTime>,
    /// Message of the last failure since the last success (never a secret).
    pub last_error: Option<Arc<str>>,
    /// Consecutive failures since the last success.
    pub failures: u32,
    /// When the refresher will next try to fetch (monotonic), if it has a plan.
    pub next_attempt: Option<Instant>,
    /// A fetch is under way.
    pub fetching: bool,
    /// On-demand mode: a client has asked at least once.
    pub demanded: bool,
}

/// Why no credentials can be served right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotReady {
    /// Suggested `Retry-After` for the client.
    pub retry_after: Duration,
}

/// Credentials ready to be served.
#[derive(Clone, Debug)]
pub struct Served {
    /// The held credentials (shared, never copied).
    pub held: Arc<Held>,
    /// Skew-corrected expiration for consumers.
    pub expiration: UnixTime,
}

/// Role health as reported by `/v1/health` (SPEC §4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoleHealth {
    /// Holds credentials outside the refresh window (or, on-demand, not asked yet).
    Healthy,
    /// Holds servable credentials, but inside the refresh window.
    Refreshing,
    /// No servable credentials.
    Unavailable,
}

/// A consumer's handle on one role: cheap to clone.
#[derive(Clone, Debug)]
pub struct RoleHandle {
    /// Role name (`[[role]] name`).
    pub name: Arc<str>,
    /// Refresh mode of this role.
    pub mode: Mode,
    /// Unix-socket peers allowed (empty = anyone who can open the socket, when gids is empty too).
    pub allow_uids: Arc<[u32]>,
    /// Unix-socket groups allowed.
    pub allow_gids: Arc<[u32]>,
    rx: watch::Receiver<Snapshot>,
    demand: Arc<Notify>,
}

/// The writer side, owned by the role's refresher task.
#[derive(Debug)]
pub struct RolePublisher {
    name: Arc<str>,
    tx: watch::Sender<Snapshot>,
    demand: Arc<Notify>,
}

/// Creates the channel pair for one role.
pub fn role_channel(
    name: &str,
    mode: Mode,
    allow_uids: &[u32],
    allow_gids: &[u32],
) -> (RolePublisher, RoleHandle) {
    let (tx, rx) = watch::channel(Snapshot::default());
    let demand = Arc::new(Notify::new());
    (
        RolePublisher {
            name: name.into(),
            tx,
            demand: demand.clone(),
        },
        RoleHandle {
            name: name.into(),
            mode,
            allow_uids: allow_uids.into(),
            allow_gids: allow_gids.into(),
            rx,
            demand,
        },
    )
}

impl RolePublisher {
    /// Replaces parts of the snapshot and wakes every reader.
    pub fn update(&self, f: impl FnOnce(&mut Snapshot)) {
        self.tx.send_modify(f);
    }

    /// Changes the snapshot; readers are woken only when `f` returns true.
    pub fn update_if(&self, f: impl FnOnce(&mut Snapshot) -> bool) {
        self.tx.send_if_modified(f);
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Snapshot {
        self.tx.borrow().clone()
    }

    /// How many receivers watch this role: consumer handles plus requests waiting in
    /// [`RoleHandle::credentials`] (diagnostics and tests).
    pub fn receivers(&self) -> usize {
        self.tx.receiver_count()
    }

    /// Resolves when a consumer asked for credentials (on-demand mode, or nothing servable).
    pub async fn demanded(&self) {
        self.demand.notified().await;
    }

    /// A new consumer handle on this role's state (used on reload, with the new settings).
    pub fn handle(&self, mode: Mode, allow_uids: &[u32], allow_gids: &[u32]) -> RoleHandle {
        RoleHandle {
            name: self.name.clone(),
            mode,
            allow_uids: allow_uids.into(),
            allow_gids: allow_gids.into(),
            rx: self.tx.subscribe(),
            demand: self.demand.clone(),
        }
    }
}

impl RoleHandle {
    /// The current snapshot (for health, metrics and status).
    pub fn snapshot(&self) -> Snapshot {
        self.rx.borrow().clone()
    }

    /// A receiver that sees every future change.
    pub fn watch(&self) -> watch::Receiver<Snapshot> {
        self.rx.clone()
    }

    /// Health of this role at `now`.
    pub fn health(&self, now: Instant) -> RoleHealth {
        let snap = self.rx.borrow();
        match &snap.held {
            Some(h) if h.servable(now) && now < h.refresh_at => RoleHealth::Healthy,
            Some(h) if h.servable(now) => RoleHealth::Refreshing,
            _ if self.mode == Mode::OnDemand && !snap.demanded => RoleHealth::Healthy,
            _ => RoleHealth::Unavailable,
        }
    }

    /// Credentials to serve now.
    ///
    /// Servable credentials are returned at once (in on-demand mode, credentials inside the
    /// refresh window also ask the refresher for new ones, in the background). With nothing
    /// servable, the refresher is asked for a fetch and the call waits for it, at most `wait`:
    /// concurrent callers share the one upstream fetch (single flight). Never returns
    /// credentials with less than 60 s left.
    pub async fn credentials(&self, wait: Duration) -> Result<Served, NotReady> {
        let deadline = Instant::now() + wait;
        let mut rx = self.rx.clone();
        let mut asked = false;
        loop {
            let now = Instant::now();
            let (served, retry) = {
                let snap = rx.borrow_and_update();
                let served = snap.held.as_ref().filter(|h| h.servable(now)).map(|h| {
                    if self.mode == Mode::OnDemand && now >= h.refresh_at && !snap.fetching {
                        self.demand.notify_one();
                    }
                    Served {
                        held: h.clone(),
                        expiration: h.consumer_expiration(now, UnixTime::now()),
                    }
                });
                let retry = snap
                    .next_attempt
                    .map(|t| t.saturating_duration_since(now))
                    .unwrap_or(Duration::ZERO);
                (served, (retry, snap.fetching))
            };
            if let Some(s) = served {
                return Ok(s);
            }
            let (retry_in, fetching) = retry;
            if !asked {
                // Ask once; the schedule decides whether backoff allows a fetch now.
                self.demand.notify_one();
                asked = true;
            }
            let not_ready = NotReady {
                retry_after: retry_in.clamp(Duration::from_secs(1), Duration::from_secs(300)),
            };
            // Wait only while a fetch is (or is about to be) under way; a refresher in backoff
            // will not produce credentials before the client's deadline.
            if !fetching && !retry_in.is_zero() && now + retry_in > deadline {
                return Err(not_ready);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                _ => return Err(not_ready),
            }
        }
    }
}
