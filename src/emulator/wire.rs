//! Small pure pieces of the emulator's HTTP surface: query parsing, Rutter-shaped error bodies,
//! JSON response builders, the `X-Emulator-*` header knobs, and timestamps.

use std::borrow::Cow;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use serde_json::{json, Value};

use super::faults::{AnswerFaults, Drip};
use super::options::{MAX_MS, MAX_WEBHOOK_DUPLICATES};
use crate::body::{self, Body};

/// Header carrying the job id on answers of accepted requests.
pub(crate) const X_RUTTER_JOB_ID: &str = "x-rutter-job-id";
/// Header carrying a fresh request id on every answer.
pub(crate) const X_RUTTER_REQUEST_ID: &str = "x-rutter-request-id";

/// Largest padded list body `X-Emulator-Body-Bytes` may ask for.
pub(crate) const MAX_PADDED_BODY: usize = 64 * 1024 * 1024;

/// Percent-decodes one `application/x-www-form-urlencoded` component (`+` is a space); invalid
/// escapes are kept as they are, invalid UTF-8 is replaced.
pub(crate) fn percent_decode(text: &str) -> Cow<'_, str> {
    if !text.contains(['%', '+']) {
        return Cow::Borrowed(text);
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                }
                _ => {
                    out.push(b'%');
                    i += 1;
                }
            },
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// One `name=value` pair of a query string: the raw text and the decoded name and value.
#[derive(Debug, Clone)]
pub(crate) struct QueryPair<'a> {
    /// The pair exactly as sent.
    pub raw: &'a str,
    /// The decoded name.
    pub name: Cow<'a, str>,
    /// The decoded value (empty when there is no `=`).
    pub value: Cow<'a, str>,
}

/// Splits a query string into its pairs, in order, skipping empty ones.
pub(crate) fn query_pairs(query: Option<&str>) -> Vec<QueryPair<'_>> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|raw| !raw.is_empty())
        .map(|raw| {
            let (name, value) = raw.split_once('=').unwrap_or((raw, ""));
            QueryPair {
                raw,
                name: percent_decode(name),
                value: percent_decode(value),
            }
        })
        .collect()
}

/// The last value of parameter `name`, decoded.
pub(crate) fn query_last(query: Option<&str>, name: &str) -> Option<String> {
    query_pairs(query)
        .into_iter()
        .rev()
        .find(|p| p.name == name)
        .map(|p| p.value.into_owned())
}

/// `error_type`, `error_code` and `error_message` Rutter would use for an answer with `status`.
/// 429 and 409 are the fixture bodies (`error-rate-limited.json`, `error-idempotency-conflict.json`).
pub(crate) fn error_parts(status: StatusCode) -> (&'static str, &'static str, &'static str) {
    match status.as_u16() {
        400 => ("INVALID_REQUEST", "INVALID_INPUT", "the request is invalid"),
        401 => (
            "CONNECTION_ERROR",
            "INVALID_CREDENTIALS",
            "Invalid credentials to access this connection.",
        ),
        403 => (
            "CONNECTION_ERROR",
            "PRODUCT_NOT_ALLOWED",
            "You do not have access to use this endpoint",
        ),
        404 => (
            "INVALID_REQUEST",
            "NOT_FOUND",
            "the endpoint or resource was not found",
        ),
        409 => (
            "INVALID_REQUEST",
            "IDEMPOTENCY_KEY_REUSED",
            "this Idempotency-Key was used with a different request",
        ),
        410 => (
            "INVALID_REQUEST",
            "RESOURCE_NOT_FOUND",
            "the requested resource was not found",
        ),
        429 => (
            "RATE_LIMIT_ERROR",
            "RATE_LIMIT_EXCEEDED",
            "too many requests; allow time between requests",
        ),
        450 => (
            "PLATFORM_ERROR",
            "PLATFORM_BAD_REQUEST",
            "the underlying platform rejected the request",
        ),
        452 => (
            "RATE_LIMIT_ERROR",
            "PLATFORM_RATE_LIMIT_EXCEEDED",
            "the platform's rate limit was reached; retry later",
        ),
        500 => (
            "SERVER_ERROR",
            "INTERNAL_SERVER_ERROR",
            "an internal error occurred",
        ),
        502 => (
            "SERVER_ERROR",
            "BAD_GATEWAY",
            "the upstream platform could not be reached",
        ),
        503 => (
            "SERVER_ERROR",
            "SERVICE_UNAVAILABLE",
            "the service is temporarily unavailable",
        ),
        504 => (
            "SERVER_ERROR",
            "GATEWAY_TIMEOUT",
            "the upstream platform did not answer in time",
        ),
        s if s >= 500 => (
            "SERVER_ERROR",
            "INTERNAL_SERVER_ERROR",
            "an internal error occurred",
        ),
        _ => (
            "INVALID_REQUEST",
            "INVALID_INPUT",
            "the request could not be processed",
        ),
    }
}

