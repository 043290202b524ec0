//! Platforms without batched socket calls: no `Batch` can be made, and the
//! worker runs the portable loop.

use std::io;

use socket2::Socket;

use super::Received;

/// The largest batch size the builder accepts (batches are not used here).
pub(crate) const MAX_BATCH: usize = 1024;

/// Uninhabited: there is no batched path on this platform.
pub(crate) enum Batch {}

impl Batch {
    /// Always `None`: the portable loop serves instead.
    pub(crate) fn new(_: &Socket, _: usize, _: usize, _: bool, _: bool) -> Option<Batch> {
        None
    }

    pub(crate) fn recv(&mut self, _socket: &Socket) -> io::Result<usize> {
        match *self {}
    }

    pub(crate) fn slot(&mut self, _i: usize) -> (Received<'_>, &mut Vec<u8>) {
        match *self {}
    }

    pub(crate) fn queue_reply(&mut self, _i: usize) {
        match *self {}
    }

    pub(crate) fn send(&mut self, _socket: &Socket) -> (u64, u64) {
        match *self {}
    }
}

/// The kernel's drop count for the socket: not reported on this platform.
pub(crate) fn kernel_drops(_socket: &Socket) -> Option<u64> {
    None
}

/// Arrival addresses are not read on this platform: replies from a
/// wildcard-bound server go out from the address the kernel picks.
pub(crate) fn enable_pktinfo(_socket: &Socket, _ipv6: bool) -> io::Result<bool> {
    Ok(false)
}

/// Uninhabited: arrival addresses are not read on this platform.
pub(crate) enum Single {}

impl Single {
    /// Always `None`.
    pub(crate) fn new() -> Option<Single> {
        None
    }

    pub(crate) fn recv<'b>(
        &mut self,
        _socket: &Socket,
        _buf: &'b mut [u8],
    ) -> io::Result<Received<'b>> {
        match *self {}
    }

    pub(crate) fn send(&mut self, _socket: &Socket, _reply: &[u8]) -> io::Result<usize> {
        match *self {}
    }
}
