//! Idempotency (DESIGN §6): one upstream write per `Idempotency-Key`, whatever the number of duplicates.
//!
//! - The **cache key** hashes the credentials (`Authorization` and the `access_token` query value), the
//!   method, the path and the key, so two tenants using the same key never share a result.
//! - The **fingerprint** hashes the method, the path, the query without `response_mode`, and the JSON
//!   body without `response_mode` in canonical form (sorted keys; raw bytes when not JSON). Same key with
//!   another fingerprint is a conflict (409).
//! - A request whose key is new becomes the **leader** of a flight: its write and wait run in their own
//!   task, so they finish even when the app disconnects. Duplicates that arrive meanwhile **follow** the
//!   flight (no second write). Finished results that §6 allows to be stored go into a moka cache bounded by
//!   `idempotency.max_bytes` (weigher: stored bytes) with `idempotency.ttl`; later duplicates are
//!   **replayed** from it. A failed attempt stores nothing, so the key stays free for a retry.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use sha2::{Digest as _, Sha256};
use tokio::sync::watch;

use crate::config::IdempotencyConfig;
use crate::error::ProxyError;
use crate::rewrite;

/// A SHA-256 digest.
pub type Digest = [u8; 32];

/// Checks an `Idempotency-Key` header: 1 to 255 visible ASCII characters.
pub fn validate_key(value: &HeaderValue) -> Result<&str, ProxyError> {
    let bytes = value.as_bytes();
    if bytes.is_empty() || bytes.len() > 255 || !bytes.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err(ProxyError::IdempotencyKeyInvalid);
    }
    value
        .to_str()
        .map_err(|_| ProxyError::IdempotencyKeyInvalid)
}

/// A short, non-reversible label for a key, for logs (raw keys are never logged).
pub fn key_label(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    digest[..6].iter().map(|b| format!("{b:02x}")).collect()
}

fn update_field(hasher: &mut Sha256, field: &[u8]) {
    hasher.update((field.len() as u64).to_be_bytes());
    hasher.update(field);
}

/// The decoded value of the first `access_token` query parameter.
pub fn access_token(query: Option<&str>) -> Option<String> {
    rewrite::query_values(query, "access_token")
        .into_iter()
        .next()
}

/// The cache key: credentials, method, path and key (length-prefixed, so fields cannot run together).
pub fn cache_key(
    authorization: Option<&HeaderValue>,
    query: Option<&str>,
    method: &Method,
    path: &str,
    key: &str,
) -> Digest {
    let mut hasher = Sha256::new();
    update_field(
        &mut hasher,
        authorization.map_or(&b""[..], |v| v.as_bytes()),
    );
    update_field(
        &mut hasher,
        access_token(query).unwrap_or_default().as_bytes(),
    );
    update_field(&mut hasher, method.as_str().as_bytes());
    update_field(&mut hasher, path.as_bytes());
    update_field(&mut hasher, key.as_bytes());
    hasher.finalize().into()
}

/// The request fingerprint: method, path, query without `response_mode`, canonical body without
/// `response_mode`.
pub fn fingerprint(method: &Method, path: &str, query: Option<&str>, body: &[u8]) -> Digest {
    let mut hasher = Sha256::new();
    update_field(&mut hasher, method.as_str().as_bytes());
    update_field(&mut hasher, path.as_bytes());
    update_field(
        &mut hasher,
        rewrite::strip_query_response_mode(query).as_bytes(),
    );
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(value) => {
            let mut canonical = Vec::with_capacity(body.len());
            write_canonical(&rewrite::without_response_mode(value), &mut canonical);
            hasher.update(b"json");
            update_field(&mut hasher, &canonical);
        }
        Err(_) => {
            hasher.update(b"raw!");
            update_field(&mut hasher, body);
        }
    }
    hasher.finalize().into()
}

/// Writes JSON with object keys sorted at every level and no whitespace.
fn write_canonical(value: &serde_json::Value, out: &mut Vec<u8>) {
    match value {
        serde_json::Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                // Serialising a string cannot fail.
                out.extend_from_slice(serde_json::to_string(key).unwrap_or_default().as_bytes());
                out.push(b':');
                write_canonical(&map[key], out);
            }
            out.push(b'}');
        }
        serde_json::Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        other => out.extend_from_slice(other.to_string().as_bytes()),
    }
}

/// An answer kept for replay: status, the headers worth replaying, and the body.
#[derive(Debug, Clone)]
pub struct StoredAnswer {
    /// The request fingerprint it answers.
    pub fingerprint: Digest,
    /// HTTP status.
    pub status: StatusCode,
    /// `Content-Type`, `X-Rutter-Job-ID`, `X-Rutter-Request-ID`.
    pub headers: HeaderMap,
    /// Body bytes.
    pub body: Bytes,
}

