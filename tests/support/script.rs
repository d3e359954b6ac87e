//! Scripted sessions replayed against Redis directly and through pubwarden, recorded as a
//! transcript of frames per connection, and compared byte for byte.
//!
//! A script is a closure over a [`Session`]: it opens connections, sends bytes and says how
//! many frames it expects on which connection. Against direct Redis the script must be exact
//! (a wrong frame count panics as a script bug); through pubwarden whatever arrives is recorded,
//! and the first read that stalls ends the run, so a broken proxy fails fast with a clear diff.

use std::net::SocketAddr;
use std::time::Duration;

use super::net::{RawConn, Stop};
use super::procs::{Pubwarden, RedisServer};
use super::resp::{encode, encode_line, escape_short};

/// How long one expected read may take by default.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Something seen (or done) on one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum What {
    /// Bytes the script sent (shown as context, not compared: they may carry run-specific ids).
    Sent(Vec<u8>),
    /// One complete reply/push frame (possibly normalised).
    Frame(Vec<u8>),
    /// The connection was closed by the server.
    Eof,
    /// No byte arrived during a window where none was expected.
    Silence,
    /// Bytes that arrived where silence was expected, or were left over at the end.
    Unexpected(Vec<u8>),
    /// The expected frames did not all arrive: why, and the bytes of an incomplete frame.
    Stalled { stop: String, partial: Vec<u8> },
    /// A marker the script wrote to make diffs readable.
    Note(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub conn: usize,
    pub what: What,
}

impl Event {
    fn compared(&self) -> bool {
        !matches!(self.what, What::Sent(_) | What::Note(_))
    }

    fn show(&self) -> String {
        let body = match &self.what {
            What::Sent(b) => format!("sent     {}", escape_short(b, 160)),
            What::Frame(b) => format!("frame    {}", escape_short(b, 300)),
            What::Eof => "EOF (closed by server)".to_string(),
            What::Silence => "silence (nothing arrived, as expected)".to_string(),
            What::Unexpected(b) => format!("UNEXPECTED bytes {}", escape_short(b, 300)),
            What::Stalled { stop, partial } => {
                format!(
                    "STALLED ({stop}); incomplete bytes {}",
                    escape_short(partial, 300)
                )
            }
            What::Note(n) => format!("-- {n}"),
        };
        format!("conn{} {body}", self.conn)
    }
}

/// Turns a frame into the form that is compared (e.g. hides a connection id).
pub type Normalise = fn(&[u8]) -> Vec<u8>;

/// One replay of a script against one address.
pub struct Session {
    target: SocketAddr,
    strict: bool,
    conns: Vec<RawConn>,
    events: Vec<Event>,
    aborted: bool,
    timeout: Duration,
}

impl Session {
    pub fn new(target: SocketAddr, strict: bool) -> Session {
        Session {
            target,
            strict,
            conns: Vec::new(),
            events: Vec::new(),
            aborted: false,
            timeout: READ_TIMEOUT,
        }
    }

    /// The address the session talks to (Redis or pubwarden).
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// Sets the per-read deadline for the following reads.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Opens a new connection and returns its index.
    pub fn connect(&mut self) -> usize {
        let conn = RawConn::connect(self.target);
        self.conns.push(conn);
        self.conns.len() - 1
    }

    fn record(&mut self, conn: usize, what: What) {
        self.events.push(Event { conn, what });
    }

    pub fn note(&mut self, text: &str) {
        self.record(usize::MAX, What::Note(text.to_string()));
    }

    /// Sends raw bytes.
    pub fn send(&mut self, c: usize, bytes: impl AsRef<[u8]>) {
        if self.aborted {
            return;
        }
        let bytes = bytes.as_ref();
        self.record(c, What::Sent(bytes[..bytes.len().min(400)].to_vec()));
        if let Err(e) = self.conns[c].try_send(bytes) {
            if self.strict {
                panic!("script error against direct Redis: send failed: {e}");
            }
            self.record(
                c,
                What::Stalled {
                    stop: format!("send failed: {e}"),
                    partial: Vec::new(),
                },
            );
            self.aborted = true;
        }
    }

    /// Sends a space separated command line as a multibulk request.
    pub fn cmd(&mut self, c: usize, line: &str) {
        self.send(c, encode_line(line));
    }

    /// Sends a multibulk request of binary arguments.
    pub fn cmd_args(&mut self, c: usize, args: &[&[u8]]) {
        self.send(c, encode(args));
    }

    /// Reads `n` frames on connection `c`, records them, and returns them raw.
    pub fn expect(&mut self, c: usize, n: usize) -> Vec<Vec<u8>> {
        self.expect_with(c, n, |f| f.to_vec())
    }

