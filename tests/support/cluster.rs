//! A Redis Cluster of a test's own: six `redis-server --cluster-enabled yes` processes on free
//! loopback ports (never 6379; the cluster bus on a second free port given with
//! `--cluster-port`), joined by `redis-cli --cluster create ... --cluster-replicas 1` into three
//! shards of a master and a replica each, all killed on drop. Plus the slot arithmetic (CRC16
//! XMODEM with hash tags), the cluster's view of itself (`CLUSTER SHARDS` on every node),
//! resharding one slot by hand (`CLUSTER SETSLOT ... IMPORTING / MIGRATING`, `MIGRATE`,
//! `CLUSTER SETSLOT ... NODE`), a manual failover (`CLUSTER FAILOVER` on a replica), a master
//! killed and its replica's takeover checked without it, and pubwarden started in
//! `upstream.mode: cluster` against it.
//!
//! Clusters are started one at a time per test binary (a process-wide lock held by each
//! [`RedisCluster`]): six servers, their 2 s node timeout and a failover must not be starved
//! by another cluster's load on a small machine.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// (start, end, owner port) of each slot range, as one node reports it.
type SlotRanges = Vec<(u16, u16, u16)>;

use super::net::{RawConn, Stop, free_port, loopback};
use super::procs::{WaitFor, ping, scratch_dir, tail_file, wait_exit};
use super::resp::{Value, decode, encode, escape_short};
use super::sentinel::wait_until;
use super::tls::TlsProxy;

/// Slots in a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// How many data nodes [`RedisCluster::start`] starts (three masters, one replica each).
pub const NODES: usize = 6;

/// pubwarden started from a settings file only (no `--upstream`, which would conflict with
/// `upstream.mode: cluster`); see [`TlsProxy`].
pub type ClusterProxy = TlsProxy;

static SERIAL: Mutex<()> = Mutex::new(());

// ---------------------------------------------------------------------------------------------
// Slots.

/// The hash slot of a key (or shard channel), as pubwarden computes it; the
/// harness test checks it against Redis's own CLUSTER KEYSLOT.
pub use pubwarden::cluster::slot::{crc16, slot as key_slot};

// ---------------------------------------------------------------------------------------------
// Talking to a node.

/// One request to the node on `port` on a fresh connection, waiting up to `timeout` for the
/// reply; the decoded reply, or why there is none.
pub fn node_call_timeout(port: u16, args: &[&str], timeout: Duration) -> Result<Value, String> {
    let addr = loopback(port);
    let mut c = RawConn::try_connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    c.try_send(&encode(args))
        .map_err(|e| format!("send {args:?} to {addr}: {e}"))?;
    let got = c.read_frames(1, timeout);
    if got.stop != Stop::Done {
        return Err(format!(
            "{args:?} to {addr}: no reply ({:?}, partial {})",
            got.stop,
            escape_short(&got.partial, 200)
        ));
    }
    decode(&got.frames[0]).map_err(|e| format!("{args:?} to {addr}: {e}"))
}

/// [`node_call_timeout`] with 5 s.
pub fn node_call(port: u16, args: &[&str]) -> Result<Value, String> {
    node_call_timeout(port, args, Duration::from_secs(5))
}

/// The text of a simple string, bulk string or error; the debug form of anything else.
pub fn value_text(v: &Value) -> String {
    match v {
        Value::Simple(b) | Value::Bulk(b) | Value::Error(b) => String::from_utf8_lossy(b).into(),
        other => format!("{other:?}"),
    }
}

fn expect_ok(port: u16, args: &[&str]) -> Result<(), String> {
    match node_call_timeout(port, args, Duration::from_secs(10))? {
        Value::Simple(s) if s == b"OK" => Ok(()),
        other => Err(format!("{args:?} on port {port}: {}", value_text(&other))),
    }
}

/// `key` in a flat `[k1, v1, k2, v2, ...]` reply (what CLUSTER SHARDS entries are in RESP2).
fn flat_get<'a>(flat: &'a Value, key: &str) -> Option<&'a Value> {
    let items = flat.items()?;
    items.chunks(2).find_map(|kv| match kv {
        [k, v] if k.bytes() == Some(key.as_bytes()) => Some(v),
        _ => None,
    })
}

