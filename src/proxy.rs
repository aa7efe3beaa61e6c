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

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Uri, Version};

use crate::config::BaseUrl;
use crate::error::ProxyError;

/// The product token used in `Via`.
pub const VIA_PSEUDONYM: &str = "rutter-sidecar";

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

/// Removes hop-by-hop fields: the fixed list, `Proxy-Authenticate`, and every field named in
/// `Connection` (RFC 9110 §7.6.1).
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
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

/// The `Via` protocol token for an HTTP version (RFC 9110 §7.6.3: `1.1`, `2`, ...).
fn via_protocol(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "0.9",
        Version::HTTP_10 => "1.0",
        Version::HTTP_2 => "2",
        Version::HTTP_3 => "3",
        _ => "1.1",
    }
}

/// Appends this proxy to `Via` for a message received with `version`.
pub fn append_via(headers: &mut HeaderMap, version: Version) {
    let ours = format!("{} {}", via_protocol(version), VIA_PSEUDONYM);
    let value = match headers.get(header::VIA).and_then(|v| v.to_str().ok()) {
        Some(existing) if !existing.is_empty() => format!("{existing}, {ours}"),
        _ => ours,
    };
    headers.remove(header::VIA);
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.insert(header::VIA, value);
    }
}

/// Appends the app's address to `X-Forwarded-For` and sets `X-Forwarded-Proto` to `http` (the proxy
/// listener speaks cleartext).
pub fn set_forwarded(headers: &mut HeaderMap, peer: IpAddr) {
    let xff = HeaderName::from_static("x-forwarded-for");
    let proto = HeaderName::from_static("x-forwarded-proto");
    if !headers.contains_key(&xff) {
        // The common case (the app talks to the sidecar directly): no list to extend.
        if let Ok(value) = HeaderValue::from_str(&peer.to_string()) {
            headers.insert(xff, value);
        }
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
    base: &BaseUrl,
    peer: IpAddr,
    version: Version,
) {
    remove_hop_by_hop(headers);
    if let Ok(host) = HeaderValue::from_str(base.authority.as_str()) {
        headers.insert(header::HOST, host);
    }
    set_forwarded(headers, peer);
    append_via(headers, version);
}

/// Prepares response headers for the app: hop-by-hop removed and `Via` added.
pub fn prepare_response_headers(headers: &mut HeaderMap, version: Version) {
    remove_hop_by_hop(headers);
    append_via(headers, version);
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
    let full = format!("{}{}", base.path_prefix, path_and_query);
    Uri::builder()
        .scheme(base.scheme.clone())
        .authority(base.authority.clone())
        .path_and_query(full)
        .build()
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
            &base(""),
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
            &base(""),
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
        }
        assert!(upstream_uri(&base(""), "*").is_err());
    }
}
