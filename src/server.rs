//! Binding a server (for either engine), and the blocking server: serve
//! or spawn.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::sync::{Arc, Weak};
use std::thread;

use socket2::Socket;

use crate::blocking::{PoolThread, ReceiveWorker};
use crate::config::{Config, DEFAULT_RECV_BUFFER, ServerBuilder};
use crate::control::{ListenerSlots, Notify, ServerControl, ServerHandle, Shared, ThreadEnd};
use crate::engine::{Blocking, Engine};
use crate::error::Error;
use crate::handoff::Handoff;
use crate::policy::HandlerFn;
use crate::pool::{HandlerPool, Pool};
use crate::request::{Action, Request};
use crate::socket::{self, BoundSocket, BufferSize};
use crate::stats::Stats;
use crate::sys;

/// A server's sockets, bound and configured, not yet serving: what either
/// engine starts from.
pub(crate) struct Bound {
    /// At least one.
    pub(crate) listeners: Vec<Listener>,
    /// The first listener's settings: what every listener was asked for
    /// (each has its own address, and the buffer sizes it was granted).
    pub(crate) config: Arc<Config>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) layout: Layout,
}

/// One address a server serves on: its settings (with its own address)
/// and its sockets, one per worker or one shared by all its workers.
pub(crate) struct Listener {
    pub(crate) config: Arc<Config>,
    pub(crate) sockets: Vec<Arc<Socket>>,
    /// Its AF_XDP sockets, one per receive queue, for the first workers
    /// (feature `xdp`); empty on the socket path.
    #[cfg(all(feature = "xdp", target_os = "linux"))]
    pub(crate) xdp: Vec<sys::xdp::XdpQueue>,
    /// The index in the server's list of sockets of its first one.
    pub(crate) first_socket: usize,
}

impl fmt::Debug for Bound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bound")
            .field(
                "listeners",
                &self
                    .listeners
                    .iter()
                    .map(|l| (l.config.local_addr, l.sockets.len()))
                    .collect::<Vec<_>>(),
            )
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Where each thread (or task) of a server keeps its counters: the receive
/// workers of each listener in turn, then each handler thread's one slot
/// per listener (so that every outcome is counted for its listener).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Layout {
    pub(crate) listeners: usize,
    /// Receive workers per listener.
    pub(crate) workers: usize,
    pub(crate) pool_threads: usize,
}

impl Layout {
    /// The slot of worker `worker` of listener `listener`.
    pub(crate) fn worker_slot(&self, listener: usize, worker: usize) -> usize {
        listener * self.workers + worker
    }

    /// The slot handler thread `thread` counts listener `listener`'s
    /// requests in.
    pub(crate) fn pool_slot(&self, thread: usize, listener: usize) -> usize {
        self.listeners * self.workers + thread * self.listeners + listener
    }

    /// Every slot.
    pub(crate) fn slots(&self) -> usize {
        self.listeners * (self.workers + self.pool_threads)
    }

    /// The slots of listener `listener`.
    pub(crate) fn slots_of(&self, listener: usize) -> Vec<usize> {
        (0..self.workers)
            .map(|w| self.worker_slot(listener, w))
            .chain((0..self.pool_threads).map(|t| self.pool_slot(t, listener)))
            .collect()
    }
}

/// One listener's sockets, bound and made ready to serve, before the
/// server's settings are shared out.
struct Prepared {
    sockets: Vec<BoundSocket>,
    control: sys::Control,
    /// Never shut down by the server: made elsewhere (`from_std`,
    /// `from_handoff`), whose maker may serve it again, or bound by a
    /// server that may hand it on (`allow_handoff`).
    kept: bool,
}

impl Prepared {
    /// The address the listener is bound to.
    fn addr(&self) -> Option<SocketAddr> {
        self.sockets.first().map(|b| b.local_addr)
    }
}

impl<E: Engine> ServerBuilder<E> {
    /// Checks the settings, then binds the sockets to the first address
    /// `addr` resolves to that takes them.
    pub(crate) fn bind_sockets<A: ToSocketAddrs + fmt::Debug>(
        self,
        addr: A,
    ) -> Result<Bound, Error> {
        self.bind_listeners(std::iter::once(addr))
    }

