//! The server's threads: receive workers (batched and portable loops, with
//! handlers inline or handed to the pool) and handler-pool threads, and
//! what happens to each datagram.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, Weak};
use std::thread;
use std::time::{Duration, Instant};

use socket2::Socket;

use crate::busy_poll::PollWindow;
use crate::config::Config;
use crate::handle::Shared;
use crate::handler::{Action, Request};
use crate::latency::Recorders;
use crate::observe::Observer;
use crate::pool::{HandlerPool, Pool, Submitted, Taken};
use crate::stats::SharedStats;
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

/// Everything one receive worker needs.
pub(crate) struct Worker<H> {
    /// Its counter slot.
    pub(crate) index: usize,
    pub(crate) socket: Arc<Socket>,
    /// Which of the server's sockets `socket` is.
    pub(crate) socket_index: usize,
    pub(crate) handler: Arc<H>,
    pub(crate) config: Arc<Config>,
    pub(crate) shared: Arc<Shared>,
    /// Where requests go when handlers do not run inline.
    pub(crate) pool: Option<Arc<Pool>>,
    /// This worker's socket is its own (or it is the first of those sharing
    /// one): it reports the socket's kernel drops as it stops.
    pub(crate) reports_drops: bool,
}

impl<H: HandlerFn> Worker<H> {
    /// Runs the receive loop until the server shuts down: batched where the
    /// platform allows and the builder did not ask for the portable loop.
    pub(crate) fn run(self) {
        let mut processor = Processor::new(&self.config, &self.shared.stats, self.index);
        match sys::Batch::new(&self.socket, self.config.batch_spec()) {
            Some(batch) => self.run_batched(&mut processor, batch),
            None => self.run_portable(&mut processor),
        }
        if self.reports_drops {
            processor.totals.kernel_drops = sys::kernel_drops(&self.socket).unwrap_or(0);
        }
        self.publish(&mut processor);
    }

    fn publish(&self, processor: &mut Processor) {
        let drops = self.reports_drops.then_some(&*self.socket);
        publish(&self.shared, self.index, processor, drops);
    }

    /// The batched loop: one `recvmmsg` for up to a batch of datagrams, each
    /// handled inline or queued for the pool, and the replies sent together
    /// with one `sendmmsg` unless a slow handler makes them wait (see
    /// [`FLUSH_AFTER`]).
    fn run_batched(&self, processor: &mut Processor, mut batch: sys::Batch) {
        let mut poll = PollWindow::new(self.config.busy_poll);
        while !self.shared.is_stopped() {
            let polling = poll.poll_now(|| self.publish(processor));
            let count = match batch.recv(&self.socket, polling) {
                Ok(count) => count,
                Err(err) if polling && crate::error::is_timeout(&err) => {
                    processor.totals.busy_poll_misses += 1;
                    std::hint::spin_loop();
                    continue;
                }
                Err(err) => {
                    processor.recv_failed(&err, &self.shared);
                    self.publish(processor);
                    continue;
                }
            };
            let arrived = Instant::now();
            processor.totals.received += count as u64;
            if self.pool.is_some() {
                // Published before any request is handed on, so that no
                // snapshot counts an outcome (published by a handler
                // thread) whose arrival it does not.
                self.publish(processor);
            }
            let mut clock = arrived;
            // When the oldest reply not yet sent began to be worked on.
            let mut unsent_since = clock;
            for i in 0..count {
                if self.shared.is_stopped() {
                    processor.totals.shutdown_dropped += (count - i) as u64;
                    break;
                }
                let Some((datagram, reply)) = batch.datagram(i) else {
                    break;
                };
                if !processor.admit(&datagram, clock) {
                    continue;
                }
                if let Some(pool) = &self.pool {
                    if processor.submit(pool, &datagram, self.socket_index, arrived, reply) {
                        batch.queue_reply(i, false);
                    }
                    continue;
                }
                let ready =
                    processor.handle_timed(&*self.handler, &datagram, reply, arrived, clock);
                if ready {
                    batch.queue_reply(i, true);
                }
                clock = Instant::now();
                processor.handled_at(clock);
                if batch.queued() == 0 {
                    unsent_since = clock;
                } else if clock.saturating_duration_since(unsent_since) >= FLUSH_AFTER {
                    let sent = batch.send(&self.socket);
                    processor.sent_batch(sent, &mut batch);
                    unsent_since = clock;
                    self.publish(processor);
                }
            }
            let sent = batch.send(&self.socket);
            processor.sent_batch(sent, &mut batch);
            self.publish(processor);
            if count > 0 {
                poll.open(clock);
            }
        }
    }

