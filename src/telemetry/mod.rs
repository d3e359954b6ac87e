//! OpenTelemetry traces of pub/sub traffic (see `docs/tracing.md`).
//!
//! - [`settings`]: `telemetry.tracing:` and the `OTEL_*` variables.
//! - [`pipeline`]: OTLP export that never blocks the relay; drops counted.
//! - [`index`]: recent sampled publishes, so local deliveries link to them.
//! - [`envelope`]: trace context carried inside a payload, across instances.
//!
//! The relay holds an `Option<ConnTracer>` per connection (`None` when
//! tracing is off) and calls its small `#[inline]` hooks. Sampling is
//! decided before anything is allocated: a publish rolls the per-connection
//! generator; a delivery follows its publish when it is known (envelope or
//! index), else rolls. Unsampled traffic reads no clock, hashes nothing
//! and takes no lock, unless its channel uses the envelope.

pub mod envelope;
pub mod index;
pub mod pipeline;
pub mod settings;

use std::borrow::Cow;
use std::collections::VecDeque;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{
    Link, Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
    TraceState, Tracer as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider, Span};
use opentelemetry_semantic_conventions::attribute as semconv;

use crate::command::{Command, Kind};
use crate::metrics::Metrics;
use crate::metrics::histogram::AtomicHistogram;
use crate::resp::frame::Frame;
use crate::resp::request::Args;
use crate::session::{DeliveryKind, Session};

pub use settings::{Protocol, TracingSettings};

/// What every connection's tracer shares.
#[derive(Debug)]
pub struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    /// A roll below this samples; see [`threshold`].
    threshold: u64,
    index: Arc<index::PublishIndex>,
    envelope: Vec<Vec<u8>>,
    control: bool,
    server_address: String,
    server_port: i64,
    envelope_latency: AtomicHistogram,
    publish_delivery_latency: AtomicHistogram,
    expirer: tokio::task::JoinHandle<()>,
}

/// `ratio` as a bound on a uniform `u64`: 0 never samples, 1 always does.
pub fn threshold(ratio: f64) -> u64 {
    if ratio >= 1.0 {
        u64::MAX
    } else if ratio <= 0.0 {
        0
    } else {
        (ratio * u64::MAX as f64) as u64
    }
}

