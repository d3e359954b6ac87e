//! Connections to the backing Redis, and the health check behind /readyz.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::Upstream;
use crate::transport::{TlsTransport, Transport};

/// A connection to Redis before the relay takes it over: plain, or TLS
/// with the handshake done.
/// The TLS side is boxed so that connection tasks stay small.
pub type Stream =
    tokio_util::either::Either<TcpStream, Box<tokio_rustls::client::TlsStream<TcpStream>>>;

/// Hands a connection to the relay's non-blocking transport.
pub fn into_transport(stream: Stream) -> Transport {
    match stream {
        tokio_util::either::Either::Left(tcp) => Transport::Plain(tcp),
        tokio_util::either::Either::Right(tls) => {
            let (tcp, conn) = (*tls).into_inner();
            Transport::Tls(Box::new(TlsTransport::new(
                tcp,
                rustls::Connection::Client(conn),
            )))
        }
    }
}

/// Why a connection to Redis could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Io(#[from] io::Error),
    /// Redis refused pubwarden's own credentials (its error text, which
    /// never contains the password).
    #[error("Redis refused pubwarden's credentials: {0}")]
    Auth(String),
    /// The TLS handshake with Redis failed (certificate not trusted, wrong
    /// name, our client certificate refused, ...).
    #[error("TLS handshake failed: {message}")]
    Tls {
        /// The `reason` label of `pubwarden_tls_handshake_failures_total`.
        reason: &'static str,
        message: String,
    },
    /// Sentinel mode, and no master has been found yet.
    #[error("no master found through Sentinel yet")]
    NoMaster,
    /// Recent connects all failed; not trying again for a moment.
    #[error("connects keep failing; retrying shortly")]
    CircuitOpen,
}

/// `AUTH [username] password` with pubwarden's credentials, if configured.
pub fn auth_command(settings: &Upstream) -> Option<Bytes> {
    let password = settings.password.as_ref()?;
    let mut args: Vec<&[u8]> = vec![b"AUTH"];
    if let Some(u) = &settings.username {
        args.push(u.as_bytes());
    }
    args.push(password.expose());
    Some(Bytes::from(crate::resp::encode_command(&args)))
}

/// Sends AUTH (or a PING) and reads its one-line answer before any client
/// byte flows. Only AUTH's answer must be OK.
async fn round_trip(
    stream: &mut Stream,
    command: &[u8],
    is_auth: bool,
) -> Result<(), ConnectError> {
    stream.write_all(command).await?;
    let mut reply = Vec::with_capacity(64);
    let mut byte = [0u8; 1];
    while !reply.ends_with(b"\r\n") {
        if stream.read(&mut byte).await? == 0 || reply.len() > 1024 {
            return Err(ConnectError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "Redis closed the connection before answering",
            )));
        }
        reply.push(byte[0]);
    }
    if !is_auth || reply.starts_with(b"+OK") {
        Ok(())
    } else {
        Err(ConnectError::Auth(
            String::from_utf8_lossy(&reply).trim_end().to_string(),
        ))
    }
}

/// Opens a relay connection, retrying a refused connect twice with jittered
/// backoff (a Redis restarting or failing over comes back within moments),
/// all within one connect timeout; refused at once while the circuit is open.
pub async fn connect_relay(settings: &Upstream, health: &Health) -> Result<Stream, ConnectError> {
    if health.circuit_open() {
        return Err(ConnectError::CircuitOpen);
    }
    let deadline = tokio::time::Instant::now() + settings.connect_timeout;
    let mut backoff = Duration::from_millis(25);
    let mut attempt = 0;
    loop {
        attempt += 1;
        match connect(settings).await {
            Ok(s) => {
                health.connect_succeeded();
                return Ok(s);
            }
            Err(ConnectError::Io(e))
                if attempt < 3 && e.kind() == io::ErrorKind::ConnectionRefused =>
            {
                // Jitter from the clock's low bits: no RNG needed for spreading retries.
                let jitter = Duration::from_micros(u64::from(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.subsec_micros())
                        % 25_000,
                ));
                let wake = tokio::time::Instant::now() + backoff + jitter;
                if wake >= deadline {
                    health.connect_failed();
                    return Err(ConnectError::Io(e));
                }
                tokio::time::sleep_until(wake).await;
                backoff *= 2;
            }
            Err(e) => {
                health.connect_failed();
                return Err(e);
            }
        }
    }
}

