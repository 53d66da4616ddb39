//! Containers on the gateway (SPEC §4.5), in a real network namespace made by the test: the
//! agent listens on the ECS link-local address 169.254.170.2 (on the host end of a veth pair),
//! and botocore's container provider, run inside the "container" namespace with
//! `ip netns exec`, gets credentials over `http://169.254.170.2:<port>/v1/credentials/<role>`
//! with the bind-mountable token file `<runtime_dir>/tokens/<role>/token`. The token survives an
//! agent restart; the `Host` check accepts only the listener's own address.
//! The same over the EKS IPv6 address `[fd00:ec2::23]`, and botocore's instance-metadata
//! provider over the IMDS address 169.254.169.254 (SPEC §4.4).
//!
//! Needs root and iproute2; skipped with a message otherwise. Everything the test creates in
//! the network stack is deleted by [`NetNs`]'s `Drop`, also when the test fails.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use iotcred_tests::agent::{Agent, Env};
use iotcred_tests::netns::{self, NetNs};

const LIMIT: Duration = Duration::from_secs(30);
const ECS: IpAddr = IpAddr::V4(Ipv4Addr::new(169, 254, 170, 2));
const EKS_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23));
const IMDS: IpAddr = IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254));

fn skip() -> bool {
    match netns::unavailable() {
        Some(why) => {
            eprintln!("SKIPPED: network namespace test cannot run here: {why}");
            true
        }
        None => false,
    }
}

fn deps() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(".deps")
}

/// A port free on `addr` (which the namespace fixture has just put on the host).
fn free_port(addr: IpAddr) -> u16 {
    std::net::TcpListener::bind(SocketAddr::new(addr, 0))
        .expect("bind the link-local address on the host")
        .local_addr()
        .unwrap()
        .port()
}

fn url_host(addr: IpAddr) -> String {
    match addr {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    }
}

fn start_agent(env: &Env, addr: IpAddr, port: u16) -> Agent {
    start_agent_with(
        env,
        &format!("[serve]\nlisten = \"{}:{port}\"\n", url_host(addr)),
    )
}

fn start_agent_with(env: &Env, serve: &str) -> Agent {
    let k = env.pki.device_ec.key.display().to_string();
    let cfg = env.config_with(&env.pki.device_ec.cert, &k, "", serve);
    let mut agent = env.start_agent(&cfg);
    assert!(agent.wait_ready(LIMIT), "no READY=1:\n{}", agent.log());
    agent
}

/// botocore's container provider, inside the namespace, configured only by the environment.
fn botocore_in(ns: &NetNs, env: &Env, url: &str, token_file: &Path) -> serde_json::Value {
    botocore_with(
        ns,
        env,
        &[
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
            ("AWS_CONTAINER_CREDENTIALS_FULL_URI", url.into()),
            (
                "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
                token_file.display().to_string(),
            ),
        ],
    )
}

