//! The AF_XDP engine (feature `xdp`), end to end: two network namespaces
//! joined by a veth pair that each test makes (and that vanish with the
//! test's threads), addresses from the benchmarking range 198.18.0.0/15 and
//! 2001:2::/48, a server attached to one end and clients on the other.
//!
//! They need root: `cargo test` lists them as ignored; `.ci/run` runs them
//! as root with `cargo test --features xdp --test xdp -- --ignored`.
#![cfg(all(target_os = "linux", feature = "xdp"))]

mod util;

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use udp_greet::xdp::{Xdp, XdpMode};
use udp_greet::{GreetClient, GreetServer, HandlerPool, ServerBuilder, ServerHandle, Stats};
use util::netns::{
    CLIENT_MAC, CLIENT_V4, CLIENT_V6, GUARD, Pair, SERVER_MAC, SERVER_V4, SERVER_V6, ip,
    kernel_udp_in, pair,
};

const CHILD: &str = "UDP_GREET_XDP_CHILD";

/// Starts an AF_XDP server on `xs0` at `addr` in the server's namespace.
fn xdp_server(pair: &Pair, addr: SocketAddr, max_datagram: usize) -> ServerHandle {
    xdp_server_with(pair, addr, move |b| b.max_datagram_size(max_datagram))
}

/// Starts an AF_XDP server on `xs0` at `addr`, with `settings`.
fn xdp_server_with(
    pair: &Pair,
    addr: SocketAddr,
    settings: impl FnOnce(ServerBuilder) -> ServerBuilder + Send + 'static,
) -> ServerHandle {
    pair.server
        .run(move || {
            settings(GreetServer::builder().xdp(Xdp::interface("xs0")))
                .recv_metadata(true)
                .bind(addr)?
                .spawn(udp_greet::greet)
        })
        .unwrap_or_else(|e| panic!("{}", e.report()))
}

