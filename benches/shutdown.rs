//! How long `ServerHandle::shutdown` takes, idle and under a flood, on both
//! paths and with one and two workers.
//!
//! `cargo bench --bench shutdown` runs the full measurement; without
//! `--bench` (as under `cargo test`) it makes a short smoke pass. The flood
//! is one thread sending 16-byte datagrams as fast as it can, bounded to a
//! million per case, stopped once the shutdown has returned.

use std::net::UdpSocket;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use udp_greet::GreetServer;

mod common;
use common::{Table, percentile};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let full = std::env::args().any(|a| a == "--bench");
    let cycles = if full { 50 } else { 3 };
    println!(
        "shutdown: {cycles} cycles per case{}",
        if full {
            ""
        } else {
            " (smoke pass: run `cargo bench --bench shutdown` to measure)"
        }
    );
    let mut table = Table::new(&["case", "p50", "max"]);
    for portable in [false, true] {
        for workers in [1, 2] {
            for flood in [false, true] {
                let mut took = Vec::with_capacity(cycles);
                for _ in 0..cycles {
                    took.push(one_cycle(portable, workers, flood)?);
                }
                let max = took.iter().copied().max().unwrap_or_default();
                table.row(&[
                    format!(
                        "{}, {workers} worker(s), {}",
                        if portable { "portable" } else { "batched" },
                        if flood { "under a flood" } else { "idle" }
                    ),
                    format!("{:.2?}", percentile(&mut took, 50.0)),
                    format!("{max:.2?}"),
                ]);
            }
        }
    }
    table.print();
    Ok(())
}

fn one_cycle(
    portable: bool,
    workers: usize,
    flood: bool,
) -> Result<Duration, Box<dyn std::error::Error>> {
    let server = GreetServer::builder()
        .portable_io(portable)
        .workers(workers)
        .bind("127.0.0.1:0")?
        .spawn(udp_greet::greet)?;
    let addr = server.local_addr();
    let stop = Arc::new(AtomicBool::new(false));
    let flooder = flood.then(|| {
        let stop = stop.clone();
        std::thread::spawn(move || -> std::io::Result<()> {
            let socket = UdpSocket::bind("127.0.0.1:0")?;
            for _ in 0..1_000_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let _ = socket.send_to(b"0123456789abcdef", addr);
            }
            Ok(())
        })
    });
    if flood {
        // Let the flood reach the server before stopping it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while server.stats().received < 1_000 && Instant::now() < deadline {
            std::thread::yield_now();
        }
    }
    let start = Instant::now();
    server.shutdown()?;
    let took = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    if let Some(flooder) = flooder {
        let _ = flooder.join();
    }
    Ok(took)
}
