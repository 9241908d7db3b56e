//! A raw HTTP/1.1 client over a unix socket, for the gateway's host tests
//! (each test binary uses part of it).
#![allow(dead_code)]
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;

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
