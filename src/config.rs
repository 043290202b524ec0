//! The server builder: every server setting, its default, and its check.

use std::marker::PhantomData;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use crate::engine::{Blocking, Engine};
use crate::error::Error;
use crate::pool::HandlerPool;
use crate::ratelimit::{Limiter, RateLimit};
use crate::socket::{BoundSocket, BufferSize, SocketHook, SocketOptions};
use crate::sys;
use crate::tokens::SourceTokens;

/// The most workers one server may have.
const MAX_WORKERS: usize = 1024;

/// The largest UDP payload over IPv4: 65 535 − 20 (IP header) − 8 (UDP header).
pub const MAX_UDP_PAYLOAD_V4: usize = 65_507;
/// The largest UDP payload over IPv6 (without jumbograms): 65 535 − 8 (UDP header).
pub const MAX_UDP_PAYLOAD_V6: usize = 65_527;

/// Configures and binds a server: the blocking [`GreetServer`](crate::GreetServer) (from
/// [`GreetServer::builder`](crate::GreetServer::builder), `ServerBuilder<Blocking>`), or with the
/// feature `tokio` the async `udp_greet::tokio::GreetServer` (from its own
/// `builder()`, `ServerBuilder<Tokio>`).
///
/// Every socket option is applied through socket2 before the socket is
/// bound, and every setting is checked before anything is bound.
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
///
/// # Settings that belong to one engine
///
/// The settings shared by every engine are methods of every builder.
/// Those of one engine are grouped in a value of their own, which only that
/// engine's builder takes: a [`HandlerPool`] for the blocking server
/// ([`handler_pool`](ServerBuilder::handler_pool)), `Limits` for the async
/// server (`limits`). A setting that does not apply cannot be written:
///
/// ```compile_fail,E0599
/// // Handlers run inline here: there is no queue to size.
/// let builder = udp_greet::GreetServer::builder().queue_capacity(64);
/// ```
///
/// ```compile_fail,E0599
/// // A busy reply is for requests shed by a pool or the async limits.
/// let builder = udp_greet::GreetServer::builder().overload_reply(&b"busy"[..]);
/// ```
///
/// ```compile_fail,E0599
/// // Futures in flight are the async server's.
/// let builder = udp_greet::GreetServer::builder().max_in_flight(64);
/// ```
///
/// Settings that contradict the I/O path or the socket chosen are refused
/// with [`Error::InvalidConfig`] when binding, before any socket is made:
/// [`batch_size`](ServerBuilder::batch_size) or [`gso(true)`](ServerBuilder::gso)
/// with [`portable_io(true)`](ServerBuilder::portable_io) (or where the
/// platform has no batches), and the settings that apply before bind with
/// [`from_std`](ServerBuilder::from_std). No setting is ever accepted and
/// then ignored.
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until `bind` is called"]
pub struct ServerBuilder<E: Engine = Blocking> {
    pub(crate) socket: SocketOptions,
    max_datagram: Option<usize>,
    pub(crate) workers: usize,
    /// `None`: the default, [`DEFAULT_BATCH_SIZE`]; `Some`: set by the user.
    batch_size: Option<usize>,
    portable_io: bool,
    /// `None`: the default, on; `Some`: set by the user.
    gso: Option<bool>,
    rate_limit: Option<RateLimit>,
    tokens: Option<SourceTokens>,
    max_amplification: Option<usize>,
    busy_poll: Option<Duration>,
    /// Read each datagram's metadata ([`recv_metadata`](ServerBuilder::recv_metadata)).
    pub(crate) metadata: bool,
    /// The DSCP replies are marked with.
    pub(crate) reply_dscp: Option<u8>,
    /// Tell the service manager how the server is (feature `systemd`).
    pub(crate) notify: bool,
    /// The running server may hand its sockets on
    /// ([`allow_handoff`](ServerBuilder::allow_handoff)).
    pub(crate) handoff: bool,
    /// The first setting made that applies before bind only, if any: a
    /// socket made elsewhere ([`from_std`](ServerBuilder::from_std)) cannot
    /// take it.
    pre_bind: Option<&'static str>,
    /// Where handlers run.
    dispatch: Dispatch,
    /// Serve through AF_XDP (feature `xdp`).
    #[cfg(all(feature = "xdp", target_os = "linux"))]
    pub(crate) xdp: Option<crate::xdp::Xdp>,
    engine: PhantomData<E>,
}

