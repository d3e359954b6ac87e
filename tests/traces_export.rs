//! OpenTelemetry trace export, checked with a real OTLP receiver in the test process: span names,
//! kinds, attributes and links of publishes and deliveries, over gRPC and HTTP/protobuf, the
//! standard `OTEL_*` variables, and sampling at ratio 1 and 0.

mod support;

use std::path::PathBuf;

use support::otlp::{CLIENT, CONSUMER, PRODUCER, Receiver, RxSpan, Transport, hex};
use support::{Pubwarden, RawConn, RedisServer, WaitFor, encode, scratch_dir, secs};

fn settings(extra: &str) -> PathBuf {
    let dir = scratch_dir("traces");
    let path = dir.join("pubwarden.yaml");
    std::fs::write(&path, extra).expect("write settings");
    path
}

fn tracing_yaml(endpoint: &str, protocol: &str, ratio: &str, more: &str) -> String {
    format!(
        "telemetry:\n  tracing:\n    enabled: true\n    endpoint: {endpoint}\n    protocol: {protocol}\n    sampling_ratio: {ratio}\n    service_name: edge-a\n{more}"
    )
}

fn subscribe(pw: &Pubwarden, line: &str, confirmations: usize) -> RawConn {
    let mut c = pw.connect();
    c.send_line(line);
    c.read_frames(confirmations, secs(5))
        .expect_all("subscribe confirmations");
    c
}

fn by_name<'a>(spans: &'a [RxSpan], name: &str) -> Vec<&'a RxSpan> {
    spans.iter().filter(|s| s.name == name).collect()
}

#[test]
fn publish_and_delivery_spans_over_grpc_link_up() {
    let redis = RedisServer::start();
    let rx = Receiver::start(Transport::Grpc);
    let cfg = settings(&tracing_yaml(
        &rx.endpoint(),
        "grpc",
        "1.0",
        "    control_commands: true\n",
    ));
    let pw = Pubwarden::start_with(redis.port(), Some(&cfg), WaitFor::Ready);
    let mut sub = subscribe(&pw, "SUBSCRIBE orders.1", 1);
    let mut psub = subscribe(&pw, "PSUBSCRIBE orders.*", 1);
    let mut publisher = pw.connect();
    publisher.send(&encode(&[&b"PUBLISH"[..], b"orders.1", b"hello"]));
    assert_eq!(publisher.read_one(secs(5)), b":2\r\n");
    sub.read_frames(1, secs(5)).expect_all("message");
    psub.read_frames(1, secs(5)).expect_all("pmessage");
    // An upstream error on a control command.
    publisher.send_line("SELECT 99");
    let err = publisher.read_one(secs(5));
    assert!(err.starts_with(b"-ERR"), "{err:?}");

    assert!(
        rx.wait_until(secs(10), |s| by_name(s, "publish").len() == 1
            && by_name(s, "message").len() == 1
            && by_name(s, "pmessage").len() == 1
            && !by_name(s, "select").is_empty()),
        "spans received: {:#?}",
        rx.spans()
    );
    let spans = rx.spans();
    // Both deliveries were linked to the publish this pubwarden saw: their
    // publish-to-delivery latency is recorded.
    let metrics = support::prom::scrape(pw.admin_addr());
    assert_eq!(
        support::prom::sample(
            &metrics,
            "pubwarden_publish_delivery_latency_seconds_count",
            ""
        ),
        Some(2.0),
        "{metrics}"
    );
    let publish = by_name(&spans, "publish")[0];
    assert_eq!(publish.kind, PRODUCER);
    assert_eq!(publish.service, "edge-a");
    for (k, v) in [
        ("messaging.system", "redis"),
        ("messaging.destination.name", "orders.1"),
        ("messaging.operation.name", "publish"),
        ("messaging.operation.type", "send"),
        ("messaging.message.body.size", "5"),
        ("server.address", "127.0.0.1"),
        ("server.port", &redis.port().to_string()),
        ("pubwarden.receivers", "2"),
    ] {
        assert_eq!(publish.attr(k), Some(v), "{k} of {publish:#?}");
    }
    assert!(publish.attr("error.type").is_none());
    assert!(publish.end_ns >= publish.start_ns && publish.start_ns > 0);

    let message = by_name(&spans, "message")[0];
    let pmessage = by_name(&spans, "pmessage")[0];
    for d in [message, pmessage] {
        assert_eq!(d.kind, CONSUMER);
        assert_eq!(d.attr("messaging.destination.name"), Some("orders.1"));
        assert_eq!(d.attr("messaging.operation.type"), Some("receive"));
        assert_eq!(d.attr("messaging.message.body.size"), Some("5"));
        // Same pubwarden saw the publish: same trace, child of it, and linked to it.
        assert_eq!(hex(&d.trace_id), hex(&publish.trace_id));
        assert_eq!(hex(&d.parent_span_id), hex(&publish.span_id));
        assert_eq!(
            d.links,
            vec![(publish.trace_id.clone(), publish.span_id.clone())]
        );
        assert!(d.end_ns >= d.start_ns);
    }
    assert_eq!(
        pmessage.attr("messaging.destination.subscription.name"),
        Some("orders.*")
    );
    assert!(
        message
            .attr("messaging.destination.subscription.name")
            .is_none()
    );

    let select = by_name(&spans, "select")[0];
    assert_eq!(select.kind, CLIENT);
    assert_eq!(select.attr("db.system.name"), Some("redis"));
    assert_eq!(select.attr("db.operation.name"), Some("SELECT"));
    assert_eq!(select.attr("error.type"), Some("ERR"));
    assert_eq!(select.status, 2);
    let subscribes = by_name(&spans, "subscribe");
    assert_eq!(subscribes.len(), 1, "{spans:#?}");
}

