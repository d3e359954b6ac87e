//! Child processes: a private `redis-server` per test and the `pubwarden` binary under test.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::net::{RawConn, free_port, http_status, loopback};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh scratch directory under the target's tmp dir, unique to this process and call.
pub fn scratch_dir(tag: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("pubwarden-tests")
        .join(format!("{tag}-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    dir
}

/// The last `lines` lines of a log file, for failure messages.
pub fn tail_file(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_else(|e| format!("<cannot read {}: {e}>", path.display()));
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn kill_child(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Waits up to `timeout` for `child` to exit.
pub fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            Err(e) => panic!("try_wait: {e}"),
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A kB figure (`VmRSS`, `VmSize`, ...) from /proc/<pid>/status.
pub fn proc_status_kb(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(&format!("{field}:")))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Sends SIGTERM with the `kill` command.
pub fn sigterm(pid: u32) {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("run kill -TERM");
    assert!(status.success(), "kill -TERM {pid} failed: {status}");
}

/// A `redis-server` of this test's own on a free loopback port, killed on drop.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl RedisServer {
    /// Starts a server on a free port (retrying with another port if one was taken meanwhile).
    pub fn start() -> RedisServer {
        let dir = scratch_dir("redis");
        let mut last_err = String::new();
        for _ in 0..5 {
            let port = free_port();
            let mut server = RedisServer {
                child: None,
                port,
                dir: dir.clone(),
            };
            match server.spawn() {
                Ok(()) => return server,
                Err(e) => last_err = e,
            }
        }
        panic!("redis-server did not start: {last_err}");
    }

    fn spawn(&mut self) -> Result<(), String> {
        let log_path = self.dir.join(format!("redis-{}.log", self.port));
        let log = File::create(&log_path).expect("create redis log file");
        let log2 = log.try_clone().expect("clone redis log file");
        let spawned = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--enable-debug-command",
                "yes",
                "--daemonize",
                "no",
                "--dir",
                self.dir.to_str().expect("utf-8 scratch dir"),
            ])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                panic!("redis-server not found: install it with `apt-get install -y redis-server`")
            }
            Err(e) => panic!("spawn redis-server: {e}"),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "redis-server on port {} exited with {status}: {}",
                    self.port,
                    tail_file(&log_path, 20)
                ));
            }
            if ping(self.addr()) {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() >= deadline {
                kill_child(&mut child);
                return Err(format!(
                    "redis-server on port {} did not answer PING within 10 s: {}",
                    self.port,
                    tail_file(&log_path, 20)
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        loopback(self.port)
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills the server (SIGKILL) and waits for it to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_child(&mut child);
        }
    }

    /// Starts the server again on the same port (retrying while the port is still busy).
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match self.spawn() {
                Ok(()) => return,
                Err(e) if Instant::now() >= deadline => panic!("restart redis-server: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// True if something at `addr` answers `PING` with `+PONG` within a second.
pub fn ping(addr: SocketAddr) -> bool {
    let Ok(mut conn) = RawConn::try_connect(addr) else {
        return false;
    };
    if conn.try_send(b"PING\r\n").is_err() {
        return false;
    }
    let (bytes, _) = conn.read_bytes(7, Duration::from_secs(1));
    bytes == b"+PONG\r\n"
}

/// What [`Pubwarden::start_with`] waits for before returning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitFor {
    /// `/readyz` answers 200.
    Ready,
    /// `/healthz` answers 200 (upstream may be down).
    Healthy,
}

/// The binary under test, with its stderr captured to a file, killed on drop. When dropped
/// during a panic it prints the tail of its log.
pub struct Pubwarden {
    child: Option<Child>,
    listen: SocketAddr,
    admin: SocketAddr,
    upstream_port: u16,
    stderr_path: PathBuf,
}

impl Pubwarden {
    /// The binary: Cargo's build of `pubwarden`, or `PUBWARDEN_TESTS_BIN` when set (a stand-in
    /// used only to validate the harness itself).
    pub fn bin() -> String {
        std::env::var("PUBWARDEN_TESTS_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_pubwarden").to_string())
    }

    /// Starts pubwarden in front of `upstream_port` and waits until `/readyz` answers 200.
    pub fn start(upstream_port: u16) -> Pubwarden {
        Self::start_with(upstream_port, None, WaitFor::Ready)
    }

    /// Starts pubwarden and waits only until `/healthz` answers 200.
    pub fn start_unready(upstream_port: u16) -> Pubwarden {
        Self::start_with(upstream_port, None, WaitFor::Healthy)
    }

    pub fn start_with(upstream_port: u16, config: Option<&Path>, wait: WaitFor) -> Pubwarden {
        Self::start_custom(upstream_port, config, wait, &[], &[])
    }

    /// Like [`Pubwarden::start_with`], with extra command-line arguments (after the built-in
    /// ones) and extra environment variables for the child.
    pub fn start_custom(
        upstream_port: u16,
        config: Option<&Path>,
        wait: WaitFor,
        extra_args: &[&str],
        extra_env: &[(&str, &str)],
    ) -> Pubwarden {
        let dir = scratch_dir("pubwarden");
        let mut last_err = String::new();
        for attempt in 0..3 {
            let listen = loopback(free_port());
            let admin = loopback(free_port());
            let stderr_path = dir.join(format!("pubwarden-{attempt}.stderr"));
            let stderr = File::create(&stderr_path).expect("create pubwarden stderr file");
            let mut cmd = Command::new(Self::bin());
            cmd.arg("--listen")
                .arg(listen.to_string())
                .arg("--upstream")
                .arg(loopback(upstream_port).to_string())
                .arg("--admin-listen")
                .arg(admin.to_string());
            if let Some(config) = config {
                cmd.arg("--config").arg(config);
            }
            cmd.args(extra_args);
            cmd.envs(extra_env.iter().copied());
            let child = cmd
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", Self::bin()));
            let mut pw = Pubwarden {
                child: Some(child),
                listen,
                admin,
                upstream_port,
                stderr_path,
            };
            let path = match wait {
                WaitFor::Ready => "/readyz",
                WaitFor::Healthy => "/healthz",
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if !pw.is_running() {
                    last_err = format!(
                        "pubwarden exited early ({:?}); stderr:\n{}",
                        pw.child.as_mut().and_then(|c| c.try_wait().ok().flatten()),
                        pw.logs()
                    );
                    break;
                }
                if http_status(admin, path) == Some(200) {
                    return pw;
                }
                if Instant::now() >= deadline {
                    let stderr = pw.logs();
                    pw.kill();
                    panic!("pubwarden: {path} did not answer 200 within 10 s; stderr:\n{stderr}");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("pubwarden did not start in 3 attempts: {last_err}");
    }

    /// The client-facing address.
    pub fn addr(&self) -> SocketAddr {
        self.listen
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    pub fn upstream_port(&self) -> u16 {
        self.upstream_port
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("pubwarden was killed").id()
    }

    pub fn connect(&self) -> RawConn {
        RawConn::connect(self.listen)
    }

    /// The status of an admin GET, None if the admin endpoint did not answer.
    pub fn http_status(&self, path: &str) -> Option<u16> {
        http_status(self.admin, path)
    }

    /// Polls `path` until it answers `status` (true) or `timeout` passes (false).
    pub fn wait_for_status(&self, path: &str, status: u16, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.http_status(path) == Some(status) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Its stderr so far (the last 200 lines).
    pub fn logs(&self) -> String {
        tail_file(&self.stderr_path, 200)
    }

    pub fn rss_kb(&self) -> u64 {
        proc_status_kb(self.pid(), "VmRSS").expect("VmRSS of pubwarden")
    }

    pub fn vm_size_kb(&self) -> u64 {
        proc_status_kb(self.pid(), "VmSize").expect("VmSize of pubwarden")
    }

    pub fn sigterm(&self) {
        sigterm(self.pid());
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_exit(self.child.as_mut().expect("pubwarden was killed"), timeout)
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_child(&mut child);
        }
    }
}

impl Drop for Pubwarden {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "---- pubwarden stderr ({}) ----\n{}\n---- end of pubwarden stderr ----",
                self.stderr_path.display(),
                self.logs()
            );
        }
    }
}

/// Runs `pubwarden <args>` to completion (bounded by 20 s): exit code, stdout, stderr.
pub fn run_pubwarden(args: &[&str]) -> (Option<i32>, String, String) {
    let dir = scratch_dir("pubwarden-cli");
    let out_path = dir.join("stdout");
    let err_path = dir.join("stderr");
    let mut child = Command::new(Pubwarden::bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).expect("create stdout file"))
        .stderr(File::create(&err_path).expect("create stderr file"))
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", Pubwarden::bin()));
    let status = match wait_exit(&mut child, Duration::from_secs(20)) {
        Some(s) => s,
        None => {
            kill_child(&mut child);
            panic!("pubwarden {args:?} did not exit within 20 s");
        }
    };
    let read =
        |p: &Path| String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned();
    (status.code(), read(&out_path), read(&err_path))
}
