//! docs/metrics.md and the metric registry describe the same families, with the same type and
//! help text, and no family ends up in the registry undocumented (or the other way round).

use std::collections::BTreeMap;

use pubwarden::metrics::{Metrics, MetricsSettings};

/// (type, help) of every family the registry exposes, by exposed name.
fn registry_families() -> BTreeMap<String, (String, String)> {
    let mut settings = MetricsSettings::default();
    // Per-channel families exist only when enabled; the docs list them too.
    settings.per_channel.enabled = true;
    let m = Metrics::new(&settings);
    // Policy families have no series, so no exposition, until policy uses them.
    let user = m.user_label("default");
    m.acl_denial(&user, "publish", Some(b"orders.1"));
    m.audit_would_deny(&user, "subscribe", None);
    m.rate_limit_rejected("publishers");
    m.rate_limit_delayed("publishers", std::time::Duration::from_millis(5));
    // TLS and Sentinel families whose series exist only when configured.
    m.tls_certificate_expiry("listener", 0);
    m.sentinel_master("mymaster", "127.0.0.1:6379", None);
    m.global_fallback("shared", "local_share");
    m.cluster_node_connection("127.0.0.1:7000", 1);
    let _ = m.cluster_node_counters("127.0.0.1:7000");
    let text = m.render(false);
    let mut help = BTreeMap::new();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, h) = rest.split_once(' ').expect("HELP line has a name and text");
            help.insert(name.to_string(), h.to_string());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').expect("TYPE line has a name and type");
            let h = help.get(name).cloned().unwrap_or_default();
            out.insert(name.to_string(), (ty.to_string(), h));
        }
    }
    out
}

/// (type, help) of every row of the families table in docs/metrics.md.
fn documented_families() -> BTreeMap<String, (String, String)> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/metrics.md");
    let text = std::fs::read_to_string(&path).expect("read docs/metrics.md");
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // | `name` | type | labels | help |
        if cells.len() != 6 {
            continue;
        }
        let Some(name) = cells[1]
            .strip_prefix("`pubwarden_")
            .and_then(|n| n.strip_suffix('`'))
        else {
            continue;
        };
        let previous = out.insert(
            format!("pubwarden_{name}"),
            (cells[2].to_string(), cells[4].to_string()),
        );
        assert!(previous.is_none(), "pubwarden_{name} is documented twice");
    }
    out
}

#[test]
fn docs_table_lists_exactly_the_registered_families() {
    let registry = registry_families();
    let docs = documented_families();
    assert!(registry.len() > 20, "registry looks empty: {registry:?}");
    let undocumented: Vec<&String> = registry.keys().filter(|k| !docs.contains_key(*k)).collect();
    let stale: Vec<&String> = docs.keys().filter(|k| !registry.contains_key(*k)).collect();
    assert!(
        undocumented.is_empty() && stale.is_empty(),
        "registered but not in docs/metrics.md: {undocumented:?}\nin docs/metrics.md but not registered: {stale:?}"
    );
    for (name, (ty, help)) in &registry {
        let (doc_ty, doc_help) = &docs[name];
        assert_eq!(doc_ty, ty, "type of {name}");
        assert_eq!(doc_help, help, "help of {name}");
        assert!(
            help.ends_with('.') && help.len() > 10,
            "{name} needs one sentence of help, got {help:?}"
        );
    }
}

#[test]
fn labels_in_the_docs_table_match_the_series() {
    let mut settings = MetricsSettings::default();
    settings.per_channel.enabled = true;
    let text = Metrics::new(&settings).render(false);
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/metrics.md");
    let doc = std::fs::read_to_string(path).expect("read docs/metrics.md");
    for line in doc.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() != 6 || !cells[1].starts_with("`pubwarden_") {
            continue;
        }
        let name = cells[1].trim_matches('`');
        let want: Vec<&str> = cells[3]
            .split(',')
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        // Every series of the family that exists from start-up carries exactly these labels
        // (histograms add `le` to their buckets).
        for series in text.lines().filter(|l| !l.starts_with('#')) {
            let (series_name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.split_once('}').map_or("", |(l, _)| l)),
                None => (series.split(' ').next().unwrap_or(""), ""),
            };
            let base = series_name
                .strip_suffix("_bucket")
                .or_else(|| series_name.strip_suffix("_sum"))
                .or_else(|| series_name.strip_suffix("_count"))
                .unwrap_or(series_name);
            if base != name && series_name != name {
                continue;
            }
            let mut got: Vec<&str> = labels
                .split(',')
                .filter_map(|kv| kv.split_once('=').map(|(k, _)| k))
                .filter(|k| *k != "le")
                .collect();
            got.sort_unstable();
            let mut want_sorted = want.clone();
            want_sorted.sort_unstable();
            assert_eq!(got, want_sorted, "labels of {series}");
        }
    }
}
