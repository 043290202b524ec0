//! Sockets handed in from outside (`from_std`): put in the mode the server
//! needs, served with the builder's settings, refused when unsuitable.

mod util;

use std::net::UdpSocket;

use udp_greet::{GreetClient, ServerBuilder};
use util::{V4, assert_balanced, raw_socket_for, wait_until};

util::on_both_paths!(
    a_non_blocking_socket_is_served_with_the_builders_settings,
    a_socket_with_extra_control_messages_still_answers,
    receive_errors_do_not_stop_the_server,
);

/// A socket left non-blocking, with a tiny read timeout, would make the
/// loop spin; `from_std` puts it right, and every builder setting applies.
fn a_non_blocking_socket_is_served_with_the_builders_settings(b: ServerBuilder) {
    let socket = UdpSocket::bind(V4).expect("bind");
    socket.set_nonblocking(true).expect("non-blocking");
    socket
        .set_read_timeout(Some(std::time::Duration::from_micros(1)))
        .expect("a tiny read timeout");
    // The same open socket, to look at its mode after the hand-over.
    let probe = socket2::Socket::from(socket.try_clone().expect("clone"));
    let addr = socket.local_addr().expect("addr");
    let server = b
        .max_amplification(9)
        .max_datagram_size(100)
        .workers(2)
        .from_std(socket)
        .expect("adopt");
    assert_eq!(server.local_addr(), addr);
    assert_eq!(server.max_datagram_size(), 100);
    #[cfg(unix)]
    assert!(!probe.nonblocking().expect("mode"), "made blocking");
    // Never shut down by the server (its maker holds it too): its workers
    // wake within a 50 ms read timeout to see whether the server stops.
    // (The kernel keeps it in its own ticks: 50 ms may read back as 52.)
    let timeout = probe.read_timeout().expect("timeout");
    assert!(
        timeout.is_some_and(|t| (50..100).contains(&t.as_millis())),
        "{timeout:?}"
    );
    let server = server.spawn(udp_greet::greet).expect("spawn");
    if cfg!(target_os = "linux") {
        wait_until("two workers on the one socket", || {
            util::workers_of(addr.port()) == 2
        });
    }
    let client = GreetClient::connect(addr).expect("connect");
    // "x" gets 9 bytes back, within 9x; "" would get 8 for 0 and is capped.
    assert_eq!(client.send_recv(b"x").expect("reply"), b"Hello, x!");
    let raw = raw_socket_for(addr);
    util::send_to(&raw, b"", addr).expect("send");
    util::send_to(&raw, &[b'y'; 101], addr).expect("send");
    wait_until("the capped and the oversized request", || {
        let stats = server.stats();
        stats.amplification_capped == 1 && stats.truncated == 1
    });
    let stats = server.shutdown().expect("shutdown");
    assert_eq!(stats.replied, 1);
    assert_balanced(&stats);
}

#[cfg(unix)]
#[test]
fn unsuitable_sockets_are_refused_with_the_reason() {
    use socket2::{Domain, Socket, Type};
    use udp_greet::{Error, GreetServer};
    let unsuitable = |socket: UdpSocket, why: &str| {
        let err = GreetServer::from_std(socket).expect_err(why);
        assert!(
            matches!(err, Error::UnsuitableSocket { .. }),
            "{why}: {err:?}"
        );
        assert!(err.to_string().contains(why), "{err}");
    };
    // A TCP socket dressed as a `UdpSocket`.
    let tcp = Socket::new(Domain::IPV4, Type::STREAM, None).expect("tcp socket");
    tcp.bind(
        &"127.0.0.1:0"
            .parse::<std::net::SocketAddr>()
            .expect("addr")
            .into(),
    )
    .expect("bind");
    unsuitable(
        UdpSocket::from(std::os::fd::OwnedFd::from(tcp)),
        "not a datagram",
    );
    // A UDP socket never bound.
    let unbound = Socket::new(Domain::IPV4, Type::DGRAM, None).expect("udp socket");
    unsuitable(
        UdpSocket::from(std::os::fd::OwnedFd::from(unbound)),
        "not bound",
    );
    // A Unix datagram socket.
    let (unix, _other) = std::os::unix::net::UnixDatagram::pair().expect("pair");
    unsuitable(
        UdpSocket::from(std::os::fd::OwnedFd::from(unix)),
        "not an IPv4 or IPv6 socket",
    );
    // A UDP socket shut down for reading: every receive returns at once
    // with nothing, and a server on it would spin.
    if cfg!(target_os = "linux") {
        let shut = Socket::from(UdpSocket::bind(V4).expect("bind"));
        // (Unconnected UDP reports ENOTCONN, and shuts down all the same.)
        let _ = shut.shutdown(std::net::Shutdown::Read);
        unsuitable(shut.into(), "shut down for reading");
        // An empty datagram queued is a datagram, not the end of reading.
        let open = UdpSocket::bind(V4).expect("bind");
        let to = open.local_addr().expect("addr");
        let raw = raw_socket_for(to);
        util::send_to(&raw, b"", to).expect("send");
        let mut buf = [0u8; 1];
        let queued = open.peek_from(&mut buf).expect("the empty datagram");
        assert_eq!(queued.0, 0);
        let server = GreetServer::from_std(open)
            .expect("a socket with an empty datagram queued")
            .spawn(udp_greet::greet)
            .expect("spawn");
        let stats = server.shutdown().expect("shutdown");
        assert_balanced(&stats);
    }
    // The builder checks its own settings first.
    let err = GreetServer::builder()
        .workers(0)
        .from_std(UdpSocket::bind(V4).expect("bind"))
        .expect_err("no workers");
    assert!(matches!(
        err,
        Error::InvalidConfig {
            setting: "ServerBuilder::workers",
            ..
        }
    ));
}

