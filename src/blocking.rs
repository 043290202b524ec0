//! The blocking engine's threads: receive workers, each running one loop
//! over one receive source (handlers inline, or handed to the pool), and
//! handler-pool threads. What happens to each datagram is the policy's
//! (`crate::policy`), shared with the async engine.

use std::sync::{Arc, Weak};
use std::thread;
use std::time::{Duration, Instant};

use socket2::Socket;

use crate::busy_poll::PollWindow;
use crate::config::Config;
use crate::control::{Shared, WorkerEnd};
use crate::policy::{Admission, HandlerFn, Processor};
use crate::pool::{HandlerPool, Pool, Taken};
use crate::sys::{self, Received, Source};

/// How long a ready reply may wait for the rest of its batch. Handlers that
/// answer in microseconds fill a batch well within it, so their replies go
/// out together in one `sendmmsg`; behind a slow handler, the replies ready
/// so far leave as soon as that handler returns, and a slow handler's own
/// reply leaves at once. A reply therefore waits at most about one handler
/// call (the one after it), whatever the batch size.
const FLUSH_AFTER: Duration = Duration::from_micros(50);

/// Everything one receive worker needs.
pub(crate) struct ReceiveWorker<H> {
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
    /// one): it reports the socket's kernel drops.
    pub(crate) reports_drops: bool,
    /// The AF_XDP socket of the receive queue it serves (feature `xdp`),
    /// besides `socket`.
    #[cfg(all(feature = "xdp", target_os = "linux"))]
    pub(crate) xdp: Option<sys::xdp::XdpQueue>,
}

impl<H: HandlerFn> ReceiveWorker<H> {
    /// Runs the receive loop until the server shuts down: one receive (a
    /// batch, or a batch of one) for whatever is queued, each datagram
    /// handled inline or queued for the pool, and the replies sent
    /// together unless a slow handler makes them wait (see
    /// [`FLUSH_AFTER`]).
    pub(crate) fn run(mut self) {
        let mut source = self.source();
        let config = &*self.config;
        let mut processor = Processor::new(&self.config, &self.shared.stats, self.index);
        let mut poll = PollWindow::new(config.busy_poll);
        let _end = WorkerEnd {
            shared: self.shared.clone(),
            slot: self.index,
        };
        self.shared.worker_started();
        while !self.shared.is_stopped() {
            let polling = poll.poll_now(|| self.publish(&mut processor));
            // Blocking or polling, it waits for datagrams.
            self.shared.beat(self.index, None);
            let count = match source.recv(&self.socket, polling) {
                Ok(count) => count,
                Err(err) if polling && crate::error::is_timeout(&err) => {
                    processor.totals.busy_poll_misses += 1;
                    std::hint::spin_loop();
                    continue;
                }
                Err(err) => {
                    if let Some(pause) = processor.recv_error(&err, &self.shared) {
                        thread::sleep(pause);
                    }
                    self.publish(&mut processor);
                    continue;
                }
            };
            let arrived = Instant::now();
            self.shared.beat(self.index, Some(arrived));
            processor.totals.malformed += source.take_rejected();
            if count == 0 {
                self.xdp_drops(&mut processor, &source);
            }
            processor.totals.received += count as u64;
            if count > 0 {
                // Published before any request is handled or handed on: a
                // request in a handler call is in flight in a snapshot, and
                // no snapshot counts an outcome (published by a handler
                // thread) whose arrival it does not.
                processor.publish_received();
            }
            let clock = self.handle(&mut processor, &mut source, count, arrived);
            self.send(&mut processor, &mut source);
            if count > 0 {
                poll.open(clock);
            }
        }
        if self.reports_drops {
            processor.totals.kernel_drops = sys::kernel_drops(&self.socket).unwrap_or(0);
        }
        self.xdp_drops(&mut processor, &source);
        self.publish(&mut processor);
    }

