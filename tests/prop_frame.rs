//! Property tests for the upstream frame scanner (`resp::frame`) and the
//! value decoder (`resp::value`).
//!
//! Random RESP2/RESP3 values are encoded, concatenated and scanned with every
//! kind of split: each frame must be found with its exact boundaries, type,
//! length and recorded top-level elements. Garbage must never panic and must
//! give the same frames (or the same error) however it is split.

use proptest::prelude::*;
use pubwarden::resp::frame::{Elem, Frame, FrameError, FrameScanner, MAX_ELEMS};
use pubwarden::resp::value::{self, Value};

/// A RESP value as a generator sees it.
#[derive(Debug, Clone)]
enum V {
    Simple(Vec<u8>),
    Error(Vec<u8>),
    Int(i64),
    Bulk(Vec<u8>),
    NullBulk,
    NullArray,
    Null,
    Double(String),
    Bool(bool),
    Big(String),
    Verbatim(Vec<u8>),
    BlobError(Vec<u8>),
    Array(Vec<V>),
    Set(Vec<V>),
    Push(Vec<V>),
    Map(Vec<(V, V)>),
    /// An attribute and the value it decorates.
    Attr(Vec<(V, V)>, Box<V>),
}

fn line_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..12).prop_map(|v| {
        v.into_iter()
            .filter(|b| *b != b'\r' && *b != b'\n')
            .collect()
    })
}

fn blob() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![3 => any::<u8>(), 1 => prop::sample::select(&b"\r\n*$:+-_|>%"[..])],
        0..24,
    )
}

fn scalar() -> impl Strategy<Value = V> {
    prop_oneof![
        line_bytes().prop_map(V::Simple),
        line_bytes().prop_map(V::Error),
        any::<i64>().prop_map(V::Int),
        blob().prop_map(V::Bulk),
        Just(V::NullBulk),
        Just(V::NullArray),
        Just(V::Null),
        prop_oneof![
            any::<f64>().prop_map(|f| f.to_string()),
            prop::sample::select(vec!["inf", "-inf", "nan", "1.5e-10"]).prop_map(String::from),
        ]
        .prop_map(V::Double),
        any::<bool>().prop_map(V::Bool),
        "-?[1-9][0-9]{0,40}".prop_map(V::Big),
        blob().prop_map(V::Verbatim),
        blob().prop_map(V::BlobError),
    ]
}

/// `message` / `pmessage` / `smessage` shapes (the scanner's fast path), in
/// RESP2 arrays and RESP3 pushes, with binary channels and payloads.
fn delivery() -> impl Strategy<Value = V> {
    (
        prop::sample::select(vec![&b"message"[..], b"pmessage", b"smessage", b"messages"]),
        prop::collection::vec(blob(), 3),
        any::<bool>(),
    )
        .prop_map(|(word, parts, push)| {
            let n = if word == b"pmessage" { 3 } else { 2 };
            let mut items = vec![V::Bulk(word.to_vec())];
            items.extend(parts.into_iter().take(n).map(V::Bulk));
            if push {
                V::Push(items)
            } else {
                V::Array(items)
            }
        })
}

fn value() -> impl Strategy<Value = V> {
    prop_oneof![4 => any_value(), 1 => delivery()]
}

fn any_value() -> impl Strategy<Value = V> {
    scalar().prop_recursive(4, 48, 6, |inner| {
        let items = prop::collection::vec(inner.clone(), 0..6);
        let pairs = prop::collection::vec((inner.clone(), inner.clone()), 0..4);
        prop_oneof![
            items.clone().prop_map(V::Array),
            items.clone().prop_map(V::Set),
            items.prop_map(V::Push),
            pairs.clone().prop_map(V::Map),
            (pairs, inner).prop_map(|(p, v)| V::Attr(p, Box::new(v))),
        ]
    })
}

/// What the scanner records for a value at depth 1.
fn bulk(out: &mut Vec<u8>, kind: u8, data: &[u8]) -> Elem {
    out.extend_from_slice(format!("{}{}\r\n", char::from(kind), data.len()).as_bytes());
    let start = out.len();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    Elem {
        kind,
        start,
        end: start + data.len(),
        null: false,
    }
}

