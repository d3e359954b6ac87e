//! Per-client conversation state, as seen from the replies' side.
//!
//! Every request that goes upstream leaves an entry in the pending-reply queue;
//! every request pubwarden answers itself leaves its answer there too, so the
//! client receives answers strictly in the order of its requests. An entry is
//! only *activated* once it reaches the front of the queue: at that moment the
//! session state (protocol, subscriptions, MULTI, `CLIENT REPLY` flags) is
//! exactly the state Redis had when it ran that command, because every earlier
//! command's reply has been seen. That is what makes pipelined HELLO, RESET,
//! SUBSCRIBE-then-PING and `CLIENT REPLY SKIP` come out right.

use std::collections::{HashSet, VecDeque};

use bytes::Bytes;

use crate::command::{Command, Kind, ReplyMode, SubKind};
use crate::resp::frame::Frame;
use crate::resp::request::Args;

/// One request awaiting its answer.
#[derive(Debug)]
enum Pending {
    /// Relayed upstream: Redis owes the answer.
    Owed(Owed),
    /// Answered by pubwarden itself.
    Local { cmd: Command, reply: Bytes },
}

#[derive(Debug)]
struct Owed {
    cmd: Command,
    /// The channel arguments of (un)subscribe commands, kept to track the set.
    channels: Vec<Box<[u8]>>,
    /// Sent by pubwarden itself (re-AUTH after RESET, DISCARD for an aborted
    /// transaction): its answer is not the client's to see.
    internal: bool,
    /// The answer is a list of channels to filter before the client sees it.
    filtered: bool,
}

/// What the active head entry still waits for.
#[derive(Debug)]
enum Active {
    /// This many more reply frames.
    Frames(usize),
    /// This many (un)subscribe confirmations of one kind; an error instead of
    /// the first one ends the command.
    Confirm {
        kind: SubKind,
        subscribe: bool,
        left: usize,
        seen: usize,
    },
    /// The reply to EXEC, with the commands it runs.
    Exec(Vec<Owed>),
    /// A command sent inside MULTI: `+QUEUED` means EXEC will run it.
    Queued(Owed),
}

/// The request at the front of the queue, once Redis has started answering it.
#[derive(Debug)]
struct Head {
    kind: Kind,
    wait: Active,
    internal: bool,
    filtered: bool,
}

/// `CLIENT REPLY` state, modelled on Redis's REPLY_OFF / SKIP / SKIP_NEXT flags.
#[derive(Debug, Default, Clone, Copy)]
struct ReplyFlags {
    off: bool,
    skip: bool,
    skip_next: bool,
}

/// What an upstream frame turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameClass {
    /// (Part of) the answer to the request at the head of the queue.
    Reply,
    /// A pub/sub message for a subscriber.
    Delivery(DeliveryKind),
    /// Any other out-of-band frame (RESP3 push, MONITOR line, attribute).
    OutOfBand,
    /// A frame nothing was waiting for; relayed anyway.
    Unexpected,
    /// The answer to pubwarden's own command: not forwarded.
    Internal,
    /// A reply to a command whose answer pubwarden filters (`PUBSUB CHANNELS`).
    Filtered,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryKind {
    Message,
    PMessage,
    SMessage,
}

/// Told about every change to a session's subscription set, so that gauges
/// move exactly where the set changes and never drift from it.
pub trait SubscriptionObserver: Send + std::fmt::Debug {
    fn changed(&mut self, kind: SubKind, name: &[u8], added: bool);
}

/// The channels, patterns and shard channels a connection is subscribed to.
#[derive(Debug, Default)]
pub struct Subscriptions {
    channels: HashSet<Box<[u8]>>,
    patterns: HashSet<Box<[u8]>>,
    shard: HashSet<Box<[u8]>>,
    observer: Option<Box<dyn SubscriptionObserver>>,
}

