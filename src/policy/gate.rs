//! The per-connection policy gate: every client request passes it before it
//! may go upstream. It answers AUTH and HELLO's AUTH itself, and decides for
//! everything else: forward, forward rewritten, answer locally, or hold.
//!
//! The gate reads the current policy on every request (an atomic pointer
//! load), so a reloaded policy applies from a connection's next command.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;

use super::commands::{CommandTable, Source};
use super::global::Take;
use super::ratelimit::{Budget, Decision, Limiter};
use super::{Scope, StoreFailure};

/// How long a publish waits for a global rule's lease before asking again.
const LEASE_WAIT: Duration = Duration::from_millis(1);
use super::{Mode, OnLimit, Policy, User};
use crate::command::{Command, Kind, SubKind};
use crate::metrics::{AuthFailure, Metrics, UserLabel};
use crate::resp::request::Args;

/// Redis 7.0.15's own texts.
pub mod replies {
    pub const NOAUTH: &[u8] = b"-NOAUTH Authentication required.\r\n";
    pub const HELLO_NOAUTH: &[u8] = b"-NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time\r\n";
    pub const WRONGPASS: &[u8] =
        b"-WRONGPASS invalid username-password pair or user is disabled.\r\n";
    pub const AUTH_NOPASS_DEFAULT: &[u8] = b"-ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?\r\n";
    pub const AUTH_ARITY: &[u8] = b"-ERR wrong number of arguments for 'auth' command\r\n";
    pub const SYNTAX: &[u8] = b"-ERR syntax error\r\n";
    pub const NOPROTO: &[u8] = b"-NOPROTO unsupported protocol version\r\n";
    pub const HELLO_VERSION: &[u8] = b"-ERR Protocol version is not an integer or out of range\r\n";
    pub const NOPERM_CHANNEL: &[u8] =
        b"-NOPERM this user has no permissions to access one of the channels used as arguments\r\n";
    pub const MAX_CLIENTS: &[u8] = b"-ERR max number of clients reached\r\n";
    pub const OK: &[u8] = b"+OK\r\n";
}

/// Sent in place of a request refused inside MULTI. Redis rejects an unknown
/// command at queue time and flags the transaction, exactly as it would have
/// for the refused request, so EXEC then answers Redis's own EXECABORT (or
/// whatever Redis says if no transaction was open). Its error is swallowed.
pub const ABORT_TRANSACTION: &[u8] = b"*1\r\n$27\r\npubwarden.abort-transaction\r\n";

/// What to do with one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Send the original bytes upstream.
    Forward,
    /// Send these bytes upstream instead (HELLO without its AUTH part).
    ForwardAs(Bytes),
    /// Answer locally; nothing goes upstream, except `upstream` if given
    /// (an internal command whose reply the client must not see).
    Answer {
        reply: Bytes,
        upstream: Option<&'static [u8]>,
    },
    /// Hold the request this long, then ask again.
    Delay(Duration),
    /// Send the original bytes, and keep from the reply (a list of channels)
    /// the ones this user may not subscribe to.
    ForwardFiltered,
}

impl Verdict {
    fn answer(reply: &'static [u8]) -> Self {
        Verdict::Answer {
            reply: Bytes::from_static(reply),
            upstream: None,
        }
    }

    fn answer_owned(reply: String) -> Self {
        Verdict::Answer {
            reply: Bytes::from(reply),
            upstream: None,
        }
    }
}

/// State shared by every connection, kept across policy reloads.
#[derive(Debug)]
pub struct PolicyRuntime {
    pub policy: ArcSwap<Policy>,
    pub commands: ArcSwap<CommandTable>,
    connections: Mutex<HashMap<String, u32>>,
    auth_failures: Mutex<Option<(u32, Limiter<IpAddr>)>>,
    epoch: Instant,
    /// Bumped on every reload, so idle connections re-check their standing.
    generation: tokio::sync::watch::Sender<u64>,
    /// The shared store for `scope: global` rate limits.
    global: std::sync::OnceLock<Arc<super::global::GlobalLimits>>,
}

/// Client addresses whose failed AUTH attempts are tracked at once.
const MAX_TRACKED_ADDRESSES: usize = 65_536;

impl PolicyRuntime {
    pub fn new(policy: Policy, commands: CommandTable) -> Self {
        Self {
            policy: ArcSwap::from_pointee(policy),
            commands: ArcSwap::from_pointee(commands),
            connections: Mutex::new(HashMap::new()),
            auth_failures: Mutex::new(None),
            epoch: Instant::now(),
            generation: tokio::sync::watch::Sender::new(0),
            global: std::sync::OnceLock::new(),
        }
    }

    /// Connects global rate limits to their shared store.
    pub fn set_global_limits(&self, global: Arc<super::global::GlobalLimits>) {
        let _ = self.global.set(global);
    }

