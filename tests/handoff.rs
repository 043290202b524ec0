//! Handoffs: a running server stops and gives its sockets, kernel queues
//! intact, to the next generation (in the process, across `exec`, or over
//! a Unix socket), and no datagram is lost or counted twice.

mod util;

use std::collections::HashSet;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use udp_greet::{Error, GreetServer, HandlerPool, Handoff, Stats};
use util::{HANG_GUARD, V4, assert_balanced, greeter_holding, wait_until};

/// What the accounting across generations needs of one generation's
/// final counters (read in this process, or printed by a child).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Generation {
    received: u64,
    accounted: u64,
    shutdown_dropped: u64,
    kernel_drops: u64,
}

impl From<Stats> for Generation {
    fn from(stats: Stats) -> Generation {
        Generation {
            received: stats.received,
            accounted: stats.accounted(),
            shutdown_dropped: stats.shutdown_dropped,
            kernel_drops: stats.kernel_drops,
        }
    }
}

/// A client that sends `count` numbered requests at a steady pace from one
/// socket, and records every reply, on threads of its own.
struct Load {
    count: usize,
    /// Requests sent so far.
    sent: Arc<AtomicUsize>,
    /// The numbers of the requests answered, and replies seen twice.
    answered: Arc<Mutex<(HashSet<usize>, usize)>>,
    done: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Load {
    /// Starts sending to `server`: `count` requests, one every `every`
    /// (the sender stops by itself after the last, or at the hang guard's
    /// end four times over).
    fn start(server: SocketAddr, count: usize, every: Duration) -> Load {
        let socket = UdpSocket::bind(V4).expect("bind the load's socket");
        socket.connect(server).expect("connect the load's socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("read timeout");
        let reader = socket.try_clone().expect("clone the load's socket");
        let sent = Arc::new(AtomicUsize::new(0));
        let answered = Arc::new(Mutex::new((HashSet::new(), 0)));
        let done = Arc::new(AtomicBool::new(false));
        let sender = {
            let sent = sent.clone();
            thread::spawn(move || {
                let start = Instant::now();
                for i in 0..count {
                    if start.elapsed() > 4 * HANG_GUARD {
                        break;
                    }
                    // A steady pace, not a synchronisation: each request
                    // leaves at its own time, whatever the server does.
                    let due = start + every * u32::try_from(i).unwrap_or(u32::MAX);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        thread::sleep(wait);
                    }
                    if socket.send(format!("{i:06}").as_bytes()).is_ok() {
                        sent.fetch_add(1, Ordering::AcqRel);
                    }
                }
            })
        };
        let receiver = {
            let (answered, done) = (answered.clone(), done.clone());
            thread::spawn(move || {
                let mut buf = [0u8; 64];
                while !done.load(Ordering::Acquire) {
                    let Ok(n) = reader.recv(&mut buf) else {
                        continue;
                    };
                    let number = std::str::from_utf8(&buf[..n])
                        .ok()
                        .and_then(|s| s.strip_prefix("Hello, "))
                        .and_then(|s| s.strip_suffix('!'))
                        .and_then(|s| s.parse::<usize>().ok())
                        .expect("a greeting of a numbered request");
                    let mut answered = answered.lock().expect("answers");
                    if !answered.0.insert(number) {
                        answered.1 += 1;
                    }
                }
            })
        };
        Load {
            count,
            sent,
            answered,
            done,
            threads: vec![sender, receiver],
        }
    }

    fn answered(&self) -> usize {
        self.answered.lock().expect("answers").0.len()
    }

    /// Waits (within the hang guard) until `n` requests are answered.
    fn wait_for(&self, n: usize) {
        let deadline = Instant::now() + 4 * HANG_GUARD;
        while self.answered() < n {
            assert!(
                Instant::now() < deadline,
                "only {} of {n} answered",
                self.answered()
            );
            thread::yield_now();
        }
    }

    /// Waits until every request is sent and answered; returns how many
    /// were sent, and the replies seen twice.
    fn finish(mut self) -> (usize, usize) {
        self.wait_for(self.count);
        self.done.store(true, Ordering::Release);
        for thread in self.threads.drain(..) {
            thread.join().expect("load thread");
        }
        let duplicates = self.answered.lock().expect("answers").1;
        (self.sent.load(Ordering::Acquire), duplicates)
    }
}

/// The blocking server's settings for a generation: sockets it may hand
/// on, and (on Linux) three sockets sharing the port.
fn generation() -> udp_greet::ServerBuilder {
    let builder = GreetServer::builder()
        .allow_handoff(true)
        .recv_buffer_size(4 << 20);
    if cfg!(target_os = "linux") {
        builder.workers(3).reuse_port(true)
    } else {
        builder
    }
}

#[test]
fn a_handoff_under_load_answers_every_request_once_in_process_and_in_a_child_process() {
    const REQUESTS: usize = 1500;
    // First generation: a handler pool, whose queue is handed over answered.
    let first = generation()
        .handler_pool(HandlerPool::threads(2))
        .bind(V4)
        .expect("bind")
        .spawn(udp_greet::greet)
        .expect("spawn");
    let addr = first.local_addr();
    let load = Load::start(addr, REQUESTS, Duration::from_micros(700));
    load.wait_for(REQUESTS / 4);
    let handoff = first.handoff().expect("first handoff");
    let mut generations = vec![Generation::from(handoff.stats())];
    assert_eq!(handoff.local_addrs(), vec![addr]);
    let sockets = handoff.socket_count();
    assert_eq!(sockets, if cfg!(target_os = "linux") { 3 } else { 1 });

    // Second generation, in this process: inline handlers, one worker
    // asked for (each socket handed over gets one all the same).
    let second = GreetServer::builder()
        .from_handoff(handoff)
        .expect("from_handoff")
        .spawn(udp_greet::greet)
        .expect("spawn");
    assert_eq!(second.local_addr(), addr);
    load.wait_for(REQUESTS / 2);
    let handoff = second.handoff().expect("second handoff");
    generations.push(handoff.stats().into());

    // Third generation: a child process, sent the sockets over a Unix
    // socket (the upgrade in place, by exec, is the upgrade example's).
    let last = third_generation(handoff);
    let (sent, duplicates) = load.finish();
    generations.push(last());

    assert_eq!(sent, REQUESTS, "the load sent every request");
    assert_eq!(duplicates, 0, "no request is answered twice");
    for g in &generations {
        assert_eq!(g.received, g.accounted, "each generation's identity: {g:?}");
        assert_eq!(g.shutdown_dropped, 0, "a handoff drops nothing: {g:?}");
        assert!(g.received > 0, "each generation served: {generations:?}");
    }
    let received: u64 = generations.iter().map(|s| s.received).sum();
    let drops = generations.last().map_or(0, |s| s.kernel_drops);
    assert_eq!(
        received + drops,
        REQUESTS as u64,
        "sent = sum of received + kernel drops: {generations:?}"
    );
    assert_eq!(drops, 0, "every request was answered, so none was dropped");
}

/// Serves `handoff` in a child process (Unix: the test binary, started with
/// one end of a Unix socket as its standard input, over which the sockets
/// go), or in this process elsewhere; returns how to stop it and read its
/// final counters.
#[cfg(unix)]
fn third_generation(handoff: Handoff) -> Box<dyn FnOnce() -> Generation> {
    use std::io::{BufRead, BufReader};
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixStream;
    use std::process::{Command, Stdio};

    let (here, there) = UnixStream::pair().expect("a socket pair");
    // Under an emulator the child runs in it, as this binary does.
    let mut argv = util::emulator::runner();
    argv.push(std::env::current_exe().expect("the test binary").into());
    let (program, args) = argv.split_first().expect("a program");
    let mut child = Command::new(program)
        .args(args)
        .args(["--exact", "handoff_child", "--ignored", "--nocapture"])
        .env("UDP_GREET_TEST_HANDOFF_CHILD", "1")
        .stdin(Stdio::from(OwnedFd::from(there)))
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the next generation");
    handoff.send(&here).expect("send the sockets to the child");
    // The child has its own copies now.
    drop(handoff);
    let stdout = child.stdout.take().expect("the child's output");
    Box::new(move || {
        // The end of its input stops the child.
        drop(here);
        let stats = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            // Read to the end: the child writes on after its counters.
            .filter_map(|line| line.strip_prefix("handoff-child-stats ").map(parse_stats))
            .last()
            .expect("the child reports its counters");
        let status = child.wait().expect("the child ends");
        assert!(status.success(), "the child generation failed: {status}");
        stats
    })
}

#[cfg(not(unix))]
fn third_generation(handoff: Handoff) -> Box<dyn FnOnce() -> Generation> {
    let third = GreetServer::builder()
        .from_handoff(handoff)
        .expect("from_handoff")
        .spawn(udp_greet::greet)
        .expect("spawn");
    Box::new(move || third.shutdown().expect("shutdown").into())
}

/// The counters the child prints: received, accounted, shutdown_dropped,
/// kernel_drops.
#[cfg(unix)]
fn parse_stats(line: &str) -> Generation {
    let values: Vec<u64> = line
        .split(',')
        .map(|v| v.parse().expect("a counter"))
        .collect();
    let [received, accounted, shutdown_dropped, kernel_drops] =
        values.try_into().expect("four counters");
    Generation {
        received,
        accounted,
        shutdown_dropped,
        kernel_drops,
    }
}

/// The child generation (run by the test above, not by itself): receives
/// the sockets over its standard input, a Unix socket, and serves them
/// until that closes; then prints its final counters.
#[cfg(unix)]
#[test]
#[ignore = "the child generation of the handoff test"]
fn handoff_child() {
    use std::io::Read;

    if std::env::var_os("UDP_GREET_TEST_HANDOFF_CHILD").is_none() {
        return;
    }
    let stdin = std::io::stdin();
    let handoff = Handoff::receive(&stdin).expect("the sockets sent");
    let server = GreetServer::builder()
        .from_handoff(handoff)
        .expect("from_handoff")
        .spawn(udp_greet::greet)
        .expect("spawn");
    let mut rest = Vec::new();
    let _ = stdin.lock().read_to_end(&mut rest);
    let stats = server.shutdown().expect("shutdown");
    println!(
        "handoff-child-stats {},{},{},{}",
        stats.received,
        stats.accounted(),
        stats.shutdown_dropped,
        stats.kernel_drops
    );
}

/// Requests queued before the server first receives come in one batch (on
/// the batched path); a handoff while the handler holds the first answers
/// the rest of the batch, where a shutdown would drop them.
#[test]
fn a_handoff_answers_the_batch_in_hand() {
    let server = GreetServer::builder()
        .allow_handoff(true)
        .bind(V4)
        .expect("bind");
    let addr = server.local_addr();
    let client = UdpSocket::bind(V4).expect("client");
    client.set_read_timeout(Some(HANG_GUARD)).expect("timeout");
    for name in ["hold", "a", "b", "c", "d", "e"] {
        client.send_to(name.as_bytes(), addr).expect("send");
    }
    let (handler, hold) = greeter_holding(b"hold");
    let running = server.spawn(handler).expect("spawn");
    hold.started();
    let control = running.control();
    let handing_off = thread::spawn(move || running.handoff());
    wait_until("the handoff to begin", || control.is_shutdown());
    hold.release();
    let handoff = handing_off
        .join()
        .expect("handoff thread")
        .expect("handoff");
    let first = handoff.stats();
    assert_balanced(&first);
    assert_eq!(first.shutdown_dropped, 0, "{first:?}");
    if cfg!(target_os = "linux") {
        assert_eq!(first.received, 6, "one batch of six: {first:?}");
    }
    let second = GreetServer::builder()
        .from_handoff(handoff)
        .expect("from_handoff")
        .spawn(udp_greet::greet)
        .expect("spawn");
    let mut seen = HashSet::new();
    let mut buf = [0u8; 64];
    for _ in 0..6 {
        let n = client.recv(&mut buf).expect("every request is answered");
        assert!(seen.insert(buf[..n].to_vec()), "answered once");
    }
    let second = second.shutdown().expect("shutdown");
    assert_eq!(first.received + second.received, 6);
}

/// Requests queued in the handler pool when the handoff begins are all
/// answered, whatever the pool's drain time (none here).
#[test]
fn a_handoff_answers_the_pool_queue() {
    let (handler, hold) = greeter_holding(b"hold");
    let running = GreetServer::builder()
        .allow_handoff(true)
        .handler_pool(HandlerPool::threads(1).queue_capacity(64))
        .bind(V4)
        .expect("bind")
        .spawn(handler)
        .expect("spawn");
    let addr = running.local_addr();
    let client = UdpSocket::bind(V4).expect("client");
    client.set_read_timeout(Some(HANG_GUARD)).expect("timeout");
    client.send_to(b"hold", addr).expect("send");
    hold.started();
    for i in 0..20 {
        client
            .send_to(format!("q{i}").as_bytes(), addr)
            .expect("send");
    }
    let control = running.control();
    wait_until("twenty requests queued", || control.stats().queued == 20);
    let handing_off = thread::spawn(move || running.handoff());
    wait_until("the handoff to begin", || control.is_shutdown());
    hold.release();
    let stats = handing_off
        .join()
        .expect("handoff thread")
        .expect("handoff")
        .stats();
    assert_balanced(&stats);
    assert_eq!(
        (stats.replied, stats.shutdown_dropped),
        (21, 0),
        "{stats:?}"
    );
    let mut buf = [0u8; 64];
    for _ in 0..21 {
        client.recv(&mut buf).expect("every request is answered");
    }
}

#[test]
fn a_server_that_cannot_hand_off_says_so_and_frees_its_port() {
    let running = GreetServer::bind(V4)
        .expect("bind")
        .spawn(udp_greet::greet)
        .expect("spawn");
    let addr = running.local_addr();
    let err = running.handoff().expect_err("bound without allow_handoff");
    assert!(
        matches!(err, Error::InvalidConfig { setting: "ServerHandle::handoff", addr: Some(a), .. } if a == addr),
        "{err:?}"
    );
    assert!(err.to_string().contains("allow_handoff(true)"), "{err}");
    UdpSocket::bind(addr).expect("the port is free again");
}

#[test]
fn a_server_on_a_socket_made_elsewhere_hands_off_without_the_setting() {
    let socket = UdpSocket::bind(V4).expect("bind");
    let addr = socket.local_addr().expect("addr");
    let running = GreetServer::from_std(socket)
        .expect("from_std")
        .spawn(udp_greet::greet)
        .expect("spawn");
    let handoff = running.handoff().expect("handoff");
    assert_eq!(handoff.local_addrs(), vec![addr]);
    let client = UdpSocket::bind(V4).expect("client");
    client.set_read_timeout(Some(HANG_GUARD)).expect("timeout");
    // Sent while no server receives: it waits in the queue.
    client.send_to(b"Sarah", addr).expect("send");
    let next = GreetServer::builder()
        .from_handoff(handoff)
        .expect("from_handoff")
        .spawn(udp_greet::greet)
        .expect("spawn");
    let mut buf = [0u8; 64];
    let n = client.recv(&mut buf).expect("answered by the next server");
    assert_eq!(&buf[..n], b"Hello, Sarah!");
    assert_eq!(next.shutdown().expect("shutdown").replied, 1);
}

#[cfg(target_os = "linux")]
#[test]
fn every_socket_of_a_shared_port_is_handed_on_and_served() {
    let running = GreetServer::builder()
        .allow_handoff(true)
        .workers(3)
        .reuse_port(true)
        .bind(V4)
        .expect("bind")
        .spawn(udp_greet::greet)
        .expect("spawn");
    let addr = running.local_addr();
    let handoff = running.handoff().expect("handoff");
    assert_eq!(
        (handoff.local_addrs().len(), handoff.socket_count()),
        (1, 3)
    );
    // Queued while no one receives, spread by the kernel over the three
    // sockets by the senders' ports.
    let clients: Vec<UdpSocket> = (0..30)
        .map(|_| {
            let c = UdpSocket::bind(V4).expect("client");
            c.set_read_timeout(Some(HANG_GUARD)).expect("timeout");
            c.send_to(b"x", addr).expect("send");
            c
        })
        .collect();
    // One worker asked for; each socket gets one all the same.
    let next = GreetServer::builder()
        .from_handoff(handoff)
        .expect("from_handoff")
        .spawn(udp_greet::greet)
        .expect("spawn");
    wait_until("a worker for each socket", || {
        util::workers_of(addr.port()) == 3
    });
    let mut buf = [0u8; 16];
    for client in &clients {
        client.recv(&mut buf).expect("every socket is served");
    }
    let stats = next.shutdown().expect("shutdown");
    assert_eq!(stats.replied, 30);
}

#[cfg(unix)]
#[test]
fn sockets_pass_over_a_unix_socket_with_their_queues() {
    use std::os::unix::net::UnixStream;

    let running = util::greet_server(GreetServer::builder().allow_handoff(true), V4);
    let addr = running.local_addr();
    let handoff = running.handoff().expect("handoff");
    let client = UdpSocket::bind(V4).expect("client");
    client.set_read_timeout(Some(HANG_GUARD)).expect("timeout");
    for name in ["Michael", "Tracy", "Sarah"] {
        client.send_to(name.as_bytes(), addr).expect("send");
    }
    let (here, there) = UnixStream::pair().expect("a socket pair");
    let receiver = thread::spawn(move || Handoff::receive(&there));
    handoff.send(&here).expect("send the sockets");
    drop(handoff);
    let received = receiver.join().expect("receiver").expect("receive");
    assert_eq!(received.local_addrs(), vec![addr]);
    let next = GreetServer::builder()
        .from_handoff(received)
        .expect("from_handoff")
        .spawn(udp_greet::greet)
        .expect("spawn");
    let mut buf = [0u8; 64];
    let mut replies = Vec::new();
    for _ in 0..3 {
        let n = client
            .recv(&mut buf)
            .expect("the queued requests are answered");
        replies.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    replies.sort();
    assert_eq!(
        replies,
        ["Hello, Michael!", "Hello, Sarah!", "Hello, Tracy!"]
    );
    assert_eq!(next.shutdown().expect("shutdown").received, 3);
}

#[cfg(unix)]
#[test]
fn what_is_not_a_handoff_is_refused() {
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    // Bytes of something else.
    let (mut here, there) = UnixStream::pair().expect("a socket pair");
    here.write_all(b"GET / HTTP/1.1\r\n\r\n").expect("write");
    let err = Handoff::receive(&there).expect_err("not a handoff");
    assert!(matches!(err, Error::Handoff { .. }), "{err:?}");
    // The sender gone before anything came.
    let (here, there) = UnixStream::pair().expect("a socket pair");
    drop(here);
    let err = Handoff::receive(&there).expect_err("nothing came");
    let cause = std::error::Error::source(&err).map(ToString::to_string);
    assert!(cause.is_some_and(|c| c.contains("closed")), "{err:?}");
    // A handoff of no socket is empty, and no server can serve it.
    let (here, there) = UnixStream::pair().expect("a socket pair");
    Handoff::from_sockets(Vec::new())
        .expect("empty")
        .send(&here)
        .expect("send");
    let empty = Handoff::receive(&there).expect("an empty handoff");
    assert_eq!(empty.socket_count(), 0);
    assert!(matches!(
        GreetServer::builder().from_handoff(empty),
        Err(Error::InvalidConfig { .. })
    ));
}

#[cfg(feature = "tokio")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engines_hand_off_to_each_other() {
    let first = udp_greet::tokio::GreetServer::builder()
        .allow_handoff(true)
        .bind(V4)
        .expect("bind")
        .spawn(udp_greet::tokio::greet)
        .expect("spawn");
    let addr = first.local_addr();
    let client = tokio::net::UdpSocket::bind(V4).await.expect("client");
    client.connect(addr).await.expect("connect");
    let mut buf = [0u8; 64];
    let mut ask = async |name: &str| {
        client.send(name.as_bytes()).await.expect("send");
        let n = tokio::time::timeout(HANG_GUARD, client.recv(&mut buf))
            .await
            .expect("answered in time")
            .expect("recv");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(ask("Michael").await, "Hello, Michael!");
    let handoff = first.handoff().await.expect("async handoff");
    assert_eq!(handoff.stats().replied, 1);
    let second = GreetServer::builder()
        .from_handoff(handoff)
        .expect("from_handoff")
        .spawn(udp_greet::greet)
        .expect("spawn");
    assert_eq!(ask("Tracy").await, "Hello, Tracy!");
    let handoff = tokio::task::spawn_blocking(move || second.handoff())
        .await
        .expect("join")
        .expect("blocking handoff");
    assert_eq!(handoff.stats().replied, 1);
    let third = udp_greet::tokio::GreetServer::builder()
        .from_handoff(handoff)
        .expect("from_handoff")
        .spawn(udp_greet::tokio::greet)
        .expect("spawn");
    assert_eq!(ask("Sarah").await, "Hello, Sarah!");
    assert_eq!(third.shutdown().await.expect("shutdown").replied, 1);
}

/// The README's walkthrough, run: the upgrade example replaces itself
/// twice (by exec, with the sockets) while a client sends, and every
/// request is answered once.
#[cfg(unix)]
#[test]
fn the_upgrade_example_upgrades_in_place_under_load() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};

