//! Process settings: where pubwarden listens, which Redis it fronts, limits,
//! shutdown and logging. They are read once at start; changing them needs a
//! restart. (Policy, which reloads live, has its own file.)
//!
//! Every key has a default, so an empty file, or no file at all, runs a
//! proxy on 127.0.0.1:6380 in front of 127.0.0.1:6379.

pub mod secret;
pub mod yaml;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secret::{Secret, SecretSource};
use yaml::{ConfigError, ConfigErrors, Pos, Reader};

use crate::resp::request::RequestLimits;

#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Address clients connect to.
    pub listen: SocketAddr,
    pub upstream: Upstream,
    pub admin: Admin,
    pub limits: Limits,
    pub shutdown: Shutdown,
    pub log: Log,
    /// The policy file (users, channel ACL, rate limits); `None`: transparent.
    pub policy: Option<PathBuf>,
    pub metrics: crate::metrics::MetricsSettings,
    /// `telemetry.tracing`: OpenTelemetry trace export.
    pub tracing: crate::telemetry::TracingSettings,
    /// The file these settings were read from, if any (not a YAML key).
    pub source: Option<PathBuf>,
    /// Threads relaying connections; 0: one per available CPU. With one, a
    /// single-threaded runtime is used (cheaper, and it may skip a read per batch).
    pub worker_threads: usize,
    /// `tls:`: a TLS listener for clients, if any.
    pub tls: Option<crate::tls::ListenerTls>,
    /// Where `scope: global` rate limits keep their shared budgets.
    pub global_rate_limits: crate::policy::global::GlobalSettings,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    /// `host:port` of the backing Redis; a name is resolved at each connect.
    pub address: String,
    /// How long one connection attempt may take.
    pub connect_timeout: Duration,
    /// How often readiness checks that Redis answers PING.
    pub health_check_interval: Duration,
    /// pubwarden's own Redis user (`AUTH username password`); clients never
    /// see these credentials.
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// When a subscriber's Redis connection dies, reconnect and subscribe it
    /// again without the client seeing it (off: close the client, as Redis
    /// would). A policy user's `resubscribe` overrides this.
    pub resubscribe: bool,
    /// How long to keep trying before giving up and closing the client.
    pub resubscribe_for: Duration,
    /// Re-subscribe connections whose every subscription matches one of these
    /// Redis globs, even when `resubscribe` is off.
    pub resubscribe_channels: Vec<String>,
    /// TLS to Redis (`upstream.tls`, or a `rediss://` address).
    pub tls: Option<crate::tls::UpstreamTls>,
    /// `mode: sentinel`: the master is found and followed through Sentinel.
    pub sentinel: Option<crate::sentinel::SentinelSettings>,
    /// `mode: cluster`: Redis Cluster, found through its seed nodes.
    pub cluster: Option<crate::cluster::ClusterSettings>,
    /// Where connections go now (the Sentinel-discovered master); not a setting.
    pub target: crate::sentinel::Target,
}

impl Upstream {
    /// The address to connect to now: the discovered master in Sentinel
    /// mode (`None` until one is found), else `address`.
    pub fn current_address(&self) -> Option<String> {
        if let Some(c) = &self.cluster {
            // pubwarden's own one-off connections (COMMAND for policy)
            // may go to any node.
            return c.seeds.first().cloned();
        }
        match &self.sentinel {
            Some(_) => self.target.current(),
            None => Some(self.address.clone()),
        }
    }

