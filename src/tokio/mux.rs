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
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::Instant;

use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::oneshot;

use crate::client::MAX_REPLY;
use crate::client::demux::{Delivery, Key, Sink, Table, Waiter};
use crate::client::exchange::{Exchange, Shared, Step};
use crate::error::{self, Error};
use crate::sys::{self, BatchSpec, Source};

/// Receive calls the receive task makes in one turn before it yields: up
/// to 1 024 datagrams, so that a socket shared by thousands of calls is
/// drained before its buffer overflows, even on a busy runtime.
const TURN: usize = 32;

/// Datagrams one receive call takes at most (where the platform batches).
const BATCH: usize = 32;

/// One socket shared by multiplexed calls.
#[derive(Debug)]
pub(crate) struct AsyncMux {
    socket: UdpSocket,
    /// The server the socket is connected to; `None`: unconnected.
    peer: Option<SocketAddr>,
    /// The kernel queues ICMP errors with their destination.
    recverr: bool,
    table: Mutex<Table>,
}

/// A call's place in the table, given back when the call ends or its
/// future is dropped.
struct Registered<'m> {
    mux: &'m AsyncMux,
    slot: usize,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.mux.lock_table().remove(self.slot);
    }
}

impl AsyncMux {
    /// A shared socket (registered with the runtime), and the receive task
    /// to spawn for it, which ends when `stop`'s sender is dropped.
    pub(crate) fn new(socket: UdpSocket, peer: Option<SocketAddr>, recverr: bool) -> Arc<AsyncMux> {
        Arc::new(AsyncMux {
            socket,
            peer,
            recverr,
            table: Mutex::new(Table::default()),
        })
    }

    fn lock_table(&self) -> MutexGuard<'_, Table> {
        // Consistent between any two statements that change it.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many calls are in flight on the socket.
    pub(crate) fn in_flight(&self) -> usize {
        self.lock_table().len()
    }

