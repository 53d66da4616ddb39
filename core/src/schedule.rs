//! The refresh schedule of SPEC §3: a pure state machine.
//!
//! [`Schedule`] decides *when* to fetch credentials for one role; it never fetches anything
//! itself, never reads a clock and never draws a random number. Like `quinn-proto`, it is driven
//! from outside:
//!
//! - inputs: [`Schedule::handle_issued`] (a fetch succeeded), [`Schedule::handle_failure`] (a
//!   fetch failed), [`Schedule::handle_demand`] (a local client asked for credentials);
//! - outputs: [`Schedule::poll_action`] (start a fetch now?) and [`Schedule::poll_timeout`] (when
//!   to call `poll_action` again; `None` means "wait for an input");
//! - queries: [`Schedule::servable`], [`Schedule::remaining`], [`Schedule::health`], …
//!
//! Every input takes the current monotonic time `now`; inputs that need randomness take a
//! `random: u32` drawn by the caller from a uniform source (any CSPRNG or even a decent PRNG:
//! it only spreads a fleet's requests, it protects no secret).
//!
//! # Driving it
//!
//! After every input, call [`Schedule::poll_action`] until it returns `None`, then sleep until
//! [`Schedule::poll_timeout`] (or until the next input arrives, whichever comes first). Once
//! `poll_action(now)` has returned `None`, `poll_timeout()` is either `None` or strictly later
//! than `now`, so this loop never spins. `poll_action` returns [`Action::Fetch`] at most once
//! until the result of that fetch is reported back through `handle_issued` or `handle_failure`:
//! one upstream fetch at a time, and concurrent client requests wait for it (SPEC §3).
//!
//! The agent calls [`Schedule::handle_demand`] on **every** client request for the role, in
//! both modes: in [`Mode::OnDemand`] that is what triggers fetches, in [`Mode::Proactive`] it is
//! only recorded (see [`Schedule::healthy`]).
//!
//! Time never goes backwards: an input whose `now` is earlier than one seen before is treated
//! as if it happened at the latest time seen. Equal times are fine.
//!
//! # Example
//!
//! A simulated clock that jumps from one timeout to the next, with a provider that always
//! answers at once with one-hour credentials:
//!
//! ```
//! use iotcred_core::schedule::{Action, Schedule, ScheduleConfig};
//! use iotcred_core::time::{Duration, Instant};
//!
//! let mut now = Instant::from_secs(0);
//! let mut schedule = Schedule::new(ScheduleConfig::default(), now);
//! // Stand-in for a real random source (the agent uses getrandom).
//! let mut seed = 0x1234_5678_u32;
//! let mut random = move || {
//!     seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
//!     seed
//! };
//!
//! let mut fetches = 0;
//! while now < Instant::from_secs(4 * 3600) {
//!     while let Some(Action::Fetch) = schedule.poll_action(now) {
//!         fetches += 1;
//!         assert!(schedule.in_flight());
//!         // ... the exchange happens here; it succeeds with a one-hour credential.
//!         schedule.handle_issued(now, Duration::from_secs(3600), random()).unwrap();
//!     }
//!     // Served credentials always have at least a minute left.
//!     assert!(schedule.servable(now));
//!     assert!(schedule.remaining(now).unwrap() >= Duration::from_secs(60));
//!     match schedule.poll_timeout() {
//!         Some(next) => {
//!             assert!(next > now);
//!             now = next;
//!         }
//!         None => break,
//!     }
//! }
//! // One fetch at start-up, then one every 28–30 minutes (half the lifetime minus jitter).
//! assert!((8..=9).contains(&fetches));
//! ```

use crate::exchange::ErrorClass;
use crate::time::{Duration, Instant};

/// The shortest wait after a failure, and the earliest refresh after an issue: no busy loop.
pub const MIN_BACKOFF: Duration = Duration::from_secs(1);

/// The shortest wait after a permanent error (400, 401, 403, 404).
///
/// Such an error is not cured by retrying, but an operator may fix the cloud side (attach the
/// policy, create the role alias) without touching the device, so the schedule keeps trying,
/// slowly: a uniform draw in `[max(max_backoff / 2, 60 s), max(max_backoff, 60 s)]`.
pub const PERMANENT_MIN_BACKOFF: Duration = Duration::from_secs(60);

/// The longest `Retry-After` honoured. A larger value (or a hostile one) is cut to one hour,
/// so a device is never silenced for longer by a single answer.
pub const RETRY_AFTER_CAP: Duration = Duration::from_secs(3600);

/// When fetches happen (SPEC §3, `[refresh] mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Fetch at start-up and refresh before expiry without being asked (the default).
    #[default]
    Proactive,
    /// Fetch only when a client asks and the credentials are missing, inside their refresh
    /// window or no longer servable. Idle devices stay quiet: no timeouts without a demand.
    OnDemand,
}

impl Mode {
    /// The configuration spelling: `"proactive"` or `"on-demand"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Mode::Proactive => "proactive",
            Mode::OnDemand => "on-demand",
        }
    }
}

/// Tuning of a [`Schedule`] (SPEC §6, `[refresh]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ScheduleConfig {
    /// Proactive or on-demand. Default: [`Mode::Proactive`].
    pub mode: Mode,
    /// Refresh when the remaining lifetime falls to `max(lifetime / 2, refresh_before)`
    /// (`refresh_before_seconds`). Default: 900 s.
    pub refresh_before: Duration,
    /// The largest random jitter subtracted from the refresh point, itself capped at a tenth of
    /// the lifetime (`jitter_seconds`). Default: 120 s.
    pub jitter: Duration,
    /// The ceiling of the exponential backoff after transient errors (`max_backoff_seconds`).
    /// Default: 300 s.
    pub max_backoff: Duration,
    /// Credentials with less than this left are never served. Default:
    /// [`MIN_REMAINING`](crate::MIN_REMAINING) (60 s).
    pub min_remaining: Duration,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            mode: Mode::Proactive,
            refresh_before: Duration::from_secs(900),
            jitter: Duration::from_secs(120),
            max_backoff: Duration::from_secs(300),
            min_remaining: crate::MIN_REMAINING,
        }
    }
}

