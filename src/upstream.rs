//! The client side towards Rutter: one pooled hyper-util client over rustls (ring provider, the web
//! roots plus `upstream.ca_file`), HTTP/1.1 and HTTP/2 by ALPN, with the connect and request timeouts,
//! and the classification of upstream failures into [`ProxyError`]s.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tokio::time::Instant;

use crate::body::Body;
use crate::budget::{Budget, Priority, Slot};
use crate::config::{BaseUrl, UpstreamConfig};
use crate::error::ProxyError;
use crate::telemetry::Metrics;

/// Builds the rustls client configuration: the Mozilla web roots, plus every certificate in `ca_file`.
pub fn tls_config(ca_file: Option<&Path>) -> io::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let mut added = 0;
        for cert in CertificateDer::pem_file_iter(path).map_err(|e| pem_error(path, e))? {
            let cert = cert.map_err(|e| pem_error(path, e))?;
            roots.add(cert).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            })?;
            added += 1;
        }
        if added == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: no PEM certificates found", path.display()),
            ));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| io::Error::other(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

fn pem_error(path: &Path, error: rustls_pki_types::pem::Error) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{}: {error}", path.display()),
    )
}

/// A pooled HTTP/1.1 + HTTP/2 client over rustls, for http and https URLs.
pub fn http_client(
    tls: rustls::ClientConfig,
    connect_timeout: Duration,
    max_idle_per_host: usize,
) -> Client<HttpsConnector<HttpConnector>, Body> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(max_idle_per_host.max(1))
        .build(https)
}

/// What the caller learns about a failed exchange, besides the error for the app.
#[derive(Debug)]
pub struct UpstreamFailure {
    /// The error to answer with.
    pub error: ProxyError,
    /// True when the request certainly never left the sidecar (connect failed), so even a write
    /// without an idempotency key may be retried.
    pub nothing_sent: bool,
}

/// What an upstream call is for: decides its priority for the rate budget and its metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    /// A buffered write on behalf of an app (facade or explicit-async).
    Write,
    /// A passthrough exchange on behalf of an app.
    Passthrough,
    /// A job poll the sidecar makes itself.
    Poll,
}

impl CallKind {
    fn label(self) -> &'static str {
        match self {
            CallKind::Write => "write",
            CallKind::Passthrough => "passthrough",
            CallKind::Poll => "poll",
        }
    }

    fn priority(self) -> Priority {
        match self {
            CallKind::Poll => Priority::Poll,
            _ => Priority::App,
        }
    }
}

/// The pooled client towards Rutter, behind the organisation's rate budget.
#[derive(Clone)]
pub struct Upstream {
    client: Client<HttpsConnector<HttpConnector>, Body>,
    base: BaseUrl,
    request_timeout: Duration,
    budget: Arc<Budget>,
    metrics: Arc<Metrics>,
}

impl Upstream {
    /// Builds the client. Reads `upstream.ca_file` when set.
    pub fn new(config: &UpstreamConfig, metrics: Arc<Metrics>) -> io::Result<Self> {
        let tls = tls_config(config.ca_file.as_deref())?;
        let client = http_client(tls, config.connect_timeout, config.max_in_flight);
        Ok(Upstream {
            client,
            base: config.base_url.clone(),
            request_timeout: config.request_timeout,
            budget: Arc::new(Budget::new(config.rate_limit, config.max_in_flight)),
            metrics,
        })
    }

    /// The configured base URL.
    pub fn base(&self) -> &BaseUrl {
        &self.base
    }

    /// The rate budget (for metrics and tests).
    pub fn budget(&self) -> &Budget {
        &self.budget
    }

    /// The `upstream.request_timeout`.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// Waits for the rate budget and an in-flight slot, until `deadline`.
    async fn admit(&self, kind: CallKind, deadline: Instant) -> Result<Slot, UpstreamFailure> {
        let started = Instant::now();
        let result = self.budget.acquire(kind.priority(), deadline).await;
        let waited = started.elapsed();
        if waited >= Duration::from_millis(1) {
            self.metrics.rate_limit_waits.inc();
            self.metrics.rate_limit_wait.observe(waited.as_secs_f64());
        }
        result.map_err(|exhausted| {
            self.metrics.upstream_failure(kind.label(), "budget");
            UpstreamFailure {
                error: ProxyError::RateBudgetExhausted {
                    retry_after: exhausted.retry_after,
                },
                nothing_sent: true,
            }
        })
    }

    /// Records the answer's status and feeds 429/452 back into the budget.
    fn observe(&self, kind: CallKind, status: StatusCode, headers: &HeaderMap) {
        self.metrics.upstream_call(kind.label(), status.as_u16());
        if matches!(status.as_u16(), 429 | 452) {
            self.budget.penalise(crate::jobs::retry_after(headers));
        }
    }

