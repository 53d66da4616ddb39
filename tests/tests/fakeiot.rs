//! Self-tests of the fake AWS IoT (tests/src/fakeiot): real mosquitto, the responder, the ACL
//! and the registry check of the fake credentials provider, driven by an MQTT client of the
//! fixture (rumqttc) and a plain mTLS HTTP client.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use iotcred_tests::fakeiot::{
    CSR_TOPIC, CertStatus, FLEET_TEMPLATE, FakeIot, FakeIotOptions, Message, Registry, Step,
    StepFault, TestClient, provision_topic,
};
use iotcred_tests::{BlockingProvider, CertKey, Pki};
use rcgen::{
    CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ECDSA_P256_SHA256,
    PublicKeyData as _,
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const WAIT: Duration = Duration::from_secs(20);

struct Fixture {
    _dir: tempfile::TempDir,
    pki: Pki,
    registry: Arc<Registry>,
    iot: FakeIot,
}

fn fixture(options: FakeIotOptions) -> Fixture {
    let (dir, pki) = Pki::generate_temp("unused").expect("PKI");
    let registry = Registry::new();
    let iot =
        FakeIot::start(&pki, &dir.path().join("iot"), registry.clone(), options).expect("fake IoT");
    Fixture {
        _dir: dir,
        pki,
        registry,
        iot,
    }
}

fn csr(key: &KeyPair, cn: &str) -> String {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.serialize_request(key).expect("CSR").pem().expect("PEM")
}

/// Subscribes to both reply topics of `request` (checking the SUBACKs granted QoS 1).
fn subscribe_replies(c: &mut TestClient, request: &str) {
    for suffix in ["accepted", "rejected"] {
        let codes = c
            .subscribe(&format!("{request}/{suffix}"), WAIT)
            .expect("subscribe");
        assert_eq!(codes.len(), 1);
        assert!(codes[0].contains("AtLeastOnce"), "SUBACK {codes:?}");
    }
}

fn call(c: &mut TestClient, request: &str, body: &Value) -> Message {
    c.publish(request, body.to_string().as_bytes(), WAIT)
        .expect("publish");
    c.recv(WAIT).expect("a reply")
}

fn json_of(m: &Message) -> Value {
    serde_json::from_slice(&m.payload).expect("JSON reply")
}

/// CreateCertificateFromCsr with a fresh key; returns (key, accepted reply).
fn create_cert(f: &Fixture, c: &mut TestClient) -> (KeyPair, Value) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let reply = call(
        c,
        CSR_TOPIC,
        &json!({"certificateSigningRequest": csr(&key, "iotcred")}),
    );
    assert_eq!(reply.topic, format!("{CSR_TOPIC}/accepted"), "{reply:?}");
    let _ = f;
    (key, json_of(&reply))
}

