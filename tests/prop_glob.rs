//! Property tests for the Redis glob port (`glob::matches`): no panics, cheap
//! on abusive patterns, and the same answers as a plain reference matcher
//! (with Redis's one quirk: an empty text matches only the empty pattern).

use std::time::{Duration, Instant};

use proptest::prelude::*;
use pubwarden::glob::{is_literal, matches};

/// A pattern token the reference matcher understands.
#[derive(Debug, Clone)]
enum Tok {
    Lit(u8),
    Any,
    Star,
    /// `[...]`: the bytes listed, and ranges `lo-hi`; `^` negates.
    Class {
        negate: bool,
        bytes: Vec<u8>,
        ranges: Vec<(u8, u8)>,
    },
}

impl Tok {
    fn render(&self, out: &mut Vec<u8>) {
        match self {
            Tok::Lit(b) if b"*?[\\".contains(b) => out.extend_from_slice(&[b'\\', *b]),
            Tok::Lit(b) => out.push(*b),
            Tok::Any => out.push(b'?'),
            Tok::Star => out.push(b'*'),
            Tok::Class {
                negate,
                bytes,
                ranges,
            } => {
                out.push(b'[');
                if *negate {
                    out.push(b'^');
                }
                for &(lo, hi) in ranges {
                    out.extend_from_slice(&[lo, b'-', hi]);
                }
                out.extend_from_slice(bytes);
                out.push(b']');
            }
        }
    }

    fn accepts(&self, c: u8) -> bool {
        match self {
            Tok::Lit(b) => *b == c,
            Tok::Any => true,
            Tok::Star => unreachable!(),
            Tok::Class {
                negate,
                bytes,
                ranges,
            } => {
                let hit = bytes.contains(&c)
                    || ranges
                        .iter()
                        .any(|&(lo, hi)| (lo.min(hi)..=lo.max(hi)).contains(&c));
                hit != *negate
            }
        }
    }
}

/// Textbook glob matching by dynamic programming.
fn reference(toks: &[Tok], text: &[u8]) -> bool {
    if text.is_empty() {
        // Redis: the main loop never runs, so only an empty pattern matches.
        return toks.is_empty();
    }
    // m[i][j]: toks[i..] matches text[j..].
    let (n, t) = (toks.len(), text.len());
    let mut m = vec![vec![false; t + 1]; n + 1];
    m[n][t] = true;
    for i in (0..n).rev() {
        for j in (0..=t).rev() {
            m[i][j] = match &toks[i] {
                Tok::Star => m[i + 1][j] || (j < t && m[i][j + 1]),
                tok => j < t && tok.accepts(text[j]) && m[i + 1][j + 1],
            };
        }
    }
    m[0][0]
}

const ALPHABET: &[u8] = b"abc*?[]\\^-";

fn tok() -> impl Strategy<Value = Tok> {
    let class_byte = prop::sample::select(&b"abcd"[..]);
    prop_oneof![
        4 => prop::sample::select(ALPHABET).prop_map(Tok::Lit),
        2 => Just(Tok::Any),
        3 => Just(Tok::Star),
        1 => (
            any::<bool>(),
            prop::collection::vec(class_byte.clone(), 1..3),
            prop::collection::vec((class_byte.clone(), class_byte), 0..2),
        )
            .prop_map(|(negate, bytes, ranges)| Tok::Class { negate, bytes, ranges }),
    ]
}

fn text() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(prop::sample::select(&b"abcd*?[\\"[..]), 0..14)
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Each call must stay cheap; generous for a shared, loaded machine.
fn timed(pattern: &[u8], text: &[u8]) -> bool {
    let t = Instant::now();
    let r = matches(pattern, text);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "{:?} vs {:?} took {:?}",
        String::from_utf8_lossy(pattern),
        String::from_utf8_lossy(text),
        t.elapsed()
    );
    r
}

