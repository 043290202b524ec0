//! Control messages: the address a datagram arrived on (`IP_PKTINFO`,
//! `IPV6_PKTINFO`), its TOS or traffic class and TTL or hop limit where
//! asked for, the source a reply goes out from, and `UDP_SEGMENT`.
//!
//! Control buffers are read and written at offsets computed here, with every
//! access checked against the buffer's length, rather than with the
//! `CMSG_NXTHDR` walk, which reads the length field of the next header
//! before checking that it lies inside the buffer.

use std::io;
use std::mem;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::ptr;

use libc::{c_int, c_void, cmsghdr, in_pktinfo, in6_pktinfo, socklen_t};
use socket2::Socket;

/// A control-message buffer of `N` bytes, aligned for `cmsghdr`.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
pub(crate) struct CmsgBuf<const N: usize>(pub(crate) [u8; N]);

impl<const N: usize> CmsgBuf<N> {
    pub(crate) const EMPTY: Self = CmsgBuf([0; N]);
}

/// Room for what one received datagram can carry. The server asks only for
/// its arrival address, but a socket handed in through `from_std` may also
/// have asked for timestamps (`SO_TIMESTAMPNS`, 32 bytes; `SO_TIMESTAMPING`,
/// 64), the drop counter (`SO_RXQ_OVFL`, 24), TTL or hop limit, TOS or
/// traffic class (24 each), the original destination (`IP_RECVORIGDSTADDR`,
/// 32 or 48), IPv4 options (up to 56) and the pktinfo itself (32 or 40):
/// about 350 bytes in all. If a datagram carries more still, the kernel cuts
/// the rest (`MSG_CTRUNC`) and the arrival address is used if it came.
pub(crate) const RECV_ROOM: usize = 512;
/// Control messages of one received datagram.
pub(crate) type RecvCmsg = CmsgBuf<RECV_ROOM>;

/// Room for what one outgoing message carries: a source address (an
/// `in6_pktinfo`, the larger) and a segment size.
pub(crate) const SEND_ROOM: usize =
    space(mem::size_of::<in6_pktinfo>()) + space(mem::size_of::<u16>());
/// Control messages of one outgoing message.
pub(crate) type SendCmsg = CmsgBuf<SEND_ROOM>;

// The buffers are read and written as `cmsghdr`s (reads and writes are
// unaligned-safe, but the kernel expects them aligned): they must be
// aligned for one, and the send buffer must hold the largest set of messages `write`
// produces.
const _: () = assert!(mem::align_of::<RecvCmsg>() >= mem::align_of::<cmsghdr>());
const _: () = assert!(mem::align_of::<SendCmsg>() >= mem::align_of::<cmsghdr>());
const _: () =
    assert!(SEND_ROOM >= space(mem::size_of::<in_pktinfo>()) + space(mem::size_of::<u16>()));
const _: () = assert!(RECV_ROOM >= 350);

pub(crate) use crate::sys::Arrival;

/// Asks the kernel to report, with each datagram, the address it arrived
/// on: `IP_PKTINFO` for IPv4 (also on a dual-stack IPv6 socket, for its
/// IPv4 peers) and `IPV6_RECVPKTINFO` for IPv6.
pub(crate) fn enable_pktinfo(socket: &Socket, ipv6: bool) -> io::Result<()> {
    let dual_stack = ipv6 && !socket.only_v6()?;
    if !ipv6 || dual_stack {
        set_flag(socket, libc::IPPROTO_IP, libc::IP_PKTINFO)?;
    }
    if ipv6 {
        set_flag(socket, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO)?;
    }
    Ok(())
}

fn set_flag(socket: &Socket, level: c_int, name: c_int) -> io::Result<()> {
    set_int(socket, level, name, 1)
}