/// The Rutter error object.
pub(crate) fn error_value(error_type: &str, code: &str, message: &str) -> Value {
    json!({ "error_type": error_type, "error_code": code, "error_message": message })
}

/// The Rutter error object for `status` (see [`error_parts`]).
pub(crate) fn status_error_value(status: StatusCode) -> Value {
    let (t, c, m) = error_parts(status);
    error_value(t, c, m)
}

/// A JSON answer.
pub(crate) fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    let bytes = serde_json::to_vec(value).unwrap_or_else(|_| b"null".to_vec());
    raw_json_response(status, Bytes::from(bytes))
}

/// An answer with `bytes` as body and a JSON content type (whether or not the bytes are JSON).
pub(crate) fn raw_json_response(status: StatusCode, bytes: Bytes) -> Response<Body> {
    let mut response = Response::new(body::full(bytes));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    response
}

/// A Rutter-shaped error answer.
pub(crate) fn error_response(
    status: StatusCode,
    error_type: &str,
    code: &str,
    message: &str,
) -> Response<Body> {
    json_response(status, &error_value(error_type, code, message))
}

/// A Rutter-shaped error answer with the default body for `status`, and `Retry-After` if given.
pub(crate) fn status_response(status: StatusCode, retry_after: Option<u64>) -> Response<Body> {
    let mut response = json_response(status, &status_error_value(status));
    if let Some(seconds) = retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

/// 400 `INVALID_REQUEST` with a message.
pub(crate) fn bad_request(code: &str, message: &str) -> Response<Body> {
    error_response(StatusCode::BAD_REQUEST, "INVALID_REQUEST", code, message)
}

/// 404 in Rutter's shape.
pub(crate) fn not_found(message: &str) -> Response<Body> {
    error_response(
        StatusCode::NOT_FOUND,
        "INVALID_REQUEST",
        "NOT_FOUND",
        message,
    )
}

/// A terminal status a job can be forced to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Terminal {
    /// `success`
    Success,
    /// `partial_success` (2023-03-14 only)
    PartialSuccess,
    /// `failure`
    Failure,
}

impl Terminal {
    /// The wire name.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Terminal::Success => "success",
            Terminal::PartialSuccess => "partial_success",
            Terminal::Failure => "failure",
        }
    }
}

/// How a job object is broken on purpose (`X-Emulator-Bad-Job`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BadJob {
    /// The terminal job has no `response`.
    NoResponse,
    /// Polls of the job answer 200 with a body that is not JSON.
    NotJson,
}

/// One scripted answer to a poll of a job (an item of `X-Emulator-Poll-Faults`), used up in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PollFault {
    /// `STATUS` (200..=599): answer with this status and a Rutter error body.
    Status(StatusCode),
    /// `reset`: close the connection without answering.
    Reset,
    /// `truncate`: answer the job object with its full `Content-Length`, but close the connection
    /// after half of its body.
    Truncate,
    /// `badjson`: answer 200 with a body that is not JSON (a truncated job object).
    BadJson,
    /// `close`: answer the job object normally, then close the (keep-alive) connection.
    Close,
    /// `delay=N`: answer the job object normally, N ms late.
    Delay(u64),
}

