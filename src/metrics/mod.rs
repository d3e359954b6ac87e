//! Prometheus metrics: families registered once at start, handles resolved
//! once per connection or channel group, counts kept in plain per-connection
//! counters and added to the shared atomics once per read batch.
//!
//! - [`settings`]: the `metrics:` settings section.
//! - [`groups`]: channel names to bounded labels (group rules, the capped
//!   per-channel labels, the per-connection cache).
//! - [`conn`]: what one connection counts, and when it flushes.
//! - [`histogram`]: a lock-free histogram (prometheus-client's takes a mutex).
//!
//! Every family is listed, with its labels and one sentence of help, in
//! `docs/metrics.md`; a test keeps that table and this registry in step.
//! Label values are never raw client input: groups and per-channel labels
//! come from [`groups`], users from [`Metrics::user_label`] (capped), and
//! command names from a fixed table.

pub mod conn;
pub mod groups;
pub mod histogram;
pub mod settings;

use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::{prometheus_text, text};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

pub use conn::ConnMetrics;
use groups::{ChannelGroups, ChannelLabels};
use histogram::{AtomicHistogram, Buckets};
pub use settings::MetricsSettings;

/// Label sets: fixed keys, values from bounded sets only.
pub type Labels = Vec<(&'static str, String)>;
type Counters = Family<Labels, Counter>;
type Histograms = Family<Labels, AtomicHistogram, fn() -> AtomicHistogram>;

/// Content type of the Prometheus text format.
pub const TEXT_CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;
/// Content type of OpenMetrics text, served when a scraper asks for it.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Command names counted on their own; everything else is `other`. Sorted,
/// for a binary search per command.
pub const COMMANDS: &[&str] = &[
    "auth",
    "blpop",
    "brpop",
    "client",
    "decr",
    "del",
    "discard",
    "eval",
    "evalsha",
    "exec",
    "exists",
    "expire",
    "fcall",
    "get",
    "hdel",
    "hello",
    "hget",
    "hgetall",
    "hset",
    "incr",
    "info",
    "keys",
    "lpop",
    "lpush",
    "lrange",
    "mget",
    "monitor",
    "mset",
    "multi",
    "ping",
    "psubscribe",
    "publish",
    "pubsub",
    "punsubscribe",
    "quit",
    "reset",
    "rpop",
    "rpush",
    "sadd",
    "scan",
    "select",
    "set",
    "smembers",
    "spublish",
    "srem",
    "ssubscribe",
    "subscribe",
    "sunsubscribe",
    "ttl",
    "type",
    "unsubscribe",
    "unwatch",
    "watch",
    "xadd",
    "xread",
    "xreadgroup",
    "zadd",
    "zrange",
    "zrem",
];

/// Index into [`COMMANDS`], or `COMMANDS.len()` for `other`.
#[inline]
pub fn command_index(name: &str) -> usize {
    COMMANDS.binary_search(&name).unwrap_or(COMMANDS.len())
}

/// How a command ended, as the `result` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandResult {
    Ok = 0,
    Error = 1,
    /// Nothing came back: `CLIENT REPLY OFF|SKIP` suppressed the reply.
    NoReply = 2,
}

const COMMAND_RESULTS: [&str; 3] = ["ok", "error", "no_reply"];

/// Outcomes of a publish; `denied` and `rate_limited` come from policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishResult {
    Ok = 0,
    Error = 1,
    Denied = 2,
    RateLimited = 3,
}

const PUBLISH_RESULTS: [&str; 4] = ["ok", "error", "denied", "rate_limited"];

/// `kind` label of deliveries, in `DeliveryKind` order.
const DELIVERY_KINDS: [&str; 3] = ["message", "pmessage", "smessage"];
/// `kind` label of subscriptions, in `SubKind` order.
const SUB_KINDS: [&str; 3] = ["channel", "pattern", "shard"];

/// Why pubwarden closed a client connection itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientClose {
    /// A policy reload removed or disabled its user, or denied a current subscription.
    PolicyRevoked = 0,
    /// It did not authenticate within `limits.auth_timeout`.
    AuthTimeout = 1,
    /// It sent nothing for `limits.idle_timeout`.
    IdleTimeout = 2,
}

/// Why an AUTH (or HELLO ... AUTH) failed. Never the user name: an unknown
/// name is client input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    WrongPassword,
    UnknownUser,
    DisabledUser,
    Malformed,
    /// The user may not connect from the client's address.
    SourceNotAllowed,
    /// The client's address failed too often recently.
    TooManyFailures,
    /// The user's `max_connections` is reached.
    TooManyConnections,
}

const AUTH_FAILURES: [(AuthFailure, &str); 7] = [
    (AuthFailure::WrongPassword, "wrong_password"),
    (AuthFailure::UnknownUser, "unknown_user"),
    (AuthFailure::DisabledUser, "disabled_user"),
    (AuthFailure::Malformed, "malformed"),
    (AuthFailure::SourceNotAllowed, "source_not_allowed"),
    (AuthFailure::TooManyFailures, "too_many_failures"),
    (AuthFailure::TooManyConnections, "too_many_connections"),
];

