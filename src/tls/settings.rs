//! The `tls:` and `upstream.tls:` sections of the settings file.
//!
//! Files are read and checked while the settings are parsed, so
//! `check-config` and a start with bad material fail the same way, with the
//! key path of each problem.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use super::material::{self, Built};
use crate::config::yaml::boolean;
use crate::config::yaml::{self, MapView, Pos, Reader};

/// Whether clients of the TLS listener must present a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    None,
    Optional,
    Required,
}

impl ClientAuth {
    fn as_str(self) -> &'static str {
        match self {
            ClientAuth::None => "none",
            ClientAuth::Optional => "optional",
            ClientAuth::Required => "required",
        }
    }
}

/// Material built from files, swapped whole on rotation and shared by every
/// clone of the settings. Settings compare by their file names, not by this.
pub struct Live<T>(Arc<ArcSwap<Built<T>>>);

impl<T> Clone for Live<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T> PartialEq for Live<T> {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl<T> fmt::Debug for Live<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Live(..)")
    }
}

impl<T> Live<T> {
    fn new(built: Built<T>) -> Self {
        Self(Arc::new(ArcSwap::from_pointee(built)))
    }

    /// The configuration new handshakes use.
    pub fn config(&self) -> Arc<T> {
        self.0.load().config.clone()
    }

    pub fn expiries(&self) -> Vec<(&'static str, i64)> {
        self.0.load().expiries.clone()
    }

    pub fn fingerprint(&self) -> [u8; 32] {
        self.0.load().fingerprint
    }

    pub fn replace(&self, built: Built<T>) {
        self.0.store(Arc::new(built));
    }
}

/// `tls:` — a TLS listener for clients.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerTls {
    pub listen: SocketAddr,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub client_ca_file: Option<PathBuf>,
    pub client_auth: ClientAuth,
    pub handshake_timeout: Duration,
    /// No plaintext listener at all.
    pub only: bool,
    pub live: Live<rustls::ServerConfig>,
}

/// `upstream.tls:` (or a `rediss://` address) — TLS to Redis.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamTls {
    /// `None`: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// SNI and the name verified; `None`: the address's host.
    pub server_name: Option<String>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub insecure_skip_verify: bool,
    pub live: Live<rustls::ClientConfig>,
}

fn path(t: &str) -> Result<PathBuf, String> {
    let t = t.trim();
    if t.is_empty() {
        Err("must be a file path".into())
    } else {
        Ok(PathBuf::from(t))
    }
}

/// Reports a file problem at the key it concerns.
fn report(r: &mut Reader, section: &str, e: material::MaterialError) {
    r.error(&yaml::join(section, e.key), Pos::default(), e.message);
}

/// Reads `tls:`; `None` when absent.
pub fn read_listener(r: &mut Reader, root: &Option<MapView<'_>>) -> Option<ListenerTls> {
    root.as_ref()?.get("tls")?;
    let m = r.section(
        root,
        "tls",
        &[
            "listen",
            "cert_file",
            "key_file",
            "client_ca_file",
            "client_auth",
            "handshake_timeout",
            "only",
        ],
    );
    let missing = |r: &mut Reader, key: &str| {
        r.error(
            &format!("tls.{key}"),
            Pos::default(),
            "is required for the TLS listener",
        );
    };
    let listen = r.field(&m, "listen", |t| {
        t.trim()
            .parse::<SocketAddr>()
            .map_err(|_| format!("`{t}` is not an IP:port address (e.g. 0.0.0.0:6390)"))
    });
    let cert_file = r.field(&m, "cert_file", path);
    let key_file = r.field(&m, "key_file", path);
    let client_ca_file = r.field(&m, "client_ca_file", path);
    let client_auth = r.field(&m, "client_auth", |t| match t.trim() {
        "none" => Ok(ClientAuth::None),
        "optional" => Ok(ClientAuth::Optional),
        "required" => Ok(ClientAuth::Required),
        other => Err(format!(
            "`{other}` is not a client_auth mode (use none, optional or required)"
        )),
    });
    let handshake_timeout = r
        .field(&m, "handshake_timeout", |t| {
            yaml::duration(t).and_then(|d| {
                if d.is_zero() {
                    Err("must be longer than zero".into())
                } else {
                    Ok(d)
                }
            })
        })
        .unwrap_or(Duration::from_secs(5));
    let only = r.field(&m, "only", boolean).unwrap_or(false);
    let client_auth = match (client_auth, &client_ca_file) {
        (Some(ClientAuth::None) | None, None) => ClientAuth::None,
        (Some(auth), None) => {
            r.error(
                "tls.client_auth",
                Pos::default(),
                format!("`{}` needs tls.client_ca_file (the CAs client certificates are verified against)", auth.as_str()),
            );
            auth
        }
        (Some(auth), Some(_)) => auth,
        (None, Some(_)) => ClientAuth::Required,
    };
    if listen.is_none() {
        missing(r, "listen");
    }
    if cert_file.is_none() {
        missing(r, "cert_file");
    }
    if key_file.is_none() {
        missing(r, "key_file");
    }
    let (listen, cert_file, key_file) = (listen?, cert_file?, key_file?);
    let built = material::server_config(
        &cert_file,
        &key_file,
        client_ca_file.as_deref(),
        client_auth,
    )
    .map_err(|e| report(r, "tls", e))
    .ok()?;
    Some(ListenerTls {
        listen,
        cert_file,
        key_file,
        client_ca_file,
        client_auth,
        handshake_timeout,
        only,
        live: Live::new(built),
    })
}

