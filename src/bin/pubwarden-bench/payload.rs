//! Payload layout and per-subscriber sequence checking.
//!
//! Every payload is exactly `size` bytes: a 32-byte little-endian header
//! (`magic u32 | publisher u32 | channel u32 | reserved u32 | seq u64 | ts_ns u64`)
//! followed by filler. `seq` counts per (publisher, channel) from 0; `ts_ns` is the
//! *scheduled* send time in nanoseconds since the run's shared start `Instant`.

use crate::resp::encode_command;

pub const HEADER_LEN: usize = 32;
const MAGIC: u32 = 0x3142_5750; // "PWB1" little-endian

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub publisher: u32,
    pub channel: u32,
    pub seq: u64,
    pub ts_ns: u64,
}

#[inline]
fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

#[inline]
fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Decodes a payload header; `None` if the payload is not one of ours.
#[inline]
pub fn decode(payload: &[u8]) -> Option<Header> {
    if payload.len() < HEADER_LEN || u32_at(payload, 0) != MAGIC {
        return None;
    }
    Some(Header {
        publisher: u32_at(payload, 4),
        channel: u32_at(payload, 8),
        seq: u64_at(payload, 16),
        ts_ns: u64_at(payload, 24),
    })
}

/// Builds pipelined PUBLISH commands without per-message allocation.
pub struct PublishEncoder {
    /// Per channel: `*3 $7 PUBLISH $len chan $size` prefix.
    prefixes: Vec<Vec<u8>>,
    filler: Vec<u8>,
    publisher: u32,
    seqs: Vec<u64>,
}

impl PublishEncoder {
    pub fn new(channels: &[String], payload_size: usize, publisher: u32) -> Self {
        Self::with_command(b"PUBLISH", channels, payload_size, publisher)
    }

    /// Like [`PublishEncoder::new`] with another two-argument publish command
    /// (`SPUBLISH`).
    pub fn with_command(
        command: &[u8],
        channels: &[String],
        payload_size: usize,
        publisher: u32,
    ) -> Self {
        let prefixes = channels
            .iter()
            .map(|c| {
                let mut p = Vec::new();
                encode_command(&mut p, &[command, c.as_bytes()]);
                // Turn "*2" into "*3" and append the payload bulk header.
                p[1] = b'3';
                p.push(b'$');
                p.extend_from_slice(payload_size.to_string().as_bytes());
                p.extend_from_slice(b"\r\n");
                p
            })
            .collect();
        Self {
            prefixes,
            filler: vec![b'x'; payload_size.saturating_sub(HEADER_LEN)],
            publisher,
            seqs: vec![0; channels.len()],
        }
    }

    pub fn channels(&self) -> usize {
        self.prefixes.len()
    }

    /// Bytes one command takes on the wire (upper bound, for buffer sizing).
    pub fn frame_len(&self) -> usize {
        self.prefixes.iter().map(Vec::len).max().unwrap_or(0) + HEADER_LEN + self.filler.len() + 2
    }

    /// Appends one PUBLISH to `out` on `channel` with timestamp `ts_ns`.
    #[inline]
    pub fn push(&mut self, out: &mut Vec<u8>, channel: usize, ts_ns: u64) {
        let seq = self.seqs[channel];
        self.seqs[channel] = seq + 1;
        out.extend_from_slice(&self.prefixes[channel]);
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&self.publisher.to_le_bytes());
        out.extend_from_slice(&(channel as u32).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&seq.to_le_bytes());
        out.extend_from_slice(&ts_ns.to_le_bytes());
        out.extend_from_slice(&self.filler);
        out.extend_from_slice(b"\r\n");
    }
}

/// Sliding 64-entry window over the sequence numbers of one (publisher, channel).
#[derive(Debug, Clone, Copy, Default)]
struct SeqWindow {
    /// Every seq below `base` has been seen (or given up on).
    base: u64,
    /// Bit i set: `base + i` seen. Bit 0 is always clear after normalisation.
    bits: u64,
}

/// Correctness counters for one subscriber.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SeqCounts {
    /// Deliveries received (including duplicates).
    pub received: u64,
    /// Deliveries whose (publisher, channel, seq) had already been seen.
    pub duplicated: u64,
    /// Deliveries that arrived while an earlier seq of the same publisher and
    /// channel was still missing (a lost message also causes one).
    pub out_of_order: u64,
    /// Deliveries whose payload was not ours or named an unknown publisher/channel.
    pub foreign: u64,
}

