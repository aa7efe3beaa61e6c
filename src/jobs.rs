//! Job trackers: one per Rutter job id, shared by every request waiting on that job, completed by
//! whichever source reports a terminal status first (DESIGN §5).
//!
//! A tracker is created by the first waiter and owns a poll task that fetches `GET /jobs/:id` on a
//! backoff schedule with full jitter. Other completion sources (job webhooks) call
//! [`JobRegistry::complete`]; the first completion wins and later ones are ignored, so a delivered
//! result is never overridden. A tracker outlives its waiters: when the app disconnects the job is
//! still followed to its end (bounded by `jobs.track_for` and `jobs.max_tracked`), and its result stays
//! for `jobs.keep_completed` so a retry can pick it up. A completion for a job nobody tracks yet is kept
//! the same way, so a waiter that arrives a moment later is answered at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, Uri};
use rand::Rng;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::body;
use crate::config::{FacadeConfig, JobsConfig};
use crate::error::ProxyError;
use crate::upstream::{CallKind, Upstream};

/// Largest job object the sidecar reads from a poll.
pub const MAX_JOB_BYTES: usize = 32 * 1024 * 1024;

/// Longest `Retry-After` honoured on a poll; a longer one is clipped (the request deadline still rules).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// A finished job as the app will see it: the synchronous status and body.
#[derive(Debug, Clone)]
pub struct JobResult {
    /// The job id.
    pub job_id: String,
    /// The job's terminal status (`success`, `failure`, `partial_success`, ...).
    pub status: String,
    /// `job.response.http_status`.
    pub http_status: StatusCode,
    /// `job.response.body`, as the exact JSON bytes Rutter sent.
    pub body: Bytes,
}

/// What a tracker ends with: the job's result, or why there is none.
pub type Outcome = Result<JobResult, ProxyError>;

/// How the tracker fetches the job: the URL and the headers (credentials, `X-Rutter-Version`).
#[derive(Debug, Clone)]
pub struct PollTarget {
    /// Absolute URL of `GET /jobs/:id` on the configured upstream.
    pub uri: Uri,
    /// Headers sent with each poll.
    pub headers: HeaderMap,
    /// Poll at once instead of after `poll_initial` (the `async_response` already said the job ended).
    pub poll_now: bool,
}

/// The AsynchronousJob object, as far as the sidecar reads it.
#[derive(Debug, Deserialize)]
pub struct JobObject {
    /// Job id.
    pub id: String,
    /// `prequeued`, `pending`, `success`, `partial_success`, `failure`.
    pub status: String,
    /// The would-be synchronous response, present once the job ended.
    #[serde(default)]
    pub response: Option<JobResponse>,
}

/// `job.response`.
#[derive(Debug, Deserialize)]
pub struct JobResponse {
    /// The HTTP status a synchronous call would have returned.
    #[serde(default)]
    pub http_status: Option<serde_json::Value>,
    /// The body a synchronous call would have returned, as raw JSON.
    #[serde(default)]
    pub body: Option<Box<RawValue>>,
}

/// Whether a job status is terminal. Unknown statuses count as terminal only when a response is
/// present, so a new status name can neither hang a wait nor end it early.
pub fn is_terminal(job: &JobObject) -> bool {
    match job.status.as_str() {
        "success" | "failure" | "partial_success" => true,
        "prequeued" | "pending" => false,
        _ => job.response.is_some(),
    }
}

/// The outcome of a terminal job: its response, or `JOB_RESULT_INVALID` when it has none usable.
pub fn terminal_outcome(job: &JobObject) -> Outcome {
    let invalid = |reason: &str| ProxyError::JobResultInvalid {
        job_id: job.id.clone(),
        reason: reason.into(),
    };
    let response = job
        .response
        .as_ref()
        .ok_or_else(|| invalid("the finished job has no response"))?;
    let status = response
        .http_status
        .as_ref()
        .and_then(|v| v.as_u64())
        .and_then(|v| u16::try_from(v).ok())
        // A final response is 2xx–5xx: 1xx would break HTTP framing towards the app.
        .filter(|v| (200..=599).contains(v))
        .and_then(|v| StatusCode::from_u16(v).ok())
        .ok_or_else(|| {
            invalid("the job's response.http_status is missing or not an HTTP status")
        })?;
    let body = match &response.body {
        Some(raw) => Bytes::copy_from_slice(raw.get().as_bytes()),
        None => Bytes::from_static(b"null"),
    };
    Ok(JobResult {
        job_id: job.id.clone(),
        status: job.status.clone(),
        http_status: status,
        body,
    })
}

