//! The AF_XDP engine (feature `xdp`, Linux): the same handlers, served from
//! the NIC's receive queues before the kernel's UDP stack sees the
//! datagrams.
//!
//! [`ServerBuilder::xdp`](crate::ServerBuilder::xdp) takes an [`Xdp`]: the
//! interface, and optionally the [`XdpMode`]. The server then binds its
//! address as usual (a kernel socket, which keeps the port taken), attaches
//! a small XDP program to the interface, and opens an AF_XDP socket on
//! each of its receive queues, with one receive worker each.
//!
//! - **What goes where.** The program redirects a frame only when it
//!   carries UDP to the server's address and port, in an untagged Ethernet
//!   frame to the interface's MAC address, of an IPv4 datagram without
//!   options that is not a fragment, or of an IPv6 datagram without
//!   extension headers. Everything else (ARP, ICMP, other ports and
//!   addresses, fragments, options, extension headers, VLAN tags, frames
//!   for other hosts) passes to the kernel unchanged, and a datagram for
//!   the server among it reaches the kernel socket, which the same workers
//!   serve (looked at at least every 64 batches, so a flood on the fast
//!   path does not starve it).
//! - **Sources the kernel would refuse are refused**: the XDP path skips
//!   the kernel's checks, so the engine makes them itself. A datagram from
//!   an unspecified, loopback, multicast, broadcast or reserved address,
//!   from an IPv4-mapped IPv6 address, or from any address of this host
//!   (read when the server is bound: a forged one would make the server
//!   answer itself for ever) is dropped and counted in `malformed`.
//! - **Replies** are built in the request's own frame: Ethernet, IP and
//!   UDP addresses swapped, lengths, TTL (64) and checksums computed, v4 and
//!   v6, with the DSCP of [`reply_dscp`](crate::ServerBuilder::reply_dscp)
//!   (0 without it; the request's ECN bits and flow label are not echoed).
//!   A reply longer than the interface's MTU, or too large for the frame,
//!   leaves through the kernel socket, which fragments it (the MTU is read
//!   again before any reply longer than 1280 bytes, and when idle, so a
//!   change at run time is kept to). With a
//!   [handler pool](crate::ServerBuilder::handler_pool), replies leave
//!   through the kernel socket too (the pool's threads do not own a TX
//!   ring).
//! - **Every promise of the socket path holds:** the handler, rate limit,
//!   amplification cap, source tokens, truncation limit, caught panics,
//!   `received == accounted()`, [`Stats`](crate::Stats), latency
//!   histograms and `metrics`. Frames the engine takes and refuses
//!   (malformed: a length longer than the frame, a bad IPv4 header
//!   checksum, a UDP checksum of zero over IPv6) are dropped and counted in
//!   [`Stats::malformed`](crate::Stats::malformed), not in `received`.
//!   `kernel_drops` adds what the kernel dropped on the way to the AF_XDP
//!   sockets (a full RX ring).
//! - **Attach and detach.** The program is attached with a BPF link, which
//!   the kernel removes when its last descriptor closes: at shutdown (also
//!   one that gives up on a handler that never returns), and when the
//!   process dies however it dies, so a crashed server never leaves the
//!   interface redirecting into nothing. Native mode where the driver
//!   supports it, else generic; [`ServerHandle::xdp_mode`](crate::ServerHandle::xdp_mode)
//!   reports which. A server started again at once on the same queues
//!   waits (up to a second) for the kernel to let go of the last one's.
//! - **Needs** root (or `CAP_BPF`, `CAP_NET_ADMIN`, `CAP_NET_RAW` and
//!   `CAP_IPC_LOCK` for the locked UMEM) and Linux 5.9 or later (BPF links
//!   for XDP). Without them, bind fails with [`Error::Xdp`](crate::Error::Xdp)
//!   naming what is missing; it never falls back to the socket path
//!   silently.
//! - **Refused at bind**, with [`Error::Xdp`](crate::Error::Xdp): an
//!   interface that does not exist, a loopback interface (AF_XDP cannot
//!   answer through it), one that is not Ethernet (a tunnel), and an
//!   address that is not this host's. The address may be on another
//!   interface (a service address on `lo` or a dummy, reached through this
//!   one, as anycast and direct-routing setups have).
//! - **Limits.** Incoming UDP checksums are verified only with
//!   [`Xdp::verify_udp_checksums`] (a veth peer hands over partial ones).
//!   A datagram is received whole up to about 3.7 KB (a frame is 4 KiB);
//!   the kernel drops longer ones on the XDP path. One XDP server per
//!   interface, bound to one address. The host's addresses are read at
//!   bind: one added later is not refused as a source, and one removed
//!   later still is. A NIC that
//!   strips VLAN tags in hardware shows tagged frames to XDP untagged: turn
//!   its VLAN offload off (`ethtool -K eth0 rxvlan off`) on an interface
//!   that carries VLANs. The queue count comes from the driver's channels
//!   (`ethtool -l`): where it does not say, queue 0 alone is served through
//!   AF_XDP, and the others reach the kernel socket.
//!   With [`recv_metadata`](crate::ServerBuilder::recv_metadata), the
//!   TOS or traffic class, TTL or hop limit, and interface come from the
//!   frame.

