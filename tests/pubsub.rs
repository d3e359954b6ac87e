//! Pub/sub through pubwarden: every wire sequence byte for byte against direct Redis (RESP2 and
//! RESP3), and a fan-out run checking that no delivery is lost, duplicated or reordered.
//!
//! Deliveries are published from a separate connection after the subscriber's confirmations
//! arrived, so both runs are deterministic.

mod support;

use std::collections::HashMap;
use std::time::Instant;

use support::*;

#[test]
fn subscribe_family_resp2() {
    assert_transparent("SUBSCRIBE family, RESP2", |s| {
        let c = s.connect();
        let p = s.connect();
        // Unsubscribing with nothing subscribed: one frame with a null channel each.
        s.cmd(c, "UNSUBSCRIBE");
        s.expect(c, 1);
        s.cmd(c, "PUNSUBSCRIBE");
        s.expect(c, 1);
        s.cmd(c, "SUNSUBSCRIBE");
        s.expect(c, 1);
        s.cmd(c, "UNSUBSCRIBE never subscribed");
        s.expect(c, 2);
        s.call(c, "SUBSCRIBE");
        s.call(c, "PSUBSCRIBE");
        s.call(c, "SSUBSCRIBE");
        // Several arguments: one confirmation each, the same channel twice counts once.
        s.cmd(c, "SUBSCRIBE news.a news.b news.a");
        s.expect(c, 3);
        s.cmd(c, "PSUBSCRIBE news.* n?ws.[ab] news.*");
        s.expect(c, 3);
        s.cmd(c, "SSUBSCRIBE shard1");
        s.expect(c, 1);
        s.call(p, "PUBLISH news.a first");
        s.expect(c, 1); // message, then 2 pmessages in hash-table order
        s.expect_unordered(c, 2);
        s.call(p, "PUBLISH news.zzz second");
        s.expect(c, 1);
        s.call(p, "SPUBLISH shard1 third");
        s.expect(c, 1);
        s.call(p, "PUBLISH nobody-listens x");
        s.call(p, "PUBSUB NUMSUB news.a news.b nothing");
        s.call(p, "PUBSUB NUMPAT");
        s.call(p, "PUBSUB CHANNELS news.b*");
        // Subscribed mode: PING with and without argument, disallowed commands.
        s.call(c, "PING");
        s.call(c, "PING hello");
        s.call(c, "GET x");
        s.call(c, "SET x 1");
        s.call(c, "PUBLISH news.a from-subscriber");
        s.call(c, "HELLO 2");
        s.call(c, "CLIENT REPLY OFF");
        // Unsubscribe with and without arguments.
        s.cmd(c, "UNSUBSCRIBE news.b not-subscribed");
        s.expect(c, 2);
        s.cmd(c, "PUNSUBSCRIBE");
        s.expect_unordered(c, 2);
        s.cmd(c, "SUNSUBSCRIBE shard1");
        s.expect(c, 1);
        s.call(c, "GET x"); // still subscribed to news.a
        s.cmd(c, "UNSUBSCRIBE");
        s.expect(c, 1);
        // Back to normal mode.
        s.call(c, "GET x");
        s.call(c, "PING");
        s.call(p, "PUBLISH news.a nobody");
    });
}

#[test]
fn pipelined_pubsub_commands_resp2() {
    assert_transparent("pipelined SUBSCRIBE sequences, RESP2", |s| {
        let c = s.connect();
        let p = s.connect();
        // Everything in one write: enter, use and leave subscribed mode.
        s.send(
            c,
            b"SET before 1\r\nSUBSCRIBE a b\r\nPING\r\nGET before\r\nPSUBSCRIBE p*\r\nUNSUBSCRIBE\r\nPUNSUBSCRIBE\r\nGET before\r\nPING x\r\n",
        );
        s.expect(c, 6);
        s.expect_unordered(c, 2); // UNSUBSCRIBE without arguments: hash-table order
        s.expect(c, 3);
        s.send(c, b"SUBSCRIBE ch\r\n");
        s.expect(c, 1);
        s.send(p, b"PUBLISH ch 1\r\nPUBLISH ch 2\r\nPUBLISH ch 3\r\n");
        s.expect(p, 3);
        s.expect(c, 3);
        s.send(c, b"UNSUBSCRIBE ch\r\nGET before\r\n");
        s.expect(c, 2);
    });
}

