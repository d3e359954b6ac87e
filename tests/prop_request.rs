//! Property tests for the client request parser (`resp::request`).
//!
//! Any byte sequence, however it is split into reads, must give the same
//! requests (or the same protocol error), never panic, and never make the
//! parser keep more than its limits allow. Valid encodings round-trip.

use proptest::prelude::*;
use pubwarden::resp::request::{ProtocolError, RequestLimits, RequestParser};

/// One request as the parser returned it, with absolute positions.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Req {
    start: usize,
    end: usize,
    inline: bool,
    args: Vec<Vec<u8>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// More bytes are needed; `mid` is `is_mid_request()`.
    Incomplete {
        mid: bool,
    },
    Error(ProtocolError),
}

#[derive(Debug)]
struct Run {
    reqs: Vec<Req>,
    end: End,
}

fn is_too_big(e: ProtocolError) -> bool {
    matches!(
        e,
        ProtocolError::TooBigInline
            | ProtocolError::TooBigBulkCount
            | ProtocolError::TooBigMultibulkCount
    )
}

/// Longest `*N\r\n` / `$N\r\n` header line `parse_i64` can accept.
const HEADER: usize = 23;

/// How many bytes an unfinished request may keep buffered, not counting the
/// latest read (a single read may bring a header line without its `\r`).
fn retained_bound(l: &RequestLimits, unauthenticated: bool) -> usize {
    let (args, bulk) = if unauthenticated {
        (l.max_multibulk_len.min(10), l.max_bulk_len.min(16384))
    } else {
        (l.max_multibulk_len, l.max_bulk_len)
    };
    l.max_inline_len + HEADER + args * (HEADER + bulk + 2)
}

/// Feeds `input` in the chunks that `cuts` delimit, like the relay does:
/// the buffer grows with each read, and (when `rebase`) the consumed front is
/// dropped after each read. Checks limits along the way.
fn run(
    input: &[u8],
    cuts: &[usize],
    limits: RequestLimits,
    unauthenticated: bool,
    rebase: bool,
) -> Run {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    points.push(input.len());
    points.sort_unstable();
    points.dedup();
    let mut p = RequestParser::new(limits);
    p.set_unauthenticated(unauthenticated);
    let mut buf: Vec<u8> = Vec::new();
    let (mut offset, mut at, mut fed) = (0usize, 0usize, 0usize);
    let mut reqs = Vec::new();
    for &point in &points {
        let chunk = &input[fed..point];
        fed = point;
        buf.extend_from_slice(chunk);
        loop {
            match p.next(&buf, at) {
                Ok(Some(f)) => {
                    assert!(
                        at <= f.start && f.start <= f.end && f.end <= buf.len(),
                        "frame {f:?} outside at={at} len={}",
                        buf.len()
                    );
                    assert!(f.end > f.start, "empty frame {f:?}");
                    let args: Vec<Vec<u8>> = p.args(&buf, &f).iter().map(<[u8]>::to_vec).collect();
                    assert_eq!(args.len(), f.argc, "argc of {f:?}");
                    if !f.inline {
                        let max_args = if unauthenticated {
                            limits.max_multibulk_len.min(10)
                        } else {
                            limits.max_multibulk_len
                        };
                        let max_bulk = if unauthenticated {
                            limits.max_bulk_len.min(16384)
                        } else {
                            limits.max_bulk_len
                        };
                        assert!(f.argc <= max_args, "{} args > {max_args}", f.argc);
                        for a in &args {
                            assert!(a.len() <= max_bulk, "bulk of {} > {max_bulk}", a.len());
                        }
                    }
                    reqs.push(Req {
                        start: f.start + offset,
                        end: f.end + offset,
                        inline: f.inline,
                        args,
                    });
                    at = f.end;
                }
                Ok(None) => {
                    // Unread bytes are an unfinished request (or its header).
                    let kept = buf.len() - at;
                    if kept > 0 && buf[at] == b'*' {
                        let bound = retained_bound(&limits, unauthenticated) + chunk.len();
                        assert!(kept <= bound, "multibulk keeps {kept} > {bound}");
                    } else if kept > 0 {
                        assert!(p.is_mid_request(), "inline bytes left unparsed");
                        assert!(
                            kept <= limits.max_inline_len,
                            "inline keeps {kept} > {}",
                            limits.max_inline_len
                        );
                    }
                    break;
                }
                Err(e) => {
                    return Run {
                        reqs,
                        end: End::Error(e),
                    };
                }
            }
        }
        if rebase {
            buf.drain(..at);
            p.rebase(at);
            offset += at;
            at = 0;
        }
    }
    Run {
        reqs,
        end: End::Incomplete {
            mid: p.is_mid_request(),
        },
    }
}

