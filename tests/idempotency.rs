//! Idempotency (DESIGN §6): one upstream write per key, coalesced waits, replays, conflicts, retries.

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::*;
use http::{Method, StatusCode};
use rutter_sidecar::emulator::EmulatorOptions;

fn invoices(token: &str) -> String {
    format!("/versioned/accounting/invoices?access_token={token}")
}

const KEY: &str = "5f2b8a40-6c1d-4e8b-9a7f-0c3d2e1b4a59";

#[tokio::test]
async fn a_hundred_concurrent_duplicates_cost_one_write() {
    let rutter = start_emulator(emulator_options(400)).await;
    let sidecar = start_sidecar(config_for(rutter.addr)).await;
    let client = client();
    let path = invoices(TOKEN);
    let requests = (0..100).map(|_| {
        send(
            &client,
            sidecar.addr,
            Method::POST,
            &path,
            &[("idempotency-key", KEY)],
            INVOICE,
        )
    });
    let replies = futures_util::future::join_all(requests).await;
    let first = &replies[0];
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.json()["invoice"]["document_number"], "INV-10042");
    for reply in &replies {
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(
            reply.body, first.body,
            "every duplicate gets the same bytes"
        );
        assert_eq!(
            reply.header("x-rutter-job-id"),
            first.header("x-rutter-job-id")
        );
    }
    let counters = rutter.emulator.counters();
    assert_eq!(
        counters.write_requests, 1,
        "exactly one write reached Rutter"
    );
    assert_eq!(counters.jobs_created, 1);
    let stats = sidecar.sidecar.proxy.idempotency().stats();
    assert_eq!(
        stats.coalesced.load(Relaxed) + stats.replays.load(Relaxed),
        99
    );
}

