//! A small YAML document model that remembers where every value came from,
//! and a reader that turns it into typed settings while collecting *every*
//! mistake (with its key path, line and column) instead of stopping at the
//! first, so an operator fixes a file in one pass.

use std::fmt;
use std::time::Duration;

use saphyr_parser::{Event, Parser, ScalarStyle};

/// Where a value sits in the file (1-based).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    /// A scalar and whether it was quoted (quoted scalars are always strings).
    Scalar(String, bool),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub value: Value,
    pub pos: Pos,
}

impl Node {
    fn kind(&self) -> &'static str {
        match &self.value {
            Value::Null => "nothing",
            Value::Scalar(..) => "a scalar",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }
}

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub pos: Pos,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = if self.path.is_empty() {
            "(document)"
        } else {
            &self.path
        };
        write!(
            f,
            "{path} (line {}, column {}): {}",
            self.pos.line, self.pos.col, self.message
        )
    }
}

/// Every problem found in one file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

fn pos_of(m: &saphyr_parser::Marker) -> Pos {
    Pos {
        line: m.line(),
        col: m.col() + 1,
    }
}

/// Deepest nesting of lists and mappings a configuration file may have.
const MAX_DEPTH: usize = 32;

/// Parses one YAML document. Aliases are refused (they buy nothing in a
/// settings file and are how "billion laughs" documents grow), and so are
/// duplicate keys, which YAML libraries otherwise resolve silently.
pub fn parse(text: &str) -> Result<Node, ConfigErrors> {
    let fail = |pos: Pos, message: String| {
        ConfigErrors(vec![ConfigError {
            path: String::new(),
            pos,
            message,
        }])
    };
    enum Open {
        Seq(Pos, Vec<Node>),
        Map(Pos, Vec<(Node, Node)>, Option<Node>),
    }
    let mut stack: Vec<Open> = Vec::new();
    let mut root: Option<Node> = None;
    let mut documents = 0;
    for event in Parser::new_from_str(text) {
        let (event, span) =
            event.map_err(|e| fail(pos_of(e.marker()), format!("invalid YAML: {}", e.info())))?;
        let pos = pos_of(&span.start);
        let node = match event {
            Event::DocumentStart(_) => {
                documents += 1;
                if documents > 1 {
                    return Err(fail(pos, "only one YAML document is allowed".into()));
                }
                continue;
            }
            Event::Alias(_) => return Err(fail(pos, "YAML aliases are not supported".into())),
            Event::Scalar(text, style, _, _) => {
                let quoted = !matches!(style, ScalarStyle::Plain);
                let value =
                    if !quoted && matches!(text.as_ref(), "" | "~" | "null" | "Null" | "NULL") {
                        Value::Null
                    } else {
                        Value::Scalar(text.into_owned(), quoted)
                    };
                Node { value, pos }
            }
            Event::SequenceStart(..) | Event::MappingStart(..) if stack.len() >= MAX_DEPTH => {
                // Settings and policies are a few levels deep; a deeper document
                // is a mistake or an attack, and would only cost stack later.
                return Err(fail(pos, format!("nesting deeper than {MAX_DEPTH} levels")));
            }
            Event::SequenceStart(..) => {
                stack.push(Open::Seq(pos, Vec::new()));
                continue;
            }
            Event::MappingStart(..) => {
                stack.push(Open::Map(pos, Vec::new(), None));
                continue;
            }
            Event::SequenceEnd => match stack.pop() {
                Some(Open::Seq(pos, items)) => Node {
                    value: Value::Seq(items),
                    pos,
                },
                _ => return Err(fail(pos, "unbalanced sequence".into())),
            },
            Event::MappingEnd => match stack.pop() {
                Some(Open::Map(pos, entries, _)) => Node {
                    value: Value::Map(entries),
                    pos,
                },
                _ => return Err(fail(pos, "unbalanced mapping".into())),
            },
            _ => continue,
        };
        match stack.last_mut() {
            None => root = Some(node),
            Some(Open::Seq(_, items)) => items.push(node),
            Some(Open::Map(_, entries, key)) => match key.take() {
                None => {
                    let Value::Scalar(name, _) = &node.value else {
                        return Err(fail(node.pos, "mapping keys must be plain strings".into()));
                    };
                    if entries
                        .iter()
                        .any(|(k, _)| matches!(&k.value, Value::Scalar(n, _) if n == name))
                    {
                        return Err(fail(node.pos, format!("duplicate key `{name}`")));
                    }
                    *key = Some(node);
                }
                Some(k) => entries.push((k, node)),
            },
        }
    }
    Ok(root.unwrap_or(Node {
        value: Value::Map(Vec::new()),
        pos: Pos { line: 1, col: 1 },
    }))
}

