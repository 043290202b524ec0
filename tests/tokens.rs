//! Source tokens and the rate-limit controls, over real loopback sockets, on
//! the blocking server (inline and with a handler pool) and the async one:
//! a forged flood against a real client that shows tokens, exact counts,
//! rotation, tokens bound to their address, forged tokens of every length,
//! challenges within the amplification limit, slip, exemptions, dry run.

mod util;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use udp_greet::{
    Action, Engine, GreetClient, GreetServer, HandlerPool, RateLimit, Request, ServerBuilder,
    ServerControl, SourceTokens, Stats, TOKEN_LEN, TokenFormat,
};
use util::{HANG_GUARD, V4, assert_balanced, wait_until};

/// A made-up protocol for the tests. A datagram is its payload, or
/// `0xFE len token payload` when it carries a token; a challenge is
/// `0xFD len token`. The token's length is on the wire, so that forged
/// tokens of any length can be sent.
struct Tagged;

const WITH_TOKEN: u8 = 0xFE;
const CHALLENGE: u8 = 0xFD;

impl Tagged {
    fn split(datagram: &[u8]) -> (Option<&[u8]>, &[u8]) {
        match datagram {
            [WITH_TOKEN | CHALLENGE, len, rest @ ..] if rest.len() >= usize::from(*len) => {
                let (token, payload) = rest.split_at(usize::from(*len));
                (Some(token), payload)
            }
            _ => (None, datagram),
        }
    }

    fn payload(datagram: &[u8]) -> &[u8] {
        Self::split(datagram).1
    }

    /// `payload` carrying `token`.
    fn with(token: &[u8], payload: &[u8]) -> Vec<u8> {
        let mut datagram = vec![WITH_TOKEN, token.len() as u8];
        datagram.extend_from_slice(token);
        datagram.extend_from_slice(payload);
        datagram
    }
}

impl TokenFormat for Tagged {
    fn find<'a>(&self, datagram: &'a [u8]) -> Option<&'a [u8]> {
        Self::split(datagram).0
    }

    fn write(&self, datagram: &mut Vec<u8>, token: &[u8]) {
        let marker = match datagram.first() {
            Some(&CHALLENGE) => CHALLENGE,
            _ => WITH_TOKEN,
        };
        let payload = match datagram.as_slice() {
            [CHALLENGE] => Vec::new(),
            other => Self::payload(other).to_vec(),
        };
        datagram.clear();
        datagram.extend_from_slice(&[marker, token.len() as u8]);
        datagram.extend_from_slice(token);
        datagram.extend_from_slice(&payload);
    }

    fn challenge(&self, _request: &[u8], reply: &mut Vec<u8>) -> bool {
        reply.push(CHALLENGE);
        true
    }

    fn is_challenge(&self, datagram: &[u8]) -> bool {
        datagram.first() == Some(&CHALLENGE)
    }
}

/// A challenge's size on the wire: marker, length, token.
const CHALLENGE_LEN: usize = 2 + TOKEN_LEN;

/// Greets the payload, whatever token the request carries; a payload
/// that starts with `*` is answered with itself eight times instead.
fn greeter(request: Request<'_>, reply: &mut Vec<u8>) -> Action {
    answer(Tagged::payload(request.data()), reply);
    Action::Reply
}

fn answer(payload: &[u8], reply: &mut Vec<u8>) {
    if payload.starts_with(b"*") {
        for _ in 0..8 {
            reply.extend_from_slice(payload);
        }
    } else {
        udp_greet::greet_into(payload, reply);
    }
}

fn tokens() -> SourceTokens {
    SourceTokens::new(*b"0123456789abcdef", Tagged)
}

fn localhost() -> IpAddr {
    IpAddr::V4(Ipv4Addr::LOCALHOST)
}

/// Which server a scenario runs on.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Inline,
    Pool,
    Async,
}

const KINDS: [Kind; 3] = [Kind::Inline, Kind::Pool, Kind::Async];

/// A running server of any kind.
struct Running {
    control: ServerControl,
    stop: Box<dyn FnOnce() -> Stats>,
}

impl Running {
    fn addr(&self) -> SocketAddr {
        self.control.local_addr()
    }

    fn stats(&self) -> Stats {
        self.control.stats()
    }

    fn shutdown(self) -> Stats {
        let stats = (self.stop)();
        assert_balanced(&stats);
        stats
    }

    /// Waits until the server has dealt with `count` datagrams.
    fn wait_received(&self, count: u64) {
        wait_until(&format!("{count} datagrams dealt with"), || {
            let stats = self.stats();
            stats.received >= count && stats.in_flight() == 0
        });
    }
}

/// A greet server of `kind` with the settings `configure` makes.
fn start(kind: Kind, configure: impl Fn(&mut dyn Settings)) -> Running {
    match kind {
        Kind::Inline | Kind::Pool => {
            let mut builder = GreetServer::builder();
            if let Kind::Pool = kind {
                // Room for a whole flood: shedding has its own test.
                builder = builder.handler_pool(HandlerPool::threads(2).queue_capacity(1 << 16));
            }
            let mut holder = Some(builder);
            configure(&mut holder);
            let builder = holder.expect("a builder");
            let server = builder
                .bind(V4)
                .expect("bind")
                .spawn(greeter)
                .expect("spawn");
            Running {
                control: server.control(),
                stop: Box::new(move || server.shutdown().expect("shutdown")),
            }
        }
        Kind::Async => start_async(configure),
    }
}

#[cfg(feature = "tokio")]
fn start_async(configure: impl Fn(&mut dyn Settings)) -> Running {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let mut holder = Some(udp_greet::tokio::GreetServer::builder());
    configure(&mut holder);
    let builder = holder.expect("a builder");
    let server = runtime.block_on(async {
        builder
            .bind(V4)
            .expect("bind")
            .spawn(|request: udp_greet::tokio::Request| async move {
                let mut reply = Vec::new();
                answer(Tagged::payload(request.data()), &mut reply);
                Some(udp_greet::tokio::Reply::new(reply))
            })
            .expect("spawn")
    });
    Running {
        control: server.control(),
        stop: Box::new(move || runtime.block_on(server.shutdown()).expect("shutdown")),
    }
}

#[cfg(not(feature = "tokio"))]
fn start_async(configure: impl Fn(&mut dyn Settings)) -> Running {
    eprintln!("note: the async half of this test needs the feature `tokio`; it ran blocking");
    start(Kind::Inline, configure)
}

/// The settings the scenarios use, for a builder of any engine.
trait Settings {
    fn rate_limit(&mut self, limit: RateLimit);
    fn source_tokens(&mut self, tokens: SourceTokens);
    fn max_amplification(&mut self, factor: usize);
}

impl<E: Engine> Settings for Option<ServerBuilder<E>> {
    fn rate_limit(&mut self, limit: RateLimit) {
        *self = self.take().map(|b| b.rate_limit(limit));
    }
    fn source_tokens(&mut self, tokens: SourceTokens) {
        *self = self.take().map(|b| b.source_tokens(tokens));
    }
    fn max_amplification(&mut self, factor: usize) {
        *self = self.take().map(|b| b.max_amplification(factor));
    }
}

