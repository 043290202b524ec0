//! The blocking client's calls multiplexed by request id: many threads'
//! calls in flight at once on one socket.
//!
//! No thread of its own: of the calls waiting on a socket, one at a time
//! holds its *receive turn* and receives for all of them, handing each
//! datagram to the call it answers through the socket's [`Table`] and
//! waking that call's thread. The others park until their reply comes,
//! their attempt's wait ends, or the turn is handed to them. A call gives
//! the turn up when its own wait is over (its reply came, or its attempt
//! timed out), and hands it to a call still waiting.

use std::io;
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard, TryLockError};
use std::thread;
use std::time::{Duration, Instant};

use socket2::Socket;

use super::demux::{Delivery, Key, RequestId, Sink, Table, Waiter};
use super::exchange::{Exchange, Queue, Shared, Step};
use super::{MAX_REPLY, MIN_WAIT};
use crate::error::{self, Error};
use crate::sys;

/// One socket shared by multiplexed calls.
#[derive(Debug)]
pub(crate) struct MuxSocket {
    socket: Socket,
    /// The server the socket is connected to; `None`: unconnected.
    peer: Option<SocketAddr>,
    /// The kernel queues ICMP errors with their destination
    /// (`IP_RECVERR`), so refusals can be told apart.
    recverr: bool,
    table: Mutex<Table>,
    /// The receive turn: its holder receives for every call.
    turn: Mutex<Receiver>,
}

/// What the holder of the receive turn uses.
#[derive(Debug)]
struct Receiver {
    buf: Vec<u8>,
    /// The socket's read timeout as last set.
    read_timeout: Option<Duration>,
}

/// A call's place in the table, given back when the call ends (or
/// unwinds), and with it the receive turn to a waiting call if nobody
/// holds it.
struct Registered<'m> {
    mux: &'m MuxSocket,
    slot: usize,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        let mut table = self.mux.lock_table();
        table.remove(self.slot);
        let next = match self.mux.turn.try_lock() {
            Ok(_) => table.waiting_thread(self.slot),
            Err(_) => None,
        };
        drop(table);
        if let Some(thread) = next {
            thread.unpark();
        }
    }
}

impl MuxSocket {
    /// A shared socket, connected to `peer` or not; with `recverr` the
    /// kernel was asked to queue ICMP errors ([`sys::enable_recverr`]).
    pub(crate) fn new(socket: Socket, peer: Option<SocketAddr>, recverr: bool) -> MuxSocket {
        MuxSocket {
            socket,
            peer,
            recverr,
            table: Mutex::new(Table::default()),
            turn: Mutex::new(Receiver {
                buf: vec![0; MAX_REPLY],
                read_timeout: None,
            }),
        }
    }

    /// How many calls are in flight on the socket.
    pub(crate) fn in_flight(&self) -> usize {
        self.lock_table().len()
    }

    fn lock_table(&self) -> MutexGuard<'_, Table> {
        // The table is consistent between any two statements that change
        // it: a panic (in a reply check) leaves nothing half done.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One call with request id `id` to `dest`: the reply goes into `buf`.
    pub(crate) fn call(
        &self,
        shared: &Shared,
        dest: SocketAddr,
        id: u64,
        request: &[u8],
        buf: &mut Sink<'_>,
        seed: u64,
    ) -> Result<usize, Error> {
        let check = shared.settings.check.is_some().then_some(request);
        let Some(slot) = self.lock_table().register(Key::new(dest, id), check) else {
            return Err(Error::IdInUse { addr: dest, id });
        };
        let registered = Registered { mux: self, slot };
        let mut call = Exchange::new(
            shared,
            dest,
            buf.capacity(),
            Queue::Drained,
            Instant::now(),
            seed,
        );
        loop {
            match call.next(Instant::now()) {
                Step::Send => call.sent(self.send(shared, dest, request)),
                Step::Discard | Step::Check | Step::Poll => {
                    let failed = match self.turn.try_lock() {
                        Ok(mut receiver) => self.receive(&mut receiver, shared, None).err(),
                        Err(_) => None,
                    };
                    let received = match failed {
                        Some(e) => Err(e),
                        None => self.take(&registered, buf, None),
                    };
                    if received.as_ref().is_err_and(error::is_timeout) {
                        std::hint::spin_loop();
                    }
                    call.received(received, request, buf.bytes());
                }
                Step::Wait(wait) => {
                    let received = self.wait(&registered, shared, buf, wait.until);
                    call.received(received, request, buf.bytes());
                }
                Step::Done(outcome) => return outcome,
            }
        }
    }

    /// Sends `request` to `dest`. A refusal reported on the send concerns
    /// an earlier datagram: on an unconnected socket it is read from the
    /// error queue and handed to its call, and the send is made again.
    fn send(&self, shared: &Shared, dest: SocketAddr, request: &[u8]) -> io::Result<usize> {
        let send = || match self.peer {
            Some(_) => self.socket.send(request),
            None => self.socket.send_to(request, &dest.into()),
        };
        match send() {
            Err(e) if is_refusal(&e) && self.peer.is_none() => {
                self.refusals(shared);
                send()
            }
            Err(e) if is_refusal(&e) => {
                // The connected peer refused an earlier request: every call
                // on the socket is to it.
                self.refuse(shared, None, None);
                Err(e)
            }
            other => other,
        }
    }

