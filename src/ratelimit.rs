//! Per-prefix rate limiting, after the response rate limiting of
//! authoritative DNS servers: a token bucket for each source prefix, kept in
//! a table of fixed size.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use crate::error::Error;

/// A per-source rate limit for a server: each source prefix (an IPv4 /24 or
/// an IPv6 /56 by default) may have `burst` requests answered at once, and
/// then `rate` per second.
///
/// Over any span of time `t`, one prefix gets at most `rate × t + burst`
/// requests through; the rest are dropped unanswered and counted in
/// [`Stats::rate_limited`](crate::Stats::rate_limited). Prefixes rather
/// than single addresses are limited because an attacker forging source
/// addresses usually controls, or aims at, a whole network.
///
/// The buckets live in a table of fixed size
/// ([`table_size`](RateLimit::table_size)), so a flood from a million forged
/// sources cannot make it grow. A prefix idle long enough for its bucket to
/// refill takes no room. When every slot a new prefix could use is busy, the
/// one nearest to refilled is reused and counted in
/// [`Stats::rate_limit_evictions`](crate::Stats::rate_limit_evictions); the
/// prefix it held starts afresh with a full bucket when it comes back.
///
/// ```
/// # fn main() -> Result<(), udp_greet::Error> {
/// use udp_greet::{GreetServer, RateLimit};
///
/// let server = GreetServer::builder()
///     .rate_limit(RateLimit::new(50, 10).ipv4_prefix(24).ipv6_prefix(56))
///     .bind("127.0.0.1:0")?;
/// # drop(server);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct RateLimit {
    rate: u32,
    burst: u32,
    ipv4_prefix: u8,
    ipv6_prefix: u8,
    table_size: usize,
}

impl RateLimit {
    /// `rate` requests per second per prefix, after a first `burst`.
    ///
    /// Both must be at least 1 (checked when the server is bound).
    pub fn new(rate: u32, burst: u32) -> Self {
        RateLimit {
            rate,
            burst,
            ipv4_prefix: 24,
            ipv6_prefix: 56,
            table_size: 16_384,
        }
    }

    /// How many leading bits of an IPv4 source make its prefix (0 to 32).
    ///
    /// Defaults to 24.
    pub fn ipv4_prefix(mut self, bits: u8) -> Self {
        self.ipv4_prefix = bits;
        self
    }

    /// How many leading bits of an IPv6 source make its prefix (0 to 128).
    ///
    /// Defaults to 56, a typical end-site assignment.
    pub fn ipv6_prefix(mut self, bits: u8) -> Self {
        self.ipv6_prefix = bits;
        self
    }

    /// How many prefixes the table tracks at once (1 to 16 777 216), 32
    /// bytes each, allocated when the server is bound.
    ///
    /// Defaults to 16 384 (512 KiB).
    pub fn table_size(mut self, entries: usize) -> Self {
        self.table_size = entries;
        self
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        let invalid = |setting, reason| Err(Error::invalid(setting, reason));
        if self.rate == 0 {
            return invalid("RateLimit::new", "rate must be at least 1 per second");
        }
        if self.burst == 0 {
            return invalid("RateLimit::new", "burst must be at least 1");
        }
        if self.ipv4_prefix > 32 {
            return invalid("RateLimit::ipv4_prefix", "must be between 0 and 32 bits");
        }
        if self.ipv6_prefix > 128 {
            return invalid("RateLimit::ipv6_prefix", "must be between 0 and 128 bits");
        }
        if !(1..=1 << 24).contains(&self.table_size) {
            return invalid(
                "RateLimit::table_size",
                "must be between 1 and 16777216 entries",
            );
        }
        Ok(())
    }
}

/// Slots probed for a prefix, from the one its hash picks.
const PROBE: usize = 8;
/// Independent locks over the table, so workers rarely wait on each other.
const MAX_SHARDS: usize = 64;

/// One tracked prefix: its key and the time, in nanoseconds since the
/// limiter started, at which its bucket is next empty-handed (the
/// "theoretical arrival time" of the generic cell rate algorithm).
#[derive(Debug, Clone, Copy, Default)]
struct Entry {
    /// 0 for a free slot, 4 or 6 for a prefix of that family.
    family: u8,
    prefix: u128,
    tat: u64,
}

/// What the limiter decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Verdict {
    pub(crate) allowed: bool,
    /// Another prefix's bucket was dropped to make room.
    pub(crate) evicted: bool,
}

