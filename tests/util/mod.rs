//! Helpers shared by the integration tests.
#![allow(dead_code, unused_macros)] // each test binary uses its own subset

use std::net::{SocketAddr, UdpSocket};

use std::time::{Duration, Instant};
use udp_greet::{Action, Request, ServerBuilder, ServerHandle, Stats};

pub mod emulator;
#[cfg(target_os = "linux")]
pub mod netns;
mod retry;
#[allow(unused_imports)] // each test binary uses its own subset
pub use retry::*;

/// How long any single wait in a test may take before the test fails
/// instead of hanging. Generous: CI machines are shared and slow.
pub const HANG_GUARD: Duration = Duration::from_secs(10);

pub const V4: &str = "127.0.0.1:0";
pub const V6: &str = "[::1]:0";

/// Whether this machine has an IPv6 loopback; tests that need it say so
/// when it is missing instead of passing silently.
pub fn has_ipv6() -> bool {
    let ok = UdpSocket::bind(V6).is_ok();
    if !ok {
        eprintln!("note: no IPv6 loopback on this machine; the IPv6 half of this test did not run");
    }
    ok
}

/// Whether all of 127.0.0.0/8 reaches this host (Linux), so tests can
/// play many distinct sources; says so when it does not. Checks that a
/// datagram from 127.0.0.2 arrives as from 127.0.0.2: where it does not,
/// that is an emulator's gap (Wine's; the test's many-source half is
/// skipped under it) or, anywhere else, a failure.
pub fn has_loopback_range() -> bool {
    loopback_range(emulator::Gap::skips_part)
}

/// As [`has_loopback_range`], for a test that has nothing to do without
/// the range: whether it should return (an emulator's gap skips it whole).
pub fn lacks_loopback_range() -> bool {
    !loopback_range(emulator::Gap::skips)
}

fn loopback_range(skip: fn(&emulator::Gap) -> bool) -> bool {
    let Ok(other) = UdpSocket::bind("127.0.0.2:0") else {
        eprintln!(
            "note: only 127.0.0.1 is a loopback address here; the many-source half of this test did not run"
        );
        return false;
    };
    let receiver = raw_socket_for(SocketAddr::from(([127, 0, 0, 1], 0)));
    let to = receiver.local_addr().expect("local address");
    send_to(&other, b"from 127.0.0.2", to).expect("send from 127.0.0.2");
    let mut buf = [0u8; 32];
    let (_, from) = recv_from(&receiver, &mut buf).expect("a datagram from 127.0.0.2");
    if from == other.local_addr().expect("local address") {
        return true;
    }
    if skip(&emulator::WINE_LOOPBACK_SOURCES) {
        return false;
    }
    panic!("a datagram from 127.0.0.2 arrived as from {from}");
}

/// The loopback addresses to test on (port 0), each with the largest UDP
/// payload of its family: IPv4 always, IPv6 where the machine has it.
pub fn families() -> Vec<(&'static str, usize)> {
    let mut families = vec![(V4, udp_greet::MAX_UDP_PAYLOAD_V4)];
    if has_ipv6() {
        families.push((V6, udp_greet::MAX_UDP_PAYLOAD_V6));
    }
    families
}

/// A plain std socket on loopback of `peer`'s family, with a hang guard.
pub fn raw_socket_for(peer: SocketAddr) -> UdpSocket {
    let local = if peer.is_ipv4() { V4 } else { V6 };
    let socket = UdpSocket::bind(local).expect("bind a loopback test socket");
    socket
        .set_read_timeout(Some(HANG_GUARD))
        .expect("set a read timeout");
    socket
}

/// Polls `check` until it returns true or the hang guard runs out, for
/// things the kernel or another thread does asynchronously.
pub fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + HANG_GUARD;
    while !check() {
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        std::thread::yield_now();
    }
}

/// Runs `f` on another thread and fails the test if it does not finish
/// within the hang guard.
pub fn within_guard<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(HANG_GUARD)
        .unwrap_or_else(|_| panic!("{what} did not finish within {HANG_GUARD:?}"))
}

/// Declares, for each named function taking a `ServerBuilder`, one test on
/// the batched path (`batched::name`) and one on the portable loop
/// (`portable::name`), so every behaviour is checked on both.
macro_rules! on_both_paths {
    ($($name:ident),* $(,)?) => {
        mod batched {
            $(
                #[test]
                fn $name() {
                    super::$name(udp_greet::GreetServer::builder());
                }
            )*
        }
        mod portable {
            $(
                #[test]
                fn $name() {
                    super::$name(udp_greet::GreetServer::builder().portable_io(true));
                }
            )*
        }
    };
}
#[allow(unused_imports)] // each test binary uses its own subset
pub(crate) use on_both_paths;

/// A handler that answers with the address the request was sent to, as the
/// handler sees it (`Request::local_ip`).
pub fn tell_local(request: Request<'_>, reply: &mut Vec<u8>) -> Action {
    let local = request
        .local_ip()
        .map(|ip| ip.to_string())
        .unwrap_or_default();
    reply.extend_from_slice(local.as_bytes());
    Action::Reply
}

