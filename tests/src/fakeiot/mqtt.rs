//! MQTT over the test PKI with rumqttc: the responder (AWS IoT's side of the fleet-provisioning
//! API) and a small blocking client for the fixture's own tests.

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, Client, Connection, Event, EventLoop, MqttOptions, Packet, QoS, SubscribeFilter,
    TlsConfiguration, Transport,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use tokio::sync::watch;

use super::broker::CSR_TOPIC;
use super::registry::{Registry, Reply};
use crate::pki::CertKey;
use crate::provider::Error;

/// A rustls client configuration (ring) trusting `ca` and presenting `identity`.
pub fn tls_config(ca: &Path, identity: &CertKey) -> Result<rustls::ClientConfig, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca)
        .map_err(|e| Error::Tls(format!("reading {}: {e}", ca.display())))?
    {
        let c = c.map_err(|e| Error::Tls(format!("reading {}: {e}", ca.display())))?;
        roots.add(c).map_err(|e| Error::Tls(e.to_string()))?;
    }
    let (chain, key) = crate::provider::load_identity(&identity.cert, &identity.key)?;
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| Error::Tls(e.to_string()))
}

fn options(client_id: &str, port: u16, tls: rustls::ClientConfig) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
    o.set_clean_session(true)
        .set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(256 * 1024, 256 * 1024)
        .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(tls),
        )));
    o
}

/// The RegisterThing template named by a request topic.
pub fn template_of(topic: &str) -> Option<&str> {
    topic
        .strip_prefix("$aws/provisioning-templates/")?
        .strip_suffix("/provision/json")
        .filter(|t| !t.is_empty() && !t.contains('/'))
}

/// A counter with a condition variable: the responder's completed subscriptions.
#[derive(Debug, Default)]
struct Generation {
    n: Mutex<u64>,
    cv: Condvar,
}

/// The responder: subscribes to the two request topics (again after every reconnect), answers
/// each request from the [`Registry`] on `<topic>/accepted` or `<topic>/rejected`, or not at all.
/// Runs on a runtime of its own (one thread).
#[derive(Debug)]
pub struct Responder {
    runtime: Option<tokio::runtime::Runtime>,
    stop: watch::Sender<bool>,
    subscribed: Arc<Generation>,
}

impl Responder {
    /// Connects to the broker on `127.0.0.1:port` with `identity` and waits (at most `limit`)
    /// until its subscriptions are acknowledged.
    pub fn start(
        port: u16,
        ca: &Path,
        identity: &CertKey,
        registry: Arc<Registry>,
        limit: Duration,
    ) -> Result<Responder, Error> {
        Responder::start_with(port, ca, identity, registry, limit, false)
    }

    /// [`Responder::start`], with TCP_NODELAY on its socket set to `tcp_nodelay`.
    pub fn start_with(
        port: u16,
        ca: &Path,
        identity: &CertKey,
        registry: Arc<Registry>,
        limit: Duration,
        tcp_nodelay: bool,
    ) -> Result<Responder, Error> {
        let tls = tls_config(ca, identity)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fakeiot-responder")
            .enable_all()
            .build()
            .map_err(|e| Error::io("starting a tokio runtime".into(), e))?;
        let (stop, stop_rx) = watch::channel(false);
        let subscribed = Arc::new(Generation::default());
        let gen2 = Arc::clone(&subscribed);
        runtime.spawn(async move {
            let (client, mut el) = AsyncClient::new(options("fakeiot-responder", port, tls), 64);
            let mut net = el.network_options();
            net.set_tcp_nodelay(tcp_nodelay);
            el.set_network_options(net);
            run(client, el, registry, stop_rx, gen2).await;
        });
        let r = Responder {
            runtime: Some(runtime),
            stop,
            subscribed,
        };
        if !r.wait_subscribed(1, limit) {
            return Err(Error::Config(format!(
                "the responder did not subscribe within {limit:?}"
            )));
        }
        Ok(r)
    }

