//! A fault-injecting UDP proxy in user space (the kernel here has no
//! `netem`): it drops, duplicates, reorders, delays and truncates datagrams
//! in both directions, from a seeded random stream. Shared by the blocking
//! and async clients' lossy-network tests.
#![allow(dead_code)] // each test binary uses its own subset

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// What the proxy does to each datagram, in each direction.
#[derive(Debug, Clone, Copy)]
pub struct Faults {
    pub drop: f64,
    pub duplicate: f64,
    pub truncate: f64,
    /// Held back behind the datagrams that follow it.
    pub reorder: f64,
    /// Delayed by `delay_min..delay_max`.
    pub delay: f64,
    pub delay_min: Duration,
    pub delay_max: Duration,
}

pub const FAULTS: Faults = Faults {
    drop: 0.05,
    duplicate: 0.01,
    truncate: 0.01,
    reorder: 0.05,
    delay: 0.10,
    delay_min: Duration::from_millis(10),
    delay_max: Duration::from_millis(60),
};

/// Longest a datagram can be held: the delay plus the reorder hold-back.
pub const MAX_HOLD: Duration = Duration::from_millis(90);

/// A small seeded generator (xorshift64*), so a run's faults can be
/// reproduced from the seed it prints.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }

    fn between(&mut self, low: Duration, high: Duration) -> Duration {
        let span = (high - low).as_micros() as u64;
        low + Duration::from_micros(self.next() % span.max(1))
    }
}

/// A datagram due to go out at `due` from `via` to `to`.
struct Pending {
    due: Instant,
    seq: u64,
    via: Arc<UdpSocket>,
    to: SocketAddr,
    data: Vec<u8>,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.due, self.seq).cmp(&(other.due, other.seq))
    }
}

/// Decides each datagram's fate and hands the survivors to the scheduler.
struct Injector {
    rng: Mutex<Rng>,
    schedule: Mutex<mpsc::Sender<Pending>>,
    seq: std::sync::atomic::AtomicU64,
}

impl Injector {
    fn pass(&self, via: &Arc<UdpSocket>, to: SocketAddr, data: &[u8]) {
        let Ok(mut rng) = self.rng.lock() else { return };
        if rng.chance(FAULTS.drop) {
            return;
        }
        let mut data = data.to_vec();
        if !data.is_empty() && rng.chance(FAULTS.truncate) {
            let keep = (rng.next() as usize) % data.len();
            data.truncate(keep);
        }
        let copies = if rng.chance(FAULTS.duplicate) { 2 } else { 1 };
        for _ in 0..copies {
            let mut hold = Duration::ZERO;
            if rng.chance(FAULTS.delay) {
                hold += rng.between(FAULTS.delay_min, FAULTS.delay_max);
            }
            if rng.chance(FAULTS.reorder) {
                hold += rng.between(Duration::from_millis(1), Duration::from_millis(30));
            }
            let pending = Pending {
                due: Instant::now() + hold,
                seq: self.seq.fetch_add(1, Ordering::Relaxed),
                via: via.clone(),
                to,
                data: data.clone(),
            };
            if let Ok(schedule) = self.schedule.lock() {
                let _ = schedule.send(pending);
            }
        }
    }
}

/// `socket` with a receive buffer of 4 MiB (as far as the system allows),
/// so that a burst of thousands of calls is not lost in the proxy itself:
/// only the faults drawn lose datagrams.
fn roomy(socket: UdpSocket) -> UdpSocket {
    // Best effort: a smaller buffer only makes a test stricter.
    let _ = socket2::SockRef::from(&socket).set_recv_buffer_size(4 << 20);
    socket
}

/// The proxy: clients talk to `addr`; each client gets an upstream socket
/// of its own toward the server, so replies find their way back.
pub struct Proxy {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// The scheduler and the client-to-server thread.
    threads: Vec<JoinHandle<()>>,
    /// The thread that joins the upstream sockets' threads.
    upstream_threads: Option<JoinHandle<()>>,
    /// Each upstream socket's address, to wake its thread at the end.
    upstreams: Arc<Mutex<Vec<SocketAddr>>>,
}

/// How often the proxy's two busy threads look at the stop flag.
const POLL: Duration = Duration::from_millis(50);

/// How long an upstream socket's thread waits at most for a reply before it
/// looks at the stop flag. Long: a run can make hundreds of them (one per
/// client socket), and threads waking 20 times a second each are work the
/// machine then does instead of the test's (under Wine, where each wait is
/// a call to the wineserver, enough to time out a fifth of the calls).
/// They are woken by a datagram when the proxy stops.
const UPSTREAM_POLL: Duration = Duration::from_secs(1);

