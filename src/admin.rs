//! The admin listener (DESIGN §8): `GET /live` (200 while the process runs), `GET /ready` (200 while
//! serving, 503 once shutdown has begun), `GET /metrics` (Prometheus text format). Meant for
//! Kubernetes probes and scrapers; it carries no secret and changes nothing.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};

use crate::body::{self, Body};
use crate::error::ProxyError;
use crate::jobs::JobRegistry;
use crate::lifecycle::Lifecycle;
use crate::telemetry::Metrics;
use crate::upstream::Upstream;

/// What the admin endpoints read.
pub struct Admin {
    /// Metrics to expose.
    pub metrics: Arc<Metrics>,
    /// Shutdown state, for `/ready`.
    pub lifecycle: Arc<Lifecycle>,
    /// Jobs, for the `jobs_tracked` gauge.
    pub jobs: Arc<JobRegistry>,
    /// Upstream, for the budget gauge.
    pub upstream: Upstream,
}

impl Admin {
    /// Serves one admin request.
    pub fn handle<B>(&self, request: &Request<B>) -> Response<Body> {
        if !matches!(*request.method(), Method::GET | Method::HEAD) {
            let mut response = ProxyError::MethodNotAllowed.to_response();
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return response;
        }
        match request.uri().path() {
            "/live" => text(StatusCode::OK, "live\n"),
            "/ready" if self.lifecycle.is_draining() => {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            }
            "/ready" => text(StatusCode::OK, "ready\n"),
            "/metrics" => {
                self.metrics.jobs_tracked.set(self.jobs.tracked() as i64);
                self.metrics
                    .budget_used
                    .set(self.upstream.budget().used() as i64);
                self.metrics
                    .draining
                    .set(i64::from(self.lifecycle.is_draining()));
                let mut response = Response::new(body::full(Bytes::from(self.metrics.encode())));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    // prometheus-client writes the OpenMetrics text format (which Prometheus reads).
                    HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                response
            }
            _ => ProxyError::NotFound.to_response(),
        }
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut response = Response::new(body::full(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