#[test]
fn binary_channels_and_payloads() {
    assert_transparent("binary channel names and payloads", |s| {
        let c = s.connect();
        let p = s.connect();
        let channels: [&[u8]; 4] = [
            b"ch\r\nnew\r\nline",
            b"nul\0inside\0",
            b"\xff\xfe invalid \xc3\x28 utf8",
            b"*3\r\n$7\r\nmessage\r\n",
        ];
        let pattern: &[u8] = b"nul\0*";
        s.cmd_args(
            c,
            &[
                b"SUBSCRIBE",
                channels[0],
                channels[1],
                channels[2],
                channels[3],
            ],
        );
        s.expect(c, 4);
        s.cmd_args(c, &[b"PSUBSCRIBE", pattern]);
        s.expect(c, 1);
        for (i, ch) in channels.iter().enumerate() {
            let payload: Vec<u8> = [
                b"payload\r\n".as_slice(),
                b"\0\0\xff",
                &[i as u8],
                b"$-1\r\n*-1\r\n",
            ]
            .concat();
            s.cmd_args(p, &[b"PUBLISH", ch, &payload]);
            s.expect(p, 1);
            let deliveries = if i == 1 { 2 } else { 1 };
            s.expect(c, deliveries);
        }
        s.cmd_args(p, &[b"PUBLISH", channels[0], b""]);
        s.expect(p, 1);
        s.expect(c, 1);
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        s.cmd_args(p, &[b"PUBLISH", channels[2], &big]);
        s.expect(p, 1);
        s.expect(c, 1);
        s.cmd_args(c, &[b"UNSUBSCRIBE", channels[1], channels[3]]);
        s.expect(c, 2);
        s.cmd_args(c, &[b"PUNSUBSCRIBE", pattern]);
        s.expect(c, 1);
        s.cmd_args(c, &[b"SSUBSCRIBE", channels[1]]);
        s.expect(c, 1);
        s.cmd_args(p, &[b"SPUBLISH", channels[1], b"\r\n\0"]);
        s.expect(p, 1);
        s.expect(c, 1);
    });
}

#[test]
fn reset_and_quit_in_subscribed_mode() {
    assert_transparent("RESET and QUIT", |s| {
        let c = s.connect();
        let p = s.connect();
        s.cmd(c, "SUBSCRIBE a");
        s.expect(c, 1);
        s.cmd(c, "PSUBSCRIBE b*");
        s.expect(c, 1);
        s.call(c, "RESET");
        s.call(c, "GET x");
        s.call(p, "PUBLISH a not-delivered");
        s.call(p, "PUBLISH bb not-delivered");
        s.expect_silence(c, 150);
        // RESET pipelined behind a subscribe, and a command behind it.
        s.send(c, b"SUBSCRIBE z\r\nRESET\r\nECHO after-reset\r\n");
        s.expect(c, 3);
        // QUIT followed by pipelined commands: +OK, then the connection closes.
        s.send(c, b"SUBSCRIBE q\r\nQUIT\r\nPING\r\nGET x\r\n");
        s.expect(c, 2);
        s.expect_eof(c);
        s.call(p, "PUBSUB NUMSUB q");
        // QUIT outside subscribed mode, pipelined.
        let d = s.connect();
        s.send(d, b"SET y 1\r\nQUIT\r\nSET y 2\r\n");
        s.expect(d, 2);
        s.expect_eof(d);
        s.call(p, "GET y");
    });
}

#[test]
fn resp3_pubsub_pushes_and_any_command() {
    assert_transparent("pub/sub under RESP3", |s| {
        let c = s.connect();
        let p = s.connect();
        s.cmd(c, "HELLO 3");
        s.expect_with(c, 1, mask_hello_id);
        s.cmd(c, "UNSUBSCRIBE");
        s.expect(c, 1);
        s.cmd(c, "SUBSCRIBE r3.a r3.b");
        s.expect(c, 2);
        s.cmd(c, "PSUBSCRIBE r3.*");
        s.expect(c, 1);
        s.cmd(c, "SSUBSCRIBE r3.shard");
        s.expect(c, 1);
        // Any command is allowed while subscribed under RESP3.
        for line in [
            "PING",
            "PING arg",
            "SET k v",
            "GET k",
            "HSET h f v",
            "HGETALL h",
            "NOSUCHCOMMAND",
            "PUBLISH r3.a from-self",
        ] {
            s.call(c, line);
            if line.starts_with("PUBLISH") {
                s.expect(c, 2); // its own message and pmessage
            }
        }
        s.call(p, "PUBLISH r3.a one");
        s.expect(c, 2);
        s.call(p, "SPUBLISH r3.shard two");
        s.expect(c, 1);
        // A push that arrived between commands keeps its place.
        s.call(p, "PUBLISH r3.b three");
        s.expect(c, 2);
        s.call(c, "GET k");
        // Pipelined commands interleaved with subscribe changes.
        s.send(
            c,
            b"GET k\r\nUNSUBSCRIBE r3.a\r\nINCR n\r\nPUNSUBSCRIBE\r\nSUNSUBSCRIBE\r\nGET k\r\n",
        );
        s.expect(c, 6);
        s.call(p, "PUBLISH r3.b four");
        s.expect(c, 1);
        // HELLO 2 while subscribed switches back to RESP2 subscribed mode.
        s.cmd(c, "HELLO 2");
        s.expect_with(c, 1, mask_hello_id);
        s.call(c, "GET k");
        s.call(c, "PING");
        s.call(p, "PUBLISH r3.b five");
        s.expect(c, 1);
        s.cmd(c, "UNSUBSCRIBE");
        s.expect(c, 1);
        s.call(c, "GET k");
        // And into RESP3 again, subscribing from RESP2 first.
        s.cmd(c, "SUBSCRIBE again");
        s.expect(c, 1);
        s.call(c, "HELLO 3");
        s.cmd(c, "RESET");
        s.expect(c, 1);
        s.cmd(c, "HELLO 3");
        s.expect_with(c, 1, mask_hello_id);
        s.cmd(c, "SUBSCRIBE again");
        s.expect(c, 1);
        s.call(c, "QUIT");
        s.expect_eof(c);
    });
}

