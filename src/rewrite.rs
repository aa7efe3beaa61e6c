//! Pure functions that read and write `response_mode` (DESIGN §4) and the `Prefer` header.
//!
//! The rewrite changes nothing but `response_mode`: every other query parameter keeps its exact bytes,
//! order and repetitions, and a JSON object body keeps every other byte (members, order, whitespace,
//! number spelling), because the new member is spliced in rather than re-serialised.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;
use std::time::Duration;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// The parameter and member name Rutter reads.
pub const RESPONSE_MODE: &str = "response_mode";

/// Decodes `%XX` escapes and `+` (form encoding) in a query key; invalid escapes stay as they are.
fn decode_query_component(raw: &str) -> Cow<'_, str> {
    if !raw.contains(['%', '+']) {
        return Cow::Borrowed(raw);
    }
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Splits one `key=value` query pair into its decoded key and decoded value.
fn pair_key_value(pair: &str) -> (Cow<'_, str>, Cow<'_, str>) {
    match pair.split_once('=') {
        Some((k, v)) => (decode_query_component(k), decode_query_component(v)),
        None => (decode_query_component(pair), Cow::Borrowed("")),
    }
}

/// Whether a raw query string asks for `response_mode=async` (no allocation for plain queries).
pub fn query_asks_async(query: Option<&str>) -> bool {
    let Some(query) = query else {
        return false;
    };
    // Without percent-escapes, `async` must appear literally (the common, cheap case).
    if !query.contains("async") && !query.contains('%') {
        return false;
    }
    query.split('&').any(|pair| {
        let (key, value) = pair_key_value(pair);
        key == RESPONSE_MODE && value == "async"
    })
}

/// The `response_mode` values in a raw query string, in order.
pub fn query_response_modes(query: Option<&str>) -> Vec<String> {
    query_values(query, RESPONSE_MODE)
}

/// The decoded values of every `name` parameter in a raw query string, in order.
pub fn query_values(query: Option<&str>, name: &str) -> Vec<String> {
    query
        .unwrap_or("")
        .split('&')
        .map(pair_key_value)
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
        .collect()
}

/// Writes `response_mode=async` into a raw query string: the first existing `response_mode` pair is
/// replaced in place and later ones dropped; without one, the pair is appended. Every other pair keeps
/// its exact bytes and position.
pub fn rewrite_query(query: Option<&str>) -> String {
    let query = query.unwrap_or("");
    if query.is_empty() {
        return "response_mode=async".to_string();
    }
    let mut out = String::with_capacity(query.len() + 20);
    let mut written = false;
    let mut first = true;
    for pair in query.split('&') {
        let is_mode = pair_key_value(pair).0 == RESPONSE_MODE;
        if is_mode && written {
            continue;
        }
        if !first {
            out.push('&');
        }
        first = false;
        if is_mode {
            out.push_str("response_mode=async");
            written = true;
        } else {
            out.push_str(pair);
        }
    }
    if !written {
        out.push_str("&response_mode=async");
    }
    out
}

/// Removes every `response_mode` pair from a raw query string, keeping the other pairs' bytes.
pub fn strip_query_response_mode(query: Option<&str>) -> String {
    query
        .unwrap_or("")
        .split('&')
        .filter(|pair| pair_key_value(pair).0 != RESPONSE_MODE)
        .collect::<Vec<_>>()
        .join("&")
}

/// A top-level member of a JSON object: its decoded name and the byte range of its value.
struct Member {
    name: String,
    value: Range<usize>,
}

/// The top-level members of a JSON object body, or `None` if the bytes are not one JSON object.
fn object_members(body: &[u8]) -> Option<Vec<Member>> {
    let text = std::str::from_utf8(body).ok()?;
    struct MembersVisitor<'a> {
        base: usize,
        _text: std::marker::PhantomData<&'a str>,
    }
    impl<'de> Visitor<'de> for MembersVisitor<'de> {
        type Value = Vec<Member>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut members = Vec::new();
            while let Some((name, value)) = map.next_entry::<Cow<'de, str>, &'de RawValue>()? {
                let start = value.get().as_ptr() as usize - self.base;
                members.push(Member {
                    name: name.into_owned(),
                    value: start..start + value.get().len(),
                });
            }
            Ok(members)
        }
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let visitor = MembersVisitor {
        base: text.as_ptr() as usize,
        _text: std::marker::PhantomData,
    };
    let members = (&mut de).deserialize_map(visitor).ok()?;
    de.end().ok()?;
    Some(members)
}

