//! The built-in Rutter emulator (DESIGN §9): a stand-in for Rutter's API on loopback, used by the
//! `emulate` and `demo` subcommands and by the integration tests.
//!
//! This module owns the emulator end to end: its options ([`EmulatorOptions`]), its HTTP server
//! ([`Emulator::serve`]: HTTP/1.1 and HTTP/2, h2c by prior knowledge in cleartext, ALPN `h2`/`http/1.1`
//! over TLS, graceful shutdown), the job lifecycle, idempotency, lists, faults, and what tests
//! observe ([`Emulator::counters`], [`Emulator::seen`], [`Emulator::job`],
//! [`Emulator::completions`]), and the signed webhooks it sends ([`Emulator::send_webhook`],
//! [`sign`]). It follows `rutter/API-FACTS.md`; the JSON shapes are those of `rutter/fixtures/`.
//!
//! # Behaviour
//!
//! - Every path works under `/versioned/...` and under the legacy root. Every answer has
//!   `X-Rutter-Request-ID` (a UUID) and a JSON content type; errors are
//!   `{"error_type", "error_code", "error_message"}`.
//! - **Jobs.** Writes on async-capable routes ([`crate::routes::RouteTable::default`]) and the three
//!   report GETs create a job: `prequeued` for the first tenth of its duration (`--job-ms`), then
//!   `pending`, then `success` / `failure` (or `partial_success` when forced). At the end the job's
//!   entity is stored (lists show it) and the completion hook fires. The job object is
//!   `{id, status, request: {method, url, body, idempotency_key?}, response?: {http_status, body}}`,
//!   `response` only once terminal.
//! - **`response_mode`** from the query (`async` or `prefer_sync`, last one wins) or a top-level body
//!   field; `async` wins if either says so; another value is a 400. `async` answers
//!   `200 {"async_response": {id, response_url, status}}` at once; otherwise the request is held until
//!   the job ends (answer: the job's `http_status` and body) or `--sync-limit-ms` passes (answer: the
//!   `async_response`). Both carry `X-Rutter-Job-ID`. `response_url` is
//!   `{scheme}://{Host}{/versioned if used}/jobs/{id}`.
//! - **Validation.** A POST/PATCH body that is not a JSON object is 400 `INVALID_REQUEST` at once (no
//!   job, no `X-Rutter-Job-ID`); attachment POSTs accept any body (multipart). An invoice without
//!   `customer_id`, or with `customer_id` `"unknown"`, is accepted and its job fails with a 400
//!   `INVALID_INPUT` response.
//! - **Results.** Creates answer `{"<singular>": {id, platform_id, ...fields, status, created_at,
//!   updated_at}}` (`invoices` → `invoice`, `journal_entries` → `journal_entry`, `classes` → `class`);
//!   the fields are `body["<singular>"]` or, without it, the body minus `response_mode`. PATCH answers
//!   the merged entity; DELETE `{"<singular>": {"id", "deleted": true}}`; report GETs a one-report
//!   list; nested creates (`attachments`, `fulfillments`) link their parent.
//! - **`GET /jobs/:id`**: the job (200) or 404. Needs Basic auth when configured, never an
//!   `access_token`.
//! - **`Idempotency-Key`** on job-backed POST/PATCH, scoped by (access_token, method, path, key): the
//!   same request (body and query compared without `response_mode`, JSON key order ignored) is
//!   answered from the first job, as that job would be answered now (async_response or held
//!   result); a different request gets 409 `IDEMPOTENCY_KEY_REUSED`.
//! - **Credentials.** With `--client-id` and `--client-secret`, every request needs
//!   `Authorization: Basic base64(id:secret)` (401 `INVALID_CREDENTIALS`). Connection-scoped routes
//!   need the `access_token` query parameter (400 `MISSING_ACCESS_TOKEN`) unless
//!   `--no-access-token-check`; `/jobs/:id`, `/connections*` and `/item/public_token/exchange` never do.
//! - **Lists.** A GET whose last segment is a plural collection name and that is not job-backed
//!   (`/accounting/invoices`, `/products`, `/accounting/invoices/:id/attachments`, ...) answers
//!   `{"<plural>": [...], "next_cursor": string|null}` over the seeded entities (`--seed-entities`,
//!   visible to everyone) and the created ones (visible to their `access_token`), oldest first;
//!   `limit` defaults to 50, at most 500; `cursor` is the opaque `next_cursor`. `GET /<resource>/:id`
//!   answers the entity or 404. Other POST/PATCH/PUT/DELETE (e.g. `POST /orders`) are synchronous:
//!   applied at once, no job. `POST /item/public_token/exchange` and `POST /connections/create`
//!   mint a connection and an access token.
//! - **Order of checks**: a connection marked by `X-Emulator-Close: next` drops the request unread;
//!   then the body is read (over 16 MiB: 413), the `X-Emulator-*` headers are parsed and
//!   `X-Emulator-Fault-Times` is counted, `X-Emulator-Reset: 1`; then `X-Emulator-Status`, rate
//!   budget, `--error-rate`, `--platform-limit-rate`, Basic auth, job poll, access_token, routing;
//!   finally the answer faults (`Reset: after`, the `reset` poll fault, delays, `Truncate`,
//!   `Drip-*`, `Close`) shape how the answer leaves.
//!
//! # Per-request headers (`X-Emulator-*`, names case-insensitive; a malformed value is a 400
//! `INVALID_EMULATOR_HEADER`)
//!
//! | header | effect |
//! |---|---|
//! | `X-Emulator-Job-Ms: N` | this job runs N ms (0..=86400000) |
//! | `X-Emulator-Fail: STATUS` | the job ends in `failure` with response `http_status` STATUS and a Rutter error body |
//! | `X-Emulator-Job-Status: success\|partial_success\|failure` | forces the terminal status (the response stays the job's result; a forced `failure` without a cause gets 400 `INVALID_INPUT`) |
//! | `X-Emulator-Never-Finish: 1` | the job never ends (stays `pending`) |
//! | `X-Emulator-Status: STATUS` | answer at once with STATUS and a Rutter error body (429: the rate-limit fixture; 409: the idempotency fixture); no job |
//! | `X-Emulator-Retry-After: N` | with `X-Emulator-Status`: adds `Retry-After: N` |
//! | `X-Emulator-Delay-Ms: N` | wait N ms before answering (added to `--slow-ms`) |
//! | `X-Emulator-Reset: 1` (or `before`) | close the connection without any answer (HTTP/2: reset the stream), before doing anything |
//! | `X-Emulator-Reset: after` | process the request fully (a job may be created), then close without answering |
//! | `X-Emulator-Poll-Faults: ITEM[,ITEM...]` | the job's first polls are answered by these items in order (at most 64), then normally: a status `200..=599` (e.g. `429,503,404`) answers with it and a Rutter error body; `reset` closes the connection without answering; `truncate` sends the job object with its full `Content-Length` but closes the connection after half of it; `badjson` answers 200 with a body that is not JSON; `close` answers normally, then closes the connection; `delay=N` answers normally N ms late |
//! | `X-Emulator-Poll-Retry-After: N` | `Retry-After: N` on the status poll faults |
//! | `X-Emulator-Truncate: N` | the answer announces its full `Content-Length`, but the connection is closed after N body bytes (0: after the head; HTTP/2: the stream is reset); no effect if the body is not longer than N. The request is processed fully (a job may exist) |
//! | `X-Emulator-Drip-Ms: N` | the answer's body (full `Content-Length` announced) is sent in chunks of `X-Emulator-Drip-Bytes` (default 16) bytes, N ms apart (0..=86400000), the first at once; combines with `X-Emulator-Truncate` |
//! | `X-Emulator-Drip-Bytes: N` | with `X-Emulator-Drip-Ms`: bytes per chunk (1..=1048576) |
//! | `X-Emulator-Close: 1` | the answer is sent with keep-alive semantics (no `Connection: close`), then the connection is closed at once, so a client that pools it finds it closed when it reuses it (HTTP/2: GOAWAY) |
//! | `X-Emulator-Close: next` | the answer is sent normally and the connection stays open, but the next request on it is dropped with the connection, unread and unanswered (counted in `requests` and `resets` only; HTTP/2: that stream is reset): a server closing an idle keep-alive connection just as the client reuses it |
//! | `X-Emulator-Fault-Times: N` | the answer faults of this request (`Status`, `Retry-After`, `Delay-Ms`, `Reset`, `Truncate`, `Drip-*`, `Close`) apply only to the first N (1..=1000000) requests with the same method, path and query, and `Idempotency-Key` (a write and its retries); later ones are answered normally. Job knobs are not affected |
//! | `X-Emulator-Response-Url: URL` | the `async_response` carries this `response_url` |
//! | `X-Emulator-Sync: 1` | ignore `response_mode`: the job ends at once and its result is answered synchronously (with `X-Rutter-Job-ID`) |
//! | `X-Emulator-Bad-Job: no-response` | the terminal job has no `response` (polls and hook) |
//! | `X-Emulator-Bad-Job: not-json` | polls of the job answer 200 with a truncated, invalid JSON body |
//! | `X-Emulator-Async-Status: 202` | the `async_response` is sent with this 2xx status |
//! | `X-Emulator-Body-Bytes: N` | on a list GET: the page is padded with generated entities until the body has at least N bytes (capped at 64 MiB), streamed in 64 KiB chunks |
//! | `X-Emulator-Webhook: ITEM[,ITEM...]` | this job's webhook (needs `--webhook-url`; items combine, e.g. `duplicate,delay=200`): `drop` never sent; `bad-signature` sent with a wrong signature; `duplicate` one extra copy, `duplicate=N` N extra copies (0..=100, instead of `--webhook-duplicates`); `delay=N` sent N ms after the job ends (instead of `--webhook-delay-ms`); `early` the job ends at once and its webhook is delivered before this request is answered |
//!
//! Job knobs are fixed when the job is created; an idempotent replay is answered as the first
//! request's job dictates. Answer faults (`Status`, `Delay-Ms`, `Reset`, `Truncate`, `Drip-*`,
//! `Close`) act on the answer of the request that carries them, replays included. The counters
//! `resets`, `truncated`, `dripped` and `closed_after_answer` count them.
//!
//! # Completion hook
//!
//! Every job that reaches a terminal status is announced on a broadcast channel
//! ([`Emulator::completions`], [`JobCompleted`]) and, with `--webhook-url`, sent as a webhook.
//!
//! # Webhooks (`--webhook-url`, needs `--client-secret`)
//!
//! - **Body**: `{"type": "JOB", "code": "JOB_COMPLETED", "connection_id", "access_token", "job"}`
//!   (compact JSON, keys in this order; fixture `webhook-job-completed.json`). `job` is the job
//!   object exactly as `GET /jobs/:id` returns it once terminal (success, failure or
//!   partial_success alike). `access_token` is the creating request's; `connection_id` is the
//!   connection minted with that token (`/item/public_token/exchange`, `/connections/create`) or a
//!   stable UUID derived from it; both are `null` for a job created without an `access_token`.
//! - **Request**: `POST` to the URL as given, HTTP/1.1 (TLS with the web roots for `https`),
//!   `Content-Type: application/json`, `X-Rutter-Signature: sha256=` + base64(HMAC-SHA256(key =
//!   client secret, message = the exact body bytes sent)) — see [`sign`].
//! - **Delivery**: a 2xx answer delivers the copy; any other status, a transport error or no answer
//!   within `--webhook-timeout-ms` (default 10 s) is retried up to 6 times, waiting
//!   `--webhook-retry-ms` (default 1000) before the first retry and doubling each time (1+2+...+32
//!   = 63 s by default; Rutter spreads its 6 retries over about 15 minutes), then given up. At most
//!   256 attempts are in flight; at most 10 000 copies wait (delay, slot, retry) — beyond it a
//!   copy is dropped and counted. Every copy and retry carries the same bytes and signature.
//! - **Knobs** (decided when the job is created; the header overrides the option per job):
//!   `--webhook-delay-ms` (default 0), `--webhook-duplicates` (extra copies, sent at the same time
//!   as the first and delivered independently), `--webhook-drop-rate` (share never sent, copies
//!   included), `--webhook-bad-signature-rate` (share sent with a signature that does not verify,
//!   copies included), `--webhook-early` (every job ends at once, ignoring `--job-ms`; the first
//!   delivery attempt is awaited — at most `--webhook-timeout-ms` — before the creating request is
//!   answered, and an `async_response` answer still says `pending`, as it did when accepted, so a
//!   client sees the webhook beat it). Early delivery ignores the delay; a dropped webhook is not
//!   waited for; `X-Emulator-Never-Finish` wins over early (no webhook, no wait).
//! - **Counters**: `webhooks_sent`, `webhooks_delivered`, `webhooks_failed`, `webhooks_dropped`,
//!   `webhook_retries` (see [`Counters`]).
//! - Neither the secret nor signatures are logged; the URL is logged without query or user info.

