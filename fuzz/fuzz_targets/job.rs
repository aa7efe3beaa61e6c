//! Fuzz target `job`: the AsynchronousJob object as polls and webhooks deliver it (DESIGN §5).
//!
//! Input: the bytes of a `GET /jobs/:id` answer body.
//!
//! Invariants checked:
//! - parsing into `JobObject` (from bytes, as polls do, and through `serde_json::Value`, as the
//!   webhook envelope does) never panics;
//! - `is_terminal` and `terminal_outcome` never panic; `success`, `failure` and `partial_success`
//!   are terminal, `prequeued` and `pending` are not;
//! - an `Ok` outcome has the job's id and status, an `http_status` in 200..=599, and a body that is
//!   valid JSON and is exactly the bytes of `response.body` in the input (or `null` when absent);
//!   an `Err` is `JOB_RESULT_INVALID` and renders a 502 without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rutter_sidecar::jobs::{is_terminal, terminal_outcome, JobObject};

fn check(job: &JobObject) {
    let terminal = is_terminal(job);
    match job.status.as_str() {
        "success" | "failure" | "partial_success" => assert!(terminal),
        "prequeued" | "pending" => assert!(!terminal),
        _ => assert_eq!(terminal, job.response.is_some()),
    }
    match terminal_outcome(job) {
        Ok(result) => {
            let status = result.http_status.as_u16();
            assert!((200..=599).contains(&status), "http_status {status}");
            assert_eq!(result.job_id, job.id);
            assert_eq!(result.status, job.status);
            serde_json::from_slice::<serde::de::IgnoredAny>(&result.body)
                .expect("the job result body is not valid JSON");
        }
        Err(error) => {
            assert_eq!(error.code(), "JOB_RESULT_INVALID");
            let response = error.to_response();
            assert_eq!(response.status().as_u16(), 502);
        }
    }
}

/// `response.body` as raw bytes, read independently of `JobObject`.
#[derive(serde::Deserialize)]
struct RawJob<'a> {
    #[serde(borrow)]
    response: Option<RawResponse<'a>>,
}

#[derive(serde::Deserialize)]
struct RawResponse<'a> {
    #[serde(borrow)]
    body: Option<&'a serde_json::value::RawValue>,
}

fuzz_target!(|data: &[u8]| {
    let Ok(job) = serde_json::from_slice::<JobObject>(data) else {
        return;
    };
    check(&job);
    // The answer carries Rutter's exact bytes, never a re-serialisation.
    if let (Ok(result), Ok(text)) = (terminal_outcome(&job), std::str::from_utf8(data)) {
        if let Ok(raw) = serde_json::from_str::<RawJob>(text) {
            let expected = raw
                .response
                .and_then(|r| r.body)
                .map_or("null", |b| b.get());
            assert_eq!(&result.body[..], expected.as_bytes());
        }
    }
});
