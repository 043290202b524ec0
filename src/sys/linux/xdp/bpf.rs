//! The `bpf()` system calls the XDP engine needs (feature `xdp`): an
//! `XSKMAP`, an XDP program loaded from instructions built at run time (no
//! ELF object, no libbpf, no clang), and a BPF link that attaches it to an
//! interface. The kernel removes a link, and so detaches the program, when
//! its last descriptor closes: a server that dies never leaves the
//! interface redirecting into nothing.
//!
//! `union bpf_attr` is filled by byte offset into a zeroed buffer; the
//! kernel takes a longer one as long as the tail it does not know is zero.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;

const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_XSKMAP: u32 = 17;
const BPF_PROG_TYPE_XDP: u32 = 6;
/// `enum bpf_attach_type`'s `BPF_XDP`.
const BPF_XDP: u32 = 37;
const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

/// The size of the verifier's log kept for an error.
const LOG_SIZE: usize = 64 * 1024;

/// One BPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Insn {
    pub(crate) code: u8,
    /// The destination register in the low 4 bits, the source in the high.
    pub(crate) regs: u8,
    pub(crate) off: i16,
    pub(crate) imm: i32,
}

/// Where an XDP program runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum XdpMode {
    /// In the driver, before any socket buffer is made.
    Native,
    /// In the kernel's generic hook, after the socket buffer is made: every
    /// driver has it.
    Generic,
}

/// `union bpf_attr`, zeroed, filled by byte offset.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Attr {
        Attr([0; 128])
    }

    fn put(&mut self, at: usize, bytes: &[u8]) -> &mut Attr {
        if let Some(field) = self.0.get_mut(at..at + bytes.len()) {
            field.copy_from_slice(bytes);
        }
        self
    }

    fn u32(&mut self, at: usize, value: u32) -> &mut Attr {
        self.put(at, &value.to_ne_bytes())
    }

    fn u64(&mut self, at: usize, value: u64) -> &mut Attr {
        self.put(at, &value.to_ne_bytes())
    }
}

/// Makes the `bpf()` call `cmd` with `attr`.
fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, writable, 8-byte aligned buffer of the size
    // passed, zeroed beyond the fields set; every pointer stored in it (by
    // the callers below) points to memory that outlives this call. The
    // kernel reads and writes only within those.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            std::mem::size_of::<Attr>() as libc::c_long,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

