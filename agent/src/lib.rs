//! iotcred agent library: everything behind the `iotcred` binary.
//!
//! The protocol and the refresh schedule live in `iotcred-core`; this crate adds the I/O around
//! them: configuration, mutual TLS with file or PKCS#11 keys, the refresher tasks, the local HTTP
//! server, file sinks and the command-line tools.

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod cert;
pub mod client;
pub mod commands;
pub mod config;
mod connect;
mod daemon;
mod der;
pub mod exit;
pub mod keys;
pub mod metrics;
pub mod mqtt;
pub mod net;
pub mod peer;
mod refresh;
mod sdnotify;
pub mod server;
mod sinks;
pub mod source;
pub mod state;
pub mod sts;
mod tls;
mod upstream;

/// What the cargo-fuzz targets in `fuzz/` reach beyond the public modules: the crate's DER
/// reader. Only with the `fuzzing` feature; not an API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::der::{
        DerError, EcCurve, SpkiKey, Tlv, ecdsa_raw_to_der, expect, parse_spki, pkcs8_rsa_bits,
        read, rsa_private_key_bits, tlv, unwrap_ec_point,
    };
}

/// `User-Agent` sent upstream.
pub const USER_AGENT: &str = concat!("iotcred/", env!("CARGO_PKG_VERSION"));