    /// Swaps in a new policy and tells every connection.
    pub fn replace(&self, policy: Policy) {
        self.policy.store(Arc::new(policy));
        self.generation.send_modify(|g| *g += 1);
    }

    /// Changes on every policy reload.
    pub fn reloads(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    fn now_ns(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    /// Open connections of `user`.
    pub fn connections_of(&self, user: &str) -> u32 {
        self.connections
            .lock()
            .map_or(0, |m| m.get(user).copied().unwrap_or(0))
    }

    fn acquire(self: &Arc<Self>, user: &User) -> Option<ConnSlot> {
        let mut map = self.connections.lock().ok()?;
        let n = map.entry(user.name.clone()).or_insert(0);
        if user.max_connections.is_some_and(|max| *n >= max) {
            return None;
        }
        *n += 1;
        Some(ConnSlot {
            runtime: self.clone(),
            user: user.name.clone(),
        })
    }

    /// Whether `ip` may try a password now (spends nothing).
    fn auth_allowed(&self, ip: IpAddr, per_minute: u32, now_ns: u64) -> bool {
        if per_minute == 0 {
            return true;
        }
        let Ok(mut guard) = self.auth_failures.lock() else {
            return true;
        };
        let limiter = Self::failure_limiter(&mut guard, per_minute);
        limiter.is_none_or(|l| l.would_allow(&ip, now_ns))
    }

    fn record_failure(&self, ip: IpAddr, per_minute: u32, now_ns: u64) {
        if per_minute == 0 {
            return;
        }
        if let Ok(mut guard) = self.auth_failures.lock()
            && let Some(l) = Self::failure_limiter(&mut guard, per_minute)
        {
            let _ = l.check(&ip, || ip, 0, now_ns);
        }
    }

    fn failure_limiter(
        slot: &mut Option<(u32, Limiter<IpAddr>)>,
        per_minute: u32,
    ) -> Option<&mut Limiter<IpAddr>> {
        if slot.as_ref().is_none_or(|(n, _)| *n != per_minute) {
            let budget = Budget::per(
                u64::from(per_minute),
                Duration::from_secs(60),
                u64::from(per_minute),
            )?;
            *slot = Some((
                per_minute,
                Limiter::new(budget, None, MAX_TRACKED_ADDRESSES),
            ));
        }
        slot.as_mut().map(|(_, l)| l)
    }
}

/// One open connection counted against its user's `max_connections`.
#[derive(Debug)]
pub struct ConnSlot {
    runtime: Arc<PolicyRuntime>,
    user: String,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        if let Ok(mut map) = self.runtime.connections.lock()
            && let Some(n) = map.get_mut(&self.user)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.user);
            }
        }
    }
}

/// Who the connection is, for the policy snapshot it was resolved in.
#[derive(Debug)]
struct Authed {
    index: usize,
    _slot: ConnSlot,
}

/// Why a command would have been refused (for logs and metrics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    Command(String),
    Channel,
}

/// Outcome of a login attempt.
enum Login {
    Ok,
    Refused(&'static [u8]),
}

pub struct Gate {
    runtime: Arc<PolicyRuntime>,
    snapshot: Arc<Policy>,
    peer: IpAddr,
    user: Option<Authed>,
    user_name: Option<String>,
    /// MULTI was sent and no EXEC, DISCARD or RESET since (Redis may still
    /// have refused it; the abort marker is harmless then).
    multi_open: bool,
    /// How long the request at hand has been held so far.
    held: Duration,
    scratch: Vec<u8>,
    /// Set when a reload removed or disabled this connection's user.
    revoked: bool,
    metrics: Option<Arc<Metrics>>,
    /// The user as a metric label (bounded by the metrics module).
    label: Option<UserLabel>,
    /// Bumped on every change of user, so the relay re-labels its counters.
    logins: u64,
}

impl Gate {
    /// A gate for a new connection from `peer`, authenticated as `default`
    /// right away when `default` needs no password. `Err` carries the reply
    /// for a connection that cannot be admitted (the user's connection limit).
    pub fn new(runtime: Arc<PolicyRuntime>, peer: IpAddr) -> Result<Self, Bytes> {
        let snapshot = runtime.policy.load_full();
        let mut gate = Self {
            runtime,
            snapshot,
            peer,
            user: None,
            user_name: None,
            multi_open: false,
            held: Duration::ZERO,
            scratch: Vec::new(),
            revoked: false,
            metrics: None,
            label: None,
            logins: 0,
        };
        if !gate.login_implicit() {
            return Err(Bytes::from_static(replies::MAX_CLIENTS));
        }
        Ok(gate)
    }

    /// Counts logins, denials and rate limiting in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.label = self.user_name.as_deref().map(|n| metrics.user_label(n));
        self.metrics = Some(metrics);
        self
    }

    /// The current user as a metric label.
    pub fn user_label(&self) -> Option<&UserLabel> {
        self.label.as_ref()
    }

    /// Changes whenever the connection's user does.
    pub fn logins(&self) -> u64 {
        self.logins
    }

