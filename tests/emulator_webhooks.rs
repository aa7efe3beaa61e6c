//! Integration tests of the emulator's signed `JOB_COMPLETED` webhooks: each test starts the
//! emulator and a tiny scripted webhook receiver on `127.0.0.1:0`, drives jobs over real sockets,
//! and checks what the receiver got (bytes, headers, timing) and the emulator's counters.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rutter_sidecar::emulator::{sign, Counters, Emulator, EmulatorOptions};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

const SECRET: &str = "test-client-secret-ünï";
const TOKEN: &str = "00000000-0000-4000-8000-000000000001";
const INVOICE: &str = r#"{"invoice": {"customer_id": "8b3e6c0e-2f4a-4a4e-9a43-5d0c7b1f9e21", "document_number": "INV-10042", "memo": "café"}}"#;
const UNKNOWN_CUSTOMER: &str = r#"{"invoice": {"customer_id": "unknown"}}"#;

// ---------------------------------------------------------------------------------------------
// The webhook receiver.

/// One webhook as the receiver got it.
#[derive(Debug, Clone)]
struct Received {
    at: Instant,
    headers: HeaderMap,
    body: Bytes,
}

impl Received {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("the webhook body is JSON")
    }

    fn signature(&self) -> &str {
        self.headers
            .get("x-rutter-signature")
            .and_then(|v| v.to_str().ok())
            .expect("an X-Rutter-Signature header")
    }

    fn job_id(&self) -> String {
        self.json()["job"]["id"]
            .as_str()
            .expect("job.id")
            .to_string()
    }
}

