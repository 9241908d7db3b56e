//! The HTTP/1.1 side of the CGI gateway: reading a request head from nginx,
//! the request body framing (Content-Length or chunked), and the chunked
//! encoder for responses of unknown length.
//!
//! Only what nginx sends to an upstream has to work, but the parser is strict
//! about anything that could make the gateway and nginx disagree on where a
//! request ends (both Content-Length and Transfer-Encoding, differing
//! Content-Length values, obsolete line folding, bare CR).

use std::io::{self, BufRead, Read, Write};

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The request target as sent (origin-form: path and query).
    pub target: String,
    /// "HTTP/1.1" or "HTTP/1.0".
    pub version: String,
    /// Header fields in order; names as sent, values trimmed.
    pub headers: Vec<(String, String)>,
}

impl Request {
    /// The first value of a header (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every value of a header, in order.
    pub fn header_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Whether the connection may carry another request after this one's
/// response: HTTP/1.1 unless `Connection: close`; HTTP/1.0 only with
/// `Connection: keep-alive`.
pub fn keep_alive(req: &Request) -> bool {
    let has = |token: &str| {
        req.header_all("Connection")
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    if req.version == "HTTP/1.1" {
        !has("close")
    } else {
        has("keep-alive")
    }
}

/// Why a request head could not be read. Each maps to a status code.
#[derive(Debug)]
pub enum HeadError {
    /// Larger than the limit: 431.
    TooLarge,
    /// Not HTTP/1.x as we accept it: 400.
    Malformed(&'static str),
    /// The connection ended in the middle of a head.
    Truncated,
    Io(io::Error),
}

impl From<io::Error> for HeadError {
    fn from(e: io::Error) -> Self {
        HeadError::Io(e)
    }
}

pub fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

pub fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(is_token_char)
}

/// Reads one line (up to and including `\n`) into `line`, never more than
/// `*budget` bytes in total for the head. Returns false on EOF before any byte.
fn read_line<R: BufRead>(
    r: &mut R,
    line: &mut Vec<u8>,
    budget: &mut usize,
) -> Result<bool, HeadError> {
    line.clear();
    let limit = u64::try_from(*budget).unwrap_or(u64::MAX).saturating_add(1);
    let n = r.by_ref().take(limit).read_until(b'\n', line)?;
    if n == 0 {
        return Ok(false);
    }
    if n > *budget {
        return Err(HeadError::TooLarge);
    }
    *budget -= n;
    if line.last() != Some(&b'\n') {
        return Err(HeadError::Truncated);
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    if line.contains(&b'\r') {
        return Err(HeadError::Malformed("bare CR in the request head"));
    }
    Ok(true)
}

/// Reads a request head of at most `max` bytes. `Ok(None)`: the connection
/// closed cleanly before a request started.
pub fn read_head<R: BufRead>(r: &mut R, max: usize) -> Result<Option<Request>, HeadError> {
    let mut budget = max;
    let mut line = Vec::with_capacity(256);
    // RFC 9112 §2.2: ignore at least one empty line before the request line.
    loop {
        if !read_line(r, &mut line, &mut budget)? {
            return Ok(None);
        }
        if !line.is_empty() {
            break;
        }
    }
    let request_line = std::str::from_utf8(&line)
        .map_err(|_| HeadError::Malformed("request line is not UTF-8"))?;
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HeadError::Malformed(
            "request line is not `METHOD TARGET VERSION`",
        ));
    };
    if !is_token(method) {
        return Err(HeadError::Malformed("invalid method"));
    }
    if !target.starts_with('/') || target.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(HeadError::Malformed(
            "request target is not an absolute path",
        ));
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(HeadError::Malformed("unsupported HTTP version"));
    }
    let mut req = Request {
        method: method.to_string(),
        target: target.to_string(),
        version: version.to_string(),
        headers: Vec::new(),
    };
    loop {
        if !read_line(r, &mut line, &mut budget)? {
            return Err(HeadError::Truncated);
        }
        if line.is_empty() {
            return Ok(Some(req));
        }
        if line[0] == b' ' || line[0] == b'\t' {
            return Err(HeadError::Malformed("obsolete header line folding"));
        }
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .ok_or(HeadError::Malformed("header line without a colon"))?;
        let name = &line[..colon];
        if name.is_empty() || !name.iter().all(|&b| is_token_char(b)) {
            return Err(HeadError::Malformed("invalid header name"));
        }
        let value = &line[colon + 1..];
        if value.iter().any(|&b| (b < b' ' && b != b'\t') || b == 0x7f) {
            return Err(HeadError::Malformed("control character in a header value"));
        }
        let value = String::from_utf8_lossy(value)
            .trim_matches([' ', '\t'])
            .to_string();
        req.headers
            .push((String::from_utf8_lossy(name).into_owned(), value));
    }
}