fn socket() -> UdpSocket {
    let socket = UdpSocket::bind(V4).expect("bind a test socket");
    socket.set_read_timeout(Some(HANG_GUARD)).expect("timeout");
    socket
}

/// Everything queued on `socket` now, without waiting.
fn drain(socket: &UdpSocket) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = [0u8; 2048];
    socket.set_nonblocking(true).expect("nonblocking");
    while let Ok(n) = socket.recv(&mut buf) {
        out.push(buf[..n].to_vec());
    }
    socket.set_nonblocking(false).expect("blocking");
    out
}

/// A client with tokens whose reply check tells a late reply to an earlier
/// call (after a resend) from its own.
fn client_for(addr: SocketAddr) -> GreetClient {
    GreetClient::builder()
        .source_tokens(Tagged)
        .reply_check(|request, reply| {
            let mut greeting = Vec::new();
            udp_greet::greet_into(Tagged::payload(request), &mut greeting);
            Tagged::payload(reply) == greeting
        })
        .initial_timeout(Duration::from_millis(200))
        .retries(8)
        .call_timeout(HANG_GUARD)
        .connect(addr)
        .expect("connect")
}

#[test]
fn a_forged_flood_from_one_prefix_leaves_a_real_client_with_tokens_unharmed() {
    const RATE: u32 = 100;
    const BURST: u32 = 10;
    const SOCKETS: usize = 64;
    const EACH: usize = 50;
    const CALLS: usize = 50;
    for kind in KINDS {
        let server = start(kind, |s| {
            s.rate_limit(RateLimit::new(RATE, BURST));
            s.source_tokens(tokens().challenge(true));
            s.max_amplification(5);
        });
        let addr = server.addr();
        // The real client's first call carries no token; its reply hands
        // one out (the bucket is full before the flood), within five times
        // the request.
        let real = client_for(addr);
        let first = real.send_recv(b"real-client-00").expect("the first call");
        assert_eq!(
            Tagged::payload(&first),
            b"Hello, real-client-00!",
            "{kind:?}"
        );
        assert!(
            Tagged.find(&first).is_some(),
            "{kind:?}: a token came with it"
        );

        // The flood: 64 sockets of the same /24 (127.0.0.0/24), each
        // sending a bounded number of requests without a token; half of
        // them so small that a challenge (18 bytes), or an answer with a
        // token, would be over five times their size.
        let started = Instant::now();
        let flood: Vec<_> = (0..SOCKETS)
            .map(|i| {
                std::thread::spawn(move || {
                    let socket = socket();
                    let request: &[u8] = if i % 2 == 0 { b"flo" } else { b"flooding" };
                    let sent = (0..EACH)
                        .filter(|_| util::send_to(&socket, request, addr).is_ok())
                        .count() as u64;
                    (socket, request.len(), sent)
                })
            })
            .collect();
        for call in 1..=CALLS {
            let name = format!("real-client-{call:02}");
            let reply = real.send_recv(name.as_bytes());
            let reply = reply.unwrap_or_else(|e| panic!("{kind:?}: call {call}: {e}"));
            assert_eq!(
                Tagged::payload(&reply),
                format!("Hello, {name}!").as_bytes(),
                "{kind:?}"
            );
        }
        let flood: Vec<_> = flood
            .into_iter()
            .map(|thread| thread.join().expect("a flood thread"))
            .collect();
        let forged_sent: u64 = flood.iter().map(|(_, _, sent)| sent).sum();
        // A last call, once the flood is sent: the server's one socket
        // hands datagrams over in order, so its answer comes after every
        // forged datagram was taken (or dropped by the kernel, which not
        // every platform counts).
        let last = real.send_recv(b"real-client-last").expect("the last call");
        assert_eq!(
            Tagged::payload(&last),
            b"Hello, real-client-last!",
            "{kind:?}"
        );
        wait_until("the flood to be dealt with", || {
            server.stats().in_flight() == 0
        });
        let elapsed = started.elapsed().as_secs_f64();
        let stats = server.shutdown();
        // What the forged sources got back: answers and challenges, none
        // larger than five times its request.
        let (mut answers, mut challenges) = (0u64, 0u64);
        for (socket, request_len, _) in &flood {
            for datagram in drain(socket) {
                assert!(
                    datagram.len() <= 5 * request_len,
                    "{kind:?}: {} bytes to a {request_len}-byte request",
                    datagram.len()
                );
                if Tagged.is_challenge(&datagram) {
                    challenges += 1;
                } else {
                    answers += 1;
                }
            }
        }
        assert_eq!(
            real.challenges(),
            0,
            "{kind:?}: the real client was never challenged"
        );
        // Every real request after the first carried a valid token (a
        // resend after a kernel drop is one more).
        assert!(stats.validated > CALLS as u64, "{kind:?}: {stats:?}");
        // An answer with no room for a token goes without it, not capped.
        assert_eq!(
            (
                stats.invalid_tokens,
                stats.overloaded,
                stats.amplification_capped
            ),
            (0, 0, 0),
            "{kind:?}: {stats:?}"
        );
        assert_eq!(challenges, stats.challenged, "{kind:?}: {stats:?}");
        let forged_received = stats.received - stats.validated - 1;
        assert_eq!(
            forged_received,
            answers + stats.rate_limited + stats.challenged,
            "{kind:?}: validated, rate_limited and challenged account for every datagram: {stats:?}"
        );
        assert!(forged_received <= forged_sent, "{kind:?}: {stats:?}");
        if cfg!(target_os = "linux") && !util::emulator::QEMU_SO_MEMINFO.skips_part() {
            // Where the kernel's drops are counted, nothing is missing.
            assert!(
                forged_received + stats.kernel_drops >= forged_sent,
                "{kind:?}: {stats:?}"
            );
        }
        let bound = (f64::from(RATE) * elapsed).ceil() as u64 + u64::from(BURST);
        assert!(
            answers <= bound,
            "{kind:?}: the forged prefix got {answers} answers in {elapsed:.2} s; at most {bound}"
        );
        assert!(stats.challenged > 0, "{kind:?}: {stats:?}");
        // Challenges have a budget of their own (10 a second after 10), so
        // that the flood is not reflected at its victim at full rate.
        let challenge_bound = (10.0 * elapsed).ceil() as u64 + 10;
        assert!(
            stats.challenged <= challenge_bound,
            "{kind:?}: {} challenges in {elapsed:.2} s; at most {challenge_bound}",
            stats.challenged
        );
        assert!(
            stats.rate_limited > 0,
            "{kind:?}: 3-byte requests are not challenged at 5x: {stats:?}"
        );
    }
}

