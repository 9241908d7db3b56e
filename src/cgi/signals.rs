//! SIGTERM and SIGINT: a stop, restart or roll of the worker unit.
//!
//! Both are blocked in every thread and taken by one thread with sigwait,
//! which sets [`STOP`] and wakes the accept loop through a pipe. The
//! gateway then serves what is already waiting, each with
//! `Connection: close`, and exits; new connections stay in the socket's
//! queue for the next instance (systemd keeps the socket).

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;

use anyhow::{Context, Result};

static STOP: AtomicBool = AtomicBool::new(false);

/// Whether SIGTERM or SIGINT came.
pub fn stopping() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Stops the gateway as SIGTERM does, from its own loop (the worker's
/// `CGIPOOL_MAX_REQUESTS` was reached): the request being taken is answered
/// with `Connection: close`, what was already received is served, and
/// nothing more is accepted.
pub fn stop() {
    STOP.store(true, Ordering::SeqCst);
}

/// Blocks SIGTERM/SIGINT and starts the thread that sets [`STOP`] and
/// writes to `wake` when one comes. Call before any other thread starts.
pub fn handle(wake: OwnedFd) -> Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    // Blocked in this thread and (inherited) in every thread spawned later;
    // std resets the mask in the CGI programs it spawns.
    set.thread_block().context("blocking SIGTERM")?;
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            if set.wait().is_err() {
                continue;
            }
            STOP.store(true, Ordering::SeqCst);
            let _ = nix::unistd::write(&wake, b"x");
        })
        .context("starting the signal thread")?;
    Ok(())
}
