//! The crate's one error type.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

/// Everything that can go wrong in udp-greet.
///
/// Each message names the operation and the address it was about; the
/// underlying operating-system error, where there is one, is the
/// [`source`](std::error::Error::source) and is not repeated in the message.
///
/// New variants and new fields in a variant may come in a minor release:
/// every variant is `#[non_exhaustive]`, so a pattern names the fields it
/// uses and ends with `..`, and only udp-greet constructs them.
///
/// ```
/// let err = udp_greet::GreetServer::builder().workers(0).bind("127.0.0.1:0").unwrap_err();
/// match err {
///     udp_greet::Error::InvalidConfig { setting, .. } => assert_eq!(setting, "ServerBuilder::workers"),
///     other => panic!("{other}"),
/// }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The address could not be resolved or parsed, or resolved to nothing.
    #[non_exhaustive]
    #[error("cannot resolve address {input}")]
    Resolve {
        /// The address as the caller wrote it (its `Debug` form).
        input: String,
        /// What the resolver said.
        #[source]
        source: io::Error,
    },

    /// Another socket already holds the address.
    #[non_exhaustive]
    #[error(
        "address {addr} is already in use: stop the process that holds it, pick another port, \
         or enable reuse_port on every socket that shares it"
    )]
    AddrInUse {
        /// The address that was asked for.
        addr: SocketAddr,
        /// The operating system's error (`EADDRINUSE`).
        #[source]
        source: io::Error,
    },

    /// Binding failed for a reason other than the address being in use
    /// (for example an address this host does not have, or a privileged port).
    #[non_exhaustive]
    #[error("cannot bind UDP socket to {addr}")]
    Bind {
        /// The address that was asked for.
        addr: SocketAddr,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },

    /// The AF_XDP engine (feature `xdp`) could not be set up on an
    /// interface: the message names the step and what is missing (root or
    /// a capability, kernel support, the driver's mode, locked memory).
    #[cfg(all(feature = "xdp", target_os = "linux"))]
    #[cfg_attr(docsrs, doc(cfg(all(feature = "xdp", target_os = "linux"))))]
    #[non_exhaustive]
    #[error("cannot serve through AF_XDP on {interface}")]
    Xdp {
        /// The interface.
        interface: String,
        /// What failed, and why.
        #[source]
        source: io::Error,
    },

    /// Creating the socket or setting one of its options failed.
    #[non_exhaustive]
    #[error("cannot {action} on the UDP socket for {addr}")]
    Socket {
        /// What was being done, such as `set SO_RCVBUF`.
        action: &'static str,
        /// The address the socket was for.
        addr: SocketAddr,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },

    /// A setting of the user's, run on a socket before bind
    /// ([`ServerBuilder::before_bind`](crate::ServerBuilder::before_bind)),
    /// failed.
    #[non_exhaustive]
    #[error("the setting {setting} (before_bind) failed on the UDP socket for {addr}")]
    SocketSetting {
        /// The setting's name, as given to `before_bind`.
        setting: String,
        /// The address the socket was for.
        addr: SocketAddr,
        /// The error the setting returned.
        #[source]
        source: io::Error,
    },

    /// A socket made elsewhere (given to
    /// [`ServerBuilder::from_std`](crate::ServerBuilder::from_std), or
    /// handed over in a [`Handoff`](crate::Handoff)) cannot be served on.
    #[non_exhaustive]
    #[error("cannot serve on a socket made elsewhere (from_std, from_handoff): {reason}")]
    UnsuitableSocket {
        /// What is wrong with it, and what to do.
        reason: &'static str,
    },

    /// A builder setting is out of range, or does not fit the socket or
    /// the address it was used with.
    #[non_exhaustive]
    #[error(
        "invalid setting {setting}{}: {reason}",
        addr.map(|addr| format!(" for {addr}")).unwrap_or_default()
    )]
    InvalidConfig {
        /// The method that set the wrong value, with its type, such as
        /// `ServerBuilder::workers` or `RateLimit::table_size`.
        setting: &'static str,
        /// What the value must be.
        reason: &'static str,
        /// The address it did not fit, where it is about one (such as an
        /// address given twice to `bind_all`).
        addr: Option<SocketAddr>,
    },

    /// No reply arrived in time, after every attempt.
    #[non_exhaustive]
    #[error("no reply from {addr} after {attempts} attempt(s) in {elapsed:?}")]
    Timeout {
        /// The server that did not answer.
        addr: SocketAddr,
        /// How many requests were sent.
        attempts: u32,
        /// How long the call waited in all.
        elapsed: Duration,
    },

    /// The server's host answered that nothing listens on that port
    /// (an ICMP port-unreachable message, reported as `ECONNREFUSED`).
    #[non_exhaustive]
    #[error("nothing is listening on UDP {addr} (port unreachable)")]
    Refused {
        /// The address that refused.
        addr: SocketAddr,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },

    /// A reply did not fit in the caller's buffer; it was discarded.
    ///
    /// With a [reply check](crate::ClientBuilder::reply_check), a datagram
    /// too large to check is discarded and the wait goes on; this error then
    /// comes only if no valid reply arrived by the end of the call.
    #[non_exhaustive]
    #[error("reply from {addr} is larger than the {capacity}-byte buffer given for it")]
    ReplyTooLarge {
        /// The server that sent it.
        addr: SocketAddr,
        /// The size of the caller's buffer.
        capacity: usize,
    },

    /// A call's request id is that of another call in flight to the same
    /// address on this client (with
    /// [`request_id`](crate::ClientBuilder::request_id)): the call was not
    /// made, since the two could take each other's replies. Pick another
    /// id (a counter or a random one) and call again.
    #[non_exhaustive]
    #[error(
        "a call to {addr} with request id {id} is already in flight on this client; pick another id"
    )]
    IdInUse {
        /// Where the call was to go.
        addr: SocketAddr,
        /// The id, as [`request_id`](crate::ClientBuilder::request_id) read it.
        id: u64,
    },

    /// A request carries no id that
    /// [`request_id`](crate::ClientBuilder::request_id) can read (it
    /// returned `None`): the call was not made.
    #[non_exhaustive]
    #[error(
        "the request to {addr} carries no request id that the client's request_id function can read"
    )]
    NoRequestId {
        /// Where the call was to go.
        addr: SocketAddr,
    },

    /// A call to an IPv6 server from a client bound to an IPv4 address
    /// ([`ClientBuilder::bind`](crate::ClientBuilder::bind)), which cannot
    /// reach it.
    #[non_exhaustive]
    #[error(
        "this client is bound to {local}, an IPv4 address, and cannot call the IPv6 address {addr}: bind it to \"[::]:0\" to call IPv6 and IPv4 servers"
    )]
    AddressFamily {
        /// Where the call was to go.
        addr: SocketAddr,
        /// The client's own address.
        local: SocketAddr,
    },

    /// A call to a server the client was not made for: `send_recv` on a
    /// client made with [`bind`](crate::ClientBuilder::bind), which has no
    /// server of its own (`peer: None`), or `send_recv_to` on a client
    /// connected to another server (`peer`).
    #[non_exhaustive]
    #[error("{}", wrong_destination(*addr, *peer))]
    WrongDestination {
        /// Where the call was to go (for `send_recv` on a bound client, the
        /// client's own address).
        addr: SocketAddr,
        /// The server the client is connected to, if any.
        peer: Option<SocketAddr>,
    },

    /// Starting a server thread failed.
    #[non_exhaustive]
    #[error("cannot start a server thread for {addr}")]
    Spawn {
        /// The server's address.
        addr: SocketAddr,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },

    /// A server thread ended abnormally (a bug in udp-greet: handler panics
    /// are caught and counted, never reported this way).
    #[non_exhaustive]
    #[error("a server thread for {addr} stopped abnormally")]
    WorkerPanicked {
        /// The server's address.
        addr: SocketAddr,
    },

    /// The tokio runtime an async server ran on shut down while it ran, and
    /// cancelled its tasks: the server stopped without its shutdown, so its
    /// counters may not account for the requests that were in flight.
    /// Shut the server down before its runtime.
    #[cfg(feature = "tokio")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
    #[error("the async server on {addr} was cancelled: its tokio runtime shut down while it ran")]
    #[non_exhaustive]
    Cancelled {
        /// The server's address.
        addr: SocketAddr,
    },

    /// [`ServerHandle::shutdown_timeout`](crate::ServerHandle::shutdown_timeout)
    /// gave up waiting: some of the server's threads are still in a handler
    /// call. They finish on their own; their replies are not sent.
    #[non_exhaustive]
    #[error(
        "the server on {addr} did not stop within {waited:?}: {stuck_threads} thread(s) still \
         running (in a handler call, or not yet out of their last receive)"
    )]
    ShutdownTimedOut {
        /// The server's address.
        addr: SocketAddr,
        /// How many threads had not ended.
        stuck_threads: usize,
        /// How long shutdown waited.
        waited: Duration,
    },

    /// An async server or client was used outside a tokio runtime.
    #[cfg(feature = "tokio")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
    #[non_exhaustive]
    #[error(
        "no tokio runtime for the async socket for {addr}: use the async server and client from \
         a task or inside Runtime::block_on"
    )]
    NoRuntime {
        /// The server's address.
        addr: SocketAddr,
    },

    /// The sockets a service manager passed to this process could not be
    /// taken ([`systemd::Activated::take`](crate::systemd::Activated::take)).
    #[cfg(all(feature = "systemd", unix))]
    #[cfg_attr(docsrs, doc(cfg(all(feature = "systemd", unix))))]
    #[non_exhaustive]
    #[error("cannot take the sockets the service manager passed: cannot {what}")]
    Activation {
        /// What failed, such as `read LISTEN_FDS, LISTEN_PID and LISTEN_FDNAMES`.
        what: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },

    /// Sockets could not be handed to, or taken from, another server or
    /// process ([`Handoff`](crate::Handoff)).
    #[non_exhaustive]
    #[error("cannot hand the sockets on: cannot {what}")]
    Handoff {
        /// What failed, such as `send the sockets over the Unix socket`.
        what: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },

    /// Any other I/O error, with the operation and the address it was about.
    #[non_exhaustive]
    #[error("{action} {addr} failed")]
    Io {
        /// What was being done, such as `send to`.
        action: &'static str,
        /// The address it was done with.
        addr: SocketAddr,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
}

