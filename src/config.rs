//! The server builder: every server setting, its default, and its check.

use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::time::Duration;

use socket2::Socket;

use crate::error::Error;
use crate::ratelimit::{Limiter, RateLimit};
use crate::server::GreetServer;
use crate::socket::{self, BoundSocket, BufferSize, SocketOptions};
use crate::sys;

/// The most workers one server may have.
const MAX_WORKERS: usize = 1024;

/// The largest UDP payload over IPv4: 65 535 − 20 (IP header) − 8 (UDP header).
pub const MAX_UDP_PAYLOAD_V4: usize = 65_507;
/// The largest UDP payload over IPv6 (without jumbograms): 65 535 − 8 (UDP header).
pub const MAX_UDP_PAYLOAD_V6: usize = 65_527;

/// Configures and binds a [`GreetServer`].
///
/// Every option is applied through socket2 before the socket is bound.
///
/// ```
/// # fn main() -> Result<(), udp_greet::Error> {
/// use udp_greet::GreetServer;
///
/// let server = GreetServer::builder()
///     .recv_buffer_size(1 << 20)
///     .max_datagram_size(1200)
///     .bind("127.0.0.1:0")?;
/// println!("receive buffer: {:?}", server.recv_buffer_size());
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until `bind` is called"]
pub struct ServerBuilder {
    pub(crate) socket: SocketOptions,
    pub(crate) max_datagram: Option<usize>,
    pub(crate) workers: usize,
    pub(crate) batch_size: usize,
    pub(crate) portable_io: bool,
    pub(crate) gso: bool,
    pub(crate) rate_limit: Option<RateLimit>,
    pub(crate) max_amplification: Option<usize>,
    pub(crate) handler_threads: usize,
    pub(crate) queue_capacity: Option<usize>,
    pub(crate) overload_reply: Option<Vec<u8>>,
    pub(crate) max_queue_wait: Option<Duration>,
    pub(crate) drain_timeout: Duration,
    pub(crate) busy_poll: Option<Duration>,
    pub(crate) max_in_flight: Option<usize>,
    pub(crate) handler_timeout: Option<Duration>,
}

/// The handler pool's queue holds this many requests per handler thread
/// unless [`ServerBuilder::queue_capacity`] says otherwise: 64.
///
/// A request that is `k`-th in the queue of `n` threads whose handlers take
/// `h` each waits about `k × h / n`; with the default
/// [`max_queue_wait`](ServerBuilder::max_queue_wait) of 500 ms, 64 per
/// thread is as deep as a queue of 8 ms handlers can usefully be. Deeper,
/// the requests at the back would only expire; faster handlers drain it
/// well within the wait. Each place holds one request's bytes: 512 bytes
/// reserved up front, growing to the largest request it has carried.
pub const DEFAULT_QUEUE_PER_THREAD: usize = 64;

/// How long a request may wait in the handler pool's queue unless
/// [`ServerBuilder::max_queue_wait`] says otherwise: 500 ms, half of
/// [`ClientBuilder::timeout`](crate::ClientBuilder::timeout)'s default.
///
/// A client of this crate resends after 1 s by default. A request taken up
/// after 500 ms would need a handler of under 500 ms for its reply to beat
/// the resend; later than that, its client has given up or resent, and
/// answering it only adds to the load that made it wait.
pub const DEFAULT_MAX_QUEUE_WAIT: Duration = Duration::from_millis(500);

/// How many handler futures the async server runs at once unless
/// [`ServerBuilder::max_in_flight`] says otherwise: 1024.
///
/// Enough for handlers that wait 10 ms to answer about 100 000 requests a
/// second, in about a megabyte of places for small requests; a server that
/// needs more in flight is better served by faster handlers or more
/// machines than by a longer line.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 1024;

/// How long an async handler may run unless
/// [`ServerBuilder::handler_timeout`] says otherwise: 10 s, the default
/// [`ClientBuilder::deadline`](crate::ClientBuilder::deadline), after which
/// a client of this crate has given up.
pub const DEFAULT_HANDLER_TIMEOUT: Duration = Duration::from_secs(10);

