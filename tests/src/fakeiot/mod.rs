//! A fake AWS IoT from real parts, for the provisioning and rotation tests.
//!
//! - [`broker`]: mosquitto (Debian's 2.0.x) with a TLS listener on 127.0.0.1 that requires a
//!   client certificate of the test CA and uses its CN as the user name, and an ACL that plays
//!   the claim and device policies.
//! - [`mqtt`]: the responder (AWS's side of the fleet-provisioning MQTT API, rumqttc) and a small
//!   MQTT client for the fixture's own tests.
//! - [`registry`]: certificates, things, ownership tokens, templates, counters and fault knobs,
//!   shared with the fake credentials provider ([`crate::ProviderConfig::registry`]).
//!
//! ```no_run
//! use iotcred_tests::agent::Env;
//! use iotcred_tests::fakeiot::{FakeIot, FakeIotOptions, Registry, Step, StepFault};
//! let registry = Registry::new();
//! let env = Env::with_provider(|c| c.registry = Some(registry.clone()));
//! let iot = FakeIot::start(&env.pki, &env.path().join("iot"), registry.clone(),
//!                          FakeIotOptions::default()).unwrap();
//! registry.push_fault(Step::RegisterThing, StepFault::reject(400, "InvalidParameters", "…"));
//! // … `[provision] endpoint = iot.endpoint()`, claim_certificate = iot.claim.cert, …
//! ```

pub mod broker;
pub mod device;
pub mod mqtt;
pub mod registry;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use broker::{Acl, Broker, CSR_TOPIC, provision_topic};
pub use mqtt::{Message, Responder, TestClient};
pub use registry::{
    CertRecord, CertStatus, Counters, FLEET_TEMPLATE, ROTATION_TEMPLATE, Registry, Reply, Step,
    StepFault, Template, TemplateKind, Thing, certificate_id,
};

use crate::pki::{CertKey, KeyAlgorithm, Pki};
use crate::provider::Error;

/// CN of the claim certificate.
pub const CLAIM_CN: &str = "iotcred-claim";
/// CN of the responder's certificate.
pub const RESPONDER_CN: &str = "fakeiot-responder";
/// The CSR subject CN the device rules of the ACL are written for (SPEC §8.1's default subject).
pub const DEVICE_CN: &str = "iotcred";

/// How to start a [`FakeIot`].
#[derive(Clone, Debug)]
pub struct FakeIotOptions {
    /// Topics left out of the claim and device policies (see [`Acl::deny`]).
    pub deny: Vec<String>,
    /// CNs that get the device policy (the CSR subjects). Default `["iotcred"]`.
    pub device_users: Vec<String>,
    /// TCP_NODELAY on the fake's side: mosquitto's `set_tcp_nodelay` and the responder's
    /// socket. Default false (both programs' defaults: Nagle's algorithm on, so a small packet
    /// may wait for the peer's delayed ACK, up to ~40 ms on Linux loopback). The provisioning
    /// benchmark also runs with true, so that the fake adds no such stall of its own.
    pub tcp_nodelay: bool,
}

impl Default for FakeIotOptions {
    fn default() -> Self {
        FakeIotOptions {
            deny: Vec::new(),
            device_users: vec![DEVICE_CN.to_owned()],
            tcp_nodelay: false,
        }
    }
}

/// Time allowed for the broker to listen and the responder to subscribe.
pub const START_LIMIT: Duration = Duration::from_secs(20);

/// The running fake: broker, responder and registry, plus the claim certificate.
#[derive(Debug)]
pub struct FakeIot {
    /// The registry (also the knobs).
    pub registry: Arc<Registry>,
    /// The claim certificate and key (PEM), CN [`CLAIM_CN`].
    pub claim: CertKey,
    /// The responder's certificate and key.
    pub responder_identity: CertKey,
    /// The CA file clients must trust (the test root, which also signed the broker's cert).
    pub ca: PathBuf,
    acl: Acl,
    // Dropped in field order: the responder first, then the broker.
    responder: Option<Responder>,
    broker: Broker,
}

impl FakeIot {
    /// Issues the claim and responder certificates from `pki`, starts mosquitto with its files in
    /// `dir`, and the responder; returns when both are ready (bounded by [`START_LIMIT`]).
    pub fn start(
        pki: &Pki,
        dir: &Path,
        registry: Arc<Registry>,
        options: FakeIotOptions,
    ) -> Result<FakeIot, Error> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        registry.set_ca(pki)?;
        let claim = pki.issue_device("claim", CLAIM_CN, KeyAlgorithm::EcP256)?;
        let responder_identity =
            pki.issue_device("fakeiot-responder", RESPONDER_CN, KeyAlgorithm::EcP256)?;
        let acl = Acl {
            claim_user: CLAIM_CN.to_owned(),
            device_users: options.device_users,
            responder_user: RESPONDER_CN.to_owned(),
            templates: registry.template_names(),
            deny: options.deny,
        };
        let broker = Broker::start_with(dir, pki, &acl, options.tcp_nodelay)?;
        let responder = Responder::start_with(
            broker.port(),
            &pki.ca_cert,
            &responder_identity,
            Arc::clone(&registry),
            START_LIMIT,
            options.tcp_nodelay,
        )
        .map_err(|e| Error::Config(format!("{e}; broker log:\n{}", broker.logs())))?;
        Ok(FakeIot {
            registry,
            claim,
            responder_identity,
            ca: pki.ca_cert.clone(),
            acl,
            responder: Some(responder),
            broker,
        })
    }

    /// `127.0.0.1:PORT` of the broker (for `[provision] endpoint`; the server certificate names
    /// `127.0.0.1` and `localhost`).
    pub fn endpoint(&self) -> String {
        self.broker.addr().to_string()
    }

    /// The broker's port.
    pub fn port(&self) -> u16 {
        self.broker.port()
    }

    /// Kills the broker: every connection (the agent's too) breaks at once.
    pub fn kill_broker(&mut self) {
        self.broker.kill();
    }

    /// Starts the broker again on the same port and waits until the responder has subscribed
    /// again.
    pub fn restart_broker(&mut self) -> Result<(), Error> {
        let generation = self.responder().generation();
        self.broker.restart()?;
        self.wait_responder(generation + 1)
    }

    /// Replaces the denied topics and restarts the broker with the new ACL.
    pub fn set_deny(&mut self, deny: &[&str]) -> Result<(), Error> {
        self.acl.deny = deny.iter().map(|s| (*s).to_owned()).collect();
        let generation = self.responder().generation();
        self.broker.set_acl(&self.acl)?;
        self.wait_responder(generation + 1)
    }

    fn responder(&self) -> &Responder {
        self.responder.as_ref().expect("responder present")
    }

    fn wait_responder(&self, generation: u64) -> Result<(), Error> {
        if self.responder().wait_subscribed(generation, START_LIMIT) {
            Ok(())
        } else {
            Err(Error::Config(format!(
                "the responder did not resubscribe within {START_LIMIT:?}; broker log:\n{}",
                self.broker.logs()
            )))
        }
    }

    /// The broker's log (connections, denials) so far.
    pub fn broker_logs(&self) -> String {
        self.broker.logs()
    }

    /// A blocking MQTT client authenticated with `identity` (e.g. [`FakeIot::claim`]).
    pub fn client(&self, identity: &CertKey, client_id: &str) -> Result<TestClient, Error> {
        TestClient::connect(self.port(), &self.ca, identity, client_id, START_LIMIT)
    }
}

impl Drop for FakeIot {
    fn drop(&mut self) {
        self.responder.take();
    }
}
