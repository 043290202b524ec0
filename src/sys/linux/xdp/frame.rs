//! Ethernet frames that carry UDP datagrams, as an AF_XDP socket receives
//! them: every field is checked before any is trusted, and the frame is
//! turned into the reply in place. No `unsafe`: a frame is a byte slice.
//!
//! The XDP program passes to the kernel what this engine does not serve
//! (other protocols, addresses and ports, fragments, IP options, IPv6
//! extension headers, VLAN tags, frames for another MAC address); [`parse`]
//! checks all of that again, and what the program does not look at: the
//! lengths (an IP or UDP length longer than the frame) and the IPv4 header
//! checksum. A frame it refuses is dropped and counted.
//!
//! Incoming UDP checksums are verified only when the server asks
//! ([`Target::verify`]): a veth peer hands over the partial checksum its
//! sender's offload never completed, and NICs report a bad checksum in
//! metadata an XDP program cannot read on every driver. A UDP checksum of
//! zero over IPv6 is always refused (RFC 8200 forbids it). Replies always
//! carry full checksums.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Range;

/// The Ethernet header's length (no VLAN tag).
pub(crate) const ETH_LEN: usize = 14;
const IPV4_LEN: usize = 20;
const IPV6_LEN: usize = 40;
const UDP_LEN: usize = 8;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const PROTO_UDP: u8 = 17;
/// The TTL (IPv4) or hop limit (IPv6) of replies, as Linux's default.
pub(crate) const REPLY_HOP_LIMIT: u8 = 64;

/// The headers in front of a UDP payload, by IP version.
pub(crate) const fn header_len(v6: bool) -> usize {
    ETH_LEN + if v6 { IPV6_LEN } else { IPV4_LEN } + UDP_LEN
}

/// Why a frame is not served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reject {
    /// Shorter than its Ethernet, IP and UDP headers.
    Truncated,
    /// Not IPv4 or IPv6 (ARP, a VLAN tag, ...), or an IP version field
    /// that disagrees with the Ethernet type.
    NotIp,
    /// An IPv4 header with options.
    IpOptions,
    /// A fragment.
    Fragment,
    /// Not UDP, or an IPv6 extension header before it.
    NotUdp,
    /// An IP or UDP length longer than the frame, shorter than its headers,
    /// or a UDP length longer than the IP payload.
    BadLength,
    /// A wrong IPv4 header checksum.
    BadChecksum,
    /// A UDP checksum of zero over IPv6.
    ZeroChecksum,
    /// To another address or port than the server's.
    NotOurs,
    /// A wrong UDP checksum (checked when asked).
    BadUdpChecksum,
}

/// Where the server listens: its port, and the addresses it owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Target {
    pub(crate) port: u16,
    pub(crate) v4: Option<Ipv4Addr>,
    pub(crate) v6: Option<Ipv6Addr>,
    /// The interface's MAC address: frames to any other are not ours.
    pub(crate) mac: Option<[u8; 6]>,
    /// Verify UDP checksums (other than IPv6's zero, always refused).
    pub(crate) verify: bool,
}

/// A frame that [`parse`] accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Datagram {
    /// The sender.
    pub(crate) peer: SocketAddr,
    /// Where it was sent (one of the [`Target`]'s addresses and its port).
    pub(crate) local: SocketAddr,
    /// The UDP payload's place in the frame.
    pub(crate) payload: Range<usize>,
    /// The TOS byte (IPv4) or traffic class (IPv6).
    pub(crate) tos: u8,
    /// The TTL (IPv4) or hop limit (IPv6).
    pub(crate) ttl: u8,
}

impl Datagram {
    /// Whether it came over IPv6.
    pub(crate) fn is_v6(&self) -> bool {
        self.local.is_ipv6()
    }
}

fn be16(frame: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]))
}

fn octets<const N: usize>(frame: &[u8], at: usize) -> Option<[u8; N]> {
    frame.get(at..at + N)?.try_into().ok()
}

