//! The AF_XDP engine (feature `xdp`) against the socket engine, on a veth
//! pair between two network namespaces that the bench makes (and that
//! vanish with it), with the same load generator, in interleaved rounds.
//!
//! `cargo bench --features xdp --bench xdp` measures (as root); without
//! `--bench` (as under `cargo test --all-features`) it makes a short smoke
//! pass, and says why it measured nothing when it cannot (not root, no
//! XDP under an emulator).
//!
//! The server is udp-greet's blocking server with the greet handler,
//! batched (the socket engine, its defaults) or with `xdp` on `xs0`
//! (native mode on veth); its threads run on CPU 1. The generator, in the
//! other namespace, runs on CPU 0 and sends requests of 16 bytes from 4
//! sockets (batched). It learns of replies in two ways, each measured and
//! reported on its own:
//!
//! - received on its sockets: the client's whole UDP receive path, which
//!   veth runs on the CPU that sent the reply, so in the server's threads,
//!   for either engine alike;
//! - counted and dropped by an XDP program on the client's side of the
//!   pair (as kxdpgun, Knot's XDP load generator, takes its replies): what
//!   the server's threads pay for the client is then next to nothing, and
//!   the generator is cheap enough not to be the limit at saturation.
//!
//! Each round measures both servers, one after the other; the XDP server
//! is attached for its turn only, so that the socket engine runs on an
//! interface without a program. Reported per server:
//!
//! - at a steady 80 000 requests/s (open loop, paced every millisecond,
//!   the rate of the measurements that motivated the engine): CPU per
//!   reply in the server's threads (scheduler time), and for the whole
//!   machine (every CPU's busy time from `/proc/stat`, softirq included:
//!   on veth the kernel charges part of the XDP work to the sending CPU,
//!   and the generator is in it too);
//! - closed loop, 4 sockets x 32 requests in flight: replies/s and the
//!   same two CPU figures;
//! - replies/s at saturation: 16 sockets x 64 in flight.
//!
//! The ratios are medians over rounds of each round's XDP / socket ratio.

#[cfg(all(target_os = "linux", feature = "xdp"))]
mod common;
#[cfg(all(target_os = "linux", feature = "xdp"))]
#[path = "../tests/util/netns.rs"]
mod netns;
// The crate's own `bpf()` calls, for the reply counter's program.
#[cfg(all(target_os = "linux", feature = "xdp"))]
#[allow(dead_code, unreachable_pub)]
#[path = "../src/sys/linux/xdp/bpf.rs"]
mod bpf;

#[cfg(not(all(target_os = "linux", feature = "xdp")))]
fn main() {
    println!("xdp: this bench needs Linux and the `xdp` feature; nothing measured");
}

#[cfg(all(target_os = "linux", feature = "xdp"))]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    bench::main()
}

#[cfg(all(target_os = "linux", feature = "xdp"))]
mod bench {
    use std::net::{IpAddr, SocketAddr, UdpSocket};
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::sync::Arc;
    use std::time::Duration;

    use udp_greet::xdp::Xdp;
    use udp_greet::{GreetServer, ServerBuilder, ServerHandle};

    use crate::bpf::{self, Insn, XdpMode};
    use crate::common::linux::{Generator, MachineClock, cpu_time, pin_to_cpu, with_new_threads};
    use crate::common::{Table, median};
    use crate::netns::{CLIENT_V4, Pair, SERVER_V4, pair};

    const REQUEST: &[u8] = b"0123456789abcdef"; // 16 bytes

    struct Plan {
        rounds: usize,
        span: Duration,
    }

    /// One server's figures in one round.
    #[derive(Debug, Clone, Copy, Default)]
    struct Figures {
        paced_server_cpu: f64,
        paced_machine_cpu: f64,
        replies_per_sec: f64,
        server_cpu: f64,
        machine_cpu: f64,
        saturated: f64,
    }

    /// The steady rate of the paced measurement.
    const PACED_RATE: u64 = 80_000;

    /// A server, started in the server's namespace on CPU 1, and its
    /// threads.
    fn start(pair: &Pair, builder: ServerBuilder) -> Result<(ServerHandle, Vec<u32>), String> {
        pair.server.run(move || {
            pin_to_cpu(1).map_err(|e| format!("pinning to CPU 1: {e}"))?;
            with_new_threads(|| {
                builder
                    .bind(SocketAddr::new(SERVER_V4.into(), 0))?
                    .spawn(udp_greet::greet)
            })
            .map_err(|e| e.report())
        })
    }

