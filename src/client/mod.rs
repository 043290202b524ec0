//! The client: one connected socket, request out, reply back, with
//! timeouts, retries and a reply check.

pub(crate) mod builder;

pub use builder::{ClientBuilder, DEFAULT_CLIENT_MAX_IN_FLIGHT};

use std::fmt;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use socket2::Socket;

use crate::error::{self, Error};
use crate::socket::BufferSize;
use crate::sys;

/// Room for any UDP payload, IPv4 or IPv6.
pub(crate) const MAX_REPLY: usize = 65_536;

/// The shortest wait the client asks the kernel for. A socket read timeout
/// is set in whole microseconds, and one that rounds to zero means "wait
/// forever"; every wait the client sets is at least this long.
pub(crate) const MIN_WAIT: Duration = Duration::from_micros(1);

/// A UDP client connected to one server.
///
/// The socket is connected, so the kernel drops datagrams from anyone but
/// the server, and an ICMP "port unreachable" from the server's host is
/// reported at once as [`Error::Refused`].
///
/// UDP may lose, duplicate or reorder datagrams. A call sends the request,
/// waits for a reply up to the timeout, and sends the request again on
/// silence, doubling the wait each time (with jitter), up to the configured
/// retries and deadline; see [`ClientBuilder`]. Before each request it
/// discards any datagram already queued (a late reply to an earlier request,
/// or a duplicate; in [latency mode](ClientBuilder::busy_poll), right after
/// sending it), and a [reply check](ClientBuilder::reply_check) rejects
/// any datagram that is not the answer to this request.
///
/// Calls from several threads on one client are serialised; use one client
/// per thread for parallel requests.
///
/// # Examples
///
/// ```
/// # fn main() -> Result<(), udp_greet::Error> {
/// # let server = udp_greet::GreetServer::bind("127.0.0.1:0")?.spawn(udp_greet::greet)?;
/// # let addr = server.local_addr();
/// use udp_greet::GreetClient;
///
/// let client = GreetClient::connect(addr)?;
/// assert_eq!(client.send_recv(b"Michael")?, b"Hello, Michael!");
///
/// // Without allocating: the reply goes into the caller's buffer.
/// let mut buf = [0u8; 64];
/// let n = client.send_recv_into(b"Tracy", &mut buf)?;
/// assert_eq!(&buf[..n], b"Hello, Tracy!");
/// # Ok(())
/// # }
/// ```
pub struct GreetClient {
    socket: Socket,
    peer: SocketAddr,
    local_addr: SocketAddr,
    recv_buffer: BufferSize,
    send_buffer: BufferSize,
    settings: builder::Settings,
    state: Mutex<State>,
    /// Datagrams discarded so far: stale, or failing the reply check. Kept
    /// outside the lock so that reading it never waits for a call.
    discarded: AtomicU64,
}

/// What one call leaves for the next.
#[derive(Debug)]
struct State {
    /// The socket's read timeout as last set, to skip setting it again.
    read_timeout: Option<Duration>,
    /// The reply buffer of [`GreetClient::send_recv`], kept between calls.
    reply: Vec<u8>,
    /// The jitter's random state (xorshift64*; never zero).
    rng: u64,
}

impl State {
    fn new(seed: u64) -> Self {
        State {
            read_timeout: None,
            reply: Vec::new(),
            rng: seed | 1,
        }
    }

    /// `nominal` spread at random over ± `fraction` of itself.
    fn jittered(&mut self, nominal: Duration, fraction: f64) -> Duration {
        jittered(&mut self.rng, nominal, fraction)
    }
}

