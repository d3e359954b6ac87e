//! `upstream.mode: cluster`: Redis Cluster behind one ordinary endpoint.
//!
//! Clients speak to pubwarden as to one Redis. Each client session keeps a
//! *home* node (one master per pubwarden process) for classic pub/sub and
//! keyless commands, and opens connections to other nodes as its keyed
//! commands and shard channels need them ([`session`]). Keyed commands go to
//! the master of their first key's slot; `MOVED`/`ASK` are followed inside
//! pubwarden, and Redis itself answers `CROSSSLOT` for multi-key commands
//! that span slots. Shard channels (SSUBSCRIBE/SPUBLISH) live on their
//! slot's master; when a slot moves or its master fails over, Redis sends
//! the session a `sunsubscribe`, and pubwarden subscribes the channel again
//! on the new owner without the client seeing it (or passes it through,
//! with `pass_sunsubscribe`). The slot map ([`topology`]) is shared by every
//! session and refreshed periodically, on `MOVED` and on connection loss.

pub mod session;
pub mod slot;
pub mod topology;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{Notify, watch};

use crate::config::Upstream;
use crate::metrics::Metrics;
use crate::policy::commands::CommandTable;
use crate::resp::value::Value;
use crate::upstream::{self, Replies};
use topology::Topology;

/// `upstream.cluster`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterSettings {
    /// Nodes asked for the topology at start (any nodes of the cluster).
    pub seeds: Vec<String>,
    /// How often the slot map is re-read without a reason to.
    pub refresh_interval: Duration,
    /// Pass Redis's own `sunsubscribe` (slot moved) to the client instead of
    /// subscribing the channel again on the new owner.
    pub pass_sunsubscribe: bool,
    /// Serve SSUBSCRIBE from the shard's replicas (spread by slot) rather
    /// than its master, which then only takes SPUBLISH.
    pub shard_replicas: bool,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        Self {
            seeds: Vec::new(),
            refresh_interval: Duration::from_secs(5),
            pass_sunsubscribe: false,
            shard_replicas: false,
        }
    }
}

/// What every session shares: the slot map, the command table (for key
/// positions) and the upstream settings for connecting to nodes.
pub struct Cluster {
    pub settings: ClusterSettings,
    pub upstream: Upstream,
    topology: ArcSwap<Topology>,
    /// Bumped on every change of the map.
    version: watch::Sender<u64>,
    refresh: Notify,
    commands: ArcSwap<CommandTable>,
    next_home: AtomicUsize,
    /// The last read of the slot map succeeded.
    map_fresh: std::sync::atomic::AtomicBool,
    pub metrics: Arc<Metrics>,
}

impl Cluster {
    pub fn new(upstream: Upstream, metrics: Arc<Metrics>) -> Arc<Self> {
        let settings = upstream.cluster.clone().unwrap_or_default();
        Arc::new(Self {
            settings,
            upstream,
            topology: ArcSwap::from_pointee(Topology::default()),
            version: watch::channel(0).0,
            refresh: Notify::new(),
            commands: ArcSwap::from_pointee(CommandTable::built_in()),
            next_home: AtomicUsize::new(std::process::id() as usize),
            map_fresh: std::sync::atomic::AtomicBool::new(false),
            metrics,
        })
    }

    pub fn topology(&self) -> Arc<Topology> {
        self.topology.load_full()
    }

    pub fn commands(&self) -> Arc<CommandTable> {
        self.commands.load_full()
    }

    /// Changes whenever the slot map does.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Asks for the slot map to be read again soon (a MOVED, a lost node).
    pub fn refresh_soon(&self) {
        self.refresh.notify_one();
    }

    /// The home node of this pubwarden's sessions: one master for the
    /// whole process, so that every client of this endpoint sees the same
    /// classic pub/sub (PUBLISH counts, PUBSUB CHANNELS) as from one server.
    /// Processes pick different masters (by process id), which spreads a
    /// fleet of sidecars; a home that leaves the map is replaced.
    pub fn pick_home(&self) -> Option<String> {
        let t = self.topology();
        let n = t.shards.len();
        if n == 0 {
            return None;
        }
        let mut masters: Vec<&str> = t.masters().collect();
        masters.sort_unstable();
        let i = self.next_home.load(Ordering::Relaxed) % n;
        Some(masters[i].to_string())
    }

