//! The `metrics` feature: the server's counters, in-flight gauge and
//! latency histograms reach whatever recorder the application installed.
#![cfg(feature = "metrics")]

mod util;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use metrics::{Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, SharedString, Unit};
use udp_greet::{GreetClient, GreetServer, HandlerPool, Request};
use util::{V4, assert_balanced, raw_socket_for, wait_until};

/// Counts the values a histogram was given.
#[derive(Debug, Default)]
struct Count(AtomicU64);

impl HistogramFn for Count {
    fn record(&self, _value: f64) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// A recorder that keeps every metric by name and `server` label.
#[derive(Debug, Default)]
struct Recorded {
    counters: Mutex<HashMap<(String, String), Arc<AtomicU64>>>,
    gauges: Mutex<HashMap<(String, String), Arc<AtomicU64>>>,
    histograms: Mutex<HashMap<(String, String), Arc<Count>>>,
}

fn id(key: &Key) -> (String, String) {
    let server = key
        .labels()
        .find(|l| l.key() == "server")
        .map(|l| l.value().to_owned())
        .unwrap_or_default();
    (key.name().to_owned(), server)
}

impl metrics::Recorder for Recorded {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let mut map = self.counters.lock().expect("lock");
        Counter::from_arc(map.entry(id(key)).or_default().clone())
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        let mut map = self.gauges.lock().expect("lock");
        Gauge::from_arc(map.entry(id(key)).or_default().clone())
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        let mut map = self.histograms.lock().expect("lock");
        Histogram::from_arc(map.entry(id(key)).or_default().clone())
    }
}

#[test]
fn counters_gauge_and_histograms_are_published() {
    let recorded: &'static Recorded = Box::leak(Box::default());
    metrics::set_global_recorder(recorded).expect("the only recorder");
    for (handler_threads, portable) in [(0, false), (2, false), (2, true)] {
        let server = GreetServer::builder()
            .handler_pool((handler_threads > 0).then(|| HandlerPool::threads(handler_threads)))
            .portable_io(portable)
            .bind(V4)
            .expect("bind")
            .spawn(|request: Request<'_>, reply: &mut Vec<u8>| {
                if request.data() == b"panic" {
                    panic!("a handler that panics");
                }
                udp_greet::greet(request, reply)
            })
            .expect("spawn");
        let addr = server.local_addr();
        let client = GreetClient::connect(addr).expect("connect");
        for _ in 0..20 {
            client.send_recv(b"m").expect("reply");
        }
        util::send_to(&raw_socket_for(addr), b"panic", addr).expect("send");
        wait_until("21 requests dealt with", || {
            let s = server.stats();
            s.received == 21 && s.in_flight() == 0
        });
        let stats = server.shutdown().expect("shutdown");
        assert_balanced(&stats);
        let server = addr.to_string();
        let counter = |name: &str| {
            recorded
                .counters
                .lock()
                .expect("lock")
                .get(&(name.to_owned(), server.clone()))
                .map_or(0, |c| c.load(Ordering::Relaxed))
        };
        assert_eq!(counter("udp_greet_received_total"), stats.received);
        assert_eq!(counter("udp_greet_replied_total"), stats.replied);
        assert_eq!(counter("udp_greet_handler_panics_total"), 1);
        let gauge = recorded
            .gauges
            .lock()
            .expect("lock")
            .get(&("udp_greet_in_flight".to_owned(), server.clone()))
            .map(|g| f64::from_bits(g.load(Ordering::Relaxed)));
        assert_eq!(gauge, Some(0.0), "nothing in flight once stopped");
        let histogram = |name: &str| {
            recorded
                .histograms
                .lock()
                .expect("lock")
                .get(&(name.to_owned(), server.clone()))
                .map_or(0, |h| h.0.load(Ordering::Relaxed))
        };
        assert_eq!(histogram("udp_greet_handler_seconds"), 21);
        assert_eq!(histogram("udp_greet_queue_wait_seconds"), 21);
    }
}