    const REQUESTS: usize = 600;
    let mut program = std::env::current_exe().expect("the test binary");
    program.pop();
    if program.ends_with("deps") {
        program.pop();
    }
    let program = program.join("examples").join("upgrade");
    assert!(
        program.is_file(),
        "{} is built with the tests",
        program.display()
    );
    // Under qemu-user the example runs in the emulator, and so does the
    // program it executes in its place (through the kernel's binfmt_misc
    // entry for the emulated machine, if there is one), which finds the
    // emulated machine's libraries through QEMU_LD_PREFIX.
    let runner = util::emulator::runner();
    if util::emulator::under(util::emulator::Emulator::QemuUser)
        && !binfmt_runs_emulated_programs()
        && util::emulator::QEMU_EXEC.skips()
    {
        return;
    }
    let ld_prefix = runner
        .iter()
        .position(|arg| arg == "-L")
        .and_then(|i| runner.get(i + 1))
        .cloned();
    let mut argv = runner.clone();
    argv.push(program.clone().into());
    let (launcher, args) = argv.split_first().expect("a program");
    let mut command = Command::new(launcher);
    if let Some(prefix) = ld_prefix {
        command.env("QEMU_LD_PREFIX", prefix);
    }
    let mut child = command
        .args(args)
        .args(["--listen", V4])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the upgrade example");
    let mut input = child.stdin.take().expect("its input");
    let mut lines = BufReader::new(child.stdout.take().expect("its output")).lines();
    let mut next_line = move || {
        lines
            .next()
            .expect("a line from the example")
            .expect("readable output")
    };
    let first = next_line();
    let (pid, addr) = first
        .strip_prefix("generation 1 (pid ")
        .and_then(|rest| rest.split_once(") serving on "))
        .and_then(|(pid, addr)| Some((pid.to_owned(), addr.strip_suffix("...")?.parse().ok()?)))
        .unwrap_or_else(|| panic!("unexpected first line: {first}"));
    let addr: SocketAddr = addr;
    let load = Load::start(addr, REQUESTS, Duration::from_micros(700));
    let mut ended = Vec::new();
    for (generation, at) in [(2, REQUESTS / 4), (3, REQUESTS / 2)] {
        load.wait_for(at);
        input.write_all(b"upgrade\n").expect("ask for an upgrade");
        ended.push(next_line());
        let started = next_line();
        assert_eq!(
            started,
            format!("generation {generation} (pid {pid}) serving on {addr}..."),
            "the same process, on the same address"
        );
    }
    let (sent, duplicates) = load.finish();
    drop(input);
    ended.push(next_line());
    assert!(child.wait().expect("the example ends").success());
    assert_eq!((sent, duplicates), (REQUESTS, 0));
    let mut received = 0;
    for (line, generation) in ended.iter().zip(1..) {
        let counts = line
            .strip_prefix(&format!("generation {generation}: received "))
            .and_then(|rest| rest.split_once(", replied "))
            .and_then(|(r, a)| Some((r.parse::<usize>().ok()?, a.parse::<usize>().ok()?)))
            .unwrap_or_else(|| panic!("unexpected line: {line}"));
        assert_eq!(
            counts.0, counts.1,
            "each generation answered all it took: {line}"
        );
        assert!(counts.0 > 0, "each generation served: {ended:?}");
        received += counts.0;
    }
    assert_eq!(received, REQUESTS, "{ended:?}");
}

