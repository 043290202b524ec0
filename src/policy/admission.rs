//! Admission: the checks before any handler (size, source, source
//! tokens, the rate limits), the small replies sent instead of a handler's
//! (challenges, slip replies), and the token a reply carries.

use std::net::{IpAddr, SocketAddr};
use std::panic::{self, AssertUnwindSafe};
use std::time::{Duration, Instant};

use super::{Processor, can_answer};
use crate::config::{MAX_UDP_PAYLOAD_V4, MAX_UDP_PAYLOAD_V6};
use crate::ratelimit::Limiter;
use crate::sys::Received;
use crate::tokens::{Checked, TOKEN_LEN, unix_now};

/// How an admitted request's source stands with the source tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Standing {
    /// It carried a valid token: not held to the amplification limit.
    pub(crate) validated: bool,
    /// The token its reply carries.
    pub(crate) token_out: TokenOut,
}

/// The token a reply carries (with `SourceTokens::in_replies`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum TokenOut {
    /// None.
    #[default]
    None,
    /// A fresh one, made for the request's source.
    Fresh,
    /// The request's own, valid and fresh.
    Echo([u8; TOKEN_LEN]),
}

/// What [`Processor::admit`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// The request goes on to a handler.
    Handle(Standing),
    /// The reply buffer holds a small reply to send instead (a challenge,
    /// or a slip reply), which is not counted as a reply.
    Answered,
    /// Dropped, and counted.
    Dropped,
}

impl Processor {
    /// The checks before any handler, at time `now`: drops (and counts) a
    /// datagram that is truncated, from a source that cannot be answered,
    /// or over the rate limit, and checks its source token. A request the
    /// rate limit drops may get a small reply instead (a challenge, or the
    /// slip reply), written into `reply`.
    pub(crate) fn admit(
        &mut self,
        datagram: &Received<'_>,
        now: Instant,
        reply: &mut Vec<u8>,
    ) -> Admission {
        self.backoff = Duration::ZERO;
        let peer = datagram.peer;
        if datagram.truncated {
            self.totals.truncated += 1;
            return Admission::Dropped;
        }
        if !can_answer(peer) {
            self.totals.bad_source += 1;
            return Admission::Dropped;
        }
        let standing = self.standing(datagram);
        let source = &self.config.limiters.source;
        let limiter = if standing.validated {
            &self.config.limiters.validated
        } else {
            source
        };
        // A prefix the rate limit exempts is exempt from the validated
        // limit too, and counted alike whether a limit applies to the
        // request or not (a validated source without a limit of its own).
        if [limiter, source]
            .into_iter()
            .flatten()
            .any(|l| l.is_exempt(peer.ip()))
        {
            self.totals.exempt += 1;
            return Admission::Handle(standing);
        }
        let Some(limiter) = limiter else {
            return Admission::Handle(standing);
        };
        let verdict = limiter.check(peer.ip(), limiter.clock(now));
        self.totals.rate_limit_evictions += u64::from(verdict.evicted);
        if verdict.allowed {
            return Admission::Handle(standing);
        }
        // The rate limit's dry run covers the validated limit too.
        if limiter.dry_run || source.as_ref().is_some_and(|l| l.dry_run) {
            self.totals.dry_run_limited += 1;
            return Admission::Handle(standing);
        }
        // Cloned (a shared count) only on this path: the handle is needed
        // beside `&mut self`.
        let limiter = limiter.clone();
        self.limited(&limiter, verdict.slip, datagram, standing, reply)
    }

    /// Checks the source token `datagram` carries, if the server has
    /// tokens. A panic in the format's code counts as no token.
    fn standing(&mut self, datagram: &Received<'_>) -> Standing {
        let (Some(tokens), Some(checker)) = (&self.config.tokens, &mut self.checker) else {
            return Standing::default();
        };
        let ip = datagram.peer.ip();
        let in_replies = tokens.in_replies;
        let found = panic::catch_unwind(AssertUnwindSafe(|| {
            tokens.format.find(datagram.data).map(|token| {
                let checked = checker.check(token, ip, unix_now());
                let echo = <[u8; TOKEN_LEN]>::try_from(token).ok();
                (checked, echo)
            })
        }));
        let found = match found {
            Ok(found) => found,
            Err(payload) => {
                self.discard_panic(payload);
                None
            }
        };
        let fresh = if in_replies {
            TokenOut::Fresh
        } else {
            TokenOut::None
        };
        match found {
            Some((Checked::Valid { stale }, echo)) => {
                self.totals.validated += 1;
                let token_out = match echo {
                    // Sent back as it came: the client knows it is good.
                    Some(token) if !stale && in_replies => TokenOut::Echo(token),
                    _ => fresh,
                };
                Standing {
                    validated: true,
                    token_out,
                }
            }
            Some((Checked::Invalid, _)) => {
                self.totals.invalid_tokens += 1;
                Standing {
                    validated: false,
                    token_out: fresh,
                }
            }
            None => Standing {
                validated: false,
                token_out: fresh,
            },
        }
    }

