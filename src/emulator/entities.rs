//! The emulator's data: seeded and created entities per resource, list pages with opaque cursors, and
//! the shapes of entity, deletion and report bodies.
//!
//! A resource is keyed by its path segments below `/versioned` (e.g. `accounting/invoices`,
//! `accounting/invoices/<id>/attachments`). Every resource starts with `seed_entities` deterministic
//! entities that every connection sees; entities created through the API are visible only to the
//! `access_token` that created them (or to everyone when it had none). Resources are materialised
//! (seeds copied into storage) only when first written, so reads of arbitrary paths cost no memory.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};

use base64::Engine as _;
use serde_json::{json, Map, Value};

use super::wire::iso8601;

/// Most resources kept in storage; writes to further resources are answered but not stored.
const MAX_RESOURCES: usize = 4096;
/// Most entities kept per resource; the oldest are dropped beyond it.
const MAX_ENTITIES_PER_RESOURCE: usize = 100_000;
/// Creation time of the first seeded entity (2026-01-01T00:00:00Z); the others follow a minute apart.
const SEED_EPOCH_MS: u64 = 1_767_225_600_000;

/// `invoices` → `invoice`, `journal_entries` → `journal_entry`, `classes` → `class`.
pub(crate) fn singular(plural: &str) -> String {
    if let Some(stem) = plural.strip_suffix("ies") {
        format!("{stem}y")
    } else if ["sses", "xes", "ches", "shes"]
        .iter()
        .any(|s| plural.ends_with(s))
    {
        plural[..plural.len() - 2].to_string()
    } else if let Some(stem) = plural.strip_suffix('s') {
        stem.to_string()
    } else {
        plural.to_string()
    }
}

/// Whether a path segment names a collection (lowercase letters and `_`, plural) rather than an id.
pub(crate) fn is_collection(segment: &str) -> bool {
    segment.len() > 1
        && segment.ends_with('s')
        && segment.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
}

/// The last segment of a resource key.
pub(crate) fn plural_of(key: &str) -> &str {
    key.rsplit('/').next().unwrap_or(key)
}

/// A deterministic UUID (v4-shaped) derived from `parts`.
pub(crate) fn stable_uuid(parts: &[&str]) -> String {
    let mut bytes = [0u8; 16];
    for (half, chunk) in bytes.chunks_mut(8).enumerate() {
        let mut hasher = DefaultHasher::new();
        half.hash(&mut hasher);
        parts.hash(&mut hasher);
        chunk.copy_from_slice(&hasher.finish().to_be_bytes());
    }
    uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .to_string()
}

/// Seeded entity number `index` of resource `key`.
pub(crate) fn seed_entity(key: &str, index: usize) -> Map<String, Value> {
    let plural = plural_of(key);
    let name = singular(plural);
    let id = stable_uuid(&[key, &index.to_string()]);
    let at = iso8601(SEED_EPOCH_MS + index as u64 * 60_000);
    let mut entity = Map::new();
    entity.insert("id".into(), Value::String(id));
    entity.insert(
        "platform_id".into(),
        Value::String(format!("{}", 100 + index)),
    );
    match plural {
        "invoices" | "bills" | "invoice_credit_memos" | "bill_credit_memos" => {
            let prefix = if plural.starts_with("invoice") {
                "INV"
            } else {
                "BILL"
            };
            let counterpart = if plural.starts_with("invoice") {
                "customer_id"
            } else {
                "vendor_id"
            };
            let amount = 100.0 + index as f64 * 10.5;
            entity.insert(
                counterpart.into(),
                Value::String(stable_uuid(&[counterpart, &index.to_string()])),
            );
            entity.insert(
                "document_number".into(),
                json!(format!("{prefix}-{}", 1001 + index)),
            );
            entity.insert(
                "status".into(),
                json!(if index.is_multiple_of(2) {
                    "open"
                } else {
                    "paid"
                }),
            );
            entity.insert("currency_code".into(), json!("USD"));
            entity.insert("total_amount".into(), json!(amount));
            entity.insert(
                "amount_due".into(),
                json!(if index.is_multiple_of(2) { amount } else { 0.0 }),
            );
        }
        _ => {
            entity.insert(
                "name".into(),
                json!(format!("Seeded {} {}", name.replace('_', " "), index + 1)),
            );
            entity.insert("status".into(), json!("active"));
        }
    }
    entity.insert("created_at".into(), json!(at));
    entity.insert("updated_at".into(), json!(at));
    entity
}

