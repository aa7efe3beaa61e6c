//! Configuration: the TOML file (DESIGN §2) plus `RUTTER_SIDECAR__SECTION__KEY` environment overrides,
//! validated into typed settings.
//!
//! Parsing does no IO: [`Config::parse`] takes the file's text and the environment as values, so it is
//! tested with plain strings. Every invalid field is reported at once ([`ConfigErrors`]). Secrets never
//! live here: the file names the environment variables that hold the client id and secret, and `main`
//! reads them into [`Credentials`].

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use toml::{Table, Value};

use crate::routes::{RoutePattern, RouteTable};

/// The whole validated configuration. `Config::default()` is every section's documented default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    /// `[listen]`: the three listening sockets.
    pub listen: ListenConfig,
    /// `[upstream]`: how Rutter is reached.
    pub upstream: UpstreamConfig,
    /// `[facade]`: the synchronous facade.
    pub facade: FacadeConfig,
    /// `[jobs]`: job trackers.
    pub jobs: JobsConfig,
    /// `[idempotency]`: the idempotency cache.
    pub idempotency: IdempotencyConfig,
    /// `[webhooks]`: the webhook receiver.
    pub webhooks: WebhooksConfig,
    /// `[shutdown]`: graceful shutdown timing.
    pub shutdown: ShutdownConfig,
    /// `[log]`: logging.
    pub log: LogConfig,
}

/// `[listen]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenConfig {
    /// `listen.proxy`: the app-facing proxy listener. Default `127.0.0.1:8080`.
    pub proxy: SocketAddr,
    /// `listen.webhooks`: the Rutter-facing webhook receiver. Default `127.0.0.1:8081`.
    pub webhooks: SocketAddr,
    /// `listen.admin`: `/live`, `/ready`, `/metrics`. Default `127.0.0.1:9901`.
    pub admin: SocketAddr,
    /// `listen.max_connections`: open connections per listener; beyond it new connections wait in
    /// the kernel's backlog. Default 10000.
    pub max_connections: usize,
    /// `listen.max_header_bytes`: largest request head (HTTP/1.1 buffer, HTTP/2 header list), in
    /// bytes. Default 64 KiB.
    pub max_header_bytes: u64,
    /// `listen.idle_timeout`: how long a connection may take to send a request head, including idle
    /// keep-alive time between requests. Default 60 s.
    pub idle_timeout: Duration,
}

/// The upstream base URL split into the parts the proxy uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    /// `http` or `https`.
    pub scheme: Scheme,
    /// Host and port as written (no userinfo).
    pub authority: Authority,
    /// Path prefix without a trailing slash (usually empty); the app's path is appended to it.
    pub path_prefix: String,
}

impl BaseUrl {
    /// The port, explicit or the scheme's default.
    pub fn port(&self) -> u16 {
        self.authority
            .port_u16()
            .unwrap_or(if self.scheme == Scheme::HTTPS {
                443
            } else {
                80
            })
    }
}

impl std::fmt::Display for BaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}://{}{}",
            self.scheme, self.authority, self.path_prefix
        )
    }
}

/// `upstream.rate_limit`: Rutter's per-organization request budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Requests allowed per window. Default 500.
    pub requests: u32,
    /// Window length. Default 10 s.
    pub per: Duration,
}

/// `[upstream]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// `upstream.base_url`: Rutter's origin; the app's path (e.g. `/versioned/...`) is appended.
    /// Default `https://production.rutterapi.com`.
    pub base_url: BaseUrl,
    /// `upstream.ca_file`: extra PEM root certificates trusted besides the web roots. Default none.
    pub ca_file: Option<PathBuf>,
    /// `upstream.connect_timeout`: TCP plus TLS connect limit. Default 5 s.
    pub connect_timeout: Duration,
    /// `upstream.request_timeout`: limit for one upstream exchange (to the response head for streamed
    /// passthrough, to the whole body for buffered ones). Default 60 s.
    pub request_timeout: Duration,
    /// `upstream.max_in_flight`: concurrent upstream exchanges. Default 256.
    pub max_in_flight: usize,
    /// `upstream.rate_limit`: Rutter's organization budget. Default 500 per 10 s.
    pub rate_limit: RateLimit,
    /// `upstream.client_id_env`: the environment variable holding the Rutter client id.
    /// Default `RUTTER_CLIENT_ID`.
    pub client_id_env: String,
    /// `upstream.client_secret_env`: the environment variable holding the Rutter client secret.
    /// Default `RUTTER_CLIENT_SECRET`.
    pub client_secret_env: String,
}

/// `facade.on_timeout`: what a request gets when its deadline passes before its job ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnTimeout {
    /// `"async_response"` (default): the original `async_response` (200) with `X-Rutter-Job-ID`.
    AsyncResponse,
    /// `"gateway_timeout"`: a 504 `JOB_WAIT_TIMEOUT` sidecar error naming the job id.
    GatewayTimeout,
}

/// `facade.response_mode_in`: where `response_mode=async` is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseModeIn {
    /// `"query"`: as a query parameter.
    pub query: bool,
    /// `"body"`: as a top-level member of a JSON object body.
    pub body: bool,
}

/// `[facade]`.
#[derive(Debug, Clone)]
pub struct FacadeConfig {
    /// `facade.max_wait`: the longest a request is held; `Prefer: wait=N` may shorten it. Default 5 min.
    pub max_wait: Duration,
    /// `facade.on_timeout`. Default `async_response`.
    pub on_timeout: OnTimeout,
    /// `facade.response_mode_in`. Default `["query", "body"]`.
    pub response_mode_in: ResponseModeIn,
    /// `facade.poll_initial`: delay before the first poll, and the shortest poll interval. Default 500 ms.
    pub poll_initial: Duration,
    /// `facade.poll_max`: the longest poll interval. Default 5 s.
    pub poll_max: Duration,
    /// `facade.poll_max_with_webhooks`: the longest poll interval while webhooks arrive. Default 15 s.
    pub poll_max_with_webhooks: Duration,
    /// `facade.max_body`: largest write body buffered, in bytes. Default 4 MiB.
    pub max_body: usize,
    /// `facade.routes`: async-capable routes (`"METHOD /path/:id"`). Default: the built-in table.
    pub routes: RouteTable,
}

/// `[jobs]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobsConfig {
    /// `jobs.max_tracked`: the most jobs tracked at once; beyond it, new waits are answered with
    /// their `on_timeout` reply at once. Default 10000.
    pub max_tracked: usize,
    /// `jobs.track_for`: the longest a job is tracked after its last waiter left. Default 1 h.
    pub track_for: Duration,
    /// `jobs.keep_completed`: how long a finished job's result stays for late waiters. Default 2 min.
    pub keep_completed: Duration,
}

/// `[idempotency]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyConfig {
    /// `idempotency.ttl`: how long a result is kept. Default 24 h.
    pub ttl: Duration,
    /// `idempotency.max_bytes`: cache bound in bytes. Default 256 MiB.
    pub max_bytes: u64,
    /// `idempotency.generate_missing_keys`: give keyless facade POST/PATCH a UUID v4 key. Default true.
    pub generate_missing_keys: bool,
}

/// `[webhooks]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhooksConfig {
    /// `webhooks.path`: the path Rutter posts to. Default `/webhooks/rutter`.
    pub path: String,
    /// `webhooks.verify_signature`: check `X-Rutter-Signature`. Default true.
    pub verify_signature: bool,
    /// `webhooks.forward_to`: the app's own webhook URL. Default none.
    pub forward_to: Option<http::Uri>,
    /// `webhooks.forward_job_webhooks`: forward JOB webhooks too. Default false.
    pub forward_job_webhooks: bool,
    /// `webhooks.forward_queue`: webhooks waiting to be forwarded; when full, Rutter is answered 503 so
    /// it delivers again later. Default 1024.
    pub forward_queue: usize,
    /// `webhooks.forward_attempts`: deliveries tried per forwarded webhook. Default 6.
    pub forward_attempts: usize,
    /// `webhooks.forward_backoff`: delay before the first forwarding retry; doubles up to 1 min.
    /// Default 1 s.
    pub forward_backoff: Duration,
}

/// `[shutdown]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShutdownConfig {
    /// `shutdown.drain_delay`: new connections are still accepted this long after SIGTERM. Default 5 s.
    pub drain_delay: Duration,
    /// `shutdown.grace`: waiting requests get until this long after SIGTERM. Default 25 s.
    pub grace: Duration,
}

/// `log.format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (default).
    Text,
    /// One JSON object per line.
    Json,
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// `log.format`. Default `text`.
    pub format: LogFormat,
    /// `log.level`: a tracing filter (`info`, `rutter_sidecar=debug`, ...). Default `info`.
    pub level: String,
}

/// Credentials read from the environment variables the configuration names. Never printed.
#[derive(Clone, Default)]
pub struct Credentials {
    /// The Rutter client id, if its variable is set.
    pub client_id: Option<String>,
    /// The Rutter client secret, if its variable is set.
    pub client_secret: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("client_id", &self.client_id.as_ref().map(|_| "<set>"))
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl Credentials {
    /// The `Authorization: Basic ...` value to inject, when both id and secret are known.
    pub fn basic_authorization(&self) -> Option<http::HeaderValue> {
        use base64::Engine as _;
        let (id, secret) = (self.client_id.as_ref()?, self.client_secret.as_ref()?);
        let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"));
        let mut value = http::HeaderValue::from_str(&format!("Basic {encoded}")).ok()?;
        value.set_sensitive(true);
        Some(value)
    }
}

impl Credentials {
    /// Reads the client id and secret from the variables `upstream` names (`client_id_env`,
    /// `client_secret_env`), looked up in `env` (e.g. `std::env::vars().collect::<Vec<_>>()`). An empty
    /// value counts as unset: an empty secret would make every webhook signature forgeable.
    pub fn from_env(upstream: &UpstreamConfig, env: &[(String, String)]) -> Credentials {
        let lookup = |name: &str| {
            env.iter()
                .find(|(key, value)| key == name && !value.is_empty())
                .map(|(_, value)| value.clone())
        };
        Credentials {
            client_id: lookup(&upstream.client_id_env),
            client_secret: lookup(&upstream.client_secret_env),
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Defaults (DESIGN §2; `[jobs]` is the sidecar's addition)
// ------------------------------------------------------------------------------------------------

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            proxy: SocketAddr::from(([127, 0, 0, 1], 8080)),
            webhooks: SocketAddr::from(([127, 0, 0, 1], 8081)),
            admin: SocketAddr::from(([127, 0, 0, 1], 9901)),
            max_connections: 10_000,
            max_header_bytes: 64 * 1024,
            idle_timeout: Duration::from_secs(60),
        }
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            base_url: BaseUrl {
                scheme: Scheme::HTTPS,
                authority: Authority::from_static("production.rutterapi.com"),
                path_prefix: String::new(),
            },
            ca_file: None,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(60),
            max_in_flight: 256,
            rate_limit: RateLimit {
                requests: 500,
                per: Duration::from_secs(10),
            },
            client_id_env: "RUTTER_CLIENT_ID".to_string(),
            client_secret_env: "RUTTER_CLIENT_SECRET".to_string(),
        }
    }
}

impl Default for FacadeConfig {
    fn default() -> Self {
        FacadeConfig {
            max_wait: Duration::from_secs(5 * 60),
            on_timeout: OnTimeout::AsyncResponse,
            response_mode_in: ResponseModeIn {
                query: true,
                body: true,
            },
            poll_initial: Duration::from_millis(500),
            poll_max: Duration::from_secs(5),
            poll_max_with_webhooks: Duration::from_secs(15),
            max_body: 4 * MIB as usize,
            routes: RouteTable::default(),
        }
    }
}

/// Field by field; routes compare by their patterns (`RouteTable` itself has no `PartialEq`).
impl PartialEq for FacadeConfig {
    fn eq(&self, other: &Self) -> bool {
        self.max_wait == other.max_wait
            && self.on_timeout == other.on_timeout
            && self.response_mode_in == other.response_mode_in
            && self.poll_initial == other.poll_initial
            && self.poll_max == other.poll_max
            && self.poll_max_with_webhooks == other.poll_max_with_webhooks
            && self.max_body == other.max_body
            && self.routes.routes() == other.routes.routes()
    }
}

impl Eq for FacadeConfig {}

impl Default for JobsConfig {
    fn default() -> Self {
        JobsConfig {
            max_tracked: 10_000,
            track_for: Duration::from_secs(60 * 60),
            keep_completed: Duration::from_secs(2 * 60),
        }
    }
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        IdempotencyConfig {
            ttl: Duration::from_secs(24 * 60 * 60),
            max_bytes: 256 * MIB,
            generate_missing_keys: true,
        }
    }
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        WebhooksConfig {
            path: "/webhooks/rutter".to_string(),
            verify_signature: true,
            forward_to: None,
            forward_job_webhooks: false,
            forward_queue: 1024,
            forward_attempts: 6,
            forward_backoff: Duration::from_secs(1),
        }
    }
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            drain_delay: Duration::from_secs(5),
            grace: Duration::from_secs(25),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".to_string(),
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Errors
// ------------------------------------------------------------------------------------------------