/// A handler future in flight when the async server hands off runs to its
/// reply, though the drain time is 0 (where a shutdown would drop it).
#[cfg(feature = "tokio")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_async_handoff_lets_the_handlers_in_flight_finish() {
    use tokio::sync::{Notify, mpsc};

    let (started_tx, mut started) = mpsc::unbounded_channel();
    let release = Arc::new(Notify::new());
    let handler = {
        let release = release.clone();
        move |request: udp_greet::tokio::Request| {
            let (started_tx, release) = (started_tx.clone(), release.clone());
            async move {
                let _ = started_tx.send(());
                release.notified().await;
                udp_greet::tokio::greet(request).await
            }
        }
    };
    let server = udp_greet::tokio::GreetServer::builder()
        .allow_handoff(true)
        .bind(V4)
        .expect("bind")
        .spawn(handler)
        .expect("spawn");
    let addr = server.local_addr();
    let control = server.control();
    let client = tokio::net::UdpSocket::bind(V4).await.expect("client");
    client.send_to(b"Sarah", addr).await.expect("send");
    tokio::time::timeout(HANG_GUARD, started.recv())
        .await
        .expect("the handler starts in time");
    let handing_off = tokio::spawn(server.handoff());
    wait_until("the handoff to begin", || control.is_shutdown());
    release.notify_one();
    let handoff = tokio::time::timeout(HANG_GUARD, handing_off)
        .await
        .expect("the handoff ends in time")
        .expect("join")
        .expect("handoff");
    let stats = handoff.stats();
    assert_eq!((stats.replied, stats.shutdown_dropped), (1, 0), "{stats:?}");
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(HANG_GUARD, client.recv(&mut buf))
        .await
        .expect("the reply comes in time")
        .expect("recv");
    assert_eq!(&buf[..n], b"Hello, Sarah!");
}

