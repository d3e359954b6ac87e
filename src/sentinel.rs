//! `upstream.mode: sentinel`: the master is found through Redis Sentinel
//! and followed across failovers.
//!
//! Sentinels are asked for the master's address (`SENTINEL
//! get-master-addr-by-name`), the answer is checked on the server itself
//! (`ROLE` must say `master`: a Sentinel can be partitioned and stale), and
//! the address is published in a [`Target`] that every new upstream
//! connection reads. Failovers are learnt from Sentinel's `+switch-master`
//! messages, and, because those are pub/sub and get lost with a connection,
//! from a re-check every `check_interval` as well. When the master changes,
//! established relay connections are told through the target's epoch and
//! then follow the upstream-failure policy: closed (Redis's own behaviour on
//! failover), or re-subscribed on the new master where configured.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::config::Upstream;
use crate::config::secret::Secret;
use crate::metrics::Metrics;
use crate::resp::value::Value;
use crate::upstream::{self, Replies};

/// `upstream.sentinel`.
#[derive(Debug, Clone, PartialEq)]
pub struct SentinelSettings {
    pub master_name: String,
    /// `host:port` of each Sentinel, asked in order.
    pub addresses: Vec<String>,
    /// Credentials for the Sentinels themselves (their `requirepass`/ACL).
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// TLS to the Sentinels (`upstream.sentinel.tls`, same keys as `upstream.tls`).
    pub tls: Option<crate::tls::UpstreamTls>,
    /// How often the master is re-checked even without a `+switch-master`.
    pub check_interval: Duration,
}

/// Where upstream connections go now: fixed (`upstream.address`) or the
/// master Sentinel names, swapped on failover. Shared by every clone of the
/// settings; compares equal to any other (it is state, not a setting).
#[derive(Clone)]
pub struct Target {
    current: Arc<ArcSwap<Option<String>>>,
    epoch: Arc<watch::Sender<u64>>,
}

impl Default for Target {
    fn default() -> Self {
        Self {
            current: Arc::new(ArcSwap::from_pointee(None)),
            epoch: Arc::new(watch::channel(0).0),
        }
    }
}

impl PartialEq for Target {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Target({:?})", self.current.load())
    }
}

impl Target {
    /// The discovered master, if any.
    pub fn current(&self) -> Option<String> {
        (**self.current.load()).clone()
    }

    /// Points new connections at `address` and tells established ones.
    pub fn switch(&self, address: String) {
        self.current.store(Arc::new(Some(address)));
        self.epoch.send_modify(|e| *e += 1);
    }

    /// Changes on every switch.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.epoch.subscribe()
    }
}

/// An `Upstream` for talking to one Sentinel: its address, credentials and TLS.
fn sentinel_upstream(up: &Upstream, s: &SentinelSettings, address: &str) -> Upstream {
    let mut u = up.clone();
    u.address = address.to_string();
    u.username.clone_from(&s.username);
    u.password.clone_from(&s.password);
    u.tls.clone_from(&s.tls);
    u.sentinel = None;
    u.target = Target::default();
    u
}

/// Asks one Sentinel where the master is.
async fn ask(up: &Upstream, s: &SentinelSettings, sentinel: &str) -> Result<String, String> {
    let conn = sentinel_upstream(up, s, sentinel);
    let mut stream = upstream::connect(&conn).await.map_err(|e| e.to_string())?;
    let mut replies = Replies::new(64 * 1024);
    let reply = tokio::time::timeout(
        up.connect_timeout,
        upstream::request(
            &mut stream,
            &mut replies,
            &[
                b"SENTINEL",
                b"get-master-addr-by-name",
                s.master_name.as_bytes(),
            ],
        ),
    )
    .await
    .map_err(|_| "no answer".to_string())??;
    match reply {
        Value::Array(items) if items.len() == 2 => {
            let host = items[0].as_bytes().ok_or("malformed answer")?;
            let port = items[1].as_bytes().ok_or("malformed answer")?;
            let host = String::from_utf8_lossy(host);
            let port = String::from_utf8_lossy(port);
            Ok(if host.contains(':') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            })
        }
        Value::Null | Value::Array(_) => {
            Err(format!("does not know a master named `{}`", s.master_name))
        }
        Value::Error(e) => Err(String::from_utf8_lossy(&e).into_owned()),
        _ => Err("malformed answer".into()),
    }
}

/// Checks that `address` is a master (`ROLE`), with pubwarden's Redis
/// credentials and TLS.
async fn verify(up: &Upstream, address: &str) -> Result<(), String> {
    let mut conn = up.clone();
    conn.address = address.to_string();
    conn.sentinel = None;
    conn.target = Target::default();
    let mut stream = upstream::connect(&conn).await.map_err(|e| e.to_string())?;
    let mut replies = Replies::new(64 * 1024);
    let reply = tokio::time::timeout(
        up.connect_timeout,
        upstream::request(&mut stream, &mut replies, &[b"ROLE"]),
    )
    .await
    .map_err(|_| "no answer to ROLE".to_string())??;
    let role = reply
        .as_array()
        .and_then(|items| items.first())
        .and_then(Value::as_bytes)
        .map(|r| String::from_utf8_lossy(r).into_owned());
    match role.as_deref() {
        Some("master") => Ok(()),
        Some(other) => Err(format!("ROLE says `{other}`, not master")),
        None => match reply {
            Value::Error(e) => Err(String::from_utf8_lossy(&e).into_owned()),
            _ => Err("ROLE answer not understood".into()),
        },
    }
}

