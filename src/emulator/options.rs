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

impl EmulatorOptions {
    /// Checks ranges and combinations; every problem is listed in one error.
    pub(crate) fn validate(&self) -> Result<(), EmulatorError> {
        let mut problems = Vec::new();
        for (name, value) in [
            ("failure_rate", self.failure_rate),
            ("platform_limit_rate", self.platform_limit_rate),
            ("error_rate", self.error_rate),
            ("reset_rate", self.reset_rate),
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
    fn debug_redacts_the_secret() {
        let options = EmulatorOptions {
            client_secret: Some("hunter2".into()),
            ..Default::default()
        };
        assert!(!format!("{options:?}").contains("hunter2"));
    }
}