impl Subscriptions {
    fn set(&mut self, kind: SubKind) -> &mut HashSet<Box<[u8]>> {
        match kind {
            SubKind::Channel => &mut self.channels,
            SubKind::Pattern => &mut self.patterns,
            SubKind::Shard => &mut self.shard,
        }
    }

    // Every change goes through add/remove/clear_kind so the observer sees it.
    fn add(&mut self, kind: SubKind, name: Box<[u8]>) {
        if self.observer.is_some() && self.set(kind).contains(&name) {
            return;
        }
        if let Some(o) = self.observer.as_mut() {
            o.changed(kind, &name, true);
        }
        self.set(kind).insert(name);
    }

    fn remove(&mut self, kind: SubKind, name: &[u8]) {
        if self.set(kind).remove(name)
            && let Some(o) = self.observer.as_mut()
        {
            o.changed(kind, name, false);
        }
    }

    fn clear_kind(&mut self, kind: SubKind) {
        let set = match kind {
            SubKind::Channel => &mut self.channels,
            SubKind::Pattern => &mut self.patterns,
            SubKind::Shard => &mut self.shard,
        };
        if let Some(o) = self.observer.as_mut() {
            for name in set.iter() {
                o.changed(kind, name, false);
            }
        }
        set.clear();
    }

    pub fn len(&self, kind: SubKind) -> usize {
        match kind {
            SubKind::Channel => self.channels.len(),
            SubKind::Pattern => self.patterns.len(),
            SubKind::Shard => self.shard.len(),
        }
    }

    pub fn total(&self) -> usize {
        self.channels.len() + self.patterns.len() + self.shard.len()
    }

    /// The names subscribed to of one kind.
    pub fn iter(&self, kind: SubKind) -> impl Iterator<Item = &[u8]> {
        let set = match kind {
            SubKind::Channel => &self.channels,
            SubKind::Pattern => &self.patterns,
            SubKind::Shard => &self.shard,
        };
        set.iter().map(|b| &**b)
    }

    pub fn contains(&self, kind: SubKind, name: &[u8]) -> bool {
        match kind {
            SubKind::Channel => self.channels.contains(name),
            SubKind::Pattern => self.patterns.contains(name),
            SubKind::Shard => self.shard.contains(name),
        }
    }

    fn clear(&mut self) {
        self.clear_kind(SubKind::Channel);
        self.clear_kind(SubKind::Pattern);
        self.clear_kind(SubKind::Shard);
    }
}

/// Reply-side state of one client connection.
#[derive(Debug)]
pub struct Session {
    proto: u8,
    subs: Subscriptions,
    /// Commands queued by MULTI (as confirmed by `+QUEUED`), while in MULTI.
    multi: Option<Vec<Owed>>,
    flags: ReplyFlags,
    monitor: bool,
    quit: bool,
    pending: VecDeque<Pending>,
    active: Option<Head>,
    /// Requests ever queued, and ever finished. Both advance in queue order,
    /// so request number n (from 0) ends when `completed` passes n: that is
    /// how metrics pair a request with the end of its reply.
    enqueued: u64,
    completed: u64,
}

impl Default for Session {
    fn default() -> Self {
        Self::new()
    }
}

impl Session {
    pub fn new() -> Self {
        Self {
            proto: 2,
            subs: Subscriptions::default(),
            multi: None,
            flags: ReplyFlags::default(),
            monitor: false,
            quit: false,
            pending: VecDeque::new(),
            active: None,
            enqueued: 0,
            completed: 0,
        }
    }

    /// Reports every later change of the subscription set to `observer`.
    pub fn observe_subscriptions(&mut self, observer: Box<dyn SubscriptionObserver>) {
        self.subs.observer = Some(observer);
    }

    /// Requests queued so far; the next one queued gets this number.
    pub fn enqueued(&self) -> u64 {
        self.enqueued
    }

    /// Requests whose answer has ended (or was suppressed) so far.
    pub fn completed(&self) -> u64 {
        self.completed
    }

