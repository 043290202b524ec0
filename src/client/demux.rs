//! Calls multiplexed by request id on shared sockets, written once for both
//! clients: which call each arriving datagram (or ICMP refusal) belongs to.
//!
//! A [`Table`] holds the calls in flight on one socket, keyed by where each
//! request went and the id it carries. Whoever receives on the socket (a
//! blocking client's thread that holds the receive turn, or the async
//! client's receive task) hands every datagram to [`Table::deliver`], which
//! reads its id, finds the call it answers, judges it against that call's
//! reply check, and keeps it in the call's inbox; the waiter it returns is
//! woken once the table's lock is released. The table does no I/O and no
//! waiting: the clients do those around it.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;
use std::thread::Thread;

use socket2::Socket;

use super::exchange::Shared;
use crate::error::Error;
use crate::sys::{self, Source};

/// Reads the request id of a request or a reply.
pub(crate) type RequestId = Arc<dyn Fn(&[u8]) -> Option<u64> + Send + Sync>;

/// A call in flight: where its request went and the id it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Key {
    addr: SocketAddr,
    id: u64,
}

impl Hash for Key {
    /// One word per key, mixed by the table's seeded [`KeyHasher`]: keys
    /// that share it are told apart by equality.
    fn hash<H: Hasher>(&self, state: &mut H) {
        let addr = match self.addr.ip() {
            IpAddr::V4(ip) => u64::from(u32::from(ip)),
            IpAddr::V6(ip) => {
                let bits = u128::from(ip);
                (bits as u64) ^ ((bits >> 64) as u64).rotate_left(17)
            }
        };
        let addr = (addr << 16) | u64::from(self.addr.port());
        state.write_u64(self.id.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ addr);
    }
}

/// A fast hasher for [`Key`]s, seeded at random per table: the keys are
/// the client's own calls, and a datagram's key is only looked up, so the
/// seed is all that SipHash would add here, at a fraction of the cost.
#[derive(Debug, Clone, Copy)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 29)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.write_u64(u64::from(byte));
        }
    }

    fn write_u64(&mut self, word: u64) {
        self.0 = (self.0 ^ word)
            .wrapping_mul(0xbf58_476d_1ce4_e5b9)
            .rotate_left(31);
    }
}

/// Makes [`KeyHasher`]s with one table's seed.
#[derive(Debug, Clone, Copy)]
struct Seeded(u64);

impl Default for Seeded {
    fn default() -> Self {
        Seeded(std::collections::hash_map::RandomState::new().hash_one(0u8))
    }
}

impl BuildHasher for Seeded {
    type Hasher = KeyHasher;

    fn build_hasher(&self) -> KeyHasher {
        KeyHasher(self.0)
    }
}

impl Key {
    /// The key of a call to `addr` with request id `id`; an IPv4-mapped
    /// IPv6 address is taken as the IPv4 address it maps, as replies from
    /// it are.
    pub(crate) fn new(addr: SocketAddr, id: u64) -> Key {
        Key {
            addr: canonical(addr),
            id,
        }
    }

