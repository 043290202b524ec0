//! Socket creation: every socket in the crate is made, configured and bound
//! (or connected) here, through socket2.

use std::fmt;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use crate::error::Error;
use crate::sys;

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
    /// `SO_BUSY_POLL` (Linux).
    pub(crate) so_busy_poll: Option<Duration>,
    /// The user's own settings, run last, in order.
    pub(crate) hooks: Vec<SocketHook>,
}

/// A socket setting of the user's, run on each socket before bind, with
/// its name for errors.
#[derive(Clone)]
pub(crate) struct SocketHook {
    pub(crate) setting: String,
    pub(crate) hook: Arc<HookFn>,
}

/// A user's socket setting (see [`SocketHook`]).
pub(crate) type HookFn = dyn Fn(&Socket) -> io::Result<()> + Send + Sync;

// A hook runs only inside a bind, on the caller's thread, and a panic in it
// reaches that caller (it is never caught and resumed by the crate): a
// builder holding hooks is as unwind-safe as one without, as it was before
// hooks existed.
impl std::panic::UnwindSafe for SocketHook {}
impl std::panic::RefUnwindSafe for SocketHook {}

impl fmt::Debug for SocketHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SocketHook").field(&self.setting).finish()
    }
}

impl SocketOptions {
    /// Checks `so_busy_poll`, set through the builder method `setting`:
    /// Linux only, and at most `i32::MAX` microseconds, the most the option
    /// takes (a larger value would fail at bind with `EINVAL`).
    pub(crate) fn check_so_busy_poll(&self, setting: &'static str) -> Result<(), Error> {
        let Some(duration) = self.so_busy_poll else {
            return Ok(());
        };
        if !cfg!(target_os = "linux") {
            return Err(Error::invalid(setting, "SO_BUSY_POLL is Linux only"));
        }
        if duration.as_micros() > i32::MAX as u128 {
            return Err(Error::invalid(
                setting,
                "must be at most i32::MAX microseconds (about 35 minutes)",
            ));
        }
        Ok(())
    }
}

/// A socket made (or adopted) by this module, bound, with the buffer sizes
/// it was granted.
#[derive(Debug)]
pub(crate) struct BoundSocket {
    pub(crate) socket: Socket,
    pub(crate) local_addr: SocketAddr,
    pub(crate) recv_buffer: BufferSize,
    pub(crate) send_buffer: BufferSize,
    /// ICMP reports about earlier replies are kept out of the receive path
    /// (see [`sys::Prepared`]); `false` for a connected (client) socket,
    /// which is told of them on purpose.
    pub(crate) icmp_reports_off: bool,
}

/// The socket addresses an input resolved to: at least one.
pub(crate) struct Resolved {
    first: SocketAddr,
    rest: Vec<SocketAddr>,
}

/// Resolves `addr` to its socket addresses, naming the input on failure.
pub(crate) fn resolve<A: ToSocketAddrs + fmt::Debug>(addr: A) -> Result<Resolved, Error> {
    let input = format!("{addr:?}");
    match addr.to_socket_addrs() {
        Ok(addrs) => Resolved::from_addrs(input, addrs),
        Err(source) => Err(Error::Resolve { input, source }),
    }
}

impl Resolved {
    /// The addresses `input` resolved to, naming it when there are none.
    pub(crate) fn from_addrs(
        input: String,
        addrs: impl IntoIterator<Item = SocketAddr>,
    ) -> Result<Resolved, Error> {
        let mut addrs = addrs.into_iter();
        let Some(first) = addrs.next() else {
            return Err(Error::Resolve {
                input,
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "it resolved to no socket address",
                ),
            });
        };
        Ok(Resolved {
            first,
            rest: addrs.collect(),
        })
    }
}

/// Tries `f` on each address in turn; returns the first success or the last
/// error, like `std::net::UdpSocket::bind`.
pub(crate) fn first_ok<T>(
    addrs: &Resolved,
    mut f: impl FnMut(SocketAddr) -> Result<T, Error>,
) -> Result<T, Error> {
    let mut result = f(addrs.first);
    for &addr in &addrs.rest {
        if result.is_ok() {
            break;
        }
        result = f(addr);
    }
    result
}

