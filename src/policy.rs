//! What happens to each datagram, whatever the engine: admission (size,
//! source, rate limit), shedding, the amplification cap, handler panics,
//! and the running totals and latency histograms each thread or task keeps
//! and publishes. The blocking threads and the async tasks only receive,
//! run handlers and send around it.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::Socket;

use crate::config::Config;
use crate::control::Shared;
use crate::histogram::Recorders;
use crate::observe::Observer;
use crate::pool::{Pool, Submitted};
use crate::request::{Action, Metadata, Request};
use crate::stats::{SharedStats, Stats};
use crate::sys::Received;
use crate::tokens::Checker;

mod admission;

pub(crate) use admission::{Admission, Standing};

/// The bound every blocking handler meets; see
/// [`GreetServer::serve`](crate::GreetServer::serve).
pub(crate) trait HandlerFn:
    Fn(Request<'_>, &mut Vec<u8>) -> Action + Send + Sync + 'static
{
}
impl<F: Fn(Request<'_>, &mut Vec<u8>) -> Action + Send + Sync + 'static> HandlerFn for F {}

/// Decides the fate of each datagram and keeps a thread's running totals
/// and latency histograms.
pub(crate) struct Processor {
    config: Arc<Config>,
    stats: Arc<SharedStats>,
    /// Its counter slot, and latency recorders.
    slot: usize,
    pub(crate) observer: Observer,
    pub(crate) totals: Stats,
    /// The pause after a receive error, doubled each time one follows.
    backoff: Duration,
    /// When the handler call in progress started.
    call_started: Instant,
    /// Makes and checks source tokens, with the server's settings.
    checker: Option<Checker>,
    /// A reply as the handler made it, while a token is written in.
    unwritten: Vec<u8>,
}

impl Processor {
    /// For the thread (or task) with counter slot `slot`.
    pub(crate) fn new(config: &Arc<Config>, stats: &Arc<SharedStats>, slot: usize) -> Self {
        Processor {
            config: config.clone(),
            stats: stats.clone(),
            slot,
            observer: Observer::new(config.server_addr, config.local_addr),
            totals: Stats::default(),
            backoff: Duration::ZERO,
            call_started: Instant::now(),
            checker: config.tokens.as_ref().map(|tokens| tokens.checker()),
            unwritten: Vec::new(),
        }
    }

    /// Hands an admitted request to the pool; one it has no room for is
    /// shed ([`shed`](Processor::shed)), and one it no longer takes (the
    /// server is shutting down) is counted as dropped at shutdown. Returns
    /// whether `reply` holds a busy reply to send.
    pub(crate) fn submit(
        &mut self,
        pool: &Pool,
        datagram: &Received<'_>,
        standing: Standing,
        socket: usize,
        arrived: Instant,
        reply: &mut Vec<u8>,
    ) -> bool {
        match pool.submit(datagram, standing, socket, arrived) {
            Submitted::Queued => false,
            Submitted::Full => self.shed(datagram, standing, reply),
            Submitted::Closed => {
                self.totals.shutdown_dropped += 1;
                false
            }
        }
    }

    /// Counts a request the pool had no room for, and writes the busy reply
    /// into `reply` if there is one and the amplification limit allows it;
    /// a request without a valid token gets a challenge instead, where the
    /// server challenges. Returns whether `reply` is to be sent (not
    /// counted as a reply).
    pub(crate) fn shed(
        &mut self,
        datagram: &Received<'_>,
        standing: Standing,
        reply: &mut Vec<u8>,
    ) -> bool {
        if !standing.validated && self.challenge(datagram, reply) {
            self.totals.challenged += 1;
            return true;
        }
        self.totals.overloaded += 1;
        let Some(busy) = self.config.overload_reply() else {
            return false;
        };
        if !standing.validated && self.too_large(busy.len(), datagram.data.len()) {
            return false;
        }
        reply.clear();
        reply.extend_from_slice(busy);
        true
    }

    fn too_large(&self, reply: usize, request: usize) -> bool {
        self.config
            .max_amplification
            .is_some_and(|factor| reply > factor.saturating_mul(request))
    }

    /// Publishes the running totals to the counter slot. The kernel's drop
    /// count is read when a snapshot is taken, or as a worker stops; with
    /// the `metrics` feature, which publishes without snapshots, it is also
    /// read from `drops` (a worker's own socket) once a second.
    pub(crate) fn publish(&mut self, drops: Option<&Socket>) {
        #[cfg(feature = "metrics")]
        if let Some(socket) = drops.filter(|_| self.observer.drops_due()) {
            self.totals.kernel_drops =
                crate::sys::kernel_drops(socket).unwrap_or(self.totals.kernel_drops);
        }
        #[cfg(not(feature = "metrics"))]
        let _ = drops;
        self.stats.publish(self.slot, &self.totals);
        self.observer.published(&self.totals);
    }

    /// Publishes the count of datagrams received alone, before they are
    /// dealt with (see [`SharedStats::publish_received`]).
    pub(crate) fn publish_received(&self) {
        self.stats.publish_received(self.slot, self.totals.received);
    }

    fn recorders(&self) -> Option<&Recorders> {
        self.stats.recorders(self.slot)
    }

    pub(crate) fn record_wait(&self, waited: Duration) {
        if let Some(recorders) = self.recorders() {
            recorders.queue_wait.record(waited);
        }
        self.observer.queue_wait(waited);
    }

    /// Runs the handler on an admitted datagram, which arrived at `arrived`,
    /// in a call that starts at `started`; the caller reports the end with
    /// [`handled_at`](Processor::handled_at). Counts every outcome but a
    /// reply to send: returns `true` when `reply` holds one, and the caller
    /// reports how its send went with [`sent`](Processor::sent).
    pub(crate) fn handle_timed<H: HandlerFn>(
        &mut self,
        handler: &H,
        datagram: &Received<'_>,
        standing: Standing,
        reply: &mut Vec<u8>,
        arrived: Instant,
        started: Instant,
    ) -> bool {
        self.record_wait(started.saturating_duration_since(arrived));
        self.call_started = started;
        reply.clear();
        let peer = datagram.peer;
        let request = Request::new(
            datagram.data,
            peer,
            self.local_ip(datagram),
            self.listener(),
            self.metadata(datagram),
            standing.validated,
        );
        // A panic is caught per datagram so that one bad request cannot stop
        // the server. The reply buffer is cleared after it; whatever state
        // the handler shares between calls is the handler's to keep sound,
        // as with any `Fn + Sync` shared by threads.
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| handler(request, reply)));
        match outcome {
            Ok(Action::Reply) => {
                self.give_token(standing, peer, datagram.data.len(), reply);
                !self.capped(reply.len(), datagram.data.len(), standing)
            }
            Ok(Action::Ignore) => {
                self.totals.no_reply += 1;
                false
            }
            Err(payload) => {
                reply.clear();
                self.panicked(payload);
                false
            }
        }
    }

    /// The address `datagram` was sent to, in its sender's family.
    pub(crate) fn local_ip(&self, datagram: &Received<'_>) -> Option<IpAddr> {
        let local = datagram.arrival.local.or(self.config.bound_ip);
        same_family(local, datagram.peer)
    }

    /// The counter slot this processor publishes to.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn slot(&self) -> usize {
        self.slot
    }

    /// The address of the listener this processor counts for.
    pub(crate) fn listener(&self) -> SocketAddr {
        self.config.local_addr
    }

    /// What the network layer reported with `datagram`, where the server
    /// asked for it (empty otherwise).
    pub(crate) fn metadata(&self, datagram: &Received<'_>) -> Metadata {
        if self.config.metadata {
            Metadata::from_arrival(&datagram.arrival)
        } else {
            Metadata::default()
        }
    }

    /// Counts (and reports) a handler that panicked with `payload`.
    pub(crate) fn panicked(&mut self, payload: Box<dyn std::any::Any + Send>) {
        self.totals.handler_panics += 1;
        self.discard_panic(payload);
    }

    /// Reports a panic with `payload` in the user's code, and drops the
    /// payload safely; counting is the caller's.
    fn discard_panic(&mut self, payload: Box<dyn std::any::Any + Send>) {
        self.observer.handler_panicked(&*payload);
        // Dropping a panic payload can itself panic; that second panic must
        // not escape either.
        if let Err(again) = panic::catch_unwind(AssertUnwindSafe(|| drop(payload))) {
            std::mem::forget(again);
        }
    }

    /// Whether a reply of `reply` bytes to a request of `request` bytes is
    /// over the amplification limit (and so is counted, not sent); never
    /// for a validated source.
    pub(crate) fn capped(&mut self, reply: usize, request: usize, standing: Standing) -> bool {
        let capped = !standing.validated && self.too_large(reply, request);
        self.totals.amplification_capped += u64::from(capped);
        capped
    }

    /// Records the handler call that [`handle_timed`](Processor::handle_timed)
    /// started as ending at `now`.
    pub(crate) fn handled_at(&self, now: Instant) {
        let took = now.saturating_duration_since(self.call_started);
        self.record_handler(took);
    }

    /// Records a handler call that took `took`.
    pub(crate) fn record_handler(&self, took: Duration) {
        if let Some(recorders) = self.recorders() {
            recorders.handler.record(took);
        }
        self.observer.handler_time(took);
    }

    /// Counts how replies went: how many were sent, how many failed, and the
    /// last error.
    pub(crate) fn sent_counts(&mut self, (replied, failed): (u64, u64), error: Option<io::Error>) {
        self.totals.replied += replied;
        self.totals.send_errors += failed;
        if failed > 0 {
            self.observer.send_failed(error.as_ref());
        }
    }

    /// Counts a failed receive call; returns the pause to take before the
    /// next one, if any. The loop always goes on: errors that report ICMP
    /// messages for earlier replies are counted and ignored, and anything
    /// else is counted and followed by a short, growing pause so a
    /// persistent failure cannot spin the CPU.
    pub(crate) fn recv_error(&mut self, err: &io::Error, shared: &Shared) -> Option<Duration> {
        if crate::error::is_timeout(err) {
            return None;
        }
        self.totals.recv_errors += 1;
        self.observer.recv_failed(err);
        if is_icmp_report(err) || shared.is_stopped() {
            return None;
        }
        self.backoff = (self.backoff * 2).clamp(MIN_BACKOFF, MAX_BACKOFF);
        Some(self.backoff)
    }
}