    /// Checks the settings, then binds one listener for each of `addrs`
    /// (each to the first address it resolves to that takes it). The first
    /// failure fails the whole: every socket made so far is closed.
    pub(crate) fn bind_listeners<A, I>(self, addrs: I) -> Result<Bound, Error>
    where
        A: ToSocketAddrs + fmt::Debug,
        I: IntoIterator<Item = A>,
    {
        self.validate(false)?;
        let mut options = self.socket.clone();
        options.recv_buffer = options.recv_buffer.or(Some(DEFAULT_RECV_BUFFER));
        // Counted before any is bound: past the limit nothing is.
        let addrs: Vec<A> = addrs.into_iter().take(MAX_LISTENERS + 1).collect();
        if addrs.len() > MAX_LISTENERS {
            return Err(Error::invalid(
                "ServerBuilder::bind_all",
                "at most 1024 addresses",
            ));
        }
        let mut listeners: Vec<Prepared> = Vec::new();
        for addr in addrs {
            let addrs = socket::resolve(addr)?;
            listeners.push(socket::first_ok(&addrs, |addr| {
                let (first, mut others) =
                    socket::bind_workers(addr, &options, self.socket_per_worker())?;
                others.insert(0, first);
                self.prepare(others, false)
            })?);
            // The same address twice (sharing it, with `reuse_address` or
            // `reuse_port`) would make two listeners no handler could tell
            // apart, one of which might never receive.
            if let Some(again) = listeners.last().and_then(Prepared::addr).filter(|addr| {
                listeners[..listeners.len() - 1]
                    .iter()
                    .any(|l| l.addr() == Some(*addr))
            }) {
                return Err(Error::invalid_for(
                    "ServerBuilder::bind_all",
                    again,
                    "an address given twice: give each address once",
                ));
            }
        }
        if listeners.is_empty() {
            return Err(Error::invalid(
                "ServerBuilder::bind_all",
                "needs at least one address",
            ));
        }
        Bound::new(&self, listeners)
    }

    /// Checks the settings, then takes a socket made elsewhere.
    pub(crate) fn adopt_socket(self, socket: UdpSocket) -> Result<Bound, Error> {
        self.adopt_sockets(std::iter::once(socket))
    }

    /// Checks the settings, then takes sockets made elsewhere, one listener
    /// each; the first that cannot be served on fails the whole.
    pub(crate) fn adopt_sockets(
        self,
        sockets: impl IntoIterator<Item = UdpSocket>,
    ) -> Result<Bound, Error> {
        self.adopt_groups(
            "ServerBuilder::from_std_all",
            sockets.into_iter().map(|s| vec![s]),
        )
    }

    /// Checks the settings, then takes groups of sockets made elsewhere,
    /// one listener per group (the sockets of a group are bound to one
    /// address and share it, as the workers of a server with
    /// `reuse_port` do); the first that cannot be served on fails the
    /// whole. `what` names the caller in errors.
    pub(crate) fn adopt_groups(
        self,
        what: &'static str,
        groups: impl IntoIterator<Item = Vec<UdpSocket>>,
    ) -> Result<Bound, Error> {
        self.validate(true)?;
        let mut listeners = Vec::new();
        for group in groups {
            if listeners.len() == MAX_LISTENERS {
                return Err(Error::invalid(what, "at most 1024 listeners"));
            }
            let mut adopted = Vec::with_capacity(group.len());
            for socket in group {
                adopted.push(socket::adopt(Socket::from(socket), &self.socket)?);
            }
            listeners.push(self.prepare(adopted, true)?);
        }
        if listeners.is_empty() {
            return Err(Error::invalid(
                what,
                "needs at least one socket (none was passed, or none by the name asked for?)",
            ));
        }
        Bound::new(&self, listeners)
    }

    /// Makes one listener's bound sockets (all bound to the first one's
    /// address) ready to serve: the control messages their receives read,
    /// the DSCP of their replies, and their read timeout.
    fn prepare(&self, sockets: Vec<BoundSocket>, adopted: bool) -> Result<Prepared, Error> {
        let Some(local_addr) = sockets.first().map(|b| b.local_addr) else {
            return Err(Error::invalid(
                "ServerBuilder::bind_all",
                "needs at least one address",
            ));
        };
        // A wildcard-bound socket must tell which address each datagram was
        // sent to, or replies may go out from another of the host's. With
        // metadata every socket reports it too (the same control messages).
        let wildcard = local_addr.ip().is_unspecified();
        let mut arrival_addresses = wildcard;
        let fail = |action| {
            move |source| Error::Socket {
                action,
                addr: local_addr,
                source,
            }
        };
        let ipv6 = local_addr.is_ipv6();
        let kept = adopted || self.handoff;
        for b in &sockets {
            // What a hook (or the maker of a socket given to `from_std`)
            // may have left that the server cannot serve with: a
            // non-blocking socket would spin between datagrams, one shut
            // for reading would spin on nothing, and receive offload would
            // merge datagrams into one request.
            b.socket
                .set_nonblocking(false)
                .map_err(fail("make the socket blocking"))?;
            if sys::is_shut_for_reading(&b.socket) {
                return Err(Error::invalid_for(
                    "ServerBuilder::before_bind",
                    local_addr,
                    "a hook shut the socket down for reading: a server on it would receive nothing",
                ));
            }
            sys::disable_gro(&b.socket).map_err(fail("turn UDP_GRO off"))?;
            if self.metadata {
                sys::set_metadata(&b.socket, ipv6, true).map_err(fail(
                    "enable IP_RECVTOS / IP_RECVTTL / IPV6_RECVTCLASS / IPV6_RECVHOPLIMIT / pktinfo",
                ))?;
            } else if adopted {
                // What the last server on the socket (or its maker) asked
                // for, and this one does not read.
                sys::set_metadata(&b.socket, ipv6, false).map_err(fail(
                    "turn off IP_RECVTOS / IP_RECVTTL / IPV6_RECVTCLASS / IPV6_RECVHOPLIMIT",
                ))?;
            }
            if !self.metadata && wildcard {
                arrival_addresses &= sys::enable_pktinfo(&b.socket, ipv6)
                    .map_err(fail("enable IP_PKTINFO / IPV6_RECVPKTINFO"))?;
            }
            if let Some(dscp) = self.reply_dscp {
                socket::set_reply_dscp(&b.socket, ipv6, dscp)
                    .map_err(fail("set IP_TOS / IPV6_TCLASS"))?;
            }
            // A socket made elsewhere is never shut down to wake its workers
            // (its maker may hold and serve it again), nor one the server
            // may hand on: they wake on their own to see whether the server
            // is stopping.
            let wake = if kept {
                Some(sys::ADOPTED_WAKE_INTERVAL)
            } else {
                sys::WAKE_INTERVAL
            };
            if let Some(interval) = wake {
                b.socket
                    .set_read_timeout(Some(interval))
                    .map_err(fail("set SO_RCVTIMEO"))?;
            }
        }
        let control = match (arrival_addresses, self.metadata) {
            (true, _) => sys::Control::ReplyFromArrival,
            (false, true) => sys::Control::Read,
            (false, false) => sys::Control::Off,
        };
        Ok(Prepared {
            sockets,
            control,
            kept,
        })
    }
}