/// The one's complement sum of `bytes` as 16-bit big-endian words (an odd
/// last byte padded with zero), added to `acc`, not yet folded.
fn sum16(mut acc: u64, bytes: &[u8]) -> u64 {
    let mut words = bytes.chunks_exact(2);
    for word in &mut words {
        acc += u64::from(u16::from_be_bytes([word[0], word[1]]));
    }
    if let [last] = words.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

/// Folds a sum into 16 bits and complements it: the Internet checksum.
fn checksum(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    // The fold leaves at most 16 bits.
    !(acc as u16)
}

/// Checks `frame` and finds its sender, destination and payload; a frame
/// to anywhere but `target` is [`Reject::NotOurs`].
pub(crate) fn parse(frame: &[u8], target: &Target) -> Result<Datagram, Reject> {
    let ethertype = be16(frame, 12).ok_or(Reject::Truncated)?;
    if target
        .mac
        .is_some_and(|mac| frame.get(..6) != Some(&mac[..]))
    {
        return Err(Reject::NotOurs);
    }
    let (peer_ip, local_ip, l4, udp_room, tos, ttl): (IpAddr, IpAddr, usize, usize, u8, u8) =
        match ethertype {
            ETHERTYPE_IPV4 => {
                let header = frame
                    .get(ETH_LEN..ETH_LEN + IPV4_LEN)
                    .ok_or(Reject::Truncated)?;
                if frame.len() < header_len(false) {
                    return Err(Reject::Truncated);
                }
                match header[0] {
                    0x45 => {}
                    b if b >> 4 == 4 => return Err(Reject::IpOptions),
                    _ => return Err(Reject::NotIp),
                }
                if header[9] != PROTO_UDP {
                    return Err(Reject::NotUdp);
                }
                let total = usize::from(u16::from_be_bytes([header[2], header[3]]));
                if total < IPV4_LEN + UDP_LEN || ETH_LEN + total > frame.len() {
                    return Err(Reject::BadLength);
                }
                // More fragments, or an offset: any piece of a fragmented one.
                if u16::from_be_bytes([header[6], header[7]]) & 0x3fff != 0 {
                    return Err(Reject::Fragment);
                }
                if checksum(sum16(0, header)) != 0 {
                    return Err(Reject::BadChecksum);
                }
                let src = Ipv4Addr::from(octets::<4>(header, 12).ok_or(Reject::Truncated)?);
                let dst = Ipv4Addr::from(octets::<4>(header, 16).ok_or(Reject::Truncated)?);
                if target.v4 != Some(dst) {
                    return Err(Reject::NotOurs);
                }
                let (tos, ttl) = (header[1], header[8]);
                (
                    src.into(),
                    dst.into(),
                    ETH_LEN + IPV4_LEN,
                    total - IPV4_LEN,
                    tos,
                    ttl,
                )
            }
            ETHERTYPE_IPV6 => {
                let header = frame
                    .get(ETH_LEN..ETH_LEN + IPV6_LEN)
                    .ok_or(Reject::Truncated)?;
                if frame.len() < header_len(true) {
                    return Err(Reject::Truncated);
                }
                if header[0] >> 4 != 6 {
                    return Err(Reject::NotIp);
                }
                if header[6] != PROTO_UDP {
                    return Err(Reject::NotUdp);
                }
                let payload = usize::from(u16::from_be_bytes([header[4], header[5]]));
                if payload < UDP_LEN || ETH_LEN + IPV6_LEN + payload > frame.len() {
                    return Err(Reject::BadLength);
                }
                let src = Ipv6Addr::from(octets::<16>(header, 8).ok_or(Reject::Truncated)?);
                let dst = Ipv6Addr::from(octets::<16>(header, 24).ok_or(Reject::Truncated)?);
                if target.v6 != Some(dst) {
                    return Err(Reject::NotOurs);
                }
                let class = (header[0] << 4) | (header[1] >> 4);
                (
                    src.into(),
                    dst.into(),
                    ETH_LEN + IPV6_LEN,
                    payload,
                    class,
                    header[7],
                )
            }
            _ => return Err(Reject::NotIp),
        };
    let sport = be16(frame, l4).ok_or(Reject::Truncated)?;
    let dport = be16(frame, l4 + 2).ok_or(Reject::Truncated)?;
    let udp_len = usize::from(be16(frame, l4 + 4).ok_or(Reject::Truncated)?);
    if udp_len < UDP_LEN || udp_len > udp_room {
        return Err(Reject::BadLength);
    }
    if local_ip.is_ipv6() && be16(frame, l4 + 6) == Some(0) {
        return Err(Reject::ZeroChecksum);
    }
    if dport != target.port {
        return Err(Reject::NotOurs);
    }
    if target.verify && be16(frame, l4 + 6) != Some(0) {
        let pseudo = match (peer_ip, local_ip) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => sum16(sum16(0, &src.octets()), &dst.octets()),
            (IpAddr::V6(src), IpAddr::V6(dst)) => sum16(sum16(0, &src.octets()), &dst.octets()),
            _ => return Err(Reject::NotIp),
        };
        let udp = frame.get(l4..l4 + udp_len).ok_or(Reject::BadLength)?;
        let sum = sum16(pseudo + u64::from(PROTO_UDP) + udp_len as u64, udp);
        if checksum(sum) != 0 {
            return Err(Reject::BadUdpChecksum);
        }
    }
    Ok(Datagram {
        peer: SocketAddr::new(peer_ip, sport),
        local: SocketAddr::new(local_ip, dport),
        payload: l4 + UDP_LEN..l4 + udp_len,
        tos,
        ttl,
    })
}

