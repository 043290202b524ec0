//! What a running server is controlled through: the stop flag and the
//! counters every handle shares, [`ServerControl`], and the blocking
//! server's [`ServerHandle`].

use std::fmt;
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::Socket;

use crate::busy_poll::later;
use crate::error::Error;
use crate::handoff::Handoff;
use crate::histogram::Latency;
use crate::pool::Pool;
use crate::stats::{SharedStats, Stats};
use crate::sys;

/// What a server's threads and every copy of its handles share: the stop
/// flag, a way to wake the workers, the handler pool, and the counters.
#[derive(Debug)]
pub(crate) struct Shared {
    /// [`RUNNING`], [`SHUTTING_DOWN`] or [`HANDING_OFF`]: set once.
    stop: AtomicU8,
    /// Receive workers (or tasks) that have not ended: in a handoff, the
    /// last to end closes the handler pool, so that every request queued
    /// is handled.
    receivers: AtomicUsize,
    /// A bounded shutdown gave up waiting: replies made after that are not
    /// sent.
    abandoned: AtomicBool,
    /// Weak, so that a handle never keeps a socket (and its port) open after
    /// the worker that owns it has finished; with whether a stop wakes its
    /// workers by shutting it down for reading (not a socket made
    /// elsewhere, whose maker may serve it again).
    sockets: Vec<(Weak<Socket>, bool)>,
    /// By counter slot: the socket whose kernel drops the slot reports, if
    /// any (weak, likewise).
    drops: Vec<Option<Weak<Socket>>>,
    /// Each listener's address and counter slots, in the order bound.
    listeners: Vec<ListenerSlots>,
    pub(crate) stats: Arc<SharedStats>,
    /// The handler pool, and how long it drains at shutdown.
    pub(crate) pool: Option<(Arc<Pool>, Duration)>,
    /// How many of the server's threads have ended, and the sockets kept
    /// open for them.
    ended: Mutex<Ending>,
    ended_changed: Condvar,
    /// Wakes the async server's tasks when `stop` is set.
    #[cfg(feature = "tokio")]
    pub(crate) stopping: Arc<tokio::sync::Notify>,
    /// What the server tells its service manager, if it was asked to.
    #[cfg(all(feature = "systemd", unix))]
    pub(crate) service: Option<crate::systemd::Service>,
    /// Where the XDP program of an AF_XDP server runs (feature `xdp`).
    #[cfg(all(feature = "xdp", target_os = "linux"))]
    pub(crate) xdp_mode: std::sync::OnceLock<crate::xdp::XdpMode>,
    /// Its program, to detach when a shutdown gives up on a worker (held
    /// weakly: the workers' queues keep it attached while they run).
    #[cfg(all(feature = "xdp", target_os = "linux"))]
    pub(crate) xdp_attached: std::sync::OnceLock<std::sync::Weak<crate::sys::xdp::Attached>>,
}

impl Shared {
    /// For a server over `sockets`, whose kernel drops the slots in `drops`
    /// report, with `slots` counter slots in all (see `server::Layout`),
    /// grouped by listener in `listeners`.
    pub(crate) fn new(
        sockets: &[(Arc<Socket>, bool)],
        drops: &[(usize, Arc<Socket>)],
        listeners: Vec<ListenerSlots>,
        slots: usize,
        pool: Option<(Arc<Pool>, Duration)>,
        #[cfg_attr(not(all(feature = "systemd", unix)), allow(unused_variables))] notify: Notify,
    ) -> Arc<Shared> {
        Arc::new(Shared {
            stop: AtomicU8::new(RUNNING),
            receivers: AtomicUsize::new(0),
            abandoned: AtomicBool::new(false),
            sockets: sockets
                .iter()
                .map(|(socket, shut)| (Arc::downgrade(socket), *shut))
                .collect(),
            drops: {
                let mut by_slot = vec![None; slots];
                for (slot, socket) in drops {
                    if let Some(place) = by_slot.get_mut(*slot) {
                        *place = Some(Arc::downgrade(socket));
                    }
                }
                by_slot
            },
            listeners,
            stats: SharedStats::new(slots),
            pool,
            ended: Mutex::new(Ending::default()),
            ended_changed: Condvar::new(),
            #[cfg(feature = "tokio")]
            stopping: Arc::new(tokio::sync::Notify::new()),
            #[cfg(all(feature = "systemd", unix))]
            service: notify
                .on
                .then(|| crate::systemd::Service::from_env(notify.workers)),
            #[cfg(all(feature = "xdp", target_os = "linux"))]
            xdp_mode: std::sync::OnceLock::new(),
            #[cfg(all(feature = "xdp", target_os = "linux"))]
            xdp_attached: std::sync::OnceLock::new(),
        })
    }

