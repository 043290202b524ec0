//! Batched receive and reply: `recvmmsg` / `sendmmsg`, with segmentation
//! offload for replies to one peer.
//!
//! No message header outlives the call that uses it: `recv` and `send` build
//! their headers, iovecs and control messages from fresh pointers right
//! before the system call, so nothing the kernel reads can have moved or
//! grown since it was pointed at (the approach of quinn-udp).

use std::io;
use std::mem;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::ptr;

use libc::{c_int, c_uint, c_void, iovec, mmsghdr, sockaddr_storage, socklen_t};
use socket2::Socket;

use super::cmsg::{self, Arrival, RecvCmsg, SendCmsg};
use super::{cvt, to_std};
use crate::config::Config;
use crate::sys::{REPLY_RESERVE, Received, retry_interrupted, trim_reply};

/// The most messages one `recvmmsg`/`sendmmsg` call takes (`UIO_MAXIOV`).
pub(crate) const MAX_BATCH: usize = 1024;

/// The most segments one `UDP_SEGMENT` send may carry (the kernel's
/// `UDP_MAX_SEGMENTS` since it gained the option).
const MAX_SEGMENTS: usize = 64;
/// The largest segment coalesced: a full Ethernet frame's UDP payload over
/// IPv6 (1500 − 40 − 8). Segments must fit the route's MTU, so larger
/// replies go out one per message.
const MAX_SEGMENT_SIZE: usize = 1452;
/// The most bytes one segmented send may carry.
const MAX_SEGMENTED_TOTAL: usize = 65_000;

/// One worker's buffers for batches, allocated once.
pub(crate) struct Batch {
    size: usize,
    max_datagram: usize,
    /// Whether replies to the same peer are coalesced with `UDP_SEGMENT`.
    gso: bool,
    /// Whether the socket reports arrival addresses, and replies go out
    /// from them.
    pktinfo: bool,

    // What the kernel writes on receive, one per slot.
    /// `size` receive buffers of `max_datagram` bytes, end to end.
    bufs: Box<[u8]>,
    addrs: Box<[sockaddr_storage]>,
    /// One per slot where `pktinfo` is set, else none.
    recv_cmsgs: Box<[RecvCmsg]>,
    recv_iovs: Box<[iovec]>,
    recv_hdrs: Box<[mmsghdr]>,

    /// The datagrams of the last receive that have a sender, in order.
    datagrams: Box<[Datagram]>,
    count: usize,
    /// One reply buffer per entry of `datagrams`.
    replies: Box<[Vec<u8>]>,
    /// Indices into `datagrams` whose replies go out with the next `send`,
    /// each with whether its send is to be counted (see `queue_reply`).
    queue: Box<[(usize, bool)]>,
    queued: usize,

    // Scratch for `send`, filled by it.
    messages: Box<[Message]>,
    send_iovs: Box<[iovec]>,
    send_hdrs: Box<[mmsghdr]>,
    send_cmsgs: Box<[SendCmsg]>,
    /// The error of the last message that failed, for the caller to report.
    last_error: Option<io::Error>,
}

/// One received datagram, as read from its header once.
#[derive(Debug, Clone, Copy)]
struct Datagram {
    /// The receive slot it landed in.
    slot: usize,
    len: usize,
    truncated: bool,
    peer: SocketAddr,
    /// The length of its sender's address, as the kernel wrote it.
    name_len: socklen_t,
    arrival: Arrival,
}

const NO_DATAGRAM: Datagram = Datagram {
    slot: 0,
    len: 0,
    truncated: false,
    peer: SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
    name_len: 0,
    arrival: Arrival {
        local: None,
        ifindex: 0,
    },
};

