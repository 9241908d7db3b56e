//! The kernel's view of cgipool's AF_UNIX sockets (NETLINK_SOCK_DIAG, what
//! `ss -x` shows), read with the kept netlink crates (`netlink-sys` for the
//! socket, `netlink-packet-sock-diag` for the messages): no `unsafe` here.
//!
//! Two questions are asked:
//!
//! - **Queues** (`queues`): how many requests wait on each socket path under
//!   a prefix, counted as connections queued on the listener plus accepted
//!   connections whose receive queue holds bytes a busy worker has not read
//!   yet. The kernel's unix_diag filters a dump by socket state only (never
//!   by path), and the one other way to ask for a single socket is by inode,
//!   which needs the inodes first: the listeners are held by PID 1 (a file
//!   table with every socket unit of the host) and, for a restarting worker,
//!   by nobody else, so finding them would walk more of the host than the
//!   dump shows. So this is one dump of the listening and connected sockets
//!   (no datagram ones), filtered down to the prefix as each message is
//!   parsed; nothing else is kept or logged.
//! - **Connections to other hosts** (`tcp_connections`): how many TCP
//!   connections this host has open (or opening) to each of some `ip:port`
//!   addresses, one dump per address family of the sockets in SYN_SENT or
//!   ESTABLISHED, counted by destination as each message is parsed. The
//!   front's nginx opens one connection per request to a pool's queue on
//!   another host (no keepalive there), so this is the requests it has
//!   sent there and not yet had answered.
//! - **A worker's connections** (`by_inode`): the reaper finds the socket
//!   inodes in a worker's `/proc/PID/fd` and asks the kernel for exactly
//!   those, one request each: only cgipool's own sockets.
//! - **Who accepted a connection** (`by_inode` on watch's own end of a
//!   probe's connection): its peer, the accepted socket's inode (0, read as
//!   none, while the connection waits in the listener's queue or once the
//!   accepting side closed it), which the health probe of a shared queue
//!   looks for in the workers' `/proc/PID/fd`.
//!
//! Every answer is checked: its sequence number and port, a datagram larger
//! than the buffer (MSG_TRUNC), a dump the kernel marks as interrupted, an
//! error message, a message that does not parse. Any of them is an error for
//! the caller, never "nothing waiting" (which would shrink a pool).
//!
//! The crate reports `UNIX_DIAG_SHUTDOWN` as the raw `sk_shutdown` bits (its
//! doc comment speaks of `SHUT_RD`/`SHUT_WR`, which are different numbers):
//! bit 0 (`RCV_SHUTDOWN`) is set on a connection once its peer closed it or
//! shut down its writing side; that is what `Socket::peer_closed` reads.
use anyhow::{bail, Context, Result};
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::{
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{self, ExtensionFlags, InetRequest, SocketId},
    unix::{nlas::UnixDiagName, ShowFlags, StateFlags, UnixRequest, UnixResponse},
    SockDiagMessage,
};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket as NetlinkSocket, SocketAddr};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr as InetAddr;
use std::os::unix::ffi::OsStrExt;

const TCP_LISTEN: u8 = 10;
const TCP_ESTABLISHED: u8 = 1;
const SOCK_STREAM: u8 = 1;
/// `sk_shutdown` bit: nothing more will arrive (the peer closed or shut down writing).
const RCV_SHUTDOWN: u8 = 1;
const ENOENT: i32 = 2;
/// Larger than any datagram the kernel builds for a dump (at most 32 KiB).
const RECV_BUFFER: usize = 64 * 1024;

/// Per socket path: listening backlog and connections with unread requests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Queue {
    /// Connections waiting in the listener's accept queue.
    pub backlog: u32,
    /// Accepted connections whose receive queue holds unread bytes (connections
    /// still in the accept queue are not listed by the kernel: see `backlog`).
    pub pending: u32,
}

impl Queue {
    /// Requests waiting for a worker: queued connections plus accepted
    /// connections whose request has not been read yet.
    pub fn waiting(&self) -> u32 {
        self.backlog + self.pending
    }
}

/// One AF_UNIX socket as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Socket {
    pub inode: u32,
    /// The bound path; an accepted connection carries its listener's.
    pub path: Option<String>,
    pub stream: bool,
    pub listening: bool,
    pub connected: bool,
    /// Listener: connections in its accept queue; otherwise unread bytes.
    pub rqueue: u32,
    /// The peer closed the connection (or shut down its writing side).
    pub peer_closed: bool,
    /// The inode of the other end of a connection, once it has one (an
    /// accepted socket; asked for by `by_inode` only).
    pub peer: Option<u32>,
}

