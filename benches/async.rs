//! The async server and client (feature `tokio`) against the blocking
//! server and hand-written tokio code, measured in the same run.
//!
//! `cargo bench --features tokio --bench async` runs the full measurement;
//! without `--bench` (as under `cargo test --all-features`) it makes a
//! short smoke pass.
//!
//! Servers: udp-greet's blocking batched server, its async server on a
//! one-thread tokio runtime, and a hand-written tokio loop (`recv_from` /
//! `send_to` on a `tokio::net::UdpSocket`, on a runtime of its own). Each
//! server's threads are pinned to CPU 1, the load generator to CPU 0; the
//! generator keeps 4 sockets x 32 requests in flight. Rounds visit the
//! servers in turn; ratios are medians of each round's ratio. CPU per reply
//! is the server threads' scheduler time.
//!
//! Clients: 1 000 calls kept in flight against the blocking batched server,
//! by `aio::GreetClient` (`max_in_flight(1000)`) and by a hand-written
//! tokio client that opens a socket per call, both on a one-thread runtime
//! on CPU 0, in alternate rounds.

#[cfg(target_os = "linux")]
mod common;

#[cfg(not(target_os = "linux"))]
fn main() {
    println!("async: this bench needs Linux (recvmmsg, schedstat); nothing measured");
}

#[cfg(target_os = "linux")]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    bench::main()
}

#[cfg(target_os = "linux")]
mod bench {
    use std::io;
    use std::net::SocketAddr;
    use std::rc::Rc;
    use std::sync::mpsc;
    use std::thread::{self, JoinHandle};
    use std::time::{Duration, Instant};

    use tokio::net::UdpSocket;
    use tokio::runtime::Runtime;
    use tokio::sync::oneshot;
    use udp_greet::GreetServer;
    use udp_greet::tokio as aio;

    use crate::common::linux::{Generator, measure_round, pin_to_cpu, with_new_threads};
    use crate::common::{Table, median};

    const REQUEST: &[u8] = b"0123456789abcdef"; // 16 bytes
    const CALLS_IN_FLIGHT: usize = 1_000;

    type BoxError = Box<dyn std::error::Error + Send + Sync>;

    /// A server running on a one-thread runtime on a thread of its own,
    /// stopped and joined when dropped.
    struct OnRuntime {
        addr: SocketAddr,
        stop: Option<oneshot::Sender<()>>,
        thread: Option<JoinHandle<()>>,
    }

    impl OnRuntime {
        /// Starts `serve` (given the runtime's stop signal) on a new thread
        /// with its own one-thread runtime; `serve` sends its address once
        /// it is listening.
        fn start<F, Fut>(serve: F) -> Result<OnRuntime, BoxError>
        where
            F: FnOnce(mpsc::Sender<SocketAddr>, oneshot::Receiver<()>) -> Fut + Send + 'static,
            Fut: std::future::Future<Output = ()>,
        {
            let (addr_tx, addr_rx) = mpsc::channel();
            let (stop_tx, stop_rx) = oneshot::channel();
            let thread = thread::Builder::new()
                .name("bench-runtime".into())
                .spawn(move || {
                    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    else {
                        return;
                    };
                    runtime.block_on(serve(addr_tx, stop_rx));
                })?;
            let addr = addr_rx.recv_timeout(Duration::from_secs(10))?;
            Ok(OnRuntime {
                addr,
                stop: Some(stop_tx),
                thread: Some(thread),
            })
        }

        /// udp-greet's async server with the greet handler.
        fn greet_server() -> Result<OnRuntime, BoxError> {
            OnRuntime::start(|addr, stop| async move {
                let Ok(server) = aio::GreetServer::bind("127.0.0.1:0") else {
                    return;
                };
                let _ = addr.send(server.local_addr());
                let stats = server
                    .serve_until(aio::greet, async {
                        let _ = stop.await;
                    })
                    .await;
                if let Ok(stats) = stats {
                    assert_eq!(stats.received, stats.accounted(), "{stats:?}");
                }
            })
        }

        /// The hand-written tokio loop: one `recv_from` and one `send_to`
        /// per datagram.
        fn tokio_loop() -> Result<OnRuntime, BoxError> {
            OnRuntime::start(|addr, mut stop| async move {
                let Ok(socket) = UdpSocket::bind("127.0.0.1:0").await else {
                    return;
                };
                let Ok(local) = socket.local_addr() else {
                    return;
                };
                let _ = addr.send(local);
                let mut buf = vec![0u8; 65_536];
                let mut reply = Vec::with_capacity(256);
                loop {
                    tokio::select! {
                        _ = &mut stop => return,
                        received = socket.recv_from(&mut buf) => {
                            if let Ok((n, peer)) = received {
                                reply.clear();
                                udp_greet::greet_into(&buf[..n], &mut reply);
                                let _ = socket.send_to(&reply, peer).await;
                            }
                        }
                    }
                }
            })
        }
    }

