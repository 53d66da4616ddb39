//! Property tests of the refresh schedule (SPEC §3), driven by a simulated clock.
//!
//! A driver like the agent's: drain `poll_action`, then jump to the earliest of
//! `poll_timeout()`, the arrival of the reply to the fetch in flight, and the next client demand.
//! The provider's replies (credentials of random lifetimes, permanent or transient errors, with
//! or without `Retry-After`), their latencies, the demand times and the jitter draws are all
//! chosen by proptest. No sleeps, no wall clock.

use iotcred_core::schedule::{Action, Health, MIN_BACKOFF, Mode, RETRY_AFTER_CAP, Schedule};
use iotcred_core::{Duration, ErrorClass, Instant, MIN_REMAINING, ScheduleConfig};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Outcome {
    Issued {
        lifetime_s: u64,
    },
    Failed {
        class: ErrorClass,
        retry_after_s: Option<u64>,
    },
}

#[derive(Clone, Debug)]
struct Reply {
    outcome: Outcome,
    latency_ms: u64,
    random: u32,
}

fn outcome(failure_weight: u32) -> impl Strategy<Value = Outcome> {
    prop_oneof![
        3 => (900_u64..=43_200).prop_map(|lifetime_s| Outcome::Issued { lifetime_s }),
        failure_weight => (any::<bool>(), proptest::option::of(0_u64..=7_200)).prop_map(
            |(permanent, retry_after_s)| Outcome::Failed {
                class: if permanent { ErrorClass::Permanent } else { ErrorClass::Transient },
                retry_after_s,
            }
        ),
    ]
}

fn replies(failure_weight: u32) -> impl Strategy<Value = Vec<Reply>> {
    proptest::collection::vec(
        (outcome(failure_weight), 0_u64..=30_000, any::<u32>()).prop_map(
            |(outcome, latency_ms, random)| Reply {
                outcome,
                latency_ms,
                random,
            },
        ),
        1..40,
    )
}

