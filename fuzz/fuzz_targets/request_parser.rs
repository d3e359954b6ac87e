//! Client request parser: the input is split into reads at positions taken
//! from its first bytes; every split must give what the whole input gives
//! (up to the read-dependent "too big" errors), within small limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pubwarden::resp::request::{ProtocolError, RequestLimits, RequestParser};

type Req = (usize, usize, bool, Vec<Vec<u8>>);

fn run(
    input: &[u8],
    cuts: &[usize],
    limits: RequestLimits,
    unauth: bool,
) -> (Vec<Req>, Option<ProtocolError>) {
    let mut p = RequestParser::new(limits);
    p.set_unauthenticated(unauth);
    let mut buf = Vec::new();
    let (mut offset, mut at, mut fed) = (0, 0, 0);
    let mut reqs = Vec::new();
    for &point in cuts.iter().chain(std::iter::once(&input.len())) {
        if point < fed {
            continue;
        }
        buf.extend_from_slice(&input[fed..point]);
        fed = point;
        loop {
            match p.next(&buf, at) {
                Ok(Some(f)) => {
                    let args: Vec<Vec<u8>> = p.args(&buf, &f).iter().map(<[u8]>::to_vec).collect();
                    assert_eq!(args.len(), f.argc);
                    if !f.inline {
                        assert!(f.argc <= limits.max_multibulk_len);
                        assert!(args.iter().all(|a| a.len() <= limits.max_bulk_len));
                    }
                    reqs.push((f.start + offset, f.end + offset, f.inline, args));
                    at = f.end;
                }
                Ok(None) => break,
                Err(e) => return (reqs, Some(e)),
            }
        }
        buf.drain(..at);
        p.rebase(at);
        offset += at;
        at = 0;
    }
    (reqs, None)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let (head, input) = data.split_at(4);
    let limits = RequestLimits {
        max_bulk_len: usize::from(head[0]),
        max_multibulk_len: usize::from(head[1] % 16),
        max_inline_len: usize::from(head[2]).max(1),
    };
    let unauth = head[3] & 1 == 1;
    // Split points: every `stride`-th byte, starting at `head[3] >> 1`.
    let stride = usize::from(head[3] >> 4) + 1;
    let cuts: Vec<usize> = (usize::from((head[3] >> 1) & 7)..input.len())
        .step_by(stride)
        .collect();
    let whole = run(input, &[], limits, unauth);
    let split = run(input, &cuts, limits, unauth);
    let too_big = matches!(
        split.1,
        Some(
            ProtocolError::TooBigInline
                | ProtocolError::TooBigBulkCount
                | ProtocolError::TooBigMultibulkCount
        )
    );
    if too_big {
        assert!(whole.0.starts_with(&split.0));
    } else {
        assert_eq!(whole, split);
    }
});
