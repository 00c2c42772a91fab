//! systemd readiness (`Type=notify` units): `READY=1` once a process serves, `STOPPING=1` when it
//! begins to stop. Outside systemd (`NOTIFY_SOCKET` unset) these do nothing.

use sd_notify::NotifyState;

/// Tells systemd the service is up, with a one-line status (`systemctl status` shows it).
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Tells systemd the service is stopping.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

fn send(state: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "could not notify systemd");
    }
}