fn line(out: &mut Vec<u8>, kind: u8, body: &[u8], null: bool) -> Elem {
    out.push(kind);
    let start = out.len();
    out.extend_from_slice(body);
    out.extend_from_slice(b"\r\n");
    Elem {
        kind,
        start,
        end: start + body.len(),
        null,
    }
}

fn children(v: &V) -> Option<(u8, i64, Vec<&V>)> {
    match v {
        V::Array(items) => Some((b'*', items.len() as i64, items.iter().collect())),
        V::Set(items) => Some((b'~', items.len() as i64, items.iter().collect())),
        V::Push(items) => Some((b'>', items.len() as i64, items.iter().collect())),
        V::Map(pairs) => Some((
            b'%',
            pairs.len() as i64,
            pairs.iter().flat_map(|(k, v)| [k, v]).collect(),
        )),
        _ => None,
    }
}

/// Encodes `v` (inside an aggregate) and returns the element the scanner
/// records for it.
fn encode(v: &V, out: &mut Vec<u8>) -> Elem {
    match v {
        V::Simple(b) => line(out, b'+', b, false),
        V::Error(b) => line(out, b'-', b, false),
        V::Int(n) => line(out, b':', n.to_string().as_bytes(), false),
        V::Bulk(b) => bulk(out, b'$', b),
        V::NullBulk => {
            out.extend_from_slice(b"$-1\r\n");
            Elem {
                kind: b'$',
                start: out.len(),
                end: out.len(),
                null: true,
            }
        }
        V::NullArray => {
            out.extend_from_slice(b"*-1\r\n");
            Elem {
                kind: b'*',
                start: out.len(),
                end: out.len(),
                null: true,
            }
        }
        V::Null => line(out, b'_', b"", true),
        V::Double(s) => line(out, b',', s.as_bytes(), false),
        V::Bool(b) => line(out, b'#', if *b { b"t" } else { b"f" }, false),
        V::Big(s) => line(out, b'(', s.as_bytes(), false),
        V::Verbatim(b) => bulk(out, b'=', &[&b"txt:"[..], b].concat()),
        V::BlobError(b) => bulk(out, b'!', b),
        V::Attr(pairs, inner) => {
            out.extend_from_slice(format!("|{}\r\n", pairs.len()).as_bytes());
            for (k, v) in pairs {
                encode(k, out);
                encode(v, out);
            }
            encode(inner, out)
        }
        _ => {
            let (kind, n, items) = children(v).unwrap();
            let start = out.len();
            out.extend_from_slice(format!("{}{n}\r\n", char::from(kind)).as_bytes());
            for item in items {
                encode(item, out);
            }
            Elem {
                kind,
                start,
                end: out.len(),
                null: false,
            }
        }
    }
}

/// A frame the scanner must find, with its nesting depth.
#[derive(Debug, Clone)]
struct Expected {
    frame: Frame,
    depth: usize,
    /// What the decoder must make of it (None for a top-level attribute,
    /// which is not a value on its own).
    value: Option<Value>,
}

/// Nesting depth as the scanner counts it: one level per aggregate,
/// attributes included.
fn depth(v: &V) -> usize {
    match v {
        V::Attr(pairs, inner) => {
            let own = 1 + pairs
                .iter()
                .map(|(k, v)| depth(k).max(depth(v)))
                .max()
                .unwrap_or(0);
            own.max(depth(inner))
        }
        _ => match children(v) {
            Some((_, _, items)) => 1 + items.into_iter().map(depth).max().unwrap_or(0),
            None => 0,
        },
    }
}

/// What `value::decode` makes of `v`.
fn model(v: &V) -> Value {
    match v {
        V::Simple(b) => Value::Simple(b.clone()),
        V::Error(b) | V::BlobError(b) => Value::Error(b.clone()),
        V::Int(n) => Value::Int(*n),
        V::Bulk(b) => Value::Bulk(b.clone()),
        V::Verbatim(b) => Value::Bulk([&b"txt:"[..], b].concat()),
        V::NullBulk | V::NullArray | V::Null => Value::Null,
        V::Double(_) | V::Bool(_) | V::Big(_) => Value::Other,
        V::Attr(_, inner) => model(inner),
        _ => Value::Array(children(v).unwrap().2.into_iter().map(model).collect()),
    }
}