/// Takes ownership of the descriptor a `bpf()` call returned.
fn owned(rc: libc::c_long) -> io::Result<OwnedFd> {
    let fd = RawFd::try_from(rc).map_err(|_| io::Error::other("bpf() returned no descriptor"))?;
    // SAFETY: the kernel returned `fd` as a new descriptor of this process
    // (`BPF_MAP_CREATE`, `BPF_PROG_LOAD`, `BPF_LINK_CREATE` do), which
    // nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Creates an `XSKMAP` of `entries` slots (one per receive queue), named
/// `name` (15 bytes at most are kept).
pub(crate) fn xskmap(entries: u32, name: &str) -> io::Result<OwnedFd> {
    let mut attr = Attr::new();
    // map_type, key_size, value_size, max_entries; map_name[16] at 28.
    attr.u32(0, BPF_MAP_TYPE_XSKMAP)
        .u32(4, 4)
        .u32(8, 4)
        .u32(12, entries);
    let name = name.as_bytes();
    attr.put(28, &name[..name.len().min(15)]);
    owned(bpf(BPF_MAP_CREATE, &mut attr)?)
}

/// Creates an `ARRAY` map of `entries` values of 8 bytes (zeroed), named
/// `name`. Used only by `benches/xdp.rs`, which includes this module for
/// its reply counter.
#[allow(dead_code)]
pub(crate) fn array_u64(entries: u32, name: &str) -> io::Result<OwnedFd> {
    let mut attr = Attr::new();
    attr.u32(0, BPF_MAP_TYPE_ARRAY)
        .u32(4, 4)
        .u32(8, 8)
        .u32(12, entries);
    let name = name.as_bytes();
    attr.put(28, &name[..name.len().min(15)]);
    owned(bpf(BPF_MAP_CREATE, &mut attr)?)
}

/// The value in slot `key` of an `ARRAY` map of 8-byte values made by
/// [`array_u64`]. Used only by `benches/xdp.rs`.
#[allow(dead_code)]
pub(crate) fn array_u64_get(map: &OwnedFd, key: u32) -> io::Result<u64> {
    let mut value = 0u64;
    let mut attr = Attr::new();
    // map_fd at 0, key at 8, value at 16.
    attr.u32(0, map.as_raw_fd() as u32)
        .u64(8, std::ptr::from_ref(&key) as u64)
        .u64(16, std::ptr::from_mut(&mut value) as u64);
    bpf(BPF_MAP_LOOKUP_ELEM, &mut attr)?;
    Ok(value)
}

/// Puts AF_XDP socket `socket` in slot `key` of `map`.
pub(crate) fn xskmap_set(map: &OwnedFd, key: u32, socket: RawFd) -> io::Result<()> {
    let value = u32::try_from(socket).map_err(|_| io::Error::other("a negative descriptor"))?;
    let mut attr = Attr::new();
    // map_fd at 0, key at 8, value at 16, flags (BPF_ANY) at 24.
    attr.u32(0, map.as_raw_fd() as u32)
        .u64(8, std::ptr::from_ref(&key) as u64)
        .u64(16, std::ptr::from_ref(&value) as u64);
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
}

/// Loads `insns` as an XDP program named `name` under `license`. A
/// refusal comes with the verifier's log.
pub(crate) fn load_xdp(
    insns: &[Insn],
    name: &str,
    license: &CStr,
) -> Result<OwnedFd, (io::Error, String)> {
    let count = u32::try_from(insns.len())
        .map_err(|_| (io::Error::other("too many instructions"), String::new()))?;
    let mut log = vec![0u8; LOG_SIZE];
    let mut attr = Attr::new();
    // prog_type 0, insn_cnt 4, insns 8, license 16, log_level 24,
    // log_size 28, log_buf 32, prog_name[16] 48, expected_attach_type 68.
    attr.u32(0, BPF_PROG_TYPE_XDP)
        .u32(4, count)
        .u64(8, insns.as_ptr() as u64)
        .u64(16, license.as_ptr() as u64)
        .u32(24, 1)
        .u32(28, LOG_SIZE as u32)
        .u64(32, log.as_mut_ptr() as u64)
        .u32(68, BPF_XDP);
    let name = name.as_bytes();
    attr.put(48, &name[..name.len().min(15)]);
    let loaded = bpf(BPF_PROG_LOAD, &mut attr);
    match loaded.and_then(owned) {
        Ok(fd) => Ok(fd),
        Err(err) => {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            Err((err, String::from_utf8_lossy(&log[..end]).into_owned()))
        }
    }
}

/// Attaches XDP program `prog` to interface `ifindex` in `mode` with a BPF
/// link; the program stays attached while the link's descriptor is open.
pub(crate) fn attach_xdp(prog: &OwnedFd, ifindex: u32, mode: XdpMode) -> io::Result<OwnedFd> {
    let flags = match mode {
        XdpMode::Native => XDP_FLAGS_DRV_MODE,
        XdpMode::Generic => XDP_FLAGS_SKB_MODE,
    };
    let mut attr = Attr::new();
    // link_create: prog_fd 0, target_ifindex 4, attach_type 8, flags 12.
    attr.u32(0, prog.as_raw_fd() as u32)
        .u32(4, ifindex)
        .u32(8, BPF_XDP)
        .u32(12, flags);
    owned(bpf(BPF_LINK_CREATE, &mut attr)?)
}

/// The index of the interface named `name`.
pub(crate) fn ifindex(name: &str) -> io::Result<u32> {
    let name = std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in the name"))?;
    // SAFETY: `name` is a live NUL-terminated string for the call, which
    // only reads it.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(index)
}

/// Moves the calling thread into a new network namespace, and returns its
/// thread id (which names the namespace to `ip link set ... netns`).
#[cfg(test)]
pub(crate) fn enter_new_netns() -> io::Result<u32> {
    // SAFETY: `unshare` takes a flag word and touches no memory of ours; with
    // CLONE_NEWNET it changes only this thread's network namespace.
    // `gettid` takes nothing.
    let (rc, tid) = unsafe { (libc::unshare(libc::CLONE_NEWNET), libc::gettid()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    u32::try_from(tid).map_err(|_| io::Error::other("a negative thread id"))
}
