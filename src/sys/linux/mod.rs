//! Linux: batched receive and reply with `recvmmsg` / `sendmmsg`, control
//! messages, and the socket options socket2 lacks.

use std::io;
use std::mem;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::ptr;

use libc::{c_int, c_void, sockaddr_in, sockaddr_in6, sockaddr_storage, socklen_t};
use socket2::Socket;

mod batch;
mod cmsg;
mod pktinfo_io;
mod replies;

pub(crate) use batch::{Batch, MAX_BATCH};
pub(crate) use pktinfo_io::PktinfoIo;
pub(crate) use replies::Replies;

/// `n` zeroed values of a plain C struct.
fn zeroed<T: Zeroable>(n: usize) -> Box<[T]> {
    // SAFETY: `Zeroable` is implemented only for plain C structs of
    // integers and pointers, for which all zeroes is a valid value (null
    // pointers, zero lengths).
    (0..n).map(|_| unsafe { mem::zeroed() }).collect()
}

/// Plain C structs that are valid when zeroed.
trait Zeroable {}
impl Zeroable for libc::sockaddr_storage {}
impl Zeroable for libc::iovec {}
impl Zeroable for libc::mmsghdr {}

/// The result of a system call that returns a count or -1 with `errno`.
fn cvt(rc: isize) -> io::Result<usize> {
    usize::try_from(rc).map_err(|_| io::Error::last_os_error())
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

/// The socket's count of datagrams the kernel dropped (`sk_drops`, the
/// counter `SO_RXQ_OVFL` reports with each datagram), read on demand with
/// `SO_MEMINFO` (Linux 4.13+); `None` where the kernel does not report it.
pub(crate) fn kernel_drops(socket: &Socket) -> Option<u64> {
    let mut info = [0u32; 16];
    let mut len = mem::size_of_val(&info) as socklen_t;
    // SAFETY: `info` is valid for writes of `len` bytes, and `len` is valid
    // for reads and writes.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MEMINFO,
            info.as_mut_ptr().cast::<c_void>(),
            &mut len,
        )
    };
    let drops = libc::SK_MEMINFO_DROPS as usize;
    let reported = len as usize / mem::size_of::<u32>();
    (rc == 0 && reported > drops).then(|| u64::from(info[drops]))
}

/// Asks the kernel to report the address each datagram arrived on, so
/// replies can go out from it; returns whether it will.
pub(crate) fn enable_pktinfo(socket: &Socket, ipv6: bool) -> io::Result<bool> {
    cmsg::enable_pktinfo(socket, ipv6).map(|()| true)
}
