//! One client session in cluster mode: many node connections, one ordered
//! reply stream.
//!
//! Every client request becomes an *entry* in the session's queue, in the
//! client's order. An entry is sent to one node (or, for SUNSUBSCRIBE, to
//! each node holding the channels) and is complete when that node's frames
//! for it have arrived; complete entries at the head of the queue are
//! written to the client, so replies come back in request order however the
//! nodes interleave. Each node connection answers its own entries in order,
//! so a frame from a node belongs to the oldest entry that node still owes,
//! unless it is a delivery or an unsolicited `sunsubscribe`.
//!
//! Node connections are plain tasks: a reader turning bytes into frames for
//! the session, a writer draining a queue. The session never waits on a
//! node's write, so a client pipelining more than a node buffers cannot
//! deadlock it; it stops reading the client while its own output to the
//! client is above `limits.pause_reading_at`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::Cluster;
use super::slot;
use crate::command::{Command, Kind, SubKind};
use crate::config::Settings;
use crate::policy::gate::{Gate, Verdict};
use crate::resp::frame::FrameScanner;
use crate::resp::request::RequestParser;
use crate::resp::value::{self, Value};

/// Maps keyed by pubwarden's own sequence numbers (node and entry ids):
/// no need for SipHash's flood resistance on the per-request path.
#[derive(Default)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        // Fibonacci hashing spreads sequential ids over the table.
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}

type IdMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<IdHasher>>;

/// The nodes a client-queue entry got frames from: nearly always one.
#[derive(Default)]
struct Touched {
    one: Option<usize>,
    more: Vec<usize>,
}

impl Touched {
    fn insert(&mut self, node: usize) -> bool {
        if self.one == Some(node) || self.more.contains(&node) {
            return false;
        }
        if self.one.is_none() {
            self.one = Some(node);
        } else {
            self.more.push(node);
        }
        true
    }

    fn first(&self) -> Option<usize> {
        self.one
    }

    fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.one.into_iter().chain(self.more.iter().copied())
    }
}

const CROSSSLOT: &[u8] = b"-CROSSSLOT Keys in request don't hash to the same slot\r\n";
/// Redirects followed for one request before its error is passed on.
const MAX_REDIRECTS: u8 = 5;
/// Reads (batches of frames) a node reader hands over before waiting for
/// the session: with 64 KiB reads, at most 4 MiB per node connection.
const FRAME_QUEUE: usize = 64;
/// Bytes asked of the kernel per node read: up to what the standalone relay
/// reads when a node keeps filling the buffer, and little while it is quiet,
/// since an idle subscriber's reader waits holding its buffer.
const NODE_READ_MAX: usize = 64 * 1024;
const NODE_READ_MIN: usize = 4 * 1024;

/// Why a cluster session ended, for the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    ByClient,
    Quit,
    ProtocolError,
    ClientIo,
    /// A node connection with replies owed (or the home node of a
    /// subscriber) was lost: the client is closed, as Redis's would be.
    NodeLost,
    NoTopology,
    SlowConsumer,
    Shutdown,
    AuthTimeout,
}

impl Ended {
    pub fn as_str(self) -> &'static str {
        match self {
            Ended::ByClient => "client closed",
            Ended::Quit => "quit",
            Ended::ProtocolError => "client protocol error",
            Ended::ClientIo => "client i/o error",
            Ended::NodeLost => "cluster node connection lost",
            Ended::NoTopology => "cluster slot map unknown",
            Ended::SlowConsumer => "slow consumer (output limit)",
            Ended::Shutdown => "shutdown",
            Ended::AuthTimeout => "no AUTH within auth_timeout",
        }
    }
}

/// How an entry's frames are handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Plain,
    /// Subscribe-family confirmations: one frame per channel.
    Subs(SubKind),
    /// PUBSUB CHANNELS & co.: keep what the user may see.
    Filtered,
    /// INFO and HELLO: the endpoint presents itself as one standalone
    /// server (`cluster_enabled:0`, `mode standalone`), which it is to clients.
    Standalone,
}

struct Entry {
    /// Frames still owed, over all nodes.
    frames_left: usize,
    out: BytesMut,
    shape: Shape,
    /// The request, for following MOVED/ASK (`None`: not redirectable).
    request: Option<Bytes>,
    redirects: u8,
    /// pubwarden's own (replay, re-subscription): nothing reaches the client.
    internal: bool,
    /// Part of a pinned transaction: MOVED becomes CROSSSLOT.
    in_tx: bool,
}

struct Node {
    addr: String,
    tx: mpsc::UnboundedSender<Bytes>,
    /// Entries this node owes frames to, oldest first, with how many.
    owed: VecDeque<(u64, usize)>,
    subs: [HashSet<Box<[u8]>>; 3],
    /// Subscriptions as of the requests sent (confirmed or not): what an
    /// UNSUBSCRIBE pipelined behind a SUBSCRIBE must count on.
    intent: [HashSet<Box<[u8]>>; 3],
    /// Entries in the client queue holding frames from this node and not
    /// yet written: deliveries from it must not overtake them.
    unflushed: usize,
    _tasks: [AbortOnDrop; 2],
    metrics: Arc<crate::metrics::Metrics>,
    /// Requests sent to, and deliveries from, this node.
    counters: (
        prometheus_client::metrics::counter::Counter,
        prometheus_client::metrics::counter::Counter,
    ),
}

