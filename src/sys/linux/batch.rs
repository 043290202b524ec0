//! Batched receive: `recvmmsg`, with the replies sent through
//! [`Replies`] (`sendmmsg`, with segmentation offload).
//!
//! No message header outlives the call that uses it: `recv` builds its
//! headers and iovecs from fresh pointers right before the system call, so
//! nothing the kernel writes to can have moved since it was pointed at (the
//! approach of quinn-udp). Between calls they sit in [`Scratch`] storage,
//! plain integers, so a `Batch` holds no raw pointer and is `Send` as it
//! is.

use std::io;
use std::mem;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::ptr;

use libc::{c_uint, c_void, iovec, mmsghdr, sockaddr_storage, socklen_t};
use socket2::Socket;

use super::cmsg::{self, RecvCmsg};
use super::replies::Replies;

use super::{Scratch, cvt, to_std, zeroed};
use crate::sys::{Arrival, BatchSpec, Control, Received, retry_interrupted};

/// The most messages one `recvmmsg`/`sendmmsg` call takes (`UIO_MAXIOV`).
pub(crate) const MAX_BATCH: usize = 1024;

/// One worker's buffers for batches, allocated once.
pub(crate) struct Batch {
    max_datagram: usize,
    /// What receives read besides the datagrams.
    control: Control,

    // What the kernel writes on receive, one per slot.
    /// `size` receive buffers of `max_datagram` bytes, end to end.
    bufs: Box<[u8]>,
    addrs: Box<[sockaddr_storage]>,
    /// One per slot where control messages are read, else none.
    recv_cmsgs: Box<[RecvCmsg]>,
    /// Scratch for the headers of one `recvmmsg`, rebuilt before each.
    recv_iovs: Scratch<iovec>,
    recv_hdrs: Scratch<mmsghdr>,

    /// The datagrams of the last receive that have a sender, in order.
    datagrams: Box<[Datagram]>,
    count: usize,
    /// The replies, one place per entry of `datagrams`.
    replies: Replies,
}

/// One received datagram, as read from its header once.
#[derive(Debug, Clone, Copy)]
struct Datagram {
    /// The receive slot it landed in.
    slot: usize,
    len: usize,
    truncated: bool,
    peer: SocketAddr,
    arrival: Arrival,
}

const NO_DATAGRAM: Datagram = Datagram {
    slot: 0,
    len: 0,
    truncated: false,
    peer: SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
    arrival: Arrival {
        local: None,
        ifindex: 0,
        tos: None,
        ttl: None,
    },
};

impl Batch {
    /// Buffers for the batches `spec` describes; `None` without one (the
    /// caller runs the portable loop).
    pub(crate) fn new(socket: &Socket, spec: Option<BatchSpec>) -> Option<Batch> {
        let spec = spec?;
        let size = spec.size.clamp(1, MAX_BATCH);
        let max_datagram = spec.max_datagram;
        Some(Batch {
            max_datagram,
            // Zeroed memory from the allocator: pages are only touched by
            // the datagrams that reach them.
            bufs: vec![0u8; size * max_datagram].into_boxed_slice(),
            addrs: zeroed(size),
            control: spec.control,
            recv_cmsgs: vec![RecvCmsg::EMPTY; if spec.control.reads() { size } else { 0 }]
                .into_boxed_slice(),
            recv_iovs: Scratch::new(size),
            recv_hdrs: Scratch::new(size),
            datagrams: vec![NO_DATAGRAM; size].into_boxed_slice(),
            count: 0,
            replies: Replies::new(socket, size, spec.gso),
        })
    }

    /// Receives up to a batch of datagrams: blocks until the first arrives
    /// (or the socket's read timeout expires), then takes whatever else is
    /// already queued, without waiting (`MSG_WAITFORONE`). With `dont_wait`
    /// it does not block at all and fails with `WouldBlock` when nothing is
    /// queued. Returns how many datagrams came; wake-ups without a sender
    /// are left out, so this may be 0.
    pub(crate) fn recv(&mut self, socket: &Socket, dont_wait: bool) -> io::Result<usize> {
        // Replies of the last batch are sent; an oversized buffer is given
        // back before the worker waits.
        self.replies.trim(self.count);
        self.count = 0;
        let fd = socket.as_raw_fd();
        let flags = libc::MSG_WAITFORONE | if dont_wait { libc::MSG_DONTWAIT } else { 0 };
        let hdrs = self.prepare_headers();
        let (len, hdrs) = (hdrs.len(), hdrs.as_mut_ptr());
        let received = retry_interrupted(|| {
            // SAFETY: `prepare_headers` has just built the `len` headers at
            // `hdrs` from fresh borrows of this `Batch`'s buffers: each
            // points at its own `sockaddr_storage` (its size in
            // `msg_namelen`), its own one-element `iovec` over
            // `max_datagram` bytes of `bufs`, and either no control buffer
            // or its own `RecvCmsg` (its size in `msg_controllen`). `self`
            // is borrowed mutably for this whole function and nothing else
            // touches those buffers until the call returns. A null timeout
            // is allowed (the socket's read timeout applies).
            let rc =
                unsafe { libc::recvmmsg(fd, hdrs, len as c_uint, flags as _, ptr::null_mut()) };
            cvt(rc as isize)
        })?;
        self.read_headers(received);
        Ok(self.count)
    }