    /// The protocol (2 or 3) Redis speaks on this connection.
    pub fn protocol(&self) -> u8 {
        self.proto
    }

    pub fn subscriptions(&self) -> &Subscriptions {
        &self.subs
    }

    /// Requests still waiting for their answer.
    pub fn pending_len(&self) -> usize {
        self.pending.len() + usize::from(self.active.is_some())
    }

    /// Redis has acknowledged QUIT: it closes the connection next.
    pub fn quit_acknowledged(&self) -> bool {
        self.quit
    }

    /// A request goes upstream; Redis owes its answer.
    pub fn forwarded(&mut self, cmd: Command, args: &Args<'_>) {
        let channels = match cmd.kind {
            Kind::Subscribe(_) | Kind::Unsubscribe(_) => {
                args.iter().skip(1).map(Box::from).collect()
            }
            _ => Vec::new(),
        };
        self.pending.push_back(Pending::Owed(Owed {
            cmd,
            channels,
            internal: false,
            filtered: false,
        }));
        self.enqueued += 1;
    }

    /// Like [`Self::forwarded`], for a command whose answer pubwarden filters.
    pub fn forwarded_filtered(&mut self, cmd: Command, args: &Args<'_>) {
        self.forwarded(cmd, args);
        if let Some(Pending::Owed(owed)) = self.pending.back_mut() {
            owed.filtered = true;
        }
    }

    /// pubwarden sends a command of its own; its answer is swallowed.
    pub fn internal(&mut self, cmd: Command) {
        self.internal_with(cmd, Vec::new());
    }

    /// An internal (un)subscribe for `channels`: its confirmations are
    /// expected one per channel, and swallowed.
    pub fn internal_with(&mut self, cmd: Command, channels: Vec<Box<[u8]>>) {
        self.pending.push_back(Pending::Owed(Owed {
            cmd,
            channels,
            internal: true,
            filtered: false,
        }));
        self.enqueued += 1;
    }

    /// Nothing owed to the client and no transaction open: the connection to
    /// Redis could be replaced without any reply going astray. pubwarden's own
    /// unanswered commands do not count (see [`Self::forget_internal`]).
    pub fn quiescent(&self) -> bool {
        self.multi.is_none()
            && !self.monitor
            && self.active.as_ref().is_none_or(|h| h.internal)
            && self
                .pending
                .iter()
                .all(|p| matches!(p, Pending::Owed(o) if o.internal))
    }

    /// The connection to Redis is gone: pubwarden's own commands on it will
    /// never be answered.
    pub fn forget_internal(&mut self) {
        if self.active.as_ref().is_some_and(|h| h.internal) {
            self.active = None;
            self.completed += 1;
        }
        let before = self.pending.len();
        self.pending
            .retain(|p| !matches!(p, Pending::Owed(o) if o.internal));
        self.completed += (before - self.pending.len()) as u64;
    }

    /// pubwarden answers a request itself; the answer waits for its turn.
    pub fn answered_locally(&mut self, cmd: Command, reply: Bytes) {
        self.pending.push_back(Pending::Local { cmd, reply });
        self.enqueued += 1;
    }

    /// Activates head entries that need no upstream frame and hands out local
    /// answers that have reached the front. Call after queueing requests and
    /// after every upstream frame.
    pub fn settle(&mut self, mut emit: impl FnMut(Bytes)) {
        while self.active.is_none() {
            match self.pending.pop_front() {
                None => return,
                Some(Pending::Local { cmd, reply }) => {
                    let suppressed = self.begin_command(cmd.kind, false);
                    self.end_command(cmd.kind, false);
                    self.completed += 1;
                    if !suppressed {
                        emit(reply);
                    }
                }
                Some(Pending::Owed(owed)) => {
                    let (kind, internal, filtered) = (owed.cmd.kind, owed.internal, owed.filtered);
                    self.active = self.activate(owed).map(|wait| Head {
                        kind,
                        wait,
                        internal,
                        filtered,
                    });
                    if self.active.is_none() {
                        self.completed += 1;
                    }
                }
            }
        }
    }

