//! The AF_XDP engine (feature `xdp`, Linux): datagrams for the server's
//! address and port are taken from the NIC's receive queues before the
//! kernel's UDP stack sees them, and answered in place.
//!
//! Here: the frames ([`frame`]), the program ([`program`]) and attaching
//! it ([`attach`]). The system calls are in the platform module,
//! `crate::sys`.

mod bpf;
pub(crate) mod frame;
mod iface;
mod program;
mod queue;
mod xsk;

use std::ffi::CStr;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use socket2::Socket;

pub(crate) use bpf::XdpMode;
use frame::Target;
use queue::Queue;
pub(crate) use xsk::XskSpec;

use super::super::source::One;
use super::super::{Control, Received};

/// How long an idle XDP worker waits before it checks whether the server
/// is stopping (nothing wakes it otherwise).
pub(crate) const WAKE_INTERVAL: Duration = Duration::from_millis(50);

/// An interface's receive queues, as its driver reports its channels; 1
/// where it does not say. Asked through `socket`, so that the interface is
/// the one of the socket's network namespace.
pub(crate) fn rx_queues(socket: &Socket, interface: &str) -> u32 {
    iface::rx_queues(socket, interface)
}

/// What the XDP engine is asked to do, beyond the interface.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Options {
    pub(crate) mode: Option<XdpMode>,
    pub(crate) spec: XskSpec,
    pub(crate) max_datagram: usize,
    pub(crate) batch: usize,
    /// The TOS byte (IPv4) or traffic class (IPv6) of replies.
    pub(crate) tos: u8,
    /// Verify incoming UDP checksums.
    pub(crate) verify_checksums: bool,
}

/// The program attached to `interface` for the server whose kernel socket
/// `socket` is bound to `local`, and an AF_XDP socket on each of its
/// receive queues, each in its slot of the `XSKMAP`.
///
/// Refused: an interface that does not exist (in the socket's network
/// namespace), a loopback interface (AF_XDP cannot answer through it), one
/// that is not Ethernet, and an address that is not this host's.
pub(crate) fn open(
    interface: &str,
    socket: &Socket,
    local: SocketAddr,
    options: Options,
) -> io::Result<(Arc<Attached>, Vec<XdpQueue>)> {
    let host = iface::host(interface)
        .map_err(|e| explain("reading the host's addresses", interface, e))?;
    if !host.found {
        return Err(explain(
            "finding the interface",
            interface,
            io::Error::from_raw_os_error(libc::ENODEV),
        ));
    }
    if host.loopback {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{interface} is a loopback interface: AF_XDP cannot answer through it"),
        ));
    }
    let local_ip = match local.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    // The address may be on another interface (a service address on `lo`
    // or a dummy, reached through this one): it must be this host's.
    if host.not_sources.binary_search(&local_ip).is_err() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{local_ip} is not an address of this host: no datagram would come to it"),
        ));
    }
    let mtu =
        iface::mtu(socket, interface).map_err(|e| explain("reading the MTU", interface, e))?;
    let mac = iface::mac(socket, interface)
        .map_err(|e| explain("reading the MAC address", interface, e))?;
    let target = Target {
        port: local.port(),
        v4: match local_ip {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        },
        v6: match local_ip {
            IpAddr::V6(v6) => Some(v6),
            IpAddr::V4(_) => None,
        },
        mac: Some(mac),
        verify: options.verify_checksums,
    };
    let queues = rx_queues(socket, interface);
    let attached = Arc::new(attach(interface, &target, queues, options.mode)?);
    let mut opened = Vec::new();
    for q in 0..queues {
        let settings = queue::Settings {
            interface: interface.to_owned(),
            target,
            max_datagram: options.max_datagram,
            batch: options.batch,
            max_frame: frame::ETH_LEN.saturating_add(mtu as usize),
            tos: options.tos,
            not_sources: host.not_sources.clone(),
        };
        let queue = Queue::new(attached.ifindex, q, options.spec, settings).map_err(|e| {
            explain(
                &format!("opening an AF_XDP socket on queue {q}"),
                interface,
                e,
            )
        })?;
        bpf::xskmap_set(&attached.map, q, queue.xsk().raw_fd())
            .map_err(|e| explain("filling the XSKMAP", interface, e))?;
        opened.push(XdpQueue {
            queue,
            attached: attached.clone(),
        });
    }
    Ok((attached, opened))
}

