//! Fleet simulation of the identity lifecycle (SPEC §8): what 100,000 devices do to AWS IoT's
//! fleet-provisioning API when a batch is powered on together, and again a year later when
//! their certificates come due. Not a test: a discrete-event simulation that prints figures.
//!
//! Every device runs the agent's flow, timed by the real [`iotcred_core::lifecycle`] functions:
//! a [`startup_delay`] after power-on; then a try = MQTT CONNECT, SUBSCRIBE to the two reply
//! topics, publish `CreateCertificateFromCsr`, SUBSCRIBE, publish `RegisterThing` with the
//! ownership token (reused on the next try while it is younger than an hour, as SPEC §8.1 says).
//! A try that AWS IoT throttles fails, and the device waits [`Backoff::delay`] before the next.
//! Rotation is the same two publishes over the current certificate, at [`rotation_at`] (or, for
//! comparison, at the first second [`rotation_due`] holds), then one credentials exchange.
//!
//! The account's quotas are enforced per one-second bucket (requests beyond the quota in a
//! second are throttled): `CreateCertificateFromCsr` 15/s, `RegisterThing` 10/s, CONNECT 500/s,
//! subscriptions 500/s (`--csr-quota`, `--register-quota`, `--connect-quota`,
//! `--subscribe-quota`; the figures and their source are in BENCHMARKS.md). Latencies: CONNECT
//! with TLS and the first SUBSCRIBE 300–1000 ms, each publish's reply 100–600 ms. Randomness
//! comes from a splitmix64 generator seeded on the command line, so a run is reproducible.
//!
//! ```text
//! cargo run -p iotcred-core --release --example fleet_identity -- [SEED] [--devices N]
//!     [--power-on-seconds S] [--csr-quota Q] [--register-quota Q] [--connect-quota Q]
//!     [--subscribe-quota Q]
//! ```

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::process::ExitCode;

use iotcred_core::lifecycle::{
    Backoff, PROVISION_STARTUP_JITTER, rotation_at, rotation_due, rotation_random, startup_delay,
};
use iotcred_core::{Duration, UnixTime};

const TRY: u8 = 0;
const PUBLISH: u8 = 1;
const CSR_OK: u8 = 2;
const REGISTER_OK: u8 = 3;
const THROTTLED: u8 = 4;

/// The ownership token is valid for an hour; the agent reuses it while it is younger than this.
const TOKEN_REUSE_MS: u64 = 3_540_000;
const VALIDITY_DAYS: i64 = 365;
const BEFORE_DAYS: u32 = 30;
const DAY: i64 = 86_400;
/// Power-on, as a wall-clock time (2027-01-04T08:00:00Z): only the rotation maths needs one.
const POWER_ON: i64 = 1_798_963_200 + 8 * 3600;

#[path = "support/splitmix.rs"]
mod splitmix;
use splitmix::SplitMix64;

const UNLIMITED: Quotas = Quotas {
    csr: u32::MAX,
    register: u32::MAX,
    connect: u32::MAX,
    subscribe: u32::MAX,
};

#[derive(Clone, Copy)]
struct Quotas {
    csr: u32,
    register: u32,
    connect: u32,
    subscribe: u32,
}

/// Per-second counters of what the devices sent (offered load, throttled or not).
#[derive(Default)]
struct Seconds {
    csr: Vec<u32>,
    register: Vec<u32>,
    connect: Vec<u32>,
    subscribe: Vec<u32>,
}

/// Adds `n` to second `s` of `v`, growing it; returns the new count.
fn bump(v: &mut Vec<u32>, s: usize, n: u32) -> u32 {
    if v.len() <= s {
        v.resize(s + 1, 0);
    }
    v[s] += n;
    v[s]
}

fn peak(v: &[u32]) -> u32 {
    v.iter().copied().max().unwrap_or(0)
}

#[derive(Default)]
struct Outcome {
    seconds: Seconds,
    tries: u64,
    csr_sent: u64,
    csr_throttled: u64,
    register_sent: u64,
    register_throttled: u64,
    connect_throttled: u64,
    subscribe_throttled: u64,
    /// Certificates issued whose ownership token expired before RegisterThing succeeded.
    tokens_expired: u64,
    /// Per device: when RegisterThing succeeded, and when its final certificate was issued (ms).
    done_ms: Vec<u64>,
    issued_ms: Vec<u64>,
}

