//! Integration tests of the built-in Rutter emulator: each test starts it in-process on
//! `127.0.0.1:0` and talks to it over real sockets with a hyper-util client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::{Connect, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rutter_sidecar::emulator::{Emulator, EmulatorOptions};
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

const INVOICE: &str = r#"{
  "invoice": {
    "customer_id": "8b3e6c0e-2f4a-4a4e-9a43-5d0c7b1f9e21",
    "document_number": "INV-10042",
    "memo": "Net 30 — café supplies (ünïcode kept)",
    "line_items": [{ "description": "Espresso beans, 5 kg", "quantity": 2, "unit_amount": 84.5, "total_amount": 169.0 }]
  }
}"#;

const RATE_LIMITED: &str = r#"{ "error_type": "RATE_LIMIT_ERROR", "error_code": "RATE_LIMIT_EXCEEDED", "error_message": "too many requests; allow time between requests" }"#;
const CONFLICT: &str = r#"{ "error_type": "INVALID_REQUEST", "error_code": "IDEMPOTENCY_KEY_REUSED", "error_message": "this Idempotency-Key was used with a different request" }"#;

struct Running {
    emulator: Emulator,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Running {
    fn url(&self, path: &str) -> String {
        let scheme = if self.emulator.is_tls() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}{path}", self.addr)
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("the emulator stops within 5 s")
            .expect("the serve task does not panic")
            .expect("serve returns Ok");
    }
}

async fn start(options: EmulatorOptions) -> Running {
    let emulator = Emulator::new(options).expect("valid options");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = emulator.clone();
    let task = tokio::spawn(async move {
        server
            .serve(listener, async move {
                let _ = stopped.await;
            })
            .await
    });
    Running {
        emulator,
        addr,
        stop: Some(stop),
        task,
    }
}

