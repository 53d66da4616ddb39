//! Where a role's credentials come from: a [`Source`] that the role's refresher drives.
//!
//! Two kinds: the AWS IoT credentials provider (`upstream::ProviderSource`, over the device's
//! mutual TLS identity), and STS `AssumeRole` for chained roles
//! ([`ChainedSource`](crate::sts::ChainedSource), signed with another role's credentials). Each
//! source is one small value behind the trait, with its own typed error behind
//! [`SourceFailure`], so this module depends on no kind of source, the refresher never knows
//! which kind it drives, and tests drive it with a fake.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use iotcred_core::{Credentials, ErrorClass};
use tokio::time::Instant;

/// A boxed, `Send` future: what [`Source::fetch`] returns (the trait stays object-safe).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Credentials a source obtained, with their lifetime pinned to the monotonic clock.
pub struct Obtained {
    /// The credentials (their `expiration` field is the issuer's clock: consumers are given
    /// the device's clock plus the remaining lifetime instead).
    pub credentials: Credentials,
    /// How long they are valid, counted from `arrived` (issuer's expiration − issuer's `Date`).
    pub lifetime: Duration,
    /// When the answer arrived (monotonic).
    pub arrived: Instant,
    /// Time from the start of the attempt to the answer (connection set-up included).
    pub latency: Duration,
}

impl fmt::Debug for Obtained {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Obtained")
            .field("credentials", &self.credentials)
            .field("lifetime", &self.lifetime)
            .field("latency", &self.latency)
            .finish_non_exhaustive()
    }
}

/// What a refresher needs to know of a failed fetch: its class, the issuer's `Retry-After`, and
/// (through `Display`) one line saying what is wrong and what to do, never a secret. Each kind
/// of source has its own typed error implementing this (`UpstreamError`, `ChainedError`).
pub trait SourceFailure: std::error::Error + Send + Sync + 'static {
    /// Permanent (fix the configuration; retried slowly) or transient (retried with backoff).
    fn class(&self) -> ErrorClass;
    /// The issuer's `Retry-After`, if it sent one.
    fn retry_after(&self) -> Option<Duration>;
}

/// Why a source could not obtain credentials: the source's own typed error, behind
/// [`SourceFailure`] (so this module depends on no kind of source).
pub struct SourceError(Box<dyn SourceFailure>);

impl<E: SourceFailure> From<E> for SourceError {
    fn from(e: E) -> Self {
        SourceError(Box::new(e))
    }
}

impl SourceError {
    /// Permanent (fix the configuration; retried slowly) or transient (retried with backoff).
    pub fn class(&self) -> ErrorClass {
        self.0.class()
    }

    /// The issuer's `Retry-After`, if it sent one.
    pub fn retry_after(&self) -> Option<Duration> {
        self.0.retry_after()
    }
}

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Debug for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for SourceError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// Something a refresher can ask for one role's credentials.
pub trait Source: Send + Sync + fmt::Debug {
    /// One attempt to obtain credentials. The refresher calls it at most once at a time per
    /// role, and drops the future (cancelling the attempt) on shutdown.
    fn fetch(&self) -> BoxFuture<'_, Result<Obtained, SourceError>>;
}

/// A scripted source for paused-time tests of the refresher and reloads.
#[cfg(test)]
pub(crate) mod fake {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use std::sync::Arc;

    use iotcred_core::{ExchangeError, Secret, UnixTime};

    use super::*;
    use crate::upstream::UpstreamError;

    /// What the fake answers to one fetch, after `latency` (of simulated time).
    #[derive(Clone, Debug)]
    pub(crate) enum Reply {
        /// Credentials valid for this long.
        Issue(Duration),
        /// The provider's answer with this status (and `Retry-After`).
        Status(u16, Option<Duration>),
    }

    /// A source that answers from a script, records when it was asked, and counts fetches
    /// under way (to check single flight and cancellation).
    #[derive(Debug, Default)]
    pub(crate) struct FakeSource {
        script: Mutex<VecDeque<(Duration, Reply)>>,
        /// When each fetch started.
        pub(crate) calls: Mutex<Vec<Instant>>,
        /// Fetches started and not finished (dropped futures included: they finish by drop).
        pub(crate) under_way: std::sync::atomic::AtomicUsize,
        /// The most fetches under way at once.
        pub(crate) most_under_way: std::sync::atomic::AtomicUsize,
        serial: std::sync::atomic::AtomicUsize,
        /// Distinguishes this source's access key ids from other fakes' in one test.
        prefix: u8,
    }

    /// Sources made so far (each gets its own prefix letter).
    static MADE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

    struct UnderWay<'a>(&'a FakeSource);

    impl Drop for UnderWay<'_> {
        fn drop(&mut self) {
            self.0
                .under_way
                .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    impl FakeSource {
        /// A source answering `replies` in order (each after its latency); once the script
        /// is used up, every fetch hangs until dropped.
        pub(crate) fn new(replies: impl IntoIterator<Item = (Duration, Reply)>) -> Arc<Self> {
            let source = FakeSource {
                prefix: b'A' + MADE.fetch_add(1, std::sync::atomic::Ordering::SeqCst) % 26,
                ..FakeSource::default()
            };
            source.script.lock().unwrap().extend(replies);
            Arc::new(source)
        }

        /// Appends a reply to the script.
        pub(crate) fn push(&self, latency: Duration, reply: Reply) {
            self.script.lock().unwrap().push_back((latency, reply));
        }

        /// How many fetches started.
        pub(crate) fn fetches(&self) -> usize {
            self.calls.lock().unwrap().len()
        }

        /// When each fetch started, relative to `origin`, in whole seconds.
        pub(crate) fn call_secs(&self, origin: Instant) -> Vec<u64> {
            let calls = self.calls.lock().unwrap();
            calls
                .iter()
                .map(|t| t.saturating_duration_since(origin).as_secs())
                .collect()
        }
    }

    impl Source for FakeSource {
        fn fetch(&self) -> BoxFuture<'_, Result<Obtained, SourceError>> {
            use std::sync::atomic::Ordering::SeqCst;
            Box::pin(async move {
                self.calls.lock().unwrap().push(Instant::now());
                let now_under_way = self.under_way.fetch_add(1, SeqCst) + 1;
                self.most_under_way.fetch_max(now_under_way, SeqCst);
                let _guard = UnderWay(self);
                let next = self.script.lock().unwrap().pop_front();
                let Some((latency, reply)) = next else {
                    return std::future::pending().await;
                };
                tokio::time::sleep(latency).await;
                match reply {
                    Reply::Issue(lifetime) => {
                        let n = self.serial.fetch_add(1, SeqCst);
                        Ok(Obtained {
                            credentials: Credentials {
                                access_key_id: format!("ASIAFAKE{}{n:04}", self.prefix as char),
                                secret_access_key: Secret::from("fake-secret"),
                                session_token: Secret::from("fake-session"),
                                expiration: UnixTime::from_secs(0),
                            },
                            lifetime,
                            arrived: Instant::now(),
                            latency,
                        })
                    }
                    Reply::Status(status, retry_after) => {
                        Err(SourceError::from(UpstreamError::Exchange {
                            error: ExchangeError::Rejected {
                                status,
                                message: None,
                                retry_after,
                            },
                            message: format!("fake provider answered {status}"),
                        }))
                    }
                }
            })
        }
    }
}