impl<E: Engine> ServerBuilder<E> {
    /// Checks the settings, then takes the sockets of a handoff, one
    /// listener per address.
    pub(crate) fn adopt_handoff(self, handoff: Handoff) -> Result<Bound, Error> {
        self.adopt_groups("ServerBuilder::from_handoff", handoff.into_groups())
    }
}

/// The most addresses one server serves on.
const MAX_LISTENERS: usize = 1024;

impl ServerBuilder<Blocking> {
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
        Ok(GreetServer {
            bound: self.bind_sockets(addr)?,
        })
    }

    /// Binds one server to several addresses: one *listener* for each item
    /// of `addrs` (IPv4 and IPv6, other ports, other interfaces), each
    /// bound as [`bind`](ServerBuilder::bind) binds its one address (to the
    /// first address the item resolves to that takes it), with this
    /// builder's settings.
    ///
    /// Each listener gets its own [`workers`](ServerBuilder::workers); all
    /// share one handler, one [rate limiter](ServerBuilder::rate_limit)
    /// (a source is limited across all of them), one
    /// [handler pool](ServerBuilder::handler_pool) and one set of counters,
    /// readable in total ([`ServerControl::stats`]) and per listener
    /// ([`ServerControl::listener_stats`]). A handler tells listeners apart
    /// by [`Request::listener`].
    ///
    /// Binding is all or nothing: the first address that fails fails the
    /// whole with the error for that address (which it names), and every
    /// socket bound so far is closed before this returns. An address given
    /// twice is refused (sharing it with `reuse_address` or `reuse_port`
    /// would make two listeners a handler cannot tell apart).
    ///
    /// Threads are named per listener, `udp:PORT/N` for receive worker `N`
    /// of the listener on `PORT`; handler threads, which serve every
    /// listener, `udp:PORT/hN` with the first listener's port. Each handler
    /// thread keeps counters and latency histograms for each listener
    /// (about 5 KB each), so that every outcome is counted for its
    /// listener.
    ///
    /// # Errors
    ///
    /// As [`bind`](ServerBuilder::bind), for the first address that fails;
    /// [`Error::InvalidConfig`] for no address at all, or more than 1024.
    ///
    /// # Examples
    ///
    /// ```
    /// # fn main() -> Result<(), udp_greet::Error> {
    /// use udp_greet::{GreetClient, GreetServer};
    ///
    /// // IPv4 and IPv6 in one server (the IPv6 socket is IPv6-only, the
    /// // default), with one set of counters.
    /// # let v6 = if std::net::UdpSocket::bind("[::1]:0").is_ok() { "[::1]:0" } else { "127.0.0.1:0" };
    /// let server = GreetServer::builder()
    ///     .bind_all(["127.0.0.1:0", v6])?
    ///     .spawn(udp_greet::greet)?;
    /// for addr in server.local_addrs() {
    ///     let client = GreetClient::connect(addr)?;
    ///     assert_eq!(client.send_recv(b"Sarah")?, b"Hello, Sarah!");
    /// }
    /// assert_eq!(server.shutdown()?.replied, 2);
    /// # Ok(())
    /// # }
    /// ```
    pub fn bind_all<A, I>(self, addrs: I) -> Result<GreetServer, Error>
    where
        A: ToSocketAddrs + fmt::Debug,
        I: IntoIterator<Item = A>,
    {
        Ok(GreetServer {
            bound: self.bind_listeners(addrs)?,
        })
    }

    /// Serves on a socket made elsewhere, with this builder's settings: for
    /// socket options this crate does not set, or a socket inherited from a
    /// service manager.
    ///
    /// The socket must be a bound UDP socket. It is put in the mode the
    /// server needs: blocking, with a read timeout of 50 ms, and with
    /// receive offload (`UDP_GRO`, Linux) off, which would hand several
    /// datagrams to the server as one. The server never shuts the socket
    /// down (its maker may hold a copy, as a service manager does, and
    /// serve it again once the server has stopped): its receive workers
    /// wake within the timeout to see whether the server is stopping, so a
    /// shutdown takes up to 50 ms longer than with a socket the server
    /// bound itself. The async server puts it back in blocking mode when
    /// it ends. The
    /// receive and send buffer sizes are set only if this builder sets them;
    /// every other setting applies as with [`bind`](ServerBuilder::bind),
    /// and several [`workers`](ServerBuilder::workers) share the one
    /// socket. The settings that apply before bind
    /// ([`reuse_address`](ServerBuilder::reuse_address),
    /// [`reuse_port`](ServerBuilder::reuse_port) and
    /// [`only_v6`](ServerBuilder::only_v6)) are refused: set them on the
    /// socket before binding it.
    ///
    /// A connected socket is served as it is: it receives only from the
    /// address it is connected to (others get an ICMP "port unreachable"
    /// from the system), which suits a server for one peer.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for an out-of-range setting, or one that
    /// applies before bind;
    /// [`Error::UnsuitableSocket`] when the socket is not a UDP socket over
    /// IPv4 or IPv6, is not bound, or (on Linux, where that can be told) was
    /// shut down for reading; [`Error::Socket`] when an option
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
        Ok(GreetServer {
            bound: self.adopt_socket(socket)?,
        })
    }

    /// Serves on several sockets made elsewhere, one listener each, as
    /// [`from_std`](ServerBuilder::from_std) serves on one and
    /// [`bind_all`](ServerBuilder::bind_all) on several addresses: for the
    /// sockets a service manager passed (`udp_greet::systemd::Activated`,
    /// feature `systemd`), or those another server handed on.
    ///
    /// # Errors
    ///
    /// As [`from_std`](ServerBuilder::from_std), for the first socket that
    /// cannot be served on (every socket is closed then);
    /// [`Error::InvalidConfig`] for no socket, or more than 1024.
    pub fn from_std_all(
        self,
        sockets: impl IntoIterator<Item = UdpSocket>,
    ) -> Result<GreetServer, Error> {
        Ok(GreetServer {
            bound: self.adopt_sockets(sockets)?,
        })
    }

    /// Serves the sockets of a [`Handoff`]: those a server handed on
    /// ([`ServerHandle::handoff`](crate::ServerHandle::handoff)), or
    /// received from another process. Each address is one listener, and
    /// each of its sockets gets a worker of its own (more than
    /// [`workers`](ServerBuilder::workers) asks for, where a listener
    /// has more sockets); datagrams already in their queues are served
    /// first.
    ///
    /// The settings that apply before bind (address reuse, `only_v6`,
    /// hooks) cannot apply to sockets bound already, and are refused, as
    /// with [`from_std`](ServerBuilder::from_std). Buffer sizes,
    /// [`reply_dscp`](ServerBuilder::reply_dscp) and
    /// [`recv_metadata`](ServerBuilder::recv_metadata) apply when set; a
    /// socket keeps the DSCP mark its last server gave it unless this one
    /// sets another. The sockets are never shut down by this server, which
    /// can hand them on again.
    ///
    /// # Errors
    ///
    /// As [`from_std_all`](ServerBuilder::from_std_all); an empty handoff
    /// is refused with [`Error::InvalidConfig`].
    pub fn from_handoff(self, handoff: Handoff) -> Result<GreetServer, Error> {
        Ok(GreetServer {
            bound: self.adopt_handoff(handoff)?,
        })
    }
}