fn options() -> EmulatorOptions {
    EmulatorOptions {
        job_ms: 300,
        sync_limit_ms: 3000,
        seed: Some(7),
        ..Default::default()
    }
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

#[derive(Debug)]
struct Answer {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn job_id(&self) -> Option<&str> {
        self.header("x-rutter-job-id")
    }
}

async fn try_call<C>(
    client: &Client<C, Full<Bytes>>,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<Answer, hyper_util::client::legacy::Error>
where
    C: Connect + Clone + Send + Sync + 'static,
{
    let mut request = Request::builder()
        .method(Method::from_bytes(method.as_bytes()).unwrap())
        .uri(url);
    if !body.is_empty() {
        request = request.header("content-type", "application/json");
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let response = client.request(request).await?;
    let status = response.status();
    let version = response.version();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("a complete body")
        .to_bytes();
    Ok(Answer {
        status,
        version,
        headers,
        body,
    })
}

async fn call<C>(
    client: &Client<C, Full<Bytes>>,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer
where
    C: Connect + Clone + Send + Sync + 'static,
{
    let answer = tokio::time::timeout(
        Duration::from_secs(10),
        try_call(client, method, url, headers, body),
    )
    .await
    .expect("an answer within 10 s")
    .expect("no transport error");
    assert!(
        answer.header("x-rutter-request-id").is_some(),
        "every answer has X-Rutter-Request-ID"
    );
    assert!(
        answer
            .header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "JSON content type"
    );
    answer
}

fn assert_error_shape(answer: &Answer, code: &str) {
    let body = answer.json();
    assert!(body["error_type"].is_string(), "{body}");
    assert!(body["error_message"].is_string(), "{body}");
    assert_eq!(body["error_code"], json!(code), "{body}");
}

/// Polls the job until it is terminal (3 s at most); returns every status seen and the last job.
async fn poll_until_terminal(client: &HttpClient, url: &str) -> (Vec<String>, Value) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut statuses = Vec::new();
    loop {
        let answer = call(client, "GET", url, &[], "").await;
        assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
        let job = answer.json();
        let status = job["status"].as_str().unwrap().to_string();
        if statuses.last() != Some(&status) {
            statuses.push(status.clone());
        }
        if matches!(status.as_str(), "success" | "failure" | "partial_success") {
            return (statuses, job);
        }
        assert!(
            Instant::now() < deadline,
            "job did not finish: {statuses:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn async_write_goes_through_prequeued_pending_success() {
    let emu = start(EmulatorOptions {
        job_ms: 2000, // `prequeued` for 200 ms: ample for the first poll on a busy machine
        ..options()
    })
    .await;
    let client = client();
    let mut completions = emu.emulator.completions();
    let url = emu.url("/versioned/accounting/invoices?access_token=tok-1&response_mode=async");
    let started = Instant::now();
    let answer = call(
        &client,
        "POST",
        &url,
        &[("Idempotency-Key", "k-1")],
        INVOICE,
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "async answers at once"
    );
    assert_eq!(answer.status, StatusCode::OK);
    let body = answer.json();
    let id = body["async_response"]["id"].as_str().unwrap().to_string();
    assert_eq!(answer.job_id(), Some(id.as_str()));
    let response_url = body["async_response"]["response_url"].as_str().unwrap();
    assert_eq!(response_url, emu.url(&format!("/versioned/jobs/{id}")));
    assert!(matches!(
        body["async_response"]["status"].as_str(),
        Some("prequeued" | "pending")
    ));

    let first = call(&client, "GET", response_url, &[], "").await.json();
    assert_eq!(first["status"], json!("prequeued"));
    assert!(first.get("response").is_none(), "no response while running");
    assert_eq!(first["request"]["method"], json!("POST"));
    assert_eq!(first["request"]["url"], json!(url));
    assert_eq!(first["request"]["idempotency_key"], json!("k-1"));
    assert_eq!(
        first["request"]["body"],
        serde_json::from_str::<Value>(INVOICE).unwrap()
    );

    let (statuses, job) = poll_until_terminal(&client, response_url).await;
    assert_eq!(statuses.first().map(String::as_str), Some("prequeued"));
    assert!(statuses.iter().any(|s| s == "pending"), "{statuses:?}");
    assert_eq!(statuses.last().map(String::as_str), Some("success"));
    assert!(started.elapsed() >= Duration::from_millis(2000));
    assert_eq!(job["response"]["http_status"], json!(200));
    let invoice = &job["response"]["body"]["invoice"];
    assert_eq!(
        invoice["customer_id"],
        json!("8b3e6c0e-2f4a-4a4e-9a43-5d0c7b1f9e21")
    );
    assert_eq!(invoice["status"], json!("open"));
    assert_eq!(invoice["total_amount"], json!(169.0));
    assert!(invoice["id"].is_string() && invoice["platform_id"].is_string());
    assert!(invoice["created_at"].is_string() && invoice["updated_at"].is_string());
    assert_eq!(emu.emulator.job(&id), Some(job.clone()));

    // Non-ASCII survives byte-exactly: in what was received and in what polls return.
    let raw = call(&client, "GET", response_url, &[], "").await.body;
    let memo = "Net 30 — café supplies (ünïcode kept)";
    assert!(raw.windows(memo.len()).any(|w| w == memo.as_bytes()));
    let seen = emu.emulator.seen();
    let write = seen.iter().find(|r| r.method == Method::POST).unwrap();
    assert_eq!(write.body.as_ref(), INVOICE.as_bytes());
    assert_eq!(
        write.path_and_query,
        "/versioned/accounting/invoices?access_token=tok-1&response_mode=async"
    );

    // The completion hook fired with the terminal job.
    let event = tokio::time::timeout(Duration::from_secs(1), completions.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(event.job_id, id);
    assert_eq!(event.job["status"], json!("success"));
    assert_eq!(event.access_token.as_deref(), Some("tok-1"));

    // The created invoice is listed for its connection only, after the seeds.
    let created_id = invoice["id"].clone();
    let mine = call(
        &client,
        "GET",
        &emu.url("/accounting/invoices?access_token=tok-1"),
        &[],
        "",
    )
    .await
    .json();
    let ids: Vec<&Value> = mine["invoices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| &i["id"])
        .collect();
    assert_eq!(ids.len(), 4);
    assert_eq!(ids[3], &created_id);
    let theirs = call(
        &client,
        "GET",
        &emu.url("/accounting/invoices?access_token=tok-2"),
        &[],
        "",
    )
    .await
    .json();
    assert_eq!(theirs["invoices"].as_array().unwrap().len(), 3);
    let one = call(
        &client,
        "GET",
        &emu.url(&format!(
            "/versioned/accounting/invoices/{}?access_token=tok-1",
            created_id.as_str().unwrap()
        )),
        &[],
        "",
    )
    .await;
    assert_eq!(one.status, StatusCode::OK);
    assert_eq!(one.json()["invoice"]["id"], created_id);

    let counters = emu.emulator.counters();
    assert_eq!(counters.writes_accepted, 1);
    assert_eq!(counters.jobs_created, 1);
    assert_eq!(counters.jobs_finished, 1);
    assert_eq!(counters.async_answers, 1);
    assert!(counters.polls >= 3);
    emu.stop().await;
}

#[tokio::test]
async fn prefer_sync_answers_the_entity_when_the_job_is_short() {
    let emu = start(EmulatorOptions {
        job_ms: 100,
        ..options()
    })
    .await;
    let client = client();
    let started = Instant::now();
    // Legacy root, no response_mode at all.
    let answer = call(
        &client,
        "POST",
        &emu.url("/accounting/invoices?access_token=t"),
        &[],
        INVOICE,
    )
    .await;
    assert!(started.elapsed() >= Duration::from_millis(100));
    assert_eq!(answer.status, StatusCode::OK);
    let job_id = answer
        .job_id()
        .expect("accepted requests carry X-Rutter-Job-ID")
        .to_string();
    let body = answer.json();
    assert_eq!(body["invoice"]["document_number"], json!("INV-10042"));
    assert!(body.get("async_response").is_none());
    let job = emu.emulator.job(&job_id).unwrap();
    assert_eq!(job["status"], json!("success"));
    assert_eq!(job["response"]["body"], body);

    // prefer_sync in the body, explicitly.
    let with_mode = r#"{"response_mode": "prefer_sync", "customer": {"name": "Zoë"}}"#;
    let answer = call(
        &client,
        "POST",
        &emu.url("/versioned/accounting/customers?access_token=t"),
        &[],
        with_mode,
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.json()["customer"]["name"], json!("Zoë"));
    assert_eq!(emu.emulator.counters().sync_answers, 2);
    emu.stop().await;
}

#[tokio::test]
async fn prefer_sync_gives_up_after_the_sync_limit() {
    // 10% of 1500 ms is 150 ms: by the 200 ms limit the job is `pending`.
    let emu = start(EmulatorOptions {
        job_ms: 1500,
        sync_limit_ms: 200,
        ..options()
    })
    .await;
    let client = client();
    let started = Instant::now();
    let answer = call(
        &client,
        "POST",
        &emu.url("/versioned/accounting/invoices?access_token=t&response_mode=prefer_sync"),
        &[],
        INVOICE,
    )
    .await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(200) && waited < Duration::from_millis(2000),
        "{waited:?}"
    );
    assert_eq!(answer.status, StatusCode::OK);
    let body = answer.json();
    let id = body["async_response"]["id"].as_str().unwrap();
    assert_eq!(answer.job_id(), Some(id));
    assert_eq!(body["async_response"]["status"], json!("pending"));
    assert_eq!(emu.emulator.counters().async_answers, 1);
    emu.stop().await;
}

#[tokio::test]
async fn failed_jobs_and_rejected_requests() {
    let emu = start(options()).await;
    let client = client();
    // Accepted, then fails (job-failure.json).
    let body = r#"{"response_mode": "async", "invoice": {"customer_id": "unknown"}}"#;
    let answer = call(
        &client,
        "POST",
        &emu.url("/versioned/accounting/invoices?access_token=t"),
        &[],
        body,
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    let url = answer.json()["async_response"]["response_url"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, job) = poll_until_terminal(&client, &url).await;
    assert_eq!(job["status"], json!("failure"));
    assert_eq!(job["response"]["http_status"], json!(400));
    assert_eq!(
        job["response"]["body"]["error_type"],
        json!("INVALID_REQUEST")
    );
    assert_eq!(
        job["response"]["body"]["error_code"],
        json!("INVALID_INPUT")
    );
    assert!(job["response"]["body"]["error_message"].is_string());

    // Missing customer_id, prefer_sync: the sync answer is the job's 400.
    let answer = call(
        &client,
        "POST",
        &emu.url("/versioned/accounting/invoices?access_token=t"),
        &[],
        r#"{"invoice": {"memo": "x"}}"#,
    )
    .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert!(answer.job_id().is_some(), "accepted, so it has a job id");
    assert_error_shape(&answer, "INVALID_INPUT");

    // Not a JSON object: rejected at once, no job.
    for bad in ["[1, 2]", "not json", ""] {
        let answer = call(
            &client,
            "POST",
            &emu.url("/versioned/accounting/invoices?access_token=t"),
            &[],
            bad,
        )
        .await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{bad:?}");
        assert!(answer.job_id().is_none());
        assert_eq!(answer.json()["error_type"], json!("INVALID_REQUEST"));
    }

    // X-Emulator-Fail on a prefer_sync write.
    let answer = call(
        &client,
        "POST",
        &emu.url("/versioned/accounting/bills?access_token=t"),
        &[("X-Emulator-Fail", "450")],
        r#"{"bill": {}}"#,
    )
    .await;
    assert_eq!(answer.status.as_u16(), 450);
    let id = answer.job_id().unwrap().to_string();
    assert_eq!(emu.emulator.job(&id).unwrap()["status"], json!("failure"));
    assert_eq!(emu.emulator.counters().jobs_created, 3);
    emu.stop().await;
}

#[tokio::test]
async fn unknown_jobs_are_404_in_rutter_shape() {
    let emu = start(options()).await;
    let client = client();
    for path in [
        "/versioned/jobs/3446b185-117f-46bc-939b-aa53de5c35c1",
        "/jobs/nope",
    ] {
        let answer = call(&client, "GET", &emu.url(path), &[], "").await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND);
        assert_error_shape(&answer, "NOT_FOUND");
    }
    assert!(emu.emulator.job("nope").is_none());
    assert_eq!(emu.emulator.counters().polls, 2);
    emu.stop().await;
}

#[tokio::test]
async fn idempotency_keys_replay_or_conflict() {
    let emu = start(options()).await;
    let client = client();
    let url = emu.url("/versioned/accounting/invoices?access_token=t1&response_mode=async");
    let first = call(
        &client,
        "POST",
        &url,
        &[("Idempotency-Key", "same")],
        INVOICE,
    )
    .await;
    let id = first.json()["async_response"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    // Same request, response_mode moved into the body and keys reordered: still the same request.
    let mut reordered: Value = serde_json::from_str(INVOICE).unwrap();
    reordered["response_mode"] = json!("async");
    let reordered = serde_json::to_string(&reordered).unwrap();
    let second = call(
        &client,
        "POST",
        &emu.url("/versioned/accounting/invoices?access_token=t1"),
        &[("Idempotency-Key", "same")],
        &reordered,
    )
    .await;
    assert_eq!(second.status, StatusCode::OK);
    assert_eq!(second.job_id(), Some(id.as_str()));
    assert_eq!(second.json()["async_response"]["id"], json!(id));

    // A prefer_sync replay is held for the same job and gets its result.
    let third = call(
        &client,
        "POST",
        &emu.url("/versioned/accounting/invoices?access_token=t1"),
        &[("Idempotency-Key", "same")],
        INVOICE,
    )
    .await;
    assert_eq!(third.job_id(), Some(id.as_str()));
    assert!(third.json()["invoice"]["id"].is_string());

    // Different body: 409 with the fixture body, no job.
    let other = INVOICE.replace("INV-10042", "INV-99999");
    let conflict = call(
        &client,
        "POST",
        &url,
        &[("Idempotency-Key", "same")],
        &other,
    )
    .await;
    assert_eq!(conflict.status, StatusCode::CONFLICT);
    assert!(conflict.job_id().is_none());
    assert_eq!(
        conflict.json(),
        serde_json::from_str::<Value>(CONFLICT).unwrap()
    );

    // Another connection may use the same key.
    let elsewhere = call(
        &client,
        "POST",
        &emu.url("/versioned/accounting/invoices?access_token=t2&response_mode=async"),
        &[("Idempotency-Key", "same")],
        INVOICE,
    )
    .await;
    assert_ne!(elsewhere.job_id(), Some(id.as_str()));

    let counters = emu.emulator.counters();
    assert_eq!(counters.writes_accepted, 2);
    assert_eq!(counters.idempotent_replays, 2);
    assert_eq!(counters.idempotency_conflicts, 1);
    emu.stop().await;
}

#[tokio::test]
async fn basic_auth_is_checked_when_configured() {
    let emu = start(EmulatorOptions {
        client_id: Some("client".into()),
        client_secret: Some("s3cret".into()),
        ..options()
    })
    .await;
    let client = client();
    let good = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("client:s3cret")
    );
    let bad = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("client:wrong")
    );
    let url = emu.url("/versioned/accounting/invoices?access_token=t&response_mode=async");
    for headers in [
        vec![],
        vec![("Authorization", bad.as_str())],
        vec![("Authorization", "Bearer x")],
    ] {
        let answer = call(&client, "POST", &url, &headers, INVOICE).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
        assert_error_shape(&answer, "INVALID_CREDENTIALS");
        assert!(answer.job_id().is_none());
    }
    let answer = call(&client, "POST", &url, &[("Authorization", &good)], INVOICE).await;
    assert_eq!(answer.status, StatusCode::OK);
    let poll_url = answer.json()["async_response"]["response_url"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        call(&client, "GET", &poll_url, &[], "").await.status,
        StatusCode::UNAUTHORIZED
    );
    // Polls need Basic auth but no access_token.
    assert_eq!(
        call(&client, "GET", &poll_url, &[("Authorization", &good)], "")
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(emu.emulator.counters().unauthorized, 4);
    emu.stop().await;
}

#[tokio::test]
async fn access_token_is_required_on_connection_routes() {
    let emu = start(options()).await;
    let client = client();
    let answer = call(
        &client,
        "POST",
        &emu.url("/versioned/accounting/invoices?response_mode=async"),
        &[],
        INVOICE,
    )
    .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert!(answer.job_id().is_none());
    assert_eq!(answer.json()["error_type"], json!("INVALID_REQUEST"));
    let answer = call(
        &client,
        "GET",
        &emu.url("/versioned/accounting/invoices?access_token="),
        &[],
        "",
    )
    .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    // Exempt routes.
    assert_eq!(
        call(&client, "GET", &emu.url("/versioned/connections"), &[], "")
            .await
            .status,
        StatusCode::OK
    );
    let exchange = call(
        &client,
        "POST",
        &emu.url("/versioned/item/public_token/exchange"),
        &[],
        r#"{"public_token": "p"}"#,
    )
    .await;
    assert_eq!(exchange.status, StatusCode::OK);
    assert!(exchange.json()["access_token"].is_string());
    assert_eq!(emu.emulator.counters().jobs_created, 0);
    emu.stop().await;

    let relaxed = start(EmulatorOptions {
        no_access_token_check: true,
        ..options()
    })
    .await;
    let answer = call(
        &client,
        "GET",
        &relaxed.url("/versioned/accounting/invoices"),
        &[],
        "",
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    relaxed.stop().await;
}

#[tokio::test]
async fn lists_paginate_over_seeded_and_created_entities() {
    let emu = start(EmulatorOptions {
        seed_entities: 7,
        ..options()
    })
    .await;
    let client = client();
    let mut created = Vec::new();
    for n in 0..3 {
        let body = format!(r#"{{"account": {{"name": "Account {n}"}}}}"#);
        let answer = call(
            &client,
            "POST",
            &emu.url("/versioned/accounting/accounts?access_token=t"),
            &[("X-Emulator-Sync", "1")],
            &body,
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK);
        assert!(answer.job_id().is_some());
        created.push(answer.json()["account"]["id"].as_str().unwrap().to_string());
    }
    let mut ids = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut path = "/versioned/accounting/accounts?access_token=t&limit=4".to_string();
        if let Some(cursor) = &cursor {
            path.push_str("&cursor=");
            path.push_str(
                &cursor
                    .replace('+', "%2B")
                    .replace('/', "%2F")
                    .replace('=', "%3D"),
            );
        }
        let page = call(&client, "GET", &emu.url(&path), &[], "").await;
        assert_eq!(page.status, StatusCode::OK);
        let page = page.json();
        pages += 1;
        let items = page["accounts"].as_array().unwrap();
        assert!(items.len() <= 4);
        ids.extend(items.iter().map(|i| i["id"].as_str().unwrap().to_string()));
        match &page["next_cursor"] {
            Value::String(next) => cursor = Some(next.clone()),
            Value::Null => break,
            other => panic!("next_cursor is {other}"),
        }
        assert!(pages < 10);
    }
    assert_eq!(pages, 3);
    assert_eq!(ids.len(), 10);
    assert_eq!(&ids[7..], &created[..]);
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 10);

    let answer = call(
        &client,
        "GET",
        &emu.url("/versioned/accounting/accounts?access_token=t&cursor=%21%21"),
        &[],
        "",
    )
    .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    let answer = call(
        &client,
        "GET",
        &emu.url("/versioned/accounting/accounts?access_token=t&limit=0"),
        &[],
        "",
    )
    .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    let answer = call(
        &client,
        "GET",
        &emu.url("/versioned/accounting/accounts/nope?access_token=t"),
        &[],
        "",
    )
    .await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    emu.stop().await;
}

#[tokio::test]
async fn poll_faults_come_first_in_order() {
    let emu = start(EmulatorOptions {
        job_ms: 50,
        ..options()
    })
    .await;
    let client = client();
    let answer = call(
        &client,
        "POST",
        &emu.url("/versioned/accounting/invoices?access_token=t&response_mode=async"),
        &[
            ("X-Emulator-Poll-Faults", "429,503,404"),
            ("x-emulator-poll-retry-after", "2"),
        ],
        INVOICE,
    )
    .await;
    let url = answer.json()["async_response"]["response_url"]
        .as_str()
        .unwrap()
        .to_string();
    let first = call(&client, "GET", &url, &[], "").await;
    assert_eq!(first.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(first.header("retry-after"), Some("2"));
    assert_eq!(
        first.json(),
        serde_json::from_str::<Value>(RATE_LIMITED).unwrap()
    );
    let second = call(&client, "GET", &url, &[], "").await;
    assert_eq!(second.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(second.json()["error_type"], json!("SERVER_ERROR"));
    let third = call(&client, "GET", &url, &[], "").await;
    assert_eq!(third.status, StatusCode::NOT_FOUND);
    let (_, job) = poll_until_terminal(&client, &url).await;
    assert_eq!(job["status"], json!("success"));
    let counters = emu.emulator.counters();
    assert_eq!(counters.rate_limited, 1);
    assert_eq!(counters.server_errors, 1);
    emu.stop().await;
}

#[tokio::test]
async fn scripted_status_answers_at_once_without_a_job() {
    let emu = start(options()).await;
    let client = client();
    let url = emu.url("/versioned/accounting/invoices?access_token=t&response_mode=async");
    let answer = call(
        &client,
        "POST",
        &url,
        &[
            ("X-Emulator-Status", "429"),
            ("X-Emulator-Retry-After", "7"),
        ],
        INVOICE,
    )
    .await;
    assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(answer.header("retry-after"), Some("7"));
    assert_eq!(
        answer.json(),
        serde_json::from_str::<Value>(RATE_LIMITED).unwrap()
    );
    assert!(answer.job_id().is_none());
    let answer = call(
        &client,
        "POST",
        &url,
        &[("X-Emulator-Status", "452")],
        INVOICE,
    )
    .await;
    assert_eq!(answer.status.as_u16(), 452);
    assert_eq!(answer.json()["error_type"], json!("RATE_LIMIT_ERROR"));
    let answer = call(
        &client,
        "POST",
        &url,
        &[("X-Emulator-Status", "502")],
        INVOICE,
    )
    .await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    let answer = call(
        &client,
        "POST",
        &url,
        &[("X-Emulator-Status", "banana")],
        INVOICE,
    )
    .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_error_shape(&answer, "INVALID_EMULATOR_HEADER");
    let counters = emu.emulator.counters();
    assert_eq!(counters.jobs_created, 0);
    assert_eq!(
        (
            counters.rate_limited,
            counters.platform_limited,
            counters.server_errors
        ),
        (1, 1, 1)
    );
    emu.stop().await;
}

#[tokio::test]
async fn the_rate_budget_counts_every_request_per_window() {
    let emu = start(EmulatorOptions {
        rate_limit: 3,
        rate_window_ms: 1000,
        ..options()
    })
    .await;
    let client = client();
    let write = emu.url("/versioned/accounting/invoices?access_token=t&response_mode=async");
    let answer = call(&client, "POST", &write, &[], INVOICE).await;
    let poll = answer.json()["async_response"]["response_url"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        call(&client, "GET", &poll, &[], "").await.status,
        StatusCode::OK
    );
    assert_eq!(
        call(&client, "GET", &emu.url("/jobs/unknown"), &[], "")
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    let limited = call(&client, "GET", &poll, &[], "").await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(limited.header("retry-after"), Some("1"));
    assert_eq!(
        limited.json(),
        serde_json::from_str::<Value>(RATE_LIMITED).unwrap()
    );
    assert_eq!(
        call(&client, "POST", &write, &[], INVOICE).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    tokio::time::sleep(Duration::from_millis(1050)).await;
    assert_eq!(
        call(&client, "GET", &poll, &[], "").await.status,
        StatusCode::OK
    );
    let counters = emu.emulator.counters();
    assert_eq!(counters.rate_limited, 2);
    assert_eq!(counters.writes_accepted, 1);
    emu.stop().await;
}

#[tokio::test]
async fn reset_closes_the_connection_without_an_answer() {
    let emu = start(options()).await;
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http();
    let url = emu.url("/versioned/accounting/invoices?access_token=t&response_mode=async");
    let result = tokio::time::timeout(
        Duration::from_secs(5),
        try_call(&client, "POST", &url, &[("X-Emulator-Reset", "1")], INVOICE),
    )
    .await
    .expect("a reset is not a hang");
    assert!(
        result.is_err(),
        "expected a transport error, got {result:?}"
    );
    assert_eq!(emu.emulator.counters().jobs_created, 0);

    // `after`: the write is accepted, the answer lost; a retry with the same key finds the job.
    let result = try_call(
        &client,
        "POST",
        &url,
        &[("X-Emulator-Reset", "after"), ("Idempotency-Key", "lost")],
        INVOICE,
    )
    .await;
    assert!(result.is_err());
    let retry = call(
        &client,
        "POST",
        &url,
        &[("Idempotency-Key", "lost")],
        INVOICE,
    )
    .await;
    assert_eq!(retry.status, StatusCode::OK);
    let counters = emu.emulator.counters();
    assert_eq!(
        (
            counters.resets,
            counters.writes_accepted,
            counters.idempotent_replays
        ),
        (2, 1, 1)
    );

    // HTTP/2: the stream is reset; the connection keeps serving other streams.
    let h2: HttpClient = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let result = tokio::time::timeout(
        Duration::from_secs(5),
        try_call(
            &h2,
            "GET",
            &emu.url("/versioned/accounting/items?access_token=t"),
            &[("X-Emulator-Reset", "1")],
            "",
        ),
    )
    .await
    .expect("a reset is not a hang");
    assert!(result.is_err(), "expected a stream error, got {result:?}");
    let answer = call(
        &h2,
        "GET",
        &emu.url("/versioned/accounting/items?access_token=t"),
        &[],
        "",
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(emu.emulator.counters().resets, 3);
    emu.stop().await;
}

#[tokio::test]
async fn h2c_prior_knowledge_and_job_knobs() {
    let emu = start(options()).await;
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let url = emu.url("/versioned/accounting/invoices?access_token=t&response_mode=async");

    let answer = call(
        &client,
        "POST",
        &url,
        &[
            ("X-Emulator-Async-Status", "202"),
            ("X-Emulator-Response-Url", "http://elsewhere.test/jobs/x"),
        ],
        INVOICE,
    )
    .await;
    assert_eq!(answer.version, Version::HTTP_2);
    assert_eq!(answer.status, StatusCode::ACCEPTED);
    assert_eq!(
        answer.json()["async_response"]["response_url"],
        json!("http://elsewhere.test/jobs/x")
    );
    // HTTP/2 has no Host header: the URL comes from :authority.
    let id = answer.job_id().unwrap().to_string();
    assert_eq!(emu.emulator.job(&id).unwrap()["request"]["url"], json!(url));

    // X-Emulator-Sync ignores response_mode=async and answers the entity at once.
    let answer = call(&client, "POST", &url, &[("X-Emulator-Sync", "1")], INVOICE).await;
    assert!(answer.json()["invoice"].is_object());
    let id = answer.job_id().unwrap().to_string();
    assert_eq!(emu.emulator.job(&id).unwrap()["status"], json!("success"));

    // Forced statuses and broken jobs.
    let answer = call(
        &client,
        "POST",
        &url,
        &[
            ("X-Emulator-Job-Status", "partial_success"),
            ("X-Emulator-Job-Ms", "20"),
        ],
        INVOICE,
    )
    .await;
    let poll = answer.json()["async_response"]["response_url"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, job) = poll_until_terminal(&client, &poll).await;
    assert_eq!(job["status"], json!("partial_success"));

    let answer = call(
        &client,
        "POST",
        &url,
        &[
            ("X-Emulator-Bad-Job", "no-response"),
            ("X-Emulator-Job-Ms", "20"),
        ],
        INVOICE,
    )
    .await;
    let poll = answer.json()["async_response"]["response_url"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, job) = poll_until_terminal(&client, &poll).await;
    assert!(job.get("response").is_none());

    let answer = call(
        &client,
        "POST",
        &url,
        &[("X-Emulator-Bad-Job", "not-json")],
        INVOICE,
    )
    .await;
    let poll = answer.json()["async_response"]["response_url"]
        .as_str()
        .unwrap()
        .to_string();
    let broken = call(&client, "GET", &poll, &[], "").await;
    assert_eq!(broken.status, StatusCode::OK);
    assert!(serde_json::from_slice::<Value>(&broken.body).is_err());

    let answer = call(
        &client,
        "POST",
        &url,
        &[
            ("X-Emulator-Never-Finish", "1"),
            ("X-Emulator-Job-Ms", "10"),
        ],
        INVOICE,
    )
    .await;
    let id = answer.job_id().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(emu.emulator.job(&id).unwrap()["status"], json!("pending"));

    // Report GETs are job-backed too (response_mode as a query parameter).
    let answer = call(
        &client,
        "GET",
        &emu.url("/versioned/accounting/balance_sheets?access_token=t&response_mode=async"),
        &[],
        "",
    )
    .await;
    assert!(answer.json()["async_response"]["id"].is_string());
    let answer = call(
        &client,
        "GET",
        &emu.url("/versioned/accounting/income_statements?access_token=t"),
        &[("X-Emulator-Job-Ms", "10")],
        "",
    )
    .await;
    assert!(answer.json()["income_statements"][0]["net_income"].is_number());
    emu.stop().await;
}

#[tokio::test]
async fn other_writes_patch_delete_and_direct_routes() {
    let emu = start(EmulatorOptions {
        job_ms: 10,
        ..options()
    })
    .await;
    let client = client();
    let list = call(
        &client,
        "GET",
        &emu.url("/versioned/accounting/vendors?access_token=t"),
        &[],
        "",
    )
    .await
    .json();
    let seeded = list["vendors"][0]["id"].as_str().unwrap().to_string();
    let answer = call(
        &client,
        "PATCH",
        &emu.url(&format!(
            "/versioned/accounting/vendors/{seeded}?access_token=t"
        )),
        &[],
        r#"{"vendor": {"name": "Renamed"}}"#,
    )
    .await;
    assert_eq!(answer.json()["vendor"]["id"], json!(seeded));
    assert_eq!(answer.json()["vendor"]["name"], json!("Renamed"));
    let answer = call(
        &client,
        "DELETE",
        &emu.url(&format!(
            "/versioned/accounting/vendors/{seeded}?access_token=t"
        )),
        &[],
        "",
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.json()["vendor"]["deleted"], json!(true));
    assert!(answer.job_id().is_some());
    let list = call(
        &client,
        "GET",
        &emu.url("/versioned/accounting/vendors?access_token=t"),
        &[],
        "",
    )
    .await
    .json();
    assert_eq!(list["vendors"].as_array().unwrap().len(), 2);

    let product = include_str_product();
    let answer = call(
        &client,
        "POST",
        &emu.url("/versioned/products?access_token=t"),
        &[],
        product,
    )
    .await;
    assert_eq!(
        answer.json()["product"]["name"],
        json!("Stoneware mug, 350 ml")
    );
    let answer = call(
        &client,
        "POST",
        &emu.url("/versioned/orders/o-1/fulfillments?access_token=t"),
        &[],
        r#"{"fulfillment": {"tracking_number": "1Z"}}"#,
    )
    .await;
    assert_eq!(answer.json()["fulfillment"]["order_id"], json!("o-1"));
    // Commerce POST /orders is not async-capable: answered directly, no job.
    let answer = call(
        &client,
        "POST",
        &emu.url("/versioned/orders?access_token=t"),
        &[],
        r#"{"order": {"note": "n"}}"#,
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(answer.job_id().is_none());
    assert!(answer.json()["order"]["id"].is_string());
    let answer = call(
        &client,
        "PUT",
        &emu.url("/versioned/accounting/invoices?access_token=t"),
        &[],
        "{}",
    )
    .await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);

    // Large list bodies are padded and streamed.
    let answer = call(
        &client,
        "GET",
        &emu.url("/versioned/accounting/invoices?access_token=t&limit=2"),
        &[("X-Emulator-Body-Bytes", "1000000")],
        "",
    )
    .await;
    assert!(answer.body.len() >= 1_000_000);
    let body = answer.json();
    assert!(body["invoices"].as_array().unwrap().len() > 1000);
    assert!(body["next_cursor"].is_string());
    assert_eq!(emu.emulator.counters().writes_accepted, 4);
    emu.stop().await;
}

fn include_str_product() -> &'static str {
    r#"{"product": {"name": "Stoneware mug, 350 ml", "product_type": "physical",
       "variants": [{"sku": "MUG-350-BLU", "price": 18.0}]}}"#
}

#[tokio::test]
async fn shutdown_lets_held_requests_finish() {
    let emu = start(EmulatorOptions {
        job_ms: 300,
        ..options()
    })
    .await;
    let client = client();
    let url = emu.url("/versioned/accounting/invoices?access_token=t");
    let held = tokio::spawn({
        let client = client.clone();
        async move { try_call(&client, "POST", &url, &[], INVOICE).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    emu.stop().await;
    let answer = held.await.unwrap().expect("the held request is answered");
    assert_eq!(answer.status, StatusCode::OK);
    assert!(answer.json()["invoice"].is_object());
}

#[tokio::test]
async fn fault_rates_are_reproducible_with_a_seed() {
    async fn run() -> Vec<u16> {
        let emu = start(EmulatorOptions {
            error_rate: 0.5,
            seed: Some(42),
            ..options()
        })
        .await;
        let client = client();
        let mut statuses = Vec::new();
        for _ in 0..12 {
            statuses.push(
                call(
                    &client,
                    "GET",
                    &emu.url("/versioned/accounting/items?access_token=t"),
                    &[],
                    "",
                )
                .await
                .status
                .as_u16(),
            );
        }
        emu.stop().await;
        statuses
    }
    let first = run().await;
    assert!(first.contains(&503) && first.contains(&200), "{first:?}");
    assert_eq!(first, run().await);
}

// ---------------------------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------------------------

struct TestPki {
    dir: std::path::PathBuf,
    ca_der: Vec<u8>,
}

fn test_pki() -> TestPki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "emulator test CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_params =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &ca, &ca_key).unwrap();
    let dir = std::env::temp_dir().join(format!("rutter-emulator-tls-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cert.pem"), leaf.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), leaf_key.serialize_pem()).unwrap();
    TestPki {
        dir,
        ca_der: ca.der().to_vec(),
    }
}

fn tls_client(
    ca_der: &[u8],
    http2: bool,
) -> Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from(ca_der.to_vec()))
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only();
    let connector = if http2 {
        builder.enable_http1().enable_http2().build()
    } else {
        builder.enable_http1().build()
    };
    Client::builder(TokioExecutor::new()).build(connector)
}

#[tokio::test]
async fn tls_serves_h2_and_http1_with_alpn() {
    let pki = test_pki();
    let emu = start(EmulatorOptions {
        tls_cert: Some(pki.dir.join("cert.pem")),
        tls_key: Some(pki.dir.join("key.pem")),
        job_ms: 50,
        ..options()
    })
    .await;
    assert!(emu.emulator.is_tls());
    for (http2, version) in [(true, Version::HTTP_2), (false, Version::HTTP_11)] {
        let client = tls_client(&pki.ca_der, http2);
        let answer = call(
            &client,
            "POST",
            &emu.url("/versioned/accounting/invoices?access_token=t&response_mode=async"),
            &[],
            INVOICE,
        )
        .await;
        assert_eq!(answer.version, version);
        let url = answer.json()["async_response"]["response_url"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(url.starts_with("https://127.0.0.1:"), "{url}");
        let sync = call(
            &client,
            "POST",
            &emu.url("/versioned/accounting/invoices?access_token=t"),
            &[],
            INVOICE,
        )
        .await;
        assert!(sync.json()["invoice"].is_object());
        let job = call(&client, "GET", &url, &[], "").await;
        assert_eq!(job.status, StatusCode::OK);
    }
    emu.stop().await;
    let _ = std::fs::remove_dir_all(&pki.dir);

    let missing = Emulator::new(EmulatorOptions {
        tls_cert: Some(pki.dir.join("cert.pem")),
        tls_key: Some(pki.dir.join("key.pem")),
        ..options()
    });
    assert!(missing.is_err());
}
