//! One request through the emulator: read and record it, apply the fault knobs, check credentials,
//! then route it to [`super::jobs`] (async-capable writes, report GETs, job polls) or
//! [`super::direct`] (lists, entity reads, synchronous writes).

use std::collections::hash_map::DefaultHasher;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use tokio::time::Instant;

use super::faults::{self, AnswerFaults, CloseSignal};
use super::state::{inc, SeenRequest, Shared};
use super::wire::{
    self, bad_request, not_found, query_last, status_response, Knobs, ResetMode,
    X_RUTTER_REQUEST_ID,
};
use super::{direct, jobs};
use crate::body::Body;
use crate::routes::{is_job_path, split_path};

/// Largest request body the emulator reads (413 beyond).
const MAX_BODY: usize = 16 * 1024 * 1024;

/// The service's error: hyper closes the connection (HTTP/1) or resets the stream (HTTP/2) without
/// an answer.
#[derive(Debug)]
pub(crate) struct ResetConnection;

impl fmt::Display for ResetConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("connection reset on purpose by the emulator")
    }
}

impl std::error::Error for ResetConnection {}

/// What the handler knows about the connection a request came on.
#[derive(Debug)]
pub(crate) struct ConnInfo {
    /// `http` or `https`.
    pub scheme: &'static str,
    /// The local address (fallback for a request without `Host`).
    pub local: SocketAddr,
}

/// Everything about one request the routes need.
pub(crate) struct Ctx {
    pub(crate) method: Method,
    pub(crate) path: String,
    pub(crate) query: Option<String>,
    pub(crate) path_and_query: String,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
    pub(crate) scheme: &'static str,
    pub(crate) host: String,
    pub(crate) versioned: bool,
    pub(crate) segments: Vec<String>,
    pub(crate) access_token: Option<String>,
    pub(crate) knobs: Knobs,
    pub(crate) arrived: Instant,
}

impl Ctx {
    pub(crate) fn is_write(&self) -> bool {
        is_write(&self.method)
    }

    pub(crate) fn token(&self) -> Option<&str> {
        self.access_token.as_deref()
    }
}

fn is_write(method: &Method) -> bool {
    matches!(
        *method,
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    )
}

/// Serves one request. `close` is the connection's: an answer with the close fault pulls it.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    conn: Arc<ConnInfo>,
    close: Arc<CloseSignal>,
    request: Request<Incoming>,
) -> Result<Response<Body>, ResetConnection> {
    let arrived = Instant::now();
    inc(&shared.counters.requests);
    if close.take_next_request() {
        // `X-Emulator-Close: next` on the previous answer: this request is dropped unread.
        inc(&shared.counters.resets);
        return Err(ResetConnection);
    }
    let (parts, incoming) = request.into_parts();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let mut seen = SeenRequest {
        method: parts.method.clone(),
        path_and_query: path_and_query.clone(),
        version: parts.version,
        headers: parts.headers.clone(),
        body: Bytes::new(),
        at: arrived,
    };
    if is_write(&parts.method) {
        inc(&shared.counters.write_requests);
    }
    let body = match Limited::new(incoming, MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => {
            shared.record_seen(seen);
            let response = wire::error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                "INVALID_REQUEST",
                "REQUEST_TOO_LARGE",
                "the request body exceeds the emulator's 16 MiB limit",
            );
            return Ok(finish(&shared, response, Duration::ZERO).await);
        }
        // The client went away mid-body: nobody to answer.
        Err(_) => return Err(ResetConnection),
    };
    seen.body = body.clone();
    shared.record_seen(seen);

    let mut knobs = match Knobs::from_headers(&parts.headers) {
        Ok(knobs) => knobs,
        Err(message) => {
            let response = bad_request("INVALID_EMULATOR_HEADER", &message);
            return Ok(finish(&shared, response, Duration::ZERO).await);
        }
    };
    if let Some(times) = knobs.fault_times {
        let scope = fault_scope(&parts.method, &path_and_query, &parts.headers);
        if shared.fault_hit(scope) > times {
            knobs.clear_answer_faults();
        }
    }
    let header_faults = knobs.answer_faults();
    let delay = Duration::from_millis(shared.options.slow_ms.saturating_add(knobs.delay_ms));
    if knobs.reset == Some(ResetMode::Before) || shared.roll(shared.options.reset_rate) {
        tokio::time::sleep(delay).await;
        inc(&shared.counters.resets);
        return Err(ResetConnection);
    }

    let host = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| conn.local.to_string());
    let path = parts.uri.path().to_string();
    let (versioned, segments) = split_path(&path);
    let segments = segments.into_iter().map(str::to_string).collect();
    let query = parts.uri.query().map(str::to_string);
    let access_token = query_last(query.as_deref(), "access_token").filter(|t| !t.is_empty());
    let reset_after = knobs.reset == Some(ResetMode::After);
    let ctx = Ctx {
        method: parts.method,
        path,
        query,
        path_and_query,
        headers: parts.headers,
        body,
        scheme: conn.scheme,
        host,
        versioned,
        segments,
        access_token,
        knobs,
        arrived,
    };
    let mut response = route(&shared, &ctx).await;
    let scripted = response.extensions_mut().remove::<AnswerFaults>();
    let faults = header_faults.merge(scripted.unwrap_or_default());
    let delay = delay + Duration::from_millis(faults.delay_ms);
    if reset_after || faults.reset {
        tokio::time::sleep(delay).await;
        inc(&shared.counters.resets);
        return Err(ResetConnection);
    }
    let response = finish(&shared, response, delay).await;
    let Some((response, truncated)) = faults::apply(response, faults, &close).await else {
        inc(&shared.counters.resets);
        return Err(ResetConnection);
    };
    if truncated {
        inc(&shared.counters.truncated);
    }
    if faults.drip.is_some() {
        inc(&shared.counters.dripped);
    }
    if faults.close {
        inc(&shared.counters.closed_after_answer);
    }
    if faults.close_next {
        close.close_on_next_request();
    }
    Ok(response)
}

