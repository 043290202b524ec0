//! GreetServer over real loopback sockets, IPv4 and IPv6.

mod util;

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;

use udp_greet::{
    Action, Error, GreetClient, GreetServer, MAX_UDP_PAYLOAD_V4, Request, ServerBuilder, Stats,
};
use util::{V4, assert_balanced, greet_server, has_ipv6, raw_socket_for, wait_until, within_guard};

/// Whether a wildcard-bound server reads each datagram's arrival address
/// (`Request::local_ip`) and replies from it: Linux's `IP_PKTINFO`;
/// elsewhere `local_ip` is `None` and the kernel picks the reply's source.
const READS_ARRIVAL: bool = cfg!(target_os = "linux");

// Each of these runs twice: on the batched path and on the portable loop.
util::on_both_paths!(
    greets_over_ipv4_and_ipv6,
    raw_peer_gets_exact_bytes_back,
    custom_handler_sees_data_and_peer,
    handler_can_choose_not_to_reply,
    zero_length_datagram_is_a_request,
    largest_datagram_round_trips,
    oversized_datagram_is_dropped_and_counted,
    panicking_handler_is_caught_and_counted,
    oversized_reply_is_a_send_error_not_fatal,
    serve_runs_on_the_calling_thread_until_shut_down,
    shutdown_frees_the_port_at_once,
    control_outlives_the_server_without_holding_the_port,
    several_clients_at_once,
    several_workers_share_the_load_and_stop_together,
    bursts_to_one_peer_get_every_reply_intact,
    a_failed_reply_does_not_lose_the_rest_of_its_batch,
    wildcard_server_replies_from_the_address_asked,
    a_dual_stack_request_is_in_one_family,
);

fn echo(request: Request<'_>, reply: &mut Vec<u8>) -> Action {
    reply.extend_from_slice(request.data());
    Action::Reply
}

/// Sends `request` from a plain std socket and returns the reply.
fn raw_exchange(socket: &UdpSocket, to: SocketAddr, request: &[u8]) -> Vec<u8> {
    util::send_to(socket, request, to).expect("send");
    let mut buf = vec![0u8; 70_000];
    let (len, from) = util::recv_from(socket, &mut buf).expect("a reply");
    assert_eq!(from, to, "the reply comes from the server's address");
    buf.truncate(len);
    buf
}

fn greets_over_ipv4_and_ipv6(b: ServerBuilder) {
    for (addr, _) in util::families() {
        let server = greet_server(b.clone(), addr);
        assert_ne!(
            server.local_addr().port(),
            0,
            "port 0 is replaced by the real port"
        );
        let client = GreetClient::connect(server.local_addr()).expect("connect");
        assert_eq!(client.peer_addr(), Some(server.local_addr()));
        for name in ["Michael", "Tracy", "Sarah"] {
            let reply = client.send_recv(name.as_bytes()).expect("reply");
            assert_eq!(reply, format!("Hello, {name}!").as_bytes());
        }
        let stats = server.shutdown().expect("shutdown");
        assert_eq!((stats.received, stats.replied), (3, 3));
        assert_balanced(&stats);
    }
}

fn raw_peer_gets_exact_bytes_back(b: ServerBuilder) {
    let server = greet_server(b.clone(), V4);
    let socket = raw_socket_for(server.local_addr());
    let request = [0u8, 255, b'\n', 0x80, b'x'];
    let reply = raw_exchange(&socket, server.local_addr(), &request);
    assert_eq!(reply, b"Hello, \0\xff\n\x80x!");
}

fn custom_handler_sees_data_and_peer(b: ServerBuilder) {
    let server = b
        .clone()
        .bind(V4)
        .expect("bind")
        .spawn(|request: Request<'_>, reply: &mut Vec<u8>| {
            reply.extend_from_slice(request.peer().to_string().as_bytes());
            reply.push(b' ');
            reply.extend(request.data().iter().rev());
            Action::Reply
        })
        .expect("spawn");
    let client = GreetClient::connect(server.local_addr()).expect("connect");
    let reply = client.send_recv(b"abc").expect("reply");
    assert_eq!(reply, format!("{} cba", client.local_addr()).as_bytes());
}

