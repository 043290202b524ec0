//! What the XDP engine asks of the interface and the host, through a
//! socket of the server's (so that the answers are those of its network
//! namespace, which sysfs need not be): the MTU, the MAC address, the
//! number of receive queues, and every local and broadcast address.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;

use socket2::Socket;

const ETHTOOL_GCHANNELS: u32 = 0x3c;

// The interface ioctls, in the type `ioctl` takes on this libc (`c_ulong`
// on glibc, `c_int` on musl, where libc's own constants are `c_ulong`).
const SIOCGIFMTU: libc::Ioctl = 0x8921;
const SIOCGIFHWADDR: libc::Ioctl = 0x8927;
const SIOCETHTOOL: libc::Ioctl = 0x8946;

/// `struct ethtool_channels`.
#[repr(C)]
#[derive(Debug, Default)]
struct Channels {
    cmd: u32,
    max_rx: u32,
    max_tx: u32,
    max_other: u32,
    max_combined: u32,
    rx_count: u32,
    tx_count: u32,
    other_count: u32,
    combined_count: u32,
}

/// A `struct ifreq` naming `interface`.
fn ifreq(interface: &str) -> io::Result<libc::ifreq> {
    // SAFETY: an all-zero `ifreq` is a valid value of the type (a name of
    // NULs and a zeroed union).
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let name = interface.as_bytes();
    if name.is_empty() || name.len() >= req.ifr_name.len() || name.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not an interface name",
        ));
    }
    for (to, &from) in req.ifr_name.iter_mut().zip(name) {
        // `c_char` is `i8` on some targets, `u8` on others.
        *to = libc::c_char::from_ne_bytes([from]);
    }
    Ok(req)
}

/// Makes the interface ioctl `request` with `req` on `socket`.
fn ioctl(socket: &Socket, request: libc::Ioctl, req: &mut libc::ifreq) -> io::Result<()> {
    // SAFETY: `req` is a live, writable `ifreq` naming an interface; the
    // requests used here read and write only within it (or, for
    // SIOCETHTOOL, within the buffer its data pointer names, which the
    // caller keeps alive for the call).
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), request, std::ptr::from_mut(req)) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The interface's MTU.
pub(crate) fn mtu(socket: &Socket, interface: &str) -> io::Result<u32> {
    let mut req = ifreq(interface)?;
    ioctl(socket, SIOCGIFMTU, &mut req)?;
    // SAFETY: SIOCGIFMTU wrote the union's `ifru_mtu` member.
    let mtu = unsafe { req.ifr_ifru.ifru_mtu };
    u32::try_from(mtu).map_err(|_| io::Error::other("a negative MTU"))
}

/// The interface's MAC address; an error for an interface that is not
/// Ethernet (a tunnel, WireGuard): the engine reads and writes Ethernet
/// headers.
pub(crate) fn mac(socket: &Socket, interface: &str) -> io::Result<[u8; 6]> {
    let mut req = ifreq(interface)?;
    ioctl(socket, SIOCGIFHWADDR, &mut req)?;
    // SAFETY: SIOCGIFHWADDR wrote the union's `ifru_hwaddr` member.
    let hwaddr = unsafe { req.ifr_ifru.ifru_hwaddr };
    if hwaddr.sa_family != libc::ARPHRD_ETHER {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "{interface} is not an Ethernet interface (hardware type {}): \
                 the XDP engine reads and writes Ethernet frames",
                hwaddr.sa_family
            ),
        ));
    }
    let data = hwaddr.sa_data;
    let mut mac = [0u8; 6];
    for (to, from) in mac.iter_mut().zip(data) {
        *to = from.to_ne_bytes()[0];
    }
    Ok(mac)
}

/// The interface's receive queues, as its driver reports its channels
/// (`ethtool -l`); 1 where the driver does not say.
pub(crate) fn rx_queues(socket: &Socket, interface: &str) -> u32 {
    let Ok(mut req) = ifreq(interface) else {
        return 1;
    };
    let mut channels = Channels {
        cmd: ETHTOOL_GCHANNELS,
        ..Channels::default()
    };
    req.ifr_ifru.ifru_data = std::ptr::from_mut(&mut channels).cast();
    match ioctl(socket, SIOCETHTOOL, &mut req) {
        Ok(()) => (channels.rx_count + channels.combined_count).max(1),
        Err(_) => 1,
    }
}

