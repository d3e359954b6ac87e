//! Channel names to bounded label values.
//!
//! A channel name comes from clients and is unbounded, so it never becomes a
//! label by itself. Ordered Redis-glob rules map it to one of a few configured
//! groups (the first rule that matches wins; nothing matching is `other`), and
//! the optional per-channel labels stop taking new names at a hard cap, after
//! which every new channel counts as `overflow`.

use std::collections::HashMap;
use std::sync::Mutex;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use super::settings::ChannelGroup;
use crate::glob;

/// The group of channels that no rule matched.
pub const OTHER: &str = "other";
/// The per-channel label of channels past the cap.
pub const OVERFLOW: &str = "overflow";
/// Longest channel name given a label of its own; longer ones are `overflow`.
pub const MAX_LABEL_LEN: usize = 128;

/// Compiled group rules. Group `i` is `rules[i]`; `rules.len()` is `other`.
#[derive(Debug, Clone)]
pub struct ChannelGroups {
    names: Vec<String>,
    patterns: Vec<Vec<Vec<u8>>>,
}

impl ChannelGroups {
    pub fn new(rules: &[ChannelGroup]) -> Self {
        let mut names: Vec<String> = rules.iter().map(|g| g.name.clone()).collect();
        names.push(OTHER.to_string());
        let patterns = rules
            .iter()
            .map(|g| g.patterns.iter().map(|p| p.as_bytes().to_vec()).collect())
            .collect();
        Self { names, patterns }
    }

    /// Groups including `other`.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// The label value of group `i`.
    pub fn name(&self, i: usize) -> &str {
        &self.names[i]
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(String::as_str)
    }

    /// The index of the `other` group.
    pub fn other(&self) -> usize {
        self.patterns.len()
    }

    /// The group of `channel`: glob matching, so callers cache the answer.
    pub fn group_of(&self, channel: &[u8]) -> usize {
        self.patterns
            .iter()
            .position(|pats| pats.iter().any(|p| glob::matches(p, channel)))
            .unwrap_or(self.other())
    }
}

/// Per-channel counters of one channel label.
#[derive(Debug, Clone)]
pub struct ChannelHandles {
    pub publishes: Counter,
    pub deliveries: Counter,
}

