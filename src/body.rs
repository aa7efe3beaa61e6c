//! The one HTTP body type used across the crate, helpers to build bodies from bytes, and copies of
//! parsed data that must outlive the connection buffer it was read into.

use bytes::{Bytes, BytesMut};
use http::header::{HeaderMap, HeaderValue};
use http_body_util::{BodyExt, Empty, Full};

/// A boxed error that can cross task boundaries.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every request and response the sidecar builds or forwards.
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// A body holding exactly `bytes` (its length is known, so `Content-Length` is exact).
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A body with no bytes.
pub fn empty() -> Body {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Boxes any body whose error converts into [`BoxError`], e.g. `hyper::body::Incoming`.
pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// A copy of `headers` whose values live in one fresh allocation, not in the buffer the connection
/// read them into: a request that waits keeps a few hundred bytes instead of the whole read buffer.
pub fn detached_headers(headers: &HeaderMap) -> HeaderMap {
    let total: usize = headers.values().map(|v| v.len()).sum();
    let mut bytes = BytesMut::with_capacity(total);
    let mut copy = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        bytes.extend_from_slice(value.as_bytes());
        let shared = bytes.split().freeze();
        // The bytes were a valid header value a moment ago.
        let Ok(mut fresh) = HeaderValue::from_maybe_shared(shared) else {
            copy.append(name.clone(), value.clone());
            continue;
        };
        fresh.set_sensitive(value.is_sensitive());
        copy.append(name.clone(), fresh);
    }
    copy
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detached_headers_are_equal_copies() {
        let buffer = Bytes::from_static(b"one two secret");
        let mut headers = HeaderMap::new();
        headers.append(
            "x-a",
            HeaderValue::from_maybe_shared(buffer.slice(0..3)).unwrap(),
        );
        headers.append(
            "x-a",
            HeaderValue::from_maybe_shared(buffer.slice(4..7)).unwrap(),
        );
        let mut secret = HeaderValue::from_maybe_shared(buffer.slice(8..)).unwrap();
        secret.set_sensitive(true);
        headers.insert(http::header::AUTHORIZATION, secret);
        headers.insert("x-empty", HeaderValue::from_static(""));
        let copy = detached_headers(&headers);
        assert_eq!(copy, headers);
        assert!(copy[http::header::AUTHORIZATION].is_sensitive());
        let values: Vec<_> = copy.get_all("x-a").iter().collect();
        assert_eq!(values, ["one", "two"]);
        // Not views into the original buffer.
        let original = buffer.as_ptr_range();
        for value in copy.values() {
            assert!(!original.contains(&value.as_bytes().as_ptr()) || value.is_empty());
        }
    }
}
