//! What a server hands to its handler, what the handler answers, and the
//! classic greet handler.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// One datagram as the server received it, handed to the handler.
///
/// The data is borrowed from the server's receive buffer: copy what must
/// outlive the call.
#[derive(Clone, Copy)]
pub struct Request<'a> {
    data: &'a [u8],
    peer: SocketAddr,
    local: Option<IpAddr>,
}

impl<'a> Request<'a> {
    pub(crate) fn new(data: &'a [u8], peer: SocketAddr, local: Option<IpAddr>) -> Self {
        Request { data, peer, local }
    }

    /// The datagram's payload, complete (truncated datagrams never reach a
    /// handler). It may be empty: a zero-length datagram is a valid request.
    #[must_use]
    pub fn data(&self) -> &'a [u8] {
        self.data
    }

    /// The address the datagram came from, which a reply goes back to.
    ///
    /// UDP source addresses are not authenticated: anyone can write any
    /// address on a datagram.
    #[must_use]
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The address the datagram was sent to, which the reply comes from.
    ///
    /// For a server bound to a wildcard address (`0.0.0.0`, `[::]`) on Linux
    /// this is read from the datagram (`IP_PKTINFO` / `IPV6_PKTINFO`); for a
    /// server bound to one address it is that address. `None` for a
    /// wildcard-bound server on other platforms.
    ///
    /// It is always in the family of [`peer`](Request::peer): on a
    /// dual-stack socket (`[::]` with
    /// [`only_v6(false)`](crate::ServerBuilder::only_v6)) an IPv4 peer is an
    /// IPv4-mapped IPv6 address such as `[::ffff:127.0.0.1]:5353`, and the
    /// address it sent to is mapped the same way (`::ffff:127.0.0.1`).
    #[must_use]
    pub fn local_ip(&self) -> Option<IpAddr> {
        self.local
    }
}

impl fmt::Debug for Request<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("peer", &self.peer)
            .field("local", &self.local)
            .field("len", &self.data.len())
            .finish()
    }
}

/// What the server does once the handler returns.
///
/// More actions may come in later versions (the enum is
/// `#[non_exhaustive]`); handlers return one, and code that matches on one
/// needs a wildcard arm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[must_use = "the server needs to know whether to send the reply"]
#[non_exhaustive]
pub enum Action {
    /// Send the reply buffer's contents (possibly empty) to the peer.
    Reply,
    /// Send nothing; the datagram is counted as
    /// [`no_reply`](crate::Stats::no_reply).
    Ignore,
}

/// The classic greet handler: replies `b"Hello, " + request + b"!"`.
///
/// It writes into the server's reused reply buffer and so allocates nothing
/// once that buffer has grown to fit.
///
/// # Examples
///
/// ```
/// # fn main() -> Result<(), udp_greet::Error> {
/// use udp_greet::{GreetClient, GreetServer};
///
/// let server = GreetServer::bind("127.0.0.1:0")?.spawn(udp_greet::greet)?;
/// let client = GreetClient::connect(server.local_addr())?;
/// assert_eq!(client.send_recv(b"Michael")?, b"Hello, Michael!");
/// # server.shutdown()?;
/// # Ok(())
/// # }
/// ```
pub fn greet(request: Request<'_>, reply: &mut Vec<u8>) -> Action {
    greet_into(request.data(), reply);
    Action::Reply
}

/// Appends the greeting for `name` to `out`: `Hello, <name>!`.
///
/// The same bytes that [`greet`] replies with, for clients that want to
/// check a reply or build one without a server.
///
/// ```
/// let mut out = Vec::new();
/// udp_greet::greet_into(b"Tracy", &mut out);
/// assert_eq!(out, b"Hello, Tracy!");
/// ```
pub fn greet_into(name: &[u8], out: &mut Vec<u8>) {
    out.reserve(GREETING_OVERHEAD + name.len());
    out.extend_from_slice(b"Hello, ");
    out.extend_from_slice(name);
    out.push(b'!');
}

/// Whether `reply` is exactly the greeting for `request`.
///
/// Suitable as a client's reply check.
///
/// ```
/// assert!(udp_greet::is_greeting(b"Sarah", b"Hello, Sarah!"));
/// assert!(!udp_greet::is_greeting(b"Sarah", b"Hello, Tracy!"));
/// ```
#[must_use]
pub fn is_greeting(request: &[u8], reply: &[u8]) -> bool {
    reply.len() == GREETING_OVERHEAD + request.len()
        && reply.starts_with(b"Hello, ")
        && reply.ends_with(b"!")
        && reply.get(7..reply.len() - 1) == Some(request)
}

/// The bytes a greeting adds to the name: `"Hello, "` and `"!"`.
const GREETING_OVERHEAD: usize = 8;
