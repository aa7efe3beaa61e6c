//! The synchronous facade end to end (DESIGN §3–§5, §8): app → sidecar → emulator over real sockets.

mod common;

use std::time::Duration;

use common::*;
use http::{Method, StatusCode};
use rutter_sidecar::config::{OnTimeout, ResponseModeIn};
use rutter_sidecar::routes::{RoutePattern, RouteTable};

fn invoices_path() -> String {
    format!("/versioned/accounting/invoices?access_token={TOKEN}")
}

#[tokio::test]
async fn a_write_that_outlasts_several_polls_returns_the_final_entity() {
    let rutter = start_emulator(emulator_options(600)).await;
    let sidecar = start_sidecar(config_for(rutter.addr)).await;

    let reply = send(
        &client(),
        sidecar.addr,
        Method::POST,
        &invoices_path(),
        &[("x-rutter-version", "2024-08-31")],
        INVOICE,
    )
    .await;

    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    let body = reply.json();
    assert!(
        body.get("async_response").is_none(),
        "the app must not see an async_response: {body}"
    );
    assert_eq!(body["invoice"]["document_number"], "INV-10042");
    assert_eq!(
        body["invoice"]["memo"],
        "Net 30 — café supplies (ünïcode kept)"
    );
    let job_id = reply
        .header("x-rutter-job-id")
        .expect("X-Rutter-Job-ID")
        .to_string();
    assert!(body["invoice"]["id"].is_string());
    assert!(reply.header("x-sidecar-error").is_none());
    assert!(reply.headers.get("content-length").is_some());

    // What Rutter saw: one write rewritten to async (query and body), then several polls of that job.
    let seen = rutter.emulator.seen();
    let writes: Vec<_> = seen.iter().filter(|r| r.method == Method::POST).collect();
    assert_eq!(writes.len(), 1);
    assert_eq!(
        writes[0].path_and_query,
        format!("{}&response_mode=async", invoices_path())
    );
    let sent: serde_json::Value = serde_json::from_slice(&writes[0].body).unwrap();
    assert_eq!(sent["response_mode"], "async");
    assert_eq!(
        sent["invoice"]["memo"],
        "Net 30 — café supplies (ünïcode kept)"
    );
    let job_polls: Vec<_> = seen
        .iter()
        .filter(|r| {
            r.method == Method::GET && r.path_and_query == format!("/versioned/jobs/{job_id}")
        })
        .collect();
    assert!(
        job_polls.len() >= 3,
        "a 600 ms job with 40–80 ms polls costs several polls, saw {}",
        job_polls.len()
    );
    assert!(job_polls
        .iter()
        .all(|p| p.headers.get("x-rutter-version").map(|v| v.as_bytes()) == Some(b"2024-08-31")));
}

#[tokio::test]
async fn response_mode_goes_where_configured() {
    let rutter = start_emulator(emulator_options(50)).await;
    for (modes, in_query, in_body) in [
        (
            ResponseModeIn {
                query: true,
                body: false,
            },
            true,
            false,
        ),
        (
            ResponseModeIn {
                query: false,
                body: true,
            },
            false,
            true,
        ),
        (
            ResponseModeIn {
                query: true,
                body: true,
            },
            true,
            true,
        ),
    ] {
        let mut config = config_for(rutter.addr);
        config.facade.response_mode_in = modes;
        let sidecar = start_sidecar(config).await;
        let path = format!(
            "/versioned/accounting/invoices?access_token={TOKEN}&response_mode=prefer_sync&x=1"
        );
        let reply = send(&client(), sidecar.addr, Method::POST, &path, &[], INVOICE).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert!(reply.json()["invoice"].is_object());
        let write = rutter
            .emulator
            .seen()
            .into_iter()
            .filter(|r| r.method == Method::POST)
            .last()
            .unwrap();
        let expected_query = if in_query {
            format!("/versioned/accounting/invoices?access_token={TOKEN}&response_mode=async&x=1")
        } else {
            path.clone()
        };
        assert_eq!(write.path_and_query, expected_query, "{modes:?}");
        let body: serde_json::Value = serde_json::from_slice(&write.body).unwrap();
        assert_eq!(body.get("response_mode").is_some(), in_body, "{modes:?}");
    }
}

