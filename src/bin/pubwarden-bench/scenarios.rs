//! One run of one scenario against one target.

use crate::load::{self, PubOpts, Shared, SubState, Subscription};
use crate::payload::{PublishEncoder, SeqCounts};
use crate::resp::{Push, Reply, encode_command, parse_push, parse_reply};
use crate::sys;
use crate::targets::{Kind, Target};
use anyhow::{Context, Result, anyhow, bail};
use hdrhistogram::Histogram;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, spawn_local};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// Pipelined PUBLISH, no subscribers.
    Publish,
    /// Publishers + subscribers using SUBSCRIBE.
    Fanout,
    /// Publishers + subscribers using PSUBSCRIBE.
    FanoutPsub,
    /// Fixed offered rate (msgs/s), latency from scheduled send time.
    Latency(u64),
    /// Many idle subscribers: time to subscribe all, proxy RSS per connection.
    ConnScale,
    /// Pipelined SPUBLISH, no subscribers.
    SPublish,
    /// Publishers (SPUBLISH) + subscribers using SSUBSCRIBE.
    SFanout,
    /// Like `Latency` with SPUBLISH and SSUBSCRIBE.
    SLatency(u64),
}

impl Scenario {
    pub fn id(&self) -> String {
        match self {
            Scenario::Publish => "publish".into(),
            Scenario::Fanout => "fanout".into(),
            Scenario::FanoutPsub => "fanout-psub".into(),
            Scenario::Latency(r) if r % 1000 == 0 => format!("latency-{}k", r / 1000),
            Scenario::Latency(r) => format!("latency-{r}"),
            Scenario::ConnScale => "connscale".into(),
            Scenario::SPublish => "spublish".into(),
            Scenario::SFanout => "sfanout".into(),
            Scenario::SLatency(r) if r % 1000 == 0 => format!("slatency-{}k", r / 1000),
            Scenario::SLatency(r) => format!("slatency-{r}"),
        }
    }

    /// Sharded pub/sub (SPUBLISH / SSUBSCRIBE).
    pub fn sharded(&self) -> bool {
        matches!(
            self,
            Scenario::SPublish | Scenario::SFanout | Scenario::SLatency(_)
        )
    }

    fn publish_command(&self) -> &'static [u8] {
        if self.sharded() {
            b"SPUBLISH"
        } else {
            b"PUBLISH"
        }
    }

    pub fn describe(&self, p: &Params) -> String {
        let mut d = self.describe_load(p);
        if p.cluster {
            d.push_str("; cluster: all channels share the hash tag {bench} (one slot, one master)");
        }
        d
    }

    fn describe_load(&self, p: &Params) -> String {
        match self {
            Scenario::SPublish => format!(
                "{} publishers, pipelined SPUBLISH (batch {}, <= {} outstanding), {} B payload, {} channels, no subscribers",
                p.publishers, p.batch, p.max_outstanding, p.payload_size, p.channels
            ),
            Scenario::SFanout => format!(
                "{} publishers (SPUBLISH), {} subscribers each SSUBSCRIBEd to all {} channels, {} B payload",
                p.fanout_publishers, p.subscribers, p.channels, p.payload_size
            ),
            Scenario::SLatency(r) => format!(
                "1 publisher (SPUBLISH) at a fixed {r} msgs/s, {} subscribers SSUBSCRIBEd to all {} channels, \
                 {} B payload; latency from the scheduled send time (corrected for coordinated omission)",
                p.latency_subscribers, p.channels, p.payload_size
            ),
            Scenario::Publish => format!(
                "{} publishers, pipelined PUBLISH (batch {}, <= {} outstanding), {} B payload, {} channels, no subscribers",
                p.publishers, p.batch, p.max_outstanding, p.payload_size, p.channels
            ),
            Scenario::Fanout | Scenario::FanoutPsub => format!(
                "{} publishers, {} subscribers each {} all {} channels, {} B payload",
                p.fanout_publishers,
                p.subscribers,
                if *self == Scenario::Fanout {
                    "SUBSCRIBEd to"
                } else {
                    "PSUBSCRIBEd (one pattern) to"
                },
                p.channels,
                p.payload_size
            ),
            Scenario::Latency(r) => format!(
                "1 publisher at a fixed {r} msgs/s, {} subscribers on all {} channels, {} B payload; \
                 latency from the scheduled send time (corrected for coordinated omission)",
                p.latency_subscribers, p.channels, p.payload_size
            ),
            Scenario::ConnScale => format!(
                "{} subscribers ({} connecting at once), one channel each over {} channels, \
                 then one message per channel; proxies restarted fresh before each run for RSS",
                p.conn_subscribers, p.conn_concurrency, p.channels
            ),
        }
    }

    /// Duration of one run, for the up-front estimate.
    pub fn estimate(&self, p: &Params) -> Duration {
        match self {
            Scenario::ConnScale => Duration::from_millis(800 + p.conn_subscribers as u64 / 10),
            _ => p.warmup + p.duration + Duration::from_millis(250),
        }
    }
}