    fn set_user(&mut self, user: Option<(usize, String, ConnSlot)>) {
        self.logins += 1;
        match user {
            Some((index, name, slot)) => {
                self.label = self.metrics.as_ref().map(|m| m.user_label(&name));
                self.user_name = Some(name);
                self.user = Some(Authed { index, _slot: slot });
            }
            None => {
                self.label = None;
                self.user_name = None;
                self.user = None;
            }
        }
    }

    fn auth_failed(&self, why: AuthFailure) {
        if let Some(m) = &self.metrics {
            m.auth_failure(why);
        }
    }

    /// Signs in as the implicit `default` user, if there is one allowed from
    /// this address. False only when its connection limit is reached.
    fn login_implicit(&mut self) -> bool {
        self.set_user(None);
        let Some(i) = self.snapshot.implicit_user() else {
            return true;
        };
        let user = &self.snapshot.users[i];
        if !user.allowed_from(self.peer) {
            return true;
        }
        let name = user.name.clone();
        match self.runtime.acquire(user) {
            Some(slot) => {
                self.set_user(Some((i, name, slot)));
                true
            }
            None => false,
        }
    }

    /// Signs in as the user a verified client certificate names (mTLS), so
    /// the client needs no AUTH. `Ok(false)`: no enabled user allowed from
    /// this address names it, and the connection stays as it was. `Err`:
    /// the reply for a user at its connection limit.
    pub fn login_certificate(&mut self, identities: &[String]) -> Result<bool, Bytes> {
        let snapshot = Arc::clone(&self.snapshot);
        let Some((index, user)) = snapshot.user_by_identity(identities) else {
            return Ok(false);
        };
        if !user.enabled || !user.allowed_from(self.peer) {
            let why = if user.enabled {
                AuthFailure::SourceNotAllowed
            } else {
                AuthFailure::DisabledUser
            };
            self.auth_failed(why);
            tracing::info!(peer = %self.peer, user = %user.name, reason = ?why, "client certificate not accepted for its user");
            return Ok(false);
        }
        let Some(slot) = self.runtime.acquire(user) else {
            self.auth_failed(AuthFailure::TooManyConnections);
            return Err(Bytes::from_static(replies::MAX_CLIENTS));
        };
        self.set_user(Some((index, user.name.clone(), slot)));
        if let Some(m) = &self.metrics {
            m.auth_success();
        }
        Ok(true)
    }

    /// Authenticated (or implicitly `default`): the pre-auth input caps stop applying.
    pub fn authenticated(&self) -> bool {
        self.user.is_some()
    }

    /// The user name, for logs.
    pub fn user_name(&self) -> Option<&str> {
        self.user_name.as_deref()
    }

    /// True once a reload removed or disabled this connection's user.
    pub fn revoked(&self) -> bool {
        self.revoked
    }

    fn current_user(&self) -> Option<&User> {
        self.user.as_ref().map(|a| &self.snapshot.users[a.index])
    }

    /// Follows a reloaded policy: the same user by name, or none.
    fn refresh(&mut self) {
        let current = self.runtime.policy.load();
        if Arc::ptr_eq(&current, &self.snapshot) {
            return;
        }
        self.snapshot = Arc::clone(&current);
        if let (Some(authed), Some(name)) = (self.user.as_mut(), self.user_name.as_ref()) {
            match self.snapshot.user(name.as_bytes()) {
                Some((i, u)) if u.enabled && u.allowed_from(self.peer) => authed.index = i,
                _ => {
                    self.set_user(None);
                    self.revoked = true;
                }
            }
        }
    }

