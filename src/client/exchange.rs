//! One call, written once for both clients: an I/O-free state machine, as
//! quinn-proto is to quinn.
//!
//! A client makes an [`Exchange`] per call and drives it: it asks
//! [`Exchange::next`] what to do at the time it reads from its clock, does
//! that on its socket (a send, a receive without waiting, a wait until a
//! time), and reports the result ([`Exchange::sent`],
//! [`Exchange::received`]), until the exchange answers [`Step::Done`]. The
//! exchange holds every policy of a call: the attempt schedule (timeout,
//! doubling retries with jitter, deadline), the check for stale datagrams
//! (before the first send, or in latency mode right after it, with the
//! request sent again at once if it found any), busy polling through a
//! [`PollWindow`] that never outlasts the attempt's wait, the judging of each
//! datagram against the reply check, `refused_as_loss`, and the count of
//! discarded datagrams. The clients only do the I/O and the waiting.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::panic::{self, AssertUnwindSafe};
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::builder::Settings;
use super::demux::{Key, canonical};
use crate::busy_poll::{PollWindow, later};
use crate::error::{self, Error};

/// What every call of one client shares: its settings, and the counts of
/// datagrams discarded (read without waiting for a call).
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) settings: Settings,
    /// Kept apart from any lock, so that reading it never waits for a call.
    discarded: AtomicU64,
    /// Of those, replies whose request id matched no call in flight.
    unmatched: AtomicU64,
    /// Challenges received (source tokens).
    challenges: AtomicU64,
    /// The last source token each server gave (with source tokens).
    tokens: RwLock<HashMap<SocketAddr, Vec<u8>>>,
}

/// The most servers whose source tokens a client remembers.
const MAX_TOKENS: usize = 4096;

/// The longest source token a client uses, in bytes (this crate's servers
/// make 16-byte tokens; DNS server cookies are 8 to 32 bytes).
pub(crate) const MAX_TOKEN: usize = 256;

impl Shared {
    pub(crate) fn new(settings: Settings) -> Shared {
        Shared {
            settings,
            discarded: AtomicU64::new(0),
            unmatched: AtomicU64::new(0),
            challenges: AtomicU64::new(0),
            tokens: RwLock::new(HashMap::new()),
        }
    }

    /// How many challenges the client's calls have received.
    pub(crate) fn challenges(&self) -> u64 {
        self.challenges.load(Ordering::Relaxed)
    }

    /// `request` with the token `dest` last gave written in, in `out`; or
    /// `request` itself when there is none (or no source tokens).
    pub(crate) fn wire<'a>(
        &self,
        dest: SocketAddr,
        request: &'a [u8],
        candidate: Option<&[u8]>,
        out: &'a mut Vec<u8>,
    ) -> &'a [u8] {
        let Some(format) = &self.settings.tokens else {
            return request;
        };
        out.clear();
        // A panic in the format's code sends the request as it is.
        let write = |out: &mut Vec<u8>, token: &[u8]| {
            out.extend_from_slice(request);
            let wrote = panic::catch_unwind(AssertUnwindSafe(|| format.write(out, token)));
            if wrote.is_err() {
                out.clear();
            }
            wrote.is_ok()
        };
        let wrote = match candidate {
            Some(token) => write(out, token),
            None => {
                let tokens = self.tokens.read().unwrap_or_else(|e| e.into_inner());
                let Some(token) = tokens.get(&canonical(dest)) else {
                    return request;
                };
                // The format's code runs under the read lock: it cannot
                // reach the client, so it cannot ask for the write lock.
                write(out, token)
            }
        };
        match wrote {
            true => out,
            false => request,
        }
    }

    /// The token `datagram` carries, with source tokens, unless it is
    /// longer than [`MAX_TOKEN`]; none if the format's code panics.
    fn token_in<'a>(&self, datagram: &'a [u8]) -> Option<&'a [u8]> {
        let format = self.settings.tokens.as_ref()?;
        panic::catch_unwind(AssertUnwindSafe(|| format.find(datagram)))
            .ok()
            .flatten()
            .filter(|token| token.len() <= MAX_TOKEN)
    }

    /// Remembers `token` as the one `dest` last gave, unless it is longer
    /// than [`MAX_TOKEN`] (one so long could make every request too large
    /// to send).
    fn remember_token(&self, dest: SocketAddr, token: &[u8]) {
        if token.len() > MAX_TOKEN {
            return;
        }
        let dest = canonical(dest);
        let mut tokens = self.tokens.write().unwrap_or_else(|e| e.into_inner());
        if tokens.get(&dest).is_some_and(|known| known == token) {
            return;
        }
        if tokens.len() >= MAX_TOKENS && !tokens.contains_key(&dest) {
            // Forget one: its server will challenge or hand out another.
            if let Some(old) = tokens.keys().next().copied() {
                tokens.remove(&old);
            }
        }
        tokens.insert(dest, token.to_vec());
    }

    /// How many datagrams the client's calls have discarded.
    pub(crate) fn discarded(&self) -> u64 {
        self.discarded.load(Ordering::Relaxed)
    }

    /// How many of them matched no call in flight (with request ids).
    pub(crate) fn unmatched(&self) -> u64 {
        self.unmatched.load(Ordering::Relaxed)
    }

    pub(crate) fn count_discarded(&self) {
        self.discarded.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a datagram that matched no call in flight (discarded too).
    pub(crate) fn count_unmatched(&self) {
        self.unmatched.fetch_add(1, Ordering::Relaxed);
        self.count_discarded();
    }

    /// The key of a call of `request` to `dest`, with the request id the
    /// client's reader finds in it; [`Error::NoRequestId`] if it finds none.
    pub(crate) fn key(&self, dest: SocketAddr, request: &[u8]) -> Result<Key, Error> {
        self.settings
            .request_id
            .as_ref()
            .and_then(|read| read(request))
            .map(|id| Key::new(dest, id))
            .ok_or(Error::NoRequestId { addr: dest })
    }
}

