//! Classifies a client request once, by its name and arguments.
//!
//! Only the commands whose replies or effects pubwarden must model get a kind
//! of their own; every other command is `Other` and is relayed untouched.
//! The name is kept as a `&'static str` from a fixed table so that later
//! per-command counting never formats or allocates.

use crate::resp::request::Args;

/// The three pub/sub subscription families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SubKind {
    /// `SUBSCRIBE` channels.
    Channel,
    /// `PSUBSCRIBE` patterns.
    Pattern,
    /// `SSUBSCRIBE` shard channels.
    Shard,
}

impl SubKind {
    /// The confirmation frame's first element when subscribing.
    pub fn subscribe_reply(self) -> &'static [u8] {
        match self {
            SubKind::Channel => b"subscribe",
            SubKind::Pattern => b"psubscribe",
            SubKind::Shard => b"ssubscribe",
        }
    }

    /// The confirmation frame's first element when unsubscribing.
    pub fn unsubscribe_reply(self) -> &'static [u8] {
        match self {
            SubKind::Channel => b"unsubscribe",
            SubKind::Pattern => b"punsubscribe",
            SubKind::Shard => b"sunsubscribe",
        }
    }
}

/// `CLIENT REPLY` modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyMode {
    On,
    Off,
    Skip,
}

/// What pubwarden needs to know about a command to follow the conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Subscribe(SubKind),
    Unsubscribe(SubKind),
    Publish,
    SPublish,
    Ping,
    /// `HELLO`, with the protocol version it asks for (if any and valid).
    Hello(Option<u8>),
    Reset,
    Quit,
    Multi,
    Exec,
    Discard,
    Monitor,
    /// `CLIENT REPLY ON|OFF|SKIP` with exactly that syntax.
    ClientReply(ReplyMode),
    Other,
}

/// A classified request: its kind and canonical lower-case name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Command {
    pub kind: Kind,
    pub name: &'static str,
}

impl Command {
    pub fn classify(args: &Args<'_>) -> Command {
        let Some(name) = args.get(0) else {
            return Command {
                kind: Kind::Other,
                name: "other",
            };
        };
        let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
        let (kind, name) = match name.len() {
            4 if is("ping") => (Kind::Ping, "ping"),
            4 if is("quit") => (Kind::Quit, "quit"),
            4 if is("exec") => (Kind::Exec, "exec"),
            5 if is("hello") => (Kind::Hello(hello_version(args)), "hello"),
            5 if is("reset") => (Kind::Reset, "reset"),
            5 if is("multi") => (Kind::Multi, "multi"),
            6 if is("client") => (client_kind(args), "client"),
            7 if is("publish") => (Kind::Publish, "publish"),
            7 if is("discard") => (Kind::Discard, "discard"),
            7 if is("monitor") => (Kind::Monitor, "monitor"),
            8 if is("spublish") => (Kind::SPublish, "spublish"),
            9 if is("subscribe") => (Kind::Subscribe(SubKind::Channel), "subscribe"),
            10 if is("psubscribe") => (Kind::Subscribe(SubKind::Pattern), "psubscribe"),
            10 if is("ssubscribe") => (Kind::Subscribe(SubKind::Shard), "ssubscribe"),
            11 if is("unsubscribe") => (Kind::Unsubscribe(SubKind::Channel), "unsubscribe"),
            12 if is("punsubscribe") => (Kind::Unsubscribe(SubKind::Pattern), "punsubscribe"),
            12 if is("sunsubscribe") => (Kind::Unsubscribe(SubKind::Shard), "sunsubscribe"),
            _ => (Kind::Other, common_name(name)),
        };
        Command { kind, name }
    }
}

/// Frequent commands with no kind of their own, named so that per-command
/// metrics can tell them apart; anything else is `other`.
const COMMON: &[&str] = &[
    "get",
    "set",
    "del",
    "exists",
    "expire",
    "ttl",
    "type",
    "incr",
    "decr",
    "mget",
    "mset",
    "hget",
    "hset",
    "hdel",
    "hgetall",
    "lpush",
    "rpush",
    "lpop",
    "rpop",
    "lrange",
    "blpop",
    "brpop",
    "sadd",
    "srem",
    "smembers",
    "zadd",
    "zrem",
    "zrange",
    "xadd",
    "xread",
    "xreadgroup",
    "eval",
    "evalsha",
    "fcall",
    "select",
    "info",
    "pubsub",
    "watch",
    "unwatch",
    "scan",
    "keys",
];

fn common_name(name: &[u8]) -> &'static str {
    COMMON
        .iter()
        .find(|c| c.len() == name.len() && name.eq_ignore_ascii_case(c.as_bytes()))
        .copied()
        .unwrap_or("other")
}

fn hello_version(args: &Args<'_>) -> Option<u8> {
    match args.get(1)? {
        b"2" => Some(2),
        b"3" => Some(3),
        _ => None,
    }
}

fn client_kind(args: &Args<'_>) -> Kind {
    if args.len() != 3
        || !args
            .get(1)
            .is_some_and(|s| s.eq_ignore_ascii_case(b"reply"))
    {
        return Kind::Other;
    }
    match args.get(2) {
        Some(m) if m.eq_ignore_ascii_case(b"on") => Kind::ClientReply(ReplyMode::On),
        Some(m) if m.eq_ignore_ascii_case(b"off") => Kind::ClientReply(ReplyMode::Off),
        Some(m) if m.eq_ignore_ascii_case(b"skip") => Kind::ClientReply(ReplyMode::Skip),
        _ => Kind::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resp::request::{RequestLimits, RequestParser};

    fn classify(line: &str) -> Command {
        let mut p = RequestParser::new(RequestLimits::default());
        let buf = format!("{line}\r\n");
        let f = p.next(buf.as_bytes(), 0).unwrap().unwrap();
        Command::classify(&p.args(buf.as_bytes(), &f))
    }

    #[test]
    fn names_are_case_insensitive() {
        assert_eq!(
            classify("SuBsCrIbE a b").kind,
            Kind::Subscribe(SubKind::Channel)
        );
        assert_eq!(
            classify("sunsubscribe").kind,
            Kind::Unsubscribe(SubKind::Shard)
        );
        assert_eq!(classify("hello 3").kind, Kind::Hello(Some(3)));
        assert_eq!(classify("hello").kind, Kind::Hello(None));
        assert_eq!(classify("hello 4").kind, Kind::Hello(None));
        assert_eq!(
            classify("client reply Off").kind,
            Kind::ClientReply(ReplyMode::Off)
        );
        assert_eq!(classify("client reply off x").kind, Kind::Other);
        assert_eq!(classify("client reply maybe").kind, Kind::Other);
        assert_eq!(
            classify("GET k"),
            Command {
                kind: Kind::Other,
                name: "get"
            }
        );
        assert_eq!(
            classify("FROBNICATE k"),
            Command {
                kind: Kind::Other,
                name: "other"
            }
        );
    }
}