/// The `X-Emulator-Fault-Times` scope of a request: its method, path and query, and
/// `Idempotency-Key` (a retry of the same write shares it).
fn fault_scope(method: &Method, path_and_query: &str, headers: &HeaderMap) -> u64 {
    let mut hasher = DefaultHasher::new();
    method.as_str().hash(&mut hasher);
    path_and_query.hash(&mut hasher);
    headers
        .get("idempotency-key")
        .map(HeaderValue::as_bytes)
        .hash(&mut hasher);
    hasher.finish()
}

/// Adds the headers every answer has, counts it, and waits `delay`.
async fn finish(shared: &Shared, mut response: Response<Body>, delay: Duration) -> Response<Body> {
    let request_id = uuid::Uuid::new_v4().to_string();
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(X_RUTTER_REQUEST_ID, value);
    }
    response
        .headers_mut()
        .entry(header::CONTENT_TYPE)
        .or_insert(HeaderValue::from_static("application/json; charset=utf-8"));
    let status = response.status();
    match status.as_u16() {
        429 => inc(&shared.counters.rate_limited),
        452 => inc(&shared.counters.platform_limited),
        401 => inc(&shared.counters.unauthorized),
        s if s >= 500 => inc(&shared.counters.server_errors),
        _ => {}
    }
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    response
}

async fn route(shared: &Arc<Shared>, ctx: &Ctx) -> Response<Body> {
    if let Some(status) = ctx.knobs.status {
        return status_response(status, ctx.knobs.retry_after);
    }
    if let Err(retry_after) = shared.take_budget(Instant::now()) {
        return status_response(StatusCode::TOO_MANY_REQUESTS, Some(retry_after));
    }
    if shared.roll(shared.options.error_rate) {
        return status_response(StatusCode::SERVICE_UNAVAILABLE, None);
    }
    if ctx.is_write() && shared.roll(shared.options.platform_limit_rate) {
        return status_response(platform_limit_status(), None);
    }
    if !authorized(shared, &ctx.headers) {
        return wire::error_response(
            StatusCode::UNAUTHORIZED,
            "CONNECTION_ERROR",
            "INVALID_CREDENTIALS",
            "missing or invalid HTTP Basic Authentication credentials",
        );
    }
    let segments: Vec<&str> = ctx.segments.iter().map(String::as_str).collect();
    if is_job_path(&segments) {
        return if ctx.method == Method::GET {
            jobs::poll(shared, segments[1])
        } else {
            not_found("this method is not supported on jobs")
        };
    }
    let exempt = matches!(segments.first(), Some(&"connections"))
        || segments == ["item", "public_token", "exchange"];
    if !exempt && !shared.options.no_access_token_check && ctx.access_token.is_none() {
        return bad_request(
            "MISSING_ACCESS_TOKEN",
            "the access_token query parameter is required",
        );
    }
    if let Some(route) = shared.routes.find(&ctx.method, &ctx.path) {
        let template = route.template().to_string();
        return jobs::job_request(shared, ctx, &template).await;
    }
    direct::direct_request(shared, ctx)
}

fn platform_limit_status() -> StatusCode {
    StatusCode::from_u16(452).unwrap_or(StatusCode::TOO_MANY_REQUESTS)
}

fn authorized(shared: &Shared, headers: &HeaderMap) -> bool {
    let Some(expected) = &shared.expected_credentials else {
        return true;
    };
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some((scheme, encoded)) = value.trim().split_once(' ') else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return false;
    }
    base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .is_ok_and(|decoded| decoded == *expected)
}
