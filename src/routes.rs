//! The facade's allow-list: which method and path pairs Rutter can run as asynchronous jobs
//! (DESIGN §3, API-FACTS §3).
//!
//! Patterns are written `METHOD /path/with/:params`, relative to `/versioned` or to the legacy root; a
//! `:name` segment matches exactly one non-empty path segment. The default table is
//! [`DEFAULT_ASYNC_ROUTES`]; `facade.routes` in the configuration replaces it.

use std::fmt;

use http::Method;

/// Accounting resources with the write methods Rutter accepts `response_mode` on (2024-08-31 spec).
/// Each entry: (resource path under `/accounting`, POST, PATCH `/:id`, DELETE `/:id`).
const ACCOUNTING_WRITES: &[(&str, bool, bool, bool)] = &[
    ("accounts", true, true, false),
    ("bank_deposits", true, true, true),
    ("bank_feeds/accounts", true, true, true),
    ("bank_feeds/transactions", true, false, false),
    ("bank_transfers", true, true, true),
    ("bill_credit_applications", true, false, false),
    ("bill_credit_memos", true, true, true),
    ("bill_payments", true, true, true),
    ("bills", true, true, true),
    ("classes", true, false, false),
    ("customer_refunds", true, false, true),
    ("customers", true, true, false),
    ("departments", true, false, false),
    ("expenses", true, true, true),
    ("invoice_credit_applications", true, false, false),
    ("invoice_credit_memos", true, true, true),
    ("invoice_payments", true, true, true),
    ("invoices", true, true, true),
    ("items", true, true, true),
    ("journal_entries", true, true, true),
    ("payment_terms", true, false, true),
    ("purchase_orders", true, true, true),
    ("sales_orders", true, true, false),
    ("sales_receipts", true, false, false),
    ("tax_rates", true, false, false),
    ("vendors", true, true, true),
];

/// Routes outside the accounting write table that Rutter may answer with an `async_response`.
const OTHER_ASYNC_ROUTES: &[&str] = &[
    "POST /accounting/invoice_credit_applications/:id/unapply",
    "POST /accounting/bills/:id/attachments",
    "POST /accounting/expenses/:id/attachments",
    "POST /accounting/invoices/:id/attachments",
    "POST /accounting/journal_entries/:id/attachments",
    "POST /products",
    "POST /orders/:id/fulfillments",
    "GET /accounting/balance_sheets",
    "GET /accounting/income_statements",
    "GET /accounting/cash_flow_statements",
];

/// The default async-capable routes, as pattern strings (the form `facade.routes` takes).
pub fn default_route_strings() -> Vec<String> {
    let mut out = Vec::new();
    for (resource, post, patch, delete) in ACCOUNTING_WRITES {
        if *post {
            out.push(format!("POST /accounting/{resource}"));
        }
        if *patch {
            out.push(format!("PATCH /accounting/{resource}/:id"));
        }
        if *delete {
            out.push(format!("DELETE /accounting/{resource}/:id"));
        }
    }
    out.extend(OTHER_ASYNC_ROUTES.iter().map(|s| s.to_string()));
    out
}

/// Kept for documentation: the number of default routes is `DEFAULT_ASYNC_ROUTES.len()`.
pub static DEFAULT_ASYNC_ROUTES: std::sync::LazyLock<Vec<String>> =
    std::sync::LazyLock::new(default_route_strings);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param,
}

/// One async-capable route: a method and a path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePattern {
    method: Method,
    segments: Vec<Segment>,
    template: String,
}

impl RoutePattern {
    /// Parses `METHOD /path/:param`. Errors name what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let (method, path) = text
            .split_once(' ')
            .ok_or_else(|| format!("{text:?}: expected \"METHOD /path\""))?;
        let method = Method::from_bytes(method.as_bytes())
            .map_err(|_| format!("{text:?}: {method:?} is not an HTTP method"))?;
        let path = path.trim();
        if !path.starts_with('/') {
            return Err(format!("{text:?}: the path must start with '/'"));
        }
        let mut segments = Vec::new();
        for seg in path.trim_end_matches('/').split('/').skip(1) {
            if seg.is_empty() {
                return Err(format!("{text:?}: empty path segment"));
            }
            if seg.starts_with(':') {
                segments.push(Segment::Param);
            } else {
                segments.push(Segment::Literal(seg.to_string()));
            }
        }
        if segments.is_empty() {
            return Err(format!("{text:?}: the path has no segments"));
        }
        Ok(RoutePattern {
            method,
            segments,
            template: format!("{} {}", method_str(text), path),
        })
    }

    /// `METHOD /path/:id`, as configured; used as the route label in logs and metrics.
    pub fn template(&self) -> &str {
        &self.template
    }

    fn matches(&self, method: &Method, segments: &[&str]) -> bool {
        self.method == method
            && self.segments.len() == segments.len()
            && self
                .segments
                .iter()
                .zip(segments)
                .all(|(pattern, seg)| match pattern {
                    Segment::Literal(lit) => lit == seg,
                    Segment::Param => !seg.is_empty(),
                })
    }
}

fn method_str(text: &str) -> &str {
    text.split(' ').next().unwrap_or("")
}

impl fmt::Display for RoutePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.template)
    }
}

/// The set of async-capable routes.
#[derive(Debug, Clone)]
pub struct RouteTable {
    routes: Vec<RoutePattern>,
    /// The distinct methods of `routes`: a request with another method is passthrough at once.
    methods: Vec<Method>,
}