    /// Sends a request and returns once the response head arrives; the body streams afterwards and
    /// holds its in-flight slot until it ends.
    pub async fn send(
        &self,
        request: Request<Body>,
        kind: CallKind,
        deadline: Instant,
    ) -> Result<Response<Body>, UpstreamFailure> {
        let slot = self.admit(kind, deadline).await?;
        let exchange = Box::pin(self.client.request(request));
        match tokio::time::timeout(self.request_timeout, exchange).await {
            Ok(Ok(response)) => {
                self.observe(kind, response.status(), response.headers());
                let idle = self.request_timeout;
                Ok(response.map(move |incoming| {
                    let body = incoming.map_frame(move |frame| {
                        let _held = &slot;
                        frame
                    });
                    IdleTimeout::wrap(crate::body::boxed(body), idle)
                }))
            }
            Ok(Err(error)) => Err(self.failed(kind, classify(&error))),
            Err(_) => Err(self.failed(
                kind,
                UpstreamFailure {
                    error: ProxyError::UpstreamTimeout(self.request_timeout),
                    nothing_sent: false,
                },
            )),
        }
    }

    fn failed(&self, kind: CallKind, failure: UpstreamFailure) -> UpstreamFailure {
        let label = if matches!(failure.error, ProxyError::UpstreamTimeout(_)) {
            "timeout"
        } else {
            "error"
        };
        self.metrics.upstream_failure(kind.label(), label);
        failure
    }

    /// Sends a request and reads the whole response body (at most `max_body` bytes), all within
    /// `upstream.request_timeout` (after waiting for the budget until `deadline`).
    pub async fn send_buffered(
        &self,
        request: Request<Body>,
        kind: CallKind,
        deadline: Instant,
        max_body: usize,
    ) -> Result<(http::response::Parts, Bytes), UpstreamFailure> {
        let _slot = self.admit(kind, deadline).await?;
        let exchange = Box::pin(async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| classify(&e))?;
            let (mut parts, body) = response.into_parts();
            // What a buffered exchange returns may be kept for long (a job's async_response, a
            // stored result): copied out of the connection's read buffer so it does not pin it.
            parts.headers = crate::body::detached_headers(&parts.headers);
            let bytes =
                Limited::new(body, max_body)
                    .collect()
                    .await
                    .map_err(|e| UpstreamFailure {
                        error: ProxyError::UpstreamUnavailable(format!(
                            "the response body could not be read: {}",
                            describe(&*e)
                        )),
                        nothing_sent: false,
                    })?;
            let bytes = bytes.to_bytes();
            Ok((parts, Bytes::copy_from_slice(&bytes)))
        });
        match tokio::time::timeout(self.request_timeout, exchange).await {
            Ok(Ok((parts, bytes))) => {
                self.observe(kind, parts.status, &parts.headers);
                Ok((parts, bytes))
            }
            Ok(Err(failure)) => Err(self.failed(kind, failure)),
            Err(_) => Err(self.failed(
                kind,
                UpstreamFailure {
                    error: ProxyError::UpstreamTimeout(self.request_timeout),
                    nothing_sent: false,
                },
            )),
        }
    }
}

/// A streamed body that fails if no frame arrives for `limit` (a stalled upstream never holds the app
/// forever; `upstream.request_timeout` bounds each silence).
pub struct IdleTimeout {
    inner: Body,
    limit: Duration,
    /// When the last frame arrived (or the wrap): the body fails at `silent_since + limit`.
    silent_since: Instant,
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl IdleTimeout {
    /// Wraps `inner`.
    pub fn wrap(inner: Body, limit: Duration) -> Body {
        let timer = Box::pin(tokio::time::sleep(limit));
        http_body_util::BodyExt::boxed_unsync(IdleTimeout {
            inner,
            limit,
            silent_since: Instant::now(),
            timer,
        })
    }
}

impl http_body::Body for IdleTimeout {
    type Data = Bytes;
    type Error = crate::body::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        use std::future::Future;
        use std::task::Poll;
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                // Only noted here; the timer is moved when it fires (no timer-wheel work per frame).
                this.silent_since = Instant::now();
                Poll::Ready(frame)
            }
            Poll::Pending => loop {
                match this.timer.as_mut().poll(cx) {
                    Poll::Pending => break Poll::Pending,
                    Poll::Ready(()) => {
                        let due = this.silent_since + this.limit;
                        if Instant::now() < due {
                            this.timer.as_mut().reset(due);
                            continue;
                        }
                        break Poll::Ready(Some(Err(format!(
                            "Rutter sent nothing for {}; the answer was cut",
                            humantime::format_duration(this.limit)
                        )
                        .into())));
                    }
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Turns a client error into the app-facing error, and tells whether anything was sent.
fn classify(error: &hyper_util::client::legacy::Error) -> UpstreamFailure {
    let detail = describe(error);
    if error.is_connect() {
        UpstreamFailure {
            error: ProxyError::UpstreamUnavailable(format!("connect failed: {detail}")),
            nothing_sent: true,
        }
    } else {
        UpstreamFailure {
            error: ProxyError::UpstreamUnavailable(detail),
            nothing_sent: false,
        }
    }
}

/// The error and its sources, joined, without URIs (hyper errors do not carry them).
pub fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        let part = inner.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = inner.source();
    }
    text
}
