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

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Frame;
use http_body_util::{BodyExt, BodyStream, Limited, StreamBody};
use serde::Deserialize;
use tokio::time::Instant;

use crate::body::{self, Body, BoxError};
use crate::config::{BaseUrl, Config, Credentials, OnTimeout};
use crate::error::ProxyError;
use crate::jobs::{JobRegistry, Outcome, PollTarget, TrackError, MAX_JOB_BYTES};
use crate::proxy;
use crate::rewrite::{self, BodyMode};
use crate::routes::{split_path, RoutePattern};
use crate::upstream::Upstream;

/// `X-Rutter-Job-ID`: the job behind an answer.
pub const X_RUTTER_JOB_ID: HeaderName = HeaderName::from_static("x-rutter-job-id");
/// `X-Rutter-Request-ID`: Rutter's id of the exchange, passed back to the app.
pub const X_RUTTER_REQUEST_ID: HeaderName = HeaderName::from_static("x-rutter-request-id");
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
    Some(
        match serde_json::from_value::<AsyncResponse>(envelope.async_response) {
            Ok(job) if valid_job_id(&job.id) => Ok(job),
            Ok(_) => Err(invalid("the async_response id is not a valid job id")),
            Err(_) => Err(invalid("the async_response has no id")),
        },
    )
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
    if let Some(url) = job.response_url.as_deref() {
        if let Ok(uri) = url.parse::<Uri>() {
            if same_origin(&uri, base) && uri.path().ends_with(&format!("/jobs/{}", job.id)) {
                return Ok(uri);
            }
        }
        tracing::warn!(job_id = %job.id, "response_url is not on the configured upstream; polling the upstream instead");
    }
    let prefix = if versioned { "/versioned" } else { "" };
    proxy::upstream_uri(base, &format!("{prefix}/jobs/{}", job.id))
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
    injected_authorization: Option<HeaderValue>,
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

impl Proxy {
    /// Builds the pipeline around an upstream client and a job registry.
    pub fn new(
        config: Arc<Config>,
        upstream: Upstream,
        jobs: Arc<JobRegistry>,
        credentials: &Credentials,
    ) -> Self {
        Proxy {
            injected_authorization: credentials.basic_authorization(),
            config,
            upstream,
            jobs,
        }
    }

    /// The job registry (for webhooks and tests).
    pub fn jobs(&self) -> &Arc<JobRegistry> {
        &self.jobs
    }

