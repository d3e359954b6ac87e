//! Global rate limits (`scope: global`): one budget shared by several pubwarden processes
//! through Redis, in real time, with real processes on loopback.
//!
//! - The fleet-wide total stays within the documented accuracy bound (`rate x T + burst`, plus
//!   at most 1.5 leases per instance leased and unspent at the interval's start) and the limit is
//!   actually usable (at least 85% of `rate x T` accepted when publishing flat out).
//! - A local rule in the same policy stays per process.
//! - A store outage falls back to the local share (`fail_open`) or refuses the rule's publishes
//!   (`fail_closed`), visibly in the metrics; once the store is back the shared budget applies
//!   again. A store that hangs counts as down once `store_timeout` passed: a publish waits for
//!   it no longer than that.
//! - `check-config` refuses misplaced global settings with their key paths and explains valid
//!   global rules.
//!
//! Every PUBLISH pubwarden accepted must reach a subscriber straight on the upstream Redis, and
//! no other. Bounds are loose where they depend on timing (only ever in the direction of
//! accepting fewer messages); the upper bounds follow from the algorithm, not from the clock.
//! The load tests run one at a time (2-core machines): see [`serial`].

mod support;

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use support::policy::*;
use support::tls::metric_value;
use support::*;

/// The global rule: `RATE` msg/s, burst `BURST`, one key for everyone, on `g.*`.
const GLOBAL_RULE: &str = "fleet";
const RATE: u64 = 300;
const BURST: u64 = 30;
/// The local rule in the same policy, on `l.*`, one key per process.
const LOCAL_RULE: &str = "per-process";
const LOCAL_RATE: u64 = 100;
const LOCAL_BURST: u64 = 10;
/// `global_rate_limits.lease` (the default).
const LEASE: Duration = Duration::from_millis(5);
/// Rounding (the GCRA interval is whole microseconds), the decision of a reply read just after
/// a window's edge: a few messages.
const SLACK: f64 = 3.0;
/// PUBLISHes each publisher keeps in flight.
const IN_FLIGHT: usize = 16;

const STORE_UP: &str = "pubwarden_global_rate_limit_store_up";
const LEASES: &str = "pubwarden_global_rate_limit_leases_total";
const FALLBACKS: &str = "pubwarden_global_rate_limit_fallbacks_total";
const REJECTIONS: &str = "pubwarden_rate_limit_rejections_total";

/// The load tests measure rates on a small machine: they run one at a time.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Tokens per lease: `ceil(rate x lease)`, as documented.
fn lease_tokens(rate: u64) -> u64 {
    (u128::from(rate) * LEASE.as_micros()).div_ceil(1_000_000) as u64
}

/// How long the flat-out runs publish.
const RUN_FOR: Duration = Duration::from_secs(3);

/// The span in which every token `logs` spent was granted: from the first publisher's start to
/// the last accepted reply (replies drained after that add nothing).
fn grant_span(logs: &[&PubLog]) -> Duration {
    let first = logs.iter().map(|l| l.started).min().expect("publishers");
    let last = logs
        .iter()
        .map(|l| l.last_accepted())
        .max()
        .expect("publishers");
    last.saturating_duration_since(first)
}

/// What the accuracy bound allows `instances` pubwardens to accept together in `t`.
fn global_ceiling(instances: usize, t: Duration) -> f64 {
    RATE as f64 * t.as_secs_f64()
        + BURST as f64
        + instances as f64 * 1.5 * lease_tokens(RATE) as f64
        + SLACK
}

/// What a single local budget of `rate`/`burst` allows in `t`.
fn local_ceiling(rate: u64, burst: u64, t: Duration) -> f64 {
    rate as f64 * t.as_secs_f64() + burst as f64 + SLACK
}

/// A policy open to everyone with the global rule (`instances`, `on_store_failure`) on `g.*`
/// and the local rule on `l.*`.
fn policy(instances: usize, on_store_failure: &str) -> String {
    format!(
        r#"users:
  default:
    nopass: true
    channels:
      publish: ["*"]
      subscribe: ["*"]
rate_limits:
  - name: {GLOBAL_RULE}
    channels: ["g.*"]
    messages_per_second: {RATE}
    burst: {BURST}
    key: global
    scope: global
    instances: {instances}
    on_store_failure: {on_store_failure}
  - name: {LOCAL_RULE}
    channels: ["l.*"]
    messages_per_second: {LOCAL_RATE}
    burst: {LOCAL_BURST}
    key: global
"#
    )
}

/// Settings naming a separate store for the shared budgets.
fn store_settings(store: &RedisServer) -> String {
    format!(
        "global_rate_limits:\n  lease: 5ms\n  store_timeout: 250ms\n  store:\n    address: {}\n",
        store.addr()
    )
}

/// `n` pubwardens in front of `upstream`, each with its own copy of the same files.
fn start_fleet(upstream: &RedisServer, n: usize, policy: &str, settings: &str) -> Vec<Pubwarden> {
    (0..n)
        .map(|_| start_pubwarden_with_policy(upstream, policy, settings, &[]))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Replies.

/// How one PUBLISH ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reply {
    /// `:N`: forwarded, N receivers.
    Accepted(i64),
    /// `-RATELIMIT rate limit '<rule>' exceeded; retry in N ms`.
    Exceeded(u64),
    /// `-RATELIMIT rate limit '<rule>' cannot be checked: its shared store is unavailable`.
    Unavailable,
    /// Anything else (escaped).
    Other(String),
}

fn unavailable_error(rule: &str) -> String {
    format!("-RATELIMIT rate limit '{rule}' cannot be checked: its shared store is unavailable\r\n")
}

/// Classifies a PUBLISH reply; a `-RATELIMIT` naming another rule is `Other`.
fn classify(frame: &[u8], rule: &str) -> Reply {
    let text = String::from_utf8_lossy(frame);
    if let Some(n) = text
        .strip_prefix(':')
        .and_then(|t| t.strip_suffix("\r\n"))
        .and_then(|t| t.parse().ok())
    {
        return Reply::Accepted(n);
    }
    let exceeded = format!("-RATELIMIT rate limit '{rule}' exceeded; retry in ");
    if let Some(ms) = text
        .strip_prefix(&exceeded)
        .and_then(|t| t.strip_suffix(" ms\r\n"))
        .and_then(|t| t.parse::<u64>().ok())
        .filter(|&ms| ms >= 1)
    {
        return Reply::Exceeded(ms);
    }
    if text == unavailable_error(rule) {
        return Reply::Unavailable;
    }
    Reply::Other(escape_short(frame, 200))
}

// ---------------------------------------------------------------------------------------------
// Publishers: one thread each, PUBLISHing flat out with IN_FLIGHT in flight.