/// Reads typed values out of a [`Node`] tree, collecting errors.
#[derive(Default)]
pub struct Reader {
    pub errors: Vec<ConfigError>,
}

/// A mapping whose keys were checked against the known ones.
pub struct MapView<'a> {
    path: String,
    entries: &'a [(Node, Node)],
}

impl<'a> MapView<'a> {
    pub fn get(&self, key: &str) -> Option<(&'a Node, String)> {
        self.entries.iter().find_map(|(k, v)| match &k.value {
            Value::Scalar(name, _) if name == key => Some((v, join(&self.path, key))),
            _ => None,
        })
    }

    pub fn path(&self) -> &str {
        &self.path
    }
}

pub fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

impl Reader {
    pub fn error(&mut self, path: &str, pos: Pos, message: impl Into<String>) {
        self.errors.push(ConfigError {
            path: path.to_string(),
            pos,
            message: message.into(),
        });
    }

    /// A mapping with only the given keys (a null counts as an empty mapping).
    pub fn map<'a>(&mut self, node: &'a Node, path: &str, known: &[&str]) -> Option<MapView<'a>> {
        let entries: &'a [(Node, Node)] = match &node.value {
            Value::Map(entries) => entries,
            Value::Null => &[],
            _ => {
                self.error(
                    path,
                    node.pos,
                    format!("expected a mapping, found {}", node.kind()),
                );
                return None;
            }
        };
        for (k, _) in entries {
            if let Value::Scalar(name, _) = &k.value
                && !known.contains(&name.as_str())
            {
                self.error(
                    &join(path, name),
                    k.pos,
                    format!(
                        "unknown key `{name}` (expected one of: {})",
                        known.join(", ")
                    ),
                );
            }
        }
        Some(MapView {
            path: path.to_string(),
            entries,
        })
    }

    /// A scalar's text; `None` (after reporting) for lists and mappings.
    pub fn scalar<'a>(&mut self, node: &'a Node, path: &str) -> Option<&'a str> {
        match &node.value {
            Value::Scalar(s, _) => Some(s),
            _ => {
                self.error(
                    path,
                    node.pos,
                    format!("expected a single value, found {}", node.kind()),
                );
                None
            }
        }
    }

    /// The items of a list with their key paths (`key[i]`); null is an empty
    /// list, anything else is reported as not `a list of {what}`.
    pub fn items<'a>(&mut self, node: &'a Node, path: &str, what: &str) -> Vec<(&'a Node, String)> {
        match &node.value {
            Value::Seq(items) => items
                .iter()
                .enumerate()
                .map(|(i, item)| (item, format!("{path}[{i}]")))
                .collect(),
            Value::Null => Vec::new(),
            _ => {
                self.error(path, node.pos, format!("expected a list of {what}"));
                Vec::new()
            }
        }
    }

    /// A list of strings (null: none); items that are not strings are reported.
    pub fn strings(&mut self, node: &Node, path: &str, what: &str) -> Vec<String> {
        let mut out = Vec::new();
        for (item, item_path) in self.items(node, path, what) {
            if let Some(s) = self.scalar(item, &item_path) {
                out.push(s.to_string());
            }
        }
        out
    }

    /// Converts the scalar at `key` with `parse`, which explains failures.
    pub fn field<T>(
        &mut self,
        map: &Option<MapView<'_>>,
        key: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        let (node, path) = map.as_ref()?.get(key)?;
        if matches!(node.value, Value::Null) {
            return None;
        }
        let text = self.scalar(node, &path)?;
        match parse(text) {
            Ok(v) => Some(v),
            Err(message) => {
                self.error(&path, node.pos, message);
                None
            }
        }
    }

    /// The nested mapping at `key` (absent or null: an empty one).
    pub fn section<'a>(
        &mut self,
        map: &Option<MapView<'a>>,
        key: &str,
        known: &[&str],
    ) -> Option<MapView<'a>> {
        let parent = map.as_ref()?;
        match parent.get(key) {
            Some((node, path)) => self.map(node, &path, known),
            None => Some(MapView {
                path: join(parent.path(), key),
                entries: &[],
            }),
        }
    }
}

