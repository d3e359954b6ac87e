//! The policy file format (see `config/policy.yaml`) and its validation.
//! Every mistake is reported with its key path, line and column, all at once.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use super::commands::{CommandTable, category_bit};
use super::ratelimit::{Budget, Limiter};
use super::{
    Channels, Cidr, CommandRules, KeyBy, Mode, OnLimit, Policy, RateRule, Scope, StoreFailure,
    User, hash_password,
};
use crate::config::secret::{Secret, SecretSource};
use crate::config::yaml::boolean;
use crate::config::yaml::{self, ConfigError, ConfigErrors, MapView, Node, Pos, Reader, Value};

/// Reads and validates a policy file.
pub fn load(path: &Path) -> Result<Policy, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            path: String::new(),
            pos: Pos::default(),
            message: format!("cannot read policy {}: {e}", path.display()),
        }])
    })?;
    parse(&text)
}

/// Parses policy YAML.
pub fn parse(text: &str) -> Result<Policy, ConfigErrors> {
    let doc = yaml::parse(text)?;
    let mut r = Reader::default();
    let table = CommandTable::built_in();
    let root = r.map(
        &doc,
        "",
        &[
            "mode",
            "allow_plaintext_passwords",
            "auth",
            "users",
            "rate_limits",
        ],
    );
    let mode = r.field(&root, "mode", mode).unwrap_or(Mode::Enforce);
    let allow_plain = r
        .field(&root, "allow_plaintext_passwords", boolean)
        .unwrap_or(false);
    let auth = r.section(&root, "auth", &["max_failures_per_minute"]);
    let max_failures = r
        .field(&auth, "max_failures_per_minute", yaml::number(0, 1_000_000))
        .map_or(20, |n| n as u32);

    let mut users = Vec::new();
    if let Some((node, path)) = root.as_ref().and_then(|m| m.get("users")) {
        match &node.value {
            Value::Map(entries) => {
                for (k, v) in entries {
                    if let Value::Scalar(name, _) = &k.value {
                        let upath = yaml::join(&path, name);
                        if name.is_empty() || name.contains(char::is_whitespace) {
                            r.error(
                                &upath,
                                k.pos,
                                "user names must be non-empty and without spaces",
                            );
                        }
                        if let Some(u) = user(&mut r, name, v, &upath, allow_plain, &table) {
                            users.push(u);
                        }
                    }
                }
            }
            Value::Null => {}
            _ => r.error(&path, node.pos, "expected a mapping of user names to users"),
        }
    }

    let mut rate_rules = Vec::new();
    if let Some((node, path)) = root.as_ref().and_then(|m| m.get("rate_limits")) {
        let mut names = HashSet::new();
        for (i, item) in seq(&mut r, node, &path).into_iter().enumerate() {
            let ipath = format!("{path}[{i}]");
            if let Some(rule) = rate_rule(&mut r, item, &ipath) {
                if !names.insert(rule.name.clone()) {
                    r.error(
                        &ipath,
                        item.pos,
                        format!("a rate limit named `{}` already exists", rule.name),
                    );
                }
                rate_rules.push(rule);
            }
        }
    }

    for u in &mut users {
        u.rate_rules = rate_rules
            .iter()
            .enumerate()
            .filter(|(_, rule)| {
                rule.users.is_empty()
                    || rule
                        .users
                        .iter()
                        .any(|g| crate::glob::matches(g.as_bytes(), u.name.as_bytes()))
            })
            .map(|(i, _)| i)
            .collect();
    }
    let default_user = users.iter().position(|u| u.name == "default");
    let mut claimed: std::collections::HashMap<&str, &str> = std::collections::HashMap::new();
    for u in &users {
        for id in &u.tls_identities {
            if let Some(other) = claimed.insert(id, &u.name)
                && other != u.name
            {
                r.error(
                    &format!("users.{}.tls_identities", u.name),
                    Pos::default(),
                    format!(
                        "`{id}` already names user `{other}`: a certificate must map to one user"
                    ),
                );
            }
        }
    }

    if !r.errors.is_empty() {
        return Err(ConfigErrors(r.errors));
    }
    Ok(Policy {
        mode,
        allow_plaintext_passwords: allow_plain,
        users,
        default_user,
        max_auth_failures_per_minute: max_failures,
        rate_rules,
    })
}