    /// For logs and client errors.
    pub fn describe(&self) -> String {
        if let Some(c) = &self.cluster {
            return format!("Redis Cluster (seeds {})", c.seeds.join(", "));
        }
        match &self.sentinel {
            Some(s) => match self.target.current() {
                Some(a) => format!("{a} (Sentinel master `{}`)", s.master_name),
                None => format!("Sentinel master `{}` (not found yet)", s.master_name),
            },
            None => self.address.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Admin {
    /// HTTP listener for /healthz and /readyz.
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Client input bounds, as Redis's (`proto-max-bulk-len` ...).
    pub request: RequestLimits,
    /// Deepest nesting accepted in a reply from Redis.
    pub max_reply_depth: usize,
    /// Requests a client may have in flight before pubwarden stops reading it.
    pub max_pipeline: usize,
    /// Output queued for a slow reader before pubwarden stops reading the
    /// other side, leaving the rest in the kernel and in Redis's buffers.
    pub pause_reading_at: usize,
    /// Client connections at once; more get `-ERR max number of clients reached`.
    pub max_clients: usize,
    /// Output a subscriber may have queued in pubwarden before it is closed
    /// (Redis's `client-output-buffer-limit pubsub` hard limit) ...
    pub subscriber_output_hard: usize,
    /// ... or may keep above this for `subscriber_output_soft_for`.
    pub subscriber_output_soft: usize,
    pub subscriber_output_soft_for: Duration,
    /// A connection that has not authenticated by then is closed (policy only).
    pub auth_timeout: Duration,
    /// Close connections that send nothing for this long; zero: never.
    /// Subscribers and clients waiting for a reply are exempt, as in Redis.
    pub idle_timeout: Duration,
    /// TCP keepalive on client and Redis connections; zero: off.
    pub tcp_keepalive: Duration,
    /// Channels + patterns + shard channels per connection; zero: no limit.
    pub max_subscriptions: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Shutdown {
    /// How long connections may finish their in-flight replies on SIGTERM.
    pub drain_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Log {
    /// A `tracing` filter: `info`, `debug`, `pubwarden=debug,info` ...
    pub level: String,
    pub format: LogFormat,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 6380)),
            upstream: Upstream {
                address: "127.0.0.1:6379".into(),
                connect_timeout: Duration::from_secs(2),
                health_check_interval: Duration::from_secs(1),
                username: None,
                password: None,
                resubscribe: false,
                resubscribe_for: Duration::from_secs(60),
                resubscribe_channels: Vec::new(),
                tls: None,
                sentinel: None,
                cluster: None,
                target: crate::sentinel::Target::default(),
            },
            admin: Admin {
                listen: SocketAddr::from(([127, 0, 0, 1], 9480)),
            },
            limits: Limits {
                request: RequestLimits::default(),
                max_reply_depth: 128,
                max_pipeline: 1_000_000,
                pause_reading_at: 4 * 1024 * 1024,
                max_clients: 10_000,
                subscriber_output_hard: 32 * 1024 * 1024,
                subscriber_output_soft: 8 * 1024 * 1024,
                subscriber_output_soft_for: Duration::from_secs(60),
                auth_timeout: Duration::from_secs(10),
                idle_timeout: Duration::ZERO,
                tcp_keepalive: Duration::from_secs(300),
                max_subscriptions: 0,
            },
            shutdown: Shutdown {
                drain_timeout: Duration::from_secs(10),
            },
            log: Log {
                level: "info".into(),
                format: LogFormat::Text,
            },
            policy: None,
            metrics: crate::metrics::MetricsSettings::default(),
            tracing: crate::telemetry::TracingSettings::default(),
            source: None,
            worker_threads: 0,
            tls: None,
            global_rate_limits: crate::policy::global::GlobalSettings::default(),
        }
    }
}

/// Settings given on the command line or in the environment; they win over
/// the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<String>,
    pub upstream: Option<String>,
    pub admin_listen: Option<String>,
    /// A policy file, relative to the working directory.
    pub policy: Option<String>,
}

fn socket_addr(text: &str) -> Result<SocketAddr, String> {
    text.trim().parse().map_err(|_| {
        format!("`{text}` is not an IP:port address (e.g. 127.0.0.1:6380 or [::1]:6380)")
    })
}

/// An upstream address: `host:port`, `redis://host:port` (plaintext) or
/// `rediss://host:port` (TLS). The scheme, when given, says whether TLS is on.
fn upstream_address(text: &str) -> Result<(String, Option<bool>), String> {
    let t = text.trim();
    let (scheme, rest) = match t.split_once("://") {
        Some(("redis", rest)) => (Some(false), rest),
        Some(("rediss", rest)) => (Some(true), rest),
        Some((other, _)) => {
            return Err(format!(
                "`{other}://` is not an upstream scheme (use redis://, rediss:// or host:port)"
            ));
        }
        None => (None, t),
    };
    if rest.contains('@') {
        return Err(
            "credentials in the address are not accepted (they would show in logs); use upstream.username and upstream.password".into(),
        );
    }
    let rest = match rest.split_once('/') {
        Some((hp, "" | "0")) => hp,
        Some(_) => {
            return Err(
                "a database number in the address is not supported (pubwarden relays to database 0; clients SELECT their own)".into(),
            );
        }
        None => rest,
    };
    Ok((host_port(rest)?, scheme))
}

fn host_port(text: &str) -> Result<String, String> {
    let t = text.trim();
    let bad = || {
        format!(
            "`{text}` is not a host:port address (e.g. 127.0.0.1:6379 or redis.default.svc:6379)"
        )
    };
    let (host, port) = t.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || port == 0 || host.contains(char::is_whitespace) {
        return Err(bad());
    }
    Ok(t.to_string())
}