/// Every problem found in a configuration, one per entry (`"facade.max_wait: expected ..."`).
///
/// Displayed as one `- key: message` line per error, so `check-config` can list them all at once.
/// Messages name the dotted key, what was expected and what was found; they never repeat URLs or
/// environment variable values, which may carry credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors {
    errors: Vec<String>,
}

impl ConfigErrors {
    /// The errors, each `key: message`, in the order found.
    pub fn errors(&self) -> &[String] {
        &self.errors
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "- {error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

// ------------------------------------------------------------------------------------------------
// Parsing
// ------------------------------------------------------------------------------------------------

/// Prefix of the environment variables that override file settings: `RUTTER_SIDECAR__SECTION__KEY`
/// sets `section.key` (section and key are case-insensitive).
pub const ENV_PREFIX: &str = "RUTTER_SIDECAR__";

/// Every section and key the file accepts, in file order.
const SCHEMA: &[(&str, &[&str])] = &[
    (
        "listen",
        &[
            "proxy",
            "webhooks",
            "admin",
            "max_connections",
            "max_header_bytes",
            "idle_timeout",
        ],
    ),
    (
        "upstream",
        &[
            "base_url",
            "ca_file",
            "connect_timeout",
            "request_timeout",
            "max_in_flight",
            "rate_limit",
            "client_id_env",
            "client_secret_env",
        ],
    ),
    (
        "facade",
        &[
            "max_wait",
            "on_timeout",
            "response_mode_in",
            "poll_initial",
            "poll_max",
            "poll_max_with_webhooks",
            "max_body",
            "routes",
        ],
    ),
    ("jobs", &["max_tracked", "track_for", "keep_completed"]),
    (
        "idempotency",
        &["ttl", "max_bytes", "generate_missing_keys"],
    ),
    (
        "webhooks",
        &[
            "path",
            "verify_signature",
            "forward_to",
            "forward_job_webhooks",
            "forward_queue",
            "forward_attempts",
            "forward_backoff",
        ],
    ),
    ("shutdown", &["drain_delay", "grace"]),
    ("log", &["format", "level"]),
];

/// Keys of `upstream.rate_limit`.
const RATE_LIMIT_KEYS: &[&str] = &["requests", "per"];

/// The longest duration accepted anywhere (keeps `Instant + duration` far from overflow).
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// The largest count accepted for `max_in_flight` and `max_tracked` (semaphore and map bounds).
const MAX_COUNT: i64 = 1_000_000;

/// The most characters of a string value repeated in an error message.
const ECHO_CHARS: usize = 40;

impl Config {
    /// Parses and validates the configuration file `text`, with `env` (all environment variables, as
    /// pairs) applying `RUTTER_SIDECAR__SECTION__KEY` overrides on top. Does no IO.
    ///
    /// An override's value is read as a TOML value when it is one (`42`, `true`, `["query"]`,
    /// `{ requests = 100, per = "1s" }`, `"quoted"`), else taken as a plain string (`5m`,
    /// `https://...`). Missing keys take their defaults. Every problem is collected: the error lists
    /// unknown sections and keys, unknown overrides, wrong types and bad values all at once.
    pub fn parse(text: &str, env: &[(String, String)]) -> Result<Config, ConfigErrors> {
        let mut checker = Checker::default();
        let mut root = match text.parse::<Table>() {
            Ok(root) => root,
            Err(error) => {
                checker.errors.push(syntax_error(text, &error));
                // Still report bad override names: they do not depend on the file.
                apply_env(&mut Table::new(), env, &mut checker);
                return Err(ConfigErrors {
                    errors: checker.errors,
                });
            }
        };
        apply_env(&mut root, env, &mut checker);
        let config = validate(&root, &mut checker);
        if checker.errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors {
                errors: checker.errors,
            })
        }
    }
}

/// `TOML syntax error at line L, column C: message` (1-based, columns in characters).
fn syntax_error(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim().replace('\n', "; ");
    match error.span() {
        Some(span) => {
            let before = text.get(..span.start.min(text.len())).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
            format!("TOML syntax error at line {line}, column {column}: {message}")
        }
        None => format!("TOML syntax error: {message}"),
    }
}

/// Collects errors; remembers which settings came from environment overrides so errors can say so.
#[derive(Default)]
struct Checker {
    errors: Vec<String>,
    /// `(dotted key, variable name)` for every applied override.
    origins: Vec<(String, String)>,
}

impl Checker {
    fn error(&mut self, key: &str, message: impl fmt::Display) {
        let origin = self.origins.iter().find(|(dotted, _)| {
            key.strip_prefix(dotted.as_str()).is_some_and(|rest| {
                rest.is_empty() || rest.starts_with('.') || rest.starts_with('[')
            })
        });
        match origin {
            Some((_, var)) => self.errors.push(format!("{key}: {message} (set by {var})")),
            None => self.errors.push(format!("{key}: {message}")),
        }
    }

    fn check<T>(&mut self, key: &str, result: Result<T, String>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(message) => {
                self.error(key, message);
                None
            }
        }
    }

    /// `section.key` through `parse`: missing gives `default`, invalid records an error and gives None.
    fn field<T>(
        &mut self,
        section: &Section<'_>,
        key: &str,
        default: T,
        parse: impl FnOnce(&Value) -> Result<T, String>,
    ) -> Option<T> {
        match section.get(key) {
            None => Some(default),
            Some(value) => {
                let result = parse(value);
                self.check(&section.key(key), result)
            }
        }
    }
}

/// One `[section]` of the file; `table` is None when it is absent (or not a table: already reported).
struct Section<'a> {
    name: &'static str,
    table: Option<&'a Table>,
}

impl<'a> Section<'a> {
    fn new(root: &'a Table, name: &'static str) -> Self {
        Section {
            name,
            table: root.get(name).and_then(Value::as_table),
        }
    }

    fn key(&self, key: &str) -> String {
        format!("{}.{key}", self.name)
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.table.and_then(|table| table.get(key))
    }
}

/// Applies `RUTTER_SIDECAR__SECTION__KEY` overrides to `root`; unknown or malformed names are errors.
fn apply_env(root: &mut Table, env: &[(String, String)], checker: &mut Checker) {
    for (name, raw) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let parts: Vec<&str> = rest.split("__").collect();
        let [section, key] = parts.as_slice() else {
            checker.error(
                name,
                "expected RUTTER_SIDECAR__SECTION__KEY (one section, one key)",
            );
            continue;
        };
        let (section, key) = (section.to_ascii_lowercase(), key.to_ascii_lowercase());
        let Some((section_name, keys)) = SCHEMA.iter().find(|(s, _)| *s == section) else {
            let names: Vec<&str> = SCHEMA.iter().map(|(s, _)| *s).collect();
            checker.error(
                name,
                format!(
                    "unknown section {}{}",
                    display_key(&section),
                    hint(&section, &names)
                ),
            );
            continue;
        };
        if !keys.contains(&key.as_str()) {
            checker.error(
                name,
                format!(
                    "unknown key {section}.{}{}{}",
                    display_key(&key),
                    hint(&key, keys),
                    credentials_hint(&key)
                ),
            );
            continue;
        }
        let dotted = format!("{section}.{key}");
        if let Some((_, previous)) = checker.origins.iter().find(|(d, _)| *d == dotted) {
            let message = format!("sets {dotted}, which {previous} already sets; set it once");
            checker.error(name, message);
            continue;
        }
        let entry = root
            .entry(*section_name)
            .or_insert_with(|| Value::Table(Table::new()));
        // A section that is not a table is reported by `validate`; the override cannot apply then.
        if let Value::Table(table) = entry {
            table.insert(key, env_value(raw));
        }
        checker.origins.push((dotted, name.clone()));
    }
}

/// An override's value: a TOML value if the text is exactly one, else the text as a string.
fn env_value(raw: &str) -> Value {
    if let Ok(mut table) = format!("v = {raw}").parse::<Table>() {
        if table.len() == 1 {
            if let Some(value) = table.remove("v") {
                return value;
            }
        }
    }
    Value::String(raw.to_string())
}

/// A hint for settings people try to put in the sidecar's environment directly.
fn credentials_hint(key: &str) -> &'static str {
    if key.contains("secret")
        || key.contains("client_id")
        || key.contains("password")
        || key.contains("token")
    {
        "; credentials are read from the variables named by upstream.client_id_env and upstream.client_secret_env"
    } else {
        ""
    }
}

/// ` (did you mean "x"?)` for a near miss, else the list of known names.
fn hint(unknown: &str, known: &[&str]) -> String {
    let unknown_lower = unknown.to_ascii_lowercase();
    let best = known
        .iter()
        .map(|k| (edit_distance(&unknown_lower, k), *k))
        .filter(|(distance, _)| *distance <= 2)
        .min_by_key(|(distance, _)| *distance);
    match best {
        Some((_, k)) => format!(" (did you mean \"{k}\"?)"),
        None => format!(" (expected one of: {})", known.join(", ")),
    }
}

/// Levenshtein distance, for "did you mean" hints on short names.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (row[j + 1] + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// A key name as it can safely appear in a message: bare if it is a plain identifier, else quoted.
fn display_key(key: &str) -> String {
    if !key.is_empty()
        && key.len() <= ECHO_CHARS
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        key.to_string()
    } else {
        short(key)
    }
}

/// A string value, quoted and escaped, cut to [`ECHO_CHARS`] characters.
fn short(text: &str) -> String {
    if text.chars().count() > ECHO_CHARS {
        let cut: String = text.chars().take(ECHO_CHARS).collect();
        format!("{cut:?}...")
    } else {
        format!("{text:?}")
    }
}

/// What was found, for messages: strings are quoted (cut short), other values are named with their type.
fn found(value: &Value) -> String {
    match value {
        Value::String(text) => short(text),
        Value::Integer(i) => format!("{i} (integer)"),
        Value::Float(x) => format!("{x} (float)"),
        Value::Boolean(b) => format!("{b} (boolean)"),
        Value::Datetime(_) => "a datetime".to_string(),
        Value::Array(_) => "an array".to_string(),
        Value::Table(_) => "a table".to_string(),
    }
}

/// What was found, without repeating a string's content (for URLs and variable names).
fn found_hidden(value: &Value) -> String {
    match value {
        Value::String(_) => "a string".to_string(),
        other => found(other),
    }
}

fn expect_str<'v>(value: &'v Value, expected: &str) -> Result<&'v str, String> {
    value
        .as_str()
        .ok_or_else(|| format!("expected {expected}, found {}", found(value)))
}

