//! Batched receive and reply: `recvmmsg` / `sendmmsg`, with segmentation
//! offload for replies to one peer.

use std::io;
use std::mem;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::ptr;

use libc::{c_int, c_uint, c_void, iovec, mmsghdr, sockaddr_storage, socklen_t};
use socket2::Socket;

use super::cmsg::{self, Arrival, Control};
use super::to_std;
use crate::sys::Received;

/// The most messages one `recvmmsg`/`sendmmsg` call takes (`UIO_MAXIOV`).
pub(crate) const MAX_BATCH: usize = 1024;

/// Buffers and message headers for one worker's batches, allocated once.
///
/// The headers point into the buffers; every buffer lives in a boxed slice
/// whose heap address never changes, so the pointers stay valid for the
/// life of the batch, wherever the `Batch` itself moves.
pub(crate) struct Batch {
    size: usize,
    max_datagram: usize,
    /// `size` receive buffers of `max_datagram` bytes, end to end.
    bufs: Box<[u8]>,
    addrs: Box<[sockaddr_storage]>,
    recv_iovs: Box<[iovec]>,
    recv_hdrs: Box<[mmsghdr]>,
    /// How many of `recv_hdrs` the last receive filled.
    received: usize,
    replies: Box<[Vec<u8>]>,
    /// One iovec per queued reply, in queue order: the replies of one
    /// outgoing message are consecutive.
    send_iovs: Box<[iovec]>,
    /// How many of `send_iovs` are in use.
    queued_iovs: usize,
    /// One header per outgoing message; with segmentation offload a message
    /// carries several replies to the same peer.
    send_hdrs: Box<[mmsghdr]>,
    outgoing: Box<[Outgoing]>,
    /// Control-message space for each outgoing message (source address,
    /// `UDP_SEGMENT`).
    controls: Box<[Control]>,
    /// Whether the socket reports the address each datagram arrived on, and
    /// replies go out from it.
    pktinfo: bool,
    /// Control-message space for each received datagram.
    recv_controls: Box<[Control]>,
    /// Where each datagram of the last receive arrived.
    arrivals: Box<[Arrival]>,
    /// Who sent each datagram of the last receive, as [`slot`](Batch::slot)
    /// read it.
    peers: Box<[Option<SocketAddr>]>,
    /// How many of `send_hdrs` are queued for the next send.
    queued: usize,
    /// Whether replies to the same peer are coalesced with `UDP_SEGMENT`.
    gso: bool,
}

/// What one outgoing message carries.
#[derive(Debug, Clone, Copy, Default)]
struct Outgoing {
    /// The receive slot whose sender the message goes to.
    slot: usize,
    /// The message's first iovec in `send_iovs`.
    first_iov: usize,
    /// How many replies (segments) it carries.
    segments: usize,
    /// The size of every segment but the last, which may be smaller.
    segment_size: usize,
    /// Bytes in all.
    total: usize,
    /// No further reply may join (the last segment was short, or the
    /// message cannot be segmented).
    closed: bool,
}

/// The most segments one `UDP_SEGMENT` send may carry (the kernel's
/// `UDP_MAX_SEGMENTS` since it gained the option).
const MAX_SEGMENTS: usize = 64;
/// The largest segment coalesced: a full Ethernet frame's UDP payload over
/// IPv6 (1500 − 40 − 8). Segments must fit the route's MTU, so larger
/// replies go out one per message.
const MAX_SEGMENT_SIZE: usize = 1452;
/// The most bytes one segmented send may carry.
const MAX_SEGMENTED_TOTAL: usize = 65_000;

