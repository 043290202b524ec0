//! No heap allocation per datagram: the server in its steady state (both
//! paths, one worker and two, handlers inline and on a pool) and
//! `GreetClient::send_recv_into` per call.
//!
//! A counting global allocator counts every allocation in the process; the
//! test has its own `main` (`harness = false`), so no test-runner thread
//! allocates beside the code under test. Counts, not timings: the result is
//! the same on any machine.

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::UdpSocket;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use udp_greet::{GreetClient, GreetServer, HandlerPool, ServerBuilder};

mod util;

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
/// Bytes allocated and not yet freed.
static LIVE: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is passed unchanged to the system allocator, which
// upholds `GlobalAlloc`'s contract; counting touches no allocator state.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        LIVE.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: the caller's guarantees for `layout` are passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        LIVE.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        LIVE.fetch_add(new_size as u64, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: `ptr` and `layout` come from this allocator, which is the
        // system allocator underneath.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: as for `realloc`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const WARMUP: usize = 2_000;
const MEASURED: usize = 5_000;
const BURST: usize = 32;

fn allocations() -> u64 {
    ALLOCATIONS.load(Ordering::SeqCst)
}

/// Requests from `GreetClient::send_recv_into`, one at a time.
fn one_at_a_time(builder: ServerBuilder) -> Result<u64, String> {
    let server = builder
        .bind("127.0.0.1:0")
        .and_then(|s| s.spawn(udp_greet::greet))
        .map_err(|e| e.report())?;
    let client = GreetClient::connect(server.local_addr()).map_err(|e| e.report())?;
    let mut buf = [0u8; 64];
    let mut exchange = |i: usize| -> Result<(), String> {
        let name = [b'a' + (i % 26) as u8; 16];
        let n = client
            .send_recv_into(&name, &mut buf)
            .map_err(|e| e.report())?;
        if !udp_greet::is_greeting(&name, &buf[..n]) {
            return Err(format!("wrong reply {:?}", &buf[..n]));
        }
        Ok(())
    };
    for i in 0..WARMUP {
        exchange(i)?;
    }
    let before = allocations();
    for i in 0..MEASURED {
        exchange(i)?;
    }
    let delta = allocations() - before;
    let stats = server.shutdown().map_err(|e| e.report())?;
    if stats.replied != (WARMUP + MEASURED) as u64 {
        return Err(format!("not every request was answered: {stats:?}"));
    }
    Ok(delta)
}

/// Bursts of `BURST` greet requests on `socket` (connected to a greet
/// server), each answered in full: the warm-up, then the measured bursts;
/// returns the allocations made during the measured ones.
fn count_bursts(socket: &UdpSocket) -> Result<u64, String> {
    let mut buf = [0u8; 64];
    let mut burst = || -> Result<(), String> {
        for _ in 0..BURST {
            util::send(socket, b"burst").map_err(|e| e.to_string())?;
        }
        for _ in 0..BURST {
            let n = util::recv(socket, &mut buf).map_err(|e| format!("reply: {e}"))?;
            if &buf[..n] != b"Hello, burst!" {
                return Err(format!("wrong reply {:?}", &buf[..n]));
            }
        }
        Ok(())
    };
    for _ in 0..WARMUP / BURST {
        burst()?;
    }
    let before = allocations();
    for _ in 0..MEASURED / BURST {
        burst()?;
    }
    Ok(allocations() - before)
}

/// Bursts of requests from a plain socket, so the server takes them in
/// batches of more than one.
fn bursts(builder: ServerBuilder) -> Result<u64, String> {
    bursts_to(builder, "127.0.0.1:0")
}

fn bursts_to(builder: ServerBuilder, bind: &str) -> Result<u64, String> {
    let server = builder
        .bind(bind)
        .and_then(|s| s.spawn(udp_greet::greet))
        .map_err(|e| e.report())?;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], server.local_addr().port()));
    let socket = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    socket.connect(addr).map_err(|e| e.to_string())?;
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let delta = count_bursts(&socket)?;
    server.shutdown().map_err(|e| e.report())?;
    Ok(delta)
}

