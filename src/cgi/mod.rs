//! `cgipool cgi-gateway`: classic CGI programs (RFC 3875) in a pool.
//!
//! A worker unit of a `protocol = "cgi"` pool runs this gateway on its
//! socket-activated listener. It serves HTTP/1.1 from nginx one request at a
//! time, keeping nginx's connections open between requests ([`conns`]), and
//! runs the program as a fresh process per request (no shell), inside the
//! unit's cgroup and sandbox; one thread serves it all ([`output`]), plus one
//! that feeds a request body to the program's stdin:
//!
//! - meta-variables per RFC 3875 §4.1 ([`meta`]), plus the gateway's own
//!   environment (the pool's `environment`) without `LISTEN_*` and
//!   `NOTIFY_SOCKET`; the working directory is the unit's;
//! - the request body goes to the program's stdin (a chunked body is
//!   decoded into an anonymous temporary file first, so CONTENT_LENGTH is
//!   always known); at most `--body-limit` bytes;
//! - the response header block ([`response`]) is at most
//!   `--max-header-bytes`; the body is streamed (Content-Length when the
//!   program gives one, chunked otherwise). `nph-` programs pass through;
//! - the program's stderr goes to the journal line by line, prefixed with
//!   the request's X-Request-ID;
//! - `--timeout`: the client gets 504 and every process of the request is
//!   killed. After every request nothing the program started survives: the
//!   gateway is a child subreaper and kills and reaps all its descendants
//!   ([`reap`]).

pub mod conns;
pub mod http;
pub mod meta;
pub mod output;
pub mod reap;
pub mod response;

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use conns::{Conn, Conns};
use output::ProgramOutput;

/// `cgipool cgi-gateway [OPTIONS] -- PROGRAM [ARGS...]`
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// The pool's route: SCRIPT_NAME, and the prefix removed from the path
    /// to give PATH_INFO.
    #[arg(long, default_value = "/")]
    pub route: String,
    /// Time for one request (systemd syntax, e.g. "60s"); then 504 and
    /// every process of the request is killed.
    #[arg(long, default_value = "60s")]
    pub timeout: String,
    /// Largest request head and largest CGI response header block.
    #[arg(long, default_value_t = 64 * 1024)]
    pub max_header_bytes: usize,
    /// Largest request body (nginx syntax: "1m", "512k"; "0" = no limit).
    #[arg(long, default_value = "1m")]
    pub body_limit: String,
    /// DOCUMENT_ROOT (default: the working directory).
    #[arg(long)]
    pub document_root: Option<PathBuf>,
    /// Listen on this unix socket path instead of the socket systemd passes
    /// (for development).
    #[arg(long)]
    pub listen: Option<PathBuf>,
    /// The CGI program and its arguments.
    #[arg(last = true, required = true, num_args = 1..)]
    pub command: Vec<OsString>,
}

/// Largest request body size in bytes from nginx syntax; None = no limit.
pub fn parse_body_limit(s: &str) -> Option<Option<u64>> {
    let (num, mult) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 1024),
        b'm' | b'M' => (&s[..s.len() - 1], 1024 * 1024),
        b'g' | b'G' => (&s[..s.len() - 1], 1024 * 1024 * 1024),
        _ => (s, 1),
    };
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = num.parse().ok()?;
    let bytes = n.checked_mul(mult)?;
    Some((bytes > 0).then_some(bytes))
}

const IO_BUF: usize = 64 * 1024;
/// Environment variables of the gateway that the program must not inherit.
const NOT_INHERITED: &[&str] = &[
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_PID",
    "WATCHDOG_USEC",
];

struct Gateway {
    program: OsString,
    args: Vec<OsString>,
    nph: bool,
    route: String,
    document_root: String,
    timeout: Duration,
    max_header: usize,
    body_limit: Option<u64>,
    worker: String,
    env: Vec<(OsString, OsString)>,
}

