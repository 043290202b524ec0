//! Per-datagram metadata (`recv_metadata`), the DSCP of replies
//! (`reply_dscp`) and the user's own socket settings (`before_bind`), on
//! both engines and both I/O paths.
// Metadata is read on Linux only: elsewhere only the refusals are tested.
#![cfg_attr(not(target_os = "linux"), allow(dead_code, unused_imports))]

mod util;

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use socket2::{Domain, Protocol, Socket, Type};
use udp_greet::{Action, Error, GreetServer, Metadata, Request, ServerBuilder};
use util::{HANG_GUARD, V4, V6, has_ipv6, recv, send_to};

/// What a handler saw of a request's metadata, written as the reply.
fn describe(metadata: Metadata) -> String {
    format!(
        "class={:?} ecn={:?} dscp={:?} ttl={:?} interface={}",
        metadata.traffic_class(),
        metadata.ecn(),
        metadata.dscp(),
        metadata.ttl(),
        metadata.interface().is_some()
    )
}

fn report(request: Request<'_>, reply: &mut Vec<u8>) -> Action {
    reply.extend_from_slice(describe(request.metadata()).as_bytes());
    Action::Reply
}

/// A socket on `local` (port 0) whose datagrams carry `class` as their TOS
/// byte or traffic class and `ttl` as their TTL or hop limit.
fn marked_sender(local: &str, class: u8, ttl: u32) -> UdpSocket {
    let local: SocketAddr = local.parse().expect("address");
    let socket =
        Socket::new(Domain::for_address(local), Type::DGRAM, Some(Protocol::UDP)).expect("socket");
    if local.is_ipv4() {
        socket.set_tos_v4(u32::from(class)).expect("IP_TOS");
        socket.set_ttl_v4(ttl).expect("IP_TTL");
    } else {
        #[cfg(unix)]
        socket.set_tclass_v6(u32::from(class)).expect("IPV6_TCLASS");
        socket.set_unicast_hops_v6(ttl).expect("IPV6_UNICAST_HOPS");
    }
    socket.bind(&local.into()).expect("bind");
    let socket = UdpSocket::from(socket);
    socket
        .set_read_timeout(Some(HANG_GUARD))
        .expect("read timeout");
    socket
}

