//! The host side of the guest command channel: JSON lines over a unix
//! socket (the nspawn bind-mounted agent socket, or QEMU's chardev socket
//! that feeds the guest's virtio-serial port).
use anyhow::{anyhow, bail, Context, Result};
use base64::Engine;
use serde::Deserialize;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What a guest command returned.
#[derive(Debug, Clone)]
pub struct Output {
    pub rc: i32,
    pub stdout: String,
    pub stderr: String,
}

#[derive(Deserialize)]
struct Response {
    id: u64,
    rc: Option<i32>,
    out: Option<String>,
    err: Option<String>,
    pong: Option<String>,
}

pub struct Agent {
    path: PathBuf,
    stream: Option<UnixStream>,
    pending: Vec<u8>,
    next_id: u64,
}

impl Agent {
    pub fn new(path: &Path) -> Agent {
        Agent {
            path: path.to_owned(),
            stream: None,
            pending: Vec::new(),
            next_id: 1,
        }
    }

    fn stream(&mut self) -> Result<&mut UnixStream> {
        if self.stream.is_none() {
            let s = UnixStream::connect(&self.path).with_context(|| {
                format!("connecting to the agent socket {}", self.path.display())
            })?;
            self.stream = Some(s);
            self.pending.clear();
        }
        self.stream
            .as_mut()
            .ok_or_else(|| anyhow!("no agent connection"))
    }

    fn send(&mut self, value: serde_json::Value) -> Result<()> {
        let mut line = value.to_string();
        line.push('\n');
        let res = self.stream()?.write_all(line.as_bytes());
        if res.is_err() {
            self.stream = None;
        }
        res.context("writing to the agent")
    }

    /// Reads lines until the response with `id` arrives or `deadline` passes.
    /// Lines with other ids (stale pings from before a reboot) are dropped.
    fn receive(&mut self, id: u64, deadline: Instant) -> Result<Option<Response>> {
        loop {
            while let Some(pos) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=pos).collect();
                if let Ok(resp) = serde_json::from_slice::<Response>(&line) {
                    if resp.id == id {
                        return Ok(Some(resp));
                    }
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let stream = self.stream()?;
            stream.set_read_timeout(Some((deadline - now).max(Duration::from_millis(10))))?;
            let mut buf = [0u8; 65536];
            match stream.read(&mut buf) {
                Ok(0) => {
                    self.stream = None;
                    bail!("the agent closed the connection");
                }
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    self.stream = None;
                    return Err(e).context("reading from the agent");
                }
            }
        }
    }

    /// One ping: the guest's boot id, or None if no answer within `wait`.
    pub fn ping(&mut self, wait: Duration) -> Result<Option<String>> {
        let id = self.take_id();
        self.send(serde_json::json!({"id": id, "ping": true}))?;
        Ok(self
            .receive(id, Instant::now() + wait)?
            .and_then(|r| r.pong))
    }

    /// Runs `cmd` under `timeout` in the guest.
    pub fn run(&mut self, cmd: &str, timeout: Duration) -> Result<Output> {
        let id = self.take_id();
        let secs = timeout.as_secs().max(1);
        self.send(serde_json::json!({"id": id, "cmd": cmd, "timeout": secs}))?;
        let deadline = Instant::now() + timeout + Duration::from_secs(40);
        let resp = self.receive(id, deadline)?.ok_or_else(|| {
            anyhow!(
                "no answer from the guest agent within {}s for: {cmd}",
                secs + 40
            )
        })?;
        let b64 = base64::engine::general_purpose::STANDARD;
        let decode = |s: Option<String>| -> String {
            String::from_utf8_lossy(&b64.decode(s.unwrap_or_default()).unwrap_or_default())
                .into_owned()
        };
        Ok(Output {
            rc: resp.rc.unwrap_or(-1),
            stdout: decode(resp.out),
            stderr: decode(resp.err),
        })
    }

    pub fn disconnect(&mut self) {
        self.stream = None;
        self.pending.clear();
    }

    fn take_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
}
