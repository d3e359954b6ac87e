//! Robustness of the reply-side session state machine (`session`) and the
//! command classifier: random requests followed by random upstream frames
//! (plausible replies, pub/sub confirmations and deliveries, pushes, garbage)
//! never panic, and the pending-reply bookkeeping stays consistent:
//! every request queued is either still pending or completed, never both,
//! never lost, never counted twice. Whether the classification is *right*
//! for real Redis replies is covered by the recorded-conversation tests.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use proptest::prelude::*;
use pubwarden::command::{Command, Kind, SubKind};
use pubwarden::resp::frame::FrameScanner;
use pubwarden::resp::request::{RequestLimits, RequestParser};
use pubwarden::session::{FrameClass, Session, SubscriptionObserver};

/// How a request is queued.
#[derive(Debug, Clone, Copy)]
enum Via {
    Forwarded,
    Filtered,
    Internal,
    Local,
}

#[derive(Debug, Clone)]
enum Op {
    Request(Vec<Vec<u8>>, Via),
    /// Upstream bytes (zero or more frames, possibly garbage).
    Upstream(Vec<u8>),
}

fn words(s: &str) -> Vec<Vec<u8>> {
    s.split(' ').map(|w| w.as_bytes().to_vec()).collect()
}

fn request() -> impl Strategy<Value = Vec<Vec<u8>>> {
    let channel = prop::sample::select(vec!["a", "b", "c", "a*"]);
    let channels = prop::collection::vec(channel, 0..4);
    let sub = prop::sample::select(vec![
        "SUBSCRIBE",
        "PSUBSCRIBE",
        "SSUBSCRIBE",
        "UNSUBSCRIBE",
        "PUNSUBSCRIBE",
        "sunsubscribe",
    ]);
    prop_oneof![
        4 => (sub, channels).prop_map(|(cmd, chs)| {
            let mut v = vec![cmd.as_bytes().to_vec()];
            v.extend(chs.into_iter().map(|c| c.as_bytes().to_vec()));
            v
        }),
        6 => prop::sample::select(vec![
            "PING", "PING x", "GET k", "SET k v", "HELLO", "HELLO 2", "HELLO 3", "HELLO 4",
            "hello 3 AUTH u p", "RESET", "MULTI", "EXEC", "DISCARD", "QUIT", "MONITOR",
            "CLIENT REPLY ON", "CLIENT REPLY OFF", "CLIENT REPLY SKIP", "client reply skip x",
            "PUBLISH a hi", "SPUBLISH a hi", "PUBSUB CHANNELS", "LRANGE l 0 -1",
        ])
        .prop_map(words),
        1 => prop::collection::vec(prop::collection::vec(any::<u8>(), 0..8), 0..4),
    ]
}

fn bulk(s: &[u8]) -> Vec<u8> {
    [format!("${}\r\n", s.len()).as_bytes(), s, b"\r\n"].concat()
}

/// Frames a Redis might send, in either protocol, and some it would not.
fn upstream() -> impl Strategy<Value = Vec<u8>> {
    let channel = prop::sample::select(vec![&b"a"[..], b"b", b"c", b"a*", b"zz"]);
    let agg = prop::sample::select(vec![b'*', b'>']);
    let confirm = prop::sample::select(vec![
        &b"subscribe"[..],
        b"psubscribe",
        b"ssubscribe",
        b"unsubscribe",
        b"punsubscribe",
        b"sunsubscribe",
        b"message",
        b"smessage",
        b"pong",
    ]);
    let frame = prop_oneof![
        6 => prop::sample::select(vec![
            &b"+OK\r\n"[..], b"+QUEUED\r\n", b"+RESET\r\n", b"+PONG\r\n",
            b"-ERR x\r\n", b"-EXECABORT x\r\n", b"!3\r\nERR\r\n", b":1\r\n", b"$-1\r\n",
            b"*-1\r\n", b"*0\r\n", b"_\r\n", b"$1\r\nb\r\n", b"%1\r\n$5\r\nproto\r\n:3\r\n",
            b"|1\r\n+key\r\n+val\r\n", b"+1700000000.123456 [0 127.0.0.1:1] \"PING\"\r\n",
            b"*1\r\n+OK\r\n", b"*2\r\n+OK\r\n+QUEUED\r\n", b"*2\r\n$4\r\npong\r\n$0\r\n\r\n",
            b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n", b"*3\r\n:1\r\n:2\r\n:3\r\n",
        ])
        .prop_map(<[u8]>::to_vec),
        6 => (agg.clone(), confirm, prop::option::of(channel.clone()), -1i64..4).prop_map(
            |(kind, first, ch, n)| {
                let mut out = format!("{}3\r\n", char::from(kind)).into_bytes();
                out.extend(bulk(first));
                match ch {
                    Some(c) => out.extend(bulk(c)),
                    None => out.extend_from_slice(b"$-1\r\n"),
                }
                if first.ends_with(b"message") {
                    out.extend(bulk(b"payload"));
                } else {
                    out.extend_from_slice(format!(":{n}\r\n").as_bytes());
                }
                out
            }
        ),
        2 => (agg, channel.clone(), channel).prop_map(|(kind, p, c)| {
            let mut out = format!("{}4\r\n", char::from(kind)).into_bytes();
            out.extend(bulk(b"pmessage"));
            out.extend(bulk(p));
            out.extend(bulk(c));
            out.extend(bulk(b"x"));
            out
        }),
        1 => prop::collection::vec(any::<u8>(), 0..12),
    ];
    prop::collection::vec(frame, 1..4).prop_map(|v| v.concat())
}

