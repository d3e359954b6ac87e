//! A Redis Sentinel deployment of a test's own, on free loopback ports (never 6379): a master,
//! one replica (`--replicaof`) and three Sentinels (`redis-server <conf> --sentinel`, each with
//! its own writable config file in a scratch directory), all killed on drop. Plus pubwarden
//! started in `upstream.mode: sentinel` against it.
//!
//! Deployments are started one at a time per test binary (a process-wide lock held by each
//! [`SentinelCluster`]): Sentinel's 1 s `down-after-milliseconds` must not be tripped by another
//! cluster's load on a small machine.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::net::{RawConn, Stop, free_port, loopback};
use super::procs::{WaitFor, ping, scratch_dir, tail_file};
use super::resp::{Value, decode, encode, escape_short};
use super::tls::TlsProxy;

/// The name the Sentinels monitor the master under.
pub const MASTER_NAME: &str = "mymaster";

/// pubwarden started from a settings file only (no `--upstream`, which would conflict with
/// `upstream.mode: sentinel`); see [`TlsProxy`].
pub type SentinelProxy = TlsProxy;

static SERIAL: Mutex<()> = Mutex::new(());

/// One `redis-server` process (data node or Sentinel), killed on drop.
struct Proc {
    what: String,
    child: Option<Child>,
    port: u16,
    log: PathBuf,
}

impl Proc {
    /// Starts `redis-server` with the arguments `args(port)` returns (called again with another
    /// port if the first was taken meanwhile) and waits until it answers PING.
    fn start(what: &str, dir: &Path, args: impl Fn(u16) -> Vec<String>) -> Proc {
        let mut last_err = String::new();
        for attempt in 0..5 {
            let port = free_port();
            let log = dir.join(format!("{what}-{attempt}.log"));
            let out = File::create(&log).expect("create redis log file");
            let err = out.try_clone().expect("clone redis log file");
            let mut child = match Command::new("redis-server")
                .args(args(port))
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .spawn()
            {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                    "redis-server not found: install it with `apt-get install -y redis-server` \
                     (Sentinel is `redis-server --sentinel`)"
                ),
                Err(e) => panic!("spawn redis-server ({what}): {e}"),
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    last_err = format!(
                        "{what} on port {port} exited with {status}:\n{}",
                        tail_file(&log, 20)
                    );
                    break;
                }
                if ping(loopback(port)) {
                    return Proc {
                        what: what.to_string(),
                        child: Some(child),
                        port,
                        log,
                    };
                }
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "{what} on port {port} did not answer PING within 10 s:\n{}",
                        tail_file(&log, 20)
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("{what} did not start in 5 attempts: {last_err}");
    }

    fn addr(&self) -> SocketAddr {
        loopback(self.port)
    }

