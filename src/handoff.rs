//! A server's sockets handed to the next generation, their kernel queues
//! intact: in the same process, across `exec`, or over a Unix socket.

use std::fmt;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;

use socket2::Socket;

use crate::error::Error;
use crate::stats::Stats;

/// The sockets of a server that has handed off, grouped by the address
/// they serve, with the final counters of the server that served them:
/// what [`ServerHandle::handoff`](crate::ServerHandle::handoff) returns and
/// [`ServerBuilder::from_handoff`](crate::ServerBuilder::from_handoff)
/// serves again.
///
/// A datagram that reaches a socket while no server receives on it waits in
/// the socket's kernel queue, and the next server to receive on the socket
/// takes it: handing the sockets on (rather than closing them and binding
/// new ones) loses nothing, unless a queue overflows meanwhile, which the
/// kernel counts ([`Stats::kernel_drops`]). Across generations,
/// every datagram the sockets took is in exactly one generation's
/// [`Stats::received`], or in the kernel's drops:
/// `sent = Σ received + kernel_drops`, where `kernel_drops` is the last
/// generation's (the kernel's count for a socket, which the socket keeps
/// from one generation to the next, and which each generation reports
/// whole).
///
/// # Three ways to the next generation
///
/// - **In the same process:** `ServerBuilder::from_handoff(handoff)`.
/// - **Across `exec`** (Unix), the upgrade in place:
///   [`exec`](Handoff::exec) replaces this process with the new program,
///   the sockets open across it and named in its environment, and the new
///   program takes them with [`from_env`](Handoff::from_env). The process
///   keeps its id, so a service manager never sees it go.
/// - **Over a Unix socket** (Unix, `SCM_RIGHTS`): [`send`](Handoff::send) on
///   one end, [`receive`](Handoff::receive) on the other, to any process that
///   can reach the socket: a child started with one end as its standard
///   input, or an unrelated new instance.
///
/// ```
/// # fn main() -> Result<(), udp_greet::Error> {
/// use udp_greet::{GreetClient, GreetServer};
///
/// let first = GreetServer::builder()
///     .allow_handoff(true)
///     .bind("127.0.0.1:0")?
///     .spawn(udp_greet::greet)?;
/// let client = GreetClient::connect(first.local_addr())?;
/// assert_eq!(client.send_recv(b"Michael")?, b"Hello, Michael!");
///
/// // Whatever arrives from here on waits in the socket's queue...
/// let handoff = first.handoff()?;
/// assert_eq!(handoff.stats().replied, 1);
/// // ...for the next generation, which answers it.
/// let second = GreetServer::builder().from_handoff(handoff)?.spawn(udp_greet::greet)?;
/// assert_eq!(client.send_recv(b"Tracy")?, b"Hello, Tracy!");
/// assert_eq!(second.shutdown()?.replied, 1);
/// # Ok(())
/// # }
/// ```
pub struct Handoff {
    listeners: Vec<(SocketAddr, Vec<UdpSocket>)>,
    stats: Stats,
}

impl fmt::Debug for Handoff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handoff")
            .field(
                "listeners",
                &self
                    .listeners
                    .iter()
                    .map(|(addr, sockets)| (addr, sockets.len()))
                    .collect::<Vec<_>>(),
            )
            .field("stats", &self.stats)
            .finish()
    }
}

/// The most sockets one handoff carries.
const MAX_SOCKETS: usize = 1 << 16;

impl Handoff {
    /// The sockets a server kept, grouped by listener, and its final
    /// counters. A socket still shared with a thread that has not let go
    /// of it is duplicated.
    pub(crate) fn from_server(
        groups: Vec<(SocketAddr, Vec<Arc<Socket>>)>,
        stats: Stats,
    ) -> Result<Handoff, Error> {
        let mut listeners = Vec::with_capacity(groups.len());
        for (addr, sockets) in groups {
            let mut owned = Vec::with_capacity(sockets.len());
            for socket in sockets {
                let socket = match Arc::try_unwrap(socket) {
                    Ok(socket) => socket,
                    Err(shared) => shared.try_clone().map_err(|source| Error::Socket {
                        action: "duplicate the socket to hand it on",
                        addr,
                        source,
                    })?,
                };
                owned.push(UdpSocket::from(socket));
            }
            listeners.push((addr, owned));
        }
        Ok(Handoff { listeners, stats })
    }