impl Drop for Node {
    fn drop(&mut self) {
        self.metrics.cluster_node_connection(&self.addr, -1);
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn kind_index(k: SubKind) -> usize {
    match k {
        SubKind::Channel => 0,
        SubKind::Pattern => 1,
        SubKind::Shard => 2,
    }
}

/// The session. Generic over the client stream (plain or TLS).
pub struct ClusterSession {
    cluster: Arc<Cluster>,
    nodes: IdMap<usize, Node>,
    by_addr: HashMap<String, usize>,
    next_node: usize,
    home: Option<usize>,
    entries: IdMap<u64, Entry>,
    /// Client order of non-internal entries, and which nodes each touched.
    queue: VecDeque<(u64, Touched)>,
    next_entry: u64,
    frames_tx: mpsc::Sender<(usize, Option<Vec<Bytes>>)>,
    frames_rx: mpsc::Receiver<(usize, Option<Vec<Bytes>>)>,
    out_tx: mpsc::UnboundedSender<Bytes>,
    out_queued: Arc<AtomicUsize>,
    /// Commands that set connection state (HELLO, AUTH, SELECT, CLIENT
    /// SETNAME), replayed on every node connection opened later.
    replay: Vec<Bytes>,
    protocol: u8,
    /// A transaction: its node once known (MULTI is sent with the first
    /// command after it), and the MULTI entry waiting for that.
    tx: Option<(Option<usize>, Option<u64>)>,
    watch_node: Option<usize>,
    /// Shard channels that lost their node, to subscribe again.
    orphans: Vec<Box<[u8]>>,
    /// When each re-subscribed shard channel lost its node (for the gap).
    lost_at: HashMap<Box<[u8]>, Instant>,
    gate: Option<Gate>,
    /// `None` when metrics are off.
    metrics: Option<crate::metrics::ConnMetrics>,
    /// The request being routed was recorded in `metrics`.
    counted: bool,
    /// `None` when tracing is off.
    tracer: Option<crate::telemetry::ConnTracer>,
    /// Spans pending before the request being routed.
    traced_before: Option<usize>,
    parser: RequestParser,
    /// Reads the arguments of the request being routed (kept for its
    /// buffers; one whole request at a time).
    route_parser: Option<RequestParser>,
    limits: crate::config::Limits,
    quit: bool,
}

/// A frame-level description of a pub/sub push or array.
fn pubsub_word(frame: &[u8]) -> Option<(bool, Vec<u8>)> {
    let push = frame.first() == Some(&b'>');
    if !push && frame.first() != Some(&b'*') {
        return None;
    }
    let Ok(Value::Array(items)) = value::decode(frame, 4) else {
        return None;
    };
    let word = items.first()?.as_bytes()?.to_ascii_lowercase();
    Some((push, word))
}

fn is_confirmation(word: &[u8]) -> bool {
    matches!(
        word,
        b"subscribe"
            | b"unsubscribe"
            | b"psubscribe"
            | b"punsubscribe"
            | b"ssubscribe"
            | b"sunsubscribe"
    )
}

fn is_delivery(word: &[u8]) -> bool {
    matches!(word, b"message" | b"pmessage" | b"smessage")
}

/// `[word, channel, count]` as RESP2 (`*`) or RESP3 push (`>`).
fn confirmation(push: bool, word: &[u8], channel: Option<&[u8]>, count: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + channel.map_or(0, <[u8]>::len));
    out.extend_from_slice(if push { b">3\r\n" } else { b"*3\r\n" });
    out.extend_from_slice(format!("${}\r\n", word.len()).as_bytes());
    out.extend_from_slice(word);
    out.extend_from_slice(b"\r\n");
    match channel {
        Some(c) => {
            out.extend_from_slice(format!("${}\r\n", c.len()).as_bytes());
            out.extend_from_slice(c);
            out.extend_from_slice(b"\r\n");
        }
        None if push => out.extend_from_slice(b"_\r\n"),
        None => out.extend_from_slice(b"$-1\r\n"),
    }
    out.extend_from_slice(format!(":{count}\r\n").as_bytes());
    out
}

/// The slot-defining key of a request, if it has one pubwarden can find.
fn first_key<'a>(cluster: &Cluster, args: &crate::resp::request::Args<'a>) -> Option<&'a [u8]> {
    let name = args.get(0)?;
    let lower = name.to_ascii_lowercase();
    // Scripts and functions name their keys after numkeys.
    if matches!(
        lower.as_slice(),
        b"eval" | b"evalsha" | b"eval_ro" | b"evalsha_ro" | b"fcall" | b"fcall_ro"
    ) {
        let numkeys = crate::resp::parse_i64(args.get(2)?)?;
        return (numkeys > 0).then(|| args.get(3)).flatten();
    }
    let table = cluster.commands();
    let (_, info) = table.resolve(name, args.get(1))?;
    let i = Some(usize::from(info.first_key)).filter(|&i| i > 0)?;
    args.get(i)
}

impl ClusterSession {
    pub fn new(
        cluster: Arc<Cluster>,
        settings: &Settings,
        gate: Option<Gate>,
    ) -> (Self, mpsc::UnboundedReceiver<Bytes>) {
        let (frames_tx, frames_rx) = mpsc::channel(FRAME_QUEUE);
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let mut parser = RequestParser::new(settings.limits.request);
        if let Some(g) = &gate {
            parser.set_unauthenticated(!g.authenticated());
        }
        (
            Self {
                cluster,
                nodes: IdMap::default(),
                by_addr: HashMap::new(),
                next_node: 0,
                home: None,
                entries: IdMap::default(),
                queue: VecDeque::new(),
                next_entry: 0,
                frames_tx,
                frames_rx,
                out_tx,
                out_queued: Arc::new(AtomicUsize::new(0)),
                replay: Vec::new(),
                protocol: 2,
                tx: None,
                watch_node: None,
                orphans: Vec::new(),
                lost_at: HashMap::new(),
                metrics: None,
                counted: false,
                tracer: None,
                traced_before: None,
                gate,
                parser,
                route_parser: None,
                limits: settings.limits.clone(),
                quit: false,
            },
            out_rx,
        )
    }

    /// Counts commands, publishes and deliveries in `metrics`.
    pub fn count_with(&mut self, metrics: &Arc<crate::metrics::Metrics>) {
        let mut m = crate::metrics::ConnMetrics::new(metrics.clone());
        if let Some(label) = self.gate.as_ref().and_then(Gate::user_label) {
            m.set_user(label);
        }
        self.metrics = Some(m);
    }

    /// Produces publish and delivery spans with `tracer`.
    pub fn trace_with(&mut self, tracer: crate::telemetry::ConnTracer) {
        self.tracer = Some(tracer);
    }

