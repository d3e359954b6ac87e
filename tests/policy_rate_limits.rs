//! Rate limits in real time. Only loose, rate-derived bounds are checked here (exact GCRA
//! behaviour belongs to fake-clock unit tests); what must hold exactly is that every PUBLISH
//! pubwarden accepted reached the subscribers, once and in order, and no rejected one did.

mod support;

use std::time::{Duration, Instant};

use support::policy::*;
use support::*;

const OPEN_DEFAULT: &str = r#"
users:
  default:
    nopass: true
    channels:
      publish: ["*"]
      subscribe: ["*"]
"#;

/// How one PUBLISH ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Accepted(i64),
    Rejected(String),
}

fn classify(frame: &[u8], rule: &str) -> Outcome {
    let text = String::from_utf8_lossy(frame).into_owned();
    if let Some(n) = text
        .strip_prefix(':')
        .and_then(|t| t.strip_suffix("\r\n"))
        .and_then(|t| t.parse().ok())
    {
        return Outcome::Accepted(n);
    }
    assert!(
        text.starts_with("-RATELIMIT ") && text.ends_with("\r\n"),
        "a PUBLISH was answered neither :N nor -RATELIMIT: {}",
        escape(frame)
    );
    assert!(
        text.contains(rule),
        "the -RATELIMIT error does not name the rule `{rule}`: {}",
        escape(frame)
    );
    Outcome::Rejected(text)
}

/// A subscriber connection (`SUBSCRIBE channel`, confirmation checked).
fn subscriber(addr: std::net::SocketAddr, channel: &str) -> RawConn {
    let mut c = RawConn::connect(addr);
    let want = format!(
        "*3\r\n$9\r\nsubscribe\r\n${}\r\n{channel}\r\n:1\r\n",
        channel.len()
    )
    .into_bytes();
    let got = call(&mut c, &["SUBSCRIBE", channel]);
    assert_eq!(text(&got), text(&want), "SUBSCRIBE {channel}");
    c
}

/// Asserts that `sub` receives exactly `payloads` on `channel`, in order, and nothing more.
fn assert_receives_exactly(sub: &mut RawConn, who: &str, channel: &str, payloads: &[String]) {
    let got = sub.read_frames(payloads.len(), secs(15));
    let received: Vec<String> = got
        .frames
        .iter()
        .map(|f| match decode(f) {
            Ok(Value::Array(items))
                if items.len() == 3
                    && items[0].bytes() == Some(b"message")
                    && items[1].bytes() == Some(channel.as_bytes()) =>
            {
                String::from_utf8_lossy(items[2].bytes().unwrap_or_default()).into_owned()
            }
            _ => format!("<not a message on {channel}: {}>", escape(f)),
        })
        .collect();
    assert_eq!(
        received.len(),
        payloads.len(),
        "{who}: wanted the {} accepted messages, got {} ({:?}); received {received:?}",
        payloads.len(),
        received.len(),
        got.stop
    );
    let first_diff = received.iter().zip(payloads).position(|(a, b)| a != b);
    assert!(
        first_diff.is_none(),
        "{who}: deliveries differ from the accepted publishes at #{:?}:\n received {received:?}\n accepted {payloads:?}",
        first_diff
    );
    let (extra, _) = sub.read_until_idle(millis(300), secs(3));
    assert!(
        extra.is_empty(),
        "{who}: received more than was accepted: {}",
        escape_short(&extra, 300)
    );
}

/// Pipelines `n` PUBLISHes to `channel` in one write; returns each outcome with its payload,
/// and how long it took until the last reply.
fn publish_burst(
    c: &mut RawConn,
    channel: &str,
    n: usize,
    rule: &str,
) -> (Vec<(String, Outcome)>, Duration) {
    publish_burst_from(c, channel, n, rule, 0)
}

