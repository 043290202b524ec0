//! The `tracing` feature: rate-limited events for handler panics (with
//! their message), overload and failed sends.
#![cfg(feature = "tracing")]

mod util;

use std::sync::{Arc, Mutex};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};
use udp_greet::{GreetServer, HandlerPool, Request};
use util::{V4, assert_balanced, raw_socket_for, wait_until};

/// One event as seen: its level and its fields, as text.
#[derive(Debug, Clone)]
struct Seen {
    level: Level,
    fields: Vec<(String, String)>,
}

impl Seen {
    fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

struct Fields<'a>(&'a mut Vec<(String, String)>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.push((field.name().to_owned(), format!("{value:?}")));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push((field.name().to_owned(), value.to_owned()));
    }
}

/// A subscriber that keeps every event.
struct Keep(Arc<Mutex<Vec<Seen>>>);

impl Subscriber for Keep {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut fields = Vec::new();
        event.record(&mut Fields(&mut fields));
        if let Ok(mut seen) = self.0.lock() {
            seen.push(Seen {
                level: *event.metadata().level(),
                fields,
            });
        }
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

#[test]
fn panics_and_overload_are_reported_at_most_once_a_second() {
    let kept = Arc::new(Mutex::new(Vec::new()));
    tracing::subscriber::set_global_default(Keep(kept.clone())).expect("the only subscriber");
    // The handler's panics are expected: keep the default hook from
    // printing each, and only those.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !info.to_string().contains("boom: the handler gave up") {
            default_hook(info);
        }
    }));
    // A hundred panics, inline.
    let server = GreetServer::bind(V4)
        .expect("bind")
        .spawn(|request: Request<'_>, reply: &mut Vec<u8>| {
            if request.data() == b"boom" {
                panic!("boom: the handler gave up");
            }
            udp_greet::greet(request, reply)
        })
        .expect("spawn");
    let addr = server.local_addr();
    let client = raw_socket_for(addr);
    for _ in 0..100 {
        util::send_to(&client, b"boom", addr).expect("send");
    }
    wait_until("a hundred panics", || server.stats().handler_panics == 100);
    assert_balanced(&server.shutdown().expect("shutdown"));

    // Overload: hold the only handler thread, fill the queue of one, and
    // shed three.
    let (handler, hold) = util::greeter_holding(b"hold");
    let server = GreetServer::builder()
        .handler_pool(HandlerPool::threads(1).queue_capacity(1))
        .bind(V4)
        .expect("bind")
        .spawn(handler)
        .expect("spawn");
    let addr = server.local_addr();
    util::send_to(&client, b"hold", addr).expect("send");
    hold.started();
    for _ in 0..4 {
        util::send_to(&client, b"x", addr).expect("send");
    }
    wait_until("three shed", || server.stats().overloaded == 3);
    hold.release();
    assert_balanced(&server.shutdown().expect("shutdown"));

    let seen = kept.lock().expect("lock").clone();
    let panics: Vec<_> = seen
        .iter()
        .filter(|e| e.field("message").is_some_and(|m| m.contains("panicked")))
        .collect();
    assert!(
        !panics.is_empty() && panics.len() < 10,
        "a hundred panics in well under ten seconds make a few events: {panics:?}"
    );
    assert!(panics.iter().all(|e| e.level == Level::ERROR));
    assert!(
        panics.iter().any(|e| e.field("message").is_some()
            && e.fields
                .iter()
                .any(|(_, v)| v.contains("boom: the handler gave up"))),
        "the panic's own message is in the event: {panics:?}"
    );
    let overload: Vec<_> = seen
        .iter()
        .filter(|e| e.field("message").is_some_and(|m| m.contains("shedding")))
        .collect();
    assert!(!overload.is_empty(), "an overload event: {seen:?}");
    assert!(overload.iter().all(|e| e.level == Level::WARN));
}
