//! The request pipeline of the proxy listener, as named phases (DESIGN §3–§5):
//!
//! 1. **classify**: explicit-async (the app asked for async: forward untouched, do not wait), facade
//!    (an async-capable route: rewrite and wait), or passthrough (forward and stream);
//! 2. **read**: facade bodies are buffered up to `facade.max_body` (413 beyond); passthrough bodies
//!    stream, except small JSON write bodies, which are read to see whether they ask for async;
//! 3. **rewrite**: `response_mode=async` into the query and/or JSON body (`facade.response_mode_in`);
//! 4. **forward**: to the configured upstream with header hygiene ([`crate::proxy`]);
//! 5. **await**: an `async_response` answer (facade, or a passthrough write that Rutter's
//!    `prefer_sync` turned async) is awaited through the shared job tracker ([`crate::jobs`]);
//! 6. **reply**: the job's `http_status` and body with `X-Rutter-Job-ID`, or the upstream answer as is,
//!    or on the deadline the `on_timeout` reply.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Frame;
use http_body_util::{BodyExt, BodyStream, Limited, StreamBody};
use serde::Deserialize;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::body::{self, Body, BoxError};
use crate::config::{BaseUrl, Config, Credentials, OnTimeout};
use crate::error::ProxyError;
use crate::idempotency::{
    self, Claim, Digest, FlightEnd, FlightState, IdempotencyStore, StoredAnswer,
};
use crate::jobs::{self, JobRegistry, Outcome, PollTarget, TrackError, MAX_JOB_BYTES};
use crate::lifecycle::Lifecycle;
use crate::proxy;
use crate::rewrite::{self, BodyMode};
use crate::routes::{is_versioned, RoutePattern};
use crate::telemetry::Metrics;
use crate::upstream::{CallKind, Upstream, UpstreamFailure};

/// `X-Rutter-Job-ID`: the job behind an answer.
pub const X_RUTTER_JOB_ID: HeaderName = HeaderName::from_static("x-rutter-job-id");
/// `X-Rutter-Request-ID`: Rutter's id of the exchange, passed back to the app.
pub const X_RUTTER_REQUEST_ID: HeaderName = HeaderName::from_static("x-rutter-request-id");
/// `X-Request-Id`: the request's correlation id, taken from the app or generated, logged, forwarded
/// upstream and returned.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// `Prefer` (RFC 7240).
const PREFER: HeaderName = HeaderName::from_static("prefer");
/// `X-Rutter-Version`: the API version the app asked for, echoed on job polls.
pub const X_RUTTER_VERSION: HeaderName = HeaderName::from_static("x-rutter-version");

/// Which class a request belongs to (DESIGN §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// The app asked for `response_mode=async` or `Prefer: respond-async`.
    ExplicitAsync,
    /// An async-capable route: rewritten, forwarded, awaited.
    Facade,
    /// Everything else.
    Passthrough,
}

impl Class {
    /// Label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Class::ExplicitAsync => "explicit_async",
            Class::Facade => "facade",
            Class::Passthrough => "passthrough",
        }
    }
}

/// The `async_response` object of an upstream answer.
#[derive(Debug, Clone, Deserialize)]
pub struct AsyncResponse {
    /// The job id.
    pub id: String,
    /// Where Rutter says the job can be fetched.
    #[serde(default)]
    pub response_url: Option<String>,
    /// The job's status when the answer was made.
    #[serde(default)]
    pub status: Option<String>,
}

#[derive(Deserialize)]
struct AsyncEnvelope {
    async_response: serde_json::Value,
}

/// Reads a top-level `async_response` object from a JSON body: `None` if there is none, an error if it
/// is there but unusable (no id, or an id that cannot be a path segment).
pub fn parse_async_response(bytes: &[u8]) -> Option<Result<AsyncResponse, ProxyError>> {
    let envelope: AsyncEnvelope = serde_json::from_slice(bytes).ok()?;
    if !envelope.async_response.is_object() {
        return None;
    }
    let invalid = |reason: &str| ProxyError::JobResultInvalid {
        job_id: String::new(),
        reason: reason.into(),
    };
    // Only the id is required; optional members of an unexpected type are ignored.
    let object = &envelope.async_response;
    let text = |name: &str| {
        object
            .get(name)
            .and_then(|v| v.as_str())
            .map(str::to_string)
    };
    Some(match text("id") {
        Some(id) if valid_job_id(&id) => Ok(AsyncResponse {
            id,
            response_url: text("response_url"),
            status: text("status"),
        }),
        Some(_) => Err(invalid("the async_response id is not a valid job id")),
        None => Err(invalid("the async_response has no id")),
    })
}

/// Job ids become a path segment of the poll URL: only unreserved URL characters are accepted.
pub fn valid_job_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 200
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~'))
        && id != "."
        && id != ".."
}

/// The URL to poll: `response_url` only when its scheme, host and port are the configured upstream's;
/// otherwise `{base}[/versioned]/jobs/{id}`.
pub fn poll_uri(base: &BaseUrl, versioned: bool, job: &AsyncResponse) -> Result<Uri, ProxyError> {
    let path = |versioned: bool| {
        let version = if versioned { "/versioned" } else { "" };
        format!("{version}/jobs/{}", job.id)
    };
    if let Some(url) = job.response_url.as_deref().filter(|u| !u.is_empty()) {
        // Followed only when it is exactly the job URL on the configured upstream: same scheme,
        // host and port, the base path prefix, `[/versioned]/jobs/{id}`, no query.
        let accepted = url.parse::<Uri>().ok().and_then(|uri| {
            if !same_origin(&uri, base) || uri.query().is_some() {
                return None;
            }
            let rest = uri.path().strip_prefix(base.path_prefix.as_str())?;
            [true, false].into_iter().find(|v| rest == path(*v))
        });
        match accepted {
            Some(versioned) => return proxy::upstream_uri(base, &path(versioned)),
            None => tracing::warn!(
                job_id = %job.id,
                "response_url is not the job URL on the configured upstream; polling the upstream instead"
            ),
        }
    }
    proxy::upstream_uri(base, &path(versioned))
}

fn same_origin(uri: &Uri, base: &BaseUrl) -> bool {
    let (Some(scheme), Some(host)) = (uri.scheme(), uri.host()) else {
        return false;
    };
    let default_port = if *scheme == http::uri::Scheme::HTTPS {
        443
    } else {
        80
    };
    *scheme == base.scheme
        && host.eq_ignore_ascii_case(base.authority.host())
        && uri.port_u16().unwrap_or(default_port) == base.port()
}

