//! Requests that are not job-backed: list pages with cursors (and padded, streamed large pages),
//! entity reads, synchronous writes, and the connection endpoints.

use bytes::Bytes;
use http::{header, HeaderValue, Method, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use serde_json::{json, Map, Value};

use super::entities::{self, entity_fields, Effect};
use super::handler::Ctx;
use super::state::{inc, lock, Shared};
use super::wire::{self, bad_request, json_response, not_found, query_last};
use crate::body::{Body, BoxError};

/// Default and largest `limit` of list endpoints.
const DEFAULT_LIMIT: usize = 50;
const MAX_LIMIT: usize = 500;

/// Requests that are not job-backed: lists, entity reads, synchronous writes, connections.
pub(crate) fn direct_request(shared: &Shared, ctx: &Ctx) -> Response<Body> {
    let segments: Vec<&str> = ctx.segments.iter().map(String::as_str).collect();
    let n = segments.len();
    let Some(last) = segments.last().copied().filter(|s| !s.is_empty()) else {
        return not_found("endpoint not implemented");
    };
    let now = wire::iso8601(wire::now_ms());
    match ctx.method {
        Method::GET if entities::is_collection(last) => list(shared, ctx, &segments.join("/")),
        Method::GET if n >= 2 => {
            let key = segments[..n - 1].join("/");
            match lock(&shared.entities).get(&key, last, ctx.token()) {
                Some(entity) => json_response(StatusCode::OK, &entities::wrap(&key, entity)),
                None => not_found("no entity with this id"),
            }
        }
        Method::POST if segments == ["item", "public_token", "exchange"] => {
            let connection_id = shared.new_uuid();
            let access_token = shared.new_uuid();
            store_connection(shared, &connection_id, &access_token, &now);
            json_response(
                StatusCode::OK,
                &json!({ "access_token": access_token, "connection_id": connection_id,
                         "is_ready": true, "platform": "QUICKBOOKS" }),
            )
        }
        Method::POST if segments == ["connections", "create"] => {
            let connection_id = shared.new_uuid();
            let access_token = shared.new_uuid();
            let connection = store_connection(shared, &connection_id, &access_token, &now);
            json_response(StatusCode::OK, &json!({ "connection": connection }))
        }
        Method::POST if entities::is_collection(last) => {
            let Some(body) = json_object(&ctx.body) else {
                return bad_request("INVALID_INPUT", "the request body must be a JSON object");
            };
            let key = segments.join("/");
            let fields = entity_fields(&body, &entities::singular(last));
            let parent = (n >= 3).then(|| (segments[n - 3], segments[n - 2]));
            let entity = entities::created_entity(
                &key,
                &fields,
                shared.new_uuid(),
                shared.next_platform_id(),
                parent,
                &now,
            );
            lock(&shared.entities).apply(Effect::Upsert {
                key: key.clone(),
                entity: entity.clone(),
                owner: ctx.access_token.clone(),
            });
            json_response(StatusCode::OK, &entities::wrap(&key, entity))
        }
        Method::PATCH | Method::PUT if n >= 2 && !entities::is_collection(last) => {
            let Some(body) = json_object(&ctx.body) else {
                return bad_request("INVALID_INPUT", "the request body must be a JSON object");
            };
            let key = segments[..n - 1].join("/");
            let fields = entity_fields(&body, &entities::singular(segments[n - 2]));
            let mut store = lock(&shared.entities);
            let Some(current) = store.get(&key, last, ctx.token()) else {
                return not_found("no entity with this id");
            };
            let entity = entities::updated_entity(current, &fields, &now);
            store.apply(Effect::Upsert {
                key: key.clone(),
                entity: entity.clone(),
                owner: ctx.access_token.clone(),
            });
            json_response(StatusCode::OK, &entities::wrap(&key, entity))
        }
        Method::DELETE if n >= 2 && !entities::is_collection(last) => {
            let key = segments[..n - 1].join("/");
            let mut store = lock(&shared.entities);
            if store.get(&key, last, ctx.token()).is_none() {
                return not_found("no entity with this id");
            }
            store.apply(Effect::Delete {
                key: key.clone(),
                id: last.to_string(),
            });
            json_response(StatusCode::OK, &entities::deletion_body(&key, last))
        }
        _ => not_found("endpoint not implemented"),
    }
}

fn json_object(bytes: &Bytes) -> Option<Value> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(value @ Value::Object(_)) => Some(value),
        _ => None,
    }
}

