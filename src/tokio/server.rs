//! The async server: one task per socket, each receiving in batches when
//! the socket is ready, running handler futures in places it reuses, and
//! sending their replies in batches.

use std::fmt;
use std::future::{Future, poll_fn};
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use socket2::{SockRef, Socket};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::futures::OwnedNotified;
use tokio::task::JoinHandle;
use tokio::time::Sleep;

use super::inflight::{Ended, InFlight, Permits, Started};
use super::request::{Buffers, Reply, Request};
use crate::busy_poll::{PollWindow, later};
use crate::config::{Config, DEFAULT_BATCH_SIZE, Dispatch, ServerBuilder};
use crate::control::{ServerControl, Shared, WorkerEnd};
use crate::engine::Tokio;
use crate::error::Error;
use crate::handoff::Handoff;
use crate::histogram::Latency;
use crate::limits::Limits;
use crate::policy::{Admission, Processor, Standing};
use crate::server::Bound;
use crate::stats::Stats;
use crate::sys::{self, Arrival, Received, Source};

/// The most receive calls one wake-up of a worker makes before it lets the
/// runtime run other tasks.
const RECV_CALLS_PER_TURN: usize = 16;
/// The most datagrams one wake-up of a worker takes before it lets the
/// runtime run other tasks: with the default batch of 32, 8 full batches.
/// Measured (`cargo bench --bench async`), larger turns gained nothing.
const DATAGRAMS_PER_TURN: usize = 256;

impl Default for ServerBuilder<Tokio> {
    fn default() -> Self {
        Self::with_dispatch(Dispatch::Async(Limits::default()))
    }
}

impl ServerBuilder<Tokio> {
    /// The limits on the server's handler futures: how many run at once,
    /// how long each may run, what is sent to requests shed, and how long
    /// shutdown waits for them. Defaults to [`Limits::new`].
    pub fn limits(self, limits: Limits) -> Self {
        self.set_dispatch(Dispatch::Async(limits))
    }

    /// Creates the sockets, applies the options and binds them to `addr`,
    /// as [`ServerBuilder::bind`](crate::ServerBuilder::bind) does for the
    /// blocking server.
    ///
    /// # Errors
    ///
    /// As [`ServerBuilder::bind`](crate::ServerBuilder::bind).
    pub fn bind<A: ToSocketAddrs + fmt::Debug>(self, addr: A) -> Result<GreetServer, Error> {
        Ok(GreetServer {
            bound: self.bind_sockets(addr)?,
        })
    }

    /// Binds one server to several addresses, as
    /// [`ServerBuilder::bind_all`](crate::ServerBuilder::bind_all) does for
    /// the blocking server: one listener per address, each with its own
    /// receive tasks, all sharing one handler, one rate limiter, one
    /// [`max_in_flight`](Limits::max_in_flight) and one set of counters.
    ///
    /// # Errors
    ///
    /// As [`ServerBuilder::bind_all`](crate::ServerBuilder::bind_all).
    pub fn bind_all<A, I>(self, addrs: I) -> Result<GreetServer, Error>
    where
        A: ToSocketAddrs + fmt::Debug,
        I: IntoIterator<Item = A>,
    {
        Ok(GreetServer {
            bound: self.bind_listeners(addrs)?,
        })
    }

    /// Serves on a socket made elsewhere, as
    /// [`ServerBuilder::from_std`](crate::ServerBuilder::from_std) does for
    /// the blocking server.
    ///
    /// # Errors
    ///
    /// As [`ServerBuilder::from_std`](crate::ServerBuilder::from_std).
    pub fn from_std(self, socket: std::net::UdpSocket) -> Result<GreetServer, Error> {
        Ok(GreetServer {
            bound: self.adopt_socket(socket)?,
        })
    }

    /// Serves on several sockets made elsewhere, one listener each, as
    /// [`ServerBuilder::from_std_all`](crate::ServerBuilder::from_std_all)
    /// does for the blocking server.
    ///
    /// # Errors
    ///
    /// As [`ServerBuilder::from_std_all`](crate::ServerBuilder::from_std_all).
    pub fn from_std_all(
        self,
        sockets: impl IntoIterator<Item = std::net::UdpSocket>,
    ) -> Result<GreetServer, Error> {
        Ok(GreetServer {
            bound: self.adopt_sockets(sockets)?,
        })
    }