    /// Like [`Session::expect`] but records `normalise(frame)` instead of the frame.
    pub fn expect_with(&mut self, c: usize, n: usize, normalise: Normalise) -> Vec<Vec<u8>> {
        if self.aborted {
            return vec![Vec::new(); n];
        }
        let got = self.conns[c].read_frames(n, self.timeout);
        for f in &got.frames {
            self.record(c, What::Frame(normalise(f)));
        }
        if got.stop != Stop::Done {
            if self.strict {
                panic!(
                    "script error against direct Redis: conn{c} wanted {n} frames, got {} then {:?}; frames {:?}",
                    got.frames.len(),
                    got.stop,
                    got.frames
                        .iter()
                        .map(|f| escape_short(f, 200))
                        .collect::<Vec<_>>()
                );
            }
            let stop = format!(
                "wanted {n} frames, got {} then {:?}",
                got.frames.len(),
                got.stop
            );
            if got.stop == Stop::Eof {
                self.record(
                    c,
                    What::Stalled {
                        stop,
                        partial: got.partial,
                    },
                );
                self.record(c, What::Eof);
            } else {
                self.record(
                    c,
                    What::Stalled {
                        stop,
                        partial: got.partial,
                    },
                );
            }
            self.aborted = true;
            let mut frames = got.frames;
            frames.resize(n, Vec::new());
            return frames;
        }
        got.frames
    }

    /// Reads `n` frames whose order Redis does not define (e.g. `UNSUBSCRIBE` without
    /// arguments walks a hash table): records them sorted.
    pub fn expect_unordered(&mut self, c: usize, n: usize) -> Vec<Vec<u8>> {
        if self.aborted {
            return vec![Vec::new(); n];
        }
        let start = self.events.len();
        let frames = self.expect(c, n);
        let recorded: Vec<Event> = self.events.split_off(start);
        // A trailing count (`:<n>` of a confirmation) depends on the order: compare the
        // frames without it, and the counts as a sorted list.
        let mut bodies = Vec::new();
        let mut counts = Vec::new();
        let mut rest = Vec::new();
        for e in recorded {
            match e.what {
                What::Frame(f) => {
                    let (body, count) = split_trailing_count(&f);
                    bodies.push(body);
                    counts.extend(count);
                }
                other => rest.push(Event {
                    conn: e.conn,
                    what: other,
                }),
            }
        }
        bodies.sort();
        counts.sort();
        self.record(c, What::Note(format!("{n} frames in any order:")));
        for b in bodies {
            self.record(c, What::Frame(b));
        }
        if !counts.is_empty() {
            self.record(
                c,
                What::Frame(format!("<their counts: {counts:?}>").into_bytes()),
            );
        }
        self.events.extend(rest);
        frames
    }

    /// Sends a command line and reads one reply (recorded), returning it.
    pub fn call(&mut self, c: usize, line: &str) -> Vec<u8> {
        self.cmd(c, line);
        self.expect(c, 1).pop().unwrap_or_default()
    }

    /// Reads one integer reply that differs between runs (a client id): records only its type.
    pub fn expect_masked_int(&mut self, c: usize) -> i64 {
        let frame = self
            .expect_with(c, 1, |f| {
                if f.first() == Some(&b':') {
                    b":<masked>\r\n".to_vec()
                } else {
                    f.to_vec()
                }
            })
            .pop()
            .unwrap_or_default();
        std::str::from_utf8(
            frame
                .get(1..frame.len().saturating_sub(2))
                .unwrap_or_default(),
        )
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
    }

    /// Expects nothing to arrive on `c` for `ms` milliseconds.
    pub fn expect_silence(&mut self, c: usize, ms: u64) {
        if self.aborted {
            return;
        }
        let (bytes, stop) = self.conns[c].read_until_idle(
            Duration::from_millis(ms),
            Duration::from_millis(ms * 4 + 1000),
        );
        if bytes.is_empty() && stop == Stop::Done {
            self.record(c, What::Silence);
            return;
        }
        if self.strict {
            panic!(
                "script error against direct Redis: expected silence on conn{c}, got {} ({stop:?})",
                escape_short(&bytes, 300)
            );
        }
        if !bytes.is_empty() {
            self.record(c, What::Unexpected(bytes));
        }
        if stop == Stop::Eof {
            self.record(c, What::Eof);
        }
        self.aborted = true;
    }

    /// Expects the server to close `c` with nothing more sent.
    pub fn expect_eof(&mut self, c: usize) {
        if self.aborted {
            return;
        }
        let (bytes, eof) = self.conns[c].read_until_eof(self.timeout);
        if !bytes.is_empty() {
            if self.strict {
                panic!(
                    "script error against direct Redis: expected EOF on conn{c}, got {}",
                    escape_short(&bytes, 300)
                );
            }
            self.record(c, What::Unexpected(bytes));
        }
        if eof {
            self.record(c, What::Eof);
        } else {
            if self.strict {
                panic!("script error against direct Redis: conn{c} was not closed");
            }
            self.record(
                c,
                What::Stalled {
                    stop: "wanted EOF, connection stayed open".into(),
                    partial: Vec::new(),
                },
            );
            self.aborted = true;
        }
    }