/// The error for a failed `action` with `peer`, naming both; a refused port
/// is its own error.
pub(crate) fn io_error(peer: SocketAddr, action: &'static str, source: io::Error) -> Error {
    if is_refusal_kind(source.kind()) {
        Error::Refused { addr: peer, source }
    } else {
        Error::Io {
            action,
            addr: peer,
            source,
        }
    }
}

/// A refused port as a socket call reports it: `ConnectionRefused`, or on
/// Windows, whose connected UDP sockets report an ICMP "port unreachable"
/// as `WSAECONNRESET`, `ConnectionReset` (which a UDP socket reports for
/// nothing else).
pub(crate) fn is_refusal_kind(kind: io::ErrorKind) -> bool {
    matches!(
        kind,
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset
    )
}

/// What may be queued on the call's socket before its first request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Queue {
    /// Datagrams left by earlier calls (late replies, duplicates): the
    /// exchange checks for them before the first send, or in latency mode
    /// right after it.
    MayHoldStale,
    /// Nothing: the client drained the socket before the call.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    Drained,
}

/// What the client does next for a call.
#[derive(Debug)]
pub(crate) enum Step {
    /// Send the request (the first of an attempt, or again at once), and
    /// report it with [`Exchange::sent`].
    Send,
    /// The stale check before the first send: receive one datagram without
    /// waiting (its bytes are discarded whatever they are, so a receive that
    /// does not tell truncation will do), and report it.
    Discard,
    /// The stale check of latency mode, right after the first send: receive
    /// one datagram without waiting, and report it.
    Check,
    /// Busy polling: receive one datagram without waiting, and report it;
    /// on a miss, pause briefly (a spin hint, or a yield to the runtime).
    Poll,
    /// Wait for one datagram, and report it (a wait that ends without one
    /// reports a timeout error).
    Wait(Wait),
    /// The call is over: the reply's length in the buffer, or the error.
    Done(Result<usize, Error>),
}

/// How long a [`Step::Wait`] waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Wait {
    /// When the attempt's wait ends.
    pub(crate) until: Instant,
    /// The same as a duration from the time given to [`Exchange::next`];
    /// for the first receive of an attempt, its whole wait, measured from
    /// the attempt's start as if the send took no time (a blocking client's
    /// read timeout then usually matches the one already set, which spares
    /// a system call).
    pub(crate) timeout: Duration,
}

/// Where a call is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The stale check before the first send.
    Discarding,
    /// The next attempt is due.
    Attempt,
    /// The request is to be sent: as an attempt (`first`: the call's first)
    /// or `again` at once within the attempt.
    Sending { first: bool, again: bool },
    /// The stale check of latency mode; `found`: it discarded a datagram.
    Checking { found: bool },
    /// Waiting for the reply within the attempt. `tried`: a receive has been
    /// asked for in this wait; `blocking`: the last one was a wait.
    Awaiting { tried: bool, blocking: bool },
    /// The outcome has been handed out.
    Over,
}

const AWAITING: Phase = Phase::Awaiting {
    tried: false,
    blocking: false,
};

