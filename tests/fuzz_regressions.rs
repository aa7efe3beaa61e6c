//! Regression tests from fuzzing (`fuzz/`, see `fuzz/README.md`).
//!
//! Every crash a fuzz target finds is added here as a test with the exact input, so CI keeps checking
//! it. The first runs (2 minutes per target) found no crash; the tests below pin the targets' invariants
//! on the edge inputs they exercise (lone surrogates, escaped member names, hostile `response_url`s,
//! out-of-range statuses, non-canonical signatures), so a change that breaks an invariant fails here
//! without running the fuzzer. The last test keeps fixed a behaviour found while writing the invariants
//! (webhook-delivered results used to be re-serialised).

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use rutter_sidecar::config::{BaseUrl, Config, Credentials};
use rutter_sidecar::facade::{parse_async_response, poll_uri, AsyncResponse};
use rutter_sidecar::jobs::{terminal_outcome, JobObject, JobRegistry, PollSchedule, PollTarget};
use rutter_sidecar::rewrite::{query_response_modes, rewrite_json_body, rewrite_query};
use rutter_sidecar::telemetry::Metrics;
use rutter_sidecar::upstream::Upstream;
use rutter_sidecar::webhooks::{sign, verify_signature, WebhookReceiver, X_RUTTER_SIGNATURE};
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// Top-level members as (decoded name, raw value), as the `rewrite` target reads them.
fn members(bytes: &[u8]) -> Option<Vec<(String, String)>> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Vec<(String, String)>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some((k, v)) = map.next_entry::<Cow<'de, str>, &'de RawValue>()? {
                out.push((k.into_owned(), v.get().to_string()));
            }
            Ok(out)
        }
    }
    let text = std::str::from_utf8(bytes).ok()?;
    let mut de = serde_json::Deserializer::from_str(text);
    let members = (&mut de).deserialize_map(V).ok()?;
    de.end().ok()?;
    Some(members)
}

#[test]
fn body_rewrite_keeps_every_other_member_byte_for_byte() {
    let deep = format!("{{\"a\":{}1{}}}", "[".repeat(100), "]".repeat(100));
    let inputs: Vec<String> = vec![
        r#"{"a":"\ud800"}"#.into(), // a lone surrogate: not a serde_json::Value, still an object
        r#"{"response\u005fmode":"prefer_sync","b":"\u00e9"}"#.into(),
        r#"{"response_mode":1,"response_mode":{"x":[]},"c":-0.0e-0}"#.into(),
        "\t{ \"a\" : 1 ,\n\"b\":[ ] }\r\n".into(),
        r#"{"":"","\"":"\\"}"#.into(),
        r#"{"big":18446744073709551616,"small":1e-400}"#.into(),
        deep,
    ];
    for input in inputs {
        let out = rewrite_json_body(input.as_bytes()).unwrap_or_else(|| panic!("{input}"));
        let before = members(input.as_bytes()).expect("input is an object");
        let after = members(&out).expect("output is an object");
        let others = |m: &[(String, String)]| -> Vec<(String, String)> {
            m.iter()
                .filter(|(k, _)| k != "response_mode")
                .cloned()
                .collect()
        };
        assert_eq!(others(&before), others(&after), "{input}");
        assert!(after
            .iter()
            .filter(|(k, _)| k == "response_mode")
            .all(|(_, v)| v == "\"async\""));
    }
}

#[test]
fn query_rewrite_keeps_every_other_pair() {
    let is_mode = |pair: &str| !query_response_modes(Some(pair)).is_empty();
    for input in [
        "&",
        "a=1&",
        "%",
        "%%5F",
        "response_mode",
        "response%5Fmode=x&response_mode=y&z",
        "+=+&response+mode=async",
        "response_mode=async&response_mode=async",
        "é=ü&response_mod%65=x",
    ] {
        let out = rewrite_query(Some(input));
        let kept_in: Vec<&str> = input.split('&').filter(|p| !is_mode(p)).collect();
        let kept_out: Vec<&str> = out.split('&').filter(|p| !is_mode(p)).collect();
        assert_eq!(kept_in, kept_out, "{input:?} -> {out:?}");
        assert_eq!(query_response_modes(Some(&out)), ["async"], "{out:?}");
    }
}

fn base(url: &str) -> BaseUrl {
    let text = format!(
        "[upstream]\nbase_url = {}\n",
        serde_json::to_string(url).unwrap()
    );
    Config::parse(&text, &[])
        .expect("base url")
        .upstream
        .base_url
}

