//! Sending replies in batches: `sendmmsg`, with segmentation offload
//! (`UDP_SEGMENT`) for replies that go to the same peer from the same
//! address. Used by the batched receive loop and by handler-pool threads.
//!
//! Headers, iovecs and control messages are built inside [`Replies::send`]
//! from fresh pointers, right before the system call that reads them.

use std::io;
use std::mem;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::ptr;

use libc::{c_int, c_uint, c_void, iovec, mmsghdr, socklen_t};
use socket2::{SockAddr, Socket};

use super::cmsg::{self, SendCmsg};
use super::{cvt, zeroed};
use crate::sys::{Arrival, REPLY_RESERVE, retry_interrupted, trim_reply};

/// The most segments one `UDP_SEGMENT` send may carry (the kernel's
/// `UDP_MAX_SEGMENTS` since it gained the option).
const MAX_SEGMENTS: usize = 64;
/// The largest segment coalesced: a full Ethernet frame's UDP payload over
/// IPv6 (1500 − 40 − 8). Segments must fit the route's MTU, so larger
/// replies go out one per message.
const MAX_SEGMENT_SIZE: usize = 1452;
/// The most bytes one segmented send may carry.
const MAX_SEGMENTED_TOTAL: usize = 65_000;

/// Up to `size` replies, each in a reused buffer, waiting to be sent
/// together.
pub(crate) struct Replies {
    size: usize,
    /// Whether replies to the same peer are coalesced with `UDP_SEGMENT`.
    gso: bool,
    /// One buffer per place; the caller fills place `i` and queues it.
    buffers: Box<[Vec<u8>]>,
    /// The queued places in order, each with where it goes, where it goes
    /// out from, and whether its send is counted.
    queue: Box<[Queued]>,
    queued: usize,
    // Scratch for `send`, filled by it.
    names: Box<[SockAddr]>,
    messages: Box<[Message]>,
    iovs: Box<[iovec]>,
    hdrs: Box<[mmsghdr]>,
    cmsgs: Box<[SendCmsg]>,
    /// The error of the last message that failed, for the caller to report.
    last_error: Option<io::Error>,
}

// SAFETY: as for `Batch`: the raw pointers in `iovs` and `hdrs` point only
// into buffers this `Replies` owns (boxed, or the reply vectors' heap
// memory, which does not move with it), set and used only through
// `&mut self`, so moving it to another thread is sound.
unsafe impl Send for Replies {}

#[derive(Debug, Clone, Copy)]
struct Queued {
    place: usize,
    to: SocketAddr,
    from: Arrival,
    counted: bool,
}

const NOWHERE: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);

/// One outgoing message: a reply, or with segmentation offload several
/// replies to the same peer from the same address.
#[derive(Debug, Clone, Copy, Default)]
struct Message {
    /// Its first entry in `queue` (and iovec in `iovs`); the others follow.
    first: usize,
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

impl Replies {
    /// Room for `size` replies (at least 1), each buffer with
    /// [`REPLY_RESERVE`] bytes reserved; `gso` asks for segmentation offload
    /// where `socket`'s kernel has it.
    pub(crate) fn new(socket: &Socket, size: usize, gso: bool) -> Replies {
        let size = size.max(1);
        Replies {
            size,
            gso: gso && supports_gso(socket),
            buffers: (0..size)
                .map(|_| Vec::with_capacity(REPLY_RESERVE))
                .collect(),
            queue: vec![
                Queued {
                    place: 0,
                    to: NOWHERE,
                    from: Arrival::default(),
                    counted: false,
                };
                size
            ]
            .into_boxed_slice(),
            queued: 0,
            names: (0..size).map(|_| SockAddr::from(NOWHERE)).collect(),
            messages: vec![Message::default(); size].into_boxed_slice(),
            iovs: zeroed(size),
            hdrs: zeroed(size),
            cmsgs: vec![SendCmsg::EMPTY; size].into_boxed_slice(),
            last_error: None,
        }
    }

    /// How many places there are.
    pub(crate) fn size(&self) -> usize {
        self.size
    }

    /// The buffer of place `i`.
    pub(crate) fn buffer(&mut self, i: usize) -> Option<&mut Vec<u8>> {
        self.buffers.get_mut(i)
    }

    /// Gives back the buffers of places `0..count` that grew too large.
    pub(crate) fn trim(&mut self, count: usize) {
        for buffer in self.buffers.iter_mut().take(count) {
            trim_reply(buffer);
        }
    }

    /// Queues the reply in place `i` for the next [`send`](Replies::send),
    /// to `to`, from `from.local` where set. `counted`: whether `send`
    /// counts how it went (a busy reply to a shed request is counted as
    /// shed already). Ignored when every place is queued already.
    pub(crate) fn queue(&mut self, i: usize, to: SocketAddr, from: Arrival, counted: bool) {
        if i < self.size && self.queued < self.size {
            self.queue[self.queued] = Queued {
                place: i,
                to,
                from,
                counted,
            };
            self.queued += 1;
        }
    }

    /// How many replies are queued.
    pub(crate) fn queued(&self) -> usize {
        self.queued
    }

    /// Drops the queued replies unsent.
    pub(crate) fn clear(&mut self) {
        self.queued = 0;
    }

    /// Drops the queued replies unsent; returns how many of them were
    /// counted.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn drop_queued(&mut self) -> u64 {
        let counted = self.queue[..self.queued]
            .iter()
            .filter(|q| q.counted)
            .count();
        self.queued = 0;
        counted as u64
    }