mod direct;
mod entities;
mod faults;
mod handler;
mod jobs;
mod options;
mod state;
mod webhooks;
mod wire;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, mpsc, watch};

pub use options::{EmulatorError, EmulatorOptions};
pub use state::{Counters, JobCompleted, SeenRequest};
pub use webhooks::sign;

use faults::CloseSignal;
use handler::ConnInfo;
use state::{lock, Shared};

/// How long a TLS handshake may take before the connection is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send a request head (HTTP/1).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Concurrent HTTP/2 streams per connection.
const MAX_CONCURRENT_STREAMS: u32 = 1024;

/// A running (or ready to run) Rutter emulator. Cheap to clone: clones share one state.
#[derive(Clone)]
pub struct Emulator {
    shared: Arc<Shared>,
}

impl fmt::Debug for Emulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Emulator")
            .field("options", &self.shared.options)
            .field("tls", &self.shared.tls.is_some())
            .finish()
    }
}

impl Emulator {
    /// Validates `options` and loads the TLS certificate and key if given.
    pub fn new(options: EmulatorOptions) -> Result<Self, EmulatorError> {
        options.validate()?;
        let tls = options.tls_config()?;
        let webhooks = webhooks::WebhookSender::new(&options)?;
        Ok(Emulator {
            shared: Shared::new(options, tls, webhooks),
        })
    }