/// The entity a create request produces: `id` and `platform_id` first, then the sent fields, then
/// defaults (`status`, totals) and timestamps.
pub(crate) fn created_entity(
    key: &str,
    fields: &Map<String, Value>,
    id: String,
    platform_id: String,
    parent: Option<(&str, &str)>,
    now: &str,
) -> Map<String, Value> {
    let plural = plural_of(key);
    let mut entity = Map::new();
    entity.insert("id".into(), Value::String(id));
    entity.insert("platform_id".into(), Value::String(platform_id));
    if let Some((parent_plural, parent_id)) = parent {
        if plural == "attachments" {
            entity.insert("attached_to_id".into(), json!(parent_id));
            entity.insert("attached_to_type".into(), json!(singular(parent_plural)));
        } else {
            entity.insert(format!("{}_id", singular(parent_plural)), json!(parent_id));
        }
    }
    for (name, value) in fields {
        if !matches!(
            name.as_str(),
            "id" | "platform_id" | "created_at" | "updated_at" | "response_mode"
        ) {
            entity.insert(name.clone(), value.clone());
        }
    }
    if matches!(
        plural,
        "invoices" | "bills" | "invoice_credit_memos" | "bill_credit_memos"
    ) {
        if !entity.contains_key("total_amount") {
            if let Some(total) = line_total(fields) {
                entity.insert("total_amount".into(), json!(total));
            }
        }
        if !entity.contains_key("amount_due") {
            if let Some(total) = entity.get("total_amount").cloned() {
                entity.insert("amount_due".into(), total);
            }
        }
    }
    if plural == "attachments" && !entity.contains_key("file_name") {
        entity.insert("file_name".into(), json!("attachment.pdf"));
    }
    if !entity.contains_key("status") {
        let status = match plural {
            "invoices"
            | "bills"
            | "invoice_credit_memos"
            | "bill_credit_memos"
            | "purchase_orders"
            | "sales_orders" => "open",
            "fulfillments" => "fulfilled",
            _ => "active",
        };
        entity.insert("status".into(), json!(status));
    }
    entity.insert("created_at".into(), json!(now));
    entity.insert("updated_at".into(), json!(now));
    entity
}

fn line_total(fields: &Map<String, Value>) -> Option<f64> {
    let lines = fields.get("line_items")?.as_array()?;
    let mut total = 0.0;
    for line in lines {
        total += line
            .get("total_amount")
            .and_then(Value::as_f64)
            .or_else(|| {
                let quantity = line.get("quantity").and_then(Value::as_f64)?;
                let unit = line.get("unit_amount").and_then(Value::as_f64)?;
                Some(quantity * unit)
            })?;
    }
    Some(total)
}

/// The fields of the entity in a write body: `body["<singular>"]` if it is an object, else the
/// whole body without `response_mode`.
pub(crate) fn entity_fields(body: &Value, singular: &str) -> Map<String, Value> {
    match body.get(singular) {
        Some(Value::Object(fields)) => fields.clone(),
        _ => match body {
            Value::Object(map) => map
                .iter()
                .filter(|(k, _)| *k != "response_mode")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            _ => Map::new(),
        },
    }
}

/// `current` with `fields` applied (ids and creation time kept) and a fresh `updated_at`.
pub(crate) fn updated_entity(
    mut current: Map<String, Value>,
    fields: &Map<String, Value>,
    now: &str,
) -> Map<String, Value> {
    for (name, value) in fields {
        if !matches!(
            name.as_str(),
            "id" | "platform_id" | "created_at" | "updated_at" | "response_mode"
        ) {
            current.insert(name.clone(), value.clone());
        }
    }
    current.insert("updated_at".into(), json!(now));
    current
}

/// The body of a deletion: `{"<singular>": {"id": ..., "deleted": true}}`.
pub(crate) fn deletion_body(key: &str, id: &str) -> Value {
    let mut inner = Map::new();
    inner.insert("id".into(), json!(id));
    inner.insert("deleted".into(), json!(true));
    let mut outer = Map::new();
    outer.insert(singular(plural_of(key)), Value::Object(inner));
    Value::Object(outer)
}

/// `{"<singular>": entity}`.
pub(crate) fn wrap(key: &str, entity: Map<String, Value>) -> Value {
    let mut outer = Map::new();
    outer.insert(singular(plural_of(key)), Value::Object(entity));
    Value::Object(outer)
}

