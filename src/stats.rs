//! Server counters: a lock-free slot per worker thread, summed when read.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::histogram::{self, Latency, Recorders};

/// A snapshot of a server's counters, summed over its workers.
///
/// Every datagram the server takes from its sockets is counted in
/// `received` and, once dealt with, in exactly one outcome counter. Every
/// snapshot shows `received == `[`accounted()`](Stats::accounted)` +
/// `[`in_flight()`](Stats::in_flight): the requests not yet accounted for
/// are queued or being handled, and once the server has stopped there are
/// none. No counter ever goes backwards from one snapshot to the next.
///
/// Some counters describe requests rather than end them (`validated`,
/// `invalid_tokens`, `exempt`, `dry_run_limited`; `slipped` is part of
/// `rate_limited`): each such request also ends in one outcome. While the
/// server runs, they may lag that outcome by a moment (a receive worker
/// publishes them after a handler thread may have counted the reply);
/// once the server has stopped they are exact.
///
/// ```
/// # fn main() -> Result<(), udp_greet::Error> {
/// use udp_greet::{GreetClient, GreetServer};
///
/// let server = GreetServer::bind("127.0.0.1:0")?.spawn(udp_greet::greet)?;
/// GreetClient::connect(server.local_addr())?.send_recv(b"Tracy")?;
/// let stats = server.shutdown()?;
/// assert_eq!((stats.received, stats.replied), (1, 1));
/// assert_eq!(stats.received, stats.accounted());
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Datagrams taken from the socket, whatever became of them.
    pub received: u64,
    /// Replies handed to the kernel.
    pub replied: u64,
    /// Requests for which the handler returned [`Action::Ignore`](crate::Action::Ignore).
    pub no_reply: u64,
    /// Requests dropped unanswered because they were larger than the largest
    /// accepted datagram (the kernel reported them truncated), or because
    /// the kernel could not deliver their control data whole.
    pub truncated: u64,
    /// Requests whose handler panicked; no reply was sent.
    pub handler_panics: u64,
    /// Requests dropped by the [rate limit](crate::RateLimit), before the
    /// handler saw them.
    pub rate_limited: u64,
    /// Replies not sent because they were larger than the
    /// [amplification limit](crate::ServerBuilder::max_amplification)
    /// allows for the request's size.
    pub amplification_capped: u64,
    /// Requests from a source no reply may go to (port 0, an unspecified,
    /// multicast or broadcast address): never handed to the handler.
    pub bad_source: u64,
    /// Replies the kernel refused to send (for example `EMSGSIZE`).
    pub send_errors: u64,
    /// Requests already received but not yet handled when the server was
    /// shut down: dropped unanswered (a batch is not finished once shutdown
    /// has begun, and a handler pool's queue is dropped once its
    /// [drain time](crate::HandlerPool::drain_timeout) is over).
    pub shutdown_dropped: u64,
    /// Requests shed because the
    /// [handler pool](crate::ServerBuilder::handler_pool)'s queue was
    /// full, or because the async server had
    /// `max_in_flight` (async `Limits`) handlers
    /// running: dropped, or answered with the
    /// [busy reply](crate::HandlerPool::overload_reply), at once.
    pub overloaded: u64,
    /// Requests dropped unanswered by a handler thread because they had
    /// waited in the queue longer than
    /// [`max_queue_wait`](crate::HandlerPool::max_queue_wait).
    pub expired: u64,
    /// Failed receive calls. These are not datagrams: on an unconnected
    /// socket they mostly report ICMP errors for earlier replies, and the
    /// server keeps going.
    pub recv_errors: u64,
    /// Datagrams the kernel dropped before the server could take them,
    /// because the receive buffer was full: the socket's drop counter (the
    /// one `SO_RXQ_OVFL` reports), read with `SO_MEMINFO`. Not part of
    /// `received`. Always 0 where the platform does not report it (only
    /// Linux does).
    pub kernel_drops: u64,
    /// Prefixes whose rate-limit bucket was reused for another prefix
    /// because the table was full (see [`RateLimit`](crate::RateLimit)).
    pub rate_limit_evictions: u64,
    /// Receives (or queue checks, on handler-pool threads) made while
    /// [busy polling](crate::ServerBuilder::busy_poll) that found nothing:
    /// what polling costs. It stops growing once the server is idle.
    pub busy_poll_misses: u64,
    /// Requests whose async handler (feature `tokio`) ran
    /// longer than `handler_timeout` (async `Limits`):
    /// its future was dropped and nothing was sent.
    pub timed_out: u64,
    /// Requests waiting in the [handler pool](crate::ServerBuilder::handler_pool)'s
    /// queue when the snapshot was taken: a gauge, not a counter (part of
    /// [`in_flight`](Stats::in_flight), never more than it in any
    /// snapshot). Always 0 without a pool.
    pub queued: u64,
    /// Requests that carried a valid [source token](crate::SourceTokens)
    /// for their address: not forged. They also end in an outcome, usually
    /// `replied`.
    pub validated: u64,
    /// Requests that carried a token that did not check out (forged,
    /// expired, made for another address, or under a rotated-out secret):
    /// treated as carrying none.
    pub invalid_tokens: u64,
    /// Requests answered with a [challenge](crate::SourceTokens::challenge)
    /// (a small reply with a fresh token) instead of being dropped by the
    /// rate limit or the overload policy; not handed to the handler, and
    /// the challenge is not counted in `replied`.
    pub challenged: u64,
    /// Of `rate_limited`, requests that got the rate limit's
    /// [slip](crate::RateLimit::slip) reply.
    pub slipped: u64,
    /// Requests from a prefix the rate limit
    /// [exempts](crate::RateLimit::exempt); they also end in an outcome.
    pub exempt: u64,
    /// Requests the rate limit would have dropped, let through by its
    /// [dry run](crate::RateLimit::dry_run); they also end in an outcome.
    pub dry_run_limited: u64,
    /// Frames the AF_XDP engine (`ServerBuilder::xdp`, feature `xdp`)
    /// took from a receive queue and refused: malformed (a length
    /// longer than the frame, a bad IPv4 header checksum, a UDP checksum
    /// of zero over IPv6, ...), not for the server, or from a source the
    /// kernel would refuse (a martian address, or one of this host's own,
    /// which the XDP path does not check for it). Dropped unanswered;
    /// not part of `received`. Always 0 on the socket path, where the
    /// kernel drops such datagrams itself.
    pub malformed: u64,
}

