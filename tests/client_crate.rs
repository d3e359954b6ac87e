//! A real client library (the `redis` crate, async) through pubwarden: commands, pipelines,
//! transactions, pub/sub with the PubSub API, and RESP3 with pushes.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt as _;
use redis::{AsyncConnectionConfig, PushKind, Value};
use support::*;

const STEP: Duration = Duration::from_secs(10);

/// Awaits `fut` with a deadline so a broken proxy fails the test instead of hanging it.
async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(STEP, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {STEP:?}"))
}

fn client(front: &Front, resp3: bool) -> redis::Client {
    let url = format!(
        "redis://{}/{}",
        front.addr(),
        if resp3 { "?protocol=resp3" } else { "" }
    );
    redis::Client::open(url.as_str()).expect("redis client URL")
}

async fn conn(client: &redis::Client) -> redis::aio::MultiplexedConnection {
    within(
        "connect",
        client.get_multiplexed_async_connection_with_config(
            &AsyncConnectionConfig::new().set_response_timeout(Some(STEP)),
        ),
    )
    .await
    .expect("multiplexed connection through pubwarden")
}

async fn ordinary_commands(resp3: bool) {
    let redis = RedisServer::start();
    let front = Front::new(&redis);
    let client = client(&front, resp3);
    let mut con = conn(&client).await;
    let () = redis::cmd("SET")
        .arg("greeting")
        .arg("hello")
        .query_async(&mut con)
        .await
        .expect("SET");
    let got: String = redis::cmd("GET")
        .arg("greeting")
        .query_async(&mut con)
        .await
        .expect("GET");
    assert_eq!(got, "hello");
    let missing: Option<String> = redis::cmd("GET")
        .arg("missing")
        .query_async(&mut con)
        .await
        .expect("GET missing");
    assert_eq!(missing, None);
    let n: i64 = redis::cmd("INCRBY")
        .arg("n")
        .arg(42)
        .query_async(&mut con)
        .await
        .expect("INCRBY");
    assert_eq!(n, 42);
    let binary: Vec<u8> = b"\r\n\0\xff\xfe".to_vec();
    let () = redis::cmd("SET")
        .arg(b"bin\r\nkey".as_slice())
        .arg(&binary)
        .query_async(&mut con)
        .await
        .expect("SET binary");
    let back: Vec<u8> = redis::cmd("GET")
        .arg(b"bin\r\nkey".as_slice())
        .query_async(&mut con)
        .await
        .expect("GET binary");
    assert_eq!(back, binary);
    let _: i64 = redis::cmd("HSET")
        .arg("h")
        .arg("a")
        .arg("1")
        .arg("b")
        .arg("2")
        .query_async(&mut con)
        .await
        .expect("HSET");
    let h: HashMap<String, String> = redis::cmd("HGETALL")
        .arg("h")
        .query_async(&mut con)
        .await
        .expect("HGETALL");
    assert_eq!(h.len(), 2);
    assert_eq!(h["b"], "2");
    let err = redis::cmd("INCR")
        .arg("greeting")
        .query_async::<i64>(&mut con)
        .await
        .expect_err("INCR on a string must fail");
    assert!(
        err.to_string().contains("not an integer"),
        "error text through pubwarden: {err}"
    );
    // Many concurrent requests on the multiplexed connection.
    let mut tasks = Vec::new();
    for i in 0..200 {
        let mut c = con.clone();
        tasks.push(tokio::spawn(async move {
            let v: i64 = redis::cmd("INCR")
                .arg("concurrent")
                .query_async(&mut c)
                .await
                .expect("concurrent INCR");
            let echoed: String = redis::cmd("ECHO")
                .arg(format!("echo-{i}"))
                .query_async(&mut c)
                .await
                .expect("ECHO");
            assert_eq!(echoed, format!("echo-{i}"));
            v
        }));
    }
    let mut seen = Vec::new();
    for t in tasks {
        seen.push(within("concurrent task", t).await.expect("task"));
    }
    seen.sort_unstable();
    assert_eq!(seen, (1..=200).collect::<Vec<i64>>());
}

#[tokio::test]
async fn ordinary_commands_resp2() {
    ordinary_commands(false).await;
}

#[tokio::test]
async fn ordinary_commands_resp3() {
    ordinary_commands(true).await;
}

#[tokio::test]
async fn pipelines_and_transactions() {
    let redis = RedisServer::start();
    let front = Front::new(&redis);
    let client = client(&front, false);
    let mut con = conn(&client).await;
    let mut pipe = redis::pipe();
    for i in 0..1000 {
        pipe.cmd("SET").arg(format!("p:{i}")).arg(i).ignore();
    }
    for i in (0..1000).step_by(100) {
        pipe.cmd("GET").arg(format!("p:{i}"));
    }
    let values: Vec<i64> = within("pipeline", pipe.query_async(&mut con))
        .await
        .expect("pipeline");
    assert_eq!(values, (0..1000).step_by(100).collect::<Vec<i64>>());

    let (a, b): (i64, i64) = within(
        "transaction",
        redis::pipe()
            .atomic()
            .cmd("INCR")
            .arg("tx")
            .cmd("INCRBY")
            .arg("tx")
            .arg(10)
            .query_async(&mut con),
    )
    .await
    .expect("MULTI/EXEC pipeline");
    assert_eq!((a, b), (1, 11));
}