    /// Where the call goes (IPv4-mapped addresses written as IPv4).
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Which of `count` shared sockets a call with `key` goes on.
pub(crate) fn pick(
    hasher: &std::collections::hash_map::RandomState,
    key: Key,
    count: usize,
) -> usize {
    use std::hash::BuildHasher;
    (hasher.hash_one(key) % count.max(1) as u64) as usize
}

/// How `dest` is written for a socket bound to `local`: an IPv4 address as
/// IPv4-mapped IPv6 for an IPv6 (dual-stack) socket, as every platform
/// takes it.
pub(crate) fn wire(local: SocketAddr, dest: SocketAddr) -> SocketAddr {
    match (local, dest) {
        (SocketAddr::V6(_), SocketAddr::V4(v4)) => {
            SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
        }
        _ => dest,
    }
}

/// `addr` with an IPv4-mapped IPv6 address written as IPv4.
pub(crate) fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Where a multiplexed call's reply goes.
#[derive(Debug)]
pub(crate) enum Sink<'a> {
    /// A vector the reply is moved into (room for the largest datagram).
    Owned(&'a mut Vec<u8>),
    /// The caller's buffer.
    Borrowed(&'a mut [u8]),
}

impl Sink<'_> {
    pub(crate) fn capacity(&self) -> usize {
        match self {
            Sink::Owned(_) => super::MAX_REPLY,
            Sink::Borrowed(buf) => buf.len(),
        }
    }

    /// The bytes a reply was put in.
    pub(crate) fn bytes(&self) -> &[u8] {
        match self {
            Sink::Owned(vec) => vec,
            Sink::Borrowed(buf) => buf,
        }
    }

    /// What [`Table::take`] gave, as a receive on a socket of the call's
    /// own would: the reply put in (see [`put`](Sink::put)), a refusal, or
    /// `WouldBlock` when nothing has come.
    pub(crate) fn accept(&mut self, taken: Option<Taken>) -> io::Result<(usize, bool)> {
        match taken {
            Some(Taken::Reply(reply) | Taken::Challenge(reply)) => Ok(self.put(reply)),
            Some(Taken::Refused) => Err(io::ErrorKind::ConnectionRefused.into()),
            // Larger than the buffer: reported as a truncated datagram.
            Some(Taken::Oversized) => Ok((self.capacity(), true)),
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    /// Puts `reply` in: its length, and whether it was larger than the
    /// room (then only its start is kept).
    pub(crate) fn put(&mut self, reply: Vec<u8>) -> (usize, bool) {
        match self {
            Sink::Owned(vec) => {
                **vec = reply;
                (vec.len(), false)
            }
            Sink::Borrowed(buf) => {
                let len = reply.len().min(buf.len());
                if let (Some(to), Some(from)) = (buf.get_mut(..len), reply.get(..len)) {
                    to.copy_from_slice(from);
                }
                (len, reply.len() > buf.len())
            }
        }
    }
}

/// Who to wake when a call's inbox fills.
#[derive(Debug, Default)]
pub(crate) enum Waiter {
    /// Nobody is waiting (yet).
    #[default]
    None,
    /// A blocking call's thread, parked.
    Thread(Thread),
    /// An async call's task.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    Task(Waker),
}

impl Waiter {
    pub(crate) fn wake(self) {
        match self {
            Waiter::None => {}
            Waiter::Thread(thread) => thread.unpark(),
            Waiter::Task(waker) => waker.wake(),
        }
    }
}

/// What has come for a call.
#[derive(Debug)]
enum Inbox {
    Empty,
    /// A reply that passed the call's reply check.
    Reply(Vec<u8>),
    /// A challenge (source tokens): the call goes on, and stays listed.
    Challenge(Vec<u8>),
    /// Its destination refused (ICMP port unreachable).
    Refused,
    /// A datagram too large for the call's buffer came, which its reply
    /// check therefore could not judge.
    Oversized,
}

/// What a call takes from its inbox.
#[derive(Debug)]
pub(crate) enum Taken {
    /// Its reply.
    Reply(Vec<u8>),
    /// A challenge: the call sends its request again, and goes on.
    Challenge(Vec<u8>),
    /// A refusal from its destination.
    Refused,
    /// A datagram too large to be checked (see [`Inbox::Oversized`]).
    Oversized,
}

#[derive(Debug)]
struct Slot {
    key: Key,
    /// The call's reply buffer, in bytes.
    capacity: usize,
    /// The key is in the table's map: false once a reply was delivered, so
    /// that a duplicate matches nothing and the key is free for the next
    /// call.
    listed: bool,
    /// The request, kept for the reply check when there is one.
    request: Option<Box<[u8]>>,
    inbox: Inbox,
    waiter: Waiter,
}

/// The calls in flight on one socket; see the module's documentation.
#[derive(Debug, Default)]
pub(crate) struct Table {
    calls: HashMap<Key, usize, Seeded>,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
}

/// What became of a datagram handed to [`Table::deliver`].
#[derive(Debug)]
pub(crate) enum Delivery {
    /// Kept for its call: wake this waiter (after releasing the table).
    Delivered(Waiter),
    /// Discarded (and counted): no id, no call with its key, a reply the
    /// call already has, or one that failed the call's reply check.
    Discarded,
}

impl Table {
    /// Registers a call with `key`, keeping `request` for its reply check
    /// (`None` without one); `None` if a call with that key is in flight.
    pub(crate) fn register(
        &mut self,
        key: Key,
        request: Option<&[u8]>,
        capacity: usize,
    ) -> Option<usize> {
        let std::collections::hash_map::Entry::Vacant(entry) = self.calls.entry(key) else {
            return None;
        };
        let slot = Slot {
            key,
            capacity,
            listed: true,
            request: request.map(Box::from),
            inbox: Inbox::Empty,
            waiter: Waiter::None,
        };
        let index = match self.free.pop() {
            Some(index) => {
                if let Some(place) = self.slots.get_mut(index) {
                    *place = Some(slot);
                }
                index
            }
            None => {
                self.slots.push(Some(slot));
                self.slots.len() - 1
            }
        };
        entry.insert(index);
        Some(index)
    }

    /// Ends the call in `slot`: a reply that comes for it later matches
    /// nothing.
    pub(crate) fn remove(&mut self, slot: usize) {
        if let Some(place) = self.slots.get_mut(slot) {
            if let Some(old) = place.take() {
                if old.listed {
                    self.calls.remove(&old.key);
                }
                self.free.push(slot);
            }
        }
    }

    /// How many calls are in flight.
    pub(crate) fn len(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Takes what has come for the call in `slot`: a reply, or a refusal
    /// as a `ConnectionRefused` error. Otherwise, with `waiter`, keeps it
    /// to be woken when something comes.
    pub(crate) fn take(&mut self, slot: usize, waiter: Option<Waiter>) -> Option<Taken> {
        let slot = self.slots.get_mut(slot)?.as_mut()?;
        match std::mem::replace(&mut slot.inbox, Inbox::Empty) {
            Inbox::Reply(reply) => Some(Taken::Reply(reply)),
            Inbox::Challenge(challenge) => Some(Taken::Challenge(challenge)),
            Inbox::Refused => Some(Taken::Refused),
            Inbox::Oversized => Some(Taken::Oversized),
            Inbox::Empty => {
                if let Some(waiter) = waiter {
                    slot.waiter = waiter;
                }
                None
            }
        }
    }

    /// [`take`](Table::take) for an async call: keeps `waker` (unless the
    /// one kept already wakes the same task) when nothing has come.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn poll_take(&mut self, slot: usize, waker: &Waker) -> Option<Taken> {
        let taken = self.take(slot, None);
        if taken.is_none() {
            if let Some(Some(slot)) = self.slots.get_mut(slot) {
                match &slot.waiter {
                    Waiter::Task(old) if old.will_wake(waker) => {}
                    _ => slot.waiter = Waiter::Task(waker.clone()),
                }
            }
        }
        taken
    }

    /// Hands a datagram from `from` to the call it answers; see
    /// [`Delivery`]. Counts what it discards in `shared`.
    pub(crate) fn deliver(
        &mut self,
        shared: &Shared,
        request_id: &RequestId,
        from: SocketAddr,
        datagram: &[u8],
    ) -> Delivery {
        // The reader and the check are the user's code, run here for
        // another call's reply (on the async client, in the receive task):
        // one that panics on a datagram discards it, and nothing else.
        let read = std::panic::catch_unwind(AssertUnwindSafe(|| request_id(datagram)));
        let Some(key) = read.ok().flatten().map(|id| Key::new(from, id)) else {
            shared.count_unmatched();
            return Delivery::Discarded;
        };
        // Taken off the map on delivery: one lookup, and a duplicate then
        // matches nothing.
        let Some(index) = self.calls.remove(&key) else {
            shared.count_unmatched();
            return Delivery::Discarded;
        };
        let Some(Some(slot)) = self.slots.get_mut(index) else {
            shared.count_unmatched();
            return Delivery::Discarded;
        };
        // A challenge (source tokens) goes to the call, which stays in the
        // map: it sends its request again, and waits for the reply.
        let challenge = shared.settings.tokens.as_ref().is_some_and(|format| {
            std::panic::catch_unwind(AssertUnwindSafe(|| format.is_challenge(datagram)))
                .unwrap_or(false)
        });
        if challenge {
            self.calls.insert(key, index);
            // A newer challenge takes an older one's place; a reply waiting
            // is kept.
            let waiting = matches!(slot.inbox, Inbox::Empty | Inbox::Challenge(_));
            if !waiting || datagram.len() > slot.capacity {
                shared.count_discarded();
                return Delivery::Discarded;
            }
            if let Inbox::Challenge(_) = slot.inbox {
                shared.count_discarded();
            }
            slot.inbox = Inbox::Challenge(datagram.to_vec());
            return Delivery::Delivered(std::mem::take(&mut slot.waiter));
        }
        if let (Some(_), Some(_)) = (&slot.request, &shared.settings.check) {
            if datagram.len() > slot.capacity {
                // Too large to be checked: the call is told, counts it as
                // discarded, and goes on waiting for its reply.
                self.calls.insert(key, index);
                if !matches!(slot.inbox, Inbox::Empty) {
                    shared.count_discarded();
                    return Delivery::Discarded;
                }
                slot.inbox = Inbox::Oversized;
                return Delivery::Delivered(std::mem::take(&mut slot.waiter));
            }
        }
        let fits = slot.request.as_deref().is_none_or(|request| {
            shared.settings.check.as_ref().is_none_or(|check| {
                std::panic::catch_unwind(AssertUnwindSafe(|| check(request, datagram)))
                    .unwrap_or(false)
            })
        });
        if fits && matches!(slot.inbox, Inbox::Oversized) {
            // The reply comes before the call saw the notice of a datagram
            // too large to check: that datagram is discarded, as the call
            // would have.
            shared.count_discarded();
            slot.inbox = Inbox::Empty;
        }
        // A reply takes the place of a challenge the call has not taken:
        // the reply is what it waits for.
        let room = matches!(slot.inbox, Inbox::Empty | Inbox::Challenge(_));
        if !fits || !room {
            // Not the call's reply: it goes on waiting for one.
            self.calls.insert(key, index);
            shared.count_discarded();
            return Delivery::Discarded;
        }
        if let Inbox::Challenge(_) = slot.inbox {
            shared.count_discarded();
        }
        slot.inbox = Inbox::Reply(datagram.to_vec());
        slot.listed = false;
        Delivery::Delivered(std::mem::take(&mut slot.waiter))
    }

    /// Hands a refusal to the calls it concerns: those to `dest` (every
    /// call, for a connected socket: `None`), and of those the one with
    /// request id `id` if the refused request's id could be read. Returns
    /// the waiters to wake.
    pub(crate) fn refuse(&mut self, dest: Option<SocketAddr>, id: Option<u64>) -> Vec<Waiter> {
        let dest = dest.map(canonical);
        let mut woken = Vec::new();
        for slot in self.slots.iter_mut().flatten() {
            let to_dest = dest.is_none_or(|dest| slot.key.addr == dest);
            let with_id = id.is_none_or(|id| slot.key.id == id);
            if slot.listed && to_dest && with_id && matches!(slot.inbox, Inbox::Empty) {
                slot.inbox = Inbox::Refused;
                woken.push(std::mem::take(&mut slot.waiter));
            }
        }
        woken
    }

    /// A thread that waits with nothing in its inbox, other than the one in
    /// `except`'s slot: the next to take the receive turn.
    pub(crate) fn waiting_thread(&self, except: usize) -> Option<Thread> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(index, _)| *index != except)
            .find_map(|(_, slot)| match slot {
                Some(Slot {
                    listed: true,
                    inbox: Inbox::Empty,
                    waiter: Waiter::Thread(thread),
                    ..
                }) => Some(thread.clone()),
                _ => None,
            })
    }
}

/// One shared socket's calls, and what both clients do with what the
/// socket receives: the table, behind its lock, and where refusals come
/// from.
#[derive(Debug)]
pub(crate) struct Demux {
    table: Mutex<Table>,
    /// The server the socket is connected to; `None`: unconnected.
    peer: Option<SocketAddr>,
    /// The kernel queues ICMP errors with their destination
    /// (`IP_RECVERR`), so that an unconnected socket's refusals can be told
    /// apart.
    recverr: bool,
    /// The socket's own address.
    local: SocketAddr,
}

impl Demux {
    pub(crate) fn new(peer: Option<SocketAddr>, recverr: bool, local: SocketAddr) -> Demux {
        Demux {
            table: Mutex::new(Table::default()),
            peer,
            recverr,
            local,
        }
    }

