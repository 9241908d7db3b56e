//! Parsing a CGI program's response header block (RFC 3875 §6).
//!
//! Field values and the Status reason phrase are kept as bytes: besides
//! ASCII they may carry obs-text (0x80-0xFF, e.g. a Latin-1 file name in
//! Content-Disposition; RFC 9110 §5.5, RFC 9112 §4), which reaches the
//! client unchanged.

/// What the header block asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A document (or a client redirect with a document): send it.
    Document,
    /// `Location: /local/path` without a `Status:` (§6.2.2): the server
    /// would have to re-run the request for another path. Refused.
    LocalRedirect(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub kind: Kind,
    pub status: u16,
    pub reason: Vec<u8>,
    /// Header fields to send on, in order, without Status, Content-Length
    /// and hop-by-hop fields.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The program's Content-Length, if it gave one.
    pub content_length: Option<u64>,
}

/// Where the header block ends in `buf`: the offset of the first body byte,
/// or None if the blank line has not been seen yet. Lines may end in LF or
/// CRLF (§6.3.3 says NL; programs use both).
pub fn header_end(buf: &[u8]) -> Option<usize> {
    let mut start = 0;
    while let Some(nl) = buf[start..].iter().position(|&b| b == b'\n') {
        let line = &buf[start..start + nl];
        if line.is_empty() || line == b"\r" {
            return Some(start + nl + 1);
        }
        start += nl + 1;
    }
    None
}

/// Fields a gateway must not forward: hop-by-hop (RFC 9110 §7.6.1) and the
/// framing the gateway decides itself.
const DROPPED: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
];

/// Parses the header block (everything before the blank line). The error
/// says what is wrong, for the log.
pub fn parse(block: &[u8]) -> Result<Head, String> {
    let mut head = Head {
        kind: Kind::Document,
        status: 200,
        reason: Vec::new(),
        headers: Vec::new(),
        content_length: None,
    };
    let mut status_given = false;
    let mut content_type = false;
    let mut location: Option<Vec<u8>> = None;
    let mut fields = 0;
    for (i, raw) in block.split(|&b| b == b'\n').enumerate() {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.is_empty() {
            continue;
        }
        let n = i + 1;
        if raw[0] == b' ' || raw[0] == b'\t' {
            return Err(format!(
                "header line {n} is a continuation line (not allowed)"
            ));
        }
        let Some(colon) = raw.iter().position(|&b| b == b':') else {
            return Err(format!("header line {n} has no colon: {:?}", preview(raw)));
        };
        let name = &raw[..colon];
        if !name.iter().all(|&b| super::http::is_token_char(b)) || name.is_empty() {
            return Err(format!(
                "header line {n} has an invalid field name: {:?}",
                preview(raw)
            ));
        }
        let value = &raw[colon + 1..];
        if value.iter().any(|&b| (b < b' ' && b != b'\t') || b == 0x7f) {
            return Err(format!(
                "header line {n} has a control character in its value"
            ));
        }
        // Token characters are ASCII, so this cannot fail.
        let name = String::from_utf8_lossy(name).into_owned();
        // Controls but tab were refused: only spaces and tabs are trimmed.
        let value = value.trim_ascii().to_vec();
        fields += 1;
        let lower = name.to_ascii_lowercase();
        match lower.as_str() {
            "status" => {
                if status_given {
                    return Err("more than one Status field".to_string());
                }
                status_given = true;
                let (code, reason) = match value.iter().position(|&b| b == b' ') {
                    Some(sp) => (&value[..sp], &value[sp + 1..]),
                    None => (value.as_slice(), &b""[..]),
                };
                let code = std::str::from_utf8(code)
                    .ok()
                    .filter(|c| c.len() == 3 && c.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|c| c.parse::<u16>().ok())
                    .filter(|c| (200..=599).contains(c))
                    .ok_or_else(|| {
                        format!(
                            "invalid Status {:?} (want e.g. \"404 Not Found\")",
                            preview(&value)
                        )
                    })?;
                head.status = code;
                head.reason = reason.trim_ascii().to_vec();
            }
            "content-length" => {
                let n = std::str::from_utf8(&value)
                    .ok()
                    .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|v| v.parse::<u64>().ok())
                    .ok_or_else(|| format!("invalid Content-Length {:?}", preview(&value)))?;
                if head.content_length.is_some_and(|c| c != n) {
                    return Err("conflicting Content-Length fields".to_string());
                }
                head.content_length = Some(n);
            }
            "location" => {
                if location.is_some() {
                    return Err("more than one Location field".to_string());
                }
                if value.is_empty() {
                    return Err("empty Location".to_string());
                }
                location = Some(value.clone());
                head.headers.push((name, value));
            }
            l if DROPPED.contains(&l) => {}
            _ => {
                if lower == "content-type" {
                    content_type = true;
                }
                head.headers.push((name, value));
            }
        }
    }
    if fields == 0 {
        return Err("empty header block".to_string());
    }
    if !(content_type || status_given || location.is_some()) {
        return Err("no Content-Type, Location or Status field".to_string());
    }
    if let Some(loc) = location {
        if loc.starts_with(b"/") && !loc.starts_with(b"//") {
            if !status_given {
                // Only logged (and refused): text is enough.
                head.kind = Kind::LocalRedirect(String::from_utf8_lossy(&loc).into_owned());
            }
        } else if !status_given {
            // §6.2.3/§6.2.4: a client redirect.
            head.status = 302;
        }
    }
    if head.reason.is_empty() {
        head.reason = super::http::reason(head.status).as_bytes().to_vec();
    }
    Ok(head)
}

