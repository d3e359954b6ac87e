//! Rate limits shared by every pubwarden in front of the same Redis
//! (`scope: global`), kept in Redis with a GCRA script.
//!
//! Asking Redis for every message would put a round trip on the hot path.
//! Instead each pubwarden leases a few milliseconds' worth of tokens at a
//! time (`global_rate_limits.lease`) and spends them locally; a lease is
//! renewed in the background when half of it is used. Redis's clock (`TIME`
//! inside the script) is the only clock, so instances need no clock sync.
//!
//! Accuracy: tokens are only ever granted out of the global budget, so the
//! total accepted over any interval T is at most `rate x T + burst` plus what
//! instances hold leased and unspent at the interval's start: at most
//! 1.5 leases per instance and key (a lease, and half of one prefetched).
//! Leased tokens unused for a second are dropped, so an instance that stops
//! publishing gives its share back within a second.
//!
//! When the store cannot be reached (or answers slower than
//! `store_timeout`), a rule falls back as configured: `fail_open` enforces
//! the rule's local share (`messages_per_second / instances`) in this
//! process, `fail_closed` refuses its publishes. Both are counted.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::config::Upstream;
use crate::metrics::Metrics;
use crate::resp::value::Value;
use crate::upstream::{self, Replies};

/// The GCRA spend, atomic in Redis. KEYS[1]: the key's theoretical arrival
/// time (µs, Redis's clock). ARGV: µs per token, µs of burst, tokens wanted.
/// Returns {granted, µs until one more token fits}.
const SCRIPT: &str = r"
local interval = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local room = math.floor((now + capacity - tat) / interval)
if room < 1 then
  return {0, tat + interval - now - capacity}
end
local grant = math.min(want, room)
tat = tat + grant * interval
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
return {grant, 0}
";

/// How long leased tokens stay spendable.
const LEASE_LIFETIME: Duration = Duration::from_secs(1);
/// Requests sent to the store in one write.
const MAX_BATCH: usize = 256;

/// `global_rate_limits` in the settings.
#[derive(Debug, Clone, PartialEq)]
pub struct GlobalSettings {
    /// Tokens leased at a time are this long's worth of the rule's rate.
    pub lease: Duration,
    /// A lease not answered within this is a store failure.
    pub store_timeout: Duration,
    /// The Redis holding the shared budgets; `None`: the upstream Redis.
    pub store: Option<Upstream>,
}

impl Default for GlobalSettings {
    fn default() -> Self {
        Self {
            lease: Duration::from_millis(5),
            store_timeout: Duration::from_millis(250),
            store: None,
        }
    }
}

/// What a global rule decides for one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// A leased token was spent.
    Token,
    /// A lease is on its way: ask again shortly.
    Wait,
    /// The global budget is spent for this long.
    Denied(Duration),
    /// The store is unreachable: fall back.
    StoreDown,
}

#[derive(Debug, Default)]
struct LeaseState {
    tokens: u64,
    expires_ns: u64,
    pending: bool,
    requested_ns: u64,
    denied_until_ns: u64,
}

/// One key's leased tokens.
#[derive(Debug, Default)]
pub struct Lease {
    state: Mutex<LeaseState>,
}

struct Request {
    lease: Arc<Lease>,
    key: Vec<u8>,
    interval_us: u64,
    capacity_us: u64,
    want: u64,
}

/// The process's connection to the shared store, and the lease clock.
pub struct GlobalLimits {
    settings: GlobalSettings,
    epoch: Instant,
    requests: mpsc::UnboundedSender<Request>,
    down: AtomicBool,
    down_since_ns: AtomicU64,
}

