//! Client requests: multibulk arrays of bulk strings, or inline lines.
//!
//! The parser is resumable: a request that arrives in pieces is never scanned
//! from its start again, and a declared bulk length is only a number until its
//! bytes actually arrive, so a client announcing 500 MB costs nothing up front.
//! Its rules and error texts follow Redis 7 (`networking.c`) so a client sees
//! the same answer from pubwarden as from Redis.

use std::ops::Range;

use super::{find_byte, parse_i64};

/// Bounds on client input, Redis's defaults unless configured otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Largest bulk argument (`proto-max-bulk-len`).
    pub max_bulk_len: usize,
    /// Most arguments in one multibulk request.
    pub max_multibulk_len: usize,
    /// Longest inline request, and longest header line awaited without `\r`.
    pub max_inline_len: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            max_bulk_len: 512 * 1024 * 1024,
            max_multibulk_len: 1024 * 1024,
            max_inline_len: 64 * 1024,
        }
    }
}

/// A request Redis would refuse with `-ERR Protocol error: ...` and a close.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("invalid multibulk length")]
    InvalidMultibulkLength,
    #[error("invalid bulk length")]
    InvalidBulkLength,
    #[error("expected '$', got '{}'", char::from(*.0))]
    ExpectedBulk(u8),
    #[error("too big mbulk count string")]
    TooBigMultibulkCount,
    #[error("too big bulk count string")]
    TooBigBulkCount,
    #[error("too big inline request")]
    TooBigInline,
    #[error("unbalanced quotes in request")]
    UnbalancedQuotes,
    #[error("unauthenticated multibulk length")]
    UnauthenticatedMultibulkLength,
    #[error("unauthenticated bulk length")]
    UnauthenticatedBulkLength,
}

/// Redis's caps on what an unauthenticated client may send.
const UNAUTHENTICATED_MAX_ARGS: i64 = 10;
const UNAUTHENTICATED_MAX_BULK: i64 = 16384;

impl ProtocolError {
    /// The error reply Redis writes before closing the connection.
    pub fn reply(&self) -> Vec<u8> {
        let mut out = b"-ERR Protocol error: ".to_vec();
        // Redis replaces line breaks in error text so the reply stays one line.
        out.extend(self.to_string().bytes().map(|b| match b {
            b'\r' | b'\n' => b' ',
            other => other,
        }));
        out.extend_from_slice(b"\r\n");
        out
    }
}

/// Where a complete request lies in the read buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestFrame {
    /// First byte of the request in the buffer.
    pub start: usize,
    /// One past its last byte: the next request starts here.
    pub end: usize,
    /// Number of arguments; 0 for the empty requests Redis silently skips.
    pub argc: usize,
    /// An inline request: its arguments were unquoted into an owned multibulk
    /// encoding ([`RequestParser::inline_encoding`]) which is what goes upstream.
    pub inline: bool,
}

#[derive(Debug, Clone, Copy)]
enum State {
    /// Between requests.
    Idle,
    /// Inside a multibulk request, `remaining` arguments still to read.
    Multibulk {
        start: usize,
        pos: usize,
        remaining: usize,
        bulk_len: Option<usize>,
    },
    /// Waiting for the end of an inline line; `scanned` bytes have no `\n`.
    Inline { start: usize, scanned: usize },
}

/// Resumable, bounded parser for client requests.
pub struct RequestParser {
    limits: RequestLimits,
    state: State,
    args: Vec<Range<usize>>,
    inline: Vec<u8>,
    unauthenticated: bool,
}

impl RequestParser {
    pub fn new(limits: RequestLimits) -> Self {
        Self {
            limits,
            state: State::Idle,
            args: Vec::new(),
            inline: Vec::new(),
            unauthenticated: false,
        }
    }

    /// While true, Redis's pre-authentication caps apply (at most 10
    /// arguments, bulks of at most 16384 bytes), so an unauthenticated client
    /// cannot make pubwarden buffer a large request.
    pub fn set_unauthenticated(&mut self, unauthenticated: bool) {
        self.unauthenticated = unauthenticated;
    }

    /// True while part of a request has been read but not all of it.
    pub fn is_mid_request(&self) -> bool {
        !matches!(self.state, State::Idle)
    }

    /// The caller dropped `n` bytes from the front of its buffer: shift every
    /// position the parser holds. Only the unfinished request may be kept, so
    /// `n` never exceeds the start of that request.
    pub fn rebase(&mut self, n: usize) {
        match &mut self.state {
            State::Idle => {}
            State::Multibulk { start, pos, .. } => {
                *start -= n;
                *pos -= n;
                for r in &mut self.args {
                    r.start -= n;
                    r.end -= n;
                }
            }
            State::Inline { start, scanned } => {
                *start -= n;
                *scanned -= n;
            }
        }
    }

