//! Which emulator the tests run under, found at run time.
//!
//! `.ci/platforms` runs the suite for aarch64 Linux under qemu-user and for
//! Windows under Wine. Where an emulator lacks something that the real
//! system has, the test that needs it is skipped under that emulator only,
//! and says what is missing in a line that `.ci/platforms` counts and
//! lists. The emulator is found by looking at the process itself, never by
//! a `cfg` (which would skip on the real system too) nor by an environment
//! variable alone.

use std::fmt;
use std::sync::OnceLock;

/// An emulator the test suite can run under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Emulator {
    /// qemu-user: this binary's instructions translated, its system calls
    /// passed to a Linux kernel of another architecture.
    QemuUser,
    /// Wine: the Windows API imitated on Linux.
    Wine,
}

impl fmt::Display for Emulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Emulator::QemuUser => "qemu-user",
            Emulator::Wine => "Wine",
        })
    }
}

/// The emulator this process runs under, if any (looked up once).
pub fn emulator() -> Option<Emulator> {
    static FOUND: OnceLock<Option<Emulator>> = OnceLock::new();
    *FOUND.get_or_init(detect)
}

/// Whether this process runs under `emulator`.
pub fn under(emulator: Emulator) -> bool {
    self::emulator() == Some(emulator)
}

/// Something an emulator lacks that the real system has, by name.
#[derive(Debug, Clone, Copy)]
pub struct Gap {
    pub emulator: Emulator,
    pub missing: &'static str,
}

impl Gap {
    /// Whether this process runs under the emulator with this gap; if so,
    /// says that the test skips the rest of its work for it (the test then
    /// returns).
    pub fn skips(&self) -> bool {
        self.say("skipped")
    }

    /// As [`skips`](Gap::skips), for one part of a test: the test leaves
    /// that part out and runs the rest.
    pub fn skips_part(&self) -> bool {
        self.say("skipped part")
    }

    /// As [`skips_part`](Gap::skips_part), naming what exactly is missing
    /// this time.
    pub fn skips_part_of(&self, which: &str) -> bool {
        self.say_of("skipped part", which)
    }

    fn say(&self, what: &str) -> bool {
        self.say_of(what, "")
    }

    fn say_of(&self, what: &str, which: &str) -> bool {
        let applies = under(self.emulator);
        if applies {
            let sep = if which.is_empty() { "" } else { ": " };
            println!(
                "udp-greet-test {what}: {} lacks {}{sep}{which}",
                self.emulator, self.missing
            );
        }
        applies
    }
}

/// qemu-user (7.2) answers `ENOPROTOOPT` for socket options it does not
/// translate (among them `SO_TIMESTAMPNS`, `SO_RXQ_OVFL`,
/// `IP_RECVORIGDSTADDR`); a real aarch64 kernel has them. The test names
/// the ones refused.
pub const QEMU_SOCKET_OPTIONS: Gap = Gap {
    emulator: Emulator::QemuUser,
    missing: "some socket options (setsockopt answers ENOPROTOOPT)",
};

/// The kernel's count of datagrams dropped at a socket (`Stats::kernel_drops`).
pub const QEMU_SO_MEMINFO: Gap = Gap {
    emulator: Emulator::QemuUser,
    missing: "getsockopt(SOL_SOCKET, SO_MEMINFO): it answers one int, not the kernel's \
              counters, so Stats::kernel_drops stays 0",
};

/// qemu-user passes `execve` to the host's kernel, which runs a program
/// built for the emulated machine only through a `binfmt_misc` entry for
/// qemu; without one, a program that executes itself in place (the upgrade
/// example) cannot.
pub const QEMU_EXEC: Gap = Gap {
    emulator: Emulator::QemuUser,
    missing: "a binfmt_misc entry on the host, so the program's exec of a binary for the \
              emulated machine (itself, for an upgrade in place) fails",
};

/// Windows fails a receive waiting on a connected UDP socket with
/// `WSAECONNRESET` when an ICMP "port unreachable" arrives for it; Wine 8
/// leaves the wait to run out (only a receive begun after the report sees
/// it, as `WSAECONNREFUSED`), and tells no poller either.
pub const WINE_ICMP_WAKES_A_WAIT: Gap = Gap {
    emulator: Emulator::Wine,
    missing: "the end of a receive (or readiness poll) waiting on a connected UDP socket \
              when an ICMP port unreachable arrives (WSAECONNRESET on Windows)",
};