    /// Applies reply-flag changes that happen before a command writes, and
    /// says whether its answer is suppressed.
    fn begin_command(&mut self, kind: Kind, runs: bool) -> bool {
        if runs {
            match kind {
                Kind::ClientReply(ReplyMode::On) => {
                    self.flags.off = false;
                    self.flags.skip = false;
                }
                Kind::Reset => {
                    self.flags.off = false;
                    self.flags.skip_next = false;
                }
                _ => {}
            }
        }
        self.flags.off || self.flags.skip
    }

    /// Redis's `resetClient` after every command.
    fn end_command(&mut self, kind: Kind, runs: bool) {
        if runs {
            match kind {
                Kind::ClientReply(ReplyMode::Off) => self.flags.off = true,
                Kind::ClientReply(ReplyMode::Skip) if !self.flags.off => {
                    self.flags.skip_next = true
                }
                _ => {}
            }
        }
        self.flags.skip = false;
        if self.flags.skip_next {
            self.flags.skip = true;
            self.flags.skip_next = false;
        }
    }

    fn resp2_subscribed(&self) -> bool {
        self.proto == 2 && self.subs.total() > 0
    }

    /// The kind of a frame the fast path recognised as delivery-shaped, if it
    /// is a delivery on this connection now (a push, or an array while
    /// subscribed in RESP2). Deliveries never touch the pending-reply queue,
    /// so the relay may pass them on without [`Self::on_frame`].
    #[inline]
    pub fn delivery(&self, f: &Frame) -> Option<DeliveryKind> {
        let kind = match f.delivery {
            1 => DeliveryKind::Message,
            2 => DeliveryKind::PMessage,
            3 => DeliveryKind::SMessage,
            _ => return None,
        };
        (f.kind == b'>' || self.resp2_subscribed()).then_some(kind)
    }

    /// The head entry starts: how many frames will answer it, given the state
    /// Redis is in right now. `None` when nothing will.
    fn activate(&mut self, owed: Owed) -> Option<Active> {
        let kind = owed.cmd.kind;
        let refused = self.resp2_subscribed()
            && !matches!(
                kind,
                Kind::Subscribe(_) | Kind::Unsubscribe(_) | Kind::Ping | Kind::Quit | Kind::Reset
            );
        let queued = !refused
            && self.multi.is_some()
            && !matches!(kind, Kind::Exec | Kind::Discard | Kind::Quit | Kind::Reset);
        let runs = !refused && !queued;
        let suppressed = self.begin_command(kind, runs);
        self.end_command(kind, runs);
        if suppressed {
            // No frame will tell us what happened: assume the command worked.
            if runs {
                self.apply_unseen(owed);
            }
            return None;
        }
        if refused {
            return Some(Active::Frames(1));
        }
        if queued {
            return Some(Active::Queued(owed));
        }
        let channels = owed.channels.len();
        Some(match kind {
            Kind::Subscribe(kind) if channels > 0 => Active::Confirm {
                kind,
                subscribe: true,
                left: channels,
                seen: 0,
            },
            Kind::Unsubscribe(kind) => Active::Confirm {
                kind,
                subscribe: false,
                left: if channels > 0 {
                    channels
                } else {
                    self.subs.len(kind).max(1)
                },
                seen: 0,
            },
            Kind::Exec => match self.multi.take() {
                Some(queued) => Active::Exec(queued),
                None => Active::Frames(1),
            },
            Kind::ClientReply(ReplyMode::Off | ReplyMode::Skip) => return None,
            _ => Active::Frames(1),
        })
    }

