//! The agent's MQTT request/response client (`iotcred_agent::mqtt`) against a real mosquitto:
//! a TLS listener on 127.0.0.1 that requires client certificates, the certificate CN as the
//! user name and an ACL file playing the policies, and a small responder (rumqttc) that answers
//! requests on `<topic>/accepted` or `<topic>/rejected` as AWS does.
//!
//! The responder reads instructions from the request itself: `"reject": true` answers on
//! `/rejected`, `"not_object": true` answers `[1,2]`, `"stray_on": "<topic>"` first publishes a
//! message on another topic the device is subscribed to, `"kick": "<client id>"` connects a
//! second client with the device's client id so the broker closes the device's connection.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use iotcred_agent::exit::Exit;
use iotcred_agent::mqtt::{MqttError, MqttSession, MqttTarget, Waiting};
use iotcred_agent::net::{Proxy, TlsServer};
use iotcred_tests::sts::ConnectProxy;
use iotcred_tests::{CertKey, KeyAlgorithm, Pki};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use rustls::ClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};

const CSR_TOPIC: &str = "$aws/certificates/create-from-csr/json";
const PROVISION_TOPIC: &str = "$aws/provisioning-templates/GatewayTemplate/provision/json";
/// The device may subscribe to the replies but not publish the request (mosquitto drops such a
/// publish silently and still acknowledges it, as a broker may).
const DENIED_TOPIC: &str = "$aws/denied/json";
/// The device may publish the request but not receive the replies.
const NOSUB_TOPIC: &str = "$aws/nosub/json";
/// Bound of every wait in the tests that expect an answer (a bound, not a timing assertion).
const BOUND: Duration = Duration::from_secs(20);

/// A mosquitto process, killed on drop.
struct Mosquitto {
    child: Child,
    port: u16,
    log: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Mosquitto {
    /// Starts mosquitto with a TLS listener on an ephemeral port of 127.0.0.1 (server cert from
    /// the PKI) and the ACL of this file, and waits until it says it is running.
    fn start(pki: &Pki) -> Mosquitto {
        let dir = tempfile::tempdir().unwrap();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let thing = &pki.thing_name;
        let acl = format!(
            "user responder\n\
             topic readwrite $aws/#\n\
             \n\
             user {thing}\n\
             topic write {CSR_TOPIC}\n\
             topic read {CSR_TOPIC}/+\n\
             topic write $aws/provisioning-templates/+/provision/json\n\
             topic read $aws/provisioning-templates/+/provision/json/+\n\
             topic read {DENIED_TOPIC}/+\n\
             topic write {NOSUB_TOPIC}\n"
        );
        let acl_path = dir.path().join("acl");
        std::fs::write(&acl_path, acl).unwrap();
        let mut conf = format!(
            "per_listener_settings false\n\
             allow_anonymous false\n\
             persistence false\n\
             log_dest stderr\n\
             log_type error\nlog_type warning\nlog_type notice\nlog_type information\n\
             connection_messages true\n\
             acl_file {}\n\
             listener {port} 127.0.0.1\n\
             cafile {}\n\
             certfile {}\n\
             keyfile {}\n\
             require_certificate true\n\
             use_identity_as_username true\n",
            acl_path.display(),
            pki.ca_cert.display(),
            pki.server.cert.display(),
            pki.server.key.display(),
        );
        // As root, mosquitto would switch to the `mosquitto` user, which cannot read the
        // test's 0600 key files.
        // SAFETY: getuid has no preconditions.
        if unsafe { libc::getuid() } == 0 {
            conf.push_str("user root\n");
        }
        let conf_path = dir.path().join("mosquitto.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let mut child = Command::new("/usr/sbin/mosquitto")
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start /usr/sbin/mosquitto (Debian package mosquitto)");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains(" running") {
                    let _ = ready_tx.send(());
                }
                log2.lock().unwrap().push(line);
            }
        });
        let m = Mosquitto {
            child,
            port,
            log,
            _dir: dir,
        };
        if ready_rx.recv_timeout(BOUND).is_err() {
            panic!("mosquitto did not start: {:#?}", m.log());
        }
        m
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