/// The socket systemd passed (fd 3), if it was passed to this process.
fn systemd_listener() -> Result<Option<UnixListener>> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(None);
    };
    if pid.parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(None);
    }
    match fds.parse::<u32>() {
        Ok(1) => {}
        Ok(n) => bail!("LISTEN_FDS={n}: expected exactly one socket"),
        Err(_) => bail!("invalid LISTEN_FDS={fds:?}"),
    }
    // SAFETY: LISTEN_PID names this process, so systemd passed fd 3 to it
    // (sd_listen_fds(3)); nothing else in this process owns fd 3.
    let fd = unsafe { OwnedFd::from_raw_fd(3) };
    // Not inherited by the CGI programs.
    nix::fcntl::fcntl(
        &fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .context("fd 3 from systemd is not usable")?;
    Ok(Some(UnixListener::from(fd)))
}

fn listener(args: &Args) -> Result<UnixListener> {
    if let Some(path) = &args.listen {
        let _ = std::fs::remove_file(path);
        return UnixListener::bind(path)
            .with_context(|| format!("listening on {}", path.display()));
    }
    systemd_listener()?.context(
        "no listening socket: run under systemd socket activation (LISTEN_FDS=1) or pass --listen PATH",
    )
}

/// Set once SIGTERM or SIGINT came: serve what is already waiting, each
/// with `Connection: close`, then exit (new connections stay in the
/// socket's queue for the next instance: systemd keeps the socket).
static STOP: AtomicBool = AtomicBool::new(false);

pub fn stopping() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// SIGTERM/SIGINT set [`STOP`] and wake the main thread through `wake`.
fn handle_signals(wake: OwnedFd) -> Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    // Blocked in this thread and (inherited) in every thread spawned later;
    // std resets the mask in the CGI programs it spawns.
    set.thread_block().context("blocking SIGTERM")?;
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            if set.wait().is_err() {
                continue;
            }
            STOP.store(true, Ordering::SeqCst);
            let _ = nix::unistd::write(&wake, b"x");
        })
        .context("starting the signal thread")?;
    Ok(())
}

pub fn run(args: Args) -> Result<()> {
    let timeout = crate::config::duration_usec(&args.timeout)
        .filter(|&us| us > 0)
        .map(Duration::from_micros)
        .with_context(|| format!("invalid --timeout {:?} (e.g. \"60s\")", args.timeout))?;
    let body_limit = parse_body_limit(&args.body_limit)
        .with_context(|| format!("invalid --body-limit {:?} (e.g. \"1m\")", args.body_limit))?;
    if !args.route.starts_with('/') {
        bail!("--route must start with /");
    }
    let mut command = args.command.clone().into_iter();
    let program = command.next().context("no CGI program given after --")?;
    let nph = std::path::Path::new(&program)
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("nph-"));
    let document_root = match &args.document_root {
        Some(d) => d.clone(),
        None => std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/")),
    };
    let listener = listener(&args)?;
    reap::become_subreaper().context("prctl(PR_SET_CHILD_SUBREAPER)")?;
    let (wake_r, wake_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
            .context("creating the wake-up pipe")?;
    handle_signals(wake_w)?;
    let gw = Gateway {
        nph,
        args: command.collect(),
        route: args.route.clone(),
        document_root: document_root.to_string_lossy().into_owned(),
        timeout,
        max_header: args.max_header_bytes.max(1024),
        body_limit,
        worker: std::env::var("CGIPOOL_WORKER").unwrap_or_else(|_| "cgi-gateway".into()),
        env: std::env::vars_os()
            .filter(|(k, _)| !NOT_INHERITED.iter().any(|n| k == n))
            .collect(),
        program,
    };
    eprintln!(
        "cgi-gateway: {} on route {} (timeout {:?}, one request at a time, keep-alive)",
        gw.program.to_string_lossy(),
        gw.route,
        gw.timeout
    );
    let mut conns = Conns::new(listener, wake_r).context("the listening socket")?;
    while let Some(mut conn) = conns.next() {
        if gw.serve(&mut conn) && !stopping() {
            conns.keep(conn);
        } else {
            conn.close();
        }
    }
    eprintln!("cgi-gateway: stopping");
    conns.close_all();
    Ok(())
}

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
struct Outcome {
    status: u16,
    bytes: u64,
    note: Vec<String>,
    /// The program's own response was sent completely, so the connection
    /// can carry the next request (if the request allows it).
    complete: bool,
}

impl Outcome {
    fn new(status: u16) -> Self {
        Outcome {
            status,
            bytes: 0,
            note: Vec::new(),
            complete: false,
        }
    }
}

