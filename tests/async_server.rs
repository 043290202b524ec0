//! The async server (feature `tokio`): every promise of the blocking server,
//! on both receive paths, with the accounting identity checked after every
//! scenario; exact overload and handler-timeout counts; shutdown drains and
//! then cancels; a flood does not starve a one-thread runtime.
#![cfg(feature = "tokio")]

mod util;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::Semaphore;
use udp_greet::tokio::{self as aio, Reply};
use udp_greet::tokio::{GreetServer, Limits, Tokio};
use udp_greet::{Error, ServerBuilder, Stats};
use util::{V4, assert_balanced, guarded, wait_for};

/// Declares each named async scenario (taking a `ServerBuilder`) twice: on
/// the batched path and on the portable loop, on a two-thread runtime.
macro_rules! on_both_paths {
    ($($name:ident),* $(,)?) => {
        mod batched {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(udp_greet::tokio::GreetServer::builder()).await;
                }
            )*
        }
        mod portable {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(udp_greet::tokio::GreetServer::builder().portable_io(true)).await;
                }
            )*
        }
    };
}

on_both_paths!(
    greets_and_accounts_for_every_datagram,
    overload_is_exact_and_answered_with_the_busy_reply,
    handler_timeout_drops_the_future_and_counts_it,
    a_future_woken_after_its_handler_timeout_is_dropped_not_polled,
    handler_panics_are_caught_in_making_and_in_polling,
    a_failed_send_is_counted_and_the_loop_goes_on,
    shutdown_drains_in_flight_handlers_then_frees_the_port,
    shutdown_cancels_what_the_drain_time_leaves,
    checks_apply_before_the_handler,
    a_window_of_duration_max_polls_and_publishes_live,
    a_window_of_one_nanosecond_polls,
);

/// A test client socket: sends raw datagrams, reads replies with a guard.
async fn peer() -> UdpSocket {
    UdpSocket::bind(V4).await.expect("bind a test peer")
}

async fn recv(socket: &UdpSocket) -> Vec<u8> {
    let mut buf = vec![0u8; 65_536];
    let (n, _) = guarded("a reply", socket.recv_from(&mut buf))
        .await
        .expect("recv");
    buf.truncate(n);
    buf
}

/// A greet server from `builder`, running.
fn greeter(builder: ServerBuilder<Tokio>) -> aio::ServerHandle {
    builder
        .bind(V4)
        .expect("bind")
        .spawn(aio::greet)
        .expect("spawn")
}

/// One greeting through `server`, from a fresh peer.
async fn greet_once(server: &aio::ServerHandle, name: &str) {
    let socket = peer().await;
    socket
        .send_to(name.as_bytes(), server.local_addr())
        .await
        .expect("send");
    assert_eq!(recv(&socket).await, format!("Hello, {name}!").as_bytes());
}

/// Nothing arrives on `socket` before a marker datagram sent through the
/// server after everything else: replies to one peer come in order from one
/// worker, so the marker's reply coming first proves nothing else was sent.
async fn assert_nothing_before_marker(socket: &UdpSocket, server: SocketAddr) {
    socket.send_to(b"marker", server).await.expect("send");
    assert_eq!(recv(socket).await, b"Hello, marker!");
}

type Handler =
    Box<dyn Fn(aio::Request) -> Pin<Box<dyn Future<Output = Option<Reply>> + Send>> + Send + Sync>;

fn start(builder: ServerBuilder<Tokio>, handler: Handler) -> aio::ServerHandle {
    builder
        .bind(V4)
        .expect("bind")
        .spawn(handler)
        .expect("spawn")
}

async fn stop(server: aio::ServerHandle) -> Stats {
    let stats = guarded("shutdown", server.shutdown())
        .await
        .expect("shutdown");
    assert_balanced(&stats);
    assert_eq!(stats.in_flight(), 0, "{stats:?}");
    stats
}

