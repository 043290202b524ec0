//! Calls multiplexed by request id, and one client for many servers: both
//! clients, through a lossy network, against forged and unknown replies,
//! silent and refusing servers, and (async) cancellation at every await
//! point.
//!
//! The protocol is made up for the tests: a request is `call-<id>` (with
//! anything after the digits), and the greet server's reply to it is
//! `Hello, call-<id>!`, so the id is read from both.

mod proxy;
mod util;

use std::net::{SocketAddr, UdpSocket};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use udp_greet::{ClientBuilder, Error, GreetClient, GreetServer};
use util::{V4, assert_balanced};

/// The id of a request (`call-<id>…`) or of a reply (`Hello, call-<id>…`).
fn call_id(datagram: &[u8]) -> Option<u64> {
    let rest = datagram.strip_prefix(b"Hello, ").unwrap_or(datagram);
    let digits = rest.strip_prefix(b"call-")?;
    let end = digits
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(digits.len());
    std::str::from_utf8(digits.get(..end)?).ok()?.parse().ok()
}

fn greeter() -> udp_greet::ServerHandle {
    GreetServer::builder()
        .recv_buffer_size(BUFFER)
        .bind(V4)
        .expect("bind")
        .spawn(udp_greet::greet)
        .expect("spawn")
}

/// A port where nothing answers (a bound socket that never reads).
fn silent_port() -> (UdpSocket, SocketAddr) {
    let socket = UdpSocket::bind(V4).expect("bind");
    let addr = socket.local_addr().expect("addr");
    (socket, addr)
}

/// A port where nothing listens: bound, then closed.
fn closed_port() -> SocketAddr {
    silent_port().1
}

/// A hand-written server for one request: it receives it, sends each of
/// `before` (from `spoofer` if given, else from itself), then the greeting.
/// Bounded: it gives up after 10 s without a request.
fn scripted_server(
    before: Vec<Vec<u8>>,
    spoofer: Option<UdpSocket>,
) -> (thread::JoinHandle<()>, SocketAddr) {
    let socket = UdpSocket::bind(V4).expect("bind");
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let addr = socket.local_addr().expect("addr");
    let handle = thread::spawn(move || {
        let mut buf = [0u8; 1500];
        let Ok((len, client)) = socket.recv_from(&mut buf) else {
            return;
        };
        for datagram in &before {
            let from = spoofer.as_ref().unwrap_or(&socket);
            from.send_to(datagram, client).expect("send");
        }
        let mut reply = b"Hello, ".to_vec();
        reply.extend_from_slice(&buf[..len]);
        reply.push(b'!');
        socket.send_to(&reply, client).expect("send");
    });
    (handle, addr)
}

/// A hand-written server that answers one request only once `go` says so
/// (or 10 s have passed).
fn held_server() -> (thread::JoinHandle<()>, SocketAddr, mpsc::Sender<()>) {
    let socket = UdpSocket::bind(V4).expect("bind");
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let addr = socket.local_addr().expect("addr");
    let (go, wait) = mpsc::channel();
    let handle = thread::spawn(move || {
        let mut buf = [0u8; 1500];
        let Ok((len, client)) = socket.recv_from(&mut buf) else {
            return;
        };
        let _ = wait.recv_timeout(Duration::from_secs(10));
        let mut reply = b"Hello, ".to_vec();
        reply.extend_from_slice(&buf[..len]);
        reply.push(b'!');
        socket.send_to(&reply, client).expect("send");
    });
    (handle, addr, go)
}

/// The receive buffer a client with thousands of calls in flight on one
/// socket asks for: room for their replies.
const BUFFER: usize = 4 << 20;

fn with_ids(builder: ClientBuilder) -> ClientBuilder {
    builder.request_id(call_id)
}

fn expect_greeting(result: Result<Vec<u8>, Error>, name: &str) {
    let reply = result.unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(reply, format!("Hello, {name}!").as_bytes());
}

