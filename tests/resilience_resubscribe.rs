//! When Redis restarts under a subscriber: by default the client's connection
//! is closed (what it would see without pubwarden); with `resubscribe` the
//! subscriber is reconnected and subscribed again, and only sees a gap.

mod support;

use std::time::Duration;

use support::policy::*;
use support::*;

fn start(extra: &str) -> (RedisServer, Pubwarden) {
    let redis = RedisServer::start();
    let settings = scratch_dir("resub").join("settings.yaml");
    write_file(&settings, extra);
    let proxy = Pubwarden::start_custom(redis.port(), Some(&settings), WaitFor::Ready, &[], &[]);
    (redis, proxy)
}

fn publish_until_heard(proxy: &Pubwarden, channel: &str, payload: &str) {
    // The restarted Redis needs a moment, and the subscriber its new connection.
    for _ in 0..100 {
        if let Ok(mut p) = RawConn::try_connect(proxy.addr()) {
            p.send(&encode(&["PUBLISH", channel, payload]));
            if p.read_one(secs(2)) == b":1\r\n" {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "no subscriber heard {payload} on {channel}:\n{}",
        proxy.logs()
    );
}

#[test]
fn subscribers_are_subscribed_again_after_redis_restarts() {
    let (mut redis, proxy) = start("upstream:\n  resubscribe: true\n");
    let mut resp2 = proxy.connect();
    resp2.send(&encode(&["SUBSCRIBE", "news", "sport"]));
    resp2.read_frames(2, secs(5)).expect_all("subscribe");
    resp2.send(&encode(&["PSUBSCRIBE", "alerts.*"]));
    resp2.read_frames(1, secs(5)).expect_all("psubscribe");
    let mut resp3 = proxy.connect();
    resp3.send(&encode(&["HELLO", "3"]));
    resp3.read_frames(1, secs(5)).expect_all("hello");
    resp3.send(&encode(&["SUBSCRIBE", "news"]));
    resp3.read_frames(1, secs(5)).expect_all("subscribe resp3");

    redis.restart();

    publish_until_heard(&proxy, "sport", "after restart");
    // The client saw no confirmation frames, only messages.
    assert_eq!(
        text(&resp2.read_one(secs(5))),
        text(&message("sport", "after restart"))
    );
    let mut p = proxy.connect();
    expect_reply(&mut p, &["PUBLISH", "alerts.fire", "hot"], b":1\r\n");
    assert_eq!(
        text(&resp2.read_one(secs(5))),
        text(&encode(&["pmessage", "alerts.*", "alerts.fire", "hot"]))
    );
    // Each connection re-subscribes on its own: wait until Redis has both.
    let both = (0..100).any(|_| {
        let r = call(&mut p, &["PUBSUB", "NUMSUB", "news"]);
        if r.ends_with(b":2\r\n") {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
        false
    });
    assert!(
        both,
        "the second subscriber was not subscribed again:\n{}",
        proxy.logs()
    );
    expect_reply(&mut p, &["PUBLISH", "news", "n"], b":2\r\n");
    assert_eq!(text(&resp2.read_one(secs(5))), text(&message("news", "n")));
    assert_eq!(
        text(&resp3.read_one(secs(5))),
        text(b">3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$1\r\nn\r\n")
    );
    // Still in RESP3 on the new connection.
    resp3.send(&encode(&["PING"]));
    assert_eq!(text(&resp3.read_one(secs(5))), text(b"+PONG\r\n"));
    let (_, metrics) = http_get(proxy.admin_addr(), "/metrics").expect("scrape");
    // Two connections, each re-subscribed at least once (a restarting server
    // may drop a first attempt, which is then retried and counted again).
    let events = support::prom::sample(&metrics, "pubwarden_resubscribes_total", "");
    assert!(events.is_some_and(|n| n >= 2.0), "{metrics}");
}

#[test]
fn by_default_the_client_sees_its_connection_close() {
    let (mut redis, proxy) = start("");
    let mut sub = proxy.connect();
    sub.send(&encode(&["SUBSCRIBE", "news"]));
    sub.read_frames(1, secs(5)).expect_all("subscribe");
    redis.kill();
    let (_, closed) = sub.read_until_eof(secs(5));
    assert!(closed, "the subscriber's connection was not closed");
}

#[test]
fn resubscribe_can_be_chosen_per_channel_pattern() {
    let (mut redis, proxy) = start("upstream:\n  resubscribe_channels: [\"keep.*\"]\n");
    let mut kept = proxy.connect();
    kept.send(&encode(&["SUBSCRIBE", "keep.a"]));
    kept.read_frames(1, secs(5)).expect_all("subscribe keep.a");
    let mut mixed = proxy.connect();
    mixed.send(&encode(&["SUBSCRIBE", "keep.b", "other.b"]));
    mixed.read_frames(2, secs(5)).expect_all("subscribe mixed");

    redis.restart();

    publish_until_heard(&proxy, "keep.a", "still here");
    assert_eq!(
        text(&kept.read_one(secs(5))),
        text(&message("keep.a", "still here"))
    );
    // Not every subscription opted in: closed, as without pubwarden.
    let (_, closed) = mixed.read_until_eof(secs(5));
    assert!(
        closed,
        "a connection with a channel outside the list was kept"
    );
}
