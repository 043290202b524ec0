//! Descriptors passed to another process (Unix): over a Unix socket
//! (`SCM_RIGHTS`), or across `exec`.

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// The most descriptors one message carries (Linux takes at most 253 in
/// one `SCM_RIGHTS` message).
pub(crate) const MAX_FDS_PER_MESSAGE: usize = 200;

/// The room a control message with `fds` descriptors takes.
fn space_for(fds: usize) -> usize {
    let bytes = u32::try_from(fds * mem::size_of::<RawFd>()).unwrap_or(u32::MAX);
    // SAFETY: `CMSG_SPACE` is arithmetic on its argument only.
    unsafe { libc::CMSG_SPACE(bytes) as usize }
}

/// Sends `data` with `fds` attached (at most [`MAX_FDS_PER_MESSAGE`]) over
/// the Unix socket `socket`: the descriptors travel with the first byte.
pub(crate) fn send_with_fds(
    socket: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    if fds.len() > MAX_FDS_PER_MESSAGE || data.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many descriptors for one message, or no data to carry them",
        ));
    }
    // `u64`s, so that the buffer is aligned for `cmsghdr`.
    let mut control = vec![0u64; space_for(fds.len()).div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: an all-zero `msghdr` is a valid empty one.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = (control.len() * 8) as _;
        // SAFETY: `msg_control` points to `msg_controllen` bytes, aligned
        // and large enough for one header with `fds.len()` descriptors
        // (`space_for`), so the first header is inside the buffer, and its
        // data (`CMSG_DATA`) has room for the descriptors copied into it.
        unsafe {
            let header = libc::CMSG_FIRSTHDR(&msg);
            (*header).cmsg_level = libc::SOL_SOCKET;
            (*header).cmsg_type = libc::SCM_RIGHTS;
            (*header).cmsg_len = libc::CMSG_LEN((fds.len() * mem::size_of::<RawFd>()) as u32) as _;
            let place = libc::CMSG_DATA(header).cast::<RawFd>();
            for (i, fd) in fds.iter().enumerate() {
                place.add(i).write_unaligned(fd.as_raw_fd());
            }
        }
    }
    let flags = {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            libc::MSG_NOSIGNAL
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        {
            0
        }
    };
    let sent = loop {
        // SAFETY: `msg` and everything it points to (`iov`, `data`,
        // `control`) live across the call; the kernel only reads them.
        let sent = unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, flags) };
        if sent >= 0 {
            break sent as usize;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    };
    // The descriptors went with the first byte; the rest follows plainly.
    let mut rest = data.get(sent..).unwrap_or_default();
    while !rest.is_empty() {
        // SAFETY: `rest` is a live slice of `rest.len()` bytes.
        let n = unsafe { libc::send(socket.as_raw_fd(), rest.as_ptr().cast(), rest.len(), flags) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        rest = rest.get(n as usize..).unwrap_or_default();
    }
    Ok(())
}

/// What one [`recv_with_fds`] took.
#[derive(Debug)]
pub(crate) struct WithFds {
    /// Bytes read into the buffer (0: the other end has closed).
    pub(crate) len: usize,
    /// The descriptors that came with them, owned (closed on exec).
    pub(crate) fds: Vec<OwnedFd>,
    /// The kernel had more descriptors than room for them (`MSG_CTRUNC`):
    /// those are lost.
    pub(crate) truncated: bool,
}