/// A bound UDP server, ready to [`serve`](GreetServer::serve) on the calling
/// thread or to [`spawn`](GreetServer::spawn) on its own.
///
/// Each datagram received is handed to the handler, which writes its reply
/// into a buffer the server reuses and returns an [`Action`]: reply, or
/// stay silent. The server survives whatever arrives: oversized (truncated)
/// datagrams are counted and dropped, a panicking handler is caught and
/// counted, and receive errors never stop it.
///
/// # Examples
///
/// ```
/// # fn main() -> Result<(), udp_greet::Error> {
/// use udp_greet::{Action, GreetClient, GreetServer};
///
/// // An echo server that ignores empty datagrams.
/// let server = GreetServer::bind("127.0.0.1:0")?.spawn(|request, reply: &mut Vec<u8>| {
///     if request.data().is_empty() {
///         return Action::Ignore;
///     }
///     reply.extend_from_slice(request.data());
///     Action::Reply
/// })?;
///
/// let client = GreetClient::connect(server.local_addr())?;
/// assert_eq!(client.send_recv(b"ping")?, b"ping");
/// server.shutdown()?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct GreetServer {
    bound: Bound,
}

impl Listener {
    /// Whether it serves through AF_XDP sockets.
    fn serves_xdp(&self) -> bool {
        #[cfg(all(feature = "xdp", target_os = "linux"))]
        return !self.xdp.is_empty();
        #[cfg(not(all(feature = "xdp", target_os = "linux")))]
        false
    }
}

