//! Webhook fan-in and forwarding (DESIGN §7): signed JOB_COMPLETED webhooks answer waiting requests at
//! once; everything verified is forwarded to the app's own webhook URL.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{HeaderMap, Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rutter_sidecar::config::{Config, Credentials};
use rutter_sidecar::emulator::Emulator;
use rutter_sidecar::webhooks::sign;

const SECRET: &str = "test-client-secret";

fn credentials() -> Credentials {
    Credentials {
        client_id: None,
        client_secret: Some(SECRET.to_string()),
    }
}

fn invoices() -> String {
    format!("/versioned/accounting/invoices?access_token={TOKEN}")
}

/// A configuration whose first poll would come only after 30 s: anything faster is the webhook.
fn slow_polling(upstream: SocketAddr) -> Config {
    let mut config = config_for(upstream);
    config.facade.poll_initial = Duration::from_secs(30);
    config.facade.poll_max = Duration::from_secs(30);
    config.facade.poll_max_with_webhooks = Duration::from_secs(60);
    config
}

fn job_webhook(job: &serde_json::Value) -> String {
    serde_json::json!({
        "type": "JOB",
        "code": "JOB_COMPLETED",
        "connection_id": "a7d3c1e0-5b2f-4e9a-8c6d-1f0e2d3c4b5a",
        "access_token": TOKEN,
        "job": job,
    })
    .to_string()
}

async fn post_webhook(addr: SocketAddr, body: &str, signature: Option<&str>) -> Reply {
    let mut headers = vec![];
    if let Some(signature) = signature {
        headers.push(("x-rutter-signature", signature));
    }
    send(
        &client(),
        addr,
        Method::POST,
        "/webhooks/rutter",
        &headers,
        body,
    )
    .await
}

async fn post_signed(addr: SocketAddr, body: &str) -> Reply {
    post_webhook(addr, body, Some(&sign(SECRET.as_bytes(), body.as_bytes()))).await
}

/// Plays Rutter's webhook sender: every job the emulator finishes is posted, signed, to `addr`.
fn relay_webhooks(emulator: &Emulator, addr: SocketAddr) -> tokio::task::JoinHandle<()> {
    let mut completions = emulator.completions();
    tokio::spawn(async move {
        while let Ok(done) = completions.recv().await {
            tokio::spawn(async move {
                let reply = post_signed(addr, &job_webhook(&done.job)).await;
                assert_eq!(reply.status, StatusCode::OK);
            });
        }
    })
}

#[tokio::test]
async fn a_webhook_answers_the_app_long_before_the_first_poll() {
    let rutter = start_emulator(emulator_options(200)).await;
    let sidecar = start_sidecar_with(slow_polling(rutter.addr), credentials()).await;
    let relay = relay_webhooks(&rutter.emulator, sidecar.webhook_addr);
    let reply = send(
        &client(),
        sidecar.addr,
        Method::POST,
        &invoices(),
        &[],
        INVOICE,
    )
    .await;
    relay.abort();
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["invoice"]["document_number"], "INV-10042");
    assert!(
        reply.elapsed < Duration::from_secs(10),
        "answered by the webhook, not the 30 s poll"
    );
    assert_eq!(polls(&rutter.emulator), 0, "no poll was needed");
    let stats = sidecar.sidecar.webhooks.stats();
    assert_eq!(stats.jobs_completed.load(Relaxed), 1);
}

