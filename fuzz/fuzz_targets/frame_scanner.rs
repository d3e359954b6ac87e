//! Upstream frame scanner and value decoder: any bytes, read in pieces, give
//! the same frames (or error) as read whole; every frame scans again on its
//! own and decodes without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pubwarden::resp::frame::{Frame, FrameError, FrameScanner};

fn run(input: &[u8], cuts: &[usize], depth: usize) -> (Vec<Frame>, Result<bool, FrameError>) {
    let mut s = FrameScanner::new(depth);
    let mut buf = Vec::new();
    let (mut offset, mut at, mut fed) = (0, 0, 0);
    let mut frames = Vec::new();
    for &point in cuts.iter().chain(std::iter::once(&input.len())) {
        if point < fed {
            continue;
        }
        buf.extend_from_slice(&input[fed..point]);
        fed = point;
        loop {
            match s.next(&buf, at) {
                Ok(Some(mut f)) => {
                    assert!(f.start == at && f.end > f.start && f.end <= buf.len());
                    // Only the fast path sets this hint, so it depends on how
                    // the frame arrived; nothing else may.
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
                Err(e) => return (frames, Err(e)),
            }
        }
        buf.drain(..at);
        s.rebase(at);
        offset += at;
        at = 0;
    }
    (frames, Ok(s.is_mid_frame()))
}

fuzz_target!(|data: &[u8]| {
    let Some((&head, input)) = data.split_first() else {
        return;
    };
    let depth = usize::from(head & 15) + 1;
    let stride = usize::from(head >> 4) + 1;
    let cuts: Vec<usize> = (0..input.len()).step_by(stride).collect();
    let whole = run(input, &[], depth);
    let split = run(input, &cuts, depth);
    assert_eq!(whole, split);
    for f in &whole.0 {
        let bytes = &input[f.start..f.end];
        let mut s = FrameScanner::new(depth);
        let g = s.next(bytes, 0).unwrap().unwrap();
        assert_eq!(
            (g.end, g.kind, g.len, g.recorded),
            (bytes.len(), f.kind, f.len, f.recorded)
        );
        // Never panics, nor runs out of stack (a chain of attributes did).
        let _ = pubwarden::resp::value::decode(bytes, depth + 1);
    }
});