#[tokio::test]
async fn the_first_app_leaving_mid_wait_does_not_cause_a_second_write() {
    let rutter = start_emulator(emulator_options(600)).await;
    let sidecar = start_sidecar(config_for(rutter.addr)).await;
    let addr = sidecar.addr;
    let first = tokio::spawn(async move {
        send(
            &client(),
            addr,
            Method::POST,
            &invoices(TOKEN),
            &[("idempotency-key", KEY)],
            INVOICE,
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    first.abort();
    let _ = first.await;
    let client = client();
    let path = invoices(TOKEN);
    let requests = (0..99).map(|_| {
        send(
            &client,
            addr,
            Method::POST,
            &path,
            &[("idempotency-key", KEY)],
            INVOICE,
        )
    });
    let replies = futures_util::future::join_all(requests).await;
    for reply in &replies {
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.body, replies[0].body);
    }
    assert_eq!(rutter.emulator.counters().write_requests, 1);
}

#[tokio::test]
async fn a_finished_write_is_replayed_without_calling_rutter() {
    let rutter = start_emulator(emulator_options(150)).await;
    let sidecar = start_sidecar(config_for(rutter.addr)).await;
    let headers = [("idempotency-key", KEY)];
    let first = send(
        &client(),
        sidecar.addr,
        Method::POST,
        &invoices(TOKEN),
        &headers,
        INVOICE,
    )
    .await;
    assert_eq!(first.status, StatusCode::OK);
    assert!(first.header("idempotent-replayed").is_none());
    let calls = rutter.emulator.counters().requests;
    // Same request, JSON members in another order and an explicit prefer_sync: still the same request.
    let reordered = r#"{"response_mode":"prefer_sync","invoice":{"line_items":[{"description":"Espresso beans, 5 kg","quantity":2,"unit_amount":84.5,"total_amount":169.0}],"memo":"Net 30 — café supplies (ünïcode kept)","document_number":"INV-10042","currency_code":"USD","issue_date":"2026-11-30T00:00:00.000Z","customer_id":"8b3e6c0e-2f4a-4a4e-9a43-5d0c7b1f9e21"}}"#;
    let replay = send(
        &client(),
        sidecar.addr,
        Method::POST,
        &invoices(TOKEN),
        &headers,
        reordered,
    )
    .await;
    assert_eq!(replay.status, StatusCode::OK);
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(replay.body, first.body);
    assert_eq!(
        replay.header("x-rutter-job-id"),
        first.header("x-rutter-job-id")
    );
    assert_eq!(
        rutter.emulator.counters().requests,
        calls,
        "the replay cost no upstream call"
    );
}

#[tokio::test]
async fn a_failed_job_result_is_replayed_too() {
    let rutter = start_emulator(emulator_options(100)).await;
    let sidecar = start_sidecar(config_for(rutter.addr)).await;
    let headers = [("idempotency-key", "bad-invoice-1")];
    let first = send(
        &client(),
        sidecar.addr,
        Method::POST,
        &invoices(TOKEN),
        &headers,
        BAD_INVOICE,
    )
    .await;
    assert_eq!(first.status, StatusCode::BAD_REQUEST);
    let again = send(
        &client(),
        sidecar.addr,
        Method::POST,
        &invoices(TOKEN),
        &headers,
        BAD_INVOICE,
    )
    .await;
    assert_eq!(again.status, StatusCode::BAD_REQUEST);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.body, first.body);
    assert_eq!(rutter.emulator.counters().write_requests, 1);
}

#[tokio::test]
async fn a_key_reused_with_another_body_is_a_409_in_flight_and_after() {
    let rutter = start_emulator(emulator_options(400)).await;
    let sidecar = start_sidecar(config_for(rutter.addr)).await;
    let client = client();
    let headers = [("idempotency-key", KEY)];
    let other = INVOICE.replace("INV-10042", "INV-99999");
    let path = invoices(TOKEN);
    let original = send(
        &client,
        sidecar.addr,
        Method::POST,
        &path,
        &headers,
        INVOICE,
    );
    let conflicting = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        send(&client, sidecar.addr, Method::POST, &path, &headers, &other).await
    };
    let (original, in_flight) = tokio::join!(original, conflicting);
    assert_eq!(original.status, StatusCode::OK);
    for reply in [
        in_flight,
        send(&client, sidecar.addr, Method::POST, &path, &headers, &other).await,
    ] {
        assert_eq!(reply.status, StatusCode::CONFLICT);
        assert_eq!(
            reply.header("x-sidecar-error"),
            Some("IDEMPOTENCY_KEY_REUSED")
        );
        assert_eq!(reply.json()["error_code"], "IDEMPOTENCY_KEY_REUSED");
        assert_eq!(reply.json()["error_type"], "PROXY_ERROR");
    }
    assert_eq!(rutter.emulator.counters().write_requests, 1);
    assert_eq!(
        sidecar
            .sidecar
            .proxy
            .idempotency()
            .stats()
            .conflicts
            .load(Relaxed),
        2
    );
}

#[tokio::test]
async fn the_same_key_under_two_tenants_makes_two_writes() {
    let rutter = start_emulator(emulator_options(100)).await;
    let sidecar = start_sidecar(config_for(rutter.addr)).await;
    let headers = [("idempotency-key", KEY)];
    let other_token = "00000000-0000-4000-8000-000000000002";
    let a = send(
        &client(),
        sidecar.addr,
        Method::POST,
        &invoices(TOKEN),
        &headers,
        INVOICE,
    )
    .await;
    let b = send(
        &client(),
        sidecar.addr,
        Method::POST,
        &invoices(other_token),
        &headers,
        INVOICE,
    )
    .await;
    assert_eq!((a.status, b.status), (StatusCode::OK, StatusCode::OK));
    assert!(b.header("idempotent-replayed").is_none());
    assert_ne!(a.header("x-rutter-job-id"), b.header("x-rutter-job-id"));
    // Another Authorization is another tenant too.
    let c = send(
        &client(),
        sidecar.addr,
        Method::POST,
        &invoices(TOKEN),
        &[
            ("idempotency-key", KEY),
            ("authorization", "Basic b3RoZXI6b3JnLXNlY3JldA=="),
        ],
        INVOICE,
    )
    .await;
    assert!(c.header("idempotent-replayed").is_none());
    assert_eq!(rutter.emulator.counters().write_requests, 3);
}