impl StoredAnswer {
    fn weight(&self) -> u32 {
        let headers: usize = self
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 32)
            .sum();
        u32::try_from(self.body.len() + headers + 128).unwrap_or(u32::MAX)
    }
}

/// Where a flight is.
#[derive(Debug, Clone)]
pub enum FlightState {
    /// The write is on its way to Rutter.
    Writing,
    /// Rutter accepted the write as a job; the original `async_response` (status, headers, body) is
    /// what followers answer with if their deadline passes first.
    Accepted(Arc<StoredAnswer>),
    /// The flight ended with this answer (stored or not).
    Finished(Arc<FlightEnd>),
}

/// How a flight ended.
#[derive(Debug)]
pub enum FlightEnd {
    /// An upstream answer or job result, with whether it was stored for replays.
    Answer {
        /// The answer.
        answer: StoredAnswer,
        /// Whether §6 allowed storing it.
        stored: bool,
    },
    /// A sidecar error (never stored).
    Error(ProxyError),
    /// Rutter accepted the write but the job could not be followed (`jobs.max_tracked`): followers
    /// get their `on_timeout` reply from this `async_response`.
    Untracked(StoredAnswer),
}

/// What [`IdempotencyStore::claim`] decided for a request.
pub enum Claim {
    /// First with this key: run the write, then [`IdempotencyStore::finish`].
    Leader(watch::Receiver<FlightState>),
    /// A duplicate of a write in flight: wait on it.
    Follower(watch::Receiver<FlightState>),
    /// A duplicate of a finished write: answer from the store.
    Replay(StoredAnswer),
    /// The key was used for a different request.
    Conflict,
}

struct Flight {
    fingerprint: Digest,
    state: watch::Sender<FlightState>,
}

/// Counters for operations and tests.
#[derive(Debug, Default)]
pub struct IdempotencyStats {
    /// Duplicates answered from the store.
    pub replays: std::sync::atomic::AtomicU64,
    /// Duplicates attached to a write in flight.
    pub coalesced: std::sync::atomic::AtomicU64,
    /// Same key, different request.
    pub conflicts: std::sync::atomic::AtomicU64,
}

/// The idempotency store: finished answers (moka) and writes in flight.
pub struct IdempotencyStore {
    finished: moka::sync::Cache<Digest, Arc<StoredAnswer>>,
    in_flight: Mutex<HashMap<Digest, Flight>>,
    stats: IdempotencyStats,
}

impl IdempotencyStore {
    /// A store bounded by `max_bytes` with entries living `ttl`.
    pub fn new(config: &IdempotencyConfig) -> Self {
        let finished = moka::sync::Cache::builder()
            .max_capacity(config.max_bytes)
            .weigher(|_key: &Digest, answer: &Arc<StoredAnswer>| answer.weight())
            .time_to_live(config.ttl)
            // LRU admission: a full cache keeps the newest answers, which late duplicates ask for.
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .build();
        IdempotencyStore {
            finished,
            in_flight: Mutex::new(HashMap::new()),
            stats: IdempotencyStats::default(),
        }
    }

    /// Counters.
    pub fn stats(&self) -> &IdempotencyStats {
        &self.stats
    }

    /// Bytes held by stored answers (after pending maintenance).
    pub fn weighted_size(&self) -> u64 {
        self.finished.run_pending_tasks();
        self.finished.weighted_size()
    }

