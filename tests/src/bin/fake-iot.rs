//! `fake-iot`: the fake AWS IoT of the tests (mosquitto with the claim/device ACL, the
//! fleet-provisioning responder, the registry) plus the fake credentials provider checking the
//! registry, as one process, for benchmark scripts (tests/bench/provision.sh).
//!
//! Prints `KEY=VALUE` lines on stdout (endpoints and file paths, then `READY=1`), runs until its
//! stdin closes or it gets SIGINT/SIGTERM, then stops mosquitto and prints the registry's
//! counters as one `COUNTERS=…` line (JSON).

use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;

use iotcred_tests::fakeiot::{
    FLEET_TEMPLATE, FakeIot, FakeIotOptions, ROTATION_TEMPLATE, Registry,
};
use iotcred_tests::{BlockingProvider, Pki};

const USAGE: &str = "\
usage: fake-iot --dir DIR [--validity-days N] [--tcp-nodelay]

Starts the fake AWS IoT (mosquitto on 127.0.0.1 with TLS client certificates and the ACL as
the claim/device policies, the MQTT responder of the fleet-provisioning API) and the fake
credentials provider (which accepts only certificates ACTIVE in the registry and attached to
the thing named in x-amzn-iot-thingname). A throwaway PKI is generated in DIR/pki; mosquitto's
files go to DIR/iot.
  --dir DIR            working directory (created)
  --validity-days N    validity of the certificates the responder issues (default 365)
  --tcp-nodelay        TCP_NODELAY on mosquitto's and the responder's sockets (default: off,
                       as in the tests; Nagle's algorithm then delays some small packets)

Prints KEY=VALUE lines: IOT_ENDPOINT, IOT_PORT, PROVIDER_ENDPOINT, CA, CLAIM_CERT, CLAIM_KEY,
FLEET_TEMPLATE (thing gw-<SerialNumber>), ROTATION_TEMPLATE, then READY=1. Runs until stdin
is closed or SIGINT/SIGTERM; then prints COUNTERS={json} and exits.";

struct Args {
    dir: PathBuf,
    validity_days: i64,
    tcp_nodelay: bool,
}

fn parse(args: Vec<String>) -> Result<Args, String> {
    let mut dir = None;
    let mut validity_days = 365;
    let mut tcp_nodelay = false;
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--dir" => dir = Some(PathBuf::from(value()?)),
            "--validity-days" => {
                validity_days = value()?
                    .parse()
                    .map_err(|e| format!("--validity-days: {e}"))?;
            }
            "--tcp-nodelay" => tcp_nodelay = true,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Args {
        dir: dir.ok_or("--dir is required")?,
        validity_days,
        tcp_nodelay,
    })
}

/// Blocks SIGINT and SIGTERM in the calling thread; threads started afterwards inherit the
/// mask, so the signals stay pending until [`wait_for_end`]'s `sigwait` takes them.
fn block_signals() -> libc::sigset_t {
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the set before it is read; the pointers are valid.
    unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        libc::sigaddset(set.as_mut_ptr(), libc::SIGINT);
        libc::sigaddset(set.as_mut_ptr(), libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, set.as_ptr(), std::ptr::null_mut());
        set.assume_init()
    }
}

/// Blocks until stdin reaches end of file (or fails), or SIGINT/SIGTERM arrives.
fn wait_for_end(set: libc::sigset_t) {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        let mut sink = [0u8; 256];
        let mut stdin = std::io::stdin().lock();
        while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
        let _ = tx.send(());
    });
    std::thread::spawn(move || {
        let mut sig = 0;
        // SAFETY: `set` is an initialised signal set, `sig` a valid out pointer.
        unsafe { libc::sigwait(&set, &mut sig) };
        let _ = tx2.send(());
    });
    let _ = rx.recv();
}

fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1).collect()) {
        Ok(a) => a,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("fake-iot: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    // Before any thread (provider runtime, responder) starts: see block_signals.
    let signals = block_signals();
    let started = (|| {
        let pki = Pki::generate(&args.dir.join("pki"), "gw-bench")?;
        let registry = Registry::new();
        registry.set_certificate_validity(args.validity_days * 86_400);
        let mut provider_config = pki.provider_config();
        provider_config.registry = Some(registry.clone());
        let provider = BlockingProvider::start(provider_config)?;
        let iot = FakeIot::start(
            &pki,
            &args.dir.join("iot"),
            registry.clone(),
            FakeIotOptions {
                tcp_nodelay: args.tcp_nodelay,
                ..FakeIotOptions::default()
            },
        )?;
        Ok::<_, iotcred_tests::Error>((provider, iot))
    })();
    let (provider, iot) = match started {
        Ok(x) => x,
        Err(e) => {
            eprintln!("fake-iot: {e}");
            return ExitCode::from(1);
        }
    };
    let banner = format!(
        "IOT_ENDPOINT={}\nIOT_PORT={}\nPROVIDER_ENDPOINT={}\nCA={}\nCLAIM_CERT={}\nCLAIM_KEY={}\n\
         FLEET_TEMPLATE={FLEET_TEMPLATE}\nROTATION_TEMPLATE={ROTATION_TEMPLATE}\nREADY=1\n",
        iot.endpoint(),
        iot.port(),
        provider.endpoint(),
        iot.ca.display(),
        iot.claim.cert.display(),
        iot.claim.key.display(),
    );
    {
        let mut stdout = std::io::stdout().lock();
        if stdout.write_all(banner.as_bytes()).is_err() || stdout.flush().is_err() {
            return ExitCode::from(1);
        }
    }
    wait_for_end(signals);
    let c = iot.registry.counters();
    let things = iot.registry.things().len();
    let certs = iot.registry.certificates().len();
    drop(iot);
    provider.shutdown();
    println!(
        "COUNTERS={}",
        serde_json::json!({
            "csr_requests": c.csr_requests,
            "csr_accepted": c.csr_accepted,
            "register_requests": c.register_requests,
            "register_accepted": c.register_accepted,
            "provider_checks": c.provider_checks,
            "provider_refusals": c.provider_refusals,
            "things": things,
            "certificates": certs,
        })
    );
    ExitCode::SUCCESS
}
