//! Raw loopback sockets: send bytes, read with a deadline until N frames, a byte count, idle or EOF.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use super::resp::{escape_short, frame_len};

/// A free loopback port (bound on port 0, then released). Never 6379.
pub fn free_port() -> u16 {
    for _ in 0..20 {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 for a free port");
        let port = listener
            .local_addr()
            .expect("local_addr of the port-0 listener")
            .port();
        if port != 6379 {
            return port;
        }
    }
    panic!("could not find a free loopback port");
}

pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// How a read stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// Got what was asked for.
    Done,
    /// The peer closed the connection (FIN or reset).
    Eof,
    /// The deadline passed first.
    Timeout,
    /// The bytes received are not RESP.
    Garbage(String),
}

/// Frames read by [`RawConn::read_frames`] and why the read stopped.
#[derive(Debug, Clone)]
pub struct Frames {
    pub frames: Vec<Vec<u8>>,
    pub stop: Stop,
    /// Bytes of an incomplete frame left in the buffer when the read stopped early.
    pub partial: Vec<u8>,
}

impl Frames {
    /// Panics with the frames seen so far unless all frames arrived.
    pub fn expect_all(self, what: &str) -> Vec<Vec<u8>> {
        if self.stop != Stop::Done {
            panic!(
                "{what}: read stopped with {:?} after {} frames {:?}, partial {}",
                self.stop,
                self.frames.len(),
                self.frames
                    .iter()
                    .map(|f| escape_short(f, 200))
                    .collect::<Vec<_>>(),
                escape_short(&self.partial, 200)
            );
        }
        self.frames
    }
}

enum Fill {
    Data,
    Eof,
    Timeout,
}

/// A client socket speaking raw bytes.
pub struct RawConn {
    stream: TcpStream,
    buf: Vec<u8>,
    chunk: Vec<u8>,
    eof: bool,
}

impl RawConn {
    pub fn connect(addr: SocketAddr) -> RawConn {
        Self::try_connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
    }

    pub fn try_connect(addr: SocketAddr) -> std::io::Result<RawConn> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(Duration::from_secs(30)))?;
        Ok(RawConn {
            stream,
            buf: Vec::new(),
            chunk: vec![0u8; 256 * 1024],
            eof: false,
        })
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.try_send(bytes)
            .unwrap_or_else(|e| panic!("send {}: {e}", escape_short(bytes, 100)));
    }

    pub fn try_send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    /// Sends a space separated command line as a multibulk request.
    pub fn send_line(&mut self, line: &str) {
        self.send(&super::resp::encode_line(line));
    }

    pub fn is_eof(&self) -> bool {
        self.eof
    }

    /// Closes both directions.
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    fn fill(&mut self, deadline: Instant) -> Fill {
        if self.eof {
            return Fill::Eof;
        }
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Fill::Timeout;
            }
            let wait = (deadline - now).max(Duration::from_millis(1));
            self.stream
                .set_read_timeout(Some(wait))
                .expect("set_read_timeout");
            match self.stream.read(&mut self.chunk) {
                Ok(0) => {
                    self.eof = true;
                    return Fill::Eof;
                }
                Ok(n) => {
                    self.buf.extend_from_slice(&self.chunk[..n]);
                    return Fill::Data;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
                    return Fill::Timeout;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    // Reset or other error: the connection is gone.
                    self.eof = true;
                    return Fill::Eof;
                }
            }
        }
    }

    /// Reads until `n` complete frames arrived, the peer closed, or `timeout` passed.
    pub fn read_frames(&mut self, n: usize, timeout: Duration) -> Frames {
        let deadline = Instant::now() + timeout;
        let mut frames = Vec::with_capacity(n.min(100_000));
        let mut start = 0usize;
        let stop = loop {
            // Take every complete frame already buffered.
            while frames.len() < n {
                match frame_len(&self.buf[start..]) {
                    Ok(Some(len)) => {
                        frames.push(self.buf[start..start + len].to_vec());
                        start += len;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let partial = self.buf[start..].to_vec();
                        self.buf.clear();
                        return Frames {
                            frames,
                            stop: Stop::Garbage(e),
                            partial,
                        };
                    }
                }
            }
            if frames.len() >= n {
                break Stop::Done;
            }
            match self.fill(deadline) {
                Fill::Data => {}
                Fill::Eof => break Stop::Eof,
                Fill::Timeout => break Stop::Timeout,
            }
        };
        self.buf.drain(..start);
        let partial = if stop == Stop::Done {
            Vec::new()
        } else {
            self.buf.clone()
        };
        Frames {
            frames,
            stop,
            partial,
        }
    }

    /// Reads one frame, panicking with context if it does not arrive within `timeout`.
    pub fn read_one(&mut self, timeout: Duration) -> Vec<u8> {
        let mut frames = self.read_frames(1, timeout).expect_all("read one frame");
        frames.pop().expect("one frame")
    }

    /// Reads until at least `count` bytes are buffered (or EOF/timeout) and returns them all.
    pub fn read_bytes(&mut self, count: usize, timeout: Duration) -> (Vec<u8>, Stop) {
        let deadline = Instant::now() + timeout;
        let stop = loop {
            if self.buf.len() >= count {
                break Stop::Done;
            }
            match self.fill(deadline) {
                Fill::Data => {}
                Fill::Eof => break Stop::Eof,
                Fill::Timeout => break Stop::Timeout,
            }
        };
        (std::mem::take(&mut self.buf), stop)
    }

    /// Reads until no byte arrived for `idle`, or `max` passed, or EOF; returns what came.
    pub fn read_until_idle(&mut self, idle: Duration, max: Duration) -> (Vec<u8>, Stop) {
        let end = Instant::now() + max;
        let stop = loop {
            let now = Instant::now();
            if now >= end {
                break Stop::Timeout;
            }
            match self.fill((now + idle).min(end)) {
                Fill::Data => {}
                Fill::Eof => break Stop::Eof,
                Fill::Timeout => break Stop::Done,
            }
        };
        (std::mem::take(&mut self.buf), stop)
    }

    /// Reads until the peer closes (returns the bytes and true) or `timeout` passes (false).
    pub fn read_until_eof(&mut self, timeout: Duration) -> (Vec<u8>, bool) {
        let deadline = Instant::now() + timeout;
        let eof = loop {
            match self.fill(deadline) {
                Fill::Data => {}
                Fill::Eof => break true,
                Fill::Timeout => break false,
            }
        };
        (std::mem::take(&mut self.buf), eof)
    }
}

/// One HTTP/1.1 GET over a raw socket; the status code, or None if nothing sensible came back.
pub fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    http_get(addr, path).map(|(status, _)| status)
}

/// One HTTP/1.1 GET over a raw socket: status code and body (as read until close or 2 s).
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut conn = RawConn::try_connect(addr).ok()?;
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: */*\r\n\r\n");
    conn.try_send(request.as_bytes()).ok()?;
    let (bytes, _) = conn.read_until_eof(Duration::from_secs(2));
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let status_line = text.lines().next()?;
    let mut parts = status_line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let status = parts.next()?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}
