//! The clients with calls multiplexed by request id, against a client with
//! a socket per call and a hand-written tokio multiplexer, measured in the
//! same run.
//!
//! `cargo bench --features tokio --bench client` runs the full measurement;
//! without `--bench` (as under `cargo test --all-features`) it makes a short
//! smoke pass.
//!
//! The server is a hand-written `recvmmsg`/`sendmmsg` greet loop on CPU 1:
//! its reply (`Hello, <request>!`) carries the request's id. A request is a
//! tag byte, the id (8 bytes) and 7 bytes of padding. The server's socket
//! gets a 64 MiB receive buffer where the bench may (`SO_RCVBUFFORCE`, as
//! root), so that its drops do not measure the machine; each multiplexing
//! client's asks for 4 MiB (as granted: `net.core.rmem_max`).
//!
//! Async (one-thread runtime on CPU 0; N = 1 000 and 10 000 tasks, each
//! making calls one after another for the round's span):
//! - `multiplexed`: `aio::GreetClient` with `request_id`, one socket;
//! - `socket per call`: `aio::GreetClient` without ids, `max_in_flight(N)`
//!   (capped below the process's descriptor limit);
//! - `hand-written multiplexer`: one `tokio::net::UdpSocket`, a receive task,
//!   and a `Mutex<HashMap<id, oneshot::Sender>>`, as a user would write it.
//!
//! CPU per call is the client thread's scheduler time (the runtime and its
//! receive task run on it). A first round warms every client up and is not
//! counted; then rounds visit the clients in turn, in alternating order;
//! ratios are medians of each round's ratio.
//!
//! Blocking: one `GreetClient` shared by 64 threads, with and without ids,
//! and a hand-written blocking multiplexer (a receive thread, a channel per
//! call) shared the same way; the three take turns by round.
//!
//! `-- async` or `-- blocking` after the command runs only that part.

#[cfg(target_os = "linux")]
mod common;

#[cfg(not(all(target_os = "linux", feature = "tokio")))]
fn main() {
    println!("client: this bench needs Linux and the tokio feature; nothing measured");
}

#[cfg(all(target_os = "linux", feature = "tokio"))]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    bench::main()
}

#[cfg(all(target_os = "linux", feature = "tokio"))]
mod bench {
    use std::collections::HashMap;
    use std::net::{SocketAddr, UdpSocket as StdSocket};
    use std::rc::Rc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::mpsc::{SyncSender, sync_channel};
    use std::sync::{Arc, Mutex};
    use std::thread;
    use std::time::{Duration, Instant};

    use tokio::net::UdpSocket;
    use tokio::runtime::Runtime;
    use tokio::sync::oneshot;
    use udp_greet::GreetClient;
    use udp_greet::tokio as aio;

    use crate::common::linux::{force_recv_buffer, mmsg_greet_loop, pin_to_cpu, udp_rcvbuf_errors};
    use crate::common::{Table, median};

    const TAG: u8 = 0xA5;

    /// The receive buffer of the server and of every shared client socket
    /// (as granted: Linux caps it at `net.core.rmem_max`): room for the
    /// replies of thousands of calls in flight at once.
    const BUFFER: usize = 4 << 20;

    /// The id of a request, or of the server's reply to one.
    fn id_of(datagram: &[u8]) -> Option<u64> {
        let request = datagram.strip_prefix(b"Hello, ").unwrap_or(datagram);
        let (&tag, rest) = request.split_first()?;
        (tag == TAG).then_some(())?;
        Some(u64::from_le_bytes(rest.get(..8)?.try_into().ok()?))
    }

    fn request(id: u64) -> [u8; 16] {
        let mut request = [0u8; 16];
        request[0] = TAG;
        request[1..9].copy_from_slice(&id.to_le_bytes());
        request
    }

    fn is_reply_to(request: &[u8], reply: &[u8]) -> bool {
        udp_greet::is_greeting(request, reply)
    }

    /// CPU time of the calling thread so far.
    fn thread_cpu() -> Duration {
        std::fs::read_to_string("/proc/thread-self/schedstat")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .map_or(Duration::ZERO, Duration::from_nanos)
    }

