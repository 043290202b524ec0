//! Socket activation and service notification, in systemd's protocol
//! (feature `systemd`, Unix): the sockets a service manager passes
//! ([`Activated`]), and what a server tells it
//! ([`ServerBuilder::notify_service_manager`](crate::ServerBuilder::notify_service_manager)).
//!
//! The passed descriptors (`LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES`)
//! are read by the [`sd-notify`](https://docs.rs/sd-notify) crate. The
//! messages are sent here, without ever waiting on the manager (which
//! `sd-notify`'s sender does), to a path or an abstract name (`@name`,
//! Linux) in `NOTIFY_SOCKET`; `WATCHDOG_USEC` and `WATCHDOG_PID` are read
//! as `sd_watchdog_enabled` reads them.
//!
//! # Examples
//!
//! A service started by systemd with a socket unit of `ListenDatagram=53`
//! (twice, for IPv4 and IPv6, `FileDescriptorName=dns`):
//!
//! ```no_run
//! use udp_greet::GreetServer;
//! use udp_greet::systemd::Activated;
//!
//! fn main() -> Result<(), udp_greet::Error> {
//!     let mut activated = Activated::take()?;
//!     let sockets = activated.take_udp(Some("dns"));
//!     let server = GreetServer::builder()
//!         .notify_service_manager(true)
//!         .from_std_all(sockets)?;
//!     server.serve(udp_greet::greet)?;
//!     Ok(())
//! }
//! ```

use std::fmt;
use std::io;
use std::net::UdpSocket;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use socket2::{Socket, Type};

use crate::control::Shared;
use crate::error::Error;
use crate::sys;

/// The descriptors of this process were taken: they are taken once.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// The sockets a service manager passed to this process (socket
/// activation), each with its name (`FileDescriptorName=` in a systemd
/// socket unit; `unknown` when the manager gives none), in the order passed.
///
/// Take the UDP ones for a server with [`take_udp`](Activated::take_udp)
/// and serve them with
/// [`ServerBuilder::from_std_all`](crate::ServerBuilder::from_std_all):
/// a socket passed this way keeps the address, and the options, its
/// socket unit gave it. The server never shuts such a socket down (the
/// manager holds it too, and serves it to the next instance): its receive
/// workers wake every 50 ms to see whether the server is stopping.
/// Descriptors of other kinds (a TCP socket beside them, a FIFO) stay in
/// [`into_rest`](Activated::into_rest).
pub struct Activated {
    passed: Vec<(String, OwnedFd)>,
}

impl fmt::Debug for Activated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.passed.iter().map(|(name, fd)| (name, fd)))
            .finish()
    }
}

impl Activated {
    /// Takes the descriptors passed to this process: the `LISTEN_FDS`
    /// descriptors from 3 on, if `LISTEN_PID` is this process (otherwise,
    /// or without the variables, there are none, and the set is empty), with
    /// their names from `LISTEN_FDNAMES`. They are marked close-on-exec.
    ///
    /// The descriptors are taken once per process: a second call after one
    /// that succeeded fails rather than hand out the same descriptors
    /// again. The variables are left as they are (changing the environment
    /// of a running program is not safe), so a child process does not
    /// inherit the sockets' meaning: `LISTEN_PID` names this process only.
    ///
    /// # Errors
    ///
    /// [`Error::Activation`] when the variables are malformed or a
    /// descriptor is not open (its source says which); [`Error::InvalidConfig`]
    /// when the descriptors were taken already.
    pub fn take() -> Result<Activated, Error> {
        if TAKEN.swap(true, Ordering::AcqRel) {
            return Err(Error::invalid(
                "systemd::Activated::take",
                "the sockets passed to this process were taken already: take them once",
            ));
        }
        let taken = Self::read();
        if taken.is_err() {
            // Nothing was taken: a later call may try again.
            TAKEN.store(false, Ordering::Release);
        }
        taken
    }

    fn read() -> Result<Activated, Error> {
        let failed = |source| Error::Activation {
            what: "read LISTEN_FDS, LISTEN_PID and LISTEN_FDNAMES",
            source,
        };
        // No descriptor: no names to match (LISTEN_FDNAMES may be empty).
        if sd_notify::listen_fds().map_err(failed)?.len() == 0 {
            return Ok(Activated { passed: Vec::new() });
        }
        let passed = sd_notify::listen_fds_with_names()
            .map_err(failed)?
            .map(|(fd, name)| (name, sys::inherited_fd(fd)))
            .collect();
        Ok(Activated { passed })
    }

