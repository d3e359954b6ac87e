//! Live policy reload: file changes (including the atomic rename Kubernetes
//! does), SIGHUP and POST /reload; a bad policy changes nothing; connections
//! the new policy no longer allows are closed, others go on.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use support::policy::*;
use support::*;

const PW: &str = "reload-secret";

fn policy(alice_channels: &str, with_bob: bool) -> String {
    let mut p = format!(
        "auth:\n  max_failures_per_minute: 0\nusers:\n  alice:\n    passwords: [{h}]\n    channels:\n      publish: {alice_channels}\n      subscribe: {alice_channels}\n",
        h = yq(&hashed(PW))
    );
    if with_bob {
        p.push_str(&format!(
            "  bob:\n    passwords: [{h}]\n    channels:\n      publish: [\"*\"]\n      subscribe: [\"*\"]\n",
            h = yq(&hashed(PW))
        ));
    }
    p
}

/// Replaces the file the way editors and Kubernetes do: write aside, rename over.
fn replace_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    write_file(&tmp, text);
    std::fs::rename(&tmp, path).expect("rename policy into place");
}

fn policy_path(proxy_settings: &Path) -> std::path::PathBuf {
    proxy_settings.with_file_name("policy.yaml")
}

fn post(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect admin");
    s.set_read_timeout(Some(secs(10))).ok();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .expect("send POST");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, out)
}

fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn start(policy_yaml: &str) -> (RedisServer, Pubwarden, std::path::PathBuf) {
    let redis = RedisServer::start();
    let settings = write_settings(policy_yaml, "");
    let proxy = Pubwarden::start_custom(redis.port(), Some(&settings), WaitFor::Ready, &[], &[]);
    (redis, proxy, settings)
}