#[test]
fn tokens_are_bound_to_their_address_and_survive_one_rotation() {
    if util::lacks_loopback_range() {
        return;
    }
    for kind in KINDS {
        let tokens = tokens().in_replies(false);
        let server = start(kind, |s| s.source_tokens(tokens.clone()));
        let addr = server.addr();
        let here = socket();
        let other = UdpSocket::bind("127.0.0.2:0").expect("bind 127.0.0.2");
        other.set_read_timeout(Some(HANG_GUARD)).expect("timeout");
        let mine = tokens.token_for(localhost());
        let theirs = tokens.token_for("127.0.0.2".parse().expect("an address"));
        let mut buf = [0u8; 256];
        let mut ask = |socket: &UdpSocket, token: &[u8]| {
            util::send_to(socket, &Tagged::with(token, b"x"), addr).expect("send");
            let n = util::recv(socket, &mut buf).expect("a reply");
            assert_eq!(&buf[..n], b"Hello, x!");
        };
        // (A receive worker publishes what it saw of a token a moment
        // after a handler thread may have counted the reply.)
        let counts = |validated, invalid| {
            wait_until(&format!("{validated} validated, {invalid} invalid"), || {
                let stats = server.stats();
                (stats.validated, stats.invalid_tokens) == (validated, invalid)
            });
        };
        ask(&here, &mine);
        ask(&other, &theirs);
        counts(2, 0);
        // Each other's tokens: refused, and answered as without one.
        ask(&here, &theirs);
        ask(&other, &mine);
        counts(2, 2);
        // A rotation: the previous secret is still accepted...
        tokens.rotate(*b"fedcba9876543210").expect("a secret");
        ask(&here, &mine);
        counts(3, 2);
        let fresh = tokens.token_for(localhost());
        // ...until the next one rotates it out.
        tokens.rotate(*b"another secret!!").expect("a secret");
        ask(&here, &mine);
        ask(&here, &fresh);
        let stats = server.shutdown();
        assert_eq!(
            (stats.validated, stats.invalid_tokens),
            (4, 3),
            "{kind:?}: {stats:?}"
        );
    }
}

#[test]
fn servers_sharing_a_secret_accept_each_others_tokens() {
    for kind in KINDS {
        let secret = SourceTokens::random_secret();
        // Two servers, each with tokens of its own but the same secret
        // (anycast), and a third with another secret.
        let one = start(kind, |s| s.source_tokens(SourceTokens::new(secret, Tagged)));
        let two = start(kind, |s| s.source_tokens(SourceTokens::new(secret, Tagged)));
        let other = SourceTokens::random_secret();
        let three = start(kind, |s| s.source_tokens(SourceTokens::new(other, Tagged)));
        let socket = socket();
        let mut buf = [0u8; 256];
        util::send_to(&socket, b"x", one.addr()).expect("send");
        let n = util::recv(&socket, &mut buf).expect("a reply");
        let token = Tagged
            .find(&buf[..n])
            .expect("a token in the reply")
            .to_vec();
        for server in [&two, &three] {
            util::send_to(&socket, &Tagged::with(&token, b"x"), server.addr()).expect("send");
            util::recv(&socket, &mut buf).expect("a reply");
        }
        two.wait_received(1);
        three.wait_received(1);
        let (two, three) = (two.shutdown(), three.shutdown());
        assert_eq!(
            (two.validated, two.invalid_tokens),
            (1, 0),
            "{kind:?}: {two:?}"
        );
        assert_eq!(
            (three.validated, three.invalid_tokens),
            (0, 1),
            "{kind:?}: {three:?}"
        );
        one.shutdown();
    }
}

#[test]
fn forged_tokens_of_every_length_are_refused() {
    for kind in KINDS {
        let tokens = tokens().in_replies(false);
        let server = start(kind, |s| s.source_tokens(tokens.clone()));
        let addr = server.addr();
        let socket = socket();
        let real = tokens.token_for(localhost());
        let mut sent = 0;
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..=64usize {
            // Random bytes; and the real token cut or padded to the length
            // (for 16, with its last bit flipped).
            let random: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            let mut near = real.to_vec();
            near.resize(len, 0);
            if len == TOKEN_LEN {
                near[TOKEN_LEN - 1] ^= 1;
            }
            for token in [random, near] {
                util::send_to(&socket, &Tagged::with(&token, b"x"), addr).expect("send");
                sent += 1;
            }
        }
        server.wait_received(sent);
        let stats = server.shutdown();
        assert_eq!(stats.validated, 0, "{kind:?}: {stats:?}");
        assert_eq!(stats.invalid_tokens, sent, "{kind:?}: {stats:?}");
        assert_eq!(stats.replied, sent, "{kind:?}: answered as without a token");
    }
}

#[test]
fn a_challenge_never_exceeds_the_amplification_limit() {
    for kind in KINDS {
        let server = start(kind, |s| {
            // One request, then (at 1 a second) limited; every challenge
            // within the budget.
            s.rate_limit(RateLimit::new(1, 1));
            s.source_tokens(
                tokens()
                    .challenge(true)
                    .challenge_limit(RateLimit::new(1, 100))
                    .in_replies(false),
            );
            s.max_amplification(2);
        });
        let addr = server.addr();
        let socket = socket();
        util::send_to(&socket, b"first-req", addr).expect("send");
        assert_eq!(util::recv(&socket, &mut [0u8; 64]).expect("a reply"), 17);
        let mut challenged = 0;
        for len in 1..=24usize {
            util::send_to(&socket, &vec![b'a'; len], addr).expect("send");
            server.wait_received(1 + len as u64);
            for datagram in drain(&socket) {
                assert!(datagram.len() <= 2 * len, "{kind:?}: {len}: {datagram:?}");
                if Tagged.is_challenge(&datagram) {
                    // 18 bytes: within twice a request of 9 bytes or more.
                    assert!(len >= 9, "{kind:?}: a challenge to {len} bytes");
                    assert_eq!(datagram.len(), CHALLENGE_LEN);
                    challenged += 1;
                }
            }
        }
        let stats = server.shutdown();
        assert_eq!(stats.challenged, challenged, "{kind:?}: {stats:?}");
        // A second may pass during the test, and let one more through.
        assert!(stats.challenged >= 15, "{kind:?}: {stats:?}");
        assert!(stats.rate_limited >= 7, "{kind:?}: 1 to 8 bytes: {stats:?}");
    }
}

#[test]
fn challenges_have_a_budget_per_prefix() {
    for kind in KINDS {
        let server = start(kind, |s| {
            s.rate_limit(RateLimit::new(1, 1));
            s.source_tokens(
                tokens()
                    .challenge(true)
                    .challenge_limit(RateLimit::new(1, 5))
                    .in_replies(false),
            );
            s.max_amplification(4);
        });
        let socket = socket();
        let started = Instant::now();
        for _ in 0..40 {
            util::send_to(&socket, b"twenty bytes, padded", server.addr()).expect("send");
        }
        server.wait_received(40);
        let elapsed = started.elapsed().as_secs();
        let got = drain(&socket);
        let stats = server.shutdown();
        let challenges = got.iter().filter(|d| Tagged.is_challenge(d)).count() as u64;
        assert_eq!(challenges, stats.challenged, "{kind:?}: {stats:?}");
        assert!(
            (5..=6 + elapsed).contains(&stats.challenged),
            "{kind:?}: a burst of 5, then 1 a second: {stats:?}"
        );
        assert_eq!(
            stats.replied + stats.challenged + stats.rate_limited,
            40,
            "{kind:?}: {stats:?}"
        );
    }
}

