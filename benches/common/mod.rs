//! Helpers shared by the benches: percentiles, medians, aligned tables.
#![allow(dead_code)] // each bench uses its own subset

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

#[cfg(target_os = "linux")]
pub mod linux;

/// Runs a socket call again while it fails with `EINTR` (a signal on this
/// thread): no clock read, no system call beyond the call itself, so that
/// the hand-written baselines cost what a user's plain loop costs.
pub fn again<T>(mut call: impl FnMut() -> std::io::Result<T>) -> std::io::Result<T> {
    loop {
        match call() {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

/// A hand-written server on a thread of its own, over a socket bound to
/// loopback with a 20 ms read timeout (so that it sees its stop flag);
/// stopped and joined when dropped.
pub struct HandServer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HandServer {
    /// Starts `serve`, which must return soon after the flag it is given
    /// is set.
    pub fn start(
        serve: impl FnOnce(&Arc<UdpSocket>, &AtomicBool) + Send + 'static,
    ) -> io::Result<HandServer> {
        let socket = Arc::new(UdpSocket::bind("127.0.0.1:0")?);
        socket.set_read_timeout(Some(Duration::from_millis(20)))?;
        let addr = socket.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = thread::Builder::new()
            .name("bench-server".into())
            .spawn(move || serve(&socket, &stopped))?;
        Ok(HandServer {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    /// A plain `recv_from`/`send_to` greet loop, the baseline of the
    /// benches.
    pub fn std_loop() -> io::Result<HandServer> {
        HandServer::start(|socket, stopped| {
            let mut buf = vec![0u8; 65_536];
            let mut reply = Vec::with_capacity(256);
            while !stopped.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = socket.recv_from(&mut buf) {
                    reply.clear();
                    udp_greet::greet_into(&buf[..n], &mut reply);
                    let _ = socket.send_to(&reply, peer);
                }
            }
        })
    }
}

impl Drop for HandServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The `p`th percentile (nearest rank) of `samples`, which it sorts.
pub fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.sort_unstable();
    let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1]
}

/// The median of `values`, which it sorts; NaN for none.
pub fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_unstable_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// A table printed with aligned columns: the first left-aligned, the rest right.
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Table {
            rows: vec![header.iter().map(|h| (*h).to_owned()).collect()],
        }
    }

    pub fn row(&mut self, cells: &[String]) {
        self.rows.push(cells.to_vec());
    }

    pub fn print(&self) {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(c))
                    .map(String::len)
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for row in &self.rows {
            let mut line = String::new();
            for (c, cell) in row.iter().enumerate() {
                if c == 0 {
                    line.push_str(&format!("{cell:<w$}", w = widths[c]));
                } else {
                    line.push_str(&format!("  {cell:>w$}", w = widths[c]));
                }
            }
            println!("{}", line.trim_end());
        }
    }
}
