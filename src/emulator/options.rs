//! The emulator's settings ([`EmulatorOptions`], the flags of `rutter-sidecar emulate`), their
//! validation, and the TLS server configuration built from `--tls-cert`/`--tls-key`.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Longest duration any millisecond option or header may ask for (one day): keeps every
/// `Instant + Duration` far from overflow.
pub(crate) const MAX_MS: u64 = 86_400_000;

/// Most entities `--seed-entities` may ask for per list resource.
pub(crate) const MAX_SEED_ENTITIES: usize = 100_000;

/// Most extra copies `--webhook-duplicates` (or `X-Emulator-Webhook: duplicate=N`) may ask for.
pub(crate) const MAX_WEBHOOK_DUPLICATES: u32 = 100;

/// Settings of the Rutter emulator: the flags of `rutter-sidecar emulate`, also constructible in code
/// (start from [`EmulatorOptions::default`]).
///
/// Every fault rate is a share in `0..=1`; decisions are drawn from one RNG seeded by `seed`, so a run
/// with the same seed and the same request order makes the same decisions.
#[derive(Clone, PartialEq, clap::Args)]
pub struct EmulatorOptions {
    /// Address the `emulate` subcommand binds (default `127.0.0.1:4010`). Only `main` uses it:
    /// [`super::Emulator::serve`] takes an already bound listener.
    #[arg(long, default_value = "127.0.0.1:4010")]
    pub listen: SocketAddr,

    /// How long a job runs, in milliseconds (default 2000): `prequeued` for the first tenth, then
    /// `pending`, then terminal. `X-Emulator-Job-Ms` overrides it per request.
    #[arg(long, default_value_t = 2000)]
    pub job_ms: u64,

    /// How long a `prefer_sync` request is held before the emulator gives up and answers the
    /// `async_response`, in milliseconds (default 30000: Rutter's 30 s rule).
    #[arg(long, default_value_t = 30_000)]
    pub sync_limit_ms: u64,

    /// Client id for the Basic-auth check (default: none). Only when both `client_id` and
    /// `client_secret` are set is `Authorization: Basic base64(id:secret)` required on every request
    /// (401 `INVALID_CREDENTIALS` otherwise).
    #[arg(long)]
    pub client_id: Option<String>,

    /// Client secret for the Basic-auth check (default: none; also read from the environment
    /// variable `RUTTER_CLIENT_SECRET`). Never printed: `Debug` redacts it.
    #[arg(long, env = "RUTTER_CLIENT_SECRET", hide_env_values = true)]
    pub client_secret: Option<String>,

    /// Do not require the `access_token` query parameter on connection-scoped routes (default: it is
    /// required, 400 otherwise).
    #[arg(long)]
    pub no_access_token_check: bool,

    /// Share of jobs (0..=1, default 0) that end in `failure` with a 400 `INVALID_INPUT` response.
    #[arg(long, default_value_t = 0.0, value_parser = parse_share)]
    pub failure_rate: f64,

    /// Organisation budget: requests of any kind (polls included) allowed per `rate_window_ms`;
    /// beyond it, 429 with `Retry-After` (seconds, rounded up). 0 (default) turns the budget off.
    #[arg(long, default_value_t = 0)]
    pub rate_limit: u32,

    /// Length of the rate-limit window in milliseconds (default 10000: Rutter's 500 per 10 s).
    #[arg(long, default_value_t = 10_000)]
    pub rate_window_ms: u64,

    /// Share of write requests (0..=1, default 0) answered 452 (platform rate limit), no job.
    #[arg(long, default_value_t = 0.0, value_parser = parse_share)]
    pub platform_limit_rate: f64,

    /// Share of requests (0..=1, default 0) answered 503 in Rutter's error shape, no job.
    #[arg(long, default_value_t = 0.0, value_parser = parse_share)]
    pub error_rate: f64,

    /// Share of requests (0..=1, default 0) whose connection is closed without an answer
    /// (HTTP/2: the stream is reset).
    #[arg(long, default_value_t = 0.0, value_parser = parse_share)]
    pub reset_rate: f64,

    /// Every answer is delayed by this many milliseconds (default 0).
    #[arg(long, default_value_t = 0)]
    pub slow_ms: u64,

    /// Entities every list resource starts with (default 3).
    #[arg(long, default_value_t = 3)]
    pub seed_entities: usize,

