//! What an async handler gets and gives back: the request, owned, and the
//! reply, both in buffers the server reuses.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use crate::request::Metadata;
use crate::sys::{MAX_KEPT_REPLY, REPLY_RESERVE};

/// Byte buffers shared by one server's requests and replies: taken for a
/// request, given back when the request or reply that holds it is dropped,
/// wherever that happens.
#[derive(Debug)]
pub(crate) struct Buffers {
    free: Mutex<Vec<Vec<u8>>>,
    /// The most buffers kept; more are freed as they come back.
    keep: usize,
}

impl Buffers {
    pub(crate) fn new(keep: usize) -> Arc<Buffers> {
        Arc::new(Buffers {
            free: Mutex::new(Vec::new()),
            keep,
        })
    }

    /// An empty buffer: a reused one, or a new one with [`REPLY_RESERVE`]
    /// bytes reserved.
    pub(crate) fn take(self: &Arc<Self>) -> Pooled {
        let reused = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop();
        Pooled {
            bytes: reused.unwrap_or_else(|| Vec::with_capacity(REPLY_RESERVE)),
            home: Some(self.clone()),
        }
    }

    fn give_back(&self, mut bytes: Vec<u8>) {
        // A buffer that grew past what UDP carries is not kept (see
        // `sys::trim_reply`).
        if bytes.capacity() > MAX_KEPT_REPLY {
            return;
        }
        bytes.clear();
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < self.keep {
            free.push(bytes);
        }
    }
}

/// A byte buffer that goes back to its [`Buffers`] when dropped (or is
/// simply freed, if it has none).
pub(crate) struct Pooled {
    pub(crate) bytes: Vec<u8>,
    home: Option<Arc<Buffers>>,
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(home) = self.home.take() {
            home.give_back(std::mem::take(&mut self.bytes));
        }
    }
}

/// One datagram, owned, handed to an async handler
/// ([`GreetServer::serve`](super::GreetServer::serve)).
///
/// Its bytes live in a buffer the server reuses: dropping the request (or
/// the [`Reply`] made from it with [`reply_with`](Request::reply_with))
/// gives the buffer back, on whatever task or thread that happens.
#[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
pub struct Request {
    data: Pooled,
    peer: SocketAddr,
    local: Option<IpAddr>,
    listener: SocketAddr,
    metadata: Metadata,
    validated: bool,
    buffers: Arc<Buffers>,
}

impl Request {
    pub(crate) fn new(
        data: Pooled,
        peer: SocketAddr,
        local: Option<IpAddr>,
        listener: SocketAddr,
        metadata: Metadata,
        validated: bool,
        buffers: Arc<Buffers>,
    ) -> Self {
        Request {
            data,
            peer,
            local,
            listener,
            metadata,
            validated,
            buffers,
        }
    }

    /// Whether the request carried a valid [source token](crate::SourceTokens)
    /// for its address; see the blocking
    /// [`Request::validated`](crate::Request::validated).
    #[must_use]
    pub fn validated(&self) -> bool {
        self.validated
    }

    /// The datagram's payload, complete (truncated datagrams never reach a
    /// handler); possibly empty.
    #[must_use]
    pub fn data(&self) -> &[u8] {
        &self.data.bytes
    }

    /// The address the datagram came from, which the reply goes back to.
    /// As for [`Request::peer`](crate::Request::peer), it is not
    /// authenticated.
    #[must_use]
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The address the datagram was sent to, as
    /// [`Request::local_ip`](crate::Request::local_ip) gives it.
    #[must_use]
    pub fn local_ip(&self) -> Option<IpAddr> {
        self.local
    }

    /// The listener the datagram came in on, as
    /// [`Request::listener`](crate::Request::listener) gives it.
    #[must_use]
    pub fn listener(&self) -> SocketAddr {
        self.listener
    }

