//! Self-checks of the test harness against real Redis only (no pubwarden): the frame splitter,
//! and a scripted session compared with itself. If these fail, fix the harness, not the proxy.

mod support;

use support::script::{diff_transcripts, run_script};
use support::*;

#[test]
fn splitter_handles_every_resp_type() {
    let cases: &[&[u8]] = &[
        b"+OK\r\n",
        b"-ERR x\r\n",
        b":12\r\n",
        b"$-1\r\n",
        b"*-1\r\n",
        b"$3\r\na\r\n\r\n",
        b"_\r\n",
        b",1.5\r\n",
        b"#t\r\n",
        b"(123\r\n",
        b"=7\r\ntxt:abc\r\n",
        b"!3\r\nERR\r\n",
        b"%1\r\n+a\r\n:1\r\n",
        b"~2\r\n:1\r\n:2\r\n",
        b">2\r\n$1\r\na\r\n*0\r\n",
        b"|1\r\n+k\r\n:1\r\n$2\r\nhi\r\n",
        b"*2\r\n*1\r\n$0\r\n\r\n%0\r\n",
    ];
    for case in cases {
        assert_eq!(frame_len(case), Ok(Some(case.len())), "{}", escape(case));
        for cut in 1..case.len() {
            assert_eq!(
                frame_len(&case[..cut]),
                Ok(None),
                "{} cut at {cut}",
                escape(case)
            );
        }
    }
    assert!(frame_len(b"?x\r\n").is_err());
    assert!(frame_len(b"$1\r\nab\r\n").is_err());
    assert_eq!(
        decode(b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n:5\r\n"),
        Ok(Value::Array(vec![
            Value::Bulk(b"message".to_vec()),
            Value::Bulk(b"c".to_vec()),
            Value::Int(5)
        ]))
    );
}

#[test]
fn masks_hello_id_and_monitor_lines() {
    assert_eq!(
        mask_hello_id(b"%2\r\n$2\r\nid\r\n:123\r\n$4\r\nmode\r\n$1\r\nx\r\n"),
        b"%2\r\n$2\r\nid\r\n:<id>\r\n$4\r\nmode\r\n$1\r\nx\r\n".to_vec()
    );
    assert_eq!(
        mask_monitor_line(b"+1795630624.417608 [0 127.0.0.1:39616] \"PING\"\r\n"),
        b"+[0] \"PING\"\r\n".to_vec()
    );
}

/// The same script run twice against two fresh Redis servers gives identical transcripts,
/// and a real difference is reported.
#[test]
fn transcripts_of_redis_against_itself_match() {
    let a = RedisServer::start();
    let b = RedisServer::start();
    let script = |s: &mut Session| {
        let c = s.connect();
        let p = s.connect();
        s.send(c, b"HELLO 3\r\n");
        s.expect_with(c, 1, mask_hello_id);
        s.cmd(c, "SUBSCRIBE ch1 ch2");
        s.expect(c, 2);
        s.cmd(p, "PUBLISH ch1 hello");
        s.expect(p, 1);
        s.expect(c, 1);
        s.cmd(c, "CLIENT ID");
        s.expect_masked_int(c);
        s.cmd(c, "DEBUG PROTOCOL attrib");
        s.expect(c, 1);
        s.expect_silence(c, 50);
        s.send(c, b"QUIT\r\nPING\r\n");
        s.expect(c, 1);
        s.expect_eof(c);
    };
    let want = run_script(a.addr(), true, &script);
    let got = run_script(b.addr(), true, &script);
    assert_eq!(diff_transcripts(&want, &got), None);

    let other = run_script(b.addr(), true, &|s: &mut Session| {
        let c = s.connect();
        s.send(c, b"HELLO 3\r\n");
        s.expect_with(c, 1, mask_hello_id);
        s.cmd(c, "SUBSCRIBE ch1 ch3");
        s.expect(c, 2);
    });
    let report = diff_transcripts(&want, &other).expect("a difference must be reported");
    assert!(report.contains("ch3"), "{report}");
}

#[test]
fn redis_server_restarts_on_the_same_port() {
    let mut redis = RedisServer::start();
    let port = redis.port();
    redis.kill();
    assert!(!support::procs::ping(redis.addr()));
    redis.restart();
    assert_eq!(redis.port(), port);
    assert!(support::procs::ping(redis.addr()));
}
