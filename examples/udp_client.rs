//! The classic UDP greet client: `cargo run --example udp_client`
//!
//! Sends `Michael`, `Tracy` and `Sarah` to `127.0.0.1:9999`, one datagram
//! each, and prints each reply (`Hello, Michael!` ...), one per line.
//!
//! ```text
//! cargo run --example udp_client -- [--server ADDR] [--busy-poll-us N] [NAME...]
//! ```

use std::io::Write;
use std::process::ExitCode;

use udp_greet::GreetClient;

const USAGE: &str = "\
usage: udp_client [--server ADDR] [--busy-poll-us N] [NAME...]

Sends each NAME (default: Michael Tracy Sarah) as one UDP datagram and prints each reply.

options:
  --server ADDR       server to ask (default 127.0.0.1:9999)
  --busy-poll-us N    after each send, poll for the reply for N microseconds
                      before blocking (latency mode; uses a core meanwhile)
  --help              print this help";

struct Options {
    server: String,
    busy_poll_us: u64,
    names: Vec<String>,
}

/// The options on the command line; `None` when help was asked for.
fn parse(args: impl IntoIterator<Item = std::ffi::OsString>) -> Result<Option<Options>, String> {
    use lexopt::prelude::*;

    let mut options = Options {
        server: "127.0.0.1:9999".to_owned(),
        busy_poll_us: 0,
        names: Vec::new(),
    };
    let mut parser = lexopt::Parser::from_args(args);
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        match arg {
            Short('h') | Long("help") => return Ok(None),
            Long("server") => {
                let addr = parser
                    .value()
                    .map_err(|e| format!("{e}: an address, such as 127.0.0.1:9999"))?;
                options.server = addr.string().map_err(|e| e.to_string())?;
            }
            Long("busy-poll-us") => {
                let value = parser
                    .value()
                    .map_err(|e| format!("{e}: a number of microseconds, such as 200"))?;
                let text = value.to_string_lossy();
                options.busy_poll_us = text.parse().map_err(|_| {
                    format!("{text:?} is not a number of microseconds, such as 200")
                })?;
            }
            // A name is sent as it is, its bytes unchanged: lexopt hands
            // everything after `--` over as values too.
            Value(name) => options
                .names
                .push(name.string().map_err(|e| e.to_string())?),
            other => return Err(other.unexpected().to_string()),
        }
    }
    if options.names.is_empty() {
        options.names = ["Michael", "Tracy", "Sarah"].map(String::from).to_vec();
    }
    Ok(Some(options))
}

fn main() -> ExitCode {
    let options = match parse(std::env::args_os().skip(1)) {
        Ok(Some(options)) => options,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("udp_client: {message}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("udp_client: {}", err.report());
            ExitCode::FAILURE
        }
    }
}

fn run(options: &Options) -> Result<(), udp_greet::Error> {
    // Only a greeting for the name just sent counts as its reply.
    let client = GreetClient::builder()
        .reply_check(udp_greet::is_greeting)
        .busy_poll(std::time::Duration::from_micros(options.busy_poll_us))
        .connect(options.server.as_str())?;
    let mut stdout = std::io::stdout().lock();
    for name in &options.names {
        let reply = client.send_recv(name.as_bytes())?;
        // A closed standard output ends the run quietly, like a shell tool.
        if writeln!(stdout, "{}", String::from_utf8_lossy(&reply)).is_err() {
            break;
        }
    }
    Ok(())
}