    /// The portable loop: one receive and one send per datagram. Used on
    /// every platform, and on Linux when the builder asks; on a
    /// wildcard-bound Linux socket it replies from each datagram's arrival
    /// address.
    fn run_portable(&self, processor: &mut Processor) {
        let mut buf = vec![0u8; self.config.max_datagram];
        let mut reply = Vec::with_capacity(sys::REPLY_RESERVE);
        let mut io = sys::Portable::new(self.config.pktinfo);
        let mut poll = PollWindow::new(self.config.busy_poll);
        while !self.shared.is_stopped() {
            let polling = poll.poll_now(|| self.publish(processor));
            match io.recv(&self.socket, &mut buf, polling) {
                Err(err) if polling && crate::error::is_timeout(&err) => {
                    processor.totals.busy_poll_misses += 1;
                    std::hint::spin_loop();
                    continue;
                }
                Ok(Some(datagram)) => {
                    let arrived = Instant::now();
                    poll.open(arrived);
                    processor.totals.received += 1;
                    if self.shared.is_stopped() {
                        processor.totals.shutdown_dropped += 1;
                    } else if processor.admit(&datagram, arrived) {
                        let ready = match &self.pool {
                            Some(pool) => {
                                self.publish(processor);
                                processor.submit(
                                    pool,
                                    &datagram,
                                    self.socket_index,
                                    arrived,
                                    &mut reply,
                                )
                            }
                            None => {
                                let ready = processor.handle_timed(
                                    &*self.handler,
                                    &datagram,
                                    &mut reply,
                                    arrived,
                                    arrived,
                                );
                                processor.handled_at(Instant::now());
                                ready
                            }
                        };
                        if ready {
                            let result = io.send(&self.socket, &reply);
                            // A busy reply is counted as shed already.
                            if self.pool.is_none() {
                                processor.sent_one(result.as_ref().err());
                            }
                        }
                        sys::trim_reply(&mut reply);
                    }
                }
                // A wake-up without a datagram.
                Ok(None) => {}
                Err(err) => processor.recv_failed(&err, &self.shared),
            }
            self.publish(processor);
        }
    }
}

/// Publishes a receive worker's totals to counter slot `index`. The
/// kernel's drop count is read when a snapshot is taken, or as the worker
/// stops; with the `metrics` feature, which publishes without snapshots, it
/// is also read from `drops` (the worker's own socket) once a second.
pub(crate) fn publish(
    shared: &Shared,
    index: usize,
    processor: &mut Processor,
    drops: Option<&Socket>,
) {
    #[cfg(feature = "metrics")]
    if let Some(socket) = drops.filter(|_| processor.observer.drops_due()) {
        processor.totals.kernel_drops =
            sys::kernel_drops(socket).unwrap_or(processor.totals.kernel_drops);
    }
    #[cfg(not(feature = "metrics"))]
    let _ = drops;
    shared.stats.publish(index, &processor.totals);
    processor.observer.published(&processor.totals);
}

/// One thread of the handler pool.
pub(crate) struct PoolThread<H> {
    /// Its counter slot (after the receive workers').
    pub(crate) slot: usize,
    pub(crate) pool: Arc<Pool>,
    pub(crate) handler: Arc<H>,
    pub(crate) config: Arc<Config>,
    pub(crate) shared: Arc<Shared>,
    /// The server's sockets, held weakly: the server's handle keeps them
    /// open while the pool drains, and a handler that never returns cannot
    /// keep them open after that.
    pub(crate) sockets: Vec<Weak<Socket>>,
}