impl PollFault {
    /// Parses one item of `X-Emulator-Poll-Faults`.
    fn parse(item: &str) -> Result<PollFault, String> {
        const USAGE: &str = "X-Emulator-Poll-Faults takes statuses (200..=599), reset, truncate, \
                             badjson, close and delay=N";
        let lower = item.to_ascii_lowercase();
        Ok(match lower.as_str() {
            "reset" => PollFault::Reset,
            "truncate" => PollFault::Truncate,
            "badjson" | "bad-json" => PollFault::BadJson,
            "close" => PollFault::Close,
            other => match other.split_once('=') {
                Some(("delay", ms)) => {
                    PollFault::Delay(parse_ms("X-Emulator-Poll-Faults: delay", ms.trim())?)
                }
                _ if other.bytes().all(|b| b.is_ascii_digit()) => {
                    PollFault::Status(parse_status("X-Emulator-Poll-Faults", other)?)
                }
                _ => return Err(format!("{USAGE} (got {item:?})")),
            },
        })
    }
}

/// When `X-Emulator-Close` closes the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseMode {
    /// Right after the answer (`1`, `true`, ...).
    AfterAnswer,
    /// When the next request arrives on the connection, without reading or answering it (`next`).
    NextRequest,
}

/// When `X-Emulator-Reset` drops the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ResetMode {
    /// Before doing anything (`1`, `true`, `before`).
    Before,
    /// After the request was fully processed (a job may exist), instead of sending the answer
    /// (`after`).
    After,
}

/// The per-request `X-Emulator-*` overrides (see the module documentation for each header).
#[derive(Debug, Clone, Default)]
pub(crate) struct Knobs {
    /// `X-Emulator-Job-Ms`: this job's duration in ms.
    pub job_ms: Option<u64>,
    /// `X-Emulator-Fail`: the job fails with this `http_status`.
    pub fail: Option<StatusCode>,
    /// `X-Emulator-Job-Status`: forced terminal status.
    pub job_status: Option<Terminal>,
    /// `X-Emulator-Never-Finish`: the job never ends.
    pub never_finish: bool,
    /// `X-Emulator-Status`: answer at once with this status.
    pub status: Option<StatusCode>,
    /// `X-Emulator-Retry-After`: `Retry-After` seconds with `status`.
    pub retry_after: Option<u64>,
    /// `X-Emulator-Delay-Ms`: extra delay before answering.
    pub delay_ms: u64,
    /// `X-Emulator-Reset`: drop the connection instead of answering.
    pub reset: Option<ResetMode>,
    /// `X-Emulator-Poll-Faults`: scripted answers for the job's first polls.
    pub poll_faults: Vec<PollFault>,
    /// `X-Emulator-Poll-Retry-After`: `Retry-After` seconds on poll faults.
    pub poll_retry_after: Option<u64>,
    /// `X-Emulator-Response-Url`: the `response_url` to announce.
    pub response_url: Option<String>,
    /// `X-Emulator-Sync`: finish at once and answer the result.
    pub sync: bool,
    /// `X-Emulator-Bad-Job`: how the job object is broken.
    pub bad_job: Option<BadJob>,
    /// `X-Emulator-Async-Status`: status of the `async_response`.
    pub async_status: Option<StatusCode>,
    /// `X-Emulator-Body-Bytes`: pad list bodies to this size.
    pub body_bytes: Option<usize>,
    /// `X-Emulator-Webhook`: this job's webhook overrides.
    pub webhook: WebhookKnobs,
    /// `X-Emulator-Truncate`: close the connection after this many body bytes.
    pub truncate: Option<usize>,
    /// `X-Emulator-Drip-Ms`: milliseconds between the body's chunks.
    pub drip_ms: Option<u64>,
    /// `X-Emulator-Drip-Bytes`: bytes per dripped chunk (with `drip_ms`).
    pub drip_bytes: Option<usize>,
    /// `X-Emulator-Close`: close the connection right after the answer (`1`), or when the next
    /// request arrives on it (`next`).
    pub close: Option<CloseMode>,
    /// `X-Emulator-Fault-Times`: the answer faults apply to the first N matching requests only.
    pub fault_times: Option<u32>,
}

