//! Production operations in-process (DESIGN §2, §8): admin endpoints, metrics, Rutter's rate budget,
//! in-flight bound, and hardening found by adversarial review. Binary-level checks (signals, logs) are
//! in `tests/binary.rs`.

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::*;
use http::{Method, StatusCode};
use rutter_sidecar::config::RateLimit;
use rutter_sidecar::emulator::EmulatorOptions;

fn invoices() -> String {
    format!("/versioned/accounting/invoices?access_token={TOKEN}")
}

#[tokio::test]
async fn probes_answer_and_ready_turns_503_when_draining() {
    let rutter = start_emulator(emulator_options(50)).await;
    let sidecar = start_sidecar(config_for(rutter.addr)).await;
    let c = client();
    assert_eq!(
        send(&c, sidecar.admin_addr, Method::GET, "/live", &[], "")
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        send(&c, sidecar.admin_addr, Method::GET, "/ready", &[], "")
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        send(&c, sidecar.admin_addr, Method::GET, "/nope", &[], "")
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        send(&c, sidecar.admin_addr, Method::POST, "/ready", &[], "")
            .await
            .status,
        StatusCode::METHOD_NOT_ALLOWED
    );
    sidecar.sidecar.lifecycle.start_draining();
    assert_eq!(
        send(&c, sidecar.admin_addr, Method::GET, "/ready", &[], "")
            .await
            .status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        send(&c, sidecar.admin_addr, Method::GET, "/live", &[], "")
            .await
            .status,
        StatusCode::OK
    );
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|line| line.starts_with(series))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn metrics_follow_the_traffic() {
    let rutter = start_emulator(emulator_options(150)).await;
    let sidecar = start_sidecar(config_for(rutter.addr)).await;
    let c = client();
    let before = send(&c, sidecar.admin_addr, Method::GET, "/metrics", &[], "").await;
    assert_eq!(before.status, StatusCode::OK);
    assert!(before
        .header("content-type")
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let text = String::from_utf8(before.body.to_vec()).unwrap();
    assert_eq!(
        metric(
            &text,
            r#"rutter_sidecar_requests_total{class="facade",status="200"}"#
        ),
        0.0
    );

    let key = [("idempotency-key", "metrics-key")];
    assert_eq!(
        send(&c, sidecar.addr, Method::POST, &invoices(), &key, INVOICE)
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        send(&c, sidecar.addr, Method::POST, &invoices(), &key, INVOICE)
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        send(&c, sidecar.addr, Method::GET, &invoices(), &[], "")
            .await
            .status,
        StatusCode::OK
    );

    let after = send(&c, sidecar.admin_addr, Method::GET, "/metrics", &[], "").await;
    let text = String::from_utf8(after.body.to_vec()).unwrap();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        assert!(line.starts_with("rutter_sidecar_"), "{line}");
        assert!(
            !line.contains(TOKEN) && !line.contains("metrics-key"),
            "no secret or key in labels: {line}"
        );
    }
    assert_eq!(
        metric(
            &text,
            r#"rutter_sidecar_requests_total{class="facade",status="200"}"#
        ),
        2.0
    );
    assert_eq!(
        metric(
            &text,
            r#"rutter_sidecar_requests_total{class="passthrough",status="200"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            r#"rutter_sidecar_idempotency_total{result="replayed"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            r#"rutter_sidecar_upstream_calls_total{kind="write",status="200"}"#
        ),
        1.0
    );
    assert!(
        metric(
            &text,
            r#"rutter_sidecar_upstream_calls_total{kind="poll",status="200"}"#
        ) >= 1.0
    );
    assert_eq!(metric(&text, "rutter_sidecar_job_wait_seconds_count"), 1.0);
    assert_eq!(metric(&text, "rutter_sidecar_waiters "), 0.0);
    assert!(metric(&text, "rutter_sidecar_jobs_tracked ") >= 1.0);
}

