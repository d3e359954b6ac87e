//! pubwarden's policy against real Redis ACL: the same users are created as ACL users on a
//! redis-server of the test's own and written into a pubwarden policy (both from one
//! [`AclUser`] description), and every script runs once against that Redis directly
//! (authenticating as the ACL users) and once through pubwarden (authenticating to pubwarden's
//! policy users, while pubwarden itself talks to a second, locked-down Redis that knows none of
//! them). The bytes each connection receives must be identical.

mod support;

use support::policy::*;
use support::script::Session;
use support::*;

const ALICE_PW: &str = "alice-secret";
const BOB_PW: &str = "bob-secret";
const CAROL_PW: &str = "carol-secret";

/// alice: `orders.*` and `news`, everything but @dangerous and @scripting
/// (Redis: `+@all -@dangerous -@scripting &orders.* &news`).
/// bob: every channel, everything but @dangerous, plus `config|get` by name
/// (Redis: `+@all -@dangerous +config|get &*`).
/// carol: disabled.
/// No `default` user: Redis's own `default` is switched off, so nobody is compared as it.
fn users() -> Vec<AclUser> {
    vec![
        AclUser::new("alice", ALICE_PW)
            .channels(&["orders.*", "news"])
            .commands(&["@all"], &["@dangerous", "@scripting"]),
        AclUser::new("bob", BOB_PW)
            .channels(&["*"])
            .commands(&["@all", "config|get"], &["@dangerous"]),
        AclUser::new("carol", CAROL_PW)
            .disabled()
            .channels(&["*"])
            .commands(&["@all"], &[]),
    ]
}

fn auth_alice(s: &mut Session, c: usize) {
    s.call(c, &format!("AUTH alice {ALICE_PW}"));
}

fn auth_bob(s: &mut Session, c: usize) {
    s.call(c, &format!("AUTH bob {BOB_PW}"));
}

const NOPERM_CH: &str = "-NOPERM this user has no permissions to access one of the channels";

