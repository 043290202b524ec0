//! The async client's calls multiplexed by request id: any number of calls
//! in flight on one socket.
//!
//! A receive task per socket (spawned on the client's runtime, ended when
//! the client is dropped) receives every datagram, hands it to the call it
//! answers through the socket's [`Table`], and wakes that call's task. A
//! call registers in the table, sends, and waits for its inbox; dropped at
//! any await point, it leaves the table, and a reply that comes for it
//! later matches nothing.

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;
use std::task::Waker;
use std::time::{Duration, Instant};

use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::oneshot;

use crate::client::demux::{self, Demux, Key, Sink, Taken, Waiter, is_icmp_report};
use crate::client::exchange::{Exchange, Shared, Step};
use crate::error::{self, Error};
use crate::sys::Source;

/// Receive calls the receive task makes in one turn before it yields: up
/// to 1 024 datagrams, so that a socket shared by thousands of calls is
/// drained before its buffer overflows, even on a busy runtime.
const TURN: usize = 32;

/// How long the receive task pauses after an error of its socket.
const ERROR_PAUSE: Duration = Duration::from_millis(1);

/// Datagrams one receive call takes at most (where the platform batches).
const BATCH: usize = 32;

/// One socket shared by multiplexed calls.
#[derive(Debug)]
pub(crate) struct AsyncMux {
    socket: UdpSocket,
    demux: Demux,
}

/// A call's place in the table, given back when its reply is taken (under
/// the same lock), or else when the call ends or its future is dropped.
struct Registered<'m> {
    mux: &'m AsyncMux,
    slot: usize,
    /// Given back already: the index may be another call's now.
    freed: AtomicBool,
}

impl Registered<'_> {
    /// What has come for the call (see [`Table::take`]), keeping `waker` to
    /// be woken when nothing has; a reply gives the place back at once.
    fn take(&self, waker: Option<&Waker>) -> Option<Taken> {
        if self.freed.load(Ordering::Relaxed) {
            return None;
        }
        let mut table = self.mux.demux.lock();
        let taken = match waker {
            Some(waker) => table.poll_take(self.slot, waker),
            None => table.take(self.slot, None),
        };
        if let Some(Taken::Reply(_)) = taken {
            table.remove(self.slot);
            self.freed.store(true, Ordering::Relaxed);
        }
        taken
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        if !self.freed.load(Ordering::Relaxed) {
            self.mux.demux.lock().remove(self.slot);
        }
    }
}

impl AsyncMux {
    /// A shared socket (registered with the runtime) bound to `local`,
    /// connected to `peer` or not; with `recverr` the kernel queues ICMP
    /// errors. Its receive task is [`receive`].
    pub(crate) fn new(
        socket: UdpSocket,
        peer: Option<SocketAddr>,
        recverr: bool,
        local: SocketAddr,
    ) -> Arc<AsyncMux> {
        Arc::new(AsyncMux {
            socket,
            demux: Demux::new(peer, recverr, local),
        })
    }

    /// How many calls are in flight on the socket.
    pub(crate) fn in_flight(&self) -> usize {
        self.demux.lock().len()
    }