/// The most handler threads one server may have.
const MAX_HANDLER_THREADS: usize = 1024;
/// The largest handler-pool queue.
const MAX_QUEUE_CAPACITY: usize = 1 << 20;

/// The default number of datagrams per batch on the batched path: 32.
///
/// Measured with `cargo bench --bench throughput` (128 requests in flight):
/// CPU per reply relative to a plain std loop was 0.72 with batches of 8 and
/// 0.68 to 0.69 with 16, 32 or 64, so 32 leaves headroom at no cost. A batch
/// never waits to fill: the receive returns as soon as one datagram is there.
pub const DEFAULT_BATCH_SIZE: usize = 32;

/// The receive buffer a server asks for unless told otherwise: 1 MiB.
///
/// Linux grants twice the request, capped at twice `net.core.rmem_max`: 2 MiB
/// where `rmem_max` is at least 1 MiB, 416 KiB on a stock kernel
/// (`rmem_max` = 208 KiB). Measured with 512 small requests in flight
/// (`cargo bench --bench throughput`), any grant from 512 KiB up dropped
/// nothing, where the kernel's default 208 KiB buffer (about 190 queued
/// small datagrams) dropped some.
pub const DEFAULT_RECV_BUFFER: usize = 1 << 20;

impl Default for ServerBuilder {
    fn default() -> Self {
        ServerBuilder {
            socket: SocketOptions {
                only_v6: true,
                ..SocketOptions::default()
            },
            max_datagram: None,
            workers: 1,
            batch_size: DEFAULT_BATCH_SIZE,
            portable_io: false,
            gso: true,
            rate_limit: None,
            max_amplification: None,
            handler_threads: 0,
            queue_capacity: None,
            overload_reply: None,
            max_queue_wait: Some(DEFAULT_MAX_QUEUE_WAIT),
            drain_timeout: Duration::ZERO,
            busy_poll: None,
            max_in_flight: None,
            handler_timeout: Some(DEFAULT_HANDLER_TIMEOUT),
        }
    }
}

impl ServerBuilder {
    /// A builder with every setting at its default.
    pub fn new() -> Self {
        Self::default()
    }

    /// Requests a receive buffer (`SO_RCVBUF`) of `bytes`: how much the
    /// kernel queues for the server while it is busy, beyond which it drops.
    ///
    /// The kernel may adjust the size: read what it granted with
    /// [`GreetServer::recv_buffer_size`]. A request above `i32::MAX` (the
    /// largest the option takes) asks for `i32::MAX`. Defaults to
    /// [`DEFAULT_RECV_BUFFER`] (1 MiB) for [`bind`](ServerBuilder::bind);
    /// [`from_std`](ServerBuilder::from_std) leaves the socket's own size
    /// unless this is called.
    pub fn recv_buffer_size(mut self, bytes: usize) -> Self {
        self.socket.recv_buffer = Some(bytes);
        self
    }

    /// Requests a send buffer (`SO_SNDBUF`) of `bytes` (at most `i32::MAX`,
    /// as for [`recv_buffer_size`](ServerBuilder::recv_buffer_size)).
    ///
    /// Read what the kernel granted with [`GreetServer::send_buffer_size`].
    /// Defaults to the system default.
    pub fn send_buffer_size(mut self, bytes: usize) -> Self {
        self.socket.send_buffer = Some(bytes);
        self
    }

    /// Sets `SO_REUSEADDR` before binding.
    ///
    /// Defaults to `false`.
    pub fn reuse_address(mut self, on: bool) -> Self {
        self.socket.reuse_address = on;
        self
    }

    /// Sets `SO_REUSEPORT` before binding, so that other sockets that also set
    /// it can bind the same address: several servers, or processes, sharing
    /// one port on purpose.
    ///
    /// Sharing is open to any socket of the same user that sets the option,
    /// for as long as the server runs: such a socket can bind the address
    /// later and take a share of the traffic (on Linux, the peers whose
    /// address hashes to it). Turn it on only where every process of that
    /// user is trusted with the service's traffic.
    ///
    /// # Platform-specific behavior
    ///
    /// On platforms without `SO_REUSEPORT` (Windows, Solaris, illumos),
    /// binding fails with [`Error::Socket`] when this is on. On Linux the
    /// kernel spreads datagrams over the sockets by a hash of the peer's
    /// address; other systems may deliver to only one of them.
    ///
    /// Defaults to `false`.
    pub fn reuse_port(mut self, on: bool) -> Self {
        self.socket.reuse_port = on;
        self
    }