/// The shared table behind one server's [`RateLimit`].
pub(crate) struct Limiter {
    shards: Box<[Mutex<Box<[Entry]>>]>,
    /// Nanoseconds between two requests at the sustained rate.
    interval: u64,
    /// How far ahead of now a bucket may be booked: `burst` intervals.
    tolerance: u64,
    ipv4_prefix: u8,
    ipv6_prefix: u8,
    /// Keyed per limiter, so senders cannot aim prefixes at one slot.
    hasher: RandomState,
    epoch: Instant,
}

impl fmt::Debug for Limiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limiter")
            .field("interval_ns", &self.interval)
            .field("tolerance_ns", &self.tolerance)
            .field("ipv4_prefix", &self.ipv4_prefix)
            .field("ipv6_prefix", &self.ipv6_prefix)
            .field("shards", &self.shards.len())
            .finish_non_exhaustive()
    }
}

impl Limiter {
    pub(crate) fn new(limit: &RateLimit) -> Limiter {
        let shards = limit.table_size.clamp(1, MAX_SHARDS);
        let per_shard = limit.table_size.div_ceil(shards).max(1);
        let interval = 1_000_000_000 / u64::from(limit.rate.max(1));
        Limiter {
            shards: (0..shards)
                .map(|_| Mutex::new(vec![Entry::default(); per_shard].into_boxed_slice()))
                .collect(),
            interval: interval.max(1),
            tolerance: interval
                .max(1)
                .saturating_mul(u64::from(limit.burst.max(1))),
            ipv4_prefix: limit.ipv4_prefix,
            ipv6_prefix: limit.ipv6_prefix,
            hasher: RandomState::new(),
            epoch: Instant::now(),
        }
    }

    /// `at` in the limiter's clock: nanoseconds since it started.
    pub(crate) fn clock(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Whether a request from `ip` at `now` may be answered; books it if so.
    pub(crate) fn check(&self, ip: IpAddr, now: u64) -> Verdict {
        let (family, prefix) = self.prefix_of(ip);
        let hash = self.hasher.hash_one((family, prefix));
        let shard_index = (hash as usize) % self.shards.len();
        let Some(shard) = self.shards.get(shard_index) else {
            return Verdict {
                allowed: true,
                evicted: false,
            };
        };
        let mut entries = lock(shard);
        let len = entries.len();
        let start = ((hash >> 32) as usize) % len;
        let probe = PROBE.min(len);

        let mut spare = None; // a free or refilled slot
        let mut oldest = start; // else the one nearest to refilled
        for k in 0..probe {
            let i = (start + k) % len;
            let entry = entries[i];
            if entry.family == family && entry.prefix == prefix {
                return Verdict {
                    allowed: self.book(&mut entries[i], now),
                    evicted: false,
                };
            }
            if spare.is_none() && (entry.family == 0 || entry.tat <= now) {
                spare = Some(i);
            }
            if entry.tat < entries[oldest].tat {
                oldest = i;
            }
        }
        let evicted = spare.is_none();
        let slot = &mut entries[spare.unwrap_or(oldest)];
        *slot = Entry {
            family,
            prefix,
            tat: now,
        };
        Verdict {
            allowed: self.book(slot, now),
            evicted,
        }
    }

    /// The generic cell rate algorithm: a request is allowed when booking
    /// one more interval keeps the bucket within `burst` intervals of now.
    fn book(&self, entry: &mut Entry, now: u64) -> bool {
        let next = entry.tat.max(now).saturating_add(self.interval);
        if next - now > self.tolerance {
            return false;
        }
        entry.tat = next;
        true
    }

    fn prefix_of(&self, ip: IpAddr) -> (u8, u128) {
        // An IPv4-mapped IPv6 source (dual-stack socket) is the IPv4 host.
        match ip.to_canonical() {
            IpAddr::V4(v4) => (4, u128::from(mask32(u32::from(v4), self.ipv4_prefix))),
            IpAddr::V6(v6) => (6, mask128(u128::from(v6), self.ipv6_prefix)),
        }
    }
}

fn mask32(bits: u32, keep: u8) -> u32 {
    bits.checked_shr(32 - u32::from(keep.min(32)))
        .and_then(|b| b.checked_shl(32 - u32::from(keep.min(32))))
        .unwrap_or(0)
}

fn mask128(bits: u128, keep: u8) -> u128 {
    bits.checked_shr(128 - u32::from(keep.min(128)))
        .and_then(|b| b.checked_shl(128 - u32::from(keep.min(128))))
        .unwrap_or(0)
}

fn lock(shard: &Mutex<Box<[Entry]>>) -> MutexGuard<'_, Box<[Entry]>> {
    // Nothing in `check` panics while the lock is held; should a poisoned
    // lock ever appear, the table is still consistent.
    shard.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::time::Duration;

