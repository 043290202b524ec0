//! The client over a lossy network: a fault-injecting UDP proxy in user
//! space (the kernel here has no `netem`) drops, duplicates, reorders,
//! delays and truncates datagrams in both directions, from a seeded random
//! stream. Ten thousand `send_recv` calls with the greet check must return
//! no wrong reply, and fail no more often than the loss rate predicts for
//! the attempts allowed.

mod proxy;
mod util;

use std::thread;
use std::time::Duration;

use proxy::Proxy;

use udp_greet::{Error, GreetClient, GreetServer};

#[test]
fn ten_thousand_calls_through_a_lossy_network_get_no_wrong_reply() {
    const THREADS: usize = 40;
    const CALLS: usize = 250;
    const RETRIES: u32 = 4;
    const TIMEOUT: Duration = Duration::from_millis(100);

    let seed = proxy::seed();

    let server = GreetServer::bind(util::V4)
        .expect("bind")
        .spawn(udp_greet::greet)
        .expect("spawn");
    let proxy = Proxy::start(server.local_addr(), seed);
    let proxy_addr = proxy.addr;

    let results: Vec<_> = (0..THREADS)
        .map(|t| {
            thread::spawn(move || {
                let client = GreetClient::builder()
                    .initial_timeout(TIMEOUT)
                    .retries(RETRIES)
                    .call_timeout(Duration::from_secs(5))
                    .reply_check(udp_greet::is_greeting)
                    .connect(proxy_addr)
                    .expect("connect");
                let (mut wrong, mut failed) = (0u64, 0u64);
                for i in 0..CALLS {
                    let name = format!("client-{t}-call-{i}");
                    match client.send_recv(name.as_bytes()) {
                        Ok(reply) if reply == format!("Hello, {name}!").as_bytes() => {}
                        Ok(_) => wrong += 1,
                        Err(Error::Timeout { .. }) => failed += 1,
                        Err(other) => panic!("unexpected error: {other}"),
                    }
                }
                (wrong, failed, client.discarded())
            })
        })
        .collect();
    let (mut wrong, mut failed, mut discarded) = (0, 0, 0);
    for result in results {
        let (w, f, d) = result.join().expect("client thread");
        wrong += w;
        failed += f;
        discarded += d;
    }
    drop(proxy);
    let stats = server.shutdown().expect("shutdown");

    let calls = (THREADS * CALLS) as f64;
    let predicted = proxy::predicted_failures(calls, RETRIES, TIMEOUT);
    println!(
        "{calls} calls: {wrong} wrong, {failed} failed (at most {predicted:.1} predicted), \
         {discarded} datagrams discarded by the check; server {stats:?}"
    );
    assert_eq!(wrong, 0, "a wrong reply was returned");
    assert!(
        (failed as f64) <= predicted,
        "{failed} calls failed; the loss rate predicts at most {predicted:.1}"
    );
    assert!(
        discarded > 0,
        "duplicates and late replies reached the check"
    );
    assert_eq!(stats.received, stats.accounted());
}
