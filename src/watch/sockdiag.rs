//! The kernel's view of the worker sockets (NETLINK_SOCK_DIAG for AF_UNIX,
//! what `ss -x` shows): how many requests wait on each socket path, counted
//! as connections queued on the listener plus accepted connections whose
//! receive queue holds bytes a busy worker has not read yet.
use anyhow::{bail, Context, Result};
use nix::libc;
use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const UDIAG_SHOW_NAME: u32 = 0x01;
const UDIAG_SHOW_RQLEN: u32 = 0x10;
const UNIX_DIAG_NAME: u16 = 0;
const UNIX_DIAG_RQLEN: u16 = 4;
const TCP_ESTABLISHED: u32 = 1;
const TCP_LISTEN: u32 = 10;

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

/// Reads every AF_UNIX socket bound to a path under `prefix`.
pub fn queues(prefix: &str) -> Result<BTreeMap<String, Queue>> {
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("opening a NETLINK_SOCK_DIAG socket");
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    send_request(&fd)?;
    let mut out: BTreeMap<String, Queue> = BTreeMap::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error()).context("reading sock_diag answers");
        }
        if parse_batch(&buf[..n as usize], prefix, &mut out)? {
            return Ok(out);
        }
    }
}

fn send_request(fd: &OwnedFd) -> Result<()> {
    let mut msg = Vec::with_capacity(40);
    let len: u32 = 16 + 24;
    msg.extend_from_slice(&len.to_ne_bytes());
    msg.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    msg.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // pid
    msg.push(libc::AF_UNIX as u8);
    msg.push(0);
    msg.extend_from_slice(&0u16.to_ne_bytes());
    msg.extend_from_slice(&((1u32 << TCP_ESTABLISHED) | (1u32 << TCP_LISTEN)).to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes()); // ino
    msg.extend_from_slice(&(UDIAG_SHOW_NAME | UDIAG_SHOW_RQLEN).to_ne_bytes());
    msg.extend_from_slice(&[0xff; 8]); // cookie: none
    let sent = unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    if sent < 0 {
        return Err(std::io::Error::last_os_error()).context("sending the sock_diag request");
    }
    Ok(())
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Parses one recv() worth of netlink messages; true once NLMSG_DONE is seen.
fn parse_batch(b: &[u8], prefix: &str, out: &mut BTreeMap<String, Queue>) -> Result<bool> {
    let mut off = 0;
    while off + 16 <= b.len() {
        let len = u32_at(b, off) as usize;
        let kind = u16_at(b, off + 4);
        if len < 16 || off + len > b.len() {
            bail!("malformed netlink message");
        }
        match kind as i32 {
            libc::NLMSG_DONE => return Ok(true),
            libc::NLMSG_ERROR => bail!("sock_diag answered an error"),
            _ => parse_socket(&b[off + 16..off + len], prefix, out),
        }
        off += (len + 3) & !3;
    }
    Ok(false)
}

fn parse_socket(m: &[u8], prefix: &str, out: &mut BTreeMap<String, Queue>) {
    if m.len() < 16 {
        return;
    }
    let state = u32::from(m[2]);
    let (mut name, mut rqueue) = (None, 0u32);
    let mut off = 16;
    while off + 4 <= m.len() {
        let alen = u16_at(m, off) as usize;
        let akind = u16_at(m, off + 2);
        if alen < 4 || off + alen > m.len() {
            break;
        }
        let data = &m[off + 4..off + alen];
        match akind {
            UNIX_DIAG_NAME => {
                name = Some(
                    String::from_utf8_lossy(data)
                        .trim_end_matches('\0')
                        .to_string(),
                )
            }
            UNIX_DIAG_RQLEN if data.len() >= 4 => rqueue = u32_at(data, 0),
            _ => {}
        }
        off += (alen + 3) & !3;
    }
    let Some(name) = name.filter(|n| n.starts_with(prefix)) else {
        return;
    };
    let q = out.entry(name).or_default();
    if state == TCP_LISTEN {
        q.backlog = rqueue;
    } else if rqueue > 0 {
        q.pending += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::{UnixListener, UnixStream};

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
    }
}
