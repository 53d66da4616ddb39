//! Fleet simulation of the refresh schedule (SPEC §3): what a million gateways do to the AWS IoT
//! credentials provider. Not a test: a discrete-event simulation that prints figures.
//!
//! Every device is driven by its own real [`Schedule`] (proactive, default configuration,
//! one-hour credentials); a single event queue holds each device's next wake-up
//! (`poll_timeout()`) and the replies to fetches in flight (100–600 ms latency). Randomness comes
//! from a splitmix64 generator seeded on the command line, so a run is reproducible.
//!
//! Scenarios:
//! - (a) boot storm: every device boots within the same minute (uniform), 3 hours simulated;
//! - (b) outage: devices boot spread over an hour (a steady fleet after that), the provider is
//!   down from 2:00 to 2:10 (every fetch fails, transient), 4 hours simulated.
//!
//! ```text
//! cargo run -p iotcred-core --release --example fleet -- [SEED] [--devices N]
//!     [--outage-minutes M] [--capacity RPS] [--only a|b]
//! ```
//!
//! `--capacity` makes the provider answer 429 (transient, no `Retry-After`) to requests beyond
//! that many per second, like an account-level quota.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::process::ExitCode;

use iotcred_core::schedule::{Action, Schedule, ScheduleConfig};
use iotcred_core::{Duration, ErrorClass, Instant, MIN_REMAINING};

const LIFETIME: Duration = Duration::from_secs(3600);
const WAKE: u8 = 0;
const REPLY_OK: u8 = 1;
const REPLY_FAILED: u8 = 2;
const NO_WAKE: u64 = u64::MAX;

#[path = "support/splitmix.rs"]
mod splitmix;
use splitmix::SplitMix64;

struct Scenario {
    name: &'static str,
    devices: u32,
    boot_spread_s: u64,
    duration_s: u64,
    /// `[start, end)` in seconds during which every fetch fails.
    outage_s: Option<(u64, u64)>,
    capacity_rps: Option<u32>,
}

struct Device {
    schedule: Schedule,
    /// The wake-up queued for this device (`NO_WAKE` when none); older queued ones are stale.
    wake: u64,
    consecutive_failures: u32,
    ever_dry: bool,
}

#[derive(Default)]
struct Report {
    per_second: Vec<u32>,
    fetches: u64,
    issued: u64,
    failed: u64,
    /// Fetches started after a failure (retries).
    retries: u64,
    devices_with_failures: u64,
    max_consecutive_failures: u32,
    /// Devices that had credentials and later held less than 60 s of them at some point.
    devices_dry: u64,
    /// Total device-seconds spent without servable credentials after having had some.
    dry_seconds: f64,
    devices_never_served: u64,
    last_first_issue_ms: u64,
    /// The last time a device that had failed got credentials again.
    last_recovery_ms: u64,
    busy_timeouts: u64,
    events: u64,
    wall_ms: u128,
}

