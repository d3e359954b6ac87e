//! Starting, checking and stopping the processes under test.

use crate::resp::{Reply, parse_reply};
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
    pub redis_addr: SocketAddr,
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
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("binding a free port")?;
    Ok(l.local_addr()?.port())
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

impl Fleet {
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

        let mut fleet = Fleet {
            redis_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            targets: Vec::new(),
            children: Vec::new(),
        };

        // Redis.
        let rport = free_port()?;
        let raddr = SocketAddr::from(([127, 0, 0, 1], rport));
        let log = spec.workdir.join("redis.log");
        let args: Vec<String> = [
            "--port",
            &rport.to_string(),
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
        let child = launch(&Launch {
            name: "redis-server".into(),
            prog: redis_bin,
            args,
            cpu: spec.pin.redis_cpu,
            log,
            addr: raddr,
            admin: None,
        })
        .await?;
        let pid = child.child.id();
        fleet.children.push(child);
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
                    "--upstream".into(),
                    raddr.to_string(),
                    "--admin-listen".into(),
                    admin.to_string(),
                ];
                if let Some(cfg) = cfg {
                    args.push("--config".into());
                    args.push(cfg.to_string_lossy().into_owned());
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
