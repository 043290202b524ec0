//! Platform code. This is the only module of the crate allowed `unsafe`;
//! every block says why it is sound in a `// SAFETY:` comment.
#![allow(unsafe_code)]

use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use socket2::{MaybeUninitSlice, Socket};

// The batched fast path: `recvmmsg`/`sendmmsg` on Linux; elsewhere a `Batch`
// that can never be made, so the portable loop runs.
#[cfg(target_os = "linux")]
#[path = "linux/mod.rs"]
mod imp;
#[cfg(not(target_os = "linux"))]
#[path = "fallback.rs"]
mod imp;

pub(crate) use imp::{Batch, MAX_BATCH, Single, enable_pktinfo, kernel_drops};

// Keeps the fallback compiling where it is not the one in use.
#[cfg(all(test, target_os = "linux"))]
#[path = "fallback.rs"]
#[allow(dead_code)]
mod fallback_check;

/// Bytes reserved up front in each reply buffer, so that the first replies
/// through a buffer (and every reply up to this size) allocate nothing.
pub(crate) const REPLY_RESERVE: usize = 512;

/// One datagram of a batch, as the worker sees it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Received<'a> {
    pub(crate) data: &'a [u8],
    /// The datagram was larger than the buffer (`MSG_TRUNC`).
    pub(crate) truncated: bool,
    /// The sender; `None` for a wake-up that carries no datagram.
    pub(crate) peer: Option<SocketAddr>,
    /// The address the datagram was sent to, where the socket reports it.
    pub(crate) local: Option<IpAddr>,
}

impl Received<'_> {
    /// No datagram.
    pub(crate) const NONE: Received<'static> = Received {
        data: &[],
        truncated: false,
        peer: None,
        local: None,
    };
}

/// Views an initialised buffer as the possibly-uninitialised kind that
/// socket2's vectored receive calls take.
pub(crate) fn recv_slice(buf: &mut [u8]) -> MaybeUninitSlice<'_> {
    MaybeUninitSlice::new(as_uninit(buf))
}

/// Views an initialised buffer as the possibly-uninitialised kind that
/// socket2's receive calls take.
fn as_uninit(buf: &mut [u8]) -> &mut [MaybeUninit<u8>] {
    let ptr: *mut [u8] = buf;
    // SAFETY: `MaybeUninit<u8>` has the size, alignment and validity of `u8`
    // plus more, and the pointer comes from a live `&mut [u8]` whose borrow
    // the returned slice keeps. socket2 documents (`Socket::recv`, "Safety")
    // that its receive calls only write initialised bytes, so the buffer is
    // still a valid `[u8]` when the borrow ends.
    unsafe { &mut *(ptr as *mut [MaybeUninit<u8>]) }
}

/// Receives one datagram from a connected socket without blocking; fails
/// with `WouldBlock` when none is queued.
pub(crate) fn recv_nonblocking(socket: &Socket, buf: &mut [u8]) -> io::Result<usize> {
    #[cfg(unix)]
    return socket.recv_with_flags(as_uninit(buf), libc::MSG_DONTWAIT);
    #[cfg(not(unix))]
    {
        socket.set_nonblocking(true)?;
        let received = socket.recv(as_uninit(buf));
        socket.set_nonblocking(false)?;
        received
    }
}

/// How long a blocked receive waits before it checks whether the server is
/// shutting down, where a shutdown cannot wake it directly.
///
/// Linux wakes a receiver blocked on an unconnected UDP socket when the
/// socket is shut down for reading, so there the server sleeps until a
/// datagram or the shutdown arrives and never wakes while idle. Elsewhere
/// the socket's read timeout bounds how long a shutdown waits.
pub(crate) const WAKE_INTERVAL: Option<Duration> =
    if cfg!(any(target_os = "linux", target_os = "android")) {
        None
    } else {
        Some(Duration::from_millis(50))
    };
