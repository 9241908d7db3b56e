//! One request, from its complete head to the start of its program: the
//! request's deadline, the body framing and limit (a chunked body decoded
//! into a bounded spool file), the meta-variables, the program's process;
//! and the gateway's own short answers (refusals, 413, 504, ...).

use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::chunked::ChunkedReader;
use super::conns::Conn;
use super::run::Run;
use super::sock::{Sock, IO_BUF};
use super::{http, meta, Gateway};

/// A request id fit for a log line.
fn log_id(s: Option<&str>) -> String {
    match s {
        Some(s) if !s.is_empty() => s
            .chars()
            .take(64)
            .map(|c| if c.is_ascii_graphic() { c } else { '?' })
            .collect(),
        _ => "-".to_string(),
    }
}

/// What happened to one request, for its log line.
pub(super) struct Outcome {
    pub status: u16,
    pub bytes: u64,
    pub note: Vec<String>,
    /// The program's own response was sent completely, so the connection
    /// can carry the next request (if the request allows it).
    pub complete: bool,
    /// The response was delimited by closing the connection (HTTP/1.0
    /// without a Content-Length).
    pub close: bool,
    /// The response said `Connection: close` because the gateway is
    /// stopping. One that said keep-alive is kept even then: nginx may
    /// already be sending the next request on it (see [`super::conns`]).
    pub stopping: bool,
}

impl Outcome {
    /// Logged even without the access log: a 5xx, or anything noted
    /// besides a clean exit (a refusal, a timeout, an abort, a non-zero
    /// exit, processes left behind).
    pub fn went_wrong(&self) -> bool {
        self.status >= 500 || self.note.iter().any(|n| n != "exit=0")
    }

    pub fn new(status: u16) -> Self {
        Outcome {
            status,
            bytes: 0,
            note: Vec::new(),
            complete: false,
            close: false,
            stopping: false,
        }
    }
}

/// Writes a small complete response from the gateway itself; the
/// connection is closed after it.
pub(super) fn simple(
    out: &mut impl Write,
    worker: &str,
    status: u16,
    msg: &str,
) -> io::Result<u64> {
    let body = format!("{status} {}: {msg}\n", http::reason(status));
    write!(
        out,
        "HTTP/1.1 {status} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nX-Cgipool-Worker: {worker}\r\nConnection: close\r\n\r\n{body}",
        http::reason(status),
        body.len()
    )?;
    out.flush()?;
    Ok(body.len() as u64)
}

/// The request body, as the program's stdin will get it.
pub(super) enum Body {
    Empty,
    /// Content-Length bytes, still on the connection.
    Socket(u64),
    /// A chunked body, already decoded into a temporary file.
    File(File),
}

/// Why a chunked body was not spooled.
enum Spool {
    /// Reading or decoding the client's body failed: a malformed or cut
    /// body (400), or the request's deadline (504).
    Body(io::Error),
    /// The temporary file could not be created or written (disk full, EIO,
    /// a file size limit): the server's fault (500).
    File(io::Error),
}

/// How long the gateway's own answer to a refused head may take to send.
const REFUSE_SEND: Duration = Duration::from_secs(1);

impl Gateway {
    /// Answers a head the accept loop refused (400, 408, 431); the
    /// connection is closed after it.
    pub(super) fn refuse_head(&self, conn: &mut Conn, status: u16, why: &str) {
        conn.set_deadline(Instant::now() + REFUSE_SEND);
        let _ = simple(&mut conn.out, &self.worker, status, why);
        eprintln!("- conn={}#{}: {why}: {status}", conn.id, conn.served + 1);
    }

    /// Serves one request from `conn`, whose head is `req`; true when the
    /// connection can carry the next one. The request's one deadline starts
    /// now and covers every read and write on the connection.
    pub(super) fn serve(&self, conn: &mut Conn, req: &http::Request) -> bool {
        let started = Instant::now();
        let deadline = started + self.timeout;
        conn.set_deadline(deadline);
        let rid = log_id(req.header("X-Request-ID"));
        let keep_alive = http::keep_alive(req) && !conn.peer_closed;
        let outcome = self.handle(req, &rid, keep_alive, deadline, conn);
        let flushed = conn.out.flush().is_ok();
        let mut line = format!(
            "{rid} {} {} {} {}B {}ms conn={}#{}",
            req.method,
            req.target_text(),
            outcome.status,
            outcome.bytes,
            started.elapsed().as_millis(),
            conn.id,
            conn.served + 1
        );
        for n in &outcome.note {
            line.push(' ');
            line.push_str(n);
        }
        if self.access_log || outcome.went_wrong() {
            // One write: eprintln! writes the line and its newline apart
            // (stderr is unbuffered), two syscalls per request.
            line.push('\n');
            let _ = std::io::stderr().write_all(line.as_bytes());
        }
        keep_alive
            && outcome.complete
            && !outcome.close
            && !outcome.stopping
            && flushed
            && conn.reader.is_some()
    }