/// The poll schedule: `poll_initial`, then exponential backoff with full jitter, never below
/// `poll_initial` and never above the cap (`poll_max`, or `poll_max_with_webhooks` while webhooks arrive).
#[derive(Debug, Clone, Copy)]
pub struct PollSchedule {
    /// Delay before the first poll and the shortest interval.
    pub initial: Duration,
    /// Longest interval while polling alone.
    pub max: Duration,
    /// Longest interval while webhooks are arriving.
    pub max_with_webhooks: Duration,
}

impl PollSchedule {
    /// The schedule configured in `[facade]`.
    pub fn from_config(facade: &FacadeConfig) -> Self {
        PollSchedule {
            initial: facade.poll_initial,
            max: facade.poll_max,
            max_with_webhooks: facade.poll_max_with_webhooks,
        }
    }

    /// The upper bound of the `attempt`-th interval (0 is the first poll).
    pub fn ceiling(&self, attempt: u32, webhooks_active: bool) -> Duration {
        let cap = if webhooks_active {
            self.max_with_webhooks
        } else {
            self.max
        };
        let grown = self
            .initial
            .saturating_mul(2u32.saturating_pow(attempt.min(30)));
        grown.min(cap).max(self.initial)
    }

    /// The delay before poll number `attempt`: exactly `initial` for the first, then uniform in
    /// `[initial, ceiling]`.
    pub fn delay(&self, attempt: u32, webhooks_active: bool, rng: &mut impl Rng) -> Duration {
        if attempt == 0 {
            return self.initial;
        }
        let ceiling = self.ceiling(attempt, webhooks_active);
        if ceiling <= self.initial {
            return self.initial;
        }
        rng.random_range(self.initial..=ceiling)
    }
}

/// Why a wait could not be registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrackError {
    /// `jobs.max_tracked` trackers already exist.
    TooManyJobs,
}

struct Tracker {
    outcome: watch::Sender<Option<Arc<Outcome>>>,
    /// Tells the poll task to stop: the tracker was evicted to make room.
    evicted: tokio::sync::Notify,
}

impl Tracker {
    fn new() -> (Arc<Self>, watch::Receiver<Option<Arc<Outcome>>>) {
        let (outcome, rx) = watch::channel(None);
        (
            Arc::new(Tracker {
                outcome,
                evicted: tokio::sync::Notify::new(),
            }),
            rx,
        )
    }

    /// Finished, or followed by nobody but its own poll task: may be evicted when the registry is full.
    fn evictable(&self) -> bool {
        self.outcome.borrow().is_some() || self.outcome.receiver_count() <= 1
    }
}

/// Counters for operations and tests.
#[derive(Debug, Default)]
pub struct JobStats {
    /// Polls sent upstream.
    pub polls: AtomicU64,
    /// Trackers created.
    pub trackers_created: AtomicU64,
    /// Jobs completed by a poll.
    pub completed_by_poll: AtomicU64,
    /// Jobs completed by another source (webhooks).
    pub completed_externally: AtomicU64,
    /// Trackers dropped after `jobs.track_for` with nobody waiting.
    pub abandoned: AtomicU64,
    /// Trackers evicted to make room under `jobs.max_tracked` (finished, or nobody waiting).
    pub evicted: AtomicU64,
}

/// All trackers of this process.
pub struct JobRegistry {
    trackers: Mutex<HashMap<String, Arc<Tracker>>>,
    upstream: Upstream,
    schedule: PollSchedule,
    limits: JobsConfig,
    webhooks_seen_at: Mutex<Option<Instant>>,
    stats: JobStats,
}