async fn greets_and_accounts_for_every_datagram(builder: ServerBuilder<Tokio>) {
    let server = builder
        .bind(V4)
        .expect("bind")
        .spawn(aio::greet)
        .expect("spawn");
    let addr = server.local_addr();
    let socket = peer().await;
    for name in ["Michael", "Tracy", "Sarah", ""] {
        socket.send_to(name.as_bytes(), addr).await.expect("send");
        assert_eq!(recv(&socket).await, format!("Hello, {name}!").as_bytes());
    }
    // A burst, answered in full (batched replies).
    for i in 0..200 {
        socket
            .send_to(format!("n{i}").as_bytes(), addr)
            .await
            .expect("send");
    }
    let mut got = Vec::new();
    for _ in 0..200 {
        got.push(recv(&socket).await);
    }
    got.sort();
    let mut want: Vec<Vec<u8>> = (0..200)
        .map(|i| format!("Hello, n{i}!").into_bytes())
        .collect();
    want.sort();
    assert_eq!(got, want);
    let handle = server.control();
    let stats = stop(server).await;
    assert_eq!((stats.received, stats.replied), (204, 204), "{stats:?}");
    // Every handler call is in the histogram, readable after shutdown.
    assert_eq!(handle.latency().handler.count(), 204);
}

/// Handlers that wait on `gate` before greeting; `started` counts them in.
fn gated(gate: Arc<Semaphore>, started: Arc<AtomicUsize>) -> Handler {
    Box::new(move |request| {
        let (gate, started) = (gate.clone(), started.clone());
        Box::pin(async move {
            started.fetch_add(1, Ordering::SeqCst);
            let _pass = gate.acquire().await.ok()?;
            Some(request.reply_with(udp_greet::greet_into))
        })
    })
}

async fn overload_is_exact_and_answered_with_the_busy_reply(builder: ServerBuilder<Tokio>) {
    const LIMIT: usize = 4;
    const EXTRA: usize = 6;
    let gate = Arc::new(Semaphore::new(0));
    let started = Arc::new(AtomicUsize::new(0));
    let server = start(
        builder.limits(
            Limits::new()
                .max_in_flight(LIMIT)
                .overload_reply(&b"busy"[..]),
        ),
        gated(gate.clone(), started.clone()),
    );
    let addr = server.local_addr();
    let socket = peer().await;
    for i in 0..LIMIT {
        socket
            .send_to(format!("held{i}").as_bytes(), addr)
            .await
            .expect("send");
    }
    wait_for("the handlers to start", || {
        server.stats().in_flight() == LIMIT as u64
    })
    .await;
    assert_eq!(started.load(Ordering::SeqCst), LIMIT);
    for i in 0..EXTRA {
        socket
            .send_to(format!("extra{i}").as_bytes(), addr)
            .await
            .expect("send");
    }
    for _ in 0..EXTRA {
        assert_eq!(recv(&socket).await, b"busy");
    }
    let stats = server.stats();
    assert_eq!(stats.overloaded, EXTRA as u64, "{stats:?}");
    // Nothing in flight was cancelled to make room.
    assert_eq!(stats.in_flight(), LIMIT as u64, "{stats:?}");
    gate.add_permits(LIMIT);
    let mut got: Vec<Vec<u8>> = Vec::new();
    for _ in 0..LIMIT {
        got.push(recv(&socket).await);
    }
    got.sort();
    let want: Vec<Vec<u8>> = (0..LIMIT)
        .map(|i| format!("Hello, held{i}!").into_bytes())
        .collect();
    assert_eq!(got, want);
    // The permits are back: new requests are served.
    gate.add_permits(1);
    socket.send_to(b"after", addr).await.expect("send");
    assert_eq!(recv(&socket).await, b"Hello, after!");
    let stats = stop(server).await;
    assert_eq!(
        (stats.replied, stats.overloaded),
        (LIMIT as u64 + 1, EXTRA as u64),
        "{stats:?}"
    );
}

/// Counts drops of the values that hold it.
struct DropCount(Arc<AtomicU64>);

