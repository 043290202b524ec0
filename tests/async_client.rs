//! The async client (feature `tokio`): the blocking client's policies on
//! every call, many calls at once on one client with a socket each, a
//! bounded number of sockets, and cancellation at every await point.
#![cfg(feature = "tokio")]

mod on_time;
mod proxy;
mod util;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use udp_greet::Error;
use udp_greet::tokio as aio;
use util::{CancelAfter, V4, assert_balanced, guarded};

/// A greet server whose handler waits `delay` before answering.
fn slow_greeter(delay: Duration) -> aio::ServerHandle {
    aio::GreetServer::bind(V4)
        .expect("bind")
        .spawn(move |request: aio::Request| async move {
            tokio::time::sleep(delay).await;
            Some(request.reply_with(udp_greet::greet_into))
        })
        .expect("spawn")
}

/// A port where nothing answers (a bound socket that never reads).
fn silent_port() -> (std::net::UdpSocket, SocketAddr) {
    let socket = std::net::UdpSocket::bind(V4).expect("bind");
    let addr = socket.local_addr().expect("addr");
    (socket, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greets_like_the_blocking_client() {
    let server = aio::GreetServer::bind(V4)
        .expect("bind")
        .spawn(aio::greet)
        .expect("spawn");
    let client = aio::GreetClient::connect(server.local_addr())
        .await
        .expect("connect");
    for name in ["Michael", "Tracy", "Sarah", ""] {
        let reply = guarded("a call", client.send_recv(name.as_bytes()))
            .await
            .expect("reply");
        assert_eq!(reply, format!("Hello, {name}!").as_bytes());
    }
    let mut buf = [0u8; 32];
    let n = client
        .send_recv_into(b"into", &mut buf)
        .await
        .expect("reply");
    assert_eq!(&buf[..n], b"Hello, into!");
    // Too large for the caller's buffer, without a check: the error says so.
    let mut small = [0u8; 4];
    match client.send_recv_into(b"Sarah", &mut small).await {
        Err(Error::ReplyTooLarge { capacity: 4, .. }) => {}
        other => panic!("expected ReplyTooLarge, got {other:?}"),
    }
    // Sequential calls reuse one socket.
    assert_eq!(client.open_sockets(), 1);
    let stats = server.shutdown().await.expect("shutdown");
    assert_balanced(&stats);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_retries_and_deadline_hold() {
    let (_silent, addr) = silent_port();
    let client = aio::GreetClient::builder()
        .initial_timeout(Duration::from_millis(5))
        .retries(3)
        .call_timeout(None)
        .connect(addr)
        .await
        .expect("connect");
    match guarded("a call", client.send_recv(b"x")).await {
        Err(Error::Timeout { attempts: 4, .. }) => {}
        other => panic!("expected a timeout after 4 attempts, got {other:?}"),
    }
    // The deadline cuts the retries short: 5 + 10 + 20 ms of waits do not
    // fit in 12 ms, so fewer than 4 attempts are made.
    let client = aio::GreetClient::builder()
        .initial_timeout(Duration::from_millis(5))
        .retries(3)
        .jitter(0.0)
        .call_timeout(Duration::from_millis(12))
        .connect(addr)
        .await
        .expect("connect");
    match guarded("a call", client.send_recv(b"x")).await {
        Err(Error::Timeout { attempts, .. }) => assert!((1..4).contains(&attempts), "{attempts}"),
        other => panic!("expected a timeout, got {other:?}"),
    }
    // Sub-microsecond and zero-retry extremes end, too.
    let client = aio::GreetClient::builder()
        .initial_timeout(Duration::from_nanos(1))
        .retries(0)
        .connect(addr)
        .await
        .expect("connect");
    match guarded("a call", client.send_recv(b"x")).await {
        Err(Error::Timeout { attempts: 1, .. }) => {}
        other => panic!("expected a timeout after 1 attempt, got {other:?}"),
    }
    // Sockets that timed out had a request outstanding: closed, not kept.
    assert_eq!(client.open_sockets(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusal_is_an_error_or_a_loss_as_configured() {
    if util::emulator::WINE_TOKIO_REFUSAL_STALLS.skips() {
        return;
    }
    let addr = {
        let (socket, addr) = silent_port();
        drop(socket);
        addr
    };
    // At once, not at the end of the wait (or at the next send): with no
    // retry and a timeout past the guard, a refusal noticed only when the
    // wait ends fails the test.
    let client = aio::GreetClient::builder()
        .retries(0)
        .initial_timeout(util::HANG_GUARD * 3)
        .call_timeout(None)
        .connect(addr)
        .await
        .expect("connect");
    match guarded("a call", client.send_recv(b"x")).await {
        Err(Error::Refused { addr: a, .. }) => assert_eq!(a, addr),
        other => panic!("expected Refused, got {other:?}"),
    }
    let client = aio::GreetClient::builder()
        .initial_timeout(Duration::from_millis(5))
        .retries(2)
        .refused_as_loss(true)
        .connect(addr)
        .await
        .expect("connect");
    match guarded("a call", client.send_recv(b"x")).await {
        Err(Error::Timeout { attempts: 3, .. }) => {}
        other => panic!("expected a timeout after 3 attempts, got {other:?}"),
    }
}

/// A server that answers each request twice (a duplicating network), and
/// answers `wrong` with someone else's greeting first.
fn doubling_server() -> (std::thread::JoinHandle<()>, SocketAddr) {
    let socket = std::net::UdpSocket::bind(V4).expect("bind");
    socket
        .set_read_timeout(Some(util::HANG_GUARD))
        .expect("timeout");
    let addr = socket.local_addr().expect("addr");
    let thread = std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = util::recv_from(&socket, &mut buf) {
            let name = &buf[..n];
            if name == b"stop" {
                return;
            }
            if name == b"wrong" {
                let _ = util::send_to(&socket, b"Hello, someone else!", from);
            }
            let mut reply = Vec::new();
            udp_greet::greet_into(name, &mut reply);
            let _ = util::send_to(&socket, &reply, from);
            let _ = util::send_to(&socket, &reply, from);
        }
    });
    (thread, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_datagrams_are_drained_before_reuse_and_checks_reject() {
    let (server, addr) = doubling_server();
    let client = aio::GreetClient::builder()
        .max_in_flight(1)
        .connect(addr)
        .await
        .expect("connect");
    let first = guarded("a call", client.send_recv(b"one"))
        .await
        .expect("reply");
    assert_eq!(first, b"Hello, one!");
    // Let the duplicate land on the idle socket, then call again: without a
    // reply check, only the drain keeps "Hello, one!" from being taken as
    // the answer to "two".
    let probe = std::net::UdpSocket::bind(V4).expect("bind");
    util::send_to(&probe, b"sync", addr).expect("send");
    let mut buf = [0u8; 64];
    probe
        .set_read_timeout(Some(util::HANG_GUARD))
        .expect("timeout");
    util::recv_from(&probe, &mut buf).expect("the server has answered the earlier request too");
    let second = guarded("a call", client.send_recv(b"two"))
        .await
        .expect("reply");
    assert_eq!(second, b"Hello, two!");
    assert!(client.discarded() >= 1, "the duplicate was drained");
    // With the greet check, someone else's greeting is discarded.
    let checked = aio::GreetClient::builder()
        .reply_check(udp_greet::is_greeting)
        .connect(addr)
        .await
        .expect("connect");
    assert_eq!(
        guarded("a call", checked.send_recv(b"wrong"))
            .await
            .expect("reply"),
        b"Hello, wrong!"
    );
    assert_eq!(checked.discarded(), 1);
    util::send_to(&probe, b"stop", addr).expect("send");
    server.join().expect("server thread");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_never_holds_more_sockets_than_the_limit() {
    const LIMIT: usize = 8;
    const CALLS: usize = 2_000;
    let server = slow_greeter(Duration::from_millis(1));
    let client = aio::GreetClient::builder()
        .max_in_flight(LIMIT)
        .reply_check(udp_greet::is_greeting)
        .connect(server.local_addr())
        .await
        .expect("connect");
    let most = Arc::new(AtomicUsize::new(0));
    let calls: Vec<_> = (0..CALLS)
        .map(|i| {
            let (client, most) = (client.clone(), most.clone());
            tokio::spawn(async move {
                let name = format!("burst-{i}");
                let reply = client.send_recv(name.as_bytes()).await;
                most.fetch_max(client.open_sockets(), Ordering::SeqCst);
                (name, reply)
            })
        })
        .collect();
    for call in calls {
        let (name, reply) = guarded("a call", call).await.expect("join");
        assert_eq!(reply.expect("reply"), format!("Hello, {name}!").as_bytes());
    }
    assert!(
        most.load(Ordering::SeqCst) <= LIMIT,
        "{} sockets",
        most.load(Ordering::SeqCst)
    );
    assert!(client.open_sockets() <= LIMIT);
    let stats = server.shutdown().await.expect("shutdown");
    assert_balanced(&stats);
    assert_eq!(stats.replied, CALLS as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_concurrent_calls_through_a_lossy_network_get_no_wrong_reply() {
    const RETRIES: u32 = 4;
    const DEADLINE: Duration = Duration::from_secs(30);
    // Under an emulator every step takes many times longer: fewer calls,
    // each with more time.
    let (count, timeout) = match util::emulator::emulator() {
        Some(_) => (1_000, Duration::from_secs(1)),
        None => (10_000, Duration::from_millis(100)),
    };
    let seed = proxy::seed();
    let server = aio::GreetServer::bind(V4)
        .expect("bind")
        .spawn(aio::greet)
        .expect("spawn");
    let lossy = proxy::Proxy::start(server.local_addr(), seed);
    let client = aio::GreetClient::builder()
        .initial_timeout(timeout)
        .retries(RETRIES)
        .call_timeout(DEADLINE)
        .reply_check(udp_greet::is_greeting)
        .connect(lossy.addr)
        .await
        .expect("connect");
    let calls: Vec<_> = (0..count)
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
    for call in calls {
        // A call may take its whole deadline (five attempts of 1 s and up,
        // under an emulator).
        match util::guarded_within("the calls", DEADLINE + util::HANG_GUARD, call)
            .await
            .expect("join")
        {
            Ok(true) => {}
            Ok(false) => wrong += 1,
            Err(()) => failed += 1,
        }
    }
    let open = client.open_sockets();
    drop(lossy);
    let stats = server.shutdown().await.expect("shutdown");
    let predicted = proxy::predicted_failures(count as f64, RETRIES, timeout);
    println!(
        "{count} calls: {wrong} wrong, {failed} failed (at most {predicted:.1} predicted), \
         {} discarded, {open} sockets open at the end; server {stats:?}",
        client.discarded()
    );
    assert_eq!(wrong, 0, "a wrong reply was returned");
    assert!(
        (failed as f64) <= predicted,
        "{failed} calls failed; the loss rate predicts at most {predicted:.1}"
    );
    assert!(open <= udp_greet::DEFAULT_CLIENT_MAX_IN_FLIGHT);
    assert_balanced(&stats);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_at_every_await_point_leaks_nothing_and_misdirects_nothing() {
    // Replies come 20 ms late; the first attempt waits 5 ms, so a call
    // resends before its answer comes, and a cancelled call's answer comes
    // while the next call waits.
    let server = slow_greeter(Duration::from_millis(20));
    let client = aio::GreetClient::builder()
        .max_in_flight(1)
        .initial_timeout(Duration::from_millis(5))
        .retries(5)
        .connect(server.local_addr())
        .await
        .expect("connect");
    let mut cut_points = 0;
    for polls in 0.. {
        assert!(polls < 100, "a call kept going past 100 polls");
        // A second call holds the only turn for the cancelled one's first
        // polls: the wait for a turn is an await point too.
        let holder = {
            let client = client.clone();
            tokio::spawn(async move { client.send_recv(b"holder").await })
        };
        tokio::task::yield_now().await;
        let name = format!("cancelled-{polls}");
        let call = CancelAfter {
            inner: Some(Box::pin(client.send_recv(name.as_bytes()))),
            polls,
        };
        let finished = guarded("a cancelled call", call).await;
        let holder_reply = guarded("the holder", holder).await.expect("join");
        assert_eq!(holder_reply.expect("reply"), b"Hello, holder!");
        // No check: a socket reused with the cancelled call's request still
        // outstanding would hand its late reply to this call.
        for i in 0..2 {
            let next = format!("next-{polls}-{i}");
            let reply = guarded("the next call", client.send_recv(next.as_bytes()))
                .await
                .expect("the turn and the socket were given back");
            assert_eq!(
                reply,
                format!("Hello, {next}!").as_bytes(),
                "after {polls} polls"
            );
        }
        assert!(
            client.open_sockets() <= 1,
            "{} sockets",
            client.open_sockets()
        );
        match finished {
            None => cut_points += 1,
            Some(reply) => {
                assert_eq!(reply.expect("reply"), format!("Hello, {name}!").as_bytes());
                break;
            }
        }
    }
    println!("cancelled at {cut_points} await points");
    assert!(
        cut_points >= 3,
        "the turn, the first wait and a resend's wait"
    );
    let stats = server.shutdown().await.expect("shutdown");
    assert_balanced(&stats);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_polling_keeps_every_promise() {
    let server = aio::GreetServer::builder()
        .busy_poll(Duration::from_micros(200))
        .bind(V4)
        .expect("bind")
        .spawn(aio::greet)
        .expect("spawn");
    let client = aio::GreetClient::builder()
        .busy_poll(Duration::from_micros(200))
        .reply_check(udp_greet::is_greeting)
        .connect(server.local_addr())
        .await
        .expect("connect");
    for i in 0..100 {
        let name = format!("poll-{i}");
        let reply = guarded("a call", client.send_recv(name.as_bytes()))
            .await
            .expect("reply");
        assert_eq!(reply, format!("Hello, {name}!").as_bytes());
    }
    let handle = server.control();
    // An idle server stops polling: the miss count settles.
    util::wait_for("the polling window to close", || {
        let before = handle.stats().busy_poll_misses;
        std::thread::sleep(Duration::from_millis(1));
        handle.stats().busy_poll_misses == before
    })
    .await;
    let settled = handle.stats().busy_poll_misses;
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        handle.stats().busy_poll_misses,
        settled,
        "no polling while idle"
    );
    let stats = server.shutdown().await.expect("shutdown");
    assert_balanced(&stats);
    assert_eq!(stats.replied, 100);
    assert!(stats.busy_poll_misses > 0, "the server polled: {stats:?}");
    // A silent peer: the poll window passes, then the timeout and retries.
    let (_silent, addr) = silent_port();
    let client = aio::GreetClient::builder()
        .busy_poll(Duration::from_micros(200))
        .initial_timeout(Duration::from_millis(2))
        .retries(1)
        .connect(addr)
        .await
        .expect("connect");
    match guarded("a call", client.send_recv(b"x")).await {
        Err(Error::Timeout { attempts: 2, .. }) => {}
        other => panic!("expected a timeout after 2 attempts, got {other:?}"),
    }
}

#[test]
fn settings_are_checked_and_a_runtime_is_needed() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for calls in [0, 65_537, usize::MAX] {
        match runtime.block_on(
            aio::GreetClient::builder()
                .max_in_flight(calls)
                .connect("127.0.0.1:9"),
        ) {
            Err(Error::InvalidConfig { setting, .. }) => {
                assert_eq!(setting, "ClientBuilder::max_in_flight")
            }
            other => panic!("expected InvalidConfig for {calls}, got {other:?}"),
        }
    }
    match runtime.block_on(
        aio::GreetClient::builder()
            .so_busy_poll(Duration::MAX)
            .connect("127.0.0.1:9"),
    ) {
        Err(Error::InvalidConfig { setting, .. }) => {
            assert_eq!(setting, "ClientBuilder::so_busy_poll")
        }
        other => panic!("expected InvalidConfig for so_busy_poll(MAX), got {other:?}"),
    }
    // Polled outside any runtime (a bare executor): an error, not a panic.
    let connecting = aio::GreetClient::builder().connect(SocketAddr::from(([127, 0, 0, 1], 9)));
    let mut connecting = std::pin::pin!(connecting);
    let waker = std::task::Waker::noop();
    match connecting.as_mut().poll(&mut Context::from_waker(waker)) {
        Poll::Ready(Err(Error::NoRuntime { .. })) => {}
        Poll::Ready(other) => panic!("expected NoRuntime, got {other:?}"),
        Poll::Pending => panic!("resolving a socket address needs no runtime"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_polling_call_ends_when_its_waits_and_deadline_say() {
    let (_silent, addr) = silent_port();
    for (what, builder, attempts) in on_time::cases(aio::GreetClient::builder) {
        let client = builder.connect(addr).await.expect("connect");
        let started = std::time::Instant::now();
        let err = guarded("a polling call", client.send_recv(b"anyone?"))
            .await
            .expect_err("silence");
        on_time::assert_on_time(what, err, started.elapsed(), attempts);
    }
}
