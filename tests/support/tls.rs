//! TLS for the tests (`tests/tls.rs`): a private PKI (two unrelated CAs, server and client
//! certificates as PEM files), a `redis-server` that speaks only TLS, pubwarden started from a
//! settings file of the test's own (so `upstream.address` may be `rediss://`), and a small
//! blocking TLS client (rustls) that speaks RESP and shows the certificate a listener presented.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use rustls_pki_types::pem::PemObject;

use super::net::{Frames, Stop, free_port, http_get, http_status, loopback};
use super::procs::{WaitFor, scratch_dir, tail_file, wait_exit};
use super::resp::{encode, escape_short, frame_len};

/// Installs rustls's ring provider as the process default (for the `redis` crate's TLS).
pub fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

// ---------------------------------------------------------------------------------------------
// PKI.

/// Unix time (seconds) of midnight UTC on a date.
pub fn unix_ymd(year: i32, month: u8, day: u8) -> i64 {
    rcgen::date_time_ymd(year, month, day).unix_timestamp()
}

/// A certificate and its key, written as PEM files.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
    /// notAfter, Unix seconds.
    pub not_after: i64,
    /// The subject CN, for messages.
    pub cn: String,
}

impl Issued {
    /// The certificate chain and key for a rustls client.
    pub fn rustls_pair(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .unwrap_or_else(|e| panic!("parse key {}: {e:?}", self.key.display()));
        (vec![self.der.clone()], key)
    }

    /// Puts this certificate and key in place of `cert` and `key`, each by an atomic rename
    /// (written aside, then renamed over), the key first.
    pub fn install_as(&self, cert: &Path, key: &Path) {
        write_atomically(key, &self.key_pem);
        write_atomically(cert, &self.cert_pem);
    }
}

/// Writes `path` the way Kubernetes and editors do: write aside, then rename over.
pub fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension(format!("tmp{}", SEQ.fetch_add(1, Ordering::SeqCst)));
    std::fs::write(&tmp, text).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path)
        .unwrap_or_else(|e| panic!("rename {} to {}: {e}", tmp.display(), path.display()));
}

static SEQ: AtomicUsize = AtomicUsize::new(0);

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    file: PathBuf,
    pem: String,
}

fn ca_params(cn: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "pubwarden tests");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2045, 1, 1);
    params
}

impl Ca {
    fn new(dir: &Path, cn: &str, file_name: &str) -> Ca {
        let key = KeyPair::generate().expect("generate CA key");
        let params = ca_params(cn);
        let cert = params.self_signed(&key).expect("self-sign CA");
        let pem = cert.pem();
        let file = dir.join(file_name);
        std::fs::write(&file, &pem).unwrap_or_else(|e| panic!("write {}: {e}", file.display()));
        Ca {
            issuer: Issuer::new(params, key),
            file,
            pem,
        }
    }
}

/// What a leaf certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    Server,
    Client,
}

/// A CA and an unrelated second CA in a scratch directory, and certificates they sign.
pub struct Pki {
    pub dir: PathBuf,
    ca: Ca,
    other: Ca,
    /// The server certificate for 127.0.0.1 and localhost, signed by the CA (`server.crt`,
    /// `server.key`), valid until 2040-01-01.
    pub server: Issued,
}

impl Pki {
    pub fn new() -> Pki {
        install_provider();
        let dir = scratch_dir("pki");
        let ca = Ca::new(&dir, "pubwarden test CA", "ca.crt");
        let other = Ca::new(&dir, "pubwarden unrelated CA", "other-ca.crt");
        let server = issue(
            &dir,
            &ca,
            "server",
            "server.pubwarden.test",
            Usage::Server,
            (2040, 1, 1),
        );
        Pki {
            dir,
            ca,
            other,
            server,
        }
    }

    /// The CA's certificate file.
    pub fn ca_file(&self) -> &Path {
        &self.ca.file
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca.pem
    }

    /// The unrelated CA's certificate file.
    pub fn other_ca_file(&self) -> &Path {
        &self.other.file
    }

    /// A server certificate (SANs 127.0.0.1 and localhost, CN `<name>.pubwarden.test`) signed by
    /// the CA, valid until `not_after` (year, month, day), written as `<name>.crt`/`<name>.key`.
    pub fn issue_server(&self, name: &str, not_after: (i32, u8, u8)) -> Issued {
        issue(
            &self.dir,
            &self.ca,
            name,
            &format!("{name}.pubwarden.test"),
            Usage::Server,
            not_after,
        )
    }

