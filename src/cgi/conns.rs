//! nginx's connections to one gateway: accepting them, keeping the idle
//! keep-alive ones (at most 64, each for at most 10 s, like the C workers),
//! and handing out the next connection that has a request waiting.
//!
//! Requests are still served one at a time; keep-alive only saves nginx a
//! connect and the gateway an accept per request. nginx's upstream
//! `keepalive_timeout` (5 s) stays below the idle limit, so nginx does not
//! reuse a connection the gateway is about to close.

use std::collections::VecDeque;
use std::io::{self, BufReader, BufWriter};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

pub const MAX_IDLE: usize = 64;
/// New connections taken from the socket's queue per look, and only while
/// fewer requests than this wait; the rest stay queued in the kernel
/// (bounds the gateway's fds and buffers).
pub const MAX_READY: usize = 16;
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
const IO_BUF: usize = 64 * 1024;
/// How long the gateway waits for nginx to send the rest of a request head
/// or body.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on sending to nginx (it reads eagerly; this only stops a hang).
const SEND_TIMEOUT: Duration = Duration::from_secs(60);

/// One connection from nginx: a buffered reader (the request head, a body)
/// and a buffered writer (the response) on the same socket.
pub struct Conn {
    /// None while a thread feeds the request body to the program.
    pub reader: Option<BufReader<UnixStream>>,
    pub out: BufWriter<UnixStream>,
    /// Which connection this is (counted from 1 per gateway) and how many
    /// requests it carried before the current one: for the log line.
    pub id: u64,
    pub served: u64,
    idle_since: Instant,
}

impl Conn {
    fn new(stream: UnixStream, id: u64) -> io::Result<Conn> {
        stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
        stream.set_write_timeout(Some(SEND_TIMEOUT))?;
        let read_half = stream.try_clone()?;
        Ok(Conn {
            reader: Some(BufReader::with_capacity(IO_BUF, read_half)),
            out: BufWriter::with_capacity(IO_BUF, stream),
            id,
            served: 0,
            idle_since: Instant::now(),
        })
    }

    /// Ends the connection (both directions, also for a thread still
    /// reading from it).
    pub fn close(self) {
        let _ = self.out.get_ref().shutdown(std::net::Shutdown::Both);
    }

    /// A request (or more of one) is already buffered.
    fn has_buffered(&self) -> bool {
        self.reader.as_ref().is_some_and(|r| !r.buffer().is_empty())
    }
}

pub struct Conns {
    listener: UnixListener,
    /// Readable when the signal thread asks to stop.
    wake: OwnedFd,
    /// Idle connections, the longest idle first.
    idle: VecDeque<Conn>,
    /// Connections with a request waiting, in the order they were seen
    /// ready (new connections in the order the kernel queued them): served
    /// first come, first served, like one shared accept queue.
    ready: VecDeque<Conn>,
    accepted: u64,
}

impl Conns {
    pub fn new(listener: UnixListener, wake: OwnedFd) -> io::Result<Conns> {
        // Accepted sockets do not inherit O_NONBLOCK (accept4 without it).
        listener.set_nonblocking(true)?;
        Ok(Conns {
            listener,
            wake,
            idle: VecDeque::new(),
            ready: VecDeque::new(),
            accepted: 0,
        })
    }

    /// Puts a connection back after a request, to wait for the next one.
    pub fn keep(&mut self, mut conn: Conn) {
        conn.idle_since = Instant::now();
        conn.served += 1;
        if conn.has_buffered() {
            self.ready.push_back(conn);
            return;
        }
        self.push_idle(conn);
    }

    /// Adds an idle connection; beyond MAX_IDLE the longest idle is closed.
    fn push_idle(&mut self, conn: Conn) {
        self.idle.push_back(conn);
        while self.idle.len() > MAX_IDLE {
            if let Some(old) = self.idle.pop_front() {
                old.close();
            }
        }
    }

    /// Blocks until a connection has a request to read (or its peer closed
    /// it: reading the head then says so) and returns the one that has
    /// waited longest. After SIGTERM ([`super::stopping`]): only what is
    /// already waiting, then None.
    pub fn next(&mut self) -> Option<Conn> {
        loop {
            self.expire();
            let stopping = super::stopping();
            // Requests that arrived meanwhile queue up behind the ones
            // already seen; only wait when there are none.
            let block = self.ready.is_empty() && !stopping;
            self.collect(block, !stopping);
            if let Some(c) = self.ready.pop_front() {
                return Some(c);
            }
            if stopping {
                return None;
            }
        }
    }