impl<H: HandlerFn> PoolThread<H> {
    /// Takes requests from the queue and handles them until the pool is
    /// closed and empty.
    ///
    /// Replies are sent in batches with the rule of the receive loop: while
    /// more requests are queued and handlers are fast, replies gather (up to
    /// a batch) and go out together; they go out at once when the queue runs
    /// dry, and as soon as work has waited [`FLUSH_AFTER`].
    pub(crate) fn run(self) {
        let mut processor = Processor::new(&self.config, &self.shared.stats, self.slot);
        let Some(first) = self.sockets.first().and_then(Weak::upgrade) else {
            return;
        };
        let size = self.config.batch_size.unwrap_or(1);
        let mut out = Outgoing {
            replies: sys::Replies::new(
                &first,
                size,
                self.config.gso && self.config.batch_size.is_some(),
            ),
            used: 0,
            socket: 0,
            since: None,
        };
        drop(first);
        let max_wait = self.config.pool().and_then(HandlerPool::max_wait);
        let mut poll = PollWindow::new(self.config.busy_poll);
        loop {
            let taken = if out.replies.queued() > 0 {
                match self.pool.try_take() {
                    Some(taken) => taken,
                    None => {
                        // Nothing more is queued: what is ready goes now.
                        self.flush(&mut processor, &mut out);
                        continue;
                    }
                }
            } else if poll.poll_now(|| self.publish(&mut processor)) {
                match self.pool.try_take() {
                    Some(taken) => taken,
                    None => {
                        processor.totals.busy_poll_misses += 1;
                        std::hint::spin_loop();
                        continue;
                    }
                }
            } else {
                self.pool.take()
            };
            match taken {
                Taken::Closed => {
                    self.flush(&mut processor, &mut out);
                    break;
                }
                Taken::Late(job) => {
                    processor.totals.shutdown_dropped += 1;
                    self.pool.give_back(job);
                }
                Taken::Job(job) => {
                    poll.open(Instant::now());
                    if out.used == out.replies.size()
                        || (out.replies.queued() > 0 && out.socket != job.socket)
                    {
                        self.flush(&mut processor, &mut out);
                    }
                    let started = Instant::now();
                    let waited = started.saturating_duration_since(job.arrived);
                    if max_wait.is_some_and(|max| waited > max) {
                        processor.record_wait(waited);
                        processor.totals.expired += 1;
                    } else if let Some(reply) = out.replies.buffer(out.used) {
                        let datagram = Received {
                            data: &job.data,
                            truncated: false,
                            peer: job.peer,
                            arrival: job.arrival,
                        };
                        let ready = processor.handle_timed(
                            &*self.handler,
                            &datagram,
                            reply,
                            job.arrived,
                            started,
                        );
                        let now = Instant::now();
                        processor.handled_at(now);
                        if ready {
                            out.replies.queue(out.used, job.peer, job.arrival, true);
                            out.used += 1;
                            out.socket = job.socket;
                            out.since.get_or_insert(started);
                        }
                        if out.since.is_some_and(|since| {
                            now.saturating_duration_since(since) >= FLUSH_AFTER
                        }) {
                            self.flush(&mut processor, &mut out);
                        }
                    }
                    self.pool.give_back(job);
                }
            }
            self.publish(&mut processor);
        }
    }

    fn publish(&self, processor: &mut Processor) {
        self.shared.stats.publish(self.slot, &processor.totals);
        processor.observer.published(&processor.totals);
    }

    /// Sends the replies gathered so far, through the socket their requests
    /// came in on.
    fn flush(&self, processor: &mut Processor, out: &mut Outgoing) {
        if out.replies.queued() > 0 {
            match self.sockets.get(out.socket).and_then(Weak::upgrade) {
                Some(socket) => {
                    let sent = out.replies.send(&socket);
                    let error = out.replies.take_error();
                    processor.sent_counts(sent, error);
                }
                None => {
                    // The server has stopped and closed its sockets.
                    processor.totals.shutdown_dropped += out.replies.queued() as u64;
                    out.replies.clear();
                }
            }
        }
        out.replies.trim(out.used);
        out.used = 0;
        out.since = None;
        self.publish(processor);
    }
}