/// Resolved load parameters.
#[derive(Debug, Clone)]
pub struct Params {
    pub duration: Duration,
    pub warmup: Duration,
    pub payload_size: usize,
    pub channels: usize,
    pub publishers: usize,
    pub fanout_publishers: usize,
    pub subscribers: usize,
    pub batch: usize,
    pub max_outstanding: usize,
    /// Flow-control backlog per subscriber, in messages.
    pub lag_window: u64,
    pub latency_subscribers: usize,
    pub conn_subscribers: usize,
    pub conn_concurrency: usize,
    /// The targets front a Redis Cluster (`--cluster`).
    pub cluster: bool,
}

#[derive(Debug, Clone)]
pub struct Metric {
    pub name: &'static str,
    pub unit: &'static str,
    pub value: f64,
    pub higher_is_better: bool,
}

fn metric(name: &'static str, unit: &'static str, value: f64, higher_is_better: bool) -> Metric {
    Metric {
        name,
        unit,
        value,
        higher_is_better,
    }
}

/// Message accounting for one run. All of lost/duplicated/out_of_order/foreign
/// must be 0.
#[derive(Debug, Clone, Default)]
pub struct Check {
    pub published: u64,
    pub expected: u64,
    pub received: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    pub foreign: u64,
    pub publish_errors: u64,
    pub unacked: u64,
    pub receivers_reported: u64,
}

impl Check {
    pub fn ok(&self) -> bool {
        self.lost == 0
            && self.duplicated == 0
            && self.out_of_order == 0
            && self.foreign == 0
            && self.publish_errors == 0
            && self.unacked == 0
    }

    pub fn add(&mut self, o: &Check) {
        self.published += o.published;
        self.expected += o.expected;
        self.received += o.received;
        self.lost += o.lost;
        self.duplicated += o.duplicated;
        self.out_of_order += o.out_of_order;
        self.foreign += o.foreign;
        self.publish_errors += o.publish_errors;
        self.unacked += o.unacked;
        self.receivers_reported += o.receivers_reported;
    }
}

#[derive(Debug, Clone, Default)]
pub struct RunResult {
    pub metrics: Vec<Metric>,
    pub check: Check,
    /// Problems that did not stop the run (e.g. one subscriber failed).
    pub errors: Vec<String>,
}

/// Aborts the tasks when dropped, so every early return cleans up.
struct Tasks<T>(Vec<JoinHandle<T>>);

impl<T> Drop for Tasks<T> {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}

/// Polls `cond` every millisecond for at most `limit`; true if it became true.
async fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

pub async fn run(
    scn: Scenario,
    target: &Target,
    p: &Params,
    start: Instant,
    tag: &str,
) -> Result<RunResult> {
    match scn {
        Scenario::ConnScale => run_connscale(target, p, tag).await,
        _ => run_pubsub(scn, target, p, start, tag).await,
    }
}