#[test]
fn ten_thousand_calls_from_100_threads_share_one_socket_through_a_lossy_network() {
    const THREADS: usize = 100;
    const RETRIES: u32 = 4;
    // Under an emulator every step takes many times longer: fewer calls,
    // each with more time.
    let (calls_each, timeout) = match util::emulator::emulator() {
        Some(_) => (10, Duration::from_secs(1)),
        None => (100, Duration::from_millis(100)),
    };
    let seed = proxy::seed();
    let server = greeter();
    let lossy = proxy::Proxy::start(server.local_addr(), seed);
    let client = with_ids(GreetClient::builder())
        .recv_buffer_size(BUFFER)
        .initial_timeout(timeout)
        .retries(RETRIES)
        .call_timeout(Duration::from_secs(60))
        .reply_check(udp_greet::is_greeting)
        .connect(lossy.addr)
        .expect("connect");
    let (mut wrong, mut failed) = (0u64, 0u64);
    thread::scope(|s| {
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let client = &client;
                s.spawn(move || {
                    let (mut wrong, mut failed) = (0u64, 0u64);
                    for i in 0..calls_each {
                        let name = format!("call-{}", t * calls_each + i);
                        match client.send_recv(name.as_bytes()) {
                            Ok(reply) if reply == format!("Hello, {name}!").as_bytes() => {}
                            Ok(_) => wrong += 1,
                            Err(Error::Timeout { .. }) => failed += 1,
                            Err(other) => panic!("unexpected error: {other}"),
                        }
                    }
                    (wrong, failed)
                })
            })
            .collect();
        for thread in threads {
            let (w, f) = thread.join().expect("client thread");
            wrong += w;
            failed += f;
        }
    });
    let sockets = util::udp_sockets_connected_to(lossy.addr);
    drop(lossy);
    let stats = server.shutdown().expect("shutdown");
    let calls = (THREADS * calls_each) as f64;
    let predicted = proxy::predicted_failures(calls, RETRIES, timeout);
    println!(
        "{calls} calls: {wrong} wrong, {failed} failed (at most {predicted:.1} predicted), \
         {} discarded ({} unmatched); {sockets:?} sockets connected to the proxy; server {stats:?}",
        client.discarded(),
        client.unmatched()
    );
    assert_eq!(wrong, 0, "a wrong reply was returned");
    assert!((failed as f64) <= predicted, "{failed} calls failed");
    assert_eq!(client.sockets(), 1);
    if let Some(sockets) = sockets {
        assert_eq!(sockets, 1, "the client holds exactly one socket");
    }
    // Duplicates and late replies came, and matched no call in flight.
    assert!(client.unmatched() > 0);
    assert_eq!(client.in_flight(), 0);
    assert_balanced(&stats);
}

#[test]
fn a_reply_with_an_unknown_id_is_discarded_and_counted() {
    let junk = vec![b"Hello, call-1007!".to_vec(), b"no id at all".to_vec()];
    let (server, addr) = scripted_server(junk, None);
    let client = with_ids(GreetClient::builder())
        .connect(addr)
        .expect("connect");
    expect_greeting(client.send_recv(b"call-7"), "call-7");
    server.join().expect("server");
    assert_eq!((client.unmatched(), client.discarded()), (2, 2));
}

#[test]
fn a_forged_reply_from_the_wrong_address_is_discarded() {
    let spoofer = UdpSocket::bind(V4).expect("bind");
    let forged = vec![b"Hello, call-7! (forged)".to_vec()];
    let (server, addr) = scripted_server(forged, Some(spoofer));
    let client = with_ids(GreetClient::builder()).bind(V4).expect("bind");
    // The forged reply arrives first, with the right id.
    expect_greeting(client.send_recv_to(addr, b"call-7"), "call-7");
    server.join().expect("server");
    assert_eq!(client.unmatched(), 1);
}

#[test]
fn one_bound_client_calls_three_servers_one_of_them_silent() {
    let (one, two) = (greeter(), greeter());
    let (_silent, quiet) = silent_port();
    let short = |b: ClientBuilder| b.initial_timeout(Duration::from_millis(50)).retries(1);
    // Without ids: one call at a time, the socket connected to each server
    // for its call.
    let client = short(GreetClient::builder()).bind(V4).expect("bind");
    assert_eq!(client.peer_addr(), None);
    expect_greeting(client.send_recv_to(one.local_addr(), b"call-1"), "call-1");
    assert!(matches!(
        client.send_recv_to(quiet, b"call-2"),
        Err(Error::Timeout { addr, .. }) if addr == quiet
    ));
    expect_greeting(client.send_recv_to(two.local_addr(), b"call-3"), "call-3");
    expect_greeting(client.send_recv_to(one.local_addr(), b"call-4"), "call-4");
    // With ids: all three at once, on one socket.
    let client = short(with_ids(GreetClient::builder()))
        .bind(V4)
        .expect("bind");
    thread::scope(|s| {
        let silent = s.spawn(|| client.send_recv_to(quiet, b"call-5"));
        let first = s.spawn(|| client.send_recv_to(one.local_addr(), b"call-5"));
        let second = s.spawn(|| client.send_recv_to(two.local_addr(), b"call-5"));
        expect_greeting(first.join().expect("thread"), "call-5");
        expect_greeting(second.join().expect("thread"), "call-5");
        let silent = silent.join().expect("thread");
        assert!(matches!(silent, Err(Error::Timeout { addr, .. }) if addr == quiet));
    });
    assert_eq!(client.sockets(), 1);
}