fn store_connection(shared: &Shared, id: &str, access_token: &str, now: &str) -> Value {
    let mut connection = Map::new();
    connection.insert("id".into(), json!(id));
    connection.insert("access_token".into(), json!(access_token));
    connection.insert("platform".into(), json!("QUICKBOOKS"));
    connection.insert(
        "link_url".into(),
        json!(format!("https://link.rutterapi.com/connection/{id}")),
    );
    connection.insert("created_at".into(), json!(now));
    connection.insert("updated_at".into(), json!(now));
    lock(&shared.entities).apply(Effect::Upsert {
        key: "connections".into(),
        entity: connection.clone(),
        owner: None,
    });
    Value::Object(connection)
}

/// `GET /<resource>`: a page with `next_cursor`.
fn list(shared: &Shared, ctx: &Ctx, key: &str) -> Response<Body> {
    inc(&shared.counters.list_requests);
    let limit = match query_last(ctx.query.as_deref(), "limit") {
        None => DEFAULT_LIMIT,
        Some(text) => match text.trim().parse::<usize>() {
            Ok(n) if n >= 1 => n.min(MAX_LIMIT),
            _ => return bad_request("INVALID_INPUT", "limit must be a positive integer"),
        },
    };
    let cursor = match query_last(ctx.query.as_deref(), "cursor").filter(|c| !c.is_empty()) {
        None => None,
        Some(text) => match entities::decode_cursor(&text) {
            Some(cursor) => Some(cursor),
            None => return bad_request("INVALID_CURSOR", "cursor is not a next_cursor value"),
        },
    };
    let page = lock(&shared.entities).page(key, ctx.token(), cursor, limit);
    let plural = entities::plural_of(key);
    match ctx.knobs.body_bytes {
        Some(target) => padded_list(plural, page, target),
        None => {
            let mut body = Map::new();
            body.insert(plural.into(), Value::Array(page.items));
            body.insert(
                "next_cursor".into(),
                page.next_cursor.map(Value::String).unwrap_or(Value::Null),
            );
            json_response(StatusCode::OK, &Value::Object(body))
        }
    }
}

/// Bytes of padding produced per body chunk.
const PAD_CHUNK: usize = 64 * 1024;

/// A list page streamed in chunks and padded with generated entities until the body has at least
/// `target` bytes.
fn padded_list(plural: &str, page: entities::Page, target: usize) -> Response<Body> {
    let mut head = Vec::new();
    head.extend_from_slice(b"{");
    head.extend_from_slice(serde_json::to_string(plural).unwrap_or_default().as_bytes());
    head.extend_from_slice(b":[");
    let mut first = true;
    for item in &page.items {
        if !first {
            head.push(b',');
        }
        first = false;
        head.extend_from_slice(&serde_json::to_vec(item).unwrap_or_default());
    }
    let cursor = serde_json::to_string(&page.next_cursor).unwrap_or_else(|_| "null".into());
    let tail = format!("],\"next_cursor\":{cursor}}}");
    let singular = entities::singular(plural);
    // State: (bytes written so far, next padding index, whether an item precedes, stage).
    let state = (head.len(), 0u64, !first, 0u8, Some(Bytes::from(head)));
    let stream = futures_util::stream::unfold(
        state,
        move |(written, index, mut comma, stage, head)| {
            let tail = tail.clone();
            let singular = singular.clone();
            async move {
                if let Some(head) = head {
                    return Some((
                        Ok::<_, BoxError>(Frame::data(head)),
                        (written, index, comma, stage, None),
                    ));
                }
                match stage {
                    0 if written + tail.len() < target => {
                        let mut chunk = String::with_capacity(PAD_CHUNK + 256);
                        let mut i = index;
                        while chunk.len() < PAD_CHUNK && written + chunk.len() + tail.len() < target
                        {
                            if comma {
                                chunk.push(',');
                            }
                            comma = true;
                            chunk.push_str(&format!(
                            "{{\"id\":\"00000000-0000-4000-8000-{i:012}\",\"platform_id\":\"pad-{i}\",\"name\":\"padding {singular} {i}\",\"padding\":true}}"
                        ));
                            i += 1;
                        }
                        let len = chunk.len();
                        Some((
                            Ok(Frame::data(Bytes::from(chunk))),
                            (written + len, i, comma, 0, None),
                        ))
                    }
                    0 | 1 => Some((
                        Ok(Frame::data(Bytes::from(tail))),
                        (written, index, comma, 2, None),
                    )),
                    _ => None,
                }
            }
        },
    );
    let mut response = Response::new(StreamBody::new(stream).boxed_unsync());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    response
}
