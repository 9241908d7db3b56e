//! The HTTP/1.1 request head as the CGI gateway reads it: parsing a head
//! from the bytes received so far (the accept loop calls it as they come,
//! so a head is never read with a blocking call), and the request body
//! framing (Content-Length or chunked, [`super::chunked`]).
//!
//! Only what nginx sends to an upstream has to work, but the parser is strict
//! about anything that could make the gateway and nginx disagree on where a
//! request ends (both Content-Length and Transfer-Encoding, differing
//! Content-Length values, obsolete line folding, bare CR). The request
//! target and header values are kept as bytes: besides ASCII they may carry
//! obs-text (0x80-0xFF, RFC 9110 §5.5), which nginx passes on and which the
//! program gets unchanged (RFC 3875 meta-variables are byte strings). It
//! depends on nothing but std, so the fuzz target in `fuzz/` compiles this
//! very file.

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The request target as sent (origin-form: path and query), obs-text
    /// included.
    pub target: Vec<u8>,
    /// "HTTP/1.1" or "HTTP/1.0".
    pub version: String,
    /// Header fields in order; names as sent, values trimmed, as bytes.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Request {
    /// The first value of a header (case-insensitive name), as bytes.
    pub fn header_bytes(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// The first value of a header as text, for the values the gateway
    /// reads itself: None when absent or not UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.header_bytes(name)
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    /// Every value of a header, in order.
    pub fn header_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers
            .iter()
            .filter(move |(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// The request target for a log line or a status report (obs-text
    /// shown as U+FFFD there, never on the way to the program).
    pub fn target_text(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.target)
    }
}

/// Whether a comma-separated header value lists `token` (any case).
fn lists(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// Whether the connection may carry another request after this one's
/// response: HTTP/1.1 unless `Connection: close`; HTTP/1.0 only with
/// `Connection: keep-alive`.
pub fn keep_alive(req: &Request) -> bool {
    let has = |token: &str| req.header_all("Connection").any(|v| lists(v, token));
    if req.version == "HTTP/1.1" {
        !has("close")
    } else {
        has("keep-alive")
    }
}

/// Why a request head is refused. Each maps to a status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadError {
    /// Larger than the limit: 431.
    TooLarge,
    /// Not HTTP/1.x as we accept it: 400.
    Malformed(&'static str),
}

pub fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

pub fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(is_token_char)
}

/// Whether `buf` may hold a complete head, looking only at what arrived
/// from `from` on (plus the two bytes before it): a head ends with an
/// empty line, so a head that is not complete yet needs no new parse.
pub fn may_be_complete(buf: &[u8], from: usize) -> bool {
    let tail = &buf[from.saturating_sub(2).min(buf.len())..];
    tail.windows(2).any(|w| w == b"\n\n") || tail.windows(3).any(|w| w == b"\n\r\n")
}

/// The lines of a head: each without its line end (LF or CRLF).
struct Lines<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Lines<'a> {
    /// The next complete line, Ok(None) when `buf` ends before its LF.
    fn next(&mut self) -> Result<Option<&'a [u8]>, HeadError> {
        let rest = &self.buf[self.pos..];
        let Some(lf) = rest.iter().position(|&b| b == b'\n') else {
            return Ok(None);
        };
        self.pos += lf + 1;
        let mut line = &rest[..lf];
        if let Some(l) = line.strip_suffix(b"\r") {
            line = l;
        }
        if line.contains(&b'\r') {
            return Err(HeadError::Malformed("bare CR in the request head"));
        }
        Ok(Some(line))
    }
}