    /// The two ways the generator learns of replies.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Receiver {
        /// Received on its UDP sockets: the kernel's whole receive path,
        /// which veth runs on the CPU that sent the reply (the server's).
        Sockets,
        /// Counted and dropped by an XDP program on the client's side of
        /// the pair, as kxdpgun (Knot's XDP load generator) takes them: the
        /// client's receive costs the server's CPU next to nothing.
        Xdp,
    }

    /// An XDP program on `xc0` (native mode) that counts, in an array map,
    /// and drops every UDP datagram over IPv4 that reaches the client's
    /// side; everything else (ARP) passes. Attached while it lives.
    struct ReplyCounter {
        map: Arc<OwnedFd>,
        _link: OwnedFd,
    }

    /// The counter's program, for the 8-byte count in slot 0 of `map`.
    fn counting_program(map: &OwnedFd) -> Vec<Insn> {
        let op = |code: u8, dst: u8, src: u8, off: i16, imm: i32| Insn {
            code,
            regs: (src << 4) | dst,
            off,
            imm,
        };
        let ipv4 = i32::from(u16::from_ne_bytes(0x0800u16.to_be_bytes()));
        vec![
            op(0x61, 2, 1, 0, 0),               // r2 = ctx->data
            op(0x61, 3, 1, 4, 0),               // r3 = ctx->data_end
            op(0xbf, 4, 2, 0, 0),               // r4 = r2
            op(0x07, 4, 0, 0, 24),              // r4 += 24 (through IPv4's protocol)
            op(0x2d, 4, 3, 15, 0),              // if r4 > r3 goto pass
            op(0x69, 5, 2, 12, 0),              // r5 = ethertype
            op(0x55, 5, 0, 13, ipv4),           // if r5 != IPv4 goto pass
            op(0x71, 5, 2, 23, 0),              // r5 = protocol
            op(0x55, 5, 0, 11, 17),             // if r5 != UDP goto pass
            op(0x62, 10, 0, -4, 0),             // *(u32 *)(r10 - 4) = 0: the key
            op(0xbf, 2, 10, 0, 0),              // r2 = r10
            op(0x07, 2, 0, 0, -4),              // r2 -= 4
            op(0x18, 1, 1, 0, map.as_raw_fd()), // r1 = the map
            op(0, 0, 0, 0, 0),
            op(0x85, 0, 0, 0, 1), // r0 = bpf_map_lookup_elem(r1, r2)
            op(0x15, 0, 0, 2, 0), // if r0 == 0 goto drop
            op(0xb7, 1, 0, 0, 1), // r1 = 1
            op(0xdb, 0, 1, 0, 0), // lock *(u64 *)(r0 + 0) += r1
            op(0xb7, 0, 0, 0, 1), // drop: r0 = XDP_DROP
            op(0x95, 0, 0, 0, 0), // exit
            op(0xb7, 0, 0, 0, 2), // pass: r0 = XDP_PASS
            op(0x95, 0, 0, 0, 0), // exit
        ]
    }

    impl ReplyCounter {
        /// Attaches the counter to `xc0`, in the client's namespace.
        fn attach(pair: &Pair) -> Result<ReplyCounter, String> {
            pair.client.run(|| {
                let map = bpf::array_u64(1, "greet_replies")
                    .map_err(|e| format!("the reply counter's map: {e}"))?;
                let prog = bpf::load_xdp(&counting_program(&map), "greet_count", c"MIT")
                    .map_err(|(e, log)| format!("the reply counter's program: {e}\n{log}"))?;
                let ifindex = bpf::ifindex("xc0").map_err(|e| format!("xc0: {e}"))?;
                let link = bpf::attach_xdp(&prog, ifindex, XdpMode::Native)
                    .map_err(|e| format!("attaching the reply counter to xc0: {e}"))?;
                Ok(ReplyCounter {
                    map: Arc::new(map),
                    _link: link,
                })
            })
        }

        /// The running count, for the generator.
        fn total(&self) -> Box<dyn FnMut() -> u64 + Send> {
            let map = Arc::clone(&self.map);
            let mut last = 0;
            Box::new(move || {
                // A lookup of slot 0 of a live array map does not fail; if
                // it did, the count would stand still.
                last = bpf::array_u64_get(&map, 0).unwrap_or(last);
                last
            })
        }
    }

    /// A generator in the client's namespace.
    fn generator(
        pair: &Pair,
        server: SocketAddr,
        sockets: usize,
        window: usize,
        counter: Option<&ReplyCounter>,
    ) -> Result<Generator, String> {
        let made = pair.client.run(move || -> std::io::Result<Vec<UdpSocket>> {
            (0..sockets)
                .map(|_| {
                    let socket = UdpSocket::bind(SocketAddr::new(IpAddr::V4(CLIENT_V4), 0))?;
                    socket.connect(server)?;
                    Ok(socket)
                })
                .collect()
        });
        let generator = made
            .and_then(|sockets| Generator::from_sockets(sockets, window, REQUEST))
            .map_err(|e| format!("the generator: {e}"))?;
        Ok(match counter {
            Some(counter) => generator.counting_replies(counter.total()),
            None => generator,
        })
    }

    /// Runs the load against one server, on this thread (CPU 0).
    fn measure(
        pair: &Pair,
        server: SocketAddr,
        tids: &[u32],
        span: Duration,
        receiver: Receiver,
    ) -> Result<Figures, String> {
        let counter = match receiver {
            Receiver::Sockets => None,
            Receiver::Xdp => Some(ReplyCounter::attach(pair)?),
        };
        let mut steady = generator(pair, server, 4, 32, counter.as_ref())?;
        let mut saturating = generator(pair, server, 16, 64, counter.as_ref())?;
        // A short warm-up: neighbours resolved, rings and caches filled.
        steady.run(Duration::from_millis(20), u64::MAX);
        let (cpu, busy) = (cpu_time(tids), MachineClock::now());
        let paced = steady.run_paced(span, PACED_RATE);
        let (paced_cpu, paced_busy) = (cpu_time(tids).saturating_sub(cpu), busy.busy_since());
        let paced_replies = paced.received.max(1) as f64;
        let (cpu, busy) = (cpu_time(tids), MachineClock::now());
        let load = steady.run(span, u64::MAX);
        let (cpu, busy) = (cpu_time(tids).saturating_sub(cpu), busy.busy_since());
        let replies = load.received.max(1) as f64;
        let saturated = saturating.run(span, u64::MAX);
        Ok(Figures {
            paced_server_cpu: paced_cpu.as_secs_f64() / paced_replies,
            paced_machine_cpu: paced_busy.as_secs_f64() / paced_replies,
            replies_per_sec: load.received as f64 / load.elapsed.as_secs_f64(),
            server_cpu: cpu.as_secs_f64() / replies,
            machine_cpu: busy.as_secs_f64() / replies,
            saturated: saturated.received as f64 / saturated.elapsed.as_secs_f64(),
        })
    }

    pub fn main() -> Result<(), Box<dyn std::error::Error>> {
        let full = std::env::args().any(|a| a == "--bench");
        let plan = match full {
            true => Plan {
                rounds: 7,
                span: Duration::from_millis(1000),
            },
            false => Plan {
                rounds: 1,
                span: Duration::from_millis(20),
            },
        };
        // SAFETY: `geteuid` takes nothing and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            println!("xdp: needs root (network namespaces, BPF, AF_XDP); nothing measured");
            return Ok(());
        }
        // A panic on the way (a namespace job that never came back) is an
        // error like the others.
        let ran = std::panic::catch_unwind(|| run(&plan)).unwrap_or_else(|panic| {
            Err(panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "a panic".to_owned()))
        });
        match ran {
            Ok(()) => Ok(()),
            // A smoke pass where XDP cannot work (an emulator without the
            // bpf() system call) says so; a measurement fails.
            Err(why) if !full => {
                println!("xdp: smoke pass skipped: {why}");
                Ok(())
            }
            Err(why) => Err(why.into()),
        }
    }

    fn run(plan: &Plan) -> Result<(), String> {
        let pair = pair();
        pin_to_cpu(0).map_err(|e| format!("pinning to CPU 0: {e}"))?;
        let (socket_server, socket_tids) = start(&pair, GreetServer::builder())?;
        let socket_addr = socket_server.local_addr();
        const RECEIVERS: [Receiver; 2] = [Receiver::Sockets, Receiver::Xdp];
        let mut rounds: [Vec<(Figures, Figures)>; 2] = [Vec::new(), Vec::new()];
        let mut mode = None;
        for _ in 0..plan.rounds {
            let mut socket = [Figures::default(); 2];
            for (i, receiver) in RECEIVERS.into_iter().enumerate() {
                socket[i] = measure(&pair, socket_addr, &socket_tids, plan.span, receiver)?;
            }
            let (xdp_server, xdp_tids) =
                start(&pair, GreetServer::builder().xdp(Xdp::interface("xs0")))?;
            mode = xdp_server.xdp_mode();
            for (i, receiver) in RECEIVERS.into_iter().enumerate() {
                let xdp = measure(
                    &pair,
                    xdp_server.local_addr(),
                    &xdp_tids,
                    plan.span,
                    receiver,
                )?;
                rounds[i].push((socket[i], xdp));
            }
            let stats = xdp_server.shutdown().map_err(|e| e.report())?;
            if stats.received != stats.accounted() || stats.malformed != 0 {
                return Err(format!("the XDP server's counters: {stats:?}"));
            }
        }
        socket_server.shutdown().map_err(|e| e.report())?;
        for (receiver, rounds) in RECEIVERS.into_iter().zip(&rounds) {
            report(plan, rounds, mode, receiver);
        }
        Ok(())
    }

    fn report(
        plan: &Plan,
        rounds: &[(Figures, Figures)],
        mode: Option<udp_greet::xdp::XdpMode>,
        receiver: Receiver,
    ) {
        let mode = mode.map_or("?".to_owned(), |m| m.to_string());
        let replies = match receiver {
            Receiver::Sockets => "replies received on its sockets",
            Receiver::Xdp => "replies counted and dropped by XDP on its side",
        };
        println!(
            "\nxdp: socket engine vs AF_XDP engine ({mode} mode) on a veth pair between two namespaces; \
             {} round(s) x {:?} per server; server threads on CPU 1, generator on CPU 0 ({replies}){}",
            plan.rounds,
            plan.span,
            if plan.rounds == 1 {
                " (smoke pass: run `cargo bench --features xdp --bench xdp` to measure)"
            } else {
                ""
            }
        );
        let avg = |pick: &dyn Fn(&(Figures, Figures)) -> f64| {
            rounds.iter().map(pick).sum::<f64>() / rounds.len().max(1) as f64
        };
        let ratio = |pick: &dyn Fn(&Figures) -> f64| {
            let mut ratios: Vec<f64> = rounds.iter().map(|(s, x)| pick(x) / pick(s)).collect();
            median(&mut ratios)
        };
        let mut table = Table::new(&[
            "server",
            "80k/s: server CPU/reply",
            "machine CPU/reply",
            "closed loop: replies/s",
            "server CPU/reply",
            "machine CPU/reply",
            "replies/s saturated",
        ]);
        for (name, pick) in [
            (
                "socket engine (batched)",
                &(|r: &(Figures, Figures)| r.0) as &dyn Fn(&(Figures, Figures)) -> Figures,
            ),
            ("AF_XDP engine", &|r: &(Figures, Figures)| r.1),
        ] {
            table.row(&[
                name.to_owned(),
                format!("{:.2}us", avg(&|r| pick(r).paced_server_cpu) * 1e6),
                format!("{:.2}us", avg(&|r| pick(r).paced_machine_cpu) * 1e6),
                format!("{:.0}", avg(&|r| pick(r).replies_per_sec)),
                format!("{:.2}us", avg(&|r| pick(r).server_cpu) * 1e6),
                format!("{:.2}us", avg(&|r| pick(r).machine_cpu) * 1e6),
                format!("{:.0}", avg(&|r| pick(r).saturated)),
            ]);
        }
        table.print();
        println!(
            "AF_XDP vs socket (medians of per-round ratios): at 80k/s server CPU/reply {:.2} \
             (target <= 0.6), machine CPU/reply {:.2} (target <= 0.8); replies/s saturated {:.2} \
             (target >= 1.3); closed loop: server CPU/reply {:.2}, machine CPU/reply {:.2}, \
             replies/s {:.2}",
            ratio(&|f| f.paced_server_cpu),
            ratio(&|f| f.paced_machine_cpu),
            ratio(&|f| f.saturated),
            ratio(&|f| f.server_cpu),
            ratio(&|f| f.machine_cpu),
            ratio(&|f| f.replies_per_sec),
        );
    }
}
