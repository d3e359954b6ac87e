//! Starting, checking and stopping the processes under test.

use crate::resp::{Reply, Value, encode_command, parse_reply, parse_value};
use crate::sys;
use anyhow::{Context, Result, anyhow, bail};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Redis,
    Haproxy,
    Pubwarden,
}

/// Something the load generator connects to.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub kind: Kind,
    pub addr: SocketAddr,
    /// Process whose RSS is measured (the proxy, or redis-server for `redis`).
    pub pid: u32,
}

/// Which CPUs children run on (`None`: not pinned).
#[derive(Debug, Clone, Copy)]
pub struct Pinning {
    pub redis_cpu: Option<usize>,
    pub proxy_cpu: Option<usize>,
}

/// What to start.
#[derive(Debug, Clone)]
pub struct FleetSpec {
    pub redis_bin: String,
    pub haproxy_bin: String,
    pub pubwarden_bin: String,
    pub haproxy: bool,
    /// (target name, optional config file) for each pubwarden target.
    pub pubwardens: Vec<(String, Option<PathBuf>)>,
    pub workdir: PathBuf,
    pub pin: Pinning,
    /// HAProxy `maxconn` (it needs about two descriptors per connection).
    pub haproxy_maxconn: u64,
    /// Start a 3-master Redis Cluster instead of one redis-server.
    pub cluster: bool,
    pub redis_cli_bin: String,
}

/// The hash tag every channel shares in cluster mode: one slot, one master.
pub const HASH_TAG: &str = "{bench}";

/// Masters in the benchmark's Redis Cluster (no replicas: 2 CPUs).
const CLUSTER_MASTERS: usize = 3;

/// The Redis Cluster started with `--cluster`.
#[derive(Debug, Clone)]
pub struct ClusterInfo {
    /// Every master, in start order.
    pub nodes: Vec<SocketAddr>,
    /// The slot of [`HASH_TAG`] and the master that owns it.
    pub slot: u16,
    pub owner: SocketAddr,
}

/// How a child is started and when it counts as ready (kept for restarts).
#[derive(Debug, Clone)]
struct Launch {
    name: String,
    prog: PathBuf,
    args: Vec<String>,
    cpu: Option<usize>,
    log: PathBuf,
    /// Where clients connect (a PING through it must answer +PONG).
    addr: SocketAddr,
    /// pubwarden: admin address whose GET /readyz must answer 200 first.
    admin: Option<SocketAddr>,
}

struct ChildProc {
    name: String,
    child: std::process::Child,
    launch: Launch,
}

impl ChildProc {
    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(st)) => Some(st.to_string()),
            Ok(None) => None,
            Err(e) => Some(format!("unknown ({e})")),
        }
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        if self.exited().is_some() {
            return;
        }
        sys::signal(self.child.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!("pubwarden-bench: {} ignored SIGTERM; killing", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// All started processes; dropping it stops them (proxies first, Redis last).
pub struct Fleet {
    /// Where the `redis` target points (the owning master in cluster mode).
    pub redis_addr: SocketAddr,
    /// Every Redis server started (one, or the cluster's masters).
    pub redis_nodes: Vec<SocketAddr>,
    pub cluster: Option<ClusterInfo>,
    pub targets: Vec<Target>,
    children: Vec<ChildProc>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        while let Some(c) = self.children.pop() {
            drop(c);
        }
    }
}

/// Resolves a program name against PATH (or checks an explicit path).
pub fn which(prog: &str) -> Option<PathBuf> {
    if prog.contains('/') {
        let p = PathBuf::from(prog);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

fn free_port() -> Result<u16> {
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").context("binding a free port")?;
        let port = l.local_addr()?.port();
        // Never a default Redis port (or its cluster bus), whatever the kernel picks.
        if port != 6379 && port != 16379 {
            return Ok(port);
        }
    }
}

fn log_tail(path: &Path) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    let start = lines.len().saturating_sub(15);
    let mut out = String::new();
    for l in &lines[start..] {
        let _ = writeln!(out, "    | {l}");
    }
    out
}

fn spawn(l: &Launch) -> Result<ChildProc> {
    let mut cmd = match l.cpu {
        Some(c) => {
            let mut cmd = Command::new("taskset");
            cmd.arg("-c").arg(c.to_string()).arg(&l.prog);
            cmd
        }
        None => Command::new(&l.prog),
    };
    cmd.args(&l.args);
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&l.log)
        .with_context(|| format!("creating {}", l.log.display()))?;
    let err = out.try_clone()?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    sys::kill_with_parent(&mut cmd);
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {} ({})", l.name, l.prog.display()))?;
    Ok(ChildProc {
        name: l.name.clone(),
        child,
        launch: l.clone(),
    })
}

