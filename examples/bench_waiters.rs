//! Memory benchmark (issue 7): the real `rutter-sidecar` binary as a child process next to a child
//! emulator; its RSS and CPU when idle, its RSS with N requests waiting on N jobs that never end
//! (memory per waiting request), and its RSS after they are gone.
//!
//! Run after `cargo build --release` with
//! `cargo run --release --example bench_waiters [-- N [PATH_TO_BINARY]]` (defaults 10000,
//! target/release/rutter-sidecar). Linux only (reads /proc).

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::Instant;

const TOKEN: &str = "00000000-0000-4000-8000-000000000001";
const INVOICE: &str = r#"{"invoice":{"customer_id":"8b3e6c0e-2f4a-4a4e-9a43-5d0c7b1f9e21","document_number":"INV-1","line_items":[]}}"#;

/// Starts a child and returns it with the value of `key=` on the first stderr line containing `marker`.
async fn spawn(mut command: Command, marker: &str, keys: &[&str]) -> (Child, Vec<SocketAddr>) {
    command
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .kill_on_drop(true);
    let mut child = command.spawn().expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let line = tokio::time::timeout_at(deadline, lines.next_line())
            .await
            .expect("startup line")
            .expect("read")
            .expect("eof");
        if line.contains(marker) {
            let addrs = keys
                .iter()
                .map(|key| {
                    let start = line.find(&format!("{key}=")).expect("key") + key.len() + 1;
                    line[start..]
                        .split_whitespace()
                        .next()
                        .expect("value")
                        .trim_matches('"')
                        .parse()
                        .expect("addr")
                })
                .collect();
            // Keep draining stderr so the child never blocks on a full pipe.
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            return (child, addrs);
        }
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// User plus system CPU time of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_name = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let get = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    get(11) + get(12)
}

async fn waiters(client: &Client<HttpConnector, Full<Bytes>>, admin: SocketAddr) -> u64 {
    let Ok(response) = client
        .get(format!("http://{admin}/metrics").parse().expect("uri"))
        .await
    else {
        return 0;
    };
    let body = response
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    String::from_utf8_lossy(&body)
        .lines()
        .find(|l| l.starts_with("rutter_sidecar_waiters "))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let bin = args
        .next()
        .unwrap_or_else(|| "target/release/rutter-sidecar".into());
    // `quick`: a shorter idle sample and max_wait (bench/run.sh --quick).
    let quick = args.next().is_some_and(|a| a == "quick");
    let (idle_sample, max_wait) = if quick { (5, "20s") } else { (10, "40s") };

    let mut emulate = Command::new(&bin);
    emulate
        .args(["emulate", "--listen", "127.0.0.1:0", "--job-ms", "600000"])
        .env("RUST_LOG", "info");
    let (_emulator, rutter) = spawn(emulate, "Rutter emulator listening", &["listen"]).await;

    let config = std::env::temp_dir().join(format!("bench-waiters-{}.toml", std::process::id()));
    std::fs::write(&config, "").expect("config file");
    let mut run = Command::new(&bin);
    run.args(["run", "--config"]).arg(&config).env(
        "RUST_LOG",
        "warn,rutter_sidecar=info,rutter_sidecar::facade=warn",
    );
    for (key, value) in [
        ("LISTEN__PROXY", "127.0.0.1:0".to_string()),
        ("LISTEN__WEBHOOKS", "127.0.0.1:0".to_string()),
        ("LISTEN__ADMIN", "127.0.0.1:0".to_string()),
        ("LISTEN__MAX_CONNECTIONS", (n + 1000).to_string()),
        ("UPSTREAM__BASE_URL", format!("http://{}", rutter[0])),
        (
            "UPSTREAM__RATE_LIMIT",
            "{ requests = 1000000, per = \"1s\" }".to_string(),
        ),
        ("FACADE__MAX_WAIT", max_wait.to_string()),
        ("FACADE__POLL_INITIAL", "60s".to_string()),
        ("FACADE__POLL_MAX", "60s".to_string()),
        ("FACADE__POLL_MAX_WITH_WEBHOOKS", "60s".to_string()),
        ("JOBS__MAX_TRACKED", (n * 2).to_string()),
    ] {
        run.env(format!("RUTTER_SIDECAR__{key}"), value);
    }
    let (sidecar, addrs) = spawn(run, "rutter-sidecar listening", &["proxy", "admin"]).await;
    let _ = std::fs::remove_file(&config);
    let pid = sidecar.id().expect("pid");
    let (proxy, admin) = (addrs[0], addrs[1]);

    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_rss = rss_kib(pid);
    let ticks = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(idle_sample)).await;
    let idle_cpu = (cpu_ticks(pid) - ticks) as f64 / 100.0 / idle_sample as f64 * 100.0;

    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(HttpConnector::new());
    let uri = format!("http://{proxy}/versioned/accounting/invoices?access_token={TOKEN}");
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let request = Request::builder()
            .method(Method::POST)
            .uri(&uri)
            .header("content-type", "application/json")
            .header("x-emulator-never-finish", "1")
            .body(Full::new(Bytes::from_static(INVOICE.as_bytes())))
            .expect("request");
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            client.request(request).await.map(|r| r.status())
        }));
    }
    let started = Instant::now();
    let mut waiting = 0;
    while started.elapsed() < Duration::from_secs(120) {
        waiting = waiters(&client, admin).await;
        if waiting as usize >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let busy_rss = rss_kib(pid);
    for task in &tasks {
        task.abort();
    }
    // The waits were detached from the apps' connections; they end at max_wait.
    let gone = Instant::now();
    while waiters(&client, admin).await > 0 && gone.elapsed() < Duration::from_secs(90) {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after_rss = rss_kib(pid);

    let per_waiter = (busy_rss.saturating_sub(idle_rss)) as f64 / waiting.max(1) as f64;
    println!("waiters: the release binary, {n} requests each waiting on its own never-ending job (HTTP/1.1, one connection each)");
    println!();
    println!("| idle RSS (MiB) | idle CPU (%) | waiting | RSS with them (MiB) | per waiting request (KiB) | RSS after (MiB) |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| {:.1} | {:.2} | {waiting} | {:.1} | {:.1} | {:.1} |",
        idle_rss as f64 / 1024.0,
        idle_cpu,
        busy_rss as f64 / 1024.0,
        per_waiter,
        after_rss as f64 / 1024.0
    );
}