    /// A client certificate with subject CN `cn` signed by the CA, as `<name>.crt`/`<name>.key`.
    pub fn issue_client(&self, name: &str, cn: &str) -> Issued {
        issue(&self.dir, &self.ca, name, cn, Usage::Client, (2040, 1, 1))
    }

    /// A client certificate with subject CN `cn` signed by the unrelated CA.
    pub fn issue_client_other_ca(&self, name: &str, cn: &str) -> Issued {
        issue(
            &self.dir,
            &self.other,
            name,
            cn,
            Usage::Client,
            (2040, 1, 1),
        )
    }

    /// A rustls client configuration trusting the CA, presenting `client` if given.
    pub fn client_config(&self, client: Option<&Issued>) -> Arc<ClientConfig> {
        client_config(&[self.ca_file()], client)
    }
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}

fn issue(
    dir: &Path,
    ca: &Ca,
    name: &str,
    cn: &str,
    usage: Usage,
    not_after: (i32, u8, u8),
) -> Issued {
    let sans = match usage {
        Usage::Server => vec!["127.0.0.1".to_string(), "localhost".to_string()],
        Usage::Client => Vec::new(),
    };
    let mut params = CertificateParams::new(sans).expect("leaf params");
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![match usage {
        Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
        Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
    }];
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().expect("generate leaf key");
    let cert = params
        .signed_by(&key, &ca.issuer)
        .unwrap_or_else(|e| panic!("sign {name}: {e}"));
    let cert_pem = cert.pem();
    let key_pem = key.serialize_pem();
    let cert_path = dir.join(format!("{name}.crt"));
    let key_path = dir.join(format!("{name}.key"));
    std::fs::write(&cert_path, &cert_pem)
        .unwrap_or_else(|e| panic!("write {}: {e}", cert_path.display()));
    std::fs::write(&key_path, &key_pem)
        .unwrap_or_else(|e| panic!("write {}: {e}", key_path.display()));
    Issued {
        cert: cert_path,
        key: key_path,
        cert_pem,
        key_pem,
        der: cert.der().clone(),
        not_after: unix_ymd(not_after.0, not_after.1, not_after.2),
        cn: cn.to_string(),
    }
}

