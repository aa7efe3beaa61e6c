//! `rutter-sidecar demo`: the emulator and the sidecar on free loopback ports, a few real-shaped requests
//! through them, and a printout of what the app got, how long it waited, and what Rutter saw.
//! Needs no account and no network; exits 0 only if every step behaved as the product promises.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::config::{BaseUrl, Config, Credentials};
use crate::emulator::{Emulator, EmulatorOptions};
use crate::server::{Listeners, Sidecar};

const TOKEN: &str = "00000000-0000-4000-8000-000000000001";
const JOB_MS: u64 = 2_000;
/// A made-up client secret shared by the demo's emulator (signing) and sidecar (verifying).
const DEMO_SECRET: &str = "demo-client-secret";

const INVOICE: &str = r#"{"invoice":{"customer_id":"8b3e6c0e-2f4a-4a4e-9a43-5d0c7b1f9e21","issue_date":"2026-11-30T00:00:00.000Z","due_date":"2026-12-30T00:00:00.000Z","currency_code":"USD","document_number":"INV-10042","memo":"Net 30 — café supplies","line_items":[{"description":"Espresso beans, 5 kg","quantity":2,"unit_amount":84.5,"total_amount":169.0}]}}"#;
const BAD_INVOICE: &str =
    r#"{"invoice":{"customer_id":"unknown","document_number":"INV-10043","line_items":[]}}"#;

struct Answer {
    status: StatusCode,
    job_id: Option<String>,
    replayed: bool,
    body: serde_json::Value,
    waited: Duration,
}

