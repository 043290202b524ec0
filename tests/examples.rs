//! The demo binaries run as processes, their output checked byte for byte.
//!
//! `cargo test` builds the examples before it runs the tests; they are found
//! beside this test binary, in `target/<profile>/examples/`, and started the
//! way this binary was: under qemu-user (`.ci/platforms`), through the same
//! emulator, since the host cannot run them itself.

mod util;

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;

use util::HANG_GUARD;

fn example(name: &str) -> Command {
    let mut path = std::env::current_exe().expect("test binary path");
    path.pop(); // the test binary
    if path.ends_with("deps") {
        path.pop();
    }
    let path: PathBuf = path
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is missing: run the tests through `cargo test`, which builds the examples",
        path.display()
    );
    match util::emulator::runner().split_first() {
        Some((emulator, options)) => {
            let mut command = Command::new(emulator);
            command.args(options).arg(path);
            command
        }
        None => Command::new(path),
    }
}

/// Runs a command to completion with the hang guard.
fn run(mut command: Command) -> Output {
    command.stdin(Stdio::null());
    util::within_guard("an example process", move || {
        command.output().expect("start the example")
    })
}

/// A running example server whose standard output is read line by line.
struct Server {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Server {
    fn start(args: &[&str]) -> (Server, SocketAddr) {
        let mut child = example("udp_server")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start udp_server");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut server = Server { child, lines };
        let first = server.line();
        let port: u16 = first
            .strip_prefix("Bind UDP on ")
            .and_then(|rest| rest.strip_suffix("..."))
            .and_then(|port| port.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"));
        assert_ne!(port, 0);
        (server, SocketAddr::from(([127, 0, 0, 1], port)))
    }

    fn line(&mut self) -> String {
        match self.lines.recv_timeout(HANG_GUARD) {
            Ok(line) => line,
            Err(_) => {
                let _ = self.child.kill();
                let mut err = String::new();
                if let Some(mut stderr) = self.child.stderr.take() {
                    let _ = stderr.read_to_string(&mut err);
                }
                panic!("udp_server printed no line in time; stderr: {err}");
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn client_and_server_examples_talk_as_the_originals_did() {
    let (mut server, addr) = Server::start(&["--bind", "127.0.0.1:0"]);
    let mut client = example("udp_client");
    client.args(["--server", &addr.to_string()]);
    let out = run(client);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "Hello, Michael!\nHello, Tracy!\nHello, Sarah!\n"
    );
    assert!(out.stderr.is_empty(), "{out:?}");
    // One line per datagram, all from the client's one port.
    let lines: Vec<String> = (0..3).map(|_| server.line()).collect();
    let port = lines[0]
        .strip_prefix("Received from 127.0.0.1:")
        .and_then(|rest| rest.strip_suffix('.'))
        .and_then(|port| port.parse::<u16>().ok())
        .unwrap_or_else(|| panic!("unexpected line {:?}", lines[0]));
    for line in &lines {
        assert_eq!(line, &format!("Received from 127.0.0.1:{port}."));
    }
}

#[test]
fn the_server_listens_on_every_address_given() {
    // `--listen` twice, and `--bind`, its other name: three addresses, a
    // line each, in order, and each one answers.
    let (mut server, first) = Server::start(&[
        "--listen",
        "127.0.0.1:0",
        "--quiet",
        "--listen=127.0.0.1:0",
        "--bind",
        "127.0.0.1:0",
    ]);
    let mut addrs = vec![first];
    for _ in 0..2 {
        let line = server.line();
        let port: u16 = line
            .strip_prefix("Bind UDP on ")
            .and_then(|rest| rest.strip_suffix("..."))
            .and_then(|port| port.parse().ok())
            .unwrap_or_else(|| panic!("unexpected line {line:?}"));
        addrs.push(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    for addr in &addrs {
        let mut client = example("udp_client");
        client.args(["--server", &addr.to_string(), "Tracy"]);
        let out = run(client);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "Hello, Tracy!\n",
            "{out:?}"
        );
    }
    let mut help = example("udp_server");
    help.arg("--help");
    let usage = String::from_utf8_lossy(&run(help).stdout).into_owned();
    for option in [
        "--listen ADDR",
        "--workers N",
        "--threads N",
        "--busy-poll-us N",
        "--quiet",
    ] {
        assert!(usage.contains(option), "{option} missing from:\n{usage}");
    }
}

#[test]
fn client_takes_names_and_the_server_answers_a_raw_peer() {
    let (_server, addr) = Server::start(&["--bind", "127.0.0.1:0", "--quiet"]);
    let mut client = example("udp_client");
    client.args(["--server", &addr.to_string(), "Ada", "--", "--not-a-flag"]);
    let out = run(client);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "Hello, Ada!\nHello, --not-a-flag!\n"
    );

    let socket = util::raw_socket_for(addr);
    util::send_to(&socket, b"raw\xff", addr).expect("send");
    let mut buf = [0u8; 64];
    let n = util::recv(&socket, &mut buf).expect("reply");
    assert_eq!(&buf[..n], b"Hello, raw\xff!");
}

#[test]
fn server_with_a_handler_pool_and_polling_answers_the_same() {
    let (mut server, addr) = Server::start(&[
        "--bind",
        "127.0.0.1:0",
        "--threads",
        "4",
        "--busy-poll-us",
        "100",
    ]);
    let mut client = example("udp_client");
    client.args([
        "--server",
        &addr.to_string(),
        "--busy-poll-us",
        "100",
        "Pooled",
    ]);
    let out = run(client);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "Hello, Pooled!\n");
    assert!(server.line().starts_with("Received from 127.0.0.1:"));
}

#[test]
fn client_with_no_server_fails_with_one_line() {
    let closed = UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free port");
    let mut client = example("udp_client");
    client.args(["--server", &closed.to_string()]);
    let out = run(client);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!("udp_client: nothing is listening on UDP {closed}")),
        "{err}"
    );
}

#[test]
fn server_reports_a_taken_address() {
    let holder = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = holder.local_addr().expect("addr");
    let mut server = example("udp_server");
    server.args(["--bind", &addr.to_string()]);
    let out = run(server);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with(&format!("udp_server: address {addr} is already in use")),
        "{err}"
    );
}

#[test]
fn the_token_example_shows_a_challenge_and_the_retry_with_the_token() {
    let out = run(example("greet_tokens"));
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    let received = |with: &str| format!("with {with}.");
    // Michael: the burst, no token. Tracy: challenged, then again with the
    // token. Sarah: with the token from the start.
    assert_eq!(lines.len(), 8, "{stdout}");
    assert!(
        lines[0].starts_with("server: received from 127.0.0.1:"),
        "{stdout}"
    );
    assert!(lines[0].ends_with(&received("no token")), "{stdout}");
    assert_eq!(lines[1], "client: Hello, Michael!");
    assert!(lines[2].ends_with(&received("a valid token")), "{stdout}");
    assert_eq!(
        lines[3],
        "client: Tracy was challenged; sent again with the token"
    );
    assert_eq!(lines[4], "client: Hello, Tracy!");
    assert!(lines[5].ends_with(&received("a valid token")), "{stdout}");
    assert_eq!(lines[6], "client: Hello, Sarah!");
    assert_eq!(lines[7], "server: 3 answered, 1 challenged, 2 validated");
    assert!(out.stderr.is_empty(), "{out:?}");
}

#[test]
fn help_and_bad_flags() {
    let names: &[&str] = if cfg!(unix) {
        &["udp_server", "udp_client", "upgrade", "greet_tokens"]
    } else {
        &["udp_server", "udp_client", "greet_tokens"]
    };
    for &name in names {
        let mut help = example(name);
        help.arg("--help");
        let out = run(help);
        assert!(out.status.success());
        assert!(String::from_utf8_lossy(&out.stdout).starts_with(&format!("usage: {name}")));

        let mut bad = example(name);
        bad.arg("--frobnicate");
        let out = run(bad);
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).contains("--frobnicate"));
    }
}
