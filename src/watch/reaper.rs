//! The reaper: a wall-clock kill for requests nginx gave up on.
//!
//! nginx closes its upstream connection when `request_timeout` (its read
//! timeout) expires or when the client goes away. A worker that is still
//! working on that request holds the connection, now closed by its peer, in
//! its file table; PHP's `max_execution_time` counts CPU time on Linux, so a
//! script that sleeps or waits on I/O keeps its php-cgi busy for as long as
//! it likes. The rule, checked about once a second for every running worker
//! of an `http` or `fastcgi` pool:
//!
//! - a worker's connections are the connected stream sockets in its main
//!   process's `/proc/PID/fd` that carry the path of one of its pool's
//!   sockets (an accepted connection carries its listener's path), read by
//!   inode over sock_diag (`sockdiag::by_inode`);
//! - a worker is **abandoned** when it holds at least one connection, every
//!   one of them closed by its peer, and one of these closed connections (the
//!   same socket inode) was already held closed at an earlier observation at
//!   least `MIN_GAP` (1 s) before.
//!
//! An idle worker notices a closed connection at once (it waits in poll for
//! exactly that), and a worker that has just answered closes its side within
//! milliseconds, so neither is held over two observations a second apart. A
//! worker busy on a live connection is never touched, even when nginx closes
//! one of its idle kept-alive connections meanwhile (an nginx reload closes
//! them all): one open connection is enough to spare it. The cost: a worker
//! stuck on one connection while nginx keeps another idle one to it is
//! reaped only once nginx has closed that one too (its next request times
//! out, or `keepalive_timeout`, 5 s, expires).
//!
//! An abandoned worker is killed through systemd (KillUnit, SIGKILL to every
//! process of the unit; `Restart=always` brings a fresh one while its socket
//! holds the connections) under the host lock, so never in the middle of an
//! apply, scale or converge (then the next observation tries again), and
//! logged with worker, pool and how long the closed connection was seen. It
//! changes no count, so it is not a line in the decision log. CGI pools are
//! left alone: their gateway kills its programs at its own deadline.
use super::{sockdiag, Watcher};
use crate::config::Protocol;
use crate::plan;
use crate::state::RUN_DIR;
use crate::systemd::Systemd;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// The least time between the two observations of a closed connection.
pub const MIN_GAP: Duration = Duration::from_secs(1);

/// One connection a worker holds, as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connection {
    pub inode: u32,
    pub peer_closed: bool,
}

/// What a worker held at one observation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    pub unit: String,
    pub pool: String,
    pub connections: Vec<Connection>,
}

/// A worker to kill, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Abandoned {
    pub unit: String,
    pub pool: String,
    pub inode: u32,
    /// Since the closed connection was first seen held.
    pub seen_for: Duration,
}

/// What the reaper remembers between observations: per worker, the closed
/// connections it held and since when.
#[derive(Debug, Default)]
pub struct Reaper {
    closed_since: BTreeMap<String, BTreeMap<u32, Instant>>,
    last_at: Option<Instant>,
}

impl Reaper {
    /// Whether an observation is due (about once per `MIN_GAP`).
    pub fn due(&self, now: Instant) -> bool {
        self.last_at
            .map(|t| now.duration_since(t) >= MIN_GAP)
            .unwrap_or(true)
    }

    /// Takes one observation of every running worker and names the
    /// abandoned ones. A worker not observed is forgotten.
    pub fn observe(&mut self, now: Instant, workers: &[Observation]) -> Vec<Abandoned> {
        self.last_at = Some(now);
        let mut next: BTreeMap<String, BTreeMap<u32, Instant>> = BTreeMap::new();
        let mut out = Vec::new();
        for w in workers {
            let all_closed =
                !w.connections.is_empty() && w.connections.iter().all(|c| c.peer_closed);
            if !all_closed {
                continue;
            }
            let before = self.closed_since.get(&w.unit);
            let mut held = BTreeMap::new();
            for c in &w.connections {
                let since = before.and_then(|b| b.get(&c.inode)).copied().unwrap_or(now);
                held.insert(c.inode, since);
            }
            let oldest = held
                .iter()
                .map(|(inode, since)| (*inode, now.duration_since(*since)))
                .max_by_key(|(_, age)| *age);
            match oldest {
                Some((inode, seen_for)) if seen_for >= MIN_GAP => out.push(Abandoned {
                    unit: w.unit.clone(),
                    pool: w.pool.clone(),
                    inode,
                    seen_for,
                }),
                _ => {
                    next.insert(w.unit.clone(), held);
                }
            }
        }
        self.closed_since = next;
        out
    }

