//! The client builder: timeouts, retries, the reply check, buffer sizes;
//! one builder for both clients, whose engine parameter says which one it
//! makes.

use std::fmt;
use std::marker::PhantomData;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::demux::RequestId;
use super::exchange::Shared;
use super::mux::MuxSocket;
use super::{GreetClient, Io, State, Turn};
use crate::engine::{Blocking, Engine};
use crate::error::Error;
use crate::socket::{self, SocketOptions};
use crate::sys;
use crate::tokens::{Format, TokenFormat};

/// How many calls an async client (`udp_greet::tokio::GreetClient`, feature
/// `tokio`) has in flight at once unless its builder's `max_in_flight` says
/// otherwise: 256.
///
/// Each call in flight holds a socket, so this is also the most file
/// descriptors the client takes: well within the usual limit of 1024 per
/// process, and enough for 25 000 calls a second to a server that answers
/// in 10 ms.
pub const DEFAULT_CLIENT_MAX_IN_FLIGHT: usize = 256;

/// The largest `max_in_flight` of an async client's builder.
const MAX_CLIENT_IN_FLIGHT: usize = 65_536;

/// The most sockets multiplexed calls share.
const MAX_SOCKETS: usize = 1024;

/// A reply check: `(request, reply) -> bool`.
pub(crate) type ReplyCheck = Arc<dyn Fn(&[u8], &[u8]) -> bool + Send + Sync>;

/// How a client waits, resends and checks replies; fixed when it connects.
#[derive(Clone)]
pub(crate) struct Settings {
    pub(crate) initial_timeout: Duration,
    pub(crate) retries: u32,
    pub(crate) call_timeout: Option<Duration>,
    pub(crate) jitter: f64,
    pub(crate) check: Option<ReplyCheck>,
    pub(crate) refused_as_loss: bool,
    pub(crate) busy_poll: Option<Duration>,
    /// Reads the id of a request and of a reply: calls are multiplexed.
    pub(crate) request_id: Option<RequestId>,
    /// Where the protocol carries source tokens: the client remembers
    /// each server's and sends it with its requests.
    pub(crate) tokens: Option<Format>,
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("initial_timeout", &self.initial_timeout)
            .field("retries", &self.retries)
            .field("call_timeout", &self.call_timeout)
            .field("jitter", &self.jitter)
            .field("reply_check", &self.check.is_some())
            .field("refused_as_loss", &self.refused_as_loss)
            .field("busy_poll", &self.busy_poll)
            .field("request_id", &self.request_id.is_some())
            .field("source_tokens", &self.tokens.is_some())
            .finish()
    }
}

/// Configures and connects a client: a blocking [`GreetClient`], or with
/// the feature `tokio` an async `udp_greet::tokio::GreetClient`.
///
/// A call sends the request and waits up to [`initial_timeout`](ClientBuilder::initial_timeout)
/// for a reply that passes the [reply check](ClientBuilder::reply_check);
/// on silence it sends again, each wait twice the one before give or take
/// the [jitter](ClientBuilder::jitter), until [`retries`](ClientBuilder::retries)
/// are spent or the [`call_timeout`](ClientBuilder::call_timeout) for the whole call
/// passes.
///
/// ```
/// # fn main() -> Result<(), udp_greet::Error> {
/// # let server = udp_greet::GreetServer::bind("127.0.0.1:0")?.spawn(udp_greet::greet)?;
/// # let addr = server.local_addr();
/// use std::time::Duration;
///
/// let client = udp_greet::GreetClient::builder()
///     .initial_timeout(Duration::from_millis(200))
///     .retries(4)
///     .call_timeout(Duration::from_secs(2))
///     .reply_check(udp_greet::is_greeting)
///     .connect(addr)?;
/// assert_eq!(client.send_recv(b"Sarah")?, b"Hello, Sarah!");
/// # Ok(())
/// # }
/// ```
///
/// # Engines
///
/// The parameter `E` says which client the builder makes, and so which
/// settings it has: [`Blocking`] (the default; from
/// [`GreetClient::builder`] or [`ClientBuilder::new`]) connects a
/// [`GreetClient`], and `udp_greet::tokio::Tokio` (feature `tokio`; from
/// `udp_greet::tokio::GreetClient::builder()`) connects an async client
/// with `connect(addr).await`, and adds `max_in_flight`. Every other setting
/// is the same for both.
///
/// A setting of the async client cannot be set for a blocking one:
///
/// ```compile_fail,E0599
/// let _builder = udp_greet::GreetClient::builder().max_in_flight(8);
/// ```
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until `connect` is called"]
pub struct ClientBuilder<E: Engine = Blocking> {
    pub(crate) socket: SocketOptions,
    pub(crate) settings: Settings,
    /// Only the async engine's builder sets it.
    pub(crate) max_in_flight: usize,
    /// Sockets shared by multiplexed calls.
    pub(crate) sockets: usize,
    engine: PhantomData<E>,
}

