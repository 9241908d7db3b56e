//! One request's run: the program's output turned into the response
//! (header block, then the body streamed with Content-Length, chunked, or
//! to the end of the connection for HTTP/1.0), its stdin fed from its own
//! thread, the deadline, and the cleanup after it (every descendant killed
//! and reaped).
//!
//! The deadline holds on both sides: [`ProgramOutput`] kills the program
//! when it passes while the gateway waits for output, and every write to
//! the client fails once it passes ([`super::sock`]), so a client that
//! stops reading is cut at the deadline too. A request body that ends early
//! kills the program too ([`super::feed`]), before its stdin ends.

use std::io::{self, BufWriter, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, ExitStatus};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use super::chunked::ChunkedWriter;
use super::conns::Conn;
use super::feed::{self, Feed};
use super::output::{ProgramOutput, KILL_GRACE};
use super::serve::{simple, Body, Outcome};
use super::signals::stopping;
use super::sock::{In, Sock, IO_BUF};
use super::{http, reap, response, Gateway};

/// One running program.
pub(super) struct Run<'a> {
    pub gw: &'a Gateway,
    pub rid: &'a str,
    pub req: &'a http::Request,
    /// The response may leave the connection open.
    pub keep_alive: bool,
    /// The request's one deadline (set on the connection too).
    pub deadline: Instant,
}

/// How the response to the client ended.
enum Sent {
    /// Complete.
    Done,
    /// Cut short, or the request aborted: the connection must close (a
    /// response begun ends without its proper end), and the log says why.
    Aborted(String),
}

/// How long, after the response, the connection waits for the body feeder
/// to finish reading the request body (nginx has sent it all by then).
const FEED_GRACE: Duration = Duration::from_secs(1);

/// How long what the program wrote may wait in the connection's buffer
/// before it is flushed to the client ([`pump`]): the streaming delay.
/// Short enough for a progress page; long enough that the program's end
/// (nearly always within it) comes first, so a program that writes its
/// output and exits gets its response in one write, and long enough that
/// the wait's timer is not a cost of its own: measured on a 2-CPU VM (HZ
/// 250), a poll with a timeout below the 4 ms tick cost 1-4 us more CPU
/// than one of seconds (the timer is reprogrammed each time), and a look
/// that does not wait first (Apache's mod_cgi) found most `hello_cgi`
/// requests not yet ended: a poll and a write more for them, 11 us of the
/// gateway's CPU per request. With 10 ms, neither (bench/host CPU per
/// request the same as without streaming).
const FLUSH_AFTER: Duration = Duration::from_millis(10);