#[test]
fn subscribe_inside_multi_exec() {
    assert_transparent("SUBSCRIBE inside MULTI/EXEC", |s| {
        let c = s.connect();
        let p = s.connect();
        s.call(c, "MULTI");
        s.call(c, "SET k v");
        s.call(c, "SUBSCRIBE m1 m2");
        s.call(c, "PSUBSCRIBE m*");
        s.cmd(c, "EXEC");
        // EXEC answers *3 but SUBSCRIBE writes one frame per channel, so the stream is
        // `*3 +OK [subscribe m1] [subscribe m2]` (one frame to a splitter) then `[psubscribe m*]`.
        s.expect(c, 2);
        s.call(p, "PUBLISH m1 hi");
        s.expect(c, 2);
        s.call(c, "GET k");
        s.call(c, "PING");
        s.cmd(c, "UNSUBSCRIBE");
        s.expect_unordered(c, 2);
        s.cmd(c, "PUNSUBSCRIBE");
        s.expect(c, 1);
        s.call(c, "GET k");
        // The same under RESP3.
        let d = s.connect();
        s.cmd(d, "HELLO 3");
        s.expect_with(d, 1, mask_hello_id);
        s.send(d, b"MULTI\r\nSUBSCRIBE x y\r\nGET k\r\nEXEC\r\nGET k\r\n");
        s.expect(d, 6);
        s.call(p, "PUBLISH y there");
        s.expect(d, 1);
        s.call(d, "UNSUBSCRIBE x");
        s.call(d, "GET k");
    });
}

#[test]
fn resp3_tracking_and_pubsub_on_one_connection() {
    assert_transparent("RESP3 tracking + pub/sub", |s| {
        let c = s.connect();
        let w = s.connect();
        s.cmd(c, "HELLO 3");
        s.expect_with(c, 1, mask_hello_id);
        s.call(c, "CLIENT TRACKING ON");
        s.call(c, "GET t");
        s.cmd(c, "SUBSCRIBE ch");
        s.expect(c, 1);
        s.call(w, "SET t 1");
        s.expect(c, 1);
        s.call(w, "PUBLISH ch m");
        s.expect(c, 1);
        s.call(c, "GET t");
        s.call(c, "DEBUG PROTOCOL push");
        s.expect(c, 1);
    });
}