    /// Serves one app request; never fails: errors become sidecar error responses.
    pub async fn handle<B>(&self, request: Request<B>, peer: SocketAddr) -> Response<Body>
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        let started = Instant::now();
        let method = request.method().clone();
        let result = self.serve(request, peer, started).await;
        let response = result.unwrap_or_else(|error| {
            match error.party() {
                crate::error::Party::App => {
                    tracing::info!(code = error.code(), %error, "request refused")
                }
                _ => tracing::warn!(code = error.code(), %error, "request failed"),
            }
            error.to_response()
        });
        tracing::debug!(%method, status = response.status().as_u16(), elapsed_ms = started.elapsed().as_millis() as u64, "answered");
        response
    }

    /// Phase 1: classify.
    fn classify(&self, parts: &http::request::Parts, started: Instant) -> Inspection {
        let prefer = rewrite::parse_prefer(parts.headers.get_all("prefer"));
        let (versioned, _) = split_path(parts.uri.path());
        let route = self
            .config
            .facade
            .routes
            .find(&parts.method, parts.uri.path())
            .cloned();
        let query_async = rewrite::query_response_modes(parts.uri.query())
            .iter()
            .any(|m| m == "async");
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
        &self,
        request: Request<B>,
        peer: SocketAddr,
        started: Instant,
    ) -> Result<Response<Body>, ProxyError>
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        if request.method() == Method::CONNECT {
            return Err(ProxyError::BadRequest(
                "CONNECT is not supported by this proxy".into(),
            ));
        }
        let (parts, incoming) = request.into_parts();
        let mut inspection = self.classify(&parts, started);
        let span = tracing::info_span!(
            "request",
            class = inspection.class.as_str(),
            route = inspection
                .route
                .as_ref()
                .map(|r| r.template())
                .unwrap_or("-"),
            job_id = tracing::field::Empty
        );
        let _enter = span.enter();
        let path = parts.uri.path().to_string();
        let query = parts.uri.query().map(str::to_string);

        match inspection.class {
            Class::Facade => {
                // Phase 2: read.
                let limit = self.config.facade.max_body;
                if content_length(&parts.headers).is_some_and(|len| len > limit as u64) {
                    return Err(ProxyError::BodyTooLarge { limit });
                }
                let bytes = Limited::new(incoming, limit).collect().await.map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        ProxyError::BodyTooLarge { limit }
                    } else {
                        ProxyError::BadRequest(format!("the request body could not be read: {e}"))
                    }
                })?;
                let bytes = bytes.to_bytes();
                if let BodyMode::Object(Some(mode)) = rewrite::body_response_mode(&bytes) {
                    if mode == "async" {
                        inspection.class = Class::ExplicitAsync;
                        span.record("class", Class::ExplicitAsync.as_str());
                        let target = proxy::path_and_query(&path, query.as_deref());
                        return self
                            .forward_buffered(&parts, &target, bytes, peer)
                            .await
                            .map(|(r, _)| r);
                    }
                }
                // Phase 3: rewrite.
                let modes = self.config.facade.response_mode_in;
                let body_rewritten = if modes.body {
                    rewrite::rewrite_json_body(&bytes)
                } else {
                    None
                };
                let use_query = modes.query || (modes.body && body_rewritten.is_none());
                let new_query = if use_query {
                    Some(rewrite::rewrite_query(query.as_deref()))
                } else {
                    query.clone()
                };
                let new_body = body_rewritten.map(Bytes::from).unwrap_or(bytes);
                let target = proxy::path_and_query(&path, new_query.as_deref());
                // Phase 4: forward.
                let (response, answer) = self
                    .forward_buffered(&parts, &target, new_body, peer)
                    .await?;
                // Phase 5 and 6: await and reply.
                match answer {
                    Some(answer) if !inspection.respond_async => {
                        self.await_job(&parts, &inspection, answer, &span).await
                    }
                    Some(answer) => Ok(answer.into_response()),
                    None => Ok(response),
                }
            }
            Class::ExplicitAsync | Class::Passthrough => {
                let target = proxy::path_and_query(&path, query.as_deref());
                let is_write =
                    !matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS);
                let body = if inspection.class == Class::Passthrough
                    && is_write
                    && is_json(&parts.headers)
                {
                    match peek_body(incoming, self.config.facade.max_body).await {
                        Ok(Peeked::Complete(bytes)) => {
                            if rewrite::body_response_mode(&bytes)
                                == BodyMode::Object(Some("async".into()))
                            {
                                inspection.class = Class::ExplicitAsync;
                                span.record("class", Class::ExplicitAsync.as_str());
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
                } else {
                    body::boxed(incoming)
                };
                let request = self.upstream_request(&parts, &target, body, peer)?;
                let response = self.upstream.send(request).await.map_err(|f| f.error)?;
                let may_be_async = inspection.class == Class::Passthrough
                    && (is_write || inspection.route.is_some())
                    && response.status() == StatusCode::OK
                    && is_json(response.headers());
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
                            self.await_job(&parts, &inspection, answer, &span).await
                        }
                        Some(Err(error)) => Err(error),
                        None => {
                            proxy::prepare_response_headers(&mut head.headers, head.version);
                            head.headers.remove(header::CONTENT_LENGTH);
                            head.version = Version::HTTP_11;
                            Ok(Response::from_parts(head, body::full(bytes)))
                        }
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
        }
    }

    /// Builds the upstream request: method, upstream URI, cleaned headers, injected credentials.
    fn upstream_request(
        &self,
        parts: &http::request::Parts,
        target: &str,
        body: Body,
        peer: SocketAddr,
    ) -> Result<Request<Body>, ProxyError> {
        let uri = proxy::upstream_uri(self.upstream.base(), target)?;
        let mut request = Request::new(body);
        *request.method_mut() = parts.method.clone();
        *request.uri_mut() = uri;
        let headers = request.headers_mut();
        *headers = parts.headers.clone();
        proxy::prepare_request_headers(headers, self.upstream.base(), peer.ip(), parts.version);
        self.inject_authorization(headers);
        Ok(request)
    }

    fn inject_authorization(&self, headers: &mut HeaderMap) {
        if !headers.contains_key(header::AUTHORIZATION) {
            if let Some(value) = &self.injected_authorization {
                headers.insert(header::AUTHORIZATION, value.clone());
            }
        }
    }

    /// Sends a buffered request and reads the answer; returns the app-ready response and, if the
    /// answer is an `async_response`, its parts.
    async fn forward_buffered(
        &self,
        parts: &http::request::Parts,
        target: &str,
        bytes: Bytes,
        peer: SocketAddr,
    ) -> Result<(Response<Body>, Option<AsyncAnswer>), ProxyError> {
        let len = bytes.len();
        let mut request = self.upstream_request(parts, target, body::full(bytes), peer)?;
        request
            .headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        let (mut head, bytes) = self
            .upstream
            .send_buffered(request, MAX_JOB_BYTES)
            .await
            .map_err(|f| f.error)?;
        let is_accepted = matches!(head.status, StatusCode::OK | StatusCode::ACCEPTED);
        if is_accepted {
            match parse_async_response(&bytes) {
                Some(Ok(job)) => {
                    let answer = AsyncAnswer {
                        head: head.clone(),
                        body: bytes.clone(),
                        job,
                    };
                    return Ok((buffered_response(head, bytes), Some(answer)));
                }
                Some(Err(error)) => return Err(error),
                None => {}
            }
        }
        head.headers.remove(header::CONTENT_LENGTH);
        Ok((buffered_response(head, bytes), None))
    }

    /// Phases 5 and 6: wait on the job's tracker until its outcome or the deadline, then reply.
    async fn await_job(
        &self,
        parts: &http::request::Parts,
        inspection: &Inspection,
        answer: AsyncAnswer,
        span: &tracing::Span,
    ) -> Result<Response<Body>, ProxyError> {
        span.record("job_id", answer.job.id.as_str());
        let uri = poll_uri(self.upstream.base(), inspection.versioned, &answer.job)?;
        let mut headers = HeaderMap::new();
        if let Some(auth) = parts.headers.get(header::AUTHORIZATION) {
            headers.insert(header::AUTHORIZATION, auth.clone());
        }
        self.inject_authorization(&mut headers);
        if let Some(version) = parts.headers.get(&X_RUTTER_VERSION) {
            headers.insert(X_RUTTER_VERSION, version.clone());
        }
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        let target = PollTarget { uri, headers };
        let waited = match self.jobs.track(&answer.job.id, target) {
            Ok(mut waiter) => waiter.wait_until(inspection.deadline).await,
            Err(TrackError::TooManyJobs) => {
                tracing::warn!(
                    "jobs.max_tracked reached; answering at once with the on_timeout reply"
                );
                None
            }
        };
        match waited {
            Some(outcome) => Ok(job_reply(&outcome, &answer)),
            None => match self.config.facade.on_timeout {
                OnTimeout::AsyncResponse => Ok(answer.into_response()),
                OnTimeout::GatewayTimeout => Err(ProxyError::JobWaitTimeout {
                    job_id: answer.job.id,
                }),
            },
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
    /// The original `async_response`, as Rutter's own `prefer_sync` returns it, with `X-Rutter-Job-ID`.
    fn into_response(self) -> Response<Body> {
        let mut response = buffered_response(self.head, self.body);
        if let Ok(id) = HeaderValue::from_str(&self.job.id) {
            response.headers_mut().insert(X_RUTTER_JOB_ID, id);
        }
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

/// An upstream answer read into memory, with response header hygiene; `Content-Length` is recomputed.
fn buffered_response(mut head: http::response::Parts, bytes: Bytes) -> Response<Body> {
    proxy::prepare_response_headers(&mut head.headers, head.version);
    head.headers.remove(header::CONTENT_LENGTH);
    head.version = Version::HTTP_11;
    Response::from_parts(head, body::full(bytes))
}

/// An upstream answer streamed to the app.
fn streamed_response(response: Response<hyper::body::Incoming>) -> Response<Body> {
    let (mut head, incoming) = response.into_parts();
    proxy::prepare_response_headers(&mut head.headers, head.version);
    head.version = Version::HTTP_11;
    Response::from_parts(head, body::boxed(incoming))
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
                "https://PRODUCTION.rutterapi.com:443/versioned/jobs/j1",
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
