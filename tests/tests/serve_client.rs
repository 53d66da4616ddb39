//! `iotcred get` / `credential-process` (SPEC §4.3) as a library call against the real server:
//! every format, and the exit codes of every failure.

mod serve_common;

use std::path::PathBuf;
use std::time::Duration;

use iotcred_agent::client::{self, GetError};
use iotcred_core::UnixTime;
use iotcred_core::render::Format;
use serve_common::*;

async fn get_blocking(
    socket: PathBuf,
    role: Option<&'static str>,
    format: Format,
) -> Result<String, GetError> {
    tokio::task::spawn_blocking(move || client::get(&socket, role, format).map(|s| s.to_string()))
        .await
        .expect("client thread")
}

#[tokio::test]
async fn every_format_over_the_socket() {
    let h = start(&[RoleSpec::new("default"), RoleSpec::new("telemetry")]).await;
    h.publish(0, "ASIADEFAULTKEY", Duration::from_secs(3600));
    h.publish(1, "ASIATELEMETRYKEY", Duration::from_secs(3600));
    let sock = h.socket.clone();

    // json: the §4.1 body.
    let out = get_blocking(sock.clone(), None, Format::ContainerJson)
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["AccessKeyId"], "ASIADEFAULTKEY");
    assert_eq!(v["SecretAccessKey"], SECRET);
    assert_eq!(v["Token"], SESSION);
    let exp = v["Expiration"].as_str().unwrap().to_owned();
    let t = UnixTime::parse_rfc3339(&exp).unwrap();
    assert!(t > UnixTime::now(), "skew-corrected, in the future: {exp}");
    assert_eq!(v.as_object().unwrap().len(), 4);

    // credential-process.
    let out = get_blocking(sock.clone(), Some("telemetry"), Format::CredentialProcess)
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["Version"], 1);
    assert_eq!(v["AccessKeyId"], "ASIATELEMETRYKEY");
    assert_eq!(v["SecretAccessKey"], SECRET);
    assert_eq!(v["SessionToken"], SESSION);
    assert!(v["Expiration"].as_str().unwrap().ends_with('Z'));
    assert_eq!(v.as_object().unwrap().len(), 5);

    // env.
    let out = get_blocking(sock.clone(), None, Format::Env).await.unwrap();
    assert!(
        out.contains("export AWS_ACCESS_KEY_ID=ASIADEFAULTKEY\n"),
        "{out}"
    );
    assert!(out.contains(&format!("export AWS_SECRET_ACCESS_KEY={SECRET}\n")));
    assert!(out.contains(&format!("export AWS_SESSION_TOKEN={SESSION}\n")));
    assert!(out.contains("export AWS_CREDENTIAL_EXPIRATION="));

    // ini: profile named after the role, `default` for the default role.
    let out = get_blocking(sock.clone(), None, Format::Ini).await.unwrap();
    assert!(out.starts_with("[default]\n"), "{out}");
    assert!(out.contains("aws_access_key_id = ASIADEFAULTKEY\n"));
    assert!(out.contains(&format!("aws_secret_access_key = {SECRET}\n")));
    assert!(out.contains(&format!("aws_session_token = {SESSION}\n")));
    let out = get_blocking(sock.clone(), Some("telemetry"), Format::Ini)
        .await
        .unwrap();
    assert!(out.starts_with("[telemetry]\n"), "{out}");
    assert!(out.contains("aws_access_key_id = ASIATELEMETRYKEY\n"));
    h.shutdown().await;
}

#[tokio::test]
async fn exit_codes_and_messages() {
    // Unreachable: no socket at all.
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nothing.sock");
    let e = get_blocking(missing.clone(), None, Format::ContainerJson)
        .await
        .unwrap_err();
    assert_eq!(e.exit().code(), 5);
    let msg = e.to_string();
    assert!(
        msg.contains("iotcred run") && msg.contains(&missing.display().to_string()),
        "{msg}"
    );

    // Unreachable: a stale socket nobody listens on.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let e = get_blocking(stale, None, Format::ContainerJson)
        .await
        .unwrap_err();
    assert_eq!(e.exit().code(), 5, "{e}");

    let mut denied = RoleSpec::new("denied");
    denied.allow_uids = vec![my_uid().wrapping_add(1)];
    let h = start(&[RoleSpec::new("default"), denied]).await;
    let sock = h.socket.clone();

    // No credentials yet: 503 → 5.
    let e = get_blocking(sock.clone(), None, Format::CredentialProcess)
        .await
        .unwrap_err();
    assert!(matches!(e, GetError::NotReady { .. }), "{e}");
    assert_eq!(e.exit().code(), 5);
    assert!(e.to_string().contains("no valid credentials yet"));

    h.publish(0, "ASIAKEY", Duration::from_secs(3600));
    h.publish(1, "ASIAKEY", Duration::from_secs(3600));

    // Unknown role: 404 → 2.
    let e = get_blocking(sock.clone(), Some("nope"), Format::ContainerJson)
        .await
        .unwrap_err();
    assert!(matches!(e, GetError::UnknownRole { .. }), "{e}");
    assert_eq!(e.exit().code(), 2);
    assert!(e.to_string().contains("\"nope\""));
    // A role name that cannot be a path segment: usage error, nothing sent.
    let e = get_blocking(sock.clone(), Some("a/b c"), Format::ContainerJson)
        .await
        .unwrap_err();
    assert_eq!(e.exit().code(), 2);

    // Peer not allowed: 403 → 5, with the agent's advice.
    let e = get_blocking(sock.clone(), Some("denied"), Format::ContainerJson)
        .await
        .unwrap_err();
    assert!(matches!(e, GetError::Refused { status: 403, .. }), "{e}");
    assert_eq!(e.exit().code(), 5);
    assert!(e.to_string().contains("allow_uids"));

    let text = format!("{e} {e:?}");
    assert!(!text.contains(SECRET) && !text.contains(SESSION));
    // And the happy path still works on the same agent.
    assert!(get_blocking(sock, None, Format::Env).await.is_ok());
    h.shutdown().await;
}

#[tokio::test]
async fn garbage_from_the_socket_is_a_protocol_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fake.sock");
    let l = tokio::net::UnixListener::bind(&path).unwrap();
    let server = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut s, _) = l.accept().await.unwrap();
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf).await.unwrap();
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot json!")
            .await
            .unwrap();
    });
    let e = get_blocking(path, None, Format::ContainerJson)
        .await
        .unwrap_err();
    assert!(matches!(e, GetError::Protocol(_)), "{e}");
    assert_eq!(e.exit().code(), 1);
    assert!(
        !e.to_string().contains("not json"),
        "never echo the body: {e}"
    );
    server.await.unwrap();
}