/// Declares the counters once, in the order they are published and read.
macro_rules! counters {
    ($($field:ident),* $(,)?) => {
        /// How many counters `Stats` has.
        const FIELDS: usize = [$(stringify!($field)),*].len();

        impl Stats {
            /// The counters' names, in [`Stats::to_array`] order.
            #[allow(dead_code)] // used by the `metrics` feature
            pub(crate) const NAMES: [&'static str; FIELDS] = [$(stringify!($field)),*];

            pub(crate) fn to_array(self) -> [u64; FIELDS] {
                [$(self.$field),*]
            }

            fn from_array(values: [u64; FIELDS]) -> Self {
                let [$($field),*] = values;
                Stats { $($field,)* ..Stats::default() }
            }
        }
    };
}

counters!(
    received,
    replied,
    no_reply,
    truncated,
    handler_panics,
    rate_limited,
    amplification_capped,
    bad_source,
    send_errors,
    shutdown_dropped,
    overloaded,
    expired,
    recv_errors,
    kernel_drops,
    rate_limit_evictions,
    busy_poll_misses,
    timed_out,
    validated,
    invalid_tokens,
    challenged,
    slipped,
    exempt,
    dry_run_limited,
    malformed,
);

/// Where `received` is in [`Stats::to_array`]: published first, read last.
const RECEIVED: usize = 0;
/// Where `kernel_drops` is in [`Stats::to_array`].
const KERNEL_DROPS: usize = 13;

impl Stats {
    /// The outcome counters' names: the ones [`Stats::accounted`] sums.
    #[allow(dead_code)] // used by the `metrics` feature
    pub(crate) const OUTCOMES: [&'static str; 13] = [
        "replied",
        "no_reply",
        "truncated",
        "handler_panics",
        "rate_limited",
        "amplification_capped",
        "bad_source",
        "send_errors",
        "shutdown_dropped",
        "overloaded",
        "expired",
        "timed_out",
        "challenged",
    ];

    /// The sum of the outcome counters: every received datagram ends in
    /// exactly one of `replied`, `no_reply`, `truncated`, `handler_panics`,
    /// `rate_limited`, `amplification_capped`, `bad_source`, `send_errors`,
    /// `shutdown_dropped`, `overloaded`, `expired`, `timed_out` and
    /// `challenged`.
    #[must_use]
    pub fn accounted(&self) -> u64 {
        self.replied
            + self.no_reply
            + self.truncated
            + self.handler_panics
            + self.rate_limited
            + self.amplification_capped
            + self.bad_source
            + self.send_errors
            + self.shutdown_dropped
            + self.overloaded
            + self.expired
            + self.timed_out
            + self.challenged
    }

    /// Requests received and not yet accounted for: in a batch being worked
    /// through, in a handler pool's queue, or in a handler call.
    /// `received == accounted() + in_flight()` in every snapshot; it is 0
    /// once the server has stopped (unless
    /// [`shutdown_timeout`](crate::ServerHandle::shutdown_timeout) left a
    /// handler that never returned).
    #[must_use]
    pub fn in_flight(&self) -> u64 {
        self.received.saturating_sub(self.accounted())
    }

    fn add(&self, other: &Stats) -> Stats {
        let mut sum = self.to_array();
        for (total, value) in sum.iter_mut().zip(other.to_array()) {
            *total += value;
        }
        Stats::from_array(sum)
    }
}

/// One worker's published counters, on a cache line of their own so that
/// workers never write to the same line.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Slot([AtomicU64; FIELDS]);

/// The counters and latency histograms of every thread of one server:
/// receive workers first, then handler threads.
#[derive(Debug)]
pub(crate) struct SharedStats {
    slots: Box<[Slot]>,
    latency: Box<[Recorders]>,
}

impl SharedStats {
    pub(crate) fn new(threads: usize) -> Arc<Self> {
        Arc::new(SharedStats {
            slots: (0..threads).map(|_| Slot::default()).collect(),
            latency: (0..threads).map(|_| Recorders::new()).collect(),
        })
    }

    /// Thread `index`'s histograms, which only that thread records into.
    pub(crate) fn recorders(&self, index: usize) -> Option<&Recorders> {
        self.latency.get(index)
    }

    /// The histograms summed over every thread.
    pub(crate) fn latency(&self) -> Latency {
        histogram::sum(self.latency.iter())
    }

    /// The sum over all workers. `live_drops(i)` gives worker `i`'s socket's
    /// kernel drop count while that socket is open; once it is closed, the
    /// highest count seen is used. `queued()` gives the handler pool's queue
    /// depth (`None` without a pool); it is called between reading the
    /// outcomes and reading `received`.
    ///
    /// No snapshot shows more outcomes than datagrams received, nor more
    /// requests queued than in flight. A request's outcome is published
    /// after its `received` count was (by the same thread, or by the
    /// receive worker before it queued the request for a handler thread),
    /// each with a release store, and a queued request's `received` is
    /// published before it enters the queue, its outcome only after it has
    /// left it. This reads every thread's outcomes (acquire), then the
    /// queue depth (under the pool's lock), then every thread's `received`
    /// (acquire): the `received` it reads are at least as new as the
    /// outcomes and include every request it saw queued, none of whose
    /// outcomes it read; and every outcome counter only grows.
    ///
    /// With `only`, the sum is over those slots alone (one listener's).
    pub(crate) fn snapshot_with_queue(
        &self,
        only: Option<&[usize]>,
        live_drops: impl Fn(usize) -> Option<u64>,
        queued: impl FnOnce() -> Option<usize>,
    ) -> Stats {
        match only {
            Some(only) => self.sum(only.iter().copied(), live_drops, queued),
            None => self.sum(0..self.slots.len(), live_drops, queued),
        }
    }

    /// The sum over the slots `chosen` (see
    /// [`snapshot_with_queue`](SharedStats::snapshot_with_queue)).
    fn sum(
        &self,
        chosen: impl Iterator<Item = usize> + Clone,
        live_drops: impl Fn(usize) -> Option<u64>,
        queued: impl FnOnce() -> Option<usize>,
    ) -> Stats {
        let mut sum = Stats::default();
        for (i, slot) in chosen.clone().filter_map(|i| Some((i, self.slots.get(i)?))) {
            let mut values = [0u64; FIELDS];
            for (field, (value, counter)) in values.iter_mut().zip(&slot.0).enumerate() {
                if field != RECEIVED {
                    *value = counter.load(Ordering::Acquire);
                }
            }
            if let Some(drops) = live_drops(i) {
                // Kept as a high-water mark, so that the count published as
                // the socket closed never reads lower than a live one did.
                let seen = slot.0[KERNEL_DROPS].fetch_max(drops, Ordering::Relaxed);
                values[KERNEL_DROPS] = seen.max(drops);
            }
            sum = sum.add(&Stats::from_array(values));
        }
        sum.queued = queued().unwrap_or(0) as u64;
        for slot in chosen.filter_map(|i| self.slots.get(i)) {
            sum.received += slot.0[RECEIVED].load(Ordering::Acquire);
        }
        sum
    }

    /// Publishes worker `index`'s running totals. Only that worker writes its
    /// slot's counters (a reader may raise `kernel_drops`, hence its
    /// `fetch_max`).
    /// Publishes worker `index`'s count of datagrams received, alone: as a
    /// batch arrives, before any of it is handled, so that a request in a
    /// handler call is in flight in every snapshot.
    pub(crate) fn publish_received(&self, index: usize, received: u64) {
        if let Some(slot) = self.slots.get(index) {
            slot.0[RECEIVED].store(received, Ordering::Release);
        }
    }

    pub(crate) fn publish(&self, index: usize, totals: &Stats) {
        let Some(slot) = self.slots.get(index) else {
            return;
        };
        let values = totals.to_array();
        slot.0[RECEIVED].store(values[RECEIVED], Ordering::Release);
        for (field, (counter, value)) in slot.0.iter().zip(values).enumerate() {
            match field {
                RECEIVED => {}
                KERNEL_DROPS if value > 0 => {
                    counter.fetch_max(value, Ordering::Release);
                }
                KERNEL_DROPS => {}
                _ => counter.store(value, Ordering::Release),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_positions_match_the_array() {
        let stats = Stats {
            received: 3,
            kernel_drops: 7,
            ..Stats::default()
        };
        let values = stats.to_array();
        assert_eq!(values[RECEIVED], 3);
        assert_eq!(values[KERNEL_DROPS], 7);
        assert_eq!(Stats::from_array(values), stats);
    }

    #[test]
    fn the_outcome_names_are_what_accounted_sums() {
        // Each counter a distinct power of two, so the sum names them.
        let mut values = [0u64; FIELDS];
        for (i, value) in values.iter_mut().enumerate() {
            *value = 1 << i;
        }
        let stats = Stats::from_array(values);
        let named: u64 = Stats::NAMES
            .iter()
            .zip(values)
            .filter(|(name, _)| Stats::OUTCOMES.contains(name))
            .map(|(_, value)| value)
            .sum();
        assert_eq!(named, stats.accounted());
        assert!(Stats::OUTCOMES.iter().all(|o| Stats::NAMES.contains(o)));
    }

    #[test]
    fn kernel_drops_never_go_back_once_the_socket_closes() {
        let shared = SharedStats::new(1);
        assert_eq!(
            shared
                .snapshot_with_queue(None, |_| Some(5), || None)
                .kernel_drops,
            5
        );
        // The worker published a lower count as it stopped; the socket is gone.
        let stopped = Stats {
            kernel_drops: 4,
            ..Stats::default()
        };
        shared.publish(0, &stopped);
        assert_eq!(
            shared
                .snapshot_with_queue(None, |_| None, || None)
                .kernel_drops,
            5
        );
    }
}
