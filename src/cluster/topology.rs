//! Which node serves which slot: read from `CLUSTER SHARDS` (Redis 7), or
//! `CLUSTER SLOTS` where that is missing, and shared by every session.

use crate::resp::value::Value;

use super::slot::SLOTS;

/// One shard: a master and its replicas, as `host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    pub master: String,
    pub replicas: Vec<String>,
}

/// The slot map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Slot → index into `shards`; `u16::MAX`: not served.
    slots: Vec<u16>,
    pub shards: Vec<Shard>,
}

const NONE: u16 = u16::MAX;

impl Default for Topology {
    fn default() -> Self {
        Self {
            slots: vec![NONE; SLOTS],
            shards: Vec::new(),
        }
    }
}

impl Topology {
    /// The shard serving `slot`, if any.
    pub fn shard(&self, slot: u16) -> Option<&Shard> {
        let i = *self.slots.get(usize::from(slot))?;
        self.shards.get(usize::from(i))
    }

    /// The master serving `slot`.
    pub fn master(&self, slot: u16) -> Option<&str> {
        self.shard(slot).map(|s| s.master.as_str())
    }

    pub fn masters(&self) -> impl Iterator<Item = &str> {
        self.shards.iter().map(|s| s.master.as_str())
    }

    /// Every node, masters and replicas.
    pub fn nodes(&self) -> usize {
        self.shards.iter().map(|s| 1 + s.replicas.len()).sum()
    }

    /// Slots served by some node.
    pub fn covered(&self) -> usize {
        self.slots.iter().filter(|&&s| s != NONE).count()
    }

    /// The same map whichever node described it: nodes list shards and
    /// replicas in their own order, and without this every read from
    /// another node would look like a change.
    fn canonical(mut self) -> Self {
        let mut order: Vec<usize> = (0..self.shards.len()).collect();
        order.sort_by(|&a, &b| self.shards[a].master.cmp(&self.shards[b].master));
        let mut new_index = vec![0u16; self.shards.len()];
        for (new, &old) in order.iter().enumerate() {
            new_index[old] = new as u16;
        }
        for s in &mut self.slots {
            if *s != NONE {
                *s = new_index[usize::from(*s)];
            }
        }
        let mut shards: Vec<Shard> = order.iter().map(|&i| self.shards[i].clone()).collect();
        for sh in &mut shards {
            sh.replicas.sort_unstable();
        }
        self.shards = shards;
        self
    }

    fn add(&mut self, shard: Shard, ranges: &[(u16, u16)]) {
        let i = match self.shards.iter().position(|s| s.master == shard.master) {
            Some(i) => i,
            None => {
                self.shards.push(shard);
                self.shards.len() - 1
            }
        };
        for &(start, end) in ranges {
            for slot in start..=end.min(SLOTS as u16 - 1) {
                self.slots[usize::from(slot)] = i as u16;
            }
        }
    }
}

fn text(v: &Value) -> Option<String> {
    v.as_bytes()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .or_else(|| v.as_int().map(|n| n.to_string()))
}

fn address(host: &str, port: &str) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// A flat `key, value, key, value` array (RESP2) as pairs; RESP3 maps are
/// not asked for (pubwarden's own connections speak RESP2).
fn pairs(v: &Value) -> Vec<(String, &Value)> {
    let items = v.as_array().unwrap_or_default();
    items
        .chunks(2)
        .filter_map(|kv| Some((text(kv.first()?)?, kv.get(1)?)))
        .collect()
}

