//! systemd readiness (`READY=1` to `$NOTIFY_SOCKET`; nothing happens without that variable).

pub fn ready() {
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        log::warn!("notifying systemd of readiness: {e}");
    }
}

pub fn stopping() {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
}