/// The largest reply that fits a frame of `room` bytes behind the headers
/// of `v6`.
pub(crate) fn reply_room(room: usize, v6: bool) -> usize {
    room.saturating_sub(header_len(v6))
        .min(usize::from(u16::MAX) - 48)
}

/// Turns the request frame `frame`, which [`parse`] made `datagram` of,
/// into its reply in place: the Ethernet, IP and UDP addresses swapped,
/// `reply` as the payload (its bytes already copied to
/// `header_len(v6)..`), lengths, TTL and checksums written, and the TOS
/// byte (IPv4) or traffic class (IPv6) set to `tos` (the request's is not
/// echoed: its ECN bits were the sender's; an IPv6 flow label is
/// cleared). Returns the reply frame's length, or `None` if `reply_len`
/// does not fit `frame`.
pub(crate) fn make_reply(
    frame: &mut [u8],
    datagram: &Datagram,
    reply_len: usize,
    tos: u8,
) -> Option<usize> {
    let v6 = datagram.is_v6();
    if reply_len > reply_room(frame.len(), v6) {
        return None;
    }
    let l4 = header_len(v6) - UDP_LEN;
    let udp_len = UDP_LEN + reply_len;
    let end = l4 + udp_len;
    let frame = frame.get_mut(..end)?;
    // Ethernet: back to where it came from.
    let (dst_mac, rest) = frame.split_at_mut(6);
    dst_mac.swap_with_slice(rest.get_mut(..6)?);
    let udp_len16 = u16::try_from(udp_len).ok()?;
    let pseudo = if v6 {
        let (src, dst) = frame.get_mut(22..54)?.split_at_mut(16);
        src.swap_with_slice(dst);
        frame
            .get_mut(18..20)?
            .copy_from_slice(&udp_len16.to_be_bytes());
        frame
            .get_mut(14..18)?
            .copy_from_slice(&[0x60 | tos >> 4, tos << 4, 0, 0]);
        frame[21] = REPLY_HOP_LIMIT;
        sum16(0, frame.get(22..54)?)
    } else {
        let (src, dst) = frame.get_mut(26..34)?.split_at_mut(4);
        src.swap_with_slice(dst);
        let total = u16::try_from(IPV4_LEN + udp_len).ok()?;
        frame.get_mut(16..18)?.copy_from_slice(&total.to_be_bytes());
        frame[15] = tos;
        frame[22] = REPLY_HOP_LIMIT;
        frame.get_mut(24..26)?.copy_from_slice(&[0, 0]);
        let sum = checksum(sum16(0, frame.get(14..34)?));
        frame.get_mut(24..26)?.copy_from_slice(&sum.to_be_bytes());
        sum16(0, frame.get(26..34)?)
    };
    let (src_port, dst_port) = frame.get_mut(l4..l4 + 4)?.split_at_mut(2);
    src_port.swap_with_slice(dst_port);
    frame
        .get_mut(l4 + 4..l4 + 6)?
        .copy_from_slice(&udp_len16.to_be_bytes());
    frame.get_mut(l4 + 6..l4 + 8)?.copy_from_slice(&[0, 0]);
    let pseudo = pseudo + u64::from(PROTO_UDP) + udp_len as u64;
    // A computed zero goes as all ones: zero means "no checksum".
    let sum = match checksum(sum16(pseudo, frame.get(l4..end)?)) {
        0 => 0xffff,
        sum => sum,
    };
    frame
        .get_mut(l4 + 6..l4 + 8)?
        .copy_from_slice(&sum.to_be_bytes());
    Some(end)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
    pub(crate) const SERVER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
    const V4_SERVER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
    const V4_CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
    const V6_SERVER: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);
    const V6_CLIENT: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 2);
    const PORT: u16 = 5300;

    fn target() -> Target {
        Target {
            port: PORT,
            v4: Some(V4_SERVER),
            v6: Some(V6_SERVER),
            mac: Some(SERVER_MAC),
            verify: true,
        }
    }

    /// A well-formed frame from the client to the server, with full
    /// checksums.
    pub(crate) fn request(v6: bool, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&SERVER_MAC);
        f.extend_from_slice(&CLIENT_MAC);
        let udp_len = (UDP_LEN + payload.len()) as u16;
        let mut udp = Vec::new();
        udp.extend_from_slice(&40000u16.to_be_bytes());
        udp.extend_from_slice(&PORT.to_be_bytes());
        udp.extend_from_slice(&udp_len.to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(payload);
        let pseudo = if v6 {
            f.extend_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
            f.extend_from_slice(&[0x60, 0, 0, 0]);
            f.extend_from_slice(&udp_len.to_be_bytes());
            f.extend_from_slice(&[PROTO_UDP, 64]);
            f.extend_from_slice(&V6_CLIENT.octets());
            f.extend_from_slice(&V6_SERVER.octets());
            sum16(0, &f[22..54])
        } else {
            f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
            let total = (IPV4_LEN as u16 + udp_len).to_be_bytes();
            f.extend_from_slice(&[0x45, 0, total[0], total[1], 0, 1, 0x40, 0, 64, PROTO_UDP]);
            f.extend_from_slice(&[0, 0]);
            f.extend_from_slice(&V4_CLIENT.octets());
            f.extend_from_slice(&V4_SERVER.octets());
            let sum = checksum(sum16(0, &f[14..34]));
            f[24..26].copy_from_slice(&sum.to_be_bytes());
            sum16(0, &f[26..34])
        };
        let sum = checksum(sum16(pseudo + 17 + u64::from(udp_len), &udp));
        udp[6..8].copy_from_slice(&sum.to_be_bytes());
        f.extend_from_slice(&udp);
        f
    }

    /// Recomputes the IPv4 header checksum of a frame a test changed.
    fn fix_ipv4_checksum(f: &mut [u8]) {
        f[24..26].copy_from_slice(&[0, 0]);
        let sum = checksum(sum16(0, &f[14..34]));
        f[24..26].copy_from_slice(&sum.to_be_bytes());
    }

    #[test]
    fn a_well_formed_request_is_read_whole() {
        for v6 in [false, true] {
            let f = request(v6, b"Michael");
            let d = parse(&f, &target()).expect("parsed");
            assert_eq!(&f[d.payload.clone()], b"Michael");
            assert_eq!(d.peer.port(), 40000);
            assert_eq!(d.local.port(), PORT);
            let (peer, local): (IpAddr, IpAddr) = match v6 {
                true => (V6_CLIENT.into(), V6_SERVER.into()),
                false => (V4_CLIENT.into(), V4_SERVER.into()),
            };
            assert_eq!((d.peer.ip(), d.local.ip()), (peer, local));
            assert_eq!(d.ttl, 64);
            assert_eq!(d.tos, 0);
            let mut marked = f.clone();
            match v6 {
                // Traffic class 0xb8 (EF): across the version nibble.
                true => {
                    marked[14] = 0x6b;
                    marked[15] = 0x80;
                }
                false => {
                    marked[15] = 0xb8;
                    fix_ipv4_checksum(&mut marked);
                }
            }
            assert_eq!(parse(&marked, &target()).map(|d| d.tos), Ok(0xb8));
            // Ethernet padding after the datagram is not payload.
            let mut padded = f.clone();
            padded.extend_from_slice(&[0xee; 20]);
            assert_eq!(
                parse(&padded, &target()).expect("padded").payload,
                d.payload
            );
        }
    }

    #[test]
    fn every_truncation_is_refused() {
        for v6 in [false, true] {
            let f = request(v6, b"x");
            for len in 0..f.len() {
                let got = parse(&f[..len], &target());
                assert!(
                    matches!(got, Err(Reject::Truncated | Reject::BadLength)),
                    "v6 {v6}, {len} bytes: {got:?}"
                );
            }
        }
    }

    #[test]
    fn lengths_longer_than_the_frame_or_shorter_than_the_headers_are_refused() {
        for v6 in [false, true] {
            let f = request(v6, b"Tracy");
            let l4 = header_len(v6) - UDP_LEN;
            let ip_len_at = if v6 { 18 } else { 16 };
            let ip_len = u16::from_be_bytes([f[ip_len_at], f[ip_len_at + 1]]);
            for bad in [0, 1, 7, ip_len + 1, u16::MAX] {
                let mut g = f.clone();
                g[ip_len_at..ip_len_at + 2].copy_from_slice(&bad.to_be_bytes());
                if !v6 {
                    fix_ipv4_checksum(&mut g);
                }
                assert_eq!(parse(&g, &target()), Err(Reject::BadLength), "ip {bad}");
            }
            let udp_len = u16::from_be_bytes([f[l4 + 4], f[l4 + 5]]);
            for bad in [0, 7, udp_len + 1, u16::MAX] {
                let mut g = f.clone();
                g[l4 + 4..l4 + 6].copy_from_slice(&bad.to_be_bytes());
                assert_eq!(parse(&g, &target()), Err(Reject::BadLength), "udp {bad}");
            }
        }
    }

    #[test]
    fn what_the_kernel_should_have_is_refused() {
        let f = request(false, b"Sarah");
        // A bad IPv4 header checksum.
        let mut g = f.clone();
        g[24] ^= 0x01;
        assert_eq!(parse(&g, &target()), Err(Reject::BadChecksum));
        // IP options (IHL 6).
        let mut g = f.clone();
        g[14] = 0x46;
        fix_ipv4_checksum(&mut g);
        assert_eq!(parse(&g, &target()), Err(Reject::IpOptions));
        // Fragments: more fragments, or an offset.
        for flags in [0x2000u16, 0x0001, 0x3fff] {
            let mut g = f.clone();
            g[20..22].copy_from_slice(&flags.to_be_bytes());
            fix_ipv4_checksum(&mut g);
            assert_eq!(parse(&g, &target()), Err(Reject::Fragment), "{flags:#x}");
        }
        // Don't fragment alone is a whole datagram.
        assert!(parse(&f, &target()).is_ok());
        // Not UDP.
        let mut g = f.clone();
        g[23] = 6;
        fix_ipv4_checksum(&mut g);
        assert_eq!(parse(&g, &target()), Err(Reject::NotUdp));
        // A VLAN tag, ARP, a version field that disagrees.
        for ethertype in [0x8100u16, 0x88a8, 0x0806] {
            let mut g = f.clone();
            g[12..14].copy_from_slice(&ethertype.to_be_bytes());
            assert_eq!(parse(&g, &target()), Err(Reject::NotIp), "{ethertype:#x}");
        }
        let mut g = f.clone();
        g[14] = 0x65;
        fix_ipv4_checksum(&mut g);
        assert_eq!(parse(&g, &target()), Err(Reject::NotIp));
        // Another port, another address.
        let mut g = f.clone();
        g[36..38].copy_from_slice(&(PORT + 1).to_be_bytes());
        assert_eq!(parse(&g, &target()), Err(Reject::NotOurs));
        let mut g = f.clone();
        g[33] = 9;
        fix_ipv4_checksum(&mut g);
        assert_eq!(parse(&g, &target()), Err(Reject::NotOurs));
        let v6_only = Target {
            v4: None,
            ..target()
        };
        assert_eq!(parse(&f, &v6_only), Err(Reject::NotOurs));
    }

    #[test]
    fn a_frame_for_another_mac_or_with_a_bad_udp_checksum_is_refused() {
        for v6 in [false, true] {
            let f = request(v6, b"Michael");
            let mut g = f.clone();
            g[5] ^= 1;
            assert_eq!(parse(&g, &target()), Err(Reject::NotOurs));
            let any_mac = Target {
                mac: None,
                ..target()
            };
            assert!(parse(&g, &any_mac).is_ok());
            // A flipped payload bit: refused when checked, served when not.
            let mut g = f.clone();
            let last = g.len() - 1;
            g[last] ^= 0x40;
            assert_eq!(parse(&g, &target()), Err(Reject::BadUdpChecksum));
            let unchecked = Target {
                verify: false,
                ..target()
            };
            assert!(parse(&g, &unchecked).is_ok());
        }
        // IPv4's "no checksum" (zero) is accepted even when checking.
        let mut f = request(false, b"Tracy");
        f[40..42].copy_from_slice(&[0, 0]);
        assert!(parse(&f, &target()).is_ok());
    }

    #[test]
    fn ipv6_extension_headers_and_a_zero_checksum_are_refused() {
        let f = request(true, b"Sarah");
        let mut g = f.clone();
        g[20] = 0; // hop-by-hop options
        assert_eq!(parse(&g, &target()), Err(Reject::NotUdp));
        let mut g = f.clone();
        g[60..62].copy_from_slice(&[0, 0]);
        assert_eq!(parse(&g, &target()), Err(Reject::ZeroChecksum));
        let mut g = f.clone();
        g[53] = 9;
        assert_eq!(parse(&g, &target()), Err(Reject::NotOurs));
        let v4_only = Target {
            v6: None,
            ..target()
        };
        assert_eq!(parse(&f, &v4_only), Err(Reject::NotOurs));
    }

    #[test]
    fn no_frame_of_arbitrary_bytes_panics() {
        // Every length to 128, with bytes that keep changing.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..=128 {
            for _ in 0..64 {
                let mut f: Vec<u8> = (0..len)
                    .map(|_| {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        seed as u8
                    })
                    .collect();
                if len >= 14 && seed % 2 == 0 {
                    let ethertype = if seed % 4 == 0 {
                        ETHERTYPE_IPV4
                    } else {
                        ETHERTYPE_IPV6
                    };
                    f[12..14].copy_from_slice(&ethertype.to_be_bytes());
                }
                if let Ok(d) = parse(&f, &target()) {
                    assert!(d.payload.end <= f.len());
                }
            }
        }
    }

    /// Checks a reply frame as the client's kernel would: headers, lengths
    /// and both checksums.
    pub(crate) fn check_reply(reply: &[u8], v6: bool, payload: &[u8]) {
        assert_eq!(&reply[..6], &CLIENT_MAC);
        assert_eq!(&reply[6..12], &SERVER_MAC);
        let l4 = header_len(v6) - UDP_LEN;
        let udp_len = UDP_LEN + payload.len();
        assert_eq!(reply.len(), l4 + udp_len);
        let pseudo = if v6 {
            assert_eq!(&reply[22..38], &V6_SERVER.octets());
            assert_eq!(&reply[38..54], &V6_CLIENT.octets());
            assert_eq!(usize::from(be16(reply, 18).unwrap_or(0)), udp_len);
            sum16(0, &reply[22..54])
        } else {
            assert_eq!(&reply[26..30], &V4_SERVER.octets());
            assert_eq!(&reply[30..34], &V4_CLIENT.octets());
            assert_eq!(
                usize::from(be16(reply, 16).unwrap_or(0)),
                IPV4_LEN + udp_len
            );
            assert_eq!(
                checksum(sum16(0, &reply[14..34])),
                0,
                "IPv4 header checksum"
            );
            sum16(0, &reply[26..34])
        };
        assert_eq!(be16(reply, l4), Some(PORT));
        assert_eq!(be16(reply, l4 + 2), Some(40000));
        assert_eq!(usize::from(be16(reply, l4 + 4).unwrap_or(0)), udp_len);
        assert_ne!(be16(reply, l4 + 6), Some(0));
        let sum = checksum(sum16(pseudo + 17 + udp_len as u64, &reply[l4..]));
        assert_eq!(sum, 0, "UDP checksum");
        assert_eq!(&reply[l4 + UDP_LEN..], payload);
    }

    #[test]
    fn a_reply_is_built_in_place_with_full_checksums() {
        for v6 in [false, true] {
            for reply in [&b""[..], b"Hello, Michael!", &[0xff; 1001], &[0; 3]] {
                let mut f = request(v6, b"Michael");
                let d = parse(&f, &target()).expect("parsed");
                f.resize(2048, 0xaa);
                let at = header_len(v6);
                f[at..at + reply.len()].copy_from_slice(reply);
                let len = make_reply(&mut f, &d, reply.len(), 0xb8).expect("fits");
                check_reply(&f[..len], v6, reply);
                // The TOS or traffic class asked for, the flow label cleared.
                match v6 {
                    true => assert_eq!(&f[14..18], &[0x6b, 0x80, 0, 0]),
                    false => assert_eq!(f[15], 0xb8),
                }
            }
        }
    }

    #[test]
    fn a_reply_that_does_not_fit_the_frame_is_refused() {
        for v6 in [false, true] {
            let mut f = request(v6, b"x");
            let d = parse(&f, &target()).expect("parsed");
            let room = reply_room(f.len(), v6);
            assert_eq!(room, 1);
            assert_eq!(make_reply(&mut f.clone(), &d, room + 1, 0), None);
            assert_eq!(make_reply(&mut f.clone(), &d, usize::MAX, 0), None);
            assert!(make_reply(&mut f, &d, room, 0).is_some());
        }
    }
}
