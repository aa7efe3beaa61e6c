//! Fault tests (DESIGN §5–§8): Rutter misbehaves on the wire — connections reset or cut mid-answer,
//! bodies dripped or stalled, keep-alive connections closed as they are reused, 5xx bursts, 429/452
//! storms, jobs that never end, disappear or come back malformed, DNS, connect and TLS failures — and
//! the app still gets the right answer (or the right sidecar error), never a hang, and a write is
//! never duplicated: every test counts what reached the emulator.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use rutter_sidecar::config::{Config, OnTimeout};
use rutter_sidecar::emulator::{Counters, EmulatorOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

/// Longest any single exchange in these tests may take before it counts as a hang.
const HANG: Duration = Duration::from_secs(5);

fn invoices() -> String {
    format!("/versioned/accounting/invoices?access_token={TOKEN}")
}

fn invoice(id: &str) -> String {
    format!("/versioned/accounting/invoices/{id}?access_token={TOKEN}")
}

/// A passthrough read (a list, not job-backed).
fn customers() -> String {
    format!("/versioned/accounting/customers?access_token={TOKEN}")
}

/// Sends one request; unlike `common::send`, a transport error or a broken body is a value.
async fn try_send(
    addr: SocketAddr,
    method: Method,
    target: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<Reply, String> {
    let started = Instant::now();
    let mut builder = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{target}"));
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    if !body.is_empty() {
        builder = builder.header("content-type", "application/json");
    }
    let request = builder
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    let exchange = async {
        let response = client()
            .request(request)
            .await
            .map_err(|e| format!("request failed: {e:?}"))?;
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("body broken after the head ({}): {e:?}", parts.status))?
            .to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
            elapsed: started.elapsed(),
        })
    };
    timeout(HANG, exchange)
        .await
        .unwrap_or_else(|_| panic!("no answer within {HANG:?}: the app would hang"))
}

/// `common::send` with the default client, bounded by [`HANG`].
async fn call(
    addr: SocketAddr,
    method: Method,
    target: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    timeout(HANG, send(&client(), addr, method, target, headers, body))
        .await
        .unwrap_or_else(|_| panic!("no answer within {HANG:?}: the app would hang"))
}

fn assert_sidecar_error(reply: &Reply, status: StatusCode, code: &str) {
    assert_eq!(
        reply.status,
        status,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(reply.header("x-sidecar-error"), Some(code));
    let body = reply.json();
    assert_eq!(body["error_type"], "PROXY_ERROR");
    assert_eq!(body["error_code"], code);
}

fn assert_invoice(reply: &Reply) {
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(reply.json()["invoice"]["document_number"], "INV-10042");
    assert!(reply.header("x-rutter-job-id").is_some());
}

/// Every write request Rutter received, and every one it accepted as a new job.
fn writes(counters: &Counters) -> (u64, u64) {
    (counters.write_requests, counters.writes_accepted)
}

/// A sidecar in front of `rutter` with `change` applied to the test configuration.
async fn sidecar_with(rutter: SocketAddr, change: impl FnOnce(&mut Config)) -> SidecarHandle {
    let mut config = config_for(rutter);
    change(&mut config);
    start_sidecar(config).await
}

/// Reads from a raw connection until EOF or `limit`; returns the bytes and whether EOF was seen.
async fn read_to_close(stream: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) => return (out, true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Ok(Err(_)) => return (out, true),
            Err(_) => return (out, false),
        }
    }
}

/// Splits a raw HTTP/1.1 answer into its head (lower-cased) and body bytes.
fn split_answer(raw: &[u8]) -> (String, Vec<u8>) {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete head");
    (
        String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase(),
        raw[end + 4..].to_vec(),
    )
}

fn content_length(head: &str) -> usize {
    head.lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("a content-length")
}

// ---------------------------------------------------------------------------------------------
// The emulator's wire-fault knobs themselves.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn emulator_truncate_announces_the_whole_length_then_closes() {
    let rutter = start_emulator(emulator_options(50)).await;
    for cut in [0usize, 10] {
        let mut stream = TcpStream::connect(rutter.addr).await.unwrap();
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: rutter\r\nX-Emulator-Truncate: {cut}\r\n\r\n",
            customers()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let (raw, closed) = read_to_close(&mut stream, Duration::from_secs(2)).await;
        assert!(closed, "the emulator closes the connection");
        let (head, body) = split_answer(&raw);
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(content_length(&head) > cut, "{head}");
        assert_eq!(body.len(), cut, "exactly {cut} body bytes, then the close");
    }
    assert_eq!(rutter.emulator.counters().truncated, 2);
}

