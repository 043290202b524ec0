//! The handler pool: a bounded queue between the receive workers and the
//! handler threads, with every place allocated up front.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

use crate::sys::{Arrival, REPLY_RESERVE, Received};

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
}

impl Job {
    fn empty(now: Instant) -> Job {
        Job {
            data: Vec::with_capacity(REPLY_RESERVE),
            peer: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            arrival: Arrival::default(),
            socket: 0,
            arrived: now,
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
            if let Some(job) = state.queue.pop_front() {
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
        if let Some(job) = state.queue.pop_front() {
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
            },
        }
    }

    #[test]
    fn a_full_queue_refuses_at_once_and_a_closed_one_drains() {
        let pool = Pool::new(2, 0);
        let now = Instant::now();
        assert_eq!(pool.submit(&datagram(b"a"), 0, now), Submitted::Queued);
        assert_eq!(pool.submit(&datagram(b"b"), 1, now), Submitted::Queued);
        assert_eq!(pool.submit(&datagram(b"c"), 0, now), Submitted::Full);
        let Taken::Job(first) = pool.take() else {
            panic!("a job")
        };
        assert_eq!((first.data.as_slice(), first.socket), (&b"a"[..], 0));
        pool.give_back(first);
        assert_eq!(pool.submit(&datagram(b"d"), 0, now), Submitted::Queued);
        // Closed with time to drain: what is queued is still handed out.
        pool.close(now + std::time::Duration::from_secs(3600));
        assert_eq!(pool.submit(&datagram(b"e"), 0, now), Submitted::Closed);
        assert!(matches!(pool.take(), Taken::Job(j) if j.data == b"b"));
        assert!(matches!(pool.take(), Taken::Job(j) if j.data == b"d"));
        assert!(matches!(pool.take(), Taken::Closed));
        // Closed with no time: what is queued comes back as late.
        let pool = Pool::new(1, 0);
        assert_eq!(pool.submit(&datagram(b"x"), 0, now), Submitted::Queued);
        pool.close(Instant::now());
        assert!(matches!(pool.take(), Taken::Late(_)));
        assert!(matches!(pool.take(), Taken::Closed));
    }
}