/// Bytes that look enough like requests to reach every branch.
fn request_noise() -> impl Strategy<Value = Vec<u8>> {
    let token = prop_oneof![
        3 => prop::collection::vec(any::<u8>(), 0..8),
        2 => (0i64..5).prop_map(|n| format!("*{n}\r\n").into_bytes()),
        2 => (0i64..12).prop_map(|n| format!("${n}\r\n").into_bytes()),
        1 => prop::sample::select(vec![
            &b"*-1\r\n"[..], b"*0\r\n", b"$-1\r\n", b"*\r\n", b"$\r\n", b"*01\r\n", b"*-0\r\n",
            b"*99999999999999999999\r\n", b"$9223372036854775807\r\n", b"*2147483648\r\n",
            b"\r\n", b"\r", b"\n", b"\0", b"\"", b"'", b"\\x4", b"\\", b" ", b"\t",
            b"PING\r\n", b"SET \"a b\" 'c'\n", b"*1\r\n$4\r\nPING\r\n", b"+OK\r\n",
        ])
        .prop_map(<[u8]>::to_vec),
        2 => prop::collection::vec(prop::sample::select(&b"abc \"'\\x0\r\n"[..]), 0..12),
    ];
    prop::collection::vec(token, 0..24).prop_map(|v| v.concat())
}

fn small_limits() -> impl Strategy<Value = RequestLimits> {
    (0usize..40, 0usize..7, 1usize..48).prop_map(|(b, m, i)| RequestLimits {
        max_bulk_len: b,
        max_multibulk_len: m,
        max_inline_len: i,
    })
}

