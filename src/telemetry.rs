//! Metrics (DESIGN §8): every series the sidecar exports, named `rutter_sidecar_*`, in one
//! prometheus-client registry, encoded in the Prometheus text format by the admin listener.
//!
//! Labels carry only bounded, non-secret values: request class, HTTP status, call kind, result names.
//! Never a path, query, key, token or job id.

use std::borrow::Cow;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// `class` and `status` of an app request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `facade`, `passthrough`, `explicit_async`.
    pub class: &'static str,
    /// The HTTP status returned to the app.
    pub status: u16,
}

/// `kind` and `status` of an upstream call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    /// `write`, `passthrough`, `poll`.
    pub kind: &'static str,
    /// The HTTP status, or `error` / `timeout` / `budget` when there was none.
    pub status: Cow<'static, str>,
}

/// One `result` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// What happened.
    pub result: &'static str,
}

/// `class` of an app request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabel {
    /// `facade`, `passthrough`, `explicit_async`.
    pub class: &'static str,
}

/// Every metric of the process.
pub struct Metrics {
    registry: Registry,
    /// `rutter_sidecar_requests_total{class,status}`.
    pub requests: Family<RequestLabels, Counter>,
    /// `rutter_sidecar_request_duration_seconds{class}`.
    pub request_duration: Family<ClassLabel, Histogram>,
    /// `rutter_sidecar_upstream_calls_total{kind,status}`.
    pub upstream_calls: Family<UpstreamLabels, Counter>,
    /// `rutter_sidecar_job_wait_seconds`: how long app requests were held waiting for a job.
    pub job_wait: Histogram,
    /// `rutter_sidecar_jobs_tracked`: trackers alive (running or recently finished).
    pub jobs_tracked: Gauge,
    /// `rutter_sidecar_waiters`: app requests waiting on a job right now.
    pub waiters: Gauge,
    /// `rutter_sidecar_idempotency_total{result}`: `replayed`, `coalesced`, `conflict`.
    pub idempotency: Family<ResultLabel, Counter>,
    /// `rutter_sidecar_webhooks_total{result}`: `accepted`, `duplicate`, `unauthorized`, `malformed`,
    /// `too_large`, `queue_full`, `rejected`.
    pub webhooks: Family<ResultLabel, Counter>,
    /// `rutter_sidecar_webhook_forwards_total{result}`: `delivered`, `failed`.
    pub webhook_forwards: Family<ResultLabel, Counter>,
    /// `rutter_sidecar_rate_limit_waits_total`: upstream calls that had to wait for the budget.
    pub rate_limit_waits: Counter,
    /// `rutter_sidecar_rate_limit_wait_seconds`: how long they waited.
    pub rate_limit_wait: Histogram,
    /// `rutter_sidecar_upstream_budget_used`: calls started in the current rate window.
    pub budget_used: Gauge,
    /// `rutter_sidecar_draining`: 1 while shutting down.
    pub draining: Gauge,
}

