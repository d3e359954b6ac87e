//! `upstream.mode: sentinel` against a real Sentinel deployment (a master, a replica and three
//! Sentinels on loopback): the master is found through Sentinel; after a planned failover
//! (`SENTINEL FAILOVER`) or the master's death (SIGKILL) new connections go to the new master,
//! subscribers are closed by default (what Redis itself does to them) or, with `resubscribe`,
//! moved to the new master without seeing anything but a gap; and `check-config` refuses
//! incomplete or contradictory Sentinel settings.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use support::policy::{CliRun, run_cli, text, write_file};
use support::sentinel::{MASTER_NAME, SentinelCluster, SentinelProxy, redis_call, wait_until};
use support::tls::metric_value;
use support::*;

const CHANNEL: &str = "news";

/// The last lines of pubwarden's log, for failure messages.
fn log_tail(proxy: &SentinelProxy) -> String {
    let logs = proxy.logs();
    let lines: Vec<&str> = logs.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

/// The port of the Redis a new connection through pubwarden reaches (`CONFIG GET port`), or
/// why there is none.
fn port_through(proxy: &SentinelProxy) -> Result<u16, String> {
    let v = redis_call(proxy.addr(), &["CONFIG", "GET", "port"])?;
    match v.items() {
        Some([_, port]) => port
            .bytes()
            .and_then(|b| std::str::from_utf8(b).ok())
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("CONFIG GET port: {v:?}")),
        _ => Err(format!("CONFIG GET port: {v:?}")),
    }
}

fn metric(proxy: &SentinelProxy, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metric_value(&proxy.metrics(), name, labels)
}

fn master_label(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

/// A subscriber to [`CHANNEL`] through `proxy`.
fn subscribe(proxy: &SentinelProxy) -> RawConn {
    let mut c = proxy.connect();
    c.send(&encode(&["SUBSCRIBE", CHANNEL]));
    let confirm = c.read_one(secs(5));
    assert_eq!(
        text(&confirm),
        text(b"*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n"),
        "SUBSCRIBE confirmation through pubwarden"
    );
    c
}

/// The payload of a RESP2 `message` on [`CHANNEL`], or what the frame was instead.
fn message_payload(frame: &[u8]) -> Result<String, String> {
    let v = decode(frame).map_err(|e| format!("{e}: {}", text(frame)))?;
    match v.items() {
        Some([kind, channel, payload])
            if kind.bytes() == Some(b"message") && channel.bytes() == Some(CHANNEL.as_bytes()) =>
        {
            Ok(String::from_utf8_lossy(payload.bytes().unwrap_or_default()).into_owned())
        }
        _ => Err(text(frame)),
    }
}

/// Publishes to [`CHANNEL`] through pubwarden as fast as replies come (with a 2 ms pause),
/// opening a new connection after any error reply, close or timeout, and counts the publishes
/// Redis acknowledged (`:<n>`).
struct Publisher {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    handle: Option<JoinHandle<()>>,
}

impl Publisher {
    fn start(addr: SocketAddr) -> Publisher {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let (s, a, f) = (stop.clone(), acked.clone(), failed.clone());
        let handle = std::thread::spawn(move || {
            let mut conn: Option<RawConn> = None;
            let mut n = 0u64;
            while !s.load(Ordering::Relaxed) {
                let mut c = match conn.take() {
                    Some(c) => c,
                    None => match RawConn::try_connect(addr) {
                        Ok(c) => c,
                        Err(_) => {
                            f.fetch_add(1, Ordering::Relaxed);
                            std::thread::sleep(millis(50));
                            continue;
                        }
                    },
                };
                n += 1;
                let payload = format!("load-{n}");
                let ok = c.try_send(&encode(&["PUBLISH", CHANNEL, &payload])).is_ok() && {
                    let got = c.read_frames(1, secs(2));
                    got.stop == Stop::Done && got.frames[0].starts_with(b":")
                };
                if ok {
                    a.fetch_add(1, Ordering::Relaxed);
                    conn = Some(c);
                    std::thread::sleep(millis(2));
                } else {
                    f.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(millis(20));
                }
            }
        });
        Publisher {
            stop,
            acked,
            failed,
            handle: Some(handle),
        }
    }

    fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    /// Stops the thread: (acknowledged, failed) publishes and connects.
    fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.join().expect("publisher thread panicked");
        }
        (self.acked(), self.failed.load(Ordering::Relaxed))
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    /// `SENTINEL FAILOVER mymaster`: the old master lives on as a replica.
    PlannedFailover,
    /// The master is killed with SIGKILL; Sentinel elects a leader and promotes the replica.
    MasterKilled,
}