/// Sends `payload` from `socket` to `to` and returns the reply as text.
fn ask(socket: &UdpSocket, to: SocketAddr, payload: &[u8]) -> String {
    send_to(socket, payload, to).expect("send");
    let mut buf = [0u8; 256];
    let n = recv(socket, &mut buf).expect("a reply");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// The loopback addresses to serve on, each with the address a sender of
/// its family binds: IPv4, IPv6 where the machine has it, and a dual-stack
/// IPv6 socket serving IPv4 peers (bound to a mapped address).
fn addresses() -> Vec<(&'static str, &'static str, bool)> {
    let mut all = vec![(V4, V4, true), ("[::ffff:127.0.0.1]:0", V4, false)];
    if has_ipv6() {
        all.push((V6, V6, true));
    }
    all
}

/// The expected description of a datagram sent with `class` and `ttl`.
fn expected(class: u8, ttl: u8) -> String {
    let metadata = format!(
        "class={:?} ecn={:?} dscp={:?} ttl={:?} interface=true",
        Some(class),
        Some(udp_greet::Ecn::from_traffic_class(class)),
        Some(class >> 2),
        Some(ttl)
    );
    metadata
}

/// ECN, DSCP and TTL as sent come back in `Request::metadata`, in every
/// family, for every datagram (each sender sets its own).
fn metadata_is_read_back(builder: fn() -> ServerBuilder) {
    for (addr, sender_addr, only_v6) in addresses() {
        let server = builder()
            .recv_metadata(true)
            .only_v6(only_v6)
            .bind(addr)
            .expect("bind")
            .spawn(report)
            .expect("spawn");
        let to = server.local_addr();
        let to = if sender_addr == V4 {
            SocketAddr::from(([127, 0, 0, 1], to.port()))
        } else {
            to
        };
        // ECT(0) with DSCP 46, ECT(1), CE, and not ECN-capable; TTLs
        // from 1 to 255.
        for (class, ttl) in [(0xba, 17), (0x01, 1), (0x03, 255), (0x00, 64)] {
            let sender = marked_sender(sender_addr, class, u32::from(ttl));
            assert_eq!(
                ask(&sender, to, b"?"),
                expected(class, ttl),
                "served on {addr}, sent from {sender_addr}"
            );
        }
        let stats = server.shutdown().expect("shutdown");
        assert_eq!(stats.replied, 4);
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use super::*;

    #[test]
    fn metadata_is_read_back_batched() {
        metadata_is_read_back(GreetServer::builder);
    }

    #[test]
    fn metadata_is_read_back_portable() {
        metadata_is_read_back(|| GreetServer::builder().portable_io(true));
    }

    #[test]
    fn metadata_is_read_back_through_the_pool() {
        metadata_is_read_back(|| {
            GreetServer::builder().handler_pool(udp_greet::HandlerPool::threads(2))
        });
    }

    #[test]
    fn without_the_setting_every_field_is_none() {
        for portable in [false, true] {
            let server = GreetServer::builder()
                .portable_io(portable)
                .bind(V4)
                .expect("bind")
                .spawn(report)
                .expect("spawn");
            let sender = marked_sender(V4, 0xba, 17);
            assert_eq!(
                ask(&sender, server.local_addr(), b"?"),
                describe(Metadata::default())
            );
            assert_eq!(
                describe(Metadata::default()),
                "class=None ecn=None dscp=None ttl=None interface=false"
            );
        }
    }

    /// A server on a clone of `socket` that hands the metadata of each
    /// datagram arriving there to the returned receiver (and answers
    /// nothing): it sees the replies that others send to `socket`.
    fn watch(socket: &UdpSocket) -> (udp_greet::ServerHandle, mpsc::Receiver<Metadata>) {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let watcher = GreetServer::builder()
            .recv_metadata(true)
            .from_std(socket.try_clone().expect("clone"))
            .expect("from_std")
            .spawn(move |request: Request<'_>, _: &mut Vec<u8>| {
                if let Ok(tx) = tx.lock() {
                    let _ = tx.send(request.metadata());
                }
                Action::Ignore
            })
            .expect("spawn");
        (watcher, rx)
    }

    #[test]
    fn replies_carry_the_dscp_set() {
        for (addr, sender_addr, only_v6) in addresses() {
            for dscp in [None, Some(0), Some(46), Some(63)] {
                let mut builder = GreetServer::builder().only_v6(only_v6);
                if let Some(dscp) = dscp {
                    builder = builder.reply_dscp(dscp);
                }
                let server = builder
                    .bind(addr)
                    .expect("bind")
                    .spawn(udp_greet::greet)
                    .expect("spawn");
                let to = server.local_addr();
                let to = if sender_addr == V4 {
                    SocketAddr::from(([127, 0, 0, 1], to.port()))
                } else {
                    to
                };
                let client = UdpSocket::bind(sender_addr).expect("bind");
                let (watcher, seen) = watch(&client);
                send_to(&client, b"Tracy", to).expect("send");
                let metadata = seen.recv_timeout(HANG_GUARD).expect("the reply's metadata");
                assert_eq!(
                    (metadata.dscp(), metadata.ecn()),
                    (Some(dscp.unwrap_or(0)), Some(udp_greet::Ecn::NotEct)),
                    "served on {addr} with {dscp:?}"
                );
                watcher.shutdown().expect("watcher");
                server.shutdown().expect("server");
            }
        }
    }

    #[test]
    fn a_hook_runs_on_every_socket_before_it_serves() {
        let runs = Arc::new(AtomicUsize::new(0));
        let counted = runs.clone();
        let server = GreetServer::builder()
            .workers(3)
            .before_bind("count", move |_| {
                counted.fetch_add(1, Ordering::Relaxed);
                Ok(())
            })
            .before_bind("IP_TTL", |socket| socket.set_ttl_v4(42))
            .bind(V4)
            .expect("bind")
            .spawn(udp_greet::greet)
            .expect("spawn");
        // One socket per worker on Linux.
        assert_eq!(runs.load(Ordering::Relaxed), 3);
        // Every worker's replies leave with the hook's TTL: eight peers,
        // spread by the kernel over the workers.
        for _ in 0..8 {
            let client = UdpSocket::bind(V4).expect("bind");
            let (watcher, seen) = watch(&client);
            send_to(&client, b"Sarah", server.local_addr()).expect("send");
            let metadata = seen.recv_timeout(HANG_GUARD).expect("the reply's metadata");
            assert_eq!(metadata.ttl(), Some(42));
            watcher.shutdown().expect("watcher");
        }
        server.shutdown().expect("shutdown");
    }

    /// The scheduler state (`R`, `S`, ...) of this process's thread named
    /// `name`, from `/proc`.
    fn thread_state(name: &str) -> Option<char> {
        std::fs::read_dir("/proc/self/task")
            .ok()?
            .filter_map(|task| task.ok())
            .find(|task| {
                std::fs::read_to_string(task.path().join("comm"))
                    .is_ok_and(|comm| comm.trim_end() == name)
            })
            .and_then(|task| std::fs::read_to_string(task.path().join("stat")).ok())
            .and_then(|stat| stat.rsplit_once(") ")?.1.chars().next())
    }

    #[test]
    fn a_hook_cannot_leave_the_server_spinning() {
        // A non-blocking socket is put back in blocking mode: the idle
        // worker sleeps in the kernel (it would spin, always runnable).
        for portable in [false, true] {
            let server = GreetServer::builder()
                .portable_io(portable)
                .before_bind("O_NONBLOCK", |socket| socket.set_nonblocking(true))
                .bind(V4)
                .expect("bind")
                .spawn(udp_greet::greet)
                .expect("spawn");
            let client = udp_greet::GreetClient::connect(server.local_addr()).expect("connect");
            assert_eq!(client.send_recv(b"Tracy").expect("reply"), b"Hello, Tracy!");
            let worker = format!("udp:{}/0", server.local_addr().port());
            util::wait_until("the idle worker asleep in a blocking receive", || {
                thread_state(&worker) == Some('S')
            });
            server.shutdown().expect("shutdown");
        }
        // A socket shut down for reading would give the worker nothing but
        // errors: refused.
        let err = GreetServer::builder()
            .before_bind("SHUT_RD", |socket| {
                let _ = socket.shutdown(std::net::Shutdown::Read);
                Ok(())
            })
            .bind(V4)
            .map(|_| ())
            .expect_err("refused");
        assert!(
            matches!(&err, Error::InvalidConfig { setting, addr: Some(_), .. }
                if *setting == "ServerBuilder::before_bind"),
            "{err:?}"
        );
        assert!(err.to_string().contains("127.0.0.1:"), "{err}");
    }

    #[cfg(feature = "tokio")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_async_server_reads_metadata_on_both_paths() {
        for portable in [false, true] {
            let server = udp_greet::tokio::GreetServer::builder()
                .recv_metadata(true)
                .portable_io(portable)
                .bind(V4)
                .expect("bind")
                .spawn(|request: udp_greet::tokio::Request| async move {
                    Some(udp_greet::tokio::Reply::from(
                        describe(request.metadata()).as_str(),
                    ))
                })
                .expect("spawn");
            let to = server.local_addr();
            let reply = tokio::task::spawn_blocking(move || {
                let sender = marked_sender(V4, 0x02, 9);
                ask(&sender, to, b"?")
            })
            .await
            .expect("sender");
            assert_eq!(reply, expected(0x02, 9));
            let stats = server.shutdown().await.expect("shutdown");
            assert_eq!(stats.replied, 1);
        }
    }
}