proptest! {
    #![proptest_config(config())]

    /// Random bytes in both: never panics, stays cheap.
    #[test]
    fn never_panics(
        pattern in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..64),
            prop::collection::vec(prop::sample::select(ALPHABET), 0..64),
        ],
        text in prop::collection::vec(prop_oneof![any::<u8>(), prop::sample::select(ALPHABET)], 0..64),
    ) {
        timed(&pattern, &text);
        timed(&pattern, &pattern);
        timed(&text, &pattern);
    }

    /// Well-formed patterns agree with the reference matcher.
    #[test]
    fn agrees_with_reference(toks in prop::collection::vec(tok(), 0..10), text in text()) {
        let mut pattern = Vec::new();
        for t in &toks {
            t.render(&mut pattern);
        }
        prop_assert_eq!(
            timed(&pattern, &text),
            reference(&toks, &text),
            "pattern {:?} text {:?}",
            String::from_utf8_lossy(&pattern),
            String::from_utf8_lossy(&text)
        );
    }

    /// A literal pattern matches itself and nothing else.
    #[test]
    fn literals_match_only_themselves(
        lit in prop::collection::vec(any::<u8>(), 0..24)
            .prop_map(|v| v.into_iter().filter(|b| !b"*?[\\".contains(b)).collect::<Vec<u8>>()),
        other in prop::collection::vec(any::<u8>(), 0..24),
        cut in any::<usize>(),
    ) {
        prop_assert!(is_literal(&lit));
        let other = if cut % 2 == 0 { lit[..cut % (lit.len() + 1)].to_vec() } else { other };
        prop_assert!(timed(&lit, &lit));
        prop_assert_eq!(timed(&lit, &other), lit == other);
    }

    /// `\`-escaping every byte of a text gives a pattern for exactly it.
    #[test]
    fn escaped_text_matches_exactly(text in prop::collection::vec(any::<u8>(), 0..24), other in prop::collection::vec(any::<u8>(), 0..24)) {
        let pattern: Vec<u8> = text.iter().flat_map(|&b| [b'\\', b]).collect();
        prop_assert!(timed(&pattern, &text));
        prop_assert_eq!(timed(&pattern, &other), text == other);
    }

    /// `*L` matches exactly the texts ending in L; `L*` those starting with L
    /// (`*` alone: every non-empty text).
    #[test]
    fn star_prefix_and_suffix(
        lit in "[a-z.:_-]{0,8}",
        text in prop::collection::vec(prop_oneof![prop::sample::select(&b"ab.:"[..]), any::<u8>()], 0..16),
    ) {
        let lit = lit.as_bytes();
        let mut suffix = b"*".to_vec();
        suffix.extend_from_slice(lit);
        let mut prefix = lit.to_vec();
        prefix.push(b'*');
        let joined = [&text[..], lit].concat();
        prop_assert_eq!(timed(&suffix, &joined), !joined.is_empty());
        prop_assert_eq!(timed(&suffix, &text), text.ends_with(lit) && !text.is_empty());
        let joined = [lit, &text[..]].concat();
        prop_assert_eq!(timed(&prefix, &joined), !joined.is_empty());
        prop_assert_eq!(timed(&prefix, &text), text.starts_with(lit) && !text.is_empty());
    }

    /// `?` n times matches exactly the texts of n bytes.
    #[test]
    fn question_marks_count_bytes(n in 0usize..12, text in prop::collection::vec(any::<u8>(), 0..14)) {
        let pattern = vec![b'?'; n];
        prop_assert_eq!(timed(&pattern, &text), text.len() == n);
    }
}

/// Patterns built to make a naive matcher exponential stay cheap.
#[test]
fn abusive_patterns_are_bounded() {
    let cases: Vec<(Vec<u8>, Vec<u8>)> = vec![
        (
            [b"a*".repeat(200), b"b".to_vec()].concat(),
            b"a".repeat(400),
        ),
        (b"*a".repeat(500), b"a".repeat(2000)),
        (b"*?".repeat(800), b"x".repeat(3000)),
        // Deeper than Redis's nesting limit of 1000 `*`.
        (b"*x".repeat(1500), b"x".repeat(1499)),
        (b"[a-z]*".repeat(300), b"q".repeat(1000)),
    ];
    for (pattern, text) in cases {
        timed(&pattern, &text);
    }
}
