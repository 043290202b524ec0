//! The async client: without request ids, every call in flight on a
//! connected socket of its own, reused only when nothing is outstanding on
//! it; with them, calls multiplexed on a few shared sockets.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::{Semaphore, SemaphorePermit, oneshot};

use super::Tokio;
use super::mux::{self, AsyncMux};
use crate::ClientBuilder;
use crate::client::demux::{self, Sink, canonical};
use crate::client::exchange::{Exchange, Queue, Shared, Step, Wait, call_seed};
use crate::client::{MAX_REPLY, destination};
use crate::error::{self, Error};
use crate::socket::{self, BoundSocket, BufferSize, SocketOptions};
use crate::sys;

/// An async UDP client for tokio: many calls at once on one client, each
/// with every promise of [`GreetClient`](crate::GreetClient).
///
/// Made with [`GreetClient::connect`], or [`GreetClient::builder`] and
/// `connect(addr).await` for one server (called with
/// [`send_recv`](GreetClient::send_recv)), or `bind(local).await` for many
/// (called with [`send_recv_to`](GreetClient::send_recv_to)), with the
/// builder's policies unchanged: initial timeout, retries with jittered
/// backoff, call timeout, reply check, `refused_as_loss`, busy polling and
/// buffer sizes. Cheap to clone; clones share the sockets and the limit.
///
/// - **Without request ids, one socket per call in flight.** The wire
///   format has no request id, so calls in flight together must not share
///   a socket whose replies could reach the wrong call. Each call takes a
///   socket on a port the system picks (which also makes forged replies
///   harder to land), connected to the call's server. A socket goes back
///   for reuse only when every request sent on it was answered, and is
///   drained of stray datagrams before its next call (counted in
///   [`discarded`](GreetClient::discarded)); one with a request
///   outstanding is closed.
/// - **With [request ids](ClientBuilder::request_id), shared sockets.**
///   Every call goes on one of the client's
///   [`sockets`](ClientBuilder::sockets) (default 1), whose receive task
///   hands each reply to the call whose destination and id it carries. The
///   tasks run on the runtime the client was made on, and end when the last
///   clone of the client is dropped.
/// - **Bounded.** At most
///   [`max_in_flight`](ClientBuilder::<Tokio>::max_in_flight) calls run at once,
///   which without ids caps the sockets the client holds, in flight and
///   idle; further calls wait their turn, in order, within their call
///   timeout.
/// - **Cancellation-safe.** Dropping a call's future at any await point
///   releases its turn and its socket or its place. With ids its late
///   reply matches no call in flight (unless a later call reuses its id:
///   see [`request_id`](ClientBuilder::request_id)). Without ids its
///   socket is closed, not reused, so its late reply never reaches a call
///   on a socket of this client's choosing; but the system may give the
///   closed socket's port to a socket opened soon after (an outside probe
///   saw 1 to 3 calls in 2 000 cancelled ones), and a late reply to that
///   port reaches the call on it. Only a
///   [`reply_check`](ClientBuilder::reply_check) (or request ids) can tell
///   such a reply from the right one: set one when calls are cancelled
///   while their requests are out.
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
    /// The settings and the counts of discarded datagrams (shared with the
    /// receive tasks).
    shared: Arc<Shared>,
    /// The server of a connected client; `None` for a bound one.
    peer: Option<SocketAddr>,
    /// The first socket's own address.
    local_addr: SocketAddr,
    /// What a bound client binds each new socket to.
    bind_to: SocketAddr,
    options: SocketOptions,
    max_in_flight: usize,
    turns: Semaphore,
    /// The jitter's random state, from which each call draws its own: a
    /// sequence each call moves on (never waiting for another call).
    rng: AtomicU64,
    recv_buffer: BufferSize,
    send_buffer: BufferSize,
    io: AsyncIo,
}

/// How a client's calls use sockets.
enum AsyncIo {
    /// Without request ids: a socket per call in flight.
    PerCall {
        /// Sockets with nothing outstanding, ready for the next call, with
        /// the server each is connected to (`None`: a bound client's first
        /// socket, not connected).
        idle: Mutex<Vec<(UdpSocket, Option<SocketAddr>)>>,
        /// Sockets open, idle or in a call.
        open: AtomicUsize,
    },
    /// With request ids: shared sockets, each with a receive task.
    Mux {
        sockets: Box<[Arc<AsyncMux>]>,
        /// Spreads calls over the sockets.
        hasher: RandomState,
        /// Dropped with the client: the receive tasks end.
        _stop: Vec<oneshot::Sender<()>>,
    },
}