fn cases() -> Vec<PolicyCase> {
    vec![
        case(
            "before AUTH: NOAUTH, argument errors, WRONGPASS",
            &[
                "-NOAUTH Authentication required.",
                "-NOAUTH HELLO must be called",
                "-WRONGPASS",
                "-ERR syntax error",
                "wrong number of arguments for 'auth'",
            ],
            |s| {
                let c = s.connect();
                for line in [
                    "GET k",
                    "PING",
                    "SUBSCRIBE orders.a",
                    "PUBLISH orders.a x",
                    "HELLO 3",
                    "HELLO 2",
                    &format!("HELLO 3 AUTH alice wrong-{ALICE_PW}"),
                    "AUTH",
                    "AUTH a b c",
                    "AUTH a b c d e f g h i",
                    // One argument: the `default` user, which does not exist here.
                    &format!("AUTH {ALICE_PW}"),
                    "AUTH alice wrong",
                    &format!("AUTH nobody {ALICE_PW}"),
                    &format!("AUTH ALICE {ALICE_PW}"),
                    &format!("AUTH carol {CAROL_PW}"),
                    "GET k",
                    "RESET",
                    "GET k",
                ] {
                    s.call(c, line);
                }
                // An inline command, and the largest bulk still accepted before AUTH.
                s.send(c, b"PING\r\n");
                s.expect(c, 1);
                let big = vec![b'x'; 16384];
                s.cmd_args(c, &[b"ECHO", &big]);
                s.expect(c, 1);
                s.cmd(c, "QUIT");
                s.expect_until_eof(c);
            },
        ),
        case(
            "before AUTH: more than 10 arguments",
            &["Protocol error: unauthenticated multibulk length"],
            |s| {
                let c = s.connect();
                s.call(c, "GET k");
                s.send(c, b"*11\r\n");
                s.expect_until_eof(c);
                // The same as a whole command on another connection.
                let d = s.connect();
                s.cmd(d, "AUTH a b c d e f g h i j");
                s.expect_until_eof(d);
            },
        ),
        case(
            "before AUTH: a bulk over 16384 bytes",
            &["Protocol error: unauthenticated bulk length"],
            |s| {
                let c = s.connect();
                s.send(c, b"*2\r\n$4\r\nECHO\r\n$16385\r\n");
                s.expect_until_eof(c);
            },
        ),
        case("after AUTH the pre-auth caps are gone", &["+OK"], |s| {
            let c = s.connect();
            auth_alice(s, c);
            let big = vec![b'y'; 20000];
            s.cmd_args(c, &[b"ECHO", &big]);
            s.expect(c, 1);
            s.call(
                c,
                "DEL cap:1 cap:2 cap:3 cap:4 cap:5 cap:6 cap:7 cap:8 cap:9 cap:10 cap:11",
            );
            s.call(c, "GET k");
        }),
        case(
            "AUTH success, failure keeps the user, switching users",
            &["+OK", "-WRONGPASS", "'config|get'", "maxmemory"],
            |s| {
                let c = s.connect();
                auth_alice(s, c);
                s.call(c, "CONFIG GET maxmemory");
                s.call(c, "PUBLISH elsewhere x");
                s.call(c, "AUTH bob wrong");
                s.call(c, "CONFIG GET maxmemory");
                auth_bob(s, c);
                s.call(c, "CONFIG GET maxmemory");
                s.call(c, "PUBLISH elsewhere x");
                s.call(c, "FLUSHALL");
                auth_alice(s, c);
                s.call(c, "PUBLISH elsewhere x");
                s.call(c, "AUTH nobody x");
                s.call(c, "PUBLISH orders.x y");
                // Pipelined: AUTH and commands in one write.
                s.send(
                    c,
                    format!("AUTH bob {BOB_PW}\r\nPUBLISH elsewhere x\r\nAUTH alice {ALICE_PW}\r\nPUBLISH elsewhere x\r\n"),
                );
                s.expect(c, 4);
            },
        ),
        case(
            "PUBLISH and SPUBLISH allowed and denied",
            &[":0", NOPERM_CH],
            |s| {
                let c = s.connect();
                auth_alice(s, c);
                for line in [
                    "PUBLISH orders.new hi",
                    "PUBLISH orders. hi",
                    "PUBLISH news hi",
                    "PUBLISH newsx hi",
                    "PUBLISH orders hi",
                    "PUBLISH Orders.new hi",
                    "PUBLISH secret hi",
                    "SPUBLISH orders.a hi",
                    "SPUBLISH secret hi",
                    "PUBLISH",
                    "PUBLISH secret",
                ] {
                    s.call(c, line);
                }
                // Binary-safe channel names still match `orders.*`.
                s.cmd_args(c, &[b"PUBLISH", b"orders.\r\n\0\xff", b"x"]);
                s.expect(c, 1);
                s.cmd_args(c, &[b"PUBLISH", b"\0orders.a", b"x"]);
                s.expect(c, 1);
            },
        ),
        case(
            "SUBSCRIBE with one denied channel subscribes nothing",
            &[
                NOPERM_CH,
                "+PONG",
                "*3\\r\\n$11\\r\\nunsubscribe\\r\\n$-1\\r\\n:0",
            ],
            |s| {
                let sub = s.connect();
                let publ = s.connect();
                auth_alice(s, sub);
                auth_bob(s, publ);
                s.call(sub, "SUBSCRIBE orders.a secret news");
                s.call(sub, "SSUBSCRIBE orders.a secret");
                s.call(sub, "SUBSCRIBE secret");
                // Not in subscribed mode: a plain PONG, and nobody listens.
                s.call(sub, "PING");
                s.call(publ, "PUBLISH orders.a x");
                s.call(publ, "PUBLISH news x");
                s.call(publ, "PUBSUB NUMSUB orders.a news secret");
                s.call(sub, "UNSUBSCRIBE");
                s.call(sub, "SUNSUBSCRIBE");
                // Now the allowed ones, and a delivery.
                s.cmd(sub, "SUBSCRIBE orders.a news");
                s.expect(sub, 2);
                s.cmd(sub, "SSUBSCRIBE orders.s");
                s.expect(sub, 1);
                s.call(publ, "PUBLISH orders.a m1");
                s.expect(sub, 1);
                s.call(publ, "PUBLISH news m2");
                s.expect(sub, 1);
                s.call(publ, "SPUBLISH orders.s m3");
                s.expect(sub, 1);
                s.call(publ, "PUBLISH secret m4");
                s.expect_silence(sub, 100);
            },
        ),
        case(
            "PSUBSCRIBE: only a literally allowed pattern",
            &[NOPERM_CH, "psubscribe", "pmessage"],
            |s| {
                let sub = s.connect();
                let publ = s.connect();
                auth_alice(s, sub);
                auth_bob(s, publ);
                for line in [
                    "PSUBSCRIBE orders.x*",
                    "PSUBSCRIBE orders.a",
                    "PSUBSCRIBE *",
                    "PSUBSCRIBE orders.?",
                    "PSUBSCRIBE news*",
                    "PSUBSCRIBE orders.* secret",
                ] {
                    s.call(sub, line);
                }
                s.call(sub, "PING");
                s.cmd(sub, "PSUBSCRIBE orders.* news");
                s.expect(sub, 2);
                s.call(publ, "PUBLISH orders.b m1");
                s.expect(sub, 1);
                s.call(publ, "PUBLISH news m2");
                s.expect(sub, 1);
                s.call(publ, "PUBLISH other m3");
                s.expect_silence(sub, 100);
                s.cmd(sub, "PUNSUBSCRIBE");
                s.expect_unordered(sub, 2);
                // bob may subscribe to every channel: any pattern is allowed.
                let b = s.connect();
                auth_bob(s, b);
                s.cmd(b, "PSUBSCRIBE a?c* [xy]z\\*");
                s.expect(b, 2);
            },
        ),
        case(
            "denied and allowed commands",
            &[
                "'flushall'",
                "'client|kill'",
                "'config|get'",
                "'config|set'",
                "'keys'",
                "'eval'",
                "'debug'",
                "'monitor'",
            ],
            |s| {
                let c = s.connect();
                auth_alice(s, c);
                for line in [
                    "FLUSHALL",
                    "FLUSHDB",
                    "CLIENT KILL 127.0.0.1:1",
                    "CLIENT KILL ID 1",
                    "CONFIG GET x",
                    "CONFIG SET maxmemory 1",
                    "KEYS *",
                    "DEBUG SLEEP 0",
                    "SCRIPT FLUSH",
                    "FUNCTION LIST",
                    "FCALL f 0",
                    "SET cmd:k v",
                    "GET cmd:k",
                    "DEL cmd:k",
                    "CLIENT SETNAME tester",
                    "CLIENT GETNAME",
                    "ECHO hi",
                    "INCRBY cmd:n 0",
                    "DEL cmd:n",
                    "MONITOR",
                    "PING",
                ] {
                    s.call(c, line);
                }
                s.cmd_args(
                    c,
                    &[b"EVAL", b"return redis.call('publish','secret','x')", b"0"],
                );
                s.expect(c, 1);
                s.cmd_args(c, &[b"EVAL", b"return 1", b"0"]);
                s.expect(c, 1);
            },
        ),
        case(
            "command errors Redis checks before ACL",
            &["unknown command", "wrong number of arguments"],
            |s| {
                let c = s.connect();
                auth_alice(s, c);
                for line in [
                    "NOSUCHCMD a b",
                    "GET",
                    "KEYS",
                    "CONFIG",
                    "CLIENT NOSUCHSUB",
                    "CONFIG NOSUCHSUB",
                ] {
                    s.call(c, line);
                }
            },
        ),
        case(
            "a denied command inside MULTI aborts EXEC",
            &["+QUEUED", "'flushall'", "-EXECABORT Transaction discarded"],
            |s| {
                let c = s.connect();
                auth_alice(s, c);
                for line in [
                    "MULTI",
                    "SET multi:a 1",
                    "FLUSHALL",
                    "EXEC",
                    "GET multi:a",
                    "MULTI",
                    "PUBLISH orders.a x",
                    "PUBLISH secret x",
                    "EXEC",
                    "MULTI",
                    "SET multi:b 1",
                    "PUBLISH orders.a x",
                    "CONFIG GET maxmemory",
                    "DISCARD",
                    "GET multi:b",
                    "MULTI",
                    "SET multi:b 1",
                    "PUBLISH orders.a x",
                    "EXEC",
                    "DEL multi:b",
                ] {
                    s.call(c, line);
                }
                // The same transaction pipelined in one write.
                s.send(
                    c,
                    b"MULTI\r\nSET multi:c 1\r\nSUBSCRIBE orders.a secret\r\nEXEC\r\nGET multi:c\r\n",
                );
                s.expect(c, 5);
            },
        ),
        case(
            "RESP2 subscribed mode: ACL is checked before the subscribed-context rule",
            &[
                "'flushall'",
                NOPERM_CH,
                "Can't execute 'publish'",
                "Can't execute 'get'",
                "+RESET",
                "-NOAUTH",
            ],
            |s| {
                let c = s.connect();
                auth_alice(s, c);
                s.call(c, "SUBSCRIBE news");
                for line in [
                    "FLUSHALL",
                    "PUBLISH secret x",
                    "PUBLISH news x",
                    "GET k",
                    "CONFIG GET x",
                    "SET k v",
                    "PING",
                    "PING hello",
                    "SUBSCRIBE secret",
                    "SUBSCRIBE news secret",
                    "PSUBSCRIBE orders.x*",
                ] {
                    s.call(c, line);
                }
                s.cmd(c, "PSUBSCRIBE orders.*");
                s.expect(c, 1);
                s.cmd(c, "UNSUBSCRIBE");
                s.expect(c, 1);
                s.call(c, "GET k");
                s.call(c, "RESET");
                s.call(c, "GET k");
                s.call(c, "SUBSCRIBE news");
            },
        ),
        case(
            "RESET: the connection is unauthenticated again",
            &["+RESET", "-NOAUTH", "$1\\r\\nv"],
            |s| {
                let c = s.connect();
                auth_alice(s, c);
                s.call(c, "SET reset:k v");
                s.call(c, "CLIENT SETNAME before-reset");
                s.call(c, "RESET");
                s.call(c, "GET reset:k");
                s.call(c, "PUBLISH orders.a x");
                auth_alice(s, c);
                s.call(c, "GET reset:k");
                s.call(c, "CLIENT GETNAME");
                s.call(c, "PUBLISH orders.a x");
                s.call(c, "PUBLISH secret x");
                s.call(c, "DEL reset:k");
            },
        ),
        case(
            "HELLO 3 AUTH",
            &[
                "%7\\r\\n",
                "proto",
                ">3\\r\\n$9\\r\\nsubscribe",
                ">3\\r\\n$7\\r\\nmessage",
            ],
            |s| {
                let c = s.connect();
                let publ = s.connect();
                auth_bob(s, publ);
                s.cmd(c, &format!("HELLO 3 AUTH alice {ALICE_PW}"));
                s.expect_with(c, 1, mask_hello_id);
                s.call(c, "SUBSCRIBE orders.a secret");
                s.cmd(c, "SUBSCRIBE orders.a");
                s.expect(c, 1);
                s.call(c, "GET hello:k");
                s.call(c, "FLUSHALL");
                s.call(c, "PUBLISH secret x");
                s.call(publ, "PUBLISH orders.a m1");
                s.expect(c, 1);
                // A failed HELLO AUTH keeps the connection as alice.
                s.call(c, "HELLO 3 AUTH alice wrong");
                s.call(c, "HELLO 3 AUTH carol x");
                s.call(c, "PUBLISH orders.b y");
                s.call(c, "CONFIG GET maxmemory");
                // Switching user with HELLO, and SETNAME.
                s.cmd(c, &format!("HELLO 3 AUTH bob {BOB_PW} SETNAME via-hello"));
                s.expect_with(c, 1, mask_hello_id);
                s.call(c, "CLIENT GETNAME");
                s.call(c, "CONFIG GET maxmemory");
                // HELLO 2 AUTH on a fresh connection.
                let d = s.connect();
                s.cmd(d, &format!("HELLO 2 AUTH alice {ALICE_PW}"));
                s.expect_with(d, 1, mask_hello_id);
                s.call(d, "PUBLISH secret x");
                s.call(d, "HELLO 4 AUTH alice x");
            },
        ),
    ]
}

