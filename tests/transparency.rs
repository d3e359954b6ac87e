//! Byte-for-byte transparency of ordinary (non pub/sub) traffic: each script runs against a
//! fresh Redis directly and against another fresh Redis through pubwarden, and the bytes each
//! connection receives must be identical.

mod support;

use support::*;

#[test]
fn plain_commands() {
    assert_transparent("plain commands", |s| {
        let c = s.connect();
        for line in [
            "PING",
            "PING hello",
            "ECHO abc",
            "SET k1 v1",
            "GET k1",
            "GET missing",
            "INCR n",
            "INCRBY n 41",
            "INCR k1",
            "APPEND k1 more",
            "STRLEN k1",
            "MSET a 1 b 2 c 3",
            "MGET a b c missing",
            "DEL a b missing",
            "EXISTS a c",
            "RPUSH list x y z",
            "LRANGE list 0 -1",
            "LRANGE missing 0 -1",
            "HSET h f1 1 f2 2",
            "HGETALL h",
            "HGET h nope",
            "SADD set m1",
            "SMEMBERS set",
            "ZADD z 1.5 one 2 two",
            "ZRANGE z 0 -1 WITHSCORES",
            "ZSCORE z one",
            "TYPE list",
            "EXPIRE k1 1000",
            "TTL k1",
            "PERSIST k1",
            "SELECT 3",
            "SET k1 other-db",
            "GET k1",
            "SELECT 0",
            "GET k1",
            "DBSIZE",
            "NOSUCHCOMMAND arg1 arg2",
            "GET",
            "SET onlykey",
            "LPUSH k1 x",
            "ECHO",
            "OBJECT ENCODING n",
            "COMMAND COUNT",
        ] {
            s.call(c, line);
        }
        // Inline (telnet style) commands and quoting.
        s.send(
            c,
            b"SET inline \"quoted value\\r\\n\"\r\nGET inline\r\nPING\n",
        );
        s.expect(c, 3);
        s.send(c, b"\r\n\r\nECHO 'single quoted'\r\n");
        s.expect(c, 1);
        // Commands split over many tiny writes.
        let bytes = encode(&["SET", "split", "across writes"]);
        for chunk in bytes.chunks(3) {
            s.send(c, chunk);
        }
        s.expect(c, 1);
        s.call(c, "GET split");
    });
}

#[test]
fn pipeline_of_10k_commands_written_at_once() {
    assert_transparent("pipeline of 10k commands", |s| {
        let c = s.connect();
        let mut bytes = Vec::new();
        for i in 0..10_000 {
            let line = match i % 5 {
                0 => format!("SET key:{i} value:{i}"),
                1 => format!("GET key:{}", i - 1),
                2 => "INCR counter".to_string(),
                3 => format!("RPUSH list item{i}"),
                _ => format!("HSET hash f{i} {i}"),
            };
            bytes.extend_from_slice(&encode_line(&line));
        }
        s.send(c, &bytes);
        s.set_timeout(secs(30));
        s.expect(c, 10_000);
        s.call(c, "LLEN list");
    });
}

#[test]
fn multi_exec_and_discard() {
    assert_transparent("MULTI/EXEC", |s| {
        let c = s.connect();
        let w = s.connect();
        for line in [
            "MULTI",
            "SET a 1",
            "INCR a",
            "GET a",
            "LPUSH a x",
            "EXEC",
            "MULTI",
            "SET b 1",
            "DISCARD",
            "GET b",
            "EXEC",
            "DISCARD",
            "MULTI",
            "MULTI",
            "NOSUCHCMD",
            "EXEC",
            "WATCH w",
        ] {
            s.call(c, line);
        }
        // WATCH invalidated by another client: EXEC answers a null array.
        s.call(w, "SET w changed");
        s.call(c, "MULTI");
        s.call(c, "SET w mine");
        s.call(c, "EXEC");
        s.call(c, "GET w");
        // The whole transaction pipelined in one write.
        s.send(
            c,
            b"MULTI\r\nSET p 1\r\nINCR p\r\nEXEC\r\nMULTI\r\nGET p\r\nEXEC\r\n",
        );
        s.expect(c, 7);
    });
}

