//! Socket activation and service notification (feature `systemd`): real
//! descriptors passed through the environment as systemd passes them, and
//! the notifications read back from a real `NOTIFY_SOCKET`.
//!
//! Each test starts a child process the way a service manager does: the
//! demo server (`examples/udp_server.rs --activated`), or this test binary
//! running one of its ignored tests as the service.
#![cfg(all(feature = "systemd", target_os = "linux"))]

mod util;

use std::collections::VecDeque;
use std::io::Read;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use socket2::SockRef;
use util::{HANG_GUARD, V4, V6, has_ipv6, raw_socket_for, recv, send_to};

/// A `NOTIFY_SOCKET` of the test's own: a Unix datagram socket in a fresh
/// directory, removed at the end.
struct Manager {
    dir: PathBuf,
    /// Bound to an abstract name (`@name` in `NOTIFY_SOCKET`) rather than
    /// a path in `dir`.
    abstract_name: Option<String>,
    socket: UnixDatagram,
    seen: VecDeque<String>,
}

impl Manager {
    fn new(test: &str) -> Manager {
        let dir = std::env::temp_dir().join(format!(
            "udp-greet-{test}-{}-{:?}",
            std::process::id(),
            Instant::now()
        ));
        std::fs::create_dir_all(&dir).expect("a directory for the notify socket");
        let socket = UnixDatagram::bind(dir.join("notify")).expect("bind the notify socket");
        Manager::with(dir, None, socket)
    }

    /// A manager whose socket has an abstract name, as systemd's may.
    fn new_abstract(test: &str) -> Manager {
        use std::os::linux::net::SocketAddrExt;
        let name = format!(
            "udp-greet-{test}-{}-{:?}",
            std::process::id(),
            Instant::now()
        );
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .expect("an abstract name");
        let socket = UnixDatagram::bind_addr(&addr).expect("bind the notify socket");
        Manager::with(std::env::temp_dir(), Some(name), socket)
    }

    fn with(dir: PathBuf, abstract_name: Option<String>, socket: UnixDatagram) -> Manager {
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("read timeout");
        Manager {
            dir,
            abstract_name,
            socket,
            seen: VecDeque::new(),
        }
    }

    /// What `NOTIFY_SOCKET` says.
    fn path(&self) -> PathBuf {
        match &self.abstract_name {
            Some(name) => PathBuf::from(format!("@{name}")),
            None => self.dir.join("notify"),
        }
    }

    /// Fills the socket's queue, as a manager that has stopped reading
    /// leaves it; returns how many datagrams it took.
    fn fill(&self) -> usize {
        let local = self.socket.local_addr().expect("the socket's address");
        let filler = UnixDatagram::unbound().expect("socket");
        filler.connect_addr(&local).expect("connect");
        filler.set_nonblocking(true).expect("non-blocking");
        (0..10_000)
            .take_while(|_| filler.send(b"FILLER=1\n").is_ok())
            .count()
    }

    /// Takes whatever is queued, without waiting.
    fn drain(&mut self) {
        self.socket.set_nonblocking(true).expect("non-blocking");
        let mut buf = [0u8; 4096];
        while self.socket.recv(&mut buf).is_ok() {}
        self.socket.set_nonblocking(false).expect("blocking");
        self.seen.clear();
    }

    /// The next notification line, waiting up to the hang guard.
    fn next(&mut self, child: &mut Child) -> String {
        let deadline = Instant::now() + HANG_GUARD;
        loop {
            if let Some(line) = self.seen.pop_front() {
                return line;
            }
            let mut buf = [0u8; 4096];
            match self.socket.recv(&mut buf) {
                Ok(n) => {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    self.seen.extend(text.lines().map(str::to_owned));
                }
                Err(_) if Instant::now() < deadline => {
                    if let Ok(Some(status)) = child.try_wait() {
                        panic!(
                            "the service ended ({status}) before notifying: {} (the demo \
                             server is built with the tests' features: run them with \
                             --all-features)",
                            output(child)
                        );
                    }
                }
                Err(e) => panic!("no notification in time ({e}): {}", output(child)),
            }
        }
    }

