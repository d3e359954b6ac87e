//! The trace envelope: a small binary header that a publishing pubwarden puts
//! in front of a payload, and the delivering pubwarden takes off again.
//!
//! ```text
//! offset size
//!  0      5   magic "\xffPWE1" (0xff never starts UTF-8 text; "1" is the version)
//!  5      1   W3C trace flags (bit 0: sampled)
//!  6     16   trace id
//! 22      8   span id of the publish span
//! 30      8   publish time, nanoseconds since the Unix epoch, big-endian
//! 38      2   tracestate length N, big-endian
//! 40      N   tracestate (W3C header text)
//! 40+N        the original payload, byte for byte
//! ```
//! Anything that does not parse as exactly this (wrong magic or version,
//! truncated, zero ids) is not an envelope and passes unchanged.

/// First bytes of every envelope; the last one is the format version.
pub const MAGIC: &[u8; 5] = b"\xffPWE1";
/// Header length without tracestate.
pub const FIXED_LEN: usize = 40;

/// What an envelope carries besides the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header<'a> {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub flags: u8,
    pub published_unix_nanos: u64,
    pub tracestate: &'a [u8],
}

/// The envelope around `payload`.
pub fn wrap(h: &Header<'_>, payload: &[u8]) -> Vec<u8> {
    // tracestate is at most 512 bytes by the W3C rules; longer is dropped
    // rather than truncated into something invalid.
    let ts: &[u8] = if h.tracestate.len() <= 512 {
        h.tracestate
    } else {
        &[]
    };
    let mut out = Vec::with_capacity(FIXED_LEN + ts.len() + payload.len());
    out.extend_from_slice(MAGIC);
    out.push(h.flags);
    out.extend_from_slice(&h.trace_id);
    out.extend_from_slice(&h.span_id);
    out.extend_from_slice(&h.published_unix_nanos.to_be_bytes());
    out.extend_from_slice(&(ts.len() as u16).to_be_bytes());
    out.extend_from_slice(ts);
    out.extend_from_slice(payload);
    out
}

/// Cheap first check, done before anything else per delivery.
#[inline]
pub fn looks_wrapped(payload: &[u8]) -> bool {
    payload.len() >= FIXED_LEN && payload[..MAGIC.len()] == MAGIC[..]
}

/// The header and the original payload, if `payload` is a valid envelope.
pub fn unwrap(payload: &[u8]) -> Option<(Header<'_>, &[u8])> {
    if !looks_wrapped(payload) {
        return None;
    }
    let trace_id: [u8; 16] = payload.get(6..22)?.try_into().ok()?;
    let span_id: [u8; 8] = payload.get(22..30)?.try_into().ok()?;
    let time: [u8; 8] = payload.get(30..38)?.try_into().ok()?;
    let ts_len: [u8; 2] = payload.get(38..40)?.try_into().ok()?;
    let ts_end = FIXED_LEN + usize::from(u16::from_be_bytes(ts_len));
    let tracestate = payload.get(FIXED_LEN..ts_end)?;
    if trace_id == [0; 16] || span_id == [0; 8] || !tracestate.is_ascii() {
        return None;
    }
    Some((
        Header {
            trace_id,
            span_id,
            flags: payload[5],
            published_unix_nanos: u64::from_be_bytes(time),
            tracestate,
        },
        &payload[ts_end..],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header<'static> {
        Header {
            trace_id: [7; 16],
            span_id: [9; 8],
            flags: 1,
            published_unix_nanos: 1_700_000_000_000_000_000,
            tracestate: b"vendor=x",
        }
    }

    #[test]
    fn round_trips_any_payload() {
        for payload in [&b""[..], b"hello", b"\r\n\0\xff\xfe$3\r\n", MAGIC] {
            let w = wrap(&header(), payload);
            let (h, p) = unwrap(&w).expect("valid envelope");
            assert_eq!(h, header());
            assert_eq!(p, payload);
        }
    }

    #[test]
    fn anything_else_is_not_an_envelope() {
        let w = wrap(&header(), b"payload");
        assert!(unwrap(b"hello").is_none());
        assert!(unwrap(&w[..FIXED_LEN - 1]).is_none());
        // tracestate longer than what is left
        let mut bad = w.clone();
        bad[38] = 0xff;
        assert!(unwrap(&bad).is_none());
        // another version
        let mut v2 = w.clone();
        v2[4] = b'2';
        assert!(unwrap(&v2).is_none());
        let zero = wrap(
            &Header {
                trace_id: [0; 16],
                ..header()
            },
            b"x",
        );
        assert!(unwrap(&zero).is_none());
    }
}
