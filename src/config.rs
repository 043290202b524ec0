//! The server builder: every server setting, its default, and its check.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};

use crate::error::Error;
use crate::server::GreetServer;
use crate::socket::{self, SocketOptions};

/// The largest UDP payload over IPv4: 65 535 − 20 (IP header) − 8 (UDP header).
pub const MAX_UDP_PAYLOAD_V4: usize = 65_507;
/// The largest UDP payload over IPv6 (without jumbograms): 65 535 − 8 (UDP header).
pub const MAX_UDP_PAYLOAD_V6: usize = 65_527;

/// Configures and binds a [`GreetServer`].
///
/// Every option is applied through socket2 before the socket is bound.
///
/// ```
/// # fn main() -> Result<(), udp_greet::Error> {
/// use udp_greet::GreetServer;
///
/// let server = GreetServer::builder()
///     .recv_buffer_size(1 << 20)
///     .max_datagram_size(1200)
///     .bind("127.0.0.1:0")?;
/// println!("receive buffer: {:?}", server.recv_buffer_size());
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until `bind` is called"]
pub struct ServerBuilder {
    pub(crate) socket: SocketOptions,
    pub(crate) max_datagram: Option<usize>,
}

impl Default for ServerBuilder {
    fn default() -> Self {
        ServerBuilder {
            socket: SocketOptions {
                only_v6: true,
                ..SocketOptions::default()
            },
            max_datagram: None,
        }
    }
}

impl ServerBuilder {
    /// A builder with every setting at its default.
    pub fn new() -> Self {
        Self::default()
    }

    /// Requests a receive buffer (`SO_RCVBUF`) of `bytes`.
    ///
    /// The kernel may adjust the size: read what it granted with
    /// [`GreetServer::recv_buffer_size`]. Defaults to the system default.
    pub fn recv_buffer_size(mut self, bytes: usize) -> Self {
        self.socket.recv_buffer = Some(bytes);
        self
    }

    /// Requests a send buffer (`SO_SNDBUF`) of `bytes`.
    ///
    /// Read what the kernel granted with [`GreetServer::send_buffer_size`].
    /// Defaults to the system default.
    pub fn send_buffer_size(mut self, bytes: usize) -> Self {
        self.socket.send_buffer = Some(bytes);
        self
    }

    /// Sets `SO_REUSEADDR` before binding.
    ///
    /// Defaults to `false`.
    pub fn reuse_address(mut self, on: bool) -> Self {
        self.socket.reuse_address = on;
        self
    }

    /// Sets `SO_REUSEPORT` before binding, so that other sockets that also set
    /// it can bind the same address.
    ///
    /// # Platform-specific behavior
    ///
    /// On platforms without `SO_REUSEPORT` (Windows, Solaris, illumos),
    /// binding fails with [`Error::Socket`] when this is on. On Linux the
    /// kernel spreads datagrams over the sockets by a hash of the peer's
    /// address; other systems may deliver to only one of them.
    ///
    /// Defaults to `false`.
    pub fn reuse_port(mut self, on: bool) -> Self {
        self.socket.reuse_port = on;
        self
    }

    /// Sets `IPV6_V6ONLY` on IPv6 sockets: when `true`, a socket bound to
    /// `[::]` accepts IPv6 only; when `false`, IPv4 peers too (as
    /// IPv4-mapped addresses).
    ///
    /// The option is always set explicitly, so behaviour does not depend on
    /// the platform's default (Linux: `false`, Windows and the BSDs: `true`).
    /// Ignored for IPv4 sockets. Defaults to `true`.
    pub fn only_v6(mut self, on: bool) -> Self {
        self.socket.only_v6 = on;
        self
    }

    /// The largest request the server accepts, in bytes. A larger datagram is
    /// dropped unanswered and counted in [`Stats::truncated`](crate::Stats::truncated);
    /// it never reaches the handler.
    ///
    /// Must be between 1 and 65 535. Defaults to the largest UDP payload of
    /// the bound address's family: [`MAX_UDP_PAYLOAD_V4`] (65 507) or
    /// [`MAX_UDP_PAYLOAD_V6`] (65 527).
    pub fn max_datagram_size(mut self, bytes: usize) -> Self {
        self.max_datagram = Some(bytes);
        self
    }

    /// Creates the socket, applies the options and binds it to `addr`.
    ///
    /// Each address `addr` resolves to is tried in turn, as
    /// [`std::net::UdpSocket::bind`] does.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for an out-of-range setting,
    /// [`Error::Resolve`] when `addr` does not resolve, [`Error::AddrInUse`]
    /// when another socket holds the address, [`Error::Bind`] or
    /// [`Error::Socket`] for other failures (the last address tried).
    pub fn bind<A: ToSocketAddrs + fmt::Debug>(self, addr: A) -> Result<GreetServer, Error> {
        self.validate()?;
        let addrs = socket::resolve(addr)?;
        socket::first_ok(&addrs, |addr| GreetServer::from_builder(&self, addr))
    }

    fn validate(&self) -> Result<(), Error> {
        if let Some(max) = self.max_datagram {
            if !(1..=usize::from(u16::MAX)).contains(&max) {
                return Err(Error::InvalidConfig {
                    setting: "max_datagram_size",
                    reason: "must be between 1 and 65535 bytes",
                });
            }
        }
        Ok(())
    }

    /// The largest accepted datagram for a socket bound to `addr`.
    pub(crate) fn max_datagram_for(&self, addr: SocketAddr) -> usize {
        self.max_datagram.unwrap_or(match addr {
            SocketAddr::V4(_) => MAX_UDP_PAYLOAD_V4,
            SocketAddr::V6(_) => MAX_UDP_PAYLOAD_V6,
        })
    }
}
