//! A small RESP2/RESP3 frame splitter and decoder for the tests.
//!
//! `frame_len` finds where the first complete frame of a buffer ends without copying; `decode`
//! turns one frame into a [`Value`] for tests that look inside replies. An attribute (`|`) is
//! returned together with the value that follows it, as one frame, because that pair is one
//! reply on the wire. Encoders build multibulk requests.

use std::fmt::Write as _;

/// Nesting deeper than this is treated as garbage (no Redis reply nests that deep).
const MAX_DEPTH: usize = 64;

/// Length of the first complete RESP frame in `buf`: `Ok(None)` while incomplete, `Err` when the
/// bytes are not RESP.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, String> {
    frame_end(buf, 0, 0)
}

fn find_crlf(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i + 1 < buf.len() {
        if buf[i] == b'\r' && buf[i + 1] == b'\n' {
            return Some(i);
        }
        i += 1;
    }
    None
}

fn parse_int(bytes: &[u8], at: usize) -> Result<i64, String> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .ok_or_else(|| format!("bad length {:?} at byte {at}", escape(bytes)))
}

fn frame_end(buf: &[u8], pos: usize, depth: usize) -> Result<Option<usize>, String> {
    if depth > MAX_DEPTH {
        return Err(format!(
            "RESP nesting deeper than {MAX_DEPTH} at byte {pos}"
        ));
    }
    let Some(&kind) = buf.get(pos) else {
        return Ok(None);
    };
    let Some(line_end) = find_crlf(buf, pos + 1) else {
        return Ok(None);
    };
    let header = &buf[pos + 1..line_end];
    let after_header = line_end + 2;
    match kind {
        b'+' | b'-' | b':' | b',' | b'#' | b'(' => Ok(Some(after_header)),
        b'_' => {
            if header.is_empty() {
                Ok(Some(after_header))
            } else {
                Err(format!("null `_` with payload at byte {pos}"))
            }
        }
        b'$' | b'=' | b'!' => {
            let n = parse_int(header, pos)?;
            if n == -1 && kind == b'$' {
                return Ok(Some(after_header));
            }
            let n = usize::try_from(n).map_err(|_| format!("negative bulk length at {pos}"))?;
            let end = after_header + n + 2;
            if buf.len() < end {
                return Ok(None);
            }
            if &buf[end - 2..end] != b"\r\n" {
                return Err(format!("bulk at byte {pos} not terminated by CRLF"));
            }
            Ok(Some(end))
        }
        b'*' | b'~' | b'>' | b'%' | b'|' => {
            let n = parse_int(header, pos)?;
            if n == -1 && kind == b'*' {
                return Ok(Some(after_header));
            }
            let n = usize::try_from(n).map_err(|_| format!("negative count at {pos}"))?;
            let elements = if kind == b'%' || kind == b'|' {
                n * 2
            } else {
                n
            };
            let mut p = after_header;
            for _ in 0..elements {
                match frame_end(buf, p, depth + 1)? {
                    Some(next) => p = next,
                    None => return Ok(None),
                }
            }
            if kind == b'|' {
                // An attribute annotates the value that follows it: one reply.
                return frame_end(buf, p, depth + 1);
            }
            Ok(Some(p))
        }
        other => Err(format!(
            "unexpected RESP type byte {:?} at byte {pos}",
            other as char
        )),
    }
}

/// A decoded frame, only as detailed as the tests need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Simple(Vec<u8>),
    Error(Vec<u8>),
    Int(i64),
    Bulk(Vec<u8>),
    Nil,
    Array(Vec<Value>),
    Push(Vec<Value>),
    Map(Vec<(Value, Value)>),
    /// Double, boolean, big number, verbatim string, bulk error: kept as their header/payload.
    Other(u8, Vec<u8>),
}

impl Value {
    /// The bytes of a simple string, bulk string or verbatim string.
    pub fn bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Simple(b) | Value::Bulk(b) => Some(b),
            _ => None,
        }
    }

    /// The elements of an array, set or push.
    pub fn items(&self) -> Option<&[Value]> {
        match self {
            Value::Array(v) | Value::Push(v) => Some(v),
            _ => None,
        }
    }

    pub fn int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }
}

