//! The worker's own report of what only it knows — requests served and the
//! request in flight — as one sd_notify `STATUS=` line, which systemd keeps
//! as the unit's `StatusText` (see README, "The worker contract"):
//!
//! ```text
//! STATUS=cgipool requests=12 idle
//! STATUS=cgipool requests=12 busy since=1733300000123 method=GET uri=/api/search?q=a%20b id=5f0c
//! ```
//!
//! Words are separated by single spaces; the first is `cgipool`, then
//! `requests=<n>` (served by this process, the one in flight not counted),
//! then `idle` or `busy`; a busy report carries `since=` (Unix time in
//! milliseconds when the request was taken), `method=`, `uri=` and,
//! optionally, `id=` (the `X-Request-ID`). Values are percent-encoded: every
//! byte outside `!`..`~`, and `%` itself, as `%XX`, so the line is printable
//! ASCII (systemd drops a STATUS= that is not valid UTF-8); `method=`
//! decodes to an HTTP token (RFC 9110: letters, digits and
//! ``!#$%&'*+-.^_`|~``) of at most 32 bytes. Unknown `key=value` words are
//! ignored (later versions may add some); anything else makes the whole
//! line unreadable, and watch then shows only what systemd and the kernel
//! know of the worker.
//!
//! This file depends on std only: the fuzz target `worker_status` compiles it
//! as is.

/// Longest `uri=` value a worker sends (encoded bytes): systemd takes
/// notification datagrams up to 4 KiB.
pub const MAX_URI: usize = 1024;
/// Longest method a report carries (bytes, decoded).
pub const MAX_METHOD: usize = 32;

/// A worker's parsed report.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Report {
    /// Requests this process finished (resets when systemd restarts it).
    pub requests: u64,
    /// The request in flight, None while idle.
    pub current: Option<Current>,
}

/// The request a busy worker is serving.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Current {
    pub method: String,
    pub uri: String,
    pub id: Option<String>,
    /// Unix time in milliseconds when the worker took the request.
    pub since_ms: u64,
}

/// Reads a `StatusText`; None for anything that is not a cgipool report.
pub fn parse(text: &str) -> Option<Report> {
    let mut words = text.split(' ');
    if words.next()? != "cgipool" {
        return None;
    }
    let requests = words.next()?.strip_prefix("requests=")?;
    let requests = digits(requests)?;
    let state = words.next()?;
    let mut current = match state {
        "idle" => None,
        "busy" => Some(Current::default()),
        _ => return None,
    };
    let (mut since, mut method, mut uri) = (None, None, None);
    for word in words {
        let (key, value) = word.split_once('=')?;
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
            return None;
        }
        match key {
            "since" => since = Some(digits(value)?),
            // Percent-encoded like every value; an HTTP method is a token,
            // which may hold `_`, `.`, `%` (sent as %25) and more.
            "method" => {
                let m = decode(value)?;
                if m.is_empty() || m.len() > MAX_METHOD || !m.bytes().all(is_token_char) {
                    return None;
                }
                method = Some(m);
            }
            "uri" => uri = Some(decode(value)?),
            "id" => {
                if let Some(c) = current.as_mut() {
                    c.id = Some(decode(value)?);
                }
            }
            _ => {}
        }
    }
    if let Some(c) = current.as_mut() {
        c.since_ms = since?;
        c.method = method?;
        c.uri = uri?;
    }
    Some(Report { requests, current })
}

/// A character of an HTTP token (RFC 9110 §5.6.2), what a method is made of.
fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn digits(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Percent-decodes a value; None on a bad escape or a raw byte outside
/// `!`..`~`. Bytes that are not UTF-8 (a URI may hold any) and control
/// characters read as U+FFFD.
pub fn decode(value: &str) -> Option<String> {
    let b = value.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = b.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                if !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
                    return None;
                }
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            c @ b'!'..=b'~' => {
                out.push(c);
                i += 1;
            }
            _ => return None,
        }
    }
    Some(
        String::from_utf8_lossy(&out)
            .chars()
            .map(|c| if c.is_control() { '\u{fffd}' } else { c })
            .collect(),
    )
}

/// Percent-encodes a value for a report: every byte outside `!`..`~`, and
/// `%`, as `%XX`; at most `max` encoded bytes, cut between characters.
pub fn encode(value: &str, max: usize) -> String {
    let mut out = String::with_capacity(value.len().min(max));
    let mut buf = [0u8; 4];
    for ch in value.chars() {
        let mut piece = String::new();
        for &c in ch.encode_utf8(&mut buf).as_bytes() {
            match c {
                b'!'..=b'~' if c != b'%' => piece.push(c as char),
                _ => piece.push_str(&format!("%{c:02X}")),
            }
        }
        if out.len() + piece.len() > max {
            break;
        }
        out.push_str(&piece);
    }
    out
}