/// [`publish_burst`] with payloads numbered from `first`.
fn publish_burst_from(
    c: &mut RawConn,
    channel: &str,
    n: usize,
    rule: &str,
    first: usize,
) -> (Vec<(String, Outcome)>, Duration) {
    let payloads: Vec<String> = (first..first + n).map(|i| format!("tick-{i:04}")).collect();
    let mut bytes = Vec::new();
    for p in &payloads {
        bytes.extend_from_slice(&encode(&["PUBLISH", channel, p]));
    }
    let start = Instant::now();
    c.send(&bytes);
    let frames = c
        .read_frames(n, secs(30))
        .expect_all("replies to the pipelined PUBLISHes");
    let elapsed = start.elapsed();
    let outcomes = payloads
        .into_iter()
        .zip(frames.iter().map(|f| classify(f, rule)))
        .collect();
    (outcomes, elapsed)
}

#[test]
fn reject_rule_rejects_some_and_loses_no_accepted_message() {
    let policy = format!(
        "{OPEN_DEFAULT}rate_limits:
  - name: ticks-reject
    channels: [\"ticks.*\"]
    messages_per_second: 50
    burst: 10
    key: channel
    on_limit: reject
"
    );
    let (redis, proxy) = start_with_policy(&policy, "");
    // One subscriber straight on Redis (what really got published) and one through pubwarden.
    let mut direct_sub = subscriber(redis.addr(), "ticks.a");
    let mut proxy_sub = subscriber(proxy.addr(), "ticks.a");
    let mut publ = proxy.connect();

    let (outcomes, elapsed) = publish_burst(&mut publ, "ticks.a", 300, "ticks-reject");
    let accepted: Vec<String> = outcomes
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Accepted(_)))
        .map(|(p, _)| p.clone())
        .collect();
    let rejected = outcomes.len() - accepted.len();
    eprintln!(
        "reject rule: {} accepted, {rejected} rejected in {elapsed:?}",
        accepted.len()
    );
    let counts: Vec<i64> = outcomes
        .iter()
        .filter_map(|(_, o)| match o {
            Outcome::Accepted(n) => Some(*n),
            Outcome::Rejected(_) => None,
        })
        .collect();
    assert!(
        counts.iter().all(|&n| n == 2),
        "accepted PUBLISHes must reach both subscribers (:2): {counts:?}"
    );
    assert!(
        rejected > 0,
        "300 PUBLISHes in {elapsed:?} against 50/s burst 10: none was rejected"
    );
    assert!(
        accepted.len() >= 10,
        "the burst of 10 should pass at once; only {} accepted",
        accepted.len()
    );
    let ceiling = 10.0 + 50.0 * elapsed.as_secs_f64() + 2.0;
    assert!(
        (accepted.len() as f64) <= ceiling,
        "{} accepted in {elapsed:?}: more than burst 10 + 50/s allows ({ceiling:.1})",
        accepted.len()
    );

    // Then paced, about 1000/s for ~300 ms once the budget refilled: past the burst, about
    // 50/s get through, interleaved with rejections.
    std::thread::sleep(millis(400));
    let start = Instant::now();
    let mut paced = Vec::new();
    for batch in 0..30 {
        let (outcomes, _) =
            publish_burst_from(&mut publ, "ticks.a", 10, "ticks-reject", 1000 + batch * 10);
        paced.extend(outcomes);
        std::thread::sleep(millis(10));
    }
    let elapsed = start.elapsed();
    let paced_accepted: Vec<String> = paced
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Accepted(_)))
        .map(|(p, _)| p.clone())
        .collect();
    eprintln!(
        "reject rule, paced: {} of {} accepted in {elapsed:?}",
        paced_accepted.len(),
        paced.len()
    );
    let secs_f = elapsed.as_secs_f64();
    let ceiling = 10.0 + 50.0 * secs_f + 2.0;
    let floor = 50.0 * secs_f * 0.6;
    assert!(
        (paced_accepted.len() as f64) <= ceiling && (paced_accepted.len() as f64) >= floor,
        "paced at ~1000/s for {elapsed:?} against 50/s burst 10: {} accepted, outside \
         [{floor:.1}, {ceiling:.1}]",
        paced_accepted.len()
    );
    assert!(
        paced_accepted.len() < paced.len(),
        "paced above the rate: nothing was rejected"
    );
    let mut all_accepted = accepted.clone();
    all_accepted.extend(paced_accepted);
    assert_receives_exactly(
        &mut direct_sub,
        "subscriber on Redis",
        "ticks.a",
        &all_accepted,
    );
    assert_receives_exactly(
        &mut proxy_sub,
        "subscriber via pubwarden",
        "ticks.a",
        &all_accepted,
    );

    // Channels outside the rule are not limited.
    let (others, _) = publish_burst(&mut publ, "other.a", 100, "ticks-reject");
    let limited: Vec<&Outcome> = others
        .iter()
        .map(|(_, o)| o)
        .filter(|o| matches!(o, Outcome::Rejected(_)))
        .collect();
    assert!(
        limited.is_empty(),
        "PUBLISH other.a is not covered by the rule but was limited: {limited:?}"
    );
}