impl Drop for DropCount {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// Sends `count` requests `late0`, `late1`, ... to a server with
/// `handler_timeout(timeout)` whose handler awaits `wait()` for them before
/// its reply (and answers anything else at once): each must time out,
/// its future dropped and counted, nothing sent for it.
async fn assert_each_times_out<W>(
    builder: ServerBuilder<Tokio>,
    timeout: Duration,
    count: u64,
    wait: fn() -> W,
) where
    W: Future<Output = ()> + Send + 'static,
{
    let dropped = Arc::new(AtomicU64::new(0));
    let counter = dropped.clone();
    let server = start(
        builder.limits(Limits::new().handler_timeout(timeout)),
        Box::new(move |request| {
            let guard = DropCount(counter.clone());
            Box::pin(async move {
                let _guard = guard;
                if request.data().starts_with(b"late") {
                    wait().await;
                }
                Some(request.reply_with(udp_greet::greet_into))
            })
        }),
    );
    let addr = server.local_addr();
    let socket = peer().await;
    for i in 0..count {
        socket
            .send_to(format!("late{i}").as_bytes(), addr)
            .await
            .expect("send");
    }
    wait_for("the handlers to time out", || {
        server.stats().timed_out == count
    })
    .await;
    assert_eq!(
        dropped.load(Ordering::SeqCst),
        count,
        "each timed-out future was dropped"
    );
    // Nothing was sent for them (the marker, which ends in its first poll,
    // is answered).
    assert_nothing_before_marker(&socket, addr).await;
    let stats = stop(server).await;
    assert_eq!((stats.timed_out, stats.replied), (count, 1), "{stats:?}");
}

async fn handler_timeout_drops_the_future_and_counts_it(builder: ServerBuilder<Tokio>) {
    assert_each_times_out(builder, Duration::from_millis(20), 5, std::future::pending).await;
}

/// A future that yields once is woken at once; with a handler timeout of
/// 1 ns its time is up by the time it is polled again, however fast the
/// machine: it must be dropped, not polled to its reply.
async fn a_future_woken_after_its_handler_timeout_is_dropped_not_polled(
    builder: ServerBuilder<Tokio>,
) {
    assert_each_times_out(builder, Duration::from_nanos(1), 3, tokio::task::yield_now).await;
}

async fn handler_panics_are_caught_in_making_and_in_polling(builder: ServerBuilder<Tokio>) {
    let server = start(
        builder,
        Box::new(|request| {
            if request.data() == b"panic-now" {
                panic!("handler panicked making its future");
            }
            Box::pin(async move {
                tokio::task::yield_now().await;
                if request.data() == b"panic-later" {
                    panic!("handler future panicked");
                }
                Some(request.reply_with(udp_greet::greet_into))
            })
        }),
    );
    let addr = server.local_addr();
    let socket = peer().await;
    for payload in ["panic-now", "panic-later", "panic-now", "panic-later"] {
        socket
            .send_to(payload.as_bytes(), addr)
            .await
            .expect("send");
    }
    assert_nothing_before_marker(&socket, addr).await;
    let stats = stop(server).await;
    assert_eq!((stats.handler_panics, stats.replied), (4, 1), "{stats:?}");
}

async fn a_failed_send_is_counted_and_the_loop_goes_on(builder: ServerBuilder<Tokio>) {
    let server = start(
        builder,
        Box::new(|request| {
            Box::pin(async move {
                if request.data() == b"huge" {
                    // More than a UDP datagram can carry: EMSGSIZE.
                    return Some(Reply::new(vec![b'x'; 70_000]));
                }
                Some(request.reply_with(udp_greet::greet_into))
            })
        }),
    );
    let addr = server.local_addr();
    let socket = peer().await;
    socket.send_to(b"huge", addr).await.expect("send");
    socket.send_to(b"huge", addr).await.expect("send");
    assert_nothing_before_marker(&socket, addr).await;
    let stats = stop(server).await;
    assert_eq!((stats.send_errors, stats.replied), (2, 1), "{stats:?}");
}

async fn shutdown_drains_in_flight_handlers_then_frees_the_port(builder: ServerBuilder<Tokio>) {
    let gate = Arc::new(Semaphore::new(0));
    let started = Arc::new(AtomicUsize::new(0));
    let server = start(
        builder.limits(Limits::new().drain_timeout(Duration::from_secs(3600))),
        gated(gate.clone(), started.clone()),
    );
    let addr = server.local_addr();
    let socket = peer().await;
    for i in 0..3 {
        socket
            .send_to(format!("d{i}").as_bytes(), addr)
            .await
            .expect("send");
    }
    wait_for("the handlers to start", || {
        started.load(Ordering::SeqCst) == 3
    })
    .await;
    let stop_handle = server.control();
    let shutting = tokio::spawn(server.shutdown());
    wait_for("shutdown to begin", || stop_handle.is_shutdown()).await;
    // Sent after shutdown began: not taken once the receive task has seen
    // the stop, which it may not have yet (under Wine it was taken).
    socket.send_to(b"late", addr).await.expect("send");
    gate.add_permits(3);
    for _ in 0..3 {
        assert!(recv(&socket).await.starts_with(b"Hello, d"));
    }
    let stats = guarded("shutdown", shutting)
        .await
        .expect("join")
        .expect("shutdown");
    assert_balanced(&stats);
    assert!(
        matches!((stats.replied, stats.shutdown_dropped), (3 | 4, 0)),
        "{stats:?}"
    );
    assert_eq!(stats.replied, stats.received, "{stats:?}");
    // The port is free once shutdown returns.
    std::net::UdpSocket::bind(addr).expect("the port is free again");
}

async fn shutdown_cancels_what_the_drain_time_leaves(builder: ServerBuilder<Tokio>) {
    let dropped = Arc::new(AtomicU64::new(0));
    let counter = dropped.clone();
    let server = start(
        builder.limits(Limits::new().drain_timeout(Duration::from_millis(10))),
        Box::new(move |_request| {
            let guard = DropCount(counter.clone());
            Box::pin(async move {
                let _guard = guard;
                std::future::pending::<Option<Reply>>().await
            })
        }),
    );
    let addr = server.local_addr();
    let socket = peer().await;
    for _ in 0..4 {
        socket.send_to(b"stuck", addr).await.expect("send");
    }
    wait_for("the handlers to start", || server.stats().in_flight() == 4).await;
    let stats = stop(server).await;
    assert_eq!(stats.shutdown_dropped, 4, "{stats:?}");
    assert_eq!(
        dropped.load(Ordering::SeqCst),
        4,
        "each cancelled future was dropped"
    );
    std::net::UdpSocket::bind(addr).expect("the port is free again");
}

async fn checks_apply_before_the_handler(builder: ServerBuilder<Tokio>) {
    let called = Arc::new(AtomicU64::new(0));
    let count = called.clone();
    let server = start(
        builder
            .max_datagram_size(16)
            .max_amplification(2)
            .rate_limit(udp_greet::RateLimit::new(1, 2)),
        Box::new(move |request| {
            count.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move { Some(request.reply_with(udp_greet::greet_into)) })
        }),
    );
    let addr = server.local_addr();
    let socket = peer().await;
    // Truncated: never reaches the handler (nor the rate limit).
    socket.send_to(&[b'a'; 100], addr).await.expect("send");
    // "Hello, ab!" is 10 bytes for 2: over the cap of twice the request.
    socket.send_to(b"ab", addr).await.expect("send");
    // "Hello, longname!" is 16 bytes for 8: within it.
    socket.send_to(b"longname", addr).await.expect("send");
    assert_eq!(recv(&socket).await, b"Hello, longname!");
    // The burst of 2 is spent: these are over the limit (one may pass if a
    // second goes by, at 1 a second).
    for _ in 0..5 {
        socket.send_to(b"limited!", addr).await.expect("send");
    }
    wait_for("the rest to be received", || server.stats().received == 8).await;
    let stats = stop(server).await;
    assert_eq!(stats.truncated, 1, "{stats:?}");
    assert_eq!(stats.amplification_capped, 1, "{stats:?}");
    assert!(stats.rate_limited >= 4, "{stats:?}");
    assert_eq!(
        called.load(Ordering::SeqCst),
        2 + (5 - stats.rate_limited),
        "only admitted requests reach the handler"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_flood_does_not_starve_a_one_thread_runtime() {
    const FLOOD: u64 = 200_000;
    // A handler with some work to do, so that the socket stays full while
    // the flood lasts.
    let server = GreetServer::builder()
        .bind(V4)
        .expect("bind")
        .spawn(|request: aio::Request| async move {
            let mut x = 0u64;
            for b in request.data() {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(u64::from(*b)));
            }
            std::hint::black_box(x);
            None
        })
        .expect("spawn");
    let addr = server.local_addr();
    let stats = server.control();
    let done = Arc::new(AtomicBool::new(false));
    // The flood, from a thread of its own: bounded in count and in time.
    let flooding = {
        let (done, stats) = (done.clone(), stats.clone());
        std::thread::spawn(move || {
            let socket = std::net::UdpSocket::bind(V4).expect("bind");
            let payload = [b'f'; 512];
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            let mut sent = 0u64;
            while stats.stats().received < FLOOD
                && sent < 50 * FLOOD
                && std::time::Instant::now() < deadline
            {
                for _ in 0..64 {
                    let _ = socket.send_to(&payload, addr);
                }
                sent += 64;
            }
            done.store(true, Ordering::SeqCst);
            sent
        })
    };
    // The timer task: at each tick, what the server had received.
    let mut ticks = Vec::new();
    let mut interval = tokio::time::interval(Duration::from_millis(1));
    while !done.load(Ordering::SeqCst) {
        interval.tick().await;
        ticks.push(stats.stats().received);
    }
    let sent = flooding.join().expect("flood thread");
    let final_stats = guarded("shutdown", server.shutdown())
        .await
        .expect("shutdown");
    assert_balanced(&final_stats);
    assert!(
        final_stats.received >= FLOOD,
        "the server took {} of {sent} datagrams",
        final_stats.received
    );
    // Ticks while the server was taking the flood: with a budget of 256
    // datagrams a turn, and the runtime's timers polled between turns, the
    // timer sees about every 256th count (780 distinct counts measured). A
    // worker that rescheduled itself at once instead was measured at 12: a
    // one-thread runtime polled its timers only every 61 turns.
    let during = ticks.iter().filter(|&&r| r > 0 && r < FLOOD).count();
    let distinct = {
        let mut seen: Vec<u64> = ticks
            .iter()
            .copied()
            .filter(|&r| r > 0 && r < FLOOD)
            .collect();
        seen.dedup();
        seen.len()
    };
    println!(
        "{sent} sent, {} taken, {during} ticks during the flood ({distinct} distinct counts), {} kernel drops",
        final_stats.received, final_stats.kernel_drops
    );
    assert!(
        distinct >= 100,
        "the timer ticked only {distinct} times while the server took the flood"
    );
}

#[test]
fn spawn_outside_a_runtime_is_an_error() {
    let server = GreetServer::bind(V4).expect("bind");
    let addr = server.local_addr();
    match server.spawn(aio::greet) {
        Err(Error::NoRuntime { addr: a, .. }) => assert_eq!(a, addr),
        other => panic!("expected NoRuntime, got {other:?}"),
    }
}

/// The blocking engine's handler pool has no method on this builder at all
/// (see the `compile_fail` examples on `ServerBuilder`); the async limits are
/// checked before anything is bound.
#[tokio::test]
async fn async_limits_are_checked() {
    for (builder, setting) in [
        (
            GreetServer::builder().limits(Limits::new().max_in_flight(0)),
            "Limits::max_in_flight",
        ),
        (
            GreetServer::builder().limits(Limits::new().max_in_flight(usize::MAX)),
            "Limits::max_in_flight",
        ),
        (
            GreetServer::builder().limits(Limits::new().handler_timeout(Duration::ZERO)),
            "Limits::handler_timeout",
        ),
    ] {
        match builder.bind(V4) {
            Err(Error::InvalidConfig { setting: s, .. }) => assert_eq!(s, setting),
            other => panic!("expected InvalidConfig for {setting}, got {other:?}"),
        }
    }
    // Extremes that are valid: one in flight, the longest timeout.
    let server = greeter(
        GreetServer::builder().limits(
            Limits::new()
                .max_in_flight(1)
                .handler_timeout(Duration::MAX),
        ),
    );
    greet_once(&server, "x").await;
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_async_until_stops_on_the_callers_signal() {
    let server = GreetServer::bind(V4).expect("bind");
    let addr = server.local_addr();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.serve_until(aio::greet, async {
        let _ = stop_rx.await;
    }));
    let socket = peer().await;
    socket.send_to(b"Sarah", addr).await.expect("send");
    assert_eq!(recv(&socket).await, b"Hello, Sarah!");
    let _ = stop_tx.send(());
    let stats = guarded("serve_async_until", serving)
        .await
        .expect("join")
        .expect("serve");
    assert_balanced(&stats);
    assert_eq!(stats.replied, 1);
    std::net::UdpSocket::bind(addr).expect("the port is free again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_workers_share_the_limit_and_each_answers() {
    let server = GreetServer::builder().workers(4).bind(V4);
    if !cfg!(target_os = "linux") {
        // One task per socket, and only Linux spreads a port over sockets.
        assert!(
            matches!(
                server,
                Err(Error::InvalidConfig {
                    setting: "ServerBuilder::workers",
                    ..
                })
            ),
            "{server:?}"
        );
        return;
    }
    let server = server.expect("bind").spawn(aio::greet).expect("spawn");
    let addr = server.local_addr();
    // Many peers, so the kernel's hash spreads them over the sockets.
    let mut sockets = Vec::new();
    for i in 0..32 {
        let socket = peer().await;
        socket
            .send_to(format!("p{i}").as_bytes(), addr)
            .await
            .expect("send");
        sockets.push(socket);
    }
    for (i, socket) in sockets.iter().enumerate() {
        assert_eq!(recv(socket).await, format!("Hello, p{i}!").as_bytes());
    }
    let stats = stop(server).await;
    assert_eq!(stats.replied, 32);
}

/// `busy_poll(Duration::MAX)` polls (it once turned polling off: the window's
/// end overflowed), and the misses reach live snapshots while it is open.
async fn a_window_of_duration_max_polls_and_publishes_live(builder: ServerBuilder<Tokio>) {
    let server = greeter(builder.busy_poll(Duration::MAX));
    greet_once(&server, "open").await;
    let mut seen = 0;
    wait_for("busy_poll_misses to rise in live snapshots", || {
        let misses = server.stats().busy_poll_misses;
        if seen > 0 && misses > seen {
            return true;
        }
        seen = seen.max(misses);
        false
    })
    .await;
    stop(server).await;
}

/// The shortest window there is still polls once after each piece of work.
async fn a_window_of_one_nanosecond_polls(builder: ServerBuilder<Tokio>) {
    let server = greeter(builder.busy_poll(Duration::from_nanos(1)));
    greet_once(&server, "tiny").await;
    wait_for("a 1 ns window to poll", || {
        server.stats().busy_poll_misses > 0
    })
    .await;
    stop(server).await;
}

/// A server whose runtime shuts down under it is reported as cancelled,
/// not as a bug in the crate (`WorkerPanicked`).
#[test]
fn a_runtime_shut_down_under_the_server_is_reported_as_cancelled() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let server = {
        let _entered = runtime.enter();
        GreetServer::bind(V4)
            .expect("bind")
            .spawn(aio::greet)
            .expect("spawn")
    };
    let addr = server.local_addr();
    drop(runtime);
    let other = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    match other.block_on(guarded("shutdown", server.shutdown())) {
        Err(Error::Cancelled { addr: a, .. }) => assert_eq!(a, addr),
        other => panic!("expected Cancelled, got {other:?}"),
    }
}

/// A reply cloned from one in a reused buffer carries the same bytes after
/// the original is dropped, and replies made from a `&str`, a `Vec` and a
/// slice carry theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_clone_and_convert() {
    let server = GreetServer::bind(V4)
        .expect("bind")
        .spawn(|request: aio::Request| async move {
            let reply = match request.data().to_vec().as_slice() {
                b"str" => Reply::from("from a str"),
                b"vec" => Reply::from(b"from a vec".to_vec()),
                b"slice" => Reply::from(&b"from a slice"[..]),
                _ => {
                    let original = request.reply_with(udp_greet::greet_into);
                    let copy = original.clone();
                    drop(original);
                    copy
                }
            };
            Some(reply)
        })
        .expect("spawn");
    let addr = server.local_addr();
    let socket = peer().await;
    for (request, expected) in [
        (&b"Ada"[..], &b"Hello, Ada!"[..]),
        (b"str", b"from a str"),
        (b"vec", b"from a vec"),
        (b"slice", b"from a slice"),
        (b"Grace", b"Hello, Grace!"),
    ] {
        socket.send_to(request, addr).await.expect("send");
        assert_eq!(recv(&socket).await, expected);
    }
    let stats = guarded("shutdown", server.shutdown())
        .await
        .expect("shutdown");
    assert_eq!(stats.replied, 5, "{stats:?}");
    assert_balanced(&stats);
}

#[test]
fn a_reply_is_its_bytes() {
    let reply = Reply::from(b"bytes".to_vec());
    assert_eq!(reply.as_ref(), b"bytes");
    assert_eq!(reply.clone().as_ref(), reply.as_bytes());
    assert_eq!(Reply::from("text").as_ref(), b"text");
    assert_eq!(Reply::from(&b"slice"[..]).as_bytes(), b"slice");
    fn takes_bytes(bytes: impl AsRef<[u8]>) -> usize {
        bytes.as_ref().len()
    }
    assert_eq!(takes_bytes(Reply::new("four")), 4);
}
