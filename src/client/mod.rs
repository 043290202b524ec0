//! The client: one connected socket, request out, reply back, with
//! timeouts, retries and a reply check.

pub(crate) mod builder;
pub(crate) mod exchange;

pub use builder::{ClientBuilder, DEFAULT_CLIENT_MAX_IN_FLIGHT};

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use socket2::Socket;

use crate::engine::Blocking;
use crate::error::{self, Error};
use crate::socket::BufferSize;
use crate::sys;
use exchange::{Exchange, Peer, Queue, Step, call_seed};

/// Room for any UDP payload, IPv4 or IPv6.
pub(crate) const MAX_REPLY: usize = 65_536;

/// The shortest wait the client asks the kernel for. A socket read timeout
/// is set in whole microseconds (whole milliseconds on Windows), and one
/// that rounds to zero means "wait forever"; every wait the client sets is
/// at least this long.
pub(crate) const MIN_WAIT: Duration = crate::sys::MIN_READ_TIMEOUT;

/// A UDP client connected to one server.
///
/// The socket is connected, so the kernel drops datagrams from anyone but
/// the server, and an ICMP "port unreachable" from the server's host is
/// reported at once as [`Error::Refused`].
///
/// UDP may lose, duplicate or reorder datagrams. A call sends the request,
/// waits for a reply up to the timeout, and sends the request again on
/// silence, doubling the wait each time (with jitter), up to the configured
/// retries and deadline; see [`ClientBuilder`]. Before each request it
/// discards any datagram already queued (a late reply to an earlier request,
/// or a duplicate; in [latency mode](ClientBuilder::busy_poll), right after
/// sending it), and a [reply check](ClientBuilder::reply_check) rejects
/// any datagram that is not the answer to this request.
///
/// Calls from several threads on one client are serialised; use one client
/// per thread for parallel requests.
///
/// # Examples
///
/// ```
/// # fn main() -> Result<(), udp_greet::Error> {
/// # let server = udp_greet::GreetServer::bind("127.0.0.1:0")?.spawn(udp_greet::greet)?;
/// # let addr = server.local_addr();
/// use udp_greet::GreetClient;
///
/// let client = GreetClient::connect(addr)?;
/// assert_eq!(client.send_recv(b"Michael")?, b"Hello, Michael!");
///
/// // Without allocating: the reply goes into the caller's buffer.
/// let mut buf = [0u8; 64];
/// let n = client.send_recv_into(b"Tracy", &mut buf)?;
/// assert_eq!(&buf[..n], b"Hello, Tracy!");
/// # Ok(())
/// # }
/// ```
pub struct GreetClient {
    socket: Socket,
    local_addr: SocketAddr,
    recv_buffer: BufferSize,
    send_buffer: BufferSize,
    /// The server, the settings, and the count of discarded datagrams
    /// (read without waiting for a call).
    peer: Peer,
    state: Mutex<State>,
}

/// What one call leaves for the next.
#[derive(Debug)]
struct State {
    /// The socket's read timeout as last set, to skip setting it again.
    read_timeout: Option<Duration>,
    /// The reply buffer of [`GreetClient::send_recv`], kept between calls.
    reply: Vec<u8>,
    /// The jitter's random state (xorshift64*; never zero).
    rng: u64,
}

impl State {
    fn new(seed: u64) -> Self {
        State {
            read_timeout: None,
            reply: Vec::new(),
            rng: seed | 1,
        }
    }
}

impl fmt::Debug for GreetClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GreetClient")
            .field("local_addr", &self.local_addr)
            .field("peer", &self.peer.addr)
            .field("settings", &self.peer.settings)
            .finish_non_exhaustive()
    }
}

impl GreetClient {
    /// Connects a client with default settings to the server at `addr`.
    ///
    /// # Errors
    ///
    /// [`Error::Resolve`] when `addr` does not resolve; [`Error::Socket`] or
    /// [`Error::Io`] when the socket cannot be made or connected.
    pub fn connect<A: ToSocketAddrs + fmt::Debug>(addr: A) -> Result<GreetClient, Error> {
        ClientBuilder::new().connect(addr)
    }

