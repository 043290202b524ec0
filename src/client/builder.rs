//! The client builder: timeouts, retries, the reply check, buffer sizes;
//! one builder for both clients, whose engine parameter says which one it
//! makes.

use std::fmt;
use std::marker::PhantomData;
use std::net::ToSocketAddrs;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::exchange::Peer;
use super::{GreetClient, State};
use crate::engine::{Blocking, Engine};
use crate::error::Error;
use crate::socket::{self, SocketOptions};

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

/// A reply check: `(request, reply) -> bool`.
pub(crate) type ReplyCheck = Arc<dyn Fn(&[u8], &[u8]) -> bool + Send + Sync>;

/// How a client waits, resends and checks replies; fixed when it connects.
#[derive(Clone)]
pub(crate) struct Settings {
    pub(crate) timeout: Duration,
    pub(crate) retries: u32,
    pub(crate) deadline: Option<Duration>,
    pub(crate) jitter: f64,
    pub(crate) check: Option<ReplyCheck>,
    pub(crate) refused_as_loss: bool,
    pub(crate) busy_poll: Option<Duration>,
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("timeout", &self.timeout)
            .field("retries", &self.retries)
            .field("deadline", &self.deadline)
            .field("jitter", &self.jitter)
            .field("reply_check", &self.check.is_some())
            .field("refused_as_loss", &self.refused_as_loss)
            .field("busy_poll", &self.busy_poll)
            .finish()
    }
}

/// Configures and connects a client: a blocking [`GreetClient`], or with
/// the feature `tokio` an async `udp_greet::tokio::GreetClient`.
///
/// A call sends the request and waits up to [`timeout`](ClientBuilder::timeout)
/// for a reply that passes the [reply check](ClientBuilder::reply_check);
/// on silence it sends again, each wait twice the one before give or take
/// the [jitter](ClientBuilder::jitter), until [`retries`](ClientBuilder::retries)
/// are spent or the [`deadline`](ClientBuilder::deadline) for the whole call
/// passes.
///
/// ```
/// # fn main() -> Result<(), udp_greet::Error> {
/// # let server = udp_greet::GreetServer::bind("127.0.0.1:0")?.spawn(udp_greet::greet)?;
/// # let addr = server.local_addr();
/// use std::time::Duration;
///
/// let client = udp_greet::GreetClient::builder()
///     .timeout(Duration::from_millis(200))
///     .retries(4)
///     .deadline(Duration::from_secs(2))
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

    /// Makes a socket of the server's address family, bound to an ephemeral
    /// port, and connects it to `addr` (the first address it resolves to
    /// that works).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for a setting out of range,
    /// [`Error::Resolve`] when `addr` does not resolve, [`Error::Socket`] or
    /// [`Error::Io`] when the socket cannot be made or connected.
    pub fn connect<A: ToSocketAddrs + fmt::Debug>(self, addr: A) -> Result<GreetClient, Error> {
        self.validate()?;
        let addrs = socket::resolve(addr)?;
        socket::first_ok(&addrs, |peer| {
            let made = socket::connect(peer, &self.socket)?;
            let seed = seed(made.local_addr.port());
            Ok(GreetClient {
                socket: made.socket,
                local_addr: made.local_addr,
                recv_buffer: made.recv_buffer,
                send_buffer: made.send_buffer,
                peer: Peer::new(peer, self.settings.clone()),
                state: Mutex::new(State::new(seed)),
            })
        })
    }
}

impl<E: Engine> ClientBuilder<E> {
    /// A builder for engine `E` with every setting at its default.
    pub(crate) fn with_defaults() -> Self {
        ClientBuilder {
            socket: SocketOptions::default(),
            settings: Settings {
                timeout: Duration::from_secs(1),
                retries: 2,
                deadline: Some(Duration::from_secs(10)),
                jitter: 0.2,
                check: None,
                refused_as_loss: false,
                busy_poll: None,
            },
            max_in_flight: DEFAULT_CLIENT_MAX_IN_FLIGHT,
            engine: PhantomData,
        }
    }

    /// How long the first attempt waits for a reply; each retry waits about
    /// twice as long as the one before. Must not be zero; a wait under 1 µs
    /// (the finest a socket timeout can be set) waits 1 µs, and on Windows,
    /// whose socket timeouts are whole milliseconds, a wait under 1 ms
    /// waits 1 ms.
    ///
    /// Defaults to 1 second.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.settings.timeout = timeout;
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

    /// The longest one call may take, all attempts together; the last wait
    /// is cut short to end there. Must not be zero. `None` turns the
    /// deadline off: a call then ends after its attempts' waits alone (with
    /// the default timeout and retries, about 7 seconds; with many retries,
    /// the doubling waits can add up to a very long time).
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let builder = udp_greet::GreetClient::builder().deadline(Duration::from_secs(3));
    /// let no_deadline = udp_greet::GreetClient::builder().deadline(None);
    /// # let _ = (builder, no_deadline);
    /// ```
    ///
    /// Defaults to 10 seconds.
    pub fn deadline(mut self, deadline: impl Into<Option<Duration>>) -> Self {
        self.settings.deadline = deadline.into();
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
    /// UDP carries no request ids, so a reply delayed past its timeout, or a
    /// duplicate, can arrive while the client waits for the answer to a
    /// later request. The client discards what is queued before each
    /// request, but only a check that ties the reply to the request (for
    /// [`greet`](crate::greet), [`is_greeting`](crate::is_greeting)) rules
    /// out a wrong answer.
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
    /// to be woken. Every other setting holds unchanged: the timeout and
    /// retries, the deadline, the reply check, the discarding of stale
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

    /// Sets `SO_BUSY_POLL` on the client's socket: on a blocking receive
    /// that finds nothing, the kernel polls the network device's queue for
    /// up to `duration` before it sleeps. For sockets whose traffic comes
    /// through a NIC driver that supports busy polling; it does nothing on
    /// loopback. Raising it above `net.core.busy_read` needs
    /// `CAP_NET_ADMIN`.
    ///
    /// # Platform-specific behavior
    ///
    /// Linux only: `connect` fails with [`Error::Socket`] elsewhere.
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

    /// Checks every setting; each engine's `connect` calls it first.
    pub(crate) fn validate(&self) -> Result<(), Error> {
        let invalid = |setting, reason| Err(Error::InvalidConfig { setting, reason });
        if self.settings.timeout.is_zero() {
            return invalid("ClientBuilder::timeout", "must be greater than zero");
        }
        if self.settings.deadline.is_some_and(|d| d.is_zero()) {
            return invalid("ClientBuilder::deadline", "must be greater than zero");
        }
        if !(1..=MAX_CLIENT_IN_FLIGHT).contains(&self.max_in_flight) {
            return invalid(
                "ClientBuilder::max_in_flight",
                "must be between 1 and 65536",
            );
        }
        if !(0.0..=1.0).contains(&self.settings.jitter) {
            return invalid("ClientBuilder::jitter", "must be between 0 and 1");
        }
        Ok(())
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
