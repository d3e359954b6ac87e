//! A `default` user with `nopass: true`: clients that never send AUTH are that user, within its
//! channels and the safe default command rules. Compared byte for byte with a Redis whose
//! `default` user has the same rules, and checked on its own.

mod support;

use support::policy::*;
use support::*;

const OPS_PW: &str = "ops-secret";

/// `default`: nopass, `public.*`, commands left out (the policy's safe default, which the
/// Redis side spells `+@pubsub +@connection +@read +@transaction -@dangerous -@admin
/// -@scripting`). `ops`: a named user allowed everything.
fn users() -> Vec<AclUser> {
    vec![
        AclUser::nopass("default").channels(&["public.*"]),
        AclUser::new("ops", OPS_PW)
            .channels(&["*"])
            .commands(&["@all"], &[]),
    ]
}

const NOPERM_CH: &str = "-NOPERM this user has no permissions to access one of the channels";

fn cases() -> Vec<PolicyCase> {
    vec![
        case(
            "no AUTH needed; safe default commands",
            &[
                ":0",
                NOPERM_CH,
                "'set'",
                "'config|get'",
                "'eval'",
                "called without any password configured for the default user",
                "+OK",
            ],
            |s| {
                let c = s.connect();
                for line in [
                    "PING",
                    "GET dk",
                    "SET dk v",
                    "DEL dk",
                    "PUBLISH public.a x",
                    "PUBLISH private x",
                    "SPUBLISH public.s x",
                    "SPUBLISH private x",
                    "CONFIG GET maxmemory",
                    "FLUSHALL",
                    "KEYS *",
                    "INFO server",
                    "CLIENT KILL 127.0.0.1:1",
                    "CLIENT SETNAME app",
                    "CLIENT GETNAME",
                    "MULTI",
                    "GET dk",
                    "EXEC",
                    "AUTH whatever",
                    "AUTH default",
                    "AUTH default anything",
                    "PUBLISH private x",
                    "AUTH ops wrong",
                    "SET dk v",
                ] {
                    s.call(c, line);
                }
                s.cmd_args(c, &[b"EVAL", b"return 1", b"0"]);
                s.expect(c, 1);
                s.cmd(c, "HELLO 3");
                s.expect_with(c, 1, mask_hello_id);
                s.cmd(c, "HELLO 2 AUTH default whatever");
                s.expect_with(c, 1, mask_hello_id);
                // A named user from there, and back.
                s.call(c, &format!("AUTH ops {OPS_PW}"));
                s.call(c, "SET dk v");
                s.call(c, "GET dk");
                s.call(c, "DEL dk");
                s.call(c, "PUBLISH private x");
                s.call(c, "AUTH default x");
                s.call(c, "PUBLISH private x");
            },
        ),
        case(
            "subscribe within the default user's channels",
            &[NOPERM_CH, "+PONG", "message", "pmessage"],
            |s| {
                let sub = s.connect();
                let publ = s.connect();
                s.call(sub, "SUBSCRIBE public.a private");
                s.call(sub, "PSUBSCRIBE *");
                s.call(sub, "PSUBSCRIBE public.a*");
                s.call(sub, "PING");
                s.call(publ, "PUBLISH public.a nobody-yet");
                s.cmd(sub, "SUBSCRIBE public.a");
                s.expect(sub, 1);
                s.cmd(sub, "PSUBSCRIBE public.*");
                s.expect(sub, 1);
                s.call(sub, "SUBSCRIBE private");
                s.call(sub, "GET k");
                s.call(publ, "PUBLISH public.a m1");
                // Channel subscribers first, then patterns: a fixed order.
                s.expect(sub, 2);
                s.call(publ, "PUBLISH public.b m2");
                s.expect(sub, 1);
                s.call(publ, "PUBLISH private m3");
                s.expect_silence(sub, 100);
                s.cmd(sub, "UNSUBSCRIBE");
                s.expect(sub, 1);
                s.cmd(sub, "PUNSUBSCRIBE");
                s.expect(sub, 1);
            },
        ),
        case(
            "RESET keeps a working connection as the default user",
            &["+RESET", "$-1", ":0", "-EXECABORT"],
            |s| {
                let c = s.connect();
                s.call(c, &format!("AUTH ops {OPS_PW}"));
                s.call(c, "SUBSCRIBE private");
                s.call(c, "RESET");
                s.call(c, "GET dk");
                s.call(c, "PUBLISH public.a x");
                s.call(c, "PUBLISH private x");
                s.call(c, "MULTI");
                s.call(c, "PUBLISH private x");
                s.call(c, "EXEC");
                s.call(c, "MULTI");
                s.call(c, "PUBLISH public.a x");
                s.call(c, "EXEC");
            },
        ),
    ]
}