/// `X-Emulator-Webhook: drop | early | duplicate[=N] | bad-signature | delay=N` (a comma-separated
/// list): overrides of the webhook options for the job a request creates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct WebhookKnobs {
    /// `drop`: the webhook (and its copies) is never sent.
    pub drop: bool,
    /// `early`: the job ends at once and its webhook is delivered before the answer.
    pub early: bool,
    /// `bad-signature`: sent with a wrong `X-Rutter-Signature`.
    pub bad_signature: bool,
    /// `duplicate` (1) or `duplicate=N`: extra copies, instead of `--webhook-duplicates`.
    pub duplicates: Option<u32>,
    /// `delay=N`: milliseconds between the job's end and the webhook, instead of
    /// `--webhook-delay-ms`.
    pub delay_ms: Option<u64>,
}

impl WebhookKnobs {
    /// Parses the header's value; an unknown or malformed item is an error naming it.
    pub(crate) fn parse(value: &str) -> Result<WebhookKnobs, String> {
        const USAGE: &str =
            "X-Emulator-Webhook takes drop, early, duplicate[=N], bad-signature, delay=N";
        let mut knobs = WebhookKnobs::default();
        for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let item = item.to_ascii_lowercase();
            let (name, argument) = match item.split_once('=') {
                Some((name, argument)) => (name.trim(), Some(argument.trim())),
                None => (item.as_str(), None),
            };
            match (name, argument) {
                ("drop", None) => knobs.drop = true,
                ("early", None) => knobs.early = true,
                ("bad-signature", None) => knobs.bad_signature = true,
                ("duplicate", None) => knobs.duplicates = Some(1),
                ("duplicate", Some(n)) => match n.parse::<u32>() {
                    Ok(n) if n <= MAX_WEBHOOK_DUPLICATES => knobs.duplicates = Some(n),
                    _ => {
                        return Err(format!(
                            "X-Emulator-Webhook: duplicate={n:?} is not a count between 0 and \
                             {MAX_WEBHOOK_DUPLICATES}"
                        ))
                    }
                },
                ("delay", Some(ms)) => {
                    knobs.delay_ms = Some(parse_ms("X-Emulator-Webhook: delay", ms)?);
                }
                _ => return Err(format!("{USAGE} (got {item:?})")),
            }
        }
        Ok(knobs)
    }
}

/// At most this many poll faults are scripted per job.
const MAX_POLL_FAULTS: usize = 64;
/// Bytes per dripped chunk when `X-Emulator-Drip-Bytes` is not given.
pub(crate) const DEFAULT_DRIP_BYTES: usize = 16;
/// Largest `X-Emulator-Drip-Bytes`.
const MAX_DRIP_BYTES: usize = 1024 * 1024;
/// Largest `X-Emulator-Fault-Times`.
const MAX_FAULT_TIMES: u32 = 1_000_000;

impl Knobs {
    /// The faults this request's answer gets from its headers (see [`AnswerFaults`]).
    pub(crate) fn answer_faults(&self) -> AnswerFaults {
        AnswerFaults {
            reset: false,
            truncate: self.truncate,
            drip: self.drip_ms.map(|ms| Drip {
                every_ms: ms,
                bytes: self.drip_bytes.unwrap_or(DEFAULT_DRIP_BYTES),
            }),
            close: self.close == Some(CloseMode::AfterAnswer),
            close_next: self.close == Some(CloseMode::NextRequest),
            delay_ms: 0,
        }
    }

    /// Forgets the answer faults (`Status`, `Retry-After`, `Delay-Ms`, `Reset`, `Truncate`,
    /// `Drip-*`, `Close`), keeping the job knobs: what `X-Emulator-Fault-Times` does once used up.
    pub(crate) fn clear_answer_faults(&mut self) {
        self.status = None;
        self.retry_after = None;
        self.delay_ms = 0;
        self.reset = None;
        self.truncate = None;
        self.drip_ms = None;
        self.drip_bytes = None;
        self.close = None;
    }

