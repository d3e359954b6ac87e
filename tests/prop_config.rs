//! Robustness of YAML settings and policy parsing: random text, YAML-shaped
//! token soup, random documents built from the real keys, deeply nested flow
//! collections and long strings never panic; they parse or report errors.
//!
//! No generated document names a secret `file:` that exists (policy and
//! settings read such files when parsed).

use proptest::prelude::*;
use pubwarden::config::{Overrides, Settings};
use pubwarden::policy::schema;

fn parse_both(text: &str) {
    let _ = schema::parse(text);
    let _ = Settings::from_yaml(text, &Overrides::default());
}

fn yaml_soup() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        4 => prop::sample::select(vec![
            "{", "}", "[", "]", ": ", ":", ", ", ",", "- ", "-", "\n", "  ", "    ", "\t",
            "? ", "&a ", "*a", "!!str ", "!x ", "|\n", ">-\n", "'", "\"", "# c\n", "---\n",
            "...\n", "%YAML 1.2\n", "\\", "\"\\x", "\u{feff}", "~", "null", "true", "1e9",
            "users", "mode", "enforce", "audit", "passwords", "nopass", "channels", "publish",
            "subscribe", "deny", "commands", "allow", "@all", "rate_limits", "name", "burst",
            "messages_per_second", "limits", "max_bulk_len", "listen", "upstream", "address",
            "log", "level", "metrics", "channel_groups", "patterns", "env", "plain",
        ])
        .prop_map(String::from),
        1 => "[a-z0-9*.]{1,8}",
        1 => any::<String>(),
    ];
    prop::collection::vec(token, 0..48).prop_map(|v| v.concat())
}

/// A YAML-shaped tree using the keys the readers know.
#[derive(Debug, Clone)]
enum Doc {
    Scalar(String),
    Seq(Vec<Doc>),
    Map(Vec<(String, Doc)>),
}

const KEYS: &[&str] = &[
    "mode",
    "allow_plaintext_passwords",
    "auth",
    "max_failures_per_minute",
    "users",
    "default",
    "alice",
    "enabled",
    "nopass",
    "passwords",
    "env",
    "plain",
    "sources",
    "max_connections",
    "channels",
    "publish",
    "subscribe",
    "deny",
    "commands",
    "allow",
    "subscribe_ops_per_second",
    "rate_limits",
    "name",
    "messages_per_second",
    "bytes_per_second",
    "burst",
    "key",
    "on_limit",
    "max_delay",
    "listen",
    "upstream",
    "address",
    "connect_timeout",
    "health_check_interval",
    "username",
    "password",
    "policy",
    "admin",
    "limits",
    "max_bulk_len",
    "max_multibulk_len",
    "max_inline_len",
    "max_reply_depth",
    "max_pipeline",
    "pause_reading_at",
    "shutdown",
    "drain_timeout",
    "log",
    "level",
    "format",
    "metrics",
    "channel_groups",
    "patterns",
    "per_channel",
    "max_channels",
    "bogus",
];

const VALUES: &[&str] = &[
    "",
    "~",
    "0",
    "1",
    "-1",
    "20",
    "4096",
    "18446744073709551616",
    "99999999999999999999999",
    "1ms",
    "2s",
    "1.5m",
    "1e400s",
    "99999999999999999999h",
    "0s",
    "-1s",
    ".s",
    "nan",
    "inf",
    "512mb",
    "99999999999gb",
    "64kb",
    "true",
    "false",
    "yes",
    "enforce",
    "audit",
    "text",
    "json",
    "info",
    "pubwarden=debug,[",
    "127.0.0.1:6380",
    "[::1]:0",
    "localhost:6379",
    "host:99999",
    "10.0.0.0/8",
    "::1/129",
    "1.2.3.4/33",
    "sha256:0000000000000000000000000000000000000000000000000000000000000000",
    "sha256:zz",
    "@all",
    "@read",
    "@nope",
    "get",
    "client|kill",
    "GET",
    "orders.*",
    "a[",
    "[^a-z]*",
    "\\",
    "drop",
    "delay",
    "user",
    "channel",
    "PUBWARDEN_PROP_SURELY_UNSET",
];

fn doc() -> impl Strategy<Value = Doc> {
    let scalar = prop_oneof![
        4 => prop::sample::select(VALUES).prop_map(|s| Doc::Scalar(s.to_string())),
        1 => any::<String>().prop_map(Doc::Scalar),
    ];
    scalar.prop_recursive(5, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Doc::Seq),
            prop::collection::vec((prop::sample::select(KEYS), inner), 0..6).prop_map(|kv| {
                Doc::Map(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
            }),
        ]
    })
}

/// Flow style, every scalar double-quoted (valid YAML by construction,
/// except for duplicate keys, which the parser reports).
fn render_flow(d: &Doc, out: &mut String) {
    match d {
        Doc::Scalar(s) => {
            out.push('"');
            for c in s.chars() {
                match c {
                    '"' | '\\' => {
                        out.push('\\');
                        out.push(c);
                    }
                    c if (c as u32) < 0x20 || c == '\u{7f}' => {
                        out.push_str(&format!("\\x{:02x}", c as u32));
                    }
                    c => out.push(c),
                }
            }
            out.push('"');
        }
        Doc::Seq(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                render_flow(item, out);
            }
            out.push(']');
        }
        Doc::Map(entries) => {
            out.push('{');
            for (i, (k, v)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(k);
                out.push_str(": ");
                render_flow(v, out);
            }
            out.push('}');
        }
    }
}

