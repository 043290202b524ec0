//! The classic UDP greet server: `cargo run --example udp_server`
//!
//! Binds `127.0.0.1:9999`, prints `Bind UDP on 9999...`, and for each datagram
//! prints `Received from ADDR.` and replies `Hello, <data>!`. Runs until it is
//! interrupted (Ctrl-C).
//!
//! ```text
//! cargo run --example udp_server -- [--bind ADDR] [--workers N] [--threads N] [--busy-poll-us N] [--quiet]
//! ```

use std::io::Write;
use std::process::ExitCode;

use udp_greet::{GreetServer, HandlerPool, Request};

const USAGE: &str = "\
usage: udp_server [--bind ADDR] [--workers N] [--threads N] [--busy-poll-us N] [--quiet]

Answers each UDP datagram with `Hello, <datagram>!`.

options:
  --bind ADDR   address to listen on (default 127.0.0.1:9999; port 0 picks a free port)
  --workers N   receive with N threads (default 1)
  --threads N   run the handler on a pool of N threads (default 0: on the
                receiving threads)
  --busy-poll-us N
                after handling requests, poll for more for N microseconds
                before sleeping (latency mode; uses a core per thread meanwhile)
  --quiet       do not print a line per datagram
  --help        print this help";

struct Options {
    bind: String,
    workers: usize,
    threads: usize,
    busy_poll_us: u64,
    quiet: bool,
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Option<Options>, String> {
    let mut options = Options {
        bind: "127.0.0.1:9999".to_owned(),
        workers: 1,
        threads: 0,
        busy_poll_us: 0,
        quiet: false,
    };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--help" | "-h" => return Ok(None),
            "--quiet" | "-q" => options.quiet = true,
            "--bind" => {
                options.bind = args
                    .next()
                    .ok_or("--bind needs an address, such as 127.0.0.1:9999")?;
            }
            "--workers" => {
                options.workers = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .ok_or("--workers needs a number of threads, such as 2")?;
            }
            "--busy-poll-us" => {
                options.busy_poll_us = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .ok_or("--busy-poll-us needs a number of microseconds, such as 200")?;
            }
            "--threads" => {
                options.threads = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .ok_or("--threads needs a number of handler threads, such as 8")?;
            }
            other => return Err(format!("unexpected argument {other:?}")),
        }
    }
    Ok(Some(options))
}

fn main() -> ExitCode {
    let options = match parse(std::env::args().skip(1)) {
        Ok(Some(options)) => options,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("udp_server: {message}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("udp_server: {}", err.report());
            ExitCode::FAILURE
        }
    }
}

fn run(options: &Options) -> Result<(), udp_greet::Error> {
    let server = GreetServer::builder()
        .workers(options.workers)
        .handler_pool((options.threads > 0).then(|| HandlerPool::threads(options.threads)))
        .busy_poll(std::time::Duration::from_micros(options.busy_poll_us))
        .bind(options.bind.as_str())?;
    say(format_args!(
        "Bind UDP on {}...",
        server.local_addr().port()
    ));
    let quiet = options.quiet;
    server.serve(move |request: Request<'_>, reply: &mut Vec<u8>| {
        if !quiet {
            say(format_args!("Received from {}.", request.peer()));
        }
        udp_greet::greet(request, reply)
    })?;
    Ok(())
}

/// Prints a line; a closed standard output is not worth stopping the server for.
fn say(line: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}
