//! The running program as the gateway's one thread sees it: its stdout (a
//! `Read`), its stderr (to the journal) and the request's deadline.
//!
//! Whenever the gateway waits for the program (for stdout, or for it to
//! exit) it polls stderr too, so stderr is logged line by line as it comes,
//! tagged with the request id, and a program never blocks on a full stderr
//! pipe. When the deadline passes, every descendant of the gateway is
//! killed, again every 50 ms while anything still holds a pipe open (a
//! process could fork meanwhile), also while the program keeps writing;
//! reads then end at EOF. No thread and no timer per request. The feeder of
//! a request body that ends early kills them too ([`super::feed`]); then
//! [`ProgramOutput::body_cut`] says so.
//!
//! Once the request's processes were killed, no wait for them lasts more
//! than [`KILL_GRACE`]: a process that SIGKILL does not end (stuck in the
//! kernel in uninterruptible sleep, or an exit only a tracer sees) would
//! otherwise hold the gateway forever. Its output then counts as ended, and
//! [`ProgramOutput::wait_exit`] gives up on the program, which is reaped
//! later ([`reap::Stuck`]).

use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::process::{Child, ChildStderr, ChildStdout, ExitStatus};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::feed::{Cut, Feed};
use super::reap;

/// Longest stderr line logged as one; longer lines are split.
const MAX_LINE: usize = 8192;
/// After the deadline: how often everything left is killed again.
const REKILL: Duration = Duration::from_millis(50);
/// How long the gateway waits for the request's processes once they were
/// killed: SIGKILL ends a process at once unless it is stuck in the kernel.
pub const KILL_GRACE: Duration = Duration::from_secs(5);
/// How often [`ProgramOutput::wait_exit`] looks again when it has no pidfd
/// to wait on.
const LOOK_AGAIN: Duration = Duration::from_millis(5);

pub struct ProgramOutput<'a> {
    stdout: Option<ChildStdout>,
    stderr: Option<ChildStderr>,
    /// The stderr line read so far.
    line: Vec<u8>,
    rid: &'a str,
    deadline: Instant,
    timed_out: bool,
    /// When everything was last killed (after the deadline).
    killed_at: Option<Instant>,
    /// When the request's processes were first killed (the deadline, a
    /// body cut short, a response given up on): waits end KILL_GRACE later.
    killed_since: Option<Instant>,
    /// The last stderr line was cut at MAX_LINE (a newline right after it
    /// ends that line, not a new empty one).
    split: bool,
    /// Shared with the feeder of a Content-Length body.
    feed: Option<Arc<Feed>>,
}

/// What a wait is for, besides stderr and the deadline.
#[derive(Clone, Copy)]
enum Target<'f> {
    Stdout,
    Fd(BorrowedFd<'f>),
    /// Only stderr (and the deadline).
    Nothing,
}

impl<'a> ProgramOutput<'a> {
    pub fn new(
        stdout: Option<ChildStdout>,
        stderr: Option<ChildStderr>,
        rid: &'a str,
        deadline: Instant,
        feed: Option<Arc<Feed>>,
    ) -> Self {
        ProgramOutput {
            stdout,
            stderr,
            line: Vec::with_capacity(256),
            rid,
            deadline,
            timed_out: false,
            killed_at: None,
            killed_since: None,
            split: false,
            feed,
        }
    }

    /// Whether the deadline passed (and the request's processes were
    /// killed), here or while the request body was read.
    pub fn timed_out(&self) -> bool {
        self.timed_out || self.body_cut().is_some_and(|c| c.timeout)
    }

    /// Whether the request body (if it comes from the connection) was read
    /// to its end.
    pub fn body_in(&self) -> bool {
        self.feed.as_ref().is_none_or(|f| f.read_all())
    }

    /// Whether the request body ended early (and the request's processes
    /// were killed for it).
    pub fn body_cut(&self) -> Option<Cut> {
        self.feed.as_ref().and_then(|f| f.cut())
    }

    /// Kills every process of the request now (the gateway gives up on
    /// its response); waits for them end [`KILL_GRACE`] later.
    pub fn kill_all(&mut self) {
        reap::kill_descendants();
        self.killed_since.get_or_insert_with(Instant::now);
    }

