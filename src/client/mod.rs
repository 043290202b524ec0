//! The client: one connected socket, request out, reply back, with
//! timeouts, retries and a reply check.

pub(crate) mod builder;
pub(crate) mod demux;
pub(crate) mod exchange;
mod mux;

pub use builder::{ClientBuilder, DEFAULT_CLIENT_MAX_IN_FLIGHT};

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::net::ToSocketAddrs;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use socket2::Socket;

use crate::engine::Blocking;
use crate::error::{self, Error};
use crate::socket::BufferSize;
use crate::sys;
use demux::{Sink, canonical};

use exchange::{Exchange, Queue, Shared, Step, call_seed};
use mux::MuxSocket;

/// Room for any UDP payload, IPv4 or IPv6.
pub(crate) const MAX_REPLY: usize = 65_536;

/// The shortest wait the client asks the kernel for. A socket read timeout
/// is set in whole microseconds (whole milliseconds on Windows), and one
/// that rounds to zero means "wait forever"; every wait the client sets is
/// at least this long.
pub(crate) const MIN_WAIT: Duration = crate::sys::MIN_READ_TIMEOUT;

/// A blocking UDP client: request out, reply back, with timeouts, retries
/// and a reply check.
///
/// Made by [`connect`](GreetClient::connect) (or
/// [`ClientBuilder::connect`]) for one server, called with
/// [`send_recv`](GreetClient::send_recv); or by [`ClientBuilder::bind`] for
/// many servers from one socket, called with
/// [`send_recv_to`](GreetClient::send_recv_to).
///
/// A connected client's socket is connected, so the kernel drops datagrams
/// from anyone but the server, and an ICMP "port unreachable" from the
/// server's host is reported at once as [`Error::Refused`]. A bound client
/// takes a reply only from the address its call went to.
///
/// UDP may lose, duplicate or reorder datagrams. A call sends the request,
/// waits for a reply up to the [initial timeout](ClientBuilder::initial_timeout),
/// and sends the request again on silence, doubling the wait each time
/// (with jitter), up to the configured retries and
/// [call timeout](ClientBuilder::call_timeout); see [`ClientBuilder`].
///
/// # Without request ids (the default)
///
/// Calls are serialised: one call at a time on the client's one socket,
/// each waiting for its turn within its call timeout, so no reply can reach
/// the wrong call's thread. Before each request the
/// call discards any datagram already queued (a late reply to an earlier
/// request, or a duplicate; in [latency mode](ClientBuilder::busy_poll),
/// right after sending it), and a [reply check](ClientBuilder::reply_check)
/// rejects any datagram that is not the answer to this request. A bound
/// client takes only datagrams from the call's server. Use one client per
/// thread for parallel requests, or request ids.
///
/// # With request ids
///
/// With [`request_id`](ClientBuilder::request_id), calls from many threads
/// are in flight at once on the client's few sockets
/// ([`sockets`](ClientBuilder::sockets)), and each reply goes to the call
/// whose destination and id it carries; see the setting's docs.
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
    local_addr: SocketAddr,
    recv_buffer: BufferSize,
    send_buffer: BufferSize,
    /// The server of a connected client; `None` for a bound one.
    peer: Option<SocketAddr>,
    /// The settings and the counts of discarded datagrams (read without
    /// waiting for a call).
    shared: Shared,
    io: Io,
}

/// How a client's calls use its sockets.
enum Io {
    /// Without request ids: one socket, one call at a time.
    Single {
        socket: Socket,
        /// Taken by each call, within its call timeout.
        turn: Turn,
        /// What the call holding the turn uses.
        state: Mutex<State>,
        /// The jitter's random state, from which each call draws its own.
        rng: AtomicU64,
    },
    /// With request ids: calls in flight together on shared sockets.
    Mux {
        sockets: Box<[MuxSocket]>,
        /// The jitter's random state, from which each call draws its own.
        rng: AtomicU64,
        /// Spreads calls over the sockets.
        hasher: std::collections::hash_map::RandomState,
    },
}

/// What one call leaves for the next.
#[derive(Debug, Default)]
struct State {
    /// The socket's read timeout as last set, to skip setting it again.
    read_timeout: Option<Duration>,
    /// The reply buffer of [`GreetClient::send_recv`], kept between calls.
    reply: Vec<u8>,
}

/// One call at a time on a client's one socket: a call waits for its turn
/// within its call timeout, as the async client's calls do.
#[derive(Debug, Default)]
struct Turn {
    state: Mutex<TurnState>,
    free: Condvar,
}