/// A rustls client configuration (ring provider) trusting the CA files, presenting `client`.
pub fn client_config(ca_files: &[&Path], client: Option<&Issued>) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for file in ca_files {
        for cert in CertificateDer::pem_file_iter(file)
            .unwrap_or_else(|e| panic!("read {}: {e:?}", file.display()))
        {
            let cert = cert.unwrap_or_else(|e| panic!("parse {}: {e:?}", file.display()));
            roots
                .add(cert)
                .unwrap_or_else(|e| panic!("add {} to the roots: {e}", file.display()));
        }
    }
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("TLS versions of the ring provider")
            .with_root_certificates(roots);
    let config = match client {
        Some(issued) => {
            let (chain, key) = issued.rustls_pair();
            builder
                .with_client_auth_cert(chain, key)
                .unwrap_or_else(|e| panic!("client certificate {}: {e}", issued.cert.display()))
        }
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

/// The subject CN, serial (hex) and notAfter (Unix seconds) of a DER certificate.
pub fn describe_cert(der: &[u8]) -> (String, String, i64) {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("parse X.509 certificate");
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or("")
        .to_string();
    let serial = cert.raw_serial_as_string();
    let not_after = cert.validity().not_after.timestamp();
    (cn, serial, not_after)
}

// ---------------------------------------------------------------------------------------------
// A blocking TLS client speaking RESP.

/// How long connecting and the TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

enum Fill {
    Data,
    Eof,
    Timeout,
}

/// A TLS client connection (rustls over a std `TcpStream`), with the same reading helpers as
/// [`super::net::RawConn`].
pub struct TlsConn {
    stream: StreamOwned<ClientConnection, TcpStream>,
    buf: Vec<u8>,
    chunk: Vec<u8>,
    eof: bool,
    /// Why the connection ended, when it ended with an error (e.g. a TLS alert).
    pub error: Option<String>,
}

impl TlsConn {
    /// Connects and completes the handshake (panics on failure).
    pub fn connect(addr: SocketAddr, config: Arc<ClientConfig>) -> TlsConn {
        Self::try_connect(addr, config, "localhost")
            .unwrap_or_else(|e| panic!("TLS connect to {addr}: {e}"))
    }

    /// Connects and completes the handshake as the client sees it (with TLS 1.3 a server that
    /// rejects the client's certificate says so only after that: see [`TlsConn::probe`]).
    pub fn try_connect(
        addr: SocketAddr,
        config: Arc<ClientConfig>,
        server_name: &str,
    ) -> Result<TlsConn, String> {
        let mut sock = TcpStream::connect_timeout(&addr, HANDSHAKE_TIMEOUT)
            .map_err(|e| format!("TCP connect: {e}"))?;
        sock.set_nodelay(true).map_err(|e| e.to_string())?;
        sock.set_read_timeout(Some(HANDSHAKE_TIMEOUT))
            .map_err(|e| e.to_string())?;
        sock.set_write_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        let name = ServerName::try_from(server_name.to_string())
            .map_err(|e| format!("server name {server_name}: {e}"))?;
        let mut conn =
            ClientConnection::new(config, name).map_err(|e| format!("TLS client: {e}"))?;
        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        while conn.is_handshaking() {
            if Instant::now() >= deadline {
                return Err(format!("handshake took more than {HANDSHAKE_TIMEOUT:?}"));
            }
            match conn.complete_io(&mut sock) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(format!("handshake timed out: {e}"));
                }
                Err(e) => return Err(format!("handshake failed: {e}")),
            }
        }
        // Flush whatever the handshake left to send (the client's Finished with TLS 1.3).
        while conn.wants_write() {
            conn.write_tls(&mut sock)
                .map_err(|e| format!("handshake write: {e}"))?;
        }
        Ok(TlsConn {
            stream: StreamOwned::new(conn, sock),
            buf: Vec::new(),
            chunk: vec![0u8; 256 * 1024],
            eof: false,
            error: None,
        })
    }

    /// Connects, sends PING, and returns the first reply frame; Err with the reason if the
    /// handshake fails or the server closes (or sends an alert) before any reply.
    pub fn probe(addr: SocketAddr, config: Arc<ClientConfig>) -> Result<Vec<u8>, String> {
        let mut c = Self::try_connect(addr, config, "localhost")?;
        c.try_send(&encode(&["PING"]))
            .map_err(|e| format!("send PING: {e}"))?;
        let got = c.read_frames(1, HANDSHAKE_TIMEOUT);
        match got.frames.into_iter().next() {
            Some(f) => Ok(f),
            None => Err(format!(
                "no reply ({:?}): {}",
                got.stop,
                c.error
                    .clone()
                    .unwrap_or_else(|| "no error reported".into())
            )),
        }
    }

    /// The certificate chain the server presented (leaf first).
    pub fn peer_certificates(&self) -> Vec<CertificateDer<'static>> {
        self.stream
            .conn
            .peer_certificates()
            .map(|c| c.to_vec())
            .unwrap_or_default()
    }

    /// The leaf certificate the server presented.
    pub fn peer_leaf(&self) -> CertificateDer<'static> {
        self.peer_certificates()
            .into_iter()
            .next()
            .expect("the server presented no certificate")
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.try_send(bytes)
            .unwrap_or_else(|e| panic!("TLS send {}: {e}", escape_short(bytes, 100)));
    }

    pub fn try_send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    /// Sends one command (binary-safe arguments).
    pub fn send_args<A: AsRef<[u8]>>(&mut self, args: &[A]) {
        self.send(&encode(args));
    }

    pub fn is_eof(&self) -> bool {
        self.eof
    }

    fn fill(&mut self, deadline: Instant) -> Fill {
        if self.eof {
            return Fill::Eof;
        }
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Fill::Timeout;
            }
            let wait = (deadline - now).max(Duration::from_millis(1));
            self.stream
                .sock
                .set_read_timeout(Some(wait))
                .expect("set_read_timeout");
            match self.stream.read(&mut self.chunk) {
                Ok(0) => {
                    self.eof = true;
                    return Fill::Eof;
                }
                Ok(n) => {
                    self.buf.extend_from_slice(&self.chunk[..n]);
                    return Fill::Data;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
                    return Fill::Timeout;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    // A TLS alert, a reset, a close without close_notify: the connection is gone.
                    self.error = Some(e.to_string());
                    self.eof = true;
                    return Fill::Eof;
                }
            }
        }
    }

    /// Reads until `n` complete frames arrived, the peer closed, or `timeout` passed.
    pub fn read_frames(&mut self, n: usize, timeout: Duration) -> Frames {
        let deadline = Instant::now() + timeout;
        let mut frames = Vec::with_capacity(n.min(100_000));
        let mut start = 0usize;
        let stop = loop {
            while frames.len() < n {
                match frame_len(&self.buf[start..]) {
                    Ok(Some(len)) => {
                        frames.push(self.buf[start..start + len].to_vec());
                        start += len;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let partial = self.buf[start..].to_vec();
                        self.buf.clear();
                        return Frames {
                            frames,
                            stop: Stop::Garbage(e),
                            partial,
                        };
                    }
                }
            }
            if frames.len() >= n {
                break Stop::Done;
            }
            match self.fill(deadline) {
                Fill::Data => {}
                Fill::Eof => break Stop::Eof,
                Fill::Timeout => break Stop::Timeout,
            }
        };
        self.buf.drain(..start);
        let partial = if stop == Stop::Done {
            Vec::new()
        } else {
            self.buf.clone()
        };
        Frames {
            frames,
            stop,
            partial,
        }
    }

    /// Reads one frame, panicking with context if it does not arrive within `timeout`.
    pub fn read_one(&mut self, timeout: Duration) -> Vec<u8> {
        let got = self.read_frames(1, timeout);
        if got.stop != Stop::Done {
            panic!(
                "TLS read one frame: {:?} (error: {:?}), partial {}",
                got.stop,
                self.error,
                escape_short(&got.partial, 200)
            );
        }
        got.frames.into_iter().next().expect("one frame")
    }

    /// Sends one command and returns its reply frame.
    pub fn call(&mut self, args: &[&str]) -> Vec<u8> {
        self.send_args(args);
        let got = self.read_frames(1, Duration::from_secs(5));
        match got.frames.into_iter().next() {
            Some(f) => f,
            None => panic!(
                "{args:?} over TLS: no reply ({:?}, error {:?}), incomplete bytes {}",
                got.stop,
                self.error,
                escape_short(&got.partial, 200)
            ),
        }
    }

    /// Reads until no byte arrived for `idle`, or `max` passed, or EOF; returns what came.
    pub fn read_until_idle(&mut self, idle: Duration, max: Duration) -> (Vec<u8>, Stop) {
        let end = Instant::now() + max;
        let stop = loop {
            let now = Instant::now();
            if now >= end {
                break Stop::Timeout;
            }
            match self.fill((now + idle).min(end)) {
                Fill::Data => {}
                Fill::Eof => break Stop::Eof,
                Fill::Timeout => break Stop::Done,
            }
        };
        (std::mem::take(&mut self.buf), stop)
    }

    /// Reads until the peer closes (bytes, true) or `timeout` passes (false).
    pub fn read_until_eof(&mut self, timeout: Duration) -> (Vec<u8>, bool) {
        let deadline = Instant::now() + timeout;
        let eof = loop {
            match self.fill(deadline) {
                Fill::Data => {}
                Fill::Eof => break true,
                Fill::Timeout => break false,
            }
        };
        (std::mem::take(&mut self.buf), eof)
    }
}