    /// Effects of a command whose reply Redis suppressed (`CLIENT REPLY`).
    fn apply_unseen(&mut self, owed: Owed) {
        match owed.cmd.kind {
            Kind::Subscribe(kind) => {
                for ch in owed.channels {
                    self.subs.add(kind, ch);
                }
            }
            Kind::Unsubscribe(kind) if owed.channels.is_empty() => self.subs.clear_kind(kind),
            Kind::Unsubscribe(kind) => {
                for ch in &owed.channels {
                    self.subs.remove(kind, ch);
                }
            }
            Kind::Hello(Some(v)) => self.proto = v,
            Kind::Multi => self.multi = Some(Vec::new()),
            Kind::Discard => self.multi = None,
            Kind::Exec => {
                if let Some(queued) = self.multi.take() {
                    self.simulate_exec(&queued);
                }
            }
            Kind::Monitor => self.monitor = true,
            Kind::Quit => self.quit = true,
            Kind::Reset => self.reset(),
            _ => {}
        }
    }

    fn reset(&mut self) {
        self.proto = 2;
        self.subs.clear();
        self.multi = None;
        self.monitor = false;
        self.flags = ReplyFlags::default();
    }

    /// Classifies one upstream frame and applies what it says.
    pub fn on_frame(&mut self, f: &Frame, buf: &[u8]) -> FrameClass {
        match f.kind {
            b'|' => return FrameClass::OutOfBand,
            b'>' => return self.on_push(f, buf),
            b'*' if self.resp2_subscribed() => {
                if let Some(kind) = delivery_kind(f, buf) {
                    return FrameClass::Delivery(kind);
                }
            }
            b'+' if self.monitor && is_monitor_line(&buf[f.start..f.end]) => {
                return FrameClass::OutOfBand;
            }
            _ => {}
        }
        self.on_reply(f, buf)
    }

    fn on_push(&mut self, f: &Frame, buf: &[u8]) -> FrameClass {
        if let Some(kind) = delivery_kind(f, buf) {
            return FrameClass::Delivery(kind);
        }
        if let Some(Head {
            wait: Active::Confirm {
                kind, subscribe, ..
            },
            ..
        }) = &self.active
            && confirmation(f, buf, *kind, *subscribe)
        {
            return self.on_reply(f, buf);
        }
        // Unsolicited (un)subscribe notices, e.g. a cluster node dropping a
        // shard channel: the subscription set follows them.
        for kind in [SubKind::Channel, SubKind::Pattern, SubKind::Shard] {
            if confirmation(f, buf, kind, false) {
                if let Some(ch) = f.str_elem(buf, 1) {
                    self.subs.remove(kind, ch);
                }
                break;
            }
        }
        FrameClass::OutOfBand
    }

    fn on_reply(&mut self, f: &Frame, buf: &[u8]) -> FrameClass {
        let Some(Head {
            kind,
            wait,
            internal,
            filtered,
        }) = self.active.take()
        else {
            return FrameClass::Unexpected;
        };
        let more = match wait {
            Active::Frames(n) => {
                self.apply_reply(kind, f, buf);
                (n > 1).then(|| Active::Frames(n - 1))
            }
            Active::Confirm {
                kind: sub,
                subscribe,
                left,
                seen,
            } => {
                if seen == 0 && f.is_error() {
                    None
                } else {
                    if confirmation(f, buf, sub, subscribe) {
                        match f.str_elem(buf, 1) {
                            Some(ch) if subscribe => {
                                self.subs.add(sub, Box::from(ch));
                            }
                            Some(ch) => {
                                self.subs.remove(sub, ch);
                            }
                            None => {}
                        }
                    }
                    (left > 1).then(|| Active::Confirm {
                        kind: sub,
                        subscribe,
                        left: left - 1,
                        seen: seen + 1,
                    })
                }
            }
            Active::Queued(owed) => {
                if is_simple(f, buf, b"QUEUED")
                    && let Some(list) = self.multi.as_mut()
                {
                    list.push(owed);
                }
                None
            }
            Active::Exec(queued) => self.finish_exec(f, &queued).map(Active::Frames),
        };
        if more.is_none() {
            self.completed += 1;
        }
        self.active = more.map(|wait| Head {
            kind,
            wait,
            internal,
            filtered,
        });
        if internal {
            FrameClass::Internal
        } else if filtered {
            FrameClass::Filtered
        } else {
            FrameClass::Reply
        }
    }

