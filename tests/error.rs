//! `From<udp_greet::Error> for std::io::Error`: the kind matches the
//! variant, the message is the same, the `udp_greet::Error` is the inner
//! error and the operating-system error stays reachable through `source()`.
//! Every error here is a real one, made by the library.

mod util;

use std::error::Error as _;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use udp_greet::{Error, GreetClient, GreetServer};
use util::{V4, within_guard};

/// Converts `err`, checks what every conversion keeps (message, inner
/// error, source), and returns the `io::Error`.
fn converted(err: Error) -> io::Error {
    let message = err.to_string();
    let source = err.source().map(ToString::to_string);
    let io = io::Error::from(err);
    assert_eq!(io.to_string(), message);
    assert!(
        io.get_ref().is_some_and(|inner| inner.is::<Error>()),
        "the udp_greet::Error is the inner error: {io:?}"
    );
    assert_eq!(io.source().map(ToString::to_string), source);
    io
}

/// The operating-system error at the end of `io`'s `source()` chain.
fn os_source(io: &io::Error) -> &io::Error {
    io.source()
        .and_then(|source| source.downcast_ref::<io::Error>())
        .unwrap_or_else(|| panic!("no io::Error source: {io:?}"))
}

#[test]
fn a_taken_address_is_addr_in_use_with_the_os_error_as_source() {
    let holder = UdpSocket::bind(V4).expect("bind");
    let addr = holder.local_addr().expect("addr");
    let err = GreetServer::bind(addr).expect_err("the address is taken");
    assert!(matches!(err, Error::AddrInUse { .. }), "{err:?}");
    let io = converted(err);
    assert_eq!(io.kind(), io::ErrorKind::AddrInUse);
    let os = os_source(&io);
    assert_eq!(os.kind(), io::ErrorKind::AddrInUse);
    assert!(os.raw_os_error().is_some(), "{os:?}");
}

/// What one call of a client without retries to `addr` fails with.
fn failed_call(addr: SocketAddr, timeout: Duration) -> Error {
    let client = GreetClient::builder().initial_timeout(timeout).retries(0);
    let client = client.connect(addr).expect("connect");
    within_guard("a call", move || {
        client.send_recv(b"?").expect_err("no answer")
    })
}

#[test]
fn a_closed_port_is_connection_refused() {
    if util::emulator::WINE_ICMP_WAKES_A_WAIT.skips() {
        return;
    }
    let closed = UdpSocket::bind(V4).and_then(|s| s.local_addr());
    // Only the ICMP port-unreachable can end the call within the guard.
    let err = failed_call(closed.expect("a free port"), Duration::from_secs(60));
    assert!(err.is_refused(), "{err:?}");
    let io = converted(err);
    assert_eq!(io.kind(), io::ErrorKind::ConnectionRefused);
    // The OS error underneath is the platform's own: Windows reports a
    // refused port on a connected socket as WSAECONNRESET.
    let os = os_source(&io).kind();
    match cfg!(windows) {
        true => assert!(
            matches!(
                os,
                io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionRefused
            ),
            "{os:?}"
        ),
        false => assert_eq!(os, io::ErrorKind::ConnectionRefused),
    }
}

#[test]
fn silence_is_timed_out() {
    let silent = UdpSocket::bind(V4).expect("bind");
    let err = failed_call(silent.local_addr().expect("addr"), Duration::from_millis(5));
    assert!(err.is_timeout(), "{err:?}");
    let io = converted(err);
    assert_eq!(io.kind(), io::ErrorKind::TimedOut);
    assert!(io.source().is_none(), "a timeout has no OS error: {io:?}");
}

#[test]
fn an_invalid_setting_is_invalid_input() {
    let err = GreetServer::builder()
        .workers(0)
        .bind(V4)
        .expect_err("no workers");
    assert!(matches!(err, Error::InvalidConfig { .. }), "{err:?}");
    assert_eq!(converted(err).kind(), io::ErrorKind::InvalidInput);
}

#[test]
fn an_unresolvable_address_keeps_the_resolvers_kind() {
    let err = GreetServer::bind("definitely not an address").expect_err("bad address");
    let Error::Resolve { source, .. } = &err else {
        panic!("expected a resolve error, got {err:?}");
    };
    let kind = source.kind();
    let io = converted(err);
    assert_eq!(io.kind(), kind);
    assert_eq!(os_source(&io).kind(), kind);
}

#[test]
fn the_error_comes_back_out_of_the_io_error() {
    let holder = UdpSocket::bind(V4).expect("bind");
    let addr = holder.local_addr().expect("addr");
    let io = io::Error::from(GreetServer::bind(addr).expect_err("taken"));
    let err = io.downcast::<Error>().expect("a udp_greet::Error inside");
    assert!(
        matches!(err, Error::AddrInUse { addr: a, .. } if a == addr),
        "{err:?}"
    );
}

/// The conversion in `?`, the reason it exists.
#[test]
fn question_mark_converts_in_io_result_code() {
    fn bind_in_io_code(addr: std::net::SocketAddr) -> io::Result<()> {
        GreetServer::bind(addr)?;
        Ok(())
    }
    let holder = UdpSocket::bind(V4).expect("bind");
    let addr = holder.local_addr().expect("addr");
    let io = bind_in_io_code(addr).expect_err("taken");
    assert_eq!(io.kind(), io::ErrorKind::AddrInUse);
}

#[cfg(feature = "tokio")]
#[test]
fn no_runtime_is_other() {
    let server = udp_greet::tokio::GreetServer::bind(V4).expect("bind");
    let err = server
        .spawn(udp_greet::tokio::greet)
        .expect_err("outside a runtime");
    assert!(matches!(err, Error::NoRuntime { .. }), "{err:?}");
    assert_eq!(converted(err).kind(), io::ErrorKind::Other);
}
