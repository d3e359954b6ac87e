//! Malformed input: pubwarden answers garbage exactly as Redis does (compared byte for byte),
//! enforces the input limits without allocating what a client merely declares, and keeps
//! serving everyone else when one client misbehaves or vanishes.

mod support;

use std::thread;

use support::*;

/// Input that Redis answers with an error and then closes the connection.
const CLOSING: &[(&str, &[u8])] = &[
    ("non-numeric multibulk count", b"*abc\r\n"),
    (
        "multibulk count with trailing space",
        b"*1 \r\n$4\r\nPING\r\n",
    ),
    ("multibulk header ended by LF only", b"*1\n$4\r\nPING\r\n"),
    ("multibulk count above INT_MAX", b"*2147483648\r\n"),
    ("element not starting with $", b"*1\r\nfoo\r\n"),
    (
        "wrong bulk length makes $ expected",
        b"*3\r\n$7\r\nCLIENT\r\n$8\r\nTRACKING\r\n$2\r\nON\r\n",
    ),
    ("non-numeric bulk length", b"*1\r\n$abc\r\n"),
    ("negative bulk length", b"*1\r\n$-1\r\n"),
    (
        "bulk length with leading zero",
        b"*2\r\n$4\r\nPING\r\n$05\r\nhello\r\n",
    ),
    (
        "bulk length with plus sign",
        b"*2\r\n$4\r\nECHO\r\n$+2\r\nhi\r\n",
    ),
    ("bulk length over 512 MB", b"*1\r\n$536870913\r\n"),
    ("unbalanced double quotes inline", b"SET \"foo bar\r\n"),
    ("unbalanced single quotes inline", b"ECHO 'unbalanced\r\n"),
    ("garbage after a valid command", b"PING\r\n*abc\r\n"),
    (
        "garbage after pipelined commands",
        b"SET a 1\r\nGET a\r\n*1\r\n$x\r\nPING\r\n",
    ),
];

/// Odd input that Redis tolerates: the connection stays open.
const TOLERATED: &[(&str, &[u8], usize)] = &[
    ("inline that looks like a bulk", b"$5\r\nxyzzy\r\n", 2),
    (
        "inline that looks like other RESP types",
        b":1\r\n+PING\r\n-ERR\r\n",
        3,
    ),
    ("negative multibulk count is ignored", b"*-5\r\nPING\r\n", 1),
    ("zero multibulk count is ignored", b"*0\r\nPING\r\n", 1),
    (
        "empty inline lines are ignored",
        b"\r\n\r\n\n  \r\nPING\r\n",
        1,
    ),
    ("LF-terminated inline commands", b"PING\nECHO x\n", 2),
    ("bulk shorter than its content", b"*1\r\n$1\r\nPING\r\n", 2),
    (
        "inline with quotes and escapes",
        b"ECHO \"a\\x41\\n\" 'b'\r\nECHO \"\\xZZ\"\r\n",
        2,
    ),
];

fn closing_cases() -> Vec<Case> {
    let mut cases: Vec<Case> = Vec::new();
    for &(name, bytes) in CLOSING {
        cases.push((
            name.to_string(),
            Box::new(move |s: &mut Session| {
                let c = s.connect();
                s.send(c, bytes);
                s.expect_until_eof(c);
            }),
        ));
        // The same garbage after entering subscribed mode, and under RESP3.
        cases.push((
            format!("{name} (subscribed, RESP2)"),
            Box::new(move |s: &mut Session| {
                let c = s.connect();
                s.cmd(c, "SUBSCRIBE chan");
                s.expect(c, 1);
                s.send(c, bytes);
                s.expect_until_eof(c);
            }),
        ));
        cases.push((
            format!("{name} (RESP3)"),
            Box::new(move |s: &mut Session| {
                let c = s.connect();
                s.cmd(c, "HELLO 3");
                s.expect_with(c, 1, mask_hello_id);
                s.send(c, bytes);
                s.expect_until_eof(c);
            }),
        ));
    }
    cases
}

