//! Metrics checked by the real tools: `promtool check metrics` on a live scrape, `promtool`
//! checks and unit tests of the alert rules, exact counters after a known load, and a real
//! Prometheus scraping pubwarden under load that must parse every PromQL expression of the
//! dashboards and alert rules and return data for every dashboard panel query.
//!
//! Needs `prometheus` and `promtool` (Debian package `prometheus`); a missing binary fails the
//! test with the install hint.

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use support::prom::{
    Prometheus, json_strings, output_text, promtool, repo, rule_exprs, sample, scrape,
    scrape_with_accept, substitute_grafana_vars,
};
use support::*;

/// Settings with two channel groups and per-channel labels (cap 3).
const CONFIG: &str = "metrics:\n  channel_groups:\n    - name: orders\n      patterns: [\"orders.*\"]\n    - name: chat\n      patterns: [\"chat:*\", \"room-[0-9]\"]\n  per_channel:\n    enabled: true\n    max_channels: 3\n";

fn start() -> (RedisServer, Pubwarden) {
    let redis = RedisServer::start();
    let dir = scratch_dir("metrics-config");
    let config = dir.join("pubwarden.yaml");
    std::fs::write(&config, CONFIG).expect("write settings");
    let pw = Pubwarden::start_with(redis.port(), Some(&config), WaitFor::Ready);
    (redis, pw)
}

/// Subscribes a fresh connection and waits for every confirmation.
fn subscriber(addr: SocketAddr, command: &str, names: &[&str]) -> RawConn {
    let mut c = RawConn::connect(addr);
    c.send_line(&format!("{command} {}", names.join(" ")));
    c.read_frames(names.len(), secs(5))
        .expect_all("subscribe confirmations");
    c
}

/// Polls the scrape until `check` holds (counters are flushed once per read batch, a moment
/// after the client saw its reply), then returns it; panics with the scrape after `timeout`.
fn scrape_until(admin: SocketAddr, timeout: Duration, check: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let text = scrape(admin);
        if check(&text) {
            return text;
        }
        if Instant::now() >= deadline {
            return text;
        }
        std::thread::sleep(millis(50));
    }
}