    /// How `dest` is written for this socket (see [`wire`]).
    pub(crate) fn wire(&self, dest: SocketAddr) -> SocketAddr {
        wire(self.local, dest)
    }

    /// The table. Consistent between any two statements that change it: a
    /// panic (in a reply check) leaves nothing half done.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The server the socket is connected to, if any.
    pub(crate) fn peer(&self) -> Option<SocketAddr> {
        self.peer
    }

    /// Registers a call with `key` (and its request, for the reply check,
    /// and its buffer's size); [`Error::IdInUse`] if a call with that key
    /// is in flight.
    pub(crate) fn register(
        &self,
        shared: &Shared,
        key: Key,
        request: &[u8],
        capacity: usize,
    ) -> Result<usize, Error> {
        let check = shared.settings.check.is_some().then_some(request);
        self.lock()
            .register(key, check, capacity)
            .ok_or(Error::IdInUse {
                addr: key.addr,
                id: key.id,
            })
    }

    /// Hands the `count` datagrams `source` has just received to their
    /// calls under one lock of the table, then wakes those calls (`woken`
    /// is scratch space, left empty).
    pub(crate) fn deliver_all(
        &self,
        shared: &Shared,
        source: &mut Source,
        count: usize,
        woken: &mut Vec<Waiter>,
    ) {
        let Some(read) = &shared.settings.request_id else {
            return;
        };
        let mut table = self.lock();
        for i in 0..count {
            let Some((datagram, _)) = source.datagram(i) else {
                continue;
            };
            if datagram.truncated {
                shared.count_discarded();
                continue;
            }
            if let Delivery::Delivered(waiter) =
                table.deliver(shared, read, datagram.peer, datagram.data)
            {
                woken.push(waiter);
            }
        }
        drop(table);
        for waiter in woken.drain(..) {
            waiter.wake();
        }
    }

