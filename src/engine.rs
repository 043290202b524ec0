//! Which engine a builder makes: the blocking one (threads), or with the
//! feature `tokio` the async one. A setting that belongs to one engine is a
//! method of that engine's builder only, so it cannot be set for another.

use std::fmt;

mod sealed {
    /// Only this crate's engines.
    pub trait Sealed {}
}

/// The engine a [`ServerBuilder`](crate::ServerBuilder) or
/// [`ClientBuilder`](crate::ClientBuilder) makes: [`Blocking`], or
/// `udp_greet::tokio::Tokio` (feature `tokio`). Sealed: implemented by this
/// crate's engines only.
pub trait Engine:
    sealed::Sealed + fmt::Debug + Clone + Copy + Default + Send + Sync + 'static
{
    /// The engine's name, as errors print it.
    const NAME: &'static str;
}

/// The blocking engine: servers on threads of their own, clients that
/// block the calling thread. The default of every builder.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Blocking;

impl sealed::Sealed for Blocking {}
impl Engine for Blocking {
    const NAME: &'static str = "blocking";
}

/// The async engine (feature `tokio`): servers on tasks of the caller's
/// tokio runtime, clients whose calls are futures.
#[cfg(feature = "tokio")]
#[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Tokio;

#[cfg(feature = "tokio")]
impl sealed::Sealed for Tokio {}
#[cfg(feature = "tokio")]
impl Engine for Tokio {
    const NAME: &'static str = "tokio";
}