#[test]
fn a_token_that_would_break_the_amplification_limit_is_left_out() {
    for kind in KINDS {
        let server = start(kind, |s| {
            s.source_tokens(tokens());
            s.max_amplification(2);
        });
        let socket = socket();
        let mut buf = [0u8; 256];
        // (request length, whether its greeting has room for the 18 bytes
        // of a token within twice the request)
        for (len, room) in [(8, false), (20, false), (26, true), (30, true)] {
            let name = vec![b'n'; len];
            util::send_to(&socket, &name, server.addr()).expect("send");
            let n = util::recv(&socket, &mut buf).expect("a reply");
            let reply = &buf[..n];
            let mut greeting = Vec::new();
            udp_greet::greet_into(&name, &mut greeting);
            assert_eq!(Tagged::payload(reply), greeting, "{kind:?}");
            assert_eq!(Tagged.find(reply).is_some(), room, "{kind:?}: {len}");
            assert!(n <= 2 * len, "{kind:?}: {len}");
        }
        let stats = server.shutdown();
        assert_eq!(
            (stats.replied, stats.amplification_capped),
            (4, 0),
            "{kind:?}"
        );
    }
}

#[test]
fn a_token_that_would_break_the_largest_datagram_is_left_out() {
    for kind in KINDS {
        let tokens = tokens();
        let server = start(kind, |s| s.source_tokens(tokens.clone()));
        let socket = socket();
        socket.set_nonblocking(false).expect("blocking");
        // Validated, so no amplification limit: eight times 8 188 bytes is
        // 65 504, and a token's 18 more would not fit in a UDP datagram.
        let mut payload = vec![b'x'; 8_188];
        payload[0] = b'*';
        let token = tokens.token_for(localhost());
        util::send_to(&socket, &Tagged::with(&token, &payload), server.addr()).expect("send");
        let mut buf = vec![0u8; 70_000];
        let n = util::recv(&socket, &mut buf).expect("the reply");
        assert_eq!(n, 65_504, "{kind:?}: sent without the token");
        assert_eq!(Tagged.find(&buf[..n]), None, "{kind:?}");
        let stats = server.shutdown();
        assert_eq!(
            (stats.replied, stats.send_errors),
            (1, 0),
            "{kind:?}: {stats:?}"
        );
    }
}

#[test]
fn slip_answers_every_nth_limited_request_of_a_prefix() {
    for kind in KINDS {
        let server = start(kind, |s| {
            // A reply the size of the request (more would amplify).
            s.rate_limit(RateLimit::new(1, 2).slip(3, |request, reply| {
                reply.extend_from_slice(b"TC");
                reply.extend_from_slice(request.get(2..).unwrap_or_default());
                true
            }));
        });
        let addr = server.addr();
        let socket = socket();
        for i in 0..20 {
            util::send_to(&socket, format!("req{i:02}").as_bytes(), addr).expect("send");
        }
        server.wait_received(20);
        let got = drain(&socket);
        let stats = server.shutdown();
        let slips = got.iter().filter(|d| d.starts_with(b"TC")).count() as u64;
        assert_eq!(stats.slipped, slips, "{kind:?}: {stats:?}");
        assert_eq!(
            stats.replied + stats.rate_limited,
            20,
            "{kind:?}: {stats:?}"
        );
        // The 1st, 4th, 7th... limited request of the prefix slips.
        assert_eq!(
            stats.slipped,
            stats.rate_limited.div_ceil(3),
            "{kind:?}: {stats:?}"
        );
        assert!(stats.rate_limited >= 17, "{kind:?}: {stats:?}");
        if stats.replied == 2 {
            // No refill during the test: requests 2 to 19 were limited.
            let slipped: Vec<&[u8]> = got
                .iter()
                .filter(|d| d.starts_with(b"TC"))
                .map(Vec::as_slice)
                .collect();
            let expected: Vec<Vec<u8>> = (2..20)
                .step_by(3)
                .map(|i| format!("TCq{i:02}").into_bytes())
                .collect();
            assert_eq!(slipped, expected, "{kind:?}");
        }
        assert_eq!(
            got.len() as u64,
            stats.replied + stats.slipped,
            "{kind:?}: nothing else is sent"
        );
    }
}

#[test]
fn exempt_prefixes_are_never_limited() {
    for kind in KINDS {
        for (exempt, bits, expect_exempt) in [([127, 0, 0, 0], 8, true), ([10, 0, 0, 0], 8, false)]
        {
            let server = start(kind, |s| {
                s.rate_limit(RateLimit::new(1, 1).exempt(IpAddr::from(exempt), bits));
            });
            let socket = socket();
            for _ in 0..10 {
                util::send_to(&socket, b"x", server.addr()).expect("send");
            }
            server.wait_received(10);
            let stats = server.shutdown();
            if expect_exempt {
                assert_eq!(
                    (stats.exempt, stats.replied),
                    (10, 10),
                    "{kind:?}: {stats:?}"
                );
            } else {
                assert_eq!(stats.exempt, 0, "{kind:?}: {stats:?}");
                assert!(stats.rate_limited >= 8, "{kind:?}: {stats:?}");
            }
        }
    }
}

#[test]
fn an_exempt_prefix_stays_exempt_with_a_token() {
    for kind in KINDS {
        let tokens = tokens()
            .in_replies(false)
            .validated_limit(RateLimit::new(1, 1));
        let server = start(kind, |s| {
            s.rate_limit(RateLimit::new(1, 1).exempt(localhost(), 8));
            s.source_tokens(tokens.clone());
        });
        let socket = socket();
        let token = tokens.token_for(localhost());
        for _ in 0..10 {
            util::send_to(&socket, &Tagged::with(&token, b"x"), server.addr()).expect("send");
        }
        server.wait_received(10);
        let stats = server.shutdown();
        assert_eq!(
            (stats.exempt, stats.validated, stats.replied),
            (10, 10, 10),
            "{kind:?}: {stats:?}"
        );
    }
}

