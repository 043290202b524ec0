//! The async client: every call in flight on a connected socket of its own,
//! reused only when nothing is outstanding on it.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::Tokio;
use crate::ClientBuilder;
use crate::client::MAX_REPLY;
use crate::client::exchange::{Exchange, Peer, Queue, Step, Wait, call_seed};
use crate::error::{self, Error};
use crate::socket::{self, BufferSize, SocketOptions};
use crate::sys;

/// An async UDP client for tokio: many calls at once on one client, each
/// with every promise of [`GreetClient`](crate::GreetClient).
///
/// Made with [`GreetClient::connect`], or [`GreetClient::builder`] and
/// `connect(addr).await`, with the builder's policies unchanged:
/// timeout, retries with jittered backoff, deadline, reply check,
/// `refused_as_loss`, busy polling and buffer sizes. Cheap to clone; clones
/// share the sockets and the limit.
///
/// - **One socket per call in flight.** The wire format has no request id,
///   so calls in flight together must not share a socket whose replies
///   could reach the wrong call. Each call takes a connected socket on a
///   port the system picks (which also makes forged replies harder to
///   land). A socket goes back for reuse only when every request sent on it
///   was answered, and is drained of stray datagrams before its next call
///   (counted in [`discarded`](GreetClient::discarded)); one with a
///   request outstanding is closed.
/// - **Bounded.** At most
///   [`max_in_flight`](ClientBuilder::<Tokio>::max_in_flight) calls run at once,
///   which caps the sockets the client holds, in flight and idle; further
///   calls wait their turn, in order, within their deadline.
/// - **Cancellation-safe.** Dropping a call's future at any await point
///   releases its turn and its socket, and its late reply can never reach
///   another call: the socket is closed, not reused.
///
/// Its sockets are registered with the runtime the client (or the call
/// that opened them) ran on: use a client within one runtime.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), udp_greet::Error> {
/// # let server = udp_greet::tokio::GreetServer::bind("127.0.0.1:0")?.spawn(udp_greet::tokio::greet)?;
/// # let addr = server.local_addr();
/// use udp_greet::tokio::GreetClient;
///
/// let client = GreetClient::connect(addr).await?;
/// let (a, b) = tokio::join!(client.send_recv(b"Michael"), client.send_recv(b"Sarah"));
/// assert_eq!(a?, b"Hello, Michael!");
/// assert_eq!(b?, b"Hello, Sarah!");
/// # Ok(())
/// # }
/// ```
///
/// Needs the `tokio` feature.
#[derive(Clone)]
#[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
pub struct GreetClient {
    inner: Arc<Inner>,
}

struct Inner {
    /// The server, the settings, and the count of discarded datagrams.
    peer: Peer,
    options: SocketOptions,
    max_in_flight: usize,
    turns: Arc<Semaphore>,
    /// Sockets with nothing outstanding, ready for the next call.
    idle: Mutex<Vec<UdpSocket>>,
    /// Sockets open, idle or in a call.
    open: AtomicUsize,
    /// The jitter's random state, from which each call draws its own.
    rng: Mutex<u64>,
    recv_buffer: BufferSize,
    send_buffer: BufferSize,
}

impl fmt::Debug for GreetClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GreetClient")
            .field("peer", &self.inner.peer.addr)
            .field("settings", &self.inner.peer.settings)
            .field("max_in_flight", &self.inner.max_in_flight)
            .field("open_sockets", &self.open_sockets())
            .finish_non_exhaustive()
    }
}

impl ClientBuilder<Tokio> {
    /// The most calls the client has in flight at once, each on a socket of
    /// its own: calls beyond it wait for one to end (within their deadline).
    /// This caps the sockets (file descriptors) the client holds, in flight
    /// and idle together, whatever a burst of calls asks for.
    ///
    /// Must be between 1 and 65 536. Defaults to
    /// [`DEFAULT_CLIENT_MAX_IN_FLIGHT`](crate::DEFAULT_CLIENT_MAX_IN_FLIGHT)
    /// (256).
    ///
    /// Needs the `tokio` feature.
    pub fn max_in_flight(mut self, calls: usize) -> Self {
        self.max_in_flight = calls;
        self
    }

