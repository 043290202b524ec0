//! The server: bind, serve or spawn, observe, shut down.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::sync::{Arc, Weak};
use std::thread;

use socket2::Socket;

use crate::config::{Config, ServerBuilder};
use crate::error::Error;
use crate::handle::{ServerHandle, Shared, ShutdownHandle, ThreadEnd};
use crate::handler::{Action, Request};
use crate::pool::Pool;
use crate::socket::{BoundSocket, BufferSize};
use crate::stats::Stats;
use crate::sys;
use crate::worker::{HandlerFn, PoolThread, Worker};

/// A bound UDP server, ready to [`serve`](GreetServer::serve) on the calling
/// thread or to [`spawn`](GreetServer::spawn) on its own.
///
/// Each datagram received is handed to the handler, which writes its reply
/// into a buffer the server reuses and returns an [`Action`]: reply, or
/// stay silent. The server survives whatever arrives: oversized (truncated)
/// datagrams are counted and dropped, a panicking handler is caught and
/// counted, and receive errors never stop it.
///
/// # Examples
///
/// ```
/// # fn main() -> Result<(), udp_greet::Error> {
/// use udp_greet::{Action, GreetClient, GreetServer};
///
/// // An echo server that ignores empty datagrams.
/// let server = GreetServer::bind("127.0.0.1:0")?.spawn(|request, reply: &mut Vec<u8>| {
///     if request.data().is_empty() {
///         return Action::Ignore;
///     }
///     reply.extend_from_slice(request.data());
///     Action::Reply
/// })?;
///
/// let client = GreetClient::connect(server.local_addr())?;
/// assert_eq!(client.send_recv(b"ping")?, b"ping");
/// server.shutdown()?;
/// # Ok(())
/// # }
/// ```
pub struct GreetServer {
    pub(crate) sockets: Vec<Arc<Socket>>,
    pub(crate) config: Arc<Config>,
    pub(crate) shared: Arc<Shared>,
}

impl fmt::Debug for GreetServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GreetServer")
            .field("config", &self.config)
            .field("sockets", &self.sockets.len())
            .finish_non_exhaustive()
    }
}

impl GreetServer {
    /// Binds a server with default settings to `addr`.
    ///
    /// Port 0 asks the system for a free port: read it back with
    /// [`local_addr`](GreetServer::local_addr).
    ///
    /// # Errors
    ///
    /// As [`ServerBuilder::bind`]: for example [`Error::AddrInUse`] when
    /// another socket holds the address.
    ///
    /// # Examples
    ///
    /// ```
    /// # fn main() -> Result<(), udp_greet::Error> {
    /// let server = udp_greet::GreetServer::bind("127.0.0.1:0")?;
    /// assert_ne!(server.local_addr().port(), 0);
    /// # Ok(())
    /// # }
    /// ```
    pub fn bind<A: ToSocketAddrs + fmt::Debug>(addr: A) -> Result<GreetServer, Error> {
        ServerBuilder::default().bind(addr)
    }

    /// A builder for a server with non-default settings.
    pub fn builder() -> ServerBuilder {
        ServerBuilder::default()
    }

    /// Serves on a socket made elsewhere, with every setting at its default
    /// and the socket's own buffer sizes: `ServerBuilder::new().from_std(socket)`.
    ///
    /// # Errors
    ///
    /// As [`ServerBuilder::from_std`]: [`Error::UnsuitableSocket`] for a
    /// socket that is not a bound UDP socket.
    pub fn from_std(socket: UdpSocket) -> Result<GreetServer, Error> {
        ServerBuilder::default().from_std(socket)
    }