/// Turns on a socket option that takes a C `int`.
#[cfg(target_os = "linux")]
fn set_int_option(
    socket: &UdpSocket,
    level: libc::c_int,
    name: libc::c_int,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: `on` is a live `c_int` and the length given is its size; the
    // descriptor is open for the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(&on).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A wildcard-bound socket that also asked for timestamps, TTL, TOS and the
/// original destination gets more control data with each datagram than the
/// server asks for; the arrival address must still be found.
fn a_socket_with_extra_control_messages_still_answers(b: ServerBuilder) {
    #[cfg(target_os = "linux")]
    {
        let socket = UdpSocket::bind("0.0.0.0:0").expect("bind");
        let mut left_out = Vec::new();
        for (level, name, option) in [
            (libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, "SO_TIMESTAMPNS"),
            (libc::SOL_SOCKET, libc::SO_RXQ_OVFL, "SO_RXQ_OVFL"),
            (libc::IPPROTO_IP, libc::IP_RECVTTL, "IP_RECVTTL"),
            (libc::IPPROTO_IP, libc::IP_RECVTOS, "IP_RECVTOS"),
            (
                libc::IPPROTO_IP,
                libc::IP_RECVORIGDSTADDR,
                "IP_RECVORIGDSTADDR",
            ),
            (libc::IPPROTO_IP, libc::IP_RECVOPTS, "IP_RECVOPTS"),
        ] {
            if let Err(err) = set_int_option(&socket, level, name) {
                // Left out under qemu-user, where the others still bring
                // control messages.
                let gap = util::emulator::QEMU_SOCKET_OPTIONS;
                assert!(
                    err.raw_os_error() == Some(libc::ENOPROTOOPT)
                        && util::emulator::under(gap.emulator),
                    "setsockopt {option}: {err}"
                );
                left_out.push(option);
            }
        }
        if !left_out.is_empty() {
            assert!(left_out.len() < 6, "no extra control message at all");
            util::emulator::QEMU_SOCKET_OPTIONS.skips_part_of(&left_out.join(", "));
        }
        let port = socket.local_addr().expect("addr").port();
        let server = b
            .from_std(socket)
            .expect("adopt")
            .spawn(util::tell_local)
            .expect("spawn");
        let client = GreetClient::connect(("127.0.0.1", port)).expect("connect");
        assert_eq!(client.send_recv(b"where?").expect("reply"), b"127.0.0.1");
        let stats = server.shutdown().expect("shutdown");
        assert_eq!((stats.replied, stats.truncated), (1, 0), "{stats:?}");
        assert_balanced(&stats);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = b;
}

/// With `IP_RECVERR` on (as a socket from elsewhere may have it), an ICMP
/// "port unreachable" for a reply surfaces as a failed receive: counted,
/// and the server goes on.
fn receive_errors_do_not_stop_the_server(b: ServerBuilder) {
    #[cfg(target_os = "linux")]
    {
        let socket = UdpSocket::bind(V4).expect("bind");
        set_int_option(&socket, libc::IPPROTO_IP, libc::IP_RECVERR).expect("IP_RECVERR");
        let addr = socket.local_addr().expect("addr");
        let (handler, hold) = util::greeter_holding(b"first");
        let server = b
            .from_std(socket)
            .expect("adopt")
            .spawn(handler)
            .expect("spawn");
        let gone = raw_socket_for(addr);
        util::send_to(&gone, b"first", addr).expect("send");
        hold.started();
        // The sender's port closes before its reply goes out: the reply
        // draws an ICMP port-unreachable back at the server.
        drop(gone);
        hold.release();
        wait_until("the ICMP report to surface as a receive error", || {
            server.stats().recv_errors == 1
        });
        let client = GreetClient::connect(addr).expect("connect");
        assert_eq!(client.send_recv(b"still").expect("reply"), b"Hello, still!");
        let stats = server.shutdown().expect("shutdown");
        assert_eq!((stats.received, stats.replied), (2, 2), "{stats:?}");
        assert_eq!(stats.recv_errors, 1);
        assert_balanced(&stats);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = b;
}
