//! The built `rutter-sidecar` binary as an operator runs it (DESIGN §8): a child process configured by
//! an (empty) config file and `RUTTER_SIDECAR__*` environment overrides, in front of the emulator
//! (in-process, so what Rutter saw can be checked). What is asserted is what an operator observes:
//! probes and metrics, SIGTERM handling, logs (request ids, no secrets), exit codes.
//!
//! Every child is killed and reaped when its guard drops; every wait is bounded.

mod common;
#[path = "binary/support.rs"]
mod support;

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use common::{emulator_options, start_emulator, start_emulator_on, Reply, INVOICE, TOKEN};
use http::{Method, StatusCode};
use rutter_sidecar::emulator::EmulatorOptions;
use support::{get, http, metric, start_sidecar, try_http, vars, Process, TempFile};
use tokio::net::TcpListener;
use tokio::time::{sleep_until, Instant};

fn invoices(token: &str) -> String {
    format!("/versioned/accounting/invoices?access_token={token}")
}

/// A facade write of the fixture invoice (job-backed: the sidecar waits for the job).
async fn write_invoice(proxy: SocketAddr, headers: &[(&str, &str)]) -> Reply {
    http(proxy, Method::POST, &invoices(TOKEN), headers, INVOICE).await
}

fn base64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// Waits (at most `within`) until `condition` holds.
async fn wait_until(within: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + within;
    while !condition() {
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

/// Every sample line of a `/metrics` body (comments and blank lines skipped) is a `rutter_sidecar_*`
/// series.
fn assert_all_series_prefixed(text: &str) {
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        assert!(
            line.starts_with("rutter_sidecar_"),
            "a series without the rutter_sidecar_ prefix: {line:?}"
        );
    }
}

// ------------------------------------------------------------------------------------------------
// 1. Probes and metrics
// ------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn probes_and_metrics_on_the_admin_listener() {
    let rutter = start_emulator(emulator_options(200)).await;
    let sidecar = start_sidecar(rutter.addr, &[]).await;

    let live = get(sidecar.admin, "/live").await;
    assert_eq!(live.status, StatusCode::OK, "/live");
    let ready = get(sidecar.admin, "/ready").await;
    assert_eq!(ready.status, StatusCode::OK, "/ready");
    let metrics = get(sidecar.admin, "/metrics").await;
    assert_eq!(metrics.status, StatusCode::OK, "/metrics");
    let content_type = metrics.header("content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "/metrics content type: {content_type:?}"
    );
    assert_all_series_prefixed(&String::from_utf8_lossy(&metrics.body));

    // Some traffic: one facade write (a job, polled) and one passthrough list.
    let created = write_invoice(sidecar.proxy, &[]).await;
    assert_eq!(created.status, StatusCode::OK, "{:?}", created.body);
    assert!(
        created.json()["invoice"]["id"].is_string(),
        "{}",
        created.json()
    );
    let listed = get(sidecar.proxy, &invoices(TOKEN)).await;
    assert_eq!(listed.status, StatusCode::OK, "{:?}", listed.body);
    assert!(listed.json()["invoices"]
        .as_array()
        .is_some_and(|a| !a.is_empty()));

    let metrics = get(sidecar.admin, "/metrics").await;
    assert_eq!(metrics.status, StatusCode::OK);
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    assert_all_series_prefixed(&text);
    let facade_ok = metric(
        &text,
        "rutter_sidecar_requests_total",
        &[("class", "facade"), ("status", "200")],
    );
    assert!(
        facade_ok.is_some_and(|n| n >= 1.0),
        "facade 200s: {facade_ok:?}\n{text}"
    );
    let passthrough_ok = metric(
        &text,
        "rutter_sidecar_requests_total",
        &[("class", "passthrough"), ("status", "200")],
    );
    assert!(
        passthrough_ok.is_some_and(|n| n >= 1.0),
        "passthrough 200s: {passthrough_ok:?}\n{text}"
    );
    let polls = metric(
        &text,
        "rutter_sidecar_upstream_calls_total",
        &[("kind", "poll")],
    );
    assert!(
        polls.is_some_and(|n| n >= 1.0),
        "poll calls: {polls:?}\n{text}"
    );
    let writes = metric(
        &text,
        "rutter_sidecar_upstream_calls_total",
        &[("kind", "write")],
    );
    assert!(
        writes.is_some_and(|n| n >= 1.0),
        "write calls: {writes:?}\n{text}"
    );
}