/// Upstream trouble, by the `kind` label of `pubwarden_upstream_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamError {
    ConnectRefused = 0,
    ConnectTimeout = 1,
    /// Redis closed a relay connection.
    Closed = 2,
    Io = 3,
    /// Redis sent bytes that are not RESP.
    Protocol = 4,
}

const UPSTREAM_ERRORS: [&str; 5] = [
    "connect_refused",
    "connect_timeout",
    "closed",
    "io",
    "protocol",
];

/// The user label every session starts with (Redis's `default` user).
pub const DEFAULT_USER: &str = "default";
/// Distinct user labels before further names count as `other`; users come
/// from the policy file, so this only guards against a mistake there.
pub const MAX_USERS: usize = 256;

/// A user name known to be bounded (see [`Metrics::user_label`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserLabel(String);

impl UserLabel {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The pre-resolved handles of one channel group.
#[derive(Debug)]
pub struct GroupHandles {
    pub deliveries: [Counter; 3],
    pub delivery_bytes: [Counter; 3],
    /// `pubwarden_publishes_total{user="default"}` by result.
    pub publishes: [Counter; 4],
    pub publish_bytes: Counter,
    pub publishes_unheard: Counter,
    pub receivers: AtomicHistogram,
    pub publish_duration: AtomicHistogram,
    pub subscriptions: [Gauge; 3],
}

/// Handles of one command name.
#[derive(Debug)]
pub struct CommandHandles {
    pub results: [Counter; 3],
    pub duration: AtomicHistogram,
}

/// Every family, registered once.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    enabled: bool,
    groups: ChannelGroups,
    channels: Option<ChannelLabels>,
    group: Box<[GroupHandles]>,
    commands: Box<[CommandHandles]>,

    publishes: Counters,
    users: Mutex<Vec<String>>,

    delivery_write: AtomicHistogram,
    pending_output: AtomicHistogram,
    output_buffered: Gauge,
    slow_consumers: Counter,
    resubscribes: Counter,
    resubscribe_gap: Counter<f64>,
    sub_changes: [[Counter; 2]; 3],

    client_open: Gauge,
    client_accepted: Counter,
    client_rejected: Counter,
    /// Refused at `limits.max_clients`, and by a user's `max_connections`.
    client_rejected_max: Counter,
    client_rejected_user: Counter,
    /// Closed by pubwarden: policy revoked, auth timeout, idle timeout.
    client_closed: [Counter; 3],
    upstream_open: Gauge,
    upstream_connects: Counter,
    upstream_errors: [Counter; 5],
    upstream_up: Gauge,

    auth_successes: Counter,
    auth_failures: [Counter; 7],
    acl_denials: Counters,
    audit_would_deny: Counters,
    rate_limit_rejections: Counters,
    rate_limit_delays: Counters,
    rate_limit_delay_seconds: Family<Labels, Counter<f64>>,
    config_reloads: [Counter; 2],
    config_last_success: Gauge<f64, std::sync::atomic::AtomicU64>,

    /// Spans not exported: queue full, export failed (src/telemetry).
    trace_span_drops: [Counter; 2],
    envelope_latency: AtomicHistogram,
    publish_delivery_latency: AtomicHistogram,

    /// TLS (src/tls): rare events, so families looked up by label.
    tls_handshake_failures: Counters,
    tls_expiry: Family<Labels, Gauge>,
    tls_reloads: [Counter; 2],
    tls_client_logins: [Counter; 2],

    /// Sentinel (src/sentinel.rs).
    sentinel_master: Family<Labels, Gauge>,
    sentinel_failovers: Counter,
    sentinel_last_follow: Gauge<f64, std::sync::atomic::AtomicU64>,

    /// Global rate limits (src/policy/global.rs).
    global_leases: [Counter; 3],
    global_store_up: Gauge,
    global_fallbacks: Counters,

    /// Redis Cluster (src/cluster).
    cluster_nodes: Gauge,
    cluster_refreshes: [Counter; 2],
    cluster_redirects: [Counter; 2],
    cluster_shard_resubscribes: Counter,
    cluster_shard_gap: Counter<f64>,
    cluster_node_connections: Family<Labels, Gauge>,
    cluster_node_requests: Counters,
    cluster_node_deliveries: Counters,
}

fn latency() -> AtomicHistogram {
    AtomicHistogram::new(histogram::LATENCY)
}

fn receivers() -> AtomicHistogram {
    AtomicHistogram::new(histogram::RECEIVERS)
}

