//! The refresher driven by a scripted source in tokio's paused time: every wait below is
//! simulated (the runtime jumps to the next timer when all tasks are idle), so these run in
//! milliseconds and are exact.

use std::sync::Arc;
use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use iotcred_core::schedule::{Health, Mode, ScheduleConfig, refresh_delay};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::Refresher;
use crate::metrics::Metrics;
use crate::source::fake::{FakeSource, Reply};
use crate::state::{Clock, RoleHandle, RolePublisher, role_channel};

const HOUR: Duration = Duration::from_secs(3600);
const MS: Duration = Duration::from_millis(100);

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

struct Running {
    handle: RoleHandle,
    stop: watch::Sender<bool>,
    task: JoinHandle<RolePublisher>,
    origin: Instant,
}

fn config(mode: Mode) -> ScheduleConfig {
    ScheduleConfig {
        mode,
        ..ScheduleConfig::default()
    }
}

fn spawn(config: ScheduleConfig, source: Arc<FakeSource>) -> Running {
    let origin = Instant::now();
    let (publisher, handle) = role_channel("default", config, Clock::new(), &[], &[]);
    let (stop, stop_rx) = watch::channel(false);
    let refresher = Refresher {
        index: 0,
        source,
        files: Vec::new(),
        publisher,
        metrics: Arc::new(Metrics::new(&["default"])),
    };
    let task = tokio::spawn(refresher.run(stop_rx));
    Running {
        handle,
        stop,
        task,
        origin,
    }
}

impl Running {
    /// Lets simulated time pass (timers fire in order, tasks run in between).
    async fn advance_to(&self, at: Duration) {
        tokio::time::sleep_until(self.origin + at).await;
    }

    async fn stop(self) -> RolePublisher {
        let _ = self.stop.send(true);
        self.task.await.expect("refresher task")
    }
}

/// The earliest and latest refresh point of credentials of `lifetime` (jitter is random).
fn window(config: &ScheduleConfig, lifetime: Duration) -> (u64, u64) {
    let early = refresh_delay(config, lifetime, u32::MAX).as_secs();
    let late = refresh_delay(config, lifetime, 0).as_secs();
    (early, late)
}

