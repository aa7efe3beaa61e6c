//! The operator documentation is checked against the code, so it cannot drift:
//!
//! - `docs/configuration.md` documents exactly the keys the sidecar accepts (as `Config::render` lists
//!   them), each with a default that parses to the built-in default and an environment variable that
//!   really sets that key;
//! - `config.toml` (the annotated defaults) sets or shows (commented out) exactly those keys, with the
//!   default values, and `deploy/kubernetes/config.toml` (the ConfigMap's file) is valid;
//! - the error tables in `docs/troubleshooting.md` and `README.md` list exactly the codes of
//!   `ProxyError`, with the statuses the code answers.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use rutter_sidecar::config::{Config, Credentials, ENV_PREFIX};
use rutter_sidecar::error::ProxyError;

fn read(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

/// The cells of a Markdown table row (`| a | b |`), trimmed; None for other lines.
fn cells(line: &str) -> Option<Vec<&str>> {
    let inner = line.trim().strip_prefix('|')?.strip_suffix('|')?;
    Some(inner.split('|').map(str::trim).collect())
}

/// The text between the first pair of backticks of `cell`, if the cell is exactly one code span.
fn code(cell: &str) -> Option<&str> {
    cell.strip_prefix('`')?
        .strip_suffix('`')
        .filter(|c| !c.contains('`'))
}

/// Every `section.key` the sidecar accepts, with its default as TOML text, from the rendered defaults
/// (valid TOML in which every key is present).
fn accepted_keys() -> BTreeMap<String, toml::Value> {
    let rendered = Config::default().render(&Credentials::default());
    let table: toml::Table = rendered
        .parse()
        .unwrap_or_else(|e| panic!("Config::render is not valid TOML: {e}\n{rendered}"));
    let mut keys = BTreeMap::new();
    for (section, value) in table {
        let toml::Value::Table(entries) = value else {
            panic!("rendered config: {section} is not a section");
        };
        for (key, value) in entries {
            keys.insert(format!("{section}.{key}"), value);
        }
    }
    assert!(keys.len() > 30, "suspiciously few keys rendered: {keys:?}");
    keys
}

/// One documented key: its row's default cell and environment variable cell.
struct DocRow {
    default: String,
    env: String,
}

/// The rows of the key tables in docs/configuration.md: first cell a code span holding `section.key`.
fn documented_keys() -> BTreeMap<String, DocRow> {
    let text = read("docs/configuration.md");
    let mut rows = BTreeMap::new();
    for line in text.lines() {
        let Some(cells) = cells(line) else { continue };
        let Some(key) = cells.first().and_then(|c| code(c)) else {
            continue;
        };
        let Some((section, name)) = key.split_once('.') else {
            continue;
        };
        if section.is_empty() || name.is_empty() || key.contains(' ') {
            continue;
        }
        assert_eq!(
            cells.len(),
            5,
            "docs/configuration.md: the row of {key} needs 5 cells (key | default | type | environment variable | meaning)"
        );
        let row = DocRow {
            default: cells[1].to_string(),
            env: cells[3].to_string(),
        };
        assert!(
            rows.insert(key.to_string(), row).is_none(),
            "docs/configuration.md documents {key} twice"
        );
    }
    rows
}

fn env_name(key: &str) -> String {
    let (section, name) = key.split_once('.').unwrap();
    format!(
        "{ENV_PREFIX}{}__{}",
        section.to_ascii_uppercase(),
        name.to_ascii_uppercase()
    )
}

fn section_and_key(key: &str) -> (&str, &str) {
    key.split_once('.').unwrap()
}

#[test]
fn configuration_reference_documents_exactly_the_accepted_keys() {
    let accepted: BTreeSet<String> = accepted_keys().into_keys().collect();
    let documented: BTreeSet<String> = documented_keys().into_keys().collect();
    let undocumented: Vec<_> = accepted.difference(&documented).collect();
    let unknown: Vec<_> = documented.difference(&accepted).collect();
    assert!(
        undocumented.is_empty() && unknown.is_empty(),
        "docs/configuration.md is out of date.\n  accepted by the code but not documented: {undocumented:?}\n  documented but not accepted: {unknown:?}"
    );
}

#[test]
fn configuration_reference_defaults_are_the_built_in_defaults() {
    let defaults = Config::default();
    let mut without_value = Vec::new();
    for (key, row) in documented_keys() {
        let Some(value) = code(&row.default) else {
            without_value.push(key);
            continue;
        };
        let (section, name) = section_and_key(&key);
        let file = format!("[{section}]\n{name} = {value}\n");
        let parsed = Config::parse(&file, &[]).unwrap_or_else(|e| {
            panic!("docs/configuration.md: the default of {key} ({value}) does not parse:\n{e}")
        });
        assert!(
            parsed == defaults,
            "docs/configuration.md: the documented default of {key} ({value}) is not the built-in default; \
             check-config shows the real one"
        );
    }
    // Only the route table is too long to write in a cell.
    assert_eq!(
        without_value,
        ["facade.routes"],
        "docs/configuration.md: these keys have no TOML default in their default cell"
    );
}

#[test]
fn configuration_reference_environment_variables_set_their_keys() {
    let accepted = accepted_keys();
    for (key, row) in documented_keys() {
        let expected = env_name(&key);
        assert_eq!(
            code(&row.env),
            Some(expected.as_str()),
            "docs/configuration.md: the environment variable of {key}"
        );
        // Setting the variable to the default value gives the default configuration: the name is one the
        // parser accepts, for this key.
        let value = accepted[&key].to_string();
        let env = [(expected.clone(), value.clone())];
        let parsed = Config::parse("", &env)
            .unwrap_or_else(|e| panic!("{expected}={value} is refused:\n{e}"));
        assert!(
            parsed == Config::default(),
            "{expected}={value} does not set {key} to its default"
        );
    }
    // And a variable really changes its key (not just passes validation).
    let env = [(env_name("facade.max_wait"), "2m".to_string())];
    let parsed = Config::parse("", &env).unwrap();
    assert_eq!(parsed.facade.max_wait, Duration::from_secs(120));
}

/// `(section.key, commented out)` for every key line of a TOML file with `# key = ...` examples.
fn keys_in_annotated_file(text: &str) -> Vec<(String, bool)> {
    let mut section = String::new();
    let mut keys = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim().to_string();
            continue;
        }
        let (body, commented) = match line.strip_prefix('#') {
            Some(rest) => (rest.trim(), true),
            None => (line, false),
        };
        let Some((name, _)) = body.split_once('=') else {
            continue;
        };
        let name = name.trim();
        if section.is_empty()
            || name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            continue;
        }
        keys.push((format!("{section}.{name}"), commented));
    }
    keys
}

