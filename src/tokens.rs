//! Source-validation tokens: a keyed hash of a request's source address and
//! a time, which only a client that receives at that address can echo back
//! (after RFC 9018's DNS server cookies and QUIC's Retry tokens).

use std::fmt;
use std::hash::Hasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use siphasher::sip::SipHasher24;
use siphasher::sip128::{Hasher128, SipHasher24 as SipHasher24x128};

use crate::error::Error;
use crate::ratelimit::RateLimit;

/// How many bytes a token is: `SourceTokens` makes and accepts no other
/// length.
pub const TOKEN_LEN: usize = 16;

/// The token layout's version, its first byte.
const VERSION: u8 = 1;
/// How far in the future a token's time may be, for servers sharing a
/// secret whose clocks differ: five minutes, as RFC 9018 allows.
const FUTURE_SKEW: u64 = 300;
/// Challenges a source prefix may get per second, and at once, unless
/// [`SourceTokens::challenge_limit`] says otherwise.
const DEFAULT_CHALLENGES: u32 = 10;
/// What a period's key is derived under (with `rotate_every`).
const KEY_LABEL: &[u8] = b"udp-greet source token key v1";

/// Where a protocol carries a source token: the functions the server and
/// the client use to find a token in a datagram and to write one in.
///
/// The library never guesses a format: the protocol decides. A token is
/// opaque bytes ([`TOKEN_LEN`] from this crate's server); a datagram may
/// carry it anywhere, in any encoding, as long as `find` gives back the
/// bytes `write` was given.
///
/// ```
/// use udp_greet::TokenFormat;
///
/// /// A made-up protocol: `T` and the token, or `-` for none, then the payload.
/// struct Prefixed;
///
/// impl TokenFormat for Prefixed {
///     fn find<'a>(&self, datagram: &'a [u8]) -> Option<&'a [u8]> {
///         match datagram.split_first() {
///             Some((b'T', rest)) => rest.get(..udp_greet::TOKEN_LEN),
///             _ => None,
///         }
///     }
///
///     fn write(&self, datagram: &mut Vec<u8>, token: &[u8]) {
///         let payload = self.payload(datagram).to_vec();
///         datagram.clear();
///         datagram.push(b'T');
///         datagram.extend_from_slice(token);
///         datagram.extend_from_slice(&payload);
///     }
///
///     fn challenge(&self, _request: &[u8], reply: &mut Vec<u8>) -> bool {
///         reply.extend_from_slice(b"-retry"); // `write` adds the token
///         true
///     }
///
///     fn is_challenge(&self, datagram: &[u8]) -> bool {
///         self.payload(datagram) == b"retry"
///     }
/// }
///
/// impl Prefixed {
///     fn payload<'a>(&self, datagram: &'a [u8]) -> &'a [u8] {
///         match datagram.split_first() {
///             Some((b'T', rest)) => rest.get(udp_greet::TOKEN_LEN..).unwrap_or_default(),
///             Some((b'-', rest)) => rest,
///             _ => datagram,
///         }
///     }
/// }
///
/// let tokens = udp_greet::SourceTokens::new([0; 16], Prefixed).challenge(true);
/// # drop(tokens);
/// ```
pub trait TokenFormat: Send + Sync + 'static {
    /// The token `datagram` carries, if any: in a request, the token the
    /// client echoes; in a reply (on the client), the token the server
    /// gave. Called on every request a server with tokens receives, before
    /// any limit: keep it cheap, and never trust what it reads (a token
    /// found is checked; anything else, a panic included, is treated as no
    /// token).
    fn find<'a>(&self, datagram: &'a [u8]) -> Option<&'a [u8]>;

    /// Writes `token` into `datagram`: on the server, into a reply (a
    /// challenge, or a handler's reply when tokens go out with replies);
    /// on the client, into a request it is about to send. Replaces any
    /// token the datagram already carries. Should it panic on a reply, the
    /// reply goes as the handler made it; on a request, the client sends
    /// the request without the token.
    fn write(&self, datagram: &mut Vec<u8>, token: &[u8]);

    /// Builds, into the empty `reply`, a challenge to `request`: a small
    /// reply that tells the client to send the request again with the
    /// token that [`write`](TokenFormat::write) then adds. Returns whether
    /// there is one; `false` drops the request as it would have been.
    ///
    /// Used only with [`SourceTokens::challenge`]. The challenge, token
    /// included, is sent only if it is no larger than the request times
    /// the server's [amplification limit](crate::ServerBuilder::max_amplification)
    /// (times 1 without one): to a source not yet shown to be real, it
    /// must not amplify. A client that multiplexes calls by request id
    /// routes a challenge by its id like any reply: copy the request's id
    /// into it. A panic here is caught, and the request dropped as it
    /// would have been. Defaults to none.
    fn challenge(&self, request: &[u8], reply: &mut Vec<u8>) -> bool {
        let _ = (request, reply);
        false
    }

    /// Whether `datagram`, from a server, is a challenge rather than the
    /// reply: the client then sends the request again at once, with the
    /// token the challenge carries. A panic here is caught and taken as
    /// `false`. Defaults to `false`.
    fn is_challenge(&self, datagram: &[u8]) -> bool {
        let _ = datagram;
        false
    }
}

