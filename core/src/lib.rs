#![no_std]
#![doc = include_str!("../README.md")]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]
#![warn(missing_docs)]

extern crate alloc;
#[cfg(any(feature = "std", test))]
extern crate std;

pub mod credentials;
pub mod exchange;
pub mod http;
pub mod lifecycle;
pub mod render;
pub mod request;
pub mod schedule;
pub mod secret;
pub mod sigv4;
pub mod time;

#[cfg(feature = "async")]
pub mod asynch;
pub mod blocking;

pub use blocking::{FetchError, Fetched};
pub use credentials::{Credentials, Issued};
pub use exchange::{ErrorClass, ExchangeError, Explained, parse_credentials, parse_response};
pub use http::{HttpError, Limits, Response, ResponseParser, RetryAfter};
pub use render::Format;
pub use request::{
    CredentialDuration, InvalidRequest, PreparedRequest, Request, RoleAlias, ThingName,
};
pub use schedule::{Schedule, ScheduleConfig};
pub use secret::Secret;
pub use time::{Duration, Instant, TimeError, UnixTime};

/// Credentials are never handed out with less than this much lifetime left (SPEC §3).
pub const MIN_REMAINING: Duration = Duration::from_secs(60);
