//! One server worker: what happens to each datagram, and the receive,
//! handle, reply loops (batched and portable).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use socket2::Socket;

use crate::config::Config;
use crate::handle::Shared;
use crate::handler::{Action, Request};
use crate::stats::Stats;
use crate::sys::{self, Received};

/// The bound every handler meets; see [`GreetServer::serve`](crate::GreetServer::serve).
pub(crate) trait HandlerFn:
    Fn(Request<'_>, &mut Vec<u8>) -> Action + Send + Sync + 'static
{
}
impl<F: Fn(Request<'_>, &mut Vec<u8>) -> Action + Send + Sync + 'static> HandlerFn for F {}

/// How long a ready reply may wait for the rest of its batch. Handlers that
/// answer in microseconds fill a batch well within it, so their replies go
/// out together in one `sendmmsg`; behind a slow handler, the replies ready
/// so far leave as soon as that handler returns, and a slow handler's own
/// reply leaves at once. A reply therefore waits at most about one handler
/// call, whatever the batch size.
const FLUSH_AFTER: Duration = Duration::from_micros(50);

/// Everything one worker thread needs.
pub(crate) struct Worker<H> {
    pub(crate) index: usize,
    pub(crate) socket: Arc<Socket>,
    pub(crate) handler: Arc<H>,
    pub(crate) config: Arc<Config>,
    pub(crate) shared: Arc<Shared>,
    /// This worker's socket is its own (or it is the first of those sharing
    /// one): it reports the socket's kernel drops as it stops.
    pub(crate) reports_drops: bool,
}

impl<H: HandlerFn> Worker<H> {
    /// Runs the receive, handle, reply loop until the server shuts down:
    /// batched where the platform allows and the builder did not ask for the
    /// portable loop.
    pub(crate) fn run(self) {
        let mut processor = Processor::new(&*self.handler, &self.config);
        match sys::Batch::new(&self.socket, &self.config) {
            Some(batch) => self.run_batched(&mut processor, batch),
            None => self.run_portable(&mut processor),
        }
        if self.reports_drops {
            processor.totals.kernel_drops = sys::kernel_drops(&self.socket).unwrap_or(0);
        }
        self.publish(&processor);
    }

    fn publish(&self, processor: &Processor<'_, H>) {
        self.shared.stats.publish(self.index, &processor.totals);
    }

    /// The batched loop: one `recvmmsg` for up to a batch of datagrams, the
    /// handler on each, and their replies sent together with one `sendmmsg`
    /// unless a slow handler makes them wait (see [`FLUSH_AFTER`]).
    fn run_batched(&self, processor: &mut Processor<'_, H>, mut batch: sys::Batch) {
        while !self.shared.is_stopped() {
            let count = match batch.recv(&self.socket) {
                Ok(count) => count,
                Err(err) => {
                    processor.recv_failed(&err, &self.shared);
                    self.publish(processor);
                    continue;
                }
            };
            let mut clock = Instant::now();
            // When the oldest reply not yet sent began to be worked on.
            let mut unsent_since = clock;
            for i in 0..count {
                if self.shared.is_stopped() {
                    processor.dropped_at_shutdown(count - i);
                    break;
                }
                let Some((datagram, reply)) = batch.datagram(i) else {
                    break;
                };
                if processor.process(&datagram, reply, clock) {
                    batch.queue_reply(i);
                }
                clock = Instant::now();
                if batch.queued() == 0 {
                    unsent_since = clock;
                } else if clock.saturating_duration_since(unsent_since) >= FLUSH_AFTER {
                    processor.sent(batch.send(&self.socket));
                    unsent_since = clock;
                    self.publish(processor);
                }
            }
            processor.sent(batch.send(&self.socket));
            self.publish(processor);
        }
    }

    /// The portable loop: one receive and one send per datagram. Used on
    /// every platform, and on Linux when the builder asks; on a
    /// wildcard-bound Linux socket it replies from each datagram's arrival
    /// address.
    fn run_portable(&self, processor: &mut Processor<'_, H>) {
        let mut buf = vec![0u8; self.config.max_datagram];
        let mut reply = Vec::with_capacity(sys::REPLY_RESERVE);
        let mut io = sys::Portable::new(self.config.pktinfo);
        while !self.shared.is_stopped() {
            match io.recv(&self.socket, &mut buf) {
                Ok(Some(_)) if self.shared.is_stopped() => processor.dropped_at_shutdown(1),
                Ok(Some(datagram)) => {
                    if processor.process(&datagram, &mut reply, Instant::now()) {
                        let ok = io.send(&self.socket, &reply).is_ok();
                        processor.sent((u64::from(ok), u64::from(!ok)));
                    }
                    sys::trim_reply(&mut reply);
                }
                // A wake-up without a datagram.
                Ok(None) => {}
                Err(err) => processor.recv_failed(&err, &self.shared),
            }
            self.publish(processor);
        }
    }
}

/// Decides the fate of each datagram and keeps the worker's running totals.
pub(crate) struct Processor<'a, H> {
    handler: &'a H,
    config: &'a Config,
    pub(crate) totals: Stats,
    /// The pause after a receive error, doubled each time one follows.
    backoff: Duration,
}

impl<'a, H: HandlerFn> Processor<'a, H> {
    pub(crate) fn new(handler: &'a H, config: &'a Config) -> Self {
        Processor {
            handler,
            config,
            totals: Stats::default(),
            backoff: Duration::ZERO,
        }
    }

    /// Counts one received datagram and decides its fate at time `now`:
    /// dropped (truncated, a source that cannot be answered, over the rate
    /// limit), or handed to the handler, whose reply may still be held back
    /// by the amplification limit.
    ///
    /// Returns `true` when `reply` holds a reply to send; the caller then
    /// reports how the send went with [`Processor::sent`]. Every other
    /// outcome is counted here.
    pub(crate) fn process(
        &mut self,
        datagram: &Received<'_>,
        reply: &mut Vec<u8>,
        now: Instant,
    ) -> bool {
        self.totals.received += 1;
        self.backoff = Duration::ZERO;
        let peer = datagram.peer;
        if datagram.truncated {
            self.totals.truncated += 1;
            return false;
        }
        if !can_answer(peer) {
            self.totals.bad_source += 1;
            return false;
        }
        if let Some(limiter) = &self.config.limiter {
            let verdict = limiter.check(peer.ip(), limiter.clock(now));
            self.totals.rate_limit_evictions += u64::from(verdict.evicted);
            if !verdict.allowed {
                self.totals.rate_limited += 1;
                return false;
            }
        }
        reply.clear();
        let local = datagram.local.or(self.config.bound_ip);
        let request = Request::new(datagram.data, peer, same_family(local, peer));
        let handler = self.handler;
        // A panic is caught per datagram so that one bad request cannot stop
        // the server. The reply buffer is cleared after it; whatever state
        // the handler shares between calls is the handler's to keep sound,
        // as with any `Fn + Sync` shared by threads.
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| handler(request, reply)));
        match outcome {
            Ok(Action::Reply) => {
                let limit = self.config.max_amplification;
                if limit
                    .is_some_and(|factor| reply.len() > factor.saturating_mul(datagram.data.len()))
                {
                    self.totals.amplification_capped += 1;
                    return false;
                }
                true
            }
            Ok(Action::Ignore) => {
                self.totals.no_reply += 1;
                false
            }
            Err(payload) => {
                self.totals.handler_panics += 1;
                reply.clear();
                // Dropping a panic payload can itself panic; that second
                // panic must not escape either.
                if let Err(again) = panic::catch_unwind(AssertUnwindSafe(|| drop(payload))) {
                    std::mem::forget(again);
                }
                false
            }
        }
    }

    /// Counts `count` datagrams received but left unhandled because the
    /// server is shutting down.
    pub(crate) fn dropped_at_shutdown(&mut self, count: usize) {
        let count = count as u64;
        self.totals.received += count;
        self.totals.shutdown_dropped += count;
    }

    /// Counts the outcome of sending replies: how many were sent, how many
    /// failed.
    pub(crate) fn sent(&mut self, (replied, failed): (u64, u64)) {
        self.totals.replied += replied;
        self.totals.send_errors += failed;
    }

    /// Handles a failed receive call. The loop always goes on: errors that
    /// report ICMP messages for earlier replies are counted and ignored, and
    /// anything else is counted and followed by a short, growing pause so a
    /// persistent failure cannot spin the CPU.
    pub(crate) fn recv_failed(&mut self, err: &io::Error, shared: &Shared) {
        if crate::error::is_timeout(err) {
            return;
        }
        self.totals.recv_errors += 1;
        if is_icmp_report(err) || shared.is_stopped() {
            return;
        }
        self.backoff = (self.backoff * 2).clamp(MIN_BACKOFF, MAX_BACKOFF);
        thread::sleep(self.backoff);
    }
}

const MIN_BACKOFF: Duration = Duration::from_millis(1);
const MAX_BACKOFF: Duration = Duration::from_millis(32);

/// The local address in the peer's family: on a dual-stack socket an IPv4
/// peer is seen as an IPv4-mapped IPv6 address, and so is the address it
/// sent to.
fn same_family(local: Option<IpAddr>, peer: SocketAddr) -> Option<IpAddr> {
    match (local, peer) {
        (Some(IpAddr::V4(ip)), SocketAddr::V6(_)) => Some(IpAddr::V6(ip.to_ipv6_mapped())),
        (local, _) => local,
    }
}

/// Whether a reply may go to `peer`: never to port 0 (no one listens there;
/// a request "from" it is forged), nor to an unspecified, multicast or
/// broadcast address, which would turn one request into many replies.
fn can_answer(peer: SocketAddr) -> bool {
    if peer.port() == 0 {
        return false;
    }
    match peer.ip().to_canonical() {
        IpAddr::V4(ip) => !(ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast()),
        IpAddr::V6(ip) => !(ip.is_unspecified() || ip.is_multicast()),
    }
}

/// Errors a UDP socket reports on receive for an ICMP message about an
/// earlier send, rather than for the receive itself.
fn is_icmp_report(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
    )
}
