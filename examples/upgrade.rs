//! A greet server that upgrades itself in place and loses no datagram:
//! `cargo run --example upgrade`
//!
//! Each line on standard input is an upgrade: the running generation stops
//! receiving, answers what it holds, and hands its sockets (kernel queues
//! and all) to a new generation, which it `exec`s in its place: the program
//! at the path it was started from, which may have been replaced by a new
//! build meanwhile. The process keeps its id (under systemd, its unit never
//! sees it go). End of input stops the server.
//!
//! ```text
//! cargo run --example upgrade -- [--listen ADDR]...
//! ```
//!
//! Unix only.

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

#[cfg(unix)]
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

#[cfg(unix)]
mod upgrade {
    use std::io::Read;
    use std::os::fd::AsFd;
    use std::process::Command;

    use udp_greet::{GreetServer, Handoff};

    /// The generation a process is, passed on in its environment.
    const GENERATION: &str = "UDP_GREET_GENERATION";

    pub(crate) fn run(listen: &[String]) -> Result<(), Box<dyn std::error::Error>> {
        // 1. A process exec'd by the last generation takes the sockets it
        //    was handed; the first binds them, ready to hand them on.
        let builder = GreetServer::builder().allow_handoff(true);
        let (server, generation) = match Handoff::from_env()? {
            Some(handoff) => {
                let generation = std::env::var(GENERATION)
                    .ok()
                    .and_then(|g| g.parse::<u64>().ok())
                    .unwrap_or(2);
                (builder.from_handoff(handoff)?, generation)
            }
            None => (builder.bind_all(listen)?, 1),
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
        //    Read a byte at a time, so that no line read ahead is lost to
        //    the next program.
        let mut input = std::fs::File::from(std::io::stdin().as_fd().try_clone_to_owned()?);
        while read_line(&mut input)? {
            // 3. Stop receiving, answer what is in hand, take the sockets.
            //    What arrives from now on waits in their kernel queues.
            let handoff = running.handoff()?;
            report(generation, handoff.stats());
            // 4. Replace this process with the program it was started from
            //    (a new build, if the file was replaced), with the sockets.
            let program = std::env::args_os().next().unwrap_or_default();
            let mut next = Command::new(program);
            next.args(std::env::args_os().skip(1))
                .env(GENERATION, (generation + 1).to_string());
            let err = handoff.exec(&mut next);
            // 5. The new program did not start: serve on here, with the
            //    same sockets, so that nothing is lost either way.
            eprintln!("upgrade failed, generation {generation} serves on: {err}");
            running = GreetServer::builder()
                .allow_handoff(true)
                .from_handoff(handoff)?
                .spawn(udp_greet::greet)?;
        }
        report(generation, running.shutdown()?);
        Ok(())
    }

    /// Reads up to the end of a line; `false` at the end of input.
    fn read_line(input: &mut std::fs::File) -> std::io::Result<bool> {
        let mut byte = [0u8; 1];
        loop {
            match input.read(&mut byte) {
                Ok(0) => return Ok(false),
                Ok(_) if byte[0] == b'\n' => return Ok(true),
                Ok(_) => {}
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
    }

    fn report(generation: u64, stats: udp_greet::Stats) {
        println!(
            "generation {generation}: received {}, replied {}",
            stats.received, stats.replied
        );
    }
}

#[cfg(not(unix))]
fn main() -> ExitCode {
    let _ = usage_error;
    eprintln!("the upgrade example needs Unix:\n\n{USAGE}");
    ExitCode::FAILURE
}