    impl Drop for OnRuntime {
        fn drop(&mut self) {
            if let Some(stop) = self.stop.take() {
                let _ = stop.send(());
            }
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
    }

    struct Subject {
        name: &'static str,
        addr: SocketAddr,
        tids: Vec<u32>,
        rps: Vec<f64>,
        cpu: Vec<f64>,
        vs_blocking: Vec<f64>,
        vs_tokio: Vec<f64>,
    }

    impl Subject {
        fn new(name: &'static str, addr: SocketAddr, tids: Vec<u32>) -> Self {
            Subject {
                name,
                addr,
                tids,
                rps: Vec::new(),
                cpu: Vec::new(),
                vs_blocking: Vec::new(),
                vs_tokio: Vec::new(),
            }
        }
    }

    pub fn main() -> Result<(), Box<dyn std::error::Error>> {
        let full = std::env::args().any(|a| a == "--bench");
        let (rounds, per_server, per_client) = if full {
            (15, Duration::from_millis(300), Duration::from_millis(500))
        } else {
            (2, Duration::from_millis(10), Duration::from_millis(20))
        };
        let pinned = thread::available_parallelism().map_or(1, |n| n.get()) >= 2;
        if pinned {
            pin_to_cpu(1)?;
        }
        let (blocking, blocking_tids) =
            with_new_threads(|| GreetServer::bind("127.0.0.1:0")?.spawn(udp_greet::greet))?;
        let (asynchronous, async_tids) =
            with_new_threads(|| OnRuntime::greet_server().map_err(|e| e.to_string()))?;
        let (hand, hand_tids) =
            with_new_threads(|| OnRuntime::tokio_loop().map_err(|e| e.to_string()))?;
        if pinned {
            pin_to_cpu(0)?;
        }
        let mut subjects = [
            Subject::new(
                "udp-greet blocking, batched",
                blocking.local_addr(),
                blocking_tids,
            ),
            Subject::new("udp-greet async", asynchronous.addr, async_tids),
            Subject::new("hand-written tokio loop", hand.addr, hand_tids),
        ];
        const BLOCKING: usize = 0;
        const TOKIO: usize = 2;
        let mut generators = subjects
            .iter()
            .map(|s| Generator::new(s.addr, 4, 32, REQUEST))
            .collect::<Result<Vec<_>, _>>()?;
        for generator in generators.iter_mut() {
            generator.run(Duration::from_millis(20), u64::MAX);
        }
        for _ in 0..rounds {
            let round = measure_round(
                subjects
                    .iter()
                    .map(|s| s.tids.as_slice())
                    .zip(generators.iter_mut()),
                per_server,
            );
            let (blocking_cpu, tokio_cpu) = (round[BLOCKING].1, round[TOKIO].1);
            for (subject, (rps, cpu)) in subjects.iter_mut().zip(round) {
                subject.rps.push(rps);
                subject.cpu.push(cpu);
                subject.vs_blocking.push(cpu / blocking_cpu);
                subject.vs_tokio.push(cpu / tokio_cpu);
            }
        }
        println!(
            "async: servers, {rounds} rounds x {per_server:?} each; 4 sockets x 32 requests of {} bytes in flight; {}{}",
            REQUEST.len(),
            if pinned {
                "servers on CPU 1, generator on CPU 0"
            } else {
                "one CPU: nothing pinned"
            },
            if full {
                ""
            } else {
                " (smoke pass: run `cargo bench --features tokio --bench async` to measure)"
            }
        );
        let mut table = Table::new(&[
            "server",
            "replies/s",
            "CPU/reply",
            "CPU/reply vs blocking",
            "CPU/reply vs tokio loop",
        ]);
        for s in subjects.iter_mut() {
            table.row(&[
                s.name.to_owned(),
                format!("{:.0}", median(&mut s.rps)),
                format!("{:.2}us", median(&mut s.cpu) * 1e6),
                format!("{:.2}", median(&mut s.vs_blocking)),
                format!("{:.2}", median(&mut s.vs_tokio)),
            ]);
        }
        table.print();
        drop(asynchronous);
        drop(hand);

        clients(&blocking.local_addr(), rounds, per_client, full)?;
        let stats = blocking.shutdown()?;
        assert_eq!(stats.received, stats.accounted(), "{stats:?}");
        Ok(())
    }