/// One receive queue's AF_XDP socket, ready for a worker; it keeps the
/// program attached while it lives.
#[derive(Debug)]
pub(crate) struct XdpQueue {
    queue: Queue,
    attached: Arc<Attached>,
}

impl XdpQueue {
    /// Where the program runs.
    pub(crate) fn mode(&self) -> XdpMode {
        self.attached.mode
    }
}

/// A worker's receive source on an XDP queue: its AF_XDP socket, and the
/// kernel socket bound to the server's address, which gets what the
/// program passes (fragments, IP options, extension headers) and sends
/// replies too large for a frame.
pub(crate) struct XdpSource {
    queue: XdpQueue,
    kernel: One,
    /// The last receive came from the kernel socket.
    from_kernel: bool,
    /// Receives from the AF_XDP socket since the kernel socket was last
    /// looked at.
    since_kernel: u32,
    /// Busy receives since the interface's MTU was last read.
    since_mtu: u32,
}

/// How many busy receives may go by before the interface's MTU is read
/// again (it is also read whenever the worker is idle): a change of MTU
/// at run time reaches the replies within this many batches.
const MTU_EVERY: u32 = 4096;

/// How many receives from a busy AF_XDP socket may go by before the kernel
/// socket is looked at anyway, so that what the program passes to the
/// kernel for the server (fragments, IP options) is not starved by a
/// flood on the fast path: one system call per this many batches.
const KERNEL_EVERY: u32 = 64;

impl XdpSource {
    pub(crate) fn new(queue: XdpQueue, max_datagram: usize, control: Control) -> XdpSource {
        XdpSource {
            queue,
            kernel: One::new(max_datagram, control),
            from_kernel: false,
            since_kernel: 0,
            since_mtu: 0,
        }
    }

    /// Takes what the AF_XDP socket holds, up to a batch; else waits for
    /// it or for the kernel socket (up to [`WAKE_INTERVAL`], not at all
    /// with `dont_wait`) and takes a datagram from the kernel socket if
    /// that is what came. The kernel socket is only read when `poll` says
    /// it has something, so a busy queue costs no system call but the
    /// replies' send. Returns 0 when the wait ended with nothing (the
    /// worker then looks whether the server is stopping); with
    /// `dont_wait`, `WouldBlock` instead.
    pub(crate) fn recv(&mut self, socket: &Socket, dont_wait: bool) -> io::Result<usize> {
        self.from_kernel = false;
        if self.since_kernel >= KERNEL_EVERY {
            self.since_kernel = 0;
            if let Some(n) = self.take_kernel_datagram(socket)? {
                return Ok(n);
            }
        }
        let taken = self.queue.queue.take();
        if taken > 0 {
            self.since_kernel += 1;
            self.since_mtu += 1;
            if self.since_mtu >= MTU_EVERY {
                self.since_mtu = 0;
                self.queue.queue.refresh_mtu(socket);
            }
            return Ok(taken);
        }
        let timeout = if dont_wait {
            Duration::ZERO
        } else {
            WAKE_INTERVAL
        };
        let (_, kernel_ready) = self.queue.queue.wait(Some(socket.as_raw_fd()), timeout)?;
        if kernel_ready {
            if let Some(n) = self.take_kernel_datagram(socket)? {
                return Ok(n);
            }
        }
        match self.queue.queue.take() {
            0 if dont_wait => Err(io::ErrorKind::WouldBlock.into()),
            0 => {
                // Idle: a good moment to see whether the MTU changed.
                self.since_mtu = 0;
                self.queue.queue.refresh_mtu(socket);
                Ok(0)
            }
            taken => Ok(taken),
        }
    }

