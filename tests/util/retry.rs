//! Blocking socket calls that retry what is not an answer, for the
//! tests (`util`). (The benches retry only `EINTR`, with no clock read.)
//!
//! A blocking call on a socket with a timeout fails with `Interrupted`
//! (`EINTR`) when a signal lands on its thread, even one installed with
//! `SA_RESTART`: a sibling test's child process ending (`SIGCHLD`) is
//! enough. And a wait can end with the timeout's error before the timeout
//! has run (a spurious wake-up). Neither says anything about the datagram
//! waited for, so these calls wait again, within the socket's own timeout:
//! each returns a timeout error only once that timeout has run out, and
//! takes less than twice it in all.
#![allow(dead_code)] // each test binary and bench uses its own subset

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

/// The most times one call is tried again, whatever the timeout.
const MAX_TRIES: u32 = 1_000;

/// Whether `err` is what a socket's timeout expiring looks like: Unix
/// reports `WouldBlock` (`EAGAIN`), Windows `TimedOut`.
pub fn is_timeout(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Runs `call`, a blocking socket call whose socket has `timeout`, again
/// after `Interrupted` and after a timeout error that came early, while
/// `timeout` has not run out since the first try (for a socket without a
/// timeout, after `Interrupted` only).
pub fn retrying<T>(
    timeout: Option<Duration>,
    mut call: impl FnMut() -> io::Result<T>,
) -> io::Result<T> {
    let start = Instant::now();
    let mut tries = 0;
    loop {
        let result = call();
        tries += 1;
        let within = match timeout {
            Some(timeout) => start.elapsed() < timeout,
            None => true,
        };
        match result {
            Err(err) if tries < MAX_TRIES && within && err.kind() == io::ErrorKind::Interrupted => {
            }
            Err(err) if tries < MAX_TRIES && timeout.is_some() && within && is_timeout(&err) => {}
            other => return other,
        }
    }
}

/// [`UdpSocket::recv`], retrying as [`retrying`] says.
pub fn recv(socket: &UdpSocket, buf: &mut [u8]) -> io::Result<usize> {
    retrying(socket.read_timeout()?, || socket.recv(buf))
}

/// [`UdpSocket::recv_from`], retrying as [`retrying`] says.
pub fn recv_from(socket: &UdpSocket, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
    retrying(socket.read_timeout()?, || socket.recv_from(buf))
}

/// [`UdpSocket::send`], retrying as [`retrying`] says.
pub fn send(socket: &UdpSocket, buf: &[u8]) -> io::Result<usize> {
    retrying(socket.write_timeout()?, || socket.send(buf))
}

/// [`UdpSocket::send_to`], retrying as [`retrying`] says.
pub fn send_to(socket: &UdpSocket, buf: &[u8], to: SocketAddr) -> io::Result<usize> {
    retrying(socket.write_timeout()?, || socket.send_to(buf, to))
}
