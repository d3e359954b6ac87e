//! One side of a relayed connection: plain TCP, or TLS driven by hand over
//! the same non-blocking socket.
//!
//! The relay never blocks on a write (see `proxy`): it asks each socket for
//! readiness, then tries reads and writes that may come back `WouldBlock`.
//! An async TLS stream would hide that behind `poll_write`, so TLS here is
//! the rustls state machine fed from readiness instead: ciphertext comes in
//! with `read_tls` when the socket is readable and goes out with
//! `write_tls` when it is writable, and plaintext the relay hands over is
//! taken only while rustls's own send buffer (64 KiB) has room. The relay
//! keeps its bounded memory and its no-blocking-write property, and plain TCP
//! pays nothing but a branch.

use std::io::{self, Read, Write};

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// The relay's view of a socket.
pub enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsTransport>),
}

/// TLS over a non-blocking socket, after the handshake.
pub struct TlsTransport {
    tcp: TcpStream,
    conn: rustls::Connection,
    /// The peer closed its sending side (TCP EOF).
    eof: bool,
    /// Decrypted bytes may be waiting in rustls: readable without the socket.
    buffered: bool,
}

/// `io::Read`/`io::Write` over a tokio socket's non-blocking calls, for
/// rustls's `read_tls`/`write_tls`.
struct SocketIo<'a>(&'a TcpStream);

impl Read for SocketIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl Write for SocketIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.0.try_write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl TlsTransport {
    /// Takes over a connection whose handshake is complete (done by
    /// tokio-rustls, whose leftovers stay inside `conn`).
    pub fn new(tcp: TcpStream, conn: rustls::Connection) -> Self {
        Self {
            tcp,
            conn,
            eof: false,
            // Application data that came with the handshake's last flight is
            // already decrypted inside `conn`.
            buffered: true,
        }
    }

    fn read_into(&mut self, dst: &mut [u8]) -> io::Result<usize> {
        let mut filled = 0;
        loop {
            match self.conn.reader().read(&mut dst[filled..]) {
                // close_notify: a clean end.
                Ok(0) => {
                    self.buffered = false;
                    return Ok(filled);
                }
                Ok(n) => {
                    filled += n;
                    if filled == dst.len() {
                        self.buffered = true;
                        return Ok(filled);
                    }
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The peer closed without close_notify. Redis and most
                // clients do so; no truncation attack applies to RESP, whose
                // frames carry their own lengths.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    self.buffered = false;
                    return Ok(filled);
                }
                Err(e) => return Err(e),
            }
            self.buffered = false;
            if self.eof {
                return Ok(filled);
            }
            match self.conn.read_tls(&mut SocketIo(&self.tcp)) {
                Ok(0) => self.eof = true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return if filled > 0 { Ok(filled) } else { Err(e) };
                }
                Err(e) => return Err(e),
            }
            if let Err(e) = self.conn.process_new_packets() {
                // Tell the peer why (the alert rustls queued), then fail.
                let _ = self.conn.write_tls(&mut SocketIo(&self.tcp));
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
            // Post-handshake messages (key updates, tickets) may need an answer.
            self.flush_pending()?;
        }
    }

    /// Writes queued TLS records; `Ok` also when the socket is full.
    fn flush_pending(&mut self) -> io::Result<()> {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut SocketIo(&self.tcp)) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn try_write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.flush_pending()?;
        if self.conn.wants_write() {
            // Earlier records still wait for the socket: take nothing more,
            // so pubwarden's memory stays bounded by the caller's outbox.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = self.conn.writer().write(data)?;
        if n == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.flush_pending()?;
        Ok(n)
    }
}

impl Transport {
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Transport::Plain(s) => s,
            Transport::Tls(t) => &t.tcp,
        }
    }

    /// The peer's certificate chain (TLS with client certificates only).
    pub fn peer_certificates(&self) -> Option<&[rustls::pki_types::CertificateDer<'static>]> {
        match self {
            Transport::Plain(_) => None,
            Transport::Tls(t) => t.conn.peer_certificates(),
        }
    }

    /// Resolves when a read may return data (or EOF).
    pub async fn readable(&self) -> io::Result<()> {
        match self {
            Transport::Plain(s) => s.readable().await,
            Transport::Tls(t) if t.buffered => Ok(()),
            Transport::Tls(t) => t.tcp.readable().await,
        }
    }

    pub async fn writable(&self) -> io::Result<()> {
        self.tcp().writable().await
    }

    /// TLS records are waiting for the socket (the relay must wait for
    /// writability even with nothing of its own queued).
    pub fn wants_write(&self) -> bool {
        match self {
            Transport::Plain(_) => false,
            Transport::Tls(t) => t.conn.wants_write(),
        }
    }

    /// Reads what is available into `buf`'s spare capacity; `WouldBlock`
    /// when nothing is. `Ok(0)`: end of stream.
    pub fn try_read_buf(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        match self {
            Transport::Plain(s) => s.try_read_buf(buf),
            Transport::Tls(t) => {
                let start = buf.len();
                buf.resize(buf.capacity(), 0);
                let result = t.read_into(&mut buf[start..]);
                buf.truncate(start + *result.as_ref().unwrap_or(&0));
                result
            }
        }
    }

    /// Clears read readiness after a short read emptied a plain socket (see
    /// `proxy::read_some`); TLS reads stop only at `WouldBlock` anyway.
    pub fn clear_read_ready(&self) {
        if let Transport::Plain(s) = self {
            let _ = s.try_io(tokio::io::Interest::READABLE, || {
                Err::<(), _>(io::ErrorKind::WouldBlock.into())
            });
        }
    }

    /// Writes (or, for TLS, encrypts and queues within rustls's bound) some
    /// of `data`; `WouldBlock` when none of it can be taken now.
    pub fn try_write(&mut self, data: &[u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(s) => s.try_write(data),
            Transport::Tls(t) => t.try_write(data),
        }
    }

    /// Pushes queued TLS records to the socket, as far as it takes them.
    pub fn flush_pending(&mut self) -> io::Result<()> {
        match self {
            Transport::Plain(_) => Ok(()),
            Transport::Tls(t) => t.flush_pending(),
        }
    }

    /// Closes the sending side: close_notify first for TLS, then a FIN.
    pub async fn shutdown(&mut self) -> io::Result<()> {
        match self {
            Transport::Plain(s) => s.shutdown().await,
            Transport::Tls(t) => {
                t.conn.send_close_notify();
                let give_up = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
                while t.conn.wants_write() {
                    t.flush_pending()?;
                    if t.conn.wants_write()
                        && tokio::time::timeout_at(give_up, t.tcp.writable())
                            .await
                            .is_err()
                    {
                        break;
                    }
                }
                t.tcp.shutdown().await
            }
        }
    }
}
