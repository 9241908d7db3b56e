//! The host-wide lock that serialises apply, scale and down.
use anyhow::{bail, Context, Result};
use nix::fcntl::{Flock, FlockArg};
use std::fs::{self, File};
use std::path::Path;
use std::time::{Duration, Instant};

pub const LOCK_PATH: &str = "/run/cgipool/lock";

pub struct Lock(#[allow(dead_code)] Flock<File>);

/// Takes the lock, waiting up to `wait` for another cgipool to finish.
pub fn acquire(path: &Path, wait: Duration) -> Result<Lock> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let deadline = Instant::now() + wait;
    loop {
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(Lock(lock)),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100))
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => bail!(
                "another cgipool apply/scale/down holds {} (waited {}s)",
                path.display(),
                wait.as_secs()
            ),
            Err((_, e)) => return Err(e).with_context(|| format!("locking {}", path.display())),
        }
    }
}