/// An AF_XDP engine's settings: the interface, and optionally the mode and
/// ring size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Xdp {
    pub(crate) interface: String,
    pub(crate) mode: Option<XdpMode>,
    pub(crate) ring: u32,
    pub(crate) verify_checksums: bool,
}

/// The ring size an [`Xdp`] has unless told otherwise.
const DEFAULT_RING: u32 = 1024;

impl Xdp {
    /// Serves through the receive queues of `interface` (such as `eth0`),
    /// natively where its driver can, else generically, with rings of
    /// 1024 entries.
    pub fn interface(interface: impl Into<String>) -> Xdp {
        Xdp {
            interface: interface.into(),
            mode: None,
            ring: DEFAULT_RING,
            verify_checksums: false,
        }
    }

    /// Verifies the UDP checksum of every datagram taken from a receive
    /// queue, and drops (and counts in
    /// [`Stats::malformed`](crate::Stats::malformed)) those that do not
    /// check out. Off by default: a veth peer's own datagrams carry the
    /// partial checksum its offload never completed (turn it on for a
    /// physical NIC, or turn the peer's `tx-checksumming` off). A UDP
    /// checksum of zero over IPv6 is always refused; over IPv4 it means
    /// "none".
    #[must_use]
    pub fn verify_udp_checksums(mut self, on: bool) -> Xdp {
        self.verify_checksums = on;
        self
    }

    /// Attaches in `mode` only: binding fails if the driver cannot.
    #[must_use]
    pub fn mode(mut self, mode: XdpMode) -> Xdp {
        self.mode = Some(mode);
        self
    }

    /// Entries in each of a queue's four rings: a power of two from 64 to
    /// 16384 (default 1024). Each queue's UMEM holds four times as many
    /// frames of 4 KiB, locked in memory: 16 MiB per queue by default.
    #[must_use]
    pub fn ring_size(mut self, entries: u32) -> Xdp {
        self.ring = entries;
        self
    }

    /// The interface.
    pub fn interface_name(&self) -> &str {
        &self.interface
    }

    pub(crate) fn validate(&self) -> Result<(), crate::Error> {
        if !(64..=16384).contains(&self.ring) || !self.ring.is_power_of_two() {
            return Err(crate::Error::invalid(
                "Xdp::ring_size",
                "must be a power of two from 64 to 16384",
            ));
        }
        if self.interface.is_empty()
            || self.interface.len() > 15
            || self.interface.contains(['/', '\0'])
        {
            return Err(crate::Error::invalid(
                "Xdp::interface",
                "must be an interface name (1 to 15 bytes, no '/')",
            ));
        }
        Ok(())
    }

    pub(crate) fn spec(&self) -> crate::sys::xdp::XskSpec {
        crate::sys::xdp::XskSpec {
            frames: self.ring * 4,
            frame_size: 4096,
            ring: self.ring,
        }
    }
}

/// Where an XDP program runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum XdpMode {
    /// In the driver, before the kernel makes a socket buffer: the fast one.
    Native,
    /// In the kernel's generic hook, after the socket buffer is made: every
    /// driver has it, and it saves less.
    Generic,
}

impl XdpMode {
    pub(crate) fn to_sys(self) -> crate::sys::xdp::XdpMode {
        match self {
            XdpMode::Native => crate::sys::xdp::XdpMode::Native,
            XdpMode::Generic => crate::sys::xdp::XdpMode::Generic,
        }
    }

    pub(crate) fn from_sys(mode: crate::sys::xdp::XdpMode) -> XdpMode {
        match mode {
            crate::sys::xdp::XdpMode::Native => XdpMode::Native,
            crate::sys::xdp::XdpMode::Generic => XdpMode::Generic,
        }
    }
}

impl std::fmt::Display for XdpMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            XdpMode::Native => "native",
            XdpMode::Generic => "generic",
        })
    }
}
