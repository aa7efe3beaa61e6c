//! Hostile HTTP/1.1 over raw TCP to all three listeners (proxy, webhooks, admin): ambiguous framing
//! (Content-Length with Transfer-Encoding, duplicate, signed or malformed Content-Length, obfuscated
//! Transfer-Encoding, bare LF), oversized heads and header floods, invalid methods and targets,
//! absolute-form and CONNECT, `Expect: 100-continue`, and slowloris trickles.
//!
//! For every case the sidecar answers 4xx or closes the connection — or, where the RFC lets a
//! recipient accept the message, forwards exactly the message it parsed — and stays up. Nothing
//! reaches Rutter that Rutter could parse differently from the sidecar: every request the emulator
//! saw is checked (no smuggled request, bodies exactly as framed, one Host: Rutter's).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use http::{Method, StatusCode};
use rutter_sidecar::config::{Config, Credentials};
use rutter_sidecar::webhooks::sign;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{sleep, timeout, Instant};

const SECRET: &str = "hostile-http-secret";
/// The body every framing case means to send.
const BODY: &[u8] = br#"{"a":1}"#;
/// The same body, chunked.
const CHUNKED: &str = "7\r\n{\"a\":1}\r\n0\r\n\r\n";
/// A request pipelined after a hostile one: Rutter must never see it unless the sidecar answered
/// it as a request of its own.
const SMUGGLED_PATH: &str = "/versioned/smuggled";
/// `listen.idle_timeout` in these tests.
const IDLE: Duration = Duration::from_secs(1);

fn orders() -> String {
    format!("/versioned/orders?access_token={TOKEN}")
}

fn customers() -> String {
    format!("/versioned/accounting/customers?access_token={TOKEN}")
}

/// The test configuration: a short idle timeout and a 16 KiB head limit.
fn hostile_config(rutter: SocketAddr) -> Config {
    let mut config = config_for(rutter);
    config.listen.idle_timeout = IDLE;
    config.listen.max_header_bytes = 16 * 1024;
    config.upstream.request_timeout = Duration::from_secs(2);
    config
}

async fn start(job_ms: u64) -> (EmulatorHandle, SidecarHandle) {
    let rutter = start_emulator(emulator_options(job_ms)).await;
    let credentials = Credentials {
        client_id: None,
        client_secret: Some(SECRET.into()),
    };
    let sidecar = start_sidecar_with(hostile_config(rutter.addr), credentials).await;
    (rutter, sidecar)
}

/// One answer read off a raw connection.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    /// The head, lower-cased.
    #[allow(dead_code)]
    head: String,
    body: Vec<u8>,
}

/// Everything that came back on a raw connection.
#[derive(Debug)]
struct Exchange {
    responses: Vec<RawResponse>,
    /// The sidecar closed the connection (EOF or reset).
    closed: bool,
}

impl Exchange {
    fn statuses(&self) -> Vec<u16> {
        self.responses.iter().map(|r| r.status).collect()
    }

