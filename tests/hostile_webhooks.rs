//! Hostile webhooks on the internet-facing webhook listener (DESIGN §7): unsigned, wrongly signed,
//! signed over re-serialised JSON, non-ASCII and invalid UTF-8 signature values, huge bodies
//! (declared, and chunked without a length), pathological JSON, replays after the result was
//! delivered, valid webhooks for jobs nobody created (20 000 of them against a small
//! `jobs.max_tracked`), non-terminal statuses, and terminal ones whose `response` is bogus.
//!
//! Whatever arrives, the waiting app gets the real result or a clear sidecar error, never a forged
//! one and never a broken response, and the job registry stays bounded.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use base64::Engine as _;
use common::*;
use http::{Method, StatusCode};
use rutter_sidecar::config::{Config, Credentials};
use rutter_sidecar::webhooks::sign;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout, Instant};

const SECRET: &str = "hostile-webhooks-secret";
const PATH: &str = "/webhooks/rutter";

fn invoices() -> String {
    format!("/versioned/accounting/invoices?access_token={TOKEN}")
}

/// The fixture invoice with `marker` as its memo, to find its job again.
fn marked_invoice(marker: &str) -> String {
    json!({"invoice": {"customer_id": "8b3e6c0e-2f4a-4a4e-9a43-5d0c7b1f9e21", "memo": marker,
                       "line_items": []}})
    .to_string()
}

fn credentials() -> Credentials {
    Credentials {
        client_id: None,
        client_secret: Some(SECRET.into()),
    }
}

/// Polls come quickly (so the test learns the job id) but never end a job: the jobs in these tests
/// never finish at Rutter, so only webhooks can end a wait.
fn config(rutter: SocketAddr) -> Config {
    let mut config = config_for(rutter);
    config.facade.poll_initial = Duration::from_millis(50);
    config.facade.poll_max = Duration::from_millis(200);
    config.facade.poll_max_with_webhooks = Duration::from_millis(400);
    config
}

async fn start() -> (EmulatorHandle, SidecarHandle) {
    let rutter = start_emulator(emulator_options(100)).await;
    let sidecar = start_sidecar_with(config(rutter.addr), credentials()).await;
    (rutter, sidecar)
}

/// A JOB_COMPLETED webhook body (compact JSON) for `job`.
fn job_webhook(job: Value) -> String {
    json!({
        "type": "JOB",
        "code": "JOB_COMPLETED",
        "connection_id": "a7d3c1e0-5b2f-4e9a-8c6d-1f0e2d3c4b5a",
        "access_token": TOKEN,
        "job": job,
    })
    .to_string()
}

fn finished(id: &str, status: &str, http_status: u16, body: Value) -> Value {
    json!({"id": id, "status": status, "request": {"method": "POST", "url": "x", "body": {}},
           "response": {"http_status": http_status, "body": body}})
}

async fn post_webhook(addr: SocketAddr, body: &str, signature: Option<&str>) -> Reply {
    let mut headers = Vec::new();
    if let Some(signature) = signature {
        headers.push(("x-rutter-signature", signature));
    }
    timeout(
        Duration::from_secs(5),
        send(&client(), addr, Method::POST, PATH, &headers, body),
    )
    .await
    .expect("the webhook listener answered")
}

async fn post_signed(addr: SocketAddr, body: &str) -> Reply {
    post_webhook(addr, body, Some(&sign(SECRET.as_bytes(), body.as_bytes()))).await
}