impl ScheduleConfig {
    /// Whether credentials with `lifetime` left on arrival can be served at all: at least
    /// `min_remaining` (SPEC §3: never serve credentials with less than 60 s left). The one
    /// rule behind [`Schedule::handle_issued`] and [`Schedule::servable`], for callers that
    /// hand out a single fetch without a schedule (such as a command-line `fetch`).
    pub fn check_lifetime(&self, lifetime: Duration) -> Result<(), Unservable> {
        if lifetime.is_zero() || lifetime < self.min_remaining {
            Err(Unservable {
                lifetime,
                min_remaining: self.min_remaining,
            })
        } else {
            Ok(())
        }
    }
}

/// What the driver must do, from [`Schedule::poll_action`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Start one upstream exchange now and report its outcome with
    /// [`Schedule::handle_issued`] or [`Schedule::handle_failure`].
    Fetch,
}

/// The state of a role's credentials, for `/v1/health` (SPEC §4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Health {
    /// No credentials have ever been received (not fetched yet, not asked for yet in on-demand
    /// mode, or every fetch so far failed).
    Empty,
    /// Servable and outside the refresh window.
    Fresh,
    /// Still servable but inside the refresh window: a refresh is due, in flight or backing off
    /// (in on-demand mode: will happen on the next demand).
    Refreshing,
    /// Credentials were received once but are no longer servable (less than `min_remaining`
    /// left).
    Expired,
}

impl Health {
    /// A lower-case name for JSON and metrics: `empty`, `fresh`, `refreshing`, `expired`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Health::Empty => "empty",
            Health::Fresh => "fresh",
            Health::Refreshing => "refreshing",
            Health::Expired => "expired",
        }
    }
}

/// Credentials that [`Schedule::handle_issued`] refused because they could never be served:
/// their lifetime is below `min_remaining` (60 s, SPEC §3) on arrival.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Unservable {
    /// The lifetime received.
    pub lifetime: Duration,
    /// The least lifetime that may be served.
    pub min_remaining: Duration,
}

impl core::fmt::Display for Unservable {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "the credentials received are valid for only {} s (less than {} s, the least that may be served): check the issuer's clock and the role's credential duration",
            self.lifetime.as_secs(),
            self.min_remaining.as_secs()
        )
    }
}

impl core::error::Error for Unservable {}

/// The refresh state machine of one role. See the [module documentation](self).
///
/// It is small and `Clone`: a driver may publish copies of it as the role's state, and readers
/// ask the copy ([`servable`](Self::servable), [`health`](Self::health), …) instead of keeping
/// their own flags beside it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    config: ScheduleConfig,
    /// The latest time seen on any input.
    now: Instant,
    held: Option<Held>,
    in_flight: bool,
    /// On-demand: a demand is waiting for a fetch to start.
    pending: bool,
    /// A client asked at least once.
    demanded: bool,
    /// Consecutive failures since the last success.
    failures: u32,
    /// No fetch starts before this (set by a failure, cleared when a fetch starts or succeeds).
    next_retry: Option<Instant>,
}

/// The last good credentials' timeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Held {
    issued_at: Instant,
    expires_at: Instant,
    refresh_at: Instant,
}

impl Schedule {
    /// A schedule without credentials, created at `now`. In proactive mode the first
    /// [`poll_action`](Self::poll_action) returns [`Action::Fetch`].
    pub fn new(config: ScheduleConfig, now: Instant) -> Self {
        Self {
            config,
            now,
            held: None,
            in_flight: false,
            pending: false,
            demanded: false,
            failures: 0,
            next_retry: None,
        }
    }

    /// The configuration this schedule runs with.
    pub fn config(&self) -> &ScheduleConfig {
        &self.config
    }

    /// Credentials arrived at `now`, valid for `lifetime` counted on the monotonic clock from
    /// `now` (SPEC §2: `expiration − Date`). `random` is a fresh uniform draw for the jitter.
    ///
    /// The new credentials replace the old ones, the failure count resets and the refresh point
    /// is set to `now + max(L/4, L − max(L/2, refresh_before)) − jitter` (never earlier than
    /// [`MIN_BACKOFF`] after `now`), see [`refresh_delay`].
    ///
    /// Credentials that are not servable on arrival (`lifetime < min_remaining`, or zero) are
    /// useless: they are dropped, the last good ones are kept, and the answer counts as a
    /// transient failure, so a provider that keeps sending them is met with backoff instead of
    /// a fetch loop; the error says why. This is the one place that decides whether fresh
    /// credentials can be served at all.
    pub fn handle_issued(
        &mut self,
        now: Instant,
        lifetime: Duration,
        random: u32,
    ) -> Result<(), Unservable> {
        let now = self.advance(now);
        self.in_flight = false;
        if let Err(e) = self.config.check_lifetime(lifetime) {
            self.fail(now, ErrorClass::Transient, None, random);
            return Err(e);
        }
        self.failures = 0;
        self.next_retry = None;
        self.pending = false;
        self.held = Some(Held {
            issued_at: now,
            expires_at: now + lifetime,
            refresh_at: now + refresh_delay(&self.config, lifetime, random),
        });
        Ok(())
    }

