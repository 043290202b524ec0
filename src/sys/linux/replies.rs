//! Sending replies in batches: `sendmmsg`, with segmentation offload
//! (`UDP_SEGMENT`) for replies that go to the same peer from the same
//! address. Used by the batched receive loop and by handler-pool threads.
//!
//! Headers and iovecs are built inside [`Replies::send`] from fresh
//! pointers, right before the system calls that read them, while the
//! buffers they point at are borrowed; they are kept in [`Scratch`]
//! storage, which holds no pointer between calls.

use std::io;
use std::mem;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::ptr;

use libc::{c_int, c_uint, c_void, iovec, mmsghdr, socklen_t};
use socket2::{SockAddr, Socket};

use super::cmsg::{self, SendCmsg};
use super::pktinfo_io::send_msg;
use super::{Scratch, cvt};
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
    // Scratch for `send`, filled by it: one entry per message (names,
    // messages, cmsgs, hdrs) or per reply (iovs).
    names: Box<[SockAddr]>,
    messages: Box<[Message]>,
    cmsgs: Box<[SendCmsg]>,
    iovs: Scratch<iovec>,
    hdrs: Scratch<mmsghdr>,
    /// The error of the last message that failed, for the caller to report.
    last_error: Option<io::Error>,
}

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
    /// Bytes of control messages (in its `SendCmsg`); 0 for none.
    control_len: usize,
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
            cmsgs: vec![SendCmsg::EMPTY; size].into_boxed_slice(),
            iovs: Scratch::new(size),
            hdrs: Scratch::new(size),
            last_error: None,
        }
    }

    /// How many places there are.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
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
        let count = self.plan_messages();
        let Replies {
            gso,
            buffers,
            queue,
            queued,
            names,
            messages,
            iovs,
            hdrs,
            cmsgs,
            last_error,
            ..
        } = self;
        // Shared borrows of everything the headers point at, held until the
        // last system call: nothing can change, move or free it meanwhile.
        let out = Outgoing {
            queue: &queue[..*queued],
            buffers,
            names,
            cmsgs,
            messages: &messages[..count],
        };
        let hdrs = out.headers(iovs.get(), hdrs.get());
        let (len, hdrs) = (hdrs.len(), hdrs.as_mut_ptr());
        let fd = socket.as_raw_fd();
        let (mut sent, mut failed) = (0u64, 0u64);
        let mut start = 0;
        let mut blocked = None;
        while start < len {
            let (rest, rest_len) = (hdrs.wrapping_add(start), len - start);
            let result = retry_interrupted(|| {
                // SAFETY: `out.headers` built the `len` headers at `hdrs` in
                // this call, and `rest` is the tail from `start < len`; each
                // points at a `SockAddr` of `names` (its length given), at
                // `msg_iovlen` consecutive iovecs of `iovs` over reply
                // buffers, and at `msg_controllen` bytes of a `SendCmsg` of
                // `cmsgs` or none. `out` borrows the names, reply buffers
                // and control messages until after the loop, so none can
                // move, grow or be freed before the kernel is done, and the
                // `iovs` and `hdrs` scratch is not touched again in this
                // function; the kernel only reads all of it on send.
                let rc = unsafe { libc::sendmmsg(fd, rest, rest_len as c_uint, 0) };
                cvt(rc as isize)
            });
            match result {
                Ok(n) if n > 0 => {
                    let n = n.min(rest_len);
                    sent += out.messages[start..start + n]
                        .iter()
                        .map(|m| out.counted(m))
                        .sum::<u64>();
                    start += n;
                }
                // `sendmmsg` fails only when the first message fails (and
                // never returns 0 for a non-empty list; handled the same so
                // the loop always advances).
                Err(err) if keep_blocked && err.kind() == io::ErrorKind::WouldBlock => {
                    blocked = Some(out.messages[start].first);
                    break;
                }
                failure => {
                    let err = failure.err();
                    let (ok, bad) = out.first_failed(socket, start, err.as_ref(), gso, last_error);
                    if bad > 0 {
                        *last_error = err;
                    }
                    sent += ok;
                    failed += bad;
                    start += 1;
                }
            }
        }
        match blocked {
            Some(first) => {
                queue.copy_within(first..*queued, 0);
                *queued -= first;
            }
            None => *queued = 0,
        }
        (sent, failed)
    }

    /// Groups the queued replies into outgoing messages, with each
    /// message's address and control messages; returns how many. With
    /// segmentation offload, a reply joins the message before it when it
    /// goes to the same peer from the same address and is no larger than
    /// that message's segments.
    fn plan_messages(&mut self) -> usize {
        let mut count = 0;
        for q in 0..self.queued {
            let entry = self.queue[q];
            let len = self.buffers[entry.place].len();
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
                control_len: 0,
            };
            count += 1;
        }
        for m in 0..count {
            let message = &mut self.messages[m];
            let entry = self.queue[message.first];
            // At most MAX_SEGMENT_SIZE, so it fits.
            let segment = (message.segments > 1).then_some(message.segment_size as u16);
            self.names[m] = SockAddr::from(entry.to);
            message.control_len = if entry.from.local.is_some() || segment.is_some() {
                cmsg::write(&mut self.cmsgs[m], &entry.from, segment)
            } else {
                0
            };
        }
        count
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
}