/// Source-validation tokens for a server
/// ([`ServerBuilder::source_tokens`](crate::ServerBuilder::source_tokens)):
/// a request that carries a valid token for its source address comes from
/// a client that receives at that address, and so is not forged.
///
/// A token is 16 bytes: a version, the time it was made (seconds, in
/// UNIX time), and a SipHash-2-4 of those and the source address (its IP
/// address, not the port) under a 128-bit secret, as RFC 9018's DNS server
/// cookies are made. It is valid from the address it was made for, for
/// [`lifetime`](SourceTokens::lifetime) after it was made, under the
/// current secret or the previous one. Servers that share the secret
/// (anycast) accept each other's tokens, with clocks up to five minutes
/// apart.
///
/// What a valid token changes ([`Stats::validated`](crate::Stats::validated)):
/// the request is limited by [`validated_limit`](SourceTokens::validated_limit)
/// (no limit by default) instead of the server's
/// [rate limit](crate::ServerBuilder::rate_limit), and its reply is not held
/// to the [amplification limit](crate::ServerBuilder::max_amplification).
/// The handler sees it as [`Request::validated`](crate::Request::validated).
/// A request without a valid token is treated as it would be without tokens;
/// with [`challenge`](SourceTokens::challenge), one the limits would drop
/// gets a challenge with a fresh token instead.
///
/// Clones share their secrets: [`rotate`](SourceTokens::rotate) on one
/// rotates every server given a clone. The settings are the builder's: a
/// clone made before a setting (such as
/// [`previous_secret`](SourceTokens::previous_secret)) keeps what it had,
/// secrets included.
///
/// ```
/// # fn main() -> Result<(), udp_greet::Error> {
/// use std::net::IpAddr;
/// use udp_greet::{SourceTokens, TokenFormat};
///
/// struct Suffix; // the token is the last 16 bytes
/// impl TokenFormat for Suffix {
///     fn find<'a>(&self, datagram: &'a [u8]) -> Option<&'a [u8]> {
///         datagram.len().checked_sub(16).map(|at| &datagram[at..])
///     }
///     fn write(&self, datagram: &mut Vec<u8>, token: &[u8]) {
///         datagram.extend_from_slice(token);
///     }
/// }
///
/// let tokens = SourceTokens::new([7; 16], Suffix);
/// let me: IpAddr = "192.0.2.1".parse().unwrap();
/// let token = tokens.token_for(me);
/// assert!(tokens.check(&token, me));
/// assert!(!tokens.check(&token, "192.0.2.2".parse().unwrap()));
///
/// tokens.rotate([8; 16])?;
/// assert!(tokens.check(&token, me), "the previous secret is still accepted");
/// tokens.rotate([9; 16])?;
/// assert!(!tokens.check(&token, me), "rotated out");
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
#[must_use]
pub struct SourceTokens {
    pub(crate) format: Format,
    secrets: Arc<Secrets>,
    /// Seconds a token stays valid.
    lifetime: u64,
    /// Seconds between scheduled rotations, if any.
    rotate_every: Option<u64>,
    pub(crate) validated_limit: Option<RateLimit>,
    pub(crate) challenge: bool,
    /// How many challenges each source prefix may get.
    pub(crate) challenge_limit: RateLimit,
    pub(crate) in_replies: bool,
    /// The settings as given, for `validate`.
    lifetime_set: Duration,
    rotate_set: Option<Duration>,
}

impl fmt::Debug for SourceTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The secrets stay out of logs.
        f.debug_struct("SourceTokens")
            .field("lifetime", &self.lifetime_set)
            .field("rotate_every", &self.rotate_set)
            .field("validated_limit", &self.validated_limit)
            .field("challenge", &self.challenge)
            .field("challenge_limit", &self.challenge_limit)
            .field("in_replies", &self.in_replies)
            .finish_non_exhaustive()
    }
}

