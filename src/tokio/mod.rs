//! The async server and client, for the caller's [tokio](https://docs.rs/tokio)
//! runtime (feature `tokio`): the same settings, promises and counters as
//! the blocking ones, under the same names, as `reqwest::blocking` mirrors
//! `reqwest`.
//!
//! - [`GreetClient`]: many calls at once on one client.
//! - [`ServerHandle`]: a server running on tokio tasks, whose handlers take
//!   an owned [`Request`] and return a future of an optional [`Reply`];
//!   [`greet`] is the greet handler.

mod client;
mod inflight;
mod mux;
mod request;
mod server;

pub use crate::engine::Tokio;
pub use crate::limits::Limits;
pub use client::GreetClient;
pub use request::{Reply, Request, greet};
pub use server::GreetServer;
pub use server::ServerHandle;