/// A handler thread's replies on their way out.
struct Outgoing {
    replies: sys::Replies,
    /// Places of `replies` used since the last flush.
    used: usize,
    /// The socket the queued replies go out through.
    socket: usize,
    /// When the oldest reply not yet sent began to be worked on.
    since: Option<Instant>,
}

/// Decides the fate of each datagram and keeps a thread's running totals
/// and latency histograms.
pub(crate) struct Processor {
    config: Arc<Config>,
    stats: Arc<SharedStats>,
    /// Its counter slot, and latency recorders.
    slot: usize,
    pub(crate) observer: Observer,
    pub(crate) totals: Stats,
    /// The pause after a receive error, doubled each time one follows.
    backoff: Duration,
    /// When the handler call in progress started.
    call_started: Instant,
}

impl Processor {
    /// For the thread (or task) with counter slot `slot`.
    pub(crate) fn new(config: &Arc<Config>, stats: &Arc<SharedStats>, slot: usize) -> Self {
        Processor {
            config: config.clone(),
            stats: stats.clone(),
            slot,
            observer: Observer::new(config.local_addr),
            totals: Stats::default(),
            backoff: Duration::ZERO,
            call_started: Instant::now(),
        }
    }

    /// The checks before any handler, at time `now`: drops (and counts) a
    /// datagram that is truncated, from a source that cannot be answered,
    /// or over the rate limit. Returns whether it goes on to a handler.
    pub(crate) fn admit(&mut self, datagram: &Received<'_>, now: Instant) -> bool {
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
        true
    }

    /// Hands an admitted request to the pool; one it has no room for is
    /// shed ([`shed`](Processor::shed)), and one it no longer takes (the
    /// server is shutting down) is counted as dropped at shutdown. Returns
    /// whether `reply` holds a busy reply to send.
    pub(crate) fn submit(
        &mut self,
        pool: &Pool,
        datagram: &Received<'_>,
        socket: usize,
        arrived: Instant,
        reply: &mut Vec<u8>,
    ) -> bool {
        match pool.submit(datagram, socket, arrived) {
            Submitted::Queued => false,
            Submitted::Full => self.shed(datagram, reply),
            Submitted::Closed => {
                self.totals.shutdown_dropped += 1;
                false
            }
        }
    }

    /// Counts a request the pool had no room for, and writes the busy reply
    /// into `reply` if there is one and the amplification limit allows it.
    /// Returns whether `reply` is to be sent (not counted as a reply).
    pub(crate) fn shed(&mut self, datagram: &Received<'_>, reply: &mut Vec<u8>) -> bool {
        self.totals.overloaded += 1;
        let Some(busy) = self.config.overload_reply() else {
            return false;
        };
        if self.too_large(busy.len(), datagram.data.len()) {
            return false;
        }
        reply.clear();
        reply.extend_from_slice(busy);
        true
    }

    fn too_large(&self, reply: usize, request: usize) -> bool {
        self.config
            .max_amplification
            .is_some_and(|factor| reply > factor.saturating_mul(request))
    }

    fn recorders(&self) -> Option<&Recorders> {
        self.stats.recorders(self.slot)
    }

    pub(crate) fn record_wait(&self, waited: Duration) {
        if let Some(recorders) = self.recorders() {
            recorders.queue_wait.record(waited);
        }
        self.observer.queue_wait(waited);
    }

