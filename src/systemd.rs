//! Socket activation and service notification, in systemd's protocol
//! (feature `systemd`, Unix): the sockets a service manager passes
//! ([`Activated`]), and what a server tells it
//! ([`ServerBuilder::notify_service_manager`](crate::ServerBuilder::notify_service_manager)).
//!
//! The protocol itself (the `LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES`,
//! `NOTIFY_SOCKET` and `WATCHDOG_USEC` variables, the messages) is the
//! [`sd-notify`](https://docs.rs/sd-notify) crate's.
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
use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::thread;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use socket2::{Domain, Socket, Type};

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
/// socket unit gave it. Sockets of other kinds (a stream socket for TCP
/// beside them) stay in [`into_rest`](Activated::into_rest).
pub struct Activated {
    sockets: Vec<(String, Socket)>,
}

impl fmt::Debug for Activated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(
                self.sockets
                    .iter()
                    .map(|(name, socket)| (name, socket.local_addr().ok())),
            )
            .finish()
    }
}

impl Activated {
    /// Takes the sockets passed to this process: the `LISTEN_FDS`
    /// descriptors from 3 on, if `LISTEN_PID` is this process (otherwise,
    /// or without the variables, there are none, and the set is empty), with
    /// their names from `LISTEN_FDNAMES`. They are marked close-on-exec.
    ///
    /// The descriptors are taken once per process: a second call fails
    /// rather than hand out the same descriptors again. The variables are
    /// left as they are (changing the environment of a running program is
    /// not safe), so a child process does not inherit the sockets' meaning:
    /// `LISTEN_PID` names this process only.
    ///
    /// # Errors
    ///
    /// [`Error::Activation`] when the variables are malformed or a
    /// descriptor is not open; [`Error::InvalidConfig`] when the sockets
    /// were taken already.
    pub fn take() -> Result<Activated, Error> {
        if TAKEN.swap(true, Ordering::AcqRel) {
            return Err(Error::invalid(
                "systemd::Activated::take",
                "the sockets passed to this process were taken already: take them once",
            ));
        }
        let passed = sd_notify::listen_fds_with_names().map_err(|source| Error::Activation {
            what: "read LISTEN_FDS, LISTEN_PID and LISTEN_FDNAMES",
            source,
        })?;
        let sockets = passed
            .map(|(fd, name)| (name, sys::inherited_socket(fd)))
            .collect();
        Ok(Activated { sockets })
    }

    /// How many sockets are left.
    #[must_use]
    pub fn len(&self) -> usize {
        self.sockets.len()
    }

    /// Whether no socket is left (none was passed, or all were taken).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    /// The names of the sockets left, in the order passed.
    #[must_use]
    pub fn names(&self) -> Vec<&str> {
        self.sockets.iter().map(|(name, _)| name.as_str()).collect()
    }

    /// Takes the UDP sockets (IPv4 or IPv6 datagram sockets) named `name`,
    /// or every UDP socket with `None`, in the order passed.
    pub fn take_udp(&mut self, name: Option<&str>) -> Vec<UdpSocket> {
        let (taken, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.sockets)
            .into_iter()
            .partition(|(named, socket)| name.is_none_or(|name| name == named) && is_udp(socket));
        self.sockets = rest;
        taken
            .into_iter()
            .map(|(_, socket)| UdpSocket::from(socket))
            .collect()
    }

    /// The sockets left, with their names.
    #[must_use]
    pub fn into_rest(self) -> Vec<(String, Socket)> {
        self.sockets
    }
}

/// Whether `socket` is an IPv4 or IPv6 datagram socket.
fn is_udp(socket: &Socket) -> bool {
    let datagram = socket.r#type().is_ok_and(|kind| kind == Type::DGRAM);
    let inet = socket
        .local_addr()
        .ok()
        .and_then(|addr| addr.as_socket())
        .is_some_and(|addr| Domain::for_address(addr) == Domain::IPV4 || addr.is_ipv6());
    datagram && inet
}

/// What a server tells its service manager (`NOTIFY_SOCKET`), and the
/// health its watchdog pings stand for.
#[derive(Debug)]
pub(crate) struct Service {
    /// The watchdog's interval (`WATCHDOG_USEC`), if it is on.
    watchdog: Option<Duration>,
    /// Receive workers that have not yet begun to receive.
    starting: AtomicUsize,
    /// Each receive worker's health, by counter slot.
    workers: Box<[Health]>,
    epoch: Instant,
}

/// One receive worker's health, as the watchdog reads it.
#[derive(Debug, Default)]
struct Health {
    /// Waiting in a receive (or for the socket to be readable): alive,
    /// however long nothing comes.
    waiting: AtomicBool,
    /// When it last made progress (nanoseconds since `Service::epoch`).
    beat: AtomicU64,
}

