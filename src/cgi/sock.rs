//! One connection's socket as the gateway uses it: non-blocking, with a
//! deadline on every blocking read and write ([`Sock`]), and the buffer of
//! bytes received but not used yet ([`In`]).
//!
//! The accept loop reads request heads with [`In::fill_now`], which never
//! waits. Once a request runs, the request's one deadline covers reading
//! its body and writing its response: a read or write that would wait past
//! it fails with `TimedOut`, so a client that stops sending or stops
//! reading cannot hold the gateway longer than that.

use std::io::{self, BufRead, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

pub const IO_BUF: usize = 64 * 1024;

/// A non-blocking unix stream whose reads and writes wait for it at most
/// until `deadline`.
pub struct Sock {
    stream: UnixStream,
    pub deadline: Instant,
}

impl Sock {
    /// `stream` must already be non-blocking.
    pub fn new(stream: UnixStream) -> Sock {
        Sock {
            stream,
            deadline: Instant::now(),
        }
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Waits until the socket is ready for `flags`, at most until the
    /// deadline.
    fn wait(&self, flags: PollFlags) -> io::Result<()> {
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the request's deadline passed",
                ));
            }
            let mut fds = [PollFd::new(self.stream.as_fd(), flags)];
            match poll(&mut fds, poll_ms(left)) {
                Ok(0) | Err(Errno::EINTR) => continue,
                Ok(_) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// A poll timeout of at least `d`, rounded up to whole milliseconds.
pub fn poll_ms(d: Duration) -> PollTimeout {
    PollTimeout::from(u16::try_from(d.as_millis() + 1).unwrap_or(u16::MAX))
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match (&self.stream).read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.wait(PollFlags::POLLIN)?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            match (&self.stream).write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.wait(PollFlags::POLLOUT)?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The reading side of a connection: bytes received and not used yet
/// (a head in progress, the start of a body, a pipelined request), then
/// the socket.
pub struct In {
    pub sock: Sock,
    buf: Vec<u8>,
    pos: usize,
}

/// What one non-blocking read found.
#[derive(Debug, PartialEq, Eq)]
pub enum Got {
    Bytes(usize),
    /// Nothing there yet.
    Nothing,
    /// The peer closed its side.
    Eof,
}

impl In {
    pub fn new(sock: Sock) -> In {
        In {
            sock,
            buf: Vec::new(),
            pos: 0,
        }
    }

    /// Bytes received and not consumed yet.
    pub fn buffered(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// One read of at most `want` more bytes, without waiting.
    pub fn fill_now(&mut self, want: usize) -> io::Result<Got> {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        let old = self.buf.len();
        self.buf.resize(old + want.max(1), 0);
        let r = loop {
            match (&self.sock.stream).read(&mut self.buf[old..]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => break r,
            }
        };
        match r {
            Ok(0) => {
                self.buf.truncate(old);
                Ok(Got::Eof)
            }
            Ok(n) => {
                self.buf.truncate(old + n);
                Ok(Got::Bytes(n))
            }
            Err(e) => {
                self.buf.truncate(old);
                if e.kind() == io::ErrorKind::WouldBlock {
                    Ok(Got::Nothing)
                } else {
                    Err(e)
                }
            }
        }
    }
}

impl Read for In {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.buf.len() && out.len() >= IO_BUF {
            // Nothing buffered and a big read: straight from the socket.
            return self.sock.read(out);
        }
        let have = self.fill_buf()?;
        let n = have.len().min(out.len());
        out[..n].copy_from_slice(&have[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for In {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
            self.buf.resize(IO_BUF, 0);
            match self.sock.read(&mut self.buf) {
                Ok(n) => self.buf.truncate(n),
                Err(e) => {
                    self.buf.clear();
                    return Err(e);
                }
            }
        }
        Ok(&self.buf[self.pos..])
    }

    fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.buf.len());
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (In, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (In::new(Sock::new(a)), b)
    }

    #[test]
    fn fill_now_never_waits_and_buffers() {
        let (mut r, mut peer) = pair();
        assert_eq!(r.fill_now(16).unwrap(), Got::Nothing);
        peer.write_all(b"GET / HTTP/1.1\r\n").unwrap();
        assert_eq!(r.fill_now(4).unwrap(), Got::Bytes(4));
        assert_eq!(r.fill_now(100).unwrap(), Got::Bytes(12));
        assert_eq!(r.buffered(), b"GET / HTTP/1.1\r\n");
        r.consume(4);
        let mut s = String::new();
        r.sock.deadline = Instant::now() + Duration::from_secs(5);
        drop(peer);
        r.read_to_string(&mut s).unwrap();
        assert_eq!(s, "/ HTTP/1.1\r\n");
        assert_eq!(r.fill_now(1).unwrap(), Got::Eof);
    }

    #[test]
    fn reads_and_writes_end_at_the_deadline() {
        let (mut r, peer) = pair();
        // Taken before the deadline is set: never later than it, so the
        // lower bound holds on a machine of any load (the TimedOut at all
        // proves the end; no upper bound).
        let started = Instant::now();
        r.sock.deadline = Instant::now() + Duration::from_millis(200);
        let e = r.read(&mut [0u8; 10]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(200), "{took:?}");
        // A peer that does not read: writes fill the buffer, then time out.
        let mut w = Sock::new(peer);
        w.stream.set_nonblocking(true).unwrap();
        let started = Instant::now();
        w.deadline = Instant::now() + Duration::from_millis(200);
        let chunk = vec![0u8; IO_BUF];
        // A socket buffer holds far less than 1000 chunks of 64 KiB.
        let e = (0..1000)
            .find_map(|_| w.write_all(&chunk).err())
            .expect("1000 writes of 64 KiB to a peer that never reads never blocked");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(200), "{took:?}");
    }
}