/// The message of [`Error::WrongDestination`].
fn wrong_destination(addr: SocketAddr, peer: Option<SocketAddr>) -> String {
    match peer {
        Some(peer) => format!(
            "this client is connected to {peer} and cannot call {addr}: make a client with ClientBuilder::bind to call many servers"
        ),
        None => format!(
            "this client (bound to {addr}) has no server of its own: call send_recv_to(addr, request)"
        ),
    }
}

impl Error {
    /// This error's message followed by each of its causes, on one line,
    /// separated by `": "`: what a command-line program prints.
    ///
    /// ```
    /// let err = udp_greet::GreetServer::bind("no-such-host.invalid:9999").unwrap_err();
    /// assert!(err.report().starts_with("cannot resolve address \"no-such-host.invalid:9999\": "));
    /// ```
    #[must_use]
    pub fn report(&self) -> String {
        let mut line = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            line.push_str(": ");
            line.push_str(&cause.to_string());
            source = cause.source();
        }
        line
    }

    /// Whether this error is a timeout ([`Error::Timeout`]).
    #[must_use]
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout { .. })
    }

    /// Whether this error says that nothing listens at the server's address
    /// ([`Error::Refused`]).
    #[must_use]
    pub fn is_refused(&self) -> bool {
        matches!(self, Error::Refused { .. })
    }
}