    /// The span after which an unused bucket is full again.
    fn refill_time(limiter: &Limiter) -> Duration {
        Duration::from_nanos(limiter.tolerance)
    }

    const SECOND: u64 = 1_000_000_000;

    fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    }

    #[test]
    fn burst_then_rate() {
        let limiter = Limiter::new(&RateLimit::new(10, 3));
        let ip = v4(192, 0, 2, 1);
        let t0 = 5 * SECOND;
        let allowed = (0..10).filter(|_| limiter.check(ip, t0).allowed).count();
        assert_eq!(allowed, 3, "the burst, then nothing at the same instant");
        // One interval later (100 ms at 10/s), exactly one more.
        let t1 = t0 + SECOND / 10;
        let allowed = (0..10).filter(|_| limiter.check(ip, t1).allowed).count();
        assert_eq!(allowed, 1);
        assert_eq!(refill_time(&limiter), Duration::from_millis(300));
    }

    #[test]
    fn never_more_than_rate_times_time_plus_burst() {
        let (rate, burst) = (20u64, 5u64);
        let limiter = Limiter::new(&RateLimit::new(rate as u32, burst as u32));
        let ip = v4(198, 51, 100, 7);
        // A request every millisecond for 3 seconds.
        let mut allowed = 0u64;
        for ms in 0..3_000u64 {
            if limiter.check(ip, ms * SECOND / 1000).allowed {
                allowed += 1;
            }
        }
        assert!(allowed <= rate * 3 + burst, "{allowed}");
        assert!(allowed >= rate * 3 + burst - 1, "{allowed}");
    }

    #[test]
    fn prefixes_share_a_bucket_and_others_do_not() {
        let limiter = Limiter::new(&RateLimit::new(1, 2));
        let now = SECOND;
        assert!(limiter.check(v4(10, 1, 2, 3), now).allowed);
        assert!(limiter.check(v4(10, 1, 2, 200), now).allowed);
        assert!(!limiter.check(v4(10, 1, 2, 99), now).allowed, "same /24");
        assert!(limiter.check(v4(10, 1, 3, 3), now).allowed, "another /24");
        let a = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0x00ff, 1, 2, 3, 4));
        let b = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0x0011, 9, 9, 9, 9));
        let c = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0x0100, 1, 2, 3, 4));
        assert!(limiter.check(a, now).allowed);
        assert!(limiter.check(b, now).allowed);
        assert!(!limiter.check(a, now).allowed, "same /56");
        assert!(limiter.check(c, now).allowed, "another /56");
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 1, 2, 7).to_ipv6_mapped());
        assert!(!limiter.check(mapped, now).allowed, "IPv4-mapped is IPv4");
    }

    #[test]
    fn table_is_bounded_and_evicts_the_nearest_to_refilled() {
        let limiter = Limiter::new(&RateLimit::new(1, 1).table_size(8));
        let total: usize = limiter.shards.iter().map(|s| lock(s).len()).sum();
        assert_eq!(total, 8);
        let now = SECOND;
        let mut evictions = 0;
        // A million forged /24s at one instant.
        for i in 0..1_000_000u32 {
            let ip = IpAddr::V4(Ipv4Addr::from(i << 8));
            let verdict = limiter.check(ip, now);
            assert!(verdict.allowed, "a new prefix starts with a full bucket");
            evictions += usize::from(verdict.evicted);
        }
        assert_eq!(evictions, 1_000_000 - 8);
        let total: usize = limiter.shards.iter().map(|s| lock(s).len()).sum();
        assert_eq!(total, 8, "no growth");
        // Refilled buckets take no room: later, nothing needs evicting.
        let later = now + 10 * SECOND;
        let ip = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1));
        assert_eq!(
            limiter.check(ip, later),
            Verdict {
                allowed: true,
                evicted: false
            }
        );
    }

    #[test]
    fn masks() {
        assert_eq!(mask32(0xc0a8_0101, 24), 0xc0a8_0100);
        assert_eq!(mask32(0xc0a8_0101, 32), 0xc0a8_0101);
        assert_eq!(mask32(0xc0a8_0101, 0), 0);
        assert_eq!(mask128(u128::MAX, 56), u128::MAX << 72);
        assert_eq!(mask128(u128::MAX, 0), 0);
        assert_eq!(mask128(7, 128), 7);
    }
}