    /// PEM certificate chain: with `tls_key`, serve HTTPS (ALPN `h2`, `http/1.1`) instead of cleartext.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for `tls_cert`.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// RNG seed for fault decisions and generated ids (default: random).
    #[arg(long)]
    pub seed: Option<u64>,

    /// Where signed `JOB_COMPLETED` webhooks are POSTed (an `http` or `https` URL; default: none,
    /// no webhooks). Needs `client_secret`: the body is signed with it (`X-Rutter-Signature`).
    #[arg(long, value_parser = parse_webhook_url)]
    pub webhook_url: Option<http::Uri>,

    /// How long after a job ends its webhook is sent, in milliseconds (default 0: at once).
    /// `X-Emulator-Webhook: delay=N` overrides it per request.
    #[arg(long, default_value_t = 0)]
    pub webhook_delay_ms: u64,

    /// Extra copies of every webhook (default 0; at most 100), sent alongside the first one,
    /// each delivered and retried on its own. `X-Emulator-Webhook: duplicate[=N]` overrides it.
    #[arg(long, default_value_t = 0)]
    pub webhook_duplicates: u32,

    /// Share of webhooks (0..=1, default 0) never sent (with all their copies).
    #[arg(long, default_value_t = 0.0, value_parser = parse_share)]
    pub webhook_drop_rate: f64,

    /// Share of webhooks (0..=1, default 0) sent with a wrong `X-Rutter-Signature`.
    #[arg(long, default_value_t = 0.0, value_parser = parse_share)]
    pub webhook_bad_signature_rate: f64,

    /// Deliver every webhook before answering the write that created its job (default: off):
    /// the job ends at once (`--job-ms` is ignored), the first delivery attempt is awaited (at
    /// most `webhook_timeout_ms`), then the answer (an `async_response` still saying `pending`)
    /// goes out. `X-Emulator-Webhook: early` turns it on per request.
    #[arg(long)]
    pub webhook_early: bool,

    /// Delay before the first retry of a webhook answered with a non-2xx status or not answered,
    /// in milliseconds (default 1000); each of the 6 retries waits twice as long as the previous.
    #[arg(long, default_value_t = 1000)]
    pub webhook_retry_ms: u64,

    /// How long one webhook delivery attempt may take, in milliseconds (default 10000; at least
    /// 1): connect, send, and the receiver's answer head. Beyond it the attempt counts as failed.
    #[arg(long, default_value_t = 10_000)]
    pub webhook_timeout_ms: u64,
}

impl Default for EmulatorOptions {
    fn default() -> Self {
        EmulatorOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 4010)),
            job_ms: 2000,
            sync_limit_ms: 30_000,
            client_id: None,
            client_secret: None,
            no_access_token_check: false,
            failure_rate: 0.0,
            rate_limit: 0,
            rate_window_ms: 10_000,
            platform_limit_rate: 0.0,
            error_rate: 0.0,
            reset_rate: 0.0,
            slow_ms: 0,
            seed_entities: 3,
            tls_cert: None,
            tls_key: None,
            seed: None,
            webhook_url: None,
            webhook_delay_ms: 0,
            webhook_duplicates: 0,
            webhook_drop_rate: 0.0,
            webhook_bad_signature_rate: 0.0,
            webhook_early: false,
            webhook_retry_ms: 1000,
            webhook_timeout_ms: 10_000,
        }
    }
}

impl fmt::Debug for EmulatorOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmulatorOptions")
            .field("listen", &self.listen)
            .field("job_ms", &self.job_ms)
            .field("sync_limit_ms", &self.sync_limit_ms)
            .field("client_id", &self.client_id)
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("no_access_token_check", &self.no_access_token_check)
            .field("failure_rate", &self.failure_rate)
            .field("rate_limit", &self.rate_limit)
            .field("rate_window_ms", &self.rate_window_ms)
            .field("platform_limit_rate", &self.platform_limit_rate)
            .field("error_rate", &self.error_rate)
            .field("reset_rate", &self.reset_rate)
            .field("slow_ms", &self.slow_ms)
            .field("seed_entities", &self.seed_entities)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("seed", &self.seed)
            .field("webhook_url", &self.webhook_url.as_ref().map(redacted_url))
            .field("webhook_delay_ms", &self.webhook_delay_ms)
            .field("webhook_duplicates", &self.webhook_duplicates)
            .field("webhook_drop_rate", &self.webhook_drop_rate)
            .field(
                "webhook_bad_signature_rate",
                &self.webhook_bad_signature_rate,
            )
            .field("webhook_early", &self.webhook_early)
            .field("webhook_retry_ms", &self.webhook_retry_ms)
            .field("webhook_timeout_ms", &self.webhook_timeout_ms)
            .finish()
    }
}