fn op() -> impl Strategy<Value = Op> {
    let via = prop_oneof![
        8 => Just(Via::Forwarded),
        1 => Just(Via::Filtered),
        1 => Just(Via::Internal),
        1 => Just(Via::Local),
    ];
    prop_oneof![
        (request(), via).prop_map(|(r, v)| Op::Request(r, v)),
        upstream().prop_map(Op::Upstream),
    ]
}

/// Net additions per (family, name).
type Counts = HashMap<(u8, Vec<u8>), i64>;

/// Mirrors every change the session reports, to check it never drifts.
#[derive(Debug, Default, Clone)]
struct Mirror(Arc<Mutex<Counts>>);

impl SubscriptionObserver for Mirror {
    fn changed(&mut self, kind: SubKind, name: &[u8], added: bool) {
        let k = match kind {
            SubKind::Channel => 0,
            SubKind::Pattern => 1,
            SubKind::Shard => 2,
        };
        *self
            .0
            .lock()
            .unwrap()
            .entry((k, name.to_vec()))
            .or_default() += if added { 1 } else { -1 };
    }
}

fn encode(args: &[Vec<u8>]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend(bulk(a));
    }
    out
}

fn check(s: &Session, mirror: &Mirror) {
    assert_eq!(
        s.enqueued(),
        s.completed() + s.pending_len() as u64,
        "every request is pending or completed"
    );
    assert!(matches!(s.protocol(), 2 | 3));
    let counts = mirror.0.lock().unwrap();
    let mut observed = 0;
    for ((k, name), n) in counts.iter() {
        let kind = [SubKind::Channel, SubKind::Pattern, SubKind::Shard][usize::from(*k)];
        assert!(matches!(n, 0 | 1), "observer count {n} for {name:?}");
        assert_eq!(*n == 1, s.subscriptions().contains(kind, name));
        observed += n;
    }
    assert_eq!(observed as usize, s.subscriptions().total());
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn random_conversations_keep_the_books(ops in prop::collection::vec(op(), 0..40)) {
        let mut s = Session::new();
        let mirror = Mirror::default();
        s.observe_subscriptions(Box::new(mirror.clone()));
        let mut locals = 0usize;
        let mut emitted = 0usize;
        for op in ops {
            let (enqueued, completed, pending) = (s.enqueued(), s.completed(), s.pending_len());
            match op {
                Op::Request(args, via) => {
                    let buf = encode(&args);
                    let mut p = RequestParser::new(RequestLimits::default());
                    let f = p.next(&buf, 0).unwrap().unwrap();
                    let a = p.args(&buf, &f);
                    let cmd = Command::classify(&a);
                    if args.is_empty() {
                        prop_assert_eq!(cmd.kind, Kind::Other);
                    }
                    match via {
                        Via::Forwarded => s.forwarded(cmd, &a),
                        Via::Filtered => s.forwarded_filtered(cmd, &a),
                        Via::Internal => s.internal(cmd),
                        Via::Local => {
                            locals += 1;
                            s.answered_locally(cmd, Bytes::from_static(b"+LOCAL\r\n"));
                        }
                    }
                    prop_assert_eq!(s.enqueued(), enqueued + 1);
                    s.settle(|_| emitted += 1);
                }
                Op::Upstream(bytes) => {
                    let mut sc = FrameScanner::new(16);
                    let mut at = 0;
                    while let Ok(Some(f)) = sc.next(&bytes, at) {
                        let before = s.pending_len();
                        let class = s.on_frame(&f, &bytes);
                        if before == 0 && matches!(class, FrameClass::Reply) {
                            prop_assert!(false, "a reply with nothing pending");
                        }
                        s.settle(|_| emitted += 1);
                        prop_assert!(s.pending_len() <= before, "a frame added pending work");
                        at = f.end;
                    }
                    prop_assert_eq!(s.enqueued(), enqueued);
                }
            }
            prop_assert!(s.completed() >= completed);
            prop_assert!(s.pending_len() <= pending + 1);
            check(&s, &mirror);
            prop_assert!(emitted <= locals, "emitted {} of {} local answers", emitted, locals);
        }
    }
}