fn certs(path: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// A rustls client configuration (ring) trusting `ca`, with the client certificate `id`.
fn tls(ca: &Path, id: &CertKey) -> Arc<ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(ca) {
        roots.add(c).unwrap();
    }
    let key = PrivateKeyDer::from_pem_file(&id.key).unwrap();
    Arc::new(
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(certs(&id.cert), key)
            .unwrap(),
    )
}

/// Starts the responder and waits for its subscriptions.
async fn responder(pki: &Pki, port: u16) -> tokio::task::JoinHandle<()> {
    let id = pki
        .issue_device("responder", "responder", KeyAlgorithm::EcP256)
        .unwrap();
    let tls_config = tls(&pki.ca_cert, &id);
    let mut opts = MqttOptions::new("responder", "127.0.0.1", port);
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        tls_config.clone(),
    )));
    opts.set_max_packet_size(256 * 1024, 256 * 1024);
    let (client, mut eventloop) = AsyncClient::new(opts, 16);
    for t in [
        CSR_TOPIC,
        "$aws/provisioning-templates/+/provision/json",
        DENIED_TOPIC,
        NOSUB_TOPIC,
    ] {
        client.subscribe(t, QoS::AtLeastOnce).await.unwrap();
    }
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut ready_tx = Some(ready_tx);
        let mut subacks = 0;
        let mut kicked = Vec::new();
        loop {
            let ev = match eventloop.poll().await {
                Ok(ev) => ev,
                Err(e) => panic!("responder: {e}"),
            };
            match ev {
                Event::Incoming(Packet::SubAck(_)) => {
                    subacks += 1;
                    if subacks == 4 {
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                }
                Event::Incoming(Packet::Publish(p)) => {
                    let req: Value = serde_json::from_slice(&p.payload).unwrap_or_default();
                    if let Some(stray) = req["stray_on"].as_str() {
                        let stray = format!("{stray}/accepted");
                        let body = json!({"stray": true}).to_string();
                        client
                            .publish(stray, QoS::AtLeastOnce, false, body)
                            .await
                            .unwrap();
                    }
                    if let Some(victim) = req["kick"].as_str() {
                        kicked.push(take_over(victim, port, tls_config.clone()).await);
                        continue;
                    }
                    let (suffix, body) = if req["reject"] == true {
                        (
                            "rejected",
                            json!({"statusCode": 400, "errorCode": "InvalidCSR",
                                   "errorMessage": "The CSR is not valid."}),
                        )
                    } else if req["not_object"] == true {
                        ("accepted", json!([1, 2]))
                    } else {
                        (
                            "accepted",
                            json!({"certificateId": "c0ffee", "request_topic": p.topic.clone(),
                                   "echo": req}),
                        )
                    };
                    client
                        .publish(
                            format!("{}/{suffix}", p.topic),
                            QoS::AtLeastOnce,
                            false,
                            body.to_string(),
                        )
                        .await
                        .unwrap();
                }
                _ => {}
            }
        }
    });
    tokio::time::timeout(BOUND, ready_rx)
        .await
        .expect("responder subscribed")
        .unwrap();
    task
}

/// Connects a second client with `client_id` (the broker then closes the first one) and keeps
/// its event loop running.
async fn take_over(
    client_id: &str,
    port: u16,
    tls_config: Arc<ClientConfig>,
) -> (AsyncClient, tokio::task::JoinHandle<()>) {
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        tls_config,
    )));
    let (client, mut eventloop) = AsyncClient::new(opts, 4);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut tx = Some(tx);
        while let Ok(ev) = eventloop.poll().await {
            if let Event::Incoming(Packet::ConnAck(_)) = ev {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(());
                }
            }
        }
    });
    let _ = tokio::time::timeout(BOUND, rx).await;
    (client, task)
}

struct Setup {
    pki: Pki,
    broker: Mosquitto,
    _pki_dir: tempfile::TempDir,
    _responder: tokio::task::JoinHandle<()>,
}

impl Setup {
    async fn new() -> Setup {
        let (pki_dir, pki) = Pki::generate_temp("gateway-0042").unwrap();
        let broker = Mosquitto::start(&pki);
        let responder = responder(&pki, broker.port).await;
        Setup {
            pki,
            broker,
            _pki_dir: pki_dir,
            _responder: responder,
        }
    }