fn run(scenario: &Scenario, seed: u64) -> Report {
    let started = std::time::Instant::now();
    let mut rng = SplitMix64(seed);
    let config = ScheduleConfig::default();
    let end_ms = scenario.duration_s * 1000;
    let n = scenario.devices as usize;
    let mut report = Report {
        per_second: vec![0; scenario.duration_s as usize + 1],
        ..Report::default()
    };
    let mut devices = Vec::with_capacity(n);
    let mut queue: BinaryHeap<Reverse<(u64, u32, u8)>> = BinaryHeap::with_capacity(n + n / 4);
    for index in 0..scenario.devices {
        let boot = rng.below(scenario.boot_spread_s * 1000);
        devices.push(Device {
            schedule: Schedule::new(config, Instant::from_millis(boot)),
            wake: boot,
            consecutive_failures: 0,
            ever_dry: false,
        });
        queue.push(Reverse((boot, index, WAKE)));
    }
    let mut failed_devices = vec![false; n];

    while let Some(Reverse((t, index, kind))) = queue.pop() {
        if t > end_ms {
            break;
        }
        report.events += 1;
        let now = Instant::from_millis(t);
        let device = &mut devices[index as usize];
        match kind {
            WAKE => {
                if device.wake != t {
                    continue; // superseded
                }
                device.wake = NO_WAKE;
            }
            REPLY_OK => {
                let schedule = &device.schedule;
                if let Some(expires) = schedule.expires_at() {
                    if !schedule.servable(now) {
                        device.ever_dry = true;
                        let dry_from = expires - MIN_REMAINING;
                        report.dry_seconds += (now - dry_from).as_secs_f64();
                    }
                } else {
                    report.last_first_issue_ms = report.last_first_issue_ms.max(t);
                }
                if device.consecutive_failures > 0 {
                    report.last_recovery_ms = report.last_recovery_ms.max(t);
                }
                device.consecutive_failures = 0;
                let _ = device.schedule.handle_issued(now, LIFETIME, rng.next_u32());
                report.issued += 1;
            }
            _ => {
                device
                    .schedule
                    .handle_failure(now, ErrorClass::Transient, None, rng.next_u32());
                device.consecutive_failures += 1;
                report.max_consecutive_failures = report
                    .max_consecutive_failures
                    .max(device.consecutive_failures);
                report.failed += 1;
                if !failed_devices[index as usize] {
                    failed_devices[index as usize] = true;
                    report.devices_with_failures += 1;
                }
            }
        }
        while let Some(Action::Fetch) = device.schedule.poll_action(now) {
            let second = (t / 1000) as usize;
            report.per_second[second] += 1;
            report.fetches += 1;
            if device.consecutive_failures > 0 {
                report.retries += 1;
            }
            let down = scenario
                .outage_s
                .is_some_and(|(from, to)| (from * 1000..to * 1000).contains(&t));
            let throttled = scenario
                .capacity_rps
                .is_some_and(|cap| report.per_second[second] > cap);
            let latency = 100 + rng.below(501);
            let kind = if down || throttled {
                REPLY_FAILED
            } else {
                REPLY_OK
            };
            queue.push(Reverse((t + latency, index, kind)));
        }
        if let Some(next) = device.schedule.poll_timeout() {
            let next = next.as_millis();
            if next <= t {
                report.busy_timeouts += 1;
            }
            if next != device.wake {
                device.wake = next;
                queue.push(Reverse((next, index, WAKE)));
            }
        }
    }

    let end = Instant::from_millis(end_ms);
    for device in &mut devices {
        match device.schedule.expires_at() {
            None => report.devices_never_served += 1,
            Some(expires) if !device.schedule.servable(end) => {
                device.ever_dry = true;
                report.dry_seconds += (end - (expires - MIN_REMAINING)).as_secs_f64();
            }
            Some(_) => {}
        }
        report.devices_dry += u64::from(device.ever_dry);
    }
    report.wall_ms = started.elapsed().as_millis();
    report
}

fn hms(seconds: u64) -> String {
    format!(
        "{}:{:02}:{:02}",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    )
}

fn print_table(per_second: &[u32], from_s: u64, to_s: u64, step_s: u64, scale: u32) {
    print_rows(per_second, from_s, to_s, step_s, scale, false);
}

fn print_table_nonzero(per_second: &[u32], from_s: u64, to_s: u64, step_s: u64, scale: u32) {
    print_rows(per_second, from_s, to_s, step_s, scale, true);
}

fn print_rows(
    per_second: &[u32],
    from_s: u64,
    to_s: u64,
    step_s: u64,
    scale: u32,
    skip_empty: bool,
) {
    println!(
        "  {:>8} – {:<8} {:>10} {:>9} {:>9}",
        "from", "to", "requests", "mean/s", "peak/s"
    );
    let mut start = from_s;
    while start < to_s {
        let stop = (start + step_s).min(to_s);
        let slice = &per_second[start as usize..stop as usize];
        let total: u64 = slice.iter().map(|&c| u64::from(c)).sum();
        let peak = slice.iter().copied().max().unwrap_or(0);
        if skip_empty && total == 0 {
            start = stop;
            continue;
        }
        let bar = "#".repeat(((u64::from(peak) * 40).div_ceil(u64::from(scale.max(1)))) as usize);
        println!(
            "  {:>8} – {:<8} {:>10} {:>9.1} {:>9}  {}",
            hms(start),
            hms(stop),
            total,
            total as f64 / (stop - start) as f64,
            peak,
            bar
        );
        start = stop;
    }
}

