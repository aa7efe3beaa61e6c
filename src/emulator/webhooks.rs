//! Signed webhooks, as Rutter sends them (DESIGN §7 and §9, `rutter/API-FACTS.md` §6): for every
//! job that reaches a terminal status, `{"type": "JOB", "code": "JOB_COMPLETED", "connection_id",
//! "access_token", "job"}` is POSTed to `--webhook-url` with
//! `X-Rutter-Signature: sha256=<base64 HMAC-SHA256(key = client secret, message = the body bytes)>`.
//!
//! This module owns the envelope, the signature ([`sign`]), the per-job delivery plan (delay,
//! extra copies, drop, bad signature, early delivery: options and `X-Emulator-Webhook`), and the
//! delivery itself: a pooled HTTP/1.1 client (rustls, web roots), at most [`MAX_IN_FLIGHT`]
//! attempts at once and [`MAX_PENDING`] copies waiting (beyond it a copy is dropped and counted),
//! each attempt bounded by `--webhook-timeout-ms`. A copy answered with a 2xx is delivered; any
//! other answer or a transport error is retried [`MAX_RETRIES`] times, waiting `--webhook-retry-ms`
//! and doubling each time, then given up. Every copy carries the same bytes and signature.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::{header, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::sync::{oneshot, Semaphore};

use super::entities::stable_uuid;
use super::options::{EmulatorError, EmulatorOptions};
use super::state::{inc, lock, JobCompleted, Shared};
use super::wire::WebhookKnobs;
use crate::body::{self, Body};

/// The signature header.
pub(crate) const SIGNATURE_HEADER: &str = "x-rutter-signature";
/// Retries after a copy's first attempt before it is given up (Rutter: "up to 6 times").
pub(crate) const MAX_RETRIES: u32 = 6;
/// Delivery attempts in flight at once, over every webhook.
pub(crate) const MAX_IN_FLIGHT: usize = 256;
/// Copies waiting (for their delay, a free slot, or a retry) or in flight; beyond it new copies
/// are dropped and counted in `webhooks_dropped`.
pub(crate) const MAX_PENDING: usize = 10_000;
/// Bytes of a receiver's answer read (and thrown away) so its connection can be reused.
const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// Idle connections kept per receiver.
const MAX_IDLE_CONNECTIONS: usize = 32;
/// `User-Agent` of webhook requests.
const USER_AGENT: &str = "rutter-sidecar-emulator-webhooks/1";

/// The `X-Rutter-Signature` value for `body`: `sha256=` followed by the base64 (standard alphabet,
/// padded) HMAC-SHA256 of exactly these bytes, keyed by `secret` (the client secret).
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    format!("sha256={}", base64_mac(&mac(secret, body)))
}

fn mac(secret: &[u8], body: &[u8]) -> Vec<u8> {
    match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(mut mac) => {
            mac.update(body);
            mac.finalize().into_bytes().to_vec()
        }
        // HMAC takes keys of any length, so this arm is never taken; an empty MAC never verifies.
        Err(_) => Vec::new(),
    }
}

fn base64_mac(mac: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(mac)
}

/// A well-formed signature header that does not verify: the right MAC with one bit flipped.
fn wrong_signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = mac(secret, body);
    if let Some(first) = mac.first_mut() {
        *first ^= 0x01;
    }
    format!("sha256={}", base64_mac(&mac))
}

/// How one job's webhook is sent; decided when the job is created (options and
/// `X-Emulator-Webhook`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct WebhookPlan {
    /// Whether webhooks are on at all (`webhook_url` is set).
    pub send: bool,
    /// Never sent (nor any copy).
    pub drop: bool,
    /// Sent with a wrong signature.
    pub bad_signature: bool,
    /// The job ends at once and the creating request waits for the first delivery attempt.
    pub early: bool,
    /// Extra copies.
    pub duplicates: u32,
    /// Wait between the job's end and the first attempt (zero when early).
    pub delay: Duration,
}

/// The plan for a new job's webhook (rolls the drop and bad-signature rates unless the header
/// decides).
pub(crate) fn plan(shared: &Shared, knobs: &WebhookKnobs) -> WebhookPlan {
    if shared.webhooks.is_none() {
        return WebhookPlan::default();
    }
    let options = &shared.options;
    let early = knobs.early || options.webhook_early;
    WebhookPlan {
        send: true,
        drop: knobs.drop || shared.roll(options.webhook_drop_rate),
        bad_signature: knobs.bad_signature || shared.roll(options.webhook_bad_signature_rate),
        early,
        duplicates: knobs.duplicates.unwrap_or(options.webhook_duplicates),
        delay: if early {
            Duration::ZERO
        } else {
            Duration::from_millis(knobs.delay_ms.unwrap_or(options.webhook_delay_ms))
        },
    }
}

