//! Every public type of udp-greet is `Send + Sync` (and `Debug`): checked
//! when this file compiles, so a type that loses either fails the build of
//! the tests rather than a user's. One line for each `pub use` of
//! `src/lib.rs`; the async types with the `tokio` feature.

/// Compiles only for a `T` that is `Send + Sync + Debug`.
fn send_sync<T: Send + Sync + std::fmt::Debug>() {}

#[test]
fn every_public_type_is_send_and_sync() {
    // The blocking server and its handles.
    send_sync::<udp_greet::GreetServer>();
    send_sync::<udp_greet::ServerBuilder>();
    send_sync::<udp_greet::ServerHandle>();
    send_sync::<udp_greet::ShutdownHandle>();
    send_sync::<udp_greet::BufferSize>();
    send_sync::<udp_greet::RateLimit>();
    // What a handler gets and gives.
    send_sync::<udp_greet::Request<'static>>();
    send_sync::<udp_greet::Action>();
    // The blocking client.
    send_sync::<udp_greet::GreetClient>();
    send_sync::<udp_greet::ClientBuilder>();
    // Counters, latencies, errors.
    send_sync::<udp_greet::Stats>();
    send_sync::<udp_greet::Histogram>();
    send_sync::<udp_greet::Latency>();
    send_sync::<udp_greet::Error>();
}

#[cfg(feature = "tokio")]
#[test]
fn every_async_type_is_send_and_sync() {
    send_sync::<udp_greet::AsyncGreetClient>();
    send_sync::<udp_greet::AsyncRequest>();
    send_sync::<udp_greet::AsyncServerHandle>();
    send_sync::<udp_greet::Reply>();
}

/// The async greet handler, and the future it returns, can go to another
/// thread: a multi-thread runtime can run it.
#[cfg(feature = "tokio")]
#[test]
fn the_async_greet_handler_and_its_future_are_send() {
    fn sendable<H, F>(_: H)
    where
        H: Fn(udp_greet::AsyncRequest) -> F + Send + Sync,
        F: std::future::Future + Send,
    {
    }
    sendable(udp_greet::greet_async);
}