struct Device {
    failures: u32,
    /// When the ownership token of the certificate in hand was issued (`u64::MAX`: none).
    token_ms: u64,
}

/// Runs the provisioning (or rotation) flow for devices that start their first try at
/// `starts_ms`, against `quotas`, retrying with `backoff`.
fn run(starts_ms: &[u64], backoff: Backoff, quotas: Quotas, rng: &mut SplitMix64) -> Outcome {
    let n = starts_ms.len();
    let mut out = Outcome {
        done_ms: vec![u64::MAX; n],
        issued_ms: vec![u64::MAX; n],
        ..Outcome::default()
    };
    let mut devices: Vec<Device> = (0..n)
        .map(|_| Device {
            failures: 0,
            token_ms: u64::MAX,
        })
        .collect();
    let mut queue: BinaryHeap<Reverse<(u64, u32, u8)>> = starts_ms
        .iter()
        .enumerate()
        .map(|(i, &t)| Reverse((t, i as u32, TRY)))
        .collect();
    let s = &mut out.seconds;
    while let Some(Reverse((t, index, kind))) = queue.pop() {
        let device = &mut devices[index as usize];
        let second = (t / 1000) as usize;
        let mut failed = false;
        match kind {
            TRY => {
                out.tries += 1;
                if bump(&mut s.connect, second, 1) > quotas.connect {
                    out.connect_throttled += 1;
                    failed = true;
                } else {
                    queue.push(Reverse((t + rng.between(300, 1000), index, PUBLISH)));
                }
            }
            PUBLISH | CSR_OK => {
                if kind == CSR_OK {
                    device.token_ms = t;
                    out.issued_ms[index as usize] = t;
                    device.failures = 0;
                } else if device.token_ms != u64::MAX
                    && t.saturating_sub(device.token_ms) >= TOKEN_REUSE_MS
                {
                    device.token_ms = u64::MAX;
                    out.tokens_expired += 1;
                }
                let register = device.token_ms != u64::MAX;
                if bump(&mut s.subscribe, second, 2) > quotas.subscribe {
                    out.subscribe_throttled += 1;
                    failed = true;
                } else {
                    let reply = t + rng.between(100, 600);
                    let next = if register {
                        out.register_sent += 1;
                        if bump(&mut s.register, second, 1) > quotas.register {
                            out.register_throttled += 1;
                            THROTTLED
                        } else {
                            REGISTER_OK
                        }
                    } else {
                        out.csr_sent += 1;
                        if bump(&mut s.csr, second, 1) > quotas.csr {
                            out.csr_throttled += 1;
                            THROTTLED
                        } else {
                            CSR_OK
                        }
                    };
                    queue.push(Reverse((reply, index, next)));
                }
            }
            REGISTER_OK => {
                out.done_ms[index as usize] = t;
                device.token_ms = u64::MAX;
            }
            _ => failed = true,
        }
        if failed {
            device.failures += 1;
            let wait = backoff.delay(device.failures, rng.next_u32());
            queue.push(Reverse((t + wait.as_millis() as u64, index, TRY)));
        }
    }
    out
}

fn hms(ms: u64) -> String {
    let s = ms / 1000;
    if s >= 86_400 {
        format!(
            "{}d {:02}:{:02}:{:02}",
            s / 86_400,
            s / 3600 % 24,
            s / 60 % 60,
            s % 60
        )
    } else {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    }
}