#[test]
fn garbage_is_answered_like_redis_then_closed() {
    assert_all_transparent("protocol errors that close", closing_cases());
}

#[test]
fn odd_but_valid_input_is_handled_like_redis() {
    let mut cases: Vec<Case> = Vec::new();
    for &(name, bytes, replies) in TOLERATED {
        cases.push((
            name.to_string(),
            Box::new(move |s: &mut Session| {
                let c = s.connect();
                s.send(c, bytes);
                s.expect(c, replies);
                s.call(c, "PING");
            }),
        ));
    }
    assert_all_transparent("tolerated odd input", cases);
}

/// Redis reads `$1\r\nab\r\n` as the argument `a` and skips two bytes without checking them
/// for CRLF; the stray `\n` left over is an empty inline line.
#[test]
fn bulk_not_terminated_by_crlf_is_handled_like_redis() {
    assert_transparent("bulk without CRLF terminator", |s| {
        let c = s.connect();
        s.send(c, b"*2\r\n$3\r\nGET\r\n$1\r\nab\r\nPING\r\n");
        s.expect(c, 2);
        s.send(c, b"*2\r\n$4\r\nECHO\r\n$2\r\nhiXY*1\r\n$4\r\nPING\r\n");
        s.expect(c, 2);
    });
}

#[test]
fn inline_request_over_64k_is_rejected_like_redis() {
    assert_transparent("too big inline request", |s| {
        let c = s.connect();
        s.send(c, vec![b'A'; 70_000]);
        s.expect_until_eof(c);
        // Exactly 64 KB without a newline yet is still acceptable.
        let d = s.connect();
        let mut line = b"ECHO ".to_vec();
        line.resize(65_536, b'x');
        s.send(d, &line);
        s.expect_silence(d, 300);
        s.send(d, b"\r\n");
        s.expect(d, 1);
    });
}

/// The brief's limit: a multibulk count over 1048576 is refused. (Redis 7.0.15 itself accepts
/// counts up to INT_MAX and waits for the elements, so this is checked against the contract,
/// not against Redis.)
#[test]
fn multibulk_count_over_1048576_is_rejected() {
    let redis = RedisServer::start();
    let proxy = Pubwarden::start(redis.port());
    let mut c = proxy.connect();
    c.send(b"*1048577\r\n");
    let (bytes, eof) = c.read_until_eof(secs(5));
    assert_eq!(
        escape(&bytes),
        escape(b"-ERR Protocol error: invalid multibulk length\r\n"),
        "reply to *1048577"
    );
    assert!(eof, "connection must be closed after the protocol error");
    // The limit itself is accepted: 1048576 elements are waited for.
    let mut d = proxy.connect();
    d.send(b"*1048576\r\n$4\r\nPING\r\n");
    let (bytes, stop) = d.read_until_idle(millis(300), secs(3));
    assert!(
        bytes.is_empty() && stop == Stop::Done,
        "*1048576 must be accepted (waiting for more), got {} {stop:?}",
        escape_short(&bytes, 200)
    );
}