#[tokio::test]
async fn a_non_json_body_gets_the_query_parameter_even_in_body_mode() {
    let rutter = start_emulator(emulator_options(50)).await;
    let mut config = config_for(rutter.addr);
    config.facade.response_mode_in = ResponseModeIn {
        query: false,
        body: true,
    };
    let sidecar = start_sidecar(config).await;
    let path = format!("/versioned/accounting/invoices/inv1/attachments?access_token={TOKEN}");
    let _ = send(
        &client(),
        sidecar.addr,
        Method::POST,
        &path,
        &[("content-type", "application/octet-stream")],
        "raw-bytes",
    )
    .await;
    let write = rutter
        .emulator
        .seen()
        .into_iter()
        .find(|r| r.method == Method::POST)
        .unwrap();
    assert_eq!(write.path_and_query, format!("{path}&response_mode=async"));
    assert_eq!(&write.body[..], b"raw-bytes");
}

#[tokio::test]
async fn a_failing_job_returns_its_status_and_rutters_error_body() {
    let rutter = start_emulator(emulator_options(200)).await;
    let sidecar = start_sidecar(config_for(rutter.addr)).await;
    let reply = send(
        &client(),
        sidecar.addr,
        Method::POST,
        &invoices_path(),
        &[],
        BAD_INVOICE,
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    let body = reply.json();
    assert_eq!(body["error_type"], "INVALID_REQUEST");
    assert_eq!(body["error_code"], "INVALID_INPUT");
    assert!(
        reply.header("x-sidecar-error").is_none(),
        "Rutter's error, not the sidecar's"
    );
    assert!(reply.header("x-rutter-job-id").is_some());
}

#[tokio::test]
async fn explicit_async_requests_pass_through_untouched_and_are_not_awaited() {
    let rutter = start_emulator(emulator_options(5_000)).await;
    let sidecar = start_sidecar(config_for(rutter.addr)).await;
    let client = client();
    let query_async =
        format!("/versioned/accounting/invoices?access_token={TOKEN}&response_mode=async");
    let body_async = r#"{"response_mode":"async","invoice":{"customer_id":"c1"}}"#;
    let cases = [
        (query_async.as_str(), INVOICE),
        (&invoices_path(), body_async),
    ];
    for (path, body) in cases {
        let reply = send(&client, sidecar.addr, Method::POST, path, &[], body).await;
        assert_eq!(reply.status, StatusCode::OK);
        let json = reply.json();
        assert!(json["async_response"]["id"].is_string(), "{json}");
        let write = rutter
            .emulator
            .seen()
            .into_iter()
            .filter(|r| r.method == Method::POST)
            .last()
            .unwrap();
        assert_eq!(write.path_and_query, path, "the query is untouched");
        assert_eq!(&write.body[..], body.as_bytes(), "the body is untouched");
    }
    assert_eq!(
        polls(&rutter.emulator),
        0,
        "explicit async is never awaited"
    );
}

#[tokio::test]
async fn prefer_respond_async_gets_rutters_async_response_at_once() {
    let rutter = start_emulator(emulator_options(5_000)).await;
    let sidecar = start_sidecar(config_for(rutter.addr)).await;
    let reply = send(
        &client(),
        sidecar.addr,
        Method::POST,
        &invoices_path(),
        &[("prefer", "respond-async")],
        INVOICE,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let job_id = reply.json()["async_response"]["id"]
        .as_str()
        .expect("an async_response")
        .to_string();
    assert_eq!(reply.header("x-rutter-job-id"), Some(job_id.as_str()));
    assert!(
        reply.elapsed < std::time::Duration::from_secs(4),
        "not held until the 5 s job ended"
    );
    let write = rutter
        .emulator
        .seen()
        .into_iter()
        .find(|r| r.method == Method::POST)
        .unwrap();
    assert_eq!(
        write.path_and_query,
        format!("{}&response_mode=async", invoices_path()),
        "Rutter was asked for async mode"
    );
    assert_eq!(polls(&rutter.emulator), 0, "and the sidecar does not wait");
    // On a route that is not async-capable the preference is forwarded untouched.
    let list = format!("/versioned/accounting/invoices?access_token={TOKEN}");
    let reply = send(
        &client(),
        sidecar.addr,
        Method::GET,
        &list,
        &[("prefer", "respond-async")],
        "",
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let read = rutter.emulator.seen().into_iter().last().unwrap();
    assert_eq!(read.path_and_query, list);
    assert_eq!(read.headers["prefer"], "respond-async");
}

#[tokio::test]
async fn a_prefer_sync_passthrough_write_that_comes_back_async_is_resolved() {
    // Rutter's prefer_sync gives up (here after 100 ms instead of 30 s) and answers async_response.
    let rutter = start_emulator(rutter_sidecar::emulator::EmulatorOptions {
        sync_limit_ms: 100,
        ..emulator_options(500)
    })
    .await;
    let mut config = config_for(rutter.addr);
    // Invoices are not in this sidecar's facade routes: the write is passthrough.
    config.facade.routes =
        RouteTable::new(vec![RoutePattern::parse("POST /accounting/bills").unwrap()]);
    let sidecar = start_sidecar(config).await;
    let reply = send(
        &client(),
        sidecar.addr,
        Method::POST,
        &invoices_path(),
        &[],
        INVOICE,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["invoice"]["document_number"], "INV-10042");
    assert!(reply.header("x-rutter-job-id").is_some());
    let write = rutter
        .emulator
        .seen()
        .into_iter()
        .find(|r| r.method == Method::POST)
        .unwrap();
    assert_eq!(
        write.path_and_query,
        invoices_path(),
        "passthrough is not rewritten"
    );
    assert!(polls(&rutter.emulator) >= 1);
}

#[tokio::test]
async fn the_deadline_answers_with_the_async_response_or_a_504() {
    let rutter = start_emulator(emulator_options(50)).await;
    for on_timeout in [OnTimeout::AsyncResponse, OnTimeout::GatewayTimeout] {
        let mut config = config_for(rutter.addr);
        config.facade.max_wait = Duration::from_millis(300);
        config.facade.on_timeout = on_timeout;
        let sidecar = start_sidecar(config).await;
        let reply = send(
            &client(),
            sidecar.addr,
            Method::POST,
            &invoices_path(),
            &[("x-emulator-never-finish", "1")],
            INVOICE,
        )
        .await;
        let job_id = reply
            .header("x-rutter-job-id")
            .expect("the app always learns the job id")
            .to_string();
        match on_timeout {
            OnTimeout::AsyncResponse => {
                assert_eq!(reply.status, StatusCode::OK);
                assert_eq!(reply.json()["async_response"]["id"], job_id.as_str());
                assert!(reply.header("x-sidecar-error").is_none());
            }
            OnTimeout::GatewayTimeout => {
                assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
                assert_eq!(reply.header("x-sidecar-error"), Some("JOB_WAIT_TIMEOUT"));
                let body = reply.json();
                assert_eq!(body["error_type"], "PROXY_ERROR");
                assert!(body["error_message"].as_str().unwrap().contains(&job_id));
            }
        }
        assert!(reply.elapsed >= Duration::from_millis(300));
    }
}

#[tokio::test]
async fn prefer_wait_shortens_the_deadline() {
    let rutter = start_emulator(emulator_options(50)).await;
    let sidecar = start_sidecar(config_for(rutter.addr)).await; // max_wait 20 s
    let reply = send(
        &client(),
        sidecar.addr,
        Method::POST,
        &invoices_path(),
        &[("x-emulator-never-finish", "1"), ("prefer", "wait=1")],
        INVOICE,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(
        reply.json()["async_response"].is_object(),
        "answered at the 1 s deadline, not after 20 s"
    );
    assert!(reply.elapsed >= Duration::from_secs(1));
}

#[tokio::test]
async fn query_strings_arrive_byte_identical() {
    let rutter = start_emulator(emulator_options(50)).await;
    let sidecar = start_sidecar(config_for(rutter.addr)).await;
    let query = format!("access_token={TOKEN}&q=a+b&r=a%2Bb&s=a%20b&k=1&k=2&e=&f&u=%C3%BC&k=3");
    let list = format!("/versioned/accounting/invoices?{query}");
    let _ = send(&client(), sidecar.addr, Method::GET, &list, &[], "").await;
    let write = format!("/versioned/accounting/invoices?{query}");
    let _ = send(&client(), sidecar.addr, Method::POST, &write, &[], INVOICE).await;
    let seen = rutter.emulator.seen();
    assert_eq!(seen[0].path_and_query, list);
    assert_eq!(
        seen[1].path_and_query,
        format!("{write}&response_mode=async")
    );
}

#[tokio::test]
async fn host_and_hop_by_hop_rules_hold_on_requests() {
    let rutter = start_emulator(emulator_options(50)).await;
    let sidecar = start_sidecar(config_for(rutter.addr)).await;
    let path = format!("/versioned/accounting/invoices?access_token={TOKEN}");
    let headers = [
        ("connection", "keep-alive, x-hop-secret"),
        ("x-hop-secret", "must-not-pass"),
        ("keep-alive", "timeout=5"),
        ("te", "trailers"),
        ("proxy-authorization", "Basic cHJveHk6cHJveHk="),
        ("authorization", "Basic YXBwOnNlY3JldA=="),
        ("x-rutter-version", "2024-08-31"),
        ("x-custom", "kept"),
        ("accept-encoding", "identity"),
    ];
    let reply = send(&client(), sidecar.addr, Method::GET, &path, &headers, "").await;
    assert_eq!(reply.status, StatusCode::OK);
    let via = reply.header("via").unwrap_or_default();
    assert!(via.contains("rutter-sidecar"), "{via}");
    assert!(
        reply.header("x-rutter-request-id").is_some(),
        "Rutter's request id comes back"
    );

    let seen = rutter.emulator.seen().into_iter().next().unwrap();
    let h = &seen.headers;
    assert_eq!(h["host"], rutter.addr.to_string().as_str());
    for gone in ["x-hop-secret", "keep-alive", "te", "proxy-authorization"] {
        assert!(h.get(gone).is_none(), "{gone} must not reach Rutter");
    }
    assert_ne!(
        h.get("connection").map(|v| v.as_bytes()),
        Some(&b"keep-alive, x-hop-secret"[..])
    );
    assert_eq!(h["authorization"], "Basic YXBwOnNlY3JldA==");
    assert_eq!(h["x-rutter-version"], "2024-08-31");
    assert_eq!(h["x-custom"], "kept");
    assert_eq!(h["accept-encoding"], "identity");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert!(h["via"].to_str().unwrap().ends_with("1.1 rutter-sidecar"));
}

#[tokio::test]
async fn a_large_list_streams_through_unchanged() {
    let rutter = start_emulator(emulator_options(50)).await;
    let sidecar = start_sidecar(config_for(rutter.addr)).await;
    let path = format!("/versioned/accounting/invoices?access_token={TOKEN}&limit=500");
    let pad = [("x-emulator-body-bytes", "8388608")];
    let direct = send(&client(), rutter.addr, Method::GET, &path, &pad, "").await;
    let proxied = send(&client(), sidecar.addr, Method::GET, &path, &pad, "").await;
    assert_eq!(direct.status, StatusCode::OK);
    assert!(direct.body.len() >= 8 * 1024 * 1024);
    assert_eq!(proxied.status, StatusCode::OK);
    assert!(
        proxied.body == direct.body,
        "the body crosses the sidecar byte for byte"
    );
}

#[tokio::test]
async fn rate_limited_polls_slow_down_and_still_end_in_the_answer() {
    let rutter = start_emulator(emulator_options(300)).await;
    let sidecar = start_sidecar(config_for(rutter.addr)).await;
    let headers = [
        ("x-emulator-poll-faults", "429,429"),
        ("x-emulator-poll-retry-after", "1"),
    ];
    let reply = send(
        &client(),
        sidecar.addr,
        Method::POST,
        &invoices_path(),
        &headers,
        INVOICE,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["invoice"]["document_number"], "INV-10042");
    let polls: Vec<_> = rutter
        .emulator
        .seen()
        .into_iter()
        .filter(|r| r.path_and_query.contains("/jobs/"))
        .collect();
    assert!(polls.len() >= 3);
    // Each 429 carried Retry-After: 1, so the next poll came at least a second later.
    for pair in polls.windows(2).take(2) {
        let gap = pair[1].at.duration_since(pair[0].at);
        assert!(
            gap >= Duration::from_millis(950),
            "poll gap after a 429 was {gap:?}"
        );
    }
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_502_sidecar_error() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let sidecar = start_sidecar(config_for(addr)).await;
    for method in [Method::GET, Method::POST] {
        let reply = send(
            &client(),
            sidecar.addr,
            method,
            &invoices_path(),
            &[],
            INVOICE,
        )
        .await;
        assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
        assert_eq!(
            reply.header("x-sidecar-error"),
            Some("UPSTREAM_UNAVAILABLE")
        );
        let body = reply.json();
        assert_eq!(body["error_type"], "PROXY_ERROR");
        assert_eq!(body["error_code"], "UPSTREAM_UNAVAILABLE");
    }
}

#[tokio::test]
async fn a_job_that_disappears_is_a_502_job_not_found() {
    let rutter = start_emulator(emulator_options(500)).await;
    let sidecar = start_sidecar(config_for(rutter.addr)).await;
    let reply = send(
        &client(),
        sidecar.addr,
        Method::POST,
        &invoices_path(),
        &[("x-emulator-poll-faults", "404")],
        INVOICE,
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(reply.header("x-sidecar-error"), Some("JOB_NOT_FOUND"));
    assert!(reply.header("x-rutter-job-id").is_some());
}

#[tokio::test]
async fn a_job_without_a_response_is_a_502_job_result_invalid() {
    let rutter = start_emulator(emulator_options(100)).await;
    let sidecar = start_sidecar(config_for(rutter.addr)).await;
    let reply = send(
        &client(),
        sidecar.addr,
        Method::POST,
        &invoices_path(),
        &[("x-emulator-bad-job", "no-response")],
        INVOICE,
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(reply.header("x-sidecar-error"), Some("JOB_RESULT_INVALID"));
}

#[tokio::test]
async fn a_body_over_max_body_is_a_413() {
    let rutter = start_emulator(emulator_options(50)).await;
    let mut config = config_for(rutter.addr);
    config.facade.max_body = 1024;
    let sidecar = start_sidecar(config).await;
    let big = format!(
        r#"{{"invoice":{{"customer_id":"c","memo":"{}"}}}}"#,
        "x".repeat(4096)
    );
    let reply = send(
        &client(),
        sidecar.addr,
        Method::POST,
        &invoices_path(),
        &[],
        &big,
    )
    .await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(reply.header("x-sidecar-error"), Some("BODY_TOO_LARGE"));
    assert!(rutter.emulator.seen().is_empty(), "nothing reached Rutter");
}

#[tokio::test]
async fn a_synchronous_upstream_answer_goes_straight_back() {
    let rutter = start_emulator(emulator_options(5_000)).await;
    let sidecar = start_sidecar(config_for(rutter.addr)).await;
    let reply = send(
        &client(),
        sidecar.addr,
        Method::POST,
        &invoices_path(),
        &[("x-emulator-sync", "1")],
        INVOICE,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.json()["invoice"].is_object());
    assert_eq!(polls(&rutter.emulator), 0);
}

#[tokio::test]
async fn two_apps_waiting_on_one_job_cause_one_poll_sequence() {
    let rutter = start_emulator(emulator_options(500)).await;
    let mut config = config_for(rutter.addr);
    config.facade.poll_initial = Duration::from_millis(50);
    config.facade.poll_max = Duration::from_millis(50);
    let sidecar = start_sidecar(config).await;
    // The same Idempotency-Key makes Rutter answer both writes with the same job.
    let headers = [("idempotency-key", "5f2b8a40-6c1d-4e8b-9a7f-0c3d2e1b4a59")];
    let c = client();
    let path = invoices_path();
    let (a, b) = tokio::join!(
        send(&c, sidecar.addr, Method::POST, &path, &headers, INVOICE),
        send(&c, sidecar.addr, Method::POST, &path, &headers, INVOICE),
    );
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(b.status, StatusCode::OK);
    assert_eq!(a.header("x-rutter-job-id"), b.header("x-rutter-job-id"));
    assert_eq!(a.body, b.body);
    let stats = sidecar.sidecar.proxy.jobs().stats();
    assert_eq!(
        stats
            .trackers_created
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // A 500 ms job polled every 50 ms: about 10 polls for one waiter, and the same for two.
    let polls = polls(&rutter.emulator);
    assert!((5..=13).contains(&polls), "{polls} polls");
}

#[tokio::test]
async fn an_app_that_disconnects_does_not_stop_the_jobs_tracking() {
    let rutter = start_emulator(emulator_options(600)).await;
    let sidecar = start_sidecar(config_for(rutter.addr)).await;
    let addr = sidecar.addr;
    let request = tokio::spawn(async move {
        send(
            &client(),
            addr,
            Method::POST,
            &invoices_path(),
            &[],
            INVOICE,
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    request.abort();
    let _ = request.await;
    let polls_at_disconnect = polls(&rutter.emulator);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        sidecar.sidecar.metrics.waiters.get(),
        0,
        "nobody waits for an app that left, though the job is still followed"
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        polls(&rutter.emulator) > polls_at_disconnect,
        "polling went on after the app left"
    );
    let stats = sidecar.sidecar.proxy.jobs().stats();
    assert_eq!(
        stats
            .completed_by_poll
            .load(std::sync::atomic::Ordering::Relaxed),
        1,
        "the job was followed to its end"
    );
}

#[tokio::test]
async fn http2_cleartext_apps_are_served() {
    let rutter = start_emulator(emulator_options(200)).await;
    let sidecar = start_sidecar(config_for(rutter.addr)).await;
    let reply = send(
        &h2_client(),
        sidecar.addr,
        Method::POST,
        &invoices_path(),
        &[],
        INVOICE,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["invoice"]["document_number"], "INV-10042");
    let write = rutter
        .emulator
        .seen()
        .into_iter()
        .find(|r| r.method == Method::POST)
        .unwrap();
    assert!(write.headers["via"]
        .to_str()
        .unwrap()
        .contains("2 rutter-sidecar"));
}

#[tokio::test]
async fn hop_by_hop_response_headers_are_dropped() {
    use bytes::Bytes;
    use http_body_util::Full;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;

    // A fake Rutter that answers with hop-by-hop fields of its own.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = service_fn(|_request| async {
                    let response = http::Response::builder()
                        .header("connection", "x-up-hop")
                        .header("x-up-hop", "1")
                        .header("keep-alive", "timeout=5")
                        .header("proxy-authenticate", "Basic")
                        .header("x-rutter-request-id", "rid-1")
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from_static(b"{\"accounts\":[]}")))
                        .unwrap();
                    Ok::<_, std::convert::Infallible>(response)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    let sidecar = start_sidecar(config_for(addr)).await;
    let reply = send(
        &client(),
        sidecar.addr,
        Method::GET,
        "/versioned/accounting/accounts",
        &[],
        "",
    )
    .await;
    server.abort();
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(&reply.body[..], b"{\"accounts\":[]}");
    for gone in ["x-up-hop", "keep-alive", "proxy-authenticate"] {
        assert!(
            reply.headers.get(gone).is_none(),
            "{gone} must not reach the app"
        );
    }
    assert_eq!(reply.header("x-rutter-request-id"), Some("rid-1"));
    assert_eq!(reply.header("via"), Some("1.1 rutter-sidecar"));
}

/// The protocol is chosen by peeking at the first bytes: an HTTP/2 preface that arrives in pieces
/// (here split by a relay, 50 ms apart) is still recognised, and HTTP/1.1 on the same listener
/// still works.
#[tokio::test]
async fn a_preface_arriving_in_pieces_is_still_http2() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rutter = start_emulator(emulator_options(50)).await;
    let sidecar = start_sidecar(config_for(rutter.addr)).await;
    let relay = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = relay.local_addr().unwrap();
    let target = sidecar.addr;
    let relay_task = tokio::spawn(async move {
        let (mut app, _) = relay.accept().await.unwrap();
        let mut upstream = tokio::net::TcpStream::connect(target).await.unwrap();
        let mut first = [0u8; 24];
        app.read_exact(&mut first).await.unwrap();
        assert_eq!(&first[..], b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        for piece in [&first[..5], &first[5..17], &first[17..]] {
            upstream.write_all(piece).await.unwrap();
            upstream.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = tokio::io::copy_bidirectional(&mut app, &mut upstream).await;
    });
    let reply = send(
        &h2_client(),
        relay_addr,
        Method::GET,
        &format!("/versioned/accounting/accounts?access_token={TOKEN}"),
        &[],
        "",
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let seen = rutter.emulator.seen();
    let read = seen.iter().find(|r| r.method == Method::GET).unwrap();
    assert!(read.headers["via"]
        .to_str()
        .unwrap()
        .contains("2 rutter-sidecar"));
    relay_task.abort();
    // HTTP/1.1 on the same listener.
    let reply = send(
        &client(),
        sidecar.addr,
        Method::GET,
        &format!("/versioned/accounting/accounts?access_token={TOKEN}"),
        &[],
        "",
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
}