#[test]
fn delay_rule_holds_then_rejects_beyond_max_delay() {
    let policy = format!(
        "{OPEN_DEFAULT}rate_limits:
  - name: slow-delay
    channels: [\"slow.*\"]
    messages_per_second: 100
    burst: 5
    key: channel
    on_limit: delay
    max_delay: 1s
  - name: tiny-delay
    channels: [\"tiny.*\"]
    messages_per_second: 2
    burst: 1
    key: channel
    on_limit: delay
    max_delay: 100ms
"
    );
    let (redis, proxy) = start_with_policy(&policy, "");

    // 40 at once against 100/s burst 5: each waits at most ~10 ms once read, far below
    // max_delay, so all are accepted, but the last cannot go before ~(40-5-1) x 10 ms.
    let mut slow_sub = subscriber(redis.addr(), "slow.a");
    let mut publ = proxy.connect();
    let (outcomes, elapsed) = publish_burst(&mut publ, "slow.a", 40, "slow-delay");
    eprintln!("delay rule: 40 publishes took {elapsed:?}");
    let rejected: Vec<&(String, Outcome)> = outcomes
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Rejected(_)))
        .collect();
    assert!(
        rejected.is_empty(),
        "delay rule: publishes within max_delay must all succeed; rejected {rejected:?}"
    );
    assert!(
        elapsed >= millis(250),
        "40 publishes at 100/s burst 5 took only {elapsed:?}: they were not delayed \
         (at least ~340 ms expected)"
    );
    assert!(
        elapsed <= secs(10),
        "40 publishes at 100/s took {elapsed:?}: far slower than the rate"
    );
    let all: Vec<String> = outcomes.iter().map(|(p, _)| p.clone()).collect();
    assert_receives_exactly(&mut slow_sub, "subscriber on Redis", "slow.a", &all);

    // 5 at once against 2/s burst 1, max_delay 100 ms: the first passes, the next would need
    // 500 ms each, beyond max_delay, so they are rejected (after at most ~100 ms each).
    let mut tiny_sub = subscriber(redis.addr(), "tiny.a");
    let mut publ2 = proxy.connect();
    let (outcomes, elapsed) = publish_burst(&mut publ2, "tiny.a", 5, "tiny-delay");
    eprintln!("beyond max_delay: {outcomes:?} in {elapsed:?}");
    assert!(
        matches!(outcomes[0].1, Outcome::Accepted(1)),
        "the first PUBLISH under tiny-delay should pass: {:?}",
        outcomes[0]
    );
    let rejected = outcomes
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Rejected(_)))
        .count();
    assert!(
        rejected >= 3,
        "beyond max_delay PUBLISHes must be rejected; got {outcomes:?} in {elapsed:?}"
    );
    assert!(
        elapsed < millis(1800),
        "rejections beyond max_delay (100 ms) took {elapsed:?}: held longer than max_delay"
    );
    let accepted: Vec<String> = outcomes
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Accepted(_)))
        .map(|(p, _)| p.clone())
        .collect();
    assert_receives_exactly(&mut tiny_sub, "subscriber on Redis", "tiny.a", &accepted);
}