/// The time by which `fraction` of `values` (ms, relative) are reached.
fn quantile(values: &[u64], fraction: f64) -> u64 {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let i = ((sorted.len() as f64 * fraction).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

struct Row {
    label: String,
    /// The same starts with no quota at all: the load's shape.
    demand: Outcome,
    out: Outcome,
}

/// CreateCertificateFromCsr + RegisterThing publishes per second.
fn publishes(seconds: &Seconds) -> Vec<u32> {
    let len = seconds.csr.len().max(seconds.register.len());
    (0..len)
        .map(|i| {
            seconds.csr.get(i).copied().unwrap_or(0) + seconds.register.get(i).copied().unwrap_or(0)
        })
        .collect()
}

fn print_table(title: &str, rows: &[Row], devices: usize, what: &str, done: &str) {
    println!("\n{title}");
    println!(
        "| {what} | no quota: peak publishes/s | with the quotas: peak publishes/s (CSR / Register) | throttled publishes (CSR / Register) | throttled CONNECT / SUBSCRIBE | certificates issued (tokens expired unused) | 50% / all {done} |"
    );
    println!("|---|---|---|---|---|---|---|");
    for row in rows {
        let o = &row.out;
        let sec = &o.seconds;
        assert!(o.done_ms.iter().all(|&d| d != u64::MAX));
        assert_eq!(o.done_ms.len(), devices);
        println!(
            "| {} | {} | {} ({} / {}) | {} ({} / {}) | {} / {} | {} ({}) | {} / {} |",
            row.label,
            peak(&publishes(&row.demand.seconds)),
            peak(&publishes(sec)),
            peak(&sec.csr),
            peak(&sec.register),
            o.csr_throttled + o.register_throttled,
            o.csr_throttled,
            o.register_throttled,
            o.connect_throttled,
            o.subscribe_throttled,
            o.csr_sent - o.csr_throttled,
            o.tokens_expired,
            hms(quantile(&o.done_ms, 0.5)),
            hms(quantile(&o.done_ms, 1.0)),
        );
    }
}

struct Args {
    seed: u64,
    devices: usize,
    power_on_s: u64,
    quotas: Quotas,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        seed: 1,
        devices: 100_000,
        power_on_s: 60,
        quotas: Quotas {
            csr: 15,
            register: 10,
            connect: 500,
            subscribe: 500,
        },
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| -> Result<u64, String> {
            it.next()
                .ok_or(format!("{name} needs a value"))?
                .parse()
                .map_err(|e| format!("{name}: {e}"))
        };
        match arg.as_str() {
            "--devices" => args.devices = value("--devices")? as usize,
            "--power-on-seconds" => args.power_on_s = value("--power-on-seconds")?.max(1),
            "--csr-quota" => args.quotas.csr = value("--csr-quota")? as u32,
            "--register-quota" => args.quotas.register = value("--register-quota")? as u32,
            "--connect-quota" => args.quotas.connect = value("--connect-quota")? as u32,
            "--subscribe-quota" => args.quotas.subscribe = value("--subscribe-quota")? as u32,
            seed => args.seed = seed.parse().map_err(|e| format!("seed {seed:?}: {e}"))?,
        }
    }
    if args.devices == 0 {
        return Err("--devices must be at least 1".into());
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!(
                "fleet_identity: {e}\nusage: fleet_identity [SEED] [--devices N] [--power-on-seconds S] [--csr-quota Q] [--register-quota Q] [--connect-quota Q] [--subscribe-quota Q]"
            );
            return ExitCode::from(2);
        }
    };
    let started = std::time::Instant::now();
    let (n, q) = (args.devices, args.quotas);
    let mut rng = SplitMix64(args.seed);
    println!(
        "fleet identity simulation: seed {}, {} devices; quotas per second: CreateCertificateFromCsr {}, RegisterThing {}, CONNECT {}, subscriptions {}",
        args.seed, n, q.csr, q.register, q.connect, q.subscribe
    );

    // Power-on: every device of the batch within the same `power_on_s` seconds (uniform).
    let power_on: Vec<u64> = (0..n)
        .map(|_| rng.between(0, args.power_on_s * 1000 - 1))
        .collect();
    let short_cap = Backoff {
        cap: Duration::from_secs(300),
        ..Backoff::PROVISION
    };
    let long_cap = Backoff {
        cap: Duration::from_secs(3600),
        ..Backoff::PROVISION
    };
    let policies: [(&str, Duration, Backoff); 5] = [
        ("no startup jitter", Duration::ZERO, Backoff::PROVISION),
        (
            "**jitter 0–300 s (default)**",
            PROVISION_STARTUP_JITTER,
            Backoff::PROVISION,
        ),
        (
            "jitter 0–3600 s",
            Duration::from_secs(3600),
            Backoff::PROVISION,
        ),
        (
            "jitter 0–300 s, backoff cap 300 s",
            PROVISION_STARTUP_JITTER,
            short_cap,
        ),
        (
            "jitter 0–300 s, backoff cap 3600 s",
            PROVISION_STARTUP_JITTER,
            long_cap,
        ),
    ];
    let mut rows = Vec::new();
    let mut default_issued: Vec<u64> = Vec::new();
    for (label, jitter, backoff) in policies {
        let starts: Vec<u64> = power_on
            .iter()
            .map(|&p| p + startup_delay(jitter, rng.next_u32()).as_millis() as u64)
            .collect();
        let demand = run(&starts, backoff, UNLIMITED, &mut rng);
        let out = run(&starts, backoff, q, &mut rng);
        if jitter == PROVISION_STARTUP_JITTER && backoff == Backoff::PROVISION {
            default_issued = out.issued_ms.clone();
        }
        rows.push(Row {
            label: format!(
                "{label} (backoff {}–{} s)",
                backoff.base.as_secs(),
                backoff.cap.as_secs()
            ),
            demand,
            out,
        });
    }
    print_table(
        &format!(
            "Provisioning: {n} devices powered on within {} s (uniform); times from the first power-on",
            args.power_on_s
        ),
        &rows,
        n,
        "policy",
        "provisioned",
    );

    // Rotation, a year later: one-year certificates, before_days = 30.
    // (a) notBefore = when each device's certificate was issued in the default run above;
    // (b) every certificate with the same notBefore/notAfter (issued on one factory day by a CA
    //     that truncates validity to whole days, or a fixed end date).
    let base = UnixTime::from_secs(POWER_ON);
    let mut rotation_rows = Vec::new();
    let populations: [(&str, Vec<i64>); 2] = [
        (
            "(a) notBefore as issued above",
            default_issued
                .iter()
                .map(|&ms| POWER_ON + (ms / 1000) as i64)
                .collect(),
        ),
        ("(b) one shared notBefore/notAfter", vec![POWER_ON; n]),
    ];
    for (population, not_before) in &populations {
        for spread in [false, true] {
            let mut at: Vec<i64> = Vec::with_capacity(n);
            for (i, &nb) in not_before.iter().enumerate() {
                let (nb, na) = (
                    UnixTime::from_secs(nb),
                    UnixTime::from_secs(nb + VALIDITY_DAYS * DAY),
                );
                let when = if spread {
                    // Stands in for the certificate's DER: unique per device and run.
                    let der = [args.seed.to_be_bytes(), (i as u64).to_be_bytes()].concat();
                    rotation_at(nb, na, BEFORE_DAYS, rotation_random(&der))
                } else {
                    na.saturating_sub(Duration::from_secs(u64::from(BEFORE_DAYS) * 86_400))
                };
                assert!(rotation_due(na, when, BEFORE_DAYS));
                at.push(when.as_secs());
            }
            let origin = *at.iter().min().expect("devices ≥ 1");
            let starts: Vec<u64> = at.iter().map(|&a| ((a - origin) * 1000) as u64).collect();
            let demand = run(&starts, Backoff::ROTATION, UNLIMITED, &mut rng);
            let out = run(&starts, Backoff::ROTATION, q, &mut rng);
            // Every device rotated before its certificate expired?
            let latest_margin = not_before
                .iter()
                .zip(&out.done_ms)
                .map(|(&nb, &done)| nb + VALIDITY_DAYS * DAY - (origin + (done / 1000) as i64))
                .min()
                .unwrap_or(0);
            assert!(latest_margin > 0, "a certificate expired before rotation");
            let first = UnixTime::from_secs(origin)
                .saturating_duration_since(base)
                .as_secs()
                / 86_400;
            rotation_rows.push(Row {
                label: format!(
                    "{population}, {} (first rotation on day {first}; least margin to expiry {:.1} days)",
                    if spread {
                        "rotation_at spread"
                    } else {
                        "no spread (at rotation_due)"
                    },
                    latest_margin as f64 / 86_400.0
                ),
                demand,
                out,
            });
        }
    }
    print_table(
        &format!(
            "Rotation: {VALIDITY_DAYS}-day certificates, before_days = {BEFORE_DAYS}, backoff {}–{} s; times from the first rotation",
            Backoff::ROTATION.base.as_secs(),
            Backoff::ROTATION.cap.as_secs()
        ),
        &rotation_rows,
        n,
        "certificates",
        "rotated",
    );
    println!("\n{} ms wall", started.elapsed().as_millis());
    ExitCode::SUCCESS
}
