//! The trace envelope between two pubwarden instances (a publisher's and a subscriber's): the
//! subscriber gets every payload byte for byte, binary ones included, while the two instances'
//! spans join one trace; payloads without a valid envelope pass unchanged. And an exporter whose
//! collector is dead costs no message.

mod support;

use std::path::PathBuf;

use support::otlp::{CONSUMER, PRODUCER, Receiver, Transport, hex};
use support::{Pubwarden, RawConn, RedisServer, WaitFor, decode, encode, scratch_dir, secs};

fn settings(text: &str) -> PathBuf {
    let path = scratch_dir("traces-envelope").join("pubwarden.yaml");
    std::fs::write(&path, text).expect("write settings");
    path
}

fn envelope_yaml(endpoint: &str, service: &str, ratio: &str) -> String {
    format!(
        "telemetry:\n  tracing:\n    enabled: true\n    endpoint: {endpoint}\n    sampling_ratio: {ratio}\n    service_name: {service}\n    envelope: [\"env.*\"]\n"
    )
}

/// The payload of a `message` delivery frame.
fn payload(frame: &[u8]) -> Vec<u8> {
    let v = decode(frame).expect("a RESP frame");
    let items = v.items().expect("an array");
    items[2].bytes().expect("a bulk payload").to_vec()
}

const PAYLOADS: &[&[u8]] = &[
    b"plain text",
    b"",
    b"\r\n$5\r\nfake\r\n*3\r\n",
    b"\0\0\0\xff\xfe\xfd invalid utf-8 \xc3\x28",
    // Looks like an envelope to a careless parser: passes unchanged.
    b"\xffPWE1 but much too short",
];

#[test]
fn envelope_is_invisible_to_clients_and_links_two_instances() {
    let redis = RedisServer::start();
    let rx = Receiver::start(Transport::Grpc);
    let a = Pubwarden::start_with(
        redis.port(),
        Some(&settings(&envelope_yaml(
            &rx.endpoint(),
            "publisher-side",
            "1",
        ))),
        WaitFor::Ready,
    );
    let b = Pubwarden::start_with(
        redis.port(),
        Some(&settings(&envelope_yaml(
            &rx.endpoint(),
            "subscriber-side",
            "1",
        ))),
        WaitFor::Ready,
    );
    let mut sub = b.connect();
    sub.send_line("SUBSCRIBE env.orders plain.orders");
    sub.read_frames(2, secs(5)).expect_all("confirmations");
    // A subscriber straight on Redis shows what travels between the instances.
    let mut raw = RawConn::connect(redis.addr());
    raw.send_line("SUBSCRIBE env.orders");
    raw.read_frames(1, secs(5)).expect_all("raw confirmation");

    let mut publisher = a.connect();
    for p in PAYLOADS {
        publisher.send(&encode(&[&b"PUBLISH"[..], b"env.orders", p]));
        assert_eq!(publisher.read_one(secs(5)), b":2\r\n");
        publisher.send(&encode(&[&b"PUBLISH"[..], b"plain.orders", p]));
        assert_eq!(publisher.read_one(secs(5)), b":1\r\n");
    }
    let got = sub
        .read_frames(PAYLOADS.len() * 2, secs(5))
        .expect_all("deliveries");
    for (i, p) in PAYLOADS.iter().enumerate() {
        // Byte for byte, the whole frame, as Redis would have sent it without pubwarden.
        for (j, channel) in [&b"env.orders"[..], b"plain.orders"].iter().enumerate() {
            let expected = encode(&[&b"message"[..], channel, p]);
            assert_eq!(
                support::escape(&got[i * 2 + j]),
                support::escape(&expected),
                "delivery of payload {i} on {}",
                String::from_utf8_lossy(channel)
            );
        }
    }
    let wrapped = raw
        .read_frames(PAYLOADS.len(), secs(5))
        .expect_all("raw deliveries");
    for (frame, p) in wrapped.iter().zip(PAYLOADS) {
        let on_the_wire = payload(frame);
        assert!(
            on_the_wire.starts_with(b"\xffPWE1"),
            "not wrapped: {frame:?}"
        );
        assert!(on_the_wire.ends_with(p) && on_the_wire.len() >= 40 + p.len());
    }

    let n = PAYLOADS.len();
    assert!(
        rx.wait_until(secs(10), |s| {
            s.iter()
                .filter(|s| s.service == "subscriber-side" && s.name == "message")
                .count()
                == 2 * n
                && s.iter()
                    .filter(|s| s.service == "publisher-side" && s.name == "publish")
                    .count()
                    == 2 * n
        }),
        "spans: {:#?}",
        rx.spans()
    );
    let spans = rx.spans();
    let publishes: Vec<_> = spans
        .iter()
        .filter(|s| s.service == "publisher-side" && s.name == "publish")
        .collect();
    let deliveries: Vec<_> = spans
        .iter()
        .filter(|s| s.service == "subscriber-side" && s.name == "message")
        .collect();
    let enveloped: Vec<_> = deliveries
        .iter()
        .filter(|d| d.attr("messaging.destination.name") == Some("env.orders"))
        .collect();
    assert_eq!(enveloped.len(), n);
    for d in &enveloped {
        assert_eq!(d.kind, CONSUMER);
        assert_eq!(d.attr("pubwarden.envelope"), Some("true"));
        let p = publishes
            .iter()
            .find(|p| p.span_id == d.parent_span_id)
            .unwrap_or_else(|| panic!("no publish span is the parent of {d:#?}"));
        assert_eq!(p.kind, PRODUCER);
        assert_eq!(hex(&p.trace_id), hex(&d.trace_id));
        assert_eq!(d.links, vec![(p.trace_id.clone(), p.span_id.clone())]);
        assert_eq!(p.attr("pubwarden.envelope"), Some("true"));
        // Body size is the subscriber's payload, not the envelope's.
        assert_eq!(
            d.attr("messaging.message.body.size"),
            p.attr("messaging.message.body.size")
        );
    }
    // Channels without the envelope: B did not see their publishes, so its spans start traces.
    for d in deliveries
        .iter()
        .filter(|d| d.attr("messaging.destination.name") == Some("plain.orders"))
    {
        assert!(d.parent_span_id.is_empty() && d.links.is_empty(), "{d:#?}");
    }
    let metrics = support::prom::scrape(b.admin_addr());
    let count = support::prom::sample(&metrics, "pubwarden_envelope_latency_seconds_count", "");
    assert_eq!(count, Some(n as f64), "{metrics}");
}