#[test]
fn poll_uri_never_leaves_the_base_origin_for_hostile_response_urls() {
    let base = base("https://production.rutterapi.com");
    for url in [
        "https://production.rutterapi.com@evil.example/versioned/jobs/j1",
        "https://evil.example#@production.rutterapi.com/versioned/jobs/j1",
        "https://production.rutterapi.com.evil.example/versioned/jobs/j1",
        "//evil.example/versioned/jobs/j1",
        "/versioned/jobs/j1",
        "https://evil.example/https://production.rutterapi.com/versioned/jobs/j1",
        "https://production.rutterapi.com:443@evil.example:443/versioned/jobs/j1",
        "https://production.rutterapi.com\\@evil.example/versioned/jobs/j1",
        "https://[::1]/versioned/jobs/j1",
        "https://production.rutterapi.com/versioned/jobs/j1/../../../x",
        "https://production.rutterapi.com/versioned/jobs/%6a1",
        "http://production.rutterapi.com:443/versioned/jobs/j1",
    ] {
        let body = serde_json::json!({"async_response": {"id": "j1", "response_url": url}});
        let job = parse_async_response(body.to_string().as_bytes())
            .expect("an async_response")
            .expect("a valid one");
        let uri = poll_uri(&base, true, &job).expect("a poll URI");
        assert_eq!(
            uri.to_string(),
            "https://production.rutterapi.com/versioned/jobs/j1",
            "{url}"
        );
    }
    // Ids that could change the path are refused before any URL is built.
    for id in ["..", ".", "a/b", "a?b", "a#b", "a%2Fb", "", "é"] {
        let body = serde_json::json!({"async_response": {"id": id}});
        assert!(
            matches!(
                parse_async_response(body.to_string().as_bytes()),
                Some(Err(_))
            ),
            "{id:?}"
        );
    }
    // Even an unvalidated id cannot move the poll off the base's scheme and authority.
    let job = AsyncResponse {
        id: "@evil.example/x".into(),
        response_url: None,
        status: None,
    };
    if let Ok(uri) = poll_uri(&base, false, &job) {
        assert_eq!(
            uri.authority().unwrap().as_str(),
            "production.rutterapi.com"
        );
    }
}

#[test]
fn only_final_http_statuses_become_answers() {
    let cases = [
        ("200", Some(200)),
        ("599", Some(599)),
        ("204", Some(204)),
        ("199", None),
        ("100", None),
        ("99", None),
        ("600", None),
        ("65535", None),
        ("65736", None), // 200 + 65536: must not wrap to 200
        ("-200", None),
        ("200.0", None),
        ("\"200\"", None),
        ("null", None),
        ("18446744073709551816", None),
    ];
    for (status, expected) in cases {
        let text = format!(
            r#"{{"id":"j1","status":"success","response":{{"http_status":{status},"body":{{}}}}}}"#
        );
        let job: JobObject = serde_json::from_str(&text).unwrap();
        let got = terminal_outcome(&job).ok().map(|r| r.http_status.as_u16());
        assert_eq!(got, expected, "{status}");
    }
}

#[test]
fn only_the_canonical_signature_verifies() {
    let secret = b"client-secret";
    let body = br#"{"type":"JOB","code":"JOB_COMPLETED"}"#;
    let good = sign(secret, body);
    let encoded = &good["sha256=".len()..];
    assert!(verify_signature(secret, body, good.as_bytes()));
    assert!(verify_signature(
        secret,
        body,
        format!("sha256= {encoded}\t").as_bytes()
    ));
    // The last base64 character before the single '=' carries 2 unused bits: setting one of them
    // spells the same 32 bytes non-canonically, which must not verify.
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut tweaked = encoded.as_bytes().to_vec();
    let last = tweaked.len() - 2;
    let index = ALPHABET.iter().position(|&c| c == tweaked[last]).unwrap();
    tweaked[last] = ALPHABET[index ^ 1];
    let url_safe = encoded.replace('+', "-").replace('/', "_");
    for header in [
        format!("sha256={}", encoded.trim_end_matches('=')),
        format!("sha256={}", String::from_utf8(tweaked).unwrap()),
        format!("SHA256={encoded}"),
        format!("sha256 ={encoded}"),
        format!("sha256={encoded}{encoded}"),
        format!("sha256={}", &encoded[..encoded.len() - 4]),
    ] {
        assert!(
            !verify_signature(secret, body, header.as_bytes()),
            "{header}"
        );
    }
    if url_safe != encoded {
        assert!(!verify_signature(
            secret,
            body,
            format!("sha256={url_safe}").as_bytes()
        ));
    }
    // Empty secrets and bodies are fine, and nothing panics on odd lengths.
    assert!(verify_signature(b"", b"", sign(b"", b"").as_bytes()));
    assert!(!verify_signature(b"", b"", b"sha256=="));
}