    /// A server over `first` and `others` (one socket per worker, or one
    /// shared by all), bound and configured by `builder`, which has checked
    /// its settings.
    pub(crate) fn new(
        builder: &ServerBuilder,
        first: BoundSocket,
        others: Vec<BoundSocket>,
    ) -> Result<Self, Error> {
        let local_addr = first.local_addr;
        let config = builder.config(&first, local_addr.ip().is_unspecified());
        let mut bound = others;
        bound.insert(0, first);
        // A wildcard-bound socket must tell which address each datagram was
        // sent to, or replies may go out from another of the host's.
        let wildcard = local_addr.ip().is_unspecified();
        let mut pktinfo = wildcard;
        for b in &bound {
            if wildcard {
                pktinfo &=
                    sys::enable_pktinfo(&b.socket, local_addr.is_ipv6()).map_err(|source| {
                        Error::Socket {
                            action: "enable IP_PKTINFO / IPV6_RECVPKTINFO",
                            addr: local_addr,
                            source,
                        }
                    })?;
            }
            if let Some(interval) = sys::WAKE_INTERVAL {
                b.socket
                    .set_read_timeout(Some(interval))
                    .map_err(|source| Error::Socket {
                        action: "set SO_RCVTIMEO",
                        addr: local_addr,
                        source,
                    })?;
            }
        }
        let config = Arc::new(Config { pktinfo, ..config });
        let sockets: Vec<Arc<Socket>> = bound.into_iter().map(|b| Arc::new(b.socket)).collect();
        let pool = config.pool.as_ref().map(|p| {
            (
                Arc::new(Pool::new(p.capacity, p.threads)),
                config.drain_timeout,
            )
        });
        let shared = Shared::new(&sockets, config.threads(), pool);
        Ok(GreetServer {
            sockets,
            config,
            shared,
        })
    }