#[test]
fn a_panic_in_a_slip_or_challenge_function_leaves_the_request_limited() {
    /// A panic payload whose drop panics too.
    struct Bomb;
    impl Drop for Bomb {
        fn drop(&mut self) {
            panic!("a payload that panics as it is dropped");
        }
    }
    struct Explosive;
    impl TokenFormat for Explosive {
        fn find<'a>(&self, _: &'a [u8]) -> Option<&'a [u8]> {
            None
        }
        fn write(&self, _: &mut Vec<u8>, _: &[u8]) {}
        fn challenge(&self, _: &[u8], _: &mut Vec<u8>) -> bool {
            std::panic::panic_any(Bomb)
        }
    }
    for kind in KINDS {
        for challenge in [false, true] {
            let server = start(kind, |s| {
                s.rate_limit(RateLimit::new(1, 1).slip(1, |_, _| std::panic::panic_any(Bomb)));
                if challenge {
                    s.source_tokens(
                        SourceTokens::new([1; 16], Explosive)
                            .challenge(true)
                            .in_replies(false),
                    );
                }
            });
            let socket = socket();
            for _ in 0..5 {
                util::send_to(&socket, b"x", server.addr()).expect("send");
            }
            server.wait_received(5);
            // Still serving: a request from another prefix is answered.
            if util::has_loopback_range() {
                let other = UdpSocket::bind("127.0.1.1:0").expect("bind 127.0.1.1");
                other.set_read_timeout(Some(HANG_GUARD)).expect("timeout");
                util::send_to(&other, b"y", server.addr()).expect("send");
                let n = util::recv(&other, &mut [0u8; 32]).expect("a reply");
                assert_eq!(n, 9, "{kind:?}");
            }
            let stats = server.shutdown();
            assert_eq!(stats.handler_panics, 0, "{kind:?}: {stats:?}");
            assert!(stats.rate_limited >= 3, "{kind:?}: {stats:?}");
            assert_eq!(
                (stats.slipped, stats.challenged),
                (0, 0),
                "{kind:?}: {stats:?}"
            );
        }
    }
}

#[test]
fn dry_run_drops_nothing_and_counts_what_enforcement_drops() {
    for kind in KINDS {
        let limit = RateLimit::new(1, 3);
        let enforced = start(kind, |s| s.rate_limit(limit.clone()));
        let dry = start(kind, |s| s.rate_limit(limit.clone().dry_run(true)));
        let socket = socket();
        let started = Instant::now();
        for i in 1..=15 {
            // The same traffic to both, interleaved.
            util::send_to(&socket, b"x", enforced.addr()).expect("send");
            util::send_to(&socket, b"x", dry.addr()).expect("send");
            enforced.wait_received(i);
            dry.wait_received(i);
        }
        let elapsed = started.elapsed();
        let (enforced, dry) = (enforced.shutdown(), dry.shutdown());
        assert_eq!(
            (dry.replied, dry.rate_limited),
            (15, 0),
            "{kind:?}: {dry:?}"
        );
        assert_eq!(enforced.replied + enforced.rate_limited, 15, "{kind:?}");
        assert!(enforced.rate_limited >= 11, "{kind:?}: {enforced:?}");
        // Both buckets saw the same requests at (nearly) the same times: a
        // refill (one a second) can fall between a pair only on a machine
        // slower than a second for the whole loop.
        if elapsed < Duration::from_millis(900) {
            assert_eq!(dry.dry_run_limited, enforced.rate_limited, "{kind:?}");
        } else {
            let slack = elapsed.as_secs() + 1;
            assert!(
                dry.dry_run_limited.abs_diff(enforced.rate_limited) <= slack,
                "{kind:?}"
            );
        }
    }
}

#[test]
fn validated_sources_skip_the_amplification_limit_and_have_their_own_rate() {
    for kind in KINDS {
        let tokens = tokens()
            .in_replies(false)
            .validated_limit(RateLimit::new(1, 3));
        let server = start(kind, |s| {
            s.source_tokens(tokens.clone());
            s.max_amplification(1);
            s.rate_limit(RateLimit::new(1, 100));
        });
        let addr = server.addr();
        let socket = socket();
        let token = tokens.token_for(localhost());
        // Eight times the request: capped without a token.
        util::send_to(&socket, b"*abc", addr).expect("send");
        // With one (32 bytes for 22): sent.
        for _ in 0..5 {
            util::send_to(&socket, &Tagged::with(&token, b"*abc"), addr).expect("send");
        }
        server.wait_received(6);
        let got = drain(&socket);
        let stats = server.shutdown();
        assert_eq!(stats.amplification_capped, 1, "{kind:?}: {stats:?}");
        assert_eq!(stats.validated, 5, "{kind:?}: {stats:?}");
        // The validated limit: a burst of 3 (a fourth if a second passed).
        assert!((3..=4).contains(&stats.replied), "{kind:?}: {stats:?}");
        assert_eq!(stats.rate_limited, 5 - stats.replied, "{kind:?}: {stats:?}");
        assert!(got.iter().all(|d| Tagged::payload(d) == b"*abc".repeat(8)));
    }
}

#[test]
fn a_client_answers_a_challenge_with_the_token_at_once() {
    for (kind, ids) in KINDS.into_iter().flat_map(|k| [(k, false), (k, true)]) {
        // "Hello, Michael!" has no room for a token within 4 x "Michael":
        // the client has none when Tracy goes over the limit.
        let server = start(kind, |s| {
            s.rate_limit(RateLimit::new(1, 1));
            s.source_tokens(tokens().challenge(true));
            s.max_amplification(4);
        });
        let mut builder = GreetClient::builder()
            .source_tokens(Tagged)
            .initial_timeout(Duration::from_millis(200))
            .retries(8)
            .call_timeout(HANG_GUARD);
        if ids {
            // Greetings carry no id: one id for every call, one call in
            // flight at a time; the multiplexed path is what runs.
            builder = builder.request_id(|_| Some(0));
        }
        let client = builder.connect(server.addr()).expect("connect");
        let mut replies = Vec::new();
        for name in ["Michael", "Tracy", "Sarah"] {
            let reply = client.send_recv(name.as_bytes()).expect("a reply");
            replies.push(String::from_utf8_lossy(Tagged::payload(&reply)).into_owned());
        }
        assert_eq!(
            replies,
            ["Hello, Michael!", "Hello, Tracy!", "Hello, Sarah!"]
        );
        let stats = server.shutdown();
        // Michael: the burst. Tracy: challenged, then again with the
        // token, which the reply carries back. Sarah: with the token.
        assert_eq!(client.challenges(), 1, "{kind:?}, ids {ids}");
        assert_eq!(
            (stats.challenged, stats.validated, stats.replied),
            (1, 2, 3),
            "{kind:?}, ids {ids}: {stats:?}"
        );
    }
}