/// The webhook client and its bounds; present when `webhook_url` is set.
pub(crate) struct WebhookSender {
    url: Uri,
    key: Vec<u8>,
    client: Client<HttpsConnector<HttpConnector>, Body>,
    permits: Semaphore,
    pending: AtomicUsize,
    retry_base: Duration,
    timeout: Duration,
}

impl WebhookSender {
    /// The sender for validated `options`, or `None` without `webhook_url`.
    pub(crate) fn new(options: &EmulatorOptions) -> Result<Option<Self>, EmulatorError> {
        let Some(url) = options.webhook_url.clone() else {
            return Ok(None);
        };
        let key = options
            .client_secret
            .clone()
            .unwrap_or_default()
            .into_bytes();
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| EmulatorError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let timeout = Duration::from_millis(options.webhook_timeout_ms);
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(MAX_IDLE_CONNECTIONS)
            .build(https);
        Ok(Some(WebhookSender {
            url,
            key,
            client,
            permits: Semaphore::new(MAX_IN_FLIGHT),
            pending: AtomicUsize::new(0),
            retry_base: Duration::from_millis(options.webhook_retry_ms),
            timeout,
        }))
    }

    /// Reserves up to `copies` pending slots; returns how many it got.
    fn reserve(&self, copies: usize) -> usize {
        let mut got = 0;
        while got < copies {
            let taken = self
                .pending
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < MAX_PENDING).then_some(n + 1)
                });
            if taken.is_err() {
                break;
            }
            got += 1;
        }
        got
    }

    fn release(&self, copies: usize) {
        self.pending.fetch_sub(copies, Ordering::AcqRel);
    }

    /// One POST of `body` with `signature`: the receiver's status, or why there is none.
    /// Counts the attempt in `webhooks_sent`.
    async fn post(
        &self,
        sent: &AtomicU64,
        body: Bytes,
        signature: HeaderValue,
    ) -> Result<StatusCode, String> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| "the webhook sender is closed".to_string())?;
        let request = Request::builder()
            .method(Method::POST)
            .uri(self.url.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::USER_AGENT, USER_AGENT)
            .header(SIGNATURE_HEADER, signature)
            .body(body::full(body))
            .map_err(|e| format!("cannot build the webhook request: {e}"))?;
        inc(sent);
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| describe(&e))?;
            let status = response.status();
            // Read (at most 64 KiB of) the answer so the connection can be reused; it is not used.
            let _ = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await;
            Ok(status)
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(outcome) => outcome,
            Err(_) => Err(format!("no answer within {} ms", self.timeout.as_millis())),
        }
    }
}

/// A transport error and its causes, on one line (hyper-util's errors do not carry the URL).
fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Releases one pending slot when a copy's delivery ends (or its task is cancelled).
struct Slot<'a>(&'a WebhookSender);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.release(1);
    }
}

/// Hands a finished job's webhook to the sender (called by `Shared::finish_locked`, under the
/// `jobs` lock: only counts, reserves and spawns). `notify` is told when the first attempt ended;
/// dropping it unsent tells the waiter there is nothing to wait for.
pub(crate) fn enqueue(
    shared: &Shared,
    event: &JobCompleted,
    plan: WebhookPlan,
    notify: Option<oneshot::Sender<()>>,
) {
    let Some(sender) = shared.webhooks.as_ref().filter(|_| plan.send) else {
        return;
    };
    let copies = 1 + plan.duplicates as usize;
    let dropped = &shared.counters.webhooks_dropped;
    if plan.drop {
        dropped.fetch_add(copies as u64, Ordering::Relaxed);
        tracing::debug!(job_id = %event.job_id, "emulator: webhook dropped on purpose");
        return;
    }
    let reserved = sender.reserve(copies);
    if reserved < copies {
        dropped.fetch_add((copies - reserved) as u64, Ordering::Relaxed);
        tracing::warn!(
            job_id = %event.job_id,
            "emulator: webhook queue full ({MAX_PENDING} pending); copies dropped"
        );
    }
    if reserved == 0 {
        return;
    }
    let runtime = tokio::runtime::Handle::try_current();
    let (Some(me), Ok(runtime)) = (shared.me.upgrade(), runtime) else {
        sender.release(reserved);
        dropped.fetch_add(reserved as u64, Ordering::Relaxed);
        return;
    };
    let event = event.clone();
    runtime.spawn(run(me, event, plan, reserved, notify));
}