impl Service {
    /// For a server with `workers` receive workers (slots `0..workers`),
    /// reading the watchdog's setting from the environment.
    pub(crate) fn from_env(workers: usize) -> Service {
        Service {
            watchdog: sd_notify::watchdog_enabled(),
            starting: AtomicUsize::new(workers),
            workers: (0..workers).map(|_| Health::default()).collect(),
            epoch: Instant::now(),
        }
    }

    fn notify(&self, states: &[NotifyState<'_>]) {
        // Without NOTIFY_SOCKET this does nothing; a manager that has gone
        // away is no reason to stop serving (the library never prints).
        let _ = sd_notify::notify(states);
    }

    /// A receive worker is about to receive for the first time; the last
    /// of them tells the manager the server is ready.
    pub(crate) fn started(&self) {
        let before = self
            .starting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        if before == Ok(1) {
            self.notify(&[NotifyState::Ready]);
        }
    }

    /// The server is shutting down.
    pub(crate) fn stopping(&self) {
        self.notify(&[NotifyState::Stopping]);
    }

    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Worker `slot` made progress at `now`; `waiting`: it is about to wait
    /// for datagrams.
    pub(crate) fn beat(&self, slot: usize, now: Instant, waiting: bool) {
        if let Some(health) = self.workers.get(slot) {
            health.beat.store(self.nanos(now), Ordering::Relaxed);
            health.waiting.store(waiting, Ordering::Release);
        }
    }

    /// The first receive worker that is neither waiting for datagrams nor
    /// has made progress within `within` of `now`, if any.
    fn stuck(&self, now: Instant, within: Duration) -> Option<usize> {
        let now = self.nanos(now);
        let within = u64::try_from(within.as_nanos()).unwrap_or(u64::MAX);
        self.workers.iter().position(|health| {
            !health.waiting.load(Ordering::Acquire)
                && now.saturating_sub(health.beat.load(Ordering::Relaxed)) > within
        })
    }

    /// Starts the watchdog thread, if the manager asked for pings: every
    /// half interval it pings while every receive worker is alive and
    /// receiving, and withholds the ping (saying why in `STATUS=`) while
    /// one is stuck, so that the manager restarts a wedged server. It ends
    /// with the server.
    pub(crate) fn start_watchdog(shared: &Arc<Shared>, name: String) -> Result<(), Error> {
        let Some(service) = shared.service.as_ref() else {
            return Ok(());
        };
        let Some(interval) = service.watchdog.filter(|i| !i.is_zero()) else {
            return Ok(());
        };
        let weak: Weak<Shared> = Arc::downgrade(shared);
        let addr = shared.local_addrs().first().copied();
        thread::Builder::new()
            .name(name)
            .spawn(move || watch(&weak, interval))
            .map(drop)
            .map_err(|source| Error::Spawn {
                addr: addr.unwrap_or(std::net::SocketAddr::from(([0, 0, 0, 0], 0))),
                source,
            })
    }
}

/// The watchdog thread's loop (see [`Service::start_watchdog`]).
fn watch(shared: &Weak<Shared>, interval: Duration) {
    let tick = interval / 2;
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
        match service.stuck(Instant::now(), tick) {
            None => {
                if withheld {
                    service.notify(&[NotifyState::Status("serving"), NotifyState::Watchdog]);
                    withheld = false;
                } else {
                    service.notify(&[NotifyState::Watchdog]);
                }
            }
            Some(slot) if !withheld => {
                let status = format!(
                    "receive worker {slot} has not received for over {tick:?}: watchdog pings withheld"
                );
                service.notify(&[NotifyState::Status(&status)]);
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
        let service = Service {
            watchdog: None,
            starting: AtomicUsize::new(2),
            workers: (0..2).map(|_| Health::default()).collect(),
            epoch: Instant::now(),
        };
        let start = service.epoch;
        let within = Duration::from_millis(100);
        service.beat(0, start, true);
        service.beat(1, start, false);
        // Just begun: nobody stuck.
        assert_eq!(service.stuck(start + within, within), None);
        // Worker 1 busy past the limit; worker 0 waits, however long.
        let later = start + within * 3;
        assert_eq!(service.stuck(later, within), Some(1));
        service.beat(1, later, false);
        assert_eq!(service.stuck(later + within / 2, within), None);
        // Out-of-range slots and instants before the epoch change nothing.
        service.beat(7, later, false);
        let before = start.checked_sub(Duration::from_millis(1)).unwrap_or(start);
        service.beat(1, before, true);
        assert_eq!(service.stuck(later, within), None);
        assert_eq!(service.stuck(later, Duration::MAX), None);
    }
}
