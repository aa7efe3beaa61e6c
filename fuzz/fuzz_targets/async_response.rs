//! Fuzz target `async_response`: reading Rutter's `async_response` and choosing the URL to poll
//! (DESIGN §3, §5: never follow `response_url` off the configured upstream).
//!
//! Input layout: `flags-byte base-url \n body`. The base URL line goes through the real configuration
//! parser (`upstream.base_url`); when it is rejected a fixed base is used. The body is the upstream
//! answer. The flags byte chooses `/versioned` or the legacy root.
//!
//! Invariants checked:
//! - `parse_async_response` never panics; an `Ok` carries a valid job id;
//! - for a valid id, `poll_uri` always yields a URI, whose scheme and authority are exactly the base's
//!   and whose path is `{prefix}[/versioned]/jobs/{id}` with no query, whatever `response_url` says;
//! - with an arbitrary id and `response_url` (not what the facade passes, but cheap to check),
//!   `poll_uri` never panics and any URI it returns is still on the base's scheme and authority.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rutter_sidecar::config::{BaseUrl, Config};
use rutter_sidecar::facade::{parse_async_response, poll_uri, valid_job_id, AsyncResponse};

fn base_from(url: &str) -> Option<BaseUrl> {
    let text = format!(
        "[upstream]\nbase_url = {}\n",
        serde_json::to_string(url).ok()?
    );
    Config::parse(&text, &[]).ok().map(|c| c.upstream.base_url)
}

fn fixed_bases() -> &'static [BaseUrl] {
    static BASES: OnceLock<Vec<BaseUrl>> = OnceLock::new();
    BASES.get_or_init(|| {
        [
            "https://production.rutterapi.com",
            "http://127.0.0.1:4010",
            "https://sandbox.rutterapi.com:8443/prefix",
        ]
        .into_iter()
        .map(|u| base_from(u).expect("fixed base"))
        .collect()
    })
}

fn check_origin(uri: &http::Uri, base: &BaseUrl) {
    assert_eq!(uri.scheme(), Some(&base.scheme), "{uri} left {base}");
    assert_eq!(uri.authority(), Some(&base.authority), "{uri} left {base}");
    assert!(
        uri.path().starts_with(base.path_prefix.as_str()),
        "{uri} left {base}"
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let versioned = flags & 1 == 1;
    let (line, body) = match rest.iter().position(|&b| b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let fuzzed_base = std::str::from_utf8(line).ok().and_then(base_from);
    let bases: Vec<&BaseUrl> = fuzzed_base.iter().chain(fixed_bases()).collect();

    if let Some(Ok(job)) = parse_async_response(body) {
        assert!(valid_job_id(&job.id), "{:?}", job.id);
        for base in &bases {
            let uri =
                poll_uri(base, versioned, &job).expect("a valid job id always gives a poll URI");
            check_origin(&uri, base);
            assert_eq!(uri.query(), None, "{uri}");
            let tail = uri
                .path()
                .strip_prefix(base.path_prefix.as_str())
                .expect("prefix");
            assert!(
                tail == format!("/versioned/jobs/{}", job.id)
                    || tail == format!("/jobs/{}", job.id),
                "{uri}"
            );
        }
    }

    // Arbitrary id and response_url, straight into poll_uri.
    if let (Ok(id), Ok(url)) = (std::str::from_utf8(line), std::str::from_utf8(body)) {
        let job = AsyncResponse {
            id: id.to_string(),
            response_url: Some(url.to_string()),
            status: None,
        };
        for base in &bases {
            if let Ok(uri) = poll_uri(base, versioned, &job) {
                check_origin(&uri, base);
            }
        }
    }
});