    /// A builder for a client with non-default settings.
    pub fn builder() -> ClientBuilder<Blocking> {
        ClientBuilder::new()
    }

    /// The server's address.
    #[must_use]
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer.addr
    }

    /// The client's own address (an ephemeral port chosen by the system).
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The receive buffer size requested and granted.
    #[must_use]
    pub fn recv_buffer_size(&self) -> BufferSize {
        self.recv_buffer
    }

    /// The send buffer size requested and granted.
    #[must_use]
    pub fn send_buffer_size(&self) -> BufferSize {
        self.send_buffer
    }

    /// How many datagrams this client has discarded: stale ones found queued
    /// before a request, and ones that failed the reply check.
    #[must_use]
    pub fn discarded(&self) -> u64 {
        self.peer.discarded()
    }

    /// Sends `request` and returns the reply.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] when no reply came after every attempt,
    /// [`Error::Refused`] as soon as the server's host reports that nothing
    /// listens on the port, [`Error::Io`] for other socket errors.
    pub fn send_recv(&self, request: &[u8]) -> Result<Vec<u8>, Error> {
        let mut state = self.lock();
        let mut reply = std::mem::take(&mut state.reply);
        reply.resize(MAX_REPLY, 0);
        let result = self.exchange(&mut state, request, &mut reply);
        let out = result.map(|len| reply.get(..len).unwrap_or_default().to_vec());
        state.reply = reply;
        out
    }

    /// Sends `request` and writes the reply into `buf`, returning its length.
    /// Allocates nothing.
    ///
    /// # Errors
    ///
    /// As [`send_recv`](GreetClient::send_recv), and
    /// [`Error::ReplyTooLarge`] when the reply does not fit in `buf` (the
    /// reply is discarded). With a reply check, a datagram too large for
    /// `buf` cannot be checked: it is discarded and the wait goes on, and
    /// the call ends in [`Error::ReplyTooLarge`] rather than
    /// [`Error::Timeout`] if no valid reply came.
    pub fn send_recv_into(&self, request: &[u8], buf: &mut [u8]) -> Result<usize, Error> {
        let mut state = self.lock();
        self.exchange(&mut state, request, buf)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state holds no invariant a panic could break.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drives one call's [`Exchange`] on the socket. Each step ends the call
    /// or moves it on, and the exchange ends it when its attempts' time has
    /// passed.
    fn exchange(&self, state: &mut State, request: &[u8], buf: &mut [u8]) -> Result<usize, Error> {
        let mut now = Instant::now();
        let seed = call_seed(&mut state.rng);
        let mut call = Exchange::new(&self.peer, buf.len(), Queue::MayHoldStale, now, seed);
        loop {
            match call.next(now) {
                Step::Send => call.sent(self.socket.send(request)),
                Step::Discard => {
                    let received = sys::recv_nonblocking(&self.socket, buf).map(|len| (len, false));
                    call.received(received, request, buf);
                }
                Step::Check => call.received(sys::recv_dont_wait(&self.socket, buf), request, buf),
                Step::Poll => {
                    let received = sys::recv_dont_wait(&self.socket, buf);
                    if received.as_ref().is_err_and(error::is_timeout) {
                        std::hint::spin_loop();
                    }
                    call.received(received, request, buf);
                }
                Step::Wait(wait) => {
                    self.set_read_timeout(state, wait.timeout)?;
                    let received = self
                        .socket
                        .recv_vectored(&mut [sys::recv_slice(buf)])
                        .map(|(len, flags)| (len, flags.is_truncated()));
                    call.received(received, request, buf);
                }
                Step::Done(outcome) => return outcome,
            }
            now = Instant::now();
        }
    }

    /// Sets the socket's read timeout to `wait`, or to [`MIN_WAIT`] if it is
    /// shorter: never to zero, which would mean no timeout at all.
    fn set_read_timeout(&self, state: &mut State, wait: Duration) -> Result<(), Error> {
        let wait = wait.max(MIN_WAIT);
        if state.read_timeout != Some(wait) {
            self.socket
                .set_read_timeout(Some(wait))
                .map_err(|e| self.peer.io_error("set the read timeout for", e))?;
            state.read_timeout = Some(wait);
        }
        Ok(())
    }
}