    /// The arguments of the request just returned by [`Self::next`].
    pub fn args<'a>(&'a self, buf: &'a [u8], frame: &RequestFrame) -> Args<'a> {
        Args {
            data: if frame.inline { &self.inline } else { buf },
            ranges: &self.args,
        }
    }

    /// The multibulk encoding of the last inline request.
    pub fn inline_encoding(&self) -> &[u8] {
        &self.inline
    }

    /// Parses the next request starting at `at` (or resumes the one in
    /// progress). `Ok(None)` means more bytes are needed.
    pub fn next(&mut self, buf: &[u8], at: usize) -> Result<Option<RequestFrame>, ProtocolError> {
        loop {
            match self.state {
                State::Idle => {
                    let Some(&first) = buf.get(at) else {
                        return Ok(None);
                    };
                    self.args.clear();
                    self.state = if first == b'*' {
                        match self.multibulk_header(buf, at)? {
                            Header::Incomplete => return Ok(None),
                            Header::Empty(end) => {
                                return Ok(Some(RequestFrame {
                                    start: at,
                                    end,
                                    argc: 0,
                                    inline: false,
                                }));
                            }
                            Header::Count(remaining, pos) => State::Multibulk {
                                start: at,
                                pos,
                                remaining,
                                bulk_len: None,
                            },
                        }
                    } else {
                        State::Inline {
                            start: at,
                            scanned: at,
                        }
                    };
                }
                State::Multibulk { .. } => return self.resume_multibulk(buf),
                State::Inline { .. } => return self.resume_inline(buf),
            }
        }
    }

    fn multibulk_header(&self, buf: &[u8], at: usize) -> Result<Header, ProtocolError> {
        let Some(cr) = find_byte(buf, at, b'\r') else {
            if buf.len() - at > self.limits.max_inline_len {
                return Err(ProtocolError::TooBigMultibulkCount);
            }
            return Ok(Header::Incomplete);
        };
        if cr + 1 >= buf.len() {
            return Ok(Header::Incomplete);
        }
        let count = parse_i64(&buf[at + 1..cr]).ok_or(ProtocolError::InvalidMultibulkLength)?;
        if count > self.limits.max_multibulk_len as i64 || count > i64::from(i32::MAX) {
            return Err(ProtocolError::InvalidMultibulkLength);
        }
        if self.unauthenticated && count > UNAUTHENTICATED_MAX_ARGS {
            return Err(ProtocolError::UnauthenticatedMultibulkLength);
        }
        let next = cr + 2;
        if count <= 0 {
            return Ok(Header::Empty(next));
        }
        Ok(Header::Count(count as usize, next))
    }

    fn resume_multibulk(&mut self, buf: &[u8]) -> Result<Option<RequestFrame>, ProtocolError> {
        let State::Multibulk {
            start,
            mut pos,
            mut remaining,
            mut bulk_len,
        } = self.state
        else {
            return Ok(None);
        };
        while remaining > 0 {
            let len = match bulk_len {
                Some(len) => len,
                None => {
                    let Some(cr) = find_byte(buf, pos, b'\r') else {
                        if buf.len() - pos > self.limits.max_inline_len {
                            return Err(ProtocolError::TooBigBulkCount);
                        }
                        break;
                    };
                    if cr + 1 >= buf.len() {
                        break;
                    }
                    if buf[pos] != b'$' {
                        return Err(ProtocolError::ExpectedBulk(buf[pos]));
                    }
                    let len =
                        parse_i64(&buf[pos + 1..cr]).ok_or(ProtocolError::InvalidBulkLength)?;
                    if len < 0 || len as u64 > self.limits.max_bulk_len as u64 {
                        return Err(ProtocolError::InvalidBulkLength);
                    }
                    if self.unauthenticated && len > UNAUTHENTICATED_MAX_BULK {
                        return Err(ProtocolError::UnauthenticatedBulkLength);
                    }
                    pos = cr + 2;
                    bulk_len = Some(len as usize);
                    len as usize
                }
            };
            // Like Redis, the two bytes after the data are skipped unchecked.
            if buf.len() - pos < len + 2 {
                break;
            }
            self.args.push(pos..pos + len);
            pos += len + 2;
            bulk_len = None;
            remaining -= 1;
        }
        if remaining > 0 {
            self.state = State::Multibulk {
                start,
                pos,
                remaining,
                bulk_len,
            };
            return Ok(None);
        }
        self.state = State::Idle;
        Ok(Some(RequestFrame {
            start,
            end: pos,
            argc: self.args.len(),
            inline: false,
        }))
    }