#[test]
fn a_forged_challenge_does_not_replace_the_token_a_server_gave() {
    // The test plays the server, so that it can forge what it likes.
    let server = socket();
    let addr = server.local_addr().expect("address");
    let client = GreetClient::builder()
        .source_tokens(Tagged)
        .initial_timeout(Duration::from_millis(100))
        .retries(1)
        .call_timeout(HANG_GUARD)
        .connect(addr)
        .expect("connect");
    let (a, b, c) = ([b'A'; TOKEN_LEN], [b'B'; TOKEN_LEN], [b'C'; TOKEN_LEN]);
    let mut buf = [0u8; 256];
    let mut next = || {
        let (n, from) = util::recv_from(&server, &mut buf).expect("a request");
        (buf[..n].to_vec(), from)
    };
    std::thread::scope(|scope| {
        let calls = scope.spawn(|| {
            ["a", "b", "c", "d", "e"].map(|name| client.send_recv(name.as_bytes()).is_ok())
        });
        let greeting = |name: &[u8]| {
            let mut reply = Vec::new();
            udp_greet::greet_into(name, &mut reply);
            reply
        };
        // a: no token yet; the reply gives A.
        let (request, from) = next();
        assert_eq!(Tagged.find(&request), None);
        util::send_to(&server, &Tagged::with(&a, &greeting(b"a")), from).expect("send");
        // b: with A; a challenge gives B, the request comes again with it,
        // and its reply carries B back: B is remembered.
        let (request, from) = next();
        assert_eq!(Tagged.find(&request), Some(&a[..]));
        let challenge = |token: &[u8]| {
            let mut challenge = vec![CHALLENGE];
            Tagged.write(&mut challenge, token);
            challenge
        };
        util::send_to(&server, &challenge(&b), from).expect("send");
        let (request, from) = next();
        assert_eq!(Tagged.find(&request), Some(&b[..]));
        util::send_to(&server, &Tagged::with(&b, &greeting(b"b")), from).expect("send");
        // c: with B; a forged challenge gives C, and no reply ever comes:
        // the request goes again at once with C, and the next attempt with
        // B again; the call fails.
        let (request, from) = next();
        assert_eq!(Tagged.find(&request), Some(&b[..]));
        util::send_to(&server, &challenge(&c), from).expect("send");
        let (request, _) = next();
        assert_eq!(Tagged.find(&request), Some(&c[..]));
        let (request, _) = next();
        assert_eq!(Tagged.find(&request), Some(&b[..]), "the next attempt");
        // d: with B again; a forged challenge gives C, and then a reply
        // comes (to either request) with no token: the call succeeds, and
        // C is not remembered, since no reply carried it.
        let (request, from) = next();
        assert_eq!(
            Tagged.find(&request),
            Some(&b[..]),
            "the forged token was kept"
        );
        util::send_to(&server, &challenge(&c), from).expect("send");
        let (request, from) = next();
        assert_eq!(Tagged.find(&request), Some(&c[..]));
        util::send_to(&server, &greeting(b"d"), from).expect("send");
        // e: with B.
        let (request, from) = next();
        assert_eq!(
            Tagged.find(&request),
            Some(&b[..]),
            "the forged token was kept"
        );
        util::send_to(&server, &greeting(b"e"), from).expect("send");
        let results = calls.join().expect("the calls");
        assert_eq!(results, [true, true, false, true, true]);
    });
    assert_eq!(client.challenges(), 3);
}

#[cfg(feature = "tokio")]
#[test]
fn the_async_client_answers_challenges_too_with_request_ids() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    for ids in [false, true] {
        let server = start(Kind::Inline, |s| {
            s.rate_limit(RateLimit::new(1, 1));
            s.source_tokens(tokens().challenge(true));
            s.max_amplification(4);
        });
        let addr = server.addr();
        let control = server.control.clone();
        runtime.block_on(async {
            let mut builder = udp_greet::tokio::GreetClient::builder()
                .source_tokens(Tagged)
                .initial_timeout(Duration::from_millis(200))
                .retries(8)
                .call_timeout(HANG_GUARD);
            if ids {
                // Greetings carry no id: one id for every call, one call
                // in flight at a time; the multiplexed path is what runs.
                builder = builder.request_id(|_| Some(0));
            }
            let client = builder.connect(addr).await.expect("connect");
            for name in ["Michael", "Tracy", "Sarah"] {
                let reply = client.send_recv(name.as_bytes()).await;
                let reply = reply.unwrap_or_else(|e| {
                    panic!(
                        "ids {ids}: {name}: {e}: {:?} challenges {} discarded {} unmatched {}",
                        control.stats(),
                        client.challenges(),
                        client.discarded(),
                        client.unmatched()
                    )
                });
                assert_eq!(
                    Tagged::payload(&reply),
                    format!("Hello, {name}!").as_bytes()
                );
            }
            assert_eq!(client.challenges(), 1, "ids {ids}");
        });
        let stats = server.shutdown();
        assert_eq!(
            (stats.challenged, stats.validated),
            (1, 2),
            "ids {ids}: {stats:?}"
        );
    }
}

#[test]
fn overload_challenges_requests_without_a_token() {
    let (started_tx, started_rx) = mpsc::channel::<()>();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let release_rx = std::sync::Mutex::new(release_rx);
    let started_tx = std::sync::Mutex::new(started_tx);
    let tokens = tokens().challenge(true).in_replies(false);
    let server = GreetServer::builder()
        .handler_pool(HandlerPool::threads(1).queue_capacity(1))
        .source_tokens(tokens.clone())
        .bind(V4)
        .expect("bind")
        .spawn(move |request: Request<'_>, reply: &mut Vec<u8>| {
            let _ = started_tx.lock().map(|tx| tx.send(()));
            let _ = release_rx.lock().map(|rx| rx.recv_timeout(HANG_GUARD));
            greeter(request, reply)
        })
        .expect("spawn");
    let addr = server.local_addr();
    let socket = socket();
    util::send_to(&socket, b"in the handler", addr).expect("send");
    started_rx
        .recv_timeout(HANG_GUARD)
        .expect("the handler started");
    util::send_to(&socket, b"in the queue..", addr).expect("send");
    // Shed: challenged without a token, overloaded with one.
    for _ in 0..3 {
        // 21 bytes: room for the 18-byte challenge.
        util::send_to(&socket, b"shed, without a token", addr).expect("send");
    }
    let token = tokens.token_for(localhost());
    util::send_to(&socket, &Tagged::with(&token, b"shed"), addr).expect("send");
    // Counted once sent (a receive worker publishes after its sends).
    wait_until("three challenged, one shed", || {
        let stats = server.stats();
        (stats.challenged, stats.overloaded) == (3, 1)
    });
    let mut buf = [0u8; 64];
    let challenges: Vec<Vec<u8>> = (0..3)
        .map(|_| {
            let n = util::recv(&socket, &mut buf).expect("a challenge");
            buf[..n].to_vec()
        })
        .collect();
    assert!(drain(&socket).is_empty(), "no busy reply without one set");
    for _ in 0..2 {
        release_tx.send(()).expect("release");
    }
    wait_until("the two held requests answered", || {
        server.stats().replied == 2
    });
    let stats = server.shutdown().expect("shutdown");
    assert_balanced(&stats);
    assert_eq!(
        (stats.challenged, stats.overloaded, stats.replied),
        (3, 1, 2),
        "{stats:?}"
    );
    assert_eq!(challenges.len(), 3);
    assert!(challenges.iter().all(|d| Tagged.is_challenge(d)));
}