fn bool_value(value: &Value) -> Result<bool, String> {
    value
        .as_bool()
        .ok_or_else(|| format!("expected true or false, found {}", found(value)))
}

/// An integer in `min..=max`.
fn int_value(value: &Value, min: i64, max: i64) -> Result<i64, String> {
    match value {
        Value::Integer(i) if (min..=max).contains(i) => Ok(*i),
        Value::Integer(i) => Err(format!(
            "expected an integer from {min} to {max}, found {i}"
        )),
        other => Err(format!("expected an integer, found {}", found(other))),
    }
}

fn count_value(value: &Value) -> Result<usize, String> {
    let n = int_value(value, 1, MAX_COUNT)?;
    usize::try_from(n).map_err(|_| format!("expected an integer from 1 to {MAX_COUNT}, found {n}"))
}

/// Whether a duration may be zero.
#[derive(Clone, Copy)]
enum Zero {
    Allowed,
    Rejected,
}

/// A humantime duration string, at most [`MAX_DURATION`]; `example` (the default) shows the form.
fn duration_value(value: &Value, example: Duration, zero: Zero) -> Result<Duration, String> {
    let expected = format!("a duration like \"{}\"", format_duration(example));
    let text = expect_str(value, &expected)?;
    let duration =
        parse_duration(text).map_err(|_| format!("expected {expected}, found {}", short(text)))?;
    if duration.is_zero() && matches!(zero, Zero::Rejected) {
        return Err(format!("must be greater than 0, found {}", short(text)));
    }
    if duration > MAX_DURATION {
        return Err(format!("must be at most 365 days, found {}", short(text)));
    }
    Ok(duration)
}

/// A size string (`"4MiB"`) or a bare integer of bytes, at least `min`.
fn size_value(value: &Value, example: u64, min: u64) -> Result<u64, String> {
    let mismatch = || {
        format!(
            "expected a size like \"{}\" or a number of bytes, found {}",
            format_size(example),
            found(value)
        )
    };
    let bytes = match value {
        Value::Integer(i) => u64::try_from(*i).map_err(|_| mismatch())?,
        Value::String(text) => parse_size(text).map_err(|_| mismatch())?,
        _ => return Err(mismatch()),
    };
    if bytes < min {
        return Err(format!(
            "must be at least {}, found {}",
            format_size(min),
            found(value)
        ));
    }
    Ok(bytes)
}

fn socket_value(value: &Value, example: SocketAddr) -> Result<SocketAddr, String> {
    let expected = format!("an IP address and port like \"{example}\"");
    let text = expect_str(value, &expected)?;
    text.trim()
        .parse()
        .map_err(|_| format!("expected {expected}, found {}", short(text)))
}

/// An environment variable name: non-empty, no `=`, whitespace or control characters. Not echoed.
fn env_name_value(value: &Value, example: &str) -> Result<String, String> {
    let expected = format!("the name of an environment variable like \"{example}\"");
    let Some(text) = value.as_str() else {
        return Err(format!(
            "expected {expected}, found {}",
            found_hidden(value)
        ));
    };
    if text.is_empty() {
        return Err(format!("expected {expected}, found an empty string"));
    }
    if text
        .chars()
        .any(|c| c == '=' || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "expected {expected}, found a string with '=', spaces or control characters"
        ));
    }
    Ok(text.to_string())
}

/// An absolute http(s) URL with a host, an optional valid port, no userinfo and no fragment. Never
/// echoes the text (a URL may carry credentials).
fn http_url(text: &str, allow_query: bool, userinfo_hint: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = text.parse().map_err(|_| {
        "expected an http or https URL, found a string that is not a valid URL".to_string()
    })?;
    let (Some(scheme), Some(authority)) = (uri.scheme(), uri.authority()) else {
        return Err(
            "expected an absolute http or https URL (scheme://host...), found a relative one"
                .to_string(),
        );
    };
    if *scheme != Scheme::HTTP && *scheme != Scheme::HTTPS {
        return Err(format!(
            "expected an http or https URL, found scheme {}",
            short(scheme.as_str())
        ));
    }
    if authority.as_str().contains('@') {
        return Err(format!(
            "must not contain credentials (user:password@){userinfo_hint}"
        ));
    }
    let host = authority.host();
    if host.is_empty() {
        return Err("the URL has no host".to_string());
    }
    let after_host = authority.as_str().strip_prefix(host).unwrap_or("");
    if !after_host.is_empty() {
        let valid_port = after_host
            .strip_prefix(':')
            .and_then(|port| port.parse::<u16>().ok())
            .is_some_and(|port| port != 0);
        if !valid_port {
            return Err("the URL's port must be a number from 1 to 65535".to_string());
        }
    }
    if text.contains('#') {
        return Err("the URL must not have a fragment (#...)".to_string());
    }
    if !allow_query && (uri.query().is_some() || text.contains('?')) {
        return Err("the URL must not have a query (?...)".to_string());
    }
    Ok(uri)
}

fn base_url_value(value: &Value) -> Result<BaseUrl, String> {
    let Some(text) = value.as_str() else {
        return Err(format!(
            "expected an http or https URL like \"https://production.rutterapi.com\", found {}",
            found_hidden(value)
        ));
    };
    let hint = "; credentials belong in the environment variables named by upstream.client_id_env and upstream.client_secret_env";
    let uri = http_url(text.trim(), false, hint)?;
    let (Some(scheme), Some(authority)) = (uri.scheme(), uri.authority()) else {
        return Err("expected an absolute http or https URL".to_string());
    };
    Ok(BaseUrl {
        scheme: scheme.clone(),
        authority: authority.clone(),
        path_prefix: uri.path().trim_end_matches('/').to_string(),
    })
}

fn forward_to_value(value: &Value) -> Result<Option<http::Uri>, String> {
    let Some(text) = value.as_str() else {
        return Err(format!(
            "expected \"\" or an http or https URL, found {}",
            found_hidden(value)
        ));
    };
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    http_url(text, true, "").map(Some)
}

fn ca_file_value(value: &Value) -> Result<Option<PathBuf>, String> {
    let text = expect_str(value, "a file path or \"\"")?;
    if text.contains('\0') {
        return Err("the path must not contain NUL characters".to_string());
    }
    Ok((!text.is_empty()).then(|| PathBuf::from(text)))
}

fn rate_limit_value(value: &Value, checker: &mut Checker, key: &str) -> Option<RateLimit> {
    let Value::Table(table) = value else {
        checker.error(
            key,
            format!(
                "expected an inline table like {{ requests = 500, per = \"10s\" }}, found {}",
                found(value)
            ),
        );
        return None;
    };
    let mut ok = true;
    for name in table.keys() {
        if !RATE_LIMIT_KEYS.contains(&name.as_str()) {
            checker.error(
                &format!("{key}.{}", display_key(name)),
                format!("unknown key{}", hint(name, RATE_LIMIT_KEYS)),
            );
            ok = false;
        }
    }
    let requests = match table.get("requests") {
        None => checker.check(
            &format!("{key}.requests"),
            Err("missing (expected an integer, e.g. 500)".to_string()),
        ),
        Some(v) => {
            let result = int_value(v, 1, i64::from(u32::MAX))
                .and_then(|n| u32::try_from(n).map_err(|_| "out of range".to_string()));
            checker.check(&format!("{key}.requests"), result)
        }
    };
    let per = match table.get("per") {
        None => checker.check(
            &format!("{key}.per"),
            Err("missing (expected a duration like \"10s\")".to_string()),
        ),
        Some(v) => checker.check(
            &format!("{key}.per"),
            duration_value(v, Duration::from_secs(10), Zero::Rejected),
        ),
    };
    match (requests, per, ok) {
        (Some(requests), Some(per), true) => Some(RateLimit { requests, per }),
        _ => None,
    }
}

fn on_timeout_value(value: &Value) -> Result<OnTimeout, String> {
    match value.as_str() {
        Some("async_response") => Ok(OnTimeout::AsyncResponse),
        Some("gateway_timeout") => Ok(OnTimeout::GatewayTimeout),
        _ => Err(format!(
            "expected \"async_response\" or \"gateway_timeout\", found {}",
            found(value)
        )),
    }
}

fn response_mode_in_value(
    value: &Value,
    checker: &mut Checker,
    key: &str,
) -> Option<ResponseModeIn> {
    let Value::Array(items) = value else {
        checker.error(
            key,
            format!(
                "expected an array like [\"query\", \"body\"], found {}",
                found(value)
            ),
        );
        return None;
    };
    if items.is_empty() {
        checker.error(
            key,
            "must name at least one of \"query\" and \"body\", found an empty array",
        );
        return None;
    }
    let mut mode = ResponseModeIn {
        query: false,
        body: false,
    };
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        let slot = match item.as_str() {
            Some("query") => &mut mode.query,
            Some("body") => &mut mode.body,
            _ => {
                checker.error(
                    &format!("{key}[{i}]"),
                    format!("expected \"query\" or \"body\", found {}", found(item)),
                );
                ok = false;
                continue;
            }
        };
        if *slot {
            checker.error(
                &format!("{key}[{i}]"),
                format!("{} is listed twice", found(item)),
            );
            ok = false;
        }
        *slot = true;
    }
    ok.then_some(mode)
}

/// One `facade.routes` entry: `RoutePattern::parse` plus the checks it leaves to us (upper-case
/// method, a bare path).
fn route_value(text: &str) -> Result<RoutePattern, String> {
    let trimmed = text.trim();
    if let Some((method, path)) = trimmed.split_once(' ') {
        if method.bytes().any(|b| b.is_ascii_lowercase()) {
            return Err(format!(
                "{}: the method must be upper case (HTTP methods are case-sensitive)",
                short(trimmed)
            ));
        }
        let path = path.trim();
        if path.contains(|c: char| c == '?' || c == '#' || c.is_whitespace()) {
            return Err(format!(
                "{}: the path must be a bare path (no query, fragment or spaces)",
                short(trimmed)
            ));
        }
    }
    RoutePattern::parse(trimmed)
}

fn routes_value(value: &Value, checker: &mut Checker, key: &str) -> Option<RouteTable> {
    let Value::Array(items) = value else {
        checker.error(
            key,
            format!(
                "expected an array of \"METHOD /path\" strings, found {}",
                found(value)
            ),
        );
        return None;
    };
    let mut routes = Vec::with_capacity(items.len());
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        let result = match item.as_str() {
            Some(text) => route_value(text),
            None => Err(format!(
                "expected a \"METHOD /path\" string, found {}",
                found(item)
            )),
        };
        match result {
            Ok(route) => routes.push(route),
            Err(message) => {
                checker.error(&format!("{key}[{i}]"), message);
                ok = false;
            }
        }
    }
    ok.then(|| RouteTable::new(routes))
}

fn webhook_path_value(value: &Value) -> Result<String, String> {
    let text = expect_str(value, "a path like \"/webhooks/rutter\"")?;
    if !text.starts_with('/') {
        return Err(format!("must start with \"/\", found {}", short(text)));
    }
    if text.contains(|c: char| c == '?' || c == '#' || c.is_whitespace())
        || text.parse::<http::uri::PathAndQuery>().is_err()
    {
        return Err(format!(
            "expected a bare URL path (no query, fragment or spaces), found {}",
            short(text)
        ));
    }
    Ok(text.to_string())
}

fn log_format_value(value: &Value) -> Result<LogFormat, String> {
    match value.as_str() {
        Some("text") => Ok(LogFormat::Text),
        Some("json") => Ok(LogFormat::Json),
        _ => Err(format!(
            "expected \"text\" or \"json\", found {}",
            found(value)
        )),
    }
}

