//! Process lifecycle: admin health endpoints, an unreachable or dying upstream, SIGTERM, and
//! `check-config`.

mod support;

use std::io::Write as _;
use std::thread;
use std::time::Instant;

use support::*;

/// Reads one frame or EOF: Ok(Some(frame)), Ok(None) for EOF, Err for a hang/garbage.
fn frame_or_eof(c: &mut RawConn, timeout: std::time::Duration) -> Result<Option<Vec<u8>>, String> {
    let got = c.read_frames(1, timeout);
    match got.stop {
        Stop::Done => Ok(got.frames.into_iter().next()),
        Stop::Eof => Ok(None),
        other => Err(format!(
            "{other:?}, incomplete bytes {}",
            escape_short(&got.partial, 200)
        )),
    }
}

#[test]
fn health_and_readiness_when_upstream_is_up() {
    let redis = RedisServer::start();
    let proxy = Pubwarden::start(redis.port());
    assert_eq!(proxy.http_status("/healthz"), Some(200), "/healthz");
    assert_eq!(proxy.http_status("/readyz"), Some(200), "/readyz");
    let mut c = proxy.connect();
    c.send(b"PING\r\n");
    assert_eq!(c.read_one(secs(5)), b"+PONG\r\n");
}

#[test]
fn unreachable_upstream_gives_err_reply_and_not_ready() {
    let closed_port = free_port(); // nothing listens there
    let proxy = Pubwarden::start_unready(closed_port);
    assert_eq!(proxy.http_status("/healthz"), Some(200), "/healthz");
    assert_eq!(
        proxy.http_status("/readyz"),
        Some(503),
        "/readyz with the upstream down"
    );
    for attempt in 0..3 {
        let mut c = proxy.connect();
        let _ = c.try_send(b"PING\r\n");
        let frame = frame_or_eof(&mut c, secs(10))
            .unwrap_or_else(|e| panic!("attempt {attempt}: no reply: {e}"))
            .unwrap_or_else(|| {
                panic!("attempt {attempt}: connection closed without an -ERR reply")
            });
        let text = String::from_utf8_lossy(&frame).to_lowercase();
        assert!(
            text.starts_with("-err ") && text.ends_with("\r\n"),
            "attempt {attempt}: wanted an -ERR reply, got {}",
            escape(&frame)
        );
        assert!(
            text.contains("upstream") || text.contains(&format!("127.0.0.1:{closed_port}")),
            "attempt {attempt}: the error should name the upstream problem: {}",
            escape(&frame)
        );
    }
    assert_eq!(
        proxy.http_status("/healthz"),
        Some(200),
        "/healthz after clients"
    );
}

#[test]
fn upstream_killed_mid_session_then_restarted() {
    let mut redis = RedisServer::start();
    let mut proxy = Pubwarden::start(redis.port());
    let mut client = proxy.connect();
    client.send(b"SET k v\r\nGET k\r\n");
    client
        .read_frames(2, secs(5))
        .expect_all("commands before the kill");
    let mut subscriber = proxy.connect();
    subscriber.send(b"SUBSCRIBE ch\r\n");
    subscriber.read_one(secs(5));
    let mut blocked = proxy.connect();
    blocked.send(b"BLPOP q 30\r\n");
    thread::sleep(millis(200));

    redis.kill();

    // Idle subscriber and a client blocked in BLPOP: an error or a close, not a hang.
    for (name, conn) in [
        ("subscriber", &mut subscriber),
        ("blocked BLPOP", &mut blocked),
    ] {
        match frame_or_eof(conn, secs(5)) {
            Ok(None) => {}
            Ok(Some(f)) => assert!(f.starts_with(b"-"), "{name}: got {}", escape(&f)),
            Err(e) => {
                panic!("{name}: neither an error nor a close within 5 s after Redis died: {e}")
            }
        }
    }
    // An active client: its next command fails visibly.
    let _ = client.try_send(b"PING\r\n");
    match frame_or_eof(&mut client, secs(5)) {
        Ok(None) => {}
        Ok(Some(f)) => assert!(f.starts_with(b"-"), "client: got {}", escape(&f)),
        Err(e) => panic!("client: no error and no close within 5 s after Redis died: {e}"),
    }
    assert!(
        proxy.wait_for_status("/readyz", 503, secs(10)),
        "/readyz did not turn 503 within 10 s of Redis dying (last: {:?})",
        proxy.http_status("/readyz")
    );
    assert_eq!(
        proxy.http_status("/healthz"),
        Some(200),
        "/healthz while Redis is down"
    );
    // A new client while Redis is down: error or close, no hang.
    let mut during = proxy.connect();
    let _ = during.try_send(b"PING\r\n");
    match frame_or_eof(&mut during, secs(10)) {
        Ok(None) => {}
        Ok(Some(f)) => assert!(
            f.starts_with(b"-ERR"),
            "new client during outage: {}",
            escape(&f)
        ),
        Err(e) => panic!("new client during the outage hung: {e}"),
    }
    assert!(proxy.is_running(), "pubwarden exited when Redis died");

    redis.restart();
    assert!(
        proxy.wait_for_status("/readyz", 200, secs(15)),
        "/readyz did not return to 200 within 15 s of Redis restarting"
    );
    let mut fresh = proxy.connect();
    fresh.send(b"PING\r\nSET k2 v2\r\nGET k2\r\n");
    let frames = fresh
        .read_frames(3, secs(5))
        .expect_all("a new client after Redis restarted");
    assert_eq!(
        frames,
        vec![
            b"+PONG\r\n".to_vec(),
            b"+OK\r\n".to_vec(),
            b"$2\r\nv2\r\n".to_vec()
        ]
    );
}