impl SeqCounts {
    pub fn add(&mut self, o: &SeqCounts) {
        self.received += o.received;
        self.duplicated += o.duplicated;
        self.out_of_order += o.out_of_order;
        self.foreign += o.foreign;
    }
}

/// Tracks sequence numbers per (publisher, channel) for one subscriber.
pub struct SeqTracker {
    windows: Vec<SeqWindow>,
    channels: usize,
    pub counts: SeqCounts,
}

impl SeqTracker {
    pub fn new(publishers: usize, channels: usize) -> Self {
        Self {
            windows: vec![SeqWindow::default(); publishers * channels],
            channels,
            counts: SeqCounts::default(),
        }
    }

    #[inline]
    pub fn observe(&mut self, h: &Header) {
        self.counts.received += 1;
        let (p, c) = (h.publisher as usize, h.channel as usize);
        if c >= self.channels {
            self.counts.foreign += 1;
            return;
        }
        let Some(w) = self.windows.get_mut(p * self.channels + c) else {
            self.counts.foreign += 1;
            return;
        };
        let s = h.seq;
        if s < w.base {
            self.counts.duplicated += 1;
            return;
        }
        let mut d = s - w.base;
        if d >= 64 {
            // Far ahead: slide the window, giving up on the oldest missing ones.
            let shift = d - 63;
            w.bits = if shift >= 64 { 0 } else { w.bits >> shift };
            w.base += shift;
            d = 63;
        }
        if w.bits & (1u64 << d) != 0 {
            self.counts.duplicated += 1;
            return;
        }
        if d != 0 {
            self.counts.out_of_order += 1;
        }
        w.bits |= 1u64 << d;
        let t = w.bits.trailing_ones();
        w.bits = if t >= 64 { 0 } else { w.bits >> t };
        w.base += u64::from(t);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resp::{Push, parse_push};

    fn h(seq: u64) -> Header {
        Header {
            publisher: 0,
            channel: 0,
            seq,
            ts_ns: 0,
        }
    }

    #[test]
    fn in_order() {
        let mut t = SeqTracker::new(1, 1);
        for s in 0..1000 {
            t.observe(&h(s));
        }
        assert_eq!(
            t.counts,
            SeqCounts {
                received: 1000,
                ..Default::default()
            }
        );
    }

    #[test]
    fn dup_and_reorder() {
        let mut t = SeqTracker::new(1, 1);
        for s in [0, 2, 1, 1, 3, 200, 4] {
            t.observe(&h(s));
        }
        assert_eq!(t.counts.received, 7);
        assert_eq!(t.counts.duplicated, 2); // second 1, and 4 (given up after jump)
        assert_eq!(t.counts.out_of_order, 2); // 2 and 200
    }

    #[test]
    fn roundtrip() {
        let chans = vec!["a".to_string(), "bb".to_string()];
        let mut e = PublishEncoder::new(&chans, 40, 3);
        let mut out = Vec::new();
        e.push(&mut out, 1, 99);
        e.push(&mut out, 1, 100);
        // Pretend it came back as a message push: reuse the bulk payload.
        let payload = &out[out.len() / 2 - 42..out.len() / 2 - 2];
        let hd = decode(payload);
        assert_eq!(
            hd,
            Some(Header {
                publisher: 3,
                channel: 1,
                seq: 0,
                ts_ns: 99
            })
        );
        let mut m = b"*3\r\n$7\r\nmessage\r\n$2\r\nbb\r\n$40\r\n".to_vec();
        m.extend_from_slice(payload);
        m.extend_from_slice(b"\r\n");
        let Ok(Some((Push::Message { payload: p, .. }, _))) = parse_push(&m) else {
            panic!("parse");
        };
        assert_eq!(decode(p).map(|h| h.seq), Some(0));
    }

    #[test]
    fn spublish_frames() {
        let chans = vec!["{bench}.c".to_string()];
        let mut e = PublishEncoder::with_command(b"SPUBLISH", &chans, 32, 0);
        let mut out = Vec::new();
        e.push(&mut out, 0, 7);
        assert!(out.starts_with(b"*3\r\n$8\r\nSPUBLISH\r\n$9\r\n{bench}.c\r\n$32\r\n"));
        assert_eq!(out.len(), e.frame_len());
    }
}