/// Starts an AF_XDP server on `xs0` at `local` (port 0) with `handler`.
fn serve_with<H>(pair: &Pair, local: IpAddr, handler: H) -> ServerHandle
where
    H: Fn(udp_greet::Request<'_>, &mut Vec<u8>) -> udp_greet::Action + Send + Sync + 'static,
{
    pair.server
        .run(move || {
            GreetServer::builder()
                .xdp(Xdp::interface("xs0"))
                .bind(SocketAddr::new(local, 0))?
                .spawn(handler)
        })
        .unwrap_or_else(|e| panic!("{}", e.report()))
}

/// Asks `to` once from the client's namespace.
fn ask(pair: &Pair, to: SocketAddr, name: &'static [u8]) -> Vec<u8> {
    pair.client
        .run(move || -> Result<Vec<u8>, udp_greet::Error> {
            let client = GreetClient::builder()
                .initial_timeout(Duration::from_millis(500))
                .call_timeout(GUARD)
                .connect(to)?;
            client.send_recv(name)
        })
        .unwrap_or_else(|e| panic!("{}", e.report()))
}

fn wait_for_stats(server: &ServerHandle, what: &str, done: impl Fn(&Stats) -> bool) -> Stats {
    let deadline = Instant::now() + GUARD;
    loop {
        let stats = server.stats();
        if done(&stats) {
            return stats;
        }
        assert!(
            Instant::now() < deadline,
            "gave up waiting for {what}: {stats:?}"
        );
        thread::yield_now();
    }
}

#[test]
#[ignore = "needs root, iproute2 and XDP: run by .ci/run"]
fn greetings_go_through_the_xdp_queues_v4_and_v6() {
    let pair = pair();
    let cases = [
        (IpAddr::V4(SERVER_V4), None),
        (IpAddr::V6(SERVER_V6), None),
        // With a pool, replies leave through the kernel socket.
        (IpAddr::V4(SERVER_V4), Some(HandlerPool::threads(2))),
    ];
    for (local, pool) in cases {
        let server = xdp_server_with(&pair, SocketAddr::new(local, 0), move |b| {
            b.handler_pool(pool)
        });
        // veth has native XDP.
        assert_eq!(server.xdp_mode(), Some(XdpMode::Native));
        let addr = server.local_addr();
        let before = pair.server.run(kernel_udp_in);
        for name in [&b"Michael"[..], b"Tracy", b"Sarah"] {
            let reply = ask(&pair, addr, name);
            let mut expected = b"Hello, ".to_vec();
            expected.extend_from_slice(name);
            expected.push(b'!');
            assert_eq!(reply, expected, "{}", String::from_utf8_lossy(&reply));
        }
        // None of them went through the kernel's UDP stack.
        let after = pair.server.run(kernel_udp_in);
        assert_eq!(after, before, "UDP datagrams the kernel delivered");
        let stats = server
            .shutdown()
            .unwrap_or_else(|e| panic!("{}", e.report()));
        assert_eq!((stats.received, stats.replied), (3, 3), "{stats:?}");
        assert_eq!(stats.accounted(), stats.received, "{stats:?}");
        assert_eq!(stats.malformed, 0, "{stats:?}");
    }
    // Shut down: detached, so the interface has no program.
    let shown = pair
        .server
        .run(|| ip(&["-d", "link", "show", "dev", "xs0"]));
    let shown = shown.unwrap_or_else(|e| panic!("{e}"));
    assert!(!shown.contains("prog/xdp"), "{shown}");
}

#[test]
#[ignore = "needs root, iproute2 and XDP: run by .ci/run"]
fn what_the_program_passes_reaches_the_kernel_socket() {
    let pair = pair();
    let server = xdp_server(&pair, SocketAddr::new(SERVER_V4.into(), 0), 65_507);
    let addr = server.local_addr();
    let before = pair.server.run(kernel_udp_in);
    // 4000 bytes: fragmented on a 1500-byte link, so the kernel gets it.
    let reply = pair.client.run(move || -> io::Result<Vec<u8>> {
        let socket = UdpSocket::bind(SocketAddr::new(CLIENT_V4.into(), 0))?;
        socket.connect(addr)?;
        socket.set_read_timeout(Some(GUARD))?;
        socket.send(&[b'x'; 4000])?;
        let mut buf = vec![0u8; 8000];
        let n = socket.recv(&mut buf)?;
        buf.truncate(n);
        Ok(buf)
    });
    let reply = reply.unwrap_or_else(|e| panic!("{e}"));
    assert!(
        reply.starts_with(b"Hello, xxx"),
        "{:?}",
        &reply[..20.min(reply.len())]
    );
    // A reply of that size does not fit a frame either: it left through
    // the kernel socket, whole.
    assert_eq!(reply.len(), b"Hello, !".len() + 4000);
    // The kernel reassembled it and delivered it to the server's socket.
    assert_eq!(pair.server.run(kernel_udp_in), before + 1);
    let stats = server
        .shutdown()
        .unwrap_or_else(|e| panic!("{}", e.report()));
    assert_eq!((stats.received, stats.replied), (1, 1), "{stats:?}");
}

/// The one's complement sum of `bytes` as big-endian 16-bit words.
fn sum16(mut acc: u32, bytes: &[u8]) -> u32 {
    for pair in bytes.chunks(2) {
        acc += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// A frame from the client (port 40001) to the server's `port`, with full
/// checksums; `options`: 4 bytes of IPv4 options (NOPs).
fn udp_frame(v6: bool, port: u16, payload: &[u8], options: bool) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&SERVER_MAC);
    f.extend_from_slice(&CLIENT_MAC);
    let udp_len = (8 + payload.len()) as u16;
    let mut udp = Vec::new();
    udp.extend_from_slice(&40001u16.to_be_bytes());
    udp.extend_from_slice(&port.to_be_bytes());
    udp.extend_from_slice(&udp_len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let pseudo = if v6 {
        f.extend_from_slice(&0x86ddu16.to_be_bytes());
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&udp_len.to_be_bytes());
        f.extend_from_slice(&[17, 64]);
        f.extend_from_slice(&CLIENT_V6.octets());
        f.extend_from_slice(&SERVER_V6.octets());
        sum16(0, &f[22..54])
    } else {
        let header = if options { 24 } else { 20 };
        f.extend_from_slice(&0x0800u16.to_be_bytes());
        let total = (header + udp_len).to_be_bytes();
        let ihl = 0x40 | (header / 4) as u8;
        f.extend_from_slice(&[ihl, 0, total[0], total[1], 0, 1, 0x40, 0, 64, 17, 0, 0]);
        f.extend_from_slice(&CLIENT_V4.octets());
        f.extend_from_slice(&SERVER_V4.octets());
        if options {
            f.extend_from_slice(&[1, 1, 1, 1]);
        }
        let sum = fold(sum16(0, &f[14..14 + usize::from(header)]));
        f[24..26].copy_from_slice(&sum.to_be_bytes());
        sum16(0, &f[26..34])
    };
    let sum = fold(sum16(pseudo + 17 + u32::from(udp_len), &udp));
    udp[6..8].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&udp);
    f
}

/// Recomputes the IPv4 header checksum of a frame changed after it was
/// made.
fn fix_ipv4_checksum(f: &mut [u8]) {
    f[24..26].copy_from_slice(&[0, 0]);
    let sum = fold(sum16(0, &f[14..34]));
    f[24..26].copy_from_slice(&sum.to_be_bytes());
}

/// A packet socket for `protocol` (network order), and the address of
/// `xc0` for it.
fn packet_socket(protocol: u16) -> io::Result<(std::os::fd::OwnedFd, libc::sockaddr_ll)> {
    // SAFETY: `socket` takes plain integers and touches no memory.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(protocol),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is the new socket, owned by nothing else.
    let socket = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let name = std::ffi::CString::new("xc0").map_err(io::Error::other)?;
    // SAFETY: `name` is a live NUL-terminated string, only read.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    // SAFETY: an all-zero `sockaddr_ll` is a valid value of the type.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = protocol;
    addr.sll_ifindex = ifindex as i32;
    Ok((socket, addr))
}

