//! Job-backed requests: async-capable writes and report GETs create (or, by `Idempotency-Key`,
//! find) a job and answer with its `async_response` or its held result (after its webhook, when
//! early delivery is asked for); `GET /jobs/:id` polls.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Response, StatusCode};
use serde_json::{json, Map, Value};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use super::entities::{self, entity_fields, Effect};
use super::faults::AnswerFaults;
use super::handler::Ctx;
use super::state::{inc, lock, IdempotencyEntry, Job, Plan, Shared};
use super::webhooks;
use super::wire::{
    self, bad_request, json_response, not_found, query_last, query_pairs, status_error_value,
    status_response, PollFault, Terminal, X_RUTTER_JOB_ID,
};
use crate::body::Body;

/// `GET /jobs/:id`.
pub(crate) fn poll(shared: &Shared, id: &str) -> Response<Body> {
    inc(&shared.counters.polls);
    let answer = shared.with_job(id, |job, now| {
        let not_json = |job: &Job| {
            let broken = format!(
                "{{\"id\": \"{}\", \"status\": \"{}",
                job.id,
                job.status(now)
            );
            wire::raw_json_response(StatusCode::OK, Bytes::from(broken))
        };
        let mut faults = AnswerFaults::default();
        let mut truncate = false;
        match job.poll_faults.pop_front() {
            Some(PollFault::Status(status)) => {
                return status_response(status, job.poll_retry_after)
            }
            Some(PollFault::BadJson) => return not_json(job),
            Some(PollFault::Reset) => faults.reset = true,
            Some(PollFault::Close) => faults.close = true,
            Some(PollFault::Delay(ms)) => faults.delay_ms = ms,
            Some(PollFault::Truncate) => truncate = true,
            None => {}
        }
        let mut response = if job.bad == Some(wire::BadJob::NotJson) {
            not_json(job)
        } else {
            let bytes = serde_json::to_vec(&job.value(now)).unwrap_or_default();
            if truncate {
                // Half of the job object, then the connection closes.
                faults.truncate = Some(bytes.len() / 2);
            }
            wire::raw_json_response(StatusCode::OK, Bytes::from(bytes))
        };
        if !faults.is_none() {
            response.extensions_mut().insert(faults);
        }
        response
    });
    answer.unwrap_or_else(|| not_found("no job with this id"))
}

/// How the requester wants a job-backed request answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Async,
    PreferSync,
}

fn parse_mode(value: &str) -> Option<Mode> {
    match value {
        "async" => Some(Mode::Async),
        "prefer_sync" => Some(Mode::PreferSync),
        _ => None,
    }
}