    /// A request over `limiter`'s limit: challenged, slipped or dropped.
    fn limited(
        &mut self,
        limiter: &Limiter,
        picked: bool,
        datagram: &Received<'_>,
        standing: Standing,
        reply: &mut Vec<u8>,
    ) -> Admission {
        // With slip, only the requests it picks get a small reply.
        let small = picked || !limiter.slips();
        if small && !standing.validated && self.challenge(datagram, reply) {
            self.totals.challenged += 1;
            return Admission::Answered;
        }
        self.totals.rate_limited += 1;
        if let Some(build) = limiter.slip_reply.as_ref().filter(|_| picked) {
            reply.clear();
            // A panic in it leaves the request limited, unanswered.
            match panic::catch_unwind(AssertUnwindSafe(|| build(datagram.data, reply))) {
                Ok(true) if !self.too_large_unvalidated(reply.len(), datagram) => {
                    self.totals.slipped += 1;
                    return Admission::Answered;
                }
                Ok(_) => {}
                Err(payload) => self.discard_panic(payload),
            }
            reply.clear();
        }
        Admission::Dropped
    }

    /// Writes a challenge to `datagram` into `reply`, if the server
    /// challenges, its source's prefix has challenges left, and the format
    /// builds one within the amplification limit; returns whether it did.
    /// A panic in the format's code leaves the request to be dropped as it
    /// would have been.
    pub(super) fn challenge(&mut self, datagram: &Received<'_>, reply: &mut Vec<u8>) -> bool {
        let (Some(tokens), Some(checker)) = (&self.config.tokens, &mut self.checker) else {
            return false;
        };
        let Some(budget) = self
            .config
            .limiters
            .challenge
            .as_ref()
            .filter(|_| tokens.challenge)
        else {
            return false;
        };
        let ip = datagram.peer.ip();
        reply.clear();
        let token = checker.make(ip, unix_now());
        let built = panic::catch_unwind(AssertUnwindSafe(|| {
            let built = tokens.format.challenge(datagram.data, reply);
            if built {
                tokens.format.write(reply, &token);
            }
            built
        }));
        // Only a challenge that goes out takes from the prefix's budget.
        let budget = budget.clone();
        match built {
            Ok(true) if !self.too_large_unvalidated(reply.len(), datagram) => {
                if budget.check(ip, budget.clock(Instant::now())).allowed {
                    return true;
                }
            }
            Ok(_) => {}
            Err(payload) => self.discard_panic(payload),
        }
        reply.clear();
        false
    }

    /// Whether a small reply of `len` bytes (a challenge, a slip reply) to
    /// a source not validated is too large to send: more than the request
    /// times the amplification limit, or than the request without one.
    fn too_large_unvalidated(&self, len: usize, datagram: &Received<'_>) -> bool {
        let factor = self.config.max_amplification.unwrap_or(1);
        len > factor.saturating_mul(datagram.data.len())
    }

    /// Writes the token `standing` says into `reply`, to `peer`: the
    /// request's own, or a fresh one. A token that would take the reply to
    /// a request of `request` bytes over the amplification limit, or over
    /// the largest UDP payload, is left out, and so is one the format's
    /// code panicked writing (the reply goes as the handler made it).
    pub(crate) fn give_token(
        &mut self,
        standing: Standing,
        peer: SocketAddr,
        request: usize,
        reply: &mut Vec<u8>,
    ) {
        let (Some(tokens), Some(checker)) = (&self.config.tokens, &mut self.checker) else {
            return;
        };
        let token = match standing.token_out {
            TokenOut::None => return,
            TokenOut::Fresh => checker.make(peer.ip(), unix_now()),
            TokenOut::Echo(token) => token,
        };
        // Kept aside, to be sent as it is should the token not fit or the
        // format fail (it may rewrite the reply in any way).
        self.unwritten.clear();
        self.unwritten.extend_from_slice(reply);
        let written = panic::catch_unwind(AssertUnwindSafe(|| tokens.format.write(reply, &token)));
        // Within the largest UDP payload (of the family on the wire), and
        // the amplification limit for a source not validated.
        let max = match peer.ip().to_canonical() {
            IpAddr::V4(_) => MAX_UDP_PAYLOAD_V4,
            IpAddr::V6(_) => MAX_UDP_PAYLOAD_V6,
        };
        let fits = |reply: &Vec<u8>| {
            reply.len() <= max && (standing.validated || !self.too_large(reply.len(), request))
        };
        match written {
            Ok(()) if fits(reply) => {}
            Ok(()) => std::mem::swap(reply, &mut self.unwritten),
            Err(payload) => {
                std::mem::swap(reply, &mut self.unwritten);
                self.discard_panic(payload);
            }
        }
    }
}