#[tokio::test]
async fn a_rate_limited_write_is_retried_and_the_app_sees_only_the_success() {
    // A budget of 1 request per second: a read spends it, so the write is answered 429 first.
    let options = EmulatorOptions {
        rate_limit: 1,
        rate_window_ms: 1_000,
        ..emulator_options(100)
    };
    let rutter = start_emulator(options).await;
    let sidecar = start_sidecar(config_for(rutter.addr)).await;
    let _ = send(
        &client(),
        rutter.addr,
        Method::GET,
        &invoices(TOKEN),
        &[],
        "",
    )
    .await;
    let reply = send(
        &client(),
        sidecar.addr,
        Method::POST,
        &invoices(TOKEN),
        &[("idempotency-key", KEY)],
        INVOICE,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(reply.json()["invoice"]["document_number"], "INV-10042");
    let counters = rutter.emulator.counters();
    assert!(
        counters.rate_limited >= 1,
        "Rutter did answer 429 at least once"
    );
    assert_eq!(counters.writes_accepted, 1, "one job");
    assert!(
        counters.write_requests >= 2,
        "the write was sent again after the 429"
    );
}

#[tokio::test]
async fn a_5xx_without_a_key_is_not_retried_but_with_a_key_it_is() {
    let rutter = start_emulator(emulator_options(100)).await;
    let mut config = config_for(rutter.addr);
    config.idempotency.generate_missing_keys = false;
    config.facade.max_wait = Duration::from_secs(3);
    let sidecar = start_sidecar(config).await;
    let reply = send(
        &client(),
        sidecar.addr,
        Method::POST,
        &invoices(TOKEN),
        &[("x-emulator-status", "503")],
        INVOICE,
    )
    .await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        reply.header("x-sidecar-error").is_none(),
        "Rutter's own 503 passes through"
    );
    assert_eq!(
        rutter.emulator.counters().write_requests,
        1,
        "no retry without a key"
    );

    let reply = send(
        &client(),
        sidecar.addr,
        Method::POST,
        &invoices(TOKEN),
        &[("x-emulator-status", "503"), ("idempotency-key", KEY)],
        INVOICE,
    )
    .await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        rutter.emulator.counters().write_requests >= 3,
        "retried with a key"
    );
    // A failed attempt is not stored: the key is free for a retry that now succeeds.
    let reply = send(
        &client(),
        sidecar.addr,
        Method::POST,
        &invoices(TOKEN),
        &[("idempotency-key", KEY)],
        INVOICE,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.header("idempotent-replayed").is_none());
}

#[tokio::test]
async fn entries_expire_after_the_ttl() {
    let rutter = start_emulator(emulator_options(50)).await;
    let mut config = config_for(rutter.addr);
    config.idempotency.ttl = Duration::from_millis(300);
    let sidecar = start_sidecar(config).await;
    let headers = [("idempotency-key", KEY)];
    let _ = send(
        &client(),
        sidecar.addr,
        Method::POST,
        &invoices(TOKEN),
        &headers,
        INVOICE,
    )
    .await;
    let replay = send(
        &client(),
        sidecar.addr,
        Method::POST,
        &invoices(TOKEN),
        &headers,
        INVOICE,
    )
    .await;
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = send(
        &client(),
        sidecar.addr,
        Method::POST,
        &invoices(TOKEN),
        &headers,
        INVOICE,
    )
    .await;
    assert!(
        after.header("idempotent-replayed").is_none(),
        "expired: sent to Rutter again"
    );
    assert_eq!(rutter.emulator.counters().write_requests, 2);
}

