//! Making sure nothing a CGI program started outlives its request.
//!
//! The gateway is a child subreaper (`PR_SET_CHILD_SUBREAPER`): a process
//! whose parent dies is reparented to the gateway instead of PID 1, even
//! after `setsid` or a double fork. So every process the program started is
//! a descendant of the gateway, and `/proc/*/stat` (PPid chains) finds them
//! all. After each request the gateway kills every descendant and reaps
//! them, looping until none is left, or for at most a bound: a process
//! that SIGKILL does not end (stuck in the kernel) is remembered as
//! [`Stuck`], killed again with the others but not waited for again, and
//! reaped whenever it exits.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

pub fn become_subreaper() -> nix::Result<()> {
    nix::sys::prctl::set_child_subreaper(true)
}

/// `(pid, ppid)` from the contents of `/proc/PID/stat`. The command name is
/// in parentheses and may itself contain spaces and parentheses, so the
/// fields are taken after the last `)`.
pub fn parse_stat(stat: &str) -> Option<(i32, i32)> {
    let (pid, _) = stat.split_once(' ')?;
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace();
    let _state = fields.next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((pid.trim().parse().ok()?, ppid))
}

/// The descendants of `root` given every process's parent.
pub fn descendants_in(parents: &BTreeMap<i32, i32>, root: i32) -> BTreeSet<i32> {
    let mut children: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
    for (&pid, &ppid) in parents {
        children.entry(ppid).or_default().push(pid);
    }
    let mut out = BTreeSet::new();
    let mut todo = vec![root];
    while let Some(p) = todo.pop() {
        for &c in children.get(&p).map(Vec::as_slice).unwrap_or(&[]) {
            if c != root && out.insert(c) {
                todo.push(c);
            }
        }
    }
    out
}

/// Every process in /proc with its parent (processes that vanish while
/// scanning are skipped).
fn scan_proc() -> BTreeMap<i32, i32> {
    let mut parents = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return parents;
    };
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{name}/stat")) {
            if let Some((pid, ppid)) = parse_stat(&stat) {
                parents.insert(pid, ppid);
            }
        }
    }
    parents
}

/// The current descendants of this process.
pub fn descendants() -> BTreeSet<i32> {
    descendants_in(&scan_proc(), std::process::id() as i32)
}