fn as_string(v: &Value) -> Option<String> {
    v.bytes()
        .and_then(|b| std::str::from_utf8(b).ok())
        .map(str::to_string)
}

fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        other => as_string(other)?.parse().ok(),
    }
}

/// One field (`cluster_state`, `role`, ...) of an INFO-like `key:value` text reply.
fn info_field(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|l| {
        l.trim_end()
            .strip_prefix(key)
            .and_then(|r| r.strip_prefix(':'))
            .map(str::to_string)
    })
}

// ---------------------------------------------------------------------------------------------
// The cluster's view of itself.

/// A node as CLUSTER SHARDS describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub id: String,
    pub port: u16,
    /// `master` or `replica`.
    pub role: String,
    /// `online`, `loading` or `failed`.
    pub health: String,
}

/// A shard as one node's CLUSTER SHARDS describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    /// Inclusive slot ranges.
    pub slots: Vec<(u16, u16)>,
    pub nodes: Vec<NodeInfo>,
}

impl Shard {
    /// The shard's master, if exactly one node says it is.
    pub fn master(&self) -> Option<&NodeInfo> {
        let mut masters = self.nodes.iter().filter(|n| n.role == "master");
        match (masters.next(), masters.next()) {
            (Some(m), None) => Some(m),
            _ => None,
        }
    }

    pub fn master_port(&self) -> u16 {
        self.master()
            .unwrap_or_else(|| panic!("shard without exactly one master: {self:?}"))
            .port
    }

    pub fn replicas(&self) -> Vec<&NodeInfo> {
        self.nodes.iter().filter(|n| n.role == "replica").collect()
    }

    pub fn holds(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(a, b)| a <= slot && slot <= b)
    }

    pub fn slot_count(&self) -> usize {
        self.slots
            .iter()
            .map(|&(a, b)| usize::from(b - a) + 1)
            .sum()
    }

    /// The lowest slot of the shard (shards are sorted by it).
    fn first_slot(&self) -> u16 {
        self.slots.iter().map(|&(a, _)| a).min().unwrap_or(SLOTS)
    }
}

/// CLUSTER SHARDS on the node on `port`, shards sorted by their lowest slot.
pub fn shards_on(port: u16) -> Result<Vec<Shard>, String> {
    let v = node_call(port, &["CLUSTER", "SHARDS"])?;
    let entries = v
        .items()
        .ok_or_else(|| format!("CLUSTER SHARDS on {port}: {}", value_text(&v)))?;
    let mut shards = Vec::new();
    for e in entries {
        let bad = || format!("CLUSTER SHARDS on {port}: cannot read the entry {e:?}");
        let slot_values = flat_get(e, "slots")
            .and_then(Value::items)
            .ok_or_else(bad)?;
        let mut slots = Vec::new();
        for pair in slot_values.chunks(2) {
            match pair {
                [a, b] => {
                    let a = as_u64(a).ok_or_else(bad)? as u16;
                    let b = as_u64(b).ok_or_else(bad)? as u16;
                    slots.push((a, b));
                }
                _ => return Err(bad()),
            }
        }
        slots.sort_unstable();
        let mut nodes = Vec::new();
        for n in flat_get(e, "nodes")
            .and_then(Value::items)
            .ok_or_else(bad)?
        {
            nodes.push(NodeInfo {
                id: flat_get(n, "id").and_then(as_string).ok_or_else(bad)?,
                port: flat_get(n, "port").and_then(as_u64).ok_or_else(bad)? as u16,
                role: flat_get(n, "role").and_then(as_string).ok_or_else(bad)?,
                health: flat_get(n, "health").and_then(as_string).ok_or_else(bad)?,
            });
        }
        shards.push(Shard { slots, nodes });
    }
    shards.sort_by_key(Shard::first_slot);
    Ok(shards)
}

/// The slot map of `shards` as (first slot, last slot, master port), merged and sorted.
fn slot_map(shards: &[Shard]) -> Vec<(u16, u16, u16)> {
    let mut ranges: Vec<(u16, u16, u16)> = shards
        .iter()
        .filter_map(|s| Some((s, s.master()?.port)))
        .flat_map(|(s, port)| s.slots.iter().map(move |&(a, b)| (a, b, port)))
        .collect();
    ranges.sort_unstable();
    let mut merged: Vec<(u16, u16, u16)> = Vec::new();
    for r in ranges {
        match merged.last_mut() {
            Some(last) if last.2 == r.2 && last.1 + 1 == r.0 => last.1 = r.1,
            _ => merged.push(r),
        }
    }
    merged
}