/// An `exec` that fails leaves the process as it was: its other
/// descriptors untouched, and the sockets servable again.
#[cfg(unix)]
#[test]
fn a_failed_exec_gives_the_sockets_back_untouched() {
    use std::io::{Seek, Write};
    use std::process::Command;

    let mut file = tempfile_in_target();
    let running = util::greet_server(GreetServer::builder().allow_handoff(true), V4);
    let addr = running.local_addr();
    let handoff = running.handoff().expect("handoff");
    let err = handoff.exec(&mut Command::new("/nonexistent/udp-greet-next-generation"));
    assert!(
        matches!(
            &err,
            Error::Handoff {
                what: "execute the new program",
                ..
            }
        ),
        "{err:?}"
    );
    file.write_all(b"still a file")
        .expect("the file is untouched");
    file.rewind().expect("rewind");
    let next = GreetServer::builder()
        .from_handoff(handoff)
        .expect("from_handoff")
        .spawn(udp_greet::greet)
        .expect("spawn");
    let client = UdpSocket::bind(V4).expect("client");
    client.set_read_timeout(Some(HANG_GUARD)).expect("timeout");
    client.send_to(b"Tracy", addr).expect("send");
    let mut buf = [0u8; 64];
    let n = client.recv(&mut buf).expect("served again");
    assert_eq!(&buf[..n], b"Hello, Tracy!");
    next.shutdown().expect("shutdown");
}