fn encode_multibulk(args: &[Vec<u8>]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Checks that a chunked run agrees with the whole-buffer run. Only the
/// "too big" errors depend on how bytes arrive (Redis checks them per read,
/// so a header line longer than the limit is fine if it arrives in one read):
/// such a run may stop early, but what it returned before must agree.
fn assert_split_invariant(whole: &Run, split: &Run) {
    match split.end {
        End::Error(e) if is_too_big(e) => {
            assert!(
                whole.reqs.starts_with(&split.reqs),
                "split run is not a prefix: {:?} vs {:?}",
                split.reqs,
                whole.reqs
            );
        }
        _ => {
            assert_eq!(split.reqs, whole.reqs);
            assert_eq!(split.end, whole.end);
        }
    }
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

    /// Random bytes with default limits: same result however they are split.
    #[test]
    fn any_split_gives_the_same_requests(
        input in prop_oneof![request_noise(), prop::collection::vec(any::<u8>(), 0..256)],
        cuts in prop::collection::vec(any::<usize>(), 0..12),
        rebase in any::<bool>(),
        unauthenticated in any::<bool>(),
    ) {
        let limits = RequestLimits::default();
        let whole = run(&input, &[], limits, unauthenticated, false);
        let split = run(&input, &cuts, limits, unauthenticated, rebase);
        assert_split_invariant(&whole, &split);
        // Requests are contiguous from the start of the input.
        let mut at = 0;
        for r in &whole.reqs {
            prop_assert_eq!(r.start, at);
            at = r.end;
        }
    }

    /// Small limits: limits are enforced on every split, and the parser
    /// keeps no more than they allow (see `run`).
    #[test]
    fn small_limits_bound_everything(
        input in request_noise(),
        limits in small_limits(),
        cuts in prop::collection::vec(any::<usize>(), 0..16),
        rebase in any::<bool>(),
        unauthenticated in any::<bool>(),
    ) {
        let whole = run(&input, &[], limits, unauthenticated, false);
        let split = run(&input, &cuts, limits, unauthenticated, rebase);
        assert_split_invariant(&whole, &split);
    }

    /// Byte-at-a-time arrival is the worst split: still the same answer.
    #[test]
    fn byte_by_byte_matches_whole(input in request_noise(), limits in small_limits()) {
        let cuts: Vec<usize> = (0..input.len()).collect();
        let whole = run(&input, &[], limits, false, false);
        let split = run(&input, &cuts, limits, false, true);
        assert_split_invariant(&whole, &split);
    }

    /// Multibulk encodings of random argument vectors (binary, with CR/LF)
    /// come back as the same arguments, at the exact boundaries.
    #[test]
    fn multibulk_round_trips(
        requests in prop::collection::vec(
            prop::collection::vec(
                prop::collection::vec(
                    prop_oneof![any::<u8>(), prop::sample::select(&b"\r\n$*"[..])],
                    0..40,
                ),
                0..7,
            ),
            1..8,
        ),
        cuts in prop::collection::vec(any::<usize>(), 0..16),
        rebase in any::<bool>(),
        unauthenticated in any::<bool>(),
    ) {
        let mut input = Vec::new();
        let mut expected = Vec::new();
        for args in &requests {
            let start = input.len();
            input.extend_from_slice(&encode_multibulk(args));
            expected.push(Req { start, end: input.len(), inline: false, args: args.clone() });
        }
        let got = run(&input, &cuts, RequestLimits::default(), unauthenticated, rebase);
        prop_assert_eq!(got.reqs, expected);
        prop_assert_eq!(got.end, End::Incomplete { mid: false });
    }

    /// Inline lines of simple words, with any spacing and either line end.
    #[test]
    fn inline_words_round_trip(
        lines in prop::collection::vec(
            (
                prop::collection::vec("[A-Za-z0-9_.:{}|@#-]{1,12}", 0..6),
                prop::collection::vec("[ \t]{1,3}", 7),
                "[ \t]{0,2}",
                any::<bool>(),
            ),
            1..6,
        ),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
        rebase in any::<bool>(),
    ) {
        let mut input = Vec::new();
        let mut expected = Vec::new();
        for (words, seps, lead, crlf) in &lines {
            // A line must not start with `*`, which would make it multibulk.
            let start = input.len();
            input.extend_from_slice(lead.as_bytes());
            for (w, sep) in words.iter().zip(seps) {
                input.extend_from_slice(w.as_bytes());
                input.extend_from_slice(sep.as_bytes());
            }
            input.extend_from_slice(if *crlf { b"\r\n" } else { b"\n" });
            let args: Vec<Vec<u8>> = words.iter().map(|w| w.as_bytes().to_vec()).collect();
            expected.push(Req { start, end: input.len(), inline: true, args });
        }
        let got = run(&input, &cuts, RequestLimits::default(), false, rebase);
        prop_assert_eq!(got.reqs, expected);
        prop_assert_eq!(got.end, End::Incomplete { mid: false });
    }

    /// Quoted inline arguments with `\xHH` and C escapes decode to any bytes,
    /// and the owned multibulk encoding that goes upstream parses back to them.
    #[test]
    fn quoted_inline_arguments_round_trip(
        words in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..16), 1..6),
        style in prop::collection::vec(0u8..3, 16),
    ) {
        let mut line = Vec::new();
        for w in &words {
            line.push(b'"');
            for (i, &b) in w.iter().enumerate() {
                match (b, style[i % style.len()]) {
                    (b'\n', 0) => line.extend_from_slice(b"\\n"),
                    (b'\r', 0) => line.extend_from_slice(b"\\r"),
                    (b'\t', 0) => line.extend_from_slice(b"\\t"),
                    (b'"' | b'\\', 0 | 1) => line.extend_from_slice(&[b'\\', b]),
                    (b, 1 | 0) if b.is_ascii_alphanumeric() || b == b' ' => line.push(b),
                    (b, _) => line.extend_from_slice(format!("\\x{b:02x}").as_bytes()),
                }
            }
            line.extend_from_slice(b"\" ");
        }
        line.extend_from_slice(b"\r\n");
        let mut p = RequestParser::new(RequestLimits::default());
        let f = p.next(&line, 0).unwrap().unwrap();
        prop_assert!(f.inline);
        prop_assert_eq!(f.end, line.len());
        let args: Vec<Vec<u8>> = p.args(&line, &f).iter().map(<[u8]>::to_vec).collect();
        prop_assert_eq!(&args, &words);
        let encoding = p.inline_encoding().to_vec();
        prop_assert_eq!(&encoding, &encode_multibulk(&words));
        let mut q = RequestParser::new(RequestLimits::default());
        let g = q.next(&encoding, 0).unwrap().unwrap();
        let again: Vec<Vec<u8>> = q.args(&encoding, &g).iter().map(<[u8]>::to_vec).collect();
        prop_assert_eq!(again, words);
    }

    /// Error replies are always one well-formed RESP error line.
    #[test]
    fn error_replies_are_one_line(input in request_noise(), limits in small_limits()) {
        if let End::Error(e) = run(&input, &[], limits, false, false).end {
            let reply = e.reply();
            prop_assert!(reply.starts_with(b"-ERR Protocol error: "));
            prop_assert!(reply.ends_with(b"\r\n"));
            prop_assert_eq!(reply.iter().filter(|&&b| b == b'\r' || b == b'\n').count(), 2);
        }
    }
}

#[test]
fn empty_multibulk_requests_have_no_arguments() {
    let input = b"*0\r\n*-1\r\n*-5\r\n";
    let got = run(input, &[1, 5, 7], RequestLimits::default(), false, true);
    assert_eq!(
        got.reqs
            .iter()
            .map(|r| (r.start, r.end, r.args.len()))
            .collect::<Vec<_>>(),
        vec![(0, 4, 0), (4, 9, 0), (9, 14, 0)]
    );
}