/// One call's exchange with its destination: see the module's
/// documentation.
///
/// Every receive the exchange asks for is reported back; it ends each
/// attempt when its wait has passed, so a client that follows it makes at
/// most a bounded number of steps per attempt that do not wait (the stale
/// checks, and polls within the window).
#[derive(Debug)]
pub(crate) struct Exchange<'p> {
    shared: &'p Shared,
    /// Where the request goes, and the only address a reply may come from.
    dest: SocketAddr,
    /// The reply buffer's size, as errors report it.
    capacity: usize,
    attempts: Attempts,
    /// The jitter's random state (xorshift64*; never zero).
    rng: u64,
    window: PollWindow,
    /// Latency mode on a socket that may hold stale datagrams: check after
    /// the first send, not before it.
    check_after_send: bool,
    phase: Phase,
    /// The current attempt's wait, and when it ends.
    wait: Duration,
    end: Instant,
    /// How the call ended, until it is handed out.
    outcome: Option<Result<usize, Error>>,
    /// The request with a source token written in (see [`Exchange::wire`]).
    out: Vec<u8>,
    /// The current attempt has been sent again after a challenge.
    rechallenged: bool,
    /// The token of the challenge of the current attempt, sent with the
    /// request sent again at once; never remembered for the destination
    /// (anyone can forge a challenge: a forged one costs this attempt).
    candidate: Option<Vec<u8>>,
}