    /// Waits until `target` is readable (Ok(true)) or gone (Ok(false)),
    /// logging stderr and enforcing the deadline meanwhile. With `cap`, it
    /// also returns Ok(false) once `cap` has passed, and so it does
    /// [`KILL_GRACE`] after the request's processes were killed. With
    /// `flush` (a grace and a call), the first look waits at most the
    /// grace, and the call is made if nothing was ready by then.
    fn wait(
        &mut self,
        target: Target<'_>,
        cap: Option<Duration>,
        mut flush: Option<(Duration, Flush<'_>)>,
    ) -> io::Result<bool> {
        let cap_until = cap.map(|c| Instant::now() + c);
        loop {
            // The deadline holds whether or not the program keeps writing.
            self.enforce_deadline();
            if self.killed_since.is_none() && self.body_cut().is_some() {
                // The feeder killed them (just now, or a moment ago).
                self.killed_since = Some(Instant::now());
            }
            let given_up = self.killed_since.map(|at| at + KILL_GRACE);
            let until = cap_until.into_iter().chain(given_up).min();
            let target_fd = match target {
                Target::Stdout => match &self.stdout {
                    Some(s) => Some(s.as_fd()),
                    None => return Ok(false),
                },
                Target::Fd(fd) => Some(fd),
                Target::Nothing => None,
            };
            let now = Instant::now();
            if until.is_some_and(|u| now >= u) {
                return Ok(false);
            }
            let mut wait = match self.killed_at {
                Some(at) => (at + REKILL).saturating_duration_since(now),
                None => self.deadline.saturating_duration_since(now),
            };
            if let Some(u) = until {
                wait = wait.min(u - now);
            }
            let mut fds = Vec::with_capacity(2);
            if let Some(fd) = target_fd {
                fds.push(PollFd::new(fd, PollFlags::POLLIN));
            }
            let stderr_at = fds.len();
            if let Some(e) = &self.stderr {
                fds.push(PollFd::new(e.as_fd(), PollFlags::POLLIN));
            }
            if fds.is_empty() && until.is_none() {
                return Ok(false);
            }
            let ms = match &flush {
                Some((grace, _)) if *grace < wait => {
                    u16::try_from(grace.as_millis()).unwrap_or(u16::MAX)
                }
                // Rounded up, so the deadline is never polled for as 0 ms
                // early.
                _ => u16::try_from(wait.as_millis() + 1).unwrap_or(u16::MAX),
            };
            let n = match poll(&mut fds, PollTimeout::from(ms)) {
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(io::Error::from(e)),
            };
            if n == 0 {
                drop(fds);
                if let Some((_, f)) = flush.take() {
                    f()?;
                }
                continue;
            }
            let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
            let target_ready = target_fd.is_some() && ready(&fds[0]);
            let stderr_ready = fds.get(stderr_at).is_some_and(ready);
            drop(fds);
            if stderr_ready {
                self.read_stderr();
            }
            if target_ready {
                self.enforce_deadline();
                return Ok(true);
            }
        }
    }

    /// Past the deadline: kills every descendant, and again every REKILL
    /// while anything is left (a process could fork meanwhile).
    fn enforce_deadline(&mut self) {
        let now = Instant::now();
        if now < self.deadline || self.killed_at.is_some_and(|at| now < at + REKILL) {
            return;
        }
        self.timed_out = true;
        self.killed_at = Some(now);
        self.killed_since.get_or_insert(now);
        reap::kill_descendants();
    }

    /// One read of stderr: logs every complete line; at EOF the rest.
    fn read_stderr(&mut self) {
        let Some(err) = self.stderr.as_mut() else {
            return;
        };
        let mut buf = [0u8; 4096];
        let n = match err.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return,
            Err(_) => 0,
        };
        if n == 0 {
            self.stderr = None;
            if !self.line.is_empty() {
                self.log_line();
            }
            return;
        }
        for &b in &buf[..n] {
            if b == b'\n' {
                if !(self.split && self.line.is_empty()) {
                    self.log_line();
                }
                self.split = false;
            } else {
                self.line.push(b);
                self.split = false;
                if self.line.len() >= MAX_LINE {
                    self.log_line();
                    self.split = true;
                }
            }
        }
    }

