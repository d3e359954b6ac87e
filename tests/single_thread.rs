//! The relay on a single-threaded runtime (`worker_threads: 1`, what a sidecar
//! limited to one CPU gets), where reads that drain a socket also clear its
//! readiness without a further read: nothing may be lost or stall.

mod support;

use std::time::Duration;

use support::policy::*;
use support::*;

fn start_single_threaded() -> (RedisServer, Pubwarden) {
    let redis = RedisServer::start();
    let settings = scratch_dir("single").join("settings.yaml");
    write_file(&settings, "worker_threads: 1\n");
    let proxy = Pubwarden::start_custom(redis.port(), Some(&settings), WaitFor::Ready, &[], &[]);
    (redis, proxy)
}

#[test]
fn fan_out_and_pipelines_are_complete_and_in_order() {
    let (_redis, proxy) = start_single_threaded();
    let mut subs: Vec<RawConn> = (0..20)
        .map(|i| {
            let mut c = proxy.connect();
            if i % 2 == 0 {
                c.send(&encode(&["SUBSCRIBE", "t"]));
            } else {
                c.send(&encode(&["PSUBSCRIBE", "t*"]));
            }
            c.read_frames(1, secs(5)).expect_all("subscribe");
            c
        })
        .collect();
    // A pipeline of publishes in one write, replies read at the end.
    const N: usize = 2000;
    let mut publisher = proxy.connect();
    let mut batch = Vec::new();
    for i in 0..N {
        batch.extend_from_slice(&encode(&["PUBLISH", "t", &i.to_string()]));
    }
    publisher.send(&batch);
    let replies = publisher
        .read_frames(N, secs(20))
        .expect_all("publish replies");
    assert!(replies.iter().all(|r| r == b":20\r\n"));
    for (s, sub) in subs.iter_mut().enumerate() {
        let frames = sub.read_frames(N, secs(20)).expect_all("deliveries");
        for (i, f) in frames.iter().enumerate() {
            let want = if s % 2 == 0 {
                message("t", &i.to_string())
            } else {
                encode(&["pmessage", "t*", "t", &i.to_string()])
            };
            assert_eq!(text(f), text(&want), "subscriber {s}, message {i}");
        }
    }
    // Trickled, one small read at a time: every reply arrives, none stalls.
    let mut c = proxy.connect();
    for i in 0..200 {
        c.send(&encode(&["ECHO", &i.to_string()]));
        let r = c.read_one(secs(5));
        assert_eq!(text(&r), text(&encode_bulk(&i.to_string())), "echo {i}");
        if i % 50 == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn encode_bulk(s: &str) -> Vec<u8> {
    format!("${}\r\n{s}\r\n", s.len()).into_bytes()
}
