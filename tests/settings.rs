//! Every setting that does not apply to the engine, the I/O path or the
//! socket chosen is refused with `Error::InvalidConfig`, naming it, before
//! any socket is bound; none is ever accepted and then ignored. Settings
//! that belong to another engine have no method on this engine's builder
//! at all (see the `compile_fail` examples on `ServerBuilder`).

mod util;

use std::net::UdpSocket;
use std::time::Duration;

use udp_greet::{Engine, Error, GreetServer, HandlerPool, ServerBuilder};
use util::V4;

/// `bind` (binding or adopting a socket with `builder`) is refused with
/// `InvalidConfig`, naming `setting`.
fn assert_refused<E: Engine>(
    setting: &str,
    builder: ServerBuilder<E>,
    bind: impl Fn(ServerBuilder<E>, &str) -> Result<(), Error>,
) {
    match bind(builder, V4) {
        Err(Error::InvalidConfig { setting: s, .. }) => assert_eq!(s, setting),
        other => panic!("expected InvalidConfig for {setting}, got {other:?}"),
    }
}

fn blocking(b: ServerBuilder, addr: &str) -> Result<(), Error> {
    b.bind(addr).map(drop)
}

fn blocking_adopted(b: ServerBuilder, addr: &str) -> Result<(), Error> {
    let socket = UdpSocket::bind(addr).expect("bind a socket to adopt");
    b.from_std(socket).map(drop)
}

/// Batching settings on the portable path, which has no batches.
#[test]
fn batching_settings_are_refused_on_the_portable_path() {
    let portable = || GreetServer::builder().portable_io(true);
    assert_refused(
        "ServerBuilder::batch_size",
        portable().batch_size(64),
        blocking,
    );
    assert_refused("ServerBuilder::gso", portable().gso(true), blocking);
    // In either order.
    assert_refused(
        "ServerBuilder::batch_size",
        GreetServer::builder().batch_size(8).portable_io(true),
        blocking,
    );
    // Turning off what is off anyway is no contradiction.
    let server = portable().gso(false).bind(V4).expect("gso(false) is fine");
    drop(server);
}

/// The settings made before bind cannot reach a socket that is bound
/// already.
#[test]
fn pre_bind_settings_are_refused_for_an_adopted_socket() {
    for (setting, builder) in [
        (
            "ServerBuilder::reuse_address",
            GreetServer::builder().reuse_address(true),
        ),
        (
            "ServerBuilder::reuse_port",
            GreetServer::builder().reuse_port(false),
        ),
        (
            "ServerBuilder::only_v6",
            GreetServer::builder().only_v6(true),
        ),
    ] {
        assert_refused(setting, builder, blocking_adopted);
    }
    // Those that apply after bind still do.
    let server = GreetServer::builder()
        .recv_buffer_size(1 << 16)
        .from_std(UdpSocket::bind(V4).expect("bind"))
        .expect("adopted");
    assert_eq!(server.recv_buffer_size().requested, Some(1 << 16));
}

/// `SO_BUSY_POLL` takes a C `int` of microseconds: a longer duration is a
/// configuration error, not an `EINVAL` from the kernel at bind.
#[test]
fn so_busy_poll_beyond_its_range_is_refused() {
    for duration in [Duration::MAX, Duration::from_secs(3600)] {
        assert_refused(
            "ServerBuilder::so_busy_poll",
            GreetServer::builder().so_busy_poll(duration),
            blocking,
        );
    }
}

/// A handler pool's own settings.
#[test]
fn pool_settings_are_refused_out_of_range() {
    for (setting, pool) in [
        ("HandlerPool::threads", HandlerPool::threads(0)),
        ("HandlerPool::threads", HandlerPool::threads(1025)),
        (
            "HandlerPool::queue_capacity",
            HandlerPool::threads(1).queue_capacity(0),
        ),
        (
            "HandlerPool::max_queue_wait",
            HandlerPool::threads(1).max_queue_wait(Duration::ZERO),
        ),
    ] {
        assert_refused(setting, GreetServer::builder().handler_pool(pool), blocking);
    }
    // `None` is no pool: handlers run inline.
    let server = GreetServer::builder()
        .handler_pool(None)
        .bind(V4)
        .expect("inline");
    drop(server);
}

/// The async server checks the same things, and its own.
#[cfg(feature = "tokio")]
#[test]
fn the_async_server_refuses_the_same_and_its_own() {
    use udp_greet::tokio::{GreetServer, Limits, Tokio};
    fn bind(b: ServerBuilder<Tokio>, addr: &str) -> Result<(), Error> {
        b.bind(addr).map(drop)
    }
    fn adopted(b: ServerBuilder<Tokio>, addr: &str) -> Result<(), Error> {
        let socket = UdpSocket::bind(addr).expect("bind a socket to adopt");
        b.from_std(socket).map(drop)
    }
    assert_refused(
        "ServerBuilder::batch_size",
        GreetServer::builder().portable_io(true).batch_size(4),
        bind,
    );
    assert_refused(
        "ServerBuilder::gso",
        GreetServer::builder().portable_io(true).gso(true),
        bind,
    );
    assert_refused(
        "ServerBuilder::reuse_port",
        GreetServer::builder().reuse_port(true),
        adopted,
    );
    assert_refused(
        "ServerBuilder::so_busy_poll",
        GreetServer::builder().so_busy_poll(Duration::MAX),
        bind,
    );
    assert_refused(
        "Limits::max_in_flight",
        GreetServer::builder().limits(Limits::new().max_in_flight(0)),
        bind,
    );
    // One socket made elsewhere is one task: more workers would be ignored.
    assert_refused(
        "ServerBuilder::workers",
        GreetServer::builder().workers(2),
        adopted,
    );
    if !cfg!(target_os = "linux") {
        // One task per socket, and only Linux spreads a port over sockets.
        assert_refused(
            "ServerBuilder::workers",
            GreetServer::builder().workers(2),
            bind,
        );
    }
}