fn handler_can_choose_not_to_reply(b: ServerBuilder) {
    let server = b
        .clone()
        .bind(V4)
        .expect("bind")
        .spawn(|request: Request<'_>, reply: &mut Vec<u8>| {
            if request.data() == b"quiet" {
                return Action::Ignore;
            }
            udp_greet::greet(request, reply)
        })
        .expect("spawn");
    let socket = raw_socket_for(server.local_addr());
    util::send_to(&socket, b"quiet", server.local_addr()).expect("send");
    // The server handles datagrams in order: the reply to the second request
    // arriving first proves the first was handled and not answered.
    assert_eq!(
        raw_exchange(&socket, server.local_addr(), b"loud"),
        b"Hello, loud!"
    );
    let stats = server.shutdown().expect("shutdown");
    assert_eq!((stats.received, stats.replied, stats.no_reply), (2, 1, 1));
    assert_balanced(&stats);
}

fn zero_length_datagram_is_a_request(b: ServerBuilder) {
    let server = greet_server(b.clone(), V4);
    let socket = raw_socket_for(server.local_addr());
    assert_eq!(raw_exchange(&socket, server.local_addr(), b""), b"Hello, !");
    let empty_echo = b
        .clone()
        .bind(V4)
        .expect("bind")
        .spawn(echo)
        .expect("spawn");
    let client = GreetClient::connect(empty_echo.local_addr()).expect("connect");
    assert_eq!(client.send_recv(b"").expect("empty reply"), b"");
    assert_eq!(empty_echo.shutdown().expect("shutdown").replied, 1);
}

fn largest_datagram_round_trips(b: ServerBuilder) {
    for (addr, max) in util::families() {
        let server = b
            .clone()
            .recv_buffer_size(1 << 20)
            .bind(addr)
            .expect("bind")
            .spawn(echo)
            .expect("spawn");
        let client = GreetClient::builder()
            .recv_buffer_size(1 << 20)
            .connect(server.local_addr())
            .expect("connect");
        let request: Vec<u8> = (0..max).map(|i| (i % 251) as u8).collect();
        assert_eq!(client.send_recv(&request).expect("reply"), request);
        let stats = server.shutdown().expect("shutdown");
        assert_eq!((stats.replied, stats.truncated), (1, 0));
    }
}

fn oversized_datagram_is_dropped_and_counted(b: ServerBuilder) {
    let server = b.clone().max_datagram_size(100).bind(V4).expect("bind");
    assert_eq!(server.max_datagram_size(), 100);
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let server = server
        .spawn(move |request: Request<'_>, reply: &mut Vec<u8>| {
            seen.fetch_add(1, Ordering::Relaxed);
            echo(request, reply)
        })
        .expect("spawn");
    let socket = raw_socket_for(server.local_addr());
    util::send_to(&socket, &[7u8; 101], server.local_addr()).expect("send");
    util::send_to(&socket, &[7u8; 5000], server.local_addr()).expect("send");
    let exact = [9u8; 100];
    assert_eq!(raw_exchange(&socket, server.local_addr(), &exact), exact);
    let stats = server.shutdown().expect("shutdown");
    assert_eq!((stats.received, stats.truncated, stats.replied), (3, 2, 1));
    assert_eq!(
        calls.load(Ordering::Relaxed),
        1,
        "truncated data never reaches the handler"
    );
    assert_balanced(&stats);
}

fn panicking_handler_is_caught_and_counted(b: ServerBuilder) {
    let server = b
        .clone()
        .bind(V4)
        .expect("bind")
        .spawn(|request: Request<'_>, reply: &mut Vec<u8>| {
            reply.extend_from_slice(b"partial");
            assert_ne!(request.data(), b"boom", "test handler panics on purpose");
            udp_greet::greet(request, reply)
        })
        .expect("spawn");
    let socket = raw_socket_for(server.local_addr());
    for _ in 0..3 {
        util::send_to(&socket, b"boom", server.local_addr()).expect("send");
    }
    let reply = raw_exchange(&socket, server.local_addr(), b"fine");
    assert_eq!(
        reply, b"partialHello, fine!",
        "nothing is left over from the panicked calls"
    );
    let stats = server.shutdown().expect("shutdown");
    assert_eq!((stats.handler_panics, stats.replied), (3, 1));
    assert_balanced(&stats);
}