impl<'p> Exchange<'p> {
    /// A call to `dest` starting at `now`, with a reply buffer of `capacity`
    /// bytes; `seed` (see [`call_seed`]) drives its jitter.
    pub(crate) fn new(
        shared: &'p Shared,
        dest: SocketAddr,
        capacity: usize,
        queue: Queue,
        now: Instant,
        seed: u64,
    ) -> Exchange<'p> {
        let settings = &shared.settings;
        let latency = settings.busy_poll.is_some();
        let phase = match queue {
            Queue::MayHoldStale if !latency => Phase::Discarding,
            Queue::MayHoldStale | Queue::Drained => Phase::Attempt,
        };
        Exchange {
            shared,
            dest,
            capacity,
            attempts: Attempts::new(settings, now),
            rng: seed | 1,
            window: PollWindow::new(settings.busy_poll),
            check_after_send: latency && queue == Queue::MayHoldStale,
            phase,
            wait: Duration::ZERO,
            end: now,
            outcome: None,
            out: Vec::new(),
            rechallenged: false,
            candidate: None,
        }
    }

    /// What to send for `request` ([`Step::Send`]): the request itself, or
    /// with source tokens a copy with the destination's token written in.
    pub(crate) fn wire<'a>(&'a mut self, request: &'a [u8]) -> &'a [u8] {
        let candidate = self.candidate.as_deref();
        self.shared
            .wire(self.dest, request, candidate, &mut self.out)
    }

    /// When the call must end, if it has a deadline.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.attempts.deadline
    }

    /// The error of a call given up at `now` before any reply: the call's
    /// deadline passed while the client could not start it, say.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn failed(&self, now: Instant) -> Error {
        self.attempts.failed(self.dest, self.capacity, now)
    }

    /// What to do at `now`.
    pub(crate) fn next(&mut self, now: Instant) -> Step {
        if let Some(outcome) = self.outcome.take() {
            self.phase = Phase::Over;
            return Step::Done(outcome);
        }
        match self.phase {
            Phase::Discarding => Step::Discard,
            Phase::Attempt => self.attempt(now),
            Phase::Sending { .. } => {
                // A send asked for again (interrupted, or a report of
                // another destination's) never outlasts the call.
                if self
                    .attempts
                    .deadline
                    .is_some_and(|deadline| now >= deadline)
                {
                    self.phase = Phase::Over;
                    return Step::Done(Err(self.failed(now)));
                }
                Step::Send
            }
            Phase::Checking { .. } => Step::Check,
            Phase::Awaiting { tried, .. } => {
                // The attempt's wait has passed once it has received at
                // least once: each attempt tries at least once.
                if tried && now >= self.end {
                    return self.attempt(now);
                }
                if self.window.at(now).polls() {
                    self.phase = Phase::Awaiting {
                        tried: true,
                        blocking: false,
                    };
                    return Step::Poll;
                }
                let timeout = if tried {
                    self.end.saturating_duration_since(now)
                } else {
                    self.wait
                };
                self.phase = Phase::Awaiting {
                    tried: true,
                    blocking: true,
                };
                Step::Wait(Wait {
                    until: self.end,
                    timeout,
                })
            }
            // Asked again after the end: the call has nothing more to give.
            Phase::Over => Step::Done(Err(self.failed(now))),
        }
    }

    /// Starts the next attempt at `now`, or ends the call if none is left.
    fn attempt(&mut self, now: Instant) -> Step {
        let (rng, jitter) = (&mut self.rng, self.shared.settings.jitter);
        let Some(wait) = self
            .attempts
            .next(now, |nominal| jittered(rng, nominal, jitter))
        else {
            self.phase = Phase::Over;
            return Step::Done(Err(self.failed(now)));
        };
        self.wait = wait;
        self.end = later(now, wait);
        self.rechallenged = false;
        // A challenge's token serves the send it asked for, not the next
        // attempt: that goes with the token remembered (a forged challenge
        // then costs one attempt at most).
        self.candidate = None;
        // Polling counts toward the wait, and never outlasts it.
        self.window.open_within(now, Some(self.end));
        self.phase = Phase::Sending {
            first: self.attempts.sent == 1,
            again: false,
        };
        Step::Send
    }

    /// The result of a [`Step::Send`].
    pub(crate) fn sent(&mut self, result: io::Result<usize>) {
        let Phase::Sending { first, again } = self.phase else {
            return;
        };
        match result {
            Ok(_) => {}
            // Not sent; the step is asked for again.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return,
            // An earlier ICMP error, reported on this send: the request was
            // not sent, which counts as one more loss.
            Err(e) if self.shared.settings.is_ignored_refusal(&e) => {}
            Err(e) => return self.finish(Err(io_error(self.dest, "send to", e))),
        }
        self.phase = if again {
            self.attempts.resent();
            AWAITING
        } else if first && self.check_after_send {
            Phase::Checking { found: false }
        } else {
            AWAITING
        };
    }

    /// The result of a receive ([`Step::Discard`], [`Step::Check`],
    /// [`Step::Poll`] or [`Step::Wait`]): a datagram's length and whether it
    /// was larger than the buffer, with the buffer it went into; or the
    /// error (`WouldBlock` or `TimedOut`: nothing came).
    pub(crate) fn received(
        &mut self,
        result: io::Result<(usize, bool)>,
        request: &[u8],
        buf: &[u8],
    ) {
        let (len, truncated) = match result {
            Ok(datagram) => datagram,
            Err(e) if error::is_timeout(&e) => return self.nothing(),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return,
            // A refusal counted as a loss: a receive that does not wait
            // found nothing (it may be reported again at once, where the
            // platform does not clear it, as under Wine); a wait goes on.
            Err(e) if self.shared.settings.is_ignored_refusal(&e) => {
                if matches!(self.phase, Phase::Discarding | Phase::Checking { .. }) {
                    self.nothing();
                }
                return;
            }
            Err(e) => return self.finish(Err(io_error(self.dest, "receive from", e))),
        };
        let settings = &self.shared.settings;
        match self.phase {
            Phase::Discarding => self.shared.count_discarded(),
            // Whatever is queued came before the request, or is a reply
            // faster than this check: one that passes the reply check
            // answers the request either way; the others are discarded.
            Phase::Checking { .. } => {
                if settings.check.is_some() {
                    if let Judged::Accepted(len) = settings.judge(request, buf, len, truncated) {
                        return self.accepted(buf, len);
                    }
                }
                self.shared.count_discarded();
                self.phase = Phase::Checking { found: true };
            }
            Phase::Awaiting { .. } if self.is_challenge(buf, len, truncated) => {
                self.challenged(buf, len);
            }
            Phase::Awaiting { .. } => match settings.judge(request, buf, len, truncated) {
                Judged::Accepted(len) => self.accepted(buf, len),
                Judged::DoesNotFit => self.finish(Err(Error::ReplyTooLarge {
                    addr: self.dest,
                    capacity: self.capacity,
                })),
                Judged::Oversized => {
                    self.shared.count_discarded();
                    self.attempts.too_large = true;
                }
                Judged::Rejected => self.shared.count_discarded(),
            },
            // Not asked for: nothing waits for it.
            Phase::Attempt | Phase::Sending { .. } | Phase::Over => {
                self.shared.count_discarded();
            }
        }
    }

    /// The reply of `len` bytes in `buf` is accepted: the call ends with
    /// it, and with source tokens the token it carries is remembered (only
    /// a token in an accepted reply is: a challenge's may be forged).
    fn accepted(&mut self, buf: &[u8], len: usize) {
        if let Some(token) = self.shared.token_in(buf.get(..len).unwrap_or_default()) {
            self.shared.remember_token(self.dest, token);
        }
        self.finish(Ok(len));
    }

    /// Whether the datagram of `len` bytes in `buf` is a challenge (with
    /// source tokens).
    fn is_challenge(&self, buf: &[u8], len: usize, truncated: bool) -> bool {
        let Some(format) = &self.shared.settings.tokens else {
            return false;
        };
        // A panic in the format's code: not a challenge (the reply check,
        // if any, judges the datagram then).
        !truncated
            && panic::catch_unwind(AssertUnwindSafe(|| {
                format.is_challenge(buf.get(..len).unwrap_or_default())
            }))
            .unwrap_or(false)
    }

    /// A challenge of `len` bytes in `buf`: the request is sent again at
    /// once with its token, once per attempt. The token is not remembered
    /// for the destination: anyone can forge a challenge, and the server's
    /// replies carry the tokens to keep.
    fn challenged(&mut self, buf: &[u8], len: usize) {
        self.shared.challenges.fetch_add(1, Ordering::Relaxed);
        if let Some(token) = self.shared.token_in(buf.get(..len).unwrap_or_default()) {
            self.candidate = Some(token.to_vec());
        }
        if !self.rechallenged {
            self.rechallenged = true;
            self.phase = Phase::Sending {
                first: false,
                again: true,
            };
        }
    }

    /// A receive found nothing.
    fn nothing(&mut self) {
        self.phase = match self.phase {
            Phase::Discarding => Phase::Attempt,
            // The reply itself may have been among the datagrams the check
            // discarded: ask again at once rather than wait out the timeout.
            Phase::Checking { found: true } => Phase::Sending {
                first: false,
                again: true,
            },
            Phase::Checking { found: false } => AWAITING,
            // The wait ran out: so did the attempt.
            Phase::Awaiting { blocking: true, .. } => Phase::Attempt,
            other => other,
        };
    }

    fn finish(&mut self, outcome: Result<usize, Error>) {
        self.outcome = Some(outcome);
    }
}