/// Requests from many source prefixes (each socket on its own loopback
/// /24) against a rate-limited server whose table is smaller than their
/// number: the table must not grow, whatever the sources.
fn many_prefixes(builder: ServerBuilder) -> Result<u64, String> {
    if !util::has_loopback_range() {
        return Ok(0);
    }
    let server = builder
        .rate_limit(
            // One request per second booked per prefix, with a burst never
            // reached: buckets stay busy, so 256 prefixes overflow the table.
            udp_greet::RateLimit::new(1, 1_000_000).table_size(64),
        )
        .bind("127.0.0.1:0")
        .and_then(|s| s.spawn(udp_greet::greet))
        .map_err(|e| e.report())?;
    let addr = server.local_addr();
    let sockets = (0..=255u8)
        .map(|net| {
            let socket = UdpSocket::bind(std::net::SocketAddr::from(([127, 1, net, 1], 0)))?;
            socket.set_read_timeout(Some(Duration::from_secs(10)))?;
            Ok(socket)
        })
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 64];
    let mut round = |sockets: &[UdpSocket]| -> Result<(), String> {
        for socket in sockets {
            util::send_to(socket, b"spray", addr).map_err(|e| e.to_string())?;
        }
        for socket in sockets {
            util::recv(socket, &mut buf).map_err(|e| format!("reply: {e}"))?;
        }
        Ok(())
    };
    for _ in 0..WARMUP / sockets.len() {
        round(&sockets)?;
    }
    let before = allocations();
    for _ in 0..MEASURED / sockets.len() {
        round(&sockets)?;
    }
    let delta = allocations() - before;
    let stats = server.shutdown().map_err(|e| e.report())?;
    if stats.rate_limit_evictions == 0 {
        return Err(format!("the table was never full: {stats:?}"));
    }
    Ok(delta)
}

fn live() -> u64 {
    LIVE.load(Ordering::SeqCst)
}

/// A reply far larger than UDP carries: the send fails, and the buffer
/// that held it must not stay allocated.
const HUGE_REPLY: usize = 4 << 20;

/// Thirty-two requests (four under an emulator) whose replies are 4 MiB
/// each: once they are dealt
/// with, the server holds no more memory than before them.
fn huge_replies_are_given_back(builder: ServerBuilder) -> Result<u64, String> {
    let server = builder
        .bind("127.0.0.1:0")
        .and_then(|s| {
            s.spawn(|request: udp_greet::Request<'_>, reply: &mut Vec<u8>| {
                if request.data() == b"huge" {
                    reply.resize(HUGE_REPLY, b'x');
                    return udp_greet::Action::Reply;
                }
                udp_greet::greet(request, reply)
            })
        })
        .map_err(|e| e.report())?;
    let addr = server.local_addr();
    let client = GreetClient::connect(addr).map_err(|e| e.report())?;
    let mut buf = [0u8; 64];
    client
        .send_recv_into(b"warm", &mut buf)
        .map_err(|e| e.report())?;
    let before = live();
    let sender = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    // Each 4 MiB reply takes seconds to make under qemu-user (a debug
    // build, emulated): a smaller burst there, which still shows whether a
    // huge buffer is kept, and more time.
    let (burst, time) = match util::emulator::emulator() {
        Some(_) => (4, Duration::from_secs(60)),
        None => (BURST, Duration::from_secs(10)),
    };
    for _ in 0..burst {
        util::send_to(&sender, b"huge", addr).map_err(|e| e.to_string())?;
    }
    let deadline = std::time::Instant::now() + time;
    while server.stats().send_errors < burst as u64 {
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "the huge replies were not all tried: {:?}",
                server.stats()
            ));
        }
        std::thread::yield_now();
    }
    // One more exchange: the worker has gone back to receiving since.
    client
        .send_recv_into(b"again", &mut buf)
        .map_err(|e| e.report())?;
    let kept = live().saturating_sub(before);
    server.shutdown().map_err(|e| e.report())?;
    // Under 1 MiB is noise (the client, thread-locals); one huge buffer
    // kept is 4 MiB.
    if kept >= 1 << 20 {
        return Err(format!(
            "{kept} bytes still held after {burst} huge replies"
        ));
    }
    Ok(0)
}

/// The heap a bound, idle server of `workers` workers holds per worker,
/// in bytes: printed for the documentation.
fn idle_heap_per_worker(builder: ServerBuilder, workers: usize) -> Result<u64, String> {
    let before = live();
    let server = builder
        .workers(workers)
        .max_datagram_size(1200)
        .bind("127.0.0.1:0")
        .and_then(|s| s.spawn(udp_greet::greet))
        .map_err(|e| e.report())?;
    let client = GreetClient::connect(server.local_addr()).map_err(|e| e.report())?;
    let mut buf = [0u8; 64];
    client
        .send_recv_into(b"warm", &mut buf)
        .map_err(|e| e.report())?;
    drop(client);
    let per_worker = live().saturating_sub(before) / workers as u64;
    server.shutdown().map_err(|e| e.report())?;
    Ok(per_worker)
}

