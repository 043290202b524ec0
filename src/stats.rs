//! Server counters: a lock-free slot per worker, summed when read.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of a server's counters, summed over its workers.
///
/// Every datagram the server takes from its sockets is counted in
/// `received` and, once handled, in exactly one outcome counter, so at any
/// moment when no datagram is being handled
/// `received == `[`accounted()`](Stats::accounted).
///
/// ```
/// # fn main() -> Result<(), udp_greet::Error> {
/// use udp_greet::{GreetClient, GreetServer};
///
/// let server = GreetServer::bind("127.0.0.1:0")?.spawn(udp_greet::greet)?;
/// GreetClient::connect(server.local_addr())?.send_recv(b"Tracy")?;
/// let stats = server.shutdown()?;
/// assert_eq!((stats.received, stats.replied), (1, 1));
/// assert_eq!(stats.received, stats.accounted());
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Datagrams taken from the socket, whatever became of them.
    pub received: u64,
    /// Replies handed to the kernel.
    pub replied: u64,
    /// Requests for which the handler returned [`Action::Ignore`](crate::Action::Ignore).
    pub no_reply: u64,
    /// Requests dropped unanswered because they were larger than the largest
    /// accepted datagram (the kernel reported them truncated).
    pub truncated: u64,
    /// Requests whose handler panicked; no reply was sent.
    pub handler_panics: u64,
    /// Replies the kernel refused to send (for example `EMSGSIZE`).
    pub send_errors: u64,
    /// Failed receive calls. These are not datagrams: on an unconnected
    /// socket they mostly report ICMP errors for earlier replies, and the
    /// server keeps going.
    pub recv_errors: u64,
}

impl Stats {
    /// The sum of the outcome counters: every received datagram ends in
    /// exactly one of them.
    #[must_use]
    pub fn accounted(&self) -> u64 {
        self.replied + self.no_reply + self.truncated + self.handler_panics + self.send_errors
    }

    fn to_array(self) -> [u64; FIELDS] {
        [
            self.received,
            self.replied,
            self.no_reply,
            self.truncated,
            self.handler_panics,
            self.send_errors,
            self.recv_errors,
        ]
    }

    fn from_array(a: [u64; FIELDS]) -> Self {
        let [
            received,
            replied,
            no_reply,
            truncated,
            handler_panics,
            send_errors,
            recv_errors,
        ] = a;
        Stats {
            received,
            replied,
            no_reply,
            truncated,
            handler_panics,
            send_errors,
            recv_errors,
        }
    }
}

const FIELDS: usize = 7;

/// One worker's published counters, on a cache line of their own so that
/// workers never write to the same line.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Slot([AtomicU64; FIELDS]);

/// The counters of every worker of one server.
#[derive(Debug)]
pub(crate) struct SharedStats {
    slots: Box<[Slot]>,
}

impl SharedStats {
    pub(crate) fn new(workers: usize) -> Arc<Self> {
        Arc::new(SharedStats {
            slots: (0..workers).map(|_| Slot::default()).collect(),
        })
    }

    /// The sum over all workers.
    pub(crate) fn snapshot(&self) -> Stats {
        let mut sum = [0u64; FIELDS];
        for slot in self.slots.iter() {
            for (total, counter) in sum.iter_mut().zip(&slot.0) {
                *total += counter.load(Ordering::Relaxed);
            }
        }
        Stats::from_array(sum)
    }

    /// Publishes worker `index`'s running totals. Only that worker writes its
    /// slot, so plain stores suffice (no read-modify-write).
    pub(crate) fn publish(&self, index: usize, totals: &Stats) {
        if let Some(slot) = self.slots.get(index) {
            for (counter, value) in slot.0.iter().zip(totals.to_array()) {
                counter.store(value, Ordering::Relaxed);
            }
        }
    }
}
