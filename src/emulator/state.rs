//! The emulator's shared state: jobs and their lifecycle, the idempotency table, the organisation
//! rate budget, counters, the ring of seen requests, and the "job reached a terminal status" hook
//! (which also hands the job to [`super::webhooks`]).
//!
//! Lock order (never taken the other way round): `idempotency` → `jobs` → `entities`; `rng`,
//! `seen` and `rate` are leaves, held only for a few instructions.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode, Version};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};
use tokio::sync::{broadcast, oneshot, watch};
use tokio::time::Instant;

use super::entities::{Effect, EntityStore};
use super::options::EmulatorOptions;
use super::webhooks::{self, WebhookPlan, WebhookSender};
use super::wire::{BadJob, PollFault, Terminal};
use crate::routes::RouteTable;

/// Most jobs kept; the oldest are forgotten beyond it (their polls then answer 404).
const MAX_JOBS: usize = 100_000;
/// Most idempotency keys kept; the oldest are forgotten beyond it.
const MAX_IDEMPOTENCY_KEYS: usize = 100_000;
/// Most `X-Emulator-Fault-Times` scopes remembered; the oldest are forgotten beyond it.
const MAX_FAULT_SCOPES: usize = 100_000;
/// Most requests kept by [`super::Emulator::seen`].
const MAX_SEEN: usize = 50_000;
/// Most body bytes kept by [`super::Emulator::seen`] over all requests.
const MAX_SEEN_BYTES: usize = 256 * 1024 * 1024;
/// Capacity of the completion broadcast; slow subscribers miss the oldest events.
const COMPLETION_CAPACITY: usize = 4096;

