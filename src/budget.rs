//! Rutter's organisation budget (DESIGN §2 `upstream.rate_limit`, `upstream.max_in_flight`): one
//! limiter for every upstream call the sidecar makes, writes, passthrough and job polls together.
//!
//! The budget is a sliding window over calls: a call counts from the moment it starts until one
//! window (`per` plus a 2 % margin) after it *ends*. Whenever Rutter received it, that moment lies
//! between the two, so Rutter's own fixed or sliding window of `per` never sees more than `requests`,
//! however long connections take to open. When the budget is spent, callers wait for capacity until
//! their deadline instead of drawing 429s from Rutter. App requests come first: job polls never take
//! the last tenth of the window, and wait while an app request is waiting. A 429 or 452 from Rutter
//! closes the budget until its `Retry-After` (1 s without one, one window at most). Separately, at
//! most `max_in_flight` exchanges run at once.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::config::RateLimit;

/// Who is asking: app requests are served before job polls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// A request on behalf of an app (writes, passthrough).
    App,
    /// A job poll the sidecar makes on its own.
    Poll,
}

/// How long to stop after a 429/452 without `Retry-After`.
const DEFAULT_PENALTY: Duration = Duration::from_secs(1);
/// How often a caller re-checks while every counted call is still running.
const RECHECK: Duration = Duration::from_millis(50);

struct Window {
    /// Calls started and not yet ended.
    running: usize,
    /// End times of the calls that ended within the current window, oldest first.
    ended: VecDeque<Instant>,
    /// Closed until this instant after a 429/452.
    closed_until: Option<Instant>,
    /// App requests waiting for capacity.
    app_waiting: usize,
}

impl Window {
    fn prune(&mut self, window: Duration, now: Instant) {
        while self
            .ended
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= window)
        {
            self.ended.pop_front();
        }
    }

    fn counted(&self) -> usize {
        self.running + self.ended.len()
    }
}

/// The shared limiter.
pub struct Budget {
    limit: usize,
    poll_limit: usize,
    window: Duration,
    state: Mutex<Window>,
    freed: Notify,
    in_flight: Arc<Semaphore>,
}

/// Why no capacity was granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetExhausted {
    /// When capacity will be available again (approximately).
    pub retry_after: Duration,
}

/// Held while an upstream exchange runs. When dropped the call ends: its `max_in_flight` slot is
/// released and it stays counted for one more window.
pub struct Slot {
    budget: Arc<Budget>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        {
            let mut state = self.budget.lock();
            state.running = state.running.saturating_sub(1);
            state.ended.push_back(Instant::now());
        }
        // The window did not change, but the in-flight bound did.
        self.budget.freed.notify_waiters();
    }
}

impl Budget {
    /// A limiter of `rate` with at most `max_in_flight` concurrent exchanges.
    pub fn new(rate: RateLimit, max_in_flight: usize) -> Self {
        let limit = rate.requests.max(1) as usize;
        Budget {
            limit,
            poll_limit: (limit - limit / 10).max(1),
            window: rate.per + rate.per / 50,
            state: Mutex::new(Window {
                running: 0,
                // Grows with the traffic: a large configured limit costs nothing while idle.
                ended: VecDeque::with_capacity(limit.min(1024)),
                closed_until: None,
                app_waiting: 0,
            }),
            freed: Notify::new(),
            in_flight: Arc::new(Semaphore::new(max_in_flight.max(1))),
        }
    }

