//! The webhook receiver (DESIGN §7): `POST {webhooks.path}` on `listen.webhooks`, facing Rutter.
//!
//! Every webhook is checked against `X-Rutter-Signature` (`sha256=` + base64 HMAC-SHA256 of the raw
//! body, keyed by the client secret) in constant time before anything else happens. A verified
//! `JOB`/`JOB_COMPLETED` webhook completes that job's tracker at once ([`JobRegistry::complete`]), so
//! every waiting request is answered without waiting for the next poll; the first completion wins, so a
//! duplicate or a replay never overrides a delivered result. Exact duplicate deliveries are recognised
//! by a hash of the body and acknowledged without effect. Verified webhooks (JOB ones only with
//! `webhooks.forward_job_webhooks`) are forwarded to `webhooks.forward_to` with the same body bytes
//! and signature header, from a bounded queue, in the background, with retries; Rutter is answered 200
//! as soon as the webhook is verified and queued.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, Uri};
use http_body_util::{BodyExt, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use tokio::sync::{mpsc, Semaphore};

use crate::body::{self, Body, BoxError};
use crate::config::{Credentials, WebhooksConfig};
use crate::error::ProxyError;
use crate::jobs::{JobObject, JobRegistry};
use crate::telemetry::Metrics;
use crate::upstream;

/// How long a webhook body may take to arrive unless configured otherwise.
const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest webhook body accepted (413 beyond).
pub const MAX_WEBHOOK_BODY: usize = 1024 * 1024;
/// The signature header Rutter sends.
pub const X_RUTTER_SIGNATURE: HeaderName = HeaderName::from_static("x-rutter-signature");
/// How long a delivered body is remembered to recognise duplicates (Rutter retries over ~15 min).
const DUPLICATE_WINDOW: Duration = Duration::from_secs(60 * 60);
/// Most remembered bodies.
const DUPLICATE_CAPACITY: u64 = 100_000;
/// Concurrent forwarding deliveries.
const FORWARD_CONCURRENCY: usize = 16;
/// Longest backoff between forwarding attempts.
const MAX_FORWARD_BACKOFF: Duration = Duration::from_secs(60);
/// Limit for one forwarding attempt.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether `header` is `sha256=` + base64(HMAC-SHA256(secret, body)); compared in constant time.
pub fn verify_signature(secret: &[u8], body: &[u8], header: &[u8]) -> bool {
    let Some(encoded) = header.strip_prefix(b"sha256=") else {
        return false;
    };
    let Ok(expected) = base64::engine::general_purpose::STANDARD.decode(encoded.trim_ascii())
    else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&expected).is_ok()
}

