//! One server on several addresses (`bind_all`): every listener answers,
//! counters per listener and in total, one rate limiter for all, and a
//! bind that fails as a whole.

mod util;

use std::net::{SocketAddr, UdpSocket};
use std::time::Instant;

use udp_greet::{
    Action, Error, GreetServer, HandlerPool, RateLimit, Request, ServerBuilder, Stats,
};
use util::{V4, V6, assert_balanced, has_ipv6, raw_socket_for, recv, send_to};

/// Replies with the listener the request came in on and the full local
/// address it was sent to.
fn tell_listener(request: Request<'_>, reply: &mut Vec<u8>) -> Action {
    let local = request.local_addr().map(|a| a.to_string());
    reply.extend_from_slice(format!("{} {local:?}", request.listener()).as_bytes());
    Action::Reply
}

/// IPv4, and IPv6 where the machine has it.
fn addresses() -> Vec<&'static str> {
    let mut addrs = vec![V4];
    if has_ipv6() {
        addrs.push(V6);
    }
    addrs.push(V4);
    addrs
}

/// Sends `count` requests to `to` from one socket and checks each reply
/// names `to` as its listener and local address.
fn ask(to: SocketAddr, count: usize) {
    let socket = raw_socket_for(to);
    let mut buf = [0u8; 128];
    for _ in 0..count {
        send_to(&socket, b"?", to).expect("send");
        let n = recv(&socket, &mut buf).expect("a reply");
        assert_eq!(
            String::from_utf8_lossy(&buf[..n]),
            format!("{to} Some({:?})", to.to_string()),
        );
    }
}

/// A server on every address of `addresses()` answers on each, counts
/// each listener's requests apart, and sums them in the total.
fn answers_on_each_listener_with_its_own_counters(builder: ServerBuilder) {
    let addrs = addresses();
    let server = builder
        .bind_all(&addrs)
        .expect("bind_all")
        .spawn(tell_listener)
        .expect("spawn");
    let bound = server.local_addrs();
    assert_eq!(bound.len(), addrs.len());
    assert_eq!(server.local_addr(), bound[0]);
    assert_eq!(server.control().local_addrs(), bound);
    for (i, &addr) in bound.iter().enumerate() {
        assert_ne!(addr.port(), 0);
        assert_eq!(addr.is_ipv6(), addrs[i] == V6, "{addr}");
        ask(addr, i + 1);
    }
    // Read once the server has stopped: a reply can reach its client
    // before its worker has published the count.
    let control = server.control();
    let stats = server.shutdown().expect("shutdown");
    let per_listener = control.listener_stats();
    assert_balanced(&stats);
    let mut sum = Stats::default();
    for (i, (addr, listener)) in per_listener.iter().enumerate() {
        assert_eq!(*addr, bound[i]);
        assert_eq!(
            (listener.received, listener.replied),
            ((i + 1) as u64, (i + 1) as u64)
        );
        assert_eq!(
            listener.received,
            listener.accounted(),
            "{addr}: {listener:?}"
        );
        sum.received += listener.received;
        sum.replied += listener.replied;
    }
    assert_eq!((stats.received, stats.replied), (sum.received, sum.replied));
}

#[test]
fn answers_on_each_listener_batched() {
    answers_on_each_listener_with_its_own_counters(GreetServer::builder());
}

#[test]
fn answers_on_each_listener_portable_with_workers() {
    answers_on_each_listener_with_its_own_counters(
        GreetServer::builder().portable_io(true).workers(2),
    );
}

#[test]
fn answers_on_each_listener_through_the_pool() {
    answers_on_each_listener_with_its_own_counters(
        GreetServer::builder()
            .workers(2)
            .handler_pool(HandlerPool::threads(3)),
    );
}

#[test]
fn one_rate_limiter_for_every_listener() {
    // A burst of 4 and one a second for 127.0.0.1's prefix, over three
    // listeners: a source is limited across all of them.
    let server = GreetServer::builder()
        .rate_limit(RateLimit::new(1, 4))
        .bind_all([V4, V4, V4])
        .expect("bind_all")
        .spawn(udp_greet::greet)
        .expect("spawn");
    let started = Instant::now();
    let client = UdpSocket::bind(V4).expect("bind");
    for addr in server.local_addrs() {
        for _ in 0..10 {
            send_to(&client, b"Tracy", addr).expect("send");
        }
    }
    util::wait_until("every request dealt with", || {
        server.stats().accounted() == 30
    });
    let elapsed = started.elapsed().as_secs() + 1;
    let control = server.control();
    let stats = server.shutdown().expect("shutdown");
    let per_listener = control.listener_stats();
    assert_balanced(&stats);
    assert!(
        (4..=4 + elapsed).contains(&stats.replied),
        "{} answered in {elapsed} s: {stats:?}",
        stats.replied
    );
    assert_eq!(stats.rate_limited, 30 - stats.replied);
    assert_eq!(
        per_listener
            .iter()
            .map(|(_, s)| s.rate_limited)
            .sum::<u64>(),
        stats.rate_limited
    );
    assert_eq!(
        per_listener.iter().map(|(_, s)| s.replied).sum::<u64>(),
        stats.replied
    );
}

