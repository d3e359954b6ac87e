//! Limits that keep pubwarden bounded when clients misbehave: slow
//! subscribers, too many clients, connections that never authenticate or go
//! idle, too many subscriptions.

mod support;

use std::time::{Duration, Instant};

use support::policy::*;
use support::*;

fn start_with_settings(extra: &str) -> (RedisServer, Pubwarden) {
    let redis = RedisServer::start();
    let dir = scratch_dir("limits");
    let settings = dir.join("settings.yaml");
    write_file(&settings, extra);
    let proxy = Pubwarden::start_custom(redis.port(), Some(&settings), WaitFor::Ready, &[], &[]);
    (redis, proxy)
}

fn metric(proxy: &Pubwarden, line_prefix: &str) -> Option<f64> {
    let (_, text) = http_get(proxy.admin_addr(), "/metrics")?;
    text.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn a_subscriber_that_stops_reading_is_closed_and_others_get_everything() {
    let (_redis, proxy) = start_with_settings(
        "limits:\n  subscriber_output_hard: 1mb\n  subscriber_output_soft: 512kb\n  subscriber_output_soft_for: 1s\n",
    );
    let mut stalled = proxy.connect();
    stalled.send(&encode(&["SUBSCRIBE", "firehose"]));
    stalled
        .read_frames(1, secs(5))
        .expect_all("stalled subscribe");
    let mut reader = proxy.connect();
    reader.send(&encode(&["SUBSCRIBE", "firehose"]));
    reader
        .read_frames(1, secs(5))
        .expect_all("reader subscribe");

    // ~40 MB: far beyond what the kernel buffers of the stalled client hold.
    const N: usize = 2500;
    let payload = "x".repeat(16 * 1024);
    let expected: usize = (0..N)
        .map(|i| message("firehose", &format!("{i:05}:{payload}")).len())
        .sum();
    // The good subscriber reads on its own thread, as fast as it can.
    let reading = std::thread::spawn(move || {
        let (bytes, _) = reader.read_bytes(expected, secs(60));
        bytes
    });
    let rss_before = proxy.rss_kb();
    let mut publisher = proxy.connect();
    for i in 0..N {
        publisher.send(&encode(&[
            "PUBLISH",
            "firehose",
            &format!("{i:05}:{payload}"),
        ]));
        let reply = publisher.read_one(secs(10));
        assert!(reply.starts_with(b":"), "publish {i}: {}", text(&reply));
    }
    let got = reading.join().expect("reader thread");
    assert_eq!(got.len(), expected, "the reading subscriber lost messages");
    // In order, none missing.
    let mut at = 0;
    for i in 0..N {
        let want = message("firehose", &format!("{i:05}:{payload}"));
        assert!(got[at..].starts_with(&want), "message {i} out of place");
        at += want.len();
    }
    assert!(
        wait_metric(
            &proxy,
            "pubwarden_slow_consumer_disconnects_total",
            1.0,
            secs(10)
        ),
        "no slow-consumer disconnect was counted:\n{}",
        proxy.logs()
    );
    assert!(proxy.logs().contains("does not read its deliveries"));
    // pubwarden held at most about the hard limit for the stalled client.
    let grown_kb = proxy.rss_kb().saturating_sub(rss_before);
    assert!(grown_kb < 64 * 1024, "pubwarden grew by {grown_kb} KiB");
    drop(stalled);
}

fn wait_metric(proxy: &Pubwarden, name: &str, at_least: f64, timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if metric(proxy, name).is_some_and(|v| v >= at_least) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn max_clients_answers_like_redis() {
    let (_redis, proxy) = start_with_settings("limits:\n  max_clients: 2\n");
    let mut a = proxy.connect();
    let mut b = proxy.connect();
    expect_reply(&mut a, &["PING"], b"+PONG\r\n");
    expect_reply(&mut b, &["PING"], b"+PONG\r\n");
    let mut c = proxy.connect();
    let (bytes, closed) = c.read_until_eof(secs(5));
    assert_eq!(
        text(&bytes),
        text(b"-ERR max number of clients reached\r\n")
    );
    assert!(closed);
    drop(a);
    // A freed slot is usable again.
    let ok = (0..50).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        let mut d = proxy.connect();
        call(&mut d, &["PING"]) == b"+PONG\r\n"
    });
    assert!(ok, "no slot freed after a client left");
}

