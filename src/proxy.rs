//! Forwarding rules shared by every request class (DESIGN §3): which headers cross the proxy, which are
//! added, and how the upstream URI is built. Small pure functions over `http` types.
//!
//! - Hop-by-hop fields (RFC 9110 §7.6.1: `Connection` and every field it names, plus `Keep-Alive`,
//!   `Proxy-Connection`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade`, `Proxy-Authenticate`,
//!   `Proxy-Authorization`) are dropped in both directions.
//! - `Via` (RFC 9110 §7.6.3) is appended in both directions; `X-Forwarded-For` gets the app's address
//!   appended and `X-Forwarded-Proto` is set on requests.
//! - `Host` is the upstream's (RFC 9110 §7.2); the path and query are the app's bytes, appended to the
//!   base URL's path prefix.

use std::net::IpAddr;
use std::str::FromStr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Uri, Version};

use crate::config::BaseUrl;
use crate::error::ProxyError;

/// The product token used in `Via`.
pub const VIA_PSEUDONYM: &str = "rutter-sidecar";

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Hop-by-hop fields that are never forwarded, whatever `Connection` says.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
];

/// Whether `name` is a hop-by-hop field whatever `Connection` says.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name) || name == header::PROXY_AUTHENTICATE
}

/// Removes hop-by-hop fields: the fixed list, `Proxy-Authenticate`, and every field named in
/// `Connection` (RFC 9110 §7.6.1).
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // The common case has none: one pass over the names instead of a lookup per listed field.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP.iter() {
        headers.remove(name);
    }
    headers.remove(header::PROXY_AUTHENTICATE);
}

/// This proxy's `Via` entry for a message received with `version` (RFC 9110 §7.6.3: the protocol
/// token `1.1`, `2`, ... then the pseudonym).
fn via_entry(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "0.9 rutter-sidecar",
        Version::HTTP_10 => "1.0 rutter-sidecar",
        Version::HTTP_2 => "2 rutter-sidecar",
        Version::HTTP_3 => "3 rutter-sidecar",
        _ => "1.1 rutter-sidecar",
    }
}

/// Appends this proxy to `Via` for a message received with `version`.
pub fn append_via(headers: &mut HeaderMap, version: Version) {
    let ours = via_entry(version);
    let existing = headers
        .get(header::VIA)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty());
    let value = match existing {
        Some(existing) => {
            let mut joined = String::with_capacity(existing.len() + 2 + ours.len());
            joined.push_str(existing);
            joined.push_str(", ");
            joined.push_str(ours);
            match HeaderValue::from_str(&joined) {
                Ok(value) => value,
                Err(_) => return,
            }
        }
        None => HeaderValue::from_static(ours),
    };
    headers.insert(header::VIA, value);
}

/// The textual form of an address for `X-Forwarded-For` (IPv4 without going through `fmt`: this runs
/// on every request).
fn forwarded_address(peer: IpAddr) -> HeaderValue {
    match peer {
        IpAddr::V4(v4) => {
            let mut text = [0u8; 15];
            let mut len = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    text[len] = b'.';
                    len += 1;
                }
                if octet >= 100 {
                    text[len] = b'0' + octet / 100;
                    len += 1;
                }
                if octet >= 10 {
                    text[len] = b'0' + octet / 10 % 10;
                    len += 1;
                }
                text[len] = b'0' + octet % 10;
                len += 1;
            }
            HeaderValue::from_bytes(&text[..len]).unwrap_or(HeaderValue::from_static("unknown"))
        }
        IpAddr::V6(_) => {
            HeaderValue::from_str(&peer.to_string()).unwrap_or(HeaderValue::from_static("unknown"))
        }
    }
}

/// Appends the app's address to `X-Forwarded-For` and sets `X-Forwarded-Proto` to `http` (the proxy
/// listener speaks cleartext).
pub fn set_forwarded(headers: &mut HeaderMap, peer: IpAddr) {
    let (xff, proto) = (X_FORWARDED_FOR, X_FORWARDED_PROTO);
    if !headers.contains_key(&xff) {
        // The common case (the app talks to the sidecar directly): no list to extend.
        headers.insert(xff, forwarded_address(peer));
        headers.insert(proto, HeaderValue::from_static("http"));
        return;
    }
    let existing: Vec<String> = headers
        .get_all(&xff)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect();
    let mut value = existing.join(", ");
    if !value.is_empty() {
        value.push_str(", ");
    }
    value.push_str(&peer.to_string());
    headers.remove(&xff);
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.insert(xff, value);
    }
    headers.insert(proto, HeaderValue::from_static("http"));
}

