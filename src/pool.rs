//! The handler pool: a bounded queue between the receive workers and the
//! handler threads, with every place allocated up front.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::policy::Standing;
use crate::sys::{Arrival, REPLY_RESERVE, Received};

/// The handler pool's queue holds this many requests per handler thread
/// unless [`HandlerPool::queue_capacity`] says otherwise.
const DEFAULT_QUEUE_PER_THREAD: usize = 64;
/// How long a request may wait in the queue unless
/// [`HandlerPool::max_queue_wait`] says otherwise.
const DEFAULT_MAX_QUEUE_WAIT: Duration = Duration::from_millis(500);
/// The most handler threads one server may have.
const MAX_THREADS: usize = 1024;
/// The largest queue, and the most requests in flight on the async server.
pub(crate) const MAX_QUEUE: usize = 1 << 20;

/// A pool of threads that runs a blocking server's handlers, for handlers
/// that wait (on a database, a file, another service); given to
/// [`ServerBuilder::handler_pool`](crate::ServerBuilder::handler_pool).
///
/// The receive workers keep receiving in batches and hand each request to
/// the pool through a bounded queue
/// ([`queue_capacity`](HandlerPool::queue_capacity)) without ever waiting
/// for room: when the queue is full the request is shed at once
/// ([`overload_reply`](HandlerPool::overload_reply),
/// [`Stats::overloaded`](crate::Stats::overloaded)). A handler thread drops
/// a request that waited too long
/// ([`max_queue_wait`](HandlerPool::max_queue_wait)), and sends each reply
/// itself as soon as it is ready, from the address the request arrived on.
/// Up to `threads` handler calls run at once, whichever peers they come
/// from.
///
/// ```
/// # fn main() -> Result<(), udp_greet::Error> {
/// use std::time::Duration;
/// use udp_greet::{GreetServer, HandlerPool};
///
/// let server = GreetServer::builder()
///     .handler_pool(
///         HandlerPool::threads(8)
///             .queue_capacity(256)
///             .max_queue_wait(Duration::from_millis(200))
///             .overload_reply(&b"busy"[..]),
///     )
///     .bind("127.0.0.1:0")?
///     .spawn(udp_greet::greet)?;
/// # server.shutdown()?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use = "a pool does nothing until given to ServerBuilder::handler_pool"]
pub struct HandlerPool {
    threads: usize,
    queue_capacity: Option<usize>,
    max_queue_wait: Option<Duration>,
    pub(crate) overload_reply: Option<Vec<u8>>,
    pub(crate) drain_timeout: Duration,
}

impl HandlerPool {
    /// A pool of `threads` handler threads, every other setting at its
    /// default. Must be between 1 and 1024 (checked at bind).
    pub fn threads(threads: usize) -> HandlerPool {
        HandlerPool {
            threads,
            queue_capacity: None,
            max_queue_wait: Some(DEFAULT_MAX_QUEUE_WAIT),
            overload_reply: None,
            drain_timeout: Duration::ZERO,
        }
    }

    /// How many requests may wait for a handler thread: requests received
    /// while that many wait are shed. The queue's memory is allocated when
    /// the server starts, one place per waiting request and one per handler
    /// thread, each with 512 bytes reserved for its request and growing to
    /// the largest request it has carried (up to
    /// [`max_datagram_size`](crate::ServerBuilder::max_datagram_size)).
    /// Measured (`tests/alloc.rs`, 8 threads, default capacity): 808 bytes
    /// of heap per place on the portable path and 1.25 KiB on the batched
    /// path, where each handler thread also keeps a batch of reply buffers.
    ///
    /// A request that is `k`-th in the queue of `n` threads whose handlers
    /// take `h` each waits about `k × h / n`; with the default
    /// [`max_queue_wait`](HandlerPool::max_queue_wait) of 500 ms, 64 per
    /// thread is as deep as a queue of 8 ms handlers can usefully be.
    /// Deeper, the requests at the back would only expire; faster handlers
    /// drain it well within the wait.
    ///
    /// Must be between 1 and 1 048 576. Defaults to 64 per handler thread.
    pub fn queue_capacity(mut self, requests: usize) -> Self {
        self.queue_capacity = Some(requests);
        self
    }