/// Where a server's handlers run, with that engine's own settings.
#[derive(Debug, Clone)]
pub(crate) enum Dispatch {
    /// On the receive workers (blocking engine).
    Inline,
    /// On a handler pool (blocking engine).
    Pool(HandlerPool),
    /// As futures on the receive tasks (tokio engine).
    #[cfg(feature = "tokio")]
    Async(crate::limits::Limits),
}

/// The default number of datagrams per batch on the batched path: 32.
///
/// Measured with `cargo bench --bench throughput` (128 requests in flight):
/// CPU per reply relative to a plain std loop was 0.72 with batches of 8 and
/// 0.68 to 0.69 with 16, 32 or 64, so 32 leaves headroom at no cost. A batch
/// never waits to fill: the receive returns as soon as one datagram is there.
pub(crate) const DEFAULT_BATCH_SIZE: usize = 32;

/// The receive buffer a server asks for unless told otherwise: 1 MiB.
///
/// Linux grants twice the request, capped at twice `net.core.rmem_max`: 2 MiB
/// where `rmem_max` is at least 1 MiB, 416 KiB on a stock kernel
/// (`rmem_max` = 208 KiB). Measured with 512 small requests in flight
/// (`cargo bench --bench throughput`), any grant from 512 KiB up dropped
/// nothing, where the kernel's default 208 KiB buffer (about 190 queued
/// small datagrams) dropped some.
pub(crate) const DEFAULT_RECV_BUFFER: usize = 1 << 20;

impl<E: Engine> ServerBuilder<E> {
    /// Every setting at its default, with handlers run as `dispatch` says.
    pub(crate) fn with_dispatch(dispatch: Dispatch) -> Self {
        ServerBuilder {
            socket: SocketOptions {
                only_v6: true,
                ..SocketOptions::default()
            },
            max_datagram: None,
            workers: 1,
            batch_size: None,
            portable_io: false,
            gso: None,
            rate_limit: None,
            tokens: None,
            max_amplification: None,
            busy_poll: None,
            metadata: false,
            reply_dscp: None,
            notify: false,
            handoff: false,
            pre_bind: None,
            dispatch,
            #[cfg(all(feature = "xdp", target_os = "linux"))]
            xdp: None,
            engine: PhantomData,
        }
    }

    /// Where handlers run, for the engines that choose.
    pub(crate) fn set_dispatch(mut self, dispatch: Dispatch) -> Self {
        self.dispatch = dispatch;
        self
    }

    /// Notes a setting that applies before bind only.
    fn applies_before_bind(mut self, setting: &'static str) -> Self {
        self.pre_bind.get_or_insert(setting);
        self
    }
}

impl Default for ServerBuilder<Blocking> {
    fn default() -> Self {
        Self::with_dispatch(Dispatch::Inline)
    }
}

impl ServerBuilder<Blocking> {
    /// A builder for the blocking server with every setting at its default.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs handlers on a pool of threads instead of on the receive
    /// workers, for handlers that wait (on a database, a file, another
    /// service); see [`HandlerPool`] for how requests are queued, shed and
    /// expired.
    ///
    /// The receive workers keep receiving in batches and hand each request
    /// to the pool through a bounded queue without ever waiting for room.
    /// Without a pool (`None`, the default), handlers run inline on the
    /// receive workers, which is fastest for handlers that answer in
    /// microseconds.
    pub fn handler_pool(self, pool: impl Into<Option<HandlerPool>>) -> Self {
        self.set_dispatch(pool.into().map_or(Dispatch::Inline, Dispatch::Pool))
    }

    /// Serves through AF_XDP sockets on the receive queues of an
    /// interface (feature `xdp`, Linux; see [`crate::xdp`]): one receive
    /// worker per queue (more if [`workers`](ServerBuilder::workers) asks),
    /// the same handler and promises, past the kernel's UDP stack.
    ///
    /// The server must be bound with [`bind`](ServerBuilder::bind) (or
    /// [`from_std`](ServerBuilder::from_std)) to one address of its own
    /// that datagrams reach through that interface, not a wildcard: the
    /// XDP program takes only the datagrams to that address and port. `None` (the default): the
    /// socket path.
    ///
    /// # Errors (at bind)
    ///
    /// [`Error::Xdp`](crate::Error::Xdp) when the program cannot be loaded
    /// or attached, or a queue's socket cannot be opened, and for an
    /// interface that does not exist, is a loopback interface or is not
    /// Ethernet: the message says what is missing (root, kernel
    /// support, the driver's mode). It never falls back to the socket
    /// path. [`Error::InvalidConfig`] for a
    /// wildcard address, several addresses, or with
    /// [`allow_handoff`](ServerBuilder::allow_handoff).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), udp_greet::Error> {
    /// use udp_greet::GreetServer;
    /// use udp_greet::xdp::Xdp;
    ///
    /// // As root, on a host that owns 198.18.0.1 on eth0.
    /// let server = GreetServer::builder()
    ///     .xdp(Xdp::interface("eth0"))
    ///     .bind("198.18.0.1:9999")?
    ///     .spawn(udp_greet::greet)?;
    /// println!("XDP in {} mode", server.xdp_mode().map_or("no".into(), |m| m.to_string()));
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(all(feature = "xdp", target_os = "linux"))]
    #[cfg_attr(docsrs, doc(cfg(all(feature = "xdp", target_os = "linux"))))]
    pub fn xdp(mut self, xdp: impl Into<Option<crate::xdp::Xdp>>) -> Self {
        self.xdp = xdp.into();
        self
    }
}