// ---------------------------------------------------------------------------------------------
// Processes.

/// One cluster node (`redis-server --cluster-enabled yes`), killed on drop.
struct Node {
    index: usize,
    child: Option<Child>,
    port: u16,
    bus_port: u16,
    log: PathBuf,
}

impl Node {
    /// Starts node `index` on a free port (its bus on another) and waits until it answers PING.
    fn start(index: usize, dir: &Path) -> Node {
        let mut last_err = String::new();
        for attempt in 0..5 {
            let port = free_port();
            let bus_port = free_port();
            if bus_port == port {
                continue;
            }
            let data_dir = dir.join(format!("node-{index}"));
            std::fs::create_dir_all(&data_dir)
                .unwrap_or_else(|e| panic!("create {}: {e}", data_dir.display()));
            let log = dir.join(format!("node-{index}-{port}-{attempt}.log"));
            let out = File::create(&log).expect("create redis log file");
            let err = out.try_clone().expect("clone redis log file");
            let conf = dir.join(format!("nodes-{port}.conf"));
            let args: Vec<String> = vec![
                "--port".into(),
                port.to_string(),
                "--cluster-port".into(),
                bus_port.to_string(),
                "--bind".into(),
                "127.0.0.1".into(),
                "--cluster-enabled".into(),
                "yes".into(),
                "--cluster-config-file".into(),
                conf.to_str().expect("utf-8 scratch dir").into(),
                "--cluster-node-timeout".into(),
                "2000".into(),
                "--save".into(),
                "".into(),
                "--appendonly".into(),
                "no".into(),
                "--daemonize".into(),
                "no".into(),
                // Replicas sync at once, and their offsets (which CLUSTER SHARDS reports as
                // `health: loading` while 0) move every second.
                "--repl-diskless-sync-delay".into(),
                "0".into(),
                "--repl-ping-replica-period".into(),
                "1".into(),
                "--dir".into(),
                data_dir.to_str().expect("utf-8 scratch dir").into(),
            ];
            let mut child = match Command::new("redis-server")
                .args(&args)
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .spawn()
            {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                    "redis-server not found: install it with `apt-get install -y redis-server` \
                     (redis-cli, for `--cluster create`, comes with it)"
                ),
                Err(e) => panic!("spawn redis-server (cluster node {index}): {e}"),
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    last_err = format!(
                        "cluster node {index} on port {port} (bus {bus_port}) exited with \
                         {status}:\n{}",
                        tail_file(&log, 20)
                    );
                    break;
                }
                if ping(loopback(port)) {
                    return Node {
                        index,
                        child: Some(child),
                        port,
                        bus_port,
                        log,
                    };
                }
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "cluster node {index} on port {port} did not answer PING within 10 s:\n{}",
                        tail_file(&log, 20)
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("cluster node {index} did not start in 5 attempts: {last_err}");
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// The cluster.

/// Six nodes in three shards (a master and a replica each), `cluster-node-timeout 2000`.
pub struct RedisCluster {
    dir: PathBuf,
    nodes: Vec<Node>,
    create_log: PathBuf,
    _serial: MutexGuard<'static, ()>,
}

impl RedisCluster {
    /// Starts six nodes, joins them with `redis-cli --cluster create ... --cluster-replicas 1
    /// --cluster-yes`, and waits (at most 40 s) until every node says `cluster_state:ok`, knows
    /// all six nodes, and its CLUSTER SHARDS agrees with every other node's on three shards
    /// covering all slots, each with an online master and an online replica in sync.
    pub fn start() -> RedisCluster {
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let dir = scratch_dir("cluster");
        let nodes: Vec<Node> = (0..NODES).map(|i| Node::start(i, &dir)).collect();
        let create_log = dir.join("cluster-create.log");
        let cluster = RedisCluster {
            dir,
            nodes,
            create_log,
            _serial: serial,
        };
        cluster.create();
        cluster
            .wait_converged(Duration::from_secs(40))
            .unwrap_or_else(|e| panic!("the new cluster did not settle: {e}\n{}", cluster.logs()));
        cluster
    }

    fn create(&self) {
        let mut args: Vec<String> = vec!["--cluster".into(), "create".into()];
        args.extend(self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)));
        args.extend([
            "--cluster-replicas".into(),
            "1".into(),
            "--cluster-yes".into(),
        ]);
        let out = File::create(&self.create_log).expect("create cluster-create log");
        let err = out.try_clone().expect("clone cluster-create log");
        let mut child = match Command::new("redis-cli")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
        {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                panic!("redis-cli not found: install it with `apt-get install -y redis-server`")
            }
            Err(e) => panic!("spawn redis-cli --cluster create: {e}"),
        };
        match wait_exit(&mut child, Duration::from_secs(60)) {
            Some(status) if status.success() => {}
            Some(status) => panic!(
                "redis-cli {} exited with {status}:\n{}\n{}",
                args.join(" "),
                tail_file(&self.create_log, 40),
                self.logs()
            ),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "redis-cli {} did not finish within 60 s:\n{}\n{}",
                    args.join(" "),
                    tail_file(&self.create_log, 40),
                    self.logs()
                );
            }
        }
    }

    /// Why the cluster is not (yet) settled, or Ok: every node says `cluster_state:ok` and
    /// knows all nodes; every node's CLUSTER SHARDS lists three shards each with one online
    /// master and one online replica, the same slot map everywhere, all slots covered, no slot
    /// importing or migrating; every replica's link to its master is up.
    pub fn converged(&self) -> Result<(), String> {
        self.converged_without(&[])
    }

    /// [`RedisCluster::converged`] for a cluster that lost the nodes on `down` (killed, not
    /// forgotten): those nodes are not asked, and are left out of every survivor's CLUSTER
    /// SHARDS before it is checked. Every survivor must say `cluster_state:ok` and still know
    /// all six nodes; its shards, without the nodes on `down`, must be three, each with exactly
    /// one master, every node in them online, `6 - down.len()` nodes in all (a shard whose
    /// master was killed keeps its promoted replica only; a killed master that Redis still
    /// lists as a master of no slots, its own shard in CLUSTER SHARDS, is dropped, and must
    /// hold no slots); the same slot map on every survivor, all slots covered by masters that
    /// are up, nothing importing or migrating, every surviving replica's link up.
    pub fn converged_without(&self, down: &[u16]) -> Result<(), String> {
        let mut reference: Option<(u16, SlotRanges)> = None;
        for node in self.nodes.iter().filter(|n| !down.contains(&n.port)) {
            let port = node.port;
            let info = value_text(&node_call(port, &["CLUSTER", "INFO"])?);
            if info_field(&info, "cluster_state").as_deref() != Some("ok") {
                return Err(format!("port {port}: CLUSTER INFO:\n{info}"));
            }
            if info_field(&info, "cluster_known_nodes").as_deref() != Some("6") {
                return Err(format!(
                    "port {port} knows {:?} nodes",
                    info_field(&info, "cluster_known_nodes")
                ));
            }
            let mut shards = Vec::new();
            for mut s in shards_on(port)? {
                s.nodes.retain(|n| !down.contains(&n.port));
                if s.nodes.is_empty() {
                    if !s.slots.is_empty() {
                        return Err(format!(
                            "port {port}: slots {:?} are still owned by a node that is down \
                             ({down:?})",
                            s.slots
                        ));
                    }
                    continue;
                }
                shards.push(s);
            }
            if shards.len() != 3 {
                return Err(format!("port {port}: {} shards: {shards:?}", shards.len()));
            }
            for s in &shards {
                let online = |role: &str| {
                    s.nodes
                        .iter()
                        .filter(|n| n.role == role && n.health == "online")
                        .count()
                };
                // All six up: a master and a replica each; else what is left of the shard.
                let replicas = if down.is_empty() {
                    1
                } else {
                    s.nodes.len() - 1
                };
                if s.nodes.len() != replicas + 1
                    || online("master") != 1
                    || online("replica") != replicas
                {
                    return Err(format!(
                        "port {port}: a shard is not one online master and {replicas} online \
                         replica(s): {s:?}"
                    ));
                }
            }
            let listed: usize = shards.iter().map(|s| s.nodes.len()).sum();
            if listed != NODES - down.len() {
                return Err(format!(
                    "port {port}: {listed} nodes up in CLUSTER SHARDS, {} expected ({down:?} \
                     down): {shards:?}",
                    NODES - down.len()
                ));
            }
            let map = slot_map(&shards);
            let covered: usize = map.iter().map(|&(a, b, _)| usize::from(b - a) + 1).sum();
            if covered != usize::from(SLOTS) {
                return Err(format!("port {port}: {covered} slots covered: {map:?}"));
            }
            match &reference {
                None => reference = Some((port, map)),
                Some((rport, rmap)) if *rmap != map => {
                    return Err(format!(
                        "port {port} and port {rport} disagree on the slot map:\n{map:?}\n{rmap:?}"
                    ));
                }
                Some(_) => {}
            }
            let nodes = value_text(&node_call(port, &["CLUSTER", "NODES"])?);
            if nodes.contains("->-") || nodes.contains("-<-") {
                return Err(format!(
                    "port {port}: a slot is migrating or importing:\n{nodes}"
                ));
            }
            let repl = value_text(&node_call(port, &["INFO", "replication"])?);
            if info_field(&repl, "role").as_deref() == Some("slave")
                && info_field(&repl, "master_link_status").as_deref() != Some("up")
            {
                return Err(format!("port {port}: replica link not up:\n{repl}"));
            }
        }
        Ok(())
    }

    /// Polls [`RedisCluster::converged`] until Ok or `timeout`.
    pub fn wait_converged(&self, timeout: Duration) -> Result<(), String> {
        wait_until(timeout, "the cluster to settle", || self.converged())
    }

    /// The ports of all six nodes, in start order.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// `127.0.0.1:<port>` for each of `ports`.
    pub fn addresses(ports: &[u16]) -> Vec<String> {
        ports.iter().map(|p| format!("127.0.0.1:{p}")).collect()
    }

    /// CLUSTER SHARDS as the first node that answers tells it (sorted by lowest slot).
    pub fn shards(&self) -> Vec<Shard> {
        let mut errors = Vec::new();
        for n in &self.nodes {
            match shards_on(n.port) {
                Ok(s) => return s,
                Err(e) => errors.push(e),
            }
        }
        panic!(
            "no node answered CLUSTER SHARDS: {errors:?}\n{}",
            self.logs()
        )
    }

    /// The master ports, in the order of [`RedisCluster::shards`].
    pub fn master_ports(&self) -> Vec<u16> {
        self.shards().iter().map(Shard::master_port).collect()
    }

    /// The replica ports, in the order of [`RedisCluster::shards`].
    pub fn replica_ports(&self) -> Vec<u16> {
        self.shards()
            .iter()
            .flat_map(|s| s.replicas().into_iter().map(|n| n.port).collect::<Vec<_>>())
            .collect()
    }

    /// The shard whose master is on `master_port`.
    pub fn shard_of_master(&self, master_port: u16) -> Shard {
        self.shards()
            .into_iter()
            .find(|s| s.master().is_some_and(|m| m.port == master_port))
            .unwrap_or_else(|| panic!("no shard has its master on port {master_port}"))
    }

    /// The node id (CLUSTER MYID) of the node on `port`.
    pub fn node_id(&self, port: u16) -> String {
        match node_call(port, &["CLUSTER", "MYID"]) {
            Ok(v) if v.bytes().is_some() => value_text(&v),
            other => panic!("CLUSTER MYID on port {port}: {other:?}"),
        }
    }

    /// The port of the master owning `slot` as the node on `port` sees it.
    pub fn owner_on(&self, port: u16, slot: u16) -> Result<u16, String> {
        let shards = shards_on(port)?;
        let shard = shards
            .iter()
            .find(|s| s.holds(slot))
            .ok_or_else(|| format!("port {port}: no shard holds slot {slot}"))?;
        shard
            .master()
            .map(|m| m.port)
            .ok_or_else(|| format!("port {port}: the shard of slot {slot} has no master"))
    }

    /// The port of the master owning `slot`, once every node agrees (waits up to 10 s).
    pub fn owner(&self, slot: u16) -> u16 {
        let mut owner = 0;
        wait_until(
            Duration::from_secs(10),
            &format!("every node to agree on the owner of slot {slot}"),
            || {
                let mut seen = BTreeMap::new();
                for n in &self.nodes {
                    seen.insert(n.port, self.owner_on(n.port, slot)?);
                }
                let first = *seen.values().next().expect("nodes");
                if seen.values().all(|&p| p == first) {
                    owner = first;
                    Ok(())
                } else {
                    Err(format!("node port -> owner port: {seen:?}"))
                }
            },
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()));
        owner
    }

    /// CLUSTER KEYSLOT `key` on the first node.
    pub fn keyslot_by_redis(&self, key: &str) -> u16 {
        let port = self.nodes[0].port;
        match node_call(port, &["CLUSTER", "KEYSLOT", key]) {
            Ok(Value::Int(n)) => n as u16,
            other => panic!("CLUSTER KEYSLOT {key:?} on port {port}: {other:?}"),
        }
    }

    /// A name `<prefix>-<n>` (smallest n) whose slot is owned by the master on `master_port`,
    /// checked against CLUSTER KEYSLOT.
    pub fn name_in_shard(&self, prefix: &str, master_port: u16) -> String {
        self.names_in_shard(prefix, master_port, 1).remove(0)
    }

    /// `count` names `<prefix>-<n>` in distinct slots owned by the master on `master_port`,
    /// each checked against CLUSTER KEYSLOT.
    pub fn names_in_shard(&self, prefix: &str, master_port: u16, count: usize) -> Vec<String> {
        let shard = self.shard_of_master(master_port);
        let mut out: Vec<String> = Vec::new();
        let mut slots = Vec::new();
        for n in 0..1_000_000u32 {
            let name = format!("{prefix}-{n}");
            let slot = key_slot(name.as_bytes());
            if !shard.holds(slot) || slots.contains(&slot) {
                continue;
            }
            let by_redis = self.keyslot_by_redis(&name);
            assert_eq!(
                by_redis, slot,
                "the harness's slot of {name:?} differs from CLUSTER KEYSLOT"
            );
            out.push(name);
            slots.push(slot);
            if out.len() == count {
                return out;
            }
        }
        panic!("no {count} names {prefix}-<n> in the shard of port {master_port}: {shard:?}")
    }

    /// A name `<prefix>-<n>` whose slot differs from every one of `avoid`'s.
    pub fn name_not_in_slots(&self, prefix: &str, avoid: &[u16]) -> String {
        (0..)
            .map(|n| format!("{prefix}-{n}"))
            .find(|name| !avoid.contains(&key_slot(name.as_bytes())))
            .expect("a name")
    }

    /// Starts moving `slot` from its owner to the master on `to`: `CLUSTER SETSLOT <slot>
    /// IMPORTING <source id>` on `to`, then `MIGRATING <target id>` on the source. Keys move
    /// with [`Migration::move_keys`] / [`Migration::move_remaining_keys`]; ownership with
    /// [`Migration::finish`].
    pub fn begin_migration(&self, slot: u16, to: u16) -> Migration<'_> {
        let from = self.owner(slot);
        assert_ne!(from, to, "slot {slot} is already on port {to}");
        let from_id = self.node_id(from);
        let to_id = self.node_id(to);
        let slot_s = slot.to_string();
        expect_ok(to, &["CLUSTER", "SETSLOT", &slot_s, "IMPORTING", &from_id])
            .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()));
        expect_ok(from, &["CLUSTER", "SETSLOT", &slot_s, "MIGRATING", &to_id])
            .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()));
        Migration {
            cluster: self,
            slot,
            from,
            to,
            to_id,
        }
    }

    /// Moves `slot` (and its keys) to the master on `to`; returns when every node names `to`
    /// as the owner and the cluster has settled.
    pub fn migrate_slot(&self, slot: u16, to: u16) {
        let m = self.begin_migration(slot, to);
        m.move_remaining_keys();
        m.finish();
    }

    /// Waits until the node on `port` says (ROLE) that it is a `role` (`master` / `slave`).
    pub fn wait_role(&self, port: u16, role: &str, timeout: Duration) -> Result<(), String> {
        wait_until(timeout, &format!("port {port} to be a {role}"), || {
            let v = node_call(port, &["ROLE"])?;
            match v.items().and_then(|i| i.first()).and_then(Value::bytes) {
                Some(r) if r == role.as_bytes() => Ok(()),
                _ => Err(format!("ROLE: {v:?}")),
            }
        })
    }

    /// A manual failover of the shard whose master is on `master_port`: `CLUSTER FAILOVER` on
    /// its replica (once more if it has not become master after 15 s), then waits until the
    /// replica says it is master and the cluster has settled with it as the shard's master.
    /// Returns the new master's port.
    pub fn failover(&self, master_port: u16) -> u16 {
        let shard = self.shard_of_master(master_port);
        let replica = shard
            .replicas()
            .first()
            .map(|n| n.port)
            .unwrap_or_else(|| panic!("the shard of port {master_port} has no replica"));
        let mut last = String::new();
        for _ in 0..2 {
            match node_call(replica, &["CLUSTER", "FAILOVER"]) {
                Ok(Value::Simple(s)) if s == b"OK" => {}
                other => panic!(
                    "CLUSTER FAILOVER on port {replica}: {other:?}\n{}",
                    self.logs()
                ),
            }
            match self.wait_role(replica, "master", Duration::from_secs(15)) {
                Ok(()) => {
                    last.clear();
                    break;
                }
                Err(e) => last = e,
            }
        }
        if !last.is_empty() {
            panic!(
                "CLUSTER FAILOVER on port {replica}: {last}\n{}",
                self.logs()
            );
        }
        self.wait_converged(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("after the failover: {e}\n{}", self.logs()));
        let now = self.shard_of_master(replica);
        assert!(
            now.replicas().iter().any(|n| n.port == master_port),
            "after the failover port {master_port} should be the replica of port {replica}: \
             {now:?}"
        );
        replica
    }

    /// The port of the (first) replica of the master on `master_port`.
    pub fn replica_of(&self, master_port: u16) -> u16 {
        self.shard_of_master(master_port)
            .replicas()
            .first()
            .map(|n| n.port)
            .unwrap_or_else(|| panic!("the shard of port {master_port} has no replica"))
    }

    /// Whether `replica` has taken over from the killed master on `killed` (one check, no
    /// waiting, so that a test can read its subscribers between checks): Ok once `replica`
    /// says (ROLE) it is a master, every surviving node names it the owner of `slot`,
    /// and the cluster has settled without the killed node
    /// ([`RedisCluster::converged_without`]).
    pub fn taken_over(&self, killed: u16, replica: u16, slot: u16) -> Result<(), String> {
        let role = node_call(replica, &["ROLE"])?;
        match role.items().and_then(|i| i.first()).and_then(Value::bytes) {
            Some(b"master") => {}
            _ => return Err(format!("port {replica} is not a master yet: ROLE {role:?}")),
        }
        for n in self.nodes.iter().filter(|n| n.port != killed) {
            let owner = self.owner_on(n.port, slot)?;
            if owner != replica {
                return Err(format!(
                    "port {} names port {owner} as the owner of slot {slot}",
                    n.port
                ));
            }
        }
        self.converged_without(&[killed])
    }

    /// Kills the node on `port` (SIGKILL).
    pub fn kill_node(&mut self, port: u16) {
        if let Some(n) = self.nodes.iter_mut().find(|n| n.port == port) {
            n.kill();
        }
    }

    /// The tail of every node's log (and of `redis-cli --cluster create`'s output).
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            out.push_str(&format!(
                "---- cluster node {} (port {}, bus {}) log ----\n{}\n",
                n.index,
                n.port,
                n.bus_port,
                tail_file(&n.log, 25)
            ));
        }
        out.push_str(&format!(
            "---- redis-cli --cluster create ----\n{}\n",
            tail_file(&self.create_log, 15)
        ));
        out
    }

    /// Starts pubwarden with `upstream.mode: cluster` and `seeds` (ports; the first two nodes
    /// when empty), `cluster_extra` as further lines under `upstream.cluster:` (e.g.
    /// `"pass_sunsubscribe: true"`), `extra` as further top-level settings; waits until
    /// `/readyz` answers 200.
    pub fn start_pubwarden_with(
        &self,
        seeds: &[u16],
        cluster_extra: &[&str],
        extra: &str,
    ) -> ClusterProxy {
        let seeds: Vec<u16> = if seeds.is_empty() {
            self.nodes.iter().take(2).map(|n| n.port).collect()
        } else {
            seeds.to_vec()
        };
        let dir = scratch_dir("pubwarden-cluster");
        let mut body = format!(
            "upstream:\n  mode: cluster\n  cluster:\n    seeds: [{}]\n",
            Self::addresses(&seeds).join(", ")
        );
        let has = |key: &str| {
            cluster_extra
                .iter()
                .any(|l| l.trim_start().starts_with(key))
        };
        if !has("refresh_interval") {
            body.push_str("    refresh_interval: 5s\n");
        }
        for line in cluster_extra {
            body.push_str(&format!("    {line}\n"));
        }
        body.push_str(extra);
        TlsProxy::start(&dir, &body, WaitFor::Ready)
    }

    /// [`RedisCluster::start_pubwarden_with`] with the default seeds.
    pub fn start_pubwarden(&self, cluster_extra: &[&str], extra: &str) -> ClusterProxy {
        self.start_pubwarden_with(&[], cluster_extra, extra)
    }

    /// The scratch directory of this cluster.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The address of the node on `port`.
    pub fn addr(port: u16) -> SocketAddr {
        loopback(port)
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- Redis Cluster ({}) ----\n{}---- end of Redis Cluster ----",
                self.dir.display(),
                self.logs()
            );
        }
        for n in &mut self.nodes {
            n.kill();
        }
    }
}