/// Writes a small complete response from the gateway itself; the
/// connection is closed after it.
fn simple(out: &mut impl Write, worker: &str, status: u16, msg: &str) -> io::Result<u64> {
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
enum Body {
    Empty,
    /// Content-Length bytes, still on the connection.
    Socket(u64),
    /// A chunked body, already decoded into a temporary file.
    File(File),
}

/// Feeds `body` to the program's stdin, then EOF. If the program stops
/// reading, the rest is read and dropped so nginx can finish sending.
/// True when the body was read to its end.
fn feed(mut body: impl Read, sin: ChildStdin) -> bool {
    let mut sin = Some(sin);
    let mut buf = vec![0u8; IO_BUF];
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => return true,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return false,
        };
        if let Some(s) = sin.as_mut() {
            if s.write_all(&buf[..n]).is_err() {
                sin = None;
            }
        }
    }
}

impl Gateway {
    /// Serves one request from `conn`; true when the connection can carry
    /// the next one.
    fn serve(&self, conn: &mut Conn) -> bool {
        let started = Instant::now();
        let Some(reader) = conn.reader.as_mut() else {
            return false;
        };
        let req = match http::read_head(reader, self.max_header) {
            Ok(Some(r)) => r,
            Ok(None) | Err(http::HeadError::Truncated) => return false,
            Err(http::HeadError::Io(e)) => {
                if e.kind() != io::ErrorKind::ConnectionReset {
                    eprintln!("- reading a request head: {e}");
                }
                return false;
            }
            Err(http::HeadError::TooLarge) => {
                let _ = simple(&mut conn.out, &self.worker, 431, "request head too large");
                eprintln!("- request head larger than {} bytes: 431", self.max_header);
                return false;
            }
            Err(http::HeadError::Malformed(m)) => {
                let _ = simple(&mut conn.out, &self.worker, 400, m);
                eprintln!("- malformed request: {m}: 400");
                return false;
            }
        };
        let rid = log_id(req.header("X-Request-ID"));
        let keep_alive = http::keep_alive(&req);
        let outcome = self.handle(&req, &rid, keep_alive, conn);
        let flushed = conn.out.flush().is_ok();
        let mut line = format!(
            "{rid} {} {} {} {}B {}ms conn={}#{}",
            req.method,
            req.target,
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
        eprintln!("{line}");
        keep_alive && outcome.complete && flushed && conn.reader.is_some()
    }

    /// Everything after the head: body, program, response.
    fn handle(&self, req: &http::Request, rid: &str, keep_alive: bool, conn: &mut Conn) -> Outcome {
        let refuse = |out: &mut BufWriter<UnixStream>, status: u16, msg: &str| {
            let mut o = Outcome::new(status);
            o.bytes = simple(out, &self.worker, status, msg).unwrap_or(0);
            o.note.push(format!("({msg})"));
            o
        };
        let framing = match http::framing(req) {
            Ok(f) => f,
            Err((status, msg)) => return refuse(&mut conn.out, status, msg),
        };
        let too_big = |n: u64| self.body_limit.is_some_and(|l| n > l);
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
                Err(e) => return refuse(&mut conn.out, 400, &format!("bad chunked body: {e}")),
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
        }
        .run(&mut child, body, conn)
    }

    /// Decodes a chunked body into an anonymous temporary file. Ok(None):
    /// larger than the body limit.
    fn spool_chunked(&self, conn: &mut Conn) -> io::Result<Option<(File, u64)>> {
        let reader = conn
            .reader
            .as_mut()
            .ok_or_else(|| io::Error::other("no reader"))?;
        let mut f = tempfile::tempfile()?;
        let mut dec = http::ChunkedReader::new(reader);
        let limit = self.body_limit.map_or(u64::MAX, |l| l.saturating_add(1));
        let n = io::copy(&mut (&mut dec).take(limit), &mut f)?;
        if self.body_limit.is_some_and(|l| n > l) {
            // The rest of the body is still on the connection.
            conn.reader = None;
            return Ok(None);
        }
        f.rewind()?;
        Ok(Some((f, n)))
    }
}

