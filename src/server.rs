//! Listeners and the process's life (DESIGN §8, §10). [`run`] takes already-bound sockets and a
//! shutdown signal (so tests bind `127.0.0.1:0`), builds the upstream client, job registry, pipeline,
//! webhook receiver and admin endpoints, and serves HTTP/1.1 and HTTP/2 (cleartext) until shutdown.
//!
//! Shutdown, once the signal resolves:
//! 1. `/ready` answers 503 at once (Kubernetes takes the pod out of its endpoints);
//! 2. the proxy listener still accepts new connections for `shutdown.drain_delay`, then closes;
//! 3. requests waiting on jobs get until `shutdown.grace` (counted from the signal) to finish; then
//!    each gets its `on_timeout` reply, so every app holds a job id and nothing is lost;
//! 4. the webhook and admin listeners serve until the proxy is done; then `run` returns.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;

use crate::admin::Admin;
use crate::body::Body;
use crate::config::{Config, Credentials, ListenConfig};
use crate::facade::Proxy;
use crate::jobs::{JobRegistry, PollSchedule};
use crate::lifecycle::Lifecycle;
use crate::telemetry::Metrics;
use crate::upstream::Upstream;
use crate::webhooks::WebhookReceiver;

/// Time left after `shutdown.grace` for the last answers to reach their apps (a second more than
/// the cutoff for exchanges under way).
const AFTER_GRACE: Duration = Duration::from_secs(5);

/// The sockets the sidecar serves, bound by the caller.
pub struct Listeners {
    /// The app-facing proxy listener (`listen.proxy`).
    pub proxy: TcpListener,
    /// The Rutter-facing webhook listener (`listen.webhooks`).
    pub webhooks: TcpListener,
    /// The admin listener (`listen.admin`).
    pub admin: TcpListener,
}

/// A sidecar's shared parts, for callers that want to observe it (tests, demo).
#[derive(Clone)]
pub struct Sidecar {
    /// The request pipeline.
    pub proxy: Arc<Proxy>,
    /// The webhook receiver.
    pub webhooks: Arc<WebhookReceiver>,
    /// The admin endpoints.
    pub admin: Arc<Admin>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Shutdown state.
    pub lifecycle: Arc<Lifecycle>,
    config: Arc<Config>,
}

impl Sidecar {
    /// Builds the upstream client, job registry, pipeline and receivers from the configuration.
    pub fn new(config: Config, credentials: &Credentials) -> io::Result<Self> {
        let config = Arc::new(config);
        let metrics = Metrics::new();
        let lifecycle = Arc::new(Lifecycle::default());
        let upstream = Upstream::new(&config.upstream, Arc::clone(&metrics))?;
        let jobs = JobRegistry::new(
            upstream.clone(),
            PollSchedule::from_config(&config.facade),
            config.jobs.clone(),
        );
        let webhooks = Arc::new(
            WebhookReceiver::new(
                &config.webhooks,
                credentials,
                Arc::clone(&jobs),
                Arc::clone(&metrics),
            )
            .with_body_timeout(config.listen.idle_timeout),
        );
        let admin = Arc::new(Admin {
            metrics: Arc::clone(&metrics),
            lifecycle: Arc::clone(&lifecycle),
            jobs: Arc::clone(&jobs),
            upstream: upstream.clone(),
        });
        let proxy = Arc::new(Proxy::new(
            Arc::clone(&config),
            upstream,
            jobs,
            credentials,
            Arc::clone(&metrics),
            Arc::clone(&lifecycle),
        ));
        Ok(Sidecar {
            proxy,
            webhooks,
            admin,
            metrics,
            lifecycle,
            config,
        })
    }

