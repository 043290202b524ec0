//! Start and stop a server a thousand times: every worker is joined and
//! every socket closed each time, so the process ends with the threads and
//! file descriptors it started with.
//!
//! One test alone in its binary, so that no other test's threads or sockets
//! come and go while it counts.

mod util;

use udp_greet::{GreetClient, GreetServer};

/// Linux's view of this process (`/proc/self`); `None` elsewhere. (A
/// Windows program under Wine would find the Wine process's own `/proc` at
/// that path, and count what Wine holds.)
fn proc_entries(dir: &str) -> Option<usize> {
    if !cfg!(target_os = "linux") {
        return None;
    }
    Some(std::fs::read_dir(dir).ok()?.count())
}

fn open_fds() -> Option<usize> {
    proc_entries("/proc/self/fd")
}

fn threads() -> Option<usize> {
    proc_entries("/proc/self/task")
}

#[test]
fn a_thousand_starts_and_stops_leave_nothing_behind() {
    let (Some(fds_before), Some(threads_before)) = (open_fds(), threads()) else {
        eprintln!("note: no /proc on this platform: the fd and thread counts were not checked");
        return;
    };
    let client_socket = std::net::UdpSocket::bind(util::V4).expect("bind");
    drop(client_socket);
    for cycle in 0..1_000 {
        let builder = GreetServer::builder()
            .portable_io(cycle % 2 == 1)
            .workers(1 + cycle % 3);
        let server = builder
            .bind(util::V4)
            .expect("bind")
            .spawn(udp_greet::greet)
            .expect("spawn");
        if cycle % 100 == 0 {
            // Now and then, a request on the way, to stop a server that
            // has worked.
            let client = GreetClient::connect(server.local_addr()).expect("connect");
            assert_eq!(client.send_recv(b"cycle").expect("reply"), b"Hello, cycle!");
        }
        server.shutdown().expect("shutdown");
    }
    // Serve on the calling thread too, stopped from another.
    for _ in 0..100 {
        let server = GreetServer::bind(util::V4).expect("bind");
        let stop = server.control();
        let stopper = std::thread::spawn(move || stop.shutdown());
        server.serve(udp_greet::greet).expect("serve");
        stopper.join().expect("stopper");
    }
    assert_eq!(open_fds(), Some(fds_before), "file descriptors left open");
    assert_eq!(threads(), Some(threads_before), "threads left running");
}
