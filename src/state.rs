//! Host state that cgipool owns, in one place: the paths it keeps under
//! /run/cgipool and /var/lib/cgipool, the host-wide lock, the recorded
//! intent and the decision log.
//!
//! The intent is what every actor converges to. `apply` records it (the exact
//! config bytes it parsed and the count of every pool) under the lock before
//! it touches anything; `scale` and watch's autoscaler change only a count in
//! it, also under the lock. Anything that converges (apply, scale, watch)
//! reads the last recorded intent, so an apply that was cut short is finished
//! by whoever runs next, and nobody brings back an older config.
use crate::config::{self, Config};
use crate::files::write_atomic;
use crate::plan::Pending;
use anyhow::{Context, Result};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Where worker sockets live (`<pool>/<n>.sock`) and watch's socket.
pub const RUN_DIR: &str = "/run/cgipool";
/// Where the intent and the decision log live (kept across reboots).
pub const STATE_DIR: &str = "/var/lib/cgipool";
/// watch's /pool-status and /metrics socket.
pub const WATCH_SOCKET: &str = "/run/cgipool/watch.sock";

/// The files of one host's state. Tests point them at a temporary directory.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The lock; a dot file, so no pool's socket directory can collide with it.
    pub lock: PathBuf,
    pub intent: PathBuf,
    pub decisions: PathBuf,
    /// The nginx files as they were before a candidate was installed for
    /// `nginx -t` (present only while a check or an install is in flight).
    pub nginx_backup: PathBuf,
    /// What a run is about to do that the unit files will not show once
    /// written (daemon-reload, rolling restarts); see [`Pending`].
    pub pending: PathBuf,
}

impl Paths {
    pub fn host() -> Paths {
        Paths::under(Path::new(RUN_DIR), Path::new(STATE_DIR))
    }

    pub fn under(run: &Path, state: &Path) -> Paths {
        Paths {
            lock: run.join(".lock"),
            intent: state.join("intent.json"),
            decisions: state.join("decisions.jsonl"),
            nginx_backup: state.join("nginx-backup.json"),
            pending: state.join("pending.json"),
        }
    }
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The host-wide lock that serialises apply, scale, down and watch's
/// converges. Released when dropped (or when the process dies). It carries
/// the paths it guards, so what is written only under it (the intent) is
/// reached through it.
pub struct Lock {
    _flock: Flock<File>,
    paths: Paths,
}

impl Lock {
    /// The host state this lock guards.
    pub fn paths(&self) -> &Paths {
        &self.paths
    }
}

/// The lock is held by another cgipool process (any other failure to take
/// it is an error of its own).
#[derive(Debug, thiserror::Error)]
#[error("another cgipool apply/scale/down/watch holds {} (waited {}s)", path.display(), waited.as_secs())]
pub struct Busy {
    pub path: PathBuf,
    pub waited: Duration,
}

/// Takes the lock, waiting up to `wait` for another cgipool to finish
/// ([`Busy`] if it did not).
pub fn lock(paths: &Paths, wait: Duration) -> Result<Lock> {
    let path = &paths.lock;
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
            Ok(flock) => {
                return Ok(Lock {
                    _flock: flock,
                    paths: paths.clone(),
                })
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100))
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                return Err(Busy {
                    path: path.clone(),
                    waited: wait,
                }
                .into())
            }
            Err((_, e)) => return Err(e).with_context(|| format!("locking {}", path.display())),
        }
    }
}

/// What the host converges to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    /// Grows by one with every recorded change.
    pub serial: u64,
    /// Where the config was read from (for messages and `cgipool status`;
    /// nothing generated depends on it).
    pub config_path: PathBuf,
    /// The exact bytes that were parsed.
    pub config_text: String,
    /// The running count of every pool, within its [min, max].
    pub counts: BTreeMap<String, u32>,
    /// Where the units live (/etc/systemd/system, or /run/... with --runtime).
    pub unit_dir: PathBuf,
    /// Who recorded this: apply, scale, watch, down.
    pub written_by: String,
    pub at_unix: u64,
}

impl Intent {
    /// The recorded config, parsed as it was when it was recorded.
    pub fn config(&self) -> Result<Config> {
        config::parse(&self.config_path, &self.config_text).map_err(|e| {
            anyhow::anyhow!(
                "the recorded intent's config (from {}) no longer parses: {e}",
                self.config_path.display()
            )
        })
    }

    /// The count each pool of `cfg` should run: the recorded one if any
    /// (clamped to the new [min, max]), else min.
    pub fn counts_for(previous: Option<&Intent>, cfg: &Config) -> BTreeMap<String, u32> {
        cfg.pools
            .iter()
            .map(|(name, pool)| {
                let n = previous
                    .and_then(|i| i.counts.get(name).copied())
                    .unwrap_or(pool.min);
                (name.clone(), n.clamp(pool.min, pool.max))
            })
            .collect()
    }
}

/// The recorded intent, if any.
pub fn read_intent(paths: &Paths) -> Result<Option<Intent>> {
    match fs::read_to_string(&paths.intent) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .with_context(|| format!("{} is not a cgipool intent", paths.intent.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", paths.intent.display())),
    }
}

/// Records `intent` (atomically, synced) with the next serial; returns it.
pub fn write_intent(lock: &Lock, mut intent: Intent) -> Result<Intent> {
    let paths = lock.paths();
    let previous = read_intent(paths).ok().flatten().map(|i| i.serial);
    intent.serial = previous.unwrap_or(0) + 1;
    intent.at_unix = now_unix();
    let text = serde_json::to_string_pretty(&intent)?;
    write_atomic(&paths.intent, text.as_bytes(), 0o600)
        .with_context(|| format!("recording the intent in {}", paths.intent.display()))?;
    Ok(intent)
}

/// Forgets the intent (after `cgipool down`).
pub fn remove_intent(lock: &Lock) -> Result<()> {
    let paths = lock.paths();
    match fs::remove_file(&paths.intent) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", paths.intent.display())),
    }
}