/// An async-capable write or report GET: create (or find) the job, then answer.
pub(crate) async fn job_request(shared: &Arc<Shared>, ctx: &Ctx, template: &str) -> Response<Body> {
    let attachment = template.ends_with("/attachments");
    let body = if ctx.method == Method::GET {
        Value::Null
    } else if ctx.body.is_empty() {
        if ctx.method == Method::DELETE || attachment {
            Value::Null
        } else {
            return bad_request("INVALID_INPUT", "the request body must be a JSON object");
        }
    } else {
        match serde_json::from_slice::<Value>(&ctx.body) {
            Ok(value @ Value::Object(_)) => value,
            _ if attachment => Value::Null,
            _ => return bad_request("INVALID_INPUT", "the request body must be a JSON object"),
        }
    };

    let query_mode = match query_last(ctx.query.as_deref(), "response_mode") {
        None => None,
        Some(value) => match parse_mode(&value) {
            Some(mode) => Some(mode),
            None => {
                return bad_request(
                    "INVALID_INPUT",
                    "response_mode must be async or prefer_sync",
                )
            }
        },
    };
    let body_mode = match body.get("response_mode") {
        None => None,
        Some(value) => match value.as_str().and_then(parse_mode) {
            Some(mode) => Some(mode),
            None => {
                return bad_request(
                    "INVALID_INPUT",
                    "response_mode must be async or prefer_sync",
                )
            }
        },
    };
    let mode = if query_mode == Some(Mode::Async) || body_mode == Some(Mode::Async) {
        Mode::Async
    } else {
        Mode::PreferSync
    };

    let idempotency_key = match ctx.headers.get("idempotency-key") {
        None => None,
        Some(value) => match value.to_str() {
            Ok(key) if !key.is_empty() && key.len() <= 255 => Some(key.to_string()),
            _ => {
                return bad_request(
                    "INVALID_IDEMPOTENCY_KEY",
                    "Idempotency-Key must be 1 to 255 visible ASCII characters",
                )
            }
        },
    };
    let honours_key = matches!(ctx.method, Method::POST | Method::PATCH);

    let (job_id, replay, early) = {
        let mut table = lock(&shared.idempotency);
        let scope = idempotency_key.as_ref().filter(|_| honours_key).map(|key| {
            (
                ctx.access_token.clone(),
                ctx.method.clone(),
                ctx.path.clone(),
                key.clone(),
            )
        });
        let fingerprint = fingerprint(ctx.query.as_deref(), &body, &ctx.body);
        let existing = scope
            .as_ref()
            .and_then(|scope| table.map.get(scope).cloned());
        let alive = existing
            .as_ref()
            .is_some_and(|entry| lock(&shared.jobs).map.contains_key(&entry.job_id));
        match existing {
            Some(entry) if entry.fingerprint != fingerprint => {
                inc(&shared.counters.idempotency_conflicts);
                return status_response(StatusCode::CONFLICT, None);
            }
            Some(entry) if alive => {
                inc(&shared.counters.idempotent_replays);
                (entry.job_id, true, None)
            }
            _ => {
                let (job, early) = new_job(shared, ctx, template, body, idempotency_key.clone());
                let id = job.id.clone();
                shared.insert_job(job);
                if ctx.is_write() {
                    inc(&shared.counters.writes_accepted);
                }
                if let Some(scope) = scope {
                    table.insert(
                        scope,
                        IdempotencyEntry {
                            fingerprint,
                            job_id: id.clone(),
                        },
                    );
                }
                (id, false, early)
            }
        }
    };

    // Early delivery: the job ended when it was inserted; its webhook goes first.
    let early_answer = match early {
        Some(early) => {
            let limit = Duration::from_millis(shared.options.webhook_timeout_ms);
            let _ = tokio::time::timeout(limit, early.delivered).await;
            Some(early.async_answer)
        }
        None => None,
    };
    if ctx.knobs.sync && !replay {
        return result_answer(shared, &job_id);
    }
    match mode {
        Mode::Async => match early_answer {
            Some((status, body)) => {
                inc(&shared.counters.async_answers);
                let mut response = json_response(status, &body);
                job_header(&mut response, &job_id);
                response
            }
            None => async_answer(shared, &job_id),
        },
        Mode::PreferSync => {
            let receiver: Option<watch::Receiver<bool>> =
                shared.with_job(&job_id, |job, _| job.done.subscribe());
            let limit = Duration::from_millis(shared.options.sync_limit_ms);
            let finished = match receiver {
                Some(mut receiver) => {
                    tokio::time::timeout_at(ctx.arrived + limit, receiver.wait_for(|done| *done))
                        .await
                        .is_ok_and(|waited| waited.is_ok())
                }
                None => false,
            };
            if finished {
                result_answer(shared, &job_id)
            } else {
                async_answer(shared, &job_id)
            }
        }
    }
}

fn job_header(response: &mut Response<Body>, job_id: &str) {
    if let Ok(value) = HeaderValue::from_str(job_id) {
        response.headers_mut().insert(X_RUTTER_JOB_ID, value);
    }
}

/// The job's result as a synchronous answer.
fn result_answer(shared: &Shared, job_id: &str) -> Response<Body> {
    let answer = shared.with_job(job_id, |job, _| {
        (job.plan.http_status, job.plan.body.clone())
    });
    match answer {
        Some((status, body)) => {
            inc(&shared.counters.sync_answers);
            let mut response = json_response(status, &body);
            job_header(&mut response, job_id);
            response
        }
        None => status_response(StatusCode::INTERNAL_SERVER_ERROR, None),
    }
}

/// The `async_response` answer.
fn async_answer(shared: &Shared, job_id: &str) -> Response<Body> {
    let answer = shared.with_job(job_id, |job, now| {
        (job.async_status, job.async_response(now))
    });
    match answer {
        Some((status, body)) => {
            inc(&shared.counters.async_answers);
            let mut response = json_response(status, &body);
            job_header(&mut response, job_id);
            response
        }
        None => status_response(StatusCode::INTERNAL_SERVER_ERROR, None),
    }
}

/// Hash of what makes two requests "the same" for idempotency: the query without
/// `response_mode` (pairs as sent, in order) and the body (JSON without top-level `response_mode`,
/// keys in canonical order; raw bytes if it is not a JSON object).
fn fingerprint(query: Option<&str>, body: &Value, raw: &Bytes) -> u64 {
    let mut hasher = DefaultHasher::new();
    for pair in query_pairs(query) {
        if pair.name != "response_mode" {
            pair.raw.hash(&mut hasher);
        }
    }
    0xffu8.hash(&mut hasher);
    match body {
        Value::Object(map) => hash_object(map, true, &mut hasher),
        _ => raw.hash(&mut hasher),
    }
    hasher.finish()
}