/// How a request body states `response_mode`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyMode {
    /// The body is not a JSON object (empty, not JSON, an array, ...): only the query can carry it.
    NotJsonObject,
    /// A JSON object; the string value of its last `response_mode` member, if any.
    Object(Option<String>),
}

/// Reads `response_mode` from a JSON object body.
pub fn body_response_mode(body: &[u8]) -> BodyMode {
    let Some(members) = object_members(body) else {
        return BodyMode::NotJsonObject;
    };
    let mode = members
        .iter()
        .rev()
        .find(|m| m.name == RESPONSE_MODE)
        .map(|m| serde_json::from_slice::<String>(&body[m.value.clone()]).unwrap_or_default());
    BodyMode::Object(mode)
}

/// Writes `"response_mode":"async"` into a JSON object body: existing `response_mode` values are
/// replaced in place, otherwise the member is inserted first. Returns `None` (leave the body alone)
/// when the body is not a JSON object.
pub fn rewrite_json_body(body: &[u8]) -> Option<Vec<u8>> {
    let members = object_members(body)?;
    let mut out = Vec::with_capacity(body.len() + 26);
    let modes: Vec<&Member> = members.iter().filter(|m| m.name == RESPONSE_MODE).collect();
    if modes.is_empty() {
        let open = body.iter().position(|&b| b == b'{')?;
        out.extend_from_slice(&body[..=open]);
        out.extend_from_slice(br#""response_mode":"async""#);
        if !members.is_empty() {
            out.push(b',');
        }
        out.extend_from_slice(&body[open + 1..]);
    } else {
        let mut cursor = 0;
        for member in modes {
            out.extend_from_slice(&body[cursor..member.value.start]);
            out.extend_from_slice(br#""async""#);
            cursor = member.value.end;
        }
        out.extend_from_slice(&body[cursor..]);
    }
    Some(out)
}

/// Removes every top-level `response_mode` member from a JSON object (for fingerprints).
pub fn without_response_mode(mut value: serde_json::Value) -> serde_json::Value {
    if let Some(object) = value.as_object_mut() {
        object.shift_remove(RESPONSE_MODE);
    }
    value
}

/// What the app asked for in its `Prefer` headers (RFC 7240).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Prefer {
    /// `Prefer: respond-async`.
    pub respond_async: bool,
    /// `Prefer: wait=N` (seconds).
    pub wait: Option<Duration>,
}

/// Parses every `Prefer` header value; unknown preferences are ignored, as RFC 7240 asks.
pub fn parse_prefer<'a>(values: impl IntoIterator<Item = &'a http::HeaderValue>) -> Prefer {
    let mut prefer = Prefer::default();
    for value in values {
        let Ok(text) = value.to_str() else { continue };
        for preference in text.split(',') {
            // Parameters after ';' do not change these two preferences.
            let token = preference.split(';').next().unwrap_or("").trim();
            let (name, value) = match token.split_once('=') {
                Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
                None => (token, None),
            };
            if name.eq_ignore_ascii_case("respond-async") {
                prefer.respond_async = true;
            } else if name.eq_ignore_ascii_case("wait") {
                if let Some(secs) = value.and_then(|v| v.parse::<u64>().ok()) {
                    let wait = Duration::from_secs(secs);
                    prefer.wait = Some(prefer.wait.map_or(wait, |w| w.min(wait)));
                }
            }
        }
    }
    prefer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_rewrite_table() {
        let cases: &[(Option<&str>, &str)] = &[
            (None, "response_mode=async"),
            (Some(""), "response_mode=async"),
            (
                Some("access_token=abc"),
                "access_token=abc&response_mode=async",
            ),
            (Some("response_mode=prefer_sync"), "response_mode=async"),
            (
                Some("a=1&response_mode=prefer_sync&b=2"),
                "a=1&response_mode=async&b=2",
            ),
            (
                Some("a=1&response_mode=x&b=2&response_mode=y"),
                "a=1&response_mode=async&b=2",
            ),
            (
                Some("response%5Fmode=prefer_sync&a=1"),
                "response_mode=async&a=1",
            ),
            (
                Some("q=a+b&r=a%2Bb&s=a%20b&k=1&k=2&e=&f"),
                "q=a+b&r=a%2Bb&s=a%20b&k=1&k=2&e=&f&response_mode=async",
            ),
            (Some("a=1&"), "a=1&&response_mode=async"),
            (Some("x=%ZZ&y=%"), "x=%ZZ&y=%&response_mode=async"),
            (Some("response_mode"), "response_mode=async"),
        ];
        for (input, expected) in cases {
            assert_eq!(rewrite_query(*input), *expected, "{input:?}");
        }
    }

    #[test]
    fn query_modes_and_strip() {
        assert_eq!(
            query_response_modes(Some("a=1&response_mode=async")),
            vec!["async"]
        );
        assert_eq!(
            query_response_modes(Some("response+mode=async")),
            Vec::<String>::new()
        );
        assert_eq!(
            query_response_modes(Some("response_mode=a%73ync")),
            vec!["async"]
        );
        assert_eq!(query_response_modes(None), Vec::<String>::new());
        assert!(query_asks_async(Some("a=1&response_mode=async")));
        assert!(query_asks_async(Some(
            "response_mode=prefer_sync&response%5Fmode=a%73ync"
        )));
        assert!(!query_asks_async(Some("response_mode=prefer_sync&x=async")));
        assert!(!query_asks_async(None));
        assert!(!query_asks_async(Some("access_token=abc&limit=50")));
        assert!(query_asks_async(Some("response_mode=asy%6Ec")));
        assert!(query_asks_async(Some("x=1&response_mode=async&y=2")));
        assert_eq!(
            strip_query_response_mode(Some("a=1&response_mode=async&b=%20")),
            "a=1&b=%20"
        );
        assert_eq!(strip_query_response_mode(Some("response_mode=async")), "");
    }

    #[test]
    fn body_rewrite_table() {
        let cases: &[(&str, Option<&str>)] = &[
            (r#"{}"#, Some(r#"{"response_mode":"async"}"#)),
            (r#" { } "#, Some(r#" {"response_mode":"async" } "#)),
            (
                r#"{"invoice":{"a":1}}"#,
                Some(r#"{"response_mode":"async","invoice":{"a":1}}"#),
            ),
            (
                r#"{"response_mode":"prefer_sync","invoice":{"amount":1.50e0}}"#,
                Some(r#"{"response_mode":"async","invoice":{"amount":1.50e0}}"#),
            ),
            (
                r#"{"a":1, "response_mode" : "prefer_sync" ,"b":"ünï"}"#,
                Some(r#"{"a":1, "response_mode" : "async" ,"b":"ünï"}"#),
            ),
            (
                r#"{"response_mode":1,"x":{"response_mode":"keep"},"response_mode":null}"#,
                Some(
                    r#"{"response_mode":"async","x":{"response_mode":"keep"},"response_mode":"async"}"#,
                ),
            ),
            (
                r#"{"response\u005fmode":"prefer_sync"}"#,
                Some(r#"{"response\u005fmode":"async"}"#),
            ),
            (r#"[1,2]"#, None),
            (r#""text""#, None),
            (r#""#, None),
            (r#"not json"#, None),
            (r#"{"a":1} trailing"#, None),
            (r#"{"a":1"#, None),
        ];
        for (input, expected) in cases {
            let got = rewrite_json_body(input.as_bytes()).map(|b| String::from_utf8(b).unwrap());
            assert_eq!(got.as_deref(), *expected, "{input}");
            if let Some(out) = got {
                let value: serde_json::Value = serde_json::from_str(&out).unwrap();
                assert_eq!(value["response_mode"], "async");
            }
        }
    }

    #[test]
    fn body_mode_detection() {
        assert_eq!(
            body_response_mode(br#"{"response_mode":"async"}"#),
            BodyMode::Object(Some("async".into()))
        );
        assert_eq!(
            body_response_mode(br#"{"a":{"response_mode":"async"}}"#),
            BodyMode::Object(None)
        );
        assert_eq!(body_response_mode(b"[]"), BodyMode::NotJsonObject);
        assert_eq!(body_response_mode(b""), BodyMode::NotJsonObject);
        assert_eq!(
            body_response_mode(br#"{"response_mode":"async","response_mode":"prefer_sync"}"#),
            BodyMode::Object(Some("prefer_sync".into()))
        );
    }

    #[test]
    fn prefer_parsing() {
        let h = |s: &'static str| http::HeaderValue::from_static(s);
        assert_eq!(
            parse_prefer(&[h("respond-async")]),
            Prefer {
                respond_async: true,
                wait: None
            }
        );
        assert_eq!(
            parse_prefer(&[h("wait=10, handling=lenient")]),
            Prefer {
                respond_async: false,
                wait: Some(Duration::from_secs(10))
            }
        );
        assert_eq!(
            parse_prefer(&[h("Respond-Async; foo=bar"), h("wait=5"), h("wait=\"7\"")]),
            Prefer {
                respond_async: true,
                wait: Some(Duration::from_secs(5))
            }
        );
        assert_eq!(
            parse_prefer(&[h("wait=abc"), h("return=minimal")]),
            Prefer::default()
        );
    }
}
