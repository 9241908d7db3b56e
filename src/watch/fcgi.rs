//! The FastCGI client side that watch's health probe needs: one
//! `FCGI_RESPONDER` request (BEGIN_REQUEST, PARAMS, empty STDIN) and a
//! bounded reader of the answer's records (STDOUT until its CGI header
//! block says the status, END_REQUEST). Pure byte handling, no I/O, no
//! panics on any input: fuzz/fuzz_targets/fcgi_response.rs runs it on
//! garbage (the file is compiled there on its own, so it uses only std).

/// FastCGI 1.0 record types this client writes or reads.
pub const BEGIN_REQUEST: u8 = 1;
pub const END_REQUEST: u8 = 3;
pub const PARAMS: u8 = 4;
pub const STDIN: u8 = 5;
pub const STDOUT: u8 = 6;

/// The request id of the probe's single request.
const REQUEST_ID: u16 = 1;
const RESPONDER: u16 = 1;
/// Record header length.
const HEADER: usize = 8;
/// The longest record: header, 65,535 bytes of content, 255 of padding.
/// The reader never holds more than this and its STDOUT limit.
pub const MAX_RECORD: usize = HEADER + 65535 + 255;

/// One request: `params` as name-value pairs, no body.
pub fn encode_request(params: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    // BEGIN_REQUEST: role RESPONDER, flags 0 (close the connection after).
    let mut begin = [0u8; 8];
    begin[..2].copy_from_slice(&RESPONDER.to_be_bytes());
    record(&mut out, BEGIN_REQUEST, &begin);
    let mut body = Vec::new();
    for (k, v) in params {
        nv_len(&mut body, k.len());
        nv_len(&mut body, v.len());
        body.extend_from_slice(k.as_bytes());
        body.extend_from_slice(v.as_bytes());
    }
    for chunk in body.chunks(65535) {
        record(&mut out, PARAMS, chunk);
    }
    record(&mut out, PARAMS, &[]);
    record(&mut out, STDIN, &[]);
    out
}

fn nv_len(out: &mut Vec<u8>, n: usize) {
    if n < 128 {
        out.push(n as u8);
    } else {
        out.extend_from_slice(&((n as u32 & 0x7fff_ffff) | 0x8000_0000).to_be_bytes());
    }
}

fn record(out: &mut Vec<u8>, kind: u8, content: &[u8]) {
    let len = content.len().min(65535) as u16;
    let pad = (8 - (len as usize % 8)) % 8;
    out.extend_from_slice(&[1, kind]);
    out.extend_from_slice(&REQUEST_ID.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&[pad as u8, 0]);
    out.extend_from_slice(&content[..len as usize]);
    out.extend(std::iter::repeat_n(0u8, pad));
}

/// One record taken from the front of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct Record<'a> {
    pub kind: u8,
    pub request_id: u16,
    pub content: &'a [u8],
    /// Bytes the record took in the buffer (header, content, padding).
    pub len: usize,
}

/// The first record of `buf`: Ok(None) until it is complete, Err when the
/// bytes are not FastCGI (a version other than 1).
pub fn parse_record(buf: &[u8]) -> Result<Option<Record<'_>>, String> {
    let Some(h) = buf.get(..HEADER) else {
        return Ok(None);
    };
    if h[0] != 1 {
        return Err(format!("not a FastCGI record (version {})", h[0]));
    }
    let content_len = usize::from(u16::from_be_bytes([h[4], h[5]]));
    let len = HEADER + content_len + usize::from(h[6]);
    let Some(content) = buf.get(HEADER..HEADER + content_len) else {
        return Ok(None);
    };
    if buf.len() < len {
        return Ok(None);
    }
    Ok(Some(Record {
        kind: h[1],
        request_id: u16::from_be_bytes([h[2], h[3]]),
        content,
        len,
    }))
}

/// What the answer said so far.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Response {
    /// The CGI status (200 when the header block has no `Status:`), once
    /// the header block is complete.
    pub status: Option<u16>,
    /// END_REQUEST's protocol status (0: request complete), once seen.
    pub ended: Option<u8>,
    /// The start of STDOUT, up to the limit given to [`Reader::new`].
    head: Vec<u8>,
    /// Bytes not yet parsed as a record.
    pending: Vec<u8>,
}

/// Feeds bytes of an answer, keeping at most `limit` bytes of STDOUT and
/// of a partial record.
pub struct Reader {
    limit: usize,
    pub response: Response,
}

impl Reader {
    pub fn new(limit: usize) -> Reader {
        Reader {
            limit,
            response: Response::default(),
        }
    }

    /// Takes the next bytes read from the connection. Ok(true) once the
    /// status is known or the request ended; Err on bytes that are not a
    /// FastCGI answer or on a header block over the limit.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<bool, String> {
        let r = &mut self.response;
        r.pending.extend_from_slice(bytes);
        let mut used = 0;
        // Stop at the first answer: what follows it does not matter.
        while r.status.is_none() && r.ended.is_none() {
            let Some(rec) = parse_record(&r.pending[used..])? else {
                break;
            };
            used += rec.len;
            if rec.request_id != REQUEST_ID {
                continue;
            }
            match rec.kind {
                STDOUT => {
                    let room = self.limit.saturating_sub(r.head.len());
                    let take = rec.content.len().min(room);
                    r.head.extend_from_slice(&rec.content[..take]);
                    r.status = cgi_status(&r.head)?;
                    if r.status.is_none() && r.head.len() >= self.limit {
                        return Err(format!(
                            "no CGI header block in the first {} bytes",
                            self.limit
                        ));
                    }
                }
                END_REQUEST => {
                    r.ended = Some(rec.content.get(4).copied().unwrap_or(255));
                }
                _ => {}
            }
        }
        if r.status.is_some() || r.ended.is_some() {
            r.pending.clear();
        } else {
            r.pending.drain(..used);
        }
        // What is left is part of one record, which is at most MAX_RECORD.
        if r.pending.len() >= MAX_RECORD {
            return Err("a FastCGI record longer than the protocol allows".into());
        }
        Ok(r.status.is_some() || r.ended.is_some())
    }
}

