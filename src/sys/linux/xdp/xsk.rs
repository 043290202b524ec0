//! An AF_XDP socket bound to one receive queue, with its UMEM (the frames
//! both sides share) and its four rings, written to the kernel's
//! `<linux/if_xdp.h>` (libc has its structures only from 0.2.165 on, so
//! they are declared here).
//!
//! Every frame is in exactly one place at a time: on this side's free list,
//! in the fill ring or being received into (the kernel's), in the RX ring
//! or being handled (ours), in the TX ring or being sent (the kernel's),
//! or in the completion ring (ours again).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

const AF_XDP: libc::c_int = 44;
const SOL_XDP: libc::c_int = 283;
const XDP_MMAP_OFFSETS: libc::c_int = 1;
const XDP_RX_RING: libc::c_int = 2;
const XDP_TX_RING: libc::c_int = 3;
const XDP_UMEM_REG: libc::c_int = 4;
const XDP_UMEM_FILL_RING: libc::c_int = 5;
const XDP_UMEM_COMPLETION_RING: libc::c_int = 6;
const XDP_STATISTICS: libc::c_int = 7;
const XDP_COPY: u16 = 1 << 1;
const XDP_ZEROCOPY: u16 = 1 << 2;
const XDP_USE_NEED_WAKEUP: u16 = 1 << 3;
const XDP_RING_NEED_WAKEUP: u32 = 1;
const XDP_PGOFF_RX_RING: u64 = 0;
const XDP_PGOFF_TX_RING: u64 = 0x8000_0000;
const XDP_UMEM_PGOFF_FILL_RING: u64 = 0x1_0000_0000;
const XDP_UMEM_PGOFF_COMPLETION_RING: u64 = 0x1_8000_0000;

/// `struct sockaddr_xdp`.
#[repr(C)]
struct SockaddrXdp {
    family: u16,
    flags: u16,
    ifindex: u32,
    queue_id: u32,
    shared_umem_fd: u32,
}

/// `struct xdp_umem_reg` (with `flags` and `tx_metadata_len`, both 0).
#[repr(C)]
struct UmemReg {
    addr: u64,
    len: u64,
    chunk_size: u32,
    headroom: u32,
    flags: u32,
    tx_metadata_len: u32,
}

/// `struct xdp_ring_offset`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct RingOffset {
    producer: u64,
    consumer: u64,
    desc: u64,
    flags: u64,
}

/// `struct xdp_mmap_offsets`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct MmapOffsets {
    rx: RingOffset,
    tx: RingOffset,
    fill: RingOffset,
    completion: RingOffset,
}

/// `struct xdp_desc`: a frame in the RX or TX ring.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Desc {
    /// Where the frame's data begins, as an offset into the UMEM.
    pub(crate) addr: u64,
    pub(crate) len: u32,
    pub(crate) options: u32,
}

/// `struct xdp_statistics`: what the kernel dropped on this socket's way.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct XdpStatistics {
    /// Dropped for reasons other than a full ring or no free frame.
    pub(crate) rx_dropped: u64,
    pub(crate) rx_invalid_descs: u64,
    pub(crate) tx_invalid_descs: u64,
    /// Dropped because the RX ring was full.
    pub(crate) rx_ring_full: u64,
    /// Frames that found the fill ring empty.
    pub(crate) rx_fill_ring_empty_descs: u64,
    pub(crate) tx_ring_empty_descs: u64,
}

impl XdpStatistics {
    /// Datagrams redirected to the socket that it never received.
    pub(crate) fn drops(&self) -> u64 {
        self.rx_dropped.saturating_add(self.rx_ring_full)
    }
}

/// The sizes of a socket's UMEM and rings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct XskSpec {
    /// Frames in the UMEM (at least twice `ring`).
    pub(crate) frames: u32,
    /// Bytes per frame: 2048 or 4096 (a power of two the kernel takes).
    pub(crate) frame_size: u32,
    /// Entries per ring, a power of two.
    pub(crate) ring: u32,
}

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

/// An error with the step that failed; the operating system's error stays
/// readable (`source`), for the hints the caller gives.
#[derive(Debug)]
pub(crate) struct Context {
    step: String,
    pub(crate) source: io::Error,
}

impl std::fmt::Display for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.step, self.source)
    }
}