    /// Records every frame until the server closes `c` (which it must, within the timeout).
    pub fn expect_until_eof(&mut self, c: usize) {
        if self.aborted {
            return;
        }
        let got = self.conns[c].read_frames(usize::MAX, self.timeout);
        for f in &got.frames {
            self.record(c, What::Frame(f.clone()));
        }
        match got.stop {
            Stop::Eof if got.partial.is_empty() => self.record(c, What::Eof),
            stop => {
                if self.strict {
                    panic!(
                        "script error against direct Redis: conn{c} wanted frames then EOF, got {stop:?}, partial {}",
                        escape_short(&got.partial, 200)
                    );
                }
                self.record(
                    c,
                    What::Stalled {
                        stop: format!("wanted frames then EOF, got {stop:?}"),
                        partial: got.partial,
                    },
                );
                if stop == Stop::Eof {
                    self.record(c, What::Eof);
                }
                self.aborted = true;
            }
        }
    }

    /// After the script: anything left over on any open connection is recorded.
    fn finish(&mut self) {
        if self.aborted {
            return;
        }
        for c in 0..self.conns.len() {
            if self.conns[c].is_eof() {
                continue;
            }
            let (bytes, stop) =
                self.conns[c].read_until_idle(Duration::from_millis(150), Duration::from_secs(3));
            if !bytes.is_empty() {
                if self.strict {
                    panic!(
                        "script error against direct Redis: conn{c} has unread bytes at the end: {}",
                        escape_short(&bytes, 300)
                    );
                }
                self.record(c, What::Unexpected(bytes));
            }
            if stop == Stop::Eof {
                if self.strict {
                    panic!("script error against direct Redis: conn{c} closed unexpectedly");
                }
                self.record(c, What::Eof);
            }
        }
    }

    pub fn into_events(mut self) -> Vec<Event> {
        self.finish();
        self.events
    }
}

/// Replays `script` against `target`.
pub fn run_script(target: SocketAddr, strict: bool, script: &dyn Fn(&mut Session)) -> Vec<Event> {
    let mut session = Session::new(target, strict);
    script(&mut session);
    session.into_events()
}

/// Compares two transcripts; on difference returns a readable report.
pub fn diff_transcripts(want: &[Event], got: &[Event]) -> Option<String> {
    let w: Vec<(usize, &Event)> = want
        .iter()
        .enumerate()
        .filter(|(_, e)| e.compared())
        .collect();
    let g: Vec<(usize, &Event)> = got
        .iter()
        .enumerate()
        .filter(|(_, e)| e.compared())
        .collect();
    let first =
        (0..w.len().max(g.len())).find(|&i| w.get(i).map(|x| x.1) != g.get(i).map(|x| x.1))?;
    let mut out = String::new();
    out.push_str(&format!(
        "transcripts differ at received event #{first} (direct Redis had {} received events, pubwarden {}):\n",
        w.len(),
        g.len()
    ));
    let ctx_end = g
        .get(first)
        .map(|x| x.0)
        .or_else(|| w.get(first).map(|x| x.0).map(|i| i.min(got.len())))
        .unwrap_or(got.len());
    out.push_str("  context (pubwarden run, events before the difference):\n");
    for e in &got[ctx_end.saturating_sub(8)..ctx_end.min(got.len())] {
        out.push_str(&format!("    {}\n", e.show()));
    }
    match w.get(first) {
        Some((_, e)) => out.push_str(&format!("  expected (direct Redis): {}\n", e.show())),
        None => out.push_str("  expected (direct Redis): <nothing more>\n"),
    }
    match g.get(first) {
        Some((_, e)) => out.push_str(&format!("  got      (pubwarden):    {}\n", e.show())),
        None => out.push_str("  got      (pubwarden):    <nothing more>\n"),
    }
    if let (Some((_, a)), Some((_, b))) = (w.get(first), g.get(first))
        && let (What::Frame(x), What::Frame(y)) = (&a.what, &b.what)
    {
        let at = x
            .iter()
            .zip(y.iter())
            .position(|(p, q)| p != q)
            .unwrap_or(x.len().min(y.len()));
        let lo = at.saturating_sub(40);
        out.push_str(&format!(
            "  first differing byte at offset {at} (lengths {} vs {}): expected ...{} got ...{}\n",
            x.len(),
            y.len(),
            escape_short(&x[lo..x.len().min(at + 80)], 120),
            escape_short(&y[lo.min(y.len())..y.len().min(at + 80)], 120),
        ));
    }
    let later: Vec<String> = w
        .iter()
        .skip(first + 1)
        .take(3)
        .map(|(_, e)| e.show())
        .collect();
    if !later.is_empty() {
        out.push_str(&format!("  direct Redis continued with: {later:?}\n"));
    }
    Some(out)
}

