//! One receive source for every engine: a [`Batch`] where the platform has
//! batched calls and the server asked for them, otherwise a batch of one,
//! [`One`]: one `recvmsg` and one `sendto` (or `sendmsg`) per datagram.
//! The engines see one interface and run one loop over it.

use std::io;
use std::net::SocketAddr;

use socket2::Socket;

use super::{Arrival, Batch, BatchSpec, Control, Portable, REPLY_RESERVE, Received, trim_reply};

/// Where a receive worker takes datagrams from and sends replies through.
// One per worker: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Source {
    /// Batched calls (`recvmmsg` / `sendmmsg`).
    Batch(Batch),
    /// One datagram at a time.
    One(One),
}

impl Source {
    /// Batches as `spec` says where the platform has them; one datagram at
    /// a time (of up to `max_datagram` bytes, with arrival addresses when
    /// `pktinfo`) where it does not or `spec` is `None`.
    pub(crate) fn new(
        socket: &Socket,
        spec: Option<BatchSpec>,
        max_datagram: usize,
        control: Control,
    ) -> Source {
        match Batch::new(socket, spec) {
            Some(batch) => Source::Batch(batch),
            None => Source::One(One::new(max_datagram, control)),
        }
    }

    /// Receives what is queued, up to a batch: blocks until the first
    /// datagram arrives (or the socket's read timeout expires) unless
    /// `dont_wait`, when it fails with `WouldBlock` if nothing is queued.
    /// Returns how many datagrams came; a wake-up without a sender is not
    /// one, so this may be 0. The replies of the last receive must have
    /// been sent.
    pub(crate) fn recv(&mut self, socket: &Socket, dont_wait: bool) -> io::Result<usize> {
        match self {
            Source::Batch(batch) => batch.recv(socket, dont_wait),
            Source::One(one) => one.recv(socket, dont_wait),
        }
    }

    /// Datagram `i` of the last receive and the reply buffer that goes with
    /// it; `None` past the last one.
    pub(crate) fn datagram(&mut self, i: usize) -> Option<(Received<'_>, &mut Vec<u8>)> {
        match self {
            Source::Batch(batch) => batch.datagram(i),
            Source::One(one) => one.datagram(i),
        }
    }

    /// Queues the reply to datagram `i` for the next [`send`](Source::send),
    /// to its sender, from where it arrived; `counted`: whether `send`
    /// counts how it went.
    pub(crate) fn queue_reply(&mut self, i: usize, counted: bool) {
        match self {
            Source::Batch(batch) => batch.queue_reply(i, counted),
            Source::One(one) => one.queue_reply(i, counted),
        }
    }

    /// How many replies are queued.
    pub(crate) fn queued(&self) -> usize {
        match self {
            Source::Batch(batch) => batch.queued(),
            Source::One(one) => usize::from(one.queued.is_some()),
        }
    }

    /// Sends every queued reply; returns how many counted replies were sent
    /// and how many failed.
    pub(crate) fn send(&mut self, socket: &Socket) -> (u64, u64) {
        match self {
            Source::Batch(batch) => batch.send(socket),
            Source::One(one) => one.send(socket),
        }
    }

    /// Drops the queued replies unsent; returns how many of them were
    /// counted.
    pub(crate) fn drop_queued(&mut self) -> u64 {
        match self {
            Source::Batch(batch) => batch.drop_queued(),
            Source::One(one) => u64::from(one.queued.take().unwrap_or(false)),
        }
    }

    /// The error of the last reply that failed to send, once.
    pub(crate) fn take_error(&mut self) -> Option<io::Error> {
        match self {
            Source::Batch(batch) => batch.take_error(),
            Source::One(one) => one.error.take(),
        }
    }
}

/// A batch of one: the portable receive and reply, through socket2.
pub(crate) struct One {
    io: Portable,
    /// The receive buffer, of the largest accepted datagram.
    buf: Vec<u8>,
    reply: Vec<u8>,
    /// The datagram of the last receive, if it had a sender.
    got: Option<Got>,
    /// Its reply is queued: whether its send is counted.
    queued: Option<bool>,
    error: Option<io::Error>,
}

/// What a [`One`] keeps of the datagram it received.
#[derive(Debug, Clone, Copy)]
struct Got {
    len: usize,
    truncated: bool,
    peer: SocketAddr,
    arrival: Arrival,
}

impl One {
    fn new(max_datagram: usize, control: Control) -> One {
        One {
            io: Portable::new(control),
            buf: vec![0; max_datagram],
            reply: Vec::with_capacity(REPLY_RESERVE),
            got: None,
            queued: None,
            error: None,
        }
    }

    fn recv(&mut self, socket: &Socket, dont_wait: bool) -> io::Result<usize> {
        self.got = None;
        self.queued = None;
        let received = self.io.recv(socket, &mut self.buf, dont_wait)?;
        self.got = received.map(|d| Got {
            len: d.data.len(),
            truncated: d.truncated,
            peer: d.peer,
            arrival: d.arrival,
        });
        Ok(usize::from(self.got.is_some()))
    }

    fn datagram(&mut self, i: usize) -> Option<(Received<'_>, &mut Vec<u8>)> {
        let got = self.got.filter(|_| i == 0)?;
        let received = Received {
            data: self.buf.get(..got.len).unwrap_or_default(),
            truncated: got.truncated,
            peer: got.peer,
            arrival: got.arrival,
        };
        Some((received, &mut self.reply))
    }

    fn queue_reply(&mut self, i: usize, counted: bool) {
        if i == 0 && self.got.is_some() {
            self.queued = Some(counted);
        }
    }

    fn send(&mut self, socket: &Socket) -> (u64, u64) {
        let Some(counted) = self.queued.take() else {
            return (0, 0);
        };
        let result = self.io.send(socket, &self.reply);
        trim_reply(&mut self.reply);
        match result {
            Ok(()) => (u64::from(counted), 0),
            Err(err) => {
                let failed = u64::from(counted);
                if counted {
                    self.error = Some(err);
                }
                (0, failed)
            }
        }
    }
}