    /// Makes an async [`GreetClient`] for the server at `addr`, resolved
    /// without blocking the runtime; each address it resolves to is tried
    /// in turn, with a first socket (kept for the first call).
    ///
    /// Needs the `tokio` feature.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for a setting out of range,
    /// [`Error::Resolve`] when `addr` does not resolve, [`Error::Socket`] or
    /// [`Error::Io`] when the socket cannot be made or connected, and
    /// [`Error::NoRuntime`] outside a tokio runtime.
    pub async fn connect<A>(self, addr: A) -> Result<GreetClient, Error>
    where
        A: tokio::net::ToSocketAddrs + fmt::Debug,
    {
        self.validate()?;
        let input = format!("{addr:?}");
        let addrs = tokio::net::lookup_host(addr)
            .await
            .map_err(|source| Error::Resolve {
                input: input.clone(),
                source,
            })?;
        let addrs = socket::Resolved::from_addrs(input, addrs)?;
        socket::first_ok(&addrs, |peer| {
            let (first, recv_buffer, send_buffer) = open(peer, &self.socket)?;
            Ok(GreetClient {
                inner: Arc::new(Inner {
                    peer: Peer::new(peer, self.settings.clone()),
                    options: self.socket.clone(),
                    max_in_flight: self.max_in_flight,
                    turns: Arc::new(Semaphore::new(self.max_in_flight)),
                    idle: Mutex::new(vec![first]),
                    open: AtomicUsize::new(1),
                    rng: Mutex::new(crate::client::builder::seed(peer.port())),
                    recv_buffer,
                    send_buffer,
                }),
            })
        })
    }
}

/// A new connected, non-blocking socket to `peer`, registered with the
/// current runtime, with the buffer sizes it was granted.
fn open(
    peer: SocketAddr,
    options: &SocketOptions,
) -> Result<(UdpSocket, BufferSize, BufferSize), Error> {
    let made = socket::connect(peer, options)?;
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(Error::NoRuntime { addr: peer });
    }
    let fail = |source| Error::Socket {
        action: "register with the tokio runtime",
        addr: peer,
        source,
    };
    made.socket.set_nonblocking(true).map_err(fail)?;
    let socket = UdpSocket::from_std(made.socket.into()).map_err(fail)?;
    Ok((socket, made.recv_buffer, made.send_buffer))
}

impl GreetClient {
    /// Makes a client with default settings for the server at `addr`:
    /// `GreetClient::builder().connect(addr).await`.
    ///
    /// Needs the `tokio` feature.
    ///
    /// # Errors
    ///
    /// As [`ClientBuilder::<Tokio>::connect`].
    pub async fn connect<A>(addr: A) -> Result<GreetClient, Error>
    where
        A: tokio::net::ToSocketAddrs + fmt::Debug,
    {
        GreetClient::builder().connect(addr).await
    }

    /// A builder for a client with non-default settings: the blocking
    /// client's settings, and
    /// [`max_in_flight`](ClientBuilder::<Tokio>::max_in_flight); finish it
    /// with [`connect(addr).await`](ClientBuilder::<Tokio>::connect).
    pub fn builder() -> ClientBuilder<Tokio> {
        ClientBuilder::with_defaults()
    }

    /// The server's address.
    #[must_use]
    pub fn peer_addr(&self) -> SocketAddr {
        self.inner.peer.addr
    }

    /// The receive buffer size requested and granted (for the first socket;
    /// every socket asks for the same).
    #[must_use]
    pub fn recv_buffer_size(&self) -> BufferSize {
        self.inner.recv_buffer
    }

    /// The send buffer size requested and granted (for the first socket).
    #[must_use]
    pub fn send_buffer_size(&self) -> BufferSize {
        self.inner.send_buffer
    }

    /// How many calls may be in flight at once (and so how many sockets
    /// the client may hold).
    #[must_use]
    pub fn max_in_flight(&self) -> usize {
        self.inner.max_in_flight
    }

    /// How many sockets the client holds now: in calls, and idle.
    #[must_use]
    pub fn open_sockets(&self) -> usize {
        self.inner.open.load(Ordering::Acquire)
    }

