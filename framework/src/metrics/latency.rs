//! A lock-free latency histogram with logarithmic buckets (about 4% wide), for quantiles of
//! the commit path read by [`MetricsSnapshot`](super::MetricsSnapshot).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Bucket `i` holds latencies in `[GROWTH^i, GROWTH^(i+1))` microseconds.
const GROWTH: f64 = 1.04;
/// Enough buckets for 1 µs to over 10 minutes.
const BUCKETS: usize = 520;

/// Counts of latencies per bucket, and the largest one seen.
#[derive(Debug)]
pub(crate) struct LatencyHistogram {
    buckets: Box<[AtomicU64]>,
    max_micros: AtomicU64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            max_micros: AtomicU64::new(0),
        }
    }
}

fn bucket_of(micros: u64) -> usize {
    if micros <= 1 {
        return 0;
    }
    let index = ((micros as f64).ln() / GROWTH.ln()) as usize;
    index.min(BUCKETS - 1)
}

/// The upper edge of bucket `index`, in microseconds.
fn upper_edge(index: usize) -> u64 {
    GROWTH.powi(index as i32 + 1).ceil() as u64
}

impl LatencyHistogram {
    pub(crate) fn record(&self, took: Duration) {
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.buckets[bucket_of(micros)].fetch_add(1, Ordering::Relaxed);
        self.max_micros.fetch_max(micros, Ordering::Relaxed);
    }

    /// The latency below which a fraction `q` of the recorded ones lie (the upper edge of
    /// its bucket, at most the maximum seen); zero before any was recorded.
    pub(crate) fn quantile(&self, q: f64) -> Duration {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return Duration::ZERO;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (index, count) in counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                let max = self.max_micros.load(Ordering::Relaxed);
                let edge = if index == BUCKETS - 1 {
                    max
                } else {
                    upper_edge(index).min(max)
                };
                return Duration::from_micros(edge);
            }
        }
        self.max()
    }

    pub(crate) fn max(&self) -> Duration {
        Duration::from_micros(self.max_micros.load(Ordering::Relaxed))
    }

    #[cfg(test)]
    pub(crate) fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_a_bucket_of_the_truth() {
        let h = LatencyHistogram::default();
        assert_eq!(h.quantile(0.5), Duration::ZERO);
        for ms in 1..=100u64 {
            h.record(Duration::from_millis(ms));
        }
        let p50 = h.quantile(0.5).as_secs_f64() * 1e3;
        let p99 = h.quantile(0.99).as_secs_f64() * 1e3;
        assert!((50.0..=52.1).contains(&p50), "{p50}");
        assert!((99.0..=100.0).contains(&p99), "{p99}");
        assert_eq!(h.max(), Duration::from_millis(100));
        assert_eq!(h.count(), 100);
    }

    #[test]
    fn extremes_land_in_the_first_and_last_buckets() {
        let h = LatencyHistogram::default();
        h.record(Duration::ZERO);
        h.record(Duration::from_secs(100_000));
        assert_eq!(h.count(), 2);
        assert_eq!(h.quantile(1.0), Duration::from_secs(100_000));
    }
}
