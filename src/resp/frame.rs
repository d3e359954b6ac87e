//! Upstream output: frame boundaries in RESP2 and RESP3, found in one pass.
//!
//! The scanner keeps an explicit stack instead of recursing, so nesting depth
//! is a configured bound rather than the thread's stack size, and it resumes
//! where it stopped when a frame arrives in pieces (a 10 MB bulk is walked
//! once, not once per read). It records the first [`MAX_ELEMS`] top-level
//! elements of an aggregate, which is all pubwarden needs to tell a reply from
//! a pub/sub confirmation or a delivery.

use super::{find_byte, parse_i64};

/// Top-level elements recorded per frame: `pmessage pattern channel payload`.
pub const MAX_ELEMS: usize = 4;

/// Why an upstream byte stream cannot be RESP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("unknown RESP type byte 0x{0:02x}")]
    UnknownType(u8),
    #[error("invalid length in a RESP header")]
    InvalidLength,
    #[error("RESP nesting deeper than {0}")]
    TooDeep(usize),
}

/// One element of a top-level aggregate. For strings and numbers `start..end`
/// is the payload; for nested aggregates it is the whole element.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Elem {
    pub kind: u8,
    pub start: usize,
    pub end: usize,
    /// A null bulk or null aggregate.
    pub null: bool,
}

/// A complete frame in the read buffer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Frame {
    pub start: usize,
    pub end: usize,
    /// The type byte: `*`, `>`, `+`, `-`, `$`, `|`, ...
    pub kind: u8,
    /// Declared element count of an aggregate (for maps and attributes, the
    /// number of pairs); -1 for null.
    pub len: i64,
    pub elems: [Elem; MAX_ELEMS],
    pub recorded: u8,
    /// Set by the fast path: 1 `message`, 2 `pmessage`, 3 `smessage`, so the
    /// session need not compare the first element again. 0: not known.
    pub delivery: u8,
}

impl Frame {
    /// The bytes of recorded element `i`, if it is a non-null string.
    pub fn str_elem<'a>(&self, buf: &'a [u8], i: usize) -> Option<&'a [u8]> {
        let e = self
            .elems
            .get(i)
            .filter(|_| i < usize::from(self.recorded))?;
        match e.kind {
            b'$' | b'+' | b'=' if !e.null => buf.get(e.start..e.end),
            _ => None,
        }
    }

    /// Recorded element `i` as an integer.
    pub fn int_elem(&self, buf: &[u8], i: usize) -> Option<i64> {
        let e = self
            .elems
            .get(i)
            .filter(|_| i < usize::from(self.recorded))?;
        if e.kind != b':' {
            return None;
        }
        parse_i64(buf.get(e.start..e.end)?)
    }

    /// Recorded element `i`, whatever its type.
    pub fn elem(&self, i: usize) -> Option<&Elem> {
        self.elems.get(i).filter(|_| i < usize::from(self.recorded))
    }

    pub fn is_error(&self) -> bool {
        matches!(self.kind, b'-' | b'!')
    }
}

#[derive(Debug, Clone, Copy)]
struct Level {
    remaining: u64,
    /// Attributes decorate the next value and are not elements of their parent.
    counts: bool,
    /// Where this aggregate's header started (for recording it as an element).
    start: usize,
}

/// Resumable scanner for upstream frames.
pub struct FrameScanner {
    max_depth: usize,
    active: bool,
    pos: usize,
    /// `\r` was searched for up to here on the current header line.
    line_scanned: usize,
    /// Inside a bulk payload that ends (with its CRLF) at this position.
    bulk: Option<(usize, usize)>,
    stack: Vec<Level>,
    frame: Frame,
    /// Start of the depth-1 element being read, and its type byte.
    elem_start: usize,
    elem_kind: u8,
}