fn set_int(socket: &Socket, level: c_int, name: c_int, value: c_int) -> io::Result<()> {
    // SAFETY: `value` is a live `c_int` and the length given is its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            ptr::from_ref(&value).cast::<c_void>(),
            mem::size_of::<c_int>() as socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `CMSG_ALIGN`: control messages are aligned to the size of a `long`.
const fn align(len: usize) -> usize {
    let to = mem::size_of::<usize>();
    (len + to - 1) & !(to - 1)
}

/// Bytes from the start of a control message to its data.
const HEADER: usize = align(mem::size_of::<cmsghdr>());

/// `CMSG_SPACE`: the room a control message with `len` bytes of data takes.
const fn space(len: usize) -> usize {
    HEADER + align(len)
}

/// The control messages in the first `len` bytes of `control`, as
/// (level, type, data). Safe for any contents and any `len`: every read is
/// checked against the buffer (a `len` past its end counts as its end), and
/// a malformed message ends the walk.
fn messages<const N: usize>(
    control: &CmsgBuf<N>,
    len: usize,
) -> impl Iterator<Item = (c_int, c_int, &[u8])> {
    let len = len.min(N);
    let mut offset = 0;
    std::iter::from_fn(move || {
        if offset + HEADER > len {
            return None;
        }
        let cmsg = control.0.get(offset..len).and_then(read::<cmsghdr>)?;
        // `cmsg_len` is `size_t` on glibc, `socklen_t` on musl.
        #[allow(clippy::unnecessary_cast)]
        let cmsg_len = cmsg.cmsg_len as usize;
        // `offset + HEADER <= len`, so `len - offset` does not wrap, and a
        // garbage `cmsg_len` cannot overflow the sum.
        if cmsg_len < HEADER || cmsg_len > len - offset {
            offset = len;
            return None;
        }
        let data = control.0.get(offset + HEADER..offset + cmsg_len)?;
        offset += align(cmsg_len);
        Some((cmsg.cmsg_level, cmsg.cmsg_type, data))
    })
}

/// Reads the arrival address from the first `len` bytes of `control`,
/// skipping every other kind of control message (see [`messages`]).
pub(crate) fn parse<const N: usize>(control: &CmsgBuf<N>, len: usize) -> Arrival {
    let mut arrival = Arrival::default();
    for (level, kind, data) in messages(control, len) {
        match (level, kind) {
            (libc::IPPROTO_IP, libc::IP_PKTINFO) => {
                if let Some(info) = read::<in_pktinfo>(data) {
                    // The local address the packet was accepted on (for a
                    // unicast packet, its destination).
                    let ip = Ipv4Addr::from(u32::from_be(info.ipi_spec_dst.s_addr));
                    arrival.local = Some(IpAddr::V4(ip));
                    arrival.ifindex = u32::try_from(info.ipi_ifindex).unwrap_or(0);
                }
            }
            (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
                if let Some(info) = read::<in6_pktinfo>(data) {
                    let ip = Ipv6Addr::from(info.ipi6_addr.s6_addr);
                    // A reply cannot come from a multicast address: let the
                    // kernel choose.
                    arrival.local = (!ip.is_multicast()).then_some(IpAddr::V6(ip));
                    arrival.ifindex = info.ipi6_ifindex;
                }
            }
            // IPv4's TOS comes as one byte; its TTL, and IPv6's traffic
            // class and hop limit, as a C `int`.
            (libc::IPPROTO_IP, libc::IP_TOS) => {
                arrival.tos = data.first().copied().or(arrival.tos);
            }
            (libc::IPPROTO_IP, libc::IP_TTL) => {
                arrival.ttl = read_byte_int(data).or(arrival.ttl);
            }
            (libc::IPPROTO_IPV6, libc::IPV6_TCLASS) => {
                arrival.tos = read_byte_int(data).or(arrival.tos);
            }
            (libc::IPPROTO_IPV6, libc::IPV6_HOPLIMIT) => {
                arrival.ttl = read_byte_int(data).or(arrival.ttl);
            }
            _ => {}
        }
    }
    arrival
}

/// Turns receive offload (`UDP_GRO`) off: with it, the kernel hands
/// several datagrams of one peer over as one buffer, which a server would
/// take for one request. A kernel without the option (before 5.0) has it
/// off already.
pub(crate) fn disable_gro(socket: &Socket) -> io::Result<()> {
    match set_int(socket, libc::SOL_UDP, libc::UDP_GRO, 0) {
        Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => Ok(()),
        done => done,
    }
}

/// A C `int` control message that holds a byte's value (a TTL, a hop
/// limit, a traffic class); `None` if it is short or out of range.
fn read_byte_int(data: &[u8]) -> Option<u8> {
    read::<c_int>(data).and_then(|value| u8::try_from(value).ok())
}

/// Asks the kernel to report, with each datagram, its TOS byte or traffic
/// class and its TTL or hop limit (`IP_RECVTOS`, `IP_RECVTTL`, and on IPv6
/// `IPV6_RECVTCLASS`, `IPV6_RECVHOPLIMIT`; a dual-stack socket gets both
/// families' options, for its IPv4 peers), and the arrival interface
/// (see [`enable_pktinfo`]).
pub(crate) fn set_metadata(socket: &Socket, ipv6: bool, on: bool) -> io::Result<()> {
    // Arrival addresses stay on once asked for: a wildcard-bound socket
    // needs them whatever else is read.
    if on {
        enable_pktinfo(socket, ipv6)?;
    }
    let value = c_int::from(on);
    if !ipv6 || !socket.only_v6()? {
        socket.set_recv_tos_v4(on)?;
        set_int(socket, libc::IPPROTO_IP, libc::IP_RECVTTL, value)?;
    }
    if ipv6 {
        socket.set_recv_tclass_v6(on)?;
        set_int(socket, libc::IPPROTO_IPV6, libc::IPV6_RECVHOPLIMIT, value)?;
    }
    Ok(())
}

/// Whether the first `len` bytes of `control`, from a receive of the error
/// queue (`MSG_ERRQUEUE`), report an ICMP or ICMPv6 "port unreachable":
/// an extended error (`IP_RECVERR`, `IPV6_RECVERR`) of `ECONNREFUSED`
/// from an ICMP message.
pub(crate) fn is_port_unreachable<const N: usize>(control: &CmsgBuf<N>, len: usize) -> bool {
    messages(control, len).any(|(level, kind, data)| {
        let extended = matches!(
            (level, kind),
            (libc::IPPROTO_IP, libc::IP_RECVERR) | (libc::IPPROTO_IPV6, libc::IPV6_RECVERR)
        );
        extended
            && read::<libc::sock_extended_err>(data).is_some_and(|err| {
                err.ee_errno == libc::ECONNREFUSED as u32
                    && matches!(
                        err.ee_origin,
                        libc::SO_EE_ORIGIN_ICMP | libc::SO_EE_ORIGIN_ICMP6
                    )
            })
    })
}

/// Asks the kernel to queue ICMP errors with the address they concern
/// (`IP_RECVERR`, and `IPV6_RECVERR` on IPv6), so that an unconnected
/// socket learns which destination refused.
pub(crate) fn enable_recverr(socket: &Socket, ipv6: bool) -> io::Result<()> {
    if ipv6 {
        set_flag(socket, libc::IPPROTO_IPV6, libc::IPV6_RECVERR)?;
        // A dual-stack socket's IPv4 destinations report through IPv4.
        if !socket.only_v6()? {
            set_flag(socket, libc::IPPROTO_IP, libc::IP_RECVERR)?;
        }
        Ok(())
    } else {
        set_flag(socket, libc::IPPROTO_IP, libc::IP_RECVERR)
    }
}

/// Plain C values that control messages carry, read from and written to
/// byte buffers.
///
/// # Safety
///
/// Implementors promise that the type has no padding bytes and that every
/// bit pattern of its size is a valid value (integers and arrays of them
/// only), so reading one from initialised bytes gives a valid value and
/// writing one leaves initialised bytes behind.
unsafe trait Plain: Copy {}
// SAFETY: `cmsg_len` (`size_t`, or `socklen_t` beside an explicit padding
// field on musl), `cmsg_level` and `cmsg_type` (`c_int`): integers that
// fill the struct.
unsafe impl Plain for cmsghdr {}
// SAFETY: a `c_int` and two `in_addr` (one `u32` each): 12 bytes, no
// padding.
unsafe impl Plain for in_pktinfo {}
// SAFETY: an `in6_addr` (16 bytes) and a `c_uint`: 20 bytes, no padding.
unsafe impl Plain for in6_pktinfo {}
// SAFETY: integers.
unsafe impl Plain for u16 {}
// SAFETY: an integer.
unsafe impl Plain for c_int {}
// SAFETY: an integer.
unsafe impl Plain for u8 {}
// SAFETY: `ee_errno`, `ee_info`, `ee_data` (`u32`) and four `u8`s between
// them: 16 bytes, no padding.
unsafe impl Plain for libc::sock_extended_err {}

/// Reads a `T` from the start of `data`, if it is long enough.
fn read<T: Plain>(data: &[u8]) -> Option<T> {
    if data.len() < mem::size_of::<T>() {
        return None;
    }
    // SAFETY: `data` holds at least `size_of::<T>()` initialised bytes, the
    // read is unaligned-safe, and `T: Plain` makes any bit pattern valid.
    Some(unsafe { ptr::read_unaligned(data.as_ptr().cast::<T>()) })
}

/// Writes the control messages for one outgoing datagram: the source
/// address to send from (`from`) and the segment size for a segmented send.
/// Returns how many bytes of `control` are used (0: none needed).
pub(crate) fn write(control: &mut SendCmsg, from: &Arrival, segment: Option<u16>) -> usize {
    let mut used = 0;
    match from.local {
        Some(IpAddr::V4(ip)) => {
            let info = in_pktinfo {
                ipi_ifindex: 0,
                ipi_spec_dst: libc::in_addr {
                    s_addr: u32::from(ip).to_be(),
                },
                ipi_addr: libc::in_addr { s_addr: 0 },
            };
            used = push(control, used, libc::IPPROTO_IP, libc::IP_PKTINFO, info);
        }
        Some(IpAddr::V6(ip)) => {
            let link_local = ip.segments()[0] & 0xffc0 == 0xfe80;
            let info = in6_pktinfo {
                ipi6_addr: libc::in6_addr {
                    s6_addr: ip.octets(),
                },
                // A link-local source only makes sense on its own link.
                ipi6_ifindex: if link_local { from.ifindex } else { 0 },
            };
            used = push(control, used, libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, info);
        }
        None => {}
    }
    if let Some(size) = segment {
        used = push(control, used, libc::SOL_UDP, libc::UDP_SEGMENT, size);
    }
    used
}

/// Appends one control message at `offset`; returns the offset after it
/// (unchanged when it would not fit, which `SEND_ROOM` rules out for what
/// this module writes).
fn push<T: Plain, const N: usize>(
    control: &mut CmsgBuf<N>,
    offset: usize,
    level: c_int,
    kind: c_int,
    value: T,
) -> usize {
    let len = HEADER + mem::size_of::<T>();
    let end = offset + align(len);
    let Some(space) = control.0.get_mut(offset..end) else {
        return offset;
    };
    space.fill(0);
    // SAFETY: `cmsghdr` is a plain C struct, valid when zeroed.
    let mut header: cmsghdr = unsafe { mem::zeroed() };
    header.cmsg_len = len as _;
    header.cmsg_level = level;
    header.cmsg_type = kind;
    // SAFETY: `space` spans `align(HEADER + size_of::<T>())` bytes, so the
    // header fits at its start and the value right after `HEADER`; both
    // writes are unaligned-safe, and both types are `Plain`, without
    // padding, so the buffer's bytes stay initialised.
    unsafe {
        ptr::write_unaligned(space.as_mut_ptr().cast::<cmsghdr>(), header);
        ptr::write_unaligned(space.as_mut_ptr().add(HEADER).cast::<T>(), value);
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_written_parses_back() {
        for local in [
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)),
            IpAddr::V6("2001:db8::7".parse().expect("address")),
            IpAddr::V6("fe80::1".parse().expect("address")),
        ] {
            let arrival = Arrival {
                local: Some(local),
                ifindex: 3,
                ..Arrival::default()
            };
            let mut control = SendCmsg::EMPTY;
            let used = write(&mut control, &arrival, Some(1200));
            assert!(used > 0 && used <= SEND_ROOM);
            let parsed = parse(&control, used);
            assert_eq!(parsed.local, Some(local));
        }
        let mut empty = SendCmsg::EMPTY;
        assert_eq!(write(&mut empty, &Arrival::default(), None), 0);
    }

    /// The value of an `int` socket option.
    fn get_int(socket: &Socket, level: c_int, name: c_int) -> io::Result<c_int> {
        let mut value: c_int = 0;
        let mut len = mem::size_of::<c_int>() as socklen_t;
        // SAFETY: `value` and `len` are live, and `len` is `value`'s size.
        let rc = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                level,
                name,
                ptr::from_mut(&mut value).cast::<c_void>(),
                &mut len,
            )
        };
        if rc == 0 {
            Ok(value)
        } else {
            Err(io::Error::last_os_error())
        }
    }

    #[test]
    fn receive_offload_is_turned_off() {
        let socket =
            Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).expect("socket");
        let Ok(()) = set_int(&socket, libc::SOL_UDP, libc::UDP_GRO, 1) else {
            eprintln!("note: this kernel has no UDP_GRO; nothing to turn off");
            return;
        };
        assert_eq!(get_int(&socket, libc::SOL_UDP, libc::UDP_GRO).ok(), Some(1));
        disable_gro(&socket).expect("UDP_GRO off");
        assert_eq!(get_int(&socket, libc::SOL_UDP, libc::UDP_GRO).ok(), Some(0));
    }

    #[test]
    fn tos_and_ttl_are_read_in_either_family() {
        let mut control = RecvCmsg::EMPTY;
        let mut used = push(&mut control, 0, libc::IPPROTO_IP, libc::IP_TOS, 0xb9u8);
        used = push(
            &mut control,
            used,
            libc::IPPROTO_IP,
            libc::IP_TTL,
            17 as c_int,
        );
        let parsed = parse(&control, used);
        assert_eq!((parsed.tos, parsed.ttl), (Some(0xb9), Some(17)));
        let mut control = RecvCmsg::EMPTY;
        used = push(
            &mut control,
            0,
            libc::IPPROTO_IPV6,
            libc::IPV6_TCLASS,
            2 as c_int,
        );
        used = push(
            &mut control,
            used,
            libc::IPPROTO_IPV6,
            libc::IPV6_HOPLIMIT,
            255 as c_int,
        );
        let parsed = parse(&control, used);
        assert_eq!((parsed.tos, parsed.ttl), (Some(2), Some(255)));
        // Out of a byte's range, or cut short: not read.
        let mut control = RecvCmsg::EMPTY;
        used = push(
            &mut control,
            0,
            libc::IPPROTO_IPV6,
            libc::IPV6_HOPLIMIT,
            256 as c_int,
        );
        used = push(
            &mut control,
            used,
            libc::IPPROTO_IPV6,
            libc::IPV6_TCLASS,
            -1 as c_int,
        );
        used = push(&mut control, used, libc::IPPROTO_IP, libc::IP_TTL, 9u8);
        let parsed = parse(&control, used);
        assert_eq!((parsed.tos, parsed.ttl), (None, None));
    }

    #[test]
    fn garbage_is_ignored() {
        let mut control: RecvCmsg = CmsgBuf([0xff; RECV_ROOM]);
        assert_eq!(parse(&control, RECV_ROOM), Arrival::default());
        control.0 = [0; RECV_ROOM];
        assert_eq!(parse(&control, 3), Arrival::default());
        assert_eq!(parse(&control, 10_000), Arrival::default());
    }

    #[test]
    fn a_huge_length_after_a_good_message_is_ignored() {
        let arrival = Arrival {
            local: Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7))),
            ..Arrival::default()
        };
        let mut sent = SendCmsg::EMPTY;
        let used = write(&mut sent, &arrival, None);
        let mut control: RecvCmsg = CmsgBuf([0xff; RECV_ROOM]);
        control.0[..used].copy_from_slice(&sent.0[..used]);
        assert_eq!(parse(&control, RECV_ROOM), arrival);
    }
}
