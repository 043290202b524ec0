//! Platform code. This is the only module of the crate allowed `unsafe`;
//! every block says why it is sound in a `// SAFETY:` comment.
//!
//! The rest of the crate sees one interface: [`Batch`] (batched receive and
//! reply, where the platform has it), [`Portable`] (one datagram at a time,
//! everywhere), and a few socket options socket2 lacks. Neither ever hands
//! out a wake-up without a sender: every [`Received`] is a datagram.
#![allow(unsafe_code)]

use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use socket2::{MaybeUninitSlice, SockAddr, Socket};

// The batched fast path: `recvmmsg`/`sendmmsg` on Linux; elsewhere a `Batch`
// that can never be made, so the portable loop runs.
#[cfg(target_os = "linux")]
#[path = "linux/mod.rs"]
mod imp;
#[cfg(not(target_os = "linux"))]
#[path = "fallback.rs"]
mod imp;

pub(crate) use imp::{
    Batch, MAX_BATCH, QueuedError, Replies, disable_gro, enable_pktinfo, enable_recverr,
    is_shut_for_reading, kernel_drops, recv_error, set_metadata,
};

#[cfg(all(feature = "xdp", target_os = "linux"))]
pub(crate) use imp::xdp;
#[cfg(unix)]
mod fds;
mod settings;
mod source;
#[cfg(windows)]
mod windows;

#[cfg(unix)]
pub(crate) use fds::{
    MAX_FDS_PER_MESSAGE, check_udp_socket, recv_with_fds, send_with_fds, set_inheritable,
    take_inherited,
};
pub(crate) use settings::{Prepared, is_net_reset, prepare_adopted_socket, prepare_server_socket};
#[cfg(test)]
pub(crate) use settings::{Setting, tests::refuse};
pub(crate) use source::Source;

/// What a [`Batch`] is made for: plain values, so that this module needs
/// nothing from the rest of the crate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BatchSpec {
    /// Datagrams per receive (taken as at least 1 and at most
    /// [`MAX_BATCH`]).
    pub(crate) size: usize,
    /// The largest datagram received whole, in bytes.
    pub(crate) max_datagram: usize,
    /// What the receives read besides the datagrams.
    pub(crate) control: Control,
    /// Replies to one peer are coalesced with segmentation offload, where
    /// the kernel has it.
    pub(crate) gso: bool,
}

// Keeps the fallback compiling where it is not the one in use.
#[cfg(all(test, target_os = "linux"))]
#[path = "fallback.rs"]
#[allow(dead_code)]
mod fallback_check;

/// Bytes reserved up front in each reply buffer, so that the first replies
/// through a buffer (and every reply up to this size) allocate nothing.
pub(crate) const REPLY_RESERVE: usize = 512;

/// The largest reply buffer kept between datagrams. A handler that once
/// wrote a larger reply (which UDP cannot carry anyway) gets a fresh buffer
/// of [`REPLY_RESERVE`] bytes for the next datagram, so one huge reply does
/// not pin its memory for the server's life.
pub(crate) const MAX_KEPT_REPLY: usize = 64 * 1024;

/// Gives back an oversized reply buffer (see [`MAX_KEPT_REPLY`]).
pub(crate) fn trim_reply(reply: &mut Vec<u8>) {
    if reply.capacity() > MAX_KEPT_REPLY {
        *reply = Vec::with_capacity(REPLY_RESERVE);
    }
}

/// What a receive reads besides the datagram: the control messages the
/// socket was asked for (`enable_pktinfo`, `set_metadata`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum Control {
    /// Nothing: plain receives.
    #[default]
    Off,
    /// The control messages, into [`Arrival`]; replies go out with none
    /// (from the address the socket is bound to), and `Arrival::local` is
    /// left `None`.
    Read,
    /// The control messages, and replies go out from the address each
    /// request arrived on (a wildcard-bound socket); a datagram whose
    /// arrival address did not come is not whole.
    ReplyFromArrival,
}

impl Control {
    /// Whether receives read control messages.
    pub(crate) fn reads(self) -> bool {
        self != Control::Off
    }

    /// Keeps of `arrival`, parsed from a datagram's control messages, what
    /// this mode uses; returns whether the datagram is whole by it.
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))] // read on Linux only
    pub(crate) fn keep(self, arrival: &mut Arrival) -> bool {
        match self {
            Control::ReplyFromArrival => arrival.local.is_some(),
            Control::Read | Control::Off => {
                arrival.local = None;
                true
            }
        }
    }
}

