//! Redis's glob matching (`stringmatchlen` in `util.c`), ported rule for rule
//! so that a pattern in pubwarden's policy or channel groups means exactly what
//! it means in a Redis ACL or PSUBSCRIBE: `*`, `?`, `[abc]`, `[^a-z]`, `\`
//! escapes, byte-wise and binary-safe.

/// Deepest `*` recursion before a pattern is treated as not matching, as Redis
/// does to protect itself from abusive patterns.
const MAX_NESTING: u32 = 1000;

/// True when `pattern` matches all of `text`.
pub fn matches(pattern: &[u8], text: &[u8]) -> bool {
    let mut skip_longer = false;
    match_impl(pattern, text, &mut skip_longer, 0)
}

/// True when the pattern has no glob syntax, so plain equality decides.
pub fn is_literal(pattern: &[u8]) -> bool {
    !pattern
        .iter()
        .any(|b| matches!(b, b'*' | b'?' | b'[' | b'\\'))
}

fn match_impl(pattern: &[u8], text: &[u8], skip_longer: &mut bool, nesting: u32) -> bool {
    if nesting > MAX_NESTING {
        return false;
    }
    // Indices stand in for C's moving pointers; reading past the end yields
    // 0, like the NUL terminator the C code relies on.
    let pat = |i: usize| pattern.get(i).copied().unwrap_or(0);
    let (mut p, mut s) = (0usize, 0usize);
    let (plen, slen) = (pattern.len(), text.len());
    while p < plen && s < slen {
        match pattern[p] {
            b'*' => {
                while p + 1 < plen && pattern[p + 1] == b'*' {
                    p += 1;
                }
                if p + 1 == plen {
                    return true;
                }
                while s < slen {
                    if match_impl(&pattern[p + 1..], &text[s..], skip_longer, nesting + 1) {
                        return true;
                    }
                    if *skip_longer {
                        return false;
                    }
                    s += 1;
                }
                *skip_longer = true;
                return false;
            }
            b'?' => s += 1,
            b'[' => {
                p += 1;
                let negate = pat(p) == b'^';
                if negate {
                    p += 1;
                }
                let c = text[s];
                let mut hit = false;
                loop {
                    if pat(p) == b'\\' && plen - p >= 2 {
                        p += 1;
                        if pat(p) == c {
                            hit = true;
                        }
                    } else if pat(p) == b']' && p < plen {
                        break;
                    } else if p >= plen {
                        // Unclosed class: step back so the outer advance lands at the end.
                        p -= 1;
                        break;
                    } else if plen - p >= 3 && pat(p + 1) == b'-' {
                        let (mut lo, mut hi) = (pat(p), pat(p + 2));
                        if lo > hi {
                            std::mem::swap(&mut lo, &mut hi);
                        }
                        p += 2;
                        if (lo..=hi).contains(&c) {
                            hit = true;
                        }
                    } else if pat(p) == c {
                        hit = true;
                    }
                    p += 1;
                }
                if negate {
                    hit = !hit;
                }
                if !hit {
                    return false;
                }
                s += 1;
            }
            b'\\' => {
                if plen - p >= 2 {
                    p += 1;
                }
                if pattern[p] != text[s] {
                    return false;
                }
                s += 1;
            }
            other => {
                if other != text[s] {
                    return false;
                }
                s += 1;
            }
        }
        p += 1;
        if s == slen {
            while pat(p) == b'*' && p < plen {
                p += 1;
            }
            break;
        }
    }
    p >= plen && s == slen
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn redis_glob_rules() {
        let yes: &[(&str, &str)] = &[
            ("*", "anything"),
            ("orders.*", "orders.created"),
            ("orders.*", "orders."),
            ("h?llo", "hello"),
            ("h[ae]llo", "hallo"),
            ("h[^e]llo", "hallo"),
            ("h[a-b]llo", "hbllo"),
            ("h[b-a]llo", "hallo"),
            ("a\\*b", "a*b"),
            ("a*b*c", "aXXbYYc"),
            ("news.[0-9]", "news.7"),
            ("**x", "x"),
        ];
        for (p, s) in yes {
            assert!(matches(p.as_bytes(), s.as_bytes()), "{p} should match {s}");
        }
        let no: &[(&str, &str)] = &[
            ("orders.*", "order"),
            ("h?llo", "hllo"),
            ("h[^e]llo", "hello"),
            ("a\\*b", "aXb"),
            ("abc", "ab"),
            ("ab", "abc"),
            ("", "a"),
            ("a*b*c", "aXXbYY"),
            ("[a-c]", "d"),
            // Redis quirk kept on purpose: `*` needs at least one byte.
            ("*", ""),
            ("a[", "a["),
        ];
        for (p, s) in no {
            assert!(
                !matches(p.as_bytes(), s.as_bytes()),
                "{p} should not match {s}"
            );
        }
        assert!(matches(b"", b""));
        assert!(matches(b"ch\r\n*", b"ch\r\n\x00\xff"));
    }

    #[test]
    fn abusive_patterns_stay_cheap() {
        let pattern = "a*".repeat(30) + "b";
        let text = "a".repeat(60);
        let t = std::time::Instant::now();
        assert!(!matches(pattern.as_bytes(), text.as_bytes()));
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
    }
}