    /// After a reload: `Err(reason)` when this connection may no longer go
    /// on, as Redis disconnects clients whose ACL no longer allows them
    /// (user removed or disabled, or a current subscription now denied).
    pub fn recheck(&mut self, subs: &crate::session::Subscriptions) -> Result<(), &'static str> {
        self.refresh();
        if self.revoked {
            return Err("user removed, disabled or no longer allowed from this address");
        }
        let Some(user) = self.current_user() else {
            return Ok(());
        };
        let allowed = subs.iter(SubKind::Channel).all(|c| user.may_subscribe(c))
            && subs.iter(SubKind::Shard).all(|c| user.may_subscribe(c))
            && subs.iter(SubKind::Pattern).all(|p| user.may_psubscribe(p));
        if allowed {
            Ok(())
        } else {
            Err("a current subscription is no longer allowed")
        }
    }

    /// The user's `resubscribe` choice, if it makes one.
    pub fn resubscribe(&self) -> Option<bool> {
        self.current_user().and_then(|u| u.resubscribe)
    }

    /// Pattern deliveries on denied channels are hidden from this user.
    pub fn hides_delivery(&self, channel: &[u8]) -> bool {
        self.current_user().is_some_and(|u| u.hides(channel))
    }

    /// Whether deliveries need [`Self::hides_delivery`] at all.
    pub fn filters_deliveries(&self) -> bool {
        self.current_user().is_some_and(User::has_deny)
    }

    /// Decides what happens to one request.
    pub fn check(&mut self, cmd: &Command, args: &Args<'_>, now: Instant) -> Verdict {
        self.refresh();
        let verdict = self.decide(cmd, args, now);
        if !matches!(verdict, Verdict::Delay(_)) {
            self.held = Duration::ZERO;
        }
        verdict
    }

    /// Records that the held request waited `d` more.
    pub fn held_for(&mut self, d: Duration) {
        self.held += d;
    }

    fn decide(&mut self, cmd: &Command, args: &Args<'_>, now: Instant) -> Verdict {
        let Some(name) = args.get(0) else {
            return Verdict::Forward;
        };
        if name.eq_ignore_ascii_case(b"auth") {
            return self.auth(args, now);
        }
        if let Kind::Hello(_) = cmd.kind {
            return self.hello(args, now);
        }
        let table = self.runtime.commands.load();
        let resolved = table.resolve(name, args.get(1));
        // Unknown commands and wrong arities: Redis answers those before any
        // auth or ACL check, and they cannot do anything, so let Redis say it.
        // (A built-in table may not know a module's commands: check those.)
        match &resolved {
            None if table.source == Source::Upstream => return Verdict::Forward,
            Some((_, info)) if !arity_ok(info.arity, args.len()) => return Verdict::Forward,
            _ => {}
        }
        if self.user.is_none() {
            if resolved.as_ref().is_some_and(|(_, info)| info.no_auth) {
                return self.after_allowed(cmd);
            }
            return Verdict::answer(replies::NOAUTH);
        }
        let unknown;
        let (full, categories): (&str, u32) = match &resolved {
            Some((full, info)) => (full, info.categories),
            None => {
                unknown = String::from_utf8_lossy(name).to_ascii_lowercase();
                (&unknown, 0)
            }
        };
        let denial = self.permission(cmd, args, full, categories);
        if let Some(denial) = denial {
            let user = self.current_user().map_or("", |u| u.name.as_str());
            let channel = match (&denial, cmd.kind) {
                (Denial::Channel, Kind::Publish | Kind::SPublish | Kind::Subscribe(_)) => {
                    args.get(1)
                }
                _ => None,
            };
            let audit = self
                .current_user()
                .is_some_and(|u| self.snapshot.mode_for(u) == Mode::Audit);
            if let (Some(m), Some(label)) = (&self.metrics, &self.label) {
                if audit {
                    m.audit_would_deny(label, full, channel);
                } else {
                    m.acl_denial(label, full, channel);
                }
            }
            if audit {
                tracing::warn!(user, command = %full, ?denial, "audit: would deny");
                return self.after_allowed(cmd);
            }
            tracing::debug!(user, command = %full, ?denial, "denied");
            let verdict = match denial {
                Denial::Command(c) => Verdict::answer_owned(format!(
                    "-NOPERM this user has no permissions to run the '{}' command\r\n",
                    sanitize(&c)
                )),
                Denial::Channel => Verdict::answer(replies::NOPERM_CHANNEL),
            };
            return self.in_transaction(verdict);
        }
        if let Some(v) = self.limits(cmd, args, now) {
            return self.in_transaction(v);
        }
        // Listing channels must not reveal ones the user may not subscribe to.
        if matches!(full, "pubsub|channels" | "pubsub|shardchannels")
            && self
                .current_user()
                .is_some_and(|u| !u.subscribe.all || u.has_deny())
        {
            return Verdict::ForwardFiltered;
        }
        self.after_allowed(cmd)
    }

    /// Whether a channel listed in a filtered reply may be shown.
    pub fn may_see(&self, channel: &[u8]) -> bool {
        self.current_user()
            .is_some_and(|u| u.may_subscribe(channel))
    }

    /// A request refused inside MULTI must abort the transaction in Redis too.
    fn in_transaction(&self, verdict: Verdict) -> Verdict {
        match verdict {
            Verdict::Answer {
                reply,
                upstream: None,
            } if self.multi_open => Verdict::Answer {
                reply,
                upstream: Some(ABORT_TRANSACTION),
            },
            other => other,
        }
    }

    /// The ACL: command first, then channels, as Redis checks them.
    fn permission(
        &self,
        cmd: &Command,
        args: &Args<'_>,
        full: &str,
        categories: u32,
    ) -> Option<Denial> {
        let user = self.current_user()?;
        if !user.commands.allows(full, categories) {
            return Some(Denial::Command(full.to_string()));
        }
        let all_args = || args.iter().skip(1);
        let ok = match cmd.kind {
            Kind::Publish | Kind::SPublish => args.get(1).is_none_or(|ch| user.may_publish(ch)),
            Kind::Subscribe(SubKind::Pattern) => all_args().all(|p| user.may_psubscribe(p)),
            Kind::Subscribe(_) => all_args().all(|ch| user.may_subscribe(ch)),
            _ => match full {
                "pubsub|numsub" | "pubsub|shardnumsub" => {
                    args.iter().skip(2).all(|ch| user.may_subscribe(ch))
                }
                _ => true,
            },
        };
        (!ok).then_some(Denial::Channel)
    }

    /// Subscribe churn and publish rate limits.
    fn limits(&mut self, cmd: &Command, args: &Args<'_>, now: Instant) -> Option<Verdict> {
        let now_ns = self.runtime.now_ns(now);
        let user = self.current_user()?;
        match cmd.kind {
            Kind::Subscribe(_) | Kind::Unsubscribe(_) => {
                let ops = args.len().saturating_sub(1).max(1) as u64;
                match user.spend_churn(ops, now_ns) {
                    Decision::Allow => None,
                    Decision::RetryAfter(d) => Some(Verdict::answer_owned(format!(
                        "-RATELIMIT subscribe_ops_per_second of user '{}' exceeded; retry in {} ms\r\n",
                        user.name,
                        d.as_millis().max(1)
                    ))),
                    Decision::TooLarge => Some(Verdict::answer_owned(format!(
                        "-RATELIMIT more channels in one command than subscribe_ops_per_second of user '{}' allows\r\n",
                        user.name
                    ))),
                }
            }
            Kind::Publish | Kind::SPublish => {
                let (channel, payload) = (args.get(1)?, args.get(2).map_or(0, |p| p.len() as u64));
                let sharded = cmd.kind == Kind::SPublish;
                let mut scratch = std::mem::take(&mut self.scratch);
                let verdict =
                    self.publish_limits(sharded, channel, payload, (now, now_ns), &mut scratch);
                self.scratch = scratch;
                verdict
            }
            _ => None,
        }
    }

    fn publish_limits(
        &self,
        sharded: bool,
        channel: &[u8],
        payload: u64,
        (now, now_ns): (Instant, u64),
        scratch: &mut Vec<u8>,
    ) -> Option<Verdict> {
        let user = self.current_user()?;
        for &i in &user.rate_rules {
            let rule = &self.snapshot.rate_rules[i];
            if !rule.applies(sharded, channel) {
                continue;
            }
            let decision = match rule.scope {
                Scope::Local => rule.spend(&user.name, channel, payload, now_ns, scratch),
                Scope::Global {
                    on_store_failure, ..
                } => {
                    let take = match self.runtime.global.get() {
                        Some(store) => rule.take_global(store, &user.name, channel, now, scratch),
                        None => Take::StoreDown,
                    };
                    match take {
                        Take::Token => Decision::Allow,
                        // A lease is on its way; not a rate limit.
                        Take::Wait => return Some(Verdict::Delay(LEASE_WAIT)),
                        Take::Denied(wait) => Decision::RetryAfter(wait),
                        Take::StoreDown => match on_store_failure {
                            StoreFailure::FailOpen => {
                                if let Some(m) = &self.metrics {
                                    m.global_fallback(&rule.name, "local_share");
                                }
                                rule.spend(&user.name, channel, payload, now_ns, scratch)
                            }
                            StoreFailure::FailClosed => {
                                if let Some(m) = &self.metrics {
                                    m.global_fallback(&rule.name, "rejected");
                                }
                                return Some(Verdict::answer_owned(format!(
                                    "-RATELIMIT rate limit '{}' cannot be checked: its shared store is unavailable\r\n",
                                    rule.name
                                )));
                            }
                        },
                    }
                }
            };
            match decision {
                Decision::Allow => {}
                Decision::TooLarge => {
                    if let Some(m) = &self.metrics {
                        m.rate_limit_rejected(&rule.name);
                    }
                    return Some(Verdict::answer_owned(format!(
                        "-RATELIMIT message larger than rate limit '{}' allows at once\r\n",
                        rule.name
                    )));
                }
                Decision::RetryAfter(wait) => {
                    if let OnLimit::Delay(max) = rule.on_limit
                        && self.held + wait <= max
                    {
                        if let Some(m) = &self.metrics {
                            m.rate_limit_delayed(&rule.name, wait);
                        }
                        return Some(Verdict::Delay(wait));
                    }
                    if let Some(m) = &self.metrics {
                        m.rate_limit_rejected(&rule.name);
                    }
                    return Some(Verdict::answer_owned(format!(
                        "-RATELIMIT rate limit '{}' exceeded; retry in {} ms\r\n",
                        rule.name,
                        wait.as_millis().max(1)
                    )));
                }
            }
        }
        None
    }

    /// Bookkeeping for a request that goes upstream (MULTI, EXEC, RESET).
    fn after_allowed(&mut self, cmd: &Command) -> Verdict {
        match cmd.kind {
            Kind::Multi => self.multi_open = true,
            Kind::Exec | Kind::Discard => self.multi_open = false,
            Kind::Reset => {
                self.multi_open = false;
                // RESET signs the connection out, back to `default` if it needs no password.
                let _ = self.login_implicit();
            }
            _ => {}
        }
        Verdict::Forward
    }

    fn auth(&mut self, args: &Args<'_>, now: Instant) -> Verdict {
        let (user, password): (&[u8], &[u8]) = match args.len() {
            0 | 1 => {
                self.auth_failed(AuthFailure::Malformed);
                return Verdict::answer(replies::AUTH_ARITY);
            }
            2 => {
                let default_nopass = self
                    .snapshot
                    .default_user
                    .is_some_and(|i| self.snapshot.users[i].nopass);
                if default_nopass {
                    return Verdict::answer(replies::AUTH_NOPASS_DEFAULT);
                }
                (b"default", args.get(1).unwrap_or_default())
            }
            3 => (
                args.get(1).unwrap_or_default(),
                args.get(2).unwrap_or_default(),
            ),
            _ => {
                self.auth_failed(AuthFailure::Malformed);
                return Verdict::answer(replies::SYNTAX);
            }
        };
        match self.login(user, password, now) {
            Login::Ok => Verdict::answer(replies::OK),
            Login::Refused(reply) => Verdict::answer(reply),
        }
    }

    fn hello(&mut self, args: &Args<'_>, now: Instant) -> Verdict {
        if let Some(v) = args.get(1) {
            match crate::resp::parse_i64(v) {
                None => return Verdict::answer(replies::HELLO_VERSION),
                Some(v) if !(2..=3).contains(&v) => return Verdict::answer(replies::NOPROTO),
                Some(_) => {}
            }
        }
        let mut auth: Option<(usize, usize)> = None;
        let mut j = 2;
        while j < args.len() {
            let opt = args.get(j).unwrap_or_default();
            let more = args.len() - 1 - j;
            if opt.eq_ignore_ascii_case(b"auth") && more >= 2 {
                auth = Some((j + 1, j + 2));
                j += 3;
            } else if opt.eq_ignore_ascii_case(b"setname") && more >= 1 {
                j += 2;
            } else {
                return Verdict::answer_owned(format!(
                    "-ERR Syntax error in HELLO option '{}'\r\n",
                    sanitize(&String::from_utf8_lossy(opt))
                ));
            }
        }
        let Some((u, p)) = auth else {
            if self.user.is_none() {
                return Verdict::answer(replies::HELLO_NOAUTH);
            }
            return Verdict::Forward;
        };
        let (user, password) = (
            args.get(u).unwrap_or_default(),
            args.get(p).unwrap_or_default(),
        );
        if let Login::Refused(reply) = self.login(user, password, now) {
            return Verdict::answer(reply);
        }
        // Redis gets HELLO without the client's credentials: it already knows
        // pubwarden's, and the client must not be able to change them.
        let kept: Vec<&[u8]> = args
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != u - 1 && *i != u && *i != p)
            .map(|(_, a)| a)
            .collect();
        Verdict::ForwardAs(Bytes::from(crate::resp::encode_command(&kept)))
    }

    fn login(&mut self, name: &[u8], password: &[u8], now: Instant) -> Login {
        let now_ns = self.runtime.now_ns(now);
        let per_minute = self.snapshot.max_auth_failures_per_minute;
        if !self.runtime.auth_allowed(self.peer, per_minute, now_ns) {
            tracing::warn!(peer = %self.peer, "AUTH refused: too many failures from this address");
            self.auth_failed(AuthFailure::TooManyFailures);
            return Login::Refused(replies::WRONGPASS);
        }
        // Every refusal looks the same to the client; only logs and metrics say why.
        let snapshot = Arc::clone(&self.snapshot);
        let found = snapshot.user(name);
        if found.is_none_or(|(_, u)| !u.enabled) {
            // Hash anyway, so timing does not tell which names exist.
            let _ = super::hash_password(password);
        }
        let outcome = match found {
            None => Err(AuthFailure::UnknownUser),
            Some((_, u)) if !u.enabled => Err(AuthFailure::DisabledUser),
            Some((_, u)) if !u.verify(password) => Err(AuthFailure::WrongPassword),
            Some((_, u)) if !u.allowed_from(self.peer) => Err(AuthFailure::SourceNotAllowed),
            Some(found) => Ok(found),
        };
        let (index, user) = match outcome {
            Ok(found) => found,
            Err(why) => {
                self.runtime.record_failure(self.peer, per_minute, now_ns);
                self.auth_failed(why);
                tracing::info!(peer = %self.peer, reason = ?why, "AUTH failed");
                return Login::Refused(replies::WRONGPASS);
            }
        };
        let Some(slot) = self.runtime.acquire(user) else {
            tracing::warn!(peer = %self.peer, user = %user.name, "AUTH refused: user's max_connections reached");
            self.auth_failed(AuthFailure::TooManyConnections);
            return Login::Refused(replies::MAX_CLIENTS);
        };
        self.set_user(Some((index, user.name.clone(), slot)));
        if let Some(m) = &self.metrics {
            m.auth_success();
        }
        Login::Ok
    }
}

