//! TLS (issue #8): TLS to Redis (`rediss://`, `upstream.tls`, mTLS), a TLS listener for
//! clients, mTLS identities mapped to policy users, verification failures with their reasons on
//! /metrics, certificate rotation without dropping connections, `check-config` for the TLS
//! settings, and `insecure_skip_verify`.
//!
//! Every test makes its own PKI (rcgen) in a scratch directory and its own `redis-server`
//! (plaintext, or TLS-only with `--port 0 --tls-port`), all on loopback.

mod support;

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use support::policy::*;
use support::tls::*;
use support::*;

const STEP: Duration = Duration::from_secs(10);

/// A path as a YAML scalar.
fn yp(path: &Path) -> String {
    yq(path.to_str().expect("utf-8 path"))
}

/// `upstream:` for a plaintext Redis.
fn plain_upstream(redis: &RedisServer) -> String {
    format!("upstream:\n  address: 127.0.0.1:{}\n", redis.port())
}

/// A `tls:` listener section with the given certificate, plus `extra` lines (indented by two).
fn tls_listener(cert: &Path, key: &Path, extra: &str) -> String {
    format!(
        "tls:\n  listen: {TLS_LISTEN}\n  cert_file: {}\n  key_file: {}\n{extra}",
        yp(cert),
        yp(key)
    )
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Awaits `fut` with a deadline so a broken proxy fails the test instead of hanging it.
async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(STEP, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {STEP:?}"))
}

async fn multiplexed(client: &redis::Client) -> redis::aio::MultiplexedConnection {
    within(
        "connect",
        client.get_multiplexed_async_connection_with_config(
            &redis::AsyncConnectionConfig::new().set_response_timeout(Some(STEP)),
        ),
    )
    .await
    .expect("multiplexed connection through pubwarden")
}

fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The RESP2 confirmation of `SUBSCRIBE channel` as the `count`th subscription.
fn subscribed(channel: &str, count: i64) -> Vec<u8> {
    format!(
        "*3\r\n$9\r\nsubscribe\r\n${}\r\n{channel}\r\n:{count}\r\n",
        channel.len()
    )
    .into_bytes()
}

fn bulk(bytes: &[u8]) -> Vec<u8> {
    let mut out = format!("${}\r\n", bytes.len()).into_bytes();
    out.extend_from_slice(bytes);
    out.extend_from_slice(b"\r\n");
    out
}

/// A deterministic non-text payload of `len` bytes (with CR, LF and NUL in it).
fn big_value(len: usize) -> Vec<u8> {
    (0..len).map(|i| ((i * 31 + i / 7) % 256) as u8).collect()
}

/// Asserts a reply frame equal to `want`, comparing text with binary escaped.
fn assert_frame(got: &[u8], want: &[u8], what: &str) {
    assert!(
        got == want,
        "{what}: got {}, wanted {}",
        escape_short(got, 300),
        escape_short(want, 300)
    );
}

/// The error a client gets when Redis cannot be reached: the spec's wording (`-ERR upstream
/// unavailable (ADDRESS): ...`) or the wording pubwarden already uses and documents (README,
/// docs/operations.md: `-ERR pubwarden: upstream Redis at <addr> is unavailable (<cause>)`).
fn is_upstream_unavailable(reply: &[u8]) -> bool {
    let text = String::from_utf8_lossy(reply).to_lowercase();
    text.starts_with("-err upstream unavailable")
        || (text.starts_with("-err pubwarden: upstream redis at ")
            && text.contains(" is unavailable ("))
}

fn counter(proxy: &TlsProxy, name: &str, labels: &[(&str, &str)]) -> f64 {
    proxy.metric(name, labels).unwrap_or(0.0)
}

const HANDSHAKE_FAILURES: &str = "pubwarden_tls_handshake_failures_total";
const CERT_EXPIRY: &str = "pubwarden_tls_certificate_expiry_timestamp_seconds";
const RELOADS: &str = "pubwarden_tls_reloads_total";
const CLIENT_LOGINS: &str = "pubwarden_tls_client_logins_total";
/// The `result` label values of [`RELOADS`] in the spec (/tmp/tls-spec.md: `ok`, `error`).
const RELOAD_OK: (&str, &str) = ("result", "success");
const RELOAD_ERROR: (&str, &str) = ("result", "failure");

// ---------------------------------------------------------------------------------------------
// 1. TLS to Redis.

#[test]
fn upstream_tls_pubsub_and_large_values_with_the_redis_crate() {
    let pki = Pki::new();
    let redis = TlsRedis::start(&pki, RedisClientAuth::No);
    let dir = scratch_dir("tls-upstream");
    let proxy = TlsProxy::start(
        &dir,
        &format!(
            "upstream:\n  address: rediss://127.0.0.1:{}\n  tls:\n    ca_file: {}\n",
            redis.port(),
            yp(pki.ca_file())
        ),
        WaitFor::Ready,
    );
    let url = format!("redis://{}/", proxy.addr());
    let big = big_value(1024 * 1024);
    runtime().block_on(async {
        let client = redis::Client::open(url.as_str()).expect("redis client URL");
        let mut publisher = multiplexed(&client).await;
        let mut pubsub = within("get_async_pubsub", client.get_async_pubsub())
            .await
            .expect("async pubsub through pubwarden");
        within("subscribe", pubsub.subscribe("tls.a"))
            .await
            .expect("SUBSCRIBE tls.a");
        within("psubscribe", pubsub.psubscribe("tls.*"))
            .await
            .expect("PSUBSCRIBE tls.*");
        // tls.a reaches the subscriber twice (channel and pattern), tls.b once.
        for i in 0..1000 {
            let (channel, want) = if i % 2 == 0 {
                ("tls.a", 2)
            } else {
                ("tls.b", 1)
            };
            let receivers: i64 = within(
                "PUBLISH",
                redis::cmd("PUBLISH")
                    .arg(channel)
                    .arg(format!("msg-{i}"))
                    .query_async(&mut publisher),
            )
            .await
            .unwrap_or_else(|e| panic!("PUBLISH {channel} msg-{i}: {e}"));
            assert_eq!(receivers, want, "PUBLISH {channel} msg-{i}: receivers");
        }
        let mut by_channel = Vec::new();
        let mut by_pattern = Vec::new();
        {
            let mut stream = pubsub.on_message();
            for n in 0..1500 {
                let msg = within(&format!("message {n} of 1500"), stream.next())
                    .await
                    .expect("pubsub stream ended");
                let payload: String = msg.get_payload().expect("text payload");
                let entry = (msg.get_channel_name().to_string(), payload);
                if msg.from_pattern() {
                    assert_eq!(msg.get_pattern::<String>().expect("pattern"), "tls.*");
                    by_pattern.push(entry);
                } else {
                    by_channel.push(entry);
                }
            }
        }
        let want_channel: Vec<(String, String)> = (0..1000)
            .step_by(2)
            .map(|i| ("tls.a".to_string(), format!("msg-{i}")))
            .collect();
        let want_pattern: Vec<(String, String)> = (0..1000)
            .map(|i| {
                let ch = if i % 2 == 0 { "tls.a" } else { "tls.b" };
                (ch.to_string(), format!("msg-{i}"))
            })
            .collect();
        assert!(
            by_channel == want_channel,
            "SUBSCRIBE deliveries out of order or missing: {}",
            first_difference(&by_channel, &want_channel)
        );
        assert!(
            by_pattern == want_pattern,
            "PSUBSCRIBE deliveries out of order or missing: {}",
            first_difference(&by_pattern, &want_pattern)
        );

        // 1 MB round trip.
        let () = within(
            "SET 1 MB",
            redis::cmd("SET")
                .arg("tls:big")
                .arg(&big)
                .query_async(&mut publisher),
        )
        .await
        .expect("SET of 1 MB through pubwarden over TLS to Redis");
        let back: Vec<u8> = within(
            "GET 1 MB",
            redis::cmd("GET").arg("tls:big").query_async(&mut publisher),
        )
        .await
        .expect("GET of 1 MB");
        assert!(back == big, "the 1 MB value came back different");
    });
    // It really is on the TLS-only Redis.
    let mut direct = redis.connect();
    assert_frame(
        &direct.call(&["GET", "tls:big"]),
        &bulk(&big),
        "GET tls:big straight from Redis",
    );
}

/// Where two delivery lists first differ, for failure messages.
fn first_difference(got: &[(String, String)], want: &[(String, String)]) -> String {
    let i = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    format!(
        "{} received, {} expected; at index {i}: got {:?}, expected {:?}",
        got.len(),
        want.len(),
        got.get(i),
        want.get(i)
    )
}

// ---------------------------------------------------------------------------------------------
// 2. A TLS listener for clients.

#[test]
fn client_tls_listener_pubsub_pipelining_and_large_values() {
    let pki = Pki::new();
    let redis = RedisServer::start();
    let dir = scratch_dir("tls-listener");
    let proxy = TlsProxy::start(
        &dir,
        &format!(
            "{}{}",
            plain_upstream(&redis),
            tls_listener(&pki.server.cert, &pki.server.key, "")
        ),
        WaitFor::Ready,
    );
    let cfg = pki.client_config(None);
    let mut sub = proxy.connect_tls(cfg.clone());
    assert!(
        sub.peer_leaf() == pki.server.der,
        "the TLS listener presented {:?}, not tls.cert_file",
        describe_cert(&sub.peer_leaf())
    );
    assert_frame(
        &sub.call(&["SUBSCRIBE", "tls.chat"]),
        &subscribed("tls.chat", 1),
        "SUBSCRIBE over TLS",
    );
    let mut publ = proxy.connect_tls(cfg.clone());
    // 500 publishes, pipelined in one write.
    let mut batch = Vec::new();
    for i in 0..500 {
        batch.extend(encode(&["PUBLISH", "tls.chat", &format!("m-{i}")]));
    }
    publ.send(&batch);
    let counts = publ
        .read_frames(500, secs(20))
        .expect_all("500 PUBLISH replies over TLS");
    for (i, c) in counts.iter().enumerate() {
        assert_frame(c, b":1\r\n", &format!("PUBLISH m-{i}"));
    }
    let got = sub
        .read_frames(500, secs(20))
        .expect_all("500 deliveries over TLS");
    for (i, m) in got.iter().enumerate() {
        assert_frame(
            m,
            &message("tls.chat", &format!("m-{i}")),
            &format!("delivery {i}"),
        );
    }
    // A plaintext publisher reaches the TLS subscriber too.
    let mut plain = proxy.connect();
    expect_reply(&mut plain, &["PUBLISH", "tls.chat", "plain"], b":1\r\n");
    assert_frame(
        &sub.read_one(secs(5)),
        &message("tls.chat", "plain"),
        "delivery of a plaintext publish",
    );

    // 2000 PINGs in one write, answered in order.
    let mut pings = Vec::new();
    for i in 0..2000 {
        pings.extend(encode(&["PING", &format!("p{i}")]));
    }
    publ.send(&pings);
    let pongs = publ
        .read_frames(2000, secs(20))
        .expect_all("2000 pipelined PING replies over TLS");
    for (i, p) in pongs.iter().enumerate() {
        assert_frame(p, &bulk(format!("p{i}").as_bytes()), &format!("PING p{i}"));
    }

    // 2 MB there and back.
    let big = big_value(2 * 1024 * 1024);
    publ.send_args(&[b"SET".as_slice(), b"tls:big2", &big]);
    assert_frame(&publ.read_one(secs(20)), b"+OK\r\n", "SET of 2 MB over TLS");
    publ.send_args(&[b"GET".as_slice(), b"tls:big2"]);
    let back = publ.read_one(secs(20));
    assert!(
        back == bulk(&big),
        "GET of 2 MB over TLS came back different: {}",
        escape_short(&back, 100)
    );
    let mut direct = RawConn::connect(redis.addr());
    direct.send(&encode(&["STRLEN", "tls:big2"]));
    assert_frame(
        &direct.read_one(secs(5)),
        format!(":{}\r\n", big.len()).as_bytes(),
        "STRLEN straight from Redis",
    );

    // RESP3 over TLS: HELLO 3, then a push delivery.
    let mut r3 = proxy.connect_tls(cfg);
    r3.send_args(&["HELLO", "3"]);
    let hello = r3.read_one(secs(5));
    assert!(
        hello.starts_with(b"%"),
        "HELLO 3 over TLS: {}",
        escape_short(&hello, 200)
    );
    r3.send_args(&["SUBSCRIBE", "tls.r3"]);
    let conf = r3.read_one(secs(5));
    assert!(
        conf.starts_with(b">3\r\n"),
        "RESP3 SUBSCRIBE confirmation: {}",
        escape_short(&conf, 200)
    );
    expect_reply(&mut plain, &["PUBLISH", "tls.r3", "pushed"], b":1\r\n");
    assert_frame(
        &r3.read_one(secs(5)),
        b">3\r\n$7\r\nmessage\r\n$6\r\ntls.r3\r\n$6\r\npushed\r\n",
        "RESP3 push over TLS",
    );
}

#[test]
fn client_tls_listener_with_the_redis_crate() {
    let pki = Pki::new();
    let redis = RedisServer::start();
    let dir = scratch_dir("tls-listener-crate");
    let proxy = TlsProxy::start(
        &dir,
        &format!(
            "{}{}",
            plain_upstream(&redis),
            tls_listener(&pki.server.cert, &pki.server.key, "")
        ),
        WaitFor::Ready,
    );
    install_provider();
    let url = format!("rediss://127.0.0.1:{}/", proxy.tls_addr().port());
    let ca = pki.ca_pem().as_bytes().to_vec();
    runtime().block_on(async {
        let client = redis::Client::build_with_tls(
            url.as_str(),
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(ca),
            },
        )
        .expect("rediss:// client with the test CA");
        let mut con = multiplexed(&client).await;
        let () = within(
            "SET",
            redis::cmd("SET").arg("k").arg("v").query_async(&mut con),
        )
        .await
        .expect("SET over TLS with the redis crate");
        let v: String = within("GET", redis::cmd("GET").arg("k").query_async(&mut con))
            .await
            .expect("GET");
        assert_eq!(v, "v");
        let mut pubsub = within("get_async_pubsub", client.get_async_pubsub())
            .await
            .expect("async pubsub over TLS");
        within("subscribe", pubsub.subscribe("crate.ch"))
            .await
            .expect("SUBSCRIBE");
        for i in 0..100 {
            let n: i64 = within(
                "PUBLISH",
                redis::cmd("PUBLISH")
                    .arg("crate.ch")
                    .arg(format!("c{i}"))
                    .query_async(&mut con),
            )
            .await
            .expect("PUBLISH");
            assert_eq!(n, 1, "PUBLISH c{i}: receivers");
        }
        let mut stream = pubsub.on_message();
        for i in 0..100 {
            let msg = within("message", stream.next())
                .await
                .expect("pubsub stream ended");
            assert_eq!(
                msg.get_payload::<String>().expect("payload"),
                format!("c{i}")
            );
        }
    });
}