const MIN_BACKOFF: Duration = Duration::from_millis(1);
const MAX_BACKOFF: Duration = Duration::from_millis(32);

/// The local address in the peer's family: on a dual-stack socket an IPv4
/// peer is seen as an IPv4-mapped IPv6 address, and so is the address it
/// sent to.
fn same_family(local: Option<IpAddr>, peer: SocketAddr) -> Option<IpAddr> {
    match (local, peer) {
        (Some(IpAddr::V4(ip)), SocketAddr::V6(_)) => Some(IpAddr::V6(ip.to_ipv6_mapped())),
        (local, _) => local,
    }
}

/// Whether a reply may go to `peer`: never to port 0 (no one listens there;
/// a request "from" it is forged), nor to an unspecified, multicast or
/// broadcast address, which would turn one request into many replies.
fn can_answer(peer: SocketAddr) -> bool {
    if peer.port() == 0 {
        return false;
    }
    match peer.ip().to_canonical() {
        IpAddr::V4(ip) => !(ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast()),
        IpAddr::V6(ip) => !(ip.is_unspecified() || ip.is_multicast()),
    }
}

/// Errors a UDP socket reports on receive for an ICMP message about an
/// earlier send, rather than for the receive itself.
fn is_icmp_report(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
    ) || crate::sys::is_net_reset(err)
}