    fn target(&self, timeout: Duration) -> MqttTarget {
        MqttTarget {
            server: TlsServer::parse(&format!("127.0.0.1:{}", self.broker.port), 8883).unwrap(),
            proxy: None,
            client_id: "iotcred-0123456789abcdef".into(),
            timeout,
        }
    }

    fn device_tls(&self) -> Arc<ClientConfig> {
        tls(&self.pki.ca_cert, &self.pki.device_ec)
    }

    async fn session(&self, timeout: Duration) -> MqttSession {
        match MqttSession::connect(&self.target(timeout), self.device_tls()).await {
            Ok(s) => s,
            Err(e) => panic!("connect: {e}; broker log: {:#?}", self.broker.log()),
        }
    }
}

#[tokio::test]
async fn accepted_reply_is_returned_and_other_topics_are_ignored() {
    let s = Setup::new().await;
    let mut session = s.session(BOUND).await;
    let reply = session
        .call(CSR_TOPIC, &json!({"certificateSigningRequest": "CSR"}))
        .await
        .unwrap();
    assert_eq!(reply["certificateId"], "c0ffee");
    assert_eq!(reply["request_topic"], CSR_TOPIC);
    assert_eq!(reply["echo"]["certificateSigningRequest"], "CSR");
    // Second call on the same connection; the responder first publishes on the first call's
    // reply topic (still subscribed), which the call must ignore.
    let reply = session
        .call(
            PROVISION_TOPIC,
            &json!({"certificateOwnershipToken": "T", "stray_on": CSR_TOPIC}),
        )
        .await
        .unwrap();
    assert_eq!(reply["request_topic"], PROVISION_TOPIC);
    assert_eq!(reply["echo"]["certificateOwnershipToken"], "T");
    session.close().await;
}

#[tokio::test]
async fn rejected_reply_carries_aws_fields_and_exits_3() {
    let s = Setup::new().await;
    let mut session = s.session(BOUND).await;
    let e = session
        .call(
            PROVISION_TOPIC,
            &json!({"certificateOwnershipToken": "SECRET-OWNERSHIP-TOKEN", "reject": true}),
        )
        .await
        .unwrap_err();
    let MqttError::Rejected {
        topic,
        status_code,
        error_code,
        error_message,
    } = &e
    else {
        panic!("{e:?}")
    };
    assert_eq!(topic, PROVISION_TOPIC);
    assert_eq!(*status_code, Some(400));
    assert_eq!(error_code, "InvalidCSR");
    assert_eq!(error_message, "The CSR is not valid.");
    assert_eq!(e.exit(), Exit::Permanent);
    let shown = format!("{e} {e:?}");
    assert!(shown.contains("InvalidCSR") && shown.contains("The CSR is not valid."));
    assert!(!shown.contains("SECRET-OWNERSHIP-TOKEN"), "{shown}");
    session.close().await;
}

#[tokio::test]
async fn reply_that_is_not_an_object_is_malformed() {
    let s = Setup::new().await;
    let mut session = s.session(BOUND).await;
    let e = session
        .call(CSR_TOPIC, &json!({"not_object": true}))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, MqttError::Malformed { topic, .. } if topic == &format!("{CSR_TOPIC}/accepted")),
        "{e:?}"
    );
    assert_eq!(e.exit(), Exit::Transient);
}

#[tokio::test]
async fn publish_denied_by_the_policy_times_out_naming_the_topic() {
    let s = Setup::new().await;
    let mut session = s.session(Duration::from_secs(2)).await;
    let e = session
        .call(DENIED_TOPIC, &json!({"certificateSigningRequest": "CSR"}))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, MqttError::Timeout { topic, waiting_for: Waiting::Reply, seconds: 2 } if topic == DENIED_TOPIC),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains(&format!(
            "no reply on {DENIED_TOPIC}/accepted or /rejected within 2 s"
        )),
        "{msg}"
    );
    assert!(
        msg.contains(&format!("iot:Publish on {DENIED_TOPIC}")),
        "{msg}"
    );
    assert_eq!(e.exit(), Exit::Transient);
}