    /// Serves on `listeners` until `shutdown` resolves, then shuts down as the module doc describes.
    pub async fn serve(
        self,
        listeners: Listeners,
        shutdown: impl Future<Output = ()> + Send,
    ) -> io::Result<()> {
        self.webhooks.start_forwarding()?;
        let limits = &self.config.listen;
        let (stop_proxy, proxy_stopped) = watch::channel(false);
        let (stop_others, others_stopped) = watch::channel(false);
        let proxy = self.proxy.clone();
        let proxy_task = tokio::spawn(serve(
            listeners.proxy,
            move |request, peer| {
                let proxy = proxy.clone();
                // Boxed: a facade request may wait for minutes, and its connection keeps room for
                // this future meanwhile (memory per waiting request).
                Box::pin(async move { proxy.handle(request, peer).await })
            },
            limits.clone(),
            proxy_stopped,
        ));
        let webhooks = self.webhooks.clone();
        let webhook_task = tokio::spawn(serve(
            listeners.webhooks,
            move |request, _peer| {
                let webhooks = webhooks.clone();
                async move { webhooks.handle(request).await }
            },
            limits.clone(),
            others_stopped.clone(),
        ));
        let admin = self.admin.clone();
        let admin_task = tokio::spawn(serve(
            listeners.admin,
            move |request, _peer| {
                let response = admin.handle(&request);
                async move { response }
            },
            limits.clone(),
            others_stopped,
        ));

        shutdown.await;
        let signalled = Instant::now();
        let shutdown = &self.config.shutdown;
        tracing::info!(
            drain_delay_ms = shutdown.drain_delay.as_millis() as u64,
            grace_ms = shutdown.grace.as_millis() as u64,
            "shutdown requested: not ready any more, draining"
        );
        self.lifecycle.start_draining();
        let lifecycle = Arc::clone(&self.lifecycle);
        let grace_end = signalled + shutdown.grace;
        let grace_timer = tokio::spawn(async move {
            tokio::time::sleep_until(grace_end).await;
            tracing::info!("shutdown grace over: answering every waiting request now");
            lifecycle.end_grace();
        });
        tokio::time::sleep_until(signalled + shutdown.drain_delay).await;
        tracing::info!("drain delay over: refusing new connections");
        let _ = stop_proxy.send(true);
        let hard_stop = grace_end.max(Instant::now()) + AFTER_GRACE;
        if tokio::time::timeout_at(hard_stop, proxy_task)
            .await
            .is_err()
        {
            tracing::warn!("some proxy connections were still open at the end of the grace period");
        }
        grace_timer.abort();
        self.lifecycle.end_grace();
        let _ = stop_others.send(true);
        let others = async {
            let _ = webhook_task.await;
            let _ = admin_task.await;
        };
        let _ = tokio::time::timeout(AFTER_GRACE, others).await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Builds the sidecar and serves until `shutdown` resolves.
pub async fn run(
    config: Config,
    credentials: Credentials,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    Sidecar::new(config, &credentials)?
        .serve(listeners, shutdown)
        .await
}

/// The HTTP server settings shared by the listeners (head size limit, idle timeout), one builder per
/// protocol: a connection is given to one of them after peeking at its first bytes.
pub struct HttpBuilders {
    /// HTTP/1.1 (and 1.0).
    pub http1: http1::Builder,
    /// HTTP/2 with prior knowledge (cleartext).
    pub http2: http2::Builder<TokioExecutor>,
}

impl HttpBuilders {
    /// The builders for `limits`.
    pub fn new(limits: &ListenConfig) -> Self {
        let header_bytes = usize::try_from(limits.max_header_bytes)
            .unwrap_or(usize::MAX)
            .max(8 * 1024);
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(limits.idle_timeout)
            .max_buf_size(header_bytes);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(header_bytes).unwrap_or(u32::MAX))
            .keep_alive_interval(Some(limits.idle_timeout))
            .keep_alive_timeout(Duration::from_secs(20));
        HttpBuilders { http1, http2 }
    }
}

/// Accepts connections on `listener` (at most `listen.max_connections` open at once) and serves each
/// request with `handler` until `stop` is set; then lets the connections in progress finish.
async fn serve<H, F>(
    listener: TcpListener,
    handler: H,
    limits: ListenConfig,
    mut stop: watch::Receiver<bool>,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    // One builder per protocol, chosen by peeking at the first bytes (not hyper-util's `auto`, whose
    // detection hands HTTP/1 the sniffed bytes as a short first read, growing every read buffer to
    // 16 KiB, and whose connection type is sized for HTTP/2 even when serving HTTP/1).
    let builders = Arc::new(HttpBuilders::new(&limits));
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    loop {
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            _ = stopped(&mut stop) => break,
        };
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors and similar: back off instead of spinning.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let handler = handler.clone();
                // Set by the first request: a connection that sends no complete request head within
                // `listen.idle_timeout` (silent, or a stalled HTTP/2 preface) is closed.
                let spoke = Arc::new(AtomicBool::new(false));
                let heard = Arc::clone(&spoke);
                // hyper keeps room for one such future per connection for as long as it lives,
                // and this wrapper stores the handler's future twice: handlers that may wait
                // return a boxed future.
                let service = service_fn(move |request| {
                    heard.store(true, Ordering::Relaxed);
                    let response = handler(request, peer);
                    async move { Ok::<_, Infallible>(response.await) }
                });
                let watcher = graceful.watcher();
                let builders = Arc::clone(&builders);
                let first_request_by = limits.idle_timeout;
                tokio::spawn(async move {
                    let Some(http2) = sniff_http2(&stream, first_request_by).await else {
                        tracing::debug!(%peer, "closed a connection that sent no request");
                        drop(slot);
                        return;
                    };
                    let io = TokioIo::new(stream);
                    if http2 {
                        // Boxed: the HTTP/2 connection state is large and the task would carry its
                        // size for every HTTP/1 connection too.
                        let connection = watcher.watch(builders.http2.serve_connection(io, service));
                        Box::pin(drive(connection, spoke, first_request_by, peer)).await;
                    } else {
                        let connection = watcher.watch(builders.http1.serve_connection(io, service));
                        drive(connection, spoke, first_request_by, peer).await;
                    }
                    drop(slot);
                });
            }
            _ = stopped(&mut stop) => break,
        }
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Serves one connection until it ends, or until `first_request_by` passes without a complete request
/// head (`spoke` is set by the first request).
async fn drive<C, E>(
    connection: C,
    spoke: Arc<AtomicBool>,
    first_request_by: Duration,
    peer: SocketAddr,
) where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let silent = async {
        tokio::time::sleep(first_request_by).await;
        if spoke.load(Ordering::Relaxed) {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        result = connection => {
            if let Err(error) = result {
                tracing::debug!(%peer, error = %error, "connection ended with an error");
            }
        }
        _ = silent => tracing::debug!(%peer, "closed a connection that sent no request"),
    }
}

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether a new connection speaks HTTP/2 with prior knowledge, decided by peeking (nothing is
/// consumed). `None` when it closes or sends nothing within `within`.
async fn sniff_http2(stream: &tokio::net::TcpStream, within: Duration) -> Option<bool> {
    let deadline = tokio::time::Instant::now() + within;
    let mut first = [0u8; HTTP2_PREFACE.len()];
    loop {
        let read = tokio::time::timeout_at(deadline, stream.peek(&mut first))
            .await
            .ok()?
            .ok()?;
        if read == 0 {
            return None;
        }
        if first[..read] != HTTP2_PREFACE[..read] {
            return Some(false);
        }
        if read == HTTP2_PREFACE.len() {
            return Some(true);
        }
        // Part of the preface so far: the rest is on its way (peeking again at once would spin).
        tokio::time::sleep(Duration::from_millis(1)).await;
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
    }
}

/// Resolves once the stop flag is set (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}