    /// The first frame of EXEC's answer. Redis writes one array element per
    /// queued command but one frame per (un)subscribe confirmation, so a
    /// transaction with SUBSCRIBE a b leaves extra top-level frames behind the
    /// array. Returns how many such frames are still owed.
    fn finish_exec(&mut self, f: &Frame, queued: &[Owed]) -> Option<usize> {
        if f.kind != b'*' || f.len < 0 {
            return None; // EXECABORT, or WATCH made it a null reply
        }
        let frames = self.simulate_exec(queued);
        Some(frames.saturating_sub(f.len as usize)).filter(|&extra| extra > 0)
    }

    /// Applies the effects of a transaction's commands in order and returns how
    /// many reply frames Redis writes for them.
    fn simulate_exec(&mut self, queued: &[Owed]) -> usize {
        let mut frames = 0;
        for q in queued {
            match q.cmd.kind {
                Kind::Subscribe(kind) => {
                    frames += q.channels.len().max(1);
                    for ch in &q.channels {
                        self.subs.add(kind, ch.clone());
                    }
                }
                Kind::Unsubscribe(kind) => {
                    if q.channels.is_empty() {
                        frames += self.subs.len(kind).max(1);
                        self.subs.clear_kind(kind);
                    } else {
                        frames += q.channels.len();
                        for ch in &q.channels {
                            self.subs.remove(kind, ch);
                        }
                    }
                }
                _ => frames += 1,
            }
        }
        frames
    }

    /// Effects that depend on Redis having accepted the command.
    fn apply_reply(&mut self, kind: Kind, f: &Frame, buf: &[u8]) {
        if f.is_error() {
            return;
        }
        match kind {
            Kind::Hello(Some(v)) => self.proto = v,
            Kind::Reset if is_simple(f, buf, b"RESET") => self.reset(),
            Kind::Multi if is_simple(f, buf, b"OK") => self.multi = Some(Vec::new()),
            Kind::Discard if is_simple(f, buf, b"OK") => self.multi = None,
            Kind::Monitor if is_simple(f, buf, b"OK") => self.monitor = true,
            Kind::Quit if is_simple(f, buf, b"OK") => self.quit = true,
            _ => {}
        }
    }
}

fn is_simple(f: &Frame, buf: &[u8], text: &[u8]) -> bool {
    f.kind == b'+' && buf.get(f.start + 1..f.end.saturating_sub(2)) == Some(text)
}

/// `message`, `pmessage` or `smessage` with the right arity.
fn delivery_kind(f: &Frame, buf: &[u8]) -> Option<DeliveryKind> {
    match f.delivery {
        1 => return Some(DeliveryKind::Message),
        2 => return Some(DeliveryKind::PMessage),
        3 => return Some(DeliveryKind::SMessage),
        _ => {}
    }
    let first = f.str_elem(buf, 0)?;
    match (f.len, first) {
        (3, b"message") => Some(DeliveryKind::Message),
        (4, b"pmessage") => Some(DeliveryKind::PMessage),
        (3, b"smessage") => Some(DeliveryKind::SMessage),
        _ => None,
    }
}

/// `[subscribe|unsubscribe|..., channel-or-null, count]` of the given family.
fn confirmation(f: &Frame, buf: &[u8], kind: SubKind, subscribe: bool) -> bool {
    let expected = if subscribe {
        kind.subscribe_reply()
    } else {
        kind.unsubscribe_reply()
    };
    f.len == 3 && f.str_elem(buf, 0) == Some(expected) && f.int_elem(buf, 2).is_some()
}

