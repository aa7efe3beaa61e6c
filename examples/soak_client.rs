//! Soak client (issue 8): mixed app traffic at a fixed rate through a running sidecar, for
//! `bench/soak.sh`, which starts the emulator and the sidecar and samples the sidecar's RSS.
//!
//! Usage: `soak_client PROXY_ADDR SECONDS RATE` (e.g. `127.0.0.1:8080 600 25`). Open loop: one request
//! starts every 1/RATE s whatever the previous ones do (at most 2,000 in flight; beyond that a tick is
//! counted as skipped). The mix, per request:
//!
//! | share | request | expected answer |
//! |---|---|---|
//! | 35 % | facade `POST /accounting/invoices`, unique `Idempotency-Key`, 50–800 ms job (every tenth asks the emulator for a duplicate webhook) | 200 |
//! | 10 % | the same, job ends in `failure` (`X-Emulator-Fail: 400`) | 400 |
//! | 10 % | a duplicate of a recent write (same key and body) | its first answer, replayed or coalesced |
//! |  5 % | facade write without a key (the sidecar generates one) | 200 |
//! | 25 % | `GET /accounting/accounts` (passthrough list) | 200 |
//! | 10 % | explicit async write (`response_mode=async`, unique key) | 200 with an `async_response` |
//! |  5 % | `PATCH` of an invoice created earlier (facade, unique key) | 200 |
//!
//! Every 60 s and at the end it prints the counts per kind and status. Exit status 1 when any request
//! got a 5xx, a `X-Sidecar-Error`, a transport error or a timeout, or a status its kind does not expect.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rand::Rng;
use tokio::sync::Semaphore;
use tokio::time::{Instant, MissedTickBehavior};

const TOKEN: &str = "00000000-0000-4000-8000-000000000001";
const MAX_IN_FLIGHT: usize = 2000;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Write,
    FailingWrite,
    Duplicate,
    KeylessWrite,
    List,
    ExplicitAsync,
    Patch,
}

impl Kind {
    fn pick(roll: u32) -> Kind {
        match roll {
            0..35 => Kind::Write,
            35..45 => Kind::FailingWrite,
            45..55 => Kind::Duplicate,
            55..60 => Kind::KeylessWrite,
            60..85 => Kind::List,
            85..95 => Kind::ExplicitAsync,
            _ => Kind::Patch,
        }
    }
}

/// A finished write that later duplicates may repeat.
#[derive(Clone)]
struct Sent {
    key: String,
    body: Bytes,
    fail: bool,
    job_ms: u64,
}

#[derive(Default)]
struct Tally {
    /// (kind, status or "error"/"timeout") -> count
    counts: BTreeMap<(String, String), u64>,
    sidecar_errors: u64,
    unexpected: u64,
    replayed: u64,
    duplicates_not_replayed: u64,
    skipped: u64,
    latency_ms: Vec<u32>,
}

struct State {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
    recent: Mutex<VecDeque<Sent>>,
    invoices: Mutex<VecDeque<String>>,
    tally: Mutex<Tally>,
}

fn invoice_body(n: u64) -> Bytes {
    Bytes::from(format!(
        r#"{{"invoice":{{"customer_id":"8b3e6c0e-2f4a-4a4e-9a43-5d0c7b1f9e21","document_number":"SOAK-{n}","issue_date":"2024-01-01","line_items":[{{"description":"soak","quantity":1,"unit_amount":{}.{:02}}}]}}}}"#,
        n % 997,
        n % 100
    ))
}

fn write_request(
    state: &State,
    path_and_query: &str,
    method: Method,
    sent: &Sent,
) -> Request<Full<Bytes>> {
    let mut builder = Request::builder()
        .method(method)
        .uri(format!("{}{path_and_query}", state.base))
        .header("content-type", "application/json")
        .header("x-emulator-job-ms", sent.job_ms.to_string());
    if !sent.key.is_empty() {
        builder = builder.header("idempotency-key", &sent.key);
    }
    if sent.fail {
        builder = builder.header("x-emulator-fail", "400");
    }
    builder.body(Full::new(sent.body.clone())).expect("request")
}