/// How the request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// The body framing of a request, or the status and reason to refuse it.
pub fn framing(req: &Request) -> Result<Framing, (u16, &'static str)> {
    let te: Vec<&str> = req.header_all("Transfer-Encoding").collect();
    let mut cl: Option<u64> = None;
    for v in req.header_all("Content-Length") {
        for part in v.split(',') {
            let part = part.trim();
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err((400, "invalid Content-Length"));
            }
            let n: u64 = part.parse().map_err(|_| (400, "invalid Content-Length"))?;
            if cl.is_some_and(|c| c != n) {
                return Err((400, "conflicting Content-Length values"));
            }
            cl = Some(n);
        }
    }
    if !te.is_empty() {
        if cl.is_some() {
            return Err((400, "both Transfer-Encoding and Content-Length"));
        }
        let codings: Vec<String> = te
            .iter()
            .flat_map(|v| v.split(','))
            .map(|c| c.trim().to_ascii_lowercase())
            .filter(|c| !c.is_empty())
            .collect();
        return if codings == ["chunked"] {
            Ok(Framing::Chunked)
        } else {
            Err((501, "unsupported Transfer-Encoding"))
        };
    }
    Ok(match cl {
        Some(0) | None => Framing::None,
        Some(n) => Framing::Length(n),
    })
}

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
            .map(|s| s.trim_matches([' ', '\t']))
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