/// 100 subscribers over 10 channels plus pattern subscribers; every subscriber gets every
/// message of its channels exactly once, in publish order.
#[test]
fn fan_out_100_subscribers() {
    const CHANNELS: usize = 10;
    const SUBSCRIBERS: usize = 100;
    const MESSAGES: usize = 200;
    let redis = RedisServer::start();
    let proxy = Front::new(&redis);

    // Subscriber i: channel i % 10; every 5th also PSUBSCRIBEs a pattern (all channels or
    // channels 0-4), so it also gets pmessages.
    struct Sub {
        conn: RawConn,
        channel: usize,
        pattern: Option<&'static str>,
    }
    let mut subs = Vec::new();
    for i in 0..SUBSCRIBERS {
        let mut conn = proxy.connect();
        let channel = i % CHANNELS;
        conn.send_line(&format!("SUBSCRIBE fan:{channel}"));
        let pattern = match i % 10 {
            0 => Some("fan:*"),
            5 => Some("fan:[0-4]"),
            _ => None,
        };
        if let Some(p) = pattern {
            conn.send_line(&format!("PSUBSCRIBE {p}"));
        }
        subs.push(Sub {
            conn,
            channel,
            pattern,
        });
    }
    for (i, sub) in subs.iter_mut().enumerate() {
        let n = 1 + usize::from(sub.pattern.is_some());
        let frames = sub
            .conn
            .read_frames(n, secs(10))
            .expect_all(&format!("subscriber {i} confirmations"));
        assert!(
            frames[0].starts_with(b"*3\r\n$9\r\nsubscribe\r\n"),
            "subscriber {i}: {}",
            escape(&frames[0])
        );
    }
    let receivers_of = |ch: usize| -> i64 {
        subs.iter()
            .map(|s| {
                i64::from(s.channel == ch)
                    + match s.pattern {
                        Some("fan:*") => 1,
                        Some(_) => i64::from(ch < 5),
                        None => 0,
                    }
            })
            .sum()
    };
    let expected_receivers: Vec<i64> = (0..CHANNELS).map(receivers_of).collect();

    // What each subscriber must see: per (kind, channel) stream, sequence 0..MESSAGES in order.
    let expected_count = |s: &Sub| -> usize {
        MESSAGES
            * (1 + match s.pattern {
                Some("fan:*") => CHANNELS,
                Some(_) => 5,
                None => 0,
            })
    };
    let readers: Vec<_> = subs
        .into_iter()
        .enumerate()
        .map(|(i, mut sub)| {
            let want = expected_count(&sub);
            std::thread::spawn(move || {
                let got = sub.conn.read_frames(want, secs(60));
                (i, sub.channel, sub.pattern, want, got)
            })
        })
        .collect();

    // One publisher per channel, all through pubwarden, pipelining in batches of 50.
    let publishers: Vec<_> = (0..CHANNELS)
        .map(|ch| {
            let addr = proxy.addr();
            let receivers = expected_receivers[ch];
            std::thread::spawn(move || {
                let mut conn = RawConn::connect(addr);
                for batch in 0..MESSAGES / 50 {
                    let mut bytes = Vec::new();
                    for seq in batch * 50..(batch + 1) * 50 {
                        bytes.extend_from_slice(&encode_line(&format!(
                            "PUBLISH fan:{ch} ch={ch};seq={seq}"
                        )));
                    }
                    conn.send(&bytes);
                    let replies = conn
                        .read_frames(50, secs(20))
                        .expect_all(&format!("PUBLISH replies on fan:{ch}"));
                    for r in replies {
                        assert_eq!(
                            escape(&r),
                            format!(":{receivers}\\r\\n"),
                            "PUBLISH fan:{ch}: receivers counted by Redis (all subscribers confirmed before publishing)"
                        );
                    }
                }
            })
        })
        .collect();
    for p in publishers {
        p.join().expect("publisher thread");
    }

    let started = Instant::now();
    for r in readers {
        let (i, channel, pattern, want, got) = r.join().expect("subscriber thread");
        assert_eq!(
            got.stop,
            Stop::Done,
            "subscriber {i} (channel fan:{channel}, pattern {pattern:?}) got {} of {want} deliveries ({:.1}s after publishing)",
            got.frames.len(),
            started.elapsed().as_secs_f64()
        );
        let mut next: HashMap<(String, Vec<u8>), usize> = HashMap::new();
        for f in &got.frames {
            let v = decode(f).unwrap_or_else(|e| panic!("subscriber {i}: {e}: {}", escape(f)));
            let items = v
                .items()
                .unwrap_or_else(|| panic!("subscriber {i}: {}", escape(f)));
            let kind = String::from_utf8_lossy(items[0].bytes().unwrap_or_default()).into_owned();
            let (stream_key, payload) = match kind.as_str() {
                "message" => (items[1].bytes(), items[2].bytes()),
                "pmessage" => (items[2].bytes(), items[3].bytes()),
                _ => panic!("subscriber {i}: unexpected frame {}", escape(f)),
            };
            let ch = stream_key.expect("channel").to_vec();
            let payload = String::from_utf8_lossy(payload.expect("payload")).into_owned();
            let seq: usize = payload
                .rsplit("seq=")
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("payload {payload}"));
            let expected_payload = format!(
                "ch={};seq={seq}",
                String::from_utf8_lossy(&ch).trim_start_matches("fan:")
            );
            assert_eq!(
                payload, expected_payload,
                "subscriber {i}: payload/channel mismatch"
            );
            let slot = next.entry((kind.clone(), ch.clone())).or_insert(0);
            assert_eq!(
                seq,
                *slot,
                "subscriber {i}: {kind} on {} out of order or duplicated",
                String::from_utf8_lossy(&ch)
            );
            *slot += 1;
        }
        assert!(
            next.values().all(|&n| n == MESSAGES),
            "subscriber {i}: per stream counts {next:?}"
        );
    }
}