    /// Receive worker `slot` has ended (or its task was dropped): for the
    /// watchdog.
    #[allow(unused_variables)]
    pub(crate) fn worker_ended(&self, slot: usize) {
        #[cfg(all(feature = "systemd", unix))]
        if let Some(service) = &self.service {
            service.ended(slot);
        }
        // Sequentially consistent with `hand_off`'s two steps, so that
        // the pool is closed by one of them, whichever comes last.
        let left = self
            .receivers
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if left == Ok(1) {
            match &self.pool {
                Some(_) if self.stop.load(Ordering::SeqCst) == HANDING_OFF => {
                    self.drain_pool_whole();
                }
                // The pool's threads may still send through the sockets.
                Some(_) => {}
                // Nothing uses the sockets any more: closed, unless they
                // are to be handed on.
                None if self.stop.load(Ordering::SeqCst) == HANDING_OFF => {}
                None => self.release(),
            }
        }
    }

    /// The server is about to start `count` receive workers (or tasks),
    /// each of which marks its end ([`WorkerEnd`]).
    pub(crate) fn expect_receivers(&self, count: usize) {
        self.receivers.store(count, Ordering::SeqCst);
    }

    /// A receive worker (or task) is about to receive for the first time.
    pub(crate) fn worker_started(&self) {
        #[cfg(all(feature = "systemd", unix))]
        if let Some(service) = &self.service {
            service.started();
        }
    }

    /// Receive worker `slot` made progress at `working`'s time (the
    /// caller's clock, read anyway), or, with `None`, is about to wait for
    /// datagrams: for the service manager's watchdog (nothing without one).
    #[inline]
    #[allow(unused_variables)]
    pub(crate) fn beat(&self, slot: usize, working: Option<Instant>) {
        #[cfg(all(feature = "systemd", unix))]
        if let Some(service) = &self.service {
            match working {
                Some(now) => service.beat(slot, now, false),
                None => service.waiting(slot),
            }
        }
    }

    /// Starts what watches the server for the service manager, if anything
    /// does: a thread named `name`.
    #[allow(unused_variables)]
    pub(crate) fn start_watchdog(self: &Arc<Self>, name: String) -> Result<(), Error> {
        #[cfg(all(feature = "systemd", unix))]
        crate::systemd::Service::start_watchdog(self, name)?;
        Ok(())
    }

    fn ending(&self) -> MutexGuard<'_, Ending> {
        // Counts and a list: nothing a panic could leave half-made.
        self.ended.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `sockets` open until the server's threads have ended (or a
    /// bounded shutdown gives up on them): with a handler pool, whose
    /// threads hold the sockets weakly so that a stuck handler cannot keep
    /// the port once shutdown is over.
    pub(crate) fn keep_open(&self, sockets: Vec<Arc<Socket>>) {
        self.ending().keep_open = sockets;
    }

    /// The sockets kept open, grouped by listener, each with its address:
    /// for a handoff, once every thread has ended.
    pub(crate) fn take_kept(&self) -> Vec<(SocketAddr, Vec<Arc<Socket>>)> {
        let mut kept = std::mem::take(&mut self.ending().keep_open);
        let mut groups = Vec::with_capacity(self.listeners.len());
        // Taken from the back, so that each listener's range is at the end.
        for listener in self.listeners.iter().rev() {
            let start = listener.sockets.start.min(kept.len());
            groups.push((listener.addr, kept.split_off(start)));
        }
        groups.reverse();
        groups
    }

    /// Closes the sockets kept open (see [`keep_open`](Shared::keep_open)).
    fn release(&self) {
        let sockets = std::mem::take(&mut self.ending().keep_open);
        drop(sockets);
    }