impl fmt::Debug for GreetClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GreetClient")
            .field("peer", &self.inner.peer)
            .field("local_addr", &self.inner.local_addr)
            .field("settings", &self.inner.shared.settings)
            .field("max_in_flight", &self.inner.max_in_flight)
            .field("open_sockets", &self.open_sockets())
            .finish_non_exhaustive()
    }
}

impl ClientBuilder<Tokio> {
    /// The most calls the client has in flight at once: calls beyond it
    /// wait for one to end (within their call timeout). Without request
    /// ids each call has a socket of its own, so this also caps the sockets
    /// (file descriptors) the client holds, in flight and idle together,
    /// whatever a burst of calls asks for.
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
        let addrs = lookup(addr).await?;
        socket::first_ok(&addrs, |peer| self.make(Some(peer), peer))
    }

    /// Makes an async client for many servers, as the blocking
    /// [`ClientBuilder::bind`] does: each call goes to the address given to
    /// [`send_recv_to`](GreetClient::send_recv_to). Without request ids
    /// each call's socket is bound to `local`'s address with an ephemeral
    /// port (so `local` must have port 0) and connected to the call's
    /// server; with them, the shared sockets are bound to `local`.
    ///
    /// Needs the `tokio` feature.
    ///
    /// # Errors
    ///
    /// As [`connect`](ClientBuilder::<Tokio>::connect); [`Error::AddrInUse`]
    /// or [`Error::Bind`] when `local` cannot be bound, and
    /// [`Error::InvalidConfig`] for a fixed port that several sockets would
    /// need.
    pub async fn bind<A>(self, local: A) -> Result<GreetClient, Error>
    where
        A: tokio::net::ToSocketAddrs + fmt::Debug,
    {
        self.validate()?;
        let addrs = lookup(local).await?;
        socket::first_ok(&addrs, |local| self.make(None, local))
    }

    /// A client connected to `peer`, or bound to `local` without one.
    fn make(&self, peer: Option<SocketAddr>, local: SocketAddr) -> Result<GreetClient, Error> {
        if peer.is_none() && local.port() != 0 && self.settings.request_id.is_none() {
            return Err(Error::invalid_for(
                "ClientBuilder::bind",
                local,
                "without request_id each call has a socket of its own: bind to port 0",
            ));
        }
        self.check_fixed_port(peer, local)?;
        let first = open(peer, local, &self.socket)?;
        let (mut local_addr, recv_buffer, send_buffer) =
            (first.local_addr, first.recv_buffer, first.send_buffer);
        if peer.is_none() && self.settings.request_id.is_none() {
            // Each call's socket has a port of its own.
            local_addr = local;
        }
        let shared = Arc::new(Shared::new(self.settings.clone()));
        let io = match self.settings.request_id {
            None => AsyncIo::PerCall {
                idle: Mutex::new(match peer {
                    Some(peer) => vec![(first.socket, Some(canonical(peer)))],
                    // Never connected: it serves no call, and a call needs
                    // a socket connected to its server.
                    None => Vec::new(),
                }),
                open: AtomicUsize::new(usize::from(peer.is_some())),
            },
            Some(_) => {
                let mut sockets = Vec::with_capacity(self.sockets);
                let mut stop = Vec::with_capacity(self.sockets);
                let mut next = Some(first);
                for _ in 0..self.sockets {
                    let made = match next.take() {
                        Some(made) => made,
                        None => open(peer, local, &self.socket)?,
                    };
                    let recverr = match peer {
                        Some(_) => false,
                        None => sys::enable_recverr(&SockRef::from(&made.socket), local.is_ipv6())
                            .map_err(|source| Error::Socket {
                                action: "set IP_RECVERR",
                                addr: local,
                                source,
                            })?,
                    };
                    let mux = AsyncMux::new(made.socket, peer, recverr, made.local_addr);
                    let (sender, receiver) = oneshot::channel();
                    tokio::spawn(mux::receive(mux.clone(), shared.clone(), receiver));
                    sockets.push(mux);
                    stop.push(sender);
                }
                AsyncIo::Mux {
                    sockets: sockets.into_boxed_slice(),
                    hasher: RandomState::new(),
                    _stop: stop,
                }
            }
        };
        Ok(GreetClient {
            inner: Arc::new(Inner {
                shared,
                peer,
                local_addr,
                bind_to: local,
                options: self.socket.clone(),
                max_in_flight: self.max_in_flight,
                turns: Semaphore::new(self.max_in_flight),
                rng: AtomicU64::new(crate::client::builder::seed(local_addr.port())),
                recv_buffer,
                send_buffer,
                io,
            }),
        })
    }
}

