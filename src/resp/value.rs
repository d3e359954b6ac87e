//! A decoded RESP value, for the few replies pubwarden reads for itself
//! (`COMMAND` at start-up). The relay never decodes: it forwards bytes.

use super::frame::FrameError;
use super::parse_i64;

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Simple(Vec<u8>),
    Error(Vec<u8>),
    Int(i64),
    Bulk(Vec<u8>),
    Array(Vec<Value>),
    Null,
    /// Types pubwarden does not need to read (doubles, booleans...).
    Other,
}

impl Value {
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Simple(b) | Value::Bulk(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(items) => Some(items),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(n) => Some(*n),
            _ => None,
        }
    }
}

/// Decodes one complete frame (as found by the frame scanner) from `buf`.
pub fn decode(buf: &[u8], max_depth: usize) -> Result<Value, FrameError> {
    decode_at(buf, 0, max_depth).map(|(v, _)| v)
}

fn line(buf: &[u8], at: usize) -> Result<(&[u8], usize), FrameError> {
    let cr = super::find_byte(buf, at, b'\r').ok_or(FrameError::InvalidLength)?;
    Ok((&buf[at..cr], cr + 2))
}

fn decode_at(buf: &[u8], mut at: usize, depth: usize) -> Result<(Value, usize), FrameError> {
    if depth == 0 {
        return Err(FrameError::TooDeep(0));
    }
    // Attributes decorate the value after them: skip them in a loop, so a long
    // chain of them costs no stack.
    while buf.get(at) == Some(&b'|') {
        let (body, next) = line(buf, at + 1)?;
        let n = parse_i64(body).ok_or(FrameError::InvalidLength)?;
        let mut pos = next;
        for _ in 0..n.max(0).saturating_mul(2) {
            pos = decode_at(buf, pos, depth - 1)?.1;
        }
        at = pos;
    }
    let kind = *buf.get(at).ok_or(FrameError::InvalidLength)?;
    let (body, next) = line(buf, at + 1)?;
    let int = || parse_i64(body).ok_or(FrameError::InvalidLength);
    match kind {
        b'+' => Ok((Value::Simple(body.to_vec()), next)),
        b'-' => Ok((Value::Error(body.to_vec()), next)),
        b':' => Ok((Value::Int(int()?), next)),
        b'_' => Ok((Value::Null, next)),
        b',' | b'#' | b'(' => Ok((Value::Other, next)),
        b'$' | b'!' | b'=' => {
            let n = int()?;
            if n < 0 {
                return Ok((Value::Null, next));
            }
            let end = next
                .checked_add(n as usize)
                .ok_or(FrameError::InvalidLength)?;
            let data = buf.get(next..end).ok_or(FrameError::InvalidLength)?;
            let v = if kind == b'!' {
                Value::Error(data.to_vec())
            } else {
                Value::Bulk(data.to_vec())
            };
            Ok((v, end + 2))
        }
        b'*' | b'>' | b'~' | b'%' => {
            let n = int()?;
            if n < 0 {
                return Ok((Value::Null, next));
            }
            let count = if kind == b'%' {
                n.checked_mul(2).ok_or(FrameError::InvalidLength)?
            } else {
                n
            } as usize;
            let mut items = Vec::with_capacity(count.min(1024));
            let mut pos = next;
            for _ in 0..count {
                let (v, p) = decode_at(buf, pos, depth - 1)?;
                items.push(v);
                pos = p;
            }

            Ok((Value::Array(items), pos))
        }
        other => Err(FrameError::UnknownType(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_nested_replies() {
        let v = decode(b"*3\r\n$3\r\nget\r\n:2\r\n*1\r\n+readonly\r\n", 8).unwrap();
        let items = v.as_array().unwrap();
        assert_eq!(items[0].as_bytes(), Some(&b"get"[..]));
        assert_eq!(items[1].as_int(), Some(2));
        assert_eq!(
            items[2].as_array().unwrap()[0].as_bytes(),
            Some(&b"readonly"[..])
        );
        assert!(decode(b"*1\r\n*1\r\n*1\r\n:1\r\n", 2).is_err());
    }
}
