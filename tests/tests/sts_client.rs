//! The agent's STS client (SPEC §9) against real servers over real TLS: the signature-verifying
//! fake STS (botocore recomputes every signature) and moto's STS. Source credentials come from
//! the fake IoT credentials provider through `iotcred fetch`, so the fake STS checks the
//! signature against the secret the provider really issued. (The ExpiredToken flow through
//! the source role's refresher is tested end to end in `sts_chained.rs`.)

use std::time::Duration;

use iotcred_agent::config::Sts;
use iotcred_agent::net::{HttpsUrl, Proxy};
use iotcred_agent::sts::{AssumeRole, StsClient, StsError};
use iotcred_core::{Credentials, ErrorClass, Secret, UnixTime};
use iotcred_tests::agent::Env;
use iotcred_tests::sts::{ConnectProxy, FakeSts, FakeStsOptions, MotoSts, StsFault};

const ARN: &str = "arn:aws:iam::210987654321:role/GatewayAnalytics";

/// A PKI and the fake IoT credentials provider (with its admin listener, where the fake STS
/// looks the source credentials up).
struct Setup {
    env: Option<Env>,
}

/// The fake provider has its own runtime: it is started and stopped outside the test's workers.
impl Drop for Setup {
    fn drop(&mut self) {
        let env = self.env.take();
        tokio::task::block_in_place(|| drop(env));
    }
}

impl Setup {
    async fn new() -> Setup {
        let env = tokio::task::block_in_place(|| {
            Env::with_provider(|c| c.admin = Some("127.0.0.1:0".parse().unwrap()))
        });
        Setup { env: Some(env) }
    }

    fn env(&self) -> &Env {
        self.env.as_ref().expect("env")
    }

    fn provider_admin(&self) -> Option<std::net::SocketAddr> {
        self.env().provider.admin_addr()
    }

    /// Fresh source credentials from the IoT credentials provider, through `iotcred fetch`.
    async fn source(&self) -> Credentials {
        let env = self.env();
        let cfg = env.config().display().to_string();
        let out = tokio::task::block_in_place(|| env.run(&["fetch", "--config", &cfg]));
        assert_eq!(out.code, 0, "{}", out.stderr);
        let v: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
        let s = |k: &str| v[k].as_str().unwrap().to_string();
        Credentials {
            access_key_id: s("AccessKeyId"),
            secret_access_key: Secret::from(s("SecretAccessKey")),
            session_token: Secret::from(s("Token")),
            expiration: UnixTime::parse_rfc3339(&s("Expiration")).unwrap(),
        }
    }

    fn fake_sts(&self, external_id: Option<&str>) -> FakeSts {
        FakeSts::start(
            &self.env().pki.server,
            &FakeStsOptions {
                provider_admin: self.provider_admin(),
                external_id: external_id.map(str::to_string),
                ..FakeStsOptions::default()
            },
        )
    }

    fn client(&self, url: &str, region: &str, ca: Option<&std::path::Path>) -> StsClient {
        client_with_proxy(url, region, ca.or(Some(&self.env().pki.ca_cert)), None)
    }
}

fn client_with_proxy(
    url: &str,
    region: &str,
    ca: Option<&std::path::Path>,
    proxy: Option<&str>,
) -> StsClient {
    let sts = Sts {
        endpoint: HttpsUrl::parse(url).expect("endpoint"),
        region: region.to_string(),
        ca: ca.map(std::path::Path::to_path_buf),
        proxy: proxy.map(|p| Proxy::parse(p).expect("proxy")),
    };
    StsClient::new(&sts, Duration::from_secs(20)).expect("client")
}

