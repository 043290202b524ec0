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
    listener: SocketAddr,
    metadata: Metadata,
    validated: bool,
}

impl<'a> Request<'a> {
    pub(crate) fn new(
        data: &'a [u8],
        peer: SocketAddr,
        local: Option<IpAddr>,
        listener: SocketAddr,
        metadata: Metadata,
        validated: bool,
    ) -> Self {
        Request {
            data,
            peer,
            local,
            listener,
            metadata,
            validated,
        }
    }

    /// Whether the request carried a valid [source token](crate::SourceTokens)
    /// for its address: a client at that address received the token from
    /// a server sharing the secret, within the token's lifetime. That rules
    /// out blind forgery; it does not rule out a replay by someone on the
    /// path who saw the token (see
    /// [`SourceTokens::validated_limit`](crate::SourceTokens::validated_limit)).
    /// Always `false` without
    /// [`ServerBuilder::source_tokens`](crate::ServerBuilder::source_tokens).
    #[must_use]
    pub fn validated(&self) -> bool {
        self.validated
    }

    /// The address of the listener the datagram came in on, as bound (a
    /// wildcard address stays one: `0.0.0.0:53`), with its real port: one
    /// of the server's [`local_addrs`](crate::GreetServer::local_addrs).
    /// Tells apart the addresses of a server bound with
    /// [`bind_all`](crate::ServerBuilder::bind_all).
    #[must_use]
    pub fn listener(&self) -> SocketAddr {
        self.listener
    }

    /// The full address the datagram was sent to, which the reply comes
    /// from: [`local_ip`](Request::local_ip) with the listener's port;
    /// `None` where that address is not known (a wildcard-bound server off
    /// Linux).
    #[must_use]
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local
            .map(|ip| SocketAddr::new(ip, self.listener.port()))
    }

    /// What the network layer said about the datagram: its ECN bits, DSCP,
    /// TTL or hop limit, and arrival interface. Empty (every field `None`)
    /// unless the server asks for it with
    /// [`ServerBuilder::recv_metadata`](crate::ServerBuilder::recv_metadata).
    #[must_use]
    pub fn metadata(&self) -> Metadata {
        self.metadata
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
            .field("listener", &self.listener)
            .field("len", &self.data.len())
            .field("metadata", &self.metadata)
            .field("validated", &self.validated)
            .finish()
    }
}

/// What the network layer reported with one datagram, where the server asks
/// for it ([`ServerBuilder::recv_metadata`](crate::ServerBuilder::recv_metadata),
/// Linux only): read from the control messages of the receive that took the
/// datagram, on the batched and the portable path alike.
///
/// A field the kernel did not report is `None`; without `recv_metadata`
/// every field is.
///
/// ```
/// use udp_greet::{Action, Ecn, GreetServer};
///
/// # fn main() -> Result<(), udp_greet::Error> {
/// # if !cfg!(target_os = "linux") { return Ok(()); }
/// let server = GreetServer::builder()
///     .recv_metadata(true)
///     .bind("127.0.0.1:0")?
///     .spawn(|request: udp_greet::Request<'_>, reply: &mut Vec<u8>| {
///         let meta = request.metadata();
///         // Congestion marked on the way: a protocol would slow down here.
///         let congested = meta.ecn() == Some(Ecn::Ce);
///         reply.push(u8::from(congested));
///         reply.push(meta.ttl().unwrap_or(0));
///         Action::Reply
///     })?;
/// let client = udp_greet::GreetClient::connect(server.local_addr())?;
/// let reply = client.send_recv(b"?")?;
/// assert_eq!(reply[0], 0);
/// assert_ne!(reply[1], 0); // the client's TTL (64 on a stock Linux)
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Metadata {
    traffic_class: Option<u8>,
    ttl: Option<u8>,
    interface: Option<u32>,
}

impl Metadata {
    /// From what the platform layer read, when the server asked for it.
    pub(crate) fn from_arrival(arrival: &crate::sys::Arrival) -> Metadata {
        Metadata {
            traffic_class: arrival.tos,
            ttl: arrival.ttl,
            interface: Some(arrival.ifindex).filter(|&index| index != 0),
        }
    }

    /// The whole TOS byte (IPv4) or traffic class (IPv6): the DSCP in its
    /// upper six bits, the ECN codepoint in its lower two.
    #[must_use]
    pub fn traffic_class(&self) -> Option<u8> {
        self.traffic_class
    }

    /// The ECN codepoint (RFC 3168): whether the sender's transport
    /// understands ECN, and whether a router on the way marked congestion.
    #[must_use]
    pub fn ecn(&self) -> Option<Ecn> {
        self.traffic_class.map(Ecn::from_traffic_class)
    }

    /// The DSCP (differentiated services codepoint, 0 to 63) the datagram
    /// was marked with.
    #[must_use]
    pub fn dscp(&self) -> Option<u8> {
        self.traffic_class.map(|class| class >> 2)
    }

    /// The TTL (IPv4) or hop limit (IPv6) the datagram arrived with: what
    /// its sender set, less one for each router on the way.
    #[must_use]
    pub fn ttl(&self) -> Option<u8> {
        self.ttl
    }

    /// The index of the network interface the datagram arrived on (as
    /// `if_nametoindex` gives it; `ip link` lists them).
    #[must_use]
    pub fn interface(&self) -> Option<u32> {
        self.interface
    }
}

/// The ECN codepoint of a datagram (RFC 3168): the two low bits of its TOS
/// byte or traffic class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ecn {
    /// `00`: the sender does not use ECN.
    NotEct,
    /// `01`: ECN-capable transport, codepoint 1 (also L4S).
    Ect1,
    /// `10`: ECN-capable transport, codepoint 0.
    Ect0,
    /// `11`: congestion experienced, marked by a router on the way.
    Ce,
}

impl Ecn {
    /// The codepoint in the low two bits of `class`.
    #[must_use]
    pub fn from_traffic_class(class: u8) -> Ecn {
        match class & 0b11 {
            0b00 => Ecn::NotEct,
            0b01 => Ecn::Ect1,
            0b10 => Ecn::Ect0,
            _ => Ecn::Ce,
        }
    }

    /// The codepoint's two bits.
    #[must_use]
    pub fn bits(self) -> u8 {
        match self {
            Ecn::NotEct => 0b00,
            Ecn::Ect1 => 0b01,
            Ecn::Ect0 => 0b10,
            Ecn::Ce => 0b11,
        }
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