    /// Waits for the notification `line`, passing over watchdog pings;
    /// returns how many pings came before it.
    fn wait_for(&mut self, child: &mut Child, line: &str) -> usize {
        let mut pings = 0;
        loop {
            let got = self.next(child);
            if got == line {
                return pings;
            }
            if got == "WATCHDOG=1" {
                pings += 1;
                continue;
            }
            panic!("expected {line:?}, got {got:?}");
        }
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        if self.abstract_name.is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// What a finished (or killed) child wrote to its standard error.
fn output(child: &mut Child) -> String {
    let _ = child.kill();
    let _ = child.wait();
    let mut err = String::new();
    if let Some(mut stderr) = child.stderr.take() {
        let _ = stderr.read_to_string(&mut err);
    }
    err
}

/// Runs `program` with `args` as a socket-activated service: `sockets`
/// (each with its name) become descriptors 3, 4, ... of the new process,
/// `LISTEN_FDS`, `LISTEN_FDNAMES` and `LISTEN_PID` (that process's own
/// id) are set, and `NOTIFY_SOCKET` is `notify`. A shell makes the
/// descriptors and then becomes the program (`exec`), so that
/// `LISTEN_PID` is the program's id, as systemd makes it.
fn activate(
    program: &Path,
    args: &[&str],
    sockets: &[(&str, &UdpSocket)],
    notify: &Path,
    env: &[(&str, &str)],
) -> Option<Child> {
    let Ok(bash) = which("bash") else {
        eprintln!("note: no bash on this machine; the activation test did not run");
        return None;
    };
    // Each socket is first copied above every descriptor in play, then to
    // its place from 3 on, so that no copy overwrites a socket not yet
    // copied. The copies start at 100: bash keeps descriptors of its own
    // from 10 up (and near 255), which a redirection there would clobber.
    let high = sockets
        .iter()
        .map(|(_, s)| s.as_raw_fd() + 1)
        .max()
        .unwrap_or(0)
        .max(100);
    let mut script = String::from("exec");
    for (i, (_, socket)) in sockets.iter().enumerate() {
        SockRef::from(*socket)
            .set_cloexec(false)
            .expect("let the socket be inherited");
        script += &format!(" {}<&{}", high + i as i32, socket.as_raw_fd());
    }
    script += "; exec";
    for i in 0..sockets.len() {
        script += &format!(" {}<&{} {}<&-", 3 + i, high + i as i32, high + i as i32);
    }
    let names: Vec<&str> = sockets.iter().map(|(name, _)| *name).collect();
    script += &format!(
        "; export LISTEN_PID=$$ LISTEN_FDS={} LISTEN_FDNAMES={}; exec \"$0\" \"$@\"",
        sockets.len(),
        names.join(":")
    );
    // Under an emulator the program runs in it, in the same process.
    let mut argv = util::emulator::runner();
    argv.push(program.into());
    argv.extend(args.iter().map(Into::into));
    let child = Command::new(bash)
        .arg("-c")
        .arg(script)
        .args(&argv)
        .env("NOTIFY_SOCKET", notify)
        .envs(env.iter().copied())
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the service");
    Some(child)
}

fn which(program: &str) -> Result<PathBuf, ()> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
        .ok_or(())
}

/// The demo server, built beside this test binary.
fn demo_server() -> PathBuf {
    let mut path = std::env::current_exe().expect("the test binary");
    path.pop();
    if path.ends_with("deps") {
        path.pop();
    }
    path.join("examples").join("udp_server")
}

fn ask(addr: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let socket = raw_socket_for(addr);
    send_to(&socket, payload, addr).expect("send");
    let mut buf = [0u8; 256];
    let n = recv(&socket, &mut buf).expect("a reply");
    buf[..n].to_vec()
}

#[test]
fn the_demo_server_serves_the_sockets_passed_and_notifies() {
    let program = demo_server();
    assert!(
        program.is_file(),
        "{} is built with the tests",
        program.display()
    );
    // Two sockets named "greet" (IPv4 and, where there is one, IPv6) and
    // one named "other" that the server is not asked to serve.
    let v4 = UdpSocket::bind(V4).expect("bind");
    let v6 = has_ipv6().then(|| UdpSocket::bind(V6).expect("bind"));
    let other = UdpSocket::bind(V4).expect("bind");
    let mut passed = vec![("greet", &v4)];
    if let Some(v6) = &v6 {
        passed.push(("greet", v6));
    }
    passed.push(("other", &other));
    let served: Vec<SocketAddr> = passed
        .iter()
        .filter(|(name, _)| *name == "greet")
        .map(|(_, s)| s.local_addr().expect("address"))
        .collect();
    let other_addr = other.local_addr().expect("address");
    let mut manager = Manager::new("activation");
    let Some(mut child) = activate(
        &program,
        &["--activated=greet", "--quiet"],
        &passed,
        &manager.path(),
        &[],
    ) else {
        return;
    };
    // The parent's copies are closed: only the service holds the sockets.
    drop((v4, v6, other));
    assert_eq!(manager.next(&mut child), "READY=1");
    for addr in &served {
        assert_eq!(ask(*addr, b"Sarah"), b"Hello, Sarah!", "{addr}");
    }
    // The socket named otherwise is held, not served: nothing answers.
    let probe = raw_socket_for(other_addr);
    probe
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    send_to(&probe, b"Tracy", other_addr).expect("send");
    let mut buf = [0u8; 64];
    assert!(
        util::recv(&probe, &mut buf).is_err(),
        "the other socket answered"
    );
    // Killed: the demo server has no signal handler, so there is no
    // STOPPING=1 to read (the watchdog test below reads it).
    let _ = child.kill();
    let status = child.wait().expect("wait");
    assert!(!status.success());
}

/// Run as the service by [`the_watchdog_pings_only_while_every_worker_receives`]
/// (ignored otherwise): two listeners on the sockets passed, named "work"
/// and "control". A "block" request to "work" holds its worker in the
/// handler until a "release" request to "control"; "quit" stops the
/// server.
#[test]
#[ignore = "the service that the watchdog test starts"]
fn watchdog_service() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Condvar, Mutex};

    if std::env::var_os("UDP_GREET_TEST_SERVICE").is_none() {
        eprintln!("note: the watchdog test runs this as its service; alone it does nothing");
        return;
    }
    let mut activated = udp_greet::systemd::Activated::take().expect("the sockets passed");
    let mut sockets = activated.take_udp(Some("work"));
    sockets.extend(activated.take_udp(Some("control")));
    assert_eq!(sockets.len(), 2, "{activated:?}");
    let released = Arc::new((Mutex::new(false), Condvar::new()));
    let quit = Arc::new(AtomicBool::new(false));
    let server = udp_greet::GreetServer::builder()
        .notify_service_manager(true)
        .from_std_all(sockets)
        .expect("serve the sockets passed");
    let control = server.control();
    let (release, stop) = (released.clone(), quit.clone());
    let handle = server
        .spawn(
            move |request: udp_greet::Request<'_>, reply: &mut Vec<u8>| {
                let (lock, changed) = &*release;
                match request.data() {
                    b"block" => {
                        let mut done = lock.lock().unwrap_or_else(|e| e.into_inner());
                        while !*done {
                            done = changed.wait(done).unwrap_or_else(|e| e.into_inner());
                        }
                        reply.extend_from_slice(b"unblocked");
                    }
                    b"release" => {
                        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
                        changed.notify_all();
                        reply.extend_from_slice(b"released");
                    }
                    b"quit" => {
                        stop.store(true, Ordering::Release);
                        reply.extend_from_slice(b"bye");
                    }
                    other => reply.extend_from_slice(other),
                }
                udp_greet::Action::Reply
            },
        )
        .expect("spawn");
    util::wait_until("a quit request", || quit.load(Ordering::Acquire));
    control.shutdown();
    handle.shutdown().expect("shutdown");
    // The watchdog thread ends with the server, however long its interval.
    util::wait_until("the watchdog thread to end", || {
        !std::fs::read_dir("/proc/self/task")
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter_map(|task| std::fs::read_to_string(task.path().join("comm")).ok())
            .any(|name| name.trim_end().ends_with("/wd"))
    });
}