/// One request's wait on a job.
pub struct Waiter {
    job_id: String,
    rx: watch::Receiver<Option<Arc<Outcome>>>,
}

impl Waiter {
    /// The job id waited on.
    pub fn job_id(&self) -> &str {
        &self.job_id
    }

    /// Waits until the job's outcome is known (`None` if the tracker was dropped without one).
    pub async fn wait(&mut self) -> Option<Arc<Outcome>> {
        self.rx
            .wait_for(|o| o.is_some())
            .await
            .ok()
            .and_then(|outcome| outcome.clone())
    }

    /// The outcome, if it is known now.
    pub fn current(&self) -> Option<Arc<Outcome>> {
        self.rx.borrow().clone()
    }

    /// Waits until the job's outcome is known or `deadline` passes (`None`).
    pub async fn wait_until(&mut self, deadline: Instant) -> Option<Arc<Outcome>> {
        let waited = tokio::time::timeout_at(deadline, self.rx.wait_for(|o| o.is_some()))
            .await
            .ok()
            .and_then(|r| r.ok().and_then(|outcome| outcome.clone()));
        // Without an outcome the deadline passed, or the tracker was dropped (track_for passed).
        waited.or_else(|| self.rx.borrow().clone())
    }
}

impl JobRegistry {
    /// A registry polling through `upstream`.
    pub fn new(upstream: Upstream, schedule: PollSchedule, limits: JobsConfig) -> Arc<Self> {
        Arc::new(JobRegistry {
            trackers: Mutex::new(HashMap::new()),
            upstream,
            schedule,
            limits,
            webhooks_seen_at: Mutex::new(None),
            stats: JobStats::default(),
        })
    }

    /// Counters.
    pub fn stats(&self) -> &JobStats {
        &self.stats
    }