    /// Serves the sockets of a [`Handoff`], as
    /// [`ServerBuilder::from_handoff`](crate::ServerBuilder::from_handoff)
    /// does for the blocking server: one listener per address, one task
    /// per socket.
    ///
    /// # Errors
    ///
    /// As [`ServerBuilder::from_handoff`](crate::ServerBuilder::from_handoff).
    pub fn from_handoff(self, handoff: Handoff) -> Result<GreetServer, Error> {
        Ok(GreetServer {
            bound: self.adopt_handoff(handoff)?,
        })
    }
}

/// A bound UDP server for the caller's tokio runtime, ready to
/// [`serve`](GreetServer::serve) or [`spawn`](GreetServer::spawn): the async
/// twin of [`udp_greet::GreetServer`](crate::GreetServer), with the same
/// settings, promises and counters.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), udp_greet::Error> {
/// use udp_greet::tokio::{GreetClient, GreetServer};
///
/// let server = GreetServer::bind("127.0.0.1:0")?.spawn(udp_greet::tokio::greet)?;
/// let client = GreetClient::connect(server.local_addr()).await?;
/// assert_eq!(client.send_recv(b"Tracy").await?, b"Hello, Tracy!");
/// let stats = server.shutdown().await?;
/// assert_eq!(stats.replied, 1);
/// # Ok(())
/// # }
/// ```
///
/// Its builder takes [`Limits`]; the blocking server's handler pool is not
/// one of its settings:
///
/// ```compile_fail,E0599
/// use udp_greet::HandlerPool;
///
/// let builder = udp_greet::tokio::GreetServer::builder().handler_pool(HandlerPool::threads(4));
/// ```
#[derive(Debug)]
pub struct GreetServer {
    bound: Bound,
}

impl GreetServer {
    /// Binds a server with default settings to `addr`.
    ///
    /// # Errors
    ///
    /// As [`ServerBuilder::bind`](crate::ServerBuilder::bind).
    pub fn bind<A: ToSocketAddrs + fmt::Debug>(addr: A) -> Result<GreetServer, Error> {
        ServerBuilder::<Tokio>::default().bind(addr)
    }

    /// A builder for a server with non-default settings.
    pub fn builder() -> ServerBuilder<Tokio> {
        ServerBuilder::default()
    }

    /// Serves on a socket made elsewhere, with every setting at its default.
    ///
    /// # Errors
    ///
    /// As [`ServerBuilder::from_std`](crate::ServerBuilder::from_std).
    pub fn from_std(socket: std::net::UdpSocket) -> Result<GreetServer, Error> {
        ServerBuilder::<Tokio>::default().from_std(socket)
    }