/// What [`master_change_under_load`] measured.
struct Outcome {
    cluster: SentinelCluster,
    plain: SentinelProxy,
    resub: SentinelProxy,
    followed_in: Duration,
}

/// A plain pubwarden (subscribers closed on a master change) and one with
/// `upstream.resubscribe: true`, a subscriber on each and a publisher through the plain one;
/// then `trigger`. Within `within` of the trigger: new connections through both reach the new
/// master, each counted exactly one failover and names the new master in its gauge, `/readyz`
/// is 200, and the plain subscriber's connection is closed. Then: the publisher's publishes are
/// acknowledged again, the resubscribing subscriber is subscribed on the new master and hears a
/// marker published after the switch, and it never saw anything but `message` frames.
fn master_change_under_load(trigger: Trigger, within: Duration) -> Outcome {
    let mut cluster = SentinelCluster::start();
    let old = cluster.master_port();
    let new = cluster.replica_port();
    let plain = cluster.start_pubwarden(&[], "");
    let resub = cluster.start_pubwarden(&["resubscribe: true"], "");
    for (p, name) in [(&plain, "plain"), (&resub, "resubscribe")] {
        assert_eq!(
            port_through(p),
            Ok(old),
            "before the {trigger:?}, a connection through pubwarden ({name}) must reach the \
             master; log:\n{}",
            log_tail(p)
        );
    }
    let mut sub_plain = subscribe(&plain);
    let mut sub_resub = subscribe(&resub);
    let publisher = Publisher::start(plain.addr());
    // Load flows before the switch: publishes are acknowledged and both subscribers hear them.
    wait_until(
        secs(10),
        "publishes through pubwarden to be acknowledged",
        || match publisher.acked() {
            n if n >= 50 => Ok(()),
            n => Err(format!("{n} acknowledged")),
        },
    )
    .unwrap_or_else(|e| panic!("{e}; pubwarden (plain) log:\n{}", log_tail(&plain)));
    for (c, name) in [(&mut sub_plain, "plain"), (&mut sub_resub, "resubscribe")] {
        let f = c.read_frames(1, secs(5));
        let first = f.frames.first().cloned().unwrap_or_default();
        assert!(
            message_payload(&first).is_ok(),
            "the {name} subscriber heard no publish before the {trigger:?}: {:?} {}",
            f.stop,
            text(&first)
        );
    }
    let acked_before = publisher.acked();
    let t0 = Instant::now();
    match trigger {
        Trigger::PlannedFailover => cluster.failover(),
        Trigger::MasterKilled => cluster.kill_master(),
    }
    let deadline = t0 + within;
    let remaining = || deadline.saturating_duration_since(Instant::now());

    // New connections reach the new master.
    for (p, name) in [(&plain, "plain"), (&resub, "resubscribe")] {
        let what = format!(
            "new connections through pubwarden ({name}) to reach the new master on port {new}"
        );
        wait_until(remaining(), &what, || match port_through(p) {
            Ok(port) if port == new => Ok(()),
            Ok(port) => Err(format!("reached port {port}")),
            Err(e) => Err(e),
        })
        .unwrap_or_else(|e| {
            panic!(
                "{e}\n({:?} after the {trigger:?}; the Sentinels name port {:?})\n\
                 pubwarden ({name}) log:\n{}",
                t0.elapsed(),
                cluster.master_port_by_sentinel(),
                log_tail(p)
            )
        });
    }
    let followed_in = t0.elapsed();
    let at_switch = publisher.acked();

    // Metrics and readiness.
    for (p, name) in [(&plain, "plain"), (&resub, "resubscribe")] {
        let metrics = p.metrics();
        let failovers = metric_value(&metrics, "pubwarden_sentinel_failovers_total", &[]);
        assert_eq!(
            failovers,
            Some(1.0),
            "pubwarden ({name}) must count exactly one failover; metrics:\n{}\nlog:\n{}",
            sentinel_lines(&metrics),
            log_tail(p)
        );
        let new_master = metric_value(
            &metrics,
            "pubwarden_sentinel_master",
            &[
                ("master_name", MASTER_NAME),
                ("address", &master_label(new)),
            ],
        );
        let old_master = metric_value(
            &metrics,
            "pubwarden_sentinel_master",
            &[
                ("master_name", MASTER_NAME),
                ("address", &master_label(old)),
            ],
        );
        assert_eq!(
            (new_master, old_master),
            (Some(1.0), None),
            "pubwarden ({name}): the master gauge must name only the new master; metrics:\n{}",
            sentinel_lines(&metrics)
        );
        assert!(
            p.wait_for_status_until("/readyz", 200, remaining()),
            "pubwarden ({name}): /readyz is {:?}, not 200, {:?} after the {trigger:?}; log:\n{}",
            p.http_status("/readyz"),
            t0.elapsed(),
            log_tail(p)
        );
    }

    // The plain subscriber's connection is closed, as Redis closes it on failover.
    let (_, closed) = sub_plain.read_until_eof(remaining().max(millis(100)));
    assert!(
        closed,
        "the plain subscriber's connection was still open {:?} after the {trigger:?}; log:\n{}",
        t0.elapsed(),
        log_tail(&plain)
    );

    // Publishing goes on on the new master.
    wait_until(
        secs(5),
        "publishes to be acknowledged after the switch",
        || {
            let now = publisher.acked();
            if now > at_switch {
                Ok(())
            } else {
                Err(format!("{now} acknowledged in all"))
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e}; pubwarden (plain) log:\n{}", log_tail(&plain)));

    // The resubscribing subscriber is subscribed on the new master...
    let new_addr = support::net::loopback(new);
    wait_until(
        secs(10),
        "the resubscribing subscriber to be subscribed on the new master",
        || {
            let v = redis_call(new_addr, &["PUBSUB", "NUMSUB", CHANNEL])?;
            match v.items() {
                Some([_, n]) if n.int() == Some(1) => Ok(()),
                _ => Err(format!("PUBSUB NUMSUB {CHANNEL} on the new master: {v:?}")),
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e}; pubwarden (resubscribe) log:\n{}", log_tail(&resub)));
    // ... and hears what is published after the switch.
    let marker = "marker-after-the-switch";
    let mut p = resub.connect();
    p.send(&encode(&["PUBLISH", CHANNEL, marker]));
    let reply = p.read_one(secs(5));
    assert!(
        reply.starts_with(b":") && reply != b":0\r\n",
        "PUBLISH of the marker on the new master: {}",
        text(&reply)
    );
    let hear_by = Instant::now() + secs(10);
    let mut heard = 0usize;
    loop {
        let f = sub_resub.read_frames(1, hear_by.saturating_duration_since(Instant::now()));
        let Some(frame) = f.frames.first() else {
            panic!(
                "the resubscribing subscriber did not hear the marker ({:?} after {heard} \
                 messages, partial {}); pubwarden log:\n{}",
                f.stop,
                text(&f.partial),
                log_tail(&resub)
            );
        };
        match message_payload(frame) {
            Ok(payload) if payload == marker => break,
            Ok(_) => heard += 1,
            Err(other) => panic!(
                "the resubscribing subscriber saw a frame that is not a message on {CHANNEL} \
                 (the move to the new master must be invisible): {other}"
            ),
        }
    }
    let (acked, failed) = publisher.finish();
    // Whatever is still buffered is messages too.
    let (rest, stop) = sub_resub.read_until_idle(millis(300), secs(5));
    assert_ne!(
        stop,
        Stop::Eof,
        "the resubscribing subscriber's connection was closed; log:\n{}",
        log_tail(&resub)
    );
    let mut pos = 0;
    while let Ok(Some(len)) = frame_len(&rest[pos..]) {
        if let Err(other) = message_payload(&rest[pos..pos + len]) {
            panic!("the resubscribing subscriber saw a frame that is not a message: {other}");
        }
        pos += len;
    }
    assert_eq!(pos, rest.len(), "trailing bytes: {}", text(&rest[pos..]));
    // Still a working subscriber connection.
    sub_resub.send(&encode(&["PING"]));
    assert_eq!(
        text(&sub_resub.read_one(secs(5))),
        text(b"*2\r\n$4\r\npong\r\n$0\r\n\r\n")
    );
    let resubscribes = metric(&resub, "pubwarden_resubscribes_total", &[]);
    assert!(
        resubscribes.is_some_and(|n| n >= 1.0),
        "pubwarden (resubscribe) counted no re-subscription: {resubscribes:?}"
    );
    assert!(
        acked > at_switch,
        "no publish acknowledged after the switch"
    );
    eprintln!(
        "{trigger:?}: followed in {followed_in:?}; publishes acknowledged {acked} \
         ({acked_before} before the trigger, {at_switch} by the switch), {failed} failed; \
         the resubscribing subscriber read {heard} messages before the marker"
    );
    Outcome {
        cluster,
        plain,
        resub,
        followed_in,
    }
}

/// The `pubwarden_sentinel_*` lines of a scrape.
fn sentinel_lines(metrics: &str) -> String {
    metrics
        .lines()
        .filter(|l| l.contains("pubwarden_sentinel_"))
        .collect::<Vec<_>>()
        .join("\n")
}

trait WaitStatus {
    fn wait_for_status_until(&self, path: &str, status: u16, timeout: Duration) -> bool;
}

impl WaitStatus for SentinelProxy {
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

/// Every Sentinel names the former replica as the master (a sanity check of the deployment).
fn sentinels_agree(cluster: &SentinelCluster) {
    let new = cluster.replica_port();
    wait_until(secs(10), "every Sentinel to name the new master", || {
        if cluster.all_sentinels_name(new) {
            Ok(())
        } else {
            Err(format!(
                "a Sentinel names port {:?}",
                cluster.master_port_by_sentinel()
            ))
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn the_master_is_found_through_sentinel() {
    let cluster = SentinelCluster::start();
    let proxy = cluster.start_pubwarden(&[], "");
    assert_eq!(
        port_through(&proxy),
        Ok(cluster.master_port()),
        "CONFIG GET port through pubwarden must answer the master's port; log:\n{}",
        log_tail(&proxy)
    );
    let metrics = proxy.metrics();
    let master = master_label(cluster.master_port());
    assert_eq!(
        metric_value(
            &metrics,
            "pubwarden_sentinel_master",
            &[("master_name", MASTER_NAME), ("address", &master)]
        ),
        Some(1.0),
        "the master gauge must name {master}:\n{}",
        sentinel_lines(&metrics)
    );
    let series = metrics
        .lines()
        .filter(|l| l.starts_with("pubwarden_sentinel_master{"))
        .count();
    assert_eq!(
        series,
        1,
        "one master series:\n{}",
        sentinel_lines(&metrics)
    );
    assert_eq!(
        metric_value(&metrics, "pubwarden_sentinel_failovers_total", &[]),
        Some(0.0),
        "no failover yet:\n{}",
        sentinel_lines(&metrics)
    );
    assert_eq!(proxy.http_status("/readyz"), Some(200));
    // Pub/sub through it works.
    let mut sub = subscribe(&proxy);
    let mut p = proxy.connect();
    p.send(&encode(&["PUBLISH", CHANNEL, "hello"]));
    assert_eq!(text(&p.read_one(secs(5))), text(b":1\r\n"));
    assert_eq!(
        message_payload(&sub.read_one(secs(5))),
        Ok("hello".to_string())
    );
}

#[test]
fn a_planned_failover_is_followed_under_load() {
    let out = master_change_under_load(Trigger::PlannedFailover, secs(10));
    assert!(out.followed_in <= secs(10));
    sentinels_agree(&out.cluster);
    drop(out.plain);
    drop(out.resub);
}

#[test]
fn a_killed_master_is_followed_under_load() {
    let out = master_change_under_load(Trigger::MasterKilled, secs(15));
    sentinels_agree(&out.cluster);
    for (p, name) in [(&out.plain, "plain"), (&out.resub, "resubscribe")] {
        let metrics = p.metrics();
        let took = metric_value(&metrics, "pubwarden_sentinel_last_follow_seconds", &[]);
        assert!(
            took.is_some_and(|s| s > 0.0),
            "pubwarden ({name}): last_follow_seconds must be > 0 after following a dead \
             master, got {took:?}:\n{}",
            sentinel_lines(&metrics)
        );
        assert!(
            took.is_some_and(|s| s <= out.followed_in.as_secs_f64() + 1.0),
            "pubwarden ({name}): last_follow_seconds {took:?} longer than the whole follow \
             ({:?})",
            out.followed_in
        );
    }
}

// ---------------------------------------------------------------------------------------------
// check-config.

fn check_config(body: &str) -> CliRun {
    let path = scratch_dir("sentinel-config").join("settings.yaml");
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
fn check_config_refuses_incomplete_or_contradictory_sentinel_settings() {
    // The control: complete settings are valid and printed back.
    let good = "upstream:\n  mode: sentinel\n  sentinel:\n    master_name: mymaster\n    \
                addresses: [127.0.0.1:26001, 127.0.0.1:26002, 127.0.0.1:26003]\n    \
                check_interval: 1s\n  resubscribe: true\n";
    let run = check_config(good);
    let out = run.output();
    assert_eq!(run.code, Some(0), "valid Sentinel settings refused:\n{out}");
    for want in [
        "mode: sentinel",
        "master_name: mymaster",
        "127.0.0.1:26001",
        "127.0.0.1:26003",
    ] {
        assert!(
            out.contains(want),
            "check-config output lacks `{want}`:\n{out}"
        );
    }

    assert_refused(
        "mode sentinel without master_name or addresses",
        "upstream:\n  mode: sentinel\n  sentinel:\n    check_interval: 1s\n",
        &[
            "upstream.sentinel.master_name",
            "upstream.sentinel.addresses",
        ],
    );
    assert_refused(
        "mode sentinel without a sentinel section",
        "upstream:\n  mode: sentinel\n",
        &[
            "upstream.sentinel.master_name",
            "upstream.sentinel.addresses",
        ],
    );
    assert_refused(
        "mode sentinel without addresses",
        "upstream:\n  mode: sentinel\n  sentinel:\n    master_name: mymaster\n",
        &["upstream.sentinel.addresses"],
    );
    assert_refused(
        "mode sentinel with an empty address list",
        "upstream:\n  mode: sentinel\n  sentinel:\n    master_name: mymaster\n    addresses: []\n",
        &["upstream.sentinel.addresses"],
    );
    assert_refused(
        "mode sentinel without master_name",
        "upstream:\n  mode: sentinel\n  sentinel:\n    addresses: [127.0.0.1:26001]\n",
        &["upstream.sentinel.master_name"],
    );
    assert_refused(
        "mode sentinel with an explicit upstream.address",
        "upstream:\n  mode: sentinel\n  address: 127.0.0.1:7000\n  sentinel:\n    \
         master_name: mymaster\n    addresses: [127.0.0.1:26001]\n",
        &["upstream.address"],
    );
    assert_refused(
        "upstream.sentinel without mode",
        "upstream:\n  address: 127.0.0.1:7000\n  sentinel:\n    master_name: mymaster\n    \
         addresses: [127.0.0.1:26001]\n",
        &["upstream.sentinel"],
    );
    assert_refused(
        "upstream.sentinel with mode standalone",
        "upstream:\n  mode: standalone\n  sentinel:\n    master_name: mymaster\n    \
         addresses: [127.0.0.1:26001]\n",
        &["upstream.sentinel"],
    );
    // Every mistake at once.
    assert_refused(
        "address given, master_name and addresses missing",
        "upstream:\n  mode: sentinel\n  address: 127.0.0.1:7000\n  sentinel:\n    \
         check_interval: 1s\n",
        &[
            "upstream.address",
            "upstream.sentinel.master_name",
            "upstream.sentinel.addresses",
        ],
    );
}
