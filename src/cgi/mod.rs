//! `cgipool cgi-gateway`: classic CGI programs (RFC 3875) in a pool.
//!
//! A worker unit of a `protocol = "cgi"` pool runs this gateway on its
//! socket-activated listener. It serves HTTP/1.1 from nginx one request at a
//! time, keeping nginx's connections open between requests, and runs the
//! program as a fresh process per request (no shell), inside the unit's
//! cgroup and sandbox. One thread serves it all, plus one that feeds a
//! request body to the program's stdin and one for signals ([`signals`]):
//!
//! - the accept loop ([`conns`]) reads request heads as they arrive, with a
//!   deadline per head (`--head-timeout`, then 408), and hands out only
//!   complete ones, first come first served; it takes a new connection only
//!   when the gateway is free, so several gateways can share one socket;
//! - the worker contract's environment ([`contract`]): one log line per
//!   request or errors only (`CGIPOOL_ACCESS_LOG`), and an exit 0 after N
//!   requests (`CGIPOOL_MAX_REQUESTS`);
//! - one request ([`serve`]): its framing and meta-variables per RFC 3875
//!   §4.1 ([`meta`]), the body (a chunked one is decoded into a bounded
//!   temporary file first, so CONTENT_LENGTH is always known, and 500 with
//!   the cause logged if that file cannot be written; at most
//!   `--body-limit` bytes; fed to stdin by [`feed`], which kills the
//!   program before its stdin ends if the body ends early), the program
//!   started with the gateway's own environment (the pool's `environment`)
//!   without `LISTEN_*` and `NOTIFY_SOCKET`;
//! - its run ([`run`]): the response header block ([`response`]) is at most
//!   `--max-header-bytes`; the body is streamed, flushed to the client
//!   within 10 ms of the program writing it (Content-Length when the
//!   program gives one, chunked otherwise to HTTP/1.1, delimited by closing
//!   the connection to HTTP/1.0). `nph-` programs pass through; stderr goes
//!   to the journal line by line, prefixed with the request's X-Request-ID
//!   ([`output`]);
//! - `--timeout` is one deadline for reading the body, running the program
//!   and writing the response ([`sock`]): past it every process of the
//!   request is killed, the client gets 504 if nothing was sent yet and the
//!   connection is closed otherwise. After every request nothing the
//!   program started survives: the gateway is a child subreaper and kills
//!   and reaps all its descendants ([`reap`]); one that SIGKILL does not
//!   end within seconds (stuck in the kernel) is logged and reaped later,
//!   and the gateway serves on.

pub mod chunked;
pub mod conns;
pub mod contract;
pub mod feed;
pub mod http;
pub mod meta;
pub mod output;
pub mod reap;
mod report;
pub mod response;
pub mod run;
pub mod serve;
pub mod signals;
pub mod sock;

use std::ffi::OsString;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use conns::{Conns, Next};

/// `cgipool cgi-gateway [OPTIONS] -- PROGRAM [ARGS...]`
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// The pool's route: SCRIPT_NAME, and the prefix removed from the path
    /// to give PATH_INFO.
    #[arg(long, default_value = "/")]
    pub route: String,
    /// Time for one request (systemd syntax, e.g. "60s"): reading its
    /// body, running the program and writing the response. Then every
    /// process of the request is killed, and the client gets 504 if nothing
    /// was sent yet (the connection is closed otherwise).
    #[arg(long, default_value = "60s")]
    pub timeout: String,
    /// Largest request head and largest CGI response header block.
    #[arg(long, default_value_t = 64 * 1024)]
    pub max_header_bytes: usize,
    /// Largest request body (nginx syntax: "1m", "512k"; at most "1g";
    /// "0" = that ceiling).
    #[arg(long, default_value = "1m")]
    pub body_limit: String,
    /// Time for a request head to arrive, from its first byte (systemd
    /// syntax); then 408 and the connection is closed.
    #[arg(long, default_value = "5s")]
    pub head_timeout: String,
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

/// The largest `--body-limit` (1 GiB), and what `0` stands for: a chunked
/// body is spooled to a temporary file in the worker's private /tmp, so the
/// gateway never takes an unbounded body, whatever nginx allows.
pub const BODY_LIMIT_MAX: u64 = 1 << 30;

/// Largest request body size in bytes from nginx syntax (`0` = the
/// ceiling); None when not a size, Err(bytes) when over the ceiling.
pub fn parse_body_limit(s: &str) -> Option<std::result::Result<u64, u64>> {
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
    Some(match bytes {
        0 => Ok(BODY_LIMIT_MAX),
        b if b > BODY_LIMIT_MAX => Err(b),
        b => Ok(b),
    })
}

/// Environment variables of the gateway that the program must not inherit.
const NOT_INHERITED: &[&str] = &[
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_PID",
    "WATCHDOG_USEC",
];

