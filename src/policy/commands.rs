//! The command table: every command's ACL categories, arity and whether it
//! may run before authentication.
//!
//! pubwarden asks the upstream Redis (`COMMAND`) at start, so modules and
//! newer versions are covered without a list in pubwarden's source; until
//! then, or when Redis cannot be asked, a table taken from Redis 7.0.15's own
//! `COMMAND` output (`commands.tsv`) stands in.

use std::collections::HashMap;

/// Redis 7 ACL categories, in a fixed order so a set of them is a bit mask.
pub const CATEGORIES: [&str; 21] = [
    "keyspace",
    "read",
    "write",
    "set",
    "sortedset",
    "list",
    "hash",
    "string",
    "bitmap",
    "hyperloglog",
    "geo",
    "stream",
    "pubsub",
    "admin",
    "fast",
    "slow",
    "blocking",
    "dangerous",
    "connection",
    "transaction",
    "scripting",
];

/// The bit of a category name (without `@`), if Redis has it.
pub fn category_bit(name: &str) -> Option<u32> {
    CATEGORIES.iter().position(|c| *c == name).map(|i| 1 << i)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandInfo {
    pub categories: u32,
    /// Redis's arity: positive means exactly, negative means at least.
    pub arity: i32,
    /// May run before AUTH (`no_auth` flag: AUTH, HELLO, QUIT, RESET).
    pub no_auth: bool,
    /// A container (`client`, `config`...): its second argument names a subcommand.
    pub has_subcommands: bool,
    /// Position of the first key (0: none, or not at a fixed place), from
    /// COMMAND; cluster mode routes by it. The built-in table has none.
    pub first_key: u8,
}

/// Where the table came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    BuiltIn,
    Upstream,
}

#[derive(Debug, Clone)]
pub struct CommandTable {
    /// Lower-case names; subcommands as `container|sub`.
    commands: HashMap<String, CommandInfo>,
    pub source: Source,
}

/// Longest command name looked up without allocating.
const MAX_NAME: usize = 64;

impl CommandTable {
    /// The table shipped with pubwarden.
    pub fn built_in() -> Self {
        let mut commands = HashMap::new();
        for line in include_str!("commands.tsv").lines() {
            let mut cols = line.split('\t');
            let (Some(name), Some(arity), Some(flags), Some(cats)) =
                (cols.next(), cols.next(), cols.next(), cols.next())
            else {
                continue;
            };
            let categories = cats
                .split_whitespace()
                .filter_map(|c| category_bit(c.trim_start_matches('@')))
                .fold(0, |a, b| a | b);
            commands.insert(
                name.to_string(),
                CommandInfo {
                    categories,
                    arity: arity.parse().unwrap_or(-1),
                    no_auth: flags.split(',').any(|f| f == "no_auth"),
                    has_subcommands: false,
                    first_key: 0,
                },
            );
        }
        Self {
            commands: mark_containers(commands),
            source: Source::BuiltIn,
        }
    }

    /// A table built from entries learned from Redis.
    pub fn from_entries(entries: impl IntoIterator<Item = (String, CommandInfo)>) -> Self {
        Self {
            commands: mark_containers(entries.into_iter().collect()),
            source: Source::Upstream,
        }
    }

    pub fn len(&self) -> usize {
        self.commands.len()
    }

    pub fn is_empty(&self) -> bool {
        self.commands.is_empty()
    }

