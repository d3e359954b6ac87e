//! TLS on both sides: a TLS listener for clients (optionally verifying
//! client certificates, which can name the policy user), and TLS to Redis
//! (verified against the system's or a given CA, optionally with a client
//! certificate).
//!
//! Handshakes run through tokio-rustls; afterwards the connection's rustls
//! state machine is handed to [`crate::transport`], which the relay drives
//! without blocking. Certificates, keys and CAs are re-read when their files
//! change (content compared every second), on SIGHUP and on `POST /reload`:
//! new handshakes use the new material, established connections keep theirs.

pub mod material;
pub mod settings;

use std::io;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

pub use settings::{ClientAuth, ListenerTls, UpstreamTls};

use crate::metrics::Metrics;

/// Why a handshake failed, as the `reason` label of
/// `pubwarden_tls_handshake_failures_total`.
pub fn failure_reason(e: &io::Error) -> &'static str {
    use rustls::{AlertDescription, CertificateError, Error};
    if e.kind() == io::ErrorKind::TimedOut {
        return "timeout";
    }
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<Error>()) else {
        return "io";
    };
    match tls {
        Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => "unknown_ca",
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                "name_mismatch"
            }
            _ => "bad_certificate",
        },
        Error::NoCertificatesPresented => "no_certificate",
        Error::AlertReceived(a) => match a {
            AlertDescription::UnknownCA => "unknown_ca",
            AlertDescription::CertificateExpired => "expired",
            AlertDescription::CertificateRequired => "no_certificate",
            AlertDescription::BadCertificate
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateRevoked => "bad_certificate",
            _ => "protocol",
        },
        _ => "protocol",
    }
}

/// A handshake error as people read it: rustls's own words.
pub fn describe(e: &io::Error) -> String {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(tls) => tls.to_string(),
        None => e.to_string(),
    }
}

/// Re-reads TLS material when its files change.
pub struct Reloader {
    listener: Option<ListenerTls>,
    upstream: Option<UpstreamTls>,
    metrics: Arc<Metrics>,
    /// Fingerprints of contents that failed, so a bad file is reported once
    /// per change rather than every second.
    failed: Mutex<[Option<[u8; 32]>; 2]>,
}

impl Reloader {
    /// `None` when nothing uses TLS.
    pub fn new(
        listener: Option<ListenerTls>,
        upstream: Option<UpstreamTls>,
        metrics: Arc<Metrics>,
    ) -> Option<Self> {
        if listener.is_none() && upstream.is_none() {
            return None;
        }
        let me = Self {
            listener,
            upstream,
            metrics,
            failed: Mutex::new([None, None]),
        };
        me.publish_expiries();
        Some(me)
    }

    fn publish_expiries(&self) {
        let mut all = Vec::new();
        if let Some(l) = &self.listener {
            all.extend(l.live.expiries());
        }
        if let Some(u) = &self.upstream {
            all.extend(u.live.expiries());
        }
        for (which, at) in all {
            self.metrics.tls_certificate_expiry(which, at);
        }
    }

    /// Re-reads every file; rebuilds what changed (or all, with `force`).
    /// Returns the problems found, each as `setting: message`.
    pub fn reload(&self, trigger: &str, force: bool) -> Result<bool, Vec<String>> {
        let mut errors = Vec::new();
        let mut changed = false;
        let Ok(mut failed) = self.failed.lock() else {
            return Ok(false);
        };
        if let Some(l) = &self.listener {
            match l.rebuild() {
                Ok(built) if force || built.fingerprint != l.live.fingerprint() => {
                    l.live.replace(built);
                    failed[0] = None;
                    changed = true;
                }
                Ok(_) => failed[0] = None,
                Err(e) => errors.push((0, format!("tls.{}: {}", e.key, e.message))),
            }
        }
        if let Some(u) = &self.upstream {
            match u.rebuild() {
                Ok(built) if force || built.fingerprint != u.live.fingerprint() => {
                    u.live.replace(built);
                    failed[1] = None;
                    changed = true;
                }
                Ok(_) => failed[1] = None,
                Err(e) => errors.push((1, format!("upstream.tls.{}: {}", e.key, e.message))),
            }
        }
        if changed {
            self.metrics.tls_reload(true);
            self.publish_expiries();
            tracing::info!(trigger, "TLS certificates reloaded");
        }
        if errors.is_empty() {
            return Ok(changed);
        }
        // A file mid-rotation fails the same way each second: report it once
        // per distinct content (or whenever an operator asks).
        let mut new_failure = force;
        for (side, message) in &errors {
            let fp: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(message.as_bytes()).into();
            if failed[*side] != Some(fp) {
                failed[*side] = Some(fp);
                new_failure = true;
            }
        }
        if new_failure {
            self.metrics.tls_reload(false);
            for (_, message) in &errors {
                tracing::error!(
                    trigger,
                    "TLS reload failed, the previous certificates stay in use: {message}"
                );
            }
        }
        Err(errors.into_iter().map(|(_, m)| m).collect())
    }

    /// Polls the files for ever.
    pub async fn watch(self: Arc<Self>, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let me = self.clone();
            let _ = tokio::task::spawn_blocking(move || me.reload("file change", false)).await;
        }
    }

    /// Reloads on every SIGHUP, for ever.
    pub async fn on_sighup(self: Arc<Self>) {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            let me = self.clone();
            let _ = tokio::task::spawn_blocking(move || me.reload("SIGHUP", true)).await;
        }
    }
}

/// A client's TLS handshake on the listener, within its timeout.
pub async fn accept(
    settings: &ListenerTls,
    tcp: tokio::net::TcpStream,
) -> io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
    let acceptor = tokio_rustls::TlsAcceptor::from(settings.live.config());
    tokio::time::timeout(settings.handshake_timeout, acceptor.accept(tcp))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))?
}

/// The name the upstream certificate must carry: `server_name`, else the
/// address's host.
pub fn server_name(
    settings: &UpstreamTls,
    address: &str,
) -> io::Result<rustls::pki_types::ServerName<'static>> {
    let host = match &settings.server_name {
        Some(n) => n.as_str(),
        None => {
            let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
            host.trim_start_matches('[').trim_end_matches(']')
        }
    };
    rustls::pki_types::ServerName::try_from(host.to_string()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("`{host}` is not a valid TLS server name; set upstream.tls.server_name"),
        )
    })
}