/// mosquitto's ACL file does not check subscriptions: it grants them (SUBACK success) and
/// then delivers nothing the ACL denies, as a broker may. The call times out on the reply,
/// naming the reply topics' actions. (A SUBACK failure code, as AWS IoT answers, gives
/// `MqttError::SubscribeRefused`.)
#[tokio::test]
async fn reply_topics_denied_by_the_policy_time_out_naming_the_actions() {
    let s = Setup::new().await;
    let mut session = s.session(Duration::from_secs(2)).await;
    let e = session.call(NOSUB_TOPIC, &json!({})).await.unwrap_err();
    assert!(
        matches!(&e, MqttError::Timeout { topic, waiting_for: Waiting::Reply, .. } if topic == NOSUB_TOPIC),
        "{e:?}"
    );
    assert!(
        e.to_string()
            .contains("iot:Subscribe/iot:Receive on its reply topics"),
        "{e}"
    );
    assert_eq!(e.exit(), Exit::Transient);
}

#[tokio::test]
async fn broker_closing_the_connection_mid_call_names_the_topic() {
    let s = Setup::new().await;
    let target = s.target(BOUND);
    let mut session = MqttSession::connect(&target, s.device_tls()).await.unwrap();
    let e = session
        .call(CSR_TOPIC, &json!({"kick": target.client_id}))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, MqttError::Closed { topic, waiting_for: Waiting::Reply } if topic == CSR_TOPIC),
        "{e:?}"
    );
    assert!(e.to_string().contains("policy"), "{e}");
    assert_eq!(e.exit(), Exit::Transient);
    // The session is finished: no silent reconnect.
    let e = session.call(CSR_TOPIC, &json!({})).await.unwrap_err();
    assert!(matches!(e, MqttError::Protocol { .. }), "{e:?}");
    session.close().await;
}

/// Connects with `tls`, which must fail at the TLS layer (exit 4); returns the message.
async fn tls_failure(s: &Setup, tls: Arc<ClientConfig>) -> String {
    let e = MqttSession::connect(&s.target(BOUND), tls)
        .await
        .unwrap_err();
    assert!(matches!(e, MqttError::Tls(_)), "{e:?}");
    assert_eq!(e.exit(), Exit::Transient);
    e.to_string()
}

#[tokio::test]
async fn untrusted_broker_certificate_is_a_tls_error() {
    let s = Setup::new().await;
    let msg = tls_failure(&s, tls(&s.pki.untrusted_ca_cert, &s.pki.device_ec)).await;
    assert!(
        msg.contains("not trusted") && msg.contains("[provision] ca"),
        "{msg}"
    );
}

#[tokio::test]
async fn client_certificate_the_broker_does_not_trust_is_a_tls_error() {
    let s = Setup::new().await;
    let msg = tls_failure(&s, tls(&s.pki.ca_cert, &s.pki.untrusted_device)).await;
    assert!(
        msg.contains("rejected the client certificate") && msg.contains("ACTIVE"),
        "{msg}"
    );
}

#[tokio::test]
async fn call_through_an_http_connect_proxy() {
    let s = Setup::new().await;
    let proxy = ConnectProxy::start();
    let mut target = s.target(BOUND);
    target.proxy = Some(Proxy::parse(&proxy.url()).unwrap());
    let mut session = MqttSession::connect(&target, s.device_tls()).await.unwrap();
    let reply = session
        .call(CSR_TOPIC, &json!({"certificateSigningRequest": "CSR"}))
        .await
        .unwrap();
    assert_eq!(reply["certificateId"], "c0ffee");
    session.close().await;
    assert_eq!(
        proxy.seen(),
        vec![format!("CONNECT 127.0.0.1:{} HTTP/1.1", s.broker.port)]
    );
}

#[tokio::test]
async fn unreachable_proxy_is_named() {
    let s = Setup::new().await;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut target = s.target(BOUND);
    target.proxy = Some(Proxy::parse(&format!("http://127.0.0.1:{port}")).unwrap());
    let e = MqttSession::connect(&target, s.device_tls())
        .await
        .unwrap_err();
    assert!(
        matches!(&e, MqttError::Proxy { proxy, .. } if proxy == &format!("127.0.0.1:{port}")),
        "{e:?}"
    );
    assert_eq!(e.exit(), Exit::Transient);
}