/// The signature header value Rutter would send for `body`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes keys of any length: `new_from_slice` cannot fail here.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return String::new();
    };
    mac.update(body);
    format!(
        "sha256={}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

#[derive(Deserialize)]
struct Envelope {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    code: Option<String>,
    /// Kept as raw JSON so the job's `response.body` reaches the app with Rutter's exact bytes.
    #[serde(default)]
    job: Option<Box<serde_json::value::RawValue>>,
}

/// Counters for operations and tests.
#[derive(Debug, Default)]
pub struct WebhookStats {
    /// Requests on the webhook listener.
    pub received: AtomicU64,
    /// Webhooks with a valid signature.
    pub verified: AtomicU64,
    /// Refused: missing or wrong signature, or no secret configured (401).
    pub unauthorized: AtomicU64,
    /// Signed but not the expected JSON (400).
    pub malformed: AtomicU64,
    /// Exact duplicate deliveries, acknowledged and ignored.
    pub duplicates: AtomicU64,
    /// JOB webhooks that completed a tracker (first completion of their job).
    pub jobs_completed: AtomicU64,
    /// JOB webhooks for a job that already had a result (ignored).
    pub jobs_already_done: AtomicU64,
    /// Webhooks delivered to `forward_to`.
    pub forwarded: AtomicU64,
    /// Webhooks given up after `forward_attempts`.
    pub forward_failed: AtomicU64,
    /// Webhooks refused with 503 because the forwarding queue was full.
    pub forward_queue_full: AtomicU64,
}

struct Forward {
    body: Bytes,
    signature: Option<HeaderValue>,
    content_type: Option<HeaderValue>,
}

/// The receiver and its forwarder.
pub struct WebhookReceiver {
    config: WebhooksConfig,
    secret: Option<Vec<u8>>,
    jobs: Arc<JobRegistry>,
    seen: moka::sync::Cache<[u8; 32], ()>,
    forward_tx: Option<mpsc::Sender<Forward>>,
    forward_rx: Mutex<Option<mpsc::Receiver<Forward>>>,
    stats: Arc<WebhookStats>,
    metrics: Arc<Metrics>,
    body_timeout: Duration,
}

impl WebhookReceiver {
    /// A receiver completing jobs in `jobs`, verifying with the client secret from `credentials`.
    pub fn new(
        config: &WebhooksConfig,
        credentials: &Credentials,
        jobs: Arc<JobRegistry>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (forward_tx, forward_rx) = match config.forward_to {
            Some(_) => {
                let (tx, rx) = mpsc::channel(config.forward_queue.max(1));
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        WebhookReceiver {
            config: config.clone(),
            secret: credentials
                .client_secret
                .as_ref()
                .map(|s| s.as_bytes().to_vec()),
            jobs,
            seen: moka::sync::Cache::builder()
                .max_capacity(DUPLICATE_CAPACITY)
                .time_to_live(DUPLICATE_WINDOW)
                .build(),
            forward_tx,
            forward_rx: Mutex::new(forward_rx),
            stats: Arc::new(WebhookStats::default()),
            metrics,
            body_timeout: DEFAULT_BODY_TIMEOUT,
        }
    }

    /// Limits how long a webhook body may take to arrive (`listen.idle_timeout`; default 60 s).
    pub fn with_body_timeout(mut self, limit: Duration) -> Self {
        self.body_timeout = limit;
        self
    }

    /// Counters.
    pub fn stats(&self) -> &WebhookStats {
        &self.stats
    }

    /// Starts the background forwarder (once; later calls do nothing). Needs a tokio runtime.
    pub fn start_forwarding(&self) -> std::io::Result<()> {
        let Some(rx) = self
            .forward_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return Ok(());
        };
        let Some(target) = self.config.forward_to.clone() else {
            return Ok(());
        };
        let client = upstream::http_client(
            upstream::tls_config(None)?,
            Duration::from_secs(5),
            FORWARD_CONCURRENCY,
        );
        let forwarder = Forwarder {
            client,
            target,
            attempts: self.config.forward_attempts.max(1),
            backoff: self.config.forward_backoff,
            stats: Arc::clone(&self.stats),
            metrics: Arc::clone(&self.metrics),
        };
        tokio::spawn(forwarder.run(rx));
        Ok(())
    }

    /// Serves one request on the webhook listener.
    pub async fn handle<B>(&self, request: Request<B>) -> Response<Body>
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        self.stats.received.fetch_add(1, Relaxed);
        match self.receive(request).await {
            Ok(response) => response,
            Err(error) => {
                if matches!(
                    error,
                    ProxyError::NotFound
                        | ProxyError::MethodNotAllowed
                        | ProxyError::BodyTooLarge { .. }
                        | ProxyError::BadRequest(_)
                ) {
                    self.metrics.webhook("rejected");
                }
                tracing::info!(code = error.code(), %error, "webhook refused");
                error.to_response()
            }
        }
    }

    async fn receive<B>(&self, request: Request<B>) -> Result<Response<Body>, ProxyError>
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        if request.uri().path() != self.config.path {
            return Err(ProxyError::NotFound);
        }
        if request.method() != Method::POST {
            return Err(ProxyError::MethodNotAllowed);
        }
        let (parts, incoming) = request.into_parts();
        let too_large = ProxyError::BodyTooLarge {
            limit: MAX_WEBHOOK_BODY,
        };
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|len| len > MAX_WEBHOOK_BODY as u64) {
            return Err(too_large);
        }
        let read = Limited::new(incoming, MAX_WEBHOOK_BODY).collect();
        let body = tokio::time::timeout(self.body_timeout, read)
            .await
            .map_err(|_| ProxyError::BadRequest("the webhook body did not arrive in time".into()))?
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    ProxyError::BodyTooLarge {
                        limit: MAX_WEBHOOK_BODY,
                    }
                } else {
                    ProxyError::BadRequest("the webhook body could not be read".into())
                }
            })?
            .to_bytes();

        let signature = parts.headers.get(&X_RUTTER_SIGNATURE);
        if self.config.verify_signature {
            let valid = match (&self.secret, signature) {
                (Some(secret), Some(signature)) => {
                    verify_signature(secret, &body, signature.as_bytes())
                }
                _ => false,
            };
            if !valid {
                self.stats.unauthorized.fetch_add(1, Relaxed);
                self.metrics.webhook("unauthorized");
                return Err(ProxyError::WebhookUnauthorized);
            }
        }
        self.stats.verified.fetch_add(1, Relaxed);

        let envelope: Envelope = serde_json::from_slice(&body).map_err(|_| {
            self.stats.malformed.fetch_add(1, Relaxed);
            self.metrics.webhook("malformed");
            ProxyError::WebhookMalformed("not a JSON object with a type".into())
        })?;
        let is_job = envelope.kind.as_deref() == Some("JOB");
        let job = match (is_job, envelope.code.as_deref(), envelope.job) {
            (true, Some("JOB_COMPLETED"), Some(job)) => {
                Some(serde_json::from_str::<JobObject>(job.get()).map_err(|_| {
                    self.stats.malformed.fetch_add(1, Relaxed);
                    self.metrics.webhook("malformed");
                    ProxyError::WebhookMalformed("the job object has no id or status".into())
                })?)
            }
            _ => None,
        };

        let digest: [u8; 32] = Sha256::digest(&body).into();
        if self.seen.contains_key(&digest) {
            self.stats.duplicates.fetch_add(1, Relaxed);
            self.metrics.webhook("duplicate");
            return Ok(accepted());
        }

        // Reserve room in the forwarding queue before acting, so a full queue can be refused with 503
        // (Rutter delivers again later) without losing the webhook.
        let forward = !is_job || self.config.forward_job_webhooks;
        let permit = match (&self.forward_tx, forward) {
            (Some(tx), true) => match tx.try_reserve() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    self.stats.forward_queue_full.fetch_add(1, Relaxed);
                    self.metrics.webhook("queue_full");
                    return Err(ProxyError::Overloaded(
                        "the webhook forwarding queue is full".into(),
                    ));
                }
            },
            _ => None,
        };
        self.seen.insert(digest, ());

        if let Some(job) = job {
            if self.jobs.complete(&job) {
                self.stats.jobs_completed.fetch_add(1, Relaxed);
                tracing::info!(job_id = %job.id, status = %job.status, "job completed by webhook");
            } else {
                self.stats.jobs_already_done.fetch_add(1, Relaxed);
            }
        }
        if let Some(permit) = permit {
            permit.send(Forward {
                body,
                signature: signature.cloned(),
                content_type: parts.headers.get(header::CONTENT_TYPE).cloned(),
            });
        }
        self.metrics.webhook("accepted");
        Ok(accepted())
    }
}