#[test]
fn one_address_failing_fails_the_whole_and_leaves_nothing_open() {
    // A port that is free now, and one that another socket holds.
    let free = UdpSocket::bind(V4)
        .and_then(|s| s.local_addr())
        .expect("a free port");
    let holder = UdpSocket::bind(V4).expect("bind");
    let held = holder.local_addr().expect("address");
    for workers in [1, 3] {
        for order in [[free, held], [held, free]] {
            let err = GreetServer::builder()
                .workers(workers)
                .bind_all(order)
                .map(|_| ())
                .expect_err("the held address fails the bind");
            assert!(
                matches!(&err, Error::AddrInUse { addr, .. } if *addr == held),
                "{err:?}"
            );
            assert!(err.to_string().contains(&held.to_string()), "{err}");
            // The free address's sockets were closed: it binds again,
            // without sharing.
            let again = UdpSocket::bind(free).expect("the free address is free again");
            drop(again);
        }
    }
    // An address twice, shared on purpose: refused, naming it, and
    // nothing kept.
    let mut sharing = vec![GreetServer::builder().reuse_address(true)];
    // Windows has no SO_REUSEPORT (the setting fails the bind there).
    if !cfg!(windows) {
        sharing.push(GreetServer::builder().reuse_port(true));
    }
    for builder in sharing {
        let err = builder
            .bind_all([free, free])
            .map(|_| ())
            .expect_err("the same address twice");
        assert!(
            matches!(&err, Error::InvalidConfig { setting, addr: Some(addr), .. }
                if *setting == "ServerBuilder::bind_all" && *addr == free),
            "{err:?}"
        );
        assert!(err.to_string().contains(&free.to_string()), "{err}");
        drop(UdpSocket::bind(free).expect("nothing kept"));
    }
    // Past 1024 addresses, refused before any is bound.
    let err = GreetServer::builder()
        .bind_all(std::iter::repeat_n(V4, 1025))
        .map(|_| ())
        .expect_err("too many");
    assert!(
        matches!(&err, Error::InvalidConfig { setting, .. } if *setting == "ServerBuilder::bind_all"),
        "{err:?}"
    );
    let err = GreetServer::builder()
        .bind_all(Vec::<SocketAddr>::new())
        .map(|_| ())
        .expect_err("no address");
    assert!(
        matches!(&err, Error::InvalidConfig { setting, .. } if *setting == "ServerBuilder::bind_all"),
        "{err:?}"
    );
}

#[test]
fn sockets_made_elsewhere_are_served_one_listener_each() {
    let sockets: Vec<UdpSocket> = addresses()
        .into_iter()
        .map(|addr| UdpSocket::bind(addr).expect("bind"))
        .collect();
    let addrs: Vec<SocketAddr> = sockets
        .iter()
        .map(|s| s.local_addr().expect("address"))
        .collect();
    let server = GreetServer::builder()
        .from_std_all(sockets)
        .expect("from_std_all")
        .spawn(tell_listener)
        .expect("spawn");
    assert_eq!(server.local_addrs(), addrs);
    for (i, addr) in addrs.iter().enumerate() {
        ask(*addr, i + 1);
    }
    let control = server.control();
    server.shutdown().expect("shutdown");
    for (i, (addr, stats)) in control.listener_stats().iter().enumerate() {
        assert_eq!((*addr, stats.replied), (addrs[i], (i + 1) as u64));
    }
    // One socket that cannot be served on (not bound) fails the whole,
    // and none is kept: the good one's address binds again at once.
    let good = UdpSocket::bind(V4).expect("bind");
    let good_addr = good.local_addr().expect("address");
    let unbound =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).expect("socket");
    let err = GreetServer::builder()
        .from_std_all([good, UdpSocket::from(unbound)])
        .map(|_| ())
        .expect_err("an unbound socket");
    assert!(matches!(err, Error::UnsuitableSocket { .. }), "{err:?}");
    drop(UdpSocket::bind(good_addr).expect("the good socket was closed"));
    let err = GreetServer::builder()
        .from_std_all(Vec::new())
        .map(|_| ())
        .expect_err("no socket");
    assert!(
        matches!(&err, Error::InvalidConfig { setting, .. } if *setting == "ServerBuilder::from_std_all"),
        "{err:?}"
    );
}