/// What an earlier run recorded and did not finish (empty if none).
pub fn read_pending(paths: &Paths) -> Result<Pending> {
    match fs::read_to_string(&paths.pending) {
        Ok(text) => serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a cgipool pending record",
                paths.pending.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Pending::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", paths.pending.display())),
    }
}

/// Records `pending` (atomically, synced); an empty one removes the record.
pub fn write_pending(paths: &Paths, pending: &Pending) -> Result<()> {
    if pending.is_empty() {
        return match fs::remove_file(&paths.pending) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing {}", paths.pending.display())),
        };
    }
    let text = serde_json::to_string_pretty(pending)?;
    write_atomic(&paths.pending, text.as_bytes(), 0o600)
        .with_context(|| format!("recording {}", paths.pending.display()))
}

/// One change of a pool's count, by anyone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub at_unix: u64,
    /// apply, scale, watch.
    pub by: String,
    pub pool: String,
    pub from: u32,
    pub to: u32,
    pub reason: String,
    /// The intent serial that carries this count.
    pub serial: u64,
}

/// The log keeps at most this many bytes; older lines are dropped.
const DECISION_LOG_LIMIT: u64 = 1 << 20;

/// Appends a decision to the log (one JSON line, synced).
pub fn log_decision(paths: &Paths, d: &Decision) -> Result<()> {
    let path = &paths.decisions;
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if fs::metadata(path).map(|m| m.len()).unwrap_or(0) > DECISION_LOG_LIMIT {
        let text = fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let keep = lines[lines.len() / 2..].join("\n") + "\n";
        write_atomic(path, keep.as_bytes(), 0o644)?;
    }
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    writeln!(f, "{}", serde_json::to_string(d)?)?;
    f.sync_all()?;
    Ok(())
}

/// Every decision in the log, oldest first (unreadable lines skipped).
pub fn read_decisions(paths: &Paths) -> Vec<Decision> {
    fs::read_to_string(&paths.decisions)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The latest decision per pool.
pub fn last_decisions(paths: &Paths) -> BTreeMap<String, Decision> {
    read_decisions(paths)
        .into_iter()
        .map(|d| (d.pool.clone(), d))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(dir: &Path) -> Paths {
        Paths::under(&dir.join("run"), &dir.join("state"))
    }

    const CONFIG: &str =
        "[pool.search]\nexec = \"/bin/true\"\nroute = \"/api/search\"\nmin = 2\nmax = 6\n";

    fn intent(counts: &[(&str, u32)]) -> Intent {
        Intent {
            serial: 0,
            config_path: PathBuf::from("/etc/cgipool/cgipool.toml"),
            config_text: CONFIG.into(),
            counts: counts.iter().map(|(p, n)| (p.to_string(), *n)).collect(),
            unit_dir: PathBuf::from("/etc/systemd/system"),
            written_by: "apply".into(),
            at_unix: 0,
        }
    }

    #[test]
    fn intent_round_trips_with_growing_serials() {
        let dir = tempfile::tempdir().unwrap();
        let p = paths(dir.path());
        assert_eq!(read_intent(&p).unwrap(), None);
        let l = lock(&p, Duration::ZERO).unwrap();
        let first = write_intent(&l, intent(&[("search", 2)])).unwrap();
        let second = write_intent(&l, intent(&[("search", 4)])).unwrap();
        assert_eq!((first.serial, second.serial), (1, 2));
        let read = read_intent(&p).unwrap().unwrap();
        assert_eq!(read, second);
        assert_eq!(read.config().unwrap().pools["search"].max, 6);
        remove_intent(&l).unwrap();
        assert_eq!(read_intent(&p).unwrap(), None);
    }

    #[test]
    fn counts_follow_the_previous_intent_clamped_to_the_new_limits() {
        let cfg = config::parse(Path::new("/x.toml"), CONFIG).unwrap();
        assert_eq!(Intent::counts_for(None, &cfg)["search"], 2);
        let prev = intent(&[("search", 5)]);
        assert_eq!(Intent::counts_for(Some(&prev), &cfg)["search"], 5);
        let prev = intent(&[("search", 9)]);
        assert_eq!(Intent::counts_for(Some(&prev), &cfg)["search"], 6);
    }

    #[test]
    fn the_lock_is_exclusive_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let p = paths(dir.path());
        let held = lock(&p, Duration::ZERO).unwrap();
        let err = lock(&p, Duration::from_millis(200)).err().unwrap();
        assert!(err.to_string().contains("holds"), "{err}");
        drop(held);
        lock(&p, Duration::ZERO).unwrap();
    }

    #[test]
    fn decisions_are_appended_and_the_last_per_pool_wins() {
        let dir = tempfile::tempdir().unwrap();
        let p = paths(dir.path());
        for (by, to) in [("watch", 4), ("scale", 3)] {
            log_decision(
                &p,
                &Decision {
                    at_unix: 1,
                    by: by.into(),
                    pool: "search".into(),
                    from: 2,
                    to,
                    reason: "test".into(),
                    serial: 1,
                },
            )
            .unwrap();
        }
        assert_eq!(read_decisions(&p).len(), 2);
        assert_eq!(last_decisions(&p)["search"].by, "scale");
    }
}