/// Sends each of `frames` as it is, on `xc0`, through a packet socket.
fn send_frames(frames: Vec<Vec<u8>>) -> io::Result<()> {
    let (socket, mut addr) = packet_socket(0)?;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&SERVER_MAC);
    for (i, frame) in frames.into_iter().enumerate() {
        // SAFETY: `frame` and `addr` are live for the call, of the lengths
        // given; the kernel only reads them.
        let rc = unsafe {
            libc::sendto(
                std::os::fd::AsRawFd::as_raw_fd(&socket),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                std::ptr::from_ref(&addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            let err = io::Error::last_os_error();
            return Err(io::Error::new(
                err.kind(),
                format!("frame {i} ({} bytes): {err}", frame.len()),
            ));
        }
    }
    Ok(())
}

/// Receives on `socket` until replies with each of `expected` have come
/// (in any order); fails on any other.
fn expect_replies(socket: &UdpSocket, expected: &[&[u8]]) -> Result<(), String> {
    let mut missing: Vec<&[u8]> = expected.to_vec();
    let mut buf = [0u8; 2048];
    while !missing.is_empty() {
        let n = socket
            .recv(&mut buf)
            .map_err(|e| format!("still waiting for {missing:?}: {e}"))?;
        match missing.iter().position(|m| *m == &buf[..n]) {
            Some(i) => {
                missing.remove(i);
            }
            None => {
                return Err(format!(
                    "an unexpected reply {:?}",
                    String::from_utf8_lossy(&buf[..n])
                ));
            }
        }
    }
    Ok(())
}

#[test]
#[ignore = "needs root, iproute2 and XDP: run by .ci/run"]
fn hostile_frames_are_passed_to_the_kernel_or_dropped_and_counted() {
    let pair = pair();
    // IPv4: a server that takes datagrams of up to 64 bytes.
    let server = xdp_server(&pair, SocketAddr::new(SERVER_V4.into(), 0), 64);
    let port = server.local_addr().port();
    let good = |payload: &[u8]| udp_frame(false, port, payload, false);
    let mut frames = Vec::new();
    // Truncated IP and UDP headers (the kernel drops them). A frame
    // shorter than its Ethernet header cannot be sent on veth at all (the
    // sender's kernel refuses it); the unit tests of the frame check cover
    // every length.
    let whole = good(b"cut");
    for len in [14, 14 + 10, 14 + 20 + 4] {
        frames.push(whole[..len].to_vec());
    }
    // An IP length longer than the frame.
    let mut f = good(b"long ip");
    f[16..18].copy_from_slice(&400u16.to_be_bytes());
    fix_ipv4_checksum(&mut f);
    frames.push(f);
    // A bad IP header checksum.
    let mut f = good(b"bad sum");
    f[24] ^= 0x5a;
    frames.push(f);
    // A UDP length longer than the IP payload.
    let mut f = good(b"long udp");
    f[38..40].copy_from_slice(&300u16.to_be_bytes());
    frames.push(f);
    // A first fragment (more fragments follow, never).
    let mut f = good(b"fragment");
    f[20..22].copy_from_slice(&0x2000u16.to_be_bytes());
    fix_ipv4_checksum(&mut f);
    frames.push(f);
    // IP options: the kernel's, answered through the kernel socket.
    frames.push(udp_frame(false, port, b"options", true));
    // Another port.
    frames.push(udp_frame(false, port.wrapping_add(1), b"elsewhere", false));
    // A VLAN tag (no VLAN interface: the kernel drops it).
    let mut f = good(b"tagged");
    f.splice(12..12, [0x81, 0x00, 0x00, 0x05]);
    frames.push(f);
    // Larger than the maximum (64 bytes): truncated, counted, unanswered.
    frames.push(good(&[b'L'; 100]));
    // Then a good one, last.
    frames.push(good(b"sentinel"));
    let before = pair.server.run(kernel_udp_in);
    let outcome = pair.client.run(move || -> Result<(), String> {
        let socket =
            UdpSocket::bind(SocketAddr::new(CLIENT_V4.into(), 40001)).map_err(|e| e.to_string())?;
        socket
            .set_read_timeout(Some(GUARD))
            .map_err(|e| e.to_string())?;
        send_frames(frames).map_err(|e| format!("a packet socket on xc0: {e}"))?;
        expect_replies(&socket, &[b"Hello, options!", b"Hello, sentinel!"])
    });
    outcome.unwrap_or_else(|e| panic!("{e}"));
    let stats = wait_for_stats(&server, "every frame dealt with", |s| {
        s.received == 3 && s.malformed == 3 && s.in_flight() == 0
    });
    assert_eq!(
        (stats.replied, stats.truncated, stats.malformed),
        (2, 1, 3),
        "{stats:?}"
    );
    // Only the datagram with options went through the kernel's UDP stack.
    assert_eq!(pair.server.run(kernel_udp_in), before + 1);
    let stats = server
        .shutdown()
        .unwrap_or_else(|e| panic!("{}", e.report()));
    assert_eq!(stats.accounted(), stats.received, "{stats:?}");

    // IPv6: a zero UDP checksum is refused; an extension header passes.
    let server = xdp_server(&pair, SocketAddr::new(SERVER_V6.into(), 0), 1500);
    let port = server.local_addr().port();
    let mut zero = udp_frame(true, port, b"zero", false);
    zero[60..62].copy_from_slice(&[0, 0]);
    // A hop-by-hop header (8 bytes: next header UDP, PadN) before UDP.
    let mut hop = udp_frame(true, port, b"hop", false);
    hop[20] = 0;
    let payload_len = u16::from_be_bytes([hop[18], hop[19]]) + 8;
    hop[18..20].copy_from_slice(&payload_len.to_be_bytes());
    hop.splice(54..54, [17, 0, 1, 4, 0, 0, 0, 0]);
    let frames = vec![zero, hop, udp_frame(true, port, b"sentinel", false)];
    let outcome = pair.client.run(move || -> Result<(), String> {
        let socket =
            UdpSocket::bind(SocketAddr::new(CLIENT_V6.into(), 40001)).map_err(|e| e.to_string())?;
        socket
            .set_read_timeout(Some(GUARD))
            .map_err(|e| e.to_string())?;
        send_frames(frames).map_err(|e| format!("a packet socket on xc0: {e}"))?;
        expect_replies(&socket, &[b"Hello, hop!", b"Hello, sentinel!"])
    });
    outcome.unwrap_or_else(|e| panic!("{e}"));
    let stats = wait_for_stats(&server, "every frame dealt with", |s| {
        s.received == 2 && s.malformed == 1 && s.in_flight() == 0
    });
    assert_eq!((stats.replied, stats.malformed), (2, 1), "{stats:?}");
    server
        .shutdown()
        .unwrap_or_else(|e| panic!("{}", e.report()));
}

/// Not a test: the process `a_killed_server_leaves_the_interface_to_the_kernel`
/// kills. It serves on `xs0` (in the namespace it was started in), says
/// its port on stdout, and waits to be killed (ending by itself after a
/// minute at most). Without `UDP_GREET_XDP_CHILD` set it does nothing.
#[test]
#[ignore = "needs root, iproute2 and XDP: run by .ci/run"]
fn child_serving_until_killed() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    let server = GreetServer::builder()
        .xdp(Xdp::interface("xs0"))
        .bind(SocketAddr::new(SERVER_V4.into(), 0))
        .and_then(|s| s.spawn(udp_greet::greet))
        .unwrap_or_else(|e| panic!("{}", e.report()));
    println!("port {}", server.local_addr().port());
    let until = Instant::now() + 2 * GUARD;
    while Instant::now() < until {
        thread::park_timeout(until - Instant::now());
    }
}