fn accepted() -> Response<Body> {
    let mut response = Response::new(body::full(&b"{\"received\":true}"[..]));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

struct Forwarder {
    client: Client<HttpsConnector<HttpConnector>, Body>,
    target: Uri,
    attempts: usize,
    backoff: Duration,
    stats: Arc<WebhookStats>,
    metrics: Arc<Metrics>,
}

impl Forwarder {
    async fn run(self, mut rx: mpsc::Receiver<Forward>) {
        let this = Arc::new(self);
        let slots = Arc::new(Semaphore::new(FORWARD_CONCURRENCY));
        while let Some(item) = rx.recv().await {
            let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                return;
            };
            let this = Arc::clone(&this);
            tokio::spawn(async move {
                this.deliver(item).await;
                drop(slot);
            });
        }
    }

    async fn deliver(&self, item: Forward) {
        let mut delay = self.backoff;
        for attempt in 1..=self.attempts {
            let mut request = Request::new(body::full(item.body.clone()));
            *request.method_mut() = Method::POST;
            *request.uri_mut() = self.target.clone();
            let headers = request.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                item.content_type
                    .clone()
                    .unwrap_or(HeaderValue::from_static("application/json")),
            );
            if let Some(signature) = &item.signature {
                headers.insert(X_RUTTER_SIGNATURE, signature.clone());
            }
            let outcome = tokio::time::timeout(FORWARD_TIMEOUT, self.client.request(request)).await;
            let status = match outcome {
                Ok(Ok(response)) => {
                    let status = response.status();
                    // Drain the answer so the connection can be reused.
                    let _ = response.into_body().collect().await;
                    Some(status)
                }
                _ => None,
            };
            if status.is_some_and(|s| s.is_success()) {
                self.stats.forwarded.fetch_add(1, Relaxed);
                self.metrics.webhook_forward("delivered");
                return;
            }
            tracing::info!(
                attempt,
                status = status.map(|s| s.as_u16()),
                "forwarding a webhook to the app failed"
            );
            if attempt < self.attempts {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_FORWARD_BACKOFF);
            }
        }
        self.stats.forward_failed.fetch_add(1, Relaxed);
        self.metrics.webhook_forward("failed");
        tracing::warn!(
            attempts = self.attempts,
            "gave up forwarding a webhook to the app"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_over_the_exact_bytes() {
        let secret = b"client-secret";
        let body = br#"{"type":"JOB","code":"JOB_COMPLETED"}"#;
        let header = sign(secret, body);
        assert!(header.starts_with("sha256="));
        assert!(verify_signature(secret, body, header.as_bytes()));
        assert!(
            verify_signature(secret, body, format!("{header} ").as_bytes()),
            "trailing whitespace tolerated"
        );
        let reserialised = br#"{"type": "JOB", "code": "JOB_COMPLETED"}"#;
        for (secret, body, header) in [
            (&secret[..], &reserialised[..], header.as_str()),
            (b"other-secret", body, header.as_str()),
            (secret, body, header.trim_start_matches("sha256=")),
            (secret, body, "sha256="),
            (secret, body, "sha256=!!!not-base64"),
            (secret, body, "sha1=abc"),
            (secret, body, ""),
        ] {
            assert!(
                !verify_signature(secret, body, header.as_bytes()),
                "{header}"
            );
        }
    }

    #[test]
    fn the_fixture_signature_shape_is_base64_of_32_bytes() {
        let header = sign(b"k", b"x");
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(&header["sha256=".len()..])
            .unwrap();
        assert_eq!(decoded.len(), 32);
    }
}