    /// The same role's schedule, continued under `config` (a configuration reload that kept the
    /// role and its identity). The plan of the credentials held is kept exactly: issue time,
    /// expiry and the refresh point with its jitter draw; so are the failure count, the backoff
    /// and demand. A fetch that was in flight was abandoned by the old driver: it is no longer
    /// in flight, and is due again when it was due before.
    #[must_use]
    pub fn carry_over(&self, config: ScheduleConfig) -> Schedule {
        Schedule {
            config,
            in_flight: false,
            ..self.clone()
        }
    }

    /// The credentials held were refused upstream before their time (for example STS answered
    /// `ExpiredToken` when they were used to sign a request), or the identity that obtained
    /// them changed: they stay servable while valid, but the refresh window opens at `now`, so
    /// the next fetch is due at once (after any backoff), in both modes.
    pub fn handle_stale(&mut self, now: Instant) {
        let now = self.advance(now);
        if let Some(held) = &mut self.held {
            held.refresh_at = held.refresh_at.min(now);
        }
        if self.config.mode == Mode::OnDemand && !self.in_flight {
            self.pending = true;
        }
    }

    /// The fetch started by the last [`Action::Fetch`] failed at `now` with an error of `class`;
    /// `retry_after` is the provider's `Retry-After` (429/503), if any. `random` is a fresh
    /// uniform draw for the backoff.
    ///
    /// The last good credentials stay servable while they have at least `min_remaining` left.
    /// The next fetch waits [`backoff_delay`] for the new count of consecutive failures.
    pub fn handle_failure(
        &mut self,
        now: Instant,
        class: ErrorClass,
        retry_after: Option<Duration>,
        random: u32,
    ) {
        let now = self.advance(now);
        self.in_flight = false;
        self.fail(now, class, retry_after, random);
    }

    /// A local client asked for this role's credentials at `now`. Call it on every request.
    ///
    /// In [`Mode::OnDemand`] a demand that finds no credentials, or credentials inside their
    /// refresh window or no longer servable, makes the next [`poll_action`](Self::poll_action)
    /// return [`Action::Fetch`] — right away, or once the backoff after a failure has passed
    /// (then [`poll_timeout`](Self::poll_timeout) says when). A demand while a fetch is in
    /// flight is answered by that fetch. In [`Mode::Proactive`] the demand is only recorded.
    ///
    /// Whatever the mode, the client is served when [`servable`](Self::servable) holds (after
    /// waiting for a fetch in flight, if any); otherwise it gets 503 with a `Retry-After` of
    /// [`next_retry`](Self::next_retry) minus now, when that is set.
    pub fn handle_demand(&mut self, now: Instant) {
        let now = self.advance(now);
        self.demanded = true;
        if self.config.mode == Mode::OnDemand && !self.in_flight && self.wants_refresh(now) {
            self.pending = true;
        }
    }

    /// Whether a client request at `now` must be reported with
    /// [`handle_demand`](Self::handle_demand) to change anything: the first demand ever, or (in
    /// on-demand mode) one that should start a fetch. Lets a driver keep the request path free
    /// of wake-ups when a demand would be a no-op.
    pub fn needs_demand(&self, now: Instant) -> bool {
        let now = self.now.max(now);
        !self.demanded
            || (self.config.mode == Mode::OnDemand
                && !self.in_flight
                && !self.pending
                && self.wants_refresh(now))
    }

    /// Whether to start a fetch at `now`. Returns [`Action::Fetch`] at most once until its
    /// outcome is reported; then [`in_flight`](Self::in_flight) is `true`.
    pub fn poll_action(&mut self, now: Instant) -> Option<Action> {
        let now = self.advance(now);
        match self.due_at() {
            Some(at) if at <= now => {
                self.in_flight = true;
                self.pending = false;
                self.next_retry = None;
                Some(Action::Fetch)
            }
            _ => None,
        }
    }