impl std::error::Error for Context {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

fn context(step: &str, source: io::Error) -> io::Error {
    io::Error::new(
        source.kind(),
        Context {
            step: step.to_owned(),
            source,
        },
    )
}

/// How long a bind waits for the kernel to let go of a receive queue that
/// an AF_XDP socket closed a moment ago held (it frees it from deferred
/// work): a server restarted at once gets `EBUSY` for some milliseconds.
const BIND_BUSY_WAIT: Duration = Duration::from_secs(1);

/// An anonymous shared mapping, unmapped when dropped.
#[derive(Debug)]
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; the raw pointer
// is only a handle to it, and every access goes through `&self` or
// `&mut self` methods of the owners below, which keep Rust's aliasing
// rules (ring words the kernel also writes are only touched atomically).
unsafe impl Send for Mapping {}

// SAFETY: through `&self`, the owners below only read: frames that are on
// this side (which the kernel does not write meanwhile, and which only
// `&mut self` methods write), and ring words, atomically. Sharing a
// reference between threads therefore allows no data race.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes: anonymous memory (`fd` `None`), or the part of the
    /// socket `fd` at `offset` (a ring).
    fn new(len: usize, fd: Option<RawFd>, offset: u64) -> io::Result<Mapping> {
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::other("AF_XDP needs 64-bit file offsets"))?;
        let (flags, fd) = match fd {
            Some(fd) => (libc::MAP_SHARED | libc::MAP_POPULATE, fd),
            None => (
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
            ),
        };
        // SAFETY: a new mapping at an address the kernel picks, of `len`
        // bytes, over nothing of ours; the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        NonNull::new(ptr.cast::<u8>())
            .map(|ptr| Mapping { ptr, len })
            .ok_or_else(|| io::Error::other("mmap returned null"))
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr` and `len` are a mapping this value made and owns;
        // nothing borrows it past this value's life.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// One of the four rings, mapped from the socket: its producer and
/// consumer words, its flags word, and its descriptors.
#[derive(Debug)]
struct Ring<T> {
    map: Mapping,
    off: RingOffset,
    size: u32,
    /// This side's index (producer for fill and TX, consumer for RX and
    /// completion), ahead of the shared word until published.
    local: u32,
    _desc: std::marker::PhantomData<T>,
}

impl<T: Copy> Ring<T> {
    fn map(fd: RawFd, off: RingOffset, size: u32, pgoff: u64) -> io::Result<Ring<T>> {
        let len = usize::try_from(off.desc)
            .ok()
            .and_then(|desc| desc.checked_add(size as usize * std::mem::size_of::<T>()))
            .ok_or_else(|| io::Error::other("a ring larger than memory"))?;
        for word in [off.producer, off.consumer, off.flags] {
            if word.saturating_add(4) > off.desc {
                return Err(io::Error::other(
                    "the kernel's ring offsets are not understood",
                ));
            }
        }
        let map = Mapping::new(len, Some(fd), pgoff)?;
        let mut ring = Ring {
            map,
            off,
            size,
            local: 0,
            _desc: std::marker::PhantomData,
        };
        // Start where the kernel is (0 for a new socket).
        ring.local = match pgoff {
            XDP_UMEM_PGOFF_FILL_RING | XDP_PGOFF_TX_RING => ring.producer().load(Ordering::Relaxed),
            _ => ring.consumer().load(Ordering::Relaxed),
        };
        Ok(ring)
    }

    fn word(&self, at: u64) -> &AtomicU32 {
        // SAFETY: `at` is one of the ring's word offsets, checked in `map`
        // to lie (4 bytes whole) before the descriptors, inside the mapping,
        // which the kernel aligns for its `u32` words; the mapping lives as
        // long as `self`. The kernel writes the words concurrently, so they
        // are only ever read and written atomically.
        unsafe { &*self.map.ptr.as_ptr().add(at as usize).cast::<AtomicU32>() }
    }

    fn producer(&self) -> &AtomicU32 {
        self.word(self.off.producer)
    }

    fn consumer(&self) -> &AtomicU32 {
        self.word(self.off.consumer)
    }

    fn needs_wakeup(&self) -> bool {
        self.word(self.off.flags).load(Ordering::Relaxed) & XDP_RING_NEED_WAKEUP != 0
    }

    fn slot(&self, index: u32) -> *mut T {
        let at = (index & (self.size - 1)) as usize;
        // SAFETY: `at` is below `size`, and the mapping holds `size`
        // descriptors from `off.desc` on (its length was computed so).
        unsafe {
            self.map
                .ptr
                .as_ptr()
                .add(self.off.desc as usize)
                .cast::<T>()
                .add(at)
        }
    }

    /// Producer side: free entries.
    fn free(&self) -> u32 {
        let consumer = self.consumer().load(Ordering::Acquire);
        self.size - self.local.wrapping_sub(consumer)
    }

    /// Producer side: writes one entry (published by [`Ring::submit`]).
    fn push(&mut self, value: T) -> bool {
        if self.free() == 0 {
            return false;
        }
        // SAFETY: the slot is free (the consumer has moved past it), so
        // the kernel does not read it until the producer word is published
        // past it; it is inside the mapping (`slot`), and `T` is the ring's
        // descriptor type, written unaligned-safe as the kernel laid it.
        unsafe { self.slot(self.local).write_unaligned(value) };
        self.local = self.local.wrapping_add(1);
        true
    }

    /// Producer side: entries pushed that the kernel has not taken yet.
    fn pending(&self) -> u32 {
        self.local
            .wrapping_sub(self.consumer().load(Ordering::Acquire))
    }

    /// Producer side: hands what was pushed to the kernel.
    fn submit(&self) {
        self.producer().store(self.local, Ordering::Release);
    }

    /// Consumer side: takes one entry (released by [`Ring::release`]).
    fn pop(&mut self) -> Option<T> {
        let producer = self.producer().load(Ordering::Acquire);
        if producer == self.local {
            return None;
        }
        // SAFETY: the kernel published this slot (the producer word is past
        // it, read with acquire ordering) and does not reuse it until the
        // consumer word moves past it; it is inside the mapping.
        let value = unsafe { self.slot(self.local).read_unaligned() };
        self.local = self.local.wrapping_add(1);
        Some(value)
    }

    /// Consumer side: gives the entries taken back to the kernel.
    fn release(&self) {
        self.consumer().store(self.local, Ordering::Release);
    }
}

/// An AF_XDP socket on one receive queue, with its UMEM and rings.
#[derive(Debug)]
pub(crate) struct Xsk {
    fd: OwnedFd,
    umem: Mapping,
    frame_size: u32,
    fill: Ring<u64>,
    completion: Ring<u64>,
    rx: Ring<Desc>,
    tx: Ring<Desc>,
    /// Frames on this side, not in any ring.
    free: Vec<u64>,
}

impl Xsk {
    /// A socket on queue `queue` of interface `ifindex`: zero-copy where the
    /// driver can, else copying.
    pub(crate) fn new(ifindex: u32, queue: u32, spec: XskSpec) -> io::Result<Xsk> {
        if !spec.ring.is_power_of_two() || spec.frames < spec.ring.saturating_mul(2) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the ring size must be a power of two, and the frames at least twice as many",
            ));
        }
        // SAFETY: `socket` takes plain integers and touches no memory.
        let fd = cvt(unsafe { libc::socket(AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) })
            .map_err(|e| context("socket(AF_XDP)", e))?;
        // SAFETY: `fd` is the new socket, owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let raw = fd.as_raw_fd();
        let len = (spec.frames as usize)
            .checked_mul(spec.frame_size as usize)
            .ok_or_else(|| io::Error::other("a UMEM larger than memory"))?;
        let umem = Mapping::new(len, None, 0).map_err(|e| context("mapping the UMEM", e))?;
        let reg = UmemReg {
            addr: umem.ptr.as_ptr() as u64,
            len: len as u64,
            chunk_size: spec.frame_size,
            headroom: 0,
            flags: 0,
            tx_metadata_len: 0,
        };
        set(raw, XDP_UMEM_REG, &reg).map_err(|e| {
            let hint = match e.raw_os_error() {
                Some(libc::ENOBUFS | libc::ENOMEM | libc::EPERM) => {
                    " (the UMEM is locked memory: raise RLIMIT_MEMLOCK, or run with CAP_IPC_LOCK)"
                }
                _ => "",
            };
            context(&format!("registering a UMEM of {len} bytes{hint}"), e)
        })?;
        for ring in [
            XDP_UMEM_FILL_RING,
            XDP_UMEM_COMPLETION_RING,
            XDP_RX_RING,
            XDP_TX_RING,
        ] {
            set(raw, ring, &spec.ring).map_err(|e| context("sizing the rings", e))?;
        }
        let mut off = MmapOffsets::default();
        let mut off_len = std::mem::size_of::<MmapOffsets>() as libc::socklen_t;
        // SAFETY: `off` is a live, writable `MmapOffsets` of the length
        // given, which the kernel writes at most `off_len` bytes of.
        cvt(unsafe {
            libc::getsockopt(
                raw,
                SOL_XDP,
                XDP_MMAP_OFFSETS,
                std::ptr::from_mut(&mut off).cast(),
                &mut off_len,
            )
        })
        .map_err(|e| context("reading the ring offsets", e))?;
        if off_len as usize != std::mem::size_of::<MmapOffsets>() {
            return Err(io::Error::other(
                "this kernel's AF_XDP rings have no flags word (Linux 5.4 or later needed)",
            ));
        }
        let ring = spec.ring;
        let mut xsk = Xsk {
            fill: Ring::map(raw, off.fill, ring, XDP_UMEM_PGOFF_FILL_RING)?,
            completion: Ring::map(raw, off.completion, ring, XDP_UMEM_PGOFF_COMPLETION_RING)?,
            rx: Ring::map(raw, off.rx, ring, XDP_PGOFF_RX_RING)?,
            tx: Ring::map(raw, off.tx, ring, XDP_PGOFF_TX_RING)?,
            fd,
            umem,
            frame_size: spec.frame_size,
            free: (0..u64::from(spec.frames))
                .rev()
                .map(|i| i * u64::from(spec.frame_size))
                .collect(),
        };
        xsk.refill();
        let mut bound = None;
        let busy_until = std::time::Instant::now() + BIND_BUSY_WAIT;
        let mut modes = [XDP_ZEROCOPY, XDP_COPY].into_iter().peekable();
        while let Some(&mode) = modes.peek() {
            let addr = SockaddrXdp {
                family: AF_XDP as u16,
                flags: mode | XDP_USE_NEED_WAKEUP,
                ifindex,
                queue_id: queue,
                shared_umem_fd: 0,
            };
            // SAFETY: `addr` is a live `sockaddr_xdp` of the length given,
            // which `bind` only reads.
            let rc = unsafe {
                libc::bind(
                    raw,
                    std::ptr::from_ref(&addr).cast(),
                    std::mem::size_of::<SockaddrXdp>() as libc::socklen_t,
                )
            };
            match cvt(rc) {
                Ok(_) => {
                    bound = Some(Ok(()));
                    break;
                }
                Err(e) if mode == XDP_ZEROCOPY && e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    modes.next();
                }
                Err(e)
                    if e.raw_os_error() == Some(libc::EBUSY)
                        && std::time::Instant::now() < busy_until =>
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => {
                    bound = Some(Err(e));
                    break;
                }
            }
        }
        match bound {
            Some(Ok(())) => Ok(xsk),
            Some(Err(e)) => Err(context(&format!("binding to receive queue {queue}"), e)),
            None => Err(io::Error::other("no bind mode")),
        }
    }

    /// The socket's descriptor (for the `XSKMAP`).
    pub(crate) fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Gives free frames to the kernel to receive into.
    pub(crate) fn refill(&mut self) {
        let mut pushed = false;
        while let Some(&addr) = self.free.last() {
            if !self.fill.push(addr) {
                break;
            }
            self.free.pop();
            pushed = true;
        }
        if pushed {
            self.fill.submit();
        }
    }

    /// Takes back the frames the kernel has sent.
    pub(crate) fn reclaim(&mut self) {
        let mut taken = false;
        while let Some(addr) = self.completion.pop() {
            self.free.push(self.base(addr));
            taken = true;
        }
        if taken {
            self.completion.release();
        }
    }

    /// Takes up to `max` received frames into `out` (cleared first).
    pub(crate) fn recv(&mut self, out: &mut Vec<Desc>, max: usize) {
        out.clear();
        while out.len() < max {
            match self.rx.pop() {
                Some(desc) => out.push(desc),
                None => break,
            }
        }
        if !out.is_empty() {
            self.rx.release();
        }
    }

    /// The start of the frame that `addr` lies in.
    fn base(&self, addr: u64) -> u64 {
        addr - addr % u64::from(self.frame_size)
    }

    /// Frame `addr` (as a descriptor gives it) from `addr` to the end of its
    /// chunk; empty if it lies outside the UMEM.
    pub(crate) fn frame_mut(&mut self, addr: u64) -> &mut [u8] {
        let end = self.base(addr).saturating_add(u64::from(self.frame_size));
        if end > self.umem.len as u64 || addr >= end {
            return &mut [];
        }
        // SAFETY: `addr..end` lies inside the UMEM mapping (checked above),
        // which lives as long as `self`; the `&mut self` borrow makes this
        // the only reference into it. The frame is on this side (taken from
        // the RX ring and not yet pushed to the TX or fill ring), so the
        // kernel does not touch it meanwhile.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.umem.ptr.as_ptr().add(addr as usize),
                (end - addr) as usize,
            )
        }
    }

    /// The received bytes of `desc`; empty if they lie outside its frame.
    pub(crate) fn frame(&self, desc: &Desc) -> &[u8] {
        let end = self
            .base(desc.addr)
            .saturating_add(u64::from(self.frame_size));
        let last = desc.addr.saturating_add(u64::from(desc.len));
        if end > self.umem.len as u64 || last > end {
            return &[];
        }
        // SAFETY: `addr..last` lies inside the UMEM mapping (checked above),
        // which lives as long as `self`, and the frame is on this side, so
        // the kernel does not write it meanwhile; the shared borrow of
        // `self` keeps `frame_mut` from being called while it lives.
        unsafe {
            std::slice::from_raw_parts(
                self.umem.ptr.as_ptr().add(desc.addr as usize),
                desc.len as usize,
            )
        }
    }

    /// Gives a received frame back unsent.
    pub(crate) fn give_back(&mut self, addr: u64) {
        let base = self.base(addr);
        self.free.push(base);
    }

    /// Queues frame `addr`, now `len` bytes of reply, for sending; `false`
    /// (and the frame given back) when the TX ring is full.
    pub(crate) fn send(&mut self, addr: u64, len: u32) -> bool {
        let queued = self.tx.push(Desc {
            addr,
            len,
            options: 0,
        });
        if !queued {
            self.give_back(addr);
        }
        queued
    }

    /// Hands the frames queued with [`send`](Xsk::send) to the kernel, and
    /// wakes it to send them where it asks to be woken: again while each
    /// wake-up sends some (in copy mode the kernel sends at most 32 per
    /// wake-up, then answers `EAGAIN`), and no more once one sends none (a
    /// zero-copy driver sends later, on its own). What is left then goes
    /// with the next flush or the next receive ([`Xsk::kick_pending`]).
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        self.tx.submit();
        while self.tx.needs_wakeup() {
            let before = self.tx.pending();
            if before == 0 {
                break;
            }
            self.kick()?;
            if self.tx.pending() >= before {
                break;
            }
        }
        Ok(())
    }

    /// Wakes the kernel for frames still waiting in the TX ring, if any.
    pub(crate) fn kick_pending(&mut self) -> io::Result<()> {
        if self.tx.pending() > 0 && self.tx.needs_wakeup() {
            self.kick()?;
        }
        Ok(())
    }

    /// One empty `sendto`, which makes the kernel send from the TX ring.
    /// Its "try again" answers are not errors: what was not sent stays in
    /// the ring.
    fn kick(&self) -> io::Result<()> {
        // SAFETY: an empty send on the socket: no buffer, no address.
        let rc = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                std::ptr::null(),
                0,
                libc::MSG_DONTWAIT,
                std::ptr::null(),
                0,
            )
        };
        if rc >= 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EAGAIN | libc::EBUSY | libc::ENOBUFS) => Ok(()),
            _ => Err(err),
        }
    }

    /// Waits up to `timeout` for frames to receive (or for `other` to be
    /// readable); returns whether each is ready.
    pub(crate) fn wait(
        &mut self,
        other: Option<RawFd>,
        timeout: Duration,
    ) -> io::Result<(bool, bool)> {
        let mut fds = [
            libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: other.unwrap_or(-1),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let millis = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: `fds` is a live array of two `pollfd`s (a negative fd is
        // ignored by `poll`), which the kernel writes only the `revents` of.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, millis) };
        match cvt(rc) {
            Ok(_) => Ok((fds[0].revents != 0, fds[1].revents != 0)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok((false, false)),
            Err(e) => Err(e),
        }
    }

    /// The kernel's drop counters for this socket.
    pub(crate) fn statistics(&self) -> io::Result<XdpStatistics> {
        let mut stats = XdpStatistics::default();
        let mut len = std::mem::size_of::<XdpStatistics>() as libc::socklen_t;
        // SAFETY: `stats` is a live, writable `XdpStatistics` of the length
        // given; an older kernel writes fewer of its fields.
        cvt(unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                SOL_XDP,
                XDP_STATISTICS,
                std::ptr::from_mut(&mut stats).cast(),
                &mut len,
            )
        })?;
        Ok(stats)
    }
}

/// Sets socket option `name` of level `SOL_XDP` to `value`.
fn set<T>(fd: RawFd, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` is a live `T` of the length given, which the kernel
    // only reads.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            SOL_XDP,
            name,
            std::ptr::from_ref(value).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    })
    .map(drop)
}
