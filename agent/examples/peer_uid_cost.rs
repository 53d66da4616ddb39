//! What the SPEC §4.6 peer uid lookup adds to a connection: for N loopback connections, the
//! time of connect + accept alone and of the `NETLINK_SOCK_DIAG` lookup the agent makes (once
//! per connection), in microseconds (p50/p99), side by side in one run.
//!
//! ```text
//! cargo run --release -p iotcred-agent --example peer_uid_cost -- [N] [127.0.0.1|::1]
//! ```

use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let n: usize = args
        .next()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(20_000);
    let host = args.next().unwrap_or_else(|| "127.0.0.1".into());
    let listener = TcpListener::bind(if host.contains(':') {
        format!("[{host}]:0")
    } else {
        format!("{host}:0")
    })?;
    let addr = listener.local_addr()?;
    let mut connect = Vec::with_capacity(n);
    let mut lookup = Vec::with_capacity(n);
    let mut uid = 0;
    for _ in 0..n {
        let t0 = Instant::now();
        let client = TcpStream::connect(addr)?;
        let (server, remote) = listener.accept()?;
        let t1 = Instant::now();
        uid = iotcred_agent::peer::lookup_uid(server.local_addr()?, remote)?;
        let t2 = Instant::now();
        connect.push(t1 - t0);
        lookup.push(t2 - t1);
        drop(client);
        drop(server);
    }
    let show = |name: &str, v: &mut Vec<Duration>| {
        v.sort();
        let p = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)].as_secs_f64() * 1e6;
        println!(
            "{name:<16} n={} p50_us={:.1} p99_us={:.1} max_us={:.1}",
            v.len(),
            p(0.50),
            p(0.99),
            p(1.0)
        );
    };
    println!("peer uid lookup over {host}, uid found: {uid}");
    show("connect+accept", &mut connect);
    show("uid lookup", &mut lookup);
    Ok(())
}