    /// When to call [`poll_action`](Self::poll_action) next, or `None` to wait for an input
    /// (a fetch in flight, or an on-demand schedule with nothing asked).
    ///
    /// After `poll_action(now)` returned `None` this is `None` or strictly later than `now`.
    /// Before that, it may be `now` or earlier: call `poll_action` right away.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.due_at()
    }

    /// Whether credentials are held that may be served at `now`: they exist, have not expired
    /// and have at least `min_remaining` left (SPEC §3).
    pub fn servable(&self, now: Instant) -> bool {
        let now = self.now.max(now);
        self.held.is_some_and(|held| {
            held.expires_at > now && held.expires_at - now >= self.config.min_remaining
        })
    }

    /// The lifetime left at `now` of the credentials held (zero once expired), or `None` when
    /// none were ever received. The consumer-facing `Expiration` is the wall clock's now plus
    /// this (SPEC §3). Check [`servable`](Self::servable) before serving.
    pub fn remaining(&self, now: Instant) -> Option<Duration> {
        let now = self.now.max(now);
        self.held.map(|held| held.expires_at - now)
    }

    /// When the credentials held expire, on the monotonic clock.
    pub fn expires_at(&self) -> Option<Instant> {
        self.held.map(|held| held.expires_at)
    }

    /// When the credentials held were received (the last successful refresh).
    pub fn issued_at(&self) -> Option<Instant> {
        self.held.map(|held| held.issued_at)
    }

    /// The refresh point of the credentials held: the start of their refresh window.
    pub fn refresh_at(&self) -> Option<Instant> {
        self.held.map(|held| held.refresh_at)
    }

    /// Whether a fetch was started and its outcome has not been reported yet.
    pub fn in_flight(&self) -> bool {
        self.in_flight
    }

    /// The number of consecutive failed fetches since the last success (saturating).
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// While backing off after a failure: the earliest time the next fetch may start.
    /// `None` when the last fetch succeeded, none failed yet, or a fetch has started since.
    pub fn next_retry(&self) -> Option<Instant> {
        self.next_retry
    }

    /// Whether a client ever asked ([`handle_demand`](Self::handle_demand)).
    pub fn demanded(&self) -> bool {
        self.demanded
    }

    /// The state of the credentials at `now`.
    pub fn health(&self, now: Instant) -> Health {
        let now = self.now.max(now);
        match self.held {
            None => Health::Empty,
            Some(_) if !self.servable(now) => Health::Expired,
            Some(held) if now >= held.refresh_at => Health::Refreshing,
            Some(_) => Health::Fresh,
        }
    }

    /// The `/v1/health` verdict for this role (SPEC §4.1): credentials outside their refresh
    /// window ([`Health::Fresh`]), or an on-demand role that no client has asked for yet.
    pub fn healthy(&self, now: Instant) -> bool {
        match self.health(now) {
            Health::Fresh => true,
            Health::Empty => self.config.mode == Mode::OnDemand && !self.demanded,
            Health::Refreshing | Health::Expired => false,
        }
    }

    /// Moves the clock forward (never back) and returns the time to use.
    fn advance(&mut self, now: Instant) -> Instant {
        self.now = self.now.max(now);
        self.now
    }

    fn fail(
        &mut self,
        now: Instant,
        class: ErrorClass,
        retry_after: Option<Duration>,
        random: u32,
    ) {
        self.failures = self.failures.saturating_add(1);
        let wait = backoff_delay(&self.config, self.failures, class, retry_after, random);
        self.next_retry = Some(now + wait);
    }

    /// A demand at `now` should lead to a fetch (on-demand mode).
    fn wants_refresh(&self, now: Instant) -> bool {
        match self.held {
            None => true,
            Some(held) => now >= held.refresh_at || !self.servable(now),
        }
    }

    /// When the next fetch is due, if one is wanted at all.
    fn due_at(&self) -> Option<Instant> {
        if self.in_flight {
            return None;
        }
        let wanted_from = match self.config.mode {
            Mode::Proactive => match self.held {
                None => self.now,
                Some(held) => held.refresh_at,
            },
            Mode::OnDemand if self.pending => self.now,
            Mode::OnDemand => return None,
        };
        Some(match self.next_retry {
            Some(retry) => wanted_from.max(retry),
            None => wanted_from,
        })
    }
}

/// How long after issue credentials of `lifetime` enter their refresh window (SPEC §3):
/// `max(L/4, L − max(L/2, refresh_before)) − j`, where the jitter `j` is a uniform draw (from
/// `random`) in `[0, min(jitter, L/10)]`, and the result is never below [`MIN_BACKOFF`].
///
/// Computed in whole milliseconds, saturating; any input is fine.
///
/// With the defaults: `L = 3600 s` → 1680–1800 s; `L = 900 s` → 135–225 s; `L = 43200 s` →
/// 21480–21600 s. For lifetimes under about 80 s the window may open only after the credentials
/// stopped being servable; the provider never issues such short ones (900 s at least).
pub fn refresh_delay(config: &ScheduleConfig, lifetime: Duration, random: u32) -> Duration {
    let lifetime = millis(lifetime);
    let window = (lifetime / 2).max(millis(config.refresh_before));
    let offset = (lifetime / 4).max(lifetime.saturating_sub(window));
    let jitter = draw(0, millis(config.jitter).min(lifetime / 10), random);
    Duration::from_millis(offset.saturating_sub(jitter).max(millis(MIN_BACKOFF)))
}

/// How long to wait after the `attempt`-th consecutive failure (1-based) of `class`, with the
/// provider's `retry_after`; `random` is a uniform draw.
///
/// - [`ErrorClass::Transient`]: exponential backoff with full jitter, a uniform draw in
///   `[1 s, max(1 s, min(max_backoff, 1 s · 2^(attempt − 1)))]`.
/// - [`ErrorClass::Permanent`]: a uniform draw in
///   `[max(max_backoff / 2, 60 s), max(max_backoff, 60 s)]` (see [`PERMANENT_MIN_BACKOFF`]).
/// - `retry_after` raises the wait to at least `min(retry_after, 1 h)` ([`RETRY_AFTER_CAP`]).
///
/// So the wait is always at least [`MIN_BACKOFF`] and at most
/// `max(max_backoff, 60 s (permanent only), min(retry_after, 1 h))`.
pub fn backoff_delay(
    config: &ScheduleConfig,
    attempt: u32,
    class: ErrorClass,
    retry_after: Option<Duration>,
    random: u32,
) -> Duration {
    let floor = millis(MIN_BACKOFF);
    let max_backoff = millis(config.max_backoff);
    let drawn = match class {
        ErrorClass::Transient => {
            let doublings = attempt.saturating_sub(1).min(62);
            let ceiling = floor.saturating_mul(1_u64 << doublings);
            draw(floor, ceiling.min(max_backoff).max(floor), random)
        }
        ErrorClass::Permanent => {
            let slow = millis(PERMANENT_MIN_BACKOFF);
            draw((max_backoff / 2).max(slow), max_backoff.max(slow), random)
        }
    };
    let told = retry_after.map_or(0, |d| millis(d).min(millis(RETRY_AFTER_CAP)));
    Duration::from_millis(drawn.max(told))
}

