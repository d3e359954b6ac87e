//! Policy: who may connect, which channels each user may use, which commands
//! they may run, and how fast. Parsed and validated once ([`schema`]), then
//! held as data and swapped whole on reload; checks are lookups, not `if`s
//! scattered through the relay.
//!
//! Rules follow Redis 7 ACL semantics where Redis has them: channel patterns
//! are Redis globs, a PSUBSCRIBE pattern must literally equal an allowed
//! pattern unless every channel is allowed, one denied channel rejects the
//! whole command, and error texts are Redis's own.

pub mod commands;
pub mod gate;
pub mod global;
pub mod ratelimit;
pub mod reload;
pub mod schema;

use std::collections::HashSet;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::glob;
use commands::{CATEGORIES, CommandInfo, CommandTable};
use ratelimit::{Decision, Limiter};

/// Enforce denials, or only report them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Enforce,
    Audit,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Audit => "audit",
        }
    }
}

/// A set of channels: everything, or Redis glob patterns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Channels {
    pub all: bool,
    pub patterns: Vec<Box<[u8]>>,
}

impl Channels {
    pub fn from_patterns(patterns: Vec<Box<[u8]>>) -> Self {
        Self {
            all: patterns.iter().any(|p| &**p == b"*"),
            patterns,
        }
    }

    pub fn matches(&self, channel: &[u8]) -> bool {
        self.all || self.patterns.iter().any(|p| glob::matches(p, channel))
    }

