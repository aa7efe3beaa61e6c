//! Fuzz target `webhook`: signature verification and the webhook receiver (DESIGN §7).
//!
//! Input layout: `secret \n signature-header \n body` (missing parts are empty).
//!
//! Invariants checked:
//! - `verify_signature` never panics, whatever the secret, header and body;
//! - `sign` then `verify_signature` round-trips; the signature fails under another secret or body;
//! - a header that verifies is `sha256=` + exactly the canonical base64 of the HMAC, give or take
//!   surrounding ASCII whitespace (no second spelling of a signature is accepted);
//! - the real receiver (`WebhookReceiver::handle`, with a fixed secret) never panics: with the fuzzed
//!   header it answers 401 unless the header is the right signature; with a correct signature over
//!   the fuzzed body it answers 200 (accepted or duplicate) or 400 (malformed), nothing else. This runs
//!   the envelope and `JobObject` parsing and `JobRegistry::complete` on every signed input.
#![no_main]

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http_body_util::Full;
use libfuzzer_sys::fuzz_target;
use rutter_sidecar::config::{Config, Credentials};
use rutter_sidecar::jobs::{JobRegistry, PollSchedule};
use rutter_sidecar::telemetry::Metrics;
use rutter_sidecar::upstream::Upstream;
use rutter_sidecar::webhooks::{sign, verify_signature, WebhookReceiver, X_RUTTER_SIGNATURE};

const SECRET: &str = "fuzz-client-secret";

struct Harness {
    runtime: tokio::runtime::Runtime,
    receiver: WebhookReceiver,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        // A small tracker bound keeps memory flat however many job ids the fuzzer invents.
        let config = Config::parse(
            "[upstream]\nbase_url = \"http://127.0.0.1:9\"\n[jobs]\nmax_tracked = 64\n",
            &[],
        )
        .expect("fuzz config");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let metrics = Metrics::new();
        let receiver = runtime.block_on(async {
            let upstream = Upstream::new(&config.upstream, Arc::clone(&metrics)).expect("upstream");
            let jobs = JobRegistry::new(
                upstream,
                PollSchedule::from_config(&config.facade),
                config.jobs.clone(),
            );
            let credentials = Credentials {
                client_id: None,
                client_secret: Some(SECRET.into()),
            };
            WebhookReceiver::new(&config.webhooks, &credentials, jobs, metrics)
        });
        Harness { runtime, receiver }
    })
}

fn post(harness: &Harness, signature: Option<http::HeaderValue>, body: &[u8]) -> u16 {
    let mut request = http::Request::builder()
        .method(http::Method::POST)
        .uri("/webhooks/rutter")
        .header(http::header::CONTENT_TYPE, "application/json");
    if let Some(signature) = signature {
        request = request.header(X_RUTTER_SIGNATURE, signature);
    }
    let request = request
        .body(Full::new(Bytes::copy_from_slice(body)))
        .expect("request");
    harness
        .runtime
        .block_on(harness.receiver.handle(request))
        .status()
        .as_u16()
}

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |&b| b == b'\n');
    let secret = parts.next().unwrap_or_default();
    let header = parts.next().unwrap_or_default();
    let body = parts.next().unwrap_or_default();

    let fuzzed_ok = verify_signature(secret, body, header);
    let signature = sign(secret, body);
    assert!(signature.starts_with("sha256="));
    assert!(
        verify_signature(secret, body, signature.as_bytes()),
        "sign/verify round trip"
    );
    if fuzzed_ok {
        let encoded = header
            .strip_prefix(b"sha256=")
            .expect("a verified header starts with sha256=")
            .trim_ascii();
        assert_eq!(
            encoded,
            &signature.as_bytes()[7..],
            "a second spelling of a signature verified"
        );
    }
    let mut other_secret = secret.to_vec();
    other_secret.push(b'x');
    assert!(!verify_signature(&other_secret, body, signature.as_bytes()));
    let mut other_body = body.to_vec();
    other_body.push(b' ');
    assert!(!verify_signature(secret, &other_body, signature.as_bytes()));

    // The receiver, with the fuzzed header (almost always refused) ...
    let harness = harness();
    if let Ok(value) = http::HeaderValue::from_bytes(header) {
        let right = verify_signature(SECRET.as_bytes(), body, header);
        let status = post(harness, Some(value), body);
        if right {
            assert!(
                status == 200 || status == 400,
                "signed webhook answered {status}"
            );
        } else {
            assert_eq!(
                status, 401,
                "a webhook with a wrong signature was not refused"
            );
        }
    }
    // ... and correctly signed, so the body reaches the envelope and job parsing.
    let value = http::HeaderValue::from_str(&sign(SECRET.as_bytes(), body)).expect("header");
    let status = post(harness, Some(value), body);
    assert!(
        status == 200 || status == 400,
        "signed webhook answered {status}"
    );
    assert_eq!(
        post(harness, None, body),
        401,
        "an unsigned webhook was not refused"
    );
});