fn labels(pairs: &[(&'static str, &str)]) -> Labels {
    pairs.iter().map(|&(k, v)| (k, v.to_string())).collect()
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Registration helpers: a name without the `_total` a counter gets from
/// the encoder (prometheus-client panics in debug builds otherwise).
struct Reg<'a>(&'a mut Registry);

impl Reg<'_> {
    fn counter(&mut self, name: &str, help: &str) -> Counter {
        let c = Counter::default();
        self.0.register(name, help, c.clone());
        c
    }
    fn counters(&mut self, name: &str, help: &str) -> Counters {
        let f = Counters::default();
        self.0.register(name, help, f.clone());
        f
    }
    fn gauge(&mut self, name: &str, help: &str) -> Gauge {
        let g = Gauge::default();
        self.0.register(name, help, g.clone());
        g
    }
    fn gauges(&mut self, name: &str, help: &str) -> Family<Labels, Gauge> {
        let f = Family::<Labels, Gauge>::default();
        self.0.register(name, help, f.clone());
        f
    }
    fn histograms(&mut self, name: &str, help: &str, ctor: fn() -> AtomicHistogram) -> Histograms {
        let f = Histograms::new_with_constructor(ctor);
        self.0.register(name, help, f.clone());
        f
    }
    fn histogram(&mut self, name: &str, help: &str, buckets: Buckets) -> AtomicHistogram {
        let h = AtomicHistogram::new(buckets);
        self.0.register(name, help, h.clone());
        h
    }
}

impl Metrics {
    pub fn new(settings: &MetricsSettings) -> Self {
        let mut registry = Registry::default();
        let mut r = Reg(&mut registry);
        let groups = ChannelGroups::new(&settings.channel_groups);

        // Publishes.
        let publishes = r.counters(
            "pubwarden_publishes",
            "PUBLISH and SPUBLISH commands by channel group, user and result",
        );
        let publish_bytes = r.counters(
            "pubwarden_publish_payload_bytes",
            "Payload bytes of PUBLISH and SPUBLISH commands relayed to Redis",
        );
        let receivers_f = r.histograms(
            "pubwarden_publish_receivers",
            "Receivers per publish, as Redis's integer reply counts them",
            receivers,
        );
        let unheard = r.counters(
            "pubwarden_publishes_unheard",
            "Publishes that Redis delivered to no subscriber (a reply of 0)",
        );
        let publish_duration = r.histograms(
            "pubwarden_publish_duration_seconds",
            "Time from reading a publish from the client to reading Redis's reply",
            latency,
        );

        // Deliveries.
        let deliveries = r.counters(
            "pubwarden_deliveries",
            "Messages delivered to subscribers by channel group and kind",
        );
        let delivery_bytes = r.counters(
            "pubwarden_delivery_payload_bytes",
            "Payload bytes of messages delivered to subscribers",
        );
        let delivery_write = r.histogram(
            "pubwarden_delivery_write_duration_seconds",
            "Time from reading deliveries from Redis to writing their last byte to the client, once per read batch",
            histogram::LATENCY,
        );

        // Subscriptions.
        let subscriptions = r.gauges(
            "pubwarden_subscriptions",
            "Current subscriptions by channel group and kind (channel, pattern, shard)",
        );
        let sub_changes_f = r.counters(
            "pubwarden_subscription_changes",
            "Subscriptions added and removed, by kind and operation",
        );

        // Subscribers.
        let pending_output = r.histogram(
            "pubwarden_client_pending_output_bytes",
            "Bytes waiting for a slow client, observed after each read batch that left some",
            histogram::PENDING_BYTES,
        );
        let output_buffered = r.gauge(
            "pubwarden_client_output_buffered_bytes",
            "Bytes held for clients that did not take them yet, over all clients",
        );
        let slow_consumers = r.counter(
            "pubwarden_slow_consumer_disconnects",
            "Clients disconnected for not reading their deliveries fast enough",
        );
        let resubscribes = r.counter(
            "pubwarden_resubscribes",
            "Subscribers reconnected to Redis and subscribed again after their connection died",
        );
        let resubscribe_gap = Counter::<f64>::default();
        r.0.register(
            "pubwarden_resubscribe_gap_seconds",
            "Seconds subscribers spent without a Redis connection before being subscribed again (messages published then were missed)",
            resubscribe_gap.clone(),
        );

        // Commands.
        let commands_f = r.counters(
            "pubwarden_commands",
            "Client commands by name (a fixed set; the rest is other) and result",
        );
        let command_duration = r.histograms(
            "pubwarden_command_duration_seconds",
            "Time from reading a command from the client to reading the end of its reply",
            latency,
        );

        // Connections.
        let client_open = r.gauge(
            "pubwarden_client_connections",
            "Client connections currently open",
        );
        let client_accepted = r.counter(
            "pubwarden_client_connections_accepted",
            "Client connections accepted",
        );
        let client_rejected_f = r.counters(
            "pubwarden_client_connections_rejected",
            "Client connections refused, by reason",
        );
        let client_closed_f = r.counters(
            "pubwarden_client_disconnects",
            "Client connections pubwarden closed itself, by reason (policy_revoked, auth_timeout, idle_timeout)",
        );
        let upstream_open = r.gauge(
            "pubwarden_upstream_connections",
            "Relay connections to Redis currently open",
        );
        let upstream_connects = r.counter(
            "pubwarden_upstream_connections_opened",
            "Relay connections to Redis opened",
        );
        let upstream_errors_f = r.counters(
            "pubwarden_upstream_errors",
            "Failures talking to Redis, by kind",
        );
        let upstream_up = r.gauge(
            "pubwarden_upstream_up",
            "1 if the last health check reached Redis, else 0",
        );
        registry.register(
            "pubwarden_build",
            "Build information; the value is always 1",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        let mut r = Reg(&mut registry);

        // Policy: emitted once policy is configured.
        let auth_successes = r.counter("pubwarden_auth_successes", "Successful AUTH attempts");
        let auth_failures_f = r.counters(
            "pubwarden_auth_failures",
            "Failed AUTH attempts by reason (never by the name a client tried)",
        );
        let acl_denials = r.counters(
            "pubwarden_acl_denials",
            "Commands denied by the channel or command ACL, by user, command and channel group",
        );
        let audit_would_deny = r.counters(
            "pubwarden_audit_would_denies",
            "Commands the ACL would deny, counted in audit mode instead of denying them",
        );
        let rate_limit_rejections = r.counters(
            "pubwarden_rate_limit_rejections",
            "Commands rejected by a rate limit, by rule",
        );
        let rate_limit_delays = r.counters(
            "pubwarden_rate_limit_delays",
            "Commands held back by a rate limit before being relayed, by rule",
        );
        let rate_limit_delay_seconds = Family::<Labels, Counter<f64>>::default();
        registry.register(
            "pubwarden_rate_limit_delay_seconds",
            "Total time commands were held back by a rate limit, by rule",
            rate_limit_delay_seconds.clone(),
        );
        let mut r = Reg(&mut registry);
        let reloads_f = r.counters(
            "pubwarden_config_reloads",
            "Configuration reloads by result (success, failure)",
        );
        let config_last_success = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "pubwarden_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful configuration load",
            config_last_success.clone(),
        );
        config_last_success.set(unix_now());
        let mut r = Reg(&mut registry);
        let tls_handshake_failures = r.counters(
            "pubwarden_tls_handshake_failures",
            "TLS handshakes that failed, by side (client, upstream) and reason",
        );
        // Every side and reason from zero, so the first failure is a rate.
        for side in ["client", "upstream"] {
            for reason in crate::tls::FAILURE_REASONS {
                let _ = tls_handshake_failures
                    .get_or_create(&labels(&[("side", side), ("reason", reason)]));
            }
        }
        let tls_expiry = r.gauges(
            "pubwarden_tls_certificate_expiry_timestamp_seconds",
            "Unix time at which a configured certificate expires (a CA bundle: its earliest), by certificate",
        );
        let tls_reloads_f = r.counters(
            "pubwarden_tls_reloads",
            "TLS certificate and key reloads by result (success, failure)",
        );
        let tls_logins_f = r.counters(
            "pubwarden_tls_client_logins",
            "Verified client certificates by whether they named a policy user (mapped, unmapped)",
        );
        let sentinel_master = r.gauges(
            "pubwarden_sentinel_master",
            "1 for the master pubwarden sends new connections to, by Sentinel master name and address",
        );
        let sentinel_failovers = r.counter(
            "pubwarden_sentinel_failovers",
            "Master changes pubwarden followed (Sentinel mode)",
        );
        let sentinel_last_follow = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "pubwarden_sentinel_last_follow_seconds",
            "Time from the old master failing its checks (or +switch-master) to new connections going to the new master, at the last failover",
            sentinel_last_follow.clone(),
        );
        let mut r = Reg(&mut registry);
        let global_leases_f = r.counters(
            "pubwarden_global_rate_limit_leases",
            "Token leases asked of the shared rate-limit store, by result (granted, denied, error)",
        );
        let global_store_up = r.gauge(
            "pubwarden_global_rate_limit_store_up",
            "1 while the shared rate-limit store answers (global rate limits in force), 0 while rules fall back",
        );
        global_store_up.set(1);
        let global_fallbacks = r.counters(
            "pubwarden_global_rate_limit_fallbacks",
            "Publishes decided without the shared store, by rule and action (local_share, rejected)",
        );
        let cluster_nodes = r.gauge(
            "pubwarden_cluster_nodes",
            "Nodes (masters and replicas) in the cluster slot map",
        );
        let cluster_refreshes_f = r.counters(
            "pubwarden_cluster_topology_refreshes",
            "Reads of the cluster slot map, by result (success, failure)",
        );
        let cluster_redirects_f = r.counters(
            "pubwarden_cluster_redirects",
            "MOVED and ASK redirects pubwarden followed for clients, by kind",
        );
        let cluster_shard_resubscribes = r.counter(
            "pubwarden_cluster_shard_resubscribes",
            "Shard channels subscribed again on their new owner after a slot moved or its master failed over",
        );
        let cluster_shard_gap = Counter::<f64>::default();
        registry.register(
            "pubwarden_cluster_shard_resubscribe_gap_seconds",
            "Total time shard channels were without a subscription between losing their node and being subscribed again",
            cluster_shard_gap.clone(),
        );
        let mut r = Reg(&mut registry);
        let cluster_node_connections = r.gauges(
            "pubwarden_cluster_node_connections",
            "Open connections to each cluster node, by node",
        );
        let cluster_node_requests = r.counters(
            "pubwarden_cluster_node_requests",
            "Requests sent to each cluster node for clients (redirects included), by node",
        );
        let cluster_node_deliveries = r.counters(
            "pubwarden_cluster_node_deliveries",
            "Pub/sub deliveries received from each cluster node, by node",
        );
        let span_drops_f = r.counters(
            "pubwarden_trace_spans_dropped",
            "Trace spans not exported, by reason (queue_full, export_failed)",
        );
        let trace_span_drops = ["queue_full", "export_failed"]
            .map(|why| span_drops_f.get_or_create_owned(&labels(&[("reason", why)])));
        let envelope_latency = r.histogram(
            "pubwarden_envelope_latency_seconds",
            "Time from the publishing pubwarden reading a publish to this one reading its delivery, for trace envelopes",
            histogram::LATENCY,
        );
        let publish_delivery_latency = r.histogram(
            "pubwarden_publish_delivery_latency_seconds",
            "Time from this pubwarden reading a sampled PUBLISH to reading one of its deliveries (tracing on)",
            histogram::LATENCY,
        );

        let group: Box<[GroupHandles]> = groups
            .names()
            .map(|g| {
                let by_kind = |f: &Counters| {
                    DELIVERY_KINDS
                        .map(|k| f.get_or_create_owned(&labels(&[("group", g), ("kind", k)])))
                };
                let one = |f: &Counters| f.get_or_create_owned(&labels(&[("group", g)]));
                GroupHandles {
                    deliveries: by_kind(&deliveries),
                    delivery_bytes: by_kind(&delivery_bytes),
                    publishes: PUBLISH_RESULTS.map(|res| {
                        publishes.get_or_create_owned(&labels(&[
                            ("group", g),
                            ("user", DEFAULT_USER),
                            ("result", res),
                        ]))
                    }),
                    publish_bytes: one(&publish_bytes),
                    publishes_unheard: one(&unheard),
                    receivers: receivers_f.get_or_create_owned(&labels(&[("group", g)])),
                    publish_duration: publish_duration
                        .get_or_create_owned(&labels(&[("group", g)])),
                    subscriptions: SUB_KINDS.map(|k| {
                        subscriptions.get_or_create_owned(&labels(&[("group", g), ("kind", k)]))
                    }),
                }
            })
            .collect();
        let commands: Box<[CommandHandles]> = COMMANDS
            .iter()
            .copied()
            .chain(["other"])
            .map(|c| CommandHandles {
                results: COMMAND_RESULTS.map(|res| {
                    commands_f.get_or_create_owned(&labels(&[("command", c), ("result", res)]))
                }),
                duration: command_duration.get_or_create_owned(&labels(&[("command", c)])),
            })
            .collect();
        let sub_changes = SUB_KINDS.map(|k| {
            ["subscribe", "unsubscribe"]
                .map(|op| sub_changes_f.get_or_create_owned(&labels(&[("kind", k), ("op", op)])))
        });
        let channels = settings.per_channel.enabled.then(|| {
            let mut r = Reg(&mut registry);
            let p = r.counters(
                "pubwarden_channel_publishes",
                "Publishes per channel name, for at most metrics.per_channel.max_channels names (then overflow)",
            );
            let d = r.counters(
                "pubwarden_channel_deliveries",
                "Deliveries per channel name, for at most metrics.per_channel.max_channels names (then overflow)",
            );
            ChannelLabels::new(settings.per_channel.max_channels, p, d)
        });

        Self {
            registry,
            enabled: settings.enabled,
            groups,
            channels,
            group,
            commands,
            publishes,
            users: Mutex::new(vec![DEFAULT_USER.to_string()]),
            delivery_write,
            pending_output,
            output_buffered,
            slow_consumers,
            resubscribes,
            resubscribe_gap,
            sub_changes,
            client_open,
            client_accepted,
            client_rejected: client_rejected_f
                .get_or_create_owned(&labels(&[("reason", "upstream_unavailable")])),
            client_rejected_max: client_rejected_f
                .get_or_create_owned(&labels(&[("reason", "max_clients")])),
            client_rejected_user: client_rejected_f
                .get_or_create_owned(&labels(&[("reason", "user_max_connections")])),
            client_closed: ["policy_revoked", "auth_timeout", "idle_timeout"]
                .map(|why| client_closed_f.get_or_create_owned(&labels(&[("reason", why)]))),
            upstream_open,
            upstream_connects,
            upstream_errors: UPSTREAM_ERRORS
                .map(|k| upstream_errors_f.get_or_create_owned(&labels(&[("kind", k)]))),
            upstream_up,
            auth_successes,
            auth_failures: AUTH_FAILURES
                .map(|(_, why)| auth_failures_f.get_or_create_owned(&labels(&[("reason", why)]))),
            acl_denials,
            audit_would_deny,
            rate_limit_rejections,
            rate_limit_delays,
            rate_limit_delay_seconds,
            config_reloads: ["success", "failure"]
                .map(|res| reloads_f.get_or_create_owned(&labels(&[("result", res)]))),
            config_last_success,
            trace_span_drops,
            envelope_latency,
            publish_delivery_latency,
            tls_handshake_failures,
            tls_expiry,
            tls_reloads: ["success", "failure"]
                .map(|res| tls_reloads_f.get_or_create_owned(&labels(&[("result", res)]))),
            tls_client_logins: ["mapped", "unmapped"]
                .map(|res| tls_logins_f.get_or_create_owned(&labels(&[("result", res)]))),
            sentinel_master,
            sentinel_failovers,
            sentinel_last_follow,
            global_leases: ["granted", "denied", "error"]
                .map(|res| global_leases_f.get_or_create_owned(&labels(&[("result", res)]))),
            global_store_up,
            global_fallbacks,
            cluster_nodes,
            cluster_refreshes: ["success", "failure"]
                .map(|res| cluster_refreshes_f.get_or_create_owned(&labels(&[("result", res)]))),
            cluster_redirects: ["moved", "ask"]
                .map(|k| cluster_redirects_f.get_or_create_owned(&labels(&[("kind", k)]))),
            cluster_shard_resubscribes,
            cluster_shard_gap,
            cluster_node_connections,
            cluster_node_requests,
            cluster_node_deliveries,
        }
    }

    /// Handles of `pubwarden_trace_spans_dropped`: (queue full, export failed).
    pub fn trace_span_drops(&self) -> (Counter, Counter) {
        let [full, failed] = &self.trace_span_drops;
        (full.clone(), failed.clone())
    }

    /// `pubwarden_publish_delivery_latency_seconds`, observed in nanoseconds.
    pub fn publish_delivery_latency(&self) -> AtomicHistogram {
        self.publish_delivery_latency.clone()
    }

    /// `pubwarden_envelope_latency_seconds`, observed in nanoseconds.
    pub fn envelope_latency(&self) -> AtomicHistogram {
        self.envelope_latency.clone()
    }

    /// Whether connections count publishes, deliveries and commands.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn groups(&self) -> &ChannelGroups {
        &self.groups
    }

    pub fn group(&self, i: usize) -> &GroupHandles {
        &self.group[i]
    }

    pub fn command(&self, i: usize) -> &CommandHandles {
        &self.commands[i]
    }

    pub(crate) fn channel_labels(&self) -> Option<&ChannelLabels> {
        self.channels.as_ref()
    }

    /// The registry in the Prometheus text format, or OpenMetrics.
    pub fn render(&self, openmetrics: bool) -> String {
        let mut out = String::with_capacity(32 * 1024);
        let encoded = if openmetrics {
            text::encode(&mut out, &self.registry)
        } else {
            prometheus_text::encode(&mut out, &self.registry)
        };
        if let Err(e) = encoded {
            // Writing into a String does not fail; keep what was written.
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        out
    }

    /// Refreshes values that are read rather than counted, before a scrape.
    pub fn set_upstream_up(&self, up: bool) {
        self.upstream_up.set(i64::from(up));
    }

    // Connections.

    /// A client connected; the gauge goes down when the guard drops.
    pub fn client_connected(&self) -> ClientGuard<'_> {
        self.client_accepted.inc();
        self.client_open.inc();
        ClientGuard(self)
    }

    /// A client was refused because Redis could not be reached.
    pub fn client_rejected(&self) {
        self.client_rejected.inc();
    }

    /// A client was refused at `limits.max_clients`.
    pub fn client_rejected_max_clients(&self) {
        self.client_rejected_max.inc();
    }

    /// A client was refused by its user's `max_connections`.
    pub fn client_rejected_user_limit(&self) {
        self.client_rejected_user.inc();
    }

    /// pubwarden closed a client: 0 policy revoked, 1 auth timeout, 2 idle timeout.
    pub fn client_closed(&self, reason: ClientClose) {
        self.client_closed[reason as usize].inc();
    }

    pub fn upstream_connected(&self) {
        self.upstream_connects.inc();
        self.upstream_open.inc();
    }

    pub fn upstream_disconnected(&self) {
        self.upstream_open.dec();
    }

    pub fn upstream_error(&self, kind: UpstreamError) {
        self.upstream_errors[kind as usize].inc();
    }

    /// Classifies a failed connect attempt.
    pub fn upstream_connect_failed(&self, timed_out: bool, refused: bool) {
        self.upstream_error(match (timed_out, refused) {
            (true, _) => UpstreamError::ConnectTimeout,
            (false, true) => UpstreamError::ConnectRefused,
            _ => UpstreamError::Io,
        });
    }

    // Subscribers.

    /// A subscriber was subscribed again on a new connection after `gap`.
    pub fn resubscribed(&self, gap: Duration) {
        self.resubscribes.inc();
        self.resubscribe_gap.inc_by(gap.as_secs_f64());
    }

    /// A client was closed for reading its deliveries too slowly.
    pub fn slow_consumer_disconnect(&self) {
        self.slow_consumers.inc();
    }

    // Policy. These families are emitted once policy is configured.

    /// The label for a user the policy knows (names from the policy file,
    /// not from a client): at most [`MAX_USERS`] distinct, then `other`.
    /// Takes a lock: call it once per authentication, not per command.
    pub fn user_label(&self, name: &str) -> UserLabel {
        let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        if users.iter().any(|u| u == name) {
            return UserLabel(name.to_string());
        }
        if users.len() >= MAX_USERS {
            return UserLabel(groups::OTHER.to_string());
        }
        users.push(name.to_string());
        UserLabel(name.to_string())
    }

    /// `pubwarden_publishes_total` handles of `user` for every group, by
    /// result, in group order: resolved once per authentication.
    pub fn publish_handles(&self, user: &UserLabel) -> Box<[[Counter; 4]]> {
        self.groups
            .names()
            .map(|g| {
                PUBLISH_RESULTS.map(|res| {
                    self.publishes.get_or_create_owned(&labels(&[
                        ("group", g),
                        ("user", user.as_str()),
                        ("result", res),
                    ]))
                })
            })
            .collect()
    }

    /// A publish that policy answered itself (denied or rate limited).
    pub fn publish_refused(&self, user: &UserLabel, channel: &[u8], result: PublishResult) {
        let g = self.groups.name(self.groups.group_of(channel));
        self.publishes
            .get_or_create(&labels(&[
                ("group", g),
                ("user", user.as_str()),
                ("result", PUBLISH_RESULTS[result as usize]),
            ]))
            .inc();
    }

    pub fn auth_success(&self) {
        self.auth_successes.inc();
    }

    pub fn auth_failure(&self, why: AuthFailure) {
        if let Some(i) = AUTH_FAILURES.iter().position(|(w, _)| *w == why) {
            self.auth_failures[i].inc();
        }
    }

    fn denial_labels(&self, user: &UserLabel, command: &str, channel: Option<&[u8]>) -> Labels {
        let command = COMMANDS
            .get(command_index(command))
            .copied()
            .unwrap_or("other");
        let group = match channel {
            Some(ch) => self.groups.name(self.groups.group_of(ch)),
            None => "none",
        };
        labels(&[
            ("user", user.as_str()),
            ("command", command),
            ("group", group),
        ])
    }

    /// The ACL denied `command` (a name from `Command::name`) for `user`;
    /// `channel` is the first denied channel, if a channel was the reason.
    pub fn acl_denial(&self, user: &UserLabel, command: &str, channel: Option<&[u8]>) {
        self.acl_denials
            .get_or_create(&self.denial_labels(user, command, channel))
            .inc();
    }

    /// Audit mode: the ACL would have denied this command.
    pub fn audit_would_deny(&self, user: &UserLabel, command: &str, channel: Option<&[u8]>) {
        self.audit_would_deny
            .get_or_create(&self.denial_labels(user, command, channel))
            .inc();
    }

    /// A rate limit rule (a name from the policy file) rejected a command.
    pub fn rate_limit_rejected(&self, rule: &str) {
        self.rate_limit_rejections
            .get_or_create(&labels(&[("rule", rule)]))
            .inc();
    }

    /// A rate limit rule held a command back for `delay`.
    pub fn rate_limit_delayed(&self, rule: &str, delay: Duration) {
        let l = labels(&[("rule", rule)]);
        self.rate_limit_delays.get_or_create(&l).inc();
        self.rate_limit_delay_seconds
            .get_or_create(&l)
            .inc_by(delay.as_secs_f64());
    }

    /// A TLS handshake failed. `side`: `client` or `upstream`; `reason`
    /// from [`crate::tls::failure_reason`].
    pub fn tls_handshake_failed(&self, side: &'static str, reason: &'static str) {
        self.tls_handshake_failures
            .get_or_create(&labels(&[("side", side), ("reason", reason)]))
            .inc();
    }

    /// When the certificate `which` expires (Unix seconds).
    pub fn tls_certificate_expiry(&self, which: &'static str, unix: i64) {
        self.tls_expiry
            .get_or_create(&labels(&[("certificate", which)]))
            .set(unix);
    }

    pub fn tls_reload(&self, ok: bool) {
        self.tls_reloads[usize::from(!ok)].inc();
    }

    /// A verified client certificate did (or did not) name a policy user.
    pub fn tls_client_login(&self, mapped: bool) {
        self.tls_client_logins[usize::from(!mapped)].inc();
    }

    /// New connections now go to `address` (replacing `old`, if any).
    pub fn sentinel_master(&self, name: &str, address: &str, old: Option<&str>) {
        if let Some(old) = old {
            self.sentinel_master
                .remove(&labels(&[("master_name", name), ("address", old)]));
        }
        self.sentinel_master
            .get_or_create(&labels(&[("master_name", name), ("address", address)]))
            .set(1);
    }

    /// A failover was followed, `took` after the old master stopped answering.
    pub fn sentinel_failover(&self, took: Duration) {
        self.sentinel_failovers.inc();
        self.sentinel_last_follow.set(took.as_secs_f64());
    }

    /// The shared store answered a lease request.
    pub fn global_store_request(&self, granted: bool) {
        self.global_leases[usize::from(!granted)].inc();
    }

    /// A lease request failed (store unreachable or too slow).
    pub fn global_store_error(&self) {
        self.global_leases[2].inc();
    }

    pub fn global_store_up(&self, up: bool) {
        self.global_store_up.set(i64::from(up));
    }

    /// A global rule decided without the store: `action` is `local_share`
    /// (fail_open) or `rejected` (fail_closed).
    pub fn global_fallback(&self, rule: &str, action: &'static str) {
        self.global_fallbacks
            .get_or_create(&labels(&[("rule", rule), ("action", action)]))
            .inc();
    }

    pub fn cluster_nodes(&self, n: usize) {
        self.cluster_nodes.set(n as i64);
    }

    pub fn cluster_topology_refresh(&self, ok: bool) {
        self.cluster_refreshes[usize::from(!ok)].inc();
    }

    /// A MOVED (`ask`: false) or ASK redirect was followed.
    pub fn cluster_redirect(&self, ask: bool) {
        self.cluster_redirects[usize::from(ask)].inc();
    }

    pub fn cluster_shard_resubscribed(&self, channels: u64) {
        self.cluster_shard_resubscribes.inc_by(channels);
    }

    /// A shard channel was subscribed again `gap` after losing its node.
    pub fn cluster_shard_gap(&self, gap: Duration) {
        self.cluster_shard_gap.inc_by(gap.as_secs_f64());
    }

    /// Counters of requests to and deliveries from `node`, for a node
    /// connection to hold (no label lookup per message).
    pub fn cluster_node_counters(&self, node: &str) -> (Counter, Counter) {
        let l = labels(&[("node", node)]);
        (
            self.cluster_node_requests.get_or_create_owned(&l),
            self.cluster_node_deliveries.get_or_create_owned(&l),
        )
    }

    /// A connection to `node` opened (`+1`) or closed (`-1`).
    pub fn cluster_node_connection(&self, node: &str, delta: i64) {
        self.cluster_node_connections
            .get_or_create(&labels(&[("node", node)]))
            .inc_by(delta);
    }

    /// A configuration reload finished.
    pub fn config_reload(&self, ok: bool) {
        self.config_reloads[usize::from(!ok)].inc();
        if ok {
            self.config_last_success.set(unix_now());
        }
    }

    // For connections.

    pub(crate) fn delivery_write(&self) -> &AtomicHistogram {
        &self.delivery_write
    }

    pub(crate) fn pending_output(&self) -> &AtomicHistogram {
        &self.pending_output
    }

    pub(crate) fn output_buffered(&self) -> &Gauge {
        &self.output_buffered
    }

    pub(crate) fn subscription_change(&self, kind: usize, added: bool) {
        self.sub_changes[kind][usize::from(!added)].inc();
    }
}