#[test]
fn a_refusal_from_one_destination_fails_only_the_calls_to_it() {
    let closed = closed_port();
    let (held, addr, go) = held_server();
    let client = with_ids(GreetClient::builder())
        .initial_timeout(Duration::from_millis(100))
        .retries(1)
        .call_timeout(Duration::from_secs(5))
        .bind(V4)
        .expect("bind");
    thread::scope(|s| {
        let waiting = s.spawn(|| client.send_recv_to(addr, b"call-1"));
        // The held call is in flight when the refusal comes.
        util::wait_until("the held call to be in flight", || client.in_flight() == 1);
        if cfg!(target_os = "linux") {
            let refused = client.send_recv_to(closed, b"call-1");
            assert!(
                matches!(refused, Err(Error::Refused { addr, .. }) if addr == closed),
                "{refused:?}"
            );
            go.send(()).expect("release the server");
        } else {
            // Elsewhere an unconnected socket is not told who refused: the
            // call to the closed port runs out its attempts, as long as the
            // held call's, so the server is released while it runs.
            let refused = s.spawn(|| client.send_recv_to(closed, b"call-1"));
            go.send(()).expect("release the server");
            let refused = refused.join().expect("thread");
            assert!(matches!(refused, Err(Error::Timeout { .. })), "{refused:?}");
        }
        expect_greeting(waiting.join().expect("thread"), "call-1");
    });
    held.join().expect("server");
    // Without ids a bound client's socket is not connected either: the
    // refusal is matched to its destination where the platform says who
    // refused (Linux), and the call times out elsewhere.
    let plain = GreetClient::builder()
        .initial_timeout(Duration::from_millis(100))
        .retries(1)
        .bind(V4)
        .expect("bind");
    let refused = plain.send_recv_to(closed, b"call-2");
    if cfg!(target_os = "linux") {
        assert!(
            matches!(refused, Err(Error::Refused { addr, .. }) if addr == closed),
            "{refused:?}"
        );
    } else {
        assert!(matches!(refused, Err(Error::Timeout { .. })), "{refused:?}");
    }
}

/// Refusals of other destinations keep coming while calls run: a send to
/// a live server that the socket answers with one of them (the request not
/// sent) is tried again, and never fails as that server's refusal. (Found
/// by an outside probe: about 1 call in 70 to the live server failed as
/// refused when the send was tried again only once.)
#[test]
fn a_stream_of_refusals_fails_no_call_to_a_live_server() {
    if !cfg!(target_os = "linux") {
        // Elsewhere a refusal on an unconnected socket names no one; the
        // single-refusal test covers what holds there.
        return;
    }
    const CALLS: usize = 150;
    let live = greeter();
    let closed: Vec<SocketAddr> = (0..4).map(|_| closed_port()).collect();
    let client = with_ids(GreetClient::builder())
        .initial_timeout(Duration::from_millis(200))
        .retries(2)
        .bind(V4)
        .expect("bind");
    let (client, addr) = (&client, live.local_addr());
    thread::scope(|s| {
        for &port in &closed {
            s.spawn(move || {
                for i in 0..CALLS {
                    let call = client.send_recv_to(port, format!("call-{i}").as_bytes());
                    assert!(
                        matches!(call, Err(Error::Refused { addr, .. }) if addr == port),
                        "{call:?}"
                    );
                }
            });
        }
        let live_calls: Vec<_> = (0..4)
            .map(|t| {
                s.spawn(move || {
                    (0..CALLS)
                        .filter(|i| {
                            let name = format!("call-{}", t * 1_000 + i);
                            let reply = client.send_recv_to(addr, name.as_bytes());
                            if let Err(e) = &reply {
                                eprintln!("DEBUG {name}: {e:?}");
                            }
                            reply.map_or(true, |r| r != format!("Hello, {name}!").as_bytes())
                        })
                        .count()
                })
            })
            .collect();
        let failed: usize = live_calls
            .into_iter()
            .map(|t| t.join().expect("thread"))
            .sum();
        assert_eq!(failed, 0, "calls to the live server failed");
    });
}

