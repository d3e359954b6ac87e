//! # pubwarden
//!
//! A transparent RESP proxy for Redis that understands pub/sub. Clients
//! connect to pubwarden as they would to Redis; each client connection is
//! relayed over its own upstream connection (1:1), so every Redis semantic
//! (SELECT, MULTI/EXEC, blocking commands, CLIENT REPLY, MONITOR, RESP3)
//! survives without pubwarden having to re-implement it.
//!
//! ## Modules
//! - [`config`]: process settings from YAML ([`config::yaml`] keeps line and
//!   column for every value and reports all mistakes at once).
//! - [`resp`]: framing. [`resp::request`] parses client requests with Redis's
//!   own rules and limits; [`resp::frame`] finds upstream frame boundaries
//!   (RESP2 and RESP3) in one resumable pass.
//! - [`command`]: classifies a request once (name, kind, channel arguments).
//! - [`session`]: per-client reply-side state: protocol, subscriptions, MULTI,
//!   `CLIENT REPLY` flags, and the pending-reply queue that keeps answers in
//!   request order, including answers pubwarden makes itself.
//! - [`reply`]: every reply pubwarden writes itself.
//! - [`policy`]: users, channel ACL, command rules and rate limits as data:
//!   [`policy::schema`] reads and validates the file, [`policy::gate`] decides
//!   per request (forward, rewrite, answer, hold), [`policy::reload`] swaps a
//!   new policy in atomically, [`policy::commands`] is the command table.
//! - [`glob`]: Redis's glob matching, for channel rules and groups.
//! - [`proxy`]: accept loop and the per-connection relay task (limits,
//!   slow consumers, re-subscription after a Redis restart).
//! - [`upstream`]: connecting to Redis (retries, circuit breaker, pubwarden's
//!   own AUTH), the health check behind /readyz, the `COMMAND` table.
//! - [`admin`]: HTTP /healthz, /readyz, /metrics and POST /reload.
//! - [`metrics`]: Prometheus families; per-connection handles and counts that
//!   the relay flushes once per read batch (see `docs/metrics.md`).
//! - [`telemetry`]: OpenTelemetry spans for publishes and deliveries, the
//!   publish index that links them, and the cross-instance envelope
//!   (see `docs/tracing.md`).
//! - [`transport`]: one side of a relayed connection, plain TCP or TLS
//!   driven by hand over the same non-blocking socket; [`tls`]: listener and
//!   upstream TLS settings, certificate material, identities, rotation
//!   (see `docs/tls.md`).
//! - [`sentinel`]: finding and following the master through Redis Sentinel;
//!   [`policy::global`]: rate limits shared through Redis with leased tokens
//!   (see `docs/operations.md`).
//! - [`cluster`]: Redis Cluster behind one endpoint: the shared slot map and
//!   a session that fans out to the nodes (see `docs/cluster.md`); it replaces
//!   the 1:1 relay for clients in `upstream.mode: cluster`.
//! - [`reload`]: when live configuration is read again (interval, SIGHUP).
//!
//! ## Data flow
//! ```text
//! client --bytes--> RequestParser --frame--> Command::classify --> Gate::check
//!                                                  |      (forward / answer here / hold)
//!                                                  |                 Session::forwarded
//!                                                  |                 (reply owed, in order)
//!                        original bytes, unchanged v
//!                                             upstream Redis
//!                                                  |
//! client <--same bytes-- Session::on_frame <--frame-- FrameScanner
//!                        (reply to the head of the queue, or a delivery/push)
//! ```
//! Nothing pubwarden does not change is re-encoded: complete frames go from
//! the read buffer straight to the other socket.

#![forbid(unsafe_code)]

pub mod admin;
pub mod cluster;
pub mod command;
pub mod config;
pub mod glob;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod reload;
pub mod reply;
pub mod resp;
pub mod sentinel;
pub mod session;
pub mod telemetry;
pub mod tls;
pub mod transport;
pub mod upstream;

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;

