//! Linux: batched receive and reply with `recvmmsg` / `sendmmsg`, control
//! messages, and the socket options socket2 lacks.

use std::io;
use std::marker::PhantomData;
use std::mem::{self, MaybeUninit};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::ptr;
use std::slice;

use libc::{c_int, c_void, sockaddr_in, sockaddr_in6, sockaddr_storage, socklen_t};
use socket2::Socket;

mod batch;
mod cmsg;
mod pktinfo_io;
mod replies;
#[cfg(feature = "xdp")]
pub(crate) mod xdp;

pub(crate) use batch::{Batch, MAX_BATCH};
pub(crate) use pktinfo_io::PktinfoIo;
pub(crate) use replies::Replies;

// Batches and replies move between threads (an async worker task can move
// between a runtime's threads): they are `Send` by their fields alone, as
// they hold no raw pointer between calls.
const _: fn() = || {
    fn is_send<T: Send>() {}
    is_send::<Batch>();
    is_send::<Replies>();
};

/// `n` zeroed values of a plain C struct.
fn zeroed<T: Zeroable>(n: usize) -> Box<[T]> {
    // SAFETY: `T: Zeroable` promises that all zeroes is a valid `T`.
    (0..n).map(|_| unsafe { mem::zeroed() }).collect()
}

/// Plain C structs that are valid when zeroed.
///
/// # Safety
///
/// Implementors promise that a value whose bytes are all zero is a valid
/// value of the type (integers are 0, pointers null, and the type has no
/// references, `NonNull`, enums or other fields where zero is invalid).
unsafe trait Zeroable {}
// SAFETY: integers and a byte array only (the family, padding and an
// alignment field).
unsafe impl Zeroable for libc::sockaddr_storage {}
// SAFETY: a raw pointer (null when zero) and a length.
unsafe impl Zeroable for libc::iovec {}
// SAFETY: a `msghdr` (raw pointers, null when zero, and integer lengths and
// flags) and an integer length.
unsafe impl Zeroable for libc::mmsghdr {}

/// Room for `len` values of a plain C struct `T`, zeroed at first, kept as
/// plain integers: holding it holds no raw pointer, so it is `Send` and
/// `Sync` like any integer array, whatever `T` contains. It is seen as
/// `&mut [T]` only through [`Scratch::get`], for as long as that borrow
/// lasts; whoever fills it with pointers rebuilds them from fresh borrows
/// before each use, so none outlives the call that made it.
struct Scratch<T> {
    /// `MaybeUninit`, because writing a `T` may leave its padding bytes
    /// uninitialised; the words are never read as integers.
    words: Box<[MaybeUninit<u64>]>,
    len: usize,
    _holds: PhantomData<fn() -> T>,
}

impl<T: Zeroable> Scratch<T> {
    /// Room for `len` values, all zero.
    fn new(len: usize) -> Scratch<T> {
        const {
            assert!(mem::size_of::<T>() > 0);
            assert!(mem::align_of::<T>() <= mem::align_of::<u64>());
        }
        let bytes = len.saturating_mul(mem::size_of::<T>());
        Scratch {
            words: vec![MaybeUninit::new(0); bytes.div_ceil(mem::size_of::<u64>())]
                .into_boxed_slice(),
            len,
            _holds: PhantomData,
        }
    }

    /// The values, for the duration of the borrow.
    fn get(&mut self) -> &mut [T] {
        // SAFETY: `words` spans at least `len * size_of::<T>()` bytes,
        // aligned for `T` (checked in `new`), and is borrowed mutably for
        // the lifetime of the result, so nothing else reads or writes it
        // meanwhile. Its bytes are either zero (valid for `T: Zeroable`) or
        // were written as whole `T` values through an earlier such borrow
        // (padding bytes may then be uninitialised, which `MaybeUninit`
        // words allow and a `T` does not mind), so every element is a valid
        // `T`.
        unsafe { slice::from_raw_parts_mut(self.words.as_mut_ptr().cast::<T>(), self.len) }
    }
}

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

/// Whether `socket` was shut down for reading (`shutdown(SHUT_RD)`): a
/// receive on it returns at once with nothing, so a server loop on it would
/// spin. Linux reports it as `POLLRDHUP`, asked for without waiting and
/// without taking anything from the queue. (A non-blocking receive cannot
/// tell: it fails with `EAGAIN` before it looks at the shutdown.)
pub(crate) fn is_shut_for_reading(socket: &Socket) -> bool {
    let mut fds = [libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    }];
    // SAFETY: `fds` is a live array of one `pollfd`, its length given as
    // 1; a timeout of 0 returns at once.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) };
    rc == 1 && fds[0].revents & libc::POLLRDHUP != 0
}