/// Starts a child and waits until it is ready.
async fn launch(l: &Launch) -> Result<ChildProc> {
    let mut child = spawn(l)?;
    let addr = l.addr;
    if let Some(admin) = l.admin {
        wait_ready(
            &mut child,
            &l.log,
            Duration::from_secs(15),
            "GET /readyz",
            || async { http_ready(admin, "/readyz").await },
        )
        .await?;
    }
    wait_ready(
        &mut child,
        &l.log,
        Duration::from_secs(10),
        "PING",
        || async { ping(addr).await.map(|()| true) },
    )
    .await
    .with_context(|| format!("{}: PING through {addr} failed", l.name))?;
    Ok(child)
}

/// Sends PING and expects +PONG. Used for readiness and sanity checks.
pub async fn ping(addr: SocketAddr) -> Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(b"*1\r\n$4\r\nPING\r\n").await?;
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < buf.len() {
        let r = s.read(&mut buf[n..]).await?;
        if r == 0 {
            bail!("connection closed before PONG");
        }
        n += r;
        if let Some((reply, _)) = parse_reply(&buf[..n])? {
            if reply == Reply::Status && buf.starts_with(b"+PONG") {
                return Ok(());
            }
            bail!(
                "unexpected reply to PING: {:?}",
                String::from_utf8_lossy(&buf[..n])
            );
        }
    }
    bail!("reply to PING too long")
}

/// Sends one command and returns its whole reply (setup queries only).
pub async fn request(addr: SocketAddr, args: &[&[u8]]) -> Result<Value> {
    let fut = async {
        let mut s = TcpStream::connect(addr).await?;
        let mut cmd = Vec::new();
        encode_command(&mut cmd, args);
        s.write_all(&cmd).await?;
        let mut buf = Vec::with_capacity(4096);
        let mut chunk = [0u8; 4096];
        loop {
            if let Some((v, _)) = parse_value(&buf)? {
                return Ok(v);
            }
            let r = s.read(&mut chunk).await?;
            if r == 0 {
                bail!("connection closed before a complete reply");
            }
            buf.extend_from_slice(&chunk[..r]);
        }
    };
    let name = args
        .iter()
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .map_err(|_| anyhow!("{name} to {addr} timed out"))?
        .with_context(|| format!("{name} to {addr}"))
}

/// A bulk or status reply as text; an error reply as an error.
fn reply_text(v: Value) -> Result<String> {
    match v {
        Value::Error(e) => bail!("{e}"),
        v => v
            .text()
            .ok_or_else(|| anyhow!("unexpected reply type: {v:?}")),
    }
}

/// One `key:value` field of an INFO-like text.
fn info_field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|l| {
        l.strip_prefix(key)
            .and_then(|r| r.strip_prefix(':'))
            .map(str::trim)
    })
}

/// The master serving `slot` according to a `CLUSTER NODES` text
/// (`id addr@bus[,host] flags master ... slot-ranges`).
fn owner_in_nodes(text: &str, slot: u16) -> Option<String> {
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 9 || !f[2].split(',').any(|x| x == "master") {
            continue;
        }
        let serves = f[8..].iter().any(|r| {
            if r.starts_with('[') {
                return false; // importing / migrating marker
            }
            let (a, b) = r.split_once('-').unwrap_or((r, r));
            match (a.parse::<u16>(), b.parse::<u16>()) {
                (Ok(a), Ok(b)) => (a..=b).contains(&slot),
                _ => false,
            }
        });
        if serves {
            let addr = f[1].split(['@', ',']).next()?;
            return Some(addr.to_string());
        }
    }
    None
}

