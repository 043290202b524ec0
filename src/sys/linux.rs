//! Linux: batched receive and reply with `recvmmsg` / `sendmmsg`.

use std::io;
use std::mem;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::ptr;

use libc::{
    c_int, c_uint, c_void, iovec, mmsghdr, sockaddr_in, sockaddr_in6, sockaddr_storage, socklen_t,
};
use socket2::Socket;

use super::Received;

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
    send_iovs: Box<[iovec]>,
    send_hdrs: Box<[mmsghdr]>,
    /// How many of `send_hdrs` are queued for the next send.
    queued: usize,
}

impl Batch {
    /// Buffers for batches of `size` datagrams of up to `max_datagram`
    /// bytes. `size` is at least 1 and at most [`MAX_BATCH`] (the builder
    /// checks it).
    pub(crate) fn new(size: usize, max_datagram: usize) -> Option<Batch> {
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
            replies: (0..size).map(|_| Vec::new()).collect(),
            // SAFETY: as above.
            send_iovs: (0..size).map(|_| unsafe { mem::zeroed() }).collect(),
            // SAFETY: as above.
            send_hdrs: (0..size).map(|_| unsafe { mem::zeroed() }).collect(),
            queued: 0,
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
        for mmsg in self.recv_hdrs.iter_mut().take(count) {
            mmsg.msg_hdr.msg_namelen = mem::size_of::<sockaddr_storage>() as socklen_t;
            mmsg.msg_hdr.msg_flags = 0;
            mmsg.msg_len = 0;
        }
    }

    /// Receives up to a batch of datagrams: blocks until the first arrives
    /// (or the socket's read timeout expires), then takes whatever else is
    /// already queued, without waiting (`MSG_WAITFORONE`). Returns how many.
    pub(crate) fn recv(&mut self, socket: &Socket) -> io::Result<usize> {
        self.reset_recv_headers(self.received);
        self.received = 0;
        // SAFETY: `recv_hdrs` holds `size` initialised headers, each pointing
        // at its own `sockaddr_storage` (with `msg_namelen` its size) and its
        // own one-element `iovec` over `max_datagram` bytes of `bufs`, all
        // owned by `self` and alive for the call; no control buffer is given.
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
                Received {
                    data: self.bufs.get(start..start + len).unwrap_or_default(),
                    truncated: mmsg.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
                    peer: to_std(&self.addrs[i], mmsg.msg_hdr.msg_namelen),
                }
            }
            None => Received::NONE,
        };
        let reply = &mut self.replies[i.min(self.size - 1)];
        (received, reply)
    }

    /// Queues the reply in slot `i` for the next [`send`](Batch::send), to
    /// the address datagram `i` came from, exactly as the kernel gave it.
    pub(crate) fn queue_reply(&mut self, i: usize) {
        if i >= self.received || self.queued >= self.size {
            return;
        }
        let reply = &self.replies[i];
        self.send_iovs[self.queued] = iovec {
            iov_base: reply.as_ptr().cast_mut().cast::<c_void>(),
            iov_len: reply.len(),
        };
        let hdr = &mut self.send_hdrs[self.queued].msg_hdr;
        hdr.msg_name = ptr::from_ref(&self.addrs[i]).cast_mut().cast::<c_void>();
        hdr.msg_namelen = self.recv_hdrs[i].msg_hdr.msg_namelen;
        hdr.msg_iov = ptr::from_mut(&mut self.send_iovs[self.queued]);
        hdr.msg_iovlen = 1;
        self.queued += 1;
    }

    /// Sends every queued reply; returns how many were sent and how many
    /// failed. A failed reply is skipped and the rest still go out.
    pub(crate) fn send(&mut self, socket: &Socket) -> (u64, u64) {
        let (mut sent, mut failed) = (0u64, 0u64);
        let mut start = 0;
        while start < self.queued {
            let rest = &mut self.send_hdrs[start..self.queued];
            // SAFETY: each of the `rest.len()` headers points at a
            // `sockaddr_storage` in `addrs` (with the length the kernel gave
            // on receive) and a one-element `iovec` over a reply `Vec` that is
            // not touched between `queue_reply` and here; all are owned by
            // `self` and outlive the call.
            let n = unsafe {
                libc::sendmmsg(
                    socket.as_raw_fd(),
                    rest.as_mut_ptr(),
                    rest.len() as c_uint,
                    0,
                )
            };
            match n {
                n if n < 0 => {
                    if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    // `sendmmsg` fails only when the first message fails:
                    // count it and carry on with the next.
                    failed += 1;
                    start += 1;
                }
                // Not expected from the kernel; counted so no reply goes
                // unaccounted, and so the loop always advances.
                0 => {
                    failed += 1;
                    start += 1;
                }
                n => {
                    let n = (n as usize).min(rest.len());
                    sent += n as u64;
                    start += n;
                }
            }
        }
        self.queued = 0;
        (sent, failed)
    }
}

/// Converts a socket address the kernel wrote into its std form; `None` for
/// anything but a complete IPv4 or IPv6 address (a shutdown wake-up carries
/// no address at all).
fn to_std(storage: &sockaddr_storage, len: socklen_t) -> Option<SocketAddr> {
    let len = len as usize;
    match c_int::from(storage.ss_family) {
        libc::AF_INET if len >= mem::size_of::<sockaddr_in>() => {
            // SAFETY: the family says the storage holds a `sockaddr_in`, of
            // which the kernel wrote all `len` bytes; `sockaddr_storage` is
            // larger than and aligned for every socket address type, and was
            // zero-initialised, so every byte read is initialised.
            let sin = unsafe { &*ptr::from_ref(storage).cast::<sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 if len >= mem::size_of::<sockaddr_in6>() => {
            // SAFETY: as above, for `sockaddr_in6`.
            let sin6 = unsafe { &*ptr::from_ref(storage).cast::<sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}
