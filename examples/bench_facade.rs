//! Facade benchmark (issue 7): writes whose jobs take D ms (D = 0, 200, 2000); the latency the app
//! observes minus D (p50/p99), with webhooks and with polling only, and the upstream polls each job
//! costs. Emulator, sidecar and client run in this process on loopback, with the default poll
//! schedule (first poll after 500 ms, backoff with jitter up to 5 s).
//!
//! Run with `cargo run --release --example bench_facade [-- REQUESTS_PER_D]` (default 200).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rutter_sidecar::config::{Config, Credentials};
use rutter_sidecar::emulator::{Emulator, EmulatorOptions};
use rutter_sidecar::server::{Listeners, Sidecar};
use tokio::net::TcpListener;
use tokio::time::Instant;

const SECRET: &str = "bench-secret";
const TOKEN: &str = "00000000-0000-4000-8000-000000000001";
const INVOICE: &str = r#"{"invoice":{"customer_id":"8b3e6c0e-2f4a-4a4e-9a43-5d0c7b1f9e21","document_number":"INV-1","line_items":[]}}"#;

async fn bind() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.expect("bind")
}

/// Runs `requests` writes of jobs of `job_ms`, 20 at a time; returns (added latencies, polls per job).
async fn run(job_ms: u64, requests: usize, webhooks: bool) -> (Vec<Duration>, f64) {
    let (rutter, proxy, hooks, admin) = (bind().await, bind().await, bind().await, bind().await);
    let (rutter_addr, proxy_addr, hook_addr) = (
        rutter.local_addr().unwrap(),
        proxy.local_addr().unwrap(),
        hooks.local_addr().unwrap(),
    );
    let env = vec![(
        "RUTTER_SIDECAR__UPSTREAM__BASE_URL".to_string(),
        format!("http://{rutter_addr}"),
    )];
    let mut config = Config::parse("", &env).expect("config");
    config.upstream.rate_limit.requests = 1_000_000;
    let credentials = Credentials {
        client_id: None,
        client_secret: Some(SECRET.into()),
    };
    let sidecar = Sidecar::new(config, &credentials).expect("sidecar");
    tokio::spawn(sidecar.serve(
        Listeners {
            proxy,
            webhooks: hooks,
            admin,
        },
        std::future::pending(),
    ));
    let webhook_url = webhooks.then(|| {
        format!("http://{hook_addr}/webhooks/rutter")
            .parse()
            .unwrap()
    });
    let emulator = Emulator::new(EmulatorOptions {
        job_ms,
        seed: Some(1),
        webhook_url,
        client_secret: Some(SECRET.into()),
        ..EmulatorOptions::default()
    })
    .expect("emulator");
    let server = emulator.clone();
    tokio::spawn(async move { server.serve(rutter, std::future::pending()).await });

    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let path = format!("/versioned/accounting/invoices?access_token={TOKEN}");
    let mut added = Vec::with_capacity(requests);
    for batch in 0..requests.div_ceil(20) {
        let n = 20.min(requests - batch * 20);
        let calls = (0..n).map(|_| post(&client, proxy_addr, &path));
        for elapsed in futures_util::future::join_all(calls)
            .await
            .into_iter()
            .flatten()
        {
            added.push(elapsed.saturating_sub(Duration::from_millis(job_ms)));
        }
    }
    added.sort();
    (added, emulator.counters().polls as f64 / requests as f64)
}

async fn post(
    client: &Client<HttpConnector, Full<Bytes>>,
    addr: SocketAddr,
    path: &str,
) -> Option<Duration> {
    let request = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(INVOICE.as_bytes())))
        .ok()?;
    let started = Instant::now();
    let response = client.request(request).await.ok()?;
    let ok = response.status().is_success();
    let _ = response.into_body().collect().await;
    ok.then(|| started.elapsed())
}

fn pct(sorted: &[Duration], p: f64) -> String {
    if sorted.is_empty() {
        return "–".into();
    }
    let d = sorted[((sorted.len() as f64 - 1.0) * p).round() as usize];
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

/// 1,000 concurrent duplicates with one Idempotency-Key on a 200 ms job: one write, one answer for all.
async fn duplicates(n: usize) {
    let (rutter, proxy, hooks, admin) = (bind().await, bind().await, bind().await, bind().await);
    let (rutter_addr, proxy_addr) = (rutter.local_addr().unwrap(), proxy.local_addr().unwrap());
    let env = vec![(
        "RUTTER_SIDECAR__UPSTREAM__BASE_URL".to_string(),
        format!("http://{rutter_addr}"),
    )];
    let mut config = Config::parse("", &env).expect("config");
    config.upstream.rate_limit.requests = 1_000_000;
    let sidecar = Sidecar::new(config, &Credentials::default()).expect("sidecar");
    tokio::spawn(sidecar.serve(
        Listeners {
            proxy,
            webhooks: hooks,
            admin,
        },
        std::future::pending(),
    ));
    let emulator = Emulator::new(EmulatorOptions {
        job_ms: 200,
        seed: Some(1),
        ..EmulatorOptions::default()
    })
    .expect("emulator");
    let server = emulator.clone();
    tokio::spawn(async move { server.serve(rutter, std::future::pending()).await });
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(n)
        .build(HttpConnector::new());
    let uri = format!("http://{proxy_addr}/versioned/accounting/invoices?access_token={TOKEN}");
    let started = Instant::now();
    let calls = (0..n).map(|_| {
        let request = Request::builder()
            .method(Method::POST)
            .uri(&uri)
            .header("content-type", "application/json")
            .header("idempotency-key", "bench-duplicates")
            .body(Full::new(Bytes::from_static(INVOICE.as_bytes())))
            .expect("request");
        let client = client.clone();
        async move {
            let response = client.request(request).await.ok()?;
            let ok = response.status().is_success();
            let body = response.into_body().collect().await.ok()?.to_bytes();
            ok.then_some((started.elapsed(), body))
        }
    });
    let results: Vec<_> = futures_util::future::join_all(calls)
        .await
        .into_iter()
        .flatten()
        .collect();
    let identical = results.windows(2).all(|w| w[0].1 == w[1].1);
    let mut times: Vec<Duration> = results.iter().map(|(t, _)| *t).collect();
    times.sort();
    println!();
    println!("idempotency: {n} concurrent duplicates (one key, 200 ms job)");
    println!();
    println!("| answered | identical bodies | writes reaching Rutter | polls | all answered after (ms) p50 / p99 |");
    println!("|---|---|---|---|---|");
    println!(
        "| {}/{n} | {identical} | {} | {} | {} / {} |",
        results.len(),
        emulator.counters().write_requests,
        emulator.counters().polls,
        pct(&times, 0.5),
        pct(&times, 0.99)
    );
}

#[tokio::main]
async fn main() {
    let requests: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200);
    println!("facade: {requests} writes per job length, 20 concurrent, default poll schedule (500 ms .. 5 s)");
    println!();
    println!(
        "| job length D | mode | answered | added latency p50 (ms) | p99 (ms) | polls per job |"
    );
    println!("|---|---|---|---|---|---|");
    for job_ms in [0, 200, 2000] {
        for webhooks in [true, false] {
            let (added, polls) = run(job_ms, requests, webhooks).await;
            println!(
                "| {job_ms} ms | {} | {}/{requests} | {} | {} | {polls:.2} |",
                if webhooks { "webhooks" } else { "polling only" },
                added.len(),
                pct(&added, 0.5),
                pct(&added, 0.99)
            );
        }
    }
    duplicates(1000).await;
}
