//! GreetClient against real loopback servers, well-behaved and not.

mod util;

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use udp_greet::{Action, Error, GreetClient, GreetServer, Request, ServerHandle};
use util::{V4, raw_socket_for, within_guard};

/// A loopback address where nothing listens: a port that was just bound
/// and released.
fn closed_port(family: &str) -> std::net::SocketAddr {
    let socket = UdpSocket::bind(family).expect("bind");
    socket.local_addr().expect("addr")
}

#[test]
fn refused_is_reported_at_once_not_as_a_timeout() {
    if util::emulator::WINE_ICMP_WAKES_A_WAIT.skips() {
        return;
    }
    for (family, _) in util::families() {
        let addr = closed_port(family);
        // A timeout this long would outlast the hang guard: only the ICMP
        // port-unreachable can end the call in time.
        let client = GreetClient::builder()
            .initial_timeout(Duration::from_secs(60))
            .retries(0)
            .connect(addr)
            .expect("connect");
        let err = within_guard("send_recv to a closed port", move || {
            client.send_recv(b"anyone?").expect_err("nothing listens")
        });
        assert!(err.is_refused(), "{err:?}");
        assert!(matches!(err, Error::Refused { addr: a, .. } if a == addr));
        assert!(
            err.to_string()
                .contains(&format!("nothing is listening on UDP {addr}")),
            "{err}"
        );
    }
}