#[test]
fn connections_that_never_authenticate_are_closed() {
    let redis = RedisServer::start();
    let policy = format!(
        "users:\n  alice:\n    passwords: [{}]\n    channels: {{publish: [\"*\"], subscribe: [\"*\"]}}\n",
        yq(&hashed("pw"))
    );
    let proxy =
        start_pubwarden_with_policy(&redis, &policy, "limits:\n  auth_timeout: 500ms\n", &[]);
    let mut lurker = proxy.connect();
    let start = Instant::now();
    let (_, closed) = lurker.read_until_eof(secs(5));
    assert!(closed, "an unauthenticated connection stayed open");
    assert!(start.elapsed() >= Duration::from_millis(400));
    let mut good = proxy.connect();
    expect_reply(&mut good, &["AUTH", "alice", "pw"], OK);
    std::thread::sleep(Duration::from_millis(800));
    expect_reply(&mut good, &["PING"], b"+PONG\r\n");
}

#[test]
fn idle_connections_are_closed_but_subscribers_are_not() {
    let (_redis, proxy) = start_with_settings("limits:\n  idle_timeout: 500ms\n");
    let mut idle = proxy.connect();
    expect_reply(&mut idle, &["PING"], b"+PONG\r\n");
    let mut sub = proxy.connect();
    sub.send(&encode(&["SUBSCRIBE", "quiet"]));
    sub.read_frames(1, secs(5)).expect_all("subscribe");
    let (_, closed) = idle.read_until_eof(secs(5));
    assert!(closed, "an idle connection stayed open");
    std::thread::sleep(Duration::from_millis(700));
    let mut publisher = proxy.connect();
    expect_reply(
        &mut publisher,
        &["PUBLISH", "quiet", "still here"],
        b":1\r\n",
    );
    assert_eq!(
        text(&sub.read_one(secs(5))),
        text(&message("quiet", "still here"))
    );
}

#[test]
fn subscriptions_per_connection_are_capped() {
    let (_redis, proxy) = start_with_settings("limits:\n  max_subscriptions: 2\n");
    let mut c = proxy.connect();
    c.send(&encode(&["SUBSCRIBE", "a", "b"]));
    c.read_frames(2, secs(5)).expect_all("two subscriptions");
    c.send(&encode(&["PSUBSCRIBE", "c*"]));
    let reply = c.read_one(secs(5));
    assert!(
        text(&reply).contains("at most 2 subscriptions per connection"),
        "{}",
        text(&reply)
    );
    // Nothing of the refused command was subscribed.
    c.send(&encode(&["PUNSUBSCRIBE"]));
    assert_eq!(
        text(&c.read_one(secs(5))),
        text(b"*3\r\n$12\r\npunsubscribe\r\n$-1\r\n:2\r\n")
    );
}

#[test]
fn a_dead_redis_is_not_hammered_by_every_client() {
    let dead = free_port();
    let proxy = Pubwarden::start_with(dead, None, WaitFor::Healthy);
    for i in 0..20 {
        let mut c = proxy.connect();
        c.send(&encode(&["PING"]));
        let (bytes, _) = c.read_until_eof(secs(5));
        assert!(
            text(&bytes).starts_with("-ERR pubwarden: upstream Redis at"),
            "client {i}: {}",
            text(&bytes)
        );
    }
    // Each refused connect was retried at most twice, and once the breaker
    // opened, clients were answered without a connect at all.
    let refused = metric(
        &proxy,
        "pubwarden_upstream_errors_total{kind=\"connect_refused\"}",
    )
    .unwrap_or(0.0);
    assert!(refused < 20.0, "every client hit the dead Redis: {refused}");
}