#[test]
fn notifications_never_hold_the_server_up_and_reach_an_abstract_socket() {
    let work = UdpSocket::bind(V4).expect("bind");
    let control = UdpSocket::bind(V4).expect("bind");
    let (work_addr, control_addr) = (
        work.local_addr().expect("address"),
        control.local_addr().expect("address"),
    );
    // A manager that has stopped reading: its queue is full before the
    // service starts, so READY=1 cannot be delivered.
    let mut manager = Manager::new_abstract("full");
    assert!(manager.fill() > 0);
    let program = std::env::current_exe().expect("the test binary");
    // A ten-minute watchdog: its thread must still end with the server.
    let Some(mut child) = activate(
        &program,
        &["--exact", "watchdog_service", "--ignored", "--nocapture"],
        &[("work", &work), ("control", &control)],
        &manager.path(),
        &[
            ("WATCHDOG_USEC", "600000000"),
            ("UDP_GREET_TEST_SERVICE", "1"),
        ],
    ) else {
        return;
    };
    drop((work, control));
    // It serves all the same, on both listeners (the last worker to start
    // sends READY=1, and must not be held in that send).
    assert_eq!(ask(work_addr, b"ping"), b"ping");
    assert_eq!(ask(control_addr, b"ping"), b"ping");
    // The manager reads again: the shutdown's message reaches it.
    manager.drain();
    assert_eq!(ask(control_addr, b"quit"), b"bye");
    loop {
        match manager.next(&mut child).as_str() {
            "STOPPING=1" => break,
            "READY=1" | "WATCHDOG=1" => {}
            other => panic!("unexpected notification {other:?}"),
        }
    }
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status}: {}", output(&mut child));
}