impl FrameScanner {
    pub fn new(max_depth: usize) -> Self {
        Self {
            max_depth: max_depth.max(1),
            active: false,
            pos: 0,
            line_scanned: 0,
            bulk: None,
            stack: Vec::new(),
            frame: Frame::default(),
            elem_start: 0,
            elem_kind: 0,
        }
    }

    /// True while a frame has started but not ended.
    pub fn is_mid_frame(&self) -> bool {
        self.active
    }

    /// The caller dropped `n` bytes from the front of its buffer, none of them
    /// part of the unfinished frame.
    pub fn rebase(&mut self, n: usize) {
        if !self.active {
            return;
        }
        self.pos -= n;
        self.line_scanned -= n;
        if let Some((s, e)) = &mut self.bulk {
            *s -= n;
            *e -= n;
        }
        for l in &mut self.stack {
            l.start -= n;
        }
        self.frame.start -= n;
        for e in &mut self.frame.elems[..usize::from(self.frame.recorded)] {
            e.start -= n;
            e.end -= n;
        }
        // Only meaningful inside the current frame; may be stale from an earlier one.
        self.elem_start = self.elem_start.saturating_sub(n);
    }

    /// Scans the next frame starting at `at` (or resumes the one in progress).
    pub fn next(&mut self, buf: &[u8], at: usize) -> Result<Option<Frame>, FrameError> {
        if !self.active {
            if at >= buf.len() {
                return Ok(None);
            }
            if let Some(f) = fast_delivery(buf, at) {
                return Ok(Some(f));
            }
            self.active = true;
            self.pos = at;
            self.line_scanned = at;
            self.bulk = None;
            self.stack.clear();
            self.frame = Frame {
                start: at,
                ..Frame::default()
            };
        }
        loop {
            if let Some((data_start, end)) = self.bulk {
                if buf.len() < end {
                    return Ok(None);
                }
                self.bulk = None;
                self.pos = end;
                self.line_scanned = end;
                if self.complete_value(data_start, end - 2, false) {
                    return Ok(Some(self.finish()));
                }
                continue;
            }
            let Some(cr) = find_byte(buf, self.line_scanned, b'\r') else {
                self.line_scanned = buf.len();
                return Ok(None);
            };
            if cr + 1 >= buf.len() {
                self.line_scanned = cr;
                return Ok(None);
            }
            let header = self.pos;
            let kind = buf[header];
            let body = header + 1..cr;
            self.pos = cr + 2;
            self.line_scanned = self.pos;
            let depth = self.stack.len();
            if depth == 0 {
                self.frame.kind = kind;
            } else if depth == 1 {
                self.elem_start = header;
                self.elem_kind = kind;
            }
            match kind {
                b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => {
                    if self.complete_value(body.start, body.end, kind == b'_') {
                        return Ok(Some(self.finish()));
                    }
                }
                b'$' | b'!' | b'=' => {
                    let len = parse_i64(&buf[body]).ok_or(FrameError::InvalidLength)?;
                    if len == -1 && kind == b'$' {
                        if self.complete_value(self.pos, self.pos, true) {
                            return Ok(Some(self.finish()));
                        }
                        continue;
                    }
                    let len = usize::try_from(len).map_err(|_| FrameError::InvalidLength)?;
                    let end = self
                        .pos
                        .checked_add(len)
                        .and_then(|e| e.checked_add(2))
                        .ok_or(FrameError::InvalidLength)?;
                    self.bulk = Some((self.pos, end));
                }
                b'*' | b'>' | b'~' | b'%' | b'|' => {
                    let n = parse_i64(&buf[body]).ok_or(FrameError::InvalidLength)?;
                    if depth == 0 {
                        self.frame.len = n;
                    }
                    if n < 0 {
                        if n == -1 && kind == b'*' {
                            if self.complete_value(self.pos, self.pos, true) {
                                return Ok(Some(self.finish()));
                            }
                            continue;
                        }
                        return Err(FrameError::InvalidLength);
                    }
                    if depth >= self.max_depth {
                        return Err(FrameError::TooDeep(self.max_depth));
                    }
                    let per = if matches!(kind, b'%' | b'|') { 2 } else { 1 };
                    let remaining = (n as u64)
                        .checked_mul(per)
                        .ok_or(FrameError::InvalidLength)?;
                    self.stack.push(Level {
                        remaining,
                        counts: !(kind == b'|' && depth > 0),
                        start: header,
                    });
                    if remaining == 0 && self.close_aggregates() {
                        return Ok(Some(self.finish()));
                    }
                }
                other => return Err(FrameError::UnknownType(other)),
            }
        }
    }