    fn resume_inline(&mut self, buf: &[u8]) -> Result<Option<RequestFrame>, ProtocolError> {
        let State::Inline { start, scanned } = self.state else {
            return Ok(None);
        };
        let Some(lf) = find_byte(buf, scanned, b'\n') else {
            if buf.len() - start > self.limits.max_inline_len {
                return Err(ProtocolError::TooBigInline);
            }
            self.state = State::Inline {
                start,
                scanned: buf.len(),
            };
            return Ok(None);
        };
        self.state = State::Idle;
        let mut line_end = lf;
        if line_end > start && buf[line_end - 1] == b'\r' {
            line_end -= 1;
        }
        let words = split_inline(&buf[start..line_end]).ok_or(ProtocolError::UnbalancedQuotes)?;
        self.inline.clear();
        self.args.clear();
        if !words.is_empty() {
            encode_multibulk(&mut self.inline, &mut self.args, &words);
        }
        Ok(Some(RequestFrame {
            start,
            end: lf + 1,
            argc: words.len(),
            inline: true,
        }))
    }
}

enum Header {
    Incomplete,
    Empty(usize),
    Count(usize, usize),
}

/// A request's arguments, borrowed from the read buffer.
#[derive(Clone, Copy)]
pub struct Args<'a> {
    data: &'a [u8],
    ranges: &'a [Range<usize>],
}

impl<'a> Args<'a> {
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn get(&self, i: usize) -> Option<&'a [u8]> {
        self.ranges.get(i).and_then(|r| self.data.get(r.clone()))
    }

    pub fn iter(&self) -> impl Iterator<Item = &'a [u8]> + 'a {
        let data = self.data;
        self.ranges.iter().filter_map(move |r| data.get(r.clone()))
    }
}

fn encode_multibulk(out: &mut Vec<u8>, ranges: &mut Vec<Range<usize>>, words: &[Vec<u8>]) {
    out.extend_from_slice(format!("*{}\r\n", words.len()).as_bytes());
    for w in words {
        out.extend_from_slice(format!("${}\r\n", w.len()).as_bytes());
        ranges.push(out.len()..out.len() + w.len());
        out.extend_from_slice(w);
        out.extend_from_slice(b"\r\n");
    }
}

/// Splits an inline request into arguments exactly as Redis's `sdssplitargs`
/// does (quotes, `\xHH` and C escapes); `None` for unbalanced quotes.
fn split_inline(line: &[u8]) -> Option<Vec<Vec<u8>>> {
    // sdssplitargs works on a C string: a NUL ends the line.
    let line = match line.iter().position(|&b| b == 0) {
        Some(nul) => &line[..nul],
        None => line,
    };
    let at = |i: usize| line.get(i).copied().unwrap_or(0);
    let is_space = |b: u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c);
    let mut words = Vec::new();
    let mut p = 0;
    loop {
        while p < line.len() && is_space(line[p]) {
            p += 1;
        }
        if p >= line.len() {
            return Some(words);
        }
        let mut cur = Vec::new();
        let (mut in_double, mut in_single) = (false, false);
        loop {
            let c = at(p);
            if in_double {
                if c == b'\\'
                    && at(p + 1) == b'x'
                    && at(p + 2).is_ascii_hexdigit()
                    && at(p + 3).is_ascii_hexdigit()
                {
                    cur.push(hex(at(p + 2)) * 16 + hex(at(p + 3)));
                    p += 3;
                } else if c == b'\\' && at(p + 1) != 0 {
                    p += 1;
                    cur.push(match at(p) {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 0x08,
                        b'a' => 0x07,
                        other => other,
                    });
                } else if c == b'"' {
                    if at(p + 1) != 0 && !is_space(at(p + 1)) {
                        return None;
                    }
                    p += 1;
                    break;
                } else if c == 0 {
                    return None;
                } else {
                    cur.push(c);
                }
            } else if in_single {
                if c == b'\\' && at(p + 1) == b'\'' {
                    p += 1;
                    cur.push(b'\'');
                } else if c == b'\'' {
                    if at(p + 1) != 0 && !is_space(at(p + 1)) {
                        return None;
                    }
                    p += 1;
                    break;
                } else if c == 0 {
                    return None;
                } else {
                    cur.push(c);
                }
            } else {
                match c {
                    b' ' | b'\n' | b'\r' | b'\t' | 0 => break,
                    b'"' => in_double = true,
                    b'\'' => in_single = true,
                    other => cur.push(other),
                }
            }
            p += 1;
        }
        words.push(cur);
    }
}