#[derive(Debug, Default)]
struct TurnState {
    busy: bool,
    /// Calls waiting for the turn: the one giving it back wakes one only
    /// if there is one (a `notify_one` is a system call even when nobody
    /// waits, which a call one at a time on a polling client would pay
    /// every time).
    waiting: usize,
}

/// A turn held; given back when dropped.
struct Held<'t>(&'t Turn);

impl Turn {
    /// Waits for the turn until `until` (`None`: as long as it takes).
    fn take(&self, until: Option<Instant>) -> Option<Held<'_>> {
        let mut state = lock(&self.state);
        if state.busy {
            state.waiting += 1;
            while state.busy {
                state = match until {
                    None => self.free.wait(state).unwrap_or_else(|e| e.into_inner()),
                    Some(until) => {
                        let left = until.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            state.waiting -= 1;
                            return None;
                        }
                        let waited = self.free.wait_timeout(state, left);
                        waited.unwrap_or_else(|e| e.into_inner()).0
                    }
                };
            }
            state.waiting -= 1;
        }
        state.busy = true;
        Some(Held(self))
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let mut state = lock(&self.0.state);
        state.busy = false;
        let wake = state.waiting > 0;
        drop(state);
        if wake {
            self.0.free.notify_one();
        }
    }
}

/// Moves a client's jitter sequence on: each call's seed.
fn next_seed(rng: &AtomicU64) -> u64 {
    call_seed(&mut rng.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed))
}