/// botocore's default credential chain inside the namespace, with only `vars` (and a clean
/// home) configuring it.
fn botocore_with(ns: &NetNs, env: &Env, vars: &[(&str, String)]) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("consumers/botocore_creds.py");
    let mut cmd = ns.command("timeout");
    cmd.arg("60").arg("python3").arg(script);
    for (k, _) in std::env::vars() {
        if k.starts_with("AWS_") {
            cmd.env_remove(k);
        }
    }
    let home = env.path();
    let out = cmd
        .env("PYTHONPATH", deps().join("py"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("HOME", home)
        .env("AWS_CONFIG_FILE", home.join("no-config"))
        .env("AWS_SHARED_CREDENTIALS_FILE", home.join("no-credentials"))
        .env("AWS_REGION", "eu-west-1")
        .envs(vars.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("run botocore in the namespace");
    let line = String::from_utf8_lossy(&out.stdout);
    let line = line.lines().next().unwrap_or_default();
    serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("botocore printed {line:?} ({e}), status {}", out.status))
}

/// One `GET path` with these header lines, from inside the namespace; returns the status.
fn get_in(ns: &NetNs, to: SocketAddr, path: &str, headers: &str) -> u16 {
    let req = format!("GET {path} HTTP/1.1\r\n{headers}Connection: close\r\n\r\n");
    let reply = ns
        .run(move || {
            let mut s = TcpStream::connect_timeout(&to, LIMIT).expect("connect from namespace");
            s.set_read_timeout(Some(LIMIT)).unwrap();
            s.write_all(req.as_bytes()).unwrap();
            let mut buf = String::new();
            s.read_to_string(&mut buf).unwrap();
            buf
        })
        .expect("enter the namespace");
    reply
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {reply:?}"))
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn botocore_in_a_container_namespace_over_the_ecs_address_across_a_restart() {
    if skip() {
        return;
    }
    let ns = NetNs::create(&[ECS]).expect("network namespace");
    let env = Env::new();
    let port = free_port(ECS);
    let agent = start_agent(&env, ECS, port);

    // The bind-mountable token: alone in its 0750 directory, 0640, same value as <role>.token.
    let dir = env.runtime_dir().join("tokens/default");
    let token_file = dir.join("token");
    assert_eq!(mode(&dir), 0o750);
    assert_eq!(mode(&token_file), 0o640);
    let token = std::fs::read_to_string(&token_file).unwrap();
    assert_eq!(
        std::fs::read_to_string(env.runtime_dir().join("default.token")).unwrap(),
        token
    );

    let url = format!("http://169.254.170.2:{port}/v1/credentials/default");
    let v = botocore_in(&ns, &env, &url, &token_file);
    let issued = env.provider.last_issued().unwrap();
    assert_eq!(v["method"], "container-role", "{v}");
    assert_eq!(v["AccessKeyId"], issued.access_key_id.as_str(), "{v}");
    assert_eq!(v["SecretAccessKey"], issued.secret_access_key.as_str());
    assert_eq!(v["Token"], issued.session_token.as_str());

    // The Host check: the listener's own address, with or without port; nothing else.
    let to = SocketAddr::new(ECS, port);
    let auth = format!("Authorization: {token}\r\n");
    let creds = "/v1/credentials/default";
    for (host, want) in [
        (format!("169.254.170.2:{port}"), 200),
        ("169.254.170.2".to_owned(), 200),
        ("evil.example".to_owned(), 400),
        (format!("localhost:{port}"), 400),
        (format!("127.0.0.1:{port}"), 400),
        ("169.254.170.23".to_owned(), 400),
    ] {
        let got = get_in(&ns, to, creds, &format!("Host: {host}\r\n{auth}"));
        assert_eq!(got, want, "Host: {host}");
    }
    let xff = format!("Host: 169.254.170.2\r\nX-Forwarded-For: 10.0.0.1\r\n{auth}");
    assert_eq!(get_in(&ns, to, creds, &xff), 400);
    assert_eq!(
        get_in(
            &ns,
            to,
            creds,
            "Host: 169.254.170.2\r\nAuthorization: wrong\r\n"
        ),
        401
    );
    assert_eq!(
        get_in(&ns, to, "/v1/health", "Host: 169.254.170.2\r\n"),
        200
    );

    // Restart: the same runtime directory, the same token; the container's file still works.
    let (code, log) = agent.stop(&env);
    assert_eq!(code, Some(0), "{log}");
    let agent = start_agent(&env, ECS, port);
    assert_eq!(std::fs::read_to_string(&token_file).unwrap(), token);
    assert_eq!(
        std::fs::read_to_string(env.runtime_dir().join("default.token")).unwrap(),
        token
    );
    let v = botocore_in(&ns, &env, &url, &token_file);
    let issued = env.provider.last_issued().unwrap();
    assert_eq!(v["AccessKeyId"], issued.access_key_id.as_str(), "{v}");
    assert_eq!(
        get_in(&ns, to, creds, &format!("Host: 169.254.170.2\r\n{auth}")),
        200
    );
    agent.stop(&env);
}

#[test]
fn botocore_in_a_container_namespace_over_the_eks_ipv6_address() {
    if skip() {
        return;
    }
    if !Path::new("/proc/net/if_inet6").exists() {
        eprintln!("SKIPPED: this kernel has no IPv6");
        return;
    }
    let ns = NetNs::create(&[EKS_V6]).expect("network namespace");
    let env = Env::new();
    let port = free_port(EKS_V6);
    let agent = start_agent(&env, EKS_V6, port);
    let token_file = env.runtime_dir().join("tokens/default/token");
    let token = std::fs::read_to_string(&token_file).unwrap();

    let url = format!("http://[fd00:ec2::23]:{port}/v1/credentials/default");
    let v = botocore_in(&ns, &env, &url, &token_file);
    let issued = env.provider.last_issued().unwrap();
    assert_eq!(v["method"], "container-role", "{v}");
    assert_eq!(v["AccessKeyId"], issued.access_key_id.as_str(), "{v}");

    let to = SocketAddr::new(EKS_V6, port);
    let auth = format!("Authorization: {token}\r\n");
    for (host, want) in [
        (format!("[fd00:ec2::23]:{port}"), 200),
        ("[fd00:ec2::23]".to_owned(), 200),
        ("fd00:ec2::23".to_owned(), 400),
        ("169.254.170.2".to_owned(), 400),
        ("[::1]".to_owned(), 400),
        ("evil.example".to_owned(), 400),
    ] {
        let got = get_in(
            &ns,
            to,
            "/v1/credentials/default",
            &format!("Host: {host}\r\n{auth}"),
        );
        assert_eq!(got, want, "Host: {host}");
    }
    agent.stop(&env);
}

#[test]
fn the_fixture_tears_everything_down_when_a_test_fails() {
    if skip() {
        return;
    }
    let made = std::sync::Mutex::new(String::new());
    let failed = std::panic::catch_unwind(|| {
        let ns = NetNs::create(&[ECS]).expect("network namespace");
        *made.lock().unwrap() = ns.name().to_owned();
        assert!(Path::new("/run/netns").join(ns.name()).exists());
        panic!("a failing test");
    });
    assert!(failed.is_err());
    let name = made.into_inner().unwrap();
    assert!(!name.is_empty());
    assert!(
        !Path::new("/run/netns").join(&name).exists(),
        "{name} left behind"
    );
    let links = std::process::Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .unwrap();
    let links = String::from_utf8_lossy(&links.stdout);
    let host_if = format!("ich{}x", std::process::id());
    assert!(!links.contains(&host_if), "veth left behind:\n{links}");
}

/// The IMDS endpoint (SPEC §4.4) on its link-local address, reached from a container: botocore's
/// instance-metadata provider inside the namespace, pointed at `http://169.254.169.254:<port>/`,
/// gets the role's credentials (IMDSv2 token PUT, then GETs) across the veth pair with the
/// default hop limit of 1.
#[test]
fn botocore_in_a_container_namespace_over_the_imds_address() {
    if skip() {
        return;
    }
    let ns = NetNs::create(&[IMDS]).expect("network namespace");
    let env = Env::new();
    let port = free_port(IMDS);
    let agent = start_agent_with(
        &env,
        &format!("[serve.imds]\nlisten = \"169.254.169.254:{port}\"\nrole = \"default\"\n"),
    );
    let v = botocore_with(
        &ns,
        &env,
        &[
            ("AWS_EC2_METADATA_DISABLED", "false".into()),
            (
                "AWS_EC2_METADATA_SERVICE_ENDPOINT",
                format!("http://169.254.169.254:{port}/"),
            ),
        ],
    );
    let issued = env.provider.last_issued().unwrap();
    assert_eq!(v["method"], "iam-role", "{v}");
    assert_eq!(v["AccessKeyId"], issued.access_key_id.as_str(), "{v}");
    assert_eq!(v["SecretAccessKey"], issued.secret_access_key.as_str());
    assert_eq!(v["Token"], issued.session_token.as_str());
    agent.stop(&env);
}