impl SourceTokens {
    /// Tokens made under `secret` (128 bits: draw it from a secure random
    /// source, such as [`random_secret`](SourceTokens::random_secret), and
    /// give the same one to servers that are to accept each other's
    /// tokens), carried as `format` says. Anyone who knows the secret can
    /// make a token for any address: an all-zero secret is refused when the
    /// server is bound.
    pub fn new(secret: [u8; 16], format: impl TokenFormat) -> Self {
        SourceTokens {
            format: Format::new(format),
            secrets: Arc::new(Secrets {
                version: AtomicU64::new(0),
                keys: RwLock::new(Keys {
                    current: secret,
                    previous: None,
                }),
            }),
            lifetime: 3600,
            rotate_every: None,
            validated_limit: None,
            challenge: false,
            challenge_limit: RateLimit::new(DEFAULT_CHALLENGES, DEFAULT_CHALLENGES),
            in_replies: true,
            lifetime_set: Duration::from_secs(3600),
            rotate_set: None,
        }
    }

    /// Also accepts tokens made under `secret`, and makes none with it: the
    /// secret servers used before the current one, for a server that
    /// starts during a rotation.
    ///
    /// Like every setting, it applies to this value and the clones made
    /// from it afterwards; clones made before keep their own secrets.
    pub fn previous_secret(mut self, secret: [u8; 16]) -> Self {
        let (_, mut keys) = self.secrets.read();
        keys.previous = Some(secret);
        self.secrets = Arc::new(Secrets {
            version: AtomicU64::new(0),
            keys: RwLock::new(keys),
        });
        self
    }

    /// A secret for a server whose tokens no other server needs to accept:
    /// 128 bits of SipHash output under the keys of std's `RandomState`,
    /// which std draws from the operating system's random source (once per
    /// thread, then moved on for each new state). Servers that share tokens
    /// share a secret drawn once with a tool you trust (`openssl rand 16`)
    /// and kept where only they can read it.
    #[must_use]
    pub fn random_secret() -> [u8; 16] {
        use std::hash::BuildHasher;
        let state = std::collections::hash_map::RandomState::new();
        let mut secret = [0u8; 16];
        for (i, half) in secret.chunks_mut(8).enumerate() {
            half.copy_from_slice(&state.hash_one(("udp-greet token secret", i)).to_le_bytes());
        }
        secret
    }

    /// How long a token stays valid after it was made. A server gives a
    /// fresh one (with [`in_replies`](SourceTokens::in_replies)) to a
    /// request whose token is older than half of it.
    ///
    /// Must be a whole number of seconds, from 1 second to 68 years.
    /// Defaults to one hour, as RFC 9018 has it. Tokens dated up to five
    /// minutes in the future are accepted whatever the lifetime (clocks of
    /// servers sharing a secret differ).
    pub fn lifetime(mut self, lifetime: Duration) -> Self {
        self.lifetime_set = lifetime;
        self.lifetime = lifetime.as_secs();
        self
    }

    /// Rotates the secret on a schedule: tokens are made under a key
    /// derived from the secret and the period of `period` they fall in
    /// (periods aligned to UNIX time, so servers that share the secret
    /// change keys together without talking), and a token is accepted
    /// only in its own period and the next. A token then lives at most
    /// two periods, and less if its [`lifetime`](SourceTokens::lifetime)
    /// is shorter.
    ///
    /// Must be a whole number of seconds, at least 1. Defaults to none: the
    /// secret changes only through [`rotate`](SourceTokens::rotate).
    pub fn rotate_every(mut self, period: Duration) -> Self {
        self.rotate_set = Some(period);
        self.rotate_every = Some(period.as_secs());
        self
    }

    /// The rate limit for requests with a valid token, instead of the
    /// server's [rate limit](crate::ServerBuilder::rate_limit): usually more
    /// generous. Like any `RateLimit` it counts per /24 (IPv4) and /56
    /// (IPv6) unless told otherwise: `RateLimit::ipv4_prefix(32)` limits
    /// each validated address alone, so that one busy client does not limit
    /// its neighbours. Its own table; its drops are counted in
    /// [`Stats::rate_limited`](crate::Stats::rate_limited) too. The rate
    /// limit's [exempt](RateLimit::exempt) prefixes are exempt from it too,
    /// and the rate limit's [dry run](RateLimit::dry_run) covers it too.
    /// It needs a [rate limit](crate::ServerBuilder::rate_limit): without
    /// one, validated sources would be held to a limit and the rest to
    /// none, so bind refuses that.
    ///
    /// A token proves that a client at its address received it; one seen
    /// on the path can be replayed "from" that address, within its lifetime,
    /// to aim validated replies (with no amplification limit) at it. Set a
    /// limit where validated replies can be large.
    ///
    /// Defaults to `None`: no limit for validated sources.
    pub fn validated_limit(mut self, limit: impl Into<Option<RateLimit>>) -> Self {
        self.validated_limit = limit.into();
        self
    }