    /// Points every receive header at its slot's buffer, address and
    /// control space, with the lengths the kernel reads; returns the
    /// headers, ready for one `recvmmsg`.
    fn prepare_headers(&mut self) -> &mut [mmsghdr] {
        let max_datagram = self.max_datagram;
        let bufs = self.bufs.as_mut_ptr();
        let iovs = self.recv_iovs.get();
        for (i, iov) in iovs.iter_mut().enumerate() {
            // In bounds: `bufs` holds `size * max_datagram` bytes, and
            // `i < size`.
            *iov = iovec {
                iov_base: bufs.wrapping_add(i * max_datagram).cast::<c_void>(),
                iov_len: max_datagram,
            };
        }
        // One control buffer per slot where `pktinfo` is set, else none.
        let mut cmsgs = self.recv_cmsgs.iter_mut();
        let hdrs = self.recv_hdrs.get();
        for ((mmsg, iov), addr) in hdrs.iter_mut().zip(iovs).zip(self.addrs.iter_mut()) {
            let hdr = &mut mmsg.msg_hdr;
            hdr.msg_name = ptr::from_mut(addr).cast::<c_void>();
            hdr.msg_namelen = mem::size_of::<sockaddr_storage>() as socklen_t;
            hdr.msg_iov = iov;
            hdr.msg_iovlen = 1;
            match cmsgs.next() {
                Some(control) => {
                    hdr.msg_control = ptr::from_mut(control).cast::<c_void>();
                    hdr.msg_controllen = mem::size_of::<RecvCmsg>() as _;
                }
                None => {
                    hdr.msg_control = ptr::null_mut();
                    hdr.msg_controllen = 0;
                }
            }
            hdr.msg_flags = 0;
            mmsg.msg_len = 0;
        }
        hdrs
    }

    /// Reads the headers of the `received` datagrams the kernel filled.
    fn read_headers(&mut self, received: usize) {
        let hdrs = self.recv_hdrs.get();
        for (slot, mmsg) in hdrs.iter().enumerate().take(received) {
            let hdr = &mmsg.msg_hdr;
            // A shutdown wake-up carries no sender: not a datagram.
            let Some(peer) = to_std(&self.addrs[slot], hdr.msg_namelen) else {
                continue;
            };
            let mut truncated = hdr.msg_flags & libc::MSG_TRUNC != 0;
            let mut arrival = Arrival::default();
            if let Some(control) = self.recv_cmsgs.get(slot) {
                // `msg_controllen` is `size_t` on glibc, `socklen_t` on musl.
                #[allow(clippy::unnecessary_cast)]
                let len = hdr.msg_controllen as usize;
                arrival = cmsg::parse(control, len);
                // Where replies go out from arrival addresses, a datagram
                // without one is not whole (its reply could leave from the
                // wrong address). Other control messages cut short
                // (`MSG_CTRUNC`) do not matter.
                truncated |= !self.control.keep(&mut arrival);
            }
            self.datagrams[self.count] = Datagram {
                slot,
                len: (mmsg.msg_len as usize).min(self.max_datagram),
                truncated,
                peer,
                arrival,
            };
            self.count += 1;
        }
    }

    /// Datagram `i` of the last receive and the reply buffer that goes with
    /// it; `None` past the last one.
    pub(crate) fn datagram(&mut self, i: usize) -> Option<(Received<'_>, &mut Vec<u8>)> {
        let datagram = self.datagrams.get(i).filter(|_| i < self.count)?;
        let start = datagram.slot * self.max_datagram;
        let received = Received {
            data: self
                .bufs
                .get(start..start + datagram.len)
                .unwrap_or_default(),
            truncated: datagram.truncated,
            peer: datagram.peer,
            arrival: datagram.arrival,
        };
        Some((received, self.replies.buffer(i)?))
    }

    /// Queues the reply to datagram `i` for the next [`send`](Batch::send),
    /// to its sender, from where it arrived. `counted`: whether `send`
    /// counts how it went (a busy reply to a shed request is counted as
    /// shed already).
    pub(crate) fn queue_reply(&mut self, i: usize, counted: bool) {
        if let Some(datagram) = self.datagrams.get(i).filter(|_| i < self.count) {
            self.replies
                .queue(i, datagram.peer, datagram.arrival, counted);
        }
    }

    /// Drops the queued replies unsent; returns how many were counted.
    pub(crate) fn drop_queued(&mut self) -> u64 {
        self.replies.drop_queued()
    }

    /// The error of the last reply that failed to send, once.
    pub(crate) fn take_error(&mut self) -> Option<io::Error> {
        self.replies.take_error()
    }

    /// How many replies are queued.
    pub(crate) fn queued(&self) -> usize {
        self.replies.queued()
    }

    /// Sends every queued reply; returns how many counted replies were sent
    /// and how many failed.
    pub(crate) fn send(&mut self, socket: &Socket) -> (u64, u64) {
        self.replies.send(socket)
    }
}
