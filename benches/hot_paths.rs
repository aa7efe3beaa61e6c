//! Micro-benchmarks of the pure functions on the request path: the query and body rewrite, the
//! idempotency fingerprint and cache key, and webhook signature verification.
//! Run with `cargo bench --bench hot_paths`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use http::{HeaderValue, Method};
use rutter_sidecar::{idempotency, rewrite, webhooks};

const INVOICE: &str = r#"{"invoice":{"customer_id":"8b3e6c0e-2f4a-4a4e-9a43-5d0c7b1f9e21","issue_date":"2026-11-30T00:00:00.000Z","due_date":"2026-12-30T00:00:00.000Z","currency_code":"USD","document_number":"INV-10042","memo":"Net 30 — café supplies","line_items":[{"description":"Espresso beans, 5 kg","quantity":2,"unit_amount":84.5,"total_amount":169.0,"account_id":"f0c1d5b2-7e0e-4d8e-8a52-3c7d5c8e1a10"}]}}"#;
const QUERY: &str =
    "access_token=00000000-0000-4000-8000-000000000001&expand=platform_data&force_fetch=false";

fn rewrite_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("rewrite");
    group.throughput(Throughput::Bytes(INVOICE.len() as u64));
    group.bench_function("json_body", |b| {
        b.iter(|| rewrite::rewrite_json_body(black_box(INVOICE.as_bytes())))
    });
    group.bench_function("body_response_mode", |b| {
        b.iter(|| rewrite::body_response_mode(black_box(INVOICE.as_bytes())))
    });
    group.bench_function("query", |b| {
        b.iter(|| rewrite::rewrite_query(black_box(Some(QUERY))))
    });
    group.finish();
}

fn idempotency_benches(c: &mut Criterion) {
    let auth = HeaderValue::from_static("Basic Y2xpZW50OnNlY3JldA==");
    let mut group = c.benchmark_group("idempotency");
    group.bench_function("fingerprint", |b| {
        b.iter(|| {
            idempotency::fingerprint(
                &Method::POST,
                "/versioned/accounting/invoices",
                Some(QUERY),
                black_box(INVOICE.as_bytes()),
            )
        })
    });
    group.bench_function("cache_key", |b| {
        b.iter(|| {
            idempotency::cache_key(
                Some(&auth),
                Some(QUERY),
                &Method::POST,
                "/versioned/accounting/invoices",
                black_box("5f2b8a40-6c1d-4e8b-9a7f-0c3d2e1b4a59"),
            )
        })
    });
    group.finish();
}

fn webhook_benches(c: &mut Criterion) {
    let body = format!(
        r#"{{"type":"JOB","code":"JOB_COMPLETED","job":{{"id":"j","status":"success","response":{{"http_status":200,"body":{INVOICE}}}}}}}"#
    );
    let signature = webhooks::sign(b"client-secret", body.as_bytes());
    c.bench_function("webhooks/verify_signature", |b| {
        b.iter(|| {
            webhooks::verify_signature(
                b"client-secret",
                black_box(body.as_bytes()),
                black_box(signature.as_bytes()),
            )
        })
    });
}

criterion_group!(
    benches,
    rewrite_benches,
    idempotency_benches,
    webhook_benches
);
criterion_main!(benches);