#[test]
fn policy_matches_redis_acl_byte_for_byte() {
    let fixture = AclFixture::start(&users(), Secret::Env);
    fixture.compare("Redis ACL vs pubwarden policy", cases());
    if fixture.proxy.is_some() {
        fixture.assert_upstream_saw_only_pubwarden(false);
    }
}

/// Clients authenticate to pubwarden with passwords the upstream Redis has never heard of, and
/// Redis only ever sees pubwarden's own credentials; RESET makes the client unauthenticated
/// towards pubwarden while its connection keeps working once it authenticates again.
#[test]
fn client_auth_never_reaches_redis() {
    let fixture = AclFixture::start(&users(), Secret::Env);
    let Some(proxy) = &fixture.proxy else {
        panic!("this test needs pubwarden: unset PUBWARDEN_TESTS_SELF_CHECK");
    };
    let mut admin_up = admin(&fixture.upstream);
    let mut c = proxy.connect();
    expect_reply(&mut c, &["GET", "k"], NOAUTH);
    expect_reply(&mut c, &["AUTH", "alice", "wrong"], WRONGPASS);
    expect_reply(&mut c, &["AUTH", "alice", ALICE_PW], OK);
    expect_reply(&mut c, &["SET", "via-proxy", "1"], OK);
    expect_reply(&mut admin_up, &["GET", "via-proxy"], b"$1\r\n1\r\n");
    let mut h = proxy.connect();
    let hello = call(&mut h, &["HELLO", "3", "AUTH", "bob", BOB_PW]);
    assert!(
        hello.starts_with(b"%"),
        "HELLO 3 AUTH bob: {}",
        text(&hello)
    );
    // While both clients are connected, Redis sees only pubwarden's user.
    fixture.assert_upstream_saw_only_pubwarden(true);
    expect_reply(&mut c, &["RESET"], b"+RESET\r\n");
    expect_reply(&mut c, &["GET", "via-proxy"], NOAUTH);
    expect_reply(&mut c, &["AUTH", "alice", ALICE_PW], OK);
    expect_reply(&mut c, &["GET", "via-proxy"], b"$1\r\n1\r\n");
    expect_reply(&mut c, &["PUBLISH", "orders.a", "x"], b":0\r\n");
    fixture.assert_upstream_saw_only_pubwarden(true);
}