#[test]
fn counters_are_exact_after_a_known_load() {
    let (_redis, pw) = start();
    const N: usize = 250;
    let mut subs = [
        subscriber(pw.addr(), "SUBSCRIBE", &["orders.eu"]),
        subscriber(pw.addr(), "SUBSCRIBE", &["orders.eu", "news"]),
        subscriber(pw.addr(), "PSUBSCRIBE", &["orders.*"]),
    ];
    // orders.eu reaches 3 subscribers (2 message, 1 pmessage); news reaches 1; chat:x none.
    let mut publisher = RawConn::connect(pw.addr());
    let mut batch = Vec::new();
    for i in 0..N {
        batch.extend_from_slice(&encode(&["PUBLISH", "orders.eu", &format!("payload-{i}")]));
    }
    for _ in 0..10 {
        batch.extend_from_slice(&encode(&["PUBLISH", "news", "hello"]));
        batch.extend_from_slice(&encode(&["PUBLISH", "chat:x", "nobody"]));
    }
    batch.extend_from_slice(&encode(&["PUBLISH", "only-one-arg"]));
    publisher.send(&batch);
    let replies = publisher
        .read_frames(N + 21, secs(10))
        .expect_all("publish replies");
    assert!(
        replies[..N].iter().all(|r| r == b":3\r\n"),
        "each orders.eu publish reaches 3"
    );
    for (i, s) in subs.iter_mut().enumerate() {
        let want = if i == 1 { N + 10 } else { N };
        s.read_frames(want, secs(10)).expect_all("deliveries");
    }

    let payload: usize = (0..N).map(|i| format!("payload-{i}").len()).sum();
    // Each connection flushes its counts after writing a batch, so a client can
    // hold its messages a moment before the counter moves: wait for all of them.
    let text = scrape_until(pw.admin_addr(), secs(5), |t| {
        sample(
            t,
            "pubwarden_deliveries_total",
            "group=\"orders\",kind=\"pmessage\"",
        ) == Some(N as f64)
            && sample(
                t,
                "pubwarden_deliveries_total",
                "group=\"orders\",kind=\"message\"",
            ) == Some((2 * N) as f64)
            && sample(
                t,
                "pubwarden_deliveries_total",
                "group=\"other\",kind=\"message\"",
            ) == Some(10.0)
            && sample(
                t,
                "pubwarden_commands_total",
                "command=\"publish\",result=\"error\"",
            ) == Some(1.0)
    });
    let get = |name: &str, labels: &str| {
        sample(&text, name, labels).unwrap_or_else(|| panic!("no {name}{{{labels}}} in\n{text}"))
    };
    let pubs = |group: &str, result: &str| {
        get(
            "pubwarden_publishes_total",
            &format!("group=\"{group}\",user=\"default\",result=\"{result}\""),
        )
    };
    assert_eq!(pubs("orders", "ok"), N as f64);
    assert_eq!(pubs("other", "ok"), 10.0);
    assert_eq!(pubs("chat", "ok"), 10.0);
    assert_eq!(pubs("orders", "error"), 0.0);
    // The wrong-arity PUBLISH is an error reply, without a channel group.
    assert_eq!(
        get(
            "pubwarden_commands_total",
            "command=\"publish\",result=\"ok\""
        ),
        (N + 20) as f64
    );
    assert_eq!(
        get(
            "pubwarden_commands_total",
            "command=\"publish\",result=\"error\""
        ),
        1.0
    );
    assert_eq!(
        get(
            "pubwarden_deliveries_total",
            "group=\"orders\",kind=\"message\""
        ),
        (2 * N) as f64
    );
    assert_eq!(
        get(
            "pubwarden_deliveries_total",
            "group=\"orders\",kind=\"pmessage\""
        ),
        N as f64
    );
    assert_eq!(
        get(
            "pubwarden_deliveries_total",
            "group=\"other\",kind=\"message\""
        ),
        10.0
    );
    assert_eq!(
        get(
            "pubwarden_deliveries_total",
            "group=\"chat\",kind=\"message\""
        ),
        0.0
    );
    assert_eq!(
        get(
            "pubwarden_delivery_payload_bytes_total",
            "group=\"orders\",kind=\"message\""
        ),
        (2 * payload) as f64
    );
    assert_eq!(
        get("pubwarden_publish_payload_bytes_total", "group=\"orders\""),
        payload as f64
    );
    assert_eq!(
        get("pubwarden_publish_receivers_count", "group=\"orders\""),
        N as f64
    );
    assert_eq!(
        get("pubwarden_publish_receivers_sum", "group=\"orders\""),
        (3 * N) as f64
    );
    assert_eq!(
        get("pubwarden_publishes_unheard_total", "group=\"chat\""),
        10.0
    );
    assert_eq!(
        get("pubwarden_publishes_unheard_total", "group=\"orders\""),
        0.0
    );
    assert_eq!(
        get(
            "pubwarden_publish_duration_seconds_count",
            "group=\"orders\""
        ),
        N as f64
    );
    // Subscriptions: right by construction.
    assert_eq!(
        get(
            "pubwarden_subscriptions",
            "group=\"orders\",kind=\"channel\""
        ),
        2.0
    );
    assert_eq!(
        get(
            "pubwarden_subscriptions",
            "group=\"orders\",kind=\"pattern\""
        ),
        1.0
    );
    assert_eq!(
        get(
            "pubwarden_subscriptions",
            "group=\"other\",kind=\"channel\""
        ),
        1.0
    );
    assert_eq!(
        get(
            "pubwarden_subscription_changes_total",
            "kind=\"channel\",op=\"subscribe\""
        ),
        3.0
    );
    // Per-channel labels: cap 3 -> orders.eu, news, chat:x (first seen), then overflow.
    assert_eq!(
        get("pubwarden_channel_publishes_total", "channel=\"orders.eu\""),
        N as f64
    );
    assert_eq!(
        get(
            "pubwarden_channel_deliveries_total",
            "channel=\"orders.eu\""
        ),
        (3 * N) as f64
    );
    assert_eq!(get("pubwarden_client_connections", ""), 4.0);
    assert_eq!(get("pubwarden_upstream_connections", ""), 4.0);

    // Unsubscribing and closing take the gauges back to zero.
    subs[1].send_line("UNSUBSCRIBE news");
    subs[1].read_frames(1, secs(5)).expect_all("unsubscribe");
    drop(subs);
    drop(publisher);
    // A scrape renders family after family while connections close on
    // another thread, so wait for every gauge, not only the last to move.
    let text = scrape_until(pw.admin_addr(), secs(5), |t| {
        sample(t, "pubwarden_client_connections", "") == Some(0.0)
            && ["orders", "chat", "other"].iter().all(|g| {
                ["channel", "pattern", "shard"].iter().all(|k| {
                    sample(
                        t,
                        "pubwarden_subscriptions",
                        &format!("group=\"{g}\",kind=\"{k}\""),
                    ) == Some(0.0)
                })
            })
    });
    for g in ["orders", "chat", "other"] {
        for k in ["channel", "pattern", "shard"] {
            assert_eq!(
                sample(
                    &text,
                    "pubwarden_subscriptions",
                    &format!("group=\"{g}\",kind=\"{k}\"")
                ),
                Some(0.0),
                "{g}/{k} after every subscriber left:\n{text}"
            );
        }
    }
    assert_eq!(
        sample(
            &text,
            "pubwarden_subscription_changes_total",
            "kind=\"channel\",op=\"unsubscribe\""
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "pubwarden_upstream_connections", ""),
        Some(0.0)
    );
    assert_eq!(
        sample(&text, "pubwarden_client_connections_accepted_total", ""),
        Some(4.0)
    );
}