/// A plausible body for the three report GETs (and any other report-like path).
pub(crate) fn report_body(plural: &str, id: &str, start: &str, end: &str) -> Value {
    let mut report = Map::new();
    report.insert("id".into(), json!(id));
    report.insert("start_date".into(), json!(start));
    report.insert("end_date".into(), json!(end));
    report.insert("currency_code".into(), json!("USD"));
    let extra = match plural {
        "balance_sheets" => json!({
            "total_assets": 125000.0, "total_liabilities": 40000.0, "total_equity": 85000.0,
            "assets": [{ "name": "Cash", "value": 25000.0 }, { "name": "Accounts receivable", "value": 100000.0 }],
            "liabilities": [{ "name": "Accounts payable", "value": 40000.0 }],
            "equity": [{ "name": "Retained earnings", "value": 85000.0 }]
        }),
        "income_statements" => json!({
            "total_income": 98000.0, "total_cost_of_sales": 31000.0, "total_operating_expenses": 42000.0,
            "net_income": 25000.0,
            "income": [{ "name": "Sales", "value": 98000.0 }],
            "expenses": [{ "name": "Rent", "value": 12000.0 }, { "name": "Payroll", "value": 30000.0 }]
        }),
        "cash_flow_statements" => json!({
            "starting_balance": 18000.0, "ending_balance": 25000.0,
            "total_operating": 9000.0, "total_investing": -4000.0, "total_financing": 2000.0
        }),
        _ => json!({}),
    };
    if let Value::Object(extra) = extra {
        report.extend(extra);
    }
    let mut body = Map::new();
    body.insert(plural.into(), Value::Array(vec![Value::Object(report)]));
    body.insert("next_cursor".into(), Value::Null);
    Value::Object(body)
}

/// Encodes a list cursor: the offset and id of the next entity, base64 (opaque to clients).
pub(crate) fn encode_cursor(offset: usize, id: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{offset}|{id}"))
}

/// Decodes [`encode_cursor`]'s output; `None` if it is not one.
pub(crate) fn decode_cursor(cursor: &str) -> Option<(usize, String)> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(cursor.trim())
        .ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let (offset, id) = text.split_once('|')?;
    Some((offset.parse().ok()?, id.to_string()))
}

/// What a store write does (applied when a job succeeds, or at once for synchronous writes).
#[derive(Debug, Clone)]
pub(crate) enum Effect {
    /// Insert or replace the entity with this `id` in resource `key`.
    Upsert {
        /// Resource key.
        key: String,
        /// The entity (has an `id`).
        entity: Map<String, Value>,
        /// The creating `access_token`.
        owner: Option<String>,
    },
    /// Remove the entity `id` from resource `key`.
    Delete {
        /// Resource key.
        key: String,
        /// Entity id.
        id: String,
    },
}

#[derive(Debug, Clone)]
struct Stored {
    entity: Map<String, Value>,
    owner: Option<String>,
}

impl Stored {
    fn id(&self) -> &str {
        self.entity.get("id").and_then(Value::as_str).unwrap_or("")
    }

    fn visible_to(&self, token: Option<&str>) -> bool {
        self.owner.is_none() || self.owner.as_deref() == token
    }
}

/// One page of a list.
#[derive(Debug)]
pub(crate) struct Page {
    /// The entities on this page.
    pub items: Vec<Value>,
    /// The cursor of the next page, if any.
    pub next_cursor: Option<String>,
}

/// Every resource's entities.
#[derive(Debug)]
pub(crate) struct EntityStore {
    seed_count: usize,
    resources: HashMap<String, VecDeque<Stored>>,
}

impl EntityStore {
    /// A store whose resources start with `seed_count` entities each.
    pub(crate) fn new(seed_count: usize) -> Self {
        EntityStore {
            seed_count,
            resources: HashMap::new(),
        }
    }

    fn materialise(&mut self, key: &str) -> Option<&mut VecDeque<Stored>> {
        if !self.resources.contains_key(key) {
            if self.resources.len() >= MAX_RESOURCES {
                return None;
            }
            let seeds = (0..self.seed_count)
                .map(|i| Stored {
                    entity: seed_entity(key, i),
                    owner: None,
                })
                .collect();
            self.resources.insert(key.to_string(), seeds);
        }
        self.resources.get_mut(key)
    }

    /// The entity `id` of resource `key`, if `token` may see it.
    pub(crate) fn get(
        &self,
        key: &str,
        id: &str,
        token: Option<&str>,
    ) -> Option<Map<String, Value>> {
        match self.resources.get(key) {
            Some(items) => items
                .iter()
                .find(|s| s.id() == id && s.visible_to(token))
                .map(|s| s.entity.clone()),
            None => (0..self.seed_count)
                .map(|i| seed_entity(key, i))
                .find(|e| e.get("id").and_then(Value::as_str) == Some(id)),
        }
    }

    /// The id of the connection minted with `access_token` (`/item/public_token/exchange`,
    /// `/connections/create`), if there is one.
    pub(crate) fn connection_id_for(&self, access_token: &str) -> Option<String> {
        self.resources
            .get("connections")?
            .iter()
            .find(|s| s.entity.get("access_token").and_then(Value::as_str) == Some(access_token))
            .map(|s| s.id().to_string())
    }