    /// The address the server is bound to, with the real port when port 0
    /// was asked for: the first, for a server on several.
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.bound.local_addr()
    }

    /// Every address the server is bound to, in the order given to
    /// [`bind_all`](ServerBuilder::bind_all).
    #[must_use]
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.bound.local_addrs()
    }

    /// Whether ICMP error reports about earlier replies are kept out of
    /// the receive path: on Windows, whether the system accepted
    /// `SIO_UDP_CONNRESET` and `SIO_UDP_NETRESET` off; elsewhere `true`. As
    /// [`GreetServer::icmp_reports_off`](crate::GreetServer::icmp_reports_off),
    /// which says more.
    #[must_use]
    pub fn icmp_reports_off(&self) -> bool {
        self.bound.icmp_reports_off()
    }

    /// A control that stops the server and reads its counters from any
    /// thread or task; take it before calling [`serve`](GreetServer::serve).
    #[must_use]
    pub fn control(&self) -> ServerControl {
        self.bound.control()
    }

    /// Runs the server on the caller's tokio runtime until its
    /// [`ServerControl`] stops it, then returns the final counters once
    /// every socket is closed.
    ///
    /// For each datagram, `handler` gets a [`Request`] (owned) and returns
    /// a future of the [`Reply`], or of `None` for no reply. See
    /// [`spawn`](GreetServer::spawn) for how requests are admitted, run and
    /// answered. Dropping this future stops the server.
    ///
    /// # Errors
    ///
    /// As [`spawn`](GreetServer::spawn), and [`Error::WorkerPanicked`] if a
    /// worker task ended abnormally.
    pub async fn serve<H, F>(self, handler: H) -> Result<Stats, Error>
    where
        H: Fn(Request) -> F + Send + Sync + 'static,
        F: Future<Output = Option<Reply>> + Send + 'static,
    {
        self.serve_until(handler, std::future::pending()).await
    }

    /// As [`serve`](GreetServer::serve), until `signal` completes (or the
    /// server's [`ServerControl`] stops it); then shuts down as
    /// [`ServerHandle::shutdown`] does and returns the final counters.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), udp_greet::Error> {
    /// use udp_greet::tokio::GreetServer;
    ///
    /// let server = GreetServer::bind("127.0.0.1:0")?;
    /// let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    /// let served = tokio::spawn(server.serve_until(udp_greet::tokio::greet, async {
    ///     let _ = stopped.await;
    /// }));
    /// let _ = stop.send(());
    /// let stats = served.await.expect("server task")?;
    /// assert_eq!(stats.received, 0);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`serve`](GreetServer::serve).
    pub async fn serve_until<H, F, S>(self, handler: H, signal: S) -> Result<Stats, Error>
    where
        H: Fn(Request) -> F + Send + Sync + 'static,
        F: Future<Output = Option<Reply>> + Send + 'static,
        S: Future<Output = ()>,
    {
        let mut handle = self.spawn(handler)?;
        let mut signal = pin!(signal);
        poll_fn(|cx| {
            if signal.as_mut().poll(cx).is_ready() {
                return Poll::Ready(());
            }
            handle.poll_finished(cx)
        })
        .await;
        handle.shutdown().await
    }

    /// Runs the server on tasks of the caller's tokio runtime (one per
    /// socket: see [`ServerBuilder::workers`](crate::ServerBuilder::workers))
    /// and returns a handle to it.
    ///
    /// - **Receiving** is batched (`recvmmsg` on Linux) and driven by the
    ///   socket's readiness. One wake-up takes at most 256 datagrams before
    ///   the task yields, so a flood on one socket cannot starve the
    ///   runtime's other tasks.
    /// - **Admission.** Each admitted request takes a permit, without
    ///   waiting: at most
    ///   [`max_in_flight`](Limits::max_in_flight) handler
    ///   futures run at once, over all workers. With none free the request
    ///   is shed at once ([`Stats::overloaded`], and the
    ///   [busy reply](Limits::overload_reply) if set); the
    ///   receive loop never waits for a permit, and futures in flight are
    ///   never cancelled to make room. The rate limit, the amplification cap
    ///   and the checks on sources apply as on the blocking server.
    /// - **Handlers** run inside the worker task: each future is polled
    ///   once when its request arrives (a handler that needs no await
    ///   answers in the same batch) and again whenever it is woken. A
    ///   handler that has CPU-heavy work to do should hand it to
    ///   `tokio::task::spawn_blocking` and await that. One that runs longer
    ///   than [`handler_timeout`](Limits::handler_timeout) is
    ///   dropped ([`Stats::timed_out`]); one that panics is caught
    ///   ([`Stats::handler_panics`]).
    /// - **Replies** ready together go out together (`sendmmsg`). A reply
    ///   the socket cannot take yet waits for it to be writable; a send
    ///   that fails is counted ([`Stats::send_errors`]) and the rest go on.
    /// - **Memory.** A request's bytes are copied from the batch into a
    ///   buffer the server reuses, and a reply made with
    ///   [`Request::reply_with`] is written into another; each handler
    ///   future lives in a place made once and reused. Once warm, a server
    ///   whose handler allocates nothing allocates nothing per request
    ///   (`tests/alloc.rs`).
    ///
    /// # Errors
    ///
    /// [`Error::NoRuntime`] outside a tokio runtime; [`Error::Socket`] when
    /// a socket cannot be registered with the runtime.
    #[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
    pub fn spawn<H, F>(self, handler: H) -> Result<ServerHandle, Error>
    where
        H: Fn(Request) -> F + Send + Sync + 'static,
        F: Future<Output = Option<Reply>> + Send + 'static,
    {
        let Bound {
            listeners,
            config,
            shared,
            layout,
        } = self.bound;
        let addr = config.local_addr;
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime { addr })?;
        let handler = Arc::new(handler);
        let limits = config.limits().cloned().unwrap_or_default();
        let permits = Permits::new(limits.max_in_flight);
        let mut workers = Vec::new();
        // Kept to be given back by a handoff, and closed once every task
        // has ended otherwise.
        if shared.can_hand_off() {
            shared.keep_open(
                listeners
                    .iter()
                    .flat_map(|l| l.sockets.iter().cloned())
                    .collect(),
            );
        }
        for (k, listener) in listeners.into_iter().enumerate() {
            let addr = listener.config.local_addr;
            for (index, socket) in listener.sockets.into_iter().enumerate() {
                let registered = register(&socket, &runtime).map_err(|source| Error::Socket {
                    action: "register with the tokio runtime",
                    addr,
                    source,
                })?;
                workers.push(ReceiveTask::new(
                    layout.worker_slot(k, index),
                    registered,
                    socket,
                    handler.clone(),
                    &listener.config,
                    &shared,
                    permits.clone(),
                ));
            }
        }
        shared.start_watchdog(format!("udp:{}/wd", addr.port()))?;
        shared.expect_receivers(workers.len());
        let tasks = workers
            .into_iter()
            .map(|worker| Some(runtime.spawn(worker.run())))
            .collect();
        Ok(ServerHandle {
            control: ServerControl::new(shared, addr),
            tasks,
            panicked: false,
            cancelled: false,
        })
    }
}