impl Batch {
    /// Buffers for batches of `size` datagrams of up to `max_datagram`
    /// bytes. `size` is at least 1 and at most [`MAX_BATCH`] (the builder
    /// checks it).
    ///
    /// `gso` asks for replies to the same peer to be coalesced with UDP
    /// segmentation offload where the kernel supports it (Linux 4.18+);
    /// `pktinfo` says the socket reports arrival addresses (see
    /// [`enable_pktinfo`]) and replies must go out from them.
    pub(crate) fn new(
        socket: &Socket,
        size: usize,
        max_datagram: usize,
        gso: bool,
        pktinfo: bool,
    ) -> Option<Batch> {
        let size = size.clamp(1, MAX_BATCH);
        let mut batch = Batch {
            size,
            max_datagram,
            // Zeroed memory from the allocator: pages are only touched by
            // the datagrams that reach them.
            bufs: vec![0u8; size * max_datagram].into_boxed_slice(),
            // SAFETY: `sockaddr_storage`, `iovec` and `mmsghdr` are plain C
            // structs of integers and pointers, for which all zeroes is a
            // valid value (null pointers, zero lengths).
            addrs: (0..size).map(|_| unsafe { mem::zeroed() }).collect(),
            // SAFETY: as above.
            recv_iovs: (0..size).map(|_| unsafe { mem::zeroed() }).collect(),
            // SAFETY: as above.
            recv_hdrs: (0..size).map(|_| unsafe { mem::zeroed() }).collect(),
            received: 0,
            replies: (0..size)
                .map(|_| Vec::with_capacity(crate::sys::REPLY_RESERVE))
                .collect(),
            // SAFETY: as above.
            send_iovs: (0..size).map(|_| unsafe { mem::zeroed() }).collect(),
            queued_iovs: 0,
            // SAFETY: as above.
            send_hdrs: (0..size).map(|_| unsafe { mem::zeroed() }).collect(),
            outgoing: vec![Outgoing::default(); size].into_boxed_slice(),
            controls: vec![Control::EMPTY; size].into_boxed_slice(),
            pktinfo,
            recv_controls: vec![Control::EMPTY; if pktinfo { size } else { 0 }].into_boxed_slice(),
            arrivals: vec![Arrival::default(); size].into_boxed_slice(),
            peers: vec![None; size].into_boxed_slice(),
            queued: 0,
            gso: gso && supports_gso(socket),
        };
        let buf_base = batch.bufs.as_mut_ptr();
        for i in 0..size {
            batch.recv_iovs[i] = iovec {
                // In bounds: `bufs` holds `size * max_datagram` bytes.
                iov_base: buf_base.wrapping_add(i * max_datagram).cast::<c_void>(),
                iov_len: max_datagram,
            };
            let hdr = &mut batch.recv_hdrs[i].msg_hdr;
            hdr.msg_name = ptr::from_mut(&mut batch.addrs[i]).cast::<c_void>();
            hdr.msg_iov = ptr::from_mut(&mut batch.recv_iovs[i]);
            hdr.msg_iovlen = 1;
        }
        batch.reset_recv_headers(size);
        Some(batch)
    }

    /// Sets the fields the kernel overwrites back to their input values.
    fn reset_recv_headers(&mut self, count: usize) {
        for (i, mmsg) in self.recv_hdrs.iter_mut().enumerate().take(count) {
            mmsg.msg_hdr.msg_namelen = mem::size_of::<sockaddr_storage>() as socklen_t;
            mmsg.msg_hdr.msg_flags = 0;
            mmsg.msg_len = 0;
            if let Some(control) = self.recv_controls.get_mut(i) {
                mmsg.msg_hdr.msg_control = control.0.as_mut_ptr().cast::<c_void>();
                mmsg.msg_hdr.msg_controllen = cmsg::CONTROL_ROOM as _;
            }
        }
    }

    /// Receives up to a batch of datagrams: blocks until the first arrives
    /// (or the socket's read timeout expires), then takes whatever else is
    /// already queued, without waiting (`MSG_WAITFORONE`). Returns how many.
    pub(crate) fn recv(&mut self, socket: &Socket) -> io::Result<usize> {
        self.reset_recv_headers(self.received);
        self.received = 0;
        // SAFETY: `recv_hdrs` holds `size` initialised headers, each pointing
        // at its own `sockaddr_storage` (with `msg_namelen` its size), its
        // own one-element `iovec` over `max_datagram` bytes of `bufs`, and
        // either no control buffer or its own `Control` (with
        // `msg_controllen` its size), all owned by `self` and alive for the
        // call.
        // A null timeout is allowed (the socket's read timeout applies).
        let n = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                self.recv_hdrs.as_mut_ptr(),
                self.size as c_uint,
                libc::MSG_WAITFORONE as _,
                ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        self.received = (n as usize).min(self.size);
        Ok(self.received)
    }