#[cfg(feature = "tokio")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_overload_challenges_requests_without_a_token() {
    use udp_greet::tokio::{GreetServer as AsyncServer, Limits, Reply};
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let tokens = tokens().challenge(true).in_replies(false);
    let held = gate.clone();
    let server = AsyncServer::builder()
        .limits(Limits::new().max_in_flight(1).overload_reply(&b"busy"[..]))
        .source_tokens(tokens.clone())
        .bind(V4)
        .expect("bind")
        .spawn(move |request: udp_greet::tokio::Request| {
            let held = held.clone();
            async move {
                let _permit = held.acquire().await.ok()?;
                let mut reply = Vec::new();
                answer(Tagged::payload(request.data()), &mut reply);
                Some(Reply::new(reply))
            }
        })
        .expect("spawn");
    let addr = server.local_addr();
    let socket = tokio::net::UdpSocket::bind(V4).await.expect("bind");
    socket.send_to(b"held", addr).await.expect("send");
    util::wait_for("the handler to start", || server.stats().in_flight() == 1).await;
    // Shed: challenged without a token (21 bytes: room for 18), the busy
    // reply with one.
    for _ in 0..3 {
        socket
            .send_to(b"shed, without a token", addr)
            .await
            .expect("send");
    }
    let token = tokens.token_for(localhost());
    socket
        .send_to(&Tagged::with(&token, b"shed"), addr)
        .await
        .expect("send");
    let mut buf = [0u8; 64];
    let mut got = Vec::new();
    for _ in 0..4 {
        let n = util::guarded("a reply", socket.recv(&mut buf))
            .await
            .expect("recv");
        got.push(buf[..n].to_vec());
    }
    gate.add_permits(1);
    let n = util::guarded("the held reply", socket.recv(&mut buf))
        .await
        .expect("recv");
    assert_eq!(&buf[..n], b"Hello, held!");
    let stats = util::guarded("shutdown", server.shutdown())
        .await
        .expect("shutdown");
    assert_balanced(&stats);
    assert_eq!(
        (
            stats.challenged,
            stats.overloaded,
            stats.replied,
            stats.validated
        ),
        (3, 1, 1, 1),
        "{stats:?}"
    );
    assert_eq!(got.iter().filter(|d| Tagged.is_challenge(d)).count(), 3);
    assert_eq!(got.iter().filter(|d| d.as_slice() == b"busy").count(), 1);
}

#[test]
fn a_panicking_token_format_costs_no_reply() {
    struct Fragile;
    impl TokenFormat for Fragile {
        fn find<'a>(&self, datagram: &'a [u8]) -> Option<&'a [u8]> {
            assert!(datagram != b"boom", "a bad format");
            None
        }
        fn write(&self, _: &mut Vec<u8>, _: &[u8]) {}
    }
    for kind in KINDS {
        let server = start(kind, |s| {
            s.source_tokens(SourceTokens::new([1; 16], Fragile))
        });
        let client = GreetClient::connect(server.addr()).expect("connect");
        let raw = socket();
        util::send_to(&raw, b"boom", server.addr()).expect("send");
        assert_eq!(
            client.send_recv(b"after").expect("a reply"),
            b"Hello, after!"
        );
        // The request whose token could not be read is answered as one
        // without a token.
        assert_eq!(util::recv(&raw, &mut [0u8; 32]).expect("a reply"), 12);
        server.wait_received(2);
        let stats = server.shutdown();
        assert_eq!(
            (stats.handler_panics, stats.replied),
            (0, 2),
            "{kind:?}: {stats:?}"
        );
    }
}

#[test]
fn token_settings_are_checked_at_bind() {
    let bad = [
        SourceTokens::new([0; 16], Tagged),
        tokens().lifetime(Duration::from_millis(1500)),
        tokens().lifetime(Duration::ZERO),
        tokens().lifetime(Duration::from_nanos(1)),
        tokens().lifetime(Duration::MAX),
        tokens().rotate_every(Duration::from_millis(999)),
        tokens().validated_limit(RateLimit::new(1, 0)),
    ];
    for tokens in bad {
        let err = GreetServer::builder()
            .source_tokens(tokens.clone())
            .bind(V4)
            .expect_err("refused");
        assert!(
            matches!(err, udp_greet::Error::InvalidConfig { .. }),
            "{tokens:?}: {err}"
        );
    }
    let err = GreetServer::builder()
        .rate_limit(RateLimit::new(1, 1).slip(0, |_, _| true))
        .bind(V4)
        .expect_err("refused");
    assert!(err.to_string().contains("RateLimit::slip"), "{err}");
    let err = GreetServer::builder()
        .rate_limit(RateLimit::new(1, 1).exempt(localhost(), 33))
        .bind(V4)
        .expect_err("refused");
    assert!(err.to_string().contains("RateLimit::exempt"), "{err}");
    // The secrets stay out of Debug output.
    let shown = format!("{:?}", tokens());
    assert!(!shown.contains("[48"), "{shown}"); // b"0123..." as numbers
}

#[test]
fn dry_run_covers_the_limit_of_validated_sources() {
    for kind in KINDS {
        let tokens = tokens().validated_limit(RateLimit::new(1, 3));
        let limit = RateLimit::new(1, 3);
        let enforced = start(kind, |s| {
            s.rate_limit(limit.clone());
            s.source_tokens(tokens.clone());
        });
        let dry = start(kind, |s| {
            s.rate_limit(limit.clone().dry_run(true));
            s.source_tokens(tokens.clone());
        });
        let socket = socket();
        let with_token = Tagged::with(&tokens.token_for(localhost()), b"x");
        let started = Instant::now();
        for i in 1..=20 {
            // The same traffic to both, half of it validated.
            let request: &[u8] = if i % 2 == 0 { &with_token } else { b"x" };
            util::send_to(&socket, request, enforced.addr()).expect("send");
            util::send_to(&socket, request, dry.addr()).expect("send");
            enforced.wait_received(i);
            dry.wait_received(i);
        }
        let elapsed = started.elapsed();
        let (enforced, dry) = (enforced.shutdown(), dry.shutdown());
        assert_eq!(
            (dry.replied, dry.rate_limited, dry.validated),
            (20, 0, 10),
            "{kind:?}: {dry:?}"
        );
        // Both limits dropped some under enforcement: 7 of each 10 but
        // for a refill.
        assert!(enforced.rate_limited >= 12, "{kind:?}: {enforced:?}");
        if elapsed < Duration::from_millis(900) {
            assert_eq!(dry.dry_run_limited, enforced.rate_limited, "{kind:?}");
        } else {
            let slack = 2 * (elapsed.as_secs() + 1);
            assert!(
                dry.dry_run_limited.abs_diff(enforced.rate_limited) <= slack,
                "{kind:?}: {dry:?} against {enforced:?}"
            );
        }
    }
}