    /// The address the server is bound to, with the real port when port 0
    /// was asked for.
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.config.local_addr
    }

    /// The receive buffer size requested and granted.
    #[must_use]
    pub fn recv_buffer_size(&self) -> BufferSize {
        self.config.recv_buffer
    }

    /// The send buffer size requested and granted.
    #[must_use]
    pub fn send_buffer_size(&self) -> BufferSize {
        self.config.send_buffer
    }

    /// The largest request the server accepts, in bytes.
    #[must_use]
    pub fn max_datagram_size(&self) -> usize {
        self.config.max_datagram
    }

    /// A handle that stops the server and reads its counters from another
    /// thread; take it before calling [`serve`](GreetServer::serve).
    #[must_use]
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle::new(self.shared.clone(), self.config.local_addr)
    }

    /// Runs the server on the calling thread until a [`ShutdownHandle`]
    /// stops it, then returns the final counters.
    ///
    /// For each datagram, `handler` gets the [`Request`] and an empty reply
    /// buffer and returns an [`Action`]. The buffer is reused from one
    /// datagram to the next and made with room for 512 bytes, so a handler
    /// that appends to it allocates nothing once it has grown to its largest
    /// reply (a buffer that grew past 64 KiB, more than UDP carries, is
    /// given back after its datagram). The handler is shared by reference,
    /// so it must be `Fn`, `Send` and `Sync`; per-request state belongs in
    /// the request.
    ///
    /// The handler runs on the worker threads. A reply leaves as soon as it
    /// is ready or, for fast handlers, together with the rest of its batch
    /// (see [`ServerBuilder::batch_size`]); a slow handler delays only the
    /// requests behind it on the same worker.
    ///
    /// A handler that panics is caught: the datagram is counted in
    /// [`Stats::handler_panics`] and answered with nothing. The panic still
    /// goes through the process's panic hook, which by default prints it to
    /// standard error. With `panic = "abort"`, a panic ends the process.
    ///
    /// While idle the server sleeps in the kernel; it does not poll.
    ///
    /// # Errors
    ///
    /// [`Error::Spawn`] or [`Error::WorkerPanicked`] only; the loop itself
    /// never fails.
    ///
    /// # Examples
    ///
    /// ```
    /// # fn main() -> Result<(), udp_greet::Error> {
    /// use udp_greet::{GreetClient, GreetServer};
    ///
    /// let server = GreetServer::bind("127.0.0.1:0")?;
    /// let addr = server.local_addr();
    /// let stop = server.shutdown_handle();
    /// let client = std::thread::spawn(move || -> Result<Vec<u8>, udp_greet::Error> {
    ///     let reply = GreetClient::connect(addr)?.send_recv(b"Sarah");
    ///     stop.shutdown();
    ///     reply
    /// });
    /// let stats = server.serve(udp_greet::greet)?;
    /// assert_eq!(client.join().expect("client thread")?, b"Hello, Sarah!");
    /// assert_eq!(stats.replied, 1);
    /// # Ok(())
    /// # }
    /// ```
    pub fn serve<H>(self, handler: H) -> Result<Stats, Error>
    where
        H: Fn(Request<'_>, &mut Vec<u8>) -> Action + Send + Sync + 'static,
    {
        let mut running = self.start(handler, true)?;
        running.finish(None)?;
        Ok(running.shared().snapshot())
    }

    /// Runs the server on a background thread and returns a handle to it.
    ///
    /// See [`serve`](GreetServer::serve) for the handler's contract.
    ///
    /// # Errors
    ///
    /// [`Error::Spawn`] when the thread cannot be started.
    pub fn spawn<H>(self, handler: H) -> Result<ServerHandle, Error>
    where
        H: Fn(Request<'_>, &mut Vec<u8>) -> Action + Send + Sync + 'static,
    {
        self.start(handler, false)
    }

    /// Starts one receive worker per socket (or per worker, sharing one
    /// socket) and the handler pool's threads, on new threads; for `serve`,
    /// the first receive worker runs on the calling thread once the others
    /// are running.
    fn start<H: HandlerFn>(self, handler: H, on_this_thread: bool) -> Result<ServerHandle, Error> {
        let handler = Arc::new(handler);
        let addr = self.config.local_addr;
        let pool = self.shared.pool.as_ref().map(|(pool, _)| pool.clone());
        // With a pool, the handle keeps the sockets open until the pool has
        // drained; handler threads hold them weakly.
        let keep_open = if pool.is_some() {
            self.sockets.clone()
        } else {
            Vec::new()
        };
        let weak: Vec<Weak<Socket>> = self.sockets.iter().map(Arc::downgrade).collect();
        let mut handle = ServerHandle::new(self.shared.clone(), addr, keep_open);
        let spawn = |handle: &mut ServerHandle, name: String, run: Box<dyn FnOnce() + Send>| {
            let end = ThreadEnd(self.shared.clone());
            let spawned = thread::Builder::new().name(name).spawn(move || {
                let _end = end;
                run();
            });
            match spawned {
                Ok(thread) => {
                    handle.started(Some(thread));
                    Ok(())
                }
                // `handle` stops and joins the threads already started when
                // it is dropped.
                Err(source) => Err(Error::Spawn { addr, source }),
            }
        };
        if let Some(pool) = &pool {
            for k in 0..self.config.pool.as_ref().map_or(0, |p| p.threads) {
                let thread = PoolThread {
                    slot: self.config.workers + k,
                    pool: pool.clone(),
                    handler: handler.clone(),
                    config: self.config.clone(),
                    shared: self.shared.clone(),
                    sockets: weak.clone(),
                };
                // `udp:PORT/hN`: fits Linux's 15-byte thread names for ports
                // and pools of up to 999 threads.
                spawn(
                    &mut handle,
                    format!("udp:{}/h{k}", addr.port()),
                    Box::new(move || thread.run()),
                )?;
            }
        }
        // Moved out, so that the workers (and, with a pool, the handle) hold
        // the only strong references, and each socket closes when the last
        // of them is done.
        let sockets = self.sockets;
        let mut inline = None;
        for index in 0..self.config.workers {
            // One socket per worker, or one shared by all.
            let own = index < sockets.len();
            let Some(socket) = sockets.get(index).or(sockets.first()).cloned() else {
                break;
            };
            let worker = Worker {
                index,
                socket,
                socket_index: if own { index } else { 0 },
                handler: handler.clone(),
                config: self.config.clone(),
                shared: self.shared.clone(),
                pool: pool.clone(),
                reports_drops: own,
            };
            if on_this_thread && index == 0 {
                inline = Some(worker);
                continue;
            }
            // `udp:PORT/N`: fits Linux's 15-byte thread names, and tells
            // servers apart in `top -H`.
            spawn(
                &mut handle,
                format!("udp:{}/{index}", addr.port()),
                Box::new(move || worker.run()),
            )?;
        }
        drop(sockets);
        if let Some(worker) = inline {
            handle.started(None);
            let _end = ThreadEnd(self.shared.clone());
            worker.run();
        }
        Ok(handle)
    }
}