    /// How many descriptors are left.
    #[must_use]
    pub fn len(&self) -> usize {
        self.passed.len()
    }

    /// Whether no descriptor is left (none was passed, or all were taken).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.passed.is_empty()
    }

    /// The names of the descriptors left, in the order passed.
    #[must_use]
    pub fn names(&self) -> Vec<&str> {
        self.passed.iter().map(|(name, _)| name.as_str()).collect()
    }

    /// Takes the UDP sockets (bound IPv4 or IPv6 datagram sockets, UDP by
    /// protocol where the system says) named `name`, or every UDP socket
    /// with `None`, in the order passed.
    pub fn take_udp(&mut self, name: Option<&str>) -> Vec<UdpSocket> {
        let mut taken = Vec::new();
        let mut rest = Vec::new();
        for (named, fd) in std::mem::take(&mut self.passed) {
            if name.is_none_or(|name| name == named) && is_udp(&fd) {
                taken.push(UdpSocket::from(fd));
            } else {
                rest.push((named, fd));
            }
        }
        self.passed = rest;
        taken
    }

    /// The descriptors left, with their names.
    #[must_use]
    pub fn into_rest(self) -> Vec<(String, OwnedFd)> {
        self.passed
    }
}

/// Whether `fd` is a bound UDP socket over IPv4 or IPv6.
fn is_udp(fd: &OwnedFd) -> bool {
    let Ok(socket) = fd.try_clone().map(Socket::from) else {
        return false;
    };
    let datagram = socket.r#type().is_ok_and(|kind| kind == Type::DGRAM);
    let bound = socket
        .local_addr()
        .ok()
        .and_then(|addr| addr.as_socket())
        .is_some_and(|addr| addr.port() != 0);
    datagram && bound && crate::socket::check_udp(&socket).unwrap_or(false)
}

/// Where notifications go (`NOTIFY_SOCKET`): a path, or an abstract name
/// (`@name`, Linux).
#[derive(Debug)]
enum NotifySocket {
    Path(std::path::PathBuf),
    #[cfg(any(target_os = "linux", target_os = "android"))]
    Abstract(Vec<u8>),
}

impl NotifySocket {
    fn from_env() -> Option<NotifySocket> {
        let value = std::env::var_os("NOTIFY_SOCKET")?;
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            use std::os::unix::ffi::OsStrExt;
            if let Some(name) = value.as_bytes().strip_prefix(b"@") {
                return Some(NotifySocket::Abstract(name.to_vec()));
            }
        }
        (!value.is_empty()).then(|| NotifySocket::Path(value.into()))
    }

    /// Sends `message` without waiting: a manager whose queue is full, or
    /// that has gone, loses it.
    fn send(&self, message: &str) -> io::Result<()> {
        let socket = UnixDatagram::unbound()?;
        socket.set_nonblocking(true)?;
        match self {
            NotifySocket::Path(path) => socket.connect(path)?,
            #[cfg(any(target_os = "linux", target_os = "android"))]
            NotifySocket::Abstract(name) => {
                #[cfg(target_os = "android")]
                use std::os::android::net::SocketAddrExt;
                #[cfg(target_os = "linux")]
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                socket.connect_addr(&addr)?;
            }
        }
        socket.send(message.as_bytes()).map(drop)
    }
}