fn config() -> impl Strategy<Value = ScheduleConfig> {
    (
        any::<bool>(),
        prop_oneof![Just(900_u64), 0_u64..=30_000],
        prop_oneof![Just(120_u64), 0_u64..=1_200],
        prop_oneof![Just(300_u64), 0_u64..=3_600],
    )
        .prop_map(
            |(on_demand, refresh_before, jitter, max_backoff)| ScheduleConfig {
                mode: if on_demand {
                    Mode::OnDemand
                } else {
                    Mode::Proactive
                },
                refresh_before: Duration::from_secs(refresh_before),
                jitter: Duration::from_secs(jitter),
                max_backoff: Duration::from_secs(max_backoff),
                min_remaining: MIN_REMAINING,
            },
        )
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The refresh window of SPEC §3, in ms after issue, computed independently of the crate:
/// `[max(L/4, L − max(L/2, refresh_before)) − min(jitter, L/10), max(L/4, L − max(L/2, refresh_before))]`.
fn window(config: &ScheduleConfig, lifetime_ms: u64) -> (u64, u64) {
    let late = (lifetime_ms / 4)
        .max(lifetime_ms.saturating_sub((lifetime_ms / 2).max(ms(config.refresh_before))));
    let early = late.saturating_sub(ms(config.jitter).min(lifetime_ms / 10));
    (early.max(1_000), late.max(1_000))
}

/// The largest wait allowed after the `attempt`-th consecutive failure.
fn backoff_cap(
    config: &ScheduleConfig,
    attempt: u32,
    class: ErrorClass,
    retry_after: Option<Duration>,
) -> u64 {
    let max_backoff = ms(config.max_backoff);
    let class_cap = match class {
        ErrorClass::Transient => {
            let exp = 1_000_u64.saturating_mul(1_u64 << attempt.saturating_sub(1).min(62));
            exp.min(max_backoff).max(1_000)
        }
        ErrorClass::Permanent => max_backoff.max(60_000),
    };
    let told = retry_after.map_or(0, |d| ms(d).min(ms(RETRY_AFTER_CAP)));
    class_cap.max(told)
}

/// What the simulation saw, for properties over a whole run.
#[derive(Debug, Default)]
struct Seen {
    fetches: u32,
    issues: u32,
    unservable_after_first_issue: bool,
}

/// Checks that hold at any instant.
fn check_instant(s: &Schedule, at: Instant) -> Result<(), TestCaseError> {
    if s.servable(at) {
        let left = s.remaining(at).unwrap_or(Duration::ZERO);
        prop_assert!(left >= MIN_REMAINING, "served with {left:?} left");
        prop_assert!(s.expires_at().is_some_and(|e| e >= at + MIN_REMAINING));
        prop_assert!(matches!(s.health(at), Health::Fresh | Health::Refreshing));
    } else if s.expires_at().is_some() {
        prop_assert_eq!(s.health(at), Health::Expired);
    } else {
        prop_assert_eq!(s.health(at), Health::Empty);
        prop_assert_eq!(s.remaining(at), None);
    }
    if s.health(at) == Health::Fresh {
        prop_assert!(s.refresh_at().is_some_and(|r| at < r));
    }
    Ok(())
}

/// Runs one simulated role. `demand_gaps_ms` are the gaps between client demands (cycled; none
/// when empty). Returns what was seen.
fn simulate(
    config: ScheduleConfig,
    replies: &[Reply],
    demand_gaps_ms: &[u64],
    start_ms: u64,
    steps: usize,
) -> Result<Seen, TestCaseError> {
    let mut seen = Seen::default();
    let mut now = Instant::from_millis(start_ms);
    let mut s = Schedule::new(config, now);
    let mut reply_at: Option<(Instant, Reply)> = None;
    let mut next_reply = 0_usize;
    let mut next_demand = demand_gaps_ms
        .first()
        .map(|gap| now + Duration::from_millis(*gap));
    let mut demand_index = 0_usize;
    // (issue time, lifetime) of the credentials held, and whether a fetch failed since.
    let mut issued: Option<(Instant, u64)> = None;
    let mut failed_since_issue = false;
    let mut demanded_since_fetch = false;

    for _ in 0..steps {
        while let Some(Action::Fetch) = s.poll_action(now) {
            prop_assert!(reply_at.is_none(), "a second fetch while one is in flight");
            prop_assert!(s.in_flight());
            seen.fetches += 1;
            match config.mode {
                Mode::OnDemand => {
                    prop_assert!(demanded_since_fetch, "on-demand fetch nobody asked for");
                }
                Mode::Proactive => {
                    if let (Some((at, lifetime_ms)), false) = (issued, failed_since_issue) {
                        // A proactive refresh happens exactly at the refresh point, inside the window.
                        prop_assert_eq!(Some(now), s.refresh_at());
                        let (early, late) = window(&config, lifetime_ms);
                        let after = ms(now - at);
                        prop_assert!(
                            (early..=late).contains(&after),
                            "refresh {after} ms after issue, outside [{early}, {late}] for L = {lifetime_ms}"
                        );
                    }
                }
            }
            demanded_since_fetch = false;
            let reply = replies[next_reply % replies.len()].clone();
            next_reply += 1;
            reply_at = Some((now + Duration::from_millis(reply.latency_ms), reply));
        }

        // No busy loop: after draining, the next wake-up is strictly in the future.
        let timeout = s.poll_timeout();
        if let Some(t) = timeout {
            prop_assert!(t > now, "poll_timeout {t:?} not after now {now:?}");
        }
        prop_assert_eq!(s.in_flight(), reply_at.is_some());
        if s.in_flight() {
            prop_assert_eq!(timeout, None);
        }
        if config.mode == Mode::OnDemand && !s.in_flight() && !demanded_since_fetch {
            prop_assert_eq!(timeout, None, "on-demand timeout without a demand");
        }
        check_instant(&s, now)?;

        // The next event: the reply in flight, the schedule's timeout, or a demand.
        let reply_time = reply_at.as_ref().map(|(t, _)| *t);
        let next = [reply_time, timeout, next_demand]
            .into_iter()
            .flatten()
            .min();
        let Some(next) = next else { break };
        prop_assert!(next >= now);
        // Probe the quiet stretch in between.
        for probe in [now + (next - now) / 2, next - Duration::from_millis(1)] {
            if probe >= now {
                check_instant(&s, probe)?;
                if issued.is_some() && !s.servable(probe) {
                    seen.unservable_after_first_issue = true;
                }
            }
        }
        now = next;

        if reply_time == Some(now) {
            let Some((_, reply)) = reply_at.take() else {
                unreachable!()
            };
            let before = s.expires_at();
            let attempt = s.failures().saturating_add(1);
            match reply.outcome {
                Outcome::Issued { lifetime_s } => {
                    let lifetime = Duration::from_secs(lifetime_s);
                    let accepted = s.handle_issued(now, lifetime, reply.random);
                    prop_assert!(accepted.is_ok());
                    prop_assert_eq!(s.failures(), 0);
                    prop_assert_eq!(s.next_retry(), None);
                    prop_assert_eq!(s.expires_at(), Some(now + lifetime));
                    prop_assert_eq!(s.issued_at(), Some(now));
                    let (early, late) = window(&config, ms(lifetime));
                    let refresh = s.refresh_at().map(|r| ms(r - now));
                    prop_assert!(refresh.is_some_and(|r| (early..=late).contains(&r)));
                    issued = Some((now, ms(lifetime)));
                    failed_since_issue = false;
                    seen.issues += 1;
                }
                Outcome::Failed {
                    class,
                    retry_after_s,
                } => {
                    let retry_after = retry_after_s.map(Duration::from_secs);
                    s.handle_failure(now, class, retry_after, reply.random);
                    prop_assert_eq!(s.failures(), attempt);
                    // The last good credentials are kept.
                    prop_assert_eq!(s.expires_at(), before);
                    let wait = s.next_retry().map(|r| r - now);
                    let cap = backoff_cap(&config, attempt, class, retry_after);
                    prop_assert!(
                        wait.is_some_and(|w| w >= MIN_BACKOFF && ms(w) <= cap),
                        "wait {wait:?} after failure {attempt} ({class:?}, {retry_after:?}), cap {cap} ms"
                    );
                    // Never beyond the global ceiling either.
                    let ceiling = ms(config.max_backoff).max(60_000).max(ms(RETRY_AFTER_CAP));
                    prop_assert!(wait.is_some_and(|w| ms(w) <= ceiling));
                    failed_since_issue = true;
                }
            }
            check_instant(&s, now)?;
        } else if next_demand == Some(now) {
            let wants = s.expires_at().is_none()
                || s.refresh_at().is_some_and(|r| now >= r)
                || !s.servable(now);
            let timeout_before = s.poll_timeout();
            let in_flight = s.in_flight();
            s.handle_demand(now);
            prop_assert!(s.demanded());
            demanded_since_fetch = true;
            match config.mode {
                Mode::OnDemand if wants && !in_flight => {
                    // The fetch starts now, or when the backoff ends.
                    let due = s.next_retry().map_or(now, |r| r.max(now));
                    prop_assert_eq!(s.poll_timeout(), Some(due));
                }
                _ => prop_assert_eq!(s.poll_timeout(), timeout_before),
            }
            demand_index += 1;
            next_demand = demand_gaps_ms
                .get(demand_index % demand_gaps_ms.len().max(1))
                .map(|gap| now + Duration::from_millis(*gap));
        }
    }
    Ok(seen)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any mix of replies, demands and configurations keeps every invariant.
    #[test]
    fn invariants_hold(
        config in config(),
        replies in replies(2),
        demand_gaps_ms in proptest::collection::vec(0_u64..=4_000_000, 0..20),
        start_ms in prop_oneof![Just(0_u64), any::<u32>().prop_map(u64::from)],
    ) {
        simulate(config, &replies, &demand_gaps_ms, start_ms, 300)?;
    }

    /// A proactive role whose provider always answers keeps servable credentials at every
    /// instant after the first issue (default configuration, lifetimes 900–43200 s).
    ///
    /// Demands come at least a second apart: every demand is a simulation step, so denser ones
    /// (e.g. every 16 ms against a 22 s reply latency) would use up the step budget before the
    /// first reply arrives, and a stream of zero gaps would never let the clock move.
    #[test]
    fn proactive_with_a_healthy_provider_never_runs_dry(
        replies in replies(0),
        demand_gaps_ms in proptest::collection::vec(1_000_u64..=600_000, 0..5),
    ) {
        let seen = simulate(ScheduleConfig::default(), &replies, &demand_gaps_ms, 0, 200)?;
        prop_assert!(!seen.unservable_after_first_issue);
        prop_assert!(seen.issues > 0);
    }

    /// A few transient failures (no Retry-After) at each refresh never let the default
    /// proactive schedule run dry: a refresh starts with at least L/2 ≥ 450 s left, and three
    /// failures cost at most 1 + 2 + 4 s of backoff plus their latency.
    #[test]
    fn short_outages_are_bridged(
        lifetimes in proptest::collection::vec(900_u64..=43_200, 1..10),
        failures_between in proptest::collection::vec(0_usize..=3, 1..10),
        randoms in proptest::collection::vec(any::<u32>(), 1..40),
    ) {
        let mut replies = Vec::new();
        for (i, lifetime_s) in lifetimes.iter().enumerate() {
            let random = randoms[i % randoms.len()];
            replies.push(Reply { outcome: Outcome::Issued { lifetime_s: *lifetime_s }, latency_ms: 500, random });
            for _ in 0..failures_between[i % failures_between.len()] {
                replies.push(Reply {
                    outcome: Outcome::Failed { class: ErrorClass::Transient, retry_after_s: None },
                    latency_ms: 10_000,
                    random: random.rotate_left(7),
                });
            }
        }
        let seen = simulate(ScheduleConfig::default(), &replies, &[], 0, 200)?;
        prop_assert!(!seen.unservable_after_first_issue);
    }

    /// An idle on-demand role never wakes up and never fetches.
    #[test]
    fn on_demand_without_demands_is_silent(replies in replies(2), start_ms in any::<u32>()) {
        let config = ScheduleConfig { mode: Mode::OnDemand, ..ScheduleConfig::default() };
        let seen = simulate(config, &replies, &[], u64::from(start_ms), 50)?;
        prop_assert_eq!(seen.fetches, 0);
    }

    /// Extreme inputs neither overflow nor loop.
    #[test]
    fn extreme_inputs_are_tolerated(
        start_ms in prop_oneof![Just(u64::MAX), Just(u64::MAX - 1_000), any::<u64>()],
        lifetime_ms in prop_oneof![Just(0_u64), Just(u64::MAX), any::<u64>()],
        retry_after_ms in prop_oneof![Just(u64::MAX), any::<u64>()],
        random in any::<u32>(),
        permanent in any::<bool>(),
    ) {
        let now = Instant::from_millis(start_ms);
        let mut s = Schedule::new(ScheduleConfig::default(), now);
        prop_assert_eq!(s.poll_action(now), Some(Action::Fetch));
        let _ = s.handle_issued(now, Duration::from_millis(lifetime_ms), random);
        let _ = s.poll_action(now);
        let class = if permanent { ErrorClass::Permanent } else { ErrorClass::Transient };
        s.handle_failure(now, class, Some(Duration::from_millis(retry_after_ms)), random);
        let due = s.poll_timeout().is_some_and(|t| t <= now);
        prop_assert_eq!(s.poll_action(now).is_some(), due);
        check_instant(&s, now)?;
        if let Some(t) = s.poll_timeout() {
            // Strictly later, unless the clock is at its very end.
            prop_assert!(t > now || now.as_millis() > u64::MAX - 3_600_000);
        }
    }
}