/// Where a datagram arrived: the local address it was sent to and the
/// interface it came in on, where the socket reports them. A reply goes out
/// from there.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Arrival {
    pub(crate) local: Option<IpAddr>,
    pub(crate) ifindex: u32,
    /// The TOS byte (IPv4) or traffic class (IPv6), where the socket was
    /// asked for it ([`set_metadata`]).
    pub(crate) tos: Option<u8>,
    /// The TTL (IPv4) or hop limit (IPv6), likewise.
    pub(crate) ttl: Option<u8>,
}

/// One datagram received, as the worker sees it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Received<'a> {
    pub(crate) data: &'a [u8],
    /// The datagram was larger than the buffer (`MSG_TRUNC`), or its arrival
    /// address was needed and did not come.
    pub(crate) truncated: bool,
    /// The sender.
    pub(crate) peer: SocketAddr,
    /// Where it arrived (`local` is `None` where the socket does not say).
    pub(crate) arrival: Arrival,
}

/// Runs `f` again while it fails with `EINTR` (a signal arrived).
pub(crate) fn retry_interrupted<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            result => return result,
        }
    }
}

/// How long, in all, a send on a socket meant to block waits for it to
/// become writable, where another thread switched it to non-blocking mode
/// for a moment (outside Unix; see [`send_blocking`]).
#[cfg_attr(not(windows), allow(dead_code))]
const SEND_WAIT_LIMIT: Duration = Duration::from_secs(1);

/// Makes one send (`f`) on a socket that is meant to block, again after an
/// interruption.
///
/// Outside Unix a receive that must not wait cannot say so per call: it
/// switches the whole socket to non-blocking mode for a moment (see
/// [`recv_dont_wait`]). A send that another thread makes in that moment (a
/// handler pool's reply, a multiplexing client's request) fails with
/// `WouldBlock` where it would have waited. Such a send waits until the
/// socket is writable and is made again, as the blocking send would have,
/// for up to [`SEND_WAIT_LIMIT`] in all. On Unix the receives say
/// `MSG_DONTWAIT` and the socket's mode never changes.
pub(crate) fn send_blocking<T>(socket: &Socket, f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    #[cfg(windows)]
    return retry_blocked_send(
        SEND_WAIT_LIMIT,
        |left| windows::wait_writable(socket, left),
        f,
    );
    #[cfg(not(windows))]
    {
        let _ = socket;
        retry_interrupted(f)
    }
}

/// Runs `f` again after an interruption, and after `WouldBlock` once `wait`
/// (given the time left) returns, until `limit` has passed since the first
/// try; then `f`'s last error is returned.
#[cfg_attr(not(windows), allow(dead_code))]
fn retry_blocked_send<T>(
    limit: Duration,
    mut wait: impl FnMut(Duration) -> io::Result<()>,
    mut f: impl FnMut() -> io::Result<T>,
) -> io::Result<T> {
    let started = std::time::Instant::now();
    loop {
        match retry_interrupted(&mut f) {
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                match limit.checked_sub(started.elapsed()) {
                    Some(left) if !left.is_zero() => wait(left)?,
                    _ => return Err(err),
                }
            }
            result => return result,
        }
    }
}

/// The portable receive and reply: one `recvmsg` and one `sendto` (or
/// `sendmsg`) per datagram. On a wildcard-bound Linux socket it reads each
/// datagram's arrival address and replies from it.
pub(crate) struct Portable {
    /// Arrival addresses are read and used (`Some` only where the platform
    /// can, for a socket that asked).
    control: Option<imp::PktinfoIo>,
    /// The sender of the last datagram, as the kernel gave it.
    peer: Option<SockAddr>,
    /// Where receives cannot be told not to wait, the socket's mode is
    /// switched instead: whether it is non-blocking now.
    #[cfg_attr(unix, allow(dead_code))]
    nonblocking: bool,
}

impl Portable {
    /// Receives with control messages as `control` says, where the
    /// platform supports them.
    pub(crate) fn new(control: Control) -> Portable {
        Portable {
            control: if control.reads() {
                imp::PktinfoIo::new(control)
            } else {
                None
            },
            peer: None,
            nonblocking: false,
        }
    }