#[test]
fn an_exempt_prefix_is_counted_alike_with_a_token_or_without() {
    for validated_limit in [None, Some(RateLimit::new(1, 1))] {
        let tokens = tokens().validated_limit(validated_limit.clone());
        let server = start(Kind::Inline, |s| {
            s.rate_limit(RateLimit::new(1, 1).exempt(localhost(), 8));
            s.source_tokens(tokens.clone());
        });
        let socket = socket();
        let with_token = Tagged::with(&tokens.token_for(localhost()), b"x");
        for _ in 0..3 {
            util::send_to(&socket, &with_token, server.addr()).expect("send");
            util::send_to(&socket, b"x", server.addr()).expect("send");
        }
        server.wait_received(6);
        let stats = server.shutdown();
        assert_eq!(
            (
                stats.exempt,
                stats.validated,
                stats.replied,
                stats.rate_limited
            ),
            (6, 3, 6, 0),
            "validated limit {validated_limit:?}: {stats:?}"
        );
    }
}

#[test]
fn each_limit_a_server_takes_is_named_in_its_errors_and_useless_settings_are_refused() {
    let refused = |builder: ServerBuilder, expected: &str| {
        let err = builder.bind(V4).expect_err(expected);
        assert!(
            matches!(err, udp_greet::Error::InvalidConfig { .. })
                && err.to_string().contains(expected),
            "expected {expected}: {err}"
        );
    };
    let limited = || GreetServer::builder().rate_limit(RateLimit::new(10, 10));
    refused(
        limited().source_tokens(tokens().validated_limit(RateLimit::new(5, 0))),
        "SourceTokens::validated_limit: RateLimit::new: burst",
    );
    refused(
        GreetServer::builder().rate_limit(RateLimit::new(5, 0)),
        "ServerBuilder::rate_limit: RateLimit::new: burst",
    );
    refused(
        limited().source_tokens(tokens().challenge_limit(RateLimit::new(0, 1))),
        "SourceTokens::challenge_limit: RateLimit::new: rate",
    );
    refused(
        limited().source_tokens(tokens().previous_secret([0; 16])),
        "SourceTokens::previous_secret",
    );
    for budget in [
        RateLimit::new(1, 1).dry_run(true),
        RateLimit::new(1, 1).exempt(localhost(), 8),
        RateLimit::new(1, 1).slip(2, |_, _| true),
    ] {
        refused(
            limited().source_tokens(tokens().challenge(true).challenge_limit(budget)),
            "SourceTokens::challenge_limit: slip, exempt and dry_run do not apply",
        );
    }
    // Validated sources limited, the rest not.
    refused(
        GreetServer::builder().source_tokens(tokens().validated_limit(RateLimit::new(1, 1))),
        "SourceTokens::validated_limit: without ServerBuilder::rate_limit",
    );
    // Nothing to challenge for: no rate limit, no pool to overflow.
    refused(
        GreetServer::builder().source_tokens(tokens().challenge(true)),
        "SourceTokens::challenge: nothing would ever be challenged",
    );
    // Each of those has something to challenge for.
    for builder in [
        limited(),
        GreetServer::builder().handler_pool(HandlerPool::threads(1)),
    ] {
        let server = builder
            .source_tokens(tokens().challenge(true))
            .bind(V4)
            .expect("bind")
            .spawn(greeter)
            .expect("spawn");
        server.shutdown().expect("shutdown");
    }
}

/// A format whose code panics on what it does not expect: `find` on a
/// datagram that does not start with `T`, `is_challenge` always, `write`
/// always.
struct Fragile;

impl TokenFormat for Fragile {
    fn find<'a>(&self, datagram: &'a [u8]) -> Option<&'a [u8]> {
        assert_eq!(datagram.first(), Some(&b'T'), "no token here");
        datagram.get(1..1 + TOKEN_LEN)
    }

    fn write(&self, _datagram: &mut Vec<u8>, _token: &[u8]) {
        panic!("cannot write a token");
    }

    fn is_challenge(&self, _datagram: &[u8]) -> bool {
        panic!("cannot tell a challenge");
    }
}

/// Plays the server for two calls of a client with [`Fragile`]: the
/// first reply carries a token (so the client remembers it, and its
/// `write` panics on the next request), the second none (so `find`
/// panics). Returns the requests it received.
fn fragile_server(server: &UdpSocket) -> Vec<Vec<u8>> {
    let mut buf = [0u8; 256];
    let mut requests = Vec::new();
    for reply in [
        [&b"T"[..], &[7; TOKEN_LEN], b"one"].concat(),
        b"two".to_vec(),
    ] {
        let (n, from) = util::recv_from(server, &mut buf).expect("a request");
        requests.push(buf[..n].to_vec());
        util::send_to(server, &reply, from).expect("send");
    }
    requests
}

#[test]
fn a_panicking_token_format_on_the_client_costs_no_call() {
    for ids in [false, true] {
        let server = socket();
        let addr = server.local_addr().expect("address");
        let mut builder = GreetClient::builder()
            .source_tokens(Fragile)
            .call_timeout(HANG_GUARD);
        if ids {
            builder = builder.request_id(|_| Some(0));
        }
        let client = builder.connect(addr).expect("connect");
        let (requests, replies) = std::thread::scope(|scope| {
            let played = scope.spawn(|| fragile_server(&server));
            let replies =
                ["a", "b"].map(|name| client.send_recv(name.as_bytes()).expect("a reply"));
            (played.join().expect("the server"), replies)
        });
        // The first reply's token was found; writing it into the second
        // request panicked, and the request went without it.
        assert_eq!(requests, [b"a".to_vec(), b"b".to_vec()], "ids {ids}");
        assert_eq!(replies[0][TOKEN_LEN + 1..], *b"one", "ids {ids}");
        assert_eq!(replies[1], *b"two", "ids {ids}");
        assert_eq!(client.challenges(), 0, "ids {ids}");
    }
}

#[cfg(feature = "tokio")]
#[test]
fn a_panicking_token_format_on_the_async_client_costs_no_call() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    for ids in [false, true] {
        let server = socket();
        let addr = server.local_addr().expect("address");
        let played = std::thread::spawn(move || fragile_server(&server));
        let replies = runtime.block_on(async {
            let mut builder = udp_greet::tokio::GreetClient::builder()
                .source_tokens(Fragile)
                .call_timeout(HANG_GUARD);
            if ids {
                builder = builder.request_id(|_| Some(0));
            }
            let client = builder.connect(addr).await.expect("connect");
            let mut replies = Vec::new();
            for name in ["a", "b"] {
                replies.push(client.send_recv(name.as_bytes()).await.expect("a reply"));
            }
            replies
        });
        let requests = played.join().expect("the server");
        assert_eq!(requests, [b"a".to_vec(), b"b".to_vec()], "ids {ids}");
        assert_eq!(replies[0][TOKEN_LEN + 1..], *b"one", "ids {ids}");
        assert_eq!(replies[1], *b"two", "ids {ids}");
    }
}