/// A slot on its way from one master to another (see [`RedisCluster::begin_migration`]).
pub struct Migration<'a> {
    cluster: &'a RedisCluster,
    pub slot: u16,
    /// The source master's port.
    pub from: u16,
    /// The target master's port.
    pub to: u16,
    to_id: String,
}

impl Migration<'_> {
    /// `MIGRATE 127.0.0.1 <to> "" 0 5000 KEYS <keys>` on the source.
    pub fn move_keys(&self, keys: &[&str]) {
        let to = self.to.to_string();
        let mut args = vec!["MIGRATE", "127.0.0.1", &to, "", "0", "5000", "KEYS"];
        args.extend_from_slice(keys);
        match node_call_timeout(self.from, &args, Duration::from_secs(10)) {
            Ok(Value::Simple(s)) if s == b"OK" || s == b"NOKEY" => {}
            other => panic!(
                "{args:?} on port {}: {other:?}\n{}",
                self.from,
                self.cluster.logs()
            ),
        }
    }

    /// Moves every key still in the slot on the source (CLUSTER GETKEYSINSLOT, MIGRATE).
    pub fn move_remaining_keys(&self) {
        let slot = self.slot.to_string();
        for _ in 0..10_000 {
            let v = node_call(self.from, &["CLUSTER", "GETKEYSINSLOT", &slot, "100"])
                .unwrap_or_else(|e| panic!("{e}\n{}", self.cluster.logs()));
            let keys: Vec<String> = v
                .items()
                .unwrap_or_else(|| panic!("CLUSTER GETKEYSINSLOT {slot}: {v:?}"))
                .iter()
                .filter_map(as_string)
                .collect();
            if keys.is_empty() {
                return;
            }
            let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
            self.move_keys(&refs);
        }
        panic!("slot {slot} on port {} never emptied", self.from);
    }

    /// `CLUSTER SETSLOT <slot> NODE <target id>` on the target, the source and every other
    /// master; waits (at most 20 s) until every node names the target as the owner and the
    /// cluster has settled.
    pub fn finish(self) {
        let slot = self.slot.to_string();
        let masters = self.cluster.master_ports();
        let mut order = vec![self.to, self.from];
        order.extend(
            masters
                .into_iter()
                .filter(|p| *p != self.to && *p != self.from),
        );
        for port in order {
            expect_ok(port, &["CLUSTER", "SETSLOT", &slot, "NODE", &self.to_id])
                .unwrap_or_else(|e| panic!("{e}\n{}", self.cluster.logs()));
        }
        let to = self.to;
        wait_until(
            Duration::from_secs(20),
            &format!("every node to name port {to} as the owner of slot {slot}"),
            || {
                for n in &self.cluster.nodes {
                    let owner = self.cluster.owner_on(n.port, self.slot)?;
                    if owner != to {
                        return Err(format!("port {} names port {owner}", n.port));
                    }
                }
                self.cluster.converged()
            },
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", self.cluster.logs()));
    }
}