fn print_report(scenario: &Scenario, report: &Report) {
    let seconds = report.per_second.len().saturating_sub(1);
    let (peak_at, peak) = report
        .per_second
        .iter()
        .enumerate()
        .max_by_key(|&(i, c)| (c, Reverse(i)))
        .map_or((0, 0), |(i, c)| (i, *c));
    println!("\n=== {} ===", scenario.name);
    println!(
        "  {} devices, boot spread {} s, {} simulated, outage {:?}, capacity {:?} req/s",
        scenario.devices,
        scenario.boot_spread_s,
        hms(scenario.duration_s),
        scenario.outage_s.map(|(a, b)| (hms(a), hms(b))),
        scenario.capacity_rps
    );
    println!(
        "  fetches {} (issued {}, failed {}, retries {}), {} events, {} ms wall",
        report.fetches, report.issued, report.failed, report.retries, report.events, report.wall_ms
    );
    println!(
        "  requests/s: peak {} at {}, mean {:.1} over the run",
        peak,
        hms(peak_at as u64),
        report.fetches as f64 / seconds.max(1) as f64
    );
    println!(
        "  devices that ever held < 60 s of credentials after having some: {} ({:.1} device-seconds dry)",
        report.devices_dry, report.dry_seconds
    );
    println!(
        "  devices without credentials at the end: {}; last device's first credentials at {}",
        report.devices_never_served,
        hms(report.last_first_issue_ms / 1000)
    );
    println!(
        "  devices that saw a failure: {}, longest failure streak: {}, last recovery at {}",
        report.devices_with_failures,
        report.max_consecutive_failures,
        hms(report.last_recovery_ms / 1000)
    );
    println!(
        "  timeouts not in the future (busy loops): {}",
        report.busy_timeouts
    );
}

struct Args {
    seed: u64,
    devices: u32,
    outage_minutes: u64,
    capacity: Option<u32>,
    only: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        seed: 1,
        devices: 1_000_000,
        outage_minutes: 10,
        capacity: None,
        only: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--devices" => {
                args.devices = value("--devices")?
                    .parse()
                    .map_err(|e| format!("--devices: {e}"))?
            }
            "--outage-minutes" => {
                args.outage_minutes = value("--outage-minutes")?
                    .parse()
                    .map_err(|e| format!("--outage-minutes: {e}"))?
            }
            "--capacity" => {
                args.capacity = Some(
                    value("--capacity")?
                        .parse()
                        .map_err(|e| format!("--capacity: {e}"))?,
                )
            }
            "--only" => args.only = Some(value("--only")?),
            seed => args.seed = seed.parse().map_err(|e| format!("seed {seed:?}: {e}"))?,
        }
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!(
                "fleet: {e}\nusage: fleet [SEED] [--devices N] [--outage-minutes M] [--capacity RPS] [--only a|b]"
            );
            return ExitCode::from(2);
        }
    };
    println!(
        "fleet simulation: seed {}, {} devices, one-hour credentials, default schedule (refresh_before 900 s, jitter 120 s, max_backoff 300 s)",
        args.seed, args.devices
    );
    if args.only.as_deref() != Some("b") {
        let scenario = Scenario {
            name: "(a) boot storm: every device boots within the same minute",
            devices: args.devices,
            boot_spread_s: 60,
            duration_s: 3 * 3600,
            outage_s: None,
            capacity_rps: args.capacity,
        };
        let report = run(&scenario, args.seed);
        print_report(&scenario, &report);
        let scale = report.per_second.iter().copied().max().unwrap_or(1);
        println!("  per 10 minutes:");
        print_table(&report.per_second, 0, scenario.duration_s, 600, scale);
        println!("  the refresh waves, per minute (minutes without requests left out):");
        print_table_nonzero(&report.per_second, 0, scenario.duration_s, 60, scale);
    }
    if args.only.as_deref() != Some("a") {
        let outage = (7200, 7200 + args.outage_minutes * 60);
        let scenario = Scenario {
            name: "(b) steady fleet, provider down for a while",
            devices: args.devices,
            boot_spread_s: 3600,
            duration_s: 4 * 3600,
            outage_s: Some(outage),
            capacity_rps: args.capacity,
        };
        let report = run(&scenario, args.seed ^ 0x5EED);
        print_report(&scenario, &report);
        let steady = &report.per_second[3600..7200];
        let steady_total: u64 = steady.iter().map(|&c| u64::from(c)).sum();
        println!(
            "  steady state 1:00–2:00: mean {:.1} req/s, peak {}",
            steady_total as f64 / 3600.0,
            steady.iter().copied().max().unwrap_or(0)
        );
        let scale = report.per_second.iter().copied().max().unwrap_or(1);
        println!("  per 10 minutes:");
        print_table(&report.per_second, 0, scenario.duration_s, 600, scale);
        println!("  around the outage, per minute:");
        print_table(
            &report.per_second,
            outage.0 - 300,
            outage.1 + 900,
            60,
            scale,
        );
    }
    ExitCode::SUCCESS
}
