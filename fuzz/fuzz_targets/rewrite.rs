//! Fuzz target `rewrite`: the classify-and-rewrite phase of the facade (DESIGN §3, §4, §6).
//!
//! Input layout: the first line (up to the first `\n`) is the raw query string (also tried as a request
//! path against the route table and as a `Prefer` header value); the rest is the request body.
//!
//! Invariants checked:
//! - query: the result holds exactly one `response_mode` pair, `response_mode=async`, and every other
//!   pair of the input with its exact bytes, in order;
//! - body: the rewrite accepts every body that parses as a JSON object; when it rewrites, the result
//!   is one JSON object whose `response_mode` members are all `"async"` and whose every other
//!   top-level member (name and raw value bytes) is the input's, in order;
//! - the idempotency fingerprint of a JSON (or non-JSON) request does not change under the rewrite;
//! - nothing panics (route matching, `Prefer` parsing included).
#![no_main]

use std::borrow::Cow;
use std::fmt;

use libfuzzer_sys::fuzz_target;
use rutter_sidecar::idempotency::fingerprint;
use rutter_sidecar::rewrite::{
    body_response_mode, parse_prefer, query_response_modes, rewrite_json_body, rewrite_query,
    strip_query_response_mode, BodyMode, RESPONSE_MODE,
};
use rutter_sidecar::routes::{split_path, RoutePattern, RouteTable};
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// Top-level members of a JSON object as (decoded name, raw value bytes), or `None` if `bytes` is not
/// exactly one JSON object (trailing whitespace allowed).
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

fn routes() -> &'static RouteTable {
    static TABLE: std::sync::OnceLock<RouteTable> = std::sync::OnceLock::new();
    TABLE.get_or_init(RouteTable::default)
}

fn is_mode_pair(pair: &str) -> bool {
    // `pair` holds no '&': exactly one pair, classified the way the sidecar does.
    !query_response_modes(Some(pair)).is_empty()
}

fn check_query(query: Option<&str>) {
    let out = rewrite_query(query);
    let input = query.unwrap_or("");
    let kept_in: Vec<&str> = if input.is_empty() {
        Vec::new()
    } else {
        input.split('&').filter(|p| !is_mode_pair(p)).collect()
    };
    let kept_out: Vec<&str> = out.split('&').filter(|p| !is_mode_pair(p)).collect();
    assert_eq!(
        kept_in, kept_out,
        "non-response_mode pairs changed: {input:?} -> {out:?}"
    );
    let modes: Vec<&str> = out.split('&').filter(|p| is_mode_pair(p)).collect();
    assert_eq!(modes, ["response_mode=async"], "{input:?} -> {out:?}");
    assert_eq!(query_response_modes(Some(&out)), ["async"], "{out:?}");
    assert_eq!(
        strip_query_response_mode(Some(&out)),
        strip_query_response_mode(query),
        "{input:?} -> {out:?}"
    );
}

fn check_body(body: &[u8]) -> Option<Vec<u8>> {
    let is_object = serde_json::from_slice::<serde_json::Value>(body).is_ok_and(|v| v.is_object());
    let Some(out) = rewrite_json_body(body) else {
        assert!(!is_object, "a JSON object body was left alone");
        assert_eq!(body_response_mode(body), BodyMode::NotJsonObject);
        return None;
    };
    let before = members(body).expect("the rewrite accepted a body that is not one JSON object");
    let after = members(&out).expect("the rewritten body is not one JSON object");
    let others = |m: &[(String, String)]| -> Vec<(String, String)> {
        m.iter()
            .filter(|(k, _)| k != RESPONSE_MODE)
            .cloned()
            .collect()
    };
    assert_eq!(
        others(&before),
        others(&after),
        "a member other than response_mode changed"
    );
    let modes: Vec<&str> = after
        .iter()
        .filter(|(k, _)| k == RESPONSE_MODE)
        .map(|(_, v)| v.as_str())
        .collect();
    assert!(
        !modes.is_empty() && modes.iter().all(|v| *v == "\"async\""),
        "{modes:?}"
    );
    assert_eq!(
        body_response_mode(&out),
        BodyMode::Object(Some("async".into()))
    );
    if is_object {
        let value: serde_json::Value =
            serde_json::from_slice(&out).expect("the rewrite of a JSON object is not valid JSON");
        assert_eq!(value[RESPONSE_MODE], "async");
    }
    Some(out)
}

fuzz_target!(|data: &[u8]| {
    let (line, body) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let query = std::str::from_utf8(line).ok();
    check_query(query);
    if query == Some("") {
        check_query(None);
    }
    let rewritten = check_body(body);

    // The fingerprint ignores response_mode, so rewriting must not change it. (A body that is an
    // object to the splicing parser but not a `serde_json::Value`, e.g. one with a lone surrogate
    // escape, is fingerprinted by its raw bytes, which the rewrite changes: excluded.)
    let value_ok = serde_json::from_slice::<serde_json::Value>(body).is_ok();
    if rewritten.is_none() || value_ok {
        let method = http::Method::POST;
        let path = "/versioned/accounting/invoices";
        let out_query = rewrite_query(query);
        let out_body = rewritten.as_deref().unwrap_or(body);
        assert_eq!(
            fingerprint(&method, path, query, body),
            fingerprint(&method, path, Some(&out_query), out_body),
            "the fingerprint changed under the rewrite"
        );
    }

    // Classification inputs must never panic.
    if let Some(text) = query {
        let _ = split_path(text);
        for method in [http::Method::POST, http::Method::GET, http::Method::PATCH] {
            let _ = routes().find(&method, text);
        }
        if let Ok(route) = RoutePattern::parse(text) {
            let _ = route.template();
        }
    }
    if let Ok(value) = http::HeaderValue::from_bytes(line) {
        let _ = parse_prefer([&value]);
    }
});