    /// Waits for one datagram (up to the socket's read timeout) and receives
    /// it into `buf`; with `dont_wait`, fails with `WouldBlock` at once when
    /// none is queued. `Ok(None)`: the wait ended without a datagram (a
    /// shutdown wake-up, or a sender that is not an IP address).
    pub(crate) fn recv<'b>(
        &mut self,
        socket: &Socket,
        buf: &'b mut [u8],
        dont_wait: bool,
    ) -> io::Result<Option<Received<'b>>> {
        if let Some(io) = &mut self.control {
            return io.recv(socket, buf, dont_wait);
        }
        #[cfg(unix)]
        let flags = if dont_wait { libc::MSG_DONTWAIT } else { 0 };
        #[cfg(not(unix))]
        let flags = {
            // One mode switch per change, not per receive.
            if self.nonblocking != dont_wait {
                socket.set_nonblocking(dont_wait)?;
                self.nonblocking = dont_wait;
            }
            0
        };
        let (len, flags, addr) = retry_interrupted(|| {
            socket.recv_from_vectored_with_flags(&mut [recv_slice(buf)], flags)
        })?;
        let Some(peer) = addr.as_socket() else {
            return Ok(None);
        };
        self.peer = Some(addr);
        Ok(Some(Received {
            data: buf.get(..len).unwrap_or_default(),
            truncated: flags.is_truncated(),
            peer,
            arrival: Arrival::default(),
        }))
    }

    /// Sends `reply` to the sender of the last datagram received (from the
    /// address it arrived on, where that is read).
    pub(crate) fn send(&mut self, socket: &Socket, reply: &[u8]) -> io::Result<()> {
        if let Some(io) = &mut self.control {
            return send_blocking(socket, || io.send(socket, reply));
        }
        match &self.peer {
            Some(peer) => send_blocking(socket, || socket.send_to(reply, peer)).map(drop),
            None => Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "no datagram to reply to",
            )),
        }
    }
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

/// Receives one datagram from a connected socket without blocking, and
/// whether it was larger than `buf`; fails with `WouldBlock` when none is
/// queued. (Outside Unix, where a receive cannot be told not to wait, the
/// socket is switched to non-blocking mode and back around it.)
pub(crate) fn recv_dont_wait(socket: &Socket, buf: &mut [u8]) -> io::Result<(usize, bool)> {
    #[cfg(unix)]
    let received = socket.recv_vectored_with_flags(&mut [recv_slice(buf)], libc::MSG_DONTWAIT);
    #[cfg(not(unix))]
    let received = {
        socket.set_nonblocking(true)?;
        let received = socket.recv_vectored(&mut [recv_slice(buf)]);
        socket.set_nonblocking(false)?;
        received
    };
    received.map(|(len, flags)| (len, flags.is_truncated()))
}

/// Receives one datagram from a connected non-blocking socket into `buf`,
/// which is cleared and given room for `capacity` bytes first, without
/// zeroing it; returns the datagram's length and whether it was larger
/// than `capacity`. Fails with `WouldBlock` when none is queued.
#[cfg_attr(not(feature = "tokio"), allow(dead_code))]
pub(crate) fn recv_to_vec(
    socket: &Socket,
    buf: &mut Vec<u8>,
    capacity: usize,
) -> io::Result<(usize, bool)> {
    buf.clear();
    buf.reserve(capacity);
    let spare = buf.spare_capacity_mut();
    let room = spare.len().min(capacity);
    let (len, flags) = socket.recv_vectored(&mut [MaybeUninitSlice::new(&mut spare[..room])])?;
    let len = len.min(room);
    // SAFETY: the kernel wrote `len` bytes (at most the `room` it was given)
    // at the start of the spare capacity, so the first `len` bytes of `buf`
    // are initialised, and `len` is within its capacity.
    unsafe { buf.set_len(len) };
    Ok((len, flags.is_truncated()))
}

/// Takes ownership of descriptor `fd`, passed to this process by a service
/// manager (socket activation).
///
/// The caller makes sure `fd` is one of the descriptors passed to this
/// process (`LISTEN_FDS` from 3 on, with `LISTEN_PID` this process; the
/// reader of those checked each is open) and that it is taken only once
/// (`systemd::Activated::take` runs once per process).
#[cfg(all(feature = "systemd", unix))]
pub(crate) fn inherited_fd(fd: std::os::fd::RawFd) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: per the caller's contract, `fd` is an open descriptor passed
    // to this process for it to own, and nothing else owns it or will take
    // it again, so it may be closed when dropped.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
}

/// How long a blocked receive on a socket made elsewhere waits before it
/// checks whether the server is stopping, on every system: such a socket
/// is never shut down to wake its workers (its maker, or a service manager
/// that passed it, holds it too and may serve it again).
pub(crate) const ADOPTED_WAKE_INTERVAL: Duration = Duration::from_millis(50);