/// Opens one relay connection to Redis (TLS handshake included), bounded by
/// the connect timeout.
pub async fn connect(settings: &Upstream) -> Result<Stream, ConnectError> {
    let address = settings.current_address().ok_or(ConnectError::NoMaster)?;
    let tcp = tokio::time::timeout(
        settings.connect_timeout,
        TcpStream::connect(address.as_str()),
    )
    .await
    .map_err(|_| ConnectError::Timeout(settings.connect_timeout))??;
    tcp.set_nodelay(true)?;
    let mut stream = match &settings.tls {
        None => Stream::Left(tcp),
        Some(tls) => {
            let name = crate::tls::server_name(tls, &address)?;
            let connector = tokio_rustls::TlsConnector::from(tls.live.config());
            let handshake = tokio::time::timeout(
                settings.connect_timeout,
                Box::pin(connector.connect(name, tcp)),
            )
            .await
            .map_err(|_| ConnectError::Timeout(settings.connect_timeout))?;
            match handshake {
                Ok(s) => Stream::Right(Box::new(s)),
                Err(e) => {
                    return Err(ConnectError::Tls {
                        reason: crate::tls::failure_reason(&e),
                        message: crate::tls::describe(&e),
                    });
                }
            }
        }
    };
    // With TLS 1.3 the client's side of the handshake ends before Redis has
    // checked pubwarden's certificate: a refusal (tls-auth-clients yes and no
    // or a wrong certificate) only arrives with the first read. One round
    // trip here turns it into a handshake error the client is told about,
    // instead of a silent close after its first command. AUTH is that round
    // trip when pubwarden has credentials; otherwise a PING, whose answer
    // (PONG, or NOAUTH when clients bring their own credentials) is dropped.
    let probe = match auth_command(settings) {
        Some(auth) => Some(auth),
        None if settings.tls.is_some() => Some(Bytes::from_static(b"*1\r\n$4\r\nPING\r\n")),
        None => None,
    };
    if let Some(command) = probe {
        let is_auth = settings.password.is_some();
        let answered = tokio::time::timeout(
            settings.connect_timeout,
            round_trip(&mut stream, &command, is_auth),
        )
        .await
        .map_err(|_| ConnectError::Timeout(settings.connect_timeout))?;
        answered.map_err(|e| match e {
            ConnectError::Io(io) => tls_error(io),
            other => other,
        })?;
    }
    Ok(stream)
}

/// An I/O error that is really TLS refusing (an alert from Redis) is
/// reported as a handshake failure.
fn tls_error(e: io::Error) -> ConnectError {
    if e.get_ref()
        .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some())
    {
        ConnectError::Tls {
            reason: crate::tls::failure_reason(&e),
            message: crate::tls::describe(&e),
        }
    } else {
        ConnectError::Io(e)
    }
}

/// Process health as the admin endpoints report it.
#[derive(Debug, Default)]
pub struct Health {
    upstream_ok: AtomicBool,
    draining: AtomicBool,
    /// Consecutive failed connects, and when the last one failed (ms since
    /// start): the circuit breaker's state.
    failures: std::sync::atomic::AtomicU32,
    last_failure_ms: std::sync::atomic::AtomicU64,
    epoch: std::sync::OnceLock<std::time::Instant>,
}

/// Consecutive connect failures after which the circuit opens.
const CIRCUIT_THRESHOLD: u32 = 3;
/// While open, clients are refused at once for this long after the last
/// failure; then one connect is tried again (half-open).
const CIRCUIT_OPEN_FOR: Duration = Duration::from_millis(500);

impl Health {
    pub fn set_upstream(&self, ok: bool) {
        let was = self.upstream_ok.swap(ok, Ordering::Relaxed);
        if was != ok {
            if ok {
                tracing::info!("upstream Redis is reachable");
            } else {
                tracing::warn!("upstream Redis is unreachable");
            }
        }
    }

    pub fn upstream_ok(&self) -> bool {
        self.upstream_ok.load(Ordering::Relaxed)
    }

    fn now_ms(&self) -> u64 {
        let epoch = self.epoch.get_or_init(std::time::Instant::now);
        epoch.elapsed().as_millis() as u64
    }

    /// A relay connect failed.
    pub fn connect_failed(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        self.last_failure_ms.store(self.now_ms(), Ordering::Relaxed);
        self.set_upstream(false);
    }

    /// A relay connect succeeded: the circuit closes.
    pub fn connect_succeeded(&self) {
        self.failures.store(0, Ordering::Relaxed);
        self.set_upstream(true);
    }

