//! Minimal, allocation-free RESP2 client pieces: command encoding and in-place
//! parsing of the replies and pushes the benchmark cares about.

use std::fmt;

/// A protocol violation: the peer sent bytes that are not valid RESP for us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtoError(pub &'static str);

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RESP protocol error: {}", self.0)
    }
}

impl std::error::Error for ProtoError {}

/// Result of an incremental parse: `Ok(None)` means "need more bytes".
pub type Parsed<T> = Result<Option<(T, usize)>, ProtoError>;

/// Longest integer line we accept (sign + 19 digits).
const MAX_INT_LINE: usize = 21;

/// Parses an integer terminated by CRLF starting at `buf[0]`.
/// Returns the value and the number of bytes consumed (including CRLF).
#[inline]
pub fn parse_int_line(buf: &[u8]) -> Parsed<i64> {
    let mut i = 0;
    let neg = buf.first() == Some(&b'-');
    if neg {
        i = 1;
    }
    let digits_start = i;
    let mut v: i64 = 0;
    loop {
        let Some(&b) = buf.get(i) else {
            return if i > MAX_INT_LINE {
                Err(ProtoError("integer line too long"))
            } else {
                Ok(None)
            };
        };
        match b {
            b'0'..=b'9' => {
                v = v
                    .checked_mul(10)
                    .and_then(|v| v.checked_add(i64::from(b - b'0')))
                    .ok_or(ProtoError("integer overflow"))?;
                i += 1;
                if i > MAX_INT_LINE {
                    return Err(ProtoError("integer line too long"));
                }
            }
            b'\r' => {
                if i == digits_start {
                    return Err(ProtoError("empty integer"));
                }
                return match buf.get(i + 1) {
                    None => Ok(None),
                    Some(b'\n') => Ok(Some((if neg { -v } else { v }, i + 2))),
                    Some(_) => Err(ProtoError("missing LF after CR")),
                };
            }
            _ => return Err(ProtoError("bad digit in integer")),
        }
    }
}

/// Skips a simple line (`+OK\r\n`, `-ERR ...\r\n`), returning bytes consumed.
#[inline]
fn skip_line(buf: &[u8], limit: usize) -> Parsed<()> {
    match buf.iter().take(limit).position(|&b| b == b'\n') {
        Some(p) => Ok(Some(((), p + 1))),
        None if buf.len() >= limit => Err(ProtoError("line too long")),
        None => Ok(None),
    }
}

/// A reply to a command sent by a publisher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    Int(i64),
    Error,
    Status,
}

/// Parses one reply of the kinds a PUBLISH (or PING) can produce.
#[inline]
pub fn parse_reply(buf: &[u8]) -> Parsed<Reply> {
    match buf.first() {
        None => Ok(None),
        Some(b':') => Ok(parse_int_line(&buf[1..])?.map(|(v, n)| (Reply::Int(v), n + 1))),
        Some(b'-') => Ok(skip_line(buf, 4096)?.map(|((), n)| (Reply::Error, n))),
        Some(b'+') => Ok(skip_line(buf, 4096)?.map(|((), n)| (Reply::Status, n))),
        Some(_) => Err(ProtoError("unexpected reply type")),
    }
}

/// One element of a push array, as offsets into the parsed slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Elem {
    Bulk(usize, usize),
    Int(i64),
}

/// What a subscriber connection received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push<'a> {
    /// `message` (SUBSCRIBE), `pmessage` (PSUBSCRIBE) or `smessage`
    /// (SSUBSCRIBE) delivery.
    Message {
        channel: &'a [u8],
        payload: &'a [u8],
    },
    /// `subscribe` / `psubscribe` / `ssubscribe` confirmation.
    SubAck,
    /// An error reply.
    Error,
    /// Anything else that is well-formed (e.g. `pong`).
    Other,
}

/// Largest bulk string we accept in a push.
const MAX_BULK: usize = 512 * 1024 * 1024;

#[inline]
fn parse_elem(buf: &[u8], pos: usize) -> Result<Option<(Elem, usize)>, ProtoError> {
    let Some(&t) = buf.get(pos) else {
        return Ok(None);
    };
    match t {
        b'$' => {
            let Some((len, n)) = parse_int_line(&buf[pos + 1..])? else {
                return Ok(None);
            };
            let len = usize::try_from(len).map_err(|_| ProtoError("negative bulk length"))?;
            if len > MAX_BULK {
                return Err(ProtoError("bulk too large"));
            }
            let start = pos + 1 + n;
            let end = start + len;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(ProtoError("bulk not terminated by CRLF"));
            }
            Ok(Some((Elem::Bulk(start, end), end + 2)))
        }
        b':' => {
            let Some((v, n)) = parse_int_line(&buf[pos + 1..])? else {
                return Ok(None);
            };
            Ok(Some((Elem::Int(v), pos + 1 + n)))
        }
        _ => Err(ProtoError("unexpected element type in push")),
    }
}