/// Why an [`super::Emulator`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    /// An option is out of range or inconsistent with another.
    #[error("invalid emulator option: {0}")]
    InvalidOption(String),
    /// A TLS file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error reading it.
        #[source]
        source: std::io::Error,
    },
    /// The TLS files were read but do not make a usable server configuration.
    #[error("TLS setup failed: {0}")]
    Tls(String),
}

/// clap value parser for shares: a float in `0..=1`.
fn parse_share(text: &str) -> Result<f64, String> {
    let value: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number"))?;
    if (0.0..=1.0).contains(&value) {
        Ok(value)
    } else {
        Err(format!("{value} is not between 0 and 1"))
    }
}

/// clap value parser for `--webhook-url`: an absolute `http` or `https` URL with a host.
fn parse_webhook_url(text: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = text.trim().parse().map_err(|e| format!("not a URL: {e}"))?;
    check_webhook_url(&uri)?;
    Ok(uri)
}

/// Why `uri` cannot be a webhook URL, if it cannot.
fn check_webhook_url(uri: &http::Uri) -> Result<(), String> {
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err("the webhook URL must start with http:// or https://".into()),
    }
    match uri.host() {
        Some(host) if !host.is_empty() => Ok(()),
        _ => Err("the webhook URL has no host".into()),
    }
}

/// `scheme://host[:port]/path` of a URL: no user info, no query (either may carry a token).
pub(crate) fn redacted_url(uri: &http::Uri) -> String {
    let host = uri.host().unwrap_or("");
    let port = uri.port_u16().map(|p| format!(":{p}")).unwrap_or_default();
    format!(
        "{}://{host}{port}{}",
        uri.scheme_str().unwrap_or(""),
        uri.path()
    )
}