/// One running program.
struct Run<'a> {
    gw: &'a Gateway,
    rid: &'a str,
    req: &'a http::Request,
    /// The response may leave the connection open.
    keep_alive: bool,
}

/// How the response to the client ended.
enum Sent {
    /// Complete.
    Done,
    /// Cut short (the connection must close without a proper end).
    Aborted(String),
}

/// How long, after the response, the connection waits for the body feeder
/// to finish reading the request body (nginx has sent it all by then).
const FEED_GRACE: Duration = Duration::from_secs(1);

impl Run<'_> {
    fn run(&self, child: &mut Child, body: Body, conn: &mut Conn) -> Outcome {
        let deadline = Instant::now() + self.gw.timeout;
        // The body goes to stdin from its own thread, so a program that
        // writes before it has read everything cannot deadlock the gateway.
        // A body read from the connection comes back with its reader.
        let (fed_tx, fed_rx) = mpsc::channel::<Option<BufReader<UnixStream>>>();
        let feeding = match (child.stdin.take(), body) {
            (Some(sin), Body::Socket(n)) => conn.reader.take().and_then(|reader| {
                thread::Builder::new()
                    .name("cgi-stdin".into())
                    .spawn(move || {
                        let mut body = reader.take(n);
                        let whole = feed(&mut body, sin) && body.limit() == 0;
                        let _ = fed_tx.send(whole.then(|| body.into_inner()));
                    })
                    .ok()
            }),
            (Some(sin), Body::File(f)) => thread::Builder::new()
                .name("cgi-stdin".into())
                .spawn(move || {
                    feed(f, sin);
                })
                .ok(),
            _ => None,
        };
        let mut output =
            ProgramOutput::new(child.stdout.take(), child.stderr.take(), self.rid, deadline);
        let mut outcome = Outcome::new(0);
        let sent = self.respond(&mut output, &mut conn.out, &mut outcome);
        if let Sent::Aborted(why) = &sent {
            outcome.note.push(format!("aborted: {why}"));
            outcome.complete = false;
            reap::kill_descendants();
        }
        let _ = conn.out.flush();

        // A response cut short by the timeout ends the connection; one sent
        // in full before it does not (nginx may already reuse it), even if
        // the program then runs into the timeout.
        if output.timed_out() {
            outcome.complete = false;
        }
        let status = output.wait_exit(child).ok();
        if output.timed_out() {
            outcome.note.push("timeout".to_string());
        }
        if let Some(st) = status {
            outcome.note.push(describe_exit(st));
        }
        // The common case: the program left nothing behind, no scan needed.
        if !reap::no_children_left() {
            let leftover = reap::descendants().len();
            if leftover > 0 {
                outcome.note.push(format!("killed={leftover}"));
            }
            let survivors = reap::kill_and_reap_all(Duration::from_secs(10));
            if !survivors.is_empty() {
                outcome.note.push(format!("UNKILLABLE={survivors:?}"));
            }
        }
        output.finish_stderr(Duration::from_secs(1));
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

    /// Reads the program's output and sends the response.
    fn respond(
        &self,
        stdout: &mut ProgramOutput<'_>,
        out: &mut BufWriter<UnixStream>,
        o: &mut Outcome,
    ) -> Sent {
        let worker = &self.gw.worker;
        let mut buf: Vec<u8> = Vec::with_capacity(8192);
        let mut chunk = vec![0u8; IO_BUF];
        if self.gw.nph {
            // Non-parsed headers: the program speaks HTTP itself.
            o.status = 200;
            loop {
                match stdout.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => {
                        if let Err(e) = out.write_all(&chunk[..n]) {
                            return Sent::Aborted(format!("client: {e}"));
                        }
                        o.bytes += n as u64;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Sent::Aborted(format!("stdout: {e}")),
                }
            }
            if stdout.timed_out() {
                if o.bytes == 0 {
                    return self.instead(out, o, 504, "the CGI program timed out");
                }
                return Sent::Aborted("timeout".into());
            }
            return Sent::Done;
        }

        // The header block.
        let head_end = loop {
            if let Some(e) = response::header_end(&buf) {
                break Ok(e);
            }
            if buf.len() > self.gw.max_header {
                break Err(format!(
                    "header block larger than {} bytes",
                    self.gw.max_header
                ));
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
        let parsed = head_end.and_then(|e| {
            let block = &buf[..e];
            response::parse(block).map(|h| (h, e))
        });
        let (head, body_start) = match parsed {
            Ok(x) => x,
            Err(why) => {
                reap::kill_descendants();
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
            reap::kill_descendants();
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
        let mut h = format!("HTTP/1.1 {} {}\r\n", head.status, head.reason);
        for (k, v) in &head.headers {
            h.push_str(k);
            h.push_str(": ");
            h.push_str(v);
            h.push_str("\r\n");
        }
        let chunked = body_allowed && head.content_length.is_none();
        if let Some(n) = head.content_length {
            if body_allowed || self.req.method == "HEAD" {
                h.push_str(&format!("Content-Length: {n}\r\n"));
            }
        } else if chunked {
            h.push_str("Transfer-Encoding: chunked\r\n");
        }
        h.push_str("X-Cgipool-Worker: ");
        h.push_str(worker);
        // A gateway being stopped tells nginx not to reuse the connection.
        h.push_str(if self.keep_alive && !stopping() {
            "\r\n\r\n"
        } else {
            "\r\nConnection: close\r\n\r\n"
        });
        if let Err(e) = out.write_all(h.as_bytes()) {
            return Sent::Aborted(format!("client: {e}"));
        }
        // Framed by Content-Length or chunked: unless cut short, the
        // response ends where nginx expects it.
        o.complete = true;
        let first = buf.split_off(body_start);
        drop(buf);

        if !body_allowed {
            // Drain (and drop) whatever the program still writes.
            let _ = out.flush();
            let _ = io::copy(stdout, &mut io::sink());
            return check_timeout(stdout);
        }
        if chunked {
            let mut w = http::ChunkedWriter::new(&mut *out);
            let r = pump(&first, stdout, &mut chunk, &mut w, None, o);
            if let Err(e) = r {
                return Sent::Aborted(e);
            }
            if let Sent::Aborted(why) = check_timeout(stdout) {
                return Sent::Aborted(why);
            }
            if let Err(e) = w.finish() {
                return Sent::Aborted(format!("client: {e}"));
            }
            return Sent::Done;
        }
        let want = head.content_length.unwrap_or(0);
        if let Err(e) = pump(&first, stdout, &mut chunk, out, Some(want), o) {
            return Sent::Aborted(e);
        }
        if o.bytes < want {
            return Sent::Aborted(match check_timeout(stdout) {
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

fn check_timeout(output: &ProgramOutput<'_>) -> Sent {
    if output.timed_out() {
        Sent::Aborted("timeout".into())
    } else {
        Sent::Done
    }
}

/// Copies `first` and then the program's output to `w`, at most `limit`
/// bytes in total; counts into `o.bytes`. Errors name the side that failed.
fn pump(
    first: &[u8],
    stdout: &mut impl Read,
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
    loop {
        if limit.is_some_and(|l| o.bytes >= l) {
            return Ok(());
        }
        let want = room(o, chunk.len());
        match stdout.read(&mut chunk[..want]) {
            Ok(0) => return Ok(()),
            Ok(n) => {
                w.write_all(&chunk[..n])
                    .map_err(|e| format!("client: {e}"))?;
                o.bytes += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("stdout: {e}")),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_limits() {
        assert_eq!(parse_body_limit("1m"), Some(Some(1024 * 1024)));
        assert_eq!(parse_body_limit("512k"), Some(Some(512 * 1024)));
        assert_eq!(parse_body_limit("2G"), Some(Some(2 << 30)));
        assert_eq!(parse_body_limit("100"), Some(Some(100)));
        assert_eq!(parse_body_limit("0"), Some(None));
        assert_eq!(parse_body_limit(""), None);
        assert_eq!(parse_body_limit("m"), None);
        assert_eq!(parse_body_limit("1 m"), None);
        assert_eq!(parse_body_limit("99999999999999999999g"), None);
    }

    #[test]
    fn log_ids() {
        assert_eq!(log_id(None), "-");
        assert_eq!(log_id(Some("")), "-");
        assert_eq!(log_id(Some("abc 1\n")), "abc?1?");
        assert_eq!(log_id(Some(&"x".repeat(100))).len(), 64);
    }
}