    /// How many datagrams the client has discarded: stray ones drained from
    /// a socket before its reuse, and ones that failed the reply check or
    /// were too large to check.
    #[must_use]
    pub fn discarded(&self) -> u64 {
        self.inner.peer.discarded()
    }

    /// Sends `request` and returns the reply, as
    /// [`GreetClient::send_recv`](crate::GreetClient::send_recv) does, without blocking the runtime. Many
    /// calls may run at once on one client.
    ///
    /// # Errors
    ///
    /// As [`GreetClient::send_recv`](crate::GreetClient::send_recv). A call that waits for its turn
    /// (see [`max_in_flight`](ClientBuilder::<Tokio>::max_in_flight)) past its
    /// deadline ends with [`Error::Timeout`] after 0 attempts.
    pub async fn send_recv(&self, request: &[u8]) -> Result<Vec<u8>, Error> {
        let mut reply = Vec::new();
        let len = self.exchange(request, &mut Buf::Owned(&mut reply)).await?;
        reply.truncate(len);
        reply.shrink_to_fit();
        Ok(reply)
    }

    /// As [`send_recv`](GreetClient::send_recv), with the reply written
    /// into `buf`; returns its length. Allocates nothing per call.
    ///
    /// # Errors
    ///
    /// As [`GreetClient::send_recv_into`](crate::GreetClient::send_recv_into).
    pub async fn send_recv_into(&self, request: &[u8], buf: &mut [u8]) -> Result<usize, Error> {
        self.exchange(request, &mut Buf::Borrowed(buf)).await
    }

    /// Drives one call's [`Exchange`]: a turn, a socket, then each step on
    /// it until the exchange ends the call (when its attempts' time has
    /// passed, at the latest).
    async fn exchange(&self, request: &[u8], buf: &mut Buf<'_>) -> Result<usize, Error> {
        let inner = &*self.inner;
        let seed = call_seed(&mut inner.rng.lock().unwrap_or_else(|e| e.into_inner()));
        // The socket is drained when it is leased.
        let mut call = Exchange::new(
            &inner.peer,
            buf.capacity(),
            Queue::Drained,
            Instant::now(),
            seed,
        );
        let turn = inner.turns.clone().acquire_owned();
        let permit = match call.deadline() {
            Some(deadline) => match tokio::time::timeout_at(deadline.into(), turn).await {
                Ok(permit) => permit,
                Err(_) => return Err(call.failed(Instant::now())),
            },
            None => turn.await,
        };
        // The semaphore is never closed.
        let Ok(permit) = permit else {
            return Err(call.failed(Instant::now()));
        };
        let mut socket = self.lease(permit)?;
        loop {
            match call.next(Instant::now()) {
                Step::Send => call.sent(socket.send(request).await),
                Step::Discard | Step::Check => {
                    call.received(socket.try_recv(buf), request, buf.bytes())
                }
                Step::Poll => {
                    let received = socket.try_recv(buf);
                    if received.as_ref().is_err_and(error::is_timeout) {
                        // Let the runtime run other tasks between tries.
                        tokio::task::yield_now().await;
                    }
                    call.received(received, request, buf.bytes());
                }
                Step::Wait(wait) => {
                    let received = socket.recv_until(buf, wait).await;
                    call.received(received, request, buf.bytes());
                }
                Step::Done(outcome) => return outcome,
            }
        }
    }

    /// A socket for one call: an idle one, drained, or a new one.
    fn lease(&self, permit: OwnedSemaphorePermit) -> Result<Call, Error> {
        let inner = &self.inner;
        let socket = loop {
            let idle = inner.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            match idle {
                Some(socket) if drain(&socket, inner) => break socket,
                // Failed: closed, and another tried.
                Some(socket) => {
                    inner.open.fetch_sub(1, Ordering::AcqRel);
                    drop(socket);
                }
                None => {
                    let (socket, _, _) = open(inner.peer.addr, &inner.options)?;
                    inner.open.fetch_add(1, Ordering::AcqRel);
                    break socket;
                }
            }
        };
        Ok(Call {
            socket: Some(socket),
            sent: 0,
            answers: 0,
            client: self.inner.clone(),
            _permit: permit,
        })
    }
}