/// A password given as `{env: VAR}` or `{file: PATH}` at `key` of `parent`.
fn secret(r: &mut Reader, parent: &Option<yaml::MapView<'_>>, path: &str) -> Option<Secret> {
    let key = path.rsplit('.').next().unwrap_or(path);
    let pw = r.section(parent, key, &["env", "file"]);
    if !pw
        .as_ref()
        .is_some_and(|m| m.get("env").is_some() || m.get("file").is_some())
    {
        return None;
    }
    let env = r.field(&pw, "env", |t| Ok(t.trim().to_string()));
    let file = r.field(&pw, "file", |t| Ok(t.trim().to_string()));
    let source = match (env, file) {
        (Some(v), None) => SecretSource::Env(v),
        (None, Some(f)) => SecretSource::File(f),
        _ => {
            r.error(path, Pos::default(), "give exactly one of env or file");
            return None;
        }
    };
    Secret::load(source, None)
        .map_err(|e| r.error(path, Pos::default(), e))
        .ok()
}

fn user_name(t: &str) -> Result<String, String> {
    if t.trim().is_empty() || t.contains(char::is_whitespace) {
        Err("must be a Redis user name without spaces".into())
    } else {
        Ok(t.trim().to_string())
    }
}

fn log_format(text: &str) -> Result<LogFormat, String> {
    match text.trim() {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        other => Err(format!("`{other}` is not a log format (use text or json)")),
    }
}

fn positive(d: Duration) -> Result<Duration, String> {
    if d.is_zero() {
        Err("must be longer than zero".into())
    } else {
        Ok(d)
    }
}