/// Creates a UDP socket for `addr`'s family, applies `opts`, and binds it.
pub(crate) fn bind(addr: SocketAddr, opts: &SocketOptions) -> Result<BoundSocket, Error> {
    let (socket, prepared) = configured_server(addr, opts)?;
    bind_configured(&socket, addr)?;
    finish(socket, addr, opts, prepared.icmp_reports_off)
}

/// Creates a client's UDP socket for `addr`'s family, applies `opts`, and
/// binds it to `addr` (unconnected: it sends to any address).
pub(crate) fn bind_client(addr: SocketAddr, opts: &SocketOptions) -> Result<BoundSocket, Error> {
    let socket = configured(addr, opts)?;
    bind_configured(&socket, addr)?;
    finish(socket, addr, opts, false)
}

/// A server socket for `addr`, configured, not yet bound, and how the
/// platform's own settings went. A setting the platform refuses fails the
/// bind only where the server cannot do without it (Windows'
/// `SO_EXCLUSIVEADDRUSE`), with an error naming that setting.
fn configured_server(
    addr: SocketAddr,
    opts: &SocketOptions,
) -> Result<(Socket, sys::Prepared), Error> {
    let socket = configured(addr, opts)?;
    let prepared = sys::prepare_server_socket(&socket, opts.reuse_address || opts.reuse_port)
        .map_err(|refused| Error::Socket {
            action: refused.setting.action(),
            addr,
            source: refused.source,
        })?;
    Ok((socket, prepared))
}

fn bind_configured(socket: &Socket, addr: SocketAddr) -> Result<(), Error> {
    socket.bind(&addr.into()).map_err(|source| {
        if source.kind() == io::ErrorKind::AddrInUse {
            Error::AddrInUse { addr, source }
        } else {
            Error::Bind { addr, source }
        }
    })
}

/// Binds `count` sockets to `addr`, all sharing it through `SO_REUSEPORT`
/// when there are several.
///
/// Unless `opts` asks for `SO_REUSEPORT` itself (to share the address with
/// other servers on purpose), the first socket binds without it, so that
/// the bind fails with [`Error::AddrInUse`] when any other socket holds the
/// address, even one that allows sharing; it turns the option on once
/// bound, and the others join it. `SO_REUSEPORT` lets later sockets of the
/// same user join the group all the same: the kernel has no way to close it.
pub(crate) fn bind_workers(
    addr: SocketAddr,
    opts: &SocketOptions,
    count: usize,
) -> Result<(BoundSocket, Vec<BoundSocket>), Error> {
    let (first, shared) = if count <= 1 || opts.reuse_port {
        (bind(addr, opts)?, opts.clone())
    } else {
        let (socket, prepared) = configured_server(addr, opts)?;
        bind_configured(&socket, addr)?;
        set_reuse_port(&socket).map_err(|source| Error::Socket {
            action: "set SO_REUSEPORT",
            addr,
            source,
        })?;
        let shared = SocketOptions {
            reuse_port: true,
            ..opts.clone()
        };
        (
            finish(socket, addr, opts, prepared.icmp_reports_off)?,
            shared,
        )
    };
    let bound = first.local_addr;
    let others = (1..count)
        .map(|_| bind(bound, &shared))
        .collect::<Result<_, _>>()?;
    Ok((first, others))
}

/// Creates a UDP socket for `peer`'s family, applies `opts`, and connects it
/// to `peer` (which binds an ephemeral port and makes the kernel drop
/// datagrams from anyone else).
pub(crate) fn connect(peer: SocketAddr, opts: &SocketOptions) -> Result<BoundSocket, Error> {
    let socket = configured(peer, opts)?;
    socket.connect(&peer.into()).map_err(|source| Error::Io {
        action: "connect UDP socket to",
        addr: peer,
        source,
    })?;
    finish(socket, peer, opts, false)
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
    set_buffer_sizes(&socket, addr, opts)?;
    if let Some(duration) = opts.so_busy_poll {
        sys::set_busy_poll(&socket, duration).map_err(fail("set SO_BUSY_POLL"))?;
    }
    for hook in &opts.hooks {
        // The user's code: a panic in it is the caller's, as in any builder
        // callback run on the caller's thread.
        (hook.hook)(&socket).map_err(|source| Error::SocketSetting {
            setting: hook.setting.clone(),
            addr,
            source,
        })?;
    }
    Ok(socket)
}

