//! The handler futures one async worker has in flight: places made once and
//! reused, each with its own waker, so that a handler future costs no
//! allocation per request and only the futures that were woken are polled.

use std::future::Future;
use std::panic::{self, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Instant;

/// The permits of one server, shared by its workers: how many handler
/// futures may be in flight over all of them.
#[derive(Debug)]
pub(crate) struct Permits {
    in_flight: AtomicUsize,
    limit: usize,
}

impl Permits {
    pub(crate) fn new(limit: usize) -> Arc<Permits> {
        Arc::new(Permits {
            in_flight: AtomicUsize::new(0),
            limit,
        })
    }

    /// Takes a permit if one is free; never waits.
    fn try_acquire(&self) -> bool {
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.limit).then_some(n + 1)
            })
            .is_ok()
    }

    fn release(&self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The indices of places whose futures were woken, and the worker task to
/// wake for them.
#[derive(Debug, Default)]
struct Woken {
    indices: Mutex<Vec<usize>>,
    task: Mutex<Option<Waker>>,
}

/// One place's waker.
#[derive(Debug)]
struct PlaceWaker {
    index: usize,
    /// Set while `index` is in the woken list, so it is listed once.
    listed: AtomicBool,
    woken: Arc<Woken>,
}

impl Wake for PlaceWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.listed.swap(true, Ordering::AcqRel) {
            self.woken
                .indices
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(self.index);
        }
        let task = self.woken.task.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(task) = task.as_ref() {
            task.wake_by_ref();
        }
    }
}

/// A caught panic's payload.
type Panic = Box<dyn std::any::Any + Send>;

/// What a handler future was started for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Started<M> {
    pub(crate) meta: M,
    pub(crate) started: Instant,
    /// When it is dropped unfinished, if it runs that long.
    pub(crate) deadline: Option<Instant>,
}

struct Place<F, M> {
    future: Pin<Box<Option<F>>>,
    waker: Waker,
    wake: Arc<PlaceWaker>,
    started: Option<Started<M>>,
}

/// How a handler future ended.
pub(crate) enum Ended<T, M> {
    /// It returned.
    Done(T, Started<M>),
    /// It panicked (while being polled or dropped).
    Panicked(Panic, Started<M>),
}

/// The places of one worker; `M` is what the worker keeps about each
/// request (where to reply, how large it was).
pub(crate) struct InFlight<F, M> {
    places: Vec<Place<F, M>>,
    free: Vec<usize>,
    /// Places in use.
    busy: usize,
    woken: Arc<Woken>,
    permits: Arc<Permits>,
    /// The woken list taken for polling, kept to reuse its memory.
    scratch: Vec<usize>,
}

impl<F: Future, M: Copy> InFlight<F, M> {
    pub(crate) fn new(permits: Arc<Permits>) -> Self {
        InFlight {
            places: Vec::new(),
            free: Vec::new(),
            busy: 0,
            woken: Arc::new(Woken::default()),
            permits,
            scratch: Vec::new(),
        }
    }

    /// How many futures are in flight here.
    pub(crate) fn len(&self) -> usize {
        self.busy
    }

    /// Remembers the worker task's waker, to be woken with the futures.
    pub(crate) fn set_task(&self, waker: &Waker) {
        let mut task = self.woken.task.lock().unwrap_or_else(|e| e.into_inner());
        if !task.as_ref().is_some_and(|t| t.will_wake(waker)) {
            *task = Some(waker.clone());
        }
    }

    /// Takes a permit and a place for a new future, without waiting: `None`
    /// when the server has as many in flight as it allows.
    pub(crate) fn reserve(&mut self) -> Option<usize> {
        if !self.permits.try_acquire() {
            return None;
        }
        let index = match self.free.pop() {
            Some(index) => index,
            None => {
                let index = self.places.len();
                let wake = Arc::new(PlaceWaker {
                    index,
                    listed: AtomicBool::new(false),
                    woken: self.woken.clone(),
                });
                self.places.push(Place {
                    future: Box::pin(None),
                    waker: Waker::from(wake.clone()),
                    wake,
                    started: None,
                });
                // Each place is listed at most once, so lists with room for
                // every place never grow while futures are woken.
                let places = self.places.len();
                reserve_to(&mut self.scratch, places);
                reserve_to(
                    &mut self.woken.indices.lock().unwrap_or_else(|e| e.into_inner()),
                    places,
                );
                index
            }
        };
        self.busy += 1;
        Some(index)
    }