    /// Reads every `X-Emulator-*` header; a malformed one is an error naming it.
    pub(crate) fn from_headers(headers: &HeaderMap) -> Result<Knobs, String> {
        let mut knobs = Knobs::default();
        let get = |name: &str| -> Result<Option<String>, String> {
            match headers.get(name) {
                None => Ok(None),
                Some(value) => value
                    .to_str()
                    .map(|s| Some(s.trim().to_string()))
                    .map_err(|_| format!("{name} is not visible ASCII")),
            }
        };
        if let Some(v) = get("x-emulator-job-ms")? {
            knobs.job_ms = Some(parse_ms("X-Emulator-Job-Ms", &v)?);
        }
        if let Some(v) = get("x-emulator-fail")? {
            knobs.fail = Some(parse_status("X-Emulator-Fail", &v)?);
        }
        if let Some(v) = get("x-emulator-job-status")? {
            knobs.job_status = Some(match v.to_ascii_lowercase().as_str() {
                "success" => Terminal::Success,
                "partial_success" => Terminal::PartialSuccess,
                "failure" => Terminal::Failure,
                _ => {
                    return Err(
                        "X-Emulator-Job-Status must be success, partial_success or failure".into(),
                    )
                }
            });
        }
        if let Some(v) = get("x-emulator-never-finish")? {
            knobs.never_finish = parse_flag("X-Emulator-Never-Finish", &v)?;
        }
        if let Some(v) = get("x-emulator-status")? {
            knobs.status = Some(parse_status("X-Emulator-Status", &v)?);
        }
        if let Some(v) = get("x-emulator-retry-after")? {
            knobs.retry_after = Some(parse_seconds("X-Emulator-Retry-After", &v)?);
        }
        if let Some(v) = get("x-emulator-delay-ms")? {
            knobs.delay_ms = parse_ms("X-Emulator-Delay-Ms", &v)?;
        }
        if let Some(v) = get("x-emulator-reset")? {
            knobs.reset = match v.to_ascii_lowercase().as_str() {
                "after" => Some(ResetMode::After),
                "before" => Some(ResetMode::Before),
                other => parse_flag("X-Emulator-Reset", other)?.then_some(ResetMode::Before),
            };
        }
        if let Some(v) = get("x-emulator-poll-faults")? {
            for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                if knobs.poll_faults.len() >= MAX_POLL_FAULTS {
                    return Err(format!(
                        "X-Emulator-Poll-Faults takes at most {MAX_POLL_FAULTS} statuses"
                    ));
                }
                knobs.poll_faults.push(PollFault::parse(item)?);
            }
        }
        if let Some(v) = get("x-emulator-poll-retry-after")? {
            knobs.poll_retry_after = Some(parse_seconds("X-Emulator-Poll-Retry-After", &v)?);
        }
        if let Some(v) = get("x-emulator-response-url")? {
            if v.is_empty() {
                return Err("X-Emulator-Response-Url is empty".into());
            }
            knobs.response_url = Some(v);
        }
        if let Some(v) = get("x-emulator-sync")? {
            knobs.sync = parse_flag("X-Emulator-Sync", &v)?;
        }
        if let Some(v) = get("x-emulator-bad-job")? {
            knobs.bad_job = Some(match v.to_ascii_lowercase().as_str() {
                "no-response" => BadJob::NoResponse,
                "not-json" => BadJob::NotJson,
                _ => return Err("X-Emulator-Bad-Job must be no-response or not-json".into()),
            });
        }
        if let Some(v) = get("x-emulator-async-status")? {
            let status = parse_status("X-Emulator-Async-Status", &v)?;
            if !status.is_success() {
                return Err("X-Emulator-Async-Status must be a 2xx status".into());
            }
            knobs.async_status = Some(status);
        }
        if let Some(v) = get("x-emulator-body-bytes")? {
            let n: usize = v
                .parse()
                .map_err(|_| "X-Emulator-Body-Bytes must be a byte count".to_string())?;
            knobs.body_bytes = Some(n.min(MAX_PADDED_BODY));
        }
        if let Some(v) = get("x-emulator-webhook")? {
            knobs.webhook = WebhookKnobs::parse(&v)?;
        }
        if let Some(v) = get("x-emulator-truncate")? {
            knobs.truncate = Some(
                v.parse::<usize>()
                    .map_err(|_| "X-Emulator-Truncate must be a byte count".to_string())?,
            );
        }
        if let Some(v) = get("x-emulator-drip-ms")? {
            knobs.drip_ms = Some(parse_ms("X-Emulator-Drip-Ms", &v)?);
        }
        if let Some(v) = get("x-emulator-drip-bytes")? {
            match v.parse::<usize>() {
                Ok(n) if (1..=MAX_DRIP_BYTES).contains(&n) => knobs.drip_bytes = Some(n),
                _ => {
                    return Err(format!(
                        "X-Emulator-Drip-Bytes must be a byte count between 1 and {MAX_DRIP_BYTES}"
                    ))
                }
            }
            if knobs.drip_ms.is_none() {
                return Err("X-Emulator-Drip-Bytes needs X-Emulator-Drip-Ms".into());
            }
        }
        if let Some(v) = get("x-emulator-close")? {
            knobs.close = if v.eq_ignore_ascii_case("next") {
                Some(CloseMode::NextRequest)
            } else {
                parse_flag("X-Emulator-Close", &v)?.then_some(CloseMode::AfterAnswer)
            };
        }
        if let Some(v) = get("x-emulator-fault-times")? {
            match v.parse::<u32>() {
                Ok(n) if (1..=MAX_FAULT_TIMES).contains(&n) => knobs.fault_times = Some(n),
                _ => {
                    return Err(format!(
                        "X-Emulator-Fault-Times must be a count between 1 and {MAX_FAULT_TIMES}"
                    ))
                }
            }
        }
        Ok(knobs)
    }
}