fn hash_object(map: &Map<String, Value>, top: bool, hasher: &mut DefaultHasher) {
    let mut keys: Vec<&String> = map
        .keys()
        .filter(|k| !(top && k.as_str() == "response_mode"))
        .collect();
    keys.sort();
    b'{'.hash(hasher);
    for key in keys {
        key.hash(hasher);
        if let Some(value) = map.get(key) {
            hash_value(value, hasher);
        }
    }
    b'}'.hash(hasher);
}

fn hash_value(value: &Value, hasher: &mut DefaultHasher) {
    match value {
        Value::Null => 0u8.hash(hasher),
        Value::Bool(b) => (1u8, b).hash(hasher),
        Value::Number(n) => (2u8, n.to_string()).hash(hasher),
        Value::String(s) => (3u8, s).hash(hasher),
        Value::Array(items) => {
            (4u8, items.len()).hash(hasher);
            for item in items {
                hash_value(item, hasher);
            }
        }
        Value::Object(map) => hash_object(map, false, hasher),
    }
}

/// What the request that created an early-delivery job waits for, and then answers.
struct Early {
    /// Resolves (or fails) once the webhook's first delivery attempt ended, or when there will
    /// be none.
    delivered: oneshot::Receiver<()>,
    /// The `async_response` as it was when the job was accepted (`pending`), with its status.
    async_answer: (StatusCode, Value),
}

/// Builds a new job: its `request` object, its planned end, and the knobs that shape it; for
/// early webhook delivery, also what the creating request waits on.
fn new_job(
    shared: &Shared,
    ctx: &Ctx,
    template: &str,
    body: Value,
    idempotency_key: Option<String>,
) -> (Job, Option<Early>) {
    let id = shared.new_uuid();
    let knobs = &ctx.knobs;
    let webhook = webhooks::plan(shared, &knobs.webhook);
    let never_finish = knobs.never_finish && !knobs.sync;
    let early = webhook.early && !never_finish;
    let duration_ms = if knobs.sync || early {
        0
    } else {
        knobs.job_ms.unwrap_or(shared.options.job_ms)
    };
    let plan = plan(shared, ctx, template, &body);
    let mut request = Map::new();
    request.insert("method".into(), json!(ctx.method.as_str()));
    request.insert(
        "url".into(),
        json!(format!(
            "{}://{}{}",
            ctx.scheme, ctx.host, ctx.path_and_query
        )),
    );
    request.insert("body".into(), body);
    if let Some(key) = idempotency_key {
        request.insert("idempotency_key".into(), json!(key));
    }
    let prefix = if ctx.versioned { "/versioned" } else { "" };
    let response_url = knobs
        .response_url
        .clone()
        .unwrap_or_else(|| format!("{}://{}{prefix}/jobs/{id}", ctx.scheme, ctx.host));
    let (done, _) = watch::channel(false);
    let (notify, delivered) = if early {
        let (notify, delivered) = oneshot::channel();
        (Some(notify), Some(delivered))
    } else {
        (None, None)
    };
    let job = Job {
        id,
        started: Instant::now(),
        duration: Duration::from_millis(duration_ms),
        request: Value::Object(request),
        access_token: ctx.access_token.clone(),
        plan,
        finished: false,
        never_finish,
        bad: knobs.bad_job,
        poll_faults: knobs.poll_faults.iter().copied().collect(),
        poll_retry_after: knobs.poll_retry_after,
        response_url,
        async_status: knobs.async_status.unwrap_or(StatusCode::OK),
        done,
        webhook,
        webhook_notify: notify,
    };
    let early = delivered.map(|delivered| Early {
        delivered,
        async_answer: (job.async_status, job.async_response(job.started)),
    });
    (job, early)
}