#[test]
fn a_socket_made_elsewhere_outlives_its_server_unharmed() {
    // Its maker keeps a copy (as a service manager does) and hands it to
    // the next server, which serves it: the first server never shut it
    // down, nor left it non-blocking.
    let kept = UdpSocket::bind(V4).expect("bind");
    let addr = kept.local_addr().expect("address");
    for generation in 0..2 {
        let server = GreetServer::builder()
            .from_std_all([kept.try_clone().expect("clone")])
            .expect("from_std_all")
            .spawn(udp_greet::greet)
            .expect("spawn");
        ask_greeting(addr);
        let stats = server.shutdown().expect("shutdown");
        assert_eq!(stats.replied, 1, "generation {generation}");
    }
    #[cfg(unix)]
    assert_eq!(
        socket2::SockRef::from(&kept).nonblocking().ok(),
        Some(false)
    );
    kept.set_read_timeout(Some(std::time::Duration::from_millis(1)))
        .expect("timeout");
    let mut buf = [0u8; 8];
    // A socket shut down for reading would return 0 bytes at once.
    let err = recv(&kept, &mut buf).expect_err("nothing to receive, and not shut down");
    assert!(util::is_timeout(&err), "{err:?}");
}

#[cfg(feature = "tokio")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_made_elsewhere_outlives_its_async_server_unharmed() {
    let kept = UdpSocket::bind(V4).expect("bind");
    let addr = kept.local_addr().expect("address");
    for _ in 0..2 {
        let server = udp_greet::tokio::GreetServer::builder()
            .from_std_all([kept.try_clone().expect("clone")])
            .expect("from_std_all")
            .spawn(udp_greet::tokio::greet)
            .expect("spawn");
        tokio::task::spawn_blocking(move || ask_greeting(addr))
            .await
            .expect("client");
        let stats = server.shutdown().await.expect("shutdown");
        assert_eq!(stats.replied, 1);
    }
    // Back in blocking mode, and not shut down.
    #[cfg(unix)]
    assert_eq!(
        socket2::SockRef::from(&kept).nonblocking().ok(),
        Some(false)
    );
    kept.set_read_timeout(Some(std::time::Duration::from_millis(1)))
        .expect("timeout");
    let mut buf = [0u8; 8];
    let err = recv(&kept, &mut buf).expect_err("nothing to receive");
    assert!(util::is_timeout(&err), "{err:?}");
}

#[test]
fn serve_runs_every_listener() {
    let server = GreetServer::builder().bind_all([V4, V4]).expect("bind_all");
    let addrs = server.local_addrs();
    let control = server.control();
    let client = std::thread::spawn(move || {
        for addr in &addrs {
            ask_greeting(*addr);
        }
        control.shutdown();
    });
    let stats = server.serve(udp_greet::greet).expect("serve");
    client.join().expect("client");
    assert_eq!(stats.replied, 2);
}

fn ask_greeting(to: SocketAddr) {
    let client = udp_greet::GreetClient::connect(to).expect("connect");
    assert_eq!(client.send_recv(b"Sarah").expect("reply"), b"Hello, Sarah!");
}

#[cfg(feature = "tokio")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_async_server_answers_on_each_listener() {
    for portable in [false, true] {
        let server = udp_greet::tokio::GreetServer::builder()
            .portable_io(portable)
            .bind_all(addresses())
            .expect("bind_all")
            .spawn(|request: udp_greet::tokio::Request| async move {
                let local = request.local_addr().map(|a| a.to_string());
                Some(udp_greet::tokio::Reply::from(
                    format!("{} {local:?}", request.listener()).as_str(),
                ))
            })
            .expect("spawn");
        let bound = server.local_addrs();
        let asked = bound.clone();
        tokio::task::spawn_blocking(move || {
            for (i, addr) in asked.iter().enumerate() {
                ask(*addr, i + 1);
            }
        })
        .await
        .expect("clients");
        let control = server.control();
        let stats = server.shutdown().await.expect("shutdown");
        let per_listener = control.listener_stats();
        assert_balanced(&stats);
        for (i, (addr, listener)) in per_listener.iter().enumerate() {
            assert_eq!(*addr, bound[i]);
            assert_eq!(listener.replied, (i + 1) as u64, "{addr}");
        }
        assert_eq!(stats.replied, (1..=bound.len() as u64).sum::<u64>());
    }
}