#[test]
fn http_protobuf_export_from_the_standard_variables_alone() {
    let redis = RedisServer::start();
    let rx = Receiver::start(Transport::Http);
    let endpoint = rx.endpoint();
    // No telemetry section at all: the endpoint variable alone turns export on.
    let pw = Pubwarden::start_custom(
        redis.port(),
        None,
        WaitFor::Ready,
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "1.0"),
            ("OTEL_SERVICE_NAME", "sidecar-7"),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "deployment.environment=test,team=pubsub",
            ),
        ],
    );
    let mut sub = subscribe(&pw, "SSUBSCRIBE shard.1", 1);
    let mut publisher = pw.connect();
    publisher.send(&encode(&[&b"SPUBLISH"[..], b"shard.1", b"x"]));
    assert_eq!(publisher.read_one(secs(5)), b":1\r\n");
    sub.read_frames(1, secs(5)).expect_all("smessage");
    assert!(
        rx.wait_until(secs(10), |s| s.iter().any(|s| s.name == "spublish")
            && s.iter().any(|s| s.name == "smessage")),
        "spans: {:#?}; bad requests: {:?}",
        rx.spans(),
        rx.bad_requests.lock().unwrap()
    );
    let spans = rx.spans();
    let publish = by_name(&spans, "spublish")[0];
    assert_eq!(publish.kind, PRODUCER);
    assert_eq!(publish.attr("messaging.operation.name"), Some("spublish"));
    assert_eq!(publish.service, "sidecar-7");
    assert_eq!(
        publish
            .resource
            .get("deployment.environment")
            .map(String::as_str),
        Some("test")
    );
    assert_eq!(
        publish.resource.get("team").map(String::as_str),
        Some("pubsub")
    );
    let delivery = by_name(&spans, "smessage")[0];
    assert_eq!(delivery.parent_span_id, publish.span_id);
    assert!(rx.bad_requests.lock().unwrap().is_empty());
}

#[test]
fn ratio_zero_exports_nothing_and_ratio_one_everything() {
    let redis = RedisServer::start();
    for (ratio, expect_all) in [("0", false), ("1", true)] {
        let rx = Receiver::start(Transport::Grpc);
        let cfg = settings(&tracing_yaml(
            &rx.endpoint(),
            "grpc",
            ratio,
            "    control_commands: true\n",
        ));
        let mut pw = Pubwarden::start_with(redis.port(), Some(&cfg), WaitFor::Ready);
        let mut sub = subscribe(&pw, "SUBSCRIBE r", 1);
        let mut publisher = pw.connect();
        let n = 50;
        let mut batch = Vec::new();
        for i in 0..n {
            batch.extend(encode(&[&b"PUBLISH"[..], b"r", format!("m{i}").as_bytes()]));
        }
        publisher.send(&batch);
        publisher
            .read_frames(n, secs(5))
            .expect_all("publish replies");
        sub.read_frames(n, secs(5)).expect_all("deliveries");
        drop(sub);
        drop(publisher);
        // SIGTERM flushes the export queue before exiting.
        pw.sigterm();
        assert!(pw.wait_exit(secs(15)).is_some(), "pubwarden did not exit");
        let spans = rx.spans();
        if expect_all {
            assert_eq!(by_name(&spans, "publish").len(), n, "ratio 1");
            assert_eq!(by_name(&spans, "message").len(), n, "ratio 1");
            assert_eq!(by_name(&spans, "subscribe").len(), 1, "ratio 1");
        } else {
            assert!(spans.is_empty(), "ratio 0 exported {spans:#?}");
        }
    }
}