    /// Sets `IPV6_V6ONLY` on IPv6 sockets: when `true`, a socket bound to
    /// `[::]` accepts IPv6 only; when `false`, IPv4 peers too (as
    /// IPv4-mapped addresses).
    ///
    /// The option is always set explicitly, so behaviour does not depend on
    /// the platform's default (Linux: `false`, Windows and the BSDs: `true`).
    /// Ignored for IPv4 sockets. Defaults to `true`.
    pub fn only_v6(mut self, on: bool) -> Self {
        self.socket.only_v6 = on;
        self
    }

    /// The largest request the server accepts, in bytes. A larger datagram is
    /// dropped unanswered and counted in [`Stats::truncated`](crate::Stats::truncated);
    /// it never reaches the handler.
    ///
    /// Must be between 1 and 65 535. Defaults to the largest UDP payload of
    /// the bound address's family: [`MAX_UDP_PAYLOAD_V4`] (65 507) or
    /// [`MAX_UDP_PAYLOAD_V6`] (65 527).
    pub fn max_datagram_size(mut self, bytes: usize) -> Self {
        self.max_datagram = Some(bytes);
        self
    }

    /// How many worker threads serve, each running the receive, handle,
    /// reply loop.
    ///
    /// # Platform-specific behavior
    ///
    /// On Linux each worker gets a socket of its own, all bound to the same
    /// address with `SO_REUSEPORT` (set automatically), and the kernel
    /// spreads peers over them by a hash of their address: one peer's
    /// datagrams always go to the same worker, so a single busy peer does not
    /// spread. Elsewhere the workers share one socket.
    ///
    /// Binding still fails with [`Error::AddrInUse`] when any other socket
    /// holds the address, even one that allows sharing: the first socket
    /// binds without `SO_REUSEPORT` and turns it on once it holds the
    /// address. Unless [`reuse_port`](ServerBuilder::reuse_port) is on, then,
    /// several workers never join another server's port. Once they are
    /// bound, though, the kernel cannot close the group: another socket of
    /// the same user that sets `SO_REUSEPORT` can still bind the address and
    /// take a share of the traffic, as with `reuse_port(true)`.
    ///
    /// Must be between 1 and 1024. Defaults to 1.
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers;
        self
    }

    /// How many datagrams one batched receive (`recvmmsg`) takes at most,
    /// and so how many replies one `sendmmsg` sends.
    ///
    /// A batch never waits to fill, and never holds a ready reply back for
    /// long: replies go out together when the handler is fast, and as soon
    /// as the handler call that follows them has taken more than 50 µs when
    /// it is not, so each reply leaves within about one handler call of
    /// being ready, whatever the batch size.
    ///
    /// Memory per worker: a receive buffer of the largest accepted datagram
    /// per batch slot (2 MiB of address space for 32 slots of 64 KiB,
    /// touched only as large datagrams use it; lower
    /// [`max_datagram_size`](ServerBuilder::max_datagram_size) to shrink
    /// it), and about 1 KiB per slot of headers, addresses and reply buffer
    /// (1.5 KiB with a wildcard address, for arrival addresses). Measured on
    /// Linux as the resident memory an idle worker adds (64 workers, after a
    /// hundred requests): 50 KiB at the default 32 (66 KiB bound to a
    /// wildcard address), 1 MiB at 1024 (1.5 MiB wildcard); of the 50 KiB,
    /// about 45 are the thread's own stack and allocator arena, which a
    /// batch of 1 costs too. A reply buffer that grew past 64 KiB is given
    /// back after its reply is sent.
    ///
    /// # Platform-specific behavior
    ///
    /// Batches are used on Linux only; elsewhere the setting is checked and
    /// otherwise ignored.
    ///
    /// Must be between 1 and 1024. Defaults to [`DEFAULT_BATCH_SIZE`] (32).
    pub fn batch_size(mut self, datagrams: usize) -> Self {
        self.batch_size = datagrams;
        self
    }

    /// Uses the portable loop (one `recvmsg` and one `sendto` per datagram,
    /// through socket2) even where batched calls are available.
    ///
    /// Defaults to `false`.
    pub fn portable_io(mut self, on: bool) -> Self {
        self.portable_io = on;
        self
    }

    /// Sends the replies of one batch that go to the same peer as one
    /// segmented datagram train (UDP generic segmentation offload,
    /// `UDP_SEGMENT`), where the kernel supports it: one trip through the
    /// network stack for up to 64 replies of up to 1 452 bytes each, which
    /// the kernel (or the network card) splits into ordinary datagrams. Peers
    /// see no difference.
    ///
    /// It pays off when one peer has many requests in flight; replies to
    /// different peers, or larger than 1 452 bytes, go out one per datagram
    /// as usual. Some devices and drivers cannot segment, and Linux says so
    /// only by failing a segmented send with `EIO` (or sometimes `EINVAL`):
    /// then the worker stops segmenting and sends that message's replies one
    /// by one. Any other error fails the message as it would a single reply.
    ///
    /// # Platform-specific behavior
    ///
    /// Linux 4.18 and later, batched path only; ignored elsewhere.
    ///
    /// Defaults to `true`.
    pub fn gso(mut self, on: bool) -> Self {
        self.gso = on;
        self
    }

    /// Limits how many requests from each source prefix are answered; see
    /// [`RateLimit`]. Requests over the limit are dropped before the handler
    /// sees them.
    ///
    /// Defaults to no limit.
    pub fn rate_limit(mut self, limit: RateLimit) -> Self {
        self.rate_limit = Some(limit);
        self
    }

    /// Never sends a reply larger than `factor` times the request it answers
    /// (such replies are counted in
    /// [`Stats::amplification_capped`](crate::Stats::amplification_capped)),
    /// so a forged request cannot make the server send much more to its
    /// victim than the attacker sent. QUIC's rule for unverified peers is 3.
    ///
    /// Note that an empty request then gets no non-empty reply. Must be at
    /// least 1. Defaults to no limit.
    pub fn max_amplification(mut self, factor: usize) -> Self {
        self.max_amplification = Some(factor);
        self
    }

    /// Runs handlers on a pool of `threads` threads instead of on the
    /// receive workers, for handlers that wait (on a database, a file,
    /// another service).
    ///
    /// The receive workers keep receiving in batches and hand each request
    /// to the pool through a bounded queue
    /// ([`queue_capacity`](ServerBuilder::queue_capacity)) without ever
    /// waiting for room: when the queue is full the request is shed at once
    /// ([`overload_reply`](ServerBuilder::overload_reply),
    /// [`Stats::overloaded`](crate::Stats::overloaded)). A handler thread
    /// drops a request that waited too long
    /// ([`max_queue_wait`](ServerBuilder::max_queue_wait)), and sends each
    /// reply itself as soon as it is ready, from the address the request
    /// arrived on. Up to `threads` handler calls run at once, whichever
    /// peers they come from.
    ///
    /// 0 runs handlers inline on the receive workers, which is fastest for
    /// handlers that answer in microseconds. Must be at most 1024. Defaults
    /// to 0.
    pub fn handler_threads(mut self, threads: usize) -> Self {
        self.handler_threads = threads;
        self
    }

    /// How many requests may wait for the handler pool: requests received
    /// while that many wait are shed. The queue's memory is allocated when
    /// the server starts, one place per waiting request and one per handler
    /// thread, each with 512 bytes reserved for its request and growing to
    /// the largest request it has carried (up to
    /// [`max_datagram_size`](ServerBuilder::max_datagram_size)). Measured
    /// (`tests/alloc.rs`, 8 threads, default capacity): 808 bytes of heap
    /// per place on the portable path and 1.25 KiB on the batched path,
    /// where each handler thread also keeps a batch of reply buffers.
    ///
    /// Only used with [`handler_threads`](ServerBuilder::handler_threads).
    /// Must be between 1 and 1 048 576. Defaults to
    /// [`DEFAULT_QUEUE_PER_THREAD`] (64) per handler thread.
    pub fn queue_capacity(mut self, requests: usize) -> Self {
        self.queue_capacity = Some(requests);
        self
    }

    /// A fixed reply for requests shed because the handler pool's queue is
    /// full ("busy, try later" in the protocol's own words), instead of
    /// dropping them silently. It is sent by the receive worker, at once,
    /// only to requests that passed the [rate limit](ServerBuilder::rate_limit),
    /// and not when it is larger than the
    /// [amplification limit](ServerBuilder::max_amplification) allows for
    /// the request's size. Shed requests are counted in
    /// [`Stats::overloaded`](crate::Stats::overloaded) either way.
    ///
    /// Only used with [`handler_threads`](ServerBuilder::handler_threads).
    /// Defaults to dropping shed requests.
    pub fn overload_reply(mut self, reply: impl Into<Vec<u8>>) -> Self {
        self.overload_reply = Some(reply.into());
        self
    }

    /// The longest a request may wait in the handler pool's queue: a handler
    /// thread that takes up a request which has waited longer drops it
    /// unanswered ([`Stats::expired`](crate::Stats::expired)), since its
    /// client has given up or resent by then. `None` lets requests wait
    /// indefinitely.
    ///
    /// Only used with [`handler_threads`](ServerBuilder::handler_threads).
    /// Must not be zero. Defaults to [`DEFAULT_MAX_QUEUE_WAIT`] (500 ms).
    pub fn max_queue_wait(mut self, wait: impl Into<Option<Duration>>) -> Self {
        self.max_queue_wait = wait.into();
        self
    }

    /// How long, at shutdown, the handler pool goes on answering requests
    /// already queued; what is left after that is dropped and counted in
    /// [`Stats::shutdown_dropped`](crate::Stats::shutdown_dropped). Handler
    /// calls in progress are always waited for (see
    /// [`ServerHandle::shutdown_timeout`](crate::ServerHandle::shutdown_timeout)
    /// for a bound).
    ///
    /// Only used with [`handler_threads`](ServerBuilder::handler_threads).
    /// Defaults to zero: the queue is dropped at once.
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// Latency mode: after handling what arrived, a worker keeps receiving
    /// without blocking for up to `window` before it blocks again, so that a
    /// request that comes within the window is taken at once rather than
    /// after the thread is woken. The window starts again whenever a
    /// datagram arrives; an idle server goes back to sleeping in the kernel
    /// once it has passed. Shutdown stays as prompt.
    ///
    /// Every mode polls: the batched and portable receive loops poll their
    /// socket, [handler-pool](ServerBuilder::handler_threads) threads
    /// poll the queue between requests, and the async server (feature
    /// `tokio`) keeps trying its socket, yielding to the runtime between
    /// tries, so that its other tasks still run. Empty polls are counted in
    /// [`Stats::busy_poll_misses`](crate::Stats::busy_poll_misses).
    ///
    /// The cost is plain: a polling thread uses a whole core while traffic
    /// flows (and for `window` after it stops). It pays with few
    /// latency-sensitive peers and cores to spare; with more polling threads
    /// (workers, handler threads, clients) than cores, they take turns on
    /// the CPU and latency gets worse, not better. `None` (or zero) turns it
    /// off.
    ///
    /// On loopback with one request in flight, polling on both sides cut
    /// the median round trip to about a tenth of a blocking pair's
    /// (`cargo bench --bench latency`).
    ///
    /// Defaults to off.
    pub fn busy_poll(mut self, window: impl Into<Option<Duration>>) -> Self {
        self.busy_poll = window.into().filter(|w| !w.is_zero());
        self
    }

    /// Sets `SO_BUSY_POLL` on the server's sockets: on a blocking receive
    /// that finds nothing, the kernel polls the network device's queue for
    /// up to `duration` (whole microseconds) before it sleeps. This helps
    /// on sockets whose traffic comes through a NIC driver that supports
    /// busy polling; it does nothing on loopback. Raising it above
    /// `net.core.busy_read` needs `CAP_NET_ADMIN`. Unlike
    /// [`busy_poll`](ServerBuilder::busy_poll), it spins inside the kernel.
    ///
    /// # Platform-specific behavior
    ///
    /// Linux only: binding fails with [`Error::Socket`] elsewhere.
    ///
    /// Defaults to the system setting (`net.core.busy_read`, usually 0).
    pub fn so_busy_poll(mut self, duration: Duration) -> Self {
        self.socket.so_busy_poll = Some(duration);
        self
    }

    /// The most handler futures the async server (`GreetServer::serve_async`,
    /// feature `tokio`) runs at once, over all its workers. A request that arrives while
    /// that many are in flight is shed at once, as a full handler-pool queue
    /// sheds ([`overload_reply`](ServerBuilder::overload_reply),
    /// [`Stats::overloaded`](crate::Stats::overloaded)): the receive loop
    /// never waits for room, and requests in flight are never cancelled to
    /// make it.
    ///
    /// Each place holds one handler future and its request, made once and
    /// reused: the memory is the handler future's size plus 512 bytes and
    /// the request's bytes, per place ever used.
    ///
    /// Only used by the async server (feature `tokio`). Must be between 1
    /// and 1 048 576. Defaults to [`DEFAULT_MAX_IN_FLIGHT`] (1024).
    pub fn max_in_flight(mut self, requests: usize) -> Self {
        self.max_in_flight = Some(requests);
        self
    }

    /// The longest a handler future of the async server
    /// (`GreetServer::serve_async`, feature `tokio`) may run: one still running then is dropped (cancelled at its await
    /// point), nothing is sent, and the request is counted in
    /// [`Stats::timed_out`](crate::Stats::timed_out). `None` lets handlers
    /// run until shutdown.
    ///
    /// Only used by the async server (feature `tokio`); blocking handlers
    /// cannot be cancelled. Must not be zero. Defaults to
    /// [`DEFAULT_HANDLER_TIMEOUT`] (10 s).
    pub fn handler_timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.handler_timeout = timeout.into();
        self
    }

    /// Creates the socket, applies the options and binds it to `addr`.
    ///
    /// Each address `addr` resolves to is tried in turn, as
    /// [`std::net::UdpSocket::bind`] does.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for an out-of-range setting,
    /// [`Error::Resolve`] when `addr` does not resolve, [`Error::AddrInUse`]
    /// when another socket holds the address (also with several
    /// [`workers`](ServerBuilder::workers), unless
    /// [`reuse_port`](ServerBuilder::reuse_port) asks to share it),
    /// [`Error::Bind`] or [`Error::Socket`] for other failures (the last
    /// address tried).
    pub fn bind<A: ToSocketAddrs + fmt::Debug>(self, addr: A) -> Result<GreetServer, Error> {
        self.validate()?;
        let addrs = socket::resolve(addr)?;
        let mut options = self.socket.clone();
        options.recv_buffer = options.recv_buffer.or(Some(DEFAULT_RECV_BUFFER));
        socket::first_ok(&addrs, |addr| {
            let (first, others) = socket::bind_workers(addr, &options, self.socket_per_worker())?;
            GreetServer::new(&self, first, others)
        })
    }

    /// Serves on a socket made elsewhere, with this builder's settings: for
    /// socket options this crate does not set, or a socket inherited from a
    /// service manager.
    ///
    /// The socket must be a bound UDP socket. It is put in the mode the
    /// server needs: blocking, with no read timeout (on Linux, where a
    /// shutdown wakes a blocked receive) or a short one (elsewhere). The
    /// receive and send buffer sizes are set only if this builder sets them;
    /// every other setting applies as with [`bind`](ServerBuilder::bind),
    /// except those that must come before bind:
    /// [`reuse_address`](ServerBuilder::reuse_address),
    /// [`reuse_port`](ServerBuilder::reuse_port) and
    /// [`only_v6`](ServerBuilder::only_v6) are ignored (the socket keeps what
    /// it has), and several [`workers`](ServerBuilder::workers) share the one
    /// socket.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for an out-of-range setting;
    /// [`Error::UnsuitableSocket`] when the socket is not a UDP socket over
    /// IPv4 or IPv6, or is not bound; [`Error::Socket`] when an option
    /// cannot be set or read.
    ///
    /// # Examples
    ///
    /// ```
    /// # fn main() -> Result<(), udp_greet::Error> {
    /// use udp_greet::{GreetClient, GreetServer, RateLimit};
    ///
    /// let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    /// socket.set_nonblocking(true).expect("non-blocking"); // put right by from_std
    /// let server = GreetServer::builder()
    ///     .rate_limit(RateLimit::new(100, 10))
    ///     .from_std(socket)?
    ///     .spawn(udp_greet::greet)?;
    /// let client = GreetClient::connect(server.local_addr())?;
    /// assert_eq!(client.send_recv(b"Tracy")?, b"Hello, Tracy!");
    /// # Ok(())
    /// # }
    /// ```
    pub fn from_std(self, socket: UdpSocket) -> Result<GreetServer, Error> {
        self.validate()?;
        let adopted = socket::adopt(Socket::from(socket), &self.socket)?;
        GreetServer::new(&self, adopted, Vec::new())
    }

    /// Whether each worker gets a socket of its own: with several workers,
    /// where the kernel spreads datagrams over sockets that share a port.
    fn socket_per_worker(&self) -> usize {
        if REUSE_PORT_SPREADS { self.workers } else { 1 }
    }

    fn validate(&self) -> Result<(), Error> {
        if let Some(max) = self.max_datagram {
            if !(1..=usize::from(u16::MAX)).contains(&max) {
                return Err(Error::InvalidConfig {
                    setting: "ServerBuilder::max_datagram_size",
                    reason: "must be between 1 and 65535 bytes",
                });
            }
        }
        if self.max_amplification == Some(0) {
            return Err(Error::InvalidConfig {
                setting: "ServerBuilder::max_amplification",
                reason: "must be at least 1",
            });
        }
        if let Some(limit) = &self.rate_limit {
            limit.validate()?;
        }
        if !(1..=MAX_WORKERS).contains(&self.workers) {
            return Err(Error::InvalidConfig {
                setting: "ServerBuilder::workers",
                reason: "must be between 1 and 1024",
            });
        }
        if !(1..=sys::MAX_BATCH).contains(&self.batch_size) {
            return Err(Error::InvalidConfig {
                setting: "ServerBuilder::batch_size",
                reason: "must be between 1 and 1024",
            });
        }
        if self.handler_threads > MAX_HANDLER_THREADS {
            return Err(Error::InvalidConfig {
                setting: "ServerBuilder::handler_threads",
                reason: "must be at most 1024",
            });
        }
        if self
            .queue_capacity
            .is_some_and(|c| !(1..=MAX_QUEUE_CAPACITY).contains(&c))
        {
            return Err(Error::InvalidConfig {
                setting: "ServerBuilder::queue_capacity",
                reason: "must be between 1 and 1048576 requests",
            });
        }
        if self
            .max_in_flight
            .is_some_and(|n| !(1..=MAX_QUEUE_CAPACITY).contains(&n))
        {
            return Err(Error::InvalidConfig {
                setting: "ServerBuilder::max_in_flight",
                reason: "must be between 1 and 1048576 requests",
            });
        }
        if self.handler_timeout.is_some_and(|t| t.is_zero()) {
            return Err(Error::InvalidConfig {
                setting: "ServerBuilder::handler_timeout",
                reason: "must be greater than zero (None lets handlers run until shutdown)",
            });
        }
        if self.max_queue_wait.is_some_and(|w| w.is_zero()) {
            return Err(Error::InvalidConfig {
                setting: "ServerBuilder::max_queue_wait",
                reason: "must be greater than zero (None lets requests wait indefinitely)",
            });
        }
        Ok(())
    }

    /// The settings every worker shares, for sockets bound to `local_addr`.
    /// Call after [`validate`](ServerBuilder::validate).
    pub(crate) fn config(&self, first: &BoundSocket, pktinfo: bool) -> Config {
        let local_addr = first.local_addr;
        Config {
            local_addr,
            recv_buffer: first.recv_buffer,
            send_buffer: first.send_buffer,
            max_datagram: self.max_datagram.unwrap_or(match local_addr {
                SocketAddr::V4(_) => MAX_UDP_PAYLOAD_V4,
                SocketAddr::V6(_) => MAX_UDP_PAYLOAD_V6,
            }),
            workers: self.workers,
            batch_size: (!self.portable_io).then_some(self.batch_size),
            gso: self.gso,
            pktinfo,
            bound_ip: Some(local_addr.ip()).filter(|ip| !ip.is_unspecified()),
            limiter: self.rate_limit.as_ref().map(Limiter::new),
            max_amplification: self.max_amplification,
            busy_poll: self.busy_poll,
            pool: (self.handler_threads > 0).then(|| PoolConfig {
                threads: self.handler_threads,
                capacity: self.queue_capacity.unwrap_or(
                    self.handler_threads
                        .saturating_mul(DEFAULT_QUEUE_PER_THREAD)
                        .min(MAX_QUEUE_CAPACITY),
                ),
                max_queue_wait: self.max_queue_wait,
            }),
            overload_reply: self.overload_reply.clone(),
            drain_timeout: self.drain_timeout,
            max_in_flight: self.max_in_flight.unwrap_or(DEFAULT_MAX_IN_FLIGHT),
            handler_timeout: self.handler_timeout,
        }
    }
}

