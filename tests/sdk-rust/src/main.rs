//! The AWS SDK for Rust's default credentials chain, configured only through the environment
//! (AWS_CONTAINER_CREDENTIALS_FULL_URI + AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE). Prints the
//! resolved credentials as one JSON line, then again for every line read on stdin (the SDK's
//! cache refreshes near expiry).
use aws_credential_types::provider::ProvideCredentials;
use tokio::io::AsyncBufReadExt;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let config = aws_config::load_from_env().await;
    let Some(provider) = config.credentials_provider() else {
        println!("{}", serde_json::json!({ "error": "no credentials provider" }));
        std::process::exit(1);
    };
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    loop {
        match provider.provide_credentials().await {
            Ok(c) => {
                let exp = c.expiry().map(|e| {
                    e.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
                });
                println!(
                    "{}",
                    serde_json::json!({
                        "AccessKeyId": c.access_key_id(),
                        "SecretAccessKey": c.secret_access_key(),
                        "Token": c.session_token(),
                        "ExpirationUnix": exp,
                    })
                );
            }
            Err(e) => {
                println!("{}", serde_json::json!({ "error": format!("{e:?}") }));
                std::process::exit(1);
            }
        }
        match lines.next_line().await {
            Ok(Some(_)) => {}
            _ => return,
        }
    }
}