fn mode(t: &str) -> Result<Mode, String> {
    match t.trim() {
        "enforce" => Ok(Mode::Enforce),
        "audit" => Ok(Mode::Audit),
        other => Err(format!("`{other}` is not a mode (use enforce or audit)")),
    }
}

/// The items of a list (null: none).
fn seq<'a>(r: &mut Reader, node: &'a Node, path: &str) -> Vec<&'a Node> {
    r.items(node, path, "values, e.g. [\"orders.*\"]")
        .into_iter()
        .map(|(item, _)| item)
        .collect()
}

/// A list of strings at `key`.
fn strings(r: &mut Reader, map: &Option<MapView<'_>>, key: &str) -> Option<Vec<String>> {
    let (node, path) = map.as_ref()?.get(key)?;
    Some(r.strings(node, &path, "values, e.g. [\"orders.*\"]"))
}

fn channels(r: &mut Reader, map: &Option<MapView<'_>>, key: &str) -> Channels {
    let patterns = strings(r, map, key).unwrap_or_default();
    Channels::from_patterns(
        patterns
            .into_iter()
            .map(|p| p.into_bytes().into_boxed_slice())
            .collect(),
    )
}

fn user(
    r: &mut Reader,
    name: &str,
    node: &Node,
    path: &str,
    allow_plain: bool,
    table: &CommandTable,
) -> Option<User> {
    let m = r.map(
        node,
        path,
        &[
            "enabled",
            "nopass",
            "passwords",
            "sources",
            "max_connections",
            "mode",
            "channels",
            "commands",
            "subscribe_ops_per_second",
            "resubscribe",
            "tls_identities",
        ],
    );
    m.as_ref()?;
    let tls_identities = match m.as_ref().and_then(|mm| mm.get("tls_identities")) {
        Some((node, ipath)) => r
            .items(node, &ipath, "certificate identities, e.g. [\"cn:orders\"]")
            .into_iter()
            .filter_map(|(item, item_path)| {
                let text = r.scalar(item, &item_path)?.trim().to_string();
                match tls_identity(&text) {
                    Ok(()) => Some(text),
                    Err(e) => {
                        r.error(&item_path, item.pos, e);
                        None
                    }
                }
            })
            .collect(),
        None => Vec::new(),
    };
    let enabled = r.field(&m, "enabled", boolean).unwrap_or(true);
    let nopass = r.field(&m, "nopass", boolean).unwrap_or(false);
    let mut passwords = Vec::new();
    if let Some((node, ppath)) = m.as_ref().and_then(|m| m.get("passwords")) {
        for (i, item) in seq(r, node, &ppath).into_iter().enumerate() {
            let ipath = format!("{ppath}[{i}]");
            if let Some(h) = password(r, item, &ipath, allow_plain) {
                passwords.push(h);
            }
        }
    }
    if !nopass && passwords.is_empty() && tls_identities.is_empty() && enabled {
        r.error(
            path,
            node.pos,
            format!("user `{name}` needs `passwords`, `tls_identities` or `nopass: true`"),
        );
    }
    if nopass && !passwords.is_empty() {
        r.error(
            path,
            node.pos,
            "`nopass: true` and `passwords` contradict each other",
        );
    }
    let sources = match m.as_ref().and_then(|mm| mm.get("sources")) {
        Some((node, spath)) => seq(r, node, &spath)
            .into_iter()
            .enumerate()
            .filter_map(|(i, item)| {
                let ipath = format!("{spath}[{i}]");
                let text = r.scalar(item, &ipath)?;
                Cidr::parse(text)
                    .map_err(|e| r.error(&ipath, item.pos, e))
                    .ok()
            })
            .collect(),
        None => Vec::new(),
    };
    let max_connections = r
        .field(&m, "max_connections", yaml::number(1, 10_000_000))
        .map(|n| n as u32);
    let user_mode = r.field(&m, "mode", mode);
    let ch = r.section(&m, "channels", &["publish", "subscribe", "deny"]);
    let publish = channels(r, &ch, "publish");
    let subscribe = channels(r, &ch, "subscribe");
    let deny = channels(r, &ch, "deny").patterns;
    let commands = match m.as_ref().and_then(|mm| mm.get("commands")) {
        Some(_) => {
            let cm = r.section(&m, "commands", &["allow", "deny"]);
            let mut rules = CommandRules::default();
            for (key, allow) in [("allow", true), ("deny", false)] {
                let Some((node, lpath)) = cm.as_ref().and_then(|c| c.get(key)) else {
                    continue;
                };
                for (i, item) in seq(r, node, &lpath).into_iter().enumerate() {
                    let ipath = format!("{lpath}[{i}]");
                    let Some(text) = r.scalar(item, &ipath) else {
                        continue;
                    };
                    if let Err(e) = add_command_rule(&mut rules, text, allow, table) {
                        r.error(&ipath, item.pos, e);
                    }
                }
            }
            rules
        }
        None => CommandRules::safe_default(),
    };
    let churn_rate = r.field(&m, "subscribe_ops_per_second", yaml::number(1, 10_000_000));
    let churn = churn_rate
        .and_then(|n| Budget::new(n, n))
        .map(|b| Mutex::new(Limiter::new(b, None, 1)));
    Some(User {
        name: name.to_string(),
        enabled,
        nopass,
        passwords,
        sources,
        max_connections,
        mode: user_mode,
        publish,
        subscribe,
        deny,
        commands,
        subscribe_ops_per_second: churn_rate.map(|n| n as u32),
        rate_rules: Vec::new(),
        churn,
        resubscribe: r.field(&m, "resubscribe", boolean),
        tls_identities,
    })
}