async fn call(
    client: &Client<HttpConnector, Full<Bytes>>,
    addr: SocketAddr,
    method: Method,
    target: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<Answer, String> {
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
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    let response = client
        .request(request)
        .await
        .map_err(|e| format!("the sidecar did not answer: {e}"))?;
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    Ok(Answer {
        status: parts.status,
        job_id: header("x-rutter-job-id"),
        replayed: header("idempotent-replayed").as_deref() == Some("true"),
        body: serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        waited: started.elapsed(),
    })
}

fn short(value: &serde_json::Value, max: usize) -> String {
    let text = value.to_string();
    if text.chars().count() <= max {
        text
    } else {
        format!("{}…", text.chars().take(max).collect::<String>())
    }
}

fn check(ok: bool, what: &str, failures: &mut Vec<String>) {
    if !ok {
        println!("   !! unexpected: {what}");
        failures.push(what.to_string());
    }
}

/// Runs the demo, printing to stdout; the exit code says whether every step behaved.
pub async fn run() -> ExitCode {
    match demo().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("demo failed: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn demo() -> Result<(), String> {
    let bind = || async {
        TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| e.to_string())
    };
    let (rutter_listener, proxy_listener, webhook_listener, admin_listener) =
        (bind().await?, bind().await?, bind().await?, bind().await?);
    let local = |l: &TcpListener| l.local_addr().map_err(|e| e.to_string());
    let (rutter_addr, addr, webhook_addr) = (
        local(&rutter_listener)?,
        local(&proxy_listener)?,
        local(&webhook_listener)?,
    );

    // The sidecar: polls from 250 ms, and verifies webhooks with the (demo) client secret.
    let mut config = Config::default();
    config.upstream.base_url = parse_base(&format!("http://{rutter_addr}"))?;
    config.facade.poll_initial = Duration::from_millis(250);
    config.facade.poll_max = Duration::from_secs(1);
    let credentials = Credentials {
        client_id: None,
        client_secret: Some(DEMO_SECRET.to_string()),
    };
    let sidecar = Sidecar::new(config, &credentials).map_err(|e| e.to_string())?;
    let webhook_stats = sidecar.webhooks.clone();
    let (stop_sidecar, sidecar_stopped) = oneshot::channel::<()>();
    let sidecar_task = tokio::spawn(sidecar.serve(
        Listeners {
            proxy: proxy_listener,
            webhooks: webhook_listener,
            admin: admin_listener,
        },
        async move {
            let _ = sidecar_stopped.await;
        },
    ));

    // The emulator: jobs of 2 s, and signed JOB_COMPLETED webhooks to the sidecar, as Rutter sends them.
    let webhook_url = format!("http://{webhook_addr}/webhooks/rutter")
        .parse()
        .map_err(|e| format!("{e}"))?;
    let emulator = Emulator::new(EmulatorOptions {
        job_ms: JOB_MS,
        webhook_url: Some(webhook_url),
        client_secret: Some(DEMO_SECRET.to_string()),
        ..EmulatorOptions::default()
    })
    .map_err(|e| e.to_string())?;
    let (stop_rutter, rutter_stopped) = oneshot::channel::<()>();
    let server = emulator.clone();
    let rutter_task = tokio::spawn(async move {
        server
            .serve(rutter_listener, async move {
                let _ = rutter_stopped.await;
            })
            .await
    });

    println!("rutter-sidecar demo");
    println!(
        "  Rutter emulator: http://{rutter_addr}  (every job takes {:.1} s)",
        JOB_MS as f64 / 1000.0
    );
    println!("  sidecar:         http://{addr}  (first poll after 250 ms, then backoff up to 1 s)");
    println!("  webhooks:        Rutter's signed JOB_COMPLETED webhooks go to http://{webhook_addr}/webhooks/rutter");
    println!("  The app below talks only to the sidecar, as a legacy app would talk to Rutter.\n");

    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let invoices = format!("/versioned/accounting/invoices?access_token={TOKEN}");
    let mut failures = Vec::new();
    let polls = |emulator: &Emulator| {
        emulator
            .seen()
            .iter()
            .filter(|r| r.path_and_query.contains("/jobs/"))
            .count()
    };

    println!("1. POST {invoices}  (Idempotency-Key: demo-invoice-10042)");
    let key = [
        ("idempotency-key", "demo-invoice-10042"),
        ("x-rutter-version", "2024-08-31"),
    ];
    let first = call(&client, addr, Method::POST, &invoices, &key, INVOICE).await?;
    let polls_first = polls(&emulator);
    println!(
        "   -> {} after {:.2} s, held synchronously; job {}",
        first.status,
        first.waited.as_secs_f64(),
        first.job_id.as_deref().unwrap_or("?")
    );
    let by_webhook = webhook_stats
        .stats()
        .jobs_completed
        .load(std::sync::atomic::Ordering::Relaxed)
        > 0;
    println!("      Rutter saw the write with response_mode=async, then {polls_first} polls of GET /versioned/jobs/:id;");
    println!(
        "      the answer came {}",
        if by_webhook {
            "the moment Rutter's JOB_COMPLETED webhook arrived (no wait for the next poll)"
        } else {
            "from a poll"
        }
    );
    println!("      body: {}", short(&first.body, 150));
    check(
        first.status == StatusCode::OK && first.body["invoice"]["id"].is_string(),
        "the invoice create returns the created invoice",
        &mut failures,
    );
    check(
        polls_first >= 2,
        "the write was held across several polls",
        &mut failures,
    );

    println!("\n2. The app retries the same request with the same Idempotency-Key");
    let retry = call(&client, addr, Method::POST, &invoices, &key, INVOICE).await?;
    println!(
        "   -> {} after {:.2} s; job {}{}",
        retry.status,
        retry.waited.as_secs_f64(),
        retry.job_id.as_deref().unwrap_or("?"),
        if retry.replayed {
            " (Idempotent-Replayed: true, answered by the sidecar)"
        } else {
            ""
        }
    );
    check(
        retry.status == StatusCode::OK
            && retry.replayed
            && retry.job_id == first.job_id
            && retry.body == first.body,
        "the retry is replayed: the same invoice from the same job, no second write",
        &mut failures,
    );
    let jobs = emulator
        .seen()
        .iter()
        .filter(|r| r.method == Method::POST)
        .count();
    println!(
        "      still one invoice: Rutter has seen {jobs} write so far; the retry cost no call to Rutter"
    );

    println!("\n3. GET {invoices}&limit=2  (a read: passed through and streamed)");
    let list = call(
        &client,
        addr,
        Method::GET,
        &format!("{invoices}&limit=2"),
        &[],
        "",
    )
    .await?;
    let count = list.body["invoices"].as_array().map_or(0, Vec::len);
    println!(
        "   -> {} after {:.2} s: {count} invoices, next_cursor {}",
        list.status,
        list.waited.as_secs_f64(),
        short(&list.body["next_cursor"], 40)
    );
    check(
        list.status == StatusCode::OK && count == 2,
        "the list read passes through",
        &mut failures,
    );

    println!("\n4. POST an invoice for a customer Rutter does not know  (the job fails)");
    let bad = call(&client, addr, Method::POST, &invoices, &[], BAD_INVOICE).await?;
    println!(
        "   -> {} after {:.2} s; job {}",
        bad.status,
        bad.waited.as_secs_f64(),
        bad.job_id.as_deref().unwrap_or("?")
    );
    println!("      body: {}", short(&bad.body, 150));
    check(
        bad.status == StatusCode::BAD_REQUEST && bad.body["error_code"] == "INVALID_INPUT",
        "the failed job returns Rutter's 400 and error body",
        &mut failures,
    );

    println!(
        "\n5. POST with Prefer: respond-async  (an app that wants Rutter's async answer itself)"
    );
    let explicit = call(
        &client,
        addr,
        Method::POST,
        &invoices,
        &[("prefer", "respond-async")],
        INVOICE,
    )
    .await?;
    println!(
        "   -> {} after {:.2} s: {}",
        explicit.status,
        explicit.waited.as_secs_f64(),
        short(&explicit.body, 150)
    );
    check(
        explicit.body["async_response"]["id"].is_string(),
        "explicit async passes through",
        &mut failures,
    );

    let seen = emulator.seen();
    let writes = seen.iter().filter(|r| r.method == Method::POST).count();
    println!(
        "\nRutter saw {} requests: {writes} writes, {} job polls, {} list read(s).",
        seen.len(),
        polls(&emulator),
        seen.len() - writes - polls(&emulator)
    );

    let _ = stop_sidecar.send(());
    let _ = stop_rutter.send(());
    let _ = sidecar_task.await;
    let _ = rutter_task.await;
    if failures.is_empty() {
        println!(
            "Every write was answered synchronously (except where the app asked for async). Next: README.md, \"Running it for real\"."
        );
        Ok(())
    } else {
        Err(format!(
            "{} step(s) did not behave: {}",
            failures.len(),
            failures.join("; ")
        ))
    }
}

fn parse_base(text: &str) -> Result<BaseUrl, String> {
    let env = vec![(
        "RUTTER_SIDECAR__UPSTREAM__BASE_URL".to_string(),
        text.to_string(),
    )];
    Config::parse("", &env)
        .map(|c| c.upstream.base_url)
        .map_err(|e| e.to_string())
}