/// Only the blocking builder has a default, so that
/// `ClientBuilder::default()` names one type with or without the feature
/// `tokio`.
impl Default for ClientBuilder<Blocking> {
    fn default() -> Self {
        Self::with_defaults()
    }
}

impl ClientBuilder<Blocking> {
    /// A builder for a blocking [`GreetClient`] with every setting at its
    /// default; the same as [`GreetClient::builder`] and
    /// [`ClientBuilder::default`]. Only the blocking builder has these, so
    /// the engine need not be named:
    ///
    /// ```
    /// use udp_greet::ClientBuilder;
    ///
    /// let builder = ClientBuilder::new().retries(5);
    /// let same = ClientBuilder::default().retries(5);
    /// # let _ = (builder, same);
    /// ```
    pub fn new() -> Self {
        Self::with_defaults()
    }

    /// Makes a client for the server at `addr` (the first address it
    /// resolves to that works): a socket of the server's address family,
    /// bound to an ephemeral port and connected to the server (with
    /// [`sockets(n)`](ClientBuilder::sockets), `n` of them).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for a setting out of range,
    /// [`Error::Resolve`] when `addr` does not resolve, [`Error::Socket`] or
    /// [`Error::Io`] when the socket cannot be made or connected.
    pub fn connect<A: ToSocketAddrs + fmt::Debug>(self, addr: A) -> Result<GreetClient, Error> {
        self.validate()?;
        let addrs = socket::resolve(addr)?;
        socket::first_ok(&addrs, |peer| self.make(Some(peer), peer))
    }

    /// Makes a client for many servers: an unconnected socket bound to
    /// `local` (port 0 for an ephemeral one), called with
    /// [`send_recv_to(addr, request)`](GreetClient::send_recv_to). Its
    /// address family decides the servers it can reach: `"0.0.0.0:0"` or
    /// `"127.0.0.1:0"` reaches IPv4 servers, `"[::]:0"` IPv6 ones and (as a
    /// dual-stack socket, the default) IPv4 ones too.
    ///
    /// A reply counts only if it comes from the address its call was sent
    /// to: a datagram from anyone else is discarded and counted. Without
    /// request ids the blocking client runs its calls one at a time on its
    /// one socket, each call waiting for its turn within its call timeout,
    /// and the async client gives each call a socket connected to its
    /// server. With [`request_id`](ClientBuilder::request_id), calls to any
    /// servers are in flight together on the shared sockets, and a reply
    /// goes to the call with its sender's address and id.
    ///
    /// # Platform-specific behavior
    ///
    /// On Linux an ICMP "port unreachable" is matched to its destination
    /// (and, with request ids, to its call by the id in the start of the
    /// refused request the kernel returns; `IP_RECVERR`), so one server's
    /// refusal fails only the calls to it. Elsewhere an unconnected socket
    /// is not told which destination refused: calls to a closed port end in
    /// [`Error::Timeout`] instead of [`Error::Refused`] (except the async
    /// client's without request ids, whose sockets are connected).
    ///
    /// # Errors
    ///
    /// As [`connect`](ClientBuilder::connect); [`Error::AddrInUse`] or
    /// [`Error::Bind`] when `local` cannot be bound, and
    /// [`Error::InvalidConfig`] for several sockets on one fixed port.
    pub fn bind<A: ToSocketAddrs + fmt::Debug>(self, local: A) -> Result<GreetClient, Error> {
        self.validate()?;
        let addrs = socket::resolve(local)?;
        socket::first_ok(&addrs, |local| self.make(None, local))
    }