    /// Challenge under load: a request without a valid token that the rate
    /// limit, or the overload policy (a full handler pool, or the async
    /// server's `max_in_flight`), would drop gets a challenge instead,
    /// built by [`TokenFormat::challenge`] and carrying a fresh token. A
    /// client of this crate with the same format sends the request again
    /// at once with the token ([`ClientBuilder::source_tokens`](crate::ClientBuilder::source_tokens)).
    /// Counted in [`Stats::challenged`](crate::Stats::challenged).
    ///
    /// A challenge goes to a source not yet shown to be real, so it is
    /// bounded twice: never larger than the request times the
    /// [amplification limit](crate::ServerBuilder::max_amplification) (times
    /// 1 without one), and never more than
    /// [`challenge_limit`](SourceTokens::challenge_limit) per prefix, so
    /// that a forged flood is not reflected at its victim at full rate.
    /// A request over either is dropped as it would have been. With the
    /// rate limit's [`slip`](RateLimit::slip), only the limited requests
    /// slip picks are challenged (the challenge takes the slip reply's
    /// place), as Knot's `badcookie-slip` does.
    ///
    /// The format must build challenges ([`TokenFormat::challenge`]; the
    /// default builds none, and nothing is sent). With request ids on the
    /// client, a challenge must carry the request's id where the client's
    /// id reader finds it. Bind refuses it on a server with nothing to
    /// challenge for: no rate limit, and no handler pool (a blocking server
    /// that handles inline never sheds load).
    ///
    /// Defaults to off.
    pub fn challenge(mut self, on: bool) -> Self {
        self.challenge = on;
        self
    }

    /// How many challenges each source prefix may get: a token bucket per
    /// prefix, as the rate limit has (its `rate` a second after a `burst`,
    /// per its prefix lengths; bind refuses slip, exemptions and dry run
    /// here: set them on the rate limit). Challenges over it
    /// are not sent. Together with the amplification limit this bounds what
    /// a forged flood gets back: at most `rate x t + burst` challenges per
    /// prefix, besides the answers the rate limit lets through.
    ///
    /// Defaults to `RateLimit::new(10, 10)`: 10 a second per /24 or /56.
    pub fn challenge_limit(mut self, limit: RateLimit) -> Self {
        self.challenge_limit = limit;
        self
    }

    /// Writes a token, with [`TokenFormat::write`], into every reply, as
    /// DNS servers put their cookie in every response: the request's own
    /// when it is valid and fresh (no hash to compute), else a fresh one
    /// (for a request that carried none, an invalid one, or one older than
    /// half its lifetime, made in an earlier period or under the previous
    /// secret). Clients then hold a token before the server is under load,
    /// and a client of this crate remembers only tokens that come in
    /// replies it accepted. Off, tokens go out in challenges only, as
    /// QUIC's Retry does, and a client is challenged on each call the
    /// limits would drop.
    ///
    /// The token is written after the handler. Where it would take a reply
    /// over the largest UDP payload, or a reply to a source not validated
    /// over the [amplification limit](crate::ServerBuilder::max_amplification),
    /// or the format's code panics writing it, the reply goes without it; a
    /// protocol with a size limit of its own (DNS's EDNS buffer size) leaves
    /// it out in `write`.
    ///
    /// Off, this crate's client keeps no token between calls: each call
    /// the limits would drop is challenged, and once a flood has spent the
    /// [challenge budget](SourceTokens::challenge_limit) of its prefix, a
    /// client without a token gets nothing until it recovers. Off, with
    /// [challenges](SourceTokens::challenge) off too, the server hands out
    /// no token at all: it only checks those that servers sharing its
    /// secret handed out.
    ///
    /// Defaults to on.
    pub fn in_replies(mut self, on: bool) -> Self {
        self.in_replies = on;
        self
    }

    /// Makes `secret` the current secret: tokens are made under it from now
    /// on, those made under the current one are still accepted (it becomes
    /// the previous), and those made under the previous one are refused.
    /// Every server given a clone of these tokens (made after the last
    /// setting) rotates at once.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for an all-zero secret (a secret read from
    /// an empty file, say), with which anyone could make tokens: nothing
    /// changes.
    pub fn rotate(&self, secret: [u8; 16]) -> Result<(), Error> {
        if secret == [0; 16] {
            return Err(Error::invalid(
                "SourceTokens::rotate",
                "an all-zero secret lets anyone make tokens: nothing was changed",
            ));
        }
        self.secrets.update(|keys| {
            keys.previous = Some(keys.current);
            keys.current = secret;
        });
        Ok(())
    }