#[test]
fn sigterm_with_no_clients_exits_zero() {
    let redis = RedisServer::start();
    let mut proxy = Pubwarden::start(redis.port());
    proxy.sigterm();
    let started = Instant::now();
    let status = proxy
        .wait_exit(secs(15))
        .expect("pubwarden did not exit within 15 s of SIGTERM with no clients");
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}"
    );
    eprintln!("exited {:?} after SIGTERM", started.elapsed());
}

#[test]
fn sigterm_stops_accepting_drains_and_exits_zero() {
    let redis = RedisServer::start();
    let mut proxy = Pubwarden::start(redis.port());
    let mut idle = proxy.connect();
    idle.send(b"PING\r\n");
    assert_eq!(idle.read_one(secs(5)), b"+PONG\r\n");
    let mut inflight = proxy.connect();
    inflight.send(b"BLPOP drain:q 1\r\n");
    thread::sleep(millis(100));

    proxy.sigterm();
    let started = Instant::now();

    // The request in flight when SIGTERM came gets its reply (a null array after 1 s).
    match frame_or_eof(&mut inflight, secs(10)) {
        Ok(Some(f)) => assert_eq!(escape(&f), escape(b"*-1\r\n"), "in-flight BLPOP reply"),
        Ok(None) => panic!("in-flight BLPOP was cut off by SIGTERM instead of drained"),
        Err(e) => panic!("in-flight BLPOP: {e}"),
    }
    // No new client is served after SIGTERM.
    thread::sleep(millis(200));
    if proxy.is_running()
        && let Ok(mut late) = RawConn::try_connect(proxy.addr())
    {
        let _ = late.try_send(b"PING\r\n");
        let (bytes, _) = late.read_until_idle(millis(500), secs(2));
        assert_ne!(
            bytes,
            b"+PONG\r\n".to_vec(),
            "a connection made after SIGTERM was still served"
        );
    }
    drop(idle);
    drop(inflight);
    let status = proxy
        .wait_exit(secs(35))
        .expect("pubwarden did not exit within 35 s of SIGTERM after its clients left");
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}"
    );
    eprintln!("exited {:?} after SIGTERM", started.elapsed());
}

#[test]
fn check_config_rejects_invalid_yaml_with_exit_64() {
    let dir = scratch_dir("config");
    let path = dir.join("broken.yaml");
    let mut f = std::fs::File::create(&path).expect("create config file");
    f.write_all(b"listen: [unclosed\n  upstream: {\n")
        .expect("write config file");
    drop(f);
    let (code, _, stderr) = run_pubwarden(&["check-config", path.to_str().expect("utf-8 path")]);
    assert_eq!(
        code,
        Some(64),
        "check-config on invalid YAML; stderr: {stderr}"
    );
    assert!(
        !stderr.trim().is_empty(),
        "check-config must say what is wrong on stderr"
    );
}