    /// A client connected to `peer`, or bound to `local` without one.
    fn make(&self, peer: Option<SocketAddr>, local: SocketAddr) -> Result<GreetClient, Error> {
        self.check_fixed_port(peer, local)?;
        let one = |_| self.socket_for(peer, local);
        let first = one(0)?;
        let seed = seed(first.bound.local_addr.port());
        let (local_addr, recv_buffer, send_buffer) = (
            first.bound.local_addr,
            first.bound.recv_buffer,
            first.bound.send_buffer,
        );
        let io = match self.settings.request_id {
            None => Io::Single {
                socket: first.bound.socket,
                turn: Turn::default(),
                state: Mutex::new(State::default()),
                rng: AtomicU64::new(seed),
            },
            Some(_) => {
                let mut sockets = vec![first.into_mux(peer)];
                for i in 1..self.sockets {
                    sockets.push(one(i)?.into_mux(peer));
                }
                Io::Mux {
                    sockets: sockets.into_boxed_slice(),
                    rng: AtomicU64::new(seed),
                    hasher: std::collections::hash_map::RandomState::new(),
                }
            }
        };
        Ok(GreetClient {
            local_addr,
            recv_buffer,
            send_buffer,
            peer,
            shared: Shared::new(self.settings.clone()),
            io,
        })
    }

    /// One of the client's sockets: connected to `peer`, or bound to
    /// `local`; unconnected sockets report ICMP errors per destination
    /// where the platform can.
    fn socket_for(
        &self,
        peer: Option<SocketAddr>,
        local: SocketAddr,
    ) -> Result<ClientSocket, Error> {
        let bound = match peer {
            Some(peer) => socket::connect(peer, &self.socket)?,
            None => socket::bind_client(local, &self.socket)?,
        };
        let recverr = if peer.is_none() {
            sys::enable_recverr(&bound.socket, local.is_ipv6()).map_err(|source| Error::Socket {
                action: "set IP_RECVERR",
                addr: local,
                source,
            })?
        } else {
            false
        };
        Ok(ClientSocket { bound, recverr })
    }
}

/// A client's socket as made.
struct ClientSocket {
    bound: socket::BoundSocket,
    recverr: bool,
}

impl ClientSocket {
    fn into_mux(self, peer: Option<SocketAddr>) -> MuxSocket {
        MuxSocket::new(self.bound.socket, peer, self.recverr, self.bound.local_addr)
    }
}

impl<E: Engine> ClientBuilder<E> {
    /// A builder for engine `E` with every setting at its default.
    pub(crate) fn with_defaults() -> Self {
        ClientBuilder {
            socket: SocketOptions::default(),
            settings: Settings {
                initial_timeout: Duration::from_secs(1),
                retries: 2,
                call_timeout: Some(Duration::from_secs(10)),
                jitter: 0.2,
                check: None,
                refused_as_loss: false,
                busy_poll: None,
                request_id: None,
                tokens: None,
            },
            max_in_flight: DEFAULT_CLIENT_MAX_IN_FLIGHT,
            sockets: 1,
            engine: PhantomData,
        }
    }

    /// How long the first attempt waits for a reply; each retry waits about
    /// twice as long as the one before. Must not be zero; a wait under 1 µs
    /// (the finest a socket timeout can be set) waits 1 µs, and on Windows,
    /// whose socket timeouts are whole milliseconds, a wait under 1 ms
    /// waits 1 ms.
    ///
    /// This is not a bound on the whole call: that is
    /// [`call_timeout`](ClientBuilder::call_timeout). (Before 0.2 this
    /// setting was named `timeout`.)
    ///
    /// Defaults to 1 second.
    pub fn initial_timeout(mut self, wait: Duration) -> Self {
        self.settings.initial_timeout = wait;
        self
    }

    /// How many times a request is sent again when no reply comes: a call
    /// makes at most `retries + 1` attempts.
    ///
    /// Defaults to 2 (3 attempts; with the default timeout, waits of about
    /// 1, 2 and 4 seconds).
    pub fn retries(mut self, retries: u32) -> Self {
        self.settings.retries = retries;
        self
    }