/// One outgoing message: a reply, or with segmentation offload several
/// replies to the same peer.
#[derive(Debug, Clone, Copy, Default)]
struct Message {
    /// The datagram whose sender it goes to (index into `datagrams`).
    to: usize,
    /// Its first iovec in `send_iovs`; the others follow.
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

/// `n` zeroed values of a plain C struct.
fn zeroed<T>(n: usize) -> Box<[T]> {
    // SAFETY: only instantiated with `sockaddr_storage`, `iovec` and
    // `mmsghdr`: plain C structs of integers and pointers, for which all
    // zeroes is a valid value (null pointers, zero lengths).
    (0..n).map(|_| unsafe { mem::zeroed() }).collect()
}

impl Batch {
    /// Buffers for the batches of `config` (its batch size, largest
    /// datagram, segmentation and pktinfo settings); `None` when the config
    /// asks for the portable loop.
    pub(crate) fn new(socket: &Socket, config: &Config) -> Option<Batch> {
        let size = config.batch_size?.clamp(1, MAX_BATCH);
        let max_datagram = config.max_datagram;
        Some(Batch {
            size,
            max_datagram,
            gso: config.gso && supports_gso(socket),
            pktinfo: config.pktinfo,
            // Zeroed memory from the allocator: pages are only touched by
            // the datagrams that reach them.
            bufs: vec![0u8; size * max_datagram].into_boxed_slice(),
            addrs: zeroed(size),
            recv_cmsgs: vec![RecvCmsg::EMPTY; if config.pktinfo { size } else { 0 }]
                .into_boxed_slice(),
            recv_iovs: zeroed(size),
            recv_hdrs: zeroed(size),
            datagrams: vec![NO_DATAGRAM; size].into_boxed_slice(),
            count: 0,
            replies: (0..size)
                .map(|_| Vec::with_capacity(REPLY_RESERVE))
                .collect(),
            queue: vec![(0, false); size].into_boxed_slice(),
            queued: 0,
            messages: vec![Message::default(); size].into_boxed_slice(),
            send_iovs: zeroed(size),
            send_hdrs: zeroed(size),
            send_cmsgs: vec![SendCmsg::EMPTY; size].into_boxed_slice(),
            last_error: None,
        })
    }

    /// Receives up to a batch of datagrams: blocks until the first arrives
    /// (or the socket's read timeout expires), then takes whatever else is
    /// already queued, without waiting (`MSG_WAITFORONE`). Returns how many
    /// datagrams came; wake-ups without a sender are left out, so this may
    /// be 0.
    pub(crate) fn recv(&mut self, socket: &Socket) -> io::Result<usize> {
        // Replies of the last batch are sent; an oversized buffer is given
        // back before the worker waits.
        for reply in self.replies.iter_mut().take(self.count) {
            trim_reply(reply);
        }
        self.count = 0;
        self.queued = 0;
        let bufs = self.bufs.as_mut_ptr();
        let addrs = self.addrs.as_mut_ptr();
        let iovs = self.recv_iovs.as_mut_ptr();
        let cmsgs = self.recv_cmsgs.as_mut_ptr();
        for (i, mmsg) in self.recv_hdrs.iter_mut().enumerate() {
            // In bounds: `bufs` holds `size * max_datagram` bytes, and every
            // other array `size` entries (`recv_cmsgs` too when `pktinfo`).
            let iov = iovs.wrapping_add(i);
            // SAFETY: `iov` points at entry `i` of `recv_iovs`, in bounds and
            // not otherwise borrowed here.
            unsafe {
                iov.write(iovec {
                    iov_base: bufs.wrapping_add(i * self.max_datagram).cast::<c_void>(),
                    iov_len: self.max_datagram,
                });
            }
            let hdr = &mut mmsg.msg_hdr;
            hdr.msg_name = addrs.wrapping_add(i).cast::<c_void>();
            hdr.msg_namelen = mem::size_of::<sockaddr_storage>() as socklen_t;
            hdr.msg_iov = iov;
            hdr.msg_iovlen = 1;
            if self.pktinfo {
                hdr.msg_control = cmsgs.wrapping_add(i).cast::<c_void>();
                hdr.msg_controllen = mem::size_of::<RecvCmsg>() as _;
            } else {
                hdr.msg_control = ptr::null_mut();
                hdr.msg_controllen = 0;
            }
            hdr.msg_flags = 0;
            mmsg.msg_len = 0;
        }
        let (fd, hdrs, size) = (socket.as_raw_fd(), self.recv_hdrs.as_mut_ptr(), self.size);
        let received = retry_interrupted(|| {
            // SAFETY: `hdrs` holds `size` headers, each pointing (with
            // pointers made just above) at its own `sockaddr_storage` (its
            // size in `msg_namelen`), its own one-element `iovec` over
            // `max_datagram` bytes of `bufs`, and either no control buffer
            // or its own `RecvCmsg` (its size in `msg_controllen`); all are
            // owned by `self`, which this call borrows mutably, so nothing
            // else touches them until the call returns. A null timeout is
            // allowed (the socket's read timeout applies).
            let rc = unsafe {
                libc::recvmmsg(
                    fd,
                    hdrs,
                    size as c_uint,
                    libc::MSG_WAITFORONE as _,
                    ptr::null_mut(),
                )
            };
            cvt(rc as isize)
        })?;
        for slot in 0..received.min(self.size) {
            let mmsg = &self.recv_hdrs[slot];
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
                // Without its arrival address the reply could go out from
                // the wrong one: the datagram is not whole. Other control
                // messages cut short (`MSG_CTRUNC`) do not matter.
                truncated |= arrival.local.is_none();
            }
            self.datagrams[self.count] = Datagram {
                slot,
                len: (mmsg.msg_len as usize).min(self.max_datagram),
                truncated,
                peer,
                name_len: hdr.msg_namelen,
                arrival,
            };
            self.count += 1;
        }
        Ok(self.count)
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
        Some((received, self.replies.get_mut(i)?))
    }

