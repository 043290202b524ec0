//! Per-prefix rate limiting, after the response rate limiting of
//! authoritative DNS servers: a token bucket for each source prefix, kept in
//! a table of fixed size.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
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
///
/// # The controls operators use
///
/// - [`slip`](RateLimit::slip): every n-th limited request of a prefix
///   gets a small reply instead of silence (for DNS, a truncated answer
///   that sends a real client to TCP), as NSD's and BIND's RRL do.
/// - [`exempt`](RateLimit::exempt): prefixes never limited.
/// - [`dry_run`](RateLimit::dry_run): count what would be limited, and
///   limit nothing, to measure before enforcing.
///
/// With [source tokens](crate::SourceTokens), requests from validated
/// sources are not held to this limit but to their own.
#[derive(Clone)]
#[must_use]
pub struct RateLimit {
    rate: u32,
    burst: u32,
    ipv4_prefix: u8,
    ipv6_prefix: u8,
    table_size: usize,
    /// Every n-th limited request of a prefix gets the slip reply (0: off).
    slip: u32,
    slip_reply: Option<SlipReply>,
    exempt: Vec<(IpAddr, u8)>,
    dry_run: bool,
}

/// Builds a slip reply: `(request, reply) -> bool`.
#[derive(Clone)]
pub(crate) struct SlipReply(Arc<SlipFn>);

type SlipFn = dyn Fn(&[u8], &mut Vec<u8>) -> bool + Send + Sync;

impl std::ops::Deref for SlipReply {
    type Target = SlipFn;
    fn deref(&self) -> &SlipFn {
        &*self.0
    }
}

// The server catches a panic in it per datagram, as it does a handler's:
// a builder holding one is as unwind-safe as one without.
impl std::panic::UnwindSafe for SlipReply {}
impl std::panic::RefUnwindSafe for SlipReply {}

