//! Per-user policy features without a Redis ACL equivalent: audit mode, the per-user
//! connection limit and the source-address restriction.

mod support;

use std::time::Instant;

use support::policy::*;
use support::*;

const PW: &str = "user-secret";

fn user(name: &str, extra: &str) -> String {
    format!(
        "  {name}:\n    passwords: [{}]\n    channels:\n      publish: [\"allowed.*\"]\n      subscribe: [\"allowed.*\"]\n{extra}",
        yq(&hashed(PW))
    )
}

fn auth(c: &mut RawConn, name: &str) -> Vec<u8> {
    call(c, &["AUTH", name, PW])
}

#[test]
fn audit_mode_lets_denied_commands_through() {
    let policy = format!(
        "mode: audit\nauth:\n  max_failures_per_minute: 0\nusers:\n{}{}",
        user("auditee", ""),
        user("strict", "    mode: enforce\n")
    );
    let (redis, proxy) = start_with_policy(&policy, "");
    let mut watcher = RawConn::connect(redis.addr());
    expect_reply(
        &mut watcher,
        &["SUBSCRIBE", "secret.x"],
        b"*3\r\n$9\r\nsubscribe\r\n$8\r\nsecret.x\r\n:1\r\n",
    );

    let mut a = proxy.connect();
    // Audit does not weaken authentication.
    expect_reply(&mut a, &["PUBLISH", "secret.x", "x"], NOAUTH);
    expect_reply(&mut a, &["AUTH", "auditee", "wrong"], WRONGPASS);
    expect_reply(&mut a, &["AUTH", "auditee", PW], OK);
    // A denied channel: executed anyway, Redis's own reply, and the message is delivered.
    expect_reply(&mut a, &["PUBLISH", "secret.x", "audited"], b":1\r\n");
    assert_eq!(
        text(&watcher.read_one(secs(5))),
        text(&message("secret.x", "audited")),
        "the audited PUBLISH did not reach the subscriber"
    );
    // A denied command (SET is outside the safe default): executed anyway.
    expect_reply(&mut a, &["SET", "audit:k", "v"], OK);
    let mut check = RawConn::connect(redis.addr());
    expect_reply(&mut check, &["GET", "audit:k"], b"$1\r\nv\r\n");
    // A denied SUBSCRIBE: subscribed anyway.
    let mut s = proxy.connect();
    expect_reply(&mut s, &["AUTH", "auditee", PW], OK);
    expect_reply(
        &mut s,
        &["SUBSCRIBE", "secret.y"],
        b"*3\r\n$9\r\nsubscribe\r\n$8\r\nsecret.y\r\n:1\r\n",
    );
    expect_reply(&mut a, &["PUBLISH", "secret.y", "seen"], b":1\r\n");
    assert_eq!(
        text(&s.read_one(secs(5))),
        text(&message("secret.y", "seen"))
    );

    // A user with `mode: enforce` inside an audit policy is enforced.
    let mut e = proxy.connect();
    expect_reply(&mut e, &["AUTH", "strict", PW], OK);
    expect_reply(&mut e, &["PUBLISH", "secret.x", "blocked"], NOPERM_CHANNEL);
    expect_reply(&mut e, &["SET", "audit:k", "w"], &noperm_command("set"));
    expect_reply(&mut e, &["PUBLISH", "allowed.x", "fine"], b":0\r\n");
    expect_reply(&mut check, &["GET", "audit:k"], b"$1\r\nv\r\n");
    let (extra, _) = watcher.read_until_idle(millis(300), secs(2));
    assert!(
        extra.is_empty(),
        "the enforced user's PUBLISH reached Redis: {}",
        escape_short(&extra, 200)
    );
}