/// Whether socket2 sets both `IP_TOS` and `IPV6_TCLASS` on this system.
pub(crate) use traffic_class::SETS as SETS_TRAFFIC_CLASS;
/// Marks what `socket` sends with `dscp` (ECN bits 0): `IP_TOS` on IPv4,
/// `IPV6_TCLASS` on IPv6, and both on a dual-stack socket. Unsupported
/// where socket2 cannot set both (see [`SETS_TRAFFIC_CLASS`]).
pub(crate) use traffic_class::set as set_reply_dscp;

#[cfg(any(
    target_os = "android",
    target_os = "dragonfly",
    target_os = "freebsd",
    target_os = "fuchsia",
    target_os = "illumos",
    target_os = "linux",
    target_os = "macos",
    target_os = "netbsd",
    target_os = "openbsd",
))]
mod traffic_class {
    use std::io;

    use socket2::Socket;

    pub(crate) const SETS: bool = true;

    pub(crate) fn set(socket: &Socket, ipv6: bool, dscp: u8) -> io::Result<()> {
        let class = u32::from(dscp) << 2;
        if !ipv6 || !socket.only_v6()? {
            socket.set_tos_v4(class)?;
        }
        if ipv6 {
            socket.set_tclass_v6(class)?;
        }
        Ok(())
    }
}

#[cfg(not(any(
    target_os = "android",
    target_os = "dragonfly",
    target_os = "freebsd",
    target_os = "fuchsia",
    target_os = "illumos",
    target_os = "linux",
    target_os = "macos",
    target_os = "netbsd",
    target_os = "openbsd",
)))]
mod traffic_class {
    use std::io;

    use socket2::Socket;

    pub(crate) const SETS: bool = false;

    /// Refused before any socket is made (see `ServerBuilder::reply_dscp`).
    pub(crate) fn set(_: &Socket, _: bool, _: u8) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }
}

/// The largest buffer size the kernel takes: the option is a C `int`, and a
/// larger `usize` would wrap in the cast (`1 << 32` becomes 0, which Linux
/// raises to its minimum of about 2 KiB).
const MAX_BUFFER_REQUEST: usize = i32::MAX as usize;

fn set_buffer_sizes(socket: &Socket, addr: SocketAddr, opts: &SocketOptions) -> Result<(), Error> {
    let fail = |action| {
        move |source| Error::Socket {
            action,
            addr,
            source,
        }
    };
    if let Some(size) = opts.recv_buffer {
        socket
            .set_recv_buffer_size(size.min(MAX_BUFFER_REQUEST))
            .map_err(fail("set SO_RCVBUF"))?;
    }
    if let Some(size) = opts.send_buffer {
        socket
            .set_send_buffer_size(size.min(MAX_BUFFER_REQUEST))
            .map_err(fail("set SO_SNDBUF"))?;
    }
    Ok(())
}

/// Takes a socket made elsewhere for a server: checks that it is a bound
/// UDP socket over IPv4 or IPv6, puts it in blocking mode, and sets the
/// buffer sizes `opts` asks for.
pub(crate) fn adopt(socket: Socket, opts: &SocketOptions) -> Result<BoundSocket, Error> {
    let unsuitable = |reason| Error::UnsuitableSocket { reason };
    let addr = socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .ok_or(unsuitable("it is not an IPv4 or IPv6 socket"))?;
    if addr.port() == 0 {
        return Err(unsuitable("it is not bound: bind it to an address first"));
    }
    let fail = |action| {
        move |source| Error::Socket {
            action,
            addr,
            source,
        }
    };
    if socket.r#type().map_err(fail("read SO_TYPE"))? != Type::DGRAM {
        return Err(unsuitable("it is not a datagram (SOCK_DGRAM) socket"));
    }
    check_udp(&socket)
        .map_err(fail("read SO_PROTOCOL"))?
        .then_some(())
        .ok_or(unsuitable(
            "it is a datagram socket of another protocol than UDP",
        ))?;
    if sys::is_shut_for_reading(&socket) {
        return Err(unsuitable(
            "it is shut down for reading: a server on it would receive nothing and spin",
        ));
    }
    let prepared = sys::prepare_adopted_socket(&socket);
    // A non-blocking socket would make the server spin between datagrams.
    socket
        .set_nonblocking(false)
        .map_err(fail("make the socket blocking"))?;
    socket
        .set_read_timeout(Some(sys::ADOPTED_WAKE_INTERVAL))
        .map_err(fail("set SO_RCVTIMEO"))?;
    set_buffer_sizes(&socket, addr, opts)?;
    if let Some(duration) = opts.so_busy_poll {
        sys::set_busy_poll(&socket, duration).map_err(fail("set SO_BUSY_POLL"))?;
    }
    finish(socket, addr, opts, prepared.icmp_reports_off)
}