impl<E: Engine> ServerBuilder<E> {
    /// Requests a receive buffer (`SO_RCVBUF`) of `bytes`: how much the
    /// kernel queues for the server while it is busy, beyond which it drops.
    ///
    /// The kernel may adjust the size: read what it granted with
    /// [`GreetServer::recv_buffer_size`](crate::GreetServer::recv_buffer_size). A request above `i32::MAX` (the
    /// largest the option takes) asks for `i32::MAX`. Defaults to
    /// 1 MiB for [`bind`](ServerBuilder::bind);
    /// [`from_std`](ServerBuilder::from_std) leaves the socket's own size
    /// unless this is called.
    pub fn recv_buffer_size(mut self, bytes: usize) -> Self {
        self.socket.recv_buffer = Some(bytes);
        self
    }

    /// Requests a send buffer (`SO_SNDBUF`) of `bytes` (at most `i32::MAX`,
    /// as for [`recv_buffer_size`](ServerBuilder::recv_buffer_size)).
    ///
    /// Read what the kernel granted with [`GreetServer::send_buffer_size`](crate::GreetServer::send_buffer_size).
    /// Defaults to the system default.
    pub fn send_buffer_size(mut self, bytes: usize) -> Self {
        self.socket.send_buffer = Some(bytes);
        self
    }

    /// Sets `SO_REUSEADDR` before binding.
    ///
    /// On Windows a server takes its address exclusively
    /// (`SO_EXCLUSIVEADDRUSE`, and a bind that is refused it fails naming
    /// it) unless this or [`reuse_port`](ServerBuilder::reuse_port) is on:
    /// there `SO_REUSEADDR` lets another socket take the same port.
    ///
    /// Defaults to `false`.
    pub fn reuse_address(mut self, on: bool) -> Self {
        self.socket.reuse_address = on;
        self.applies_before_bind("ServerBuilder::reuse_address")
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
        self.applies_before_bind("ServerBuilder::reuse_port")
    }