/// Resolves `addr` without blocking the runtime.
async fn lookup<A>(addr: A) -> Result<socket::Resolved, Error>
where
    A: tokio::net::ToSocketAddrs + fmt::Debug,
{
    let input = format!("{addr:?}");
    let addrs = tokio::net::lookup_host(addr)
        .await
        .map_err(|source| Error::Resolve {
            input: input.clone(),
            source,
        })?;
    socket::Resolved::from_addrs(input, addrs)
}

/// A new non-blocking socket, connected to `peer` or bound to `local`,
/// registered with the current runtime, with the buffer sizes it was
/// granted.
fn open(
    peer: Option<SocketAddr>,
    local: SocketAddr,
    options: &SocketOptions,
) -> Result<Opened, Error> {
    let made = match peer {
        Some(peer) => socket::connect(peer, options)?,
        None => socket::bind_client(local, options)?,
    };
    let addr = peer.unwrap_or(local);
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(Error::NoRuntime { addr });
    }
    let fail = |source| Error::Socket {
        action: "register with the tokio runtime",
        addr,
        source,
    };
    let BoundSocket {
        socket,
        local_addr,
        recv_buffer,
        send_buffer,
        ..
    } = made;
    socket.set_nonblocking(true).map_err(fail)?;
    let socket = UdpSocket::from_std(socket.into()).map_err(fail)?;
    Ok(Opened {
        socket,
        local_addr,
        recv_buffer,
        send_buffer,
    })
}

/// A socket [`open`] made.
struct Opened {
    socket: UdpSocket,
    local_addr: SocketAddr,
    recv_buffer: BufferSize,
    send_buffer: BufferSize,
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
    /// with [`connect(addr).await`](ClientBuilder::<Tokio>::connect) or
    /// [`bind(local).await`](ClientBuilder::<Tokio>::bind).
    pub fn builder() -> ClientBuilder<Tokio> {
        ClientBuilder::with_defaults()
    }

