//! The accept loop: nginx's connections to one gateway, read in one poll
//! loop until a connection holds a complete request head.
//!
//! - A connection is *waiting* (idle, or part of a head received) or
//!   *ready* (a complete head, or a head to refuse). Only ready ones leave
//!   the loop, first come first served in the order their heads completed,
//!   so a client that sends part of a head and stalls holds nothing: its
//!   head has `--head-timeout` from its first byte, then it gets 408.
//! - **A new connection is taken only when the gateway is free**: no
//!   request running and none ready on a connection it already owns. Then
//!   it accepts and reads what each connection sent (nginx sends its
//!   request right after connecting) until one holds a complete head:
//!   waiting for a head is being free. While any request is ready or
//!   running it accepts nothing, so a connection waits in the kernel's
//!   queue, where any free worker sharing the socket can take it, never
//!   behind another request in this gateway. Several gateways may share one
//!   listening socket (systemd's `Sockets=`): the listener is non-blocking,
//!   an accept that another process won (EAGAIN) is silent and the loop
//!   just polls again.
//! - Idle keep-alive connections are kept for at most 10 s, at most 64
//!   waiting connections in all (beyond that the longest idle is closed),
//!   like the C workers. nginx's upstream `keepalive_timeout` (5 s) stays
//!   below the idle limit, so nginx does not reuse a connection the gateway
//!   is about to close.
//! - The loop runs only between requests: while a program runs the gateway
//!   looks at nothing, and what nginx sends meanwhile waits in the kernel.

use std::collections::VecDeque;
use std::io::{self, BufRead, BufWriter};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::http::{self, Request};
use super::sock::{self, Got, In, Sock, IO_BUF};

/// Most connections waiting for a request (idle or with part of a head).
pub const MAX_WAITING: usize = 64;
/// Most connections taken in one look (each without a complete head yet;
/// the first with one ends the look).
pub const ACCEPT_PER_LOOK: usize = 16;
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// One connection from nginx: the reading side (the request head, a body)
/// and a buffered writer (the response) on the same socket.
pub struct Conn {
    /// None while a thread feeds the request body to the program.
    pub reader: Option<In>,
    pub out: BufWriter<Sock>,
    /// Which connection this is (counted from 1 per gateway) and how many
    /// requests it carried before the current one: for the log line.
    pub id: u64,
    pub served: u64,
    /// The peer shut its side: what is buffered is all that comes, so the
    /// response does not offer keep-alive.
    pub peer_closed: bool,
    /// Idle since then, or (with part of a head) the head's first byte.
    since: Instant,
    /// Part of a head is buffered.
    partial: bool,
    /// How much of the buffered head was already looked at for its end.
    scanned: usize,
}

impl Conn {
    fn new(stream: UnixStream, id: u64) -> io::Result<Conn> {
        stream.set_nonblocking(true)?;
        let read_half = stream.try_clone()?;
        Ok(Conn {
            reader: Some(In::new(Sock::new(read_half))),
            out: BufWriter::with_capacity(IO_BUF, Sock::new(stream)),
            id,
            served: 0,
            peer_closed: false,
            since: Instant::now(),
            partial: false,
            scanned: 0,
        })
    }

    /// Sets the deadline of every read and write on this connection.
    pub fn set_deadline(&mut self, deadline: Instant) {
        self.out.get_mut().deadline = deadline;
        if let Some(r) = self.reader.as_mut() {
            r.sock.deadline = deadline;
        }
    }

    /// Ends the connection (both directions, also for a thread still
    /// reading from it).
    pub fn close(self) {
        let _ = self
            .out
            .get_ref()
            .stream()
            .shutdown(std::net::Shutdown::Both);
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.out.get_ref().stream().as_fd()
    }
}

/// What leaves the accept loop, in the order it became ready.
pub enum Next {
    /// A complete request head; the body (if any) follows in `reader`.
    Request(Conn, Request),
    /// A head the gateway answers itself (status, reason), then closes.
    Refuse(Conn, u16, &'static str),
}

/// What reading a waiting connection found.
enum Step {
    Wait(Conn),
    Ready(Next),
    Close(Conn),
}

pub struct Conns {
    listener: UnixListener,
    /// Readable when the signal thread asks to stop.
    wake: OwnedFd,
    /// Connections waiting for (the rest of) a request, the longest idle
    /// first.
    waiting: VecDeque<Conn>,
    /// Heads complete (or refused), first come first served.
    ready: VecDeque<Next>,
    accepted: u64,
    max_header: usize,
    head_timeout: Duration,
}

impl Conns {
    pub fn new(
        listener: UnixListener,
        wake: OwnedFd,
        max_header: usize,
        head_timeout: Duration,
    ) -> io::Result<Conns> {
        listener.set_nonblocking(true)?;
        Ok(Conns {
            listener,
            wake,
            waiting: VecDeque::new(),
            ready: VecDeque::new(),
            accepted: 0,
            max_header,
            head_timeout,
        })
    }