/// Header changes for an exchange whose answer the sidecar must read: no content coding (the
/// `async_response` must be parseable; the sidecar builds the app's reply itself) and no
/// `Expect: 100-continue` (the body is already buffered).
fn read_answer_headers(headers: &mut HeaderMap) {
    headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    headers.remove(header::EXPECT);
}

/// Logs a sidecar error by who caused it and turns it into the app's response.
fn error_response(error: ProxyError) -> Response<Body> {
    match error.party() {
        crate::error::Party::App => tracing::info!(code = error.code(), %error, "request refused"),
        _ => tracing::warn!(code = error.code(), %error, "request failed"),
    }
    error.to_response()
}

/// The request's id: the app's `X-Request-Id` if it is 1–200 visible ASCII characters, else a new
/// UUID v4, which is then also set on the request so it reaches Rutter.
fn request_id(headers: &mut HeaderMap) -> HeaderValue {
    let usable = headers.get(&X_REQUEST_ID).filter(|v| {
        let bytes = v.as_bytes();
        !bytes.is_empty() && bytes.len() <= 200 && bytes.iter().all(|b| (0x21..=0x7e).contains(b))
    });
    if let Some(id) = usable {
        return id.clone();
    }
    let mut text = uuid::Uuid::encode_buffer();
    let text = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut text);
    let id = HeaderValue::from_str(text).unwrap_or(HeaderValue::from_static("-"));
    headers.insert(X_REQUEST_ID, id.clone());
    id
}

/// What the sidecar does with a body it read before deciding.
enum Peeked {
    /// The whole body, within the limit.
    Complete(Bytes),
    /// Over the limit: the bytes read so far followed by the rest, streamed.
    Streaming(Body),
}

/// Reads a body up to `limit` bytes; beyond that, hands back a body that replays what was read and
/// streams the rest.
async fn peek_body<B>(mut body: B, limit: usize) -> Result<Peeked, BoxError>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let mut buffer = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(Into::into)?;
        if let Ok(data) = frame.into_data() {
            buffer.extend_from_slice(&data);
            if buffer.len() > limit {
                let prefix = futures_util::stream::once(async move {
                    Ok::<_, BoxError>(Frame::data(buffer.freeze()))
                });
                let rest = BodyStream::new(body).map(|frame| frame.map_err(Into::into));
                return Ok(Peeked::Streaming(
                    StreamBody::new(prefix.chain(rest)).boxed_unsync(),
                ));
            }
        }
        // Trailers are hop-by-hop for this proxy: dropped.
    }
    Ok(Peeked::Complete(buffer.freeze()))
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .is_some_and(|ct| ct == "application/json" || ct.ends_with("+json"))
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Everything the pipeline needs, shared by all connections.
pub struct Proxy {
    config: Arc<Config>,
    upstream: Upstream,
    jobs: Arc<JobRegistry>,
    idempotency: IdempotencyStore,
    injected_authorization: Option<HeaderValue>,
    /// The `Host` value for upstream requests (computed once).
    upstream_host: HeaderValue,
    metrics: Arc<Metrics>,
    lifecycle: Arc<Lifecycle>,
}

/// What the classify phase learned about a request.
struct Inspection {
    class: Class,
    route: Option<RoutePattern>,
    versioned: bool,
    deadline: Instant,
    /// `Prefer: respond-async`: rewrite to async mode but answer with the `async_response` at once.
    respond_async: bool,
}

/// The parts of the app's request the later phases use (cheap to clone into a flight task).
#[derive(Clone)]
struct AppRequest {
    method: Method,
    version: Version,
    headers: HeaderMap,
    versioned: bool,
    peer: SocketAddr,
    /// Closed when the app's request is gone (the app disconnected): waits on its behalf stop, while
    /// the write and the job's tracking go on.
    presence: Arc<watch::Sender<()>>,
}

impl AppRequest {
    /// Runs `work` until it finishes or the app goes away (`None`).
    async fn unless_gone<F: std::future::Future>(&self, work: F) -> Option<F::Output> {
        tokio::select! {
            out = work => Some(out),
            _ = self.presence.closed() => None,
        }
    }
}

/// The upstream's answer to a buffered write.
enum WriteAnswer {
    /// Anything but an `async_response`: goes back to the app as is.
    Final {
        head: http::response::Parts,
        body: Bytes,
    },
    /// An `async_response`: the job to wait for.
    Async(AsyncAnswer),
}

/// How a facade POST/PATCH takes part in idempotency.
struct KeyPlan {
    /// The `Idempotency-Key` value sent upstream.
    key: String,
    /// True when the sidecar generated it (it is returned to the app).
    generated: bool,
    cache_key: Digest,
    fingerprint: Digest,
}

/// Most attempts of one write (the first included).
const MAX_WRITE_ATTEMPTS: u32 = 6;
/// First backoff between write attempts; doubles, with full jitter, up to [`MAX_WRITE_BACKOFF`].
const WRITE_BACKOFF: Duration = Duration::from_millis(250);
/// Longest `Retry-After` honoured between write attempts (a longer one ends the retries).
const MAX_WRITE_RETRY_AFTER: Duration = Duration::from_secs(60);
/// Longest backoff between write attempts without `Retry-After`.
const MAX_WRITE_BACKOFF: Duration = Duration::from_secs(5);

/// `Idempotency-Key` request and response header.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// `Idempotent-Replayed: true` marks an answer replayed from the idempotency store.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

impl Proxy {
    /// Builds the pipeline around an upstream client and a job registry.
    pub fn new(
        config: Arc<Config>,
        upstream: Upstream,
        jobs: Arc<JobRegistry>,
        credentials: &Credentials,
        metrics: Arc<Metrics>,
        lifecycle: Arc<Lifecycle>,
    ) -> Self {
        Proxy {
            injected_authorization: credentials.basic_authorization(),
            upstream_host: proxy::host_header(upstream.base()),
            idempotency: IdempotencyStore::new(&config.idempotency),
            config,
            upstream,
            jobs,
            metrics,
            lifecycle,
        }
    }

    /// The upstream client (for metrics and tests).
    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// The job registry (for webhooks and tests).
    pub fn jobs(&self) -> &Arc<JobRegistry> {
        &self.jobs
    }