    /// SIGKILL, and wait for the process to be gone.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A master, its replica and three Sentinels monitoring them as [`MASTER_NAME`] with quorum 2,
/// `down-after-milliseconds 1000` and `failover-timeout 3000`.
pub struct SentinelCluster {
    dir: PathBuf,
    master: Proc,
    replica: Proc,
    sentinels: Vec<Proc>,
    master_port: u16,
    replica_port: u16,
    _serial: MutexGuard<'static, ()>,
}

/// Arguments of a data node (`redis-server`) on `port` keeping its files in `dir`.
fn data_node_args(port: u16, dir: &Path, replica_of: Option<u16>) -> Vec<String> {
    let mut args: Vec<String> = [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
        // Full syncs (the first one, and the old master's after a failover) at once.
        "--repl-diskless-sync-delay",
        "0",
        "--dir",
        dir.to_str().expect("utf-8 scratch dir"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(master) = replica_of {
        args.extend(["--replicaof".into(), "127.0.0.1".into(), master.to_string()]);
    }
    args
}

/// One request on a fresh connection; the decoded reply, or why there is none.
pub fn redis_call(addr: SocketAddr, args: &[&str]) -> Result<Value, String> {
    let mut c = RawConn::try_connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    c.try_send(&encode(args))
        .map_err(|e| format!("send {args:?} to {addr}: {e}"))?;
    let got = c.read_frames(1, Duration::from_secs(3));
    if got.stop != Stop::Done {
        return Err(format!(
            "{args:?} to {addr}: no reply ({:?}, partial {})",
            got.stop,
            escape_short(&got.partial, 200)
        ));
    }
    decode(&got.frames[0]).map_err(|e| format!("{args:?} to {addr}: {e}"))
}

/// `key` in a flat `[k1, v1, k2, v2, ...]` reply (what `SENTINEL master` and each entry of
/// `SENTINEL replicas` are in RESP2).
fn field<'a>(flat: &'a Value, key: &str) -> Option<&'a str> {
    let items = flat.items()?;
    items.chunks(2).find_map(|kv| match kv {
        [k, v] if k.bytes() == Some(key.as_bytes()) => {
            v.bytes().and_then(|b| std::str::from_utf8(b).ok())
        }
        _ => None,
    })
}

fn text_of(v: &Value) -> String {
    match v {
        Value::Simple(b) | Value::Bulk(b) | Value::Error(b) => String::from_utf8_lossy(b).into(),
        other => format!("{other:?}"),
    }
}

impl SentinelCluster {
    /// Starts the master, the replica (and waits until it is in sync), then the three Sentinels,
    /// and waits (at most 30 s) until every Sentinel knows the master, the replica and both
    /// other Sentinels, and `SENTINEL ckquorum` says OK.
    pub fn start() -> SentinelCluster {
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let dir = scratch_dir("sentinel");
        let master_dir = dir.join("master");
        let replica_dir = dir.join("replica");
        for d in [&master_dir, &replica_dir] {
            std::fs::create_dir_all(d).unwrap_or_else(|e| panic!("create {}: {e}", d.display()));
        }
        let master = Proc::start("master", &dir, |port| {
            data_node_args(port, &master_dir, None)
        });
        let master_port = master.port;
        let replica = Proc::start("replica", &dir, |port| {
            data_node_args(port, &replica_dir, Some(master_port))
        });
        let replica_port = replica.port;
        // In sync before the Sentinels start: their first INFO of the master then lists the
        // replica (otherwise they would learn of it only at the next 10 s INFO).
        wait_until(
            Duration::from_secs(20),
            "the replica to be in sync",
            || match redis_call(replica.addr(), &["INFO", "replication"]) {
                Ok(v) => {
                    let info = text_of(&v);
                    if info.contains("master_link_status:up") {
                        Ok(())
                    } else {
                        Err(info)
                    }
                }
                Err(e) => Err(e),
            },
        )
        .unwrap_or_else(|e| {
            panic!(
                "{e}\nreplica log:\n{}\nmaster log:\n{}",
                tail_file(&replica.log, 30),
                tail_file(&master.log, 30)
            )
        });
        let mut sentinels = Vec::new();
        for i in 0..3 {
            let sdir = dir.join(format!("sentinel-{i}"));
            std::fs::create_dir_all(&sdir)
                .unwrap_or_else(|e| panic!("create {}: {e}", sdir.display()));
            let conf = sdir.join("sentinel.conf");
            let s = Proc::start(&format!("sentinel-{i}"), &dir, |port| {
                // Rewritten for every port tried: Sentinel rewrites this file itself, so it
                // must be writable and its own.
                let text = format!(
                    "port {port}\n\
                     bind 127.0.0.1\n\
                     daemonize no\n\
                     dir {dir}\n\
                     sentinel resolve-hostnames no\n\
                     sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n\
                     sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                     sentinel failover-timeout {MASTER_NAME} 3000\n\
                     sentinel parallel-syncs {MASTER_NAME} 1\n",
                    dir = sdir.display()
                );
                std::fs::write(&conf, text)
                    .unwrap_or_else(|e| panic!("write {}: {e}", conf.display()));
                vec![
                    conf.to_str().expect("utf-8 scratch dir").to_string(),
                    "--sentinel".to_string(),
                ]
            });
            sentinels.push(s);
        }
        let cluster = SentinelCluster {
            dir,
            master,
            replica,
            sentinels,
            master_port,
            replica_port,
            _serial: serial,
        };
        let replica_name = format!("127.0.0.1:{replica_port}");
        for s in &cluster.sentinels {
            let addr = s.addr();
            let what = format!("{} (port {}) to know the whole deployment", s.what, s.port);
            wait_until(Duration::from_secs(30), &what, || {
                let m = redis_call(addr, &["SENTINEL", "master", MASTER_NAME])?;
                if field(&m, "port") != Some(&master_port.to_string()) {
                    return Err(format!("SENTINEL master: {m:?}"));
                }
                if field(&m, "num-other-sentinels") != Some("2") {
                    return Err(format!(
                        "num-other-sentinels is {:?}",
                        field(&m, "num-other-sentinels")
                    ));
                }
                let r = redis_call(addr, &["SENTINEL", "replicas", MASTER_NAME])?;
                let known = r.items().unwrap_or_default().iter().any(|e| {
                    let flags = field(e, "flags").unwrap_or("");
                    field(e, "name") == Some(&replica_name)
                        && flags.contains("slave")
                        && !flags.contains("s_down")
                        && !flags.contains("disconnected")
                        && field(e, "master-link-status") == Some("ok")
                });
                if !known {
                    return Err(format!("SENTINEL replicas: {r:?}"));
                }
                let q = redis_call(addr, &["SENTINEL", "ckquorum", MASTER_NAME])?;
                match &q {
                    Value::Simple(t) if t.starts_with(b"OK") => Ok(()),
                    other => Err(format!("SENTINEL ckquorum: {}", text_of(other))),
                }
            })
            .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
        }
        cluster
    }

