//! The async server's own settings (feature `tokio`, published as
//! `udp_greet::tokio::Limits`): how many handler futures run at once,
//! how long each may run, and what happens to the rest.

use std::time::Duration;

use crate::error::Error;
use crate::pool::MAX_QUEUE;

/// How many handler futures the async server runs at once unless
/// [`Limits::max_in_flight`] says otherwise.
const DEFAULT_MAX_IN_FLIGHT: usize = 1024;
/// How long a handler future may run unless [`Limits::handler_timeout`]
/// says otherwise.
const DEFAULT_HANDLER_TIMEOUT: Duration = Duration::from_secs(10);

/// The async server's limits on its handler futures; given to
/// [`ServerBuilder::limits`](crate::ServerBuilder::limits).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), udp_greet::Error> {
/// use std::time::Duration;
/// use udp_greet::tokio::{GreetServer, Limits};
///
/// let server = GreetServer::builder()
///     .limits(
///         Limits::new()
///             .max_in_flight(512)
///             .handler_timeout(Duration::from_secs(2))
///             .overload_reply(&b"busy"[..]),
///     )
///     .bind("127.0.0.1:0")?
///     .spawn(udp_greet::tokio::greet)?;
/// # server.shutdown().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use = "limits do nothing until given to ServerBuilder::limits"]
pub struct Limits {
    pub(crate) max_in_flight: usize,
    pub(crate) handler_timeout: Option<Duration>,
    pub(crate) overload_reply: Option<Vec<u8>>,
    pub(crate) drain_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            handler_timeout: Some(DEFAULT_HANDLER_TIMEOUT),
            overload_reply: None,
            drain_timeout: Duration::ZERO,
        }
    }
}

impl Limits {
    /// Every limit at its default.
    pub fn new() -> Self {
        Self::default()
    }

    /// The most handler futures the server runs at once, over all its
    /// workers. A request that arrives while that many are in flight is
    /// shed at once ([`overload_reply`](Limits::overload_reply),
    /// [`Stats::overloaded`](crate::Stats::overloaded)): the receive loop
    /// never waits for room, and requests in flight are never cancelled to
    /// make it.
    ///
    /// Each place holds one handler future and its request, made once and
    /// reused: the memory is the handler future's size plus 512 bytes and
    /// the request's bytes, per place ever used. The default is enough for
    /// handlers that wait 10 ms to answer about 100 000 requests a second,
    /// in about a megabyte of places for small requests.
    ///
    /// Must be between 1 and 1 048 576. Defaults to 1024.
    pub fn max_in_flight(mut self, requests: usize) -> Self {
        self.max_in_flight = requests;
        self
    }

    /// The longest a handler future may run: one still running then is
    /// dropped (cancelled at its await point), nothing is sent, and the
    /// request is counted in [`Stats::timed_out`](crate::Stats::timed_out).
    /// `None` lets handlers run until shutdown.
    ///
    /// Must not be zero. Defaults to 10 s, the default
    /// [`ClientBuilder::call_timeout`](crate::ClientBuilder::call_timeout), after
    /// which a client of this crate has given up.
    pub fn handler_timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.handler_timeout = timeout.into();
        self
    }

    /// A fixed reply for requests shed because
    /// [`max_in_flight`](Limits::max_in_flight) futures are running ("busy,
    /// try later" in the protocol's own words), instead of dropping them
    /// silently. Sent at once, only to requests that passed the
    /// [rate limit](crate::ServerBuilder::rate_limit), and not when it is
    /// larger than the
    /// [amplification limit](crate::ServerBuilder::max_amplification)
    /// allows. Shed requests are counted in
    /// [`Stats::overloaded`](crate::Stats::overloaded) either way.
    ///
    /// Defaults to dropping shed requests.
    pub fn overload_reply(mut self, reply: impl Into<Vec<u8>>) -> Self {
        self.overload_reply = Some(reply.into());
        self
    }

    /// How long, at shutdown, handler futures in flight may go on (and
    /// their replies go out); those still running after that are dropped
    /// and counted in [`Stats::shutdown_dropped`](crate::Stats::shutdown_dropped).
    ///
    /// Defaults to zero: the futures in flight are dropped at once.
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// Checks every limit.
    pub(crate) fn validate(&self) -> Result<(), Error> {
        if !(1..=MAX_QUEUE).contains(&self.max_in_flight) {
            return Err(Error::invalid(
                "Limits::max_in_flight",
                "must be between 1 and 1048576 requests",
            ));
        }
        if self.handler_timeout.is_some_and(|t| t.is_zero()) {
            return Err(Error::invalid(
                "Limits::handler_timeout",
                "must be greater than zero (None lets handlers run until shutdown)",
            ));
        }
        Ok(())
    }
}