/// Keeps `pubwarden_client_connections` up while a client is connected.
pub struct ClientGuard<'a>(&'a Metrics);

impl Drop for ClientGuard<'_> {
    fn drop(&mut self) {
        self.0.client_open.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_table_is_sorted_and_every_name_is_classified_as_itself() {
        assert!(COMMANDS.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(
            command_index("get"),
            COMMANDS.iter().position(|c| *c == "get").unwrap()
        );
        assert_eq!(command_index("nope"), COMMANDS.len());
        // Each name must be one `Command::classify` produces, or it never counts.
        for name in COMMANDS.iter().filter(|n| **n != "auth") {
            let line = format!("{} x\r\n", name.to_uppercase());
            let mut p = crate::resp::request::RequestParser::new(Default::default());
            let f = p.next(line.as_bytes(), 0).unwrap().unwrap();
            let cmd = crate::command::Command::classify(&p.args(line.as_bytes(), &f));
            assert_eq!(cmd.name, *name);
        }
    }

    #[test]
    fn users_are_capped() {
        let m = Metrics::new(&MetricsSettings::default());
        assert_eq!(m.user_label("default").as_str(), "default");
        for i in 0..MAX_USERS {
            m.user_label(&format!("u{i}"));
        }
        assert_eq!(m.user_label("u0").as_str(), "u0");
        assert_eq!(m.user_label("late").as_str(), "other");
    }

    #[test]
    fn renders_both_formats_without_series_from_clients() {
        let m = Metrics::new(&MetricsSettings::default());
        let text = m.render(false);
        assert!(
            text.contains("# TYPE pubwarden_publishes_total counter"),
            "{text}"
        );
        assert!(text.contains("pubwarden_build_info{version=\""), "{text}");
        assert!(
            text.contains(
                "pubwarden_publish_duration_seconds_bucket{group=\"other\",le=\"1e-05\"} 0"
            ),
            "{text}"
        );
        let om = m.render(true);
        assert!(om.ends_with("# EOF\n"), "{om}");
    }
}