async fn one(state: Arc<State>, kind: Kind, n: u64) {
    let job_ms = rand::rng().random_range(50..=800u64);
    let fresh = |fail: bool, keyed: bool| Sent {
        key: if keyed {
            format!("soak-{}", uuid::Uuid::new_v4())
        } else {
            String::new()
        },
        body: invoice_body(n),
        fail,
        job_ms,
    };
    let invoices = format!("/versioned/accounting/invoices?access_token={TOKEN}");
    let mut remember = None;
    let request = match kind {
        Kind::Write | Kind::FailingWrite => {
            let sent = fresh(kind == Kind::FailingWrite, true);
            remember = Some(sent.clone());
            let mut request = write_request(&state, &invoices, Method::POST, &sent);
            if n.is_multiple_of(10) {
                // This job's webhook is delivered twice: the second copy must change nothing.
                request.headers_mut().insert(
                    "x-emulator-webhook",
                    http::HeaderValue::from_static("duplicate"),
                );
            }
            request
        }
        Kind::KeylessWrite => write_request(&state, &invoices, Method::POST, &fresh(false, false)),
        Kind::Duplicate => {
            let previous = {
                let recent = state.recent.lock().unwrap();
                if recent.is_empty() {
                    None
                } else {
                    let i = rand::rng().random_range(0..recent.len());
                    recent.get(i).cloned()
                }
            };
            match previous {
                Some(sent) => write_request(&state, &invoices, Method::POST, &sent),
                None => write_request(&state, &invoices, Method::POST, &fresh(false, true)),
            }
        }
        Kind::List => Request::builder()
            .uri(format!(
                "{}/versioned/accounting/accounts?access_token={TOKEN}",
                state.base
            ))
            .body(Full::new(Bytes::new()))
            .expect("request"),
        Kind::ExplicitAsync => write_request(
            &state,
            &format!("{invoices}&response_mode=async"),
            Method::POST,
            &fresh(false, true),
        ),
        Kind::Patch => {
            let id = state.invoices.lock().unwrap().front().cloned();
            match id {
                Some(id) => {
                    let sent = Sent {
                        body: Bytes::from(format!(r#"{{"invoice":{{"memo":"soak patch {n}"}}}}"#)),
                        ..fresh(false, true)
                    };
                    let path = format!("/versioned/accounting/invoices/{id}?access_token={TOKEN}");
                    write_request(&state, &path, Method::PATCH, &sent)
                }
                None => write_request(&state, &invoices, Method::POST, &fresh(false, true)),
            }
        }
    };
    let started = Instant::now();
    let outcome = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let response = state.client.request(request).await?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>((parts, body))
    })
    .await;
    let elapsed = started.elapsed();
    let mut tally = state.tally.lock().unwrap();
    let label = format!("{kind:?}");
    let (status, ok) = match outcome {
        Err(_) => ("timeout".to_string(), false),
        Ok(Err(_)) => ("error".to_string(), false),
        Ok(Ok((parts, body))) => {
            let status = parts.status.as_u16();
            let sidecar_error = parts.headers.contains_key("x-sidecar-error");
            if sidecar_error {
                tally.sidecar_errors += 1;
            }
            if parts.headers.contains_key("idempotent-replayed") {
                tally.replayed += 1;
            } else if kind == Kind::Duplicate {
                // Answered by a new flight: the first answer was no longer in the idempotency cache
                // (coalescing with a write still in flight is counted here too).
                tally.duplicates_not_replayed += 1;
            }
            let expected = match kind {
                Kind::FailingWrite => status == 400,
                // A duplicate of a failing write replays its 400.
                Kind::Duplicate => status == 200 || status == 400,
                _ => status == 200,
            };
            if status == 200 && matches!(kind, Kind::Write) {
                if let Some(id) = serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["invoice"]["id"].as_str().map(str::to_string))
                {
                    let mut invoices = state.invoices.lock().unwrap();
                    invoices.push_back(id);
                    if invoices.len() > 100 {
                        invoices.pop_front();
                    }
                }
            }
            (status.to_string(), expected && !sidecar_error)
        }
    };
    if !ok {
        tally.unexpected += 1;
    }
    tally
        .latency_ms
        .push(elapsed.as_millis().min(u32::MAX as u128) as u32);
    *tally.counts.entry((label, status)).or_default() += 1;
    drop(tally);
    if let Some(sent) = remember {
        let mut recent = state.recent.lock().unwrap();
        recent.push_back(sent);
        if recent.len() > 200 {
            recent.pop_front();
        }
    }
}

fn report(state: &State, elapsed: Duration) {
    let mut tally = state.tally.lock().unwrap();
    let total: u64 = tally.counts.values().sum();
    tally.latency_ms.sort_unstable();
    let pct = |p: f64| {
        let l = &tally.latency_ms;
        if l.is_empty() {
            0
        } else {
            l[((l.len() - 1) as f64 * p).round() as usize]
        }
    };
    println!(
        "[{:>5.0}s] answered {total}, unexpected {}, sidecar errors {}, replayed {}, duplicates not replayed {}, skipped ticks {}, latency p50 {} ms p99 {} ms max {} ms",
        elapsed.as_secs_f64(),
        tally.unexpected,
        tally.sidecar_errors,
        tally.replayed,
        tally.duplicates_not_replayed,
        tally.skipped,
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    let line: Vec<String> = tally
        .counts
        .iter()
        .map(|((kind, status), n)| format!("{kind} {status}: {n}"))
        .collect();
    println!("         {}", line.join(", "));
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let proxy: SocketAddr = args
        .next()
        .and_then(|a| a.parse().ok())
        .expect("usage: soak_client PROXY_ADDR SECONDS RATE");
    let seconds: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(600);
    let rate: f64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(25.0);
    assert!(
        proxy.ip().is_loopback(),
        "the soak client only talks to loopback"
    );

    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(256)
        .build(HttpConnector::new());
    let state = Arc::new(State {
        client,
        base: format!("http://{proxy}"),
        recent: Mutex::new(VecDeque::new()),
        invoices: Mutex::new(VecDeque::new()),
        tally: Mutex::new(Tally::default()),
    });
    println!("soak client: {rate}/s for {seconds} s against {proxy}");
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let started = Instant::now();
    let end = started + Duration::from_secs(seconds);
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut next_report = started + Duration::from_secs(60);
    let mut n: u64 = 0;
    while Instant::now() < end {
        ticker.tick().await;
        if Instant::now() >= next_report {
            report(&state, started.elapsed());
            next_report += Duration::from_secs(60);
        }
        n += 1;
        let kind = Kind::pick(rand::rng().random_range(0..100));
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            state.tally.lock().unwrap().skipped += 1;
            continue;
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            one(state, kind, n).await;
            drop(slot);
        });
    }
    // Let the requests in flight finish.
    let _ = tokio::time::timeout(
        REQUEST_TIMEOUT + Duration::from_secs(5),
        slots.acquire_many(MAX_IN_FLIGHT as u32),
    )
    .await;
    report(&state, started.elapsed());
    let tally = state.tally.lock().unwrap();
    if tally.unexpected > 0 || tally.skipped > 0 {
        println!(
            "RESULT: FAIL ({} unexpected answers, {} skipped ticks)",
            tally.unexpected, tally.skipped
        );
        std::process::exit(1);
    }
    println!("RESULT: OK (every answer as expected)");
}