/// Datagrams sent at once to the async server before the count: more than
/// one turn of a worker takes (256).
#[cfg(feature = "tokio")]
const FLOOD: usize = 600;

/// Pending once, waking itself at once: a handler's await, without the
/// runtime's own machinery (`tokio::task::yield_now` defers its wake-up to a
/// list of tokio's whose capacity grows, rarely and once, to the most
/// wake-ups ever deferred at once).
#[cfg(feature = "tokio")]
struct PendingOnce(bool);

#[cfg(feature = "tokio")]
impl std::future::Future for PendingOnce {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if self.0 {
            return std::task::Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    }
}

/// The async server (feature `tokio`) on a runtime of its own, answering
/// bursts from a plain socket; `deferred`: each handler future is pending
/// once before it answers, so replies come from woken futures rather than
/// at once.
#[cfg(feature = "tokio")]
fn async_bursts(
    builder: ServerBuilder<udp_greet::tokio::Tokio>,
    deferred: bool,
) -> Result<u64, String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let server = {
        let _entered = runtime.enter();
        builder
            .bind("127.0.0.1:0")
            .and_then(|s| {
                s.spawn(move |request: udp_greet::tokio::Request| async move {
                    if deferred {
                        PendingOnce(false).await;
                    }
                    Some(request.reply_with(udp_greet::greet_into))
                })
            })
            .map_err(|e| e.report())?
    };
    let socket = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    socket
        .connect(server.local_addr())
        .map_err(|e| e.to_string())?;
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    // A flood larger than a worker takes in one turn, so that the count
    // starts after the worker has run out of budget and yielded.
    socket2::SockRef::from(&socket)
        .set_recv_buffer_size(4 << 20)
        .map_err(|e| e.to_string())?;
    for _ in 0..FLOOD {
        util::send(&socket, b"burst").map_err(|e| e.to_string())?;
    }
    let mut buf = [0u8; 64];
    for _ in 0..FLOOD {
        util::recv(&socket, &mut buf).map_err(|e| format!("reply: {e}"))?;
    }
    let delta = count_bursts(&socket)?;
    let stats = runtime
        .block_on(server.shutdown())
        .map_err(|e| e.report())?;
    if stats.replied != ((WARMUP / BURST + MEASURED / BURST) * BURST + FLOOD) as u64 {
        return Err(format!("not every request was answered: {stats:?}"));
    }
    Ok(delta)
}

/// The async client's `send_recv_into`, one call at a time, against the
/// async server, on one runtime: both sides' allocations per call.
#[cfg(feature = "tokio")]
fn async_client_calls(builder: ServerBuilder<udp_greet::tokio::Tokio>) -> Result<u64, String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async move {
        let server = builder
            .bind("127.0.0.1:0")
            .and_then(|s| s.spawn(udp_greet::tokio::greet))
            .map_err(|e| e.report())?;
        let client = udp_greet::tokio::GreetClient::connect(server.local_addr())
            .await
            .map_err(|e| e.report())?;
        let mut buf = [0u8; 64];
        let mut before = 0;
        for i in 0..WARMUP + MEASURED {
            if i == WARMUP {
                before = allocations();
            }
            let name = [b'a' + (i % 26) as u8; 16];
            let n = client
                .send_recv_into(&name, &mut buf)
                .await
                .map_err(|e| e.report())?;
            if !udp_greet::is_greeting(&name, &buf[..n]) {
                return Err(format!("wrong reply {:?}", &buf[..n]));
            }
        }
        let delta = allocations() - before;
        server.shutdown().await.map_err(|e| e.report())?;
        Ok(delta)
    })
}

/// Reports one scenario: it passes with 0 allocations over the measured
/// requests.
fn tally(label: &str, result: Result<u64, String>, passed: &mut u32, failed: &mut u32) {
    match result {
        Ok(0) => {
            println!("ok: {label}: 0 allocations over {MEASURED} requests");
            *passed += 1;
        }
        Ok(n) => {
            println!("FAILED: {label}: {n} allocations over {MEASURED} requests");
            *failed += 1;
        }
        Err(e) => {
            println!("FAILED: {label}: {e}");
            *failed += 1;
        }
    }
}