    /// Where this worker receives from: its receive queue's AF_XDP socket
    /// (feature `xdp`), or its socket, in batches where it can.
    fn source(&mut self) -> Source {
        let config = &*self.config;
        #[cfg(all(feature = "xdp", target_os = "linux"))]
        if let Some(queue) = self.xdp.take() {
            let xdp = sys::xdp::XdpSource::new(queue, config.max_datagram, config.control);
            return Source::Xdp(Box::new(xdp));
        }
        Source::new(
            &self.socket,
            config.batch_spec(),
            config.max_datagram,
            config.control,
        )
    }

    /// An AF_XDP worker's kernel drops: what the kernel dropped on the
    /// way to its AF_XDP socket, plus its kernel socket's drops if it
    /// reports them. (Read when idle and at the end, not per batch.)
    fn xdp_drops(&self, processor: &mut Processor, source: &Source) {
        if let Some(drops) = source.xdp_drops() {
            let socket = match self.reports_drops {
                true => sys::kernel_drops(&self.socket).unwrap_or(0),
                false => 0,
            };
            processor.totals.kernel_drops = drops.saturating_add(socket);
        }
    }

    /// Deals with the `count` datagrams of one receive, which returned at
    /// `arrived`; returns the time the last was done with.
    fn handle(
        &self,
        processor: &mut Processor,
        source: &mut Source,
        count: usize,
        arrived: Instant,
    ) -> Instant {
        let mut clock = arrived;
        // When the oldest reply not yet sent began to be worked on.
        let mut unsent_since = clock;
        for i in 0..count {
            // A handoff answers what is in hand; a shutdown drops it.
            if self.shared.is_shutting_down() {
                processor.totals.shutdown_dropped += (count - i) as u64;
                break;
            }
            let Some((datagram, reply)) = source.datagram(i) else {
                break;
            };
            let standing = match processor.admit(&datagram, clock, reply) {
                Admission::Handle(standing) => standing,
                Admission::Answered => {
                    source.queue_reply(i, false);
                    continue;
                }
                Admission::Dropped => continue,
            };
            if let Some(pool) = &self.pool {
                let index = self.socket_index;
                if processor.submit(pool, &datagram, standing, index, arrived, reply) {
                    source.queue_reply(i, false);
                }
                continue;
            }
            let ready =
                processor.handle_timed(&*self.handler, &datagram, standing, reply, arrived, clock);
            if ready {
                source.queue_reply(i, true);
            }
            clock = Instant::now();
            self.shared.beat(self.index, Some(clock));
            processor.handled_at(clock);
            if source.queued() == 0 {
                unsent_since = clock;
            } else if clock.saturating_duration_since(unsent_since) >= FLUSH_AFTER {
                self.send(processor, source);
                unsent_since = clock;
            }
        }
        clock
    }

    /// Sends the replies queued, and publishes. Once a bounded shutdown
    /// has given up on this worker, they are not sent: counted as dropped
    /// at shutdown instead.
    fn send(&self, processor: &mut Processor, source: &mut Source) {
        if self.shared.is_abandoned() {
            processor.totals.shutdown_dropped += source.drop_queued();
        } else {
            let sent = source.send(&self.socket);
            processor.sent_counts(sent, source.take_error());
        }
        self.publish(processor);
    }

    fn publish(&self, processor: &mut Processor) {
        processor.publish(self.reports_drops.then_some(&*self.socket));
    }
}

