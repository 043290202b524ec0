//! Round-trip latency: `GreetClient::send_recv` against a raw `std::net`
//! connected-socket ping-pong, both against the same udp-greet server, in one
//! run.
//!
//! `cargo bench --bench roundtrip` runs the full measurement; without
//! `--bench` (as under `cargo test`) it makes a short smoke pass.
//!
//! The cases take turns request by request (their order rotating), so a
//! change in the machine's speed hits them alike; the ratio column is the
//! median over rounds of each round's p50 divided by the raw ping-pong's.

use std::hint::black_box;
use std::net::UdpSocket;
use std::time::{Duration, Instant};

use udp_greet::{GreetClient, GreetServer};

mod common;
use common::{Table, median, percentile};

const REQUEST: &[u8] = b"0123456789abcdef"; // 16 bytes

/// A named case: one full round trip per call.
type Case<'a> = (&'static str, Box<dyn FnMut() -> std::io::Result<()> + 'a>);

struct Workload {
    rounds: usize,
    per_round: usize,
    warmup: usize,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let full = std::env::args().any(|a| a == "--bench");
    let work = if full {
        Workload {
            rounds: 21,
            per_round: 2_000,
            warmup: 2_000,
        }
    } else {
        Workload {
            rounds: 2,
            per_round: 50,
            warmup: 10,
        }
    };

    let server = GreetServer::bind("127.0.0.1:0")?.spawn(udp_greet::greet)?;
    let addr = server.local_addr();
    let client = GreetClient::connect(addr)?;
    let raw = UdpSocket::bind("127.0.0.1:0")?;
    raw.connect(addr)?;
    raw.set_read_timeout(Some(Duration::from_secs(1)))?;

    let mut buf = [0u8; 64];
    let mut cases: [Case<'_>; 3] = [
        (
            "std connected ping-pong",
            Box::new(|| {
                common::again(|| raw.send(black_box(REQUEST)))?;
                black_box(common::again(|| raw.recv(&mut buf))?);
                Ok(())
            }),
        ),
        (
            "send_recv_into",
            Box::new(|| {
                let mut buf = [0u8; 64];
                black_box(
                    client
                        .send_recv_into(black_box(REQUEST), &mut buf)
                        .map_err(std::io::Error::other)?,
                );
                Ok(())
            }),
        ),
        (
            "send_recv",
            Box::new(|| {
                black_box(
                    client
                        .send_recv(black_box(REQUEST))
                        .map_err(std::io::Error::other)?,
                );
                Ok(())
            }),
        ),
    ];

    for (_, run) in cases.iter_mut() {
        for _ in 0..work.warmup {
            run()?;
        }
    }

    let mut all: Vec<Vec<Duration>> = vec![Vec::new(); cases.len()];
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    // Within a round the cases take turns request by request (the order
    // rotating), so each case's samples come from the same moments.
    let mut samples: Vec<Vec<Duration>> = vec![Vec::with_capacity(work.per_round); cases.len()];
    for _ in 0..work.rounds {
        for list in samples.iter_mut() {
            list.clear();
        }
        for k in 0..work.per_round {
            for j in 0..cases.len() {
                let i = (j + k) % cases.len();
                let start = Instant::now();
                (cases[i].1)()?;
                samples[i].push(start.elapsed());
            }
        }
        let p50: Vec<f64> = samples
            .iter_mut()
            .map(|list| percentile(list, 50.0).as_secs_f64())
            .collect();
        for (i, list) in samples.iter().enumerate() {
            all[i].extend_from_slice(list);
            ratios[i].push(p50[i] / p50[0]);
        }
    }

    println!(
        "roundtrip: {} rounds x {} requests of {} bytes per case, loopback {}{}",
        work.rounds,
        work.per_round,
        REQUEST.len(),
        addr,
        if full {
            ""
        } else {
            " (smoke pass: run `cargo bench --bench roundtrip` to measure)"
        }
    );
    let mut table = Table::new(&["case", "p50", "p99", "p50 ratio"]);
    for (i, (name, _)) in cases.iter().enumerate() {
        table.row(&[
            (*name).to_owned(),
            format!("{:.1?}", percentile(&mut all[i], 50.0)),
            format!("{:.1?}", percentile(&mut all[i], 99.0)),
            format!("{:.3}", median(&mut ratios[i])),
        ]);
    }
    table.print();
    drop(cases);
    let stats = server.shutdown()?;
    assert_eq!(
        stats.received, stats.replied,
        "every request answered: {stats:?}"
    );
    Ok(())
}
