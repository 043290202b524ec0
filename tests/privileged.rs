//! Tests that need root: a private network namespace with addresses of its
//! own, and a raw socket to forge a source port. `cargo test` lists them as
//! ignored; `.ci/run` runs them as root with `cargo test --test privileged
//! -- --ignored`, and says so when it cannot.
//!
//! The namespace is made with `unshare(CLONE_NEWNET)` on a thread of its
//! own: sockets that thread creates, and the `ip` commands it runs, live in
//! the namespace, which disappears with its last socket. Traffic never
//! leaves it.
#![cfg(target_os = "linux")]

mod util;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::Command;

use udp_greet::{GreetServer, HandlerPool, ServerBuilder};
use util::{HANG_GUARD, tell_local, wait_until, within_guard};

const NEEDS_ROOT: &str = "needs root and iproute2: run by .ci/run";

/// Moves the calling thread into a new, empty network namespace.
fn enter_new_netns() -> Result<(), String> {
    // SAFETY: `unshare` takes a flag word and touches no memory of ours; with
    // CLONE_NEWNET it changes only this thread's network namespace.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!(
            "unshare(CLONE_NEWNET) failed: {} (this test needs root)",
            std::io::Error::last_os_error()
        ))
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip` (install iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A namespace with loopback up and two more addresses of each family.
fn two_address_host() -> Result<(), String> {
    enter_new_netns()?;
    ip(&["link", "set", "lo", "up"])?;
    for addr in ["192.0.2.1/32", "192.0.2.2/32"] {
        ip(&["addr", "add", addr, "dev", "lo"])?;
    }
    for addr in ["2001:db8::1/128", "2001:db8::2/128"] {
        ip(&["-6", "addr", "add", addr, "dev", "lo", "nodad"])?;
    }
    Ok(())
}

/// From each address to each other one: the reply must come from the
/// address the request was sent to, or the connected socket drops it.
fn check_replies(builder: ServerBuilder, wildcard: &str, addrs: [&str; 2]) -> Result<(), String> {
    let server = builder
        .bind(wildcard)
        .map_err(|e| e.report())?
        .spawn(tell_local)
        .map_err(|e| e.report())?;
    let port = server.local_addr().port();
    for (from, to) in [(addrs[0], addrs[1]), (addrs[1], addrs[0])] {
        let from: IpAddr = from.parse().map_err(|e| format!("{e}"))?;
        let to: IpAddr = to.parse().map_err(|e| format!("{e}"))?;
        let socket = UdpSocket::bind(SocketAddr::new(from, 0)).map_err(|e| e.to_string())?;
        socket
            .connect(SocketAddr::new(to, port))
            .map_err(|e| e.to_string())?;
        socket
            .set_read_timeout(Some(HANG_GUARD))
            .map_err(|e| e.to_string())?;
        util::send(&socket, b"who?").map_err(|e| e.to_string())?;
        let mut buf = [0u8; 64];
        let n = util::recv(&socket, &mut buf)
            .map_err(|e| format!("no reply from {to} to a client at {from}: {e}"))?;
        let said = String::from_utf8_lossy(&buf[..n]).into_owned();
        // A dual-stack socket sees an IPv4 peer as IPv4-mapped IPv6, and the
        // address it sent to in the same family.
        let expected = match to {
            IpAddr::V4(v4) if server.local_addr().is_ipv6() => IpAddr::V6(v4.to_ipv6_mapped()),
            to => to,
        };
        if said != expected.to_string() {
            return Err(format!(
                "the handler saw {said}, the request went to {to} (expected {expected})"
            ));
        }
    }
    let stats = server.shutdown().map_err(|e| e.report())?;
    if stats.replied != 2 || stats.received != stats.accounted() {
        return Err(format!("unexpected counters {stats:?}"));
    }
    Ok(())
}

#[test]
#[ignore = "needs root and iproute2: run by .ci/run"]
fn a_wildcard_server_answers_from_the_address_asked_on_a_two_address_host() {
    let outcome = within_guard("the namespace test", || -> Result<(), String> {
        two_address_host()?;
        for portable in [false, true] {
            for (workers, handler_threads) in [(1, 0), (2, 0), (1, 2)] {
                let builder = || {
                    GreetServer::builder()
                        .portable_io(portable)
                        .workers(workers)
                        .handler_pool(
                            (handler_threads > 0).then(|| HandlerPool::threads(handler_threads)),
                        )
                };
                check_replies(builder(), "0.0.0.0:0", ["192.0.2.1", "192.0.2.2"])?;
                check_replies(builder(), "[::]:0", ["2001:db8::1", "2001:db8::2"])?;
                // A dual-stack socket answers its IPv4 peers from the right
                // address too.
                check_replies(
                    builder().only_v6(false),
                    "[::]:0",
                    ["192.0.2.1", "192.0.2.2"],
                )?;
            }
        }
        Ok(())
    });
    if let Err(why) = outcome {
        panic!("{why} ({NEEDS_ROOT})");
    }
}

/// A UDP datagram with source port 0, forged through a raw socket.
fn forge_from_port_zero(to: SocketAddr, payload: &[u8]) -> Result<(), String> {
    use socket2::{Domain, Protocol, Socket, Type};
    let raw = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::UDP))
        .map_err(|e| format!("raw socket: {e} (this test needs root)"))?;
    let len = (8 + payload.len()) as u16;
    let mut packet = Vec::with_capacity(len as usize);
    packet.extend_from_slice(&0u16.to_be_bytes()); // source port 0
    packet.extend_from_slice(&to.port().to_be_bytes());
    packet.extend_from_slice(&len.to_be_bytes());
    packet.extend_from_slice(&0u16.to_be_bytes()); // no checksum (allowed over IPv4)
    packet.extend_from_slice(payload);
    let dest = SocketAddr::new(to.ip(), 0);
    util::retrying(None, || raw.send_to(&packet, &dest.into()))
        .map_err(|e| format!("send: {e}"))?;
    Ok(())
}

#[test]
#[ignore = "needs root and iproute2: run by .ci/run"]
fn a_request_from_port_zero_is_never_answered() {
    for portable in [false, true] {
        let server = GreetServer::builder()
            .portable_io(portable)
            .bind("127.0.0.1:0")
            .expect("bind")
            .spawn(udp_greet::greet)
            .expect("spawn");
        let addr = server.local_addr();
        if let Err(why) = forge_from_port_zero(addr, b"forged") {
            panic!("{why} ({NEEDS_ROOT})");
        }
        wait_until("the forged request to be counted", || {
            server.stats().bad_source == 1
        });
        let stats = server.shutdown().expect("shutdown");
        assert_eq!(
            (stats.received, stats.bad_source, stats.replied),
            (1, 1, 0),
            "{stats:?}"
        );
        assert_eq!(stats.received, stats.accounted());
    }
}