#[test]
fn shipped_config_toml_shows_every_key_with_its_default() {
    let text = read("config.toml");
    let accepted: BTreeSet<String> = accepted_keys().into_keys().collect();
    let table: toml::Table = text.parse().expect("config.toml is not valid TOML");
    let set: BTreeSet<String> = table
        .iter()
        .flat_map(|(section, value)| {
            let entries = value
                .as_table()
                .expect("config.toml: a key outside a section");
            entries.keys().map(move |key| format!("{section}.{key}"))
        })
        .collect();
    let shown: BTreeSet<String> = keys_in_annotated_file(&text)
        .into_iter()
        .map(|(key, _)| key)
        .collect();
    let unknown: Vec<_> = set.difference(&accepted).collect();
    assert!(
        unknown.is_empty(),
        "config.toml sets unknown keys: {unknown:?}"
    );
    let missing: Vec<_> = accepted.difference(&shown).collect();
    assert!(
        missing.is_empty(),
        "config.toml neither sets nor shows (as `# key = ...`) these keys: {missing:?}"
    );
    let extra: Vec<_> = shown.difference(&accepted).collect();
    assert!(
        extra.is_empty(),
        "config.toml shows unknown keys: {extra:?}"
    );
    let parsed = Config::parse(&text, &[]).unwrap_or_else(|e| panic!("config.toml:\n{e}"));
    assert!(
        parsed == Config::default(),
        "config.toml says its values are the defaults, but they differ"
    );
}

#[test]
fn kubernetes_config_toml_is_valid_and_listens_where_the_manifests_expect() {
    let text = read("deploy/kubernetes/config.toml");
    let accepted: BTreeSet<String> = accepted_keys().into_keys().collect();
    for (key, commented) in keys_in_annotated_file(&text) {
        assert!(
            commented || accepted.contains(&key),
            "deploy/kubernetes/config.toml sets an unknown key {key}"
        );
    }
    let config =
        Config::parse(&text, &[]).unwrap_or_else(|e| panic!("deploy/kubernetes/config.toml:\n{e}"));
    // deployment.yaml: the app uses 127.0.0.1:8080, the Service targets 8081, the probes 9901.
    assert_eq!(config.listen.proxy.to_string(), "127.0.0.1:8080");
    assert_eq!(config.listen.webhooks.to_string(), "0.0.0.0:8081");
    assert_eq!(config.listen.admin.to_string(), "0.0.0.0:9901");
    // terminationGracePeriodSeconds: 30 in deployment.yaml stays 5 s above the grace.
    let deployment = read("deploy/kubernetes/deployment.yaml");
    let period: u64 = deployment
        .lines()
        .find_map(|l| l.trim().strip_prefix("terminationGracePeriodSeconds:"))
        .expect("deployment.yaml sets terminationGracePeriodSeconds")
        .trim()
        .parse()
        .unwrap();
    assert!(
        Duration::from_secs(period) >= config.shutdown.grace + Duration::from_secs(5),
        "terminationGracePeriodSeconds ({period}) must be at least shutdown.grace + 5 s ({:?})",
        config.shutdown.grace
    );
}

