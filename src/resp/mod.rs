//! RESP framing for both directions.
//!
//! Client input is parsed by [`request::RequestParser`], a bounded, resumable
//! parser of our own that follows Redis's `processMultibulkBuffer` and
//! `processInlineBuffer` rules byte for byte, so that pubwarden sees exactly
//! the arguments Redis would see. Upstream output is walked by
//! [`frame::FrameScanner`], which finds frame boundaries in RESP2 and RESP3
//! without copying or allocating, and notes the first few top-level elements
//! so a reply, a push and a pub/sub delivery can be told apart.

pub mod frame;
pub mod request;
pub mod value;

/// Parses a RESP integer the way Redis's `string2ll` does: an optional `-`,
/// no leading zeros, no `+`, at most the range of `i64`.
pub fn parse_i64(digits: &[u8]) -> Option<i64> {
    let (neg, body) = match digits.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, digits),
    };
    if body.is_empty() || body.len() > 19 {
        return None;
    }
    if body.len() > 1 && body[0] == b'0' {
        return None;
    }
    if neg && body == b"0" {
        return None;
    }
    let mut v: i64 = 0;
    for &b in body {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?;
        let d = i64::from(b - b'0');
        v = if neg {
            v.checked_sub(d)?
        } else {
            v.checked_add(d)?
        };
    }
    Some(v)
}

/// A command as a multibulk array, for the few pubwarden sends itself.
pub fn encode_command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + args.iter().map(|a| a.len() + 16).sum::<usize>());
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Finds the first `byte` in `hay` at or after `from`.
#[inline]
pub(crate) fn find_byte(hay: &[u8], from: usize, byte: u8) -> Option<usize> {
    hay.get(from..)?
        .iter()
        .position(|&b| b == byte)
        .map(|i| i + from)
}

#[cfg(test)]
mod tests {
    use super::parse_i64;

    #[test]
    fn integers_follow_string2ll() {
        assert_eq!(parse_i64(b"0"), Some(0));
        assert_eq!(parse_i64(b"42"), Some(42));
        assert_eq!(parse_i64(b"-1"), Some(-1));
        assert_eq!(parse_i64(b"9223372036854775807"), Some(i64::MAX));
        assert_eq!(parse_i64(b"-9223372036854775808"), Some(i64::MIN));
        for bad in [
            &b""[..],
            b"-",
            b"01",
            b"+1",
            b"-0",
            b"1a",
            b" 1",
            b"9223372036854775808",
        ] {
            assert_eq!(parse_i64(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
