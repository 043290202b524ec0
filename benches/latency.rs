//! Round-trip latency with one request in flight: udp-greet with busy
//! polling on both sides, and with it off, against hand-written pairs: a
//! blocking `std::net` server and client, and a `recvmmsg`/`sendmmsg`
//! server that polls for 200 us after each batch with a client that polls
//! for 200 us after each send.
//!
//! `cargo bench --bench latency` runs the full measurement; without
//! `--bench` (as under `cargo test`) it makes a short smoke pass.
//!
//! The servers' threads are pinned to CPU 1 and the client (this thread) to
//! CPU 0. Rounds visit the cases in turn, a fixed number of round trips
//! each; the percentiles are over every round trip of a case, the rate and
//! CPU per round trip medians over rounds. CPU per round trip adds the
//! server threads' and the client thread's scheduler time.

#[cfg(target_os = "linux")]
mod common;

#[cfg(not(target_os = "linux"))]
fn main() {
    println!("latency: this bench needs Linux (CPU pinning, schedstat); nothing measured");
}

#[cfg(target_os = "linux")]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    bench::main()
}

#[cfg(target_os = "linux")]
mod bench {
    use std::io;
    use std::net::{SocketAddr, UdpSocket};
    use std::thread;
    use std::time::{Duration, Instant};

    use udp_greet::{GreetClient, GreetServer};

    use crate::common::linux::{cpu_time, mmsg_greet_loop_polling, pin_to_cpu, with_new_threads};
    use crate::common::{HandServer, Table, median, percentile};

    const WINDOW: Duration = Duration::from_micros(200);
    const REQUEST: &[u8] = b"0123456789abcdef";

    /// This thread's id, from `/proc/thread-self`.
    fn own_tid() -> Vec<u32> {
        std::fs::read_link("/proc/thread-self")
            .ok()
            .and_then(|p| p.file_name()?.to_str()?.parse().ok())
            .into_iter()
            .collect()
    }

    /// Receives into `buf` without waiting (`MSG_DONTWAIT`).
    fn recv_dont_wait(socket: &socket2::Socket, buf: &mut [u8]) -> io::Result<usize> {
        // The bytes socket2 writes are initialised; `recv` wants the
        // possibly-uninitialised view, which `MaybeUninitSlice` gives safely
        // through the vectored call.
        socket
            .recv_vectored_with_flags(
                &mut [socket2::MaybeUninitSlice::new(as_uninit(buf))],
                libc::MSG_DONTWAIT,
            )
            .map(|(n, _)| n)
    }

    fn as_uninit(buf: &mut [u8]) -> &mut [std::mem::MaybeUninit<u8>] {
        let len = buf.len();
        let ptr = buf.as_mut_ptr().cast::<std::mem::MaybeUninit<u8>>();
        // SAFETY: `MaybeUninit<u8>` has the layout of `u8`, the slice comes
        // from a live `&mut [u8]` whose borrow the result keeps, and socket2
        // only ever writes initialised bytes through it.
        unsafe { std::slice::from_raw_parts_mut(ptr, len) }
    }

    /// The hand-written servers: a blocking `recv_from`/`send_to` loop
    /// without `poll`; with it, a `recvmmsg`/`sendmmsg` loop that polls for
    /// `poll` after each batch (the hand-written polling server).
    fn hand_server(poll: Option<Duration>) -> io::Result<HandServer> {
        match poll {
            None => HandServer::std_loop(),
            Some(_) => {
                HandServer::start(move |socket, stop| mmsg_greet_loop_polling(socket, stop, poll))
            }
        }
    }

    /// One request and its reply, on a connected socket: blocking, or
    /// polling for `poll` after the send before it blocks.
    fn hand_exchange(socket: &socket2::Socket, poll: Option<Duration>, buf: &mut [u8]) -> bool {
        if crate::common::again(|| socket.send(REQUEST)).is_err() {
            return false;
        }
        if let Some(poll) = poll {
            let until = Instant::now() + poll;
            while Instant::now() < until {
                if recv_dont_wait(socket, buf).is_ok() {
                    return true;
                }
                std::hint::spin_loop();
            }
        }
        crate::common::again(|| {
            socket.recv_vectored(&mut [socket2::MaybeUninitSlice::new(as_uninit(buf))])
        })
        .is_ok()
    }

    enum Client {
        Hand(socket2::Socket, Option<Duration>),
        Greet(Box<GreetClient>),
    }

    struct Case {
        name: &'static str,
        client: Client,
        server_tids: Vec<u32>,
        rtts: Vec<Duration>,
        rates: Vec<f64>,
        cpu: Vec<f64>,
    }

    fn hand_client(addr: SocketAddr, poll: Option<Duration>) -> io::Result<Client> {
        let socket = UdpSocket::bind("127.0.0.1:0")?;
        socket.connect(addr)?;
        socket.set_read_timeout(Some(Duration::from_secs(1)))?;
        Ok(Client::Hand(socket2::Socket::from(socket), poll))
    }