/// A file of the test's own, removed when dropped.
#[cfg(unix)]
fn tempfile_in_target() -> std::fs::File {
    let path = std::env::temp_dir().join(format!(
        "udp-greet-handoff-{}-{:?}",
        std::process::id(),
        thread::current().id()
    ));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("a file");
    let _ = std::fs::remove_file(&path);
    file
}

/// What `Handoff::from_env` makes of environments it did not come from:
/// each case runs this test binary as a child, its process id set by a
/// shell as `exec` would keep it.
#[cfg(unix)]
#[test]
fn from_env_refuses_what_is_not_a_handoff() {
    use std::process::{Command, Stdio};

    let exe = std::env::current_exe().expect("the test binary");
    let run_with = |fds: &str, same_pid: bool, stdin: Stdio, read: bool| -> String {
        let pid = if same_pid { "$$" } else { "1" };
        let output = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "export UDP_GREET_HANDOFF_PID={pid}; exec \"$0\" \"$@\""
            ))
            .args(util::emulator::runner())
            .arg(&exe)
            .args(["--exact", "from_env_child", "--ignored", "--nocapture"])
            .env("UDP_GREET_HANDOFF_FDS", fds)
            .env("UDP_GREET_TEST_FROM_ENV_CHILD", "1")
            .env("UDP_GREET_TEST_FROM_ENV_READ", if read { "1" } else { "" })
            .stdin(stdin)
            .output()
            .expect("run the child");
        let out = String::from_utf8_lossy(&output.stdout);
        out.lines()
            .find_map(|l| l.strip_prefix("from-env: "))
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("no result from the child: {out}"))
    };
    let run = |fds: &str, same_pid: bool| run_with(fds, same_pid, Stdio::piped(), true);
    // Another process's handoff, inherited: not this one's.
    assert_eq!(run("0", false), "none (stdin readable: true)");
    // Standard input, a pipe: not a UDP socket, and left open.
    let pipe = run("0", true);
    assert!(pipe.contains("descriptor 0 is not a UDP socket"), "{pipe}");
    assert!(pipe.ends_with("(stdin readable: true)"), "{pipe}");
    // A descriptor that is not open.
    let closed = run("987", true);
    assert!(closed.contains("descriptor 987 is not open"), "{closed}");
    // Not a list of descriptors.
    let garbage = run("3,x", true);
    assert!(garbage.contains("not a list of descriptors"), "{garbage}");
    let twice = run("0,0", true);
    assert!(twice.contains("twice"), "{twice}");
    // Nothing named: nothing to take.
    assert_eq!(run("", true), "none (stdin readable: true)");
    // A UDP socket, but not bound to a port.
    let unbound = UdpSocket::from(
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).expect("a socket"),
    );
    let stdin = Stdio::from(std::os::fd::OwnedFd::from(unbound));
    let unbound = run_with("0", true, stdin, false);
    assert!(unbound.contains("not bound to a port"), "{unbound}");
    // A datagram socket, but a Unix one.
    let (unix, _peer) = std::os::unix::net::UnixDatagram::pair().expect("a pair");
    let stdin = Stdio::from(std::os::fd::OwnedFd::from(unix));
    let unix = run_with("0", true, stdin, false);
    assert!(unix.contains("descriptor 0 is not a UDP socket"), "{unix}");
}