impl fmt::Debug for GreetClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GreetClient")
            .field("local_addr", &self.local_addr)
            .field("peer", &self.peer)
            .field("settings", &self.shared.settings)
            .field("sockets", &self.sockets())
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

    /// The server's address, for a connected client; `None` for one made
    /// with [`ClientBuilder::bind`], which calls any server.
    #[must_use]
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer
    }

    /// The client's own address (of its first socket; with several
    /// [`sockets`](ClientBuilder::sockets), each has a port of its own).
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// How many sockets the client holds: 1, or with request ids the
    /// number of [`sockets`](ClientBuilder::sockets) asked for.
    #[must_use]
    pub fn sockets(&self) -> usize {
        match &self.io {
            Io::Single { .. } => 1,
            Io::Mux { sockets, .. } => sockets.len(),
        }
    }

    /// How many calls are in flight now (with request ids; without, at
    /// most 1 runs at a time and this is 0).
    #[must_use]
    pub fn in_flight(&self) -> usize {
        match &self.io {
            Io::Single { .. } => 0,
            Io::Mux { sockets, .. } => sockets.iter().map(MuxSocket::in_flight).sum(),
        }
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
    /// before a request, ones that failed the reply check, and with request
    /// ids the [`unmatched`](GreetClient::unmatched) ones and duplicates.
    #[must_use]
    pub fn discarded(&self) -> u64 {
        self.shared.discarded()
    }

    /// With request ids: how many datagrams matched no call in flight (no
    /// id, an id no call to their sender has, or a reply to a call that
    /// has ended), discarded and counted in
    /// [`discarded`](GreetClient::discarded) too.
    #[must_use]
    pub fn unmatched(&self) -> u64 {
        self.shared.unmatched()
    }

    /// With [source tokens](ClientBuilder::source_tokens): how many
    /// challenges servers sent this client's calls (each answered by
    /// sending the request again with the challenge's token).
    #[must_use]
    pub fn challenges(&self) -> u64 {
        self.shared.challenges()
    }

    /// Sends `request` to the client's server and returns the reply.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] when no reply came after every attempt,
    /// [`Error::Refused`] as soon as the server's host reports that nothing
    /// listens on the port, [`Error::Io`] for other socket errors; with
    /// request ids, [`Error::NoRequestId`] and [`Error::IdInUse`]; on a
    /// client made with [`ClientBuilder::bind`], which has no server of its
    /// own, [`Error::WrongDestination`].
    pub fn send_recv(&self, request: &[u8]) -> Result<Vec<u8>, Error> {
        let dest = destination(self.peer, self.local_addr, None)?;
        self.call_owned(dest, request)
    }

    /// Sends `request` and writes the reply into `buf`, returning its length.
    /// Allocates nothing (with request ids, a reply is taken from the call
    /// that received it: one allocation per reply).
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
        let dest = destination(self.peer, self.local_addr, None)?;
        self.call(dest, request, &mut Sink::Borrowed(buf))
    }

    /// Sends `request` to `addr` and returns the reply, which only a
    /// datagram from `addr` can be. For a client made with
    /// [`ClientBuilder::bind`]: one client, one socket, many servers.
    ///
    /// ```
    /// # fn main() -> Result<(), udp_greet::Error> {
    /// # let one = udp_greet::GreetServer::bind("127.0.0.1:0")?.spawn(udp_greet::greet)?;
    /// # let two = udp_greet::GreetServer::bind("127.0.0.1:0")?.spawn(udp_greet::greet)?;
    /// let client = udp_greet::GreetClient::builder().bind("127.0.0.1:0")?;
    /// for server in [one.local_addr(), two.local_addr()] {
    ///     assert_eq!(client.send_recv_to(server, b"Sarah")?, b"Hello, Sarah!");
    /// }
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`send_recv`](GreetClient::send_recv); on a connected client,
    /// [`Error::WrongDestination`] for any address but its server's.
    pub fn send_recv_to(&self, addr: SocketAddr, request: &[u8]) -> Result<Vec<u8>, Error> {
        destination(self.peer, self.local_addr, Some(addr))?;
        self.call_owned(addr, request)
    }

    /// As [`send_recv_to`](GreetClient::send_recv_to), with the reply
    /// written into `buf`, as [`send_recv_into`](GreetClient::send_recv_into)
    /// does.
    ///
    /// # Errors
    ///
    /// As [`send_recv_to`](GreetClient::send_recv_to) and
    /// [`send_recv_into`](GreetClient::send_recv_into).
    pub fn send_recv_to_into(
        &self,
        addr: SocketAddr,
        request: &[u8],
        buf: &mut [u8],
    ) -> Result<usize, Error> {
        destination(self.peer, self.local_addr, Some(addr))?;
        self.call(addr, request, &mut Sink::Borrowed(buf))
    }

    /// A call whose reply is returned as a vector of its own.
    fn call_owned(&self, dest: SocketAddr, request: &[u8]) -> Result<Vec<u8>, Error> {
        match &self.io {
            Io::Single {
                socket,
                turn,
                state,
                rng,
            } => {
                let mut call = self.start(dest, MAX_REPLY, next_seed(rng));
                let Some(_turn) = turn.take(call.deadline()) else {
                    return Err(call.failed(Instant::now()));
                };
                let mut state = lock(state);
                let mut reply = std::mem::take(&mut state.reply);
                reply.resize(MAX_REPLY, 0);
                let result =
                    self.exchange(socket, &mut state, &mut call, dest, request, &mut reply);
                let out = result.map(|len| reply.get(..len).unwrap_or_default().to_vec());
                state.reply = reply;
                out
            }
            Io::Mux { .. } => {
                let mut reply = Vec::new();
                let len = self.call(dest, request, &mut Sink::Owned(&mut reply))?;
                reply.truncate(len);
                Ok(reply)
            }
        }
    }

    /// One call to `dest`, its reply put in `buf`.
    fn call(&self, dest: SocketAddr, request: &[u8], buf: &mut Sink<'_>) -> Result<usize, Error> {
        match &self.io {
            Io::Single {
                socket,
                turn,
                state,
                rng,
            } => {
                let mut call = self.start(dest, buf.capacity(), next_seed(rng));
                let Some(_turn) = turn.take(call.deadline()) else {
                    return Err(call.failed(Instant::now()));
                };
                let mut state = lock(state);
                match buf {
                    Sink::Borrowed(buf) => {
                        self.exchange(socket, &mut state, &mut call, dest, request, buf)
                    }
                    Sink::Owned(vec) => {
                        vec.resize(MAX_REPLY, 0);
                        self.exchange(socket, &mut state, &mut call, dest, request, vec)
                    }
                }
            }
            Io::Mux {
                sockets,
                rng,
                hasher,
            } => {
                let key = self.shared.key(dest, request)?;
                let seed = next_seed(rng);
                let index = demux::pick(hasher, key, sockets.len());
                let Some(socket) = sockets.get(index) else {
                    return Err(Error::NoRequestId { addr: dest });
                };
                socket.call(&self.shared, key, request, buf, seed)
            }
        }
    }

    /// A call to `dest` with a reply buffer of `capacity` bytes, starting
    /// now: its time counts from before it waits for its turn.
    fn start(&self, dest: SocketAddr, capacity: usize, seed: u64) -> Exchange<'_> {
        let now = Instant::now();
        Exchange::new(&self.shared, dest, capacity, Queue::MayHoldStale, now, seed)
    }

    /// Drives one call's [`Exchange`] on the client's one socket. Each step
    /// ends the call or moves it on, and the exchange ends it when its
    /// attempts' time has passed. A bound client sends to `dest` and takes
    /// only datagrams from it.
    fn exchange(
        &self,
        socket: &Socket,
        state: &mut State,
        call: &mut Exchange<'_>,
        dest: SocketAddr,
        request: &[u8],
        buf: &mut [u8],
    ) -> Result<usize, Error> {
        let connected = self.peer.is_some();
        let mut now = Instant::now();
        loop {
            match call.next(now) {
                Step::Send if connected => {
                    let sent = socket.send(call.wire(request));
                    call.sent(sent);
                }
                Step::Send => {
                    let sent = self.send_to(socket, dest, call.wire(request));
                    call.sent(sent);
                }
                Step::Discard | Step::Check if !connected => {
                    let received = self.recv_from(socket, dest, buf, true);
                    call.received(received, request, buf);
                }
                Step::Discard => {
                    let received = sys::recv_nonblocking(socket, buf).map(|len| (len, false));
                    call.received(received, request, buf);
                }
                Step::Check => call.received(sys::recv_dont_wait(socket, buf), request, buf),
                Step::Poll => {
                    let received = match connected {
                        true => sys::recv_dont_wait(socket, buf),
                        false => self.recv_from(socket, dest, buf, true),
                    };
                    if received.as_ref().is_err_and(error::is_timeout) {
                        std::hint::spin_loop();
                    }
                    call.received(received, request, buf);
                }
                Step::Wait(wait) => {
                    set_read_timeout(socket, state, dest, wait.timeout)?;
                    let received = match connected {
                        true => socket
                            .recv_vectored(&mut [sys::recv_slice(buf)])
                            .map(|(len, flags)| (len, flags.is_truncated())),
                        false => self.recv_from(socket, dest, buf, false),
                    };
                    call.received(received, request, buf);
                }
                Step::Done(outcome) => return outcome,
            }
            now = Instant::now();
        }
    }

    /// Sends `request` to `dest` from a bound client's socket. A refusal
    /// reported on the send concerns an earlier datagram: it ends the call
    /// only if `dest` refused; otherwise the send is asked for again
    /// (`Interrupted`). An error with no report queued is the send's own.
    fn send_to(&self, socket: &Socket, dest: SocketAddr, request: &[u8]) -> io::Result<usize> {
        match socket.send_to(request, &demux::wire(self.local_addr, dest).into()) {
            Err(e) if demux::is_icmp_report(&e) => Err(self.refusal_for(socket, dest, e)),
            other => other,
        }
    }

    /// Receives one datagram on a bound client's socket for a call to
    /// `dest` (without waiting, with `dont_wait`): one from anyone else is
    /// discarded (counted), and a refusal that is not `dest`'s is left
    /// aside; for either, the step is asked for again (`Interrupted`), so
    /// that the wait goes on for what is left of it.
    fn recv_from(
        &self,
        socket: &Socket,
        dest: SocketAddr,
        buf: &mut [u8],
        dont_wait: bool,
    ) -> io::Result<(usize, bool)> {
        match sys::recv_from(socket, buf, dont_wait) {
            Ok((len, truncated, from)) if canonical(from) == canonical(dest) => {
                Ok((len, truncated))
            }
            Ok(_) => {
                self.shared.count_discarded();
                Err(io::ErrorKind::Interrupted.into())
            }
            Err(e) if demux::is_icmp_report(&e) => Err(self.refusal_for(socket, dest, e)),
            Err(e) => Err(e),
        }
    }

    /// The error for a call to `dest` when a bound client's socket returned
    /// `e`, an ICMP report: `ConnectionRefused` if the error queue says
    /// `dest` refused (Linux, `IP_RECVERR`); `e` itself if it was the
    /// call's own (see [`demux::is_own_error`]: a send to a network this
    /// socket cannot reach, say); else `Interrupted` (someone else refused,
    /// or the platform does not say who), and the step is asked for again.
    fn refusal_for(&self, socket: &Socket, dest: SocketAddr, e: io::Error) -> io::Error {
        let mut start = [0u8; 64];
        let mut refused = false;
        let queued = demux::read_reports(socket, &mut start, |report, _| {
            refused |= report.refused && report.dest.map(canonical) == Some(canonical(dest));
        });
        if refused {
            io::ErrorKind::ConnectionRefused.into()
        } else if demux::is_own_error(&e, queued) {
            e
        } else {
            io::ErrorKind::Interrupted.into()
        }
    }
}