impl Run<'_> {
    pub fn run(&self, child: &mut Child, body: Body, conn: &mut Conn) -> Outcome {
        let deadline = self.deadline;
        // The body goes to stdin from its own thread ([`feed`]). A body
        // read from the connection comes back with its reader.
        let (fed_tx, fed_rx) = mpsc::channel::<Option<In>>();
        let mut feed_state: Option<Arc<Feed>> = None;
        let feeding = match (child.stdin.take(), body) {
            (Some(sin), Body::Socket(n)) => conn.reader.take().and_then(|reader| {
                let shared = Arc::new(Feed::default());
                let theirs = Arc::clone(&shared);
                feed_state = Some(shared);
                thread::Builder::new()
                    .name("cgi-stdin".into())
                    .spawn(move || {
                        let _ = fed_tx.send(feed::from_connection(reader, n, sin, &theirs));
                    })
                    .ok()
            }),
            (Some(sin), Body::File(f)) => thread::Builder::new()
                .name("cgi-stdin".into())
                .spawn(move || feed::whole(f, sin))
                .ok(),
            _ => None,
        };
        let mut output = ProgramOutput::new(
            child.stdout.take(),
            child.stderr.take(),
            self.rid,
            deadline,
            feed_state.clone(),
        );
        let mut outcome = Outcome::new(0);
        let sent = self.respond(&mut output, &mut conn.out, &mut outcome);
        if let Sent::Aborted(why) = &sent {
            outcome.note.push(format!("aborted: {why}"));
            outcome.complete = false;
            output.kill_all();
        }
        let _ = conn.out.flush();

        // A response cut short by the timeout ends the connection; one sent
        // in full before it does not (nginx may already reuse it), even if
        // the program then runs into the timeout.
        if output.timed_out() {
            outcome.complete = false;
        }
        let status = output.wait_exit(child);
        if output.timed_out() {
            outcome.note.push("timeout".to_string());
        }
        let mut stuck = self.gw.stuck.borrow_mut();
        match status {
            Ok(Some(st)) => outcome.note.push(describe_exit(st)),
            Ok(None) => {
                // Its std handle is dropped unwaited: it stays a child of
                // the gateway, reaped once it exits (reap::Stuck).
                eprintln!(
                    "{} the CGI program (pid {}) did not exit within {:?} of SIGKILL; serving on, it is reaped once it exits",
                    self.rid,
                    child.id(),
                    KILL_GRACE
                );
                outcome.note.push(format!("stuck={}", child.id()));
                if let Ok(pid) = i32::try_from(child.id()) {
                    stuck.add(pid);
                }
            }
            Err(_) => {}
        }
        // The common case: the program left nothing behind, no scan needed.
        if !reap::no_children_left(&mut stuck) {
            let leftover = stuck.others(reap::descendants()).len();
            if leftover > 0 {
                outcome.note.push(format!("killed={leftover}"));
            }
            let survivors = reap::kill_and_reap_all(Duration::from_secs(10), &mut stuck);
            if !survivors.is_empty() {
                outcome.note.push(format!("UNKILLABLE={survivors:?}"));
            }
        }
        drop(stuck);
        output.finish_stderr(Duration::from_secs(1));
        // Every process of the request is gone: the feeder kills nothing
        // from now on. A body cut short after the program's response was
        // sent (a program that did not read it) still ends the connection.
        if let Some(cut) = feed_state.as_ref().and_then(|f| f.over()) {
            outcome.complete = false;
            if !outcome.note.iter().any(|n| n.starts_with("aborted: ")) && !cut.timeout {
                outcome.note.push(format!("aborted: {cut}"));
            }
        }
        // A body from the connection: the reader comes back once the body
        // was read to its end; otherwise the connection is closed (which
        // also ends a feeder still waiting for nginx).
        if feeding.is_some() && conn.reader.is_none() {
            conn.reader = fed_rx.recv_timeout(FEED_GRACE).ok().flatten();
        }
        outcome
    }

    /// The gateway's own answer instead of the program's (whose output is
    /// dropped); the connection closes after it.
    fn instead(&self, out: &mut impl Write, o: &mut Outcome, status: u16, msg: &str) -> Sent {
        o.status = status;
        o.bytes = simple(out, &self.gw.worker, status, msg).unwrap_or(0);
        Sent::Done
    }

    /// The request body ended early and the program was killed for it
    /// before it answered: 400 (a client that only shut its side reads it)
    /// and the request is logged as aborted.
    fn body_cut_short(&self, out: &mut impl Write, o: &mut Outcome, cut: feed::Cut) -> Sent {
        let msg = format!("the {cut} (Content-Length)");
        self.instead(out, o, 400, &msg);
        Sent::Aborted(cut.to_string())
    }

    /// Reads the program's output and sends the response.
    fn respond(
        &self,
        stdout: &mut ProgramOutput<'_>,
        out: &mut BufWriter<Sock>,
        o: &mut Outcome,
    ) -> Sent {
        let worker = &self.gw.worker;
        let mut buf: Vec<u8> = Vec::with_capacity(8192);
        let mut chunk = vec![0u8; IO_BUF];
        if self.gw.nph {
            // Non-parsed headers: the program speaks HTTP itself.
            o.status = 200;
            if let Err(e) = pump(&[], stdout, &mut chunk, out, None, o) {
                return Sent::Aborted(e);
            }
            if stdout.timed_out() && o.bytes == 0 {
                return self.instead(out, o, 504, "the CGI program timed out");
            }
            if let Some(cut) = stdout.body_cut().filter(|_| o.bytes == 0) {
                return self.body_cut_short(out, o, cut);
            }
            return check_end(stdout);
        }

        // The header block: at most max_header bytes, its blank line
        // included, checked after every read (one read may bring up to
        // IO_BUF bytes more).
        let max = self.gw.max_header;
        let too_large = || format!("header block larger than {max} bytes");
        let head_end = loop {
            if let Some(e) = response::header_end(&buf) {
                break if e > max { Err(too_large()) } else { Ok(e) };
            }
            if buf.len() > max {
                break Err(too_large());
            }
            match stdout.read(&mut chunk) {
                Ok(0) if buf.is_empty() => break Err("no output at all".to_string()),
                Ok(0) => {
                    break Err(
                        "output ended before the blank line ending the header block".to_string()
                    )
                }
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => break Err(format!("reading its output: {e}")),
            }
        };
        if stdout.timed_out() && head_end.is_err() {
            return self.instead(out, o, 504, "the CGI program did not answer in time");
        }
        if let Some(cut) = stdout.body_cut().filter(|_| head_end.is_err()) {
            return self.body_cut_short(out, o, cut);
        }
        let parsed = head_end.and_then(|e| {
            let block = &buf[..e];
            response::parse(block).map(|h| (h, e))
        });
        let (head, body_start) = match parsed {
            Ok(x) => x,
            Err(why) => {
                stdout.kill_all();
                eprintln!(
                    "{} 502: the CGI program's response has no valid header block: {why}",
                    self.rid
                );
                return self.instead(
                    out,
                    o,
                    502,
                    &format!("the CGI program sent an invalid response ({why})"),
                );
            }
        };
        if let response::Kind::LocalRedirect(path) = &head.kind {
            stdout.kill_all();
            eprintln!(
                "{} 502: local redirect to {path:?} refused: cgipool does not re-run requests; send `Status: 302` with the Location for a client redirect",
                self.rid
            );
            return self.instead(
                out,
                o,
                502,
                "the CGI program asked for a local redirect, which cgipool does not support",
            );
        }

        o.status = head.status;
        let body_allowed = self.req.method != "HEAD" && !response::bodiless(head.status);
        // Bytes: a value or the reason may carry obs-text.
        let mut h = format!("HTTP/1.1 {} ", head.status).into_bytes();
        h.extend_from_slice(&head.reason);
        h.extend_from_slice(b"\r\n");
        for (k, v) in &head.headers {
            h.extend_from_slice(k.as_bytes());
            h.extend_from_slice(b": ");
            h.extend_from_slice(v);
            h.extend_from_slice(b"\r\n");
        }
        // A body of unknown length: chunked to HTTP/1.1; HTTP/1.0 knows no
        // chunked coding (RFC 9112 §6.1), so there the end of the
        // connection ends the body.
        let unknown_length = body_allowed && head.content_length.is_none();
        let chunked = unknown_length && self.req.version != "HTTP/1.0";
        o.close = unknown_length && !chunked;
        if let Some(n) = head.content_length {
            if body_allowed || self.req.method == "HEAD" {
                h.extend_from_slice(format!("Content-Length: {n}\r\n").as_bytes());
            }
        } else if chunked {
            h.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
        }
        h.extend_from_slice(b"X-Cgipool-Worker: ");
        h.extend_from_slice(worker.as_bytes());
        // A gateway being stopped tells nginx not to reuse the connection.
        o.stopping = stopping();
        h.extend_from_slice(if self.keep_alive && !o.close && !o.stopping {
            b"\r\n\r\n"
        } else {
            b"\r\nConnection: close\r\n\r\n"
        });
        if let Err(e) = out.write_all(&h) {
            return Sent::Aborted(format!("client: {e}"));
        }
        // Framed by Content-Length, chunked or the connection's end: unless
        // cut short, the response ends where the client expects it.
        o.complete = true;
        let first = buf.split_off(body_start);
        drop(buf);

        if !body_allowed {
            // Drain (and drop) whatever the program still writes.
            let _ = out.flush();
            let _ = io::copy(stdout, &mut io::sink());
            return check_end(stdout);
        }
        if chunked {
            let mut w = ChunkedWriter::new(&mut *out);
            let r = pump(&first, stdout, &mut chunk, &mut w, None, o);
            if let Err(e) = r {
                return Sent::Aborted(e);
            }
            if let Sent::Aborted(why) = check_end(stdout) {
                return Sent::Aborted(why);
            }
            if let Err(e) = w.finish() {
                return Sent::Aborted(format!("client: {e}"));
            }
            return Sent::Done;
        }
        if o.close {
            // Delimited by closing the connection: all the program writes.
            if let Err(e) = pump(&first, stdout, &mut chunk, out, None, o) {
                return Sent::Aborted(e);
            }
            return check_end(stdout);
        }
        let want = head.content_length.unwrap_or(0);
        if let Err(e) = pump(&first, stdout, &mut chunk, out, Some(want), o) {
            return Sent::Aborted(e);
        }
        if o.bytes < want {
            return Sent::Aborted(match check_end(stdout) {
                Sent::Aborted(why) => why,
                Sent::Done => format!(
                    "output ended after {} of {want} bytes (Content-Length)",
                    o.bytes
                ),
            });
        }
        // The response is complete: nginx gets it now, not when the program
        // closes its stdout.
        if let Err(e) = out.flush() {
            return Sent::Aborted(format!("client: {e}"));
        }
        let extra = io::copy(stdout, &mut io::sink()).unwrap_or(0);
        if extra > 0 {
            eprintln!(
                "{} the CGI program wrote {extra} bytes more than its Content-Length; dropped",
                self.rid
            );
        }
        Sent::Done
    }
}