    /// Takes what has come for the call: its reply (copied into `buf`), a
    /// refusal, or `WouldBlock`; with `waiter`, keeps it to be woken.
    fn take(
        &self,
        registered: &Registered<'_>,
        buf: &mut Sink<'_>,
        waiter: Option<Waiter>,
    ) -> io::Result<(usize, bool)> {
        let taken = self.lock_table().take(registered.slot, waiter);
        match taken {
            Some(Ok(reply)) => Ok(buf.put(reply)),
            Some(Err(e)) => Err(e),
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    /// Waits until something comes for the call or `until` passes
    /// (`TimedOut`): receiving for every call while it holds the receive
    /// turn, parked while another call does.
    fn wait(
        &self,
        registered: &Registered<'_>,
        shared: &Shared,
        buf: &mut Sink<'_>,
        until: Instant,
    ) -> io::Result<(usize, bool)> {
        loop {
            let waiter = Waiter::Thread(thread::current());
            match self.take(registered, buf, Some(waiter)) {
                Err(e) if error::is_timeout(&e) => {}
                done => return done,
            }
            let now = Instant::now();
            if now >= until {
                return Err(io::ErrorKind::TimedOut.into());
            }
            match self.turn.try_lock() {
                Ok(mut receiver) => {
                    let done = loop {
                        if let Err(e) = self.receive(&mut receiver, shared, Some(until)) {
                            break Err(e);
                        }
                        match self.take(registered, buf, None) {
                            Err(e) if error::is_timeout(&e) && Instant::now() < until => {}
                            Err(e) if error::is_timeout(&e) => {
                                break Err(io::ErrorKind::TimedOut.into());
                            }
                            done => break done,
                        }
                    };
                    drop(receiver);
                    self.hand_on(registered.slot);
                    return done;
                }
                Err(TryLockError::WouldBlock) => {
                    thread::park_timeout(until.saturating_duration_since(now));
                }
                Err(TryLockError::Poisoned(_)) => {
                    // A receive cannot panic while holding the turn; clear
                    // it anyway, and try again.
                    self.turn.clear_poison();
                }
            }
        }
    }

    /// Hands the receive turn, just given up by the call in `slot`, to a
    /// call still waiting, if nobody has taken it.
    fn hand_on(&self, slot: usize) {
        let table = self.lock_table();
        let next = match self.turn.try_lock() {
            Ok(_) => table.waiting_thread(slot),
            Err(_) => None,
        };
        drop(table);
        if let Some(thread) = next {
            thread.unpark();
        }
    }

    /// Receives one datagram (waiting until `until`, or not at all with
    /// `None`) and hands it to its call; errors that concern the calls
    /// (refusals) are handed on too. Fails only for an error of the socket
    /// itself.
    fn receive(
        &self,
        receiver: &mut Receiver,
        shared: &Shared,
        until: Option<Instant>,
    ) -> io::Result<()> {
        let received = match until {
            None => sys::recv_from_dont_wait(&self.socket, &mut receiver.buf),
            Some(until) => {
                let wait = until
                    .saturating_duration_since(Instant::now())
                    .max(MIN_WAIT);
                if receiver.read_timeout != Some(wait) {
                    self.socket.set_read_timeout(Some(wait))?;
                    receiver.read_timeout = Some(wait);
                }
                recv_from(&self.socket, &mut receiver.buf)
            }
        };
        match received {
            Ok((len, from)) => {
                let datagram = receiver.buf.get(..len).unwrap_or_default();
                let request_id = request_id(shared);
                let delivery = self
                    .lock_table()
                    .deliver(shared, request_id, from, datagram);
                if let Delivery::Delivered(waiter) = delivery {
                    waiter.wake();
                }
                Ok(())
            }
            Err(e) if error::is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(e) if is_refusal(&e) => {
                match self.peer {
                    Some(_) => self.refuse(shared, None, None),
                    None => self.refusals(shared),
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Reads every refusal queued on an unconnected socket and hands each to
    /// the call it concerns: by destination, and by request id where the
    /// returned start of the request holds it.
    fn refusals(&self, shared: &Shared) {
        if !self.recverr {
            return;
        }
        let mut start = [0u8; 512];
        // Bounded: the queue holds at most a receive buffer's worth.
        for _ in 0..1024 {
            let Ok(queued) = sys::recv_error(&self.socket, &mut start) else {
                return;
            };
            if queued.refused {
                if let Some(dest) = queued.dest {
                    let id = start
                        .get(..queued.len)
                        .and_then(|sent| request_id(shared)(sent));
                    self.refuse(shared, Some(dest), id);
                }
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

/// The client's request id reader; a multiplexing client always has one.
fn request_id(shared: &Shared) -> &RequestId {
    static NONE: std::sync::OnceLock<RequestId> = std::sync::OnceLock::new();
    shared
        .settings
        .request_id
        .as_ref()
        .unwrap_or_else(|| NONE.get_or_init(|| std::sync::Arc::new(|_: &[u8]| None)))
}

/// A refusal: ICMP port unreachable (reported as `ECONNRESET` on Windows).
fn is_refusal(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset
    )
}

/// Receives one datagram and its sender, waiting up to the socket's read
/// timeout.
fn recv_from(socket: &Socket, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
    let (len, _truncated, from) = socket.recv_from_vectored(&mut [sys::recv_slice(buf)])?;
    let from = from.as_socket().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "a datagram without an IP sender",
        )
    })?;
    Ok((len, from))
}