    fn log_line(&mut self) {
        while self.line.last() == Some(&b'\r') {
            self.line.pop();
        }
        eprintln!(
            "{} stderr: {}",
            self.rid,
            String::from_utf8_lossy(&self.line)
        );
        self.line.clear();
    }

    /// Waits for the program (the direct child) to exit, still logging
    /// stderr and enforcing the deadline. Ok(None): it did not exit within
    /// [`KILL_GRACE`] of being killed; the caller goes on without it (it
    /// stays the gateway's child, to be reaped once it exits).
    pub fn wait_exit(&mut self, child: &mut Child) -> io::Result<Option<ExitStatus>> {
        let mut pidfd = pidfd_open(child.id());
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(Some(status));
            }
            if self
                .killed_since
                .is_some_and(|at| at.elapsed() >= KILL_GRACE)
            {
                return Ok(None);
            }
            let exited = match &pidfd {
                Some(fd) => self.wait(Target::Fd(fd.as_fd()), None, None)?,
                // No pidfd (a kernel before 5.3): look again every 5 ms.
                None => {
                    self.wait(Target::Nothing, Some(LOOK_AGAIN), None)?;
                    false
                }
            };
            if exited {
                if let Some(status) = child.try_wait()? {
                    return Ok(Some(status));
                }
                // It exited, but only its tracer may wait for it yet: the
                // pidfd stays readable, so look every 5 ms instead.
                pidfd = None;
            }
        }
    }

    /// Logs the rest of stderr. Call once the program and everything it
    /// started are gone; bounded by `limit` in case something still holds
    /// the pipe.
    pub fn finish_stderr(&mut self, limit: Duration) {
        let end = Instant::now() + limit;
        while self.stderr.is_some() && Instant::now() < end {
            let d = end.saturating_duration_since(Instant::now());
            let ms = u16::try_from(d.as_millis() + 1).unwrap_or(u16::MAX);
            let Some(err) = &self.stderr else { break };
            let mut fds = [PollFd::new(err.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(ms)) {
                Ok(0) => break,
                Ok(_) => self.read_stderr(),
                Err(Errno::EINTR) => continue,
                Err(_) => break,
            }
        }
        if self.stderr.take().is_some() && !self.line.is_empty() {
            self.log_line();
        }
    }
}

/// Sends what the gateway buffered for the client; see
/// [`ProgramOutput::read_or_flush`].
pub type Flush<'f> = &'f mut dyn FnMut() -> io::Result<()>;

impl ProgramOutput<'_> {
    /// Reads the program's stdout like `read`, but when nothing comes
    /// within `grace`, first calls `flush` (then waits as `read` does): the
    /// response so far reaches the client while the gateway waits for a
    /// program that writes slowly. Output (or its end) that comes within
    /// `grace` is read after the same one poll as without `flush`. An error
    /// of `flush` is returned as is.
    pub fn read_or_flush(
        &mut self,
        buf: &mut [u8],
        grace: Duration,
        flush: Flush<'_>,
    ) -> io::Result<usize> {
        self.read_stdout(buf, Some((grace, flush)))
    }

    fn read_stdout(
        &mut self,
        buf: &mut [u8],
        mut flush: Option<(Duration, Flush<'_>)>,
    ) -> io::Result<usize> {
        loop {
            if !self.wait(Target::Stdout, None, flush.take())? {
                return Ok(0);
            }
            let Some(out) = self.stdout.as_mut() else {
                return Ok(0);
            };
            match out.read(buf) {
                Ok(0) => {
                    self.stdout = None;
                    return Ok(0);
                }
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

impl Read for ProgramOutput<'_> {
    /// The program's stdout; Ok(0) at EOF.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_stdout(buf, None)
    }
}

/// A pidfd for a child (readable when it exits), if the kernel has them.
fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    let pid = nix::libc::pid_t::try_from(pid).ok()?;
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid, 0) };
    let fd = i32::try_from(fd).ok().filter(|&fd| fd >= 0)?;
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    debug_assert!(owned.as_raw_fd() == fd);
    Some(owned)
}
