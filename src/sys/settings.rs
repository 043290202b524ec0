//! Socket settings a platform may refuse, and what a server does when one
//! is refused. Only Windows has such settings today; the policy is plain
//! code, tested on every platform with a setter that refuses on demand,
//! and with the real calls under Windows (Wine, in CI).

use std::io;

use socket2::Socket;

#[cfg(windows)]
use super::windows;

/// A socket setting that a platform may refuse, named by its option
/// (Windows only, where each can be refused: Wine refuses
/// `SIO_UDP_NETRESET`, for one; elsewhere there is nothing to set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Setting {
    /// `SIO_UDP_CONNRESET` off: an ICMP "port unreachable" about an earlier
    /// reply does not fail the next receive (`WSAECONNRESET`).
    UdpConnReset,
    /// `SIO_UDP_NETRESET` off: an ICMP "TTL expired in transit" about an
    /// earlier reply does not fail the next receive (`WSAENETRESET`).
    UdpNetReset,
    /// `SO_EXCLUSIVEADDRUSE` on: no other socket can bind the address, not
    /// even one with `SO_REUSEADDR`.
    ExclusiveAddrUse,
}

impl Setting {
    /// What making the setting does, naming its option: the `action` of the
    /// error when it is refused.
    pub(crate) fn action(self) -> &'static str {
        match self {
            Setting::UdpConnReset => "turn off SIO_UDP_CONNRESET",
            Setting::UdpNetReset => "turn off SIO_UDP_NETRESET",
            Setting::ExclusiveAddrUse => "set SO_EXCLUSIVEADDRUSE (take the address exclusively)",
        }
    }
}

/// How a server socket was prepared for its platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Prepared {
    /// ICMP reports about earlier replies are kept out of the receive path:
    /// on Windows when both ioctls took; elsewhere always (an unconnected
    /// UDP socket is not told of them).
    pub(crate) icmp_reports_off: bool,
}

/// A setting the platform refused that the server cannot do without.
#[derive(Debug)]
pub(crate) struct Refused {
    pub(crate) setting: Setting,
    pub(crate) source: io::Error,
}

/// Settings a server socket needs before bind, where the platform has
/// them: on Windows, ICMP reports about earlier replies are kept out of the
/// receive path where the system lets them be, and unless `shared` (reuse
/// of the address was asked for) the socket takes the address for itself
/// (`SO_EXCLUSIVEADDRUSE`), or the server is not made.
pub(crate) fn prepare_server_socket(socket: &Socket, shared: bool) -> Result<Prepared, Refused> {
    apply(|setting| set(socket, setting), !shared)
}

/// Settings a server socket made elsewhere needs: on Windows, ICMP reports
/// about earlier replies are kept out of the receive path where the system
/// lets them be.
pub(crate) fn prepare_adopted_socket(socket: &Socket) -> Prepared {
    quiet_icmp_reports(|setting| set(socket, setting))
}

/// Makes one setting, where the platform has it (Windows); elsewhere there
/// is nothing to make. In the crate's own tests, [`tests::refuse`] makes it
/// fail instead.
fn set(socket: &Socket, setting: Setting) -> io::Result<()> {
    #[cfg(test)]
    if tests::refused(setting) {
        return Err(io::Error::from(io::ErrorKind::Unsupported));
    }
    #[cfg(windows)]
    return windows::set(socket, setting);
    #[cfg(not(windows))]
    {
        let _ = (socket, setting);
        Ok(())
    }
}

/// What a server does when the platform refuses a setting, apart from the
/// calls that make them (`set`), so that a test can refuse each in turn.
///
/// The exclusive bind is a security property (no other socket can take the
/// port or a share of its traffic): when `exclusive` asks for it and it is
/// refused, the server fails closed, naming the option. The ICMP ioctls
/// only spare the receive loop errors it survives anyway (each is counted
/// in `recv_errors`): they are tried, and whether both took is recorded.
fn apply(
    mut set: impl FnMut(Setting) -> io::Result<()>,
    exclusive: bool,
) -> Result<Prepared, Refused> {
    if exclusive {
        set(Setting::ExclusiveAddrUse).map_err(|source| Refused {
            setting: Setting::ExclusiveAddrUse,
            source,
        })?;
    }
    Ok(quiet_icmp_reports(set))
}

/// Tries to turn off both kinds of ICMP report; says whether both are off.
fn quiet_icmp_reports(mut set: impl FnMut(Setting) -> io::Result<()>) -> Prepared {
    let mut icmp_reports_off = true;
    for setting in [Setting::UdpConnReset, Setting::UdpNetReset] {
        icmp_reports_off &= set(setting).is_ok();
    }
    Prepared { icmp_reports_off }
}

