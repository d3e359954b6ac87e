//! A lock-free histogram over integer observations.
//!
//! prometheus-client's `Histogram` takes a mutex per observation and sums in
//! `f64`. Here an observation is two relaxed atomic adds on integers (the
//! bucket and the sum), so a relay thread never waits for a scrape or for
//! another relay thread; the unit scale (nanoseconds to seconds, say) is
//! applied only when the histogram is rendered.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::exemplar::Exemplar;
use prometheus_client::metrics::{MetricType, TypedMetric};

/// Bucket bounds and the factor that turns raw observations into the
/// exposed unit.
#[derive(Debug, Clone, Copy)]
pub struct Buckets {
    /// Upper bounds, ascending, in raw units.
    pub bounds: &'static [u64],
    /// Exposed value = raw * scale.
    pub scale: f64,
}

/// Latencies observed in nanoseconds, exposed in seconds, from 10 us up:
/// Redis answers in tens of microseconds on a quiet host.
pub const LATENCY: Buckets = Buckets {
    bounds: &[
        10_000,
        25_000,
        50_000,
        100_000,
        250_000,
        500_000,
        1_000_000,
        2_500_000,
        5_000_000,
        10_000_000,
        25_000_000,
        50_000_000,
        100_000_000,
        250_000_000,
        500_000_000,
        1_000_000_000,
        2_500_000_000,
    ],
    scale: 1e-9,
};

/// Receivers per publish (Redis's integer reply).
pub const RECEIVERS: Buckets = Buckets {
    bounds: &[0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000, 10_000],
    scale: 1.0,
};

/// Bytes waiting for a client.
pub const PENDING_BYTES: Buckets = Buckets {
    bounds: &[
        1 << 10,
        4 << 10,
        16 << 10,
        64 << 10,
        256 << 10,
        1 << 20,
        4 << 20,
        16 << 20,
        64 << 20,
    ],
    scale: 1.0,
};

#[derive(Debug)]
struct Inner {
    buckets: Buckets,
    /// One per bound, plus the `+Inf` bucket; not cumulative.
    counts: Box<[AtomicU64]>,
    sum: AtomicU64,
}

/// A cloneable handle; clones share the same counts.
#[derive(Debug, Clone)]
pub struct AtomicHistogram(Arc<Inner>);

impl AtomicHistogram {
    pub fn new(buckets: Buckets) -> Self {
        let counts = (0..=buckets.bounds.len())
            .map(|_| AtomicU64::new(0))
            .collect();
        Self(Arc::new(Inner {
            buckets,
            counts,
            sum: AtomicU64::new(0),
        }))
    }

    /// Records one observation in raw units.
    #[inline]
    pub fn observe(&self, raw: u64) {
        let bounds = self.0.buckets.bounds;
        // Bounds lists are short (under 20), and small values, the common
        // case, stop the scan early.
        let i = bounds
            .iter()
            .position(|&b| raw <= b)
            .unwrap_or(bounds.len());
        self.0.counts[i].fetch_add(1, Ordering::Relaxed);
        self.0.sum.fetch_add(raw, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.0
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// Sum of observations in raw units.
    pub fn sum_raw(&self) -> u64 {
        self.0.sum.load(Ordering::Relaxed)
    }
}

impl TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let b = &self.0.buckets;
        let mut buckets = Vec::with_capacity(b.bounds.len() + 1);
        let mut count = 0;
        for (i, c) in self.0.counts.iter().enumerate() {
            let n = c.load(Ordering::Relaxed);
            count += n;
            let bound = b
                .bounds
                .get(i)
                .map_or(f64::INFINITY, |&x| x as f64 * b.scale);
            buckets.push((bound, n));
        }
        let sum = self.0.sum.load(Ordering::Relaxed) as f64 * b.scale;
        encoder.encode_histogram::<NoLabelSet>(
            sum,
            count,
            &buckets,
            None::<&HashMap<usize, Exemplar<NoLabelSet, f64>>>,
        )
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        let h = AtomicHistogram::new(RECEIVERS);
        for v in [0, 0, 1, 3, 20_000] {
            h.observe(v);
        }
        let counts: Vec<u64> =
            h.0.counts
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect();
        assert_eq!(counts[0], 2);
        assert_eq!(counts[1], 1);
        assert_eq!(counts[3], 1);
        assert_eq!(*counts.last().unwrap(), 1);
        assert_eq!(h.count(), 5);
        assert_eq!(h.sum_raw(), 20_004);
    }
}