use config::Settings;
use upstream::Health;

/// How often the policy file is re-read to see whether it changed.
const POLICY_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Learns the upstream's command table for policy checks, retrying until
/// Redis answers; until then the built-in Redis 7.0 table applies.
async fn learn_commands(upstream: config::Upstream, runtime: Arc<policy::gate::PolicyRuntime>) {
    let mut wait = std::time::Duration::from_millis(500);
    loop {
        match upstream::fetch_command_table(&upstream).await {
            Ok(table) => {
                tracing::info!(
                    commands = table.len(),
                    "learned the command table from Redis"
                );
                runtime.commands.store(Arc::new(table));
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot read COMMAND from Redis yet; using the built-in table");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(std::time::Duration::from_secs(30));
            }
        }
    }
}

/// Clients arrive in bursts (a fleet reconnecting after a Redis restart):
/// a deep accept queue keeps the kernel from dropping SYNs, which would cost
/// each dropped client a one-second retransmit. The kernel caps it at
/// `net.core.somaxconn`.
const ACCEPT_BACKLOG: u32 = 4096;

fn listen(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(ACCEPT_BACKLOG)
}

/// Runs pubwarden until `stop` resolves, then drains: /readyz turns unready,
/// no new client is accepted, in-flight answers are delivered within
/// `shutdown.drain_timeout`, and the remaining connections are closed.
pub async fn run(
    settings: Settings,
    policy: Option<policy::Policy>,
    stop: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let plain_listener = match &settings.tls {
        Some(tls) if tls.only => None,
        _ => Some(
            listen(settings.listen)
                .with_context(|| format!("cannot listen for clients on {}", settings.listen))?,
        ),
    };
    let tls_listener = match &settings.tls {
        Some(tls) => Some(listen(tls.listen).with_context(|| {
            format!(
                "cannot listen for TLS clients on {} (tls.listen)",
                tls.listen
            )
        })?),
        None => None,
    };
    let admin_listener = TcpListener::bind(settings.admin.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen for admin requests on {}",
                settings.admin.listen
            )
        })?;
    tracing::info!(
        listen = %plain_listener.as_ref().map_or("-".to_string(), |_| settings.listen.to_string()),
        tls_listen = %settings.tls.as_ref().map_or("-".to_string(), |t| t.listen.to_string()),
        upstream = %settings.upstream.describe(),
        upstream_tls = settings.upstream.tls.is_some(),
        admin = %settings.admin.listen,
        version = env!("CARGO_PKG_VERSION"),
        "pubwarden started"
    );
    if settings
        .upstream
        .tls
        .as_ref()
        .is_some_and(|t| t.insecure_skip_verify)
    {
        tracing::warn!(
            upstream = %settings.upstream.describe(),
            "upstream.tls.insecure_skip_verify is on: Redis's certificate is NOT verified; anyone on the path to Redis can read and change the traffic"
        );
    }

    let health = Arc::new(Health::default());
    let (drain_tx, drain_rx) = watch::channel(None);
    let drain_timeout = settings.shutdown.drain_timeout;
    let metrics = Arc::new(metrics::Metrics::new(&settings.metrics));
    let follower = settings
        .upstream
        .sentinel
        .is_some()
        .then(|| tokio::spawn(sentinel::follow(settings.upstream.clone(), metrics.clone())));
    let cluster = settings
        .upstream
        .cluster
        .is_some()
        .then(|| cluster::Cluster::new(settings.upstream.clone(), metrics.clone()));
    let maintainer = cluster.clone().map(|c| tokio::spawn(c.maintain()));
    let checker = match &cluster {
        Some(c) => tokio::spawn(cluster::watch_health(c.clone(), health.clone())),
        None => tokio::spawn(upstream::watch_health(
            settings.upstream.clone(),
            health.clone(),
        )),
    };
    let policy = policy.map(|p| {
        Arc::new(policy::gate::PolicyRuntime::new(
            p,
            policy::commands::CommandTable::built_in(),
        ))
    });
    if let Some(runtime) = &policy {
        // Idle until a `scope: global` rule asks for tokens.
        runtime.set_global_limits(policy::global::GlobalLimits::start(
            settings.global_rate_limits.clone(),
            settings.upstream.clone(),
            metrics.clone(),
        ));
    }
    let reloader = match (&policy, &settings.policy) {
        (Some(runtime), Some(path)) => Some(Arc::new(policy::reload::Reloader::new(
            path.clone(),
            runtime.clone(),
            metrics.clone(),
            settings.source.clone().map(|s| (s, settings.clone())),
        ))),
        _ => None,
    };
    let mut reload_tasks = Vec::new();
    if let Some(r) = &reloader {
        reload_tasks.push(tokio::spawn(reload::watch(
            r.clone(),
            POLICY_CHECK_INTERVAL,
        )));
        reload_tasks.push(tokio::spawn(reload::on_sighup(r.clone())));
    }
    let tls_reloader = tls::Reloader::new(
        settings.tls.clone(),
        settings.upstream.tls.clone(),
        metrics.clone(),
    )
    .map(Arc::new);
    if let Some(r) = &tls_reloader {
        reload_tasks.push(tokio::spawn(reload::watch(
            r.clone(),
            POLICY_CHECK_INTERVAL,
        )));
        reload_tasks.push(tokio::spawn(reload::on_sighup(r.clone())));
    }
    let admin = tokio::spawn(admin::serve(
        admin_listener,
        health.clone(),
        metrics.clone(),
        admin::Reloaders {
            policy: reloader,
            tls: tls_reloader,
        },
    ));
    let learner = policy
        .clone()
        .map(|rt| tokio::spawn(learn_commands(settings.upstream.clone(), rt)));
    // Spans name the server; in Sentinel mode that is the master's name,
    // in cluster mode each span names its node instead.
    let upstream_name = match (&settings.upstream.sentinel, &settings.upstream.cluster) {
        (_, Some(_)) => String::new(),
        (Some(s), None) => s.master_name.clone(),
        (None, None) => settings.upstream.address.clone(),
    };
    let traces = telemetry::Tracing::start(&settings.tracing, &upstream_name, &metrics)
        .context("cannot set up trace export (telemetry.tracing)")?;
    let shared = Arc::new(
        proxy::Shared::new(settings, health.clone(), drain_rx)
            .with_metrics(metrics)
            .with_policy(policy)
            .with_tracing(traces.clone())
            .with_cluster(cluster),
    );
    let acceptors: Vec<_> = [(plain_listener, false), (tls_listener, true)]
        .into_iter()
        .filter_map(|(l, tls)| l.map(|l| tokio::spawn(proxy::accept_loop(l, shared.clone(), tls))))
        .collect();

    stop.await;
    health.set_draining();
    let deadline = tokio::time::Instant::now() + drain_timeout;
    let _ = drain_tx.send(Some(deadline));
    tracing::info!(
        open = shared.open_connections(),
        drain_timeout_ms = drain_timeout.as_millis() as u64,
        "shutting down: draining connections"
    );
    for acceptor in acceptors {
        let _ = acceptor.await;
    }
    // Connections close themselves by the deadline; allow a moment past it
    // for their final writes.
    let grace = deadline + std::time::Duration::from_millis(500);
    if tokio::time::timeout_at(grace, shared.closed())
        .await
        .is_err()
    {
        tracing::warn!(
            open = shared.open_connections(),
            "drain deadline passed with connections open"
        );
    }
    checker.abort();
    if let Some(m) = maintainer {
        m.abort();
    }
    if let Some(f) = follower {
        f.abort();
    }
    admin.abort();
    if let Some(learner) = learner {
        learner.abort();
    }
    for task in reload_tasks {
        task.abort();
    }
    if let Some(t) = traces {
        t.shutdown(std::time::Duration::from_secs(2)).await;
    }
    tracing::info!("pubwarden stopped");
    Ok(())
}
