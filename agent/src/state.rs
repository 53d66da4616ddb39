//! The published state of each role: what core's [`Schedule`] says, and the credentials its
//! plan describes.
//!
//! The role's refresher owns the one [`Schedule`] of the role and keeps it *in* a
//! `tokio::sync::watch` channel: every input (an issue, a failure, a client's demand) goes
//! through [`RolePublisher`], which changes the schedule in place and wakes the readers. Every
//! reader (the HTTP server, file sinks, health, metrics, systemd status) asks the published
//! schedule (`servable`, `health`, `remaining`, `failures`, `poll_timeout`, …): nothing beside
//! it re-derives or copies what it knows.

use std::sync::Arc;
use std::time::Duration;

use iotcred_core::schedule::{Action, Schedule, ScheduleConfig, Unservable};
use iotcred_core::{Credentials, ErrorClass, UnixTime};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::source::Obtained;

/// Maps tokio's monotonic clock onto core's [`iotcred_core::Instant`] (milliseconds since the
/// agent's start). One clock serves every role, and survives reloads.
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

/// What consumers can see of one role at one moment.
#[derive(Clone, Debug)]
pub struct RoleState {
    /// The role's schedule: servability, health, refresh point, next attempt, failures,
    /// demand. The one source of all of them.
    pub schedule: Schedule,
    /// The credentials whose timeline the schedule holds (present whenever
    /// `schedule.expires_at()` is).
    pub credentials: Option<Arc<Credentials>>,
    /// Message of the last failure since the last success (never a secret).
    pub last_error: Option<Arc<str>>,
    /// Wall-clock time of the last failure since the last success.
    pub last_failure: Option<UnixTime>,
}

impl RoleState {
    /// Credentials that may be served at `now`, with the `Expiration` to hand out: the device's
    /// wall clock plus the remaining lifetime, so consumers refresh on time even when the wall
    /// clock is skewed (SPEC §3).
    pub fn servable(&self, now: iotcred_core::Instant, wall: UnixTime) -> Option<Served> {
        if !self.schedule.servable(now) {
            return None;
        }
        let credentials = self.credentials.clone()?;
        let remaining = self.schedule.remaining(now).unwrap_or_default();
        Some(Served {
            credentials,
            expiration: wall.saturating_add(remaining),
        })
    }

    /// Wall-clock time of the last successful refresh, as seen now.
    pub fn last_refresh(&self, now: iotcred_core::Instant, wall: UnixTime) -> Option<UnixTime> {
        Some(self.wall_time(self.schedule.issued_at()?, now, wall))
    }

    /// The device's wall-clock time of the monotonic instant `t`, given both clocks' now: the
    /// monotonic distance from now, applied to the wall clock's now.
    pub fn wall_time(
        &self,
        t: iotcred_core::Instant,
        now: iotcred_core::Instant,
        wall: UnixTime,
    ) -> UnixTime {
        if t >= now {
            wall.saturating_add(t.saturating_duration_since(now))
        } else {
            wall.saturating_sub(now.saturating_duration_since(t))
        }
    }
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
    /// The credentials (shared, never copied).
    pub credentials: Arc<Credentials>,
    /// Skew-corrected expiration for consumers.
    pub expiration: UnixTime,
}

/// A consumer's handle on one role: cheap to clone.
#[derive(Clone, Debug)]
pub struct RoleHandle {
    /// Role name (`[[role]] name`).
    pub name: Arc<str>,
    /// Unix-socket peers allowed (empty = anyone who can open the socket, when gids is empty too).
    pub allow_uids: Arc<[u32]>,
    /// Unix-socket groups allowed.
    pub allow_gids: Arc<[u32]>,
    clock: Clock,
    rx: watch::Receiver<RoleState>,
    signals: Arc<Signals>,
}

/// What consumers tell a role's refresher.
#[derive(Debug, Default)]
struct Signals {
    /// A client asked in a way that changes the schedule ([`Schedule::needs_demand`]).
    demand: Notify,
    /// The credentials held were refused upstream: refresh now ([`Schedule::handle_stale`]).
    stale: Notify,
}

