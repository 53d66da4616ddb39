//! Test support for iotcred: a **fake AWS IoT credentials provider** and a throwaway PKI.
//!
//! The fake provider speaks the protocol of SPEC §2 over real mutual TLS (a rustls server that
//! requires and verifies client certificates), records what it saw and what it issued, and
//! misbehaves on command ([`Fault`]) so end-to-end tests can drive every error path of the agent.
//! It is a test tool, not a shortcut around TLS: there is no option to skip client verification.
//!
//! - [`pki`]: generates a CA, server certificates (good, untrusted, expired) and device
//!   certificates (EC P-256, RSA-2048, chained, expired, not yet valid, for an external key).
//! - [`provider`]: [`FakeProvider`] (tokio) and [`BlockingProvider`] (own runtime, for plain
//!   `#[test]` functions).
//! - [`timefmt`]: RFC 3339 / calendar helpers without a date crate.
//! - [`fakeiot`]: a fake AWS IoT for fleet provisioning and rotation: mosquitto with a TLS
//!   listener and an ACL as the policies, an MQTT responder, and a registry of certificates and
//!   things that the fake provider can check client certificates against.
//! - [`sts`]: STS servers for chained roles (a signature-verifying fake, moto) and a CONNECT
//!   proxy.
//!
//! The `fake-provider` binary wraps the same server with a loopback admin listener.

pub mod agent;
pub mod fakeiot;
pub mod hostile;
pub mod netns;
pub mod p11unplug;
pub mod pki;
pub mod provider;
pub mod softhsm;
pub mod sts;
pub mod timefmt;
pub mod tpm;

pub use pki::{CertKey, KeyAlgorithm, Pki, ServerCert};
pub use provider::{
    BlockingProvider, Error, FakeProvider, Fault, IssuedCredentials, ProviderConfig,
    ProviderHandle, RequestRecord, Stats, TlsVersions,
};
