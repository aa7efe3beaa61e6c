//! rutter-sidecar: a local reverse proxy that lets legacy applications call the Rutter API synchronously
//! while it drives Rutter's asynchronous job mode underneath.
//!
//! The library holds everything; `main.rs` only parses the command line, binds sockets, reads the
//! environment and installs signal handlers. Module map (one concern each):
//!
//! - [`config`]: the TOML file and environment overrides, validated into typed settings.
//! - [`error`]: the one error type of the proxy and its single mapping to an HTTP response.
//! - [`routes`]: which method and path pairs are async-capable (the facade's allow-list).
//! - [`rewrite`]: the pure functions that write `response_mode=async` into queries and JSON bodies.
//! - [`proxy`]: header hygiene and request forwarding rules (RFC 9110).
//! - [`upstream`]: the pooled HTTPS client towards Rutter.
//! - [`facade`]: the request pipeline: classify, rewrite, forward, await, reply.
//! - [`jobs`]: job trackers shared by every request waiting on one job, and their pollers.
//! - [`server`]: listeners, accept loops and shutdown.
//! - [`emulator`]: a Rutter stand-in for development, demos and tests.
//! - [`demo`]: the `demo` subcommand.
#![forbid(unsafe_code)]

pub mod admin;
pub mod body;
pub mod budget;
pub mod config;
pub mod demo;
pub mod emulator;
pub mod error;
pub mod facade;
pub mod idempotency;
pub mod jobs;
pub mod lifecycle;
pub mod proxy;
pub mod rewrite;
pub mod routes;
pub mod server;
pub mod telemetry;
pub mod upstream;
pub mod webhooks;