fn oversized_reply_is_a_send_error_not_fatal(b: ServerBuilder) {
    let server = b
        .clone()
        .bind(V4)
        .expect("bind")
        .spawn(|request: Request<'_>, reply: &mut Vec<u8>| {
            if request.data() == b"big" {
                reply.resize(70_000, 0); // larger than any UDP datagram
                return Action::Reply;
            }
            udp_greet::greet(request, reply)
        })
        .expect("spawn");
    let socket = raw_socket_for(server.local_addr());
    util::send_to(&socket, b"big", server.local_addr()).expect("send");
    assert_eq!(
        raw_exchange(&socket, server.local_addr(), b"ok"),
        b"Hello, ok!"
    );
    let stats = server.shutdown().expect("shutdown");
    assert_eq!((stats.send_errors, stats.replied), (1, 1));
    assert_balanced(&stats);
}

fn serve_runs_on_the_calling_thread_until_shut_down(b: ServerBuilder) {
    let server = b.clone().bind(V4).expect("bind");
    let addr = server.local_addr();
    let stop = server.control();
    assert!(!stop.is_shutdown());
    let client = thread::spawn(move || {
        let reply = GreetClient::connect(addr).and_then(|c| c.send_recv(b"Sarah"));
        // Counters are published right after the reply is sent.
        wait_until("the reply to be counted", || stop.stats().replied == 1);
        stop.shutdown();
        reply
    });
    let stats = within_guard("serve", move || server.serve(udp_greet::greet)).expect("serve");
    assert_eq!(
        client.join().expect("client thread").expect("reply"),
        b"Hello, Sarah!"
    );
    assert_eq!(stats.replied, 1);
}

fn shutdown_frees_the_port_at_once(b: ServerBuilder) {
    let server = greet_server(b.clone(), V4);
    let addr = server.local_addr();
    assert!(matches!(
        b.clone().bind(addr),
        Err(Error::AddrInUse { addr: a, .. }) if a == addr
    ));
    let stats = within_guard("shutdown", move || server.shutdown()).expect("shutdown");
    assert_eq!(stats, Stats::default());
    // Bound again straight away, and working.
    let again = greet_server(b.clone(), &addr.to_string());
    let client = GreetClient::connect(addr).expect("connect");
    assert_eq!(client.send_recv(b"again").expect("reply"), b"Hello, again!");
    drop(again);
    // Dropping the handle also stops the server, without waiting for it:
    // the port is free as soon as its threads have ended.
    wait_until("the port to be free after a drop", || {
        b.clone().bind(addr).is_ok()
    });
}

fn control_outlives_the_server_without_holding_the_port(b: ServerBuilder) {
    let server = greet_server(b.clone(), V4);
    let addr = server.local_addr();
    let stop = server.control();
    server.shutdown().expect("shutdown");
    stop.shutdown(); // harmless after the fact
    assert!(stop.is_shutdown());
    b.clone()
        .bind(addr)
        .expect("the handle does not keep the socket open");
}

#[test]
fn addr_in_use_error_names_the_address() {
    let holder = UdpSocket::bind(V4).expect("bind");
    let addr = holder.local_addr().expect("addr");
    let err = GreetServer::bind(addr).expect_err("in use");
    assert!(
        err.to_string()
            .starts_with(&format!("address {addr} is already in use")),
        "{err}"
    );
}

#[test]
fn unresolvable_address_names_the_input() {
    let err = GreetServer::bind("definitely not an address").expect_err("bad address");
    assert!(matches!(err, Error::Resolve { .. }));
    assert!(
        err.to_string().contains("definitely not an address"),
        "{err}"
    );
}

#[test]
fn invalid_settings_are_rejected_at_bind() {
    for size in [0, 65_536] {
        let err = GreetServer::builder()
            .max_datagram_size(size)
            .bind(V4)
            .expect_err("out of range");
        assert!(matches!(
            err,
            Error::InvalidConfig {
                setting: "ServerBuilder::max_datagram_size",
                ..
            }
        ));
    }
}

