//! One datagram at a time with its arrival address, for the portable loop
//! on a wildcard-bound socket.

use std::io;
use std::mem;
use std::os::fd::AsRawFd;
use std::ptr;

use libc::{c_void, iovec, sockaddr_storage, socklen_t};
use socket2::Socket;

use super::cmsg::{self, Arrival, Control};
use super::to_std;
use crate::sys::Received;

/// One datagram at a time with its arrival address: `recvmsg` and
/// `sendmsg`, for the portable loop on a wildcard-bound socket.
pub(crate) struct Single {
    addr: sockaddr_storage,
    addr_len: socklen_t,
    control: Control,
    arrival: Arrival,
}

impl Single {
    /// Buffers for one datagram.
    pub(crate) fn new() -> Option<Single> {
        Some(Single {
            // SAFETY: a plain C struct, valid when zeroed.
            addr: unsafe { mem::zeroed() },
            addr_len: 0,
            control: Control::EMPTY,
            arrival: Arrival::default(),
        })
    }

    /// Receives one datagram into `buf` (blocking, with the socket's read
    /// timeout), with its sender and arrival address.
    pub(crate) fn recv<'b>(
        &mut self,
        socket: &Socket,
        buf: &'b mut [u8],
    ) -> io::Result<Received<'b>> {
        let mut iov = iovec {
            iov_base: buf.as_mut_ptr().cast::<c_void>(),
            iov_len: buf.len(),
        };
        // SAFETY: a plain C struct, valid when zeroed.
        let mut hdr: libc::msghdr = unsafe { mem::zeroed() };
        hdr.msg_name = ptr::from_mut(&mut self.addr).cast::<c_void>();
        hdr.msg_namelen = mem::size_of::<sockaddr_storage>() as socklen_t;
        hdr.msg_iov = &mut iov;
        hdr.msg_iovlen = 1;
        hdr.msg_control = self.control.0.as_mut_ptr().cast::<c_void>();
        hdr.msg_controllen = cmsg::CONTROL_ROOM as _;
        // SAFETY: `hdr` points at `self.addr` (its size given), one iovec over
        // `buf`, and `self.control` (its size given), all alive for the call.
        let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut hdr, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        self.addr_len = hdr.msg_namelen;
        // `msg_controllen` is `size_t` on glibc, `socklen_t` on musl.
        #[allow(clippy::unnecessary_cast)]
        let control_len = hdr.msg_controllen as usize;
        self.arrival = cmsg::parse(&self.control, control_len);
        let len = (n as usize).min(buf.len());
        let truncated = hdr.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0
            || self.arrival.local.is_none();
        let peer = to_std(&self.addr, self.addr_len);
        Ok(Received {
            data: buf.get(..len).unwrap_or_default(),
            truncated,
            peer,
            local: self.arrival.local,
        })
    }

    /// Sends `reply` to the sender of the last datagram received, from the
    /// address that datagram arrived on.
    pub(crate) fn send(&mut self, socket: &Socket, reply: &[u8]) -> io::Result<usize> {
        let mut control = Control::EMPTY;
        let used = cmsg::write(&mut control, &self.arrival, None);
        let mut iov = iovec {
            iov_base: reply.as_ptr().cast_mut().cast::<c_void>(),
            iov_len: reply.len(),
        };
        // SAFETY: a plain C struct, valid when zeroed.
        let mut hdr: libc::msghdr = unsafe { mem::zeroed() };
        hdr.msg_name = ptr::from_mut(&mut self.addr).cast::<c_void>();
        hdr.msg_namelen = self.addr_len;
        hdr.msg_iov = &mut iov;
        hdr.msg_iovlen = 1;
        if used > 0 {
            hdr.msg_control = control.0.as_mut_ptr().cast::<c_void>();
            hdr.msg_controllen = used as _;
        }
        // SAFETY: `hdr` points at the sender's address as received, one
        // iovec over `reply` (only read), and `used` bytes of `control`, all
        // alive for the call.
        let n = unsafe { libc::sendmsg(socket.as_raw_fd(), &hdr, 0) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}
