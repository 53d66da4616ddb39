//! Prometheus metrics: lock-free counters updated on the hot path, rendered on demand in the
//! text exposition format (version 0.0.4) for `GET /v1/metrics`.
//!
//! Nothing here ever sees a secret: the only inputs are role names, outcomes, latencies, HTTP
//! routes and statuses, and the expiry times read from the roles' published schedules.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use iotcred_core::UnixTime;

use crate::state::{RoleHandle, RoleState};

/// How one upstream refresh attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefreshOutcome {
    /// New credentials were obtained.
    Success,
    /// The provider refused (400/401/403/404): configuration or identity is wrong.
    Permanent,
    /// Network, TLS, timeout, 429, 5xx or protocol error.
    Transient,
}

impl RefreshOutcome {
    const ALL: [RefreshOutcome; 3] = [Self::Success, Self::Permanent, Self::Transient];

    fn label(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Permanent => "permanent_error",
            Self::Transient => "transient_error",
        }
    }
}

/// The HTTP routes counted separately.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// `/v1/credentials` and `/v1/credentials/{role}`.
    Credentials,
    /// `/v1/health`.
    Health,
    /// `/v1/metrics`.
    Metrics,
    /// Anything else (404, or refused before routing).
    Other,
    /// Any request on the IMDS listener (SPEC §4.4).
    Imds,
}

impl Route {
    const ALL: [Route; 5] = [
        Self::Credentials,
        Self::Health,
        Self::Metrics,
        Self::Other,
        Self::Imds,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::Credentials => "credentials",
            Self::Health => "health",
            Self::Metrics => "metrics",
            Self::Other => "other",
            Self::Imds => "imds",
        }
    }
}

/// Statuses the server answers with; anything else is counted as `other`.
const STATUSES: [u16; 10] = [200, 400, 401, 403, 404, 405, 431, 500, 503, 0];

fn status_index(status: u16) -> usize {
    STATUSES
        .iter()
        .position(|&s| s == status)
        .unwrap_or(STATUSES.len() - 1)
}

/// Upper bounds (seconds) of the upstream latency histogram buckets; `+Inf` is implicit.
const LATENCY_BUCKETS: [f64; 10] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Per-role counters.
#[derive(Debug)]
struct RoleMetrics {
    name: Box<str>,
    refresh: [AtomicU64; 3],
    /// Cumulative only at render time: each observation increments its own bucket.
    latency_buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    latency_sum_micros: AtomicU64,
    latency_count: AtomicU64,
}

/// All the agent's metrics. Cheap to update from any thread (relaxed atomics).
#[derive(Debug)]
pub struct Metrics {
    roles: Box<[RoleMetrics]>,
    requests: [[AtomicU64; STATUSES.len()]; Route::ALL.len()],
    connections_open: AtomicU64,
    connections_total: AtomicU64,
    connections_rejected: AtomicU64,
}

impl Metrics {
    /// Metrics for these roles; `role` indices in the other methods follow this order.
    pub fn new<S: AsRef<str>>(role_names: &[S]) -> Self {
        Metrics {
            roles: role_names
                .iter()
                .map(|n| RoleMetrics {
                    name: n.as_ref().into(),
                    refresh: Default::default(),
                    latency_buckets: Default::default(),
                    latency_sum_micros: AtomicU64::new(0),
                    latency_count: AtomicU64::new(0),
                })
                .collect(),
            requests: Default::default(),
            connections_open: AtomicU64::new(0),
            connections_total: AtomicU64::new(0),
            connections_rejected: AtomicU64::new(0),
        }
    }

    /// The index of the role called `name`, for [`Metrics::refresh_result`]. Roles added by a
    /// reload have none: their refreshes are counted from the next start.
    pub fn role_index(&self, name: &str) -> Option<usize> {
        self.roles.iter().position(|r| &*r.name == name)
    }

    /// Records one upstream refresh attempt of role number `role` (ignored when out of range).
    pub fn refresh_result(&self, role: usize, outcome: RefreshOutcome, latency: Duration) {
        let Some(r) = self.roles.get(role) else {
            return;
        };
        let i = RefreshOutcome::ALL
            .iter()
            .position(|&o| o == outcome)
            .unwrap_or(0);
        r.refresh[i].fetch_add(1, Relaxed);
        let secs = latency.as_secs_f64();
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        r.latency_buckets[bucket].fetch_add(1, Relaxed);
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        r.latency_sum_micros.fetch_add(micros, Relaxed);
        r.latency_count.fetch_add(1, Relaxed);
    }