/// Checks that an AF_XDP server has one listener, with one socket bound
/// to an address of its own (the XDP program matches it).
#[cfg(all(feature = "xdp", target_os = "linux"))]
fn check_xdp_listeners(listeners: &[Prepared]) -> Result<(), Error> {
    let [listener] = listeners else {
        return Err(Error::invalid(
            "ServerBuilder::xdp",
            "serves one address: bind it with `bind`, not several with `bind_all`",
        ));
    };
    let Some(first) = listener.sockets.first() else {
        return Ok(());
    };
    if first.local_addr.ip().is_unspecified() {
        return Err(Error::invalid(
            "ServerBuilder::xdp",
            "needs the address the server owns on the interface (such as 198.18.0.1:53), \
             not a wildcard: the XDP program takes the datagrams to that address",
        ));
    }
    Ok(())
}

/// Attaches the XDP program for the listener `config` describes, and opens
/// an AF_XDP socket on each receive queue.
#[cfg(all(feature = "xdp", target_os = "linux"))]
fn open_xdp(
    xdp: &crate::xdp::Xdp,
    config: &Config,
    socket: &Socket,
    reply_dscp: Option<u8>,
) -> Result<(std::sync::Weak<sys::xdp::Attached>, Vec<sys::xdp::XdpQueue>), Error> {
    let batch = config
        .batch_spec()
        .map_or(crate::config::DEFAULT_BATCH_SIZE, |spec| spec.size);
    let options = sys::xdp::Options {
        mode: xdp.mode.map(crate::xdp::XdpMode::to_sys),
        spec: xdp.spec(),
        max_datagram: config.max_datagram,
        batch,
        tos: reply_dscp.map_or(0, |dscp| dscp << 2),
        verify_checksums: xdp.verify_checksums,
    };
    let (attached, queues) =
        sys::xdp::open(xdp.interface_name(), socket, config.local_addr, options).map_err(
            |source| Error::Xdp {
                interface: xdp.interface_name().to_owned(),
                source,
            },
        )?;
    // The queues keep it attached; the server's shared state only reaches
    // it to detach it when a shutdown gives up on a worker.
    Ok((Arc::downgrade(&attached), queues))
}

impl Bound {
    /// A server over `listeners`, bound and made ready by `builder`, which
    /// has checked its settings: one set of settings per listener, with
    /// one rate limiter, one handler pool and one set of counters for all.
    fn new<E: Engine>(
        builder: &ServerBuilder<E>,
        listeners: Vec<Prepared>,
    ) -> Result<Bound, Error> {
        let limiters = builder.limiters();
        // Every socket of a listener has a worker of its own (a listener
        // handed over may have more sockets than `workers` asks for).
        let workers = listeners
            .iter()
            .map(|l| l.sockets.len())
            .fold(builder.workers, usize::max);
        // An AF_XDP server has a worker for each receive queue at least.
        #[cfg(all(feature = "xdp", target_os = "linux"))]
        let workers = match &builder.xdp {
            Some(xdp) => {
                check_xdp_listeners(&listeners)?;
                let queues = listeners
                    .iter()
                    .flat_map(|l| l.sockets.first())
                    .map(|b| sys::xdp::rx_queues(&b.socket, xdp.interface_name()))
                    .max()
                    .unwrap_or(1);
                workers.max(queues as usize)
            }
            None => workers,
        };
        #[cfg(all(feature = "xdp", target_os = "linux"))]
        let mut xdp_attached = None;
        let server_addr = listeners
            .iter()
            .find_map(|l| l.sockets.first())
            .map(|b| b.local_addr);
        // Every socket, and whether a shutdown may wake its workers by
        // shutting it down for reading (not one made elsewhere).
        let mut all: Vec<(Arc<Socket>, bool)> = Vec::new();
        let mut bound = Vec::with_capacity(listeners.len());
        for prepared in listeners {
            let Some(first) = prepared.sockets.first() else {
                continue;
            };
            let config = Arc::new(Config {
                server_addr: server_addr.unwrap_or(first.local_addr),
                control: prepared.control,
                icmp_reports_off: prepared.sockets.iter().all(|b| b.icmp_reports_off),
                workers,
                ..builder.config(first, limiters.clone())
            });
            let sockets: Vec<Arc<Socket>> = prepared
                .sockets
                .into_iter()
                .map(|b| Arc::new(b.socket))
                .collect();
            #[cfg(all(feature = "xdp", target_os = "linux"))]
            let xdp = match (&builder.xdp, sockets.first()) {
                (Some(xdp), Some(socket)) => {
                    let (attached, queues) = open_xdp(xdp, &config, socket, builder.reply_dscp)?;
                    xdp_attached = Some(attached);
                    queues
                }
                _ => Vec::new(),
            };
            bound.push(Listener {
                config,
                first_socket: all.len(),
                sockets: sockets.clone(),
                #[cfg(all(feature = "xdp", target_os = "linux"))]
                xdp,
            });
            all.extend(sockets.into_iter().map(|s| (s, !prepared.kept)));
        }
        let Some(first) = bound.first() else {
            return Err(Error::invalid(
                "ServerBuilder::bind_all",
                "needs at least one address",
            ));
        };
        let config = first.config.clone();
        let layout = Layout {
            listeners: bound.len(),
            workers: config.workers,
            pool_threads: config.pool().map_or(0, HandlerPool::thread_count),
        };
        let pool = config.pool().map(|p| {
            (
                Arc::new(Pool::new(p.capacity(), p.thread_count())),
                config.drain_timeout(),
            )
        });
        // Each socket's kernel drops are reported in the slot of its
        // worker (the first worker, for a socket shared by all).
        let mut drops = Vec::new();
        let mut listed = Vec::new();
        for (k, listener) in bound.iter().enumerate() {
            // An AF_XDP server's workers report their drops themselves.
            for (j, socket) in listener.sockets.iter().enumerate() {
                if !listener.serves_xdp() {
                    drops.push((layout.worker_slot(k, j), socket.clone()));
                }
            }
            listed.push(ListenerSlots {
                addr: listener.config.local_addr,
                slots: layout.slots_of(k),
                sockets: listener.first_socket..listener.first_socket + listener.sockets.len(),
            });
        }
        // The receive workers' names, by slot, as their threads are named.
        let workers = bound
            .iter()
            .flat_map(|l| {
                let port = l.config.local_addr.port();
                (0..layout.workers).map(move |w| format!("udp:{port}/{w}"))
            })
            .collect();
        let notify = Notify {
            on: builder.notify,
            workers,
        };
        let shared = Shared::new(&all, &drops, listed, layout.slots(), pool, notify);
        #[cfg(all(feature = "xdp", target_os = "linux"))]
        if let Some(queue) = bound.iter().find_map(|l| l.xdp.first()) {
            let _ = shared
                .xdp_mode
                .set(crate::xdp::XdpMode::from_sys(queue.mode()));
        }
        #[cfg(all(feature = "xdp", target_os = "linux"))]
        if let Some(attached) = xdp_attached {
            let _ = shared.xdp_attached.set(attached);
        }
        Ok(Bound {
            listeners: bound,
            config,
            shared,
            layout,
        })
    }