impl Settings {
    /// Reads a settings file; every problem is reported at once.
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Settings, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                path: String::new(),
                pos: Pos::default(),
                message: format!("cannot read {}: {e}", path.display()),
            }])
        })?;
        let mut settings = Self::from_yaml(&text, overrides)?;
        settings.source = Some(path.to_path_buf());
        // A policy named in the file is found next to it, wherever pubwarden runs.
        if overrides.policy.is_none()
            && let Some(p) = settings.policy.take()
        {
            settings.policy = Some(path.parent().map_or(p.clone(), |dir| dir.join(&p)));
        }
        Ok(settings)
    }

    /// Parses settings from YAML text, then applies `overrides`.
    pub fn from_yaml(text: &str, overrides: &Overrides) -> Result<Settings, ConfigErrors> {
        let doc = yaml::parse(text)?;
        let mut r = Reader::default();
        let mut s = Settings::default();
        let root = r.map(
            &doc,
            "",
            &[
                "listen",
                "upstream",
                "admin",
                "limits",
                "shutdown",
                "log",
                "policy",
                "metrics",
                "telemetry",
                "worker_threads",
                "tls",
                "global_rate_limits",
            ],
        );
        s.global_rate_limits = read_global_limits(&mut r, &root);
        s.tls = crate::tls::settings::read_listener(&mut r, &root);
        if let Some(v) = r.field(&root, "worker_threads", yaml::number(0, 1024)) {
            s.worker_threads = v as usize;
        }
        if let Some(v) = r.field(&root, "listen", socket_addr) {
            s.listen = v;
        }

        let up = r.section(
            &root,
            "upstream",
            &[
                "address",
                "connect_timeout",
                "health_check_interval",
                "username",
                "password",
                "resubscribe",
                "resubscribe_for",
                "resubscribe_channels",
                "tls",
                "mode",
                "sentinel",
                "cluster",
            ],
        );
        let mode = r
            .field(&up, "mode", |t| match t.trim() {
                m @ ("standalone" | "sentinel" | "cluster") => Ok(m.to_string()),
                other => Err(format!(
                    "`{other}` is not an upstream mode (use standalone, sentinel or cluster)"
                )),
            })
            .unwrap_or_else(|| "standalone".into());
        s.upstream.sentinel = read_sentinel(&mut r, &up, mode == "sentinel");
        s.upstream.cluster = read_cluster(&mut r, &up, mode == "cluster");
        if mode != "standalone" && up.as_ref().and_then(|m| m.get("address")).is_some() {
            r.error(
                "upstream.address",
                Pos::default(),
                format!("is not used in mode: {mode} (the nodes are found through upstream.{mode}); remove it"),
            );
        }
        if let Some((node, path)) = up.as_ref().and_then(|m| m.get("resubscribe_channels")) {
            s.upstream.resubscribe_channels =
                r.strings(node, &path, "channel globs, e.g. [\"orders.*\"]");
        }
        if let Some(v) = r.field(&up, "resubscribe", yaml::boolean) {
            s.upstream.resubscribe = v;
        }
        if let Some(v) = r.field(&up, "resubscribe_for", |t| {
            yaml::duration(t).and_then(positive)
        }) {
            s.upstream.resubscribe_for = v;
        }
        let mut scheme_tls = None;
        if let Some((v, scheme)) = r.field(&up, "address", upstream_address) {
            s.upstream.address = v;
            scheme_tls = scheme;
        }
        s.upstream.tls = crate::tls::settings::read_upstream(&mut r, &up, scheme_tls);
        if let Some(v) = r.field(&up, "connect_timeout", |t| {
            yaml::duration(t).and_then(positive)
        }) {
            s.upstream.connect_timeout = v;
        }
        if let Some(v) = r.field(&up, "health_check_interval", |t| {
            yaml::duration(t).and_then(positive)
        }) {
            s.upstream.health_check_interval = v;
        }

        s.upstream.username = r.field(&up, "username", user_name);
        s.upstream.password = secret(&mut r, &up, "upstream.password");
        if s.upstream.username.is_some() && s.upstream.password.is_none() {
            r.error(
                "upstream.username",
                Pos::default(),
                "needs upstream.password ({env: VAR} or {file: PATH})",
            );
        }
        if let Some(v) = r.field(&root, "policy", |t| Ok(PathBuf::from(t.trim()))) {
            s.policy = Some(v);
        }

        let admin = r.section(&root, "admin", &["listen"]);
        if let Some(v) = r.field(&admin, "listen", socket_addr) {
            s.admin.listen = v;
        }

        let limits = r.section(
            &root,
            "limits",
            &[
                "max_bulk_len",
                "max_multibulk_len",
                "max_inline_len",
                "max_reply_depth",
                "max_pipeline",
                "pause_reading_at",
                "max_clients",
                "subscriber_output_hard",
                "subscriber_output_soft",
                "subscriber_output_soft_for",
                "auth_timeout",
                "idle_timeout",
                "tcp_keepalive",
                "max_subscriptions",
            ],
        );
        let within = |lo: u64, hi: u64| {
            move |t: &str| {
                let n = yaml::size(t)?;
                if n < lo || n > hi {
                    return Err(format!("{n} is outside {lo}..={hi}"));
                }
                Ok(n as usize)
            }
        };
        if let Some(v) = r.field(&limits, "max_bulk_len", within(1, 1 << 40)) {
            s.limits.request.max_bulk_len = v;
        }
        if let Some(v) = r.field(&limits, "max_multibulk_len", within(1, i32::MAX as u64)) {
            s.limits.request.max_multibulk_len = v;
        }
        if let Some(v) = r.field(&limits, "max_inline_len", within(1024, 1 << 30)) {
            s.limits.request.max_inline_len = v;
        }
        if let Some(v) = r.field(&limits, "max_reply_depth", yaml::number(2, 4096)) {
            s.limits.max_reply_depth = v as usize;
        }
        if let Some(v) = r.field(&limits, "max_pipeline", yaml::number(1, 100_000_000)) {
            s.limits.max_pipeline = v as usize;
        }
        if let Some(v) = r.field(&limits, "pause_reading_at", within(16 * 1024, 1 << 32)) {
            s.limits.pause_reading_at = v;
        }
        if let Some(v) = r.field(&limits, "max_clients", yaml::number(1, 10_000_000)) {
            s.limits.max_clients = v as usize;
        }
        if let Some(v) = r.field(
            &limits,
            "subscriber_output_hard",
            within(64 * 1024, 1 << 36),
        ) {
            s.limits.subscriber_output_hard = v;
        }
        if let Some(v) = r.field(
            &limits,
            "subscriber_output_soft",
            within(64 * 1024, 1 << 36),
        ) {
            s.limits.subscriber_output_soft = v;
        }
        if let Some(v) = r.field(&limits, "subscriber_output_soft_for", yaml::duration) {
            s.limits.subscriber_output_soft_for = v;
        }
        if let Some(v) = r.field(&limits, "auth_timeout", |t| {
            yaml::duration(t).and_then(positive)
        }) {
            s.limits.auth_timeout = v;
        }
        if let Some(v) = r.field(&limits, "idle_timeout", yaml::duration) {
            s.limits.idle_timeout = v;
        }
        if let Some(v) = r.field(&limits, "tcp_keepalive", yaml::duration) {
            s.limits.tcp_keepalive = v;
        }
        if let Some(v) = r.field(&limits, "max_subscriptions", yaml::number(0, 100_000_000)) {
            s.limits.max_subscriptions = v as usize;
        }
        if s.limits.subscriber_output_soft > s.limits.subscriber_output_hard {
            r.error(
                "limits.subscriber_output_soft",
                Pos::default(),
                "must not exceed limits.subscriber_output_hard",
            );
        }

        let shutdown = r.section(&root, "shutdown", &["drain_timeout"]);
        if let Some(v) = r.field(&shutdown, "drain_timeout", yaml::duration) {
            s.shutdown.drain_timeout = v;
        }

        let log = r.section(&root, "log", &["level", "format"]);
        let filter = |t: &str| {
            tracing_subscriber::EnvFilter::try_new(t.trim())
                .map(|_| t.trim().to_string())
                .map_err(|e| {
                    format!("`{t}` is not a log filter (e.g. info, debug, pubwarden=debug): {e}")
                })
        };
        if let Some(v) = r.field(&log, "level", filter) {
            s.log.level = v;
        }
        if let Some(v) = r.field(&log, "format", log_format) {
            s.log.format = v;
        }

        crate::metrics::settings::read(&mut r, &root, &mut s.metrics);
        crate::telemetry::settings::read(&mut r, &root, &mut s.tracing);

        s.apply(overrides, &mut r);
        if r.errors.is_empty() {
            Ok(s)
        } else {
            Err(ConfigErrors(r.errors))
        }
    }

    /// Defaults plus `overrides`, for running without a file.
    pub fn from_overrides(overrides: &Overrides) -> Result<Settings, ConfigErrors> {
        Self::from_yaml("", overrides)
    }

    fn apply(&mut self, o: &Overrides, r: &mut Reader) {
        let one = |flag: &str, value: &Option<String>, r: &mut Reader| -> Option<String> {
            let v = value.as_ref()?;
            if v.trim().is_empty() {
                r.error(flag, Pos::default(), "is set but empty");
                return None;
            }
            Some(v.clone())
        };
        if let Some(v) = one("--listen / PUBWARDEN_LISTEN", &o.listen, r) {
            match socket_addr(&v) {
                Ok(a) => self.listen = a,
                Err(e) => r.error("--listen / PUBWARDEN_LISTEN", Pos::default(), e),
            }
        }
        if let Some(v) = one("--upstream / PUBWARDEN_UPSTREAM", &o.upstream, r) {
            match upstream_address(&v) {
                Ok((a, scheme)) => {
                    self.upstream.address = a;
                    match (scheme, &self.upstream.tls) {
                        (Some(false), Some(_)) => r.error(
                            "--upstream / PUBWARDEN_UPSTREAM",
                            Pos::default(),
                            "redis:// (plaintext) contradicts upstream.tls in the settings file",
                        ),
                        (Some(true), None) => {
                            self.upstream.tls = crate::tls::settings::default_upstream()
                                .map_err(|e| {
                                    r.error("--upstream / PUBWARDEN_UPSTREAM", Pos::default(), e)
                                })
                                .ok();
                        }
                        _ => {}
                    }
                }
                Err(e) => r.error("--upstream / PUBWARDEN_UPSTREAM", Pos::default(), e),
            }
        }
        if let Some(v) = one(
            "--admin-listen / PUBWARDEN_ADMIN_LISTEN",
            &o.admin_listen,
            r,
        ) {
            match socket_addr(&v) {
                Ok(a) => self.admin.listen = a,
                Err(e) => r.error("--admin-listen / PUBWARDEN_ADMIN_LISTEN", Pos::default(), e),
            }
        }
        if let Some(p) = o.policy.as_ref().filter(|p| !p.trim().is_empty()) {
            self.policy = Some(PathBuf::from(p));
        }
        if self.listen == self.admin.listen {
            r.error("admin.listen", Pos::default(), "must differ from `listen`");
        }
        if let Some(tls) = &self.tls {
            if !tls.only && tls.listen == self.listen {
                r.error(
                    "tls.listen",
                    Pos::default(),
                    "must differ from `listen` (or set tls.only: true to serve TLS alone)",
                );
            }
            if tls.listen == self.admin.listen {
                r.error(
                    "tls.listen",
                    Pos::default(),
                    "must differ from admin.listen",
                );
            }
        }
    }
}

