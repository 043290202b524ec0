//! The greet protocol with source tokens: `cargo run --example greet_tokens`
//!
//! A server and a client in one process, on `127.0.0.1` (an ephemeral
//! port), showing the whole round trip of a client that proves its
//! address: a request, a challenge carrying a token, the request again
//! with the token, the answer. The server lets each source prefix one
//! request through (`RateLimit::new(1, 1)`) and challenges what its limit
//! would drop; a request with a valid token is not limited.
//!
//! The protocol is greet's, with a token in front when there is one:
//!
//! ```text
//! request   NAME                       or  0x00 TOKEN(16) NAME
//! reply     Hello, NAME!               or  0x00 TOKEN(16) Hello, NAME!
//! challenge 0x01 TOKEN(16)
//! ```
//!
//! A challenge is 17 bytes: within four times a request of 5 bytes or more,
//! the amplification limit the server keeps for sources it has not seen
//! prove their address. A reply carries a token where it fits within that
//! limit (always, to a validated source), and the client keeps the token
//! of the last reply it accepted.

use std::process::ExitCode;

use udp_greet::{
    Action, GreetClient, GreetServer, RateLimit, Request, SourceTokens, TOKEN_LEN, TokenFormat,
};

const USAGE: &str = "\
usage: greet_tokens

Runs a greet server with source tokens and a client on 127.0.0.1, and shows
the client's requests, the challenge it gets, and the answers.

options:
  --help    print this help";

/// Where the greet protocol carries a token (see the module's docs).
struct GreetTokens;

const WITH_TOKEN: u8 = 0x00;
const CHALLENGE: u8 = 0x01;

impl GreetTokens {
    /// The datagram without its token.
    fn payload(datagram: &[u8]) -> &[u8] {
        match datagram.split_first() {
            Some((&(WITH_TOKEN | CHALLENGE), rest)) => rest.get(TOKEN_LEN..).unwrap_or_default(),
            _ => datagram,
        }
    }
}

impl TokenFormat for GreetTokens {
    fn find<'a>(&self, datagram: &'a [u8]) -> Option<&'a [u8]> {
        match datagram.split_first() {
            Some((&(WITH_TOKEN | CHALLENGE), rest)) => rest.get(..TOKEN_LEN),
            _ => None,
        }
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
        datagram.push(marker);
        datagram.extend_from_slice(token);
        datagram.extend_from_slice(&payload);
    }

    fn challenge(&self, _request: &[u8], reply: &mut Vec<u8>) -> bool {
        reply.push(CHALLENGE); // the server writes the token after it
        true
    }

    fn is_challenge(&self, datagram: &[u8]) -> bool {
        datagram.first() == Some(&CHALLENGE)
    }
}

fn main() -> ExitCode {
    match parse(std::env::args_os().skip(1)) {
        Ok(true) => {}
        Ok(false) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("greet_tokens: {message}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("greet_tokens: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Whether to run (`false`: help was asked for).
fn parse(args: impl IntoIterator<Item = std::ffi::OsString>) -> Result<bool, String> {
    use lexopt::prelude::*;

    let mut parser = lexopt::Parser::from_args(args);
    if let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        return match arg {
            Short('h') | Long("help") => Ok(false),
            other => Err(other.unexpected().to_string()),
        };
    }
    Ok(true)
}

fn run() -> Result<(), udp_greet::Error> {
    // Servers that are to accept each other's tokens share a secret drawn
    // once; a server alone draws its own.
    let secret = SourceTokens::random_secret();
    let server = GreetServer::builder()
        .rate_limit(RateLimit::new(1, 1))
        // Replies carry a token where it fits within the amplification
        // limit: "Hello, Michael!" with one is more than 4 x "Michael", so
        // the client has none when Tracy's request goes over the limit.
        .source_tokens(SourceTokens::new(secret, GreetTokens).challenge(true))
        .max_amplification(4)
        .bind("127.0.0.1:0")?
        .spawn(|request: Request<'_>, reply: &mut Vec<u8>| {
            let name = GreetTokens::payload(request.data());
            let token = if request.validated() {
                "a valid token"
            } else {
                "no token"
            };
            println!("server: received from {} with {token}.", request.peer());
            udp_greet::greet_into(name, reply);
            Action::Reply
        })?;
    let client = GreetClient::builder()
        .source_tokens(GreetTokens)
        .connect(server.local_addr())?;
    for name in ["Michael", "Tracy", "Sarah"] {
        let before = client.challenges();
        let reply = client.send_recv(name.as_bytes())?;
        if client.challenges() > before {
            println!("client: {name} was challenged; sent again with the token");
        }
        println!(
            "client: {}",
            String::from_utf8_lossy(GreetTokens::payload(&reply))
        );
    }
    let stats = server.shutdown()?;
    println!(
        "server: {} answered, {} challenged, {} validated",
        stats.replied, stats.challenged, stats.validated
    );
    Ok(())
}