/// The planned messages of one send and everything their headers point at,
/// borrowed for as long as the headers are in use.
struct Outgoing<'a> {
    /// The queued replies, in order.
    queue: &'a [Queued],
    buffers: &'a [Vec<u8>],
    /// Message `m` goes to `names[m]`...
    names: &'a [SockAddr],
    /// ...with the first `control_len` bytes of `cmsgs[m]`.
    cmsgs: &'a [SendCmsg],
    messages: &'a [Message],
}

impl Outgoing<'_> {
    /// Fills one header per message, and the iovecs they point at, from
    /// fresh pointers into the borrowed buffers; returns the headers.
    fn headers<'h>(&self, iovs: &mut [iovec], hdrs: &'h mut [mmsghdr]) -> &'h mut [mmsghdr] {
        for (iov, entry) in iovs.iter_mut().zip(self.queue) {
            let buffer = &self.buffers[entry.place];
            *iov = iovec {
                iov_base: buffer.as_ptr().cast_mut().cast::<c_void>(),
                iov_len: buffer.len(),
            };
        }
        let iovs = iovs.as_mut_ptr();
        let places = self.names.iter().zip(self.cmsgs);
        let hdrs = &mut hdrs[..self.messages.len()];
        for ((mmsg, message), (name, control)) in hdrs.iter_mut().zip(self.messages).zip(places) {
            let hdr = &mut mmsg.msg_hdr;
            hdr.msg_name = name.as_ptr().cast_mut().cast::<c_void>();
            hdr.msg_namelen = name.len();
            // In bounds: a message's iovecs are entries `first..first +
            // segments` of the queue's.
            hdr.msg_iov = iovs.wrapping_add(message.first);
            hdr.msg_iovlen = message.segments as _;
            if message.control_len == 0 {
                hdr.msg_control = ptr::null_mut();
                hdr.msg_controllen = 0;
            } else {
                hdr.msg_control = control.0.as_ptr().cast_mut().cast::<c_void>();
                hdr.msg_controllen = message.control_len as _;
            }
            hdr.msg_flags = 0;
            mmsg.msg_len = 0;
        }
        hdrs
    }

    /// How many of the replies in `message` are counted.
    fn counted(&self, message: &Message) -> u64 {
        self.queue[message.first..message.first + message.segments]
            .iter()
            .filter(|q| q.counted)
            .count() as u64
    }

    /// Message `m` failed with `err`; returns how many of its counted
    /// replies were sent after all and how many failed.
    ///
    /// Some devices and drivers cannot segment, and Linux says so only when
    /// a segmented send fails with `EIO` (or sometimes `EINVAL`): then
    /// segmentation is turned off (`gso`) and the message's replies go one
    /// by one, a failure among them kept in `last_error`. Any other error
    /// fails the whole message.
    fn first_failed(
        &self,
        socket: &Socket,
        m: usize,
        err: Option<&io::Error>,
        gso: &mut bool,
        last_error: &mut Option<io::Error>,
    ) -> (u64, u64) {
        let message = self.messages[m];
        let cannot_segment = matches!(
            err.and_then(io::Error::raw_os_error),
            Some(libc::EIO | libc::EINVAL)
        );
        if message.segments < 2 || !cannot_segment {
            return (0, self.counted(&message));
        }
        *gso = false;
        let to = &self.names[m];
        let (mut sent, mut failed) = (0u64, 0u64);
        for entry in &self.queue[message.first..message.first + message.segments] {
            let reply = &self.buffers[entry.place];
            let result = retry_interrupted(|| {
                // SAFETY: `to` is a live `SockAddr`, `to.len()` bytes long,
                // borrowed for the call.
                unsafe { send_msg(socket, reply, to.as_ptr().cast(), to.len(), &entry.from) }
            });
            let counted = u64::from(entry.counted);
            match result {
                Ok(()) => sent += counted,
                Err(err) => {
                    failed += counted;
                    *last_error = Some(err);
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
