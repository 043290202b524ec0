//! One receive queue served through its AF_XDP socket: frames taken in
//! batches, checked ([`frame::parse`]), handed out as datagrams, and their
//! replies built in the same frames and sent back through the TX ring.

use std::io;
use std::net::{IpAddr, SocketAddr};

use super::frame::{self, Datagram, Target};
use super::iface;
use super::xsk::{Desc, Xsk, XskSpec};
use crate::sys::{Arrival, REPLY_RESERVE, Received, trim_reply};

/// IPv6's minimum MTU: a frame within it fits every link.
const MIN_MTU: usize = 1280;

/// Where a taken frame is: replies may be sent before the whole batch has
/// been handled (a slow handler makes the ready ones go), so each frame is
/// followed on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Being worked on: its datagram may still be asked for.
    Pending,
    /// Its reply is queued; whether it is counted.
    Queued(bool),
    /// Sent, or given back: the frame is no longer this slot's.
    Done,
}

/// How a queue serves: what it takes, and how it answers.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// The interface's name, to read its MTU again.
    pub(crate) interface: String,
    pub(crate) target: Target,
    /// The largest datagram handed out whole; a longer one is handed out
    /// cut to this, marked truncated.
    pub(crate) max_datagram: usize,
    /// Frames per receive.
    pub(crate) batch: usize,
    /// The longest frame the interface sends (Ethernet header and MTU): a
    /// longer reply leaves through the kernel socket, which fragments it.
    pub(crate) max_frame: usize,
    /// The TOS byte or traffic class of replies.
    pub(crate) tos: u8,
    /// Sources the kernel would refuse from the network besides the
    /// martians ([`super::iface::is_refused_source`]): the host's own
    /// addresses and broadcast addresses.
    pub(crate) not_sources: Vec<IpAddr>,
}

/// A receive queue's socket and what its last receive took.
#[derive(Debug)]
pub(crate) struct Queue {
    xsk: Xsk,
    settings: Settings,
    ifindex: u32,
    /// The frames of the last receive, scratch.
    descs: Vec<Desc>,
    /// The accepted ones: frame and datagram.
    taken: Vec<(Desc, Datagram)>,
    replies: Vec<Vec<u8>>,
    /// Where each taken frame is.
    slots: Vec<Slot>,
    /// Frames refused since the last [`Queue::take_rejected`].
    rejected: u64,
    error: Option<io::Error>,
}

impl Queue {
    /// A socket on `queue` of interface `ifindex`, serving `target`.
    pub(crate) fn new(
        ifindex: u32,
        queue: u32,
        spec: XskSpec,
        mut settings: Settings,
    ) -> io::Result<Queue> {
        let batch = settings.batch.clamp(1, spec.ring as usize);
        settings.batch = batch;
        Ok(Queue {
            xsk: Xsk::new(ifindex, queue, spec)?,
            settings,
            ifindex,
            descs: Vec::with_capacity(batch),
            taken: Vec::with_capacity(batch),
            replies: (0..batch)
                .map(|_| Vec::with_capacity(REPLY_RESERVE))
                .collect(),
            slots: Vec::with_capacity(batch),
            rejected: 0,
            error: None,
        })
    }

    /// The socket (its descriptor goes in the `XSKMAP`).
    pub(crate) fn xsk(&self) -> &Xsk {
        &self.xsk
    }

    /// Takes what the RX ring holds, up to a batch, without waiting;
    /// returns how many datagrams were accepted. The replies of the last
    /// receive must have been sent (or dropped).
    pub(crate) fn take(&mut self) -> usize {
        // Frames given back by the last receive, and those sent since,
        // become receive buffers again.
        self.release();
        self.xsk.reclaim();
        self.xsk.refill();
        // Replies a busy kernel left in the TX ring go now.
        if let Err(err) = self.xsk.kick_pending() {
            self.error = Some(err);
        }
        self.xsk.recv(&mut self.descs, self.settings.batch);
        for &desc in &self.descs {
            let parsed = frame::parse(self.xsk.frame(&desc), &self.settings.target);
            match parsed {
                // A source the kernel would have refused (a martian, or
                // one of this host's own: a forged one could make the
                // server answer itself for ever) is not answered.
                Ok(datagram)
                    if !iface::is_refused_source(
                        datagram.peer.ip(),
                        &self.settings.not_sources,
                    ) =>
                {
                    self.taken.push((desc, datagram));
                    self.slots.push(Slot::Pending);
                }
                _ => {
                    self.rejected += 1;
                    self.xsk.give_back(desc.addr);
                }
            }
        }
        for reply in self.replies.iter_mut().take(self.taken.len()) {
            reply.clear();
        }
        self.taken.len()
    }

    /// Reads the interface's MTU again (through `socket`, in its network
    /// namespace), so that a change at run time does not make replies too
    /// long for the link; kept as it was if it cannot be read.
    pub(crate) fn refresh_mtu(&mut self, socket: &socket2::Socket) {
        if let Ok(mtu) = iface::mtu(socket, &self.settings.interface) {
            self.settings.max_frame = frame::ETH_LEN.saturating_add(mtu as usize);
        }
    }

    /// Gives back the frames of the last receive that are still this
    /// side's (no reply, or a reply never sent), and forgets the receive.
    fn release(&mut self) {
        for ((desc, _), slot) in self.taken.iter().zip(&self.slots) {
            if *slot != Slot::Done {
                self.xsk.give_back(desc.addr);
            }
        }
        self.taken.clear();
        self.slots.clear();
    }

