//! systemd `Type=notify` integration: thin wrappers over `sd-notify`.
//!
//! Every function is a no-op when `NOTIFY_SOCKET` is unset (not started by systemd), and a
//! failure to notify is logged at debug level and otherwise ignored: the agent's job does not
//! depend on the service manager hearing from it.

use std::time::Duration;

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!("sd_notify failed: {e}");
    }
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
