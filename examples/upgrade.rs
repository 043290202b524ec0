//! A greet server that upgrades itself in place and loses no datagram:
//! `cargo run --example upgrade --features systemd`
//!
//! Each line on standard input is an upgrade: the running generation stops
//! receiving, answers what it holds, and hands its sockets (kernel queues
//! and all) to a new generation, which it `exec`s in its place: the program
//! at the path it was started from, which may have been replaced by a new
//! build meanwhile. The process keeps its id (under systemd, its unit never
//! sees it go). End of input stops the server.
//!
//! ```text
//! cargo run --example upgrade --features systemd -- [--listen ADDR]...
//! ```
//!
//! Unix only (feature `systemd`, for the sockets the new generation takes
//! as socket activation passes them).

use std::process::ExitCode;

const USAGE: &str = "\
usage: upgrade [--listen ADDR]...

Answers each UDP datagram with `Hello, <datagram>!`; each line read on
standard input upgrades the server in place, losing nothing; end of input
stops it.

options:
  --listen ADDR  address to listen on, more than once for several
                 (default 127.0.0.1:9999; port 0 picks a free port);
                 ignored by the generations after the first, which serve
                 the sockets handed to them
  --help         print this help

It prints `generation N (pid P) serving on ADDR...` when a generation
starts, and `generation N: received R, replied A` when it ends.";

#[cfg(all(unix, feature = "systemd"))]
fn main() -> ExitCode {
    let mut listen = Vec::new();
    let mut parser = lexopt::Parser::from_env();
    loop {
        use lexopt::prelude::*;
        match parser.next() {
            Ok(None) => break,
            Ok(Some(Long("listen"))) => match parser.value().map(|v| v.string()) {
                Ok(Ok(addr)) => listen.push(addr),
                _ => return usage_error("--listen takes an address, such as 127.0.0.1:9999"),
            },
            Ok(Some(Short('h') | Long("help"))) => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            Ok(Some(arg)) => return usage_error(&arg.unexpected().to_string()),
            Err(err) => return usage_error(&err.to_string()),
        }
    }
    if listen.is_empty() {
        listen.push("127.0.0.1:9999".to_owned());
    }
    match upgrade::run(&listen) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

fn usage_error(message: &str) -> ExitCode {
    eprintln!("error: {message}\n\n{USAGE}");
    ExitCode::from(2)
}

#[cfg(all(unix, feature = "systemd"))]
mod upgrade {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    use std::process::Command;

    use udp_greet::systemd::Activated;
    use udp_greet::{GreetServer, HANDOFF_FD_NAME, Handoff};

    /// The generation a process is, passed on in its environment.
    const GENERATION: &str = "UDP_GREET_GENERATION";

    pub(crate) fn run(listen: &[String]) -> Result<(), Box<dyn std::error::Error>> {
        // 1. The first generation binds, ready to hand its sockets on; the
        //    others take the sockets the last one passed.
        let generation: u64 = std::env::var(GENERATION)
            .ok()
            .and_then(|g| g.parse().ok())
            .unwrap_or(1);
        let builder = GreetServer::builder().allow_handoff(true);
        let server = if generation == 1 {
            builder.bind_all(listen)?
        } else {
            let sockets = Activated::take()?.take_udp(Some(HANDOFF_FD_NAME));
            builder.from_handoff(Handoff::from_sockets(sockets)?)?
        };
        let addrs: Vec<String> = server
            .local_addrs()
            .iter()
            .map(ToString::to_string)
            .collect();
        println!(
            "generation {generation} (pid {}) serving on {}...",
            std::process::id(),
            addrs.join(", ")
        );
        let mut running = server.spawn(udp_greet::greet)?;

        // 2. Each line of input is an upgrade; the end of input, a stop.
        for line in std::io::stdin().lock().lines() {
            line?;
            // 3. Stop receiving, answer what is in hand, take the sockets.
            //    What arrives from now on waits in their kernel queues.
            let handoff = running.handoff()?;
            report(generation, handoff.stats());
            // 4. Replace this process with the program, passing the sockets
            //    as socket activation does. `exec` returns only on failure.
            let program = std::env::args_os().next().unwrap_or_default();
            let mut next = Command::new(program);
            next.args(std::env::args_os().skip(1))
                .env(GENERATION, (generation + 1).to_string());
            handoff.pass_on_exec(&mut next);
            let err = next.exec();
            // 5. The new program did not start: serve on here, with the
            //    same sockets, so that nothing is lost either way.
            eprintln!("upgrade failed, generation {generation} serves on: {err}");
            running = GreetServer::builder()
                .from_handoff(handoff)?
                .spawn(udp_greet::greet)?;
        }
        report(generation, running.shutdown()?);
        Ok(())
    }

    fn report(generation: u64, stats: udp_greet::Stats) {
        println!(
            "generation {generation}: received {}, replied {}",
            stats.received, stats.replied
        );
    }
}

#[cfg(not(all(unix, feature = "systemd")))]
fn main() -> ExitCode {
    let _ = usage_error;
    eprintln!("the upgrade example needs Unix and the `systemd` feature:\n\n{USAGE}");
    ExitCode::FAILURE
}