impl std::fmt::Debug for GlobalLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GlobalLimits")
            .field("down", &self.down.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl GlobalLimits {
    /// Starts the store task. `upstream`: used when no separate store is set.
    pub fn start(settings: GlobalSettings, upstream: Upstream, metrics: Arc<Metrics>) -> Arc<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let store = settings.store.clone().unwrap_or(upstream);
        let me = Arc::new(Self {
            settings,
            epoch: Instant::now(),
            requests: tx,
            down: AtomicBool::new(false),
            down_since_ns: AtomicU64::new(0),
        });
        tokio::spawn(serve(Arc::downgrade(&me), store, rx, metrics));
        me
    }

    fn now_ns(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    pub fn store_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    fn set_down(&self, down: bool, metrics: &Metrics, why: &str) {
        if self.down.swap(down, Ordering::Relaxed) != down {
            metrics.global_store_up(!down);
            if down {
                self.down_since_ns
                    .store(self.now_ns(Instant::now()), Ordering::Relaxed);
                tracing::warn!(
                    error = why,
                    "the shared rate-limit store is unreachable; global rate limits fall back to their on_store_failure setting"
                );
            } else {
                tracing::info!("the shared rate-limit store is reachable again");
            }
        }
    }

    /// Spends one token of `lease` for the rule (`rate`/s, `burst`), asking
    /// the store for more when the lease runs low.
    pub fn take(
        &self,
        lease: &Arc<Lease>,
        redis_key: impl FnOnce() -> Vec<u8>,
        rate: u64,
        burst: u64,
        now: Instant,
    ) -> Take {
        let now_ns = self.now_ns(now);
        let Ok(mut st) = lease.state.lock() else {
            return Take::StoreDown;
        };
        if st.expires_ns <= now_ns {
            st.tokens = 0;
        }
        let want = lease_size(rate, burst, self.settings.lease);
        if st.tokens > 0 {
            st.tokens -= 1;
            if st.tokens < want.div_ceil(2) && !st.pending && !self.store_down() {
                self.request(lease, &mut st, redis_key(), rate, burst, want, now_ns);
            }
            return Take::Token;
        }
        if st.denied_until_ns > now_ns {
            return Take::Denied(Duration::from_nanos(st.denied_until_ns - now_ns));
        }
        if self.store_down() {
            // Probe now and then, so recovery is noticed.
            if !st.pending && now_ns.saturating_sub(st.requested_ns) > 1_000_000_000 {
                self.request(lease, &mut st, redis_key(), rate, burst, want, now_ns);
            }
            return Take::StoreDown;
        }
        if st.pending {
            if now_ns.saturating_sub(st.requested_ns)
                > self.settings.store_timeout.as_nanos() as u64
            {
                return Take::StoreDown;
            }
            return Take::Wait;
        }
        self.request(lease, &mut st, redis_key(), rate, burst, want, now_ns);
        Take::Wait
    }

    #[allow(clippy::too_many_arguments)]
    fn request(
        &self,
        lease: &Arc<Lease>,
        st: &mut LeaseState,
        key: Vec<u8>,
        rate: u64,
        burst: u64,
        want: u64,
        now_ns: u64,
    ) {
        let interval_us = (1_000_000 / rate.max(1)).max(1);
        let sent = self.requests.send(Request {
            lease: lease.clone(),
            key,
            interval_us,
            capacity_us: interval_us.saturating_mul(burst.max(1)),
            want,
        });
        if sent.is_ok() {
            st.pending = true;
            st.requested_ns = now_ns;
        }
    }
}

/// Tokens per lease: `lease` worth of `rate`, at least one, at most the burst.
fn lease_size(rate: u64, burst: u64, lease: Duration) -> u64 {
    let n = (u128::from(rate) * lease.as_micros()).div_ceil(1_000_000) as u64;
    n.clamp(1, burst.max(1))
}

/// The store task: one connection, requests pipelined in batches.
async fn serve(
    limits: std::sync::Weak<GlobalLimits>,
    store: Upstream,
    mut rx: mpsc::UnboundedReceiver<Request>,
    metrics: Arc<Metrics>,
) {
    let mut conn: Option<(upstream::Stream, Replies)> = None;
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        let down = limits.upgrade().is_some_and(|l| l.store_down());
        // While the store is down, probe it every second even if no publish
        // asks, so recovery (and the store_up gauge) does not wait for one.
        let received = if down {
            tokio::select! {
                n = rx.recv_many(&mut batch, MAX_BATCH) => n,
                () = tokio::time::sleep(Duration::from_secs(1)) => {
                    let Some(limits) = limits.upgrade() else { return };
                    if let Ok(Ok(mut s)) = tokio::time::timeout(store.connect_timeout, upstream::connect(&store)).await {
                        let mut replies = Replies::new(1024);
                        if let Ok(Ok(Value::Simple(_))) = tokio::time::timeout(
                            limits.settings.store_timeout.max(Duration::from_millis(50)),
                            upstream::request(&mut s, &mut replies, &[b"PING"]),
                        )
                        .await
                        {
                            conn = Some((s, replies));
                            limits.set_down(false, &metrics, "");
                        }
                    }
                    continue;
                }
            }
        } else {
            rx.recv_many(&mut batch, MAX_BATCH).await
        };
        if received == 0 {
            return;
        }
        let Some(limits) = limits.upgrade() else {
            return;
        };
        if conn.is_none() {
            match tokio::time::timeout(
                limits.settings.store_timeout.max(store.connect_timeout),
                upstream::connect(&store),
            )
            .await
            {
                Ok(Ok(s)) => conn = Some((s, Replies::new(1024 * 1024))),
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "cannot reach the shared rate-limit store");
                }
                Err(_) => tracing::debug!("connecting to the shared rate-limit store timed out"),
            }
        }
        let outcome = match conn.as_mut() {
            Some((stream, replies)) => tokio::time::timeout(
                limits.settings.store_timeout.max(Duration::from_millis(50)),
                exchange(stream, replies, &batch),
            )
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "no answer within {} ms",
                    limits.settings.store_timeout.as_millis()
                ))
            }),
            None => Err(format!("cannot connect to {}", store.describe())),
        };
        let now_ns = limits.now_ns(Instant::now());
        match outcome {
            Ok(answers) => {
                limits.set_down(false, &metrics, "");
                for (req, (granted, wait_us)) in batch.drain(..).zip(answers) {
                    metrics.global_store_request(granted > 0);
                    if let Ok(mut st) = req.lease.state.lock() {
                        st.pending = false;
                        if st.expires_ns <= now_ns {
                            st.tokens = 0;
                        }
                        st.tokens += granted;
                        st.expires_ns = now_ns + LEASE_LIFETIME.as_nanos() as u64;
                        if granted == 0 {
                            st.denied_until_ns = now_ns + wait_us.max(1) * 1000;
                        }
                    }
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "shared rate-limit store request failed");
                conn = None;
                limits.set_down(true, &metrics, &e);
                for req in batch.drain(..) {
                    metrics.global_store_error();
                    if let Ok(mut st) = req.lease.state.lock() {
                        st.pending = false;
                    }
                }
            }
        }
    }
}