    /// Final (non-1xx) answers.
    fn finals(&self) -> Vec<&RawResponse> {
        self.responses.iter().filter(|r| r.status >= 200).collect()
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Parses one complete answer at the start of `buf`: `(answer, bytes used)`; `None` if incomplete.
fn parse_response(buf: &[u8], eof: bool) -> Option<(RawResponse, usize)> {
    let end = find(buf, b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let status: u16 = head.get(9..12)?.parse().ok()?;
    let rest = &buf[end + 4..];
    let header = |name: &str| {
        head.lines()
            .skip(1)
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
    };
    if status < 200 || status == 204 || status == 304 {
        return Some((
            RawResponse {
                status,
                head,
                body: Vec::new(),
            },
            end + 4,
        ));
    }
    if header("transfer-encoding:").is_some_and(|v| v.contains("chunked")) {
        let mut body = Vec::new();
        let mut at = 0;
        loop {
            let line_end = find(&rest[at..], b"\r\n")? + at;
            let size_text = String::from_utf8_lossy(&rest[at..line_end]);
            let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
            at = line_end + 2;
            if size == 0 {
                let trailer_end = find(&rest[at..], b"\r\n")? + at;
                return Some((
                    RawResponse { status, head, body },
                    end + 4 + trailer_end + 2,
                ));
            }
            if rest.len() < at + size + 2 {
                return None;
            }
            body.extend_from_slice(&rest[at..at + size]);
            at += size + 2;
        }
    }
    if let Some(len) = header("content-length:").and_then(|v| v.parse::<usize>().ok()) {
        if rest.len() < len {
            return None;
        }
        let body = rest[..len].to_vec();
        return Some((RawResponse { status, head, body }, end + 4 + len));
    }
    // Delimited by the close.
    eof.then(|| {
        (
            RawResponse {
                status,
                head,
                body: rest.to_vec(),
            },
            buf.len(),
        )
    })
}

/// Reads answers off `stream` until it closes, until `quiet` passes without a byte once at least
/// one final answer arrived, or until `limit`.
async fn read_answers(stream: &mut TcpStream, quiet: Duration, limit: Duration) -> Exchange {
    let deadline = Instant::now() + limit;
    let mut buf = Vec::new();
    let mut responses = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let closed = loop {
        let has_final = responses.iter().any(|r: &RawResponse| r.status >= 200);
        let wait_until = if has_final {
            (Instant::now() + quiet).min(deadline)
        } else {
            deadline
        };
        match tokio::time::timeout_at(wait_until, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => {
                buf.extend_from_slice(&chunk[..n]);
                while let Some((response, used)) = parse_response(&buf, false) {
                    responses.push(response);
                    buf.drain(..used);
                }
            }
            Err(_) => break false,
        }
    };
    if closed {
        if let Some((response, _)) = parse_response(&buf, true) {
            responses.push(response);
        }
    }
    Exchange { responses, closed }
}

/// Writes `request` on a new connection (a write error is fine: the sidecar may close early) and
/// reads what comes back.
async fn exchange(addr: SocketAddr, request: &[u8]) -> Exchange {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let _ = stream.write_all(request).await;
    read_answers(
        &mut stream,
        Duration::from_millis(300),
        Duration::from_secs(4),
    )
    .await
}

/// What the sidecar may do with a hostile request.
#[derive(Debug, Clone, Copy)]
enum Allowed {
    /// Only refuse it: a 4xx (or 505 for a version), or close without answering. Rutter sees
    /// nothing.
    Refused,
    /// Refuse it, or accept it as a message with exactly this body (the RFC lets a recipient do
    /// either); then Rutter gets exactly that body, once.
    RefusedOrBody(&'static [u8]),
}

/// One hostile request: the bytes between the request line and the body (header lines, each
/// ending in CRLF unless the case says otherwise), and the body bytes.
struct Case {
    name: &'static str,
    /// The request line's method (the target is the listener's).
    method: &'static str,
    headers: String,
    body: String,
    allowed: Allowed,
    /// RFC 9112 §6.1: with both Content-Length and Transfer-Encoding the connection must be closed
    /// after the answer.
    must_close: bool,
}

fn case(name: &'static str, headers: &str, body: &str, allowed: Allowed) -> Case {
    Case {
        name,
        method: "POST",
        headers: headers.to_string(),
        body: body.to_string(),
        allowed,
        must_close: false,
    }
}

/// The framing cases: each sent to every listener with a request pipelined behind it.
fn framing_cases() -> Vec<Case> {
    use Allowed::*;
    let body = std::str::from_utf8(BODY).unwrap();
    let mut cases = vec![
        // Content-Length with Transfer-Encoding, either order; CL would frame "7\r\n{".
        Case {
            must_close: true,
            ..case(
                "cl-then-te",
                "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
                CHUNKED,
                RefusedOrBody(BODY),
            )
        },
        Case {
            must_close: true,
            ..case(
                "te-then-cl",
                "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n",
                CHUNKED,
                RefusedOrBody(BODY),
            )
        },
        case(
            "duplicate-cl-same",
            "Content-Length: 7\r\nContent-Length: 7\r\n",
            body,
            RefusedOrBody(BODY),
        ),
        case(
            "duplicate-cl-conflict",
            "Content-Length: 7\r\nContent-Length: 8\r\n",
            body,
            Refused,
        ),
        case(
            "cl-list",
            "Content-Length: 7, 7\r\n",
            body,
            RefusedOrBody(BODY),
        ),
        case(
            "cl-list-conflict",
            "Content-Length: 7, 4\r\n",
            body,
            Refused,
        ),
        case("cl-plus", "Content-Length: +7\r\n", body, Refused),
        case("cl-minus", "Content-Length: -1\r\n", body, Refused),
        case("cl-hex", "Content-Length: 0x7\r\n", body, Refused),
        case("cl-inner-space", "Content-Length: 7 7\r\n", body, Refused),
        case(
            "cl-overflow",
            "Content-Length: 18446744073709551616\r\n",
            body,
            Refused,
        ),
        case("cl-empty", "Content-Length: \r\n", body, Refused),
        case(
            "te-chunked-identity",
            "Transfer-Encoding: chunked, identity\r\n",
            CHUNKED,
            Refused,
        ),
        case(
            "te-xchunked",
            "Transfer-Encoding: xchunked\r\n",
            CHUNKED,
            Refused,
        ),
        case(
            "te-identity",
            "Transfer-Encoding: identity\r\n",
            CHUNKED,
            Refused,
        ),
        case(
            "te-chunked-then-identity-lines",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
            CHUNKED,
            Refused,
        ),
        case(
            "te-leading-space",
            "Transfer-Encoding:   chunked\r\n",
            CHUNKED,
            RefusedOrBody(BODY),
        ),
        case(
            "te-tab",
            "Transfer-Encoding:\tchunked\r\n",
            CHUNKED,
            RefusedOrBody(BODY),
        ),
        case(
            "te-upper",
            "Transfer-Encoding: CHUNKED\r\n",
            CHUNKED,
            RefusedOrBody(BODY),
        ),
        // RFC 9112 §5.2: reject, or replace the fold with spaces.
        case(
            "te-obs-fold",
            "Transfer-Encoding:\r\n chunked\r\n",
            CHUNKED,
            RefusedOrBody(BODY),
        ),
        // RFC 9112 §5.1: whitespace before the colon MUST be a 400.
        case(
            "te-space-before-colon",
            "Transfer-Encoding : chunked\r\n",
            CHUNKED,
            Refused,
        ),
        case(
            "cl-space-before-colon",
            "Content-Length : 7\r\n",
            body,
            Refused,
        ),
        case(
            "chunk-size-overflow",
            "Transfer-Encoding: chunked\r\n",
            "fffffffffffffffff1\r\n{\"a\":1}\r\n0\r\n\r\n",
            Refused,
        ),
        case(
            "chunk-size-garbage",
            "Transfer-Encoding: chunked\r\n",
            "7x\r\n{\"a\":1}\r\n0\r\n\r\n",
            Refused,
        ),
        case(
            "chunk-extension",
            "Transfer-Encoding: chunked\r\n",
            "7;ext=\"v\"\r\n{\"a\":1}\r\n0\r\n\r\n",
            RefusedOrBody(BODY),
        ),
        case(
            "chunk-trailer",
            "Transfer-Encoding: chunked\r\n",
            "7\r\n{\"a\":1}\r\n0\r\nX-Trailer: evil\r\n\r\n",
            RefusedOrBody(BODY),
        ),
        case(
            "chunk-bare-lf",
            "Transfer-Encoding: chunked\r\n",
            "7\n{\"a\":1}\n0\n\n",
            RefusedOrBody(BODY),
        ),
        case(
            "bare-cr-in-header",
            "X-Evil: a\rX-Injected: 1\r\nContent-Length: 7\r\n",
            body,
            Refused,
        ),
        case(
            "nul-in-header",
            "X-Evil: a\0b\r\nContent-Length: 7\r\n",
            body,
            Refused,
        ),
        case(
            "header-without-colon",
            "X-Evil\r\nContent-Length: 7\r\n",
            body,
            Refused,
        ),
        Case {
            method: "G@T",
            ..case("invalid-method", "Content-Length: 7\r\n", body, Refused)
        },
        Case {
            method: "GET\0",
            ..case("nul-in-method", "Content-Length: 7\r\n", body, Refused)
        },
    ];
    // HTTP/1.0 may not use Transfer-Encoding at all.
    cases.push(case(
        "te-in-http-1.0",
        "Transfer-Encoding: chunked\r\n",
        CHUNKED,
        Refused,
    ));
    cases
}

/// The three listeners and how a body-carrying request is addressed on each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Listener {
    Proxy,
    Webhooks,
    Admin,
}

impl Listener {
    fn addr(self, sidecar: &SidecarHandle) -> SocketAddr {
        match self {
            Listener::Proxy => sidecar.addr,
            Listener::Webhooks => sidecar.webhook_addr,
            Listener::Admin => sidecar.admin_addr,
        }
    }

    fn target(self) -> String {
        match self {
            Listener::Proxy => orders(),
            Listener::Webhooks => "/webhooks/rutter".into(),
            Listener::Admin => "/live".into(),
        }
    }

    /// Extra header lines: a non-JSON type on the proxy (so the body streams through), the
    /// signature of [`BODY`] on the webhook listener (so a 200 proves the receiver read exactly it).
    fn extra(self) -> String {
        match self {
            Listener::Proxy => "Content-Type: text/plain\r\n".into(),
            Listener::Webhooks => format!(
                "X-Rutter-Signature: {}\r\nContent-Type: application/json\r\n",
                sign(SECRET.as_bytes(), BODY)
            ),
            Listener::Admin => String::new(),
        }
    }
}

fn build(listener: Listener, case: &Case, smuggle: bool) -> Vec<u8> {
    let version = if case.name == "te-in-http-1.0" {
        "HTTP/1.0"
    } else {
        "HTTP/1.1"
    };
    let mut request = format!(
        "{} {} {version}\r\nHost: sidecar.test\r\n{}{}\r\n{}",
        case.method,
        listener.target(),
        listener.extra(),
        case.headers,
        case.body
    )
    .into_bytes();
    if smuggle {
        request.extend_from_slice(
            format!("GET {SMUGGLED_PATH}?access_token={TOKEN} HTTP/1.1\r\nHost: x\r\n\r\n")
                .as_bytes(),
        );
    }
    request
}

/// The sidecar still answers a normal request on every listener.
async fn assert_still_up(sidecar: &SidecarHandle) {
    let reply = send(&client(), sidecar.addr, Method::GET, &customers(), &[], "").await;
    assert_eq!(reply.status, StatusCode::OK);
    let live = send(&client(), sidecar.admin_addr, Method::GET, "/live", &[], "").await;
    assert_eq!(live.status, StatusCode::OK);
    let body = r#"{"type":"CONNECTION","code":"HEALTHY"}"#;
    let signature = sign(SECRET.as_bytes(), body.as_bytes());
    let hook = send(
        &client(),
        sidecar.webhook_addr,
        Method::POST,
        "/webhooks/rutter",
        &[("x-rutter-signature", signature.as_str())],
        body,
    )
    .await;
    assert_eq!(hook.status, StatusCode::OK);
}

/// 4xx, or 505 for an unsupported version.
fn is_refusal(status: u16) -> bool {
    (400..500).contains(&status) || status == 505
}

#[tokio::test]
async fn ambiguous_framing_is_refused_or_reframed_exactly_on_every_listener() {
    let (rutter, sidecar) = start(50).await;
    let mut failures = Vec::new();
    for listener in [Listener::Proxy, Listener::Webhooks, Listener::Admin] {
        for case in framing_cases() {
            let seen_before = rutter.emulator.seen().len();
            let outcome = exchange(listener.addr(&sidecar), &build(listener, &case, true)).await;
            let seen: Vec<_> = rutter.emulator.seen().split_off(seen_before);
            let label = format!("{listener:?} {}", case.name);
            let finals = outcome.finals();
            let first = finals.first().map(|r| r.status);
            // A refusal ends the exchange: nothing after the bad message may be read as a request.
            let refused_and_closed =
                first.is_none_or(is_refusal) && outcome.closed && finals.len() <= 1;
            if case.must_close && (!outcome.closed || finals.len() > 1) {
                failures.push(format!(
                    "{label}: with Content-Length and Transfer-Encoding the connection must close \
                     after the answer (RFC 9112 §6.1): {:?}",
                    outcome.statuses()
                ));
            }
            match listener {
                Listener::Proxy => {
                    let hostile: Vec<_> = seen
                        .iter()
                        .filter(|r| !r.path_and_query.starts_with(SMUGGLED_PATH))
                        .collect();
                    let smuggled = seen.len() - hostile.len();
                    match (case.allowed, hostile.as_slice()) {
                        (_, []) => {
                            if !refused_and_closed {
                                failures.push(format!(
                                    "{label}: not forwarded, yet not refused and closed: {:?}",
                                    outcome.statuses()
                                ));
                            }
                        }
                        (Allowed::RefusedOrBody(body), [request]) => {
                            if request.body != body {
                                failures.push(format!(
                                    "{label}: Rutter got the body {:?}",
                                    String::from_utf8_lossy(&request.body)
                                ));
                            }
                            let lengths: Vec<_> =
                                request.headers.get_all("content-length").iter().collect();
                            let te = request.headers.get("transfer-encoding");
                            let framing_ok = match (lengths.as_slice(), te) {
                                ([], _) => true,
                                ([one], None) => one.to_str().ok() == Some(&body.len().to_string()),
                                _ => false,
                            };
                            if !framing_ok {
                                failures.push(format!(
                                    "{label}: Rutter got ambiguous framing: {:?}",
                                    request.headers
                                ));
                            }
                        }
                        (_, forwarded) => failures.push(format!(
                            "{label}: must be refused, yet Rutter saw {:?}",
                            forwarded
                                .iter()
                                .map(|r| String::from_utf8_lossy(&r.body).into_owned())
                                .collect::<Vec<_>>()
                        )),
                    }
                    // The pipelined request reaches Rutter only as a request the app got an
                    // answer for.
                    if smuggled > 0 && finals.len() < 2 {
                        failures.push(format!(
                            "{label}: a request the app got no answer for reached Rutter"
                        ));
                    }
                }
                Listener::Webhooks => {
                    let ok = match case.allowed {
                        Allowed::Refused => refused_and_closed,
                        // 200: the signature proves the receiver read exactly the signed body.
                        Allowed::RefusedOrBody(_) => first == Some(200) || refused_and_closed,
                    };
                    if !ok {
                        failures.push(format!("{label}: {:?}", outcome.statuses()));
                    }
                }
                Listener::Admin => {
                    let ok = match case.allowed {
                        Allowed::Refused => refused_and_closed,
                        Allowed::RefusedOrBody(_) => first.is_none_or(is_refusal),
                    };
                    if !ok {
                        failures.push(format!("{label}: {:?}", outcome.statuses()));
                    }
                }
            }
            if listener != Listener::Proxy && !seen.is_empty() {
                failures.push(format!("{label}: Rutter saw {} request(s)", seen.len()));
            }
        }
        assert_still_up(&sidecar).await;
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn bare_lf_line_endings_are_refused_or_read_exactly() {
    let (rutter, sidecar) = start(50).await;
    for listener in [Listener::Proxy, Listener::Webhooks, Listener::Admin] {
        let head = format!(
            "POST {} HTTP/1.1\nHost: sidecar.test\n{}Content-Length: 7\n\n",
            listener.target(),
            listener.extra().replace("\r\n", "\n")
        );
        let mut request = head.into_bytes();
        request.extend_from_slice(BODY);
        let before = rutter.emulator.seen().len();
        let outcome = exchange(listener.addr(&sidecar), &request).await;
        let seen = rutter.emulator.seen().split_off(before);
        let status = outcome.finals().first().map(|r| r.status);
        match (listener, status) {
            (_, None) => assert!(outcome.closed, "{listener:?}: {outcome:?}"),
            (_, Some(s)) if is_refusal(s) && !(listener == Listener::Admin && s == 405) => {
                assert!(seen.is_empty(), "{listener:?}: refused, yet Rutter saw it");
            }
            (Listener::Proxy, Some(_)) => {
                assert_eq!(seen.len(), 1);
                assert_eq!(seen[0].body, BODY, "exactly the framed body");
            }
            (Listener::Webhooks, Some(s)) => assert_eq!(s, 200, "the signed body, exactly"),
            (Listener::Admin, Some(s)) => assert_eq!(s, 405),
        }
    }
    assert_still_up(&sidecar).await;
}

#[tokio::test]
async fn oversized_heads_and_header_floods_are_refused_on_every_listener() {
    let (rutter, sidecar) = start(50).await;
    let big_value = "v".repeat(32 * 1024);
    let flood: String = (0..300).map(|i| format!("X-Flood-{i}: {i}\r\n")).collect();
    let many_medium: String = (0..40)
        .map(|i| format!("X-Medium-{i}: {}\r\n", "m".repeat(600)))
        .collect();
    let long_target = format!("/versioned/{}?access_token={TOKEN}", "a".repeat(20 * 1024));
    for listener in [Listener::Proxy, Listener::Webhooks, Listener::Admin] {
        let target = listener.target();
        let requests = [
            format!("GET {target} HTTP/1.1\r\nHost: h\r\nX-Big: {big_value}\r\n\r\n"),
            format!("GET {target} HTTP/1.1\r\nHost: h\r\n{flood}\r\n"),
            format!("GET {target} HTTP/1.1\r\nHost: h\r\n{many_medium}\r\n"),
            format!("GET {long_target} HTTP/1.1\r\nHost: h\r\n\r\n"),
        ];
        for (i, request) in requests.iter().enumerate() {
            let outcome = exchange(listener.addr(&sidecar), request.as_bytes()).await;
            let status = outcome.finals().first().map(|r| r.status);
            assert!(
                status.is_none_or(is_refusal),
                "{listener:?} #{i}: {:?}",
                outcome.statuses()
            );
            assert!(
                outcome.closed,
                "{listener:?} #{i}: the connection is closed"
            );
        }
    }
    assert!(rutter.emulator.seen().is_empty());
    assert_still_up(&sidecar).await;
}

/// Request targets that are not an origin-form path (RFC 9112 §3.2: origin-form, or
/// absolute-form; authority-form only for CONNECT, asterisk-form only for OPTIONS): refused on every
/// listener, and nothing reaches Rutter — in particular `GET foo` must not become `GET /`.
#[tokio::test]
async fn invalid_request_targets_are_refused_on_every_listener() {
    let (rutter, sidecar) = start(50).await;
    let targets = [
        "foo",
        "evil.example:443",
        "*",
        "/a b",
        "/a\0b",
        "/a\tb",
        "\\versioned\\orders",
        "",
    ];
    let mut failures = Vec::new();
    for listener in [Listener::Proxy, Listener::Webhooks, Listener::Admin] {
        for target in targets {
            let before = rutter.emulator.seen().len();
            let request = format!("GET {target} HTTP/1.1\r\nHost: h\r\n\r\n");
            let outcome = exchange(listener.addr(&sidecar), request.as_bytes()).await;
            let status = outcome.finals().first().map(|r| r.status);
            if !status.is_none_or(is_refusal) || (status.is_none() && !outcome.closed) {
                failures.push(format!("{listener:?} {target:?}: {:?}", outcome.statuses()));
            }
            for seen in rutter.emulator.seen().split_off(before) {
                failures.push(format!(
                    "{listener:?} GET {target:?} reached Rutter as {} {:?}",
                    seen.method, seen.path_and_query
                ));
            }
        }
    }
    // An unsupported version.
    let outcome = exchange(sidecar.addr, b"GET / HTTP/9.9\r\nHost: h\r\n\r\n").await;
    let status = outcome.finals().first().map(|r| r.status);
    assert!(status.is_none_or(is_refusal), "{:?}", outcome.statuses());
    assert_still_up(&sidecar).await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Raw non-ASCII bytes in a path are not a valid URI; the sidecar may refuse them, or pass them on
/// byte for byte (DESIGN §3) — never re-encoded or cut, so Rutter reads what the sidecar read.
#[tokio::test]
async fn raw_non_ascii_paths_are_refused_or_passed_byte_for_byte() {
    let (rutter, sidecar) = start(50).await;
    let target = format!("/versioned/accounting/customers/caf\u{e9}?access_token={TOKEN}");
    let request = format!("GET {target} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n");
    let outcome = exchange(sidecar.addr, request.as_bytes()).await;
    let seen: Vec<_> = rutter
        .emulator
        .seen()
        .into_iter()
        .map(|r| r.path_and_query)
        .collect();
    match outcome.finals().first().map(|r| r.status) {
        Some(s) if is_refusal(s) && seen.is_empty() => {}
        None if seen.is_empty() => assert!(outcome.closed),
        _ => assert_eq!(seen, [target], "{:?}", outcome.statuses()),
    }
    assert_still_up(&sidecar).await;
}

/// An absolute-form target still goes to the configured upstream: Rutter sees the path and query
/// only, and its own Host.
#[tokio::test]
async fn absolute_form_requests_go_to_the_configured_upstream_only() {
    let (rutter, sidecar) = start(50).await;
    let path = customers();
    for authority in [
        "http://evil.example",
        "https://evil.example:8443",
        "http://127.0.0.1:1",
    ] {
        let request = format!(
            "GET {authority}{path} HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n"
        );
        let outcome = exchange(sidecar.addr, request.as_bytes()).await;
        let status = outcome.finals().first().map(|r| r.status);
        assert!(
            status == Some(200) || status.is_none_or(is_refusal),
            "{authority}: {:?}",
            outcome.statuses()
        );
    }
    let rutter_host = rutter.addr.to_string();
    for request in rutter.emulator.seen() {
        assert_eq!(request.path_and_query, path);
        let hosts: Vec<_> = request.headers.get_all("host").iter().collect();
        assert_eq!(hosts, [rutter_host.as_str()], "Rutter's Host, once");
    }
    // A network-path reference is a path like any other: same upstream, same Host.
    let request =
        format!("GET //evil.example{path} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n");
    let _ = exchange(sidecar.addr, request.as_bytes()).await;
    for request in rutter.emulator.seen() {
        assert_eq!(request.headers["host"], rutter_host.as_str());
    }
    // Missing and repeated Host: Rutter still gets exactly one Host, its own.
    for hosts in ["", "Host: a.example\r\nHost: b.example\r\n"] {
        let request = format!("GET {path} HTTP/1.1\r\n{hosts}Connection: close\r\n\r\n");
        let outcome = exchange(sidecar.addr, request.as_bytes()).await;
        let status = outcome.finals().first().map(|r| r.status);
        assert!(
            status == Some(200) || status.is_none_or(is_refusal),
            "{hosts:?}: {:?}",
            outcome.statuses()
        );
    }
    for request in rutter.emulator.seen() {
        let hosts: Vec<_> = request.headers.get_all("host").iter().collect();
        assert_eq!(hosts, [rutter_host.as_str()]);
    }
    assert_still_up(&sidecar).await;
}

/// CONNECT is refused on every listener, and the connection never becomes a tunnel.
#[tokio::test]
async fn connect_is_refused_and_never_tunnels() {
    let (rutter, sidecar) = start(50).await;
    let target = rutter.addr.to_string();
    for listener in [Listener::Proxy, Listener::Webhooks, Listener::Admin] {
        let mut stream = TcpStream::connect(listener.addr(&sidecar)).await.unwrap();
        let connect = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
        stream.write_all(connect.as_bytes()).await.unwrap();
        let first = read_answers(
            &mut stream,
            Duration::from_millis(300),
            Duration::from_secs(3),
        )
        .await;
        let status = first.finals().first().map(|r| r.status);
        assert!(
            status.is_none_or(is_refusal),
            "{listener:?}: {:?}",
            first.statuses()
        );
        if !first.closed {
            // Whatever follows is HTTP to the sidecar, not bytes to a tunnel.
            let raw = format!(
                "GET {} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
                customers()
            );
            let _ = stream.write_all(raw.as_bytes()).await;
            let _ = read_answers(
                &mut stream,
                Duration::from_millis(300),
                Duration::from_secs(3),
            )
            .await;
        }
    }
    let tunnelled = rutter
        .emulator
        .seen()
        .into_iter()
        .filter(|r| r.method == Method::CONNECT)
        .count();
    assert_eq!(tunnelled, 0);
    assert_eq!(
        rutter.emulator.counters().requests as usize,
        rutter.emulator.seen().len()
    );
    assert_still_up(&sidecar).await;
}

/// Sends a head with `Expect: 100-continue`, waits for the interim 100, then sends the body.
async fn expect_continue(addr: SocketAddr, head: &str, body: &[u8]) -> (bool, Exchange) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    let continued = loop {
        match timeout(Duration::from_secs(2), stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break false,
            Ok(Ok(n)) => {
                got.extend_from_slice(&chunk[..n]);
                if find(&got, b"\r\n\r\n").is_some() {
                    break got.starts_with(b"HTTP/1.1 100");
                }
            }
        }
    };
    if !continued {
        let mut exchange = read_answers(
            &mut stream,
            Duration::from_millis(200),
            Duration::from_secs(2),
        )
        .await;
        if let Some((first, _)) = parse_response(&got, true) {
            exchange.responses.insert(0, first);
        }
        return (false, exchange);
    }
    stream.write_all(body).await.unwrap();
    (
        true,
        read_answers(
            &mut stream,
            Duration::from_millis(200),
            Duration::from_secs(4),
        )
        .await,
    )
}

/// `Expect: 100-continue` on a facade write: the app gets 100, then the job's answer; Rutter never
/// sees `Expect` (the sidecar already holds the body).
#[tokio::test]
async fn expect_100_continue_on_a_facade_write_gets_100_then_the_answer() {
    let (rutter, sidecar) = start(100).await;
    let head = format!(
        "POST /versioned/accounting/invoices?access_token={TOKEN} HTTP/1.1\r\nHost: h\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        INVOICE.len()
    );
    let (continued, outcome) = expect_continue(sidecar.addr, &head, INVOICE.as_bytes()).await;
    assert!(continued, "the interim 100 came first: {outcome:?}");
    let finals = outcome.finals();
    assert_eq!(finals.len(), 1);
    assert_eq!(finals[0].status, 200);
    let json: serde_json::Value = serde_json::from_slice(&finals[0].body).unwrap();
    assert_eq!(json["invoice"]["document_number"], "INV-10042");
    let writes: Vec<_> = rutter
        .emulator
        .seen()
        .into_iter()
        .filter(|r| r.method == Method::POST)
        .collect();
    assert_eq!(writes.len(), 1);
    assert!(
        writes[0].headers.get("expect").is_none(),
        "{:?}",
        writes[0].headers
    );
    assert_eq!(rutter.emulator.counters().writes_accepted, 1);
}

/// `Expect: 100-continue` on a passthrough write and on a webhook: 100, then the answer. A webhook
/// declaring a body over the limit is refused at once, without asking for the body.
#[tokio::test]
async fn expect_100_continue_on_passthrough_writes_and_webhooks() {
    let (rutter, sidecar) = start(50).await;
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\
         Expect: 100-continue\r\n\r\n",
        orders()
    );
    let (continued, outcome) = expect_continue(sidecar.addr, &head, BODY).await;
    assert!(continued, "{outcome:?}");
    assert_eq!(outcome.finals().len(), 1);
    let orders_seen: Vec<_> = rutter
        .emulator
        .seen()
        .into_iter()
        .filter(|r| r.method == Method::POST)
        .collect();
    assert_eq!(orders_seen.len(), 1);
    assert_eq!(orders_seen[0].body, BODY);

    let head = format!(
        "POST /webhooks/rutter HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\n\
         X-Rutter-Signature: {}\r\nContent-Length: 7\r\nExpect: 100-continue\r\n\r\n",
        sign(SECRET.as_bytes(), BODY)
    );
    let (continued, outcome) = expect_continue(sidecar.webhook_addr, &head, BODY).await;
    assert!(continued, "{outcome:?}");
    assert_eq!(outcome.statuses(), [200]);

    let huge = "POST /webhooks/rutter HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\n\
                X-Rutter-Signature: sha256=AAAA\r\nContent-Length: 2097152\r\n\
                Expect: 100-continue\r\n\r\n";
    let (continued, outcome) = expect_continue(sidecar.webhook_addr, huge, b"").await;
    assert!(!continued, "no 100 for a body that will be refused");
    assert_eq!(outcome.finals().first().map(|r| r.status), Some(413));
    assert_still_up(&sidecar).await;
}

/// Trickles `bytes` one at a time, `every` apart, until the sidecar closes the connection or
/// answers; returns how long that took (`None`: still open after `limit`).
async fn trickle(
    addr: SocketAddr,
    prefix: &[u8],
    bytes: &[u8],
    every: Duration,
    limit: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    if !prefix.is_empty() && stream.write_all(prefix).await.is_err() {
        return Some(started.elapsed());
    }
    let mut chunk = [0u8; 1024];
    let mut next = bytes.iter().cycle();
    while started.elapsed() < limit {
        tokio::select! {
            read = stream.read(&mut chunk) => {
                // Closed, reset, or answered (a 408 or 400): the sidecar has dealt with it.
                let _ = read;
                return Some(started.elapsed());
            }
            () = sleep(every) => {
                let byte = [*next.next().unwrap_or(&b'x')];
                if stream.write_all(&byte).await.is_err() {
                    return Some(started.elapsed());
                }
            }
        }
    }
    None
}

/// Slowloris: clients trickling a request head a byte at a time are cut off after
/// `listen.idle_timeout` on every listener, while other clients are served meanwhile.
#[tokio::test]
async fn slowloris_heads_are_cut_after_the_idle_timeout_while_others_are_served() {
    let (_rutter, sidecar) = start(50).await;
    let limit = IDLE * 3;
    let mut tricklers = Vec::new();
    for listener in [Listener::Proxy, Listener::Webhooks, Listener::Admin] {
        for _ in 0..5 {
            let addr = listener.addr(&sidecar);
            let line = format!("GET {} HTTP/1.1\r\nHost: h\r\nX-Slow: ", listener.target());
            tricklers.push(tokio::spawn(async move {
                let cut = trickle(
                    addr,
                    line.as_bytes(),
                    b"abcdefgh",
                    Duration::from_millis(150),
                    limit,
                )
                .await;
                (listener, cut)
            }));
        }
    }
    // Meanwhile, everybody else is served promptly.
    sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    assert_still_up(&sidecar).await;
    assert!(
        started.elapsed() < Duration::from_millis(800),
        "{:?}",
        started.elapsed()
    );
    for trickler in tricklers {
        let (listener, cut) = trickler.await.unwrap();
        let cut = cut.unwrap_or_else(|| {
            panic!("{listener:?}: a trickled head was still open after {limit:?}")
        });
        assert!(
            cut >= IDLE - Duration::from_millis(100),
            "{listener:?}: cut early, {cut:?}"
        );
    }
    assert_still_up(&sidecar).await;
}

/// A connection that never sends a byte holds a slot too: it is closed after `listen.idle_timeout`
/// ("how long a connection may take to send a request head").
#[tokio::test]
async fn silent_connections_are_closed_after_the_idle_timeout() {
    let (_rutter, sidecar) = start(50).await;
    let limit = IDLE * 3;
    // Every listener, both ways at once: nothing at all, and a partial HTTP/2 preface, stalled.
    let mut probes = Vec::new();
    for listener in [Listener::Proxy, Listener::Webhooks, Listener::Admin] {
        for (what, prefix) in [
            ("a silent connection", &b""[..]),
            ("a stalled HTTP/2 preface", &b"PRI * HTTP/2.0\r\n"[..]),
        ] {
            let addr = listener.addr(&sidecar);
            probes.push(tokio::spawn(async move {
                let mut stream = TcpStream::connect(addr).await.unwrap();
                stream.write_all(prefix).await.unwrap();
                let started = Instant::now();
                let mut buf = [0u8; 64];
                let closed = timeout(limit, stream.read(&mut buf)).await.is_ok();
                (!closed)
                    .then(|| format!("{listener:?}: {what} was still open after {limit:?}"))
                    .or_else(|| {
                        (started.elapsed() < IDLE - Duration::from_millis(100))
                            .then(|| format!("{listener:?}: {what} was closed early"))
                    })
            }));
        }
    }
    let mut failures = Vec::new();
    for probe in probes {
        failures.extend(probe.await.unwrap());
    }
    assert_still_up(&sidecar).await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A keep-alive connection left idle after an answer is closed after `listen.idle_timeout`.
#[tokio::test]
async fn idle_keep_alive_connections_are_closed_after_the_idle_timeout() {
    let (_rutter, sidecar) = start(50).await;
    for listener in [Listener::Proxy, Listener::Admin] {
        let target = if listener == Listener::Proxy {
            customers()
        } else {
            "/live".into()
        };
        let mut stream = TcpStream::connect(listener.addr(&sidecar)).await.unwrap();
        let request = format!("GET {target} HTTP/1.1\r\nHost: h\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let outcome = read_answers(&mut stream, IDLE * 3, IDLE * 3).await;
        assert_eq!(outcome.statuses(), [200], "{listener:?}");
        assert!(
            outcome.closed,
            "{listener:?}: an idle keep-alive connection stayed open"
        );
    }
}

/// A request body trickled a byte at a time (the head complete) is not read forever: on the facade
/// (buffered within `listen.idle_timeout`), on a passthrough write (bounded by
/// `upstream.request_timeout`) and on the internet-facing webhook listener (DESIGN §10: every wait
/// is bounded; the facade's own rule is `listen.idle_timeout`).
#[tokio::test]
async fn trickled_request_bodies_are_cut_off() {
    let (rutter, sidecar) = start(50).await;
    let limit = IDLE * 4;
    let cases = [
        (
            "facade",
            sidecar.addr,
            format!(
                "POST /versioned/accounting/invoices?access_token={TOKEN} HTTP/1.1\r\nHost: h\r\n\
                 Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{{"
            ),
        ),
        (
            "passthrough",
            sidecar.addr,
            format!(
                "POST {} HTTP/1.1\r\nHost: h\r\nContent-Type: text/plain\r\n\
                 Content-Length: 100000\r\n\r\nx",
                orders()
            ),
        ),
        (
            "webhook",
            sidecar.webhook_addr,
            "POST /webhooks/rutter HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\n\
             X-Rutter-Signature: sha256=AAAA\r\nContent-Length: 100000\r\n\r\n{"
                .to_string(),
        ),
        (
            "webhook-chunked",
            sidecar.webhook_addr,
            "POST /webhooks/rutter HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\n\
             X-Rutter-Signature: sha256=AAAA\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n{\r\n"
                .to_string(),
        ),
    ];
    let trickles: Vec<_> = cases
        .into_iter()
        .map(|(name, addr, head)| {
            tokio::spawn(async move {
                let chunked = name == "webhook-chunked";
                let filler: &[u8] = if chunked { b"1\r\nx\r\n" } else { b"x" };
                let every = Duration::from_millis(if chunked { 40 } else { 150 });
                match trickle(addr, head.as_bytes(), filler, every, limit).await {
                    Some(cut) if cut < Duration::from_millis(500) => {
                        Some(format!("{name}: cut after only {cut:?}"))
                    }
                    Some(_) => None,
                    None => Some(format!(
                        "{name}: a trickled body was still being read after {limit:?}"
                    )),
                }
            })
        })
        .collect();
    let mut failures = Vec::new();
    for trickle in trickles {
        failures.extend(trickle.await.unwrap());
    }
    assert_eq!(rutter.emulator.counters().writes_accepted, 0);
    assert!(
        rutter.emulator.seen().is_empty(),
        "no body was ever complete"
    );
    assert_still_up(&sidecar).await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
