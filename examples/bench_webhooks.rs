//! Webhook fan-in benchmark (issue 4): with 1,000 requests waiting on 1,000 jobs, the time from a
//! `JOB_COMPLETED` webhook reaching the sidecar to the app's answer (p50/p99/max), and the upstream
//! polls each job costs with webhooks on and off. Everything runs in this process on loopback: the
//! emulator stands in for Rutter, a relay plays Rutter's webhook sender.
//!
//! Run with `cargo run --release --example bench_webhooks [-- WAITERS JOB_MS]` (defaults 1000, 2000).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
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
use rutter_sidecar::webhooks::sign;
use tokio::net::TcpListener;
use tokio::time::Instant;

const SECRET: &str = "bench-secret";
const TOKEN: &str = "00000000-0000-4000-8000-000000000001";
const INVOICE: &str = r#"{"invoice":{"customer_id":"8b3e6c0e-2f4a-4a4e-9a43-5d0c7b1f9e21","document_number":"INV-1","line_items":[]}}"#;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

struct Run {
    latencies: Vec<Duration>,
    polls_per_job: f64,
    answered: usize,
    wall: Duration,
}

async fn one_run(waiters: usize, job_ms: u64, webhooks: bool) -> Run {
    let emulator = Emulator::new(EmulatorOptions {
        job_ms,
        seed: Some(1),
        ..EmulatorOptions::default()
    })
    .expect("emulator");
    let rutter = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let rutter_addr = rutter.local_addr().expect("addr");
    let server = emulator.clone();
    tokio::spawn(async move { server.serve(rutter, std::future::pending()).await });

    let env = vec![(
        "RUTTER_SIDECAR__UPSTREAM__BASE_URL".to_string(),
        format!("http://{rutter_addr}"),
    )];
    let mut config = Config::parse("", &env).expect("config");
    config.jobs.max_tracked = waiters * 2;
    // The emulator enforces no organisation budget here; the default (500 per 10 s) would hold most
    // of the writes back and measure the budget instead of the fan-in.
    config.upstream.rate_limit.requests = 1_000_000;
    let credentials = Credentials {
        client_id: None,
        client_secret: Some(SECRET.into()),
    };
    let sidecar = Sidecar::new(config, &credentials).expect("sidecar");
    let proxy = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let hooks = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let admin = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let (proxy_addr, hook_addr) = (
        proxy.local_addr().expect("addr"),
        hooks.local_addr().expect("addr"),
    );
    tokio::spawn(sidecar.serve(
        Listeners {
            proxy,
            webhooks: hooks,
            admin,
        },
        std::future::pending(),
    ));

    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(waiters)
        .build(HttpConnector::new());
    let sent_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    if webhooks {
        let mut completions = emulator.completions();
        let (client, sent_at) = (client.clone(), sent_at.clone());
        tokio::spawn(async move {
            while let Ok(done) = completions.recv().await {
                let body = serde_json::json!({"type": "JOB", "code": "JOB_COMPLETED", "access_token": TOKEN, "job": done.job}).to_string();
                let signature = sign(SECRET.as_bytes(), body.as_bytes());
                let (client, sent_at) = (client.clone(), sent_at.clone());
                tokio::spawn(async move {
                    sent_at
                        .lock()
                        .expect("lock")
                        .insert(done.job_id.clone(), Instant::now());
                    post(
                        &client,
                        hook_addr,
                        "/webhooks/rutter",
                        &[("x-rutter-signature", &signature)],
                        &body,
                    )
                    .await;
                });
            }
        });
    }

    let started = Instant::now();
    let path = format!("/versioned/accounting/invoices?access_token={TOKEN}");
    // Job lengths spread evenly over [job_ms/2, 3*job_ms/2], so completions arrive as a stream (as they
    // would from Rutter), not as one burst of 1,000 at the same instant.
    let tasks: Vec<_> = (0..waiters)
        .map(|i| {
            let (client, path) = (client.clone(), path.clone());
            let ms = (job_ms / 2 + job_ms * i as u64 / waiters as u64).to_string();
            tokio::spawn(async move {
                post(
                    &client,
                    proxy_addr,
                    &path,
                    &[("x-emulator-job-ms", &ms)],
                    INVOICE,
                )
                .await
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut answered = 0;
    for task in tasks {
        if let Ok(Some((status, job_id, at))) = task.await {
            if status == 200 {
                answered += 1;
            }
            if let Some(sent) =
                job_id.and_then(|id| sent_at.lock().expect("lock").get(&id).copied())
            {
                latencies.push(at.saturating_duration_since(sent));
            }
        }
    }
    let wall = started.elapsed();
    let polls = emulator.counters().polls as f64;
    latencies.sort();
    Run {
        latencies,
        polls_per_job: polls / waiters as f64,
        answered,
        wall,
    }
}

async fn post(
    client: &HttpClient,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Option<(u16, Option<String>, Instant)> {
    let mut builder = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/json");
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let response = client
        .request(
            builder
                .body(Full::new(Bytes::from(body.to_string())))
                .ok()?,
        )
        .await
        .ok()?;
    let at = Instant::now();
    let status = response.status().as_u16();
    let job = response
        .headers()
        .get("x-rutter-job-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let _ = response.into_body().collect().await;
    Some((status, job, at))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let waiters: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1000);
    let job_ms: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(2000);
    println!("webhook fan-in: {waiters} concurrent waiters, one job each, jobs of {} to {} ms, default poll schedule (500 ms .. 5 s)", job_ms / 2, job_ms * 3 / 2);
    let on = one_run(waiters, job_ms, true).await;
    let off = one_run(waiters, job_ms, false).await;
    println!();
    println!("| mode | answered | webhook→answer p50 (ms) | p99 (ms) | max (ms) | polls per job | wall (s) |");
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| webhooks on | {}/{waiters} | {} | {} | {} | {:.2} | {:.2} |",
        on.answered,
        ms(percentile(&on.latencies, 0.5)),
        ms(percentile(&on.latencies, 0.99)),
        ms(on.latencies.last().copied().unwrap_or_default()),
        on.polls_per_job,
        on.wall.as_secs_f64()
    );
    println!(
        "| polling only | {}/{waiters} | – | – | – | {:.2} | {:.2} |",
        off.answered,
        off.polls_per_job,
        off.wall.as_secs_f64()
    );
}
