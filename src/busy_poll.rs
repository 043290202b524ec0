//! Latency mode: the busy-polling window every engine and both clients
//! share, and the one way the crate turns a duration into a time that
//! cannot overflow.
//!
//! See [`ServerBuilder::busy_poll`](crate::ServerBuilder::busy_poll) and
//! [`ClientBuilder::busy_poll`](crate::ClientBuilder::busy_poll).

use std::time::{Duration, Instant};

/// As good as forever: a century. Every deadline the crate computes is at
/// most this far ahead, so adding a setting such as `Duration::MAX` to a
/// clock reading never overflows into "no deadline".
pub(crate) const FAR_FUTURE: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `now + after`, clamped to [`FAR_FUTURE`] from `now`: a duration too long
/// to add is as good as forever, never an overflow.
pub(crate) fn later(now: Instant, after: Duration) -> Instant {
    now.checked_add(after.min(FAR_FUTURE))
        // A clock within a century of its end: an hour is still far.
        .or_else(|| now.checked_add(Duration::from_secs(3600)))
        .unwrap_or(now)
}

/// How often counters kept while polling are published, at most: a live
/// snapshot taken during a long window sees its misses rise, at the cost of
/// one publish per millisecond of polling.
const PUBLISH_EVERY: Duration = Duration::from_millis(1);

/// A busy-polling window: after work, poll without blocking until the
/// window has passed, then block again.
///
/// Every window, however short, allows at least one try after it opens, so
/// a window of 1 ns polls once rather than never.
#[derive(Debug, Clone)]
pub(crate) struct PollWindow {
    window: Option<Duration>,
    /// Polling goes on until then; `None`: closed.
    until: Option<Instant>,
    /// No try has been made since the window opened.
    fresh: bool,
    /// When polling last published its counters.
    published: Option<Instant>,
}

/// What the window says before a try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Window {
    /// Poll: try without blocking.
    Open,
    /// Poll, and publish the counters first (due once a millisecond while
    /// polling goes on).
    OpenPublish,
    /// The window has just closed: publish what polling counted, then
    /// block.
    Closing,
    /// Block.
    Closed,
}

impl Window {
    /// Whether to try without blocking.
    pub(crate) fn polls(self) -> bool {
        matches!(self, Window::Open | Window::OpenPublish)
    }

    /// Whether counters are due to be published before the try.
    pub(crate) fn publish(self) -> bool {
        matches!(self, Window::OpenPublish | Window::Closing)
    }
}

impl PollWindow {
    /// A window of `window` (`None` or zero: latency mode is off).
    pub(crate) fn new(window: Option<Duration>) -> PollWindow {
        PollWindow {
            window: window.filter(|w| !w.is_zero()),
            until: None,
            fresh: false,
            published: None,
        }
    }

    /// Work arrived at `now`: poll for the window from then.
    pub(crate) fn open(&mut self, now: Instant) {
        self.open_within(now, None);
    }

    /// As [`open`](PollWindow::open), but never past `end` (a client's
    /// wait for a reply ends there).
    pub(crate) fn open_within(&mut self, now: Instant, end: Option<Instant>) {
        if let Some(window) = self.window {
            let until = later(now, window);
            self.until = Some(end.map_or(until, |end| end.min(until)));
            self.fresh = true;
            self.published.get_or_insert(now);
        }
    }

    /// What to do at `now`: poll, publish, or block.
    pub(crate) fn at(&mut self, now: Instant) -> Window {
        let Some(until) = self.until else {
            return Window::Closed;
        };
        if std::mem::take(&mut self.fresh) || now < until {
            if self
                .published
                .is_some_and(|at| now.saturating_duration_since(at) >= PUBLISH_EVERY)
            {
                self.published = Some(now);
                return Window::OpenPublish;
            }
            return Window::Open;
        }
        self.until = None;
        self.published = None;
        Window::Closing
    }

    /// What to do now (the clock is read only while the window is open).
    pub(crate) fn check(&mut self) -> Window {
        if self.until.is_none() {
            return Window::Closed;
        }
        self.at(Instant::now())
    }

    /// Whether to try without blocking now; `publish` runs first when the
    /// counters polling keeps are due to be published (once a millisecond
    /// while the window is open, and as it closes).
    pub(crate) fn poll_now(&mut self, publish: impl FnOnce()) -> bool {
        let window = self.check();
        if window.publish() {
            publish();
        }
        window.polls()
    }

    /// When the open window ends, if it is open.
    #[cfg(test)]
    pub(crate) fn until(&self) -> Option<Instant> {
        self.until
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_of_any_length_polls_and_then_closes() {
        let now = Instant::now();
        for window in [
            Duration::from_nanos(1),
            Duration::from_secs(1),
            Duration::MAX,
        ] {
            let mut poll = PollWindow::new(Some(window));
            assert_eq!(poll.at(now), Window::Closed, "{window:?}");
            poll.open(now);
            // The first try always polls, even for a 1 ns window.
            assert!(poll.at(now).polls(), "{window:?}");
            let end = poll.until().expect("open");
            assert!(end >= now);
            assert!(end <= later(now, FAR_FUTURE));
            // Past its end, it closes once, then stays closed.
            let past = end + Duration::from_nanos(1);
            assert_eq!(poll.at(past), Window::Closing, "{window:?}");
            assert_eq!(poll.at(past), Window::Closed, "{window:?}");
        }
    }

    #[test]
    fn duration_max_polls_far_into_the_future() {
        let now = Instant::now();
        let mut poll = PollWindow::new(Some(Duration::MAX));
        poll.open(now);
        let hour = now + Duration::from_secs(3600);
        assert!(poll.at(hour).polls());
        assert!(poll.until().is_some_and(|until| until > hour));
    }

    #[test]
    fn counters_are_published_while_polling_goes_on() {
        let now = Instant::now();
        let mut poll = PollWindow::new(Some(Duration::from_secs(10)));
        poll.open(now);
        assert_eq!(poll.at(now), Window::Open);
        let due = now + PUBLISH_EVERY;
        assert_eq!(poll.at(due), Window::OpenPublish);
        assert_eq!(poll.at(due), Window::Open);
        assert_eq!(poll.at(due + PUBLISH_EVERY), Window::OpenPublish);
    }

    #[test]
    fn a_window_never_outlasts_its_end() {
        let now = Instant::now();
        let end = now + Duration::from_millis(5);
        let mut poll = PollWindow::new(Some(Duration::from_secs(1)));
        poll.open_within(now, Some(end));
        assert_eq!(poll.until(), Some(end));
        assert!(poll.at(now).polls());
        assert_eq!(poll.at(end), Window::Closing);
    }

    #[test]
    fn off_never_polls() {
        let now = Instant::now();
        for window in [None, Some(Duration::ZERO)] {
            let mut poll = PollWindow::new(window);
            poll.open(now);
            assert_eq!(poll.at(now), Window::Closed);
        }
    }

    #[test]
    fn later_never_overflows() {
        let now = Instant::now();
        assert!(later(now, Duration::MAX) > now + Duration::from_secs(3600));
        assert_eq!(later(now, Duration::ZERO), now);
    }
}