    /// A scalar (or null) value just ended at `self.pos`. Returns true when it
    /// completed the whole frame.
    fn complete_value(&mut self, start: usize, end: usize, null: bool) -> bool {
        match self.stack.len() {
            0 => return true,
            1 => self.record(start, end, null),
            _ => {}
        }
        self.count_one();
        self.close_aggregates()
    }

    fn record(&mut self, start: usize, end: usize, null: bool) {
        let i = usize::from(self.frame.recorded);
        if i < MAX_ELEMS && self.elem_kind != b'|' {
            self.frame.elems[i] = Elem {
                kind: self.elem_kind,
                start,
                end,
                null,
            };
            self.frame.recorded += 1;
        }
    }

    fn count_one(&mut self) {
        if let Some(top) = self.stack.last_mut() {
            top.remaining = top.remaining.saturating_sub(1);
        }
    }

    /// Pops every aggregate whose elements are all read; true when the
    /// outermost one closed.
    fn close_aggregates(&mut self) -> bool {
        while let Some(top) = self.stack.last().copied() {
            if top.remaining > 0 {
                return false;
            }
            self.stack.pop();
            match self.stack.len() {
                0 => return true,
                1 if top.counts => self.record(top.start, self.pos, false),
                _ => {}
            }
            if top.counts {
                self.count_one();
            }
        }
        true
    }

    fn finish(&mut self) -> Frame {
        self.active = false;
        self.frame.end = self.pos;
        self.frame
    }
}

