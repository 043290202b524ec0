//! The blocking client's calls multiplexed by request id: many threads'
//! calls in flight at once on one socket.
//!
//! No thread of its own: of the calls waiting on a socket, one at a time
//! holds its *receive turn* and receives for all of them, handing each
//! datagram to the call it answers through the socket's [`Demux`] and
//! waking that call's thread. The others park until their reply comes,
//! their attempt's wait ends, or the turn is handed to them. A call gives
//! the turn up when its own wait is over (its reply came, or its attempt
//! timed out), and hands it to a call still waiting.

use std::io;
use std::net::SocketAddr;
use std::sync::{Mutex, TryLockError};
use std::thread;
use std::time::{Duration, Instant};

use socket2::Socket;

use super::MIN_WAIT;
use super::demux::{self, Demux, Key, Sink, Waiter, is_icmp_report};
use super::exchange::{Exchange, Queue, Shared, Step};
use crate::error::{self, Error};
use crate::sys::{self, Source};

/// Datagrams one receive call takes at most.
const BATCH: usize = 32;

/// One socket shared by multiplexed calls.
#[derive(Debug)]
pub(crate) struct MuxSocket {
    socket: Socket,
    demux: Demux,
    /// The receive turn: its holder receives for every call.
    turn: Mutex<Receiver>,
}

/// What the holder of the receive turn uses.
struct Receiver {
    source: Source,
    woken: Vec<Waiter>,
    /// The socket's read timeout as last set.
    read_timeout: Option<Duration>,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("read_timeout", &self.read_timeout)
            .finish_non_exhaustive()
    }
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
        let mut table = self.mux.demux.lock();
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
    /// kernel was asked to queue ICMP errors (`sys::enable_recverr`).
    pub(crate) fn new(
        socket: Socket,
        peer: Option<SocketAddr>,
        recverr: bool,
        local: SocketAddr,
    ) -> MuxSocket {
        let source = demux::receive_batch(&socket, BATCH);
        MuxSocket {
            socket,
            demux: Demux::new(peer, recverr, local),
            turn: Mutex::new(Receiver {
                source,
                woken: Vec::with_capacity(BATCH),
                read_timeout: None,
            }),
        }
    }

    /// How many calls are in flight on the socket.
    pub(crate) fn in_flight(&self) -> usize {
        self.demux.lock().len()
    }

    /// One call with `key` (its destination and request id): the reply goes
    /// into `buf`.
    pub(crate) fn call(
        &self,
        shared: &Shared,
        key: Key,
        request: &[u8],
        buf: &mut Sink<'_>,
        seed: u64,
    ) -> Result<usize, Error> {
        let slot = self.demux.register(shared, key, request, buf.capacity())?;
        let dest = key.addr();
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
                Step::Send => {
                    let sent = self.send(shared, dest, call.wire(request));
                    call.sent(sent);
                }
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
    /// an earlier datagram: it is handed to the calls it concerns, and on an
    /// unconnected socket the send is made again.
    fn send(&self, shared: &Shared, dest: SocketAddr, request: &[u8]) -> io::Result<usize> {
        let wire = self.demux.wire(dest).into();
        self.demux.send(shared, &self.socket, || {
            // Another call may be receiving without waiting right now,
            // which outside Unix switches the socket's mode.
            sys::send_blocking(&self.socket, || match self.demux.peer() {
                Some(_) => self.socket.send(request),
                None => self.socket.send_to(request, &wire),
            })
        })
    }

    /// Takes what has come for the call: its reply (copied into `buf`), a
    /// refusal, or `WouldBlock`; with `waiter`, keeps it to be woken.
    fn take(
        &self,
        registered: &Registered<'_>,
        buf: &mut Sink<'_>,
        waiter: Option<Waiter>,
    ) -> io::Result<(usize, bool)> {
        let taken = self.demux.lock().take(registered.slot, waiter);
        buf.accept(taken)
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
        let table = self.demux.lock();
        let next = match self.turn.try_lock() {
            Ok(_) => table.waiting_thread(slot),
            Err(_) => None,
        };
        drop(table);
        if let Some(thread) = next {
            thread.unpark();
        }
    }

    /// Receives a batch of datagrams (waiting until `until` for the first,
    /// or not at all with `None`) and hands each to its call; refusals are
    /// handed on too. Fails only for an error of the socket itself.
    fn receive(
        &self,
        receiver: &mut Receiver,
        shared: &Shared,
        until: Option<Instant>,
    ) -> io::Result<()> {
        if let Some(until) = until {
            let wait = until
                .saturating_duration_since(Instant::now())
                .max(MIN_WAIT);
            if receiver.read_timeout != Some(wait) {
                self.socket.set_read_timeout(Some(wait))?;
                receiver.read_timeout = Some(wait);
            }
        }
        match receiver.source.recv(&self.socket, until.is_none()) {
            Ok(count) => {
                self.demux
                    .deliver_all(shared, &mut receiver.source, count, &mut receiver.woken);
                Ok(())
            }
            Err(e) if error::is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(e) if is_icmp_report(&e) => {
                self.demux.reported(shared, &self.socket, &e);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}
