//! What one client connection counts.
//!
//! The relay calls in at a few points of its loop; per delivery the work is
//! a byte compare against the channel cache and two integer adds. Everything
//! shared (atomics, histograms) is touched once per read batch in
//! [`ConnMetrics::end_batch`], or once per command reply.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use prometheus_client::metrics::counter::Counter;

use super::groups::ChannelCache;
use super::{CommandResult, Metrics, PublishResult, UserLabel, command_index};
use crate::command::{Command, Kind, SubKind};
use crate::resp::frame::Frame;
use crate::resp::request::Args;
use crate::session::{DeliveryKind, Session, SubscriptionObserver};

/// Counts of one channel group not yet added to the shared counters.
#[derive(Debug, Default, Clone, Copy)]
struct GroupLocal {
    deliveries: [u64; 3],
    delivery_bytes: [u64; 3],
    publishes: [u64; 2],
    publish_bytes: u64,
    unheard: u64,
}

/// A command relayed to Redis whose reply has not ended yet.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    /// The session's queue position (see [`Session::enqueued`]).
    seq: u64,
    command: u16,
    sent: Instant,
    /// The channel group of a publish.
    publish_group: Option<u16>,
}

/// Per-connection metric state. `None` in the relay when metrics are off.
#[derive(Debug)]
pub struct ConnMetrics {
    m: Arc<Metrics>,
    cache: ChannelCache,
    /// Indexed by group; allocated on the first publish or delivery.
    local: Vec<GroupLocal>,
    /// Bit `g` set: `local[g]` has counts to flush.
    dirty: u64,
    inflight: VecDeque<InFlight>,
    completed: u64,
    /// When the current read batch arrived.
    now: Instant,
    /// Deliveries arrived in this batch.
    delivered: bool,
    /// Arrival of the oldest deliveries not yet fully written to the client.
    unwritten_since: Option<Instant>,
    /// This connection's share of `pubwarden_client_output_buffered_bytes`.
    buffered: i64,
    /// Publish counters of an authenticated user other than `default`.
    user_publishes: Option<Box<[[Counter; 4]]>>,
    /// No channel groups and no channel labels: every channel counts under
    /// group 0 (`other`), so deliveries skip the channel entirely.
    one_group: bool,
    /// This batch's deliveries and payload bytes by kind, in one-group mode.
    batch_deliveries: [u64; 3],
    batch_delivery_bytes: [u64; 3],
}

impl ConnMetrics {
    pub fn new(m: Arc<Metrics>) -> Self {
        let one_group = m_one_group(&m);
        Self {
            m,
            cache: ChannelCache::default(),
            local: Vec::new(),
            dirty: 0,
            inflight: VecDeque::new(),
            completed: 0,
            now: Instant::now(),
            delivered: false,
            unwritten_since: None,
            buffered: 0,
            user_publishes: None,
            one_group,
            batch_deliveries: [0; 3],
            batch_delivery_bytes: [0; 3],
        }
    }

    /// The session's subscription changes move the per-group gauges.
    pub fn subscription_observer(&self) -> Box<dyn SubscriptionObserver> {
        Box::new(SubscriptionGauges {
            counts: vec![[0; 3]; self.m.groups().len()],
            m: self.m.clone(),
        })
    }

    /// The session authenticated as `user`: its publishes carry that label.
    pub fn set_user(&mut self, user: &UserLabel) {
        self.flush();
        self.user_publishes =
            (user.as_str() != super::DEFAULT_USER).then(|| self.m.publish_handles(user));
    }

    /// A read batch starts: one clock read serves every frame in it.
    #[inline]
    pub fn begin_batch(&mut self) {
        self.now = Instant::now();
        self.delivered = false;
    }

    #[inline]
    fn local(&mut self, g: usize) -> &mut GroupLocal {
        if self.local.is_empty() {
            self.local = vec![GroupLocal::default(); self.m.groups().len()];
        }
        // Groups are capped below 64 so the bit always exists.
        self.dirty |= 1 << (g & 63);
        &mut self.local[g]
    }