/// Prepares request headers for the upstream: hop-by-hop removed, `Host` set to the upstream's
/// authority, forwarding fields and `Via` added.
pub fn prepare_request_headers(
    headers: &mut HeaderMap,
    host: &HeaderValue,
    peer: IpAddr,
    version: Version,
) {
    remove_hop_by_hop(headers);
    headers.insert(header::HOST, host.clone());
    set_forwarded(headers, peer);
    append_via(headers, version);
}

/// Prepares response headers for the app: hop-by-hop removed and `Via` added.
pub fn prepare_response_headers(headers: &mut HeaderMap, version: Version) {
    remove_hop_by_hop(headers);
    append_via(headers, version);
}

/// The `Host` value for requests to the upstream: its authority.
pub fn host_header(base: &BaseUrl) -> HeaderValue {
    HeaderValue::from_str(base.authority.as_str()).unwrap_or(HeaderValue::from_static("localhost"))
}

/// The upstream URI: the base URL's scheme and authority, its path prefix, then the app's path and
/// query exactly as received.
pub fn upstream_uri(base: &BaseUrl, path_and_query: &str) -> Result<Uri, ProxyError> {
    let path_and_query = if path_and_query.is_empty() {
        "/"
    } else {
        path_and_query
    };
    if !path_and_query.starts_with('/') {
        return Err(ProxyError::BadRequest(
            "the request target must be an absolute path".into(),
        ));
    }
    if base.path_prefix.is_empty() {
        if let Ok(target) = PathAndQuery::from_str(path_and_query) {
            return upstream_uri_for(base, target);
        }
    }
    let full = format!("{}{}", base.path_prefix, path_and_query);
    Uri::builder()
        .scheme(base.scheme.clone())
        .authority(base.authority.clone())
        .path_and_query(full)
        .build()
        .map_err(|_| ProxyError::BadRequest("the request target is not a valid URI".into()))
}

/// The upstream URI for a target the app sent, already parsed: without a base path prefix, the
/// target's bytes are shared, not copied (the passthrough fast path).
pub fn upstream_uri_from(base: &BaseUrl, target: &PathAndQuery) -> Result<Uri, ProxyError> {
    if base.path_prefix.is_empty() && target.as_str().starts_with('/') {
        return upstream_uri_for(base, target.clone());
    }
    upstream_uri(base, target.as_str())
}

fn upstream_uri_for(base: &BaseUrl, target: PathAndQuery) -> Result<Uri, ProxyError> {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(base.scheme.clone());
    parts.authority = Some(base.authority.clone());
    parts.path_and_query = Some(target);
    Uri::from_parts(parts)
        .map_err(|_| ProxyError::BadRequest("the request target is not a valid URI".into()))
}

