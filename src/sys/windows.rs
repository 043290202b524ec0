//! Windows socket settings socket2 lacks, written to the documented Winsock
//! API. Run under Wine in CI (`.ci/platforms`).

use std::io;
use std::mem;
use std::os::windows::io::AsRawSocket;
use std::ptr;

use socket2::Socket;
use windows_sys::Win32::Networking::WinSock::{
    POLLWRNORM, SIO_UDP_CONNRESET, SIO_UDP_NETRESET, SO_EXCLUSIVEADDRUSE, SOCKET, SOCKET_ERROR,
    SOL_SOCKET, WSAENETRESET, WSAIoctl, WSAPOLLFD, WSAPoll, setsockopt,
};

use super::settings::Setting;

/// The error a receive fails with for an ICMP "TTL expired in transit"
/// about an earlier send, while `SIO_UDP_NETRESET` is on; std has no
/// `ErrorKind` for it.
pub(crate) const NET_RESET: i32 = WSAENETRESET;

/// Makes one setting on `socket`, before bind.
pub(crate) fn set(socket: &Socket, setting: Setting) -> io::Result<()> {
    match setting {
        Setting::UdpConnReset => ioctl_off(socket, SIO_UDP_CONNRESET),
        Setting::UdpNetReset => ioctl_off(socket, SIO_UDP_NETRESET),
        Setting::ExclusiveAddrUse => set_exclusive_address_use(socket),
    }
}

/// Sets a `BOOL` socket ioctl (`SIO_UDP_CONNRESET`, `SIO_UDP_NETRESET`) to
/// false: Windows then stops reporting ICMP "port unreachable" and "TTL
/// expired in transit" messages about earlier replies as errors of the next
/// receive (`WSAECONNRESET`, `WSAENETRESET`), as quinn and Go ask for their
/// UDP sockets.
fn ioctl_off(socket: &Socket, code: u32) -> io::Result<()> {
    let off: u32 = 0;
    let mut returned: u32 = 0;
    // SAFETY: the socket handle is open for the call; the input buffer is
    // `off`, a live `u32` (a Windows `BOOL`-sized flag) of the size given;
    // there is no output buffer, `returned` is a live `u32`, and the call is
    // synchronous (no `OVERLAPPED`, no completion routine).
    let rc = unsafe {
        WSAIoctl(
            socket.as_raw_socket() as SOCKET,
            code,
            ptr::from_ref(&off).cast(),
            mem::size_of::<u32>() as u32,
            ptr::null_mut(),
            0,
            &mut returned,
            ptr::null_mut(),
            None,
        )
    };
    if rc == SOCKET_ERROR {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets `SO_EXCLUSIVEADDRUSE` before bind, so that no other socket can bind
/// the same address while this one holds it (Windows otherwise lets a
/// socket with `SO_REUSEADDR` take over the port).
fn set_exclusive_address_use(socket: &Socket) -> io::Result<()> {
    let on: i32 = 1;
    // SAFETY: the socket handle is open for the call, and `on` is a live
    // `i32` of the length given.
    let rc = unsafe {
        setsockopt(
            socket.as_raw_socket() as SOCKET,
            SOL_SOCKET,
            SO_EXCLUSIVEADDRUSE,
            ptr::from_ref(&on).cast(),
            mem::size_of::<i32>() as i32,
        )
    };
    if rc == SOCKET_ERROR {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Waits until `socket` can take a datagram (`WSAPoll` for `POLLWRNORM`),
/// or an error is pending on it, for up to `limit` (at least 1 ms, the
/// unit `WSAPoll` counts in). A wait that ends with neither is not an
/// error: the caller tries its send again.
pub(crate) fn wait_writable(socket: &Socket, limit: std::time::Duration) -> io::Result<()> {
    let mut poll = WSAPOLLFD {
        fd: socket.as_raw_socket() as SOCKET,
        events: POLLWRNORM,
        revents: 0,
    };
    let millis = i32::try_from(limit.as_millis()).unwrap_or(i32::MAX).max(1);
    // SAFETY: `poll` is one live, initialised `WSAPOLLFD` naming a socket
    // handle that is open for the call (borrowed from `socket`), and the
    // count given is 1; `WSAPoll` only writes its `revents` field, and
    // returns before this frame ends.
    let rc = unsafe { WSAPoll(&mut poll, 1, millis) };
    if rc == SOCKET_ERROR {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