    /// Counts one answered HTTP request.
    pub fn request(&self, route: Route, status: u16) {
        let r = Route::ALL.iter().position(|&x| x == route).unwrap_or(3);
        self.requests[r][status_index(status)].fetch_add(1, Relaxed);
    }

    /// A connection was accepted.
    pub fn connection_opened(&self) {
        self.connections_open.fetch_add(1, Relaxed);
        self.connections_total.fetch_add(1, Relaxed);
    }

    /// An accepted connection ended.
    pub fn connection_closed(&self) {
        self.connections_open.fetch_sub(1, Relaxed);
    }

    /// A connection was closed at once because the connection limit was reached.
    pub fn connection_rejected(&self) {
        self.connections_rejected.fetch_add(1, Relaxed);
    }

    /// Connections open now.
    pub fn connections_open(&self) -> u64 {
        self.connections_open.load(Relaxed)
    }

    /// Connections refused because of the connection limit, since start.
    pub fn connections_rejected(&self) -> u64 {
        self.connections_rejected.load(Relaxed)
    }

    /// The Prometheus text exposition of every metric. `roles` supplies the live state (expiry,
    /// health); `now` and `wall` are the monotonic and wall clocks read once by the caller.
    pub fn render(&self, roles: &[RoleHandle], wall: UnixTime) -> String {
        let mut out = String::with_capacity(4096);
        // Writing to a String cannot fail.
        let states: Vec<(&RoleHandle, RoleState, iotcred_core::Instant)> =
            roles.iter().map(|r| (r, r.state(), r.now())).collect();
        let _ = self.write_to(&mut out, &states, wall);
        out
    }