    /// The longest one call may take, all attempts together, as
    /// `tokio::time::timeout` bounds a future: the last wait is cut short to
    /// end there. Must not be zero. `None` turns the bound off: a call then
    /// ends after its attempts' waits alone (with the default
    /// [`initial_timeout`](ClientBuilder::initial_timeout) and retries, about
    /// 7 seconds; with many retries, the doubling waits can add up to a very
    /// long time). (Before 0.2 this setting was named `deadline`.)
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let builder = udp_greet::GreetClient::builder().call_timeout(Duration::from_secs(3));
    /// let unbounded = udp_greet::GreetClient::builder().call_timeout(None);
    /// # let _ = (builder, unbounded);
    /// ```
    ///
    /// Defaults to 10 seconds.
    pub fn call_timeout(mut self, limit: impl Into<Option<Duration>>) -> Self {
        self.settings.call_timeout = limit.into();
        self
    }

    /// Spreads the retries' waits at random over ± `fraction` of their
    /// nominal length (the first attempt's wait is exact), so that clients
    /// that lost replies at the same moment do not all resend in step. Must
    /// be between 0 and 1; 0 turns jitter off.
    ///
    /// Defaults to 0.2.
    pub fn jitter(mut self, fraction: f64) -> Self {
        self.settings.jitter = fraction;
        self
    }

    /// Accepts as the reply only a datagram for which `check(request, reply)`
    /// returns `true`; any other datagram that arrives is discarded (and
    /// counted in [`GreetClient::discarded`]) and the wait goes on.
    ///
    /// UDP itself carries no request ids, so a reply delayed past its
    /// timeout, or a duplicate, can arrive while the client waits for the
    /// answer to a later request. The client discards what is queued before
    /// each request, but only a check that ties the reply to the request (for
    /// [`greet`](crate::greet), [`is_greeting`](crate::is_greeting)) rules
    /// out a wrong answer. With [`request_id`](ClientBuilder::request_id),
    /// a reply must carry its call's id and also pass this check.
    ///
    /// A check that panics: without ids it runs in the call, and the panic
    /// reaches the caller; with ids it runs wherever the datagram is
    /// received, on behalf of any call, so the panic is caught there and
    /// the datagram discarded (counted in [`GreetClient::discarded`]), as
    /// one that fails the check.
    ///
    /// Defaults to accepting any datagram from the server.
    pub fn reply_check<F>(mut self, check: F) -> Self
    where
        F: Fn(&[u8], &[u8]) -> bool + Send + Sync + 'static,
    {
        self.settings.check = Some(Arc::new(check));
        self
    }

    /// Treats an ICMP "port unreachable" like a lost reply: the client keeps
    /// waiting and retrying instead of returning [`Error::Refused`] at once.
    ///
    /// ICMP messages are not authenticated: anyone on the path, or anyone
    /// who can guess the client's port, can forge one and make a client that
    /// believes them give up. Turn this on where that matters more than
    /// failing fast when the server is down; a call against a port that
    /// really is closed then ends in [`Error::Timeout`].
    ///
    /// Defaults to `false`.
    pub fn refused_as_loss(mut self, on: bool) -> Self {
        self.settings.refused_as_loss = on;
        self
    }

    /// Latency mode: after each send, the client polls for the reply
    /// without blocking for up to `window` (or the attempt's wait, if that
    /// is shorter), then blocks as usual for the rest of the wait. A reply
    /// that comes within the window is taken without waiting for the thread
    /// to be woken. Every other setting holds unchanged: the initial timeout and
    /// retries, the call timeout, the reply check, the discarding of stale
    /// datagrams and [`refused_as_loss`](ClientBuilder::refused_as_loss).
    ///
    /// The calling thread uses a whole core while it polls. It pays with a
    /// core to spare and a server that answers within the window; with more
    /// polling threads than cores, latency gets worse, not better. `None` (or
    /// zero) turns it off.
    ///
    /// In latency mode the check for stale datagrams runs right after the
    /// first send, while the request is in flight, instead of before it,
    /// where it would add a system call to every round trip. A datagram it
    /// finds came before the request, or is a reply faster than the check:
    /// one that passes the [reply check](ClientBuilder::reply_check) is
    /// taken as the reply, the others are discarded, and then the request is
    /// sent again at once (counted in [`Error::Timeout`]'s attempts), so a
    /// reply discarded that way costs a round trip, not a timeout.
    ///
    /// The async client (feature `tokio`) polls too,
    /// yielding to the runtime between tries, so that its other tasks
    /// still run.
    ///
    /// # Platform-specific behavior
    ///
    /// Outside Unix a receive cannot be told not to wait, so each poll
    /// switches the socket to non-blocking mode and back: correct, but far
    /// slower.
    ///
    /// Defaults to off.
    pub fn busy_poll(mut self, window: impl Into<Option<Duration>>) -> Self {
        self.settings.busy_poll = window.into().filter(|w| !w.is_zero());
        self
    }