/// Parses one frame received on a subscribed connection, in place.
#[inline]
pub fn parse_push(buf: &[u8]) -> Parsed<Push<'_>> {
    match buf.first() {
        None => return Ok(None),
        Some(b'*') | Some(b'>') => {}
        Some(b'-') => return Ok(skip_line(buf, 4096)?.map(|((), n)| (Push::Error, n))),
        Some(b'+') => return Ok(skip_line(buf, 4096)?.map(|((), n)| (Push::Other, n))),
        Some(_) => return Err(ProtoError("unexpected frame type on subscriber")),
    }
    let Some((count, n)) = parse_int_line(&buf[1..])? else {
        return Ok(None);
    };
    if !(1..=4).contains(&count) {
        return Err(ProtoError("unexpected push array length"));
    }
    let count = count as usize;
    let mut pos = 1 + n;
    let mut elems = [Elem::Int(0); 4];
    for e in elems.iter_mut().take(count) {
        let Some((el, next)) = parse_elem(buf, pos)? else {
            return Ok(None);
        };
        *e = el;
        pos = next;
    }
    let Elem::Bulk(ks, ke) = elems[0] else {
        return Err(ProtoError("push kind is not a bulk string"));
    };
    let bulk = |e: Elem| match e {
        Elem::Bulk(s, e) => Ok(&buf[s..e]),
        Elem::Int(_) => Err(ProtoError("expected bulk string")),
    };
    let push = match (&buf[ks..ke], count) {
        (b"message", 3) | (b"smessage", 3) => Push::Message {
            channel: bulk(elems[1])?,
            payload: bulk(elems[2])?,
        },
        (b"pmessage", 4) => Push::Message {
            channel: bulk(elems[2])?,
            payload: bulk(elems[3])?,
        },
        (b"subscribe", 3) | (b"psubscribe", 3) | (b"ssubscribe", 3) => Push::SubAck,
        _ => Push::Other,
    };
    Ok(Some((push, pos)))
}

/// A whole reply, owned: for the few setup queries (CLUSTER INFO / NODES /
/// KEYSLOT), not for the load path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Status(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Value>>),
}

