//! Latency histograms: fixed log-scale buckets, one set per worker thread,
//! written without locks or allocation, summed when read.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Sub-buckets per power of two: 8, so a bucket spans at most 12.5% of its
/// values and a quantile read from the buckets is within 12.5% of the true
/// one.
const SUB_BITS: u32 = 3;
const SUB: u64 = 1 << SUB_BITS;
/// The largest power of two kept apart: 2^36 ns (about 69 s); longer
/// times fall in the last bucket.
const TOP_EXPONENT: u32 = 36;
/// Buckets: one per nanosecond below `SUB`, then `SUB` per power of two.
pub(crate) const BUCKETS: usize = ((TOP_EXPONENT - SUB_BITS + 2) as u64 * SUB) as usize;

/// The bucket of a duration of `nanos` nanoseconds.
fn bucket_of(nanos: u64) -> usize {
    if nanos < SUB {
        return nanos as usize;
    }
    let exponent = (63 - nanos.leading_zeros()).min(TOP_EXPONENT);
    let nanos = nanos.min((1 << (TOP_EXPONENT + 1)) - 1);
    let sub = (nanos >> (exponent - SUB_BITS)) & (SUB - 1);
    (((exponent - SUB_BITS + 1) as u64) * SUB + sub) as usize
}

/// The largest duration, in nanoseconds, that falls in `bucket`.
fn upper_bound(bucket: usize) -> u64 {
    let bucket = bucket as u64;
    if bucket < SUB {
        return bucket;
    }
    let exponent = (bucket / SUB) as u32 + SUB_BITS - 1;
    let sub = bucket % SUB;
    let low = (1u64 << exponent) + (sub << (exponent - SUB_BITS));
    low + (1u64 << (exponent - SUB_BITS)) - 1
}

/// One thread's histogram. Only that thread writes it, so a record is a
/// load and a store (no read-modify-write); readers may run at any time.
#[derive(Debug)]
pub(crate) struct Recorder {
    buckets: Box<[AtomicU64]>,
    max: AtomicU64,
}

impl Recorder {
    pub(crate) fn new() -> Self {
        Recorder {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            max: AtomicU64::new(0),
        }
    }

    /// Records one duration. Call from the owning thread only.
    pub(crate) fn record(&self, duration: Duration) {
        let nanos = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        if let Some(bucket) = self.buckets.get(bucket_of(nanos)) {
            bucket.store(bucket.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        }
        if nanos > self.max.load(Ordering::Relaxed) {
            self.max.store(nanos, Ordering::Relaxed);
        }
    }

    /// Adds this histogram's counts into `into`.
    fn add_to(&self, into: &mut Histogram) {
        for (total, bucket) in into.buckets.iter_mut().zip(self.buckets.iter()) {
            *total += bucket.load(Ordering::Relaxed);
        }
        into.max = into.max.max(self.max.load(Ordering::Relaxed));
    }
}

/// A histogram of durations, read from a server: how many, the quantiles and
/// the largest.
///
/// Durations are kept in fixed buckets, eight per power of two from 8 ns to
/// about 69 s, so a quantile is an upper bound within 12.5% of the true
/// value; [`max`](Histogram::max) is exact.
#[derive(Clone, PartialEq, Eq)]
pub struct Histogram {
    buckets: Box<[u64]>,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: vec![0; BUCKETS].into_boxed_slice(),
            max: 0,
        }
    }
}

impl fmt::Debug for Histogram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Histogram")
            .field("count", &self.count())
            .field("p50", &self.p50())
            .field("p99", &self.p99())
            .field("max", &self.max())
            .finish()
    }
}

impl Histogram {
    /// How many durations were recorded.
    #[must_use]
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// The duration at or under which a fraction `q` (0 to 1) of the
    /// recorded durations fall: the upper bound of the bucket that holds
    /// it, and never more than [`max`](Histogram::max). Zero when nothing
    /// was recorded.
    #[must_use]
    pub fn quantile(&self, q: f64) -> Duration {
        let count = self.count();
        if count == 0 {
            return Duration::ZERO;
        }
        let q = if q.is_nan() { 1.0 } else { q.clamp(0.0, 1.0) };
        // The rank of the wanted value, 1-based: at least the first.
        let rank = ((q * count as f64).ceil() as u64).clamp(1, count);
        let mut seen = 0;
        for (bucket, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Duration::from_nanos(upper_bound(bucket).min(self.max));
            }
        }
        Duration::from_nanos(self.max)
    }

    /// The median.
    #[must_use]
    pub fn p50(&self) -> Duration {
        self.quantile(0.5)
    }

    /// The 99th percentile.
    #[must_use]
    pub fn p99(&self) -> Duration {
        self.quantile(0.99)
    }

    /// The largest duration recorded.
    #[must_use]
    pub fn max(&self) -> Duration {
        Duration::from_nanos(self.max)
    }

    /// The non-empty buckets, in order: each bucket's largest duration and
    /// how many durations fell in it. For exporting to a metrics system.
    pub fn buckets(&self) -> impl Iterator<Item = (Duration, u64)> + '_ {
        self.buckets
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(bucket, n)| (Duration::from_nanos(upper_bound(bucket)), *n))
    }
}

