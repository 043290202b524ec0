//! Platforms without batched socket calls: no `Batch` can be made, and the
//! worker runs the portable loop; arrival addresses are not read.

use std::io;
use std::net::SocketAddr;

use socket2::Socket;

use super::{BatchSpec, Received};

/// The largest batch size the builder accepts (batches are not used here).
pub(crate) const MAX_BATCH: usize = 1024;

/// Uninhabited: there is no batched path on this platform.
pub(crate) enum Batch {}

impl Batch {
    /// Always `None`: the portable loop serves instead.
    pub(crate) fn new(_: &Socket, _: Option<BatchSpec>) -> Option<Batch> {
        None
    }

    pub(crate) fn recv(&mut self, _: &Socket, _: bool) -> io::Result<usize> {
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

    pub(crate) fn drop_queued(&mut self) -> u64 {
        match *self {}
    }
}

/// Up to `size` replies in reused buffers, sent one `send_to` each.
pub(crate) struct Replies {
    buffers: Box<[Vec<u8>]>,
    queue: Vec<(usize, SocketAddr, bool)>,
    last_error: Option<io::Error>,
}

impl Replies {
    pub(crate) fn new(_: &Socket, size: usize, _gso: bool) -> Replies {
        let size = size.max(1);
        Replies {
            buffers: (0..size)
                .map(|_| Vec::with_capacity(super::REPLY_RESERVE))
                .collect(),
            queue: Vec::with_capacity(size),
            last_error: None,
        }
    }

    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn size(&self) -> usize {
        self.buffers.len()
    }

    pub(crate) fn buffer(&mut self, i: usize) -> Option<&mut Vec<u8>> {
        self.buffers.get_mut(i)
    }

    pub(crate) fn trim(&mut self, count: usize) {
        for buffer in self.buffers.iter_mut().take(count) {
            super::trim_reply(buffer);
        }
    }

    pub(crate) fn queue(&mut self, i: usize, to: SocketAddr, _: super::Arrival, counted: bool) {
        if i < self.buffers.len() && self.queue.len() < self.buffers.len() {
            self.queue.push((i, to, counted));
        }
    }

    pub(crate) fn queued(&self) -> usize {
        self.queue.len()
    }

    pub(crate) fn clear(&mut self) {
        self.queue.clear();
    }

    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn drop_queued(&mut self) -> u64 {
        let counted = self.queue.iter().filter(|q| q.2).count();
        self.queue.clear();
        counted as u64
    }

    pub(crate) fn take_error(&mut self) -> Option<io::Error> {
        self.last_error.take()
    }

    pub(crate) fn send(&mut self, socket: &Socket) -> (u64, u64) {
        self.send_some(socket, false)
    }

    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn try_send(&mut self, socket: &Socket) -> (u64, u64) {
        self.send_some(socket, true)
    }

    fn send_some(&mut self, socket: &Socket, keep_blocked: bool) -> (u64, u64) {
        let (mut sent, mut failed) = (0, 0);
        let mut done = 0;
        for &(i, to, counted) in &self.queue {
            let Some(buffer) = self.buffers.get(i) else {
                done += 1;
                continue;
            };
            let to = socket2::SockAddr::from(to);
            let result = match keep_blocked {
                true => super::retry_interrupted(|| socket.send_to(buffer, &to)),
                false => super::send_blocking(socket, || socket.send_to(buffer, &to)),
            };
            match result {
                Ok(_) => sent += u64::from(counted),
                Err(err) if keep_blocked && err.kind() == io::ErrorKind::WouldBlock => break,
                Err(err) => {
                    failed += u64::from(counted);
                    self.last_error = Some(err);
                }
            }
            done += 1;
        }
        self.queue.drain(..done);
        (sent, failed)
    }
}

/// Whether the socket was shut down for reading: not told on this
/// platform.
pub(crate) fn is_shut_for_reading(_: &Socket) -> bool {
    false
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

/// Receive offload: there is none on this platform to turn off.
pub(crate) fn disable_gro(_: &Socket) -> io::Result<()> {
    Ok(())
}

/// Datagram metadata: not read on this platform (the server refuses the
/// setting before it gets here).
pub(crate) fn set_metadata(_: &Socket, _: bool, on: bool) -> io::Result<()> {
    if on {
        return Err(io::ErrorKind::Unsupported.into());
    }
    Ok(())
}

/// One entry taken from a socket's error queue: there is none on this
/// platform.
#[derive(Debug)]
pub(crate) struct QueuedError {
    pub(crate) dest: Option<std::net::SocketAddr>,
    pub(crate) len: usize,
    pub(crate) refused: bool,
}

/// ICMP errors are not queued per destination on this platform: an
/// unconnected socket does not learn which destination refused.
pub(crate) fn enable_recverr(_: &Socket, _: bool) -> io::Result<bool> {
    Ok(false)
}

/// Always `Unsupported`: there is no error queue on this platform.
pub(crate) fn recv_error(_: &Socket, _: &mut [u8]) -> io::Result<QueuedError> {
    Err(io::ErrorKind::Unsupported.into())
}

/// Uninhabited: arrival addresses are not read on this platform.
pub(crate) enum PktinfoIo {}

impl PktinfoIo {
    /// Always `None`.
    pub(crate) fn new(_: crate::sys::Control) -> Option<PktinfoIo> {
        None
    }

    pub(crate) fn recv<'b>(
        &mut self,
        _: &Socket,
        _: &'b mut [u8],
        _: bool,
    ) -> io::Result<Option<Received<'b>>> {
        match *self {}
    }

    pub(crate) fn send(&mut self, _: &Socket, _: &[u8]) -> io::Result<()> {
        match *self {}
    }
}