/// An [`io::Error`] of the matching [`kind`](io::Error::kind), for code that
/// works in `io::Result`: a timeout is [`TimedOut`](io::ErrorKind::TimedOut),
/// a refusal [`ConnectionRefused`](io::ErrorKind::ConnectionRefused), a
/// taken address [`AddrInUse`](io::ErrorKind::AddrInUse), an invalid setting
/// or socket, a request without an id or a call to a server the client
/// was not made for [`InvalidInput`](io::ErrorKind::InvalidInput), a request
/// id in use [`AlreadyExists`](io::ErrorKind::AlreadyExists), and an error
/// with an operating-system error as its source takes that error's kind;
/// a reply too large for the buffer is
/// [`InvalidData`](io::ErrorKind::InvalidData), a shutdown that timed out
/// `TimedOut`, and the rest (a worker that panicked, no runtime, a server
/// cancelled by its runtime) [`Other`](io::ErrorKind::Other).
///
/// The `udp_greet::Error` itself is the inner error: the message is the
/// same, [`get_ref`](io::Error::get_ref) and
/// [`downcast`](io::Error::downcast) give it back, and
/// [`source`](std::error::Error::source) is its source, the
/// operating-system error where there is one.
///
/// ```
/// let err = udp_greet::GreetServer::builder().workers(0).bind("127.0.0.1:0").unwrap_err();
/// let io = std::io::Error::from(err);
/// assert_eq!(io.kind(), std::io::ErrorKind::InvalidInput);
/// assert!(io.get_ref().is_some_and(|e| e.is::<udp_greet::Error>()));
/// ```
impl From<Error> for io::Error {
    fn from(err: Error) -> io::Error {
        io::Error::new(err.io_kind(), err)
    }
}