    /// The idempotency store (for operations and tests).
    pub fn idempotency(&self) -> &IdempotencyStore {
        &self.idempotency
    }

    /// Serves one app request; never fails: errors become sidecar error responses.
    pub async fn handle<B>(
        self: &Arc<Self>,
        request: Request<B>,
        peer: SocketAddr,
    ) -> Response<Body>
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        let started = Instant::now();
        let (mut parts, incoming) = request.into_parts();
        let request_id = request_id(&mut parts.headers);
        let inspection = self.classify(&parts, started);
        let class = inspection.class;
        // Kept until the answer; a facade request may wait long, so not as a view into the read buffer.
        let request_id = if class == Class::Facade {
            HeaderValue::from_bytes(request_id.as_bytes()).unwrap_or(request_id)
        } else {
            request_id
        };
        let span = tracing::info_span!(
            "request",
            request_id = %request_id.to_str().unwrap_or("-"),
            method = %parts.method,
            class = class.as_str(),
            route = inspection.route.as_ref().map(|r| r.template()).unwrap_or("-"),
            job_id = tracing::field::Empty,
            key = tracing::field::Empty,
        );
        let work = async {
            let result = Box::pin(self.serve(parts, incoming, peer, inspection)).await;
            let mut response = result.unwrap_or_else(error_response);
            let status = response.status().as_u16();
            let elapsed = started.elapsed();
            tracing::info!(status, elapsed_ms = elapsed.as_millis() as u64, "answered");
            self.metrics
                .request(class.as_str(), status, elapsed.as_secs_f64());
            response.headers_mut().insert(X_REQUEST_ID, request_id);
            response
        };
        tracing::Instrument::instrument(work, span).await
    }

    /// Phase 1: classify.
    fn classify(&self, parts: &http::request::Parts, started: Instant) -> Inspection {
        let prefer = rewrite::parse_prefer(parts.headers.get_all(&PREFER));
        let versioned = is_versioned(parts.uri.path());
        let route = self
            .config
            .facade
            .routes
            .find(&parts.method, parts.uri.path())
            .cloned();
        let query_async = rewrite::query_asks_async(parts.uri.query());
        // `Prefer: respond-async` on an async-capable route is honoured by asking Rutter for async
        // mode (the rewrite) without waiting; anywhere else it is forwarded as is.
        let class = if query_async || (prefer.respond_async && route.is_none()) {
            Class::ExplicitAsync
        } else if route.is_some() {
            Class::Facade
        } else {
            Class::Passthrough
        };
        let max_wait = prefer.wait.map_or(self.config.facade.max_wait, |w| {
            w.min(self.config.facade.max_wait)
        });
        Inspection {
            class,
            route,
            versioned,
            deadline: started + max_wait,
            respond_async: prefer.respond_async,
        }
    }

    async fn serve<B>(
        self: &Arc<Self>,
        parts: http::request::Parts,
        incoming: B,
        peer: SocketAddr,
        inspection: Inspection,
    ) -> Result<Response<Body>, ProxyError>
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        if parts.method == Method::CONNECT || parts.method == Method::TRACE {
            // CONNECT would tunnel; TRACE would echo the (possibly injected) credentials back.
            return Err(ProxyError::BadRequest(format!(
                "{} is not supported by this proxy",
                parts.method
            )));
        }
        // Only origin-form (`/path?query`) and absolute-form targets name a resource; an
        // authority-form target (`host:port`) or a bare word outside CONNECT is refused.
        if parts
            .uri
            .path_and_query()
            .is_none_or(|pq| !pq.as_str().starts_with('/'))
            || (parts.uri.authority().is_some() && parts.uri.scheme().is_none())
        {
            return Err(ProxyError::BadRequest(
                "the request target must be a path".into(),
            ));
        }
        if self.lifecycle.is_grace_over() {
            return Err(ProxyError::ShuttingDown);
        }
        let http::request::Parts {
            method,
            uri,
            version,
            headers,
            ..
        } = parts;
        // Checked above: origin-form or absolute-form, so there is a path. A clone shares the bytes.
        let mut target = uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        drop(uri);
        let mut headers = headers;
        if inspection.class == Class::Facade {
            // A facade request may wait for minutes: what it keeps must not pin the connection's
            // read buffer (the parsed head and body are views into it).
            headers = body::detached_headers(&headers);
            target =
                PathAndQuery::from_maybe_shared(Bytes::copy_from_slice(target.as_str().as_bytes()))
                    .unwrap_or(target);
        }
        // `_present` lives as long as the app's request: when the app disconnects it is dropped.
        let (presence, _present) = watch::channel(());
        let app = AppRequest {
            method,
            version,
            headers,
            versioned: inspection.versioned,
            peer,
            presence: Arc::new(presence),
        };
        // Writes (and facade reads) run in their own task: if the app disconnects, the write still
        // completes and its job is still tracked, so a retry can pick the result up. Nothing is lost.
        // Facade POST/PATCH with an idempotency key need no extra task: their write already runs in
        // its own flight task.
        let keyed = inspection.class == Class::Facade
            && matches!(app.method, Method::POST | Method::PATCH)
            && !inspection.respond_async
            && (app.headers.contains_key(&IDEMPOTENCY_KEY)
                || self.config.idempotency.generate_missing_keys);
        let detach = !keyed
            && (inspection.class == Class::Facade
                || !matches!(app.method, Method::GET | Method::HEAD | Method::OPTIONS));
        let this = Arc::clone(self);
        // Boxed, one box per path: a request waiting on a job then holds only the state its own
        // path needs, not the largest state any path could need (memory per waiting request).
        let work: Pin<Box<dyn Future<Output = Result<Response<Body>, ProxyError>> + Send>> =
            match inspection.class {
                Class::Facade => Box::pin(async move {
                    this.facade(app, target.path(), target.query(), incoming, inspection)
                        .await
                }),
                Class::ExplicitAsync | Class::Passthrough => {
                    Box::pin(
                        async move { this.passthrough(app, &target, incoming, inspection).await },
                    )
                }
            };
        if detach {
            let task = tokio::spawn(tracing::Instrument::instrument(
                work,
                tracing::Span::current(),
            ));
            task.await.unwrap_or_else(|_| {
                Err(ProxyError::Internal(
                    "the request task ended unexpectedly".into(),
                ))
            })
        } else {
            work.await
        }
    }

    /// The facade path: read, rewrite, then write (through the idempotency layer for POST/PATCH) and
    /// await.
    async fn facade<B>(
        self: &Arc<Self>,
        mut app: AppRequest,
        path: &str,
        query: Option<&str>,
        incoming: B,
        inspection: Inspection,
    ) -> Result<Response<Body>, ProxyError>
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        // Phase 2: read.
        let limit = self.config.facade.max_body;
        if content_length(&app.headers).is_some_and(|len| len > limit as u64) {
            return Err(ProxyError::BodyTooLarge { limit });
        }
        let read = Limited::new(incoming, limit).collect();
        let read = tokio::time::timeout(self.config.listen.idle_timeout, read)
            .await
            .map_err(|_| ProxyError::BadRequest("the request body did not arrive in time".into()))?
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    ProxyError::BodyTooLarge { limit }
                } else {
                    ProxyError::BadRequest(format!("the request body could not be read: {e}"))
                }
            })?
            .to_bytes();
        // Kept until the job ends (retries resend it): a copy, not a view into the read buffer.
        let bytes = Bytes::copy_from_slice(&read);
        drop(read);
        if rewrite::body_response_mode(&bytes) == BodyMode::Object(Some("async".into())) {
            tracing::Span::current().record("class", Class::ExplicitAsync.as_str());
            let target = proxy::path_and_query(path, query);
            return match self
                .write_boxed(&app, &target, bytes, inspection.deadline, false)
                .await?
            {
                WriteAnswer::Final { head, body } => Ok(buffered_response(head, body)),
                WriteAnswer::Async(answer) => Ok(answer.into_response()),
            };
        }
        // Idempotency applies to POST and PATCH (DESIGN §6); `Prefer: respond-async` is not awaited, so
        // Rutter's own idempotency serves it.
        let plan =
            if matches!(app.method, Method::POST | Method::PATCH) && !inspection.respond_async {
                self.key_plan(&mut app, path, query, &bytes)?
            } else {
                None
            };
        // Phase 3: rewrite.
        let modes = self.config.facade.response_mode_in;
        let body_rewritten = if modes.body {
            rewrite::rewrite_json_body(&bytes)
        } else {
            None
        };
        let use_query = modes.query || (modes.body && body_rewritten.is_none());
        let new_query = if use_query {
            Some(rewrite::rewrite_query(query))
        } else {
            query.map(str::to_string)
        };
        let new_body = body_rewritten.map(Bytes::from).unwrap_or(bytes);
        let target = proxy::path_and_query(path, new_query.as_deref());
        // Phases 4–6: forward, await, reply.
        match plan {
            Some(plan) => {
                let generated = plan.generated.then(|| plan.key.clone());
                // The generated key goes back on errors too: a retry with it cannot write twice.
                let mut response = self
                    .idempotent_write(app, target, new_body, plan, &inspection)
                    .await
                    .unwrap_or_else(error_response);
                if let Some(key) = generated.and_then(|k| HeaderValue::from_str(&k).ok()) {
                    response.headers_mut().insert(IDEMPOTENCY_KEY, key);
                }
                Ok(response)
            }
            None => match self
                .lifecycle
                .until_cutoff(self.write_boxed(&app, &target, new_body, inspection.deadline, false))
                .await
                .ok_or(ProxyError::ShuttingDown)??
            {
                WriteAnswer::Final { head, body } => Ok(buffered_response(head, body)),
                WriteAnswer::Async(answer) if inspection.respond_async => {
                    Ok(answer.into_response())
                }
                WriteAnswer::Async(answer) => {
                    self.await_job(&app, answer, inspection.deadline).await
                }
            },
        }
    }

    /// Validates or generates the `Idempotency-Key` and computes the cache key and fingerprint from the
    /// request as the app sent it.
    fn key_plan(
        &self,
        app: &mut AppRequest,
        path: &str,
        query: Option<&str>,
        body: &[u8],
    ) -> Result<Option<KeyPlan>, ProxyError> {
        let (key, generated) = match app.headers.get(&IDEMPOTENCY_KEY) {
            Some(value) => (idempotency::validate_key(value)?.to_string(), false),
            None if self.config.idempotency.generate_missing_keys => {
                let key = uuid::Uuid::new_v4().to_string();
                if let Ok(value) = HeaderValue::from_str(&key) {
                    app.headers.insert(IDEMPOTENCY_KEY, value);
                }
                (key, true)
            }
            None => return Ok(None),
        };
        tracing::Span::current().record("key", idempotency::key_label(&key).as_str());
        let authorization = app
            .headers
            .get(header::AUTHORIZATION)
            .or(self.injected_authorization.as_ref());
        let cache_key = idempotency::cache_key(authorization, query, &app.method, path, &key);
        let fingerprint = idempotency::fingerprint(&app.method, path, query, body);
        Ok(Some(KeyPlan {
            key,
            generated,
            cache_key,
            fingerprint,
        }))
    }

    /// One upstream write per key: replay, conflict, follow a flight in progress, or lead a new one.
    async fn idempotent_write(
        self: &Arc<Self>,
        app: AppRequest,
        target: String,
        body: Bytes,
        plan: KeyPlan,
        inspection: &Inspection,
    ) -> Result<Response<Body>, ProxyError> {
        let flight = match self.idempotency.claim(plan.cache_key, plan.fingerprint) {
            Claim::Replay(answer) => {
                self.metrics.idempotency("replayed");
                tracing::info!("replayed from the idempotency store");
                let mut response = stored_response(&answer);
                response
                    .headers_mut()
                    .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
                return Ok(response);
            }
            Claim::Conflict => {
                self.metrics.idempotency("conflict");
                return Err(ProxyError::IdempotencyKeyReused);
            }
            Claim::Follower(flight) => {
                self.metrics.idempotency("coalesced");
                tracing::info!("attached to the same write in flight");
                flight
            }
            Claim::Leader(flight) => {
                // The write and the wait run in their own task: they finish even if this app leaves.
                let proxy = Arc::clone(self);
                let leader = app.clone();
                let cache_key = plan.cache_key;
                let fingerprint = plan.fingerprint;
                let deadline = inspection.deadline;
                let span = tracing::Span::current();
                tokio::spawn(tracing::Instrument::instrument(
                    async move {
                        // Should the flight panic, the guard still ends it, so the key is not
                        // blocked and followers are answered.
                        let mut guard = FlightGuard {
                            proxy: Arc::clone(&proxy),
                            key: cache_key,
                            done: false,
                        };
                        proxy
                            .run_flight(leader, target, body, cache_key, fingerprint, deadline)
                            .await;
                        guard.done = true;
                    },
                    span,
                ));
                flight
            }
        };
        self.follow_flight(flight, inspection.deadline, &app).await
    }

    /// The leader's task: write (with retries), then wait for the job beyond any app's deadline, then
    /// store what may be stored and answer every follower.
    async fn run_flight(
        self: Arc<Self>,
        app: AppRequest,
        target: String,
        body: Bytes,
        cache_key: Digest,
        fingerprint: Digest,
        deadline: Instant,
    ) {
        let end = match self.write_boxed(&app, &target, body, deadline, true).await {
            Err(error) => FlightEnd::Error(error),
            Ok(WriteAnswer::Final { head, body }) => {
                let stored = idempotency::storable_upstream_answer(head.status, &head.headers);
                let answer = StoredAnswer {
                    fingerprint,
                    status: head.status,
                    headers: head.headers,
                    body,
                };
                FlightEnd::Answer { answer, stored }
            }
            Ok(WriteAnswer::Async(answer)) => {
                tracing::Span::current().record("job_id", answer.job.id.as_str());
                let accepted = StoredAnswer {
                    fingerprint,
                    status: answer.head.status,
                    headers: answer.head.headers.clone(),
                    body: answer.body.clone(),
                };
                self.idempotency.accepted(&cache_key, accepted);
                let until = Instant::now() + self.config.jobs.track_for;
                match self.wait_for_job(&app, &answer, until, false).await {
                    Ok(Some(outcome)) => match &*outcome {
                        Ok(result) => {
                            let response = job_reply(&outcome, &answer);
                            let answer = StoredAnswer {
                                fingerprint,
                                status: result.http_status,
                                headers: response.headers().clone(),
                                body: result.body.clone(),
                            };
                            FlightEnd::Answer {
                                answer,
                                stored: true,
                            }
                        }
                        Err(error) => FlightEnd::Error(error.clone()),
                    },
                    // Not tracked (too many jobs) or tracking gave up: answered like a deadline.
                    Ok(None) => FlightEnd::Untracked(StoredAnswer {
                        fingerprint,
                        status: answer.head.status,
                        headers: answer.head.headers.clone(),
                        body: answer.body.clone(),
                    }),
                    Err(error) => FlightEnd::Error(error),
                }
            }
        };
        self.idempotency.finish(&cache_key, end);
    }

    /// Waits on a flight until it ends or `deadline` passes.
    async fn follow_flight(
        &self,
        mut flight: watch::Receiver<FlightState>,
        deadline: Instant,
        app: &AppRequest,
    ) -> Result<Response<Body>, ProxyError> {
        let _waiting = self.metrics.waiting();
        let started = Instant::now();
        let finished = app.unless_gone(flight.wait_for(|s| matches!(s, FlightState::Finished(_))));
        let ended = self
            .lifecycle
            .within(deadline, finished)
            .await
            .flatten()
            .and_then(|r| r.ok().map(|state| state.clone()));
        let mut state = ended.unwrap_or_else(|| flight.borrow().clone());
        if matches!(state, FlightState::Writing) {
            // The deadline (or the shutdown grace) came before Rutter answered the write: wait for
            // that answer, bounded by the write's own timeout and the shutdown cutoff, so the app at
            // least gets the job id.
            let written = flight.wait_for(|s| !matches!(s, FlightState::Writing));
            let bound = Instant::now() + self.upstream.request_timeout() + Duration::from_secs(1);
            let written =
                tokio::time::timeout_at(bound, self.lifecycle.until_cutoff(written)).await;
            if let Ok(Some(Ok(written))) = written {
                state = written.clone();
            }
        }
        self.metrics
            .job_wait
            .observe(started.elapsed().as_secs_f64());
        match state {
            FlightState::Finished(end) => match &*end {
                FlightEnd::Answer { answer, .. } => Ok(stored_response(answer)),
                FlightEnd::Error(error) => Err(error.clone()),
                FlightEnd::Untracked(async_answer) => self.timeout_reply(async_answer),
            },
            FlightState::Accepted(async_answer) => self.timeout_reply(&async_answer),
            FlightState::Writing if self.lifecycle.is_grace_over() => Err(ProxyError::ShuttingDown),
            FlightState::Writing => {
                Err(ProxyError::UpstreamTimeout(self.upstream.request_timeout()))
            }
        }
    }

    /// The `on_timeout` reply for a job still running, from its stored `async_response`.
    fn timeout_reply(&self, async_answer: &StoredAnswer) -> Result<Response<Body>, ProxyError> {
        let job_id = parse_async_response(&async_answer.body)
            .and_then(Result::ok)
            .map(|job| job.id)
            .unwrap_or_default();
        match self.config.facade.on_timeout {
            OnTimeout::AsyncResponse => {
                let mut response = stored_response(async_answer);
                *response.status_mut() = StatusCode::OK;
                if let Ok(id) = HeaderValue::from_str(&job_id) {
                    response.headers_mut().insert(X_RUTTER_JOB_ID, id);
                }
                Ok(response)
            }
            OnTimeout::GatewayTimeout => Err(ProxyError::JobWaitTimeout { job_id }),
        }
    }

    /// [`Proxy::write`] on the heap, so callers that go on to wait do not carry its state.
    fn write_boxed<'a>(
        &'a self,
        app: &'a AppRequest,
        target: &'a str,
        body: Bytes,
        deadline: Instant,
        keyed: bool,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<WriteAnswer, ProxyError>> + Send + 'a>,
    > {
        Box::pin(self.write(app, target, body, deadline, keyed))
    }

    /// Phase 4 for buffered writes: forward, with the retries DESIGN §6 allows. With an idempotency key:
    /// transport errors, 429/452 (after `Retry-After` or backoff) and 502/503/504, within the deadline.
    /// Without one: only when the connection failed before anything was sent.
    async fn write(
        &self,
        app: &AppRequest,
        target: &str,
        body: Bytes,
        deadline: Instant,
        keyed: bool,
    ) -> Result<WriteAnswer, ProxyError> {
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let result = self
                .forward_buffered(app, target, body.clone(), deadline)
                .await;
            let backoff = || {
                let ceiling = WRITE_BACKOFF
                    .saturating_mul(1 << attempt.min(10))
                    .min(MAX_WRITE_BACKOFF);
                rand::Rng::random_range(&mut rand::rng(), WRITE_BACKOFF..=ceiling)
            };
            let retry_in = match &result {
                Err(failure) if keyed || failure.nothing_sent => Some(backoff()),
                Ok(WriteAnswer::Final { head, .. }) if keyed => match head.status.as_u16() {
                    429 | 452 => Some(
                        jobs::retry_after(&head.headers)
                            .map(|d| d.min(MAX_WRITE_RETRY_AFTER))
                            .unwrap_or_else(backoff),
                    ),
                    502..=504 => Some(backoff()),
                    _ => None,
                },
                _ => None,
            };
            match retry_in {
                Some(delay)
                    if attempt < MAX_WRITE_ATTEMPTS
                        && Instant::now()
                            .checked_add(delay)
                            .is_some_and(|at| at < deadline) =>
                {
                    tracing::info!(
                        attempt,
                        delay_ms = delay.as_millis() as u64,
                        "retrying the write"
                    );
                    tokio::time::sleep(delay).await;
                }
                _ => return result.map_err(|failure| failure.error),
            }
        }
    }

    /// The passthrough and explicit-async path: stream, except small JSON write bodies, read to see
    /// whether they ask for async; await an `async_response` that `prefer_sync` produced.
    async fn passthrough<B>(
        &self,
        app: AppRequest,
        target: &PathAndQuery,
        incoming: B,
        mut inspection: Inspection,
    ) -> Result<Response<Body>, ProxyError>
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        let is_write = !matches!(app.method, Method::GET | Method::HEAD | Method::OPTIONS);
        let body = if inspection.class == Class::Passthrough && is_write && is_json(&app.headers) {
            match peek_body(incoming, self.config.facade.max_body).await {
                Ok(Peeked::Complete(bytes)) => {
                    if rewrite::body_response_mode(&bytes) == BodyMode::Object(Some("async".into()))
                    {
                        inspection.class = Class::ExplicitAsync;
                        tracing::Span::current().record("class", Class::ExplicitAsync.as_str());
                    }
                    body::full(bytes)
                }
                Ok(Peeked::Streaming(body)) => body,
                Err(e) => {
                    return Err(ProxyError::BadRequest(format!(
                        "the request body could not be read: {e}"
                    )))
                }
            }
        } else if http_body::Body::is_end_stream(&incoming) {
            // No body (a plain GET): nothing to stream, nothing that can fail.
            body::empty()
        } else {
            body::boxed(incoming)
        };
        // If the app's own body fails while streaming (bad chunked framing, a reset), the exchange
        // fails too: that is the app's fault (400), not Rutter's (502).
        let app_body_failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let body = if http_body::Body::is_end_stream(&body) {
            body
        } else {
            let flag = Arc::clone(&app_body_failed);
            body.map_err(move |error| {
                flag.store(true, std::sync::atomic::Ordering::Relaxed);
                error
            })
            .boxed_unsync()
        };
        let uri = proxy::upstream_uri_from(self.upstream.base(), target)?;
        let mut request = self.upstream_request_to(&app, uri, body);
        let may_await =
            inspection.class == Class::Passthrough && (is_write || inspection.route.is_some());
        if may_await {
            // Rutter's prefer_sync may answer with an async_response that the sidecar must read.
            request.headers_mut().insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_static("identity"),
            );
        }
        let budget_deadline = inspection
            .deadline
            .min(Instant::now() + self.upstream.request_timeout());
        // A bodiless GET or HEAD may be repeated once on a fresh connection if a pooled keep-alive
        // connection was closed by Rutter just as it was reused (RFC 9110 §9.2.2: idempotent).
        let repeatable = matches!(app.method, Method::GET | Method::HEAD)
            && !app.headers.contains_key(header::CONTENT_LENGTH)
            && !app.headers.contains_key(header::TRANSFER_ENCODING);
        let mut result = self
            .lifecycle
            .until_cutoff(
                self.upstream
                    .send(request, CallKind::Passthrough, budget_deadline),
            )
            .await
            .ok_or(ProxyError::ShuttingDown)?;
        let broken = matches!(&result, Err(failure) if matches!(failure.error, ProxyError::UpstreamUnavailable(_)));
        if broken && repeatable {
            tracing::debug!("repeating an idempotent read on a fresh connection");
            let uri = proxy::upstream_uri_from(self.upstream.base(), target)?;
            let mut again = self.upstream_request_to(&app, uri, body::empty());
            if may_await {
                again.headers_mut().insert(
                    header::ACCEPT_ENCODING,
                    HeaderValue::from_static("identity"),
                );
            }
            let send = self
                .upstream
                .send(again, CallKind::Passthrough, budget_deadline);
            result = self
                .lifecycle
                .until_cutoff(send)
                .await
                .ok_or(ProxyError::ShuttingDown)?;
        }
        let response = result.map_err(|failure| {
            if app_body_failed.load(std::sync::atomic::Ordering::Relaxed) {
                ProxyError::BadRequest("the request body could not be read".into())
            } else {
                failure.error
            }
        })?;
        if response.status().is_informational() {
            return Err(ProxyError::UpstreamUnavailable(format!(
                "Rutter answered {} instead of a final response",
                response.status().as_u16()
            )));
        }
        let encoded = response
            .headers()
            .get(header::CONTENT_ENCODING)
            .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
        let may_be_async = may_await
            && response.status() == StatusCode::OK
            && is_json(response.headers())
            && !encoded;
        if !may_be_async {
            return Ok(streamed_response(response));
        }
        let (mut head, incoming) = response.into_parts();
        match peek_body(incoming, MAX_JOB_BYTES).await {
            Ok(Peeked::Complete(bytes)) => match parse_async_response(&bytes) {
                Some(Ok(job)) => {
                    tracing::info!(job_id = %job.id, "prefer_sync gave up; awaiting the job");
                    let answer = AsyncAnswer {
                        head,
                        body: bytes,
                        job,
                    };
                    self.await_job(&app, answer, inspection.deadline).await
                }
                Some(Err(error)) => Err(error),
                None => Ok(buffered_response(head, bytes)),
            },
            Ok(Peeked::Streaming(body)) => {
                proxy::prepare_response_headers(&mut head.headers, head.version);
                head.version = Version::HTTP_11;
                Ok(Response::from_parts(head, body))
            }
            Err(e) => Err(ProxyError::UpstreamUnavailable(format!(
                "the response body could not be read: {e}"
            ))),
        }
    }

    /// Builds the upstream request: method, upstream URI, cleaned headers, injected credentials.
    fn upstream_request(
        &self,
        app: &AppRequest,
        target: &str,
        body: Body,
    ) -> Result<Request<Body>, ProxyError> {
        let uri = proxy::upstream_uri(self.upstream.base(), target)?;
        Ok(self.upstream_request_to(app, uri, body))
    }

    /// Builds the upstream request to `uri`: the app's method, cleaned headers, injected credentials.
    fn upstream_request_to(&self, app: &AppRequest, uri: Uri, body: Body) -> Request<Body> {
        let mut request = Request::new(body);
        *request.method_mut() = app.method.clone();
        *request.uri_mut() = uri;
        let headers = request.headers_mut();
        *headers = app.headers.clone();
        proxy::prepare_request_headers(headers, &self.upstream_host, app.peer.ip(), app.version);
        self.inject_authorization(headers);
        request
    }

    fn inject_authorization(&self, headers: &mut HeaderMap) {
        if !headers.contains_key(header::AUTHORIZATION) {
            if let Some(value) = &self.injected_authorization {
                headers.insert(header::AUTHORIZATION, value.clone());
            }
        }
    }

    /// Sends a buffered request once and reads the answer.
    async fn forward_buffered(
        &self,
        app: &AppRequest,
        target: &str,
        bytes: Bytes,
        deadline: Instant,
    ) -> Result<WriteAnswer, UpstreamFailure> {
        let len = bytes.len();
        let mut request = self
            .upstream_request(app, target, body::full(bytes))
            .map_err(|error| UpstreamFailure {
                error,
                nothing_sent: true,
            })?;
        let headers = request.headers_mut();
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        read_answer_headers(headers);
        let (head, body) = self
            .upstream
            .send_buffered(request, CallKind::Write, deadline, MAX_JOB_BYTES)
            .await?;
        if matches!(head.status, StatusCode::OK | StatusCode::ACCEPTED) {
            match parse_async_response(&body) {
                Some(Ok(job)) => return Ok(WriteAnswer::Async(AsyncAnswer { head, body, job })),
                Some(Err(error)) => {
                    return Err(UpstreamFailure {
                        error,
                        nothing_sent: false,
                    })
                }
                None => {}
            }
        }
        Ok(WriteAnswer::Final { head, body })
    }

    /// Registers a wait on the answer's job and waits until `until`.
    /// `app_wait`: an app request is waiting (counted in metrics, cut short by the shutdown grace);
    /// otherwise a flight follows the job to its end.
    async fn wait_for_job(
        &self,
        app: &AppRequest,
        answer: &AsyncAnswer,
        until: Instant,
        app_wait: bool,
    ) -> Result<Option<Arc<Outcome>>, ProxyError> {
        let uri = poll_uri(self.upstream.base(), app.versioned, &answer.job)?;
        let mut headers = HeaderMap::new();
        if let Some(auth) = app.headers.get(header::AUTHORIZATION) {
            headers.insert(header::AUTHORIZATION, auth.clone());
        }
        self.inject_authorization(&mut headers);
        if let Some(version) = app.headers.get(&X_RUTTER_VERSION) {
            headers.insert(X_RUTTER_VERSION, version.clone());
        }
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        let finished = matches!(
            answer.job.status.as_deref(),
            Some("success" | "failure" | "partial_success")
        );
        let target = PollTarget {
            uri,
            headers,
            poll_now: finished,
        };
        match self.jobs.track(&answer.job.id, target) {
            Ok(mut waiter) if app_wait => {
                let _waiting = self.metrics.waiting();
                let started = Instant::now();
                let waited = self
                    .lifecycle
                    .within(until, app.unless_gone(waiter.wait()))
                    .await;
                let outcome = match waited.flatten() {
                    Some(outcome) => outcome,
                    None => waiter.current(),
                };
                self.metrics
                    .job_wait
                    .observe(started.elapsed().as_secs_f64());
                Ok(outcome)
            }
            Ok(mut waiter) => Ok(waiter.wait_until(until).await),
            Err(TrackError::TooManyJobs) => {
                tracing::warn!(
                    "jobs.max_tracked reached; answering at once with the on_timeout reply"
                );
                Ok(None)
            }
        }
    }

    /// Phases 5 and 6 without idempotency: wait until the outcome or the deadline, then reply.
    async fn await_job(
        &self,
        app: &AppRequest,
        answer: AsyncAnswer,
        deadline: Instant,
    ) -> Result<Response<Body>, ProxyError> {
        tracing::Span::current().record("job_id", answer.job.id.as_str());
        match self.wait_for_job(app, &answer, deadline, true).await? {
            Some(outcome) => Ok(job_reply(&outcome, &answer)),
            None => match self.config.facade.on_timeout {
                OnTimeout::AsyncResponse => Ok(answer.into_timeout_response()),
                OnTimeout::GatewayTimeout => Err(ProxyError::JobWaitTimeout {
                    job_id: answer.job.id,
                }),
            },
        }
    }
}

