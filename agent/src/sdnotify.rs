//! systemd `Type=notify` integration: thin wrappers over `sd-notify`.
//!
//! Every function is a no-op when `NOTIFY_SOCKET` is unset (not started by systemd), and a
//! failure to notify is logged at debug level and otherwise ignored: the agent's job does not
//! depend on the service manager hearing from it.

use std::time::Duration;

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let mut msg = String::new();
    for st in states {
        msg.push_str(&st.to_string());
        msg.push('\n');
    }
    if let Err(e) = send_nonblocking(&path, msg.as_bytes()) {
        tracing::debug!("sd_notify failed: {e}");
    }
}

/// Sends one datagram without ever blocking the caller: a service manager that does not read
/// its socket (a full queue) costs a dropped notification, never a stalled agent. Supports
/// filesystem and abstract (`@…`) socket addresses.
fn send_nonblocking(path: &std::ffi::OsStr, msg: &[u8]) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::UnixDatagram;
    let sock = UnixDatagram::unbound()?;
    sock.set_nonblocking(true)?;
    match path.as_bytes().strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.connect_addr(&addr)?;
        }
        None => sock.connect(path)?,
    }
    let n = sock.send(msg)?;
    if n != msg.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::WriteZero,
            "incomplete notification",
        ));
    }
    Ok(())
}

/// `READY=1`: the agent holds its first credentials and serves them.
pub fn ready() {
    send(&[NotifyState::Ready]);
}

/// `WATCHDOG=1`: the agent is alive (send every [`watchdog_interval`] while healthy).
pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// The watchdog timeout (`WATCHDOG_USEC`, when `WATCHDOG_PID` is unset or ours), or `None`
/// when the watchdog is not enabled for this process. Call [`watchdog`] at least twice per
/// interval (systemd recommends every half interval).
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}

/// `STATUS=…`: one line shown by `systemctl status` (never a secret).
pub fn status(text: &str) {
    // A newline would end the status and start another assignment.
    let line = text.lines().next().unwrap_or("");
    send(&[NotifyState::Status(line)]);
}

/// `STOPPING=1`: shutdown started.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// `RELOADING=1` with `MONOTONIC_USEC` (needed by `Type=notify-reload`): a configuration reload
/// started; call [`ready`] when it is done.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_full_queue_never_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let _receiver = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        // Nobody reads: the queue fills up, and every further send must fail fast, not block.
        let mut failures = 0;
        for _ in 0..10_000 {
            if super::send_nonblocking(path.as_os_str(), b"STATUS=x\n").is_err() {
                failures += 1;
            }
        }
        assert!(failures > 0, "the queue never filled up");
    }

    #[test]
    fn abstract_addresses() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("iotcred-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = std::os::unix::net::UnixDatagram::bind_addr(&addr).unwrap();
        super::send_nonblocking(std::ffi::OsStr::new(&format!("@{name}")), b"READY=1\n").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\n");
    }
}