/// Starts an app's facade write that waits on a job that never ends at Rutter; returns the task
/// and the job id (learnt from the sidecar's polls).
async fn waiting_app(
    rutter: &EmulatorHandle,
    sidecar: &SidecarHandle,
    marker: &str,
    extra: &[(&'static str, String)],
) -> (JoinHandle<Reply>, String) {
    let addr = sidecar.addr;
    let body = marked_invoice(marker);
    let extra = extra.to_vec();
    let app = tokio::spawn(async move {
        let mut headers: Vec<(&str, &str)> = vec![("x-emulator-never-finish", "1")];
        headers.extend(extra.iter().map(|(n, v)| (*n, v.as_str())));
        send(&client(), addr, Method::POST, &invoices(), &headers, &body).await
    });
    (app, job_id_for(rutter, marker).await)
}

/// The id of the job whose invoice memo is `marker`, once the sidecar has polled it.
async fn job_id_for(rutter: &EmulatorHandle, marker: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        for path in seen_paths(&rutter.emulator, "/versioned/jobs/") {
            let id = path.trim_start_matches("/versioned/jobs/");
            let job = rutter.emulator.job(id);
            if job.is_some_and(|j| j["request"]["body"]["invoice"]["memo"] == marker) {
                return id.to_string();
            }
        }
        sleep(Duration::from_millis(20)).await;
    }
    panic!("no poll of the job marked {marker:?}");
}

/// The app is still waiting a moment from now.
async fn assert_still_waiting(app: &JoinHandle<Reply>) {
    sleep(Duration::from_millis(250)).await;
    assert!(!app.is_finished(), "the wait ended: {app:?}");
}

async fn answer_of(app: JoinHandle<Reply>) -> Reply {
    timeout(Duration::from_secs(3), app)
        .await
        .expect("the app was answered")
        .expect("the app task")
}

fn assert_sidecar_error(reply: &Reply, status: StatusCode, code: &str) {
    assert_eq!(
        reply.status,
        status,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(reply.header("x-sidecar-error"), Some(code));
    assert_eq!(reply.json()["error_code"], code);
}

#[tokio::test]
async fn forged_webhooks_are_refused_and_never_answer_the_app() {
    let (rutter, sidecar) = start().await;
    let (app, job) = waiting_app(&rutter, &sidecar, "forged", &[]).await;
    let forged = job_webhook(finished(&job, "success", 200, json!({"forged": true})));
    let pretty =
        serde_json::to_string_pretty(&serde_json::from_str::<Value>(&forged).unwrap()).unwrap();
    let raw_mac = base64::engine::general_purpose::STANDARD
        .decode(sign(SECRET.as_bytes(), forged.as_bytes()).trim_start_matches("sha256="))
        .unwrap();
    let hex_signature = format!(
        "sha256={}",
        raw_mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    let other_key = sign(b"another-secret", forged.as_bytes());
    let over_pretty = sign(SECRET.as_bytes(), pretty.as_bytes());
    let over_other_body = sign(SECRET.as_bytes(), b"{}");
    let no_prefix = sign(SECRET.as_bytes(), forged.as_bytes())
        .trim_start_matches("sha256=")
        .to_string();
    let sha1 = sign(SECRET.as_bytes(), forged.as_bytes()).replace("sha256=", "sha1=");
    let truncated = sign(SECRET.as_bytes(), forged.as_bytes())[..30].to_string();
    let cases: Vec<(&str, Option<&str>)> = vec![
        ("unsigned", None),
        ("empty", Some("")),
        ("prefix only", Some("sha256=")),
        ("another key", Some(&other_key)),
        ("over the pretty-printed JSON", Some(&over_pretty)),
        ("over another body", Some(&over_other_body)),
        ("hex instead of base64", Some(&hex_signature)),
        ("no prefix", Some(&no_prefix)),
        ("sha1", Some(&sha1)),
        ("truncated", Some(&truncated)),
    ];
    for (name, signature) in &cases {
        let reply = post_webhook(sidecar.webhook_addr, &forged, *signature).await;
        assert_sidecar_error(
            &reply,
            StatusCode::UNAUTHORIZED,
            "WEBHOOK_SIGNATURE_INVALID",
        );
        assert!(!app.is_finished(), "{name}: the app was answered");
    }
    let stats = sidecar.sidecar.webhooks.stats();
    assert_eq!(stats.unauthorized.load(Relaxed), cases.len() as u64);
    assert_eq!(stats.jobs_completed.load(Relaxed), 0);
    assert_still_waiting(&app).await;

    let genuine = job_webhook(finished(&job, "success", 201, json!({"genuine": true})));
    assert_eq!(
        post_signed(sidecar.webhook_addr, &genuine).await.status,
        StatusCode::OK
    );
    let reply = answer_of(app).await;
    assert_eq!(reply.status, StatusCode::CREATED);
    assert_eq!(reply.json(), json!({"genuine": true}));
    assert_eq!(reply.header("x-rutter-job-id"), Some(job.as_str()));
    assert_eq!(rutter.emulator.counters().writes_accepted, 1);
}

/// Reads one answer's status line off a raw connection.
async fn raw_status(addr: SocketAddr, request: &[u8]) -> Option<u16> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let _ = stream.write_all(request).await;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.len() < 12 {
        match timeout(Duration::from_secs(3), stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    std::str::from_utf8(got.get(9..12)?).ok()?.parse().ok()
}

#[tokio::test]
async fn non_ascii_and_invalid_utf8_signature_values_are_refused() {
    let (rutter, sidecar) = start().await;
    let (app, job) = waiting_app(&rutter, &sidecar, "non-ascii", &[]).await;
    let forged = job_webhook(finished(&job, "success", 200, json!({"forged": true})));
    let good = sign(SECRET.as_bytes(), forged.as_bytes());
    let values: Vec<Vec<u8>> = vec![
        b"sha256=\xff\xfe\xfd".to_vec(),
        "sha256=\u{e9}t\u{e9}".as_bytes().to_vec(),
        [good.as_bytes(), b"\x80"].concat(),
        [b"\xc3".as_slice(), good.as_bytes()].concat(),
        good.replace('=', "\u{ff1d}").into_bytes(),
    ];
    for value in values {
        let mut request = format!(
            "POST {PATH} HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nX-Rutter-Signature: ",
            forged.len()
        )
        .into_bytes();
        request.extend_from_slice(&value);
        request.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
        request.extend_from_slice(forged.as_bytes());
        let status = raw_status(sidecar.webhook_addr, &request).await;
        assert!(
            matches!(status, Some(400 | 401)),
            "{:?}: {status:?}",
            String::from_utf8_lossy(&value)
        );
    }
    assert_still_waiting(&app).await;
    let genuine = job_webhook(finished(&job, "success", 200, json!({"genuine": true})));
    post_signed(sidecar.webhook_addr, &genuine).await;
    assert_eq!(answer_of(app).await.json(), json!({"genuine": true}));
}

#[tokio::test]
async fn huge_webhook_bodies_are_refused_declared_or_chunked() {
    let (_rutter, sidecar) = start().await;
    let addr = sidecar.webhook_addr;
    // Declared: refused from the head alone, before any body byte.
    let declared = format!(
        "POST {PATH} HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\n\
         X-Rutter-Signature: sha256=AAAA\r\nContent-Length: {}\r\n\r\n",
        64 * 1024 * 1024
    );
    assert_eq!(raw_status(addr, declared.as_bytes()).await, Some(413));

    // Signed and just over 1 MiB: refused all the same.
    let huge = format!(
        r#"{{"type":"CONNECTION","pad":"{}"}}"#,
        "x".repeat(1024 * 1024)
    );
    let reply = post_signed(addr, &huge).await;
    assert_sidecar_error(&reply, StatusCode::PAYLOAD_TOO_LARGE, "BODY_TOO_LARGE");

    // Chunked without a length, and endless: cut at the limit, not read to the end.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {PATH} HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\n\
         X-Rutter-Signature: sha256=AAAA\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let chunk = format!("10000\r\n{}\r\n", "y".repeat(0x10000));
    let started = Instant::now();
    let mut sent = 0usize;
    let (mut reader, mut writer) = stream.into_split();
    let writing = tokio::spawn(async move {
        // At most 64 MiB, which the sidecar must never wait for.
        while sent < 64 * 1024 * 1024 {
            if writer.write_all(chunk.as_bytes()).await.is_err() {
                break;
            }
            sent += 0x10000;
        }
        sent
    });
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        match timeout(Duration::from_secs(4), reader.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => answer.extend_from_slice(&buf[..n]),
            other => panic!("no answer to an endless chunked webhook: {other:?}"),
        }
    }
    assert!(
        answer.starts_with(b"HTTP/1.1 413"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    drop(reader);
    let sent = timeout(Duration::from_secs(4), writing)
        .await
        .expect("the sidecar stopped reading")
        .unwrap();
    assert!(sent < 64 * 1024 * 1024, "the sidecar read all {sent} bytes");
    assert!(started.elapsed() < Duration::from_secs(4));

    // Still up.
    let ok = post_signed(addr, r#"{"type":"CONNECTION","code":"HEALTHY"}"#).await;
    assert_eq!(ok.status, StatusCode::OK);
}

/// Signed but pathological JSON: deep nesting, duplicate keys, odd types, hostile job ids. The
/// receiver answers each (200 or 400), never crashes, and the registry stays bounded.
#[tokio::test]
async fn pathological_signed_json_is_answered_and_survived() {
    let (_rutter, sidecar) = start().await;
    let addr = sidecar.webhook_addr;
    let deep_array = format!("{}{}", "[".repeat(200_000), "]".repeat(200_000));
    let deep_job = format!(
        r#"{{"type":"JOB","code":"JOB_COMPLETED","job":{}1{}}}"#,
        "{\"a\":".repeat(50_000),
        "}".repeat(50_000)
    );
    let long_id = "j".repeat(100_000);
    let bodies = vec![
        deep_array,
        deep_job,
        r#"{"type":"JOB","type":"CONNECTION","code":"JOB_COMPLETED","job":{"id":"d","status":"success","response":{"http_status":200,"body":1}}}"#.to_string(),
        r#"{"type":7,"code":[],"job":"x"}"#.to_string(),
        r#"{"type":"JOB","code":"JOB_COMPLETED","job":{"id":5,"status":"success"}}"#.to_string(),
        r#"{"type":"JOB","code":"JOB_COMPLETED","job":null}"#.to_string(),
        job_webhook(finished("../../admin\r\nX-Injected: 1", "success", 200, json!(1))),
        job_webhook(finished(&long_id, "success", 200, json!(1))),
        job_webhook(json!({"id": "nan", "status": "success",
                           "response": {"http_status": 1e308, "body": 1}})),
        "\u{feff}{\"type\":\"CONNECTION\"}".to_string(),
        "{\"type\":\"CONNECTION\",\"s\":\"\\ud800\"}".to_string(),
    ];
    for body in &bodies {
        let reply = post_signed(addr, body).await;
        assert!(
            matches!(reply.status.as_u16(), 200 | 400),
            "{}: {:?}",
            &body[..body.len().min(60)],
            reply.status
        );
    }
    assert!(sidecar.sidecar.proxy.jobs().tracked() <= 10);
    let ok = post_signed(addr, r#"{"type":"CONNECTION","code":"HEALTHY"}"#).await;
    assert_eq!(ok.status, StatusCode::OK);
}

/// DESIGN §7: duplicates are acknowledged and ignored; a later different completion of a job whose
/// result was delivered changes nothing, and a retry with the same key still gets the delivered
/// result.
#[tokio::test]
async fn replayed_and_late_webhooks_after_the_result_change_nothing() {
    let rutter = start_emulator(emulator_options(100)).await;
    let mut config = config(rutter.addr);
    config.jobs.keep_completed = Duration::from_millis(200);
    let sidecar = start_sidecar_with(config, credentials()).await;
    let key = ("idempotency-key", "replay-key-1".to_string());
    let (app, job) = waiting_app(&rutter, &sidecar, "replay", std::slice::from_ref(&key)).await;
    let first = job_webhook(finished(&job, "success", 201, json!({"v": 1})));
    assert_eq!(
        post_signed(sidecar.webhook_addr, &first).await.status,
        StatusCode::OK
    );
    let reply = answer_of(app).await;
    assert_eq!(
        (reply.status, reply.json()),
        (StatusCode::CREATED, json!({"v": 1}))
    );

    let stats = sidecar.sidecar.webhooks.stats();
    for round in 0..2 {
        // The exact replay, then a different (later) completion of the same job.
        assert_eq!(
            post_signed(sidecar.webhook_addr, &first).await.status,
            StatusCode::OK
        );
        let late = job_webhook(finished(&job, "failure", 400, json!({"late": round})));
        assert_eq!(
            post_signed(sidecar.webhook_addr, &late).await.status,
            StatusCode::OK
        );
        let retry = send(
            &client(),
            sidecar.addr,
            Method::POST,
            &invoices(),
            &[
                ("idempotency-key", "replay-key-1"),
                ("x-emulator-never-finish", "1"),
            ],
            &marked_invoice("replay"),
        )
        .await;
        assert_eq!(retry.status, StatusCode::CREATED, "round {round}");
        assert_eq!(retry.json(), json!({"v": 1}));
        assert_eq!(retry.header("idempotent-replayed"), Some("true"));
        // Past keep_completed the job's tracker is gone: the next round's webhooks meet no tracker.
        sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(stats.duplicates.load(Relaxed), 2, "the exact replays");
    // Round 0's late completion met the delivered result and was ignored; round 1's met no tracker
    // and is only held for `jobs.keep_completed`.
    assert_eq!(stats.jobs_already_done.load(Relaxed), 1);
    assert_eq!(stats.jobs_completed.load(Relaxed), 2);
    assert_eq!(rutter.emulator.counters().writes_accepted, 1);
}

/// DESIGN §7, §10: valid webhooks for jobs the app never created are acknowledged and held for a
/// short time, within `jobs.max_tracked`; 20 000 of them neither grow the registry beyond it nor
/// keep a real wait from being answered.
#[tokio::test]
async fn twenty_thousand_webhooks_for_unknown_jobs_keep_the_registry_bounded() {
    let rutter = start_emulator(emulator_options(100)).await;
    let mut config = config(rutter.addr);
    config.jobs.max_tracked = 16;
    config.jobs.keep_completed = Duration::from_secs(60);
    let sidecar = start_sidecar_with(config, credentials()).await;
    let addr = sidecar.webhook_addr;
    let started = Instant::now();
    let total = 20_000usize;
    let connections = 4usize;
    // Raw HTTP/1.1 pipelining: each connection carries its share back to back.
    let tasks: Vec<_> = (0..connections)
        .map(|c| {
            let mut requests = Vec::new();
            let mut count = 0usize;
            for i in (c..total).step_by(connections) {
                // Built by hand: 20 000 `json!` trees cost more than the sidecar's own work.
                let body = format!(
                    r#"{{"type":"JOB","code":"JOB_COMPLETED","job":{{"id":"unknown-{i:05}","status":"success","response":{{"http_status":200,"body":{{"i":{i}}}}}}}}}"#
                );
                let signature = sign(SECRET.as_bytes(), body.as_bytes());
                requests.extend_from_slice(
                    format!(
                        "POST {PATH} HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\n\
                         X-Rutter-Signature: {signature}\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                );
                count += 1;
            }
            tokio::spawn(async move {
                let stream = TcpStream::connect(addr).await.unwrap();
                let (mut reader, mut writer) = stream.into_split();
                // The write half stays open until every answer is in.
                let writing =
                    tokio::spawn(async move { writer.write_all(&requests).await.map(|()| writer) });
                let mut answers = Vec::new();
                let mut buf = vec![0u8; 64 * 1024];
                let mut ok = 0usize;
                let mut seen_answers = 0usize;
                while seen_answers < count {
                    let n = reader.read(&mut buf).await.unwrap();
                    assert!(n > 0, "closed after {seen_answers} answers");
                    answers.extend_from_slice(&buf[..n]);
                    // Every answer is a small fixed-length one: count and drop whole ones.
                    while let Some(end) = answers.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&answers[..end]).to_ascii_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        if answers.len() < end + 4 + len {
                            break;
                        }
                        if head.starts_with("http/1.1 200") {
                            ok += 1;
                        }
                        seen_answers += 1;
                        answers.drain(..end + 4 + len);
                    }
                }
                drop(writing.await.unwrap().unwrap());
                count - ok
            })
        })
        .collect();
    let mut refused = 0;
    for task in tasks {
        refused += timeout(Duration::from_secs(30), task)
            .await
            .unwrap()
            .unwrap();
    }
    let elapsed = started.elapsed();
    assert_eq!(refused, 0, "valid webhooks are acknowledged");
    let jobs = sidecar.sidecar.proxy.jobs();
    assert!(jobs.tracked() <= 16, "{} tracked", jobs.tracked());
    let stats = sidecar.sidecar.webhooks.stats();
    assert_eq!(stats.verified.load(Relaxed), total as u64);
    // A real write still gets its answer, by polling, with the registry full of strangers.
    let reply = send(
        &client(),
        sidecar.addr,
        Method::POST,
        &invoices(),
        &[],
        INVOICE,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(reply.json()["invoice"]["document_number"], "INV-10042");
    assert!(jobs.tracked() <= 16);
    eprintln!("{total} webhooks in {elapsed:?}");
}

/// DESIGN §7: a completion for a job nobody waits on is kept only for a short time
/// (`jobs.keep_completed`), then forgotten; it changes nothing for other jobs.
#[tokio::test]
async fn a_webhook_for_a_job_nobody_created_is_held_briefly_then_forgotten() {
    let rutter = start_emulator(emulator_options(100)).await;
    let mut config = config(rutter.addr);
    config.jobs.keep_completed = Duration::from_millis(300);
    let sidecar = start_sidecar_with(config, credentials()).await;
    let jobs = sidecar.sidecar.proxy.jobs();
    let stranger = job_webhook(finished("nobody-made-me", "success", 200, json!({"x": 1})));
    assert_eq!(
        post_signed(sidecar.webhook_addr, &stranger).await.status,
        StatusCode::OK
    );
    assert_eq!(jobs.tracked(), 1, "held");
    // A real wait on another job is not affected.
    let (app, job) = waiting_app(&rutter, &sidecar, "bystander", &[]).await;
    assert_still_waiting(&app).await;
    let done = job_webhook(finished(&job, "success", 200, json!({"mine": true})));
    post_signed(sidecar.webhook_addr, &done).await;
    assert_eq!(answer_of(app).await.json(), json!({"mine": true}));
    sleep(Duration::from_millis(400)).await;
    assert_eq!(jobs.tracked(), 0, "forgotten after jobs.keep_completed");
}

/// DESIGN §5: `prequeued` and `pending` are not terminal; a JOB_COMPLETED webhook saying so (or an
/// unknown status without a response) does not end the wait; the real completion still does.
#[tokio::test]
async fn a_non_terminal_job_webhook_does_not_end_the_wait() {
    let (rutter, sidecar) = start().await;
    let (app, job) = waiting_app(&rutter, &sidecar, "non-terminal", &[]).await;
    for status in ["prequeued", "pending", "running", ""] {
        let body = job_webhook(json!({"id": job, "status": status}));
        let reply = post_signed(sidecar.webhook_addr, &body).await;
        assert!(
            matches!(reply.status.as_u16(), 200 | 400),
            "{status}: {}",
            reply.status
        );
    }
    // Pending with a response attached: still pending.
    let body = job_webhook(finished(&job, "pending", 200, json!({"early": true})));
    assert_eq!(
        post_signed(sidecar.webhook_addr, &body).await.status,
        StatusCode::OK
    );
    assert_still_waiting(&app).await;
    let done = job_webhook(finished(&job, "success", 200, json!({"done": true})));
    post_signed(sidecar.webhook_addr, &done).await;
    assert_eq!(answer_of(app).await.json(), json!({"done": true}));
}

/// DESIGN §5: a terminal job without a usable `response` is a 502 JOB_RESULT_INVALID — never a
/// broken response (a 1xx status would break HTTP framing towards the app).
#[tokio::test]
async fn a_terminal_webhook_with_a_bogus_response_is_a_502_job_result_invalid() {
    let (rutter, sidecar) = start().await;
    let responses: Vec<(&str, Option<Value>)> = vec![
        ("101", Some(json!({"http_status": 101, "body": {"x": 1}}))),
        ("100", Some(json!({"http_status": 100, "body": {"x": 1}}))),
        ("99", Some(json!({"http_status": 99, "body": {}}))),
        ("600", Some(json!({"http_status": 600, "body": {}}))),
        ("0", Some(json!({"http_status": 0, "body": {}}))),
        ("-200", Some(json!({"http_status": -200, "body": {}}))),
        ("65736", Some(json!({"http_status": 65736, "body": {}}))),
        ("200.5", Some(json!({"http_status": 200.5, "body": {}}))),
        ("string", Some(json!({"http_status": "200", "body": {}}))),
        (
            "null status",
            Some(json!({"http_status": null, "body": {}})),
        ),
        ("no status", Some(json!({"body": {"x": 1}}))),
        ("response null", Some(Value::Null)),
        ("response string", Some(json!("ok"))),
        ("no response", None),
    ];
    let mut apps = Vec::new();
    for (name, _) in &responses {
        let marker = format!("bogus-{name}");
        let addr = sidecar.addr;
        let body = marked_invoice(&marker);
        apps.push(tokio::spawn(async move {
            send(
                &client(),
                addr,
                Method::POST,
                &invoices(),
                &[("x-emulator-never-finish", "1")],
                &body,
            )
            .await
        }));
    }
    for ((name, response), app) in responses.into_iter().zip(apps) {
        let job = job_id_for(&rutter, &format!("bogus-{name}")).await;
        let mut object = json!({"id": job, "status": "success"});
        if let Some(response) = response {
            object["response"] = response;
        }
        let reply = post_signed(sidecar.webhook_addr, &job_webhook(object)).await;
        assert!(
            matches!(reply.status.as_u16(), 200 | 400),
            "{name}: {}",
            reply.status
        );
        if reply.status == StatusCode::BAD_REQUEST {
            // Refused as malformed: the wait goes on; end it with a valid completion of nothing
            // usable, which must give the same answer.
            let object = json!({"id": job, "status": "success"});
            post_signed(sidecar.webhook_addr, &job_webhook(object)).await;
        }
        let answer = answer_of(app).await;
        assert_sidecar_error(&answer, StatusCode::BAD_GATEWAY, "JOB_RESULT_INVALID");
        assert_eq!(
            answer.header("x-rutter-job-id"),
            Some(job.as_str()),
            "{name}"
        );
    }
}
