//! The handler pool: concurrency for handlers that wait, the cost of the
//! hand-over for handlers that do not, and behaviour under overload.
//!
//! `cargo bench --bench pool` runs the full measurement; without `--bench`
//! (as under `cargo test`) it makes a short smoke pass.
//!
//! 1. Concurrency: a handler that blocks for 1 ms, 64 clients with one
//!    request in flight each. udp-greet with a pool of 8 and of 32 handler
//!    threads, inline with 8 and 32 workers (`SO_REUSEPORT` spreads peers
//!    by hash), and a thread-per-request `std::net` server, the one a user
//!    would write by hand. Rounds visit the servers in turn.
//! 2. Cost: `greet` as the handler, 4 sockets x 32 requests in flight;
//!    CPU per reply of the server's threads, pool against inline, in
//!    interleaved rounds.
//! 3. Overload: twice the pool's capacity offered at a steady rate for 5 s;
//!    what was answered, what the server shed and let expire against what
//!    the client missed, the answered requests' latency, and the process's
//!    resident memory over the run.

#[cfg(target_os = "linux")]
mod common;

#[cfg(not(target_os = "linux"))]
fn main() {
    println!("pool: this bench needs Linux (schedstat, /proc); nothing measured");
}

#[cfg(target_os = "linux")]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    bench::main()
}

#[cfg(target_os = "linux")]
mod bench {
    use std::net::{SocketAddr, UdpSocket};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::thread;
    use std::time::{Duration, Instant};

    use udp_greet::{Action, GreetServer, HandlerPool, Request, ServerBuilder, ServerHandle};

    use crate::common::linux::{Generator, cpu_time, pin_to_cpu, with_new_threads};
    use crate::common::{HandServer, Table, median, percentile};

    const HANDLER_TIME: Duration = Duration::from_millis(1);

    /// The handler that waits: 1 ms of blocking, then the greeting.
    fn waits(request: Request<'_>, reply: &mut Vec<u8>) -> Action {
        thread::sleep(HANDLER_TIME);
        udp_greet::greet(request, reply)
    }