impl EmulatorOptions {
    /// Checks ranges and combinations; every problem is listed in one error.
    pub(crate) fn validate(&self) -> Result<(), EmulatorError> {
        let mut problems = Vec::new();
        for (name, value) in [
            ("failure_rate", self.failure_rate),
            ("platform_limit_rate", self.platform_limit_rate),
            ("error_rate", self.error_rate),
            ("reset_rate", self.reset_rate),
            ("webhook_drop_rate", self.webhook_drop_rate),
            (
                "webhook_bad_signature_rate",
                self.webhook_bad_signature_rate,
            ),
        ] {
            if !(0.0..=1.0).contains(&value) {
                problems.push(format!("{name} must be between 0 and 1 (got {value})"));
            }
        }
        for (name, value) in [
            ("job_ms", self.job_ms),
            ("sync_limit_ms", self.sync_limit_ms),
            ("rate_window_ms", self.rate_window_ms),
            ("slow_ms", self.slow_ms),
            ("webhook_delay_ms", self.webhook_delay_ms),
            ("webhook_retry_ms", self.webhook_retry_ms),
            ("webhook_timeout_ms", self.webhook_timeout_ms),
        ] {
            if value > MAX_MS {
                problems.push(format!("{name} must be at most {MAX_MS} (one day)"));
            }
        }
        if self.rate_limit > 0 && self.rate_window_ms == 0 {
            problems.push("rate_window_ms must be positive when rate_limit is set".to_string());
        }
        if self.seed_entities > MAX_SEED_ENTITIES {
            problems.push(format!("seed_entities must be at most {MAX_SEED_ENTITIES}"));
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            problems.push("tls_cert and tls_key must be given together".to_string());
        }
        if self.webhook_timeout_ms == 0 {
            problems.push("webhook_timeout_ms must be positive".to_string());
        }
        if self.webhook_duplicates > MAX_WEBHOOK_DUPLICATES {
            problems.push(format!(
                "webhook_duplicates must be at most {MAX_WEBHOOK_DUPLICATES}"
            ));
        }
        if let Some(url) = &self.webhook_url {
            if let Err(problem) = check_webhook_url(url) {
                problems.push(format!("webhook_url: {problem}"));
            }
            if self.client_secret.as_deref().unwrap_or("").is_empty() {
                problems.push(
                    "webhook_url needs client_secret (--client-secret or RUTTER_CLIENT_SECRET): \
                     webhooks are signed with the client secret, and an empty key is refused"
                        .to_string(),
                );
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(EmulatorError::InvalidOption(problems.join("; ")))
        }
    }

    /// The TLS server configuration, when `tls_cert` and `tls_key` are set.
    pub(crate) fn tls_config(&self) -> Result<Option<Arc<rustls::ServerConfig>>, EmulatorError> {
        let (Some(cert_path), Some(key_path)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        let cert_pem = read_file(cert_path)?;
        let key_pem = read_file(key_path)?;
        let certs = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| EmulatorError::Tls(format!("{}: {e}", cert_path.display())))?;
        if certs.is_empty() {
            return Err(EmulatorError::Tls(format!(
                "{}: no certificate found",
                cert_path.display()
            )));
        }
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| EmulatorError::Tls(format!("{}: {e}", key_path.display())))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| EmulatorError::Tls(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| EmulatorError::Tls(e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Some(Arc::new(config)))
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, EmulatorError> {
    std::fs::read(path).map_err(|source| EmulatorError::Io {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        options: EmulatorOptions,
    }

    #[test]
    fn clap_defaults_match_default() {
        let mut parsed = Cli::parse_from(["emulate"]).options;
        // The environment may carry RUTTER_CLIENT_SECRET; it is not a default.
        parsed.client_secret = None;
        assert_eq!(parsed, EmulatorOptions::default());
    }

    #[test]
    fn shares_are_checked() {
        assert!(Cli::try_parse_from(["emulate", "--failure-rate", "1.5"]).is_err());
        assert!(Cli::try_parse_from(["emulate", "--error-rate", "0.25"]).is_ok());
        let options = EmulatorOptions {
            reset_rate: -1.0,
            ..Default::default()
        };
        assert!(options.validate().is_err());
        let options = EmulatorOptions {
            tls_cert: Some("a".into()),
            ..Default::default()
        };
        assert!(options.validate().is_err());
        assert!(EmulatorOptions::default().validate().is_ok());
    }

    #[test]
    fn webhook_options_are_checked() {
        assert!(Cli::try_parse_from(["emulate", "--webhook-url", "ftp://x/hook"]).is_err());
        assert!(Cli::try_parse_from(["emulate", "--webhook-url", "/hook"]).is_err());
        assert!(Cli::try_parse_from(["emulate", "--webhook-drop-rate", "2"]).is_err());
        let parsed = Cli::try_parse_from([
            "emulate",
            "--webhook-url",
            "https://127.0.0.1:9/hooks/rutter",
            "--webhook-duplicates",
            "2",
            "--webhook-early",
        ]);
        assert!(parsed.is_ok_and(|cli| cli.options.webhook_duplicates == 2
            && cli.options.webhook_early
            && cli.options.webhook_url.is_some()));
        let url: http::Uri = "http://127.0.0.1:9/hook".parse().unwrap();
        let without_secret = EmulatorOptions {
            webhook_url: Some(url.clone()),
            ..Default::default()
        };
        let error = without_secret.validate().unwrap_err().to_string();
        assert!(error.contains("client_secret"), "{error}");
        let empty_secret = EmulatorOptions {
            webhook_url: Some(url.clone()),
            client_secret: Some(String::new()),
            ..Default::default()
        };
        assert!(empty_secret.validate().is_err());
        let ok = EmulatorOptions {
            webhook_url: Some(url.clone()),
            client_secret: Some("s".into()),
            ..Default::default()
        };
        assert!(ok.validate().is_ok());
        let bad = EmulatorOptions {
            webhook_url: Some("ws://127.0.0.1:9/".parse().unwrap()),
            client_secret: Some("s".into()),
            webhook_duplicates: 1000,
            webhook_timeout_ms: 0,
            ..Default::default()
        };
        let error = bad.validate().unwrap_err().to_string();
        assert!(error.contains("webhook_url") && error.contains("webhook_duplicates"));
        assert!(error.contains("webhook_timeout_ms"), "{error}");
    }

    #[test]
    fn debug_redacts_the_webhook_url_query() {
        let options = EmulatorOptions {
            webhook_url: Some("https://hooks.test:8443/in?token=abc123".parse().unwrap()),
            ..Default::default()
        };
        let text = format!("{options:?}");
        assert!(text.contains("https://hooks.test:8443/in"), "{text}");
        assert!(!text.contains("abc123"), "{text}");
    }

    #[test]
    fn debug_redacts_the_secret() {
        let options = EmulatorOptions {
            client_secret: Some("hunter2".into()),
            ..Default::default()
        };
        assert!(!format!("{options:?}").contains("hunter2"));
    }
}
