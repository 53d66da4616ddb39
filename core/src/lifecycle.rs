//! When the identity lifecycle of SPEC §8 talks to AWS IoT: the first provisioning attempt after
//! power-on, the waits between failed provisioning or rotation tries, and the moment a
//! certificate is rotated.
//!
//! Like [`schedule`](crate::schedule), these are pure functions: the caller passes the time and a
//! uniform `random: u32` (any decent source; it only spreads a fleet, it protects no secret), so
//! they are tested without a clock.
//!
//! # Why a fleet needs them
//!
//! AWS IoT throttles the fleet-provisioning API per account: the AWS IoT throttling table lists
//! `CreateCertificateFromCsr` at 15 and `RegisterThing` at 10 transactions per second, and
//! `RegisterThing` calls further control-plane APIs that count against their own limits
//! (`BENCHMARKS.md`, "Fleet provisioning and rotation: simulation", has the figures and their
//! source). A batch of devices powered on together would otherwise all publish within the same
//! second, and certificates issued together would all come due together a year later.
//!
//! - [`startup_delay`]: a uniform wait in `[0, jitter]` before the first provisioning attempt
//!   of a device that has no identity yet (default [`PROVISION_STARTUP_JITTER`], 0–300 s: a
//!   batch of 1,500 devices powered on in the same minute averages 5 `RegisterThing`/s instead
//!   of 25).
//! - [`Backoff`]: exponential backoff with full jitter between failed tries, with a slower
//!   draw for errors a retry does not cure. [`Backoff::PROVISION`] and [`Backoff::ROTATION`]
//!   are the defaults.
//! - [`rotation_due`] is SPEC §8.2's rule ("`notAfter` is within `before_days`"), and
//!   [`rotation_at`] the moment a running agent actually rotates: a per-certificate point in the
//!   first part of that window, so a fleet whose certificates share a `notAfter` rotates over
//!   days, not in one second. [`rotation_random`] derives that point's draw from the certificate
//!   itself, so it is stable across restarts and differs from device to device.

use crate::schedule::draw;
use crate::time::{Duration, UnixTime};

/// The default bound of the random wait before a device without an identity first tries to
/// provision after start-up: 300 s.
///
/// A batch of `B` devices powered on together makes about `B / 300` first tries per second: in
/// the simulation (BENCHMARKS.md), 1,500 devices powered on within a minute had 5 throttled
/// publishes instead of 6,118 and all provisioned within 6 minutes either way. For much larger
/// batches no start-up jitter of sensible length keeps under `RegisterThing`'s 10/s; the quota
/// then sets the pace (100,000 devices: about 3 hours, with or without jitter) and
/// [`Backoff::PROVISION`] keeps every device trying. It costs each device 150 s on average
/// before its first try; a station that powers devices on one by one, below the quota, may set
/// it to zero.
pub const PROVISION_STARTUP_JITTER: Duration = Duration::from_secs(300);

/// The shortest wait between two tries: never a busy loop.
pub const MIN_RETRY: Duration = Duration::from_secs(1);

/// Exponential backoff with full jitter, for failed provisioning or rotation tries.
///
/// After the `n`-th consecutive failure (`n ≥ 1`) the wait is a uniform draw in
/// `[1 s, max(1 s, min(cap, base · 2^(n−1)))]` ("full jitter": every device that failed in
/// the same second picks its own retry time over the whole interval). Errors a retry does not
/// cure (a `/rejected` reply such as `InvalidCSR`, a template that refuses the parameters, a
/// denied publish) wait [`permanent_delay`](Self::permanent_delay): a uniform draw in
/// `[cap/2, cap]`, because an operator may fix the cloud side without touching the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Backoff {
    /// The ceiling of the first wait; it doubles with each further failure.
    pub base: Duration,
    /// The ceiling of every wait.
    pub cap: Duration,
}

impl Backoff {
    /// Provisioning: 5 s doubling to 15 minutes.
    ///
    /// Under sustained throttling (a batch far above the quota), every waiting device tries
    /// about once per `cap / 2` on average: 100,000 devices waiting offer about 220 tries per
    /// second, under AWS IoT's account-wide 500 CONNECT/s and 500 subscriptions/s, which the
    /// already provisioned fleet shares. In the simulation (100,000 devices in a minute) a
    /// 300 s cap finished 8 minutes sooner (2:50 instead of 2:58) for 6.5 times the throttled
    /// subscriptions; a 3600 s cap left the quota idle and finished 37 minutes later.
    pub const PROVISION: Backoff = Backoff {
        base: Duration::from_secs(5),
        cap: Duration::from_secs(900),
    };

    /// Rotation: 30 s doubling to one hour.
    ///
    /// A rotation starts at least `before_days / 2` before expiry (see [`rotation_at`]), so
    /// there are days for retries; an hour's ceiling keeps a fleet whose rotations fail (a
    /// template error, an outage) at under one try per device per half hour on average.
    pub const ROTATION: Backoff = Backoff {
        base: Duration::from_secs(30),
        cap: Duration::from_secs(3600),
    };