    /// Multiplexes calls by request id: `read(datagram)` returns the id
    /// a request or a reply carries (`None`: it carries none).
    ///
    /// With it, calls share the client's few sockets
    /// ([`sockets`](ClientBuilder::sockets), default 1): the blocking
    /// client, shared by many threads, and the async client have many calls
    /// in flight at once on one socket, as DNS, NTP, SNMP, STUN, RADIUS and
    /// memcached's UDP protocol expect of a client. Each reply goes to the
    /// call in flight whose request went to the reply's sender and carried
    /// its id, and must pass that call's
    /// [reply check](ClientBuilder::reply_check). A reply that matches no
    /// call in flight (no id, an unknown one, from another address, or a
    /// late reply to a call that has ended) is discarded and counted
    /// ([`GreetClient::unmatched`]); so is a duplicate.
    ///
    /// - **Ids must be unique among the calls in flight to one server.** A
    ///   call whose id is that of a call in flight to the same address is
    ///   refused at once with [`Error::IdInUse`] (it is not queued): use a
    ///   counter, or random ids and pick again on that error. A request
    ///   whose id cannot be read is refused with [`Error::NoRequestId`].
    /// - **An id's late reply can reach its next call.** Once a call ends
    ///   (its reply came, it timed out, or its future was dropped), a
    ///   later reply with its id matches nothing, until another call takes
    ///   the same id; a reply check that ties the reply to its request
    ///   (or ids that do not repeat soon) keeps that call from taking it.
    /// - `read` runs wherever a datagram is received, on behalf of any
    ///   call: if it panics on a datagram, the panic is caught and the
    ///   datagram discarded (counted in [`GreetClient::unmatched`]).
    /// - Stale datagrams need no discarding before a request, so latency
    ///   mode sends without the check of stale datagrams it makes on a
    ///   socket of its own.
    ///
    /// Without this setting a client keeps one call per socket, as the
    /// greet protocol, which has no ids, needs.
    ///
    /// ```
    /// # fn main() -> Result<(), udp_greet::Error> {
    /// # let echo = |request: udp_greet::Request<'_>, reply: &mut Vec<u8>| {
    /// #     reply.extend_from_slice(request.data());
    /// #     udp_greet::Action::Reply
    /// # };
    /// # let server = udp_greet::GreetServer::bind("127.0.0.1:0")?.spawn(echo)?;
    /// # let addr = server.local_addr();
    /// // A protocol whose first two bytes are the id, big-endian.
    /// let client = udp_greet::GreetClient::builder()
    ///     .request_id(|datagram| Some(u64::from(u16::from_be_bytes([*datagram.first()?, *datagram.get(1)?]))))
    ///     .connect(addr)?;
    /// std::thread::scope(|s| {
    ///     for id in 0..8u16 {
    ///         let client = &client;
    ///         s.spawn(move || {
    ///             let request = [&id.to_be_bytes()[..], b"ping"].concat();
    ///             assert_eq!(client.send_recv(&request).ok(), Some(request));
    ///         });
    ///     }
    /// });
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// Defaults to none: calls are not multiplexed.
    pub fn request_id<F>(mut self, read: F) -> Self
    where
        F: Fn(&[u8]) -> Option<u64> + Send + Sync + 'static,
    {
        self.settings.request_id = Some(Arc::new(read));
        self
    }