fn log_level_value(value: &Value) -> Result<String, String> {
    let expected = "a tracing filter like \"info\" or \"rutter_sidecar=debug,info\"";
    let text = expect_str(value, expected)?;
    if text.trim().is_empty() || text.chars().any(char::is_control) {
        return Err(format!("expected {expected}, found {}", short(text)));
    }
    Ok(text.trim().to_string())
}

/// Whether two listen addresses would collide on bind (same port, and same or wildcard IP).
fn listen_conflict(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// Reports unknown sections and keys, and sections that are not tables.
fn check_names(root: &Table, checker: &mut Checker) {
    let sections: Vec<&str> = SCHEMA.iter().map(|(name, _)| *name).collect();
    for (name, value) in root {
        let Some((_, keys)) = SCHEMA.iter().find(|(s, _)| s == name) else {
            checker.error(
                &display_key(name),
                format!("unknown section{}", hint(name, &sections)),
            );
            continue;
        };
        let Value::Table(table) = value else {
            checker.error(
                name,
                format!("expected a table ([{name}]), found {}", found(value)),
            );
            continue;
        };
        for key in table.keys() {
            if !keys.contains(&key.as_str()) {
                let message = format!("unknown key{}", hint(key, keys));
                checker.error(&format!("{name}.{}", display_key(key)), message);
            }
        }
    }
}

/// Validates every section; invalid fields are recorded in `checker` and replaced by defaults in the
/// returned value (which is only used when `checker` has no errors).
fn validate(root: &Table, checker: &mut Checker) -> Config {
    check_names(root, checker);
    let d = Config::default();

    // [listen]
    let s = Section::new(root, "listen");
    let proxy = checker.field(&s, "proxy", d.listen.proxy, |v| {
        socket_value(v, d.listen.proxy)
    });
    let webhooks = checker.field(&s, "webhooks", d.listen.webhooks, |v| {
        socket_value(v, d.listen.webhooks)
    });
    let admin = checker.field(&s, "admin", d.listen.admin, |v| {
        socket_value(v, d.listen.admin)
    });
    let pairs = [
        (proxy, webhooks, "webhooks", "proxy"),
        (proxy, admin, "admin", "proxy"),
        (webhooks, admin, "admin", "webhooks"),
    ];
    for (first, second, second_key, first_key) in pairs {
        if let (Some(a), Some(b)) = (first, second) {
            if listen_conflict(a, b) {
                checker.error(
                    &format!("listen.{second_key}"),
                    format!("must not use the same port as listen.{first_key} ({b})"),
                );
            }
        }
    }
    let listen = ListenConfig {
        proxy: proxy.unwrap_or(d.listen.proxy),
        webhooks: webhooks.unwrap_or(d.listen.webhooks),
        admin: admin.unwrap_or(d.listen.admin),
        max_connections: checker
            .field(&s, "max_connections", d.listen.max_connections, count_value)
            .unwrap_or(d.listen.max_connections),
        max_header_bytes: checker
            .field(&s, "max_header_bytes", d.listen.max_header_bytes, |v| {
                size_value(v, d.listen.max_header_bytes, 8 * 1024)
            })
            .unwrap_or(d.listen.max_header_bytes),
        idle_timeout: checker
            .field(&s, "idle_timeout", d.listen.idle_timeout, |v| {
                duration_value(v, d.listen.idle_timeout, Zero::Rejected)
            })
            .unwrap_or(d.listen.idle_timeout),
    };

    // [upstream]
    let u = &d.upstream;
    let s = Section::new(root, "upstream");
    let base_url = checker.field(&s, "base_url", u.base_url.clone(), base_url_value);
    let ca_file = checker.field(&s, "ca_file", u.ca_file.clone(), ca_file_value);
    let connect_timeout = checker.field(&s, "connect_timeout", u.connect_timeout, |v| {
        duration_value(v, u.connect_timeout, Zero::Rejected)
    });
    let request_timeout = checker.field(&s, "request_timeout", u.request_timeout, |v| {
        duration_value(v, u.request_timeout, Zero::Rejected)
    });
    let max_in_flight = checker.field(&s, "max_in_flight", u.max_in_flight, count_value);
    let rate_limit = match s.get("rate_limit") {
        None => Some(u.rate_limit),
        Some(v) => rate_limit_value(v, checker, &s.key("rate_limit")),
    };
    let client_id_env = checker.field(&s, "client_id_env", u.client_id_env.clone(), |v| {
        env_name_value(v, "RUTTER_CLIENT_ID")
    });
    let client_secret_env =
        checker.field(&s, "client_secret_env", u.client_secret_env.clone(), |v| {
            env_name_value(v, "RUTTER_CLIENT_SECRET")
        });
    if let (Some(id), Some(secret)) = (&client_id_env, &client_secret_env) {
        if id == secret {
            checker.error(
                "upstream.client_secret_env",
                "must name a different variable than upstream.client_id_env",
            );
        }
    }
    let upstream = UpstreamConfig {
        base_url: base_url.unwrap_or_else(|| u.base_url.clone()),
        ca_file: ca_file.unwrap_or(None),
        connect_timeout: connect_timeout.unwrap_or(u.connect_timeout),
        request_timeout: request_timeout.unwrap_or(u.request_timeout),
        max_in_flight: max_in_flight.unwrap_or(u.max_in_flight),
        rate_limit: rate_limit.unwrap_or(u.rate_limit),
        client_id_env: client_id_env.unwrap_or_else(|| u.client_id_env.clone()),
        client_secret_env: client_secret_env.unwrap_or_else(|| u.client_secret_env.clone()),
    };

    // [facade]
    let f = &d.facade;
    let s = Section::new(root, "facade");
    let max_wait = checker.field(&s, "max_wait", f.max_wait, |v| {
        duration_value(v, f.max_wait, Zero::Rejected)
    });
    let on_timeout = checker.field(&s, "on_timeout", f.on_timeout, on_timeout_value);
    let response_mode_in = match s.get("response_mode_in") {
        None => Some(f.response_mode_in),
        Some(v) => response_mode_in_value(v, checker, &s.key("response_mode_in")),
    };
    let poll_initial = checker.field(&s, "poll_initial", f.poll_initial, |v| {
        duration_value(v, f.poll_initial, Zero::Rejected)
    });
    let poll_max = checker.field(&s, "poll_max", f.poll_max, |v| {
        duration_value(v, f.poll_max, Zero::Rejected)
    });
    let poll_max_with_webhooks = checker.field(
        &s,
        "poll_max_with_webhooks",
        f.poll_max_with_webhooks,
        |v| duration_value(v, f.poll_max_with_webhooks, Zero::Rejected),
    );
    if let (Some(initial), Some(max)) = (poll_initial, poll_max) {
        if max < initial {
            let message = format!(
                "must be at least facade.poll_initial ({}), found {}",
                format_duration(initial),
                format_duration(max)
            );
            checker.error("facade.poll_max", message);
        }
    }
    if let (Some(max), Some(with_webhooks)) = (poll_max, poll_max_with_webhooks) {
        if with_webhooks < max {
            let message = format!(
                "must be at least facade.poll_max ({}), found {}",
                format_duration(max),
                format_duration(with_webhooks)
            );
            checker.error("facade.poll_max_with_webhooks", message);
        }
    }
    let max_body = checker.field(&s, "max_body", f.max_body, |v| {
        let bytes = size_value(v, f.max_body as u64, KIB)?;
        usize::try_from(bytes).map_err(|_| "is too large for this platform".to_string())
    });
    let routes = match s.get("routes") {
        None => Some(f.routes.clone()),
        Some(v) => routes_value(v, checker, &s.key("routes")),
    };
    let facade = FacadeConfig {
        max_wait: max_wait.unwrap_or(f.max_wait),
        on_timeout: on_timeout.unwrap_or(f.on_timeout),
        response_mode_in: response_mode_in.unwrap_or(f.response_mode_in),
        poll_initial: poll_initial.unwrap_or(f.poll_initial),
        poll_max: poll_max.unwrap_or(f.poll_max),
        poll_max_with_webhooks: poll_max_with_webhooks.unwrap_or(f.poll_max_with_webhooks),
        max_body: max_body.unwrap_or(f.max_body),
        routes: routes.unwrap_or_else(|| f.routes.clone()),
    };

    // [jobs]
    let j = &d.jobs;
    let s = Section::new(root, "jobs");
    let jobs = JobsConfig {
        max_tracked: checker
            .field(&s, "max_tracked", j.max_tracked, count_value)
            .unwrap_or(j.max_tracked),
        track_for: checker
            .field(&s, "track_for", j.track_for, |v| {
                duration_value(v, j.track_for, Zero::Rejected)
            })
            .unwrap_or(j.track_for),
        keep_completed: checker
            .field(&s, "keep_completed", j.keep_completed, |v| {
                duration_value(v, j.keep_completed, Zero::Rejected)
            })
            .unwrap_or(j.keep_completed),
    };

    // [idempotency]
    let i = &d.idempotency;
    let s = Section::new(root, "idempotency");
    let idempotency = IdempotencyConfig {
        ttl: checker
            .field(&s, "ttl", i.ttl, |v| {
                duration_value(v, i.ttl, Zero::Rejected)
            })
            .unwrap_or(i.ttl),
        max_bytes: checker
            .field(&s, "max_bytes", i.max_bytes, |v| {
                size_value(v, i.max_bytes, MIB)
            })
            .unwrap_or(i.max_bytes),
        generate_missing_keys: checker
            .field(
                &s,
                "generate_missing_keys",
                i.generate_missing_keys,
                bool_value,
            )
            .unwrap_or(i.generate_missing_keys),
    };

    // [webhooks]
    let w = &d.webhooks;
    let s = Section::new(root, "webhooks");
    let webhooks = WebhooksConfig {
        path: checker
            .field(&s, "path", w.path.clone(), webhook_path_value)
            .unwrap_or_else(|| w.path.clone()),
        verify_signature: checker
            .field(&s, "verify_signature", w.verify_signature, bool_value)
            .unwrap_or(w.verify_signature),
        forward_to: checker
            .field(&s, "forward_to", w.forward_to.clone(), forward_to_value)
            .unwrap_or(None),
        forward_job_webhooks: checker
            .field(
                &s,
                "forward_job_webhooks",
                w.forward_job_webhooks,
                bool_value,
            )
            .unwrap_or(w.forward_job_webhooks),
        forward_queue: checker
            .field(&s, "forward_queue", w.forward_queue, count_value)
            .unwrap_or(w.forward_queue),
        forward_attempts: checker
            .field(&s, "forward_attempts", w.forward_attempts, count_value)
            .unwrap_or(w.forward_attempts),
        forward_backoff: checker
            .field(&s, "forward_backoff", w.forward_backoff, |v| {
                duration_value(v, w.forward_backoff, Zero::Rejected)
            })
            .unwrap_or(w.forward_backoff),
    };

    // [shutdown]
    let sd = &d.shutdown;
    let s = Section::new(root, "shutdown");
    let drain_delay = checker.field(&s, "drain_delay", sd.drain_delay, |v| {
        duration_value(v, sd.drain_delay, Zero::Allowed)
    });
    let grace = checker.field(&s, "grace", sd.grace, |v| {
        duration_value(v, sd.grace, Zero::Allowed)
    });
    if let (Some(drain_delay), Some(grace)) = (drain_delay, grace) {
        if grace < drain_delay {
            let message = format!(
                "must be at least shutdown.drain_delay ({}), found {}",
                format_duration(drain_delay),
                format_duration(grace)
            );
            checker.error("shutdown.grace", message);
        }
    }
    let shutdown = ShutdownConfig {
        drain_delay: drain_delay.unwrap_or(sd.drain_delay),
        grace: grace.unwrap_or(sd.grace),
    };

    // [log]
    let l = &d.log;
    let s = Section::new(root, "log");
    let log = LogConfig {
        format: checker
            .field(&s, "format", l.format, log_format_value)
            .unwrap_or(l.format),
        level: checker
            .field(&s, "level", l.level.clone(), log_level_value)
            .unwrap_or_else(|| l.level.clone()),
    };

    Config {
        listen,
        upstream,
        facade,
        jobs,
        idempotency,
        webhooks,
        shutdown,
        log,
    }
}

/// Parses a humantime duration (`"500ms"`, `"5m"`, `"24h"`, `"1h 30m"`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|error| error.to_string())
}