/// A duration in whole milliseconds, saturating.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A uniform draw in `[low, high]` (inclusive) from a uniform `random`; `low` when `high < low`.
/// Exact (every value reachable, `high` at `random = u32::MAX`) for spans below 2^32 ms.
pub(crate) fn draw(low: u64, high: u64, random: u32) -> u64 {
    let span = u128::from(high.saturating_sub(low)) + 1;
    // < span ≤ 2^64, so it fits.
    let offset = (u128::from(random) * span) >> 32;
    low.saturating_add(u64::try_from(offset).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn secs(s: u64) -> Instant {
        Instant::from_secs(s)
    }

    fn d(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn proactive_with(now: Instant, lifetime: Duration, random: u32) -> Schedule {
        let mut s = Schedule::new(ScheduleConfig::default(), now);
        assert_eq!(s.poll_action(now), Some(Action::Fetch));
        s.handle_issued(now, lifetime, random).unwrap();
        s
    }

    fn on_demand() -> ScheduleConfig {
        ScheduleConfig {
            mode: Mode::OnDemand,
            ..ScheduleConfig::default()
        }
    }

    #[test]
    fn defaults_match_the_spec() {
        let c = ScheduleConfig::default();
        assert_eq!(c.mode, Mode::Proactive);
        assert_eq!(c.refresh_before, d(900));
        assert_eq!(c.jitter, d(120));
        assert_eq!(c.max_backoff, d(300));
        assert_eq!(c.min_remaining, crate::MIN_REMAINING);
        assert_eq!(Mode::OnDemand.as_str(), "on-demand");
        assert_eq!(Health::Refreshing.as_str(), "refreshing");
    }

    #[test]
    fn draw_covers_its_bounds() {
        assert_eq!(draw(0, 0, u32::MAX), 0);
        assert_eq!(draw(5, 5, 12345), 5);
        assert_eq!(draw(0, 120_000, 0), 0);
        assert_eq!(draw(0, 120_000, u32::MAX), 120_000);
        assert_eq!(draw(0, 120_000, 1 << 31), 60_000);
        // Spans beyond 2^32 ms do not reach their top exactly, but never leave the range.
        assert!(draw(1000, u64::MAX, u32::MAX) > u64::MAX - (1 << 32));
        assert_eq!(draw(u64::MAX, u64::MAX, u32::MAX), u64::MAX);
        assert_eq!(draw(10, 3, u32::MAX), 10);
    }

    #[test]
    fn refresh_points_for_one_hour() {
        // max(900, 3600 − max(1800, 900)) = 1800 s; jitter cap min(120, 360) = 120 s.
        let s = proactive_with(secs(1000), HOUR, 0);
        assert_eq!(s.refresh_at(), Some(secs(1000 + 1800)));
        assert_eq!(s.expires_at(), Some(secs(1000 + 3600)));
        assert_eq!(s.issued_at(), Some(secs(1000)));
        let s = proactive_with(secs(1000), HOUR, u32::MAX);
        assert_eq!(s.refresh_at(), Some(secs(1000 + 1680)));
        let s = proactive_with(secs(1000), HOUR, 1 << 31);
        assert_eq!(s.refresh_at(), Some(secs(1000 + 1740)));
    }

    #[test]
    fn refresh_points_for_fifteen_minutes() {
        // max(225, 900 − max(450, 900)) = 225 s; jitter cap min(120, 90) = 90 s.
        let c = ScheduleConfig::default();
        assert_eq!(refresh_delay(&c, d(900), 0), d(225));
        assert_eq!(refresh_delay(&c, d(900), u32::MAX), d(135));
        assert_eq!(refresh_delay(&c, d(900), 1 << 31), d(180));
        let s = proactive_with(secs(0), d(900), u32::MAX);
        assert_eq!(s.refresh_at(), Some(secs(135)));
    }

    #[test]
    fn refresh_points_for_twelve_hours() {
        // max(10800, 43200 − max(21600, 900)) = 21600 s; jitter cap min(120, 4320) = 120 s.
        let c = ScheduleConfig::default();
        assert_eq!(refresh_delay(&c, d(43200), 0), d(21600));
        assert_eq!(refresh_delay(&c, d(43200), u32::MAX), d(21480));
        let s = proactive_with(secs(7), d(43200), 1 << 30);
        assert_eq!(s.refresh_at(), Some(secs(7 + 21600 - 30)));
    }

    #[test]
    fn refresh_before_larger_than_half_the_lifetime() {
        let c = ScheduleConfig {
            refresh_before: d(3000),
            jitter: Duration::ZERO,
            ..ScheduleConfig::default()
        };
        // 3600 − 3000 = 600 s, but never sooner than a quarter: 900 s.
        assert_eq!(refresh_delay(&c, HOUR, 0), d(900));
        let c = ScheduleConfig {
            refresh_before: d(2000),
            ..c
        };
        assert_eq!(refresh_delay(&c, HOUR, 0), d(1600));
        // Absurd values saturate instead of overflowing.
        let c = ScheduleConfig {
            refresh_before: Duration::MAX,
            jitter: Duration::MAX,
            ..c
        };
        assert_eq!(refresh_delay(&c, HOUR, u32::MAX), d(900 - 360));
        assert_eq!(
            refresh_delay(&c, Duration::MAX, 0),
            Duration::from_millis(u64::MAX / 4)
        );
        assert_eq!(refresh_delay(&c, Duration::ZERO, 7), MIN_BACKOFF);
    }

    #[test]
    fn proactive_fetches_at_start_and_at_the_refresh_point() {
        let mut s = Schedule::new(ScheduleConfig::default(), secs(0));
        assert_eq!(s.health(secs(0)), Health::Empty);
        assert!(!s.healthy(secs(0)));
        assert_eq!(s.poll_timeout(), Some(secs(0)));
        assert_eq!(s.poll_action(secs(0)), Some(Action::Fetch));
        s.handle_issued(secs(2), HOUR, 0).unwrap();
        assert_eq!(s.poll_action(secs(2)), None);
        assert_eq!(s.poll_timeout(), Some(secs(1802)));
        assert_eq!(s.poll_action(secs(1801)), None);
        assert_eq!(s.poll_action(secs(1802)), Some(Action::Fetch));
    }

    #[test]
    fn single_flight() {
        let mut s = Schedule::new(ScheduleConfig::default(), secs(0));
        assert_eq!(s.poll_action(secs(0)), Some(Action::Fetch));
        assert!(s.in_flight());
        assert_eq!(s.poll_timeout(), None);
        for t in [0, 1, 100, 100_000] {
            s.handle_demand(secs(t));
            assert_eq!(s.poll_action(secs(t)), None);
        }
        s.handle_issued(secs(100_000), HOUR, 0).unwrap();
        assert!(!s.in_flight());
        assert_eq!(s.poll_action(secs(100_000 + 1800)), Some(Action::Fetch));
        assert_eq!(s.poll_action(secs(100_000 + 1800)), None);

        let mut s = Schedule::new(on_demand(), secs(0));
        s.handle_demand(secs(0));
        assert_eq!(s.poll_action(secs(0)), Some(Action::Fetch));
        s.handle_demand(secs(0));
        assert_eq!(s.poll_action(secs(0)), None);
        assert_eq!(s.poll_timeout(), None);
    }

    #[test]
    fn transient_backoff_sequence_is_bounded() {
        let c = ScheduleConfig::default();
        let caps = [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300];
        for (i, cap) in caps.iter().enumerate() {
            let attempt = u32::try_from(i + 1).unwrap();
            let low = backoff_delay(&c, attempt, ErrorClass::Transient, None, 0);
            let high = backoff_delay(&c, attempt, ErrorClass::Transient, None, u32::MAX);
            assert_eq!(low, d(1), "attempt {attempt}");
            assert_eq!(high, d(*cap), "attempt {attempt}");
        }
        assert_eq!(
            backoff_delay(&c, u32::MAX, ErrorClass::Transient, None, u32::MAX),
            d(300)
        );
        assert_eq!(
            backoff_delay(&c, 0, ErrorClass::Transient, None, u32::MAX),
            d(1)
        );
        // A zero max_backoff still waits a second: no busy loop.
        let c = ScheduleConfig {
            max_backoff: Duration::ZERO,
            ..c
        };
        assert_eq!(
            backoff_delay(&c, 9, ErrorClass::Transient, None, u32::MAX),
            d(1)
        );
    }

    #[test]
    fn schedule_backs_off_and_keeps_serving() {
        let mut s = proactive_with(secs(0), HOUR, 0);
        let mut now = secs(1800);
        for attempt in 1..=12_u32 {
            assert_eq!(s.poll_action(now), Some(Action::Fetch), "attempt {attempt}");
            s.handle_failure(now, ErrorClass::Transient, None, u32::MAX);
            assert_eq!(s.failures(), attempt);
            let cap = 300.min(1_u64 << (attempt - 1));
            assert_eq!(s.next_retry(), Some(now + d(cap)));
            assert_eq!(s.poll_action(now), None);
            assert_eq!(s.poll_timeout(), Some(now + d(cap)));
            // The last good credentials are still served while they have a minute left.
            assert_eq!(s.servable(now), now <= secs(3540));
            now += d(cap);
        }
        assert_eq!(s.health(secs(1800)), Health::Refreshing);
        assert_eq!(s.health(secs(3540)), Health::Refreshing);
        assert_eq!(s.health(secs(3541)), Health::Expired);
        assert_eq!(s.poll_action(now), Some(Action::Fetch));
        s.handle_issued(now, HOUR, 0).unwrap();
        assert_eq!(s.failures(), 0);
        assert_eq!(s.next_retry(), None);
        assert_eq!(s.health(now), Health::Fresh);
    }

    #[test]
    fn permanent_errors_retry_slowly() {
        let c = ScheduleConfig::default();
        for attempt in [1, 2, 10] {
            assert_eq!(
                backoff_delay(&c, attempt, ErrorClass::Permanent, None, 0),
                d(150)
            );
            assert_eq!(
                backoff_delay(&c, attempt, ErrorClass::Permanent, None, u32::MAX),
                d(300)
            );
        }
        let small = ScheduleConfig {
            max_backoff: d(10),
            ..c
        };
        assert_eq!(
            backoff_delay(&small, 1, ErrorClass::Permanent, None, 0),
            d(60)
        );
        assert_eq!(
            backoff_delay(&small, 1, ErrorClass::Permanent, None, u32::MAX),
            d(60)
        );

        let mut s = Schedule::new(c, secs(0));
        assert_eq!(s.poll_action(secs(0)), Some(Action::Fetch));
        s.handle_failure(secs(1), ErrorClass::Permanent, None, 0);
        assert_eq!(s.poll_timeout(), Some(secs(151)));
        assert_eq!(s.poll_action(secs(150)), None);
        assert_eq!(s.poll_action(secs(151)), Some(Action::Fetch));
        assert_eq!(s.health(secs(151)), Health::Empty);
    }

    #[test]
    fn retry_after_is_honoured_and_capped() {
        let c = ScheduleConfig::default();
        let t = ErrorClass::Transient;
        assert_eq!(backoff_delay(&c, 1, t, Some(d(30)), u32::MAX), d(30));
        assert_eq!(backoff_delay(&c, 9, t, Some(d(30)), u32::MAX), d(256));
        assert_eq!(backoff_delay(&c, 1, t, Some(d(1800)), 0), d(1800));
        assert_eq!(backoff_delay(&c, 1, t, Some(d(86_400)), 0), RETRY_AFTER_CAP);
        assert_eq!(
            backoff_delay(&c, 1, t, Some(Duration::MAX), 0),
            RETRY_AFTER_CAP
        );
        assert_eq!(backoff_delay(&c, 1, t, Some(Duration::ZERO), 0), d(1));
        let p = ErrorClass::Permanent;
        assert_eq!(backoff_delay(&c, 1, p, Some(d(400)), 0), d(400));

        let mut s = proactive_with(secs(0), HOUR, 0);
        assert_eq!(s.poll_action(secs(1800)), Some(Action::Fetch));
        s.handle_failure(secs(1800), t, Some(d(120)), 0);
        assert_eq!(s.poll_timeout(), Some(secs(1920)));
        assert_eq!(s.poll_action(secs(1919)), None);
        assert_eq!(s.poll_action(secs(1920)), Some(Action::Fetch));
    }

    #[test]
    fn on_demand_is_quiet_until_asked() {
        let mut s = Schedule::new(on_demand(), secs(0));
        assert_eq!(s.poll_action(secs(0)), None);
        assert_eq!(s.poll_timeout(), None);
        assert_eq!(s.poll_action(secs(1_000_000)), None);
        assert_eq!(s.poll_timeout(), None);
        assert_eq!(s.health(secs(1_000_000)), Health::Empty);
        assert!(s.healthy(secs(1_000_000)), "never asked counts as healthy");

        s.handle_demand(secs(1_000_000));
        assert!(!s.healthy(secs(1_000_000)));
        assert_eq!(s.poll_timeout(), Some(secs(1_000_000)));
        assert_eq!(s.poll_action(secs(1_000_000)), Some(Action::Fetch));
        s.handle_issued(secs(1_000_001), HOUR, 0).unwrap();
        // A demand outside the refresh window changes nothing.
        let mut s2 = s.clone();
        s2.handle_demand(secs(1_000_001 + 1799));
        assert_eq!(s2.poll_action(secs(1_000_001 + 1799)), None);
        assert_eq!(s2.poll_timeout(), None);
        // Credentials held, nobody asking: still no timeout, even past the refresh point.
        assert_eq!(s.poll_timeout(), None);
        assert_eq!(s.poll_action(secs(1_000_001 + 3000)), None);
        // A demand inside the window triggers the refresh.
        s.handle_demand(secs(1_000_001 + 3000));
        assert_eq!(s.health(secs(1_000_001 + 3000)), Health::Refreshing);
        assert_eq!(s.poll_action(secs(1_000_001 + 3000)), Some(Action::Fetch));
    }

    #[test]
    fn on_demand_failure_waits_for_the_next_demand_and_the_backoff() {
        let mut s = Schedule::new(on_demand(), secs(0));
        s.handle_demand(secs(0));
        assert_eq!(s.poll_action(secs(0)), Some(Action::Fetch));
        s.handle_failure(secs(1), ErrorClass::Transient, Some(d(10)), 0);
        assert_eq!(s.poll_timeout(), None);
        // A demand during the backoff waits for it.
        let mut early = s.clone();
        early.handle_demand(secs(5));
        assert_eq!(early.poll_action(secs(5)), None);
        assert_eq!(early.poll_timeout(), Some(secs(11)));
        assert_eq!(early.poll_action(secs(11)), Some(Action::Fetch));
        // Nobody asks again: quiet.
        assert_eq!(s.poll_action(secs(100)), None);
        assert_eq!(s.poll_timeout(), None);
        // A demand after it fetches at once.
        s.handle_demand(secs(100));
        assert_eq!(s.poll_action(secs(100)), Some(Action::Fetch));
    }

    #[test]
    fn health_transitions() {
        let mut s = Schedule::new(ScheduleConfig::default(), secs(0));
        assert_eq!(s.health(secs(0)), Health::Empty);
        assert_eq!(s.remaining(secs(0)), None);
        assert!(!s.servable(secs(0)));
        assert_eq!(s.poll_action(secs(0)), Some(Action::Fetch));
        s.handle_issued(secs(0), HOUR, 0).unwrap();
        assert_eq!(s.health(secs(0)), Health::Fresh);
        assert!(s.healthy(secs(0)));
        assert_eq!(s.health(secs(1799)), Health::Fresh);
        assert_eq!(s.health(secs(1800)), Health::Refreshing);
        assert!(!s.healthy(secs(1800)));
        assert_eq!(s.health(secs(3540)), Health::Refreshing);
        assert_eq!(s.remaining(secs(3540)), Some(d(60)));
        assert!(s.servable(secs(3540)));
        assert!(!s.servable(Instant::from_millis(3_540_001)));
        assert_eq!(s.health(Instant::from_millis(3_540_001)), Health::Expired);
        assert_eq!(s.remaining(secs(5000)), Some(Duration::ZERO));
        assert_eq!(s.health(secs(5000)), Health::Expired);
        assert_eq!(s.poll_action(secs(5000)), Some(Action::Fetch));
        s.handle_issued(secs(5000), HOUR, 0).unwrap();
        assert_eq!(s.health(secs(5000)), Health::Fresh);
    }

    #[test]
    fn useless_credentials_count_as_a_failure() {
        let mut s = proactive_with(secs(0), HOUR, 0);
        assert_eq!(s.poll_action(secs(1800)), Some(Action::Fetch));
        assert_eq!(
            s.handle_issued(secs(1800), d(59), u32::MAX),
            Err(Unservable {
                lifetime: d(59),
                min_remaining: crate::MIN_REMAINING
            })
        );
        assert_eq!(s.failures(), 1);
        assert_eq!(
            s.expires_at(),
            Some(secs(3600)),
            "the last good ones are kept"
        );
        assert_eq!(s.poll_timeout(), Some(secs(1801)));
        assert_eq!(s.poll_action(secs(1801)), Some(Action::Fetch));
        assert!(
            s.handle_issued(secs(1801), Duration::ZERO, u32::MAX)
                .is_err()
        );
        assert_eq!(s.failures(), 2);
        assert_eq!(s.poll_timeout(), Some(secs(1803)));
    }

    #[test]
    fn time_never_goes_backwards() {
        let mut s = Schedule::new(ScheduleConfig::default(), secs(100));
        assert_eq!(s.poll_action(secs(50)), Some(Action::Fetch));
        s.handle_issued(secs(10), HOUR, 0).unwrap();
        assert_eq!(s.issued_at(), Some(secs(100)));
        assert_eq!(s.remaining(secs(0)), Some(HOUR));
    }

    #[test]
    fn extreme_inputs_do_not_overflow() {
        let end = Instant::from_millis(u64::MAX);
        let mut s = Schedule::new(ScheduleConfig::default(), end);
        assert_eq!(s.poll_action(end), Some(Action::Fetch));
        s.handle_issued(end, Duration::MAX, u32::MAX).unwrap();
        assert_eq!(s.expires_at(), Some(end));
        assert!(!s.servable(end));
        let mut s = Schedule::new(ScheduleConfig::default(), secs(0));
        assert_eq!(s.poll_action(secs(0)), Some(Action::Fetch));
        s.handle_issued(secs(0), Duration::MAX, u32::MAX).unwrap();
        assert!(s.servable(secs(0)));
        assert!(s.refresh_at().is_some_and(|t| t > secs(0)));
        let mut s = Schedule::new(ScheduleConfig::default(), end);
        assert_eq!(s.poll_action(end), Some(Action::Fetch));
        s.handle_failure(end, ErrorClass::Transient, Some(Duration::MAX), u32::MAX);
        assert_eq!(s.poll_timeout(), Some(end));
    }

    #[test]
    fn carry_over_keeps_the_plan() {
        // One-hour credentials issued at 1000 with a jitter draw; reloaded 20 minutes in.
        let s = proactive_with(secs(1000), HOUR, 0x8000_0000);
        let plan = (s.issued_at(), s.expires_at(), s.refresh_at());
        let reloaded_at = secs(1000 + 1200);
        let health = s.health(reloaded_at);
        let config = ScheduleConfig {
            max_backoff: d(60),
            ..ScheduleConfig::default()
        };
        let mut c = s.carry_over(config);
        assert_eq!((c.issued_at(), c.expires_at(), c.refresh_at()), plan);
        assert_eq!(c.health(reloaded_at), health);
        assert_eq!(c.config().max_backoff, d(60));
        assert_eq!(
            c.poll_action(reloaded_at),
            None,
            "nothing due: same refresh point"
        );
        assert_eq!(c.poll_timeout(), plan.2);
    }

    #[test]
    fn carry_over_of_a_fetch_in_flight_makes_it_due_again() {
        let mut s = proactive_with(secs(0), HOUR, 0);
        assert_eq!(s.poll_action(secs(1800)), Some(Action::Fetch));
        assert!(s.in_flight());
        let mut c = s.carry_over(ScheduleConfig::default());
        assert!(!c.in_flight());
        assert_eq!(c.poll_timeout(), Some(secs(1800)));
        assert_eq!(c.poll_action(secs(1800)), Some(Action::Fetch));
    }

    #[test]
    fn stale_credentials_are_refreshed_now_and_served_meanwhile() {
        let mut s = proactive_with(secs(0), HOUR, 0);
        assert_eq!(s.health(secs(100)), Health::Fresh);
        s.handle_stale(secs(100));
        assert_eq!(s.health(secs(100)), Health::Refreshing);
        assert!(s.servable(secs(100)));
        assert_eq!(s.poll_action(secs(100)), Some(Action::Fetch));

        let mut o = Schedule::new(on_demand(), secs(0));
        o.handle_demand(secs(0));
        assert_eq!(o.poll_action(secs(0)), Some(Action::Fetch));
        o.handle_issued(secs(0), HOUR, 0).unwrap();
        assert_eq!(o.poll_action(secs(100)), None);
        o.handle_stale(secs(100));
        assert_eq!(o.poll_action(secs(100)), Some(Action::Fetch));
    }

    #[test]
    fn needs_demand_only_when_a_demand_changes_something() {
        let mut s = proactive_with(secs(0), HOUR, 0);
        assert!(s.needs_demand(secs(1)), "the first demand is recorded");
        s.handle_demand(secs(1));
        assert!(!s.needs_demand(secs(2000)), "proactive: recorded once");

        let mut o = Schedule::new(on_demand(), secs(0));
        assert!(o.needs_demand(secs(0)));
        o.handle_demand(secs(0));
        assert!(!o.needs_demand(secs(0)), "pending already");
        assert_eq!(o.poll_action(secs(0)), Some(Action::Fetch));
        assert!(!o.needs_demand(secs(0)), "in flight");
        o.handle_issued(secs(0), HOUR, 0).unwrap();
        assert!(!o.needs_demand(secs(10)), "fresh");
        assert!(o.needs_demand(secs(1800)), "inside the refresh window");
    }
}
