//! Windows socket settings socket2 lacks, written to the documented Winsock
//! API. Type-checked in CI (`.ci/platforms`); not run here.

use std::io;
use std::mem;
use std::os::windows::io::AsRawSocket;
use std::ptr;

use socket2::Socket;
use windows_sys::Win32::Networking::WinSock::{
    SIO_UDP_CONNRESET, SIO_UDP_NETRESET, SO_EXCLUSIVEADDRUSE, SOCKET, SOCKET_ERROR, SOL_SOCKET,
    WSAIoctl, setsockopt,
};

/// Stops Windows from reporting ICMP "port unreachable" and "TTL expired in
/// transit" messages about earlier replies as errors of the next receive
/// (`WSAECONNRESET`, `WSAENETRESET`): `SIO_UDP_CONNRESET` and
/// `SIO_UDP_NETRESET` set to false, as quinn and Go do for their UDP
/// sockets.
pub(crate) fn quiet_icmp_reports(socket: &Socket) -> io::Result<()> {
    for code in [SIO_UDP_CONNRESET, SIO_UDP_NETRESET] {
        let off: u32 = 0;
        let mut returned: u32 = 0;
        // SAFETY: the socket handle is open for the call; the input buffer
        // is `off`, a live `u32` (a Windows `BOOL`-sized flag) of the size
        // given; there is no output buffer, `returned` is a live `u32`, and
        // the call is synchronous (no `OVERLAPPED`, no completion routine).
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
    }
    Ok(())
}

/// Sets `SO_EXCLUSIVEADDRUSE` before bind, so that no other socket can bind
/// the same address while this one holds it (Windows otherwise lets a
/// socket with `SO_REUSEADDR` take over the port).
pub(crate) fn set_exclusive_address_use(socket: &Socket) -> io::Result<()> {
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
