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
    /// A receive queue's AF_XDP socket (feature `xdp`), and the kernel
    /// socket bound to the same address for what the XDP program passes.
    #[cfg(all(feature = "xdp", target_os = "linux"))]
    Xdp(Box<super::xdp::XdpSource>),
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
            #[cfg(all(feature = "xdp", target_os = "linux"))]
            Source::Xdp(xdp) => xdp.recv(socket, dont_wait),
        }
    }

    /// Datagram `i` of the last receive and the reply buffer that goes with
    /// it; `None` past the last one.
    pub(crate) fn datagram(&mut self, i: usize) -> Option<(Received<'_>, &mut Vec<u8>)> {
        match self {
            Source::Batch(batch) => batch.datagram(i),
            Source::One(one) => one.datagram(i),
            #[cfg(all(feature = "xdp", target_os = "linux"))]
            Source::Xdp(xdp) => xdp.datagram(i),
        }
    }

    /// Queues the reply to datagram `i` for the next [`send`](Source::send),
    /// to its sender, from where it arrived; `counted`: whether `send`
    /// counts how it went.
    pub(crate) fn queue_reply(&mut self, i: usize, counted: bool) {
        match self {
            Source::Batch(batch) => batch.queue_reply(i, counted),
            Source::One(one) => one.queue_reply(i, counted),
            #[cfg(all(feature = "xdp", target_os = "linux"))]
            Source::Xdp(xdp) => xdp.queue_reply(i, counted),
        }
    }

    /// How many replies are queued.
    pub(crate) fn queued(&self) -> usize {
        match self {
            Source::Batch(batch) => batch.queued(),
            Source::One(one) => one.queued(),
            #[cfg(all(feature = "xdp", target_os = "linux"))]
            Source::Xdp(xdp) => xdp.queued(),
        }
    }

    /// Sends every queued reply; returns how many counted replies were sent
    /// and how many failed.
    pub(crate) fn send(&mut self, socket: &Socket) -> (u64, u64) {
        match self {
            Source::Batch(batch) => batch.send(socket),
            Source::One(one) => one.send(socket),
            #[cfg(all(feature = "xdp", target_os = "linux"))]
            Source::Xdp(xdp) => xdp.send(socket),
        }
    }

    /// Drops the queued replies unsent; returns how many of them were
    /// counted.
    pub(crate) fn drop_queued(&mut self) -> u64 {
        match self {
            Source::Batch(batch) => batch.drop_queued(),
            Source::One(one) => one.drop_queued(),
            #[cfg(all(feature = "xdp", target_os = "linux"))]
            Source::Xdp(xdp) => xdp.drop_queued(),
        }
    }

    /// The error of the last reply that failed to send, once.
    pub(crate) fn take_error(&mut self) -> Option<io::Error> {
        match self {
            Source::Batch(batch) => batch.take_error(),
            Source::One(one) => one.take_error(),
            #[cfg(all(feature = "xdp", target_os = "linux"))]
            Source::Xdp(xdp) => xdp.take_error(),
        }
    }

    /// Frames refused since the last call (malformed, or not for the
    /// server) by an AF_XDP source; 0 for the others.
    pub(crate) fn take_rejected(&mut self) -> u64 {
        match self {
            #[cfg(all(feature = "xdp", target_os = "linux"))]
            Source::Xdp(xdp) => xdp.take_rejected(),
            _ => 0,
        }
    }

    /// What the kernel dropped on the way to an AF_XDP source (`None` for
    /// the others: their socket's drops are read from the socket).
    pub(crate) fn xdp_drops(&self) -> Option<u64> {
        match self {
            #[cfg(all(feature = "xdp", target_os = "linux"))]
            Source::Xdp(xdp) => xdp.kernel_drops(),
            _ => None,
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
    pub(crate) fn new(max_datagram: usize, control: Control) -> One {
        One {
            io: Portable::new(control),
            buf: vec![0; max_datagram],
            reply: Vec::with_capacity(REPLY_RESERVE),
            got: None,
            queued: None,
            error: None,
        }
    }

    pub(crate) fn recv(&mut self, socket: &Socket, dont_wait: bool) -> io::Result<usize> {
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

    pub(crate) fn datagram(&mut self, i: usize) -> Option<(Received<'_>, &mut Vec<u8>)> {
        let got = self.got.filter(|_| i == 0)?;
        let received = Received {
            data: self.buf.get(..got.len).unwrap_or_default(),
            truncated: got.truncated,
            peer: got.peer,
            arrival: got.arrival,
        };
        Some((received, &mut self.reply))
    }

    pub(crate) fn queue_reply(&mut self, i: usize, counted: bool) {
        if i == 0 && self.got.is_some() {
            self.queued = Some(counted);
        }
    }

    pub(crate) fn queued(&self) -> usize {
        usize::from(self.queued.is_some())
    }

    pub(crate) fn drop_queued(&mut self) -> u64 {
        u64::from(self.queued.take().unwrap_or(false))
    }

    pub(crate) fn take_error(&mut self) -> Option<io::Error> {
        self.error.take()
    }

    pub(crate) fn send(&mut self, socket: &Socket) -> (u64, u64) {
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