/// How long requests took, from a server's histograms; see
/// [`ServerHandle::latency`](crate::ServerHandle::latency).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Latency {
    /// Handler time: from the handler call's start to its reply being ready,
    /// one entry per handler call (a call that panicked included).
    pub handler: Histogram,
    /// Queue wait: from a request's arrival (the receive call that took it)
    /// to the start of its handler call, one entry per request a handler
    /// took up. With a [handler pool](crate::ServerBuilder::handler_pool)
    /// this is the time in the queue, expired requests included; inline, the
    /// time behind the requests before it in the same batch.
    pub queue_wait: Histogram,
}

/// One thread's two histograms.
#[derive(Debug)]
pub(crate) struct Recorders {
    pub(crate) handler: Recorder,
    pub(crate) queue_wait: Recorder,
}

impl Recorders {
    pub(crate) fn new() -> Self {
        Recorders {
            handler: Recorder::new(),
            queue_wait: Recorder::new(),
        }
    }
}

/// Sums the histograms of every thread.
pub(crate) fn sum<'a>(recorders: impl IntoIterator<Item = &'a Recorders>) -> Latency {
    let mut latency = Latency::default();
    for r in recorders {
        r.handler.add_to(&mut latency.handler);
        r.queue_wait.add_to(&mut latency.queue_wait);
    }
    latency
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_falls_in_a_bucket_whose_bound_covers_it() {
        let mut values: Vec<u64> = (0..5_000).collect();
        values.extend((0..64).map(|shift| 1u64 << shift));
        values.extend((0..64).map(|shift| (1u64 << shift).wrapping_sub(1)));
        values.extend([u64::MAX, 123_456_789, 999_999_999_999]);
        for nanos in values {
            let bucket = bucket_of(nanos);
            assert!(bucket < BUCKETS, "{nanos} -> {bucket}");
            let bound = upper_bound(bucket);
            if nanos < 1 << (TOP_EXPONENT + 1) {
                assert!(bound >= nanos, "{nanos}: bound {bound}");
                // Within one eighth of the value.
                assert!(bound - nanos <= nanos / 8, "{nanos}: bound {bound}");
            } else {
                assert_eq!(bucket, BUCKETS - 1);
            }
            if bucket > 0 {
                assert!(upper_bound(bucket - 1) < nanos.min(1 << (TOP_EXPONENT + 1)));
            }
        }
    }

    #[test]
    fn quantiles_come_from_the_buckets() {
        let recorder = Recorder::new();
        for micros in 1..=100 {
            recorder.record(Duration::from_micros(micros));
        }
        let latency = sum([&Recorders {
            handler: recorder,
            queue_wait: Recorder::new(),
        }]);
        let h = &latency.handler;
        assert_eq!(h.count(), 100);
        assert_eq!(h.max(), Duration::from_micros(100));
        let p50 = h.p50();
        assert!(
            p50 >= Duration::from_micros(50) && p50 <= Duration::from_micros(57),
            "{p50:?}"
        );
        let p99 = h.p99();
        assert!(
            p99 >= Duration::from_micros(99) && p99 <= Duration::from_micros(100),
            "{p99:?}"
        );
        assert_eq!(h.quantile(1.0), h.max());
        assert_eq!(h.quantile(f64::NAN), h.max());
        assert!(h.quantile(0.0) >= Duration::from_micros(1));
        assert_eq!(h.buckets().map(|(_, n)| n).sum::<u64>(), 100);
        assert_eq!(latency.queue_wait.count(), 0);
        assert_eq!(latency.queue_wait.p99(), Duration::ZERO);
        // Extremes do not panic.
        let r = Recorder::new();
        r.record(Duration::MAX);
        r.record(Duration::ZERO);
        let l = sum([&Recorders {
            handler: r,
            queue_wait: Recorder::new(),
        }]);
        assert_eq!(l.handler.count(), 2);
        assert_eq!(l.handler.max(), Duration::from_nanos(u64::MAX));
    }
}