impl Error {
    /// The [`io::ErrorKind`] this error converts to.
    fn io_kind(&self) -> io::ErrorKind {
        use io::ErrorKind;
        match self {
            Error::AddrInUse { .. } => ErrorKind::AddrInUse,
            Error::Refused { .. } => ErrorKind::ConnectionRefused,
            Error::Timeout { .. } | Error::ShutdownTimedOut { .. } => ErrorKind::TimedOut,
            Error::InvalidConfig { .. } | Error::UnsuitableSocket { .. } => ErrorKind::InvalidInput,
            Error::ReplyTooLarge { .. } => ErrorKind::InvalidData,
            Error::IdInUse { .. } => ErrorKind::AlreadyExists,
            Error::NoRequestId { .. }
            | Error::WrongDestination { .. }
            | Error::AddressFamily { .. } => ErrorKind::InvalidInput,
            Error::Resolve { source, .. }
            | Error::Bind { source, .. }
            | Error::Socket { source, .. }
            | Error::SocketSetting { source, .. }
            | Error::Spawn { source, .. }
            | Error::Io { source, .. } => source.kind(),
            Error::WorkerPanicked { .. } => ErrorKind::Other,
            #[cfg(all(feature = "systemd", unix))]
            Error::Activation { source, .. } => source.kind(),
            Error::Handoff { source, .. } => source.kind(),
            #[cfg(all(feature = "xdp", target_os = "linux"))]
            Error::Xdp { source, .. } => source.kind(),
            #[cfg(feature = "tokio")]
            Error::NoRuntime { .. } => ErrorKind::Other,
            #[cfg(feature = "tokio")]
            Error::Cancelled { .. } => ErrorKind::Other,
        }
    }
}

/// Whether a receive error means "the read timeout expired".
///
/// Unix reports `WouldBlock` (`EAGAIN`), Windows `TimedOut`.
pub(crate) fn is_timeout(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

impl Error {
    /// [`Error::InvalidConfig`] for `setting` (`Type::method`), which must
    /// be as `reason` says.
    pub(crate) fn invalid(setting: &'static str, reason: &'static str) -> Error {
        Error::InvalidConfig {
            setting,
            reason,
            addr: None,
        }
    }

    /// [`Error::InvalidConfig`] for `setting`, which does not fit `addr`.
    pub(crate) fn invalid_for(
        setting: &'static str,
        addr: SocketAddr,
        reason: &'static str,
    ) -> Error {
        Error::InvalidConfig {
            setting,
            reason,
            addr: Some(addr),
        }
    }
}