    /// Calls counted in the current window (running, or ended less than a window ago).
    pub fn used(&self) -> usize {
        let mut state = self.lock();
        state.prune(self.window, Instant::now());
        state.counted()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Window> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until a call may start (budget and in-flight slot), or fails at `deadline`.
    pub async fn acquire(
        self: &Arc<Self>,
        priority: Priority,
        deadline: Instant,
    ) -> Result<Slot, BudgetExhausted> {
        let mut counted_as_waiting = false;
        let result = loop {
            let notified = self.freed.notified();
            let now = Instant::now();
            let next = {
                let mut state = self.lock();
                state.prune(self.window, now);
                let closed = state.closed_until.filter(|until| *until > now);
                let cap = match priority {
                    Priority::App => self.limit,
                    Priority::Poll if state.app_waiting > 0 => 0,
                    Priority::Poll => self.poll_limit,
                };
                if closed.is_none() && state.counted() < cap {
                    state.running += 1;
                    if counted_as_waiting {
                        state.app_waiting -= 1;
                        counted_as_waiting = false;
                    }
                    break Ok(());
                }
                if priority == Priority::App && !counted_as_waiting {
                    state.app_waiting += 1;
                    counted_as_waiting = true;
                }
                // The oldest ended call leaves the window first; while all are running, re-check.
                let frees = state
                    .ended
                    .front()
                    .map_or(now + RECHECK, |t| *t + self.window);
                closed.map_or(frees, |until| until.max(now))
            };
            if now >= deadline {
                break Err(BudgetExhausted {
                    retry_after: next.saturating_duration_since(now),
                });
            }
            tokio::select! {
                _ = tokio::time::sleep_until(next.min(deadline).max(now + Duration::from_millis(1))) => {}
                _ = notified => {}
            }
        };
        if counted_as_waiting {
            self.lock().app_waiting -= 1;
            self.freed.notify_waiters();
        }
        result?;
        // From here the call is counted; the slot's drop ends it, whatever happens next.
        let mut slot = Slot {
            budget: Arc::clone(self),
            _permit: None,
        };
        let exhausted = BudgetExhausted {
            retry_after: Duration::from_millis(100),
        };
        let permit = tokio::time::timeout_at(deadline, Arc::clone(&self.in_flight).acquire_owned())
            .await
            .map_err(|_| exhausted)?
            .map_err(|_| exhausted)?;
        slot._permit = Some(permit);
        Ok(slot)
    }

    /// Rutter answered 429 or 452: no call starts before `retry_after` (1 s if absent), at most one
    /// window (after which Rutter's own window has rolled over too).
    pub fn penalise(&self, retry_after: Option<Duration>) {
        let until = Instant::now() + retry_after.unwrap_or(DEFAULT_PENALTY).min(self.window);
        let mut state = self.lock();
        state.closed_until = Some(
            state
                .closed_until
                .map_or(until, |current| current.max(until)),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(requests: u32, per_ms: u64) -> Arc<Budget> {
        Arc::new(Budget::new(
            RateLimit {
                requests,
                per: Duration::from_millis(per_ms),
            },
            100,
        ))
    }

    #[tokio::test(start_paused = true)]
    async fn never_more_than_the_budget_in_any_window() {
        let b = budget(10, 1000);
        let far = Instant::now() + Duration::from_secs(60);
        let mut starts = Vec::new();
        for _ in 0..35 {
            let _slot = b.acquire(Priority::App, far).await.unwrap();
            starts.push(Instant::now());
        }
        for (i, t) in starts.iter().enumerate() {
            let in_window = starts[i..]
                .iter()
                .filter(|s| s.duration_since(*t) < Duration::from_millis(1000))
                .count();
            assert!(in_window <= 10, "{in_window} calls within one window");
        }
        // 35 calls at 10 per (1 s + 2 %) take a bit more than 3 windows.
        let span = starts.last().unwrap().duration_since(starts[0]);
        assert!(
            span >= Duration::from_millis(3000) && span < Duration::from_millis(3300),
            "{span:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_counts_until_a_window_after_it_ends() {
        let b = budget(1, 1000);
        let far = Instant::now() + Duration::from_secs(60);
        let start = Instant::now();
        let slot = b.acquire(Priority::App, far).await.unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await; // a slow exchange
        drop(slot);
        b.acquire(Priority::App, far).await.unwrap();
        assert!(
            start.elapsed() >= Duration::from_millis(6_020),
            "{:?}",
            start.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_past_its_deadline_is_told_when_to_come_back() {
        let b = budget(2, 1000);
        let soon = Instant::now() + Duration::from_millis(100);
        drop(b.acquire(Priority::App, soon).await.unwrap());
        drop(b.acquire(Priority::App, soon).await.unwrap());
        let err = b.acquire(Priority::App, soon).await.err().unwrap();
        assert!(err.retry_after > Duration::from_millis(800));
        assert_eq!(Instant::now(), soon);
    }

    #[tokio::test(start_paused = true)]
    async fn polls_leave_the_last_tenth_to_apps() {
        let b = budget(10, 1000);
        let soon = Instant::now() + Duration::from_millis(10);
        for _ in 0..9 {
            drop(b.acquire(Priority::Poll, soon).await.unwrap());
        }
        assert!(
            b.acquire(Priority::Poll, soon).await.is_err(),
            "polls stop at 90 %"
        );
        assert!(
            b.acquire(Priority::App, soon).await.is_ok(),
            "apps may use the rest"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_closes_the_budget_for_retry_after_at_most_a_window() {
        let b = budget(100, 5000);
        let start = Instant::now();
        b.penalise(Some(Duration::from_secs(2)));
        drop(
            b.acquire(Priority::App, start + Duration::from_secs(10))
                .await
                .unwrap(),
        );
        assert!(start.elapsed() >= Duration::from_secs(2));
        let start = Instant::now();
        b.penalise(Some(Duration::from_secs(3600)));
        drop(
            b.acquire(Priority::App, start + Duration::from_secs(60))
                .await
                .unwrap(),
        );
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(5100) && waited < Duration::from_millis(5200),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn in_flight_is_bounded() {
        let b = Arc::new(Budget::new(
            RateLimit {
                requests: 1000,
                per: Duration::from_secs(1),
            },
            2,
        ));
        let far = Instant::now() + Duration::from_secs(1);
        let one = b.acquire(Priority::App, far).await.unwrap();
        let _two = b.acquire(Priority::App, far).await.unwrap();
        assert!(b
            .acquire(Priority::App, Instant::now() + Duration::from_millis(50))
            .await
            .is_err());
        drop(one);
        assert!(b.acquire(Priority::App, far).await.is_ok());
    }
}
