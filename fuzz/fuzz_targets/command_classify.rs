//! Requests and replies through the whole reply-side path: the first part of
//! the input is client requests (parsed, classified, queued in the session
//! in one of four ways), the rest is upstream bytes (scanned, fed to
//! `Session::on_frame`). The pending-reply books must always balance.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use pubwarden::command::Command;
use pubwarden::resp::frame::FrameScanner;
use pubwarden::resp::request::{RequestLimits, RequestParser};
use pubwarden::session::Session;

fn balanced(s: &Session) {
    assert_eq!(s.enqueued(), s.completed() + s.pending_len() as u64);
}

fuzz_target!(|data: &[u8]| {
    // Requests and replies interleave in rounds separated by a 0xff byte:
    // even rounds are client bytes, odd rounds upstream bytes.
    let mut s = Session::new();
    let mut p = RequestParser::new(RequestLimits::default());
    let mut sc = FrameScanner::new(32);
    let (mut client, mut upstream) = (Vec::new(), Vec::new());
    let (mut at_c, mut at_u) = (0, 0);
    for (round, part) in data.split(|&b| b == 0xff).enumerate() {
        if round % 2 == 0 {
            client.extend_from_slice(part);
            loop {
                match p.next(&client, at_c) {
                    Ok(Some(f)) => {
                        let args = p.args(&client, &f);
                        let cmd = Command::classify(&args);
                        match f.end % 7 {
                            0 => s.answered_locally(cmd, Bytes::from_static(b"+L\r\n")),
                            1 => s.internal(cmd),
                            2 => s.forwarded_filtered(cmd, &args),
                            _ => s.forwarded(cmd, &args),
                        }
                        at_c = f.end;
                        s.settle(|_| {});
                        balanced(&s);
                    }
                    Ok(None) => break,
                    Err(_) => return,
                }
            }
        } else {
            upstream.extend_from_slice(part);
            loop {
                match sc.next(&upstream, at_u) {
                    Ok(Some(f)) => {
                        let before = s.pending_len();
                        s.on_frame(&f, &upstream);
                        s.settle(|_| {});
                        assert!(s.pending_len() <= before);
                        balanced(&s);
                        at_u = f.end;
                    }
                    Ok(None) => break,
                    Err(_) => return,
                }
            }
        }
    }
});