#[test]
fn the_watchdog_pings_only_while_every_worker_receives() {
    let work = UdpSocket::bind(V4).expect("bind");
    let control = UdpSocket::bind(V4).expect("bind");
    let (work_addr, control_addr) = (
        work.local_addr().expect("address"),
        control.local_addr().expect("address"),
    );
    let mut manager = Manager::new("watchdog");
    let program = std::env::current_exe().expect("the test binary");
    // A 200 ms watchdog: a ping every 100 ms while all is well.
    let Some(mut child) = activate(
        &program,
        &["--exact", "watchdog_service", "--ignored", "--nocapture"],
        &[("work", &work), ("control", &control)],
        &manager.path(),
        &[("WATCHDOG_USEC", "200000"), ("UDP_GREET_TEST_SERVICE", "1")],
    ) else {
        return;
    };
    drop((work, control));
    assert_eq!(manager.next(&mut child), "READY=1");
    assert_eq!(ask(work_addr, b"ping"), b"ping");
    // Pings come while both workers wait for datagrams.
    assert_eq!(manager.next(&mut child), "WATCHDOG=1");
    assert_eq!(manager.next(&mut child), "WATCHDOG=1");
    // The "work" worker is held in its handler: the pings stop, and the
    // status says why.
    let blocked = raw_socket_for(work_addr);
    send_to(&blocked, b"block", work_addr).expect("send");
    let status = loop {
        let line = manager.next(&mut child);
        if line != "WATCHDOG=1" {
            break line;
        }
    };
    assert!(
        status.starts_with(&format!(
            "STATUS=receive worker udp:{}/0 has been in one handler call",
            work_addr.port()
        )),
        "{status}"
    );
    // No ping while it is held: three intervals' worth of silence (a
    // window that can only miss a ping, never invent one).
    let quiet_until = Instant::now() + Duration::from_millis(600);
    while Instant::now() < quiet_until {
        let mut buf = [0u8; 256];
        if let Ok(n) = manager.socket.recv(&mut buf) {
            panic!(
                "a notification while a worker was stuck: {:?}",
                String::from_utf8_lossy(&buf[..n])
            );
        }
    }
    // Released, it answers, and the pings resume with a status that says so.
    assert_eq!(ask(control_addr, b"release"), b"released");
    let mut buf = [0u8; 64];
    let n = recv(&blocked, &mut buf).expect("the held request's reply");
    assert_eq!(&buf[..n], b"unblocked");
    assert_eq!(manager.next(&mut child), "STATUS=serving");
    assert_eq!(manager.next(&mut child), "WATCHDOG=1");
    // Shutdown: STOPPING=1, and the service ends well.
    assert_eq!(ask(control_addr, b"quit"), b"bye");
    manager.wait_for(&mut child, "STOPPING=1");
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status}: {}", output(&mut child));
}