/// `global_rate_limits`: lease size, store timeout, and the store (default:
/// the upstream Redis).
fn read_global_limits(
    r: &mut Reader,
    root: &Option<yaml::MapView<'_>>,
) -> crate::policy::global::GlobalSettings {
    let mut g = crate::policy::global::GlobalSettings::default();
    let m = r.section(
        root,
        "global_rate_limits",
        &["lease", "store_timeout", "store"],
    );
    if let Some(v) = r.field(&m, "lease", |t| yaml::duration(t).and_then(positive)) {
        g.lease = v;
    }
    if let Some(v) = r.field(&m, "store_timeout", |t| {
        yaml::duration(t).and_then(positive)
    }) {
        g.store_timeout = v;
    }
    if m.as_ref().and_then(|mm| mm.get("store")).is_some() {
        let st = r.section(&m, "store", &["address", "username", "password", "tls"]);
        let mut store = Settings::default().upstream;
        let mut scheme = None;
        match r.field(&st, "address", upstream_address) {
            Some((a, s)) => {
                store.address = a;
                scheme = s;
            }
            None => r.error(
                "global_rate_limits.store.address",
                Pos::default(),
                "is required (host:port or rediss://host:port); without a store section the upstream Redis is used",
            ),
        }
        store.username = r.field(&st, "username", user_name);
        store.password = secret(r, &st, "global_rate_limits.store.password");
        store.tls =
            crate::tls::settings::read_client(r, &st, scheme, "global_rate_limits.store.tls");
        if scheme == Some(true) && store.tls.is_none() {
            store.tls = crate::tls::settings::default_upstream()
                .map_err(|e| r.error("global_rate_limits.store.address", Pos::default(), e))
                .ok();
        }
        g.store = Some(store);
    }
    g
}

