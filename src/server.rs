//! Listeners and the process's life: [`run`] takes already-bound sockets and a shutdown signal (so tests
//! bind `127.0.0.1:0`), builds the upstream client, job registry and pipeline, and serves HTTP/1.1 and
//! HTTP/2 (cleartext, prior knowledge) to apps until shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use http::{Request, Response};
use hyper::body::Incoming;

use crate::body::Body;
use crate::config::{Config, Credentials};
use crate::facade::Proxy;
use crate::jobs::{JobRegistry, PollSchedule};
use crate::upstream::Upstream;
use crate::webhooks::WebhookReceiver;

/// Longest time a client may take to send a request head (slow-loris guard).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The sockets the sidecar serves, bound by the caller.
pub struct Listeners {
    /// The app-facing proxy listener (`listen.proxy`).
    pub proxy: TcpListener,
    /// The Rutter-facing webhook listener (`listen.webhooks`).
    pub webhooks: TcpListener,
}

/// A running sidecar's shared parts, for callers that want to observe it (tests, demo).
#[derive(Clone)]
pub struct Sidecar {
    /// The request pipeline.
    pub proxy: Arc<Proxy>,
    /// The webhook receiver.
    pub webhooks: Arc<WebhookReceiver>,
}

impl Sidecar {
    /// Builds the upstream client, job registry and pipeline from the configuration.
    pub fn new(config: Config, credentials: &Credentials) -> io::Result<Self> {
        let config = Arc::new(config);
        let upstream = Upstream::new(&config.upstream)?;
        let jobs = JobRegistry::new(
            upstream.clone(),
            PollSchedule::from_config(&config.facade),
            config.jobs.clone(),
        );
        let webhooks = Arc::new(WebhookReceiver::new(
            &config.webhooks,
            credentials,
            Arc::clone(&jobs),
        ));
        let proxy = Arc::new(Proxy::new(config, upstream, jobs, credentials));
        Ok(Sidecar { proxy, webhooks })
    }

    /// Serves on `listeners` until `shutdown` resolves, then lets requests in progress finish.
    pub async fn serve(
        self,
        listeners: Listeners,
        shutdown: impl Future<Output = ()> + Send,
    ) -> io::Result<()> {
        self.webhooks.start_forwarding()?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let proxy = self.proxy.clone();
        let proxy_task = tokio::spawn(serve(
            listeners.proxy,
            move |request, peer| {
                let proxy = proxy.clone();
                async move { proxy.handle(request, peer).await }
            },
            stop_rx.clone(),
        ));
        let webhooks = self.webhooks.clone();
        let webhook_task = tokio::spawn(serve(
            listeners.webhooks,
            move |request, _peer| {
                let webhooks = webhooks.clone();
                async move { webhooks.handle(request).await }
            },
            stop_rx,
        ));
        shutdown.await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
        proxy_task.await.map_err(io::Error::other)?;
        webhook_task.await.map_err(io::Error::other)?;
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

/// The HTTP server settings shared by the listeners.
pub fn http_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(256 * 1024);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(64 * 1024);
    builder
}

/// Accepts connections on `listener` and serves each request with `handler` until `stop` is set, then
/// lets the connections in progress finish.
async fn serve<H, F>(listener: TcpListener, handler: H, mut stop: watch::Receiver<bool>)
where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let builder = http_builder();
    let graceful = GracefulShutdown::new();
    loop {
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
                let service = service_fn(move |request| {
                    let response = handler(request, peer);
                    async move { Ok::<_, Infallible>(response.await) }
                });
                let connection = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    if let Err(error) = connection.await {
                        tracing::debug!(%peer, error = %error, "connection ended with an error");
                    }
                });
            }
            _ = stopped(&mut stop) => break,
        }
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Resolves once the stop flag is set (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

/// The address a listener is bound to (for logs).
pub fn local_addr(listener: &TcpListener) -> Option<SocketAddr> {
    listener.local_addr().ok()
}