/// The shapes that make up nearly all pub/sub traffic, matched exactly and
/// parsed without the general machinery: `*3 $7 message $n ch $n payload`,
/// `*4 $8 pmessage $n pattern $n ch $n payload`, `*3 $8 smessage ...`, and
/// the same as RESP3 pushes (`>`). Anything else, or anything incomplete,
/// falls through to the general scanner, which gives the same result.
#[inline]
pub fn fast_delivery(buf: &[u8], at: usize) -> Option<Frame> {
    let b = buf.get(at..)?;
    let kind = *b.first()?;
    if kind != b'*' && kind != b'>' {
        return None;
    }
    let head: [u8; 11] = b.get(1..12)?.try_into().ok()?;
    let (count, delivery, first_len): (i64, u8, usize) = match &head {
        b"3\r\n$7\r\nmess" => (3, 1, 7),
        b"4\r\n$8\r\npmes" => (4, 2, 8),
        b"3\r\n$8\r\nsmes" => (3, 3, 8),
        _ => return None,
    };
    // Fixed-size compares: inlined, where a slice compare calls memcmp.
    let word_ok = match delivery {
        1 => b.get(8..17).and_then(|w| <[u8; 9]>::try_from(w).ok()) == Some(*b"message\r\n"),
        2 => b.get(8..18).and_then(|w| <[u8; 10]>::try_from(w).ok()) == Some(*b"pmessage\r\n"),
        _ => b.get(8..18).and_then(|w| <[u8; 10]>::try_from(w).ok()) == Some(*b"smessage\r\n"),
    };
    if !word_ok {
        return None;
    }
    let mut frame = Frame {
        start: at,
        kind,
        len: count,
        recorded: count as u8,
        delivery,
        ..Frame::default()
    };
    frame.elems[0] = Elem {
        kind: b'$',
        start: at + 8,
        end: at + 8 + first_len,
        null: false,
    };
    let mut pos = 8 + first_len + 2;
    for i in 1..count as usize {
        if *b.get(pos)? != b'$' {
            return None;
        }
        // A short decimal length: at most 10 digits, no sign, no leading zero.
        let mut len = 0usize;
        let mut p = pos + 1;
        loop {
            match *b.get(p)? {
                d @ b'0'..=b'9' if p - pos <= 10 => {
                    if d == b'0' && p == pos + 1 && *b.get(p + 1)? != b'\r' {
                        return None;
                    }
                    len = len * 10 + usize::from(d - b'0');
                }
                b'\r' if p > pos + 1 => break,
                _ => return None,
            }
            p += 1;
        }
        if *b.get(p + 1)? != b'\n' {
            return None;
        }
        let data = p + 2;
        let end = data.checked_add(len)?;
        // The general scanner skips these two bytes unchecked too.
        b.get(end + 1)?;
        frame.elems[i] = Elem {
            kind: b'$',
            start: at + data,
            end: at + end,
            null: false,
        };
        pos = end + 2;
    }
    frame.end = at + pos;
    Some(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_path_agrees_with_the_general_scanner() {
        let cases: &[&[u8]] = &[
            b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$5\r\nhe\r\nl\r\n",
            b">3\r\n$7\r\nmessage\r\n$0\r\n\r\n$0\r\n\r\n",
            b"*4\r\n$8\r\npmessage\r\n$2\r\np*\r\n$2\r\npq\r\n$10\r\n0123456789\r\n",
            b">3\r\n$8\r\nsmessage\r\n$1\r\ns\r\n$1\r\nx\r\n",
        ];
        for case in cases {
            let fast = fast_delivery(case, 0).expect("fast path taken");
            let mut general = FrameScanner::new(8);
            // Force the general path by scanning from a copy with a prefix frame.
            let mut buf = b"+OK\r\n".to_vec();
            buf.extend_from_slice(case);
            let _ = general.next(&buf, 0).unwrap().unwrap();
            general.active = true;
            general.pos = 5;
            general.line_scanned = 5;
            general.stack.clear();
            general.frame = Frame {
                start: 5,
                ..Frame::default()
            };
            let mut slow = general.next(&buf, 5).unwrap().unwrap();
            slow.start -= 5;
            slow.end -= 5;
            for e in &mut slow.elems[..usize::from(slow.recorded)] {
                e.start -= 5;
                e.end -= 5;
            }
            assert_eq!(
                Frame {
                    delivery: 0,
                    ..fast
                },
                slow,
                "{}",
                String::from_utf8_lossy(case)
            );
        }
        // Not a delivery shape, or incomplete: left to the general scanner.
        assert!(fast_delivery(b"*3\r\n$7\r\nmessagX\r\n", 0).is_none());
        assert!(fast_delivery(b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$5\r\nhel", 0).is_none());
        assert!(fast_delivery(b"*3\r\n$7\r\nmessage\r\n$02\r\nch\r\n$1\r\nx\r\n", 0).is_none());
    }

    fn frames(input: &[u8]) -> Vec<Frame> {
        let mut s = FrameScanner::new(64);
        let mut at = 0;
        let mut out = Vec::new();
        while let Some(f) = s.next(input, at).unwrap() {
            at = f.end;
            out.push(f);
        }
        assert_eq!(at, input.len(), "all input consumed");
        out
    }

    #[test]
    fn message_elements_are_recorded() {
        let buf = b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$5\r\nhe\r\nl\r\n";
        let f = frames(buf)[0];
        assert_eq!((f.kind, f.len, f.recorded), (b'*', 3, 3));
        assert_eq!(f.str_elem(buf, 0), Some(&b"message"[..]));
        assert_eq!(f.str_elem(buf, 1), Some(&b"ch"[..]));
        assert_eq!(f.str_elem(buf, 2), Some(&b"he\r\nl"[..]));
    }

    #[test]
    fn resp3_types_nulls_and_nesting() {
        let buf: &[u8] = b"%2\r\n$1\r\na\r\n*2\r\n:1\r\n_\r\n$1\r\nb\r\n~1\r\n#t\r\n\
            >3\r\n$9\r\nsubscribe\r\n$-1\r\n:0\r\n$-1\r\n*-1\r\n_\r\n,1.5\r\n(123\r\n=7\r\ntxt:abc\r\n!3\r\nERR\r\n*0\r\n";
        let fs = frames(buf);
        assert_eq!(
            fs.iter().map(|f| f.kind).collect::<Vec<_>>(),
            b"%>$*_,(=!*".to_vec()
        );
        let push = fs[1];
        assert_eq!(push.str_elem(buf, 0), Some(&b"subscribe"[..]));
        assert!(push.elem(1).is_some_and(|e| e.null));
        assert_eq!(push.int_elem(buf, 2), Some(0));
        // The map's nested array is recorded as one whole element.
        let map = fs[0];
        assert_eq!(map.len, 2);
        let e = map.elem(1).unwrap();
        assert_eq!(&buf[e.start..e.end], b"*2\r\n:1\r\n_\r\n");
    }

    #[test]
    fn attributes_do_not_count_as_elements() {
        let buf = b"|1\r\n$1\r\nk\r\n:1\r\n$4\r\nreal\r\n*2\r\n|1\r\n+a\r\n+b\r\n:1\r\n:2\r\n";
        let fs = frames(buf);
        assert_eq!(
            fs.iter().map(|f| f.kind).collect::<Vec<_>>(),
            b"|$*".to_vec()
        );
        assert_eq!(fs[2].recorded, 2);
        assert_eq!(fs[2].int_elem(buf, 1), Some(2));
    }

    #[test]
    fn resumes_across_any_split() {
        let buf: &[u8] =
            b"*4\r\n$8\r\npmessage\r\n$2\r\np*\r\n$2\r\npq\r\n*1\r\n$3\r\nxyz\r\n+OK\r\n";
        let whole = frames(buf);
        for split in 1..buf.len() {
            let mut s = FrameScanner::new(64);
            let mut got = Vec::new();
            let mut at = 0;
            for view in [&buf[..split], buf] {
                while let Some(f) = s.next(view, at).unwrap() {
                    at = f.end;
                    got.push(f);
                }
            }
            assert_eq!(got, whole, "split at {split}");
        }
    }

    #[test]
    fn rebase_after_an_aggregate_then_a_split_scalar() {
        let mut s = FrameScanner::new(64);
        let first = b"*1\r\n:1\r\n$10\r\nabc";
        let f = s.next(first, 0).unwrap().unwrap();
        assert_eq!(s.next(first, f.end).unwrap(), None);
        s.rebase(f.end);
        let rest = b"$10\r\nabcdefghij\r\n";
        let g = s.next(rest, 0).unwrap().unwrap();
        assert_eq!((g.start, g.end), (0, rest.len()));
    }

    #[test]
    fn bounds_and_garbage() {
        let deep = b"*1\r\n".repeat(100);
        let mut s = FrameScanner::new(64);
        assert_eq!(s.next(&deep, 0), Err(FrameError::TooDeep(64)));
        let mut s = FrameScanner::new(64);
        assert_eq!(s.next(b"?x\r\n", 0), Err(FrameError::UnknownType(b'?')));
        let mut s = FrameScanner::new(64);
        assert_eq!(s.next(b"$-5\r\n", 0), Err(FrameError::InvalidLength));
        let mut s = FrameScanner::new(64);
        assert_eq!(s.next(b"$9999999999\r\nab", 0), Ok(None));
    }
}