    /// Queues the reply to datagram `i` for the next [`send`](Batch::send).
    /// `counted`: whether [`send`](Batch::send) counts how its send went (a
    /// busy reply to a shed request is already counted as shed).
    pub(crate) fn queue_reply(&mut self, i: usize, counted: bool) {
        if i < self.count && self.queued < self.size {
            self.queue[self.queued] = (i, counted);
            self.queued += 1;
        }
    }

    /// How many of the replies in `message` are counted.
    fn counted(&self, message: &Message) -> u64 {
        self.queue[message.first_iov..message.first_iov + message.segments]
            .iter()
            .filter(|(_, counted)| *counted)
            .count() as u64
    }

    /// The error of the last reply that failed to send, once.
    pub(crate) fn take_error(&mut self) -> Option<io::Error> {
        self.last_error.take()
    }

    /// How many replies are queued.
    pub(crate) fn queued(&self) -> usize {
        self.queued
    }

    /// Sends every queued reply, each to the address its datagram came from
    /// exactly as the kernel gave it; returns how many counted replies were
    /// sent and how many failed. A failed message is counted and the rest
    /// still go out.
    pub(crate) fn send(&mut self, socket: &Socket) -> (u64, u64) {
        let messages = self.build_messages();
        let (mut sent, mut failed) = (0u64, 0u64);
        let mut start = 0;
        while start < messages {
            let rest = &mut self.send_hdrs[start..messages];
            let (fd, hdrs, len) = (socket.as_raw_fd(), rest.as_mut_ptr(), rest.len());
            let result = retry_interrupted(|| {
                // SAFETY: each of the `len` headers was built by
                // `build_messages` in this call: it points at a
                // `sockaddr_storage` of `addrs` (with the length the kernel
                // gave on receive), at `msg_iovlen` consecutive iovecs of
                // `send_iovs` over reply buffers, and at a `SendCmsg` of
                // `send_cmsgs` (`msg_controllen` bytes) or none. `self` is
                // borrowed mutably for the whole call, so none of them can
                // move, grow or be freed before the kernel is done.
                let rc = unsafe { libc::sendmmsg(fd, hdrs, len as c_uint, 0) };
                cvt(rc as isize)
            });
            match result {
                Ok(n) if n > 0 => {
                    let n = n.min(len);
                    sent += self.messages[start..start + n]
                        .iter()
                        .map(|m| self.counted(m))
                        .sum::<u64>();
                    start += n;
                }
                // `sendmmsg` fails only when the first message fails (and
                // never returns 0 for a non-empty list; handled the same so
                // the loop always advances).
                failure => {
                    let err = failure.err();
                    let (ok, bad) = self.first_failed(socket, start, err.as_ref());
                    if bad > 0 {
                        self.last_error = err;
                    }
                    sent += ok;
                    failed += bad;
                    start += 1;
                }
            }
        }
        self.queued = 0;
        (sent, failed)
    }