#[test]
fn buffer_sizes_report_request_and_grant() {
    let server = GreetServer::builder()
        .recv_buffer_size(256 * 1024)
        .send_buffer_size(128 * 1024)
        .bind(V4)
        .expect("bind");
    let recv = server.recv_buffer_size();
    assert_eq!(recv.requested, Some(256 * 1024));
    assert!(recv.granted > 0);
    assert_eq!(server.send_buffer_size().requested, Some(128 * 1024));
    if cfg!(target_os = "linux") {
        // Linux doubles the request, capped by net.core.rmem_max.
        let cap = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .unwrap_or(usize::MAX);
        assert_eq!(recv.granted, 2 * (256 * 1024).min(cap));
        assert_eq!(recv.is_clamped(), cap < 256 * 1024 / 2);
        // A request far over any cap is granted less, and says so.
        let huge = GreetServer::builder()
            .recv_buffer_size(1 << 40)
            .bind(V4)
            .expect("bind");
        assert!(huge.recv_buffer_size().is_clamped());
    }
    let default = GreetServer::bind(V4).expect("bind");
    assert_eq!(
        default.recv_buffer_size().requested,
        Some(1 << 20), // 1 MiB, the documented default
    );
    assert!(default.recv_buffer_size().granted > 0);
    // Clients keep the system default.
    let client = GreetClient::connect(default.local_addr()).expect("connect");
    assert_eq!(client.recv_buffer_size().requested, None);
    assert!(!client.recv_buffer_size().is_clamped());
}

#[test]
fn reuse_port_lets_two_servers_share_an_address() {
    if !cfg!(unix) {
        eprintln!("note: SO_REUSEPORT does not exist on this platform; test skipped");
        return;
    }
    let first = GreetServer::builder()
        .reuse_port(true)
        .bind(V4)
        .expect("bind");
    let second = GreetServer::builder()
        .reuse_port(true)
        .bind(first.local_addr())
        .expect("second bind on the same address");
    assert_eq!(first.local_addr(), second.local_addr());
    let without = GreetServer::bind(first.local_addr()).expect_err("no reuse");
    assert!(matches!(without, Error::AddrInUse { .. }));
}

#[test]
fn ipv6_only_is_explicit() {
    if !has_ipv6() {
        return;
    }
    // With IPV6_V6ONLY (the default) a v6 wildcard leaves the v4 port free.
    let v6 = GreetServer::bind("[::]:0").expect("bind [::]");
    let port = v6.local_addr().port();
    GreetServer::bind(("0.0.0.0", port)).expect("the IPv4 port is separate");
    // Without it the v6 socket takes the v4 port as well.
    let dual = GreetServer::builder()
        .only_v6(false)
        .bind("[::]:0")
        .expect("bind");
    let err = GreetServer::bind(("0.0.0.0", dual.local_addr().port())).expect_err("taken");
    assert!(matches!(err, Error::AddrInUse { .. }));
}

#[test]
fn tcp_listener_on_the_same_port_does_not_interfere() {
    let server = greet_server(GreetServer::builder(), V4);
    let port = server.local_addr().port();
    // The same number as a TCP port is a different port.
    let tcp = TcpListener::bind(("127.0.0.1", port)).expect("TCP bind on the same number");
    let client = GreetClient::connect(server.local_addr()).expect("connect");
    assert_eq!(client.send_recv(b"udp").expect("reply"), b"Hello, udp!");
    drop(tcp);
}