/// Whether the program's output ended because the program was killed: the
/// deadline passed, or the request body was cut short.
fn check_end(output: &ProgramOutput<'_>) -> Sent {
    if output.timed_out() {
        Sent::Aborted("timeout".into())
    } else if let Some(cut) = output.body_cut() {
        Sent::Aborted(cut.to_string())
    } else {
        Sent::Done
    }
}

/// Copies `first` and then the program's output to `w`, at most `limit`
/// bytes in total; counts into `o.bytes`. Errors name the side that failed.
///
/// Streamed once the request body was read to its end (before, nginx
/// would stop sending it): what `w` buffered (the response head the caller
/// wrote to it too) is flushed once the program pauses for FLUSH_AFTER, and
/// before the next read once it is older than that (a program that never
/// pauses that long). A program whose output (and its end) comes within FLUSH_AFTER
/// costs no syscall more: the look that finds it is the read's own poll.
fn pump(
    first: &[u8],
    stdout: &mut ProgramOutput<'_>,
    chunk: &mut [u8],
    w: &mut impl Write,
    limit: Option<u64>,
    o: &mut Outcome,
) -> std::result::Result<(), String> {
    let room = |o: &Outcome, n: usize| -> usize {
        match limit {
            Some(l) => usize::try_from(l.saturating_sub(o.bytes))
                .unwrap_or(usize::MAX)
                .min(n),
            None => n,
        }
    };
    let n = room(o, first.len());
    if n > 0 {
        w.write_all(&first[..n])
            .map_err(|e| format!("client: {e}"))?;
        o.bytes += n as u64;
    }
    // Since when something (the caller's response head at least) waits in
    // `w`'s buffer; None once flushed.
    let mut unflushed = Some(Instant::now());
    loop {
        if limit.is_some_and(|l| o.bytes >= l) {
            return Ok(());
        }
        // Nothing reaches the client before the request body was read to
        // its end: nginx stops sending a body once the response begins, so
        // a program that writes its head and then reads its body (git
        // http-backend receiving a push) would wait for the rest forever.
        let streaming = stdout.body_in();
        // A program that never pauses that long still streams.
        if streaming && unflushed.is_some_and(|since| since.elapsed() >= FLUSH_AFTER) {
            w.flush().map_err(|e| format!("client: {e}"))?;
            unflushed = None;
        }
        let want = room(o, chunk.len());
        let mut client = None;
        let got = match unflushed
            .filter(|_| streaming)
            .map(|since| FLUSH_AFTER.saturating_sub(since.elapsed()))
        {
            None => stdout.read(&mut chunk[..want]),
            Some(grace) => stdout.read_or_flush(&mut chunk[..want], grace, &mut || {
                unflushed = None;
                w.flush()
                    .inspect_err(|e| client = Some(format!("client: {e}")))
            }),
        };
        match got {
            Ok(0) => return Ok(()),
            Ok(n) => {
                w.write_all(&chunk[..n])
                    .map_err(|e| format!("client: {e}"))?;
                o.bytes += n as u64;
                unflushed.get_or_insert_with(Instant::now);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted && client.is_none() => continue,
            // The flush's error, or the program's.
            Err(e) => return Err(client.unwrap_or_else(|| format!("stdout: {e}"))),
        }
    }
}

fn describe_exit(st: ExitStatus) -> String {
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit={c}"),
        (None, Some(s)) => format!("signal={s}"),
        _ => "exit=?".to_string(),
    }
}
