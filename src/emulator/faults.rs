//! Answer faults: what happens to an answer after the emulator built it. The body can be cut short
//! (the full `Content-Length` is announced, then the connection is closed after N bytes), dripped in
//! small chunks, or sent normally and followed by closing the connection (without
//! `Connection: close`, so a client that pools it finds it closed when it reuses it). They come from
//! the `X-Emulator-Truncate`, `-Drip-Ms`, `-Drip-Bytes` and `-Close` headers, or from a scripted
//! poll fault (`X-Emulator-Poll-Faults`), which travels to the handler as a response extension.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use futures_util::StreamExt as _;
use http::{header, HeaderValue, Response};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use tokio::sync::Notify;

use crate::body::{Body, BoxError};

/// How long the emulator pauses before failing a truncated body, so that the bytes already
/// written reach the client before the connection closes.
const FLUSH_PAUSE: Duration = Duration::from_millis(10);

/// Sending the body in chunks of `bytes`, `every_ms` apart (the first one at once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Drip {
    /// Milliseconds between two chunks.
    pub every_ms: u64,
    /// Bytes per chunk (at least 1).
    pub bytes: usize,
}

/// The faults one answer gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct AnswerFaults {
    /// Close the connection (HTTP/2: reset the stream) instead of answering.
    pub reset: bool,
    /// Announce the full `Content-Length` but close the connection (HTTP/2: reset the stream)
    /// after this many body bytes; no effect when the body is not longer.
    pub truncate: Option<usize>,
    /// Send the body in small chunks, some time apart.
    pub drip: Option<Drip>,
    /// Close the connection right after this answer (HTTP/2: shut it down with GOAWAY).
    pub close: bool,
    /// Keep the connection open, but close it without an answer when the next request arrives on
    /// it (HTTP/2: reset that stream): the race of a server closing an idle keep-alive connection
    /// just as the client reuses it.
    pub close_next: bool,
    /// Wait this long before answering (on top of `--slow-ms` and `X-Emulator-Delay-Ms`).
    pub delay_ms: u64,
}

impl AnswerFaults {
    /// No fault at all.
    pub(crate) fn is_none(&self) -> bool {
        *self == AnswerFaults::default()
    }

    /// Both sets of faults (the first truncation and drip win).
    pub(crate) fn merge(self, other: AnswerFaults) -> AnswerFaults {
        AnswerFaults {
            reset: self.reset || other.reset,
            truncate: self.truncate.or(other.truncate),
            drip: self.drip.or(other.drip),
            close: self.close || other.close,
            close_next: self.close_next || other.close_next,
            delay_ms: self.delay_ms.saturating_add(other.delay_ms),
        }
    }
}

/// Asks the connection an answer belongs to to close once that answer is under way. One per
/// connection; the connection task waits on it and shuts the connection down gracefully, which
/// (the response head being already written) closes it right after the answer without adding
/// `Connection: close`.
/// It also carries the "close when the next request arrives" mark.
#[derive(Debug, Default)]
pub(crate) struct CloseSignal {
    now: Notify,
    next: AtomicBool,
}

impl CloseSignal {
    /// Asks for the close (remembered if the connection task is not waiting yet).
    pub(crate) fn close(&self) {
        self.now.notify_one();
    }

    /// Resolves once a close was asked for.
    pub(crate) async fn requested(&self) {
        self.now.notified().await;
    }

    /// Marks the connection: its next request is dropped with the connection.
    pub(crate) fn close_on_next_request(&self) {
        self.next.store(true, Ordering::SeqCst);
    }

    /// Whether this request must be dropped with the connection (clears the mark).
    pub(crate) fn take_next_request(&self) -> bool {
        self.next.swap(false, Ordering::SeqCst)
    }
}

/// Applies the body faults (`truncate`, `drip`, `close`) to `response`; `reset` and `delay_ms`
/// are the handler's. Returns the response unchanged when there are none. Returns `None` when the
/// body could not be read (it is then answered with a reset).
pub(crate) async fn apply(
    response: Response<Body>,
    faults: AnswerFaults,
    close: &Arc<CloseSignal>,
) -> Option<(Response<Body>, bool)> {
    if faults.truncate.is_none() && faults.drip.is_none() && !faults.close {
        return Some((response, false));
    }
    let (mut parts, body) = response.into_parts();
    let bytes = body.collect().await.ok()?.to_bytes();
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    let truncated = faults.truncate.filter(|&n| n < bytes.len());
    let sent = bytes.slice(..truncated.unwrap_or(bytes.len()));
    let chunk = faults.drip.map_or(sent.len().max(1), |d| d.bytes.max(1));
    let chunks: Vec<Bytes> = (0..sent.len())
        .step_by(chunk)
        .map(|start| sent.slice(start..(start + chunk).min(sent.len())))
        .collect();
    let every = Duration::from_millis(faults.drip.map_or(0, |d| d.every_ms));
    let frames = stream::iter(chunks.into_iter().enumerate()).then(move |(i, chunk)| async move {
        if i > 0 && !every.is_zero() {
            tokio::time::sleep(every).await;
        }
        Ok::<_, BoxError>(Frame::data(chunk))
    });
    let cut = stream::iter(truncated.map(|_| ())).then(|()| async {
        // Let the bytes already written leave before the connection is torn down.
        tokio::time::sleep(FLUSH_PAUSE).await;
        Err::<Frame<Bytes>, BoxError>("answer truncated on purpose by the emulator".into())
    });
    let body = StreamBody::new(Box::pin(frames.chain(cut)));
    let body = if faults.close {
        CloseAfter::new(body, Arc::clone(close)).boxed_unsync()
    } else {
        body.boxed_unsync()
    };
    Some((Response::from_parts(parts, body), truncated.is_some()))
}

/// A body that asks its connection to close as soon as it is first polled (the response head has
/// then been written) or dropped, whichever comes first.
struct CloseAfter<B> {
    inner: B,
    signal: Option<Arc<CloseSignal>>,
}

impl<B> CloseAfter<B> {
    fn new(inner: B, signal: Arc<CloseSignal>) -> Self {
        CloseAfter {
            inner,
            signal: Some(signal),
        }
    }

    fn fire(&mut self) {
        if let Some(signal) = self.signal.take() {
            signal.close();
        }
    }
}

impl<B> Drop for CloseAfter<B> {
    fn drop(&mut self) {
        self.fire();
    }
}

impl<B> http_body::Body for CloseAfter<B>
where
    B: http_body::Body + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.fire();
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