#[test]
fn promtool_accepts_a_live_scrape_and_openmetrics_is_served_on_request() {
    let (_redis, pw) = start();
    let mut s = subscriber(pw.addr(), "SUBSCRIBE", &["orders.1", "chat:1"]);
    let mut p = RawConn::connect(pw.addr());
    for ch in ["orders.1", "chat:1", "x", "y", "z", "w"] {
        p.send(&encode(&["PUBLISH", ch, "m"]));
        p.read_one(secs(5));
    }
    s.read_frames(2, secs(5)).expect_all("deliveries");
    let text = scrape(pw.admin_addr());
    let file = scratch_dir("scrape").join("metrics.txt");
    std::fs::write(&file, &text).expect("write scrape");
    let out = promtool(&["check", "metrics"], Some(&file));
    assert!(
        out.status.success() && output_text(&out).trim().is_empty(),
        "promtool check metrics: {}\n---- scrape ----\n{text}",
        output_text(&out)
    );
    // Past the per-channel cap of 3, later channels count as overflow.
    assert!(
        text.contains("pubwarden_channel_publishes_total{channel=\"overflow\"} 3"),
        "{text}"
    );

    let (head, body) = scrape_with_accept(
        pw.admin_addr(),
        "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    assert!(body.ends_with("# EOF\n"), "{body}");
    let (head, _) = scrape_with_accept(pw.admin_addr(), "text/plain");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
}

#[test]
fn alert_rules_pass_promtool_checks_and_unit_tests() {
    let rules = repo().join("dashboards/alerts.yaml");
    let tests = repo().join("dashboards/alerts_test.yaml");
    let out = promtool(
        &["check", "rules", rules.to_str().expect("utf-8 path")],
        None,
    );
    assert!(
        out.status.success(),
        "promtool check rules: {}",
        output_text(&out)
    );
    let out = promtool(
        &["test", "rules", tests.to_str().expect("utf-8 path")],
        None,
    );
    assert!(
        out.status.success(),
        "promtool test rules: {}",
        output_text(&out)
    );

    // Every alert has a unit test, a summary and a runbook section.
    let yaml = std::fs::read_to_string(&rules).expect("read alerts.yaml");
    let test_yaml = std::fs::read_to_string(&tests).expect("read alerts_test.yaml");
    let runbook = std::fs::read_to_string(repo().join("docs/runbook.md")).expect("read runbook");
    let alerts: BTreeSet<String> = rule_exprs(&yaml).into_iter().map(|(a, _)| a).collect();
    assert!(alerts.len() >= 7, "{alerts:?}");
    for alert in &alerts {
        assert!(
            test_yaml.contains(&format!(
                "alertname: {alert}\n        exp_alerts:\n          - exp_labels"
            )),
            "{alert} has no firing case in alerts_test.yaml"
        );
        assert!(
            runbook.contains(&format!("## {alert}")),
            "{alert} has no section in docs/runbook.md"
        );
        assert!(
            yaml.contains(&format!("docs/runbook.md#{}", alert.to_lowercase())),
            "{alert} does not link its runbook section"
        );
    }
    assert_eq!(
        yaml.matches("summary:").count(),
        alerts.len(),
        "one summary per alert"
    );
}

/// Publishes to several groups and keeps subscribers reading, until `stop`.
fn load(addr: SocketAddr, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut subs = vec![
            subscriber(addr, "SUBSCRIBE", &["orders.eu", "chat:lobby"]),
            subscriber(addr, "PSUBSCRIBE", &["orders.*"]),
            subscriber(addr, "SSUBSCRIBE", &["room-1"]),
        ];
        let mut p = RawConn::connect(addr);
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let mut batch = Vec::new();
            for ch in ["orders.eu", "chat:lobby", "nobody-listens"] {
                batch.extend_from_slice(&encode(&["PUBLISH", ch, &format!("m{n}")]));
            }
            batch.extend_from_slice(&encode(&["SPUBLISH", "room-1", "s"]));
            batch.extend_from_slice(&encode(&["GET", "k"]));
            batch.extend_from_slice(&encode(&["PUBLISH", "bad"]));
            p.send(&batch);
            p.read_frames(6, secs(5)).expect_all("load replies");
            for s in &mut subs {
                let _ = s.read_until_idle(millis(1), millis(20));
            }
            n += 1;
            std::thread::sleep(millis(20));
        }
    })
}