/// Under Wine 8, once an ICMP "port unreachable" reaches a connected UDP
/// socket that tokio polls, tokio's runtime stops: no timer fires, not even
/// a 200 ms `tokio::time::timeout` around a plain `tokio::net::UdpSocket`
/// receive (a probe of tokio alone, without this crate, showed it; the same
/// probe against an open port times out every 200 ms). On Windows the
/// report ends the receive with `WSAECONNRESET`.
pub const WINE_TOKIO_REFUSAL_STALLS: Gap = Gap {
    emulator: Emulator::Wine,
    missing: "a tokio runtime that goes on once an ICMP port unreachable reaches a connected \
              UDP socket it polls (Wine's emulation stalls tokio's I/O driver: even a plain \
              tokio socket's timeout never fires)",
};

/// Windows reports the sender of a datagram from 127.0.0.2 as 127.0.0.2.
pub const WINE_LOOPBACK_SOURCES: Gap = Gap {
    emulator: Emulator::Wine,
    missing: "the sender's address of a datagram from a loopback address other than \
              127.0.0.1 (recvfrom reports 127.0.0.1)",
};

/// The command that runs this process before the program itself: under
/// qemu-user the emulator with its options (`qemu-aarch64 -L ...`), read
/// from the kernel's view of the command line, which qemu does not rewrite
/// as it does `/proc/self/cmdline`; elsewhere nothing. A test that starts
/// another binary built for the same target starts it the same way.
pub fn runner() -> Vec<std::ffi::OsString> {
    if !under(Emulator::QemuUser) {
        return Vec::new();
    }
    runner_from_task().unwrap_or_default()
}

#[cfg(target_os = "linux")]
fn runner_from_task() -> Option<Vec<std::ffi::OsString>> {
    use std::os::unix::ffi::OsStrExt;

    let task = std::fs::read_dir("/proc/self/task").ok()?.next()?.ok()?;
    let cmdline = std::fs::read(task.path().join("cmdline")).ok()?;
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    let exe = std::env::current_exe().ok()?;
    let name = exe.file_name()?.as_bytes();
    let program = args
        .iter()
        .position(|arg| arg.rsplit(|&b| b == b'/').next() == Some(name))?;
    Some(
        args[..program]
            .iter()
            .map(|arg| std::ffi::OsStr::from_bytes(arg).to_owned())
            .collect(),
    )
}

#[cfg(not(target_os = "linux"))]
fn runner_from_task() -> Option<Vec<std::ffi::OsString>> {
    None
}

/// qemu-user shows a program its own binary at `/proc/self/exe`, but not
/// at a thread's `/proc/self/task/<tid>/exe`, where the kernel's view
/// shows through: the emulator, a binary for another machine than the one
/// this code was compiled for. On a real system both are this binary.
#[cfg(target_os = "linux")]
fn detect() -> Option<Emulator> {
    use std::io::Read;

    // e_machine of the ELF header, for the architectures this suite runs on.
    const OWN_MACHINE: Option<u16> = if cfg!(target_arch = "x86_64") {
        Some(62)
    } else if cfg!(target_arch = "aarch64") {
        Some(183)
    } else {
        None
    };
    let own = OWN_MACHINE?;
    let task = std::fs::read_dir("/proc/self/task").ok()?.next()?.ok()?;
    let mut header = [0u8; 20];
    std::fs::File::open(task.path().join("exe"))
        .ok()?
        .read_exact(&mut header)
        .ok()?;
    if header[..4] != *b"\x7fELF" {
        return None;
    }
    let machine = match header[5] {
        1 => u16::from_le_bytes([header[18], header[19]]),
        _ => u16::from_be_bytes([header[18], header[19]]),
    };
    (machine != own).then_some(Emulator::QemuUser)
}

/// Wine keeps its own settings in the registry, under
/// `HKEY_CURRENT_USER\Software\Wine`; Windows has no such key.
#[cfg(windows)]
fn detect() -> Option<Emulator> {
    use std::process::{Command, Stdio};

    let status = Command::new("reg")
        .args(["query", r"HKCU\Software\Wine"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .ok()?;
    status.success().then_some(Emulator::Wine)
}

#[cfg(not(any(target_os = "linux", windows)))]
fn detect() -> Option<Emulator> {
    None
}