    /// Where a session subscribes to a shard channel of `slot`: its master,
    /// or with `shard_replicas` one of its replicas (a replica serves its
    /// master's shard channels; Redis propagates SPUBLISH to them).
    pub fn shard_subscriber_node(&self, slot: u16) -> Option<String> {
        let t = self.topology();
        let shard = t.shard(slot)?;
        if self.settings.shard_replicas && !shard.replicas.is_empty() {
            let i = usize::from(slot) % shard.replicas.len();
            return Some(shard.replicas[i].clone());
        }
        Some(shard.master.clone())
    }

    /// Settings for a connection to `node`.
    pub fn node_upstream(&self, node: &str) -> Upstream {
        let mut u = self.upstream.clone();
        u.address = node.to_string();
        u.cluster = None;
        u.sentinel = None;
        u
    }

    /// Reads the slot map from `node`.
    async fn read_from(&self, node: &str) -> Result<Topology, String> {
        let conn = self.node_upstream(node);
        let mut stream = upstream::connect(&conn).await.map_err(|e| e.to_string())?;
        let mut replies = Replies::new(16 * 1024 * 1024);
        let ask = async {
            let reply =
                upstream::request(&mut stream, &mut replies, &[b"CLUSTER", b"SHARDS"]).await?;
            if let Some(t) = topology::from_shards(&reply, self.upstream.tls.is_some()) {
                return Ok(t);
            }
            let reply =
                upstream::request(&mut stream, &mut replies, &[b"CLUSTER", b"SLOTS"]).await?;
            match &reply {
                Value::Error(e) => Err(String::from_utf8_lossy(e).into_owned()),
                _ => topology::from_slots(&reply).ok_or_else(|| "no slots served".to_string()),
            }
        };
        tokio::time::timeout(Duration::from_secs(5), ask)
            .await
            .map_err(|_| "no answer".to_string())?
    }

    /// Reads the slot map from the seeds and known nodes, first answer wins.
    async fn refresh_now(&self) -> Result<bool, String> {
        let known: Vec<String> = {
            let t = self.topology();
            let mut v: Vec<String> = t.masters().map(str::to_string).collect();
            v.extend(t.shards.iter().flat_map(|s| s.replicas.iter().cloned()));
            v
        };
        let mut problems = Vec::new();
        for node in known.iter().chain(self.settings.seeds.iter()) {
            match self.read_from(node).await {
                Ok(t) => {
                    let changed = *self.topology.load_full() != t;
                    if changed {
                        tracing::info!(
                            masters = t.shards.len(),
                            nodes = t.nodes(),
                            slots = t.covered(),
                            "cluster slot map updated"
                        );
                        self.metrics.cluster_nodes(t.nodes());
                        self.topology.store(Arc::new(t));
                        self.version.send_modify(|v| *v += 1);
                    }
                    return Ok(changed);
                }
                Err(e) => problems.push(format!("{node}: {e}")),
            }
        }
        Err(problems.join("; "))
    }

    /// Keeps the slot map (and the command table) current, for ever.
    pub async fn maintain(self: Arc<Self>) {
        let mut learned_commands = false;
        let mut last_error = String::new();
        loop {
            match self.refresh_now().await {
                Ok(_) => {
                    self.metrics.cluster_topology_refresh(true);
                    self.map_fresh.store(true, Ordering::Relaxed);
                    last_error.clear();
                }
                Err(e) => {
                    self.metrics.cluster_topology_refresh(false);
                    self.map_fresh.store(false, Ordering::Relaxed);
                    if e != last_error {
                        tracing::warn!(error = %e, "cannot read the cluster slot map");
                        last_error = e;
                    }
                }
            }
            if !learned_commands && let Some(node) = self.topology().masters().next() {
                // Key positions for routing come from the cluster's own COMMAND.
                if let Ok(table) = upstream::fetch_command_table(&self.node_upstream(node)).await {
                    self.commands.store(Arc::new(table));
                    learned_commands = true;
                }
            }
            let covered = self.topology().covered() == slot::SLOTS;
            let wait = if covered {
                self.settings.refresh_interval
            } else {
                Duration::from_millis(500)
            };
            let _ = tokio::time::timeout(wait, self.refresh.notified()).await;
            // Bursts of MOVED (a resharding) make one refresh, not hundreds.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Readiness in cluster mode: the slot map was read at its last attempt
/// and every slot is served.
pub async fn watch_health(cluster: Arc<Cluster>, health: Arc<upstream::Health>) {
    let mut tick = tokio::time::interval(cluster.upstream.health_check_interval);
    loop {
        tick.tick().await;
        let t = cluster.topology();
        let fresh = cluster.map_fresh.load(Ordering::Relaxed);
        health.set_upstream(fresh && t.covered() == slot::SLOTS);
    }
}