    /// Runs the session over `client` until it ends.
    pub async fn run<S>(
        mut self,
        client: S,
        out_rx: mpsc::UnboundedReceiver<Bytes>,
        mut drain: tokio::sync::watch::Receiver<Option<tokio::time::Instant>>,
    ) -> Ended
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (mut reader, writer) = tokio::io::split(client);
        let queued = self.out_queued.clone();
        let mut writer_task = tokio::spawn(write_client(writer, out_rx, queued));
        let mut changes = self.cluster.changes();
        let mut buf = BytesMut::new();
        let mut client_done = false;
        let auth_deadline = tokio::time::Instant::now() + self.limits.auth_timeout;
        if self.cluster.topology().shards.is_empty() {
            let _ = self.out_tx.send(Bytes::from_static(
                b"-CLUSTERDOWN pubwarden: the cluster slot map is not known yet\r\n",
            ));
            drop(self.out_tx);
            let _ = writer_task.await;
            return Ended::NoTopology;
        }
        let ended = loop {
            let subscribed = self
                .nodes
                .values()
                .any(|n| n.subs.iter().any(|s| !s.is_empty()));
            let out = self.out_queued.load(Ordering::Relaxed);
            if subscribed && out > self.limits.subscriber_output_hard {
                break Ended::SlowConsumer;
            }
            let may_read = !client_done
                && !self.quit
                && out < self.limits.pause_reading_at
                && self.queue.len() < self.limits.max_pipeline;
            let auth_pending = self.gate.as_ref().is_some_and(|g| !g.authenticated());
            if client_done && self.queue.is_empty() {
                break Ended::ByClient;
            }
            if self.quit && self.queue.is_empty() {
                break Ended::Quit;
            }
            let retry = !self.orphans.is_empty();
            tokio::select! {
                biased;
                r = &mut writer_task => {
                    let _ = r;
                    break Ended::ClientIo;
                }
                Some((node, frames)) = self.frames_rx.recv() => {
                    if let Err(e) = self.on_node_message(node, frames).await {
                        break e;
                    }
                    // Take what else is ready before writing.
                    let mut lost = None;
                    while let Ok((node, frames)) = self.frames_rx.try_recv() {
                        if let Err(e) = self.on_node_message(node, frames).await {
                            lost = Some(e);
                            break;
                        }
                    }
                    if let Some(e) = lost {
                        break e;
                    }
                }
                r = reader.read_buf(&mut buf), if may_read => {
                    match r {
                        Ok(0) => client_done = true,
                        Ok(_) => {
                            if let Err(e) = self.on_client_input(&mut buf).await {
                                self.flush();
                                break e;
                            }
                        }
                        Err(_) => break Ended::ClientIo,
                    }
                }
                _ = changes.changed() => {
                    if retry {
                        self.resubscribe_orphans().await;
                    }
                }
                () = tokio::time::sleep(Duration::from_millis(250)), if retry => {
                    self.cluster.refresh_soon();
                    self.resubscribe_orphans().await;
                }
                () = tokio::time::sleep_until(auth_deadline), if auth_pending => break Ended::AuthTimeout,
                _ = drain.changed() => {
                    if drain.borrow().is_some() {
                        break Ended::Shutdown;
                    }
                }
            }
            self.flush();
        };
        self.flush();
        // Let the writer finish what is queued (briefly), then stop.
        drop(self.out_tx);
        let _ = tokio::time::timeout(Duration::from_secs(2), writer_task).await;
        ended
    }

    /// One read's frames from a node, or `None`: its connection ended.
    async fn on_node_message(
        &mut self,
        node: usize,
        frames: Option<Vec<Bytes>>,
    ) -> Result<(), Ended> {
        match frames {
            Some(batch) => {
                for f in batch {
                    self.on_frame(node, f).await;
                }
                Ok(())
            }
            None => self.on_node_lost(node),
        }
    }

    fn new_entry(
        &mut self,
        frames: usize,
        shape: Shape,
        request: Option<Bytes>,
        internal: bool,
    ) -> u64 {
        let id = self.next_entry;
        self.next_entry += 1;
        self.entries.insert(
            id,
            Entry {
                frames_left: frames,
                out: BytesMut::new(),
                shape,
                request,
                redirects: 0,
                internal,
                in_tx: false,
            },
        );
        if !internal {
            self.queue.push_back((id, Touched::default()));
        }
        id
    }

    /// A reply pubwarden gives itself, in order.
    fn local(&mut self, reply: &[u8]) {
        let id = self.new_entry(0, Shape::Plain, None, false);
        if let Some(e) = self.entries.get_mut(&id) {
            e.out.extend_from_slice(reply);
        }
    }

    /// The connection to `addr`, opened (with the session's state
    /// replayed) if needed.
    async fn node(&mut self, addr: &str) -> Option<usize> {
        if let Some(&i) = self.by_addr.get(addr) {
            return Some(i);
        }
        let conn = self.cluster.node_upstream(addr);
        let stream = match crate::upstream::connect(&conn).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(node = addr, error = %e, "cannot connect to cluster node");
                self.cluster.refresh_soon();
                return None;
            }
        };
        let i = self.next_node;
        self.next_node += 1;
        let (r, w) = tokio::io::split(stream);
        let (tx, rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(read_node(
            i,
            r,
            self.frames_tx.clone(),
            self.limits.max_reply_depth,
        ));
        let writer = tokio::spawn(write_node(w, rx));
        self.cluster.metrics.cluster_node_connection(addr, 1);
        self.nodes.insert(
            i,
            Node {
                addr: addr.to_string(),
                tx,
                owed: VecDeque::new(),
                subs: Default::default(),
                intent: Default::default(),
                unflushed: 0,
                _tasks: [AbortOnDrop(reader), AbortOnDrop(writer)],
                metrics: self.cluster.metrics.clone(),
                counters: self.cluster.metrics.cluster_node_counters(addr),
            },
        );
        self.by_addr.insert(addr.to_string(), i);
        for cmd in self.replay.clone() {
            let id = self.new_entry(1, Shape::Plain, None, true);
            self.send(i, id, 1, cmd);
        }
        Some(i)
    }

    async fn home(&mut self) -> Option<usize> {
        if let Some(h) = self.home
            && self.nodes.contains_key(&h)
        {
            return Some(h);
        }
        let addr = self.cluster.pick_home()?;
        let h = self.node(&addr).await?;
        self.home = Some(h);
        Some(h)
    }

    /// Queues `bytes` to node `i` for entry `id`, which expects `frames` from it.
    fn send(&mut self, i: usize, id: u64, frames: usize, bytes: Bytes) {
        let Some(node) = self.nodes.get_mut(&i) else {
            return;
        };
        if frames > 0 {
            node.owed.push_back((id, frames));
        }
        if !self.entries.get(&id).is_some_and(|e| e.internal) {
            node.counters.0.inc();
        }
        let _ = node.tx.send(bytes);
        if let Some((_, touched)) = self.queue.iter_mut().rev().find(|(e, _)| *e == id)
            && touched.insert(i)
        {
            node.unflushed += 1;
        }
    }

    fn master_of(&self, key: &[u8]) -> Option<String> {
        self.cluster
            .topology()
            .master(slot::slot(key))
            .map(str::to_string)
    }

    async fn on_client_input(&mut self, buf: &mut BytesMut) -> Result<(), Ended> {
        if let Some(m) = &mut self.metrics {
            m.begin_batch();
        }
        let result = self.parse_client_input(buf).await;
        if let Some(m) = &mut self.metrics {
            m.end_client_batch();
        }
        result
    }

    async fn parse_client_input(&mut self, buf: &mut BytesMut) -> Result<(), Ended> {
        let mut at = 0;
        loop {
            let frame = match self.parser.next(buf, at) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    self.local(&e.reply());
                    buf.advance(at);
                    self.parser.rebase(at);
                    return Err(Ended::ProtocolError);
                }
            };
            at = frame.end;
            if frame.argc == 0 {
                continue;
            }
            let request = Bytes::copy_from_slice(if frame.inline {
                self.parser.inline_encoding()
            } else {
                &buf[frame.start..frame.end]
            });
            self.request(request).await?;
            if self.quit {
                break;
            }
        }
        buf.advance(at);
        self.parser.rebase(at);
        if buf.is_empty() {
            *buf = BytesMut::new();
        }
        Ok(())
    }

    /// Routes one request, and tells metrics which queue entry answers it.
    async fn request(&mut self, request: Bytes) -> Result<(), Ended> {
        let start = self.next_entry;
        self.counted = false;
        self.traced_before = None;
        let mut parser = self
            .route_parser
            .take()
            .unwrap_or_else(|| RequestParser::new(self.limits.request));
        let result = self.route(request, &mut parser).await;
        self.route_parser = Some(parser);
        if !self.counted && self.traced_before.is_none() {
            return result;
        }
        let id = self
            .queue
            .iter()
            .rev()
            .map(|(id, _)| *id)
            .take_while(|&id| id >= start)
            .min();
        if self.counted
            && let Some(m) = &mut self.metrics
        {
            m.renumber_last(id);
        }
        if let (Some(before), Some(t)) = (self.traced_before, &mut self.tracer)
            && t.pending() > before
        {
            t.renumber_last(id);
            // The span names the node that serves the request.
            let node = id
                .and_then(|id| self.queue.iter().rev().find(|(e, _)| *e == id))
                .and_then(|(_, touched)| touched.first())
                .and_then(|n| self.nodes.get(&n));
            if let Some(n) = node {
                t.routed_to(&n.addr);
            }
        }
        result
    }

    /// Routes one request.
    /// `request` is one whole request in multibulk form (inline requests
    /// arrive already rewritten by the client parser).
    async fn route(&mut self, mut request: Bytes, parser: &mut RequestParser) -> Result<(), Ended> {
        // Arguments are read from a handle of their own: the request may be
        // replaced below (HELLO without its AUTH part).
        let original = request.clone();
        let Ok(Some(frame)) = parser.next(&original, 0) else {
            // Cannot happen for a request the client parser completed; a
            // fresh parser keeps any half-read state out of the next one.
            *parser = RequestParser::new(self.limits.request);
            return Ok(());
        };
        let args = parser.args(&original, &frame);
        let cmd = Command::classify(&args);
        let mut filtered = false;
        if let Some(gate) = self.gate.as_mut() {
            loop {
                match gate.check(&cmd, &args, Instant::now()) {
                    Verdict::Forward => break,
                    Verdict::ForwardAs(b) => {
                        request = b;
                        break;
                    }
                    Verdict::ForwardFiltered => {
                        filtered = true;
                        break;
                    }
                    Verdict::Answer { reply, upstream } => {
                        if let Some(t) = &mut self.tracer {
                            t.answered_here(&cmd, &args, gate.user_name(), &reply);
                        }
                        let authed = gate.authenticated();
                        self.parser.set_unauthenticated(!authed);
                        if let Some(marker) = upstream
                            && let Some((Some(node), _)) = self.tx
                        {
                            let id = self.new_entry(1, Shape::Plain, None, true);
                            self.send(node, id, 1, Bytes::from_static(marker));
                        }
                        self.local(&reply);
                        return Ok(());
                    }
                    Verdict::Delay(d) => {
                        tokio::time::sleep(d).await;
                        gate.held_for(d);
                    }
                }
            }
        }
        let name = cmd.name;
        // The client's entry for this request is the next one created.
        if let Some(m) = &mut self.metrics {
            m.request(self.next_entry, &cmd, &args);
            self.counted = true;
        }
        if let Some(t) = &mut self.tracer {
            self.traced_before = Some(t.pending());
            let user = self.gate.as_ref().and_then(Gate::user_name);
            if let Some(bytes) = t.request(self.next_entry, &cmd, &args, user) {
                // A PUBLISH whose payload now carries a trace envelope.
                request = Bytes::from(bytes);
            }
        }
        match cmd.kind {
            Kind::Quit => {
                self.local(b"+OK\r\n");
                self.quit = true;
                return Ok(());
            }
            Kind::Monitor | Kind::ClientReply(_) => {
                self.local(
                    format!(
                        "-ERR pubwarden: {} is not supported in cluster mode\r\n",
                        name.to_ascii_uppercase()
                    )
                    .as_bytes(),
                );
                return Ok(());
            }
            _ => {}
        }
        // RESP2 subscribed mode belongs to the session, not to one node: a
        // client whose subscriptions live on other nodes than the one a
        // command would reach must be answered as one server would.
        if self.protocol == 2 && self.subscribed() {
            match cmd.kind {
                Kind::Subscribe(_) | Kind::Unsubscribe(_) | Kind::Quit | Kind::Reset => {}
                Kind::Ping => {
                    let arg = args.get(1).unwrap_or_default();
                    let mut reply = format!("*2\r\n$4\r\npong\r\n${}\r\n", arg.len()).into_bytes();
                    reply.extend_from_slice(arg);
                    reply.extend_from_slice(b"\r\n");
                    self.local(&reply);
                    return Ok(());
                }
                _ => {
                    let table = self.cluster.commands();
                    // Unknown commands get Redis's own error first.
                    if let Some((full, _)) = args.get(0).and_then(|n| table.resolve(n, args.get(1)))
                    {
                        self.local(
                            format!("-ERR Can't execute '{full}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context\r\n")
                                .as_bytes(),
                        );
                        return Ok(());
                    }
                }
            }
        }
        // Inside a pinned transaction every command goes to its node.
        if let Some((pin, multi_entry)) = self.tx {
            let node = match pin {
                Some(n) => n,
                None => {
                    let target =
                        match first_key(&self.cluster, &args).and_then(|k| self.master_of(k)) {
                            Some(addr) if self.watch_node.is_none() => self.node(&addr).await,
                            _ => match self.watch_node {
                                Some(w) if self.nodes.contains_key(&w) => Some(w),
                                _ => self.home().await,
                            },
                        };
                    let Some(n) = target else {
                        self.local(b"-CLUSTERDOWN pubwarden: no cluster node reachable\r\n");
                        return Ok(());
                    };
                    if let Some(m) = multi_entry {
                        self.send(n, m, 1, Bytes::from_static(b"*1\r\n$5\r\nMULTI\r\n"));
                    }
                    self.tx = Some((Some(n), None));
                    n
                }
            };
            let id = self.new_entry(1, Shape::Plain, None, false);
            if let Some(e) = self.entries.get_mut(&id) {
                e.in_tx = true;
            }
            self.send(node, id, 1, request);
            if matches!(cmd.kind, Kind::Exec | Kind::Discard | Kind::Reset) {
                self.tx = None;
                self.watch_node = None;
            }
            return Ok(());
        }
        let argc = args.len();
        match cmd.kind {
            Kind::Multi => {
                // Sent with the first command of the transaction, to its node.
                let id = self.new_entry(1, Shape::Plain, None, false);
                self.tx = Some((None, Some(id)));
            }
            Kind::Exec | Kind::Discard => {
                // Without MULTI: Redis's own error, from any node.
                let Some(h) = self.home().await else {
                    return Err(Ended::NodeLost);
                };
                let id = self.new_entry(1, Shape::Plain, None, false);
                self.send(h, id, 1, request);
            }
            Kind::Subscribe(SubKind::Shard) | Kind::SPublish => {
                let channels: Vec<&[u8]> = args.iter().skip(1).collect();
                let Some(first) = channels.first() else {
                    return self.send_home(request, 1, Shape::Plain).await;
                };
                let s = slot::slot(first);
                if cmd.kind != Kind::SPublish && channels.iter().any(|c| slot::slot(c) != s) {
                    self.local(CROSSSLOT);
                    return Ok(());
                }
                let frames = if cmd.kind == Kind::SPublish {
                    1
                } else {
                    channels.len()
                };
                let shape = if cmd.kind == Kind::SPublish {
                    Shape::Plain
                } else {
                    Shape::Subs(SubKind::Shard)
                };
                let node = self.send_to_owner(s, request, frames, shape).await?;
                if cmd.kind != Kind::SPublish
                    && let Some(n) = node
                {
                    self.intend(n, SubKind::Shard, &channels, true);
                }
            }
            Kind::Unsubscribe(SubKind::Shard) => self.sunsubscribe(&args, request).await?,
            Kind::Subscribe(k) => {
                self.send_home(request, argc.saturating_sub(1).max(1), Shape::Subs(k))
                    .await?;
                let channels: Vec<&[u8]> = args.iter().skip(1).collect();
                if let Some(h) = self.home {
                    self.intend(h, k, &channels, true);
                }
            }
            Kind::Unsubscribe(k) => {
                let h = self.home().await;
                let frames = if argc > 1 {
                    argc - 1
                } else {
                    h.and_then(|h| self.nodes.get(&h))
                        .map_or(1, |n| n.intent[kind_index(k)].len().max(1))
                };
                self.send_home(request, frames, Shape::Subs(k)).await?;
                if let Some(h) = self.home {
                    let channels: Vec<&[u8]> = args.iter().skip(1).collect();
                    if channels.is_empty() {
                        if let Some(n) = self.nodes.get_mut(&h) {
                            n.intent[kind_index(k)].clear();
                        }
                    } else {
                        self.intend(h, k, &channels, false);
                    }
                }
            }
            Kind::Hello(_) | Kind::Reset => {
                if let Kind::Hello(Some(v)) = cmd.kind {
                    self.protocol = v;
                }
                if cmd.kind == Kind::Reset {
                    self.replay.clear();
                    self.protocol = 2;
                    self.watch_node = None;
                    for n in self.nodes.values_mut() {
                        n.subs = Default::default();
                        n.intent = Default::default();
                    }
                } else {
                    self.replay.push(request.clone());
                }
                self.broadcast(request).await?;
            }
            Kind::Other if is_session_state(&args) => {
                self.replay.push(request.clone());
                self.broadcast(request).await?;
            }
            _ => {
                let key = first_key(&self.cluster, &args).map(<[u8]>::to_vec);
                let shape = if filtered {
                    Shape::Filtered
                } else if name == "info" {
                    Shape::Standalone
                } else {
                    Shape::Plain
                };
                match key {
                    Some(k) => {
                        let s = slot::slot(&k);
                        let node = self.send_to_owner(s, request, 1, shape).await?;
                        if name == "watch" {
                            self.watch_node = node;
                        }
                    }
                    None => {
                        if name == "unwatch"
                            && let Some(w) = self.watch_node.take()
                            && self.nodes.contains_key(&w)
                        {
                            let id = self.new_entry(1, shape, None, false);
                            self.send(w, id, 1, request);
                            return Ok(());
                        }
                        self.send_home(request, 1, shape).await?;
                    }
                }
            }
        }
        Ok(())
    }

    async fn send_home(
        &mut self,
        request: Bytes,
        frames: usize,
        shape: Shape,
    ) -> Result<(), Ended> {
        let Some(h) = self.home().await else {
            self.local(b"-CLUSTERDOWN pubwarden: no cluster node reachable\r\n");
            return Ok(());
        };
        let id = self.new_entry(frames, shape, Some(request.clone()), false);
        self.send(h, id, frames, request);
        Ok(())
    }

    async fn send_to_owner(
        &mut self,
        slot: u16,
        request: Bytes,
        frames: usize,
        shape: Shape,
    ) -> Result<Option<usize>, Ended> {
        let node = if shape == Shape::Subs(SubKind::Shard) {
            match self.cluster.shard_subscriber_node(slot) {
                Some(addr) => self.node(&addr).await,
                None => None,
            }
        } else {
            // The per-request path: no address copied when connected.
            let topology = self.cluster.topology();
            match topology.master(slot) {
                Some(addr) => match self.by_addr.get(addr) {
                    Some(&i) => Some(i),
                    None => self.node(addr).await,
                },
                None => None,
            }
        };
        let Some(n) = node else {
            self.local(b"-CLUSTERDOWN Hash slot not served\r\n");
            self.cluster.refresh_soon();
            return Ok(None);
        };
        let id = self.new_entry(frames, shape, Some(request.clone()), false);
        self.send(n, id, frames, request);
        Ok(Some(n))
    }

    /// Session state (HELLO, AUTH, SELECT, CLIENT SETNAME, RESET): the home
    /// node answers the client; every other node gets it too.
    async fn broadcast(&mut self, request: Bytes) -> Result<(), Ended> {
        let Some(h) = self.home().await else {
            self.local(b"-CLUSTERDOWN pubwarden: no cluster node reachable\r\n");
            return Ok(());
        };
        let id = self.new_entry(1, Shape::Standalone, None, false);
        self.send(h, id, 1, request.clone());
        let others: Vec<usize> = self.nodes.keys().copied().filter(|&n| n != h).collect();
        for n in others {
            let id = self.new_entry(1, Shape::Plain, None, true);
            self.send(n, id, 1, request.clone());
        }
        Ok(())
    }

    /// SUNSUBSCRIBE: each channel on the node it is subscribed at; no
    /// arguments: every node holding shard channels.
    async fn sunsubscribe(
        &mut self,
        args: &crate::resp::request::Args<'_>,
        request: Bytes,
    ) -> Result<(), Ended> {
        let s = kind_index(SubKind::Shard);
        if args.len() <= 1 {
            let holders: Vec<(usize, usize)> = self
                .nodes
                .iter()
                .filter(|(_, n)| !n.intent[s].is_empty())
                .map(|(&i, n)| (i, n.intent[s].len()))
                .collect();
            if holders.is_empty() {
                let reply = confirmation(self.protocol == 3, b"sunsubscribe", None, 0);
                self.local(&reply);
                return Ok(());
            }
            let total = holders.iter().map(|h| h.1).sum();
            let id = self.new_entry(total, Shape::Subs(SubKind::Shard), None, false);
            for (n, count) in holders {
                self.send(n, id, count, request.clone());
                if let Some(node) = self.nodes.get_mut(&n) {
                    node.intent[s].clear();
                }
            }
            return Ok(());
        }
        // Group by the node holding each channel (or its slot's owner).
        let mut groups: Vec<(usize, Vec<&[u8]>)> = Vec::new();
        for ch in args.iter().skip(1) {
            let holder = self
                .nodes
                .iter()
                .find(|(_, n)| n.intent[s].contains(ch))
                .map(|(&i, _)| i);
            let node = match holder {
                Some(i) => Some(i),
                None => match self.master_of(ch) {
                    Some(addr) => self.node(&addr).await,
                    None => None,
                },
            };
            let Some(node) = node else {
                continue;
            };
            match groups.iter_mut().find(|(n, _)| *n == node) {
                Some((_, chs)) => chs.push(ch),
                None => groups.push((node, vec![ch])),
            }
        }
        let total: usize = groups.iter().map(|g| g.1.len()).sum();
        if total == 0 {
            self.local(b"-CLUSTERDOWN Hash slot not served\r\n");
            return Ok(());
        }
        let id = self.new_entry(total, Shape::Subs(SubKind::Shard), None, false);
        for (node, chs) in groups {
            let mut argv: Vec<&[u8]> = vec![b"SUNSUBSCRIBE"];
            argv.extend(chs.iter().copied());
            let n = chs.len();
            self.send(node, id, n, Bytes::from(crate::resp::encode_command(&argv)));
            self.intend(node, SubKind::Shard, &chs, false);
        }
        Ok(())
    }

    /// Records subscriptions requested (`add`) or dropped on `node`.
    fn intend(&mut self, node: usize, kind: SubKind, channels: &[&[u8]], add: bool) {
        if let Some(n) = self.nodes.get_mut(&node) {
            let set = &mut n.intent[kind_index(kind)];
            for c in channels {
                if add {
                    set.insert(Box::from(*c));
                } else {
                    set.remove(*c);
                }
            }
        }
    }

    /// Any subscription requested and not dropped, on any node.
    fn subscribed(&self) -> bool {
        self.nodes
            .values()
            .any(|n| n.intent.iter().any(|s| !s.is_empty()))
    }

    fn shard_total(&self) -> usize {
        self.nodes.values().map(|n| n.subs[2].len()).sum()
    }

    /// Writes a frame to the client now, or behind what the node still has
    /// waiting in the client queue.
    fn deliver(&mut self, node: usize, frame: Bytes) {
        let behind = self.nodes.get(&node).is_some_and(|n| n.unflushed > 0);
        if behind {
            let id = self.new_entry(0, Shape::Plain, None, false);
            if let Some(e) = self.entries.get_mut(&id) {
                e.out.extend_from_slice(&frame);
            }
        } else {
            self.out_queued.fetch_add(frame.len(), Ordering::Relaxed);
            let _ = self.out_tx.send(frame);
        }
    }

    /// The hot path: a message/pmessage/smessage recognised from its first
    /// bytes (no decoding), counted and forwarded as it came.
    fn fast_delivery(&mut self, node: usize, frame: &Bytes) -> bool {
        let Some(f) = crate::resp::frame::fast_delivery(frame, 0) else {
            return false;
        };
        let Some(n) = self.nodes.get(&node) else {
            return false;
        };
        // RESP2 arrays are deliveries only on a subscribed connection.
        if frame.first() == Some(&b'*') && n.subs.iter().all(HashSet::is_empty) {
            return false;
        }
        n.counters.1.inc();
        let kind = match f.delivery {
            2 => crate::session::DeliveryKind::PMessage,
            3 => crate::session::DeliveryKind::SMessage,
            _ => crate::session::DeliveryKind::Message,
        };
        if kind == crate::session::DeliveryKind::PMessage
            && let Some(g) = &self.gate
            && g.filters_deliveries()
            && f.str_elem(frame, 2).is_some_and(|ch| g.hides_delivery(ch))
        {
            return true;
        }
        if let Some(m) = &mut self.metrics {
            m.begin_batch();
            m.delivery(kind, &f, frame);
            m.end_batch(self.out_queued.load(Ordering::Relaxed));
        }
        if let Some(t) = &mut self.tracer {
            t.begin_batch();
            if let Some(n) = self.nodes.get(&node) {
                t.set_server(&n.addr);
            }
            let stripped = t.delivery(kind, &f, frame);
            t.end_batch(self.out_queued.load(Ordering::Relaxed));
            if let Some(bytes) = stripped {
                // The client gets the payload without pubwarden's envelope.
                self.deliver(node, Bytes::from(bytes));
                return true;
            }
        }
        self.deliver(node, frame.clone());
        true
    }

    async fn on_frame(&mut self, node: usize, frame: Bytes) {
        if self.fast_delivery(node, &frame) {
            return;
        }
        let head_shape = self
            .nodes
            .get(&node)
            .and_then(|n| n.owed.front())
            .and_then(|(id, _)| self.entries.get(id))
            .map(|e| e.shape);
        let subscribed = self
            .nodes
            .get(&node)
            .is_some_and(|n| n.subs.iter().any(|s| !s.is_empty()));
        let pubsub = if frame.first() == Some(&b'>')
            || subscribed
            || matches!(head_shape, Some(Shape::Subs(_)))
        {
            pubsub_word(&frame)
        } else {
            None
        };
        if let Some((push, word)) = &pubsub {
            if is_delivery(word) {
                if word == b"pmessage"
                    && let Some(g) = &self.gate
                    && g.filters_deliveries()
                    && let Ok(Value::Array(items)) = value::decode(&frame, 4)
                    && let Some(ch) = items.get(2).and_then(Value::as_bytes)
                    && g.hides_delivery(ch)
                {
                    return;
                }
                if let Some(m) = &mut self.metrics
                    && let Some(f) = crate::resp::frame::fast_delivery(&frame, 0)
                {
                    let kind = match word.as_slice() {
                        b"pmessage" => crate::session::DeliveryKind::PMessage,
                        b"smessage" => crate::session::DeliveryKind::SMessage,
                        _ => crate::session::DeliveryKind::Message,
                    };
                    m.begin_batch();
                    m.delivery(kind, &f, &frame);
                    m.end_batch(self.out_queued.load(Ordering::Relaxed));
                }
                self.deliver(node, frame);
                return;
            }
            if is_confirmation(word) {
                let expected = matches!(head_shape, Some(Shape::Subs(_)));
                if expected {
                    self.confirmation(node, *push, word, &frame);
                    return;
                }
                if word == b"sunsubscribe" {
                    self.moved_away(node, *push, &frame);
                    return;
                }
            }
            if *push {
                // Other pushes (invalidate, ...): straight through.
                self.deliver(node, frame);
                return;
            }
        }
        self.reply(node, frame).await;
    }

    /// A subscribe-family confirmation the head entry of `node` expects.
    fn confirmation(&mut self, node: usize, push: bool, word: &[u8], frame: &[u8]) {
        let Ok(Value::Array(items)) = value::decode(frame, 4) else {
            return;
        };
        let channel = items.get(1).and_then(Value::as_bytes).map(<[u8]>::to_vec);
        let kind = match word {
            b"subscribe" | b"unsubscribe" => SubKind::Channel,
            b"psubscribe" | b"punsubscribe" => SubKind::Pattern,
            _ => SubKind::Shard,
        };
        let adding = matches!(word, b"subscribe" | b"psubscribe" | b"ssubscribe");
        if let (Some(n), Some(ch)) = (self.nodes.get_mut(&node), &channel) {
            let set = &mut n.subs[kind_index(kind)];
            if adding {
                set.insert(Box::from(&ch[..]));
            } else {
                set.remove(&ch[..]);
            }
        }
        if adding
            && kind == SubKind::Shard
            && let Some(lost) = channel.as_deref().and_then(|ch| self.lost_at.remove(ch))
        {
            self.cluster.metrics.cluster_shard_gap(lost.elapsed());
        }
        let bytes = if kind == SubKind::Shard {
            // A single server counts all of the client's shard channels.
            confirmation(push, word, channel.as_deref(), self.shard_total())
        } else {
            frame.to_vec()
        };
        self.complete_frame(node, &bytes);
    }

    /// Redis unsubscribed a shard channel itself: its slot moved or its
    /// master failed over.
    fn moved_away(&mut self, node: usize, push: bool, frame: &[u8]) {
        let Ok(Value::Array(items)) = value::decode(frame, 4) else {
            return;
        };
        let Some(ch) = items.get(1).and_then(Value::as_bytes) else {
            return;
        };
        if let Some(n) = self.nodes.get_mut(&node) {
            n.subs[2].remove(ch);
            n.intent[2].remove(ch);
        }
        self.cluster.refresh_soon();
        if self.cluster.settings.pass_sunsubscribe {
            let bytes = confirmation(push, b"sunsubscribe", Some(ch), self.shard_total());
            self.deliver(node, Bytes::from(bytes));
        } else {
            self.lost_at
                .entry(Box::from(ch))
                .or_insert_with(Instant::now);
            self.orphans.push(Box::from(ch));
        }
    }

    /// Subscribes lost shard channels again on their current owners.
    async fn resubscribe_orphans(&mut self) {
        let orphans = std::mem::take(&mut self.orphans);
        let mut groups: Vec<(String, Vec<Box<[u8]>>)> = Vec::new();
        for ch in orphans {
            let Some(owner) = self.cluster.shard_subscriber_node(slot::slot(&ch)) else {
                self.orphans.push(ch);
                continue;
            };
            match groups.iter_mut().find(|(a, _)| *a == owner) {
                Some((_, v)) => v.push(ch),
                None => groups.push((owner, vec![ch])),
            }
        }
        for (addr, chans) in groups {
            let Some(n) = self.node(&addr).await else {
                self.orphans.extend(chans);
                continue;
            };
            // One command per slot: Redis refuses SSUBSCRIBE across slots.
            let mut by_slot: HashMap<u16, Vec<&[u8]>> = HashMap::new();
            for c in &chans {
                by_slot.entry(slot::slot(c)).or_default().push(c);
            }
            for (_, group) in by_slot {
                let mut argv: Vec<&[u8]> = vec![b"SSUBSCRIBE"];
                argv.extend(group.iter().copied());
                let request = Bytes::from(crate::resp::encode_command(&argv));
                let id = self.new_entry(
                    group.len(),
                    Shape::Subs(SubKind::Shard),
                    Some(request.clone()),
                    true,
                );
                self.send(n, id, group.len(), request);
                self.intend(n, SubKind::Shard, &group, true);
                self.cluster
                    .metrics
                    .cluster_shard_resubscribed(group.len() as u64);
            }
            tracing::info!(node = %addr, channels = chans.len(), "shard channels subscribed again on their new owner");
        }
    }

    /// A reply frame for the head entry of `node` (following redirects).
    async fn reply(&mut self, node: usize, frame: Bytes) {
        let Some(&(id, _)) = self.nodes.get(&node).and_then(|n| n.owed.front()) else {
            tracing::debug!("unexpected frame from a cluster node; dropped");
            return;
        };
        if frame.first() == Some(&b'-')
            && let Some((ask, target)) = redirect(&frame)
        {
            let redirectable = self.entries.get(&id).and_then(|e| {
                e.request
                    .clone()
                    .filter(|_| e.redirects < MAX_REDIRECTS && !e.in_tx)
            });
            if let Some(request) = redirectable {
                let frames = self.pop_owed(node);
                self.cluster.metrics.cluster_redirect(ask);
                if !ask {
                    self.cluster.refresh_soon();
                }
                if let Some(t) = self.node(&target).await {
                    if let Some(e) = self.entries.get_mut(&id) {
                        e.redirects += 1;
                    }
                    if ask {
                        let a = self.new_entry(1, Shape::Plain, None, true);
                        self.send(t, a, 1, Bytes::from_static(b"*1\r\n$6\r\nASKING\r\n"));
                    }
                    // A redirected SSUBSCRIBE's channels now live on the target.
                    if let Some(Shape::Subs(k)) = self.entries.get(&id).map(|e| e.shape)
                        && let Ok(Value::Array(items)) = value::decode(&request, 2)
                    {
                        let chs: Vec<&[u8]> =
                            items.iter().skip(1).filter_map(Value::as_bytes).collect();
                        self.intend(node, k, &chs, false);
                        self.intend(t, k, &chs, true);
                    }
                    self.send(t, id, frames, request);
                    return;
                }
                // The target cannot be reached: the client gets the error.
                self.answer_with(id, frames, &frame);
                return;
            }
            if self.entries.get(&id).is_some_and(|e| e.in_tx) {
                // A key of another node inside a transaction: Redis has
                // flagged the transaction; say why as a cluster would.
                self.complete_frame(node, CROSSSLOT);
                return;
            }
        }
        let shape = self.entries.get(&id).map(|e| e.shape);
        if frame.first() == Some(&b'-') && matches!(shape, Some(Shape::Subs(_))) {
            // An error answers the whole subscribe command.
            let frames = self.pop_owed(node);
            self.answer_with(id, frames, &frame);
            return;
        }
        if shape == Some(Shape::Standalone) {
            let rewritten = as_standalone(&frame);
            self.complete_frame(node, &rewritten);
            return;
        }
        if shape == Some(Shape::Filtered)
            && let Some(g) = &self.gate
            && let Some(kept) = crate::proxy::filter_channel_list(&frame, |ch| g.may_see(ch))
        {
            self.complete_frame(node, &kept);
            return;
        }
        self.complete_frame(node, &frame);
    }

    /// Removes the head entry of `node`'s owed list, returning its frames.
    fn pop_owed(&mut self, node: usize) -> usize {
        self.nodes
            .get_mut(&node)
            .and_then(|n| n.owed.pop_front())
            .map_or(0, |(_, f)| f)
    }

    /// Answers entry `id` with one frame in place of `frames` owed.
    fn answer_with(&mut self, id: u64, frames: usize, bytes: &[u8]) {
        if let Some(e) = self.entries.get_mut(&id) {
            e.out.extend_from_slice(bytes);
            e.frames_left = e.frames_left.saturating_sub(frames);
        }
    }

    /// Appends a frame to the head entry of `node`.
    fn complete_frame(&mut self, node: usize, bytes: &[u8]) {
        let Some(n) = self.nodes.get_mut(&node) else {
            return;
        };
        let Some((id, left)) = n.owed.front_mut() else {
            return;
        };
        let id = *id;
        *left -= 1;
        if *left == 0 {
            n.owed.pop_front();
        }
        if let Some(e) = self.entries.get_mut(&id) {
            e.out.extend_from_slice(bytes);
            e.frames_left = e.frames_left.saturating_sub(1);
            if e.internal && e.frames_left == 0 {
                self.entries.remove(&id);
            }
        }
    }

    /// Writes complete entries at the head of the client queue.
    fn flush(&mut self) {
        // Consecutive answers go to the client writer as one buffer.
        let mut out = BytesMut::new();
        while let Some((id, _)) = self.queue.front() {
            let done = self.entries.get(id).is_none_or(|e| e.frames_left == 0);
            if !done {
                break;
            }
            let Some((id, touched)) = self.queue.pop_front() else {
                break;
            };
            for n in touched.iter() {
                if let Some(node) = self.nodes.get_mut(&n) {
                    node.unflushed = node.unflushed.saturating_sub(1);
                }
            }
            if let Some(e) = self.entries.remove(&id)
                && !e.out.is_empty()
            {
                if self.metrics.is_some() || self.tracer.is_some() {
                    let mut scanner = FrameScanner::new(self.limits.max_reply_depth);
                    let first = scanner.next(&e.out, 0).ok().flatten();
                    let reply = first.as_ref().map(|f| (f, &e.out[..]));
                    if let Some(m) = &mut self.metrics {
                        m.answered_seq(id, reply);
                    }
                    if let Some(t) = &mut self.tracer {
                        t.answered_seq(id, reply);
                    }
                }
                if out.is_empty() {
                    out = e.out;
                } else {
                    out.extend_from_slice(&e.out);
                }
            }
        }
        if !out.is_empty() {
            self.out_queued.fetch_add(out.len(), Ordering::Relaxed);
            let _ = self.out_tx.send(out.freeze());
        }
    }

    /// A node connection ended. Replies it owed cannot come: the client is
    /// closed, as its own Redis connection would be. Shard channels it held
    /// are subscribed again elsewhere once the slot map names a new owner.
    fn on_node_lost(&mut self, node: usize) -> Result<(), Ended> {
        let Some(n) = self.nodes.remove(&node) else {
            return Ok(());
        };
        self.by_addr.remove(&n.addr);
        self.cluster.refresh_soon();
        tracing::info!(node = %n.addr, "cluster node connection lost");
        let owes_client = n
            .owed
            .iter()
            .any(|(id, _)| self.entries.get(id).is_some_and(|e| !e.internal));
        let classic = !n.subs[0].is_empty() || !n.subs[1].is_empty();
        if owes_client || classic {
            return Err(Ended::NodeLost);
        }
        for (id, _) in &n.owed {
            self.entries.remove(id);
        }
        if self.home == Some(node) {
            self.home = None;
        }
        if self.cluster.settings.pass_sunsubscribe {
            let push = self.protocol == 3;
            for ch in &n.subs[2] {
                let total = self.shard_total();
                let bytes = confirmation(push, b"sunsubscribe", Some(ch), total);
                self.out_queued.fetch_add(bytes.len(), Ordering::Relaxed);
                let _ = self.out_tx.send(Bytes::from(bytes));
            }
        } else {
            let now = Instant::now();
            for ch in &n.subs[2] {
                self.lost_at.entry(ch.clone()).or_insert(now);
            }
            self.orphans.extend(n.subs[2].iter().cloned());
        }
        Ok(())
    }
}