fn role(external_id: Option<&str>) -> AssumeRole {
    AssumeRole {
        source_role: "default".into(),
        role_arn: ARN.into(),
        session_name: "gateway-0042".into(),
        external_id: external_id.map(str::to_string),
        duration_seconds: 3600,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_call_verified_by_botocore_over_one_kept_alive_connection() {
    let s = Setup::new().await;
    let sts = s.fake_sts(Some("ext-0042"));
    let client = s.client(&sts.endpoint(), "eu-west-1", None);
    let source = s.source().await;
    let r = role(Some("ext-0042"));

    let first = client.assume_role(&source, &r).await.expect("assume role");
    let second = client.assume_role(&source, &r).await.expect("assume role");

    let reqs = sts.requests();
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    for q in &reqs {
        assert_eq!(q["signature_ok"], true, "{q}");
        assert_eq!(q["status"], 200, "{q}");
        assert_eq!(q["access_key_id"], source.access_key_id.as_str());
        let f = &q["form"];
        assert_eq!(f["Action"], "AssumeRole");
        assert_eq!(f["Version"], "2011-06-15");
        assert_eq!(f["RoleArn"], ARN);
        assert_eq!(f["RoleSessionName"], "gateway-0042");
        assert_eq!(f["DurationSeconds"], "3600");
        assert_eq!(f["ExternalId"], "ext-0042");
    }
    let issued = sts.issued();
    for (got, want) in [&first, &second].iter().zip(&issued) {
        let c = &got.credentials;
        assert_eq!(c.access_key_id, want.access_key_id);
        assert_eq!(c.secret_access_key.expose(), want.secret_access_key);
        assert_eq!(c.session_token.expose(), want.session_token);
        assert_eq!(want.source_access_key_id, source.access_key_id);
        let life = got.lifetime.as_secs();
        assert!((3590..=3600).contains(&life), "{life}");
    }
    // Both calls went over the same TLS connection.
    assert_eq!(sts.stats(), (1, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_are_classified() {
    let s = Setup::new().await;
    let sts = s.fake_sts(None);
    let client = s.client(&sts.endpoint(), "eu-west-1", None);
    let source = s.source().await;
    let r = role(None);

    sts.push_fault(StsFault::AccessDenied);
    let e = client.assume_role(&source, &r).await.unwrap_err();
    assert_eq!(
        (e.class(), e.code()),
        (ErrorClass::Permanent, Some("AccessDenied"))
    );
    let m = e.to_string();
    assert!(m.contains("trust policy of") && m.contains(ARN), "{m}");
    assert!(
        m.contains("not authorized to perform: sts:AssumeRole"),
        "{m}"
    );

    sts.push_fault(StsFault::Throttling);
    let e = client.assume_role(&source, &r).await.unwrap_err();
    assert_eq!(
        (e.class(), e.code()),
        (ErrorClass::Transient, Some("Throttling"))
    );

    sts.push_fault(StsFault::Status500);
    let e = client.assume_role(&source, &r).await.unwrap_err();
    assert_eq!((e.class(), e.status()), (ErrorClass::Transient, Some(500)));

    // ExpiredToken: the same source credentials stay refused; fresh ones are accepted.
    sts.push_fault(StsFault::ExpiredToken);
    let e = client.assume_role(&source, &r).await.unwrap_err();
    assert!(matches!(e, StsError::ExpiredToken { .. }), "{e}");
    let e = client.assume_role(&source, &r).await.unwrap_err();
    assert!(matches!(e, StsError::ExpiredToken { .. }), "{e}");
    let fresh = s.source().await;
    client.assume_role(&fresh, &r).await.expect("fresh source");

    // A DurationSeconds that STS refuses is never sent: it is capped at 3600.
    let mut long = role(None);
    long.duration_seconds = 43_200;
    client.assume_role(&fresh, &long).await.expect("capped");
    let last = sts.requests().pop().unwrap();
    assert_eq!(last["form"]["DurationSeconds"], "3600");

    // All of these calls shared one connection: errors do not drop it.
    assert_eq!(sts.stats().0, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_sts_does_not_know_and_wrong_region_are_permanent() {
    let s = Setup::new().await;
    let sts = s.fake_sts(None);
    let source = s.source().await;

    let stranger = Credentials {
        access_key_id: "ASIAUNKNOWNKEY000000".into(),
        secret_access_key: Secret::from("not-a-real-secret"),
        session_token: Secret::from("not-a-real-token"),
        expiration: UnixTime::from_secs(4_000_000_000),
    };
    let client = s.client(&sts.endpoint(), "eu-west-1", None);
    let e = client
        .assume_role(&stranger, &role(None))
        .await
        .unwrap_err();
    assert_eq!(
        (e.class(), e.code()),
        (ErrorClass::Permanent, Some("InvalidClientTokenId"))
    );
    assert!(e.to_string().contains("[sts] endpoint"), "{e}");

    // The right key id and token with a wrong secret: botocore's signature differs.
    let forged = Credentials {
        secret_access_key: Secret::from("wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY"),
        ..source.clone()
    };
    let e = client.assume_role(&forged, &role(None)).await.unwrap_err();
    assert_eq!(
        (e.class(), e.code()),
        (ErrorClass::Permanent, Some("SignatureDoesNotMatch"))
    );
    let last = sts.requests().pop().unwrap();
    assert_eq!(last["signature_ok"], false, "{last}");

    let wrong = s.client(&sts.endpoint(), "us-east-1", None);
    let e = wrong.assume_role(&source, &role(None)).await.unwrap_err();
    assert_eq!(
        (e.class(), e.code()),
        (ErrorClass::Permanent, Some("SignatureDoesNotMatch"))
    );
    assert!(e.to_string().contains("[sts] region (us-east-1)"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skewed_clock_is_corrected_from_sts_date() {
    let s = Setup::new().await;
    let sts = s.fake_sts(None);
    // STS's clock is 20 minutes ahead of ours (its credentials expire on its clock too).
    sts.set_clock_skew(1200);
    let client = s.client(&sts.endpoint(), "eu-west-1", None);
    let source = s.source().await;
    let got = client
        .assume_role(&source, &role(None))
        .await
        .expect("corrected");
    let life = got.lifetime.as_secs();
    assert!(
        (3590..=3600).contains(&life),
        "lifetime counted from STS's Date: {life}"
    );
    let codes: Vec<_> = sts.requests().iter().map(|q| q["status"].clone()).collect();
    assert_eq!(codes, [403, 200]);
    // Later calls are signed with the learned offset straight away.
    client
        .assume_role(&source, &role(None))
        .await
        .expect("second");
    assert_eq!(sts.requests().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sts_ca_and_proxy_are_honoured() {
    let s = Setup::new().await;
    // STS presents a certificate from a CA the IoT side does not use.
    let sts = FakeSts::start(
        &s.env().pki.untrusted_server,
        &FakeStsOptions {
            provider_admin: s.provider_admin(),
            ..FakeStsOptions::default()
        },
    );
    let source = s.source().await;

    // Built-in Amazon roots: not trusted, and the message names [sts] ca.
    let builtin = client_with_proxy(&sts.endpoint(), "eu-west-1", None, None);
    let e = builtin.assume_role(&source, &role(None)).await.unwrap_err();
    assert_eq!(e.class(), ErrorClass::Transient);
    assert!(e.to_string().contains("check [sts] ca"), "{e}");

    // [sts] ca = that CA, through a CONNECT proxy.
    let proxy = ConnectProxy::start();
    let client = client_with_proxy(
        &sts.endpoint(),
        "eu-west-1",
        Some(&s.env().pki.untrusted_ca_cert),
        Some(&proxy.url()),
    );
    client
        .assume_role(&source, &role(None))
        .await
        .expect("via proxy");
    client
        .assume_role(&source, &role(None))
        .await
        .expect("again");
    assert_eq!(
        proxy.seen(),
        vec![format!("CONNECT localhost:{} HTTP/1.1", sts.port())]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moto_sts_accepts_the_call_and_its_answer_parses() {
    let s = Setup::new().await;
    let moto = MotoSts::start(&s.env().pki.server);
    let client = s.client(&moto.endpoint(), "eu-west-1", None);
    let source = s.source().await;
    let mut r = role(Some("ext-0042"));
    r.duration_seconds = 1800;
    let got = client.assume_role(&source, &r).await.expect("moto");
    let c = &got.credentials;
    assert!(c.access_key_id.starts_with("ASIA"), "{:?}", c);
    assert!(!c.secret_access_key.is_empty() && !c.session_token.is_empty());
    let life = got.lifetime.as_secs();
    assert!((1790..=1800).contains(&life), "{life}");
    // moto closes the connection after each answer: the next call opens a new one.
    client.assume_role(&source, &r).await.expect("moto again");
}