/// `250ms`, `2s`, `1m`, `1h`: a unit is required so nobody guesses.
pub fn duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{text}` is not a duration (use e.g. 500ms, 2s, 1m)"))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "" => return Err(format!("`{text}` needs a unit (ms, s, m or h)")),
        other => {
            return Err(format!(
                "unknown duration unit `{other}` (use ms, s, m or h)"
            ));
        }
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("`{text}` is out of range"))
}

/// A byte size as redis.conf writes them: `512mb`, `64kb`, `1gb` or plain bytes.
pub fn size(text: &str) -> Result<u64, String> {
    let t = text.trim().to_ascii_lowercase();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{text}` is not a size (use e.g. 65536, 64kb, 512mb)"))?;
    let mult: u64 = match unit.trim() {
        "" | "b" => 1,
        "k" => 1000,
        "kb" => 1024,
        "m" => 1000 * 1000,
        "mb" => 1024 * 1024,
        "g" => 1000 * 1000 * 1000,
        "gb" => 1024 * 1024 * 1024,
        other => return Err(format!("unknown size unit `{other}` (use b, kb, mb or gb)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("`{text}` is too large"))
}

/// `true` or `false`.
pub fn boolean(text: &str) -> Result<bool, String> {
    match text.trim() {
        "true" => Ok(true),
        "false" => Ok(false),
        other => Err(format!("`{other}` is not true or false")),
    }
}

/// A whole number within `min..=max`.
pub fn number(min: u64, max: u64) -> impl FnOnce(&str) -> Result<u64, String> {
    move |text| {
        let n: u64 = text
            .trim()
            .parse()
            .map_err(|_| format!("`{text}` is not a whole number"))?;
        if n < min || n > max {
            return Err(format!("{n} is outside {min}..={max}"));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_duplicates_and_aliases() {
        let doc = parse("a: 1\nb:\n  c: \"x\"\n").unwrap();
        let Value::Map(entries) = &doc.value else {
            panic!()
        };
        assert_eq!(entries[1].1.pos.line, 3);
        let err = parse("a: 1\na: 2\n").unwrap_err();
        assert_eq!(err.0[0].pos.line, 2);
        assert!(err.0[0].message.contains("duplicate key"));
        assert!(
            parse("a: &x 1\nb: *x\n")
                .unwrap_err()
                .to_string()
                .contains("aliases")
        );
        assert!(parse("a: [1,\n").is_err());
    }

    #[test]
    fn every_error_is_collected_with_its_path() {
        let doc = parse("top:\n  good: 1\n  bogus: 2\n  n: abc\nother: 3\n").unwrap();
        let mut r = Reader::default();
        let root = r.map(&doc, "", &["top"]);
        let top = r.section(&root, "top", &["good", "n"]);
        let n = r.field(&top, "n", number(0, 10));
        assert_eq!(n, None);
        let msgs: Vec<String> = r.errors.iter().map(ToString::to_string).collect();
        assert_eq!(msgs.len(), 3, "{msgs:?}");
        assert!(msgs[0].starts_with("other (line 5, column 1): unknown key"));
        assert!(msgs[1].starts_with("top.bogus (line 3, column 3): unknown key"));
        assert!(msgs[2].starts_with("top.n (line 4, column 6): `abc` is not a whole number"));
    }

    #[test]
    fn units() {
        assert_eq!(duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(duration("2s"), Ok(Duration::from_secs(2)));
        assert!(duration("2").unwrap_err().contains("needs a unit"));
        assert_eq!(size("512mb"), Ok(512 * 1024 * 1024));
        assert_eq!(size("65536"), Ok(65536));
        assert!(size("12 parsecs").is_err());
    }
}
