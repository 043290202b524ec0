//! Latency mode keeps a call's time, on both clients: polling counts toward
//! each wait, so a call to a silent port ends when its timeouts or its
//! deadline say, not a window later.

use std::time::Duration;

use udp_greet::{ClientBuilder, Engine, Error};

/// How long each case's call to a silent port should take: 100 + 200 ms of
/// waits, or a 300 ms deadline.
pub const PROMISED: Duration = Duration::from_millis(300);

/// Polling clients whose window is as long as their waits or longer, each
/// with the attempts its call makes; `builder` is the client's
/// `GreetClient::builder`.
pub fn cases<E: Engine>(
    builder: fn() -> ClientBuilder<E>,
) -> [(&'static str, ClientBuilder<E>, u32); 2] {
    [
        (
            "timeout 100 ms, 1 retry",
            builder()
                .initial_timeout(Duration::from_millis(100))
                .retries(1)
                .jitter(0.0)
                .call_timeout(None)
                .busy_poll(Duration::from_secs(3600)),
            2,
        ),
        (
            "a deadline as long as the window",
            builder()
                .initial_timeout(Duration::from_secs(1))
                .retries(0)
                .call_timeout(PROMISED)
                .busy_poll(PROMISED),
            1,
        ),
    ]
}

/// The call timed out after `attempts`, no sooner than promised and at most
/// half as long again: the overrun this guards against (each wait started
/// again after the window) doubled the time with these settings.
pub fn assert_on_time(what: &str, err: Error, took: Duration, attempts: u32) {
    assert!(
        matches!(err, Error::Timeout { attempts: a, .. } if a == attempts),
        "{what}: {err:?}"
    );
    assert!(took >= PROMISED, "{what}: {took:?}");
    // Under an emulator every step takes many times longer: the bound is
    // looser there, and still well short of the doubled time the overrun
    // gave (which added a whole window per attempt).
    let slack = match crate::util::emulator::emulator() {
        Some(_) => PROMISED,
        None => PROMISED / 2,
    };
    assert!(
        took <= PROMISED + slack,
        "{what}: {took:?}, promised {PROMISED:?}"
    );
}