/// Sets `SO_BUSY_POLL` to `duration` (whole microseconds): the kernel polls
/// the device queue for that long on a blocking receive that finds nothing.
pub(crate) fn set_busy_poll(socket: &Socket, duration: Duration) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    return socket.set_busy_poll(u32::try_from(duration.as_micros()).unwrap_or(u32::MAX));
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (socket, duration);
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "SO_BUSY_POLL is Linux only",
        ))
    }
}

/// Receives one datagram with its sender (waiting up to the socket's read
/// timeout, or with `dont_wait` not at all: `WouldBlock` when none is
/// queued), and whether it was larger than `buf`. (Outside Unix a receive
/// that must not wait switches the socket to non-blocking mode and back.)
pub(crate) fn recv_from(
    socket: &Socket,
    buf: &mut [u8],
    dont_wait: bool,
) -> io::Result<(usize, bool, SocketAddr)> {
    let mut bufs = [recv_slice(buf)];
    let received = if dont_wait {
        #[cfg(unix)]
        let received = socket.recv_from_vectored_with_flags(&mut bufs, libc::MSG_DONTWAIT);
        #[cfg(not(unix))]
        let received = {
            socket.set_nonblocking(true)?;
            let received = socket.recv_from_vectored(&mut bufs);
            socket.set_nonblocking(false)?;
            received
        };
        received
    } else {
        socket.recv_from_vectored(&mut bufs)
    };
    let (len, flags, from) = received?;
    let from = from.as_socket().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "a datagram without an IP sender",
        )
    })?;
    Ok((len, flags.is_truncated(), from))
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

/// The shortest socket read timeout this platform keeps. Linux and the
/// BSDs take microseconds. Windows takes whole milliseconds, and socket2
/// truncates a shorter timeout to 0, which means "wait forever": a wait
/// under 1 ms there must ask for 1 ms.
pub(crate) const MIN_READ_TIMEOUT: Duration = if cfg!(windows) {
    Duration::from_millis(1)
} else {
    Duration::from_micros(1)
};

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

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::io;
    use std::time::Duration;

    use super::retry_blocked_send;

    fn blocked() -> io::Error {
        io::ErrorKind::WouldBlock.into()
    }

    #[test]
    fn a_blocked_send_waits_and_is_made_again() {
        let (tries, waits) = (Cell::new(0), Cell::new(0));
        let sent = retry_blocked_send(
            Duration::from_secs(3600),
            |left| {
                assert!(left > Duration::ZERO && left <= Duration::from_secs(3600));
                waits.set(waits.get() + 1);
                Ok(())
            },
            || {
                tries.set(tries.get() + 1);
                match tries.get() {
                    1 => Err(io::ErrorKind::Interrupted.into()),
                    2..=4 => Err(blocked()),
                    _ => Ok(7),
                }
            },
        );
        assert_eq!(sent.expect("sent"), 7);
        assert_eq!((tries.get(), waits.get()), (5, 3));
    }

    #[test]
    fn a_send_still_blocked_at_the_limit_fails_with_its_own_error() {
        for limit in [Duration::ZERO, Duration::from_nanos(1)] {
            let tries = Cell::new(0u64);
            let sent: io::Result<()> = retry_blocked_send(
                limit,
                |_| Ok(()),
                || {
                    tries.set(tries.get() + 1);
                    Err(blocked())
                },
            );
            let err = sent.expect_err("still blocked");
            assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
            assert!(
                tries.get() >= 1 && tries.get() < 1_000_000,
                "{}",
                tries.get()
            );
        }
    }

    #[test]
    fn a_failed_wait_and_other_errors_end_the_send() {
        let sent: io::Result<()> = retry_blocked_send(
            Duration::from_secs(3600),
            |_| Err(io::ErrorKind::NotConnected.into()),
            || Err(blocked()),
        );
        assert_eq!(
            sent.expect_err("wait failed").kind(),
            io::ErrorKind::NotConnected
        );
        let tries = Cell::new(0);
        let sent: io::Result<()> = retry_blocked_send(
            Duration::from_secs(3600),
            |_| panic!("no wait after an error other than WouldBlock"),
            || {
                tries.set(tries.get() + 1);
                Err(io::ErrorKind::ConnectionRefused.into())
            },
        );
        assert_eq!(
            sent.expect_err("refused").kind(),
            io::ErrorKind::ConnectionRefused
        );
        assert_eq!(tries.get(), 1);
    }
}