/// The host's addresses as the XDP engine needs them: those it must not
/// answer as sources (any of its own, and broadcast addresses), and
/// what the interface has.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Host {
    /// Every address of every interface, and every IPv4 broadcast
    /// address, sorted (for [`is_refused_source`]'s binary search).
    pub(crate) not_sources: Vec<IpAddr>,
    /// The interface is a loopback interface.
    pub(crate) loopback: bool,
    /// The interface was found.
    pub(crate) found: bool,
}

/// Reads the host's addresses (`getifaddrs`), for `interface`.
pub(crate) fn host(interface: &str) -> io::Result<Host> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: `list` is a live pointer for `getifaddrs` to store the list
    // in; it is freed below with `freeifaddrs`, once.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut host = Host::default();
    let mut entry = list;
    while !entry.is_null() {
        // SAFETY: `entry` is a node of the list `getifaddrs` made, not yet
        // freed; its name is a NUL-terminated string and its address
        // pointers are null or point to socket addresses of the family
        // they say, all alive until `freeifaddrs`.
        let (name, addr, netmask, broadcast, flags, next) = unsafe {
            let e = &*entry;
            (
                std::ffi::CStr::from_ptr(e.ifa_name),
                sockaddr_ip(e.ifa_addr),
                sockaddr_ip(e.ifa_netmask),
                sockaddr_ip(e.ifa_ifu),
                e.ifa_flags,
                e.ifa_next,
            )
        };
        // An address with a label (`ip addr add ... label eth0:1`) is
        // listed under `eth0:1`.
        let base = name
            .to_bytes()
            .split(|&b| b == b':')
            .next()
            .unwrap_or_default();
        let ours = base == interface.as_bytes();
        if ours {
            host.found = true;
            host.loopback |= flags & libc::IFF_LOOPBACK as u32 != 0;
        }
        if let Some(addr) = addr {
            host.not_sources.push(addr);
        }
        if flags & libc::IFF_BROADCAST as u32 != 0 {
            if let Some(broadcast @ IpAddr::V4(_)) = broadcast {
                host.not_sources.push(broadcast);
            }
            // The subnet's broadcast address, whether or not one was set
            // (`ip addr add` without `brd`): the kernel treats it as one.
            if let (Some(IpAddr::V4(addr)), Some(IpAddr::V4(mask))) = (addr, netmask) {
                let (addr, mask) = (u32::from(addr), u32::from(mask));
                if mask.count_zeros() >= 2 {
                    host.not_sources
                        .push(IpAddr::V4(Ipv4Addr::from(addr | !mask)));
                }
            }
        }
        entry = next;
    }
    // SAFETY: `list` came from `getifaddrs` and is freed once; no pointer
    // into it is kept (every address was copied out).
    unsafe { libc::freeifaddrs(list) };
    host.not_sources.sort_unstable();
    host.not_sources.dedup();
    Ok(host)
}

/// An IPv4 or IPv6 address from a socket address `getifaddrs` gave.
///
/// # Safety
///
/// `addr` is null or points to a live socket address of the family its
/// first field says, of that family's full size.
unsafe fn sockaddr_ip(addr: *const libc::sockaddr) -> Option<IpAddr> {
    if addr.is_null() {
        return None;
    }
    // SAFETY: per the contract, a live socket address of the family it
    // says: its family field can be read, and then the whole of it as the
    // structure of that family.
    unsafe {
        match i32::from((*addr).sa_family) {
            libc::AF_INET => {
                let v4 = &*addr.cast::<libc::sockaddr_in>();
                Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr))))
            }
            libc::AF_INET6 => {
                let v6 = &*addr.cast::<libc::sockaddr_in6>();
                Some(IpAddr::V6(Ipv6Addr::from(v6.sin6_addr.s6_addr)))
            }
            _ => None,
        }
    }
}

/// Whether the kernel would refuse `source` as the source of a datagram
/// that came in from the network (a martian, or one of the host's own):
/// unspecified, loopback, multicast, broadcast, reserved (240.0.0.0/4,
/// 0.0.0.0/8), IPv4-mapped, or listed in `host` (sorted).
pub(crate) fn is_refused_source(source: IpAddr, host: &[IpAddr]) -> bool {
    let martian = match source {
        IpAddr::V4(v4) => {
            v4.is_unspecified()
                || v4.is_loopback()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.octets()[0] == 0
                || v4.octets()[0] >= 240
        }
        IpAddr::V6(v6) => {
            v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || v6.to_ipv4_mapped().is_some()
        }
    };
    martian || host.binary_search(&source).is_ok()
}
