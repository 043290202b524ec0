//! Platforms without batched socket calls: no `Batch` can be made, and the
//! worker runs the portable loop; arrival addresses are not read.

use std::io;

use socket2::Socket;

use super::Received;

/// The largest batch size the builder accepts (batches are not used here).
pub(crate) const MAX_BATCH: usize = 1024;

/// Uninhabited: there is no batched path on this platform.
pub(crate) enum Batch {}

impl Batch {
    /// Always `None`: the portable loop serves instead.
    pub(crate) fn new(_: &Socket, _: &crate::config::Config) -> Option<Batch> {
        None
    }

    pub(crate) fn recv(&mut self, _: &Socket) -> io::Result<usize> {
        match *self {}
    }

    pub(crate) fn datagram(&mut self, _: usize) -> Option<(Received<'_>, &mut Vec<u8>)> {
        match *self {}
    }

    pub(crate) fn queue_reply(&mut self, _: usize, _: bool) {
        match *self {}
    }

    pub(crate) fn take_error(&mut self) -> Option<io::Error> {
        match *self {}
    }

    pub(crate) fn queued(&self) -> usize {
        match *self {}
    }

    pub(crate) fn send(&mut self, _: &Socket) -> (u64, u64) {
        match *self {}
    }
}

/// The kernel's drop count for the socket: not reported on this platform.
pub(crate) fn kernel_drops(_: &Socket) -> Option<u64> {
    None
}

/// Arrival addresses are not read on this platform: replies from a
/// wildcard-bound server go out from the address the kernel picks.
pub(crate) fn enable_pktinfo(_: &Socket, _: bool) -> io::Result<bool> {
    Ok(false)
}

/// Sends `reply` to `to`; the source address cannot be chosen on this
/// platform (arrival addresses are never read, so `from.local` is never set).
pub(crate) fn send_from(
    socket: &Socket,
    reply: &[u8],
    to: &socket2::SockAddr,
    _: &super::Arrival,
) -> io::Result<()> {
    socket.send_to(reply, to).map(drop)
}

/// Uninhabited: arrival addresses are not read on this platform.
pub(crate) enum PktinfoIo {}

impl PktinfoIo {
    /// Always `None`.
    pub(crate) fn new() -> Option<PktinfoIo> {
        None
    }

    pub(crate) fn recv<'b>(
        &mut self,
        _: &Socket,
        _: &'b mut [u8],
    ) -> io::Result<Option<Received<'b>>> {
        match *self {}
    }

    pub(crate) fn send(&mut self, _: &Socket, _: &[u8]) -> io::Result<()> {
        match *self {}
    }
}
