//! `fake-provider`: the fake AWS IoT credentials provider as a process, for scripts, the
//! quick-start demo and benchmarks.
//!
//! Prints `listening on ADDR` (and `admin on ADDR`) on stdout, then serves until SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use iotcred_tests::{FakeProvider, ProviderConfig, TlsVersions};
use std::io::Write as _;

const USAGE: &str = "\
usage: fake-provider --ca CA.pem --cert SERVER.pem --key SERVER.key
                     [--listen 127.0.0.1:PORT] [--admin 127.0.0.1:PORT] [--ttl SECS]
                     [--alias NAME]... [--allow-missing-thing-name] [--tls-version 1.2|1.3]

A fake AWS IoT credentials provider (GET /role-aliases/{alias}/credentials over mutual TLS).
  --listen ADDR    TLS listener, loopback only (default 127.0.0.1:0; the port is printed)
  --ca PATH        CA certificate(s) that client certificates must chain to
  --cert PATH      server certificate chain (PEM)
  --key PATH       server private key (PEM)
  --ttl SECS       lifetime of issued credentials (default 3600)
  --admin ADDR     plain-HTTP admin listener on loopback: GET /requests /issued /stats /faults,
                   POST /fault /fault/once /fault/clear /reset (faults as JSON, see docs)
  --alias NAME     a known role alias; repeatable (default GatewayRole)
  --allow-missing-thing-name   serve requests without x-amzn-iot-thingname
  --tls-version V  accept only TLS 1.2 or only TLS 1.3 (default both)";

fn parse(args: Vec<String>) -> Result<ProviderConfig, String> {
    let mut listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 0));
    let (mut ca, mut cert, mut key) = (None, None, None);
    let mut admin = None;
    let mut ttl = 3600u64;
    let mut aliases = Vec::new();
    let mut allow_missing = false;
    let mut versions = TlsVersions::Both;
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match name.as_str() {
            "--listen" => listen = value()?.parse().map_err(|e| format!("--listen: {e}"))?,
            "--admin" => admin = Some(value()?.parse().map_err(|e| format!("--admin: {e}"))?),
            "--ca" => ca = Some(PathBuf::from(value()?)),
            "--cert" => cert = Some(PathBuf::from(value()?)),
            "--key" => key = Some(PathBuf::from(value()?)),
            "--ttl" => ttl = value()?.parse().map_err(|e| format!("--ttl: {e}"))?,
            "--alias" => aliases.push(value()?),
            "--allow-missing-thing-name" => allow_missing = true,
            "--tls-version" => {
                versions = match value()?.as_str() {
                    "1.2" => TlsVersions::Tls12Only,
                    "1.3" => TlsVersions::Tls13Only,
                    "both" => TlsVersions::Both,
                    v => return Err(format!("--tls-version: expected 1.2, 1.3 or both, not {v}")),
                }
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let need = |v: Option<PathBuf>, n: &str| v.ok_or_else(|| format!("{n} is required"));
    let mut config = ProviderConfig::new(
        need(ca, "--ca")?,
        need(cert, "--cert")?,
        need(key, "--key")?,
    );
    config.listen = listen;
    config.admin = admin;
    config.ttl = Duration::from_secs(ttl);
    if !aliases.is_empty() {
        config.aliases = aliases;
    }
    config.allow_missing_thing_name = allow_missing;
    config.tls_versions = versions;
    Ok(config)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let config = match parse(std::env::args().skip(1).collect()) {
        Ok(c) => c,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("fake-provider: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let provider = match FakeProvider::start(config).await {
        Ok(p) => p,
        Err(e) => {
            eprintln!("fake-provider: {e}");
            return ExitCode::from(1);
        }
    };
    let mut banner = format!("listening on {}\n", provider.addr());
    if let Some(a) = provider.admin_addr() {
        banner.push_str(&format!("admin on {a}\n"));
    }
    {
        let mut stdout = std::io::stdout().lock();
        if stdout.write_all(banner.as_bytes()).is_err() || stdout.flush().is_err() {
            return ExitCode::from(1);
        }
    }
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("fake-provider: cannot watch SIGTERM: {e}");
            return ExitCode::from(1);
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    provider.shutdown().await;
    ExitCode::SUCCESS
}