    /// Waits up to `timeout` for frames, or for `other` to be readable;
    /// returns whether each is ready.
    pub(crate) fn wait(
        &mut self,
        other: Option<std::os::fd::RawFd>,
        timeout: std::time::Duration,
    ) -> io::Result<(bool, bool)> {
        self.xsk.wait(other, timeout)
    }

    /// Datagram `i` of the last receive and its reply buffer.
    pub(crate) fn datagram(&mut self, i: usize) -> Option<(Received<'_>, &mut Vec<u8>)> {
        if self.slots.get(i) != Some(&Slot::Pending) {
            return None;
        }
        let (desc, datagram) = self.taken.get(i)?;
        let data = self.xsk.frame(desc).get(datagram.payload.clone())?;
        let max = self.settings.max_datagram;
        let truncated = data.len() > max;
        let data = &data[..data.len().min(max)];
        let reply = self.replies.get_mut(i)?;
        Some((
            Received {
                data,
                truncated,
                peer: datagram.peer,
                arrival: Arrival {
                    local: Some(datagram.local.ip()),
                    ifindex: self.ifindex,
                    tos: Some(datagram.tos),
                    ttl: Some(datagram.ttl),
                },
            },
            reply,
        ))
    }

    /// Queues the reply to datagram `i`.
    pub(crate) fn queue_reply(&mut self, i: usize, counted: bool) {
        if let Some(slot) = self.slots.get_mut(i).filter(|s| **s == Slot::Pending) {
            *slot = Slot::Queued(counted);
        }
    }

    /// How many replies are queued.
    pub(crate) fn queued(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| matches!(s, Slot::Queued(_)))
            .count()
    }

    /// Sends every queued reply: built in its request's frame where it
    /// fits, else through `fallback` (the kernel socket bound to the same
    /// address). The frames of datagrams not yet dealt with stay, for the
    /// rest of the batch. Returns the counted replies sent and failed.
    pub(crate) fn send(
        &mut self,
        socket: &socket2::Socket,
        fallback: &mut dyn FnMut(&[u8], SocketAddr) -> io::Result<()>,
    ) -> (u64, u64) {
        let (mut sent, mut failed) = (0, 0);
        let mut any = false;
        // A reply longer than every link carries (IPv6's minimum MTU)
        // makes the MTU be read again first, once a batch: a change at run
        // time must not make it too long for the link.
        let long = |len: usize| len > frame::ETH_LEN + MIN_MTU;
        let any_long = self.taken.iter().zip(&self.slots).zip(&self.replies).any(
            |(((_, datagram), slot), reply)| {
                matches!(slot, Slot::Queued(_))
                    && long(frame::header_len(datagram.is_v6()) + reply.len())
            },
        );
        if any_long {
            self.refresh_mtu(socket);
        }
        for (i, (desc, datagram)) in self.taken.iter().enumerate() {
            let (Some(slot), Some(reply)) = (self.slots.get_mut(i), self.replies.get_mut(i)) else {
                continue;
            };
            let Slot::Queued(counted) = *slot else {
                continue;
            };
            *slot = Slot::Done;
            let at = frame::header_len(datagram.is_v6());
            let max_frame = self.settings.max_frame;
            let tos = self.settings.tos;
            let frame = self.xsk.frame_mut(desc.addr);
            // A reply longer than the interface's MTU goes through the
            // kernel socket, which fragments it.
            let built = match frame.get_mut(at..at + reply.len()) {
                Some(room) if at + reply.len() <= max_frame => {
                    room.copy_from_slice(reply);
                    frame::make_reply(frame, datagram, reply.len(), tos)
                }
                _ => None,
            };
            let result = match built.and_then(|len| u32::try_from(len).ok()) {
                Some(len) if self.xsk.send(desc.addr, len) => {
                    any = true;
                    Ok(())
                }
                Some(_) => Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "the AF_XDP TX ring is full",
                )),
                None => {
                    // Too large for a frame: the kernel socket sends it.
                    self.xsk.give_back(desc.addr);
                    fallback(reply, datagram.peer)
                }
            };
            reply.clear();
            trim_reply(reply);
            match result {
                Ok(()) => sent += u64::from(counted),
                Err(err) => {
                    failed += u64::from(counted);
                    if counted {
                        self.error = Some(err);
                    }
                }
            }
        }
        if any {
            if let Err(err) = self.xsk.flush() {
                self.error = Some(err);
            }
        }
        (sent, failed)
    }

    /// Drops the queued replies unsent (their frames given back); returns
    /// how many were counted.
    pub(crate) fn drop_queued(&mut self) -> u64 {
        let mut counted = 0;
        for ((desc, _), slot) in self.taken.iter().zip(self.slots.iter_mut()) {
            if let Slot::Queued(c) = *slot {
                counted += u64::from(c);
                *slot = Slot::Done;
                self.xsk.give_back(desc.addr);
            }
        }
        counted
    }

    /// The error of the last reply that failed, once.
    pub(crate) fn take_error(&mut self) -> Option<io::Error> {
        self.error.take()
    }

    /// Frames refused since the last call (malformed, or not for the
    /// server), given back unanswered.
    pub(crate) fn take_rejected(&mut self) -> u64 {
        std::mem::take(&mut self.rejected)
    }

    /// What the kernel dropped on the way to this socket.
    pub(crate) fn kernel_drops(&self) -> Option<u64> {
        self.xsk.statistics().ok().map(|s| s.drops())
    }
}