/// The writer side, owned by the role's refresher: every input to the role's schedule.
#[derive(Debug)]
pub struct RolePublisher {
    name: Arc<str>,
    clock: Clock,
    tx: watch::Sender<RoleState>,
    signals: Arc<Signals>,
}

/// Creates the state of a new role (no credentials yet), and its first consumer handle.
pub fn role_channel(
    name: &str,
    config: ScheduleConfig,
    clock: Clock,
    allow_uids: &[u32],
    allow_gids: &[u32],
) -> (RolePublisher, RoleHandle) {
    let (tx, _) = watch::channel(RoleState {
        schedule: Schedule::new(config, clock.now()),
        credentials: None,
        last_error: None,
        last_failure: None,
    });
    let publisher = RolePublisher {
        name: name.into(),
        clock,
        tx,
        signals: Arc::default(),
    };
    let handle = publisher.handle(allow_uids, allow_gids);
    (publisher, handle)
}

/// A refresher input that failed: the error's class, the issuer's `Retry-After`, and a
/// message for health and logs (never a secret).
#[derive(Debug)]
pub struct Failure {
    /// Permanent or transient.
    pub class: ErrorClass,
    /// The issuer's `Retry-After`.
    pub retry_after: Option<Duration>,
    /// One line: what is wrong and what to do.
    pub message: Arc<str>,
}

impl RolePublisher {
    /// The role's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current state.
    pub fn state(&self) -> RoleState {
        self.tx.borrow().clone()
    }

    /// Core's view of now, on the clock the role's schedule runs on.
    pub fn clock_now(&self) -> iotcred_core::Instant {
        self.clock.now()
    }

    /// A new consumer handle on this role's state (at start, and on reload with new settings).
    pub fn handle(&self, allow_uids: &[u32], allow_gids: &[u32]) -> RoleHandle {
        RoleHandle {
            name: self.name.clone(),
            allow_uids: allow_uids.into(),
            allow_gids: allow_gids.into(),
            clock: self.clock,
            rx: self.tx.subscribe(),
            signals: self.signals.clone(),
        }
    }

    /// How many receivers watch this role: consumer handles plus requests waiting in
    /// [`RoleHandle::credentials`] (diagnostics and tests).
    pub fn receivers(&self) -> usize {
        self.tx.receiver_count()
    }

    /// Continues the role under a new schedule configuration after a reload that kept it: the
    /// plan of the credentials held stays exactly as it was ([`Schedule::carry_over`]).
    pub fn carry_over(&self, config: ScheduleConfig) {
        self.tx
            .send_modify(|s| s.schedule = s.schedule.carry_over(config));
    }

    /// Whether a fetch starts now ([`Schedule::poll_action`]).
    pub fn poll_action(&self) -> Option<Action> {
        let now = self.clock.now();
        let mut action = None;
        self.tx.send_if_modified(|s| {
            action = s.schedule.poll_action(now);
            action.is_some()
        });
        action
    }

    /// When to call [`poll_action`](Self::poll_action) again ([`Schedule::poll_timeout`]).
    pub fn poll_timeout(&self) -> Option<Instant> {
        let t = self.tx.borrow().schedule.poll_timeout();
        t.map(|t| self.clock.to_tokio(t))
    }

    /// A source obtained credentials. Refused when they could never be served (too short a
    /// lifetime): the schedule counts that as a failure and keeps the last good ones.
    ///
    /// Accepted credentials are handed to `before_publish` (which writes the file sinks)
    /// before readers see them, so that whoever waits for the role to become servable (systemd
    /// readiness, a client) finds the files already written. Only the refresher writes the
    /// state, so the state it computes from is still current when it publishes.
    pub fn handle_issued(
        &self,
        obtained: Obtained,
        random: u32,
        before_publish: impl FnOnce(&RoleState),
    ) -> Result<(), Unservable> {
        let arrived = self.clock.to_core(obtained.arrived);
        let mut next = self.state();
        let result = next
            .schedule
            .handle_issued(arrived, obtained.lifetime, random);
        match &result {
            Ok(()) => {
                next.credentials = Some(Arc::new(obtained.credentials));
                next.last_error = None;
                next.last_failure = None;
                before_publish(&next);
            }
            Err(e) => {
                next.last_error = Some(e.to_string().into());
                next.last_failure = Some(UnixTime::now());
            }
        }
        self.tx.send_replace(next);
        result
    }

