//! Helpers for the tests that run the built `rutter-sidecar` binary: a child-process guard that kills
//! and reaps on drop, its stdout and stderr collected line by line by background threads, the
//! listener addresses read from the "rutter-sidecar listening" line, and small HTTP and metrics
//! helpers. Every wait is bounded.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;

use crate::common::{self, Reply};

/// The binary under test, built by cargo for this test target.
pub const BIN: &str = env!("CARGO_BIN_EXE_rutter-sidecar");

/// Longest a single HTTP exchange of these tests may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(15);

/// Lines a child wrote to stdout and stderr, in arrival order.
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<String>>>);

impl Logs {
    /// Reads `stream` line by line in a background thread until it closes.
    fn collect(&self, stream: impl Read + Send + 'static) {
        let logs = self.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut line = Vec::new();
            while matches!(reader.read_until(b'\n', &mut line), Ok(n) if n > 0) {
                let text = String::from_utf8_lossy(&line).trim_end().to_string();
                logs.0.lock().unwrap().push(text);
                line.clear();
            }
        });
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    /// Everything so far, one string.
    pub fn text(&self) -> String {
        self.lines().join("\n")
    }

    /// The first line containing every one of `needles`.
    pub fn find(&self, needles: &[&str]) -> Option<String> {
        self.lines()
            .into_iter()
            .find(|line| needles.iter().all(|n| line.contains(n)))
    }

    /// Waits (at most `within`) for a line containing every one of `needles`.
    pub async fn wait_for(&self, needles: &[&str], within: Duration) -> Option<String> {
        let end = Instant::now() + within;
        loop {
            if let Some(line) = self.find(needles) {
                return Some(line);
            }
            if Instant::now() >= end {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A child process that is killed and reaped when dropped.
pub struct Process {
    child: Child,
    /// What it wrote to stdout and stderr.
    pub logs: Logs,
}

impl Process {
    /// Starts the binary with `args` and `env`. Inherited `RUTTER_*` and `RUST_LOG` variables are
    /// removed first, so only what a test sets applies.
    pub fn spawn(args: &[&str], env: &[(String, String)]) -> Process {
        let mut command = Command::new(BIN);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy().into_owned();
            if name.starts_with("RUTTER_") || name == "RUST_LOG" {
                command.env_remove(name);
            }
        }
        command.envs(env.iter().map(|(k, v)| (k, v)));
        let mut child = command.spawn().expect("start the rutter-sidecar binary");
        let logs = Logs::default();
        logs.collect(child.stdout.take().expect("stdout"));
        logs.collect(child.stderr.take().expect("stderr"));
        Process { child, logs }
    }

    /// Sends a signal (`"TERM"`, `"INT"`) with `kill(1)`.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed: {status}");
    }

    /// Waits (at most `within`) for the process to exit.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= end {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A temporary file removed when dropped.
pub struct TempFile(pub PathBuf);

impl TempFile {
    /// Writes `text` to a new file under cargo's per-target temporary directory.
    pub fn new(text: &str) -> TempFile {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "binary-{}-{}.toml",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
        std::fs::write(&path, text).expect("write the config file");
        TempFile(path)
    }

    /// The path as a string.
    pub fn path(&self) -> &str {
        self.0.to_str().expect("utf-8 temp path")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A running `rutter-sidecar run` child and the addresses it really listens on.
pub struct SidecarProcess {
    pub process: Process,
    pub proxy: SocketAddr,
    pub webhooks: SocketAddr,
    pub admin: SocketAddr,
    _config: TempFile,
}

impl std::ops::Deref for SidecarProcess {
    type Target = Process;
    fn deref(&self) -> &Process {
        &self.process
    }
}

impl std::ops::DerefMut for SidecarProcess {
    fn deref_mut(&mut self) -> &mut Process {
        &mut self.process
    }
}

/// `(name, value)` pairs as owned strings.
pub fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Starts the sidecar binary in front of `upstream` with an empty config file, every listener on
/// `127.0.0.1:0`, a fast poll schedule, and `env` on top; waits for its "listening" line.
pub async fn start_sidecar(upstream: SocketAddr, env: &[(&str, &str)]) -> SidecarProcess {
    let config = TempFile::new("");
    let base_url = format!("http://{upstream}");
    let mut all = vars(&[
        ("RUTTER_SIDECAR__LISTEN__PROXY", "127.0.0.1:0"),
        ("RUTTER_SIDECAR__LISTEN__WEBHOOKS", "127.0.0.1:0"),
        ("RUTTER_SIDECAR__LISTEN__ADMIN", "127.0.0.1:0"),
        ("RUTTER_SIDECAR__UPSTREAM__BASE_URL", &base_url),
        ("RUTTER_SIDECAR__FACADE__POLL_INITIAL", "50ms"),
        ("RUTTER_SIDECAR__FACADE__POLL_MAX", "100ms"),
    ]);
    all.extend(vars(env));
    let mut process = Process::spawn(&["run", "--config", config.path()], &all);
    let line = process
        .logs
        .wait_for(&["rutter-sidecar listening"], Duration::from_secs(10))
        .await;
    let Some(line) = line else {
        let exited = process.wait_exit(Duration::ZERO).await;
        panic!(
            "no \"listening\" line within 10 s (exit: {exited:?}); output:\n{}",
            process.logs.text()
        );
    };
    let addr = |key: &str| {
        field_addr(&line, key).unwrap_or_else(|| panic!("no {key} address in {line:?}"))
    };
    SidecarProcess {
        proxy: addr("proxy"),
        webhooks: addr("webhooks"),
        admin: addr("admin"),
        process,
        _config: config,
    }
}

/// Reads `key=ADDR` (text logs) or `"key":"ADDR"` (JSON logs) from a log line.
pub fn field_addr(line: &str, key: &str) -> Option<SocketAddr> {
    [format!(" {key}="), format!("\"{key}\":\"")]
        .iter()
        .find_map(|pattern| {
            let rest = &line[line.find(pattern.as_str())? + pattern.len()..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || ".:[]".contains(c)))
                .unwrap_or(rest.len());
            rest[..end].parse().ok()
        })
}

/// One request over a new connection (a fresh client), bounded by [`HTTP_TIMEOUT`]: the reply, or
/// why there was none (connection refused or closed without an answer, timeout).
pub async fn try_http(
    addr: SocketAddr,
    method: Method,
    target: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<Reply, String> {
    let started = Instant::now();
    let mut request = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{target}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    if !body.is_empty()
        && !headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("content-type"))
    {
        request = request.header("content-type", "application/json");
    }
    let request = request
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())?;
    let exchange = async {
        let response = common::client()
            .request(request)
            .await
            .map_err(|e| format!("{e:?}"))?;
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("{e:?}"))?
            .to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
            elapsed: started.elapsed(),
        })
    };
    tokio::time::timeout(HTTP_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {HTTP_TIMEOUT:?}")))
}

/// [`try_http`] that panics when there is no reply.
pub async fn http(
    addr: SocketAddr,
    method: Method,
    target: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    try_http(addr, method, target, headers, body)
        .await
        .unwrap_or_else(|e| panic!("no answer to {target} on {addr}: {e}"))
}

/// `GET` over a new connection.
pub async fn get(addr: SocketAddr, target: &str) -> Reply {
    http(addr, Method::GET, target, &[], "").await
}

/// The sum of the samples of metric `name` whose labels include every one of `labels`, or `None`
/// when there is no such series. Reads the Prometheus text format.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (series_name, series_labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if series_name != name {
            continue;
        }
        let matches = labels.iter().all(|(k, v)| {
            series_labels
                .split(',')
                .any(|pair| pair == format!("{k}=\"{v}\""))
        });
        if matches {
            let value: f64 = value.parse().expect("a numeric sample");
            *found.get_or_insert(0.0) += value;
        }
    }
    found
}