impl ListenerTls {
    /// Builds the configuration again from the files (a rotation).
    pub fn rebuild(&self) -> Result<Built<rustls::ServerConfig>, material::MaterialError> {
        material::server_config(
            &self.cert_file,
            &self.key_file,
            self.client_ca_file.as_deref(),
            self.client_auth,
        )
    }
}

impl UpstreamTls {
    /// Builds the configuration again from the files (a rotation).
    pub fn rebuild(&self) -> Result<Built<rustls::ClientConfig>, material::MaterialError> {
        material::client_config(
            self.ca_file.as_deref(),
            self.cert_file.as_deref().zip(self.key_file.as_deref()),
            self.insecure_skip_verify,
        )
    }
}

/// Reads `upstream.tls:`. `scheme_tls`: the address was `rediss://`.
pub fn read_upstream(
    r: &mut Reader,
    up: &Option<MapView<'_>>,
    scheme_tls: Option<bool>,
) -> Option<UpstreamTls> {
    read_client(r, up, scheme_tls, "upstream.tls")
}

/// Reads a client-side TLS section (`upstream.tls`, `upstream.sentinel.tls`)
/// at `at`, a `tls` key of `parent`.
pub fn read_client(
    r: &mut Reader,
    up: &Option<MapView<'_>>,
    scheme_tls: Option<bool>,
    at: &str,
) -> Option<UpstreamTls> {
    let present = up.as_ref().and_then(|m| m.get("tls")).is_some();
    if scheme_tls == Some(false) && present {
        r.error(
            at,
            Pos::default(),
            "upstream.address says redis:// (plaintext): use rediss:// or a plain host:port with upstream.tls",
        );
        return None;
    }
    if !present && scheme_tls != Some(true) {
        return None;
    }
    let m = r.section(
        up,
        "tls",
        &[
            "ca_file",
            "server_name",
            "cert_file",
            "key_file",
            "insecure_skip_verify",
        ],
    );
    let ca_file = r.field(&m, "ca_file", path);
    let server_name = r.field(&m, "server_name", |t| {
        let t = t.trim();
        rustls::pki_types::ServerName::try_from(t.to_string())
            .map(|_| t.to_string())
            .map_err(|_| format!("`{t}` is not a DNS name or IP address"))
    });
    let cert_file = r.field(&m, "cert_file", path);
    let key_file = r.field(&m, "key_file", path);
    let insecure_skip_verify = r
        .field(&m, "insecure_skip_verify", boolean)
        .unwrap_or(false);
    match (&cert_file, &key_file) {
        (Some(_), None) => r.error(
            &format!("{at}.cert_file"),
            Pos::default(),
            format!("needs {at}.key_file"),
        ),
        (None, Some(_)) => r.error(
            &format!("{at}.key_file"),
            Pos::default(),
            format!("needs {at}.cert_file"),
        ),
        _ => {}
    }
    if insecure_skip_verify && ca_file.is_some() {
        r.error(
            &format!("{at}.insecure_skip_verify"),
            Pos::default(),
            format!("contradicts {at}.ca_file (verification against it would be skipped)"),
        );
    }
    let built = material::client_config(
        ca_file.as_deref(),
        cert_file.as_deref().zip(key_file.as_deref()),
        insecure_skip_verify,
    )
    .map_err(|e| report(r, at, e))
    .ok()?;
    Some(UpstreamTls {
        ca_file,
        server_name,
        cert_file,
        key_file,
        insecure_skip_verify,
        live: Live::new(built),
    })
}

/// `rediss://` given on the command line: TLS with the system's roots.
pub fn default_upstream() -> Result<UpstreamTls, String> {
    let built = material::client_config(None, None, false).map_err(|e| e.message)?;
    Ok(UpstreamTls {
        ca_file: None,
        server_name: None,
        cert_file: None,
        key_file: None,
        insecure_skip_verify: false,
        live: Live::new(built),
    })
}

/// `check-config`'s view of `tls:`.
pub fn print_listener(f: &mut fmt::Formatter<'_>, s: &ListenerTls) -> fmt::Result {
    writeln!(f, "tls:")?;
    writeln!(f, "  listen: {}", s.listen)?;
    writeln!(f, "  cert_file: {}", s.cert_file.display())?;
    writeln!(f, "  key_file: {}", s.key_file.display())?;
    if let Some(ca) = &s.client_ca_file {
        writeln!(f, "  client_ca_file: {}", ca.display())?;
    }
    writeln!(f, "  client_auth: {}", s.client_auth.as_str())?;
    writeln!(
        f,
        "  handshake_timeout: {}ms",
        s.handshake_timeout.as_millis()
    )?;
    writeln!(f, "  only: {}", s.only)
}

/// `check-config`'s view of `upstream.tls:` (and, indented further,
/// `upstream.sentinel.tls:`).
pub fn print_upstream(f: &mut fmt::Formatter<'_>, s: &UpstreamTls, indent: &str) -> fmt::Result {
    writeln!(f, "{indent}tls:")?;
    let i = format!("{indent}  ");
    if let Some(ca) = &s.ca_file {
        writeln!(f, "{i}ca_file: {}", ca.display())?;
    }
    if let Some(n) = &s.server_name {
        writeln!(f, "{i}server_name: {n}")?;
    }
    if let Some(c) = &s.cert_file {
        writeln!(f, "{i}cert_file: {}", c.display())?;
    }
    if let Some(k) = &s.key_file {
        writeln!(f, "{i}key_file: {}", k.display())?;
    }
    if s.insecure_skip_verify {
        writeln!(
            f,
            "{i}# WARNING: insecure_skip_verify is on: the server's certificate is NOT verified;\n{i}# anyone on the path can read and change the traffic."
        )?;
    }
    writeln!(f, "{i}insecure_skip_verify: {}", s.insecure_skip_verify)
}