fn several_clients_at_once(b: ServerBuilder) {
    let server = greet_server(b.clone(), V4);
    let addr = server.local_addr();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            thread::spawn(move || {
                let client = GreetClient::connect(addr)?;
                for i in 0..200 {
                    let name = format!("client-{t}-{i}");
                    let reply = client.send_recv(name.as_bytes())?;
                    assert_eq!(reply, format!("Hello, {name}!").as_bytes());
                }
                Ok::<_, Error>(())
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("client thread").expect("all replies");
    }
    let stats = server.shutdown().expect("shutdown");
    assert!(stats.replied >= 1600, "{stats:?}");
    assert_balanced(&stats);
}

#[test]
fn from_std_serves_an_existing_socket() {
    let socket = UdpSocket::bind(V4).expect("bind");
    let addr = socket.local_addr().expect("addr");
    let server = GreetServer::from_std(socket).expect("adopt");
    assert_eq!(server.local_addr(), addr);
    assert_eq!(server.max_datagram_size(), MAX_UDP_PAYLOAD_V4);
    let server = server.spawn(udp_greet::greet).expect("spawn");
    let client = GreetClient::connect(addr).expect("connect");
    assert_eq!(client.send_recv(b"std").expect("reply"), b"Hello, std!");
    drop(server);
}

fn several_workers_share_the_load_and_stop_together(b: ServerBuilder) {
    let server = b
        .workers(3)
        .bind(V4)
        .expect("bind")
        .spawn(udp_greet::greet)
        .expect("spawn");
    let addr = server.local_addr();
    if cfg!(target_os = "linux") {
        // A new thread names itself once it runs, a moment after spawn.
        wait_until("three named worker threads", || {
            util::workers_of(addr.port()) == 3
        });
    }
    let clients: Vec<_> = (0..12)
        .map(|t| {
            thread::spawn(move || {
                let client = GreetClient::connect(addr)?;
                for i in 0..100 {
                    let name = format!("{t}-{i}");
                    let reply = client.send_recv(name.as_bytes())?;
                    assert_eq!(reply, format!("Hello, {name}!").as_bytes());
                }
                Ok::<_, Error>(())
            })
        })
        .collect();
    for client in clients {
        client.join().expect("client thread").expect("all replies");
    }
    let stats =
        within_guard("shutdown of three workers", move || server.shutdown()).expect("shutdown");
    assert!(
        stats.replied >= 1200,
        "stats are summed over workers: {stats:?}"
    );
    assert_balanced(&stats);
    if cfg!(target_os = "linux") {
        // Joined, each thread is gone from /proc a moment later: the kernel
        // wakes the joiner before it reaps the thread (a wider moment under
        // qemu-user).
        wait_until("every joined worker thread to be reaped", || {
            util::workers_of(addr.port()) == 0
        });
    }
    GreetServer::bind(addr).expect("every worker socket is closed");
}

#[test]
fn batching_settings_are_checked() {
    for (setting, builder) in [
        ("ServerBuilder::workers", GreetServer::builder().workers(0)),
        (
            "ServerBuilder::workers",
            GreetServer::builder().workers(1025),
        ),
        (
            "ServerBuilder::batch_size",
            GreetServer::builder().batch_size(0),
        ),
        (
            "ServerBuilder::batch_size",
            GreetServer::builder().batch_size(1025),
        ),
    ] {
        let err = builder.bind(V4).expect_err("out of range");
        assert!(
            matches!(err, Error::InvalidConfig { setting: s, .. } if s == setting),
            "{err:?}"
        );
    }
    // A batch of one still serves (batches are Linux's: the setting is
    // refused elsewhere).
    let batch_of_one = GreetServer::builder().batch_size(1).bind(V4);
    if !cfg!(target_os = "linux") {
        assert!(
            matches!(
                batch_of_one,
                Err(Error::InvalidConfig {
                    setting: "ServerBuilder::batch_size",
                    ..
                })
            ),
            "{batch_of_one:?}"
        );
        return;
    }
    let server = batch_of_one
        .expect("bind")
        .spawn(udp_greet::greet)
        .expect("spawn");
    let client = GreetClient::connect(server.local_addr()).expect("connect");
    assert_eq!(client.send_recv(b"one").expect("reply"), b"Hello, one!");
}

/// Many requests in flight from one peer, of mixed sizes: on the batched
/// path the replies go out coalesced (segmentation offload) where they can,
/// and every one must still arrive whole and separate.
fn bursts_to_one_peer_get_every_reply_intact(b: ServerBuilder) {
    for gso in [true, false] {
        let server = match b.clone().gso(gso).bind(V4) {
            // The portable path has no segmentation to turn on.
            Err(Error::InvalidConfig {
                setting: "ServerBuilder::gso",
                ..
            }) if gso => continue,
            bound => bound.expect("bind"),
        }
        .spawn(udp_greet::greet)
        .expect("spawn");
        let addr = server.local_addr();
        let socket = raw_socket_for(addr);
        // Sizes around the largest coalesced segment (1 452-byte replies),
        // runs of equal sizes, shrinking sizes, and empty requests.
        let mut sizes: Vec<usize> = vec![16; 20];
        sizes.extend([
            1444, 1444, 1444, 1445, 1445, 0, 0, 3, 2, 1, 900, 900, 10, 5000,
        ]);
        sizes.extend((0..30).map(|i| 100 - i));
        let requests: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| (0..n).map(|j| (i * 7 + j) as u8).collect())
            .collect();
        for request in &requests {
            util::send_to(&socket, request, addr).expect("send");
        }
        let mut expected: Vec<Vec<u8>> = requests
            .iter()
            .map(|r| {
                let mut out = Vec::new();
                udp_greet::greet_into(r, &mut out);
                out
            })
            .collect();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 70_000];
        for _ in 0..requests.len() {
            let (n, from) = util::recv_from(&socket, &mut buf).expect("every reply");
            assert_eq!(from, addr);
            got.push(buf[..n].to_vec());
        }
        expected.sort();
        got.sort();
        assert!(
            got == expected,
            "gso({gso}): replies differ from the greetings"
        );
        let stats = server.shutdown().expect("shutdown");
        assert_eq!(
            stats.replied,
            requests.len() as u64,
            "gso({gso}): {stats:?}"
        );
        assert_balanced(&stats);
    }
}