/// A seed for one call's jitter, drawn from a client's generator `rng`
/// (which it moves on): each call's jitter is its own.
pub(crate) fn call_seed(rng: &mut u64) -> u64 {
    xorshift(rng) | 1
}

/// One step of the xorshift64* generator `rng`.
fn xorshift(rng: &mut u64) -> u64 {
    *rng ^= *rng >> 12;
    *rng ^= *rng << 25;
    *rng ^= *rng >> 27;
    rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

/// `nominal` scaled by a random factor within `1 ± fraction`, drawn from
/// the xorshift generator `rng`.
fn jittered(rng: &mut u64, nominal: Duration, fraction: f64) -> Duration {
    if fraction <= 0.0 {
        return nominal;
    }
    let bits = xorshift(rng) >> 11; // 53 bits
    let unit = bits as f64 / (1u64 << 53) as f64; // [0, 1)
    let factor = 1.0 + fraction.min(1.0) * (2.0 * unit - 1.0); // [0, 2]
    Duration::try_from_secs_f64(nominal.as_secs_f64() * factor).unwrap_or(nominal)
}

/// The schedule of one call's attempts: the first waits the timeout, each
/// later one twice as long as the one before (with jitter), within the
/// retries and the deadline.
#[derive(Debug)]
struct Attempts {
    started: Instant,
    deadline: Option<Instant>,
    max: u32,
    sent: u32,
    nominal: Duration,
    /// Requests sent again at once within an attempt.
    resent: u32,
    /// A datagram too large to check was discarded.
    too_large: bool,
}

impl Attempts {
    fn new(settings: &Settings, started: Instant) -> Attempts {
        Attempts {
            started,
            deadline: settings.call_timeout.and_then(|d| started.checked_add(d)),
            max: settings.retries.saturating_add(1),
            sent: 0,
            nominal: settings.initial_timeout,
            resent: 0,
            too_large: false,
        }
    }

    /// The next attempt at `now`, if one is left: how long it waits for a
    /// reply. `jitter` varies the nominal wait of resends.
    fn next(
        &mut self,
        now: Instant,
        jitter: impl FnOnce(Duration) -> Duration,
    ) -> Option<Duration> {
        if self.sent >= self.max {
            return None;
        }
        let mut wait = if self.sent == 0 {
            self.nominal
        } else {
            jitter(self.nominal)
        };
        if let Some(deadline) = self.deadline {
            let left = deadline.saturating_duration_since(now);
            if left.is_zero() {
                return None;
            }
            wait = wait.min(left);
        }
        self.sent += 1;
        self.nominal = self.nominal.saturating_mul(2);
        Some(wait)
    }

    /// Counts a request sent again at once, within the current attempt.
    fn resent(&mut self) {
        self.resent = self.resent.saturating_add(1);
    }

    /// The error of a call that got no reply by `now`: too large (when that
    /// is all that came) or a timeout.
    fn failed(&self, peer: SocketAddr, capacity: usize, now: Instant) -> Error {
        if self.too_large {
            return Error::ReplyTooLarge {
                addr: peer,
                capacity,
            };
        }
        Error::Timeout {
            addr: peer,
            attempts: self.sent.saturating_add(self.resent),
            elapsed: now.saturating_duration_since(self.started),
        }
    }
}

/// What a received datagram is to the call waiting for a reply.
enum Judged {
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

impl Settings {
    /// A refusal (ICMP port unreachable) the client was told to treat as a
    /// lost reply.
    pub(crate) fn is_ignored_refusal(&self, err: &io::Error) -> bool {
        self.refused_as_loss && is_refusal_kind(err.kind())
    }

    /// Judges a datagram of `len` bytes in `buf` (`truncated`: it was larger
    /// than `buf`) received in answer to `request`.
    fn judge(&self, request: &[u8], buf: &[u8], len: usize, truncated: bool) -> Judged {
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

#[cfg(test)]
mod token_tests {
    use super::*;
    use crate::ClientBuilder;

    struct Whole;
    impl crate::TokenFormat for Whole {
        fn find<'a>(&self, datagram: &'a [u8]) -> Option<&'a [u8]> {
            Some(datagram)
        }
        fn write(&self, datagram: &mut Vec<u8>, token: &[u8]) {
            datagram.extend_from_slice(token);
        }
    }

    #[test]
    fn tokens_are_kept_per_server_and_never_too_long() {
        let shared = Shared::new(ClientBuilder::new().source_tokens(Whole).settings);
        let v4: SocketAddr = ([127, 0, 0, 1], 53).into();
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:53".parse().unwrap_or(v4);
        let other: SocketAddr = ([127, 0, 0, 2], 53).into();
        let mut out = Vec::new();
        shared.remember_token(v4, b"tok");
        assert_eq!(
            shared.wire(mapped, b"q", None, &mut out),
            b"qtok",
            "the same server"
        );
        assert_eq!(
            shared.wire(other, b"q", None, &mut out),
            b"q",
            "another server"
        );
        shared.remember_token(v4, &[b'L'; MAX_TOKEN + 1]);
        assert_eq!(
            shared.wire(v4, b"q", None, &mut out),
            b"qtok",
            "too long: ignored"
        );
        shared.remember_token(v4, &[b'L'; MAX_TOKEN]);
        assert_eq!(shared.wire(v4, b"q", None, &mut out).len(), 1 + MAX_TOKEN);
        assert_eq!(shared.wire(v4, b"q", Some(b"cand"), &mut out), b"qcand");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ClientBuilder;

    const MS: Duration = Duration::from_millis(1);

    const DEST: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9);

    fn peer(builder: ClientBuilder) -> Shared {
        Shared::new(builder.settings)
    }

    fn nothing() -> io::Result<(usize, bool)> {
        Err(io::ErrorKind::WouldBlock.into())
    }

    /// What a client saw of a call: its outcome, when it ended, its sends,
    /// and every step in order (`S`end, `D`iscard, `C`heck, `P`oll,
    /// `W`ait).
    struct Run {
        outcome: Result<usize, Error>,
        took: Duration,
        sends: u32,
        steps: String,
    }

    /// Drives a call on a clock that moves only as the steps say: a send
    /// takes no time, a poll `poll`, a wait until its end. The server is
    /// silent; `stale` datagrams are queued before the call.
    fn drive(peer: &Shared, mut stale: usize, poll: Duration) -> Run {
        let start = Instant::now();
        let mut now = start;
        let mut call = Exchange::new(peer, DEST, 64, Queue::MayHoldStale, now, 7);
        let (mut sends, mut steps) = (0, String::new());
        let mut queued = || match stale.checked_sub(1) {
            Some(left) => {
                stale = left;
                Ok((5, false))
            }
            None => nothing(),
        };
        for _ in 0..1_000_000 {
            match call.next(now) {
                Step::Send => {
                    sends += 1;
                    steps.push('S');
                    call.sent(Ok(1));
                }
                Step::Discard => {
                    steps.push('D');
                    call.received(queued(), b"x", b"stale");
                }
                Step::Check => {
                    steps.push('C');
                    call.received(queued(), b"x", b"stale");
                }
                Step::Poll => {
                    steps.push('P');
                    now += poll;
                    call.received(queued(), b"x", b"stale");
                }
                Step::Wait(wait) => {
                    steps.push('W');
                    // Every wait ends where the attempt does, and says so
                    // as a duration too: polling counts toward it.
                    assert_eq!(wait.timeout, wait.until - now, "{steps}");
                    now = wait.until;
                    call.received(Err(io::ErrorKind::TimedOut.into()), b"x", &[]);
                }
                Step::Done(outcome) => {
                    return Run {
                        outcome,
                        took: now - start,
                        sends,
                        steps,
                    };
                }
            }
        }
        panic!("the call never ended: {steps}");
    }

    fn attempts(run: &Run) -> u32 {
        match run.outcome {
            Err(Error::Timeout { attempts, .. }) => attempts,
            ref other => panic!("expected a timeout, got {other:?}"),
        }
    }

    #[test]
    fn polling_counts_toward_each_wait_and_the_deadline() {
        // A window longer than the waits: each attempt polls its whole
        // wait and no more.
        let long = peer(
            ClientBuilder::new()
                .initial_timeout(100 * MS)
                .retries(1)
                .jitter(0.0)
                .call_timeout(None)
                .busy_poll(Duration::from_secs(3600)),
        );
        let run = drive(&long, 0, MS);
        assert_eq!(run.took, 300 * MS, "{}", run.steps);
        assert_eq!(attempts(&run), 2);
        assert!(!run.steps.contains('W'), "{}", run.steps);
        // A window as long as the deadline.
        let deadline = peer(
            ClientBuilder::new()
                .initial_timeout(Duration::from_secs(1))
                .retries(0)
                .call_timeout(300 * MS)
                .busy_poll(300 * MS),
        );
        let run = drive(&deadline, 0, MS);
        assert_eq!(run.took, 300 * MS, "{}", run.steps);
        assert_eq!(attempts(&run), 1);
        // A shorter window: poll, then block for the rest of the wait.
        let short = peer(
            ClientBuilder::new()
                .initial_timeout(100 * MS)
                .retries(0)
                .busy_poll(50 * MS),
        );
        let run = drive(&short, 0, MS);
        assert_eq!(run.took, 100 * MS, "{}", run.steps);
        assert_eq!(run.steps, format!("SC{}W", "P".repeat(50)));
    }

    #[test]
    fn attempts_double_their_waits_within_retries_and_deadline() {
        let plain = ClientBuilder::new()
            .initial_timeout(10 * MS)
            .retries(3)
            .jitter(0.0);
        let run = drive(&peer(plain.clone()), 0, MS);
        assert_eq!(run.took, (10 + 20 + 40 + 80) * MS);
        assert_eq!((attempts(&run), run.steps.as_str()), (4, "DSWSWSWSW"));
        let run = drive(&peer(plain.call_timeout(25 * MS)), 0, MS);
        assert_eq!(run.took, 25 * MS);
        assert_eq!(attempts(&run), 2);
        // With jitter, each retry's wait lies within its fraction.
        let jittered = peer(
            ClientBuilder::new()
                .initial_timeout(10 * MS)
                .retries(1)
                .jitter(0.5),
        );
        let run = drive(&jittered, 0, MS);
        assert!(run.took >= 20 * MS && run.took <= 40 * MS, "{:?}", run.took);
    }

    #[test]
    fn stale_datagrams_are_discarded_before_the_request_or_right_after_it() {
        // Without polling: before the first request, and never again.
        let run = drive(
            &peer(ClientBuilder::new().initial_timeout(MS).retries(1)),
            2,
            MS,
        );
        assert_eq!((run.steps.as_str(), run.sends), ("DDDSWSW", 2));
        // Polling: right after the first send; having found some, the
        // request is sent again at once, and counted in the attempts.
        let polling = ClientBuilder::new()
            .initial_timeout(2 * MS)
            .retries(0)
            .busy_poll(MS);
        let run = drive(&peer(polling.clone()), 2, MS);
        assert_eq!(run.steps, "SCCCSPW");
        assert_eq!((run.sends, attempts(&run)), (2, 2));
        let run = drive(&peer(polling), 0, MS);
        assert_eq!((run.steps.as_str(), attempts(&run)), ("SCPW", 1));
    }

    #[test]
    fn a_reply_that_passes_the_check_is_taken_even_by_the_stale_check() {
        let checked = peer(
            ClientBuilder::new()
                .busy_poll(MS)
                .reply_check(|_, reply| reply == b"yes"),
        );
        let now = Instant::now();
        let mut call = Exchange::new(&checked, DEST, 64, Queue::MayHoldStale, now, 7);
        assert!(matches!(call.next(now), Step::Send));
        call.sent(Ok(1));
        assert!(matches!(call.next(now), Step::Check));
        call.received(Ok((2, false)), b"x", b"no");
        assert!(matches!(call.next(now), Step::Check));
        call.received(Ok((3, false)), b"x", b"yes");
        assert!(matches!(call.next(now), Step::Done(Ok(3))));
        assert_eq!(checked.discarded(), 1);
    }

    #[test]
    fn a_send_asked_for_again_and_again_ends_at_the_call_timeout() {
        let quiet = peer(
            ClientBuilder::new()
                .initial_timeout(MS)
                .call_timeout(Duration::from_millis(5)),
        );
        let start = Instant::now();
        let mut now = start;
        let mut call = Exchange::new(&quiet, DEST, 64, Queue::Drained, now, 7);
        let mut sends = 0;
        loop {
            match call.next(now) {
                Step::Send => {
                    sends += 1;
                    assert!(sends < 1_000, "the send is asked for without end");
                    call.sent(Err(io::ErrorKind::Interrupted.into()));
                    now += Duration::from_micros(100);
                }
                Step::Done(outcome) => {
                    assert!(matches!(outcome, Err(Error::Timeout { .. })), "{outcome:?}");
                    break;
                }
                other => panic!("nothing was sent: {other:?}"),
            }
        }
        assert!(now - start >= Duration::from_millis(5));
        assert_eq!(sends, 50);
    }

    #[test]
    fn errors_end_the_call_unless_they_are_losses() {
        let refused = || io::Error::from(io::ErrorKind::ConnectionRefused);
        let now = Instant::now();
        let strict = peer(ClientBuilder::new());
        let mut call = Exchange::new(&strict, DEST, 64, Queue::Drained, now, 7);
        assert!(matches!(call.next(now), Step::Send));
        call.sent(Ok(1));
        assert!(matches!(call.next(now), Step::Wait(_)));
        call.received(Err(refused()), b"x", &[]);
        assert!(matches!(
            call.next(now),
            Step::Done(Err(Error::Refused { .. }))
        ));
        // Windows reports a refused port as a reset: the same error.
        let mut call = Exchange::new(&strict, DEST, 64, Queue::Drained, now, 7);
        assert!(matches!(call.next(now), Step::Send));
        call.sent(Ok(1));
        assert!(matches!(call.next(now), Step::Wait(_)));
        call.received(Err(io::ErrorKind::ConnectionReset.into()), b"x", &[]);
        assert!(matches!(
            call.next(now),
            Step::Done(Err(Error::Refused { .. }))
        ));
        // Told to, a refusal is a loss; an interrupted call is tried again.
        let lenient = peer(ClientBuilder::new().refused_as_loss(true));
        let mut call = Exchange::new(&lenient, DEST, 64, Queue::Drained, now, 7);
        assert!(matches!(call.next(now), Step::Send));
        call.sent(Err(io::ErrorKind::Interrupted.into()));
        assert!(matches!(call.next(now), Step::Send));
        call.sent(Err(refused()));
        assert!(matches!(call.next(now), Step::Wait(_)));
        call.received(Err(refused()), b"x", &[]);
        assert!(matches!(call.next(now), Step::Wait(_)));
        // Too large for the buffer: the reply, which does not fit.
        call.received(Ok((64, true)), b"x", &[0; 64]);
        assert!(matches!(
            call.next(now),
            Step::Done(Err(Error::ReplyTooLarge { capacity: 64, .. }))
        ));
    }

    /// Where a refusal is not cleared once read (Wine reports it on every
    /// receive), a stale check that sees it, with refusals counted as
    /// losses, moves on: it does not ask for the same receive forever.
    #[test]
    fn a_refusal_that_stays_does_not_hold_the_stale_checks() {
        let refused = || Err(io::ErrorKind::ConnectionRefused.into());
        let now = Instant::now();
        let lenient = peer(ClientBuilder::new().refused_as_loss(true));
        // Before the first send.
        let mut call = Exchange::new(&lenient, DEST, 64, Queue::MayHoldStale, now, 7);
        assert!(matches!(call.next(now), Step::Discard));
        call.received(refused(), b"x", &[]);
        assert!(matches!(call.next(now), Step::Send));
        // Latency mode's check right after the first send.
        let polling = peer(
            ClientBuilder::new()
                .refused_as_loss(true)
                .busy_poll(Duration::from_millis(5)),
        );
        let mut call = Exchange::new(&polling, DEST, 64, Queue::MayHoldStale, now, 7);
        assert!(matches!(call.next(now), Step::Send));
        call.sent(Ok(1));
        assert!(matches!(call.next(now), Step::Check));
        call.received(refused(), b"x", &[]);
        assert!(!matches!(call.next(now), Step::Check));
    }

    #[test]
    fn jitter_stays_within_its_fraction_and_varies() {
        let mut rng = 12345;
        let nominal = Duration::from_millis(100);
        let waits: Vec<Duration> = (0..1_000)
            .map(|_| jittered(&mut rng, nominal, 0.2))
            .collect();
        assert!(waits.iter().all(|w| *w >= Duration::from_millis(80)));
        assert!(waits.iter().all(|w| *w <= Duration::from_millis(120)));
        let (min, max) = (waits.iter().min(), waits.iter().max());
        assert!(
            max.zip(min)
                .is_some_and(|(max, min)| *max - *min > Duration::from_millis(30))
        );
        assert_eq!(jittered(&mut rng, nominal, 0.0), nominal);
        // No overflow at the far end.
        assert_eq!(jittered(&mut rng, Duration::MAX, 0.0), Duration::MAX);
        let _ = jittered(&mut rng, Duration::MAX, 1.0);
    }
}
