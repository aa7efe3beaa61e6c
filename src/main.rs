//! The `rutter-sidecar` binary: parses the command line, reads the configuration file and the
//! environment, binds the listeners, installs signal handlers, and hands over to the library.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use rutter_sidecar::config::{Config, Credentials, LogFormat};
use rutter_sidecar::emulator::{Emulator, EmulatorOptions};
use rutter_sidecar::server::{self, Listeners};

/// A reverse-proxy sidecar that gives legacy apps synchronous answers from Rutter's async job API.
#[derive(Parser)]
#[command(name = "rutter-sidecar", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    config: ConfigArg,
}

#[derive(clap::Args)]
struct ConfigArg {
    /// The configuration file (TOML). Default: `config.toml` in the current directory; without one the
    /// built-in defaults are used.
    #[arg(long, short)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar (the default).
    Run(ConfigArg),
    /// Validate the configuration and print the effective settings, secrets redacted.
    CheckConfig(ConfigArg),
    /// Run the built-in Rutter emulator.
    Emulate(Box<EmulatorOptions>),
    /// Start the emulator and the sidecar on free loopback ports and show a few requests going through.
    Demo,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command.unwrap_or(Command::Run(cli.config)) {
        Command::Run(args) => runtime.block_on(run(args.config.as_deref())),
        Command::CheckConfig(args) => check_config(args.config.as_deref()),
        Command::Emulate(options) => runtime.block_on(emulate(*options)),
        Command::Demo => runtime.block_on(rutter_sidecar::demo::run()),
    }
}

fn environment() -> Vec<(String, String)> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect()
}

/// Reads and validates the configuration, printing every problem; `None` means exit 2. Without
/// `--config`, `config.toml` is read if it exists, else the built-in defaults apply.
fn load(path: Option<&Path>) -> Option<(Config, Credentials)> {
    let default = Path::new("config.toml");
    let (path, required) = match path {
        Some(path) => (path, true),
        None => (default, false),
    };
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if !required && error.kind() == std::io::ErrorKind::NotFound => {
            eprintln!(
                "note: no config.toml here and no --config given: using the built-in defaults"
            );
            String::new()
        }
        Err(error) => {
            eprintln!("error: cannot read {}: {error}", path.display());
            return None;
        }
    };
    let env = environment();
    match Config::parse(&text, &env) {
        Ok(config) => {
            let credentials = Credentials::from_env(&config.upstream, &env);
            Some((config, credentials))
        }
        Err(errors) => {
            eprintln!("error: {} is invalid:\n{errors}", path.display());
            None
        }
    }
}

fn check_config(path: Option<&Path>) -> ExitCode {
    let Some((config, credentials)) = load(path) else {
        return ExitCode::from(2);
    };
    print!("{}", config.render(&credentials));
    for warning in config.warnings(&credentials) {
        eprintln!("warning: {warning}");
    }
    ExitCode::SUCCESS
}

fn init_logging(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn run(path: Option<&Path>) -> ExitCode {
    let Some((config, credentials)) = load(path) else {
        return ExitCode::from(2);
    };
    init_logging(config.log.format, &config.log.level);
    for warning in config.warnings(&credentials) {
        tracing::warn!("{warning}");
    }
    let (Some(proxy), Some(webhooks), Some(admin)) = (
        bind(config.listen.proxy, "listen.proxy").await,
        bind(config.listen.webhooks, "listen.webhooks").await,
        bind(config.listen.admin, "listen.admin").await,
    ) else {
        return ExitCode::FAILURE;
    };
    tracing::info!(
        proxy = %local(&proxy),
        webhooks = %local(&webhooks),
        admin = %local(&admin),
        upstream = %config.upstream.base_url,
        "rutter-sidecar listening"
    );
    let listeners = Listeners {
        proxy,
        webhooks,
        admin,
    };
    match server::run(config, credentials, listeners, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "the sidecar stopped with an error");
            ExitCode::FAILURE
        }
    }
}

/// The address a listener really got (port 0 is resolved).
fn local(listener: &tokio::net::TcpListener) -> String {
    listener
        .local_addr()
        .map_or_else(|_| "?".into(), |a| a.to_string())
}

/// Binds one listener, logging why it failed.
async fn bind(addr: std::net::SocketAddr, name: &str) -> Option<tokio::net::TcpListener> {
    match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => Some(listener),
        Err(error) => {
            tracing::error!(%addr, %error, "cannot bind {name}");
            None
        }
    }
}

async fn emulate(options: EmulatorOptions) -> ExitCode {
    init_logging(LogFormat::Text, "info");
    let listen = options.listen;
    let emulator = match Emulator::new(options) {
        Ok(emulator) => emulator,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("error: cannot bind {listen}: {error}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(listen = %local(&listener), "Rutter emulator listening");
    match emulator.serve(listener, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {}
        _ = terminate => {}
    }
}
