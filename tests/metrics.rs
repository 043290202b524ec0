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

/// A metric's name and its `server` and `listener` labels.
type Id = (String, String, String);

/// A recorder that keeps every metric by name and labels.
#[derive(Debug, Default)]
struct Recorded {
    counters: Mutex<HashMap<Id, Arc<AtomicU64>>>,
    gauges: Mutex<HashMap<Id, Arc<AtomicU64>>>,
    histograms: Mutex<HashMap<Id, Arc<Count>>>,
}

fn id(key: &Key) -> Id {
    let label = |name: &str| {
        key.labels()
            .find(|l| l.key() == name)
            .map(|l| l.value().to_owned())
            .unwrap_or_default()
    };
    (key.name().to_owned(), label("server"), label("listener"))
}

impl Recorded {
    /// Counter `name` of `server`, summed over its listeners (or of the
    /// one listener `listener`).
    fn counter(&self, name: &str, server: &str, listener: Option<&str>) -> u64 {
        self.counters
            .lock()
            .expect("lock")
            .iter()
            .filter(|((n, s, l), _)| {
                n == name && s == server && listener.is_none_or(|listener| l == listener)
            })
            .map(|(_, c)| c.load(Ordering::Relaxed))
            .sum()
    }
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
        let counter = |name: &str| recorded.counter(name, &server, Some(&server));
        assert_eq!(counter("udp_greet_received_total"), stats.received);
        assert_eq!(counter("udp_greet_replied_total"), stats.replied);
        assert_eq!(counter("udp_greet_handler_panics_total"), 1);
        let gauge = recorded
            .gauges
            .lock()
            .expect("lock")
            .get(&(
                "udp_greet_in_flight".to_owned(),
                server.clone(),
                server.clone(),
            ))
            .map(|g| f64::from_bits(g.load(Ordering::Relaxed)));
        assert_eq!(gauge, Some(0.0), "nothing in flight once stopped");
        let histogram = |name: &str| {
            recorded
                .histograms
                .lock()
                .expect("lock")
                .get(&(name.to_owned(), server.clone(), server.clone()))
                .map_or(0, |h| h.0.load(Ordering::Relaxed))
        };
        assert_eq!(histogram("udp_greet_handler_seconds"), 21);
        assert_eq!(histogram("udp_greet_queue_wait_seconds"), 21);
    }

    // A server on two addresses: `server` names it by its first, and
    // `listener` tells the two apart.
    let server = GreetServer::builder()
        .handler_pool(HandlerPool::threads(2))
        .bind_all([V4, V4])
        .expect("bind_all")
        .spawn(udp_greet::greet)
        .expect("spawn");
    let addrs = server.local_addrs();
    for (addr, calls) in addrs.iter().zip([3, 5]) {
        let client = GreetClient::connect(*addr).expect("connect");
        for _ in 0..calls {
            client.send_recv(b"m").expect("reply");
        }
    }
    let stats = server.shutdown().expect("shutdown");
    assert_eq!(stats.replied, 8);
    let name = addrs[0].to_string();
    for (addr, calls) in addrs.iter().zip([3, 5]) {
        let listener = addr.to_string();
        assert_eq!(
            recorded.counter("udp_greet_replied_total", &name, Some(&listener)),
            calls,
            "{listener}"
        );
    }
    assert_eq!(recorded.counter("udp_greet_replied_total", &name, None), 8);
}