impl fmt::Debug for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimit")
            .field("rate", &self.rate)
            .field("burst", &self.burst)
            .field("ipv4_prefix", &self.ipv4_prefix)
            .field("ipv6_prefix", &self.ipv6_prefix)
            .field("table_size", &self.table_size)
            .field("slip", &self.slip)
            .field("exempt", &self.exempt)
            .field("dry_run", &self.dry_run)
            .finish()
    }
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
            slip: 0,
            slip_reply: None,
            exempt: Vec::new(),
            dry_run: false,
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

    /// Slip: every `n`-th request a prefix has limited (the 1st, the
    /// n+1-th, ...) gets a small reply, built by `reply` from the request
    /// into an empty buffer, instead of silence; `reply` returns whether
    /// there is one. For DNS that is NSD's and BIND's RRL slip: a
    /// truncated (TC=1) copy of the question, which a real client answers
    /// by asking again over TCP, where forging is not possible. With 1,
    /// every limited request gets it; 2 is the usual choice.
    ///
    /// A slipped request is still counted in
    /// [`Stats::rate_limited`](crate::Stats::rate_limited), and also in
    /// [`Stats::slipped`](crate::Stats::slipped). A slip reply larger than
    /// the request times the
    /// [amplification limit](crate::ServerBuilder::max_amplification) (or
    /// than the request, without one) is not sent: it goes to a source the
    /// limit already suspects. With [challenges](crate::SourceTokens::challenge),
    /// the chosen requests without a valid token get a challenge instead.
    ///
    /// `n` must be at least 1. Defaults to no slip: limited requests are
    /// dropped.
    pub fn slip<F>(mut self, n: u32, reply: F) -> Self
    where
        F: Fn(&[u8], &mut Vec<u8>) -> bool + Send + Sync + 'static,
    {
        self.slip = n;
        self.slip_reply = Some(SlipReply(Arc::new(reply)));
        self
    }

    /// Never limits the sources in `ip`/`bits` (for example your own
    /// monitoring, or a partner's resolvers); each call adds a prefix.
    /// Their requests are counted in
    /// [`Stats::exempt`](crate::Stats::exempt). Checked in order, on each
    /// request: meant for a handful of prefixes.
    ///
    /// `bits` must be at most 32 for IPv4 and 128 for IPv6. An IPv4
    /// prefix also covers IPv4-mapped IPv6 sources (a dual-stack socket),
    /// and an IPv4-mapped prefix of 96 bits or more (`::ffff:10.0.0.0/104`)
    /// is the IPv4 prefix (`10.0.0.0/8`). Defaults to none.
    pub fn exempt(mut self, ip: IpAddr, bits: u8) -> Self {
        // An IPv4-mapped prefix of 96 bits or more is that IPv4 prefix.
        let entry = match ip {
            IpAddr::V6(v6) if bits >= 96 => match v6.to_ipv4_mapped() {
                Some(v4) => (IpAddr::V4(v4), bits - 96),
                None => (ip, bits),
            },
            other => (other, bits),
        };
        self.exempt.push(entry);
        self
    }

    /// Dry run: limits nothing, and counts in
    /// [`Stats::dry_run_limited`](crate::Stats::dry_run_limited) each
    /// request the limit would have dropped (or slipped, or challenged).
    /// The buckets evolve exactly as they would under enforcement (a
    /// request over the limit books nothing), so the count is what
    /// enforcement would have dropped from the same traffic. On the
    /// server's rate limit it covers the
    /// [limit of validated sources](crate::SourceTokens::validated_limit)
    /// too.
    ///
    /// Defaults to off.
    pub fn dry_run(mut self, on: bool) -> Self {
        self.dry_run = on;
        self
    }

    /// Checks the settings of the limit given to `owner` (the setting
    /// that took it, which the error names: a server can have three).
    pub(crate) fn validate(&self, owner: &'static str) -> Result<(), Error> {
        let invalid = |reason| Err(Error::invalid(owner, reason));
        if self.rate == 0 {
            return invalid("RateLimit::new: rate must be at least 1 per second");
        }
        if self.burst == 0 {
            return invalid("RateLimit::new: burst must be at least 1");
        }
        if self.ipv4_prefix > 32 {
            return invalid("RateLimit::ipv4_prefix: must be between 0 and 32 bits");
        }
        if self.ipv6_prefix > 128 {
            return invalid("RateLimit::ipv6_prefix: must be between 0 and 128 bits");
        }
        if !(1..=1 << 24).contains(&self.table_size) {
            return invalid("RateLimit::table_size: must be between 1 and 16777216 entries");
        }
        if self.slip_reply.is_some() && self.slip == 0 {
            return invalid("RateLimit::slip: n must be at least 1");
        }
        for (ip, bits) in &self.exempt {
            let max = if ip.is_ipv4() { 32 } else { 128 };
            if *bits > max {
                return invalid(
                    "RateLimit::exempt: a prefix length must be at most 32 bits for IPv4, \
                     128 for IPv6",
                );
            }
        }
        Ok(())
    }

    /// Whether slip, exemptions or dry run are set (which a challenge
    /// budget does not take).
    pub(crate) fn has_controls(&self) -> bool {
        self.slip_reply.is_some() || !self.exempt.is_empty() || self.dry_run
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
    /// Requests of this prefix limited so far (for slip).
    limited: u32,
}

/// What the limiter decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Verdict {
    pub(crate) allowed: bool,
    /// Another prefix's bucket was dropped to make room.
    pub(crate) evicted: bool,
    /// Limited, and one of the requests slip picks (every n-th of its
    /// prefix).
    pub(crate) slip: bool,
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
    /// Every n-th limited request of a prefix slips (0: none).
    slip: u32,
    pub(crate) slip_reply: Option<SlipReply>,
    /// Prefixes never limited: (family, masked prefix, bits).
    exempt: Box<[(u8, u128, u8)]>,
    pub(crate) dry_run: bool,
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
            slip: if limit.slip_reply.is_some() {
                limit.slip
            } else {
                0
            },
            slip_reply: limit.slip_reply.clone(),
            exempt: limit
                .exempt
                .iter()
                .map(|&(ip, bits)| match ip {
                    IpAddr::V4(v4) => (4, u128::from(mask32(u32::from(v4), bits)), bits),
                    IpAddr::V6(v6) => (6, mask128(u128::from(v6), bits), bits),
                })
                .collect(),
            dry_run: limit.dry_run,
        }
    }

    /// Whether `slip` is set: only the requests it picks are answered small.
    pub(crate) fn slips(&self) -> bool {
        self.slip > 0
    }

    /// Whether `ip` is in an exempt prefix.
    pub(crate) fn is_exempt(&self, ip: IpAddr) -> bool {
        if self.exempt.is_empty() {
            return false;
        }
        // An IPv4 source (or IPv4-mapped, from a dual-stack socket) is
        // matched against IPv4 prefixes as itself, and against IPv6 ones
        // as its IPv4-mapped address.
        let (v4, v6) = match ip.to_canonical() {
            IpAddr::V4(v4) => (Some(u32::from(v4)), u128::from(v4.to_ipv6_mapped())),
            IpAddr::V6(v6) => (None, u128::from(v6)),
        };
        self.exempt
            .iter()
            .any(|&(family, prefix, bits)| match family {
                4 => v4.is_some_and(|v4| u128::from(mask32(v4, bits)) == prefix),
                _ => mask128(v6, bits) == prefix,
            })
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
                slip: false,
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
                return self.verdict(&mut entries[i], now, false);
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
            limited: 0,
        };
        self.verdict(slot, now, evicted)
    }

    /// Books a request on `entry`'s bucket, or counts it as limited.
    fn verdict(&self, entry: &mut Entry, now: u64, evicted: bool) -> Verdict {
        let allowed = self.book(entry, now);
        let mut slip = false;
        if !allowed {
            slip = self.slip > 0 && entry.limited % self.slip == 0;
            entry.limited = entry.limited.wrapping_add(1);
        }
        Verdict {
            allowed,
            evicted,
            slip,
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
        prefix_of(ip, self.ipv4_prefix, self.ipv6_prefix)
    }
}