/// Writes `config` (a pubwarden settings file, or none) with the cluster
/// upstream added: `upstream.mode: cluster` and `upstream.cluster.seeds`.
/// A block-style `upstream:` section keeps its other settings (its `address`
/// is dropped: the cluster mode refuses it); one that sets `mode`, `cluster`
/// or `sentinel` itself is refused. A relative `policy:` path is made
/// absolute against `base_dir`, as pubwarden would resolve it next to the
/// original file.
pub fn cluster_config(
    config: Option<&str>,
    base_dir: Option<&Path>,
    seeds: &[SocketAddr],
) -> Result<String> {
    let block = |indent: &str| {
        let mut b = format!("{indent}mode: cluster\n{indent}cluster:\n{indent}{indent}seeds:\n");
        for s in seeds {
            let _ = writeln!(b, "{indent}{indent}  - \"{s}\"");
        }
        b
    };
    let Some(text) = config else {
        return Ok(format!("upstream:\n{}", block("  ")));
    };
    let indent_of = |l: &str| l.len() - l.trim_start_matches(' ').len();
    let is_content = |l: &str| {
        let t = l.trim();
        !t.is_empty() && !t.starts_with('#')
    };
    // `key: value  # comment` -> (key, value), quotes stripped.
    let split_key = |l: &str| -> Option<(String, String)> {
        let t = l.trim();
        let (k, v) = t.split_once(':')?;
        let k = k.trim().trim_matches(|c| c == '"' || c == '\'').to_string();
        let v = v.split(" #").next().unwrap_or("").trim().to_string();
        Some((k, v))
    };
    let lines: Vec<&str> = text.lines().collect();
    if let Some(first) = lines.iter().find(|l| is_content(l))
        && first.trim_start().starts_with('{')
    {
        bail!(
            "a flow-style settings file ({{...}}) cannot be given the cluster upstream; use block style"
        );
    }
    let mut out = String::with_capacity(text.len() + 128);
    let mut saw_upstream = false;
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let top = is_content(line) && indent_of(line) == 0 && !line.starts_with("---");
        let key = if top { split_key(line) } else { None };
        match key {
            Some((k, v)) if k == "upstream" => {
                if !v.is_empty() {
                    bail!(
                        "`upstream:` must be a block mapping to be given the cluster upstream \
                         (found `{}`)",
                        line.trim()
                    );
                }
                saw_upstream = true;
                let mut j = i + 1;
                while j < lines.len() && (!is_content(lines[j]) || indent_of(lines[j]) > 0) {
                    j += 1;
                }
                let children = &lines[i + 1..j];
                let ind = children
                    .iter()
                    .find(|l| is_content(l))
                    .map_or(2, |l| indent_of(l));
                let ind_s = " ".repeat(ind.max(1));
                out.push_str(line);
                out.push('\n');
                out.push_str(&block(&ind_s));
                let mut skip_deeper = false;
                for c in children {
                    if is_content(c) && indent_of(c) <= ind {
                        skip_deeper = false;
                        if let Some((ck, _)) = split_key(c) {
                            match ck.as_str() {
                                "mode" | "cluster" | "sentinel" => bail!(
                                    "the settings file sets upstream.{ck}; --cluster sets the upstream itself"
                                ),
                                "address" => {
                                    skip_deeper = true;
                                    continue;
                                }
                                _ => {}
                            }
                        }
                    } else if skip_deeper && is_content(c) {
                        continue;
                    }
                    out.push_str(c);
                    out.push('\n');
                }
                i = j;
                continue;
            }
            Some((k, v)) if k == "policy" && !v.is_empty() => {
                let path = v.trim_matches(|c| c == '"' || c == '\'');
                let p = Path::new(path);
                let abs = match base_dir {
                    Some(d) if p.is_relative() => d.join(p),
                    _ => p.to_path_buf(),
                };
                let quoted = abs
                    .to_string_lossy()
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"");
                let _ = writeln!(out, "policy: \"{quoted}\"");
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
        i += 1;
    }
    if !saw_upstream {
        let _ = write!(out, "upstream:\n{}", block("  "));
    }
    Ok(out)
}

