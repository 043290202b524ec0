//! Server throughput and CPU cost per reply, against a plain `std::net` loop
//! measured in the same run.
//!
//! `cargo bench --bench throughput` runs the full measurement; without
//! `--bench` (as under `cargo test`) it makes a short smoke pass.
//!
//! Eight servers run at once, each on its own port, every server thread
//! pinned to one CPU and the load generator to another: udp-greet's batched
//! server, its portable server, a plain `recv_from`/`send_to` loop written
//! here (the baseline), udp-greet with two workers, udp-greet batched
//! without segmentation offload, and a minimal hand-written
//! `recvmmsg`/`sendmmsg` loop (the floor for batching without
//! segmentation); and the batched and portable servers with
//! `recv_metadata(true)`, whose CPU per reply is given against the same
//! path without it; and the batched server checking a source token on
//! every request (`source_tokens`, every request carrying a valid one),
//! without and with the token written back into every reply
//! (`in_replies`), against the same server without tokens given the same
//! 32-byte requests.
//! The generator keeps 4 sockets x 32
//! requests in flight (batched with `sendmmsg`/`recvmmsg`). Rounds visit the
//! servers in turn, so a drift in the machine's speed hits them alike; the
//! ratio columns are medians over rounds of each round's ratio to the std
//! loop. CPU time per reply comes from the server threads' scheduler
//! statistics.
//!
//! A last part keeps 512 requests in flight (16 sockets x 32) against the
//! batched server with its default settings and against the std loop with
//! the kernel's default receive buffer, and counts what never came back.
//! Last, the time of one `SourceTokens::check` of a valid token, and of a
//! forged one, in a loop.

#[cfg(target_os = "linux")]
mod common;

#[cfg(not(target_os = "linux"))]
fn main() {
    println!("throughput: this bench needs Linux (recvmmsg, schedstat); nothing measured");
}

#[cfg(target_os = "linux")]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    bench::main()
}

#[cfg(target_os = "linux")]
mod bench {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    use std::thread;
    use std::time::{Duration, Instant};

    use udp_greet::{GreetServer, ServerBuilder, ServerHandle, SourceTokens, TokenFormat};

    use crate::common::linux::{
        Generator, Load, measure_round, mmsg_greet_loop, pin_to_cpu, udp_rcvbuf_errors,
        with_new_threads,
    };
    use crate::common::{HandServer, Table, median};

    const REQUEST: &[u8] = b"0123456789abcdef"; // 16 bytes

    /// The bench's token format: a request's first 16 bytes.
    struct Leading;

