//! The load generator: publishers and subscribers speaking raw RESP over tokio.
//!
//! All tasks run on one current_thread runtime (inside a `LocalSet`), so shared
//! counters are plain `Cell`s, updated once per read or write batch.

use crate::payload::{self, PublishEncoder, SeqTracker};
use crate::resp::{Push, Reply, encode_command, parse_push, parse_reply};
use crate::sys;
use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use std::cell::{Cell, RefCell};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// Counters shared by all tasks of one scenario run.
#[derive(Default)]
pub struct Shared {
    /// PUBLISH commands written.
    pub sent: Cell<u64>,
    /// PUBLISH replies received.
    pub acked: Cell<u64>,
    /// Sum of PUBLISH integer replies (receivers reported by Redis).
    pub receivers: Cell<u64>,
    /// Error replies to PUBLISH.
    pub publish_errors: Cell<u64>,
    /// Deliveries counted by all subscribers.
    pub delivered: Cell<u64>,
    /// Subscribers whose subscriptions are all confirmed.
    pub ready: Cell<u64>,
    /// Set by the orchestrator to end publishing.
    pub stop: Cell<bool>,
    /// Flow control: subscribers per message (0: none) and allowed backlog.
    pub fanout: u64,
    pub lag_limit: u64,
    waiting: Cell<bool>,
    wake: Notify,
}

impl Shared {
    pub fn new(fanout: u64, lag_limit: u64) -> Self {
        Self {
            fanout,
            lag_limit,
            ..Default::default()
        }
    }

    fn backlog(&self) -> u64 {
        (self.sent.get() * self.fanout).saturating_sub(self.delivered.get())
    }
}

pub async fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .with_context(|| format!("connect to {addr} timed out"))?
        .with_context(|| format!("connect to {addr}"))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Reads once and consumes all complete replies; returns replies consumed.
async fn read_replies(
    s: &mut TcpStream,
    buf: &mut [u8],
    fill: &mut usize,
    sh: &Shared,
) -> Result<usize> {
    let n = s.read(&mut buf[*fill..]).await?;
    if n == 0 {
        bail!("connection closed by peer while waiting for PUBLISH replies");
    }
    *fill += n;
    let (mut pos, mut count, mut receivers, mut errors) = (0, 0usize, 0u64, 0u64);
    while let Some((r, used)) = parse_reply(&buf[pos..*fill])? {
        pos += used;
        count += 1;
        match r {
            Reply::Int(v) => receivers += u64::try_from(v).unwrap_or(0),
            Reply::Error => errors += 1,
            Reply::Status => bail!("unexpected status reply to PUBLISH"),
        }
    }
    buf.copy_within(pos..*fill, 0);
    *fill -= pos;
    sh.acked.set(sh.acked.get() + count as u64);
    sh.receivers.set(sh.receivers.get() + receivers);
    sh.publish_errors.set(sh.publish_errors.get() + errors);
    Ok(count)
}

#[derive(Debug, Clone, Copy)]
pub struct PubOpts {
    pub batch: usize,
    pub max_outstanding: usize,
    pub payload_size: usize,
    /// `PUBLISH` or `SPUBLISH`.
    pub command: &'static [u8],
}

/// Publishes pipelined batches until `shared.stop`, then waits for all replies.
pub async fn publisher(
    addr: SocketAddr,
    id: u32,
    channels: Rc<Vec<String>>,
    o: PubOpts,
    sh: Rc<Shared>,
    start: Instant,
) -> Result<()> {
    let mut s = connect(addr).await?;
    let mut enc = PublishEncoder::with_command(o.command, &channels, o.payload_size, id);
    let nchan = enc.channels();
    let mut wbuf = Vec::with_capacity(o.batch * enc.frame_len());
    let mut rbuf = vec![0u8; 64 * 1024];
    let mut fill = 0usize;
    let mut outstanding = 0usize;
    let mut chan = id as usize % nchan;
    while !sh.stop.get() {
        if outstanding + o.batch <= o.max_outstanding {
            if sh.fanout > 0 && sh.backlog() > sh.lag_limit {
                // Subscribers are behind: wait (bounded) instead of growing
                // Redis' output buffers without limit.
                sh.waiting.set(true);
                let _ = tokio::time::timeout(Duration::from_millis(10), sh.wake.notified()).await;
                continue;
            }
            wbuf.clear();
            let ts = start.elapsed().as_nanos() as u64;
            for _ in 0..o.batch {
                enc.push(&mut wbuf, chan, ts);
                chan += 1;
                if chan == nchan {
                    chan = 0;
                }
            }
            s.write_all(&wbuf).await?;
            outstanding += o.batch;
            sh.sent.set(sh.sent.get() + o.batch as u64);
        } else {
            outstanding -= read_replies(&mut s, &mut rbuf, &mut fill, &sh)
                .await?
                .min(outstanding);
        }
    }
    tokio::time::timeout(Duration::from_secs(15), async {
        while outstanding > 0 {
            outstanding -= read_replies(&mut s, &mut rbuf, &mut fill, &sh)
                .await?
                .min(outstanding);
        }
        Ok::<_, anyhow::Error>(())
    })
    .await
    .context("timed out waiting for PUBLISH replies")??;
    Ok(())
}