    /// The longest a request may wait in the queue: a handler thread that
    /// takes up a request which has waited longer drops it unanswered
    /// ([`Stats::expired`](crate::Stats::expired)), since its client has
    /// given up or resent by then. `None` lets requests wait indefinitely.
    ///
    /// A client of this crate resends after 1 s by default. A request taken
    /// up after 500 ms would need a handler of under 500 ms for its reply to
    /// beat the resend; later than that, its client has given up or resent,
    /// and answering it only adds to the load that made it wait.
    ///
    /// Must not be zero. Defaults to 500 ms, half of
    /// [`ClientBuilder::initial_timeout`](crate::ClientBuilder::initial_timeout)'s default.
    pub fn max_queue_wait(mut self, wait: impl Into<Option<Duration>>) -> Self {
        self.max_queue_wait = wait.into();
        self
    }

    /// A fixed reply for requests shed because the queue is full ("busy,
    /// try later" in the protocol's own words), instead of dropping them
    /// silently. It is sent by the receive worker, at once, only to
    /// requests that passed the [rate limit](crate::ServerBuilder::rate_limit),
    /// and not when it is larger than the
    /// [amplification limit](crate::ServerBuilder::max_amplification)
    /// allows for the request's size. Shed requests are counted in
    /// [`Stats::overloaded`](crate::Stats::overloaded) either way.
    ///
    /// Defaults to dropping shed requests.
    pub fn overload_reply(mut self, reply: impl Into<Vec<u8>>) -> Self {
        self.overload_reply = Some(reply.into());
        self
    }

    /// How long, at shutdown, the pool goes on answering requests already
    /// queued; what is left after that is dropped and counted in
    /// [`Stats::shutdown_dropped`](crate::Stats::shutdown_dropped). Handler
    /// calls in progress are always waited for (see
    /// [`ServerHandle::shutdown_timeout`](crate::ServerHandle::shutdown_timeout)
    /// for a bound).
    ///
    /// Defaults to zero: the queue is dropped at once.
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// How many handler threads run.
    pub(crate) fn thread_count(&self) -> usize {
        self.threads
    }

    /// The queue's capacity.
    pub(crate) fn capacity(&self) -> usize {
        self.queue_capacity.unwrap_or(
            self.threads
                .saturating_mul(DEFAULT_QUEUE_PER_THREAD)
                .min(MAX_QUEUE),
        )
    }

    /// The longest wait in the queue, if any.
    pub(crate) fn max_wait(&self) -> Option<Duration> {
        self.max_queue_wait
    }

    /// Checks every setting.
    pub(crate) fn validate(&self) -> Result<(), Error> {
        if !(1..=MAX_THREADS).contains(&self.threads) {
            return Err(Error::invalid(
                "HandlerPool::threads",
                "must be between 1 and 1024",
            ));
        }
        if self
            .queue_capacity
            .is_some_and(|c| !(1..=MAX_QUEUE).contains(&c))
        {
            return Err(Error::invalid(
                "HandlerPool::queue_capacity",
                "must be between 1 and 1048576 requests",
            ));
        }
        if self.max_queue_wait.is_some_and(|w| w.is_zero()) {
            return Err(Error::invalid(
                "HandlerPool::max_queue_wait",
                "must be greater than zero (None lets requests wait indefinitely)",
            ));
        }
        Ok(())
    }
}

/// One queued request: a copy of its bytes, and what its reply needs.
#[derive(Debug)]
pub(crate) struct Job {
    pub(crate) data: Vec<u8>,
    pub(crate) peer: SocketAddr,
    pub(crate) arrival: Arrival,
    /// Which of the server's sockets it came in on; the reply goes out
    /// through the same one.
    pub(crate) socket: usize,
    /// When the receive call that took it returned.
    pub(crate) arrived: Instant,
    /// How many requests were still queued when a thread took it up.
    pub(crate) behind: usize,
    /// How its source stands with the source tokens.
    pub(crate) standing: Standing,
}

