//! Hooks for the ecosystem, each behind its feature: `metrics` (counters,
//! a gauge and histograms through the `metrics` facade) and `tracing`
//! (rate-limited events for overload, send and receive errors, and handler
//! panics). Without the features every hook is empty and costs nothing.

use std::any::Any;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;
#[cfg(feature = "tracing")]
use std::time::Instant;

use crate::stats::Stats;

/// One server thread's hooks.
#[derive(Debug)]
pub(crate) struct Observer {
    #[cfg(feature = "metrics")]
    metrics: metrics_hooks::Handles,
    #[cfg(feature = "tracing")]
    events: tracing_hooks::Events,
    #[cfg(not(any(feature = "metrics", feature = "tracing")))]
    _addr: (),
}

impl Observer {
    /// Hooks for a thread of the server on `server` (its first address),
    /// counting for its listener on `listener`.
    #[allow(unused_variables)]
    pub(crate) fn new(server: SocketAddr, listener: SocketAddr) -> Observer {
        Observer {
            #[cfg(feature = "metrics")]
            metrics: metrics_hooks::Handles::new(server, listener),
            #[cfg(feature = "tracing")]
            events: tracing_hooks::Events::new(server, listener),
            #[cfg(not(any(feature = "metrics", feature = "tracing")))]
            _addr: (),
        }
    }

    /// The thread published `totals`.
    #[inline]
    #[allow(unused_variables)]
    pub(crate) fn published(&mut self, totals: &Stats) {
        #[cfg(feature = "metrics")]
        self.metrics.published(totals);
        #[cfg(feature = "tracing")]
        self.events.published(totals);
    }

    /// Whether a second has passed since this was last true: time to read
    /// the kernel's drop count for the metrics.
    #[cfg(feature = "metrics")]
    pub(crate) fn drops_due(&mut self) -> bool {
        self.metrics.drops_due()
    }

    /// A handler call took `took`.
    #[inline]
    #[allow(unused_variables)]
    pub(crate) fn handler_time(&self, took: Duration) {
        #[cfg(feature = "metrics")]
        self.metrics.handler.record(took.as_secs_f64());
    }

    /// A request waited `waited` for a handler.
    #[inline]
    #[allow(unused_variables)]
    pub(crate) fn queue_wait(&self, waited: Duration) {
        #[cfg(feature = "metrics")]
        self.metrics.queue_wait.record(waited.as_secs_f64());
    }

    /// A handler panicked with `payload`.
    #[inline]
    #[allow(unused_variables)]
    pub(crate) fn handler_panicked(&mut self, payload: &(dyn Any + Send)) {
        #[cfg(feature = "tracing")]
        self.events.handler_panicked(payload);
    }

    /// A receive call failed with `err` (counted in `recv_errors`).
    #[inline]
    #[allow(unused_variables)]
    pub(crate) fn recv_failed(&mut self, err: &io::Error) {
        #[cfg(feature = "tracing")]
        self.events.recv_failed(err);
    }

    /// A reply could not be sent: `err` where it is known.
    #[inline]
    #[allow(unused_variables)]
    pub(crate) fn send_failed(&mut self, err: Option<&io::Error>) {
        #[cfg(feature = "tracing")]
        self.events.send_failed(err);
    }
}

/// The text of a panic payload, where it has one.
#[cfg(feature = "tracing")]
fn panic_message(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(a panic payload that is not a string)")
}

/// At most one event per second of a kind, with the count of those held
/// back since the last.
#[cfg(feature = "tracing")]
#[derive(Debug, Default)]
struct Every {
    last: Option<Instant>,
    held_back: u64,
}

#[cfg(feature = "tracing")]
impl Every {
    const INTERVAL: Duration = Duration::from_secs(1);

    /// Whether an event may go out now; if so, how many were held back.
    fn due(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < Self::INTERVAL)
        {
            self.held_back += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.held_back))
    }
}

#[cfg(feature = "tracing")]
mod tracing_hooks {
    use super::{Any, Every, SocketAddr, Stats, io, panic_message};

    /// Events of one thread, each kind at most once a second.
    #[derive(Debug)]
    pub(super) struct Events {
        /// The server's first address, which names it.
        addr: SocketAddr,
        /// The listener the thread counts for.
        listener: SocketAddr,
        overloaded: u64,
        overload: Every,
        recv: Every,
        send: Every,
        panics: Every,
    }

    impl Events {
        pub(super) fn new(addr: SocketAddr, listener: SocketAddr) -> Events {
            Events {
                addr,
                listener,
                overloaded: 0,
                overload: Every::default(),
                recv: Every::default(),
                send: Every::default(),
                panics: Every::default(),
            }
        }

