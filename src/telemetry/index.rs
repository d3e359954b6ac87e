//! Sampled publishes seen recently, so that a delivery of the same message
//! (same channel, same payload) on another connection of this pubwarden can
//! link to its publish span.
//!
//! Bounded in size and age; only sampled publishes enter it, and the relay
//! asks only while it is non-empty (one relaxed atomic load per delivery),
//! so with nothing sampled a delivery pays no hashing and no lock. While it
//! holds entries, a lock-free filter over a cheap fingerprint (length and
//! edge bytes, no full hash) answers "not here" for nearly every delivery
//! of an unsampled publish: at 1% sampling a full hash and a lock per
//! delivery cost a fifth of fan-out throughput.

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
pub const TTL: Duration = Duration::from_secs(1);
/// Filter bits (512 Ki, 64 KiB): even a full index of 4096 entries sets under
/// 1%, so nearly every delivery of an unsampled publish skips the lock.
const FILTER_WORDS: usize = 8192;

#[derive(Debug, Default)]
struct Inner {
    map: HashMap<u64, (SpanContext, Instant)>,
    /// Key, insertion time and fingerprint, oldest first.
    order: VecDeque<(u64, Instant, u64)>,
}

#[derive(Debug)]
pub struct PublishIndex {
    len: AtomicUsize,
    /// One bit per fingerprint present (rebuilt as entries expire): a
    /// delivery whose bit is clear skips the hash and the lock.
    filter: Box<[AtomicU64]>,
    inner: Mutex<Inner>,
}

impl Default for PublishIndex {
    fn default() -> Self {
        Self {
            len: AtomicUsize::new(0),
            filter: (0..FILTER_WORDS).map(|_| AtomicU64::new(0)).collect(),
            inner: Mutex::default(),
        }
    }
}

/// The key of a message. SipHash with fixed keys: a collision can at worst
/// link a delivery to the wrong publish span.
pub fn key(channel: &[u8], payload: &[u8]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    channel.hash(&mut h);
    payload.hash(&mut h);
    h.finish()
}

/// Up to 8 bytes at `at` as an integer (fewer at the ends).
#[inline]
fn word(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    let part = b.get(at..).unwrap_or_default();
    let n = part.len().min(8);
    w[..n].copy_from_slice(&part[..n]);
    u64::from_le_bytes(w)
}

/// A few instructions: lengths, seven 8-byte words of the payload and the
/// channel's last 8 bytes (where names usually differ); no full hash.
#[inline]
pub fn fingerprint(channel: &[u8], payload: &[u8]) -> u64 {
    let mut h = (payload.len() as u64) ^ ((channel.len() as u64) << 32);
    // Headers (ids, sequence numbers, timestamps) sit in the first 32 bytes
    // of most formats; the middle and the end catch the rest.
    for w in [
        word(payload, 0),
        word(payload, 8),
        word(payload, 16),
        word(payload, 24),
        word(payload, payload.len() / 2),
        word(payload, payload.len().saturating_sub(8)),
        word(channel, channel.len().saturating_sub(8)),
    ] {
        h = (h ^ w).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        h ^= h >> 29;
    }
    h
}

#[inline]
fn bit(fp: u64) -> (usize, u64) {
    let b = (fp % (FILTER_WORDS as u64 * 64)) as usize;
    (b / 64, 1 << (b % 64))
}

impl PublishIndex {
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len.load(Ordering::Relaxed) == 0
    }

    /// Worth a lookup: an entry may have this message's fingerprint.
    #[inline]
    pub fn may_hold(&self, channel: &[u8], payload: &[u8]) -> bool {
        if self.is_empty() {
            return false;
        }
        let (w, m) = bit(fingerprint(channel, payload));
        self.filter[w].load(Ordering::Relaxed) & m != 0
    }

    pub fn insert(&self, channel: &[u8], payload: &[u8], cx: SpanContext, now: Instant) {
        let k = key(channel, payload);
        let fp = fingerprint(channel, payload);
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.map.insert(k, (cx, now));
        g.order.push_back((k, now, fp));
        while g.order.len() > CAPACITY {
            if let Some((old, at, _)) = g.order.pop_front()
                && g.map.get(&old).is_some_and(|(_, t)| *t == at)
            {
                g.map.remove(&old);
            }
        }
        let (w, m) = bit(fp);
        self.filter[w].fetch_or(m, Ordering::Relaxed);
        self.len.store(g.map.len(), Ordering::Relaxed);
    }

    /// The publish's span context and when the publish was read.
    pub fn get(&self, channel: &[u8], payload: &[u8]) -> Option<(SpanContext, Instant)> {
        let k = key(channel, payload);
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.map.get(&k).map(|(cx, at)| (cx.clone(), *at))
    }

    /// Drops entries older than [`TTL`]; run periodically.
    pub fn expire(&self, now: Instant) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(&(k, at, _)) = g.order.front() {
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
        }
        // Rebuilt under the lock, so no insert is lost; a lookup racing
        // with it may miss a link, never see a wrong one.
        let mut words = vec![0u64; FILTER_WORDS];
        for &(_, _, fp) in &g.order {
            let (w, m) = bit(fp);
            words[w] |= m;
        }
        for (a, w) in self.filter.iter().zip(words) {
            a.store(w, Ordering::Relaxed);
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
        assert!(idx.is_empty() && !idx.may_hold(b"ch", b"hello"));
        let t0 = Instant::now();
        idx.insert(b"ch", b"hello", cx(1), t0);
        assert!(idx.may_hold(b"ch", b"hello"));
        assert!(!idx.may_hold(b"ch", b"hellO"));
        assert_eq!(idx.get(b"ch", b"hello").map(|(c, _)| c), Some(cx(1)));
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