/// A bound client's send that fails on its own (a network the socket
/// cannot reach: an IPv6 loopback socket calling an IPv4 server) fails the
/// call at once; it was asked for again without end, past the call timeout.
#[test]
fn a_send_that_fails_on_its_own_fails_the_call_at_once() {
    if !util::has_ipv6() {
        return;
    }
    let live = greeter();
    for builder in [GreetClient::builder(), with_ids(GreetClient::builder())] {
        let client = builder
            .initial_timeout(Duration::from_millis(50))
            .retries(0)
            .call_timeout(Duration::from_millis(200))
            .bind("[::1]:0")
            .expect("bind");
        let addr = live.local_addr();
        let err = util::within_guard("a call to an unreachable network", move || {
            client
                .send_recv_to(addr, b"call-1")
                .expect_err("unreachable")
        });
        if cfg!(target_os = "linux") {
            assert!(
                !matches!(err, Error::Timeout { .. }) && err.to_string().contains("send to"),
                "{err:?}"
            );
        } else {
            // Elsewhere the system does not say whose error it is: the
            // send is asked for again, until the call timeout (without ids)
            // or its tries run out (with them, its error is returned).
            assert!(
                matches!(err, Error::Timeout { .. }) || err.to_string().contains("send to"),
                "{err:?}"
            );
        }
    }
}

#[test]
fn ids_in_use_missing_ids_and_wrong_destinations_are_refused() {
    let (held, addr, go) = held_server();
    let client = with_ids(GreetClient::builder())
        .connect(addr)
        .expect("connect");
    thread::scope(|s| {
        let first = s.spawn(|| client.send_recv(b"call-3"));
        util::wait_until("the first call to be in flight", || client.in_flight() == 1);
        assert!(matches!(
            client.send_recv(b"call-3 again"),
            Err(Error::IdInUse { id: 3, .. })
        ));
        go.send(()).expect("release the server");
        expect_greeting(first.join().expect("thread"), "call-3");
    });
    held.join().expect("server");
    assert!(matches!(
        client.send_recv(b"no id"),
        Err(Error::NoRequestId { addr: a, .. }) if a == addr
    ));
    let elsewhere = closed_port();
    assert!(matches!(
        client.send_recv_to(elsewhere, b"call-4"),
        Err(Error::WrongDestination { peer: Some(p), .. }) if p == addr
    ));
    let bound = GreetClient::builder().bind(V4).expect("bind");
    let err = bound
        .send_recv(b"call-5")
        .expect_err("no server of its own");
    assert!(matches!(err, Error::WrongDestination { peer: None, .. }));
    assert!(err.to_string().contains("send_recv_to"), "{err}");
}

#[test]
fn the_sockets_setting_is_checked_and_spreads_calls() {
    let invalid = |builder: ClientBuilder, local: &str| match builder.bind(local) {
        Err(Error::InvalidConfig { setting, .. }) => setting,
        other => panic!("expected InvalidConfig, got {other:?}"),
    };
    assert_eq!(
        invalid(with_ids(GreetClient::builder()).sockets(0), V4),
        "ClientBuilder::sockets"
    );
    assert_eq!(
        invalid(with_ids(GreetClient::builder()).sockets(1025), V4),
        "ClientBuilder::sockets"
    );
    assert_eq!(
        invalid(GreetClient::builder().sockets(2), V4),
        "ClientBuilder::sockets"
    );
    let fixed = UdpSocket::bind(V4)
        .expect("bind")
        .local_addr()
        .expect("addr");
    assert_eq!(
        invalid(
            with_ids(GreetClient::builder()).sockets(2),
            &fixed.to_string()
        ),
        "ClientBuilder::sockets"
    );
    let server = greeter();
    let client = with_ids(GreetClient::builder())
        .sockets(4)
        .connect(server.local_addr())
        .expect("connect");
    assert_eq!(client.sockets(), 4);
    thread::scope(|s| {
        for t in 0..8 {
            let client = &client;
            s.spawn(move || {
                for i in 0..50 {
                    let name = format!("call-{}", t * 50 + i);
                    expect_greeting(client.send_recv(name.as_bytes()), &name);
                }
            });
        }
    });
    let stats = server.shutdown().expect("shutdown");
    assert_eq!(stats.replied, 400);
}

