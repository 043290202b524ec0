//! One datagram at a time with its arrival address, for the portable loop
//! on a wildcard-bound socket.

use std::io;
use std::mem;
use std::os::fd::AsRawFd;
use std::ptr;

use libc::{c_void, iovec, sockaddr_storage, socklen_t};
use socket2::Socket;

use super::cmsg::{self, Arrival, RecvCmsg, SendCmsg};
use super::{cvt, to_std};
use crate::sys::{Control, Received, retry_interrupted};

/// `recvmsg` and `sendmsg` with arrival addresses: each reply goes out from
/// the address its request was sent to.
pub(crate) struct PktinfoIo {
    addr: sockaddr_storage,
    addr_len: socklen_t,
    cmsgs: RecvCmsg,
    arrival: Arrival,
    control: Control,
}

impl PktinfoIo {
    /// Buffers for one datagram.
    pub(crate) fn new(control: Control) -> Option<PktinfoIo> {
        Some(PktinfoIo {
            // SAFETY: a plain C struct, valid when zeroed.
            addr: unsafe { mem::zeroed() },
            addr_len: 0,
            cmsgs: RecvCmsg::EMPTY,
            arrival: Arrival::default(),
            control,
        })
    }

    /// Receives one datagram into `buf` (blocking, with the socket's read
    /// timeout, unless `dont_wait`), with its sender and arrival address;
    /// `None` for a wake-up that carries no sender.
    pub(crate) fn recv<'b>(
        &mut self,
        socket: &Socket,
        buf: &'b mut [u8],
        dont_wait: bool,
    ) -> io::Result<Option<Received<'b>>> {
        let flags = if dont_wait { libc::MSG_DONTWAIT } else { 0 };
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
        hdr.msg_control = self.cmsgs.0.as_mut_ptr().cast::<c_void>();
        hdr.msg_controllen = mem::size_of::<RecvCmsg>() as _;
        let fd = socket.as_raw_fd();
        let n = retry_interrupted(|| {
            // SAFETY: `hdr` points at `self.addr` (its size given), one iovec
            // over `buf`, and `self.control` (its size given), all alive for
            // the call.
            cvt(unsafe { libc::recvmsg(fd, &mut hdr, flags) })
        })?;
        self.addr_len = hdr.msg_namelen;
        let Some(peer) = to_std(&self.addr, self.addr_len) else {
            return Ok(None);
        };
        // `msg_controllen` is `size_t` on glibc, `socklen_t` on musl.
        #[allow(clippy::unnecessary_cast)]
        let control_len = hdr.msg_controllen as usize;
        self.arrival = cmsg::parse(&self.cmsgs, control_len);
        let whole = self.control.keep(&mut self.arrival);
        let len = n.min(buf.len());
        Ok(Some(Received {
            data: buf.get(..len).unwrap_or_default(),
            // Without its arrival address the reply could go out from the
            // wrong one: the datagram is not whole. Other control messages
            // cut short (`MSG_CTRUNC`) do not matter.
            truncated: hdr.msg_flags & libc::MSG_TRUNC != 0 || !whole,
            peer,
            arrival: self.arrival,
        }))
    }

    /// Sends `reply` to the sender of the last datagram received, from the
    /// address that datagram arrived on.
    pub(crate) fn send(&mut self, socket: &Socket, reply: &[u8]) -> io::Result<()> {
        let to = ptr::from_ref(&self.addr).cast::<libc::sockaddr>();
        // SAFETY: `to` points at the sender's address as the kernel wrote
        // it, `addr_len` bytes long, in `self`, which outlives the call.
        unsafe { send_msg(socket, reply, to, self.addr_len, &self.arrival) }
    }
}

/// `sendmsg` of one datagram to `to`, from `from.local` when it is set.
///
/// # Safety
///
/// `to` must point at a socket address of `to_len` bytes that stays valid
/// for the call.
pub(super) unsafe fn send_msg(
    socket: &Socket,
    reply: &[u8],
    to: *const libc::sockaddr,
    to_len: socklen_t,
    from: &Arrival,
) -> io::Result<()> {
    let mut control = SendCmsg::EMPTY;
    let used = cmsg::write(&mut control, from, None);
    if used == 0 {
        // Nothing to say besides the address: `sendto` spares the kernel
        // the message header and its vector (a reply with metadata read
        // but no arrival address to send from).
        // SAFETY: `reply` is only read, for its length; `to` is valid for
        // `to_len` bytes, as the caller vouches.
        return cvt(unsafe {
            libc::sendto(
                socket.as_raw_fd(),
                reply.as_ptr().cast::<c_void>(),
                reply.len(),
                0,
                to,
                to_len,
            )
        })
        .map(drop);
    }
    let mut iov = iovec {
        iov_base: reply.as_ptr().cast_mut().cast::<c_void>(),
        iov_len: reply.len(),
    };
    // SAFETY: a plain C struct, valid when zeroed.
    let mut hdr: libc::msghdr = unsafe { mem::zeroed() };
    hdr.msg_name = to.cast_mut().cast::<c_void>();
    hdr.msg_namelen = to_len;
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    if used > 0 {
        hdr.msg_control = control.0.as_mut_ptr().cast::<c_void>();
        hdr.msg_controllen = used as _;
    }
    // SAFETY: `hdr` points at the address the caller vouches for, one iovec
    // over `reply` (only read), and `used` bytes of `control`, all alive for
    // the call; the kernel does not write through these pointers on send.
    cvt(unsafe { libc::sendmsg(socket.as_raw_fd(), &hdr, 0) }).map(drop)
}
