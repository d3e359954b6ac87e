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

pub use settings::{ClientAuth, ListenerTls, UpstreamTls};

use crate::metrics::Metrics;

/// Every value [`failure_reason`] returns.
pub const FAILURE_REASONS: [&str; 8] = [
    "unknown_ca",
    "bad_certificate",
    "expired",
    "no_certificate",
    "name_mismatch",
    "protocol",
    "timeout",
    "io",
];

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
}

impl crate::reload::Reload for Reloader {
    fn reload_now(&self, trigger: &'static str, force: bool) {
        let _ = self.reload(trigger, force);
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

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use crate::config::{Overrides, Settings};

    /// A CA and a server and client certificate it signed, as PEM files.
    struct Pki {
        dir: PathBuf,
    }

    impl Pki {
        fn new(tag: &str) -> Pki {
            let dir =
                std::env::temp_dir().join(format!("pubwarden-tls-{tag}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("scratch dir");
            let mut ca_params =
                rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
            ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            ca_params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "test CA");
            let ca_key = rcgen::KeyPair::generate().expect("key");
            let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("CA");
            std::fs::write(dir.join("ca.crt"), ca.pem()).expect("write");
            for (name, sans, cn) in [
                (
                    "server",
                    vec!["localhost".to_string(), "127.0.0.1".to_string()],
                    "localhost",
                ),
                (
                    "client",
                    vec![
                        "orders.prod.svc".to_string(),
                        "spiffe://prod/sa/orders".to_string(),
                    ],
                    "orders-client",
                ),
            ] {
                let mut params = rcgen::CertificateParams::new(sans).expect("params");
                params
                    .distinguished_name
                    .push(rcgen::DnType::CommonName, cn);
                let key = rcgen::KeyPair::generate().expect("key");
                let cert = params.signed_by(&key, &ca).expect("sign");
                std::fs::write(dir.join(format!("{name}.crt")), cert.pem()).expect("write");
                std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem())
                    .expect("write");
            }
            Pki { dir }
        }

        fn path(&self, name: &str) -> String {
            self.dir.join(name).display().to_string()
        }
    }

    impl Drop for Pki {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn errors(yaml: &str) -> String {
        match Settings::from_yaml(yaml, &Overrides::default()) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn listener_and_upstream_settings_load_and_print_back() {
        let pki = Pki::new("load");
        let yaml = format!(
            "tls:\n  listen: 127.0.0.1:6390\n  cert_file: {}\n  key_file: {}\n  client_ca_file: {}\nupstream:\n  address: rediss://localhost:6379\n  tls:\n    ca_file: {}\n    cert_file: {}\n    key_file: {}\n",
            pki.path("server.crt"),
            pki.path("server.key"),
            pki.path("ca.crt"),
            pki.path("ca.crt"),
            pki.path("client.crt"),
            pki.path("client.key"),
        );
        let s = Settings::from_yaml(&yaml, &Overrides::default()).expect("valid");
        let listener = s.tls.as_ref().expect("listener");
        assert_eq!(listener.client_auth, super::ClientAuth::Required);
        let labels: Vec<&str> = listener.live.expiries().iter().map(|e| e.0).collect();
        assert_eq!(labels, ["listener", "client_ca"]);
        let up = s.upstream.tls.as_ref().expect("upstream tls");
        assert_eq!(s.upstream.address, "localhost:6379");
        let labels: Vec<&str> = up.live.expiries().iter().map(|e| e.0).collect();
        assert_eq!(labels, ["upstream_ca", "upstream_client"]);
        // check-config's output is itself a valid settings file, equal to this one.
        let again = Settings::from_yaml(&s.to_string(), &Overrides::default()).expect("reparse");
        assert_eq!(again, s);
    }

    #[test]
    fn every_file_problem_is_reported_at_its_key() {
        let pki = Pki::new("errors");
        let yaml = format!(
            "tls:\n  listen: 127.0.0.1:6390\n  cert_file: {}\n  key_file: {}\n  client_auth: required\nupstream:\n  tls:\n    cert_file: {}\n",
            pki.path("server.crt"),
            pki.path("client.key"),
            pki.path("client.crt"),
        );
        let e = errors(&yaml);
        assert!(e.contains("tls.client_auth"), "{e}");
        assert!(e.contains("needs tls.client_ca_file"), "{e}");
        assert!(e.contains("upstream.tls.cert_file"), "{e}");
        assert!(e.contains("needs upstream.tls.key_file"), "{e}");
        assert!(e.contains("tls.key_file"), "{e}");
        assert!(e.contains("does not match"), "{e}");

        let missing = errors(&format!(
            "tls:\n  listen: 127.0.0.1:6390\n  cert_file: {}\n  key_file: {}\n",
            pki.path("nope.crt"),
            pki.path("server.key")
        ));
        assert!(
            missing.contains("tls.cert_file") && missing.contains("cannot read"),
            "{missing}"
        );
        // A certificate given as the key: named, never printed.
        let wrong = errors(&format!(
            "tls:\n  listen: 127.0.0.1:6390\n  cert_file: {c}\n  key_file: {c}\n",
            c = pki.path("server.crt")
        ));
        assert!(wrong.contains("no PEM private key"), "{wrong}");
        assert!(!wrong.contains("BEGIN"), "{wrong}");
        let key_text = std::fs::read_to_string(Path::new(&pki.path("server.key"))).expect("key");
        let garbage = errors(&format!(
            "tls:\n  listen: 127.0.0.1:6390\n  cert_file: {c}\n  key_file: {c}\n",
            c = pki.path("server.key")
        ));
        assert!(garbage.contains("no PEM certificate"), "{garbage}");
        for line in key_text.lines().filter(|l| !l.starts_with("-----")) {
            assert!(
                !garbage.contains(line),
                "key material in an error: {garbage}"
            );
        }
    }

    #[test]
    fn upstream_addresses() {
        let e = errors("upstream:\n  address: rediss://user:secret@redis:6379\n");
        assert!(e.contains("credentials in the address"), "{e}");
        assert!(!e.contains("secret"), "{e}");
        assert!(errors("upstream:\n  address: redis://redis:6379/3\n").contains("database"));
        assert!(
            errors("upstream:\n  address: http://redis:6379\n").contains("not an upstream scheme")
        );
        let e = errors(
            "upstream:\n  address: redis://redis:6379\n  tls:\n    insecure_skip_verify: true\n",
        );
        assert!(e.contains("upstream.tls"), "{e}");
        let s = Settings::from_yaml(
            "upstream:\n  address: redis://redis:6379/0\n",
            &Overrides::default(),
        )
        .expect("plain URL");
        assert_eq!(s.upstream.address, "redis:6379");
        assert!(s.upstream.tls.is_none());
        let s = Settings::from_yaml(
            "upstream:\n  address: 10.0.0.5:6380\n  tls:\n    insecure_skip_verify: true\n",
            &Overrides::default(),
        )
        .expect("insecure is allowed, loudly");
        let printed = s.to_string();
        assert!(
            printed.contains("# WARNING: insecure_skip_verify"),
            "{printed}"
        );
        let name = super::server_name(s.upstream.tls.as_ref().expect("tls"), &s.upstream.address)
            .expect("an IP is a server name");
        assert_eq!(
            format!("{name:?}"),
            format!(
                "{:?}",
                rustls::pki_types::ServerName::try_from("10.0.0.5").expect("ip")
            )
        );
    }

    #[test]
    fn client_certificate_identities() {
        let pki = Pki::new("ids");
        let pem = std::fs::read(pki.path("client.crt")).expect("cert");
        use rustls::pki_types::pem::PemObject;
        let der = rustls::pki_types::CertificateDer::from_pem_slice(&pem).expect("der");
        let ids = super::material::identities(&der);
        assert!(ids.contains(&"cn:orders-client".to_string()), "{ids:?}");
        assert!(ids.contains(&"dns:orders.prod.svc".to_string()), "{ids:?}");
        let server = std::fs::read(pki.path("server.crt")).expect("cert");
        let der = rustls::pki_types::CertificateDer::from_pem_slice(&server).expect("der");
        assert!(super::material::identities(&der).contains(&"ip:127.0.0.1".to_string()));
    }

    #[test]
    fn handshake_failures_are_classified() {
        use rustls::{CertificateError, Error};
        let wrap = |e: Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        assert_eq!(
            super::failure_reason(&wrap(Error::InvalidCertificate(
                CertificateError::UnknownIssuer
            ))),
            "unknown_ca"
        );
        assert_eq!(
            super::failure_reason(&wrap(Error::InvalidCertificate(CertificateError::Expired))),
            "expired"
        );
        assert_eq!(
            super::failure_reason(&wrap(Error::InvalidCertificate(
                CertificateError::NotValidForName
            ))),
            "name_mismatch"
        );
        assert_eq!(
            super::failure_reason(&wrap(Error::NoCertificatesPresented)),
            "no_certificate"
        );
        assert_eq!(
            super::failure_reason(&wrap(Error::AlertReceived(
                rustls::AlertDescription::UnknownCA
            ))),
            "unknown_ca"
        );
        assert_eq!(
            super::failure_reason(&wrap(Error::DecryptError)),
            "protocol"
        );
        assert_eq!(
            super::failure_reason(&std::io::Error::from(std::io::ErrorKind::TimedOut)),
            "timeout"
        );
        assert_eq!(
            super::failure_reason(&std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
            "io"
        );
    }
}