/// Discards whatever is queued on an idle socket (counted); returns `false`
/// if the socket failed and must not be used.
fn drain(socket: &UdpSocket, inner: &Inner) -> bool {
    let mut scratch = [0u8; 1];
    loop {
        match SockRef::from(socket).recv_vectored(&mut [sys::recv_slice(&mut scratch)]) {
            Ok(_) => inner.peer.count_discarded(),
            Err(e) if error::is_timeout(&e) => return true,
            // An ICMP report for an earlier request, taken off the socket.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

/// Where a call's reply goes.
enum Buf<'a> {
    /// A vector the call fills (room for the largest datagram).
    Owned(&'a mut Vec<u8>),
    /// The caller's buffer.
    Borrowed(&'a mut [u8]),
}

impl Buf<'_> {
    fn capacity(&self) -> usize {
        match self {
            Buf::Owned(_) => MAX_REPLY,
            Buf::Borrowed(buf) => buf.len(),
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Buf::Owned(vec) => vec,
            Buf::Borrowed(buf) => buf,
        }
    }

    /// Receives one datagram without waiting: its length, and whether it
    /// was larger than the buffer.
    fn recv(&mut self, socket: &UdpSocket) -> io::Result<(usize, bool)> {
        let sock = SockRef::from(socket);
        match self {
            Buf::Owned(vec) => sys::recv_to_vec(&sock, vec, MAX_REPLY),
            Buf::Borrowed(buf) => sock
                .recv_vectored(&mut [sys::recv_slice(buf)])
                .map(|(len, flags)| (len, flags.is_truncated())),
        }
    }
}

/// One call's socket. Dropped (the call ended, or its future was dropped),
/// it goes back for reuse if every request sent on it was answered, and is
/// closed otherwise; its turn is given back either way.
struct Call {
    socket: Option<UdpSocket>,
    /// Requests sent on the socket in this call.
    sent: u64,
    /// Datagrams received on it in this call (replies, and discarded ones).
    answers: u64,
    client: Arc<Inner>,
    _permit: OwnedSemaphorePermit,
}

impl Call {
    fn socket(&self) -> io::Result<&UdpSocket> {
        self.socket
            .as_ref()
            .ok_or_else(|| io::ErrorKind::NotConnected.into())
    }

    /// Sends `request`. Counted before the send: a call dropped while
    /// sending may have sent, so its socket is not reused.
    async fn send(&mut self, request: &[u8]) -> io::Result<usize> {
        self.sent += 1;
        self.socket()?.send(request).await
    }

    /// Receives one datagram into `buf` without waiting.
    fn try_recv(&mut self, buf: &mut Buf<'_>) -> io::Result<(usize, bool)> {
        let received = buf.recv(self.socket()?);
        self.answered(received)
    }

    /// Waits for one datagram into `buf` until `wait.until`; a timeout
    /// error if none came by then.
    async fn recv_until(&mut self, buf: &mut Buf<'_>, wait: Wait) -> io::Result<(usize, bool)> {
        let socket = self.socket()?;
        // ERROR too: an ICMP "port unreachable" sets the socket's error
        // without making it readable, and must end the wait at once.
        let reading = socket.async_io(Interest::READABLE | Interest::ERROR, || buf.recv(socket));
        let received = match tokio::time::timeout_at(wait.until.into(), reading).await {
            Ok(received) => received,
            Err(_) => Err(io::ErrorKind::TimedOut.into()),
        };
        self.answered(received)
    }

    /// Counts a datagram received on the socket in this call.
    fn answered(&mut self, received: io::Result<(usize, bool)>) -> io::Result<(usize, bool)> {
        if received.is_ok() {
            self.answers += 1;
        }
        received
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        let Some(socket) = self.socket.take() else {
            return;
        };
        if self.answers >= self.sent {
            self.client
                .idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(socket);
        } else {
            // A reply may still come: the socket is closed, never reused.
            self.client.open.fetch_sub(1, Ordering::AcqRel);
            drop(socket);
        }
    }
}