/// Builds the body and signature once, waits the delay, then delivers every copy (the first one
/// in this task, so `notify` follows it).
async fn run(
    shared: Arc<Shared>,
    event: JobCompleted,
    plan: WebhookPlan,
    copies: usize,
    notify: Option<oneshot::Sender<()>>,
) {
    let Some(sender) = shared.webhooks.as_ref() else {
        return;
    };
    let body = Bytes::from(job_completed_body(&shared, &event));
    let signature = if plan.bad_signature {
        wrong_signature(&sender.key, &body)
    } else {
        sign(&sender.key, &body)
    };
    let Ok(signature) = HeaderValue::from_str(&signature) else {
        // Base64 is always a valid header value; never taken.
        sender.release(copies);
        return;
    };
    if !plan.delay.is_zero() {
        tokio::time::sleep(plan.delay).await;
    }
    for _ in 1..copies {
        let shared = Arc::clone(&shared);
        let (body, signature, job_id) = (body.clone(), signature.clone(), event.job_id.clone());
        tokio::spawn(async move { deliver(&shared, &job_id, body, signature, None).await });
    }
    deliver(&shared, &event.job_id, body, signature, notify).await;
}

/// Delivers one copy: the first attempt, then up to [`MAX_RETRIES`] retries with exponential
/// backoff until a 2xx answer. Owns one pending slot.
async fn deliver(
    shared: &Shared,
    job_id: &str,
    body: Bytes,
    signature: HeaderValue,
    mut notify: Option<oneshot::Sender<()>>,
) {
    let Some(sender) = shared.webhooks.as_ref() else {
        return;
    };
    let _slot = Slot(sender);
    let counters = &shared.counters;
    let mut retries = 0u32;
    loop {
        let outcome = sender
            .post(&counters.webhooks_sent, body.clone(), signature.clone())
            .await;
        if let Some(notify) = notify.take() {
            let _ = notify.send(());
        }
        match outcome {
            Ok(status) if status.is_success() => {
                inc(&counters.webhooks_delivered);
                tracing::debug!(job_id, %status, retries, "emulator: webhook delivered");
                return;
            }
            Ok(status) => {
                tracing::debug!(job_id, %status, retries, "emulator: webhook refused");
            }
            Err(error) => {
                tracing::debug!(job_id, %error, retries, "emulator: webhook not delivered");
            }
        }
        if retries >= MAX_RETRIES {
            inc(&counters.webhooks_failed);
            tracing::warn!(
                job_id,
                "emulator: webhook given up after {MAX_RETRIES} retries"
            );
            return;
        }
        let wait = sender.retry_base.saturating_mul(1 << retries);
        retries += 1;
        tokio::time::sleep(wait).await;
        inc(&counters.webhook_retries);
    }
}

/// The `JOB_COMPLETED` body, serialised compactly (keys in this order): `connection_id` is the
/// connection minted with the job's `access_token` if the emulator minted it, else a stable UUID
/// derived from the token; both are `null` for a job created without an `access_token`.
fn job_completed_body(shared: &Shared, event: &JobCompleted) -> Vec<u8> {
    let (connection_id, access_token) = match &event.access_token {
        Some(token) => {
            let minted = lock(&shared.entities).connection_id_for(token);
            let id = minted.unwrap_or_else(|| stable_uuid(&["connection", token]));
            (Value::String(id), Value::String(token.clone()))
        }
        None => (Value::Null, Value::Null),
    };
    let body = json!({
        "type": "JOB",
        "code": "JOB_COMPLETED",
        "connection_id": connection_id,
        "access_token": access_token,
        "job": event.job,
    });
    serde_json::to_vec(&body).unwrap_or_default()
}

/// Signs and POSTs `body` once (no retries): the receiver's status. Counts the attempt, and a 2xx
/// answer as delivered.
pub(crate) async fn send_once(shared: &Shared, body: &Value) -> Result<StatusCode, String> {
    let Some(sender) = shared.webhooks.as_ref() else {
        return Err("no webhook URL is configured (--webhook-url)".into());
    };
    let bytes = serde_json::to_vec(body).map_err(|e| format!("cannot serialise the body: {e}"))?;
    let signature = HeaderValue::from_str(&sign(&sender.key, &bytes))
        .map_err(|_| "the signature is not a header value".to_string())?;
    let status = sender
        .post(
            &shared.counters.webhooks_sent,
            Bytes::from(bytes),
            signature,
        )
        .await?;
    if status.is_success() {
        inc(&shared.counters.webhooks_delivered);
    }
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_base64_hmac_sha256_with_prefix() {
        // RFC 4231 test case 2.
        let expected = "sha256=W9zBRr9gdU5qBCQmCJV1x1oAPwidJzmDnexYuWTsOEM=";
        assert_eq!(sign(b"Jefe", b"what do ya want for nothing?"), expected);
        assert_ne!(
            wrong_signature(b"Jefe", b"what do ya want for nothing?"),
            expected
        );
        assert!(wrong_signature(b"", b"").starts_with("sha256="));
    }
}