/// Formats a duration exactly, in the largest of h, m, s, ms, us, ns that divides it (`"24h"`,
/// `"90s"`, `"1500ms"`); [`parse_duration`] reads it back to the same value.
pub fn format_duration(duration: Duration) -> String {
    const UNITS: [(u128, &str); 6] = [
        (3_600_000_000_000, "h"),
        (60_000_000_000, "m"),
        (1_000_000_000, "s"),
        (1_000_000, "ms"),
        (1_000, "us"),
        (1, "ns"),
    ];
    let nanos = duration.as_nanos();
    if nanos == 0 {
        return "0s".to_string();
    }
    for (unit, suffix) in UNITS {
        if nanos.is_multiple_of(unit) {
            return format!("{}{suffix}", nanos / unit);
        }
    }
    format!("{nanos}ns")
}

/// Parses a size: a whole number of bytes, optionally followed by a unit: `B`; decimal `KB`, `MB`,
/// `GB`, `TB` (powers of 1000); binary `KiB`, `MiB`, `GiB`, `TiB` (powers of 1024). Units are
/// case-insensitive and may follow a space (`"4MiB"`, `"10 MB"`, `"512"`).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    if number.is_empty() {
        return Err(
            "expected a whole number of bytes, optionally followed by a unit like MiB".to_string(),
        );
    }
    let unit = unit.trim();
    let multiplier = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "kib" => KIB,
        "mib" => MIB,
        "gib" => GIB,
        "tib" => TIB,
        _ if unit.starts_with('.') => {
            return Err("use a whole number (e.g. 1536KiB, not 1.5MiB)".to_string())
        }
        _ => {
            return Err(format!(
                "unknown unit {} (use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)",
                short(unit)
            ))
        }
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .ok_or_else(|| "the size is too large".to_string())
}

/// Formats a byte count in the largest binary unit that divides it (`"4MiB"`, `"1KiB"`), else in
/// bytes (`"1000B"`); [`parse_size`] reads it back to the same value.
pub fn format_size(bytes: u64) -> String {
    for (unit, suffix) in [(TIB, "TiB"), (GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")] {
        if bytes != 0 && bytes.is_multiple_of(unit) {
            return format!("{}{suffix}", bytes / unit);
        }
    }
    format!("{bytes}B")
}

// ------------------------------------------------------------------------------------------------
// Rendering and warnings
// ------------------------------------------------------------------------------------------------

/// A TOML string literal (quoted and escaped).
fn quote(text: &str) -> String {
    Value::String(text.to_string()).to_string()
}

impl Config {
    /// The effective configuration as TOML, every key present (durations and sizes in their text
    /// forms, `facade.routes` listing the effective table), followed by comment lines saying whether
    /// the credential variables are set. Credential values are never included; parsing the output
    /// with [`Config::parse`] gives back an equal configuration.
    pub fn render(&self, credentials: &Credentials) -> String {
        let d = format_duration;
        let (l, u, f, j, i, w, s) = (
            &self.listen,
            &self.upstream,
            &self.facade,
            &self.jobs,
            &self.idempotency,
            &self.webhooks,
            &self.shutdown,
        );
        let on_timeout = match f.on_timeout {
            OnTimeout::AsyncResponse => "async_response",
            OnTimeout::GatewayTimeout => "gateway_timeout",
        };
        let mut modes = Vec::new();
        if f.response_mode_in.query {
            modes.push(quote("query"));
        }
        if f.response_mode_in.body {
            modes.push(quote("body"));
        }
        let ca_file = u
            .ca_file
            .as_ref()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let forward_to = w
            .forward_to
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        let log_format = match self.log.format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        };
        let mut lines = vec![
            "# rutter-sidecar effective configuration (file plus RUTTER_SIDECAR__* overrides, defaults filled in)".to_string(),
            String::new(),
            "[listen]".to_string(),
            format!("proxy = {}", quote(&l.proxy.to_string())),
            format!("webhooks = {}", quote(&l.webhooks.to_string())),
            format!("admin = {}", quote(&l.admin.to_string())),
            format!("max_connections = {}", l.max_connections),
            format!("max_header_bytes = {}", quote(&format_size(l.max_header_bytes))),
            format!("idle_timeout = {}", quote(&d(l.idle_timeout))),
            String::new(),
            "[upstream]".to_string(),
            format!("base_url = {}", quote(&u.base_url.to_string())),
            format!("ca_file = {}", quote(&ca_file)),
            format!("connect_timeout = {}", quote(&d(u.connect_timeout))),
            format!("request_timeout = {}", quote(&d(u.request_timeout))),
            format!("max_in_flight = {}", u.max_in_flight),
            format!("rate_limit = {{ requests = {}, per = {} }}", u.rate_limit.requests, quote(&d(u.rate_limit.per))),
            format!("client_id_env = {}", quote(&u.client_id_env)),
            format!("client_secret_env = {}", quote(&u.client_secret_env)),
            String::new(),
            "[facade]".to_string(),
            format!("max_wait = {}", quote(&d(f.max_wait))),
            format!("on_timeout = {}", quote(on_timeout)),
            format!("response_mode_in = [{}]", modes.join(", ")),
            format!("poll_initial = {}", quote(&d(f.poll_initial))),
            format!("poll_max = {}", quote(&d(f.poll_max))),
            format!("poll_max_with_webhooks = {}", quote(&d(f.poll_max_with_webhooks))),
            format!("max_body = {}", quote(&format_size(f.max_body as u64))),
            "routes = [".to_string(),
        ];
        lines.extend(
            f.routes
                .routes()
                .iter()
                .map(|route| format!("    {},", quote(route.template()))),
        );
        lines.extend([
            "]".to_string(),
            String::new(),
            "[jobs]".to_string(),
            format!("max_tracked = {}", j.max_tracked),
            format!("track_for = {}", quote(&d(j.track_for))),
            format!("keep_completed = {}", quote(&d(j.keep_completed))),
            String::new(),
            "[idempotency]".to_string(),
            format!("ttl = {}", quote(&d(i.ttl))),
            format!("max_bytes = {}", quote(&format_size(i.max_bytes))),
            format!("generate_missing_keys = {}", i.generate_missing_keys),
            String::new(),
            "[webhooks]".to_string(),
            format!("path = {}", quote(&w.path)),
            format!("verify_signature = {}", w.verify_signature),
            format!("forward_to = {}", quote(&forward_to)),
            format!("forward_job_webhooks = {}", w.forward_job_webhooks),
            format!("forward_queue = {}", w.forward_queue),
            format!("forward_attempts = {}", w.forward_attempts),
            format!("forward_backoff = {}", quote(&d(w.forward_backoff))),
            String::new(),
            "[shutdown]".to_string(),
            format!("drain_delay = {}", quote(&d(s.drain_delay))),
            format!("grace = {}", quote(&d(s.grace))),
            String::new(),
            "[log]".to_string(),
            format!("format = {}", quote(log_format)),
            format!("level = {}", quote(&self.log.level)),
            String::new(),
            "# Credentials (read from the environment at start-up; values are never shown):"
                .to_string(),
        ]);
        let status = |value: &Option<String>| {
            if value.is_some() {
                "set (<redacted>)"
            } else {
                "not set"
            }
        };
        // Variable names are validated to hold no whitespace or control characters: safe in a comment.
        lines.push(format!(
            "#   ${}: {}",
            u.client_id_env,
            status(&credentials.client_id)
        ));
        lines.push(format!(
            "#   ${}: {}",
            u.client_secret_env,
            status(&credentials.client_secret)
        ));
        let basic = if credentials.basic_authorization().is_some() {
            "on"
        } else {
            "off (needs both variables)"
        };
        lines.push(format!("#   Basic auth injection: {basic}"));
        let mut out = lines.join("\n");
        out.push('\n');
        out
    }

    /// Problems that do not stop the sidecar but that an operator should hear about at start-up and
    /// from `check-config` (missing webhook secret, half-set credentials, settings without effect).
    pub fn warnings(&self, credentials: &Credentials) -> Vec<String> {
        let (id_env, secret_env) = (
            &self.upstream.client_id_env,
            &self.upstream.client_secret_env,
        );
        let mut warnings = Vec::new();
        if self.webhooks.verify_signature && credentials.client_secret.is_none() {
            warnings.push(format!(
                "no client secret in ${secret_env}: webhooks will be refused with 401 and polling serves every wait"
            ));
        }
        if !self.webhooks.verify_signature {
            warnings.push(
                "webhooks.verify_signature = false: unsigned webhooks are accepted, so anyone who can reach \
                 listen.webhooks can complete jobs with forged results"
                    .to_string(),
            );
        }
        match (&credentials.client_id, &credentials.client_secret) {
            (Some(_), None) => warnings.push(format!(
                "Basic auth will not be injected: ${id_env} is set but ${secret_env} is not; apps must send their own Authorization"
            )),
            (None, Some(_)) => warnings.push(format!(
                "Basic auth will not be injected: ${secret_env} is set but ${id_env} is not; apps must send their own Authorization"
            )),
            _ => {}
        }
        let base = &self.upstream.base_url;
        if base.scheme == Scheme::HTTP && !is_loopback_host(base.authority.host()) {
            warnings.push(
                "upstream.base_url uses plain http to a non-loopback host: credentials and data travel unencrypted"
                    .to_string(),
            );
        }
        if self.webhooks.forward_job_webhooks && self.webhooks.forward_to.is_none() {
            warnings.push(
                "webhooks.forward_job_webhooks has no effect without webhooks.forward_to"
                    .to_string(),
            );
        }
        let routes = self.facade.routes.routes();
        if routes.is_empty() {
            warnings.push(
                "facade.routes is empty: no request takes the synchronous facade (only prefer_sync async_responses are awaited)"
                    .to_string(),
            );
        }
        for (index, route) in routes.iter().enumerate() {
            if routes[..index].contains(route) {
                warnings.push(format!(
                    "facade.routes[{index}]: {} is listed twice",
                    quote(route.template())
                ));
            }
        }
        warnings
    }
}

