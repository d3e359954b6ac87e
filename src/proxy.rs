//! The relay: an accept loop, and one task per client connection that owns
//! both sockets (client and its own upstream connection, 1:1).
//!
//! A connection task never blocks on a write. It reads whichever side is
//! readable, parses what arrived, and writes complete frames straight from
//! the read buffer to the other socket; only what the kernel does not take at
//! once is copied into an outbox and written when the socket is writable
//! again. So a client that pipelines thousands of commands before reading a
//! reply cannot deadlock the relay, and a reader that falls behind stops the
//! reads on the other side instead of growing pubwarden's memory.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};

use crate::command::{Command, Kind};
use crate::config::Settings;
use crate::metrics::{ClientClose, ConnMetrics, Metrics, PublishResult, UpstreamError};
use crate::policy::gate::{Gate, PolicyRuntime, Verdict};
use crate::reply;
use crate::resp::frame::FrameScanner;
use crate::resp::request::RequestParser;
use crate::session::{FrameClass, Session};
use crate::transport::{TlsTransport, Transport};
use crate::upstream::{self, Health};

/// Bytes asked of the kernel per read. Large reads drain a busy subscriber's
/// socket in one syscall and one wakeup: 64 KiB measured 0.94-1.00x of
/// HAProxy's fan-out where 16 KiB gave 0.75-0.94x. The buffer is freed as
/// soon as it is empty, so idle connections do not keep it.
const READ_CHUNK: usize = 64 * 1024;

/// What every connection task shares.
pub struct Shared {
    pub settings: Settings,
    pub health: Arc<Health>,
    /// `Some(deadline)` once shutdown has begun.
    pub drain: watch::Receiver<Option<tokio::time::Instant>>,
    open: AtomicUsize,
    all_closed: Notify,
    pub metrics: Arc<Metrics>,
    /// `None`: no policy, pubwarden is transparent (AUTH goes to Redis).
    pub policy: Option<Arc<PolicyRuntime>>,
    /// `None`: tracing is off, and connections carry no tracer.
    pub tracing: Option<Arc<crate::telemetry::Tracing>>,
    /// Cluster mode: the shared slot map; sessions fan out to the nodes.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

impl Shared {
    pub fn new(
        settings: Settings,
        health: Arc<Health>,
        drain: watch::Receiver<Option<tokio::time::Instant>>,
    ) -> Self {
        Self {
            metrics: Arc::new(Metrics::new(&settings.metrics)),
            policy: None,
            tracing: None,
            cluster: None,
            settings,
            health,
            drain,
            open: AtomicUsize::new(0),
            all_closed: Notify::new(),
        }
    }

    /// Uses `metrics` (shared with the admin listener) instead of a registry
    /// of its own.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Checks every request against `policy`.
    pub fn with_policy(mut self, policy: Option<Arc<PolicyRuntime>>) -> Self {
        self.policy = policy;
        self
    }

    /// Traces publishes and deliveries (see `telemetry`).
    pub fn with_cluster(mut self, cluster: Option<Arc<crate::cluster::Cluster>>) -> Self {
        self.cluster = cluster;
        self
    }

    pub fn with_tracing(mut self, tracing: Option<Arc<crate::telemetry::Tracing>>) -> Self {
        self.tracing = tracing;
        self
    }

    /// Client connections currently open.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Resolves once no client connection is open.
    pub async fn closed(&self) {
        loop {
            let notified = self.all_closed.notified();
            if self.open_connections() == 0 {
                return;
            }
            notified.await;
        }
    }
}

struct OpenGuard(Arc<Shared>);

impl OpenGuard {
    fn new(shared: &Arc<Shared>) -> Self {
        shared.open.fetch_add(1, Ordering::AcqRel);
        Self(shared.clone())
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.all_closed.notify_waiters();
        }
    }
}

/// A client connection before the relay takes it over.
/// The TLS side is boxed: every connection's task holds this across awaits,
/// and a rustls connection is large next to a socket.
type ClientStream =
    tokio_util::either::Either<TcpStream, Box<tokio_rustls::server::TlsStream<TcpStream>>>;

/// Accepts clients until shutdown begins. `tls`: this is the TLS listener
/// (`tls:` in the settings), whose clients handshake first.
pub async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, tls: bool) {
    let mut drain = shared.drain.clone();
    loop {
        tokio::select! {
                        accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if shared.open_connections() >= shared.settings.limits.max_clients {
                        // Redis's maxclients answer, then a close.
                        shared.metrics.client_rejected_max_clients();
                        tracing::warn!(%peer, max = shared.settings.limits.max_clients, "refusing client: max_clients reached");
                        let shared = shared.clone();
                        tokio::spawn(async move {
                            if let Some(stream) = handshake(&shared, stream, peer, tls).await {
                                refuse(stream, Bytes::from_static(b"-ERR max number of clients reached\r\n")).await;
                            }
                        });
                        continue;
                    }
                    let guard = OpenGuard::new(&shared);
                    tokio::spawn(serve(stream, peer, guard, tls));
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            _ = drain.changed() => {
                if drain.borrow().is_some() {
                    return;
                }
            }
        }
    }
}

/// Why a connection ended, for the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closed {
    ByClient,
    ByUpstream,
    Quit,
    ProtocolError,
    UpstreamProtocolError,
    ClientIo,
    UpstreamIo,
    Shutdown,
    SlowConsumer,
    AuthTimeout,
    IdleTimeout,
    PolicyRevoked,
    /// Sentinel named a new master; this connection's Redis was the old one.
    Failover,
}

