//! Latency mode (busy polling) on both sides: every promise of the server
//! and the client holds with it on, and an idle server stops polling.

mod on_time;
mod util;

use std::net::UdpSocket;
use std::time::Duration;

use udp_greet::{Error, GreetClient, GreetServer, HandlerPool, ServerBuilder, Stats};
use util::{
    HANG_GUARD, V4, assert_balanced, greet_server, raw_socket_for, wait_until, within_guard,
};

const WINDOW: Duration = Duration::from_micros(200);

util::on_both_paths!(
    a_polling_server_keeps_every_promise,
    a_polling_pool_keeps_every_promise,
    an_idle_polling_server_stops_polling,
    misses_are_published_while_the_window_is_open,
    a_pool_publishes_misses_while_the_window_is_open,
    a_window_of_one_nanosecond_polls,
);

/// The scheduler state (`R`, `S`, ...) of this process's threads named
/// `name`, from `/proc` (Linux).
fn thread_states(name: &str) -> Vec<char> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .filter_map(|task| {
            let path = task.ok()?.path();
            let comm = std::fs::read_to_string(path.join("comm")).ok()?;
            if comm.trim_end() != name {
                return None;
            }
            let stat = std::fs::read_to_string(path.join("stat")).ok()?;
            stat.rsplit(')')
                .next()?
                .split_whitespace()
                .next()?
                .chars()
                .next()
        })
        .collect()
}

/// A hundred greetings through a polling client, then a few hostile
/// datagrams; every request ends in one outcome.
fn exercise(builder: ServerBuilder) -> Stats {
    let server = greet_server(builder, V4);
    let addr = server.local_addr();
    let client = GreetClient::builder()
        .busy_poll(WINDOW)
        .reply_check(udp_greet::is_greeting)
        .connect(addr)
        .expect("connect");
    for i in 0..100 {
        let name = format!("n{i}");
        let reply = client.send_recv(name.as_bytes()).expect("reply");
        assert_eq!(reply, format!("Hello, {name}!").as_bytes());
    }
    let raw = raw_socket_for(addr);
    util::send_to(&raw, &[0u8; 0], addr).expect("send");
    util::send_to(&raw, &vec![7u8; 70_000 / 2], addr).expect("send");
    let mut buf = [0u8; 64];
    // With a handler pool the two replies may leave in either order: the
    // empty request's ("Hello, !") is one of the first two.
    let mut lens = Vec::new();
    while lens.len() < 2 && !lens.contains(&8) {
        lens.push(util::recv(&raw, &mut buf).expect("a reply"));
    }
    assert!(lens.contains(&8), "reply lengths {lens:?}");
    // At least 102: on a loaded emulator the client may have sent a
    // request again after its first wait, and that is answered too.
    wait_until("all 102 dealt with", || {
        let stats = server.stats();
        stats.received >= 102 && stats.in_flight() == 0
    });
    within_guard("shutdown while polling", move || server.shutdown()).expect("shutdown")
}

fn a_polling_server_keeps_every_promise(b: ServerBuilder) {
    let stats = exercise(b.busy_poll(WINDOW));
    assert!(stats.received >= 102, "{stats:?}");
    assert_eq!(stats.replied, stats.received, "{stats:?}");
    assert_balanced(&stats);
}

fn a_polling_pool_keeps_every_promise(b: ServerBuilder) {
    let stats = exercise(b.busy_poll(WINDOW).handler_pool(HandlerPool::threads(2)));
    assert!(stats.received >= 102, "{stats:?}");
    assert_eq!(stats.replied, stats.received, "{stats:?}");
    assert_balanced(&stats);
}