    /// Gives back a place [`reserve`](InFlight::reserve) took but that got
    /// no future (the handler panicked making it).
    pub(crate) fn unreserve(&mut self, index: usize) {
        self.release(index);
    }

    /// Starts `future` in the reserved place `index` and polls it once.
    pub(crate) fn start(
        &mut self,
        index: usize,
        future: F,
        started: Started<M>,
    ) -> Option<Ended<F::Output, M>> {
        let place = self.places.get_mut(index)?;
        place.future.set(Some(future));
        place.started = Some(started);
        self.poll(index)
    }

    /// Polls the futures that were woken, handing each that ended to `done`,
    /// until `max_ended` have ended; the rest stay listed for later.
    pub(crate) fn poll_woken(
        &mut self,
        max_ended: usize,
        mut done: impl FnMut(Ended<F::Output, M>),
    ) {
        let mut list = std::mem::take(&mut self.scratch);
        std::mem::swap(
            &mut list,
            &mut self.woken.indices.lock().unwrap_or_else(|e| e.into_inner()),
        );
        let mut ended = 0;
        let mut polled = 0;
        for &index in &list {
            if ended >= max_ended {
                break;
            }
            polled += 1;
            if let Some(place) = self.places.get(index) {
                place.wake.listed.store(false, Ordering::Release);
            }
            if let Some(outcome) = self.poll(index) {
                ended += 1;
                done(outcome);
            }
        }
        if polled < list.len() {
            self.woken
                .indices
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(&list[polled..]);
        }
        list.clear();
        self.scratch = list;
    }

    /// Whether futures were woken and not yet polled.
    pub(crate) fn any_woken(&self) -> bool {
        !self
            .woken
            .indices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    fn poll(&mut self, index: usize) -> Option<Ended<F::Output, M>> {
        let place = self.places.get_mut(index)?;
        let future = place.future.as_mut().as_pin_mut()?;
        let mut cx = Context::from_waker(&place.waker);
        let polled = panic::catch_unwind(AssertUnwindSafe(|| future.poll(&mut cx)));
        let ended = match polled {
            Ok(Poll::Pending) => return None,
            Ok(Poll::Ready(output)) => Ok(output),
            Err(payload) => Err(payload),
        };
        let (started, dropped) = self.finish(index)?;
        Some(match (ended, dropped) {
            (Ok(output), Ok(())) => Ended::Done(output, started),
            (Err(payload), _) | (Ok(_), Err(payload)) => Ended::Panicked(payload, started),
        })
    }

    /// Drops the future of place `index` (catching a panic in its drop),
    /// frees the place and its permit.
    fn finish(&mut self, index: usize) -> Option<(Started<M>, Result<(), Panic>)> {
        let place = self.places.get_mut(index)?;
        let started = place.started.take()?;
        let future = &mut place.future;
        let dropped = panic::catch_unwind(AssertUnwindSafe(|| future.set(None)));
        self.release(index);
        Some((started, dropped))
    }

    fn release(&mut self, index: usize) {
        self.free.push(index);
        self.busy = self.busy.saturating_sub(1);
        self.permits.release();
    }

    /// Drops every future whose deadline is at or before `now`, handing
    /// each to `expired`; returns the earliest deadline of those left.
    pub(crate) fn expire(
        &mut self,
        now: Instant,
        mut expired: impl FnMut(Started<M>),
    ) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        for index in 0..self.places.len() {
            let deadline = self.places[index].started.and_then(|s| s.deadline);
            match deadline {
                Some(deadline) if deadline <= now => {
                    if let Some((started, _)) = self.finish(index) {
                        expired(started);
                    }
                }
                Some(deadline) => next = Some(next.map_or(deadline, |n| n.min(deadline))),
                None => {}
            }
        }
        next
    }

    /// Drops every future in flight (shutdown); returns how many.
    pub(crate) fn cancel_all(&mut self) -> u64 {
        let mut cancelled = 0;
        for index in 0..self.places.len() {
            if self.places[index].started.is_some() && self.finish(index).is_some() {
                cancelled += 1;
            }
        }
        cancelled
    }
}

/// Gives `list` room for `places` entries in all.
fn reserve_to(list: &mut Vec<usize>, places: usize) {
    list.reserve(places.saturating_sub(list.len()));
}

impl<F, M> Drop for InFlight<F, M> {
    fn drop(&mut self) {
        // Futures still here (the worker itself was dropped) give their
        // permits back.
        for place in &self.places {
            if place.started.is_some() {
                self.permits.release();
            }
        }
    }
}