    /// The handle lets go of a server of `threads` threads: the sockets kept
    /// open close once they have all ended.
    fn detach(&self, threads: usize) {
        let mut ending = self.ending();
        ending.release_at = Some(threads);
        let done = ending.ended >= threads;
        drop(ending);
        if done {
            self.release();
        }
    }

    /// Marks the end of one of the server's threads; see [`ThreadEnd`].
    fn thread_ended(&self) {
        let mut ending = self.ending();
        ending.ended += 1;
        let done = ending.release_at.is_some_and(|n| ending.ended >= n);
        drop(ending);
        self.ended_changed.notify_all();
        if done {
            self.release();
        }
    }

    /// Waits until `threads` threads have ended or `deadline` passes;
    /// returns how many have ended.
    fn wait_for_threads(&self, threads: usize, deadline: Option<Instant>) -> usize {
        let mut ended = self.ending();
        while ended.ended < threads {
            let Some(deadline) = deadline else {
                ended = self
                    .ended_changed
                    .wait(ended)
                    .unwrap_or_else(|e| e.into_inner());
                continue;
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            ended = self
                .ended_changed
                .wait_timeout(ended, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        ended.ended
    }

    /// The counters summed over workers, with the kernel's drop count read
    /// from each socket still open.
    pub(crate) fn snapshot(&self) -> Stats {
        self.stats.snapshot_with_queue(
            None,
            |slot| self.live_drops(slot),
            || self.pool.as_ref().map(|(pool, _)| pool.queued()),
        )
    }

    /// The kernel's drop count of the socket whose drops counter slot
    /// `slot` reports, while that socket is open.
    fn live_drops(&self, slot: usize) -> Option<u64> {
        let socket = self.drops.get(slot)?.as_ref()?.upgrade()?;
        sys::kernel_drops(&socket)
    }

    /// Each listener's address and counters, in the order bound. A
    /// listener's counters leave out [`Stats::queued`] (the handler pool's
    /// queue is the server's): it is 0 in each, and counted in the total.
    pub(crate) fn listener_snapshots(&self) -> Vec<(SocketAddr, Stats)> {
        self.listeners
            .iter()
            .map(|listener| {
                let stats = self.stats.snapshot_with_queue(
                    Some(&listener.slots),
                    |slot| self.live_drops(slot),
                    || None,
                );
                (listener.addr, stats)
            })
            .collect()
    }

    /// Every listener's address, in the order bound.
    pub(crate) fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().map(|l| l.addr).collect()
    }

    /// Whether a bounded shutdown gave up waiting for the server's threads.
    pub(crate) fn is_abandoned(&self) -> bool {
        self.abandoned.load(Ordering::Acquire)
    }

    pub(crate) fn is_stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire) != RUNNING
    }

    /// Whether the server is stopping for a handoff.
    pub(crate) fn is_handing_off(&self) -> bool {
        self.stop.load(Ordering::Acquire) == HANDING_OFF
    }

    /// Whether the server is shutting down (not handing off): what it
    /// holds is dropped.
    pub(crate) fn is_shutting_down(&self) -> bool {
        self.stop.load(Ordering::Acquire) == SHUTTING_DOWN
    }

    /// Whether the server can hand its sockets on: none of them is one a
    /// stop shuts down.
    pub(crate) fn can_hand_off(&self) -> bool {
        self.sockets.iter().all(|(_, shut)| !shut)
    }