    /// Keeps a worker's closed connections for the next observation (its
    /// kill was put off: the lock was taken).
    pub fn retry(&mut self, a: &Abandoned, now: Instant) {
        let since = now.checked_sub(a.seen_for).unwrap_or(now);
        self.closed_since
            .entry(a.unit.clone())
            .or_default()
            .insert(a.inode, since);
    }
}

/// Socket inodes in a process's file table, if it belongs to `unit`
/// (read from `/proc`; a process that is gone, or whose PID now belongs to
/// another unit, has none).
pub(super) fn socket_inodes(pid: u32, unit: &str) -> Vec<u32> {
    let Ok(cgroup) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
        return Vec::new();
    };
    if !cgroup.lines().any(|l| l.ends_with(&format!("/{unit}"))) {
        return Vec::new();
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    fds.flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            l.to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect::<BTreeSet<u32>>()
        .into_iter()
        .collect()
}

impl Watcher {
    /// One observation of the running workers of every http and fastcgi
    /// pool, when due; kills the abandoned ones through systemd.
    pub(super) async fn reap(&mut self, systemd: &Systemd, now: Instant) {
        if !self.reaper.due(now) {
            return;
        }
        // (unit, pool, the pool's socket directory, socket inodes) per running worker.
        let mut held = Vec::new();
        for (pool, &n) in &self.counts {
            let Some(p) = self.cfg.pools.get(pool) else {
                continue;
            };
            if p.protocol == Protocol::Cgi || !p.reap_abandoned {
                continue;
            }
            for i in 1..=n {
                let unit = plan::service(pool, i);
                let running = self
                    .states
                    .get(&unit)
                    .map(|u| u.active_state == "active" && u.sub_state == "running")
                    .unwrap_or(false);
                let pid = self.details.get(&unit).and_then(|d| d.main_pid);
                let (true, Some(pid)) = (running, pid.filter(|p| *p > 0)) else {
                    continue;
                };
                let inodes = socket_inodes(pid, &unit);
                held.push((unit, pool.clone(), format!("{RUN_DIR}/{pool}/"), inodes));
            }
        }
        // One netlink socket for every worker's inodes.
        let all: Vec<u32> = held.iter().flat_map(|h| h.3.iter().copied()).collect();
        let sockets: BTreeMap<u32, sockdiag::Socket> = match sockdiag::by_inode(&all) {
            Ok(s) => s.into_iter().map(|s| (s.inode, s)).collect(),
            Err(e) => {
                // No observation this time: never a kill on a failed read.
                eprintln!(
                    "watch: reading the workers' connections failed, no reaper observation: {e:#}"
                );
                return;
            }
        };
        let workers: Vec<Observation> = held
            .into_iter()
            .map(|(unit, pool, prefix, inodes)| Observation {
                unit,
                pool,
                connections: inodes
                    .iter()
                    .filter_map(|i| sockets.get(i))
                    .filter(|s| s.stream && s.connected)
                    .filter(|s| s.path.as_deref().is_some_and(|p| p.starts_with(&prefix)))
                    .map(|s| Connection {
                        inode: s.inode,
                        peer_closed: s.peer_closed,
                    })
                    .collect(),
            })
            .collect();
        for a in self.reaper.observe(now, &workers) {
            let Some(lock) = self.try_lock() else {
                self.reaper.retry(&a, now); // an apply, scale or converge runs; next time
                continue;
            };
            match systemd.kill_all(&a.unit).await {
                Ok(()) => println!(
                    "watch: {} (pool {}): killed (SIGKILL through systemd): it still held a connection nginx had closed, seen for {:.1}s (socket {}): an abandoned request; systemd restarts it",
                    a.unit,
                    a.pool,
                    a.seen_for.as_secs_f64(),
                    a.inode
                ),
                Err(e) => eprintln!("watch: {} (pool {}): killing the abandoned worker: {e:#}", a.unit, a.pool),
            }
            drop(lock);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(unit: &str, conns: &[(u32, bool)]) -> Observation {
        Observation {
            unit: unit.into(),
            pool: "blog".into(),
            connections: conns
                .iter()
                .map(|&(inode, peer_closed)| Connection { inode, peer_closed })
                .collect(),
        }
    }

    const W: &str = "cgipool-blog@1.service";

    #[test]
    fn a_closed_connection_held_over_two_observations_is_abandoned() {
        let t0 = Instant::now();
        let mut r = Reaper::default();
        assert!(r.observe(t0, &[worker(W, &[(7, false)])]).is_empty());
        assert!(r
            .observe(t0 + MIN_GAP, &[worker(W, &[(7, true)])])
            .is_empty());
        let out = r.observe(t0 + MIN_GAP * 2, &[worker(W, &[(7, true)])]);
        assert_eq!(
            out,
            vec![Abandoned {
                unit: W.into(),
                pool: "blog".into(),
                inode: 7,
                seen_for: MIN_GAP
            }]
        );
        assert!(
            r.observe(t0 + MIN_GAP * 3, &[worker(W, &[(7, true)])])
                .is_empty(),
            "a verdict starts the count again (the worker is being killed)"
        );
    }

    #[test]
    fn observations_closer_than_the_gap_are_not_enough() {
        let t0 = Instant::now();
        let mut r = Reaper::default();
        assert!(r.observe(t0, &[worker(W, &[(7, true)])]).is_empty());
        let soon = t0 + MIN_GAP / 2;
        assert!(!r.due(soon));
        assert!(r.observe(soon, &[worker(W, &[(7, true)])]).is_empty());
        assert_eq!(r.observe(t0 + MIN_GAP, &[worker(W, &[(7, true)])]).len(), 1);
    }

    #[test]
    fn a_worker_that_closes_in_time_or_moves_on_is_spared() {
        let t0 = Instant::now();
        let mut r = Reaper::default();
        // Just answered: nginx closed, the worker had not yet.
        assert!(r.observe(t0, &[worker(W, &[(7, true)])]).is_empty());
        // A second later it serves a new connection (a new inode), or none.
        assert!(r
            .observe(t0 + MIN_GAP, &[worker(W, &[(8, false)])])
            .is_empty());
        assert!(r.observe(t0 + MIN_GAP * 2, &[worker(W, &[])]).is_empty());
        // A new closed inode starts its own count.
        assert!(r
            .observe(t0 + MIN_GAP * 3, &[worker(W, &[(9, true)])])
            .is_empty());
    }

    #[test]
    fn idle_keep_alive_connections_are_never_abandoned() {
        let t0 = Instant::now();
        let mut r = Reaper::default();
        for i in 0..10 {
            let at = t0 + MIN_GAP * i;
            assert!(r
                .observe(at, &[worker(W, &[(7, false), (8, false)])])
                .is_empty());
        }
    }

    #[test]
    fn a_busy_worker_whose_idle_connection_nginx_closed_is_spared() {
        // Busy on 7 (live), while nginx closed its idle kept-alive 8 (a
        // reload, keepalive_timeout): 8 waits until the request on 7 ends.
        let t0 = Instant::now();
        let mut r = Reaper::default();
        for i in 0..5 {
            let at = t0 + MIN_GAP * i;
            assert!(r
                .observe(at, &[worker(W, &[(7, false), (8, true)])])
                .is_empty());
        }
        // Once nginx gives up on 7 too, the worker is abandoned after the gap.
        assert!(r
            .observe(t0 + MIN_GAP * 5, &[worker(W, &[(7, true), (8, true)])])
            .is_empty());
        let out = r.observe(t0 + MIN_GAP * 6, &[worker(W, &[(7, true), (8, true)])]);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].seen_for, MIN_GAP);
    }