/// A node's INFO or HELLO answer as a standalone server would give it.
fn as_standalone(frame: &[u8]) -> Vec<u8> {
    const HELLO_FROM: &[u8] = b"$4\r\nmode\r\n$7\r\ncluster\r\n";
    const HELLO_TO: &[u8] = b"$4\r\nmode\r\n$10\r\nstandalone\r\n";
    const INFO_FROM: &[u8] = b"cluster_enabled:1";
    const INFO_TO: &[u8] = b"cluster_enabled:0";
    let find = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).position(|w| w == needle);
    if let Some(at) = find(frame, HELLO_FROM) {
        let mut out = Vec::with_capacity(frame.len() + 3);
        out.extend_from_slice(&frame[..at]);
        out.extend_from_slice(HELLO_TO);
        out.extend_from_slice(&frame[at + HELLO_FROM.len()..]);
        return out;
    }
    // Same length: the bulk string's header stays right.
    if let Some(at) = find(frame, INFO_FROM) {
        let mut out = frame.to_vec();
        out[at..at + INFO_TO.len()].copy_from_slice(INFO_TO);
        return out;
    }
    frame.to_vec()
}

/// Commands that set connection state every node connection must share.
fn is_session_state(args: &crate::resp::request::Args<'_>) -> bool {
    let Some(name) = args.get(0) else {
        return false;
    };
    name.eq_ignore_ascii_case(b"auth")
        || name.eq_ignore_ascii_case(b"select")
        || (name.eq_ignore_ascii_case(b"client")
            && args
                .get(1)
                .is_some_and(|a| a.eq_ignore_ascii_case(b"setname")))
}