impl fmt::Debug for GreetClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GreetClient")
            .field("local_addr", &self.local_addr)
            .field("peer", &self.peer)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl GreetClient {
    /// Connects a client with default settings to the server at `addr`.
    ///
    /// # Errors
    ///
    /// [`Error::Resolve`] when `addr` does not resolve; [`Error::Socket`] or
    /// [`Error::Io`] when the socket cannot be made or connected.
    pub fn connect<A: ToSocketAddrs + fmt::Debug>(addr: A) -> Result<GreetClient, Error> {
        ClientBuilder::default().connect(addr)
    }

    /// A builder for a client with non-default settings.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// The server's address.
    #[must_use]
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// The client's own address (an ephemeral port chosen by the system).
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The receive buffer size requested and granted.
    #[must_use]
    pub fn recv_buffer_size(&self) -> BufferSize {
        self.recv_buffer
    }

    /// The send buffer size requested and granted.
    #[must_use]
    pub fn send_buffer_size(&self) -> BufferSize {
        self.send_buffer
    }

    /// How many datagrams this client has discarded: stale ones found queued
    /// before a request, and ones that failed the reply check.
    #[must_use]
    pub fn discarded(&self) -> u64 {
        self.discarded.load(Ordering::Relaxed)
    }

    fn count_discarded(&self) {
        self.discarded.fetch_add(1, Ordering::Relaxed);
    }

    /// Sends `request` and returns the reply.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] when no reply came after every attempt,
    /// [`Error::Refused`] as soon as the server's host reports that nothing
    /// listens on the port, [`Error::Io`] for other socket errors.
    pub fn send_recv(&self, request: &[u8]) -> Result<Vec<u8>, Error> {
        let mut state = self.lock();
        let mut reply = std::mem::take(&mut state.reply);
        reply.resize(MAX_REPLY, 0);
        let result = self.exchange(&mut state, request, &mut reply);
        let out = result.map(|len| reply.get(..len).unwrap_or_default().to_vec());
        state.reply = reply;
        out
    }

    /// Sends `request` and writes the reply into `buf`, returning its length.
    /// Allocates nothing.
    ///
    /// # Errors
    ///
    /// As [`send_recv`](GreetClient::send_recv), and
    /// [`Error::ReplyTooLarge`] when the reply does not fit in `buf` (the
    /// reply is discarded). With a reply check, a datagram too large for
    /// `buf` cannot be checked: it is discarded and the wait goes on, and
    /// the call ends in [`Error::ReplyTooLarge`] rather than
    /// [`Error::Timeout`] if no valid reply came.
    pub fn send_recv_into(&self, request: &[u8], buf: &mut [u8]) -> Result<usize, Error> {
        let mut state = self.lock();
        self.exchange(&mut state, request, buf)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state holds no invariant a panic could break.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn exchange(&self, state: &mut State, request: &[u8], buf: &mut [u8]) -> Result<usize, Error> {
        let mut attempts = Attempts::new(&self.settings, Instant::now());
        // In latency mode the stale check runs while the first request is
        // in flight, where it costs the round trip nothing; otherwise before
        // it (see `ClientBuilder::busy_poll`).
        let check_after_send = self.settings.busy_poll.is_some();
        if !check_after_send {
            self.discard_queued(buf)?;
        }
        let jitter = self.settings.jitter;
        let mut first = true;
        while let Some((now, wait)) = attempts.next(|nominal| state.jittered(nominal, jitter)) {
            self.send(request)?;
            if std::mem::take(&mut first) && check_after_send {
                match self.discard_after_send(request, buf)? {
                    AfterSend::Reply(len) => return Ok(len),
                    AfterSend::Discarded => {
                        // The reply itself may have been among them: ask
                        // again at once rather than wait out the timeout.
                        self.send(request)?;
                        attempts.resent();
                    }
                    AfterSend::Nothing => {}
                }
            }
            match self.await_reply(state, request, buf, now, wait)? {
                Awaited::Reply(len) => return Ok(len),
                Awaited::TooLarge => attempts.too_large = true,
                Awaited::Nothing => {}
            }
        }
        Err(attempts.failed(self.peer, buf.len()))
    }

    /// Discards datagrams already queued: late replies to earlier requests.
    fn discard_queued(&self, buf: &mut [u8]) -> Result<(), Error> {
        loop {
            match sys::retry_interrupted(|| sys::recv_nonblocking(&self.socket, buf)) {
                Ok(_) => self.count_discarded(),
                Err(e) if error::is_timeout(&e) => return Ok(()),
                Err(e) if self.is_ignored_refusal(&e) => continue,
                Err(e) => return Err(self.io_error("receive from", e)),
            }
        }
    }

    /// The stale check of latency mode, right after the first send:
    /// whatever is queued came before the request, or is a reply faster
    /// than this check. A datagram that passes the reply check answers the
    /// request either way; the others are discarded.
    fn discard_after_send(&self, request: &[u8], buf: &mut [u8]) -> Result<AfterSend, Error> {
        let mut discarded = false;
        loop {
            match sys::retry_interrupted(|| sys::recv_dont_wait(&self.socket, buf)) {
                Ok((len, truncated)) => {
                    if self.settings.check.is_some() {
                        if let Judged::Accepted(len) =
                            self.settings.judge(request, buf, len, truncated)
                        {
                            return Ok(AfterSend::Reply(len));
                        }
                    }
                    self.count_discarded();
                    discarded = true;
                }
                Err(e) if error::is_timeout(&e) => {
                    return Ok(if discarded {
                        AfterSend::Discarded
                    } else {
                        AfterSend::Nothing
                    });
                }
                Err(e) if self.is_ignored_refusal(&e) => continue,
                Err(e) => return Err(self.io_error("receive from", e)),
            }
        }
    }

    /// Sets the socket's read timeout to `wait`, or to [`MIN_WAIT`] if it is
    /// shorter: never to zero, which would mean no timeout at all.
    fn set_read_timeout(&self, state: &mut State, wait: Duration) -> Result<(), Error> {
        let wait = wait.max(MIN_WAIT);
        if state.read_timeout != Some(wait) {
            self.socket
                .set_read_timeout(Some(wait))
                .map_err(|e| self.io_error("set the read timeout for", e))?;
            state.read_timeout = Some(wait);
        }
        Ok(())
    }

    fn send(&self, request: &[u8]) -> Result<(), Error> {
        match sys::retry_interrupted(|| self.socket.send(request)) {
            Ok(_) => Ok(()),
            // An earlier ICMP error, reported on this send: the request was
            // not sent, which counts as one more loss.
            Err(e) if self.is_ignored_refusal(&e) => Ok(()),
            Err(e) => Err(self.io_error("send to", e)),
        }
    }

    /// Waits from `sent` for up to `wait` for a reply that passes the check:
    /// polling without blocking for the busy-poll window first, if any.
    fn await_reply(
        &self,
        state: &mut State,
        request: &[u8],
        buf: &mut [u8],
        sent: Instant,
        wait: Duration,
    ) -> Result<Awaited, Error> {
        let end = sent.checked_add(wait);
        let poll_until = self
            .settings
            .busy_poll
            .and_then(|window| sent.checked_add(window.min(wait)));
        let mut outcome = Awaited::Nothing;
        // The first wait is exactly `wait`, which usually matches the read
        // timeout already set, so no system call is needed to set it.
        let mut left = wait;
        loop {
            let polling = poll_until.is_some_and(|until| Instant::now() < until);
            let received = if polling {
                sys::recv_dont_wait(&self.socket, buf)
            } else {
                self.set_read_timeout(state, left)?;
                self.socket
                    .recv_vectored(&mut [sys::recv_slice(buf)])
                    .map(|(len, flags)| (len, flags.is_truncated()))
            };
            match received {
                Ok((len, truncated)) => match self.settings.judge(request, buf, len, truncated) {
                    Judged::Accepted(len) => return Ok(Awaited::Reply(len)),
                    Judged::DoesNotFit => {
                        return Err(Error::ReplyTooLarge {
                            addr: self.peer,
                            capacity: buf.len(),
                        });
                    }
                    Judged::Oversized => {
                        self.count_discarded();
                        outcome = Awaited::TooLarge;
                    }
                    Judged::Rejected => self.count_discarded(),
                },
                // Nothing yet: poll again (the window ends before the
                // wait does), or block for the rest.
                Err(e) if polling && error::is_timeout(&e) => {
                    std::hint::spin_loop();
                    continue;
                }
                Err(e) if error::is_timeout(&e) => return Ok(outcome),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if self.is_ignored_refusal(&e) => {}
                Err(e) => return Err(self.io_error("receive from", e)),
            }
            left = match end {
                Some(end) => end.saturating_duration_since(Instant::now()),
                None => wait,
            };
            if left.is_zero() {
                return Ok(outcome);
            }
        }
    }

    /// A refusal the client was told to treat as a lost reply.
    fn is_ignored_refusal(&self, err: &io::Error) -> bool {
        self.settings.is_ignored_refusal(err)
    }

    fn io_error(&self, action: &'static str, source: io::Error) -> Error {
        io_error(self.peer, action, source)
    }
}

/// The error for a failed `action` with `peer`, naming both; a refused port
/// is its own error.
pub(crate) fn io_error(peer: SocketAddr, action: &'static str, source: io::Error) -> Error {
    if source.kind() == io::ErrorKind::ConnectionRefused {
        Error::Refused { addr: peer, source }
    } else {
        Error::Io {
            action,
            addr: peer,
            source,
        }
    }
}

/// `nominal` scaled by a random factor within `1 ± fraction`, drawn from
/// the xorshift generator `rng`.
pub(crate) fn jittered(rng: &mut u64, nominal: Duration, fraction: f64) -> Duration {
    if fraction <= 0.0 {
        return nominal;
    }
    *rng ^= *rng >> 12;
    *rng ^= *rng << 25;
    *rng ^= *rng >> 27;
    let bits = rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11; // 53 bits
    let unit = bits as f64 / (1u64 << 53) as f64; // [0, 1)
    let factor = 1.0 + fraction.min(1.0) * (2.0 * unit - 1.0); // [0, 2]
    Duration::try_from_secs_f64(nominal.as_secs_f64() * factor).unwrap_or(nominal)
}

/// The schedule of one call's attempts: the first waits the timeout, each
/// later one twice as long as the one before (with jitter), within the
/// retries and the deadline.
pub(crate) struct Attempts {
    started: Instant,
    deadline: Option<Instant>,
    max: u32,
    sent: u32,
    nominal: Duration,
    /// Requests sent again at once within an attempt.
    resent: u32,
    /// A datagram too large to check was discarded.
    pub(crate) too_large: bool,
}

impl Attempts {
    pub(crate) fn new(settings: &builder::Settings, started: Instant) -> Attempts {
        Attempts {
            started,
            deadline: settings.deadline.and_then(|d| started.checked_add(d)),
            max: settings.retries.saturating_add(1),
            sent: 0,
            nominal: settings.timeout,
            resent: 0,
            too_large: false,
        }
    }

    /// When the call must end, if it has a deadline.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// The next attempt, if one is left: the time it starts (now) and how
    /// long it waits for a reply. `jitter` varies the nominal wait of
    /// resends.
    pub(crate) fn next(
        &mut self,
        jitter: impl FnOnce(Duration) -> Duration,
    ) -> Option<(Instant, Duration)> {
        if self.sent >= self.max {
            return None;
        }
        let mut wait = if self.sent == 0 {
            self.nominal
        } else {
            jitter(self.nominal)
        };
        let now = Instant::now();
        if let Some(deadline) = self.deadline {
            let left = deadline.saturating_duration_since(now);
            if left.is_zero() {
                return None;
            }
            wait = wait.min(left);
        }
        self.sent += 1;
        self.nominal = self.nominal.saturating_mul(2);
        Some((now, wait))
    }

    /// Counts a request sent again at once, within the current attempt.
    pub(crate) fn resent(&mut self) {
        self.resent = self.resent.saturating_add(1);
    }

    /// The error of a call that got no reply: too large (when that is all
    /// that came) or a timeout.
    pub(crate) fn failed(&self, peer: SocketAddr, capacity: usize) -> Error {
        if self.too_large {
            return Error::ReplyTooLarge {
                addr: peer,
                capacity,
            };
        }
        Error::Timeout {
            addr: peer,
            attempts: self.sent.saturating_add(self.resent),
            elapsed: self.started.elapsed(),
        }
    }
}

/// What a received datagram is to the call waiting for a reply.
pub(crate) enum Judged {
    /// The reply, of this length.
    Accepted(usize),
    /// Too large for the buffer, with no reply check: it is the reply and
    /// does not fit.
    DoesNotFit,
    /// Too large for the buffer to be checked: discarded.
    Oversized,
    /// Failed the reply check: discarded.
    Rejected,
}

impl builder::Settings {
    /// A refusal (ICMP port unreachable) the client was told to treat as a
    /// lost reply.
    pub(crate) fn is_ignored_refusal(&self, err: &io::Error) -> bool {
        self.refused_as_loss && err.kind() == io::ErrorKind::ConnectionRefused
    }

    /// Judges a datagram of `len` bytes in `buf` (`truncated`: it was larger
    /// than `buf`) received in answer to `request`.
    pub(crate) fn judge(&self, request: &[u8], buf: &[u8], len: usize, truncated: bool) -> Judged {
        if truncated {
            return match self.check {
                None => Judged::DoesNotFit,
                Some(_) => Judged::Oversized,
            };
        }
        let reply = buf.get(..len).unwrap_or_default();
        if self
            .check
            .as_ref()
            .is_none_or(|check| check(request, reply))
        {
            Judged::Accepted(len)
        } else {
            Judged::Rejected
        }
    }
}

/// What the latency-mode stale check found.
enum AfterSend {
    /// A datagram that passed the reply check: the reply.
    Reply(usize),
    /// Datagrams, discarded: one may have been the reply.
    Discarded,
    Nothing,
}

/// How one attempt's wait ended.
enum Awaited {
    /// A reply of this length is in the caller's buffer.
    Reply(usize),
    /// Time ran out; a datagram too large to check came meanwhile.
    TooLarge,
    /// Time ran out.
    Nothing,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_its_fraction_and_varies() {
        let mut state = State::new(12345);
        let nominal = Duration::from_millis(100);
        let waits: Vec<Duration> = (0..1_000).map(|_| state.jittered(nominal, 0.2)).collect();
        assert!(waits.iter().all(|w| *w >= Duration::from_millis(80)));
        assert!(waits.iter().all(|w| *w <= Duration::from_millis(120)));
        let (min, max) = (waits.iter().min(), waits.iter().max());
        assert!(
            max.zip(min)
                .is_some_and(|(max, min)| *max - *min > Duration::from_millis(30))
        );
        assert_eq!(state.jittered(nominal, 0.0), nominal);
        // No overflow at the far end.
        assert_eq!(state.jittered(Duration::MAX, 0.0), Duration::MAX);
        let _ = state.jittered(Duration::MAX, 1.0);
    }
}