const SECRET: &str = "fuzz-regressions-secret";

fn receiver() -> (WebhookReceiver, Arc<JobRegistry>) {
    let config = Config::parse("[upstream]\nbase_url = \"http://127.0.0.1:9\"\n", &[]).unwrap();
    let metrics = Metrics::new();
    let upstream = Upstream::new(&config.upstream, Arc::clone(&metrics)).unwrap();
    let jobs = JobRegistry::new(
        upstream,
        PollSchedule::from_config(&config.facade),
        config.jobs.clone(),
    );
    let credentials = Credentials {
        client_id: None,
        client_secret: Some(SECRET.into()),
    };
    let receiver = WebhookReceiver::new(&config.webhooks, &credentials, Arc::clone(&jobs), metrics);
    (receiver, jobs)
}

async fn post(receiver: &WebhookReceiver, body: &str, signature: Option<String>) -> u16 {
    let mut request = http::Request::builder()
        .method(http::Method::POST)
        .uri("/webhooks/rutter");
    if let Some(signature) = signature {
        request = request.header(X_RUTTER_SIGNATURE, signature);
    }
    let request = request
        .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
        .unwrap();
    receiver.handle(request).await.status().as_u16()
}

#[tokio::test]
async fn odd_webhook_bodies_are_refused_or_accepted_never_crash() {
    let (receiver, _jobs) = receiver();
    for body in [
        "",
        "null",
        "[]",
        r#"["JOB","JOB_COMPLETED",{"id":"j1","status":"success"}]"#,
        r#"{"type":"JOB","code":"JOB_COMPLETED","job":null}"#,
        r#"{"type":"JOB","code":"JOB_COMPLETED","job":{"id":1,"status":"success"}}"#,
        r#"{"type":"JOB","code":"JOB_COMPLETED","job":{"id":"j2","status":"success","response":{"http_status":1e400}}}"#,
        r#"{"type":"JOB","code":"JOB_COMPLETED","job":{"id":"","status":"done","response":{}}}"#,
        r#"{"type":"JOB","code":"JOB_COMPLETED","job":{"id":"\ud800","status":"success"}}"#,
        "{\"type\":\"JOB\",\"code\":\"JOB_COMPLETED\",\"job\":{\"id\":\"j3\",\"status\":\"success\",\"response\":{\"http_status\":200,\"body\":[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]}}}",
    ] {
        let signed = post(&receiver, body, Some(sign(SECRET.as_bytes(), body.as_bytes()))).await;
        assert!(signed == 200 || signed == 400, "{body}: {signed}");
        assert_eq!(post(&receiver, body, None).await, 401, "{body}");
        assert_eq!(
            post(&receiver, body, Some(sign(b"other", body.as_bytes()))).await,
            401,
            "{body}"
        );
    }
}

/// Finding (fuzz `job` target invariants, not a crash): a result delivered by a `JOB_COMPLETED`
/// webhook is read through a `serde_json::Value`, so the app gets a re-serialised body (`1.50` becomes
/// `1.5`, `1e2` becomes `100.0`, `\u00e9` becomes `é`, and an integer beyond 64 bits loses precision),
/// while a polled result keeps Rutter's exact bytes. DESIGN §5 asks for exactly the body a synchronous
/// call would have returned: the receiver parses the job from the raw body.
#[tokio::test]
async fn a_webhook_delivered_result_keeps_rutters_exact_body_bytes() {
    let (receiver, jobs) = receiver();
    let entity =
        r#"{"invoice":{"amount":1.50,"big":12345678901234567890123,"e":1e2,"s":"\u00e9"}}"#;
    let body = format!(
        r#"{{"type":"JOB","code":"JOB_COMPLETED","job":{{"id":"exact-1","status":"success","response":{{"http_status":200,"body":{entity}}}}}}}"#
    );
    assert_eq!(
        post(
            &receiver,
            &body,
            Some(sign(SECRET.as_bytes(), body.as_bytes()))
        )
        .await,
        200
    );
    let waiter = jobs
        .track(
            "exact-1",
            PollTarget {
                uri: "http://127.0.0.1:9/versioned/jobs/exact-1".parse().unwrap(),
                headers: http::HeaderMap::new(),
                poll_now: false,
            },
        )
        .unwrap_or_else(|_| panic!("track"));
    let outcome = waiter.current().expect("completed by the webhook");
    let result = outcome.as_ref().as_ref().expect("a result");
    assert_eq!(std::str::from_utf8(&result.body).unwrap(), entity);
}