/// Per-channel labels, at most `max` distinct names.
#[derive(Debug)]
pub struct ChannelLabels {
    max: usize,
    publishes: Family<Vec<(&'static str, String)>, Counter>,
    deliveries: Family<Vec<(&'static str, String)>, Counter>,
    known: Mutex<HashMap<Box<[u8]>, ChannelHandles>>,
    overflow: ChannelHandles,
}

impl ChannelLabels {
    pub fn new(
        max: usize,
        publishes: Family<Vec<(&'static str, String)>, Counter>,
        deliveries: Family<Vec<(&'static str, String)>, Counter>,
    ) -> Self {
        let overflow = Self::handles(&publishes, &deliveries, OVERFLOW);
        Self {
            max,
            publishes,
            deliveries,
            known: Mutex::new(HashMap::new()),
            overflow,
        }
    }

    fn handles(
        publishes: &Family<Vec<(&'static str, String)>, Counter>,
        deliveries: &Family<Vec<(&'static str, String)>, Counter>,
        name: &str,
    ) -> ChannelHandles {
        let labels = vec![("channel", name.to_string())];
        ChannelHandles {
            publishes: publishes.get_or_create_owned(&labels),
            deliveries: deliveries.get_or_create_owned(&labels),
        }
    }

    /// The counters for `channel`. Takes a lock and hashes: callers keep the
    /// result in their per-connection cache.
    pub fn resolve(&self, channel: &[u8]) -> ChannelHandles {
        let Ok(name) = std::str::from_utf8(channel) else {
            return self.overflow.clone();
        };
        if name.len() > MAX_LABEL_LEN || name == OVERFLOW {
            return self.overflow.clone();
        }
        // A poisoned lock only means another thread panicked mid-insert; the
        // map itself is still usable.
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = known.get(channel) {
            return h.clone();
        }
        if known.len() >= self.max {
            return self.overflow.clone();
        }
        let h = Self::handles(&self.publishes, &self.deliveries, name);
        known.insert(Box::from(channel), h.clone());
        h
    }

    /// Distinct channels labelled so far (excluding `overflow`).
    pub fn len(&self) -> usize {
        self.known.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Slots in a connection's channel cache. Subscribers mostly receive a
/// handful of channels; a miss costs a glob match (and a lock with
/// per-channel labels), not a wrong answer.
pub const CACHE_SLOTS: usize = 8;

/// What a cached channel resolves to.
#[derive(Debug)]
pub struct Slot {
    key: Vec<u8>,
    pub group: usize,
    pub channel: Option<ChannelHandles>,
    /// Per-channel counts not yet added to `channel`.
    pub publishes: u64,
    pub deliveries: u64,
}

impl Slot {
    fn flush(&mut self) {
        if let Some(h) = &self.channel {
            if self.publishes > 0 {
                h.publishes.inc_by(self.publishes);
            }
            if self.deliveries > 0 {
                h.deliveries.inc_by(self.deliveries);
            }
        }
        self.publishes = 0;
        self.deliveries = 0;
    }
}

/// A tiny per-connection map from channel name to its group (and channel
/// label), compared byte for byte: no hashing and no glob matching once warm.
#[derive(Debug, Default)]
pub struct ChannelCache {
    slots: Vec<Slot>,
    /// The slot that answered last; deliveries come in runs of one channel.
    last: usize,
    /// Next slot to evict (round robin).
    victim: usize,
    pub misses: u64,
}

impl ChannelCache {
    /// The slot for `channel`, resolving and caching it on a miss.
    #[inline]
    pub fn get(
        &mut self,
        channel: &[u8],
        groups: &ChannelGroups,
        labels: Option<&ChannelLabels>,
    ) -> &mut Slot {
        // No group rules and no channel labels: every channel is `other`, so
        // one slot serves all and no byte is compared.
        if groups.other() == 0 && labels.is_none() {
            if self.slots.is_empty() {
                self.slots.push(Slot {
                    key: Vec::new(),
                    group: 0,
                    channel: None,
                    publishes: 0,
                    deliveries: 0,
                });
            }
            return &mut self.slots[0];
        }
        if let Some(s) = self.slots.get(self.last)
            && s.key == channel
        {
            return &mut self.slots[self.last];
        }
        if let Some(i) = self.slots.iter().position(|s| s.key == channel) {
            self.last = i;
            return &mut self.slots[i];
        }
        self.miss(channel, groups, labels)
    }

    #[cold]
    fn miss(
        &mut self,
        channel: &[u8],
        groups: &ChannelGroups,
        labels: Option<&ChannelLabels>,
    ) -> &mut Slot {
        self.misses += 1;
        let group = groups.group_of(channel);
        let handles = labels.map(|l| l.resolve(channel));
        let i = if self.slots.len() < CACHE_SLOTS {
            self.slots.push(Slot {
                key: Vec::new(),
                group,
                channel: None,
                publishes: 0,
                deliveries: 0,
            });
            self.slots.len() - 1
        } else {
            let i = self.victim;
            self.victim = (self.victim + 1) % CACHE_SLOTS;
            self.slots[i].flush();
            i
        };
        let s = &mut self.slots[i];
        // Reuses the evicted key's allocation when it is large enough.
        s.key.clear();
        s.key.extend_from_slice(channel);
        s.group = group;
        s.channel = handles;
        self.last = i;
        s
    }

    /// Adds per-channel counts to the shared counters.
    pub fn flush(&mut self) {
        for s in &mut self.slots {
            if s.publishes > 0 || s.deliveries > 0 {
                s.flush();
            }
        }
    }
}

impl Drop for ChannelCache {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn groups() -> ChannelGroups {
        ChannelGroups::new(&[
            ChannelGroup {
                name: "orders".into(),
                patterns: vec!["orders.*".into(), "order-[0-9]".into()],
            },
            ChannelGroup {
                name: "all-o".into(),
                patterns: vec!["o*".into()],
            },
        ])
    }

    #[test]
    fn first_matching_rule_wins_and_the_rest_is_other() {
        let g = groups();
        assert_eq!(g.len(), 3);
        assert_eq!(g.group_of(b"orders.eu"), 0);
        assert_eq!(g.group_of(b"order-7"), 0);
        assert_eq!(g.group_of(b"order-x"), 1);
        assert_eq!(g.group_of(b"news"), 2);
        assert_eq!(g.name(g.group_of(b"news")), OTHER);
        assert_eq!(g.group_of(b"\xff\x00binary"), 2);
    }

    #[test]
    fn per_channel_labels_stop_at_the_cap() {
        let l = ChannelLabels::new(2, Family::default(), Family::default());
        let a = l.resolve(b"a");
        a.publishes.inc();
        l.resolve(b"b");
        let c = l.resolve(b"c");
        c.publishes.inc();
        assert_eq!(l.len(), 2);
        // Known channels keep their own label after the cap.
        assert_eq!(l.resolve(b"a").publishes.get(), 1);
        // New ones share `overflow`, and so do unlabellable names.
        assert_eq!(l.resolve(b"d").publishes.get(), 1);
        assert_eq!(l.resolve(b"\xff").publishes.get(), 1);
        assert_eq!(l.resolve(&[b'x'; MAX_LABEL_LEN + 1]).publishes.get(), 1);
        assert_eq!(l.resolve(OVERFLOW.as_bytes()).publishes.get(), 1);
        assert_eq!(l.len(), 2);
    }

    #[test]
    fn cache_hits_do_not_resolve_again_and_eviction_keeps_counts() {
        let g = groups();
        let l = ChannelLabels::new(100, Family::default(), Family::default());
        let mut c = ChannelCache::default();
        for _ in 0..3 {
            c.get(b"orders.1", &g, Some(&l)).deliveries += 1;
            c.get(b"news", &g, Some(&l)).deliveries += 1;
        }
        assert_eq!(c.misses, 2);
        assert_eq!(c.get(b"orders.1", &g, Some(&l)).group, 0);
        assert_eq!(c.get(b"news", &g, Some(&l)).group, 2);
        // Fill past the slot count: the evicted slots' counts are flushed.
        for i in 0..CACHE_SLOTS {
            c.get(format!("x{i}").as_bytes(), &g, Some(&l)).deliveries += 1;
        }
        assert_eq!(c.misses, 2 + CACHE_SLOTS as u64);
        assert_eq!(l.resolve(b"orders.1").deliveries.get(), 3);
        c.flush();
        assert_eq!(l.resolve(b"x7").deliveries.get(), 1);
        // A name that differs only in length or one byte is a different key.
        assert_eq!(c.get(b"orders.1x", &g, None).group, 0);
        assert_eq!(c.get(b"orders.2", &g, None).group, 0);
        assert_eq!(c.get(b"orders", &g, None).group, 1);
    }
}