/// `-MOVED <slot> <addr>` / `-ASK <slot> <addr>`: (ask, addr).
fn redirect(frame: &[u8]) -> Option<(bool, String)> {
    let line = std::str::from_utf8(frame.get(1..)?).ok()?.trim_end();
    let mut parts = line.split(' ');
    let ask = match parts.next()? {
        "MOVED" => false,
        "ASK" => true,
        _ => return None,
    };
    let _slot = parts.next()?;
    let addr = parts.next()?;
    // Redis 7 may say ":port" when it does not know its own address.
    if addr.starts_with(':') {
        return None;
    }
    Some((ask, addr.to_string()))
}

async fn read_node<R: AsyncRead + Unpin>(
    node: usize,
    mut r: R,
    frames: mpsc::Sender<(usize, Option<Vec<Bytes>>)>,
    max_depth: usize,
) {
    let mut buf = BytesMut::new();
    let mut want = NODE_READ_MIN;
    let mut scanner = FrameScanner::new(max_depth);
    // The scanner holds the state of a partly read frame.
    let mut scanner_mid = false;
    loop {
        if buf.capacity() - buf.len() < want / 4 {
            buf.reserve(want);
        }
        let spare = buf.capacity() - buf.len();
        let n = match r.read_buf(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        want = if n == spare {
            (want * 2).min(NODE_READ_MAX)
        } else if n < want / 8 {
            NODE_READ_MIN
        } else {
            want
        };
        // Every complete frame of this read goes to the session at once.
        let mut batch = Vec::new();
        loop {
            // Deliveries are recognised from their first bytes; anything
            // else is scanned fully.
            let end = match crate::resp::frame::fast_delivery(&buf, 0) {
                Some(f) => {
                    if scanner_mid {
                        scanner = FrameScanner::new(max_depth);
                        scanner_mid = false;
                    }
                    Some(f.end)
                }
                None => match scanner.next(&buf, 0) {
                    Ok(Some(f)) => {
                        scanner = FrameScanner::new(max_depth);
                        scanner_mid = false;
                        Some(f.end)
                    }
                    Ok(None) => {
                        scanner_mid = true;
                        None
                    }
                    Err(_) => {
                        let _ = frames.send((node, Some(batch))).await;
                        let _ = frames.send((node, None)).await;
                        return;
                    }
                },
            };
            let Some(end) = end else {
                break;
            };
            batch.push(buf.split_to(end).freeze());
        }
        if !batch.is_empty() && frames.send((node, Some(batch))).await.is_err() {
            return;
        }
        if buf.is_empty() && want == NODE_READ_MIN {
            // Quiet: do not wait holding a large buffer.
            buf = BytesMut::new();
        }
    }
    let _ = frames.send((node, None)).await;
}

async fn write_node<W: AsyncWrite + Unpin>(mut w: W, mut rx: mpsc::UnboundedReceiver<Bytes>) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, 256).await > 0 {
        let mut out = BytesMut::new();
        for b in batch.drain(..) {
            out.extend_from_slice(&b);
        }
        if w.write_all(&out).await.is_err() {
            return;
        }
    }
}

async fn write_client<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
    queued: Arc<AtomicUsize>,
) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, 256).await > 0 {
        let mut out = BytesMut::new();
        for b in batch.drain(..) {
            out.extend_from_slice(&b);
        }
        let n = out.len();
        if w.write_all(&out).await.is_err() {
            return;
        }
        queued.fetch_sub(n, Ordering::Relaxed);
    }
    let _ = w.shutdown().await;
}
