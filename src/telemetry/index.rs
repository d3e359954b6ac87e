//! Sampled publishes seen recently, so that a delivery of the same message
//! (same channel, same payload) on another connection of this pubwarden can
//! link to its publish span.
//!
//! Bounded in size and age; only sampled publishes enter it, and the relay
//! asks only while it is non-empty (one relaxed atomic load per delivery),
//! so with nothing sampled a delivery pays no hashing and no lock.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use opentelemetry::trace::SpanContext;

/// Entries kept at most; the oldest go first.
pub const CAPACITY: usize = 4096;
/// A delivery arrives within milliseconds of its publish; past this an
/// entry only costs lookups.
pub const TTL: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
struct Inner {
    map: HashMap<u64, (SpanContext, Instant)>,
    order: VecDeque<(u64, Instant)>,
}

#[derive(Debug, Default)]
pub struct PublishIndex {
    len: AtomicUsize,
    /// Bit `len % 64` set for each payload length present: a delivery whose
    /// length has no entry skips the hash and the lock.
    lengths: AtomicU64,
    inner: Mutex<Inner>,
}

/// The key of a message. SipHash with fixed keys: a collision can at worst
/// link a delivery to the wrong publish span.
pub fn key(channel: &[u8], payload: &[u8]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    channel.hash(&mut h);
    payload.hash(&mut h);
    h.finish()
}

#[inline]
fn length_bit(payload_len: usize) -> u64 {
    1 << (payload_len % 64)
}

impl PublishIndex {
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len.load(Ordering::Relaxed) == 0
    }

    /// Worth a lookup: something is indexed with this payload length.
    #[inline]
    pub fn may_hold(&self, payload_len: usize) -> bool {
        !self.is_empty() && self.lengths.load(Ordering::Relaxed) & length_bit(payload_len) != 0
    }

    pub fn insert(&self, channel: &[u8], payload: &[u8], cx: SpanContext, now: Instant) {
        let k = key(channel, payload);
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.map.insert(k, (cx, now));
        g.order.push_back((k, now));
        while g.order.len() > CAPACITY {
            if let Some((old, at)) = g.order.pop_front()
                && g.map.get(&old).is_some_and(|(_, t)| *t == at)
            {
                g.map.remove(&old);
            }
        }
        self.lengths
            .fetch_or(length_bit(payload.len()), Ordering::Relaxed);
        self.len.store(g.map.len(), Ordering::Relaxed);
    }

    pub fn get(&self, channel: &[u8], payload: &[u8]) -> Option<SpanContext> {
        let k = key(channel, payload);
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.map.get(&k).map(|(cx, _)| cx.clone())
    }

    /// Drops entries older than [`TTL`]; run periodically.
    pub fn expire(&self, now: Instant) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(&(k, at)) = g.order.front() {
            if now.saturating_duration_since(at) < TTL {
                break;
            }
            g.order.pop_front();
            if g.map.get(&k).is_some_and(|(_, t)| *t == at) {
                g.map.remove(&k);
            }
        }
        if g.map.is_empty() {
            // Reclaims what a burst of sampled publishes allocated.
            *g = Inner::default();
            self.lengths.store(0, Ordering::Relaxed);
        }
        self.len.store(g.map.len(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanId, TraceFlags, TraceId, TraceState};

    fn cx(n: u8) -> SpanContext {
        SpanContext::new(
            TraceId::from_bytes([n; 16]),
            SpanId::from_bytes([n; 8]),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        )
    }

    #[test]
    fn finds_recent_entries_and_forgets_old_ones() {
        let idx = PublishIndex::default();
        assert!(idx.is_empty() && !idx.may_hold(5));
        let t0 = Instant::now();
        idx.insert(b"ch", b"hello", cx(1), t0);
        assert!(idx.may_hold(5));
        assert!(!idx.may_hold(6));
        assert_eq!(idx.get(b"ch", b"hello"), Some(cx(1)));
        assert_eq!(idx.get(b"ch2", b"hello"), None);
        idx.expire(t0 + TTL / 2);
        assert!(!idx.is_empty());
        idx.expire(t0 + TTL);
        assert!(idx.is_empty());
        assert_eq!(idx.get(b"ch", b"hello"), None);
    }

    #[test]
    fn stays_bounded() {
        let idx = PublishIndex::default();
        let t0 = Instant::now();
        for i in 0..(CAPACITY + 100) {
            idx.insert(b"ch", format!("m{i}").as_bytes(), cx(1), t0);
        }
        assert_eq!(idx.len.load(Ordering::Relaxed), CAPACITY);
        assert_eq!(idx.get(b"ch", b"m0"), None);
    }
}