    /// Sets `IPV6_V6ONLY` on IPv6 sockets: when `true`, a socket bound to
    /// `[::]` accepts IPv6 only; when `false`, IPv4 peers too (as
    /// IPv4-mapped addresses).
    ///
    /// The option is always set explicitly, so behaviour does not depend on
    /// the platform's default (Linux: `false`, Windows and the BSDs: `true`).
    /// It is the one setting that can apply to some addresses and not
    /// others: an address that resolves to both families binds whichever
    /// takes it, so the setting is accepted for IPv4 sockets and does
    /// nothing there. Defaults to `true`.
    pub fn only_v6(mut self, on: bool) -> Self {
        self.socket.only_v6 = on;
        self.applies_before_bind("ServerBuilder::only_v6")
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

    /// Reads, with each datagram, what the network layer reports about it:
    /// its ECN codepoint and DSCP, its TTL or hop limit, and the interface
    /// it arrived on, for the handler in
    /// [`Request::metadata`](crate::Request::metadata).
    ///
    /// Off, nothing is asked of the kernel and nothing is read: the receive
    /// path is the same as without the setting. On, each receive carries
    /// control messages (`IP_RECVTOS`, `IP_RECVTTL`, `IP_PKTINFO`, and on
    /// IPv6 `IPV6_RECVTCLASS`, `IPV6_RECVHOPLIMIT`, `IPV6_RECVPKTINFO`), and
    /// each reply goes out from the address its request arrived on.
    ///
    /// It applies to a socket made elsewhere
    /// ([`from_std`](ServerBuilder::from_std)) too: the options are set on it.
    ///
    /// Linux only: refused with [`Error::InvalidConfig`] elsewhere. Defaults
    /// to off.
    pub fn recv_metadata(mut self, on: bool) -> Self {
        self.metadata = on;
        self
    }

    /// Lets the running server hand its sockets, their kernel queues
    /// intact, to a new server: [`ServerHandle::handoff`](crate::ServerHandle::handoff),
    /// for restarts and upgrades that lose no datagram (see [`Handoff`](crate::Handoff)).
    ///
    /// A server's workers wait for datagrams in the kernel, and a shutdown
    /// wakes them by shutting the sockets down for reading, which leaves
    /// the sockets of no further use. With this setting the sockets are
    /// never shut down: each worker wakes on its own every 50 ms while idle
    /// (a receive timeout) to see whether the server is stopping or handing
    /// off, so that a shutdown or a handoff takes up to 50 ms longer, and an
    /// idle server makes 20 wake-ups a second per worker.
    ///
    /// A server on sockets made elsewhere ([`from_std`](ServerBuilder::from_std),
    /// [`from_handoff`](ServerBuilder::from_handoff), socket activation)
    /// always works this way, and can always hand off.
    ///
    /// Defaults to off.
    pub fn allow_handoff(mut self, on: bool) -> Self {
        self.handoff = on;
        self
    }

    /// Tells the service manager how the server is, in systemd's protocol
    /// (feature `systemd`, Unix; nothing happens without `NOTIFY_SOCKET`
    /// in the environment):
    ///
    /// - `READY=1` once every receive worker (of every listener) has begun
    ///   to receive, for a unit of `Type=notify` (never after `STOPPING=1`);
    /// - `STOPPING=1` when shutdown begins;
    /// - with `WatchdogSec=` (`WATCHDOG_USEC`, and `WATCHDOG_PID` unset or
    ///   this process), from `READY=1` on (systemd's watchdog runs from the
    ///   end of start-up), `WATCHDOG=1` four times an interval while, and only
    ///   while, every receive worker is alive and receiving: waiting for
    ///   datagrams, or in a handler call (or batch) begun less than half an
    ///   interval ago. A worker busy longer, or one that has ended (an
    ///   async server whose runtime was shut down), stops the pings, with a
    ///   `STATUS=` line that names it (`udp:PORT/N`); they resume, with
    ///   `STATUS=serving`, when it waits for datagrams again. The manager
    ///   restarts a service that sent no ping for a whole interval: about
    ///   one and a half intervals after a worker got stuck. Choose
    ///   `WatchdogSec=` above twice the longest handler call.
    ///
    /// Messages are sent without waiting, to the path or the abstract name
    /// (`@name`, Linux) in `NOTIFY_SOCKET`: one the manager does not take
    /// (its queue full, or gone) is lost, and the server goes on. The
    /// watchdog thread (`udp:PORT/wd`) ends when the server stops.
    ///
    /// What the pings cannot see: handler threads of a
    /// [pool](ServerBuilder::handler_pool) (a stuck pool is shed visibly,
    /// and the receive workers go on, so the pings do too), and, for the
    /// async server, a runtime that another task keeps from polling the
    /// server's tasks while they wait. Several servers in one process each
    /// notify for themselves: let one of them notify.
    ///
    /// Defaults to off.
    #[cfg(all(feature = "systemd", unix))]
    #[cfg_attr(docsrs, doc(cfg(all(feature = "systemd", unix))))]
    pub fn notify_service_manager(mut self, on: bool) -> Self {
        self.notify = on;
        self
    }

    /// Marks every reply with a DSCP (differentiated services codepoint,
    /// 0 to 63; 46 is "expedited forwarding"), for networks that give
    /// classes of traffic their own queues. Set as the TOS byte (`IP_TOS`)
    /// or traffic class (`IPV6_TCLASS`, and `IP_TOS` too on a dual-stack
    /// socket, for its IPv4 peers) of every server socket, with the ECN
    /// bits left 0. On Linux, setting `IP_TOS` also sets the socket's
    /// `SO_PRIORITY` from it (DSCP 46 gives priority 4), which a hook's
    /// `SO_PRIORITY` ([`before_bind`](ServerBuilder::before_bind)) does not
    /// override: set both there instead if that matters.
    ///
    /// It applies to a socket made elsewhere
    /// ([`from_std`](ServerBuilder::from_std)) too.
    ///
    /// A value above 63 is refused with [`Error::InvalidConfig`], as is the
    /// setting on Windows, which ignores `IP_TOS` from applications (use a
    /// QoS policy there), and on systems where socket2 cannot set both
    /// options (it can on Linux, Android, macOS, the BSDs, illumos and
    /// Fuchsia). A dual-stack socket (`[::]` with
    /// [`only_v6(false)`](ServerBuilder::only_v6)) takes `IP_TOS` on Linux;
    /// a system that refuses it there fails the bind with an error naming
    /// it. Defaults to the system's (0).
    pub fn reply_dscp(mut self, dscp: u8) -> Self {
        self.reply_dscp = Some(dscp);
        self
    }

    /// Runs `hook` on every server socket the builder makes, before the
    /// socket is bound: for a socket option the crate does not name
    /// (`IP_FREEBIND`, `IP_PMTUDISC_OMIT`, `SO_MARK`, ...). With several
    /// [`workers`](ServerBuilder::workers) it runs once for each worker's
    /// socket. Several hooks run in the order they were given.
    ///
    /// It runs after the options the crate sets before bind (buffer sizes,
    /// `SO_REUSEADDR`, `SO_REUSEPORT` where asked for, `IPV6_V6ONLY`,
    /// `SO_BUSY_POLL`), so it can override them; the ones the crate sets
    /// once the socket is bound come after it and win:
    /// [`reply_dscp`](ServerBuilder::reply_dscp)'s `IP_TOS` /
    /// `IPV6_TCLASS` (which on Linux also sets `SO_PRIORITY`),
    /// [`recv_metadata`](ServerBuilder::recv_metadata)'s and the arrival
    /// address options, the read timeout, `SO_REUSEPORT` joining the
    /// sockets of several workers, and the server's own modes: every
    /// socket is put back in blocking mode and has receive offload
    /// (`UDP_GRO`) turned off, and a socket a hook shut down for reading
    /// is refused ([`Error::InvalidConfig`]). The hook must leave the
    /// socket unbound and unconnected: the bind then fails
    /// ([`Error::Bind`]).
    ///
    /// `setting` names what the hook sets: an error the hook returns fails
    /// the bind with [`Error::SocketSetting`], which names it and the
    /// address. A hook that panics is not caught: the panic reaches the
    /// caller of `bind`, and the sockets made so far are closed.
    ///
    /// A socket made elsewhere ([`from_std`](ServerBuilder::from_std)) is
    /// bound already: a hook with it is refused with
    /// [`Error::InvalidConfig`]; set the option on that socket instead.
    ///
    /// ```
    /// # fn main() -> Result<(), udp_greet::Error> {
    /// use udp_greet::GreetServer;
    ///
    /// let server = GreetServer::builder()
    ///     // Replies leave with a TTL of 255: a receiver on the same link
    ///     // can tell they were not routed (RFC 5082).
    ///     .before_bind("IP_TTL", |socket| socket.set_ttl_v4(255))
    ///     .bind("127.0.0.1:0")?;
    /// assert_ne!(server.local_addr().port(), 0);
    ///
    /// let err = GreetServer::builder()
    ///     .before_bind("SO_MARK", |_| Err(std::io::ErrorKind::PermissionDenied.into()))
    ///     .bind("127.0.0.1:0")
    ///     .unwrap_err();
    /// assert!(err.to_string().contains("SO_MARK"), "{err}");
    /// # Ok(())
    /// # }
    /// ```
    pub fn before_bind<F>(mut self, setting: impl Into<String>, hook: F) -> Self
    where
        F: Fn(&socket2::Socket) -> std::io::Result<()> + Send + Sync + 'static,
    {
        self.socket.hooks.push(SocketHook {
            setting: setting.into(),
            hook: Arc::new(hook),
        });
        self.applies_before_bind("ServerBuilder::before_bind")
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
    /// as 50 µs of handler calls have passed since the oldest reply not yet
    /// sent began to be worked on. A ready reply therefore waits for the
    /// calls after it in its batch until they have taken 50 µs, together
    /// with the one call that takes it past 50 µs, however long that call
    /// is; a slow handler delays the replies made just before it. A
    /// [`HandlerPool`]'s threads send each reply before their next call,
    /// unless more requests are queued than the pool has threads.
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
    /// Batches are used on Linux only; elsewhere, and with
    /// [`portable_io(true)`](ServerBuilder::portable_io), setting this is
    /// refused with [`Error::InvalidConfig`].
    ///
    /// Must be between 1 and 1024. Defaults to 32.
    pub fn batch_size(mut self, datagrams: usize) -> Self {
        self.batch_size = Some(datagrams);
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
    /// Linux 4.18 and later, batched path only. `gso(true)` with
    /// [`portable_io(true)`](ServerBuilder::portable_io), or off Linux, is
    /// refused with [`Error::InvalidConfig`]; `gso(false)` is always
    /// accepted.
    ///
    /// Defaults to `true`.
    pub fn gso(mut self, on: bool) -> Self {
        self.gso = Some(on);
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

    /// Tells real clients from forged ones: a request that carries a valid
    /// [source token](SourceTokens) for its address is counted as
    /// [validated](crate::Stats::validated), held to the tokens'
    /// [`validated_limit`](SourceTokens::validated_limit) instead of the
    /// [rate limit](ServerBuilder::rate_limit), and its reply to no
    /// [amplification limit](ServerBuilder::max_amplification); the
    /// handler sees it as [`Request::validated`](crate::Request::validated).
    /// Requests without one are treated as without this setting, or, with
    /// [`challenge`](SourceTokens::challenge), challenged where they would
    /// be dropped. See the README's "Forged sources and real clients".
    ///
    /// Defaults to none.
    pub fn source_tokens(mut self, tokens: SourceTokens) -> Self {
        self.tokens = Some(tokens);
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

    /// Latency mode: after handling what arrived, a worker keeps receiving
    /// without blocking for up to `window` before it blocks again, so that a
    /// request that comes within the window is taken at once rather than
    /// after the thread is woken. The window starts again whenever a
    /// datagram arrives; an idle server goes back to sleeping in the kernel
    /// once it has passed. Shutdown stays as prompt.
    ///
    /// Every mode polls: the batched and portable receive loops poll their
    /// socket, [handler-pool](ServerBuilder::handler_pool) threads
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
    /// Linux only: refused with [`Error::InvalidConfig`] elsewhere, as is a
    /// duration above `i32::MAX` microseconds (about 35 minutes), the most
    /// the option takes. A duration is set in whole microseconds, rounded
    /// down.
    ///
    /// Defaults to the system setting (`net.core.busy_read`, usually 0).
    pub fn so_busy_poll(mut self, duration: Duration) -> Self {
        self.socket.so_busy_poll = Some(duration);
        self
    }

    /// Checks every setting, and that each applies to the engine and the
    /// socket chosen (`adopted`: a socket made elsewhere, through
    /// `from_std`). Nothing is bound before this passes.
    pub(crate) fn validate(&self, adopted: bool) -> Result<(), Error> {
        if self
            .max_datagram
            .is_some_and(|max| !(1..=usize::from(u16::MAX)).contains(&max))
        {
            return Err(Error::invalid(
                "ServerBuilder::max_datagram_size",
                "must be between 1 and 65535 bytes",
            ));
        }
        if self.max_amplification == Some(0) {
            return Err(Error::invalid(
                "ServerBuilder::max_amplification",
                "must be at least 1",
            ));
        }
        if let Some(limit) = &self.rate_limit {
            limit.validate("ServerBuilder::rate_limit")?;
        }
        if let Some(tokens) = &self.tokens {
            tokens.validate()?;
            if tokens.validated_limit.is_some() && self.rate_limit.is_none() {
                return Err(Error::invalid(
                    "SourceTokens::validated_limit",
                    "without ServerBuilder::rate_limit it would hold validated sources \
                     to a limit and the rest to none: set a rate limit too",
                ));
            }
            let overload = !matches!(self.dispatch, Dispatch::Inline);
            if tokens.challenge && self.rate_limit.is_none() && !overload {
                return Err(Error::invalid(
                    "SourceTokens::challenge",
                    "nothing would ever be challenged: challenges replace what the rate \
                     limit or a handler pool's overload would drop, and this server has \
                     neither: set ServerBuilder::rate_limit or a handler pool",
                ));
            }
        }
        #[cfg(all(feature = "xdp", target_os = "linux"))]
        if let Some(xdp) = &self.xdp {
            xdp.validate()?;
            if self.handoff {
                return Err(Error::invalid(
                    "ServerBuilder::xdp",
                    "cannot be combined with allow_handoff: the AF_XDP sockets cannot be handed on",
                ));
            }
        }
        if !(1..=MAX_WORKERS).contains(&self.workers) {
            return Err(Error::invalid(
                "ServerBuilder::workers",
                "must be between 1 and 1024",
            ));
        }
        if self
            .batch_size
            .is_some_and(|size| !(1..=sys::MAX_BATCH).contains(&size))
        {
            return Err(Error::invalid(
                "ServerBuilder::batch_size",
                "must be between 1 and 1024",
            ));
        }
        self.socket
            .check_so_busy_poll("ServerBuilder::so_busy_poll")?;
        if self.metadata && !cfg!(target_os = "linux") {
            return Err(Error::invalid(
                "ServerBuilder::recv_metadata",
                "datagram metadata is read on Linux only",
            ));
        }
        if self.reply_dscp.is_some_and(|dscp| dscp > 63) {
            return Err(Error::invalid(
                "ServerBuilder::reply_dscp",
                "a DSCP is six bits: 0 to 63",
            ));
        }
        if self.reply_dscp.is_some() && cfg!(windows) {
            return Err(Error::invalid(
                "ServerBuilder::reply_dscp",
                "Windows ignores IP_TOS set by applications: mark traffic with a QoS policy",
            ));
        }
        if self.reply_dscp.is_some() && !crate::socket::SETS_TRAFFIC_CLASS {
            return Err(Error::invalid(
                "ServerBuilder::reply_dscp",
                "this system's IP_TOS or IPV6_TCLASS cannot be set through socket2",
            ));
        }
        // Batching settings where there is no batching.
        let no_batches = if self.portable_io {
            "it applies to batched I/O, and portable_io(true) turns that off"
        } else if !BATCHES {
            "it applies to batched I/O, which this platform does not have (Linux only)"
        } else {
            ""
        };
        if !no_batches.is_empty() {
            if self.batch_size.is_some() {
                return Err(Error::invalid("ServerBuilder::batch_size", no_batches));
            }
            if self.gso == Some(true) {
                return Err(Error::invalid("ServerBuilder::gso", no_batches));
            }
        }
        if adopted && !self.socket.hooks.is_empty() {
            return Err(Error::invalid(
                "ServerBuilder::before_bind",
                "a socket made elsewhere (from_std) is bound already: set the option on it \
                 before handing it in",
            ));
        }
        if let Some(setting) = self.pre_bind.filter(|_| adopted) {
            return Err(Error::invalid(
                setting,
                "it applies before bind, and a socket made elsewhere (from_std) is bound \
                 already: set it on that socket instead",
            ));
        }
        match &self.dispatch {
            Dispatch::Inline => {}
            Dispatch::Pool(pool) => pool.validate()?,
            #[cfg(feature = "tokio")]
            Dispatch::Async(limits) => {
                limits.validate()?;
                if self.workers > 1 && adopted {
                    return Err(Error::invalid(
                        "ServerBuilder::workers",
                        "the async server runs one task per socket, and a socket made \
                         elsewhere (from_std, from_std_all) is one socket: use one worker",
                    ));
                }
                if self.workers > 1 && !REUSE_PORT_SPREADS {
                    return Err(Error::invalid(
                        "ServerBuilder::workers",
                        "the async server runs one task per socket, and this platform \
                         cannot spread one port over several sockets (Linux only): \
                         use one worker",
                    ));
                }
            }
        }
        Ok(())
    }

    /// The server's rate limiters: one for every listener.
    pub(crate) fn limiters(&self) -> Limiters {
        Limiters {
            source: self
                .rate_limit
                .as_ref()
                .map(|limit| Arc::new(Limiter::new(limit))),
            validated: self
                .tokens
                .as_ref()
                .and_then(|tokens| tokens.validated_limit.as_ref())
                .map(|limit| Arc::new(Limiter::new(limit))),
            challenge: self
                .tokens
                .as_ref()
                .filter(|tokens| tokens.challenge)
                .map(|tokens| Arc::new(Limiter::new(&tokens.challenge_limit))),
        }
    }

    /// Whether each worker gets a socket of its own: with several workers,
    /// where the kernel spreads datagrams over sockets that share a port.
    pub(crate) fn socket_per_worker(&self) -> usize {
        if REUSE_PORT_SPREADS { self.workers } else { 1 }
    }

    /// The settings every worker shares, for sockets bound like `first`,
    /// which read no control messages yet (see `Bound::new`). Call after
    /// [`validate`](ServerBuilder::validate).
    pub(crate) fn config(&self, first: &BoundSocket, limiters: Limiters) -> Config {
        let local_addr = first.local_addr;
        Config {
            local_addr,
            server_addr: local_addr,
            recv_buffer: first.recv_buffer,
            send_buffer: first.send_buffer,
            icmp_reports_off: first.icmp_reports_off,
            max_datagram: self.max_datagram.unwrap_or(match local_addr {
                SocketAddr::V4(_) => MAX_UDP_PAYLOAD_V4,
                SocketAddr::V6(_) => MAX_UDP_PAYLOAD_V6,
            }),
            workers: self.workers,
            batch_size: (!self.portable_io && BATCHES)
                .then_some(self.batch_size.unwrap_or(DEFAULT_BATCH_SIZE)),
            gso: self.gso.unwrap_or(true),
            control: sys::Control::Off,
            metadata: self.metadata,
            bound_ip: Some(local_addr.ip()).filter(|ip| !ip.is_unspecified()),
            limiters,
            tokens: self.tokens.clone(),
            max_amplification: self.max_amplification,
            busy_poll: self.busy_poll,
            dispatch: self.dispatch.clone(),
        }
    }
}

/// Whether the kernel spreads datagrams over sockets that share a port with
/// `SO_REUSEPORT` (Linux, by a hash of the peer's address); elsewhere
/// workers share one socket.
const REUSE_PORT_SPREADS: bool = cfg!(any(target_os = "linux", target_os = "android"));

/// Whether the platform has batched receives and sends.
const BATCHES: bool = cfg!(target_os = "linux");

/// A server's rate limiters, shared by its listeners.
#[derive(Debug, Clone, Default)]
pub(crate) struct Limiters {
    /// The rate limit for every source without a valid token.
    pub(crate) source: Option<Arc<Limiter>>,
    /// The rate limit for validated sources (source tokens).
    pub(crate) validated: Option<Arc<Limiter>>,
    /// How many challenges each prefix may get (source tokens).
    pub(crate) challenge: Option<Arc<Limiter>>,
}

/// A server's settings, checked and fixed at bind, shared by its workers.
#[derive(Debug)]
pub(crate) struct Config {
    /// The address the sockets are bound to, with the real port: this
    /// listener's.
    pub(crate) local_addr: SocketAddr,
    /// The server's first listener's address: what names the server.
    pub(crate) server_addr: SocketAddr,
    pub(crate) recv_buffer: BufferSize,
    pub(crate) send_buffer: BufferSize,
    /// Every socket keeps ICMP reports about earlier replies out of its
    /// receive path.
    pub(crate) icmp_reports_off: bool,
    /// The largest accepted datagram, in bytes.
    pub(crate) max_datagram: usize,
    /// Receive workers.
    pub(crate) workers: usize,
    /// Datagrams per batch on the batched path; `None` for one at a time.
    pub(crate) batch_size: Option<usize>,
    /// Coalesce replies to one peer with segmentation offload (batched path).
    pub(crate) gso: bool,
    /// What the sockets' receives read besides the datagrams: arrival
    /// addresses for a wildcard-bound socket (replies go out from them),
    /// and metadata where asked for.
    pub(crate) control: sys::Control,
    /// Requests carry their metadata (the sockets report it; `control`
    /// reads it).
    pub(crate) metadata: bool,
    /// The address the sockets are bound to, unless it is a wildcard: the
    /// local address of every request where the datagram does not say.
    pub(crate) bound_ip: Option<IpAddr>,
    /// One for the whole server, whatever its listeners.
    pub(crate) limiters: Limiters,
    /// Source tokens, if the server checks them.
    pub(crate) tokens: Option<SourceTokens>,
    pub(crate) max_amplification: Option<usize>,
    /// How long a worker polls after work before it blocks again.
    pub(crate) busy_poll: Option<Duration>,
    /// Where handlers run, with that engine's settings.
    pub(crate) dispatch: Dispatch,
}

impl Config {
    /// The handler pool, if handlers run on one.
    pub(crate) fn pool(&self) -> Option<&HandlerPool> {
        match &self.dispatch {
            Dispatch::Pool(pool) => Some(pool),
            _ => None,
        }
    }

    /// The async server's limits.
    #[cfg(feature = "tokio")]
    pub(crate) fn limits(&self) -> Option<&crate::limits::Limits> {
        match &self.dispatch {
            Dispatch::Async(limits) => Some(limits),
            _ => None,
        }
    }

    /// The reply to requests shed for overload, if any.
    pub(crate) fn overload_reply(&self) -> Option<&[u8]> {
        match &self.dispatch {
            Dispatch::Inline => None,
            Dispatch::Pool(pool) => pool.overload_reply.as_deref(),
            #[cfg(feature = "tokio")]
            Dispatch::Async(limits) => limits.overload_reply.as_deref(),
        }
    }

    /// How long handlers go on answering at shutdown.
    pub(crate) fn drain_timeout(&self) -> Duration {
        match &self.dispatch {
            Dispatch::Inline => Duration::ZERO,
            Dispatch::Pool(pool) => pool.drain_timeout,
            #[cfg(feature = "tokio")]
            Dispatch::Async(limits) => limits.drain_timeout,
        }
    }

    /// What a worker's batches are made for; `None` for the portable loop.
    pub(crate) fn batch_spec(&self) -> Option<sys::BatchSpec> {
        Some(sys::BatchSpec {
            size: self.batch_size?,
            max_datagram: self.max_datagram,
            control: self.control,
            gso: self.gso,
        })
    }
}