/// Ends a flight whose task stopped without finishing it (a panic).
struct FlightGuard {
    proxy: Arc<Proxy>,
    key: Digest,
    done: bool,
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        if !self.done {
            if std::thread::panicking() {
                tracing::error!("a write flight panicked; releasing its idempotency key");
            } else {
                tracing::info!(
                    "a write flight was stopped (shutdown); releasing its idempotency key"
                );
            }
            let error =
                ProxyError::Internal("the write ended unexpectedly; it may be retried".into());
            self.proxy
                .idempotency
                .finish(&self.key, FlightEnd::Error(error));
        }
    }
}

/// The upstream's `async_response` answer, kept to reply with on the deadline.
struct AsyncAnswer {
    head: http::response::Parts,
    body: Bytes,
    job: AsyncResponse,
}

impl AsyncAnswer {
    /// The original `async_response` as Rutter sent it, with `X-Rutter-Job-ID`.
    fn into_response(self) -> Response<Body> {
        let mut response = buffered_response(self.head, self.body);
        if let Ok(id) = HeaderValue::from_str(&self.job.id) {
            response.headers_mut().insert(X_RUTTER_JOB_ID, id);
        }
        response
    }

    /// The deadline reply: the original `async_response` with status 200, as Rutter's own
    /// `prefer_sync` returns it.
    fn into_timeout_response(self) -> Response<Body> {
        let mut response = self.into_response();
        *response.status_mut() = StatusCode::OK;
        response
    }
}