fn main() -> ExitCode {
    type Scenario = fn(ServerBuilder) -> Result<u64, String>;
    let scenarios: [(&str, Scenario); 4] = [
        ("one at a time", one_at_a_time),
        ("bursts of 32", bursts),
        (
            "bursts of 32 to a wildcard-bound server (reply from the arrival address)",
            |b| bursts_to(b, "0.0.0.0:0"),
        ),
        (
            "256 prefixes through a 64-slot rate-limit table",
            many_prefixes,
        ),
    ];
    let (mut passed, mut failed) = (0u32, 0u32);
    for (path, portable) in [("batched", false), ("portable", true)] {
        for (workers, handler_threads) in [(1, 0), (2, 0), (1, 2), (2, 3)] {
            for (name, scenario) in scenarios {
                let builder = GreetServer::builder()
                    .portable_io(portable)
                    .workers(workers)
                    .handler_pool((handler_threads > 0).then(|| {
                        // All 256 of the many-prefix case at once fit the queue.
                        HandlerPool::threads(handler_threads).queue_capacity(512)
                    }));
                let mode = match handler_threads {
                    0 => "inline".to_owned(),
                    n => format!("pool of {n}"),
                };
                let label = format!("{path} path, {workers} worker(s), {mode}, {name}");
                tally(&label, scenario(builder), &mut passed, &mut failed);
            }
        }
    }
    for (path, portable) in [("batched", false), ("portable", true)] {
        let label = format!("{path} path, 32 replies of 4 MiB are given back");
        match huge_replies_are_given_back(GreetServer::builder().portable_io(portable)) {
            Ok(_) => {
                println!("ok: {label}");
                passed += 1;
            }
            Err(e) => {
                println!("FAILED: {label}: {e}");
                failed += 1;
            }
        }
        let inline = idle_heap_per_worker(GreetServer::builder().portable_io(portable), 1);
        let pooled = idle_heap_per_worker(
            GreetServer::builder()
                .portable_io(portable)
                .handler_pool(HandlerPool::threads(8)),
            1,
        );
        if let (Ok(inline), Ok(pooled)) = (inline, pooled) {
            // 8 threads: a queue of 512 places plus one per thread.
            println!(
                "note: {path} path, handler_threads(8): {} bytes of heap per queue place \
                 (with its thread's share)",
                pooled.saturating_sub(inline) / 520
            );
        }
        // The portable path has no batches to size.
        let batches: &[usize] = if portable { &[1] } else { &[32, 1024] };
        for &batch in batches {
            let mut builder = GreetServer::builder().portable_io(portable);
            // Batches are Linux's (the setting is refused elsewhere).
            if !portable && cfg!(target_os = "linux") {
                builder = builder.batch_size(batch);
            }
            match idle_heap_per_worker(builder, 8) {
                Ok(bytes) => println!(
                    "note: {path} path, {batch} datagram(s) per receive, max_datagram_size(1200): \
                     {} KiB of heap per idle worker",
                    bytes / 1024
                ),
                Err(e) => {
                    println!("FAILED: idle heap, {path} path: {e}");
                    failed += 1;
                }
            }
        }
    }
    #[cfg(feature = "tokio")]
    for (path, portable) in [("batched", false), ("portable", true)] {
        // Several workers are Linux's (refused elsewhere: one task per
        // socket, and only Linux spreads a port over sockets).
        let workers_tried: &[usize] = if cfg!(target_os = "linux") {
            &[1, 2]
        } else {
            &[1]
        };
        for &workers in workers_tried {
            let builder = || {
                udp_greet::tokio::GreetServer::builder()
                    .portable_io(portable)
                    .workers(workers)
            };
            let runs: [(&str, Result<u64, String>); 3] = [
                (
                    "bursts of 32, answered at once",
                    async_bursts(builder(), false),
                ),
                (
                    "bursts of 32, answered after an await",
                    async_bursts(builder(), true),
                ),
                (
                    "tokio::GreetClient::send_recv_into, one call at a time",
                    async_client_calls(builder()),
                ),
            ];
            for (name, result) in runs {
                let label = format!("async server, {path} path, {workers} worker(s), {name}");
                tally(&label, result, &mut passed, &mut failed);
            }
        }
    }
    println!("alloc: {passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
