//! The settings a server asks of its platform beyond the builder's, and
//! what holds when the platform refuses one. On Windows the server turns
//! off ICMP reports about earlier replies (`SIO_UDP_CONNRESET`,
//! `SIO_UDP_NETRESET`), which a system may refuse (Wine 8 refuses
//! `SIO_UDP_NETRESET`: `.ci/platforms` runs this under Wine), and takes its
//! address exclusively (`SO_EXCLUSIVEADDRUSE`). The crate's unit tests
//! refuse each setting in turn on every platform (`src/socket.rs`,
//! `src/sys/settings.rs`).

mod util;

use std::net::SocketAddr;

use socket2::{Domain, Socket, Type};
use udp_greet::{GreetClient, GreetServer, ServerBuilder};
use util::{V4, assert_balanced, raw_socket_for};

util::on_both_paths!(a_reply_that_draws_an_icmp_report_does_not_stop_the_server);

/// A reply to a port that has closed draws an ICMP "port unreachable"
/// back. Where the system keeps such reports out of the receive path
/// (`icmp_reports_off()`), no receive fails; where it does not (an ioctl
/// refused), the report fails at most one receive, which is counted, and
/// the server answers the next request all the same.
fn a_reply_that_draws_an_icmp_report_does_not_stop_the_server(b: ServerBuilder) {
    let (handler, hold) = util::greeter_holding(b"first");
    let server = b.bind(V4).expect("bind: a refused ICMP ioctl is not fatal");
    let reports_off = server.icmp_reports_off();
    if !reports_off {
        println!("note: this system keeps ICMP reports in the receive path");
    }
    let addr = server.local_addr();
    let server = server.spawn(handler).expect("spawn");
    let gone = raw_socket_for(addr);
    util::send_to(&gone, b"first", addr).expect("send");
    hold.started();
    // The sender's port closes before its reply goes out.
    drop(gone);
    hold.release();
    let client = GreetClient::connect(addr).expect("connect");
    assert_eq!(client.send_recv(b"still").expect("reply"), b"Hello, still!");
    let stats = server.shutdown().expect("shutdown");
    assert_eq!((stats.received, stats.replied), (2, 2), "{stats:?}");
    if reports_off {
        assert_eq!(stats.recv_errors, 0, "{stats:?}");
    } else {
        assert!(stats.recv_errors <= 1, "{stats:?}");
    }
    assert_balanced(&stats);
}

/// A socket that asks to share addresses (`SO_REUSEADDR`) binding `addr`.
fn bind_sharing(addr: SocketAddr) -> std::io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// No other socket can take a server's address while it runs, not even
/// one that asks to share it: on Windows, where `SO_REUSEADDR` would let
/// it, because the server holds the address exclusively
/// (`SO_EXCLUSIVEADDRUSE`), and the bind fails rather than go without it.
/// (Wine follows Linux here, where a socket with `SO_REUSEADDR` cannot join
/// one without it anyway: under Wine this passes with or without the
/// option. That the option is asked for, and that its refusal is fatal, the
/// crate's unit tests check.)
#[test]
fn no_other_socket_takes_the_address_of_a_server() {
    let server = GreetServer::bind(V4).expect("bind");
    let addr = server.local_addr();
    let taken = bind_sharing(addr);
    assert!(taken.is_err(), "another socket bound {addr}");
    let server = server.spawn(udp_greet::greet).expect("spawn");
    let client = GreetClient::connect(addr).expect("connect");
    assert_eq!(client.send_recv(b"Sarah").expect("reply"), b"Hello, Sarah!");
    server.shutdown().expect("shutdown");
}

/// The same holds on the async server's sockets.
#[cfg(feature = "tokio")]
#[test]
fn no_other_socket_takes_the_address_of_an_async_server() {
    let server = udp_greet::tokio::GreetServer::bind(V4).expect("bind");
    let addr = server.local_addr();
    assert!(bind_sharing(addr).is_err(), "another socket bound {addr}");
    let blocking = GreetServer::bind(V4).expect("bind");
    assert_eq!(server.icmp_reports_off(), blocking.icmp_reports_off());
}

/// A socket given to `from_std` is served whatever the system says to the
/// ICMP ioctls, and the answer is recorded.
#[test]
fn an_adopted_socket_is_served_whatever_the_icmp_ioctls_say() {
    let socket = std::net::UdpSocket::bind(V4).expect("bind");
    let server = GreetServer::from_std(socket).expect("adopt: the ioctls are not fatal");
    let reports_off = server.icmp_reports_off();
    let bound = GreetServer::bind(V4).expect("bind");
    assert_eq!(
        reports_off,
        bound.icmp_reports_off(),
        "one system, one answer"
    );
    let server = server.spawn(udp_greet::greet).expect("spawn");
    let client = GreetClient::connect(server.local_addr()).expect("connect");
    assert_eq!(client.send_recv(b"Tracy").expect("reply"), b"Hello, Tracy!");
    server.shutdown().expect("shutdown");
}