struct Spec {
    who: String,
    addr: SocketAddr,
    channel: String,
    /// The rule whose `-RATELIMIT` errors are expected.
    rule: &'static str,
    /// Stops by itself after this long (else when told to).
    run_for: Option<Duration>,
    /// Receivers an accepted PUBLISH must report.
    receivers: i64,
}

fn spec(who: &str, addr: SocketAddr, channel: &str, rule: &'static str) -> Spec {
    Spec {
        who: who.to_string(),
        addr,
        channel: channel.to_string(),
        rule,
        run_for: None,
        receivers: 1,
    }
}

/// What one publisher saw.
#[derive(Debug)]
struct PubLog {
    who: String,
    channel: String,
    started: Instant,
    finished: Instant,
    /// Accepted PUBLISHes: when the reply was read, and the payload.
    accepted: Vec<(Instant, String)>,
    exceeded: u64,
    max_retry_ms: u64,
    unavailable: u64,
    /// Replies that are none of the expected ones, and transport trouble (first 20).
    unexpected: Vec<String>,
    unexpected_total: u64,
}

impl PubLog {
    fn note(&mut self, what: String) {
        self.unexpected_total += 1;
        if self.unexpected.len() < 20 {
            self.unexpected.push(what);
        }
    }

    fn accepted_in(&self, from: Instant, to: Instant) -> usize {
        self.accepted
            .iter()
            .filter(|(t, _)| *t >= from && *t <= to)
            .count()
    }

    fn elapsed(&self) -> Duration {
        self.finished - self.started
    }

    fn last_accepted(&self) -> Instant {
        self.accepted.last().map_or(self.started, |(t, _)| *t)
    }

    fn assert_clean(&self) {
        assert!(
            self.unexpected_total == 0,
            "{} (PUBLISH {}): {} unexpected replies or transport errors, first ones: {:#?}",
            self.who,
            self.channel,
            self.unexpected_total,
            self.unexpected
        );
    }

    fn summary(&self) -> String {
        format!(
            "{} on {}: {} accepted, {} exceeded (longest retry {} ms), {} unavailable in {:.3} s",
            self.who,
            self.channel,
            self.accepted.len(),
            self.exceeded,
            self.max_retry_ms,
            self.unavailable,
            self.elapsed().as_secs_f64()
        )
    }
}

struct Publisher {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<PubLog>>,
    who: String,
}

impl Publisher {
    /// Tells it to stop, waits for its outstanding replies, returns its log.
    fn finish(self) -> PubLog {
        self.stop.store(true, Ordering::SeqCst);
        self.join()
    }