/// `connected_clients` from Redis `INFO clients` (counts this connection too).
pub async fn connected_clients(addr: SocketAddr) -> Result<u64> {
    let fut = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(b"*2\r\n$4\r\nINFO\r\n$7\r\nclients\r\n")
            .await?;
        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 1024];
        for _ in 0..64 {
            let r = s.read(&mut chunk).await?;
            if r == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..r]);
            let text = String::from_utf8_lossy(&buf);
            if let Some(v) = text
                .lines()
                .find_map(|l| l.strip_prefix("connected_clients:"))
                && text.contains("\r\n\r\n")
            {
                return v.trim().parse::<u64>().context("parsing connected_clients");
            }
        }
        bail!("no connected_clients in INFO reply")
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .map_err(|_| anyhow!("INFO clients timed out"))?
}

async fn http_ready(addr: SocketAddr, path: &str) -> Result<bool> {
    let mut s = TcpStream::connect(addr).await?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        let r = s.read(&mut buf[n..]).await?;
        if r == 0 {
            break;
        }
        n += r;
    }
    let head = &buf[..n];
    Ok(head.starts_with(b"HTTP/1.1 200") || head.starts_with(b"HTTP/1.0 200"))
}

/// Polls `check` every 20 ms until it succeeds, the child dies, or `timeout`.
async fn wait_ready<F, Fut>(
    child: &mut ChildProc,
    log: &Path,
    timeout: Duration,
    what: &str,
    mut check: F,
) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.exited() {
            bail!(
                "{} exited ({status}) before becoming ready; log {}:\n{}",
                child.name,
                log.display(),
                log_tail(log)
            );
        }
        let last_err = match tokio::time::timeout(Duration::from_secs(1), check()).await {
            Ok(Ok(true)) => return Ok(()),
            Ok(Ok(false)) => format!("{what} not ready yet"),
            Ok(Err(e)) => format!("{e:#}"),
            Err(_) => format!("{what} check timed out"),
        };
        if Instant::now() >= deadline {
            bail!(
                "{} not ready after {:?} ({what}: {last_err}); log {}:\n{}",
                child.name,
                timeout,
                log.display(),
                log_tail(log)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn haproxy_config(listen: u16, upstream: SocketAddr, maxconn: u64) -> String {
    format!(
        "global\n    nbthread 1\n    maxconn {maxconn}\n\ndefaults\n    mode tcp\n    timeout connect 5s\n    \
         timeout client 1h\n    timeout server 1h\n\nlisten redis\n    bind 127.0.0.1:{listen}\n    \
         server redis {upstream}\n"
    )
}

/// How a redis-server is started (standalone, or a cluster node with `extra`).
fn redis_launch(
    spec: &FleetSpec,
    bin: &Path,
    name: &str,
    port: u16,
    log: &str,
    extra: &[String],
) -> Launch {
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
        "--protected-mode",
        "no",
        "--maxclients",
        "60000",
        "--client-output-buffer-limit",
        "pubsub 256mb 64mb 60",
        "--dir",
        &spec.workdir.to_string_lossy(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().cloned());
    Launch {
        name: name.into(),
        prog: bin.to_path_buf(),
        args,
        cpu: spec.pin.redis_cpu,
        log: spec.workdir.join(log),
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        admin: None,
    }
}

/// Starts three cluster-enabled redis-servers (all on the Redis CPU), joins
/// them with `redis-cli --cluster create ... --cluster-replicas 0`, waits
/// until every node reports `cluster_state:ok` and agrees on the master of
/// [`HASH_TAG`]'s slot.
async fn start_cluster(
    spec: &FleetSpec,
    fleet: &mut Fleet,
    redis_bin: &Path,
    redis_cli: &Path,
) -> Result<ClusterInfo> {
    let mut nodes = Vec::new();
    for i in 0..CLUSTER_MASTERS {
        let (port, bus) = loop {
            let (p, b) = (free_port()?, free_port()?);
            if p != b
                && !nodes
                    .iter()
                    .any(|n: &SocketAddr| n.port() == p || n.port() == b)
            {
                break (p, b);
            }
        };
        let conf = spec.workdir.join(format!("nodes-{port}.conf"));
        // A node file left in a reused --workdir would make it an old cluster's node.
        let _ = std::fs::remove_file(&conf);
        let extra: Vec<String> = vec![
            "--cluster-enabled".into(),
            "yes".into(),
            "--cluster-config-file".into(),
            conf.to_string_lossy().into_owned(),
            "--cluster-port".into(),
            bus.to_string(),
        ];
        let l = redis_launch(
            spec,
            redis_bin,
            &format!("redis-node-{i}"),
            port,
            &format!("redis-{port}.log"),
            &extra,
        );
        let child = launch(&l).await?;
        fleet.children.push(child);
        nodes.push(l.addr);
    }

    // Join them: every master gets a third of the slots.
    let log = spec.workdir.join("cluster-create.log");
    let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    let mut cmd = Command::new(redis_cli);
    cmd.arg("--cluster").arg("create");
    cmd.args(nodes.iter().map(|n| n.to_string()));
    cmd.args(["--cluster-replicas", "0", "--cluster-yes"]);
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    sys::kill_with_parent(&mut cmd);
    let mut child = cmd.spawn().context("starting redis-cli --cluster create")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match child.try_wait()? {
            Some(st) if st.success() => break,
            Some(st) => bail!(
                "redis-cli --cluster create exited ({st}); log {}:\n{}",
                log.display(),
                log_tail(&log)
            ),
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "redis-cli --cluster create did not finish within 60 s; log {}:\n{}",
                    log.display(),
                    log_tail(&log)
                );
            }
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }

    let slot = match request(nodes[0], &[b"CLUSTER", b"KEYSLOT", HASH_TAG.as_bytes()]).await? {
        Value::Int(v) => u16::try_from(v).context("CLUSTER KEYSLOT out of range")?,
        v => bail!("unexpected reply to CLUSTER KEYSLOT: {v:?}"),
    };
    // Settled: every node says ok, knows all masters, and names the same owner.
    let deadline = Instant::now() + Duration::from_secs(40);
    let owner = loop {
        let mut problem = None;
        let mut owners = Vec::new();
        for &n in &nodes {
            let info = reply_text(request(n, &[b"CLUSTER", b"INFO"]).await?)?;
            let known = info_field(&info, "cluster_known_nodes").unwrap_or("?");
            if info_field(&info, "cluster_state") != Some("ok")
                || known != CLUSTER_MASTERS.to_string()
            {
                problem = Some(format!(
                    "{n}: cluster_state {}, {known} nodes known",
                    info_field(&info, "cluster_state").unwrap_or("?")
                ));
                break;
            }
            let text = reply_text(request(n, &[b"CLUSTER", b"NODES"]).await?)?;
            owners.push(owner_in_nodes(&text, slot));
        }
        if problem.is_none() {
            match owners.first() {
                Some(Some(o)) if owners.iter().all(|x| x.as_ref() == Some(o)) => {
                    let addr: SocketAddr = o
                        .parse()
                        .with_context(|| format!("owner address {o:?} from CLUSTER NODES"))?;
                    break addr;
                }
                _ => {
                    problem = Some(format!(
                        "nodes disagree on the owner of slot {slot}: {owners:?}"
                    ))
                }
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "the cluster did not settle within 40 s ({}); log {}:\n{}",
                problem.unwrap_or_default(),
                log.display(),
                log_tail(&log)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if !nodes.contains(&owner) {
        bail!("CLUSTER NODES names {owner} as the owner of slot {slot}, not a node started here");
    }
    Ok(ClusterInfo { nodes, slot, owner })
}

impl Fleet {
    /// Sum of `connected_clients` over every Redis server.
    pub async fn connected_clients(nodes: &[SocketAddr]) -> Result<u64> {
        let mut total = 0;
        for &n in nodes {
            total += connected_clients(n).await?;
        }
        Ok(total)
    }

    /// Starts Redis and every requested front; fails with a clear message if any
    /// binary is missing or a process does not become ready.
    pub async fn start(spec: &FleetSpec) -> Result<Fleet> {
        // Check every binary first so a missing one fails fast.
        let redis_bin = which(&spec.redis_bin).ok_or_else(|| {
            anyhow!(
                "redis-server not found ({}): install redis: apt-get install -y redis-server",
                spec.redis_bin
            )
        })?;
        let haproxy_bin = if spec.haproxy {
            Some(which(&spec.haproxy_bin).ok_or_else(|| {
                anyhow!(
                    "haproxy not found ({}): install haproxy: apt-get install -y haproxy \
                     (or deselect it with --targets)",
                    spec.haproxy_bin
                )
            })?)
        } else {
            None
        };
        let pubwarden_bin = if spec.pubwardens.is_empty() {
            None
        } else {
            let p = which(&spec.pubwarden_bin).ok_or_else(|| {
                anyhow!(
                    "pubwarden binary not found at {}: build it with \
                     `cargo build --release --bin pubwarden`, pass --pubwarden-bin PATH, \
                     or deselect it (e.g. --targets redis,haproxy)",
                    spec.pubwarden_bin
                )
            })?;
            for (name, cfg) in &spec.pubwardens {
                if let Some(cfg) = cfg
                    && !cfg.is_file()
                {
                    bail!("config file for target {name} not found: {}", cfg.display());
                }
            }
            Some(p)
        };
        if spec.pin.redis_cpu.is_some() || spec.pin.proxy_cpu.is_some() {
            which("taskset").ok_or_else(|| {
                anyhow!("taskset not found: apt-get install -y util-linux (or use --no-pin)")
            })?;
        }

        let redis_cli = if spec.cluster {
            Some(which(&spec.redis_cli_bin).ok_or_else(|| {
                anyhow!(
                    "redis-cli not found ({}): it comes with redis: apt-get install -y redis-server",
                    spec.redis_cli_bin
                )
            })?)
        } else {
            None
        };

        let mut fleet = Fleet {
            redis_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            redis_nodes: Vec::new(),
            cluster: None,
            targets: Vec::new(),
            children: Vec::new(),
        };

        // Redis: one server, or a cluster whose owning master is the target.
        let (raddr, pid) = if let Some(cli) = &redis_cli {
            let cluster = start_cluster(spec, &mut fleet, &redis_bin, cli).await?;
            let owner = cluster.owner;
            fleet.redis_nodes = cluster.nodes.clone();
            fleet.cluster = Some(cluster);
            let pid = fleet
                .children
                .iter()
                .find(|c| c.launch.addr == owner)
                .map(|c| c.child.id())
                .ok_or_else(|| {
                    anyhow!("the owner {owner} of the hash tag is not a node started here")
                })?;
            (owner, pid)
        } else {
            let rport = free_port()?;
            let raddr = SocketAddr::from(([127, 0, 0, 1], rport));
            let child = launch(&redis_launch(
                spec,
                &redis_bin,
                "redis-server",
                rport,
                "redis.log",
                &[],
            ))
            .await?;
            let pid = child.child.id();
            fleet.children.push(child);
            fleet.redis_nodes = vec![raddr];
            (raddr, pid)
        };
        fleet.redis_addr = raddr;
        fleet.targets.push(Target {
            name: "redis".into(),
            kind: Kind::Redis,
            addr: raddr,
            pid,
        });

        // HAProxy, mode tcp, one thread: the L4 reference.
        if let Some(bin) = haproxy_bin {
            let port = free_port()?;
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let cfg_path = spec.workdir.join("haproxy.cfg");
            std::fs::write(&cfg_path, haproxy_config(port, raddr, spec.haproxy_maxconn))
                .with_context(|| format!("writing {}", cfg_path.display()))?;
            let log = spec.workdir.join("haproxy.log");
            let args = vec![
                "-db".to_string(),
                "-f".into(),
                cfg_path.to_string_lossy().into_owned(),
            ];
            let child = launch(&Launch {
                name: "haproxy".into(),
                prog: bin,
                args,
                cpu: spec.pin.proxy_cpu,
                log,
                addr,
                admin: None,
            })
            .await?;
            let pid = child.child.id();
            fleet.children.push(child);
            fleet.targets.push(Target {
                name: "haproxy".into(),
                kind: Kind::Haproxy,
                addr,
                pid,
            });
        }

        // pubwarden, once per configuration.
        if let Some(bin) = pubwarden_bin {
            for (name, cfg) in &spec.pubwardens {
                let port = free_port()?;
                let admin_port = free_port()?;
                let addr = SocketAddr::from(([127, 0, 0, 1], port));
                let admin = SocketAddr::from(([127, 0, 0, 1], admin_port));
                let mut args = vec![
                    "--listen".to_string(),
                    addr.to_string(),
                    "--admin-listen".into(),
                    admin.to_string(),
                ];
                if let Some(cluster) = &fleet.cluster {
                    // The given settings (if any) plus the cluster upstream.
                    let text = match cfg {
                        Some(cfg) => Some(
                            std::fs::read_to_string(cfg)
                                .with_context(|| format!("reading {}", cfg.display()))?,
                        ),
                        None => None,
                    };
                    let dir = cfg.as_ref().and_then(|c| c.parent()).map(|d| {
                        std::fs::canonicalize(if d.as_os_str().is_empty() {
                            Path::new(".")
                        } else {
                            d
                        })
                        .unwrap_or_else(|_| d.to_path_buf())
                    });
                    let merged = cluster_config(text.as_deref(), dir.as_deref(), &cluster.nodes)
                        .with_context(|| match cfg {
                            Some(c) => format!("target {name}: {}", c.display()),
                            None => format!("target {name}"),
                        })?;
                    let path = spec.workdir.join(format!("{name}-cluster.yaml"));
                    std::fs::write(&path, merged)
                        .with_context(|| format!("writing {}", path.display()))?;
                    args.push("--config".into());
                    args.push(path.to_string_lossy().into_owned());
                } else {
                    args.push("--upstream".into());
                    args.push(raddr.to_string());
                    if let Some(cfg) = cfg {
                        args.push("--config".into());
                        args.push(cfg.to_string_lossy().into_owned());
                    }
                }
                let log = spec.workdir.join(format!("{name}.log"));
                let child = launch(&Launch {
                    name: name.clone(),
                    prog: bin.clone(),
                    args,
                    cpu: spec.pin.proxy_cpu,
                    log,
                    addr,
                    admin: Some(admin),
                })
                .await?;
                let pid = child.child.id();
                fleet.children.push(child);
                fleet.targets.push(Target {
                    name: name.clone(),
                    kind: Kind::Pubwarden,
                    addr,
                    pid,
                });
            }
        }
        Ok(fleet)
    }

    /// Stops a proxy target and starts it again on the same ports, so that a
    /// measurement starts from a fresh process (used before RSS measurements).
    pub async fn restart(&mut self, target: &str) -> Result<Target> {
        let ti = self
            .targets
            .iter()
            .position(|t| t.name == target)
            .ok_or_else(|| anyhow!("no target {target}"))?;
        if self.targets[ti].kind == Kind::Redis {
            bail!("the redis target is not restarted");
        }
        let pid = self.targets[ti].pid;
        let ci = self
            .children
            .iter()
            .position(|c| c.child.id() == pid)
            .ok_or_else(|| anyhow!("no process for target {target}"))?;
        let old = self.children.remove(ci);
        let l = old.launch.clone();
        drop(old);
        let child = launch(&l).await?;
        self.targets[ti].pid = child.child.id();
        self.children.insert(ci, child);
        Ok(self.targets[ti].clone())
    }

    /// Fails if any child has died (checked between scenario runs).
    pub fn check_alive(&mut self) -> Result<()> {
        for c in &mut self.children {
            if let Some(status) = c.exited() {
                bail!("{} exited unexpectedly ({status})", c.name);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeds() -> Vec<SocketAddr> {
        vec![
            "127.0.0.1:7001".parse().unwrap(),
            "127.0.0.1:7002".parse().unwrap(),
        ]
    }

    #[test]
    fn cluster_config_without_a_file() {
        let c = cluster_config(None, None, &seeds()).unwrap();
        assert_eq!(
            c,
            "upstream:\n  mode: cluster\n  cluster:\n    seeds:\n      - \"127.0.0.1:7001\"\n      - \"127.0.0.1:7002\"\n"
        );
    }

    #[test]
    fn cluster_config_appends_and_resolves_policy() {
        let base = "metrics:\n  enabled: false\npolicy: policy.yaml  # here\n";
        let c = cluster_config(Some(base), Some(Path::new("/etc/pw")), &seeds()).unwrap();
        assert_eq!(
            c,
            "metrics:\n  enabled: false\npolicy: \"/etc/pw/policy.yaml\"\nupstream:\n  mode: cluster\n  cluster:\n    seeds:\n      - \"127.0.0.1:7001\"\n      - \"127.0.0.1:7002\"\n"
        );
        let abs = cluster_config(
            Some("policy: /x/p.yaml\n"),
            Some(Path::new("/etc")),
            &seeds(),
        )
        .unwrap();
        assert!(abs.starts_with("policy: \"/x/p.yaml\"\n"));
    }

    #[test]
    fn cluster_config_merges_an_upstream_block() {
        let base = "upstream:\n    # a comment\n    address: 127.0.0.1:6000\n    resubscribe: false\nlog:\n  level: info\n";
        let c = cluster_config(Some(base), None, &seeds()).unwrap();
        assert_eq!(
            c,
            "upstream:\n    mode: cluster\n    cluster:\n        seeds:\n          - \"127.0.0.1:7001\"\n          - \"127.0.0.1:7002\"\n    # a comment\n    resubscribe: false\nlog:\n  level: info\n"
        );
        for bad in [
            "upstream:\n  mode: sentinel\n",
            "upstream:\n  cluster:\n    seeds: [a:1]\n",
            "upstream: {address: a:1}\n",
            "{upstream: {address: a:1}}\n",
        ] {
            assert!(cluster_config(Some(bad), None, &seeds()).is_err(), "{bad}");
        }
    }

    #[test]
    fn owner_from_cluster_nodes() {
        let text = "\
a1 127.0.0.1:7001@17001 myself,master - 0 0 1 connected 0-5460\n\
a2 127.0.0.1:7002@17002,host master - 0 1 2 connected 5461-10922 [10923->-a3]\n\
a3 127.0.0.1:7003@17003 master - 0 1 3 connected 10923-16383\n\
a4 127.0.0.1:7004@17004 slave a1 0 1 1 connected\n";
        assert_eq!(owner_in_nodes(text, 0).as_deref(), Some("127.0.0.1:7001"));
        assert_eq!(
            owner_in_nodes(text, 5461).as_deref(),
            Some("127.0.0.1:7002")
        );
        assert_eq!(
            owner_in_nodes(text, 10923).as_deref(),
            Some("127.0.0.1:7003")
        );
        assert_eq!(owner_in_nodes("", 1), None);
        assert_eq!(
            info_field("a:1\r\ncluster_state:ok\r\n", "cluster_state"),
            Some("ok")
        );
    }
}