/// The test's side of a [`greeter_holding`] handler.
pub struct Hold {
    in_call: std::sync::mpsc::Receiver<()>,
    release: std::sync::mpsc::Sender<()>,
}

impl Hold {
    /// Waits (within the hang guard) until the held call has started.
    pub fn started(&self) {
        self.in_call
            .recv_timeout(HANG_GUARD)
            .expect("the held handler call starts");
    }

    /// Lets the held call go on.
    pub fn release(&self) {
        self.release.send(()).expect("the held handler call waits");
    }
}

/// A greeter that holds the request whose data is `held`: that call says
/// it has started and waits for the test's go-ahead (or the hang guard),
/// both through the returned [`Hold`]; other requests are greeted at once.
pub fn greeter_holding(
    held: &'static [u8],
) -> (
    impl Fn(Request<'_>, &mut Vec<u8>) -> Action + Send + Sync + 'static,
    Hold,
) {
    use std::sync::{Mutex, mpsc};

    let (started, in_call) = mpsc::channel();
    let (release, gate) = mpsc::channel::<()>();
    let (started, gate) = (Mutex::new(started), Mutex::new(gate));
    let handler = move |request: Request<'_>, reply: &mut Vec<u8>| {
        if request.data() == held {
            let _ = started.lock().map(|s| s.send(()));
            let _ = gate.lock().map(|g| g.recv_timeout(HANG_GUARD));
        }
        udp_greet::greet(request, reply)
    };
    (handler, Hold { in_call, release })
}

/// A greet server from `builder`, bound to `addr` and running.
pub fn greet_server(builder: ServerBuilder, addr: &str) -> ServerHandle {
    builder
        .bind(addr)
        .expect("bind")
        .spawn(udp_greet::greet)
        .expect("spawn")
}

/// Every datagram the server took ended in exactly one outcome counter.
pub fn assert_balanced(stats: &Stats) {
    assert_eq!(
        stats.received,
        stats.accounted(),
        "every datagram is accounted for: {stats:?}"
    );
}

/// How many threads of this process serve `port` (named `udp:PORT/N`):
/// receive workers, not handler-pool threads (`udp:PORT/hN`). Linux only
/// (0 elsewhere).
pub fn workers_of(port: u16) -> usize {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    let prefix = format!("udp:{port}/");
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| {
            name.strip_prefix(&prefix)
                .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
        })
        .count()
}

/// As [`wait_until`], from async code: yields to the runtime between checks
/// so that the tasks being waited for can run.
pub async fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + HANG_GUARD;
    while !check() {
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        tokio::task::yield_now().await;
    }
}

/// A future that fails the test, rather than hanging it, if `future` does
/// not finish within the hang guard.
pub async fn guarded<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    guarded_within(what, HANG_GUARD, future).await
}

/// As [`guarded`], for a future that may rightly take up to `limit`.
pub async fn guarded_within<T>(
    what: &str,
    limit: Duration,
    future: impl std::future::Future<Output = T>,
) -> T {
    match tokio::time::timeout(limit, future).await {
        Ok(out) => out,
        Err(_) => panic!("{what} did not finish within {limit:?}"),
    }
}

/// [`wait_until`] for async tests: yields to the runtime between checks.
#[cfg(feature = "tokio")]
pub async fn wait_until_async(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + HANG_GUARD;
    while !check() {
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        tokio::task::yield_now().await;
    }
}

/// How many IPv4 UDP sockets on this machine are connected to `peer`
/// (read from `/proc/net/udp`, Linux); `None` where that cannot be read.
/// For a peer on an ephemeral port of its own, these are one client's
/// sockets.
pub fn udp_sockets_connected_to(peer: std::net::SocketAddr) -> Option<usize> {
    let table = std::fs::read_to_string("/proc/net/udp").ok()?;
    let parse = |field: &str| -> Option<std::net::SocketAddr> {
        let (ip, port) = field.split_once(':')?;
        // The kernel prints the address as a native-endian u32 of its
        // network-order bytes, and the port in host order.
        let ip = u32::from_str_radix(ip, 16).ok()?.to_ne_bytes();
        let port = u16::from_str_radix(port, 16).ok()?;
        Some(std::net::SocketAddr::from((ip, port)))
    };
    Some(
        table
            .lines()
            .skip(1)
            .filter_map(|line| line.split_whitespace().nth(2))
            .filter(|remote| parse(remote) == Some(peer))
            .count(),
    )
}

/// Polls `inner` at most `polls` times (each time it is woken), then drops
/// it: a call cancelled at its `polls`-th await point. `None` if cancelled.
pub struct CancelAfter<F> {
    pub inner: Option<std::pin::Pin<Box<F>>>,
    pub polls: usize,
}

impl<F: std::future::Future> std::future::Future for CancelAfter<F> {
    type Output = Option<F::Output>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        if self.polls == 0 {
            self.inner = None;
            return std::task::Poll::Ready(None);
        }
        self.polls -= 1;
        let Some(inner) = self.inner.as_mut() else {
            return std::task::Poll::Ready(None);
        };
        match inner.as_mut().poll(cx) {
            std::task::Poll::Ready(out) => {
                self.inner = None;
                std::task::Poll::Ready(Some(out))
            }
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}