    /// The server's address, for a connected client; `None` for one made
    /// with [`bind`](ClientBuilder::<Tokio>::bind).
    #[must_use]
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.inner.peer
    }

    /// The client's own address: of its first socket; for a bound client
    /// without request ids, whose calls each have a socket and a port of
    /// their own, the address given to `bind`.
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
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

    /// How many calls may be in flight at once (and so, without request
    /// ids, how many sockets the client may hold).
    #[must_use]
    pub fn max_in_flight(&self) -> usize {
        self.inner.max_in_flight
    }

    /// How many sockets the client holds now: without request ids, those
    /// in calls and idle; with them, its shared sockets.
    #[must_use]
    pub fn open_sockets(&self) -> usize {
        match &self.inner.io {
            AsyncIo::PerCall { open, .. } => open.load(Ordering::Acquire),
            AsyncIo::Mux { sockets, .. } => sockets.len(),
        }
    }

    /// How many calls are in flight now, on the client's shared sockets
    /// (with request ids; without, the sockets in calls).
    #[must_use]
    pub fn in_flight(&self) -> usize {
        match &self.inner.io {
            AsyncIo::PerCall { .. } => {
                self.inner.max_in_flight - self.inner.turns.available_permits()
            }
            AsyncIo::Mux { sockets, .. } => sockets.iter().map(|s| s.in_flight()).sum(),
        }
    }

    /// How many datagrams the client has discarded: stray ones drained from
    /// a socket before its reuse, ones that failed the reply check or were
    /// too large to check, and with request ids the
    /// [`unmatched`](GreetClient::unmatched) ones and duplicates.
    #[must_use]
    pub fn discarded(&self) -> u64 {
        self.inner.shared.discarded()
    }

    /// With request ids: how many datagrams matched no call in flight,
    /// discarded and counted in [`discarded`](GreetClient::discarded) too.
    #[must_use]
    pub fn unmatched(&self) -> u64 {
        self.inner.shared.unmatched()
    }

    /// With source tokens: how many challenges servers sent this client's
    /// calls; see [`GreetClient::challenges`](crate::GreetClient::challenges).
    #[must_use]
    pub fn challenges(&self) -> u64 {
        self.inner.shared.challenges()
    }

    /// Sends `request` and returns the reply, as
    /// [`GreetClient::send_recv`](crate::GreetClient::send_recv) does, without blocking the runtime. Many
    /// calls may run at once on one client.
    ///
    /// # Errors
    ///
    /// As [`GreetClient::send_recv`](crate::GreetClient::send_recv). A call that waits for its turn
    /// (see [`max_in_flight`](ClientBuilder::<Tokio>::max_in_flight)) past its
    /// call timeout ends with [`Error::Timeout`] after 0 attempts.
    pub async fn send_recv(&self, request: &[u8]) -> Result<Vec<u8>, Error> {
        let dest = destination(self.inner.peer, self.inner.local_addr, None)?;
        self.call_owned(dest, request).await
    }

    /// As [`send_recv`](GreetClient::send_recv), with the reply written
    /// into `buf`; returns its length. Allocates nothing per call without
    /// request ids (with them, one allocation per reply).
    ///
    /// # Errors
    ///
    /// As [`GreetClient::send_recv_into`](crate::GreetClient::send_recv_into).
    pub async fn send_recv_into(&self, request: &[u8], buf: &mut [u8]) -> Result<usize, Error> {
        let dest = destination(self.inner.peer, self.inner.local_addr, None)?;
        self.exchange(dest, request, &mut Buf::Borrowed(buf)).await
    }

    /// Sends `request` to `addr` and returns the reply, which only a
    /// datagram from `addr` can be, as
    /// [`GreetClient::send_recv_to`](crate::GreetClient::send_recv_to)
    /// does.
    ///
    /// # Errors
    ///
    /// As [`GreetClient::send_recv_to`](crate::GreetClient::send_recv_to).
    pub async fn send_recv_to(&self, addr: SocketAddr, request: &[u8]) -> Result<Vec<u8>, Error> {
        destination(self.inner.peer, self.inner.local_addr, Some(addr))?;
        self.call_owned(addr, request).await
    }

    /// As [`send_recv_to`](GreetClient::send_recv_to), with the reply
    /// written into `buf`; returns its length.
    ///
    /// # Errors
    ///
    /// As [`GreetClient::send_recv_to_into`](crate::GreetClient::send_recv_to_into).
    pub async fn send_recv_to_into(
        &self,
        addr: SocketAddr,
        request: &[u8],
        buf: &mut [u8],
    ) -> Result<usize, Error> {
        destination(self.inner.peer, self.inner.local_addr, Some(addr))?;
        self.exchange(addr, request, &mut Buf::Borrowed(buf)).await
    }

    async fn call_owned(&self, dest: SocketAddr, request: &[u8]) -> Result<Vec<u8>, Error> {
        let mut reply = Vec::new();
        let len = self
            .exchange(dest, request, &mut Buf::Owned(&mut reply))
            .await?;
        reply.truncate(len);
        reply.shrink_to_fit();
        Ok(reply)
    }

    /// Drives one call's [`Exchange`]: a turn, then a socket of its own and
    /// each step on it, or a place on a shared socket, until the exchange
    /// ends the call (when its attempts' time has passed, at the latest).
    ///
    /// The two ways are two futures, so that neither carries the other's
    /// state (a call's future is copied as it is made).
    // Not an `async fn`: see `AsyncMux::call`.
    #[allow(clippy::manual_async_fn)]
    fn exchange(
        &self,
        dest: SocketAddr,
        request: &[u8],
        buf: &mut Buf<'_>,
    ) -> impl Future<Output = Result<usize, Error>> {
        async move {
            match &self.inner.io {
                AsyncIo::Mux {
                    sockets, hasher, ..
                } => {
                    let key = self.inner.shared.key(dest, request)?;
                    let index = demux::pick(hasher, key, sockets.len());
                    let mux = sockets
                        .get(index)
                        .ok_or(Error::NoRequestId { addr: dest })?;
                    self.multiplexed(mux, key, request, buf.sink()).await
                }
                AsyncIo::PerCall { .. } => self.own_socket(dest, request, buf).await,
            }
        }
    }

    /// The start of a call to `dest` with a reply buffer of `capacity`
    /// bytes: its exchange, and the time it starts.
    fn start(&self, dest: SocketAddr, capacity: usize) -> (Exchange<'_>, Instant) {
        let inner = &*self.inner;
        let seed = call_seed(
            &mut inner
                .rng
                .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed),
        );
        // A socket of its own is drained when it is leased; a shared one
        // holds no stale datagrams for the call.
        let now = Instant::now();
        let call = Exchange::new(&inner.shared, dest, capacity, Queue::Drained, now, seed);
        (call, now)
    }

    /// A turn for `call`: a free one at once, else one waited for within
    /// the call's call timeout (boxed: what only some calls await is not
    /// carried in every call's future), with the clock read again in `now`.
    async fn turn(
        &self,
        call: &Exchange<'_>,
        now: &mut Instant,
    ) -> Result<SemaphorePermit<'_>, Error> {
        if let Ok(permit) = self.inner.turns.try_acquire() {
            return Ok(permit);
        }
        let permit = Box::pin(self.wait_turn(call)).await;
        *now = Instant::now();
        // The semaphore is never closed.
        permit.map_err(|()| call.failed(*now))
    }

    /// A call with `key` on the shared socket `mux`.
    // Not an `async fn`: see `AsyncMux::call`.
    #[allow(clippy::manual_async_fn)]
    fn multiplexed(
        &self,
        mux: &AsyncMux,
        key: demux::Key,
        request: &[u8],
        mut sink: Sink<'_>,
    ) -> impl Future<Output = Result<usize, Error>> {
        async move {
            let (mut call, mut now) = self.start(key.addr(), sink.capacity());
            let permit = self.turn(&call, &mut now).await?;
            let result = mux
                .call(&self.inner.shared, key, request, &mut sink, &mut call, now)
                .await;
            drop(permit);
            result
        }
    }

    /// A call to `dest` on a socket of its own.
    // Not an `async fn`: see `AsyncMux::call`.
    #[allow(clippy::manual_async_fn)]
    fn own_socket(
        &self,
        dest: SocketAddr,
        request: &[u8],
        buf: &mut Buf<'_>,
    ) -> impl Future<Output = Result<usize, Error>> {
        async move {
            let (mut call, mut now) = self.start(dest, buf.capacity());
            let permit = self.turn(&call, &mut now).await?;
            let mut socket = self.lease(permit, dest)?;
            loop {
                match call.next(Instant::now()) {
                    Step::Send => {
                        let sent = socket.send(call.wire(request)).await;
                        call.sent(sent);
                    }
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
    }

    /// Waits for a turn within the call's call timeout; an error once that
    /// has passed.
    async fn wait_turn(&self, call: &Exchange<'_>) -> Result<SemaphorePermit<'_>, ()> {
        let turn = self.inner.turns.acquire();
        match call.deadline() {
            Some(deadline) => match tokio::time::timeout_at(deadline.into(), turn).await {
                Ok(permit) => permit.map_err(|_| ()),
                Err(_) => Err(()),
            },
            None => turn.await.map_err(|_| ()),
        }
    }

    /// A socket for one call to `dest`: an idle one connected to `dest`
    /// (drained), or a new one. A bound client never connects a socket
    /// again to another server (the kernel would keep the source address it
    /// picked for the first): an idle socket connected elsewhere is closed
    /// when the client needs room for a new one.
    fn lease<'c>(
        &'c self,
        permit: SemaphorePermit<'c>,
        dest: SocketAddr,
    ) -> Result<Call<'c>, Error> {
        let inner = &self.inner;
        let AsyncIo::PerCall { idle, open: count } = &inner.io else {
            return Err(Error::NoRequestId { addr: dest });
        };
        let dest = canonical(dest);
        let socket = loop {
            let taken = {
                let mut idle = lock(idle);
                match idle.iter().rposition(|(_, to)| *to == Some(dest)) {
                    Some(at) => Some(idle.swap_remove(at)),
                    None => {
                        // Room for a new socket within the limit.
                        if count.load(Ordering::Acquire) >= inner.max_in_flight && !idle.is_empty()
                        {
                            idle.swap_remove(0);
                            count.fetch_sub(1, Ordering::AcqRel);
                        }
                        None
                    }
                }
            };
            match taken {
                Some((socket, _)) if drain(&socket, inner) => break socket,
                // Failed: closed, and another tried.
                Some((socket, _)) => {
                    count.fetch_sub(1, Ordering::AcqRel);
                    drop(socket);
                }
                None => {
                    let opened = match inner.peer {
                        Some(peer) => open(Some(peer), peer, &inner.options)?,
                        None => {
                            let opened = open(None, inner.bind_to, &inner.options)?;
                            SockRef::from(&opened.socket)
                                .connect(&demux::wire(inner.bind_to, dest).into())
                                .map_err(|source| Error::Io {
                                    action: "connect UDP socket to",
                                    addr: dest,
                                    source,
                                })?;
                            opened
                        }
                    };
                    count.fetch_add(1, Ordering::AcqRel);
                    break opened.socket;
                }
            }
        };
        Ok(Call {
            socket: Some(socket),
            dest,
            sent: 0,
            answers: 0,
            client: self.inner.clone(),
            _permit: permit,
        })
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing held under these locks can be left half done.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Discards whatever is queued on an idle socket (counted); returns `false`
/// if the socket failed and must not be used.
fn drain(socket: &UdpSocket, inner: &Inner) -> bool {
    let mut scratch = [0u8; 1];
    // Bounded: a socket whose refusal does not go away once read (as under
    // Wine) would keep this loop going forever; one that holds more than
    // this many datagrams is not worth draining.
    for _ in 0..DRAIN_LIMIT {
        match SockRef::from(socket).recv_vectored(&mut [sys::recv_slice(&mut scratch)]) {
            Ok(_) => inner.shared.count_discarded(),
            Err(e) if error::is_timeout(&e) => return true,
            // An ICMP report for an earlier request, taken off the socket.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    false
}

/// The most receives [`drain`] makes before it gives a socket up.
const DRAIN_LIMIT: usize = 1024;

/// Where a call's reply goes.
enum Buf<'a> {
    /// A vector the call fills (room for the largest datagram).
    Owned(&'a mut Vec<u8>),
    /// The caller's buffer.
    Borrowed(&'a mut [u8]),
}

impl Buf<'_> {
    /// The same buffer, as a shared socket's call fills it.
    fn sink(&mut self) -> Sink<'_> {
        match self {
            Buf::Owned(vec) => Sink::Owned(vec),
            Buf::Borrowed(buf) => Sink::Borrowed(buf),
        }
    }

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
struct Call<'c> {
    socket: Option<UdpSocket>,
    /// The server the socket is connected to.
    dest: SocketAddr,
    /// Requests sent on the socket in this call.
    sent: u64,
    /// Datagrams received on it in this call (replies, and discarded ones).
    answers: u64,
    client: Arc<Inner>,
    _permit: SemaphorePermit<'c>,
}

impl Call<'_> {
    fn socket(&self) -> io::Result<&UdpSocket> {
        self.socket
            .as_ref()
            .ok_or_else(|| io::ErrorKind::NotConnected.into())
    }

    /// Sends `request`. Counted before the send: a call dropped while
    /// sending may have sent, so its socket is not reused.
    async fn send(&mut self, request: &[u8]) -> io::Result<usize> {
        self.sent += 1;
        let socket = self.socket()?;
        // A future of no state of its own (tokio's `send` future is some
        // 200 bytes, which every call's future would carry).
        std::future::poll_fn(|cx| socket.poll_send(cx, request)).await
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

impl Drop for Call<'_> {
    fn drop(&mut self) {
        let Some(socket) = self.socket.take() else {
            return;
        };
        let AsyncIo::PerCall { idle, open } = &self.client.io else {
            return;
        };
        if self.answers >= self.sent {
            lock(idle).push((socket, Some(self.dest)));
        } else {
            // A reply may still come: the socket is closed, never reused.
            open.fetch_sub(1, Ordering::AcqRel);
            drop(socket);
        }
    }
}