/// Whether a datagram socket is UDP, where the system can tell.
#[allow(unreachable_code)]
pub(crate) fn check_udp(socket: &Socket) -> io::Result<bool> {
    #[cfg(any(
        target_os = "android",
        target_os = "freebsd",
        target_os = "fuchsia",
        target_os = "linux",
    ))]
    return Ok(socket.protocol()?.is_none_or(|p| p == Protocol::UDP));
    let _ = socket;
    Ok(true)
}

fn finish(
    socket: Socket,
    addr: SocketAddr,
    opts: &SocketOptions,
    icmp_reports_off: bool,
) -> Result<BoundSocket, Error> {
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
    Ok(BoundSocket {
        socket,
        local_addr,
        recv_buffer,
        send_buffer,
        icmp_reports_off,
    })
}

/// Sets `SO_REUSEPORT`, or says that this platform has no such option.
// On platforms with the option, the final `Err` is unreachable: the one
// platform list lives in the `cfg` below and nowhere else. Rust 1.85 does
// not know `target_os = "cygwin"` yet.
#[allow(unreachable_code, unexpected_cfgs)]
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::{Setting, refuse};

    const LOOPBACK: &str = "127.0.0.1:0";

    fn loopback() -> SocketAddr {
        LOOPBACK.parse().expect("an address")
    }

    #[test]
    fn a_refused_exclusive_bind_fails_closed_naming_the_option() {
        let err = refuse(Setting::ExclusiveAddrUse, || {
            bind(loopback(), &SocketOptions::default())
        })
        .expect_err("no server without its address to itself");
        assert_eq!(
            err.to_string(),
            "cannot set SO_EXCLUSIVEADDRUSE (take the address exclusively) on the UDP socket \
             for 127.0.0.1:0"
        );
        let Error::Socket { source, .. } = &err else {
            panic!("{err:?}");
        };
        assert_eq!(source.kind(), io::ErrorKind::Unsupported);
        // Sharing the address was asked for: nothing exclusive to refuse.
        let shared = SocketOptions {
            reuse_address: true,
            ..SocketOptions::default()
        };
        refuse(Setting::ExclusiveAddrUse, || bind(loopback(), &shared)).expect("shared");
    }

    #[test]
    fn a_refused_icmp_ioctl_still_binds_and_is_recorded() {
        for ioctl in [Setting::UdpConnReset, Setting::UdpNetReset] {
            let bound = refuse(ioctl, || bind(loopback(), &SocketOptions::default()))
                .unwrap_or_else(|e| panic!("{ioctl:?} refused: {e}"));
            assert!(!bound.icmp_reports_off, "{ioctl:?} refused");
            let adopted = refuse(ioctl, || {
                let socket = std::net::UdpSocket::bind(LOOPBACK).expect("bind");
                adopt(Socket::from(socket), &SocketOptions::default())
            })
            .unwrap_or_else(|e| panic!("{ioctl:?} refused: {e}"));
            assert!(!adopted.icmp_reports_off, "{ioctl:?} refused");
        }
        let bound = bind(loopback(), &SocketOptions::default()).expect("bind");
        let client = connect(bound.local_addr, &SocketOptions::default()).expect("connect");
        // A connected (client) socket is told of ICMP reports on purpose.
        assert!(!client.icmp_reports_off);
    }
}