    /// A datagram from the kernel socket, if one is queued.
    fn take_kernel_datagram(&mut self, socket: &Socket) -> io::Result<Option<usize>> {
        self.since_kernel = 0;
        match self.kernel.recv(socket, true) {
            Ok(0) => Ok(None),
            Ok(n) => {
                self.from_kernel = true;
                Ok(Some(n))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub(crate) fn datagram(&mut self, i: usize) -> Option<(Received<'_>, &mut Vec<u8>)> {
        match self.from_kernel {
            true => self.kernel.datagram(i),
            false => self.queue.queue.datagram(i),
        }
    }

    pub(crate) fn queue_reply(&mut self, i: usize, counted: bool) {
        match self.from_kernel {
            true => self.kernel.queue_reply(i, counted),
            false => self.queue.queue.queue_reply(i, counted),
        }
    }

    pub(crate) fn queued(&self) -> usize {
        match self.from_kernel {
            true => self.kernel.queued(),
            false => self.queue.queue.queued(),
        }
    }

    pub(crate) fn send(&mut self, socket: &Socket) -> (u64, u64) {
        if self.from_kernel {
            return self.kernel.send(socket);
        }
        let mut fallback = |reply: &[u8], to: SocketAddr| {
            super::super::send_blocking(socket, || socket.send_to(reply, &to.into())).map(drop)
        };
        self.queue.queue.send(socket, &mut fallback)
    }

    pub(crate) fn drop_queued(&mut self) -> u64 {
        match self.from_kernel {
            true => self.kernel.drop_queued(),
            false => self.queue.queue.drop_queued(),
        }
    }

    pub(crate) fn take_error(&mut self) -> Option<io::Error> {
        self.queue
            .queue
            .take_error()
            .or_else(|| self.kernel.take_error())
    }

    pub(crate) fn take_rejected(&mut self) -> u64 {
        self.queue.queue.take_rejected()
    }

    pub(crate) fn kernel_drops(&self) -> Option<u64> {
        self.queue.queue.kernel_drops()
    }
}

/// How long attaching waits for a program that is being detached.
const ATTACH_BUSY_WAIT: Duration = Duration::from_secs(1);

/// The program's licence, as the kernel reads it: the helper it calls is
/// not GPL-only.
const LICENSE: &CStr = c"MIT OR Apache-2.0";

/// The program attached to an interface, with its `XSKMAP`. Dropping it
/// detaches the program (it closes the link); so does the process's end,
/// however it ends, and [`Attached::detach`].
#[derive(Debug)]
pub(crate) struct Attached {
    /// The program is attached while it is open.
    link: Mutex<Option<OwnedFd>>,
    map: OwnedFd,
    mode: XdpMode,
    ifindex: u32,
}

impl Attached {
    /// Detaches the program now, though workers still hold the AF_XDP
    /// sockets (a shutdown that gave up on a handler that never returns):
    /// the interface then gives the kernel everything again.
    pub(crate) fn detach(&self) {
        let link = self.link.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(link);
    }
}

#[cfg(test)]
impl Attached {
    /// Where the program runs.
    pub(crate) fn mode(&self) -> XdpMode {
        self.mode
    }
}

/// The operating system's error code of `err`, or of the error it wraps
/// with context (`xsk`'s).
fn os_code(err: &io::Error) -> Option<i32> {
    err.raw_os_error().or_else(|| {
        err.get_ref()?
            .downcast_ref::<xsk::Context>()?
            .source
            .raw_os_error()
    })
}

/// What a failure to attach was doing, and what to do about it.
fn explain(step: &str, interface: &str, err: io::Error) -> io::Error {
    let busy_queue = step.starts_with("opening an AF_XDP socket");
    let hint = match os_code(&err) {
        Some(libc::EBUSY) if busy_queue => {
            ": another AF_XDP socket holds this receive queue (another server on it?)"
        }
        Some(libc::EPERM | libc::EACCES) => {
            ": this needs root, or CAP_BPF, CAP_NET_ADMIN and CAP_NET_RAW"
        }
        Some(libc::ENOSYS) => ": this kernel has no bpf() system call (or it is filtered)",
        Some(libc::ENODEV) => ": there is no such interface",
        Some(libc::EBUSY | libc::EEXIST) => {
            ": another XDP program is attached to it; detach it first"
        }
        Some(libc::EOPNOTSUPP) => ": the driver does not support this XDP mode",
        _ => "",
    };
    io::Error::new(err.kind(), format!("{step} on {interface}: {err}{hint}"))
}

/// Builds the program for `target`, loads it, and attaches it to
/// `interface` with `queues` receive queues: in `mode`, or natively where
/// the driver can and generically where it cannot (`None`).
pub(crate) fn attach(
    interface: &str,
    target: &Target,
    queues: u32,
    mode: Option<XdpMode>,
) -> io::Result<Attached> {
    let ifindex =
        bpf::ifindex(interface).map_err(|e| explain("finding the interface", interface, e))?;
    let map = bpf::xskmap(queues.max(1), "udpgreet_xsks")
        .map_err(|e| explain("creating the XSKMAP", interface, e))?;
    let insns = program::udp_redirect(
        map.as_raw_fd(),
        target.port,
        target.v4,
        target.v6,
        target.mac,
    );
    let prog = bpf::load_xdp(&insns, "udpgreet_xdp", LICENSE).map_err(|(err, log)| {
        let err = explain("loading the XDP program", interface, err);
        match log.trim() {
            "" => err,
            log => io::Error::new(err.kind(), format!("{err}; the verifier said: {log}")),
        }
    })?;
    let modes: &[XdpMode] = match mode {
        Some(XdpMode::Native) => &[XdpMode::Native],
        Some(XdpMode::Generic) => &[XdpMode::Generic],
        None => &[XdpMode::Native, XdpMode::Generic],
    };
    let mut last = None;
    // A program being detached (the last server's link, whose descriptor
    // a process forked a moment ago still holds until its exec) is waited
    // for, briefly; another server's is not going anywhere.
    let busy_until = std::time::Instant::now() + ATTACH_BUSY_WAIT;
    for &mode in modes {
        let attached = loop {
            match bpf::attach_xdp(&prog, ifindex, mode) {
                Err(err)
                    if matches!(err.raw_os_error(), Some(libc::EBUSY | libc::EEXIST))
                        && std::time::Instant::now() < busy_until =>
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
                other => break other,
            }
        };
        match attached {
            Ok(link) => {
                return Ok(Attached {
                    link: Mutex::new(Some(link)),
                    map,
                    mode,
                    ifindex,
                });
            }
            // Only a driver without native XDP falls back to generic.
            Err(err) if err.raw_os_error() == Some(libc::EOPNOTSUPP) => last = Some(err),
            Err(err) => return Err(explain("attaching the XDP program", interface, err)),
        }
    }
    let err = last.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EOPNOTSUPP));
    Err(explain("attaching the XDP program", interface, err))
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
    use std::process::Command;
    use std::sync::mpsc;
    use std::thread;
    use std::time::Duration;

    use super::*;

    /// How long a step of the namespace test may take before it fails.
    const GUARD: Duration = Duration::from_secs(30);

    fn ip(args: &[&str]) -> Result<(), String> {
        let out = Command::new("ip")
            .args(args)
            .output()
            .map_err(|e| format!("cannot run `ip` (install iproute2): {e}"))?;
        match out.status.success() {
            true => Ok(()),
            false => Err(format!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )),
        }
    }