impl Tracing {
    /// Starts export if `settings` (with the `OTEL_*` variables over them)
    /// enable it; `None` otherwise. Must run inside the Tokio runtime.
    pub fn start(
        settings: &TracingSettings,
        upstream: &str,
        metrics: &Metrics,
    ) -> anyhow::Result<Option<Arc<Tracing>>> {
        let (s, warnings) = settings.with_env();
        for w in warnings {
            tracing::warn!("{w}");
        }
        if !s.enabled {
            return Ok(None);
        }
        let provider = pipeline::provider(&s, metrics.trace_span_drops())?;
        let tracer = opentelemetry::trace::TracerProvider::tracer_with_scope(
            &provider,
            opentelemetry::InstrumentationScope::builder("pubwarden")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
        );
        let (host, port) = upstream.rsplit_once(':').unwrap_or((upstream, "6379"));
        let index = Arc::new(index::PublishIndex::default());
        let expirer = {
            let index = Arc::downgrade(&index);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    let Some(index) = index.upgrade() else { return };
                    if !index.is_empty() {
                        index.expire(Instant::now());
                    }
                }
            })
        };
        tracing::info!(
            endpoint = %pipeline::traces_url(&s),
            protocol = s.protocol.as_str(),
            sampling_ratio = s.sampling_ratio,
            envelope_patterns = s.envelope.len(),
            "exporting traces"
        );
        Ok(Some(Arc::new(Tracing {
            provider,
            tracer,
            threshold: threshold(s.sampling_ratio),
            index,
            envelope: s.envelope.iter().map(|p| p.as_bytes().to_vec()).collect(),
            control: s.control_commands,
            server_address: host.trim_matches(['[', ']']).to_string(),
            server_port: port.parse().unwrap_or(6379),
            envelope_latency: metrics.envelope_latency(),
            publish_delivery_latency: metrics.publish_delivery_latency(),
            expirer,
        })))
    }

    /// A tracer for one client connection.
    pub fn conn(self: &Arc<Self>) -> ConnTracer {
        ConnTracer {
            t: self.clone(),
            // Seeded per connection from the process's random hasher keys.
            rng: RandomState::new().hash_one(Instant::now()) | 1,
            inflight: VecDeque::new(),
            completed: 0,
            unwritten: Vec::new(),
            batch_time: None,
            server: None,
            server_from: None,
        }
    }

    /// Sends what is queued, within `timeout`: a dead collector must not hold
    /// up shutdown.
    pub async fn shutdown(&self, timeout: Duration) {
        self.expirer.abort();
        let provider = self.provider.clone();
        // The SDK's shutdown blocks its thread until the export task answers,
        // and that task runs on this runtime.
        let done = tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(timeout));
        match tokio::time::timeout(timeout + Duration::from_millis(200), done).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "trace export did not finish cleanly"),
            _ => tracing::warn!("trace export did not finish within the shutdown timeout"),
        }
    }

    fn is_envelope_channel(&self, channel: &[u8]) -> bool {
        self.envelope
            .iter()
            .any(|p| crate::glob::matches(p, channel))
    }

    /// `server`: the node involved, where it varies (cluster mode); else the
    /// one upstream.
    fn common(
        &self,
        attrs: &mut Vec<KeyValue>,
        user: Option<&str>,
        server: Option<&(String, i64)>,
    ) {
        match server {
            Some((host, port)) => {
                attrs.push(KeyValue::new(semconv::SERVER_ADDRESS, host.clone()));
                attrs.push(KeyValue::new(semconv::SERVER_PORT, *port));
            }
            // Cluster mode before routing: the node is set on the span later.
            None if self.server_address.is_empty() => {}
            None => {
                attrs.push(KeyValue::new(
                    semconv::SERVER_ADDRESS,
                    self.server_address.clone(),
                ));
                attrs.push(KeyValue::new(semconv::SERVER_PORT, self.server_port));
            }
        }
        if let Some(u) = user {
            attrs.push(KeyValue::new(semconv::USER_NAME, u.to_string()));
        }
    }
}

/// A span waiting for the reply that ends it.
#[derive(Debug)]
struct Pending {
    seq: u64,
    span: Span,
    publish: bool,
}

/// One connection's tracing state; the relay's hooks.
#[derive(Debug)]
pub struct ConnTracer {
    t: Arc<Tracing>,
    rng: u64,
    /// Sampled requests relayed to Redis, by session queue position.
    inflight: VecDeque<Pending>,
    completed: u64,
    /// Sampled deliveries not yet taken by the client's socket.
    unwritten: Vec<Span>,
    /// Wall-clock time of the current read batch, read on first need.
    batch_time: Option<SystemTime>,
    /// The node the next delivery came from (cluster mode), and the
    /// address it was parsed from.
    server: Option<(String, i64)>,
    server_from: Option<String>,
}