#[test]
fn unsampled_publishes_still_carry_an_envelope_and_deliveries_follow_them() {
    let redis = RedisServer::start();
    let rx = Receiver::start(Transport::Grpc);
    let a = Pubwarden::start_with(
        redis.port(),
        Some(&settings(&envelope_yaml(
            &rx.endpoint(),
            "publisher-side",
            "0",
        ))),
        WaitFor::Ready,
    );
    // The subscriber's side would sample everything on its own.
    let mut b = Pubwarden::start_with(
        redis.port(),
        Some(&settings(&envelope_yaml(
            &rx.endpoint(),
            "subscriber-side",
            "1",
        ))),
        WaitFor::Ready,
    );
    let mut sub = b.connect();
    sub.send_line("SUBSCRIBE env.x");
    sub.read_frames(1, secs(5)).expect_all("confirmation");
    let mut publisher = a.connect();
    publisher.send(&encode(&[&b"PUBLISH"[..], b"env.x", b"\x00payload\r\n"]));
    assert_eq!(publisher.read_one(secs(5)), b":1\r\n");
    let got = sub.read_one(secs(5));
    assert_eq!(
        got,
        encode(&[&b"message"[..], b"env.x", b"\x00payload\r\n"])
    );
    // A subscriber would hold the drain open until its deadline.
    drop(sub);
    b.sigterm();
    assert!(b.wait_exit(secs(15)).is_some());
    assert!(
        rx.spans().is_empty(),
        "the publish was not sampled, so neither is its delivery: {:#?}",
        rx.spans()
    );
}

#[test]
fn dead_collector_slows_nothing_and_loses_no_message() {
    let redis = RedisServer::start();
    // Nothing listens there: every export fails.
    let dead = format!("http://127.0.0.1:{}", support::free_port());
    let text = format!(
        "telemetry:\n  tracing:\n    enabled: true\n    endpoint: {dead}\n    sampling_ratio: 1\n    timeout: 200ms\n    max_queue_size: 64\n    envelope: [\"env.*\"]\n"
    );
    let pw = Pubwarden::start_with(redis.port(), Some(&settings(&text)), WaitFor::Ready);
    let mut sub = pw.connect();
    sub.send_line("SUBSCRIBE env.load");
    sub.read_frames(1, secs(5)).expect_all("confirmation");
    let mut publisher = pw.connect();
    let n = 5000;
    let mut batch = Vec::new();
    for i in 0..n {
        batch.extend(encode(&[
            &b"PUBLISH"[..],
            b"env.load",
            format!("m{i}").as_bytes(),
        ]));
    }
    let started = std::time::Instant::now();
    publisher.send(&batch);
    let replies = publisher
        .read_frames(n, secs(30))
        .expect_all("publish replies");
    assert!(replies.iter().all(|r| r == b":1\r\n"));
    let got = sub.read_frames(n, secs(30)).expect_all("every delivery");
    for (i, f) in got.iter().enumerate() {
        assert_eq!(payload(f), format!("m{i}").as_bytes());
    }
    // Bounded, not a performance claim: thousands of messages through a loopback relay take
    // well under a second; an exporter that blocked on its 200 ms timeout would take minutes.
    assert!(started.elapsed() < secs(20), "took {:?}", started.elapsed());
    let metrics = support::prom::scrape(pw.admin_addr());
    let dropped: f64 = ["queue_full", "export_failed"]
        .iter()
        .filter_map(|r| {
            support::prom::sample(
                &metrics,
                "pubwarden_trace_spans_dropped_total",
                &format!("reason=\"{r}\""),
            )
        })
        .sum();
    assert!(dropped > 0.0, "no drop counted: {metrics}");
}
