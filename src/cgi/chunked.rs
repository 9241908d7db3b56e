//! Chunked transfer coding (RFC 9112 §7.1): the decoder for request bodies
//! and the encoder for responses of unknown length.
//!
//! Depends on nothing but std, so the fuzz target in `fuzz/` compiles this
//! very file. The decoder is strict: a chunk size is 1 to 15 hex digits
//! (no sign, no `0x`), optionally followed by `;extensions`; chunk data must
//! be followed by a line end; lines are at most 4 KiB.

use std::io::{self, BufRead, Read, Write};

/// Decodes a chunked body (RFC 9112 §7.1); trailers are read and dropped.
pub struct ChunkedReader<R> {
    inner: R,
    /// Bytes left in the current chunk.
    left: u64,
    done: bool,
}

const MAX_CHUNK_LINE: usize = 4096;

fn bad(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl<R: BufRead> ChunkedReader<R> {
    pub fn new(inner: R) -> Self {
        ChunkedReader {
            inner,
            left: 0,
            done: false,
        }
    }

    fn line(&mut self) -> io::Result<Vec<u8>> {
        let mut line = Vec::new();
        let n = self
            .inner
            .by_ref()
            .take(MAX_CHUNK_LINE as u64)
            .read_until(b'\n', &mut line)?;
        if n == 0 || line.last() != Some(&b'\n') {
            return Err(if n >= MAX_CHUNK_LINE {
                bad("chunk line too long")
            } else {
                io::Error::new(io::ErrorKind::UnexpectedEof, "body ended inside a chunk")
            });
        }
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        Ok(line)
    }

    fn next_chunk(&mut self) -> io::Result<()> {
        let line = self.line()?;
        let size = line.split(|&b| b == b';').next().unwrap_or(&[]);
        let size = std::str::from_utf8(size)
            .ok()
            // 1*HEXDIG, then optional whitespace before extensions.
            .map(|s| s.trim_end_matches([' ', '\t']))
            .filter(|s| !s.is_empty() && s.len() <= 15 && s.bytes().all(|b| b.is_ascii_hexdigit()))
            .and_then(|s| u64::from_str_radix(s, 16).ok())
            .ok_or_else(|| bad("invalid chunk size"))?;
        if size == 0 {
            // Trailer section, up to the empty line.
            loop {
                if self.line()?.is_empty() {
                    break;
                }
            }
            self.done = true;
        }
        self.left = size;
        Ok(())
    }
}

impl<R: BufRead> Read for ChunkedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        while self.left == 0 {
            if self.done {
                return Ok(0);
            }
            self.next_chunk()?;
        }
        let want = usize::try_from(self.left)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "body ended inside a chunk",
            ));
        }
        self.left -= n as u64;
        if self.left == 0 && !self.line()?.is_empty() {
            return Err(bad("chunk data not followed by CRLF"));
        }
        Ok(n)
    }
}

/// Encodes everything written as chunks; [`ChunkedWriter::finish`] writes the
/// last chunk. Each `write` call becomes one chunk (callers write big blocks).
pub struct ChunkedWriter<W: Write> {
    inner: W,
}

impl<W: Write> ChunkedWriter<W> {
    pub fn new(inner: W) -> Self {
        ChunkedWriter { inner }
    }

    /// Writes the terminating zero-length chunk and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.inner.write_all(b"0\r\n\r\n")?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for ChunkedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        write!(self.inner, "{:x}\r\n", buf.len())?;
        self.inner.write_all(buf)?;
        self.inner.write_all(b"\r\n")?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dechunk(s: &[u8]) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        ChunkedReader::new(io::Cursor::new(s.to_vec())).read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn chunked_decoding() {
        assert_eq!(
            dechunk(b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nTrailer: x\r\n\r\nNEXT").unwrap(),
            b"hello, world"
        );
        assert_eq!(
            dechunk(b"A\r\n0123456789\r\n0\r\n\r\n").unwrap(),
            b"0123456789"
        );
        assert_eq!(dechunk(b"0\r\n\r\n").unwrap(), b"");
        assert!(dechunk(b"5\r\nhel").is_err());
        assert!(dechunk(b"5\r\nhelloX\r\n0\r\n\r\n").is_err());
        assert!(dechunk(b"zz\r\n").is_err());
        assert!(dechunk(b"+5\r\nhello\r\n0\r\n\r\n").is_err());
        assert!(dechunk(b" 5\r\nhello\r\n0\r\n\r\n").is_err());
        assert!(dechunk(b"0x5\r\nhello\r\n0\r\n\r\n").is_err());
        assert_eq!(dechunk(b"5 ;x\r\nhello\r\n0\r\n\r\n").unwrap(), b"hello");
        assert!(dechunk(b"ffffffffffffffffff\r\n").is_err());
        assert!(dechunk(b"5\r\nhello\r\n").is_err());
        // Reading stops after the last chunk: the rest stays in the stream.
        let mut cur = io::Cursor::new(b"1\r\na\r\n0\r\n\r\nrest".to_vec());
        let mut out = Vec::new();
        ChunkedReader::new(&mut cur).read_to_end(&mut out).unwrap();
        assert_eq!(out, b"a");
        let mut rest = String::new();
        cur.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "rest");
    }

    #[test]
    fn chunked_round_trip() {
        let mut w = ChunkedWriter::new(Vec::new());
        w.write_all(b"hello").unwrap();
        w.write_all(b"").unwrap();
        w.write_all(&[b'x'; 300]).unwrap();
        let bytes = w.finish().unwrap();
        assert!(bytes.starts_with(b"5\r\nhello\r\n12c\r\n"));
        assert!(bytes.ends_with(b"\r\n0\r\n\r\n"));
        let mut want = b"hello".to_vec();
        want.extend([b'x'; 300]);
        assert_eq!(dechunk(&bytes).unwrap(), want);
    }
}