    /// A token for a client at `ip`, made now.
    #[must_use]
    pub fn token_for(&self, ip: IpAddr) -> [u8; TOKEN_LEN] {
        self.checker().make(ip, unix_now())
    }

    /// Whether `token` is valid now from a client at `ip`.
    #[must_use]
    pub fn check(&self, token: &[u8], ip: IpAddr) -> bool {
        self.checker().check(token, ip, unix_now()).is_valid()
    }

    /// A checker that caches the keys, for one thread.
    pub(crate) fn checker(&self) -> Checker {
        Checker {
            secrets: self.secrets.clone(),
            lifetime: self.lifetime,
            rotate_every: self.rotate_every,
            version: u64::MAX,
            keys: Keys {
                current: [0; 16],
                previous: None,
            },
            derived: [None; 4],
            now: 0,
        }
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        let (_, keys) = self.secrets.read();
        if keys.current == [0; 16] || keys.previous == Some([0; 16]) {
            return Err(Error::invalid(
                match keys.current == [0; 16] {
                    true => "SourceTokens::new",
                    false => "SourceTokens::previous_secret",
                },
                "an all-zero secret lets anyone make tokens: draw one from a secure random \
                 source (SourceTokens::random_secret)",
            ));
        }
        if self.lifetime_set.subsec_nanos() != 0 {
            return Err(Error::invalid(
                "SourceTokens::lifetime",
                "must be a whole number of seconds",
            ));
        }
        if self.rotate_set.is_some_and(|p| p.subsec_nanos() != 0) {
            return Err(Error::invalid(
                "SourceTokens::rotate_every",
                "must be a whole number of seconds",
            ));
        }
        if self.lifetime == 0 || self.lifetime > u64::from(u32::MAX / 2) {
            return Err(Error::invalid(
                "SourceTokens::lifetime",
                "must be between 1 second and 2147483647 seconds (68 years)",
            ));
        }
        if self.rotate_every == Some(0) {
            return Err(Error::invalid(
                "SourceTokens::rotate_every",
                "must be at least 1 second",
            ));
        }
        if let Some(limit) = &self.validated_limit {
            limit.validate("SourceTokens::validated_limit")?;
        }
        self.challenge_limit
            .validate("SourceTokens::challenge_limit")?;
        if self.challenge_limit.has_controls() {
            return Err(Error::invalid(
                "SourceTokens::challenge_limit",
                "slip, exempt and dry_run do not apply to the challenge budget: \
                 set them on the rate limit",
            ));
        }
        Ok(())
    }
}

/// The user's token format, shared.
#[derive(Clone)]
pub(crate) struct Format(Arc<dyn TokenFormat>);

impl Format {
    pub(crate) fn new(format: impl TokenFormat) -> Format {
        Format(Arc::new(format))
    }
}

impl fmt::Debug for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenFormat")
    }
}

impl std::ops::Deref for Format {
    type Target = dyn TokenFormat;
    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

// The server catches a panic in the format's code per datagram, as it does
// a handler's, and whatever state the format shares between calls is its
// own to keep sound (as with any `Sync` value): a builder holding one is
// as unwind-safe as one without.
impl std::panic::UnwindSafe for Format {}
impl std::panic::RefUnwindSafe for Format {}

/// The secrets every clone of one `SourceTokens` shares.
#[derive(Debug)]
struct Secrets {
    /// Raised at each change, so that checkers know to read `keys` again.
    version: AtomicU64,
    keys: RwLock<Keys>,
}

impl Secrets {
    fn update(&self, change: impl FnOnce(&mut Keys)) {
        // Plain data: a panic elsewhere cannot leave it half-written.
        let mut keys = self.keys.write().unwrap_or_else(|e| e.into_inner());
        change(&mut keys);
        self.version.fetch_add(1, Ordering::Release);
    }

    fn read(&self) -> (u64, Keys) {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        // Read under the lock: an update raises it while holding the lock.
        (self.version.load(Ordering::Acquire), *keys)
    }
}

#[derive(Clone, Copy)]
struct Keys {
    current: [u8; 16],
    previous: Option<[u8; 16]>,
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keys")
            .field("previous", &self.previous.is_some())
            .finish_non_exhaustive()
    }
}