#[tokio::test]
async fn writes_wait_for_rutters_budget_instead_of_drawing_429s() {
    // Rutter's organisation budget, scaled down from 500 per 10 s to 40 per second.
    let options = EmulatorOptions {
        rate_limit: 40,
        rate_window_ms: 1_000,
        ..emulator_options(50)
    };
    let rutter = start_emulator(options).await;
    let mut config = config_for(rutter.addr);
    config.upstream.rate_limit = RateLimit {
        requests: 40,
        per: Duration::from_secs(1),
    };
    let sidecar = start_sidecar(config).await;
    let c = client();
    let path = invoices();
    // 150 writes answered synchronously, plus a few that need polls: all share the one budget.
    let sync = (0..150).map(|_| {
        send(
            &c,
            sidecar.addr,
            Method::POST,
            &path,
            &[("x-emulator-sync", "1")],
            INVOICE,
        )
    });
    let polled = (0..5).map(|_| send(&c, sidecar.addr, Method::POST, &path, &[], INVOICE));
    let (sync, polled) = tokio::join!(
        futures_util::future::join_all(sync),
        futures_util::future::join_all(polled)
    );
    for reply in sync.iter().chain(polled.iter()) {
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "{:?}",
            String::from_utf8_lossy(&reply.body)
        );
    }
    assert_eq!(
        rutter.emulator.counters().rate_limited,
        0,
        "Rutter never had to say 429"
    );
    // And no one-second window at Rutter saw more than 40 requests.
    let mut at: Vec<_> = rutter.emulator.seen().into_iter().map(|r| r.at).collect();
    at.sort();
    for (i, start) in at.iter().enumerate() {
        let in_window = at[i..]
            .iter()
            .take_while(|t| t.duration_since(*start) < Duration::from_secs(1))
            .count();
        assert!(in_window <= 40, "{in_window} requests within one second");
    }
    assert!(sidecar.sidecar.metrics.rate_limit_waits.get() > 0);
}

#[tokio::test]
async fn upstream_exchanges_are_bounded_by_max_in_flight() {
    let rutter = start_emulator(emulator_options(50)).await;
    let mut config = config_for(rutter.addr);
    config.upstream.max_in_flight = 2;
    let sidecar = start_sidecar(config).await;
    let c = client();
    let path = invoices();
    let reads = (0..6).map(|_| {
        send(
            &c,
            sidecar.addr,
            Method::GET,
            &path,
            &[("x-emulator-delay-ms", "300")],
            "",
        )
    });
    let started = tokio::time::Instant::now();
    for reply in futures_util::future::join_all(reads).await {
        assert_eq!(reply.status, StatusCode::OK);
    }
    // Six 300 ms answers, two at a time: three rounds.
    assert!(
        started.elapsed() >= Duration::from_millis(850),
        "{:?}",
        started.elapsed()
    );
    let mut at: Vec<_> = rutter.emulator.seen().into_iter().map(|r| r.at).collect();
    at.sort();
    assert!(
        at[2].duration_since(at[0]) >= Duration::from_millis(250),
        "the third started after a slot freed"
    );
}

