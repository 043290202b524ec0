//! Linux-only bench machinery: a batched load generator (`sendmmsg` /
//! `recvmmsg`), CPU pinning, and per-thread CPU time. The bench's only
//! `unsafe`, each block with its reason.

use std::io;
use std::mem;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::ptr;
use std::time::{Duration, Instant};

use libc::{c_uint, c_void, iovec, mmsghdr};

/// Plain C structs of integers, pointers and arrays of them, for which all
/// zeroes is a valid value (null pointers, zero lengths, empty sets).
trait Zeroable {}
impl Zeroable for libc::cpu_set_t {}
impl Zeroable for libc::sockaddr_storage {}
impl Zeroable for iovec {}
impl Zeroable for mmsghdr {}

/// A zeroed `T`.
fn zeroed<T: Zeroable>() -> T {
    // SAFETY: `Zeroable` is implemented only for types valid when zeroed.
    unsafe { mem::zeroed() }
}

/// `n` zeroed `T`s.
fn zeroed_vec<T: Zeroable>(n: usize) -> Vec<T> {
    (0..n).map(|_| zeroed()).collect()
}

/// Pins the calling thread to one CPU; threads it spawns afterwards
/// inherit the pin.
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    let mut set: libc::cpu_set_t = zeroed();
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "no such CPU"));
    }
    // SAFETY: `cpu` is below `CPU_SETSIZE`, so the bit is inside `set`.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is the calling thread; `set` is a valid, initialised
    // `cpu_set_t` of the size given.
    let rc = unsafe { libc::sched_setaffinity(0, mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Gives `socket` a receive buffer of `bytes`, past `net.core.rmem_max`
/// where the process may (`SO_RCVBUFFORCE`, with `CAP_NET_ADMIN`), else as
/// large as the system allows: for a bench's own server, whose drops would
/// measure the machine rather than the client.
pub fn force_recv_buffer(socket: &UdpSocket, bytes: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: `value` is a live `c_int` and the length given is its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            ptr::from_ref(&value).cast::<c_void>(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    socket2::SockRef::from(socket).set_recv_buffer_size(bytes)
}

/// The thread ids of this process now.
pub fn thread_ids() -> Vec<u32> {
    std::fs::read_dir("/proc/self/task")
        .map(|dir| {
            dir.filter_map(|t| t.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Runs `start` and returns what it made with the ids of the threads it
/// started (those that exist after it and did not before).
pub fn with_new_threads<T, E>(start: impl FnOnce() -> Result<T, E>) -> Result<(T, Vec<u32>), E> {
    let before = thread_ids();
    let made = start()?;
    let tids = thread_ids()
        .into_iter()
        .filter(|t| !before.contains(t))
        .collect();
    Ok((made, tids))
}

/// CPU time the given threads of this process have used, from the
/// scheduler's statistics (nanoseconds on CPU).
pub fn cpu_time(tids: &[u32]) -> Duration {
    let nanos: u64 = tids
        .iter()
        .filter_map(|tid| std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    Duration::from_nanos(nanos)
}

/// One round over several servers: each server's generator runs for
/// `span` in turn; returns, for each, replies per second and the CPU time
/// per reply of its threads (`tids`).
pub fn measure_round<'a>(
    servers: impl IntoIterator<Item = (&'a [u32], &'a mut Generator)>,
    span: Duration,
) -> Vec<(f64, f64)> {
    servers
        .into_iter()
        .map(|(tids, generator)| {
            let before = cpu_time(tids);
            let load = generator.run(span, u64::MAX);
            let cpu = cpu_time(tids).saturating_sub(before);
            (
                load.received as f64 / load.elapsed.as_secs_f64(),
                cpu.as_secs_f64() / load.received.max(1) as f64,
            )
        })
        .collect()
}

/// What one generator run did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Load {
    pub sent: u64,
    pub received: u64,
    pub elapsed: Duration,
}

/// A closed-loop load generator: several connected sockets, each keeping a
/// window of requests in flight, topped up and drained in batches.
pub struct Generator {
    sockets: Vec<UdpSocket>,
    window: usize,
    request: Vec<u8>,
    recv_bufs: Vec<u8>,
    send_iov: iovec,
    send_hdrs: Vec<mmsghdr>,
    recv_iovs: Vec<iovec>,
    recv_hdrs: Vec<mmsghdr>,
    /// Where replies are counted instead of received, if elsewhere.
    counter: Option<ReplyCounter>,
}

/// Replies counted outside the generator's sockets (by an XDP program on
/// its interface that counts and drops them, as kxdpgun does): `total`
/// gives the running count, of which `seen` have been taken.
pub struct ReplyCounter {
    total: Box<dyn FnMut() -> u64 + Send>,
    seen: u64,
    /// Counted but not yet given to a socket's window.
    unclaimed: usize,
}

const REPLY_ROOM: usize = 128;

impl Generator {
    /// `sockets` sockets connected to `server`, each with `window` requests
    /// of `request` in flight.
    pub fn new(
        server: SocketAddr,
        sockets: usize,
        window: usize,
        request: &[u8],
    ) -> io::Result<Generator> {
        Generator::new_from(
            "127.0.0.1".parse().expect("an address"),
            server,
            sockets,
            window,
            request,
        )
    }

    /// As [`Generator::new`], with the sockets bound to `local` (in the
    /// network namespace of the calling thread).
    pub fn new_from(
        local: std::net::IpAddr,
        server: SocketAddr,
        sockets: usize,
        window: usize,
        request: &[u8],
    ) -> io::Result<Generator> {
        let mut list = Vec::with_capacity(sockets);
        for _ in 0..sockets {
            let socket = UdpSocket::bind(SocketAddr::new(local, 0))?;
            socket.connect(server)?;
            list.push(socket);
        }
        Generator::from_sockets(list, window, request)
    }

    /// A generator over `sockets`, connected to the server already (made
    /// in another network namespace, say), each with `window` requests of
    /// `request` in flight.
    pub fn from_sockets(
        sockets: Vec<UdpSocket>,
        window: usize,
        request: &[u8],
    ) -> io::Result<Generator> {
        for socket in &sockets {
            socket.set_nonblocking(true)?;
        }
        let mut generator = Generator {
            sockets,
            window,
            request: request.to_vec(),
            recv_bufs: vec![0u8; window * REPLY_ROOM],
            send_iov: zeroed(),
            send_hdrs: zeroed_vec(window),
            recv_iovs: zeroed_vec(window),
            recv_hdrs: zeroed_vec(window),
            counter: None,
        };
        generator.send_iov = iovec {
            iov_base: generator.request.as_mut_ptr().cast::<c_void>(),
            iov_len: generator.request.len(),
        };
        let base = generator.recv_bufs.as_mut_ptr();
        for i in 0..window {
            generator.recv_iovs[i] = iovec {
                iov_base: base.wrapping_add(i * REPLY_ROOM).cast::<c_void>(),
                iov_len: REPLY_ROOM,
            };
        }
        Ok(generator)
    }

    /// Takes replies from `total` (a running count of the replies to
    /// every socket) rather than from the sockets, which then receive
    /// nothing: the replies are counted and dropped before they reach them.
    pub fn counting_replies(mut self, mut total: Box<dyn FnMut() -> u64 + Send>) -> Generator {
        let seen = total();
        self.counter = Some(ReplyCounter {
            total,
            seen,
            unclaimed: 0,
        });
        self
    }

    /// Replies to socket `s` since the last look: received, or taken from
    /// the counter (as many as `s` has in flight, `inflight`, of those
    /// counted and not yet given to a socket; the counter is read at
    /// socket 0).
    fn replies(&mut self, s: usize, inflight: usize) -> usize {
        let Some(counter) = self.counter.as_mut() else {
            return self.recv(s);
        };
        if s == 0 {
            let total = (counter.total)();
            let new = usize::try_from(total.saturating_sub(counter.seen)).unwrap_or(usize::MAX);
            counter.unclaimed = counter.unclaimed.saturating_add(new);
            counter.seen = total;
        }
        let got = counter.unclaimed.min(inflight);
        counter.unclaimed -= got;
        got
    }

    /// Runs for `duration` (or until `max_requests` are sent), then waits a
    /// little for the replies still in flight.
    pub fn run(&mut self, duration: Duration, max_requests: u64) -> Load {
        let mut inflight = vec![0usize; self.sockets.len()];
        let mut last_reply = vec![Instant::now(); self.sockets.len()];
        let mut load = Load::default();
        let start = Instant::now();
        let mut sending = true;
        loop {
            let now = Instant::now();
            if sending && (now - start >= duration || load.sent >= max_requests) {
                sending = false;
            }
            let mut pending = 0;
            for s in 0..self.sockets.len() {
                let got = self.replies(s, inflight[s]);
                if got > 0 {
                    inflight[s] = inflight[s].saturating_sub(got);
                    load.received += got as u64;
                    last_reply[s] = now;
                } else if inflight[s] > 0 && now - last_reply[s] > LOST_AFTER {
                    // What has not come back by now was dropped somewhere.
                    inflight[s] = 0;
                    last_reply[s] = now;
                }
                if sending && inflight[s] < self.window {
                    let sent = self.send(s, self.window - inflight[s]);
                    inflight[s] += sent;
                    load.sent += sent as u64;
                }
                pending += inflight[s];
            }
            if !sending && pending == 0 {
                break;
            }
        }
        load.elapsed = start.elapsed();
        load
    }

    /// Sends `rate` requests a second for `duration`, open loop: every
    /// millisecond the requests due are sent (spread over the sockets, at
    /// most a window each), the replies that came are taken, and the
    /// thread sleeps until the next millisecond, so that the generator
    /// costs the machine little and alike for every server. Then waits a
    /// little for the replies still in flight.
    pub fn run_paced(&mut self, duration: Duration, rate: u64) -> Load {
        const TICK: Duration = Duration::from_millis(1);
        let mut load = Load::default();
        let start = Instant::now();
        let mut next = 0usize;
        let mut last_reply = start;
        let mut tick = 0u32;
        loop {
            let now = Instant::now();
            let sending = now - start < duration;
            let mut got = 0;
            for s in 0..self.sockets.len() {
                got += self.replies(s, usize::MAX);
            }
            load.received += got as u64;
            if got > 0 {
                last_reply = now;
            }
            if sending {
                let due = ((now - start).as_secs_f64() * rate as f64) as u64;
                let mut owed = due.saturating_sub(load.sent) as usize;
                let mut tries = 0;
                while owed > 0 && tries < self.sockets.len() {
                    let s = next % self.sockets.len();
                    next += 1;
                    let sent = self.send(s, owed.min(self.window));
                    owed -= sent;
                    load.sent += sent as u64;
                    tries += usize::from(sent == 0);
                }
            } else if load.received >= load.sent || now - last_reply > LOST_AFTER {
                break;
            }
            tick += 1;
            let wake = start + TICK * tick;
            if let Some(wait) = wake.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        load.elapsed = start.elapsed();
        load
    }

    fn send(&mut self, s: usize, count: usize) -> usize {
        let count = count.min(self.window);
        for hdr in self.send_hdrs.iter_mut().take(count) {
            hdr.msg_hdr.msg_iov = &mut self.send_iov;
            hdr.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: `count` headers, each pointing at the one request iovec,
        // which points into `self.request`; all live for the call. The
        // socket is connected, so no address is given.
        let n = unsafe {
            libc::sendmmsg(
                self.sockets[s].as_raw_fd(),
                self.send_hdrs.as_mut_ptr(),
                count as c_uint,
                libc::MSG_DONTWAIT as _,
            )
        };
        n.max(0) as usize
    }

    fn recv(&mut self, s: usize) -> usize {
        for (hdr, iov) in self.recv_hdrs.iter_mut().zip(self.recv_iovs.iter_mut()) {
            hdr.msg_hdr.msg_name = ptr::null_mut();
            hdr.msg_hdr.msg_namelen = 0;
            hdr.msg_hdr.msg_iov = iov;
            hdr.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: `window` headers, each with one iovec over its own
        // `REPLY_ROOM` bytes of `recv_bufs`; no address or control buffer.
        let n = unsafe {
            libc::recvmmsg(
                self.sockets[s].as_raw_fd(),
                self.recv_hdrs.as_mut_ptr(),
                self.window as c_uint,
                libc::MSG_DONTWAIT as _,
                ptr::null_mut(),
            )
        };
        n.max(0) as usize
    }
}

/// How long the generator waits for a reply before it counts the rest of a
/// socket's window as lost.
const LOST_AFTER: Duration = Duration::from_millis(20);

/// A hand-written `recvmmsg`/`sendmmsg` greet loop: the floor udp-greet's
/// batched server is compared with. Stops when `stop` is set (it wakes every
/// 20 ms to look).
pub fn mmsg_greet_loop(socket: &UdpSocket, stop: &std::sync::atomic::AtomicBool) {
    mmsg_greet_loop_polling(socket, stop, None);
}

/// [`mmsg_greet_loop`] that, with `poll`, goes on receiving without
/// blocking (`MSG_DONTWAIT`) for that long after each batch before it
/// blocks again: the hand-written polling server of the latency bench.
pub fn mmsg_greet_loop_polling(
    socket: &UdpSocket,
    stop: &std::sync::atomic::AtomicBool,
    poll: Option<Duration>,
) {
    const BATCH: usize = 32;
    const ROOM: usize = 2048;
    let fd = socket.as_raw_fd();
    let mut bufs = vec![0u8; BATCH * ROOM];
    let mut replies = vec![0u8; BATCH * (ROOM + 8)];
    let mut addrs: Vec<libc::sockaddr_storage> = zeroed_vec(BATCH);
    let mut iovs: Vec<iovec> = zeroed_vec(BATCH);
    let mut out_iovs: Vec<iovec> = zeroed_vec(BATCH);
    let mut hdrs: Vec<mmsghdr> = zeroed_vec(BATCH);
    let mut out_hdrs: Vec<mmsghdr> = zeroed_vec(BATCH);
    let mut until: Option<Instant> = None;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let polling = until.is_some_and(|u| Instant::now() < u);
        let flags = libc::MSG_WAITFORONE | if polling { libc::MSG_DONTWAIT } else { 0 };
        for i in 0..BATCH {
            iovs[i] = iovec {
                iov_base: bufs.as_mut_ptr().wrapping_add(i * ROOM).cast::<c_void>(),
                iov_len: ROOM,
            };
            hdrs[i].msg_hdr.msg_name = ptr::from_mut(&mut addrs[i]).cast::<c_void>();
            hdrs[i].msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as u32;
            hdrs[i].msg_hdr.msg_iov = &mut iovs[i];
            hdrs[i].msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: BATCH headers over buffers, addresses and iovecs above,
        // all alive for the call.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                hdrs.as_mut_ptr(),
                BATCH as c_uint,
                flags as _,
                ptr::null_mut(),
            )
        };
        if n <= 0 {
            if polling {
                std::hint::spin_loop();
            }
            continue;
        }
        let n = n as usize;
        for i in 0..n {
            let len = (hdrs[i].msg_len as usize).min(ROOM);
            let out = &mut replies[i * (ROOM + 8)..(i + 1) * (ROOM + 8)];
            out[..7].copy_from_slice(b"Hello, ");
            out[7..7 + len].copy_from_slice(&bufs[i * ROOM..i * ROOM + len]);
            out[7 + len] = b'!';
            out_iovs[i] = iovec {
                iov_base: out.as_mut_ptr().cast::<c_void>(),
                iov_len: len + 8,
            };
            out_hdrs[i].msg_hdr.msg_name = ptr::from_mut(&mut addrs[i]).cast::<c_void>();
            out_hdrs[i].msg_hdr.msg_namelen = hdrs[i].msg_hdr.msg_namelen;
            out_hdrs[i].msg_hdr.msg_iov = &mut out_iovs[i];
            out_hdrs[i].msg_hdr.msg_iovlen = 1;
        }
        let mut start = 0;
        while start < n {
            // SAFETY: headers `start..n` point at the addresses and reply
            // buffers filled above.
            let sent = unsafe {
                libc::sendmmsg(
                    fd,
                    out_hdrs.as_mut_ptr().wrapping_add(start),
                    (n - start) as c_uint,
                    0,
                )
            };
            start += sent.max(1) as usize;
        }
        until = poll.map(|p| Instant::now() + p);
    }
}

/// The machine's count of UDP datagrams dropped for a full receive buffer
/// (`RcvbufErrors` in `/proc/net/snmp`); `None` where it cannot be read.
pub fn udp_rcvbuf_errors() -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let names = udp.next()?.split_whitespace();
    let values = udp.next()?.split_whitespace();
    names
        .zip(values)
        .find(|(name, _)| *name == "RcvbufErrors")
        .and_then(|(_, value)| value.parse().ok())
}

/// A reading of the machine's CPU time, for [`MachineClock::busy_since`].
#[derive(Debug, Clone, Copy)]
pub struct MachineClock {
    at: Instant,
    idle: Duration,
}

impl MachineClock {
    /// Now, and the idle time of all CPUs so far.
    pub fn now() -> MachineClock {
        MachineClock {
            at: Instant::now(),
            idle: machine_idle(),
        }
    }

    /// CPU time all CPUs have spent busy (anything but idle: user, system,
    /// IRQ, softirq) since `self`: wall time times CPUs, less idle time.
    /// The idle time the kernel reports is measured at each idle entry and
    /// exit (`NO_HZ`), where the busy fields of `/proc/stat` are sampled
    /// at each tick, which misjudges short bursts of work.
    pub fn busy_since(&self) -> Duration {
        let now = MachineClock::now();
        // Every CPU of the machine, not those this thread may run on.
        // SAFETY: `sysconf` takes a constant and touches no memory.
        let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as u32;
        ((now.at - self.at) * cpus).saturating_sub(now.idle.saturating_sub(self.idle))
    }
}

/// Idle and I/O-wait time of all CPUs, from `/proc/stat`.
fn machine_idle() -> Duration {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return Duration::ZERO;
    };
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
    // SAFETY: `sysconf` takes a constant and touches no memory.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_nanos(idle.saturating_mul(1_000_000_000 / hz))
}