#[test]
#[ignore = "needs root, iproute2 and XDP: run by .ci/run"]
fn a_killed_server_leaves_the_interface_to_the_kernel() {
    use std::io::BufRead;
    let pair = pair();
    let program = std::env::current_exe().expect("the test binary");
    let child = pair.server.run(move || {
        Command::new(program)
            .args([
                "--exact",
                "child_serving_until_killed",
                "--ignored",
                "--nocapture",
            ])
            .env(CHILD, "1")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
    });
    let mut child = child.unwrap_or_else(|e| panic!("cannot start the child: {e}"));
    let stdout = child.stdout.take().expect("the child's stdout");
    let port = std::io::BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find_map(|line| line.strip_prefix("port ")?.parse::<u16>().ok());
    let Some(port) = port else {
        let _ = child.kill();
        panic!("the child never said its port: {:?}", child.wait());
    };
    let addr = SocketAddr::new(SERVER_V4.into(), port);
    let before = pair.server.run(kernel_udp_in);
    assert_eq!(ask(&pair, addr, b"Michael"), b"Hello, Michael!");
    assert_eq!(pair.server.run(kernel_udp_in), before, "served through XDP");
    let attached = pair
        .server
        .run(|| ip(&["-d", "link", "show", "dev", "xs0"]));
    assert!(attached.unwrap_or_default().contains("prog/xdp"));
    // SIGKILL: no shutdown runs.
    child.kill().expect("SIGKILL");
    let status = child.wait().expect("wait");
    assert!(!status.success(), "{status}");
    // The kernel removed the link with the process: the interface has no
    // program (bounded polling: the last reference may go a moment later).
    let deadline = Instant::now() + GUARD;
    loop {
        let shown = pair
            .server
            .run(|| ip(&["-d", "link", "show", "dev", "xs0"]));
        let shown = shown.unwrap_or_else(|e| panic!("{e}"));
        if !shown.contains("prog/xdp") {
            break;
        }
        assert!(Instant::now() < deadline, "still attached: {shown}");
        thread::yield_now();
    }
    // And the kernel path serves again: a plain socket on the same address
    // and port gets what the client sends.
    let (got_tx, got_rx) = mpsc::channel();
    let listening = pair.server.run(move || -> io::Result<()> {
        let socket = UdpSocket::bind(addr)?;
        socket.set_read_timeout(Some(GUARD))?;
        thread::spawn(move || {
            let mut buf = [0u8; 64];
            let _ = got_tx.send(socket.recv_from(&mut buf).map(|(n, _)| buf[..n].to_vec()));
        });
        Ok(())
    });
    listening.unwrap_or_else(|e| panic!("{e}"));
    let sent = pair.client.run(move || -> io::Result<usize> {
        let socket = UdpSocket::bind(SocketAddr::new(CLIENT_V4.into(), 0))?;
        socket.send_to(b"kernel again", addr)
    });
    sent.unwrap_or_else(|e| panic!("{e}"));
    let got = got_rx
        .recv_timeout(GUARD)
        .expect("the plain socket's receive");
    assert_eq!(got.expect("a datagram"), b"kernel again");
}