/// The tokio socket a worker serves on: a duplicate of `socket`, so that
/// the original stays readable for snapshots (kernel drops) while the
/// worker runs; both close when it ends.
fn register(socket: &Socket, runtime: &tokio::runtime::Handle) -> io::Result<UdpSocket> {
    let dup = socket.try_clone()?;
    dup.set_nonblocking(true)?;
    dup.set_read_timeout(None)?;
    let _entered = runtime.enter();
    UdpSocket::from_std(dup.into())
}

/// A server running on tokio tasks, from
/// [`GreetServer::spawn`].
///
/// Dropping the handle stops the server without waiting: its tasks finish
/// their drain on their own. Await [`shutdown`](ServerHandle::shutdown)
/// to know the port is free.
#[must_use = "dropping the handle shuts the server down"]
#[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
pub struct ServerHandle {
    control: ServerControl,
    tasks: Vec<Option<JoinHandle<()>>>,
    panicked: bool,
    /// A task was cancelled by its runtime shutting down.
    cancelled: bool,
}

impl fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerHandle")
            .field("local_addr", &self.control.local_addr())
            .field("tasks", &self.tasks.len())
            .field("stopped", &self.control.is_shutdown())
            .finish()
    }
}

impl ServerHandle {
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

    /// The server's counters now.
    #[must_use]
    pub fn stats(&self) -> Stats {
        self.control.stats()
    }

    /// The server's latency histograms now: handler time (from the request's
    /// arrival to its future's end) and the wait before the handler was
    /// called.
    #[must_use]
    pub fn latency(&self) -> Latency {
        self.control.latency()
    }

    /// A control that can stop the server from any thread or task: the
    /// same type for both engines.
    #[must_use]
    pub fn control(&self) -> ServerControl {
        self.control.clone()
    }

    /// Stops the server and waits until every task has ended and every
    /// socket is closed; returns the final counters.
    ///
    /// Shutdown stops receiving at once, lets handler futures in flight
    /// finish (and their replies go out) until the
    /// [drain time](Limits::drain_timeout) is over, then
    /// drops the futures still running and counts them in
    /// [`Stats::shutdown_dropped`]. Without a drain time (the default)
    /// the futures in flight are dropped at once.
    ///
    /// # Errors
    ///
    /// [`Error::Cancelled`] if the runtime the server ran on shut down
    /// under it; [`Error::WorkerPanicked`] if a worker task ended
    /// abnormally (a bug in udp-greet; handler panics are caught and
    /// counted).
    pub async fn shutdown(mut self) -> Result<Stats, Error> {
        self.control.shutdown();
        poll_fn(|cx| self.poll_finished(cx)).await;
        let addr = self.control.local_addr();
        if self.panicked {
            return Err(Error::WorkerPanicked { addr });
        }
        if self.cancelled {
            return Err(Error::Cancelled { addr });
        }
        Ok(self.control.shared().snapshot())
    }

    /// Stops the server to hand its sockets to a new one, their kernel
    /// queues intact, and returns them with the final counters: for a
    /// restart or an upgrade that loses no datagram (see [`Handoff`]).
    ///
    /// Unlike [`shutdown`](ServerHandle::shutdown), nothing received is
    /// dropped: receiving stops, and every handler future in flight runs
    /// to its end (or its [handler timeout](Limits::handler_timeout)),
    /// whatever the drain time, and its reply goes out. Datagrams that
    /// arrive meanwhile wait in the sockets' queues for the next server,
    /// of either engine.
    ///
    /// # Errors
    ///
    /// As [`ServerHandle::handoff`](crate::ServerHandle::handoff) for the
    /// blocking server, and [`Error::Cancelled`] if the runtime shut down
    /// under the server.
    pub async fn handoff(mut self) -> Result<Handoff, Error> {
        let addr = self.control.local_addr();
        if !self.control.shared().hand_off() {
            let refused = self.control.shared().handoff_refused(addr);
            self.shutdown().await?;
            return Err(refused);
        }
        poll_fn(|cx| self.poll_finished(cx)).await;
        if self.panicked {
            return Err(Error::WorkerPanicked { addr });
        }
        if self.cancelled {
            return Err(Error::Cancelled { addr });
        }
        self.control.shared().handed_off()
    }