/// A client declaring a 500 MB bulk and sending only a little of it must not make pubwarden
/// allocate the declared size; it keeps serving other clients.
#[test]
fn declared_huge_bulk_is_not_allocated_up_front() {
    let redis = RedisServer::start();
    let proxy = Pubwarden::start(redis.port());
    let mut warm = proxy.connect();
    warm.send(b"PING\r\n");
    assert_eq!(warm.read_one(secs(5)), b"+PONG\r\n");
    thread::sleep(millis(200));
    let rss_before = proxy.rss_kb();
    let vm_before = proxy.vm_size_kb();

    let mut hogs = Vec::new();
    for i in 0..4 {
        let mut c = proxy.connect();
        c.send(format!("*3\r\n$3\r\nSET\r\n$4\r\nhog{i}\r\n$500000000\r\n").as_bytes());
        c.send(&vec![b'z'; 64 * 1024]);
        hogs.push(c);
    }
    thread::sleep(millis(700));
    let rss_after = proxy.rss_kb();
    let vm_after = proxy.vm_size_kb();
    eprintln!(
        "pubwarden VmRSS {rss_before} -> {rss_after} kB, VmSize {vm_before} -> {vm_after} kB"
    );
    assert!(
        rss_after < rss_before + 64 * 1024,
        "VmRSS grew from {rss_before} kB to {rss_after} kB for 4 clients that declared 500 MB bulks and sent 64 KB each"
    );
    assert!(
        vm_after < vm_before + 1024 * 1024,
        "VmSize grew from {vm_before} kB to {vm_after} kB: the declared 4 x 500 MB were reserved up front"
    );
    // Still serving.
    let mut other = proxy.connect();
    other.send(b"SET k v\r\nGET k\r\n");
    let frames = other
        .read_frames(2, secs(5))
        .expect_all("another client while the hogs wait");
    assert_eq!(frames, vec![b"+OK\r\n".to_vec(), b"$1\r\nv\r\n".to_vec()]);
    // A client over the 512 MB limit is refused without waiting for data.
    let mut over = proxy.connect();
    over.send(b"*1\r\n$536870913\r\n");
    let (bytes, eof) = over.read_until_eof(secs(5));
    assert_eq!(
        escape(&bytes),
        escape(b"-ERR Protocol error: invalid bulk length\r\n")
    );
    assert!(eof, "closed after invalid bulk length");
    drop(hogs);
}

/// Clients that vanish mid-pipeline (mid-frame, or without reading big replies) do not
/// disturb a client working at the same time, nor later clients.
#[test]
fn client_disconnecting_mid_pipeline_does_not_disturb_others() {
    let redis = RedisServer::start();
    let proxy = Front::new(&redis);
    let mut setup = proxy.connect();
    let big = vec![b'b'; 1024 * 1024];
    setup.send(&encode(&[b"SET".as_slice(), b"big", &big]));
    assert_eq!(setup.read_one(secs(10)), b"+OK\r\n");

    let addr = proxy.addr();
    let worker = thread::spawn(move || {
        let mut c = RawConn::connect(addr);
        for round in 0..20 {
            let mut bytes = Vec::new();
            for i in 0..500 {
                bytes.extend_from_slice(&encode_line(&format!("INCR worker:{round}")));
                if i % 100 == 0 {
                    bytes.extend_from_slice(b"PING\r\n");
                }
            }
            c.send(&bytes);
            let frames = c
                .read_frames(505, secs(20))
                .expect_all(&format!("worker round {round}"));
            assert_eq!(
                frames.last().map(Vec::as_slice),
                Some(b":500\r\n".as_slice())
            );
        }
    });
    for i in 0..10 {
        // Half a pipeline, cut in the middle of a frame, then gone.
        let mut c = proxy.connect();
        let mut bytes = Vec::new();
        for j in 0..1000 {
            bytes.extend_from_slice(&encode_line(&format!("SET gone:{i}:{j} x")));
        }
        bytes.extend_from_slice(b"*3\r\n$3\r\nSET\r\n$4\r\nhal");
        c.send(&bytes);
        drop(c);
        // Asks for 50 MB of replies and leaves without reading them.
        let mut r = proxy.connect();
        r.send(&b"GET big\r\n".repeat(50));
        thread::sleep(millis(20));
        r.shutdown();
        drop(r);
    }
    worker
        .join()
        .expect("worker client failed while others disconnected");
    let mut after = proxy.connect();
    after.send(b"PING\r\nGET gone:0:0\r\n");
    let frames = after
        .read_frames(2, secs(5))
        .expect_all("a new client after the disconnects");
    assert_eq!(frames[0], b"+PONG\r\n");
    if let Some(mut p) = proxy.proxy {
        assert!(p.is_running(), "pubwarden exited");
    }
}