    /// An ICMP report `e` returned by a call on `socket` (a receive or a
    /// send). On a connected socket a refusal concerns every call (other
    /// reports are left to the calls' timeouts). On an unconnected one each
    /// report queued with its destination is read, and each refusal handed
    /// to the calls it concerns: by destination, and by request id where
    /// the returned start of the refused request holds it.
    /// Returns how many reports were queued (0 on a connected socket, or
    /// where the platform queues none).
    pub(crate) fn reported(&self, shared: &Shared, socket: &Socket, e: &io::Error) -> usize {
        if self.peer.is_some() {
            if is_refusal(e) {
                self.refuse(shared, None, None);
            }
            return 0;
        }
        if !self.recverr {
            return 0;
        }
        let mut start = [0u8; 512];
        let read = read_reports(socket, &mut start, |report, sent| {
            if let (true, Some(dest)) = (report.refused, report.dest) {
                let id = sent
                    .zip(shared.settings.request_id.as_ref())
                    .and_then(|(sent, read)| read(sent));
                self.refuse(shared, Some(dest), id);
            }
        });
        read.unwrap_or(0)
    }

    /// Sends one call's request with `send` on `socket`. An ICMP report
    /// the send returns concerns an earlier datagram, and the request was
    /// not sent: the report goes to the calls it concerns
    /// ([`reported`](Demux::reported)). On a connected socket that is the
    /// call's own server, and the error is returned. On an unconnected
    /// one the request is sent again, unless the error is the send's own
    /// (see [`is_own_error`]), at most [`SEND_TRIES`] times (other
    /// destinations' refusals can keep coming while calls run).
    pub(crate) fn send(
        &self,
        shared: &Shared,
        socket: &Socket,
        mut send: impl FnMut() -> io::Result<usize>,
    ) -> io::Result<usize> {
        let mut tries = 1;
        loop {
            let e = match send() {
                Err(e) if is_icmp_report(&e) => e,
                other => return other,
            };
            let queued = self.reported(shared, socket, &e);
            let own = is_own_error(&e, self.recverr.then_some(queued));
            if self.peer.is_some() || tries >= SEND_TRIES || own {
                return Err(e);
            }
            tries += 1;
        }
    }