/// Reads every listening or connected AF_UNIX socket bound to a path under
/// `prefix` and counts what waits on each path.
pub fn queues(prefix: &str) -> Result<BTreeMap<String, Queue>> {
    let mut out: BTreeMap<String, Queue> = BTreeMap::new();
    for s in Netlink::open()?.dump(prefix)? {
        let Some(path) = s.path else { continue };
        let q = out.entry(path).or_default();
        if s.listening {
            q.backlog = s.rqueue;
        } else if s.rqueue > 0 {
            q.pending += 1;
        }
    }
    Ok(out)
}

/// For each of `dests`, the TCP connections this host has established or is
/// opening to it (every one of `dests` is in the answer, 0 when none).
pub fn tcp_connections(dests: &BTreeSet<InetAddr>) -> Result<BTreeMap<InetAddr, u32>> {
    let mut out: BTreeMap<InetAddr, u32> = dests.iter().map(|d| (*d, 0)).collect();
    if dests.is_empty() {
        return Ok(out);
    }
    let mut nl = Netlink::open()?;
    for family in [AF_INET, AF_INET6] {
        if !dests.iter().any(|d| d.is_ipv4() == (family == AF_INET)) {
            continue;
        }
        for dest in nl.dump_tcp(family)? {
            if let Some(n) = out.get_mut(&dest) {
                *n += 1;
            }
        }
    }
    Ok(out)
}

/// The sockets with these inodes that still exist (a socket closed since its
/// inode was seen is simply not in the answer).
pub fn by_inode(inodes: &[u32]) -> Result<Vec<Socket>> {
    if inodes.is_empty() {
        return Ok(Vec::new());
    }
    let mut nl = Netlink::open()?;
    let mut out = Vec::new();
    for &inode in inodes {
        if let Some(s) = nl.exact(inode)? {
            out.push(s);
        }
    }
    Ok(out)
}

/// A NETLINK_SOCK_DIAG socket and the sequence number of its last request.
struct Netlink {
    socket: NetlinkSocket,
    port: u32,
    seq: u32,
    buf: Vec<u8>,
}

impl Netlink {
    fn open() -> Result<Netlink> {
        let mut socket =
            NetlinkSocket::new(NETLINK_SOCK_DIAG).context("opening a NETLINK_SOCK_DIAG socket")?;
        let port = socket
            .bind_auto()
            .context("binding the NETLINK_SOCK_DIAG socket")?
            .port_number();
        socket
            .connect(&SocketAddr::new(0, 0))
            .context("connecting the NETLINK_SOCK_DIAG socket to the kernel")?;
        Ok(Netlink {
            socket,
            port,
            seq: 0,
            buf: Vec::with_capacity(RECV_BUFFER),
        })
    }