async fn run_pubsub(
    scn: Scenario,
    target: &Target,
    p: &Params,
    start: Instant,
    tag: &str,
) -> Result<RunResult> {
    let addr = target.addr;
    let channels: Rc<Vec<String>> =
        Rc::new((0..p.channels).map(|i| format!("{tag}:{i}")).collect());
    let (npub, nsub, rate) = match scn {
        Scenario::Publish | Scenario::SPublish => (p.publishers, 0, None),
        Scenario::Fanout | Scenario::FanoutPsub | Scenario::SFanout => {
            (p.fanout_publishers, p.subscribers, None)
        }
        Scenario::Latency(r) | Scenario::SLatency(r) => (1, p.latency_subscribers, Some(r)),
        Scenario::ConnScale => bail!("not a pub/sub scenario"),
    };
    let sh = Rc::new(Shared::new(nsub as u64, nsub as u64 * p.lag_window));
    let mut res = RunResult::default();

    // Subscribers first; publishing starts only once all are confirmed.
    let mut states = Vec::with_capacity(nsub);
    let mut subs = Tasks(Vec::with_capacity(nsub));
    for _ in 0..nsub {
        let st = Rc::new(RefCell::new(SubState::new(
            npub,
            p.channels,
            rate.map(|_| u64::MAX),
        )?));
        let sub = if scn == Scenario::FanoutPsub {
            Subscription::Pattern(format!("{tag}:*"))
        } else if scn.sharded() {
            Subscription::Shard(channels.clone())
        } else {
            Subscription::Channels(channels.clone())
        };
        subs.0.push(spawn_local(load::subscriber(
            addr,
            sub,
            sh.clone(),
            st.clone(),
            start,
        )));
        states.push(st);
    }
    let first_error =
        |states: &[Rc<RefCell<SubState>>]| states.iter().find_map(|s| s.borrow().error.clone());
    let ok = wait_for(Duration::from_secs(15), || {
        sh.ready.get() >= nsub as u64 || first_error(&states).is_some()
    })
    .await;
    if let Some(e) = first_error(&states) {
        bail!("subscriber failed: {e}");
    }
    if !ok {
        bail!(
            "only {}/{nsub} subscribers confirmed within 15 s",
            sh.ready.get()
        );
    }

    let (window_secs, published_in_window, delivered_in_window);
    let mut send_lag_p50 = None;
    if let Some(rate) = rate {
        let from = (start.elapsed() + p.warmup).as_nanos() as u64;
        for st in &states {
            st.borrow_mut().record_from_ns = from;
        }
        let secs = (p.warmup + p.duration).as_secs_f64();
        let chans: Vec<String> = channels.as_ref().clone();
        let size = p.payload_size;
        let d0 = sh.delivered.get();
        let command = scn.publish_command();
        let h = tokio::task::spawn_blocking(move || {
            load::rate_publisher(addr, command, chans, size, rate as f64, secs, start, from)
        });
        let r = h
            .await
            .map_err(|e| anyhow!("rate publisher thread failed: {e}"))??;
        sh.sent.set(r.sent);
        sh.acked.set(r.acked);
        sh.receivers.set(r.receivers);
        sh.publish_errors.set(r.errors);
        send_lag_p50 = Some(r.send_lag_p50_ns as f64 / 1000.0);
        window_secs = secs;
        published_in_window = r.acked;
        delivered_in_window = sh.delivered.get() - d0;
    } else {
        let o = PubOpts {
            batch: p.batch,
            max_outstanding: p.max_outstanding,
            payload_size: p.payload_size,
            command: scn.publish_command(),
        };
        let mut pubs = Tasks(
            (0..npub)
                .map(|id| {
                    spawn_local(load::publisher(
                        addr,
                        id as u32,
                        channels.clone(),
                        o,
                        sh.clone(),
                        start,
                    ))
                })
                .collect(),
        );
        tokio::time::sleep(p.warmup).await;
        let (t0, a0, d0) = (Instant::now(), sh.acked.get(), sh.delivered.get());
        tokio::time::sleep(p.duration).await;
        let (t1, a1, d1) = (Instant::now(), sh.acked.get(), sh.delivered.get());
        sh.stop.set(true);
        window_secs = (t1 - t0).as_secs_f64();
        published_in_window = a1 - a0;
        delivered_in_window = d1 - d0;
        for (id, h) in pubs.0.iter_mut().enumerate() {
            match h.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => res.errors.push(format!("publisher {id}: {e:#}")),
                Err(e) => res.errors.push(format!("publisher {id}: task failed: {e}")),
            }
        }
    }

    // Drain: every delivery Redis accepted must arrive.
    if nsub > 0 {
        let target_deliveries = sh.sent.get() * nsub as u64;
        let drained = wait_for(Duration::from_secs(5), || {
            sh.delivered.get() >= target_deliveries || first_error(&states).is_some()
        })
        .await;
        if !drained {
            // Grace period for stragglers before counting them as lost.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    drop(subs);

    // Accounting.
    let mut counts = SeqCounts::default();
    let mut hist: Option<Histogram<u64>> = None;
    for (i, st) in states.iter().enumerate() {
        let st = st.borrow();
        counts.add(&st.seq.counts);
        if let Some(e) = &st.error {
            res.errors.push(format!("subscriber {i}: {e}"));
        }
        if let Some(h) = &st.hist {
            match hist.as_mut() {
                Some(acc) => acc
                    .add(h)
                    .map_err(|e| anyhow!("merging histograms: {e:?}"))?,
                None => hist = Some(h.clone()),
            }
        }
    }
    let sent = sh.sent.get();
    let expected = sent * nsub as u64;
    let unique = counts.received - counts.duplicated;
    res.check = Check {
        published: sent,
        expected,
        received: counts.received,
        lost: expected.saturating_sub(unique),
        duplicated: counts.duplicated,
        out_of_order: counts.out_of_order,
        foreign: counts.foreign + unique.saturating_sub(expected),
        publish_errors: sh.publish_errors.get(),
        unacked: sent - sh.acked.get().min(sent),
        receivers_reported: sh.receivers.get(),
    };
    // In a cluster, PUBLISH counts only the subscribers of the node it ran
    // on: direct and HAProxy put everyone on the owning master, and pubwarden
    // keeps every session of the process on one home master, so the sum must
    // still match. SPUBLISH counts the slot master's shard subscribers: all.
    if sh.receivers.get() != expected {
        res.errors.push(format!(
            "{} replies reported {} receivers in total, expected {expected} ({sent} messages x {nsub} subscribers)",
            String::from_utf8_lossy(scn.publish_command()),
            sh.receivers.get()
        ));
    }

    let pub_rate = published_in_window as f64 / window_secs.max(1e-9);
    let del_rate = delivered_in_window as f64 / window_secs.max(1e-9);
    match scn {
        Scenario::Publish | Scenario::SPublish => {
            res.metrics
                .push(metric("published", "msg/s", pub_rate, true))
        }
        Scenario::Latency(_) | Scenario::SLatency(_) => {
            let h = hist.ok_or_else(|| anyhow!("no latency histogram"))?;
            if h.is_empty() {
                bail!("no latency samples recorded");
            }
            let us = |v: u64| v as f64 / 1000.0;
            res.metrics
                .push(metric("p50", "us", us(h.value_at_quantile(0.5)), false));
            res.metrics
                .push(metric("p99", "us", us(h.value_at_quantile(0.99)), false));
            res.metrics
                .push(metric("p99.9", "us", us(h.value_at_quantile(0.999)), false));
            res.metrics.push(metric("max", "us", us(h.max()), false));
            res.metrics
                .push(metric("delivered", "msg/s", del_rate, true));
            if let Some(l) = send_lag_p50 {
                // Generator-side: how late the sender wrote vs its schedule
                // (already included in the latencies above).
                res.metrics.push(metric("sender lag p50", "us", l, false));
            }
        }
        _ => {
            res.metrics
                .push(metric("published", "msg/s", pub_rate, true));
            res.metrics
                .push(metric("delivered", "msg/s", del_rate, true));
        }
    }
    Ok(res)
}

/// Shared counters of the connection-scale run.
#[derive(Default)]
struct ConnShared {
    ready: Cell<u64>,
    failed: Cell<u64>,
    delivered: Cell<u64>,
    total: u64,
    all_ready_at: Cell<Option<Instant>>,
    first_error: RefCell<Option<String>>,
}

async fn conn_subscriber(
    addr: std::net::SocketAddr,
    channel: String,
    sem: Rc<Semaphore>,
    sh: Rc<ConnShared>,
) {
    let setup = async {
        let _permit = sem
            .acquire()
            .await
            .map_err(|_| anyhow!("semaphore closed"))?;
        let mut s = load::connect(addr).await?;
        let mut cmd = Vec::with_capacity(64);
        encode_command(&mut cmd, &[b"SUBSCRIBE", channel.as_bytes()]);
        s.write_all(&cmd).await?;
        let mut buf = [0u8; 512];
        let mut fill = 0;
        loop {
            if fill == buf.len() {
                bail!("subscribe confirmation too long");
            }
            let n = s.read(&mut buf[fill..]).await?;
            if n == 0 {
                bail!("closed before subscribe confirmation");
            }
            fill += n;
            if let Some((push, used)) = parse_push(&buf[..fill])? {
                if push != Push::SubAck {
                    bail!(
                        "unexpected reply to SUBSCRIBE: {:?}",
                        String::from_utf8_lossy(&buf[..used.min(120)])
                    );
                }
                buf.copy_within(used..fill, 0);
                fill -= used;
                return Ok((s, buf, fill));
            }
        }
    };
    let (mut s, mut buf, mut fill) =
        match tokio::time::timeout(Duration::from_secs(30), setup).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => return conn_failed(&sh, format!("{e:#}")),
            Err(_) => return conn_failed(&sh, "subscribe timed out after 30 s".into()),
        };
    let r = sh.ready.get() + 1;
    sh.ready.set(r);
    if r == sh.total {
        sh.all_ready_at.set(Some(Instant::now()));
    }
    loop {
        let mut pos = 0;
        loop {
            match parse_push(&buf[pos..fill]) {
                Ok(Some((push, used))) => {
                    pos += used;
                    if matches!(push, Push::Message { .. }) {
                        sh.delivered.set(sh.delivered.get() + 1);
                    }
                }
                Ok(None) => break,
                Err(e) => return conn_failed(&sh, e.to_string()),
            }
        }
        buf.copy_within(pos..fill, 0);
        fill -= pos;
        if fill == buf.len() {
            return conn_failed(&sh, "frame larger than 512 B".into());
        }
        match s.read(&mut buf[fill..]).await {
            Ok(0) => return conn_failed(&sh, "closed by peer".into()),
            Ok(n) => fill += n,
            Err(e) => return conn_failed(&sh, e.to_string()),
        }
    }
}