/// The report line (without `STATUS=`) for a worker's state.
pub fn format(report: &Report) -> String {
    match &report.current {
        None => format!("cgipool requests={} idle", report.requests),
        Some(c) => {
            let mut line = format!(
                "cgipool requests={} busy since={} method={} uri={}",
                report.requests,
                c.since_ms,
                encode(&c.method, MAX_METHOD),
                encode(&c.uri, MAX_URI)
            );
            if let Some(id) = &c.id {
                line.push_str(" id=");
                line.push_str(&encode(id, 128));
            }
            line
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_idle_and_busy_reports() {
        assert_eq!(
            parse("cgipool requests=12 idle"),
            Some(Report {
                requests: 12,
                current: None
            })
        );
        let r = parse("cgipool requests=3 busy since=1733300000123 method=GET uri=/api/search?q=a%20b%25 id=5f0c future=1").unwrap();
        assert_eq!(r.requests, 3);
        let c = r.current.unwrap();
        assert_eq!(c.method, "GET");
        assert_eq!(c.uri, "/api/search?q=a b%");
        assert_eq!(c.id.as_deref(), Some("5f0c"));
        assert_eq!(c.since_ms, 1_733_300_000_123);
    }

    #[test]
    fn garbage_is_no_report() {
        for bad in [
            "",
            " ",
            "cgipool",
            "watching 3 pools",
            "cgipool requests= idle",
            "cgipool requests=-1 idle",
            "cgipool requests=1x idle",
            "cgipool requests=99999999999999999999999 idle",
            "cgipool requests=1 sleeping",
            "cgipool requests=1  idle",
            "cgipool requests=1 idle junk",
            "cgipool requests=1 idle =x",
            "cgipool requests=1 idle K=v",
            "cgipool requests=1 busy",
            "cgipool requests=1 busy since=1 method=GET",
            "cgipool requests=1 busy since=1 uri=/",
            "cgipool requests=1 busy method=GET uri=/",
            "cgipool requests=1 busy since=1 method=G\u{e9}T uri=/",
            "cgipool requests=1 busy since=1 method=G%C3%A9T uri=/",
            "cgipool requests=1 busy since=1 method=G%20T uri=/",
            "cgipool requests=1 busy since=1 method=%4 uri=/",
            "cgipool requests=1 busy since=1 method=%2D%2D%2D%2D%2D%2D%2D%2D%2D%2D%2D%2D%2D%2D%2D%2D%2D%2D%2D%2D%2D%2D%2D%2D%2D%2D%2D%2D%2D%2D%2D%2D%2D uri=/",
            "cgipool requests=1 busy since=1 method=GET uri=/%",
            "cgipool requests=1 busy since=1 method=GET uri=/%4",
            "cgipool requests=1 busy since=1 method=GET uri=/%zz",
            "cgipool requests=1 busy since=1 method=GET uri=/\u{e9}",
            "cgipool requests=1 busy since=1 method=GET uri=/\t",
            "Cgipool requests=1 idle",
            "cgipool requests=1\nidle",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn odd_bytes_in_a_uri_read_as_replacement_characters() {
        let r = parse("cgipool requests=1 busy since=1 method=GET uri=/%0a%ff%C3%A9").unwrap();
        assert_eq!(r.current.unwrap().uri, "/\u{fffd}\u{fffd}\u{e9}");
    }

    #[test]
    fn what_is_formatted_reads_back() {
        for uri in ["/", "/a b%c?d=\u{e9}&e", "/\u{1f600}", "/%zz"] {
            let r = Report {
                requests: 7,
                current: Some(Current {
                    method: "POST".into(),
                    uri: uri.into(),
                    id: Some("id with space".into()),
                    since_ms: 5,
                }),
            };
            let line = format(&r);
            assert!(line.bytes().all(|b| (b' '..=b'~').contains(&b)), "{line}");
            assert_eq!(parse(&line), Some(r));
        }
        let idle = Report {
            requests: 0,
            current: None,
        };
        assert_eq!(parse(&format(&idle)), Some(idle));
    }

    /// Any method nginx passes on (an HTTP token: letters, digits and
    /// ``!#$%&'*+-.^_`|~``) reads back as it was sent.
    #[test]
    fn every_token_method_reads_back() {
        for method in [
            "GET",
            "FOO_BAR",
            "A.B",
            "M-SEARCH",
            "X%Y",
            "!#$%&'*+-.^_`|~",
            "Z09az",
        ] {
            let r = Report {
                requests: 1,
                current: Some(Current {
                    method: method.into(),
                    uri: "/".into(),
                    id: None,
                    since_ms: 2,
                }),
            };
            let line = format(&r);
            assert_eq!(parse(&line), Some(r), "{line}");
        }
    }

    #[test]
    fn long_values_are_cut_at_an_escape_boundary() {
        let long = "\u{e9}".repeat(2000);
        let enc = encode(&long, MAX_URI);
        assert!(enc.len() <= MAX_URI);
        assert_eq!(enc.len() % 6, 0, "cut between characters");
        assert!(decode(&enc).is_some());
        let cut = encode(&"a".repeat(5000), MAX_URI);
        assert_eq!(cut.len(), MAX_URI);
    }
}