/// How a subscriber subscribes.
#[derive(Debug, Clone)]
pub enum Subscription {
    /// SUBSCRIBE to each of these channels (one ack each).
    Channels(Rc<Vec<String>>),
    /// PSUBSCRIBE to one pattern (one ack).
    Pattern(String),
    /// SSUBSCRIBE to each of these channels (one ack each; in a cluster they
    /// must share a slot).
    Shard(Rc<Vec<String>>),
}

/// Per-subscriber results, read by the orchestrator after the run.
pub struct SubState {
    pub seq: SeqTracker,
    /// Latency histogram (ns) of deliveries scheduled at or after `record_from_ns`.
    pub hist: Option<Histogram<u64>>,
    pub record_from_ns: u64,
    pub error: Option<String>,
}

impl SubState {
    pub fn new(publishers: usize, channels: usize, latency_from_ns: Option<u64>) -> Result<Self> {
        let hist = match latency_from_ns {
            Some(_) => Some(Histogram::new_with_bounds(1, 60_000_000_000, 3).context("histogram")?),
            None => None,
        };
        Ok(Self {
            seq: SeqTracker::new(publishers, channels),
            hist,
            record_from_ns: latency_from_ns.unwrap_or(0),
            error: None,
        })
    }
}

/// Runs one subscriber until aborted; errors are stored in `state.error`.
pub async fn subscriber(
    addr: SocketAddr,
    sub: Subscription,
    sh: Rc<Shared>,
    state: Rc<RefCell<SubState>>,
    start: Instant,
) {
    if let Err(e) = subscriber_inner(addr, sub, &sh, &state, start).await {
        state.borrow_mut().error = Some(format!("{e:#}"));
    }
}

async fn subscriber_inner(
    addr: SocketAddr,
    sub: Subscription,
    sh: &Shared,
    state: &RefCell<SubState>,
    start: Instant,
) -> Result<()> {
    let mut s = connect(addr).await?;
    let mut cmd = Vec::new();
    let expected_acks = match &sub {
        Subscription::Channels(chs) => {
            let mut args: Vec<&[u8]> = vec![b"SUBSCRIBE"];
            args.extend(chs.iter().map(|c| c.as_bytes()));
            encode_command(&mut cmd, &args);
            chs.len()
        }
        Subscription::Pattern(p) => {
            encode_command(&mut cmd, &[b"PSUBSCRIBE", p.as_bytes()]);
            1
        }
        Subscription::Shard(chs) => {
            let mut args: Vec<&[u8]> = vec![b"SSUBSCRIBE"];
            args.extend(chs.iter().map(|c| c.as_bytes()));
            encode_command(&mut cmd, &args);
            chs.len()
        }
    };
    s.write_all(&cmd).await?;
    let mut acks = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    let mut fill = 0usize;
    loop {
        if fill == buf.len() {
            // One frame larger than the buffer: grow (rare, bounded by MAX_BULK).
            let len = buf.len() * 2;
            buf.resize(len, 0);
        }
        let n = s.read(&mut buf[fill..]).await?;
        if n == 0 {
            bail!("subscriber connection closed by peer");
        }
        fill += n;
        let mut pos = 0;
        let mut msgs = 0u64;
        {
            let mut st = state.borrow_mut();
            let st = &mut *st;
            let now_ns = if st.hist.is_some() {
                start.elapsed().as_nanos() as u64
            } else {
                0
            };
            while let Some((push, used)) = parse_push(&buf[pos..fill])? {
                pos += used;
                match push {
                    Push::Message { payload, .. } => {
                        msgs += 1;
                        match payload::decode(payload) {
                            Some(h) => {
                                st.seq.observe(&h);
                                if let Some(hist) = st.hist.as_mut()
                                    && h.ts_ns >= st.record_from_ns
                                {
                                    hist.saturating_record(now_ns.saturating_sub(h.ts_ns).max(1));
                                }
                            }
                            None => {
                                st.seq.counts.received += 1;
                                st.seq.counts.foreign += 1;
                            }
                        }
                    }
                    Push::SubAck => {
                        acks += 1;
                        if acks == expected_acks {
                            sh.ready.set(sh.ready.get() + 1);
                        }
                    }
                    Push::Error => bail!("error reply on subscriber connection"),
                    Push::Other => {}
                }
            }
        }
        buf.copy_within(pos..fill, 0);
        fill -= pos;
        if msgs > 0 {
            sh.delivered.set(sh.delivered.get() + msgs);
            if sh.waiting.get() && sh.backlog() <= sh.lag_limit / 2 {
                sh.waiting.set(false);
                sh.wake.notify_waiters();
            }
        }
    }
}