impl Default for RouteTable {
    fn default() -> Self {
        let routes = DEFAULT_ASYNC_ROUTES
            .iter()
            // ok: a constant table, parsed by `default_table_covers_every_documented_write`.
            .map(|s| RoutePattern::parse(s).expect("the built-in route table parses")) // ok: constant
            .collect();
        RouteTable::new(routes)
    }
}

/// Splits a request path into `(is_versioned, segments)`, dropping a leading `/versioned` and one
/// trailing slash. The path is matched as sent (no percent-decoding), as Rutter routes it.
pub fn split_path(path: &str) -> (bool, Vec<&str>) {
    let trimmed = path.strip_suffix('/').unwrap_or(path);
    let (versioned, rest) = match trimmed.strip_prefix("/versioned") {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => (true, rest),
        _ => (false, trimmed),
    };
    let segments = rest.split('/').skip(1).collect();
    (versioned, segments)
}

/// Whether a path is under `/versioned` (the same rule as [`split_path`], without splitting).
pub fn is_versioned(path: &str) -> bool {
    path.strip_prefix("/versioned")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

impl RouteTable {
    /// A table of the given patterns.
    pub fn new(routes: Vec<RoutePattern>) -> Self {
        let mut methods: Vec<Method> = Vec::new();
        for route in &routes {
            if !methods.contains(&route.method) {
                methods.push(route.method.clone());
            }
        }
        RouteTable { routes, methods }
    }

    /// The patterns in this table.
    pub fn routes(&self) -> &[RoutePattern] {
        &self.routes
    }

    /// The pattern matching `method` and `path` (path without query), if the route is async-capable.
    pub fn find(&self, method: &Method, path: &str) -> Option<&RoutePattern> {
        // Most requests (reads) match no route's method: no need to split the path.
        if !self.methods.contains(method) {
            return None;
        }
        let (_, segments) = split_path(path);
        if is_job_path(&segments) {
            return None;
        }
        self.routes
            .iter()
            .find(|route| route.matches(method, &segments))
    }
}

/// `GET /jobs/:id` (under `/versioned` or the root) is always passthrough.
pub fn is_job_path(segments: &[&str]) -> bool {
    segments.len() == 2 && segments[0] == "jobs"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versioned_agrees_with_split_path() {
        for path in [
            "/versioned",
            "/versioned/",
            "/versioned/accounting/invoices",
            "/versionedx/a",
            "/versioned//",
            "/accounting/invoices",
            "/",
            "",
            "/Versioned/a",
        ] {
            assert_eq!(is_versioned(path), split_path(path).0, "{path:?}");
        }
    }

    #[test]
    fn matching_table() {
        let table = RouteTable::default();
        let cases = [
            (
                "POST",
                "/versioned/accounting/invoices",
                Some("POST /accounting/invoices"),
            ),
            (
                "POST",
                "/accounting/invoices",
                Some("POST /accounting/invoices"),
            ),
            (
                "POST",
                "/versioned/accounting/invoices/",
                Some("POST /accounting/invoices"),
            ),
            (
                "PATCH",
                "/versioned/accounting/invoices/abc",
                Some("PATCH /accounting/invoices/:id"),
            ),
            (
                "DELETE",
                "/versioned/accounting/bills/abc",
                Some("DELETE /accounting/bills/:id"),
            ),
            ("DELETE", "/versioned/accounting/customers/abc", None),
            ("GET", "/versioned/accounting/invoices", None),
            ("PUT", "/versioned/accounting/invoices", None),
            ("POST", "/versioned/accounting/invoices/abc", None),
            (
                "POST",
                "/versioned/accounting/bank_feeds/accounts",
                Some("POST /accounting/bank_feeds/accounts"),
            ),
            ("POST", "/versioned/products", Some("POST /products")),
            ("PATCH", "/versioned/products/p1", None),
            (
                "POST",
                "/versioned/orders/o1/fulfillments",
                Some("POST /orders/:id/fulfillments"),
            ),
            ("POST", "/versioned/orders", None),
            (
                "POST",
                "/versioned/accounting/invoices/i1/attachments",
                Some("POST /accounting/invoices/:id/attachments"),
            ),
            (
                "GET",
                "/versioned/accounting/balance_sheets",
                Some("GET /accounting/balance_sheets"),
            ),
            ("GET", "/versioned/jobs/123", None),
            ("POST", "/versionedx/accounting/invoices", None),
            ("POST", "/", None),
            ("POST", "", None),
        ];
        for (method, path, expected) in cases {
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            let found = table.find(&method, path).map(|r| r.template());
            assert_eq!(found, expected, "{method} {path}");
        }
    }

    #[test]
    fn parse_rejects_bad_patterns() {
        for bad in [
            "",
            "POST",
            "POST accounting",
            "P@ST /x",
            "POST /a//b",
            "POST /",
        ] {
            assert!(RoutePattern::parse(bad).is_err(), "{bad:?}");
        }
        assert!(RoutePattern::parse("POST /custom/:id/thing").is_ok());
    }

    #[test]
    fn default_table_covers_every_documented_write() {
        let table = RouteTable::default();
        // 26 resources: 26 POST + 17 PATCH + 16 DELETE (API-FACTS §3), plus the others.
        assert_eq!(table.routes().len(), 59 + OTHER_ASYNC_ROUTES.len());
    }
}