#[test]
fn file_change_applies_and_tightening_closes_only_affected_subscribers() {
    let (_redis, proxy, settings) = start(&policy(r#"["news.*", "sport.*"]"#, false));
    let mut on_news = proxy.connect();
    expect_reply(&mut on_news, &["AUTH", "alice", PW], OK);
    on_news.send(&encode(&["SUBSCRIBE", "news.a"]));
    on_news
        .read_frames(1, secs(5))
        .expect_all("subscribe news.a");
    let mut on_sport = proxy.connect();
    expect_reply(&mut on_sport, &["AUTH", "alice", PW], OK);
    on_sport.send(&encode(&["SUBSCRIBE", "sport.b"]));
    on_sport
        .read_frames(1, secs(5))
        .expect_all("subscribe sport.b");

    // news.* is withdrawn: the news subscriber is closed, as Redis does when ACL
    // rules tighten; the sport subscriber keeps its connection and its messages.
    replace_atomically(&policy_path(&settings), &policy(r#"["sport.*"]"#, false));
    let (_, closed) = on_news.read_until_eof(secs(10));
    assert!(
        closed,
        "the subscriber whose channel was withdrawn was not closed"
    );
    let mut publisher = proxy.connect();
    expect_reply(&mut publisher, &["AUTH", "alice", PW], OK);
    expect_reply(&mut publisher, &["PUBLISH", "sport.b", "goal"], b":1\r\n");
    assert_eq!(
        text(&on_sport.read_one(secs(5))),
        text(&message("sport.b", "goal"))
    );
    // New commands see the new policy.
    expect_reply(&mut publisher, &["PUBLISH", "news.a", "x"], NOPERM_CHANNEL);
    let logs = proxy.logs();
    assert!(logs.contains("policy reloaded"), "{logs}");
    assert!(
        logs.contains("closing connection after policy reload"),
        "{logs}"
    );
}

#[test]
fn removed_user_is_disconnected_and_sighup_adds_users() {
    let (_redis, proxy, settings) = start(&policy(r#"["*"]"#, true));
    let mut bob = proxy.connect();
    expect_reply(&mut bob, &["AUTH", "bob", PW], OK);
    expect_reply(&mut bob, &["PING"], b"+PONG\r\n");
    // bob is gone from the new policy: his idle connection is closed.
    replace_atomically(&policy_path(&settings), &policy(r#"["*"]"#, false));
    let (_, closed) = bob.read_until_eof(secs(10));
    assert!(closed, "a removed user's connection stayed open");
    let mut again = proxy.connect();
    expect_reply(&mut again, &["AUTH", "bob", PW], WRONGPASS);

    // SIGHUP reloads at once (the content is the same as a moment ago plus bob).
    std::fs::write(policy_path(&settings), policy(r#"["*"]"#, true)).expect("write policy");
    std::process::Command::new("kill")
        .args(["-HUP", &proxy.pid().to_string()])
        .status()
        .expect("send SIGHUP");
    assert!(
        eventually(secs(5), || call(&mut proxy.connect(), &["AUTH", "bob", PW])
            == OK),
        "bob could not log in after SIGHUP:\n{}",
        proxy.logs()
    );
}

#[test]
fn a_bad_policy_changes_nothing_and_reports_every_error() {
    let (_redis, proxy, settings) = start(&policy(r#"["news.*"]"#, false));
    let path = policy_path(&settings);
    std::fs::write(
        &path,
        "users:\n  alice:\n    passwords: [nope]\n    colour: red\n",
    )
    .expect("write");
    let (status, body) = post(proxy.admin_addr(), "/reload");
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("users.alice.passwords[0] (line 3"), "{body}");
    assert!(body.contains("users.alice.colour (line 4"), "{body}");
    // The previous policy is still in force.
    let mut c = proxy.connect();
    expect_reply(&mut c, &["AUTH", "alice", PW], OK);
    expect_reply(&mut c, &["PUBLISH", "news.x", "1"], b":0\r\n");
    let (_, metrics) = http_get(proxy.admin_addr(), "/metrics").expect("scrape");
    assert!(
        metrics.contains("pubwarden_config_reloads_total{result=\"failure\"} 1"),
        "{metrics}"
    );
    // Fixing the file and asking again works.
    std::fs::write(&path, policy(r#"["other.*"]"#, false)).expect("write");
    let (status, body) = post(proxy.admin_addr(), "/reload");
    assert_eq!(status, 200, "{body}");
    expect_reply(&mut c, &["PUBLISH", "news.x", "1"], NOPERM_CHANNEL);
    let (_, metrics) = http_get(proxy.admin_addr(), "/metrics").expect("scrape");
    assert!(
        metrics.contains("pubwarden_config_reloads_total{result=\"success\"} 1"),
        "{metrics}"
    );
}

#[test]
fn reload_without_a_policy_says_so() {
    let redis = RedisServer::start();
    let proxy = Pubwarden::start(redis.port());
    let (status, body) = post(proxy.admin_addr(), "/reload");
    assert_eq!(status, 404, "{body}");
}

#[test]
fn reload_storm_under_load_loses_no_allowed_message() {
    let (_redis, proxy, settings) = start(&policy(r#"["*"]"#, false));
    let mut sub = proxy.connect();
    expect_reply(&mut sub, &["AUTH", "alice", PW], OK);
    sub.send(&encode(&["SUBSCRIBE", "storm"]));
    sub.read_frames(1, secs(5)).expect_all("subscribe");
    let mut publisher = proxy.connect();
    expect_reply(&mut publisher, &["AUTH", "alice", PW], OK);
    let path = policy_path(&settings);
    const N: usize = 400;
    for i in 0..N {
        if i % 20 == 0 {
            // Same rules, different text: a real reload each time.
            let mut p = policy(r#"["*"]"#, false);
            p.push_str(&format!("# revision {i}\n"));
            replace_atomically(&path, &p);
            let _ = post(proxy.admin_addr(), "/reload");
        }
        expect_reply(
            &mut publisher,
            &["PUBLISH", "storm", &i.to_string()],
            b":1\r\n",
        );
    }
    let frames = sub.read_frames(N, secs(10)).expect_all("every message");
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(
            text(f),
            text(&message("storm", &i.to_string())),
            "message {i}"
        );
    }
}