    /// One call with `key` (its destination and request id), driving `call`
    /// from `now`; the reply goes into `buf`.
    ///
    /// (A function returning an `async move` block, not an `async fn`: the
    /// block holds each argument once, where an `async fn`'s future holds
    /// its arguments twice.)
    #[allow(clippy::manual_async_fn)]
    pub(crate) fn call(
        &self,
        shared: &Shared,
        key: Key,
        request: &[u8],
        buf: &mut Sink<'_>,
        call: &mut Exchange<'_>,
        now: Instant,
    ) -> impl Future<Output = Result<usize, Error>> {
        async move {
            let slot = self.demux.register(shared, key, request, buf.capacity())?;
            let wire = self.demux.wire(key.addr());
            let registered = Registered {
                mux: self,
                slot,
                freed: AtomicBool::new(false),
            };
            // The clock is read again only after a step that may have taken
            // time to no avail (a send takes microseconds, and a wait that
            // brought the reply ends the call).
            let mut now = now;
            loop {
                match call.next(now) {
                    Step::Send => {
                        let sent = self.send(shared, wire, call.wire(request)).await;
                        call.sent(sent);
                    }
                    Step::Discard | Step::Check | Step::Poll => {
                        let received = buf.accept(registered.take(None));
                        if received.as_ref().is_err_and(error::is_timeout) {
                            // The receive task runs between tries.
                            tokio::task::yield_now().await;
                        }
                        call.received(received, request, buf.bytes());
                        now = Instant::now();
                    }
                    Step::Wait(wait) => {
                        let inbox =
                            poll_fn(|cx| match buf.accept(registered.take(Some(cx.waker()))) {
                                Err(e) if error::is_timeout(&e) => Poll::Pending,
                                done => Poll::Ready(done),
                            });
                        let received = tokio::time::timeout_at(wait.until.into(), inbox)
                            .await
                            .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()));
                        if received.is_err() {
                            now = Instant::now();
                        }
                        call.received(received, request, buf.bytes());
                    }
                    Step::Done(outcome) => return outcome,
                }
            }
        }
    }

    /// Sends `request` to `wire` (see [`Demux::wire`]): at once where the
    /// socket can take it, which is nearly always, else in a boxed future
    /// that waits for room. (Either way each call's future carries no
    /// tokio `send` future, 200 to 400 bytes copied as every call's future
    /// is made. The `poll_send` methods are no way out: they keep one
    /// waker, and calls sharing the socket would not all be woken.)
    async fn send(&self, shared: &Shared, wire: SocketAddr, request: &[u8]) -> io::Result<usize> {
        match self.try_send(shared, wire, request) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                Box::pin(self.send_when_ready(shared, wire, request)).await
            }
            other => other,
        }
    }

    /// Sends `request` without waiting (`WouldBlock` if the socket cannot
    /// take it now); a refusal reported on the send concerns an earlier
    /// datagram (see the blocking client's): on an unconnected socket the
    /// request is sent again.
    fn try_send(&self, shared: &Shared, wire: SocketAddr, request: &[u8]) -> io::Result<usize> {
        let connected = self.demux.peer().is_some();
        self.demux
            .send(shared, &SockRef::from(&self.socket), || match connected {
                true => self.socket.try_send(request),
                false => self.socket.try_send_to(request, wire),
            })
    }

    /// [`try_send`](AsyncMux::try_send), waiting until the socket can take
    /// the request.
    async fn send_when_ready(
        &self,
        shared: &Shared,
        wire: SocketAddr,
        request: &[u8],
    ) -> io::Result<usize> {
        self.socket
            .async_io(Interest::WRITABLE, || self.try_send(shared, wire, request))
            .await
    }

    /// Receives up to [`TURN`] batches of datagrams without waiting
    /// (`recvmmsg` where the platform has it) and hands each to its call;
    /// `WouldBlock` once the socket is empty.
    fn receive_some(
        &self,
        shared: &Shared,
        source: &mut Source,
        woken: &mut Vec<Waiter>,
    ) -> io::Result<()> {
        let socket = SockRef::from(&self.socket);
        for _ in 0..TURN {
            match source.recv(&socket, true) {
                Ok(count) => self.demux.deliver_all(shared, source, count, woken),
                Err(e) if is_icmp_report(&e) => {
                    self.demux.reported(shared, &socket, &e);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// The receive task of `mux`: see the module's documentation. Ends when
/// `stop`'s sender is dropped.
pub(crate) async fn receive(
    mux: Arc<AsyncMux>,
    shared: Arc<Shared>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut source = demux::receive_batch(&SockRef::from(&mux.socket), BATCH);
    let mut woken = Vec::with_capacity(BATCH);
    loop {
        let turn = {
            // ERROR too: an ICMP error sets the socket's error without
            // making it readable.
            let io = mux
                .socket
                .async_io(Interest::READABLE | Interest::ERROR, || {
                    mux.receive_some(&shared, &mut source, &mut woken)
                });
            let mut io = pin!(io);
            poll_fn(|cx| {
                if Pin::new(&mut stop).poll(cx).is_ready() {
                    return Poll::Ready(None);
                }
                io.as_mut().poll(cx).map(Some)
            })
            .await
        };
        match turn {
            None => return,
            // A full turn: let other tasks run first.
            Some(Ok(())) => tokio::task::yield_now().await,
            // An error of the socket itself: try again shortly, rather
            // than spin on an error that lasts.
            Some(Err(_)) => tokio::time::sleep(ERROR_PAUSE).await,
        }
    }
}