    /// The wait after the `failures`-th consecutive failure (1-based; 0 is read as 1) of an
    /// error a retry may cure (throttling, a timeout, a dropped connection). `random` is a
    /// fresh uniform draw.
    pub fn delay(&self, failures: u32, random: u32) -> Duration {
        let floor = millis(MIN_RETRY);
        let doublings = failures.saturating_sub(1).min(62);
        let ceiling = millis(self.base)
            .saturating_mul(1_u64 << doublings)
            .min(millis(self.cap))
            .max(floor);
        Duration::from_millis(draw(floor, ceiling, random))
    }

    /// The wait after an error a retry does not cure: a uniform draw in
    /// `[max(cap/2, 1 s), max(cap, 1 s)]`.
    pub fn permanent_delay(&self, random: u32) -> Duration {
        let floor = millis(MIN_RETRY);
        let cap = millis(self.cap).max(floor);
        Duration::from_millis(draw((cap / 2).max(floor), cap, random))
    }
}

/// How long a device without an identity waits after start-up before its first provisioning
/// attempt: a uniform draw in `[0, jitter]` (whole milliseconds). Zero when `jitter` is zero.
///
/// Draw it once per start (not per attempt: later attempts wait [`Backoff::delay`]).
pub fn startup_delay(jitter: Duration, random: u32) -> Duration {
    Duration::from_millis(draw(0, millis(jitter), random))
}

/// SPEC §8.2: whether a certificate expiring at `not_after` is due for rotation at `now` with
/// `[rotation] before_days`: `now ≥ not_after − before_days`. What `iotcred rotate` (without
/// `--force`) checks; a running agent waits for [`rotation_at`] instead.
pub fn rotation_due(not_after: UnixTime, now: UnixTime, before_days: u32) -> bool {
    now >= not_after.saturating_sub(days(before_days))
}

/// The window in which a running agent rotates a certificate valid from `not_before` to
/// `not_after`: it starts where [`rotation_due`] becomes true, but not before `not_before`
/// (a certificate shorter-lived than `before_days` is due from its issue), and it is
/// `min(before_days / 2, lifetime / 10)` long.
///
/// Half of `before_days` keeps the second half of the window for retries before expiry; a tenth
/// of the lifetime (the same cap as the credentials jitter of SPEC §3) keeps short-lived
/// certificates, as in tests, from waiting long. Returns `(start, length)`.
pub fn rotation_window(
    not_before: UnixTime,
    not_after: UnixTime,
    before_days: u32,
) -> (UnixTime, Duration) {
    let before = days(before_days);
    let start = not_after.saturating_sub(before).max(not_before);
    let lifetime = not_after.saturating_duration_since(not_before);
    (start, (before / 2).min(lifetime / 10))
}

/// When a running agent rotates a certificate valid from `not_before` to `not_after`: the start
/// of its [`rotation_window`] plus a uniform draw over the window's length (whole seconds).
///
/// Pass a `random` that stays the same for the same certificate, such as
/// [`rotation_random`] of its DER: then a restart does not move the point (a new draw at every
/// start would drift a often-restarted device towards the start of the window), and two devices
/// get different points.
///
/// With `before_days = 30` and a one-year certificate, rotation happens 15 to 30 days before
/// expiry; 100,000 certificates sharing one `notAfter` then rotate at about 0.08 per second.
pub fn rotation_at(
    not_before: UnixTime,
    not_after: UnixTime,
    before_days: u32,
    random: u32,
) -> UnixTime {
    let (start, length) = rotation_window(not_before, not_after, before_days);
    start.saturating_add(Duration::from_secs(draw(0, length.as_secs(), random)))
}

/// A draw for [`rotation_at`] that is stable for one certificate and differs between
/// certificates: the first four bytes of the SHA-256 of `certificate_der` (AWS IoT's
/// certificate id is the same digest, so this is `u32::from_str_radix(&id[..8], 16)`).
pub fn rotation_random(certificate_der: &[u8]) -> u32 {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(certificate_der);
    u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]])
}