/// The watchdog's interval, as `sd_watchdog_enabled` reads it: from
/// `WATCHDOG_USEC`, unless `WATCHDOG_PID` is set and is not this process
/// (or is not a number).
fn watchdog_from_env() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Some(pid) = std::env::var_os("WATCHDOG_PID") {
        let pid: u32 = pid.to_str()?.parse().ok()?;
        if pid != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Where the server is in the messages it sends: the one `READY=1`, then
/// the one `STOPPING=1`, never the other way round.
const STARTING: u8 = 0;
const READY: u8 = 1;
const STOPPING: u8 = 2;

/// What a server tells its service manager (`NOTIFY_SOCKET`), and the
/// health its watchdog pings stand for.
#[derive(Debug)]
pub(crate) struct Service {
    socket: Option<NotifySocket>,
    /// The watchdog's interval (`WATCHDOG_USEC`), if it is on.
    watchdog: Option<Duration>,
    /// Receive workers that have not yet begun to receive.
    starting: AtomicUsize,
    /// `STARTING`, `READY` or `STOPPING`; held while a message is sent, so
    /// that the messages leave in that order.
    phase: Mutex<u8>,
    /// Each receive worker's health, by counter slot, and its thread name.
    workers: Box<[Health]>,
    /// The watchdog thread, to wake at shutdown.
    watcher: OnceLock<Thread>,
    epoch: Instant,
}

/// One receive worker's health, as the watchdog reads it.
#[derive(Debug, Default)]
struct Health {
    name: String,
    /// `NOT_YET` (has not begun to receive), `WAITING` (in a receive, or
    /// for the socket to be readable: alive however long nothing comes),
    /// `WORKING` or `ENDED`.
    state: AtomicU8,
    /// When it last made progress (nanoseconds since `Service::epoch`).
    beat: AtomicU64,
}

const NOT_YET: u8 = 0;
const WORKING: u8 = 1;
const WAITING: u8 = 2;
const ENDED: u8 = 3;

/// A worker that has been working (not waiting for datagrams) this long,
/// in parts of the watchdog's interval, withholds the pings: half.
const STUCK_AFTER: u32 = 2;
/// The watchdog checks (and pings) four times an interval, and at least
/// every [`MIN_TICK`] apart: a ping withheld once is followed by the next
/// within half the interval of the last.
const TICKS: u32 = 4;
const MIN_TICK: Duration = Duration::from_millis(5);

impl Service {
    /// For a server whose receive workers (counter slots `0..names.len()`)
    /// have the thread names `names`, with the manager's socket and the
    /// watchdog's setting from the environment.
    pub(crate) fn from_env(names: Vec<String>) -> Service {
        Service {
            socket: NotifySocket::from_env(),
            watchdog: watchdog_from_env(),
            starting: AtomicUsize::new(names.len()),
            phase: Mutex::new(STARTING),
            workers: names
                .into_iter()
                .map(|name| Health {
                    name,
                    ..Health::default()
                })
                .collect(),
            watcher: OnceLock::new(),
            epoch: Instant::now(),
        }
    }

    fn notify(&self, message: &str) {
        if let Some(socket) = &self.socket {
            // A manager that does not take the message (gone, or its queue
            // full) is no reason to stop or slow serving.
            let _ = socket.send(message);
        }
    }

    fn phase(&self) -> std::sync::MutexGuard<'_, u8> {
        self.phase.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A receive worker is about to receive for the first time; the last
    /// of them tells the manager the server is ready (unless it is
    /// stopping already).
    pub(crate) fn started(&self) {
        let before = self
            .starting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        if before == Ok(1) {
            let mut phase = self.phase();
            if *phase == STARTING {
                *phase = READY;
                self.notify("READY=1\n");
            }
        }
    }

    /// The server is shutting down: tells the manager, and ends the
    /// watchdog.
    pub(crate) fn stopping(&self) {
        {
            let mut phase = self.phase();
            if *phase != STOPPING {
                *phase = STOPPING;
                self.notify("STOPPING=1\n");
            }
        }
        if let Some(watcher) = self.watcher.get() {
            watcher.unpark();
        }
    }

    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Worker `slot` made progress at `now`; `waiting`: it is about to wait
    /// for datagrams.
    pub(crate) fn beat(&self, slot: usize, now: Instant, waiting: bool) {
        if let Some(health) = self.workers.get(slot) {
            health.beat.store(self.nanos(now), Ordering::Relaxed);
            let state = if waiting { WAITING } else { WORKING };
            health.state.store(state, Ordering::Release);
        }
    }

    /// Worker `slot` is about to wait for datagrams (alive, however long
    /// nothing comes).
    pub(crate) fn waiting(&self, slot: usize) {
        if let Some(health) = self.workers.get(slot) {
            health.state.store(WAITING, Ordering::Release);
        }
    }

    /// Worker `slot` has ended (or its task was dropped).
    pub(crate) fn ended(&self, slot: usize) {
        if let Some(health) = self.workers.get(slot) {
            health.state.store(ENDED, Ordering::Release);
        }
    }

    /// Why the pings are withheld at `now`, if they are: a receive worker
    /// that has ended, or that has been working longer than `within`. One
    /// that has not begun to receive is neither (the pings wait for
    /// `READY=1`, which waits for every worker).
    fn stuck(&self, now: Instant, within: Duration) -> Option<String> {
        let now = self.nanos(now);
        let within = u64::try_from(within.as_nanos()).unwrap_or(u64::MAX);
        self.workers
            .iter()
            .find_map(|health| match health.state.load(Ordering::Acquire) {
                NOT_YET => None,
                ENDED => Some(format!("receive worker {} has ended", health.name)),
                WORKING if now.saturating_sub(health.beat.load(Ordering::Relaxed)) > within => {
                    Some(format!(
                        "receive worker {} has been in one handler call or batch for over {:?}",
                        health.name,
                        Duration::from_nanos(within)
                    ))
                }
                _ => None,
            })
    }

    /// Starts the watchdog thread, named `name`, if the manager asked for
    /// pings (see `ServerBuilder::notify_service_manager`). It ends when
    /// the server stops.
    pub(crate) fn start_watchdog(shared: &Arc<Shared>, name: String) -> Result<(), Error> {
        let Some(service) = shared.service.as_ref() else {
            return Ok(());
        };
        let Some(interval) = service.watchdog else {
            return Ok(());
        };
        let weak: Weak<Shared> = Arc::downgrade(shared);
        let addr = shared
            .local_addrs()
            .first()
            .copied()
            .unwrap_or(std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
        let thread = thread::Builder::new()
            .name(name)
            .spawn(move || watch(&weak, interval))
            .map_err(|source| Error::Spawn { addr, source })?;
        let _ = service.watcher.set(thread.thread().clone());
        if shared.is_stopped() {
            thread.thread().unpark();
        }
        Ok(())
    }
}

/// The watchdog thread's loop (see [`Service::start_watchdog`]).
fn watch(shared: &Weak<Shared>, interval: Duration) {
    let tick = (interval / TICKS).max(MIN_TICK);
    let stuck_after = interval / STUCK_AFTER;
    let mut withheld = false;
    loop {
        thread::park_timeout(tick);
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let Some(service) = shared.service.as_ref() else {
            return;
        };
        if shared.is_stopped() {
            return;
        }
        // The manager's watchdog runs from the end of start-up (`READY=1`);
        // before it, there is nothing to ping or withhold.
        if *service.phase() == STARTING {
            continue;
        }
        match service.stuck(Instant::now(), stuck_after) {
            None if withheld => {
                service.notify("STATUS=serving\nWATCHDOG=1\n");
                withheld = false;
            }
            None => service.notify("WATCHDOG=1\n"),
            Some(why) if !withheld => {
                service.notify(&format!("STATUS={why}: watchdog pings withheld\n"));
                withheld = true;
            }
            Some(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_is_stuck_only_when_neither_waiting_nor_beating() {
        let service = Service::from_env(vec!["udp:1/0".to_owned(), "udp:2/0".to_owned()]);
        let start = service.epoch;
        let within = Duration::from_millis(100);
        // Not yet receiving, however long: not stuck.
        assert_eq!(service.stuck(start + within * 100, within), None);
        service.beat(0, start, true);
        service.beat(1, start, false);
        // Just begun: nobody stuck.
        assert_eq!(service.stuck(start + within, within), None);
        // Worker 1 busy past the limit; worker 0 waits, however long.
        let later = start + within * 3;
        let why = service.stuck(later, within).expect("stuck");
        assert!(
            why.starts_with("receive worker udp:2/0 has been in one handler"),
            "{why}"
        );
        service.beat(1, later, false);
        assert_eq!(service.stuck(later + within / 2, within), None);
        // Out-of-range slots and instants before the epoch change nothing.
        service.beat(7, later, false);
        service.ended(7);
        let before = start.checked_sub(Duration::from_millis(1)).unwrap_or(start);
        service.beat(1, before, true);
        assert_eq!(service.stuck(later, within), None);
        assert_eq!(service.stuck(later, Duration::MAX), None);
        // A worker that has ended withholds the pings, however recent.
        service.ended(0);
        let why = service.stuck(later, Duration::MAX).expect("ended");
        assert_eq!(why, "receive worker udp:1/0 has ended");
    }

    #[test]
    fn ready_never_follows_stopping() {
        let service = Service::from_env(vec!["udp:1/0".to_owned()]);
        service.stopping();
        service.started();
        assert_eq!(*service.phase(), STOPPING);
        let service = Service::from_env(vec!["udp:1/0".to_owned(), "udp:1/1".to_owned()]);
        service.started();
        assert_eq!(*service.phase(), STARTING);
        service.started();
        assert_eq!(*service.phase(), READY);
        // More starts than workers (a restarted task) change nothing.
        service.started();
        assert_eq!(*service.phase(), READY);
    }
}