    /// Jobs currently tracked (running or recently completed).
    pub fn tracked(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Tracker>>> {
        self.trackers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers a wait on `job_id`, creating its tracker and poll task if this is the first.
    pub fn track(self: &Arc<Self>, job_id: &str, target: PollTarget) -> Result<Waiter, TrackError> {
        let mut trackers = self.lock();
        if let Some(tracker) = trackers.get(job_id) {
            return Ok(Waiter {
                job_id: job_id.to_string(),
                rx: tracker.outcome.subscribe(),
            });
        }
        if trackers.len() >= self.limits.max_tracked && !self.evict_one(&mut trackers) {
            return Err(TrackError::TooManyJobs);
        }
        let (tracker, rx) = Tracker::new();
        trackers.insert(job_id.to_string(), tracker.clone());
        drop(trackers);
        self.stats.trackers_created.fetch_add(1, Ordering::Relaxed);
        let registry = Arc::clone(self);
        let id = job_id.to_string();
        tokio::spawn(async move { registry.poll_loop(id, tracker, target).await });
        Ok(Waiter {
            job_id: job_id.to_string(),
            rx,
        })
    }

    /// Makes room by dropping a finished tracker, or else one nobody waits on any more (its poll task
    /// stops). False if every tracker has a waiter.
    fn evict_one(&self, trackers: &mut HashMap<String, Arc<Tracker>>) -> bool {
        let finished = trackers.iter().find(|(_, t)| t.outcome.borrow().is_some());
        let victim = finished
            .or_else(|| trackers.iter().find(|(_, t)| t.evictable()))
            .map(|(id, _)| id.clone());
        match victim.and_then(|id| trackers.remove(&id)) {
            Some(tracker) => {
                tracker.evicted.notify_one();
                self.stats.evicted.fetch_add(1, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    /// Completes `job_id` from another source (a verified job webhook) with a terminal job object.
    /// Returns false when the job already had an outcome (duplicates change nothing). A job nobody
    /// tracks yet is remembered for `jobs.keep_completed`, within `jobs.max_tracked`.
    pub fn complete(self: &Arc<Self>, job: &JobObject) -> bool {
        if !is_terminal(job) {
            return false;
        }
        *self
            .webhooks_seen_at
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        let outcome = terminal_outcome(job);
        let mut trackers = self.lock();
        let tracker = match trackers.get(&job.id) {
            Some(tracker) => tracker.clone(),
            None => {
                if trackers.len() >= self.limits.max_tracked {
                    return false;
                }
                let (tracker, _) = Tracker::new();
                trackers.insert(job.id.clone(), tracker.clone());
                tracker
            }
        };
        drop(trackers);
        let changed = self.finish(&job.id, &tracker, outcome);
        if changed {
            self.stats
                .completed_externally
                .fetch_add(1, Ordering::Relaxed);
        }
        changed
    }

    /// Whether job webhooks arrived recently (within twice the webhook poll cap).
    fn webhooks_active(&self) -> bool {
        let seen = *self
            .webhooks_seen_at
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        seen.is_some_and(|at| at.elapsed() < self.schedule.max_with_webhooks.saturating_mul(2))
    }

    /// Sets the outcome if none is set yet and schedules the tracker's removal.
    fn finish(self: &Arc<Self>, job_id: &str, tracker: &Arc<Tracker>, outcome: Outcome) -> bool {
        let outcome = Arc::new(outcome);
        let changed = tracker.outcome.send_if_modified(|current| {
            if current.is_some() {
                return false;
            }
            *current = Some(outcome);
            true
        });
        if changed {
            let registry = Arc::clone(self);
            let tracker = Arc::clone(tracker);
            let id = job_id.to_string();
            let keep = self.limits.keep_completed;
            tokio::spawn(async move {
                tokio::time::sleep(keep).await;
                registry.remove(&id, &tracker);
            });
        }
        changed
    }

    fn remove(&self, job_id: &str, tracker: &Arc<Tracker>) {
        let mut trackers = self.lock();
        if trackers
            .get(job_id)
            .is_some_and(|t| Arc::ptr_eq(t, tracker))
        {
            trackers.remove(job_id);
        }
    }

    async fn poll_loop(self: Arc<Self>, job_id: String, tracker: Arc<Tracker>, target: PollTarget) {
        let mut finished = tracker.outcome.subscribe();
        let mut attempt: u32 = 0;
        let mut delay = if target.poll_now {
            Duration::ZERO
        } else {
            self.schedule.delay(0, false, &mut rand::rng())
        };
        let mut alone_since: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = has_outcome(&mut finished) => return,
                _ = tracker.evicted.notified() => return,
            }
            if tracker.outcome.borrow().is_some() {
                return;
            }
            // Our own receiver counts as one.
            if tracker.outcome.receiver_count() <= 1 {
                let since = *alone_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= self.limits.track_for {
                    self.stats.abandoned.fetch_add(1, Ordering::Relaxed);
                    self.remove(&job_id, &tracker);
                    return;
                }
            } else {
                alone_since = None;
            }
            attempt = attempt.saturating_add(1);
            // While webhooks arrive, or while nobody waits any more, polls may be further apart.
            let webhooks = self.webhooks_active() || alone_since.is_some();
            // Boxed: between polls (most of a job's life) the loop holds only its own small state.
            match Box::pin(self.poll_once(&job_id, &target)).await {
                PollResult::Done(outcome) => {
                    if self.finish(&job_id, &tracker, outcome) {
                        self.stats.completed_by_poll.fetch_add(1, Ordering::Relaxed);
                    }
                    return;
                }
                PollResult::Pending => {
                    delay = self.schedule.delay(attempt, webhooks, &mut rand::rng());
                }
                PollResult::SlowDown(retry_after) => {
                    let ceiling = self.schedule.ceiling(attempt, webhooks);
                    delay = retry_after.map_or(ceiling, |r| {
                        r.min(MAX_RETRY_AFTER).max(self.schedule.initial)
                    });
                    attempt = attempt.saturating_add(1);
                }
            }
        }
    }

    async fn poll_once(&self, job_id: &str, target: &PollTarget) -> PollResult {
        self.stats.polls.fetch_add(1, Ordering::Relaxed);
        let mut request = Request::new(body::empty());
        *request.method_mut() = Method::GET;
        *request.uri_mut() = target.uri.clone();
        *request.headers_mut() = target.headers.clone();
        // A poll waits for the rate budget at most as long as the longest poll interval; if the
        // budget stays spent, the job is polled again later.
        let budget_deadline = Instant::now() + self.schedule.max_with_webhooks;
        let (parts, bytes) = match self
            .upstream
            .send_buffered(request, CallKind::Poll, budget_deadline, MAX_JOB_BYTES)
            .await
        {
            Ok(answer) => answer,
            Err(failure) => {
                tracing::debug!(job_id, error = %failure.error, "job poll failed; will retry");
                return PollResult::Pending;
            }
        };
        classify_poll(job_id, parts.status, &parts.headers, &bytes)
    }
}

/// Resolves once the tracker has an outcome.
async fn has_outcome(rx: &mut watch::Receiver<Option<Arc<Outcome>>>) {
    let _ = rx.wait_for(|o| o.is_some()).await;
}

/// What one poll tells the tracker.
#[derive(Debug)]
enum PollResult {
    /// The job ended (or can never be answered).
    Done(Outcome),
    /// Not finished, or a transient failure: poll again on the schedule.
    Pending,
    /// Rate limited: wait at least this long (or the schedule's ceiling).
    SlowDown(Option<Duration>),
}

/// Reads `Retry-After` as delta-seconds (the form APIs use; an HTTP-date is ignored).
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(http::header::RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

fn classify_poll(
    job_id: &str,
    status: StatusCode,
    headers: &HeaderMap,
    bytes: &[u8],
) -> PollResult {
    match status.as_u16() {
        200..=299 => {
            let job: JobObject = match serde_json::from_slice(bytes) {
                Ok(job) => job,
                Err(_) => {
                    return PollResult::Done(Err(ProxyError::JobResultInvalid {
                        job_id: job_id.into(),
                        reason: "the job object is not valid JSON of the expected shape".into(),
                    }))
                }
            };
            if job.id != job_id {
                return PollResult::Done(Err(ProxyError::JobResultInvalid {
                    job_id: job_id.into(),
                    reason: "the fetched job has a different id".into(),
                }));
            }
            if is_terminal(&job) {
                PollResult::Done(terminal_outcome(&job))
            } else {
                PollResult::Pending
            }
        }
        404 | 410 => PollResult::Done(Err(ProxyError::JobNotFound {
            job_id: job_id.into(),
            status: status.as_u16(),
        })),
        429 | 452 => PollResult::SlowDown(retry_after(headers)),
        408 | 500..=599 => PollResult::Pending,
        other => PollResult::Done(Err(ProxyError::JobPollRejected {
            job_id: job_id.into(),
            status: other,
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn schedule() -> PollSchedule {
        PollSchedule {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(5),
            max_with_webhooks: Duration::from_secs(15),
        }
    }

    #[test]
    fn schedule_grows_with_jitter_between_floor_and_cap() {
        let s = schedule();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        assert_eq!(s.delay(0, false, &mut rng), Duration::from_millis(500));
        let ceilings: Vec<u64> = (0..8)
            .map(|a| s.ceiling(a, false).as_millis() as u64)
            .collect();
        assert_eq!(ceilings, [500, 1000, 2000, 4000, 5000, 5000, 5000, 5000]);
        assert_eq!(s.ceiling(10, true), Duration::from_secs(15));
        assert_eq!(s.ceiling(u32::MAX, false), Duration::from_secs(5));
        for attempt in 1..50 {
            let d = s.delay(attempt, false, &mut rng);
            assert!(
                d >= s.initial && d <= s.ceiling(attempt, false),
                "{attempt}: {d:?}"
            );
        }
    }

    /// The number of polls a job of `duration` costs, averaged over many seeded schedules.
    fn mean_polls(duration: Duration) -> f64 {
        let s = schedule();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let runs = 10_000;
        let mut total = 0u64;
        for _ in 0..runs {
            let mut at = Duration::ZERO;
            let mut attempt = 0;
            loop {
                at += s.delay(attempt, false, &mut rng);
                attempt += 1;
                if at >= duration {
                    break;
                }
            }
            total += attempt as u64;
        }
        total as f64 / runs as f64
    }

    #[test]
    fn a_ten_second_job_costs_about_six_polls() {
        let polls = mean_polls(Duration::from_secs(10));
        assert!((5.0..=7.5).contains(&polls), "{polls}");
    }

    fn job(json: &str) -> JobObject {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn terminal_table() {
        assert!(!is_terminal(&job(r#"{"id":"a","status":"pending"}"#)));
        assert!(!is_terminal(&job(r#"{"id":"a","status":"prequeued"}"#)));
        assert!(is_terminal(&job(
            r#"{"id":"a","status":"success","response":{"http_status":200,"body":{}}}"#
        )));
        assert!(is_terminal(&job(r#"{"id":"a","status":"failure"}"#)));
        assert!(is_terminal(&job(
            r#"{"id":"a","status":"partial_success"}"#
        )));
        assert!(!is_terminal(&job(r#"{"id":"a","status":"cancelling"}"#)));
        assert!(is_terminal(&job(
            r#"{"id":"a","status":"cancelled","response":{"http_status":409}}"#
        )));
    }

    #[test]
    fn outcome_keeps_the_body_bytes() {
        let j = job(
            r#"{"id":"a","status":"success","response":{"http_status":201,"body":{"b":1.50, "u":"ü"}}}"#,
        );
        let r = terminal_outcome(&j).unwrap();
        assert_eq!(r.http_status, StatusCode::CREATED);
        assert_eq!(&r.body[..], r#"{"b":1.50, "u":"ü"}"#.as_bytes());
        for bad in [
            r#"{"id":"a","status":"success"}"#,
            r#"{"id":"a","status":"success","response":{"body":{}}}"#,
            r#"{"id":"a","status":"success","response":{"http_status":"200"}}"#,
            r#"{"id":"a","status":"success","response":{"http_status":99}}"#,
            r#"{"id":"a","status":"success","response":{"http_status":101}}"#,
            r#"{"id":"a","status":"success","response":{"http_status":199}}"#,
            r#"{"id":"a","status":"success","response":{"http_status":70000}}"#,
        ] {
            let err = terminal_outcome(&job(bad)).unwrap_err();
            assert_eq!(err.code(), "JOB_RESULT_INVALID", "{bad}");
        }
    }

    #[test]
    fn poll_classification() {
        let h = HeaderMap::new();
        let ok = |b: &str| classify_poll("a", StatusCode::OK, &h, b.as_bytes());
        assert!(matches!(
            ok(r#"{"id":"a","status":"pending"}"#),
            PollResult::Pending
        ));
        assert!(matches!(
            ok(r#"{"id":"a","status":"success","response":{"http_status":200}}"#),
            PollResult::Done(Ok(_))
        ));
        assert!(matches!(
            ok(r#"{"id":"b","status":"success"}"#),
            PollResult::Done(Err(_))
        ));
        assert!(matches!(ok("<html>"), PollResult::Done(Err(_))));
        let mut retry = HeaderMap::new();
        retry.insert("retry-after", "3".parse().unwrap());
        assert!(matches!(
            classify_poll("a", StatusCode::TOO_MANY_REQUESTS, &retry, b""),
            PollResult::SlowDown(Some(d)) if d == Duration::from_secs(3)
        ));
        assert!(matches!(
            classify_poll("a", StatusCode::from_u16(452).unwrap(), &h, b""),
            PollResult::SlowDown(None)
        ));
        assert!(matches!(
            classify_poll("a", StatusCode::SERVICE_UNAVAILABLE, &h, b""),
            PollResult::Pending
        ));
        assert!(matches!(
            classify_poll("a", StatusCode::NOT_FOUND, &h, b""),
            PollResult::Done(Err(ProxyError::JobNotFound { status: 404, .. }))
        ));
        assert!(matches!(
            classify_poll("a", StatusCode::GONE, &h, b""),
            PollResult::Done(Err(_))
        ));
        assert!(matches!(
            classify_poll("a", StatusCode::UNAUTHORIZED, &h, b""),
            PollResult::Done(Err(ProxyError::JobPollRejected { status: 401, .. }))
        ));
    }
}