/// Decides what a job ends with.
fn plan(shared: &Shared, ctx: &Ctx, template: &str, body: &Value) -> Plan {
    let segments = &ctx.segments;
    let n = segments.len();
    let now = wire::iso8601(wire::now_ms());
    let (ok_status, ok_body, effect, invalid) = if ctx.method == Method::GET {
        let plural = segments.last().map(String::as_str).unwrap_or("reports");
        let start =
            query_last(ctx.query.as_deref(), "start_date").unwrap_or_else(|| "2026-01-01".into());
        let end =
            query_last(ctx.query.as_deref(), "end_date").unwrap_or_else(|| "2026-12-31".into());
        let body = entities::report_body(plural, &shared.new_uuid(), &start, &end);
        (StatusCode::OK, body, None, None)
    } else if template.ends_with("/unapply") && n >= 3 {
        let key = segments[..n - 2].join("/");
        let id = segments[n - 2].clone();
        let current = lock(&shared.entities).get(&key, &id, ctx.token());
        let base = current.unwrap_or_else(|| Map::from_iter([("id".to_string(), json!(id))]));
        let mut fields = Map::new();
        fields.insert("status".into(), json!("unapplied"));
        let entity = entities::updated_entity(base, &fields, &now);
        let effect = Effect::Upsert {
            key: key.clone(),
            entity: entity.clone(),
            owner: ctx.access_token.clone(),
        };
        (
            StatusCode::OK,
            entities::wrap(&key, entity),
            Some(effect),
            None,
        )
    } else if template.ends_with("/:id") && n >= 2 {
        let key = segments[..n - 1].join("/");
        let id = segments[n - 1].clone();
        if ctx.method == Method::DELETE {
            let effect = Effect::Delete {
                key: key.clone(),
                id: id.clone(),
            };
            (
                StatusCode::OK,
                entities::deletion_body(&key, &id),
                Some(effect),
                None,
            )
        } else {
            let fields = entity_fields(body, &entities::singular(entities::plural_of(&key)));
            let current = lock(&shared.entities).get(&key, &id, ctx.token());
            let base = current.unwrap_or_else(|| {
                let mut fresh = Map::new();
                fresh.insert("id".into(), json!(id));
                fresh.insert("platform_id".into(), json!(shared.next_platform_id()));
                fresh.insert("created_at".into(), json!(now));
                fresh
            });
            let entity = entities::updated_entity(base, &fields, &now);
            let effect = Effect::Upsert {
                key: key.clone(),
                entity: entity.clone(),
                owner: ctx.access_token.clone(),
            };
            (
                StatusCode::OK,
                entities::wrap(&key, entity),
                Some(effect),
                None,
            )
        }
    } else {
        let key = segments.join("/");
        let fields = entity_fields(body, &entities::singular(entities::plural_of(&key)));
        let parent = (n >= 3 && template.contains("/:id/"))
            .then(|| (segments[n - 3].as_str(), segments[n - 2].as_str()));
        let invalid = (key == "accounting/invoices")
            .then(|| match fields.get("customer_id") {
                None | Some(Value::Null) => Some("customer_id is required"),
                Some(Value::String(s)) if s.is_empty() => Some("customer_id is required"),
                Some(Value::String(s)) if s == "unknown" => {
                    Some("customer_id does not refer to an existing customer")
                }
                _ => None,
            })
            .flatten();
        let entity = entities::created_entity(
            &key,
            &fields,
            shared.new_uuid(),
            shared.next_platform_id(),
            parent,
            &now,
        );
        let effect = Effect::Upsert {
            key: key.clone(),
            entity: entity.clone(),
            owner: ctx.access_token.clone(),
        };
        (
            StatusCode::OK,
            entities::wrap(&key, entity),
            Some(effect),
            invalid,
        )
    };

    let knobs = &ctx.knobs;
    let failure: Option<(StatusCode, Value)> = if let Some(status) = knobs.fail {
        Some((status, status_error_value(status)))
    } else if let Some(message) = invalid {
        Some((
            StatusCode::BAD_REQUEST,
            wire::error_value("INVALID_REQUEST", "INVALID_INPUT", message),
        ))
    } else if shared.roll(shared.options.failure_rate) {
        Some((
            StatusCode::BAD_REQUEST,
            wire::error_value(
                "INVALID_REQUEST",
                "INVALID_INPUT",
                "the platform rejected the request (simulated failure)",
            ),
        ))
    } else {
        None
    };
    let status = knobs.job_status.unwrap_or(if failure.is_some() {
        Terminal::Failure
    } else {
        Terminal::Success
    });
    let failure = failure.or_else(|| {
        (status == Terminal::Failure).then(|| {
            (
                StatusCode::BAD_REQUEST,
                wire::error_value(
                    "INVALID_REQUEST",
                    "INVALID_INPUT",
                    "the platform rejected the request (forced failure)",
                ),
            )
        })
    });
    match failure {
        Some((http_status, body)) => Plan {
            status,
            http_status,
            body,
            effect: None,
        },
        None => Plan {
            status,
            http_status: ok_status,
            body: ok_body,
            effect,
        },
    }
}