    /// Everything after the head: body, program, response.
    fn handle(
        &self,
        req: &http::Request,
        rid: &str,
        keep_alive: bool,
        deadline: Instant,
        conn: &mut Conn,
    ) -> Outcome {
        let refuse = |out: &mut BufWriter<Sock>, status: u16, msg: &str| {
            let mut o = Outcome::new(status);
            o.bytes = simple(out, &self.worker, status, msg).unwrap_or(0);
            o.note.push(format!("({msg})"));
            o
        };
        let framing = match http::framing(req) {
            Ok(f) => f,
            Err((status, msg)) => return refuse(&mut conn.out, status, msg),
        };
        let too_big = |n: u64| n > self.body_limit;
        let (body, length) = match framing {
            http::Framing::None => (Body::Empty, None),
            http::Framing::Length(n) if too_big(n) => {
                return refuse(
                    &mut conn.out,
                    413,
                    "request body larger than the pool's body_limit",
                )
            }
            http::Framing::Length(0) => (Body::Empty, Some(0)),
            http::Framing::Length(n) => (Body::Socket(n), Some(n)),
            http::Framing::Chunked => match self.spool_chunked(conn) {
                Ok(Some((f, n))) => (Body::File(f), Some(n)),
                Ok(None) => {
                    return refuse(
                        &mut conn.out,
                        413,
                        "request body larger than the pool's body_limit",
                    )
                }
                // The request's deadline, as for a Content-Length body.
                Err(Spool::Body(e)) if e.kind() == io::ErrorKind::TimedOut => {
                    let mut o = refuse(
                        &mut conn.out,
                        504,
                        "the request body did not arrive in time",
                    );
                    o.note.push("timeout".to_string());
                    return o;
                }
                Err(Spool::Body(e)) => {
                    return refuse(&mut conn.out, 400, &format!("bad chunked body: {e}"))
                }
                // The client sent nothing wrong: the cause is logged here,
                // the client only learns that the server failed.
                Err(Spool::File(e)) => {
                    eprintln!(
                        "{rid} server error: the chunked request body could not be stored in a temporary file in {}: {e}",
                        std::env::temp_dir().display()
                    );
                    return refuse(&mut conn.out, 500, "the request body could not be stored");
                }
            },
        };
        let program = self.program.to_string_lossy();
        let cx = meta::Context {
            route: &self.route,
            document_root: &self.document_root,
            program: &program,
        };
        let vars = match meta::variables(req, &cx, length) {
            Ok(v) => v,
            Err((status, msg)) => return refuse(&mut conn.out, status, msg),
        };
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .envs(vars)
            .stdin(match body {
                Body::Empty => Stdio::null(),
                _ => Stdio::piped(),
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{rid} cannot start {program}: {e}");
                return refuse(&mut conn.out, 502, "the CGI program could not be started");
            }
        };
        Run {
            gw: self,
            rid,
            req,
            keep_alive,
            deadline,
        }
        .run(&mut child, body, conn)
    }

    /// Decodes a chunked body into an anonymous temporary file (in $TMPDIR,
    /// the worker's private /tmp), never more than the body limit. Ok(None):
    /// larger than the limit (413; the rest stays unread and the connection
    /// is closed).
    fn spool_chunked(&self, conn: &mut Conn) -> Result<Option<(File, u64)>, Spool> {
        let reader = conn
            .reader
            .as_mut()
            .ok_or_else(|| Spool::File(io::Error::other("the connection has no reader")))?;
        let mut f = tempfile::tempfile().map_err(Spool::File)?;
        let mut body = ChunkedReader::new(reader).take(self.body_limit + 1);
        let mut buf = vec![0u8; IO_BUF];
        let mut n: u64 = 0;
        loop {
            let got = match body.read(&mut buf) {
                Ok(0) => break,
                Ok(got) => got,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Spool::Body(e)),
            };
            f.write_all(&buf[..got]).map_err(Spool::File)?;
            n += got as u64;
        }
        if n > self.body_limit {
            conn.reader = None;
            return Ok(None);
        }
        f.rewind().map_err(Spool::File)?;
        Ok(Some((f, n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_ids() {
        assert_eq!(log_id(None), "-");
        assert_eq!(log_id(Some("")), "-");
        assert_eq!(log_id(Some("abc 1\n")), "abc?1?");
        assert_eq!(log_id(Some(&"x".repeat(100))).len(), 64);
    }

    #[test]
    fn what_is_logged_without_the_access_log() {
        let mut o = Outcome::new(200);
        o.note.push("exit=0".into());
        assert!(!o.went_wrong());
        o.status = 404;
        assert!(!o.went_wrong(), "the program's own 4xx is not an error");
        o.status = 502;
        assert!(o.went_wrong());
        for note in [
            "exit=1",
            "signal=9",
            "timeout",
            "killed=2",
            "(bad chunked body: x)",
        ] {
            let mut o = Outcome::new(200);
            o.note.push(note.into());
            assert!(o.went_wrong(), "{note}");
        }
    }
}