/// A reply the kernel refuses, among others handled in the same batch: it is
/// counted, and every other reply still goes out.
fn a_failed_reply_does_not_lose_the_rest_of_its_batch(b: ServerBuilder) {
    let (release, gate) = std::sync::mpsc::channel::<()>();
    let gate = std::sync::Mutex::new(gate);
    let server = b
        .bind(V4)
        .expect("bind")
        .spawn(move |request: Request<'_>, reply: &mut Vec<u8>| {
            match request.data() {
                // Holds the worker until the rest are queued behind it, so
                // they are taken together.
                b"gate" => {
                    let _ = gate.lock().map(|g| g.recv_timeout(util::HANG_GUARD));
                }
                b"big" => {
                    reply.resize(70_000, 0); // larger than any datagram
                    return Action::Reply;
                }
                _ => {}
            }
            udp_greet::greet(request, reply)
        })
        .expect("spawn");
    let addr = server.local_addr();
    let socket = raw_socket_for(addr);
    util::send_to(&socket, b"gate", addr).expect("send");
    let rest: [&[u8]; 5] = [b"a", b"big", b"b", b"big", b"c"];
    for request in rest {
        util::send_to(&socket, request, addr).expect("send");
    }
    release.send(()).expect("release the gate");
    let mut buf = [0u8; 64];
    let mut got = Vec::new();
    for _ in 0..4 {
        let n = util::recv(&socket, &mut buf).expect("a reply");
        got.push(buf[..n].to_vec());
    }
    got.sort();
    let want: [&[u8]; 4] = [b"Hello, a!", b"Hello, b!", b"Hello, c!", b"Hello, gate!"];
    assert_eq!(got, want.map(<[u8]>::to_vec));
    let stats = server.shutdown().expect("shutdown");
    assert_eq!((stats.replied, stats.send_errors), (4, 2), "{stats:?}");
    assert_balanced(&stats);
}

/// A server bound to 0.0.0.0 must answer from the address each request was
/// sent to: 127.0.0.2 is also this host's (all of 127.0.0.0/8 is), and a
/// client connected to it drops a reply that comes from 127.0.0.1.
fn wildcard_server_replies_from_the_address_asked(b: ServerBuilder) {
    let server = b
        .bind("0.0.0.0:0")
        .expect("bind the IPv4 wildcard")
        .spawn(util::tell_local)
        .expect("spawn");
    let port = server.local_addr().port();
    let asked: &[&str] = if READS_ARRIVAL && util::has_loopback_range() {
        &["127.0.0.1", "127.0.0.2", "127.1.2.3"]
    } else {
        &["127.0.0.1"]
    };
    for &ip in asked {
        let client = GreetClient::builder()
            .initial_timeout(util::HANG_GUARD)
            .retries(0)
            .connect((ip, port))
            .expect("connect");
        let reply = client
            .send_recv(b"who are you?")
            .expect("a reply from the address asked");
        let seen = if READS_ARRIVAL { ip } else { "" };
        assert_eq!(reply, seen.as_bytes(), "the handler sees the address asked");
    }
    // A server bound to one address reports that address.
    let server = GreetServer::builder()
        .bind("127.0.0.1:0")
        .expect("bind")
        .spawn(util::tell_local)
        .expect("spawn");
    let client = GreetClient::connect(server.local_addr()).expect("connect");
    assert_eq!(client.send_recv(b"?").expect("reply"), b"127.0.0.1");
}