    /// A request was queued at position `seq` of the session.
    #[inline]
    pub fn request(&mut self, seq: u64, cmd: &Command, args: &Args<'_>) {
        let mut publish_group = None;
        if matches!(cmd.kind, Kind::Publish | Kind::SPublish)
            && let (Some(channel), Some(payload)) = (args.get(1), args.get(2))
        {
            let slot = self
                .cache
                .get(channel, self.m.groups(), self.m.channel_labels());
            slot.publishes += 1;
            let g = slot.group;
            self.local(g).publish_bytes += payload.len() as u64;
            publish_group = Some(g as u16);
        }
        self.inflight.push_back(InFlight {
            seq,
            command: command_index(cmd.name) as u16,
            sent: self.now,
            publish_group,
        });
    }

    /// A delivery frame from Redis.
    #[inline]
    pub fn delivery(&mut self, kind: DeliveryKind, f: &Frame, buf: &[u8]) {
        let (channel_at, payload_at) = match kind {
            DeliveryKind::PMessage => (2, 3),
            DeliveryKind::Message | DeliveryKind::SMessage => (1, 2),
        };
        if self.one_group {
            // The common default: two adds, moved into the group once per batch.
            let k = kind as usize;
            self.batch_deliveries[k] += 1;
            self.batch_delivery_bytes[k] +=
                f.elem(payload_at).map_or(0, |e| e.end - e.start) as u64;
            self.delivered = true;
            return;
        }
        let channel = f.str_elem(buf, channel_at).unwrap_or_default();
        let payload = f.elem(payload_at).map_or(0, |e| e.end - e.start) as u64;
        let slot = self
            .cache
            .get(channel, self.m.groups(), self.m.channel_labels());
        slot.deliveries += 1;
        let g = slot.group;
        let k = kind as usize;
        let l = self.local(g);
        l.deliveries[k] += 1;
        l.delivery_bytes[k] += payload;
        self.delivered = true;
    }

    /// Accounts for requests the session finished since the last call.
    /// `reply` is the frame just handed to the session, if it was a reply:
    /// it ended the first of them.
    #[inline]
    pub fn answered(&mut self, session: &Session, reply: Option<(&Frame, &[u8])>) {
        let done = session.completed();
        let mut reply = reply;
        while self.completed < done {
            let seq = self.completed;
            self.completed += 1;
            let frame = reply.take();
            // Entries the relay queued without telling metrics (answers
            // pubwarden gives itself) have no in-flight record.
            while self.inflight.front().is_some_and(|e| e.seq < seq) {
                self.inflight.pop_front();
            }
            if self.inflight.front().is_some_and(|e| e.seq == seq)
                && let Some(e) = self.inflight.pop_front()
            {
                self.finish(e, frame);
            }
        }
    }

    /// Renumbers the request recorded last (cluster mode learns a
    /// request's queue position only after routing it).
    pub fn renumber_last(&mut self, seq: Option<u64>) {
        match seq {
            Some(seq) => {
                if let Some(e) = self.inflight.back_mut() {
                    e.seq = seq;
                }
            }
            None => {
                self.inflight.pop_back();
            }
        }
    }

    /// The request queued at `seq` was answered with `reply` (cluster
    /// mode, where requests finish in any order across nodes).
    pub fn answered_seq(&mut self, seq: u64, reply: Option<(&Frame, &[u8])>) {
        if let Some(i) = self.inflight.iter().position(|e| e.seq == seq)
            && let Some(e) = self.inflight.remove(i)
        {
            self.finish(e, reply);
        }
    }

    fn finish(&mut self, e: InFlight, reply: Option<(&Frame, &[u8])>) {
        let c = self.m.command(usize::from(e.command));
        let elapsed = self.now.saturating_duration_since(e.sent).as_nanos() as u64;
        let result = match reply {
            None => CommandResult::NoReply,
            Some((f, _)) if f.is_error() => CommandResult::Error,
            Some(_) => CommandResult::Ok,
        };
        c.results[result as usize].inc();
        if reply.is_some() {
            c.duration.observe(elapsed);
        }
        let (Some(g), Some((f, buf))) = (e.publish_group, reply) else {
            return;
        };
        let g = usize::from(g);
        let h = self.m.group(g);
        h.publish_duration.observe(elapsed);
        let ok = !f.is_error();
        let receivers = if f.kind == b':' {
            buf.get(f.start + 1..f.end.saturating_sub(2))
                .and_then(crate::resp::parse_i64)
        } else {
            None
        };
        if let Some(n) = receivers {
            h.receivers.observe(n.max(0) as u64);
        }
        let l = self.local(g);
        l.publishes[usize::from(!ok)] += 1;
        if receivers == Some(0) {
            l.unheard += 1;
        }
    }

