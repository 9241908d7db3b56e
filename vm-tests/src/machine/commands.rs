//! Running commands in the guest: each goes through the agent and into
//! the transcript; `succeed` and `fail` check its exit status and show the
//! tail of what it printed, `wait_until_succeeds` retries it within a
//! scaled limit; every message of a limit that ran out names the factor.
use super::Machine;
use crate::agent::Output;
use anyhow::{bail, Result};
use std::fmt::Write as _;
use std::thread::sleep;
use std::time::{Duration, Instant};

impl Machine {
    /// Runs a command; never fails on a non-zero exit status.
    pub fn execute(&mut self, cmd: &str, timeout: Duration) -> Result<Output> {
        self.check_alive()?;
        let t = Instant::now();
        let out = self.agent.run(cmd, timeout);
        let took = t.elapsed().as_secs_f64();
        match &out {
            Ok(o) => {
                let _ = writeln!(self.transcript, "$ {cmd}\n[rc={} {:.2}s]", o.rc, took);
                for (tag, s) in [("out", &o.stdout), ("err", &o.stderr)] {
                    for line in s.lines().take(200) {
                        let _ = writeln!(self.transcript, "  {tag}| {line}");
                    }
                }
            }
            Err(e) => {
                let _ = writeln!(
                    self.transcript,
                    "$ {cmd}\n[agent error after {took:.2}s: {e:#}]"
                );
            }
        }
        out
    }

    /// Runs a command that must exit 0; returns its stdout.
    pub fn succeed(&mut self, cmd: &str) -> Result<String> {
        let limit = self.scaled(Duration::from_secs(60));
        self.succeed_within(cmd, limit)
    }

    /// Like `succeed`, with `limit` as given (scale it with `scaled`).
    pub fn succeed_within(&mut self, cmd: &str, limit: Duration) -> Result<String> {
        let o = self.execute(cmd, limit)?;
        if o.rc == 124 {
            bail!(
                "command ran out of its {:.1}s limit (factor {:.2} in force: calibration {:.2} x VM_TEST_TIMEOUT_FACTOR {}): {cmd}\nstdout: {}\nstderr: {}",
                limit.as_secs_f64(),
                self.factor,
                self.factor / self.manual,
                self.manual,
                tail(&o.stdout),
                tail(&o.stderr)
            );
        }
        if o.rc != 0 {
            bail!(
                "command failed (exit {}): {cmd}\nstdout: {}\nstderr: {}",
                o.rc,
                tail(&o.stdout),
                tail(&o.stderr)
            );
        }
        Ok(o.stdout)
    }

    /// Runs a command that must exit non-zero; returns its stdout and stderr.
    pub fn fail(&mut self, cmd: &str) -> Result<Output> {
        let limit = self.scaled(Duration::from_secs(60));
        let o = self.execute(cmd, limit)?;
        if o.rc == 0 {
            bail!(
                "command succeeded but was expected to fail: {cmd}\nstdout: {}",
                tail(&o.stdout)
            );
        }
        Ok(o)
    }

    /// Retries `cmd` until it exits 0, at most `limit` (scaled).
    pub fn wait_until_succeeds(&mut self, cmd: &str, what: &str, base: Duration) -> Result<String> {
        let limit = self.scaled(base);
        let deadline = Instant::now() + limit;
        let mut last;
        loop {
            let o = self.execute(cmd, limit.max(Duration::from_secs(5)))?;
            if o.rc == 0 {
                return Ok(o.stdout);
            }
            last = o;
            if Instant::now() >= deadline {
                bail!(
                    "timed out after {:.1}s waiting for {what} ({}; `{cmd}`: exit {}, {})",
                    limit.as_secs_f64(),
                    self.limit_note(base),
                    last.rc,
                    tail(&format!("{}{}", last.stdout, last.stderr))
                );
            }
            sleep(Duration::from_millis(200));
        }
    }
}

/// `s` as one word of a POSIX shell command line (single-quoted).
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The last 20 lines of `s`, for an error message.
fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    let start = lines.len().saturating_sub(20);
    lines[start..].join("\n")
}
