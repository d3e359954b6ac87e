//! Connection churn and slow partial requests: file descriptors and memory
//! come back, nothing grows without bound.

mod support;

use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::policy::*;
use support::*;

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn settle_fds(pid: u32, at_most: usize) -> usize {
    let end = Instant::now() + secs(10);
    loop {
        let n = open_fds(pid);
        if n <= at_most || Instant::now() >= end {
            return n;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn ten_thousand_connections_opened_and_closed_release_everything() {
    let redis = RedisServer::start();
    let proxy = Pubwarden::start(redis.port());
    let baseline = open_fds(proxy.pid());
    let rss_before = proxy.rss_kb();
    for wave in 0..10 {
        let mut conns: Vec<TcpStream> = (0..1000)
            .map(|i| {
                TcpStream::connect(proxy.addr())
                    .unwrap_or_else(|e| panic!("wave {wave} connection {i}: {e}"))
            })
            .collect();
        for c in conns.iter_mut().step_by(50) {
            std::io::Write::write_all(c, b"PING\r\n").expect("ping");
        }
        for c in conns.iter_mut().step_by(50) {
            c.set_read_timeout(Some(secs(5))).ok();
            let mut buf = [0u8; 7];
            std::io::Read::read_exact(c, &mut buf).expect("pong");
            assert_eq!(&buf, b"+PONG\r\n");
        }
        drop(conns);
    }
    let after = settle_fds(proxy.pid(), baseline + 2);
    assert!(
        after <= baseline + 2,
        "file descriptors: {baseline} before, {after} after"
    );
    let grown = proxy.rss_kb().saturating_sub(rss_before);
    // 10,000 connections came and went; what stays is allocator slack.
    assert!(grown < 48 * 1024, "RSS grew by {grown} KiB");
    let mut c = proxy.connect();
    expect_reply(&mut c, &["PING"], b"+PONG\r\n");
}

#[test]
fn slowloris_partial_requests_hold_only_what_they_sent() {
    let redis = RedisServer::start();
    let proxy = Pubwarden::start(redis.port());
    let rss_before = proxy.rss_kb();
    // Each announces a 400 MB argument and then trickles a few bytes.
    let mut lurkers: Vec<RawConn> = (0..300).map(|_| proxy.connect()).collect();
    for c in &mut lurkers {
        c.send(b"*2\r\n$3\r\nSET\r\n$400000000\r\nabc");
    }
    for round in 0..5 {
        for c in &mut lurkers {
            c.send(format!("more-{round}").as_bytes());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let grown = proxy.rss_kb().saturating_sub(rss_before);
    assert!(
        grown < 32 * 1024,
        "300 slow requests made pubwarden grow by {grown} KiB"
    );
    // Everyone else is served meanwhile.
    let mut c = proxy.connect();
    expect_reply(&mut c, &["PING"], b"+PONG\r\n");
    let baseline = open_fds(proxy.pid());
    drop(lurkers);
    let after = settle_fds(proxy.pid(), baseline.saturating_sub(500));
    assert!(
        after <= baseline.saturating_sub(500),
        "closing 300 slow clients left {after} fds open (was {baseline})"
    );
}