/// The standard reason phrase of the status codes the gateway uses or
/// programs commonly send.
pub fn reason(code: u16) -> &'static str {
    match code {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(s: &str) -> Result<Option<Request>, HeadError> {
        read_head(&mut io::Cursor::new(s.as_bytes().to_vec()), 1024)
    }

    #[test]
    fn keep_alive_by_version_and_connection() {
        let ka = |s: &str| keep_alive(&head(s).unwrap().unwrap());
        assert!(ka("GET / HTTP/1.1\r\n\r\n"));
        assert!(ka("GET / HTTP/1.1\r\nConnection: keep-alive\r\n\r\n"));
        assert!(!ka("GET / HTTP/1.1\r\nConnection: close\r\n\r\n"));
        assert!(!ka("GET / HTTP/1.1\r\nConnection: TE, Close\r\n\r\n"));
        assert!(!ka("GET / HTTP/1.0\r\n\r\n"));
        assert!(ka("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"));
    }

    #[test]
    fn parses_a_request_from_nginx() {
        let r = head("\r\nPOST /git/repo.git/git-upload-pack?x=1 HTTP/1.1\r\nHost: example.org\r\nContent-Length: 5\r\nX-Empty:\r\nX-Spaces:   a b  \r\n\r\nhello")
            .unwrap()
            .unwrap();
        assert_eq!(r.method, "POST");
        assert_eq!(r.target, "/git/repo.git/git-upload-pack?x=1");
        assert_eq!(r.version, "HTTP/1.1");
        assert_eq!(r.header("host"), Some("example.org"));
        assert_eq!(r.header("X-EMPTY"), Some(""));
        assert_eq!(r.header("x-spaces"), Some("a b"));
        assert_eq!(framing(&r).unwrap(), Framing::Length(5));
        // LF-only line ends are accepted too.
        let r = head("GET / HTTP/1.0\nA: b\n\n").unwrap().unwrap();
        assert_eq!(r.header("a"), Some("b"));
        assert_eq!(framing(&r).unwrap(), Framing::None);
    }

    #[test]
    fn clean_close_and_truncation() {
        assert!(head("").unwrap().is_none());
        assert!(matches!(
            head("GET / HTTP/1.1\r\nA: b\r\n"),
            Err(HeadError::Truncated)
        ));
        assert!(matches!(head("GET / HTTP/1.1"), Err(HeadError::Truncated)));
    }

    #[test]
    fn rejects_malformed_heads() {
        for bad in [
            "GET /\r\n\r\n",
            "GET  / HTTP/1.1\r\n\r\n",
            "G(T / HTTP/1.1\r\n\r\n",
            "GET http://x/ HTTP/1.1\r\n\r\n",
            "GET / HTTP/2.0\r\n\r\n",
            "GET / HTTP/1.1\r\nNoColon\r\n\r\n",
            "GET / HTTP/1.1\r\nA: b\r\n c\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
            "GET / HTTP/1.1\r\n: x\r\n\r\n",
            "GET / HTTP/1.1\r\nA: x\ry\r\n\r\n",
            "GET / HTTP/1.1\r\nA: x\u{1}y\r\n\r\n",
        ] {
            assert!(matches!(head(bad), Err(HeadError::Malformed(_))), "{bad:?}");
        }
    }

    #[test]
    fn head_size_limit() {
        let big = format!("GET / HTTP/1.1\r\nA: {}\r\n\r\n", "x".repeat(2000));
        assert!(matches!(head(&big), Err(HeadError::TooLarge)));
        let exact = format!("GET / HTTP/1.1\r\nA: {}\r\n\r\n", "x".repeat(1024 - 23));
        assert_eq!(exact.len(), 1024);
        assert!(head(&exact).unwrap().is_some());
        let over = format!("GET / HTTP/1.1\r\nA: {}\r\n\r\n", "x".repeat(1024 - 22));
        assert!(matches!(head(&over), Err(HeadError::TooLarge)));
    }

    fn req(headers: &[(&str, &str)]) -> Request {
        Request {
            method: "POST".into(),
            target: "/".into(),
            version: "HTTP/1.1".into(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn body_framing() {
        assert_eq!(framing(&req(&[])).unwrap(), Framing::None);
        assert_eq!(
            framing(&req(&[("Content-Length", "0")])).unwrap(),
            Framing::None
        );
        assert_eq!(
            framing(&req(&[("content-length", "7"), ("Content-Length", "7")])).unwrap(),
            Framing::Length(7)
        );
        assert_eq!(
            framing(&req(&[("Transfer-Encoding", "Chunked")])).unwrap(),
            Framing::Chunked
        );
        assert_eq!(
            framing(&req(&[("Content-Length", "7, 8")])).unwrap_err().0,
            400
        );
        assert_eq!(
            framing(&req(&[("Content-Length", "-1")])).unwrap_err().0,
            400
        );
        assert_eq!(
            framing(&req(&[("Content-Length", "+1")])).unwrap_err().0,
            400
        );
        assert_eq!(
            framing(&req(&[("Content-Length", "99999999999999999999999")]))
                .unwrap_err()
                .0,
            400
        );
        assert_eq!(
            framing(&req(&[
                ("Transfer-Encoding", "chunked"),
                ("Content-Length", "3")
            ]))
            .unwrap_err()
            .0,
            400
        );
        assert_eq!(
            framing(&req(&[("Transfer-Encoding", "gzip, chunked")]))
                .unwrap_err()
                .0,
            501
        );
    }

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