    /// Builds the outgoing messages for the queued replies; returns how
    /// many. With segmentation offload, a reply joins the message before it
    /// when it goes to the same peer from the same address and is no larger
    /// than that message's segments.
    fn build_messages(&mut self) -> usize {
        let mut count = 0;
        for q in 0..self.queued {
            let to = self.queue[q].0;
            let reply = &self.replies[to];
            let len = reply.len();
            self.send_iovs[q] = iovec {
                iov_base: reply.as_ptr().cast_mut().cast::<c_void>(),
                iov_len: len,
            };
            if count > 0 && self.joins(&self.messages[count - 1], to, len) {
                let last = &mut self.messages[count - 1];
                last.segments += 1;
                last.total += len;
                last.closed = len < last.segment_size;
                continue;
            }
            self.messages[count] = Message {
                to,
                first_iov: q,
                segments: 1,
                segment_size: len,
                total: len,
                closed: !self.gso || len == 0 || len > MAX_SEGMENT_SIZE,
            };
            count += 1;
        }
        for m in 0..count {
            let message = self.messages[m];
            // At most MAX_SEGMENT_SIZE, so it fits.
            let segment = (message.segments > 1).then_some(message.segment_size as u16);
            self.set_header(m, &message, message.first_iov, message.segments, segment);
        }
        count
    }

    /// Fills send header `m` for `iovs` iovecs from `first_iov`, to the
    /// sender of `message.to`, from its arrival address where replies must
    /// be, with a segment size where given.
    fn set_header(
        &mut self,
        m: usize,
        message: &Message,
        first_iov: usize,
        iovs: usize,
        segment: Option<u16>,
    ) {
        let datagram = self.datagrams[message.to];
        let used = if self.pktinfo || segment.is_some() {
            cmsg::write(&mut self.send_cmsgs[m], &datagram.arrival, segment)
        } else {
            0
        };
        let hdr = &mut self.send_hdrs[m].msg_hdr;
        hdr.msg_name = ptr::from_mut(&mut self.addrs[datagram.slot]).cast::<c_void>();
        hdr.msg_namelen = datagram.name_len;
        hdr.msg_iov = self.send_iovs.as_mut_ptr().wrapping_add(first_iov);
        hdr.msg_iovlen = iovs as _;
        if used == 0 {
            hdr.msg_control = ptr::null_mut();
            hdr.msg_controllen = 0;
        } else {
            hdr.msg_control = self.send_cmsgs[m].0.as_mut_ptr().cast::<c_void>();
            hdr.msg_controllen = used as _;
        }
        hdr.msg_flags = 0;
    }

    /// Whether a reply of `len` bytes to datagram `to` can join `message`.
    fn joins(&self, message: &Message, to: usize, len: usize) -> bool {
        let (first, next) = (&self.datagrams[message.to], &self.datagrams[to]);
        !message.closed
            && len > 0
            && len <= message.segment_size
            && message.segments < MAX_SEGMENTS
            && message.total + len <= MAX_SEGMENTED_TOTAL
            && first.peer == next.peer
            && first.arrival == next.arrival
    }

    /// Message `m` failed with `err`; returns how many of its replies were
    /// sent after all and how many failed.
    ///
    /// Some devices and drivers cannot segment, and Linux says so only when
    /// a segmented send fails with `EIO` (or sometimes `EINVAL`): then this
    /// worker stops segmenting and sends the message's replies one by one.
    /// Any other error fails the whole message.
    fn first_failed(&mut self, socket: &Socket, m: usize, err: Option<&io::Error>) -> (u64, u64) {
        let message = self.messages[m];
        let cannot_segment = matches!(
            err.and_then(io::Error::raw_os_error),
            Some(libc::EIO | libc::EINVAL)
        );
        if message.segments < 2 || !cannot_segment {
            return (0, self.counted(&message));
        }
        self.gso = false;
        let (mut sent, mut failed) = (0u64, 0u64);
        for iov in message.first_iov..message.first_iov + message.segments {
            // Header `m` is rebuilt for one reply at a time; the headers
            // after it are untouched.
            self.set_header(m, &message, iov, 1, None);
            let hdr = ptr::from_ref(&self.send_hdrs[m].msg_hdr);
            let fd = socket.as_raw_fd();
            let result = retry_interrupted(|| {
                // SAFETY: header `m` was just built as in `build_messages`,
                // with one iovec over one reply buffer and no segment size;
                // `self` stays mutably borrowed across the call.
                cvt(unsafe { libc::sendmsg(fd, hdr, 0) })
            });
            let counted = u64::from(self.queue[iov].1);
            match result {
                Ok(_) => sent += counted,
                Err(err) => {
                    failed += counted;
                    self.last_error = Some(err);
                }
            }
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