/// `upstream.cluster`, required in `mode: cluster` and refused otherwise.
fn read_cluster(
    r: &mut Reader,
    up: &Option<yaml::MapView<'_>>,
    cluster_mode: bool,
) -> Option<crate::cluster::ClusterSettings> {
    let present = up.as_ref().and_then(|m| m.get("cluster")).is_some();
    if !cluster_mode {
        if present {
            r.error(
                "upstream.cluster",
                Pos::default(),
                "is read only with upstream.mode: cluster",
            );
        }
        return None;
    }
    let m = r.section(
        up,
        "cluster",
        &[
            "seeds",
            "refresh_interval",
            "pass_sunsubscribe",
            "shard_replicas",
        ],
    );
    let mut c = crate::cluster::ClusterSettings::default();
    if let Some((node, path)) = m.as_ref().and_then(|mm| mm.get("seeds")) {
        for (item, item_path) in r.items(node, &path, "cluster node host:port addresses") {
            if let Some(text) = r.scalar(item, &item_path) {
                match host_port(text) {
                    Ok(a) => c.seeds.push(a),
                    Err(e) => r.error(&item_path, item.pos, e),
                }
            }
        }
    }
    if c.seeds.is_empty() {
        r.error(
            "upstream.cluster.seeds",
            Pos::default(),
            "list at least one cluster node (host:port); the others are found from it",
        );
    }
    if let Some(v) = r.field(&m, "refresh_interval", |t| {
        yaml::duration(t).and_then(positive)
    }) {
        c.refresh_interval = v;
    }
    let boolean = yaml::boolean;
    if let Some(v) = r.field(&m, "pass_sunsubscribe", boolean) {
        c.pass_sunsubscribe = v;
    }
    if let Some(v) = r.field(&m, "shard_replicas", boolean) {
        c.shard_replicas = v;
    }
    Some(c)
}

/// `upstream.sentinel`, required in `mode: sentinel` and refused otherwise.
fn read_sentinel(
    r: &mut Reader,
    up: &Option<yaml::MapView<'_>>,
    sentinel_mode: bool,
) -> Option<crate::sentinel::SentinelSettings> {
    let present = up.as_ref().and_then(|m| m.get("sentinel")).is_some();
    if !sentinel_mode {
        if present {
            r.error(
                "upstream.sentinel",
                Pos::default(),
                "is read only with upstream.mode: sentinel",
            );
        }
        return None;
    }
    let m = r.section(
        up,
        "sentinel",
        &[
            "master_name",
            "addresses",
            "username",
            "password",
            "tls",
            "check_interval",
        ],
    );
    let master_name = r.field(&m, "master_name", |t| {
        let t = t.trim();
        if t.is_empty() || t.contains(char::is_whitespace) {
            Err("must be the master's name in Sentinel, without spaces".into())
        } else {
            Ok(t.to_string())
        }
    });
    let mut addresses = Vec::new();
    if let Some((node, path)) = m.as_ref().and_then(|mm| mm.get("addresses")) {
        for (item, item_path) in r.items(node, &path, "Sentinel host:port addresses") {
            if let Some(text) = r.scalar(item, &item_path) {
                match host_port(text) {
                    Ok(a) => addresses.push(a),
                    Err(e) => r.error(&item_path, item.pos, e),
                }
            }
        }
    }
    let username = r.field(&m, "username", user_name);
    let password = secret(r, &m, "upstream.sentinel.password");
    let tls = crate::tls::settings::read_client(r, &m, None, "upstream.sentinel.tls");
    let check_interval = r
        .field(&m, "check_interval", |t| {
            yaml::duration(t).and_then(positive)
        })
        .unwrap_or(Duration::from_secs(1));
    if master_name.is_none() {
        r.error(
            "upstream.sentinel.master_name",
            Pos::default(),
            "is required in mode: sentinel",
        );
    }
    if addresses.is_empty() {
        r.error(
            "upstream.sentinel.addresses",
            Pos::default(),
            "list at least one Sentinel (host:port); three or more in production",
        );
    }
    if username.is_some() && password.is_none() {
        r.error(
            "upstream.sentinel.username",
            Pos::default(),
            "needs upstream.sentinel.password",
        );
    }
    Some(crate::sentinel::SentinelSettings {
        master_name: master_name?,
        addresses,
        username,
        password,
        tls,
        check_interval,
    })
}