fn preview(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(&b[..b.len().min(60)]).into_owned();
    if b.len() > 60 {
        s + "…"
    } else {
        s
    }
}

/// True for statuses that never carry a body.
pub fn bodiless(status: u16) -> bool {
    status == 204 || status == 304 || (100..200).contains(&status)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> Head {
        match parse(s.as_bytes()) {
            Ok(h) => h,
            Err(e) => panic!("{s:?}: {e}"),
        }
    }

    fn fields(f: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        f.iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    fn err(s: &str) -> String {
        match parse(s.as_bytes()) {
            Ok(h) => panic!("{s:?} parsed: {h:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn finds_the_blank_line() {
        assert_eq!(header_end(b"Content-Type: text/plain\n\nbody"), Some(26));
        assert_eq!(
            header_end(b"Content-Type: text/plain\r\n\r\nbody"),
            Some(28)
        );
        assert_eq!(header_end(b"A: b\r\n\nbody"), Some(7));
        assert_eq!(header_end(b"\nbody"), Some(1));
        assert_eq!(header_end(b"Content-Type: text/plain\n"), None);
        assert_eq!(header_end(b"Content-Type: text/plain\r\n\r"), None);
        assert_eq!(header_end(b""), None);
    }

    #[test]
    fn document() {
        let h = ok("Content-Type: text/html; charset=utf-8\nX-Thing:  a b \nSet-Cookie: a=1\nSet-Cookie: b=2\nContent-Length: 12\nConnection: keep-alive\nTransfer-Encoding: chunked\n");
        assert_eq!(h.kind, Kind::Document);
        assert_eq!((h.status, &h.reason[..]), (200, &b"OK"[..]));
        assert_eq!(h.content_length, Some(12));
        assert_eq!(
            h.headers,
            fields(&[
                ("Content-Type", "text/html; charset=utf-8"),
                ("X-Thing", "a b"),
                ("Set-Cookie", "a=1"),
                ("Set-Cookie", "b=2"),
            ])
        );
    }

    #[test]
    fn status() {
        let h = ok("Status: 418 I'm a teapot\r\nContent-Type: text/plain\r\n");
        assert_eq!((h.status, &h.reason[..]), (418, &b"I'm a teapot"[..]));
        let h = ok("Status: 404\n");
        assert_eq!((h.status, &h.reason[..]), (404, &b"Not Found"[..]));
        assert!(h.headers.is_empty());
        let h = ok("status: 599 Custom\n");
        assert_eq!(h.status, 599);
        for bad in [
            "Status: 99 x\n",
            "Status: 2000\n",
            "Status: abc\n",
            "Status: 100 Continue\n",
            "Status: +20 x\n",
            "Status: \u{e9}00 x\n",
            "Status: 600 x\n",
            "Status: 200\nStatus: 201\n",
        ] {
            assert!(!err(bad).is_empty(), "{bad}");
        }
    }

    #[test]
    fn redirects() {
        let h = ok("Location: https://example.org/x?y\n");
        assert_eq!((h.status, h.kind.clone()), (302, Kind::Document));
        assert_eq!(
            h.headers,
            fields(&[("Location", "https://example.org/x?y")])
        );
        // Client redirect with a document and its own status.
        let h = ok("Status: 301 Moved\nLocation: http://x/\nContent-Type: text/html\n");
        assert_eq!(h.status, 301);
        // A local redirect is reported as such …
        let h = ok("Location: /other/path?q=1\n");
        assert_eq!(h.kind, Kind::LocalRedirect("/other/path?q=1".to_string()));
        // … unless the program says which status it wants.
        let h = ok("Status: 303 See Other\nLocation: /done\n");
        assert_eq!((h.status, h.kind), (303, Kind::Document));
        // Scheme-relative is a client redirect.
        assert_eq!(ok("Location: //host/x\n").status, 302);
        assert!(err("Location: a\nLocation: b\n").contains("more than one"));
    }

    #[test]
    fn garbage_is_refused_with_a_reason() {
        assert!(err("hello world\n").contains("no colon"));
        assert!(err("<html><body>oops</body></html>\n").contains("no colon"));
        assert!(err("X-Only: 1\n").contains("no Content-Type, Location or Status"));
        assert!(err("").contains("empty header block"));
        assert!(err("Content-Type: text/plain\n folded\n").contains("continuation"));
        assert!(err("Bad Name: x\n").contains("invalid field name"));
        assert!(err("Content-Type: a\u{1}b\n").contains("control character"));
        assert!(err("Content-Type: text/plain\nContent-Length: 1x\n").contains("Content-Length"));
        assert!(
            err("Content-Type: text/plain\nContent-Length: 1\nContent-Length: 2\n")
                .contains("conflicting")
        );
    }

    /// obs-text (here Latin-1) in a value and in the reason phrase is kept
    /// byte for byte; it is no Content-Length.
    #[test]
    fn bytes_beyond_ascii_are_kept() {
        let h = parse(b"Status: 200 Caf\xe9\nContent-Type: text/plain\nX-Name: caf\xe9 \xff \n")
            .expect("parsed");
        assert_eq!(h.reason, b"Caf\xe9");
        assert_eq!(
            h.headers[1],
            ("X-Name".to_string(), b"caf\xe9 \xff".to_vec())
        );
        assert!(parse(b"Content-Type: text/plain\nContent-Length: 1\xe9\n").is_err());
    }

    #[test]
    fn bodiless_statuses() {
        assert!(bodiless(204) && bodiless(304) && !bodiless(200) && !bodiless(404));
    }
}