    /// Puts a connection back after a request, to wait for the next one
    /// (which may already be buffered: pipelined).
    pub fn keep(&mut self, mut conn: Conn) {
        conn.served += 1;
        conn.since = Instant::now();
        conn.scanned = 0;
        conn.partial = conn
            .reader
            .as_ref()
            .is_some_and(|r| !r.buffered().is_empty());
        match self.parse(conn) {
            Step::Wait(c) => self.push_waiting(c),
            Step::Ready(n) => self.ready.push_back(n),
            Step::Close(c) => c.close(),
        }
    }

    /// Blocks until a connection has a complete request head (or one to
    /// refuse) and returns the first. After SIGTERM
    /// ([`super::signals::stopping`]) it accepts nothing more, but never
    /// closes an idle kept connection itself: nginx may be sending a
    /// request on it right now, which it does not retry if it is a POST.
    /// What arrives on one is still served (answered with `Connection:
    /// close`); nginx closes the idle ones within its keepalive_timeout
    /// (5 s, below IDLE_TIMEOUT, which bounds the wait). None once no
    /// connection is left.
    pub fn next(&mut self) -> Option<Next> {
        loop {
            let stopping = super::signals::stopping();
            // What arrived meanwhile queues up behind what is already
            // ready; only wait when nothing is.
            let block = self.ready.is_empty() && (!stopping || !self.waiting.is_empty());
            self.round(block, !stopping);
            if let Some(n) = self.ready.pop_front() {
                return Some(n);
            }
            if stopping && self.waiting.is_empty() {
                return None;
            }
        }
    }

    /// Ends every connection (the gateway is stopping).
    pub fn close_all(&mut self) {
        for c in self.waiting.drain(..) {
            c.close();
        }
        for n in self.ready.drain(..) {
            match n {
                Next::Request(c, _) | Next::Refuse(c, _, _) => c.close(),
            }
        }
    }

    /// When the first waiting connection expires (idle limit or head
    /// deadline).
    fn next_expiry(&self) -> Option<Instant> {
        self.waiting.iter().map(|c| self.expiry(c)).min()
    }

    fn expiry(&self, c: &Conn) -> Instant {
        c.since
            + if c.partial {
                self.head_timeout
            } else {
                IDLE_TIMEOUT
            }
    }