    /// Applies a write.
    pub(crate) fn apply(&mut self, effect: Effect) {
        match effect {
            Effect::Upsert { key, entity, owner } => {
                let Some(items) = self.materialise(&key) else {
                    return;
                };
                let id = entity
                    .get("id")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                if let Some(existing) = items.iter_mut().find(|s| s.id() == id) {
                    existing.entity = entity;
                } else {
                    if items.len() >= MAX_ENTITIES_PER_RESOURCE {
                        items.pop_front();
                    }
                    items.push_back(Stored { entity, owner });
                }
            }
            Effect::Delete { key, id } => {
                if let Some(items) = self.materialise(&key) {
                    items.retain(|s| s.id() != id);
                }
            }
        }
    }

    /// A page of at most `limit` entities visible to `token`, starting at `cursor`.
    pub(crate) fn page(
        &self,
        key: &str,
        token: Option<&str>,
        cursor: Option<(usize, String)>,
        limit: usize,
    ) -> Page {
        match self.resources.get(key) {
            Some(items) => {
                let visible: Vec<&Stored> = items.iter().filter(|s| s.visible_to(token)).collect();
                let start = match cursor {
                    None => 0,
                    Some((offset, id)) => {
                        if visible.get(offset).is_some_and(|s| s.id() == id) {
                            offset
                        } else {
                            visible.iter().position(|s| s.id() == id).unwrap_or(offset)
                        }
                    }
                };
                let end = start.saturating_add(limit).min(visible.len());
                let items = visible
                    .get(start..end)
                    .unwrap_or(&[])
                    .iter()
                    .map(|s| Value::Object(s.entity.clone()))
                    .collect();
                let next_cursor = visible.get(end).map(|s| encode_cursor(end, s.id()));
                Page { items, next_cursor }
            }
            None => {
                let start = cursor
                    .map(|(offset, _)| offset)
                    .unwrap_or(0)
                    .min(self.seed_count);
                let end = start.saturating_add(limit).min(self.seed_count);
                let items = (start..end)
                    .map(|i| Value::Object(seed_entity(key, i)))
                    .collect();
                let next_cursor = (end < self.seed_count).then(|| {
                    let next = seed_entity(key, end);
                    encode_cursor(end, next.get("id").and_then(Value::as_str).unwrap_or(""))
                });
                Page { items, next_cursor }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn singulars() {
        for (plural, one) in [
            ("invoices", "invoice"),
            ("journal_entries", "journal_entry"),
            ("classes", "class"),
            ("accounts", "account"),
            ("tax_rates", "tax_rate"),
            ("bank_deposits", "bank_deposit"),
            ("products", "product"),
            ("fulfillments", "fulfillment"),
            ("addresses", "address"),
            ("balance_sheets", "balance_sheet"),
        ] {
            assert_eq!(singular(plural), one);
        }
        assert!(is_collection("invoices"));
        assert!(!is_collection("3446b185-117f"));
        assert!(!is_collection("abc"));
    }

    #[test]
    fn cursors_round_trip_and_pages_cover_everything() {
        assert_eq!(
            decode_cursor(&encode_cursor(7, "x-y")),
            Some((7, "x-y".into()))
        );
        assert_eq!(decode_cursor("!!!"), None);
        let mut store = EntityStore::new(5);
        let first = store.page("accounting/invoices", None, None, 2);
        assert_eq!(first.items.len(), 2);
        let cursor = first.next_cursor.as_deref().and_then(decode_cursor);
        let second = store.page("accounting/invoices", None, cursor, 10);
        assert_eq!(second.items.len(), 3);
        assert!(second.next_cursor.is_none());
        // Materialising keeps the same seeds.
        store.apply(Effect::Upsert {
            key: "accounting/invoices".into(),
            entity: Map::from_iter([("id".to_string(), json!("new"))]),
            owner: Some("t1".into()),
        });
        assert_eq!(
            store
                .page("accounting/invoices", Some("t1"), None, 50)
                .items
                .len(),
            6
        );
        assert_eq!(
            store
                .page("accounting/invoices", Some("t2"), None, 50)
                .items
                .len(),
            5
        );
        assert_eq!(
            store.page("accounting/invoices", None, None, 2).items,
            first.items
        );
    }

    #[test]
    fn created_entities_compute_totals() {
        let fields: Map<String, Value> = serde_json::from_value(json!({
            "customer_id": "c", "line_items": [{ "quantity": 2, "unit_amount": 84.5 }]
        }))
        .unwrap();
        let e = created_entity(
            "accounting/invoices",
            &fields,
            "i".into(),
            "1".into(),
            None,
            "now",
        );
        assert_eq!(e["total_amount"], json!(169.0));
        assert_eq!(e["status"], json!("open"));
        let keys: Vec<&String> = e.keys().collect();
        assert_eq!(keys[0], "id");
        assert_eq!(keys[1], "platform_id");
    }
}