/// Parses the request head at the start of `buf`, of at most `max` bytes
/// (up to and including the empty line that ends it). `Ok(None)`: not
/// complete yet (and still within `max`); `Ok(Some((request, n)))`: the
/// head is `buf[..n]`, what follows is the body or the next request.
pub fn parse_head(buf: &[u8], max: usize) -> Result<Option<(Request, usize)>, HeadError> {
    let window = &buf[..buf.len().min(max)];
    let incomplete = if buf.len() >= max {
        Err(HeadError::TooLarge)
    } else {
        Ok(None)
    };
    let mut lines = Lines {
        buf: window,
        pos: 0,
    };
    // RFC 9112 §2.2: ignore at least one empty line before the request line.
    let line = loop {
        match lines.next()? {
            None => return incomplete,
            Some([]) => {}
            Some(l) => break l,
        }
    };
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HeadError::Malformed(
            "request line is not `METHOD TARGET VERSION`",
        ));
    };
    let Some(method) = std::str::from_utf8(method).ok().filter(|m| is_token(m)) else {
        return Err(HeadError::Malformed("invalid method"));
    };
    // Any byte but controls and space: obs-text too (nginx passes it on).
    if target.first() != Some(&b'/') || target.iter().any(|&b| b <= b' ' || b == 0x7f) {
        return Err(HeadError::Malformed(
            "request target is not an absolute path",
        ));
    }
    let version = match version {
        b"HTTP/1.1" => "HTTP/1.1",
        b"HTTP/1.0" => "HTTP/1.0",
        _ => return Err(HeadError::Malformed("unsupported HTTP version")),
    };
    let mut req = Request {
        method: method.to_string(),
        target: target.to_vec(),
        version: version.to_string(),
        headers: Vec::new(),
    };
    loop {
        let Some(line) = lines.next()? else {
            return incomplete;
        };
        if line.is_empty() {
            return Ok(Some((req, lines.pos)));
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
        // Controls but tab were refused: only spaces and tabs are trimmed.
        let value = value.trim_ascii().to_vec();
        // Token characters are ASCII, so the name is text.
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
    let te: Vec<&[u8]> = req.header_all("Transfer-Encoding").collect();
    let mut cl: Option<u64> = None;
    for v in req.header_all("Content-Length") {
        let v = std::str::from_utf8(v).map_err(|_| (400, "invalid Content-Length"))?;
        for part in v.split(',') {
            // Optional whitespace is spaces and tabs only (RFC 9110 §5.6.3).
            let part = part.trim_matches([' ', '\t']);
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err((400, "invalid Content-Length"));
            }
            let n: u64 = part.parse().map_err(|_| (400, "invalid Content-Length"))?;
            // Even equal duplicates (RFC 9110 §8.6 allows taking them): nginx
            // never sends two, so a second one is someone else's request.
            if cl.is_some() {
                return Err((400, "more than one Content-Length"));
            }
            cl = Some(n);
        }
    }
    if !te.is_empty() {
        if cl.is_some() {
            return Err((400, "both Transfer-Encoding and Content-Length"));
        }
        let codings: Vec<Vec<u8>> = te
            .iter()
            .flat_map(|v| v.split(|&b| b == b','))
            .map(|c| c.trim_ascii().to_ascii_lowercase())
            .filter(|c| !c.is_empty())
            .collect();
        return if codings == [b"chunked"] {
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
        parse_head(s.as_bytes(), 1024).map(|r| r.map(|(req, _)| req))
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
        let raw = "\r\nPOST /git/repo.git/git-upload-pack?x=1 HTTP/1.1\r\nHost: example.org\r\nContent-Length: 5\r\nX-Empty:\r\nX-Spaces:   a b  \r\n\r\nhello";
        let (r, n) = parse_head(raw.as_bytes(), 1024).unwrap().unwrap();
        assert_eq!(&raw[n..], "hello");
        assert_eq!(r.method, "POST");
        assert_eq!(r.target, b"/git/repo.git/git-upload-pack?x=1");
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

    /// obs-text (here Latin-1) in the target and in a header value is kept
    /// byte for byte; a framing value with it is no valid one.
    #[test]
    fn bytes_beyond_ascii_are_kept() {
        let raw =
            b"GET /caf\xe9?q=\xe9 HTTP/1.1\r\nX-Name: caf\xe9 \xff \r\nX-Request-ID: \xe9\r\n\r\n";
        let (r, _) = parse_head(raw, 1024).unwrap().unwrap();
        assert_eq!(r.target, b"/caf\xe9?q=\xe9");
        assert_eq!(r.target_text(), "/caf\u{fffd}?q=\u{fffd}");
        assert_eq!(r.header_bytes("x-name"), Some(&b"caf\xe9 \xff"[..]));
        assert_eq!(r.header("X-Request-ID"), None, "not text");
        let with = |k: &str, v: &[u8]| Request {
            headers: vec![(k.to_string(), v.to_vec())],
            ..r.clone()
        };
        assert!(framing(&with("Content-Length", b"5\xe9")).is_err());
        // UTF-8 but not ASCII whitespace (a no-break space) is no OWS.
        assert!(framing(&with("Content-Length", "5\u{a0}".as_bytes())).is_err());
        assert!(framing(&with("Content-Length", b" 5\t")).is_ok());
        assert!(framing(&with("Transfer-Encoding", b"chunked\xe9")).is_err());
        assert!(!keep_alive(&with("Connection", b"close")));
        assert!(keep_alive(&with("Connection", b"clos\xe9")));
    }

    #[test]
    fn incomplete_heads_wait_for_more() {
        let full = "GET /x HTTP/1.1\r\nHost: t\r\n\r\n";
        for cut in 0..full.len() {
            assert_eq!(head(&full[..cut]).unwrap(), None, "{:?}", &full[..cut]);
        }
        assert!(head(full).unwrap().is_some());
        // Completion is only possible where an empty line arrived.
        let b = full.as_bytes();
        assert!(!may_be_complete(&b[..b.len() - 1], 0));
        assert!(may_be_complete(b, b.len() - 1));
        assert!(may_be_complete(b"GET / HTTP/1.1\n\n", 15));
        assert!(!may_be_complete(b"GET / HTTP/1.1\r\nA: b\r\n", 10));
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
            "GET / HTTP/1.1\r\nA: x\r\r\n\r\n",
        ] {
            assert!(matches!(head(bad), Err(HeadError::Malformed(_))), "{bad:?}");
        }
    }

    #[test]
    fn head_size_limit() {
        let big = format!("GET / HTTP/1.1\r\nA: {}\r\n\r\n", "x".repeat(2000));
        assert!(matches!(head(&big), Err(HeadError::TooLarge)));
        // Too large even before its end arrived.
        assert!(matches!(head(&big[..1500]), Err(HeadError::TooLarge)));
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
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
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
            framing(&req(&[("Content-Length", "7")])).unwrap(),
            Framing::Length(7)
        );
        assert_eq!(
            framing(&req(&[("content-length", "7"), ("Content-Length", "7")]))
                .unwrap_err()
                .0,
            400
        );
        assert_eq!(
            framing(&req(&[("Content-Length", "7, 7")])).unwrap_err().0,
            400
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
}