/// Locks a mutex, ignoring poisoning (the data stays consistent: no code panics while holding one).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        /// A snapshot of the emulator's counters (see [`super::Emulator::counters`]).
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct Counters {
            $($(#[$doc])* pub $name: u64,)*
        }

        #[derive(Debug, Default)]
        pub(crate) struct CounterCells {
            $(pub(crate) $name: AtomicU64,)*
        }

        impl CounterCells {
            pub(crate) fn snapshot(&self) -> Counters {
                Counters { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }
    };
}

counters! {
    /// Every request received (including ones later reset or refused).
    requests,
    /// Requests with method POST, PUT, PATCH or DELETE.
    write_requests,
    /// Writes that created a new job (accepted writes; replays not included).
    writes_accepted,
    /// Requests answered from an existing job because of a matching `Idempotency-Key`.
    idempotent_replays,
    /// Requests refused with 409 because their `Idempotency-Key` was used with another request.
    idempotency_conflicts,
    /// `GET /jobs/:id` requests that reached the job table (known or unknown ids).
    polls,
    /// 429 answers sent (budget, `X-Emulator-Status`, poll faults).
    rate_limited,
    /// 452 answers sent.
    platform_limited,
    /// 5xx answers sent.
    server_errors,
    /// 401 answers sent (the Basic-auth check, or scripted).
    unauthorized,
    /// Connections closed (or HTTP/2 streams reset) instead of answering.
    resets,
    /// Answers cut short on purpose (`X-Emulator-Truncate`, the `truncate` poll fault).
    truncated,
    /// Answers sent in chunks some time apart (`X-Emulator-Drip-Ms`).
    dripped,
    /// Connections closed on purpose right after an answer (`X-Emulator-Close`, the `close` poll
    /// fault).
    closed_after_answer,
    /// Jobs created (writes and report GETs).
    jobs_created,
    /// Jobs that reached a terminal status.
    jobs_finished,
    /// Job-backed requests answered with the job's result (held `prefer_sync` or `X-Emulator-Sync`).
    sync_answers,
    /// `async_response` answers sent.
    async_answers,
    /// List GETs answered.
    list_requests,
    /// Webhook POSTs attempted: first tries, copies and retries (and [`super::Emulator::send_webhook`]).
    webhooks_sent,
    /// Webhook copies the receiver answered with a 2xx (and 2xx answers to `send_webhook`).
    webhooks_delivered,
    /// Webhook copies given up after the last retry (non-2xx answers or transport errors).
    webhooks_failed,
    /// Webhook copies never sent: the drop knob or rate, or the pending queue was full.
    webhooks_dropped,
    /// Webhook delivery attempts that were retries.
    webhook_retries,
}

/// Adds one to a counter.
pub(crate) fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// One request as the emulator received it (see [`super::Emulator::seen`]).
#[derive(Debug, Clone)]
pub struct SeenRequest {
    /// The method.
    pub method: Method,
    /// Path and query exactly as received (for HTTP/2, from `:path`).
    pub path_and_query: String,
    /// The HTTP version.
    pub version: Version,
    /// Every header as received.
    pub headers: HeaderMap,
    /// The full body (empty when it exceeded the emulator's 16 MiB limit).
    pub body: Bytes,
    /// When the request head arrived (tokio time).
    pub at: Instant,
}

/// A job reached a terminal status: what the completion hook carries (see
/// [`super::Emulator::completions`]). The `JOB_COMPLETED` webhook is built from it.
#[derive(Debug, Clone)]
pub struct JobCompleted {
    /// The job id.
    pub job_id: String,
    /// The job object as `GET /jobs/:id` returns it at that moment.
    pub job: Value,
    /// The `access_token` of the request that created the job, if any.
    pub access_token: Option<String>,
    /// When the job finished (tokio time).
    pub at: Instant,
}

/// What a job will end with, decided when it is accepted.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    /// Terminal status.
    pub status: Terminal,
    /// `response.http_status`.
    pub http_status: StatusCode,
    /// `response.body`.
    pub body: Value,
    /// Applied to the entity store when the job finishes without failure.
    pub effect: Option<Effect>,
}

/// One job.
#[derive(Debug)]
pub(crate) struct Job {
    /// Job id (UUID).
    pub id: String,
    /// When it was accepted.
    pub started: Instant,
    /// How long it runs.
    pub duration: Duration,
    /// The job's `request` object.
    pub request: Value,
    /// The creating request's `access_token`.
    pub access_token: Option<String>,
    /// What it ends with.
    pub plan: Plan,
    /// Whether it reached its terminal status.
    pub finished: bool,
    /// `X-Emulator-Never-Finish`.
    pub never_finish: bool,
    /// `X-Emulator-Bad-Job`.
    pub bad: Option<BadJob>,
    /// Scripted answers still to give to polls.
    pub poll_faults: VecDeque<PollFault>,
    /// `Retry-After` on poll faults.
    pub poll_retry_after: Option<u64>,
    /// The announced `response_url`.
    pub response_url: String,
    /// Status of its `async_response` answers.
    pub async_status: StatusCode,
    /// Flips to `true` once, when the job finishes; held requests wait on it.
    pub done: watch::Sender<bool>,
    /// How its `JOB_COMPLETED` webhook is sent.
    pub webhook: WebhookPlan,
    /// Told when the webhook's first delivery attempt ended (or that there will be none):
    /// the request that asked for early delivery waits on it.
    pub webhook_notify: Option<oneshot::Sender<()>>,
}

impl Job {
    /// Whether the job's time is up (and it may be finished now).
    pub(crate) fn due(&self, now: Instant) -> bool {
        !self.finished && !self.never_finish && now >= self.started + self.duration
    }

    /// The current status name.
    pub(crate) fn status(&self, now: Instant) -> &'static str {
        if self.finished {
            self.plan.status.as_str()
        } else if now < self.started + self.duration / 10 {
            "prequeued"
        } else {
            "pending"
        }
    }

    /// The job object as `GET /jobs/:id` returns it.
    pub(crate) fn value(&self, now: Instant) -> Value {
        let mut job = Map::new();
        job.insert("id".into(), Value::String(self.id.clone()));
        job.insert("status".into(), Value::String(self.status(now).into()));
        job.insert("request".into(), self.request.clone());
        if self.finished && self.bad != Some(BadJob::NoResponse) {
            job.insert(
                "response".into(),
                json!({ "http_status": self.plan.http_status.as_u16(), "body": self.plan.body }),
            );
        }
        Value::Object(job)
    }

    /// The `async_response` answer body.
    pub(crate) fn async_response(&self, now: Instant) -> Value {
        json!({ "async_response": {
            "id": self.id, "response_url": self.response_url, "status": self.status(now)
        }})
    }
}

/// All jobs, with their creation order for eviction.
#[derive(Debug, Default)]
pub(crate) struct JobTable {
    /// Jobs by id.
    pub map: HashMap<String, Job>,
    order: VecDeque<String>,
}

/// Scope of an idempotency key: (access_token, method, path, key).
pub(crate) type IdempotencyScope = (Option<String>, Method, String, String);

/// What a key was first used for.
#[derive(Debug, Clone)]
pub(crate) struct IdempotencyEntry {
    /// Hash of the first request (see `jobs::fingerprint`).
    pub fingerprint: u64,
    /// The job it created.
    pub job_id: String,
}