    /// Hands a refusal to the calls it concerns, unless refusals count as
    /// losses.
    fn refuse(&self, shared: &Shared, dest: Option<SocketAddr>, id: Option<u64>) {
        if shared.settings.refused_as_loss {
            return;
        }
        let woken = self.lock().refuse(dest, id);
        for waiter in woken {
            waiter.wake();
        }
    }
}

/// The most times [`Demux::send`] tries one request on an unconnected
/// socket whose sends keep returning other destinations' reports.
const SEND_TRIES: usize = 16;

/// An ICMP report about an earlier datagram, as a socket call returns it:
/// a refusal (port unreachable; `ECONNRESET` on Windows), or a host or
/// network that cannot be reached.
pub(crate) fn is_icmp_report(e: &io::Error) -> bool {
    is_refusal(e)
        || matches!(
            e.kind(),
            io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable
        )
}

/// Whether `e`, an ICMP report returned by a send on an unconnected socket
/// (with `queued` reports read from its error queue; `None` where the
/// platform keeps none), is the send's own failure rather than a report of
/// an earlier datagram. A refusal never is: the system reports it only
/// after the fact, and its error can outlast the queue (another thread may
/// have read the report). An unreachable host or network with nothing
/// queued is: the system found no route for this datagram.
pub(crate) fn is_own_error(e: &io::Error, queued: Option<usize>) -> bool {
    queued == Some(0) && !is_refusal(e)
}

/// Reads the ICMP reports queued on `socket` (Linux, `IP_RECVERR`),
/// handing each to `each` with the start of the datagram it concerns (put
/// in `start`, if it fits); returns how many there were, or `None` where the platform
/// keeps no such queue.
pub(crate) fn read_reports(
    socket: &Socket,
    start: &mut [u8],
    mut each: impl FnMut(&sys::QueuedError, Option<&[u8]>),
) -> Option<usize> {
    let mut read = 0;
    // Bounded: the queue holds at most a receive buffer's worth.
    for _ in 0..1024 {
        match sys::recv_error(socket, start) {
            Ok(report) => {
                read += 1;
                each(&report, start.get(..report.len));
            }
            Err(e) if e.kind() == io::ErrorKind::Unsupported => return None,
            Err(_) => break,
        }
    }
    Some(read)
}

/// A refusal: ICMP port unreachable (reported as `ECONNRESET` on Windows).
fn is_refusal(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset
    )
}