    /// The port of the master the deployment started with.
    pub fn master_port(&self) -> u16 {
        self.master_port
    }

    /// The port of the replica the deployment started with (the master after a failover).
    pub fn replica_port(&self) -> u16 {
        self.replica_port
    }

    /// `host:port` of every Sentinel, for `upstream.sentinel.addresses`.
    pub fn sentinel_addresses(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|s| s.addr().to_string())
            .collect()
    }

    /// The master's port as the first Sentinel that answers names it
    /// (`SENTINEL get-master-addr-by-name`).
    pub fn master_port_by_sentinel(&self) -> Option<u16> {
        self.sentinels.iter().find_map(|s| {
            let v = redis_call(
                s.addr(),
                &["SENTINEL", "get-master-addr-by-name", MASTER_NAME],
            )
            .ok()?;
            let items = v.items()?;
            std::str::from_utf8(items.get(1)?.bytes()?)
                .ok()?
                .parse()
                .ok()
        })
    }

    /// True when every Sentinel names `port` as the master's.
    pub fn all_sentinels_name(&self, port: u16) -> bool {
        self.sentinels.iter().all(|s| {
            redis_call(
                s.addr(),
                &["SENTINEL", "get-master-addr-by-name", MASTER_NAME],
            )
            .ok()
            .and_then(|v| {
                let items = v.items()?.to_vec();
                std::str::from_utf8(items.get(1)?.bytes()?)
                    .ok()?
                    .parse::<u16>()
                    .ok()
            }) == Some(port)
        })
    }

    /// `SENTINEL FAILOVER mymaster` on the first Sentinel (retried for up to 10 s while it
    /// answers that no replica is good enough yet or a failover is in progress).
    pub fn failover(&self) {
        let addr = self.sentinels[0].addr();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let reply = redis_call(addr, &["SENTINEL", "FAILOVER", MASTER_NAME]);
            match &reply {
                Ok(Value::Simple(t)) if t == b"OK" => return,
                Ok(Value::Error(e))
                    if (e.starts_with(b"NOGOODSLAVE") || e.starts_with(b"INPROG"))
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(200));
                }
                _ => panic!(
                    "SENTINEL FAILOVER {MASTER_NAME}: {reply:?}\n{}",
                    self.logs()
                ),
            }
        }
    }

    /// Kills the master with SIGKILL (Sentinel notices after `down-after-milliseconds`).
    pub fn kill_master(&mut self) {
        self.master.kill();
    }

    /// The tail of every process's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for p in [&self.master, &self.replica]
            .into_iter()
            .chain(self.sentinels.iter())
        {
            out.push_str(&format!(
                "---- {} (port {}) log ----\n{}\n",
                p.what,
                p.port,
                tail_file(&p.log, 25)
            ));
        }
        out
    }

    /// Starts pubwarden with `upstream.mode: sentinel` naming this deployment's Sentinels
    /// (`check_interval: 1s`), `upstream_extra` as further lines under `upstream:` (e.g.
    /// `"resubscribe: true"`) and `extra` as further top-level settings; waits until `/readyz`
    /// answers 200.
    pub fn start_pubwarden(&self, upstream_extra: &[&str], extra: &str) -> SentinelProxy {
        let dir = scratch_dir("pubwarden-sentinel");
        let mut body = format!(
            "upstream:\n  mode: sentinel\n  sentinel:\n    master_name: {MASTER_NAME}\n    \
             addresses: [{}]\n    check_interval: 1s\n",
            self.sentinel_addresses().join(", ")
        );
        for line in upstream_extra {
            body.push_str(&format!("  {line}\n"));
        }
        body.push_str(extra);
        TlsProxy::start(&dir, &body, WaitFor::Ready)
    }

    /// The scratch directory of this deployment.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for SentinelCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- Sentinel deployment ({}) ----\n{}---- end of Sentinel deployment ----",
                self.dir.display(),
                self.logs()
            );
        }
        for s in &mut self.sentinels {
            s.kill();
        }
        self.replica.kill();
        self.master.kill();
    }
}

/// Polls `check` every 100 ms until it is Ok or `timeout` passes; the last complaint otherwise.
pub fn wait_until(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<(), String>,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match check() {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(format!("waited {timeout:?} for {what}; last state: {last}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