#[tokio::test]
async fn five_hundred_waiters_on_five_hundred_jobs_are_all_answered_by_webhooks() {
    let rutter = start_emulator(emulator_options(300)).await;
    let sidecar = start_sidecar_with(slow_polling(rutter.addr), credentials()).await;
    let relay = relay_webhooks(&rutter.emulator, sidecar.webhook_addr);
    let client = client();
    let path = invoices();
    let requests = (0..500).map(|_| send(&client, sidecar.addr, Method::POST, &path, &[], INVOICE));
    let replies = futures_util::future::join_all(requests).await;
    relay.abort();
    let mut job_ids: Vec<_> = replies
        .iter()
        .map(|r| {
            assert_eq!(r.status, StatusCode::OK);
            assert!(r.json()["invoice"]["id"].is_string());
            r.header("x-rutter-job-id").unwrap().to_string()
        })
        .collect();
    job_ids.sort();
    job_ids.dedup();
    assert_eq!(job_ids.len(), 500, "500 distinct jobs");
    assert_eq!(polls(&rutter.emulator), 0);
    assert_eq!(
        sidecar
            .sidecar
            .webhooks
            .stats()
            .jobs_completed
            .load(Relaxed),
        500
    );
}

/// A fake Rutter whose writes all answer with the async_response of job `early-job`, which polls
/// report as pending forever.
async fn fake_rutter_with_fixed_job() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = service_fn(
                    move |request: http::Request<hyper::body::Incoming>| async move {
                        let body = if request.method() == Method::GET {
                            r#"{"id":"early-job","status":"pending"}"#.to_string()
                        } else {
                            format!(
                                r#"{{"async_response":{{"id":"early-job","response_url":"http://{addr}/versioned/jobs/early-job","status":"pending"}}}}"#
                            )
                        };
                        let response = http::Response::builder()
                            .header("content-type", "application/json")
                            .header("x-rutter-job-id", "early-job")
                            .body(Full::new(Bytes::from(body)))
                            .unwrap();
                        Ok::<_, Infallible>(response)
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, server)
}

fn finished_job(id: &str, document_number: &str) -> serde_json::Value {
    serde_json::json!({
        "id": id,
        "status": "success",
        "request": {"method": "POST", "url": "https://production.rutterapi.com/versioned/accounting/invoices", "body": null},
        "response": {"http_status": 200, "body": {"invoice": {"id": "inv-1", "document_number": document_number}}}
    })
}

#[tokio::test]
async fn a_webhook_that_beats_the_async_response_still_answers_the_waiter() {
    let (rutter, server) = fake_rutter_with_fixed_job().await;
    let sidecar = start_sidecar_with(slow_polling(rutter), credentials()).await;
    let webhook = post_signed(
        sidecar.webhook_addr,
        &job_webhook(&finished_job("early-job", "EARLY-1")),
    )
    .await;
    assert_eq!(webhook.status, StatusCode::OK);
    let reply = send(
        &client(),
        sidecar.addr,
        Method::POST,
        &invoices(),
        &[],
        INVOICE,
    )
    .await;
    server.abort();
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["invoice"]["document_number"], "EARLY-1");
    assert_eq!(reply.header("x-rutter-job-id"), Some("early-job"));
    assert!(reply.elapsed < Duration::from_secs(10));
}

#[tokio::test]
async fn duplicates_and_later_versions_of_a_delivered_result_change_nothing() {
    let (rutter, server) = fake_rutter_with_fixed_job().await;
    let sidecar = start_sidecar_with(slow_polling(rutter), credentials()).await;
    let first = job_webhook(&finished_job("early-job", "FIRST"));
    assert_eq!(
        post_signed(sidecar.webhook_addr, &first).await.status,
        StatusCode::OK
    );
    assert_eq!(
        post_signed(sidecar.webhook_addr, &first).await.status,
        StatusCode::OK,
        "duplicates are acknowledged"
    );
    let other = job_webhook(&finished_job("early-job", "SECOND"));
    assert_eq!(
        post_signed(sidecar.webhook_addr, &other).await.status,
        StatusCode::OK
    );
    let reply = send(
        &client(),
        sidecar.addr,
        Method::POST,
        &invoices(),
        &[],
        INVOICE,
    )
    .await;
    server.abort();
    assert_eq!(
        reply.json()["invoice"]["document_number"],
        "FIRST",
        "the first result stands"
    );
    let stats = sidecar.sidecar.webhooks.stats();
    assert_eq!(stats.duplicates.load(Relaxed), 1);
    assert_eq!(stats.jobs_completed.load(Relaxed), 1);
    assert_eq!(stats.jobs_already_done.load(Relaxed), 1);
}