    /// Datagram `i` of the last receive, and the reply buffer that goes
    /// with it.
    pub(crate) fn slot(&mut self, i: usize) -> (Received<'_>, &mut Vec<u8>) {
        let received = match self.recv_hdrs.get(i).filter(|_| i < self.received) {
            Some(mmsg) => {
                let start = i * self.max_datagram;
                let len = (mmsg.msg_len as usize).min(self.max_datagram);
                let flags = mmsg.msg_hdr.msg_flags;
                let mut truncated = flags & libc::MSG_TRUNC != 0;
                if let Some(control) = self.recv_controls.get(i) {
                    // `msg_controllen` is `size_t` on glibc, `socklen_t` on musl.
                    #[allow(clippy::unnecessary_cast)]
                    let arrival = cmsg::parse(control, mmsg.msg_hdr.msg_controllen as usize);
                    // Without its arrival address the reply could go out
                    // from the wrong one: the datagram is not whole.
                    truncated |= flags & libc::MSG_CTRUNC != 0 || arrival.local.is_none();
                    self.arrivals[i] = arrival;
                }
                self.peers[i] = to_std(&self.addrs[i], mmsg.msg_hdr.msg_namelen);
                Received {
                    data: self.bufs.get(start..start + len).unwrap_or_default(),
                    truncated,
                    peer: self.peers[i],
                    local: self.arrivals[i].local,
                }
            }
            None => Received::NONE,
        };
        let reply = &mut self.replies[i.min(self.size - 1)];
        (received, reply)
    }

    /// Queues the reply in slot `i` for the next [`send`](Batch::send), to
    /// the address datagram `i` came from, exactly as the kernel gave it.
    ///
    /// With segmentation offload, a reply to the same peer as the message
    /// queued just before joins that message as one more segment when it is
    /// no larger than the message's segments.
    pub(crate) fn queue_reply(&mut self, i: usize) {
        if i >= self.received || self.queued_iovs >= self.size {
            return;
        }
        let len = self.replies[i].len();
        let iov = self.queued_iovs;
        self.send_iovs[iov] = iovec {
            iov_base: self.replies[i].as_ptr().cast_mut().cast::<c_void>(),
            iov_len: len,
        };
        self.queued_iovs += 1;
        if self.gso && self.queued > 0 && self.joins(self.queued - 1, i, len) {
            let m = self.queued - 1;
            let out = &mut self.outgoing[m];
            out.segments += 1;
            out.total += len;
            out.closed = len < out.segment_size;
            self.send_hdrs[m].msg_hdr.msg_iovlen += 1;
            return;
        }
        let m = self.queued;
        self.outgoing[m] = Outgoing {
            slot: i,
            first_iov: iov,
            segments: 1,
            segment_size: len,
            total: len,
            closed: !self.gso || len == 0 || len > MAX_SEGMENT_SIZE,
        };
        let hdr = &mut self.send_hdrs[m].msg_hdr;
        hdr.msg_name = ptr::from_ref(&self.addrs[i]).cast_mut().cast::<c_void>();
        hdr.msg_namelen = self.recv_hdrs[i].msg_hdr.msg_namelen;
        hdr.msg_iov = ptr::from_mut(&mut self.send_iovs[iov]);
        hdr.msg_iovlen = 1;
        hdr.msg_control = ptr::null_mut();
        hdr.msg_controllen = 0;
        self.queued += 1;
    }

    /// Whether a reply of `len` bytes for receive slot `i` can join message `m`.
    fn joins(&self, m: usize, i: usize, len: usize) -> bool {
        let out = &self.outgoing[m];
        !out.closed
            && len > 0
            && len <= out.segment_size
            && out.segments < MAX_SEGMENTS
            && out.total + len <= MAX_SEGMENTED_TOTAL
            && self.peers[out.slot].is_some()
            && self.peers[out.slot] == self.peers[i]
            && self.arrivals[out.slot] == self.arrivals[i]
    }