/// Whether a failed receive reports an ICMP message about an earlier send
/// that std has no `ErrorKind` for: Windows' `WSAENETRESET` ("TTL expired
/// in transit", while `SIO_UDP_NETRESET` is on).
pub(crate) fn is_net_reset(err: &io::Error) -> bool {
    #[cfg(windows)]
    return err.raw_os_error() == Some(windows::NET_RESET);
    #[cfg(not(windows))]
    {
        let _ = err;
        false
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::cell::Cell;

    use super::*;

    thread_local! {
        static REFUSED: Cell<Option<Setting>> = const { Cell::new(None) };
    }

    /// Runs `f` with `setting` refused on this thread, as a system that
    /// lacks it would: the crate's tests see what a server does then, on
    /// every platform.
    pub(crate) fn refuse<T>(setting: Setting, f: impl FnOnce() -> T) -> T {
        REFUSED.with(|r| r.set(Some(setting)));
        let out = f();
        REFUSED.with(|r| r.set(None));
        out
    }

    /// Whether a test refuses `setting` on this thread.
    pub(crate) fn refused(setting: Setting) -> bool {
        REFUSED.with(|r| r.get()) == Some(setting)
    }

    /// A setter that refuses `refused` (as Wine refuses an ioctl it lacks)
    /// and accepts the rest, noting every setting it is asked for.
    fn refusing(
        refused: Option<Setting>,
        asked: &mut Vec<Setting>,
    ) -> impl FnMut(Setting) -> io::Result<()> + '_ {
        move |setting| {
            asked.push(setting);
            if Some(setting) == refused {
                Err(io::Error::from(io::ErrorKind::Unsupported))
            } else {
                Ok(())
            }
        }
    }

    #[test]
    fn a_refused_exclusive_bind_fails_closed_and_names_its_option() {
        let mut asked = Vec::new();
        let refused = apply(refusing(Some(Setting::ExclusiveAddrUse), &mut asked), true)
            .expect_err("a server that asked for the address alone is not made");
        assert_eq!(refused.setting, Setting::ExclusiveAddrUse);
        assert_eq!(refused.source.kind(), io::ErrorKind::Unsupported);
        assert!(refused.setting.action().contains("SO_EXCLUSIVEADDRUSE"));
        assert_eq!(asked, [Setting::ExclusiveAddrUse]);
    }

    #[test]
    fn a_refused_icmp_ioctl_is_recorded_and_the_other_still_tried() {
        for ioctl in [Setting::UdpConnReset, Setting::UdpNetReset] {
            let mut asked = Vec::new();
            let prepared = apply(refusing(Some(ioctl), &mut asked), true)
                .unwrap_or_else(|r| panic!("{ioctl:?} refused is not fatal: {r:?}"));
            assert!(!prepared.icmp_reports_off, "{ioctl:?} refused");
            assert_eq!(
                asked,
                [
                    Setting::ExclusiveAddrUse,
                    Setting::UdpConnReset,
                    Setting::UdpNetReset
                ]
            );
            let mut asked = Vec::new();
            let adopted = quiet_icmp_reports(refusing(Some(ioctl), &mut asked));
            assert!(!adopted.icmp_reports_off, "{ioctl:?} refused");
            assert_eq!(asked, [Setting::UdpConnReset, Setting::UdpNetReset]);
        }
        let mut asked = Vec::new();
        let prepared = apply(refusing(None, &mut asked), true).expect("all accepted");
        assert!(prepared.icmp_reports_off);
    }

    #[test]
    fn a_shared_address_is_not_asked_for_exclusively() {
        let mut asked = Vec::new();
        let prepared = apply(refusing(Some(Setting::ExclusiveAddrUse), &mut asked), false)
            .expect("reuse of the address was asked for");
        assert!(prepared.icmp_reports_off);
        assert_eq!(asked, [Setting::UdpConnReset, Setting::UdpNetReset]);
    }

    #[test]
    fn each_action_names_its_option() {
        for (setting, option) in [
            (Setting::UdpConnReset, "SIO_UDP_CONNRESET"),
            (Setting::UdpNetReset, "SIO_UDP_NETRESET"),
            (Setting::ExclusiveAddrUse, "SO_EXCLUSIVEADDRUSE"),
        ] {
            assert!(setting.action().contains(option), "{setting:?}");
        }
    }

    #[test]
    fn a_net_reset_is_known_as_an_icmp_report_on_windows() {
        // WSAENETRESET, which std reports as an uncategorised error.
        let net_reset = io::Error::from_raw_os_error(10052);
        assert_eq!(is_net_reset(&net_reset), cfg!(windows));
        assert!(!is_net_reset(&io::Error::from(
            io::ErrorKind::ConnectionReset
        )));
    }

    /// The real calls on real sockets: what the system accepts decides
    /// what is recorded, and only a refused exclusive bind is fatal. Under
    /// Wine 8, which refuses `SIO_UDP_NETRESET`, this runs the refused
    /// path.
    #[cfg(windows)]
    #[test]
    fn the_systems_answers_decide_what_is_recorded() {
        use socket2::{Domain, Type};

        let socket = || Socket::new(Domain::IPV4, Type::DGRAM, None).expect("a UDP socket");
        let accepted = |setting: Setting| {
            let result = windows::set(&socket(), setting);
            println!("{}: {result:?}", setting.action());
            result.is_ok()
        };
        let conn_reset = accepted(Setting::UdpConnReset);
        let net_reset = accepted(Setting::UdpNetReset);
        let exclusive = accepted(Setting::ExclusiveAddrUse);
        let icmp_off = conn_reset && net_reset;
        match prepare_server_socket(&socket(), false) {
            Ok(prepared) => {
                assert!(exclusive, "made without SO_EXCLUSIVEADDRUSE");
                assert_eq!(prepared.icmp_reports_off, icmp_off);
            }
            Err(refused) => {
                assert!(!exclusive, "failed with {refused:?}");
                assert_eq!(refused.setting, Setting::ExclusiveAddrUse);
            }
        }
        let shared = prepare_server_socket(&socket(), true).expect("a shared address");
        assert_eq!(shared.icmp_reports_off, icmp_off);
        assert_eq!(prepare_adopted_socket(&socket()).icmp_reports_off, icmp_off);
    }
}