#[test]
fn default_nopass_user_matches_redis_acl() {
    let fixture = AclFixture::start(&users(), Secret::File);
    fixture.compare("default user: Redis ACL vs pubwarden policy", cases());
    if fixture.proxy.is_some() {
        fixture.assert_upstream_saw_only_pubwarden(false);
    }
}

#[test]
fn default_nopass_user_publishes_and_subscribes_without_auth() {
    let policy = r#"
users:
  default:
    nopass: true
    channels:
      publish: ["public.*"]
      subscribe: ["public.*"]
"#;
    let (_redis, proxy) = start_with_policy(policy, "");
    let mut sub = proxy.connect();
    let mut publ = proxy.connect();
    expect_reply(
        &mut sub,
        &["SUBSCRIBE", "public.news"],
        &encode_array_with_count("subscribe", "public.news", 1),
    );
    expect_reply(&mut publ, &["PUBLISH", "public.news", "hello"], b":1\r\n");
    assert_eq!(
        text(&sub.read_one(secs(5))),
        text(&message("public.news", "hello"))
    );
    expect_reply(&mut publ, &["PUBLISH", "private.x", "no"], NOPERM_CHANNEL);
    let mut other = proxy.connect();
    expect_reply(&mut other, &["SUBSCRIBE", "private.x"], NOPERM_CHANNEL);
    expect_reply(
        &mut other,
        &["SUBSCRIBE", "public.a", "private.x"],
        NOPERM_CHANNEL,
    );
    expect_reply(&mut other, &["PING"], b"+PONG\r\n");
    expect_reply(&mut publ, &["SET", "k", "v"], &noperm_command("set"));
    expect_reply(&mut publ, &["GET", "k"], b"$-1\r\n");
    let (bytes, _) = sub.read_until_idle(millis(200), secs(2));
    assert!(
        bytes.is_empty(),
        "the subscriber got something it should not: {}",
        text(&bytes)
    );
}

/// `*3 <kind> <channel> :<count>`, a RESP2 confirmation.
fn encode_array_with_count(kind: &str, channel: &str, count: i64) -> Vec<u8> {
    let mut v = format!("*3\r\n${}\r\n{kind}\r\n", kind.len()).into_bytes();
    v.extend_from_slice(format!("${}\r\n{channel}\r\n:{count}\r\n", channel.len()).as_bytes());
    v
}

/// A `default` user with a password: `AUTH <password>` (one argument) authenticates as it.
#[test]
fn default_user_with_password_matches_redis_acl() {
    let users = vec![
        AclUser::new("default", "dflt-secret")
            .channels(&["public.*"])
            .commands(&["@all"], &["@dangerous"]),
        AclUser::new("ops", OPS_PW)
            .channels(&["*"])
            .commands(&["@all"], &[]),
    ];
    let fixture = AclFixture::start(&users, Secret::Env);
    fixture.compare(
        "default user with a password: Redis ACL vs pubwarden policy",
        vec![case(
            "AUTH <password> is the default user",
            &["-NOAUTH", "-WRONGPASS", "+OK", NOPERM_CH, "'flushall'"],
            |s| {
                let c = s.connect();
                for line in [
                    "PUBLISH public.a x",
                    "AUTH wrong",
                    "AUTH default wrong",
                    "AUTH dflt-secret",
                    "PUBLISH public.a x",
                    "PUBLISH private x",
                    "SET dk v",
                    "GET dk",
                    "DEL dk",
                    "FLUSHALL",
                    &format!("AUTH ops {OPS_PW}"),
                    "PUBLISH private x",
                    "AUTH wrong",
                    "PUBLISH private x",
                    "AUTH default dflt-secret",
                    "PUBLISH private x",
                    "RESET",
                    "PUBLISH public.a x",
                ] {
                    s.call(c, line);
                }
                let d = s.connect();
                s.cmd(d, "HELLO 3 AUTH default dflt-secret");
                s.expect_with(d, 1, mask_hello_id);
                s.call(d, "PUBLISH private x");
            },
        )],
    );
    if fixture.proxy.is_some() {
        fixture.assert_upstream_saw_only_pubwarden(false);
    }
}
