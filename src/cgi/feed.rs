//! The request body on its way to the program's stdin, from a thread of its
//! own (so a program that writes before it has read everything cannot
//! deadlock the gateway), and what happens when it ends early.
//!
//! The end of stdin is all a CGI program has to tell that its body is
//! complete. So a Content-Length body that ends before its length (the
//! client shut its side, the connection broke, the request's deadline
//! passed) must never end the program's stdin: the feeder kills every
//! process of the request first (every descendant of the gateway, as the
//! deadline does, [`reap::kill_descendants_settled`]) and only then closes
//! the pipe. The request's thread sees the program's output end, and
//! [`Feed::cut`] says why: the client gets 400 (504 at the deadline) if
//! nothing was sent yet, and a response cut short otherwise.
//!
//! The feeder kills only while the request's processes may still run: once
//! the request's thread has reaped them ([`Feed::over`]), the feeder may
//! still be reading a body the program did not want while the gateway runs
//! the next request's program, which it must leave alone.

use std::fmt;
use std::io::{self, Read, Write};
use std::process::ChildStdin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use super::reap;
use super::sock::{In, IO_BUF};

/// How far a Content-Length body got before it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut {
    pub got: u64,
    pub of: u64,
    /// It ended because the request's deadline passed.
    pub timeout: bool,
}

impl fmt::Display for Cut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (got, of) = (self.got, self.of);
        if self.timeout {
            write!(f, "request body: {got} of {of} bytes by the deadline")
        } else {
            write!(f, "request body ended after {got} of {of} bytes")
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The request's processes may run.
    Running,
    /// The body ended early; the request's processes were killed.
    Cut(Cut),
    /// The request's processes are gone: nothing more to kill.
    Over,
}

/// What the feeder of a Content-Length body and the request's thread share.
pub struct Feed {
    state: Mutex<State>,
    /// The whole body was read from the connection.
    read_all: AtomicBool,
}

impl Default for Feed {
    fn default() -> Self {
        Feed {
            state: Mutex::new(State::Running),
            read_all: AtomicBool::new(false),
        }
    }
}

impl Feed {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Nothing panics while holding it; a poisoned state is still valid.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The body ended early: kills every process of the request (while
    /// they may run), before the caller closes the program's stdin.
    fn cut_short(&self, cut: Cut) {
        let mut state = self.state();
        if *state == State::Running {
            // The end of stdin must reach nothing of the request: not even
            // a process forked while the first scan ran.
            reap::kill_descendants_settled(5);
            *state = State::Cut(cut);
        }
    }

    /// Whether the whole body was read from the connection: until then
    /// nothing of the response may reach the client (see run.rs `pump`).
    pub fn read_all(&self) -> bool {
        self.read_all.load(Ordering::Acquire)
    }

    /// Whether the body ended early (the program was killed for it).
    pub fn cut(&self) -> Option<Cut> {
        match *self.state() {
            State::Cut(c) => Some(c),
            _ => None,
        }
    }

    /// The request's processes are gone (killed and reaped): from now on
    /// the feeder kills nothing. Returns whether the body was cut short.
    pub fn over(&self) -> Option<Cut> {
        let mut state = self.state();
        let was = *state;
        *state = State::Over;
        match was {
            State::Cut(c) => Some(c),
            _ => None,
        }
    }
}

/// Copies `body` to the program's stdin until the body ends. If the
/// program stops reading, the rest is read and dropped so the client can
/// finish sending. Returns how reading the body ended (Ok at its end) and
/// stdin, still open unless the program closed it: the caller closes it.
fn copy(mut body: impl Read, sin: ChildStdin) -> (io::Result<()>, Option<ChildStdin>) {
    let mut sin = Some(sin);
    let mut buf = vec![0u8; IO_BUF];
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => return (Ok(()), sin),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return (Err(e), sin),
        };
        if let Some(s) = sin.as_mut() {
            if s.write_all(&buf[..n]).is_err() {
                sin = None;
            }
        }
    }
}

/// Feeds a body already whole (a decoded chunked body in its file), then
/// the end of stdin.
pub fn whole(body: impl Read, sin: ChildStdin) {
    let _ = copy(body, sin);
}

/// Feeds the `length` bytes of a Content-Length body from the connection,
/// then the end of stdin; if the body ends early, the request's processes
/// are killed first. Returns the connection's reader when the body was read
/// to its end (the connection can carry the next request).
pub fn from_connection(reader: In, length: u64, sin: ChildStdin, feed: &Feed) -> Option<In> {
    let mut body = reader.take(length);
    let (read, sin) = copy(&mut body, sin);
    let got = length - body.limit();
    if got < length {
        let timeout = matches!(&read, Err(e) if e.kind() == io::ErrorKind::TimedOut);
        feed.cut_short(Cut {
            got,
            of: length,
            timeout,
        });
        drop(sin);
        return None;
    }
    feed.read_all.store(true, Ordering::Release);
    drop(sin);
    Some(body.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_read_in_the_log() {
        let c = Cut {
            got: 100,
            of: 1000,
            timeout: false,
        };
        assert_eq!(c.to_string(), "request body ended after 100 of 1000 bytes");
        let t = Cut { timeout: true, ..c };
        assert_eq!(
            t.to_string(),
            "request body: 100 of 1000 bytes by the deadline"
        );
    }

    #[test]
    fn once_over_nothing_is_cut() {
        let f = Feed::default();
        assert_eq!(f.cut(), None);
        assert_eq!(f.over(), None);
        // After the request: no kill (the test process has no children
        // here anyway), and no cut recorded.
        f.cut_short(Cut {
            got: 1,
            of: 2,
            timeout: false,
        });
        assert_eq!(f.cut(), None);
    }
}