#[test]
fn several_workers_do_not_join_an_address_already_held() {
    let held = |err: Error, addr: SocketAddr| {
        assert!(
            matches!(err, Error::AddrInUse { addr: a, .. } if a == addr),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .contains(&format!("address {addr} is already in use")),
            "{err}"
        );
    };
    // Another multi-worker server.
    let first = GreetServer::builder().workers(2).bind(V4).expect("bind");
    let addr = first.local_addr();
    let err = GreetServer::builder()
        .workers(2)
        .bind(addr)
        .expect_err("the address is held");
    held(err, addr);
    // One worker is refused the same way.
    held(GreetServer::bind(addr).expect_err("held"), addr);
    drop(first);

    // A plain socket, and a server that allows sharing.
    let plain = UdpSocket::bind(V4).expect("bind");
    let addr = plain.local_addr().expect("addr");
    held(
        GreetServer::builder()
            .workers(3)
            .bind(addr)
            .expect_err("held"),
        addr,
    );
    let sharing = GreetServer::builder().reuse_port(true).bind(V4);
    if cfg!(windows) {
        // No SO_REUSEPORT there: refused, naming it.
        assert!(
            matches!(
                sharing,
                Err(Error::Socket {
                    action: "set SO_REUSEPORT",
                    ..
                })
            ),
            "{sharing:?}"
        );
        return;
    }
    let sharing = sharing.expect("bind");
    let addr = sharing.local_addr();
    held(
        GreetServer::builder()
            .workers(2)
            .bind(addr)
            .expect_err("held"),
        addr,
    );
    // Sharing on purpose: both ask for it.
    if cfg!(unix) {
        let joined = GreetServer::builder()
            .reuse_port(true)
            .workers(2)
            .bind(addr)
            .expect("reuse_port(true) on both sides shares the address");
        assert_eq!(joined.local_addr(), addr);
    }
}

#[test]
fn server_buffer_sizes_beyond_an_int_are_clamped_not_wrapped() {
    let granted = |bytes: usize| {
        let server = GreetServer::builder()
            .recv_buffer_size(bytes)
            .send_buffer_size(bytes)
            .bind(V4)
            .expect("bind");
        (server.recv_buffer_size(), server.send_buffer_size())
    };
    let (largest_recv, largest_send) = granted(i32::MAX as usize);
    for bytes in [1usize << 32, usize::MAX] {
        let (recv, send) = granted(bytes);
        assert_eq!(recv.requested, Some(bytes));
        assert_eq!(recv.granted, largest_recv.granted, "SO_RCVBUF for {bytes}");
        assert_eq!(send.granted, largest_send.granted, "SO_SNDBUF for {bytes}");
    }
}

/// On a dual-stack socket an IPv4 client is an IPv4-mapped IPv6 peer, and
/// the address it sent to is given in the same family.
fn a_dual_stack_request_is_in_one_family(b: ServerBuilder) {
    if !has_ipv6() {
        return;
    }
    let server = b
        .only_v6(false)
        .bind("[::]:0")
        .expect("bind")
        .spawn(|request: Request<'_>, reply: &mut Vec<u8>| {
            let local = request
                .local_ip()
                .map(|ip| ip.to_string())
                .unwrap_or_default();
            reply.extend_from_slice(format!("{} {local}", request.peer().ip()).as_bytes());
            Action::Reply
        })
        .expect("spawn");
    let client = GreetClient::connect(("127.0.0.1", server.local_addr().port())).expect("connect");
    let expected = |peer: &str| {
        let local = if READS_ARRIVAL { peer } else { "" };
        format!("{peer} {local}").into_bytes()
    };
    assert_eq!(
        client.send_recv(b"who?").expect("reply"),
        expected("::ffff:127.0.0.1")
    );
    let v6 = GreetClient::connect(("::1", server.local_addr().port())).expect("connect");
    assert_eq!(v6.send_recv(b"who?").expect("reply"), expected("::1"));
    assert_balanced(&server.shutdown().expect("shutdown"));
}