    /// Open after repeated failures, so a dead Redis is not hammered by every
    /// client's connect and clients learn at once that it is down.
    pub fn circuit_open(&self) -> bool {
        self.failures.load(Ordering::Relaxed) >= CIRCUIT_THRESHOLD
            && self
                .now_ms()
                .saturating_sub(self.last_failure_ms.load(Ordering::Relaxed))
                < CIRCUIT_OPEN_FOR.as_millis() as u64
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Ready to take traffic: Redis answers and no shutdown is under way.
    pub fn ready(&self) -> Result<(), &'static str> {
        if self.draining() {
            Err("shutting down")
        } else if !self.upstream_ok() {
            Err("upstream Redis unreachable")
        } else {
            Ok(())
        }
    }
}

/// Checks that Redis answers PING, every `health_check_interval`, for ever.
pub async fn watch_health(settings: Upstream, health: Arc<Health>) {
    let mut tick = tokio::time::interval(settings.health_check_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let ok = match probe(&settings).await {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(error = %e, "upstream health check failed");
                false
            }
        };
        health.set_upstream(ok);
    }
}

async fn probe(settings: &Upstream) -> Result<(), String> {
    let mut s = connect(settings).await.map_err(|e| e.to_string())?;
    let check = async {
        s.write_all(b"PING\r\n").await?;
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).await?;
        Ok::<_, io::Error>(buf[..n].to_vec())
    };
    let reply = tokio::time::timeout(settings.connect_timeout, check)
        .await
        .map_err(|_| "no answer to PING".to_string())?
        .map_err(|e| e.to_string())?;
    // A Redis that demands AUTH is up; LOADING or a full server is not.
    // Without credentials of our own, a Redis that demands AUTH is still up;
    // with them, connect() has already authenticated.
    let noauth_ok = settings.password.is_none() && reply.starts_with(b"-NOAUTH");
    if reply.starts_with(b"+PONG") || noauth_ok {
        Ok(())
    } else {
        Err(format!(
            "unexpected answer to PING: {}",
            String::from_utf8_lossy(&reply).trim_end()
        ))
    }
}

/// Reads whole replies off a connection pubwarden uses for itself
/// (COMMAND, Sentinel queries), bounded in size.
pub struct Replies {
    buf: Vec<u8>,
    scanner: crate::resp::frame::FrameScanner,
    max: usize,
}

impl Replies {
    pub fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            scanner: crate::resp::frame::FrameScanner::new(16),
            max,
        }
    }

    /// The next reply (or push message).
    pub async fn next(&mut self, stream: &mut Stream) -> Result<crate::resp::value::Value, String> {
        let mut chunk = vec![0u8; 16 * 1024];
        loop {
            if !self.buf.is_empty()
                && let Some(frame) = self.scanner.next(&self.buf, 0).map_err(|e| e.to_string())?
            {
                let value = crate::resp::value::decode(&self.buf[..frame.end], 16)
                    .map_err(|e| e.to_string())?;
                self.buf.drain(..frame.end);
                self.scanner = crate::resp::frame::FrameScanner::new(16);
                return Ok(value);
            }
            let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("the connection was closed".to_string());
            }
            self.buf.extend_from_slice(&chunk[..n]);
            if self.buf.len() > self.max {
                return Err("reply too large".to_string());
            }
        }
    }
}

/// Sends one command and reads its reply.
pub async fn request(
    stream: &mut Stream,
    replies: &mut Replies,
    args: &[&[u8]],
) -> Result<crate::resp::value::Value, String> {
    stream
        .write_all(&crate::resp::encode_command(args))
        .await
        .map_err(|e| e.to_string())?;
    replies.next(stream).await
}

/// Asks Redis for its command table (`COMMAND`), so policy knows every
/// command this server has, modules included.
pub async fn fetch_command_table(
    settings: &Upstream,
) -> Result<crate::policy::commands::CommandTable, String> {
    let mut s = connect(settings).await.map_err(|e| e.to_string())?;
    let read = async {
        let mut replies = Replies::new(16 * 1024 * 1024);
        let value = request(&mut s, &mut replies, &[b"COMMAND"]).await?;
        if let crate::resp::value::Value::Error(e) = &value {
            return Err(String::from_utf8_lossy(e).into_owned());
        }
        crate::policy::commands::from_command_reply(&value)
            .ok_or_else(|| "COMMAND reply not understood".to_string())
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .map_err(|_| "COMMAND timed out".to_string())?
}