impl Job {
    fn empty(now: Instant) -> Job {
        Job {
            data: Vec::with_capacity(REPLY_RESERVE),
            peer: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            arrival: Arrival::default(),
            socket: 0,
            arrived: now,
            behind: 0,
            standing: Standing::default(),
        }
    }
}

/// What became of a request handed to [`Pool::submit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Submitted {
    /// It waits in the queue for a handler thread.
    Queued,
    /// The queue is full: the caller sheds it.
    Full,
    /// The pool is closed (the server is shutting down): the caller counts
    /// it as dropped at shutdown.
    Closed,
}

/// What a handler thread gets from [`Pool::take`].
#[derive(Debug)]
pub(crate) enum Taken {
    /// A request to handle.
    Job(Job),
    /// A request left over when the drain time ran out: to be counted as
    /// dropped at shutdown and given back.
    Late(Job),
    /// The pool is closed and empty: the thread ends.
    Closed,
}

#[derive(Debug)]
struct State {
    queue: VecDeque<Job>,
    /// How many requests may wait in `queue`.
    capacity: usize,
    /// Places taken by `submit` and being filled, not yet in `queue`: they
    /// count against `capacity`, so that receive workers submitting at once
    /// cannot overfill it.
    filling: usize,
    /// Places not in use, each with its buffer.
    free: Vec<Job>,
    /// Handler threads waiting for work.
    idle: usize,
    /// Wake-ups sent to waiting threads that have not woken yet. A submit
    /// wakes a thread only while fewer are on their way than are waiting,
    /// so a burst of requests costs one wake-up per thread, not one system
    /// call per request for a thread that is already waking.
    waking: usize,
    /// Set by [`Pool::close`]: requests still queued after this instant are
    /// dropped, and threads end once the queue is empty.
    drain_until: Option<Instant>,
}

/// The bounded queue. Every place (a [`Job`] with its buffer) is made when
/// the pool is, one per request that may wait and one per handler thread's
/// request in hand, so queuing a request allocates nothing once its place's
/// buffer has grown to fit.
#[derive(Debug)]
pub(crate) struct Pool {
    state: Mutex<State>,
    work: Condvar,
}