/// Block style with plain scalars where they are simple words.
fn render_block(d: &Doc, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    match d {
        Doc::Scalar(s) => {
            if s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._/@*-".contains(c))
            {
                out.push_str(s);
            } else {
                render_flow(d, out);
            }
            out.push('\n');
        }
        Doc::Seq(items) if items.is_empty() => out.push_str("[]\n"),
        Doc::Map(entries) if entries.is_empty() => out.push_str("{}\n"),
        Doc::Seq(items) => {
            out.push('\n');
            for item in items {
                out.push_str(&format!("{pad}- "));
                render_block(item, indent + 2, out);
            }
        }
        Doc::Map(entries) => {
            out.push('\n');
            for (k, v) in entries {
                out.push_str(&format!("{pad}{k}: "));
                render_block(v, indent + 2, out);
            }
        }
    }
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn random_text_never_panics(text in prop_oneof![any::<String>(), yaml_soup()]) {
        parse_both(&text);
    }

    #[test]
    fn random_documents_never_panic(d in doc(), block in any::<bool>()) {
        let mut text = String::new();
        if block {
            render_block(&d, 0, &mut text);
        } else {
            render_flow(&d, &mut text);
        }
        parse_both(&text);
    }

    /// Flow collections nested up to and past the parser's limit, balanced
    /// or not.
    #[test]
    fn deep_flow_nesting_never_panics(
        opens in prop::collection::vec(prop::sample::select(vec!["[", "{a: ", "{? "]), 1..400),
        close in any::<bool>(),
        wrap in prop::sample::select(vec!["", "users: ", "metrics:\n  channel_groups: "]),
    ) {
        let mut text = String::from(wrap);
        for o in &opens {
            text.push_str(o);
        }
        text.push('x');
        if close {
            for o in opens.iter().rev() {
                text.push(if o.starts_with('[') { ']' } else { '}' });
            }
        }
        parse_both(&text);
    }

    /// Block sequences nested by indentation, up to a depth a real file
    /// could plausibly reach by mistake.
    #[test]
    fn moderate_block_nesting_never_panics(depth in 1usize..1500, key in prop::sample::select(vec!["", "users:\n  ", "rate_limits:\n  "])) {
        let text = format!("{key}{}x\n", "- ".repeat(depth));
        parse_both(&text);
    }
}

#[test]
fn long_strings_are_fine() {
    let long = "x".repeat(1 << 20);
    for text in [
        format!("users:\n  alice:\n    passwords: [\"{long}\"]\n"),
        format!("users:\n  {long}:\n    nopass: true\n"),
        format!("mode: {long}\n"),
        format!("listen: \"{long}\"\n"),
        format!("log:\n  level: \"{long}\"\n"),
        format!("metrics:\n  channel_groups:\n    - name: g\n      patterns: [\"{long}\"]\n"),
        format!(
            "rate_limits:\n  - name: r\n    users: [\"{}\"]\n    messages_per_second: 1\nusers:\n  {}:\n    nopass: true\n",
            "*a".repeat(5000),
            "a".repeat(5000)
        ),
        long.clone(),
        format!("'{long}"),
        format!("\"{long}"),
        format!("# {long}"),
    ] {
        parse_both(&text);
    }
}

/// Runs an ignored test of this binary in a child process, so that a stack
/// overflow fails one test instead of aborting all of them.
fn survives_in_child(child_test: &str) -> bool {
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", child_test, "--ignored", "--nocapture"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    status.success()
}

/// `config::yaml::parse` used to build its `Node` tree with no depth limit;
/// block collections nest by indentation without the YAML parser's flow-level
/// cap, so `"- ".repeat(100_000) + "x"` (200 KB) parsed, and dropping the tree
/// (recursive `Drop` of `Value::Seq(Vec<Node>)`) overflowed the stack, for
/// policy and settings files alike (now refused past `MAX_DEPTH`).
#[test]
fn regression_deep_block_nesting_overflows_the_stack() {
    assert!(
        survives_in_child("deep_block_nesting_child"),
        "YAML parsing crashed (stack overflow) on deeply nested block sequences"
    );
}

#[test]
#[ignore = "run by regression_deep_block_nesting_overflows_the_stack in a child process"]
fn deep_block_nesting_child() {
    let text = format!("{}x\n", "- ".repeat(100_000));
    // Any error is fine; crashing is not.
    let _ = schema::parse(&text);
    let _ = Settings::from_yaml(&text, &Overrides::default());
}

/// The renderers produce YAML the readers accept, so the random documents
/// reach past the YAML layer into the policy and settings readers.
#[test]
fn rendered_documents_are_understood() {
    let s = |v: &str| Doc::Scalar(v.to_string());
    let map =
        |kv: Vec<(&str, Doc)>| Doc::Map(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect());
    let policy = map(vec![
        ("mode", s("audit")),
        (
            "users",
            map(vec![(
                "alice",
                map(vec![
                    ("nopass", s("true")),
                    (
                        "channels",
                        map(vec![("publish", Doc::Seq(vec![s("orders.*")]))]),
                    ),
                ]),
            )]),
        ),
    ]);
    let settings = map(vec![
        ("listen", s("127.0.0.1:6380")),
        ("limits", map(vec![("max_bulk_len", s("64kb"))])),
    ]);
    for block in [false, true] {
        let render = |d: &Doc| {
            let mut text = String::new();
            if block {
                render_block(d, 0, &mut text);
            } else {
                render_flow(d, &mut text);
            }
            text
        };
        let text = render(&policy);
        assert!(schema::parse(&text).is_ok(), "{text}");
        let text = render(&settings);
        assert!(
            Settings::from_yaml(&text, &Overrides::default()).is_ok(),
            "{text}"
        );
    }
}
