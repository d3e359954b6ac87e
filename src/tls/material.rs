//! Certificates and keys from PEM files, and the rustls configurations built
//! from them. Errors name the file and the problem, never key material.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use sha2::{Digest, Sha256};

use super::settings::ClientAuth;

/// ring, chosen explicitly per configuration: no process-wide default to
/// install, and aws-lc is never built.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A problem with one configured file: which setting, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaterialError {
    /// The setting's key (`cert_file`, `key_file`, ...).
    pub key: &'static str,
    pub message: String,
}

fn err(key: &'static str, message: impl Into<String>) -> MaterialError {
    MaterialError {
        key,
        message: message.into(),
    }
}

/// A configuration built from files, with what the metrics report of them.
pub struct Built<T> {
    pub config: Arc<T>,
    /// (certificate label, Unix time of the earliest notAfter).
    pub expiries: Vec<(&'static str, i64)>,
    /// Hash of every file's content, to see a rotation.
    pub fingerprint: [u8; 32],
}

/// Reads each file once, for both the fingerprint and the parse.
struct Files {
    hash: Sha256,
}

impl Files {
    fn new() -> Self {
        Self {
            hash: Sha256::new(),
        }
    }

    fn read(&mut self, key: &'static str, path: &Path) -> Result<Vec<u8>, MaterialError> {
        let bytes = std::fs::read(path)
            .map_err(|e| err(key, format!("cannot read {}: {e}", path.display())))?;
        self.hash.update((bytes.len() as u64).to_le_bytes());
        self.hash.update(&bytes);
        Ok(bytes)
    }

    fn certs(
        &mut self,
        key: &'static str,
        path: &Path,
    ) -> Result<Vec<CertificateDer<'static>>, MaterialError> {
        let bytes = self.read(key, path)?;
        let certs = CertificateDer::pem_slice_iter(&bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| err(key, format!("{} is not valid PEM: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(err(
                key,
                format!("no PEM certificate found in {}", path.display()),
            ));
        }
        for c in &certs {
            if x509_parser::parse_x509_certificate(c).is_err() {
                return Err(err(
                    key,
                    format!(
                        "{} holds a certificate that cannot be parsed",
                        path.display()
                    ),
                ));
            }
        }
        Ok(certs)
    }

    fn key(
        &mut self,
        key: &'static str,
        path: &Path,
    ) -> Result<PrivateKeyDer<'static>, MaterialError> {
        let bytes = self.read(key, path)?;
        // The parser's own messages may quote a line of the file: say only
        // what is wrong, never what is in it.
        PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
            rustls::pki_types::pem::Error::NoItemsFound => err(
                key,
                format!(
                    "no PEM private key (PKCS#8, PKCS#1 or SEC1) found in {}",
                    path.display()
                ),
            ),
            _ => err(
                key,
                format!("{} is not a valid PEM private key", path.display()),
            ),
        })
    }

    fn roots(
        &mut self,
        key: &'static str,
        path: &Path,
    ) -> Result<(RootCertStore, i64), MaterialError> {
        let certs = self.certs(key, path)?;
        let expiry = earliest_expiry(&certs);
        let mut roots = RootCertStore::empty();
        for c in certs {
            roots.add(c).map_err(|e| {
                err(
                    key,
                    format!("{}: not usable as a CA certificate: {e}", path.display()),
                )
            })?;
        }
        Ok((roots, expiry))
    }

    fn done(self) -> [u8; 32] {
        self.hash.finalize().into()
    }
}

/// The earliest notAfter among `certs`, as Unix time (0 if none parses).
fn earliest_expiry(certs: &[CertificateDer<'_>]) -> i64 {
    certs
        .iter()
        .filter_map(|c| x509_parser::parse_x509_certificate(c).ok())
        .map(|(_, cert)| cert.validity().not_after.timestamp())
        .min()
        .unwrap_or(0)
}

/// Checks that the key belongs to the chain's first certificate.
fn matching_pair(
    certs: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
    key_setting: &'static str,
    cert_setting: &str,
) -> Result<(), MaterialError> {
    let provider = provider();
    let signing = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| err(key_setting, format!("the private key is not usable: {e}")))?;
    let certified = rustls::sign::CertifiedKey::new(certs.to_vec(), signing);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(()),
        Err(_) => Err(err(
            key_setting,
            format!("the private key does not match {cert_setting}"),
        )),
    }
}

