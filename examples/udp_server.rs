//! The classic UDP greet server: `cargo run --example udp_server`
//!
//! Binds `127.0.0.1:9999`, prints `Bind UDP on 9999...`, and for each datagram
//! prints `Received from ADDR.` and replies `Hello, <data>!`. Runs until it is
//! interrupted (Ctrl-C).
//!
//! ```text
//! cargo run --example udp_server -- [--listen ADDR]... [--workers N] [--threads N] [--busy-poll-us N] [--quiet]
//! ```

use std::io::Write;
use std::process::ExitCode;

use udp_greet::{GreetServer, HandlerPool, Request};

const USAGE: &str = "\
usage: udp_server [--listen ADDR]... [--workers N] [--threads N] [--busy-poll-us N] [--quiet]

Answers each UDP datagram with `Hello, <datagram>!`.

options:
  --listen ADDR address to listen on; give it again to listen on several
                (IPv4 and IPv6, other ports) with one server (default
                127.0.0.1:9999; port 0 picks a free port). --bind is the
                same option
  --workers N   receive with N threads on each address (default 1)
  --threads N   run the handler on a pool of N threads (default 0: on the
                receiving threads)
  --busy-poll-us N
                after handling requests, poll for more for N microseconds
                before sleeping (latency mode; uses a core per thread meanwhile)
  --activated[=NAME]
                serve the UDP sockets the service manager passed (systemd
                socket activation; those named NAME only), instead of
                --listen; with the `systemd` feature
  --quiet       do not print a line per datagram
  --help        print this help

It prints `Bind UDP on PORT...` for each address, in the order given.";

struct Options {
    listen: Vec<String>,
    /// Serve the activated sockets (`Some(None)`: all of them).
    activated: Option<Option<String>>,
    workers: usize,
    threads: usize,
    busy_poll_us: u64,
    quiet: bool,
}

/// The options on the command line; `None` when help was asked for.
fn parse(args: impl IntoIterator<Item = std::ffi::OsString>) -> Result<Option<Options>, String> {
    use lexopt::prelude::*;

    let mut options = Options {
        listen: Vec::new(),
        activated: None,
        workers: 1,
        threads: 0,
        busy_poll_us: 0,
        quiet: false,
    };
    let mut parser = lexopt::Parser::from_args(args);
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        match arg {
            Short('h') | Long("help") => return Ok(None),
            Short('q') | Long("quiet") => options.quiet = true,
            Long("listen" | "bind") => {
                let addr = parser
                    .value()
                    .map_err(|e| format!("{e}: an address, such as 127.0.0.1:9999"))?;
                options
                    .listen
                    .push(addr.string().map_err(|e| e.to_string())?);
            }
            Long("activated") => {
                let name = parser.optional_value().map(|n| n.string()).transpose();
                options.activated = Some(name.map_err(|e| e.to_string())?);
            }
            Long("workers") => {
                options.workers = number(&mut parser, "a number of threads, such as 2")?;
            }
            Long("threads") => {
                options.threads = number(&mut parser, "a number of handler threads, such as 8")?;
            }
            Long("busy-poll-us") => {
                options.busy_poll_us =
                    number(&mut parser, "a number of microseconds, such as 200")?;
            }
            other => return Err(other.unexpected().to_string()),
        }
    }
    if options.activated.is_some() && !options.listen.is_empty() {
        return Err("--activated serves the sockets passed in: leave out --listen".to_owned());
    }
    if options.listen.is_empty() {
        options.listen.push("127.0.0.1:9999".to_owned());
    }
    Ok(Some(options))
}

/// The value of the option just read, as a number: `what` says what it
/// should be.
fn number<T: std::str::FromStr>(parser: &mut lexopt::Parser, what: &str) -> Result<T, String> {
    let value = parser.value().map_err(|e| format!("{e}: {what}"))?;
    let text = value.to_string_lossy();
    text.parse().map_err(|_| format!("{text:?} is not {what}"))
}

fn main() -> ExitCode {
    let options = match parse(std::env::args_os().skip(1)) {
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
    let builder = GreetServer::builder()
        .workers(options.workers)
        .handler_pool((options.threads > 0).then(|| HandlerPool::threads(options.threads)))
        .busy_poll(std::time::Duration::from_micros(options.busy_poll_us));
    let server = match &options.activated {
        Some(name) => activated(builder, name.as_deref())?,
        None => builder.bind_all(options.listen.iter().map(String::as_str))?,
    };
    for addr in server.local_addrs() {
        say(format_args!("Bind UDP on {}...", addr.port()));
    }
    let quiet = options.quiet;
    server.serve(move |request: Request<'_>, reply: &mut Vec<u8>| {
        if !quiet {
            say(format_args!("Received from {}.", request.peer()));
        }
        udp_greet::greet(request, reply)
    })?;
    Ok(())
}

/// A server on the UDP sockets the service manager passed (named `name`,
/// or all), telling it when it is ready, stopping, and alive.
#[cfg(all(feature = "systemd", unix))]
fn activated(
    builder: udp_greet::ServerBuilder,
    name: Option<&str>,
) -> Result<GreetServer, udp_greet::Error> {
    let sockets = udp_greet::systemd::Activated::take()?.take_udp(name);
    builder.notify_service_manager(true).from_std_all(sockets)
}

#[cfg(not(all(feature = "systemd", unix)))]
fn activated(
    _: udp_greet::ServerBuilder,
    _: Option<&str>,
) -> Result<GreetServer, udp_greet::Error> {
    eprintln!("udp_server: --activated needs the `systemd` feature (on Unix)");
    std::process::exit(2)
}

/// Prints a line; a closed standard output is not worth stopping the server for.
fn say(line: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}