#[test]
fn create_from_csr_is_signed_by_the_ca_and_carries_the_csr_key() {
    let f = fixture(FakeIotOptions::default());
    let mut c = f.iot.client(&f.iot.claim, "claim-1").expect("connect");
    subscribe_replies(&mut c, CSR_TOPIC);
    let (key, v) = create_cert(&f, &mut c);
    let id = v["certificateId"].as_str().unwrap();
    assert_eq!(id.len(), 64);
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
    assert!(!v["certificateOwnershipToken"].as_str().unwrap().is_empty());
    let pem = v["certificatePem"].as_str().unwrap();

    // Verified by an independent implementation (openssl), for client authentication.
    let file = f.pki.dir.join("issued.pem");
    std::fs::write(&file, pem).unwrap();
    let out = Command::new("openssl")
        .args(["verify", "-purpose", "sslclient", "-CAfile"])
        .arg(&f.pki.ca_cert)
        .arg(&file)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The certificate carries the CSR's key, and its id is the SHA-256 of its DER.
    let der = rustls_pki_types::pem::PemObject::from_pem_slice(pem.as_bytes())
        .map(|c: rustls_pki_types::CertificateDer<'_>| c.to_vec())
        .unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    assert_eq!(
        cert.public_key().raw,
        key.subject_public_key_info().as_slice()
    );
    assert_eq!(iotcred_tests::fakeiot::certificate_id(&der), id);
    let rec = f.registry.certificate(id).expect("registered");
    assert_eq!(rec.status, CertStatus::PendingActivation);
    assert_eq!(f.registry.counters().csr_requests, 1);
}

#[test]
fn register_thing_activates_and_rejects_an_expired_token() {
    let f = fixture(FakeIotOptions::default());
    let mut c = f.iot.client(&f.iot.claim, "claim-2").expect("connect");
    let reg_topic = provision_topic(FLEET_TEMPLATE);
    subscribe_replies(&mut c, CSR_TOPIC);
    subscribe_replies(&mut c, &reg_topic);

    // An expired token: rejected with AWS's shape.
    f.registry.set_token_lifetime(0);
    let (_, v) = create_cert(&f, &mut c);
    let r = call(
        &mut c,
        &reg_topic,
        &json!({"certificateOwnershipToken": v["certificateOwnershipToken"],
                "parameters": {"SerialNumber": "0042"}}),
    );
    assert_eq!(r.topic, format!("{reg_topic}/rejected"));
    let body = json_of(&r);
    assert_eq!(body["statusCode"], 400);
    assert_eq!(body["errorCode"], "InvalidCertificateOwnershipToken");
    assert!(body["errorMessage"].as_str().is_some_and(|m| !m.is_empty()));
    assert_eq!(body.as_object().unwrap().len(), 3, "{body}");

    // A valid token, a missing parameter, then the right one.
    f.registry.set_token_lifetime(3600);
    let (_, v) = create_cert(&f, &mut c);
    let token = v["certificateOwnershipToken"].clone();
    let r = call(
        &mut c,
        &reg_topic,
        &json!({"certificateOwnershipToken": token, "parameters": {}}),
    );
    assert_eq!(json_of(&r)["statusCode"], 400);
    let r = call(
        &mut c,
        &reg_topic,
        &json!({"certificateOwnershipToken": token, "parameters": {"SerialNumber": "0042"}}),
    );
    assert_eq!(r.topic, format!("{reg_topic}/accepted"), "{r:?}");
    let body = json_of(&r);
    assert_eq!(body["thingName"], "gw-0042");
    assert_eq!(body["deviceConfiguration"]["region"], "eu-west-1");
    let id = v["certificateId"].as_str().unwrap();
    assert_eq!(
        f.registry.certificate(id).unwrap().status,
        CertStatus::Active
    );
    assert_eq!(f.registry.active_certificates_of("gw-0042").len(), 1);
}

#[test]
fn a_fault_knob_rejects_with_the_given_body() {
    let f = fixture(FakeIotOptions::default());
    let mut c = f.iot.client(&f.iot.claim, "claim-3").expect("connect");
    subscribe_replies(&mut c, CSR_TOPIC);
    f.registry.push_fault(
        Step::CreateCertificateFromCsr,
        StepFault::reject(429, "ThrottlingException", "Rate exceeded"),
    );
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let r = call(
        &mut c,
        CSR_TOPIC,
        &json!({"certificateSigningRequest": csr(&key, "iotcred")}),
    );
    assert_eq!(r.topic, format!("{CSR_TOPIC}/rejected"));
    assert_eq!(
        json_of(&r),
        json!({"statusCode": 429, "errorCode": "ThrottlingException", "errorMessage": "Rate exceeded"})
    );
    // One-shot: the next one is accepted. A bad CSR is InvalidCSR.
    create_cert(&f, &mut c);
    let r = call(
        &mut c,
        CSR_TOPIC,
        &json!({"certificateSigningRequest": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"}),
    );
    assert_eq!(json_of(&r)["errorCode"], "InvalidCSR");
}

#[test]
fn a_denied_publish_gets_no_reply() {
    let reg_topic = provision_topic(FLEET_TEMPLATE);
    let f = fixture(FakeIotOptions {
        deny: vec![reg_topic.clone()],
        ..FakeIotOptions::default()
    });
    let mut c = f.iot.client(&f.iot.claim, "claim-4").expect("connect");
    subscribe_replies(&mut c, CSR_TOPIC);
    subscribe_replies(&mut c, &reg_topic);
    // mosquitto acknowledges the denied publish (QoS 1) and drops it, as AWS IoT does.
    c.publish(
        &reg_topic,
        json!({"certificateOwnershipToken": "x", "parameters": {}})
            .to_string()
            .as_bytes(),
        WAIT,
    )
    .expect("PUBACK for the denied publish");
    // Messages of one connection are delivered in order: once the reply to a later, allowed
    // request is in, the denied one would have been seen by the responder — it was not.
    let (_, _) = create_cert(&f, &mut c);
    assert_eq!(f.registry.counters().register_requests, 0);
    assert_eq!(f.registry.counters().csr_requests, 1);
}

#[test]
fn a_dropped_step_counts_but_answers_nothing() {
    let f = fixture(FakeIotOptions::default());
    let mut c = f.iot.client(&f.iot.claim, "claim-5").expect("connect");
    subscribe_replies(&mut c, CSR_TOPIC);
    f.registry
        .push_fault(Step::CreateCertificateFromCsr, StepFault::Drop);
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    c.publish(
        CSR_TOPIC,
        json!({"certificateSigningRequest": csr(&key, "iotcred")})
            .to_string()
            .as_bytes(),
        WAIT,
    )
    .unwrap();
    assert!(f.registry.wait_counters(WAIT, |c| c.csr_requests == 1));
    // The next request's reply is the first message: the dropped one had none.
    let (_, v) = create_cert(&f, &mut c);
    assert!(
        f.registry
            .certificate(v["certificateId"].as_str().unwrap())
            .is_some()
    );
    assert_eq!(f.registry.counters().csr_accepted, 1);
}

#[test]
fn the_broker_can_be_killed_and_restarted_on_the_same_port() {
    let mut f = fixture(FakeIotOptions::default());
    let port = f.iot.port();
    let mut c = f.iot.client(&f.iot.claim, "claim-6").expect("connect");
    subscribe_replies(&mut c, CSR_TOPIC);
    f.iot.kill_broker();
    // The client sees its connection break.
    assert!(c.recv(WAIT).is_none());
    f.iot.restart_broker().expect("restart");
    assert_eq!(f.iot.port(), port);
    let mut c = f.iot.client(&f.iot.claim, "claim-6b").expect("reconnect");
    subscribe_replies(&mut c, CSR_TOPIC);
    create_cert(&f, &mut c);
}

#[test]
fn wrong_public_key_knob_issues_for_another_key() {
    let f = fixture(FakeIotOptions::default());
    let mut c = f.iot.client(&f.iot.claim, "claim-7").expect("connect");
    subscribe_replies(&mut c, CSR_TOPIC);
    f.registry.set_wrong_public_key(true);
    let (key, v) = create_cert(&f, &mut c);
    let rec = f
        .registry
        .certificate(v["certificateId"].as_str().unwrap())
        .unwrap();
    assert_ne!(rec.public_key, key.subject_public_key_info());
    assert_eq!(rec.csr_public_key, key.subject_public_key_info());
}

/// One GET of the credentials route over mTLS; returns (status, body).
fn provider_get(
    provider: &BlockingProvider,
    ca: &Path,
    id: &CertKey,
    thing: &str,
) -> (u16, String) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tls = iotcred_tests::fakeiot::mqtt::tls_config(ca, id).unwrap();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
        let tcp = tokio::net::TcpStream::connect(provider.addr()).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let mut s = connector.connect(name, tcp).await.unwrap();
        let req = format!(
            "GET /role-aliases/GatewayRole/credentials HTTP/1.1\r\nHost: localhost\r\nx-amzn-iot-thingname: {thing}\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await;
        let text = String::from_utf8_lossy(&out).into_owned();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
        (status, body)
    })
}

#[test]
fn provider_checks_the_registry() {
    let f = fixture(FakeIotOptions::default());
    let mut cfg = f.pki.provider_config();
    cfg.registry = Some(f.registry.clone());
    let provider = BlockingProvider::start(cfg).expect("provider");

    let mut c = f.iot.client(&f.iot.claim, "claim-8").expect("connect");
    let reg_topic = provision_topic(FLEET_TEMPLATE);
    subscribe_replies(&mut c, CSR_TOPIC);
    subscribe_replies(&mut c, &reg_topic);
    let (key, v) = create_cert(&f, &mut c);
    let id = CertKey {
        cert: f.pki.dir.join("new.pem"),
        key: f.pki.dir.join("new.key"),
    };
    std::fs::write(&id.cert, v["certificatePem"].as_str().unwrap()).unwrap();
    std::fs::write(&id.key, key.serialize_pem()).unwrap();

    // PENDING_ACTIVATION: 403.
    let (status, body) = provider_get(&provider, &f.pki.ca_cert, &id, "gw-7");
    assert_eq!(status, 403, "{body}");
    assert_eq!(body, r#"{"message":"Access Denied"}"#);

    let r = call(
        &mut c,
        &reg_topic,
        &json!({"certificateOwnershipToken": v["certificateOwnershipToken"],
                "parameters": {"SerialNumber": "7"}}),
    );
    assert_eq!(r.topic, format!("{reg_topic}/accepted"));
    // ACTIVE and attached: 200; another thing name: 403.
    let (status, body) = provider_get(&provider, &f.pki.ca_cert, &id, "gw-7");
    assert_eq!(status, 200, "{body}");
    let (status, _) = provider_get(&provider, &f.pki.ca_cert, &id, "gw-8");
    assert_eq!(status, 403);
    // The claim certificate is not in the registry: 403.
    let (status, _) = provider_get(&provider, &f.pki.ca_cert, &f.iot.claim, "gw-7");
    assert_eq!(status, 403);
    // Frozen: a certificate activated later is refused, the known one still served.
    f.registry.freeze_provider();
    let (_, v2) = create_cert(&f, &mut c);
    let r = call(
        &mut c,
        &reg_topic,
        &json!({"certificateOwnershipToken": v2["certificateOwnershipToken"],
                "parameters": {"SerialNumber": "7"}}),
    );
    assert_eq!(r.topic, format!("{reg_topic}/accepted"));
    assert_eq!(f.registry.active_certificates_of("gw-7").len(), 2);
    let (status, _) = provider_get(&provider, &f.pki.ca_cert, &id, "gw-7");
    assert_eq!(status, 200);
    // Deactivated: 403.
    f.registry
        .set_status(v["certificateId"].as_str().unwrap(), CertStatus::Inactive);
    let (status, _) = provider_get(&provider, &f.pki.ca_cert, &id, "gw-7");
    assert_eq!(status, 403);
    let checks = f.registry.counters();
    assert_eq!(checks.provider_checks, 6);
    assert_eq!(checks.provider_refusals, 4);
}

#[test]
fn mosquitto_clients_interoperate() {
    // mosquitto's own client as a second, independent implementation against the fixture.
    if !Path::new("/usr/bin/mosquitto_pub").exists() {
        eprintln!("mosquitto_pub not installed (package mosquitto-clients): skipped");
        return;
    }
    let f = fixture(FakeIotOptions::default());
    let mut sub = f.iot.client(&f.iot.claim, "claim-9").expect("connect");
    subscribe_replies(&mut sub, CSR_TOPIC);
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let payload = json!({"certificateSigningRequest": csr(&key, "iotcred")}).to_string();
    let out = Command::new("/usr/bin/mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &f.iot.port().to_string(),
            "-q",
            "1",
        ])
        .args(["-i", "claim-9-pub", "-t", CSR_TOPIC, "-m", &payload])
        .arg("--cafile")
        .arg(&f.pki.ca_cert)
        .arg("--cert")
        .arg(&f.iot.claim.cert)
        .arg("--key")
        .arg(&f.iot.claim.key)
        .output()
        .expect("mosquitto_pub");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(f.registry.wait_counters(WAIT, |c| c.csr_accepted == 1));
}
