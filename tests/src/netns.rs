//! A "container" network namespace made by the test itself, joined to the host by a veth pair,
//! with the ECS/EKS link-local address of SPEC §4.5 on the host end (this machine's kernel has
//! no `dummy` link type; real gateways use `systemd/iotcred0.netdev`).
//!
//! Layout, for a fixture numbered `n` in test process `pid`:
//!
//! ```text
//!   host namespace                          namespace iotcred-t<pid>-<n>
//!   ich<pid>x<n> ── 169.254.170.2/32   <veth>   ict0 ── 198.18.a.b/32
//!                  route 198.18.a.b/32                  route 169.254.170.2/32
//! ```
//!
//! With an IPv6 address (e.g. `fd00:ec2::23`) the namespace's end gets `fd69:6f74:6372::a:b`,
//! routed the same way, and duplicate address detection is off on both ends so every address,
//! link-local ones included, is usable at once (no waiting for DAD).
//!
//! Everything is torn down in `Drop` (also while a failed test unwinds): deleting the namespace
//! deletes its veth end, which deletes the pair and, with the host end, the address and the
//! route. Namespaces left by test processes that died without unwinding (killed) are deleted by
//! the next [`NetNs::create`].
//!
//! Needs root and `ip` from iproute2 (`tests/install-deps.sh`); [`unavailable`] says why
//! a test must skip.

use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

const PREFIX: &str = "iotcred-t";

/// Why namespace tests cannot run here, or `None` when they can.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root: creating network namespaces and veth pairs needs root".into());
    }
    match Command::new("ip")
        .args(["netns", "list"])
        .stdin(Stdio::null())
        .output()
    {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "`ip netns list` failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!(
            "`ip` is not available ({e}); install iproute2 (tests/install-deps.sh)"
        )),
    }
}

/// Why a namespace could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Error(String);

/// A network namespace joined to the host by a veth pair (see the module documentation).
#[derive(Debug)]
pub struct NetNs {
    name: String,
    host_if: String,
    host_addrs: Vec<IpAddr>,
    container_addr: IpAddr,
    container_addr6: IpAddr,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

fn ip(args: &[&str]) -> Result<Output, Error> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error(format!("ip {}: {e}", args.join(" "))))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(Error(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

impl NetNs {
    /// Creates the namespace and veth pair, puts `host_addrs` (e.g. `169.254.170.2`, as /32 or
    /// /128) on the host end and routes them from the namespace. IPv6 addresses are added
    /// without duplicate address detection, so they can be bound at once.
    pub fn create(host_addrs: &[IpAddr]) -> Result<NetNs, Error> {
        sweep_stale();
        let pid = std::process::id();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        // 198.18.0.0/15 (benchmarking, never routed): unique per (pid, n) within this machine.
        let k = (pid.wrapping_mul(16).wrapping_add(n)) & 0x1_ffff;
        let container_addr = IpAddr::from([
            198,
            18 + (k >> 16) as u8,
            (k >> 8) as u8,
            ((k & 0xff) as u8).clamp(1, 254),
        ]);
        let container_addr6 = IpAddr::from([
            0xfd69,
            0x6f74,
            0x6372,
            0,
            0,
            0,
            (k >> 16) as u16,
            ((k & 0xffff) as u16).max(1),
        ]);
        let ns = NetNs {
            name: format!("{PREFIX}{pid}-{n}"),
            host_if: format!("ich{pid}x{n}"),
            host_addrs: host_addrs.to_vec(),
            container_addr,
            container_addr6,
        };
        if ns.host_if.len() > 15 {
            return Err(Error(format!("interface name {} too long", ns.host_if)));
        }
        // From here on `ns` is dropped (and everything made so far deleted) on any error.
        ns.setup()?;
        Ok(ns)
    }

    fn setup(&self) -> Result<(), Error> {
        let (name, host_if) = (self.name.as_str(), self.host_if.as_str());
        let c = self.container_addr.to_string();
        ip(&["netns", "add", name])?;
        ip(&[
            "link", "add", host_if, "type", "veth", "peer", "name", "ict0", "netns", name,
        ])?;
        let v6 = self.host_addrs.iter().any(IpAddr::is_ipv6);
        if v6 {
            no_dad(None, host_if)?;
            no_dad(Some(name), "ict0")?;
        }
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        ip(&["-n", name, "addr", "add", &format!("{c}/32"), "dev", "ict0"])?;
        ip(&["-n", name, "link", "set", "ict0", "up"])?;
        ip(&["link", "set", host_if, "up"])?;
        ip(&["route", "add", &format!("{c}/32"), "dev", host_if])?;
        let c6 = self.container_addr6.to_string();
        if v6 {
            ip(&[
                "-n",
                name,
                "addr",
                "add",
                &format!("{c6}/128"),
                "dev",
                "ict0",
                "nodad",
            ])?;
            ip(&["route", "add", &format!("{c6}/128"), "dev", host_if])?;
        }
        for a in &self.host_addrs {
            let a = a.to_string();
            if a.contains(':') {
                ip(&["addr", "add", &format!("{a}/128"), "dev", host_if, "nodad"])?;
                ip(&[
                    "-n",
                    name,
                    "route",
                    "add",
                    &format!("{a}/128"),
                    "dev",
                    "ict0",
                    "src",
                    &c6,
                ])?;
            } else {
                ip(&["addr", "add", &format!("{a}/32"), "dev", host_if])?;
                ip(&[
                    "-n",
                    name,
                    "route",
                    "add",
                    &format!("{a}/32"),
                    "dev",
                    "ict0",
                    "src",
                    &c,
                ])?;
            }
        }
        Ok(())
    }

    /// The namespace's name (for `ip netns exec`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The IPv4 address of the namespace's end of the veth pair.
    pub fn container_addr(&self) -> IpAddr {
        self.container_addr
    }

    /// The IPv6 address of the namespace's end (configured only when a host address is IPv6).
    pub fn container_addr6(&self) -> IpAddr {
        self.container_addr6
    }

    /// `ip netns exec <name> program`: a command that runs inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `f` on a thread that has joined the namespace (sockets it opens live there).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, Error> {
        let path = format!("/run/netns/{}", self.name);
        let file = std::fs::File::open(&path).map_err(|e| Error(format!("{path}: {e}")))?;
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on a namespace file we opened; it changes only this thread's
                // network namespace, and the thread ends with the scope.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(Error(format!(
                        "setns {path}: {}",
                        std::io::Error::last_os_error()
                    )));
                }
                Ok(f())
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace deletes the veth pair with it; the host end too, explicitly,
        // in case the namespace was never made.
        let _ = ip(&["netns", "delete", &self.name]);
        let _ = ip(&["link", "delete", &self.host_if]);
    }
}

/// Turns duplicate address detection off on interface `dev` (in namespace `ns`, or the host's),
/// before it is brought up.
fn no_dad(ns: Option<&str>, dev: &str) -> Result<(), Error> {
    let path = format!("/proc/sys/net/ipv6/conf/{dev}/accept_dad");
    match ns {
        None => std::fs::write(&path, "0").map_err(|e| Error(format!("{path}: {e}"))),
        Some(ns) => ip(&["netns", "exec", ns, "sh", "-c", &format!("echo 0 > {path}")]).map(drop),
    }
}

/// Deletes namespaces (and so their veth pairs) left by test processes that no longer run.
fn sweep_stale() {
    let Ok(out) = ip(&["netns", "list"]) else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|r| r.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "delete", name]);
        }
    }
}