    pub fn get(&self, name: &str) -> Option<&CommandInfo> {
        self.commands.get(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.commands.contains_key(name)
    }

    /// Resolves a request to its table name (`get`, `client|kill`) and info,
    /// without allocating: names are matched case-insensitively, and a
    /// container command with an unknown subcommand resolves to the container.
    pub fn resolve(&self, name: &[u8], sub: Option<&[u8]>) -> Option<(&str, &CommandInfo)> {
        let mut buf = [0u8; 2 * MAX_NAME + 1];
        let n = name.len();
        if n > MAX_NAME {
            return None;
        }
        for (o, b) in buf.iter_mut().zip(name) {
            *o = b.to_ascii_lowercase();
        }
        let (key, info) = self
            .commands
            .get_key_value(std::str::from_utf8(&buf[..n]).ok()?)?;
        if info.has_subcommands
            && let Some(sub) = sub.filter(|s| s.len() <= MAX_NAME)
        {
            buf[n] = b'|';
            for (o, b) in buf[n + 1..].iter_mut().zip(sub) {
                *o = b.to_ascii_lowercase();
            }
            if let Ok(full) = std::str::from_utf8(&buf[..n + 1 + sub.len()])
                && let Some((k, i)) = self.commands.get_key_value(full)
            {
                return Some((k.as_str(), i));
            }
        }
        Some((key.as_str(), info))
    }

    /// True when `name` has subcommands in the table (`client`, `config`...).
    pub fn is_container(&self, name: &[u8]) -> bool {
        self.resolve(name, None)
            .is_some_and(|(_, i)| i.has_subcommands)
    }
}

/// Marks every command that has `name|sub` entries as a container.
fn mark_containers(mut commands: HashMap<String, CommandInfo>) -> HashMap<String, CommandInfo> {
    let parents: Vec<String> = commands
        .keys()
        .filter_map(|k| k.split_once('|').map(|(p, _)| p.to_string()))
        .collect();
    for p in parents {
        if let Some(info) = commands.get_mut(&p) {
            info.has_subcommands = true;
        }
    }
    commands
}

/// Builds a table from the reply to `COMMAND` (Redis 7: name, arity, flags,
/// first/last/step key, ACL categories, tips, key specs, subcommands).
pub fn from_command_reply(reply: &crate::resp::value::Value) -> Option<CommandTable> {
    use crate::resp::value::Value;
    fn add(entry: &Value, out: &mut Vec<(String, CommandInfo)>) -> Option<()> {
        let fields = entry.as_array()?;
        let name = String::from_utf8_lossy(fields.first()?.as_bytes()?).to_ascii_lowercase();
        let arity = i32::try_from(fields.get(1)?.as_int()?).ok()?;
        let no_auth = fields
            .get(2)
            .and_then(Value::as_array)
            .is_some_and(|f| f.iter().any(|x| x.as_bytes() == Some(b"no_auth")));
        let categories = fields
            .get(6)
            .and_then(Value::as_array)
            .map(|cats| {
                cats.iter()
                    .filter_map(Value::as_bytes)
                    .filter_map(|c| {
                        category_bit(std::str::from_utf8(c).ok()?.trim_start_matches('@'))
                    })
                    .fold(0, |a, b| a | b)
            })
            .unwrap_or(0);
        out.push((
            name,
            CommandInfo {
                categories,
                arity,
                no_auth,
                has_subcommands: false,
                first_key: u8::try_from(fields.get(3).and_then(Value::as_int).unwrap_or(0))
                    .unwrap_or(0),
            },
        ));
        for sub in fields.get(9).and_then(Value::as_array).unwrap_or_default() {
            add(sub, out);
        }
        Some(())
    }
    let mut entries = Vec::new();
    for entry in reply.as_array()? {
        add(entry, &mut entries);
    }
    (!entries.is_empty()).then(|| CommandTable::from_entries(entries))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_table_knows_redis_7() {
        let t = CommandTable::built_in();
        assert!(t.len() > 300);
        let (name, publish) = t.resolve(b"PUBLISH", None).unwrap();
        assert_eq!(name, "publish");
        assert_ne!(publish.categories & category_bit("pubsub").unwrap(), 0);
        let (name, kill) = t.resolve(b"client", Some(b"KILL")).unwrap();
        assert_eq!(name, "client|kill");
        assert_ne!(kill.categories & category_bit("dangerous").unwrap(), 0);
        assert_eq!(t.resolve(b"client", Some(b"nonsense")).unwrap().0, "client");
        assert!(t.get("auth").unwrap().no_auth);
        assert!(t.get("reset").unwrap().no_auth);
        assert!(!t.get("get").unwrap().no_auth);
        assert!(t.is_container(b"CONFIG"));
        assert!(!t.is_container(b"get"));
        assert!(t.resolve(&[b'x'; 100], None).is_none());
    }
}