    impl TokenFormat for Leading {
        fn find<'a>(&self, datagram: &'a [u8]) -> Option<&'a [u8]> {
            datagram.get(..udp_greet::TOKEN_LEN)
        }
        fn write(&self, datagram: &mut Vec<u8>, token: &[u8]) {
            datagram.splice(..0, token.iter().copied());
        }
    }

    fn tokens() -> SourceTokens {
        SourceTokens::new(*b"bench secret 16b", Leading).in_replies(false)
    }

    struct Plan {
        rounds: usize,
        per_server: Duration,
        flood: Duration,
        full: bool,
    }

    /// A server under test: its address and the threads whose CPU time is
    /// its cost.
    struct Subject {
        name: &'static str,
        addr: SocketAddr,
        tids: Vec<u32>,
        rps: Vec<f64>,
        cpu_per_reply: Vec<f64>,
        ratio_rps: Vec<f64>,
        ratio_cpu: Vec<f64>,
    }

    impl Subject {
        fn new(name: &'static str, addr: SocketAddr, tids: Vec<u32>) -> Self {
            Subject {
                name,
                addr,
                tids,
                rps: Vec::new(),
                cpu_per_reply: Vec::new(),
                ratio_rps: Vec::new(),
                ratio_cpu: Vec::new(),
            }
        }
    }

    /// Starts a udp-greet server and finds the threads it started.
    fn start_greet(builder: ServerBuilder) -> Result<(ServerHandle, Vec<u32>), udp_greet::Error> {
        with_new_threads(|| builder.bind("127.0.0.1:0")?.spawn(udp_greet::greet))
    }

    fn start_std(
        serve: fn() -> std::io::Result<HandServer>,
    ) -> std::io::Result<(HandServer, Vec<u32>)> {
        with_new_threads(serve)
    }

    pub fn main() -> Result<(), Box<dyn std::error::Error>> {
        let full = std::env::args().any(|a| a == "--bench");
        let plan = if full {
            Plan {
                rounds: 15,
                per_server: Duration::from_millis(300),
                flood: Duration::from_secs(1),
                full,
            }
        } else {
            Plan {
                rounds: 2,
                per_server: Duration::from_millis(10),
                flood: Duration::from_millis(10),
                full,
            }
        };
        let cpus = thread::available_parallelism().map_or(1, |n| n.get());
        let pinned = cpus >= 2;
        // Server threads inherit the pin of the thread that starts them.
        if pinned {
            pin_to_cpu(1)?;
        }
        let (batched, batched_tids) = start_greet(GreetServer::builder())?;
        let (portable, portable_tids) = start_greet(GreetServer::builder().portable_io(true))?;
        let (plain, plain_tids) = start_std(HandServer::std_loop)?;
        let (mmsg, mmsg_tids) =
            start_std(|| HandServer::start(|socket, stop| mmsg_greet_loop(socket, stop)))?;
        let (workers, workers_tids) = start_greet(GreetServer::builder().workers(2))?;
        let (no_gso, no_gso_tids) = start_greet(GreetServer::builder().gso(false))?;
        let (meta, meta_tids) = start_greet(GreetServer::builder().recv_metadata(true))?;
        let (meta_portable, meta_portable_tids) =
            start_greet(GreetServer::builder().portable_io(true).recv_metadata(true))?;
        let (plain32, plain32_tids) = start_greet(GreetServer::builder())?;
        let (tokened, tokened_tids) = start_greet(GreetServer::builder().source_tokens(tokens()))?;
        let (echoed, echoed_tids) =
            start_greet(GreetServer::builder().source_tokens(tokens().in_replies(true)))?;
        if pinned {
            pin_to_cpu(0)?;
        }

        let mut subjects = [
            Subject::new("udp-greet batched", batched.local_addr(), batched_tids),
            Subject::new("udp-greet portable", portable.local_addr(), portable_tids),
            Subject::new("std recv_from/send_to", plain.addr, plain_tids),
            Subject::new("udp-greet workers(2)", workers.local_addr(), workers_tids),
            Subject::new(
                "udp-greet batched, gso(false)",
                no_gso.local_addr(),
                no_gso_tids,
            ),
            Subject::new("hand-written recvmmsg loop", mmsg.addr, mmsg_tids),
            Subject::new(
                "udp-greet batched, recv_metadata",
                meta.local_addr(),
                meta_tids,
            ),
            Subject::new(
                "udp-greet portable, recv_metadata",
                meta_portable.local_addr(),
                meta_portable_tids,
            ),
            Subject::new(
                "udp-greet batched, 32-byte requests",
                plain32.local_addr(),
                plain32_tids,
            ),
            Subject::new(
                "udp-greet batched, tokens checked",
                tokened.local_addr(),
                tokened_tids,
            ),
            Subject::new(
                "udp-greet batched, tokens checked, echoed",
                echoed.local_addr(),
                echoed_tids,
            ),
        ];
        const STD: usize = 2;
        // Each with metadata, and the same path without; with tokens
        // checked, and the same server and requests without.
        const METADATA: [(usize, usize); 4] = [(6, 0), (7, 1), (9, 8), (10, 8)];
        // Every request to the last two carries a valid token (for the
        // generator's address, 127.0.0.1): 16 + 16 bytes.
        let token = tokens().token_for(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let with_token = [&token[..], REQUEST].concat();

        let mut generators = subjects
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let request = if i >= 8 { &with_token[..] } else { REQUEST };
                Generator::new(s.addr, 4, 32, request)
            })
            .collect::<Result<Vec<_>, _>>()?;
        for generator in generators.iter_mut() {
            generator.run(Duration::from_millis(20), u64::MAX); // warm-up
        }

        for _ in 0..plan.rounds {
            let round = measure_round(
                subjects
                    .iter()
                    .map(|s| s.tids.as_slice())
                    .zip(generators.iter_mut()),
                plan.per_server,
            );
            let (std_rps, std_cpu) = round[STD];
            for (subject, (rps, cpu)) in subjects.iter_mut().zip(round) {
                subject.rps.push(rps);
                subject.cpu_per_reply.push(cpu);
                subject.ratio_rps.push(rps / std_rps);
                subject.ratio_cpu.push(cpu / std_cpu);
            }
        }

        println!(
            "throughput: {} rounds x {:?} per server; 4 sockets x 32 requests of {} bytes in flight; {}{}",
            plan.rounds,
            plan.per_server,
            REQUEST.len(),
            if pinned {
                "servers pinned to CPU 1, generator to CPU 0"
            } else {
                "one CPU: nothing pinned"
            },
            if plan.full {
                ""
            } else {
                " (smoke pass: run `cargo bench --bench throughput` to measure)"
            }
        );
        // Per round, CPU per reply with metadata over without (before the
        // medians below sort the columns).
        let metadata_cost: Vec<f64> = METADATA
            .iter()
            .map(|&(on, off)| {
                let mut ratios: Vec<f64> = subjects[on]
                    .cpu_per_reply
                    .iter()
                    .zip(&subjects[off].cpu_per_reply)
                    .map(|(on, off)| on / off)
                    .collect();
                median(&mut ratios)
            })
            .collect();
        let mut table = Table::new(&[
            "server",
            "replies/s",
            "CPU/reply",
            "replies/s vs std",
            "CPU/reply vs std",
        ]);
        for s in subjects.iter_mut() {
            table.row(&[
                s.name.to_owned(),
                format!("{:.0}", median(&mut s.rps)),
                format!("{:.2}us", median(&mut s.cpu_per_reply) * 1e6),
                format!("{:.2}", median(&mut s.ratio_rps)),
                format!("{:.2}", median(&mut s.ratio_cpu)),
            ]);
        }
        table.print();
        println!(
            "CPU/reply with recv_metadata vs without: batched {:.3}, portable {:.3} (target <= 1.05)",
            metadata_cost[0], metadata_cost[1]
        );
        println!(
            "CPU/reply with a source token checked on every request vs without: {:.3} (target <= 1.10); checked and written back into every reply (in_replies): {:.3}",
            metadata_cost[2], metadata_cost[3]
        );
        check_cost(&plan);

        // 512 in flight: what each server loses.
        println!();
        println!(
            "512 requests in flight (16 sockets x 32) for {:?}; batched server receive buffer: {:?}",
            plan.flood,
            GreetServer::builder()
                .bind("127.0.0.1:0")?
                .recv_buffer_size()
        );
        let mut flood = Table::new(&[
            "server",
            "sent",
            "answered",
            "lost",
            "lost %",
            "kernel drops",
        ]);
        for (name, addr) in [
            ("udp-greet batched, default settings", subjects[0].addr),
            ("std loop, kernel default buffer", subjects[STD].addr),
        ] {
            let mut generator = Generator::new(addr, 16, 32, REQUEST)?;
            let drops_before = udp_rcvbuf_errors();
            let Load { sent, received, .. } = generator.run(plan.flood, u64::MAX);
            let drops = udp_rcvbuf_errors()
                .zip(drops_before)
                .map_or("?".to_owned(), |(after, before)| {
                    (after - before).to_string()
                });
            let lost = sent.saturating_sub(received);
            flood.row(&[
                name.to_owned(),
                sent.to_string(),
                received.to_string(),
                lost.to_string(),
                format!("{:.3}", 100.0 * lost as f64 / sent.max(1) as f64),
                drops,
            ]);
        }

        flood.print();
        println!("(kernel drops: the machine's UDP RcvbufErrors during the run)");

        drop(plain);
        drop(mmsg);
        let stats = tokened.control().stats();
        assert!(
            stats.validated > 0 && stats.invalid_tokens == 0,
            "{stats:?}"
        );
        for server in [
            batched,
            portable,
            workers,
            no_gso,
            meta,
            meta_portable,
            plain32,
            tokened,
            echoed,
        ] {
            let stats = server.shutdown()?;
            assert_eq!(stats.received, stats.accounted(), "{stats:?}");
        }
        Ok(())
    }

    /// The time of one token check through the public API (a read lock,
    /// the clock, one SipHash-2-4; the server's own checks skip the lock),
    /// for a valid token and a forged one of the same length.
    fn check_cost(plan: &Plan) {
        let tokens = tokens();
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let valid = tokens.token_for(ip);
        let mut forged = valid;
        forged[15] ^= 1;
        let count: u32 = if plan.full { 2_000_000 } else { 1_000 };
        let cost = |token: &[u8], expect: bool| {
            let mut samples: Vec<f64> = (0..5)
                .map(|_| {
                    let started = Instant::now();
                    for _ in 0..count {
                        assert_eq!(tokens.check(std::hint::black_box(token), ip), expect);
                    }
                    started.elapsed().as_secs_f64() * 1e9 / f64::from(count)
                })
                .collect();
            median(&mut samples)
        };
        let (good, bad) = (cost(&valid, true), cost(&forged, false));
        println!(
            "one SourceTokens::check: {good:.0} ns for a valid token, {bad:.0} ns for a forged one (median of 5 x {count})"
        );
    }
}