impl Metrics {
    /// All metrics, registered.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("rutter_sidecar");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "App requests answered, by class and status",
            requests.clone(),
        );
        let request_duration = Family::<ClassLabel, Histogram>::new_with_constructor(
            seconds_histogram as fn() -> Histogram,
        );
        registry.register(
            "request_duration_seconds",
            "Time to answer app requests",
            request_duration.clone(),
        );
        let upstream_calls = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "upstream_calls",
            "Calls to Rutter, by kind and status",
            upstream_calls.clone(),
        );
        let job_wait = seconds_histogram();
        registry.register(
            "job_wait_seconds",
            "Time app requests were held waiting for a job",
            job_wait.clone(),
        );
        let jobs_tracked = Gauge::default();
        registry.register(
            "jobs_tracked",
            "Jobs tracked (running or recently finished)",
            jobs_tracked.clone(),
        );
        let waiters = Gauge::default();
        registry.register("waiters", "App requests waiting on a job", waiters.clone());
        let idempotency = Family::<ResultLabel, Counter>::default();
        registry.register(
            "idempotency",
            "Idempotency-Key outcomes: replayed, coalesced, conflict",
            idempotency.clone(),
        );
        let webhooks = Family::<ResultLabel, Counter>::default();
        registry.register("webhooks", "Webhooks received, by result", webhooks.clone());
        let webhook_forwards = Family::<ResultLabel, Counter>::default();
        registry.register(
            "webhook_forwards",
            "Webhooks forwarded to the app, by result",
            webhook_forwards.clone(),
        );
        let rate_limit_waits = Counter::default();
        registry.register(
            "rate_limit_waits",
            "Upstream calls that waited for Rutter's rate budget",
            rate_limit_waits.clone(),
        );
        let rate_limit_wait = seconds_histogram();
        registry.register(
            "rate_limit_wait_seconds",
            "Time upstream calls waited for the rate budget",
            rate_limit_wait.clone(),
        );
        let budget_used = Gauge::default();
        registry.register(
            "upstream_budget_used",
            "Upstream calls started in the current rate window",
            budget_used.clone(),
        );
        let draining = Gauge::default();
        registry.register(
            "draining",
            "1 while the sidecar is shutting down",
            draining.clone(),
        );
        Arc::new(Metrics {
            registry,
            requests,
            request_duration,
            upstream_calls,
            job_wait,
            jobs_tracked,
            waiters,
            idempotency,
            webhooks,
            webhook_forwards,
            rate_limit_waits,
            rate_limit_wait,
            budget_used,
            draining,
        })
    }

    /// Counts one answered app request.
    pub fn request(&self, class: &'static str, status: u16, seconds: f64) {
        self.requests
            .get_or_create(&RequestLabels { class, status })
            .inc();
        self.request_duration
            .get_or_create(&ClassLabel { class })
            .observe(seconds);
    }

    /// Counts one upstream call answered with an HTTP status.
    pub fn upstream_call(&self, kind: &'static str, status: u16) {
        // Common statuses need no allocation for the label.
        let status = match status {
            200 => Cow::Borrowed("200"),
            201 => Cow::Borrowed("201"),
            202 => Cow::Borrowed("202"),
            204 => Cow::Borrowed("204"),
            404 => Cow::Borrowed("404"),
            429 => Cow::Borrowed("429"),
            other => Cow::Owned(other.to_string()),
        };
        self.upstream_calls
            .get_or_create(&UpstreamLabels { kind, status })
            .inc();
    }

    /// Counts one upstream call that got no HTTP status (`error`, `timeout`, `budget`).
    pub fn upstream_failure(&self, kind: &'static str, failure: &'static str) {
        self.upstream_calls
            .get_or_create(&UpstreamLabels {
                kind,
                status: Cow::Borrowed(failure),
            })
            .inc();
    }

    /// Counts an idempotency outcome.
    pub fn idempotency(&self, result: &'static str) {
        self.idempotency
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// Counts a webhook outcome.
    pub fn webhook(&self, result: &'static str) {
        self.webhooks.get_or_create(&ResultLabel { result }).inc();
    }

    /// Counts a forwarding outcome.
    pub fn webhook_forward(&self, result: &'static str) {
        self.webhook_forwards
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Marks one request as waiting on a job until the guard drops.
    pub fn waiting(self: &Arc<Self>) -> WaitingGuard {
        self.waiters.inc();
        WaitingGuard {
            metrics: Arc::clone(self),
        }
    }
}

/// Decrements `rutter_sidecar_waiters` when dropped.
pub struct WaitingGuard {
    metrics: Arc<Metrics>,
}

impl Drop for WaitingGuard {
    fn drop(&mut self) {
        self.metrics.waiters.dec();
    }
}

/// Buckets from 1 ms to about 9 minutes.
fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 20))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_is_prefixed_and_labels_are_bounded() {
        let metrics = Metrics::new();
        metrics.request("facade", 200, 0.5);
        metrics.upstream_call("poll", 429);
        metrics.idempotency("replayed");
        metrics.webhook("accepted");
        metrics.webhook_forward("delivered");
        metrics.rate_limit_waits.inc();
        let _guard = metrics.waiting();
        let text = metrics.encode();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            assert!(line.starts_with("rutter_sidecar_"), "{line}");
        }
        assert!(
            text.contains(r#"rutter_sidecar_requests_total{class="facade",status="200"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"rutter_sidecar_upstream_calls_total{kind="poll",status="429"} 1"#));
        assert!(text.contains("rutter_sidecar_waiters 1"));
        assert!(text.contains("rutter_sidecar_job_wait_seconds_bucket"));
    }
}