    /// Ends every idle connection (the gateway is stopping).
    pub fn close_all(&mut self) {
        for c in self.idle.drain(..).chain(self.ready.drain(..)) {
            c.close();
        }
    }

    /// Moves every connection with a request to `ready`: kept ones (the
    /// longest idle first), then new ones (unless `accept` is false or
    /// MAX_READY are waiting: the rest stay in the socket's queue). Waits
    /// for one if `block`.
    fn collect(&mut self, block: bool, accept: bool) {
        let timeout = if !block {
            PollTimeout::ZERO
        } else {
            self.idle
                .front()
                .map(|c| IDLE_TIMEOUT.saturating_sub(c.idle_since.elapsed()))
                .map_or(PollTimeout::NONE, |d| {
                    PollTimeout::from(u16::try_from(d.as_millis() + 1).unwrap_or(u16::MAX))
                })
        };
        let accept = accept && self.ready.len() < MAX_READY;
        // [wake, idle..., listener if accepting]
        let mut fds = Vec::with_capacity(self.idle.len() + 2);
        fds.push(self.wake.as_fd());
        fds.extend(self.idle.iter().map(|c| c.out.get_ref().as_fd()));
        if accept {
            fds.push(self.listener.as_fd());
        }
        let ready = match readable(&fds, timeout) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("cgi-gateway: poll: {e}");
                std::thread::sleep(Duration::from_millis(100));
                return;
            }
        };
        drop(fds);
        let n = self.idle.len();
        let mut still_idle = VecDeque::with_capacity(n);
        for (c, &r) in self.idle.drain(..).zip(&ready[1..=n]) {
            if r {
                self.ready.push_back(c);
            } else {
                still_idle.push_back(c);
            }
        }
        self.idle = still_idle;
        if ready.get(n + 1) == Some(&true) {
            self.accept_all();
        }
    }

    /// Accepts pending connections (at most MAX_READY at a time). They join
    /// the idle ones: a connection is served once its request is there
    /// (nginx sends it right after connecting; the next poll sees it), so a
    /// client that connects and says nothing never holds the gateway.
    fn accept_all(&mut self) {
        let mut new = Vec::new();
        for _ in 0..MAX_READY {
            match self.listener.accept() {
                Ok((s, _)) => match Conn::new(s, self.accepted + 1) {
                    Ok(c) => {
                        self.accepted += 1;
                        new.push(c);
                    }
                    Err(e) => eprintln!("cgi-gateway: accepted connection unusable: {e}"),
                },
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    eprintln!("cgi-gateway: accept: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    break;
                }
            }
        }
        if new.is_empty() {
            return;
        }
        // Usually the request is already there: one look, without waiting.
        let fds: Vec<_> = new.iter().map(|c| c.out.get_ref().as_fd()).collect();
        let readable = readable(&fds, PollTimeout::ZERO).unwrap_or_default();
        drop(fds);
        for (i, c) in new.into_iter().enumerate() {
            if readable.get(i) == Some(&true) {
                self.ready.push_back(c);
            } else {
                self.push_idle(c);
            }
        }
    }

    /// Closes connections idle for longer than IDLE_TIMEOUT, unless a
    /// request arrived on one meanwhile (the gateway may have been busy for
    /// longer than that): that one is served.
    fn expire(&mut self) {
        while self
            .idle
            .front()
            .is_some_and(|c| c.idle_since.elapsed() >= IDLE_TIMEOUT)
        {
            let Some(c) = self.idle.pop_front() else {
                break;
            };
            let waiting = readable(&[c.out.get_ref().as_fd()], PollTimeout::ZERO);
            if waiting.is_ok_and(|r| r[0]) {
                self.ready.push_back(c);
            } else {
                c.close();
            }
        }
    }
}

/// Which of `fds` are readable (or closed) within `timeout`; EINTR counts
/// as none.
fn readable(fds: &[BorrowedFd<'_>], timeout: PollTimeout) -> nix::Result<Vec<bool>> {
    let mut pfds: Vec<PollFd> = fds
        .iter()
        .map(|&fd| PollFd::new(fd, PollFlags::POLLIN))
        .collect();
    match poll(&mut pfds, timeout) {
        Ok(_) | Err(Errno::EINTR) => {}
        Err(e) => return Err(e),
    }
    Ok(pfds
        .iter()
        .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
        .collect())
}