    /// Datagrams the kernel dropped at the UDP socket bound to `port` on
    /// this machine (the last column of `/proc/net/udp`).
    fn drops_at(port: u16) -> u64 {
        std::fs::read_to_string("/proc/net/udp")
            .ok()
            .and_then(|table| {
                table.lines().skip(1).find_map(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    let local = fields.get(1)?;
                    let (_, p) = local.split_once(':')?;
                    (u16::from_str_radix(p, 16).ok()? == port)
                        .then(|| fields.last()?.parse().ok())?
                })
            })
            .unwrap_or(0)
    }

    /// The most descriptors this process may open (soft limit).
    fn descriptor_limit() -> usize {
        std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|limits| {
                let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
                line.split_whitespace().nth(3)?.parse().ok()
            })
            .unwrap_or(1024)
    }

    #[derive(Debug, Default, Clone, Copy)]
    struct Run {
        ok: u64,
        failed: u64,
        elapsed: Duration,
        cpu: Duration,
        /// Datagrams the kernel dropped for a full receive buffer (on any
        /// socket: the server's or the client's).
        drops: u64,
    }

    impl Run {
        fn rate(&self) -> f64 {
            self.ok as f64 / self.elapsed.as_secs_f64()
        }

        fn cpu_per_call(&self) -> f64 {
            self.cpu.as_secs_f64() / self.ok.max(1) as f64
        }
    }

    /// Runs `tasks` tasks on the runtime (this thread), each making calls
    /// one after another until `span` has passed.
    fn run_calls<F, Fut>(runtime: &Runtime, tasks: usize, span: Duration, call: F) -> Run
    where
        F: Fn(u64) -> Fut + 'static,
        Fut: std::future::Future<Output = bool> + 'static,
    {
        let local = tokio::task::LocalSet::new();
        let call = Rc::new(call);
        let cpu = thread_cpu();
        let drops = udp_rcvbuf_errors();
        let mut run = local.block_on(runtime, async move {
            let started = Instant::now();
            let end = started + span;
            let handles: Vec<_> = (0..tasks as u64)
                .map(|task| {
                    let call = call.clone();
                    tokio::task::spawn_local(async move {
                        let (mut ok, mut failed) = (0u64, 0u64);
                        let mut i = 0;
                        while Instant::now() < end {
                            if call((task << 32) | i).await {
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
            let mut run = Run::default();
            for handle in handles {
                if let Ok((ok, failed)) = handle.await {
                    run.ok += ok;
                    run.failed += failed;
                }
            }
            run.elapsed = started.elapsed();
            run
        });
        run.cpu = thread_cpu().saturating_sub(cpu);
        run.drops = udp_rcvbuf_errors()
            .zip(drops)
            .map_or(0, |(after, before)| after.saturating_sub(before));
        run
    }

    /// One call on `client` with the request of id `id`: whether the right
    /// reply came.
    async fn one_call(client: aio::GreetClient, id: u64) -> bool {
        let request = request(id);
        let mut buf = [0u8; 64];
        matches!(client.send_recv_into(&request, &mut buf).await,
            Ok(n) if is_reply_to(&request, &buf[..n]))
    }

    /// A hand-written tokio client that multiplexes by id: one socket, a
    /// receive task, and the calls in flight in a map.
    struct HandMux {
        socket: Arc<UdpSocket>,
        server: SocketAddr,
        calls: Arc<Mutex<HashMap<u64, oneshot::Sender<Vec<u8>>>>>,
    }

    impl HandMux {
        async fn new(server: SocketAddr) -> std::io::Result<HandMux> {
            let socket = UdpSocket::bind("127.0.0.1:0").await?;
            socket2::SockRef::from(&socket).set_recv_buffer_size(BUFFER)?;
            let socket = Arc::new(socket);
            let calls: Arc<Mutex<HashMap<u64, oneshot::Sender<Vec<u8>>>>> = Arc::default();
            let (receiving, waiting) = (socket.clone(), calls.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65_536];
                while let Ok((len, from)) = receiving.recv_from(&mut buf).await {
                    if from != server {
                        continue;
                    }
                    let Some(id) = id_of(&buf[..len]) else {
                        continue;
                    };
                    let sender = waiting.lock().ok().and_then(|mut calls| calls.remove(&id));
                    if let Some(sender) = sender {
                        let _ = sender.send(buf[..len].to_vec());
                    }
                }
            });
            Ok(HandMux {
                socket,
                server,
                calls,
            })
        }

        async fn call(&self, id: u64, request: &[u8]) -> bool {
            let (sender, receiver) = oneshot::channel();
            if let Ok(mut calls) = self.calls.lock() {
                calls.insert(id, sender);
            }
            if self.socket.send_to(request, self.server).await.is_err() {
                return false;
            }
            match tokio::time::timeout(Duration::from_secs(1), receiver).await {
                Ok(Ok(reply)) => is_reply_to(request, &reply),
                _ => {
                    if let Ok(mut calls) = self.calls.lock() {
                        calls.remove(&id);
                    }
                    false
                }
            }
        }
    }

    /// A hand-written blocking client that multiplexes by id, as a user
    /// would write one: one socket, a receive thread, and each call's
    /// channel in a map. The reference for what threads sharing one socket
    /// can do on this machine.
    struct HandBlockingMux {
        socket: Arc<StdSocket>,
        server: SocketAddr,
        calls: Arc<Mutex<HashMap<u64, SyncSender<Vec<u8>>>>>,
        stop: Arc<AtomicBool>,
        receiving: Option<thread::JoinHandle<()>>,
    }

    impl HandBlockingMux {
        fn new(server: SocketAddr) -> std::io::Result<HandBlockingMux> {
            let socket = StdSocket::bind("127.0.0.1:0")?;
            socket2::SockRef::from(&socket).set_recv_buffer_size(BUFFER)?;
            socket.set_read_timeout(Some(Duration::from_millis(20)))?;
            let socket = Arc::new(socket);
            let calls: Arc<Mutex<HashMap<u64, SyncSender<Vec<u8>>>>> = Arc::default();
            let stop = Arc::new(AtomicBool::new(false));
            let (receiver, waiting, stopped) = (socket.clone(), calls.clone(), stop.clone());
            let receiving = thread::spawn(move || {
                let mut buf = vec![0u8; 65_536];
                while !stopped.load(Ordering::Relaxed) {
                    let Ok((len, from)) = receiver.recv_from(&mut buf) else {
                        continue;
                    };
                    let Some(id) = id_of(&buf[..len]).filter(|_| from == server) else {
                        continue;
                    };
                    let sender = waiting.lock().ok().and_then(|mut calls| calls.remove(&id));
                    if let Some(sender) = sender {
                        let _ = sender.send(buf[..len].to_vec());
                    }
                }
            });
            Ok(HandBlockingMux {
                socket,
                server,
                calls,
                stop,
                receiving: Some(receiving),
            })
        }

        fn call(&self, id: u64, request: &[u8]) -> bool {
            let (sender, receiver) = sync_channel(1);
            if let Ok(mut calls) = self.calls.lock() {
                calls.insert(id, sender);
            }
            if self.socket.send_to(request, self.server).is_err() {
                return false;
            }
            match receiver.recv_timeout(Duration::from_secs(1)) {
                Ok(reply) => is_reply_to(request, &reply),
                Err(_) => {
                    if let Ok(mut calls) = self.calls.lock() {
                        calls.remove(&id);
                    }
                    false
                }
            }
        }
    }

    impl Drop for HandBlockingMux {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(receiving) = self.receiving.take() {
                let _ = receiving.join();
            }
        }
    }

    /// One blocking call (id, request, reply buffer): whether its reply was
    /// right.
    type CallFn<'a> = dyn Fn(u64, &[u8], &mut [u8]) -> bool + Sync + 'a;

    /// Whether the part named `part` runs: every part, unless the command
    /// line names `async` or `blocking` (`cargo bench ... -- blocking`).
    fn part_chosen(part: &str) -> bool {
        let named: Vec<String> = std::env::args()
            .filter(|a| a == "async" || a == "blocking")
            .collect();
        named.is_empty() || named.iter().any(|a| a == part)
    }

    pub fn main() -> Result<(), Box<dyn std::error::Error>> {
        let full = std::env::args().any(|a| a == "--bench");
        let (rounds, span, sizes) = if full {
            (15, Duration::from_millis(400), vec![1_000, 10_000])
        } else {
            (1, Duration::from_millis(30), vec![100])
        };
        let pinned = thread::available_parallelism().map_or(1, |n| n.get()) >= 2;
        // The server: a hand-written batched greet loop on CPU 1.
        let server_socket = StdSocket::bind("127.0.0.1:0")?;
        force_recv_buffer(&server_socket, 64 << 20)?;
        server_socket.set_read_timeout(Some(Duration::from_millis(20)))?;
        let server = server_socket.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let serving = {
            let stop = stop.clone();
            thread::spawn(move || {
                if pinned {
                    let _ = pin_to_cpu(1);
                }
                mmsg_greet_loop(&server_socket, &stop);
            })
        };
        if pinned {
            pin_to_cpu(0)?;
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let outcome = (|| -> Result<(), Box<dyn std::error::Error>> {
            if part_chosen("async") {
                for &tasks in &sizes {
                    asynchronous(&runtime, server, tasks, rounds, span)?;
                }
            }
            if part_chosen("blocking") {
                blocking(server, if full { 64 } else { 8 }, rounds, span)?;
            }
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        let _ = serving.join();
        outcome
    }

    fn asynchronous(
        runtime: &Runtime,
        server: SocketAddr,
        tasks: usize,
        rounds: usize,
        span: Duration,
    ) -> Result<(), Box<dyn std::error::Error>> {
        let per_call_limit = tasks.min(descriptor_limit().saturating_sub(256)).max(1);
        let (mux, per_call, hand) = runtime.block_on(async {
            let mux = aio::GreetClient::builder()
                .request_id(id_of)
                .recv_buffer_size(BUFFER)
                .max_in_flight(tasks)
                .initial_timeout(Duration::from_secs(1))
                .connect(server)
                .await?;
            let per_call = aio::GreetClient::builder()
                .max_in_flight(per_call_limit)
                .initial_timeout(Duration::from_secs(1))
                .connect(server)
                .await?;
            let hand = HandMux::new(server).await?;
            Ok::<_, Box<dyn std::error::Error>>((mux, per_call, Rc::new(hand)))
        })?;
        let mut runs: [Vec<Run>; 3] = Default::default();
        let (mut speedup, mut cpu_vs_hand) = (Vec::new(), Vec::new());
        let run = |which: usize| match which {
            0 => {
                let client = mux.clone();
                run_calls(runtime, tasks, span, move |id| one_call(client.clone(), id))
            }
            1 => {
                let client = per_call.clone();
                run_calls(runtime, tasks, span, move |id| one_call(client.clone(), id))
            }
            _ => {
                let client = hand.clone();
                run_calls(runtime, tasks, span, move |id| {
                    let client = client.clone();
                    async move { client.call(id, &request(id)).await }
                })
            }
        };
        // Round 0 warms every client up and is not counted; the order of
        // the clients alternates from round to round.
        for round in 0..=rounds {
            let order = if round % 2 == 0 { [0, 1, 2] } else { [2, 1, 0] };
            let mut this = [Run::default(); 3];
            for which in order {
                this[which] = run(which);
            }
            if round == 0 {
                continue;
            }
            let [a, b, c] = this;
            speedup.push(a.rate() / b.rate());
            cpu_vs_hand.push(a.cpu_per_call() / c.cpu_per_call());
            for (all, run) in runs.iter_mut().zip(this) {
                all.push(run);
            }
        }
        println!();
        println!(
            "client, async: {tasks} concurrent calls, {rounds} rounds x {span:?}; one-thread runtime on CPU 0, hand-written batched server on CPU 1"
        );
        let mut table = Table::new(&[
            "client",
            "calls/s",
            "CPU/call",
            "sockets",
            "failed calls",
            "buffer drops",
        ]);
        let names = [
            "udp-greet, multiplexed by id",
            "udp-greet, a socket per call",
            "hand-written tokio multiplexer",
        ];
        let sockets = [
            mux.open_sockets().to_string(),
            format!(
                "{} (max_in_flight {per_call_limit})",
                per_call.open_sockets()
            ),
            "1".to_owned(),
        ];
        for ((name, all), sockets) in names.iter().zip(&runs).zip(sockets) {
            let mut rates: Vec<f64> = all.iter().map(Run::rate).collect();
            let mut cpu: Vec<f64> = all.iter().map(Run::cpu_per_call).collect();
            table.row(&[
                (*name).to_owned(),
                format!("{:.0}", median(&mut rates)),
                format!("{:.2}us", median(&mut cpu) * 1e6),
                sockets,
                all.iter().map(|r| r.failed).sum::<u64>().to_string(),
                all.iter().map(|r| r.drops).sum::<u64>().to_string(),
            ]);
        }
        table.print();
        println!(
            "(drops so far at the server's socket: {}; at the multiplexed client's: {})",
            drops_at(server.port()),
            drops_at(mux.local_addr().port())
        );
        println!(
            "multiplexed calls/s vs a socket per call: {:.2} (target >= 1.3); multiplexed CPU/call vs the hand-written multiplexer: {:.2} (target <= 1.0)",
            median(&mut speedup),
            median(&mut cpu_vs_hand)
        );
        Ok(())
    }

    fn blocking(
        server: SocketAddr,
        threads: usize,
        rounds: usize,
        span: Duration,
    ) -> Result<(), Box<dyn std::error::Error>> {
        let with_ids = GreetClient::builder()
            .request_id(id_of)
            .recv_buffer_size(BUFFER)
            .initial_timeout(Duration::from_secs(1))
            .connect(server)?;
        let without = GreetClient::builder()
            .initial_timeout(Duration::from_secs(1))
            .connect(server)?;
        let hand = HandBlockingMux::new(server)?;
        // Each of `threads` threads makes calls one after another for the
        // span: `call` makes one and says whether its reply was right.
        let run = |call: &CallFn<'_>| -> Run {
            let ok = AtomicU64::new(0);
            let failed = AtomicU64::new(0);
            let started = Instant::now();
            let end = started + span;
            thread::scope(|s| {
                for t in 0..threads as u64 {
                    let (ok, failed) = (&ok, &failed);
                    s.spawn(move || {
                        let mut buf = [0u8; 64];
                        let mut i = 0;
                        while Instant::now() < end {
                            let id = (t << 32) | i;
                            if call(id, &request(id), &mut buf) {
                                ok.fetch_add(1, Ordering::Relaxed);
                            } else {
                                failed.fetch_add(1, Ordering::Relaxed);
                            }
                            i += 1;
                        }
                    });
                }
            });
            Run {
                ok: ok.into_inner(),
                failed: failed.into_inner(),
                elapsed: started.elapsed(),
                cpu: Duration::ZERO,
                drops: 0,
            }
        };
        let with_ids = |_: u64, request: &[u8], buf: &mut [u8]| matches!(with_ids.send_recv_into(request, buf), Ok(n) if is_reply_to(request, &buf[..n]));
        let without = |_: u64, request: &[u8], buf: &mut [u8]| matches!(without.send_recv_into(request, buf), Ok(n) if is_reply_to(request, &buf[..n]));
        let by_hand = |id: u64, request: &[u8], _: &mut [u8]| hand.call(id, request);
        let (mut a, mut b, mut c, mut ratio, mut to_hand) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut failed = 0;
        for round in 0..rounds {
            let (x, y, z) = if round % 2 == 0 {
                let x = run(&with_ids);
                (x, run(&without), run(&by_hand))
            } else {
                let z = run(&by_hand);
                let y = run(&without);
                (run(&with_ids), y, z)
            };
            failed += x.failed + y.failed + z.failed;
            ratio.push(x.rate() / y.rate());
            to_hand.push(x.rate() / z.rate());
            a.push(x.rate());
            b.push(y.rate());
            c.push(z.rate());
        }
        println!();
        println!(
            "client, blocking: one client shared by {threads} threads, {rounds} rounds x {span:?}; {failed} calls failed"
        );
        let mut table = Table::new(&["client", "calls/s"]);
        table.row(&[
            "GreetClient with request ids (one socket)".to_owned(),
            format!("{:.0}", median(&mut a)),
        ]);
        table.row(&[
            "GreetClient without (calls serialised)".to_owned(),
            format!("{:.0}", median(&mut b)),
        ]);
        table.row(&[
            "hand-written: receive thread + channel per call".to_owned(),
            format!("{:.0}", median(&mut c)),
        ]);
        table.print();
        println!(
            "with ids vs the hand-written blocking multiplexer: {:.2}",
            median(&mut to_hand)
        );
        println!(
            "with ids vs without: {:.2} (target >= 4)",
            median(&mut ratio)
        );
        Ok(())
    }
}
