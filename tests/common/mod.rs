//! A raw HTTP/1.1 client over a unix socket, for the gateway's host tests
//! (each test binary uses part of it), and the gateway they start
//! ([`gateway`]).
#![allow(dead_code)]

pub mod gateway;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

/// The shell function the test programs wait with: `wait_release` returns
/// once the test created "release" next to the program (a bounded count of
/// looks, not a time: the program exits 1, no answer, if it never comes).
const WAIT_RELEASE: &str = r#"wait_release() {
  n=0; while [ ! -e "${0%/*}/release" ]; do
    n=$((n+1)); [ $n -lt 2400 ] || exit 1; sleep 0.05
  done
}
"#;

/// Writes an executable shell CGI program to `path`: `cases` (its body)
/// after the shebang and [`WAIT_RELEASE`].
pub fn write_program(path: &Path, cases: &str) {
    let text = format!("#!/bin/sh\n{WAIT_RELEASE}{cases}");
    std::fs::write(path, text).expect("writing the program");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

pub struct Client {
    pub stream: UnixStream,
    pub reader: BufReader<UnixStream>,
}

/// See [`Client::so_far`].
#[derive(Debug, PartialEq, Eq)]
pub enum SoFar {
    Nothing,
    Data,
    Closed,
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

impl Client {
    /// A client on a connected stream (its timeouts already set).
    pub fn new(stream: UnixStream) -> Client {
        Client {
            reader: BufReader::new(stream.try_clone().expect("clone")),
            stream,
        }
    }

    /// A GET with an X-Request-ID, on this connection.
    pub fn get(&mut self, target: &str, rid: &str) {
        let head = format!("GET {target} HTTP/1.1\r\nHost: t\r\nX-Request-ID: {rid}\r\n\r\n");
        self.stream.write_all(head.as_bytes()).expect("sending");
    }

    pub fn send(&mut self, head: &str, body: &[u8]) {
        self.stream
            .write_all(head.as_bytes())
            .expect("sending a head");
        self.stream.write_all(body).expect("sending a body");
    }

    pub fn line(&mut self) -> String {
        let mut l = String::new();
        self.reader.read_line(&mut l).expect("reading a line");
        l.trim_end_matches(['\r', '\n']).to_string()
    }

    pub fn response(&mut self) -> Response {
        let status_line = self.line();
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not a status line: {status_line:?}"));
        let mut headers = Vec::new();
        loop {
            let l = self.line();
            if l.is_empty() {
                break;
            }
            let (k, v) = l.split_once(':').expect("a header line");
            headers.push((k.to_string(), v.trim().to_string()));
        }
        let mut r = Response {
            status,
            headers,
            body: String::new(),
        };
        let mut body = Vec::new();
        if let Some(n) = r.header("Content-Length") {
            let n: usize = n.parse().expect("Content-Length");
            body.resize(n, 0);
            self.reader.read_exact(&mut body).expect("reading the body");
        } else if r.header("Transfer-Encoding") == Some("chunked") {
            loop {
                let size = usize::from_str_radix(&self.line(), 16).expect("chunk size");
                let mut chunk = vec![0; size];
                self.reader.read_exact(&mut chunk).expect("a chunk");
                assert_eq!(self.line(), "", "CRLF after a chunk");
                if size == 0 {
                    break;
                }
                body.extend(chunk);
            }
        } else if r.header("Connection") == Some("close") {
            // Delimited by the end of the connection (HTTP/1.0).
            self.reader
                .read_to_end(&mut body)
                .expect("reading the body to the end");
        }
        r.body = String::from_utf8_lossy(&body).into_owned();
        r
    }

    /// True when the gateway closed the connection (EOF, nothing more).
    /// What has arrived on this connection so far, without waiting
    /// (consumes at most one byte, so only for a check).
    pub fn so_far(&mut self) -> SoFar {
        if !self.reader.buffer().is_empty() {
            return SoFar::Data;
        }
        self.stream.set_nonblocking(true).expect("nonblocking");
        let mut byte = [0u8; 1];
        let got = (&self.stream).read(&mut byte);
        self.stream.set_nonblocking(false).expect("blocking");
        match got {
            Ok(0) => SoFar::Closed,
            Ok(_) => SoFar::Data,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => SoFar::Nothing,
            Err(_) => SoFar::Closed,
        }
    }

    pub fn closed(&mut self) -> bool {
        let mut rest = Vec::new();
        matches!(self.reader.read_to_end(&mut rest), Ok(0))
    }
}

/// Sends SIGTERM to the gateway `pid` and returns once its signal thread
/// (named `signals`, blocked in sigwait) has taken it and gone back to
/// waiting, so the gateway's stop flag is set: what the test does next
/// happens after the gateway knows it is stopping, on a machine of any
/// load. (The kernel's own counters, no clock: SIGTERM no longer pending
/// and one more voluntary context switch of that thread.)
pub fn sigterm_and_wait_taken(pid: u32) {
    let task = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("listing the gateway's threads")
        .map(|e| e.expect("a thread").path())
        .find(|t| std::fs::read_to_string(t.join("comm")).is_ok_and(|c| c.trim_end() == "signals"))
        .unwrap_or_else(|| panic!("gateway {pid} has no thread named \"signals\""));
    let field = |name: &str| -> u64 {
        let status = std::fs::read_to_string(task.join("status")).expect("reading its status");
        let value = status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {status}"))
            .trim();
        if name == "ShdPnd:" {
            u64::from_str_radix(value, 16).expect("a signal mask")
        } else {
            value.parse().expect("a count")
        }
    };
    let before = field("voluntary_ctxt_switches:");
    let pid = nix::unistd::Pid::from_raw(pid as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("kill");
    let sigterm = 1u64 << (nix::sys::signal::Signal::SIGTERM as u32 - 1);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while field("ShdPnd:") & sigterm != 0 || field("voluntary_ctxt_switches:") <= before {
        assert!(
            std::time::Instant::now() < deadline,
            "the gateway's signal thread did not take SIGTERM within 60 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
