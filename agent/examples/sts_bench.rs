//! One chained refresh, timed: `AssumeRole` with the agent's STS client over its kept-alive
//! connection (tests/bench/sts.sh runs this beside botocore's `assume_role`).
//!
//! ```text
//! cargo run -p iotcred-agent --release --example sts_bench -- \
//!     https://localhost:PORT REGION CA_PEM SOURCE_CREDENTIALS_JSON N
//! ```
//! The JSON file holds `access_key_id`, `secret_access_key`, `session_token`. After one
//! untimed call (connection and TLS set-up), N calls are timed one by one; prints one JSON line
//! `{"samples_us":[…]}`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use iotcred_agent::config::Sts;
use iotcred_agent::net::HttpsUrl;
use iotcred_agent::sts::{AssumeRole, StsClient};
use iotcred_core::{Credentials, Secret, UnixTime};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, region, ca, creds, n] = args.as_slice() else {
        return Err("usage: sts_bench URL REGION CA_PEM SOURCE_CREDENTIALS_JSON N".into());
    };
    let n: usize = n.parse()?;
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(creds)?)?;
    let field = |k: &str| json[k].as_str().unwrap_or_default().to_string();
    let source = Credentials {
        access_key_id: field("access_key_id"),
        secret_access_key: Secret::from(field("secret_access_key")),
        session_token: Secret::from(field("session_token")),
        expiration: UnixTime::from_secs(4_000_000_000),
    };
    let role = AssumeRole {
        source_role: "default".into(),
        role_arn: "arn:aws:iam::210987654321:role/GatewayAnalytics".into(),
        session_name: "gateway-0042".into(),
        external_id: None,
        duration_seconds: 3600,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let sts = Sts {
        endpoint: HttpsUrl::parse(url)?,
        region: region.clone(),
        ca: Some(PathBuf::from(ca)),
        proxy: None,
    };
    let client = StsClient::new(&sts, Duration::from_secs(30))?;
    let samples = runtime.block_on(async {
        client.assume_role(&source, &role).await?;
        let mut samples = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            client.assume_role(&source, &role).await?;
            samples.push(t.elapsed().as_micros() as u64);
        }
        Ok::<_, iotcred_agent::sts::StsError>(samples)
    })?;
    println!("{}", serde_json::json!({ "samples_us": samples }));
    Ok(())
}