/// The master every reachable Sentinel agrees on first, verified.
async fn discover(up: &Upstream, s: &SentinelSettings) -> Result<String, String> {
    let mut problems = Vec::new();
    for sentinel in &s.addresses {
        match ask(up, s, sentinel).await {
            Ok(addr) => match verify(up, &addr).await {
                Ok(()) => return Ok(addr),
                Err(e) => problems.push(format!("{sentinel} names {addr}, but {e}")),
            },
            Err(e) => problems.push(format!("{sentinel}: {e}")),
        }
    }
    Err(problems.join("; "))
}

/// Subscribes to `+switch-master` on the first Sentinel that accepts, and
/// forwards the new addresses for our master until the connection ends.
async fn listen(up: Upstream, s: SentinelSettings, events: tokio::sync::mpsc::Sender<String>) {
    loop {
        for sentinel in &s.addresses {
            let conn = sentinel_upstream(&up, &s, sentinel);
            let Ok(mut stream) = upstream::connect(&conn).await else {
                continue;
            };
            let mut replies = Replies::new(64 * 1024);
            if upstream::request(
                &mut stream,
                &mut replies,
                &[b"SUBSCRIBE", b"+switch-master"],
            )
            .await
            .is_err()
            {
                continue;
            }
            tracing::debug!(%sentinel, "listening for +switch-master");
            // Until the connection dies: then the next Sentinel.
            while let Ok(msg) = replies.next(&mut stream).await {
                let Some(items) = msg.as_array() else {
                    continue;
                };
                let Some(payload) = items.get(2).and_then(Value::as_bytes) else {
                    continue;
                };
                // "<name> <old-ip> <old-port> <new-ip> <new-port>"
                let text = String::from_utf8_lossy(payload);
                let parts: Vec<&str> = text.split_whitespace().collect();
                if let [name, _, _, ip, port] = parts[..]
                    && name == s.master_name
                {
                    let addr = if ip.contains(':') {
                        format!("[{ip}]:{port}")
                    } else {
                        format!("{ip}:{port}")
                    };
                    if events.send(addr).await.is_err() {
                        return;
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Finds the master and follows it for ever.
pub async fn follow(up: Upstream, metrics: Arc<Metrics>) {
    let Some(s) = up.sentinel.clone() else {
        return;
    };
    let (tx, mut events) = tokio::sync::mpsc::channel(16);
    let listener = tokio::spawn(listen(up.clone(), s.clone(), tx));
    let _abort = AbortOnDrop(listener);
    let mut tick = tokio::time::interval(s.check_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Since when the master in use has been failing its checks.
    let mut failing_since: Option<Instant> = None;
    // The last discovery problem, logged once rather than every check.
    let mut last_error = String::new();
    loop {
        let trigger = tokio::select! {
            _ = tick.tick() => "check",
            Some(addr) = events.recv() => {
                tracing::info!(master = %s.master_name, new = %addr, "Sentinel announced +switch-master");
                failing_since.get_or_insert_with(Instant::now);
                "+switch-master"
            }
        };
        let current = up.target.current();
        // A healthy current master needs no Sentinel round trip... except
        // that a demoted master answers ROLE with `slave`, which is exactly
        // what verify() checks.
        if trigger == "check"
            && let Some(addr) = &current
            && verify(&up, addr).await.is_ok()
        {
            failing_since = None;
            continue;
        }
        if current.is_some() {
            failing_since.get_or_insert_with(Instant::now);
        }
        match discover(&up, &s).await {
            Ok(addr) if Some(&addr) != current.as_ref() => {
                let took = failing_since.take().map(|t| t.elapsed());
                match &current {
                    Some(old) => {
                        tracing::warn!(master = %s.master_name, %old, new = %addr, follow_ms = took.map_or(0, |d| d.as_millis() as u64), trigger, "master changed; new connections go to the new master");
                        metrics.sentinel_failover(took.unwrap_or_default());
                    }
                    None => {
                        tracing::info!(master = %s.master_name, address = %addr, "master discovered through Sentinel");
                    }
                }
                metrics.sentinel_master(&s.master_name, &addr, current.as_deref());
                up.target.switch(addr);
                last_error.clear();
            }
            Ok(_) => {
                failing_since = None;
                last_error.clear();
            }
            Err(e) => {
                if e != last_error {
                    tracing::warn!(master = %s.master_name, error = %e, "cannot find a verified master through Sentinel");
                    last_error = e;
                }
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