// ------------------------------------------------------------------------------------------------
// 2. SIGTERM while requests wait on jobs (DESIGN §8)
// ------------------------------------------------------------------------------------------------

const DRAIN_DELAY: Duration = Duration::from_secs(1);
const GRACE: Duration = Duration::from_secs(3);

/// A facade write sent in the background; resolves to the reply and the instant it arrived.
fn write_in_background(
    proxy: SocketAddr,
    job_ms: &'static str,
) -> tokio::task::JoinHandle<(Reply, Instant)> {
    tokio::spawn(async move {
        let reply = write_invoice(proxy, &[("x-emulator-job-ms", job_ms)]).await;
        (reply, Instant::now())
    })
}

/// How many invoice writes the emulator has received.
fn invoice_writes(rutter: &rutter_sidecar::emulator::Emulator) -> usize {
    rutter
        .seen()
        .iter()
        .filter(|r| r.method == Method::POST && r.path_and_query.contains("/accounting/invoices"))
        .count()
}

/// Polls `/ready` until it answers 503; returns how long after `since` that was seen.
async fn ready_turns_503(admin: SocketAddr, since: Instant, within: Duration) -> Option<Duration> {
    let end = since + within;
    while Instant::now() < end {
        if get(admin, "/ready").await.status == StatusCode::SERVICE_UNAVAILABLE {
            return Some(since.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_mid_wait_drains_and_loses_no_request() {
    let rutter = start_emulator(emulator_options(200)).await;
    let mut sidecar = start_sidecar(
        rutter.addr,
        &[
            ("RUTTER_SIDECAR__SHUTDOWN__DRAIN_DELAY", "1s"),
            ("RUTTER_SIDECAR__SHUTDOWN__GRACE", "3s"),
        ],
    )
    .await;
    let (proxy, admin, webhooks) = (sidecar.proxy, sidecar.admin, sidecar.webhooks);

    let started = Instant::now();
    let long = write_in_background(proxy, "60000");
    let short = write_in_background(proxy, "1500");
    assert!(
        wait_until(Duration::from_secs(5), || invoice_writes(&rutter.emulator)
            == 2)
        .await,
        "both writes should reach Rutter"
    );
    sleep_until(started + Duration::from_millis(300)).await;

    sidecar.signal("TERM");
    let signalled = Instant::now();

    // `/ready` turns 503 at once; `/live` stays 200.
    let not_ready = ready_turns_503(admin, signalled, Duration::from_millis(500)).await;
    assert!(
        not_ready.is_some_and(|after| after < Duration::from_millis(300)),
        "/ready should answer 503 right after SIGTERM (seen after {not_ready:?})"
    );
    assert_eq!(
        get(admin, "/live").await.status,
        StatusCode::OK,
        "/live while draining"
    );

    // Within the drain delay a new connection is still accepted and served.
    sleep_until(signalled + Duration::from_millis(500)).await;
    let listed = get(proxy, &invoices(TOKEN)).await;
    assert_eq!(
        listed.status,
        StatusCode::OK,
        "a new connection 0.5 s after SIGTERM: {:?}",
        listed.body
    );
    let created = write_invoice(proxy, &[("x-emulator-job-ms", "100")]).await;
    assert_eq!(
        created.status,
        StatusCode::OK,
        "a write 0.5 s after SIGTERM: {:?}",
        created.body
    );
    assert!(
        created.json()["invoice"]["id"].is_string(),
        "{}",
        created.json()
    );

    // After the drain delay new connections are refused ...
    sleep_until(signalled + DRAIN_DELAY + Duration::from_millis(500)).await;
    let connect = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(proxy),
    )
    .await
    .expect("connect attempt should end at once");
    match connect {
        Err(error) => assert_eq!(error.kind(), ErrorKind::ConnectionRefused, "{error}"),
        Ok(_) => {
            panic!("the proxy accepted a new connection 1.5 s after SIGTERM (drain_delay 1 s)")
        }
    }
    // ... while the webhook listener still serves (401: unsigned).
    let hook = http(
        webhooks,
        Method::POST,
        "/webhooks/rutter",
        &[],
        r#"{"type":"JOB"}"#,
    )
    .await;
    assert_eq!(
        hook.status,
        StatusCode::UNAUTHORIZED,
        "webhook during the drain: {:?}",
        hook.body
    );
    assert_eq!(
        get(admin, "/ready").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );

    // The webhook listener serves until the end of the grace.
    sleep_until(signalled + GRACE - Duration::from_millis(300)).await;
    let hook = http(
        webhooks,
        Method::POST,
        "/webhooks/rutter",
        &[],
        r#"{"type":"JOB"}"#,
    )
    .await;
    assert_eq!(
        hook.status,
        StatusCode::UNAUTHORIZED,
        "webhook at the end of the grace"
    );

    // The 1.5 s job's request got its entity.
    let (short, _) = short.await.expect("short request task");
    assert_eq!(short.status, StatusCode::OK, "{:?}", short.body);
    assert!(
        short.json()["invoice"]["id"].is_string(),
        "{}",
        short.json()
    );
    assert!(short.header("x-rutter-job-id").is_some());

    // The 60 s job's request got, at the end of the grace, the async_response with its job id.
    let (long, answered) = long.await.expect("long request task");
    let after = answered - signalled;
    assert_eq!(long.status, StatusCode::OK, "{:?}", long.body);
    let body = long.json();
    let job_id = body["async_response"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("an async_response with an id: {body}"))
        .to_string();
    assert_eq!(long.header("x-rutter-job-id"), Some(job_id.as_str()));
    assert!(
        rutter.emulator.job(&job_id).is_some(),
        "the job id is a real Rutter job"
    );
    assert!(
        after >= GRACE - Duration::from_millis(300) && after <= GRACE + Duration::from_millis(1500),
        "the long request should be answered at the end of the grace (3 s), was {after:?} after SIGTERM"
    );

    let status = sidecar.wait_exit(GRACE + Duration::from_secs(4)).await;
    let exited_after = signalled.elapsed();
    assert!(
        status.is_some_and(|s| s.code() == Some(0)),
        "exit {status:?} ({exited_after:?} after SIGTERM); output:\n{}",
        sidecar.logs.text()
    );
    eprintln!(
        "timings: /ready 503 after {not_ready:?}, long answered {after:?} after SIGTERM, exit {exited_after:?} after SIGTERM"
    );
    assert_eq!(
        invoice_writes(&rutter.emulator),
        3,
        "one write per app request, no retries"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_with_gateway_timeout_answers_504_naming_the_job() {
    let rutter = start_emulator(emulator_options(200)).await;
    let mut sidecar = start_sidecar(
        rutter.addr,
        &[
            ("RUTTER_SIDECAR__SHUTDOWN__DRAIN_DELAY", "1s"),
            ("RUTTER_SIDECAR__SHUTDOWN__GRACE", "3s"),
            ("RUTTER_SIDECAR__FACADE__ON_TIMEOUT", "gateway_timeout"),
        ],
    )
    .await;

    let started = Instant::now();
    let long = write_in_background(sidecar.proxy, "60000");
    assert!(
        wait_until(Duration::from_secs(5), || invoice_writes(&rutter.emulator)
            == 1)
        .await
    );
    sleep_until(started + Duration::from_millis(300)).await;
    sidecar.signal("TERM");
    let signalled = Instant::now();

    let (long, answered) = long.await.expect("long request task");
    let after = answered - signalled;
    assert_eq!(long.status, StatusCode::GATEWAY_TIMEOUT, "{:?}", long.body);
    assert_eq!(long.header("x-sidecar-error"), Some("JOB_WAIT_TIMEOUT"));
    let body = long.json();
    assert_eq!(body["error_type"], "PROXY_ERROR", "{body}");
    assert_eq!(body["error_code"], "JOB_WAIT_TIMEOUT", "{body}");
    let job_id = long
        .header("x-rutter-job-id")
        .unwrap_or_else(|| panic!("X-Rutter-Job-ID on the 504: {:?}", long.headers))
        .to_string();
    assert!(
        rutter.emulator.job(&job_id).is_some(),
        "the job id is a real Rutter job"
    );
    let message = body["error_message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&job_id),
        "the message names the job: {message:?}"
    );
    assert!(
        after >= GRACE - Duration::from_millis(300) && after <= GRACE + Duration::from_millis(1500),
        "answered {after:?} after SIGTERM, expected at the end of the 3 s grace"
    );

    let status = sidecar.wait_exit(GRACE + Duration::from_secs(4)).await;
    assert!(
        status.is_some_and(|s| s.code() == Some(0)),
        "exit {status:?}; output:\n{}",
        sidecar.logs.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigint_when_idle_exits_zero_after_the_drain_delay() {
    let rutter = start_emulator(emulator_options(200)).await;
    let mut sidecar = start_sidecar(
        rutter.addr,
        &[
            ("RUTTER_SIDECAR__SHUTDOWN__DRAIN_DELAY", "300ms"),
            ("RUTTER_SIDECAR__SHUTDOWN__GRACE", "3s"),
        ],
    )
    .await;
    sidecar.signal("INT");
    let signalled = Instant::now();
    let not_ready = ready_turns_503(sidecar.admin, signalled, Duration::from_millis(500)).await;
    assert!(not_ready.is_some(), "/ready should answer 503 after SIGINT");
    let status = sidecar.wait_exit(Duration::from_secs(3)).await;
    let after = signalled.elapsed();
    assert!(
        status.is_some_and(|s| s.code() == Some(0)),
        "exit {status:?}; output:\n{}",
        sidecar.logs.text()
    );
    assert!(
        after >= Duration::from_millis(250),
        "exited {after:?} after SIGINT, before the 300 ms drain delay"
    );
}

/// A facade write whose upstream answer is still outstanding when the grace ends. Rutter created the
/// job at once and answers the write 3.5 s after it arrived (0.2 s after the grace): the app must
/// end up with that job id (DESIGN §8: "so the app holds a job id — nothing lost").
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_while_the_write_is_unanswered_still_hands_over_the_job_id() {
    let rutter = start_emulator(emulator_options(60_000)).await;
    let mut sidecar = start_sidecar(
        rutter.addr,
        &[
            ("RUTTER_SIDECAR__SHUTDOWN__DRAIN_DELAY", "1s"),
            ("RUTTER_SIDECAR__SHUTDOWN__GRACE", "3s"),
        ],
    )
    .await;
    let proxy = sidecar.proxy;
    let started = Instant::now();
    let write = tokio::spawn(async move {
        let reply = write_invoice(proxy, &[("x-emulator-delay-ms", "3500")]).await;
        (reply, Instant::now())
    });
    assert!(
        wait_until(Duration::from_secs(5), || invoice_writes(&rutter.emulator)
            == 1)
        .await
    );
    sleep_until(started + Duration::from_millis(300)).await;
    sidecar.signal("TERM");
    let signalled = Instant::now();

    let (reply, answered) = write.await.expect("write task");
    let after = answered - signalled;
    let job_id = reply.header("x-rutter-job-id").map(str::to_string);
    assert!(
        job_id.as_deref().is_some_and(|id| rutter.emulator.job(id).is_some()),
        "the app should get the job Rutter created (X-Rutter-Job-ID), got {} {:?} {:?} {after:?} after SIGTERM",
        reply.status,
        reply.headers,
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "the on_timeout reply: {:?}",
        reply.body
    );
    assert_eq!(
        reply.json()["async_response"]["id"].as_str(),
        job_id.as_deref()
    );
    let status = sidecar.wait_exit(GRACE + Duration::from_secs(6)).await;
    assert!(
        status.is_some_and(|s| s.code() == Some(0)),
        "exit {status:?}"
    );
}

/// A passthrough read still waiting on Rutter when the grace ends gets an answer from the sidecar
/// (a sidecar error), not a connection closed without a response when the process exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_answers_a_slow_passthrough_before_exiting() {
    let rutter = start_emulator(emulator_options(200)).await;
    let mut sidecar = start_sidecar(
        rutter.addr,
        &[
            ("RUTTER_SIDECAR__SHUTDOWN__DRAIN_DELAY", "1s"),
            ("RUTTER_SIDECAR__SHUTDOWN__GRACE", "3s"),
        ],
    )
    .await;
    let proxy = sidecar.proxy;
    let started = Instant::now();
    let read = tokio::spawn(async move {
        let slow = [("x-emulator-delay-ms", "20000")];
        let reply = try_http(proxy, Method::GET, &invoices(TOKEN), &slow, "").await;
        (reply, Instant::now())
    });
    assert!(wait_until(Duration::from_secs(5), || rutter.emulator.seen().len() == 1).await);
    sleep_until(started + Duration::from_millis(300)).await;
    sidecar.signal("TERM");
    let signalled = Instant::now();

    let (reply, answered) = read.await.expect("read task");
    let after = answered - signalled;
    let status = sidecar.wait_exit(GRACE + Duration::from_secs(6)).await;
    let reply = reply.unwrap_or_else(|error| {
        panic!("the app got no answer ({error}) {after:?} after SIGTERM; the sidecar exited with {status:?}")
    });
    assert!(
        reply.status.is_server_error(),
        "{} {:?}",
        reply.status,
        reply.body
    );
    assert!(
        reply.header("x-sidecar-error").is_some(),
        "a sidecar error: {:?}",
        reply.headers
    );
    assert!(
        status.is_some_and(|s| s.code() == Some(0)),
        "exit {status:?}"
    );
}

// ------------------------------------------------------------------------------------------------
// 3. Secrets never logged
// ------------------------------------------------------------------------------------------------

const APP_USER: &str = "app-user-Kq3v81";
const APP_PASSWORD: &str = "app-password-Wz5mT0pX";
const ACCESS_TOKEN: &str = "7d3f9a2e-5b1c-4e8f-9a6d-2c4b8e1f0a37";
const CLIENT_ID: &str = "client-id-Hh3kP0dN";
const CLIENT_SECRET: &str = "client-secret-Zr8WqT4uNc";
const IDEMPOTENCY_KEY: &str = "idem-key-Vb62sQ1eRkLm";
const INVALID_IDEMPOTENCY_KEY: &str = "idem key Tn4WsYp";
const BAD_SIGNATURE: &str = "sha256=Zm9yZ2VkLXNpZ25hdHVyZS1YeTg0bVE9PQ==";

/// A signed JOB_COMPLETED webhook body for `job_id` carrying the distinctive access token.
fn webhook_body(job_id: &str) -> String {
    serde_json::json!({
        "type": "JOB",
        "code": "JOB_COMPLETED",
        "connection_id": null,
        "access_token": ACCESS_TOKEN,
        "job": {
            "id": job_id,
            "status": "success",
            "response": {"http_status": 200, "body": {"invoice": {"id": "inv-from-hook"}}}
        }
    })
    .to_string()
}

/// Runs a busy mix through a sidecar child started with `env` and returns its output and the
/// secrets that must not appear in it.
async fn busy_mix(env: &[(&str, &str)]) -> (support::SidecarProcess, Vec<String>) {
    // The emulator's listener first, so the sidecar can point at it; the emulator itself starts once
    // the sidecar's webhook address is known, and sends it real signed webhooks.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let upstream = listener.local_addr().expect("addr");
    let mut all = vec![
        ("RUTTER_CLIENT_ID", CLIENT_ID),
        ("RUTTER_CLIENT_SECRET", CLIENT_SECRET),
        ("RUTTER_SIDECAR__FACADE__MAX_BODY", "1KiB"),
    ];
    all.extend_from_slice(env);
    let sidecar = start_sidecar(upstream, &all).await;
    let rutter = start_emulator_on(
        listener,
        EmulatorOptions {
            webhook_url: Some(
                format!("http://{}/webhooks/rutter", sidecar.webhooks)
                    .parse()
                    .expect("uri"),
            ),
            client_secret: Some(CLIENT_SECRET.into()),
            ..emulator_options(150)
        },
    )
    .await;

    let app_credentials = base64(&format!("{APP_USER}:{APP_PASSWORD}"));
    let authorization = format!("Basic {app_credentials}");
    let injected = base64(&format!("{CLIENT_ID}:{CLIENT_SECRET}"));
    let target = invoices(ACCESS_TOKEN);
    let proxy = sidecar.proxy;
    let auth = ("authorization", authorization.as_str());
    let keyed = [auth, ("idempotency-key", IDEMPOTENCY_KEY)];

    // A keyed write, its replay, and a conflicting reuse of the key.
    let first = http(proxy, Method::POST, &target, &keyed, INVOICE).await;
    assert_eq!(first.status, StatusCode::OK, "{:?}", first.body);
    let job_id = first.header("x-rutter-job-id").expect("job id").to_string();
    let replay = http(proxy, Method::POST, &target, &keyed, INVOICE).await;
    assert_eq!(replay.status, StatusCode::OK, "{:?}", replay.body);
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    let conflict = http(proxy, Method::POST, &target, &keyed, common::BAD_INVOICE).await;
    assert_eq!(conflict.status, StatusCode::CONFLICT, "{:?}", conflict.body);
    // An invalid key, a failed job, a body over facade.max_body, scripted 503s (passthrough, and a
    // keyed write retried until its 1 s deadline).
    let invalid = [auth, ("idempotency-key", INVALID_IDEMPOTENCY_KEY)];
    let invalid = http(proxy, Method::POST, &target, &invalid, INVOICE).await;
    assert_eq!(
        invalid.status,
        StatusCode::BAD_REQUEST,
        "{:?}",
        invalid.body
    );
    let failed = http(proxy, Method::POST, &target, &[auth], common::BAD_INVOICE).await;
    assert_eq!(failed.status, StatusCode::BAD_REQUEST, "{:?}", failed.body);
    let big = format!(
        r#"{{"invoice":{{"customer_id":"c1","memo":"{}"}}}}"#,
        "x".repeat(2048)
    );
    let too_large = http(proxy, Method::POST, &target, &[auth], &big).await;
    assert_eq!(
        too_large.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{:?}",
        too_large.body
    );
    let unavailable = [auth, ("x-emulator-status", "503")];
    let listed = http(proxy, Method::GET, &target, &unavailable, "").await;
    assert_eq!(
        listed.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{:?}",
        listed.body
    );
    let retried = [auth, ("x-emulator-status", "503"), ("prefer", "wait=1")];
    let retried = http(proxy, Method::POST, &target, &retried, INVOICE).await;
    assert!(retried.status.is_server_error(), "{:?}", retried.body);
    // Injected credentials (no Authorization from the app), explicit async, a job poll by the app.
    let injected_write = http(proxy, Method::POST, &target, &[], INVOICE).await;
    assert_eq!(
        injected_write.status,
        StatusCode::OK,
        "{:?}",
        injected_write.body
    );
    let explicit = format!("{target}&response_mode=async");
    let explicit = http(proxy, Method::POST, &explicit, &[auth], INVOICE).await;
    assert_eq!(explicit.status, StatusCode::OK, "{:?}", explicit.body);
    let poll = format!("/versioned/jobs/{job_id}");
    assert_eq!(
        http(proxy, Method::GET, &poll, &[auth], "").await.status,
        StatusCode::OK
    );

    // Webhooks: unsigned, wrongly signed, and correctly signed (plus the emulator's own).
    let hooks = sidecar.webhooks;
    let hook_path = "/webhooks/rutter";
    let body = webhook_body(&job_id);
    let signature = rutter_sidecar::emulator::sign(CLIENT_SECRET.as_bytes(), body.as_bytes());
    let unsigned = http(hooks, Method::POST, hook_path, &[], &body).await;
    assert_eq!(unsigned.status, StatusCode::UNAUTHORIZED);
    let forged = [("x-rutter-signature", BAD_SIGNATURE)];
    let forged = http(hooks, Method::POST, hook_path, &forged, &body).await;
    assert_eq!(forged.status, StatusCode::UNAUTHORIZED);
    let signed = [("x-rutter-signature", signature.as_str())];
    let signed = http(hooks, Method::POST, hook_path, &signed, &body).await;
    assert!(signed.status.is_success(), "{:?}", signed.body);
    assert!(
        wait_until(Duration::from_secs(5), || rutter
            .emulator
            .counters()
            .webhooks_delivered
            >= 1)
        .await,
        "the emulator's webhooks should reach the sidecar"
    );
    // Let the last log lines land.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let signature_mac = signature.trim_start_matches("sha256=").to_string();
    let secrets = vec![
        authorization,
        app_credentials,
        format!("{APP_USER}:{APP_PASSWORD}"),
        APP_PASSWORD.to_string(),
        injected,
        ACCESS_TOKEN.to_string(),
        CLIENT_SECRET.to_string(),
        signature,
        signature_mac,
        BAD_SIGNATURE.to_string(),
        IDEMPOTENCY_KEY.to_string(),
        INVALID_IDEMPOTENCY_KEY.to_string(),
    ];
    (sidecar, secrets)
}

/// The secrets (from `secrets`) that occur in `output`, with the first line showing each.
fn leaked(output: &str, secrets: &[String]) -> Vec<String> {
    secrets
        .iter()
        .filter_map(|secret| {
            let line = output.lines().find(|l| l.contains(secret.as_str()))?;
            Some(format!("{secret:?} in: {line}"))
        })
        .collect()
}

/// Statuses seen in the request lines the sidecar logged.
const LOGGED_STATUSES: [&str; 5] = ["200", "400", "409", "413", "503"];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn secrets_never_logged_text_trace() {
    let (sidecar, secrets) = busy_mix(&[("RUST_LOG", "trace")]).await;
    let lines = sidecar.logs.lines();
    let output = lines.join("\n");
    let leaks = leaked(&output, &secrets);
    assert!(
        leaks.is_empty(),
        "secrets in the text log ({} lines):\n{}",
        lines.len(),
        leaks.join("\n")
    );

    let answered: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("answered") && l.contains("request_id=") && l.contains("status="))
        .collect();
    assert!(
        answered.len() >= 11,
        "request lines with request_id and status: {answered:#?}"
    );
    for status in LOGGED_STATUSES {
        assert!(
            answered
                .iter()
                .any(|l| l.contains(&format!("status={status}"))),
            "no request line with status={status}: {answered:#?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn secrets_never_logged_json_trace() {
    let (sidecar, secrets) = busy_mix(&[
        ("RUST_LOG", "trace"),
        ("RUTTER_SIDECAR__LOG__FORMAT", "json"),
    ])
    .await;
    let lines = sidecar.logs.lines();
    let output = lines.join("\n");
    let leaks = leaked(&output, &secrets);
    assert!(
        leaks.is_empty(),
        "secrets in the JSON log ({} lines):\n{}",
        lines.len(),
        leaks.join("\n")
    );

    let events: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {l}"))
        })
        .collect();
    let answered: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["fields"]["message"] == "answered")
        .collect();
    assert!(answered.len() >= 11, "request events: {answered:#?}");
    for event in &answered {
        let request_id = event["span"]["request_id"].as_str().unwrap_or_default();
        assert!(
            !request_id.is_empty(),
            "a request event without a request_id: {event}"
        );
        assert!(
            event["fields"]["status"].is_u64(),
            "a request event without a status: {event}"
        );
    }
    for status in LOGGED_STATUSES {
        let status: u64 = status.parse().unwrap();
        assert!(
            answered.iter().any(|e| e["fields"]["status"] == status),
            "no request event with status {status}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn check_config_never_prints_the_client_secret() {
    let config = TempFile::new("[log]\nlevel = \"debug\"\n");
    let env = vars(&[
        ("RUTTER_CLIENT_ID", CLIENT_ID),
        ("RUTTER_CLIENT_SECRET", CLIENT_SECRET),
    ]);
    let mut process = Process::spawn(&["check-config", "--config", config.path()], &env);
    let status = process.wait_exit(Duration::from_secs(10)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "check-config: {status:?}"
    );
    // The reader threads end with the pipes; give them a moment to take the last lines.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let output = process.logs.text();
    assert!(
        output.contains("[upstream]"),
        "the effective config is printed:\n{output}"
    );
    let secrets = [
        CLIENT_SECRET.to_string(),
        base64(&format!("{CLIENT_ID}:{CLIENT_SECRET}")),
    ];
    let leaks = leaked(&output, &secrets);
    assert!(
        leaks.is_empty(),
        "check-config printed a secret:\n{}",
        leaks.join("\n")
    );
}

// ------------------------------------------------------------------------------------------------
// 4. Credential injection
// ------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_credentials_are_injected_as_basic_auth_and_never_logged() {
    let rutter = start_emulator(EmulatorOptions {
        client_id: Some(CLIENT_ID.into()),
        client_secret: Some(CLIENT_SECRET.into()),
        ..emulator_options(400)
    })
    .await;
    let sidecar = start_sidecar(
        rutter.addr,
        &[
            ("RUTTER_CLIENT_ID", CLIENT_ID),
            ("RUTTER_CLIENT_SECRET", CLIENT_SECRET),
            ("RUST_LOG", "debug"),
        ],
    )
    .await;
    let expected = format!("Basic {}", base64(&format!("{CLIENT_ID}:{CLIENT_SECRET}")));

    // A facade write without Authorization: the write and every poll carry the injected credentials.
    let created = write_invoice(sidecar.proxy, &[]).await;
    assert_eq!(created.status, StatusCode::OK, "{:?}", created.body);
    assert!(
        created.json()["invoice"]["id"].is_string(),
        "{}",
        created.json()
    );
    let seen = rutter.emulator.seen();
    let writes = seen.iter().filter(|r| r.method == Method::POST).count();
    let polls = seen
        .iter()
        .filter(|r| r.path_and_query.contains("/jobs/"))
        .count();
    assert_eq!(writes, 1, "one write");
    assert!(polls >= 1, "the job was polled");
    for request in &seen {
        let authorization = request
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        assert_eq!(
            authorization,
            Some(expected.as_str()),
            "{} {}",
            request.method,
            request.path_and_query
        );
    }
    // A passthrough read without Authorization too; an app's own Authorization is not replaced.
    let listed = get(sidecar.proxy, &invoices(TOKEN)).await;
    assert_eq!(listed.status, StatusCode::OK, "{:?}", listed.body);
    let own = [("authorization", "Basic b3RoZXI6Y3JlZGVudGlhbHM=")];
    let refused = http(sidecar.proxy, Method::GET, &invoices(TOKEN), &own, "").await;
    assert_eq!(
        refused.status,
        StatusCode::UNAUTHORIZED,
        "{:?}",
        refused.body
    );
    assert!(
        refused.header("x-sidecar-error").is_none(),
        "Rutter's own 401"
    );

    tokio::time::sleep(Duration::from_millis(100)).await;
    let output = sidecar.logs.text();
    let secrets = [
        CLIENT_ID.to_string(),
        CLIENT_SECRET.to_string(),
        expected.trim_start_matches("Basic ").to_string(),
    ];
    let leaks = leaked(&output, &secrets);
    assert!(
        leaks.is_empty(),
        "credentials in the log:\n{}",
        leaks.join("\n")
    );
}

// ------------------------------------------------------------------------------------------------
// 5. X-Request-Id
// ------------------------------------------------------------------------------------------------

fn is_uuid_v4(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups
            .iter()
            .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()))
        && groups[2].starts_with('4')
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn request_ids_are_echoed_logged_and_forwarded() {
    let rutter = start_emulator(emulator_options(100)).await;
    let sidecar = start_sidecar(rutter.addr, &[]).await;

    let given = write_invoice(sidecar.proxy, &[("x-request-id", "abc-123")]).await;
    assert_eq!(given.status, StatusCode::OK, "{:?}", given.body);
    assert_eq!(given.header("x-request-id"), Some("abc-123"));
    let line = sidecar
        .logs
        .wait_for(&["abc-123", "answered"], Duration::from_secs(2))
        .await;
    assert!(
        line.is_some(),
        "no request line with abc-123:\n{}",
        sidecar.logs.text()
    );
    let forwarded = rutter.emulator.seen().iter().any(|r| {
        r.method == Method::POST
            && r.headers
                .get("x-request-id")
                .is_some_and(|v| v == "abc-123")
    });
    assert!(
        forwarded,
        "the write reached Rutter with X-Request-Id: abc-123"
    );

    let generated = get(sidecar.proxy, &invoices(TOKEN)).await;
    assert_eq!(generated.status, StatusCode::OK, "{:?}", generated.body);
    let id = generated
        .header("x-request-id")
        .unwrap_or_default()
        .to_string();
    assert!(
        is_uuid_v4(&id),
        "a generated UUID v4 request id, got {id:?}"
    );
    let line = sidecar
        .logs
        .wait_for(&[&id, "answered"], Duration::from_secs(2))
        .await;
    assert!(
        line.is_some(),
        "no request line with {id}:\n{}",
        sidecar.logs.text()
    );
}