/// A greet server on the IPv6 loopback.
fn greeter_v6() -> udp_greet::ServerHandle {
    GreetServer::bind(util::V6)
        .expect("bind")
        .spawn(udp_greet::greet)
        .expect("spawn")
}

/// A server that answers a request with `big` (which its check accepts,
/// but which is larger than the caller's buffer), then with the greeting.
fn oversized_then_greeting(big: Vec<u8>) -> (thread::JoinHandle<()>, SocketAddr) {
    scripted_server(vec![big], None)
}

/// Takes a greeting or anything that starts with the request's greeting.
fn starts_like_greeting(request: &[u8], reply: &[u8]) -> bool {
    let mut greeting = b"Hello, ".to_vec();
    greeting.extend_from_slice(request);
    reply.starts_with(&greeting)
}

#[test]
fn a_bound_client_calls_servers_of_both_families_in_any_order() {
    if !util::has_ipv6() {
        return;
    }
    let (v4, v6) = (greeter(), greeter_v6());
    let mapped = SocketAddr::from((
        std::net::Ipv4Addr::LOCALHOST.to_ipv6_mapped(),
        v4.local_addr().port(),
    ));
    for ids in [false, true] {
        let mut builder = GreetClient::builder();
        if ids {
            builder = with_ids(builder);
        }
        let client = builder.bind("[::]:0").expect("bind");
        // Each server after the other, both ways round: no call pins the
        // socket to a family or a source address.
        for (i, server) in [
            v6.local_addr(),
            v4.local_addr(),
            v6.local_addr(),
            mapped,
            v6.local_addr(),
        ]
        .into_iter()
        .enumerate()
        {
            let name = format!("call-{i}");
            expect_greeting(client.send_recv_to(server, name.as_bytes()), &name);
        }
    }
    // An IPv4 client cannot reach an IPv6 server, and says what to do.
    let v4_only = GreetClient::builder().bind(V4).expect("bind");
    let err = v4_only
        .send_recv_to(v6.local_addr(), b"call-9")
        .expect_err("an IPv4 socket");
    assert!(matches!(err, Error::AddressFamily { .. }), "{err:?}");
    assert!(err.to_string().contains("[::]:0"), "{err}");
}

#[test]
fn a_reply_too_large_to_check_is_discarded_and_the_wait_goes_on() {
    for ids in [false, true] {
        let (server, addr) = oversized_then_greeting(b"Hello, call-7! and far too much".to_vec());
        let mut builder = GreetClient::builder().reply_check(starts_like_greeting);
        if ids {
            builder = with_ids(builder);
        }
        let client = builder.connect(addr).expect("connect");
        let mut buf = [0u8; 16];
        let len = client
            .send_recv_into(b"call-7", &mut buf)
            .unwrap_or_else(|e| panic!("ids {ids}: {e}"));
        assert_eq!(&buf[..len], b"Hello, call-7!", "ids {ids}");
        assert_eq!(client.discarded(), 1, "ids {ids}");
        server.join().expect("server");
    }
}

#[test]
fn a_call_waiting_for_its_turn_ends_at_its_call_timeout() {
    // Without ids a blocking client's calls take turns. Three calls to a
    // silent server each hold the turn for as long as they may: the last
    // must still end when its own call timeout says (it ended after all
    // three timeouts, one after the other, when the turn was a plain lock).
    const LIMIT: Duration = Duration::from_millis(300);
    let (silent, quiet) = silent_port();
    silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let client = GreetClient::builder()
        .initial_timeout(Duration::from_secs(10))
        .retries(0)
        .call_timeout(LIMIT)
        .bind(V4)
        .expect("bind");
    thread::scope(|s| {
        let first = s.spawn(|| client.send_recv_to(quiet, b"call-1"));
        // The first call's request has arrived: it holds the turn.
        let mut buf = [0u8; 64];
        silent.recv_from(&mut buf).expect("the first request");
        let timed = || {
            let started = std::time::Instant::now();
            let result = client.send_recv_to(quiet, b"call-2");
            (result, started.elapsed())
        };
        let second = s.spawn(timed);
        let third = s.spawn(timed);
        for (result, took) in [
            second.join().expect("thread"),
            third.join().expect("thread"),
        ] {
            assert!(matches!(result, Err(Error::Timeout { .. })), "{result:?}");
            assert!(took <= LIMIT + LIMIT / 2, "{took:?}, promised {LIMIT:?}");
        }
        let first = first.join().expect("thread");
        assert!(
            matches!(first, Err(Error::Timeout { attempts: 1, .. })),
            "{first:?}"
        );
    });
}