    /// A fetch failed.
    pub fn handle_failure(&self, failure: Failure, random: u32) {
        let now = self.clock.now();
        self.tx.send_modify(|s| {
            s.schedule
                .handle_failure(now, failure.class, failure.retry_after, random);
            s.last_error = Some(failure.message);
            s.last_failure = Some(UnixTime::now());
        });
    }

    /// A client asked ([`Schedule::handle_demand`]).
    fn handle_demand(&self) {
        let now = self.clock.now();
        self.tx.send_modify(|s| s.schedule.handle_demand(now));
    }

    /// The credentials held were refused upstream ([`Schedule::handle_stale`]).
    pub fn handle_stale(&self) {
        let now = self.clock.now();
        self.tx.send_modify(|s| s.schedule.handle_stale(now));
    }

    /// Waits for the next signal from consumers, and feeds it to the schedule.
    pub async fn next_signal(&self) {
        tokio::select! {
            _ = self.signals.demand.notified() => self.handle_demand(),
            _ = self.signals.stale.notified() => self.handle_stale(),
        }
    }
}

impl RoleHandle {
    /// The current state (for health, metrics and status).
    pub fn state(&self) -> RoleState {
        self.rx.borrow().clone()
    }

    /// Core's view of now, on the clock the role's schedule runs on.
    pub fn now(&self) -> iotcred_core::Instant {
        self.clock.now()
    }

    /// A receiver that sees every future change.
    pub fn watch(&self) -> watch::Receiver<RoleState> {
        self.rx.clone()
    }

    /// Asks the refresher to replace the credentials held now, because they were refused
    /// upstream (a chained role's STS call answered `ExpiredToken`).
    pub fn refresh_now(&self) {
        self.signals.stale.notify_one();
    }

    /// Credentials to serve now.
    ///
    /// Servable credentials are returned at once (a demand that should start a refresh, as in
    /// on-demand mode inside the refresh window, is passed to the refresher on the way). With
    /// nothing servable, the call waits at most `wait` for a fetch that is under way or due
    /// before then: concurrent callers share the one upstream fetch (single flight). Never
    /// returns credentials that the schedule does not call servable (SPEC §3: ≥ 60 s left).
    pub async fn credentials(&self, wait: Duration) -> Result<Served, NotReady> {
        let deadline = Instant::now() + wait;
        // The common case reads the shared receiver and returns: no clone, no allocation.
        let mut rx = match self.decide(&self.rx.borrow(), deadline) {
            Decision::Serve(s) => return Ok(s),
            Decision::Refuse(n) => return Err(n),
            Decision::Wait(_) => self.rx.clone(),
        };
        loop {
            let decision = self.decide(&rx.borrow_and_update(), deadline);
            let not_ready = match decision {
                Decision::Serve(s) => return Ok(s),
                Decision::Refuse(n) => return Err(n),
                Decision::Wait(n) => n,
            };
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                _ => return Err(not_ready),
            }
        }
    }

    fn decide(&self, state: &RoleState, deadline: Instant) -> Decision {
        let now = self.clock.now();
        let schedule = &state.schedule;
        if schedule.needs_demand(now) {
            self.signals.demand.notify_one();
        }
        if let Some(served) = state.servable(now, UnixTime::now()) {
            return Decision::Serve(served);
        }
        // `None` with nothing in flight: the demand just sent is about to make a fetch due.
        let due_in = schedule
            .poll_timeout()
            .map_or(Duration::ZERO, |t| t.saturating_duration_since(now));
        let not_ready = NotReady {
            retry_after: due_in.clamp(Duration::from_secs(1), Duration::from_secs(300)),
        };
        if schedule.in_flight() || self.clock.to_core(deadline) >= now + due_in {
            Decision::Wait(not_ready)
        } else {
            Decision::Refuse(not_ready)
        }
    }
}

enum Decision {
    Serve(Served),
    Wait(NotReady),
    Refuse(NotReady),
}