pub struct Gateway {
    program: OsString,
    args: Vec<OsString>,
    nph: bool,
    route: String,
    document_root: String,
    /// The one deadline of a request: body, program and response.
    timeout: Duration,
    max_header: usize,
    /// Largest request body, at most [`BODY_LIMIT_MAX`].
    body_limit: u64,
    worker: String,
    env: Vec<(OsString, OsString)>,
    /// One line per request (`CGIPOOL_ACCESS_LOG`); errors always.
    access_log: bool,
    /// Processes of earlier requests that SIGKILL did not end in time.
    stuck: std::cell::RefCell<reap::Stuck>,
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

/// A duration flag in systemd syntax, more than zero.
fn duration_flag(name: &str, v: &str) -> Result<Duration> {
    crate::config::duration_usec(v)
        .filter(|&us| us > 0)
        .map(Duration::from_micros)
        .with_context(|| format!("invalid --{name} {v:?} (e.g. \"60s\")"))
}

/// Keeps freed memory in the gateway's heap. Every request allocates and
/// frees its buffers (64 KiB each); glibc would give the heap's top back to
/// the kernel after each request (its trim threshold is 128 KiB) and take it
/// again for the next: a pair of `brk` calls and a page fault for every page
/// touched. Measured on a standalone gateway (`hello_cgi`, a connection per
/// request): 150 instead of 165 µs of the gateway's own CPU per request. The
/// heap stays at its high-water mark instead, up to 16 MiB.
fn keep_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; it is called before
    // the gateway starts any thread.
    unsafe {
        nix::libc::mallopt(nix::libc::M_TRIM_THRESHOLD, 16 << 20);
    }
}

pub fn run(args: Args) -> Result<()> {
    let timeout = duration_flag("timeout", &args.timeout)?;
    let head_timeout = duration_flag("head-timeout", &args.head_timeout)?;
    let body_limit = parse_body_limit(&args.body_limit)
        .with_context(|| format!("invalid --body-limit {:?} (e.g. \"1m\")", args.body_limit))?
        .map_err(|n| {
            anyhow::anyhow!(
                "--body-limit {:?} ({n} bytes) is over the gateway's ceiling of {BODY_LIMIT_MAX} bytes (1g)",
                args.body_limit
            )
        })?;
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
    let contract = contract::Contract::from_env()?;
    let listener = listener(&args)?;
    reap::become_subreaper().context("prctl(PR_SET_CHILD_SUBREAPER)")?;
    keep_heap();
    let (wake_r, wake_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
            .context("creating the wake-up pipe")?;
    signals::handle(wake_w)?;
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
        access_log: contract.access_log,
        stuck: Default::default(),
    };
    eprintln!(
        "cgi-gateway: {} on route {} (timeout {:?}, head timeout {:?}, body limit {} bytes, one request at a time, keep-alive, access log {}, max requests {})",
        gw.program.to_string_lossy(),
        gw.route,
        gw.timeout,
        head_timeout,
        gw.body_limit,
        if gw.access_log { "on" } else { "off" },
        contract
            .max_requests
            .map_or("none".to_string(), |n| n.to_string()),
    );
    let mut conns = Conns::new(listener, wake_r, gw.max_header, head_timeout)
        .context("the listening socket")?;
    let mut served: u64 = 0;
    let reporter = report::Reporter::from_env();
    while let Some(next) = conns.next() {
        let (keep, conn) = match next {
            Next::Request(mut conn, req) => {
                served += 1;
                if contract.max_requests.is_some_and(|max| served >= max) {
                    // The last one: answered with `Connection: close`.
                    signals::stop();
                }
                reporter.busy(
                    served - 1,
                    &req.method,
                    &req.target_text(),
                    req.header("X-Request-ID"),
                );
                let keep = gw.serve(&mut conn, &req);
                reporter.idle(served);
                (keep, conn)
            }
            Next::Refuse(mut conn, status, why) => {
                gw.refuse_head(&mut conn, status, why);
                (false, conn)
            }
        };
        // A response that said keep-alive keeps its connection even if
        // SIGTERM came meanwhile: Conns::next leaves it to nginx to close.
        if keep {
            conns.keep(conn);
        } else {
            conn.close();
        }
    }
    eprintln!("cgi-gateway: stopping after {served} requests");
    conns.close_all();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_limits() {
        assert_eq!(parse_body_limit("1m"), Some(Ok(1024 * 1024)));
        assert_eq!(parse_body_limit("512k"), Some(Ok(512 * 1024)));
        assert_eq!(parse_body_limit("1G"), Some(Ok(1 << 30)));
        assert_eq!(parse_body_limit("1024m"), Some(Ok(BODY_LIMIT_MAX)));
        assert_eq!(parse_body_limit("2g"), Some(Err(2 << 30)));
        assert_eq!(parse_body_limit("100"), Some(Ok(100)));
        // Never unbounded: 0 is the ceiling.
        assert_eq!(parse_body_limit("0"), Some(Ok(BODY_LIMIT_MAX)));
        assert_eq!(parse_body_limit(""), None);
        assert_eq!(parse_body_limit("m"), None);
        assert_eq!(parse_body_limit("1 m"), None);
        assert_eq!(parse_body_limit("99999999999999999999g"), None);
    }
}