/// The receive batch of a shared socket: up to `size` datagrams of any
/// size a call (where the platform batches).
pub(crate) fn receive_batch(socket: &Socket, size: usize) -> Source {
    let spec = sys::BatchSpec {
        size,
        max_datagram: super::MAX_REPLY,
        control: sys::Control::Off,
        gso: false,
    };
    Source::new(socket, Some(spec), super::MAX_REPLY, sys::Control::Off)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ClientBuilder;

    fn first_byte() -> RequestId {
        Arc::new(|datagram: &[u8]| datagram.first().map(|&b| u64::from(b)))
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn each_reply_goes_to_the_call_with_its_address_and_id() {
        let shared = Shared::new(ClientBuilder::new().settings);
        let ids = first_byte();
        let mut table = Table::default();
        let a = table.register(Key::new(addr(1), 7), None, 64);
        let b = table.register(Key::new(addr(2), 7), None, 64);
        let (Some(a), Some(b)) = (a, b) else {
            panic!("both keys are free");
        };
        // The same key twice is refused.
        assert!(table.register(Key::new(addr(1), 7), None, 64).is_none());
        // From the wrong address, or with an unknown id: counted, dropped.
        assert!(matches!(
            table.deliver(&shared, &ids, addr(3), &[7]),
            Delivery::Discarded
        ));
        assert!(matches!(
            table.deliver(&shared, &ids, addr(1), &[8]),
            Delivery::Discarded
        ));
        assert!(matches!(
            table.deliver(&shared, &ids, addr(1), &[]),
            Delivery::Discarded
        ));
        assert_eq!((shared.unmatched(), shared.discarded()), (3, 3));
        assert!(matches!(
            table.deliver(&shared, &ids, addr(2), &[7, 2]),
            Delivery::Delivered(_)
        ));
        // A duplicate matches nothing: the call has its reply.
        assert!(matches!(
            table.deliver(&shared, &ids, addr(2), &[7, 2]),
            Delivery::Discarded
        ));
        assert_eq!((shared.unmatched(), shared.discarded()), (4, 4));
        assert!(table.take(a, None).is_none());
        assert!(matches!(table.take(b, None), Some(Taken::Reply(reply)) if reply == [7, 2]));
        // Removed, a call's key is free, and its late replies match nothing.
        table.remove(b);
        assert!(matches!(
            table.deliver(&shared, &ids, addr(2), &[7]),
            Delivery::Discarded
        ));
        assert_eq!(shared.unmatched(), 5);
        assert!(table.register(Key::new(addr(2), 7), None, 64).is_some());
        // IPv4-mapped addresses are the IPv4 ones.
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:1".parse().unwrap_or(addr(0));
        assert!(matches!(
            table.deliver(&shared, &ids, mapped, &[7]),
            Delivery::Delivered(_)
        ));
        assert_eq!(table.len(), 2);
    }

    /// A format whose challenges start with 0xFD (the token after it).
    struct Challenges;
    impl crate::TokenFormat for Challenges {
        fn find<'a>(&self, datagram: &'a [u8]) -> Option<&'a [u8]> {
            datagram.get(2..)
        }
        fn write(&self, datagram: &mut Vec<u8>, token: &[u8]) {
            datagram.extend_from_slice(token);
        }
        fn is_challenge(&self, datagram: &[u8]) -> bool {
            datagram.get(1) == Some(&0xFD)
        }
    }

    #[test]
    fn a_challenge_keeps_the_call_listed_and_gives_way_to_its_reply() {
        let shared = Shared::new(ClientBuilder::new().source_tokens(Challenges).settings);
        let ids = first_byte();
        let mut table = Table::default();
        let Some(slot) = table.register(Key::new(addr(1), 4), None, 64) else {
            panic!("the key is free");
        };
        let delivered = |table: &mut Table, datagram: &[u8]| {
            matches!(
                table.deliver(&shared, &ids, addr(1), datagram),
                Delivery::Delivered(_)
            )
        };
        // A challenge, then the reply, before the call looks: the reply.
        assert!(delivered(&mut table, &[4, 0xFD, 1]));
        assert!(delivered(&mut table, &[4, b'r']));
        assert!(matches!(table.take(slot, None), Some(Taken::Reply(r)) if r == [4, b'r']));
        assert_eq!(shared.discarded(), 1, "the challenge it replaced");
        // A reply waiting is not replaced by a challenge.
        let Some(slot) = table.register(Key::new(addr(1), 5), None, 64) else {
            panic!("the key is free");
        };
        assert!(delivered(&mut table, &[5, b'r']));
        assert!(!delivered(&mut table, &[5, 0xFD, 2]));
        assert!(matches!(table.take(slot, None), Some(Taken::Reply(r)) if r == [5, b'r']));
        // A challenge taken: the call is still listed for its reply.
        let Some(slot) = table.register(Key::new(addr(1), 6), None, 64) else {
            panic!("the key is free");
        };
        assert!(delivered(&mut table, &[6, 0xFD, 3]));
        assert!(matches!(table.take(slot, None), Some(Taken::Challenge(_))));
        assert!(delivered(&mut table, &[6, b'r']));
        assert!(matches!(table.take(slot, None), Some(Taken::Reply(_))));
    }

    #[test]
    fn a_reply_must_pass_its_own_calls_check() {
        let shared = Shared::new(
            ClientBuilder::new()
                .reply_check(|request, reply| reply.ends_with(request))
                .settings,
        );
        let ids = first_byte();
        let mut table = Table::default();
        let Some(slot) = table.register(Key::new(addr(1), 1), Some(&[1, 9]), 64) else {
            panic!("the key is free");
        };
        assert!(matches!(
            table.deliver(&shared, &ids, addr(1), &[1, 8]),
            Delivery::Discarded
        ));
        assert!(matches!(
            table.deliver(&shared, &ids, addr(1), &[1, 1, 9]),
            Delivery::Delivered(_)
        ));
        assert_eq!((shared.unmatched(), shared.discarded()), (0, 1));
        assert!(matches!(table.take(slot, None), Some(Taken::Reply(_))));
    }

    #[test]
    fn a_reader_or_check_that_panics_discards_the_datagram_and_nothing_else() {
        let shared = Shared::new(
            ClientBuilder::new()
                .reply_check(|_, reply| {
                    assert!(reply != b"\x01boom", "a check that panics");
                    true
                })
                .settings,
        );
        let ids: RequestId = Arc::new(|datagram: &[u8]| {
            assert!(datagram != b"panic", "a reader that panics");
            datagram.first().map(|&b| u64::from(b))
        });
        let mut table = Table::default();
        let Some(slot) = table.register(Key::new(addr(1), 1), Some(b"\x01"), 64) else {
            panic!("the key is free");
        };
        let quiet = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let read = table.deliver(&shared, &ids, addr(1), b"panic");
        let check = table.deliver(&shared, &ids, addr(1), b"\x01boom");
        std::panic::set_hook(quiet);
        assert!(matches!(
            (read, check),
            (Delivery::Discarded, Delivery::Discarded)
        ));
        // The call is still in the table and takes its reply.
        assert!(matches!(
            table.deliver(&shared, &ids, addr(1), b"\x01ok"),
            Delivery::Delivered(_)
        ));
        assert!(matches!(table.take(slot, None), Some(Taken::Reply(reply)) if reply == b"\x01ok"));
        assert_eq!((shared.unmatched(), shared.discarded()), (1, 2));
    }

    #[test]
    fn a_refusal_reaches_only_the_calls_it_concerns() {
        let mut table = Table::default();
        let keys = [
            Key::new(addr(1), 1),
            Key::new(addr(1), 2),
            Key::new(addr(2), 1),
        ];
        let slots: Vec<usize> = keys
            .iter()
            .filter_map(|&k| table.register(k, None, 64))
            .collect();
        assert_eq!(slots.len(), 3);
        assert_eq!(table.refuse(Some(addr(1)), Some(2)).len(), 1);
        assert!(table.take(slots[0], None).is_none());
        assert!(matches!(table.take(slots[1], None), Some(Taken::Refused)));
        // Without the id: every call to that address.
        assert_eq!(table.refuse(Some(addr(1)), None).len(), 2);
        assert!(table.take(slots[2], None).is_none());
        // A connected socket's refusal: every call.
        assert_eq!(table.refuse(None, None).len(), 1);
        assert!(table.take(slots[2], None).is_some());
    }
}