impl Closed {
    fn as_str(self) -> &'static str {
        match self {
            Closed::ByClient => "client closed",
            Closed::ByUpstream => "upstream closed",
            Closed::Quit => "quit",
            Closed::ProtocolError => "client protocol error",
            Closed::UpstreamProtocolError => "upstream protocol error",
            Closed::ClientIo => "client i/o error",
            Closed::UpstreamIo => "upstream i/o error",
            Closed::Shutdown => "shutdown",
            Closed::SlowConsumer => "slow consumer (output limit)",
            Closed::AuthTimeout => "no AUTH within auth_timeout",
            Closed::IdleTimeout => "idle_timeout",
            Closed::PolicyRevoked => "policy reload revoked access",
            Closed::Failover => "master changed (Sentinel failover)",
        }
    }

    /// The upstream failure this close counts as, if it was one.
    fn upstream_error(self) -> Option<UpstreamError> {
        match self {
            Closed::ByUpstream => Some(UpstreamError::Closed),
            Closed::UpstreamIo => Some(UpstreamError::Io),
            Closed::UpstreamProtocolError => Some(UpstreamError::Protocol),
            Closed::Failover => Some(UpstreamError::Closed),
            _ => None,
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    commands: u64,
    replies: u64,
    deliveries: u64,
    bytes_from_client: u64,
    bytes_to_client: u64,
}

/// The TLS handshake of a client on the TLS listener (plain clients pass
/// through). `None`: it failed, was logged and counted.
async fn handshake(
    shared: &Shared,
    tcp: TcpStream,
    peer: SocketAddr,
    tls: bool,
) -> Option<ClientStream> {
    let _ = tcp.set_nodelay(true);
    keepalive(&tcp, shared.settings.limits.tcp_keepalive);
    let settings = match (&shared.settings.tls, tls) {
        (Some(settings), true) => settings,
        _ => return Some(ClientStream::Left(tcp)),
    };
    // Boxed: the handshake's state would otherwise size every connection's task.
    match Box::pin(crate::tls::accept(settings, tcp)).await {
        Ok(stream) => Some(ClientStream::Right(Box::new(stream))),
        // Closed before a ClientHello: a TCP port check (load balancers,
        // tcpSocket probes), not a failed handshake.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            tracing::debug!(%peer, "TLS client closed before its handshake");
            None
        }
        Err(e) => {
            let reason = crate::tls::failure_reason(&e);
            shared.metrics.tls_handshake_failed("client", reason);
            tracing::info!(%peer, reason, error = %crate::tls::describe(&e), "client TLS handshake failed");
            None
        }
    }
}

/// The identities of a verified client certificate (`cn:`, `dns:`, ...);
/// empty without one, or when the listener does not verify certificates.
fn client_identities(shared: &Shared, stream: &ClientStream) -> Vec<String> {
    let verifies = shared
        .settings
        .tls
        .as_ref()
        .is_some_and(|t| t.client_auth != crate::tls::ClientAuth::None);
    match stream {
        ClientStream::Right(tls) if verifies => tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map(crate::tls::material::identities)
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

fn into_transport(stream: ClientStream) -> Transport {
    match stream {
        ClientStream::Left(tcp) => Transport::Plain(tcp),
        ClientStream::Right(tls) => {
            let (tcp, conn) = (*tls).into_inner();
            Transport::Tls(Box::new(TlsTransport::new(
                tcp,
                rustls::Connection::Server(conn),
            )))
        }
    }
}

async fn serve(tcp: TcpStream, peer: SocketAddr, guard: OpenGuard, tls: bool) {
    let shared = guard.0.clone();
    let started = Instant::now();
    let _client_gauge = shared.metrics.client_connected();
    let Some(client) = handshake(&shared, tcp, peer, tls).await else {
        return;
    };
    let identities = client_identities(&shared, &client);
    let gate = match &shared.policy {
        Some(runtime) => match Gate::new(runtime.clone(), peer.ip()) {
            Ok(gate) => {
                let mut gate = if shared.metrics.enabled() {
                    gate.with_metrics(shared.metrics.clone())
                } else {
                    gate
                };
                if !identities.is_empty() {
                    match gate.login_certificate(&identities) {
                        Ok(mapped) => shared.metrics.tls_client_login(mapped),
                        Err(reply) => {
                            tracing::warn!(%peer, "refusing client: its certificate's user is at max_connections");
                            refuse(client, reply).await;
                            return;
                        }
                    }
                }
                Some(gate)
            }
            Err(reply) => {
                shared.metrics.client_rejected_user_limit();
                tracing::warn!(%peer, "refusing client: the default user's max_connections is reached");
                refuse(client, reply).await;
                return;
            }
        },
        None => None,
    };
    if let Some(cluster) = &shared.cluster {
        let (mut session, out_rx) =
            crate::cluster::session::ClusterSession::new(cluster.clone(), &shared.settings, gate);
        if shared.metrics.enabled() {
            session.count_with(&shared.metrics);
        }
        if let Some(t) = &shared.tracing {
            session.trace_with(t.conn());
        }
        // Boxed, so standalone connections' tasks do not carry its size.
        let ended = Box::pin(session.run(client, out_rx, shared.drain.clone())).await;
        tracing::info!(
            %peer,
            duration_ms = started.elapsed().as_millis() as u64,
            reason = ended.as_str(),
            "connection closed"
        );
        return;
    }
    // Subscribed before connecting: a failover during the connect is seen.
    let failovers = shared
        .settings
        .upstream
        .sentinel
        .as_ref()
        .map(|_| shared.settings.upstream.target.changes());
    let upstream = match upstream::connect_relay(&shared.settings.upstream, &shared.health).await {
        Ok(s) => {
            shared.metrics.upstream_connected();
            upstream::into_transport(s)
        }
        Err(e) => {
            if let upstream::ConnectError::Tls { reason, .. } = &e {
                shared.metrics.tls_handshake_failed("upstream", reason);
            }
            if !matches!(e, upstream::ConnectError::CircuitOpen) {
                shared.metrics.upstream_connect_failed(
                    matches!(e, upstream::ConnectError::Timeout(_)),
                    matches!(&e, upstream::ConnectError::Io(io) if io.kind() == io::ErrorKind::ConnectionRefused),
                );
            }
            shared.metrics.client_rejected();
            tracing::warn!(%peer, upstream = %shared.settings.upstream.describe(), error = %e, "refusing client: upstream unavailable");
            refuse(
                client,
                reply::upstream_unavailable(&shared.settings.upstream.describe(), &e.to_string()),
            )
            .await;
            return;
        }
    };
    keepalive(upstream.tcp(), shared.settings.limits.tcp_keepalive);
    let reloads = shared.policy.as_ref().map(|p| p.reloads());
    let mut conn = Conn::new(into_transport(client), upstream, &shared.settings);
    conn.reloads = reloads;
    conn.failovers = failovers;
    conn.closes = Some(shared.metrics.clone());
    if let Some(gate) = &gate {
        conn.parser.set_unauthenticated(!gate.authenticated());
    }
    conn.gate = gate;
    if shared.metrics.enabled() {
        conn.count_with(&shared.metrics);
    }
    conn.tracer = shared.tracing.as_ref().map(|t| t.conn());
    let closed = conn.run(shared.drain.clone()).await;
    shared.metrics.upstream_disconnected();
    if let Some(kind) = closed.upstream_error() {
        shared.metrics.upstream_error(kind);
    }
    let c = &conn.counts;
    let user = conn.gate.as_ref().and_then(Gate::user_name).unwrap_or("-");
    tracing::info!(
        %peer,
        user,
        duration_ms = started.elapsed().as_millis() as u64,
        commands = c.commands,
        replies = c.replies,
        deliveries = c.deliveries,
        bytes_in = c.bytes_from_client,
        bytes_out = c.bytes_to_client,
        reason = closed.as_str(),
        "connection closed"
    );
}

/// Dead peers (a pod gone without a FIN) are found by keepalive probes.
fn keepalive(stream: &TcpStream, idle: std::time::Duration) {
    if idle.is_zero() {
        return;
    }
    let ka = socket2::TcpKeepalive::new().with_time(idle);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&ka) {
        tracing::debug!(error = %e, "cannot set TCP keepalive");
    }
}

/// Tells the client why it cannot be served, then closes without a reset:
/// its pending input is read and dropped so the error is not lost to an RST.
async fn refuse(mut client: ClientStream, message: Bytes) {
    use tokio::io::AsyncReadExt;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        client.write_all(&message).await?;
        client.shutdown().await?;
        let mut sink = [0u8; 4096];
        while client.read(&mut sink).await? > 0 {}
        Ok::<_, io::Error>(())
    })
    .await;
}

