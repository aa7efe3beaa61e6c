//! Test harness: the emulator and the sidecar in-process on `127.0.0.1:0`, a plain HTTP client, and
//! helpers to read what the app got and what Rutter saw. Every server is stopped when the harness drops.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rutter_sidecar::config::{BaseUrl, Config, Credentials};
use rutter_sidecar::emulator::{Emulator, EmulatorOptions};
use rutter_sidecar::server::{Listeners, Sidecar};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// An access token the emulator accepts.
pub const TOKEN: &str = "00000000-0000-4000-8000-000000000001";

/// The fixture invoice body (2024-08-31 shape, non-ASCII on purpose).
pub const INVOICE: &str = r#"{
  "invoice": {
    "customer_id": "8b3e6c0e-2f4a-4a4e-9a43-5d0c7b1f9e21",
    "issue_date": "2026-11-30T00:00:00.000Z",
    "currency_code": "USD",
    "document_number": "INV-10042",
    "memo": "Net 30 — café supplies (ünïcode kept)",
    "line_items": [{"description": "Espresso beans, 5 kg", "quantity": 2, "unit_amount": 84.5, "total_amount": 169.0}]
  }
}"#;

/// An invoice the emulator accepts but whose job fails with a 400.
pub const BAD_INVOICE: &str = r#"{"invoice": {"customer_id": "unknown", "line_items": []}}"#;

/// What the app got.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub elapsed: Duration,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A test HTTP client (HTTP/1.1 by default).
pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// An HTTP/2 prior-knowledge client (h2c).
pub fn h2_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(HttpConnector::new())
}

/// Sends one request and reads the whole answer.
pub async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    addr: SocketAddr,
    method: Method,
    target: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let started = Instant::now();
    let mut builder = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{target}"));
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    if !body.is_empty()
        && !headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("content-type"))
    {
        builder = builder.header("content-type", "application/json");
    }
    let request = builder
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    let response = client.request(request).await.expect("the sidecar answered");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
        elapsed: started.elapsed(),
    }
}

/// A running emulator.
pub struct EmulatorHandle {
    pub emulator: Emulator,
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for EmulatorHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Starts an emulator on `127.0.0.1:0`.
pub async fn start_emulator(options: EmulatorOptions) -> EmulatorHandle {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    start_emulator_on(listener, options).await
}

/// Starts an emulator on a listener bound beforehand (so its address can go into another config first).
pub async fn start_emulator_on(listener: TcpListener, options: EmulatorOptions) -> EmulatorHandle {
    let emulator = Emulator::new(options).expect("emulator options");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = oneshot::channel::<()>();
    let server = emulator.clone();
    tokio::spawn(async move {
        let _ = server
            .serve(listener, async move {
                let _ = stopped.await;
            })
            .await;
    });
    EmulatorHandle {
        emulator,
        addr,
        stop: Some(stop),
    }
}

/// A running sidecar.
pub struct SidecarHandle {
    pub sidecar: Sidecar,
    pub addr: SocketAddr,
    pub webhook_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for SidecarHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A configuration pointing at `upstream` with a fast poll schedule.
pub fn config_for(upstream: SocketAddr) -> Config {
    let mut config = Config::default();
    config.upstream.base_url = base_url(&format!("http://{upstream}"));
    config.upstream.connect_timeout = Duration::from_secs(2);
    config.upstream.request_timeout = Duration::from_secs(10);
    config.facade.poll_initial = Duration::from_millis(40);
    config.facade.poll_max = Duration::from_millis(80);
    config.facade.poll_max_with_webhooks = Duration::from_millis(200);
    config.facade.max_wait = Duration::from_secs(20);
    // Tests that are not about Rutter's budget should not be slowed by it.
    config.upstream.rate_limit.requests = 1_000_000;
    config
}

/// Parses a base URL the way the configuration does.
pub fn base_url(text: &str) -> BaseUrl {
    let env = vec![(
        "RUTTER_SIDECAR__UPSTREAM__BASE_URL".to_string(),
        text.to_string(),
    )];
    Config::parse("", &env).expect("base url").upstream.base_url
}

/// Starts a sidecar with `config` on `127.0.0.1:0`.
pub async fn start_sidecar(config: Config) -> SidecarHandle {
    start_sidecar_with(config, Credentials::default()).await
}

/// Starts a sidecar with `config` and `credentials` on `127.0.0.1:0`.
pub async fn start_sidecar_with(config: Config, credentials: Credentials) -> SidecarHandle {
    let sidecar = Sidecar::new(config, &credentials).expect("sidecar");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let webhooks = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let webhook_addr = webhooks.local_addr().expect("addr");
    let admin = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let admin_addr = admin.local_addr().expect("addr");
    let (stop, stopped) = oneshot::channel::<()>();
    let server = sidecar.clone();
    tokio::spawn(async move {
        let _ = server
            .serve(
                Listeners {
                    proxy: listener,
                    webhooks,
                    admin,
                },
                async move {
                    let _ = stopped.await;
                },
            )
            .await;
    });
    SidecarHandle {
        sidecar,
        addr,
        webhook_addr,
        admin_addr,
        stop: Some(stop),
    }
}

/// Emulator options for tests: jobs of `job_ms`, a fixed seed.
pub fn emulator_options(job_ms: u64) -> EmulatorOptions {
    EmulatorOptions {
        job_ms,
        seed: Some(7),
        ..EmulatorOptions::default()
    }
}

/// Requests the emulator saw whose path starts with `prefix`.
pub fn seen_paths(emulator: &Emulator, prefix: &str) -> Vec<String> {
    emulator
        .seen()
        .into_iter()
        .map(|r| r.path_and_query)
        .filter(|p| p.starts_with(prefix))
        .collect()
}

/// How many `GET .../jobs/:id` polls the emulator saw.
pub fn polls(emulator: &Emulator) -> usize {
    emulator
        .seen()
        .iter()
        .filter(|r| r.method == Method::GET && r.path_and_query.contains("/jobs/"))
        .count()
}