#[test]
fn silence_is_a_timeout_after_every_attempt() {
    let server = GreetServer::bind(V4)
        .expect("bind")
        .spawn(|_: Request<'_>, _: &mut Vec<u8>| Action::Ignore)
        .expect("spawn");
    const JITTER: f64 = 0.2;
    let client = GreetClient::builder()
        .initial_timeout(Duration::from_millis(10))
        .retries(2)
        .jitter(JITTER)
        .connect(server.local_addr())
        .expect("connect");
    let err = client.send_recv(b"hello?").expect_err("no reply");
    match err {
        Error::Timeout {
            addr,
            attempts,
            elapsed,
            ..
        } => {
            assert_eq!(addr, server.local_addr());
            assert_eq!(attempts, 3);
            // The client waits out each attempt in full on the monotonic
            // clock (it waits again if the kernel wakes it early), so the
            // call lasts at least the sum of the shortest waits the jitter
            // allows: 10 ms, then 20 and 40 ms each less 20%.
            let least = Duration::from_millis(10) + Duration::from_millis(60).mul_f64(1.0 - JITTER);
            assert!(elapsed >= least, "{elapsed:?} < {least:?}");
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    util::wait_until("the server to see all three attempts", || {
        server.stats().no_reply == 3
    });
}

#[test]
fn a_lost_request_is_retried() {
    // A server that ignores the first copy of each request.
    let seen = std::sync::Mutex::new(std::collections::HashSet::new());
    let server = GreetServer::bind(V4)
        .expect("bind")
        .spawn(move |request: Request<'_>, reply: &mut Vec<u8>| {
            let first = seen
                .lock()
                .map(|mut s| s.insert(request.data().to_vec()))
                .unwrap_or(false);
            if first {
                return Action::Ignore;
            }
            udp_greet::greet(request, reply)
        })
        .expect("spawn");
    let client = GreetClient::builder()
        .initial_timeout(Duration::from_millis(20))
        .retries(3)
        .connect(server.local_addr())
        .expect("connect");
    assert_eq!(client.send_recv(b"again").expect("reply"), b"Hello, again!");
    assert_eq!(server.shutdown().expect("shutdown").received, 2);
}

#[test]
fn send_recv_into_fills_the_callers_buffer() {
    let server = GreetServer::bind(V4)
        .expect("bind")
        .spawn(udp_greet::greet)
        .expect("spawn");
    let client = GreetClient::connect(server.local_addr()).expect("connect");
    let mut buf = [0u8; 32];
    let n = client.send_recv_into(b"Tracy", &mut buf).expect("reply");
    assert_eq!(&buf[..n], b"Hello, Tracy!");

    let mut small = [0u8; 8];
    let err = client
        .send_recv_into(b"Michael", &mut small)
        .expect_err("too small");
    assert!(
        matches!(err, Error::ReplyTooLarge { capacity: 8, addr, .. } if addr == server.local_addr()),
        "{err:?}"
    );
    // The client is still usable, and the discarded reply does not linger.
    let n = client.send_recv_into(b"Sarah", &mut buf).expect("reply");
    assert_eq!(&buf[..n], b"Hello, Sarah!");
}

/// A greet server behind a relay that takes `requests` requests, forwards
/// each, and hands the server's reply to `answer` to send on to the client.
/// Returns the relay's address and its thread (the server lives as long).
fn relayed_greet_server(
    requests: usize,
    answer: impl Fn(&UdpSocket, &[u8], SocketAddr) + Send + 'static,
) -> (SocketAddr, std::thread::JoinHandle<ServerHandle>) {
    let server = util::greet_server(GreetServer::builder(), V4);
    let relay = UdpSocket::bind(V4).expect("bind");
    relay
        .set_read_timeout(Some(util::HANG_GUARD))
        .expect("timeout");
    let relay_addr = relay.local_addr().expect("addr");
    let thread = std::thread::spawn(move || {
        let upstream = server.local_addr();
        let up = raw_socket_for(upstream);
        let mut buf = [0u8; 2048];
        for _ in 0..requests {
            let (n, client) = util::recv_from(&relay, &mut buf).expect("request");
            util::send_to(&up, &buf[..n], upstream).expect("forward");
            let m = util::recv(&up, &mut buf).expect("reply");
            answer(&relay, &buf[..m], client);
        }
        server
    });
    (relay_addr, thread)
}

#[test]
fn a_stale_reply_is_not_taken_for_the_next_answer() {
    // The relay sends every answer twice, and says when both copies are
    // queued at the client: the duplicate of one answer must never be
    // returned for the next request.
    let (queued_tx, queued) = std::sync::mpsc::channel();
    let (relay_addr, relay) = relayed_greet_server(3, move |relay, reply, client| {
        util::send_to(relay, reply, client).expect("reply");
        util::send_to(relay, reply, client).expect("duplicate");
        // Loopback delivers within send_to: both copies are queued now.
        queued_tx.send(()).expect("test thread");
    });
    let client = GreetClient::connect(relay_addr).expect("connect");
    for name in ["Michael", "Tracy", "Sarah"] {
        let reply = client.send_recv(name.as_bytes()).expect("reply");
        assert_eq!(reply, format!("Hello, {name}!").as_bytes());
        queued
            .recv_timeout(util::HANG_GUARD)
            .expect("relay sent both copies");
    }
    let server = relay.join().expect("relay");
    util::assert_balanced(&server.shutdown().expect("shutdown"));
}

#[test]
fn settings_are_checked_and_reported() {
    let err = GreetClient::builder()
        .initial_timeout(Duration::ZERO)
        .connect("127.0.0.1:9")
        .expect_err("zero timeout");
    assert!(matches!(
        err,
        Error::InvalidConfig {
            setting: "ClientBuilder::initial_timeout",
            ..
        }
    ));
    // SO_BUSY_POLL takes a C int of microseconds: a longer duration is a
    // configuration error before any socket is made, not an EINVAL.
    for duration in [Duration::MAX, Duration::from_secs(3600)] {
        let err = GreetClient::builder()
            .so_busy_poll(duration)
            .connect("127.0.0.1:9")
            .expect_err("beyond SO_BUSY_POLL's range");
        assert!(
            matches!(
                err,
                Error::InvalidConfig {
                    setting: "ClientBuilder::so_busy_poll",
                    ..
                }
            ),
            "{err:?}"
        );
    }
    let err = GreetClient::connect("no.such.host.invalid:1").expect_err("unresolvable");
    assert!(err.to_string().contains("no.such.host.invalid:1"), "{err}");
    let client = GreetClient::builder()
        .recv_buffer_size(64 * 1024)
        .connect("127.0.0.1:9")
        .expect("connect");
    assert_eq!(client.recv_buffer_size().requested, Some(64 * 1024));
    assert!(client.local_addr().ip().is_loopback());
    assert_ne!(client.local_addr().port(), 0);
}

#[test]
fn refused_as_loss_keeps_trying_until_the_attempts_run_out() {
    let addr = closed_port(V4);
    let client = GreetClient::builder()
        .initial_timeout(Duration::from_millis(5))
        .retries(3)
        .jitter(0.0)
        .refused_as_loss(true)
        .connect(addr)
        .expect("connect");
    let err = within_guard("send_recv to a closed port", move || {
        client.send_recv(b"anyone?").expect_err("nothing listens")
    });
    assert!(
        matches!(err, Error::Timeout { attempts: 4, .. }),
        "a refusal is a lost reply, not the end: {err:?}"
    );
}

#[test]
fn the_deadline_cuts_the_retries_short() {
    let server = GreetServer::bind(V4)
        .expect("bind")
        .spawn(|_: Request<'_>, _: &mut Vec<u8>| Action::Ignore)
        .expect("spawn");
    // Twenty retries would wait 50 ms x (2^21 - 1) in all; the deadline
    // ends the call after a handful.
    let client = GreetClient::builder()
        .initial_timeout(Duration::from_millis(50))
        .retries(20)
        .call_timeout(Duration::from_millis(300))
        .connect(server.local_addr())
        .expect("connect");
    let err = within_guard("a call with a deadline", move || {
        client.send_recv(b"hello?").expect_err("no reply")
    });
    match err {
        Error::Timeout {
            attempts, elapsed, ..
        } => {
            assert!((1..21).contains(&attempts), "{attempts} attempts");
            assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
}

#[test]
fn a_reply_that_fails_the_check_is_discarded_and_the_wait_goes_on() {
    // The relay answers every request with a wrong greeting first, then the
    // right one.
    let (relay_addr, relay_thread) = relayed_greet_server(1, |relay, reply, client| {
        util::send_to(relay, b"Hello, somebody else!", client).expect("wrong reply");
        util::send_to(relay, reply, client).expect("reply");
    });
    let client = GreetClient::builder()
        .initial_timeout(util::HANG_GUARD)
        .retries(0)
        .reply_check(udp_greet::is_greeting)
        .connect(relay_addr)
        .expect("connect");
    assert_eq!(client.send_recv(b"Tracy").expect("reply"), b"Hello, Tracy!");
    assert_eq!(client.discarded(), 1);
    let server = relay_thread.join().expect("relay");
    util::assert_balanced(&server.shutdown().expect("shutdown"));
}

/// A bound socket that never answers, and the address to send to it.
fn silent_port() -> (UdpSocket, SocketAddr) {
    let socket = UdpSocket::bind(V4).expect("bind");
    let addr = socket.local_addr().expect("addr");
    (socket, addr)
}

#[test]
fn a_wait_under_a_microsecond_still_ends() {
    // A read timeout that rounds to zero microseconds would mean "no
    // timeout": the call would never return.
    let (_silent, addr) = silent_port();
    let client = GreetClient::builder()
        .initial_timeout(Duration::from_nanos(500))
        .retries(0)
        .call_timeout(Duration::from_secs(1))
        .connect(addr)
        .expect("connect");
    let err = within_guard("a 500 ns wait", move || {
        client.send_recv(b"quick?").expect_err("no reply")
    });
    assert!(matches!(err, Error::Timeout { attempts: 1, .. }), "{err:?}");
    // Jittered retries of a 1 us timeout fall under 1 us about a quarter of
    // the time; a hundred calls of five attempts each meet that often.
    let client = GreetClient::builder()
        .initial_timeout(Duration::from_micros(1))
        .retries(4)
        .jitter(1.0)
        .connect(addr)
        .expect("connect");
    let err = within_guard("jittered 1 us waits", move || {
        (0..100)
            .map(|_| client.send_recv(b"quick?"))
            .find_map(|r| r.err().filter(|e| !e.is_timeout()))
    });
    assert!(err.is_none(), "every call times out: {err:?}");
    // Nothing is sent to a zero deadline either way: it is refused at once.
    let err = GreetClient::builder()
        .call_timeout(Duration::ZERO)
        .connect(addr)
        .expect_err("zero deadline");
    assert!(matches!(
        err,
        Error::InvalidConfig {
            setting: "ClientBuilder::call_timeout",
            ..
        }
    ));
}

#[test]
fn the_deadline_can_be_turned_off() {
    let (_silent, addr) = silent_port();
    let client = GreetClient::builder()
        .initial_timeout(Duration::from_millis(5))
        .retries(2)
        .call_timeout(None)
        .connect(addr)
        .expect("connect");
    let err = within_guard("a call without a deadline", move || {
        client.send_recv(b"hello?").expect_err("no reply")
    });
    assert!(matches!(err, Error::Timeout { attempts: 3, .. }), "{err:?}");
}

/// A server played by hand: answers the first request with `first`, then
/// with the greeting, from its own thread; returns its address.
fn answers_with(first: Vec<u8>, then_greet: bool) -> (SocketAddr, std::thread::JoinHandle<()>) {
    let (server, addr) = silent_port();
    server
        .set_read_timeout(Some(util::HANG_GUARD))
        .expect("timeout");
    let thread = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let (n, client) = util::recv_from(&server, &mut buf).expect("request");
        util::send_to(&server, &first, client).expect("first answer");
        if then_greet {
            let mut greeting = Vec::new();
            udp_greet::greet_into(&buf[..n], &mut greeting);
            util::send_to(&server, &greeting, client).expect("greeting");
        }
    });
    (addr, thread)
}

#[test]
fn a_datagram_too_large_to_check_is_discarded_and_the_wait_goes_on() {
    let (addr, server) = answers_with(vec![b'x'; 100], true);
    let client = GreetClient::builder()
        .initial_timeout(util::HANG_GUARD)
        .retries(0)
        .reply_check(udp_greet::is_greeting)
        .connect(addr)
        .expect("connect");
    let mut buf = [0u8; 32];
    let n = client
        .send_recv_into(b"Sarah", &mut buf)
        .expect("the greeting");
    assert_eq!(&buf[..n], b"Hello, Sarah!");
    assert_eq!(client.discarded(), 1);
    server.join().expect("server");

    // When nothing valid follows, the call says why it failed.
    let (addr, server) = answers_with(vec![b'x'; 100], false);
    // Long enough for the datagram to come first (emulated, far longer).
    let wait = match util::emulator::emulator() {
        Some(_) => Duration::from_secs(2),
        None => Duration::from_millis(20),
    };
    let client = GreetClient::builder()
        .initial_timeout(wait)
        .retries(0)
        .reply_check(udp_greet::is_greeting)
        .connect(addr)
        .expect("connect");
    let err = client
        .send_recv_into(b"Sarah", &mut buf)
        .expect_err("nothing fits");
    assert!(
        matches!(err, Error::ReplyTooLarge { capacity: 32, .. }),
        "{err:?}"
    );
    server.join().expect("server");

    // Without a check, the first datagram is the reply, and it does not fit.
    let (addr, server) = answers_with(vec![b'x'; 100], true);
    let client = GreetClient::builder()
        .initial_timeout(util::HANG_GUARD)
        .connect(addr)
        .expect("connect");
    let err = client
        .send_recv_into(b"Sarah", &mut buf)
        .expect_err("too large");
    assert!(matches!(err, Error::ReplyTooLarge { .. }), "{err:?}");
    server.join().expect("server");
}

#[test]
fn discarded_does_not_wait_for_a_call_in_progress() {
    let (silent, addr) = silent_port();
    silent
        .set_read_timeout(Some(util::HANG_GUARD))
        .expect("timeout");
    let client = std::sync::Arc::new(
        GreetClient::builder()
            .initial_timeout(Duration::from_secs(60))
            .retries(0)
            .call_timeout(None)
            .connect(addr)
            .expect("connect"),
    );
    let caller = {
        let client = client.clone();
        std::thread::spawn(move || client.send_recv(b"slow"))
    };
    // The request arrived: the call is in progress, waiting for a reply.
    let mut buf = [0u8; 64];
    let (_, from) = util::recv_from(&silent, &mut buf).expect("the request");
    let reader = client.clone();
    let discarded = within_guard("discarded() during a call", move || reader.discarded());
    assert_eq!(discarded, 0);
    util::send_to(&silent, b"done", from).expect("answer");
    assert_eq!(caller.join().expect("caller").expect("reply"), b"done");
}

#[test]
fn buffer_sizes_beyond_an_int_are_clamped_not_wrapped() {
    let (_silent, addr) = silent_port();
    let granted = |bytes: usize| {
        let client = GreetClient::builder()
            .recv_buffer_size(bytes)
            .send_buffer_size(bytes)
            .connect(addr)
            .expect("connect");
        (client.recv_buffer_size(), client.send_buffer_size())
    };
    let (largest_recv, largest_send) = granted(i32::MAX as usize);
    for bytes in [1usize << 32, (1 << 32) + 4096, usize::MAX] {
        let (recv, send) = granted(bytes);
        assert_eq!(recv.requested, Some(bytes));
        assert_eq!(recv.granted, largest_recv.granted, "SO_RCVBUF for {bytes}");
        assert_eq!(send.granted, largest_send.granted, "SO_SNDBUF for {bytes}");
        assert!(recv.is_clamped());
    }
}