    /// The first listener's address, with the real port when port 0 was
    /// asked for.
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.config.local_addr
    }

    /// Every listener's address, in the order given.
    pub(crate) fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().map(|l| l.config.local_addr).collect()
    }

    /// Whether every socket keeps ICMP reports about earlier replies out
    /// of its receive path.
    pub(crate) fn icmp_reports_off(&self) -> bool {
        self.listeners.iter().all(|l| l.config.icmp_reports_off)
    }

    /// A control for the server, before or while it runs.
    pub(crate) fn control(&self) -> ServerControl {
        ServerControl::new(self.shared.clone(), self.local_addr())
    }
}

impl GreetServer {
    /// Binds a server with default settings to `addr`.
    ///
    /// Port 0 asks the system for a free port: read it back with
    /// [`local_addr`](GreetServer::local_addr).
    ///
    /// # Errors
    ///
    /// As [`ServerBuilder::bind`]: for example [`Error::AddrInUse`] when
    /// another socket holds the address.
    ///
    /// # Examples
    ///
    /// ```
    /// # fn main() -> Result<(), udp_greet::Error> {
    /// let server = udp_greet::GreetServer::bind("127.0.0.1:0")?;
    /// assert_ne!(server.local_addr().port(), 0);
    /// # Ok(())
    /// # }
    /// ```
    pub fn bind<A: ToSocketAddrs + fmt::Debug>(addr: A) -> Result<GreetServer, Error> {
        ServerBuilder::new().bind(addr)
    }

    /// A builder for a server with non-default settings.
    pub fn builder() -> ServerBuilder {
        ServerBuilder::default()
    }

    /// Serves on a socket made elsewhere, with every setting at its default
    /// and the socket's own buffer sizes: `ServerBuilder::new().from_std(socket)`.
    ///
    /// # Errors
    ///
    /// As [`ServerBuilder::from_std`]: [`Error::UnsuitableSocket`] for a
    /// socket that is not a bound UDP socket.
    pub fn from_std(socket: UdpSocket) -> Result<GreetServer, Error> {
        ServerBuilder::new().from_std(socket)
    }