/// MONITOR lines look like `+1700000000.123456 [0 127.0.0.1:5000] "PING"`.
fn is_monitor_line(line: &[u8]) -> bool {
    let body = line.get(1..).unwrap_or_default();
    let secs = body.iter().take_while(|b| b.is_ascii_digit()).count();
    if secs == 0 || body.get(secs) != Some(&b'.') {
        return false;
    }
    let rest = &body[secs + 1..];
    let micros = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    micros > 0 && rest.get(micros..micros + 2) == Some(b" [")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resp::frame::FrameScanner;
    use crate::resp::request::{RequestLimits, RequestParser};

    /// Feeds requests and the replies Redis gave (recorded from redis-server
    /// 7.0.15) and returns each frame's class plus what was emitted locally.
    struct Harness {
        session: Session,
    }

    impl Harness {
        fn new() -> Self {
            Self {
                session: Session::new(),
            }
        }

        fn send(&mut self, requests: &str) {
            let mut p = RequestParser::new(RequestLimits::default());
            let buf = requests.as_bytes();
            let mut at = 0;
            while let Some(f) = p.next(buf, at).unwrap() {
                let args = p.args(buf, &f);
                let cmd = Command::classify(&args);
                self.session.forwarded(cmd, &args);
                at = f.end;
            }
            self.session.settle(|_| {});
        }

        fn receive(&mut self, replies: &[u8]) -> Vec<FrameClass> {
            let mut s = FrameScanner::new(64);
            let mut at = 0;
            let mut out = Vec::new();
            while let Some(f) = s.next(replies, at).unwrap() {
                out.push(self.session.on_frame(&f, replies));
                self.session.settle(|_| {});
                at = f.end;
            }
            assert_eq!(at, replies.len());
            out
        }
    }

    use FrameClass::*;

    #[test]
    fn pipelined_subscribe_then_ping_in_resp2() {
        let mut h = Harness::new();
        h.send("SUBSCRIBE a b\r\nPING\r\nUNSUBSCRIBE\r\nPING\r\n");
        let got = h.receive(
            b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$2\r\nhi\r\n\
              *3\r\n$9\r\nsubscribe\r\n$1\r\nb\r\n:2\r\n*2\r\n$4\r\npong\r\n$0\r\n\r\n\
              *3\r\n$11\r\nunsubscribe\r\n$1\r\na\r\n:1\r\n*3\r\n$11\r\nunsubscribe\r\n$1\r\nb\r\n:0\r\n+PONG\r\n",
        );
        assert_eq!(
            got,
            vec![
                Reply,
                Delivery(DeliveryKind::Message),
                Reply,
                Reply,
                Reply,
                Reply,
                Reply
            ]
        );
        assert_eq!(h.session.pending_len(), 0);
        assert_eq!(h.session.subscriptions().total(), 0);
    }

    #[test]
    fn unsubscribe_all_with_nothing_subscribed_answers_once() {
        let mut h = Harness::new();
        h.send("UNSUBSCRIBE\r\nPING\r\n");
        let got = h.receive(b"*3\r\n$11\r\nunsubscribe\r\n$-1\r\n:0\r\n+PONG\r\n");
        assert_eq!(got, vec![Reply, Reply]);
        assert_eq!(h.session.pending_len(), 0);
    }

    #[test]
    fn subscribe_without_arguments_is_one_error() {
        let mut h = Harness::new();
        h.send("SUBSCRIBE\r\nPING\r\n");
        h.receive(b"-ERR wrong number of arguments for 'subscribe' command\r\n+PONG\r\n");
        assert_eq!(h.session.pending_len(), 0);
    }

    #[test]
    fn list_reply_looking_like_a_message_is_a_reply_when_not_subscribed() {
        let mut h = Harness::new();
        h.send("LRANGE l 0 -1\r\n");
        let got = h.receive(b"*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$1\r\nb\r\n");
        assert_eq!(got, vec![Reply]);
    }

    #[test]
    fn resp3_pushes_and_commands_while_subscribed() {
        let mut h = Harness::new();
        h.send("HELLO 3\r\nSUBSCRIBE a\r\nGET x\r\nHELLO 2\r\nPING\r\n");
        let got = h.receive(
            b"%1\r\n$5\r\nproto\r\n:3\r\n>3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n>3\r\n$7\r\nmessage\r\n$1\r\na\r\n$1\r\nx\r\n\
              _\r\n*1\r\n$5\r\nproto\r\n*2\r\n$4\r\npong\r\n$0\r\n\r\n",
        );
        assert_eq!(
            got,
            vec![
                Reply,
                Reply,
                Delivery(DeliveryKind::Message),
                Reply,
                Reply,
                Reply
            ]
        );
        assert_eq!(h.session.protocol(), 2);
        assert_eq!(h.session.pending_len(), 0);
    }

    #[test]
    fn client_reply_skip_and_off() {
        let mut h = Harness::new();
        h.send("CLIENT REPLY SKIP\r\nPING a\r\nPING b\r\nCLIENT REPLY OFF\r\nPING c\r\nCLIENT REPLY SKIP\r\nRESET\r\nPING d\r\n");
        // Only PING b, RESET and PING d answer.
        let got = h.receive(b"$1\r\nb\r\n+RESET\r\n$1\r\nd\r\n");
        assert_eq!(got, vec![Reply, Reply, Reply]);
        assert_eq!(h.session.pending_len(), 0);
    }

    #[test]
    fn subscribe_inside_multi_leaves_frames_after_exec() {
        let mut h = Harness::new();
        h.send("MULTI\r\nSUBSCRIBE a b\r\nEXEC\r\nPING\r\n");
        let got = h.receive(
            b"+OK\r\n+QUEUED\r\n*1\r\n*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n*3\r\n$9\r\nsubscribe\r\n$1\r\nb\r\n:2\r\n\
              *2\r\n$4\r\npong\r\n$0\r\n\r\n",
        );
        assert_eq!(got, vec![Reply, Reply, Reply, Reply, Reply]);
        assert_eq!(h.session.subscriptions().len(SubKind::Channel), 2);
        assert_eq!(h.session.pending_len(), 0);
    }

    #[test]
    fn refused_in_subscribed_context() {
        let mut h = Harness::new();
        h.send("SUBSCRIBE a\r\nCLIENT REPLY OFF\r\nRESET\r\nPING\r\n");
        h.receive(
            b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n-ERR Can't execute 'client|reply': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context\r\n+RESET\r\n+PONG\r\n",
        );
        assert_eq!(h.session.pending_len(), 0);
        assert_eq!(h.session.subscriptions().total(), 0);
    }

    #[test]
    fn monitor_lines_are_out_of_band() {
        let mut h = Harness::new();
        h.send("MONITOR\r\nPING\r\n");
        let got = h.receive(
            b"+OK\r\n+1795630331.364373 [0 127.0.0.1:53174] \"SET\" \"x\" \"1\"\r\n+PONG\r\n",
        );
        assert_eq!(got, vec![Reply, OutOfBand, Reply]);
    }

    #[test]
    fn local_answers_keep_their_place() {
        let mut s = Session::new();
        let mut p = RequestParser::new(RequestLimits::default());
        let buf = b"GET a\r\n";
        let f = p.next(buf, 0).unwrap().unwrap();
        let args = p.args(buf, &f);
        s.forwarded(Command::classify(&args), &args);
        s.answered_locally(
            Command::classify(&args),
            Bytes::from_static(b"-NOPERM x\r\n"),
        );
        let mut out = Vec::new();
        s.settle(|b| out.push(b));
        assert!(out.is_empty(), "must wait for the reply owed before it");
        let mut sc = FrameScanner::new(8);
        let reply = b"$-1\r\n";
        let fr = sc.next(reply, 0).unwrap().unwrap();
        s.on_frame(&fr, reply);
        s.settle(|b| out.push(b));
        assert_eq!(out, vec![Bytes::from_static(b"-NOPERM x\r\n")]);
    }
}