    /// Whether every task has ended (the server stopped).
    #[must_use]
    pub fn is_finished(&self) -> bool {
        self.tasks
            .iter()
            .all(|task| task.as_ref().is_none_or(JoinHandle::is_finished))
    }

    /// Ready once every task has ended.
    fn poll_finished(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let mut pending = false;
        for slot in &mut self.tasks {
            if let Some(task) = slot {
                match Pin::new(task).poll(cx) {
                    Poll::Pending => pending = true,
                    Poll::Ready(result) => {
                        if let Err(err) = result {
                            self.cancelled |= err.is_cancelled();
                            self.panicked |= !err.is_cancelled();
                        }
                        *slot = None;
                    }
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.control.shutdown();
    }
}

/// What a worker keeps about a request while its handler runs.
#[derive(Debug, Clone, Copy)]
struct Meta {
    peer: SocketAddr,
    arrival: Arrival,
    request_len: usize,
    /// How its source stands with the source tokens.
    standing: Standing,
}

/// The socket a task serves, as the server made it, and the task's mark of
/// its end: dropped when the task ends, or is dropped with its runtime.
struct Original {
    socket: Arc<Socket>,
    _end: WorkerEnd,
}

impl Drop for Original {
    fn drop(&mut self) {
        // The socket's mode is its maker's too (the task's copy shares the
        // open file): one made elsewhere goes back in the mode the server
        // took it in, blocking.
        let _ = self.socket.set_nonblocking(false);
    }
}

/// One socket's task.
struct ReceiveTask<H, F> {
    socket: UdpSocket,
    /// The socket as the server made it (the same socket as `socket`):
    /// held so that snapshots read its kernel drops, put back in blocking
    /// mode, and closed with the worker (see [`Original`]).
    _original: Original,
    source: Source,
    core: Core<H, F>,
}

/// Everything of a worker but its socket and receive buffers.
struct Core<H, F> {
    handler: Arc<H>,
    limits: Limits,
    shared: Arc<Shared>,
    processor: Processor,
    inflight: InFlight<F, Meta>,
    buffers: Arc<Buffers>,
    /// Replies on their way out; places `0..out_used` are taken.
    out: sys::Replies,
    out_used: usize,
    /// Futures that ended in one round of polling (kept for its memory).
    ended: Vec<Ended<Option<Reply>, Meta>>,
    /// Datagrams one receive takes at most.
    batch_len: usize,
    /// Wakes the task at the earliest of the times below.
    timer: Pin<Box<Sleep>>,
    timer_set: Option<Instant>,
    /// The earliest deadline of a handler future in flight.
    next_expiry: Option<Instant>,
    /// When receiving resumes after a failed receive.
    paused_until: Option<Instant>,
    /// Shutdown has begun; in-flight futures are dropped at this time.
    drain_until: Option<Instant>,
    /// Latency mode's polling window.
    poll: PollWindow,
    stop: Pin<Box<OwnedNotified>>,
}

impl<H, F> ReceiveTask<H, F>
where
    H: Fn(Request) -> F + Send + Sync + 'static,
    F: Future<Output = Option<Reply>> + Send + 'static,
{
    fn new(
        index: usize,
        socket: UdpSocket,
        original: Arc<Socket>,
        handler: Arc<H>,
        config: &Arc<Config>,
        shared: &Arc<Shared>,
        permits: Arc<Permits>,
    ) -> Self {
        let limits = config.limits().cloned().unwrap_or_default();
        let sock = SockRef::from(&socket);
        let source = Source::new(
            &sock,
            config.batch_spec(),
            config.max_datagram,
            config.control,
        );
        let batch_len = config.batch_size.unwrap_or(1);
        let out_size = config.batch_size.unwrap_or(DEFAULT_BATCH_SIZE);
        let out = sys::Replies::new(&sock, out_size, config.gso && config.batch_size.is_some());
        // Room for every request and reply in flight, and a batch.
        let buffers = Buffers::new(limits.max_in_flight.saturating_mul(2) + out_size);
        let mut stop = Box::pin(shared.stopping.clone().notified_owned());
        stop.as_mut().enable();
        ReceiveTask {
            socket,
            _original: Original {
                socket: original,
                _end: WorkerEnd {
                    shared: shared.clone(),
                    slot: index,
                },
            },
            source,
            core: Core {
                handler,
                limits,
                shared: shared.clone(),
                processor: Processor::new(config, &shared.stats, index),
                inflight: InFlight::new(permits),
                buffers,
                out,
                out_used: 0,
                ended: Vec::with_capacity(out_size),
                batch_len,
                timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
                timer_set: None,
                next_expiry: None,
                paused_until: None,
                drain_until: None,
                poll: PollWindow::new(config.busy_poll),
                stop,
            },
        }
    }
}

/// How a worker's turn ended, when it did not wait.
enum Turn {
    /// Out of budget (or busy polling): let the runtime run its other
    /// tasks, timers and I/O, then go on.
    Yield,
    /// Shut down: the worker is done.
    Done,
}

impl<H, F> ReceiveTask<H, F>
where
    H: Fn(Request) -> F + Send + Sync + 'static,
    F: Future<Output = Option<Reply>> + Send + 'static,
{
    /// The worker's task. A turn that runs out of budget yields through
    /// tokio's own `yield_now`, which lets the runtime poll its timers and
    /// I/O before the worker's next turn (a plain self-wake would not, on a
    /// one-thread runtime, for dozens of turns).
    async fn run(mut self) {
        // Once at the start: the runtime makes its list of deferred
        // wake-ups on first use, so that is not in the first turn that runs
        // out of budget (an allocation while requests flow).
        tokio::task::yield_now().await;
        self.core.shared.worker_started();
        loop {
            match poll_fn(|cx| self.turn(cx)).await {
                Turn::Done => return,
                Turn::Yield => tokio::task::yield_now().await,
            }
        }
    }

    /// One turn: whatever is ready, up to the budget.
    fn turn(&mut self, cx: &mut Context<'_>) -> Poll<Turn> {
        let this = self;
        let core = &mut this.core;
        core.inflight.set_task(cx.waker());
        // A few turns at most: a timer that is already due is handled at
        // once rather than after another wake-up.
        for _ in 0..4 {
            let now = Instant::now();
            core.shared.beat(core.processor.slot(), Some(now));
            if core.drain_until.is_none()
                && (core.stop.as_mut().poll(cx).is_ready() || core.shared.is_stopped())
            {
                // A handoff lets every future in flight finish.
                let drain = if core.shared.is_handing_off() {
                    Duration::MAX
                } else {
                    core.limits.drain_timeout
                };
                core.drain_until = Some(later(now, drain));
            }
            // Futures whose time is up are dropped before the woken ones
            // are polled: one woken after its handler timeout (a busy
            // runtime, a handler that blocked) must not run on to its reply.
            if core.next_expiry.is_some_and(|at| at <= now) {
                core.expire(now);
            }
            core.poll_woken(&this.socket, cx);
            if let Some(until) = core.drain_until {
                if core.finish_drain(&this.socket, cx, now >= until) {
                    return Poll::Ready(Turn::Done);
                }
            }
            let mut yielded = false;
            if core.drain_until.is_none() && core.paused_until.is_none_or(|p| p <= now) {
                core.paused_until = None;
                yielded = core.receive(&this.socket, &mut this.source, cx);
            }
            core.flush(&this.socket, cx);
            core.publish(&this.socket, false);
            if core.arm_timer(cx) {
                continue;
            }
            if yielded {
                return Poll::Ready(Turn::Yield);
            }
            core.shared.beat(core.processor.slot(), None);
            return Poll::Pending;
        }
        Poll::Ready(Turn::Yield)
    }
}

impl<H, F> Core<H, F>
where
    H: Fn(Request) -> F + Send + Sync + 'static,
    F: Future<Output = Option<Reply>> + Send + 'static,
{
    /// Receives what the socket has, up to a turn's budget; returns whether
    /// the budget ran out (or busy polling goes on), so that the task
    /// yields and runs again.
    fn receive(&mut self, socket: &UdpSocket, source: &mut Source, cx: &mut Context<'_>) -> bool {
        let mut taken = 0;
        for _ in 0..RECV_CALLS_PER_TURN {
            if taken >= DATAGRAMS_PER_TURN {
                return true;
            }
            // Every datagram of a batch may need a place for its reply.
            if self.out.size() - self.out_used < self.batch_len {
                self.flush(socket, cx);
                if self.out.size() - self.out_used < self.batch_len {
                    // Resumed when the socket can take replies again.
                    return false;
                }
            }
            let polling = self.poll.check().polls();
            match socket.poll_recv_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(err)) => {
                    self.recv_failed(&err);
                    return false;
                }
                Poll::Pending if polling => {}
                Poll::Pending => return false,
            }
            let sock = SockRef::from(socket);
            let received = if polling {
                source.recv(&sock, true)
            } else {
                socket.try_io(Interest::READABLE, || source.recv(&sock, true))
            };
            let result = received.inspect(|&count| {
                let arrived = Instant::now();
                self.processor.totals.received += count as u64;
                for i in 0..count {
                    if let Some((datagram, _)) = source.datagram(i) {
                        self.accept(&datagram, arrived);
                    }
                }
            });
            match result {
                Ok(count) => {
                    taken += count;
                    if count > 0 {
                        self.poll.open(Instant::now());
                    }
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    if polling {
                        // Polled and found nothing: let other tasks run,
                        // and poll again.
                        self.processor.totals.busy_poll_misses += 1;
                        return true;
                    }
                }
                Err(err) => {
                    self.recv_failed(&err);
                    return false;
                }
            }
        }
        true
    }

    fn recv_failed(&mut self, err: &io::Error) {
        if let Some(pause) = self.processor.recv_error(err, &self.shared) {
            self.paused_until = Instant::now().checked_add(pause);
        }
    }

    /// The fate of one received datagram: dropped by the checks, shed, or
    /// handed to a handler future (polled once at once).
    fn accept(&mut self, datagram: &Received<'_>, arrived: Instant) {
        let place = self.out_used;
        let mut spare = Vec::new();
        // The receive loop makes room for a reply to each datagram first.
        let buffer = self.out.buffer(place).unwrap_or(&mut spare);
        let standing = match self.processor.admit(datagram, arrived, buffer) {
            Admission::Handle(standing) => standing,
            Admission::Answered => {
                if self.out.buffer(place).is_some() {
                    self.out
                        .queue(place, datagram.peer, datagram.arrival, false);
                    self.out_used += 1;
                }
                return;
            }
            Admission::Dropped => return,
        };
        let Some(index) = self.inflight.reserve() else {
            let place = self.out_used;
            if let Some(buffer) = self.out.buffer(place) {
                if self.processor.shed(datagram, standing, buffer) {
                    self.out
                        .queue(place, datagram.peer, datagram.arrival, false);
                    self.out_used += 1;
                }
            }
            return;
        };
        let mut data = self.buffers.take();
        data.bytes.extend_from_slice(datagram.data);
        let request = Request::new(
            data,
            datagram.peer,
            self.processor.local_ip(datagram),
            self.processor.listener(),
            self.processor.metadata(datagram),
            standing.validated,
            self.buffers.clone(),
        );
        let now = Instant::now();
        self.processor
            .record_wait(now.saturating_duration_since(arrived));
        let handler = &*self.handler;
        let made = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler(request)));
        let future = match made {
            Ok(future) => future,
            Err(payload) => {
                self.inflight.unreserve(index);
                self.processor.record_handler(now.elapsed());
                self.processor.panicked(payload);
                return;
            }
        };
        let deadline = self
            .limits
            .handler_timeout
            .and_then(|timeout| arrived.checked_add(timeout));
        let started = Started {
            meta: Meta {
                peer: datagram.peer,
                arrival: datagram.arrival,
                request_len: datagram.data.len(),
                standing,
            },
            started: arrived,
            deadline,
        };
        match self.inflight.start(index, future, started) {
            Some(ended) => self.ended(ended),
            None => {
                if let Some(deadline) = deadline {
                    self.next_expiry =
                        Some(self.next_expiry.map_or(deadline, |at| at.min(deadline)));
                }
            }
        }
    }

    /// Counts how a handler future ended, and queues its reply.
    fn ended(&mut self, ended: Ended<Option<Reply>, Meta>) {
        match ended {
            Ended::Done(output, started) => {
                self.processor.record_handler(started.started.elapsed());
                let Some(mut reply) = output else {
                    self.processor.totals.no_reply += 1;
                    return;
                };
                let meta = started.meta;
                let processor = &mut self.processor;
                let bytes = &mut reply.bytes.bytes;
                processor.give_token(meta.standing, meta.peer, meta.request_len, bytes);
                if processor.capped(reply.bytes.bytes.len(), meta.request_len, meta.standing) {
                    return;
                }
                let place = self.out_used;
                match self.out.buffer(place) {
                    Some(buffer) => {
                        // The reply's buffer takes the place's; the place's
                        // goes back with the reply.
                        std::mem::swap(buffer, &mut reply.bytes.bytes);
                        self.out.queue(place, meta.peer, meta.arrival, true);
                        self.out_used += 1;
                    }
                    // Callers make room first; counted rather than lost.
                    None => self.processor.totals.send_errors += 1,
                }
            }
            Ended::Panicked(payload, started) => {
                self.processor.record_handler(started.started.elapsed());
                self.processor.panicked(payload);
            }
        }
    }

    /// Polls the handler futures that were woken, as far as there is room
    /// for their replies.
    fn poll_woken(&mut self, socket: &UdpSocket, cx: &mut Context<'_>) {
        loop {
            let room = self.out.size() - self.out_used;
            let mut ended = std::mem::take(&mut self.ended);
            self.inflight.poll_woken(room, |e| ended.push(e));
            let count = ended.len();
            for e in ended.drain(..) {
                self.ended(e);
            }
            self.ended = ended;
            if count < room || !self.inflight.any_woken() {
                return;
            }
            // Out of room with futures still woken: send, and go on if the
            // socket took the replies.
            self.flush(socket, cx);
            if self.out_used > 0 {
                return;
            }
        }
    }

    /// Drops the handler futures whose time is up.
    fn expire(&mut self, now: Instant) {
        let mut expired = 0;
        self.next_expiry = self.inflight.expire(now, |_| expired += 1);
        self.processor.totals.timed_out += expired;
    }

    /// Sends the queued replies, as far as the socket takes them now.
    fn flush(&mut self, socket: &UdpSocket, cx: &mut Context<'_>) {
        while self.out.queued() > 0 {
            match socket.poll_send_ready(cx) {
                Poll::Pending => return,
                Poll::Ready(Err(_)) => {}
                Poll::Ready(Ok(())) => {}
            }
            let sock = SockRef::from(socket);
            let mut counts = (0, 0);
            let out = &mut self.out;
            let sent = socket.try_io(Interest::WRITABLE, || {
                counts = out.try_send(&sock);
                if out.queued() > 0 {
                    Err(io::ErrorKind::WouldBlock.into())
                } else {
                    Ok(())
                }
            });
            let error = self.out.take_error();
            self.processor.sent_counts(counts, error);
            if sent.is_ok() {
                break;
            }
        }
        if self.out.queued() == 0 {
            self.out.trim(self.out_used);
            self.out_used = 0;
        }
    }

    /// Shutdown: once nothing is in flight (or `give_up`: the drain time is
    /// over), drops what is left, counts it, and reports that the worker
    /// is done.
    fn finish_drain(&mut self, socket: &UdpSocket, cx: &mut Context<'_>, give_up: bool) -> bool {
        self.flush(socket, cx);
        if !give_up && (self.inflight.len() > 0 || self.out.queued() > 0) {
            return false;
        }
        let dropped = self.inflight.cancel_all() + self.out.drop_queued();
        self.processor.totals.shutdown_dropped += dropped;
        self.publish(socket, true);
        true
    }

    /// Publishes the totals; `last`: as the worker ends, with the socket's
    /// final kernel drop count.
    fn publish(&mut self, socket: &UdpSocket, last: bool) {
        let sock = SockRef::from(socket);
        if last {
            if let Some(drops) = sys::kernel_drops(&sock) {
                self.processor.totals.kernel_drops = drops;
            }
        }
        self.processor.publish(Some(&sock));
    }

    /// Sets the timer for the earliest of the times the worker waits for;
    /// returns whether that time has come already.
    fn arm_timer(&mut self, cx: &mut Context<'_>) -> bool {
        let next = [self.next_expiry, self.paused_until, self.drain_until]
            .into_iter()
            .flatten()
            .min();
        let Some(at) = next else {
            self.timer_set = None;
            return false;
        };
        if self.timer_set != Some(at) {
            self.timer
                .as_mut()
                .reset(tokio::time::Instant::from_std(at));
            self.timer_set = Some(at);
        }
        self.timer.as_mut().poll(cx).is_ready()
    }
}