/// What a check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Checked {
    /// Valid; `stale`: older than half its lifetime, or made under a key
    /// no longer current (a fresh one should go out).
    Valid {
        stale: bool,
    },
    Invalid,
}

impl Checked {
    pub(crate) fn is_valid(self) -> bool {
        matches!(self, Checked::Valid { .. })
    }
}

/// Makes and checks tokens for one thread, with the keys cached: a check
/// reads one shared atomic, and hashes once (twice for a token of the
/// previous secret, or a forged one).
#[derive(Debug)]
pub(crate) struct Checker {
    secrets: Arc<Secrets>,
    lifetime: u64,
    rotate_every: Option<u64>,
    /// The secrets' version `keys` was read at (`u64::MAX`: never).
    version: u64,
    keys: Keys,
    /// Period keys derived (with `rotate_every`): (which secret, period, key).
    derived: [Option<(bool, u64, [u8; 16])>; 4],
    /// The time of the check or token in progress (UNIX seconds).
    now: u64,
}

impl Checker {
    fn refresh(&mut self) {
        if self.secrets.version.load(Ordering::Acquire) != self.version {
            (self.version, self.keys) = self.secrets.read();
            self.derived = [None; 4];
        }
    }

    /// A token for `ip` made at `now` (UNIX seconds).
    pub(crate) fn make(&mut self, ip: IpAddr, now: u64) -> [u8; TOKEN_LEN] {
        self.refresh();
        self.now = now;
        let mut token = [0u8; TOKEN_LEN];
        token[0] = VERSION;
        token[4..8].copy_from_slice(&(now as u32).to_be_bytes());
        let key = self.key(false, now);
        let mac = mac(&key, &token[..8], ip);
        token[8..].copy_from_slice(&mac.to_be_bytes());
        token
    }

    /// Whether `token` is valid at `now` (UNIX seconds) from `ip`.
    pub(crate) fn check(&mut self, token: &[u8], ip: IpAddr, now: u64) -> Checked {
        let Ok(token) = <&[u8; TOKEN_LEN]>::try_from(token) else {
            return Checked::Invalid;
        };
        if token[..4] != [VERSION, 0, 0, 0] {
            return Checked::Invalid;
        }
        let stamp = u32::from_be_bytes([token[4], token[5], token[6], token[7]]);
        // Serial-number arithmetic: the stamp is UNIX time modulo 2^32.
        let age = i64::from((now as u32).wrapping_sub(stamp) as i32);
        if age < -(FUTURE_SKEW as i64) || age > self.lifetime as i64 {
            return Checked::Invalid;
        }
        let made = now.saturating_add_signed(-age);
        if let Some(period) = self.rotate_every {
            let (then, current) = (made / period, now / period);
            if then.saturating_add(1) < current {
                return Checked::Invalid;
            }
        }
        self.refresh();
        let mac = u64::from_be_bytes([
            token[8], token[9], token[10], token[11], token[12], token[13], token[14], token[15],
        ]);
        self.now = now;
        let stale_age = age > (self.lifetime / 2) as i64
            || self
                .rotate_every
                .is_some_and(|period| made / period != now / period);
        if self::mac(&self.key(false, made), &token[..8], ip) == mac {
            return Checked::Valid { stale: stale_age };
        }
        if self.keys.previous.is_some() && self::mac(&self.key(true, made), &token[..8], ip) == mac
        {
            return Checked::Valid { stale: true };
        }
        Checked::Invalid
    }

    /// The key for tokens made at `made` under the current secret, or the
    /// previous one (`previous`; the current if there is none).
    fn key(&mut self, previous: bool, made: u64) -> [u8; 16] {
        let secret = match (previous, self.keys.previous) {
            (true, Some(secret)) => secret,
            _ => self.keys.current,
        };
        let Some(period) = self.rotate_every else {
            return secret;
        };
        let index = made / period.max(1);
        if let Some((_, _, key)) = self
            .derived
            .iter()
            .flatten()
            .find(|(p, i, _)| *p == previous && *i == index)
        {
            return *key;
        }
        let key = derive(&secret, index);
        // Only the periods real tokens come from are kept (the current and
        // the one before), so that tokens dated in the future (forged, or
        // from a server whose clock is ahead) cannot push them out.
        let current = self.now / period.max(1);
        if index == current || index.saturating_add(1) == current {
            self.derived.rotate_right(1);
            self.derived[0] = Some((previous, index, key));
        }
        key
    }
}

/// The key of period `index` under `secret`.
fn derive(secret: &[u8; 16], index: u64) -> [u8; 16] {
    let mut hasher = SipHasher24x128::new_with_key(secret);
    hasher.write(KEY_LABEL);
    hasher.write(&index.to_le_bytes());
    hasher.finish128().as_bytes()
}

