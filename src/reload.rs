//! When live configuration is read again: every `interval` (content
//! compared by the reloader, so an unchanged file is no reload) and on every
//! SIGHUP (forced). Shared by the policy and the TLS material.

use std::sync::Arc;
use std::time::Duration;

/// Something that re-reads its files. `force`: reload even if unchanged.
pub trait Reload: Send + Sync + 'static {
    fn reload_now(&self, trigger: &'static str, force: bool);
}

/// Re-reads every `interval`, for ever. File I/O and parsing stay off the
/// relay's threads.
pub async fn watch<R: Reload>(reloader: Arc<R>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let r = reloader.clone();
        let _ = tokio::task::spawn_blocking(move || r.reload_now("file change", false)).await;
    }
}

/// Re-reads on every SIGHUP, for ever.
pub async fn on_sighup<R: Reload>(reloader: Arc<R>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot watch SIGHUP; reload with POST /reload or by editing the files");
        return;
    };
    while hup.recv().await.is_some() {
        let r = reloader.clone();
        let _ = tokio::task::spawn_blocking(move || r.reload_now("SIGHUP", true)).await;
    }
}