    /// Runs the handler on an admitted datagram, which arrived at `arrived`,
    /// in a call that starts at `started`; the caller reports the end with
    /// [`handled_at`](Processor::handled_at). Counts every outcome but a
    /// reply to send: returns `true` when `reply` holds one, and the caller
    /// reports how its send went with [`sent`](Processor::sent).
    pub(crate) fn handle_timed<H: HandlerFn>(
        &mut self,
        handler: &H,
        datagram: &Received<'_>,
        reply: &mut Vec<u8>,
        arrived: Instant,
        started: Instant,
    ) -> bool {
        self.record_wait(started.saturating_duration_since(arrived));
        self.call_started = started;
        reply.clear();
        let peer = datagram.peer;
        let request = Request::new(datagram.data, peer, self.local_ip(datagram));
        // A panic is caught per datagram so that one bad request cannot stop
        // the server. The reply buffer is cleared after it; whatever state
        // the handler shares between calls is the handler's to keep sound,
        // as with any `Fn + Sync` shared by threads.
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| handler(request, reply)));
        match outcome {
            Ok(Action::Reply) => !self.capped(reply.len(), datagram.data.len()),
            Ok(Action::Ignore) => {
                self.totals.no_reply += 1;
                false
            }
            Err(payload) => {
                reply.clear();
                self.panicked(payload);
                false
            }
        }
    }

    /// The address `datagram` was sent to, in its sender's family.
    pub(crate) fn local_ip(&self, datagram: &Received<'_>) -> Option<IpAddr> {
        let local = datagram.arrival.local.or(self.config.bound_ip);
        same_family(local, datagram.peer)
    }

    /// Counts (and reports) a handler that panicked with `payload`.
    pub(crate) fn panicked(&mut self, payload: Box<dyn std::any::Any + Send>) {
        self.totals.handler_panics += 1;
        self.observer.handler_panicked(&*payload);
        // Dropping a panic payload can itself panic; that second panic must
        // not escape either.
        if let Err(again) = panic::catch_unwind(AssertUnwindSafe(|| drop(payload))) {
            std::mem::forget(again);
        }
    }

    /// Whether a reply of `reply` bytes to a request of `request` bytes is
    /// over the amplification limit (and so is counted, not sent).
    pub(crate) fn capped(&mut self, reply: usize, request: usize) -> bool {
        let capped = self.too_large(reply, request);
        self.totals.amplification_capped += u64::from(capped);
        capped
    }

    /// Records the handler call that [`handle_timed`](Processor::handle_timed)
    /// started as ending at `now`.
    pub(crate) fn handled_at(&self, now: Instant) {
        let took = now.saturating_duration_since(self.call_started);
        self.record_handler(took);
    }

    /// Records a handler call that took `took`.
    pub(crate) fn record_handler(&self, took: Duration) {
        if let Some(recorders) = self.recorders() {
            recorders.handler.record(took);
        }
        self.observer.handler_time(took);
    }

    /// Counts how a batch's replies went: how many were sent, how many
    /// failed (with the batch's last error).
    pub(crate) fn sent_batch(&mut self, sent: (u64, u64), batch: &mut sys::Batch) {
        let error = batch.take_error();
        self.sent_counts(sent, error);
    }

    /// Counts how replies went: how many were sent, how many failed, and the
    /// last error.
    pub(crate) fn sent_counts(&mut self, (replied, failed): (u64, u64), error: Option<io::Error>) {
        self.totals.replied += replied;
        self.totals.send_errors += failed;
        if failed > 0 {
            self.observer.send_failed(error.as_ref());
        }
    }

    /// Counts how one reply's send went: `error` is `None` when it was sent.
    pub(crate) fn sent_one(&mut self, error: Option<&io::Error>) {
        match error {
            None => self.totals.replied += 1,
            Some(err) => {
                self.totals.send_errors += 1;
                self.observer.send_failed(Some(err));
            }
        }
    }

    /// Handles a failed receive call. The loop always goes on: errors that
    /// report ICMP messages for earlier replies are counted and ignored, and
    /// anything else is counted and followed by a short, growing pause so a
    /// persistent failure cannot spin the CPU.
    pub(crate) fn recv_failed(&mut self, err: &io::Error, shared: &Shared) {
        if let Some(pause) = self.recv_error(err, shared) {
            thread::sleep(pause);
        }
    }

    /// Counts a failed receive call; returns the pause to take before the
    /// next one, if any (see [`recv_failed`](Processor::recv_failed)).
    pub(crate) fn recv_error(&mut self, err: &io::Error, shared: &Shared) -> Option<Duration> {
        if crate::error::is_timeout(err) {
            return None;
        }
        self.totals.recv_errors += 1;
        self.observer.recv_failed(err);
        if is_icmp_report(err) || shared.is_stopped() {
            return None;
        }
        self.backoff = (self.backoff * 2).clamp(MIN_BACKOFF, MAX_BACKOFF);
        Some(self.backoff)
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