/// Encodes a top-level value: a top-level attribute is a frame of its own.
fn encode_top(v: &V, out: &mut Vec<u8>, frames: &mut Vec<Expected>) {
    let start = out.len();
    let (kind, len, items): (u8, i64, Vec<&V>) = match v {
        V::Attr(pairs, inner) => {
            out.extend_from_slice(format!("|{}\r\n", pairs.len()).as_bytes());
            let mut elems = Vec::new();
            for (k, v) in pairs {
                elems.push(encode(k, out));
                elems.push(encode(v, out));
            }
            let d = 1 + pairs
                .iter()
                .map(|(k, v)| depth(k).max(depth(v)))
                .max()
                .unwrap_or(0);
            frames.push(expected(
                start,
                out.len(),
                b'|',
                pairs.len() as i64,
                &elems,
                d,
                None,
            ));
            return encode_top(inner, out, frames);
        }
        V::NullArray => (b'*', -1, Vec::new()),
        _ => match children(v) {
            Some(c) => c,
            None => {
                let e = encode(v, out);
                frames.push(expected(
                    start,
                    out.len(),
                    e.kind,
                    0,
                    &[],
                    0,
                    Some(model(v)),
                ));
                return;
            }
        },
    };
    if len < 0 {
        out.extend_from_slice(b"*-1\r\n");
    } else {
        out.extend_from_slice(format!("{}{len}\r\n", char::from(kind)).as_bytes());
    }
    let elems: Vec<Elem> = items.into_iter().map(|i| encode(i, out)).collect();
    frames.push(expected(
        start,
        out.len(),
        kind,
        len,
        &elems,
        depth(v),
        Some(model(v)),
    ));
}