/// A window that never closes (`Duration::MAX` polls for a century): the
/// misses counted while it is open reach live snapshots, rising from one to
/// the next, not only once the window closes or the server stops.
fn assert_misses_rise_live(b: ServerBuilder) {
    let server = greet_server(b.busy_poll(Duration::MAX), V4);
    let client = GreetClient::connect(server.local_addr()).expect("connect");
    assert_eq!(client.send_recv(b"open").expect("reply"), b"Hello, open!");
    let mut seen = 0;
    wait_until("busy_poll_misses to rise in live snapshots", || {
        let misses = server.stats().busy_poll_misses;
        if seen > 0 && misses > seen {
            return true;
        }
        seen = seen.max(misses);
        false
    });
    // Still polling: work is answered as before.
    assert_eq!(client.send_recv(b"again").expect("reply"), b"Hello, again!");
    assert_balanced(&within_guard("shutdown", move || server.shutdown()).expect("shutdown"));
}

fn misses_are_published_while_the_window_is_open(b: ServerBuilder) {
    assert_misses_rise_live(b);
}

fn a_pool_publishes_misses_while_the_window_is_open(b: ServerBuilder) {
    assert_misses_rise_live(b.handler_pool(HandlerPool::threads(1)));
}

/// The shortest window there is still polls once after each piece of
/// work (it once polled nothing: the window had passed before the first
/// try), and the tries reach the counters as the window closes.
fn a_window_of_one_nanosecond_polls(b: ServerBuilder) {
    for pool in [None, Some(HandlerPool::threads(1))] {
        let server = greet_server(
            b.clone()
                .busy_poll(Duration::from_nanos(1))
                .handler_pool(pool),
            V4,
        );
        let client = GreetClient::connect(server.local_addr()).expect("connect");
        assert_eq!(client.send_recv(b"tiny").expect("reply"), b"Hello, tiny!");
        wait_until("a 1 ns window to poll", || {
            server.stats().busy_poll_misses > 0
        });
        assert_balanced(&within_guard("shutdown", move || server.shutdown()).expect("shutdown"));
    }
}

fn an_idle_polling_server_stops_polling(b: ServerBuilder) {
    if !cfg!(target_os = "linux") {
        eprintln!("note: thread states come from Linux's /proc; test skipped");
        return;
    }
    let server = greet_server(
        b.busy_poll(Duration::from_millis(1))
            .handler_pool(HandlerPool::threads(1)),
        V4,
    );
    let addr = server.local_addr();
    let client = GreetClient::connect(addr).expect("connect");
    for _ in 0..20 {
        client.send_recv(b"poll").expect("reply");
    }
    let receiver = format!("udp:{}/0", addr.port());
    let handler = format!("udp:{}/h0", addr.port());
    // Polling, a thread is running; once its window has passed it sleeps in
    // the kernel until the next datagram.
    wait_until("the server's threads to sleep", || {
        thread_states(&receiver) == ['S'] && thread_states(&handler) == ['S']
    });
    let misses = server.stats().busy_poll_misses;
    assert!(misses > 0, "the threads did poll");
    // An observation window in which nothing arrives: a socket wait that
    // nothing answers.
    let idle = UdpSocket::bind(V4).expect("bind");
    idle.set_read_timeout(Some(Duration::from_millis(20)))
        .expect("timeout");
    let mut buf = [0u8; 8];
    assert!(matches!(util::recv(&idle, &mut buf), Err(e) if util::is_timeout(&e)));
    assert_eq!(
        server.stats().busy_poll_misses,
        misses,
        "no polling while idle"
    );
    assert_eq!(thread_states(&receiver), ['S']);
    // Work wakes it again, and it answers as before.
    assert_eq!(client.send_recv(b"again").expect("reply"), b"Hello, again!");
    assert_balanced(&within_guard("shutdown", move || server.shutdown()).expect("shutdown"));
}

