//! One server worker: what happens to each datagram, and the portable
//! receive/handle/reply loop.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use socket2::Socket;

use crate::handle::Control;
use crate::handler::{Action, Request};
use crate::ratelimit::Limiter;
use crate::stats::{SharedStats, Stats};
use crate::sys::{self, Received};

/// The bound every handler meets; see [`GreetServer::serve`](crate::GreetServer::serve).
pub(crate) trait HandlerFn:
    Fn(Request<'_>, &mut Vec<u8>) -> Action + Send + Sync + 'static
{
}
impl<F: Fn(Request<'_>, &mut Vec<u8>) -> Action + Send + Sync + 'static> HandlerFn for F {}

/// Everything one worker thread needs.
pub(crate) struct Worker<H> {
    pub(crate) index: usize,
    pub(crate) socket: Arc<Socket>,
    pub(crate) handler: Arc<H>,
    pub(crate) stats: Arc<SharedStats>,
    pub(crate) control: Arc<Control>,
    pub(crate) max_datagram: usize,
    /// Datagrams per batch on the batched path; `None` for the portable loop.
    pub(crate) batch: Option<usize>,
    /// Coalesce replies to one peer with segmentation offload (batched path).
    pub(crate) gso: bool,
    pub(crate) policy: Policy,
    /// The socket reports arrival addresses, and replies go out from them.
    pub(crate) pktinfo: bool,
    /// The address the socket is bound to, unless it is a wildcard.
    pub(crate) bound_ip: Option<IpAddr>,
    /// This worker's socket is its own (or it is the first of those sharing
    /// one): it reports the socket's kernel drops as it stops.
    pub(crate) reports_drops: bool,
}

impl<H: HandlerFn> Worker<H> {
    /// Runs the receive, handle, reply loop until the server shuts down:
    /// batched where the platform allows and the builder did not ask for the
    /// portable loop.
    pub(crate) fn run(self) {
        let mut p = Processor::new(self.handler.clone(), self.policy.clone(), self.bound_ip);
        match self.batch.and_then(|size| {
            sys::Batch::new(
                &self.socket,
                size,
                self.max_datagram,
                self.gso,
                self.pktinfo,
            )
        }) {
            Some(batch) => run_batched(&self, &mut p, batch),
            None => run_portable(&self, &mut p),
        }
        if self.reports_drops {
            p.totals.kernel_drops = sys::kernel_drops(&self.socket).unwrap_or(0);
        }
        self.stats.publish(self.index, &p.totals);
    }
}

/// Decides the fate of each datagram and keeps the worker's running totals.
pub(crate) struct Processor<H> {
    handler: Arc<H>,
    policy: Policy,
    pub(crate) totals: Stats,
    backoff: Duration,
    /// The rate limiter's clock, sampled once per batch.
    now: u64,
    /// The address the socket is bound to, unless it is a wildcard: the
    /// local address of every request where the datagram does not say.
    bound_ip: Option<IpAddr>,
}

/// What the server refuses to do, from the builder: shared by all workers.
#[derive(Debug, Clone, Default)]
pub(crate) struct Policy {
    pub(crate) limiter: Option<Arc<Limiter>>,
    pub(crate) max_amplification: Option<usize>,
}

impl<H: HandlerFn> Processor<H> {
    pub(crate) fn new(handler: Arc<H>, policy: Policy, bound_ip: Option<IpAddr>) -> Self {
        Processor {
            handler,
            policy,
            totals: Stats::default(),
            backoff: Duration::ZERO,
            now: 0,
            bound_ip,
        }
    }

    /// Starts a batch: samples the clock once for the rate limit.
    pub(crate) fn begin_batch(&mut self) {
        if let Some(limiter) = &self.policy.limiter {
            self.now = limiter.now();
        }
    }

    /// Counts one received datagram from `peer` and decides its fate:
    /// dropped (truncated, a source that cannot be answered, over the rate
    /// limit), or handed to the handler, whose reply may still be held back
    /// by the amplification limit.
    ///
    /// Returns `true` when `reply` holds a reply to send; the caller then
    /// reports how the send went with [`Processor::sent`]. Every other
    /// outcome is counted here.
    pub(crate) fn process(
        &mut self,
        datagram: &Received<'_>,
        peer: SocketAddr,
        reply: &mut Vec<u8>,
    ) -> bool {
        self.totals.received += 1;
        self.backoff = Duration::ZERO;
        if datagram.truncated {
            self.totals.truncated += 1;
            return false;
        }
        if !can_answer(peer) {
            self.totals.bad_source += 1;
            return false;
        }
        if let Some(limiter) = &self.policy.limiter {
            let verdict = limiter.check(peer.ip(), self.now);
            self.totals.rate_limit_evictions += u64::from(verdict.evicted);
            if !verdict.allowed {
                self.totals.rate_limited += 1;
                return false;
            }
        }
        reply.clear();
        let handler = &*self.handler;
        let request = Request::new(datagram.data, peer, datagram.local.or(self.bound_ip));
        // A panic is caught per datagram so that one bad request cannot stop
        // the server. The reply buffer is cleared after it; whatever state
        // the handler shares between calls is the handler's to keep sound,
        // as with any `Fn + Sync` shared by threads.
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| handler(request, reply)));
        match outcome {
            Ok(Action::Reply) => {
                let limit = self.policy.max_amplification;
                if limit
                    .is_some_and(|factor| reply.len() > factor.saturating_mul(datagram.data.len()))
                {
                    self.totals.amplification_capped += 1;
                    return false;
                }
                true
            }
            Ok(Action::Ignore) => {
                self.totals.no_reply += 1;
                false
            }
            Err(payload) => {
                self.totals.handler_panics += 1;
                reply.clear();
                // Dropping a panic payload can itself panic; that second
                // panic must not escape either.
                if let Err(again) = panic::catch_unwind(AssertUnwindSafe(|| drop(payload))) {
                    std::mem::forget(again);
                }
                false
            }
        }
    }

    /// Counts the outcome of sending replies.
    pub(crate) fn sent(&mut self, replied: u64, failed: u64) {
        self.totals.replied += replied;
        self.totals.send_errors += failed;
    }

    /// Handles a failed receive call. The loop always goes on: errors that
    /// report ICMP messages for earlier replies are counted and ignored, and
    /// anything else is counted and followed by a short, growing pause so a
    /// persistent failure cannot spin the CPU.
    pub(crate) fn recv_failed(&mut self, err: &io::Error, control: &Control) {
        if err.kind() == io::ErrorKind::Interrupted || crate::error::is_timeout(err) {
            return;
        }
        self.totals.recv_errors += 1;
        if is_icmp_report(err) || control.is_stopped() {
            return;
        }
        self.backoff = (self.backoff * 2).clamp(MIN_BACKOFF, MAX_BACKOFF);
        thread::sleep(self.backoff);
    }
}

