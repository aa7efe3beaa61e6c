//! The process's shutdown state (DESIGN §8), shared by the listeners and the request pipeline:
//! `draining` (SIGTERM received: `/ready` answers 503) and `grace over` (`shutdown.grace` passed:
//! waiting requests get their `on_timeout` reply, new ones `SHUTTING_DOWN`).

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// How long after the grace an exchange already under way may still run, so that its answer (and the
/// job id in it) reaches the app before the process stops.
pub const AFTER_GRACE: Duration = Duration::from_secs(4);

/// Shared shutdown flags.
pub struct Lifecycle {
    draining: watch::Sender<bool>,
    grace_over: watch::Sender<bool>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle {
            draining: watch::channel(false).0,
            grace_over: watch::channel(false).0,
        }
    }
}

impl Lifecycle {
    /// Marks the start of shutdown: readiness turns false.
    pub fn start_draining(&self) {
        self.draining.send_replace(true);
    }

    /// Whether shutdown has begun.
    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// Marks the end of the grace period: every wait ends now.
    pub fn end_grace(&self) {
        self.draining.send_replace(true);
        self.grace_over.send_replace(true);
    }

    /// Whether the grace period has ended.
    pub fn is_grace_over(&self) -> bool {
        *self.grace_over.borrow()
    }

    /// Resolves when the grace period ends.
    pub fn grace_over(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.grace_over.subscribe();
        async move {
            let _ = rx.wait_for(|over| *over).await;
        }
    }

    /// Resolves [`AFTER_GRACE`] after the grace period ends: the last moment for exchanges under way.
    pub fn cutoff(&self) -> impl Future<Output = ()> + Send + 'static {
        let grace = self.grace_over();
        async move {
            grace.await;
            tokio::time::sleep(AFTER_GRACE).await;
        }
    }

    /// Runs `work` until it finishes or the shutdown cutoff passes (`None`).
    pub async fn until_cutoff<F: Future>(&self, work: F) -> Option<F::Output> {
        let cutoff = self.cutoff();
        tokio::select! {
            out = work => Some(out),
            _ = cutoff => None,
        }
    }

    /// Runs `work` until it finishes, `deadline` passes, or the grace period ends (`None` for the
    /// latter two).
    pub async fn within<F: Future>(&self, deadline: Instant, work: F) -> Option<F::Output> {
        let grace = self.grace_over();
        tokio::select! {
            out = work => Some(out),
            _ = tokio::time::sleep_until(deadline) => None,
            _ = grace => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn waits_end_at_the_deadline_or_the_grace_whichever_is_first() {
        let lifecycle = std::sync::Arc::new(Lifecycle::default());
        let far = Instant::now() + Duration::from_secs(3600);
        let done = lifecycle.within(far, async { 7 }).await;
        assert_eq!(done, Some(7));
        let soon = Instant::now() + Duration::from_secs(1);
        assert_eq!(
            lifecycle.within(soon, std::future::pending::<()>()).await,
            None
        );
        let l = lifecycle.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            l.end_grace();
        });
        let start = Instant::now();
        assert_eq!(
            lifecycle.within(far, std::future::pending::<()>()).await,
            None
        );
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        assert!(lifecycle.is_draining() && lifecycle.is_grace_over());
    }
}