/// Whether the kernel spreads datagrams over sockets that share a port with
/// `SO_REUSEPORT` (Linux, by a hash of the peer's address); elsewhere
/// workers share one socket.
const REUSE_PORT_SPREADS: bool = cfg!(any(target_os = "linux", target_os = "android"));

/// A server's settings, checked and fixed at bind, shared by its workers.
#[derive(Debug)]
pub(crate) struct Config {
    /// The address the sockets are bound to, with the real port.
    pub(crate) local_addr: SocketAddr,
    pub(crate) recv_buffer: BufferSize,
    pub(crate) send_buffer: BufferSize,
    /// The largest accepted datagram, in bytes.
    pub(crate) max_datagram: usize,
    /// Worker threads.
    pub(crate) workers: usize,
    /// Datagrams per batch on the batched path; `None` for the portable loop.
    pub(crate) batch_size: Option<usize>,
    /// Coalesce replies to one peer with segmentation offload (batched path).
    pub(crate) gso: bool,
    /// The sockets report arrival addresses, and replies go out from them.
    pub(crate) pktinfo: bool,
    /// The address the sockets are bound to, unless it is a wildcard: the
    /// local address of every request where the datagram does not say.
    pub(crate) bound_ip: Option<IpAddr>,
    pub(crate) limiter: Option<Limiter>,
    pub(crate) max_amplification: Option<usize>,
    /// The handler pool, if handlers do not run inline.
    pub(crate) pool: Option<PoolConfig>,
    /// How long a worker polls after work before it blocks again.
    pub(crate) busy_poll: Option<Duration>,
    /// The reply to shed requests (handler pool or async server).
    pub(crate) overload_reply: Option<Vec<u8>>,
    /// How long a handler pool or an async server goes on answering at
    /// shutdown.
    pub(crate) drain_timeout: Duration,
    /// The async server's limit on handler futures in flight, over all
    /// workers.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) max_in_flight: usize,
    /// The async server drops a handler future that runs longer.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) handler_timeout: Option<Duration>,
}

impl Config {
    /// Every thread of the server: receive workers, then handler threads.
    pub(crate) fn threads(&self) -> usize {
        self.workers + self.pool.as_ref().map_or(0, |p| p.threads)
    }

    /// What a worker's batches are made for; `None` for the portable loop.
    pub(crate) fn batch_spec(&self) -> Option<sys::BatchSpec> {
        Some(sys::BatchSpec {
            size: self.batch_size?,
            max_datagram: self.max_datagram,
            pktinfo: self.pktinfo,
            gso: self.gso,
        })
    }
}

/// The handler pool's settings.
#[derive(Debug)]
pub(crate) struct PoolConfig {
    pub(crate) threads: usize,
    pub(crate) capacity: usize,
    pub(crate) max_queue_wait: Option<Duration>,
}