/// One thread of the handler pool, which serves every listener.
pub(crate) struct PoolThread<H> {
    /// Its counter slot for each listener (after the receive workers').
    pub(crate) slots: Vec<usize>,
    pub(crate) pool: Arc<Pool>,
    pub(crate) handler: Arc<H>,
    /// Each listener's settings (the pool's are the same in all).
    pub(crate) configs: Arc<[Arc<Config>]>,
    /// The listener each of `sockets` belongs to.
    pub(crate) socket_listener: Arc<[usize]>,
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
    /// Replies are sent in batches with the rule of the receive loop while
    /// the pool is under load: while more requests are queued than the pool
    /// has threads and handlers are fast, replies gather (up to a batch) and
    /// go out together, and as soon as work has waited [`FLUSH_AFTER`].
    /// Otherwise the replies ready go out before the thread takes up its
    /// next request: a reply then never waits for another handler call.
    pub(crate) fn run(self) {
        // One set of counters for each listener, so that every outcome is
        // counted for the listener its request came in on.
        let mut processors: Vec<Processor> = self
            .configs
            .iter()
            .zip(&self.slots)
            .map(|(config, &slot)| Processor::new(config, &self.shared.stats, slot))
            .collect();
        let (Some(config), Some(first)) = (
            self.configs.first().cloned(),
            self.sockets.first().and_then(Weak::upgrade),
        ) else {
            return;
        };
        let size = config.batch_size.unwrap_or(1);
        let mut out = Outgoing {
            replies: sys::Replies::new(&first, size, config.gso && config.batch_size.is_some()),
            used: 0,
            socket: 0,
            since: None,
        };
        drop(first);
        let max_wait = config.pool().and_then(HandlerPool::max_wait);
        let threads = config.pool().map_or(1, HandlerPool::thread_count);
        let mut poll = PollWindow::new(config.busy_poll);
        // The listener of the last request taken: its counters are the
        // ones to publish, and its polling window the one open.
        let mut last = 0;
        loop {
            let taken = if out.replies.queued() > 0 {
                match self.pool.try_take() {
                    Some(taken) => taken,
                    None => {
                        // Nothing more is queued: what is ready goes now.
                        self.flush(&mut processors, &mut out);
                        continue;
                    }
                }
            } else if poll.poll_now(|| publish_one(&mut processors, last)) {
                match self.pool.try_take() {
                    Some(taken) => taken,
                    None => {
                        if let Some(processor) = processors.get_mut(last) {
                            processor.totals.busy_poll_misses += 1;
                        }
                        std::hint::spin_loop();
                        continue;
                    }
                }
            } else {
                self.pool.take()
            };
            match taken {
                Taken::Closed => {
                    self.flush(&mut processors, &mut out);
                    for processor in &mut processors {
                        processor.publish(None);
                    }
                    break;
                }
                Taken::Late(job) => {
                    last = self.listener_of(job.socket).unwrap_or(last);
                    if let Some(processor) = processors.get_mut(last) {
                        processor.totals.shutdown_dropped += 1;
                    }
                    self.pool.give_back(job);
                }
                Taken::Job(job) => {
                    poll.open(Instant::now());
                    // Under load (more requests queued than threads), replies
                    // gather; otherwise what is ready leaves before the call.
                    if out.replies.queued() > 0
                        && (out.used == out.replies.size()
                            || out.socket != job.socket
                            || job.behind < threads)
                    {
                        self.flush(&mut processors, &mut out);
                    }
                    last = self.listener_of(job.socket).unwrap_or(last);
                    let Some(processor) = processors.get_mut(last) else {
                        self.pool.give_back(job);
                        continue;
                    };
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
                            job.standing,
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
                            self.flush(&mut processors, &mut out);
                        }
                    }
                    self.pool.give_back(job);
                }
            }
            publish_one(&mut processors, last);
        }
    }

    /// The listener that socket `socket` belongs to.
    fn listener_of(&self, socket: usize) -> Option<usize> {
        self.socket_listener.get(socket).copied()
    }

    /// Sends the replies gathered so far, through the socket their requests
    /// came in on (all of them came in on one).
    fn flush(&self, processors: &mut [Processor], out: &mut Outgoing) {
        let listener = self.listener_of(out.socket);
        if out.replies.queued() > 0 {
            let socket = self.sockets.get(out.socket).and_then(Weak::upgrade);
            if let Some(processor) = listener.and_then(|k| processors.get_mut(k)) {
                match socket {
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
            } else {
                out.replies.clear();
            }
        }
        out.replies.trim(out.used);
        out.used = 0;
        out.since = None;
        if let Some(listener) = listener {
            publish_one(processors, listener);
        }
    }
}

/// Publishes the counters of listener `listener` (a handler thread's
/// others have not changed since they were last published).
fn publish_one(processors: &mut [Processor], listener: usize) {
    if let Some(processor) = processors.get_mut(listener) {
        processor.publish(None);
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
