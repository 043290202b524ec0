//! Socket creation: every socket in the crate is made, configured and bound
//! (or connected) here, through socket2.

use std::fmt;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};

use socket2::{Domain, Protocol, Socket, Type};

use crate::error::Error;

/// A socket buffer size: what was asked for, and what the kernel granted.
///
/// Kernels adjust buffer sizes silently: Linux doubles the requested value
/// (for its own bookkeeping) and caps the request at `net.core.rmem_max` /
/// `net.core.wmem_max`. [`is_clamped`](BufferSize::is_clamped) tells when the
/// kernel granted less than was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct BufferSize {
    /// The size given to the builder, if any (`None`: the system default).
    pub requested: Option<usize>,
    /// The size the kernel reports for the socket after it was set.
    pub granted: usize,
}

impl BufferSize {
    /// Whether the kernel granted less than was requested.
    ///
    /// On Linux, raise `net.core.rmem_max` (receive) or `net.core.wmem_max`
    /// (send) to allow larger buffers.
    #[must_use]
    pub fn is_clamped(&self) -> bool {
        self.requested.is_some_and(|r| self.granted < r)
    }
}

/// Socket options shared by servers and clients, applied before bind.
#[derive(Debug, Clone, Default)]
pub(crate) struct SocketOptions {
    pub(crate) recv_buffer: Option<usize>,
    pub(crate) send_buffer: Option<usize>,
    pub(crate) reuse_address: bool,
    pub(crate) reuse_port: bool,
    /// `IPV6_V6ONLY` for IPv6 sockets; always set explicitly.
    pub(crate) only_v6: bool,
}

/// A socket made by this module, with the buffer sizes it was granted.
#[derive(Debug)]
pub(crate) struct Made {
    pub(crate) socket: Socket,
    pub(crate) local_addr: SocketAddr,
    pub(crate) recv_buffer: BufferSize,
    pub(crate) send_buffer: BufferSize,
}

/// Resolves `addr` to its socket addresses, naming the input on failure.
pub(crate) fn resolve<A: ToSocketAddrs + fmt::Debug>(addr: A) -> Result<Vec<SocketAddr>, Error> {
    let resolve_error = |source| Error::Resolve {
        input: format!("{addr:?}"),
        source,
    };
    let addrs: Vec<SocketAddr> = addr.to_socket_addrs().map_err(resolve_error)?.collect();
    if addrs.is_empty() {
        return Err(resolve_error(io::Error::new(
            io::ErrorKind::InvalidInput,
            "it resolved to no socket address",
        )));
    }
    Ok(addrs)
}

/// Tries `f` on each address in turn; returns the first success or the last
/// error, like `std::net::UdpSocket::bind`.
pub(crate) fn first_ok<T>(
    addrs: &[SocketAddr],
    mut f: impl FnMut(SocketAddr) -> Result<T, Error>,
) -> Result<T, Error> {
    let mut last = None;
    for &addr in addrs {
        match f(addr) {
            Ok(t) => return Ok(t),
            Err(e) => last = Some(e),
        }
    }
    // `resolve` never returns an empty list; this is the fallback for a
    // caller that passes one anyway.
    Err(last.unwrap_or(Error::InvalidConfig {
        setting: "address",
        reason: "no address to use",
    }))
}

/// Creates a UDP socket for `addr`'s family, applies `opts`, and binds it.
pub(crate) fn bind(addr: SocketAddr, opts: &SocketOptions) -> Result<Made, Error> {
    let socket = configured(addr, opts)?;
    socket.bind(&addr.into()).map_err(|source| {
        if source.kind() == io::ErrorKind::AddrInUse {
            Error::AddrInUse { addr, source }
        } else {
            Error::Bind { addr, source }
        }
    })?;
    finish(socket, addr, opts)
}

/// Creates a UDP socket for `peer`'s family, applies `opts`, and connects it
/// to `peer` (which binds an ephemeral port and makes the kernel drop
/// datagrams from anyone else).
pub(crate) fn connect(peer: SocketAddr, opts: &SocketOptions) -> Result<Made, Error> {
    let socket = configured(peer, opts)?;
    socket.connect(&peer.into()).map_err(|source| Error::Io {
        action: "connect UDP socket to",
        addr: peer,
        source,
    })?;
    finish(socket, peer, opts)
}

fn configured(addr: SocketAddr, opts: &SocketOptions) -> Result<Socket, Error> {
    let fail = |action| {
        move |source| Error::Socket {
            action,
            addr,
            source,
        }
    };
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
        .map_err(fail("create"))?;
    if addr.is_ipv6() {
        socket
            .set_only_v6(opts.only_v6)
            .map_err(fail("set IPV6_V6ONLY"))?;
    }
    if opts.reuse_address {
        socket
            .set_reuse_address(true)
            .map_err(fail("set SO_REUSEADDR"))?;
    }
    if opts.reuse_port {
        set_reuse_port(&socket).map_err(fail("set SO_REUSEPORT"))?;
    }
    if let Some(size) = opts.recv_buffer {
        socket
            .set_recv_buffer_size(size)
            .map_err(fail("set SO_RCVBUF"))?;
    }
    if let Some(size) = opts.send_buffer {
        socket
            .set_send_buffer_size(size)
            .map_err(fail("set SO_SNDBUF"))?;
    }
    Ok(socket)
}

/// Takes a socket made elsewhere, reading back its address and buffer sizes.
pub(crate) fn adopt(socket: Socket) -> Result<Made, Error> {
    let unknown = SocketAddr::from(([0, 0, 0, 0], 0));
    let addr = socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .unwrap_or(unknown);
    finish(socket, addr, &SocketOptions::default())
}

fn finish(socket: Socket, addr: SocketAddr, opts: &SocketOptions) -> Result<Made, Error> {
    let fail = |action| {
        move |source| Error::Socket {
            action,
            addr,
            source,
        }
    };
    let local_addr = socket
        .local_addr()
        .map_err(fail("read the local address"))?
        .as_socket()
        .ok_or_else(|| Error::Socket {
            action: "read the local address",
            addr,
            source: io::Error::new(io::ErrorKind::InvalidData, "not an IP address"),
        })?;
    let recv_buffer = BufferSize {
        requested: opts.recv_buffer,
        granted: socket.recv_buffer_size().map_err(fail("read SO_RCVBUF"))?,
    };
    let send_buffer = BufferSize {
        requested: opts.send_buffer,
        granted: socket.send_buffer_size().map_err(fail("read SO_SNDBUF"))?,
    };
    Ok(Made {
        socket,
        local_addr,
        recv_buffer,
        send_buffer,
    })
}

/// Sets `SO_REUSEPORT`, or says that this platform has no such option.
// On platforms with the option, the final `Err` is unreachable: the one
// platform list lives in the `cfg` below and nowhere else.
#[allow(unreachable_code)]
fn set_reuse_port(socket: &Socket) -> io::Result<()> {
    #[cfg(all(
        unix,
        not(any(
            target_os = "solaris",
            target_os = "illumos",
            target_os = "cygwin",
            target_os = "nuttx",
            target_os = "wasi"
        ))
    ))]
    return socket.set_reuse_port(true);
    let _ = socket;
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "SO_REUSEPORT is not available on this platform",
    ))
}