fn parse_ms(name: &str, value: &str) -> Result<u64, String> {
    match value.parse::<u64>() {
        Ok(ms) if ms <= MAX_MS => Ok(ms),
        _ => Err(format!(
            "{name} must be milliseconds between 0 and {MAX_MS}"
        )),
    }
}

fn parse_seconds(name: &str, value: &str) -> Result<u64, String> {
    match value.parse::<u64>() {
        Ok(s) if s <= MAX_MS / 1000 => Ok(s),
        _ => Err(format!("{name} must be whole seconds")),
    }
}

fn parse_status(name: &str, value: &str) -> Result<StatusCode, String> {
    value
        .parse::<u16>()
        .ok()
        .filter(|s| (200..=599).contains(s))
        .and_then(|s| StatusCode::from_u16(s).ok())
        .ok_or_else(|| format!("{name}: {value:?} is not an HTTP status between 200 and 599"))
}

fn parse_flag(name: &str, value: &str) -> Result<bool, String> {
    match value.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" | "" => Ok(false),
        _ => Err(format!("{name} must be 1 or 0")),
    }
}

/// Milliseconds since the Unix epoch, by the wall clock.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `2026-11-30T10:15:02.000Z` for a Unix time in milliseconds.
pub(crate) fn iso8601(ms: u64) -> String {
    let secs = ms / 1000;
    let millis = ms % 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}.{millis:03}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding() {
        assert_eq!(percent_decode("a%20b+c"), "a b c");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("caf%C3%A9"), "café");
        assert_eq!(percent_decode("%"), "%");
        assert_eq!(percent_decode("%4"), "%4");
        assert_eq!(percent_decode("%41"), "A");
        let pairs = query_pairs(Some(
            "a=1&&response_mode=async&flag&response_mode=prefer_sync",
        ));
        assert_eq!(pairs.len(), 4);
        assert_eq!(pairs[2].name, "flag");
        assert_eq!(
            query_last(
                Some("x=1&response_mode=async&response_mode=prefer_sync"),
                "response_mode"
            )
            .as_deref(),
            Some("prefer_sync")
        );
    }

    #[test]
    fn timestamps() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso8601(1_796_033_702_000), "2026-11-30T10:15:02.000Z");
        assert_eq!(iso8601(951_782_400_123), "2000-02-29T00:00:00.123Z");
    }

    #[test]
    fn knobs_parse_and_reject() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "X-Emulator-Poll-Faults",
            HeaderValue::from_static("429, 503,404"),
        );
        headers.insert("x-emulator-job-ms", HeaderValue::from_static("50"));
        headers.insert("X-EMULATOR-RESET", HeaderValue::from_static("after"));
        let knobs = Knobs::from_headers(&headers).unwrap();
        assert_eq!(knobs.poll_faults.len(), 3);
        assert_eq!(knobs.job_ms, Some(50));
        assert_eq!(knobs.reset, Some(ResetMode::After));
        headers.insert("x-emulator-status", HeaderValue::from_static("abc"));
        assert!(Knobs::from_headers(&headers).is_err());
    }

    #[test]
    fn answer_fault_knobs_parse_and_reject() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-emulator-poll-faults",
            HeaderValue::from_static("429, reset,TRUNCATE , badjson,close,delay=30,503"),
        );
        headers.insert("x-emulator-truncate", HeaderValue::from_static("0"));
        headers.insert("x-emulator-drip-ms", HeaderValue::from_static("25"));
        headers.insert("x-emulator-drip-bytes", HeaderValue::from_static("4"));
        headers.insert("x-emulator-close", HeaderValue::from_static("1"));
        headers.insert("x-emulator-fault-times", HeaderValue::from_static("2"));
        let mut knobs = Knobs::from_headers(&headers).unwrap();
        assert_eq!(
            knobs.poll_faults,
            [
                PollFault::Status(StatusCode::TOO_MANY_REQUESTS),
                PollFault::Reset,
                PollFault::Truncate,
                PollFault::BadJson,
                PollFault::Close,
                PollFault::Delay(30),
                PollFault::Status(StatusCode::SERVICE_UNAVAILABLE),
            ]
        );
        let faults = knobs.answer_faults();
        assert_eq!(faults.truncate, Some(0));
        assert_eq!(
            faults.drip,
            Some(Drip {
                every_ms: 25,
                bytes: 4
            })
        );
        assert!(faults.close && !faults.close_next && !faults.reset);
        assert_eq!(knobs.fault_times, Some(2));
        knobs.clear_answer_faults();
        assert!(knobs.answer_faults().is_none());
        assert_eq!(knobs.poll_faults.len(), 7, "job knobs stay");

        for (name, bad) in [
            ("x-emulator-truncate", "-1"),
            ("x-emulator-truncate", "ten"),
            ("x-emulator-drip-ms", "99999999999"),
            ("x-emulator-drip-bytes", "8"),
            ("x-emulator-close", "maybe"),
            ("x-emulator-fault-times", "0"),
            ("x-emulator-poll-faults", "explode"),
            ("x-emulator-poll-faults", "delay=x"),
            ("x-emulator-poll-faults", "99"),
        ] {
            let mut headers = HeaderMap::new();
            headers.insert(name, HeaderValue::from_static(bad));
            assert!(Knobs::from_headers(&headers).is_err(), "{name}: {bad}");
        }
        let mut headers = HeaderMap::new();
        headers.insert("x-emulator-drip-ms", HeaderValue::from_static("5"));
        headers.insert("x-emulator-drip-bytes", HeaderValue::from_static("0"));
        assert!(Knobs::from_headers(&headers).is_err());
        let mut headers = HeaderMap::new();
        headers.insert("x-emulator-close", HeaderValue::from_static("Next"));
        let faults = Knobs::from_headers(&headers).unwrap().answer_faults();
        assert!(faults.close_next && !faults.close);
    }

    #[test]
    fn webhook_knobs_parse_and_reject() {
        let knobs = WebhookKnobs::parse("Duplicate, delay=200,,bad-signature").unwrap();
        assert_eq!(
            knobs,
            WebhookKnobs {
                duplicates: Some(1),
                delay_ms: Some(200),
                bad_signature: true,
                ..Default::default()
            }
        );
        let knobs = WebhookKnobs::parse("drop,early,duplicate=3").unwrap();
        assert!(knobs.drop && knobs.early);
        assert_eq!(knobs.duplicates, Some(3));
        for bad in [
            "later",
            "delay",
            "delay=-1",
            "delay=99999999999",
            "duplicate=101",
            "drop=1",
        ] {
            assert!(WebhookKnobs::parse(bad).is_err(), "{bad}");
        }
        let mut headers = HeaderMap::new();
        headers.insert("X-Emulator-Webhook", HeaderValue::from_static("sometimes"));
        assert!(Knobs::from_headers(&headers).is_err());
    }
}