fn expected(
    start: usize,
    end: usize,
    kind: u8,
    len: i64,
    elems: &[Elem],
    depth: usize,
    value: Option<Value>,
) -> Expected {
    let mut frame = Frame {
        start,
        end,
        kind,
        len,
        ..Frame::default()
    };
    for (slot, e) in frame.elems.iter_mut().zip(elems) {
        *slot = *e;
    }
    frame.recorded = elems.len().min(MAX_ELEMS) as u8;
    Expected {
        frame,
        depth,
        value,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Scan {
    frames: Vec<Frame>,
    end: Result<bool, FrameError>,
}

/// Scans `input` read in the chunks `cuts` delimit; positions are absolute.
/// With `rebase`, the consumed front of the buffer is dropped after each read.
fn scan(input: &[u8], cuts: &[usize], max_depth: usize, rebase: bool) -> Scan {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    points.push(input.len());
    points.sort_unstable();
    points.dedup();
    let mut s = FrameScanner::new(max_depth);
    let mut buf = Vec::new();
    let (mut offset, mut at, mut fed) = (0usize, 0usize, 0usize);
    let mut frames = Vec::new();
    for &point in &points {
        buf.extend_from_slice(&input[fed..point]);
        fed = point;
        loop {
            match s.next(&buf, at) {
                Ok(Some(mut f)) => {
                    assert_eq!(f.start, at, "frames are contiguous");
                    assert!(f.end > f.start && f.end <= buf.len(), "{f:?}");
                    assert!(usize::from(f.recorded) <= MAX_ELEMS);
                    for e in &f.elems[..usize::from(f.recorded)] {
                        assert!(f.start <= e.start && e.start <= e.end && e.end <= f.end);
                    }
                    check_delivery_hint(&f, &buf);
                    // The hint depends on how the frame arrived (only the
                    // fast path for a frame that is complete at once sets
                    // it); everything else must not.
                    f.delivery = 0;
                    at = f.end;
                    f.start += offset;
                    f.end += offset;
                    for e in &mut f.elems[..usize::from(f.recorded)] {
                        e.start += offset;
                        e.end += offset;
                    }
                    frames.push(f);
                }
                Ok(None) => break,
                Err(e) => {
                    return Scan {
                        frames,
                        end: Err(e),
                    };
                }
            }
        }
        if rebase {
            buf.drain(..at);
            s.rebase(at);
            offset += at;
            at = 0;
        }
    }
    Scan {
        frames,
        end: Ok(s.is_mid_frame()),
    }
}

/// A delivery hint is only ever set on a frame whose recorded elements say
/// the same thing.
fn check_delivery_hint(f: &Frame, buf: &[u8]) {
    let word: &[u8] = match f.delivery {
        0 => return,
        1 => b"message",
        2 => b"pmessage",
        3 => b"smessage",
        other => panic!("delivery hint {other}"),
    };
    assert!(matches!(f.kind, b'*' | b'>'), "{f:?}");
    assert_eq!(f.len, if f.delivery == 2 { 4 } else { 3 });
    assert_eq!(i64::from(f.recorded), f.len);
    assert_eq!(f.str_elem(buf, 0), Some(word));
    for i in 1..usize::from(f.recorded) {
        assert!(f.str_elem(buf, i).is_some(), "element {i} of {f:?}");
    }
}

/// Bytes that look enough like RESP to reach every branch.
fn resp_noise() -> impl Strategy<Value = Vec<u8>> {
    let token = prop_oneof![
        2 => prop::collection::vec(any::<u8>(), 0..6),
        3 => (prop::sample::select(&b"*>~%|$!=+-:_,#(?"[..]), -3i64..6)
            .prop_map(|(k, n)| format!("{}{n}\r\n", char::from(k)).into_bytes()),
        1 => prop::sample::select(vec![
            &b"\r\n"[..], b"\r", b"\n", b"$-1\r\n", b"*-1\r\n", b"_\r\n", b"*0\r\n", b"%0\r\n",
            b"|0\r\n", b"$99999999999\r\n", b"*9223372036854775807\r\n",
            b"%9223372036854775807\r\n", b"|4611686018427387904\r\n", b"$-2\r\n", b"*-2\r\n",
            b"$01\r\n", b"+OK\r\n", b":1\r\n", b"*3\r\n$7\r\nmessage\r\n",
            b">4\r\n$8\r\npmessage\r\n", b"*3\r\n$8\r\nsmessage\r\n", b"$02\r\nab\r\n",
            b"$0\r\n\r\n", b"$1\rXa\r\n", b"*3\r\n$7\r\nmessage\rX",
        ])
        .prop_map(<[u8]>::to_vec),
        2 => value().prop_map(|v| {
            let mut out = Vec::new();
            encode_top(&v, &mut out, &mut Vec::new());
            out
        }),
    ];
    prop::collection::vec(token, 0..16).prop_map(|v| v.concat())
}

/// Valid encodings with a few bytes changed, inserted or removed.
fn mutated() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::collection::vec(value(), 1..4),
        prop::collection::vec((any::<usize>(), 0u8..3, any::<u8>()), 1..4),
    )
        .prop_map(|(values, edits)| {
            let mut out = Vec::new();
            for v in &values {
                encode_top(v, &mut out, &mut Vec::new());
            }
            for (at, op, b) in edits {
                let i = at % (out.len() + 1);
                match op {
                    0 if i < out.len() => out[i] = b,
                    1 if i < out.len() => {
                        out.remove(i);
                    }
                    _ => out.insert(i, b),
                }
            }
            out
        })
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    /// Valid values, concatenated: every frame found with exact boundaries,
    /// type, length and recorded elements, for any split and with rebasing;
    /// each decodes to what was generated.
    #[test]
    fn valid_values_are_found_exactly(
        values in prop::collection::vec(value(), 1..6),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
        rebase in any::<bool>(),
    ) {
        let mut input = Vec::new();
        let mut expect = Vec::new();
        for v in &values {
            encode_top(v, &mut input, &mut expect);
        }
        let want: Vec<Frame> = expect.iter().map(|e| e.frame).collect();
        let got = scan(&input, &cuts, 64, rebase);
        prop_assert_eq!(&got.frames, &want);
        prop_assert_eq!(got.end, Ok(false));
        for e in &expect {
            let bytes = &input[e.frame.start..e.frame.end];
            // Ample depth: how attributes spend it is the decoder's business.
            let decoded = value::decode(bytes, 64);
            match &e.value {
                Some(v) => prop_assert_eq!(decoded.as_ref(), Ok(v)),
                // A top-level attribute has no value after it inside its frame.
                None => prop_assert!(decoded.is_err()),
            }
        }
    }

    /// Byte-at-a-time arrival, the worst case for resuming.
    #[test]
    fn byte_by_byte_finds_the_same_frames(values in prop::collection::vec(value(), 1..4)) {
        let mut input = Vec::new();
        let mut expect = Vec::new();
        for v in &values {
            encode_top(v, &mut input, &mut expect);
        }
        let cuts: Vec<usize> = (0..input.len()).collect();
        let got = scan(&input, &cuts, 64, true);
        prop_assert_eq!(got.frames, expect.iter().map(|e| e.frame).collect::<Vec<_>>());
    }

    /// The depth limit: frames before the first too-deep one are found, then
    /// `TooDeep`, whatever the split.
    #[test]
    fn depth_limit_is_enforced(
        values in prop::collection::vec(value(), 1..5),
        max_depth in 1usize..5,
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let mut input = Vec::new();
        let mut expect = Vec::new();
        for v in &values {
            encode_top(v, &mut input, &mut expect);
        }
        let ok = expect.iter().take_while(|e| e.depth <= max_depth).count();
        let got = scan(&input, &cuts, max_depth, true);
        prop_assert_eq!(got.frames, expect[..ok].iter().map(|e| e.frame).collect::<Vec<_>>());
        if ok < expect.len() {
            prop_assert_eq!(got.end, Err(FrameError::TooDeep(max_depth)));
        } else {
            prop_assert_eq!(got.end, Ok(false));
        }
    }

    /// Garbage: no panic, contiguous frames, the same outcome for every split,
    /// each frame found again on its own, and the decoder never panics on it.
    #[test]
    fn garbage_is_split_invariant(
        input in prop_oneof![
            resp_noise(),
            mutated(),
            prop::collection::vec(any::<u8>(), 0..128),
        ],
        cuts in prop::collection::vec(any::<usize>(), 0..12),
        rebase in any::<bool>(),
        max_depth in 1usize..8,
    ) {
        let whole = scan(&input, &[], max_depth, false);
        let split = scan(&input, &cuts, max_depth, rebase);
        prop_assert_eq!(&split, &whole);
        for f in &whole.frames {
            let bytes = &input[f.start..f.end];
            let alone = scan(bytes, &[], max_depth, false);
            prop_assert_eq!(alone.frames.len(), 1);
            let g = alone.frames[0];
            prop_assert_eq!((g.kind, g.len, g.recorded, g.end), (f.kind, f.len, f.recorded, bytes.len()));
            // Never panics; the result does not matter here.
            let _ = value::decode(bytes, max_depth + 1);
        }
    }
}