#[test]
fn a_failing_hook_names_its_setting_and_address() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    // On Linux each worker has a socket: the hook fails on the second,
    // after the first is bound. Elsewhere the workers share one.
    let fail_at = if cfg!(target_os = "linux") { 1 } else { 0 };
    let err = GreetServer::builder()
        .workers(3)
        .before_bind("SO_MARK", move |_| {
            if counted.fetch_add(1, Ordering::Relaxed) == fail_at {
                Err(io::ErrorKind::PermissionDenied.into())
            } else {
                Ok(())
            }
        })
        .bind(V4)
        .expect_err("the hook fails");
    let message = err.to_string();
    assert!(
        matches!(&err, Error::SocketSetting { setting, .. } if setting == "SO_MARK"),
        "{err:?}"
    );
    assert!(message.contains("SO_MARK"), "{message}");
    if cfg!(target_os = "linux") {
        // The second socket joins the first's port: the error names it.
        assert!(message.contains("127.0.0.1:"), "{message}");
        assert!(!message.contains("127.0.0.1:0 "), "{message}");
    }
    assert_eq!(calls.load(Ordering::Relaxed), fail_at + 1);
    assert_eq!(io::Error::from(err).kind(), io::ErrorKind::PermissionDenied);
}

#[test]
fn settings_out_of_range_or_place_are_refused_before_any_socket() {
    let invalid = |builder: ServerBuilder| match builder.bind(V4) {
        Err(Error::InvalidConfig { setting, .. }) => setting,
        other => panic!("expected InvalidConfig, got {other:?}"),
    };
    assert_eq!(
        invalid(GreetServer::builder().reply_dscp(64)),
        "ServerBuilder::reply_dscp"
    );
    assert_eq!(
        invalid(GreetServer::builder().reply_dscp(u8::MAX)),
        "ServerBuilder::reply_dscp"
    );
    if !cfg!(target_os = "linux") {
        assert_eq!(
            invalid(GreetServer::builder().recv_metadata(true)),
            "ServerBuilder::recv_metadata"
        );
    }
    // A hook cannot run before bind on a socket bound already; the hook
    // is never called, and the refusal names it even after another
    // setting that applies before bind.
    let called = Arc::new(AtomicUsize::new(0));
    let counted = called.clone();
    let socket = UdpSocket::bind(V4).expect("bind");
    let err = GreetServer::builder()
        .reuse_address(false)
        .before_bind("IP_FREEBIND", move |_| {
            counted.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
        .from_std(socket)
        .expect_err("refused");
    assert!(
        matches!(&err, Error::InvalidConfig { setting, .. } if *setting == "ServerBuilder::before_bind"),
        "{err:?}"
    );
    assert_eq!(called.load(Ordering::Relaxed), 0);
}