impl Proxy {
    /// A proxy in front of `server`, its faults drawn from `seed`.
    pub fn start(server: SocketAddr, seed: u64) -> Proxy {
        let front = Arc::new(roomy(
            UdpSocket::bind("127.0.0.1:0").expect("bind the proxy"),
        ));
        front.set_read_timeout(Some(POLL)).expect("timeout");
        let addr = front.local_addr().expect("addr");
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel::<Pending>();
        let injector = Arc::new(Injector {
            rng: Mutex::new(Rng(seed | 1)),
            schedule: Mutex::new(tx),
            seq: std::sync::atomic::AtomicU64::new(0),
        });
        let mut threads = Vec::new();

        // The scheduler: sends each datagram when it is due.
        let stopped = stop.clone();
        threads.push(thread::spawn(move || {
            let mut queue: BinaryHeap<Reverse<Pending>> = BinaryHeap::new();
            while !stopped.load(Ordering::Relaxed) {
                let now = Instant::now();
                while queue.peek().is_some_and(|Reverse(p)| p.due <= now) {
                    if let Some(Reverse(p)) = queue.pop() {
                        let _ = crate::util::send_to(&p.via, &p.data, p.to);
                    }
                }
                let wait = queue
                    .peek()
                    .map_or(POLL, |Reverse(p)| p.due.saturating_duration_since(now))
                    .min(POLL);
                match rx.recv_timeout(wait.max(Duration::from_micros(50))) {
                    Ok(p) => queue.push(Reverse(p)),
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
        }));

        // Client to server, creating an upstream socket (and a thread for
        // its replies) per client.
        let stopped = stop.clone();
        let (upstream_tx, upstream_rx) = mpsc::channel::<JoinHandle<()>>();
        let upstreams: Arc<Mutex<Vec<SocketAddr>>> = Arc::default();
        let listed = upstreams.clone();
        let front_in = front.clone();
        let inject = injector.clone();
        threads.push(thread::spawn(move || {
            let mut upstreams: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
            let mut buf = vec![0u8; 65_536];
            while !stopped.load(Ordering::Relaxed) {
                let Ok((n, client)) = crate::util::recv_from(&front_in, &mut buf) else {
                    continue;
                };
                let up = upstreams.entry(client).or_insert_with(|| {
                    let up = Arc::new(roomy(
                        UdpSocket::bind("127.0.0.1:0").expect("bind upstream"),
                    ));
                    up.set_read_timeout(Some(UPSTREAM_POLL)).expect("timeout");
                    if let (Ok(mut listed), Ok(addr)) = (listed.lock(), up.local_addr()) {
                        listed.push(addr);
                    }
                    let (up_in, front_out, inject, stopped) = (
                        up.clone(),
                        front_in.clone(),
                        inject.clone(),
                        stopped.clone(),
                    );
                    let replies = thread::spawn(move || {
                        let mut buf = vec![0u8; 65_536];
                        while !stopped.load(Ordering::Relaxed) {
                            if let Ok((n, _)) = crate::util::recv_from(&up_in, &mut buf) {
                                inject.pass(&front_out, client, &buf[..n]);
                            }
                        }
                    });
                    let _ = upstream_tx.send(replies);
                    up
                });
                inject.pass(up, server, &buf[..n]);
            }
        }));
        let upstream_threads = thread::spawn(move || {
            for handle in upstream_rx {
                let _ = handle.join();
            }
        });
        Proxy {
            addr,
            stop,
            threads,
            upstream_threads: Some(upstream_threads),
            upstreams,
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // The client-to-server thread ends first: it makes no upstream
        // socket after this.
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        // Each upstream socket's thread waits for a datagram: one wakes it
        // (and if one is lost, its wait still ends within UPSTREAM_POLL).
        if let (Ok(waker), Ok(upstreams)) = (UdpSocket::bind("127.0.0.1:0"), self.upstreams.lock())
        {
            for upstream in upstreams.iter() {
                let _ = waker.send_to(b"", upstream);
            }
        }
        if let Some(thread) = self.upstream_threads.take() {
            let _ = thread.join();
        }
    }
}

/// The fault seed: `UDP_GREET_FAULT_SEED` if set (to replay a run), else a
/// fixed one.
pub fn seed() -> u64 {
    let seed = std::env::var("UDP_GREET_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x005e_ed0f_fa17);
    println!("fault seed: {seed} (set UDP_GREET_FAULT_SEED to replay)");
    seed
}

/// The most calls of `calls` expected to fail with `retries` resends
/// (timeouts from `initial_timeout`, doubling, less 20% jitter): an attempt is lost
/// when the request or the reply is dropped or cut short; from the third
/// attempt on (four times the first timeout or more) no delay outlasts
/// one, so the first two attempts count as lost whatever happens.
pub fn predicted_failures(calls: f64, retries: u32, timeout: Duration) -> f64 {
    let per_attempt = 1.0 - ((1.0 - FAULTS.drop) * (1.0 - FAULTS.truncate)).powi(2);
    assert!(MAX_HOLD * 2 < timeout.mul_f64(0.8 * 4.0));
    calls * per_attempt.powi(retries as i32 + 1 - 2)
}