fn conn_failed(sh: &ConnShared, e: String) {
    sh.failed.set(sh.failed.get() + 1);
    let mut fe = sh.first_error.borrow_mut();
    if fe.is_none() {
        *fe = Some(e);
    }
}

async fn run_connscale(target: &Target, p: &Params, tag: &str) -> Result<RunResult> {
    let n = p.conn_subscribers;
    let channels: Vec<String> = (0..p.channels).map(|i| format!("{tag}:{i}")).collect();
    let mut res = RunResult::default();
    // RSS is a proxy figure: measured for proxies (restarted fresh before this
    // run), not for direct Redis.
    let rss = || -> Result<Option<u64>> {
        match target.kind {
            Kind::Redis => Ok(None),
            _ => sys::rss_bytes(target.pid).map(Some),
        }
    };
    let rss_before = rss()?;
    let sh = Rc::new(ConnShared {
        total: n as u64,
        ..Default::default()
    });
    let sem = Rc::new(Semaphore::new(p.conn_concurrency.max(1)));
    let t0 = Instant::now();
    let tasks = Tasks(
        (0..n)
            .map(|i| {
                spawn_local(conn_subscriber(
                    target.addr,
                    channels[i % channels.len()].clone(),
                    sem.clone(),
                    sh.clone(),
                ))
            })
            .collect(),
    );
    let all = wait_for(Duration::from_secs(90), || {
        sh.ready.get() + sh.failed.get() >= n as u64
    })
    .await;
    let sub_secs = match sh.all_ready_at.get() {
        Some(t) => (t - t0).as_secs_f64(),
        None => (Instant::now() - t0).as_secs_f64(),
    };
    if !all || sh.failed.get() > 0 {
        bail!(
            "{} of {n} subscribers ready, {} failed (first error: {})",
            sh.ready.get(),
            sh.failed.get(),
            sh.first_error
                .borrow()
                .clone()
                .unwrap_or_else(|| "timeout".into())
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_idle = rss()?;

    // One message per channel: every subscriber must get exactly one.
    let mut s = load::connect(target.addr).await?;
    let mut enc = PublishEncoder::new(&channels, p.payload_size, 0);
    let mut w = Vec::new();
    for c in 0..channels.len() {
        enc.push(&mut w, c, 0);
    }
    s.write_all(&w).await?;
    let mut buf = vec![0u8; 4096];
    let (mut fill, mut replies, mut receivers) = (0usize, 0usize, 0u64);
    tokio::time::timeout(Duration::from_secs(10), async {
        while replies < channels.len() {
            let k = s.read(&mut buf[fill..]).await?;
            if k == 0 {
                bail!("closed while waiting for PUBLISH replies");
            }
            fill += k;
            let mut pos = 0;
            while let Some((r, used)) = parse_reply(&buf[pos..fill])? {
                pos += used;
                replies += 1;
                match r {
                    Reply::Int(v) => receivers += u64::try_from(v).unwrap_or(0),
                    _ => bail!("unexpected reply to PUBLISH"),
                }
            }
            buf.copy_within(pos..fill, 0);
            fill -= pos;
        }
        Ok(())
    })
    .await
    .context("timed out waiting for PUBLISH replies")??;
    let expected = n as u64;
    wait_for(Duration::from_secs(10), || sh.delivered.get() >= expected).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let rss_after = rss()?;
    let delivered = sh.delivered.get();
    drop(tasks);

    res.check = Check {
        published: channels.len() as u64,
        expected,
        received: delivered,
        lost: expected.saturating_sub(delivered),
        duplicated: delivered.saturating_sub(expected),
        receivers_reported: receivers,
        ..Default::default()
    };
    if receivers != expected {
        res.errors.push(format!(
            "PUBLISH replies reported {receivers} receivers, expected {expected}"
        ));
    }
    res.metrics
        .push(metric("subscribe all", "ms", sub_secs * 1000.0, false));
    if let (Some(before), Some(idle), Some(after)) = (rss_before, rss_idle, rss_after) {
        let per_conn = |v: u64| (v as f64 - before as f64) / n as f64 / 1024.0;
        res.metrics
            .push(metric("proxy RSS/conn idle", "KiB", per_conn(idle), false));
        res.metrics.push(metric(
            "proxy RSS/conn after msg",
            "KiB",
            per_conn(after),
            false,
        ));
        res.metrics.push(metric(
            "proxy RSS total",
            "MiB",
            after as f64 / 1048576.0,
            false,
        ));
    }
    Ok(res)
}