    type Job = Box<dyn FnOnce() -> Result<(), String> + Send>;

    /// A thread in a network namespace of its own, which runs what it is
    /// given there; the namespace goes with the thread.
    struct Netns {
        jobs: mpsc::Sender<(Job, mpsc::Sender<Result<(), String>>)>,
        tid: u32,
    }

    impl Netns {
        fn new() -> Result<Netns, String> {
            let (jobs, inbox) = mpsc::channel::<(Job, mpsc::Sender<Result<(), String>>)>();
            let (tid_tx, tid_rx) = mpsc::channel();
            thread::spawn(move || {
                let entered = bpf::enter_new_netns()
                    .map_err(|e| format!("unshare(CLONE_NEWNET): {e} (needs root)"));
                let ok = entered.is_ok();
                let _ = tid_tx.send(entered);
                while let (true, Ok((job, done))) = (ok, inbox.recv()) {
                    let _ = done.send(job());
                }
            });
            let tid = tid_rx.recv_timeout(GUARD).map_err(|e| e.to_string())??;
            Ok(Netns { jobs, tid })
        }

        fn run(
            &self,
            job: impl FnOnce() -> Result<(), String> + Send + 'static,
        ) -> Result<(), String> {
            let (done, result) = mpsc::channel();
            self.jobs
                .send((Box::new(job), done))
                .map_err(|e| e.to_string())?;
            result
                .recv_timeout(GUARD)
                .map_err(|e| format!("namespace job: {e}"))?
        }
    }