    /// The address the server is bound to, with the real port when port 0
    /// was asked for: the first, for a server on several
    /// ([`local_addrs`](GreetServer::local_addrs)).
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.bound.local_addr()
    }

    /// Every address the server is bound to, in the order given to
    /// [`bind_all`](ServerBuilder::bind_all) (one for a server made with
    /// [`bind`](ServerBuilder::bind)), with the real ports.
    #[must_use]
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.bound.local_addrs()
    }

    /// Where the XDP program of an AF_XDP server
    /// ([`ServerBuilder::xdp`](crate::ServerBuilder::xdp), feature `xdp`)
    /// runs: natively in the driver, or in the generic hook. `None` for a
    /// server on the socket path.
    #[cfg(all(feature = "xdp", target_os = "linux"))]
    #[cfg_attr(docsrs, doc(cfg(all(feature = "xdp", target_os = "linux"))))]
    #[must_use]
    pub fn xdp_mode(&self) -> Option<crate::xdp::XdpMode> {
        self.bound.shared.xdp_mode.get().copied()
    }

    /// The receive buffer size requested and granted (for a server on
    /// several addresses, the first's).
    #[must_use]
    pub fn recv_buffer_size(&self) -> BufferSize {
        self.bound.config.recv_buffer
    }

    /// The send buffer size requested and granted (for a server on
    /// several addresses, the first's).
    #[must_use]
    pub fn send_buffer_size(&self) -> BufferSize {
        self.bound.config.send_buffer
    }

    /// The largest request the server accepts, in bytes (for a server on
    /// several addresses, on the first: unless
    /// [`max_datagram_size`](ServerBuilder::max_datagram_size) sets it,
    /// each listener takes the largest of its own family).
    #[must_use]
    pub fn max_datagram_size(&self) -> usize {
        self.bound.config.max_datagram
    }

    /// Whether ICMP error reports about earlier replies are kept out of
    /// the receive path.
    ///
    /// A reply to a peer that has gone away draws an ICMP message back
    /// ("port unreachable", or "TTL expired in transit" on the way). Either
    /// way the server goes on: a receive that fails with such a report is
    /// counted in [`Stats::recv_errors`] and the next receive follows at
    /// once. This says whether such failures can happen at all.
    ///
    /// # Platform-specific behavior
    ///
    /// Windows reports each ICMP message as an error of the next receive
    /// (`WSAECONNRESET`, `WSAENETRESET`) unless the socket turns
    /// `SIO_UDP_CONNRESET` and `SIO_UDP_NETRESET` off, which the server
    /// asks for on each socket it binds or adopts. A system may refuse
    /// them (Wine 8 refuses `SIO_UDP_NETRESET`): the server is made all the
    /// same, and this is `true` only when both were accepted. Elsewhere it
    /// is `true`: a socket that is not connected is not told of ICMP
    /// messages (unless its maker asked for them, as with `IP_RECVERR` on
    /// a socket given to [`from_std`](GreetServer::from_std) on Linux).
    ///
    /// # Examples
    ///
    /// ```
    /// # fn main() -> Result<(), udp_greet::Error> {
    /// let server = udp_greet::GreetServer::bind("127.0.0.1:0")?;
    /// if !server.icmp_reports_off() {
    ///     eprintln!("ICMP reports will show in Stats::recv_errors");
    /// }
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn icmp_reports_off(&self) -> bool {
        self.bound.icmp_reports_off()
    }

    /// A control that stops the server and reads its counters from another
    /// thread; take it before calling [`serve`](GreetServer::serve).
    #[must_use]
    pub fn control(&self) -> ServerControl {
        self.bound.control()
    }

    /// Runs the server on the calling thread until its [`ServerControl`]
    /// stops it, then returns the final counters.
    ///
    /// For each datagram, `handler` gets the [`Request`] and an empty reply
    /// buffer and returns an [`Action`]. The buffer is reused from one
    /// datagram to the next and made with room for 512 bytes, so a handler
    /// that appends to it allocates nothing once it has grown to its largest
    /// reply (a buffer that grew past 64 KiB, more than UDP carries, is
    /// given back after its datagram). The handler is shared by reference,
    /// so it must be `Fn`, `Send` and `Sync`; per-request state belongs in
    /// the request.
    ///
    /// The handler runs on the worker threads, or on the
    /// [pool](ServerBuilder::handler_pool). Inline, the replies to fast
    /// handlers go out together with the rest of their batch, and a slow
    /// handler call can delay the replies made just before it in its batch
    /// (see [`ServerBuilder::batch_size`] for the exact rule); on a pool, a
    /// reply leaves before its thread takes up the next request, unless
    /// more requests are queued than the pool has threads.
    ///
    /// A handler that panics is caught: the datagram is counted in
    /// [`Stats::handler_panics`] and answered with nothing. The panic still
    /// goes through the process's panic hook, which by default prints it to
    /// standard error. With `panic = "abort"`, a panic ends the process.
    ///
    /// While idle the server sleeps in the kernel; it does not poll.
    ///
    /// # Errors
    ///
    /// [`Error::Spawn`] or [`Error::WorkerPanicked`] only; the loop itself
    /// never fails.
    ///
    /// # Examples
    ///
    /// ```
    /// # fn main() -> Result<(), udp_greet::Error> {
    /// use udp_greet::{GreetClient, GreetServer};
    ///
    /// let server = GreetServer::bind("127.0.0.1:0")?;
    /// let addr = server.local_addr();
    /// let stop = server.control();
    /// let client = std::thread::spawn(move || -> Result<Vec<u8>, udp_greet::Error> {
    ///     let reply = GreetClient::connect(addr)?.send_recv(b"Sarah");
    ///     stop.shutdown();
    ///     reply
    /// });
    /// let stats = server.serve(udp_greet::greet)?;
    /// assert_eq!(client.join().expect("client thread")?, b"Hello, Sarah!");
    /// assert_eq!(stats.replied, 1);
    /// # Ok(())
    /// # }
    /// ```
    pub fn serve<H>(self, handler: H) -> Result<Stats, Error>
    where
        H: Fn(Request<'_>, &mut Vec<u8>) -> Action + Send + Sync + 'static,
    {
        let mut running = self.start(handler, true)?;
        running.finish(None)?;
        Ok(running.shared().snapshot())
    }

    /// Runs the server on a background thread and returns a handle to it.
    ///
    /// See [`serve`](GreetServer::serve) for the handler's contract.
    ///
    /// # Errors
    ///
    /// [`Error::Spawn`] when the thread cannot be started.
    pub fn spawn<H>(self, handler: H) -> Result<ServerHandle, Error>
    where
        H: Fn(Request<'_>, &mut Vec<u8>) -> Action + Send + Sync + 'static,
    {
        self.start(handler, false)
    }

    /// Starts, for each listener, one receive worker per socket (or per
    /// worker, sharing one socket), and the handler pool's threads, on new
    /// threads; for `serve`, the first listener's first receive worker runs
    /// on the calling thread once the others are running.
    fn start<H: HandlerFn>(self, handler: H, on_this_thread: bool) -> Result<ServerHandle, Error> {
        let Bound {
            listeners,
            config,
            shared,
            layout,
        } = self.bound;
        let handler = Arc::new(handler);
        let addr = config.local_addr;
        let pool = shared.pool.as_ref().map(|(pool, _)| pool.clone());
        let sockets: Vec<Arc<Socket>> = listeners
            .iter()
            .flat_map(|l| l.sockets.iter().cloned())
            .collect();
        // With a pool, the handle keeps the sockets open until the pool has
        // drained; handler threads hold them weakly. A server that can hand
        // off keeps them to give them back.
        if pool.is_some() || shared.can_hand_off() {
            shared.keep_open(sockets.clone());
        }
        let weak: Vec<Weak<Socket>> = sockets.iter().map(Arc::downgrade).collect();
        drop(sockets);
        let mut handle = ServerHandle::new(shared.clone(), addr);
        let spawn = |handle: &mut ServerHandle, name: String, run: Box<dyn FnOnce() + Send>| {
            let end = ThreadEnd(shared.clone());
            let spawned = thread::Builder::new().name(name).spawn(move || {
                let _end = end;
                run();
            });
            match spawned {
                Ok(thread) => {
                    handle.started(Some(thread));
                    Ok(())
                }
                // `handle` stops the threads already started when it is
                // dropped (and they end on their own).
                Err(source) => Err(Error::Spawn { addr, source }),
            }
        };
        if let Some(pool) = &pool {
            // Which listener each of the server's sockets belongs to.
            let socket_listener: Arc<[usize]> = listeners
                .iter()
                .enumerate()
                .flat_map(|(k, l)| std::iter::repeat_n(k, l.sockets.len()))
                .collect();
            let configs: Arc<[Arc<Config>]> = listeners.iter().map(|l| l.config.clone()).collect();
            for t in 0..layout.pool_threads {
                let thread = PoolThread {
                    slots: (0..layout.listeners)
                        .map(|k| layout.pool_slot(t, k))
                        .collect(),
                    pool: pool.clone(),
                    handler: handler.clone(),
                    configs: configs.clone(),
                    socket_listener: socket_listener.clone(),
                    shared: shared.clone(),
                    sockets: weak.clone(),
                };
                // `udp:PORT/hN`: fits Linux's 15-byte thread names for ports
                // and pools of up to 999 threads.
                spawn(
                    &mut handle,
                    format!("udp:{}/h{t}", addr.port()),
                    Box::new(move || thread.run()),
                )?;
            }
        }
        // Every listener has a socket, so each gets all its workers.
        shared.expect_receivers(layout.listeners * layout.workers);
        // Moved out, so that the workers (and, with a pool, the handle) hold
        // the only strong references, and each socket closes when the last
        // of them is done.
        let mut inline = None;
        for (k, listener) in listeners.into_iter().enumerate() {
            let port = listener.config.local_addr.port();
            // The first workers take the receive queues' AF_XDP sockets.
            #[cfg(all(feature = "xdp", target_os = "linux"))]
            let mut xdp = listener.xdp.into_iter();
            for index in 0..layout.workers {
                // One socket per worker, or one shared by all.
                let own = index < listener.sockets.len();
                let Some(socket) = listener
                    .sockets
                    .get(index)
                    .or(listener.sockets.first())
                    .cloned()
                else {
                    break;
                };
                let worker = ReceiveWorker {
                    index: layout.worker_slot(k, index),
                    socket,
                    socket_index: listener.first_socket + if own { index } else { 0 },
                    handler: handler.clone(),
                    config: listener.config.clone(),
                    shared: shared.clone(),
                    pool: pool.clone(),
                    reports_drops: own,
                    #[cfg(all(feature = "xdp", target_os = "linux"))]
                    xdp: xdp.next(),
                };
                if on_this_thread && inline.is_none() {
                    inline = Some(worker);
                    continue;
                }
                // `udp:PORT/N`: fits Linux's 15-byte thread names, and tells
                // servers apart in `top -H`.
                spawn(
                    &mut handle,
                    format!("udp:{port}/{index}"),
                    Box::new(move || worker.run()),
                )?;
            }
        }
        shared.start_watchdog(format!("udp:{}/wd", addr.port()))?;
        if let Some(worker) = inline {
            handle.started(None);
            let _end = ThreadEnd(shared.clone());
            worker.run();
        }
        Ok(handle)
    }
}
