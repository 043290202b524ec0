//! What a running server is controlled through: the stop flag and the
//! counters its handles share, `ShutdownHandle` and `ServerHandle`.

use std::fmt;
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;

use socket2::Socket;

use crate::error::Error;
use crate::stats::{SharedStats, Stats};
use crate::sys;

/// What a server's workers and every copy of its handles share: the stop
/// flag, a way to wake the workers, and the counters.
#[derive(Debug)]
pub(crate) struct Shared {
    stop: AtomicBool,
    /// Weak, so that a handle never keeps a socket (and its port) open after
    /// the worker that owns it has finished.
    sockets: Vec<Weak<Socket>>,
    pub(crate) stats: Arc<SharedStats>,
}

impl Shared {
    pub(crate) fn new(sockets: &[Arc<Socket>], workers: usize) -> Arc<Shared> {
        Arc::new(Shared {
            stop: AtomicBool::new(false),
            sockets: sockets.iter().map(Arc::downgrade).collect(),
            stats: SharedStats::new(workers),
        })
    }

    /// The counters summed over workers, with the kernel's drop count read
    /// from each socket still open.
    pub(crate) fn snapshot(&self) -> Stats {
        self.stats.snapshot(|i| {
            let socket = self.sockets.get(i)?.upgrade()?;
            sys::kernel_drops(&socket)
        })
    }

    pub(crate) fn is_stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        for socket in self.sockets.iter().filter_map(Weak::upgrade) {
            // Wakes a worker blocked in a receive (see `sys::WAKE_INTERVAL`).
            // Unconnected UDP sockets report `ENOTCONN` even when the wake-up
            // works, and where it does not the read timeout takes over.
            let _ = socket.shutdown(Shutdown::Read);
        }
    }
}

/// Stops a server from any thread, and reads its counters while it runs.
///
/// Cheap to clone. Taken with [`GreetServer::shutdown_handle`](crate::GreetServer::shutdown_handle) or
/// [`ServerHandle::shutdown_handle`].
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
}

impl ShutdownHandle {
    pub(crate) fn new(shared: Arc<Shared>, local_addr: SocketAddr) -> Self {
        ShutdownHandle { shared, local_addr }
    }

    /// Asks the server to stop. Returns at once; [`GreetServer::serve`](crate::GreetServer::serve)
    /// returns, or [`ServerHandle::shutdown`] can join, once every worker has
    /// finished the handler call in progress. Requests received but not yet
    /// handled are dropped and counted in
    /// [`Stats::shutdown_dropped`]. Calling it again does nothing.
    pub fn shutdown(&self) {
        self.shared.stop();
    }

    /// Whether [`shutdown`](ShutdownHandle::shutdown) has been called.
    #[must_use]
    pub fn is_shutdown(&self) -> bool {
        self.shared.is_stopped()
    }

    /// The server's counters now.
    #[must_use]
    pub fn stats(&self) -> Stats {
        self.shared.snapshot()
    }

    /// The server's address.
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

/// A server running on background threads, from [`GreetServer::spawn`](crate::GreetServer::spawn).
///
/// Dropping the handle shuts the server down and waits for it, as
/// [`shutdown`](ServerHandle::shutdown) does.
#[must_use = "dropping the handle shuts the server down"]
pub struct ServerHandle {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerHandle")
            .field("local_addr", &self.local_addr)
            .field("workers", &self.threads.len())
            .field("stopped", &self.shared.is_stopped())
            .finish()
    }
}

impl ServerHandle {
    pub(crate) fn new(shared: Arc<Shared>, local_addr: SocketAddr, workers: usize) -> Self {
        ServerHandle {
            local_addr,
            shared,
            threads: Vec::with_capacity(workers),
        }
    }

    pub(crate) fn push_thread(&mut self, thread: JoinHandle<()>) {
        self.threads.push(thread);
    }

    pub(crate) fn shared(&self) -> &Shared {
        &self.shared
    }

    /// The address the server is bound to.
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The server's counters now.
    #[must_use]
    pub fn stats(&self) -> Stats {
        self.shared.snapshot()
    }

    /// A handle that can stop the server from another thread.
    #[must_use]
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle::new(self.shared.clone(), self.local_addr)
    }

    /// Stops the server and waits until every worker has stopped and every
    /// socket is closed, so the address can be bound again at once. Returns
    /// the final counters.
    ///
    /// Each worker finishes the handler call in progress, sends the replies
    /// it has ready, and drops the requests it received but has not handled
    /// ([`Stats::shutdown_dropped`]): shutdown takes about one handler call,
    /// whatever the batch size.
    ///
    /// # Errors
    ///
    /// [`Error::WorkerPanicked`] if a worker thread ended abnormally (a bug
    /// in udp-greet; handler panics are caught and never end a worker).
    pub fn shutdown(mut self) -> Result<Stats, Error> {
        self.shared.stop();
        self.join()?;
        Ok(self.shared.snapshot())
    }

    pub(crate) fn join(&mut self) -> Result<(), Error> {
        let mut result = Ok(());
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                result = Err(Error::WorkerPanicked {
                    addr: self.local_addr,
                });
            }
        }
        result
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.shared.stop();
            let _ = self.join();
        }
    }
}