/// Bytes waiting for a socket that was not ready to take them.
#[derive(Default)]
struct Outbox {
    buf: BytesMut,
}

impl Outbox {
    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn len(&self) -> usize {
        self.buf.len()
    }

    /// Writes `data` now if nothing is queued ahead of it, and keeps what the
    /// kernel did not take.
    fn send(&mut self, sock: &mut Transport, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        if self.buf.is_empty() {
            match sock.try_write(data) {
                Ok(n) => {
                    if n < data.len() {
                        self.buf.extend_from_slice(&data[n..]);
                    }
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        self.buf.extend_from_slice(data);
        Ok(())
    }

    /// Writes as much of the queue as the socket takes.
    fn flush(&mut self, sock: &mut Transport) -> io::Result<()> {
        sock.flush_pending()?;
        while !self.buf.is_empty() {
            match sock.try_write(&self.buf) {
                Ok(n) => self.buf.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        // Idle connections should not pin a large buffer.
        self.buf = BytesMut::new();
        Ok(())
    }
}

/// Reads what is available into `buf`. `Ok(None)`: nothing yet.
///
/// `drained_hint`: a read that did not fill the buffer emptied the socket, so
/// readiness is cleared now instead of by one more read that would only
/// return EAGAIN (a syscall per batch saved). Only sound where the I/O driver
/// cannot run between this read and the clearing: a current-thread runtime.
/// With edge-triggered epoll, data arriving after the read raises a new event
/// the driver has not processed yet, so no wakeup is lost.
fn read_some(
    sock: &mut Transport,
    buf: &mut BytesMut,
    drained_hint: bool,
) -> io::Result<Option<usize>> {
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
    let spare = buf.capacity() - buf.len();
    match sock.try_read_buf(buf) {
        Ok(n) => {
            if drained_hint && n > 0 && n < spare {
                sock.clear_read_ready();
            }
            Ok(Some(n))
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

struct Conn {
    client: Transport,
    upstream: Transport,
    parser: RequestParser,
    scanner: FrameScanner,
    session: Session,
    from_client: BytesMut,
    from_upstream: BytesMut,
    to_upstream: Outbox,
    to_client: Outbox,
    max_pipeline: usize,
    pause_at: usize,
    /// No more client input will be read (EOF, QUIT, protocol error, drain).
    client_done: bool,
    /// The client closed its sending side; forwarded to Redis once flushed.
    client_eof: bool,
    upstream_half_closed: bool,
    /// Close once every pending answer has been written (protocol error).
    close_when_answered: bool,
    draining: bool,
    counts: Counts,
    /// `None` when metrics are off: then the relay does no metric work.
    metrics: Option<ConnMetrics>,
    /// `None` when tracing is off: then the relay does no tracing work.
    tracer: Option<crate::telemetry::ConnTracer>,
    /// The policy gate; `None` without a policy.
    gate: Option<Gate>,
    /// pubwarden's own AUTH, re-sent after a client's RESET signs the
    /// upstream connection out.
    upstream_auth: Option<Bytes>,
    /// A request held by a rate limit: when to ask again, and for how long it waited.
    hold: Option<(tokio::time::Instant, std::time::Duration)>,
    /// The gate's login count last seen, to re-label metrics after AUTH.
    logins_seen: u64,
    /// Policy reloads, to re-check an idle connection's standing at once.
    reloads: Option<watch::Receiver<u64>>,
    /// Master changes in Sentinel mode: this connection's Redis is no
    /// longer the master.
    failovers: Option<watch::Receiver<u64>>,
    /// Where pubwarden's own closes are counted.
    closes: Option<Arc<Metrics>>,
    limits: crate::config::Limits,
    /// Since when a subscriber's queued output has been above the soft limit.
    over_soft_since: Option<tokio::time::Instant>,
    /// Last time the client sent anything (for `idle_timeout`).
    last_input: tokio::time::Instant,
    /// When an unauthenticated connection is closed (`auth_timeout`).
    auth_deadline: tokio::time::Instant,
    /// Running on a current-thread runtime (see [`read_some`]).
    single_threaded: bool,
    /// For reconnecting a subscriber whose Redis connection died.
    upstream_settings: crate::config::Upstream,
    max_reply_depth: usize,
}

impl Conn {
    fn count_with(&mut self, metrics: &Arc<Metrics>) {
        let m = ConnMetrics::new(metrics.clone());
        self.session
            .observe_subscriptions(m.subscription_observer());
        self.metrics = Some(m);
    }

    fn new(client: Transport, upstream: Transport, settings: &Settings) -> Self {
        Self {
            client,
            upstream,
            parser: RequestParser::new(settings.limits.request),
            scanner: FrameScanner::new(settings.limits.max_reply_depth),
            session: Session::new(),
            from_client: BytesMut::new(),
            from_upstream: BytesMut::new(),
            to_upstream: Outbox::default(),
            to_client: Outbox::default(),
            max_pipeline: settings.limits.max_pipeline,
            pause_at: settings.limits.pause_reading_at,
            client_done: false,
            client_eof: false,
            upstream_half_closed: false,
            close_when_answered: false,
            draining: false,
            counts: Counts::default(),
            metrics: None,
            tracer: None,
            gate: None,
            upstream_auth: upstream::auth_command(&settings.upstream),
            hold: None,
            logins_seen: 0,
            reloads: None,
            failovers: None,
            closes: None,
            limits: settings.limits.clone(),
            over_soft_since: None,
            last_input: tokio::time::Instant::now(),
            auth_deadline: tokio::time::Instant::now() + settings.limits.auth_timeout,
            single_threaded: tokio::runtime::Handle::try_current()
                .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread),
            upstream_settings: settings.upstream.clone(),
            max_reply_depth: settings.limits.max_reply_depth,
        }
    }

    async fn run(&mut self, drain: watch::Receiver<Option<tokio::time::Instant>>) -> Closed {
        let mut deadline: Option<tokio::time::Instant> = *drain.borrow();
        if deadline.is_some() {
            self.begin_drain();
        }
        // Futures that wait for rare events live across iterations, so the hot
        // loop does not re-register a waiter (a lock) on every pass.
        let mut drain_signal = std::pin::pin!(drain_deadline(drain));
        let mut reload_signal: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
            Box::pin(next_reload(self.reloads.clone()));
        let mut failover_signal: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
            Box::pin(next_change(self.failovers.clone()));
        loop {
            if let Some(reason) = self.finished() {
                return reason;
            }
            let read_client = !self.client_done
                && self.hold.is_none()
                && self.to_upstream.len() < self.pause_at
                && self.session.pending_len() < self.max_pipeline;
            // A subscriber may queue up to its hard limit (and is closed there);
            // anyone else only pauses Redis, as a relay would.
            let subscribed = self.session.subscriptions().total() > 0;
            let out_limit = if subscribed {
                self.limits.subscriber_output_hard
            } else {
                self.pause_at
            };
            let read_upstream = self.to_client.len() < out_limit;
            let auth_pending = self.gate.as_ref().is_some_and(|g| !g.authenticated());
            let idle_at = (!self.limits.idle_timeout.is_zero()
                && !subscribed
                && self.session.pending_len() == 0)
                .then(|| self.last_input + self.limits.idle_timeout);
            let soft_at = self
                .over_soft_since
                .map(|t| t + self.limits.subscriber_output_soft_for);
            let write_client = !self.to_client.is_empty() || self.client.wants_write();
            let write_upstream = !self.to_upstream.is_empty() || self.upstream.wants_write();
            let result = tokio::select! {
                biased;
                r = self.client.writable(), if write_client => r
                    .and_then(|_| self.to_client.flush(&mut self.client))
                    .map(|()| {
                        if let Some(m) = &mut self.metrics {
                            m.output_waiting(self.to_client.len());
                        }
                        if let Some(t) = &mut self.tracer {
                            t.output_waiting(self.to_client.len());
                        }
                    })
                    .map_err(|_| Closed::ClientIo),
                r = self.upstream.writable(), if write_upstream => r
                    .and_then(|_| self.to_upstream.flush(&mut self.upstream))
                    .map_err(|_| Closed::UpstreamIo),
                r = self.upstream.readable(), if read_upstream => match r {
                    Ok(()) => self.on_upstream_readable(),
                    Err(_) => Err(Closed::UpstreamIo),
                },
                r = self.client.readable(), if read_client => match r {
                    Ok(()) => self.on_client_readable(),
                    Err(_) => Err(Closed::ClientIo),
                },
                                d = &mut drain_signal, if deadline.is_none() => {
                    deadline = Some(d);
                    self.begin_drain();
                    Ok(())
                }
                _ = sleep_until(self.hold.map(|(until, _)| until)), if self.hold.is_some() => {
                    if let (Some((_, waited)), Some(gate)) = (self.hold.take(), self.gate.as_mut()) {
                        gate.held_for(waited);
                    }
                    self.process_client_input()
                }
                                _ = sleep_until(deadline) => Err(Closed::Shutdown),
                                _ = &mut reload_signal, if self.reloads.is_some() => {
                    reload_signal = Box::pin(next_reload(self.reloads.clone()));
                    self.recheck_policy()
                }
                _ = &mut failover_signal, if self.failovers.is_some() => {
                    // Seen: a re-subscription connects to the new master.
                    if let Some(rx) = &mut self.failovers {
                        rx.borrow_and_update();
                    }
                    failover_signal = Box::pin(next_change(self.failovers.clone()));
                    Err(Closed::Failover)
                }
                _ = tokio::time::sleep_until(self.auth_deadline), if auth_pending => {
                    self.count_close(ClientClose::AuthTimeout);
                    Err(Closed::AuthTimeout)
                }
                _ = sleep_until(idle_at), if idle_at.is_some() => {
                    self.count_close(ClientClose::IdleTimeout);
                    Err(Closed::IdleTimeout)
                }
                _ = sleep_until(soft_at), if soft_at.is_some() => Err(self.slow_consumer()),
            };
            let result = result.and_then(|()| self.check_output_limits());
            if let Err(reason) = result {
                if matches!(
                    reason,
                    Closed::ByUpstream
                        | Closed::UpstreamIo
                        | Closed::UpstreamProtocolError
                        | Closed::Failover
                ) && self.may_resubscribe()
                {
                    self.flush_client_before_close().await;
                    match self.resubscribe().await {
                        Ok(()) => {
                            // The new connection went to the current master: a
                            // switch signalled during the reconnect is handled.
                            if let Some(rx) = &mut self.failovers {
                                rx.borrow_and_update();
                            }
                            failover_signal = Box::pin(next_change(self.failovers.clone()));
                            continue;
                        }
                        Err(reason) => return reason,
                    }
                }
                if matches!(
                    reason,
                    Closed::ByUpstream | Closed::UpstreamProtocolError | Closed::Failover
                ) {
                    self.flush_client_before_close().await;
                }
                return reason;
            }
            if self.client_eof && !self.upstream_half_closed && self.to_upstream.is_empty() {
                // Like a TCP relay: pass the client's half-close on; Redis answers
                // what it has read, then closes, and that ends this connection.
                self.upstream_half_closed = true;
                let _ = self.upstream.shutdown().await;
            }
        }
    }

    /// Opted in, subscribed, and nothing in flight that a new connection
    /// could answer wrongly.
    fn may_resubscribe(&self) -> bool {
        let subs = self.session.subscriptions();
        let by_channel = !self.upstream_settings.resubscribe_channels.is_empty()
            && [
                crate::command::SubKind::Channel,
                crate::command::SubKind::Pattern,
                crate::command::SubKind::Shard,
            ]
            .iter()
            .flat_map(|k| subs.iter(*k))
            .all(|name| {
                self.upstream_settings
                    .resubscribe_channels
                    .iter()
                    .any(|g| crate::glob::matches(g.as_bytes(), name))
            });
        let enabled = self
            .gate
            .as_ref()
            .and_then(Gate::resubscribe)
            .unwrap_or(self.upstream_settings.resubscribe)
            || by_channel;
        enabled
            && subs.total() > 0
            && self.session.quiescent()
            && self.to_upstream.is_empty()
            && !self.client_done
            && !self.draining
    }

    /// Reconnects to Redis and restores the protocol and every subscription,
    /// swallowing the confirmations: the client sees only a gap in messages.
    async fn resubscribe(&mut self) -> Result<(), Closed> {
        let started = std::time::Instant::now();
        let give_up = tokio::time::Instant::now() + self.upstream_settings.resubscribe_for;
        let user = self
            .gate
            .as_ref()
            .and_then(Gate::user_name)
            .unwrap_or("-")
            .to_string();
        tracing::warn!(
            %user,
            subscriptions = self.session.subscriptions().total(),
            "Redis connection lost; reconnecting to subscribe again"
        );
        if let Some(m) = &self.closes {
            m.upstream_error(UpstreamError::Closed);
        }
        let mut backoff = std::time::Duration::from_millis(100);
        let stream = loop {
            match upstream::connect(&self.upstream_settings).await {
                Ok(s) => break s,
                Err(e) => {
                    if let (upstream::ConnectError::Tls { reason, .. }, Some(m)) =
                        (&e, &self.closes)
                    {
                        m.tls_handshake_failed("upstream", reason);
                    }
                    if tokio::time::Instant::now() + backoff > give_up {
                        tracing::warn!(%user, error = %e, "could not reconnect in time; closing the subscriber");
                        return Err(Closed::ByUpstream);
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(std::time::Duration::from_secs(2));
                }
            }
        };
        // A previous attempt's commands died with its connection.
        self.session.forget_internal();
        self.upstream = upstream::into_transport(stream);
        keepalive(self.upstream.tcp(), self.limits.tcp_keepalive);
        self.from_upstream = BytesMut::new();
        self.scanner = FrameScanner::new(self.max_reply_depth);
        self.upstream_half_closed = false;
        let mut out = Vec::new();
        if self.session.protocol() == 3 {
            out.extend(crate::resp::encode_command(&[b"HELLO", b"3"]));
            self.session.internal(Command {
                kind: Kind::Hello(Some(3)),
                name: "hello",
            });
        }
        for (kind, name) in [
            (crate::command::SubKind::Channel, "subscribe"),
            (crate::command::SubKind::Pattern, "psubscribe"),
            (crate::command::SubKind::Shard, "ssubscribe"),
        ] {
            let names: Vec<Box<[u8]>> = self
                .session
                .subscriptions()
                .iter(kind)
                .map(Box::from)
                .collect();
            // Bounded commands, however many subscriptions there are.
            for chunk in names.chunks(1000) {
                let mut args: Vec<&[u8]> = vec![name.as_bytes()];
                args.extend(chunk.iter().map(|c| &**c));
                out.extend(crate::resp::encode_command(&args));
                self.session.internal_with(
                    Command {
                        kind: Kind::Subscribe(kind),
                        name,
                    },
                    chunk.to_vec(),
                );
            }
        }
        self.to_upstream
            .send(&mut self.upstream, &out)
            .map_err(|_| Closed::UpstreamIo)?;
        // Activate the internal entries before their answers arrive.
        self.send_due_answers()?;
        let gap = started.elapsed();
        if let Some(m) = &self.closes {
            m.resubscribed(gap);
        }
        tracing::info!(%user, gap_ms = gap.as_millis() as u64, "subscribed again on a new Redis connection");
        Ok(())
    }

    /// A policy reload: go on only if the connection is still allowed.
    fn recheck_policy(&mut self) -> Result<(), Closed> {
        let Some(gate) = self.gate.as_mut() else {
            return Ok(());
        };
        match gate.recheck(self.session.subscriptions()) {
            Ok(()) => Ok(()),
            Err(why) => {
                tracing::warn!(
                    user = gate.user_name().unwrap_or("-"),
                    reason = why,
                    "closing connection after policy reload"
                );
                self.count_close(ClientClose::PolicyRevoked);
                Err(Closed::PolicyRevoked)
            }
        }
    }

    fn count_close(&self, why: ClientClose) {
        if let Some(m) = &self.closes {
            m.client_closed(why);
        }
    }

    /// Redis's `client-output-buffer-limit pubsub`, applied to what pubwarden
    /// holds for a subscriber.
    fn check_output_limits(&mut self) -> Result<(), Closed> {
        if self.session.subscriptions().total() == 0 {
            self.over_soft_since = None;
            return Ok(());
        }
        let queued = self.to_client.len();
        if queued >= self.limits.subscriber_output_hard {
            return Err(self.slow_consumer());
        }
        if queued > self.limits.subscriber_output_soft {
            if self.over_soft_since.is_none() {
                self.over_soft_since = Some(tokio::time::Instant::now());
            }
        } else {
            self.over_soft_since = None;
        }
        Ok(())
    }

    fn slow_consumer(&self) -> Closed {
        tracing::warn!(
            user = self.gate.as_ref().and_then(Gate::user_name).unwrap_or("-"),
            queued = self.to_client.len(),
            "closing a subscriber that does not read its deliveries (output limit)"
        );
        if let Some(m) = &self.closes {
            m.slow_consumer_disconnect();
        }
        Closed::SlowConsumer
    }

    fn begin_drain(&mut self) {
        self.draining = true;
        self.client_done = true;
    }

    /// A reason to end the connection now, if there is one.
    fn finished(&self) -> Option<Closed> {
        let idle = self.session.pending_len() == 0
            && self.to_client.is_empty()
            && self.to_upstream.is_empty();
        if self.close_when_answered && idle {
            return Some(Closed::ProtocolError);
        }
        if self.draining
            && idle
            && !self.parser.is_mid_request()
            && self.session.subscriptions().total() == 0
        {
            return Some(Closed::Shutdown);
        }
        None
    }

    /// Redis closed (QUIT, a kill, a crash): give the client what already
    /// arrived, briefly, then close.
    async fn flush_client_before_close(&mut self) {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
            while !self.to_client.is_empty() || self.client.wants_write() {
                self.client.writable().await?;
                self.to_client.flush(&mut self.client)?;
            }
            Ok::<_, io::Error>(())
        })
        .await;
    }

    fn on_client_readable(&mut self) -> Result<(), Closed> {
        match read_some(
            &mut self.client,
            &mut self.from_client,
            self.single_threaded,
        ) {
            Ok(None) => return Ok(()),
            Ok(Some(0)) => {
                self.client_done = true;
                self.client_eof = true;
                if self.parser.is_mid_request() || self.session.pending_len() == 0 {
                    return Err(Closed::ByClient);
                }
                return Ok(());
            }
            Ok(Some(n)) => {
                self.counts.bytes_from_client += n as u64;
                self.last_input = tokio::time::Instant::now();
            }
            Err(_) => return Err(Closed::ClientIo),
        }
        self.process_client_input()
    }

    fn process_client_input(&mut self) -> Result<(), Closed> {
        if let Some(m) = &mut self.metrics {
            m.begin_batch();
        }
        if let Some(t) = &mut self.tracer {
            t.begin_batch();
        }
        let mut at = 0;
        let mut run = 0;
        let mut stop = false;
        // Bytes bound upstream, built only when a request is cut out or
        // rewritten; otherwise the whole read goes out straight from the
        // buffer. Either way one write per read.
        let mut staged: Vec<u8> = Vec::new();
        while !stop {
            let frame = match self.parser.next(&self.from_client, at) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    // Redis answers what came before, then this error, then closes.
                    staged.extend_from_slice(&self.from_client[run..at]);
                    let cmd = Command {
                        kind: Kind::Other,
                        name: "other",
                    };
                    self.session.answered_locally(cmd, Bytes::from(e.reply()));
                    tracing::debug!(error = %e, "client protocol error");
                    self.client_done = true;
                    self.close_when_answered = true;
                    run = at;
                    break;
                }
            };
            if frame.argc == 0 {
                // Empty requests are skipped by Redis without an answer.
                staged.extend_from_slice(&self.from_client[run..frame.start]);
                run = frame.end;
                at = frame.end;
                continue;
            }
            let args = self.parser.args(&self.from_client, &frame);
            let cmd = Command::classify(&args);
            let over_cap = matches!(cmd.kind, Kind::Subscribe(_))
                && self.limits.max_subscriptions > 0
                && self.session.subscriptions().total() + args.len().saturating_sub(1)
                    > self.limits.max_subscriptions;
            let verdict = if over_cap {
                Verdict::Answer {
                    reply: reply::too_many_subscriptions(self.limits.max_subscriptions),
                    upstream: None,
                }
            } else {
                match self.gate.as_mut() {
                    Some(gate) => gate.check(&cmd, &args, std::time::Instant::now()),
                    None => Verdict::Forward,
                }
            };
            // Bytes that go upstream instead of the request's own, if any.
            let mut instead: Option<Bytes> = None;
            let mut refused = None;
            let answered_here = matches!(verdict, Verdict::Answer { .. });
            match verdict {
                Verdict::Delay(wait) => {
                    // Hold it unread, and everything behind it: backpressure.
                    self.hold = Some((tokio::time::Instant::now() + wait, wait));
                    break;
                }
                Verdict::Answer { reply, upstream } => {
                    staged.extend_from_slice(&self.from_client[run..frame.start]);
                    if let Some(internal) = upstream {
                        self.session.internal(cmd);
                        staged.extend_from_slice(internal);
                    }
                    if matches!(cmd.kind, Kind::Publish | Kind::SPublish) {
                        refused = Some(if reply.starts_with(b"-RATELIMIT") {
                            PublishResult::RateLimited
                        } else {
                            PublishResult::Denied
                        });
                    }
                    if let Some(t) = &mut self.tracer {
                        let user = self.gate.as_ref().and_then(Gate::user_name);
                        t.answered_here(&cmd, &args, user, &reply);
                    }
                    self.session.answered_locally(cmd, reply);
                    run = frame.end;
                }
                Verdict::ForwardAs(bytes) => {
                    self.session.forwarded(cmd, &args);
                    instead = Some(bytes);
                }
                Verdict::ForwardFiltered => self.session.forwarded_filtered(cmd, &args),
                Verdict::Forward => self.session.forwarded(cmd, &args),
            }
            if let Some(m) = &mut self.metrics {
                if let Some(gate) = &self.gate
                    && gate.logins() != self.logins_seen
                {
                    self.logins_seen = gate.logins();
                    if let Some(label) = gate.user_label() {
                        m.set_user(label);
                    }
                }
                if !answered_here {
                    m.request(self.session.enqueued() - 1, &cmd, &args);
                } else if let (Some(result), Some(label), Some(channel)) = (
                    refused,
                    self.gate.as_ref().and_then(Gate::user_label),
                    args.get(1),
                ) {
                    // Answered here: counted by outcome, never as sent upstream.
                    m.publish_refused(label, channel, result);
                }
            }
            if !answered_here
                && let Some(t) = &mut self.tracer
                && let Some(bytes) = t.request(
                    self.session.enqueued() - 1,
                    &cmd,
                    &args,
                    self.gate.as_ref().and_then(Gate::user_name),
                )
            {
                // A PUBLISH whose payload now carries a trace envelope.
                instead = Some(Bytes::from(bytes));
            }
            self.counts.commands += 1;
            if let Some(bytes) = instead {
                staged.extend_from_slice(&self.from_client[run..frame.start]);
                staged.extend_from_slice(&bytes);
                run = frame.end;
            } else if frame.inline && !answered_here {
                // Sent as the multibulk it means, so Redis sees the same words.
                staged.extend_from_slice(&self.from_client[run..frame.start]);
                staged.extend_from_slice(self.parser.inline_encoding());
                run = frame.end;
            }
            if cmd.kind == Kind::Reset
                && let Some(auth) = &self.upstream_auth
            {
                // RESET signed Redis's side out of pubwarden's own user.
                staged.extend_from_slice(&self.from_client[run..frame.end]);
                staged.extend_from_slice(auth);
                self.session.internal(Command {
                    kind: Kind::Other,
                    name: "auth",
                });
                run = frame.end;
            }
            if let Some(gate) = &self.gate {
                self.parser.set_unauthenticated(!gate.authenticated());
            }
            at = frame.end;
            if cmd.kind == Kind::Quit {
                // Redis ignores whatever follows QUIT; so does pubwarden.
                self.client_done = true;
                stop = true;
            }
        }
        let rest = &self.from_client[run..at];
        let sent = if staged.is_empty() {
            self.to_upstream.send(&mut self.upstream, rest)
        } else {
            staged.extend_from_slice(rest);
            self.to_upstream.send(&mut self.upstream, &staged)
        };
        sent.map_err(|_| Closed::UpstreamIo)?;
        self.consume_client(at);
        self.send_due_answers()
    }

    fn consume_client(&mut self, n: usize) {
        self.from_client.advance(n);
        self.parser.rebase(n);
        if self.from_client.is_empty() {
            self.from_client = BytesMut::new();
        }
    }

    /// Writes local answers that are due now that nothing is owed before them.
    fn send_due_answers(&mut self) -> Result<(), Closed> {
        let (session, out, sock) = (&mut self.session, &mut self.to_client, &mut self.client);
        let mut result = Ok(());
        let mut sent = 0;
        session.settle(|reply| {
            sent += reply.len() as u64;
            if result.is_ok() {
                result = out.send(sock, &reply).map_err(|_| Closed::ClientIo);
            }
        });
        self.counts.bytes_to_client += sent;
        if let Some(m) = &mut self.metrics {
            m.answered(&self.session, None);
            m.end_client_batch();
        }
        if let Some(t) = &mut self.tracer {
            t.answered(&self.session, None);
        }
        result
    }

    fn on_upstream_readable(&mut self) -> Result<(), Closed> {
        match read_some(
            &mut self.upstream,
            &mut self.from_upstream,
            self.single_threaded,
        ) {
            Ok(None) => return Ok(()),
            Ok(Some(0)) => {
                self.process_upstream_input()?;
                return Err(if self.session.quit_acknowledged() {
                    Closed::Quit
                } else {
                    Closed::ByUpstream
                });
            }
            Ok(Some(_)) => {}
            Err(_) => return Err(Closed::UpstreamIo),
        }
        self.process_upstream_input()
    }

    fn process_upstream_input(&mut self) -> Result<(), Closed> {
        let mut at = 0;
        let mut run = 0;
        let mut due: Vec<Bytes> = Vec::new();
        if let Some(m) = &mut self.metrics {
            m.begin_batch();
        }
        if let Some(t) = &mut self.tracer {
            t.begin_batch();
        }
        let filter_pmessages = self.gate.as_ref().is_some_and(Gate::filters_deliveries);
        let result = loop {
            // Pub/sub traffic first: a delivery needs no reply pairing, so it
            // is counted and passed on with the least work per frame.
            if !self.scanner.is_mid_frame()
                && let Some(frame) = crate::resp::frame::fast_delivery(&self.from_upstream, at)
                && let Some(kind) = self.session.delivery(&frame)
            {
                self.counts.deliveries += 1;
                if let Some(m) = &mut self.metrics {
                    m.delivery(kind, &frame, &self.from_upstream);
                }
                if filter_pmessages
                    && kind == crate::session::DeliveryKind::PMessage
                    && self.gate.as_ref().is_some_and(|g| {
                        frame
                            .str_elem(&self.from_upstream, 2)
                            .is_some_and(|ch| g.hides_delivery(ch))
                    })
                {
                    self.send_to_client(run, frame.start)?;
                    run = frame.end;
                }
                // `run <= frame.start`: not hidden above, so the client gets it.
                if run <= frame.start
                    && let Some(t) = &mut self.tracer
                    && let Some(stripped) = t.delivery(kind, &frame, &self.from_upstream)
                {
                    self.substitute(run, frame.start, &stripped)?;
                    run = frame.end;
                }
                at = frame.end;
                continue;
            }
            let frame = match self.scanner.next(&self.from_upstream, at) {
                Ok(Some(f)) => f,
                Ok(None) => break Ok(()),
                Err(e) => {
                    tracing::warn!(error = %e, "upstream sent invalid RESP; closing");
                    break Err(Closed::UpstreamProtocolError);
                }
            };
            let class = self.session.on_frame(&frame, &self.from_upstream);
            match class {
                FrameClass::Reply => self.counts.replies += 1,
                FrameClass::Delivery(kind) => {
                    self.counts.deliveries += 1;
                    if let Some(m) = &mut self.metrics {
                        m.delivery(kind, &frame, &self.from_upstream);
                    }
                }
                FrameClass::OutOfBand => {}
                FrameClass::Unexpected => {
                    tracing::debug!("upstream frame with no request waiting for it");
                }
                FrameClass::Internal => {}
                FrameClass::Filtered => self.counts.replies += 1,
            }
            if class == FrameClass::Filtered {
                let kept = self.gate.as_ref().and_then(|g| {
                    filter_channel_list(&self.from_upstream[frame.start..frame.end], |ch| {
                        g.may_see(ch)
                    })
                });
                if let Some(kept) = kept {
                    self.substitute(run, frame.start, &kept)?;
                    run = frame.end;
                }
            }
            let hidden = match class {
                FrameClass::Internal => true,
                // A pattern subscription must not carry a denied channel's messages.
                FrameClass::Delivery(crate::session::DeliveryKind::PMessage) => {
                    self.gate.as_ref().is_some_and(|g| {
                        g.filters_deliveries()
                            && frame
                                .str_elem(&self.from_upstream, 2)
                                .is_some_and(|ch| g.hides_delivery(ch))
                    })
                }
                _ => false,
            };
            if hidden {
                self.send_to_client(run, frame.start)?;
                run = frame.end;
            } else if let FrameClass::Delivery(kind) = class
                && let Some(t) = &mut self.tracer
                && let Some(stripped) = t.delivery(kind, &frame, &self.from_upstream)
            {
                self.substitute(run, frame.start, &stripped)?;
                run = frame.end;
            }
            at = frame.end;
            self.session.settle(|reply| due.push(reply));
            if let Some(m) = &mut self.metrics {
                let reply = (class == FrameClass::Reply).then_some(&frame);
                m.answered(&self.session, reply.map(|f| (f, &self.from_upstream[..])));
            }
            if let Some(t) = &mut self.tracer {
                let reply = (class == FrameClass::Reply).then_some(&frame);
                t.answered(&self.session, reply.map(|f| (f, &self.from_upstream[..])));
            }
            if !due.is_empty() {
                // Local answers go right behind the frame that released them.
                self.send_to_client(run, at)?;
                for reply in due.drain(..) {
                    self.to_client
                        .send(&mut self.client, &reply)
                        .map_err(|_| Closed::ClientIo)?;
                    self.counts.bytes_to_client += reply.len() as u64;
                }
                run = at;
            }
        };
        self.send_to_client(run, at)?;
        if let Some(m) = &mut self.metrics {
            m.end_batch(self.to_client.len());
        }
        if let Some(t) = &mut self.tracer {
            t.end_batch(self.to_client.len());
        }
        self.from_upstream.advance(at);
        self.scanner.rebase(at);
        if self.from_upstream.is_empty() {
            self.from_upstream = BytesMut::new();
        }
        result
    }

    /// Sends what precedes `start` unchanged, then `bytes` in place of the
    /// frame that starts there (a filtered list, an unwrapped delivery).
    fn substitute(&mut self, run: usize, start: usize, bytes: &[u8]) -> Result<(), Closed> {
        self.send_to_client(run, start)?;
        self.to_client
            .send(&mut self.client, bytes)
            .map_err(|_| Closed::ClientIo)?;
        self.counts.bytes_to_client += bytes.len() as u64;
        Ok(())
    }

    fn send_to_client(&mut self, from: usize, to: usize) -> Result<(), Closed> {
        self.counts.bytes_to_client += (to - from) as u64;
        self.to_client
            .send(&mut self.client, &self.from_upstream[from..to])
            .map_err(|_| Closed::ClientIo)
    }
}

/// Re-encodes a list of channel names keeping only those `keep` accepts;
/// `None` when the frame is not such a list (an error passes unchanged).
pub(crate) fn filter_channel_list(frame: &[u8], keep: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
    let crate::resp::value::Value::Array(items) = crate::resp::value::decode(frame, 4).ok()? else {
        return None;
    };
    let kept: Vec<&[u8]> = items
        .iter()
        .filter_map(crate::resp::value::Value::as_bytes)
        .filter(|ch| keep(ch))
        .collect();
    // An array of bulk strings, as Redis answers PUBSUB CHANNELS.
    Some(crate::resp::encode_command(&kept))
}

/// Resolves at the next policy reload (never without a policy). Takes its
/// own receiver, marked seen, so it can live across loop iterations.
async fn next_reload(rx: Option<watch::Receiver<u64>>) {
    match rx {
        Some(mut rx) => {
            rx.borrow_and_update();
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

/// Resolves at the next change `rx` has not seen (never without one). A
/// clone keeps what its source has seen, so a change between subscribing
/// and waiting is not missed.
async fn next_change(rx: Option<watch::Receiver<u64>>) {
    match rx {
        Some(mut rx) => {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

/// Resolves with the drain deadline once shutdown begins.
async fn drain_deadline(
    mut rx: watch::Receiver<Option<tokio::time::Instant>>,
) -> tokio::time::Instant {
    loop {
        if let Some(d) = *rx.borrow_and_update() {
            return d;
        }
        if rx.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