#[tokio::test]
async fn the_cache_stays_bounded_under_thousands_of_keys() {
    let rutter = start_emulator(emulator_options(0)).await;
    let mut config = config_for(rutter.addr);
    config.idempotency.max_bytes = 16 * 1024;
    let sidecar = start_sidecar(config).await;
    let client = client();
    let path = invoices(TOKEN);
    for batch in 0..40 {
        let requests = (0..50).map(|i| {
            let key = format!("key-{batch}-{i}");
            let client = &client;
            let path = &path;
            async move {
                send(
                    client,
                    sidecar.addr,
                    Method::POST,
                    path,
                    &[("idempotency-key", &key), ("x-emulator-sync", "1")],
                    INVOICE,
                )
                .await
            }
        });
        for reply in futures_util::future::join_all(requests).await {
            assert_eq!(reply.status, StatusCode::OK);
        }
    }
    let store = sidecar.sidecar.proxy.idempotency();
    assert!(
        store.weighted_size() <= 16 * 1024,
        "{} bytes",
        store.weighted_size()
    );
    assert!(
        store.entry_count() < 2_000,
        "{} entries",
        store.entry_count()
    );
    assert_eq!(rutter.emulator.counters().write_requests, 2_000);
}

#[tokio::test]
async fn an_invalid_key_is_a_400_and_nothing_is_sent() {
    let rutter = start_emulator(emulator_options(50)).await;
    let sidecar = start_sidecar(config_for(rutter.addr)).await;
    let long = "k".repeat(256);
    for key in ["has space", long.as_str(), ""] {
        let reply = send(
            &client(),
            sidecar.addr,
            Method::POST,
            &invoices(TOKEN),
            &[("idempotency-key", key)],
            INVOICE,
        )
        .await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{key:?}");
        assert_eq!(
            reply.header("x-sidecar-error"),
            Some("IDEMPOTENCY_KEY_INVALID")
        );
    }
    assert_eq!(rutter.emulator.counters().requests, 0);
}

#[tokio::test]
async fn a_missing_key_is_generated_sent_upstream_and_returned() {
    let rutter = start_emulator(emulator_options(50)).await;
    let sidecar = start_sidecar(config_for(rutter.addr)).await;
    let reply = send(
        &client(),
        sidecar.addr,
        Method::POST,
        &invoices(TOKEN),
        &[],
        INVOICE,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let key = reply
        .header("idempotency-key")
        .expect("the generated key comes back")
        .to_string();
    assert!(
        uuid::Uuid::parse_str(&key).is_ok_and(|u| u.get_version_num() == 4),
        "{key}"
    );
    let write = rutter
        .emulator
        .seen()
        .into_iter()
        .find(|r| r.method == Method::POST)
        .unwrap();
    assert_eq!(write.headers["idempotency-key"], key.as_str());
    // DELETE is idempotent by design: no key is generated.
    let delete = format!("/versioned/accounting/invoices/inv-1?access_token={TOKEN}");
    let reply = send(&client(), sidecar.addr, Method::DELETE, &delete, &[], "").await;
    assert!(reply.header("idempotency-key").is_none());
}

#[tokio::test]
async fn rutters_own_409_for_a_reused_key_passes_straight_back() {
    let rutter = start_emulator(emulator_options(50)).await;
    // Two sidecars share one Rutter: the second does not know the key, Rutter does.
    let first = start_sidecar(config_for(rutter.addr)).await;
    let second = start_sidecar(config_for(rutter.addr)).await;
    let headers = [("idempotency-key", KEY)];
    let ok = send(
        &client(),
        first.addr,
        Method::POST,
        &invoices(TOKEN),
        &headers,
        INVOICE,
    )
    .await;
    assert_eq!(ok.status, StatusCode::OK);
    let other = INVOICE.replace("INV-10042", "INV-77777");
    let reply = send(
        &client(),
        second.addr,
        Method::POST,
        &invoices(TOKEN),
        &headers,
        &other,
    )
    .await;
    assert_eq!(reply.status, StatusCode::CONFLICT);
    assert!(
        reply.header("x-sidecar-error").is_none(),
        "Rutter's 409, not the sidecar's"
    );
    assert_eq!(reply.json()["error_code"], "IDEMPOTENCY_KEY_REUSED");
}