    fn send(&mut self, request: SockDiagMessage, flags: u16) -> Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, request.into());
        packet.finalize();
        let mut bytes = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut bytes);
        let sent = self
            .socket
            .send(&bytes, 0)
            .context("sending a sock_diag request")?;
        if sent != bytes.len() {
            bail!("sock_diag request sent {sent} of {} bytes", bytes.len());
        }
        Ok(self.seq)
    }

    /// One datagram of answers to request `seq`, checked and parsed.
    fn receive(&mut self, seq: u32) -> Result<Vec<NetlinkMessage<SockDiagMessage>>> {
        self.buf.clear();
        let n = self
            .socket
            .recv(&mut self.buf, nix::libc::MSG_TRUNC)
            .context("reading sock_diag answers")?;
        if n > self.buf.len() {
            bail!(
                "a sock_diag answer of {n} bytes was truncated to {}",
                self.buf.len()
            );
        }
        let mut out = Vec::new();
        let mut off = 0;
        while off < n {
            let msg = NetlinkMessage::<SockDiagMessage>::deserialize(&self.buf[off..n])
                .map_err(|e| anyhow::anyhow!("a sock_diag answer does not parse: {e}"))?;
            let len = msg.header.length as usize;
            if len == 0 {
                bail!("a sock_diag answer has length 0");
            }
            if msg.header.sequence_number != seq {
                bail!(
                    "a sock_diag answer carries sequence {} (asked {seq})",
                    msg.header.sequence_number
                );
            }
            if msg.header.port_number != self.port && msg.header.port_number != 0 {
                bail!(
                    "a sock_diag answer is for port {} (ours is {})",
                    msg.header.port_number,
                    self.port
                );
            }
            if msg.header.flags & NLM_F_DUMP_INTR != 0 {
                bail!("the kernel interrupted the sock_diag dump (sockets changed meanwhile)");
            }
            out.push(msg);
            off += (len + 3) & !3;
        }
        Ok(out)
    }

    /// A dump of listening and connected sockets, filtered to `prefix`.
    fn dump(&mut self, prefix: &str) -> Result<Vec<Socket>> {
        let request = UnixRequest {
            state_flags: StateFlags::LISTEN | StateFlags::ESTABLISHED,
            inode: 0,
            show_flags: ShowFlags::NAME | ShowFlags::RQLEN,
            cookie: [0xff; 8],
        };
        self.dump_each(
            SockDiagMessage::UnixRequest(request),
            |answer| match answer {
                SockDiagMessage::UnixResponse(r) => {
                    let s = socket(&r)?;
                    Ok(s.path
                        .as_deref()
                        .is_some_and(|p| p.starts_with(prefix))
                        .then_some(s))
                }
                other => bail!("unexpected sock_diag answer to a dump: {other:?}"),
            },
        )
    }

    /// The destinations of every TCP socket of `family` in SYN_SENT or
    /// ESTABLISHED, one entry per socket.
    fn dump_tcp(&mut self, family: u8) -> Result<Vec<InetAddr>> {
        let request = InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: inet::StateFlags::SYN_SENT | inet::StateFlags::ESTABLISHED,
            socket_id: if family == AF_INET {
                SocketId::new_v4()
            } else {
                SocketId::new_v6()
            },
        };
        self.dump_each(
            SockDiagMessage::InetRequest(request),
            |answer| match answer {
                SockDiagMessage::InetResponse(r) => {
                    let id = &r.header.socket_id;
                    Ok(Some(InetAddr::new(
                        id.destination_address,
                        id.destination_port,
                    )))
                }
                other => bail!("unexpected sock_diag answer to a TCP dump: {other:?}"),
            },
        )
    }

    /// Sends a dump `request` and reads every answer until the kernel says
    /// done, keeping what `take` makes of each.
    fn dump_each<T>(
        &mut self,
        request: SockDiagMessage,
        mut take: impl FnMut(SockDiagMessage) -> Result<Option<T>>,
    ) -> Result<Vec<T>> {
        let seq = self.send(request, NLM_F_REQUEST | NLM_F_DUMP)?;
        let mut out = Vec::new();
        loop {
            for msg in self.receive(seq)? {
                match msg.payload {
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::InnerMessage(answer) => out.extend(take(answer)?),
                    NetlinkPayload::Error(e) => {
                        bail!("sock_diag answered a dump with an error: {}", e.to_io())
                    }
                    NetlinkPayload::Noop => {}
                    other => bail!("unexpected sock_diag answer to a dump: {other:?}"),
                }
            }
        }
    }

    /// One socket by inode; None when it no longer exists.
    fn exact(&mut self, inode: u32) -> Result<Option<Socket>> {
        let request = UnixRequest {
            state_flags: StateFlags::all(),
            inode,
            show_flags: ShowFlags::NAME | ShowFlags::RQLEN | ShowFlags::PEER,
            cookie: [0xff; 8],
        };
        let seq = self.send(SockDiagMessage::UnixRequest(request), NLM_F_REQUEST)?;
        let answers = self.receive(seq)?;
        let Some(msg) = answers.into_iter().next() else {
            bail!("sock_diag sent an empty answer for inode {inode}");
        };
        match msg.payload {
            NetlinkPayload::InnerMessage(SockDiagMessage::UnixResponse(r)) => {
                if r.header.inode != inode {
                    bail!(
                        "sock_diag answered inode {} for inode {inode}",
                        r.header.inode
                    );
                }
                socket(&r).map(Some)
            }
            NetlinkPayload::Error(e) if e.raw_code() == -ENOENT => Ok(None),
            NetlinkPayload::Error(e) => Err(e.to_io())
                .with_context(|| format!("sock_diag answered an error for inode {inode}")),
            other => bail!("unexpected sock_diag answer for inode {inode}: {other:?}"),
        }
    }
}

