//! Two network namespaces joined by a veth pair, made by a test or bench
//! and gone with its threads: `xs0` (198.18.0.1, 2001:2::1, the server's
//! side) and `xc0` (198.18.0.2, 2001:2::2), addresses from the
//! benchmarking ranges. Needs root and iproute2.
#![allow(dead_code)] // each user takes its own subset

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

/// How long a job in a namespace may take.
pub const GUARD: Duration = Duration::from_secs(30);
pub const SERVER_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 2);
pub const SERVER_MAC: [u8; 6] = [0x02, 0x75, 0x67, 0, 0, 1];
pub const CLIENT_MAC: [u8; 6] = [0x02, 0x75, 0x67, 0, 0, 2];

pub fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip` (install iproute2): {e}"))?;
    match out.status.success() {
        true => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
        false => Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// A thread in a network namespace of its own, which runs what it is given
/// there (threads and processes it starts are in the namespace too). The
/// namespace, and the veth end in it, go with the thread.
pub struct Netns {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<thread::JoinHandle<()>>,
    pub tid: u32,
}

impl Netns {
    pub fn new() -> Result<Netns, String> {
        let (jobs, inbox) = mpsc::channel::<Job>();
        let (tid_tx, tid_rx) = mpsc::channel();
        let thread = thread::spawn(move || {
            // SAFETY: `unshare` takes a flag word and touches no memory; with
            // CLONE_NEWNET it moves only this thread to a new namespace.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            // SAFETY: `gettid` takes nothing.
            let tid = unsafe { libc::syscall(libc::SYS_gettid) };
            let entered = match rc {
                0 => Ok(tid as u32),
                _ => Err(format!(
                    "unshare(CLONE_NEWNET): {} (this test needs root)",
                    io::Error::last_os_error()
                )),
            };
            let ok = entered.is_ok();
            let _ = tid_tx.send(entered);
            while let (true, Ok(job)) = (ok, inbox.recv()) {
                job();
            }
        });
        let tid = tid_rx
            .recv_timeout(GUARD)
            .map_err(|e| format!("namespace thread: {e}"))??;
        Ok(Netns {
            jobs: Some(jobs),
            thread: Some(thread),
            tid,
        })
    }

    /// Runs `job` in the namespace and returns what it returned.
    pub fn run<T: Send + 'static>(&self, job: impl FnOnce() -> T + Send + 'static) -> T {
        let (done, result) = mpsc::channel();
        let job: Job = Box::new(move || {
            let _ = done.send(job());
        });
        self.jobs
            .as_ref()
            .expect("the namespace thread")
            .send(job)
            .expect("the namespace thread");
        result.recv_timeout(GUARD).expect("a namespace job in time")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The server's namespace and the client's, joined by a veth pair:
/// `xs0` (198.18.0.1, 2001:2::1) and `xc0` (198.18.0.2, 2001:2::2), with
/// fixed MAC addresses.
pub struct Pair {
    pub server: Netns,
    pub client: Netns,
}

pub fn pair() -> Pair {
    let (server, client) = match (Netns::new(), Netns::new()) {
        (Ok(s), Ok(c)) => (s, c),
        (Err(e), _) | (_, Err(e)) => panic!("{e}"),
    };
    let client_tid = client.tid.to_string();
    let made = server.run(move || -> Result<(), String> {
        ip(&["link", "set", "lo", "up"])?;
        ip(&["link", "add", "xs0", "type", "veth", "peer", "name", "xc0"])?;
        ip(&["link", "set", "xc0", "netns", &client_tid])?;
        ip(&["link", "set", "xs0", "address", "02:75:67:00:00:01"])?;
        ip(&["addr", "add", "198.18.0.1/24", "dev", "xs0"])?;
        ip(&["-6", "addr", "add", "2001:2::1/64", "dev", "xs0", "nodad"])?;
        ip(&["link", "set", "xs0", "up"])?;
        Ok(())
    });
    made.unwrap_or_else(|e| panic!("{e}"));
    let made = client.run(|| -> Result<(), String> {
        ip(&["link", "set", "lo", "up"])?;
        ip(&["link", "set", "xc0", "address", "02:75:67:00:00:02"])?;
        ip(&["addr", "add", "198.18.0.2/24", "dev", "xc0"])?;
        ip(&["-6", "addr", "add", "2001:2::2/64", "dev", "xc0", "nodad"])?;
        ip(&["link", "set", "xc0", "up"])?;
        // Neighbours known up front: no discovery in the way of the
        // forged frames.
        ip(&[
            "neigh",
            "replace",
            "198.18.0.1",
            "lladdr",
            "02:75:67:00:00:01",
            "dev",
            "xc0",
        ])?;
        ip(&[
            "-6",
            "neigh",
            "replace",
            "2001:2::1",
            "lladdr",
            "02:75:67:00:00:01",
            "dev",
            "xc0",
        ])?;
        Ok(())
    });
    made.unwrap_or_else(|e| panic!("{e}"));
    Pair { server, client }
}

/// The datagrams the kernel's UDP stack delivered to sockets in the
/// calling thread's namespace, IPv4 and IPv6: what the XDP path bypasses.
pub fn kernel_udp_in() -> u64 {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let snmp = read("/proc/thread-self/net/snmp");
    let mut lines = snmp.lines().filter(|l| l.starts_with("Udp: "));
    let v4 = match (lines.next(), lines.next()) {
        (Some(names), Some(values)) => names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(name, _)| *name == "InDatagrams")
            .and_then(|(_, value)| value.parse::<u64>().ok())
            .unwrap_or(0),
        _ => 0,
    };
    let v6 = read("/proc/thread-self/net/snmp6")
        .lines()
        .find_map(|l| l.strip_prefix("Udp6InDatagrams"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    v4 + v6
}