    /// How many times the responder has (re)subscribed.
    pub fn generation(&self) -> u64 {
        *self.subscribed.n.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until the responder has subscribed at least `n` times (bounded).
    pub fn wait_subscribed(&self, n: u64, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut g = self.subscribed.n.lock().unwrap_or_else(|p| p.into_inner());
        while *g < n {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return false;
            };
            g = self
                .subscribed
                .cv
                .wait_timeout(g, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.send_replace(true);
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

async fn run(
    client: AsyncClient,
    mut el: EventLoop,
    registry: Arc<Registry>,
    mut stop: watch::Receiver<bool>,
    subscribed: Arc<Generation>,
) {
    loop {
        let ev = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            ev = el.poll() => ev,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                let _ = client.try_subscribe_many([
                    SubscribeFilter::new(CSR_TOPIC.to_owned(), QoS::AtLeastOnce),
                    SubscribeFilter::new(
                        "$aws/provisioning-templates/+/provision/json".to_owned(),
                        QoS::AtLeastOnce,
                    ),
                ]);
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                *subscribed.n.lock().unwrap_or_else(|p| p.into_inner()) += 1;
                subscribed.cv.notify_all();
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let reply = if p.topic == CSR_TOPIC {
                    registry.create_certificate_from_csr(&p.payload)
                } else if let Some(t) = template_of(&p.topic) {
                    registry.register_thing(t, &p.payload)
                } else {
                    Reply::Nothing
                };
                let (suffix, body) = match reply {
                    Reply::Accepted(v) => ("accepted", v),
                    Reply::Rejected(v) => ("rejected", v),
                    Reply::Nothing => continue,
                };
                let _ = client.try_publish(
                    format!("{}/{suffix}", p.topic),
                    QoS::AtLeastOnce,
                    false,
                    body.to_string(),
                );
            }
            Ok(_) => {}
            Err(_) => {
                // The broker is gone (killed by a test) or refused us: rumqttc reconnects on the
                // next poll. Pace the attempts; nothing waits on this delay.
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        }
    }
}

/// A message received by [`TestClient`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
}

/// A blocking MQTT client for tests of the fixture itself.
pub struct TestClient {
    client: Client,
    conn: Connection,
}

impl std::fmt::Debug for TestClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestClient").finish_non_exhaustive()
    }
}

impl TestClient {
    /// Connects to `127.0.0.1:port` with `identity` (bounded by `limit`).
    pub fn connect(
        port: u16,
        ca: &Path,
        identity: &CertKey,
        client_id: &str,
        limit: Duration,
    ) -> Result<TestClient, Error> {
        let tls = tls_config(ca, identity)?;
        let (client, conn) = Client::new(options(client_id, port, tls), 16);
        let mut c = TestClient { client, conn };
        c.wait_event(limit, |e| matches!(e, Event::Incoming(Packet::ConnAck(_))))
            .map_err(|e| Error::Config(format!("MQTT connect: {e}")))?;
        Ok(c)
    }

    fn wait_event(
        &mut self,
        limit: Duration,
        mut pred: impl FnMut(&Event) -> bool,
    ) -> Result<Event, String> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline
                .checked_duration_since(Instant::now())
                .ok_or("timed out")?;
            match self.conn.recv_timeout(left) {
                Ok(Ok(e)) if pred(&e) => return Ok(e),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e.to_string()),
                Err(_) => return Err("timed out".into()),
            }
        }
    }

    /// Subscribes (QoS 1) and waits for the SUBACK; returns its return codes.
    pub fn subscribe(&mut self, topic: &str, limit: Duration) -> Result<Vec<String>, String> {
        self.client
            .subscribe(topic, QoS::AtLeastOnce)
            .map_err(|e| e.to_string())?;
        match self.wait_event(limit, |e| matches!(e, Event::Incoming(Packet::SubAck(_))))? {
            Event::Incoming(Packet::SubAck(s)) => {
                Ok(s.return_codes.iter().map(|c| format!("{c:?}")).collect())
            }
            _ => unreachable!(),
        }
    }

    /// Publishes (QoS 1) and waits for the PUBACK.
    pub fn publish(&mut self, topic: &str, payload: &[u8], limit: Duration) -> Result<(), String> {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.to_vec())
            .map_err(|e| e.to_string())?;
        self.wait_event(limit, |e| matches!(e, Event::Incoming(Packet::PubAck(_))))
            .map(|_| ())
    }

    /// The next message received within `limit`, if any.
    pub fn recv(&mut self, limit: Duration) -> Option<Message> {
        match self.wait_event(limit, |e| matches!(e, Event::Incoming(Packet::Publish(_)))) {
            Ok(Event::Incoming(Packet::Publish(p))) => Some(Message {
                topic: p.topic.clone(),
                payload: p.payload.to_vec(),
            }),
            _ => None,
        }
    }
}