/// The socket a response describes; its queue length must be there (asked
/// for with `UDIAG_SHOW_RQLEN`), or the figures would read as "empty".
fn socket(r: &UnixResponse) -> Result<Socket> {
    let listening = r.header.state == TCP_LISTEN;
    let rqueue = if listening {
        r.number_of_pending_connection()
    } else {
        r.receive_queue_size()
    };
    let Some(rqueue) = rqueue else {
        bail!(
            "sock_diag sent no queue length for socket {}",
            r.header.inode
        );
    };
    let path = match r.name() {
        Some(UnixDiagName::Pathname(p)) => Some(String::from_utf8_lossy(p.as_bytes()).into_owned()),
        _ => None,
    };
    Ok(Socket {
        inode: r.header.inode,
        path,
        stream: r.header.kind == SOCK_STREAM,
        listening,
        connected: r.header.state == TCP_ESTABLISHED,
        rqueue,
        peer_closed: r.shutdown_state().unwrap_or(0) & RCV_SHUTDOWN != 0,
        peer: r.peer().filter(|&p| p != 0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::{UnixListener, UnixStream};

    fn inode_of(fd: &impl std::os::fd::AsRawFd) -> u32 {
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
        let link = link.to_string_lossy();
        link.trim_start_matches("socket:[")
            .trim_end_matches(']')
            .parse()
            .unwrap()
    }

    #[test]
    fn counts_tcp_connections_by_destination() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let elsewhere = other.local_addr().unwrap();
        let dests: BTreeSet<InetAddr> = [addr, elsewhere].into_iter().collect();
        let before = tcp_connections(&dests).unwrap();
        assert_eq!(before.get(&addr), Some(&0));
        let a = std::net::TcpStream::connect(addr).unwrap();
        let b = std::net::TcpStream::connect(addr).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let c = std::net::TcpStream::connect(elsewhere).unwrap();
        let now = tcp_connections(&dests).unwrap();
        // The accepted end's destination is the client's port: not counted.
        assert_eq!(now.get(&addr), Some(&2), "{now:?}");
        assert_eq!(now.get(&elsewhere), Some(&1), "{now:?}");
        drop((a, b, c, accepted));
    }

    #[test]
    fn counts_backlog_and_unread_requests() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("1.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let prefix = dir.path().to_string_lossy().into_owned();
        let p = path.to_string_lossy().into_owned();
        assert_eq!(queues(&prefix).unwrap().get(&p), Some(&Queue::default()));
        let mut a = UnixStream::connect(&path).unwrap();
        let mut b = UnixStream::connect(&path).unwrap();
        a.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        b.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let q = queues(&prefix).unwrap()[&p];
        assert_eq!(
            q,
            Queue {
                backlog: 2,
                pending: 0
            }
        );
        assert_eq!(q.waiting(), 2);
        let (_accepted, _) = listener.accept().unwrap();
        let q = queues(&prefix).unwrap()[&p];
        assert_eq!(
            q,
            Queue {
                backlog: 1,
                pending: 1
            },
            "accepted but unread counts as pending"
        );
        assert_eq!(q.waiting(), 2);
        assert!(
            queues(&prefix)
                .unwrap()
                .keys()
                .all(|k| k.starts_with(&prefix)),
            "only sockets under the prefix"
        );
    }

    #[test]
    fn by_inode_sees_a_peer_close() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pool.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let client = UnixStream::connect(&path).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let ino = inode_of(&accepted);
        let s = by_inode(&[ino]).unwrap();
        assert_eq!(s.len(), 1);
        assert!(s[0].connected && s[0].stream && !s[0].peer_closed);
        assert_eq!(
            s[0].path.as_deref(),
            Some(path.to_str().unwrap()),
            "an accepted connection carries its listener's path"
        );
        let client_ino = inode_of(&client);
        let c = by_inode(&[client_ino]).unwrap();
        assert_eq!(
            c[0].peer,
            Some(ino),
            "the client's peer is the accepted socket"
        );
        assert_eq!(s[0].peer, Some(client_ino));
        let waiting = UnixStream::connect(&path).unwrap();
        assert_eq!(
            by_inode(&[inode_of(&waiting)]).unwrap()[0].peer,
            None,
            "a connection nobody accepted yet has no peer inode"
        );
        let listener_ino = inode_of(&listener);
        assert!(by_inode(&[listener_ino]).unwrap()[0].listening);
        drop(client);
        let s = by_inode(&[ino]).unwrap();
        assert!(s[0].peer_closed, "the peer closed: {s:?}");
        drop(accepted);
        assert_eq!(by_inode(&[ino]).unwrap(), vec![], "a closed socket is gone");
    }
}