    /// Sockets made or received elsewhere, as a handoff: grouped by local
    /// address, in the order each address first appears (sockets on one
    /// address are one listener, served by one worker each, as a server
    /// with [`reuse_port`](crate::ServerBuilder::reuse_port) and several
    /// workers made them). Its [`stats`](Handoff::stats) are all zero.
    ///
    /// # Errors
    ///
    /// [`Error::UnsuitableSocket`] for a socket whose local address cannot
    /// be read (not a bound socket); [`Error::InvalidConfig`] for more than
    /// 65 536 sockets. Whether each is a UDP socket a server can serve on is
    /// checked by [`from_handoff`](crate::ServerBuilder::from_handoff).
    pub fn from_sockets(sockets: impl IntoIterator<Item = UdpSocket>) -> Result<Handoff, Error> {
        let mut listeners: Vec<(SocketAddr, Vec<UdpSocket>)> = Vec::new();
        for (count, socket) in sockets.into_iter().enumerate() {
            if count == MAX_SOCKETS {
                return Err(Error::invalid(
                    "Handoff::from_sockets",
                    "at most 65536 sockets",
                ));
            }
            let addr = socket
                .local_addr()
                .ok()
                .filter(|addr| addr.port() != 0)
                .ok_or(Error::UnsuitableSocket {
                    reason: "a socket handed over is not a bound UDP socket (it has no local address)",
                })?;
            match listeners.iter_mut().find(|(a, _)| *a == addr) {
                Some((_, group)) => group.push(socket),
                None => listeners.push((addr, vec![socket])),
            }
        }
        Ok(Handoff {
            listeners,
            stats: Stats::default(),
        })
    }

    /// The final counters of the server that handed off (all zero for a
    /// handoff made with [`from_sockets`](Handoff::from_sockets) or
    /// [`receive`](Handoff::receive)).
    #[must_use]
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Each listener's address, in the order the server that handed off
    /// was given them.
    #[must_use]
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().map(|(addr, _)| *addr).collect()
    }

    /// How many sockets there are (more than listeners where a listener
    /// has one socket per worker).
    #[must_use]
    pub fn socket_count(&self) -> usize {
        self.listeners
            .iter()
            .map(|(_, sockets)| sockets.len())
            .sum()
    }

    /// The sockets, listener by listener.
    #[must_use]
    pub fn into_sockets(self) -> Vec<UdpSocket> {
        self.listeners
            .into_iter()
            .flat_map(|(_, sockets)| sockets)
            .collect()
    }

    /// The sockets grouped by listener, for `from_handoff`.
    pub(crate) fn into_groups(self) -> Vec<Vec<UdpSocket>> {
        self.listeners
            .into_iter()
            .map(|(_, sockets)| sockets)
            .collect()
    }

    #[cfg(unix)]
    fn sockets(&self) -> impl Iterator<Item = &UdpSocket> {
        self.listeners.iter().flat_map(|(_, sockets)| sockets)
    }
}

#[cfg(unix)]
mod unix {
    use std::os::fd::{AsFd, AsRawFd, RawFd};
    use std::os::unix::process::CommandExt;
    use std::process::Command;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::{Handoff, MAX_SOCKETS};
    use crate::error::Error;
    use crate::sys;

    /// Begins every message of a handoff over a Unix socket.
    const MAGIC: &[u8; 8] = b"udpg-ho1";
    /// A message: the magic, the number of sockets in all, and the number
    /// attached to this message (both little-endian `u32`).
    const MESSAGE: usize = 16;
    /// The descriptors handed across `exec`, comma-separated, listener by
    /// listener.
    const FDS_VAR: &str = "UDP_GREET_HANDOFF_FDS";
    /// The process they are for: the one that executed, which keeps its id.
    const PID_VAR: &str = "UDP_GREET_HANDOFF_PID";