/// Decodes one complete frame (as returned by [`frame_len`]).
pub fn decode(frame: &[u8]) -> Result<Value, String> {
    let (v, end) = decode_at(frame, 0, 0)?;
    if end != frame.len() {
        return Err(format!("{} trailing bytes after frame", frame.len() - end));
    }
    Ok(v)
}

fn decode_at(buf: &[u8], pos: usize, depth: usize) -> Result<(Value, usize), String> {
    let end = frame_end(buf, pos, depth)?.ok_or_else(|| "incomplete frame".to_string())?;
    let line_end = find_crlf(buf, pos + 1).ok_or("no CRLF")?;
    let header = &buf[pos + 1..line_end];
    let body_start = line_end + 2;
    let v = match buf[pos] {
        b'+' => Value::Simple(header.to_vec()),
        b'-' => Value::Error(header.to_vec()),
        b':' => Value::Int(parse_int(header, pos)?),
        b'_' => Value::Nil,
        b'$' => {
            if header == b"-1" {
                Value::Nil
            } else {
                Value::Bulk(buf[body_start..end - 2].to_vec())
            }
        }
        b'*' | b'~' | b'>' => {
            if header == b"-1" {
                Value::Nil
            } else {
                let n = parse_int(header, pos)?;
                let mut p = body_start;
                let mut items = Vec::new();
                for _ in 0..n {
                    let (item, next) = decode_at(buf, p, depth + 1)?;
                    items.push(item);
                    p = next;
                }
                if buf[pos] == b'>' {
                    Value::Push(items)
                } else {
                    Value::Array(items)
                }
            }
        }
        b'%' => {
            let n = parse_int(header, pos)?;
            let mut p = body_start;
            let mut pairs = Vec::new();
            for _ in 0..n {
                let (k, next) = decode_at(buf, p, depth + 1)?;
                let (v, next) = decode_at(buf, next, depth + 1)?;
                pairs.push((k, v));
                p = next;
            }
            Value::Map(pairs)
        }
        b'|' => {
            // Skip the attribute, keep the value.
            let n = parse_int(header, pos)?;
            let mut p = body_start;
            for _ in 0..n * 2 {
                p = decode_at(buf, p, depth + 1)?.1;
            }
            return decode_at(buf, p, depth + 1);
        }
        b'=' | b'!' => Value::Other(buf[pos], buf[body_start..end - 2].to_vec()),
        other => Value::Other(other, header.to_vec()),
    };
    Ok((v, end))
}

/// Encodes a multibulk request from binary arguments.
pub fn encode<A: AsRef<[u8]>>(args: &[A]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        let a = a.as_ref();
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Encodes a multibulk request from a space separated command line (no quoting).
pub fn encode_line(line: &str) -> Vec<u8> {
    let args: Vec<&str> = line.split(' ').filter(|a| !a.is_empty()).collect();
    encode(&args)
}

/// The bytes as a readable Rust-like byte string: CR, LF, NUL and non-ASCII escaped.
pub fn escape(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() + 8);
    for &b in bytes {
        match b {
            b'\r' => s.push_str("\\r"),
            b'\n' => s.push_str("\\n"),
            b'\0' => s.push_str("\\0"),
            b'\\' => s.push_str("\\\\"),
            b'"' => s.push_str("\\\""),
            0x20..=0x7e => s.push(b as char),
            _ => {
                let _ = write!(s, "\\x{b:02x}");
            }
        }
    }
    s
}

/// Like [`escape`] but keeps at most `max` bytes of a long value, saying how long it was.
pub fn escape_short(bytes: &[u8], max: usize) -> String {
    if bytes.len() <= max {
        format!("b\"{}\"", escape(bytes))
    } else {
        format!(
            "b\"{}\"... ({} bytes in all)",
            escape(&bytes[..max]),
            bytes.len()
        )
    }
}