/// Every error the sidecar answers with, one of each variant. The match makes this test stop
/// compiling when a variant is added, so the tables below get the new code.
fn every_error() -> Vec<ProxyError> {
    let all = vec![
        ProxyError::UpstreamUnavailable("x".into()),
        ProxyError::UpstreamTimeout(Duration::from_secs(1)),
        ProxyError::JobWaitTimeout { job_id: "j".into() },
        ProxyError::JobNotFound {
            job_id: "j".into(),
            status: 404,
        },
        ProxyError::JobPollRejected {
            job_id: "j".into(),
            status: 401,
        },
        ProxyError::JobResultInvalid {
            job_id: "j".into(),
            reason: "x".into(),
        },
        ProxyError::IdempotencyKeyInvalid,
        ProxyError::IdempotencyKeyReused,
        ProxyError::BodyTooLarge { limit: 1 },
        ProxyError::BadRequest("x".into()),
        ProxyError::ShuttingDown,
        ProxyError::WebhookUnauthorized,
        ProxyError::WebhookMalformed("x".into()),
        ProxyError::NotFound,
        ProxyError::MethodNotAllowed,
        ProxyError::RateBudgetExhausted {
            retry_after: Duration::from_secs(1),
        },
        ProxyError::Internal("x".into()),
        ProxyError::Overloaded("x".into()),
    ];
    for error in &all {
        match error {
            ProxyError::UpstreamUnavailable(_)
            | ProxyError::UpstreamTimeout(_)
            | ProxyError::JobWaitTimeout { .. }
            | ProxyError::JobNotFound { .. }
            | ProxyError::JobPollRejected { .. }
            | ProxyError::JobResultInvalid { .. }
            | ProxyError::IdempotencyKeyInvalid
            | ProxyError::IdempotencyKeyReused
            | ProxyError::BodyTooLarge { .. }
            | ProxyError::BadRequest(_)
            | ProxyError::ShuttingDown
            | ProxyError::WebhookUnauthorized
            | ProxyError::WebhookMalformed(_)
            | ProxyError::NotFound
            | ProxyError::MethodNotAllowed
            | ProxyError::RateBudgetExhausted { .. }
            | ProxyError::Internal(_)
            | ProxyError::Overloaded(_) => {}
        }
    }
    all
}

fn code_statuses() -> BTreeMap<String, u16> {
    every_error()
        .iter()
        .map(|e| (e.code().to_string(), e.status().as_u16()))
        .collect()
}

/// `(code, status)` pairs from the table rows of `path` whose first cell holds error-code spans
/// (`` `CODE` `` or `` `A`, `B` `` with `405, 404` in the next cell).
fn error_table(path: &str) -> Vec<(String, u16)> {
    let text = read(path);
    let mut pairs = Vec::new();
    for line in text.lines() {
        let Some(cells) = cells(line) else { continue };
        if cells.len() < 2 {
            continue;
        }
        let codes: Option<Vec<&str>> = cells[0].split(',').map(|c| code(c.trim())).collect();
        let Some(codes) = codes else { continue };
        if !codes.iter().all(|c| {
            !c.is_empty()
                && c.chars()
                    .all(|ch| ch.is_ascii_uppercase() || ch == '_' || ch.is_ascii_digit())
        }) {
            continue;
        }
        let statuses: Vec<u16> = cells[1]
            .split(',')
            .map(|s| {
                s.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("{path}: no status in {line:?}"))
            })
            .collect();
        assert_eq!(
            codes.len(),
            statuses.len(),
            "{path}: as many statuses as codes in {line:?}"
        );
        pairs.extend(codes.iter().map(|c| c.to_string()).zip(statuses));
    }
    pairs
}

fn assert_error_table_matches(path: &str) {
    let actual = code_statuses();
    let documented = error_table(path);
    let mut seen = BTreeSet::new();
    for (code, status) in &documented {
        let Some(real) = actual.get(code) else {
            panic!("{path} lists {code}, which the sidecar never answers with");
        };
        assert_eq!(status, real, "{path}: the status of {code}");
        assert!(seen.insert(code.clone()), "{path} lists {code} twice");
    }
    let missing: Vec<_> = actual.keys().filter(|c| !seen.contains(*c)).collect();
    assert!(
        missing.is_empty(),
        "{path} does not list these error codes: {missing:?}"
    );
}

#[test]
fn troubleshooting_lists_every_error_code_with_its_status() {
    assert_error_table_matches("docs/troubleshooting.md");
}

#[test]
fn readme_lists_every_error_code_with_its_status() {
    assert_error_table_matches("README.md");
}

#[test]
fn docs_link_to_files_that_exist() {
    for doc in [
        "README.md",
        "docs/configuration.md",
        "docs/kubernetes.md",
        "docs/local-development.md",
        "docs/troubleshooting.md",
    ] {
        let text = read(doc);
        let base = Path::new(doc).parent().unwrap();
        // Relative Markdown links: `](target)` not starting with a scheme or `#`.
        for (index, _) in text.match_indices("](") {
            let rest = &text[index + 2..];
            let Some(end) = rest.find(')') else { continue };
            let target = rest[..end].split('#').next().unwrap();
            if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(base)
                .join(target);
            assert!(
                path.exists(),
                "{doc} links to {target}, which does not exist"
            );
        }
    }
}