    /// Number of stored answers (after pending maintenance).
    pub fn entry_count(&self) -> u64 {
        self.finished.run_pending_tasks();
        self.finished.entry_count()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Flight>> {
        self.in_flight
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Decides what a request with this key and fingerprint does. Exactly one concurrent request per key
    /// becomes the leader.
    pub fn claim(&self, key: Digest, fingerprint: Digest) -> Claim {
        use std::sync::atomic::Ordering::Relaxed;
        let mut flights = self.lock();
        if let Some(flight) = flights.get(&key) {
            if flight.fingerprint != fingerprint {
                self.stats.conflicts.fetch_add(1, Relaxed);
                return Claim::Conflict;
            }
            self.stats.coalesced.fetch_add(1, Relaxed);
            return Claim::Follower(flight.state.subscribe());
        }
        if let Some(answer) = self.finished.get(&key) {
            if answer.fingerprint != fingerprint {
                self.stats.conflicts.fetch_add(1, Relaxed);
                return Claim::Conflict;
            }
            self.stats.replays.fetch_add(1, Relaxed);
            return Claim::Replay((*answer).clone());
        }
        let (state, rx) = watch::channel(FlightState::Writing);
        flights.insert(key, Flight { fingerprint, state });
        Claim::Leader(rx)
    }

    /// The leader reports that Rutter accepted the write as a job.
    pub fn accepted(&self, key: &Digest, async_answer: StoredAnswer) {
        if let Some(flight) = self.lock().get(key) {
            flight
                .state
                .send_replace(FlightState::Accepted(Arc::new(async_answer)));
        }
    }

    /// The leader reports the end of its flight: a storable answer is stored before the flight is
    /// removed (so no duplicate can slip between the two), then every follower is answered.
    pub fn finish(&self, key: &Digest, end: FlightEnd) {
        if let FlightEnd::Answer {
            answer,
            stored: true,
        } = &end
        {
            self.finished.insert(*key, Arc::new(answer.clone()));
        }
        if let Some(flight) = self.lock().remove(key) {
            flight
                .state
                .send_replace(FlightState::Finished(Arc::new(end)));
        }
    }
}

/// Whether §6 lets an upstream answer be stored: Rutter accepted the request (`X-Rutter-Job-ID`) and
/// it is a 2xx or 4xx other than 429/452 (rate limits say nothing about the request).
pub fn storable_upstream_answer(status: StatusCode, headers: &HeaderMap) -> bool {
    let code = status.as_u16();
    headers.contains_key("x-rutter-job-id")
        && (status.is_success() || (status.is_client_error() && code != 429 && code != 452))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn key_validation_table() {
        let ok = [
            "a",
            "5f2b8a40-6c1d-4e8b-9a7f-0c3d2e1b4a59",
            "~!@#$%^&*()_+{}|:<>?",
            &"k".repeat(255),
        ];
        for key in ok {
            assert!(
                validate_key(&HeaderValue::from_str(key).unwrap()).is_ok(),
                "{key}"
            );
        }
        let long = "k".repeat(256);
        for key in ["", " ", "a b", "tab\there", long.as_str()] {
            let value = HeaderValue::from_str(key).unwrap();
            assert_eq!(
                validate_key(&value).unwrap_err().code(),
                "IDEMPOTENCY_KEY_INVALID",
                "{key:?}"
            );
        }
        let non_ascii = HeaderValue::from_bytes("clé".as_bytes()).unwrap();
        assert!(validate_key(&non_ascii).is_err());
    }

    #[test]
    fn cache_keys_separate_tenants_methods_paths_and_keys() {
        let auth_a = HeaderValue::from_static("Basic YTpi");
        let auth_b = HeaderValue::from_static("Basic Yzpk");
        let base = cache_key(
            Some(&auth_a),
            Some("access_token=t1"),
            &Method::POST,
            "/p",
            "k",
        );
        assert_eq!(
            base,
            cache_key(
                Some(&auth_a),
                Some("access_token=t1&response_mode=async"),
                &Method::POST,
                "/p",
                "k"
            )
        );
        for other in [
            cache_key(
                Some(&auth_b),
                Some("access_token=t1"),
                &Method::POST,
                "/p",
                "k",
            ),
            cache_key(None, Some("access_token=t1"), &Method::POST, "/p", "k"),
            cache_key(
                Some(&auth_a),
                Some("access_token=t2"),
                &Method::POST,
                "/p",
                "k",
            ),
            cache_key(
                Some(&auth_a),
                Some("access_token=t1"),
                &Method::PATCH,
                "/p",
                "k",
            ),
            cache_key(
                Some(&auth_a),
                Some("access_token=t1"),
                &Method::POST,
                "/q",
                "k",
            ),
            cache_key(
                Some(&auth_a),
                Some("access_token=t1"),
                &Method::POST,
                "/p",
                "k2",
            ),
            // Length prefixes: moving a byte between fields changes the key.
            cache_key(
                Some(&auth_a),
                Some("access_token=t1"),
                &Method::POST,
                "/pk",
                "",
            ),
        ] {
            assert_ne!(base, other);
        }
    }

    #[test]
    fn fingerprints_ignore_response_mode_and_key_order_only() {
        let fp = |query: Option<&str>, body: &str| {
            fingerprint(&Method::POST, "/v/invoices", query, body.as_bytes())
        };
        let base = fp(Some("access_token=t"), r#"{"invoice":{"a":1,"b":[1,2]}}"#);
        assert_eq!(
            base,
            fp(
                Some("access_token=t&response_mode=async"),
                r#"{"invoice":{"b":[1,2],"a":1}}"#
            )
        );
        assert_eq!(
            base,
            fp(
                Some("access_token=t"),
                r#"{"response_mode":"async", "invoice" : {"a":1,"b":[1,2]}}"#
            )
        );
        assert_ne!(
            base,
            fp(Some("access_token=t"), r#"{"invoice":{"a":2,"b":[1,2]}}"#)
        );
        assert_ne!(
            base,
            fp(Some("access_token=t"), r#"{"invoice":{"a":1,"b":[2,1]}}"#)
        );
        assert_ne!(
            base,
            fp(
                Some("access_token=t&x=1"),
                r#"{"invoice":{"a":1,"b":[1,2]}}"#
            )
        );
        assert_ne!(
            base,
            fp(
                Some("access_token=t"),
                r#"{"invoice":{"a":1,"b":[1,2]},"response":1}"#
            )
        );
        // Nested response_mode members are data, not the parameter.
        assert_ne!(
            fp(None, r#"{"x":{"response_mode":"a"}}"#),
            fp(None, r#"{"x":{}}"#)
        );
        // Not JSON: raw bytes.
        assert_ne!(fp(None, "raw a"), fp(None, "raw b"));
        assert_eq!(fp(None, "raw a"), fp(None, "raw a"));
    }

    fn answer(fingerprint: Digest, size: usize) -> StoredAnswer {
        let mut headers = HeaderMap::new();
        headers.insert("x-rutter-job-id", HeaderValue::from_static("job"));
        StoredAnswer {
            fingerprint,
            status: StatusCode::OK,
            headers,
            body: Bytes::from(vec![b'x'; size]),
        }
    }

    fn config(max_bytes: u64, ttl: Duration) -> IdempotencyConfig {
        IdempotencyConfig {
            ttl,
            max_bytes,
            generate_missing_keys: true,
        }
    }

    #[test]
    fn single_flight_then_replay_then_conflict() {
        let store = IdempotencyStore::new(&config(1 << 20, Duration::from_secs(60)));
        let (key, fp, other) = ([1; 32], [2; 32], [3; 32]);
        let Claim::Leader(_) = store.claim(key, fp) else {
            panic!("first is the leader")
        };
        let Claim::Follower(mut follower) = store.claim(key, fp) else {
            panic!("duplicate follows")
        };
        assert!(matches!(store.claim(key, other), Claim::Conflict));
        store.finish(
            &key,
            FlightEnd::Answer {
                answer: answer(fp, 10),
                stored: true,
            },
        );
        assert!(matches!(
            &*follower.borrow_and_update(),
            FlightState::Finished(_)
        ));
        assert!(matches!(store.claim(key, fp), Claim::Replay(a) if a.body.len() == 10));
        assert!(matches!(store.claim(key, other), Claim::Conflict));
    }

    #[test]
    fn a_failed_flight_leaves_the_key_free() {
        let store = IdempotencyStore::new(&config(1 << 20, Duration::from_secs(60)));
        let (key, fp) = ([1; 32], [2; 32]);
        let Claim::Leader(_) = store.claim(key, fp) else {
            panic!()
        };
        store.finish(
            &key,
            FlightEnd::Error(ProxyError::UpstreamUnavailable("x".into())),
        );
        assert!(matches!(store.claim(key, fp), Claim::Leader(_)));
        store.finish(
            &key,
            FlightEnd::Answer {
                answer: answer(fp, 1),
                stored: false,
            },
        );
        assert!(
            matches!(store.claim(key, [9; 32]), Claim::Leader(_)),
            "nothing stored: even another body may use the key"
        );
    }

    #[test]
    fn the_cache_stays_within_max_bytes() {
        let store = IdempotencyStore::new(&config(64 * 1024, Duration::from_secs(60)));
        for i in 0..5_000u32 {
            let mut key = [0u8; 32];
            key[..4].copy_from_slice(&i.to_be_bytes());
            let Claim::Leader(_) = store.claim(key, [0; 32]) else {
                panic!()
            };
            store.finish(
                &key,
                FlightEnd::Answer {
                    answer: answer([0; 32], 1_000),
                    stored: true,
                },
            );
        }
        assert!(
            store.weighted_size() <= 64 * 1024,
            "{}",
            store.weighted_size()
        );
        assert!(store.entry_count() < 100);
    }

    #[test]
    fn storable_answers_follow_section_6() {
        let mut accepted = HeaderMap::new();
        accepted.insert("x-rutter-job-id", HeaderValue::from_static("j"));
        let none = HeaderMap::new();
        for (status, headers, expected) in [
            (200, &accepted, true),
            (201, &accepted, true),
            (400, &accepted, true),
            (409, &accepted, true),
            (400, &none, false),
            (200, &none, false),
            (429, &accepted, false),
            (452, &accepted, false),
            (500, &accepted, false),
            (503, &accepted, false),
        ] {
            assert_eq!(
                storable_upstream_answer(StatusCode::from_u16(status).unwrap(), headers),
                expected,
                "{status}"
            );
        }
    }
}