/// Receives into `buf` from the Unix socket `socket`, with up to `max_fds`
/// descriptors attached to what is read.
pub(crate) fn recv_with_fds(
    socket: BorrowedFd<'_>,
    buf: &mut [u8],
    max_fds: usize,
) -> io::Result<WithFds> {
    let mut control = vec![0u64; space_for(max_fds.max(1)).div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero `msghdr` is a valid empty one.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = (control.len() * 8) as _;
    // Close-on-exec as they arrive where the system can (elsewhere just
    // after, below).
    let flags = {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            libc::MSG_CMSG_CLOEXEC
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        {
            0
        }
    };
    let len = loop {
        // SAFETY: `msg` points to `buf` and `control`, both live and
        // writable for the lengths given, across the call.
        let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, flags) };
        if n >= 0 {
            break n as usize;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: after a successful `recvmsg`, `msg_control` holds
    // `msg_controllen` bytes of control messages written by the kernel;
    // `CMSG_FIRSTHDR`/`CMSG_NXTHDR` stay within them, and an `SCM_RIGHTS`
    // message's data holds `(cmsg_len - CMSG_LEN(0)) / size_of::<RawFd>()`
    // descriptors, each new in this process and owned by no one else, so
    // each is taken into an `OwnedFd` exactly once.
    unsafe {
        let mut header = libc::CMSG_FIRSTHDR(&msg);
        while !header.is_null() {
            if (*header).cmsg_level == libc::SOL_SOCKET && (*header).cmsg_type == libc::SCM_RIGHTS {
                let bytes =
                    ((*header).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
                let data = libc::CMSG_DATA(header).cast::<RawFd>();
                for i in 0..bytes / mem::size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            header = libc::CMSG_NXTHDR(&msg, header);
        }
    }
    if flags == 0 {
        for fd in &fds {
            set_cloexec(fd.as_raw_fd())?;
        }
    }
    Ok(WithFds {
        len,
        fds,
        truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
    })
}

/// Sets close-on-exec on `fd`.
fn set_cloexec(fd: RawFd) -> io::Result<()> {
    set_inheritable(fd, false)
}

/// Clears (`inheritable`) or sets close-on-exec on `fd`.
pub(crate) fn set_inheritable(fd: RawFd, inheritable: bool) -> io::Result<()> {
    // SAFETY: `fcntl` with `F_GETFD`/`F_SETFD` reads and sets a flag of
    // the descriptor; an invalid one fails with `EBADF`.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let flags = if inheritable {
        flags & !libc::FD_CLOEXEC
    } else {
        flags | libc::FD_CLOEXEC
    };
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether descriptor `fd` is open and a UDP socket (IPv4 or IPv6, an
/// error says why not); nothing is changed.
pub(crate) fn check_udp_socket(fd: RawFd) -> io::Result<()> {
    let mut kind: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `kind` and `len` are live and sized as `SO_TYPE` needs; an
    // invalid descriptor or one that is not a socket fails the call.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&raw mut kind).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        let err = io::Error::last_os_error();
        let what = if err.raw_os_error() == Some(libc::EBADF) {
            "is not open"
        } else {
            "is not a UDP socket"
        };
        return Err(io::Error::new(
            err.kind(),
            format!("descriptor {fd} {what} ({err})"),
        ));
    }
    // SAFETY: an all-zero `sockaddr_storage` is a valid (empty) one.
    let mut addr: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let mut addr_len = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `addr` and `addr_len` are live, and `addr_len` is the size of
    // `addr`, which the call writes at most.
    let rc = unsafe { libc::getsockname(fd, (&raw mut addr).cast(), &mut addr_len) };
    let family = libc::c_int::from(addr.ss_family);
    if kind != libc::SOCK_DGRAM || rc < 0 || !(family == libc::AF_INET || family == libc::AF_INET6)
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("descriptor {fd} is not a UDP socket"),
        ));
    }
    let port = if family == libc::AF_INET {
        // SAFETY: the kernel wrote an IPv4 address (`AF_INET`) into `addr`,
        // which is large and aligned enough for any socket address.
        unsafe { (*(&raw const addr).cast::<libc::sockaddr_in>()).sin_port }
    } else {
        // SAFETY: likewise, an IPv6 address (`AF_INET6`).
        unsafe { (*(&raw const addr).cast::<libc::sockaddr_in6>()).sin6_port }
    };
    if port == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("descriptor {fd} is a UDP socket not bound to a port"),
        ));
    }
    Ok(())
}

/// Takes ownership of descriptor `fd`, inherited across `exec` from the
/// process this one replaced, and marks it close-on-exec.
///
/// The caller makes sure `fd` is open (see [`check_udp_socket`]), was
/// named to this process for it to own (by the handoff's environment, with
/// this process's id), and is taken once (`Handoff::from_env` runs once
/// per process).
pub(crate) fn take_inherited(fd: RawFd) -> OwnedFd {
    // SAFETY: per the caller's contract, `fd` is an open descriptor passed
    // to this process for it to own, which nothing else owns or will take
    // again, so it may be closed when dropped.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // Best effort: a descriptor left open across a later `exec` leaks no
    // more than the socket.
    let _ = set_cloexec(owned.as_raw_fd());
    owned
}