// ---------------------------------------------------------------------------------------------
// 3. TLS on both sides, with a client certificate to Redis.

#[test]
fn both_sides_tls_with_mtls_to_redis() {
    let pki = Pki::new();
    let redis = TlsRedis::start(&pki, RedisClientAuth::Yes);
    let to_redis = pki.issue_client("pubwarden-to-redis", "pubwarden");
    let dir = scratch_dir("tls-both");
    let proxy = TlsProxy::start(
        &dir,
        &format!(
            "upstream:\n  address: rediss://127.0.0.1:{}\n  tls:\n    ca_file: {}\n    cert_file: {}\n    key_file: {}\n{}",
            redis.port(),
            yp(pki.ca_file()),
            yp(&to_redis.cert),
            yp(&to_redis.key),
            tls_listener(&pki.server.cert, &pki.server.key, "")
        ),
        WaitFor::Ready,
    );
    let cfg = pki.client_config(None);
    let mut sub = proxy.connect_tls(cfg.clone());
    assert_frame(
        &sub.call(&["SUBSCRIBE", "both.ch"]),
        &subscribed("both.ch", 1),
        "SUBSCRIBE over TLS to a TLS Redis",
    );
    let mut tls_pub = proxy.connect_tls(cfg);
    let mut plain_pub = proxy.connect();
    for i in 0..100 {
        let payload = format!("b{i}");
        if i % 2 == 0 {
            assert_frame(
                &tls_pub.call(&["PUBLISH", "both.ch", &payload]),
                b":1\r\n",
                "PUBLISH over TLS",
            );
        } else {
            expect_reply(&mut plain_pub, &["PUBLISH", "both.ch", &payload], b":1\r\n");
        }
    }
    let got = sub.read_frames(100, secs(10)).expect_all("100 deliveries");
    for (i, m) in got.iter().enumerate() {
        assert_frame(m, &message("both.ch", &format!("b{i}")), "delivery");
    }
    // Redis saw a client certificate: only certified clients get in at all.
    let mut direct = redis.connect();
    let clients = direct.call(&["CLIENT", "LIST"]);
    assert!(
        String::from_utf8_lossy(&clients).matches("cmd=").count() >= 2,
        "CLIENT LIST on Redis shows no pubwarden connection: {}",
        escape_short(&clients, 500)
    );

    // The same without upstream.tls.cert_file: Redis refuses pubwarden.
    let dir2 = scratch_dir("tls-both-nocert");
    let bare = TlsProxy::start(
        &dir2,
        &format!(
            "upstream:\n  address: rediss://127.0.0.1:{}\n  tls:\n    ca_file: {}\n",
            redis.port(),
            yp(pki.ca_file())
        ),
        WaitFor::Healthy,
    );
    let mut c = bare.connect();
    let reply = call(&mut c, &["PING"]);
    assert!(
        is_upstream_unavailable(&reply),
        "without a client certificate for Redis (which requires one), PING must get the \
         `upstream unavailable` error; got {}",
        escape_short(&reply, 300)
    );
    // Give the health check (every 1 s) a couple of rounds.
    std::thread::sleep(secs(2));
    assert_ne!(
        bare.http_status("/readyz"),
        Some(200),
        "/readyz is 200 although Redis refuses pubwarden's TLS connection"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. mTLS identities mapped to policy users.

const ADMIN_PW: &str = "tls-admin-secret";

#[test]
fn mtls_identity_logs_in_as_the_policy_user() {
    let pki = Pki::new();
    let redis = RedisServer::start();
    let orders = pki.issue_client("orders", "orders-client");
    let stranger = pki.issue_client("stranger", "stranger");
    let impostor = pki.issue_client_other_ca("impostor", "orders-client");
    let dir = scratch_dir("tls-mtls");
    write_file(
        &dir.join("policy.yaml"),
        &format!(
            "mode: enforce\nauth:\n  max_failures_per_minute: 0\nusers:\n  admin:\n    passwords: [{}]\n    channels:\n      publish: [\"*\"]\n      subscribe: [\"*\"]\n  orders:\n    tls_identities: [\"cn:orders-client\"]\n    channels:\n      publish: [\"orders.*\"]\n      subscribe: [\"orders.*\"]\n",
            yq(&hashed(ADMIN_PW))
        ),
    );
    let proxy = TlsProxy::start(
        &dir,
        &format!(
            "policy: policy.yaml\n{}{}",
            plain_upstream(&redis),
            tls_listener(
                &pki.server.cert,
                &pki.server.key,
                &format!("  client_ca_file: {}\n", yp(pki.ca_file()))
            )
        ),
        WaitFor::Ready,
    );

    // CN=orders-client: logged in as `orders` at once, its ACL applies.
    let mut watcher = RawConn::connect(redis.addr());
    expect_reply(
        &mut watcher,
        &["SUBSCRIBE", "orders.x"],
        &subscribed("orders.x", 1),
    );
    let mut o = proxy.connect_tls(pki.client_config(Some(&orders)));
    assert_frame(
        &o.call(&["PUBLISH", "orders.x", "from-cert"]),
        b":1\r\n",
        "PUBLISH orders.x by CN=orders-client without AUTH",
    );
    assert_frame(
        &watcher.read_one(secs(5)),
        &message("orders.x", "from-cert"),
        "the mapped user's message reached Redis",
    );
    assert_frame(
        &o.call(&["PUBLISH", "billing.x", "nope"]),
        NOPERM_CHANNEL,
        "PUBLISH billing.x by CN=orders-client",
    );
    let mut os = proxy.connect_tls(pki.client_config(Some(&orders)));
    assert_frame(
        &os.call(&["SUBSCRIBE", "orders.y"]),
        &subscribed("orders.y", 1),
        "SUBSCRIBE orders.y by CN=orders-client",
    );
    assert_frame(
        &o.call(&["PUBLISH", "orders.y", "to-sub"]),
        b":1\r\n",
        "PUBLISH orders.y",
    );
    assert_frame(
        &os.read_one(secs(5)),
        &message("orders.y", "to-sub"),
        "delivery to the mapped subscriber",
    );

    // A verified certificate that maps to nobody: the default rules (no default user: NOAUTH).
    let mut s = proxy.connect_tls(pki.client_config(Some(&stranger)));
    assert_frame(
        &s.call(&["PUBLISH", "orders.x", "x"]),
        NOAUTH,
        "PUBLISH by CN=stranger without AUTH",
    );
    // AUTH still works over TLS.
    assert_frame(&s.call(&["AUTH", "admin", ADMIN_PW]), OK, "AUTH admin");
    assert_frame(
        &s.call(&["PUBLISH", "billing.x", "x"]),
        b":0\r\n",
        "PUBLISH billing.x as admin",
    );
    // The plaintext listener knows no certificates.
    let mut plain = proxy.connect();
    expect_reply(&mut plain, &["PUBLISH", "orders.x", "x"], NOAUTH);

    assert!(
        proxy
            .wait_metric(CLIENT_LOGINS, &[("result", "mapped")], secs(5), |v| v
                >= 2.0)
            .is_some_and(|v| v >= 2.0),
        "{CLIENT_LOGINS}{{result=\"mapped\"}} < 2 after two CN=orders-client connections:\n{}",
        tls_metrics(&proxy)
    );
    assert!(
        proxy
            .wait_metric(CLIENT_LOGINS, &[("result", "unmapped")], secs(5), |v| v
                >= 1.0)
            .is_some_and(|v| v >= 1.0),
        "{CLIENT_LOGINS}{{result=\"unmapped\"}} < 1 after CN=stranger:\n{}",
        tls_metrics(&proxy)
    );

    // No client certificate: client_auth defaults to required with client_ca_file.
    let no_cert = [("side", "client"), ("reason", "no_certificate")];
    let before = counter(&proxy, HANDSHAKE_FAILURES, &no_cert);
    let outcome = TlsConn::probe(proxy.tls_addr(), pki.client_config(None));
    assert!(
        outcome.is_err(),
        "a client without a certificate got through (client_auth is required by default with \
         client_ca_file): PING answered {}",
        escape_short(outcome.as_ref().map(|v| v.as_slice()).unwrap_or(b""), 200)
    );
    let after = proxy.wait_metric(HANDSHAKE_FAILURES, &no_cert, secs(5), |v| v >= before + 1.0);
    assert!(
        after.is_some_and(|v| v >= before + 1.0),
        "{HANDSHAKE_FAILURES}{{side=\"client\",reason=\"no_certificate\"}} went from {before} \
         to {after:?} after a client without a certificate ({}):\n{}",
        outcome.unwrap_err(),
        tls_metrics(&proxy)
    );

    // A certificate from another CA (same CN): refused.
    let bad_ca = |p: &TlsProxy| {
        counter(
            p,
            HANDSHAKE_FAILURES,
            &[("side", "client"), ("reason", "unknown_ca")],
        ) + counter(
            p,
            HANDSHAKE_FAILURES,
            &[("side", "client"), ("reason", "bad_certificate")],
        )
    };
    let before = bad_ca(&proxy);
    let outcome = TlsConn::probe(proxy.tls_addr(), pki.client_config(Some(&impostor)));
    assert!(
        outcome.is_err(),
        "a client certificate from an unrelated CA got through: PING answered {}",
        escape_short(outcome.as_ref().map(|v| v.as_slice()).unwrap_or(b""), 200)
    );
    assert!(
        eventually(secs(5), || bad_ca(&proxy) >= before + 1.0),
        "{HANDSHAKE_FAILURES}{{side=\"client\",reason=\"unknown_ca\"|\"bad_certificate\"}} did \
         not grow after a certificate from another CA ({}):\n{}",
        outcome.unwrap_err(),
        tls_metrics(&proxy)
    );
    // The mapped connection survived all that.
    assert_frame(
        &o.call(&["PUBLISH", "orders.x", "still"]),
        b":1\r\n",
        "PUBLISH after the failed handshakes",
    );
}

/// The `pubwarden_tls_*` lines of /metrics, for failure messages.
fn tls_metrics(proxy: &TlsProxy) -> String {
    proxy
        .metrics()
        .lines()
        .filter(|l| l.contains("pubwarden_tls_"))
        .collect::<Vec<_>>()
        .join("\n")
}

// ---------------------------------------------------------------------------------------------
// 5. Redis's certificate from a CA pubwarden does not trust.

#[test]
fn upstream_certificate_from_an_unknown_ca_is_refused() {
    let pki = Pki::new();
    let redis = TlsRedis::start(&pki, RedisClientAuth::No);
    let dir = scratch_dir("tls-wrong-ca");
    let proxy = TlsProxy::start(
        &dir,
        &format!(
            "upstream:\n  address: rediss://127.0.0.1:{}\n  tls:\n    ca_file: {}\n",
            redis.port(),
            yp(pki.other_ca_file())
        ),
        WaitFor::Healthy,
    );
    let mut c = proxy.connect();
    let reply = call(&mut c, &["PING"]);
    let text = String::from_utf8_lossy(&reply).into_owned();
    assert!(
        is_upstream_unavailable(&reply) && text.to_lowercase().contains("certificate"),
        "with Redis's certificate from an unknown CA, PING must get the `upstream unavailable` \
         error naming the certificate problem; got {}",
        escape_short(&reply, 300)
    );
    let (rest, closed) = c.read_until_eof(secs(5));
    assert!(
        closed,
        "the connection stayed open after the `upstream unavailable` error; then got {}",
        escape_short(&rest, 200)
    );
    let labels = [("side", "upstream"), ("reason", "unknown_ca")];
    let v = proxy.wait_metric(HANDSHAKE_FAILURES, &labels, secs(5), |v| v >= 1.0);
    assert!(
        v.is_some_and(|v| v >= 1.0),
        "{HANDSHAKE_FAILURES}{{side=\"upstream\",reason=\"unknown_ca\"}} = {v:?}:\n{}",
        tls_metrics(&proxy)
    );
    // /readyz stays unready (give the health check a few rounds).
    std::thread::sleep(secs(2));
    let status = proxy.http_status("/readyz");
    assert_ne!(
        status,
        Some(200),
        "/readyz is 200 though Redis's certificate is not trusted"
    );
    let logs = proxy.logs();
    assert!(
        logs.to_lowercase().contains("certificate"),
        "the log does not say why Redis is unavailable:\n{logs}"
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Certificate rotation.

#[test]
fn listener_certificate_rotation_keeps_connections() {
    let pki = Pki::new();
    let redis = RedisServer::start();
    let a = pki.issue_server("listener-a", (2035, 1, 1));
    let b = pki.issue_server("listener-b", (2036, 6, 15));
    let dir = scratch_dir("tls-rotation");
    let cert = dir.join("listener.crt");
    let key = dir.join("listener.key");
    a.install_as(&cert, &key);
    let proxy = TlsProxy::start(
        &dir,
        &format!(
            "{}{}",
            plain_upstream(&redis),
            tls_listener(&cert, &key, "")
        ),
        WaitFor::Ready,
    );
    let cfg = pki.client_config(None);
    let presented = || proxy.connect_tls(cfg.clone()).peer_leaf();
    let first = presented();
    assert!(
        first == a.der,
        "the listener presented {:?}, not certificate A {:?}",
        describe_cert(&first),
        describe_cert(&a.der)
    );
    let expiry = [("certificate", "listener")];
    let v = proxy.wait_metric(CERT_EXPIRY, &expiry, secs(5), |v| v == a.not_after as f64);
    assert_eq!(
        v,
        Some(a.not_after as f64),
        "{CERT_EXPIRY}{{certificate=\"listener\"}} is not A's notAfter ({}):\n{}",
        a.not_after,
        tls_metrics(&proxy)
    );
    let mut sub = proxy.connect_tls(cfg.clone());
    assert_frame(
        &sub.call(&["SUBSCRIBE", "rot.ch"]),
        &subscribed("rot.ch", 1),
        "SUBSCRIBE before the rotation",
    );

    // Rotate to B.
    let ok_before = counter(&proxy, RELOADS, &[RELOAD_OK]);
    b.install_as(&cert, &key);
    let mut last = first.clone();
    let rotated = eventually(secs(5), || {
        last = presented();
        last == b.der
    });
    assert!(
        rotated,
        "5 s after cert/key were replaced, new connections still get {:?} (B is {:?})",
        describe_cert(&last),
        describe_cert(&b.der)
    );
    let mut plain = proxy.connect();
    expect_reply(&mut plain, &["PUBLISH", "rot.ch", "after"], b":1\r\n");
    assert_frame(
        &sub.read_one(secs(5)),
        &message("rot.ch", "after"),
        "the subscriber from before the rotation",
    );
    let mut fresh = proxy.connect_tls(cfg.clone());
    assert_frame(
        &fresh.call(&["PUBLISH", "rot.ch", "fresh"]),
        b":1\r\n",
        "PUBLISH on a connection with B",
    );
    assert_frame(
        &sub.read_one(secs(5)),
        &message("rot.ch", "fresh"),
        "delivery after the rotation",
    );
    let v = proxy.wait_metric(CERT_EXPIRY, &expiry, secs(5), |v| v == b.not_after as f64);
    assert_eq!(
        v,
        Some(b.not_after as f64),
        "{CERT_EXPIRY}{{certificate=\"listener\"}} is not B's notAfter ({}) after the rotation:\n{}",
        b.not_after,
        tls_metrics(&proxy)
    );
    let ok = proxy.wait_metric(RELOADS, &[RELOAD_OK], secs(5), |v| v >= ok_before + 1.0);
    assert!(
        ok.is_some_and(|v| v >= ok_before + 1.0),
        "{RELOADS}{{result=\"{}\"}} went from {ok_before} to {ok:?} over a rotation:\n{}",
        RELOAD_OK.1,
        tls_metrics(&proxy)
    );

    // A broken key: the old material (B) stays, the error is counted.
    let errors_before = counter(&proxy, RELOADS, &[RELOAD_ERROR]);
    write_atomically(
        &key,
        "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n",
    );
    let errors = proxy.wait_metric(RELOADS, &[RELOAD_ERROR], secs(5), |v| {
        v >= errors_before + 1.0
    });
    assert!(
        errors.is_some_and(|v| v >= errors_before + 1.0),
        "{RELOADS}{{result=\"{}\"}} went from {errors_before} to {errors:?} after a garbage \
         key file:\n{}",
        RELOAD_ERROR.1,
        tls_metrics(&proxy)
    );
    let mut after_bad = proxy.connect_tls(cfg);
    assert!(
        after_bad.peer_leaf() == b.der,
        "after a garbage key, new connections get {:?} instead of B",
        describe_cert(&after_bad.peer_leaf())
    );
    assert_frame(
        &after_bad.call(&["PUBLISH", "rot.ch", "still"]),
        b":1\r\n",
        "PUBLISH after the bad key",
    );
    assert_frame(
        &sub.read_one(secs(5)),
        &message("rot.ch", "still"),
        "delivery after the bad key",
    );
    assert!(
        proxy.http_status("/readyz") == Some(200),
        "unready after a bad key"
    );
    let logs = proxy.logs();
    assert!(
        !logs.contains("not a key") && !logs.contains(b.key_pem.lines().nth(1).unwrap_or("-")),
        "key material in the log:\n{logs}"
    );
}

// ---------------------------------------------------------------------------------------------
// 7. check-config.

/// True if some line of `output` names `key` as a whole key path (not as the tail of a longer
/// one: `tls.cert_file` does not match `upstream.tls.cert_file`) and contains every one of
/// `words` (case-insensitive).
fn names_problem(output: &str, key: &str, words: &[&str]) -> bool {
    output.lines().any(|line| {
        let lower = line.to_lowercase();
        let at_key = line.match_indices(key).any(|(i, _)| {
            let before = line[..i].chars().next_back();
            let after = line[i + key.len()..].chars().next();
            !before.is_some_and(|c| c == '.' || c == '_' || c.is_alphanumeric())
                && !after.is_some_and(|c| c == '.' || c == '_' || c.is_alphanumeric())
        });
        at_key && words.iter().all(|w| lower.contains(&w.to_lowercase()))
    })
}

fn check_config(path: &Path) -> CliRun {
    run_cli(
        &["check-config", path.to_str().expect("utf-8 path")],
        b"",
        &[],
        secs(20),
    )
}

#[test]
fn check_config_lists_every_tls_problem_with_its_key() {
    let pki = Pki::new();
    let other = pki.issue_server("other-server", (2040, 1, 1));
    let to_redis = pki.issue_client("to-redis", "pubwarden");
    let dir = scratch_dir("tls-check-config");
    let garbage = dir.join("garbage.crt");
    write_file(&garbage, "this is no certificate\n");
    let missing = dir.join("missing").join("server.crt");

    // File 1: a key that does not match its certificate, client_auth without client_ca_file,
    // an upstream certificate without its key, a missing upstream CA file.
    let one = dir.join("one.yaml");
    write_file(
        &one,
        &format!(
            "listen: 127.0.0.1:16380\ntls:\n  listen: 127.0.0.1:16390\n  cert_file: {}\n  key_file: {}\n  client_auth: required\nupstream:\n  address: rediss://127.0.0.1:16379\n  tls:\n    ca_file: {}\n    cert_file: {}\n",
            yp(&pki.server.cert),
            yp(&other.key),
            yp(&missing.with_file_name("ca.crt")),
            yp(&to_redis.cert),
        ),
    );
    let run = check_config(&one);
    let out = run.output();
    assert_eq!(
        run.code,
        Some(64),
        "check-config of {}:\n{out}",
        one.display()
    );
    for (key, words) in [
        ("tls.key_file", &["match"][..]),
        ("tls.client_auth", &["client_ca_file"][..]),
        ("upstream.tls.cert_file", &["key_file"][..]),
        ("upstream.tls.ca_file", &["cannot read"][..]),
    ] {
        assert!(
            names_problem(&out, key, words),
            "check-config did not report `{key}` (with {words:?}) on a line:\n{out}"
        );
    }
    for secret in [&other.key_pem, &to_redis.key_pem] {
        let body = secret.lines().nth(1).expect("PEM body line");
        assert!(
            !out.contains(body) && !out.contains("PRIVATE KEY"),
            "check-config printed key material:\n{out}"
        );
    }

    // File 2: a missing certificate file, credentials in the upstream URL.
    let two = dir.join("two.yaml");
    write_file(
        &two,
        &format!(
            "tls:\n  listen: 127.0.0.1:16391\n  cert_file: {}\n  key_file: {}\nupstream:\n  address: rediss://someone:secret-in-url@127.0.0.1:16379\n",
            yp(&missing),
            yp(&pki.server.key),
        ),
    );
    let run = check_config(&two);
    let out = run.output();
    assert_eq!(
        run.code,
        Some(64),
        "check-config of {}:\n{out}",
        two.display()
    );
    assert!(
        names_problem(&out, "tls.cert_file", &[missing.to_str().unwrap()]),
        "check-config did not report `tls.cert_file` with the missing path:\n{out}"
    );
    assert!(
        names_problem(&out, "upstream.address", &[]),
        "check-config did not refuse user:password@ in `upstream.address`:\n{out}"
    );
    assert!(
        !out.contains("secret-in-url"),
        "check-config printed the password from the URL:\n{out}"
    );

    // File 2b: certificate files with no PEM certificate in them (an otherwise valid listener).
    let two_b = dir.join("two-b.yaml");
    write_file(
        &two_b,
        &format!(
            "tls:\n  listen: 127.0.0.1:16393\n  cert_file: {}\n  key_file: {}\n  client_ca_file: {}\nupstream:\n  address: rediss://127.0.0.1:16379\n  tls:\n    ca_file: {}\n",
            yp(&pki.server.cert),
            yp(&pki.server.key),
            yp(&garbage),
            yp(&garbage),
        ),
    );
    let run = check_config(&two_b);
    let out = run.output();
    assert_eq!(
        run.code,
        Some(64),
        "check-config of {}:\n{out}",
        two_b.display()
    );
    for key in ["tls.client_ca_file", "upstream.tls.ca_file"] {
        assert!(
            names_problem(&out, key, &["no PEM certificate"]),
            "check-config did not report `{key}: no PEM certificate found`:\n{out}"
        );
    }

    // File 3: valid, with insecure_skip_verify (a warning) and a complete TLS listener.
    let three = dir.join("three.yaml");
    write_file(
        &three,
        &format!(
            "tls:\n  listen: 127.0.0.1:16392\n  cert_file: {}\n  key_file: {}\n  client_ca_file: {}\n  client_auth: optional\nupstream:\n  address: rediss://127.0.0.1:16379\n  tls:\n    server_name: redis.example\n    cert_file: {}\n    key_file: {}\n    insecure_skip_verify: true\n",
            yp(&pki.server.cert),
            yp(&pki.server.key),
            yp(pki.ca_file()),
            yp(&to_redis.cert),
            yp(&to_redis.key),
        ),
    );
    let run = check_config(&three);
    let out = run.output();
    assert_eq!(
        run.code,
        Some(0),
        "check-config of a valid file with insecure_skip_verify:\n{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.to_lowercase().contains("warning") && l.contains("insecure_skip_verify")),
        "check-config printed no warning line about insecure_skip_verify:\n{out}"
    );
    assert!(
        !out.contains("PRIVATE KEY") && !out.contains(to_redis.key_pem.lines().nth(1).unwrap()),
        "check-config printed key material:\n{out}"
    );
}

// ---------------------------------------------------------------------------------------------
// 8. insecure_skip_verify.
//
// Redis's certificate is from the test CA, which pubwarden does not trust (no `ca_file`: the
// system's roots); with insecure_skip_verify it connects anyway, and says so in a WARN.

#[test]
fn insecure_skip_verify_connects_and_warns() {
    let pki = Pki::new();
    let redis = TlsRedis::start(&pki, RedisClientAuth::No);
    let dir = scratch_dir("tls-insecure");
    let proxy = TlsProxy::start(
        &dir,
        &format!(
            "upstream:\n  address: rediss://127.0.0.1:{}\n  tls:\n    insecure_skip_verify: true\n",
            redis.port(),
        ),
        WaitFor::Ready,
    );
    let mut sub = proxy.connect();
    expect_reply(
        &mut sub,
        &["SUBSCRIBE", "insecure.ch"],
        &subscribed("insecure.ch", 1),
    );
    let mut publ = proxy.connect();
    for i in 0..50 {
        expect_reply(
            &mut publ,
            &["PUBLISH", "insecure.ch", &format!("i{i}")],
            b":1\r\n",
        );
    }
    let got = sub.read_frames(50, secs(10)).expect_all("50 deliveries");
    for (i, m) in got.iter().enumerate() {
        assert_frame(m, &message("insecure.ch", &format!("i{i}")), "delivery");
    }
    let logs = proxy.logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("WARN") && l.contains("insecure_skip_verify")),
        "no WARN line mentioning insecure_skip_verify in the log:\n{logs}"
    );
}

// ---------------------------------------------------------------------------------------------
// 9. tls.only and the handshake timeout.

#[test]
fn tls_only_and_handshake_timeout() {
    let pki = Pki::new();
    let redis = RedisServer::start();
    let dir = scratch_dir("tls-only");
    let proxy = TlsProxy::start(
        &dir,
        &format!(
            "{}{}",
            plain_upstream(&redis),
            tls_listener(
                &pki.server.cert,
                &pki.server.key,
                "  only: true\n  handshake_timeout: 1s\n"
            )
        ),
        WaitFor::Ready,
    );
    assert!(
        RawConn::try_connect(proxy.addr()).is_err(),
        "with tls.only: true the plaintext listener {} accepts connections",
        proxy.addr()
    );
    let mut c = proxy.connect_tls(pki.client_config(None));
    assert_frame(&c.call(&["PING"]), b"+PONG\r\n", "PING over TLS");

    // A client that never starts its handshake is closed after handshake_timeout.
    let labels = [("side", "client"), ("reason", "timeout")];
    let before = counter(&proxy, HANDSHAKE_FAILURES, &labels);
    let mut silent = RawConn::connect(proxy.tls_addr());
    let started = Instant::now();
    let (_, closed) = silent.read_until_eof(secs(5));
    assert!(
        closed,
        "a connection that sent nothing was not closed within 5 s (handshake_timeout: 1s)"
    );
    assert!(
        started.elapsed() >= millis(800),
        "the silent connection was closed after {:?}, before handshake_timeout (1 s)",
        started.elapsed()
    );
    let after = proxy.wait_metric(HANDSHAKE_FAILURES, &labels, secs(5), |v| v >= before + 1.0);
    assert!(
        after.is_some_and(|v| v >= before + 1.0),
        "{HANDSHAKE_FAILURES}{{side=\"client\",reason=\"timeout\"}} went from {before} to \
         {after:?}:\n{}",
        tls_metrics(&proxy)
    );
    // The established TLS connection is unaffected.
    assert_frame(&c.call(&["PING"]), b"+PONG\r\n", "PING after the timeout");
}