/// The effective settings as YAML, for `check-config`.
impl fmt::Display for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = |d: Duration| format!("{}ms", d.as_millis());
        writeln!(f, "listen: {}", self.listen)?;
        writeln!(f, "upstream:")?;
        match &self.upstream.sentinel {
            None if self.upstream.cluster.is_some() => {
                if let Some(c) = &self.upstream.cluster {
                    writeln!(f, "  mode: cluster")?;
                    writeln!(f, "  cluster:")?;
                    writeln!(f, "    seeds: [{}]", c.seeds.join(", "))?;
                    writeln!(f, "    refresh_interval: {}", d(c.refresh_interval))?;
                    writeln!(f, "    pass_sunsubscribe: {}", c.pass_sunsubscribe)?;
                    writeln!(f, "    shard_replicas: {}", c.shard_replicas)?;
                }
            }
            None => writeln!(f, "  address: {}", self.upstream.address)?,
            Some(s) => {
                writeln!(f, "  mode: sentinel")?;
                writeln!(f, "  sentinel:")?;
                writeln!(f, "    master_name: {}", s.master_name)?;
                writeln!(f, "    addresses: [{}]", s.addresses.join(", "))?;
                if let Some(u) = &s.username {
                    writeln!(f, "    username: {u}")?;
                }
                if let Some(p) = &s.password {
                    writeln!(f, "    password: {p}")?;
                }
                if let Some(tls) = &s.tls {
                    crate::tls::settings::print_upstream(f, tls, "    ")?;
                }
                writeln!(f, "    check_interval: {}", d(s.check_interval))?;
            }
        }
        writeln!(f, "  connect_timeout: {}", d(self.upstream.connect_timeout))?;
        writeln!(
            f,
            "  health_check_interval: {}",
            d(self.upstream.health_check_interval)
        )?;
        if let Some(u) = &self.upstream.username {
            writeln!(f, "  username: {u}")?;
        }
        if let Some(p) = &self.upstream.password {
            writeln!(f, "  password: {p}")?;
        }
        writeln!(f, "  resubscribe: {}", self.upstream.resubscribe)?;
        writeln!(f, "  resubscribe_for: {}", d(self.upstream.resubscribe_for))?;
        let globs: Vec<String> = self
            .upstream
            .resubscribe_channels
            .iter()
            .map(|g| format!("{g:?}"))
            .collect();
        writeln!(f, "  resubscribe_channels: [{}]", globs.join(", "))?;
        if let Some(tls) = &self.upstream.tls {
            crate::tls::settings::print_upstream(f, tls, "  ")?;
        }
        writeln!(f, "admin:")?;
        writeln!(f, "  listen: {}", self.admin.listen)?;
        writeln!(f, "limits:")?;
        writeln!(f, "  max_bulk_len: {}", self.limits.request.max_bulk_len)?;
        writeln!(
            f,
            "  max_multibulk_len: {}",
            self.limits.request.max_multibulk_len
        )?;
        writeln!(
            f,
            "  max_inline_len: {}",
            self.limits.request.max_inline_len
        )?;
        writeln!(f, "  max_reply_depth: {}", self.limits.max_reply_depth)?;
        writeln!(f, "  max_pipeline: {}", self.limits.max_pipeline)?;
        writeln!(f, "  pause_reading_at: {}", self.limits.pause_reading_at)?;
        let l = &self.limits;
        writeln!(f, "  max_clients: {}", l.max_clients)?;
        writeln!(f, "  subscriber_output_hard: {}", l.subscriber_output_hard)?;
        writeln!(f, "  subscriber_output_soft: {}", l.subscriber_output_soft)?;
        writeln!(
            f,
            "  subscriber_output_soft_for: {}",
            d(l.subscriber_output_soft_for)
        )?;
        writeln!(f, "  auth_timeout: {}", d(l.auth_timeout))?;
        writeln!(f, "  idle_timeout: {}", d(l.idle_timeout))?;
        writeln!(f, "  tcp_keepalive: {}", d(l.tcp_keepalive))?;
        writeln!(f, "  max_subscriptions: {}", l.max_subscriptions)?;
        writeln!(f, "shutdown:")?;
        writeln!(f, "  drain_timeout: {}", d(self.shutdown.drain_timeout))?;
        writeln!(f, "log:")?;
        writeln!(f, "  level: {}", self.log.level)?;
        let format = match self.log.format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        };
        writeln!(f, "  format: {format}")?;
        if let Some(p) = &self.policy {
            writeln!(f, "policy: {}", p.display())?;
        }
        writeln!(f, "worker_threads: {}", self.worker_threads)?;
        let g = &self.global_rate_limits;
        writeln!(f, "global_rate_limits:")?;
        writeln!(f, "  lease: {}", d(g.lease))?;
        writeln!(f, "  store_timeout: {}", d(g.store_timeout))?;
        if let Some(store) = &g.store {
            writeln!(f, "  store:")?;
            writeln!(f, "    address: {}", store.address)?;
            if let Some(u) = &store.username {
                writeln!(f, "    username: {u}")?;
            }
            if let Some(p) = &store.password {
                writeln!(f, "    password: {p}")?;
            }
            if let Some(tls) = &store.tls {
                crate::tls::settings::print_upstream(f, tls, "    ")?;
            }
        }
        if let Some(tls) = &self.tls {
            crate::tls::settings::print_listener(f, tls)?;
        }
        write!(f, "{}", self.metrics)?;
        write!(f, "{}", self.tracing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_example_is_valid_and_states_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/pubwarden.yaml");
        let mut loaded = Settings::load(&path, &Overrides::default()).unwrap();
        assert_eq!(loaded.source.take(), Some(path));
        assert_eq!(loaded, Settings::default());
    }

    #[test]
    fn sentinel_mode() {
        let s = Settings::from_yaml(
            "upstream:\n  mode: sentinel\n  sentinel:\n    master_name: mymaster\n    addresses: [\"10.0.0.1:26379\", \"sentinel-2:26379\"]\n    check_interval: 500ms\n",
            &Overrides::default(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let sentinel = s.upstream.sentinel.as_ref().expect("sentinel settings");
        assert_eq!(sentinel.addresses, ["10.0.0.1:26379", "sentinel-2:26379"]);
        assert_eq!(sentinel.check_interval, Duration::from_millis(500));
        assert_eq!(
            s.upstream.current_address(),
            None,
            "no master before discovery"
        );
        assert!(s.upstream.describe().contains("mymaster"));
        let again = Settings::from_yaml(&s.to_string(), &Overrides::default()).expect("reparse");
        assert_eq!(again, s);

        let e = Settings::from_yaml(
            "upstream:\n  address: 10.0.0.1:6379\n  mode: sentinel\n  sentinel:\n    addresses: [nowhere]\n",
            &Overrides::default(),
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        for want in [
            "upstream.address",
            "upstream.sentinel.master_name",
            "upstream.sentinel.addresses[0]",
        ] {
            assert!(e.contains(want), "{want} missing in: {e}");
        }
        let e = Settings::from_yaml(
            "upstream:\n  sentinel:\n    master_name: m\n",
            &Overrides::default(),
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(e.contains("only with upstream.mode: sentinel"), "{e}");
    }

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(
            Settings::from_yaml("", &Overrides::default()).unwrap(),
            Settings::default()
        );
    }

    #[test]
    fn all_mistakes_are_listed() {
        let text = "listen: nowhere\nupstream:\n  address: redis\n  connect_timeout: 5\nlimits:\n  max_pipeline: 0\nbogus: 1\n";
        let err = Settings::from_yaml(text, &Overrides::default()).unwrap_err();
        let paths: Vec<&str> = err.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            vec![
                "bogus",
                "listen",
                "upstream.address",
                "upstream.connect_timeout",
                "limits.max_pipeline"
            ]
        );
        assert_eq!(err.0[2].pos, Pos { line: 3, col: 12 });
    }

    #[test]
    fn overrides_win_and_are_checked() {
        let o = Overrides {
            listen: Some("127.0.0.1:7000".into()),
            upstream: Some("redis.example:6390".into()),
            admin_listen: Some("bad".into()),
            policy: None,
        };
        let err = Settings::from_yaml("listen: 127.0.0.1:1\n", &o).unwrap_err();
        assert_eq!(err.0.len(), 1);
        assert!(err.0[0].path.contains("--admin-listen"));
        let o = Overrides {
            admin_listen: None,
            ..o
        };
        let s = Settings::from_yaml("listen: 127.0.0.1:1\n", &o).unwrap();
        assert_eq!(s.listen.port(), 7000);
        assert_eq!(s.upstream.address, "redis.example:6390");
    }

    #[test]
    fn printed_settings_read_back_identically() {
        let s = Settings::default();
        assert_eq!(
            Settings::from_yaml(&s.to_string(), &Overrides::default()).unwrap(),
            s
        );
    }
}