    /// What one client run did.
    #[derive(Default)]
    struct Calls {
        ok: u64,
        failed: u64,
        elapsed: Duration,
    }

    /// Keeps `CALLS_IN_FLIGHT` calls going for `span`, each task starting
    /// its next call when one ends.
    fn run_calls<F, Fut>(runtime: &Runtime, span: Duration, call: F) -> Calls
    where
        F: Fn(usize) -> Fut + 'static,
        Fut: std::future::Future<Output = bool> + 'static,
    {
        let local = tokio::task::LocalSet::new();
        let call = Rc::new(call);
        local.block_on(runtime, async move {
            let started = Instant::now();
            let end = started + span;
            let tasks: Vec<_> = (0..CALLS_IN_FLIGHT)
                .map(|task| {
                    let call = call.clone();
                    tokio::task::spawn_local(async move {
                        let (mut ok, mut failed) = (0u64, 0u64);
                        let mut i = 0;
                        while Instant::now() < end {
                            if call(task * 1_000_000 + i).await {
                                ok += 1;
                            } else {
                                failed += 1;
                            }
                            i += 1;
                        }
                        (ok, failed)
                    })
                })
                .collect();
            let mut calls = Calls::default();
            for task in tasks {
                if let Ok((ok, failed)) = task.await {
                    calls.ok += ok;
                    calls.failed += failed;
                }
            }
            calls.elapsed = started.elapsed();
            calls
        })
    }

    /// The hand-written client's call: a socket of its own, connected,
    /// one request, one reply (or a timeout after 1 s).
    async fn hand_call(server: SocketAddr, name: &[u8]) -> io::Result<bool> {
        let socket = UdpSocket::bind("127.0.0.1:0").await?;
        socket.connect(server).await?;
        socket.send(name).await?;
        let mut buf = [0u8; 1500];
        match tokio::time::timeout(Duration::from_secs(1), socket.recv(&mut buf)).await {
            Ok(Ok(n)) => Ok(udp_greet::is_greeting(name, &buf[..n])),
            _ => Ok(false),
        }
    }

    fn clients(
        server: &SocketAddr,
        rounds: usize,
        span: Duration,
        full: bool,
    ) -> Result<(), Box<dyn std::error::Error>> {
        let server = *server;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let client = runtime.block_on(
            aio::GreetClient::builder()
                .max_in_flight(CALLS_IN_FLIGHT)
                .connect(server),
        )?;
        let (mut ours, mut hand, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
        let (mut failed_ours, mut failed_hand) = (0, 0);
        let rounds = if full { rounds.min(7) } else { rounds };
        for _ in 0..rounds {
            let c = client.clone();
            let a = run_calls(&runtime, span, move |i| {
                let c = c.clone();
                async move {
                    let name = format!("call-{i}");
                    let mut buf = [0u8; 64];
                    matches!(
                        c.send_recv_into(name.as_bytes(), &mut buf).await,
                        Ok(n) if udp_greet::is_greeting(name.as_bytes(), &buf[..n])
                    )
                }
            });
            let b = run_calls(&runtime, span, move |i| async move {
                let name = format!("call-{i}");
                hand_call(server, name.as_bytes()).await.unwrap_or(false)
            });
            let (ra, rb) = (
                a.ok as f64 / a.elapsed.as_secs_f64(),
                b.ok as f64 / b.elapsed.as_secs_f64(),
            );
            failed_ours += a.failed;
            failed_hand += b.failed;
            ours.push(ra);
            hand.push(rb);
            ratio.push(ra / rb);
        }
        println!();
        println!(
            "async: clients, {rounds} rounds x {span:?} each; {CALLS_IN_FLIGHT} calls kept in flight against the blocking server; one-thread runtime on CPU 0"
        );
        let mut table = Table::new(&[
            "client",
            "calls/s",
            "failed calls",
            "calls/s vs hand-written",
        ]);
        table.row(&[
            "udp-greet aio::GreetClient".to_owned(),
            format!("{:.0}", median(&mut ours)),
            failed_ours.to_string(),
            format!("{:.2}", median(&mut ratio)),
        ]);
        table.row(&[
            "hand-written tokio, a socket per call".to_owned(),
            format!("{:.0}", median(&mut hand)),
            failed_hand.to_string(),
            "1.00".to_owned(),
        ]);
        table.print();
        println!(
            "(sockets the udp-greet client held at the end: {} of at most {CALLS_IN_FLIGHT})",
            client.open_sockets()
        );
        Ok(())
    }
}