/// `localhost`, `127.x.x.x` or `[::1]`.
fn is_loopback_host(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAKE_SECRET: &str = "s3cr3t-DO-NOT-PRINT-7f1c";
    const FAKE_ID: &str = "client-id-DO-NOT-PRINT-9a2b";

    fn parse(text: &str) -> Result<Config, ConfigErrors> {
        Config::parse(text, &[])
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The errors for `text`, asserting that parsing failed.
    fn errors(text: &str) -> Vec<String> {
        match parse(text) {
            Ok(_) => panic!("expected errors for:\n{text}"),
            Err(e) => e.errors().to_vec(),
        }
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn defaults_match_the_design() {
        let c = Config::default();
        assert_eq!(c.listen.proxy.to_string(), "127.0.0.1:8080");
        assert_eq!(c.listen.webhooks.to_string(), "127.0.0.1:8081");
        assert_eq!(c.listen.admin.to_string(), "127.0.0.1:9901");
        assert_eq!(
            c.upstream.base_url.to_string(),
            "https://production.rutterapi.com"
        );
        assert_eq!(c.upstream.base_url.port(), 443);
        assert_eq!(c.upstream.ca_file, None);
        assert_eq!(c.upstream.connect_timeout, secs(5));
        assert_eq!(c.upstream.request_timeout, secs(60));
        assert_eq!(c.upstream.max_in_flight, 256);
        assert_eq!(
            c.upstream.rate_limit,
            RateLimit {
                requests: 500,
                per: secs(10)
            }
        );
        assert_eq!(c.upstream.client_id_env, "RUTTER_CLIENT_ID");
        assert_eq!(c.upstream.client_secret_env, "RUTTER_CLIENT_SECRET");
        assert_eq!(c.facade.max_wait, secs(300));
        assert_eq!(c.facade.on_timeout, OnTimeout::AsyncResponse);
        assert_eq!(
            c.facade.response_mode_in,
            ResponseModeIn {
                query: true,
                body: true
            }
        );
        assert_eq!(c.facade.poll_initial, Duration::from_millis(500));
        assert_eq!(c.facade.poll_max, secs(5));
        assert_eq!(c.facade.poll_max_with_webhooks, secs(15));
        assert_eq!(c.facade.max_body, 4 * 1024 * 1024);
        assert_eq!(c.facade.routes.routes(), RouteTable::default().routes());
        assert_eq!(c.jobs.max_tracked, 10_000);
        assert_eq!(c.jobs.track_for, secs(3600));
        assert_eq!(c.jobs.keep_completed, secs(120));
        assert_eq!(c.idempotency.ttl, secs(86_400));
        assert_eq!(c.idempotency.max_bytes, 256 * 1024 * 1024);
        assert!(c.idempotency.generate_missing_keys);
        assert_eq!(c.webhooks.path, "/webhooks/rutter");
        assert!(c.webhooks.verify_signature);
        assert_eq!(c.webhooks.forward_to, None);
        assert!(!c.webhooks.forward_job_webhooks);
        assert_eq!(c.shutdown.drain_delay, secs(5));
        assert_eq!(c.shutdown.grace, secs(25));
        assert_eq!(c.log.format, LogFormat::Text);
        assert_eq!(c.log.level, "info");
    }

    #[test]
    fn empty_file_is_the_default() {
        assert_eq!(parse("").unwrap(), Config::default());
    }

    #[test]
    fn shipped_config_toml_equals_the_defaults() {
        let text = include_str!("../config.toml");
        let parsed = parse(text).unwrap_or_else(|e| panic!("config.toml is invalid:\n{e}"));
        let d = Config::default();
        assert_eq!(parsed.listen, d.listen);
        assert_eq!(parsed.upstream, d.upstream);
        assert_eq!(parsed.facade, d.facade);
        assert_eq!(parsed.jobs, d.jobs);
        assert_eq!(parsed.idempotency, d.idempotency);
        assert_eq!(parsed.webhooks, d.webhooks);
        assert_eq!(parsed.shutdown, d.shutdown);
        assert_eq!(parsed.log, d.log);
        assert_eq!(parsed, d);
    }

    #[test]
    fn shipped_config_toml_documents_every_key() {
        let text = include_str!("../config.toml");
        for (section, keys) in SCHEMA {
            assert!(
                text.contains(&format!("[{section}]")),
                "config.toml lacks [{section}]"
            );
            for key in *keys {
                let commented = format!("# {key} = ");
                let set = format!("\n{key} = ");
                assert!(
                    text.contains(&set) || text.contains(&commented),
                    "config.toml lacks {section}.{key}"
                );
            }
        }
    }

    const FULL: &str = r#"
[listen]
proxy = "0.0.0.0:18080"
webhooks = "0.0.0.0:18081"
admin = "[::1]:19901"

[upstream]
base_url = "http://127.0.0.1:4000/rutter/"
ca_file = "/etc/rutter/ca.pem"
connect_timeout = "2s"
request_timeout = "90s"
max_in_flight = 32
rate_limit = { requests = 100, per = "1s" }
client_id_env = "MY_ID"
client_secret_env = "MY_SECRET"

[facade]
max_wait = "90s"
on_timeout = "gateway_timeout"
response_mode_in = ["body"]
poll_initial = "250ms"
poll_max = "2s"
poll_max_with_webhooks = "2s"
max_body = "10MB"
routes = ["POST /custom/things", "PATCH /custom/things/:id"]

[jobs]
max_tracked = 50
track_for = "10m"
keep_completed = "30s"

[idempotency]
ttl = "1h 30m"
max_bytes = 2097152
generate_missing_keys = false

[webhooks]
path = "/hooks"
verify_signature = false
forward_to = "http://app.internal:3000/rutter-webhooks?token=abc"
forward_job_webhooks = true

[shutdown]
drain_delay = "0s"
grace = "0s"

[log]
format = "json"
level = "rutter_sidecar=debug,info"
"#;

    #[test]
    fn full_valid_file() {
        let c = parse(FULL).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.listen.proxy.to_string(), "0.0.0.0:18080");
        assert_eq!(c.listen.admin.to_string(), "[::1]:19901");
        assert_eq!(c.upstream.base_url.scheme, Scheme::HTTP);
        assert_eq!(c.upstream.base_url.authority.as_str(), "127.0.0.1:4000");
        assert_eq!(c.upstream.base_url.path_prefix, "/rutter");
        assert_eq!(c.upstream.base_url.port(), 4000);
        assert_eq!(
            c.upstream.ca_file,
            Some(PathBuf::from("/etc/rutter/ca.pem"))
        );
        assert_eq!(c.upstream.connect_timeout, secs(2));
        assert_eq!(c.upstream.request_timeout, secs(90));
        assert_eq!(c.upstream.max_in_flight, 32);
        assert_eq!(
            c.upstream.rate_limit,
            RateLimit {
                requests: 100,
                per: secs(1)
            }
        );
        assert_eq!(c.upstream.client_id_env, "MY_ID");
        assert_eq!(c.upstream.client_secret_env, "MY_SECRET");
        assert_eq!(c.facade.max_wait, secs(90));
        assert_eq!(c.facade.on_timeout, OnTimeout::GatewayTimeout);
        assert_eq!(
            c.facade.response_mode_in,
            ResponseModeIn {
                query: false,
                body: true
            }
        );
        assert_eq!(c.facade.poll_initial, Duration::from_millis(250));
        assert_eq!(c.facade.poll_max, secs(2));
        assert_eq!(c.facade.poll_max_with_webhooks, secs(2));
        assert_eq!(c.facade.max_body, 10_000_000);
        let templates: Vec<&str> = c
            .facade
            .routes
            .routes()
            .iter()
            .map(|r| r.template())
            .collect();
        assert_eq!(
            templates,
            ["POST /custom/things", "PATCH /custom/things/:id"]
        );
        assert_eq!(c.jobs.max_tracked, 50);
        assert_eq!(c.jobs.track_for, secs(600));
        assert_eq!(c.jobs.keep_completed, secs(30));
        assert_eq!(c.idempotency.ttl, secs(5400));
        assert_eq!(c.idempotency.max_bytes, 2 * 1024 * 1024);
        assert!(!c.idempotency.generate_missing_keys);
        assert_eq!(c.webhooks.path, "/hooks");
        assert!(!c.webhooks.verify_signature);
        assert_eq!(
            c.webhooks
                .forward_to
                .as_ref()
                .map(ToString::to_string)
                .as_deref(),
            Some("http://app.internal:3000/rutter-webhooks?token=abc")
        );
        assert!(c.webhooks.forward_job_webhooks);
        assert_eq!(c.shutdown.drain_delay, Duration::ZERO);
        assert_eq!(c.shutdown.grace, Duration::ZERO);
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(c.log.level, "rutter_sidecar=debug,info");
    }

    #[test]
    fn partial_sections_keep_other_defaults() {
        let c = parse("[facade]\nmax_wait = \"1m\"\n").unwrap();
        assert_eq!(c.facade.max_wait, secs(60));
        assert_eq!(c.facade.poll_max, secs(5));
        assert_eq!(c.upstream, UpstreamConfig::default());
    }

    #[test]
    fn env_overrides_win_over_the_file() {
        let text = "[upstream]\nbase_url = \"https://file.example\"\nmax_in_flight = 8\n[facade]\nresponse_mode_in = [\"query\", \"body\"]\n";
        let vars = env(&[
            (
                "RUTTER_SIDECAR__UPSTREAM__BASE_URL",
                "http://localhost:9000",
            ),
            ("RUTTER_SIDECAR__UPSTREAM__MAX_IN_FLIGHT", "64"),
            (
                "RUTTER_SIDECAR__upstream__rate_limit",
                "{ requests = 100, per = \"1s\" }",
            ),
            ("RUTTER_SIDECAR__FACADE__RESPONSE_MODE_IN", "[\"query\"]"),
            ("RUTTER_SIDECAR__FACADE__MAX_WAIT", "45s"),
            ("RUTTER_SIDECAR__Facade__Routes", "[\"POST /x\"]"),
            ("RUTTER_SIDECAR__WEBHOOKS__VERIFY_SIGNATURE", "false"),
            ("RUTTER_SIDECAR__LOG__LEVEL", "debug"),
            ("RUTTER_SIDECAR__LOG__FORMAT", "\"json\""),
            ("RUTTER_SIDECAR__UPSTREAM__CA_FILE", ""),
            ("RUTTER_SIDECAR__JOBS__MAX_TRACKED", "7"),
            ("UNRELATED", "whatever"),
            (
                "RUTTER_SIDECAR_CONFIG",
                "not an override (single underscore)",
            ),
        ]);
        let c = Config::parse(text, &vars).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.upstream.base_url.to_string(), "http://localhost:9000");
        assert_eq!(c.upstream.max_in_flight, 64);
        assert_eq!(
            c.upstream.rate_limit,
            RateLimit {
                requests: 100,
                per: secs(1)
            }
        );
        assert_eq!(
            c.facade.response_mode_in,
            ResponseModeIn {
                query: true,
                body: false
            }
        );
        assert_eq!(c.facade.max_wait, secs(45));
        assert_eq!(c.facade.routes.routes().len(), 1);
        assert!(!c.webhooks.verify_signature);
        assert_eq!(c.log.level, "debug");
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(c.upstream.ca_file, None);
        assert_eq!(c.jobs.max_tracked, 7);
    }

    #[test]
    fn env_value_is_toml_when_it_is_exactly_one_value() {
        assert_eq!(env_value("42"), Value::Integer(42));
        assert_eq!(env_value("true"), Value::Boolean(true));
        assert_eq!(env_value("\"quoted\""), Value::String("quoted".into()));
        assert_eq!(env_value("5m"), Value::String("5m".into()));
        assert_eq!(
            env_value("127.0.0.1:8080"),
            Value::String("127.0.0.1:8080".into())
        );
        assert_eq!(env_value(""), Value::String(String::new()));
        assert!(matches!(env_value("[\"query\", \"body\"]"), Value::Array(a) if a.len() == 2));
        assert!(matches!(
            env_value("{ requests = 1, per = \"1s\" }"),
            Value::Table(_)
        ));
        // A value cannot smuggle in other keys.
        assert_eq!(
            env_value("1\n[log]\nlevel = \"x\""),
            Value::String("1\n[log]\nlevel = \"x\"".into())
        );
    }

    #[test]
    fn env_override_errors_name_the_variable_and_not_the_value() {
        let vars = env(&[
            ("RUTTER_SIDECAR__UPSTRAEM__BASE_URL", "https://x"),
            ("RUTTER_SIDECAR__UPSTREAM__NOPE", "1"),
            ("RUTTER_SIDECAR__UPSTREAM__CLIENT_SECRET", FAKE_SECRET),
            ("RUTTER_SIDECAR__LOG", "debug"),
            ("RUTTER_SIDECAR__UPSTREAM__RATE_LIMIT__REQUESTS", "5"),
        ]);
        let e = Config::parse("", &vars).unwrap_err();
        let errs = e.errors();
        assert_eq!(errs.len(), 5, "{e}");
        assert!(
            errs[0].starts_with("RUTTER_SIDECAR__UPSTRAEM__BASE_URL: unknown section"),
            "{}",
            errs[0]
        );
        assert!(errs[0].contains("did you mean \"upstream\""), "{}", errs[0]);
        assert!(
            errs[1].starts_with("RUTTER_SIDECAR__UPSTREAM__NOPE: unknown key upstream.nope"),
            "{}",
            errs[1]
        );
        assert!(errs[2].contains("client_secret_env"), "{}", errs[2]);
        assert!(
            errs[3].starts_with("RUTTER_SIDECAR__LOG: expected RUTTER_SIDECAR__SECTION__KEY"),
            "{}",
            errs[3]
        );
        assert!(
            errs[4].starts_with("RUTTER_SIDECAR__UPSTREAM__RATE_LIMIT__REQUESTS:"),
            "{}",
            errs[4]
        );
        assert!(!e.to_string().contains(FAKE_SECRET));
    }

    #[test]
    fn env_override_value_errors_say_where_the_value_came_from() {
        let vars = env(&[("RUTTER_SIDECAR__FACADE__MAX_WAIT", "42")]);
        let e = Config::parse("", &vars).unwrap_err();
        assert_eq!(
            e.errors(),
            ["facade.max_wait: expected a duration like \"5m\", found 42 (integer) (set by RUTTER_SIDECAR__FACADE__MAX_WAIT)"]
        );
    }

    #[test]
    fn the_same_setting_twice_in_the_environment_is_an_error() {
        let vars = env(&[
            ("RUTTER_SIDECAR__LOG__LEVEL", "debug"),
            ("RUTTER_SIDECAR__log__level", "info"),
        ]);
        let e = Config::parse("", &vars).unwrap_err();
        assert_eq!(e.errors().len(), 1);
        assert!(
            e.errors()[0].starts_with("RUTTER_SIDECAR__log__level: sets log.level"),
            "{e}"
        );
    }

    #[test]
    fn unknown_section_and_key_are_rejected() {
        let errs =
            errors("[upstream]\nbase_ur = \"https://x.example\"\n[facad]\nmax_wait = \"1m\"\n");
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(
            errs.iter().any(|e| e.starts_with("facad: unknown section")
                && e.contains("did you mean \"facade\"")),
            "{errs:?}"
        );
        assert!(
            errs.iter()
                .any(|e| e.starts_with("upstream.base_ur: unknown key")
                    && e.contains("\"base_url\"")),
            "{errs:?}"
        );
        let errs = errors("top_level = 1\n");
        assert!(
            errs[0].starts_with("top_level: unknown section (expected one of: listen, upstream"),
            "{errs:?}"
        );
    }

    #[test]
    fn section_that_is_not_a_table() {
        let errs = errors("upstream = 5\n");
        assert_eq!(
            errs,
            ["upstream: expected a table ([upstream]), found 5 (integer)"]
        );
    }

    #[test]
    fn syntax_errors_give_line_and_column() {
        let errs = errors("[listen]\nproxy = \"127.0.0.1:8080\"\nadmin = \"oops\n");
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with("TOML syntax error at line 3, column "),
            "{errs:?}"
        );
        let errs = errors("[log]\nlevel = \"a\"\nlevel = \"b\"\n");
        assert!(
            errs[0].starts_with("TOML syntax error at line 3, column 1: duplicate key"),
            "{errs:?}"
        );
    }

    #[test]
    fn five_invalid_fields_are_all_reported() {
        let text = r#"
[upstream]
max_in_flight = 0
[facade]
max_wait = 42
on_timeout = "later"
[webhooks]
path = "hooks"
[log]
format = "xml"
"#;
        let e = parse(text).unwrap_err();
        assert_eq!(
            e.errors(),
            [
                "upstream.max_in_flight: expected an integer from 1 to 1000000, found 0",
                "facade.max_wait: expected a duration like \"5m\", found 42 (integer)",
                "facade.on_timeout: expected \"async_response\" or \"gateway_timeout\", found \"later\"",
                "webhooks.path: must start with \"/\", found \"hooks\"",
                "log.format: expected \"text\" or \"json\", found \"xml\"",
            ]
        );
        let shown = e.to_string();
        assert_eq!(shown.lines().count(), 5);
        assert!(shown.lines().all(|line| line.starts_with("- ")), "{shown}");
        assert!(shown
            .contains("- facade.max_wait: expected a duration like \"5m\", found 42 (integer)"));
    }

    /// Each rule: (file, key the single error must name, text the message must contain).
    #[test]
    fn every_rule_has_a_case() {
        #[rustfmt::skip]
        let cases: &[(&str, &str, &str)] = &[
            // listen
            ("[listen]\nproxy = \"localhost:8080\"", "listen.proxy", "IP address and port"),
            ("[listen]\nadmin = 9901", "listen.admin", "found 9901 (integer)"),
            ("[listen]\nwebhooks = \"127.0.0.1:8080\"", "listen.webhooks", "same port as listen.proxy"),
            ("[listen]\nadmin = \"0.0.0.0:8081\"", "listen.admin", "same port as listen.webhooks"),
            // upstream.base_url
            ("[upstream]\nbase_url = \"ftp://x.example\"", "upstream.base_url", "http or https"),
            ("[upstream]\nbase_url = \"x.example\"", "upstream.base_url", "absolute"),
            ("[upstream]\nbase_url = \"/versioned\"", "upstream.base_url", "absolute"),
            ("[upstream]\nbase_url = \"https://u:p@x.example\"", "upstream.base_url", "credentials belong in the environment"),
            ("[upstream]\nbase_url = \"https://x.example/?a=1\"", "upstream.base_url", "query"),
            ("[upstream]\nbase_url = \"https://x.example/?\"", "upstream.base_url", "query"),
            ("[upstream]\nbase_url = \"https://x.example/#top\"", "upstream.base_url", "fragment"),
            ("[upstream]\nbase_url = \"https://x.example:99999\"", "upstream.base_url", "port"),
            ("[upstream]\nbase_url = \"https://x.example:0\"", "upstream.base_url", "port"),
            ("[upstream]\nbase_url = \"https://x.example:\"", "upstream.base_url", "port"),
            ("[upstream]\nbase_url = \"not a url\"", "upstream.base_url", "not a valid URL"),
            ("[upstream]\nbase_url = 1", "upstream.base_url", "found 1 (integer)"),
            // upstream, other keys
            ("[upstream]\nca_file = 3", "upstream.ca_file", "file path"),
            ("[upstream]\nconnect_timeout = \"0s\"", "upstream.connect_timeout", "greater than 0"),
            ("[upstream]\nrequest_timeout = \"soon\"", "upstream.request_timeout", "duration like \"1m\""),
            ("[upstream]\nrequest_timeout = \"400days\"", "upstream.request_timeout", "at most 365 days"),
            ("[upstream]\nmax_in_flight = -1", "upstream.max_in_flight", "from 1 to"),
            ("[upstream]\nmax_in_flight = \"8\"", "upstream.max_in_flight", "expected an integer, found \"8\""),
            ("[upstream]\nmax_in_flight = 2000000", "upstream.max_in_flight", "from 1 to 1000000"),
            ("[upstream]\nrate_limit = 500", "upstream.rate_limit", "inline table"),
            ("[upstream]\nrate_limit = { requests = 0, per = \"1s\" }", "upstream.rate_limit.requests", "from 1"),
            ("[upstream]\nrate_limit = { requests = 5000000000, per = \"1s\" }", "upstream.rate_limit.requests", "from 1"),
            ("[upstream]\nrate_limit = { requests = 5, per = \"0s\" }", "upstream.rate_limit.per", "greater than 0"),
            ("[upstream]\nrate_limit = { requests = 5 }", "upstream.rate_limit.per", "missing"),
            ("[upstream]\nrate_limit = { per = \"1s\" }", "upstream.rate_limit.requests", "missing"),
            ("[upstream]\nrate_limit = { requests = 5, per = \"1s\", burst = 2 }", "upstream.rate_limit.burst", "unknown key"),
            ("[upstream]\nclient_id_env = \"\"", "upstream.client_id_env", "empty"),
            ("[upstream]\nclient_secret_env = \"A B\"", "upstream.client_secret_env", "spaces"),
            ("[upstream]\nclient_secret_env = \"RUTTER_CLIENT_ID\"", "upstream.client_secret_env", "different variable"),
            // facade
            ("[facade]\nmax_wait = \"0s\"", "facade.max_wait", "greater than 0"),
            ("[facade]\non_timeout = \"drop\"", "facade.on_timeout", "\"gateway_timeout\""),
            ("[facade]\nresponse_mode_in = []", "facade.response_mode_in", "at least one"),
            ("[facade]\nresponse_mode_in = \"query\"", "facade.response_mode_in", "expected an array"),
            ("[facade]\nresponse_mode_in = [\"header\"]", "facade.response_mode_in[0]", "\"query\" or \"body\""),
            ("[facade]\nresponse_mode_in = [\"body\", \"body\"]", "facade.response_mode_in[1]", "twice"),
            ("[facade]\npoll_initial = \"0ms\"", "facade.poll_initial", "greater than 0"),
            ("[facade]\npoll_initial = \"10s\"", "facade.poll_max", "at least facade.poll_initial (10s), found 5s"),
            ("[facade]\npoll_max = \"20s\"", "facade.poll_max_with_webhooks", "at least facade.poll_max (20s)"),
            ("[facade]\nmax_body = \"512B\"", "facade.max_body", "at least 1KiB"),
            ("[facade]\nmax_body = \"4 lots\"", "facade.max_body", "size like \"4MiB\""),
            ("[facade]\nmax_body = -5", "facade.max_body", "size like"),
            ("[facade]\nmax_body = 1.5", "facade.max_body", "found 1.5 (float)"),
            ("[facade]\nroutes = \"POST /x\"", "facade.routes", "array"),
            ("[facade]\nroutes = [\"POST x\"]", "facade.routes[0]", "must start with '/'"),
            ("[facade]\nroutes = [\"post /x\"]", "facade.routes[0]", "upper case"),
            ("[facade]\nroutes = [\"POST /x?y=1\"]", "facade.routes[0]", "bare path"),
            ("[facade]\nroutes = [3]", "facade.routes[0]", "found 3 (integer)"),
            // jobs
            ("[jobs]\nmax_tracked = 0", "jobs.max_tracked", "from 1"),
            ("[jobs]\ntrack_for = \"0s\"", "jobs.track_for", "greater than 0"),
            ("[jobs]\nkeep_completed = true", "jobs.keep_completed", "found true (boolean)"),
            // idempotency
            ("[idempotency]\nttl = \"0s\"", "idempotency.ttl", "greater than 0"),
            ("[idempotency]\nmax_bytes = \"1KiB\"", "idempotency.max_bytes", "at least 1MiB"),
            ("[idempotency]\nmax_bytes = 1000", "idempotency.max_bytes", "at least 1MiB, found 1000 (integer)"),
            ("[idempotency]\ngenerate_missing_keys = \"yes\"", "idempotency.generate_missing_keys", "true or false"),
            // webhooks
            ("[webhooks]\npath = \"webhooks\"", "webhooks.path", "start with \"/\""),
            ("[webhooks]\npath = \"/hooks?x=1\"", "webhooks.path", "bare URL path"),
            ("[webhooks]\nverify_signature = 1", "webhooks.verify_signature", "true or false"),
            ("[webhooks]\nforward_to = \"/relative\"", "webhooks.forward_to", "absolute"),
            ("[webhooks]\nforward_to = \"mailto:x@y\"", "webhooks.forward_to", ""),
            ("[webhooks]\nforward_to = \"https://u:p@app\"", "webhooks.forward_to", "credentials"),
            ("[webhooks]\nforward_to = false", "webhooks.forward_to", "found false (boolean)"),
            // shutdown
            ("[shutdown]\ndrain_delay = \"30s\"", "shutdown.grace", "at least shutdown.drain_delay (30s), found 25s"),
            ("[shutdown]\ngrace = \"1y2\"", "shutdown.grace", "duration like \"25s\""),
            // log
            ("[log]\nformat = \"JSON\"", "log.format", "\"text\" or \"json\""),
            ("[log]\nlevel = \"\"", "log.level", "tracing filter"),
            ("[log]\nlevel = \" \"", "log.level", "tracing filter"),
        ];
        for (text, key, needle) in cases {
            let errs = errors(text);
            assert_eq!(errs.len(), 1, "{text:?}: {errs:?}");
            let prefix = format!("{key}: ");
            assert!(
                errs[0].starts_with(&prefix),
                "{text:?}: {:?} should name {key}",
                errs[0]
            );
            assert!(
                errs[0].contains(needle),
                "{text:?}: {:?} should contain {needle:?}",
                errs[0]
            );
        }
    }

    #[test]
    fn cross_field_rules_wait_for_valid_fields() {
        // poll_max is invalid: no extra complaint comparing it with poll_initial or poll_max_with_webhooks.
        let errs = errors("[facade]\npoll_initial = \"10s\"\npoll_max = \"x\"\n");
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with("facade.poll_max: expected a duration"),
            "{errs:?}"
        );
        let errs = errors("[shutdown]\ndrain_delay = \"x\"\ngrace = \"1s\"\n");
        assert_eq!(errs.len(), 1, "{errs:?}");
    }

    #[test]
    fn every_bad_route_is_reported() {
        let errs = errors("[facade]\nroutes = [\"POST /ok\", \"BAD\", \"POST /fine/:id\", \"GET nope\", \"PUT /a//b\"]\n");
        let keys: Vec<&str> = errs.iter().filter_map(|e| e.split(':').next()).collect();
        assert_eq!(
            keys,
            ["facade.routes[1]", "facade.routes[3]", "facade.routes[4]"],
            "{errs:?}"
        );
    }

    #[test]
    fn empty_route_list_is_allowed_but_warned() {
        let c = parse("[facade]\nroutes = []\n").unwrap();
        assert!(c.facade.routes.routes().is_empty());
        assert!(c
            .warnings(&Credentials::default())
            .iter()
            .any(|w| w.starts_with("facade.routes is empty")));
    }

    #[test]
    fn url_errors_never_echo_the_url() {
        let text = format!("[upstream]\nbase_url = \"https://id:{FAKE_SECRET}@x.example\"\n[webhooks]\nforward_to = \"https://id:{FAKE_SECRET}@app\"\n");
        let e = parse(&text).unwrap_err();
        assert_eq!(e.errors().len(), 2, "{e}");
        assert!(!e.to_string().contains(FAKE_SECRET), "{e}");
        let text = format!("[upstream]\nclient_secret_env = \"{FAKE_SECRET} \"\n");
        assert!(!parse(&text).unwrap_err().to_string().contains(FAKE_SECRET));
    }

    #[test]
    fn base_url_forms() {
        let cases = [
            (
                "https://production.rutterapi.com",
                "https",
                "production.rutterapi.com",
                "",
                443,
            ),
            (
                "https://production.rutterapi.com/",
                "https",
                "production.rutterapi.com",
                "",
                443,
            ),
            (
                "HTTP://Emulator:9000/prefix/",
                "http",
                "Emulator:9000",
                "/prefix",
                9000,
            ),
            ("http://[::1]:8000/a/b", "http", "[::1]:8000", "/a/b", 8000),
            ("http://127.0.0.1", "http", "127.0.0.1", "", 80),
        ];
        for (text, scheme, authority, prefix, port) in cases {
            let url = base_url_value(&Value::String(text.into()))
                .unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(url.scheme.as_str(), scheme, "{text}");
            assert_eq!(url.authority.as_str(), authority, "{text}");
            assert_eq!(url.path_prefix, prefix, "{text}");
            assert_eq!(url.port(), port, "{text}");
        }
    }

    #[test]
    fn size_table() {
        let ok: &[(&str, u64)] = &[
            ("512B", 512),
            ("512", 512),
            ("0", 0),
            ("1KiB", 1024),
            ("4MiB", 4 * 1024 * 1024),
            ("256MiB", 256 * 1024 * 1024),
            ("1GiB", 1 << 30),
            ("2TiB", 2 << 40),
            ("10MB", 10_000_000),
            ("1KB", 1000),
            ("3GB", 3_000_000_000),
            ("4mib", 4 << 20),
            ("4 MiB", 4 << 20),
            (" 7 b ", 7),
        ];
        for (text, bytes) in ok {
            assert_eq!(parse_size(text), Ok(*bytes), "{text:?}");
        }
        for bad in [
            "",
            "MiB",
            "-1",
            "1.5MiB",
            "4XB",
            "4 Mi B",
            "99999999999999999999",
            "20000000TiB",
            "0x10",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} should be rejected");
        }
        for bytes in [
            0,
            1,
            1000,
            1024,
            4 << 20,
            256 << 20,
            1 << 30,
            3 << 40,
            10_000_000,
        ] {
            assert_eq!(parse_size(&format_size(bytes)), Ok(bytes), "{bytes}");
        }
        assert_eq!(format_size(4 << 20), "4MiB");
        assert_eq!(format_size(1000), "1000B");
    }

    #[test]
    fn duration_table() {
        let ok: &[(&str, Duration)] = &[
            ("500ms", Duration::from_millis(500)),
            ("5s", secs(5)),
            ("5m", secs(300)),
            ("24h", secs(86_400)),
            ("1h 30m", secs(5400)),
            ("2min", secs(120)),
            ("1us", Duration::from_micros(1)),
            ("0s", Duration::ZERO),
            ("1.5s", Duration::from_millis(1500)),
        ];
        for (text, duration) in ok {
            assert_eq!(parse_duration(text), Ok(*duration), "{text:?}");
        }
        for bad in ["", "5", "five minutes", "-1s", "5 parsecs", "1.5.5s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
        let formatted = [
            (secs(86_400), "24h"),
            (secs(300), "5m"),
            (secs(90), "90s"),
            (Duration::from_millis(1500), "1500ms"),
            (Duration::from_millis(500), "500ms"),
            (Duration::from_nanos(7), "7ns"),
            (Duration::ZERO, "0s"),
        ];
        for (duration, text) in formatted {
            assert_eq!(format_duration(duration), text);
            assert_eq!(parse_duration(text), Ok(duration));
        }
    }

    fn all_credentials() -> Credentials {
        Credentials {
            client_id: Some(FAKE_ID.into()),
            client_secret: Some(FAKE_SECRET.into()),
        }
    }

    #[test]
    fn render_round_trips_the_defaults() {
        let config = Config::default();
        let text = config.render(&all_credentials());
        let back = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(back, config);
        for (section, keys) in SCHEMA {
            assert!(text.contains(&format!("\n[{section}]\n")), "{section}");
            for key in *keys {
                assert!(
                    text.contains(&format!("\n{key} = ")),
                    "{section}.{key} missing"
                );
            }
        }
    }

    #[test]
    fn render_round_trips_a_full_file() {
        let config = parse(FULL).unwrap();
        let text = config.render(&Credentials::default());
        let back = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(back, config);
        assert!(text.contains("ttl = \"90m\""), "{text}");
        assert!(text.contains("max_bytes = \"2MiB\""), "{text}");
        assert!(
            text.contains("rate_limit = { requests = 100, per = \"1s\" }"),
            "{text}"
        );
        assert!(text.contains("response_mode_in = [\"body\"]"), "{text}");
        // And with overrides applied on top.
        let vars = env(&[
            ("RUTTER_SIDECAR__FACADE__MAX_BODY", "12345"),
            ("RUTTER_SIDECAR__LOG__LEVEL", "a\"b"),
        ]);
        let config = Config::parse(FULL, &vars).unwrap();
        let back = parse(&config.render(&Credentials::default())).unwrap();
        assert_eq!(back, config);
        assert_eq!(back.facade.max_body, 12345);
        assert_eq!(back.log.level, "a\"b");
    }

    #[test]
    fn render_never_contains_credential_values() {
        let text = Config::default().render(&all_credentials());
        assert!(!text.contains(FAKE_SECRET), "{text}");
        assert!(!text.contains(FAKE_ID), "{text}");
        assert!(
            text.contains("#   $RUTTER_CLIENT_ID: set (<redacted>)"),
            "{text}"
        );
        assert!(
            text.contains("#   $RUTTER_CLIENT_SECRET: set (<redacted>)"),
            "{text}"
        );
        assert!(text.contains("Basic auth injection: on"), "{text}");
        let text = Config::default().render(&Credentials::default());
        assert!(
            text.contains("#   $RUTTER_CLIENT_SECRET: not set"),
            "{text}"
        );
        assert!(text.contains("Basic auth injection: off"), "{text}");
    }

    #[test]
    fn warnings() {
        let config = Config::default();
        assert!(
            config.warnings(&all_credentials()).is_empty(),
            "{:?}",
            config.warnings(&all_credentials())
        );

        let w = config.warnings(&Credentials::default());
        assert_eq!(
            w,
            ["no client secret in $RUTTER_CLIENT_SECRET: webhooks will be refused with 401 and polling serves every wait"]
        );

        let only_id = Credentials {
            client_id: Some(FAKE_ID.into()),
            client_secret: None,
        };
        let w = config.warnings(&only_id);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[1].starts_with("Basic auth will not be injected: $RUTTER_CLIENT_ID is set but $RUTTER_CLIENT_SECRET is not"));

        let only_secret = Credentials {
            client_id: None,
            client_secret: Some(FAKE_SECRET.into()),
        };
        let w = config.warnings(&only_secret);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].starts_with("Basic auth will not be injected: $RUTTER_CLIENT_SECRET is set"));

        let full = parse(FULL).unwrap();
        let w = full.warnings(&all_credentials());
        assert!(
            w.iter()
                .any(|w| w.starts_with("webhooks.verify_signature = false")),
            "{w:?}"
        );
        // FULL's plain-http upstream is loopback: no warning for that.
        assert!(!w.iter().any(|w| w.contains("plain http")), "{w:?}");

        let insecure = parse("[upstream]\nbase_url = \"http://rutter.example\"\n[webhooks]\nforward_job_webhooks = true\n[facade]\nroutes = [\"POST /a\", \"POST /a\"]\n").unwrap();
        let w = insecure.warnings(&all_credentials());
        assert_eq!(w.len(), 3, "{w:?}");
        assert!(w[0].contains("plain http"));
        assert!(w[1].contains("forward_job_webhooks has no effect"));
        assert!(w[2].starts_with("facade.routes[1]: \"POST /a\" is listed twice"));

        for w in config
            .warnings(&only_id)
            .iter()
            .chain(config.warnings(&only_secret).iter())
        {
            assert!(!w.contains(FAKE_SECRET) && !w.contains(FAKE_ID), "{w}");
        }
    }

    #[test]
    fn credentials_from_env() {
        let config = Config::default();
        let vars = env(&[("RUTTER_CLIENT_ID", FAKE_ID), ("RUTTER_CLIENT_SECRET", "")]);
        let c = Credentials::from_env(&config.upstream, &vars);
        assert_eq!(c.client_id.as_deref(), Some(FAKE_ID));
        assert_eq!(c.client_secret, None, "an empty secret counts as unset");
        let vars = env(&[
            ("RUTTER_CLIENT_ID", FAKE_ID),
            ("RUTTER_CLIENT_SECRET", FAKE_SECRET),
        ]);
        let c = Credentials::from_env(&config.upstream, &vars);
        assert!(c.basic_authorization().is_some());
        assert!(!format!("{c:?}").contains(FAKE_SECRET));
    }
}
