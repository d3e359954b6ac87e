//! `upstream.mode: cluster` against a real Redis Cluster (three masters, a replica each, on
//! loopback): clients speak to pubwarden as to one ordinary Redis and never see a node
//! address, `MOVED` or `ASK`. Classic pub/sub spans the cluster; shard channels are subscribed
//! and published on their slot's master, one client on all three shards at once, counted as
//! one server would; keyed commands go by slot (hash tags respected), Redis's own `CROSSSLOT`
//! where keys span slots, pipelines answered in order; a sharded subscriber notices neither a
//! slot moving to another master nor its master failing over (pubwarden hides Redis's
//! `sunsubscribe` and subscribes again on the new owner, unless `pass_sunsubscribe`), nor its
//! master being killed (subscribed again once the replica has taken over: a gap only); and
//! `check-config` refuses incomplete or contradictory cluster settings.
//!
//! The first test checks the harness itself against Redis: its slot arithmetic against
//! `CLUSTER KEYSLOT`, and that its slot migration and failover really make Redis send a direct
//! sharded subscriber `sunsubscribe` (what pubwarden must hide).
//!
//! Each test starts its own six-node cluster (tests/support/cluster.rs); clusters are started
//! one at a time, so the tests of this binary run one after another (about 50 s in all).

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use support::cluster::{ClusterProxy, RedisCluster, crc16, key_slot, node_call, value_text};
use support::policy::{CliRun, call, expect_reply, run_cli, text, write_file};
use support::sentinel::wait_until;
use support::tls::metric_value;
use support::*;

const CROSSSLOT: &[u8] = b"-CROSSSLOT Keys in request don't hash to the same slot\r\n";
/// PING's reply in RESP2 subscribed mode.
const PONG_SUBSCRIBED: &[u8] = b"*2\r\n$4\r\npong\r\n$0\r\n\r\n";

// ---------------------------------------------------------------------------------------------
// Helpers.