/// Sends a batch of EVALs in one write and reads their answers in order.
async fn exchange(
    stream: &mut upstream::Stream,
    replies: &mut Replies,
    batch: &[Request],
) -> Result<Vec<(u64, u64)>, String> {
    use tokio::io::AsyncWriteExt;
    let mut out = Vec::with_capacity(batch.len() * (SCRIPT.len() + 64));
    for r in batch {
        let (interval, capacity, want) = (
            r.interval_us.to_string(),
            r.capacity_us.to_string(),
            r.want.to_string(),
        );
        out.extend(crate::resp::encode_command(&[
            b"EVAL",
            SCRIPT.as_bytes(),
            b"1",
            &r.key,
            interval.as_bytes(),
            capacity.as_bytes(),
            want.as_bytes(),
        ]));
    }
    stream.write_all(&out).await.map_err(|e| e.to_string())?;
    let mut answers = Vec::with_capacity(batch.len());
    for _ in batch {
        match replies.next(stream).await? {
            Value::Array(items) if items.len() == 2 => {
                let granted = items[0].as_int().unwrap_or(0).max(0) as u64;
                let wait = items[1].as_int().unwrap_or(0).max(0) as u64;
                answers.push((granted, wait));
            }
            Value::Error(e) => return Err(String::from_utf8_lossy(&e).into_owned()),
            other => return Err(format!("unexpected answer {other:?}")),
        }
    }
    Ok(answers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_sizes() {
        assert_eq!(lease_size(1000, 1000, Duration::from_millis(5)), 5);
        assert_eq!(lease_size(10, 10, Duration::from_millis(5)), 1);
        assert_eq!(lease_size(1_000_000, 100, Duration::from_millis(5)), 100);
    }
}