    #[test]
    fn a_worker_not_observed_is_forgotten_and_others_are_independent() {
        let t0 = Instant::now();
        let other = "cgipool-blog@2.service";
        let mut r = Reaper::default();
        assert!(r
            .observe(t0, &[worker(W, &[(7, true)]), worker(other, &[(9, false)])])
            .is_empty());
        // W restarted meanwhile (not running at this observation).
        assert!(r
            .observe(t0 + MIN_GAP, &[worker(other, &[(9, true)])])
            .is_empty());
        assert!(r
            .observe(t0 + MIN_GAP * 2, &[worker(W, &[(7, true)])])
            .is_empty());
        let out = r.observe(t0 + MIN_GAP * 3, &[worker(W, &[(7, true)])]);
        assert_eq!(out.iter().map(|a| a.unit.as_str()).collect::<Vec<_>>(), [W]);
    }

    #[test]
    fn a_kill_put_off_by_the_lock_is_tried_next_time() {
        let t0 = Instant::now();
        let mut r = Reaper::default();
        r.observe(t0, &[worker(W, &[(7, true)])]);
        let out = r.observe(t0 + MIN_GAP, &[worker(W, &[(7, true)])]);
        assert_eq!(out.len(), 1);
        r.retry(&out[0], t0 + MIN_GAP);
        let again = r.observe(t0 + MIN_GAP * 2, &[worker(W, &[(7, true)])]);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].seen_for, MIN_GAP * 2);
    }
}