    /// The full address the datagram was sent to, as
    /// [`Request::local_addr`](crate::Request::local_addr) gives it.
    #[must_use]
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local
            .map(|ip| SocketAddr::new(ip, self.listener.port()))
    }

    /// What the network layer said about the datagram, as
    /// [`Request::metadata`](crate::Request::metadata) gives it: empty
    /// unless the server asks for it with
    /// [`ServerBuilder::recv_metadata`](crate::ServerBuilder::recv_metadata).
    #[must_use]
    pub fn metadata(&self) -> Metadata {
        self.metadata
    }

    /// Builds the reply in one of the server's reused buffers: `write` gets
    /// the request's bytes and an empty buffer to append the reply to. The
    /// request's own buffer goes back to the server.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), udp_greet::Error> {
    /// use udp_greet::tokio::{GreetServer, Reply, Request};
    ///
    /// async fn shout(request: Request) -> Option<Reply> {
    ///     Some(request.reply_with(|data, out| out.extend(data.to_ascii_uppercase())))
    /// }
    /// let server = GreetServer::bind("127.0.0.1:0")?.spawn(shout)?;
    /// # server.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn reply_with(self, write: impl FnOnce(&[u8], &mut Vec<u8>)) -> Reply {
        let mut out = self.buffers.take();
        write(&self.data.bytes, &mut out.bytes);
        Reply { bytes: out }
    }

    /// The request's bytes as a vector of their own, taken out of the
    /// server's reuse (which then makes a new buffer in their place).
    #[must_use]
    pub fn into_data(mut self) -> Vec<u8> {
        self.data.home = None;
        std::mem::take(&mut self.data.bytes)
    }
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("peer", &self.peer)
            .field("local", &self.local)
            .field("len", &self.data.bytes.len())
            .field("validated", &self.validated)
            .finish()
    }
}

/// An async handler's reply: the bytes sent back to the request's sender.
///
/// Made with [`Request::reply_with`] (in a reused buffer: no
/// allocation once the server is warm), or from bytes of the handler's own
/// ([`Reply::new`], `From<Vec<u8>>`, `From<&[u8]>`, `From<&str>`).
///
/// ```
/// use udp_greet::tokio::Reply;
///
/// let reply = Reply::from("Hello, Sarah!");
/// let copy = reply.clone();
/// assert_eq!(copy.as_ref(), b"Hello, Sarah!");
/// assert_eq!(reply.as_bytes(), copy.as_bytes());
/// ```
#[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
pub struct Reply {
    pub(crate) bytes: Pooled,
}

impl Reply {
    /// A reply of `bytes`.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Reply {
        Reply {
            bytes: Pooled {
                bytes: bytes.into(),
                home: None,
            },
        }
    }

    /// The reply's bytes.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes.bytes
    }
}

/// A copy of the bytes, in a buffer from the same server's reused ones
/// when the reply was made with [`Request::reply_with`].
impl Clone for Reply {
    fn clone(&self) -> Reply {
        let Some(home) = &self.bytes.home else {
            return Reply::new(self.bytes.bytes.clone());
        };
        let mut bytes = home.take();
        bytes.bytes.extend_from_slice(&self.bytes.bytes);
        Reply { bytes }
    }
}

/// The reply's bytes, as [`Reply::as_bytes`].
impl AsRef<[u8]> for Reply {
    fn as_ref(&self) -> &[u8] {
        self.as_bytes()
    }
}

/// A reply of these bytes, without copying them.
impl From<Vec<u8>> for Reply {
    fn from(bytes: Vec<u8>) -> Reply {
        Reply::new(bytes)
    }
}

/// A reply of a copy of these bytes.
impl From<&[u8]> for Reply {
    fn from(bytes: &[u8]) -> Reply {
        Reply::new(bytes)
    }
}

/// A reply of a copy of this text's UTF-8 bytes.
impl From<&str> for Reply {
    fn from(text: &str) -> Reply {
        Reply::new(text)
    }
}

impl fmt::Debug for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reply")
            .field("len", &self.bytes.bytes.len())
            .finish()
    }
}

/// The classic greet handler for the async server: replies
/// `b"Hello, " + request + b"!"`, in a reused buffer.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), udp_greet::Error> {
/// use udp_greet::tokio::{GreetClient, GreetServer};
///
/// let server = GreetServer::bind("127.0.0.1:0")?.spawn(udp_greet::tokio::greet)?;
/// let client = GreetClient::connect(server.local_addr()).await?;
/// assert_eq!(client.send_recv(b"Tracy").await?, b"Hello, Tracy!");
/// server.shutdown().await?;
/// # Ok(())
/// # }
/// ```
#[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
pub async fn greet(request: Request) -> Option<Reply> {
    Some(request.reply_with(crate::greet_into))
}