/// `host:port` (or `[v6]:port`) as span attributes.
fn split_address(address: &str) -> Option<(String, i64)> {
    let (host, port) = address.rsplit_once(':')?;
    Some((
        host.trim_matches(['[', ']']).to_string(),
        port.parse().ok()?,
    ))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The error code of a RESP error reply (`-NOPERM ...` gives `NOPERM`).
fn error_type(reply: &[u8]) -> String {
    let body = reply.get(1..).unwrap_or_default();
    let end = body
        .iter()
        .position(|b| matches!(b, b' ' | b'\r'))
        .unwrap_or(body.len())
        .min(32);
    let code = text(&body[..end]);
    if code.is_empty() { "ERR".into() } else { code }
}

fn is_control(kind: Kind, name: &str) -> bool {
    matches!(
        kind,
        Kind::Subscribe(_) | Kind::Unsubscribe(_) | Kind::Hello(_) | Kind::Reset | Kind::Quit
    ) || matches!(name, "auth" | "client" | "select")
}

impl ConnTracer {
    /// xorshift64: a sampling roll costs a few instructions.
    #[inline]
    fn roll(&mut self) -> bool {
        if self.t.threshold == 0 {
            return false;
        }
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x <= self.t.threshold
    }

    fn random_ids(&mut self) -> ([u8; 16], [u8; 8]) {
        let mut next = || {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            self.rng
        };
        let (a, b, c) = (next(), next(), next());
        let mut trace = [0u8; 16];
        trace[..8].copy_from_slice(&a.to_be_bytes());
        trace[8..].copy_from_slice(&b.to_be_bytes());
        (trace, c.to_be_bytes())
    }

    /// A read batch starts.
    #[inline]
    pub fn begin_batch(&mut self) {
        self.batch_time = None;
    }

    fn now(&mut self) -> SystemTime {
        *self.batch_time.get_or_insert_with(SystemTime::now)
    }

    /// A request relayed to Redis at session position `seq`. Returns the
    /// bytes to send instead of the request's own: a PUBLISH whose payload
    /// now carries an envelope.
    #[inline]
    pub fn request(
        &mut self,
        seq: u64,
        cmd: &Command,
        args: &Args<'_>,
        user: Option<&str>,
    ) -> Option<Vec<u8>> {
        match cmd.kind {
            Kind::Publish | Kind::SPublish => self.publish(seq, cmd, args, user),
            kind if self.t.control && is_control(kind, cmd.name) => {
                if self.roll() {
                    let span = self.control_span(cmd, user);
                    self.inflight.push_back(Pending {
                        seq,
                        span,
                        publish: false,
                    });
                }
                None
            }
            _ => None,
        }
    }

    fn publish(
        &mut self,
        seq: u64,
        cmd: &Command,
        args: &Args<'_>,
        user: Option<&str>,
    ) -> Option<Vec<u8>> {
        let (Some(channel), Some(payload), 3) = (args.get(1), args.get(2), args.len()) else {
            return None;
        };
        let wrap = !self.t.envelope.is_empty() && self.t.is_envelope_channel(channel);
        let sampled = self.roll();
        if !sampled && !wrap {
            return None;
        }
        let now = SystemTime::now();
        let mut ids = None;
        if sampled {
            let mut span = self.publish_span(cmd, channel, payload.len(), user, now);
            if wrap {
                span.set_attribute(KeyValue::new("pubwarden.envelope", true));
            }
            let cx = span.span_context().clone();
            self.t
                .index
                .insert(channel, payload, cx.clone(), Instant::now());
            ids = Some((cx.trace_id().to_bytes(), cx.span_id().to_bytes(), 1));
            self.inflight.push_back(Pending {
                seq,
                span,
                publish: true,
            });
        }
        if !wrap {
            return None;
        }
        // Unsampled publishes still carry an envelope (flag 0), so the
        // delivering side strips it, follows the decision and measures latency.
        let (trace_id, span_id, flags) = ids.unwrap_or_else(|| {
            let (t, s) = self.random_ids();
            (t, s, 0)
        });
        let wrapped = envelope::wrap(
            &envelope::Header {
                trace_id,
                span_id,
                flags,
                published_unix_nanos: unix_nanos(now),
                tracestate: b"",
            },
            payload,
        );
        let name = args.get(0).unwrap_or(b"PUBLISH");
        let mut out = Vec::with_capacity(wrapped.len() + channel.len() + name.len() + 40);
        out.extend_from_slice(b"*3\r\n");
        for part in [name, channel, &wrapped[..]] {
            out.extend_from_slice(format!("${}\r\n", part.len()).as_bytes());
            out.extend_from_slice(part);
            out.extend_from_slice(b"\r\n");
        }
        Some(out)
    }

    fn publish_span(
        &self,
        cmd: &Command,
        channel: &[u8],
        size: usize,
        user: Option<&str>,
        now: SystemTime,
    ) -> Span {
        let mut attrs = vec![
            KeyValue::new(semconv::MESSAGING_SYSTEM, "redis"),
            KeyValue::new(semconv::MESSAGING_DESTINATION_NAME, text(channel)),
            KeyValue::new(semconv::MESSAGING_OPERATION_NAME, cmd.name),
            KeyValue::new(semconv::MESSAGING_OPERATION_TYPE, "send"),
            KeyValue::new(semconv::MESSAGING_MESSAGE_BODY_SIZE, size as i64),
        ];
        self.t.common(&mut attrs, user, self.server.as_ref());
        self.t
            .tracer
            .span_builder(Cow::Borrowed(cmd.name))
            .with_kind(SpanKind::Producer)
            .with_start_time(now)
            .with_attributes(attrs)
            .start(&self.t.tracer)
    }

    fn control_span(&self, cmd: &Command, user: Option<&str>) -> Span {
        let mut attrs = vec![
            KeyValue::new(semconv::DB_SYSTEM_NAME, "redis"),
            KeyValue::new(semconv::DB_OPERATION_NAME, cmd.name.to_ascii_uppercase()),
        ];
        self.t.common(&mut attrs, user, self.server.as_ref());
        self.t
            .tracer
            .span_builder(Cow::Borrowed(cmd.name))
            .with_kind(SpanKind::Client)
            .with_attributes(attrs)
            .start(&self.t.tracer)
    }

    /// A request pubwarden answered itself (policy denial, rate limit, or
    /// its own AUTH): a sampled span that ends at once with the reply's error.
    pub fn answered_here(
        &mut self,
        cmd: &Command,
        args: &Args<'_>,
        user: Option<&str>,
        reply: &[u8],
    ) {
        let publish = matches!(cmd.kind, Kind::Publish | Kind::SPublish);
        if !(publish || self.t.control && is_control(cmd.kind, cmd.name)) || !self.roll() {
            return;
        }
        let mut span = if publish {
            let (Some(channel), Some(payload)) = (args.get(1), args.get(2)) else {
                return;
            };
            self.publish_span(cmd, channel, payload.len(), user, SystemTime::now())
        } else {
            self.control_span(cmd, user)
        };
        if reply.first() == Some(&b'-') {
            fail(&mut span, reply);
        }
        span.end();
    }

    /// The node the next deliveries come from (cluster mode). Called per
    /// delivery: parses (and allocates) only when the node changes.
    pub fn set_server(&mut self, address: &str) {
        if self.server_from.as_deref() != Some(address) {
            self.server = split_address(address);
            self.server_from = Some(address.to_string());
        }
    }

    /// Names the node the last recorded request went to (cluster mode
    /// routes after the span is started).
    pub fn routed_to(&mut self, address: &str) {
        if let (Some(e), Some((host, port))) = (self.inflight.back_mut(), split_address(address)) {
            e.span
                .set_attribute(KeyValue::new(semconv::SERVER_ADDRESS, host));
            e.span
                .set_attribute(KeyValue::new(semconv::SERVER_PORT, port));
        }
    }

    /// Spans waiting for their replies (cluster mode renumbers the last).
    pub fn pending(&self) -> usize {
        self.inflight.len()
    }

    /// Renumbers the span recorded last (cluster mode learns a request's
    /// queue position only after routing it); `None`: drop it unanswered.
    pub fn renumber_last(&mut self, seq: Option<u64>) {
        match seq {
            Some(seq) => {
                if let Some(e) = self.inflight.back_mut() {
                    e.seq = seq;
                }
            }
            None => {
                if let Some(mut e) = self.inflight.pop_back() {
                    e.span.end();
                }
            }
        }
    }

    /// The request at `seq` was answered with `reply` (cluster mode, where
    /// requests finish in any order across nodes).
    pub fn answered_seq(&mut self, seq: u64, reply: Option<(&Frame, &[u8])>) {
        if let Some(i) = self.inflight.iter().position(|e| e.seq == seq)
            && let Some(e) = self.inflight.remove(i)
        {
            finish(e, reply);
        }
    }

    /// Requests the session finished since the last call; `reply` is the
    /// frame that ended the first of them, if it was a reply.
    #[inline]
    pub fn answered(&mut self, session: &Session, reply: Option<(&Frame, &[u8])>) {
        let done = session.completed();
        if self.inflight.is_empty() {
            self.completed = done;
            return;
        }
        let mut reply = reply;
        while self.completed < done {
            let seq = self.completed;
            self.completed += 1;
            let frame = reply.take();
            while self.inflight.front().is_some_and(|e| e.seq < seq) {
                if let Some(mut e) = self.inflight.pop_front() {
                    e.span.end();
                }
            }
            if self.inflight.front().is_some_and(|e| e.seq == seq)
                && let Some(e) = self.inflight.pop_front()
            {
                finish(e, frame);
            }
        }
    }

    /// A delivery frame from Redis, about to go to the client. Returns the
    /// frame to send instead when an envelope was taken off its payload.
    #[inline]
    pub fn delivery(&mut self, kind: DeliveryKind, f: &Frame, buf: &[u8]) -> Option<Vec<u8>> {
        if self.t.threshold == 0 && self.t.envelope.is_empty() && self.t.index.is_empty() {
            return None;
        }
        self.delivery_slow(kind, f, buf)
    }

    fn delivery_slow(&mut self, kind: DeliveryKind, f: &Frame, buf: &[u8]) -> Option<Vec<u8>> {
        let (channel_at, payload_at) = match kind {
            DeliveryKind::PMessage => (2, 3),
            DeliveryKind::Message | DeliveryKind::SMessage => (1, 2),
        };
        let channel = f.str_elem(buf, channel_at)?;
        let mut payload = f.str_elem(buf, payload_at)?;
        let mut parent = None;
        let mut replaced = None;
        if !self.t.envelope.is_empty()
            && envelope::looks_wrapped(payload)
            && self.t.is_envelope_channel(channel)
            && let Some((h, original)) = envelope::unwrap(payload)
        {
            let now = unix_nanos(self.now());
            if now >= h.published_unix_nanos {
                self.t
                    .envelope_latency
                    .observe(now - h.published_unix_nanos);
            }
            let state = std::str::from_utf8(h.tracestate)
                .ok()
                .and_then(|s| s.parse::<TraceState>().ok())
                .unwrap_or_default();
            parent = Some(SpanContext::new(
                TraceId::from_bytes(h.trace_id),
                SpanId::from_bytes(h.span_id),
                TraceFlags::new(h.flags),
                true,
                state,
            ));
            replaced = reencode(f, buf, payload_at, original);
            if replaced.is_some() {
                payload = original;
            } else {
                // Not re-encodable: the subscriber gets the frame as it came.
                parent = None;
            }
        }
        if parent.is_none()
            && self.t.index.may_hold(channel, payload)
            && let Some((cx, published)) = self.t.index.get(channel, payload)
        {
            // Publish-to-delivery latency where this pubwarden saw both.
            self.t
                .publish_delivery_latency
                .observe(published.elapsed().as_nanos() as u64);
            parent = Some(cx);
        }
        let sampled = match &parent {
            Some(p) => p.is_sampled(),
            None => self.roll(),
        };
        if sampled {
            let start = self.now();
            let (op, pattern) = match kind {
                DeliveryKind::Message => ("message", None),
                DeliveryKind::PMessage => ("pmessage", f.str_elem(buf, 1)),
                DeliveryKind::SMessage => ("smessage", None),
            };
            let mut attrs = vec![
                KeyValue::new(semconv::MESSAGING_SYSTEM, "redis"),
                KeyValue::new(semconv::MESSAGING_DESTINATION_NAME, text(channel)),
                KeyValue::new(semconv::MESSAGING_OPERATION_NAME, op),
                KeyValue::new(semconv::MESSAGING_OPERATION_TYPE, "receive"),
                KeyValue::new(semconv::MESSAGING_MESSAGE_BODY_SIZE, payload.len() as i64),
            ];
            if let Some(p) = pattern {
                attrs.push(KeyValue::new(
                    semconv::MESSAGING_DESTINATION_SUBSCRIPTION_NAME,
                    text(p),
                ));
            }
            if replaced.is_some() {
                attrs.push(KeyValue::new("pubwarden.envelope", true));
            }
            self.t.common(&mut attrs, None, self.server.as_ref());
            let mut builder = self
                .t
                .tracer
                .span_builder(op)
                .with_kind(SpanKind::Consumer)
                .with_start_time(start)
                .with_attributes(attrs);
            let cx = match parent {
                Some(p) => {
                    builder = builder.with_links(vec![Link::with_context(p.clone())]);
                    Context::new().with_remote_span_context(p)
                }
                None => Context::new(),
            };
            self.unwritten
                .push(builder.start_with_context(&self.t.tracer, &cx));
        }
        replaced
    }

    /// The read batch from Redis is done; `to_client` bytes still wait for
    /// the client's socket.
    #[inline]
    pub fn end_batch(&mut self, to_client: usize) {
        self.output_waiting(to_client);
    }

    /// The client's outbox holds `to_client` bytes (after a write): once it
    /// is empty, the socket took every delivery so far.
    #[inline]
    pub fn output_waiting(&mut self, to_client: usize) {
        if to_client == 0 && !self.unwritten.is_empty() {
            let now = SystemTime::now();
            for mut s in self.unwritten.drain(..) {
                s.end_with_timestamp(now);
            }
        }
    }
}

fn fail(span: &mut Span, reply: &[u8]) {
    let code = error_type(reply);
    span.set_status(Status::error(code.clone()));
    span.set_attribute(KeyValue::new(semconv::ERROR_TYPE, code));
}

fn finish(mut e: Pending, reply: Option<(&Frame, &[u8])>) {
    if let Some((f, buf)) = reply {
        let bytes = buf.get(f.start..f.end).unwrap_or_default();
        if f.is_error() {
            fail(&mut e.span, bytes);
        } else if e.publish
            && f.kind == b':'
            && let Some(n) = buf
                .get(f.start + 1..f.end.saturating_sub(2))
                .and_then(crate::resp::parse_i64)
        {
            e.span
                .set_attribute(KeyValue::new("pubwarden.receivers", n));
        }
    }
    e.span.end();
}

/// The delivery frame `f` with element `payload_at` replaced by `payload`;
/// `None` if an element is not a plain string.
fn reencode(f: &Frame, buf: &[u8], payload_at: usize, payload: &[u8]) -> Option<Vec<u8>> {
    let n = usize::from(f.recorded);
    if f.len != n as i64 {
        return None;
    }
    let mut out = Vec::with_capacity(f.end - f.start);
    out.push(f.kind);
    out.extend_from_slice(format!("{n}\r\n").as_bytes());
    for i in 0..n {
        let e = f.elem(i)?;
        if e.kind != b'$' || e.null {
            return None;
        }
        let bytes = if i == payload_at {
            payload
        } else {
            buf.get(e.start..e.end)?
        };
        out.extend_from_slice(format!("${}\r\n", bytes.len()).as_bytes());
        out.extend_from_slice(bytes);
        out.extend_from_slice(b"\r\n");
    }
    Some(out)
}

impl Drop for ConnTracer {
    fn drop(&mut self) {
        for mut e in self.inflight.drain(..) {
            // The connection closed before Redis answered.
            e.span
                .set_attribute(KeyValue::new(semconv::ERROR_TYPE, "connection_closed"));
            e.span.end();
        }
        let now = SystemTime::now();
        for mut s in self.unwritten.drain(..) {
            s.end_with_timestamp(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds() {
        assert_eq!(threshold(0.0), 0);
        assert_eq!(threshold(1.0), u64::MAX);
        let half = threshold(0.5) as f64 / u64::MAX as f64;
        assert!((half - 0.5).abs() < 1e-9);
    }

    #[test]
    fn error_codes() {
        assert_eq!(
            error_type(b"-NOPERM User x has no permissions\r\n"),
            "NOPERM"
        );
        assert_eq!(error_type(b"-RATELIMIT slow down\r\n"), "RATELIMIT");
        assert_eq!(error_type(b"-\r\n"), "ERR");
    }

    #[test]
    fn reencodes_a_delivery_with_a_new_payload() {
        let buf = b"*4\r\n$8\r\npmessage\r\n$2\r\no*\r\n$2\r\no1\r\n$5\r\nhello\r\n";
        let f = crate::resp::frame::fast_delivery(buf, 0).expect("delivery");
        let out = reencode(&f, buf, 3, b"a\r\nb").unwrap();
        assert_eq!(
            out,
            b"*4\r\n$8\r\npmessage\r\n$2\r\no*\r\n$2\r\no1\r\n$4\r\na\r\nb\r\n".to_vec()
        );
    }
}