/// The synchronous reply for a finished job.
fn job_reply(outcome: &Outcome, answer: &AsyncAnswer) -> Response<Body> {
    let mut response = match outcome {
        Ok(result) => {
            let mut response = Response::new(body::full(result.body.clone()));
            *response.status_mut() = result.http_status;
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            response
        }
        Err(error) => error.to_response(),
    };
    let headers = response.headers_mut();
    if let Ok(id) = HeaderValue::from_str(&answer.job.id) {
        headers.insert(X_RUTTER_JOB_ID, id);
    }
    if let Some(request_id) = answer.head.headers.get(&X_RUTTER_REQUEST_ID) {
        headers.insert(X_RUTTER_REQUEST_ID, request_id.clone());
    }
    proxy::append_via(headers, answer.head.version);
    response
}

/// An answer from the idempotency store or a flight (headers already cleaned).
fn stored_response(answer: &StoredAnswer) -> Response<Body> {
    let mut response = Response::new(body::full(answer.body.clone()));
    *response.status_mut() = answer.status;
    let headers = response.headers_mut();
    *headers = answer.headers.clone();
    proxy::remove_hop_by_hop(headers);
    headers.remove(header::CONTENT_LENGTH);
    if !headers
        .get(header::VIA)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains(proxy::VIA_PSEUDONYM))
    {
        proxy::append_via(headers, Version::HTTP_11);
    }
    response
}