#[test]
fn every_dashboard_and_alert_query_runs_on_a_real_prometheus() {
    let (_redis, pw) = start();
    let stop = Arc::new(AtomicBool::new(false));
    let loader = load(pw.addr(), stop.clone());
    let prom = Prometheus::start(pw.admin_addr(), "pubwarden-test", "pubwarden-0");
    // Enough scrapes for rate() over the substituted 1m window to have two points.
    let ready = prom.wait_for_data(
        "rate(pubwarden_deliveries_total{kind=\"smessage\"}[1m]) > 0",
        secs(30),
    );
    std::thread::sleep(secs(3));
    assert!(
        ready,
        "no deliveries scraped within 30 s; prometheus log:\n{}",
        prom.logs()
    );

    let mut failures = Vec::new();
    let mut ran = 0;
    for file in ["pubwarden-overview.json", "pubwarden-channel-group.json"] {
        let json = std::fs::read_to_string(repo().join("dashboards").join(file))
            .unwrap_or_else(|e| panic!("read {file}: {e}"));
        assert!(
            json.contains("\"uid\": \"${datasource}\""),
            "{file}: panels use ${{datasource}}"
        );
        for var in ["namespace", "pod", "group", "user"] {
            assert!(
                json.contains(&format!("\"name\": \"{var}\"")),
                "{file}: no ${var} variable"
            );
        }
        let exprs = json_strings(&json, "expr");
        assert!(
            exprs.len() >= 10,
            "{file}: only {} panel queries",
            exprs.len()
        );
        for expr in exprs {
            ran += 1;
            let q = substitute_grafana_vars(&expr);
            let r = prom.query(&q);
            if !r.parsed() {
                failures.push(format!("{file}: does not parse: {q}\n    {}", r.body));
            } else if !r.has_data() {
                failures.push(format!("{file}: no data: {q}"));
            }
        }
        // Template variables: label_values(selector, label) must find values.
        for def in json_strings(&json, "definition") {
            let Some(inner) = def
                .strip_prefix("label_values(")
                .and_then(|d| d.strip_suffix(')'))
            else {
                continue;
            };
            let (selector, label) = inner
                .rsplit_once(',')
                .expect("label_values(selector, label)");
            let q = substitute_grafana_vars(&format!("count by ({}) ({selector})", label.trim()));
            if !prom.query(&q).has_data() {
                failures.push(format!("{file}: variable finds no values: {def}"));
            }
        }
    }
    let yaml = std::fs::read_to_string(repo().join("dashboards/alerts.yaml")).expect("read alerts");
    for (alert, expr) in rule_exprs(&yaml) {
        ran += 1;
        let r = prom.query(&expr);
        if !r.parsed() {
            failures.push(format!(
                "alert {alert}: does not parse: {expr}\n    {}",
                r.body
            ));
        }
    }
    stop.store(true, Ordering::Relaxed);
    loader.join().expect("load thread");
    eprintln!("ran {ran} dashboard and alert queries against prometheus");
    assert!(
        failures.is_empty(),
        "{} of {ran} queries failed:\n{}\n---- scrape ----\n{}",
        failures.len(),
        failures.join("\n"),
        scrape(pw.admin_addr())
    );
}
