//! The `metrics:` section of the settings file.

use std::fmt;

use crate::config::yaml::{MapView, Node, Reader, Value, join};

use super::groups::{OTHER, OVERFLOW};
use crate::config::yaml::boolean;

/// Most channel groups allowed: each multiplies the series of every
/// per-group family.
pub const MAX_GROUPS: usize = 63;

#[derive(Debug, Clone, PartialEq)]
pub struct MetricsSettings {
    /// Count anything at all; off leaves `/metrics` with the process-level
    /// families only, for measuring what metrics cost.
    pub enabled: bool,
    /// Ordered rules mapping channels to group labels.
    pub channel_groups: Vec<ChannelGroup>,
    pub per_channel: PerChannel,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ChannelGroup {
    /// The `group` label value.
    pub name: String,
    /// Redis glob patterns; any one matching puts a channel in this group.
    pub patterns: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PerChannel {
    /// Also count publishes and deliveries per channel name.
    pub enabled: bool,
    /// Distinct channel labels before new channels count as `overflow`.
    pub max_channels: usize,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            channel_groups: Vec::new(),
            per_channel: PerChannel {
                enabled: false,
                max_channels: 100,
            },
        }
    }
}

/// Label values people will type into PromQL: no quoting surprises.
fn group_name(text: &str) -> Result<String, String> {
    let t = text.trim();
    let ok = !t.is_empty()
        && t.len() <= 64
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'));
    if !ok {
        return Err(format!(
            "`{text}` is not a group name (1-64 characters of A-Z a-z 0-9 _ - . :)"
        ));
    }
    if t == OTHER || t == OVERFLOW {
        return Err(format!(
            "`{t}` is reserved for channels no rule matches (or past the cap)"
        ));
    }
    Ok(t.to_string())
}

/// Reads `metrics:` from the settings root into `out`, reporting mistakes
/// on `r` with their path and position.
pub fn read(r: &mut Reader, root: &Option<MapView<'_>>, out: &mut MetricsSettings) {
    let m = r.section(
        root,
        "metrics",
        &["enabled", "channel_groups", "per_channel"],
    );
    if let Some(v) = r.field(&m, "enabled", boolean) {
        out.enabled = v;
    }
    if let Some((node, path)) = m.as_ref().and_then(|m| m.get("channel_groups")) {
        out.channel_groups = read_groups(r, node, &path);
    }
    let pc = r.section(&m, "per_channel", &["enabled", "max_channels"]);
    if let Some(v) = r.field(&pc, "enabled", boolean) {
        out.per_channel.enabled = v;
    }
    if let Some(v) = r.field(&pc, "max_channels", crate::config::yaml::number(1, 10_000)) {
        out.per_channel.max_channels = v as usize;
    }
}

fn read_groups(r: &mut Reader, node: &Node, path: &str) -> Vec<ChannelGroup> {
    let items = r.items(node, path, "{name, patterns} entries");
    if items.len() > MAX_GROUPS {
        r.error(
            path,
            node.pos,
            format!("{} groups; at most {MAX_GROUPS} are allowed", items.len()),
        );
    }
    let mut groups: Vec<ChannelGroup> = Vec::new();
    for (item, item_path) in items {
        let map = r.map(item, &item_path, &["name", "patterns"]);
        let name_path = join(&item_path, "name");
        let name = match map.as_ref().and_then(|m| m.get("name")) {
            Some((n, p)) => r.scalar(n, &p).and_then(|t| match group_name(t) {
                Ok(name) if groups.iter().any(|g| g.name == name) => {
                    r.error(&p, n.pos, format!("group `{name}` is defined twice"));
                    None
                }
                Ok(name) => Some(name),
                Err(e) => {
                    r.error(&p, n.pos, e);
                    None
                }
            }),
            None => {
                if map.is_some() {
                    r.error(&name_path, item.pos, "is missing");
                }
                None
            }
        };
        let patterns_path = join(&item_path, "patterns");
        let patterns = match map.as_ref().and_then(|m| m.get("patterns")) {
            Some((n, p)) => read_patterns(r, n, &p),
            None => {
                if map.is_some() {
                    r.error(&patterns_path, item.pos, "is missing");
                }
                None
            }
        };
        if let (Some(name), Some(patterns)) = (name, patterns) {
            groups.push(ChannelGroup { name, patterns });
        }
    }
    groups
}

