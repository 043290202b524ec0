//! No heap allocation per datagram: the server in its steady state (both
//! paths, one worker and two) and `GreetClient::send_recv_into` per call.
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

use udp_greet::{GreetClient, GreetServer, ServerBuilder};

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is passed unchanged to the system allocator, which
// upholds `GlobalAlloc`'s contract; counting touches no allocator state.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's guarantees for `layout` are passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: `ptr` and `layout` come from this allocator, which is the
        // system allocator underneath.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
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

/// Bursts of requests from a plain socket, so the server takes them in
/// batches of more than one.
fn bursts(builder: ServerBuilder) -> Result<u64, String> {
    let server = builder
        .recv_buffer_size(1 << 20)
        .bind("127.0.0.1:0")
        .and_then(|s| s.spawn(udp_greet::greet))
        .map_err(|e| e.report())?;
    let addr = server.local_addr();
    let socket = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    socket.connect(addr).map_err(|e| e.to_string())?;
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 64];
    let mut burst = || -> Result<(), String> {
        for _ in 0..BURST {
            socket.send(b"burst").map_err(|e| e.to_string())?;
        }
        for _ in 0..BURST {
            let n = socket.recv(&mut buf).map_err(|e| format!("reply: {e}"))?;
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
    let delta = allocations() - before;
    server.shutdown().map_err(|e| e.report())?;
    Ok(delta)
}

fn main() -> ExitCode {
    type Scenario = fn(ServerBuilder) -> Result<u64, String>;
    let scenarios: [(&str, Scenario); 2] =
        [("one at a time", one_at_a_time), ("bursts of 32", bursts)];
    let (mut passed, mut failed) = (0, 0);
    for (path, portable) in [("batched", false), ("portable", true)] {
        for workers in [1, 2] {
            for (name, scenario) in scenarios {
                let builder = GreetServer::builder()
                    .portable_io(portable)
                    .workers(workers);
                let label = format!("{path} path, {workers} worker(s), {name}");
                match scenario(builder) {
                    Ok(0) => {
                        println!("ok: {label}: 0 allocations over {MEASURED} requests");
                        passed += 1;
                    }
                    Ok(n) => {
                        println!("FAILED: {label}: {n} allocations over {MEASURED} requests");
                        failed += 1;
                    }
                    Err(e) => {
                        println!("FAILED: {label}: {e}");
                        failed += 1;
                    }
                }
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