/// The token's MAC: SipHash-2-4 under `key` of its first eight bytes and
/// the address (IPv4-mapped IPv6 addresses as IPv4).
fn mac(key: &[u8; 16], head: &[u8], ip: IpAddr) -> u64 {
    let mut hasher = SipHasher24::new_with_key(key);
    hasher.write(head);
    match ip.to_canonical() {
        IpAddr::V4(v4) => hasher.write(&v4.octets()),
        IpAddr::V6(v6) => hasher.write(&v6.octets()),
    }
    hasher.finish()
}

/// UNIX time now, in seconds (0 before 1970).
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    struct Raw;
    impl TokenFormat for Raw {
        fn find<'a>(&self, datagram: &'a [u8]) -> Option<&'a [u8]> {
            Some(datagram)
        }
        fn write(&self, datagram: &mut Vec<u8>, token: &[u8]) {
            datagram.extend_from_slice(token);
        }
    }

    const NOW: u64 = 1_800_000_000;

    fn v4(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, last))
    }

    #[test]
    fn valid_for_its_address_and_lifetime_only() {
        let tokens = SourceTokens::new([1; 16], Raw).lifetime(Duration::from_secs(100));
        let mut c = tokens.checker();
        let token = c.make(v4(1), NOW);
        assert_eq!(c.check(&token, v4(1), NOW), Checked::Valid { stale: false });
        assert_eq!(c.check(&token, v4(2), NOW), Checked::Invalid);
        let v6 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1));
        assert_eq!(c.check(&token, v6, NOW), Checked::Invalid);
        let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped());
        assert!(c.check(&token, mapped, NOW).is_valid(), "mapped is IPv4");
        assert_eq!(
            c.check(&token, v4(1), NOW + 50),
            Checked::Valid { stale: false }
        );
        assert_eq!(
            c.check(&token, v4(1), NOW + 51),
            Checked::Valid { stale: true }
        );
        assert_eq!(
            c.check(&token, v4(1), NOW + 100),
            Checked::Valid { stale: true }
        );
        assert_eq!(c.check(&token, v4(1), NOW + 101), Checked::Invalid);
        // From a server whose clock is ahead: up to five minutes.
        assert!(c.check(&token, v4(1), NOW - 300).is_valid());
        assert_eq!(c.check(&token, v4(1), NOW - 301), Checked::Invalid);
    }

    #[test]
    fn every_changed_bit_is_refused() {
        let tokens = SourceTokens::new([2; 16], Raw);
        let mut c = tokens.checker();
        let token = c.make(v4(9), NOW);
        for bit in 0..TOKEN_LEN * 8 {
            let mut forged = token;
            forged[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(c.check(&forged, v4(9), NOW), Checked::Invalid, "bit {bit}");
        }
    }

    #[test]
    fn stamps_wrap_as_serial_numbers() {
        let tokens = SourceTokens::new([3; 16], Raw);
        let mut c = tokens.checker();
        let near_wrap = (1u64 << 32) - 10;
        let token = c.make(v4(1), near_wrap);
        assert!(c.check(&token, v4(1), near_wrap + 20).is_valid());
    }

    #[test]
    fn manual_rotation_keeps_one_previous_secret() {
        let tokens = SourceTokens::new([4; 16], Raw);
        let mut c = tokens.checker();
        let old = c.make(v4(1), NOW);
        assert!(tokens.rotate([0; 16]).is_err(), "no secret");
        assert_eq!(c.check(&old, v4(1), NOW), Checked::Valid { stale: false });
        assert!(tokens.rotate([5; 16]).is_ok());
        assert_eq!(c.check(&old, v4(1), NOW), Checked::Valid { stale: true });
        let new = c.make(v4(1), NOW);
        assert_ne!(old, new);
        assert_eq!(c.check(&new, v4(1), NOW), Checked::Valid { stale: false });
        assert!(tokens.rotate([6; 16]).is_ok());
        assert_eq!(c.check(&old, v4(1), NOW), Checked::Invalid);
        assert!(c.check(&new, v4(1), NOW).is_valid());
        // Another server started with the two newest secrets agrees.
        let other = SourceTokens::new([6; 16], Raw).previous_secret([5; 16]);
        assert!(other.checker().check(&new, v4(1), NOW).is_valid());
        assert!(!other.checker().check(&old, v4(1), NOW).is_valid());
    }

    #[test]
    fn scheduled_rotation_accepts_a_period_and_the_next() {
        let tokens = SourceTokens::new([7; 16], Raw)
            .rotate_every(Duration::from_secs(600))
            .lifetime(Duration::from_secs(3600));
        let mut c = tokens.checker();
        let start = NOW - NOW % 600; // a period's first second
        let token = c.make(v4(1), start + 599);
        assert_eq!(
            c.check(&token, v4(1), start + 599),
            Checked::Valid { stale: false }
        );
        assert_eq!(
            c.check(&token, v4(1), start + 600),
            Checked::Valid { stale: true }
        );
        assert!(c.check(&token, v4(1), start + 1199).is_valid());
        assert_eq!(c.check(&token, v4(1), start + 1200), Checked::Invalid);
        // Two servers with the same secret agree on every period's key.
        let other = SourceTokens::new([7; 16], Raw).rotate_every(Duration::from_secs(600));
        assert!(other.checker().check(&token, v4(1), start + 700).is_valid());
        // The period keys differ: a token re-stamped into another period fails.
        let mut moved = token;
        moved[4..8].copy_from_slice(&((start + 600) as u32).to_be_bytes());
        assert_eq!(c.check(&moved, v4(1), start + 700), Checked::Invalid);
    }

    #[test]
    fn builder_settings_do_not_reach_earlier_clones() {
        let first = SourceTokens::new([1; 16], Raw);
        let earlier = first.clone();
        let later = first.previous_secret([2; 16]);
        let old = SourceTokens::new([2; 16], Raw).token_for(v4(1));
        assert!(later.check(&old, v4(1)));
        assert!(
            !earlier.check(&old, v4(1)),
            "a clone made before keeps its secrets"
        );
        // Rotation, on the other hand, reaches every clone.
        let shared = later.clone();
        assert!(later.rotate([3; 16]).is_ok());
        assert!(shared.check(&later.token_for(v4(1)), v4(1)));
    }

    #[test]
    fn tokens_dated_in_the_future_do_not_evict_the_period_keys() {
        let tokens = SourceTokens::new([7; 16], Raw).rotate_every(Duration::from_secs(1));
        let mut c = tokens.checker();
        let token = c.make(v4(1), NOW);
        assert!(c.check(&token, v4(1), NOW).is_valid());
        let cached = c.derived;
        for ahead in 1..=300u64 {
            let mut forged = [0u8; TOKEN_LEN];
            forged[0] = VERSION;
            forged[4..8].copy_from_slice(&((NOW + ahead) as u32).to_be_bytes());
            assert_eq!(c.check(&forged, v4(1), NOW), Checked::Invalid);
        }
        assert_eq!(c.derived, cached);
    }

    #[test]
    fn every_length_but_sixteen_is_refused() {
        let tokens = SourceTokens::new([8; 16], Raw);
        let mut c = tokens.checker();
        let token = c.make(v4(1), NOW);
        for len in 0..=64 {
            let mut forged = token.to_vec();
            forged.resize(len, 0);
            let expected = if len == TOKEN_LEN {
                Checked::Valid { stale: false }
            } else {
                Checked::Invalid
            };
            assert_eq!(c.check(&forged, v4(1), NOW), expected, "{len}");
        }
    }

    #[test]
    fn settings_are_checked() {
        assert!(
            SourceTokens::new([0; 16], Raw).validate().is_err(),
            "no secret"
        );
        let previous = SourceTokens::new([1; 16], Raw).previous_secret([0; 16]);
        assert!(previous.validate().is_err(), "no secret");
        let ok = SourceTokens::new(SourceTokens::random_secret(), Raw);
        assert!(ok.validate().is_ok());
        assert_ne!(SourceTokens::random_secret(), SourceTokens::random_secret());
        assert!(
            ok.clone()
                .lifetime(Duration::from_millis(1500))
                .validate()
                .is_err()
        );
        assert!(
            ok.clone()
                .rotate_every(Duration::from_millis(1500))
                .validate()
                .is_err()
        );
        assert!(
            ok.clone()
                .challenge_limit(RateLimit::new(0, 1))
                .validate()
                .is_err()
        );
        assert!(ok.clone().lifetime(Duration::ZERO).validate().is_err());
        assert!(
            ok.clone()
                .lifetime(Duration::from_millis(999))
                .validate()
                .is_err()
        );
        assert!(
            ok.clone()
                .lifetime(Duration::from_secs(u64::MAX))
                .validate()
                .is_err()
        );
        assert!(
            ok.clone()
                .rotate_every(Duration::from_nanos(1))
                .validate()
                .is_err()
        );
        assert!(ok.validated_limit(RateLimit::new(0, 1)).validate().is_err());
    }
}