fn hex(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        _ => b - b'A' + 10,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(input: &[u8]) -> Result<Vec<Vec<Vec<u8>>>, ProtocolError> {
        let mut p = RequestParser::new(RequestLimits::default());
        let mut at = 0;
        let mut out = Vec::new();
        while let Some(f) = p.next(input, at)? {
            out.push(p.args(input, &f).iter().map(<[u8]>::to_vec).collect());
            at = f.end;
        }
        Ok(out)
    }

    fn words(v: &[&str]) -> Vec<Vec<u8>> {
        v.iter().map(|s| s.as_bytes().to_vec()).collect()
    }

    #[test]
    fn multibulk_and_inline() {
        let got = parse_all(
            b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\nSET  a   b\nPING \"a\\x41b\\n\"\r\n*0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(
            got,
            vec![
                words(&["GET", "k"]),
                words(&["SET", "a", "b"]),
                words(&["PING", "aAb\n"]),
                vec![],
                vec![]
            ]
        );
    }

    #[test]
    fn quotes_follow_sdssplitargs() {
        assert_eq!(
            split_inline(b"a\"b c\" 'x\\'y'"),
            Some(words(&["ab c", "x'y"]))
        );
        assert_eq!(split_inline(b"set \"a b"), None);
        assert_eq!(split_inline(b"PING \"a\"b"), None);
        assert_eq!(split_inline(b"   "), Some(vec![]));
    }

    #[test]
    fn errors_match_redis_text() {
        let cases: [(&[u8], &str); 6] = [
            (
                b"*abc\r\n",
                "-ERR Protocol error: invalid multibulk length\r\n",
            ),
            (
                b"*1\r\n+foo\r\n",
                "-ERR Protocol error: expected '$', got '+'\r\n",
            ),
            (
                b"*1\r\n$abc\r\n",
                "-ERR Protocol error: invalid bulk length\r\n",
            ),
            (
                b"*1\r\n$536870913\r\n",
                "-ERR Protocol error: invalid bulk length\r\n",
            ),
            (
                b"*1048577\r\n",
                "-ERR Protocol error: invalid multibulk length\r\n",
            ),
            (
                b"set \"a b\r\n",
                "-ERR Protocol error: unbalanced quotes in request\r\n",
            ),
        ];
        for (input, reply) in cases {
            let err = parse_all(input).unwrap_err();
            assert_eq!(String::from_utf8_lossy(&err.reply()), reply);
        }
    }

    #[test]
    fn byte_by_byte_arrival_resumes_without_rescanning() {
        let input = b"*3\r\n$7\r\nPUBLISH\r\n$2\r\nch\r\n$5\r\nhello\r\nPING\r\n";
        let mut p = RequestParser::new(RequestLimits::default());
        let mut at = 0;
        let mut got = Vec::new();
        for n in 1..=input.len() {
            let buf = &input[..n];
            while let Some(f) = p.next(buf, at).unwrap() {
                got.push(
                    p.args(buf, &f)
                        .iter()
                        .map(<[u8]>::to_vec)
                        .collect::<Vec<_>>(),
                );
                at = f.end;
            }
        }
        assert_eq!(
            got,
            vec![words(&["PUBLISH", "ch", "hello"]), words(&["PING"])]
        );
    }

    #[test]
    fn unauthenticated_caps() {
        let mut p = RequestParser::new(RequestLimits::default());
        p.set_unauthenticated(true);
        assert_eq!(
            p.next(b"*11\r\n", 0),
            Err(ProtocolError::UnauthenticatedMultibulkLength)
        );
        let mut p = RequestParser::new(RequestLimits::default());
        p.set_unauthenticated(true);
        assert_eq!(
            p.next(b"*1\r\n$16385\r\n", 0),
            Err(ProtocolError::UnauthenticatedBulkLength)
        );
        assert_eq!(
            String::from_utf8_lossy(&ProtocolError::UnauthenticatedBulkLength.reply()),
            "-ERR Protocol error: unauthenticated bulk length\r\n"
        );
    }

    #[test]
    fn huge_declared_bulk_is_only_a_number() {
        let mut p = RequestParser::new(RequestLimits::default());
        let buf = b"*1\r\n$500000000\r\nabc";
        assert_eq!(p.next(buf, 0).unwrap(), None);
        assert!(p.is_mid_request());
    }

    #[test]
    fn long_lines_without_terminator_are_refused() {
        let mut line = vec![b'a'; 65 * 1024];
        assert_eq!(parse_all(&line).unwrap_err(), ProtocolError::TooBigInline);
        line[0] = b'*';
        assert_eq!(
            parse_all(&line).unwrap_err(),
            ProtocolError::TooBigMultibulkCount
        );
    }

    #[test]
    fn rebase_keeps_a_partial_request() {
        let mut p = RequestParser::new(RequestLimits::default());
        let first = b"PING\r\n*2\r\n$4\r\nECHO\r\n$2\r\nh";
        let f = p.next(first, 0).unwrap().unwrap();
        assert_eq!(p.next(first, f.end).unwrap(), None);
        p.rebase(f.end);
        let rest = b"*2\r\n$4\r\nECHO\r\n$2\r\nhi\r\n";
        let f = p.next(rest, 0).unwrap().unwrap();
        assert_eq!(p.args(rest, &f).get(1), Some(&b"hi"[..]));
        assert_eq!(f.end, rest.len());
    }
}