#[test]
fn an_xdp_server_needs_one_address_of_its_own_and_a_real_interface() {
    let invalid = |result: Result<GreetServer, udp_greet::Error>| match result {
        Err(udp_greet::Error::InvalidConfig { setting, .. }) => setting,
        other => panic!("{other:?}"),
    };
    let builder = || GreetServer::builder().xdp(Xdp::interface("xs0"));
    assert_eq!(invalid(builder().bind("0.0.0.0:0")), "ServerBuilder::xdp");
    assert_eq!(invalid(builder().bind("[::]:0")), "ServerBuilder::xdp");
    assert_eq!(
        invalid(builder().bind_all(["127.0.0.1:0", "127.0.0.2:0"])),
        "ServerBuilder::xdp"
    );
    assert_eq!(
        invalid(builder().allow_handoff(true).bind("127.0.0.1:0")),
        "ServerBuilder::xdp"
    );
    for ring in [0, 1, 63, 100, 32768, u32::MAX] {
        let xdp = Xdp::interface("xs0").ring_size(ring);
        let got = GreetServer::builder().xdp(xdp).bind("127.0.0.1:0");
        assert_eq!(invalid(got), "Xdp::ring_size", "ring {ring}");
    }
    for name in ["", "a/b", "sixteen-bytes-xx"] {
        let got = GreetServer::builder()
            .xdp(Xdp::interface(name))
            .bind("127.0.0.1:0");
        assert_eq!(invalid(got), "Xdp::interface", "{name:?}");
    }
    // An interface that does not exist is named, with what is wrong.
    match GreetServer::builder()
        .xdp(Xdp::interface("nosuchif0"))
        .bind("127.0.0.1:0")
    {
        Err(err @ udp_greet::Error::Xdp { .. }) => {
            let report = err.report();
            assert!(report.contains("nosuchif0"), "{report}");
            assert!(report.contains("no such interface"), "{report}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
#[ignore = "needs root, iproute2 and XDP: run by .ci/run"]
fn without_the_privileges_bind_fails_and_says_what_is_missing() {
    let pair = pair();
    let got = pair.server.run(|| {
        // Capabilities are per thread on Linux: this one drops them all,
        // as an unprivileged process has none.
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Clone, Copy)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        let header = Header {
            version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
            pid: 0,
        };
        let data = [Data {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        }; 2];
        thread::spawn(move || {
            // SAFETY: `header` and `data` are live and of the layout the
            // capset system call reads (version 3: two data entries); it
            // changes only the calling thread's capabilities.
            let rc = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
            assert_eq!(rc, 0, "capset: {}", io::Error::last_os_error());
            GreetServer::builder()
                .xdp(Xdp::interface("xs0"))
                .bind(SocketAddr::new(SERVER_V4.into(), 0))
                .map(drop)
        })
        .join()
    });
    match got.expect("the unprivileged thread") {
        Err(err @ udp_greet::Error::Xdp { .. }) => {
            let report = err.report();
            assert!(report.contains("xs0"), "{report}");
            assert!(report.contains("needs root"), "{report}");
        }
        other => panic!("{other:?}"),
    }
}

/// Set when the gated request may be answered.
static GATE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Greets; `gate` waits (up to the guard) until [`GATE`] is set, and
/// `slow` keeps the worker busy for 2 ms, so that the replies ready before
/// it leave before the rest of the batch is handled.
fn gated(request: udp_greet::Request<'_>, reply: &mut Vec<u8>) -> udp_greet::Action {
    let deadline = Instant::now() + GUARD;
    match request.data() {
        b"gate" => {
            while !GATE.load(std::sync::atomic::Ordering::Acquire) && Instant::now() < deadline {
                thread::yield_now();
            }
        }
        data if data.starts_with(b"slow") => {
            let until = Instant::now() + Duration::from_millis(2);
            while Instant::now() < until {
                std::hint::spin_loop();
            }
        }
        _ => {}
    }
    udp_greet::greet(request, reply)
}

#[test]
#[ignore = "needs root, iproute2 and XDP: run by .ci/run"]
fn replies_sent_before_the_rest_of_a_batch_leave_it_whole() {
    let pair = pair();
    let server = serve_with(&pair, IpAddr::from(SERVER_V4), gated);
    let addr = server.local_addr();
    let names: Vec<Vec<u8>> = ["a", "slow1", "b", "c", "slow2", "d", "e", "slow3", "f", "g"]
        .iter()
        .map(|n| n.as_bytes().to_vec())
        .collect();
    let got = pair.client.run(move || -> io::Result<Vec<Vec<u8>>> {
        let socket = UdpSocket::bind(SocketAddr::new(CLIENT_V4.into(), 0))?;
        socket.connect(addr)?;
        socket.set_read_timeout(Some(GUARD))?;
        // The gate holds the worker while the rest queue up behind it, to
        // be taken in one batch once it opens.
        socket.send(b"gate")?;
        for name in &names {
            socket.send(name)?;
        }
        GATE.store(true, std::sync::atomic::Ordering::Release);
        let mut replies = Vec::new();
        let mut buf = [0u8; 64];
        for _ in 0..=names.len() {
            let n = socket.recv(&mut buf)?;
            replies.push(buf[..n].to_vec());
        }
        Ok(replies)
    });
    let mut got = got.unwrap_or_else(|e| panic!("{e}"));
    got.sort();
    let mut expected: Vec<Vec<u8>> = [
        "gate", "a", "slow1", "b", "c", "slow2", "d", "e", "slow3", "f", "g",
    ]
    .iter()
    .map(|n| format!("Hello, {n}!").into_bytes())
    .collect();
    expected.sort();
    assert_eq!(got, expected);
    let stats = server
        .shutdown()
        .unwrap_or_else(|e| panic!("{}", e.report()));
    assert_eq!((stats.received, stats.replied), (11, 11), "{stats:?}");
    assert_eq!(stats.accounted(), stats.received, "{stats:?}");
}

/// Replies with as many bytes as the request's decimal number says.
fn sized(request: udp_greet::Request<'_>, reply: &mut Vec<u8>) -> udp_greet::Action {
    let size = std::str::from_utf8(request.data())
        .ok()
        .and_then(|s| s.parse::<usize>().ok());
    match size {
        Some(size) => {
            reply.resize(size, b'r');
            udp_greet::Action::Reply
        }
        None => udp_greet::Action::Ignore,
    }
}

#[test]
#[ignore = "needs root, iproute2 and XDP: run by .ci/run"]
fn replies_longer_than_the_mtu_reach_the_client_whole() {
    let pair = pair();
    for (local, client) in [
        (IpAddr::V4(SERVER_V4), IpAddr::V4(CLIENT_V4)),
        (IpAddr::V6(SERVER_V6), IpAddr::V6(CLIENT_V6)),
    ] {
        let server = serve_with(&pair, local, sized);
        let addr = server.local_addr();
        let before = pair.server.run(kernel_udp_in);
        // Small requests (on the XDP path), replies around the MTU of 1500
        // (1472 bytes of UDP payload on v4, 1452 on v6), around a frame
        // of 4 KiB, and larger.
        let sizes = [
            1400usize, 1452, 1453, 1472, 1473, 2000, 3778, 3779, 3798, 3799, 9000,
        ];
        for size in sizes {
            let got = pair.client.run(move || -> io::Result<usize> {
                let socket = UdpSocket::bind(SocketAddr::new(client, 0))?;
                socket.connect(addr)?;
                socket.set_read_timeout(Some(GUARD))?;
                socket.send(size.to_string().as_bytes())?;
                let mut buf = vec![0u8; 16384];
                socket.recv(&mut buf)
            });
            let got = got.unwrap_or_else(|e| panic!("{local}: a reply of {size} bytes: {e}"));
            assert_eq!(got, size, "{local}");
        }
        // Every request came by the XDP path.
        assert_eq!(pair.server.run(kernel_udp_in), before, "{local}");
        let stats = server
            .shutdown()
            .unwrap_or_else(|e| panic!("{}", e.report()));
        let count = sizes.len() as u64;
        assert_eq!((stats.received, stats.replied), (count, count), "{stats:?}");
    }
}

#[test]
#[ignore = "needs root, iproute2 and XDP: run by .ci/run"]
fn sources_the_kernel_would_refuse_are_not_answered() {
    let pair = pair();
    let server = xdp_server(&pair, SocketAddr::new(SERVER_V4.into(), 0), 1500);
    let port = server.local_addr().port();
    let from = |source: [u8; 4], sport: u16| {
        let mut f = udp_frame(false, port, b"forged", false);
        f[26..30].copy_from_slice(&source);
        f[34..36].copy_from_slice(&sport.to_be_bytes());
        fix_ipv4_checksum(&mut f);
        // The UDP checksum covers the source: none (0) is allowed on v4.
        f[40..42].copy_from_slice(&[0, 0]);
        f
    };
    let mut frames = vec![
        // The server itself, from its own port: each reply would come back
        // as a request, for ever.
        from(SERVER_V4.octets(), port),
        from([127, 0, 0, 1], 40001),
        from([198, 18, 0, 255], 40001), // the subnet's broadcast address
        from([0, 1, 2, 3], 40001),
        from([240, 0, 0, 1], 40001),
        from([224, 0, 0, 5], 40001),
    ];
    let refused = frames.len() as u64;
    // A frame for another host's MAC address: the program passes it to
    // the kernel, which drops it; nothing is answered.
    let mut other = udp_frame(false, port, b"other host", false);
    other[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
    frames.push(other);
    frames.push(udp_frame(false, port, b"sentinel", false));
    let before = pair.server.run(kernel_udp_in);
    let outcome = pair.client.run(move || -> Result<(), String> {
        let socket =
            UdpSocket::bind(SocketAddr::new(CLIENT_V4.into(), 40001)).map_err(|e| e.to_string())?;
        socket
            .set_read_timeout(Some(GUARD))
            .map_err(|e| e.to_string())?;
        send_frames(frames).map_err(|e| format!("a packet socket on xc0: {e}"))?;
        expect_replies(&socket, &[b"Hello, sentinel!"])
    });
    outcome.unwrap_or_else(|e| panic!("{e}"));
    let stats = wait_for_stats(&server, "every frame dealt with", |s| {
        s.received == 1 && s.malformed == refused && s.in_flight() == 0
    });
    assert_eq!(stats.replied, 1, "{stats:?}");
    assert_eq!(pair.server.run(kernel_udp_in), before);
    server
        .shutdown()
        .unwrap_or_else(|e| panic!("{}", e.report()));
}

#[test]
#[ignore = "needs root, iproute2 and XDP: run by .ci/run"]
fn replies_carry_the_dscp_asked_for_and_not_the_requests_ecn() {
    let pair = pair();
    for local in [IpAddr::V4(SERVER_V4), IpAddr::V6(SERVER_V6)] {
        let server = xdp_server_with(&pair, SocketAddr::new(local, 0), |b| b.reply_dscp(46));
        let port = server.local_addr().port();
        // A request marked ECN CE (and DSCP 8), from port 40001.
        let mut f = udp_frame(local.is_ipv6(), port, b"marked", false);
        match local {
            IpAddr::V4(_) => {
                f[15] = 0x23;
                fix_ipv4_checksum(&mut f);
            }
            IpAddr::V6(_) => {
                f[14] = 0x62;
                f[15] = 0x30;
            }
        }
        let tos = pair.client.run(move || -> Result<u8, String> {
            let capture = capture_on_xc0().map_err(|e| format!("a capture socket: {e}"))?;
            send_frames(vec![f]).map_err(|e| format!("a packet socket on xc0: {e}"))?;
            let deadline = Instant::now() + GUARD;
            let mut buf = [0u8; 2048];
            while Instant::now() < deadline {
                let n = capture
                    .recv(&mut buf)
                    .map_err(|e| format!("capture: {e}"))?;
                let frame = &buf[..n];
                // The reply: from the server's port to 40001.
                let (l4, tos) = match local {
                    IpAddr::V4(_) if frame.get(12..14) == Some(&[0x08, 0x00]) => {
                        (34, frame.get(15).copied())
                    }
                    IpAddr::V6(_) if frame.get(12..14) == Some(&[0x86, 0xdd]) => {
                        (54, frame.get(14..16).map(|b| (b[0] << 4) | (b[1] >> 4)))
                    }
                    _ => continue,
                };
                if frame.get(l4..l4 + 4) == Some(&[(port >> 8) as u8, port as u8, 0x9c, 0x41][..]) {
                    return tos.ok_or_else(|| "a short frame".to_owned());
                }
            }
            Err("no reply captured".to_owned())
        });
        assert_eq!(tos.unwrap_or_else(|e| panic!("{e}")), 46 << 2, "{local}");
        server
            .shutdown()
            .unwrap_or_else(|e| panic!("{}", e.report()));
    }
}

/// A packet socket on `xc0` that receives every frame (with a read
/// timeout of the guard).
fn capture_on_xc0() -> io::Result<UdpLikeCapture> {
    let (socket, addr) = packet_socket((libc::ETH_P_ALL as u16).to_be())?;
    // SAFETY: `addr` is a live `sockaddr_ll` of the length given.
    let rc = unsafe {
        libc::bind(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            std::ptr::from_ref(&addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let capture = UdpLikeCapture(socket2::Socket::from(socket));
    capture.0.set_read_timeout(Some(GUARD))?;
    Ok(capture)
}

/// A packet socket read like a datagram socket.
struct UdpLikeCapture(socket2::Socket);

impl UdpLikeCapture {
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        use std::io::Read;
        (&self.0).read(buf)
    }
}

#[test]
#[ignore = "needs root, iproute2 and XDP: run by .ci/run"]
fn service_addresses_are_served_and_a_loopback_interface_is_refused() {
    let pair = pair();
    let loopback = pair.server.run(|| {
        GreetServer::builder()
            .xdp(Xdp::interface("lo"))
            .bind(SocketAddr::new(SERVER_V4.into(), 0))
            .map(drop)
    });
    match loopback {
        Err(err @ udp_greet::Error::Xdp { .. }) => {
            let report = err.report();
            assert!(report.contains("lo is a loopback interface"), "{report}");
        }
        other => panic!("{other:?}"),
    }
    // A labelled address on xs0, and a service address on lo that the
    // client reaches through xs0 (as anycast and direct-routing setups
    // have): both served through the XDP queue.
    let made = pair.server.run(|| -> Result<(), String> {
        ip(&[
            "addr",
            "add",
            "198.18.0.5/24",
            "dev",
            "xs0",
            "label",
            "xs0:1",
        ])?;
        ip(&["addr", "add", "198.18.9.9/32", "dev", "lo"])?;
        Ok(())
    });
    made.unwrap_or_else(|e| panic!("{e}"));
    let routed = pair
        .client
        .run(|| ip(&["route", "add", "198.18.9.9/32", "via", "198.18.0.1"]));
    routed.unwrap_or_else(|e| panic!("{e}"));
    for service in [[198, 18, 0, 5], [198, 18, 9, 9]] {
        let server = xdp_server(&pair, SocketAddr::from((service, 0)), 1500);
        let before = pair.server.run(kernel_udp_in);
        assert_eq!(ask(&pair, server.local_addr(), b"Sarah"), b"Hello, Sarah!");
        assert_eq!(pair.server.run(kernel_udp_in), before, "{service:?}");
        server
            .shutdown()
            .unwrap_or_else(|e| panic!("{}", e.report()));
    }
}

#[test]
#[ignore = "needs root, iproute2 and XDP: run by .ci/run"]
fn a_smaller_mtu_set_while_serving_is_kept_to() {
    let pair = pair();
    let server = serve_with(&pair, IpAddr::from(SERVER_V4), sized);
    let addr = server.local_addr();
    let ask_for = |size: usize| {
        pair.client.run(move || -> io::Result<usize> {
            let socket = UdpSocket::bind(SocketAddr::new(CLIENT_V4.into(), 0))?;
            socket.connect(addr)?;
            socket.set_read_timeout(Some(GUARD))?;
            socket.send(size.to_string().as_bytes())?;
            let mut buf = vec![0u8; 4096];
            socket.recv(&mut buf)
        })
    };
    assert_eq!(ask_for(1400).expect("a reply at MTU 1500"), 1400);
    let set = pair
        .server
        .run(|| ip(&["link", "set", "xs0", "mtu", "1280"]));
    set.unwrap_or_else(|e| panic!("{e}"));
    let set = pair
        .client
        .run(|| ip(&["link", "set", "xc0", "mtu", "1280"]));
    set.unwrap_or_else(|e| panic!("{e}"));
    // 1400 bytes no longer fit one frame of the link: fragmented by the
    // kernel socket, whole at the client.
    assert_eq!(ask_for(1400).expect("a reply at MTU 1280"), 1400);
    assert_eq!(ask_for(1200).expect("a small reply"), 1200);
    let stats = server
        .shutdown()
        .unwrap_or_else(|e| panic!("{}", e.report()));
    assert_eq!((stats.received, stats.replied), (3, 3), "{stats:?}");
}

#[test]
#[ignore = "needs root, iproute2 and XDP: run by .ci/run"]
fn a_server_restarts_at_once_on_the_same_queue() {
    let pair = pair();
    let addr = SocketAddr::new(SERVER_V4.into(), 0);
    for round in 0..10 {
        let server = xdp_server(&pair, addr, 1500);
        assert_eq!(
            ask(&pair, server.local_addr(), b"again"),
            b"Hello, again!",
            "round {round}"
        );
        server
            .shutdown()
            .unwrap_or_else(|e| panic!("round {round}: {}", e.report()));
    }
}

/// Set when the stuck handler may return.
static RELEASE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[test]
#[ignore = "needs root, iproute2 and XDP: run by .ci/run"]
fn a_shutdown_that_gives_up_on_a_stuck_handler_still_detaches() {
    let pair = pair();
    let server = serve_with(
        &pair,
        IpAddr::from(SERVER_V4),
        |request: udp_greet::Request<'_>, reply: &mut Vec<u8>| {
            let deadline = Instant::now() + GUARD;
            while !RELEASE.load(std::sync::atomic::Ordering::Acquire) && Instant::now() < deadline {
                thread::yield_now();
            }
            udp_greet::greet(request, reply)
        },
    );
    let addr = server.local_addr();
    let sent = pair.client.run(move || -> io::Result<usize> {
        UdpSocket::bind(SocketAddr::new(CLIENT_V4.into(), 0))?.send_to(b"stuck", addr)
    });
    sent.unwrap_or_else(|e| panic!("{e}"));
    wait_for_stats(&server, "the handler to start", |s| s.in_flight() == 1);
    match server.shutdown_timeout(Duration::from_millis(1)) {
        Err(udp_greet::Error::ShutdownTimedOut { .. }) => {}
        other => panic!("{other:?}"),
    }
    let shown = pair
        .server
        .run(|| ip(&["-d", "link", "show", "dev", "xs0"]));
    let shown = shown.unwrap_or_else(|e| panic!("{e}"));
    RELEASE.store(true, std::sync::atomic::Ordering::Release);
    assert!(!shown.contains("prog/xdp"), "{shown}");
}