/// Keys seen on accepted job-backed POST/PATCH requests.
#[derive(Debug, Default)]
pub(crate) struct IdempotencyTable {
    /// Entries by scope.
    pub map: HashMap<IdempotencyScope, IdempotencyEntry>,
    order: VecDeque<IdempotencyScope>,
}

impl IdempotencyTable {
    pub(crate) fn insert(&mut self, scope: IdempotencyScope, entry: IdempotencyEntry) {
        while self.map.len() >= MAX_IDEMPOTENCY_KEYS {
            match self.order.pop_front() {
                Some(old) => {
                    self.map.remove(&old);
                }
                None => break,
            }
        }
        if self.map.insert(scope.clone(), entry).is_none() {
            self.order.push_back(scope);
        }
    }
}

/// How many requests each `X-Emulator-Fault-Times` scope has seen, bounded.
#[derive(Debug, Default)]
struct FaultScopes {
    counts: HashMap<u64, u32>,
    order: VecDeque<u64>,
}

#[derive(Debug, Default)]
struct SeenRing {
    items: VecDeque<SeenRequest>,
    bytes: usize,
}

#[derive(Debug, Default)]
struct RateWindow {
    start: Option<Instant>,
    count: u32,
}

/// Everything the connections share.
pub(crate) struct Shared {
    /// The validated options.
    pub options: EmulatorOptions,
    /// `id:secret` when the Basic-auth check is on.
    pub expected_credentials: Option<Vec<u8>>,
    /// TLS configuration when serving HTTPS.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Which routes are job-backed.
    pub routes: RouteTable,
    /// The counters.
    pub counters: CounterCells,
    /// Every job.
    pub jobs: Mutex<JobTable>,
    /// Idempotency keys.
    pub idempotency: Mutex<IdempotencyTable>,
    /// Seeded and created entities.
    pub entities: Mutex<EntityStore>,
    /// The completion hook.
    pub completed: broadcast::Sender<JobCompleted>,
    /// The webhook client, when `webhook_url` is set.
    pub webhooks: Option<WebhookSender>,
    /// This state itself, for tasks spawned from code that only holds `&Shared`.
    pub me: Weak<Shared>,
    rng: Mutex<StdRng>,
    seen: Mutex<SeenRing>,
    rate: Mutex<RateWindow>,
    platform_ids: AtomicU64,
    fault_scopes: Mutex<FaultScopes>,
}