#[tokio::test]
async fn emulator_drip_sends_the_body_in_chunks_over_time() {
    let rutter = start_emulator(emulator_options(50)).await;
    let whole = call(rutter.addr, Method::GET, &customers(), &[], "").await;
    let request = Request::builder()
        .uri(format!("http://{}{}", rutter.addr, customers()))
        .header("x-emulator-drip-ms", "30")
        .header("x-emulator-drip-bytes", "100")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let started = Instant::now();
    let response = client().request(request).await.unwrap();
    assert_eq!(
        response.headers()["content-length"],
        whole.body.len().to_string().as_str()
    );
    let mut body = response.into_body();
    let mut received = Vec::new();
    let mut arrivals = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            received.extend_from_slice(&data);
            arrivals.push(started.elapsed());
        }
    }
    assert_eq!(received, whole.body, "the same bytes, only slower");
    let chunks = whole.body.len().div_ceil(100);
    assert!(arrivals.len() >= chunks / 2, "{arrivals:?}");
    let expected = Duration::from_millis(30 * (chunks as u64 - 1));
    assert!(
        *arrivals.last().unwrap() >= expected,
        "{arrivals:?} for {chunks} chunks"
    );
    assert!(arrivals[0] < expected / 2, "the first chunk comes at once");
    assert_eq!(rutter.emulator.counters().dripped, 1);
}

#[tokio::test]
async fn emulator_close_answers_with_keep_alive_semantics_then_closes() {
    let rutter = start_emulator(emulator_options(50)).await;
    let mut stream = TcpStream::connect(rutter.addr).await.unwrap();
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: rutter\r\nX-Emulator-Close: 1\r\n\r\n",
        customers()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let (raw, closed) = read_to_close(&mut stream, Duration::from_secs(2)).await;
    assert!(closed, "closed right after the answer");
    let (head, body) = split_answer(&raw);
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        !head.contains("connection: close"),
        "keep-alive semantics: {head}"
    );
    assert_eq!(body.len(), content_length(&head), "the whole answer");

    // Without the knob the connection stays open for the next request.
    let mut stream = TcpStream::connect(rutter.addr).await.unwrap();
    let request = format!("GET {} HTTP/1.1\r\nHost: rutter\r\n\r\n", customers());
    stream.write_all(request.as_bytes()).await.unwrap();
    let (_, closed) = read_to_close(&mut stream, Duration::from_millis(300)).await;
    assert!(!closed);
    assert_eq!(rutter.emulator.counters().closed_after_answer, 1);
}

#[tokio::test]
async fn emulator_fault_times_limits_answer_faults_to_the_first_requests() {
    let rutter = start_emulator(emulator_options(50)).await;
    let headers = [
        ("x-emulator-status", "503"),
        ("x-emulator-fault-times", "2"),
        ("idempotency-key", "fault-times-1"),
    ];
    let target = format!("{}&response_mode=async", invoices());
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(
            call(rutter.addr, Method::POST, &target, &headers, INVOICE)
                .await
                .status,
        );
    }
    assert_eq!(
        statuses,
        [
            StatusCode::SERVICE_UNAVAILABLE,
            StatusCode::SERVICE_UNAVAILABLE,
            StatusCode::OK
        ]
    );
    // Another key is another scope.
    let other = [
        ("x-emulator-status", "503"),
        ("x-emulator-fault-times", "2"),
        ("idempotency-key", "fault-times-2"),
    ];
    let reply = call(rutter.addr, Method::POST, &target, &other, INVOICE).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(rutter.emulator.counters().writes_accepted, 1);
}