#[test]
fn a_polling_client_keeps_every_promise() {
    // Silence: every attempt waits its full time (polling first), and the
    // deadline still cuts the call short.
    let silent = greet_server(GreetServer::builder(), V4);
    drop(silent);
    let (silent, addr) = {
        let socket = UdpSocket::bind(V4).expect("bind");
        let addr = socket.local_addr().expect("addr");
        (socket, addr)
    };
    let client = GreetClient::builder()
        .initial_timeout(Duration::from_millis(5))
        .retries(2)
        .jitter(0.0)
        .busy_poll(Duration::from_secs(3600))
        .connect(addr)
        .expect("connect");
    let err = within_guard("a polling call to a silent port", move || {
        client.send_recv(b"anyone?").expect_err("silence")
    });
    match err {
        Error::Timeout {
            attempts, elapsed, ..
        } => {
            assert_eq!(attempts, 3);
            assert!(elapsed >= Duration::from_millis(5 + 10 + 20), "{elapsed:?}");
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    let client = GreetClient::builder()
        .initial_timeout(Duration::from_millis(50))
        .retries(20)
        .call_timeout(Duration::from_millis(120))
        .busy_poll(Duration::from_secs(3600))
        .connect(addr)
        .expect("connect");
    let err = within_guard("a polling call with a deadline", move || {
        client.send_recv(b"anyone?").expect_err("silence")
    });
    // The deadline ends the call after a few of its 21 attempts (how many
    // depends on how busy the machine is: one, on an emulator under load).
    assert!(
        matches!(
            err,
            Error::Timeout {
                attempts: 1..=3,
                ..
            }
        ),
        "{err:?}"
    );
    drop(silent);

    // A refused port: at once, or as a loss when told so.
    let closed = UdpSocket::bind(V4)
        .expect("bind")
        .local_addr()
        .expect("addr");
    if !util::emulator::WINE_ICMP_WAKES_A_WAIT.skips_part() {
        let client = GreetClient::builder()
            .initial_timeout(HANG_GUARD)
            .busy_poll(WINDOW)
            .connect(closed)
            .expect("connect");
        let err = within_guard("a polling call to a closed port", move || {
            client.send_recv(b"x").expect_err("refused")
        });
        assert!(err.is_refused(), "{err:?}");
    }
    let client = GreetClient::builder()
        .initial_timeout(Duration::from_millis(2))
        .retries(1)
        .busy_poll(WINDOW)
        .refused_as_loss(true)
        .connect(closed)
        .expect("connect");
    let err = client.send_recv(b"x").expect_err("lost");
    assert!(matches!(err, Error::Timeout { attempts: 2, .. }), "{err:?}");

    // A wrong reply first, then the right one: the check discards the
    // first while polling; a stale datagram queued before the request is
    // discarded by the check that follows the first send.
    let server = UdpSocket::bind(V4).expect("bind");
    server.set_read_timeout(Some(HANG_GUARD)).expect("timeout");
    let addr = server.local_addr().expect("addr");
    let client = GreetClient::builder()
        .initial_timeout(HANG_GUARD)
        .busy_poll(WINDOW)
        .reply_check(udp_greet::is_greeting)
        .connect(addr)
        .expect("connect");
    util::send_to(&server, b"Hello, stale!", client.local_addr()).expect("stale");
    let answer = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let (n, from) = util::recv_from(&server, &mut buf).expect("request");
        util::send_to(&server, b"Hello, somebody else!", from).expect("wrong");
        let mut greeting = Vec::new();
        udp_greet::greet_into(&buf[..n], &mut greeting);
        util::send_to(&server, &greeting, from).expect("greeting");
    });
    assert_eq!(client.send_recv(b"Sarah").expect("reply"), b"Hello, Sarah!");
    assert_eq!(client.discarded(), 2, "the stale one and the wrong one");
    answer.join().expect("answer");
}

#[test]
fn polling_settings_at_their_ends() {
    // Zero and None turn it off; Duration::MAX polls, but an answer still
    // ends each wait.
    for window in [Some(Duration::ZERO), None, Some(Duration::MAX)] {
        let server = greet_server(GreetServer::builder().busy_poll(window), V4);
        let client = GreetClient::builder()
            .busy_poll(window)
            .connect(server.local_addr())
            .expect("connect");
        assert_eq!(client.send_recv(b"edge").expect("reply"), b"Hello, edge!");
        let stats = within_guard("shutdown", move || server.shutdown()).expect("shutdown");
        if window == Some(Duration::MAX) {
            assert!(stats.busy_poll_misses > 0, "{stats:?}");
        } else {
            assert_eq!(stats.busy_poll_misses, 0, "{stats:?}");
        }
    }
    // SO_BUSY_POLL is a socket option: set here (as root, or within the
    // system's limit) or refused with the reason.
    match GreetServer::builder()
        .so_busy_poll(Duration::from_micros(50))
        .bind(V4)
    {
        Ok(server) => drop(server),
        Err(err) => assert!(err.to_string().contains("SO_BUSY_POLL"), "{err}"),
    }
}