/// Runs `script` against a fresh Redis directly and against another fresh Redis through a
/// fresh pubwarden, and asserts the received byte streams are identical.
///
/// With `PUBWARDEN_TESTS_SELF_CHECK=1` in the environment the second run also goes to Redis
/// directly (strict), which validates the scripts themselves without the proxy.
pub fn assert_transparent(name: &str, script: impl Fn(&mut Session)) {
    let direct = RedisServer::start();
    let upstream = RedisServer::start();
    let want = run_script(direct.addr(), true, &script);
    if std::env::var_os("PUBWARDEN_TESTS_SELF_CHECK").is_some() {
        let again = run_script(upstream.addr(), true, &script);
        if let Some(report) = diff_transcripts(&want, &again) {
            panic!("{name}: script is not deterministic against Redis itself\n{report}");
        }
        return;
    }
    let proxy = Pubwarden::start(upstream.port());
    let got = run_script(proxy.addr(), false, &script);
    if let Some(report) = diff_transcripts(&want, &got) {
        panic!("{name}: pubwarden is not transparent\n{report}");
    }
}

/// A named script, for [`assert_all_transparent`].
pub type Case = (String, Box<dyn Fn(&mut Session)>);

/// Like [`assert_transparent`] for many independent scripts sharing one direct Redis, one
/// upstream Redis and one pubwarden; every case runs, and all differences are reported.
pub fn assert_all_transparent(name: &str, cases: Vec<Case>) {
    let direct = RedisServer::start();
    let upstream = RedisServer::start();
    let self_check = std::env::var_os("PUBWARDEN_TESTS_SELF_CHECK").is_some();
    let proxy = (!self_check).then(|| Pubwarden::start(upstream.port()));
    let target = proxy.as_ref().map_or(upstream.addr(), |p| p.addr());
    let mut failures = Vec::new();
    for (case, script) in &cases {
        let want = run_script(direct.addr(), true, script.as_ref());
        let got = run_script(target, self_check, script.as_ref());
        if let Some(report) = diff_transcripts(&want, &got) {
            failures.push(format!("case {case}: {report}"));
        }
    }
    if !failures.is_empty() {
        panic!(
            "{name}: {} of {} cases differ between direct Redis and pubwarden:\n\n{}",
            failures.len(),
            cases.len(),
            failures.join("\n")
        );
    }
}

/// Replaces the integer after an `id` key (HELLO's reply map) with a fixed marker.
pub fn mask_hello_id(frame: &[u8]) -> Vec<u8> {
    let key = b"$2\r\nid\r\n:";
    let Some(at) = frame.windows(key.len()).position(|w| w == key) else {
        return frame.to_vec();
    };
    let start = at + key.len();
    let end = frame[start..]
        .iter()
        .position(|&b| b == b'\r')
        .map_or(frame.len(), |p| start + p);
    let mut out = frame[..start].to_vec();
    out.extend_from_slice(b"<id>");
    out.extend_from_slice(&frame[end..]);
    out
}

/// A MONITOR line without its timestamp and client address: `+<ts> [db addr] "CMD" ...`
/// becomes `+[db] "CMD" ...`.
pub fn mask_monitor_line(frame: &[u8]) -> Vec<u8> {
    let text = frame.to_vec();
    let (Some(open), Some(close)) = (
        text.iter().position(|&b| b == b'['),
        text.iter().position(|&b| b == b']'),
    ) else {
        return text;
    };
    let inner = &text[open + 1..close];
    let db: Vec<u8> = inner.iter().take_while(|&&b| b != b' ').copied().collect();
    let mut out = b"+[".to_vec();
    out.extend_from_slice(&db);
    out.extend_from_slice(&text[close..]);
    out
}

/// Splits `...\r\n:<n>\r\n` into the frame without the integer and the integer.
fn split_trailing_count(frame: &[u8]) -> (Vec<u8>, Option<i64>) {
    let Some(body) = frame.strip_suffix(b"\r\n") else {
        return (frame.to_vec(), None);
    };
    let Some(colon) = body.iter().rposition(|&b| b == b':') else {
        return (frame.to_vec(), None);
    };
    if colon < 2 || &body[colon - 2..colon] != b"\r\n" {
        return (frame.to_vec(), None);
    }
    match std::str::from_utf8(&body[colon + 1..])
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(n) => {
            let mut out = frame[..colon].to_vec();
            out.extend_from_slice(b":<n>\r\n");
            (out, Some(n))
        }
        None => (frame.to_vec(), None),
    }
}