#[cfg(feature = "tokio")]
mod tokio_client {
    use super::*;
    use udp_greet::tokio as aio;
    use util::{CancelAfter, guarded};

    fn with_ids(builder: ClientBuilder<aio::Tokio>) -> ClientBuilder<aio::Tokio> {
        builder.request_id(call_id)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ten_thousand_concurrent_calls_share_one_socket_through_a_lossy_network() {
        let (calls, timeout) = match util::emulator::emulator() {
            Some(_) => (1_000, Duration::from_secs(1)),
            None => (10_000, Duration::from_millis(100)),
        };
        const RETRIES: u32 = 4;
        let seed = proxy::seed();
        let server = greeter();
        let lossy = proxy::Proxy::start(server.local_addr(), seed);
        let client = with_ids(aio::GreetClient::builder())
            .recv_buffer_size(BUFFER)
            .max_in_flight(calls)
            .initial_timeout(timeout)
            .retries(RETRIES)
            .call_timeout(Duration::from_secs(60))
            .reply_check(udp_greet::is_greeting)
            .connect(lossy.addr)
            .await
            .expect("connect");
        let tasks: Vec<_> = (0..calls)
            .map(|i| {
                let client = client.clone();
                tokio::spawn(async move {
                    let name = format!("call-{i}");
                    match client.send_recv(name.as_bytes()).await {
                        Ok(reply) if reply == format!("Hello, {name}!").as_bytes() => Ok(true),
                        Ok(_) => Ok(false),
                        Err(Error::Timeout { .. }) => Err(()),
                        Err(other) => panic!("unexpected error: {other}"),
                    }
                })
            })
            .collect();
        let (mut wrong, mut failed) = (0u64, 0u64);
        let (mut most_in_flight, mut most_sockets) = (0, None);
        for (i, call) in tasks.into_iter().enumerate() {
            most_in_flight = most_in_flight.max(client.in_flight());
            if i % 500 == 0 {
                let now = util::udp_sockets_connected_to(lossy.addr);
                most_sockets = most_sockets.max(now);
            }
            match util::guarded_within(
                "the calls",
                Duration::from_secs(60) + util::HANG_GUARD,
                call,
            )
            .await
            .expect("join")
            {
                Ok(true) => {}
                Ok(false) => wrong += 1,
                Err(()) => failed += 1,
            }
        }
        drop(lossy);
        let stats = server.shutdown().expect("shutdown");
        let predicted = proxy::predicted_failures(calls as f64, RETRIES, timeout);
        println!(
            "{calls} calls: {wrong} wrong, {failed} failed (at most {predicted:.1} predicted), \
             {} discarded ({} unmatched), at most {most_in_flight} in flight seen; \
             at most {most_sockets:?} sockets connected to the proxy; server {stats:?}",
            client.discarded(),
            client.unmatched()
        );
        assert_eq!(wrong, 0, "a wrong reply was returned");
        assert!((failed as f64) <= predicted, "{failed} calls failed");
        assert_eq!(client.open_sockets(), 1);
        if let Some(sockets) = most_sockets {
            assert_eq!(sockets, 1, "the client holds exactly one socket");
        }
        assert!(client.unmatched() > 0);
        assert_balanced(&stats);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cancellation_at_every_await_point_misdirects_nothing() {
        // Replies come 20 ms late; the first attempt waits 5 ms, so a call
        // resends before its answer comes, and a cancelled call's answer
        // comes while the next calls wait.
        let server = aio::GreetServer::bind(V4)
            .expect("bind")
            .spawn(|request: aio::Request| async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                Some(request.reply_with(udp_greet::greet_into))
            })
            .expect("spawn");
        let client = with_ids(aio::GreetClient::builder())
            .max_in_flight(1)
            .initial_timeout(Duration::from_millis(5))
            .retries(5)
            .connect(server.local_addr())
            .await
            .expect("connect");
        let mut cut_points = 0;
        let mut next_id = 1_000_000;
        for polls in 0.. {
            assert!(polls < 100, "a call kept going past 100 polls");
            // Another call holds the only turn for the cancelled one's
            // first polls: the wait for a turn is an await point too.
            let holder = {
                let client = client.clone();
                tokio::spawn(async move { client.send_recv(b"call-999999").await })
            };
            tokio::task::yield_now().await;
            let name = format!("call-{polls}");
            let call = CancelAfter {
                inner: Some(Box::pin(client.send_recv(name.as_bytes()))),
                polls,
            };
            let finished = guarded("a cancelled call", call).await;
            let held = guarded("the holder", holder).await.expect("join");
            expect_greeting(held, "call-999999");
            // No reply check: only the ids keep the cancelled call's late
            // reply from these calls.
            for _ in 0..2 {
                next_id += 1;
                let next = format!("call-{next_id}");
                let reply = guarded("the next call", client.send_recv(next.as_bytes())).await;
                expect_greeting(reply, &next);
            }
            assert_eq!(client.in_flight(), 0, "a cancelled call left its place");
            match finished {
                None => cut_points += 1,
                Some(reply) => {
                    expect_greeting(reply, &name);
                    break;
                }
            }
        }
        println!(
            "cancelled at {cut_points} await points; {} unmatched",
            client.unmatched()
        );
        assert!(
            cut_points >= 3,
            "the turn, the first wait and a resend's wait"
        );
        // Late replies to cancelled calls came and matched nothing.
        assert!(client.unmatched() > 0);
        assert_eq!(client.open_sockets(), 1);
        let stats = server.shutdown().await.expect("shutdown");
        assert_balanced(&stats);
    }

    /// Calls started all at once on a new client, on a one-thread runtime:
    /// each call's first send comes before the runtime has seen the new
    /// socket's readiness, so many of them wait to send. Every one must be
    /// woken (tokio's `poll_send` keeps only the last waker: a client using
    /// it left all but one of these calls waiting forever).
    #[tokio::test(flavor = "current_thread")]
    async fn calls_waiting_together_to_send_on_a_new_socket_all_go_out() {
        const CALLS: u64 = 256;
        let server = greeter();
        for bound in [false, true] {
            // Room for every reply at once; a reply the kernel still drops
            // is asked for again a second later.
            let builder = with_ids(aio::GreetClient::builder())
                .max_in_flight(CALLS as usize)
                .recv_buffer_size(BUFFER)
                .initial_timeout(Duration::from_secs(1));
            let client = if bound {
                builder.bind(V4).await
            } else {
                builder.connect(server.local_addr()).await
            }
            .expect("client");
            let addr = server.local_addr();
            let calls: Vec<_> = (0..CALLS)
                .map(|i| {
                    let client = client.clone();
                    tokio::spawn(async move {
                        let name = format!("call-{i}");
                        let reply = match bound {
                            true => client.send_recv_to(addr, name.as_bytes()).await,
                            false => client.send_recv(name.as_bytes()).await,
                        };
                        (name, reply)
                    })
                })
                .collect();
            for call in calls {
                let (name, reply) = guarded("a call", call).await.expect("join");
                expect_greeting(reply, &name);
            }
            assert_eq!(client.in_flight(), 0);
        }
        let stats = server.shutdown().expect("shutdown");
        assert_balanced(&stats);
        assert!(stats.replied >= 2 * CALLS, "{stats:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unknown_ids_and_forged_replies_are_discarded() {
        let junk = vec![b"Hello, call-1007!".to_vec(), b"no id at all".to_vec()];
        let (server, addr) = scripted_server(junk, None);
        let client = with_ids(aio::GreetClient::builder())
            .connect(addr)
            .await
            .expect("connect");
        expect_greeting(
            guarded("the call", client.send_recv(b"call-7")).await,
            "call-7",
        );
        server.join().expect("server");
        assert_eq!((client.unmatched(), client.discarded()), (2, 2));

        let spoofer = UdpSocket::bind(V4).expect("bind");
        let forged = vec![b"Hello, call-7! (forged)".to_vec()];
        let (server, addr) = scripted_server(forged, Some(spoofer));
        let client = with_ids(aio::GreetClient::builder())
            .bind(V4)
            .await
            .expect("bind");
        let reply = guarded("the call", client.send_recv_to(addr, b"call-7")).await;
        expect_greeting(reply, "call-7");
        server.join().expect("server");
        assert_eq!(client.unmatched(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_bound_client_calls_three_servers_and_a_refusal_fails_only_its_calls() {
        let (one, two) = (greeter(), greeter());
        let (_silent, quiet) = silent_port();
        let closed = closed_port();
        for ids in [false, true] {
            let mut builder = aio::GreetClient::builder()
                .initial_timeout(Duration::from_millis(50))
                .retries(1);
            if ids {
                builder = with_ids(builder);
            }
            let client = builder.bind(V4).await.expect("bind");
            // Under Wine a refusal on a connected tokio socket (without ids)
            // stalls tokio itself: see the gap's docs.
            let closed_call = async {
                if !ids && util::emulator::WINE_TOKIO_REFUSAL_STALLS.skips_part() {
                    return None;
                }
                let call = client.send_recv_to(closed, b"call-1");
                Some(guarded("a call to a closed port", call).await)
            };
            let (a, b, silent, refused) = tokio::join!(
                guarded(
                    "a call to a server",
                    client.send_recv_to(one.local_addr(), b"call-1")
                ),
                guarded(
                    "a call to another",
                    client.send_recv_to(two.local_addr(), b"call-1")
                ),
                guarded(
                    "a call to a silent port",
                    client.send_recv_to(quiet, b"call-1")
                ),
                closed_call,
            );
            expect_greeting(a, "call-1");
            expect_greeting(b, "call-1");
            assert!(matches!(silent, Err(Error::Timeout { addr, .. }) if addr == quiet));
            match refused {
                None => {}
                // An unconnected socket off Linux is not told who refused.
                Some(refused) if ids && !cfg!(target_os = "linux") => {
                    assert!(matches!(refused, Err(Error::Timeout { .. })), "{refused:?}");
                }
                Some(refused) => assert!(
                    matches!(refused, Err(Error::Refused { addr, .. }) if addr == closed),
                    "ids {ids}: {refused:?}"
                ),
            }
            if ids {
                assert_eq!(client.open_sockets(), 1);
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn families_in_any_order_and_replies_too_large_to_check() {
        if util::has_ipv6() {
            let (v4, v6) = (greeter(), greeter_v6());
            for ids in [false, true] {
                let mut builder = aio::GreetClient::builder().max_in_flight(1);
                if ids {
                    builder = with_ids(builder);
                }
                let client = builder.bind("[::]:0").await.expect("bind");
                let order = [
                    v6.local_addr(),
                    v4.local_addr(),
                    v6.local_addr(),
                    v4.local_addr(),
                ];
                for (i, server) in order.into_iter().enumerate() {
                    let name = format!("call-{i}");
                    let reply =
                        guarded("a call", client.send_recv_to(server, name.as_bytes())).await;
                    expect_greeting(reply, &name);
                }
            }
        }
        for ids in [false, true] {
            let (server, addr) =
                oversized_then_greeting(b"Hello, call-7! and far too much".to_vec());
            let mut builder = aio::GreetClient::builder().reply_check(starts_like_greeting);
            if ids {
                builder = with_ids(builder);
            }
            let client = builder.connect(addr).await.expect("connect");
            let mut buf = [0u8; 16];
            let len = guarded("the call", client.send_recv_into(b"call-7", &mut buf))
                .await
                .unwrap_or_else(|e| panic!("ids {ids}: {e}"));
            assert_eq!(&buf[..len], b"Hello, call-7!", "ids {ids}");
            assert_eq!(client.discarded(), 1, "ids {ids}");
            server.join().expect("server");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_receive_task_ends_with_the_client() {
        let server = greeter();
        let client = with_ids(aio::GreetClient::builder())
            .sockets(2)
            .connect(server.local_addr())
            .await
            .expect("connect");
        let metrics = tokio::runtime::Handle::current().metrics();
        let tasks = metrics.num_alive_tasks();
        expect_greeting(client.send_recv(b"call-1").await, "call-1");
        drop(client);
        util::wait_until_async("the receive tasks to end", || {
            metrics.num_alive_tasks() + 2 <= tasks
        })
        .await;
    }
}