#[tokio::test]
async fn bad_or_missing_signatures_are_refused_and_change_nothing() {
    let (rutter, server) = fake_rutter_with_fixed_job().await;
    let mut config = slow_polling(rutter);
    config.facade.max_wait = Duration::from_millis(800);
    let sidecar = start_sidecar_with(config, credentials()).await;
    let body = job_webhook(&finished_job("early-job", "FORGED"));
    let reserialised =
        serde_json::to_string_pretty(&serde_json::from_str::<serde_json::Value>(&body).unwrap())
            .unwrap();
    for signature in [
        None,
        Some("sha256=AAAA".to_string()),
        Some(sign(b"another-secret", body.as_bytes())),
        Some(sign(SECRET.as_bytes(), reserialised.as_bytes())),
        Some(sign(SECRET.as_bytes(), body.as_bytes()).replace("sha256=", "")),
    ] {
        let reply = post_webhook(sidecar.webhook_addr, &body, signature.as_deref()).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{signature:?}");
        assert_eq!(
            reply.header("x-sidecar-error"),
            Some("WEBHOOK_SIGNATURE_INVALID")
        );
    }
    // The forged result never reaches the app: its wait ends in the async_response.
    let reply = send(
        &client(),
        sidecar.addr,
        Method::POST,
        &invoices(),
        &[],
        INVOICE,
    )
    .await;
    server.abort();
    assert!(
        reply.json()["async_response"].is_object(),
        "{:?}",
        reply.body
    );
    let stats = sidecar.sidecar.webhooks.stats();
    assert_eq!(stats.unauthorized.load(Relaxed), 5);
    assert_eq!(stats.jobs_completed.load(Relaxed), 0);
}

