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
    pub(crate) fn new(_socket: &Socket, _size: usize, _max: usize, _gso: bool) -> Option<Batch> {
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