#[test]
fn connection_limit_per_user() {
    let policy = format!(
        "auth:\n  max_failures_per_minute: 0\nusers:\n{}{}",
        user("limited", "    max_connections: 2\n"),
        user("other", "")
    );
    let (_redis, proxy) = start_with_policy(&policy, "");
    let mut c1 = proxy.connect();
    let mut c2 = proxy.connect();
    let mut c3 = proxy.connect();
    expect_reply(&mut c1, &["AUTH", "limited", PW], OK);
    expect_reply(&mut c2, &["AUTH", "limited", PW], OK);
    let third = auth(&mut c3, "limited");
    let third_text = String::from_utf8_lossy(&third).to_lowercase();
    assert!(
        third_text.starts_with("-err") && third_text.contains("max"),
        "the third connection of a user with max_connections: 2 must be refused with an -ERR \
         naming the maximum; got {}",
        text(&third)
    );
    // The first two keep working; other users are not affected.
    expect_reply(&mut c1, &["PUBLISH", "allowed.a", "1"], b":0\r\n");
    expect_reply(&mut c2, &["PUBLISH", "allowed.a", "2"], b":0\r\n");
    let mut o = proxy.connect();
    expect_reply(&mut o, &["AUTH", "other", PW], OK);
    // HELLO AUTH counts too.
    let mut h = proxy.connect();
    let hello = call(&mut h, &["HELLO", "3", "AUTH", "limited", PW]);
    let hello_text = String::from_utf8_lossy(&hello).to_lowercase();
    assert!(
        hello_text.starts_with("-err") && hello_text.contains("max"),
        "HELLO 3 AUTH as a third connection must be refused; got {}",
        text(&hello)
    );
    // Once one of the two closes, a new connection gets in (bounded wait for the close).
    c1.shutdown();
    drop(c1);
    let deadline = Instant::now() + secs(5);
    let mut c4 = loop {
        let mut c = proxy.connect();
        let reply = auth(&mut c, "limited");
        if reply == OK {
            break c;
        }
        assert!(
            Instant::now() < deadline,
            "after closing one of the two connections, AUTH as `limited` is still refused: {}",
            text(&reply)
        );
        std::thread::sleep(millis(100));
    };
    expect_reply(&mut c4, &["PUBLISH", "allowed.a", "4"], b":0\r\n");
    expect_reply(&mut c2, &["PUBLISH", "allowed.a", "5"], b":0\r\n");
}

#[test]
fn source_restriction_refuses_other_networks() {
    let policy = format!(
        "auth:\n  max_failures_per_minute: 0\nusers:\n{}{}",
        user("remote", "    sources: [\"10.0.0.0/8\"]\n"),
        user("local", "    sources: [\"127.0.0.0/8\", \"::1/128\"]\n")
    );
    let (_redis, proxy) = start_with_policy(&policy, "");
    let mut c = proxy.connect();
    expect_reply(&mut c, &["AUTH", "remote", PW], WRONGPASS);
    expect_reply(&mut c, &["HELLO", "3", "AUTH", "remote", PW], WRONGPASS);
    expect_reply(&mut c, &["PUBLISH", "allowed.a", "x"], NOAUTH);
    expect_reply(&mut c, &["AUTH", "local", PW], OK);
    expect_reply(&mut c, &["PUBLISH", "allowed.a", "x"], b":0\r\n");
    // Already authenticated: a refused AUTH keeps the current user.
    expect_reply(&mut c, &["AUTH", "remote", PW], WRONGPASS);
    expect_reply(&mut c, &["PUBLISH", "allowed.a", "x"], b":0\r\n");
}

#[test]
fn pubsub_channels_does_not_reveal_channels_the_user_may_not_subscribe_to() {
    let policy = format!(
        "auth:\n  max_failures_per_minute: 0\nusers:\n{}",
        user("viewer", "")
    );
    let (redis, proxy) = start_with_policy(&policy, "");
    // Subscribers straight on Redis, one on a channel the viewer may see, one it may not.
    let mut seen = RawConn::connect(redis.addr());
    call(&mut seen, &["SUBSCRIBE", "allowed.visible"]);
    let mut hidden = RawConn::connect(redis.addr());
    call(&mut hidden, &["SUBSCRIBE", "secret.hidden"]);
    let mut v = proxy.connect();
    expect_reply(&mut v, &["AUTH", "viewer", PW], OK);
    // A denial (NOPERM) reveals nothing either; what matters is that the hidden channel and
    // its subscriber count never show.
    for args in [
        &["PUBSUB", "CHANNELS"][..],
        &["PUBSUB", "CHANNELS", "*"],
        &["PUBSUB", "CHANNELS", "secret.*"],
        &["PUBSUB", "SHARDCHANNELS"],
    ] {
        let reply = call(&mut v, args);
        assert!(
            !String::from_utf8_lossy(&reply).contains("secret.hidden"),
            "{args:?} revealed a channel the user may not subscribe to: {}",
            text(&reply)
        );
    }
    let reply = call(&mut v, &["PUBSUB", "NUMSUB", "secret.hidden"]);
    assert!(
        !reply.ends_with(b":1\r\n"),
        "PUBSUB NUMSUB revealed the subscribers of a channel the user may not subscribe to: {}",
        text(&reply)
    );
    // The user's own channels may be looked at.
    let reply = call(&mut v, &["PUBSUB", "NUMSUB", "allowed.visible"]);
    assert_eq!(
        text(&reply),
        text(b"*2\r\n$15\r\nallowed.visible\r\n:1\r\n"),
        "PUBSUB NUMSUB of an allowed channel"
    );
}