#[test]
fn ten_megabyte_value() {
    assert_transparent("10 MB SET/GET", |s| {
        let c = s.connect();
        let value: Vec<u8> = (0..10 * 1024 * 1024u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect();
        s.set_timeout(secs(30));
        s.cmd_args(c, &[b"SET", b"big", &value]);
        s.expect(c, 1);
        s.call(c, "STRLEN big");
        s.call(c, "GET big");
        // Two big replies back to back in one pipeline.
        s.send(c, b"GET big\r\nGETRANGE big 100 5000000\r\nPING\r\n");
        s.expect(c, 3);
    });
}

#[test]
fn binary_keys_and_values() {
    assert_transparent("binary keys and values", |s| {
        let c = s.connect();
        let key: &[u8] = b"k\r\n\0\xff\xfe*1\r\n";
        let value: &[u8] = b"\r\n$3\r\n\0\0\0\xc3\x28 invalid utf-8 \xed\xa0\x80\r\n";
        s.cmd_args(c, &[b"SET", key, value]);
        s.expect(c, 1);
        s.cmd_args(c, &[b"GET", key]);
        s.expect(c, 1);
        s.cmd_args(c, &[b"ECHO", b""]);
        s.expect(c, 1);
        s.cmd_args(c, &[b"ECHO", b"\r\n"]);
        s.expect(c, 1);
    });
}

#[test]
fn client_reply_off_skip_on() {
    assert_transparent("CLIENT REPLY", |s| {
        let c = s.connect();
        s.call(c, "SET a 1");
        s.cmd(c, "CLIENT REPLY OFF");
        s.cmd(c, "SET a 2");
        s.cmd(c, "GET a");
        s.cmd(c, "NOSUCHCOMMAND");
        s.expect_silence(c, 200);
        s.call(c, "CLIENT REPLY ON");
        s.call(c, "GET a");
        s.cmd(c, "CLIENT REPLY SKIP");
        s.cmd(c, "INCR a");
        s.call(c, "GET a");
        // The same, pipelined in one write.
        s.send(
            c,
            b"CLIENT REPLY SKIP\r\nGET a\r\nECHO one\r\nCLIENT REPLY OFF\r\nECHO two\r\nCLIENT REPLY ON\r\nECHO three\r\n",
        );
        s.expect(c, 3);
        // Replies switched off while subscribed: confirmations still come, the rest does not.
        let p = s.connect();
        s.cmd(c, "CLIENT REPLY OFF");
        s.cmd(c, "SUBSCRIBE ch");
        s.expect(c, 1);
        s.cmd(c, "PING");
        s.expect_silence(c, 200);
        s.call(p, "PUBLISH ch payload");
        s.expect(c, 1);
        s.call(c, "RESET");
        s.call(c, "GET a");
    });
}

#[test]
fn blocking_command_answered_later() {
    assert_transparent("BLPOP", |s| {
        let c = s.connect();
        let p = s.connect();
        s.cmd(c, "BLPOP queue 10");
        s.expect_silence(c, 300);
        s.call(p, "LPUSH queue job1");
        s.expect(c, 1);
        // A command pipelined behind a blocked one waits for it.
        s.send(c, b"BLPOP queue2 10\r\nPING\r\n");
        s.expect_silence(c, 300);
        s.call(p, "RPUSH queue2 job2");
        s.expect(c, 2);
        // Timeout reply (null array).
        s.call(c, "BLPOP nothing 0.1");
    });
}

#[test]
fn resp3_hello_and_types() {
    assert_transparent("RESP3", |s| {
        let c = s.connect();
        s.cmd(c, "HELLO 3");
        s.expect_with(c, 1, mask_hello_id);
        for line in [
            "SET a 1",
            "GET missing",
            "HSET h f v g w",
            "HGETALL h",
            "SADD s x",
            "SMEMBERS s",
            "ZADD z 1.5 m",
            "ZSCORE z m",
            "EXISTS a",
            "INCRBYFLOAT f 0.25",
            "DEBUG PROTOCOL bignum",
            "DEBUG PROTOCOL true",
            "DEBUG PROTOCOL false",
            "DEBUG PROTOCOL double",
            "DEBUG PROTOCOL null",
            "DEBUG PROTOCOL verbatim",
            "DEBUG PROTOCOL map",
            "DEBUG PROTOCOL set",
            "DEBUG PROTOCOL attrib",
            "DEBUG PROTOCOL push",
            "NOSUCHCOMMAND",
        ] {
            s.cmd(c, line);
            // DEBUG PROTOCOL push sends a push and then its reply.
            let n = if line == "DEBUG PROTOCOL push" { 2 } else { 1 };
            s.expect(c, n);
        }
        s.cmd(c, "HELLO 4");
        s.expect(c, 1);
        s.cmd(c, "HELLO 2");
        s.expect_with(c, 1, mask_hello_id);
        s.call(c, "HGETALL h");
        s.call(c, "DEBUG PROTOCOL attrib");
        s.cmd(c, "HELLO 3 SETNAME myname");
        s.expect_with(c, 1, mask_hello_id);
        s.call(c, "CLIENT GETNAME");
    });
}

#[test]
fn client_tracking_resp3_invalidate_push() {
    assert_transparent("CLIENT TRACKING RESP3", |s| {
        let c = s.connect();
        let w = s.connect();
        s.cmd(c, "HELLO 3");
        s.expect_with(c, 1, mask_hello_id);
        s.call(c, "CLIENT TRACKING ON");
        s.call(c, "GET tracked");
        s.call(w, "SET tracked changed");
        s.expect(c, 1); // invalidate push
        s.call(c, "GET tracked");
        s.call(c, "MGET tracked other");
        s.call(w, "MSET tracked x other y");
        s.expect(c, 2); // one invalidate push per key
        s.call(w, "FLUSHALL");
        s.expect(c, 1); // invalidate with a null key list
        s.call(c, "PING");
        s.call(c, "CLIENT TRACKING OFF");
    });
}

#[test]
fn client_tracking_resp2_redirect_to_subscriber() {
    assert_transparent("CLIENT TRACKING RESP2 REDIRECT", |s| {
        let sub = s.connect();
        let c = s.connect();
        let w = s.connect();
        s.cmd(sub, "CLIENT ID");
        let id = s.expect_masked_int(sub);
        s.cmd(sub, "SUBSCRIBE __redis__:invalidate");
        s.expect(sub, 1);
        s.cmd(c, &format!("CLIENT TRACKING ON REDIRECT {id}"));
        s.expect(c, 1);
        s.call(c, "GET k");
        s.call(w, "SET k v");
        s.expect(sub, 1);
        s.call(c, "GET k");
        s.call(w, "DEL k");
        s.expect(sub, 1);
    });
}

/// MONITOR: through pubwarden the monitoring connection gets +OK and then one line per
/// command of another client, in order (timestamps and addresses aside).
#[test]
fn monitor_shows_other_clients_commands() {
    let redis = RedisServer::start();
    let proxy = Front::new(&redis);
    let mut monitor = proxy.connect();
    monitor.send(b"MONITOR\r\n");
    assert_eq!(monitor.read_one(secs(5)), b"+OK\r\n", "MONITOR reply");
    let mut other = proxy.connect();
    let commands = [
        "SET monitor:key 1",
        "GET monitor:key",
        "ECHO monitor:marker",
    ];
    for line in commands {
        other.send_line(line);
        other.read_one(secs(5));
    }
    let expected: Vec<String> = commands
        .iter()
        .map(|l| {
            l.split(' ')
                .map(|a| format!("\"{a}\""))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    let mut seen = Vec::new();
    let mut next = 0;
    for _ in 0..50 {
        if next == expected.len() {
            break;
        }
        let got = monitor.read_frames(1, secs(5));
        let Some(frame) = got.frames.first() else {
            panic!(
                "monitor stream stopped ({:?}) after {seen:?}; still waiting for {:?}",
                got.stop, expected[next]
            );
        };
        let line = String::from_utf8_lossy(&mask_monitor_line(frame)).into_owned();
        assert!(
            line.starts_with("+[0] "),
            "not a monitor line: {}",
            escape(frame)
        );
        // Other traffic (e.g. a health check of pubwarden's own) may be interleaved.
        if line.trim_end() == format!("+[0] {}", expected[next]) {
            next += 1;
        }
        seen.push(line);
    }
    assert_eq!(
        next,
        expected.len(),
        "monitor lines seen: {seen:?}, wanted in order: {expected:?}"
    );
}