#[tokio::test]
async fn without_a_client_secret_every_webhook_is_refused() {
    let rutter = start_emulator(emulator_options(50)).await;
    let sidecar = start_sidecar(config_for(rutter.addr)).await;
    let body = job_webhook(&finished_job("j1", "X"));
    let reply = post_signed(sidecar.webhook_addr, &body).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn malformed_bodies_wrong_methods_and_huge_bodies_get_clear_errors() {
    let rutter = start_emulator(emulator_options(50)).await;
    let sidecar = start_sidecar_with(config_for(rutter.addr), credentials()).await;
    let addr = sidecar.webhook_addr;
    for body in [
        "not json",
        "[1,2]",
        r#"{"type":"JOB","code":"JOB_COMPLETED","job":{"status":"success"}}"#,
    ] {
        let reply = post_signed(addr, body).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(reply.header("x-sidecar-error"), Some("WEBHOOK_MALFORMED"));
    }
    let get = send(&client(), addr, Method::GET, "/webhooks/rutter", &[], "").await;
    assert_eq!(get.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(get.header("allow"), Some("POST"));
    let other = send(&client(), addr, Method::POST, "/elsewhere", &[], "{}").await;
    assert_eq!(other.status, StatusCode::NOT_FOUND);
    let huge = format!(
        r#"{{"type":"CONNECTION","pad":"{}"}}"#,
        "x".repeat(1024 * 1024)
    );
    let reply = post_signed(addr, &huge).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    // A body just under the limit is fine.
    let fits = format!(
        r#"{{"type":"CONNECTION","pad":"{}"}}"#,
        "x".repeat(1000 * 1000)
    );
    assert_eq!(post_signed(addr, &fits).await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_dropped_webhook_still_ends_in_the_answer_by_polling() {
    let rutter = start_emulator(emulator_options(300)).await;
    let mut config = config_for(rutter.addr);
    config.facade.poll_max_with_webhooks = Duration::from_millis(300);
    let sidecar = start_sidecar_with(config, credentials()).await;
    // Webhooks were arriving (another job), then this job's webhook is lost.
    let other = post_signed(
        sidecar.webhook_addr,
        &job_webhook(&finished_job("other-job", "X")),
    )
    .await;
    assert_eq!(other.status, StatusCode::OK);
    let reply = send(
        &client(),
        sidecar.addr,
        Method::POST,
        &invoices(),
        &[],
        INVOICE,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["invoice"]["document_number"], "INV-10042");
    assert!(polls(&rutter.emulator) >= 1);
}

/// A stand-in for the app's own webhook endpoint: records what it got, fails the first `failures`.
struct AppEndpoint {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<(HeaderMap, Bytes)>>>,
    server: tokio::task::JoinHandle<()>,
}

async fn app_endpoint(failures: usize) -> AppEndpoint {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Arc::new(Mutex::new(Vec::new()));
    let log = received.clone();
    let server = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
                    let log = log.clone();
                    async move {
                        let (parts, body) = request.into_parts();
                        let bytes = body.collect().await.unwrap().to_bytes();
                        let n = {
                            let mut log = log.lock().unwrap();
                            log.push((parts.headers, bytes));
                            log.len()
                        };
                        let status = if n <= failures { 500 } else { 200 };
                        Ok::<_, Infallible>(
                            http::Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::new()))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    AppEndpoint {
        addr,
        received,
        server,
    }
}

async fn wait_for<F: Fn() -> bool>(condition: F) {
    for _ in 0..200 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn webhooks_are_forwarded_with_the_original_bytes_and_signature_and_retried() {
    let rutter = start_emulator(emulator_options(50)).await;
    let app = app_endpoint(2).await;
    let mut config = config_for(rutter.addr);
    config.webhooks.forward_to = Some(format!("http://{}/rutter-hooks", app.addr).parse().unwrap());
    config.webhooks.forward_backoff = Duration::from_millis(50);
    let sidecar = start_sidecar_with(config, credentials()).await;
    // Odd spacing and non-ASCII: the forwarded bytes must be these, not a re-serialisation.
    let body = "{ \"type\":\"CONNECTION\",  \"code\":\"INITIAL_UPDATE\", \"connection_id\":\"c-ü\", \"access_token\":\"t\" }";
    let signature = sign(SECRET.as_bytes(), body.as_bytes());
    let reply = post_webhook(sidecar.webhook_addr, body, Some(&signature)).await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "answered without waiting for the app"
    );
    wait_for(|| app.received.lock().unwrap().len() >= 3).await;
    // The endpoint records a delivery before its answer reaches the sidecar.
    let stats = sidecar.sidecar.webhooks.stats();
    wait_for(|| stats.forwarded.load(Relaxed) >= 1).await;
    app.server.abort();
    let received = app.received.lock().unwrap();
    assert_eq!(received.len(), 3, "two failures, then delivered");
    for (headers, bytes) in received.iter() {
        assert_eq!(&bytes[..], body.as_bytes());
        assert_eq!(headers["x-rutter-signature"], signature.as_str());
    }
    assert_eq!(sidecar.sidecar.webhooks.stats().forwarded.load(Relaxed), 1);
}

#[tokio::test]
async fn connection_webhooks_are_forwarded_not_consumed_and_job_webhooks_only_when_asked() {
    let rutter = start_emulator(emulator_options(50)).await;
    for forward_jobs in [false, true] {
        let app = app_endpoint(0).await;
        let mut config = config_for(rutter.addr);
        config.webhooks.forward_to = Some(format!("http://{}/hooks", app.addr).parse().unwrap());
        config.webhooks.forward_job_webhooks = forward_jobs;
        let sidecar = start_sidecar_with(config, credentials()).await;
        let connection = r#"{"type":"CONNECTION","code":"INITIAL_UPDATE","connection_id":"c1","access_token":"t"}"#;
        assert_eq!(
            post_signed(sidecar.webhook_addr, connection).await.status,
            StatusCode::OK
        );
        let job = job_webhook(&finished_job("some-job", "X"));
        assert_eq!(
            post_signed(sidecar.webhook_addr, &job).await.status,
            StatusCode::OK
        );
        let expected = if forward_jobs { 2 } else { 1 };
        wait_for(|| app.received.lock().unwrap().len() >= expected).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        app.server.abort();
        let received = app.received.lock().unwrap();
        assert_eq!(
            received.len(),
            expected,
            "forward_job_webhooks = {forward_jobs}"
        );
        assert_eq!(&received[0].1[..], connection.as_bytes());
        let stats = sidecar.sidecar.webhooks.stats();
        assert_eq!(
            stats.jobs_completed.load(Relaxed),
            1,
            "only the JOB webhook touches jobs"
        );
    }
}

/// The emulator sending its own signed webhooks to the sidecar, as Rutter would.
async fn emulator_sending_webhooks(
    options: rutter_sidecar::emulator::EmulatorOptions,
    configure: impl FnOnce(&mut Config),
) -> (EmulatorHandle, SidecarHandle) {
    let rutter_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut config = slow_polling(rutter_listener.local_addr().unwrap());
    configure(&mut config);
    let sidecar = start_sidecar_with(config, credentials()).await;
    let options = rutter_sidecar::emulator::EmulatorOptions {
        webhook_url: Some(
            format!("http://{}/webhooks/rutter", sidecar.webhook_addr)
                .parse()
                .unwrap(),
        ),
        client_secret: Some(SECRET.to_string()),
        webhook_retry_ms: 50,
        ..options
    };
    let rutter = start_emulator_on(rutter_listener, options).await;
    (rutter, sidecar)
}

#[tokio::test]
async fn rutters_own_webhooks_answer_the_app_including_early_and_duplicated_ones() {
    let (rutter, sidecar) = emulator_sending_webhooks(emulator_options(200), |_| {}).await;
    let client = client();
    for knob in ["", "early", "duplicate=3", "delay=100"] {
        let headers: Vec<(&str, &str)> = if knob.is_empty() {
            vec![]
        } else {
            vec![("x-emulator-webhook", knob)]
        };
        let reply = send(
            &client,
            sidecar.addr,
            Method::POST,
            &invoices(),
            &headers,
            INVOICE,
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK, "{knob}");
        assert_eq!(
            reply.json()["invoice"]["document_number"],
            "INV-10042",
            "{knob}"
        );
        assert!(
            reply.elapsed < Duration::from_secs(10),
            "{knob}: answered by the webhook"
        );
    }
    assert_eq!(polls(&rutter.emulator), 0);
    wait_for(|| rutter.emulator.counters().webhooks_delivered >= 7).await;
    let stats = sidecar.sidecar.webhooks.stats();
    assert_eq!(stats.jobs_completed.load(Relaxed), 4);
    assert_eq!(
        stats.duplicates.load(Relaxed),
        3,
        "the three extra copies were recognised"
    );
}

#[tokio::test]
async fn a_dropped_or_forged_webhook_from_rutter_is_covered_by_polling() {
    let (rutter, sidecar) = emulator_sending_webhooks(emulator_options(200), |config| {
        config.facade.poll_initial = Duration::from_millis(100);
        config.facade.poll_max = Duration::from_millis(200);
        config.facade.poll_max_with_webhooks = Duration::from_millis(400);
    })
    .await;
    for knob in ["drop", "bad-signature"] {
        let reply = send(
            &client(),
            sidecar.addr,
            Method::POST,
            &invoices(),
            &[("x-emulator-webhook", knob)],
            INVOICE,
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK, "{knob}");
        assert_eq!(reply.json()["invoice"]["document_number"], "INV-10042");
    }
    assert!(polls(&rutter.emulator) >= 2, "polling found both results");
    assert!(sidecar.sidecar.webhooks.stats().unauthorized.load(Relaxed) >= 1);
}