    /// Source tokens ([`SourceTokens`](crate::SourceTokens) on the server),
    /// carried as `format` says: the client remembers the token of the last
    /// reply it accepted from each server, per server address, and writes
    /// it into every request to that server with [`TokenFormat::write`], so
    /// that the server treats it as validated (a server with
    /// [`in_replies`](crate::SourceTokens::in_replies) puts a token in
    /// every reply).
    ///
    /// A datagram from the server that the format calls a
    /// [challenge](TokenFormat::is_challenge) makes the call send its
    /// request again at once with the challenge's token (once per attempt;
    /// a second challenge waits for the attempt's timeout), and is counted
    /// in [`GreetClient::challenges`](crate::GreetClient::challenges). A
    /// challenge is not held to the reply check, and its token serves that
    /// one resend only, never remembered: anyone who can send "from" the
    /// server can forge a challenge, and a forged one costs one attempt. A
    /// reply the client accepts is trusted, token and all: a
    /// [reply check](ClientBuilder::reply_check) or request ids that tie a
    /// reply to its request keep forged replies, and their tokens, out.
    /// Tokens longer than 256 bytes are ignored.
    ///
    /// The reply check and the request-id reader see the request as the
    /// caller gave it (the token is written into a copy), and each datagram
    /// as it came, token and all; a challenge is routed by its id like any
    /// reply. The client remembers up to 4096 servers' tokens.
    ///
    /// Defaults to none.
    pub fn source_tokens(mut self, format: impl TokenFormat) -> Self {
        self.settings.tokens = Some(Format::new(format));
        self
    }

    /// How many sockets the calls of a client with
    /// [`request_id`](ClientBuilder::request_id) share: each call goes on
    /// one of them, picked by its destination and id. More than one spreads
    /// the receive work of a very busy client (and its source ports) at the
    /// cost of descriptors. Must be between 1 and 1024, and 1 without
    /// request ids.
    ///
    /// Defaults to 1.
    pub fn sockets(mut self, count: usize) -> Self {
        self.sockets = count;
        self
    }

    /// Sets `SO_BUSY_POLL` on the client's socket: on a blocking receive
    /// that finds nothing, the kernel polls the network device's queue for
    /// up to `duration` before it sleeps. For sockets whose traffic comes
    /// through a NIC driver that supports busy polling; it does nothing on
    /// loopback. Raising it above `net.core.busy_read` needs
    /// `CAP_NET_ADMIN`.
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

    /// Requests a receive buffer (`SO_RCVBUF`) of `bytes` (at most
    /// `i32::MAX`, the largest the option takes).
    ///
    /// Defaults to the system default.
    pub fn recv_buffer_size(mut self, bytes: usize) -> Self {
        self.socket.recv_buffer = Some(bytes);
        self
    }

    /// Requests a send buffer (`SO_SNDBUF`) of `bytes` (at most `i32::MAX`).
    ///
    /// Defaults to the system default.
    pub fn send_buffer_size(mut self, bytes: usize) -> Self {
        self.socket.send_buffer = Some(bytes);
        self
    }

    /// Several sockets cannot all be bound to one fixed port.
    pub(crate) fn check_fixed_port(
        &self,
        peer: Option<SocketAddr>,
        local: SocketAddr,
    ) -> Result<(), Error> {
        if peer.is_none() && local.port() != 0 && self.sockets > 1 {
            return Err(Error::invalid_for(
                "ClientBuilder::sockets",
                local,
                "several sockets cannot share one fixed local port: bind to port 0",
            ));
        }
        Ok(())
    }

    /// Checks every setting; each engine's `connect` calls it first.
    pub(crate) fn validate(&self) -> Result<(), Error> {
        let invalid = |setting, reason| Err(Error::invalid(setting, reason));
        if self.settings.initial_timeout.is_zero() {
            return invalid(
                "ClientBuilder::initial_timeout",
                "must be greater than zero",
            );
        }
        if self.settings.call_timeout.is_some_and(|d| d.is_zero()) {
            return invalid("ClientBuilder::call_timeout", "must be greater than zero");
        }
        if !(1..=MAX_CLIENT_IN_FLIGHT).contains(&self.max_in_flight) {
            return invalid(
                "ClientBuilder::max_in_flight",
                "must be between 1 and 65536",
            );
        }
        if !(1..=MAX_SOCKETS).contains(&self.sockets) {
            return invalid("ClientBuilder::sockets", "must be between 1 and 1024");
        }
        if self.sockets > 1 && self.settings.request_id.is_none() {
            return invalid(
                "ClientBuilder::sockets",
                "more than one socket needs request_id: without ids a client has one socket per call",
            );
        }
        if !(0.0..=1.0).contains(&self.settings.jitter) {
            return invalid("ClientBuilder::jitter", "must be between 0 and 1");
        }
        self.socket
            .check_so_busy_poll("ClientBuilder::so_busy_poll")
    }
}

/// A seed for the jitter: different per client and per run. Not for
/// anything secret.
pub(crate) fn seed(port: u16) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    (nanos ^ (u64::from(port) << 48)) | 1
}
