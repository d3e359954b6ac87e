//! Rate budgets: the generic cell rate algorithm (GCRA), per key, with a hard
//! bound on the number of keys.
//!
//! Written here rather than taken from `governor` because a publish spends
//! two budgets at once (messages and payload bytes) and must either spend
//! both or neither; governor commits each check separately. Time is passed in,
//! so tests drive a fake clock.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Duration;

/// A budget: `rate` cells per second, at most `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    /// Nanoseconds one cell costs.
    interval_ns: u64,
    /// Nanoseconds of credit a key may hold (`burst` cells).
    capacity_ns: u64,
}

impl Budget {
    /// `None` for a zero rate or burst.
    pub fn new(per_second: u64, burst: u64) -> Option<Self> {
        if per_second == 0 || burst == 0 {
            return None;
        }
        let interval_ns = (1_000_000_000 / per_second).max(1);
        Some(Self {
            interval_ns,
            capacity_ns: interval_ns.saturating_mul(burst),
        })
    }

    /// `count` cells per `period`, at most `burst` at once.
    pub fn per(count: u64, period: Duration, burst: u64) -> Option<Self> {
        if count == 0 || burst == 0 {
            return None;
        }
        let interval_ns =
            (period.as_nanos() / u128::from(count)).clamp(1, u128::from(u64::MAX)) as u64;
        Some(Self {
            interval_ns,
            capacity_ns: interval_ns.saturating_mul(burst),
        })
    }

    /// Theoretical arrival time after spending `cells` at `now`, or how long
    /// to wait first. `Err(None)`: never (more than the burst).
    fn spend(&self, tat: u64, now: u64, cells: u64) -> Result<u64, Option<Duration>> {
        let cost = self.interval_ns.saturating_mul(cells);
        if cost > self.capacity_ns {
            return Err(None);
        }
        let new_tat = tat.max(now).saturating_add(cost);
        let ahead = new_tat - now;
        if ahead <= self.capacity_ns {
            Ok(new_tat)
        } else {
            Err(Some(Duration::from_nanos(ahead - self.capacity_ns)))
        }
    }
}

/// The outcome of a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Allowed after this long (nothing was spent).
    RetryAfter(Duration),
    /// Larger than the burst: never allowed.
    TooLarge,
}

#[derive(Debug, Clone, Copy, Default)]
struct State {
    messages_tat: u64,
    bytes_tat: u64,
}

/// Budgets for many keys, bounded: past `max_keys`, idle keys are forgotten
/// (an idle key has a full budget, exactly like an absent one) and, if that is
/// not enough, new keys share one overflow budget, so no client can grow this
/// without bound by inventing keys.
#[derive(Debug)]
pub struct Limiter<K> {
    messages: Budget,
    bytes: Option<Budget>,
    max_keys: usize,
    keys: HashMap<K, State>,
    overflow: State,
}

impl<K: Hash + Eq> Limiter<K> {
    pub fn new(messages: Budget, bytes: Option<Budget>, max_keys: usize) -> Self {
        Self {
            messages,
            bytes,
            max_keys: max_keys.max(1),
            keys: HashMap::new(),
            overflow: State::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Spends one message of `payload` bytes for `key` at `now_ns` if both
    /// budgets allow; otherwise spends nothing. `make_key` builds an owned key
    /// only when a new one must be stored.
    pub fn check<Q>(
        &mut self,
        key: &Q,
        make_key: impl FnOnce() -> K,
        payload: u64,
        now_ns: u64,
    ) -> Decision
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let (messages, bytes) = (self.messages, self.bytes);
        let state = match self.keys.get_mut(key) {
            Some(s) => s,
            None => {
                if self.keys.len() >= self.max_keys {
                    self.keys
                        .retain(|_, s| s.messages_tat > now_ns || s.bytes_tat > now_ns);
                }
                if self.keys.len() >= self.max_keys {
                    &mut self.overflow
                } else {
                    self.keys.entry(make_key()).or_default()
                }
            }
        };
        let m = messages.spend(state.messages_tat, now_ns, 1);
        let b = match bytes {
            Some(budget) if payload > 0 => budget.spend(state.bytes_tat, now_ns, payload).map(Some),
            _ => Ok(None),
        };
        match (m, b) {
            (Ok(mt), Ok(bt)) => {
                state.messages_tat = mt;
                if let Some(bt) = bt {
                    state.bytes_tat = bt;
                }
                Decision::Allow
            }
            (Err(None), _) | (_, Err(None)) => Decision::TooLarge,
            (Err(Some(a)), Err(Some(b))) => Decision::RetryAfter(a.max(b)),
            (Err(Some(w)), _) | (_, Err(Some(w))) => Decision::RetryAfter(w),
        }
    }

    /// Would one more message be allowed now? Spends nothing.
    pub fn would_allow<Q>(&self, key: &Q, now_ns: u64) -> bool
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let state = self.keys.get(key).copied().unwrap_or_default();
        self.messages.spend(state.messages_tat, now_ns, 1).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn burst_then_steady_rate() {
        let mut l: Limiter<u32> = Limiter::new(Budget::new(10, 3).unwrap(), None, 16);
        for _ in 0..3 {
            assert_eq!(l.check(&1, || 1, 0, 0), Decision::Allow);
        }
        assert_eq!(
            l.check(&1, || 1, 0, 0),
            Decision::RetryAfter(Duration::from_millis(100))
        );
        assert_eq!(
            l.check(&1, || 1, 0, 99 * MS),
            Decision::RetryAfter(Duration::from_millis(1))
        );
        assert_eq!(l.check(&1, || 1, 0, 100 * MS), Decision::Allow);
        // Another key has its own budget.
        assert_eq!(l.check(&2, || 2, 0, 100 * MS), Decision::Allow);
    }

    #[test]
    fn bytes_and_messages_are_spent_together_or_not_at_all() {
        let mut l: Limiter<u32> =
            Limiter::new(Budget::new(100, 100).unwrap(), Budget::new(1000, 1000), 16);
        assert_eq!(l.check(&1, || 1, 900, 0), Decision::Allow);
        // 200 more bytes do not fit: nothing spent, so 100 bytes still do.
        assert_eq!(
            l.check(&1, || 1, 200, 0),
            Decision::RetryAfter(Duration::from_millis(100))
        );
        assert_eq!(l.check(&1, || 1, 100, 0), Decision::Allow);
        assert_eq!(l.check(&1, || 1, 5000, 0), Decision::TooLarge);
    }

    #[test]
    fn keys_stay_bounded() {
        let mut l: Limiter<Vec<u8>> = Limiter::new(Budget::new(1, 1).unwrap(), None, 100);
        for i in 0..10_000u32 {
            let key = i.to_be_bytes();
            let _ = l.check(&key[..], || key.to_vec(), 0, 0);
        }
        assert!(l.len() <= 100);
        // Once time passes, idle keys make room again.
        let _ = l.check(&b"late"[..], || b"late".to_vec(), 0, 10_000 * MS);
        assert!(l.len() <= 100);
        assert!(l.would_allow(&b"late"[..], 20_000 * MS));
    }
}