/// Joins a path and an optional query back into a request target.
pub fn path_and_query(path: &str, query: Option<&str>) -> String {
    match query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::uri::{Authority, Scheme};

    fn base(prefix: &str) -> BaseUrl {
        BaseUrl {
            scheme: Scheme::HTTPS,
            authority: Authority::from_static("rutter.example:8443"),
            path_prefix: prefix.to_string(),
        }
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (k, v) in pairs {
            headers.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        headers
    }

    #[test]
    fn hop_by_hop_table() {
        let mut headers = map(&[
            ("connection", "keep-alive, X-Secret-Hop , bogus header"),
            ("connection", "close"),
            ("keep-alive", "timeout=5"),
            ("x-secret-hop", "1"),
            ("te", "trailers"),
            ("trailer", "x"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authorization", "Basic x"),
            ("proxy-authenticate", "Basic"),
            ("authorization", "Basic keep"),
            ("x-rutter-version", "2024-08-31"),
            ("idempotency-key", "k"),
            ("accept-encoding", "gzip"),
            ("x-unknown", "u"),
        ]);
        remove_hop_by_hop(&mut headers);
        let mut left: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(
            left,
            [
                "accept-encoding",
                "authorization",
                "idempotency-key",
                "x-rutter-version",
                "x-unknown"
            ]
        );
    }

    #[test]
    fn forwarded_and_via() {
        let mut headers = map(&[
            ("x-forwarded-for", "10.0.0.1"),
            ("via", "1.0 fred"),
            ("host", "localhost:8080"),
        ]);
        prepare_request_headers(
            &mut headers,
            &host_header(&base("")),
            "127.0.0.1".parse().unwrap(),
            Version::HTTP_11,
        );
        assert_eq!(headers["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(headers["x-forwarded-proto"], "http");
        assert_eq!(headers["via"], "1.0 fred, 1.1 rutter-sidecar");
        assert_eq!(headers["host"], "rutter.example:8443");
        assert_eq!(headers.get_all("host").iter().count(), 1);

        let mut headers = HeaderMap::new();
        prepare_request_headers(
            &mut headers,
            &host_header(&base("")),
            "::1".parse().unwrap(),
            Version::HTTP_2,
        );
        assert_eq!(headers["x-forwarded-for"], "::1");
        assert_eq!(headers["via"], "2 rutter-sidecar");
    }

    #[test]
    fn uri_table() {
        let cases = [
            (
                "",
                "/versioned/jobs/1",
                "https://rutter.example:8443/versioned/jobs/1",
            ),
            (
                "/prefix",
                "/versioned/x?a=1&b=%20",
                "https://rutter.example:8443/prefix/versioned/x?a=1&b=%20",
            ),
            (
                "",
                "/x?q=a+b&r=a%2Bb&k=1&k=2&e=",
                "https://rutter.example:8443/x?q=a+b&r=a%2Bb&k=1&k=2&e=",
            ),
            ("", "", "https://rutter.example:8443/"),
        ];
        for (prefix, target, expected) in cases {
            assert_eq!(
                upstream_uri(&base(prefix), target).unwrap().to_string(),
                expected
            );
            if let Ok(parsed) = PathAndQuery::from_str(target) {
                assert_eq!(
                    upstream_uri_from(&base(prefix), &parsed)
                        .unwrap()
                        .to_string(),
                    expected,
                    "{target} as a parsed target"
                );
            }
        }
        assert!(upstream_uri(&base(""), "*").is_err());
        let star = PathAndQuery::from_static("*");
        assert!(upstream_uri_from(&base(""), &star).is_err());
    }

    #[test]
    fn forwarded_address_table() {
        for text in [
            "0.0.0.0",
            "127.0.0.1",
            "10.0.100.9",
            "192.168.10.99",
            "255.255.255.255",
            "1.20.255.0",
            "::1",
            "fe80::1:2",
        ] {
            let ip: IpAddr = text.parse().unwrap();
            assert_eq!(forwarded_address(ip), text);
        }
    }

    #[test]
    fn via_table() {
        let cases = [
            (None, Version::HTTP_11, "1.1 rutter-sidecar"),
            (Some(""), Version::HTTP_11, "1.1 rutter-sidecar"),
            (
                Some("1.0 fred"),
                Version::HTTP_10,
                "1.0 fred, 1.0 rutter-sidecar",
            ),
            (
                Some("2 a, 1.1 b"),
                Version::HTTP_2,
                "2 a, 1.1 b, 2 rutter-sidecar",
            ),
        ];
        for (existing, version, expected) in cases {
            let mut headers = HeaderMap::new();
            if let Some(existing) = existing {
                headers.insert(header::VIA, HeaderValue::from_static(existing));
            }
            append_via(&mut headers, version);
            assert_eq!(headers.get_all(header::VIA).iter().count(), 1);
            assert_eq!(headers[header::VIA], expected);
        }
    }

    #[test]
    fn headers_without_hop_by_hop_fields_are_untouched() {
        let mut headers = map(&[("accept", "*/*"), ("x-a", "1"), ("x-a", "2")]);
        let before = headers.clone();
        remove_hop_by_hop(&mut headers);
        assert_eq!(headers, before);
    }
}