// ---------------------------------------------------------------------------------------------
// redis-server with TLS only.

/// Whether a TLS Redis requires client certificates (`--tls-auth-clients`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisClientAuth {
    No,
    Yes,
}

/// A `redis-server` of the test's own that listens only on a TLS port (`--port 0`), with the
/// PKI's server certificate, killed on drop.
pub struct TlsRedis {
    child: Option<Child>,
    port: u16,
    log: PathBuf,
    /// What the tests themselves connect with (trusting the CA, with a client certificate
    /// when Redis requires one).
    pub client: Arc<ClientConfig>,
}

impl TlsRedis {
    pub fn start(pki: &Pki, auth: RedisClientAuth) -> TlsRedis {
        let dir = scratch_dir("redis-tls");
        let admin_cert = pki.issue_client("redis-test-client", "redis-test-client");
        let client = pki.client_config(match auth {
            RedisClientAuth::Yes => Some(&admin_cert),
            RedisClientAuth::No => None,
        });
        let mut last_err = String::new();
        for attempt in 0..5 {
            let port = free_port();
            let log = dir.join(format!("redis-tls-{port}-{attempt}.log"));
            let log_file = File::create(&log).expect("create redis log file");
            let log_file2 = log_file.try_clone().expect("clone redis log file");
            let path = |p: &Path| p.to_str().expect("utf-8 path").to_string();
            let spawned = Command::new("redis-server")
                .args([
                    "--port",
                    "0",
                    "--tls-port",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--tls-cert-file",
                    &path(&pki.server.cert),
                    "--tls-key-file",
                    &path(&pki.server.key),
                    "--tls-ca-cert-file",
                    &path(pki.ca_file()),
                    "--tls-auth-clients",
                    match auth {
                        RedisClientAuth::Yes => "yes",
                        RedisClientAuth::No => "no",
                    },
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--daemonize",
                    "no",
                    "--dir",
                    &path(&dir),
                ])
                .stdin(Stdio::null())
                .stdout(log_file)
                .stderr(log_file2)
                .spawn();
            let mut child = match spawned {
                Ok(c) => c,
                Err(e) if e.kind() == ErrorKind::NotFound => panic!(
                    "redis-server not found: install it with `apt-get install -y redis-server`"
                ),
                Err(e) => panic!("spawn redis-server: {e}"),
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    last_err = format!(
                        "redis-server (TLS port {port}) exited with {status}: {}",
                        tail_file(&log, 20)
                    );
                    break;
                }
                let last_probe = match TlsConn::probe(loopback(port), client.clone()) {
                    Ok(reply) if reply == b"+PONG\r\n" => {
                        return TlsRedis {
                            child: Some(child),
                            port,
                            log,
                            client,
                        };
                    }
                    Ok(reply) => escape_short(&reply, 200),
                    Err(e) => e,
                };
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "redis-server with TLS on port {port} did not answer PING over TLS \
                         within 10 s (last attempt: {last_probe}); log:\n{}",
                        tail_file(&log, 20)
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("redis-server with TLS did not start: {last_err}");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        loopback(self.port)
    }

    /// A TLS connection straight to Redis.
    pub fn connect(&self) -> TlsConn {
        TlsConn::connect(self.addr(), self.client.clone())
    }

    pub fn logs(&self) -> String {
        tail_file(&self.log, 50)
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- redis-server (TLS) log ({}) ----\n{}\n---- end ----",
                self.log.display(),
                tail_file(&self.log, 30)
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// pubwarden from a settings file of the test's own.

/// The placeholder in a settings body that [`TlsProxy::start`] replaces with the address of
/// the TLS listener it picked.
pub const TLS_LISTEN: &str = "{tls_listen}";

/// pubwarden started with `--config` and `--admin-listen` only (no `--upstream` or `--listen`
/// flag, which would win over `upstream.address` and `listen`, and `tls.only` decides about the
/// plaintext listener); killed on drop, printing its log if the test panics.
pub struct TlsProxy {
    child: Option<Child>,
    listen: SocketAddr,
    tls_listen: SocketAddr,
    admin: SocketAddr,
    stderr_path: PathBuf,
    /// The settings file it was started with.
    pub settings: PathBuf,
}

impl TlsProxy {
    /// Writes `listen: <free port>` and `body` (with [`TLS_LISTEN`] replaced; it must not have
    /// a top-level `listen:`) as `settings.yaml` in `dir` and starts
    /// pubwarden with it, waiting for `wait` (and, if the body has a `tls:` listener, for its
    /// port to accept TCP connections).
    pub fn start(dir: &Path, body: &str, wait: WaitFor) -> TlsProxy {
        Self::start_env(dir, body, wait, &[])
    }

    pub fn start_env(dir: &Path, body: &str, wait: WaitFor, env: &[(&str, &str)]) -> TlsProxy {
        let mut last_err = String::new();
        for attempt in 0..3 {
            let listen = loopback(free_port());
            let tls_listen = loopback(free_port());
            let admin = loopback(free_port());
            let settings = dir.join("settings.yaml");
            let text = format!(
                "listen: {listen}\n{}",
                body.replace(TLS_LISTEN, &tls_listen.to_string())
            );
            std::fs::write(&settings, text)
                .unwrap_or_else(|e| panic!("write {}: {e}", settings.display()));
            let stderr_path = dir.join(format!("pubwarden-{attempt}.stderr"));
            let stderr = File::create(&stderr_path).expect("create pubwarden stderr file");
            let child = Command::new(super::procs::Pubwarden::bin())
                .arg("--config")
                .arg(&settings)
                .arg("--admin-listen")
                .arg(admin.to_string())
                .envs(env.iter().copied())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn pubwarden: {e}"));
            let mut pw = TlsProxy {
                child: Some(child),
                listen,
                tls_listen,
                admin,
                stderr_path,
                settings: settings.clone(),
            };
            let path = match wait {
                WaitFor::Ready => "/readyz",
                WaitFor::Healthy => "/healthz",
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if !pw.is_running() {
                    let logs = pw.logs();
                    last_err = format!(
                        "pubwarden exited at start ({:?}); settings:\n{}\nstderr:\n{logs}",
                        pw.child.as_mut().and_then(|c| c.try_wait().ok().flatten()),
                        std::fs::read_to_string(&settings).unwrap_or_default()
                    );
                    pw.child = None;
                    if logs.to_lowercase().contains("address already in use") {
                        break; // a port was taken meanwhile: try other ports
                    }
                    panic!("{last_err}");
                }
                let tls_ok = !body.contains(TLS_LISTEN)
                    || TcpStream::connect_timeout(&tls_listen, Duration::from_millis(200)).is_ok();
                if tls_ok && http_status(admin, path) == Some(200) {
                    return pw;
                }
                if Instant::now() >= deadline {
                    let logs = pw.logs();
                    pw.kill();
                    panic!(
                        "pubwarden: {path} did not answer 200 (or the TLS listener {tls_listen} \
                         did not accept) within 10 s; settings:\n{}\nstderr:\n{logs}",
                        std::fs::read_to_string(&settings).unwrap_or_default()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("pubwarden did not start in 3 attempts: {last_err}");
    }

    /// The plaintext listener.
    pub fn addr(&self) -> SocketAddr {
        self.listen
    }

    /// The TLS listener.
    pub fn tls_addr(&self) -> SocketAddr {
        self.tls_listen
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("pubwarden was killed").id()
    }

    /// A plaintext connection.
    pub fn connect(&self) -> super::net::RawConn {
        super::net::RawConn::connect(self.listen)
    }

    /// A TLS connection to the TLS listener.
    pub fn connect_tls(&self, config: Arc<ClientConfig>) -> TlsConn {
        TlsConn::connect(self.tls_listen, config)
    }

    pub fn http_status(&self, path: &str) -> Option<u16> {
        http_status(self.admin, path)
    }

    /// `GET /metrics` (panics unless 200).
    pub fn metrics(&self) -> String {
        match http_get(self.admin, "/metrics") {
            Some((200, body)) => body,
            other => panic!("GET /metrics: {other:?}"),
        }
    }

    /// The sum of the samples of `name` whose labels include all of `labels` (None: no such
    /// series).
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        metric_value(&self.metrics(), name, labels)
    }

    /// Polls until `ok(value)` holds for [`TlsProxy::metric`] or `timeout` passes; returns the
    /// last value.
    pub fn wait_metric(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        timeout: Duration,
        ok: impl Fn(f64) -> bool,
    ) -> Option<f64> {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.metric(name, labels);
            if v.is_some_and(&ok) || Instant::now() >= deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Its stderr so far (the last 200 lines).
    pub fn logs(&self) -> String {
        tail_file(&self.stderr_path, 200)
    }

    /// Sends SIGHUP.
    pub fn sighup(&self) {
        let status = Command::new("kill")
            .args(["-HUP", &self.pid().to_string()])
            .status()
            .expect("run kill -HUP");
        assert!(status.success(), "kill -HUP failed: {status}");
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = wait_exit(&mut c, Duration::from_secs(5));
        }
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "---- pubwarden stderr ({}) ----\n{}\n---- end of pubwarden stderr ----",
                self.stderr_path.display(),
                self.logs()
            );
        }
    }
}

/// The sum of the samples of `name` in exposition text whose labels include every pair of
/// `labels` (in any order); None when there is no such series.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut total = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (label_text, value) = if let Some(inner) = rest.strip_prefix('{') {
            let Some((l, v)) = inner.split_once('}') else {
                continue;
            };
            (l, v)
        } else if rest.starts_with(' ') {
            ("", rest)
        } else {
            continue; // another metric whose name starts with `name`
        };
        let have: Vec<(String, String)> = split_labels(label_text);
        let all = labels
            .iter()
            .all(|(k, v)| have.iter().any(|(hk, hv)| hk == k && hv == v));
        if !all {
            continue;
        }
        let Some(v) = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        *total.get_or_insert(0.0) += v;
    }
    total
}

fn split_labels(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once("=\"") else {
            break;
        };
        let mut value = String::new();
        let mut end = after.len();
        let mut chars = after.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        value.push(if n == 'n' { '\n' } else { n });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.push((key.trim().trim_start_matches(',').trim().to_string(), value));
        rest = after[end..].trim_start_matches(',').trim();
    }
    out
}