/// SIGKILLs every descendant of this process; returns how many there were.
pub fn kill_descendants() -> usize {
    let d = descendants();
    for &pid in &d {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    d.len()
}

/// SIGKILLs every descendant of this process, then again those a new scan
/// finds that were not killed yet (forked while the scan before ran; a
/// killed process forks no more, and the orphans of killed parents are
/// reparented to this subreaper), until a scan finds none new or `passes`
/// scans were made.
pub fn kill_descendants_settled(passes: usize) {
    let mut killed = BTreeSet::new();
    for _ in 0..passes {
        let new: Vec<i32> = descendants().difference(&killed).copied().collect();
        if new.is_empty() {
            return;
        }
        for &pid in &new {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        killed.extend(new);
    }
}

/// Processes of earlier requests that did not exit in time after SIGKILL
/// (stuck in uninterruptible sleep, or an exit only a tracer sees). No
/// request waits for them again; they leave the set when reaped, and a pid
/// is not reused before that, so the set holds only processes that exist.
#[derive(Debug, Default)]
pub struct Stuck(BTreeSet<i32>);

impl Stuck {
    pub fn add(&mut self, pid: i32) {
        self.0.insert(pid);
    }

    pub fn contains(&self, pid: i32) -> bool {
        self.0.contains(&pid)
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Those of `pids` not known to be stuck.
    pub fn others(&self, pids: BTreeSet<i32>) -> BTreeSet<i32> {
        pids.into_iter().filter(|p| !self.contains(*p)).collect()
    }
}

/// Reaps every child that has exited, without blocking (a stuck one
/// reaped leaves `stuck`). Returns true when this process has no children
/// left at all.
fn reap_exited(stuck: &mut Stuck) -> bool {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => return false,
            Ok(status) => {
                if let Some(pid) = status.pid() {
                    stuck.0.remove(&pid.as_raw());
                }
            }
            Err(Errno::EINTR) => continue,
            Err(_) => return true, // ECHILD
        }
    }
}

/// Reaps exited children; true when none is left. The gateway is a
/// subreaper, so no children means no descendants at all (an orphan would
/// have been reparented to it): the `/proc` scans can be skipped.
pub fn no_children_left(stuck: &mut Stuck) -> bool {
    reap_exited(stuck)
}

/// Kills and reaps every descendant until none is left but those known to
/// be stuck (or `limit` passes: then the survivors are returned, and join
/// `stuck`). Call after the direct child has been waited for.
pub fn kill_and_reap_all(limit: Duration, stuck: &mut Stuck) -> Vec<i32> {
    let start = Instant::now();
    let mut pause = Duration::from_micros(200);
    loop {
        kill_descendants();
        if reap_exited(stuck) {
            return Vec::new();
        }
        let left = stuck.others(descendants());
        if left.is_empty() {
            return Vec::new();
        }
        if start.elapsed() > limit {
            stuck.0.extend(&left);
            return left.into_iter().collect();
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_odd_command_names() {
        assert_eq!(parse_stat("123 (bash) S 1 123 123 0 -1"), Some((123, 1)));
        assert_eq!(
            parse_stat("77 (a) b (c) R 42 77 77 0 -1 4194560"),
            Some((77, 42))
        );
        assert_eq!(parse_stat("5 ()) Z 4 0"), Some((5, 4)));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat(""), None);
    }

    #[test]
    fn descendant_sets() {
        // 10 → 11 → 12 → 13, 10 → 14; 20 → 21 is unrelated; 1 is init.
        let parents = BTreeMap::from([
            (1, 0),
            (10, 1),
            (11, 10),
            (12, 11),
            (13, 12),
            (14, 10),
            (20, 1),
            (21, 20),
        ]);
        assert_eq!(
            descendants_in(&parents, 10),
            BTreeSet::from([11, 12, 13, 14])
        );
        assert_eq!(descendants_in(&parents, 13), BTreeSet::new());
        assert_eq!(descendants_in(&parents, 99), BTreeSet::new());
    }

    /// A real double fork with setsid: the grandchild is found and killed.
    /// Runs in a separate test process (this test binary, filtered to
    /// `subreaper_child`) so that killing "every descendant" cannot hit the
    /// processes other tests spawn concurrently.
    #[test]
    fn kills_a_setsid_grandchild() {
        let Ok(exe) = std::env::current_exe() else {
            return;
        };
        let out = std::process::Command::new(exe)
            .args([
                "--exact",
                "cgi::reap::tests::subreaper_child",
                "--nocapture",
            ])
            .env("CGIPOOL_TEST_SUBREAPER", "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{text}");
        assert!(text.contains("subreaper ok"), "{text}");
    }

    #[test]
    fn subreaper_child() {
        if std::env::var_os("CGIPOOL_TEST_SUBREAPER").is_none() {
            return;
        }
        become_subreaper().unwrap();
        let mut child = std::process::Command::new("/bin/sh")
            .args([
                "-c",
                "setsid sleep 300 & (sleep 300 &) ; sleep 300 & echo started; exit 0",
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = [0u8; 8];
        std::io::Read::read_exact(child.stdout.as_mut().unwrap(), &mut out).unwrap();
        child.wait().unwrap();
        let d = descendants();
        assert!(d.len() >= 3, "{d:?}");
        // One of them counted as stuck: killed and reaped as well, and
        // then no longer counted.
        let mut stuck = Stuck::default();
        stuck.add(*d.first().unwrap());
        let left = kill_and_reap_all(Duration::from_secs(5), &mut stuck);
        assert!(left.is_empty(), "{left:?}");
        assert!(descendants().is_empty());
        assert!(stuck.is_empty(), "{stuck:?}");
        println!("subreaper ok");
    }
}