fn arity_ok(arity: i32, argc: usize) -> bool {
    let argc = argc as i64;
    let arity = i64::from(arity);
    if arity >= 0 {
        argc == arity
    } else {
        argc >= -arity
    }
}

/// Error text stays on one line.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if c == '\r' || c == '\n' { ' ' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resp::request::{RequestLimits, RequestParser};

    const POLICY: &str = r#"
users:
  default:
    nopass: true
    channels: {publish: ["public.*"], subscribe: ["public.*"]}
  alice:
    passwords: ["sha256:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"]
    max_connections: 1
    channels: {publish: ["orders.*"], subscribe: ["orders.*", "news"], deny: ["orders.secret"]}
    commands: {allow: ["@all"], deny: ["@dangerous"]}
rate_limits:
  - {name: slow, users: [alice], channels: ["orders.*"], messages_per_second: 10, burst: 2}
"#;

    fn gate(policy: &str) -> (Arc<PolicyRuntime>, Gate) {
        let p = super::super::schema::parse(policy).unwrap();
        let rt = Arc::new(PolicyRuntime::new(p, CommandTable::built_in()));
        let g = Gate::new(rt.clone(), "127.0.0.1".parse().unwrap()).unwrap();
        (rt, g)
    }

    fn run(g: &mut Gate, line: &str, now: Instant) -> Verdict {
        let mut p = RequestParser::new(RequestLimits::default());
        let buf = format!("{line}\r\n");
        let f = p.next(buf.as_bytes(), 0).unwrap().unwrap();
        let args = p.args(buf.as_bytes(), &f);
        g.check(&Command::classify(&args), &args, now)
    }

    fn reply(v: &Verdict) -> String {
        match v {
            Verdict::Answer { reply, .. } => String::from_utf8_lossy(reply).trim_end().to_string(),
            other => format!("{other:?}"),
        }
    }

    #[test]
    fn default_user_then_alice() {
        let (rt, mut g) = gate(POLICY);
        let t = Instant::now();
        assert!(g.authenticated());
        assert_eq!(run(&mut g, "PUBLISH public.x hi", t), Verdict::Forward);
        assert!(
            reply(&run(&mut g, "PUBLISH orders.x hi", t))
                .starts_with("-NOPERM this user has no permissions to access")
        );
        assert_eq!(run(&mut g, "GET k", t), Verdict::Forward);
        assert!(reply(&run(&mut g, "SET k v", t)).contains("'set' command"));
        assert!(
            reply(&run(&mut g, "AUTH x", t)).starts_with("-ERR AUTH <password> called without")
        );
        assert_eq!(
            reply(&run(&mut g, "AUTH alice nope", t)),
            "-WRONGPASS invalid username-password pair or user is disabled."
        );
        assert_eq!(reply(&run(&mut g, "AUTH alice password", t)), "+OK");
        assert_eq!(rt.connections_of("alice"), 1);
        assert_eq!(run(&mut g, "SUBSCRIBE orders.a news", t), Verdict::Forward);
        assert!(reply(&run(&mut g, "SUBSCRIBE orders.a other", t)).starts_with("-NOPERM"));
        assert!(reply(&run(&mut g, "SUBSCRIBE orders.secret", t)).starts_with("-NOPERM"));
        assert_eq!(run(&mut g, "PSUBSCRIBE orders.*", t), Verdict::Forward);
        assert!(reply(&run(&mut g, "PSUBSCRIBE orders.x*", t)).starts_with("-NOPERM"));
        assert!(g.hides_delivery(b"orders.secret"));
        assert!(reply(&run(&mut g, "FLUSHALL", t)).contains("'flushall' command"));
        assert!(reply(&run(&mut g, "CLIENT KILL ID 1", t)).contains("'client|kill' command"));
        assert_eq!(run(&mut g, "CLIENT SETNAME x", t), Verdict::Forward);
        // A second connection as alice is over her limit.
        let mut g2 = Gate::new(rt.clone(), "127.0.0.1".parse().unwrap()).unwrap();
        assert_eq!(
            reply(&run(&mut g2, "AUTH alice password", t)),
            "-ERR max number of clients reached"
        );
        drop(g);
        assert_eq!(rt.connections_of("alice"), 0);
        assert_eq!(reply(&run(&mut g2, "AUTH alice password", t)), "+OK");
    }

    #[test]
    fn denied_command_in_multi_flags_the_transaction_in_redis() {
        let (_, mut g) = gate(POLICY);
        let t = Instant::now();
        assert!(matches!(
            run(&mut g, "SET k v", t),
            Verdict::Answer { upstream: None, .. }
        ));
        assert_eq!(run(&mut g, "MULTI", t), Verdict::Forward);
        match run(&mut g, "SET k v", t) {
            Verdict::Answer { reply, upstream } => {
                assert!(reply.starts_with(b"-NOPERM"));
                assert_eq!(upstream, Some(ABORT_TRANSACTION));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(run(&mut g, "EXEC", t), Verdict::Forward);
        assert!(matches!(
            run(&mut g, "SET k v", t),
            Verdict::Answer { upstream: None, .. }
        ));
    }

    #[test]
    fn hello_auth_is_answered_and_stripped() {
        let (_, mut g) = gate(
            "users:\n  bob:\n    passwords: [\"sha256:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8\"]\n",
        );
        let t = Instant::now();
        assert!(!g.authenticated());
        assert_eq!(
            reply(&run(&mut g, "GET k", t)),
            "-NOAUTH Authentication required."
        );
        assert!(reply(&run(&mut g, "HELLO 3", t)).starts_with("-NOAUTH HELLO must be called"));
        assert_eq!(
            reply(&run(&mut g, "HELLO 4 AUTH bob password", t)),
            "-NOPROTO unsupported protocol version"
        );
        assert_eq!(
            reply(&run(&mut g, "HELLO 3 AUTH bob", t)),
            "-ERR Syntax error in HELLO option 'AUTH'"
        );
        assert!(reply(&run(&mut g, "HELLO 3 AUTH bob wrong", t)).starts_with("-WRONGPASS"));
        assert_eq!(
            run(&mut g, "HELLO 3 AUTH bob password SETNAME app", t),
            Verdict::ForwardAs(Bytes::from_static(
                b"*4\r\n$5\r\nHELLO\r\n$1\r\n3\r\n$7\r\nSETNAME\r\n$3\r\napp\r\n"
            ))
        );
        assert!(g.authenticated());
        // bob has the safe default: no SET, no KEYS, yes GET.
        assert_eq!(run(&mut g, "GET k", t), Verdict::Forward);
        assert!(reply(&run(&mut g, "KEYS *", t)).contains("'keys'"));
        assert_eq!(run(&mut g, "RESET", t), Verdict::Forward);
        assert!(!g.authenticated());
        assert_eq!(run(&mut g, "QUIT", t), Verdict::Forward);
    }

    #[test]
    fn rate_limit_rejects_after_burst_and_recovers() {
        let (_, mut g) = gate(POLICY);
        let t = Instant::now();
        run(&mut g, "AUTH alice password", t);
        assert_eq!(run(&mut g, "PUBLISH orders.a 1", t), Verdict::Forward);
        assert_eq!(run(&mut g, "PUBLISH orders.a 2", t), Verdict::Forward);
        assert_eq!(
            reply(&run(&mut g, "PUBLISH orders.a 3", t)),
            "-RATELIMIT rate limit 'slow' exceeded; retry in 100 ms"
        );
        assert_eq!(
            run(&mut g, "PUBLISH orders.a 3", t + Duration::from_millis(100)),
            Verdict::Forward
        );
    }

    #[test]
    fn delay_holds_until_max_delay() {
        let (_, mut g) = gate(
            "users:\n  default:\n    nopass: true\n    channels: {publish: ['*']}\nrate_limits:\n  - {name: d, messages_per_second: 10, burst: 1, on_limit: delay, max_delay: 150ms}\n",
        );
        let t = Instant::now();
        assert_eq!(run(&mut g, "PUBLISH c 1", t), Verdict::Forward);
        assert_eq!(
            run(&mut g, "PUBLISH c 2", t),
            Verdict::Delay(Duration::from_millis(100))
        );
        g.held_for(Duration::from_millis(100));
        assert_eq!(
            run(&mut g, "PUBLISH c 2", t + Duration::from_millis(100)),
            Verdict::Forward
        );
        assert_eq!(
            run(&mut g, "PUBLISH c 3", t + Duration::from_millis(100)),
            Verdict::Delay(Duration::from_millis(100))
        );
        g.held_for(Duration::from_millis(100));
        // The budget is still spent at the same instant: another wait would pass max_delay.
        assert_eq!(
            reply(&run(&mut g, "PUBLISH c 3", t + Duration::from_millis(100))),
            "-RATELIMIT rate limit 'd' exceeded; retry in 100 ms"
        );
    }

    #[test]
    fn failed_auth_is_limited_per_address() {
        let (_, mut g) = gate(
            "auth: {max_failures_per_minute: 2}\nusers:\n  bob:\n    passwords: [\"sha256:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8\"]\n",
        );
        let t = Instant::now();
        for _ in 0..2 {
            assert!(reply(&run(&mut g, "AUTH bob wrong", t)).starts_with("-WRONGPASS"));
        }
        // Even the right password is refused until the budget refills.
        assert!(reply(&run(&mut g, "AUTH bob password", t)).starts_with("-WRONGPASS"));
        assert_eq!(
            reply(&run(
                &mut g,
                "AUTH bob password",
                t + Duration::from_secs(30)
            )),
            "+OK"
        );
    }
}