/// Asks the kernel to report the address each datagram arrived on, so
/// replies can go out from it; returns whether it will.
pub(crate) fn enable_pktinfo(socket: &Socket, ipv6: bool) -> io::Result<bool> {
    cmsg::enable_pktinfo(socket, ipv6).map(|()| true)
}

/// Turns receive offload (`UDP_GRO`) off, so that each datagram is
/// received as one.
pub(crate) fn disable_gro(socket: &Socket) -> io::Result<()> {
    cmsg::disable_gro(socket)
}

/// Asks the kernel to report each datagram's TOS or traffic class, TTL or
/// hop limit, and arrival interface (and its arrival address).
pub(crate) fn set_metadata(socket: &Socket, ipv6: bool, on: bool) -> io::Result<()> {
    cmsg::set_metadata(socket, ipv6, on)
}

/// One entry taken from a socket's error queue (see [`enable_recverr`]).
#[derive(Debug)]
pub(crate) struct QueuedError {
    /// Where the datagram it concerns was sent.
    pub(crate) dest: Option<SocketAddr>,
    /// How many bytes of that datagram's payload came back with it.
    pub(crate) len: usize,
    /// It is an ICMP "port unreachable".
    pub(crate) refused: bool,
}

/// Asks the kernel to queue ICMP errors with the destination they concern
/// (`IP_RECVERR`, `IPV6_RECVERR`); returns whether it will.
pub(crate) fn enable_recverr(socket: &Socket, ipv6: bool) -> io::Result<bool> {
    cmsg::enable_recverr(socket, ipv6).map(|()| true)
}

/// Takes one entry from the socket's error queue without waiting, with the
/// start of the datagram it concerns in `buf`; `WouldBlock` when the queue
/// is empty.
pub(crate) fn recv_error(socket: &Socket, buf: &mut [u8]) -> io::Result<QueuedError> {
    // SAFETY: a plain C struct, valid when zeroed.
    let mut name: sockaddr_storage = unsafe { mem::zeroed() };
    let mut control = cmsg::RecvCmsg::EMPTY;
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast::<c_void>(),
        iov_len: buf.len(),
    };
    // SAFETY: a plain C struct, valid when zeroed.
    let mut hdr: libc::msghdr = unsafe { mem::zeroed() };
    hdr.msg_name = ptr::from_mut(&mut name).cast::<c_void>();
    hdr.msg_namelen = mem::size_of::<sockaddr_storage>() as socklen_t;
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    hdr.msg_control = control.0.as_mut_ptr().cast::<c_void>();
    hdr.msg_controllen = mem::size_of::<cmsg::RecvCmsg>() as _;
    let fd = socket.as_raw_fd();
    let n = crate::sys::retry_interrupted(|| {
        // SAFETY: `hdr` points at `name` (its size given), one iovec over
        // `buf`, and `control` (its size given), all alive for the call.
        cvt(unsafe { libc::recvmsg(fd, &mut hdr, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) })
    })?;
    // `msg_controllen` is `size_t` on glibc, `socklen_t` on musl.
    #[allow(clippy::unnecessary_cast)]
    let control_len = hdr.msg_controllen as usize;
    Ok(QueuedError {
        dest: to_std(&name, hdr.msg_namelen),
        len: n.min(buf.len()),
        refused: cmsg::is_port_unreachable(&control, control_len),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_starts_zeroed_and_keeps_what_is_written() {
        // `mmsghdr` has padding on 64-bit glibc and a size that is not a
        // multiple of 8 bytes on some targets; 3 and 1024 values.
        for len in [3, MAX_BATCH] {
            let mut scratch = Scratch::<libc::mmsghdr>::new(len);
            let hdrs = scratch.get();
            assert_eq!(hdrs.len(), len);
            assert!(
                hdrs.iter()
                    .all(|h| h.msg_len == 0 && h.msg_hdr.msg_name.is_null())
            );
            hdrs[len - 1].msg_len = 7;
            hdrs[len - 1].msg_hdr.msg_namelen = 9;
            let last = &scratch.get()[len - 1];
            assert_eq!((last.msg_len, last.msg_hdr.msg_namelen), (7, 9));
        }
        assert!(Scratch::<libc::iovec>::new(0).get().is_empty());
    }
}