/// The status of a complete CGI header block at the start of `stdout`:
/// Ok(None) while it is incomplete, 200 without a `Status:` field.
pub fn cgi_status(stdout: &[u8]) -> Result<Option<u16>, String> {
    // An empty header block is a lone line end.
    if stdout.starts_with(b"\r\n") || stdout.starts_with(b"\n") {
        return Ok(Some(200));
    }
    let end = find(stdout, b"\r\n\r\n")
        .map(|i| i + 2)
        .or_else(|| find(stdout, b"\n\n").map(|i| i + 1));
    let Some(end) = end else {
        return Ok(None);
    };
    for line in stdout[..end].split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        if !line[..colon].eq_ignore_ascii_case(b"status") {
            continue;
        }
        let value = std::str::from_utf8(&line[colon + 1..])
            .map_err(|_| "a Status field that is not text".to_string())?;
        let code = value
            .trim_start()
            .get(..3)
            .and_then(|c| c.parse::<u16>().ok());
        return match code {
            Some(c) if (100..600).contains(&c) => Ok(Some(c)),
            _ => Err(format!("bad Status field {value:?}")),
        };
    }
    Ok(Some(200))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(stdout: &[&[u8]], end: u8) -> Vec<u8> {
        let mut out = Vec::new();
        for s in stdout {
            record(&mut out, STDOUT, s);
        }
        record(&mut out, STDOUT, &[]);
        record(&mut out, END_REQUEST, &[0, 0, 0, 0, end, 0, 0, 0]);
        out
    }

    #[test]
    fn request_bytes() {
        let req = encode_request(&[("A", "b"), ("LONG", &"x".repeat(200))]);
        // BEGIN_REQUEST: version 1, type 1, id 1, 8 bytes, role 1.
        assert_eq!(
            &req[..16],
            &[1, 1, 0, 1, 0, 8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0]
        );
        let params = parse_record(&req[16..]).unwrap().unwrap();
        assert_eq!(params.kind, PARAMS);
        assert_eq!(params.len % 8, 0);
        // A short name/value pair, then a 4-byte length for the long value.
        assert_eq!(&params.content[..4], &[1, 1, b'A', b'b']);
        assert_eq!(&params.content[4..9], &[4, 0x80, 0, 0, 200]);
        let rest = &req[16 + params.len..];
        assert_eq!(rest, &[1, 4, 0, 1, 0, 0, 0, 0, 1, 5, 0, 1, 0, 0, 0, 0]);
    }

    #[test]
    fn statuses() {
        assert_eq!(
            cgi_status(b"Content-type: text/html\r\n\r\nhi"),
            Ok(Some(200))
        );
        assert_eq!(
            cgi_status(b"Status: 503 Busy\r\nX: y\r\n\r\n"),
            Ok(Some(503))
        );
        assert_eq!(cgi_status(b"status:404\n\n"), Ok(Some(404)));
        assert_eq!(cgi_status(b"Status: 200 OK\r\n"), Ok(None));
        assert!(cgi_status(b"Status: abc\r\n\r\n").is_err());
        assert!(cgi_status(b"Status: 99\r\n\r\n").is_err());
    }

    #[test]
    fn reads_answers_in_any_split() {
        let a = answer(
            &[
                b"Status: 500 Oops\r\n",
                b"Content-Type: text/plain\r\n\r\nbody",
            ],
            0,
        );
        for split in 0..a.len() {
            let mut r = Reader::new(4096);
            let first = r.feed(&a[..split]).unwrap();
            let done = first || r.feed(&a[split..]).unwrap();
            assert!(done, "split {split}");
            assert_eq!(r.response.status, Some(500), "split {split}");
        }
        // Only END_REQUEST (an application that wrote nothing).
        let mut r = Reader::new(4096);
        assert!(r.feed(&answer(&[], 0)).unwrap());
        assert_eq!((r.response.status, r.response.ended), (None, Some(0)));
    }

    #[test]
    fn refuses_garbage_and_bounds_memory() {
        let mut r = Reader::new(4096);
        assert!(r.feed(b"HTTP/1.1 200 OK\r\n\r\n").is_err());
        // A header block that never ends.
        let mut r = Reader::new(64);
        let a = answer(&[&[b'x'; 100]], 0);
        assert!(r.feed(&a).unwrap_err().contains("no CGI header block"));
        // The header block and a body in one large record: the head is cut
        // at the limit, the status read from it.
        let mut r = Reader::new(64);
        let mut body = b"Status: 201 Made\r\n\r\n".to_vec();
        body.extend(std::iter::repeat_n(b'z', 60000));
        assert!(r.feed(&answer(&[&body], 0)).unwrap());
        assert_eq!(r.response.status, Some(201));
        // Other request ids and unknown types are skipped.
        let mut other = Vec::new();
        other.extend_from_slice(&[1, STDOUT, 0, 9, 0, 2, 6, 0, b'x', b'y', 0, 0, 0, 0, 0, 0]);
        other.extend(answer(&[b"\r\n"], 0));
        let mut r = Reader::new(64);
        assert!(r.feed(&other).unwrap());
        assert_eq!(r.response.status, Some(200));
    }
}