    pub fn main() -> Result<(), Box<dyn std::error::Error>> {
        let full = std::env::args().any(|a| a == "--bench");
        let (rounds, per_round) = if full { (11, 2_000) } else { (1, 20) };
        let pinned = thread::available_parallelism().map_or(1, |n| n.get()) >= 2;
        if pinned {
            pin_to_cpu(1)?;
        }
        let (std_server, std_tids) = with_new_threads(|| hand_server(None))?;
        let (poll_server, poll_tids) = with_new_threads(|| hand_server(Some(WINDOW)))?;
        let (greet_off, off_tids) =
            with_new_threads(|| GreetServer::bind("127.0.0.1:0")?.spawn(udp_greet::greet))?;
        let (greet_on, on_tids) = with_new_threads(|| {
            GreetServer::builder()
                .busy_poll(WINDOW)
                .bind("127.0.0.1:0")?
                .spawn(udp_greet::greet)
        })?;
        if pinned {
            pin_to_cpu(0)?;
        }
        let client_tid = own_tid();
        let mut cases = [
            Case {
                name: "std pair, blocking",
                client: hand_client(std_server.addr, None)?,
                server_tids: std_tids,
                rtts: Vec::new(),
                rates: Vec::new(),
                cpu: Vec::new(),
            },
            Case {
                name: "hand-written pair, polling 200us (recvmmsg server)",
                client: hand_client(poll_server.addr, Some(WINDOW))?,
                server_tids: poll_tids,
                rtts: Vec::new(),
                rates: Vec::new(),
                cpu: Vec::new(),
            },
            Case {
                name: "udp-greet, polling off",
                client: Client::Greet(Box::new(GreetClient::connect(greet_off.local_addr())?)),
                server_tids: off_tids,
                rtts: Vec::new(),
                rates: Vec::new(),
                cpu: Vec::new(),
            },
            Case {
                name: "udp-greet, polling 200us both sides",
                client: Client::Greet(Box::new(
                    GreetClient::builder()
                        .busy_poll(WINDOW)
                        .connect(greet_on.local_addr())?,
                )),
                server_tids: on_tids,
                rtts: Vec::new(),
                rates: Vec::new(),
                cpu: Vec::new(),
            },
        ];
        let mut buf = [0u8; 64];
        for _ in 0..rounds {
            for case in cases.iter_mut() {
                let mut tids = case.server_tids.clone();
                tids.extend(&client_tid);
                let cpu_before = cpu_time(&tids);
                let started = Instant::now();
                for _ in 0..per_round {
                    let t = Instant::now();
                    let ok = match &case.client {
                        Client::Hand(socket, poll) => hand_exchange(socket, *poll, &mut buf),
                        Client::Greet(client) => client.send_recv_into(REQUEST, &mut buf).is_ok(),
                    };
                    if ok {
                        case.rtts.push(t.elapsed());
                    }
                }
                let elapsed = started.elapsed();
                let cpu = cpu_time(&tids).saturating_sub(cpu_before);
                case.rates.push(per_round as f64 / elapsed.as_secs_f64());
                case.cpu.push(cpu.as_secs_f64() / per_round as f64);
            }
        }
        println!(
            "latency: one request of {} bytes in flight; {rounds} round(s) x {per_round} round trips per case; {}{}",
            REQUEST.len(),
            if pinned {
                "servers on CPU 1, client on CPU 0"
            } else {
                "one CPU: nothing pinned"
            },
            if full {
                ""
            } else {
                " (smoke pass: run `cargo bench --bench latency` to measure)"
            }
        );
        let p50s: Vec<Duration> = cases
            .iter_mut()
            .map(|c| percentile(&mut c.rtts, 50.0))
            .collect();
        let mut table = Table::new(&[
            "case",
            "p50",
            "p99",
            "round trips/s",
            "CPU/round trip",
            "p50 vs std pair",
            "p50 vs polling pair",
        ]);
        for (case, p50) in cases.iter_mut().zip(&p50s) {
            table.row(&[
                case.name.to_owned(),
                format!("{:.1}us", p50.as_secs_f64() * 1e6),
                format!(
                    "{:.1}us",
                    percentile(&mut case.rtts, 99.0).as_secs_f64() * 1e6
                ),
                format!("{:.0}", median(&mut case.rates)),
                format!("{:.1}us", median(&mut case.cpu) * 1e6),
                format!("{:.2}", p50.as_secs_f64() / p50s[0].as_secs_f64()),
                format!("{:.2}", p50.as_secs_f64() / p50s[1].as_secs_f64()),
            ]);
        }
        table.print();
        drop(std_server);
        drop(poll_server);
        for server in [greet_off, greet_on] {
            let stats = server.shutdown()?;
            assert_eq!(stats.received, stats.accounted(), "{stats:?}");
        }
        Ok(())
    }
}