    /// The error of the last reply that failed to send, once.
    pub(crate) fn take_error(&mut self) -> Option<io::Error> {
        self.last_error.take()
    }

    /// How many of the replies in `message` are counted.
    fn counted(&self, message: &Message) -> u64 {
        self.queue[message.first..message.first + message.segments]
            .iter()
            .filter(|q| q.counted)
            .count() as u64
    }

    /// Sends every queued reply; returns how many counted replies were sent
    /// and how many failed. A failed message is counted and the rest still
    /// go out.
    pub(crate) fn send(&mut self, socket: &Socket) -> (u64, u64) {
        self.send_some(socket, false)
    }

    /// As [`send`](Replies::send), for a non-blocking socket: when the
    /// socket cannot take more now (`WouldBlock`), the replies not yet sent
    /// stay queued, in order, for the caller to send again once it can.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn try_send(&mut self, socket: &Socket) -> (u64, u64) {
        self.send_some(socket, true)
    }

    fn send_some(&mut self, socket: &Socket, keep_blocked: bool) -> (u64, u64) {
        let messages = self.build_messages();
        let (mut sent, mut failed) = (0u64, 0u64);
        let mut start = 0;
        while start < messages {
            let rest = &mut self.hdrs[start..messages];
            let (fd, hdrs, len) = (socket.as_raw_fd(), rest.as_mut_ptr(), rest.len());
            let result = retry_interrupted(|| {
                // SAFETY: each of the `len` headers was built by
                // `build_messages` in this call: it points at a `SockAddr`
                // of `names` (its length given), at `msg_iovlen`
                // consecutive iovecs of `iovs` over reply buffers, and at a
                // `SendCmsg` of `cmsgs` (`msg_controllen` bytes) or none.
                // `self` is borrowed mutably for the whole call, so none of
                // them can move, grow or be freed before the kernel is done.
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
                Err(err) if keep_blocked && err.kind() == io::ErrorKind::WouldBlock => {
                    let first = self.messages[start].first;
                    self.queue.copy_within(first..self.queued, 0);
                    self.queued -= first;
                    return (sent, failed);
                }
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
            let entry = self.queue[q];
            let buffer = &self.buffers[entry.place];
            let len = buffer.len();
            self.iovs[q] = iovec {
                iov_base: buffer.as_ptr().cast_mut().cast::<c_void>(),
                iov_len: len,
            };
            if count > 0 && self.joins(&self.messages[count - 1], &entry, len) {
                let last = &mut self.messages[count - 1];
                last.segments += 1;
                last.total += len;
                last.closed = len < last.segment_size;
                continue;
            }
            self.messages[count] = Message {
                first: q,
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
            self.set_header(m, message.first, message.segments, segment);
        }
        count
    }

    /// Fills header `m` for `iovs` iovecs from queue entry `first`, to that
    /// entry's peer, from its arrival address where set, with a segment
    /// size where given.
    fn set_header(&mut self, m: usize, first: usize, iovs: usize, segment: Option<u16>) {
        let entry = self.queue[first];
        self.names[m] = SockAddr::from(entry.to);
        let used = if entry.from.local.is_some() || segment.is_some() {
            cmsg::write(&mut self.cmsgs[m], &entry.from, segment)
        } else {
            0
        };
        let hdr = &mut self.hdrs[m].msg_hdr;
        hdr.msg_name = self.names[m].as_ptr().cast_mut().cast::<c_void>();
        hdr.msg_namelen = self.names[m].len() as socklen_t;
        hdr.msg_iov = self.iovs.as_mut_ptr().wrapping_add(first);
        hdr.msg_iovlen = iovs as _;
        if used == 0 {
            hdr.msg_control = ptr::null_mut();
            hdr.msg_controllen = 0;
        } else {
            hdr.msg_control = self.cmsgs[m].0.as_mut_ptr().cast::<c_void>();
            hdr.msg_controllen = used as _;
        }
        hdr.msg_flags = 0;
    }

    /// Whether a reply of `len` bytes for `entry` can join `message`.
    fn joins(&self, message: &Message, entry: &Queued, len: usize) -> bool {
        let first = &self.queue[message.first];
        !message.closed
            && len > 0
            && len <= message.segment_size
            && message.segments < MAX_SEGMENTS
            && message.total + len <= MAX_SEGMENTED_TOTAL
            && first.to == entry.to
            && first.from == entry.from
    }

    /// Message `m` failed with `err`; returns how many of its counted
    /// replies were sent after all and how many failed.
    ///
    /// Some devices and drivers cannot segment, and Linux says so only when
    /// a segmented send fails with `EIO` (or sometimes `EINVAL`): then
    /// segmentation is turned off and the message's replies go one by one.
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
        for q in message.first..message.first + message.segments {
            // Header `m` is rebuilt for one reply at a time; the headers
            // after it are untouched.
            self.set_header(m, q, 1, None);
            let hdr = ptr::from_ref(&self.hdrs[m].msg_hdr);
            let fd = socket.as_raw_fd();
            let result = retry_interrupted(|| {
                // SAFETY: header `m` was just built as in `build_messages`,
                // with one iovec over one reply buffer and no segment size;
                // `self` stays mutably borrowed across the call.
                cvt(unsafe { libc::sendmsg(fd, hdr, 0) })
            });
            let counted = u64::from(self.queue[q].counted);
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