/// The TLS listener's configuration.
pub fn server_config(
    cert_file: &Path,
    key_file: &Path,
    client_ca_file: Option<&Path>,
    client_auth: ClientAuth,
) -> Result<Built<ServerConfig>, MaterialError> {
    let mut files = Files::new();
    let certs = files.certs("cert_file", cert_file)?;
    let key = files.key("key_file", key_file)?;
    matching_pair(&certs, &key, "key_file", "tls.cert_file")?;
    let mut expiries = vec![("listener", earliest_expiry(&certs[..1]))];
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| err("cert_file", e.to_string()))?;
    let builder = match (client_ca_file, client_auth) {
        (Some(ca), auth) if auth != ClientAuth::None => {
            let (roots, expiry) = files.roots("client_ca_file", ca)?;
            expiries.push(("client_ca", expiry));
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            );
            let verifier = if auth == ClientAuth::Optional {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            let verifier = verifier
                .build()
                .map_err(|e| err("client_ca_file", e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(certs, key)
        .map_err(|e| err("cert_file", e.to_string()))?;
    Ok(Built {
        config: Arc::new(config),
        expiries,
        fingerprint: files.done(),
    })
}

/// The configuration for connections to Redis.
pub fn client_config(
    ca_file: Option<&Path>,
    client_cert: Option<(&Path, &Path)>,
    insecure_skip_verify: bool,
) -> Result<Built<ClientConfig>, MaterialError> {
    let mut files = Files::new();
    let mut expiries = Vec::new();
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| err("ca_file", e.to_string()))?;
    let builder = if insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServerCert(provider())))
    } else {
        let roots = match ca_file {
            Some(ca) => {
                let (roots, expiry) = files.roots("ca_file", ca)?;
                expiries.push(("upstream_ca", expiry));
                roots
            }
            None => system_roots()?,
        };
        builder.with_root_certificates(roots)
    };
    let config = match client_cert {
        Some((cert, key_path)) => {
            let certs = files.certs("cert_file", cert)?;
            let key = files.key("key_file", key_path)?;
            matching_pair(&certs, &key, "key_file", "upstream.tls.cert_file")?;
            expiries.push(("upstream_client", earliest_expiry(&certs[..1])));
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| err("cert_file", e.to_string()))?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Built {
        config: Arc::new(config),
        expiries,
        fingerprint: files.done(),
    })
}

fn system_roots() -> Result<RootCertStore, MaterialError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err(err(
            "ca_file",
            "no system root certificates found (install ca-certificates, or set upstream.tls.ca_file)",
        ));
    }
    Ok(roots)
}

/// `insecure_skip_verify`: any certificate is accepted, but the handshake's
/// signatures are still checked (it is still TLS, just unauthenticated).
#[derive(Debug)]
struct AnyServerCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The names a client certificate can be mapped to a policy user by:
/// `cn:` for each subject common name, and `dns:`, `uri:`, `email:`, `ip:`
/// for each subject alternative name.
pub fn identities(cert: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert) else {
        return Vec::new();
    };
    let mut out: Vec<String> = parsed
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok())
        .map(|cn| format!("cn:{cn}"))
        .collect();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(d) => out.push(format!("dns:{d}")),
                GeneralName::URI(u) => out.push(format!("uri:{u}")),
                GeneralName::RFC822Name(e) => out.push(format!("email:{e}")),
                GeneralName::IPAddress(bytes) => {
                    let ip = match bytes.len() {
                        4 => <[u8; 4]>::try_from(*bytes).ok().map(std::net::IpAddr::from),
                        16 => <[u8; 16]>::try_from(*bytes)
                            .ok()
                            .map(std::net::IpAddr::from),
                        _ => None,
                    };
                    if let Some(ip) = ip {
                        out.push(format!("ip:{ip}"));
                    }
                }
                _ => {}
            }
        }
    }
    out
}