fn read_patterns(r: &mut Reader, node: &Node, path: &str) -> Option<Vec<String>> {
    let Value::Seq(items) = &node.value else {
        r.error(path, node.pos, "expected a list of Redis glob patterns");
        return None;
    };
    if items.is_empty() {
        r.error(path, node.pos, "needs at least one pattern");
        return None;
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let p = format!("{path}[{i}]");
        match r.scalar(item, &p) {
            Some("") => r.error(&p, item.pos, "is empty"),
            Some(t) => out.push(t.to_string()),
            None => {}
        }
    }
    (out.len() == items.len()).then_some(out)
}

/// Quotes a scalar for YAML output when plain style would change its meaning.
fn yaml_str(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'/'));
    if plain {
        s.to_string()
    } else {
        let escaped = s.replace('\\', "\\\\").replace('"', "\\\"");
        format!("\"{escaped}\"")
    }
}

/// The section as YAML, as `check-config` prints it.
impl fmt::Display for MetricsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "metrics:")?;
        writeln!(f, "  enabled: {}", self.enabled)?;
        if self.channel_groups.is_empty() {
            writeln!(f, "  channel_groups: []")?;
        } else {
            writeln!(f, "  channel_groups:")?;
            for g in &self.channel_groups {
                writeln!(f, "    - name: {}", yaml_str(&g.name))?;
                let pats: Vec<String> = g.patterns.iter().map(|p| yaml_str(p)).collect();
                writeln!(f, "      patterns: [{}]", pats.join(", "))?;
            }
        }
        writeln!(f, "  per_channel:")?;
        writeln!(f, "    enabled: {}", self.per_channel.enabled)?;
        writeln!(f, "    max_channels: {}", self.per_channel.max_channels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::yaml;

    fn parse(text: &str) -> (MetricsSettings, Vec<String>) {
        let doc = yaml::parse(text).unwrap();
        let mut r = Reader::default();
        let root = r.map(&doc, "", &["metrics"]);
        let mut s = MetricsSettings::default();
        read(&mut r, &root, &mut s);
        (s, r.errors.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn groups_in_order_and_printed_back() {
        let text = "metrics:\n  channel_groups:\n    - name: orders\n      patterns: [\"orders.*\", \"order-[0-9]\"]\n    - name: chat\n      patterns:\n        - \"chat:*\"\n  per_channel:\n    enabled: true\n    max_channels: 50\n";
        let (s, errs) = parse(text);
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(s.channel_groups.len(), 2);
        assert_eq!(s.channel_groups[1].patterns, vec!["chat:*".to_string()]);
        assert!(s.per_channel.enabled);
        let (again, errs) = parse(&s.to_string());
        assert!(errs.is_empty(), "{errs:?}\n{s}");
        assert_eq!(again, s);
    }

    #[test]
    fn mistakes_name_their_path_and_line() {
        let text = "metrics:\n  channel_groups:\n    - name: other\n      patterns: [a]\n    - name: ok\n      patterns: []\n    - patterns: [x]\n    - name: ok2\n      patterns: [\"\"]\n      bogus: 1\n  per_channel:\n    max_channels: 0\n";
        let (_, errs) = parse(text);
        assert_eq!(errs.len(), 6, "{errs:?}");
        assert!(errs[0].starts_with(
            "metrics.channel_groups[0].name (line 3, column 13): `other` is reserved"
        ));
        assert!(errs[1].starts_with("metrics.channel_groups[1].patterns (line 6"));
        assert!(errs[2].starts_with("metrics.channel_groups[2].name (line 7"));
        assert!(errs[3].starts_with("metrics.channel_groups[3].bogus (line 10"));
        assert!(errs[4].starts_with("metrics.channel_groups[3].patterns[0] (line 9"));
        assert!(errs[5].starts_with("metrics.per_channel.max_channels (line 12"));
    }
}