    /// Stops the server for a handoff: every request received is handled
    /// and answered (the handler pool's queue too), nothing more is
    /// received, and the sockets are left as they are. Returns `false`,
    /// doing nothing, if the server was already stopping, or cannot hand
    /// off.
    pub(crate) fn hand_off(&self) -> bool {
        if !self.can_hand_off()
            || self
                .stop
                .compare_exchange(RUNNING, HANDING_OFF, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
        {
            return false;
        }
        #[cfg(feature = "tokio")]
        self.stopping.notify_waiters();
        if self.receivers.load(Ordering::SeqCst) == 0 {
            self.drain_pool_whole();
        }
        true
    }

    /// Closes the handler pool, if any, to answer all it holds: once no
    /// receive worker can queue more, in a handoff.
    fn drain_pool_whole(&self) {
        if let Some((pool, _)) = &self.pool {
            pool.close(later(Instant::now(), Duration::MAX));
        }
    }

    /// Why [`hand_off`](Shared::hand_off) refused, for the server at
    /// `addr` (whose handle then shuts it down).
    pub(crate) fn handoff_refused(&self, addr: SocketAddr) -> Error {
        let reason = if self.can_hand_off() {
            "the server was already shutting down"
        } else {
            "the server bound its sockets without ServerBuilder::allow_handoff(true): \
             set it to hand them on (the server has been shut down)"
        };
        Error::invalid_for("ServerHandle::handoff", addr, reason)
    }

    /// The sockets and final counters of a server whose threads (or
    /// tasks) have all ended after [`hand_off`](Shared::hand_off).
    pub(crate) fn handed_off(&self) -> Result<Handoff, Error> {
        // Read while the sockets are open, for their kernel drops.
        let stats = self.snapshot();
        Handoff::from_server(self.take_kept(), stats)
    }

    pub(crate) fn stop(&self) {
        if self
            .stop
            .compare_exchange(RUNNING, SHUTTING_DOWN, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        #[cfg(all(feature = "systemd", unix))]
        if let Some(service) = &self.service {
            service.stopping();
        }
        #[cfg(feature = "tokio")]
        self.stopping.notify_waiters();
        for (socket, shut) in &self.sockets {
            let Some(socket) = socket.upgrade().filter(|_| *shut) else {
                continue;
            };
            // Wakes a worker blocked in a receive (see `sys::WAKE_INTERVAL`).
            // Unconnected UDP sockets report `ENOTCONN` even when the wake-up
            // works, and where it does not the read timeout takes over.
            let _ = socket.shutdown(Shutdown::Read);
        }
        if let Some((pool, drain)) = &self.pool {
            pool.close(later(Instant::now(), *drain));
        }
    }

    pub(crate) fn latency(&self) -> Latency {
        self.stats.latency()
    }
}

/// `Shared::stop`: the server runs.
const RUNNING: u8 = 0;
/// `Shared::stop`: the server shuts down.
const SHUTTING_DOWN: u8 = 1;
/// `Shared::stop`: the server stops to hand its sockets on.
const HANDING_OFF: u8 = 2;

/// Marks a receive worker (or task) as ended when dropped: at the end of
/// its run, as it unwinds, or when its task is dropped with its runtime.
pub(crate) struct WorkerEnd {
    pub(crate) shared: Arc<Shared>,
    pub(crate) slot: usize,
}

impl Drop for WorkerEnd {
    fn drop(&mut self) {
        self.shared.worker_ended(self.slot);
    }
}

/// Whether a server tells its service manager how it is
/// (`notify_service_manager`, feature `systemd`), and how many receive
/// workers it has.
#[derive(Debug, Clone)]
pub(crate) struct Notify {
    #[cfg_attr(not(all(feature = "systemd", unix)), allow(dead_code))]
    pub(crate) on: bool,
    /// The receive workers' names, by counter slot.
    #[cfg_attr(not(all(feature = "systemd", unix)), allow(dead_code))]
    pub(crate) workers: Vec<String>,
}

/// One listener's address and the counter slots of its requests.
#[derive(Debug)]
pub(crate) struct ListenerSlots {
    pub(crate) addr: SocketAddr,
    pub(crate) slots: Vec<usize>,
    /// Its sockets' places in the server's list of sockets.
    pub(crate) sockets: std::ops::Range<usize>,
}

/// How many of a server's threads have ended, and what waits for them.
#[derive(Debug, Default)]
struct Ending {
    ended: usize,
    /// Once the handle has let go: how many threads must end before
    /// `keep_open` is released.
    release_at: Option<usize>,
    keep_open: Vec<Arc<Socket>>,
}

/// Counts a server thread as ended when dropped: at the end of its run, or
/// as it unwinds.
#[derive(Debug)]
pub(crate) struct ThreadEnd(pub(crate) Arc<Shared>);

impl Drop for ThreadEnd {
    fn drop(&mut self) {
        self.0.thread_ended();
    }
}

/// Controls a running server from any thread or task: its address, its
/// counters and latency histograms, and its stop signal. The same type for
/// both engines.
///
/// Cheap to clone, and never keeps the server running: taken with
/// [`GreetServer::control`](crate::GreetServer::control) (before
/// [`serve`](crate::GreetServer::serve)) or from a running server's handle
/// ([`ServerHandle::control`]).
#[derive(Debug, Clone)]
pub struct ServerControl {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
}

impl ServerControl {
    pub(crate) fn new(shared: Arc<Shared>, local_addr: SocketAddr) -> Self {
        ServerControl { shared, local_addr }
    }

    /// What the server's threads or tasks share.
    pub(crate) fn shared(&self) -> &Shared {
        &self.shared
    }

    /// Asks the server to stop. Returns at once; [`GreetServer::serve`](crate::GreetServer::serve)
    /// returns, or the handle's `shutdown` can wait for it, once every
    /// worker has finished the handler call in progress. Requests received but not yet
    /// handled are dropped and counted in
    /// [`Stats::shutdown_dropped`]. Calling it again does nothing.
    pub fn shutdown(&self) {
        self.shared.stop();
    }

    /// Whether [`shutdown`](ServerControl::shutdown) has been called.
    #[must_use]
    pub fn is_shutdown(&self) -> bool {
        self.shared.is_stopped()
    }

    /// The server's counters now.
    #[must_use]
    pub fn stats(&self) -> Stats {
        self.shared.snapshot()
    }

    /// The server's latency histograms now: handler time and queue wait.
    /// Still readable once the server has stopped.
    #[must_use]
    pub fn latency(&self) -> Latency {
        self.shared.latency()
    }

    /// The server's address: its first, for a server on several
    /// ([`local_addrs`](ServerControl::local_addrs) gives them all).
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Every address the server serves on, in the order they were given
    /// (one, unless it was bound with
    /// [`bind_all`](crate::ServerBuilder::bind_all)), with the real ports.
    #[must_use]
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.shared.local_addrs()
    }

    /// The counters of each address the server serves on, in the order of
    /// [`local_addrs`](ServerControl::local_addrs): what came in on that
    /// address and what became of it. Summed, they are
    /// [`stats`](ServerControl::stats), but for [`Stats::queued`], which
    /// counts the handler pool's queue, shared by every address: it is 0
    /// in each listener's counters and counted in the total only.
    ///
    /// ```
    /// # fn main() -> Result<(), udp_greet::Error> {
    /// use udp_greet::{GreetClient, GreetServer};
    ///
    /// let server = GreetServer::builder()
    ///     .bind_all(["127.0.0.1:0", "127.0.0.1:0"])?
    ///     .spawn(udp_greet::greet)?;
    /// let (first, second) = (server.local_addr(), server.local_addrs()[1]);
    /// GreetClient::connect(second)?.send_recv(b"Tracy")?;
    /// let control = server.control();
    /// // Final once the server has stopped (a reply can reach its client
    /// // a moment before it is counted).
    /// server.shutdown()?;
    /// let per_listener = control.listener_stats();
    /// assert_eq!(per_listener[0], (first, udp_greet::Stats::default()));
    /// assert_eq!((per_listener[1].0, per_listener[1].1.replied), (second, 1));
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn listener_stats(&self) -> Vec<(SocketAddr, Stats)> {
        self.shared.listener_snapshots()
    }
}

/// A server running on background threads, from [`GreetServer::spawn`](crate::GreetServer::spawn).
///
/// Dropping the handle asks the server to stop and returns at once, as
/// dropping the async server's handle does: the threads finish on their
/// own (within about one handler call, or the pool's drain time). Call
/// [`shutdown`](ServerHandle::shutdown) or
/// [`shutdown_timeout`](ServerHandle::shutdown_timeout) to wait until the
/// port is free and read the final counters.
#[must_use = "dropping the handle shuts the server down"]
pub struct ServerHandle {
    control: ServerControl,
    threads: Vec<JoinHandle<()>>,
    /// How many threads the server has started, the caller's own for
    /// `serve` included.
    thread_count: usize,
    finished: bool,
}

impl fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerHandle")
            .field("local_addr", &self.control.local_addr)
            .field("threads", &self.thread_count)
            .field("stopped", &self.control.is_shutdown())
            .finish()
    }
}