impl Shared {
    pub(crate) fn new(
        options: EmulatorOptions,
        tls: Option<Arc<rustls::ServerConfig>>,
        webhooks: Option<WebhookSender>,
    ) -> Arc<Self> {
        let expected_credentials = match (&options.client_id, &options.client_secret) {
            (Some(id), Some(secret)) => Some(format!("{id}:{secret}").into_bytes()),
            _ => None,
        };
        let rng = match options.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_rng(&mut rand::rng()),
        };
        let (completed, _) = broadcast::channel(COMPLETION_CAPACITY);
        Arc::new_cyclic(|me| Shared {
            entities: Mutex::new(EntityStore::new(options.seed_entities)),
            options,
            expected_credentials,
            tls,
            routes: RouteTable::default(),
            counters: CounterCells::default(),
            jobs: Mutex::new(JobTable::default()),
            idempotency: Mutex::new(IdempotencyTable::default()),
            completed,
            webhooks,
            me: me.clone(),
            rng: Mutex::new(rng),
            seen: Mutex::new(SeenRing::default()),
            rate: Mutex::new(RateWindow::default()),
            platform_ids: AtomicU64::new(1000),
            fault_scopes: Mutex::new(FaultScopes::default()),
        })
    }

    /// Counts one more request in an `X-Emulator-Fault-Times` scope (a hash of method, path and
    /// query, and `Idempotency-Key`) and returns how many it has seen, this one included.
    pub(crate) fn fault_hit(&self, scope: u64) -> u32 {
        let mut scopes = lock(&self.fault_scopes);
        if !scopes.counts.contains_key(&scope) {
            while scopes.counts.len() >= MAX_FAULT_SCOPES {
                match scopes.order.pop_front() {
                    Some(old) => {
                        scopes.counts.remove(&old);
                    }
                    None => break,
                }
            }
            scopes.order.push_back(scope);
        }
        let count = scopes.counts.entry(scope).or_insert(0);
        *count = count.saturating_add(1);
        *count
    }

    /// True with probability `share`.
    pub(crate) fn roll(&self, share: f64) -> bool {
        if share <= 0.0 {
            return false;
        }
        if share >= 1.0 {
            return true;
        }
        lock(&self.rng).random::<f64>() < share
    }

    /// A UUID v4 from the seeded RNG.
    pub(crate) fn new_uuid(&self) -> String {
        let bytes: [u8; 16] = lock(&self.rng).random();
        uuid::Builder::from_random_bytes(bytes)
            .into_uuid()
            .to_string()
    }

    /// The next `platform_id`.
    pub(crate) fn next_platform_id(&self) -> String {
        self.platform_ids
            .fetch_add(1, Ordering::Relaxed)
            .to_string()
    }

    /// Records a request in the bounded ring.
    pub(crate) fn record_seen(&self, request: SeenRequest) {
        let mut seen = lock(&self.seen);
        while !seen.items.is_empty()
            && (seen.items.len() >= MAX_SEEN || seen.bytes + request.body.len() > MAX_SEEN_BYTES)
        {
            if let Some(old) = seen.items.pop_front() {
                seen.bytes -= old.body.len();
            }
        }
        seen.bytes += request.body.len();
        seen.items.push_back(request);
    }

    /// Every recorded request, oldest first.
    pub(crate) fn seen(&self) -> Vec<SeenRequest> {
        lock(&self.seen).items.iter().cloned().collect()
    }

    /// Takes one request from the organisation budget; `Err(seconds)` (rounded up, at least 1)
    /// until the window ends when it is spent.
    pub(crate) fn take_budget(&self, now: Instant) -> Result<(), u64> {
        let limit = self.options.rate_limit;
        if limit == 0 {
            return Ok(());
        }
        let window = Duration::from_millis(self.options.rate_window_ms);
        let mut rate = lock(&self.rate);
        let start = match rate.start {
            Some(start) if now < start + window => start,
            _ => {
                rate.start = Some(now);
                rate.count = 0;
                now
            }
        };
        if rate.count >= limit {
            let left = (start + window).saturating_duration_since(now);
            let seconds = left.as_millis().div_ceil(1000) as u64;
            return Err(seconds.max(1));
        }
        rate.count += 1;
        Ok(())
    }

    /// Stores a new job and schedules its end. A job with zero duration ends at once.
    pub(crate) fn insert_job(self: &Arc<Self>, job: Job) {
        let id = job.id.clone();
        let end = (!job.never_finish).then_some(job.started + job.duration);
        {
            let mut jobs = lock(&self.jobs);
            while jobs.map.len() >= MAX_JOBS {
                match jobs.order.pop_front() {
                    Some(old) => {
                        jobs.map.remove(&old);
                    }
                    None => break,
                }
            }
            jobs.order.push_back(id.clone());
            jobs.map.insert(id.clone(), job);
            inc(&self.counters.jobs_created);
            if let Some(job) = jobs.map.get_mut(&id) {
                if job.due(Instant::now()) {
                    self.finish_locked(job);
                    return;
                }
            }
        }
        if let Some(end) = end {
            let shared = Arc::clone(self);
            tokio::spawn(async move {
                tokio::time::sleep_until(end).await;
                let mut jobs = lock(&shared.jobs);
                if let Some(job) = jobs.map.get_mut(&id) {
                    if !job.finished && !job.never_finish {
                        shared.finish_locked(job);
                    }
                }
            });
        }
    }

    /// Finishes `job` (the caller holds the `jobs` lock): applies its store effect, wakes held
    /// requests, hands its webhook to the sender and fires the completion hook. Does nothing if
    /// it already finished.
    pub(crate) fn finish_locked(&self, job: &mut Job) {
        if job.finished {
            return;
        }
        job.finished = true;
        if job.plan.status != Terminal::Failure {
            if let Some(effect) = job.plan.effect.take() {
                lock(&self.entities).apply(effect);
            }
        }
        inc(&self.counters.jobs_finished);
        job.done.send_replace(true);
        let now = Instant::now();
        let event = JobCompleted {
            job_id: job.id.clone(),
            job: job.value(now),
            access_token: job.access_token.clone(),
            at: now,
        };
        webhooks::enqueue(self, &event, job.webhook, job.webhook_notify.take());
        // Nobody listening is fine: the hook is best effort by design.
        let _ = self.completed.send(event);
    }

    /// Runs `f` on job `id` after finishing it if its time is up.
    pub(crate) fn with_job<R>(
        &self,
        id: &str,
        f: impl FnOnce(&mut Job, Instant) -> R,
    ) -> Option<R> {
        let mut jobs = lock(&self.jobs);
        let job = jobs.map.get_mut(id)?;
        let now = Instant::now();
        if job.due(now) {
            self.finish_locked(job);
        }
        Some(f(job, now))
    }
}