/// A loopback HTTP/1.1 server that records every request and answers the scripted statuses in
/// order (then 200), each after `answer_delay`.
struct Receiver {
    addr: SocketAddr,
    log: Arc<Mutex<Vec<Received>>>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Receiver {
    async fn start(script: &[u16], answer_delay: Duration) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(script.iter().copied().collect::<VecDeque<_>>()));
        let (stop, mut stopped) = oneshot::channel::<()>();
        let task = {
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                let mut connections = JoinSet::new();
                loop {
                    tokio::select! {
                        _ = &mut stopped => break,
                        accepted = listener.accept() => {
                            let Ok((stream, _)) = accepted else { continue };
                            let log = Arc::clone(&log);
                            let script = Arc::clone(&script);
                            let service = service_fn(move |request: Request<Incoming>| {
                                let log = Arc::clone(&log);
                                let script = Arc::clone(&script);
                                async move {
                                    let at = Instant::now();
                                    let (parts, body) = request.into_parts();
                                    let body = body.collect().await.map(|b| b.to_bytes());
                                    let body = body.unwrap_or_default();
                                    assert_eq!(parts.method, Method::POST);
                                    log.lock().unwrap().push(Received {
                                        at,
                                        headers: parts.headers,
                                        body,
                                    });
                                    let status = script.lock().unwrap().pop_front().unwrap_or(200);
                                    tokio::time::sleep(answer_delay).await;
                                    let mut response = Response::new(Full::new(Bytes::from_static(b"ok")));
                                    *response.status_mut() = StatusCode::from_u16(status).unwrap();
                                    Ok::<_, Infallible>(response)
                                }
                            });
                            connections.spawn(async move {
                                let _ = hyper::server::conn::http1::Builder::new()
                                    .serve_connection(TokioIo::new(stream), service)
                                    .await;
                            });
                        }
                    }
                }
                connections.abort_all();
            })
        };
        Receiver {
            addr,
            log,
            stop: Some(stop),
            task,
        }
    }

    async fn ok() -> Receiver {
        Receiver::start(&[], Duration::ZERO).await
    }

    fn url(&self) -> http::Uri {
        format!("http://{}/hooks/rutter?source=emulator", self.addr)
            .parse()
            .unwrap()
    }

    fn received(&self) -> Vec<Received> {
        self.log.lock().unwrap().clone()
    }

    /// Waits until at least `n` webhooks arrived (at most `within`), then returns them all.
    async fn wait_for(&self, n: usize, within: Duration) -> Vec<Received> {
        let deadline = Instant::now() + within;
        loop {
            let received = self.received();
            if received.len() >= n {
                return received;
            }
            assert!(
                Instant::now() < deadline,
                "expected {n} webhooks within {within:?}, got {}",
                received.len()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("the receiver stops")
            .expect("the receiver does not panic");
    }
}

// ---------------------------------------------------------------------------------------------
// The emulator and a client.

struct Running {
    emulator: Emulator,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Running {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn counters(&self) -> Counters {
        self.emulator.counters()
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

fn options(receiver: &Receiver) -> EmulatorOptions {
    EmulatorOptions {
        job_ms: 100,
        sync_limit_ms: 3000,
        seed: Some(11),
        client_secret: Some(SECRET.into()),
        webhook_url: Some(receiver.url()),
        webhook_retry_ms: 50,
        ..Default::default()
    }
}

async fn start(options: EmulatorOptions) -> Running {
    let emulator = Emulator::new(options).expect("valid options");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
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

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

#[derive(Debug)]
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    at: Instant,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON answer")
    }

    fn job_id(&self) -> String {
        self.headers
            .get("x-rutter-job-id")
            .and_then(|v| v.to_str().ok())
            .expect("X-Rutter-Job-ID")
            .to_string()
    }
}

async fn call(
    client: &HttpClient,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer {
    let mut request = Request::builder()
        .method(Method::from_bytes(method.as_bytes()).unwrap())
        .uri(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let exchange = async {
        let response = client.request(request).await.expect("no transport error");
        let at = Instant::now();
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        Answer {
            status,
            headers,
            body,
            at,
        }
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .expect("an answer within 10 s")
}

/// An async-mode invoice create with `TOKEN`.
async fn create_invoice(emu: &Running, headers: &[(&str, &str)], body: &str) -> Answer {
    let url = emu.url(&format!(
        "/versioned/accounting/invoices?access_token={TOKEN}&response_mode=async"
    ));
    let answer = call(&client(), "POST", &url, headers, body).await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    answer
}

/// `GET /versioned/jobs/:id`.
async fn poll(emu: &Running, id: &str, headers: &[(&str, &str)]) -> Value {
    let answer = call(
        &client(),
        "GET",
        &emu.url(&format!("/versioned/jobs/{id}")),
        headers,
        "",
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    answer.json()
}

/// Whether `header` (`sha256=<base64>`) is the HMAC-SHA256 of `body` under `secret`, checked in
/// constant time, independently of the emulator's code.
fn verifies(secret: &[u8], body: &[u8], header: &str) -> bool {
    let Some(encoded) = header.strip_prefix("sha256=") else {
        return false;
    };
    let Ok(tag) = base64::engine::general_purpose::STANDARD.decode(encoded) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
    mac.update(body);
    mac.verify_slice(&tag).is_ok()
}

/// Waits until `check` holds for the counters (at most 3 s).
async fn counters_until(emu: &Running, check: impl Fn(&Counters) -> bool) -> Counters {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let counters = emu.counters();
        if check(&counters) {
            return counters;
        }
        assert!(
            Instant::now() < deadline,
            "counters never got there: {counters:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

const WAIT: Duration = Duration::from_secs(3);

// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn job_webhook_is_signed_over_the_exact_bytes_and_carries_the_polled_job() {
    let receiver = Receiver::ok().await;
    let emu = start(EmulatorOptions {
        client_id: Some("org-client".into()),
        ..options(&receiver)
    })
    .await;
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("org-client:{SECRET}"))
    );
    let auth = [("authorization", basic.as_str())];

    let answer = create_invoice(&emu, &auth, INVOICE).await;
    let id = answer.job_id();
    assert_eq!(answer.json()["async_response"]["id"], json!(id));
    let hooks = receiver.wait_for(1, WAIT).await;
    let hook = &hooks[0];

    // Headers and signature over the exact bytes received.
    assert_eq!(
        hook.headers.get("content-type").unwrap(),
        "application/json"
    );
    let signature = hook.signature();
    assert!(verifies(SECRET.as_bytes(), &hook.body, signature));
    assert_eq!(signature, sign(SECRET.as_bytes(), &hook.body));
    assert!(!verifies(b"another secret", &hook.body, signature));
    let mut tampered = hook.body.to_vec();
    tampered.push(b' ');
    assert!(!verifies(SECRET.as_bytes(), &tampered, signature));

    // The envelope, in the fixture's key order, and the job exactly as polled.
    assert!(
        hook.body
            .starts_with(br#"{"type":"JOB","code":"JOB_COMPLETED","connection_id":""#),
        "{}",
        String::from_utf8_lossy(&hook.body)
    );
    let body = hook.json();
    assert_eq!(body["access_token"], json!(TOKEN));
    let connection_id = body["connection_id"].as_str().unwrap();
    assert!(
        uuid::Uuid::parse_str(connection_id).is_ok(),
        "{connection_id}"
    );
    assert_eq!(body["job"]["id"], json!(id));
    assert_eq!(body["job"]["status"], json!("success"));
    assert_eq!(body["job"]["response"]["http_status"], json!(200));
    assert_eq!(body["job"], poll(&emu, &id, &auth).await);
    assert_eq!(Some(&body["job"]), emu.emulator.job(&id).as_ref());

    // The same token gets the same connection id; a minted connection's webhooks carry its id.
    create_invoice(&emu, &auth, INVOICE).await;
    let hooks = receiver.wait_for(2, WAIT).await;
    assert_eq!(hooks[1].json()["connection_id"], json!(connection_id));
    let minted = call(
        &client(),
        "POST",
        &emu.url("/versioned/item/public_token/exchange"),
        &auth,
        r#"{"public_token": "pt-1"}"#,
    )
    .await
    .json();
    let token = minted["access_token"].as_str().unwrap();
    let url = emu.url(&format!(
        "/versioned/accounting/invoices?access_token={token}&response_mode=async"
    ));
    call(&client(), "POST", &url, &auth, INVOICE).await;
    let hooks = receiver.wait_for(3, WAIT).await;
    let third = hooks[2].json();
    assert_eq!(third["access_token"], json!(token));
    assert_eq!(third["connection_id"], minted["connection_id"]);

    // The receiver records a webhook before answering it: wait for the answers to be counted.
    let counters = counters_until(&emu, |c| c.webhooks_delivered == 3).await;
    assert_eq!(counters.webhooks_sent, 3);
    assert_eq!(
        (
            counters.webhooks_failed,
            counters.webhooks_dropped,
            counters.webhook_retries
        ),
        (0, 0, 0)
    );
    emu.stop().await;
    receiver.stop().await;
}

#[tokio::test]
async fn failed_job_webhook_carries_the_failure() {
    let receiver = Receiver::ok().await;
    let emu = start(options(&receiver)).await;
    let answer = create_invoice(&emu, &[], UNKNOWN_CUSTOMER).await;
    let id = answer.job_id();
    let hooks = receiver.wait_for(1, WAIT).await;
    let body = hooks[0].json();
    assert!(verifies(
        SECRET.as_bytes(),
        &hooks[0].body,
        hooks[0].signature()
    ));
    assert_eq!(body["code"], json!("JOB_COMPLETED"));
    assert_eq!(body["job"]["id"], json!(id));
    assert_eq!(body["job"]["status"], json!("failure"));
    assert_eq!(body["job"]["response"]["http_status"], json!(400));
    assert_eq!(
        body["job"]["response"]["body"]["error_code"],
        json!("INVALID_INPUT")
    );
    assert_eq!(body["job"], poll(&emu, &id, &[]).await);

    // A scripted failure status, too.
    let answer = create_invoice(&emu, &[("x-emulator-fail", "450")], INVOICE).await;
    let hooks = receiver.wait_for(2, WAIT).await;
    let body = hooks[1].json();
    assert_eq!(body["job"]["id"], json!(answer.job_id()));
    assert_eq!(body["job"]["status"], json!("failure"));
    assert_eq!(body["job"]["response"]["http_status"], json!(450));
    emu.stop().await;
    receiver.stop().await;
}

#[tokio::test]
async fn delay_holds_the_webhook_back_and_the_header_overrides_it() {
    let receiver = Receiver::ok().await;
    let emu = start(EmulatorOptions {
        webhook_delay_ms: 400,
        ..options(&receiver)
    })
    .await;
    let mut completions = emu.emulator.completions();

    let answer = create_invoice(&emu, &[], INVOICE).await;
    let done = completions.recv().await.unwrap();
    assert_eq!(done.job_id, answer.job_id());
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(receiver.received().is_empty(), "held back by the delay");
    let hooks = receiver.wait_for(1, WAIT).await;
    let waited = hooks[0].at - done.at;
    assert!(waited >= Duration::from_millis(400), "{waited:?}");

    // delay=0 sends it at once; delay=N replaces the option.
    create_invoice(&emu, &[("x-emulator-webhook", "delay=0")], INVOICE).await;
    let done = completions.recv().await.unwrap();
    let hooks = receiver.wait_for(2, WAIT).await;
    let waited = hooks[1].at - done.at;
    assert!(waited < Duration::from_millis(300), "{waited:?}");
    create_invoice(&emu, &[("x-emulator-webhook", "delay=700")], INVOICE).await;
    let done = completions.recv().await.unwrap();
    let hooks = receiver.wait_for(3, WAIT).await;
    let waited = hooks[2].at - done.at;
    assert!(waited >= Duration::from_millis(700), "{waited:?}");
    emu.stop().await;
    receiver.stop().await;
}

#[tokio::test]
async fn duplicates_are_identical_copies() {
    let receiver = Receiver::ok().await;
    let emu = start(EmulatorOptions {
        webhook_duplicates: 2,
        ..options(&receiver)
    })
    .await;
    let answer = create_invoice(&emu, &[], INVOICE).await;
    let hooks = receiver.wait_for(3, WAIT).await;
    for hook in &hooks {
        assert_eq!(hook.body, hooks[0].body, "same bytes");
        assert_eq!(hook.signature(), hooks[0].signature(), "same signature");
        assert_eq!(hook.job_id(), answer.job_id());
        assert!(verifies(SECRET.as_bytes(), &hook.body, hook.signature()));
    }
    counters_until(&emu, |c| c.webhooks_delivered == 3).await;

    // Per request: duplicate=0 (no copy) and duplicate (one copy) replace the option.
    create_invoice(&emu, &[("x-emulator-webhook", "duplicate=0")], INVOICE).await;
    receiver.wait_for(4, WAIT).await;
    create_invoice(&emu, &[("X-Emulator-Webhook", "Duplicate")], INVOICE).await;
    let hooks = receiver.wait_for(6, WAIT).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(receiver.received().len(), 6, "no more copies than asked");
    assert_eq!(hooks[4].body, hooks[5].body);
    let counters = counters_until(&emu, |c| c.webhooks_delivered == 6).await;
    assert_eq!(counters.webhooks_sent, 6);
    emu.stop().await;
    receiver.stop().await;
}

#[tokio::test]
async fn dropped_webhooks_are_never_sent() {
    let receiver = Receiver::ok().await;
    let emu = start(options(&receiver)).await;
    let dropped = create_invoice(&emu, &[("x-emulator-webhook", "drop, duplicate")], INVOICE).await;
    let kept = create_invoice(&emu, &[], INVOICE).await;
    let hooks = receiver.wait_for(1, WAIT).await;
    assert_eq!(hooks[0].job_id(), kept.job_id());
    // The dropped job finished before the kept one: give stragglers a moment anyway.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ids: Vec<String> = receiver.received().iter().map(Received::job_id).collect();
    assert_eq!(ids, vec![kept.job_id()]);
    assert!(emu.emulator.job(&dropped.job_id()).is_some());
    let counters = emu.counters();
    assert_eq!(counters.webhooks_dropped, 2, "the webhook and its copy");
    assert_eq!(counters.webhooks_sent, 1);
    emu.stop().await;

    // --webhook-drop-rate 1: nothing is ever sent.
    let emu = start(EmulatorOptions {
        webhook_drop_rate: 1.0,
        ..options(&receiver)
    })
    .await;
    create_invoice(&emu, &[], INVOICE).await;
    let counters = counters_until(&emu, |c| c.jobs_finished == 1).await;
    assert_eq!(counters.webhooks_dropped, 1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(receiver.received().len(), 1, "nothing more arrived");
    assert_eq!(emu.counters().webhooks_sent, 0);
    emu.stop().await;
    receiver.stop().await;
}

#[tokio::test]
async fn bad_signatures_do_not_verify() {
    let receiver = Receiver::ok().await;
    let emu = start(options(&receiver)).await;
    create_invoice(&emu, &[("x-emulator-webhook", "bad-signature")], INVOICE).await;
    let hooks = receiver.wait_for(1, WAIT).await;
    let signature = hooks[0].signature();
    assert!(signature.starts_with("sha256="), "well-formed: {signature}");
    let tag = base64::engine::general_purpose::STANDARD
        .decode(&signature["sha256=".len()..])
        .unwrap();
    assert_eq!(tag.len(), 32, "a SHA-256-sized tag");
    assert!(!verifies(SECRET.as_bytes(), &hooks[0].body, signature));
    assert_ne!(signature, sign(SECRET.as_bytes(), &hooks[0].body));

    // A normal one still verifies.
    create_invoice(&emu, &[], INVOICE).await;
    let hooks = receiver.wait_for(2, WAIT).await;
    assert!(verifies(
        SECRET.as_bytes(),
        &hooks[1].body,
        hooks[1].signature()
    ));
    emu.stop().await;

    // --webhook-bad-signature-rate 1: every webhook is badly signed.
    let emu = start(EmulatorOptions {
        webhook_bad_signature_rate: 1.0,
        ..options(&receiver)
    })
    .await;
    create_invoice(&emu, &[], INVOICE).await;
    let hooks = receiver.wait_for(3, WAIT).await;
    assert!(!verifies(
        SECRET.as_bytes(),
        &hooks[2].body,
        hooks[2].signature()
    ));
    emu.stop().await;
    receiver.stop().await;
}

#[tokio::test]
async fn early_webhooks_beat_the_answer() {
    // The receiver takes 300 ms to answer: the write's answer waits for it.
    let receiver = Receiver::start(&[], Duration::from_millis(300)).await;
    let emu = start(EmulatorOptions {
        job_ms: 5000,
        ..options(&receiver)
    })
    .await;
    let sent = Instant::now();
    let answer = create_invoice(&emu, &[("x-emulator-webhook", "early")], INVOICE).await;
    let hooks = receiver.received();
    assert_eq!(hooks.len(), 1, "the webhook arrived before the answer");
    assert_eq!(hooks[0].job_id(), answer.job_id());
    assert!(hooks[0].at < answer.at);
    assert!(
        answer.at - sent >= Duration::from_millis(300),
        "delivery awaited"
    );
    assert!(answer.at - sent < Duration::from_secs(3), "job_ms ignored");
    let async_response = &answer.json()["async_response"];
    assert_eq!(async_response["id"], json!(answer.job_id()));
    assert_eq!(
        async_response["status"],
        json!("pending"),
        "as when accepted"
    );
    let job = poll(&emu, &answer.job_id(), &[]).await;
    assert_eq!(job["status"], json!("success"));
    assert_eq!(hooks[0].json()["job"], job);
    emu.stop().await;

    // --webhook-early with prefer_sync: the result is answered, after the webhook.
    let emu = start(EmulatorOptions {
        job_ms: 5000,
        webhook_early: true,
        ..options(&receiver)
    })
    .await;
    let url = emu.url(&format!(
        "/versioned/accounting/invoices?access_token={TOKEN}"
    ));
    let answer = call(&client(), "POST", &url, &[], INVOICE).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(answer.json()["invoice"]["id"].is_string(), "the result");
    let hooks = receiver.received();
    assert_eq!(hooks.len(), 2);
    assert_eq!(hooks[1].job_id(), answer.job_id());
    assert!(hooks[1].at < answer.at);
    emu.stop().await;
    receiver.stop().await;

    // A receiver that does not answer holds the write at most --webhook-timeout-ms.
    let silent = Receiver::start(&[], Duration::from_secs(30)).await;
    let emu = start(EmulatorOptions {
        webhook_timeout_ms: 300,
        webhook_retry_ms: 10_000,
        ..options(&silent)
    })
    .await;
    let sent = Instant::now();
    let answer = create_invoice(&emu, &[("x-emulator-webhook", "early")], INVOICE).await;
    let took = answer.at - sent;
    assert!(took >= Duration::from_millis(250), "{took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert_eq!(silent.received().len(), 1);
    emu.stop().await;
    silent.stop().await;
}

#[tokio::test]
async fn failed_deliveries_are_retried_with_backoff() {
    // 500, 500, then 200.
    let receiver = Receiver::start(&[500, 500], Duration::ZERO).await;
    let emu = start(EmulatorOptions {
        webhook_retry_ms: 100,
        ..options(&receiver)
    })
    .await;
    create_invoice(&emu, &[], INVOICE).await;
    let hooks = receiver.wait_for(3, WAIT).await;
    assert!(hooks[1].at - hooks[0].at >= Duration::from_millis(100));
    assert!(
        hooks[2].at - hooks[1].at >= Duration::from_millis(200),
        "doubled"
    );
    for hook in &hooks {
        assert_eq!(hook.body, hooks[0].body);
        assert_eq!(hook.signature(), hooks[0].signature());
    }
    let counters = counters_until(&emu, |c| c.webhooks_delivered == 1).await;
    assert_eq!(counters.webhooks_sent, 3);
    assert_eq!(counters.webhook_retries, 2);
    assert_eq!(counters.webhooks_failed, 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.received().len(), 3, "no retry after the 2xx");
    emu.stop().await;
    receiver.stop().await;
}

#[tokio::test]
async fn deliveries_are_given_up_after_six_retries() {
    // Always 503: the first attempt and 6 retries (5+10+20+40+80+160 ms apart), then nothing.
    let receiver = Receiver::start(&[503; 20], Duration::ZERO).await;
    let emu = start(EmulatorOptions {
        webhook_retry_ms: 5,
        ..options(&receiver)
    })
    .await;
    create_invoice(&emu, &[], INVOICE).await;
    let counters = counters_until(&emu, |c| c.webhooks_failed == 1).await;
    assert_eq!(counters.webhooks_sent, 7);
    assert_eq!(counters.webhook_retries, 6);
    assert_eq!(counters.webhooks_delivered, 0);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(receiver.received().len(), 7);
    emu.stop().await;
    receiver.stop().await;

    // Nobody listening (connection refused) is a failure too.
    let closed = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    let emu = start(EmulatorOptions {
        webhook_url: Some(format!("http://{closed}/hooks").parse().unwrap()),
        webhook_retry_ms: 5,
        client_secret: Some(SECRET.into()),
        job_ms: 50,
        ..Default::default()
    })
    .await;
    create_invoice(&emu, &[], INVOICE).await;
    let counters = counters_until(&emu, |c| c.webhooks_failed == 1).await;
    assert_eq!((counters.webhooks_sent, counters.webhook_retries), (7, 6));
    emu.stop().await;
}

#[tokio::test]
async fn send_webhook_signs_and_sends_any_body_once() {
    let receiver = Receiver::start(&[202, 500], Duration::ZERO).await;
    let emu = start(options(&receiver)).await;
    let body = json!({
        "type": "CONNECTION",
        "code": "INITIAL_UPDATE",
        "connection_id": "a7d3c1e0-5b2f-4e9a-8c6d-1f0e2d3c4b5a",
        "access_token": TOKEN,
    });
    let status = emu.emulator.send_webhook(body.clone()).await;
    assert_eq!(status, Ok(StatusCode::ACCEPTED));
    let hooks = receiver.wait_for(1, WAIT).await;
    assert_eq!(hooks[0].body, serde_json::to_vec(&body).unwrap());
    assert!(verifies(
        SECRET.as_bytes(),
        &hooks[0].body,
        hooks[0].signature()
    ));
    assert_eq!(hooks[0].json(), body);

    // Not retried: the receiver's status is the answer.
    let status = emu.emulator.send_webhook(body.clone()).await;
    assert_eq!(status, Ok(StatusCode::INTERNAL_SERVER_ERROR));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(receiver.received().len(), 2);
    let counters = emu.counters();
    assert_eq!(
        (counters.webhooks_sent, counters.webhooks_delivered),
        (2, 1)
    );
    assert_eq!(counters.webhook_retries, 0);
    emu.stop().await;
    receiver.stop().await;

    // Without a webhook URL, or with nobody listening: an error.
    let plain = Emulator::new(EmulatorOptions::default()).unwrap();
    assert!(plain.send_webhook(body.clone()).await.is_err());
    let closed = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    let unreachable = Emulator::new(EmulatorOptions {
        webhook_url: Some(format!("http://{closed}/").parse().unwrap()),
        client_secret: Some(SECRET.into()),
        ..Default::default()
    })
    .unwrap();
    assert!(unreachable.send_webhook(body).await.is_err());
}

#[tokio::test]
async fn webhook_settings_are_validated() {
    let url: http::Uri = "http://127.0.0.1:9/hooks".parse().unwrap();
    let error = Emulator::new(EmulatorOptions {
        webhook_url: Some(url.clone()),
        ..Default::default()
    })
    .unwrap_err()
    .to_string();
    assert!(error.contains("client_secret"), "{error}");
    assert!(Emulator::new(EmulatorOptions {
        webhook_url: Some(url),
        client_secret: Some(SECRET.into()),
        webhook_drop_rate: 1.5,
        ..Default::default()
    })
    .is_err());

    // A malformed header is refused before any job exists.
    let receiver = Receiver::ok().await;
    let emu = start(options(&receiver)).await;
    let url = emu.url(&format!(
        "/versioned/accounting/invoices?access_token={TOKEN}&response_mode=async"
    ));
    let answer = call(
        &client(),
        "POST",
        &url,
        &[("x-emulator-webhook", "eventually")],
        INVOICE,
    )
    .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        answer.json()["error_code"],
        json!("INVALID_EMULATOR_HEADER")
    );
    assert_eq!(emu.counters().jobs_created, 0);

    // Without --webhook-url the header is accepted and nothing is sent.
    let quiet = start(EmulatorOptions {
        webhook_url: None,
        ..options(&receiver)
    })
    .await;
    let url = quiet.url(&format!(
        "/versioned/accounting/invoices?access_token={TOKEN}&response_mode=async"
    ));
    let answer = call(
        &client(),
        "POST",
        &url,
        &[("x-emulator-webhook", "early,duplicate")],
        INVOICE,
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    counters_until(&quiet, |c| c.jobs_finished == 1).await;
    assert_eq!(quiet.counters().webhooks_sent, 0);
    assert!(receiver.received().is_empty());
    quiet.stop().await;
    emu.stop().await;
    receiver.stop().await;
}
