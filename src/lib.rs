//! UDP request/response servers and clients, built on [socket2].
//!
//! A [`GreetServer`] receives datagrams, hands each to a handler that writes
//! its reply into a reused buffer, and sends the reply back to the sender.
//! A [`GreetClient`] sends a request and waits for the reply, with a timeout
//! and retries. The classic handler, [`greet`], answers `name` with
//! `Hello, name!`.
//!
//! ```
//! # fn main() -> Result<(), udp_greet::Error> {
//! use udp_greet::{GreetClient, GreetServer};
//!
//! // Port 0: the system picks a free port.
//! let server = GreetServer::bind("127.0.0.1:0")?.spawn(udp_greet::greet)?;
//!
//! let client = GreetClient::connect(server.local_addr())?;
//! for name in ["Michael", "Tracy", "Sarah"] {
//!     let reply = client.send_recv(name.as_bytes())?;
//!     println!("{}", String::from_utf8_lossy(&reply));
//! }
//!
//! let stats = server.shutdown()?;
//! assert_eq!(stats.replied, 3);
//! # Ok(())
//! # }
//! ```
//!
//! # What the server promises
//!
//! - Every socket option ([`ServerBuilder`]) is set through socket2 before
//!   bind; buffer sizes the kernel granted are read back
//!   ([`GreetServer::recv_buffer_size`]).
//! - A datagram larger than the largest accepted size is never handed to the
//!   handler as if whole: it is dropped and counted
//!   ([`Stats::truncated`]).
//! - A panicking handler is caught and counted; receive errors never stop the
//!   server; zero-length datagrams are requests like any other.
//! - Every datagram ends in exactly one counter of [`Stats`]; the kernel's
//!   own drops are reported beside them.
//! - Opt-in protection for public addresses: a per-prefix [`RateLimit`]
//!   (with slip, exemptions and a dry run) and an amplification cap
//!   ([`ServerBuilder::max_amplification`]); requests from port 0 are never
//!   answered; a wildcard-bound server answers from the address each
//!   request was sent to.
//! - Source tokens ([`SourceTokens`]) tell real clients from forged ones:
//!   a client that echoes a token made for its address is held to its own
//!   limits, and under load the others are challenged rather than dropped.
//! - On Linux, batched system calls (`recvmmsg` / `sendmmsg`), segmentation
//!   offload for replies, and `SO_REUSEPORT` workers; no heap allocation per
//!   datagram.
//! - [`ServerHandle::shutdown`] returns once every worker has stopped and the
//!   socket is closed, so the port can be bound again at once; it takes
//!   about one handler call, and [`ServerHandle::shutdown_timeout`] bounds
//!   it even when a handler never returns.
//! - Handlers that wait (on a database, another service) can run on a
//!   bounded pool ([`HandlerPool`]) that sheds load at
//!   once when full and drops requests that waited too long, with counters
//!   and latency histograms ([`ServerHandle::latency`]) to watch it by.
//! - Handlers that await (feature `tokio`) run as futures on the caller's
//!   runtime, bounded in number and time (`udp_greet::tokio::Limits`),
//!   with the same batching, counters and shutdown.
//! - Opt-in latency mode ([`ServerBuilder::busy_poll`],
//!   [`ClientBuilder::busy_poll`]) trades a core for the thread wake-ups of
//!   each round trip.
//! - The library never prints.
//!
//! # Features
//!
//! All are off by default.
//!
//! - `tokio`: the module `udp_greet::tokio`, with an async server
//!   (`udp_greet::tokio::GreetServer`, whose handlers take an owned
//!   `Request` and return a future of a `Reply`) and an async client
//!   (`udp_greet::tokio::GreetClient`, many calls at once on one client)
//!   for the caller's [tokio](https://docs.rs/tokio) runtime, with the
//!   same settings, promises and counters as the blocking ones, under the
//!   same names.
//! - `metrics`: publishes every counter of [`Stats`], the requests in
//!   flight and both latency histograms through the
//!   [`metrics`](https://docs.rs/metrics) facade, labelled with the server's
//!   address (`server`) and the listener's (`listener`); the application
//!   installs the exporter.
//! - `systemd` (Unix): the module `udp_greet::systemd`, for the sockets a
//!   service manager passes (socket activation, `LISTEN_FDS`, by name),
//!   and `ServerBuilder::notify_service_manager`: `READY=1`, `STOPPING=1`
//!   and watchdog pings that stop when a receive worker is stuck.
//! - `tracing`: emits [`tracing`](https://docs.rs/tracing) events, at most
//!   one a second of each kind: overload episodes, failed receives and
//!   sends, and handler panics with their message.
//! - `xdp` (Linux): the module `udp_greet::xdp` and
//!   `ServerBuilder::xdp`, an AF_XDP engine that serves the same handler
//!   from an interface's receive queues, past the kernel's UDP stack (its
//!   XDP program is built at run time and loaded with `bpf()`; needs root).
//!
//! # What UDP does not promise
//!
//! Datagrams may be lost, duplicated or reordered. The client resends on
//! silence and discards stale datagrams before each request; see
//! [`GreetClient`].
//!
//! [socket2]: https://docs.rs/socket2
#![deny(missing_docs, missing_debug_implementations, rust_2018_idioms)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(unsafe_code)]
#![doc(test(attr(deny(warnings))))]

mod blocking;
mod busy_poll;
mod client;
mod config;
mod control;
mod engine;
mod error;
mod handoff;
mod histogram;
#[cfg(feature = "tokio")]
mod limits;
mod observe;
mod policy;
mod pool;
mod ratelimit;
mod request;
mod server;
mod socket;
mod stats;
mod sys;
#[cfg(all(feature = "systemd", unix))]
#[cfg_attr(docsrs, doc(cfg(all(feature = "systemd", unix))))]
pub mod systemd;
mod tokens;
#[cfg(feature = "tokio")]
#[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
pub mod tokio;
#[cfg(all(feature = "xdp", target_os = "linux"))]
#[cfg_attr(docsrs, doc(cfg(all(feature = "xdp", target_os = "linux"))))]
pub mod xdp;

pub use client::{ClientBuilder, DEFAULT_CLIENT_MAX_IN_FLIGHT, GreetClient};
pub use config::{MAX_UDP_PAYLOAD_V4, MAX_UDP_PAYLOAD_V6, ServerBuilder};
pub use control::{ServerControl, ServerHandle};
pub use engine::{Blocking, Engine};
pub use error::Error;
pub use handoff::Handoff;
pub use histogram::{Histogram, Latency};
pub use pool::HandlerPool;
pub use ratelimit::RateLimit;
pub use request::{Action, Ecn, Metadata, Request, greet, greet_into, is_greeting};
pub use server::GreetServer;
pub use socket::BufferSize;
pub use stats::Stats;
pub use tokens::{SourceTokens, TOKEN_LEN, TokenFormat};

/// The README's examples, run as doc tests. Some need the `tokio` feature,
/// so they run with it (CI's `cargo test --all-features`); the first is
/// also the crate's own example above, which runs in every configuration.
#[cfg(all(doctest, feature = "tokio"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