    /// One call with request id `id` to `dest`; the reply goes into `buf`.
    pub(crate) async fn call(
        &self,
        shared: &Shared,
        dest: SocketAddr,
        id: u64,
        request: &[u8],
        buf: &mut Sink<'_>,
        call: &mut Exchange<'_>,
    ) -> Result<usize, Error> {
        let check = shared.settings.check.is_some().then_some(request);
        let Some(slot) = self.lock_table().register(Key::new(dest, id), check) else {
            return Err(Error::IdInUse { addr: dest, id });
        };
        let registered = Registered { mux: self, slot };
        // The clock is read again only after a step that may have taken
        // time to no avail (a send takes microseconds, and a wait that
        // brought the reply ends the call).
        let mut now = Instant::now();
        loop {
            match call.next(now) {
                Step::Send => call.sent(self.send(shared, dest, request).await),
                Step::Discard | Step::Check | Step::Poll => {
                    let received = self.take(&registered, buf);
                    if received.as_ref().is_err_and(error::is_timeout) {
                        // The receive task runs between tries.
                        tokio::task::yield_now().await;
                    }
                    call.received(received, request, buf.bytes());
                    now = Instant::now();
                }
                Step::Wait(wait) => {
                    let inbox = poll_fn(|cx| {
                        let taken = self.lock_table().poll_take(registered.slot, cx.waker());
                        match taken {
                            Some(Ok(reply)) => Poll::Ready(Ok(buf.put(reply))),
                            Some(Err(e)) => Poll::Ready(Err(e)),
                            None => Poll::Pending,
                        }
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

    /// Sends `request` to `dest`; a refusal reported on the send concerns
    /// an earlier datagram (see the blocking client's).
    async fn send(&self, shared: &Shared, dest: SocketAddr, request: &[u8]) -> io::Result<usize> {
        let sent = match self.peer {
            Some(_) => self.socket.send(request).await,
            None => self.socket.send_to(request, dest).await,
        };
        match sent {
            Err(e) if is_refusal(&e) && self.peer.is_none() => {
                self.refusals(shared);
                self.socket.send_to(request, dest).await
            }
            Err(e) if is_refusal(&e) => {
                self.refuse(shared, None, None);
                Err(e)
            }
            other => other,
        }
    }

    /// What has come for the call: its reply (put in `buf`), a refusal, or
    /// `WouldBlock`.
    fn take(&self, registered: &Registered<'_>, buf: &mut Sink<'_>) -> io::Result<(usize, bool)> {
        let taken = self.lock_table().take(registered.slot, None);
        match taken {
            Some(Ok(reply)) => Ok(buf.put(reply)),
            Some(Err(e)) => Err(e),
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    /// Receives up to [`TURN`] batches of datagrams without waiting
    /// (`recvmmsg` where the platform has it) and hands each to its call,
    /// waking the calls once the table is released; `WouldBlock` once the
    /// socket is empty.
    fn receive_some(
        &self,
        shared: &Shared,
        source: &mut Source,
        woken: &mut Vec<Waiter>,
    ) -> io::Result<()> {
        let socket = SockRef::from(&self.socket);
        let Some(read) = &shared.settings.request_id else {
            return Err(io::ErrorKind::Unsupported.into());
        };
        for _ in 0..TURN {
            match source.recv(&socket, true) {
                Ok(count) => {
                    let mut table = self.lock_table();
                    for i in 0..count {
                        let Some((datagram, _)) = source.datagram(i) else {
                            continue;
                        };
                        if datagram.truncated {
                            shared.count_discarded();
                            continue;
                        }
                        let delivery = table.deliver(shared, read, datagram.peer, datagram.data);
                        if let Delivery::Delivered(waiter) = delivery {
                            woken.push(waiter);
                        }
                    }
                    drop(table);
                    for waiter in woken.drain(..) {
                        waiter.wake();
                    }
                }
                Err(e) if is_refusal(&e) => match self.peer {
                    Some(_) => self.refuse(shared, None, None),
                    None => self.refusals(shared),
                },
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads every refusal queued on an unconnected socket and hands each
    /// to the calls it concerns.
    fn refusals(&self, shared: &Shared) {
        if !self.recverr {
            return;
        }
        let socket = SockRef::from(&self.socket);
        let mut start = [0u8; 512];
        for _ in 0..1024 {
            let Ok(queued) = sys::recv_error(&socket, &mut start) else {
                return;
            };
            if let (true, Some(dest)) = (queued.refused, queued.dest) {
                let id = start
                    .get(..queued.len)
                    .zip(shared.settings.request_id.as_ref())
                    .and_then(|(sent, read)| read(sent));
                self.refuse(shared, Some(dest), id);
            }
        }
    }

    /// Hands a refusal to the calls it concerns, unless refusals count as
    /// losses.
    fn refuse(&self, shared: &Shared, dest: Option<SocketAddr>, id: Option<u64>) {
        if shared.settings.refused_as_loss {
            return;
        }
        let woken = self.lock_table().refuse(dest, id);
        for waiter in woken {
            waiter.wake();
        }
    }
}

/// The receive task of `mux`: see the module's documentation. Ends when
/// `stop`'s sender is dropped.
pub(crate) async fn receive(
    mux: Arc<AsyncMux>,
    shared: Arc<Shared>,
    mut stop: oneshot::Receiver<()>,
) {
    let spec = BatchSpec {
        size: BATCH,
        max_datagram: MAX_REPLY,
        pktinfo: false,
        gso: false,
    };
    let mut source = Source::new(&SockRef::from(&mux.socket), Some(spec), MAX_REPLY, false);
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
            // A full turn, or an error of the socket itself (which the next
            // turn may not see again): let other tasks run first.
            Some(_) => tokio::task::yield_now().await,
        }
    }
}

/// A refusal: ICMP port unreachable (reported as `ECONNRESET` on Windows).
fn is_refusal(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset
    )
}