/// A client certificate identity: `cn:`, `dns:`, `uri:`, `email:` or `ip:`
/// followed by the exact name.
fn tls_identity(text: &str) -> Result<(), String> {
    let bad = || {
        format!(
            "`{text}` is not a certificate identity (use cn:NAME, dns:NAME, uri:URI, email:ADDRESS or ip:ADDRESS)"
        )
    };
    let (kind, name) = text.split_once(':').ok_or_else(bad)?;
    if name.is_empty() {
        return Err(bad());
    }
    match kind {
        "cn" | "dns" | "uri" | "email" => Ok(()),
        // Compared in the form the certificate's address is printed in.
        "ip" => match name.parse::<std::net::IpAddr>() {
            Ok(ip) if ip.to_string() == name => Ok(()),
            Ok(ip) => Err(format!("write `{text}` as `ip:{ip}`")),
            Err(_) => Err(bad()),
        },
        _ => Err(bad()),
    }
}

fn add_command_rule(
    rules: &mut CommandRules,
    text: &str,
    allow: bool,
    table: &CommandTable,
) -> Result<(), String> {
    let t = text.trim().to_ascii_lowercase();
    if let Some(cat) = t.strip_prefix('@') {
        if cat == "all" {
            if allow {
                rules.allow_all = true;
            } else {
                rules.deny_all = true;
            }
            return Ok(());
        }
        let bit =
            category_bit(cat).ok_or_else(|| format!("`{text}` is not a Redis ACL category"))?;
        if allow {
            rules.allow_categories |= bit;
        } else {
            rules.deny_categories |= bit;
        }
        return Ok(());
    }
    if !table.contains(&t) {
        return Err(format!(
            "`{text}` is not a Redis command (use names like `get` or `client|kill`, or categories like `@read`)"
        ));
    }
    if allow {
        rules.allow_names.insert(t);
    } else {
        rules.deny_names.insert(t);
    }
    Ok(())
}

fn password(r: &mut Reader, node: &Node, path: &str, allow_plain: bool) -> Option<[u8; 32]> {
    match &node.value {
        Value::Scalar(text, _) => {
            let hex = text.trim().strip_prefix("sha256:");
            match hex.and_then(parse_hex32) {
                Some(h) => Some(h),
                None => {
                    r.error(
                        path,
                        node.pos,
                        "expected `sha256:<64 hex digits>` (pubwarden hash-password prints one), or {env: VAR} / {file: PATH}",
                    );
                    None
                }
            }
        }
        Value::Map(_) => {
            let m = r.map(node, path, &["env", "file", "plain"]);
            let env = r.field(&m, "env", |t| Ok(t.to_string()));
            let file = r.field(&m, "file", |t| Ok(t.to_string()));
            let plain = r.field(&m, "plain", |t| Ok(t.to_string()));
            let (source, inline) = match (env, file, plain) {
                (Some(v), None, None) => (SecretSource::Env(v), None),
                (None, Some(p), None) => (SecretSource::File(p), None),
                (None, None, Some(p)) => {
                    if !allow_plain {
                        r.error(
                            path,
                            node.pos,
                            "plain-text passwords are refused unless `allow_plaintext_passwords: true` (use a sha256 hash, env or file)",
                        );
                        return None;
                    }
                    (SecretSource::Plain, Some(p))
                }
                _ => {
                    r.error(path, node.pos, "give exactly one of env, file or plain");
                    return None;
                }
            };
            match Secret::load(source, inline.as_deref()) {
                Ok(secret) => Some(hash_password(secret.expose())),
                Err(e) => {
                    r.error(path, node.pos, e);
                    None
                }
            }
        }
        _ => {
            r.error(
                path,
                node.pos,
                "expected a sha256 hash or {env: VAR} / {file: PATH}",
            );
            None
        }
    }
}