#[tokio::test]
async fn emulator_poll_faults_script_resets_truncation_bad_json_and_closes() {
    let rutter = start_emulator(emulator_options(50)).await;
    let target = format!("{}&response_mode=async", invoices());
    let reply = call(
        rutter.addr,
        Method::POST,
        &target,
        &[("x-emulator-poll-faults", "reset,truncate,badjson,close,429")],
        INVOICE,
    )
    .await;
    let job = reply.json()["async_response"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let poll = format!("/versioned/jobs/{job}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let reset = try_send(rutter.addr, Method::GET, &poll, &[], "").await;
    assert!(reset.is_err(), "{reset:?}");
    let truncated = try_send(rutter.addr, Method::GET, &poll, &[], "").await;
    assert!(truncated.is_err(), "{truncated:?}");
    let bad = call(rutter.addr, Method::GET, &poll, &[], "").await;
    assert_eq!(bad.status, StatusCode::OK);
    assert!(serde_json::from_slice::<serde_json::Value>(&bad.body).is_err());
    let closed = call(rutter.addr, Method::GET, &poll, &[], "").await;
    assert_eq!(closed.json()["status"], "success");
    let limited = call(rutter.addr, Method::GET, &poll, &[], "").await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    let normal = call(rutter.addr, Method::GET, &poll, &[], "").await;
    assert_eq!(normal.json()["status"], "success");
    let counters = rutter.emulator.counters();
    assert_eq!(
        (
            counters.resets,
            counters.truncated,
            counters.closed_after_answer
        ),
        (1, 1, 1)
    );
}

// ---------------------------------------------------------------------------------------------
// A connection reset or cut mid-answer.
// ---------------------------------------------------------------------------------------------

/// DESIGN §6: a keyed write is retried on transport errors; Rutter's idempotency answers the retry
/// from the first job, so the write happens once.
#[tokio::test]
async fn a_write_answer_cut_once_is_retried_with_its_key_and_written_once() {
    let rutter = start_emulator(emulator_options(100)).await;
    let sidecar = start_sidecar(config_for(rutter.addr)).await;
    for (i, cut) in ["0", "20"].into_iter().enumerate() {
        let before = rutter.emulator.counters();
        let reply = call(
            sidecar.addr,
            Method::POST,
            &invoices(),
            &[
                ("x-emulator-truncate", cut),
                ("x-emulator-fault-times", "1"),
            ],
            INVOICE,
        )
        .await;
        assert_invoice(&reply);
        let after = rutter.emulator.counters();
        assert_eq!(after.truncated, i as u64 + 1);
        assert_eq!(after.write_requests - before.write_requests, 2, "one retry");
        assert_eq!(
            after.writes_accepted - before.writes_accepted,
            1,
            "written once"
        );
        assert_eq!(after.idempotent_replays - before.idempotent_replays, 1);
    }
}

/// A write whose answer is always cut ends in a 502 within the deadline, never a hang; Rutter still
/// created exactly one job, and the app holds the key to retry with.
#[tokio::test]
async fn a_write_answer_cut_every_time_is_a_502_and_written_once() {
    let rutter = start_emulator(emulator_options(100)).await;
    let sidecar = start_sidecar(config_for(rutter.addr)).await;
    let reply = call(
        sidecar.addr,
        Method::POST,
        &invoices(),
        &[("x-emulator-truncate", "5"), ("prefer", "wait=1")],
        INVOICE,
    )
    .await;
    assert_sidecar_error(&reply, StatusCode::BAD_GATEWAY, "UPSTREAM_UNAVAILABLE");
    assert!(reply.header("idempotency-key").is_some());
    assert!(
        reply.elapsed < Duration::from_secs(3),
        "{:?}",
        reply.elapsed
    );
    let counters = rutter.emulator.counters();
    assert!(counters.write_requests >= 1);
    assert_eq!(counters.writes_accepted, 1);
    assert_eq!(counters.idempotent_replays, counters.write_requests - 1);
}

/// DESIGN §6: without a key a write is retried only when nothing was sent; a cut answer is not
/// such a case, so the app gets a 502 and Rutter saw the write once.
#[tokio::test]
async fn an_unkeyed_write_cut_mid_answer_is_not_retried() {
    let rutter = start_emulator(emulator_options(100)).await;
    let sidecar = sidecar_with(rutter.addr, |c| c.idempotency.generate_missing_keys = false).await;
    let headers = [
        ("x-emulator-truncate", "10"),
        ("x-emulator-fault-times", "1"),
    ];
    let reply = call(sidecar.addr, Method::POST, &invoices(), &headers, INVOICE).await;
    assert_sidecar_error(&reply, StatusCode::BAD_GATEWAY, "UPSTREAM_UNAVAILABLE");
    let reply = call(
        sidecar.addr,
        Method::DELETE,
        &invoice("inv-1"),
        &headers,
        "",
    )
    .await;
    assert_sidecar_error(&reply, StatusCode::BAD_GATEWAY, "UPSTREAM_UNAVAILABLE");
    assert_eq!(writes(&rutter.emulator.counters()), (2, 2));
}

/// A connection reset before any answer: same rules.
#[tokio::test]
async fn a_write_reset_before_its_answer_is_retried_only_with_a_key() {
    let rutter = start_emulator(emulator_options(100)).await;
    let sidecar = start_sidecar(config_for(rutter.addr)).await;
    let reset_after = [
        ("x-emulator-reset", "after"),
        ("x-emulator-fault-times", "1"),
    ];
    let reply = call(
        sidecar.addr,
        Method::POST,
        &invoices(),
        &reset_after,
        INVOICE,
    )
    .await;
    assert_invoice(&reply);
    assert_eq!(writes(&rutter.emulator.counters()), (2, 1));
    // DELETE has no key: the job exists at Rutter, but the answer never came back.
    let reply = call(
        sidecar.addr,
        Method::DELETE,
        &invoice("x"),
        &reset_after,
        "",
    )
    .await;
    assert_sidecar_error(&reply, StatusCode::BAD_GATEWAY, "UPSTREAM_UNAVAILABLE");
    assert_eq!(writes(&rutter.emulator.counters()), (3, 2));
}

/// A passthrough read cut mid-body: the app sees an incomplete answer (or a 502), never a hang,
/// and the sidecar serves the next request.
#[tokio::test]
async fn a_passthrough_read_cut_mid_body_is_incomplete_for_the_app() {
    let rutter = start_emulator(emulator_options(50)).await;
    let sidecar = start_sidecar(config_for(rutter.addr)).await;
    for cut in ["0", "100"] {
        let outcome = try_send(
            sidecar.addr,
            Method::GET,
            &customers(),
            &[("x-emulator-truncate", cut)],
            "",
        )
        .await;
        match outcome {
            Err(_) => {}
            Ok(reply) => {
                assert_sidecar_error(&reply, StatusCode::BAD_GATEWAY, "UPSTREAM_UNAVAILABLE")
            }
        }
    }
    let reset = call(
        sidecar.addr,
        Method::GET,
        &customers(),
        &[("x-emulator-reset", "1")],
        "",
    )
    .await;
    assert_sidecar_error(&reset, StatusCode::BAD_GATEWAY, "UPSTREAM_UNAVAILABLE");
    let reply = call(sidecar.addr, Method::GET, &customers(), &[], "").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(rutter.emulator.counters().write_requests, 0);
}

// ---------------------------------------------------------------------------------------------
// Slow and stalled bodies.
// ---------------------------------------------------------------------------------------------

/// A dripped passthrough body is streamed through: the app gets the first bytes long before the
/// last ones, and exactly Rutter's bytes.
#[tokio::test]
async fn a_dripped_passthrough_body_streams_through() {
    let rutter = start_emulator(emulator_options(50)).await;
    let sidecar = start_sidecar(config_for(rutter.addr)).await;
    let whole = call(sidecar.addr, Method::GET, &customers(), &[], "").await;
    let request = Request::builder()
        .uri(format!("http://{}{}", sidecar.addr, customers()))
        .header("x-emulator-drip-ms", "40")
        .header("x-emulator-drip-bytes", "128")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let started = Instant::now();
    let response = timeout(HANG, client().request(request))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut received = Vec::new();
    let mut first = None;
    while let Some(frame) = timeout(HANG, body.frame()).await.unwrap() {
        if let Ok(data) = frame.unwrap().into_data() {
            first.get_or_insert(started.elapsed());
            received.extend_from_slice(&data);
        }
    }
    let last = started.elapsed();
    assert_eq!(received, whole.body);
    let first = first.unwrap();
    let chunks = whole.body.len().div_ceil(128) as u32;
    assert!(chunks >= 4, "{chunks}");
    assert!(
        last - first >= Duration::from_millis(40) * (chunks - 2),
        "streamed, not buffered: first {first:?}, last {last:?}, {chunks} chunks"
    );
}

/// A facade write whose answer drips in within `upstream.request_timeout` is read whole and awaited.
#[tokio::test]
async fn a_dripped_write_answer_within_the_request_timeout_is_awaited() {
    let rutter = start_emulator(emulator_options(100)).await;
    let sidecar = sidecar_with(rutter.addr, |c| {
        c.upstream.request_timeout = Duration::from_secs(2)
    })
    .await;
    let reply = call(
        sidecar.addr,
        Method::POST,
        &invoices(),
        &[
            ("x-emulator-drip-ms", "20"),
            ("x-emulator-drip-bytes", "16"),
        ],
        INVOICE,
    )
    .await;
    assert_invoice(&reply);
    assert!(reply.elapsed >= Duration::from_millis(150), "it did drip");
    assert_eq!(writes(&rutter.emulator.counters()), (1, 1));
}

/// A write answer dripping past `upstream.request_timeout` is a 504 UPSTREAM_TIMEOUT (DESIGN §8);
/// retried with its key while the deadline allows, never written twice.
#[tokio::test]
async fn a_write_answer_slower_than_the_request_timeout_is_a_504() {
    let rutter = start_emulator(emulator_options(100)).await;
    let sidecar = sidecar_with(rutter.addr, |c| {
        c.upstream.request_timeout = Duration::from_millis(300)
    })
    .await;
    let drip = [
        ("x-emulator-drip-ms", "100"),
        ("x-emulator-drip-bytes", "8"),
        ("prefer", "wait=1"),
    ];
    let reply = call(sidecar.addr, Method::POST, &invoices(), &drip, INVOICE).await;
    assert_sidecar_error(&reply, StatusCode::GATEWAY_TIMEOUT, "UPSTREAM_TIMEOUT");
    let (requests, accepted) = writes(&rutter.emulator.counters());
    assert_eq!(accepted, 1, "{requests} attempts, one job");

    // Unkeyed: one attempt, the same 504.
    let reply = call(sidecar.addr, Method::DELETE, &invoice("slow"), &drip, "").await;
    assert_sidecar_error(&reply, StatusCode::GATEWAY_TIMEOUT, "UPSTREAM_TIMEOUT");
    assert_eq!(
        writes(&rutter.emulator.counters()),
        (requests + 1, accepted + 1)
    );

    // Slow once, then normal: the keyed retry gets the job, still written once.
    let once = [
        ("x-emulator-drip-ms", "100"),
        ("x-emulator-drip-bytes", "8"),
        ("x-emulator-fault-times", "1"),
    ];
    let reply = call(sidecar.addr, Method::POST, &invoices(), &once, INVOICE).await;
    assert_invoice(&reply);
    assert_eq!(
        writes(&rutter.emulator.counters()),
        (requests + 3, accepted + 2)
    );
}

/// A passthrough answer whose body stalls (head sent, then nothing for far longer than
/// `upstream.request_timeout`) must not hold the app forever: DESIGN §10 "every wait is bounded",
/// and `upstream.request_timeout` bounds one upstream exchange (§2).
#[tokio::test]
async fn a_stalled_passthrough_body_is_cut_not_hung() {
    let rutter = start_emulator(emulator_options(50)).await;
    let sidecar = sidecar_with(rutter.addr, |c| {
        c.upstream.request_timeout = Duration::from_millis(500)
    })
    .await;
    let request = Request::builder()
        .uri(format!("http://{}{}", sidecar.addr, customers()))
        .header("x-emulator-drip-ms", "60000")
        .header("x-emulator-drip-bytes", "64")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let started = Instant::now();
    let response = timeout(HANG, client().request(request))
        .await
        .expect("the head comes at once")
        .expect("a response");
    let outcome = timeout(Duration::from_secs(3), response.into_body().collect()).await;
    match outcome {
        Err(_) => panic!(
            "the app was still waiting for the body {:?} after the request, with \
             upstream.request_timeout = 500ms: a stalled upstream body hangs the app",
            started.elapsed()
        ),
        Ok(Ok(body)) => panic!(
            "a stalled body cannot complete ({} bytes)",
            body.to_bytes().len()
        ),
        Ok(Err(_)) => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Keep-alive connections closed by Rutter just as they are reused.
// ---------------------------------------------------------------------------------------------

/// Rutter answers with keep-alive semantics and closes the connection at once; the sidecar's next
/// exchange (which may pick that pooled connection) still succeeds, and no write is duplicated or
/// lost.
#[tokio::test]
async fn a_pooled_connection_closed_by_rutter_does_not_fail_or_duplicate_the_next_write() {
    let rutter = start_emulator(emulator_options(50)).await;
    let sidecar = start_sidecar(config_for(rutter.addr)).await;
    let rounds = 15u64;
    for _ in 0..rounds {
        // X-Emulator-Sync: the job ends at once and the write is answered with its result.
        let closing = [("x-emulator-close", "1"), ("x-emulator-sync", "1")];
        let reply = call(sidecar.addr, Method::POST, &invoices(), &closing, INVOICE).await;
        assert_invoice(&reply);
        let reply = call(
            sidecar.addr,
            Method::POST,
            &invoices(),
            &[("x-emulator-sync", "1")],
            INVOICE,
        )
        .await;
        assert_invoice(&reply);
    }
    let counters = rutter.emulator.counters();
    assert_eq!(counters.closed_after_answer, rounds);
    assert_eq!(
        counters.writes_accepted,
        2 * rounds,
        "none lost, none twice"
    );
}

/// The same for writes without a key (only "nothing sent" failures may be retried) and for reads.
#[tokio::test]
async fn a_pooled_connection_closed_by_rutter_does_not_fail_unkeyed_writes_or_reads() {
    let rutter = start_emulator(emulator_options(50)).await;
    let sidecar = sidecar_with(rutter.addr, |c| c.idempotency.generate_missing_keys = false).await;
    let rounds = 15u64;
    for _ in 0..rounds {
        let closing = [("x-emulator-close", "1"), ("x-emulator-sync", "1")];
        let reply = call(sidecar.addr, Method::POST, &invoices(), &closing, INVOICE).await;
        assert_invoice(&reply);
        let reply = call(
            sidecar.addr,
            Method::POST,
            &invoices(),
            &[("x-emulator-sync", "1")],
            INVOICE,
        )
        .await;
        assert_invoice(&reply);
        let closing = [("x-emulator-close", "1")];
        let reply = call(sidecar.addr, Method::GET, &customers(), &closing, "").await;
        assert_eq!(reply.status, StatusCode::OK);
        let reply = call(sidecar.addr, Method::GET, &customers(), &[], "").await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    let counters = rutter.emulator.counters();
    assert_eq!(counters.closed_after_answer, 2 * rounds);
    assert_eq!(writes(&counters), (2 * rounds, 2 * rounds));
}

/// Leaves exactly one idle connection in the sidecar's pool, marked by Rutter to be dropped with
/// the next request on it (`X-Emulator-Close: next`): the race of a server closing an idle
/// keep-alive connection just as the client reuses it.
async fn poison_the_pool(sidecar: &SidecarHandle) {
    let reply = call(
        sidecar.addr,
        Method::GET,
        &customers(),
        &[("x-emulator-close", "next")],
        "",
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
}

#[tokio::test]
async fn a_keyed_write_on_a_connection_dropped_as_it_is_reused_is_written_once() {
    let rutter = start_emulator(emulator_options(50)).await;
    let sidecar = start_sidecar(config_for(rutter.addr)).await;
    poison_the_pool(&sidecar).await;
    let sync = [("x-emulator-sync", "1")];
    let reply = call(sidecar.addr, Method::POST, &invoices(), &sync, INVOICE).await;
    assert_invoice(&reply);
    let counters = rutter.emulator.counters();
    assert_eq!(counters.resets, 1, "the reused connection was dropped");
    assert_eq!(writes(&counters), (1, 1));
}

/// RFC 9110 §9.2.2: a GET is idempotent, so a proxy may (and, to hide this everyday race from the
/// app, should) repeat it on a fresh connection when the reused one closed without an answer.
#[tokio::test]
async fn a_read_on_a_connection_dropped_as_it_is_reused_still_succeeds() {
    let rutter = start_emulator(emulator_options(50)).await;
    let sidecar = start_sidecar(config_for(rutter.addr)).await;
    poison_the_pool(&sidecar).await;
    let reply = call(sidecar.addr, Method::GET, &customers(), &[], "").await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "a keep-alive race surfaced to the app: {}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(rutter.emulator.counters().resets, 1);
}

/// DESIGN §6: without a key the sidecar may not repeat a write it sent; whatever the app gets, the
/// write is not duplicated, and a 2xx means Rutter has it.
#[tokio::test]
async fn an_unkeyed_write_on_a_connection_dropped_as_it_is_reused_is_never_duplicated() {
    let rutter = start_emulator(emulator_options(50)).await;
    let sidecar = start_sidecar(config_for(rutter.addr)).await;
    poison_the_pool(&sidecar).await;
    let sync = [("x-emulator-sync", "1")];
    let reply = call(sidecar.addr, Method::DELETE, &invoice("race"), &sync, "").await;
    let accepted = rutter.emulator.counters().writes_accepted;
    if reply.status == StatusCode::OK {
        assert_eq!(accepted, 1);
    } else {
        assert_sidecar_error(&reply, StatusCode::BAD_GATEWAY, "UPSTREAM_UNAVAILABLE");
        assert_eq!(accepted, 0);
    }
}

/// A poll's connection closed after its answer: the next poll still goes through.
#[tokio::test]
async fn polls_on_connections_rutter_closes_still_reach_the_answer() {
    let rutter = start_emulator(emulator_options(300)).await;
    let sidecar = start_sidecar(config_for(rutter.addr)).await;
    let reply = call(
        sidecar.addr,
        Method::POST,
        &invoices(),
        &[("x-emulator-poll-faults", "close,close,close,close")],
        INVOICE,
    )
    .await;
    assert_invoice(&reply);
    assert!(rutter.emulator.counters().closed_after_answer >= 1);
    assert_eq!(writes(&rutter.emulator.counters()), (1, 1));
}

// ---------------------------------------------------------------------------------------------
// 5xx bursts, 429/452 storms.
// ---------------------------------------------------------------------------------------------

/// DESIGN §6: 502/503/504 are retried for keyed writes within the deadline (Rutter's idempotency
/// keeps it one job); unkeyed writes are not retried and the app gets Rutter's answer as is.
#[tokio::test]
async fn five_hundred_bursts_are_retried_for_keyed_writes_only() {
    let rutter = start_emulator(emulator_options(100)).await;
    let sidecar = start_sidecar(config_for(rutter.addr)).await;
    // The three bursts run side by side (each backs off on its own).
    let bursts = ["502", "503", "504"].map(|status| {
        let addr = sidecar.addr;
        tokio::spawn(async move {
            let burst = [
                ("x-emulator-status", status),
                ("x-emulator-fault-times", "2"),
            ];
            call(addr, Method::POST, &invoices(), &burst, INVOICE).await
        })
    });
    for burst in bursts {
        assert_invoice(&burst.await.unwrap());
    }
    assert_eq!(
        writes(&rutter.emulator.counters()),
        (9, 3),
        "two retries each, one job each"
    );
    // 500 is not in the retry list: Rutter's answer goes back at once.
    let before = writes(&rutter.emulator.counters());
    let reply = call(
        sidecar.addr,
        Method::POST,
        &invoices(),
        &[("x-emulator-status", "500")],
        INVOICE,
    )
    .await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(reply.header("x-sidecar-error").is_none(), "Rutter's own");
    let after = writes(&rutter.emulator.counters());
    assert_eq!((after.0 - before.0, after.1 - before.1), (1, 0));
    // Unkeyed (DELETE): one attempt, Rutter's 503 as is.
    let reply = call(
        sidecar.addr,
        Method::DELETE,
        &invoice("burst"),
        &[
            ("x-emulator-status", "503"),
            ("x-emulator-fault-times", "2"),
        ],
        "",
    )
    .await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(reply.header("x-sidecar-error").is_none());
    assert_eq!(reply.json()["error_code"], "SERVICE_UNAVAILABLE");
    let last = writes(&rutter.emulator.counters());
    assert_eq!((last.0 - after.0, last.1 - after.1), (1, 0));
}

/// 429/452 storms on a keyed write: retried after `Retry-After`, the app gets the entity and never
/// sees a 429 while the deadline allows; Rutter created one job.
#[tokio::test]
async fn rate_limit_storms_on_writes_are_absorbed_when_the_deadline_allows() {
    let rutter = start_emulator(emulator_options(100)).await;
    let sidecar = start_sidecar(config_for(rutter.addr)).await;
    for status in ["429", "452"] {
        let before = writes(&rutter.emulator.counters());
        let storm = [
            ("x-emulator-status", status),
            ("x-emulator-retry-after", "0"),
            ("x-emulator-fault-times", "4"),
        ];
        let reply = call(sidecar.addr, Method::POST, &invoices(), &storm, INVOICE).await;
        assert_invoice(&reply);
        let after = writes(&rutter.emulator.counters());
        assert_eq!((after.0 - before.0, after.1 - before.1), (5, 1), "{status}");
    }
    // Retry-After is honoured.
    let storm = [
        ("x-emulator-status", "429"),
        ("x-emulator-retry-after", "1"),
        ("x-emulator-fault-times", "1"),
    ];
    let reply = call(sidecar.addr, Method::POST, &invoices(), &storm, INVOICE).await;
    assert_invoice(&reply);
    assert!(
        reply.elapsed >= Duration::from_secs(1),
        "{:?}",
        reply.elapsed
    );
    assert_eq!(rutter.emulator.counters().writes_accepted, 3);
}

/// When the deadline does not allow waiting out `Retry-After`, the app gets Rutter's 429 with its
/// `Retry-After` (not a sidecar error), and nothing was written.
#[tokio::test]
async fn a_rate_limit_longer_than_the_deadline_reaches_the_app_as_rutters_429() {
    let rutter = start_emulator(emulator_options(100)).await;
    let sidecar = start_sidecar(config_for(rutter.addr)).await;
    let storm = [
        ("x-emulator-status", "429"),
        ("x-emulator-retry-after", "30"),
        ("prefer", "wait=1"),
    ];
    let reply = call(sidecar.addr, Method::POST, &invoices(), &storm, INVOICE).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(reply.header("x-sidecar-error").is_none());
    assert_eq!(reply.header("retry-after"), Some("30"));
    assert_eq!(writes(&rutter.emulator.counters()), (1, 0));
}

/// DESIGN §5: 429/452 on polls slow polling down but never fail the wait.
#[tokio::test]
async fn rate_limit_storms_on_polls_never_reach_the_app() {
    let rutter = start_emulator(emulator_options(100)).await;
    let sidecar = start_sidecar(config_for(rutter.addr)).await;
    let reply = call(
        sidecar.addr,
        Method::POST,
        &invoices(),
        &[
            (
                "x-emulator-poll-faults",
                "429,452,429,452,429,429,452,452,429,429",
            ),
            ("x-emulator-poll-retry-after", "0"),
        ],
        INVOICE,
    )
    .await;
    assert_invoice(&reply);
    let counters = rutter.emulator.counters();
    assert_eq!(counters.rate_limited + counters.platform_limited, 10);
    assert!(polls(&rutter.emulator) >= 11);
    assert_eq!(writes(&counters), (1, 1));
}

/// Transport faults and 5xx on polls are retried (DESIGN §5): reset, cut, closed, too slow, 500.
#[tokio::test]
async fn broken_polls_are_retried_until_the_answer() {
    let rutter = start_emulator(emulator_options(100)).await;
    let sidecar = sidecar_with(rutter.addr, |c| {
        c.upstream.request_timeout = Duration::from_millis(400)
    })
    .await;
    let reply = call(
        sidecar.addr,
        Method::POST,
        &invoices(),
        &[(
            "x-emulator-poll-faults",
            "reset,truncate,500,delay=900,503,reset,close",
        )],
        INVOICE,
    )
    .await;
    assert_invoice(&reply);
    let counters = rutter.emulator.counters();
    assert_eq!(
        (
            counters.resets,
            counters.truncated,
            counters.closed_after_answer
        ),
        (2, 1, 1)
    );
    // The `close` poll answers the finished job.
    assert_eq!(polls(&rutter.emulator), 7);
    assert_eq!(writes(&counters), (1, 1));
}

// ---------------------------------------------------------------------------------------------
// Jobs that never end, disappear, or come back malformed.
// ---------------------------------------------------------------------------------------------

/// DESIGN §5: at the deadline, `on_timeout` decides: the original `async_response` (200) or a 504
/// JOB_WAIT_TIMEOUT naming the job; either way the app holds the job id, and it was written once.
#[tokio::test]
async fn a_job_that_never_ends_gets_the_on_timeout_reply() {
    let rutter = start_emulator(emulator_options(100)).await;
    for on_timeout in [OnTimeout::AsyncResponse, OnTimeout::GatewayTimeout] {
        let sidecar = sidecar_with(rutter.addr, |c| c.facade.on_timeout = on_timeout).await;
        let reply = call(
            sidecar.addr,
            Method::POST,
            &invoices(),
            &[("x-emulator-never-finish", "1"), ("prefer", "wait=1")],
            INVOICE,
        )
        .await;
        let job = reply.header("x-rutter-job-id").expect("job id").to_string();
        match on_timeout {
            OnTimeout::AsyncResponse => {
                assert_eq!(reply.status, StatusCode::OK);
                assert_eq!(reply.json()["async_response"]["id"], job.as_str());
            }
            OnTimeout::GatewayTimeout => {
                assert_sidecar_error(&reply, StatusCode::GATEWAY_TIMEOUT, "JOB_WAIT_TIMEOUT");
                let message = reply.json()["error_message"].to_string();
                assert!(message.contains(&job), "{message}");
            }
        }
        assert!(reply.elapsed >= Duration::from_secs(1));
        assert!(reply.elapsed < Duration::from_secs(3));
    }
    assert_eq!(writes(&rutter.emulator.counters()), (2, 2));
}

/// DESIGN §5: 404/410 on a poll fail the wait: 502 JOB_NOT_FOUND with the job id.
#[tokio::test]
async fn a_job_that_disappears_is_a_502_job_not_found() {
    let rutter = start_emulator(emulator_options(500)).await;
    let sidecar = start_sidecar(config_for(rutter.addr)).await;
    for faults in ["503,404", "429,410"] {
        let reply = call(
            sidecar.addr,
            Method::POST,
            &invoices(),
            &[
                ("x-emulator-poll-faults", faults),
                ("x-emulator-poll-retry-after", "0"),
            ],
            INVOICE,
        )
        .await;
        assert_sidecar_error(&reply, StatusCode::BAD_GATEWAY, "JOB_NOT_FOUND");
        assert!(reply.header("x-rutter-job-id").is_some());
    }
    assert_eq!(writes(&rutter.emulator.counters()), (2, 2));
}

/// DESIGN §5: a job object that is not JSON, or a terminal job without a usable `response`, is a
/// 502 JOB_RESULT_INVALID.
#[tokio::test]
async fn a_malformed_job_is_a_502_job_result_invalid() {
    let rutter = start_emulator(emulator_options(100)).await;
    let sidecar = start_sidecar(config_for(rutter.addr)).await;
    for (name, value) in [
        ("x-emulator-bad-job", "not-json"),
        ("x-emulator-bad-job", "no-response"),
        ("x-emulator-poll-faults", "503,badjson"),
    ] {
        let reply = call(
            sidecar.addr,
            Method::POST,
            &invoices(),
            &[(name, value)],
            INVOICE,
        )
        .await;
        assert_sidecar_error(&reply, StatusCode::BAD_GATEWAY, "JOB_RESULT_INVALID");
        assert!(reply.header("x-rutter-job-id").is_some(), "{value}");
    }
    assert_eq!(writes(&rutter.emulator.counters()), (3, 3));
}

// ---------------------------------------------------------------------------------------------
// DNS, connect and TLS failures.
// ---------------------------------------------------------------------------------------------

async fn assert_unreachable(sidecar: &SidecarHandle) {
    let wait = [("prefer", "wait=1")];
    for (method, target, body) in [
        (Method::POST, invoices(), INVOICE),
        (Method::DELETE, invoice("gone"), ""),
        (Method::GET, customers(), ""),
    ] {
        let reply = call(sidecar.addr, method.clone(), &target, &wait, body).await;
        assert_sidecar_error(&reply, StatusCode::BAD_GATEWAY, "UPSTREAM_UNAVAILABLE");
        assert!(reply.elapsed < Duration::from_secs(3), "{method}");
    }
}

#[tokio::test]
async fn a_host_that_does_not_resolve_is_a_502_upstream_unavailable() {
    let mut config = config_for("127.0.0.1:9".parse().unwrap());
    config.upstream.base_url = base_url("http://does-not-exist.invalid:8080");
    config.upstream.request_timeout = Duration::from_secs(2);
    let sidecar = start_sidecar(config).await;
    assert_unreachable(&sidecar).await;
}

#[tokio::test]
async fn a_closed_port_is_a_502_upstream_unavailable() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let sidecar = start_sidecar(config_for(addr)).await;
    assert_unreachable(&sidecar).await;
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A server certificate for `localhost` signed by a fresh CA nobody trusts.
fn untrusted_certificate() -> (TempDir, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let dir = std::env::temp_dir().join(format!("rutter-faults-tls-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "untrusted test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let cert = server.signed_by(&key, &ca_cert, &ca_key).unwrap();
    let (cert_path, key_path) = (dir.join("server.pem"), dir.join("server.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (TempDir(dir), cert_path, key_path)
}

/// TLS to a Rutter whose certificate chains to an untrusted CA: 502, and not one byte of HTTP
/// reached it.
#[tokio::test]
async fn an_untrusted_certificate_is_a_502_and_nothing_reaches_rutter() {
    let (_dir, cert, key) = untrusted_certificate();
    let rutter = start_emulator(EmulatorOptions {
        tls_cert: Some(cert),
        tls_key: Some(key),
        ..emulator_options(50)
    })
    .await;
    let mut config = config_for(rutter.addr);
    config.upstream.base_url = base_url(&format!("https://localhost:{}", rutter.addr.port()));
    let sidecar = start_sidecar(config).await;
    assert_unreachable(&sidecar).await;
    assert_eq!(rutter.emulator.counters().requests, 0);
    assert!(rutter.emulator.seen().is_empty());
}