impl ServerHandle {
    pub(crate) fn new(shared: Arc<Shared>, local_addr: SocketAddr) -> Self {
        ServerHandle {
            control: ServerControl::new(shared, local_addr),
            threads: Vec::new(),
            thread_count: 0,
            finished: false,
        }
    }

    /// Counts a thread started for the server; `thread` is `None` for the
    /// caller's own (in `serve`).
    pub(crate) fn started(&mut self, thread: Option<JoinHandle<()>>) {
        self.threads.extend(thread);
        self.thread_count += 1;
    }

    pub(crate) fn shared(&self) -> &Shared {
        self.control.shared()
    }

    /// The address the server is bound to: the first, for a server on
    /// several.
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.control.local_addr()
    }

    /// Every address the server is bound to, in the order bound.
    #[must_use]
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.control.local_addrs()
    }

    /// Where the XDP program of an AF_XDP server
    /// ([`ServerBuilder::xdp`](crate::ServerBuilder::xdp), feature `xdp`)
    /// runs: natively in the driver, or in the generic hook. `None` for a
    /// server on the socket path.
    #[cfg(all(feature = "xdp", target_os = "linux"))]
    #[cfg_attr(docsrs, doc(cfg(all(feature = "xdp", target_os = "linux"))))]
    #[must_use]
    pub fn xdp_mode(&self) -> Option<crate::xdp::XdpMode> {
        self.control.shared.xdp_mode.get().copied()
    }

    /// The server's counters now.
    #[must_use]
    pub fn stats(&self) -> Stats {
        self.control.stats()
    }

    /// The server's latency histograms now: handler time and queue wait.
    #[must_use]
    pub fn latency(&self) -> Latency {
        self.control.latency()
    }

    /// A control that can stop the server from another thread, and read
    /// its counters: the same type for both engines.
    #[must_use]
    pub fn control(&self) -> ServerControl {
        self.control.clone()
    }

    /// Stops the server and waits until every thread has stopped and every
    /// socket is closed, so the address can be bound again at once. Returns
    /// the final counters.
    ///
    /// Each receive worker finishes the handler call in progress (inline
    /// mode), sends the replies it has ready, and drops the requests it
    /// received but has not handled ([`Stats::shutdown_dropped`]). A
    /// handler pool answers what is queued until its
    /// [drain time](crate::HandlerPool::drain_timeout) is over, drops the
    /// rest, and then the calls in progress are waited for. Without a drain
    /// time, shutdown takes about one handler call.
    ///
    /// A handler that never returns makes this wait forever; use
    /// [`shutdown_timeout`](ServerHandle::shutdown_timeout) to bound the
    /// wait.
    ///
    /// # Errors
    ///
    /// [`Error::WorkerPanicked`] if a server thread ended abnormally (a bug
    /// in udp-greet; handler panics are caught and never end a thread).
    pub fn shutdown(mut self) -> Result<Stats, Error> {
        self.finish(None)?;
        Ok(self.control.shared.snapshot())
    }

    /// Stops the server as [`shutdown`](ServerHandle::shutdown) does, but
    /// waits at most `limit` for its threads to end.
    ///
    /// Threads still in a handler call when the time is up are left to
    /// finish on their own: their requests stay counted in
    /// [`Stats::in_flight`] until they do, and a reply they make later is
    /// not sent (it is counted in [`Stats::shutdown_dropped`]). With
    /// a handler pool the sockets are closed all the same, so the address is
    /// free at once (outside Linux, once each receive worker has seen the
    /// stop: within the 50 ms it waits between checks, which may end after
    /// `limit`); in inline mode a stuck receive worker keeps its socket
    /// until its handler returns.
    ///
    /// # Errors
    ///
    /// [`Error::ShutdownTimedOut`], with how many threads are still
    /// running, when the time ran out; [`Error::WorkerPanicked`] as for
    /// `shutdown`.
    ///
    /// # Examples
    ///
    /// ```
    /// # fn main() -> Result<(), udp_greet::Error> {
    /// use std::time::Duration;
    ///
    /// let server = udp_greet::GreetServer::builder()
    ///     .handler_pool(udp_greet::HandlerPool::threads(4))
    ///     .bind("127.0.0.1:0")?
    ///     .spawn(udp_greet::greet)?;
    /// let stats = server.shutdown_timeout(Duration::from_secs(5))?;
    /// assert_eq!(stats.in_flight(), 0);
    /// # Ok(())
    /// # }
    /// ```
    pub fn shutdown_timeout(mut self, limit: Duration) -> Result<Stats, Error> {
        self.finish(Some(limit))?;
        Ok(self.control.shared.snapshot())
    }

    /// Stops the server to hand its sockets to a new one, their kernel
    /// queues intact, and returns them with the final counters: for a
    /// restart or an upgrade that loses no datagram (see [`Handoff`]).
    ///
    /// Unlike [`shutdown`](ServerHandle::shutdown), nothing received is
    /// dropped: each receive worker stops receiving, handles and answers
    /// the requests it holds, and ends; a handler pool answers everything
    /// queued, whatever its drain time. Datagrams that arrive meanwhile
    /// wait in the sockets' queues for the next server. The final counters
    /// ([`Handoff::stats`]) then satisfy `received == accounted()` with
    /// nothing dropped at shutdown. With `notify_service_manager`
    /// (feature `systemd`), no `STOPPING=1` is sent: the service goes on.
    ///
    /// Waits for every handler call in progress: a handler that never
    /// returns makes this wait forever. A [`ServerControl::shutdown`] made
    /// while the handoff runs is ignored.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] when the server cannot hand off: it bound
    /// its own sockets without
    /// [`allow_handoff(true)`](crate::ServerBuilder::allow_handoff), or it
    /// was already shutting down. The server is then shut down as
    /// [`shutdown`](ServerHandle::shutdown) does, and its sockets closed.
    /// [`Error::WorkerPanicked`] as for `shutdown`.
    ///
    /// # Examples
    ///
    /// ```
    /// # fn main() -> Result<(), udp_greet::Error> {
    /// let server = udp_greet::GreetServer::bind("127.0.0.1:0")?.spawn(udp_greet::greet)?;
    /// // Bound without `allow_handoff(true)`: its sockets cannot be handed on.
    /// assert!(matches!(server.handoff(), Err(udp_greet::Error::InvalidConfig { .. })));
    /// # Ok(())
    /// # }
    /// ```
    pub fn handoff(mut self) -> Result<Handoff, Error> {
        let shared = self.control.shared.clone();
        if !shared.hand_off() {
            self.finish(None)?;
            return Err(shared.handoff_refused(self.control.local_addr));
        }
        self.finish(None)?;
        shared.handed_off()
    }

    /// Stops the server and waits for its threads, for at most `limit`.
    pub(crate) fn finish(&mut self, limit: Option<Duration>) -> Result<(), Error> {
        if self.finished {
            return Ok(());
        }
        self.finished = true;
        self.control.shared.stop();
        let started = Instant::now();
        let deadline = limit.and_then(|l| started.checked_add(l));
        let ended = self
            .control
            .shared
            .wait_for_threads(self.thread_count, deadline);
        if ended < self.thread_count {
            // Threads still in a handler call are left to finish on their
            // own; what they make from now on is not sent.
            self.control.shared.abandoned.store(true, Ordering::Release);
            // And an AF_XDP server's interface gives the kernel everything
            // again, though a stuck worker still holds its queue's socket.
            #[cfg(all(feature = "xdp", target_os = "linux"))]
            if let Some(attached) = self
                .control
                .shared
                .xdp_attached
                .get()
                .and_then(|w| w.upgrade())
            {
                attached.detach();
            }
        }
        let mut result = Ok(());
        for thread in std::mem::take(&mut self.threads) {
            if deadline.is_some() && !thread.is_finished() {
                // Left to finish on its own.
                continue;
            }
            if thread.join().is_err() {
                result = Err(Error::WorkerPanicked {
                    addr: self.control.local_addr,
                });
            }
        }
        if !self.control.shared.is_handing_off() || result.is_err() {
            self.control.shared.release();
        }
        let stuck = self.thread_count.saturating_sub(ended);
        if stuck > 0 {
            return Err(Error::ShutdownTimedOut {
                addr: self.control.local_addr,
                stuck_threads: stuck,
                waited: started.elapsed(),
            });
        }
        result
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        // Signal and detach: never wait here, where a handler that never
        // returns would block the dropping thread forever.
        self.control.shared.stop();
        self.control.shared.detach(self.thread_count);
    }
}