    /// The options this emulator runs with.
    pub fn options(&self) -> &EmulatorOptions {
        &self.shared.options
    }

    /// Whether [`Emulator::serve`] speaks TLS (`https`) rather than cleartext.
    pub fn is_tls(&self) -> bool {
        self.shared.tls.is_some()
    }

    /// Serves connections from `listener` until `shutdown` resolves, then stops accepting and waits
    /// for the connections in progress to finish (graceful: idle connections close at once, held
    /// requests are answered). HTTP/1.1 and HTTP/2 (h2c by prior knowledge in cleartext, ALPN over
    /// TLS). Accept errors are logged and retried, so this only returns once shut down.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        // Graceful shutdown by hand (not hyper-util's `GracefulShutdown`), because a connection
        // must also be closable by one of its own answers (`X-Emulator-Close`).
        let (stop, stopping) = watch::channel(false);
        let (alive, mut all_closed) = mpsc::channel::<()>(1);
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(MAX_CONCURRENT_STREAMS);
        let local = listener.local_addr()?;
        if let Some(url) = &self.shared.options.webhook_url {
            tracing::info!(
                url = %options::redacted_url(url),
                "emulator: signed JOB_COMPLETED webhooks on"
            );
        }
        let info = Arc::new(ConnInfo {
            scheme: if self.is_tls() { "https" } else { "http" },
            local,
        });
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _peer)) => {
                        let _ = stream.set_nodelay(true);
                        let shared = Arc::clone(&self.shared);
                        let builder = builder.clone();
                        let info = Arc::clone(&info);
                        let lifetime = Lifetime {
                            stopping: stopping.clone(),
                            _alive: alive.clone(),
                        };
                        tokio::spawn(connection(shared, builder, info, stream, lifetime));
                    }
                    Err(error) => {
                        tracing::warn!(%error, "emulator: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        drop(listener);
        let _ = stop.send(true);
        drop(alive);
        // Every connection holds a sender: `None` once the last one has ended.
        let _ = all_closed.recv().await;
        Ok(())
    }

    /// A snapshot of the counters.
    pub fn counters(&self) -> Counters {
        self.shared.counters.snapshot()
    }

    /// The requests received, oldest first (the last 50 000, with at most 256 MiB of bodies).
    pub fn seen(&self) -> Vec<SeenRequest> {
        self.shared.seen()
    }

    /// The job object as `GET /jobs/:id` would return it now, or `None` for an unknown id.
    pub fn job(&self, id: &str) -> Option<serde_json::Value> {
        self.shared.with_job(id, |job, now| job.value(now))
    }

    /// Subscribes to "a job reached a terminal status" events (broadcast; a subscriber that falls
    /// more than 4096 events behind misses the oldest).
    pub fn completions(&self) -> broadcast::Receiver<JobCompleted> {
        self.shared.completed.subscribe()
    }

    /// Signs `body` with the client secret and POSTs it once (no retries) to the webhook URL, as
    /// a job webhook is sent: for scripting webhooks the emulator does not generate itself (e.g.
    /// `CONNECTION` / `INITIAL_UPDATE`). Returns the receiver's status; `Err` without
    /// `--webhook-url`, on a transport error, or after `--webhook-timeout-ms` without an answer.
    /// Counted in `webhooks_sent` (and `webhooks_delivered` on a 2xx).
    pub async fn send_webhook(&self, body: serde_json::Value) -> Result<StatusCode, String> {
        webhooks::send_once(&self.shared, &body).await
    }

    /// The number of jobs currently stored.
    pub fn job_count(&self) -> usize {
        lock(&self.shared.jobs).map.len()
    }
}