    /// Waits until it stopped by itself (`run_for`), returns its log.
    fn join(mut self) -> PubLog {
        let handle = self.handle.take().expect("publisher already finished");
        match handle.join() {
            Ok(log) => log,
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panic!("publisher {} panicked: {msg}", self.who)
            }
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        // A failing test must not leave a thread publishing.
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Starts one thread per spec; returns once all are connected and about to publish.
fn start_publishers(specs: Vec<Spec>) -> Vec<Publisher> {
    let barrier = Arc::new(Barrier::new(specs.len() + 1));
    let publishers = specs
        .into_iter()
        .map(|s| {
            let stop = Arc::new(AtomicBool::new(false));
            let who = s.who.clone();
            let (b, st) = (barrier.clone(), stop.clone());
            let handle = std::thread::Builder::new()
                .name(format!("publisher-{who}"))
                .spawn(move || publish_loop(s, st, b))
                .expect("spawn a publisher thread");
            Publisher {
                stop,
                handle: Some(handle),
                who,
            }
        })
        .collect();
    barrier.wait();
    publishers
}

fn publish_loop(spec: Spec, stop: Arc<AtomicBool>, barrier: Arc<Barrier>) -> PubLog {
    let connected = TcpStream::connect_timeout(&spec.addr, secs(5));
    barrier.wait();
    let started = Instant::now();
    let mut log = PubLog {
        who: spec.who.clone(),
        channel: spec.channel.clone(),
        started,
        finished: started,
        accepted: Vec::new(),
        exceeded: 0,
        max_retry_ms: 0,
        unavailable: 0,
        unexpected: Vec::new(),
        unexpected_total: 0,
    };
    let mut stream = match connected {
        Ok(s) => s,
        Err(e) => {
            log.note(format!("connect to {}: {e}", spec.addr));
            return log;
        }
    };
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(secs(10)));
    let _ = stream.set_write_timeout(Some(secs(10)));
    let deadline = spec.run_for.map(|d| started + d);
    let mut pending: VecDeque<String> = VecDeque::with_capacity(IN_FLIGHT);
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    let mut out = Vec::with_capacity(IN_FLIGHT * 64);
    let mut seq = 0u64;
    'run: loop {
        let stopping = stop.load(Ordering::SeqCst) || deadline.is_some_and(|d| Instant::now() >= d);
        if !stopping && pending.len() < IN_FLIGHT {
            out.clear();
            while pending.len() < IN_FLIGHT {
                let payload = format!("{}-{seq:08}", spec.who);
                seq += 1;
                out.extend_from_slice(&encode(&["PUBLISH", &spec.channel, &payload]));
                pending.push_back(payload);
            }
            if let Err(e) = stream.write_all(&out) {
                log.note(format!("send: {e}"));
                break;
            }
        }
        if pending.is_empty() {
            break;
        }
        match stream.read(&mut chunk) {
            Ok(0) => {
                log.note(format!(
                    "pubwarden closed the connection with {} PUBLISHes unanswered",
                    pending.len()
                ));
                break;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => {
                log.note(format!(
                    "no reply within 10 s ({e}) with {} PUBLISHes in flight",
                    pending.len()
                ));
                break;
            }
        }
        let now = Instant::now();
        let mut start = 0;
        loop {
            let len = match frame_len(&buf[start..]) {
                Ok(Some(len)) => len,
                Ok(None) => break,
                Err(e) => {
                    log.note(format!(
                        "not RESP ({e}): {}",
                        escape_short(&buf[start..], 200)
                    ));
                    break 'run;
                }
            };
            let frame = &buf[start..start + len];
            start += len;
            let Some(payload) = pending.pop_front() else {
                log.note(format!("a reply to nothing: {}", escape_short(frame, 200)));
                continue;
            };
            match classify(frame, spec.rule) {
                Reply::Accepted(n) => {
                    if n != spec.receivers {
                        log.note(format!(
                            "PUBLISH {payload} reached {n} receivers, not {}",
                            spec.receivers
                        ));
                    }
                    log.accepted.push((now, payload));
                }
                Reply::Exceeded(ms) => {
                    log.exceeded += 1;
                    log.max_retry_ms = log.max_retry_ms.max(ms);
                }
                Reply::Unavailable => log.unavailable += 1,
                Reply::Other(text) => log.note(format!("PUBLISH {payload}: {text}")),
            }
        }
        buf.drain(..start);
    }
    log.finished = Instant::now();
    log
}

// ---------------------------------------------------------------------------------------------
// Deliveries, metrics, Redis.

/// A connection straight on Redis, `PSUBSCRIBE`d to `patterns` (confirmations checked).
fn pattern_subscriber(redis: &RedisServer, patterns: &[&str]) -> RawConn {
    let mut c = RawConn::connect(redis.addr());
    let mut args = vec!["PSUBSCRIBE"];
    args.extend_from_slice(patterns);
    c.send(&encode(&args));
    let frames = c
        .read_frames(patterns.len(), secs(5))
        .expect_all("PSUBSCRIBE confirmations");
    for (i, (f, p)) in frames.iter().zip(patterns).enumerate() {
        let want = format!(
            "*3\r\n$10\r\npsubscribe\r\n${}\r\n{p}\r\n:{}\r\n",
            p.len(),
            i + 1
        );
        assert_eq!(escape(f), escape(want.as_bytes()), "PSUBSCRIBE {p}");
    }
    c
}

/// The payloads `sub` received: `expected` of them (waiting up to 20 s), and whatever else
/// arrives until it has been quiet for 300 ms.
fn delivered(sub: &mut RawConn, expected: usize) -> Vec<String> {
    let got = sub.read_frames(expected, secs(20));
    let mut frames = got.frames;
    let (rest, _) = sub.read_until_idle(millis(300), secs(5));
    let mut start = 0;
    while let Ok(Some(len)) = frame_len(&rest[start..]) {
        frames.push(rest[start..start + len].to_vec());
        start += len;
    }
    frames
        .iter()
        .map(|f| match decode(f) {
            Ok(Value::Array(items))
                if items.len() == 4 && items[0].bytes() == Some(b"pmessage") =>
            {
                String::from_utf8_lossy(items[3].bytes().unwrap_or_default()).into_owned()
            }
            _ => format!("<not a pmessage: {}>", escape_short(f, 200)),
        })
        .collect()
}

/// Asserts that `sub` (straight on Redis) received exactly the accepted payloads.
fn assert_delivered_exactly(sub: &mut RawConn, accepted: Vec<String>) {
    let mut want = accepted;
    want.sort();
    let mut got = delivered(sub, want.len());
    got.sort();
    if got == want {
        return;
    }
    let missing: Vec<&String> = want
        .iter()
        .filter(|p| got.binary_search(p).is_err())
        .collect();
    let extra: Vec<&String> = got
        .iter()
        .filter(|p| want.binary_search(p).is_err())
        .collect();
    panic!(
        "the subscriber on Redis received {} messages, pubwarden accepted {}: \
         {} accepted but not delivered (first: {:?}), {} delivered but not accepted (first: {:?})",
        got.len(),
        want.len(),
        missing.len(),
        &missing[..missing.len().min(10)],
        extra.len(),
        &extra[..extra.len().min(10)]
    );
}

/// A sample of `name` on `p`'s admin port (summed over series matching `labels`).
fn metric(p: &Pubwarden, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let text = match http_get(p.admin_addr(), "/metrics") {
        Some((200, body)) => body,
        other => panic!("GET /metrics on {}: {other:?}", p.admin_addr()),
    };
    metric_value(&text, name, labels)
}

/// A counter that may not exist yet (0 then).
fn counter(p: &Pubwarden, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(p, name, labels).unwrap_or(0.0)
}

/// Polls until `ok(value)` or `timeout`; returns the last value and how long it took.
fn wait_metric(
    p: &Pubwarden,
    name: &str,
    timeout: Duration,
    ok: impl Fn(f64) -> bool,
) -> (Option<f64>, Duration) {
    let start = Instant::now();
    loop {
        let v = metric(p, name, &[]);
        if v.is_some_and(&ok) || start.elapsed() >= timeout {
            return (v, start.elapsed());
        }
        std::thread::sleep(millis(50));
    }
}

fn fallbacks(p: &Pubwarden, action: &str) -> f64 {
    counter(p, FALLBACKS, &[("rule", GLOBAL_RULE), ("action", action)])
}

/// The rate-limit keys `redis` holds for the global rule.
fn budget_keys(redis: &RedisServer) -> Vec<String> {
    let mut c = RawConn::connect(redis.addr());
    let pattern = format!("pubwarden:ratelimit:{{{GLOBAL_RULE}}}*");
    let reply = call(&mut c, &["KEYS", &pattern]);
    match decode(&reply) {
        Ok(Value::Array(items)) => items
            .iter()
            .map(|i| String::from_utf8_lossy(i.bytes().unwrap_or_default()).into_owned())
            .collect(),
        _ => panic!("KEYS {pattern}: {}", escape(&reply)),
    }
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

/// Sends `n` PUBLISHes to `channel` in one write (payloads `<prefix>-<i>`), returns each payload
/// with its reply.
fn publish_batch(
    c: &mut RawConn,
    channel: &str,
    prefix: &str,
    n: usize,
    rule: &str,
) -> Vec<(String, Reply)> {
    let payloads: Vec<String> = (0..n).map(|i| format!("{prefix}-{i:04}")).collect();
    let mut bytes = Vec::new();
    for p in &payloads {
        bytes.extend_from_slice(&encode(&["PUBLISH", channel, p]));
    }
    c.send(&bytes);
    let frames = c
        .read_frames(n, secs(10))
        .expect_all(&format!("replies to {n} PUBLISH {channel}"));
    payloads
        .into_iter()
        .zip(frames.iter().map(|f| classify(f, rule)))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The shared budget.

/// `n` pubwardens publishing flat out on `g.*` for 3 s share one budget: the total accepted is
/// within the accuracy bound and at least 85% of `rate x T`; every accepted message is
/// delivered; the budget lives in the upstream Redis (no `store` configured).
fn shared_budget_holds_across(n: usize) {
    let _serial = serial();
    let redis = RedisServer::start();
    let fleet = start_fleet(&redis, n, &policy(n, "fail_open"), "");
    let mut sub = pattern_subscriber(&redis, &["g.*"]);

    let specs = fleet
        .iter()
        .enumerate()
        .map(|(i, p)| Spec {
            run_for: Some(RUN_FOR),
            ..spec(
                &format!("pw{i}"),
                p.addr(),
                &format!("g.pw{i}"),
                GLOBAL_RULE,
            )
        })
        .collect();
    let logs: Vec<PubLog> = start_publishers(specs)
        .into_iter()
        .map(Publisher::join)
        .collect();
    for l in &logs {
        eprintln!("{n} pubwardens: {}", l.summary());
        l.assert_clean();
    }
    let t = grant_span(&logs.iter().collect::<Vec<_>>());
    let total: usize = logs.iter().map(|l| l.accepted.len()).sum();
    let ceiling = global_ceiling(n, t);
    let floor = 0.85 * RATE as f64 * RUN_FOR.as_secs_f64();
    eprintln!(
        "{n} pubwardens: {total} accepted, the last {:.3} s after the first publisher started; \
         bound {ceiling:.1} ({RATE}/s x T + burst {BURST} + {n} x 1.5 leases of {} + {SLACK}), \
         floor {floor:.1} (85% of {RATE}/s x {RUN_FOR:?})",
        t.as_secs_f64(),
        lease_tokens(RATE)
    );
    assert!(
        total as f64 <= ceiling,
        "{n} pubwardens accepted {total} PUBLISHes in {t:?} under one global budget of \
         {RATE}/s burst {BURST}: more than the accuracy bound {ceiling:.1}; per process: {:?}",
        logs.iter().map(PubLog::summary).collect::<Vec<_>>()
    );
    assert!(
        total as f64 >= floor,
        "{n} pubwardens publishing flat out accepted only {total} in {t:?}: less than 85% of \
         {RATE}/s ({floor:.1}); the shared budget is not usable; per process: {:?}",
        logs.iter().map(PubLog::summary).collect::<Vec<_>>()
    );
    for (i, (p, l)) in fleet.iter().zip(&logs).enumerate() {
        // (How many were refused rather than held for a lease depends on timing: a publish
        // waiting for a lease is held, not refused.) Every `exceeded` answer is counted once, under the rule's name.
        let counted = counter(p, REJECTIONS, &[("rule", GLOBAL_RULE)]);
        assert_eq!(
            counted, l.exceeded as f64,
            "pubwarden {i}: {REJECTIONS}{{rule=\"{GLOBAL_RULE}\"}} differs from the `exceeded` replies it sent"
        );
        let granted = counter(p, LEASES, &[("result", "granted")]);
        let errors = counter(p, LEASES, &[("result", "error")]);
        assert!(
            granted > 0.0,
            "pubwarden {i}: no lease was granted ({LEASES})"
        );
        assert_eq!(
            errors, 0.0,
            "pubwarden {i}: lease errors with a healthy store"
        );
        assert_eq!(
            metric(p, STORE_UP, &[]),
            Some(1.0),
            "pubwarden {i}: {STORE_UP}"
        );
        assert_eq!(
            fallbacks(p, "local_share") + fallbacks(p, "rejected"),
            0.0,
            "pubwarden {i}: fallbacks with a healthy store"
        );
    }
    // Without `global_rate_limits.store`, the upstream Redis holds the budget.
    let keys = budget_keys(&redis);
    assert!(
        !keys.is_empty(),
        "the upstream Redis holds no `pubwarden:ratelimit:{{{GLOBAL_RULE}}}` key right after the run"
    );
    assert_delivered_exactly(
        &mut sub,
        logs.iter()
            .flat_map(|l| l.accepted.iter().map(|(_, p)| p.clone()))
            .collect(),
    );
}

#[test]
fn two_pubwardens_share_one_global_budget() {
    shared_budget_holds_across(2);
}

#[test]
fn three_pubwardens_share_one_global_budget() {
    shared_budget_holds_across(3);
}

#[test]
fn a_local_rule_in_the_same_policy_stays_per_process() {
    let _serial = serial();
    let redis = RedisServer::start();
    let fleet = start_fleet(&redis, 2, &policy(2, "fail_open"), "");
    let mut sub = pattern_subscriber(&redis, &["g.*", "l.*"]);

    // Each pubwarden gets one publisher on the local rule's channels and one on the global's,
    // all at once.
    let mut specs = Vec::new();
    for (i, p) in fleet.iter().enumerate() {
        specs.push(Spec {
            run_for: Some(RUN_FOR),
            ..spec(
                &format!("local{i}"),
                p.addr(),
                &format!("l.pw{i}"),
                LOCAL_RULE,
            )
        });
        specs.push(Spec {
            run_for: Some(RUN_FOR),
            ..spec(
                &format!("global{i}"),
                p.addr(),
                &format!("g.pw{i}"),
                GLOBAL_RULE,
            )
        });
    }
    let logs: Vec<PubLog> = start_publishers(specs)
        .into_iter()
        .map(Publisher::join)
        .collect();
    for l in &logs {
        eprintln!("local and global: {}", l.summary());
        l.assert_clean();
    }
    let (local, global): (Vec<&PubLog>, Vec<&PubLog>) =
        logs.iter().partition(|l| l.who.starts_with("local"));

    // Each process: its own local budget, fully.
    let mut local_total = 0;
    let mut longest = Duration::ZERO;
    for l in &local {
        let t = grant_span(&[*l]);
        longest = longest.max(t);
        let n = l.accepted.len();
        local_total += n;
        let ceiling = local_ceiling(LOCAL_RATE, LOCAL_BURST, t);
        let floor = 0.85 * LOCAL_RATE as f64 * RUN_FOR.as_secs_f64();
        eprintln!(
            "{}: {n} accepted in {:.3} s under the local rule; bound {ceiling:.1}, floor {floor:.1}",
            l.who,
            t.as_secs_f64()
        );
        assert!(
            n as f64 <= ceiling && n as f64 >= floor,
            "{}: {n} accepted in {t:?} under the local rule {LOCAL_RATE}/s burst {LOCAL_BURST}, \
             outside [{floor:.1}, {ceiling:.1}]",
            l.who
        );
    }
    // Together about twice one budget: more than one shared budget could give.
    let one_budget = local_ceiling(LOCAL_RATE, LOCAL_BURST, longest);
    eprintln!(
        "local rule: {local_total} accepted by 2 pubwardens together; one budget allows {one_budget:.1}"
    );
    assert!(
        local_total as f64 > one_budget
            && local_total as f64 >= 1.7 * LOCAL_RATE as f64 * RUN_FOR.as_secs_f64(),
        "two pubwardens accepted {local_total} in {longest:?} under the local rule: a local rule \
         must be per process (about 2 x {LOCAL_RATE}/s), not shared"
    );

    // The global rule, meanwhile, still holds for both together.
    let t = grant_span(&global);
    let global_total: usize = global.iter().map(|l| l.accepted.len()).sum();
    let ceiling = global_ceiling(2, t);
    let floor = 0.85 * RATE as f64 * RUN_FOR.as_secs_f64();
    eprintln!(
        "global rule alongside: {global_total} accepted in {:.3} s; bound {ceiling:.1}, floor {floor:.1}",
        t.as_secs_f64()
    );
    assert!(
        global_total as f64 <= ceiling && global_total as f64 >= floor,
        "global rule alongside the local one: {global_total} accepted in {t:?}, outside \
         [{floor:.1}, {ceiling:.1}]"
    );
    for (i, p) in fleet.iter().enumerate() {
        let local_rejections = counter(p, REJECTIONS, &[("rule", LOCAL_RULE)]);
        let mine = local[i].exceeded as f64;
        assert_eq!(
            local_rejections, mine,
            "pubwarden {i}: {REJECTIONS}{{rule=\"{LOCAL_RULE}\"}} differs from its `exceeded` replies"
        );
    }
    assert_delivered_exactly(
        &mut sub,
        logs.iter()
            .flat_map(|l| l.accepted.iter().map(|(_, p)| p.clone()))
            .collect(),
    );
}

// ---------------------------------------------------------------------------------------------
// Store outages.

#[test]
fn store_outage_fail_open_enforces_the_local_share_then_the_shared_budget_again() {
    let _serial = serial();
    let upstream = RedisServer::start();
    let mut store = RedisServer::start();
    let fleet = start_fleet(
        &upstream,
        2,
        &policy(2, "fail_open"),
        &store_settings(&store),
    );
    let (p1, p2) = (&fleet[0], &fleet[1]);
    let share = RATE / 2;
    let share_burst = BURST / 2;
    let mut sub = pattern_subscriber(&upstream, &["g.*"]);

    let mut pubs = start_publishers(vec![
        spec("pw0", p1.addr(), "g.pw0", GLOBAL_RULE),
        spec("pw1", p2.addr(), "g.pw1", GLOBAL_RULE),
    ]);
    let t0 = Instant::now();

    // Phase 1, healthy: the budget lives in the configured store, not upstream.
    std::thread::sleep(secs(2));
    let t1 = Instant::now();
    let store_keys = budget_keys(&store);
    let upstream_keys = budget_keys(&upstream);
    assert!(
        !store_keys.is_empty(),
        "global_rate_limits.store holds no budget key while pubwardens publish"
    );
    assert!(
        upstream_keys.is_empty(),
        "with global_rate_limits.store set, the upstream Redis holds budget keys: {upstream_keys:?}"
    );

    // Phase 2: the store dies.
    store.kill();
    let killed = Instant::now();
    for (i, p) in fleet.iter().enumerate() {
        let (v, took) = wait_metric(p, STORE_UP, secs(5), |v| v == 0.0);
        assert_eq!(
            v,
            Some(0.0),
            "pubwarden {i}: {STORE_UP} still not 0 {took:?} after the store was killed"
        );
    }
    let noticed = killed.elapsed();
    let t2 = Instant::now() + millis(200);
    let t3 = t2 + secs(2);
    sleep_until(t3);
    for (i, p) in fleet.iter().enumerate() {
        let fb = fallbacks(p, "local_share");
        assert!(
            fb > 0.0,
            "pubwarden {i}: {FALLBACKS}{{action=\"local_share\"}} is {fb} during the outage"
        );
        assert_eq!(
            fallbacks(p, "rejected"),
            0.0,
            "pubwarden {i}: fail_open rejected"
        );
        assert!(
            counter(p, LEASES, &[("result", "error")]) > 0.0,
            "pubwarden {i}: no lease error counted while the store is down"
        );
    }

    // Phase 3: the store is back on the same port (empty).
    store.restart();
    let restarted = Instant::now();
    for (i, p) in fleet.iter().enumerate() {
        let (v, took) = wait_metric(p, STORE_UP, secs(5), |v| v == 1.0);
        assert_eq!(
            v,
            Some(1.0),
            "pubwarden {i}: {STORE_UP} not back to 1 {took:?} after the store restarted"
        );
    }
    let recovered = restarted.elapsed();
    std::thread::sleep(millis(200));
    let t4 = Instant::now();
    let fb_before = [fallbacks(p1, "local_share"), fallbacks(p2, "local_share")];
    let granted_before = [
        counter(p1, LEASES, &[("result", "granted")]),
        counter(p2, LEASES, &[("result", "granted")]),
    ];
    std::thread::sleep(secs(2));
    let t5 = Instant::now();
    let fb_after = [fallbacks(p1, "local_share"), fallbacks(p2, "local_share")];
    let granted_after = [
        counter(p1, LEASES, &[("result", "granted")]),
        counter(p2, LEASES, &[("result", "granted")]),
    ];
    assert!(
        !budget_keys(&store).is_empty(),
        "the restarted store holds no budget key"
    );

    // Phase 4: only the first pubwarden publishes: with the shared budget it may use all of it,
    // far beyond its share.
    let log1 = pubs.pop().expect("publisher").finish();
    let t6 = Instant::now();
    std::thread::sleep(millis(1500));
    let t7 = Instant::now();
    let log0 = pubs.pop().expect("publisher").finish();
    for l in [&log0, &log1] {
        eprintln!("fail_open: {}", l.summary());
        l.assert_clean();
    }

    // Phase 1: shared.
    let healthy = log0.accepted_in(t0, t1) + log1.accepted_in(t0, t1);
    let healthy_ceiling = global_ceiling(2, t1 - t0);
    eprintln!(
        "fail_open, healthy: {healthy} accepted in {:.3} s; bound {healthy_ceiling:.1}",
        (t1 - t0).as_secs_f64()
    );
    assert!(
        healthy as f64 <= healthy_ceiling
            && healthy as f64 >= 0.85 * RATE as f64 * (t1 - t0).as_secs_f64(),
        "fail_open, store healthy: {healthy} accepted in {:?}, outside [85% of {RATE}/s x T, \
         {healthy_ceiling:.1}]",
        t1 - t0
    );

    // Phase 2: each process alone at its share.
    let t = t3 - t2;
    let share_ceiling = local_ceiling(share, share_burst, t) + lease_tokens(RATE) as f64;
    let share_floor = 0.7 * share as f64 * t.as_secs_f64();
    for l in [&log0, &log1] {
        let n = l.accepted_in(t2, t3);
        eprintln!(
            "fail_open, store down (noticed after {noticed:?}): {} accepted {n} in {:.3} s; \
             share bound {share_ceiling:.1}, floor {share_floor:.1}",
            l.who,
            t.as_secs_f64()
        );
        assert!(
            n as f64 <= share_ceiling && n as f64 >= share_floor,
            "fail_open with the store down: {} accepted {n} in {t:?}, outside its local share \
             [{share_floor:.1}, {share_ceiling:.1}] ({share}/s burst {share_burst})",
            l.who
        );
    }

    // Phase 3: shared again.
    let again = log0.accepted_in(t4, t5) + log1.accepted_in(t4, t5);
    let again_ceiling = global_ceiling(2, t5 - t4);
    eprintln!(
        "fail_open, store back (store_up 1 after {recovered:?}): {again} accepted in {:.3} s; \
         bound {again_ceiling:.1}; fallbacks {fb_before:?} -> {fb_after:?}; granted leases \
         {granted_before:?} -> {granted_after:?}",
        (t5 - t4).as_secs_f64()
    );
    assert!(
        again as f64 <= again_ceiling
            && again as f64 >= 0.85 * RATE as f64 * (t5 - t4).as_secs_f64(),
        "store back: {again} accepted in {:?}, outside [85% of {RATE}/s x T, {again_ceiling:.1}]",
        t5 - t4
    );
    for i in 0..2 {
        assert_eq!(
            fb_before[i], fb_after[i],
            "pubwarden {i} still falls back (local_share) with the store back and store_up 1"
        );
        assert!(
            granted_after[i] > granted_before[i],
            "pubwarden {i}: no lease granted after the store came back"
        );
    }

    // Phase 4: one publisher alone gets more than a share could give.
    let t = t7 - t6;
    let alone = log0.accepted_in(t6, t7);
    let alone_share_ceiling = local_ceiling(share, share_burst, t) + lease_tokens(RATE) as f64;
    eprintln!(
        "fail_open, store back, pw0 alone: {alone} accepted in {:.3} s; its share would allow \
         {alone_share_ceiling:.1}, the global bound {:.1}",
        t.as_secs_f64(),
        global_ceiling(2, t)
    );
    assert!(
        alone as f64 > alone_share_ceiling && alone as f64 <= global_ceiling(2, t),
        "store back, one pubwarden alone: {alone} accepted in {t:?}; the shared budget should \
         give it more than its share ({alone_share_ceiling:.1}) and no more than the global \
         bound ({:.1})",
        global_ceiling(2, t)
    );

    for (i, p) in fleet.iter().enumerate() {
        let logs = p.logs();
        assert!(
            logs.contains("shared rate-limit store is unreachable")
                && logs.contains("shared rate-limit store is reachable again"),
            "pubwarden {i} did not log the outage and the recovery:\n{logs}"
        );
    }
    assert_delivered_exactly(
        &mut sub,
        [&log0, &log1]
            .iter()
            .flat_map(|l| l.accepted.iter().map(|(_, p)| p.clone()))
            .collect(),
    );
}

#[test]
fn store_outage_fail_closed_refuses_the_rule_and_nothing_else() {
    let _serial = serial();
    let upstream = RedisServer::start();
    let mut store = RedisServer::start();
    let fleet = start_fleet(
        &upstream,
        2,
        &policy(2, "fail_closed"),
        &store_settings(&store),
    );
    let mut sub = pattern_subscriber(&upstream, &["g.*", "l.*", "free.*"]);
    let mut conns: Vec<RawConn> = fleet.iter().map(Pubwarden::connect).collect();
    let mut accepted: Vec<String> = Vec::new();
    let mut unavailable = [0u64; 2];

    let take_accepted = |replies: &[(String, Reply)], accepted: &mut Vec<String>| {
        accepted.extend(
            replies
                .iter()
                .filter(|(_, r)| matches!(r, Reply::Accepted(_)))
                .map(|(p, _)| p.clone()),
        );
    };

    // Healthy: a few publishes each, well within the burst.
    for (i, c) in conns.iter_mut().enumerate() {
        let replies = publish_batch(c, "g.x", &format!("pw{i}-healthy"), 5, GLOBAL_RULE);
        assert!(
            replies.iter().all(|(_, r)| *r == Reply::Accepted(1)),
            "pubwarden {i}, store healthy, 5 PUBLISHes within the burst: {replies:?}"
        );
        take_accepted(&replies, &mut accepted);
    }

    store.kill();
    // Leased tokens may still be spent, and a denial may still be in force; then every publish
    // on the rule's channels is refused.
    for (i, c) in conns.iter_mut().enumerate() {
        let deadline = Instant::now() + secs(5);
        let mut seen = Vec::new();
        loop {
            let replies = publish_batch(
                c,
                "g.x",
                &format!("pw{i}-dying-{}", seen.len()),
                1,
                GLOBAL_RULE,
            );
            take_accepted(&replies, &mut accepted);
            let r = replies[0].1.clone();
            seen.push(r.clone());
            match r {
                Reply::Unavailable => {
                    unavailable[i] += 1;
                    break;
                }
                Reply::Accepted(1) | Reply::Exceeded(_) => {}
                other => panic!("pubwarden {i}, store just killed: unexpected reply {other:?}"),
            }
            assert!(
                Instant::now() < deadline,
                "pubwarden {i}: no `cannot be checked` error within 5 s of the store being \
                 killed; replies: {seen:?}"
            );
            std::thread::sleep(millis(20));
        }
        eprintln!(
            "fail_closed: pubwarden {i} refused after {} publishes: {seen:?}",
            seen.len()
        );
    }
    for (i, p) in fleet.iter().enumerate() {
        let (v, took) = wait_metric(p, STORE_UP, secs(5), |v| v == 0.0);
        assert_eq!(
            v,
            Some(0.0),
            "pubwarden {i}: {STORE_UP} not 0 {took:?} into the outage"
        );
    }

    let want = unavailable_error(GLOBAL_RULE);
    for (i, (c, p)) in conns.iter_mut().zip(&fleet).enumerate() {
        // Every publish on the rule's channels: refused with the documented error.
        for channel in ["g.x", "g.other"] {
            let replies = publish_batch(
                c,
                channel,
                &format!("pw{i}-down-{channel}"),
                100,
                GLOBAL_RULE,
            );
            let wrong: Vec<&(String, Reply)> = replies
                .iter()
                .filter(|(_, r)| *r != Reply::Unavailable)
                .collect();
            assert!(
                wrong.is_empty(),
                "pubwarden {i}, store down, fail_closed: {} of 100 PUBLISH {channel} were not \
                 answered {want:?}: {:?}",
                wrong.len(),
                &wrong[..wrong.len().min(10)]
            );
            unavailable[i] += 100;
        }
        // Other channels: unaffected (no rule, and the local rule's own burst).
        let free = publish_batch(c, "free.x", &format!("pw{i}-free"), 100, GLOBAL_RULE);
        assert!(
            free.iter().all(|(_, r)| *r == Reply::Accepted(1)),
            "pubwarden {i}, store down: PUBLISH free.x (no rule) must pass: {:?}",
            free.iter()
                .filter(|(_, r)| *r != Reply::Accepted(1))
                .take(10)
                .collect::<Vec<_>>()
        );
        take_accepted(&free, &mut accepted);
        let local = publish_batch(c, "l.x", &format!("pw{i}-local"), 5, LOCAL_RULE);
        assert!(
            local.iter().all(|(_, r)| *r == Reply::Accepted(1)),
            "pubwarden {i}, store down: 5 PUBLISH l.x within the local rule's burst must pass: {local:?}"
        );
        take_accepted(&local, &mut accepted);
        // Each refusal counted exactly once, as `rejected`.
        let rejected = fallbacks(p, "rejected");
        assert_eq!(
            rejected, unavailable[i] as f64,
            "pubwarden {i}: {FALLBACKS}{{rule=\"{GLOBAL_RULE}\",action=\"rejected\"}} differs \
             from the `cannot be checked` replies it sent"
        );
        assert_eq!(
            fallbacks(p, "local_share"),
            0.0,
            "pubwarden {i}: fail_closed used its local share"
        );
    }

    // The store comes back. It is probed every second while down, publishes or not: store_up
    // returns to 1 with nobody publishing, and then the rule's publishes pass at once.
    store.restart();
    let restarted = Instant::now();
    for (i, (c, p)) in conns.iter_mut().zip(&fleet).enumerate() {
        let (v, took) = wait_metric(p, STORE_UP, secs(5), |v| v == 1.0);
        assert_eq!(
            v,
            Some(1.0),
            "pubwarden {i}: {STORE_UP} not back to 1 {:?} after the store restarted, with no \
             publish asking (it is probed every second while down)",
            restarted.elapsed()
        );
        let replies = publish_batch(c, "g.x", &format!("pw{i}-back"), 5, GLOBAL_RULE);
        take_accepted(&replies, &mut accepted);
        assert!(
            replies.iter().all(|(_, r)| *r == Reply::Accepted(1)),
            "pubwarden {i}: store back ({STORE_UP} 1), 5 PUBLISH g.x within the fresh burst: \
             {replies:?}"
        );
        assert_eq!(
            fallbacks(p, "rejected"),
            unavailable[i] as f64,
            "pubwarden {i}: rejected fallbacks differ from the `cannot be checked` replies"
        );
        eprintln!(
            "fail_closed: pubwarden {i}: store_up 1 {:?} after the restart (waited {took:?}); \
             {} refusals in all",
            restarted.elapsed(),
            unavailable[i]
        );
    }
    assert_delivered_exactly(&mut sub, accepted);
}

#[test]
fn a_store_slower_than_store_timeout_counts_as_unavailable() {
    let _serial = serial();
    let upstream = RedisServer::start();
    let store = RedisServer::start();
    let settings = format!(
        "global_rate_limits:\n  store_timeout: 200ms\n  store:\n    address: {}\n",
        store.addr()
    );
    let timeout = millis(200);
    let proxy = start_pubwarden_with_policy(&upstream, &policy(2, "fail_closed"), &settings, &[]);
    let mut c = proxy.connect();
    let replies = publish_batch(&mut c, "g.x", "healthy", 3, GLOBAL_RULE);
    assert!(
        replies.iter().all(|(_, r)| *r == Reply::Accepted(0)),
        "store healthy: 3 PUBLISHes within the burst (no subscriber): {replies:?}"
    );

    // The store hangs (alive, connected, silent) for 2.5 s.
    let mut hang = RawConn::connect(store.addr());
    hang.send(&encode(&["DEBUG", "SLEEP", "2.5"]));
    let hung_at = Instant::now();
    std::thread::sleep(millis(50));

    // Leased tokens may still be spent; then the lease request waits for the store, but no
    // longer than store_timeout, and the rule's publishes are refused.
    let mut seen = Vec::new();
    let (refused_in, first_refusal) = loop {
        let sent = Instant::now();
        let replies = publish_batch(
            &mut c,
            "g.x",
            &format!("hung-{}", seen.len()),
            1,
            GLOBAL_RULE,
        );
        let took = sent.elapsed();
        seen.push((replies[0].1.clone(), took));
        match &replies[0].1 {
            Reply::Unavailable => break (took, hung_at.elapsed()),
            Reply::Accepted(0) | Reply::Exceeded(_) => {}
            other => panic!("store hung: unexpected reply {other:?}; so far {seen:?}"),
        }
        assert!(
            hung_at.elapsed() < millis(2000),
            "no `cannot be checked` error 2 s into a store hang with store_timeout 200ms: {seen:?}"
        );
    };
    eprintln!("store hung: replies and their latencies {seen:?}");
    for (r, took) in &seen {
        assert!(
            *took <= timeout + millis(400),
            "a PUBLISH waited {took:?} ({r:?}) for a hung store with store_timeout 200ms: {seen:?}"
        );
    }
    // The lease request went out after the hang began and was given store_timeout.
    assert!(
        first_refusal >= timeout,
        "refused {first_refusal:?} into the hang: before store_timeout (200ms) had passed"
    );
    let (v, took) = wait_metric(&proxy, STORE_UP, millis(1500), |v| v == 0.0);
    assert_eq!(
        v,
        Some(0.0),
        "{STORE_UP} not 0 {took:?} into a store hang (store_timeout 200ms)"
    );
    assert!(
        counter(&proxy, LEASES, &[("result", "error")]) > 0.0,
        "the timed-out lease request is not counted as an error"
    );
    // While it still hangs: refused at once.
    let sent = Instant::now();
    let replies = publish_batch(&mut c, "g.x", "still-hung", 20, GLOBAL_RULE);
    let took = sent.elapsed();
    assert!(
        hung_at.elapsed() < millis(2400),
        "the check ran too late to be during the hang ({:?}): the machine is too slow",
        hung_at.elapsed()
    );
    assert!(
        replies.iter().all(|(_, r)| *r == Reply::Unavailable) && took < millis(150),
        "store hung and known down: 20 PUBLISHes took {took:?}: {replies:?}"
    );

    // The hang ends; the store is probed again and used.
    let (done, _) = hang.read_bytes(5, secs(5));
    assert_eq!(escape(&done), "+OK\\r\\n", "DEBUG SLEEP on the store");
    let deadline = Instant::now() + secs(5);
    let mut attempts = 0;
    loop {
        let replies = publish_batch(&mut c, "g.x", &format!("back-{attempts}"), 1, GLOBAL_RULE);
        attempts += 1;
        match &replies[0].1 {
            Reply::Accepted(0) => break,
            Reply::Unavailable => {}
            other => panic!("store back from a hang: unexpected reply {other:?}"),
        }
        assert!(
            Instant::now() < deadline,
            "PUBLISH g.x still refused 5 s after the store hang ended"
        );
        std::thread::sleep(millis(100));
    }
    let (v, took) = wait_metric(&proxy, STORE_UP, secs(2), |v| v == 1.0);
    assert_eq!(
        v,
        Some(1.0),
        "{STORE_UP} not back to 1 after the hang ({took:?})"
    );
    eprintln!(
        "store hung: the refused PUBLISH took {refused_in:?}; accepted again {:?} after the hang \
         began ({attempts} attempts after it ended)",
        hung_at.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// check-config.

/// `a.b[3].c` -> `a.b.3.c`.
fn normalise_path(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(ch) = chars.next() {
        if ch == '[' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('.');
            while let Some(&d) = chars.peek() {
                chars.next();
                if d == ']' {
                    break;
                }
                out.push(d);
            }
        } else {
            out.push(ch);
        }
    }
    out
}

fn check_config(policy: &str, settings: &str) -> CliRun {
    let path = write_settings(policy, settings);
    run_cli(
        &["check-config", path.to_str().expect("utf-8 path")],
        b"",
        &[],
        secs(20),
    )
}

/// Asserts that some line of the output names `path` and contains `text`.
fn assert_reported(run: &CliRun, path: &str, text: &str, what: &str) {
    let output = run.output();
    let found = output.lines().map(normalise_path).any(|l| {
        (l.contains(&format!("{path} ")) || l.contains(&format!("{path}:"))) && l.contains(text)
    });
    assert!(
        found,
        "{what}: no line names `{path}` with `{text}`; output:\n{output}"
    );
}

const OPEN_USERS: &str = "users:\n  default:\n    nopass: true\n    channels:\n      publish: [\"*\"]\n      subscribe: [\"*\"]\n";

#[test]
fn check_config_refuses_misplaced_global_settings_and_explains_global_rules() {
    // A global rule with bytes; local rules with `instances` and `on_store_failure`; bad values.
    let bad = format!(
        "{OPEN_USERS}rate_limits:
  - name: ok-local
    messages_per_second: 10
  - name: global-bytes
    messages_per_second: 100
    bytes_per_second: 1mb
    scope: global
  - name: local-instances
    messages_per_second: 100
    instances: 4
  - name: local-failure
    messages_per_second: 100
    on_store_failure: fail_closed
  - name: odd-scope
    messages_per_second: 100
    scope: regional
  - name: odd-failure
    messages_per_second: 100
    scope: global
    on_store_failure: fail_sometimes
"
    );
    let run = check_config(&bad, "");
    assert_eq!(
        run.code,
        Some(64),
        "check-config with misplaced global settings: want exit 64; output:\n{}",
        run.output()
    );
    assert_reported(
        &run,
        "rate_limits.1",
        "bytes_per_second",
        "scope: global with bytes_per_second",
    );
    assert_reported(
        &run,
        "rate_limits.1",
        "scope: global",
        "scope: global with bytes_per_second",
    );
    assert_reported(
        &run,
        "rate_limits.2",
        "scope: global",
        "instances on a local rule",
    );
    assert_reported(
        &run,
        "rate_limits.3",
        "scope: global",
        "on_store_failure on a local rule",
    );
    assert_reported(&run, "rate_limits.4.scope", "regional", "an unknown scope");
    assert_reported(
        &run,
        "rate_limits.5.on_store_failure",
        "fail_sometimes",
        "an unknown on_store_failure",
    );
    let normalised: String = run
        .output()
        .lines()
        .map(normalise_path)
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        !normalised.contains("rate_limits.0"),
        "the valid local rule rate_limits[0] is reported:\n{}",
        run.output()
    );

    // Each mistake alone is enough.
    for (rule, path) in [
        (
            "  - name: g\n    messages_per_second: 100\n    bytes_per_second: 1mb\n    scope: global\n",
            "rate_limits.0",
        ),
        (
            "  - name: l\n    messages_per_second: 100\n    instances: 2\n",
            "rate_limits.0",
        ),
    ] {
        let run = check_config(&format!("{OPEN_USERS}rate_limits:\n{rule}"), "");
        assert_eq!(
            run.code,
            Some(64),
            "check-config with\n{rule}\noutput:\n{}",
            run.output()
        );
        assert_reported(&run, path, "scope: global", &format!("the rule\n{rule}"));
    }

    // A store section needs an address.
    let run = check_config(
        OPEN_USERS,
        "global_rate_limits:\n  store:\n    username: rl\n",
    );
    assert_eq!(
        run.code,
        Some(64),
        "a store without an address; output:\n{}",
        run.output()
    );
    assert_reported(
        &run,
        "global_rate_limits.store.address",
        "required",
        "a store without an address",
    );

    // Valid global rules are explained; the settings are shown.
    let good = format!(
        "{OPEN_USERS}rate_limits:
  - name: orders-fleet
    channels: [\"orders.*\"]
    messages_per_second: 5000
    burst: 500
    key: global
    scope: global
    instances: 20
    on_store_failure: fail_open
  - name: audit-fleet
    channels: [\"audit.*\"]
    messages_per_second: 50
    scope: global
    on_store_failure: fail_closed
  - name: per-pod
    channels: [\"logs.*\"]
    messages_per_second: 100
"
    );
    let run = check_config(
        &good,
        "global_rate_limits:\n  lease: 10ms\n  store_timeout: 100ms\n  store:\n    address: 127.0.0.1:6391\n",
    );
    let out = run.output();
    assert_eq!(
        run.code,
        Some(0),
        "check-config with valid global rules failed:\n{out}"
    );
    assert_eq!(
        out.matches("shared by every pubwarden").count(),
        2,
        "each of the two global rules (and not the local one) should be explained as \
         `shared by every pubwarden`:\n{out}"
    );
    for (rule, fallback) in [("orders-fleet", "1/20"), ("audit-fleet", "fail_closed")] {
        // The rule's own explanation (after the users naming it): its line and the lines
        // below, up to the next rule.
        let at = out
            .rfind(rule)
            .unwrap_or_else(|| panic!("rule {rule} is not explained:\n{out}"));
        let mut lines = out[at..].lines();
        let mut section = lines.next().unwrap_or_default().to_string();
        for l in lines.take_while(|l| !l.contains("rate limit ")) {
            section.push('\n');
            section.push_str(l);
        }
        assert!(
            section.contains("shared by every pubwarden") && section.contains(fallback),
            "{rule}'s explanation lacks `shared by every pubwarden` or `{fallback}`:\n{section}\n\nwhole output:\n{out}"
        );
    }
    for needle in [
        "global_rate_limits",
        "lease: 10ms",
        "store_timeout: 100ms",
        "127.0.0.1:6391",
    ] {
        assert!(
            out.contains(needle),
            "the effective settings do not show `{needle}`:\n{out}"
        );
    }
}