    fn write_to(
        &self,
        out: &mut String,
        roles: &[(&RoleHandle, RoleState, iotcred_core::Instant)],
        wall: UnixTime,
    ) -> std::fmt::Result {
        writeln!(
            out,
            "# HELP iotcred_build_info Version of the running agent.\n\
             # TYPE iotcred_build_info gauge\n\
             iotcred_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )?;

        header(
            out,
            "iotcred_credentials_expiry_timestamp_seconds",
            "gauge",
            "Expiration of the held credentials as handed to consumers (device wall clock).",
        )?;
        for (r, state, now) in roles {
            if let Some(remaining) = state.schedule.remaining(*now) {
                let exp = wall.saturating_add(remaining).as_secs();
                writeln!(
                    out,
                    "iotcred_credentials_expiry_timestamp_seconds{{role=\"{}\"}} {exp}",
                    Label(&r.name)
                )?;
            }
        }

        header(
            out,
            "iotcred_credentials_remaining_seconds",
            "gauge",
            "Lifetime left of the held credentials (0 when none or expired).",
        )?;
        for (r, state, now) in roles {
            let rem = state
                .schedule
                .remaining(*now)
                .map_or(0.0, |d| d.as_secs_f64());
            writeln!(
                out,
                "iotcred_credentials_remaining_seconds{{role=\"{}\"}} {rem:.3}",
                Label(&r.name)
            )?;
        }

        header(
            out,
            "iotcred_role_healthy",
            "gauge",
            "1 when the role holds credentials outside its refresh window (as /v1/health).",
        )?;
        for (r, state, now) in roles {
            let v = u8::from(state.schedule.healthy(*now));
            writeln!(
                out,
                "iotcred_role_healthy{{role=\"{}\"}} {v}",
                Label(&r.name)
            )?;
        }

        header(
            out,
            "iotcred_refresh_consecutive_failures",
            "gauge",
            "Failed refresh attempts since the last success.",
        )?;
        for (r, state, _) in roles {
            writeln!(
                out,
                "iotcred_refresh_consecutive_failures{{role=\"{}\"}} {}",
                Label(&r.name),
                state.schedule.failures()
            )?;
        }

        header(
            out,
            "iotcred_refresh_total",
            "counter",
            "Upstream refresh attempts by outcome.",
        )?;
        for r in self.roles.iter() {
            for (i, o) in RefreshOutcome::ALL.iter().enumerate() {
                writeln!(
                    out,
                    "iotcred_refresh_total{{role=\"{}\",outcome=\"{}\"}} {}",
                    Label(&r.name),
                    o.label(),
                    r.refresh[i].load(Relaxed)
                )?;
            }
        }

        header(
            out,
            "iotcred_upstream_latency_seconds",
            "histogram",
            "Duration of upstream credential exchanges.",
        )?;
        for r in self.roles.iter() {
            let mut cumulative = 0u64;
            for (i, le) in LATENCY_BUCKETS.iter().enumerate() {
                cumulative += r.latency_buckets[i].load(Relaxed);
                writeln!(
                    out,
                    "iotcred_upstream_latency_seconds_bucket{{role=\"{}\",le=\"{le}\"}} {cumulative}",
                    Label(&r.name)
                )?;
            }
            cumulative += r.latency_buckets[LATENCY_BUCKETS.len()].load(Relaxed);
            let name = Label(&r.name);
            writeln!(
                out,
                "iotcred_upstream_latency_seconds_bucket{{role=\"{name}\",le=\"+Inf\"}} {cumulative}"
            )?;
            let sum = r.latency_sum_micros.load(Relaxed) as f64 / 1e6;
            writeln!(
                out,
                "iotcred_upstream_latency_seconds_sum{{role=\"{name}\"}} {sum:.6}"
            )?;
            writeln!(
                out,
                "iotcred_upstream_latency_seconds_count{{role=\"{name}\"}} {}",
                r.latency_count.load(Relaxed)
            )?;
        }

        header(
            out,
            "iotcred_http_requests_total",
            "counter",
            "Local HTTP requests answered, by route and status.",
        )?;
        for (ri, route) in Route::ALL.iter().enumerate() {
            for (si, status) in STATUSES.iter().enumerate() {
                let n = self.requests[ri][si].load(Relaxed);
                if n == 0 {
                    continue;
                }
                let route = route.label();
                if *status == 0 {
                    writeln!(
                        out,
                        "iotcred_http_requests_total{{route=\"{route}\",status=\"other\"}} {n}"
                    )?;
                } else {
                    writeln!(
                        out,
                        "iotcred_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
                    )?;
                }
            }
        }

        header(
            out,
            "iotcred_connections_open",
            "gauge",
            "Local connections open now.",
        )?;
        writeln!(
            out,
            "iotcred_connections_open {}",
            self.connections_open.load(Relaxed)
        )?;
        header(
            out,
            "iotcred_connections_total",
            "counter",
            "Local connections accepted.",
        )?;
        writeln!(
            out,
            "iotcred_connections_total {}",
            self.connections_total.load(Relaxed)
        )?;
        header(
            out,
            "iotcred_connections_rejected_total",
            "counter",
            "Local connections closed at once because the connection limit was reached.",
        )?;
        writeln!(
            out,
            "iotcred_connections_rejected_total {}",
            self.connections_rejected.load(Relaxed)
        )
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) -> std::fmt::Result {
    writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}")
}

/// A label value escaped per the exposition format (`\`, `"` and newline).
struct Label<'a>(&'a str);

impl std::fmt::Display for Label<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for c in self.0.chars() {
            match c {
                '\\' => f.write_str("\\\\")?,
                '"' => f.write_str("\\\"")?,
                '\n' => f.write_str("\\n")?,
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative_and_labels_escaped() {
        let m = Metrics::new(&["a\"b"]);
        m.refresh_result(0, RefreshOutcome::Success, Duration::from_millis(70));
        m.refresh_result(0, RefreshOutcome::Transient, Duration::from_secs(100));
        m.refresh_result(7, RefreshOutcome::Success, Duration::from_secs(1));
        let text = m.render(&[], UnixTime::from_secs(0));
        assert!(
            text.contains("iotcred_upstream_latency_seconds_bucket{role=\"a\\\"b\",le=\"0.05\"} 0")
        );
        assert!(
            text.contains("iotcred_upstream_latency_seconds_bucket{role=\"a\\\"b\",le=\"0.1\"} 1")
        );
        assert!(
            text.contains("iotcred_upstream_latency_seconds_bucket{role=\"a\\\"b\",le=\"60\"} 1")
        );
        assert!(
            text.contains("iotcred_upstream_latency_seconds_bucket{role=\"a\\\"b\",le=\"+Inf\"} 2")
        );
        assert!(text.contains("iotcred_upstream_latency_seconds_count{role=\"a\\\"b\"} 2"));
        assert!(text.contains("iotcred_refresh_total{role=\"a\\\"b\",outcome=\"success\"} 1"));
    }
}