    /// `clients` threads, one request in flight each, for `duration`;
    /// returns replies per second.
    fn closed_loop(addr: SocketAddr, clients: usize, duration: Duration) -> f64 {
        let stop = Arc::new(AtomicBool::new(false));
        let replies = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..clients)
            .map(|_| {
                let (stop, replies) = (stop.clone(), replies.clone());
                thread::spawn(move || {
                    let Ok(socket) = UdpSocket::bind("127.0.0.1:0") else {
                        return;
                    };
                    if socket.connect(addr).is_err()
                        || socket
                            .set_read_timeout(Some(Duration::from_secs(1)))
                            .is_err()
                    {
                        return;
                    }
                    let mut buf = [0u8; 64];
                    while !stop.load(Ordering::Relaxed) {
                        if socket.send(b"client").is_ok() && socket.recv(&mut buf).is_ok() {
                            replies.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        let started = Instant::now();
        thread::sleep(duration);
        let count = replies.load(Ordering::Relaxed);
        let elapsed = started.elapsed();
        stop.store(true, Ordering::Relaxed);
        for thread in threads {
            let _ = thread.join();
        }
        count as f64 / elapsed.as_secs_f64()
    }

    /// A `std::net` server that starts a thread for each request.
    fn thread_per_request() -> std::io::Result<HandServer> {
        HandServer::start(|socket, stopped| {
            let mut buf = [0u8; 2048];
            while !stopped.load(Ordering::Relaxed) {
                let Ok((n, peer)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                let request = buf[..n].to_vec();
                let socket = socket.clone();
                thread::spawn(move || {
                    thread::sleep(HANDLER_TIME);
                    let mut reply = Vec::new();
                    udp_greet::greet_into(&request, &mut reply);
                    let _ = socket.send_to(&reply, peer);
                });
            }
        })
    }

    fn concurrency(full: bool) -> Result<(), Box<dyn std::error::Error>> {
        let (rounds, per_case) = if full {
            (3, Duration::from_secs(1))
        } else {
            (1, Duration::from_millis(20))
        };
        let spawn = |b: ServerBuilder| b.bind("127.0.0.1:0")?.spawn(waits);
        let servers: Vec<(String, Option<f64>, ServerHandle)> = vec![
            (
                "udp-greet pool of 8".into(),
                Some(8.0),
                spawn(GreetServer::builder().handler_pool(HandlerPool::threads(8)))?,
            ),
            (
                "udp-greet pool of 32".into(),
                Some(32.0),
                spawn(GreetServer::builder().handler_pool(HandlerPool::threads(32)))?,
            ),
            (
                "udp-greet inline, workers(8)".into(),
                None,
                spawn(GreetServer::builder().workers(8))?,
            ),
            (
                "udp-greet inline, workers(32)".into(),
                None,
                spawn(GreetServer::builder().workers(32))?,
            ),
        ];
        let by_hand = thread_per_request()?;
        let mut results: Vec<Vec<f64>> = vec![Vec::new(); servers.len() + 1];
        for _ in 0..rounds {
            for (i, (_, _, server)) in servers.iter().enumerate() {
                results[i].push(closed_loop(server.local_addr(), 64, per_case));
            }
            results[servers.len()].push(closed_loop(by_hand.addr, 64, per_case));
        }
        println!(
            "pool, concurrency: handler blocks {HANDLER_TIME:?}; 64 clients, one request in flight each; {rounds} round(s) x {per_case:?} per server"
        );
        let mut table = Table::new(&[
            "server",
            "replies/s",
            "target (0.9 x threads x 1000)",
            "vs thread per request",
        ]);
        let by_hand_rps = median(&mut results[servers.len()].clone());
        for (i, (name, threads, _)) in servers.iter().enumerate() {
            let rps = median(&mut results[i]);
            table.row(&[
                name.clone(),
                format!("{rps:.0}"),
                threads.map_or("-".into(), |t| format!("{:.0}", 0.9 * t * 1000.0)),
                format!("{:.2}", rps / by_hand_rps),
            ]);
        }
        table.row(&[
            "std, a thread per request".into(),
            format!("{by_hand_rps:.0}"),
            "-".into(),
            "1.00".into(),
        ]);
        table.print();
        for (_, _, server) in servers {
            let stats = server.shutdown()?;
            assert_eq!(stats.received, stats.accounted(), "{stats:?}");
        }
        Ok(())
    }

    fn cost(full: bool) -> Result<(), Box<dyn std::error::Error>> {
        let (rounds, per_case) = if full {
            (15, Duration::from_millis(300))
        } else {
            (1, Duration::from_millis(10))
        };
        let cpus = thread::available_parallelism().map_or(1, |n| n.get());
        let pinned = cpus >= 2;
        if pinned {
            pin_to_cpu(1)?;
        }
        let start = |b: ServerBuilder| -> Result<(ServerHandle, Vec<u32>), udp_greet::Error> {
            with_new_threads(|| b.bind("127.0.0.1:0")?.spawn(udp_greet::greet))
        };
        let cases = [
            ("inline", start(GreetServer::builder())?),
            (
                "pool of 1",
                start(GreetServer::builder().handler_pool(HandlerPool::threads(1)))?,
            ),
            (
                "pool of 2",
                start(GreetServer::builder().handler_pool(HandlerPool::threads(2)))?,
            ),
        ];
        if pinned {
            pin_to_cpu(0)?;
        }
        let mut generators = cases
            .iter()
            .map(|(_, (s, _))| Generator::new(s.local_addr(), 4, 32, b"0123456789abcdef"))
            .collect::<Result<Vec<_>, _>>()?;
        let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
        let mut rps: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
        let mut ratio: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
        for _ in 0..rounds {
            let mut round = Vec::new();
            for ((_, (_, tids)), generator) in cases.iter().zip(generators.iter_mut()) {
                let before = cpu_time(tids);
                let load = generator.run(per_case, u64::MAX);
                let used = cpu_time(tids).saturating_sub(before);
                round.push((
                    used.as_secs_f64() / load.received.max(1) as f64,
                    load.received as f64 / load.elapsed.as_secs_f64(),
                ));
            }
            for (i, (c, r)) in round.iter().enumerate() {
                cpu[i].push(*c);
                rps[i].push(*r);
                ratio[i].push(c / round[0].0);
            }
        }
        println!();
        println!(
            "pool, cost: greet; 4 sockets x 32 requests in flight; {rounds} round(s) x {per_case:?}; {}",
            if pinned {
                "server threads on CPU 1, generator on CPU 0"
            } else {
                "nothing pinned"
            }
        );
        let mut table = Table::new(&["server", "replies/s", "CPU/reply", "CPU/reply vs inline"]);
        for (i, (name, _)) in cases.iter().enumerate() {
            table.row(&[
                (*name).to_owned(),
                format!("{:.0}", median(&mut rps[i])),
                format!("{:.2}us", median(&mut cpu[i]) * 1e6),
                format!("{:.2}", median(&mut ratio[i])),
            ]);
        }
        table.print();
        for (_, (server, _)) in cases {
            let stats = server.shutdown()?;
            assert_eq!(stats.received, stats.accounted(), "{stats:?}");
        }
        Ok(())
    }

    fn rss_kib() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            })
            .unwrap_or(0)
    }

    fn overload(full: bool) -> Result<(), Box<dyn std::error::Error>> {
        const THREADS: usize = 8;
        let max_wait = Duration::from_millis(20);
        let duration = if full {
            Duration::from_secs(5)
        } else {
            Duration::from_millis(50)
        };
        // Capacity: THREADS handlers of 1 ms each.
        let capacity = THREADS as f64 * 1000.0;
        let offered = 2.0 * capacity;
        let epoch = Instant::now();
        // A queue that 8 threads drain in about `max_wait`, so that the
        // overload is mostly shed at once and partly left to expire.
        let queue = THREADS * 24;
        let server = GreetServer::builder()
            .handler_pool(
                HandlerPool::threads(THREADS)
                    .queue_capacity(queue)
                    .max_queue_wait(max_wait),
            )
            .bind("127.0.0.1:0")?
            .spawn(|request: Request<'_>, reply: &mut Vec<u8>| {
                thread::sleep(HANDLER_TIME);
                reply.extend_from_slice(request.data());
                Action::Reply
            })?;
        let addr = server.local_addr();
        let socket = UdpSocket::bind("127.0.0.1:0")?;
        socket.connect(addr)?;
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        let receiver = {
            let socket = socket.try_clone()?;
            thread::spawn(move || {
                // Touched up front, so that the process's memory does not
                // grow as answers come in.
                let mut latencies = vec![Duration::ZERO; 200_000];
                let mut answered = 0;
                let mut buf = [0u8; 64];
                let mut idle = 0;
                // Until nothing has come for a while after the sender stops.
                while idle < 10 {
                    match crate::common::again(|| socket.recv(&mut buf)) {
                        Ok(16) => {
                            idle = 0;
                            let sent = u64::from_le_bytes(buf[8..16].try_into().unwrap_or([0; 8]));
                            let now = epoch.elapsed().as_nanos() as u64;
                            if let Some(slot) = latencies.get_mut(answered) {
                                *slot = Duration::from_nanos(now.saturating_sub(sent));
                                answered += 1;
                            }
                        }
                        Ok(_) => {}
                        Err(_) => idle += 1,
                    }
                }
                latencies.truncate(answered);
                latencies
            })
        };
        let mut rss = Vec::new();
        let started = Instant::now();
        let mut sent = 0u64;
        let mut next_rss = started + Duration::from_secs(1);
        while started.elapsed() < duration {
            // Send what is due by now at the offered rate.
            let due = (started.elapsed().as_secs_f64() * offered) as u64;
            while sent < due {
                let mut request = [0u8; 16];
                request[..8].copy_from_slice(&sent.to_le_bytes());
                request[8..].copy_from_slice(&(epoch.elapsed().as_nanos() as u64).to_le_bytes());
                let _ = socket.send(&request);
                sent += 1;
            }
            if Instant::now() >= next_rss {
                rss.push(rss_kib());
                next_rss += Duration::from_secs(1);
            }
            thread::sleep(Duration::from_micros(200));
        }
        let elapsed = started.elapsed();
        rss.push(rss_kib());
        let mut latencies = receiver.join().map_err(|_| "receiver thread")?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while server.stats().in_flight() > 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(1));
        }
        let handler = server.latency().handler;
        let handler_p99 = handler.p99();
        let stats = server.shutdown()?;
        let answered = latencies.len() as u64;
        let missed = sent.saturating_sub(answered);
        println!();
        println!(
            "pool, overload: {THREADS} handler threads of {HANDLER_TIME:?} (capacity {capacity:.0}/s), queue of {queue}, {offered:.0}/s offered for {duration:?}, max_queue_wait {max_wait:?}"
        );
        let mut table = Table::new(&["measure", "value"]);
        let rows: Vec<(&str, String)> = vec![
            ("sent", sent.to_string()),
            ("answered", answered.to_string()),
            (
                "answered/s (vs capacity)",
                format!(
                    "{:.0} ({:.2})",
                    answered as f64 / elapsed.as_secs_f64(),
                    answered as f64 / elapsed.as_secs_f64() / capacity,
                ),
            ),
            ("handler p50 (a 1 ms sleep)", format!("{:?}", handler.p50())),
            ("missed by the client", missed.to_string()),
            (
                "shed + expired + kernel drops (server)",
                format!(
                    "{} + {} + {} = {}",
                    stats.overloaded,
                    stats.expired,
                    stats.kernel_drops,
                    stats.overloaded + stats.expired + stats.kernel_drops
                ),
            ),
            (
                "answered p50",
                format!("{:?}", percentile(&mut latencies, 50.0)),
            ),
            (
                "answered p99",
                format!("{:?}", percentile(&mut latencies, 99.0)),
            ),
            (
                "answered max",
                format!("{:?}", percentile(&mut latencies, 100.0)),
            ),
            (
                "bound: max_queue_wait + handler p99",
                format!("{:?}", max_wait + handler_p99),
            ),
            (
                "RSS each second (KiB)",
                rss.iter().map(u64::to_string).collect::<Vec<_>>().join(" "),
            ),
        ];
        for (name, value) in rows {
            table.row(&[name.to_owned(), value]);
        }
        table.print();
        assert_eq!(stats.received, stats.accounted(), "{stats:?}");
        Ok(())
    }

    pub fn main() -> Result<(), Box<dyn std::error::Error>> {
        let full = std::env::args().any(|a| a == "--bench");
        if !full {
            println!("pool: smoke pass; run `cargo bench --bench pool` to measure");
        }
        concurrency(full)?;
        cost(full)?;
        overload(full)?;
        Ok(())
    }
}
