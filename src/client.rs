//! The client: one connected socket, request out, reply back, with
//! timeouts and retries.

use std::fmt;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use socket2::Socket;

use crate::error::{self, Error};
use crate::socket::{self, BufferSize, SocketOptions};
use crate::sys;

/// Room for any UDP payload, IPv4 or IPv6.
const MAX_REPLY: usize = 65_536;

/// A UDP client connected to one server.
///
/// The socket is connected, so the kernel drops datagrams from anyone but
/// the server, and an ICMP "port unreachable" from the server's host is
/// reported at once as [`Error::Refused`].
///
/// UDP may lose, duplicate or reorder datagrams. A call sends the request,
/// waits for a reply up to the timeout, and sends the request again on
/// silence, doubling the wait each time, up to the configured retries; see
/// [`ClientBuilder`]. Before each request it discards any datagram already
/// queued (a late reply to an earlier request, or a duplicate), so that it is
/// not taken for the answer to this one.
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
    peer: SocketAddr,
    local_addr: SocketAddr,
    recv_buffer: BufferSize,
    send_buffer: BufferSize,
    timeout: Duration,
    retries: u32,
    state: Mutex<State>,
}

/// What one call leaves for the next.
#[derive(Debug, Default)]
struct State {
    /// The socket's read timeout as last set, to skip setting it again.
    read_timeout: Option<Duration>,
    /// The reply buffer of [`GreetClient::send_recv`], kept between calls.
    reply: Vec<u8>,
}

impl fmt::Debug for GreetClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GreetClient")
            .field("local_addr", &self.local_addr)
            .field("peer", &self.peer)
            .field("timeout", &self.timeout)
            .field("retries", &self.retries)
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
        ClientBuilder::default().connect(addr)
    }

    /// A builder for a client with non-default settings.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// The server's address.
    #[must_use]
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
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
    /// reply is discarded).
    pub fn send_recv_into(&self, request: &[u8], buf: &mut [u8]) -> Result<usize, Error> {
        let mut state = self.lock();
        self.exchange(&mut state, request, buf)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state holds no invariant a panic could break.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn exchange(&self, state: &mut State, request: &[u8], buf: &mut [u8]) -> Result<usize, Error> {
        let started = Instant::now();
        self.discard_queued(buf)?;
        let mut wait = self.timeout;
        let attempts = self.retries.saturating_add(1);
        for _ in 0..attempts {
            self.set_read_timeout(state, wait)?;
            self.send(request)?;
            if let Some(len) = self.recv_reply(buf)? {
                return Ok(len);
            }
            wait = wait.saturating_mul(2);
        }
        Err(Error::Timeout {
            addr: self.peer,
            attempts,
            elapsed: started.elapsed(),
        })
    }

    /// Discards datagrams already queued: late replies to earlier requests.
    fn discard_queued(&self, buf: &mut [u8]) -> Result<(), Error> {
        loop {
            match sys::recv_nonblocking(&self.socket, buf) {
                Ok(_) => continue,
                Err(e) if error::is_timeout(&e) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.io_error("receive from", e)),
            }
        }
    }

    fn set_read_timeout(&self, state: &mut State, wait: Duration) -> Result<(), Error> {
        if state.read_timeout != Some(wait) {
            self.socket
                .set_read_timeout(Some(wait))
                .map_err(|e| self.io_error("set the read timeout for", e))?;
            state.read_timeout = Some(wait);
        }
        Ok(())
    }

    fn send(&self, request: &[u8]) -> Result<(), Error> {
        loop {
            match self.socket.send(request) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.io_error("send to", e)),
            }
        }
    }

    /// Waits for one reply; `None` when the read timeout expired.
    fn recv_reply(&self, buf: &mut [u8]) -> Result<Option<usize>, Error> {
        loop {
            match self.socket.recv_vectored(&mut [sys::recv_slice(buf)]) {
                Ok((_, flags)) if flags.is_truncated() => {
                    return Err(Error::ReplyTooLarge {
                        addr: self.peer,
                        capacity: buf.len(),
                    });
                }
                Ok((len, _)) => return Ok(Some(len)),
                Err(e) if error::is_timeout(&e) => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.io_error("receive from", e)),
            }
        }
    }

    /// Names the failed operation; a refused port is its own error.
    fn io_error(&self, action: &'static str, source: io::Error) -> Error {
        if source.kind() == io::ErrorKind::ConnectionRefused {
            Error::Refused {
                addr: self.peer,
                source,
            }
        } else {
            Error::Io {
                action,
                addr: self.peer,
                source,
            }
        }
    }
}

/// Configures and connects a [`GreetClient`].
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
///     .connect(addr)?;
/// assert_eq!(client.send_recv(b"Sarah")?, b"Hello, Sarah!");
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until `connect` is called"]
pub struct ClientBuilder {
    socket: SocketOptions,
    timeout: Duration,
    retries: u32,
}

impl Default for ClientBuilder {
    fn default() -> Self {
        ClientBuilder {
            socket: SocketOptions::default(),
            timeout: Duration::from_secs(1),
            retries: 2,
        }
    }
}

impl ClientBuilder {
    /// A builder with every setting at its default.
    pub fn new() -> Self {
        Self::default()
    }

    /// How long the first attempt waits for a reply; each retry waits twice
    /// as long as the one before. Must not be zero.
    ///
    /// Defaults to 1 second.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How many times a request is sent again when no reply comes.
    ///
    /// Defaults to 2 (3 attempts in all; with the default timeout a call
    /// gives up after 1 + 2 + 4 = 7 seconds).
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }

    /// Requests a receive buffer (`SO_RCVBUF`) of `bytes`.
    ///
    /// Defaults to the system default.
    pub fn recv_buffer_size(mut self, bytes: usize) -> Self {
        self.socket.recv_buffer = Some(bytes);
        self
    }

    /// Requests a send buffer (`SO_SNDBUF`) of `bytes`.
    ///
    /// Defaults to the system default.
    pub fn send_buffer_size(mut self, bytes: usize) -> Self {
        self.socket.send_buffer = Some(bytes);
        self
    }

    /// Makes a socket of the server's address family, bound to an ephemeral
    /// port, and connects it to `addr` (the first address it resolves to
    /// that works).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for a zero timeout, [`Error::Resolve`] when
    /// `addr` does not resolve, [`Error::Socket`] or [`Error::Io`] when the
    /// socket cannot be made or connected.
    pub fn connect<A: ToSocketAddrs + fmt::Debug>(self, addr: A) -> Result<GreetClient, Error> {
        if self.timeout.is_zero() {
            return Err(Error::InvalidConfig {
                setting: "timeout",
                reason: "must be greater than zero",
            });
        }
        let addrs = socket::resolve(addr)?;
        socket::first_ok(&addrs, |peer| {
            let made = socket::connect(peer, &self.socket)?;
            Ok(GreetClient {
                socket: made.socket,
                peer,
                local_addr: made.local_addr,
                recv_buffer: made.recv_buffer,
                send_buffer: made.send_buffer,
                timeout: self.timeout,
                retries: self.retries,
                state: Mutex::new(State::default()),
            })
        })
    }
}