/// What ties a connection to its server: the shutdown flag it watches, and a sender whose drop
/// tells [`Emulator::serve`] that the connection has ended.
struct Lifetime {
    stopping: watch::Receiver<bool>,
    _alive: mpsc::Sender<()>,
}

/// A connection's byte stream, TLS or not.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// Serves one accepted connection (after the TLS handshake, if any), until the client leaves, an
/// answer asks for the connection to close (`X-Emulator-Close`), or the server shuts down (both
/// graceful: the answer in progress is finished first).
async fn connection(
    shared: Arc<Shared>,
    builder: auto::Builder<TokioExecutor>,
    info: Arc<ConnInfo>,
    stream: TcpStream,
    mut lifetime: Lifetime,
) {
    let close = Arc::new(CloseSignal::default());
    let service = {
        let shared = Arc::clone(&shared);
        let info = Arc::clone(&info);
        let close = Arc::clone(&close);
        service_fn(move |request| {
            handler::handle(
                Arc::clone(&shared),
                Arc::clone(&info),
                Arc::clone(&close),
                request,
            )
        })
    };
    let io: Box<dyn Io> = match &shared.tls {
        Some(config) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(config));
            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => Box::new(tls),
                Ok(Err(error)) => {
                    tracing::debug!(%error, "emulator: TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!("emulator: TLS handshake timed out");
                    return;
                }
            }
        }
        None => Box::new(stream),
    };
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let (mut stopping, mut closing) = (false, false);
    let result = loop {
        tokio::select! {
            result = conn.as_mut() => break result,
            _ = lifetime.stopping.wait_for(|stop| *stop), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
            () = close.requested(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    };
    if let Err(error) = result {
        tracing::debug!(%error, "emulator: connection ended with an error");
    }
}