const fn days(n: u32) -> Duration {
    Duration::from_secs(n as u64 * 86_400)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400;

    fn d(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn t(s: i64) -> UnixTime {
        UnixTime::from_secs(s)
    }

    #[test]
    fn startup_delay_spans_zero_to_the_bound() {
        assert_eq!(startup_delay(PROVISION_STARTUP_JITTER, 0), Duration::ZERO);
        assert_eq!(startup_delay(PROVISION_STARTUP_JITTER, u32::MAX), d(300));
        assert_eq!(startup_delay(PROVISION_STARTUP_JITTER, 1 << 31), d(150));
        assert_eq!(startup_delay(Duration::ZERO, u32::MAX), Duration::ZERO);
        // Millisecond resolution: a batch is not bunched onto whole seconds.
        assert_eq!(
            startup_delay(d(300), 1 << 20),
            Duration::from_millis(73) // 300_000 * 2^20 / 2^32 = 73.2
        );
    }

    #[test]
    fn backoff_doubles_to_its_cap_with_full_jitter() {
        let b = Backoff::PROVISION;
        // Top of each interval (random = MAX): 5, 10, 20, … s, capped at 900 s.
        let tops: [u64; 10] = [5, 10, 20, 40, 80, 160, 320, 640, 900, 900];
        for (n, top) in (1..).zip(tops) {
            assert_eq!(b.delay(n, u32::MAX), d(top), "failure {n}");
            assert_eq!(b.delay(n, 0), MIN_RETRY, "failure {n}");
        }
        assert_eq!(b.delay(0, u32::MAX), d(5));
        assert_eq!(b.delay(u32::MAX, u32::MAX), d(900));
        assert_eq!(b.delay(8, 1 << 31), Duration::from_millis(320_500));
        let r = Backoff::ROTATION;
        assert_eq!(r.delay(1, u32::MAX), d(30));
        assert_eq!(r.delay(7, u32::MAX), d(1920));
        assert_eq!(r.delay(8, u32::MAX), d(3600));
    }

    #[test]
    fn backoff_never_busy_loops() {
        let zero = Backoff {
            base: Duration::ZERO,
            cap: Duration::ZERO,
        };
        assert_eq!(zero.delay(1, u32::MAX), MIN_RETRY);
        assert_eq!(zero.permanent_delay(0), MIN_RETRY);
        let huge = Backoff {
            base: Duration::MAX,
            cap: Duration::MAX,
        };
        assert!(huge.delay(40, u32::MAX) >= MIN_RETRY);
    }

    #[test]
    fn permanent_errors_wait_half_the_cap_to_the_cap() {
        let b = Backoff::PROVISION;
        assert_eq!(b.permanent_delay(0), d(450));
        assert_eq!(b.permanent_delay(u32::MAX), d(900));
        assert_eq!(Backoff::ROTATION.permanent_delay(0), d(1800));
    }

    #[test]
    fn rotation_is_due_within_before_days() {
        let not_after = t(400 * DAY);
        assert!(!rotation_due(not_after, t(370 * DAY - 1), 30));
        assert!(rotation_due(not_after, t(370 * DAY), 30));
        assert!(rotation_due(not_after, t(401 * DAY), 30));
        assert!(!rotation_due(not_after, t(400 * DAY - 1), 0));
        assert!(rotation_due(not_after, t(400 * DAY), 0));
        // Saturating, whatever the inputs.
        assert!(rotation_due(UnixTime::from_secs(i64::MIN), t(0), u32::MAX));
    }

    #[test]
    fn a_one_year_certificate_rotates_15_to_30_days_before_expiry() {
        let (nb, na) = (t(1000), t(1000 + 365 * DAY));
        let (start, length) = rotation_window(nb, na, 30);
        assert_eq!(start, t(1000 + 335 * DAY));
        assert_eq!(length, d(15 * 86_400));
        assert_eq!(rotation_at(nb, na, 30, 0), start);
        assert_eq!(rotation_at(nb, na, 30, u32::MAX), t(1000 + 350 * DAY));
        assert_eq!(
            rotation_at(nb, na, 30, 1 << 31),
            t(1000 + 342 * DAY + DAY / 2)
        );
        for r in [0, 1, 12345, 1 << 31, u32::MAX] {
            let at = rotation_at(nb, na, 30, r);
            assert!(rotation_due(na, at, 30));
            assert!(!rotation_due(na, at, 14));
        }
    }

    #[test]
    fn a_short_lived_certificate_rotates_early_in_its_life() {
        // Valid for 1000 s with before_days = 30: due from issue, within its first 100 s.
        let (nb, na) = (t(5000), t(6000));
        assert_eq!(rotation_window(nb, na, 30), (nb, d(100)));
        assert_eq!(rotation_at(nb, na, 30, 0), nb);
        assert_eq!(rotation_at(nb, na, 30, u32::MAX), t(5100));
        // before_days = 0: at expiry, no spread.
        assert_eq!(rotation_window(nb, na, 0), (na, Duration::ZERO));
        // A certificate whose notAfter precedes its notBefore: now, at notBefore.
        assert_eq!(rotation_at(na, nb, 30, u32::MAX), na);
    }

    #[test]
    fn rotation_random_is_the_certificate_id_prefix() {
        // SHA-256("") = e3b0c442…
        assert_eq!(rotation_random(b""), 0xe3b0_c442);
        assert_ne!(rotation_random(b"device 1"), rotation_random(b"device 2"));
    }
}
