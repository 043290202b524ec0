//! The async server and client (feature `tokio`).

mod client;
mod inflight;
mod request;
mod server;

pub use client::AsyncGreetClient;
pub use request::{AsyncRequest, Reply, greet_async};
pub use server::AsyncServerHandle;