/// `ip`'s family and its first `v4` or `v6` bits. An IPv4-mapped IPv6
/// source (dual-stack socket) is the IPv4 host.
fn prefix_of(ip: IpAddr, v4: u8, v6: u8) -> (u8, u128) {
    match ip.to_canonical() {
        IpAddr::V4(ip) => (4, u128::from(mask32(u32::from(ip), v4))),
        IpAddr::V6(ip) => (6, mask128(u128::from(ip), v6)),
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
                evicted: false,
                slip: false,
            }
        );
    }

    #[test]
    fn slip_picks_every_nth_limited_request_of_a_prefix() {
        let limiter = Limiter::new(&RateLimit::new(1, 2).slip(3, |_, _| true));
        let (a, b) = (v4(10, 0, 0, 1), v4(10, 0, 1, 1));
        let verdicts: Vec<_> = (0..9).map(|_| limiter.check(a, SECOND)).collect();
        let allowed = verdicts.iter().filter(|v| v.allowed).count();
        let slipped: Vec<bool> = verdicts.iter().skip(2).map(|v| v.slip).collect();
        assert_eq!(allowed, 2);
        assert_eq!(slipped, [true, false, false, true, false, false, true]);
        assert!(verdicts.iter().filter(|v| v.allowed).all(|v| !v.slip));
        // Another prefix counts for itself.
        assert!(limiter.check(b, SECOND).allowed);
        assert!(limiter.check(b, SECOND).allowed);
        assert!(limiter.check(b, SECOND).slip);
        let off = Limiter::new(&RateLimit::new(1, 1));
        assert!(off.check(a, SECOND).allowed);
        assert!(!off.check(a, SECOND).slip, "no slip unless asked");
    }

    #[test]
    fn exempt_prefixes() {
        let limit = RateLimit::new(1, 1)
            .exempt(v4(10, 1, 0, 0), 16)
            .exempt("2001:db8::".parse().unwrap_or(v4(0, 0, 0, 0)), 32);
        assert!(limit.validate("ServerBuilder::rate_limit").is_ok());
        let limiter = Limiter::new(&limit);
        assert!(limiter.is_exempt(v4(10, 1, 200, 3)));
        assert!(!limiter.is_exempt(v4(10, 2, 0, 1)));
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 1, 5, 5).to_ipv6_mapped());
        assert!(limiter.is_exempt(mapped));
        assert!(limiter.is_exempt(IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 9, 0, 0, 0, 0, 1))));
        assert!(!limiter.is_exempt(IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb9, 0, 0, 0, 0, 0, 1))));
        assert!(
            RateLimit::new(1, 1)
                .exempt(v4(1, 2, 3, 4), 33)
                .validate("ServerBuilder::rate_limit")
                .is_err()
        );
        assert!(
            RateLimit::new(1, 1)
                .slip(0, |_, _| true)
                .validate("ServerBuilder::rate_limit")
                .is_err()
        );
        let everyone = Limiter::new(&RateLimit::new(1, 1).exempt(v4(0, 0, 0, 0), 0));
        assert!(everyone.is_exempt(v4(203, 0, 113, 9)));
        assert!(
            !everyone.is_exempt(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            "IPv4 only"
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