impl Pool {
    /// A queue of `capacity` waiting requests for `threads` handler threads.
    pub(crate) fn new(capacity: usize, threads: usize) -> Pool {
        let now = Instant::now();
        let places = capacity.saturating_add(threads);
        Pool {
            state: Mutex::new(State {
                queue: VecDeque::with_capacity(capacity),
                capacity,
                filling: 0,
                waking: 0,
                free: (0..places).map(|_| Job::empty(now)).collect(),
                idle: 0,
                drain_until: None,
            }),
            work: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; a poisoned lock still
        // holds consistent state.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a copy of `datagram`, received on socket `socket` at
    /// `arrived`. Never waits for room: says at once when the queue is full
    /// or closed, and the caller deals with the request.
    pub(crate) fn submit(
        &self,
        datagram: &Received<'_>,
        standing: Standing,
        socket: usize,
        arrived: Instant,
    ) -> Submitted {
        let mut job = {
            let mut state = self.lock();
            if state.drain_until.is_some() {
                return Submitted::Closed;
            }
            if state.queue.len() + state.filling >= state.capacity {
                return Submitted::Full;
            }
            let Some(job) = state.free.pop() else {
                return Submitted::Full;
            };
            state.filling += 1;
            job
        };
        // Filled outside the lock: the copy may be up to 64 KiB.
        job.data.clear();
        job.data.extend_from_slice(datagram.data);
        job.peer = datagram.peer;
        job.standing = standing;
        job.arrival = datagram.arrival;
        job.socket = socket;
        job.arrived = arrived;
        let wake = {
            let mut state = self.lock();
            state.filling -= 1;
            if state.drain_until.is_some() {
                // Closed while this was filled: the handler threads may
                // have seen an empty queue and ended, so it is not queued.
                state.free.push(job);
                return Submitted::Closed;
            }
            state.queue.push_back(job);
            let wake = state.idle > state.waking;
            state.waking += usize::from(wake);
            wake
        };
        if wake {
            self.work.notify_one();
        }
        Submitted::Queued
    }

    /// The next request, waiting for one while the pool is open.
    pub(crate) fn take(&self) -> Taken {
        let mut state = self.lock();
        loop {
            if let Some(mut job) = state.queue.pop_front() {
                job.behind = state.queue.len();
                let late = state
                    .drain_until
                    .is_some_and(|until| Instant::now() >= until);
                return if late {
                    Taken::Late(job)
                } else {
                    Taken::Job(job)
                };
            }
            if state.drain_until.is_some() {
                return Taken::Closed;
            }
            state.idle += 1;
            state = self.work.wait(state).unwrap_or_else(|e| e.into_inner());
            state.idle -= 1;
            // Whichever thread wakes takes a wake-up off the count; each
            // one stands for a request queued, which the woken thread now
            // goes on to look for.
            state.waking = state.waking.saturating_sub(1);
        }
    }

    /// The next request if one is queued (or the pool is closed), without
    /// waiting.
    pub(crate) fn try_take(&self) -> Option<Taken> {
        let mut state = self.lock();
        if let Some(mut job) = state.queue.pop_front() {
            job.behind = state.queue.len();
            let late = state
                .drain_until
                .is_some_and(|until| Instant::now() >= until);
            return Some(if late {
                Taken::Late(job)
            } else {
                Taken::Job(job)
            });
        }
        state.drain_until.is_some().then_some(Taken::Closed)
    }

    /// Returns a place to the free list once its request is dealt with.
    pub(crate) fn give_back(&self, job: Job) {
        self.lock().free.push(job);
    }

    /// Stops taking requests; those queued are handled until `drain_until`
    /// and dropped after it, and every handler thread ends once the queue
    /// is empty.
    pub(crate) fn close(&self, drain_until: Instant) {
        self.lock().drain_until = Some(drain_until);
        self.work.notify_all();
    }

    /// Requests waiting in the queue now.
    pub(crate) fn queued(&self) -> usize {
        self.lock().queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn datagram(data: &[u8]) -> Received<'_> {
        Received {
            data,
            truncated: false,
            peer: SocketAddr::from(([127, 0, 0, 1], 9)),
            arrival: Arrival {
                local: Some(IpAddr::from([127, 0, 0, 1])),
                ifindex: 1,
                ..Arrival::default()
            },
        }
    }

    #[test]
    fn a_full_queue_refuses_at_once_and_a_closed_one_drains() {
        let pool = Pool::new(2, 0);
        let now = Instant::now();
        assert_eq!(
            pool.submit(&datagram(b"a"), Standing::default(), 0, now),
            Submitted::Queued
        );
        assert_eq!(
            pool.submit(&datagram(b"b"), Standing::default(), 1, now),
            Submitted::Queued
        );
        assert_eq!(
            pool.submit(&datagram(b"c"), Standing::default(), 0, now),
            Submitted::Full
        );
        let Taken::Job(first) = pool.take() else {
            panic!("a job")
        };
        assert_eq!((first.data.as_slice(), first.socket), (&b"a"[..], 0));
        pool.give_back(first);
        assert_eq!(
            pool.submit(&datagram(b"d"), Standing::default(), 0, now),
            Submitted::Queued
        );
        // Closed with time to drain: what is queued is still handed out.
        pool.close(now + std::time::Duration::from_secs(3600));
        assert_eq!(
            pool.submit(&datagram(b"e"), Standing::default(), 0, now),
            Submitted::Closed
        );
        assert!(matches!(pool.take(), Taken::Job(j) if j.data == b"b"));
        assert!(matches!(pool.take(), Taken::Job(j) if j.data == b"d"));
        assert!(matches!(pool.take(), Taken::Closed));
        // Closed with no time: what is queued comes back as late.
        let pool = Pool::new(1, 0);
        assert_eq!(
            pool.submit(&datagram(b"x"), Standing::default(), 0, now),
            Submitted::Queued
        );
        pool.close(Instant::now());
        assert!(matches!(pool.take(), Taken::Late(_)));
        assert!(matches!(pool.take(), Taken::Closed));
    }
}