#[cfg(unix)]
#[test]
#[ignore = "run by from_env_refuses_what_is_not_a_handoff"]
fn from_env_child() {
    use std::io::Read;

    if std::env::var_os("UDP_GREET_TEST_FROM_ENV_CHILD").is_none() {
        return;
    }
    let result = match Handoff::from_env() {
        Ok(None) => "none".to_owned(),
        Ok(Some(handoff)) => format!("some {}", handoff.socket_count()),
        Err(err) => format!("{err:?} {err}"),
    };
    // Standard input (a pipe) is still open and readable (to its end,
    // empty).
    let mut rest = Vec::new();
    let stdin_ok = std::env::var_os("UDP_GREET_TEST_FROM_ENV_READ").is_none_or(|r| r.is_empty())
        || std::io::stdin().read_to_end(&mut rest).is_ok();
    println!("from-env: {result} (stdin readable: {stdin_ok})");
}

/// Whether the kernel runs programs of the emulated machine through an
/// emulator of its own (a `binfmt_misc` entry for qemu that is enabled).
#[cfg(unix)]
fn binfmt_runs_emulated_programs() -> bool {
    std::fs::read_dir("/proc/sys/fs/binfmt_misc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().starts_with("qemu-"))
        .any(|entry| std::fs::read_to_string(entry.path()).is_ok_and(|s| s.starts_with("enabled")))
}