/// Parses `CLUSTER SHARDS`. `tls`: use each node's `tls-port`.
pub fn from_shards(reply: &Value, tls: bool) -> Option<Topology> {
    let mut t = Topology::default();
    for shard in reply.as_array()? {
        let fields = pairs(shard);
        let get = |k: &str| fields.iter().find(|(key, _)| key == k).map(|(_, v)| *v);
        let ranges: Vec<(u16, u16)> = get("slots")?
            .as_array()?
            .chunks(2)
            .filter_map(|r| {
                Some((
                    u16::try_from(r.first()?.as_int()?).ok()?,
                    u16::try_from(r.get(1)?.as_int()?).ok()?,
                ))
            })
            .collect();
        let mut master = None;
        let mut replicas = Vec::new();
        for node in get("nodes")?.as_array()? {
            let nf = pairs(node);
            let field = |k: &str| {
                nf.iter()
                    .find(|(key, _)| key == k)
                    .and_then(|(_, v)| text(v))
            };
            let host = field("ip")
                .filter(|h| !h.is_empty() && h != "?")
                .or_else(|| field("endpoint"))?;
            let port = if tls { field("tls-port") } else { None }.or_else(|| field("port"))?;
            let healthy = field("health").is_none_or(|h| h == "online");
            let addr = address(&host, &port);
            match field("role").as_deref() {
                Some("master") => master = Some(addr),
                _ if healthy => replicas.push(addr),
                _ => {}
            }
        }
        // A shard without slots (a new, empty master) serves nothing yet.
        if let Some(master) = master
            && !ranges.is_empty()
        {
            t.add(Shard { master, replicas }, &ranges);
        }
    }
    (!t.shards.is_empty()).then(|| t.canonical())
}

/// Parses `CLUSTER SLOTS` (before Redis 7).
pub fn from_slots(reply: &Value) -> Option<Topology> {
    let mut t = Topology::default();
    for range in reply.as_array()? {
        let items = range.as_array()?;
        let start = u16::try_from(items.first()?.as_int()?).ok()?;
        let end = u16::try_from(items.get(1)?.as_int()?).ok()?;
        let node = |v: &Value| -> Option<String> {
            let n = v.as_array()?;
            Some(address(&text(n.first()?)?, &text(n.get(1)?)?))
        };
        let master = node(items.get(2)?)?;
        let replicas = items.iter().skip(3).filter_map(node).collect();
        t.add(Shard { master, replicas }, &[(start, end)]);
    }
    (!t.shards.is_empty()).then(|| t.canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Value {
        Value::Bulk(s.as_bytes().to_vec())
    }

    #[test]
    fn shards_reply() {
        let node = |port: i64, role: &str| {
            Value::Array(vec![
                b("id"),
                b("abc"),
                b("port"),
                Value::Int(port),
                b("ip"),
                b("127.0.0.1"),
                b("endpoint"),
                b("127.0.0.1"),
                b("role"),
                b(role),
                b("replication-offset"),
                Value::Int(0),
                b("health"),
                b("online"),
            ])
        };
        let reply = Value::Array(vec![
            Value::Array(vec![
                b("slots"),
                Value::Array(vec![Value::Int(0), Value::Int(8191)]),
                b("nodes"),
                Value::Array(vec![node(7000, "master"), node(7003, "replica")]),
            ]),
            Value::Array(vec![
                b("slots"),
                Value::Array(vec![Value::Int(8192), Value::Int(16383)]),
                b("nodes"),
                Value::Array(vec![node(7001, "master")]),
            ]),
        ]);
        let t = from_shards(&reply, false).expect("parsed");
        assert_eq!(t.master(0), Some("127.0.0.1:7000"));
        assert_eq!(t.master(16383), Some("127.0.0.1:7001"));
        assert_eq!(
            t.shard(100).map(|s| s.replicas.clone()),
            Some(vec!["127.0.0.1:7003".to_string()])
        );
        assert_eq!(t.nodes(), 3);
        assert_eq!(t.covered(), 16384);
        // Another node lists the shards the other way round: the same map.
        let Value::Array(mut shards) = reply.clone() else {
            unreachable!("built as an array above")
        };
        shards.reverse();
        assert_eq!(from_shards(&Value::Array(shards), false), Some(t));
    }
}