/// A fake Rutter: the first request is answered 429 with an absurd `Retry-After`, later ones with a
/// synchronously created invoice.
async fn rutter_with_absurd_retry_after() -> std::net::SocketAddr {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let calls = calls.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_request| {
                    let first = calls.fetch_add(1, Relaxed) == 0;
                    async move {
                        let response = if first {
                            http::Response::builder()
                                .status(429)
                                .header("retry-after", "18446744073709551615")
                                .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
                        } else {
                            http::Response::builder()
                                .header("x-rutter-job-id", "j-sync")
                                .header("content-type", "application/json")
                                .body(http_body_util::Full::new(bytes::Bytes::from_static(
                                    b"{\"invoice\":{}}",
                                )))
                        };
                        Ok::<_, std::convert::Infallible>(response.unwrap())
                    }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_huge_retry_after_on_a_write_neither_panics_nor_blocks_the_key() {
    let rutter = rutter_with_absurd_retry_after().await;
    let mut config = config_for(rutter);
    config.facade.max_wait = Duration::from_secs(3);
    // A 429 pauses the budget for at most one window.
    config.upstream.rate_limit = RateLimit {
        requests: 100,
        per: Duration::from_millis(500),
    };
    let sidecar = start_sidecar(config).await;
    let key = [("idempotency-key", "huge-retry-after")];
    let reply = send(
        &client(),
        sidecar.addr,
        Method::POST,
        &invoices(),
        &key,
        INVOICE,
    )
    .await;
    assert_eq!(
        reply.status,
        StatusCode::TOO_MANY_REQUESTS,
        "Rutter's 429 comes back: {:?}",
        reply.body
    );
    // The key is free again: the same request now succeeds.
    let reply = send(
        &client(),
        sidecar.addr,
        Method::POST,
        &invoices(),
        &key,
        INVOICE,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.header("idempotent-replayed").is_none());
}

#[tokio::test]
async fn a_generated_key_is_returned_on_errors_too() {
    let rutter = start_emulator(emulator_options(50)).await;
    let mut config = config_for(rutter.addr);
    config.facade.max_wait = Duration::from_millis(300);
    config.facade.on_timeout = rutter_sidecar::config::OnTimeout::GatewayTimeout;
    let sidecar = start_sidecar(config).await;
    let reply = send(
        &client(),
        sidecar.addr,
        Method::POST,
        &invoices(),
        &[("x-emulator-never-finish", "1")],
        INVOICE,
    )
    .await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    let key = reply
        .header("idempotency-key")
        .expect("the generated key")
        .to_string();
    // Retrying with it attaches to the same write instead of creating a second invoice.
    let again = send(
        &client(),
        sidecar.addr,
        Method::POST,
        &invoices(),
        &[("idempotency-key", &key), ("x-emulator-never-finish", "1")],
        INVOICE,
    )
    .await;
    assert_eq!(
        again.header("x-rutter-job-id"),
        reply.header("x-rutter-job-id")
    );
    assert_eq!(rutter.emulator.counters().write_requests, 1);
}

#[tokio::test]
async fn prefer_wait_zero_still_returns_the_job_id() {
    let rutter = start_emulator(emulator_options(5_000)).await;
    let sidecar = start_sidecar(config_for(rutter.addr)).await;
    let reply = send(
        &client(),
        sidecar.addr,
        Method::POST,
        &invoices(),
        &[("prefer", "wait=0")],
        INVOICE,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert!(reply.json()["async_response"]["id"].is_string());
    assert!(reply.header("x-rutter-job-id").is_some());
}

#[tokio::test]
async fn trace_and_connect_are_refused() {
    let rutter = start_emulator(emulator_options(50)).await;
    let sidecar = start_sidecar(config_for(rutter.addr)).await;
    let reply = send(&client(), sidecar.addr, Method::TRACE, &invoices(), &[], "").await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.header("x-sidecar-error"), Some("BAD_REQUEST"));
    assert_eq!(rutter.emulator.counters().requests, 0);
}

#[tokio::test]
async fn abandoned_jobs_make_room_for_new_waits_when_the_registry_is_full() {
    let rutter = start_emulator(emulator_options(50)).await;
    let mut config = config_for(rutter.addr);
    config.jobs.max_tracked = 3;
    let sidecar = start_sidecar(config).await;
    let c = client();
    // Three jobs that never end, each left behind by its app (Prefer: wait=0).
    for i in 0..3 {
        let key = format!("abandoned-{i}");
        let headers = [
            ("x-emulator-never-finish", "1"),
            ("prefer", "wait=0"),
            ("idempotency-key", key.as_str()),
        ];
        let reply = send(
            &c,
            sidecar.addr,
            Method::DELETE,
            &format!("/versioned/accounting/invoices/i{i}?access_token={TOKEN}"),
            &headers,
            "",
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    // A new write still gets its real answer.
    let reply = send(&c, sidecar.addr, Method::POST, &invoices(), &[], INVOICE).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["invoice"]["document_number"], "INV-10042");
    assert!(sidecar.sidecar.proxy.jobs().stats().evicted.load(Relaxed) >= 1);
}

#[tokio::test]
async fn a_delete_whose_app_leaves_during_the_write_is_still_followed() {
    let rutter = start_emulator(emulator_options(400)).await;
    let sidecar = start_sidecar(config_for(rutter.addr)).await;
    let addr = sidecar.addr;
    let path = format!("/versioned/accounting/invoices/inv-9?access_token={TOKEN}");
    // The write itself takes 300 ms to be answered; the app leaves after 100 ms.
    let request = tokio::spawn(async move {
        send(
            &client(),
            addr,
            Method::DELETE,
            &path,
            &[("x-emulator-delay-ms", "300")],
            "",
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    request.abort();
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let stats = sidecar.sidecar.proxy.jobs().stats();
    assert_eq!(
        stats.completed_by_poll.load(Relaxed),
        1,
        "the job was followed to its end"
    );
}