#[test]
fn deep_nesting_is_refused_without_recursion() {
    for kind in [&b"*1\r\n"[..], b">1\r\n", b"~1\r\n", b"%1\r\n", b"|1\r\n"] {
        let input = kind.repeat(200_000);
        let mut s = FrameScanner::new(128);
        assert_eq!(s.next(&input, 0), Err(FrameError::TooDeep(128)));
    }
}

/// Runs `body` in a child process (this test binary re-run on one ignored
/// test) so that a stack overflow fails one test instead of aborting them all.
fn survives_in_child(child_test: &str) -> bool {
    if std::env::var_os("PUBWARDEN_PROP_CHILD").is_some() {
        return true;
    }
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", child_test, "--ignored", "--nocapture"])
        .env("PUBWARDEN_PROP_CHILD", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    status.success()
}

/// The scanner accepts an aggregate whose element is preceded by any number
/// of attributes, keeping its own depth bounded; `value::decode` must then
/// decode it without unbounded recursion. It used to recurse once per
/// attribute without spending depth, so ~10,000 attributes (40 KB) overflowed
/// the stack (fixed in 57c4980).
#[test]
fn regression_decode_attribute_chain_overflows_the_stack() {
    assert!(
        survives_in_child("decode_attribute_chain_child"),
        "value::decode crashed (stack overflow) on a frame the scanner accepted"
    );
}

#[test]
#[ignore = "run by regression_decode_attribute_chain_overflows_the_stack in a child process"]
fn decode_attribute_chain_child() {
    let mut buf = b"*1\r\n".to_vec();
    buf.extend_from_slice(&b"|0\r\n".repeat(100_000));
    buf.extend_from_slice(b":1\r\n");
    let mut s = FrameScanner::new(4);
    let f = s.next(&buf, 0).unwrap().unwrap();
    assert_eq!(f.end, buf.len(), "the scanner accepts it as one frame");
    // Any answer is fine (the value, or a depth error); crashing is not.
    let _ = value::decode(&buf, 4);
}