    #[test]
    #[ignore = "needs root and iproute2: run by .ci/run"]
    fn the_program_passes_the_verifier_and_detaches_when_dropped() {
        let outcome = (|| -> Result<(), String> {
            let (server, client) = (Netns::new()?, Netns::new()?);
            let client_tid = client.tid.to_string();
            server.run(move || {
                ip(&["link", "add", "xs0", "type", "veth", "peer", "name", "xc0"])?;
                ip(&["link", "set", "xc0", "netns", &client_tid])?;
                ip(&["addr", "add", "198.18.0.1/24", "dev", "xs0"])?;
                ip(&["link", "set", "xs0", "up"])
            })?;
            client.run(|| {
                ip(&["addr", "add", "198.18.0.2/24", "dev", "xc0"])?;
                ip(&["link", "set", "xc0", "up"])
            })?;
            let (addr_tx, addr_rx) = mpsc::channel();
            let (go_tx, go_rx) = mpsc::channel::<()>();
            let (seen_tx, seen_rx) = mpsc::channel();
            // The server's side: a kernel socket, and the program attached
            // with its XSKMAP empty, so that every frame passes.
            let serving = thread::spawn(move || -> Result<(), String> {
                let job = move || -> Result<(), String> {
                    let socket = UdpSocket::bind("198.18.0.1:0").map_err(|e| e.to_string())?;
                    socket
                        .set_read_timeout(Some(GUARD))
                        .map_err(|e| e.to_string())?;
                    let port = socket.local_addr().map_err(|e| e.to_string())?.port();
                    let target = Target {
                        port,
                        v4: Some(Ipv4Addr::new(198, 18, 0, 1)),
                        v6: None,
                        mac: None,
                        verify: false,
                    };
                    let attached = attach("xs0", &target, 1, None).map_err(|e| e.to_string())?;
                    // veth has native XDP.
                    if attached.mode() != XdpMode::Native {
                        return Err(format!("attached in {:?}", attached.mode()));
                    }
                    // A second program cannot be attached while it is.
                    match attach("xs0", &target, 1, Some(XdpMode::Generic)) {
                        Err(err) if err.to_string().contains("another XDP program") => {}
                        other => return Err(format!("a second attach: {other:?}")),
                    }
                    let _ = addr_tx.send(port);
                    // ARP and the datagram pass to the kernel.
                    let mut buf = [0u8; 64];
                    let (n, from) = socket.recv_from(&mut buf).map_err(|e| e.to_string())?;
                    let _ = seen_tx.send((buf[..n].to_vec(), from));
                    let _ = go_rx.recv_timeout(GUARD);
                    drop(attached);
                    // Detached: it attaches again, in the other mode.
                    let again = attach("xs0", &target, 1, Some(XdpMode::Generic))
                        .map_err(|e| format!("after the drop: {e}"))?;
                    if again.mode() != XdpMode::Generic {
                        return Err(format!("attached again in {:?}", again.mode()));
                    }
                    Ok(())
                };
                server.run(job)
            });
            let port = addr_rx
                .recv_timeout(GUARD)
                .map_err(|e| format!("no attach: {e}"))?;
            client.run(move || {
                let socket = UdpSocket::bind("198.18.0.2:0").map_err(|e| e.to_string())?;
                socket
                    .send_to(b"through", SocketAddr::from(([198, 18, 0, 1], port)))
                    .map(drop)
                    .map_err(|e| e.to_string())
            })?;
            let seen = seen_rx
                .recv_timeout(GUARD)
                .map_err(|e| format!("nothing passed: {e}"));
            let _ = go_tx.send(());
            let served = serving
                .join()
                .map_err(|_| "the server's thread panicked".to_owned())?;
            served?;
            let (data, from) = seen?;
            if data != b"through" || from.ip() != Ipv4Addr::new(198, 18, 0, 2) {
                return Err(format!("the kernel socket got {data:?} from {from}"));
            }
            Ok(())
        })();
        if let Err(why) = outcome {
            panic!("{why}");
        }
    }
}