    /// The batch is done: adds its counts to the shared counters, and
    /// accounts for output still waiting for the client (`to_client`
    /// bytes queued).
    #[inline]
    pub fn end_batch(&mut self, to_client: usize) {
        self.flush();
        if self.delivered && self.unwritten_since.is_none() {
            self.unwritten_since = Some(self.now);
        }
        self.output_waiting(to_client);
        if to_client > 0 {
            self.m.pending_output().observe(to_client as u64);
        }
    }

    /// A batch of client input is done: adds its counts to the shared ones.
    #[inline]
    pub fn end_client_batch(&mut self) {
        self.flush();
    }

    /// The client's outbox now holds `to_client` bytes (after a write).
    #[inline]
    pub fn output_waiting(&mut self, to_client: usize) {
        if to_client == 0
            && let Some(since) = self.unwritten_since.take()
        {
            let ns = since.elapsed().as_nanos() as u64;
            self.m.delivery_write().observe(ns);
        }
        let now = to_client as i64;
        if now != self.buffered {
            self.m.output_buffered().inc_by(now - self.buffered);
            self.buffered = now;
        }
    }

    /// A publish that policy refused, counted under this session's user.
    pub fn publish_refused(&mut self, user: &UserLabel, channel: &[u8], result: PublishResult) {
        self.m.publish_refused(user, channel, result);
    }

    fn flush(&mut self) {
        if self.one_group && self.batch_deliveries != [0; 3] {
            let (d, b) = (
                std::mem::take(&mut self.batch_deliveries),
                std::mem::take(&mut self.batch_delivery_bytes),
            );
            let l = self.local(0);
            for k in 0..3 {
                l.deliveries[k] += d[k];
                l.delivery_bytes[k] += b[k];
            }
        }
        let mut dirty = std::mem::take(&mut self.dirty);
        while dirty != 0 {
            let g = dirty.trailing_zeros() as usize;
            dirty &= dirty - 1;
            let l = std::mem::take(&mut self.local[g]);
            let h = self.m.group(g);
            for k in 0..3 {
                if l.deliveries[k] > 0 {
                    h.deliveries[k].inc_by(l.deliveries[k]);
                    h.delivery_bytes[k].inc_by(l.delivery_bytes[k]);
                }
            }
            let publishes = match &self.user_publishes {
                Some(u) => &u[g],
                None => &h.publishes,
            };
            for (i, n) in l.publishes.iter().enumerate() {
                if *n > 0 {
                    publishes[i].inc_by(*n);
                }
            }
            if l.publish_bytes > 0 {
                h.publish_bytes.inc_by(l.publish_bytes);
            }
            if l.unheard > 0 {
                h.publishes_unheard.inc_by(l.unheard);
            }
        }
        self.cache.flush();
    }
}

fn m_one_group(m: &Metrics) -> bool {
    m.groups().other() == 0 && m.channel_labels().is_none()
}

impl Drop for ConnMetrics {
    fn drop(&mut self) {
        self.flush();
        self.output_waiting(0);
    }
}

/// Moves `pubwarden_subscriptions` as one session's set changes, and takes
/// that session's share back off when it ends.
#[derive(Debug)]
struct SubscriptionGauges {
    m: Arc<Metrics>,
    /// This session's subscriptions by group and kind.
    counts: Vec<[i64; 3]>,
}

impl SubscriptionObserver for SubscriptionGauges {
    fn changed(&mut self, kind: SubKind, name: &[u8], added: bool) {
        // A pattern is grouped by matching its own text against the rules.
        let g = self.m.groups().group_of(name);
        let k = kind as usize;
        let gauge = &self.m.group(g).subscriptions[k];
        if added {
            gauge.inc();
            self.counts[g][k] += 1;
        } else {
            gauge.dec();
            self.counts[g][k] -= 1;
        }
        self.m.subscription_change(k, added);
    }
}

impl Drop for SubscriptionGauges {
    fn drop(&mut self) {
        for (g, kinds) in self.counts.iter().enumerate() {
            for (k, n) in kinds.iter().enumerate() {
                if *n != 0 {
                    self.m.group(g).subscriptions[k].dec_by(*n);
                }
            }
        }
    }
}