    fn describe(&self) -> String {
        if self.all {
            return "every channel".into();
        }
        if self.patterns.is_empty() {
            return "no channel".into();
        }
        self.patterns
            .iter()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Which commands a user may run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommandRules {
    pub allow_all: bool,
    pub deny_all: bool,
    pub allow_categories: u32,
    pub deny_categories: u32,
    pub allow_names: HashSet<String>,
    pub deny_names: HashSet<String>,
}

impl CommandRules {
    /// A user who says nothing about commands: pub/sub, connection, read and
    /// transaction commands; never dangerous, admin or scripting ones.
    pub fn safe_default() -> Self {
        let bits = |names: &[&str]| {
            names
                .iter()
                .filter_map(|n| commands::category_bit(n))
                .fold(0, |a, b| a | b)
        };
        Self {
            allow_categories: bits(&["pubsub", "connection", "read", "transaction"]),
            deny_categories: bits(&["dangerous", "admin", "scripting"]),
            ..Self::default()
        }
    }

    /// `full` is the table name (`get`, `client|kill`). A rule naming the
    /// command (most specific first) beats categories; deny wins a tie.
    pub fn allows(&self, full: &str, categories: u32) -> bool {
        if full.contains('|') {
            if self.deny_names.contains(full) {
                return false;
            }
            if self.allow_names.contains(full) {
                return true;
            }
        }
        let parent = full.split('|').next().unwrap_or(full);
        if self.deny_names.contains(parent) {
            return false;
        }
        if self.allow_names.contains(parent) {
            return true;
        }
        if self.deny_all || categories & self.deny_categories != 0 {
            return false;
        }
        self.allow_all || categories & self.allow_categories != 0
    }

    fn describe(&self) -> String {
        let cats = |mask: u32| {
            CATEGORIES
                .iter()
                .enumerate()
                .filter(|(i, _)| mask & (1 << i) != 0)
                .map(|(_, c)| format!("@{c}"))
                .collect::<Vec<_>>()
        };
        let mut allow = if self.allow_all {
            vec!["@all".to_string()]
        } else {
            cats(self.allow_categories)
        };
        let mut names: Vec<_> = self.allow_names.iter().cloned().collect();
        names.sort();
        allow.extend(names);
        let mut deny = if self.deny_all {
            vec!["@all".to_string()]
        } else {
            cats(self.deny_categories)
        };
        let mut names: Vec<_> = self.deny_names.iter().cloned().collect();
        names.sort();
        deny.extend(names);
        let allow = if allow.is_empty() {
            "nothing".into()
        } else {
            allow.join(" ")
        };
        if deny.is_empty() {
            allow
        } else {
            format!("{allow}, except {}", deny.join(" "))
        }
    }
}

/// An address range in CIDR notation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let bad = || format!("`{text}` is not an address range like 10.0.0.0/8 or ::1/128");
        let (addr, prefix) = match text.trim().split_once('/') {
            Some((a, p)) => (
                a.parse::<IpAddr>().map_err(|_| bad())?,
                Some(p.parse::<u8>().map_err(|_| bad())?),
            ),
            None => (text.trim().parse::<IpAddr>().map_err(|_| bad())?, None),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(bad());
        }
        Ok(Cidr { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// SHA-256 of a password, as stored.
pub fn hash_password(password: &[u8]) -> [u8; 32] {
    Sha256::digest(password).into()
}

/// `sha256:<hex>`, the form policy files hold.
pub fn format_hash(hash: &[u8; 32]) -> String {
    let mut s = String::from("sha256:");
    for b in hash {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Compares without an early exit, so timing reveals nothing about how much
/// of a hash matched.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Debug)]
pub struct User {
    pub name: String,
    pub enabled: bool,
    pub nopass: bool,
    pub passwords: Vec<[u8; 32]>,
    /// Empty: from anywhere.
    pub sources: Vec<Cidr>,
    pub max_connections: Option<u32>,
    /// `None`: the policy's top-level mode.
    pub mode: Option<Mode>,
    pub publish: Channels,
    pub subscribe: Channels,
    pub deny: Vec<Box<[u8]>>,
    pub commands: CommandRules,
    pub subscribe_ops_per_second: Option<u32>,
    /// Rate rules whose `users` select this user, in file order.
    pub rate_rules: Vec<usize>,
    /// Subscribe churn budget (one key: this user).
    pub churn: Option<Mutex<Limiter<()>>>,
    /// Overrides `upstream.resubscribe` for this user's connections.
    pub resubscribe: Option<bool>,
    /// Client certificate identities (`cn:NAME`, `dns:NAME`, ...) that sign
    /// a connection on the TLS listener in as this user, without AUTH.
    pub tls_identities: Vec<String>,
}

impl User {
    /// Whether `password` is one of this user's (any, for `nopass`).
    pub fn verify(&self, password: &[u8]) -> bool {
        if self.nopass {
            return true;
        }
        let h = hash_password(password);
        // Check every hash, whatever matched, for uniform timing.
        self.passwords
            .iter()
            .fold(false, |ok, p| ok | constant_time_eq(p, &h))
    }

    pub fn allowed_from(&self, ip: IpAddr) -> bool {
        self.sources.is_empty() || self.sources.iter().any(|c| c.contains(ip))
    }

    fn denied(&self, channel: &[u8]) -> bool {
        self.deny.iter().any(|p| glob::matches(p, channel))
    }

    pub fn may_publish(&self, channel: &[u8]) -> bool {
        !self.denied(channel) && self.publish.matches(channel)
    }

    pub fn may_subscribe(&self, channel: &[u8]) -> bool {
        !self.denied(channel) && self.subscribe.matches(channel)
    }

    /// Redis's rule: the pattern itself must be allowed, literally.
    pub fn may_psubscribe(&self, pattern: &[u8]) -> bool {
        if self.deny.iter().any(|d| **d == *pattern) {
            return false;
        }
        self.subscribe.all || self.subscribe.patterns.iter().any(|p| **p == *pattern)
    }

    /// Deliveries on a denied channel are kept from pattern subscriptions.
    pub fn hides(&self, channel: &[u8]) -> bool {
        !self.deny.is_empty() && self.denied(channel)
    }

    pub fn has_deny(&self) -> bool {
        !self.deny.is_empty()
    }

    /// Spends subscribe-churn budget for `ops` operations, if limited.
    pub fn spend_churn(&self, ops: u64, now_ns: u64) -> Decision {
        let Some(limiter) = &self.churn else {
            return Decision::Allow;
        };
        let Ok(mut limiter) = limiter.lock() else {
            return Decision::Allow;
        };
        let mut decision = Decision::Allow;
        for _ in 0..ops {
            decision = limiter.check(&(), || (), 0, now_ns);
            if decision != Decision::Allow {
                break;
            }
        }
        decision
    }
}

/// Whose budget a rate rule spends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyBy {
    User,
    Channel,
    UserChannel,
    Global,
}

impl KeyBy {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyBy::User => "user",
            KeyBy::Channel => "channel",
            KeyBy::UserChannel => "user_channel",
            KeyBy::Global => "global",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnLimit {
    Reject,
    Delay(Duration),
}

/// Where a rule's budget lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// In this process.
    Local,
    /// Shared by every pubwarden, in Redis (see [`global`]).
    Global {
        /// How many pubwardens share it: this process's local share, used
        /// when the store is unreachable, is `1/instances` of the budget.
        instances: u64,
        on_store_failure: StoreFailure,
    },
}

/// What a global rule does while the shared store is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreFailure {
    /// Enforce the local share.
    FailOpen,
    /// Refuse the rule's publishes.
    FailClosed,
}

/// Keys one rule keeps before idle ones are forgotten and new ones share an
/// overflow budget.
pub const MAX_RATE_KEYS: usize = 100_000;

#[derive(Debug)]
pub struct RateRule {
    pub name: String,
    pub users: Vec<String>,
    /// `None`: every channel.
    pub channels: Option<Channels>,
    pub publish: bool,
    pub spublish: bool,
    pub messages_per_second: u64,
    pub bytes_per_second: Option<u64>,
    pub burst: u64,
    pub key: KeyBy,
    pub on_limit: OnLimit,
    /// Local: the budget. Global: the local share, for store outages.
    pub limiter: Mutex<Limiter<Box<[u8]>>>,
    pub scope: Scope,
    /// Global rules: leased tokens per key.
    pub leases: Mutex<std::collections::HashMap<Box<[u8]>, Arc<global::Lease>>>,
}

impl RateRule {
    pub fn applies(&self, sharded: bool, channel: &[u8]) -> bool {
        (if sharded { self.spublish } else { self.publish })
            && self.channels.as_ref().is_none_or(|c| c.matches(channel))
    }

    /// Builds this rule's key for `user` and `channel` in `scratch`.
    fn key(&self, user: &str, channel: &[u8], scratch: &mut Vec<u8>) {
        scratch.clear();
        match self.key {
            KeyBy::User => scratch.extend_from_slice(user.as_bytes()),
            KeyBy::Channel => scratch.extend_from_slice(channel),
            KeyBy::UserChannel => {
                scratch.extend_from_slice(user.as_bytes());
                // User names cannot hold 0xff in UTF-8, so the key is unambiguous.
                scratch.push(0xff);
                scratch.extend_from_slice(channel);
            }
            KeyBy::Global => {}
        }
    }

    /// Spends this rule's local budget; `scratch` holds the key so
    /// steady-state checks do not allocate.
    pub fn spend(
        &self,
        user: &str,
        channel: &[u8],
        payload: u64,
        now_ns: u64,
        scratch: &mut Vec<u8>,
    ) -> Decision {
        self.key(user, channel, scratch);
        let Ok(mut limiter) = self.limiter.lock() else {
            return Decision::Allow;
        };
        limiter.check(&scratch[..], || Box::from(&scratch[..]), payload, now_ns)
    }
}

impl RateRule {
    /// Spends one token of the shared budget (`scope: global`).
    pub fn take_global(
        &self,
        store: &global::GlobalLimits,
        user: &str,
        channel: &[u8],
        now: std::time::Instant,
        scratch: &mut Vec<u8>,
    ) -> global::Take {
        self.key(user, channel, scratch);
        let lease = {
            let Ok(mut leases) = self.leases.lock() else {
                return global::Take::StoreDown;
            };
            match leases.get(&scratch[..]) {
                Some(l) => l.clone(),
                None => {
                    if leases.len() >= MAX_RATE_KEYS {
                        // Idle keys hold nothing worth keeping; past that,
                        // new keys share one lease (as the local limiter does).
                        leases.retain(|_, l| Arc::strong_count(l) > 1);
                    }
                    let k: Box<[u8]> = if leases.len() >= MAX_RATE_KEYS {
                        Box::from(&b"\xff\xffoverflow"[..])
                    } else {
                        Box::from(&scratch[..])
                    };
                    leases.entry(k).or_default().clone()
                }
            }
        };
        let redis_key = || {
            let mut k = Vec::with_capacity(24 + self.name.len() + scratch.len());
            k.extend_from_slice(b"pubwarden:ratelimit:{");
            k.extend_from_slice(self.name.as_bytes());
            k.extend_from_slice(b"}:");
            k.extend_from_slice(scratch);
            k
        };
        store.take(&lease, redis_key, self.messages_per_second, self.burst, now)
    }
}

/// A whole, validated policy.
#[derive(Debug)]
pub struct Policy {
    pub mode: Mode,
    pub allow_plaintext_passwords: bool,
    pub users: Vec<User>,
    pub default_user: Option<usize>,
    pub max_auth_failures_per_minute: u32,
    pub rate_rules: Vec<RateRule>,
}

impl Policy {
    pub fn user(&self, name: &[u8]) -> Option<(usize, &User)> {
        self.users
            .iter()
            .enumerate()
            .find(|(_, u)| u.name.as_bytes() == name)
    }

    /// The user a verified client certificate names: the first identity of
    /// the certificate that one of the users lists.
    pub fn user_by_identity(&self, identities: &[String]) -> Option<(usize, &User)> {
        identities.iter().find_map(|id| {
            self.users
                .iter()
                .enumerate()
                .find(|(_, u)| u.tls_identities.iter().any(|t| t == id))
        })
    }

    /// The user a connection has before any AUTH: `default` if it needs no password.
    pub fn implicit_user(&self) -> Option<usize> {
        self.default_user
            .filter(|&i| self.users[i].nopass && self.users[i].enabled)
    }

    /// The effective mode for a user: its own, else the policy's.
    pub fn mode_for(&self, user: &User) -> Mode {
        user.mode.unwrap_or(self.mode)
    }

    /// The policy in plain words, for `check-config`.
    pub fn explain(&self, table: &CommandTable) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "policy: mode {}", self.mode.as_str());
        match self.implicit_user() {
            Some(i) => {
                let _ = writeln!(
                    out,
                    "  connections without AUTH act as user `{}`",
                    self.users[i].name
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "  every connection must AUTH before anything else (NOAUTH otherwise)"
                );
            }
        }
        if self.max_auth_failures_per_minute > 0 {
            let _ = writeln!(
                out,
                "  failed AUTH attempts are limited to {} per minute per client address",
                self.max_auth_failures_per_minute
            );
        }
        for u in &self.users {
            let _ = writeln!(out, "  user {}:", u.name);
            if !u.enabled {
                let _ = writeln!(out, "    disabled: AUTH is refused");
                continue;
            }
            let mut auth = if u.nopass {
                "needs no password".to_string()
            } else if u.passwords.is_empty() {
                "has no password (AUTH is refused)".to_string()
            } else {
                format!(
                    "authenticates with one of {} password(s)",
                    u.passwords.len()
                )
            };
            if !u.tls_identities.is_empty() {
                auth.push_str(&format!(
                    "; a verified client certificate naming {} signs in without AUTH",
                    u.tls_identities.join(" or ")
                ));
            }
            let from = if u.sources.is_empty() {
                "from anywhere".to_string()
            } else {
                format!(
                    "only from {}",
                    u.sources
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            let _ = writeln!(out, "    {auth}, {from}");
            let deny = if u.deny.is_empty() {
                String::new()
            } else {
                format!(
                    " except {}",
                    u.deny
                        .iter()
                        .map(|p| String::from_utf8_lossy(p).into_owned())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            let _ = writeln!(out, "    may publish to {}{deny}", u.publish.describe());
            let _ = writeln!(out, "    may subscribe to {}{deny}", u.subscribe.describe());
            if !u.subscribe.all && !u.subscribe.patterns.is_empty() {
                let _ = writeln!(
                    out,
                    "    may PSUBSCRIBE exactly these patterns: {}",
                    u.subscribe.describe()
                );
            }
            let _ = writeln!(out, "    may run {}", u.commands.describe());
            let runs = |name: &str| {
                table
                    .get(name)
                    .is_some_and(|info: &CommandInfo| u.commands.allows(name, info.categories))
            };
            let notable: Vec<&str> = [
                "publish",
                "subscribe",
                "get",
                "set",
                "flushall",
                "config|set",
                "eval",
                "monitor",
            ]
            .into_iter()
            .filter(|n| runs(n))
            .collect();
            let _ = writeln!(
                out,
                "      (for example: {})",
                if notable.is_empty() {
                    "none of the common commands".into()
                } else {
                    notable.join(", ")
                }
            );
            if let Some(n) = u.max_connections {
                let _ = writeln!(out, "    at most {n} connection(s) at once");
            }
            if let Some(n) = u.subscribe_ops_per_second {
                let _ = writeln!(
                    out,
                    "    at most {n} subscribe/unsubscribe operations per second"
                );
            }
            if self.mode_for(u) == Mode::Audit {
                let _ = writeln!(
                    out,
                    "    AUDIT: denials are logged and counted, not enforced"
                );
            }
            for &r in &u.rate_rules {
                let _ = writeln!(out, "    rate limit `{}` applies", self.rate_rules[r].name);
            }
        }
        for r in &self.rate_rules {
            let on = match r.on_limit {
                OnLimit::Reject => "rejects with -RATELIMIT".to_string(),
                OnLimit::Delay(d) => {
                    format!("holds the command up to {} ms, then rejects", d.as_millis())
                }
            };
            let bytes = r
                .bytes_per_second
                .map(|b| format!(" and {b} payload bytes/s"))
                .unwrap_or_default();
            let channels = r
                .channels
                .as_ref()
                .map_or("every channel".into(), Channels::describe);
            let _ = writeln!(
                out,
                "  rate limit {}: {} messages/s (burst {}){bytes} per {} on {channels}; when exceeded it {on}",
                r.name,
                r.messages_per_second,
                r.burst,
                r.key.as_str()
            );
            if let Scope::Global {
                instances,
                on_store_failure,
            } = r.scope
            {
                let fallback = match on_store_failure {
                    StoreFailure::FailOpen => {
                        format!("each pubwarden enforces 1/{instances} of it alone (fail_open)")
                    }
                    StoreFailure::FailClosed => "its publishes are refused (fail_closed)".into(),
                };
                let _ = writeln!(
                    out,
                    "    shared by every pubwarden through Redis (scope global); while the store is unreachable {fallback}"
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_ranges() {
        let net = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(net.contains("10.1.2.3".parse().unwrap()));
        assert!(!net.contains("11.0.0.1".parse().unwrap()));
        assert!(net.contains("::ffff:10.0.0.1".parse().unwrap()));
        assert!(
            Cidr::parse("::1/128")
                .unwrap()
                .contains("::1".parse().unwrap())
        );
        assert!(
            Cidr::parse("0.0.0.0/0")
                .unwrap()
                .contains("1.2.3.4".parse().unwrap())
        );
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("nope").is_err());
    }

    #[test]
    fn command_rules_specific_beats_general() {
        let table = CommandTable::built_in();
        let mut r = CommandRules::safe_default();
        r.allow_names.insert("keys".into());
        let allows = |r: &CommandRules, n: &str| r.allows(n, table.get(n).unwrap().categories);
        assert!(allows(&r, "publish"));
        assert!(allows(&r, "get"));
        assert!(allows(&r, "keys"), "named allow beats @dangerous");
        assert!(!allows(&r, "flushall"));
        assert!(!allows(&r, "eval"));
        assert!(!allows(&r, "client|kill"));
        assert!(allows(&r, "client|setname"));
        assert!(!allows(&r, "set"));
        r.deny_names.insert("client".into());
        assert!(!allows(&r, "client|setname"));
        r.allow_names.insert("client|setname".into());
        assert!(
            allows(&r, "client|setname"),
            "a subcommand rule beats its container's"
        );
    }

    #[test]
    fn passwords_are_checked_by_hash() {
        let u = User {
            name: "a".into(),
            enabled: true,
            nopass: false,
            passwords: vec![hash_password(b"old"), hash_password(b"new")],
            sources: vec![],
            max_connections: None,
            mode: None,
            publish: Channels::default(),
            subscribe: Channels::default(),
            deny: vec![],
            commands: CommandRules::default(),
            subscribe_ops_per_second: None,
            rate_rules: vec![],
            churn: None,
            resubscribe: None,
            tls_identities: vec![],
        };
        assert!(u.verify(b"old") && u.verify(b"new") && !u.verify(b"other"));
        assert_eq!(
            format_hash(&hash_password(b"password")),
            "sha256:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"
        );
    }
}