/// Where a call goes: `addr` (`send_recv_to`), or without one
/// (`send_recv`) the client's server. A connected client (`peer`) calls only
/// its server; a bound one (at `local`) has none of its own.
pub(crate) fn destination(
    peer: Option<SocketAddr>,
    local: SocketAddr,
    addr: Option<SocketAddr>,
) -> Result<SocketAddr, Error> {
    match (peer, addr) {
        (Some(peer), Some(addr)) if canonical(peer) != canonical(addr) => {
            Err(Error::WrongDestination {
                addr,
                peer: Some(peer),
            })
        }
        (None, Some(addr)) if local.is_ipv4() && !canonical(addr).is_ipv4() => {
            Err(Error::AddressFamily { addr, local })
        }
        (_, Some(addr)) => Ok(addr),
        (Some(peer), None) => Ok(peer),
        (None, None) => Err(Error::WrongDestination {
            addr: local,
            peer: None,
        }),
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The state holds no invariant a panic could break.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sets the socket's read timeout to `wait`, or to [`MIN_WAIT`] if it is
/// shorter: never to zero, which would mean no timeout at all.
fn set_read_timeout(
    socket: &Socket,
    state: &mut State,
    dest: SocketAddr,
    wait: Duration,
) -> Result<(), Error> {
    let wait = wait.max(MIN_WAIT);
    if state.read_timeout != Some(wait) {
        socket
            .set_read_timeout(Some(wait))
            .map_err(|e| exchange::io_error(dest, "set the read timeout for", e))?;
        state.read_timeout = Some(wait);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::thread;
    use std::time::{Duration, Instant};

    use super::{Turn, lock};

    /// Long enough for any thread here to finish on a loaded machine: a
    /// hang guard, not a measurement.
    const GUARD: Duration = Duration::from_secs(30);

    #[test]
    fn every_caller_gets_the_turn_one_at_a_time_and_none_is_left_waiting() {
        const THREADS: usize = 8;
        const TAKES: usize = 2_000;
        let turn = Arc::new(Turn::default());
        let inside = Arc::new(AtomicBool::new(false));
        let overlaps = Arc::new(AtomicUsize::new(0));
        let (done, finished) = mpsc::channel();
        for _ in 0..THREADS {
            let (turn, inside, overlaps, done) =
                (turn.clone(), inside.clone(), overlaps.clone(), done.clone());
            thread::spawn(move || {
                for _ in 0..TAKES {
                    let Some(held) = turn.take(None) else {
                        return;
                    };
                    if inside.swap(true, Ordering::AcqRel) {
                        overlaps.fetch_add(1, Ordering::Relaxed);
                    }
                    thread::yield_now();
                    inside.store(false, Ordering::Release);
                    drop(held);
                }
                let _ = done.send(());
            });
        }
        for _ in 0..THREADS {
            // A lost wake-up leaves a thread waiting for ever.
            finished
                .recv_timeout(GUARD)
                .expect("every thread takes the turn 2 000 times");
        }
        assert_eq!(
            overlaps.load(Ordering::Relaxed),
            0,
            "two calls held the turn"
        );
        let state = lock(&turn.state);
        assert!(!state.busy);
        assert_eq!(state.waiting, 0);
    }

    #[test]
    fn a_caller_whose_time_runs_out_stops_waiting_and_is_not_counted() {
        let turn = Arc::new(Turn::default());
        let held = turn.take(None).expect("a free turn");
        let (tx, rx) = mpsc::channel();
        let waiter = turn.clone();
        thread::spawn(move || {
            let until = Instant::now() + Duration::from_millis(1);
            let _ = tx.send(waiter.take(Some(until)).is_some());
        });
        let got = rx.recv_timeout(GUARD).expect("the waiter gives up");
        assert!(!got, "the turn was held all along");
        assert_eq!(lock(&turn.state).waiting, 0);
        // A deadline already past gives up at once while the turn is held;
        // a free turn is taken whatever the deadline.
        assert!(turn.take(Some(Instant::now())).is_none());
        drop(held);
        assert!(turn.take(Some(Instant::now())).is_some());
        assert_eq!(lock(&turn.state).waiting, 0);
    }
}