/// A server socket on loopback that ignores the first copy of each request
/// and greets the second; `None` for a server that never answers.
fn answers_second_copy(server: UdpSocket, requests: usize) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        for _ in 0..requests {
            let Ok((_, _)) = util::recv_from(&server, &mut buf) else {
                return;
            };
            let Ok((n, from)) = util::recv_from(&server, &mut buf) else {
                return;
            };
            let mut greeting = Vec::new();
            udp_greet::greet_into(&buf[..n], &mut greeting);
            let _ = util::send_to(&server, &greeting, from);
        }
    })
}

#[test]
fn the_latency_mode_stale_check_discards_and_asks_again_at_once() {
    // In latency mode the stale check runs right after the first send. A
    // datagram found then may be the reply itself (one faster than the
    // check), so the client asks again at once: with a timeout as long as
    // the test's guard and no retries, only that second request gets this
    // call its answer.
    let server = UdpSocket::bind(V4).expect("bind");
    server.set_read_timeout(Some(HANG_GUARD)).expect("timeout");
    let addr = server.local_addr().expect("addr");
    let client = GreetClient::builder()
        .initial_timeout(HANG_GUARD * 2)
        .retries(0)
        .call_timeout(None)
        .busy_poll(WINDOW)
        .connect(addr)
        .expect("connect");
    util::send_to(&server, b"Hello, stale!", client.local_addr()).expect("stale");
    let answering = answers_second_copy(server.try_clone().expect("clone"), 1);
    let reply = within_guard("a call whose check found a stale datagram", move || {
        let reply = client.send_recv(b"Tracy");
        (reply, client.discarded())
    });
    assert_eq!(
        reply.0.expect("reply"),
        b"Hello, Tracy!",
        "not the stale one"
    );
    assert_eq!(reply.1, 1, "the stale datagram was discarded");
    answering.join().expect("server thread");

    // Nothing stale: one request per attempt, as without polling (the
    // server here answers only a second copy, so the call times out after
    // its one attempt).
    let client = GreetClient::builder()
        .initial_timeout(Duration::from_millis(5))
        .retries(0)
        .busy_poll(WINDOW)
        .connect(addr)
        .expect("connect");
    match client.send_recv(b"once") {
        Err(Error::Timeout { attempts: 1, .. }) => {}
        other => panic!("expected a timeout after 1 request, got {other:?}"),
    }
    // The extra request is counted in the timeout's attempts.
    let mut buf = [0u8; 64];
    let _ = util::recv_from(&server, &mut buf); // the `once` request, unanswered
    util::send_to(&server, b"Hello, stale!", client.local_addr()).expect("stale");
    match client.send_recv(b"twice") {
        Err(Error::Timeout { attempts: 2, .. }) => {}
        other => panic!("expected a timeout after 2 requests, got {other:?}"),
    }
}

#[test]
fn a_polling_call_ends_when_its_waits_and_deadline_say() {
    let (_silent, addr) = {
        let socket = UdpSocket::bind(V4).expect("bind");
        let addr = socket.local_addr().expect("addr");
        (socket, addr)
    };
    for (what, builder, attempts) in on_time::cases(GreetClient::builder) {
        let client = builder.connect(addr).expect("connect");
        let started = std::time::Instant::now();
        let err = within_guard("a polling call to a silent port", move || {
            client.send_recv(b"anyone?").expect_err("silence")
        });
        on_time::assert_on_time(what, err, started.elapsed(), attempts);
    }
}