#[tokio::test(start_paused = true)]
async fn proactive_fetches_at_start_then_inside_each_refresh_window() {
    let source = FakeSource::new([(MS, Reply::Issue(HOUR)), (MS, Reply::Issue(HOUR))]);
    let r = spawn(config(Mode::Proactive), source.clone());
    r.advance_to(secs(1)).await;
    assert_eq!(source.call_secs(r.origin), vec![0]);
    let state = r.handle.state();
    assert_eq!(state.schedule.health(r.handle.now()), Health::Fresh);
    assert!(
        state
            .servable(r.handle.now(), iotcred_core::UnixTime::now())
            .is_some()
    );

    let (early, late) = window(&config(Mode::Proactive), HOUR);
    r.advance_to(secs(late + 1)).await;
    let calls = source.call_secs(r.origin);
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert!(
        (early..=late).contains(&calls[1]),
        "{calls:?} not in {early}..={late}"
    );
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn on_demand_stays_quiet_until_asked_and_refreshes_only_when_asked_in_the_window() {
    let source = FakeSource::new([(MS, Reply::Issue(HOUR)), (MS, Reply::Issue(HOUR))]);
    let r = spawn(config(Mode::OnDemand), source.clone());
    r.advance_to(secs(7200)).await;
    assert_eq!(source.fetches(), 0, "idle on-demand role fetched");
    assert!(
        r.handle.state().schedule.healthy(r.handle.now()),
        "idle counts as healthy"
    );

    let served = r
        .handle
        .credentials(secs(10))
        .await
        .expect("served after one fetch");
    let first = served.credentials.access_key_id.clone();
    assert!(
        first.starts_with("ASIAFAKE") && first.ends_with("0000"),
        "{first}"
    );
    assert_eq!(source.fetches(), 1);

    // Fresh credentials: asking again fetches nothing.
    r.handle.credentials(secs(10)).await.expect("served");
    r.advance_to(secs(7200 + 1000)).await;
    assert_eq!(source.fetches(), 1);

    // Inside the refresh window the old ones are served at once, and one refresh starts.
    r.advance_to(secs(7200 + 1900)).await;
    let served = r.handle.credentials(Duration::ZERO).await.expect("served");
    assert_eq!(served.credentials.access_key_id, first);
    r.advance_to(secs(7200 + 1901)).await;
    assert_eq!(source.fetches(), 2);
    let served = r.handle.credentials(Duration::ZERO).await.expect("served");
    assert_ne!(served.credentials.access_key_id, first);
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn transient_errors_back_off_exponentially_and_retry_after_is_honoured() {
    let cfg = ScheduleConfig {
        max_backoff: secs(300),
        ..config(Mode::Proactive)
    };
    let source = FakeSource::new([
        (MS, Reply::Status(500, None)),
        (MS, Reply::Status(503, None)),
        (MS, Reply::Status(503, None)),
        (MS, Reply::Status(429, Some(secs(120)))),
        (MS, Reply::Issue(HOUR)),
    ]);
    let r = spawn(cfg, source.clone());
    r.advance_to(secs(1000)).await;
    let calls: Vec<Duration> = {
        let c = source.calls.lock().unwrap();
        c.iter().map(|t| t.duration_since(r.origin)).collect()
    };
    assert_eq!(calls.len(), 5, "{calls:?}");
    // Full jitter from 1 s: the n-th wait is within [1 s, 2^(n-1) s] (after the 100 ms answer).
    for (n, pair) in calls.windows(2).take(3).enumerate() {
        let wait = pair[1] - pair[0] - MS;
        let ceiling = secs(1 << n);
        assert!(
            wait >= secs(1) && wait <= ceiling,
            "wait {n}: {wait:?} outside [1 s, {ceiling:?}]"
        );
    }
    // 429 with Retry-After: 120 s: no request before it.
    let wait = calls[4] - calls[3] - MS;
    assert!(
        wait >= secs(120),
        "retried after {wait:?} despite Retry-After: 120"
    );
    let state = r.handle.state();
    assert_eq!(state.schedule.failures(), 0);
    assert!(state.last_error.is_none());
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn permanent_errors_are_retried_slowly_and_reported_without_dropping_good_credentials() {
    let source = FakeSource::new([
        (MS, Reply::Issue(HOUR)),
        (MS, Reply::Status(403, None)),
        (MS, Reply::Status(403, None)),
    ]);
    let r = spawn(config(Mode::Proactive), source.clone());
    let (_, late) = window(&config(Mode::Proactive), HOUR);
    r.advance_to(secs(late + 1)).await;
    assert_eq!(source.fetches(), 2);
    let state = r.handle.state();
    assert_eq!(state.schedule.failures(), 1);
    assert_eq!(
        state.last_error.as_deref(),
        Some("fake provider answered 403")
    );
    // Still served (inside the refresh window, not expired), but not healthy.
    let now = r.handle.now();
    assert!(state.servable(now, iotcred_core::UnixTime::now()).is_some());
    assert_eq!(state.schedule.health(now), Health::Refreshing);
    // The next try waits at least the permanent floor (60 s), at most max_backoff (300 s).
    let next = state.schedule.poll_timeout().expect("a retry is planned");
    let wait = next.saturating_duration_since(now);
    assert!(wait >= secs(59) && wait <= secs(300), "{wait:?}");
    r.advance_to(secs(late + 1) + wait + secs(1)).await;
    assert_eq!(source.fetches(), 3);
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn concurrent_demands_share_one_fetch() {
    let source = FakeSource::new([(secs(2), Reply::Issue(HOUR))]);
    let r = spawn(config(Mode::OnDemand), source.clone());
    let requests: Vec<_> = (0..50_usize)
        .map(|_| {
            let h = r.handle.clone();
            tokio::spawn(async move { h.credentials(secs(10)).await })
        })
        .collect();
    let mut keys = std::collections::BTreeSet::new();
    for req in requests {
        let served = req.await.expect("task").expect("served");
        keys.insert(served.credentials.access_key_id.clone());
    }
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert_eq!(source.fetches(), 1);
    assert_eq!(source.most_under_way.load(SeqCst), 1);
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_request_gives_up_at_its_deadline_with_the_retry_time() {
    let source = FakeSource::new([(MS, Reply::Status(500, None))]);
    let r = spawn(config(Mode::Proactive), source.clone());
    r.advance_to(secs(1)).await;
    // Backing off: a request that cannot see the next try within its wait is refused at once.
    let started = Instant::now();
    let refused = r.handle.credentials(Duration::ZERO).await.unwrap_err();
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert!(refused.retry_after >= secs(1), "{refused:?}");
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_during_a_fetch_abandons_it_and_hands_back_the_state() {
    let source = FakeSource::new([(MS, Reply::Issue(HOUR))]);
    let r = spawn(config(Mode::Proactive), source.clone());
    let (_, late) = window(&config(Mode::Proactive), HOUR);
    // The refresh at the window hangs (the script is used up).
    r.advance_to(secs(late + 10)).await;
    assert_eq!(source.fetches(), 2);
    assert_eq!(source.under_way.load(SeqCst), 1);
    assert!(r.handle.state().schedule.in_flight());
    let publisher = r.stop().await;
    assert_eq!(
        source.under_way.load(SeqCst),
        0,
        "the fetch future was dropped"
    );
    let state = publisher.state();
    assert!(
        state.credentials.is_some() && state.schedule.servable(publisher.clock_now()),
        "the credentials held are handed back"
    );
}

#[tokio::test(start_paused = true)]
async fn credentials_too_short_to_serve_count_as_a_failure() {
    let source = FakeSource::new([(MS, Reply::Issue(secs(30))), (MS, Reply::Issue(HOUR))]);
    let r = spawn(config(Mode::Proactive), source.clone());
    r.advance_to(MS * 2).await;
    let state = r.handle.state();
    assert!(state.credentials.is_none());
    assert_eq!(state.schedule.failures(), 1);
    assert!(
        state
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("less than 60 s")),
        "{:?}",
        state.last_error
    );
    r.advance_to(secs(5)).await;
    assert_eq!(source.fetches(), 2);
    assert!(r.handle.state().credentials.is_some());
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn refresh_now_replaces_credentials_refused_upstream() {
    let source = FakeSource::new([(MS, Reply::Issue(HOUR)), (MS, Reply::Issue(HOUR))]);
    let r = spawn(config(Mode::Proactive), source.clone());
    r.advance_to(secs(100)).await;
    assert_eq!(source.fetches(), 1);
    r.handle.refresh_now();
    r.advance_to(secs(101)).await;
    assert_eq!(source.call_secs(r.origin), vec![0, 100]);
    r.stop().await;
}