impl Value {
    /// The text of a bulk or status reply.
    pub fn text(&self) -> Option<String> {
        match self {
            Value::Status(s) => Some(s.clone()),
            Value::Bulk(Some(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        }
    }
}

/// Parses one complete reply of any RESP2 type (nesting up to 8 deep).
pub fn parse_value(buf: &[u8]) -> Parsed<Value> {
    parse_value_at(buf, 0)
}

fn parse_value_at(buf: &[u8], depth: usize) -> Parsed<Value> {
    if depth > 8 {
        return Err(ProtoError("reply nested too deeply"));
    }
    let line = |buf: &[u8]| -> Parsed<String> {
        Ok(skip_line(buf, 1 << 20)?.map(|((), n)| {
            let end = n.saturating_sub(2).max(1);
            (String::from_utf8_lossy(&buf[1..end]).into_owned(), n)
        }))
    };
    match buf.first() {
        None => Ok(None),
        Some(b'+') => Ok(line(buf)?.map(|(s, n)| (Value::Status(s), n))),
        Some(b'-') => Ok(line(buf)?.map(|(s, n)| (Value::Error(s), n))),
        Some(b':') => Ok(parse_int_line(&buf[1..])?.map(|(v, n)| (Value::Int(v), n + 1))),
        Some(b'$') => {
            let Some((len, n)) = parse_int_line(&buf[1..])? else {
                return Ok(None);
            };
            if len < 0 {
                return Ok(Some((Value::Bulk(None), n + 1)));
            }
            let len = len as usize;
            if len > MAX_BULK {
                return Err(ProtoError("bulk too large"));
            }
            let start = 1 + n;
            if buf.len() < start + len + 2 {
                return Ok(None);
            }
            if &buf[start + len..start + len + 2] != b"\r\n" {
                return Err(ProtoError("bulk not terminated by CRLF"));
            }
            Ok(Some((
                Value::Bulk(Some(buf[start..start + len].to_vec())),
                start + len + 2,
            )))
        }
        Some(b'*') => {
            let Some((count, n)) = parse_int_line(&buf[1..])? else {
                return Ok(None);
            };
            if count < 0 {
                return Ok(Some((Value::Array(None), n + 1)));
            }
            let mut pos = 1 + n;
            let mut items = Vec::with_capacity((count as usize).min(1024));
            for _ in 0..count {
                let Some((v, used)) = parse_value_at(&buf[pos..], depth + 1)? else {
                    return Ok(None);
                };
                items.push(v);
                pos += used;
            }
            Ok(Some((Value::Array(Some(items)), pos)))
        }
        Some(_) => Err(ProtoError("unexpected reply type")),
    }
}

/// Appends a command as a RESP multibulk array.
pub fn encode_command(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.push(b'*');
    out.extend_from_slice(args.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    for a in args {
        out.push(b'$');
        out.extend_from_slice(a.len().to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ints() {
        assert_eq!(parse_int_line(b"123\r\n"), Ok(Some((123, 5))));
        assert_eq!(parse_int_line(b"-7\r\nx"), Ok(Some((-7, 4))));
        assert_eq!(parse_int_line(b"12"), Ok(None));
        assert_eq!(parse_int_line(b"12\r"), Ok(None));
        assert!(parse_int_line(b"1a\r\n").is_err());
        assert!(parse_int_line(b"\r\n").is_err());
    }

    #[test]
    fn replies() {
        assert_eq!(parse_reply(b":3\r\n:4"), Ok(Some((Reply::Int(3), 4))));
        assert_eq!(parse_reply(b"-ERR x\r\n"), Ok(Some((Reply::Error, 8))));
        assert_eq!(parse_reply(b"-ERR x"), Ok(None));
    }

    #[test]
    fn pushes() {
        let m = b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$5\r\nhello\r\n";
        for cut in 0..m.len() {
            assert_eq!(parse_push(&m[..cut]), Ok(None), "cut {cut}");
        }
        assert_eq!(
            parse_push(m),
            Ok(Some((
                Push::Message {
                    channel: b"ch",
                    payload: b"hello"
                },
                m.len()
            )))
        );
        let p = b"*4\r\n$8\r\npmessage\r\n$3\r\nc.*\r\n$3\r\nc.1\r\n$0\r\n\r\n";
        assert_eq!(
            parse_push(p),
            Ok(Some((
                Push::Message {
                    channel: b"c.1",
                    payload: b""
                },
                p.len()
            )))
        );
        let sm = b"*3\r\n$8\r\nsmessage\r\n$2\r\nch\r\n$2\r\nhi\r\n";
        assert_eq!(
            parse_push(sm),
            Ok(Some((
                Push::Message {
                    channel: b"ch",
                    payload: b"hi"
                },
                sm.len()
            )))
        );
        let ss = b"*3\r\n$10\r\nssubscribe\r\n$2\r\nch\r\n:1\r\n";
        assert_eq!(parse_push(ss), Ok(Some((Push::SubAck, ss.len()))));
        let s = b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n";
        assert_eq!(parse_push(s), Ok(Some((Push::SubAck, s.len()))));
        assert!(parse_push(b"*3\r\n$7\r\nmessage\r\n$2\r\nchXX").is_err());
    }

    #[test]
    fn values() {
        let v = b"*2\r\n$3\r\nabc\r\n*2\r\n:5\r\n+OK\r\n";
        for cut in 0..v.len() {
            assert_eq!(parse_value(&v[..cut]), Ok(None), "cut {cut}");
        }
        assert_eq!(
            parse_value(v),
            Ok(Some((
                Value::Array(Some(vec![
                    Value::Bulk(Some(b"abc".to_vec())),
                    Value::Array(Some(vec![Value::Int(5), Value::Status("OK".into())])),
                ])),
                v.len()
            )))
        );
        assert_eq!(
            parse_value(b"-ERR no\r\n"),
            Ok(Some((Value::Error("ERR no".into()), 9)))
        );
        assert_eq!(parse_value(b"$-1\r\n"), Ok(Some((Value::Bulk(None), 5))));
        assert_eq!(
            parse_value(b"$2\r\nhi\r\n").map(|r| r.and_then(|(v, _)| v.text())),
            Ok(Some("hi".to_string()))
        );
    }

    #[test]
    fn encode() {
        let mut v = Vec::new();
        encode_command(&mut v, &[b"PING"]);
        assert_eq!(v, b"*1\r\n$4\r\nPING\r\n");
    }
}