    /// One look at every waiting connection and the listener (waiting for
    /// one of them if `block`); then expiries.
    fn round(&mut self, block: bool, accept: bool) {
        let timeout = if !block {
            PollTimeout::ZERO
        } else {
            self.next_expiry().map_or(PollTimeout::NONE, |at| {
                sock::poll_ms(at.saturating_duration_since(Instant::now()))
            })
        };
        // Free: nothing ready. (Nothing runs while the loop runs.)
        let accept = accept && self.ready.is_empty();
        // [wake, waiting..., listener if accepting]; once stopping, the
        // wake pipe stays readable: its slot then waits for nothing.
        let mut fds = Vec::with_capacity(self.waiting.len() + 2);
        fds.push((self.wake.as_fd(), !super::signals::stopping()));
        fds.extend(self.waiting.iter().map(|c| (c.fd(), true)));
        if accept {
            fds.push((self.listener.as_fd(), true));
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
        let n = self.waiting.len();
        let mut still = VecDeque::with_capacity(n);
        let waiting = std::mem::take(&mut self.waiting);
        for (c, &r) in waiting.into_iter().zip(&ready[1..=n]) {
            if !r {
                still.push_back(c);
                continue;
            }
            match self.read(c) {
                Step::Wait(c) => still.push_back(c),
                Step::Ready(next) => self.ready.push_back(next),
                Step::Close(c) => c.close(),
            }
        }
        self.waiting = still;
        // A head that completed on an owned connection comes first: accept
        // only if the gateway is still free after reading them.
        if ready.get(n + 1) == Some(&true) && self.ready.is_empty() {
            self.accept_while_free();
        }
        self.expire();
    }

    /// Reads what a connection has (without waiting) and looks for the end
    /// of its head.
    fn read(&self, mut c: Conn) -> Step {
        let Some(r) = c.reader.as_mut() else {
            return Step::Close(c);
        };
        loop {
            let have = r.buffered().len();
            let want = (self.max_header + 1).saturating_sub(have).min(IO_BUF);
            if want == 0 {
                break;
            }
            match r.fill_now(want) {
                Ok(Got::Bytes(_)) => {
                    if !c.partial {
                        c.partial = true;
                        c.since = Instant::now();
                    }
                }
                Ok(Got::Nothing) => break,
                // A clean close between requests, or a head cut short:
                // nothing to answer. A complete head before the end (the
                // client shut only its side) is still served.
                Ok(Got::Eof) => {
                    if r.buffered().is_empty() {
                        return Step::Close(c);
                    }
                    c.peer_closed = true;
                    return match self.parse(c) {
                        Step::Wait(c) => Step::Close(c),
                        step => step,
                    };
                }
                Err(e) => {
                    if e.kind() != io::ErrorKind::ConnectionReset {
                        eprintln!("- reading a request head: {e}");
                    }
                    return Step::Close(c);
                }
            }
        }
        self.parse(c)
    }

    /// Parses the buffered head if it may be complete.
    fn parse(&self, mut c: Conn) -> Step {
        let Some(r) = c.reader.as_mut() else {
            return Step::Close(c);
        };
        let buf = r.buffered();
        if buf.len() < self.max_header && !http::may_be_complete(buf, c.scanned) {
            c.scanned = buf.len();
            return Step::Wait(c);
        }
        match http::parse_head(buf, self.max_header) {
            Ok(Some((req, n))) => {
                r.consume(n);
                c.partial = false;
                Step::Ready(Next::Request(c, req))
            }
            Ok(None) => {
                c.scanned = r.buffered().len();
                Step::Wait(c)
            }
            Err(http::HeadError::TooLarge) => {
                Step::Ready(Next::Refuse(c, 431, "request head too large"))
            }
            Err(http::HeadError::Malformed(m)) => Step::Ready(Next::Refuse(c, 400, m)),
        }
    }

    /// Adds a waiting connection; beyond MAX_WAITING the longest idle is
    /// closed.
    fn push_waiting(&mut self, conn: Conn) {
        self.waiting.push_back(conn);
        while self.waiting.len() > MAX_WAITING {
            if let Some(old) = self.waiting.pop_front() {
                old.close();
            }
        }
    }

    /// Accepts pending connections while the gateway stays free: each one
    /// is read at once, and the first that holds a complete head (or one to
    /// refuse) ends the look; one without a complete head yet waits like an
    /// idle one, and the gateway may take the next. At most
    /// [`ACCEPT_PER_LOOK`] per look; an accept that another process sharing
    /// the socket won (EAGAIN) ends it silently.
    fn accept_while_free(&mut self) {
        for _ in 0..ACCEPT_PER_LOOK {
            // SIGTERM may have come since this look began.
            if !self.ready.is_empty() || super::signals::stopping() {
                return;
            }
            match self.listener.accept() {
                Ok((s, _)) => match Conn::new(s, self.accepted + 1) {
                    Ok(c) => {
                        self.accepted += 1;
                        match self.read(c) {
                            Step::Wait(c) => self.push_waiting(c),
                            Step::Ready(n) => self.ready.push_back(n),
                            Step::Close(c) => c.close(),
                        }
                    }
                    Err(e) => eprintln!("cgi-gateway: accepted connection unusable: {e}"),
                },
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Another worker on the same socket was first, or the
                // client gave up: nothing to say.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.raw_os_error() == Some(Errno::ECONNABORTED as i32) => {}
                Err(e) => {
                    eprintln!("cgi-gateway: accept: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    return;
                }
            }
        }
    }

    /// Closes connections idle for longer than IDLE_TIMEOUT; a head not
    /// complete within the head timeout gets 408. Runs right after the
    /// connections were read, so what arrived while the gateway was busy
    /// counts.
    fn expire(&mut self) {
        let now = Instant::now();
        let mut still = VecDeque::with_capacity(self.waiting.len());
        for c in std::mem::take(&mut self.waiting) {
            if now < self.expiry(&c) {
                still.push_back(c);
            } else if c.partial {
                self.ready
                    .push_back(Next::Refuse(c, 408, "request head not complete in time"));
            } else {
                c.close();
            }
        }
        self.waiting = still;
    }
}

/// Which of `fds` (those marked true; the others wait for nothing) are
/// readable (or closed) within `timeout`; EINTR counts
/// as none.
fn readable(fds: &[(BorrowedFd<'_>, bool)], timeout: PollTimeout) -> nix::Result<Vec<bool>> {
    let mut pfds: Vec<PollFd> = fds
        .iter()
        .map(|&(fd, watch)| {
            PollFd::new(
                fd,
                if watch {
                    PollFlags::POLLIN
                } else {
                    PollFlags::empty()
                },
            )
        })
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