/// An upstream answer read into memory, with response header hygiene; `Content-Length` is recomputed.
fn buffered_response(mut head: http::response::Parts, bytes: Bytes) -> Response<Body> {
    proxy::prepare_response_headers(&mut head.headers, head.version);
    head.headers.remove(header::CONTENT_LENGTH);
    head.version = Version::HTTP_11;
    Response::from_parts(head, body::full(bytes))
}

/// An upstream answer streamed to the app.
fn streamed_response(response: Response<Body>) -> Response<Body> {
    let (mut head, body) = response.into_parts();
    proxy::prepare_response_headers(&mut head.headers, head.version);
    head.version = Version::HTTP_11;
    Response::from_parts(head, body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::uri::{Authority, Scheme};

    fn base() -> BaseUrl {
        BaseUrl {
            scheme: Scheme::HTTPS,
            authority: Authority::from_static("production.rutterapi.com"),
            path_prefix: String::new(),
        }
    }

    fn job(id: &str, url: Option<&str>) -> AsyncResponse {
        AsyncResponse {
            id: id.into(),
            response_url: url.map(str::to_string),
            status: None,
        }
    }

    #[test]
    fn poll_uri_never_leaves_the_upstream() {
        let cases = [
            (
                true,
                Some("https://production.rutterapi.com/versioned/jobs/j1"),
                "https://production.rutterapi.com/versioned/jobs/j1",
            ),
            (
                true,
                Some("https://PRODUCTION.rutterapi.com:443/versioned/jobs/j1"),
                "https://production.rutterapi.com/versioned/jobs/j1",
            ),
            (
                false,
                Some("https://production.rutterapi.com/versioned/jobs/j1"),
                "https://production.rutterapi.com/versioned/jobs/j1",
            ),
            (
                true,
                Some("https://production.rutterapi.com/versioned/jobs/j1?access_token=x"),
                "https://production.rutterapi.com/versioned/jobs/j1",
            ),
            (
                true,
                Some(
                    "https://production.rutterapi.com/versioned/connections/c/../../admin/jobs/j1",
                ),
                "https://production.rutterapi.com/versioned/jobs/j1",
            ),
            (
                true,
                Some("https://evil.example/versioned/jobs/j1"),
                "https://production.rutterapi.com/versioned/jobs/j1",
            ),
            (
                true,
                Some("http://production.rutterapi.com/versioned/jobs/j1"),
                "https://production.rutterapi.com/versioned/jobs/j1",
            ),
            (
                true,
                Some("https://production.rutterapi.com:8443/versioned/jobs/j1"),
                "https://production.rutterapi.com/versioned/jobs/j1",
            ),
            (
                true,
                Some("https://production.rutterapi.com/versioned/jobs/other"),
                "https://production.rutterapi.com/versioned/jobs/j1",
            ),
            (
                true,
                Some("not a url"),
                "https://production.rutterapi.com/versioned/jobs/j1",
            ),
            (
                true,
                None,
                "https://production.rutterapi.com/versioned/jobs/j1",
            ),
            (false, None, "https://production.rutterapi.com/jobs/j1"),
        ];
        for (versioned, url, expected) in cases {
            assert_eq!(
                poll_uri(&base(), versioned, &job("j1", url))
                    .unwrap()
                    .to_string(),
                expected,
                "{url:?}"
            );
        }
    }

    #[test]
    fn async_response_detection() {
        let ok = parse_async_response(
            br#"{"async_response":{"id":"3446b185-117f","response_url":"x","status":"pending"}}"#,
        );
        assert_eq!(ok.unwrap().unwrap().id, "3446b185-117f");
        assert!(parse_async_response(br#"{"invoice":{}}"#).is_none());
        assert!(parse_async_response(br#"{"async_response":null}"#).is_none());
        assert!(parse_async_response(b"[]").is_none());
        assert!(parse_async_response(b"").is_none());
        assert!(
            parse_async_response(br#"{"async_response":{"status":"pending"}}"#)
                .unwrap()
                .is_err()
        );
        assert!(
            parse_async_response(br#"{"async_response":{"id":"../../x"}}"#)
                .unwrap()
                .is_err()
        );
        assert!(parse_async_response(br#"{"async_response":{"id":""}}"#)
            .unwrap()
            .is_err());
        // Optional members of an unexpected type are ignored, not fatal.
        let odd = parse_async_response(
            br#"{"async_response":{"id":"j1","response_url":123,"status":{}}}"#,
        );
        let odd = odd.unwrap().unwrap();
        assert_eq!(
            (odd.id.as_str(), odd.response_url, odd.status),
            ("j1", None, None)
        );
    }

    #[test]
    fn job_id_rules() {
        for good in ["3446b185-117f-46bc-939b-aa53de5c35c1", "a", "A_b.c~d"] {
            assert!(valid_job_id(good), "{good}");
        }
        for bad in ["", ".", "..", "a/b", "a?b", "a b", "a%2F", &"x".repeat(201)] {
            assert!(!valid_job_id(bad), "{bad}");
        }
    }
}