const MIN_BACKOFF: Duration = Duration::from_millis(1);
const MAX_BACKOFF: Duration = Duration::from_millis(32);

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
    )
}

/// Retries `f` while it fails with `EINTR`; reports whether it succeeded.
fn send_ok(mut f: impl FnMut() -> io::Result<usize>) -> bool {
    loop {
        match f() {
            Ok(_) => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return false,
        }
    }
}

/// The portable loop: one `recvmsg` and one `sendto` per datagram, through
/// socket2. Used on every platform, and on Linux when the builder asks. On
/// a wildcard-bound Linux socket it reads each datagram's arrival address
/// and replies from it (`sys::Single`).
fn run_portable<H: HandlerFn>(w: &Worker<H>, p: &mut Processor<H>) {
    let mut buf = vec![0u8; w.max_datagram];
    let mut reply = Vec::with_capacity(sys::REPLY_RESERVE);
    let mut single = if w.pktinfo { sys::Single::new() } else { None };
    while !w.control.is_stopped() {
        match &mut single {
            Some(single) => match single.recv(&w.socket, &mut buf) {
                // A shutdown wake-up carries no sender: not a datagram.
                Ok(Received { peer: None, .. }) => {}
                Ok(
                    datagram @ Received {
                        peer: Some(peer), ..
                    },
                ) => {
                    p.begin_batch();
                    if p.process(&datagram, peer, &mut reply) {
                        let ok = send_ok(|| single.send(&w.socket, &reply));
                        p.sent(u64::from(ok), u64::from(!ok));
                    }
                }
                Err(err) => p.recv_failed(&err, &w.control),
            },
            None => match w
                .socket
                .recv_from_vectored(&mut [sys::recv_slice(&mut buf)])
            {
                Ok((len, flags, addr)) => {
                    // A shutdown wake-up carries no sender: not a datagram.
                    if let Some(peer) = addr.as_socket() {
                        let datagram = Received {
                            data: buf.get(..len).unwrap_or(&buf),
                            truncated: flags.is_truncated(),
                            peer: Some(peer),
                            local: None,
                        };
                        p.begin_batch();
                        if p.process(&datagram, peer, &mut reply) {
                            let ok = send_ok(|| w.socket.send_to(&reply, &addr));
                            p.sent(u64::from(ok), u64::from(!ok));
                        }
                    }
                }
                Err(err) => p.recv_failed(&err, &w.control),
            },
        }
        w.stats.publish(w.index, &p.totals);
    }
}

/// The batched loop: one `recvmmsg` for up to a batch of datagrams, the
/// handler on each, one `sendmmsg` for all the replies, and the counters
/// published once per batch.
fn run_batched<H: HandlerFn>(w: &Worker<H>, p: &mut Processor<H>, mut batch: sys::Batch) {
    while !w.control.is_stopped() {
        match batch.recv(&w.socket) {
            Ok(count) => {
                p.begin_batch();
                for i in 0..count {
                    let (datagram, reply) = batch.slot(i);
                    // A shutdown wake-up carries no sender: not a datagram.
                    let Some(peer) = datagram.peer else {
                        continue;
                    };
                    if p.process(&datagram, peer, reply) {
                        batch.queue_reply(i);
                    }
                }
                let (replied, failed) = batch.send(&w.socket);
                p.sent(replied, failed);
            }
            Err(err) => p.recv_failed(&err, &w.control),
        }
        w.stats.publish(w.index, &p.totals);
    }
}