/// The last lines of pubwarden's log, for failure messages.
fn log_tail(proxy: &ClusterProxy) -> String {
    let logs = proxy.logs();
    let lines: Vec<&str> = logs.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

/// The `pubwarden_cluster_*` lines of a scrape.
fn cluster_lines(metrics: &str) -> String {
    metrics
        .lines()
        .filter(|l| l.contains("pubwarden_cluster_"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A pub/sub frame as (kind, the other elements as text); None if it is not an array of
/// bulks and integers.
fn push_parts(frame: &[u8]) -> Option<(String, Vec<String>)> {
    let v = decode(frame).ok()?;
    let items = v.items()?;
    let (kind, rest) = items.split_first()?;
    let kind = String::from_utf8_lossy(kind.bytes()?).into_owned();
    let rest = rest
        .iter()
        .map(|i| match i {
            Value::Int(n) => Some(n.to_string()),
            Value::Nil => Some("<nil>".to_string()),
            other => other
                .bytes()
                .map(|b| String::from_utf8_lossy(b).into_owned()),
        })
        .collect::<Option<Vec<_>>>()?;
    Some((kind, rest))
}

fn bulk(s: &str) -> Vec<u8> {
    format!("${}\r\n{s}\r\n", s.len()).into_bytes()
}

/// A RESP2 pub/sub confirmation `[kind, channel, count]`.
fn confirmation(kind: &str, channel: &str, count: i64) -> Vec<u8> {
    let mut out = format!("*3\r\n${}\r\n{kind}\r\n", kind.len()).into_bytes();
    out.extend(bulk(channel));
    out.extend(format!(":{count}\r\n").into_bytes());
    out
}

fn smessage(channel: &str, payload: &str) -> Vec<u8> {
    encode(&["smessage", channel, payload])
}

/// The integer of a `:<n>` reply.
fn int_reply(frame: &[u8]) -> Option<i64> {
    match decode(frame) {
        Ok(Value::Int(n)) => Some(n),
        _ => None,
    }
}

/// Publishes `load-<n>` (n = 1, 2, ...) through pubwarden with each (command, channel) of
/// `targets` in turn, as fast as replies come (with a 2 ms pause between rounds); opens a new
/// connection after an error reply, close or timeout. Counts acknowledged publishes (`:<n>`)
/// and the connections opened, keeps the first non-integer replies, and tallies every failure
/// by kind.
struct Publisher {
    stop: Arc<AtomicBool>,
    /// The number of the last round started.
    round: Arc<AtomicU64>,
    acked: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    /// Connections opened (the first one included).
    connects: Arc<AtomicU64>,
    bad: Arc<Mutex<Vec<String>>>,
    /// Every failure by kind: `connect`, `send`, `no reply (<stop>)`, or an error reply's
    /// first line (at most 60 characters).
    kinds: Arc<Mutex<BTreeMap<String, u64>>>,
    /// The round numbers of acknowledged publishes (once per target), in order.
    acked_rounds: Arc<Mutex<Vec<u64>>>,
    handle: Option<JoinHandle<()>>,
}

impl Publisher {
    fn start(addr: SocketAddr, targets: &[(&str, &str)]) -> Publisher {
        let targets: Vec<(String, String)> = targets
            .iter()
            .map(|(c, ch)| (c.to_string(), ch.to_string()))
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let round = Arc::new(AtomicU64::new(0));
        let acked = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let connects = Arc::new(AtomicU64::new(0));
        let bad = Arc::new(Mutex::new(Vec::new()));
        let kinds = Arc::new(Mutex::new(BTreeMap::new()));
        let acked_rounds = Arc::new(Mutex::new(Vec::new()));
        let (s, a, f, b) = (stop.clone(), acked.clone(), failed.clone(), bad.clone());
        let (r, cn, k, ar) = (
            round.clone(),
            connects.clone(),
            kinds.clone(),
            acked_rounds.clone(),
        );
        let tally = move |kind: String| {
            *k.lock().unwrap().entry(kind).or_insert(0u64) += 1;
        };
        let handle = std::thread::spawn(move || {
            let mut conn: Option<RawConn> = None;
            let mut n = 0u64;
            while !s.load(Ordering::Relaxed) {
                n += 1;
                r.store(n, Ordering::Relaxed);
                let payload = format!("load-{n}");
                for (cmd, channel) in &targets {
                    let mut c = match conn.take() {
                        Some(c) => c,
                        None => match RawConn::try_connect(addr) {
                            Ok(c) => {
                                cn.fetch_add(1, Ordering::Relaxed);
                                c
                            }
                            Err(e) => {
                                f.fetch_add(1, Ordering::Relaxed);
                                tally("connect".to_string());
                                push_bad(&b, format!("connect: {e}"));
                                std::thread::sleep(millis(50));
                                continue;
                            }
                        },
                    };
                    if let Err(e) = c.try_send(&encode(&[cmd.as_str(), channel, &payload])) {
                        f.fetch_add(1, Ordering::Relaxed);
                        tally("send".to_string());
                        push_bad(&b, format!("{cmd} {channel} {payload}: send: {e}"));
                        continue;
                    }
                    let got = c.read_frames(1, secs(3));
                    match got.frames.first() {
                        Some(frame) if frame.starts_with(b":") => {
                            a.fetch_add(1, Ordering::Relaxed);
                            ar.lock().unwrap().push(n);
                            conn = Some(c);
                        }
                        Some(frame) => {
                            f.fetch_add(1, Ordering::Relaxed);
                            let line = String::from_utf8_lossy(frame);
                            let line = line.lines().next().unwrap_or_default();
                            tally(line.chars().take(60).collect());
                            push_bad(&b, format!("{cmd} {channel} {payload}: {}", text(frame)));
                            std::thread::sleep(millis(20));
                        }
                        None => {
                            f.fetch_add(1, Ordering::Relaxed);
                            tally(format!("no reply ({:?})", got.stop));
                            push_bad(
                                &b,
                                format!("{cmd} {channel} {payload}: no reply ({:?})", got.stop),
                            );
                            std::thread::sleep(millis(20));
                        }
                    }
                }
                std::thread::sleep(millis(2));
            }
        });
        Publisher {
            stop,
            round,
            acked,
            failed,
            connects,
            bad,
            kinds,
            acked_rounds,
            handle: Some(handle),
        }
    }

    fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    fn connects(&self) -> u64 {
        self.connects.load(Ordering::Relaxed)
    }

    /// Every failure so far by kind.
    fn failure_kinds(&self) -> BTreeMap<String, u64> {
        self.kinds.lock().unwrap().clone()
    }

    /// The round numbers of the publishes acknowledged so far.
    fn acked_rounds(&self) -> Vec<u64> {
        self.acked_rounds.lock().unwrap().clone()
    }

    /// The number of the round being published now (its payload is `load-<round>`).
    fn round(&self) -> u64 {
        self.round.load(Ordering::Relaxed)
    }

    /// Stops the thread: (acknowledged, failed, the first bad replies).
    fn finish(mut self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.join().expect("publisher thread panicked");
        }
        let bad = self.bad.lock().unwrap().clone();
        (self.acked(), self.failed.load(Ordering::Relaxed), bad)
    }
}

fn push_bad(bad: &Mutex<Vec<String>>, what: String) {
    let mut b = bad.lock().unwrap();
    if b.len() < 20 {
        b.push(what);
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A subscriber connection whose every frame is checked as it is read: only `message`,
/// `pmessage` and `smessage` frames on the channels it subscribed (anything else panics at
/// once); `load-<n>` payloads never twice on one (kind, channel); for shard channels, every
/// `load-<n>` lower than one seen before is kept as an inversion (asserted by the tests with
/// [`Watched::assert_in_order`], after their other checks); `marker-<k>` payloads collected.
struct Watched {
    name: String,
    conn: RawConn,
    /// (kind, channel) -> the load numbers in arrival order.
    loads: HashMap<(String, String), Vec<u64>>,
    /// (kind, channel) -> every load number seen.
    seen_loads: HashMap<(String, String), BTreeSet<u64>>,
    /// (channel, n, the highest before it) of each shard message that came out of order.
    inversions: Vec<(String, u64, u64)>,
    /// (kind, channel, payload) of every marker seen.
    markers: Vec<(String, String, String)>,
    /// (when it was read, n) of every `load-<n>`, in arrival order (read times are as fine as
    /// the test's reads are frequent).
    timeline: Vec<(Instant, u64)>,
    messages: u64,
}

impl Watched {
    fn new(name: &str, conn: RawConn) -> Watched {
        Watched {
            name: name.to_string(),
            conn,
            loads: HashMap::new(),
            seen_loads: HashMap::new(),
            inversions: Vec::new(),
            markers: Vec::new(),
            timeline: Vec::new(),
            messages: 0,
        }
    }

    /// Reads and checks frames for `span`.
    fn pump(&mut self, span: Duration, proxy: &ClusterProxy) {
        let deadline = Instant::now() + span;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            let got = self.conn.read_frames(1, left);
            match got.frames.first() {
                Some(frame) => self.check(frame, proxy),
                None => match got.stop {
                    Stop::Timeout => return,
                    other => panic!(
                        "the subscriber {} lost its connection ({other:?}, partial {}) after \
                         {} messages; pubwarden log:\n{}",
                        self.name,
                        text(&got.partial),
                        self.messages,
                        log_tail(proxy)
                    ),
                },
            }
        }
    }

    fn check(&mut self, frame: &[u8], proxy: &ClusterProxy) {
        let Some((kind, parts)) = push_parts(frame) else {
            panic!(
                "the subscriber {} got a frame that is not a pub/sub push: {}",
                self.name,
                text(frame)
            );
        };
        let (channel, payload) = match (kind.as_str(), parts.as_slice()) {
            ("message" | "smessage", [ch, p]) => (ch.clone(), p.clone()),
            ("pmessage", [_pattern, ch, p]) => (ch.clone(), p.clone()),
            _ => panic!(
                "the subscriber {} got {} after {} messages: the cluster must be invisible \
                 (no sunsubscribe, no error); pubwarden log:\n{}",
                self.name,
                text(frame),
                self.messages,
                log_tail(proxy)
            ),
        };
        self.messages += 1;
        if let Some(n) = payload.strip_prefix("load-") {
            let n: u64 = n.parse().expect("load number");
            let key = (kind.clone(), channel.clone());
            let fresh = self.seen_loads.entry(key.clone()).or_default().insert(n);
            assert!(
                fresh,
                "the subscriber {}: {kind} load-{n} on {channel} delivered twice; arrival \
                 order around it: {}; pubwarden log:\n{}",
                self.name,
                self.around(&key, n),
                log_tail(proxy)
            );
            let seq = self.loads.entry(key).or_default();
            if kind == "smessage"
                && let Some(&max) = seq.iter().max()
                && n < max
            {
                self.inversions.push((channel.clone(), n, max));
            }
            seq.push(n);
            self.timeline.push((Instant::now(), n));
        } else if payload.starts_with("marker-") {
            self.markers.push((kind, channel, payload));
        }
    }

    /// The load numbers that arrived around the first arrival of `n` (or the last 30).
    fn around(&self, key: &(String, String), n: u64) -> String {
        let seq = self.loads.get(key).cloned().unwrap_or_default();
        let at = seq.iter().position(|&x| x == n).unwrap_or(seq.len());
        let from = at.saturating_sub(15);
        let to = (at + 30).min(seq.len());
        format!("{:?}", &seq[from..to])
    }

    /// Panics unless every shard message arrived in publish order.
    fn assert_in_order(&self, what: &str) {
        self.assert_in_order_from(0, what);
    }

    /// Panics if a shard message numbered `from` or later arrived after a higher-numbered one
    /// (a lower-numbered message arriving late is tolerated).
    fn assert_in_order_from(&self, from: u64, what: &str) {
        let late: Vec<&(String, u64, u64)> = self
            .inversions
            .iter()
            .filter(|(_, n, _)| *n >= from)
            .collect();
        if let Some((channel, n, max)) = late.first() {
            let key = ("smessage".to_string(), channel.clone());
            panic!(
                "the subscriber {} ({what}): {} shard message(s) out of order, the first \
                 load-{n} on {channel} after load-{max} (shard messages must arrive once and \
                 in order); arrival order around it: {}",
                self.name,
                late.len(),
                self.around(&key, *max)
            );
        }
    }

    fn has_marker(&self, kind: &str, channel: &str) -> bool {
        self.markers
            .iter()
            .any(|(k, c, _)| k == kind && c == channel)
    }

    /// Still a working subscriber: sends PING and returns its reply (pushes that arrive first
    /// are checked). In RESP2 subscribed mode a single Redis answers `*2 pong ""`.
    fn ping(&mut self, proxy: &ClusterProxy) -> Vec<u8> {
        self.conn.send(&encode(&["PING"]));
        let deadline = Instant::now() + secs(5);
        loop {
            let got = self
                .conn
                .read_frames(1, deadline.saturating_duration_since(Instant::now()));
            let Some(frame) = got.frames.first() else {
                panic!(
                    "the subscriber {}: no PING reply ({:?}); pubwarden log:\n{}",
                    self.name,
                    got.stop,
                    log_tail(proxy)
                );
            };
            if !frame.starts_with(b"*3\r\n") && !frame.starts_with(b"*4\r\n") {
                return frame.clone();
            }
            self.check(frame, proxy);
        }
    }
}

/// A subscriber connection still answers PING. Which form is checked by
/// `sharded_pubsub_on_every_shard_is_counted_as_one_server_would` (a session holding shard
/// channels only must get `pong ""` as from a single Redis); here either form shows a working
/// connection, so that a wrong form does not hide what these tests are about.
fn assert_pong(reply: &[u8], what: &str) {
    assert!(
        reply == PONG_SUBSCRIBED || reply == b"+PONG\r\n",
        "{what}: PING answered {}",
        text(reply)
    );
}

/// Publishes `marker-<k>` with `cmd` on `channel` through pubwarden every 300 ms (a fresh
/// connection each time; the reply must be an integer, never a redirect) until every watched
/// subscriber has seen one, reading the watched subscribers meanwhile; panics after `timeout`.
fn publish_markers_until(
    proxy: &ClusterProxy,
    cmd: &str,
    channel: &str,
    watched: &mut [&mut Watched],
    timeout: Duration,
    cluster: &RedisCluster,
) {
    let deadline = Instant::now() + timeout;
    let mut k = 0;
    let mut replies = Vec::new();
    loop {
        k += 1;
        let mut c = proxy.connect();
        let reply = call(&mut c, &[cmd, channel, &format!("marker-{k}")]);
        assert!(
            int_reply(&reply).is_some_and(|n| n >= 0),
            "{cmd} {channel} marker-{k} through pubwarden answered {} (an integer expected; \
             the cluster must be invisible); pubwarden log:\n{}",
            text(&reply),
            log_tail(proxy)
        );
        replies.push(text(&reply));
        let share = millis(300) / watched.len() as u32;
        for w in watched.iter_mut() {
            w.pump(share, proxy);
        }
        let kind = if cmd.eq_ignore_ascii_case("SPUBLISH") {
            "smessage"
        } else {
            "message"
        };
        let missing: Vec<&str> = watched
            .iter()
            .filter(|w| !w.has_marker(kind, channel))
            .map(|w| w.name.as_str())
            .collect();
        if missing.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            panic!(
                "no {kind} marker on {channel} reached {missing:?} within {timeout:?} \
                 ({k} markers published, replies {replies:?}); metrics:\n{}\npubwarden log:\n{}\n{}",
                cluster_lines(&proxy.metrics()),
                log_tail(proxy),
                cluster.logs()
            );
        }
    }
}

/// Subscribes `conn` with one command and checks the confirmation bytes.
fn subscribe_checked(conn: &mut RawConn, args: &[&str], want: &[Vec<u8>], proxy: &ClusterProxy) {
    conn.send(&encode(args));
    let got = conn.read_frames(want.len(), secs(5));
    let stop = got.stop.clone();
    let frames = got.frames;
    assert_eq!(
        frames.iter().map(|f| text(f)).collect::<Vec<_>>(),
        want.iter().map(|f| text(f)).collect::<Vec<_>>(),
        "{args:?} through pubwarden ({stop:?}); pubwarden log:\n{}",
        log_tail(proxy)
    );
}

/// Sends `args` to a single Redis and through pubwarden; the `n` replies must be the same bytes.
fn same(single: &mut RawConn, proxy: &ClusterProxy, args: &[&str], n: usize, sub: &mut RawConn) {
    single.send(&encode(args));
    let want = single.read_frames(n, secs(5)).expect_all("single Redis");
    sub.send(&encode(args));
    let got = sub.read_frames(n, secs(5));
    let stop = got.stop.clone();
    assert_eq!(
        got.frames.iter().map(|f| text(f)).collect::<Vec<_>>(),
        want.iter().map(|f| text(f)).collect::<Vec<_>>(),
        "{args:?}: pubwarden ({stop:?}, left) vs a single Redis (right); log:\n{}",
        log_tail(proxy)
    );
}

// ---------------------------------------------------------------------------------------------
// The harness against Redis.

#[test]
fn harness_slots_migration_and_failover_match_redis() {
    // The XMODEM check value.
    assert_eq!(crc16(b"123456789"), 0x31C3);
    let cluster = RedisCluster::start();
    let mut keys: Vec<String> = [
        "",
        "a",
        "foo",
        "123456789",
        "{user1000}.following",
        "{user1000}.followers",
        "foo{}{bar}",
        "foo{{bar}}zap",
        "foo{bar}{zap}",
        "{}",
        "{}x",
        "{x",
        "x}",
        "}{x}",
        "{a}b{c}",
        "a{}{b}",
        "\u{e9}t\u{e9}",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    keys.extend((0..300).map(|i| format!("key-{i}")));
    keys.extend((0..50).map(|i| format!("{{tag{i}}}:field")));
    for k in &keys {
        assert_eq!(
            key_slot(k.as_bytes()),
            cluster.keyslot_by_redis(k),
            "slot of {k:?}: harness vs CLUSTER KEYSLOT"
        );
    }

    let shards = cluster.shards();
    assert_eq!(shards.len(), 3, "{shards:?}");
    assert_eq!(shards.iter().map(|s| s.slot_count()).sum::<usize>(), 16384);
    for s in &shards {
        assert_eq!(s.replicas().len(), 1, "{s:?}");
    }
    let masters = cluster.master_ports();
    let replicas = cluster.replica_ports();
    let all: BTreeSet<u16> = masters.iter().chain(replicas.iter()).copied().collect();
    assert_eq!(
        all,
        cluster.ports().into_iter().collect(),
        "masters + replicas = all nodes"
    );

    // A slot moved away from a direct sharded subscriber's node: Redis says sunsubscribe.
    let chan = cluster.name_in_shard("direct-move", masters[0]);
    let slot = key_slot(chan.as_bytes());
    assert_eq!(cluster.owner(slot), masters[0]);
    let mut sub = RawConn::connect(RedisCluster::addr(masters[0]));
    expect_reply(
        &mut sub,
        &["SSUBSCRIBE", &chan],
        &confirmation("ssubscribe", &chan, 1),
    );
    let key = format!("{{{chan}}}:k");
    assert_eq!(key_slot(key.as_bytes()), slot);
    assert_eq!(
        node_call(masters[0], &["SET", &key, "v"]).map(|v| value_text(&v)),
        Ok("OK".to_string())
    );
    cluster.migrate_slot(slot, masters[1]);
    assert_eq!(cluster.owner(slot), masters[1]);
    assert_eq!(
        node_call(masters[1], &["GET", &key]).map(|v| value_text(&v)),
        Ok("v".to_string()),
        "the key moved with its slot"
    );
    let frame = sub.read_one(secs(5));
    assert_eq!(
        text(&frame),
        text(&confirmation("sunsubscribe", &chan, 0)),
        "Redis tells a direct subscriber of a moved slot"
    );

    // A failover: the old master's sharded subscribers are told too.
    let chan2 = cluster.name_in_shard("direct-failover", masters[2]);
    let mut sub2 = RawConn::connect(RedisCluster::addr(masters[2]));
    expect_reply(
        &mut sub2,
        &["SSUBSCRIBE", &chan2],
        &confirmation("ssubscribe", &chan2, 1),
    );
    let new_master = cluster.failover(masters[2]);
    assert_ne!(new_master, masters[2]);
    assert_eq!(cluster.owner(key_slot(chan2.as_bytes())), new_master);
    let frame = sub2.read_one(secs(10));
    assert_eq!(
        text(&frame),
        text(&confirmation("sunsubscribe", &chan2, 0)),
        "Redis tells a direct subscriber of a failed-over master"
    );
}

// ---------------------------------------------------------------------------------------------
// Through pubwarden.

#[test]
fn pubwarden_finds_the_cluster_through_replica_seeds() {
    let cluster = RedisCluster::start();
    let replicas = cluster.replica_ports();
    // Seeds may be any nodes: here replicas only.
    let proxy = cluster.start_pubwarden_with(&replicas[..2], &[], "");
    assert_eq!(proxy.http_status("/readyz"), Some(200));
    let ok = proxy.wait_metric(
        "pubwarden_cluster_topology_refreshes_total",
        &[("result", "success")],
        secs(10),
        |v| v >= 1.0,
    );
    let metrics = proxy.metrics();
    assert!(
        ok.is_some_and(|v| v >= 1.0),
        "pubwarden_cluster_topology_refreshes_total{{result=\"success\"}} must be >= 1: \
         {ok:?}\n{}",
        cluster_lines(&metrics)
    );
    for kind in ["moved", "ask"] {
        assert!(
            metric_value(
                &metrics,
                "pubwarden_cluster_redirects_total",
                &[("kind", kind)]
            )
            .is_some(),
            "pubwarden_cluster_redirects_total{{kind=\"{kind}\"}} must exist:\n{}",
            cluster_lines(&metrics)
        );
    }
    let nodes = metric_value(&metrics, "pubwarden_cluster_nodes", &[]);
    assert!(
        nodes.is_some_and(|n| n > 0.0),
        "pubwarden_cluster_nodes must be > 0: {nodes:?}\n{}",
        cluster_lines(&metrics)
    );
    eprintln!("cluster metrics at start:\n{}", cluster_lines(&metrics));

    // A key on every shard, stored on its master.
    let mut c = proxy.connect();
    expect_reply(&mut c, &["PING"], b"+PONG\r\n");
    for master in cluster.master_ports() {
        let key = cluster.name_in_shard("seeded", master);
        expect_reply(&mut c, &["SET", &key, "here"], b"+OK\r\n");
        expect_reply(&mut c, &["GET", &key], &bulk("here"));
        assert_eq!(
            node_call(master, &["GET", &key]).map(|v| value_text(&v)),
            Ok("here".to_string()),
            "{key} must be stored on its slot's master (port {master})"
        );
    }
    // Nobody subscribes anywhere: 0 receivers.
    expect_reply(&mut c, &["PUBLISH", "nobody-listens", "x"], b":0\r\n");
    expect_reply(&mut c, &["SPUBLISH", "nobody-listens", "x"], b":0\r\n");
}

#[test]
fn classic_pubsub_spans_the_cluster() {
    let cluster = RedisCluster::start();
    let proxy = cluster.start_pubwarden(&[], "");
    const CH: &str = "news";
    // Three subscribers (whichever node or nodes pubwarden serves them from).
    let mut subs: Vec<Watched> = Vec::new();
    for i in 0..3 {
        let mut c = proxy.connect();
        subscribe_checked(
            &mut c,
            &["SUBSCRIBE", CH],
            &[confirmation("subscribe", CH, 1)],
            &proxy,
        );
        subscribe_checked(
            &mut c,
            &["PSUBSCRIBE", "new*"],
            &[confirmation("psubscribe", "new*", 2)],
            &proxy,
        );
        subs.push(Watched::new(&format!("classic-{i}"), c));
    }
    // Nobody listens on this one anywhere.
    let mut p = proxy.connect();
    expect_reply(&mut p, &["PUBLISH", "nobody-listens", "x"], b":0\r\n");

    // Publishes through four pubwarden connections and directly on every node.
    let mut want: Vec<String> = Vec::new();
    for i in 0..4 {
        let mut p = proxy.connect();
        for j in 0..25 {
            let payload = format!("pw-{i}-{j}");
            let reply = call(&mut p, &["PUBLISH", CH, &payload]);
            assert!(
                int_reply(&reply).is_some_and(|n| n >= 0),
                "PUBLISH through pubwarden: {}; log:\n{}",
                text(&reply),
                log_tail(&proxy)
            );
            want.push(payload);
        }
    }
    for port in cluster.ports() {
        let payload = format!("direct-{port}");
        match node_call(port, &["PUBLISH", CH, &payload]) {
            Ok(Value::Int(n)) if n >= 0 => {}
            other => panic!("PUBLISH on port {port}: {other:?}"),
        }
        want.push(payload);
    }
    for s in &mut subs {
        let n = want.len() * 2;
        let got = s.conn.read_frames(n, secs(10));
        let stop = got.stop.clone();
        let mut messages: BTreeMap<String, usize> = BTreeMap::new();
        let mut pmessages: BTreeMap<String, usize> = BTreeMap::new();
        for f in &got.frames {
            match push_parts(f) {
                Some((k, parts)) if k == "message" && parts.len() == 2 && parts[0] == CH => {
                    *messages.entry(parts[1].clone()).or_default() += 1;
                }
                Some((k, parts))
                    if k == "pmessage"
                        && parts.len() == 3
                        && parts[0] == "new*"
                        && parts[1] == CH =>
                {
                    *pmessages.entry(parts[2].clone()).or_default() += 1;
                }
                _ => panic!("subscriber {}: unexpected frame {}", s.name, text(f)),
            }
        }
        let missing: Vec<&String> = want
            .iter()
            .filter(|w| messages.get(*w) != Some(&1) || pmessages.get(*w) != Some(&1))
            .collect();
        assert!(
            missing.is_empty() && stop == Stop::Done,
            "subscriber {}: {} of {n} frames ({stop:?}); each publish must arrive once as \
             message and once as pmessage; missing or repeated: {missing:?}\npubwarden log:\n{}",
            s.name,
            got.frames.len(),
            log_tail(&proxy)
        );
        let (rest, _) = s.conn.read_until_idle(millis(300), secs(2));
        assert!(
            rest.is_empty(),
            "subscriber {}: more frames: {}",
            s.name,
            text(&rest)
        );
    }
    // Unsubscribed clients stop hearing; the count is the serving node's.
    for s in &mut subs {
        s.conn.send(&encode(&["UNSUBSCRIBE"]));
        s.conn.send(&encode(&["PUNSUBSCRIBE"]));
        let got = s.conn.read_frames(2, secs(5)).expect_all("unsubscribe");
        assert_eq!(
            got.iter().map(|f| text(f)).collect::<Vec<_>>(),
            vec![
                text(&confirmation("unsubscribe", CH, 1)),
                text(&confirmation("punsubscribe", "new*", 0))
            ]
        );
    }
    wait_until(
        secs(5),
        "PUBLISH to answer 0 once nobody subscribes",
        || {
            let r = call(&mut p, &["PUBLISH", CH, "after"]);
            if r == b":0\r\n" {
                Ok(())
            } else {
                Err(text(&r))
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", log_tail(&proxy)));
}

#[test]
fn sharded_pubsub_on_every_shard_is_counted_as_one_server_would() {
    let cluster = RedisCluster::start();
    let proxy = cluster.start_pubwarden(&[], "");
    let masters = cluster.master_ports();
    let sc: Vec<String> = masters
        .iter()
        .enumerate()
        .map(|(i, &m)| cluster.name_in_shard(&format!("shard-{i}"), m))
        .collect();
    for (i, ch) in sc.iter().enumerate() {
        assert_eq!(cluster.owner(key_slot(ch.as_bytes())), masters[i]);
    }
    let tag_a = format!("{{{}}}a", sc[2]);
    let tag_b = format!("{{{}}}b", sc[2]);
    assert_eq!(key_slot(tag_a.as_bytes()), key_slot(sc[2].as_bytes()));
    let all_channels = [
        sc[0].clone(),
        sc[1].clone(),
        sc[2].clone(),
        tag_a.clone(),
        tag_b.clone(),
    ];

    // The same session against a single Redis and through pubwarden, reply for reply.
    let alone = RedisServer::start();
    let mut single = RawConn::connect(alone.addr());
    let mut sub = proxy.connect();
    same(&mut single, &proxy, &["SSUBSCRIBE", &sc[0]], 1, &mut sub);
    same(&mut single, &proxy, &["SUBSCRIBE", "news"], 1, &mut sub);
    same(&mut single, &proxy, &["SSUBSCRIBE", &sc[1]], 1, &mut sub);
    same(&mut single, &proxy, &["PSUBSCRIBE", "n*"], 1, &mut sub);
    same(&mut single, &proxy, &["SSUBSCRIBE", &sc[2]], 1, &mut sub);
    same(
        &mut single,
        &proxy,
        &["SSUBSCRIBE", &tag_a, &tag_b],
        2,
        &mut sub,
    );
    same(&mut single, &proxy, &["SSUBSCRIBE", &sc[0]], 1, &mut sub); // again: the count stays 5
    same(&mut single, &proxy, &["PING"], 1, &mut sub);
    // Each channel is subscribed on its slot's master, once.
    for ch in &all_channels {
        let owner = cluster.owner(key_slot(ch.as_bytes()));
        let v = node_call(owner, &["PUBSUB", "SHARDNUMSUB", ch]);
        assert_eq!(
            v,
            Ok(Value::Array(vec![
                Value::Bulk(ch.as_bytes().to_vec()),
                Value::Int(1)
            ])),
            "PUBSUB SHARDNUMSUB {ch} on its owner (port {owner}); log:\n{}",
            log_tail(&proxy)
        );
    }

    // Channels of different slots in one SSUBSCRIBE: Redis's CROSSSLOT, on a fresh
    // connection and on the subscribed one.
    let mut fresh = proxy.connect();
    expect_reply(&mut fresh, &["SSUBSCRIBE", &sc[0], &sc[1]], CROSSSLOT);
    expect_reply(&mut fresh, &["PING"], b"+PONG\r\n");
    expect_reply(&mut sub, &["SSUBSCRIBE", &sc[1], &sc[2]], CROSSSLOT);

    // 100 rounds over the five channels, pipelined in one write: each SPUBLISH reaches the
    // owner, which has exactly one receiver (pubwarden's subscription for `sub`).
    let mut pipeline = Vec::new();
    for r in 0..100 {
        for ch in &all_channels {
            pipeline.extend(encode(&["SPUBLISH", ch.as_str(), &format!("r{r}")]));
        }
    }
    let mut p = proxy.connect();
    p.send(&pipeline);
    let replies = p.read_frames(500, secs(20));
    let stop = replies.stop.clone();
    let bad: Vec<(usize, String)> = replies
        .frames
        .iter()
        .enumerate()
        .filter(|(_, f)| f.as_slice() != b":1\r\n")
        .map(|(i, f)| (i, text(f)))
        .take(10)
        .collect();
    assert!(
        replies.frames.len() == 500 && bad.is_empty(),
        "500 pipelined SPUBLISH through pubwarden: {} replies ({stop:?}), not :1 at {bad:?}; \
         log:\n{}",
        replies.frames.len(),
        log_tail(&proxy)
    );
    let got = sub.read_frames(500, secs(20));
    let stop = got.stop.clone();
    let mut per_channel: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for f in &got.frames {
        match push_parts(f) {
            Some((k, parts)) if k == "smessage" && parts.len() == 2 => {
                per_channel
                    .entry(parts[0].clone())
                    .or_default()
                    .push(parts[1].clone());
            }
            _ => panic!("the sharded subscriber got {}", text(f)),
        }
    }
    let want: Vec<String> = (0..100).map(|r| format!("r{r}")).collect();
    for ch in &all_channels {
        assert_eq!(
            per_channel.get(ch),
            Some(&want),
            "smessages on {ch}: each once, in order ({stop:?}, {} frames in all)",
            got.frames.len()
        );
    }

    // Directly on the owner: delivered through pubwarden too.
    assert_eq!(
        node_call(masters[0], &["SPUBLISH", &sc[0], "direct"]),
        Ok(Value::Int(1))
    );
    assert_eq!(
        text(&sub.read_one(secs(5))),
        text(&smessage(&sc[0], "direct"))
    );
    // Classic publish reaches the classic subscriptions of the same client.
    let r = call(&mut p, &["PUBLISH", "news", "classic"]);
    assert!(
        int_reply(&r).is_some_and(|n| n >= 0),
        "PUBLISH: {}",
        text(&r)
    );
    let two = sub
        .read_frames(2, secs(5))
        .expect_all("message and pmessage");
    let mut kinds: Vec<String> = two
        .iter()
        .map(|f| push_parts(f).map(|(k, _)| k).unwrap_or_else(|| text(f)))
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        vec!["message", "pmessage"],
        "{:?}",
        two.iter().map(|f| text(f)).collect::<Vec<_>>()
    );
    // Nobody subscribes to this shard channel.
    expect_reply(&mut p, &["SPUBLISH", "nobody-listens", "x"], b":0\r\n");

    // SUNSUBSCRIBE without channels: every shard channel, counting down to 0.
    single.send(&encode(&["SUNSUBSCRIBE"]));
    let want_frames = single.read_frames(5, secs(5)).expect_all("single Redis");
    sub.send(&encode(&["SUNSUBSCRIBE"]));
    let got = sub.read_frames(5, secs(10));
    let stop = got.stop.clone();
    let parse = |frames: &[Vec<u8>]| -> (Vec<String>, BTreeSet<String>) {
        let mut counts = Vec::new();
        let mut channels = BTreeSet::new();
        for f in frames {
            match push_parts(f) {
                Some((k, parts)) if k == "sunsubscribe" && parts.len() == 2 => {
                    channels.insert(parts[0].clone());
                    counts.push(parts[1].clone());
                }
                _ => counts.push(format!("unexpected {}", text(f))),
            }
        }
        (counts, channels)
    };
    let (want_counts, want_channels) = parse(&want_frames);
    let (got_counts, got_channels) = parse(&got.frames);
    assert_eq!(want_counts, vec!["4", "3", "2", "1", "0"]);
    assert_eq!(
        (got_counts, got_channels),
        (want_counts, want_channels),
        "SUNSUBSCRIBE (all) through pubwarden ({stop:?}): counts down to 0 over every shard \
         channel; log:\n{}",
        log_tail(&proxy)
    );
    // Nothing left: the reply of a single server.
    same(&mut single, &proxy, &["SUNSUBSCRIBE"], 1, &mut sub);
    same(&mut single, &proxy, &["PING"], 1, &mut sub); // classic subscriptions remain: pong ""
    same(&mut single, &proxy, &["UNSUBSCRIBE"], 1, &mut sub);
    same(&mut single, &proxy, &["PUNSUBSCRIBE"], 1, &mut sub);
    same(&mut single, &proxy, &["PING"], 1, &mut sub); // out of subscribed mode: +PONG
    wait_until(secs(5), "SPUBLISH to answer 0 after SUNSUBSCRIBE", || {
        let r = call(&mut p, &["SPUBLISH", &sc[1], "after"]);
        if r == b":0\r\n" {
            Ok(())
        } else {
            Err(text(&r))
        }
    })
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", log_tail(&proxy)));
    let (rest, _) = sub.read_until_idle(millis(300), secs(2));
    assert!(rest.is_empty(), "after SUNSUBSCRIBE: {}", text(&rest));
    // Last, as it hides nothing else: PING, and a command not allowed in RESP2 subscribed
    // mode, on connections whose only subscription is one shard channel (six sessions over
    // the three shards, shifted, so that whatever node pubwarden serves each session's keyless
    // commands from, some hold their channel on another node). A single Redis answers
    // `pong ""` and refuses GET.
    let mut alone_conn = RawConn::connect(alone.addr());
    expect_reply(
        &mut alone_conn,
        &["SSUBSCRIBE", &sc[0]],
        &confirmation("ssubscribe", &sc[0], 1),
    );
    let want_pong = call(&mut alone_conn, &["PING"]);
    assert_eq!(text(&want_pong), text(PONG_SUBSCRIBED), "a single Redis");
    let want_get = call(&mut alone_conn, &["GET", "some-key"]);
    assert!(
        want_get.starts_with(b"-ERR Can't execute 'get'"),
        "a single Redis: {}",
        text(&want_get)
    );
    let mut wrong = Vec::new();
    for j in 0..6 {
        let ch = &sc[(j + j / 3) % 3];
        let mut c = proxy.connect();
        expect_reply(
            &mut c,
            &["SSUBSCRIBE", ch],
            &confirmation("ssubscribe", ch, 1),
        );
        for (args, want) in [(["PING", ""], &want_pong), (["GET", "some-key"], &want_get)] {
            let args: Vec<&str> = args.into_iter().filter(|a| !a.is_empty()).collect();
            let got = call(&mut c, &args);
            if &got != want {
                wrong.push(format!("after SSUBSCRIBE {ch}: {args:?} -> {}", text(&got)));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "in RESP2 subscribed mode (shard channels only) a single Redis answers PING with {} and \
         GET with {}; through pubwarden:\n{}",
        text(&want_pong),
        text(&want_get),
        wrong.join("\n")
    );
}

#[test]
fn keyed_commands_are_routed_by_slot() {
    let cluster = RedisCluster::start();
    let proxy = cluster.start_pubwarden(&[], "");
    let masters = cluster.master_ports();
    let mut c = proxy.connect();

    // 1000 keys over all three shards.
    let keys: Vec<String> = (0..1000).map(|i| format!("key-{i}")).collect();
    let mut per_shard: BTreeMap<u16, usize> = BTreeMap::new();
    let shards = cluster.shards();
    for k in &keys {
        let slot = key_slot(k.as_bytes());
        let s = shards.iter().find(|s| s.holds(slot)).expect("a shard");
        *per_shard.entry(s.master_port()).or_default() += 1;
    }
    assert_eq!(
        per_shard.len(),
        3,
        "the keys cover all shards: {per_shard:?}"
    );
    for (i, k) in keys.iter().enumerate() {
        let reply = call(&mut c, &["SET", k, &format!("v{i}")]);
        assert_eq!(
            text(&reply),
            text(b"+OK\r\n"),
            "SET {k} (slot {}) through pubwarden; log:\n{}",
            key_slot(k.as_bytes()),
            log_tail(&proxy)
        );
    }
    for (i, k) in keys.iter().enumerate() {
        let reply = call(&mut c, &["GET", k]);
        assert_eq!(
            text(&reply),
            text(&bulk(&format!("v{i}"))),
            "GET {k} through pubwarden"
        );
    }
    for (i, k) in keys.iter().enumerate().step_by(25) {
        let owner = cluster
            .owner_on(masters[0], key_slot(k.as_bytes()))
            .expect("owner");
        assert_eq!(
            node_call(owner, &["GET", k]).map(|v| value_text(&v)),
            Ok(format!("v{i}")),
            "{k} on its slot's master (port {owner})"
        );
    }

    // Hash tags: one slot, so multi-key commands work.
    expect_reply(&mut c, &["SET", "{t}a", "va"], b"+OK\r\n");
    expect_reply(&mut c, &["SET", "{t}b", "vb"], b"+OK\r\n");
    expect_reply(
        &mut c,
        &["MGET", "{t}a", "{t}b"],
        b"*2\r\n$2\r\nva\r\n$2\r\nvb\r\n",
    );
    expect_reply(&mut c, &["MSET", "{t}c", "1", "{t}d", "2"], b"+OK\r\n");
    // Different slots: Redis's own CROSSSLOT.
    assert_ne!(key_slot(b"a"), key_slot(b"b"));
    expect_reply(&mut c, &["MGET", "a", "b"], CROSSSLOT);
    expect_reply(&mut c, &["MSET", "a", "1", "b", "2"], CROSSSLOT);
    expect_reply(&mut c, &["DEL", "key-1", "key-2"], CROSSSLOT);
    // Keyless commands are answered too.
    expect_reply(&mut c, &["PING"], b"+PONG\r\n");
    expect_reply(&mut c, &["ECHO", "hi"], &bulk("hi"));

    // 500 mixed commands for random keys in one write, answered in order.
    let mut model: HashMap<String, String> = HashMap::new();
    let mut rng: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut pipeline = Vec::new();
    let mut want: Vec<Vec<u8>> = Vec::new();
    let mut described: Vec<String> = Vec::new();
    for i in 0..500 {
        let r = next();
        let key = format!("pipe-{}", r % 150);
        match (r >> 32) % 10 {
            0..=3 => {
                let v = format!("p{i}");
                pipeline.extend(encode(&["SET", &key, &v]));
                want.push(b"+OK\r\n".to_vec());
                described.push(format!("SET {key} {v}"));
                model.insert(key, v);
            }
            4..=7 => {
                pipeline.extend(encode(&["GET", &key]));
                want.push(match model.get(&key) {
                    Some(v) => bulk(v),
                    None => b"$-1\r\n".to_vec(),
                });
                described.push(format!("GET {key}"));
            }
            8 => {
                pipeline.extend(encode(&["PING"]));
                want.push(b"+PONG\r\n".to_vec());
                described.push("PING".into());
            }
            _ => {
                pipeline.extend(encode(&["MGET", "{t}a", "{t}b"]));
                want.push(b"*2\r\n$2\r\nva\r\n$2\r\nvb\r\n".to_vec());
                described.push("MGET {t}a {t}b".into());
            }
        }
    }
    let mut pc = proxy.connect();
    pc.send(&pipeline);
    let got = pc.read_frames(500, secs(30));
    let stop = got.stop.clone();
    for (i, w) in want.iter().enumerate() {
        let Some(g) = got.frames.get(i) else {
            panic!(
                "pipeline: only {} of 500 replies ({stop:?}); log:\n{}",
                got.frames.len(),
                log_tail(&proxy)
            );
        };
        assert_eq!(
            text(g),
            text(w),
            "pipeline reply {i} to `{}` (the replies must come in order)",
            described[i]
        );
    }
    let metrics = proxy.metrics();
    eprintln!(
        "cluster metrics after the keyed commands:\n{}",
        cluster_lines(&metrics)
    );
}

#[test]
fn a_slot_migration_is_invisible_to_sharded_subscribers() {
    let cluster = RedisCluster::start();
    let proxy = cluster.start_pubwarden(&[], "");
    let passing = cluster.start_pubwarden(&["pass_sunsubscribe: true"], "");
    let masters = cluster.master_ports();
    let (from, to) = (masters[0], masters[1]);
    // Two shard channels on the source in different slots: `chan`'s slot moves, `stays`'s
    // does not.
    let names = cluster.names_in_shard("moving", from, 2);
    let (chan, stays) = (names[0].clone(), names[1].clone());
    let slot = key_slot(chan.as_bytes());
    let k1 = format!("{{{chan}}}:k1");
    let k2 = format!("{{{chan}}}:k2");
    let k3 = format!("{{{chan}}}:k3");
    let mut c = proxy.connect();
    expect_reply(&mut c, &["SET", &k1, "v1"], b"+OK\r\n");
    expect_reply(&mut c, &["SET", &k2, "v2"], b"+OK\r\n");

    let mut raw = proxy.connect();
    subscribe_checked(
        &mut raw,
        &["SSUBSCRIBE", &chan],
        &[confirmation("ssubscribe", &chan, 1)],
        &proxy,
    );
    subscribe_checked(
        &mut raw,
        &["SSUBSCRIBE", &stays],
        &[confirmation("ssubscribe", &stays, 2)],
        &proxy,
    );
    let mut sub = Watched::new("sharded", raw);
    let mut praw = passing.connect();
    subscribe_checked(
        &mut praw,
        &["SSUBSCRIBE", &chan],
        &[confirmation("ssubscribe", &chan, 1)],
        &passing,
    );

    let publisher = Publisher::start(proxy.addr(), &[("SPUBLISH", &chan)]);
    wait_until(secs(10), "publishes before the move", || {
        sub.pump(millis(100), &proxy);
        if sub.messages >= 20 {
            Ok(())
        } else {
            Err(format!(
                "{} messages, {} acked",
                sub.messages,
                publisher.acked()
            ))
        }
    })
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", log_tail(&proxy)));

    // The slot is importing on the target and migrating on the source; k1 has moved, k2 not.
    let m = cluster.begin_migration(slot, to);
    m.move_keys(&[&k1]);
    sub.pump(millis(200), &proxy);
    let mut c = proxy.connect();
    for (args, want) in [
        (vec!["GET", k1.as_str()], bulk("v1")), // source: ASK to the target
        (vec!["GET", k2.as_str()], bulk("v2")), // still on the source
        (vec!["SET", k3.as_str(), "v3"], b"+OK\r\n".to_vec()), // new key: ASK to the target
    ] {
        let reply = call(&mut c, &args);
        assert_eq!(
            text(&reply),
            text(&want),
            "{args:?} through pubwarden while slot {slot} migrates (ASK must be followed \
             inside pubwarden); log:\n{}",
            log_tail(&proxy)
        );
    }
    let ask = proxy.wait_metric(
        "pubwarden_cluster_redirects_total",
        &[("kind", "ask")],
        secs(3),
        |v| v >= 1.0,
    );
    assert!(
        ask.is_some_and(|v| v >= 1.0),
        "pubwarden_cluster_redirects_total{{kind=\"ask\"}} after following ASK: {ask:?}\n{}",
        cluster_lines(&proxy.metrics())
    );
    m.move_remaining_keys();
    let acked_before = publisher.acked();
    m.finish();
    let acked_at_move = publisher.acked();
    assert_eq!(cluster.owner(slot), to);
    sub.pump(millis(200), &proxy);

    // Keys follow the slot (pubwarden follows MOVED or has refreshed its map).
    for (k, v) in [(&k1, "v1"), (&k2, "v2"), (&k3, "v3")] {
        expect_reply(&mut c, &["GET", k], &bulk(v));
        assert_eq!(
            node_call(to, &["GET", k]).map(|x| value_text(&x)),
            Ok(v.to_string())
        );
    }

    // The subscriber hears what is published after the move, and never a sunsubscribe.
    publish_markers_until(
        &proxy,
        "SPUBLISH",
        &chan,
        &mut [&mut sub],
        secs(20),
        &cluster,
    );
    publish_markers_until(
        &proxy,
        "SPUBLISH",
        &stays,
        &mut [&mut sub],
        secs(10),
        &cluster,
    );
    let resubs = proxy.wait_metric(
        "pubwarden_cluster_shard_resubscribes_total",
        &[],
        secs(10),
        |v| v >= 1.0,
    );
    assert!(
        resubs.is_some_and(|v| v >= 1.0),
        "pubwarden_cluster_shard_resubscribes_total after the move: {resubs:?}\n{}",
        cluster_lines(&proxy.metrics())
    );
    // Publishing went on after the move.
    wait_until(secs(10), "publishes acknowledged after the move", || {
        sub.pump(millis(100), &proxy);
        if publisher.acked() > acked_at_move + 20 {
            Ok(())
        } else {
            Err(format!(
                "{} acked, {acked_at_move} at the move",
                publisher.acked()
            ))
        }
    })
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", log_tail(&proxy)));
    let (acked, failed, bad) = publisher.finish();
    sub.pump(millis(500), &proxy);
    let pong = sub.ping(&proxy);
    assert!(
        !bad.iter()
            .any(|b| b.contains("-MOVED") || b.contains("-ASK")),
        "the publisher saw a redirect: {bad:?}"
    );
    assert_eq!(
        failed,
        0,
        "SPUBLISH through pubwarden failed during the move: {bad:?}; log:\n{}",
        log_tail(&proxy)
    );
    assert_eq!(proxy.http_status("/readyz"), Some(200));
    let metrics = proxy.metrics();
    eprintln!(
        "slot {slot} moved from port {from} to {to}: {acked} SPUBLISH acknowledged \
         ({acked_before} before SETSLOT NODE, {acked_at_move} after), the subscriber read {} \
         messages; metrics:\n{}",
        sub.messages,
        cluster_lines(&metrics)
    );

    // With pass_sunsubscribe, the client gets Redis's sunsubscribe instead.
    let deadline = Instant::now() + secs(10);
    loop {
        let got = praw.read_frames(1, deadline.saturating_duration_since(Instant::now()));
        let Some(frame) = got.frames.first() else {
            panic!(
                "pass_sunsubscribe: true: no sunsubscribe for {chan} after the move ({:?}); \
                 log:\n{}",
                got.stop,
                log_tail(&passing)
            );
        };
        match push_parts(frame) {
            Some((k, _)) if k == "smessage" => continue,
            _ => {
                assert_eq!(
                    text(frame),
                    text(&confirmation("sunsubscribe", &chan, 0)),
                    "pass_sunsubscribe: true passes Redis's sunsubscribe; log:\n{}",
                    log_tail(&passing)
                );
                break;
            }
        }
    }

    // Last, as it hides nothing else: shard messages in order across the move.
    sub.assert_in_order("across the slot move");
    assert_pong(&pong, "the sharded subscriber after the slot move");
}

#[test]
fn a_failover_is_invisible_to_subscribers() {
    let cluster = RedisCluster::start();
    let proxy = cluster.start_pubwarden(&[], "");
    let masters = cluster.master_ports();
    let old = masters[0];
    let chan = cluster.name_in_shard("failing-over", old);
    const NEWS: &str = "news";

    let mut raw = proxy.connect();
    subscribe_checked(
        &mut raw,
        &["SSUBSCRIBE", &chan],
        &[confirmation("ssubscribe", &chan, 1)],
        &proxy,
    );
    let mut sharded = Watched::new("sharded", raw);
    // Classic subscribers on three connections (served from whichever node pubwarden picks;
    // which may be the master that fails over).
    let mut classic: Vec<Watched> = (0..3)
        .map(|i| {
            let mut c = proxy.connect();
            subscribe_checked(
                &mut c,
                &["SUBSCRIBE", NEWS],
                &[confirmation("subscribe", NEWS, 1)],
                &proxy,
            );
            Watched::new(&format!("classic-{i}"), c)
        })
        .collect();

    let publisher = Publisher::start(proxy.addr(), &[("SPUBLISH", &chan), ("PUBLISH", NEWS)]);
    wait_until(secs(10), "publishes before the failover", || {
        sharded.pump(millis(50), &proxy);
        for w in classic.iter_mut() {
            w.pump(millis(20), &proxy);
        }
        if sharded.messages >= 20 && classic.iter().all(|w| w.messages >= 20) {
            Ok(())
        } else {
            Err(format!(
                "sharded {}, classic {:?}, acked {}",
                sharded.messages,
                classic.iter().map(|w| w.messages).collect::<Vec<_>>(),
                publisher.acked()
            ))
        }
    })
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", log_tail(&proxy)));

    let nodes_before = proxy.metric("pubwarden_cluster_nodes", &[]);
    let t0 = Instant::now();
    let new = cluster.failover(old);
    let took = t0.elapsed();
    let acked_at_failover = publisher.acked();
    assert_eq!(cluster.owner(key_slot(chan.as_bytes())), new);

    publish_markers_until(
        &proxy,
        "SPUBLISH",
        &chan,
        &mut [&mut sharded],
        secs(20),
        &cluster,
    );
    // From here on pubwarden routes to the new master and is subscribed there: shard messages
    // published from now must arrive in order. Those published during the switch to the old
    // master (a replica now, which takes SPUBLISH and relays it over the cluster bus) may
    // arrive after later ones published on the new master: Redis's doing, tolerated.
    let steady_from = publisher.round() + 1;
    {
        let mut refs: Vec<&mut Watched> = classic.iter_mut().collect();
        publish_markers_until(&proxy, "PUBLISH", NEWS, &mut refs, secs(20), &cluster);
    }
    wait_until(
        secs(10),
        "publishes acknowledged after the failover",
        || {
            sharded.pump(millis(50), &proxy);
            for w in classic.iter_mut() {
                w.pump(millis(20), &proxy);
            }
            if publisher.acked() > acked_at_failover + 20 {
                Ok(())
            } else {
                Err(format!(
                    "{} acked, {acked_at_failover} at the failover",
                    publisher.acked()
                ))
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", log_tail(&proxy)));
    assert!(
        proxy.wait_for_status_until("/readyz", 200, secs(10)),
        "/readyz is {:?} after the failover; log:\n{}",
        proxy.http_status("/readyz"),
        log_tail(&proxy)
    );
    let (acked, failed, bad) = publisher.finish();
    // Not part of the contract (only > 0 is): does the node gauge come back to what it was
    // once the cluster has settled (two refresh intervals)?
    let nodes_after = proxy.wait_metric("pubwarden_cluster_nodes", &[], secs(12), |v| {
        Some(v) == nodes_before
    });
    eprintln!(
        "pubwarden_cluster_nodes: {nodes_before:?} before the failover, {nodes_after:?} \
         {:?} after it",
        t0.elapsed()
    );
    assert!(
        nodes_after.is_some_and(|v| v > 0.0),
        "pubwarden_cluster_nodes: {nodes_after:?}"
    );
    sharded.pump(millis(300), &proxy);
    let sharded_pong = sharded.ping(&proxy);
    let mut classic_pongs = Vec::new();
    for w in classic.iter_mut() {
        w.pump(millis(100), &proxy);
        classic_pongs.push(text(&w.ping(&proxy)));
    }
    assert!(
        !bad.iter()
            .any(|b| b.contains("-MOVED") || b.contains("-ASK")),
        "the publisher saw a redirect: {bad:?}"
    );
    let metrics = proxy.metrics();
    eprintln!(
        "failover of port {old} to port {new} took {took:?}; {acked} publishes acknowledged, \
         {failed} failed {bad:?}; sharded subscriber read {}, classic {:?}; metrics:\n{}",
        sharded.messages,
        classic.iter().map(|w| w.messages).collect::<Vec<_>>(),
        cluster_lines(&metrics)
    );
    assert_eq!(
        classic_pongs,
        vec![text(PONG_SUBSCRIBED); 3],
        "PING on the classic subscribers after the failover"
    );
    let tolerated: Vec<&(String, u64, u64)> = sharded
        .inversions
        .iter()
        .filter(|(_, n, _)| *n < steady_from)
        .collect();
    if !tolerated.is_empty() {
        eprintln!(
            "{} shard message(s) published during the failover arrived after later ones \
             (tolerated): {tolerated:?}",
            tolerated.len()
        );
    }
    sharded.assert_in_order_from(steady_from, "after the failover");
    assert_pong(&sharded_pong, "the sharded subscriber after the failover");
}

/// The longest silence between two consecutive load arrivals of `timeline` that ended after
/// `since`: (its length, (read time, n) of the load before it, of the load after it).
type Gap = (Duration, (Instant, u64), (Instant, u64));

fn longest_gap_after(timeline: &[(Instant, u64)], since: Instant) -> Option<Gap> {
    timeline
        .windows(2)
        .filter(|w| w[1].0 > since)
        .map(|w| (w[1].0 - w[0].0, w[0], w[1]))
        .max_by_key(|g| g.0)
}

/// `t` as `+<duration>` after `origin` or `-<duration>` before it.
fn relative(t: Instant, origin: Instant) -> String {
    match t.checked_duration_since(origin) {
        Some(d) => format!("+{d:?}"),
        None => format!("-{:?}", origin - t),
    }
}

/// Whether the node on `port` says (ROLE) that it is a master.
fn is_master(port: u16) -> bool {
    node_call(port, &["ROLE"]).is_ok_and(|v| {
        v.items()
            .and_then(|i| i.first())
            .and_then(Value::bytes)
            .is_some_and(|r| r == b"master")
    })
}

/// docs/cluster.md: "If a node connection holding shard channels dies (master killed), the
/// channels are subscribed again as soon as the slot map names a new master (it is re-read
/// every 250 ms meanwhile)", and a client whose requests were owed by the lost node is closed.
/// Here under SPUBLISH load, with the replica taking over after `cluster-node-timeout`; the
/// subscriber's gap is measured and printed.
#[test]
fn a_killed_master_is_followed_by_sharded_subscribers() {
    let mut cluster = RedisCluster::start();
    let proxy = cluster.start_pubwarden(&[], "");
    let old = cluster.master_ports()[0];
    let replica = cluster.replica_of(old);
    let chan = cluster.name_in_shard("killed-master", old);
    let slot = key_slot(chan.as_bytes());
    assert_eq!(cluster.owner(slot), old);

    let mut raw = proxy.connect();
    subscribe_checked(
        &mut raw,
        &["SSUBSCRIBE", &chan],
        &[confirmation("ssubscribe", &chan, 1)],
        &proxy,
    );
    let mut sharded = Watched::new("sharded", raw);
    let publisher = Publisher::start(proxy.addr(), &[("SPUBLISH", &chan)]);
    wait_until(secs(10), "publishes before the kill", || {
        sharded.pump(millis(100), &proxy);
        if sharded.messages >= 50 {
            Ok(())
        } else {
            Err(format!(
                "{} messages, {} acked",
                sharded.messages,
                publisher.acked()
            ))
        }
    })
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", log_tail(&proxy)));
    assert_eq!(
        publisher.failed(),
        0,
        "SPUBLISH failed before the kill: {:?}; log:\n{}",
        publisher.failure_kinds(),
        log_tail(&proxy)
    );
    let resubs_before = proxy
        .metric("pubwarden_cluster_shard_resubscribes_total", &[])
        .unwrap_or(0.0);
    let connects_before = publisher.connects();
    let acked_before = publisher.acked();

    // SIGKILL the master of the channel's slot, under load; read the subscriber all along (in
    // 100 ms slices; the checks between two slices, the longest of which is printed, bound the
    // resolution of the measured gap) until the replica has taken over and the surviving
    // nodes have settled without the killed one.
    let killed_at = Instant::now();
    cluster.kill_node(old);
    let mut promoted: Option<Duration> = None;
    let mut resubscribed: Option<Duration> = None;
    let mut resumed: Option<Duration> = None;
    let mut paused = Duration::ZERO;
    loop {
        sharded.pump(millis(100), &proxy);
        let checks = Instant::now();
        if promoted.is_none() && is_master(replica) {
            promoted = Some(killed_at.elapsed());
        }
        if resubscribed.is_none()
            && proxy
                .metric("pubwarden_cluster_shard_resubscribes_total", &[])
                .is_some_and(|v| v > resubs_before)
        {
            resubscribed = Some(killed_at.elapsed());
        }
        if resumed.is_none() && publisher.acked() > acked_before {
            resumed = Some(killed_at.elapsed());
        }
        let last = match cluster.taken_over(old, replica, slot) {
            Ok(()) => break,
            Err(e) => e,
        };
        paused = paused.max(checks.elapsed());
        assert!(
            killed_at.elapsed() < secs(30),
            "port {replica} did not take over from the killed master on port {old} within \
             30 s (promoted: {promoted:?}); last state: {last}\nmetrics:\n{}\npubwarden \
             log:\n{}\n{}",
            cluster_lines(&proxy.metrics()),
            log_tail(&proxy),
            cluster.logs()
        );
    }
    let settled = killed_at.elapsed();
    let acked_at_takeover = publisher.acked();

    // pubwarden follows: it reads the slot map again when a node connection is lost and every
    // 250 ms while shard channels wait for an owner, so its map names the new master shortly
    // after the cluster does (not necessarily before the harness has seen the cluster settle).
    // The publisher, refused or closed meanwhile, gets an acknowledgement again.
    let settled_at = Instant::now();
    loop {
        sharded.pump(millis(50), &proxy);
        let checks = Instant::now();
        if resubscribed.is_none()
            && proxy
                .metric("pubwarden_cluster_shard_resubscribes_total", &[])
                .is_some_and(|v| v > resubs_before)
        {
            resubscribed = Some(killed_at.elapsed());
        }
        if resumed.is_none() && publisher.acked() > acked_before {
            resumed = Some(killed_at.elapsed());
        }
        if publisher.acked() > acked_at_takeover {
            break;
        }
        assert!(
            settled_at.elapsed() < secs(10),
            "no SPUBLISH through pubwarden acknowledged within 10 s of the takeover: {} acked \
             ({acked_before} before the kill, {acked_at_takeover} at the takeover); failures \
             {:?}\nmetrics:\n{}\npubwarden log:\n{}\n{}",
            publisher.acked(),
            publisher.failure_kinds(),
            cluster_lines(&proxy.metrics()),
            log_tail(&proxy),
            cluster.logs()
        );
        paused = paused.max(checks.elapsed());
    }

    // A marker published after the takeover reaches the subscriber, subscribed again on the
    // new master (and never told sunsubscribe: Watched panics at any other frame).
    publish_markers_until(
        &proxy,
        "SPUBLISH",
        &chan,
        &mut [&mut sharded],
        secs(20),
        &cluster,
    );
    let resubs = proxy.wait_metric(
        "pubwarden_cluster_shard_resubscribes_total",
        &[],
        secs(10),
        |v| v >= 1.0,
    );
    assert!(
        resubs.is_some_and(|v| v >= 1.0),
        "pubwarden_cluster_shard_resubscribes_total after the kill: {resubs:?}\n{}",
        cluster_lines(&proxy.metrics())
    );
    assert_eq!(
        node_call(replica, &["PUBSUB", "SHARDNUMSUB", &chan]),
        Ok(Value::Array(vec![
            Value::Bulk(chan.as_bytes().to_vec()),
            Value::Int(1)
        ])),
        "PUBSUB SHARDNUMSUB {chan} on the new master (port {replica}): pubwarden's \
         subscription; log:\n{}",
        log_tail(&proxy)
    );
    // The publisher (closed or refused during the outage) reconnected and goes on.
    let acked_at_markers = publisher.acked();
    wait_until(secs(10), "publishes acknowledged after the markers", || {
        sharded.pump(millis(100), &proxy);
        if publisher.acked() > acked_at_markers + 20 {
            Ok(())
        } else {
            Err(format!(
                "{} acked, {acked_at_markers} after the markers; failures {:?}",
                publisher.acked(),
                publisher.failure_kinds()
            ))
        }
    })
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", log_tail(&proxy)));
    assert!(
        proxy.wait_for_status_until("/readyz", 200, secs(10)),
        "/readyz is {:?} after the takeover; metrics:\n{}\nlog:\n{}",
        proxy.http_status("/readyz"),
        cluster_lines(&proxy.metrics()),
        log_tail(&proxy)
    );
    let connects = publisher.connects();
    let kinds = publisher.failure_kinds();
    let acked_rounds = publisher.acked_rounds();
    let (acked, failed, bad) = publisher.finish();
    sharded.pump(millis(500), &proxy);
    let pong = sharded.ping(&proxy);

    // The gap: the longest the subscriber read nothing, ending after the kill.
    let (gap, before, after) = longest_gap_after(&sharded.timeline, killed_at)
        .unwrap_or_else(|| panic!("no message arrived after the kill"));
    let seen = sharded
        .seen_loads
        .get(&("smessage".to_string(), chan.clone()))
        .cloned()
        .unwrap_or_default();
    let lost: Vec<u64> = acked_rounds
        .iter()
        .copied()
        .filter(|n| !seen.contains(n))
        .collect();
    let metrics = proxy.metrics();
    eprintln!(
        "killed master port {old} (slot {slot}); replica port {replica} a master after \
         {promoted:?}; the surviving nodes settled after {settled:?}; pubwarden subscribed \
         again after {resubscribed:?} (as its metric was seen); publishing through \
         pubwarden acknowledged again after {resumed:?} (as seen)\n\
         gap: the subscriber read no message for {gap:?} (load-{} read at the kill {}, \
         load-{} at the kill {}; reads paused at most {paused:?} between 100 ms slices); {} \
         publish round(s) in between\n\
         publisher: {acked} acknowledged ({acked_before} before the kill, {acked_at_takeover} \
         at the takeover), {failed} failed {kinds:?}, {connects} connection(s) ({} since \
         the kill); {} acknowledged publish(es) never delivered: {:?}\n\
         subscriber read {} messages; metrics:\n{}",
        before.1,
        relative(before.0, killed_at),
        after.1,
        relative(after.0, killed_at),
        after.1.saturating_sub(before.1 + 1),
        connects - connects_before,
        lost.len(),
        &lost[..lost.len().min(20)],
        sharded.messages,
        cluster_lines(&metrics)
    );

    assert!(
        !bad.iter()
            .any(|b| b.contains("-MOVED") || b.contains("-ASK")),
        "the publisher saw a redirect: {bad:?}"
    );
    // During the outage the publisher may be closed (a request of its was on the lost node)
    // or told the slot is not served; nothing else (no hang, no other error).
    let unexpected: Vec<(&String, &u64)> = kinds
        .iter()
        .filter(|(k, _)| {
            !(k.starts_with("-CLUSTERDOWN")
                || k.as_str() == "no reply (Eof)"
                || k.as_str() == "send")
        })
        .collect();
    assert!(
        unexpected.is_empty(),
        "the publisher failed otherwise than by a close or -CLUSTERDOWN: {unexpected:?} (all: \
         {kinds:?}, first: {bad:?}); log:\n{}",
        log_tail(&proxy)
    );
    assert!(
        connects > connects_before,
        "the publisher never reconnected ({connects} connections; failures {kinds:?})"
    );
    // Last, as it hides nothing else: shard messages in order across the kill.
    sharded.assert_in_order("across the killed master");
    assert_pong(&pong, "the sharded subscriber after the takeover");
}

trait WaitStatus {
    fn wait_for_status_until(&self, path: &str, status: u16, timeout: Duration) -> bool;
}

impl WaitStatus for ClusterProxy {
    fn wait_for_status_until(&self, path: &str, status: u16, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.http_status(path) == Some(status) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(millis(50));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// check-config.

fn check_config(body: &str) -> CliRun {
    let path = scratch_dir("cluster-config").join("settings.yaml");
    write_file(&path, body);
    run_cli(
        &["check-config", path.to_str().expect("utf-8 path")],
        b"",
        &[],
        secs(20),
    )
}

/// True if `line` names the key `path` itself (not a longer path that starts with it).
fn names_key(line: &str, path: &str) -> bool {
    line.match_indices(path).any(|(i, _)| {
        let before = line[..i].chars().next_back();
        let after = line[i + path.len()..].chars().next();
        let key_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '.';
        !before.is_some_and(key_char) && !after.is_some_and(key_char)
    })
}

fn assert_refused(what: &str, body: &str, paths: &[&str]) {
    let run = check_config(body);
    let out = run.output();
    assert_eq!(
        run.code,
        Some(64),
        "{what}: check-config must exit 64; settings:\n{body}\noutput:\n{out}"
    );
    for path in paths {
        assert!(
            out.lines().any(|l| names_key(l, path)),
            "{what}: the output must name `{path}`; settings:\n{body}\noutput:\n{out}"
        );
    }
}

#[test]
fn check_config_refuses_incomplete_or_contradictory_cluster_settings() {
    // The control: complete settings are valid and printed back.
    let good = "upstream:\n  mode: cluster\n  cluster:\n    \
                seeds: [127.0.0.1:7001, 127.0.0.1:7002]\n    refresh_interval: 5s\n    \
                pass_sunsubscribe: false\n";
    let run = check_config(good);
    let out = run.output();
    assert_eq!(run.code, Some(0), "valid cluster settings refused:\n{out}");
    for want in ["mode: cluster", "127.0.0.1:7001", "127.0.0.1:7002"] {
        assert!(
            out.contains(want),
            "check-config output lacks `{want}`:\n{out}"
        );
    }

    assert_refused(
        "mode cluster without seeds",
        "upstream:\n  mode: cluster\n  cluster:\n    refresh_interval: 5s\n",
        &["upstream.cluster.seeds"],
    );
    assert_refused(
        "mode cluster without a cluster section",
        "upstream:\n  mode: cluster\n",
        &["upstream.cluster.seeds"],
    );
    assert_refused(
        "mode cluster with an empty seed list",
        "upstream:\n  mode: cluster\n  cluster:\n    seeds: []\n",
        &["upstream.cluster.seeds"],
    );
    assert_refused(
        "mode cluster with an explicit upstream.address",
        "upstream:\n  mode: cluster\n  address: 127.0.0.1:7000\n  cluster:\n    \
         seeds: [127.0.0.1:7001]\n",
        &["upstream.address"],
    );
    // Both mistakes at once.
    assert_refused(
        "address given, seeds missing",
        "upstream:\n  mode: cluster\n  address: 127.0.0.1:7000\n  cluster:\n    \
         refresh_interval: 5s\n",
        &["upstream.address", "upstream.cluster.seeds"],
    );
}

// ---------------------------------------------------------------------------------------------
// Tracing.

/// Payloads for the traced test: text, empty, RESP-looking and binary bytes, and one that
/// looks like an envelope to a careless parser.
const TRACED_PAYLOADS: &[&[u8]] = &[
    b"plain text",
    b"",
    b"\r\n$5\r\nfake\r\n*3\r\n",
    b"\0\0\0\xff\xfe\xfd invalid utf-8 \xc3\x28",
    b"\xffPWE1 but much too short",
];

#[test]
fn publishes_and_deliveries_are_traced_in_cluster_mode() {
    use support::otlp::{CONSUMER, PRODUCER, Receiver, RxSpan, Transport, hex};

    const SHARD_CH: &str = "traced.shard";
    const CLASSIC_CH: &str = "traced.classic";
    let cluster = RedisCluster::start();
    let rx = Receiver::start(Transport::Grpc);
    let extra = format!(
        "telemetry:\n  tracing:\n    enabled: true\n    endpoint: {}\n    protocol: grpc\n    \
         sampling_ratio: 1.0\n    service_name: edge-cluster\n    envelope: [\"traced.*\"]\n",
        rx.endpoint()
    );
    let proxy = cluster.start_pubwarden(&[], &extra);
    let shard_owner = cluster.owner(key_slot(SHARD_CH.as_bytes()));
    let ports: Vec<String> = cluster.ports().iter().map(u16::to_string).collect();

    let mut sub = proxy.connect();
    subscribe_checked(
        &mut sub,
        &["SSUBSCRIBE", SHARD_CH],
        &[confirmation("ssubscribe", SHARD_CH, 1)],
        &proxy,
    );
    subscribe_checked(
        &mut sub,
        &["SUBSCRIBE", CLASSIC_CH],
        // Redis counts shard subscriptions apart from classic ones.
        &[confirmation("subscribe", CLASSIC_CH, 1)],
        &proxy,
    );

    // The receiver counts each publish's reply announced (classic PUBLISH counts the serving
    // node's subscribers only, so it may be 0 or 1).
    let mut publisher = proxy.connect();
    let mut receivers: Vec<(&str, i64)> = Vec::new();
    for p in TRACED_PAYLOADS {
        for (cmd, ch) in [("SPUBLISH", SHARD_CH), ("PUBLISH", CLASSIC_CH)] {
            publisher.send(&encode(&[cmd.as_bytes(), ch.as_bytes(), p]));
            let reply = publisher.read_one(secs(5));
            let n = int_reply(&reply).unwrap_or_else(|| {
                panic!(
                    "{cmd} {ch} through pubwarden: {}; log:\n{}",
                    text(&reply),
                    log_tail(&proxy)
                )
            });
            if cmd == "SPUBLISH" {
                assert_eq!(n, 1, "SPUBLISH {ch}; log:\n{}", log_tail(&proxy));
            }
            receivers.push((ch, n));
        }
    }

    // Byte for byte, per channel in publish order (the two channels arrive from different
    // nodes, so their interleaving is free).
    let n = TRACED_PAYLOADS.len();
    let got = sub.read_frames(2 * n, secs(10));
    let stop = got.stop.clone();
    let mut per_channel: HashMap<&str, Vec<String>> = HashMap::new();
    for f in &got.frames {
        let ch = match push_parts(f) {
            Some((kind, _)) if kind == "smessage" => SHARD_CH,
            _ => CLASSIC_CH,
        };
        per_channel.entry(ch).or_default().push(escape(f));
    }
    for (kind, ch) in [("smessage", SHARD_CH), ("message", CLASSIC_CH)] {
        let want: Vec<String> = TRACED_PAYLOADS
            .iter()
            .map(|p| escape(&encode(&[kind.as_bytes(), ch.as_bytes(), p])))
            .collect();
        assert_eq!(
            per_channel.get(ch).cloned().unwrap_or_default(),
            want,
            "deliveries on {ch} ({stop:?}, {} frames in all); pubwarden log:\n{}",
            got.frames.len(),
            log_tail(&proxy)
        );
    }
    let (rest, _) = sub.read_until_idle(millis(300), secs(2));
    assert!(rest.is_empty(), "more frames: {}", text(&rest));

    let by = |spans: &[RxSpan], name: &str, ch: &str| -> Vec<RxSpan> {
        spans
            .iter()
            .filter(|s| s.name == name && s.attr("messaging.destination.name") == Some(ch))
            .cloned()
            .collect()
    };
    let complete = |s: &[RxSpan]| {
        by(s, "spublish", SHARD_CH).len() == n
            && by(s, "publish", CLASSIC_CH).len() == n
            && by(s, "smessage", SHARD_CH).len() == n
            && by(s, "message", CLASSIC_CH).len() == n
    };
    if !rx.wait_until(secs(15), complete) {
        let spans = rx.spans();
        let names: Vec<String> = spans
            .iter()
            .map(|s| {
                format!(
                    "{} {:?}",
                    s.name,
                    s.attr("messaging.destination.name").unwrap_or("-")
                )
            })
            .collect();
        panic!(
            "want {n} each of spublish/smessage on {SHARD_CH} and publish/message on \
             {CLASSIC_CH}; received {} spans: {names:?}\n{spans:#?}\npubwarden log:\n{}",
            spans.len(),
            log_tail(&proxy)
        );
    }
    let spans = rx.spans();
    let context = |what: &str| format!("{what}; pubwarden log:\n{}", log_tail(&proxy));

    for (publish_name, delivery_name, ch) in [
        ("spublish", "smessage", SHARD_CH),
        ("publish", "message", CLASSIC_CH),
    ] {
        let publishes = by(&spans, publish_name, ch);
        let deliveries = by(&spans, delivery_name, ch);
        let mut sizes: Vec<String> = Vec::new();
        for p in &publishes {
            assert_eq!(p.kind, PRODUCER, "{}", context(&format!("{p:#?}")));
            assert_eq!(p.service, "edge-cluster");
            for (k, v) in [
                ("messaging.system", "redis"),
                ("messaging.destination.name", ch),
                ("messaging.operation.name", publish_name),
                ("messaging.operation.type", "send"),
                ("server.address", "127.0.0.1"),
                ("pubwarden.envelope", "true"),
            ] {
                assert_eq!(p.attr(k), Some(v), "{}", context(&format!("{k} of {p:#?}")));
            }
            // The node that served it: the slot's master for a shard channel, one of the
            // cluster's nodes for a classic one.
            let port = p.attr("server.port").unwrap_or("<none>");
            if publish_name == "spublish" {
                assert_eq!(
                    port,
                    shard_owner.to_string(),
                    "{}",
                    context(&format!(
                        "server.port of {p:#?} (cluster nodes {ports:?}, {SHARD_CH}'s master \
                         {shard_owner})"
                    ))
                );
            } else {
                assert!(
                    ports.iter().any(|x| x == port),
                    "{}",
                    context(&format!(
                        "server.port of {p:#?} is not a cluster node ({ports:?})"
                    ))
                );
            }
            assert!(p.attr("error.type").is_none(), "{p:#?}");
            assert!(p.end_ns >= p.start_ns && p.start_ns > 0, "{p:#?}");
            sizes.push(p.attr("messaging.message.body.size").unwrap_or("").into());
        }
        // Body sizes are the client's payloads, not the envelopes'.
        let mut want_sizes: Vec<String> = TRACED_PAYLOADS
            .iter()
            .map(|p| p.len().to_string())
            .collect();
        want_sizes.sort();
        sizes.sort();
        assert_eq!(sizes, want_sizes, "body sizes of the {publish_name} spans");
        // Receiver counts as the client got them.
        let mut got_receivers: Vec<String> = publishes
            .iter()
            .map(|p| {
                p.attr("pubwarden.receivers")
                    .unwrap_or("<none>")
                    .to_string()
            })
            .collect();
        let mut want_receivers: Vec<String> = receivers
            .iter()
            .filter(|(c, _)| *c == ch)
            .map(|(_, n)| n.to_string())
            .collect();
        got_receivers.sort();
        want_receivers.sort();
        assert_eq!(
            got_receivers,
            want_receivers,
            "{}",
            context(&format!("pubwarden.receivers of the {publish_name} spans"))
        );

        for d in &deliveries {
            assert_eq!(d.kind, CONSUMER, "{d:#?}");
            assert_eq!(d.service, "edge-cluster");
            assert_eq!(d.attr("messaging.system"), Some("redis"));
            assert_eq!(d.attr("messaging.operation.name"), Some(delivery_name));
            assert_eq!(d.attr("messaging.operation.type"), Some("receive"));
            assert!(
                d.attr("messaging.destination.subscription.name").is_none(),
                "{d:#?}"
            );
            assert!(d.end_ns >= d.start_ns, "{d:#?}");
            // Child of, and linked to, the publish span it delivers.
            let p = publishes
                .iter()
                .find(|p| p.span_id == d.parent_span_id)
                .unwrap_or_else(|| {
                    panic!(
                        "{}",
                        context(&format!(
                            "no {publish_name} span is the parent of {d:#?}; publishes: \
                             {publishes:#?}"
                        ))
                    )
                });
            assert_eq!(hex(&d.trace_id), hex(&p.trace_id));
            assert_eq!(d.links, vec![(p.trace_id.clone(), p.span_id.clone())]);
            assert_eq!(
                d.attr("messaging.message.body.size"),
                p.attr("messaging.message.body.size"),
                "{d:#?}"
            );
        }
        // One delivery per publish.
        let parents: BTreeSet<String> = deliveries.iter().map(|d| hex(&d.parent_span_id)).collect();
        assert_eq!(parents.len(), n, "deliveries of {ch}: {deliveries:#?}");
    }
}