        pub(super) fn published(&mut self, totals: &Stats) {
            if totals.overloaded > self.overloaded {
                let shed = totals.overloaded - self.overloaded;
                self.overloaded = totals.overloaded;
                if self.overload.due().is_some() {
                    tracing::warn!(
                        server = %self.addr,
                        listener = %self.listener,
                        shed,
                        shed_in_all = totals.overloaded,
                        "udp-greet: the handler pool's queue is full; shedding requests"
                    );
                }
            }
        }

        pub(super) fn handler_panicked(&mut self, payload: &(dyn Any + Send)) {
            if let Some(held_back) = self.panics.due() {
                tracing::error!(
                    server = %self.addr,
                        listener = %self.listener,
                    message = panic_message(payload),
                    held_back,
                    "udp-greet: a handler panicked; the request got no reply"
                );
            }
        }

        pub(super) fn recv_failed(&mut self, err: &io::Error) {
            if let Some(held_back) = self.recv.due() {
                tracing::warn!(
                    server = %self.addr,
                        listener = %self.listener,
                    error = %err,
                    held_back,
                    "udp-greet: a receive call failed; the server goes on"
                );
            }
        }

        pub(super) fn send_failed(&mut self, err: Option<&io::Error>) {
            if let Some(held_back) = self.send.due() {
                match err {
                    Some(err) => tracing::warn!(
                        server = %self.addr,
                        listener = %self.listener,
                        error = %err,
                        held_back,
                        "udp-greet: a reply could not be sent"
                    ),
                    None => tracing::warn!(
                        server = %self.addr,
                        listener = %self.listener,
                        held_back,
                        "udp-greet: a reply could not be sent"
                    ),
                }
            }
        }
    }
}

#[cfg(feature = "metrics")]
mod metrics_hooks {
    use super::{SocketAddr, Stats};

    /// Every counter of `Stats` whose name the facade sees, as
    /// `udp_greet_<field>_total`.
    fn counter_name(field: &str) -> String {
        format!("udp_greet_{field}_total")
    }

    /// One thread's handles, registered once; totals are turned into
    /// increments at each publish.
    #[derive(Debug)]
    pub(super) struct Handles {
        /// When the kernel's drop count was last read.
        drops_read: Option<std::time::Instant>,
        counters: Vec<metrics::Counter>,
        in_flight: metrics::Gauge,
        pub(super) handler: metrics::Histogram,
        pub(super) queue_wait: metrics::Histogram,
        /// The totals as last published.
        last: [u64; Stats::NAMES.len()],
    }

    impl Handles {
        pub(super) fn new(server: SocketAddr, listener: SocketAddr) -> Handles {
            let labels = [
                ("server", server.to_string()),
                ("listener", listener.to_string()),
            ];
            Handles {
                drops_read: None,
                counters: Stats::NAMES
                    .iter()
                    .map(|field| metrics::counter!(counter_name(field), &labels))
                    .collect(),
                in_flight: metrics::gauge!("udp_greet_in_flight", &labels),
                handler: metrics::histogram!("udp_greet_handler_seconds", &labels),
                queue_wait: metrics::histogram!("udp_greet_queue_wait_seconds", &labels),
                last: [0; Stats::NAMES.len()],
            }
        }

        pub(super) fn drops_due(&mut self) -> bool {
            let now = std::time::Instant::now();
            let due = self.drops_read.is_none_or(|at| {
                now.saturating_duration_since(at) >= std::time::Duration::from_secs(1)
            });
            if due {
                self.drops_read = Some(now);
            }
            due
        }

        pub(super) fn published(&mut self, totals: &Stats) {
            let values = totals.to_array();
            let mut received = 0i64;
            let mut accounted = 0i64;
            for (i, (counter, (value, last))) in self
                .counters
                .iter()
                .zip(values.iter().zip(self.last.iter_mut()))
                .enumerate()
            {
                let delta = value.saturating_sub(*last);
                if delta > 0 {
                    counter.increment(delta);
                    let delta = i64::try_from(delta).unwrap_or(i64::MAX);
                    match Stats::NAMES[i] {
                        "received" => received += delta,
                        name if Stats::OUTCOMES.contains(&name) => accounted += delta,
                        _ => {}
                    }
                    *last = *value;
                }
            }
            // Summed over the server's threads, the gauge is
            // `received - accounted()`: the requests in flight.
            let change = received - accounted;
            if change > 0 {
                self.in_flight.increment(change as f64);
            } else if change < 0 {
                self.in_flight.decrement((-change) as f64);
            }
        }
    }
}
