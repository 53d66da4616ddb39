//! Where a role's credentials come from: a [`Source`] that the role's refresher drives.
//!
//! Today there is one kind, the AWS IoT credentials provider ([`ProviderSource`], over the
//! device's mutual TLS identity). Each source is one small value behind the trait, so the
//! refresher never knows which kind it drives, and tests drive it with a fake.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use iotcred_core::{Credentials, ErrorClass};
use tokio::time::Instant;

use crate::config::ProviderRole;
use crate::upstream::{Upstream, UpstreamError};

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

/// Why a source could not obtain credentials. `Display` says what is wrong and what to do, in
/// one line, and never contains a secret.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// The AWS IoT credentials provider (or the way to it) failed.
    #[error(transparent)]
    Provider(#[from] UpstreamError),
}

impl SourceError {
    /// Permanent (fix the configuration; retried slowly) or transient (retried with backoff).
    pub fn class(&self) -> ErrorClass {
        match self {
            SourceError::Provider(e) => e.class(),
        }
    }

    /// The issuer's `Retry-After`, if it sent one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            SourceError::Provider(e) => e.retry_after(),
        }
    }
}

/// Something a refresher can ask for one role's credentials.
pub trait Source: Send + Sync + fmt::Debug {
    /// One attempt to obtain credentials. The refresher calls it at most once at a time per
    /// role, and drops the future (cancelling the attempt) on shutdown.
    fn fetch(&self) -> BoxFuture<'_, Result<Obtained, SourceError>>;
}

/// A role whose credentials come from the AWS IoT credentials provider through a role alias.
#[derive(Debug)]
pub struct ProviderSource {
    upstream: Arc<Upstream>,
    request: ProviderRole,
}

impl ProviderSource {
    /// The source of one role on the device's shared upstream.
    pub fn new(upstream: Arc<Upstream>, request: ProviderRole) -> Self {
        ProviderSource { upstream, request }
    }
}

impl Source for ProviderSource {
    fn fetch(&self) -> BoxFuture<'_, Result<Obtained, SourceError>> {
        Box::pin(async move { Ok(self.upstream.fetch(&self.request).await?) })
    }
}

/// A scripted source for paused-time tests of the refresher and reloads.
#[cfg(test)]
pub(crate) mod fake {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use iotcred_core::{ExchangeError, Secret, UnixTime};

    use super::*;

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
                        Err(SourceError::Provider(UpstreamError::Exchange {
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