    /// Sends every queued reply; returns how many replies were sent and how
    /// many failed. A failed message is counted and the rest still go out;
    /// a failed segmented message is sent again one reply at a time, and
    /// when that works segmentation is turned off for this batch.
    pub(crate) fn send(&mut self, socket: &Socket) -> (u64, u64) {
        for m in 0..self.queued {
            self.set_control(m);
        }
        let (mut sent, mut failed) = (0u64, 0u64);
        let mut start = 0;
        while start < self.queued {
            let rest = &mut self.send_hdrs[start..self.queued];
            // SAFETY: each of the `rest.len()` headers points at a
            // `sockaddr_storage` in `addrs` (with the length the kernel gave
            // on receive), at `msg_iovlen` consecutive iovecs of `send_iovs`
            // over reply `Vec`s not touched since `queue_reply`, and at a
            // control buffer in `controls` of `msg_controllen` bytes or none;
            // all are owned by `self` and outlive the call.
            let n = unsafe {
                libc::sendmmsg(
                    socket.as_raw_fd(),
                    rest.as_mut_ptr(),
                    rest.len() as c_uint,
                    0,
                )
            };
            if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            if n <= 0 {
                // `sendmmsg` fails only when the first message fails (and
                // never returns 0 for a non-empty list; counted all the same
                // so the loop always advances).
                let (ok, bad) = self.send_one_by_one(socket, start);
                sent += ok;
                failed += bad;
                start += 1;
            } else {
                let n = (n as usize).min(rest.len());
                sent += self.outgoing[start..start + n]
                    .iter()
                    .map(|o| o.segments as u64)
                    .sum::<u64>();
                start += n;
            }
        }
        self.queued = 0;
        self.queued_iovs = 0;
        (sent, failed)
    }

    /// Writes the control messages of message `m`: the address to send
    /// from, and `UDP_SEGMENT` if it carries more than one reply.
    fn set_control(&mut self, m: usize) {
        let out = self.outgoing[m];
        // At most MAX_SEGMENT_SIZE, so it fits.
        let segment = (out.segments > 1).then_some(out.segment_size as u16);
        let used = if self.pktinfo || segment.is_some() {
            cmsg::write(&mut self.controls[m], &self.arrivals[out.slot], segment)
        } else {
            0
        };
        let hdr = &mut self.send_hdrs[m].msg_hdr;
        if used == 0 {
            hdr.msg_control = ptr::null_mut();
            hdr.msg_controllen = 0;
        } else {
            hdr.msg_control = self.controls[m].0.as_mut_ptr().cast::<c_void>();
            hdr.msg_controllen = used as _;
        }
    }

    /// Sends the replies of message `m` one datagram each, without
    /// segmentation; returns how many were sent and how many failed. Turns
    /// segmentation off when it was the cause of the failure.
    fn send_one_by_one(&mut self, socket: &Socket, m: usize) -> (u64, u64) {
        let out = self.outgoing[m];
        if out.segments < 2 {
            return (0, 1);
        }
        let (mut sent, mut failed) = (0u64, 0u64);
        let mut control = Control::EMPTY;
        let used = cmsg::write(&mut control, &self.arrivals[out.slot], None);
        for iov in out.first_iov..out.first_iov + out.segments {
            let mut hdr = self.send_hdrs[m].msg_hdr;
            hdr.msg_iov = ptr::from_mut(&mut self.send_iovs[iov]);
            hdr.msg_iovlen = 1;
            if used == 0 {
                hdr.msg_control = ptr::null_mut();
                hdr.msg_controllen = 0;
            } else {
                hdr.msg_control = control.0.as_mut_ptr().cast::<c_void>();
                hdr.msg_controllen = used as _;
            }
            loop {
                // SAFETY: `hdr` is a copy of a queued header (address in
                // `addrs`) with one iovec of `send_iovs` and either no
                // control buffer or `control`, `used` bytes long; everything
                // it points at outlives the call.
                let rc = unsafe { libc::sendmsg(socket.as_raw_fd(), &hdr, 0) };
                if rc >= 0 {
                    sent += 1;
                } else if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                } else {
                    failed += 1;
                }
                break;
            }
        }
        if sent > 0 {
            // The replies go out alone but not together: this path (a device
            // or route) does not take segmented sends.
            self.gso = false;
        }
        (sent, failed)
    }
}

/// Whether the kernel knows `UDP_SEGMENT` (Linux 4.18+).
fn supports_gso(socket: &Socket) -> bool {
    let mut value: c_int = 0;
    let mut len = mem::size_of::<c_int>() as socklen_t;
    // SAFETY: `value` and `len` are valid for writes and `len` is the size
    // of `value`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_UDP,
            libc::UDP_SEGMENT,
            ptr::from_mut(&mut value).cast::<c_void>(),
            &mut len,
        )
    };
    rc == 0
}