#[tokio::test]
async fn pubsub_api_resp2() {
    let redis = RedisServer::start();
    let front = Front::new(&redis);
    let client = client(&front, false);
    let mut publisher = conn(&client).await;
    let mut pubsub = within("get_async_pubsub", client.get_async_pubsub())
        .await
        .expect("async pubsub through pubwarden");
    within("subscribe", pubsub.subscribe(&["news", "sports"]))
        .await
        .expect("SUBSCRIBE");
    within("psubscribe", pubsub.psubscribe("weather.*"))
        .await
        .expect("PSUBSCRIBE");
    let pong: Vec<String> = within("ping", pubsub.ping())
        .await
        .expect("PING in subscribed mode");
    assert_eq!(pong, vec!["pong".to_string(), String::new()]);

    let sent: Vec<(&str, Vec<u8>)> = vec![
        ("news", b"first".to_vec()),
        ("weather.paris", b"rain".to_vec()),
        ("sports", b"\r\n\0\xff binary".to_vec()),
        ("news", b"second".to_vec()),
    ];
    for (ch, payload) in &sent {
        let receivers: i64 = redis::cmd("PUBLISH")
            .arg(*ch)
            .arg(payload)
            .query_async(&mut publisher)
            .await
            .expect("PUBLISH");
        assert_eq!(receivers, 1, "receivers of {ch}");
    }
    {
        let mut stream = pubsub.on_message();
        for (ch, payload) in &sent {
            let msg = within("message", stream.next())
                .await
                .expect("pubsub stream ended");
            assert_eq!(msg.get_channel_name(), *ch);
            assert_eq!(msg.get_payload_bytes(), payload.as_slice());
            if ch.starts_with("weather.") {
                assert_eq!(msg.get_pattern::<String>().expect("pattern"), "weather.*");
            }
        }
    }
    within("unsubscribe", pubsub.unsubscribe("news"))
        .await
        .expect("UNSUBSCRIBE");
    within("punsubscribe", pubsub.punsubscribe("weather.*"))
        .await
        .expect("PUNSUBSCRIBE");
    let receivers: i64 = redis::cmd("PUBLISH")
        .arg("news")
        .arg("nobody")
        .query_async(&mut publisher)
        .await
        .expect("PUBLISH after unsubscribe");
    assert_eq!(receivers, 0);
    let receivers: i64 = redis::cmd("PUBLISH")
        .arg("sports")
        .arg("still")
        .query_async(&mut publisher)
        .await
        .expect("PUBLISH to remaining channel");
    assert_eq!(receivers, 1);
    let msg = within("last message", pubsub.on_message().next())
        .await
        .expect("pubsub stream ended");
    assert_eq!(msg.get_channel_name(), "sports");
    assert_eq!(msg.get_payload::<String>().expect("payload"), "still");
}

#[tokio::test]
async fn resp3_push_subscriptions_on_a_multiplexed_connection() {
    let redis = RedisServer::start();
    let front = Front::new(&redis);
    let client = client(&front, true);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut con = within(
        "connect with push sender",
        client.get_multiplexed_async_connection_with_config(
            &AsyncConnectionConfig::new()
                .set_push_sender(tx)
                .set_response_timeout(Some(STEP)),
        ),
    )
    .await
    .expect("RESP3 connection through pubwarden");
    let mut publisher = conn(&client).await;
    within("subscribe", con.subscribe("r3"))
        .await
        .expect("SUBSCRIBE over RESP3");
    within("psubscribe", con.psubscribe("r3.*"))
        .await
        .expect("PSUBSCRIBE over RESP3");
    // Ordinary commands on the same (subscribed) connection.
    let () = redis::cmd("SET")
        .arg("k")
        .arg("v")
        .query_async(&mut con)
        .await
        .expect("SET while subscribed");
    let v: String = redis::cmd("GET")
        .arg("k")
        .query_async(&mut con)
        .await
        .expect("GET while subscribed");
    assert_eq!(v, "v");

    for (ch, payload) in [("r3", "one"), ("r3.x", "two"), ("r3", "three")] {
        let n: i64 = redis::cmd("PUBLISH")
            .arg(ch)
            .arg(payload)
            .query_async(&mut publisher)
            .await
            .expect("PUBLISH");
        assert_eq!(n, 1);
    }
    let mut deliveries = Vec::new();
    for _ in 0..20 {
        if deliveries.len() == 3 {
            break;
        }
        let push = within("push", rx.recv())
            .await
            .expect("push channel closed");
        match push.kind {
            PushKind::Message | PushKind::PMessage => deliveries.push(push),
            PushKind::Subscribe | PushKind::PSubscribe => {}
            other => panic!("unexpected push {other:?}: {:?}", push.data),
        }
    }
    let summary: Vec<(PushKind, Vec<Value>)> =
        deliveries.into_iter().map(|p| (p.kind, p.data)).collect();
    let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
    assert_eq!(
        summary,
        vec![
            (PushKind::Message, vec![bulk("r3"), bulk("one")]),
            (
                PushKind::PMessage,
                vec![bulk("r3.*"), bulk("r3.x"), bulk("two")]
            ),
            (PushKind::Message, vec![bulk("r3"), bulk("three")]),
        ]
    );
    within("unsubscribe", con.unsubscribe("r3"))
        .await
        .expect("UNSUBSCRIBE over RESP3");
    let v: String = redis::cmd("GET")
        .arg("k")
        .query_async(&mut con)
        .await
        .expect("GET after unsubscribe");
    assert_eq!(v, "v");
}