    /// Whether [`Handoff::from_env`] has taken the descriptors.
    static TAKEN: AtomicBool = AtomicBool::new(false);

    fn failed(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
        move |source| Error::Handoff { what, source }
    }

    fn protocol(what: &'static str, detail: &'static str) -> Error {
        Error::Handoff {
            what,
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, detail),
        }
    }

    impl Handoff {
        /// Replaces this process with the program `command` runs, handing
        /// it the sockets: the upgrade in place. Returns only if that
        /// failed, with the error; the sockets are then as they were
        /// (close-on-exec again), and this handoff can be served again
        /// (nothing lost either way). The rest of the process is as
        /// [`CommandExt::exec`] leaves it after a failure: std may have
        /// applied the command's working directory and standard streams,
        /// and reset `SIGPIPE` to its default, before the `exec` that
        /// failed.
        ///
        /// While the `exec` is under way the sockets are not close-on-exec:
        /// a child that another thread of this process spawns meanwhile
        /// inherits them (spawn nothing else while upgrading). A program
        /// that never calls [`from_env`](Handoff::from_env) keeps them open
        /// (and their port bound) without serving them; a program that took
        /// them and later executes a program other than through this
        /// method should remove `UDP_GREET_HANDOFF_FDS` from that command's
        /// environment (`env_remove`), since its process id, and so the
        /// variables' claim, is the same.
        ///
        /// The sockets stay open across `exec`, where they are (no
        /// descriptor of this process is moved or closed), and their
        /// numbers are named in the new program's environment
        /// (`UDP_GREET_HANDOFF_FDS`, with `UDP_GREET_HANDOFF_PID` this
        /// process's id, which `exec` keeps), for
        /// [`from_env`](Handoff::from_env) to take. Under a service
        /// manager the process keeps its id, so the unit never sees it go.
        ///
        /// Socket activation's own variables (`LISTEN_FDS`) would need the
        /// sockets moved to descriptors 3, 4, …, taking those numbers from
        /// whatever this process has there (a runtime's epoll descriptor,
        /// a log file) while its other threads still run; to start a
        /// process other than by `exec` in place, send the sockets over a
        /// Unix socket instead ([`send`](Handoff::send)).
        ///
        /// ```no_run
        /// # #[cfg(unix)]
        /// # fn main() -> Result<(), udp_greet::Error> {
        /// use std::process::Command;
        /// use udp_greet::{GreetServer, Handoff};
        ///
        /// // In the new program: the sockets handed over, if it was exec'd so.
        /// let server = match Handoff::from_env()? {
        ///     Some(handoff) => GreetServer::builder().allow_handoff(true).from_handoff(handoff)?,
        ///     None => GreetServer::builder().allow_handoff(true).bind("127.0.0.1:9999")?,
        /// };
        /// let running = server.spawn(udp_greet::greet)?;
        /// // ... when the upgrade is asked for:
        /// let handoff = running.handoff()?;
        /// let err = handoff.exec(&mut Command::new("/usr/local/bin/greet"));
        /// eprintln!("upgrade failed, serving on: {err}");
        /// GreetServer::builder().from_handoff(handoff)?.serve(udp_greet::greet)?;
        /// # Ok(())
        /// # }
        /// # #[cfg(not(unix))]
        /// # fn main() {}
        /// ```
        #[must_use = "exec returns only with the error that stopped it"]
        pub fn exec(&self, command: &mut Command) -> Error {
            let fds: Vec<RawFd> = self.sockets().map(AsRawFd::as_raw_fd).collect();
            let list: Vec<String> = fds.iter().map(ToString::to_string).collect();
            command
                .env(FDS_VAR, list.join(","))
                .env(PID_VAR, std::process::id().to_string());
            let mut opened = Vec::with_capacity(fds.len());
            let mut err = None;
            for &fd in &fds {
                match sys::set_inheritable(fd, true) {
                    Ok(()) => opened.push(fd),
                    Err(source) => {
                        err = Some(Error::Handoff {
                            what: "keep the sockets open across exec",
                            source,
                        });
                        break;
                    }
                }
            }
            let err = err.unwrap_or_else(|| Error::Handoff {
                what: "execute the new program",
                source: command.exec(),
            });
            for fd in opened {
                let _ = sys::set_inheritable(fd, false);
            }
            err
        }

        /// The sockets a process handed to this one with
        /// [`exec`](Handoff::exec), grouped as
        /// [`from_sockets`](Handoff::from_sockets) groups them: `None` when
        /// this process was not started so (no `UDP_GREET_HANDOFF_FDS`, or
        /// `UDP_GREET_HANDOFF_PID` is another process, whose environment
        /// this one inherited). Takes them once per process.
        ///
        /// # Errors
        ///
        /// [`Error::Handoff`] when the variables cannot be read, or a
        /// descriptor named is not a UDP socket (it is left as it
        /// is, and none is taken); [`Error::InvalidConfig`] when the
        /// sockets were taken already.
        pub fn from_env() -> Result<Option<Handoff>, Error> {
            const WHAT: &str = "take the sockets handed over across exec";
            let (Some(fds), Some(pid)) = (std::env::var_os(FDS_VAR), std::env::var_os(PID_VAR))
            else {
                return Ok(None);
            };
            let pid = pid
                .to_str()
                .and_then(|pid| pid.parse::<u32>().ok())
                .ok_or_else(|| protocol(WHAT, "UDP_GREET_HANDOFF_PID is not a process id"))?;
            if pid != std::process::id() {
                return Ok(None);
            }
            if fds.is_empty() {
                // Named nothing: nothing to take.
                return Ok(None);
            }
            let fds: Vec<RawFd> = fds
                .to_str()
                .map(|list| list.split(',').map(str::parse::<RawFd>).collect())
                .unwrap_or(Ok(Vec::new()))
                .ok()
                .filter(|fds| {
                    !fds.is_empty() && fds.iter().all(|fd| *fd >= 0) && fds.len() <= MAX_SOCKETS
                })
                .ok_or_else(|| {
                    protocol(WHAT, "UDP_GREET_HANDOFF_FDS is not a list of descriptors")
                })?;
            if TAKEN.swap(true, Ordering::AcqRel) {
                return Err(Error::invalid(
                    "Handoff::from_env",
                    "the sockets handed to this process were taken already: take them once",
                ));
            }
            // Each checked before any is taken, so that a bad list takes
            // (and closes) none.
            let mut seen = std::collections::HashSet::new();
            if !fds.iter().all(|fd| seen.insert(*fd)) {
                TAKEN.store(false, Ordering::Release);
                return Err(protocol(
                    WHAT,
                    "UDP_GREET_HANDOFF_FDS names a descriptor twice",
                ));
            }
            for &fd in &fds {
                if let Err(source) = sys::check_udp_socket(fd) {
                    TAKEN.store(false, Ordering::Release);
                    return Err(Error::Handoff { what: WHAT, source });
                }
            }
            let sockets: Vec<std::net::UdpSocket> = fds
                .into_iter()
                .map(|fd| sys::take_inherited(fd).into())
                .collect();
            Handoff::from_sockets(sockets).map(Some)
        }

        /// Sends the sockets over the Unix socket `to` (stream, datagram or
        /// sequenced-packet), for [`receive`](Handoff::receive) at the
        /// other end, in messages of up to 200 descriptors each.
        ///
        /// To start the next generation as a child process, give it one end
        /// of a [`UnixStream::pair`](std::os::unix::net::UnixStream::pair)
        /// as its standard input (`Stdio::from(OwnedFd::from(end))`), send
        /// here, and let it `receive(&std::io::stdin())`.
        ///
        /// The sockets here stay open until this handoff is dropped; the
        /// receiver's copies are the same sockets, queues included, so
        /// drop this one once the receiver has them.
        ///
        /// # Errors
        ///
        /// [`Error::Handoff`] when a message cannot be sent.
        pub fn send(&self, to: &impl AsFd) -> Result<(), Error> {
            let sockets: Vec<_> = self.sockets().map(AsFd::as_fd).collect();
            let total = u32::try_from(sockets.len()).unwrap_or(u32::MAX);
            let mut chunks = sockets.chunks(sys::MAX_FDS_PER_MESSAGE).peekable();
            if chunks.peek().is_none() {
                // No socket: one message says so.
                return sys::send_with_fds(to.as_fd(), &message(total, 0), &[])
                    .map_err(failed("send the handoff over the Unix socket"));
            }
            for chunk in chunks {
                let count = u32::try_from(chunk.len()).unwrap_or(u32::MAX);
                sys::send_with_fds(to.as_fd(), &message(total, count), chunk)
                    .map_err(failed("send the sockets over the Unix socket"))?;
            }
            Ok(())
        }

        /// Receives the sockets that [`send`](Handoff::send) sent over the
        /// Unix socket `from`, grouped as
        /// [`from_sockets`](Handoff::from_sockets) groups them. Waits for
        /// them (as the socket's blocking mode and read timeout say).
        ///
        /// # Errors
        ///
        /// [`Error::Handoff`] when the socket fails or closes first, or
        /// what arrives is not a handoff, or the descriptors did not all
        /// arrive (the process may have too many open: see its
        /// `RLIMIT_NOFILE`); what did arrive is closed. Then as
        /// [`from_sockets`](Handoff::from_sockets).
        pub fn receive(from: &impl AsFd) -> Result<Handoff, Error> {
            const WHAT: &str = "receive the sockets over the Unix socket";
            let mut sockets = Vec::new();
            let mut total = None;
            loop {
                let mut buf = [0u8; MESSAGE];
                let got = sys::recv_with_fds(from.as_fd(), &mut buf, sys::MAX_FDS_PER_MESSAGE)
                    .map_err(failed(WHAT))?;
                if got.truncated {
                    return Err(protocol(
                        WHAT,
                        "descriptors were cut off: the process may have too many files open",
                    ));
                }
                let mut len = got.len;
                if len == 0 {
                    return Err(protocol(WHAT, "the sender closed the socket first"));
                }
                // The rest of a message cut short carries no descriptors.
                while len < MESSAGE {
                    let more = sys::recv_with_fds(from.as_fd(), &mut buf[len..], 1)
                        .map_err(failed(WHAT))?;
                    if more.len == 0 || !more.fds.is_empty() {
                        return Err(protocol(WHAT, "a message was cut short"));
                    }
                    len += more.len;
                }
                let (all, count) = parse(&buf).ok_or_else(|| {
                    protocol(WHAT, "what arrived is not a handoff from udp-greet")
                })?;
                if *total.get_or_insert(all) != all
                    || got.fds.len() != count
                    || all > MAX_SOCKETS
                    || sockets.len() + count > all
                {
                    return Err(protocol(WHAT, "the messages of the handoff do not agree"));
                }
                sockets.extend(got.fds.into_iter().map(std::net::UdpSocket::from));
                if sockets.len() == all {
                    break;
                }
            }
            Handoff::from_sockets(sockets)
        }
    }

    fn message(total: u32, count: u32) -> [u8; MESSAGE] {
        let mut message = [0u8; MESSAGE];
        message[..8].copy_from_slice(MAGIC);
        message[8..12].copy_from_slice(&total.to_le_bytes());
        message[12..].copy_from_slice(&count.to_le_bytes());
        message
    }

    /// The number of sockets in all and in this message.
    fn parse(message: &[u8; MESSAGE]) -> Option<(usize, usize)> {
        let (magic, rest) = message.split_first_chunk::<8>()?;
        let (total, count) = rest.split_first_chunk::<4>()?;
        let count: &[u8; 4] = count.try_into().ok()?;
        (magic == MAGIC).then(|| {
            (
                u32::from_le_bytes(*total) as usize,
                u32::from_le_bytes(*count) as usize,
            )
        })
    }
}
