//! Every public type of udp-greet is `Send + Sync` (and `Debug`): checked
//! when this file compiles, so a type that loses either fails the build of
//! the tests rather than a user's. One line for each public type of
//! `src/lib.rs`; those of `udp_greet::tokio` with the `tokio` feature.

/// Compiles only for a `T` that is `Send + Sync + Debug`.
fn send_sync<T: Send + Sync + std::fmt::Debug>() {}

#[test]
fn every_public_type_is_send_and_sync() {
    // The blocking server, its settings and its handles.
    send_sync::<udp_greet::GreetServer>();
    send_sync::<udp_greet::ServerBuilder>();
    send_sync::<udp_greet::HandlerPool>();
    send_sync::<udp_greet::ServerHandle>();
    send_sync::<udp_greet::ServerControl>();
    send_sync::<udp_greet::BufferSize>();
    send_sync::<udp_greet::RateLimit>();
    send_sync::<udp_greet::Blocking>();
    // What a handler gets and gives.
    send_sync::<udp_greet::Request<'static>>();
    send_sync::<udp_greet::Action>();
    send_sync::<udp_greet::Metadata>();
    send_sync::<udp_greet::Ecn>();
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
    use udp_greet::tokio;
    send_sync::<tokio::GreetServer>();
    send_sync::<udp_greet::ServerBuilder<tokio::Tokio>>();
    send_sync::<tokio::Limits>();
    send_sync::<tokio::ServerHandle>();
    send_sync::<tokio::GreetClient>();
    send_sync::<tokio::Request>();
    send_sync::<tokio::Reply>();
    send_sync::<tokio::Tokio>();
}

/// The async greet handler, and the future it returns, can go to another
/// thread: a multi-thread runtime can run it.
#[cfg(feature = "tokio")]
#[test]
fn the_async_greet_handler_and_its_future_are_send() {
    fn sendable<H, F>(_: H)
    where
        H: Fn(udp_greet::tokio::Request) -> F + Send + Sync,
        F: std::future::Future + Send,
    {
    }
    sendable(udp_greet::tokio::greet);
}

/// Compiles only for a `T` that is unwind-safe by reference and by value.
fn unwind_safe<T: std::panic::UnwindSafe + std::panic::RefUnwindSafe>() {}

#[test]
fn the_builders_are_unwind_safe() {
    // As in 0.1, hooks (`before_bind`) or not: a builder can be used inside
    // `catch_unwind`.
    unwind_safe::<udp_greet::ServerBuilder>();
    #[cfg(feature = "tokio")]
    unwind_safe::<udp_greet::ServerBuilder<udp_greet::tokio::Tokio>>();
}