fn parse_hex32(hex: &str) -> Option<[u8; 32]> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

fn rate_rule(r: &mut Reader, node: &Node, path: &str) -> Option<RateRule> {
    let m = r.map(
        node,
        path,
        &[
            "name",
            "users",
            "channels",
            "commands",
            "messages_per_second",
            "bytes_per_second",
            "burst",
            "key",
            "on_limit",
            "max_delay",
            "scope",
            "instances",
            "on_store_failure",
        ],
    );
    m.as_ref()?;
    let name = r.field(&m, "name", |t| Ok(t.trim().to_string()));
    if name.is_none() {
        r.error(
            path,
            node.pos,
            "a rate limit needs a `name` (it appears in errors and metrics)",
        );
    }
    let users = strings(r, &m, "users").unwrap_or_default();
    let channels = m
        .as_ref()
        .and_then(|mm| mm.get("channels"))
        .map(|_| channels(r, &m, "channels"));
    let (mut publish, mut spublish) = (true, true);
    if let Some((cnode, cpath)) = m.as_ref().and_then(|mm| mm.get("commands")) {
        (publish, spublish) = (false, false);
        for (i, item) in seq(r, cnode, &cpath).into_iter().enumerate() {
            match r.scalar(item, &format!("{cpath}[{i}]")).map(str::to_ascii_lowercase).as_deref() {
                Some("publish") => publish = true,
                Some("spublish") => spublish = true,
                Some(other) => r.error(
                    &format!("{cpath}[{i}]"),
                    item.pos,
                    format!("`{other}` cannot be rate limited here: use publish or spublish (subscriptions have subscribe_ops_per_second)"),
                ),
                None => {}
            }
        }
    }
    let messages = r.field(&m, "messages_per_second", yaml::number(1, 1_000_000_000));
    // A bad value was already reported; only a missing key needs saying.
    let missing = m
        .as_ref()
        .is_none_or(|mm| mm.get("messages_per_second").is_none());
    if messages.is_none() && missing {
        r.error(
            path,
            node.pos,
            "a rate limit needs `messages_per_second` (at least 1)",
        );
    }
    let bytes = r.field(&m, "bytes_per_second", |t| {
        let n = yaml::size(t)?;
        if n == 0 {
            Err("must be at least 1".into())
        } else {
            Ok(n)
        }
    });
    let burst = r.field(&m, "burst", yaml::number(1, 1_000_000_000));
    let key = r
        .field(&m, "key", |t| match t.trim() {
            "user" => Ok(KeyBy::User),
            "channel" => Ok(KeyBy::Channel),
            "user_channel" => Ok(KeyBy::UserChannel),
            "global" => Ok(KeyBy::Global),
            other => Err(format!(
                "`{other}` is not a key (use user, channel, user_channel or global)"
            )),
        })
        .unwrap_or(KeyBy::User);
    let delay = r
        .field(&m, "on_limit", |t| match t.trim() {
            "reject" => Ok(false),
            "delay" => Ok(true),
            other => Err(format!("`{other}` is not an action (use reject or delay)")),
        })
        .unwrap_or(false);
    let max_delay = r
        .field(&m, "max_delay", yaml::duration)
        .unwrap_or(Duration::from_millis(100));
    let global = r
        .field(&m, "scope", |t| match t.trim() {
            "local" => Ok(false),
            "global" => Ok(true),
            other => Err(format!("`{other}` is not a scope (use local or global)")),
        })
        .unwrap_or(false);
    let instances = r.field(&m, "instances", yaml::number(1, 100_000));
    let on_store_failure = r.field(&m, "on_store_failure", |t| match t.trim() {
        "fail_open" => Ok(StoreFailure::FailOpen),
        "fail_closed" => Ok(StoreFailure::FailClosed),
        other => Err(format!(
            "`{other}` is not a store failure mode (use fail_open or fail_closed)"
        )),
    });
    if !global && (instances.is_some() || on_store_failure.is_some()) {
        r.error(
            path,
            node.pos,
            "`instances` and `on_store_failure` apply only to `scope: global`",
        );
    }
    if global && bytes.is_some() {
        r.error(
            path,
            node.pos,
            "`bytes_per_second` is not supported with `scope: global` (only messages are shared); use a local rule for bytes",
        );
    }
    let (name, messages) = (name?, messages?);
    let burst = burst.unwrap_or(messages);
    let scope = if global {
        Scope::Global {
            instances: instances.unwrap_or(1),
            on_store_failure: on_store_failure.unwrap_or(StoreFailure::FailOpen),
        }
    } else {
        Scope::Local
    };
    // A global rule's local limiter is its share, used while the store is down.
    let share = |n: u64| match scope {
        Scope::Global { instances, .. } => (n / instances).max(1),
        Scope::Local => n,
    };
    let budget = Budget::new(share(messages), share(burst))?;
    // Bytes may arrive in one payload as large as a second's worth.
    let byte_budget = bytes.and_then(|b| Budget::new(b, b));
    Some(RateRule {
        name,
        users,
        channels,
        publish,
        spublish,
        messages_per_second: messages,
        bytes_per_second: bytes,
        burst,
        key,
        on_limit: if delay {
            OnLimit::Delay(max_delay)
        } else {
            OnLimit::Reject
        },
        limiter: Mutex::new(Limiter::new(budget, byte_budget, super::MAX_RATE_KEYS)),
        scope,
        leases: Mutex::new(std::collections::HashMap::new()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_identities() {
        let p = parse(
            "users:\n  orders:\n    tls_identities: [\"cn:orders\", \"ip:10.0.0.1\"]\n  billing:\n    tls_identities: [\"uri:spiffe://prod/billing\"]\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let ids = ["dns:x".to_string(), "ip:10.0.0.1".to_string()];
        assert_eq!(
            p.user_by_identity(&ids).map(|(_, u)| u.name.as_str()),
            Some("orders")
        );
        assert!(p.user_by_identity(&["cn:nobody".to_string()]).is_none());
        let e = parse(
            "users:\n  a:\n    tls_identities: [\"cn:x\"]\n  b:\n    tls_identities: [\"cn:x\", \"CN=y\", \"ip:010.0.0.1\"]\n",
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(e.contains("`cn:x` already names user `a`"), "{e}");
        assert!(e.contains("`CN=y` is not a certificate identity"), "{e}");
        assert!(e.contains("ip:010.0.0.1"), "{e}");
    }

    #[test]
    fn shipped_example_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/policy.yaml");
        let p = load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.users.len(), 3);
        assert_eq!(
            p.implicit_user().map(|i| p.users[i].name.as_str()),
            Some("default")
        );
        let orders = p.user(b"orders-service").unwrap().1;
        assert!(orders.verify(b"password"));
        assert!(orders.may_publish(b"orders.created"));
        assert!(!orders.may_publish(b"orders.internal.audit"));
        assert!(orders.may_psubscribe(b"orders.*"));
        assert!(!orders.may_psubscribe(b"orders.x*"));
        assert_eq!(orders.rate_rules, vec![0]);
        let text = p.explain(&CommandTable::built_in());
        assert!(text.contains("user orders-service:"), "{text}");
        assert!(
            text.contains("may publish to orders.* except orders.internal.*"),
            "{text}"
        );
    }

    #[test]
    fn every_mistake_is_reported() {
        let text = "mode: strict\nusers:\n  bob:\n    passwords:\n      - {plain: hunter2}\n    channels:\n      publish: orders\n    commands:\n      allow: [\"@nope\", getx]\n    colour: blue\nrate_limits:\n  - name: r\n    messages_per_second: 0\n    key: pod\n";
        let err = parse(text).unwrap_err();
        let lines: Vec<String> = err.0.iter().map(ToString::to_string).collect();
        let all = lines.join("\n");
        for needle in [
            "mode (line 1",
            "users.bob.colour (line 10",
            "users.bob.passwords[0] (line 5",
            "users.bob.channels.publish (line 7",
            "users.bob.commands.allow[0] (line 9",
            "users.bob.commands.allow[1] (line 9",
            "rate_limits[0].messages_per_second (line 13",
            "rate_limits[0].key (line 14",
        ] {
            assert!(all.contains(needle), "missing {needle} in:\n{all}");
        }
        assert!(!all.contains("hunter2"), "secrets never appear in errors");
    }
}