/// Result of the fixed-rate (latency) publisher.
#[derive(Debug, Default, Clone, Copy)]
pub struct RatePubResult {
    pub sent: u64,
    pub acked: u64,
    pub receivers: u64,
    pub errors: u64,
    /// Median of (actual write time - scheduled time) after `record_from_ns`.
    pub send_lag_p50_ns: u64,
}

/// Publishes `rate` messages/s for `secs` on a blocking socket from a dedicated
/// thread (tokio's 1 ms timer is too coarse). Each payload carries its
/// *scheduled* send time, so a stalled sender shows up as latency (no
/// coordinated omission). A second thread reads the replies. `command` is
/// `PUBLISH` or `SPUBLISH`.
#[allow(clippy::too_many_arguments)]
pub fn rate_publisher(
    addr: SocketAddr,
    command: &'static [u8],
    channels: Vec<String>,
    payload_size: usize,
    rate: f64,
    secs: f64,
    start: Instant,
    record_from_ns: u64,
) -> Result<RatePubResult> {
    sys::tight_timer_slack();
    let mut lag = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).context("histogram")?;
    let total = (rate * secs).floor() as u64;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connect to {addr}"))?;
    s.set_nodelay(true)?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut r = s.try_clone()?;
    r.set_read_timeout(Some(Duration::from_secs(10)))?;
    let reader = std::thread::spawn(move || -> Result<RatePubResult> {
        let mut res = RatePubResult::default();
        let mut buf = vec![0u8; 64 * 1024];
        let mut fill = 0;
        while res.acked < total {
            let n = r
                .read(&mut buf[fill..])
                .context("reading PUBLISH replies")?;
            if n == 0 {
                bail!("connection closed by peer while waiting for PUBLISH replies");
            }
            fill += n;
            let mut pos = 0;
            while let Some((rep, used)) = parse_reply(&buf[pos..fill])? {
                pos += used;
                res.acked += 1;
                match rep {
                    Reply::Int(v) => res.receivers += u64::try_from(v).unwrap_or(0),
                    Reply::Error => res.errors += 1,
                    Reply::Status => bail!("unexpected status reply to PUBLISH"),
                }
            }
            buf.copy_within(pos..fill, 0);
            fill -= pos;
        }
        Ok(res)
    });
    let mut enc = PublishEncoder::with_command(command, &channels, payload_size, 0);
    let nchan = enc.channels();
    let mut wbuf = Vec::with_capacity(1024 * enc.frame_len());
    let period_ns = 1e9 / rate;
    let t0 = Instant::now();
    let t0_off = t0.duration_since(start).as_nanos() as f64;
    let mut k = 0u64;
    let mut chan = 0usize;
    let write_result = (|| -> Result<()> {
        while k < total {
            let now = t0.elapsed().as_nanos() as f64;
            let due = ((now / period_ns) as u64).saturating_add(1).min(total);
            if due > k {
                let end = due.min(k + 1024);
                wbuf.clear();
                let now_abs = t0_off + now;
                for i in k..end {
                    let sched = (t0_off + i as f64 * period_ns) as u64;
                    enc.push(&mut wbuf, chan, sched);
                    chan = (chan + 1) % nchan;
                    if sched >= record_from_ns {
                        lag.saturating_record((now_abs as u64).saturating_sub(sched).max(1));
                    }
                }
                s.write_all(&wbuf).context("writing PUBLISH")?;
                k = end;
                continue;
            }
            let wait = (k as f64 * period_ns - now).max(0.0);
            std::thread::sleep(Duration::from_nanos(wait as u64));
        }
        Ok(())
    })();
    if let Err(e) = write_result {
        let _ = s.shutdown(std::net::Shutdown::Both);
        let _ = reader.join();
        return Err(e);
    }
    let mut res = match reader.join() {
        Ok(r) => r?,
        Err(_) => bail!("reply reader thread panicked"),
    };
    res.sent = k;
    res.send_lag_p50_ns = lag.value_at_quantile(0.5);
    Ok(res)
}
