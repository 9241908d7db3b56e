//! Health: watch probes the workers of pools with a `health_path`
//! (`probe` speaks the protocols), takes a worker that failed
//! `unhealthy_after` probes in a row out of nginx and has systemd restart
//! it; it comes back once a probe succeeds.
//!
//! On a shared queue the probe goes through the pool's socket. A failed
//! probe counts against the worker that answered it (`X-Cgipool-Worker`)
//! or, when the answer names nobody (php-cgi's, or no answer at all),
//! against the worker whose main process holds the other end of the probe's
//! connection (its socket inodes in `/proc/PID/fd`, the peer asked for over
//! sock_diag), and against the pool only when no worker took it. A worker
//! that took a probe and gave no answer keeps it: watch holds its end open
//! (so the reaper does not take it for an abandoned request) and counts one
//! more failure at each of the pool's probe intervals while the worker still
//! owes the answer, since no other probe can reach it meanwhile; after
//! `unhealthy_after` systemd restarts it.
use super::{probe, reaper, sock_path, sockdiag, Change, Watcher};
use crate::config::{self, Queue};
use crate::plan;
use crate::systemd::Systemd;
use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};
use tokio::net::UnixStream;

/// A probe's connection that a worker of a shared queue took and has not
/// answered, kept open by watch.
#[derive(Debug)]
pub(super) struct HeldProbe {
    /// Non-blocking, out of tokio's reactor: only peeked at.
    connection: std::os::unix::net::UnixStream,
    /// When the probe ran out of time.
    since: Instant,
    /// When the next failure is counted if it still owes the answer.
    next_at: Instant,
}

impl Watcher {
    /// Probes the active workers of pools with a health_path whose interval
    /// is due, concurrently. A worker that failed `unhealthy_after` probes in
    /// a row leaves nginx (see `step`) and is restarted through systemd; it
    /// comes back once a probe succeeds.
    pub(super) async fn probe_due(
        &mut self,
        systemd: &Systemd,
        active: &BTreeMap<String, BTreeSet<u32>>,
        now: Instant,
    ) {
        self.check_held_probes(systemd, now).await;
        let mut due = Vec::new();
        for (pool, ns) in active {
            let Some(p) = self.cfg.pools.get(pool) else {
                continue;
            };
            let Some(path) = p.health_path.clone() else {
                continue;
            };
            let (interval, timeout) = self.probe_timing(pool);
            let fastcgi = p.fastcgi.as_ref().map(|f| probe::FastCgiProbe {
                route: p.route.trim_end_matches('/').to_string(),
                document_root: f.document_root.as_ref().map(|d| d.display().to_string()),
            });
            if p.queue == Queue::Shared {
                // One probe through the pool's socket per interval: the
                // worker that accepts it answers.
                let key = plan::pool_socket(pool);
                let state = self.probes.entry(key.clone()).or_default();
                if ns.is_empty() || state.next_at.map(|t| now < t).unwrap_or(false) {
                    continue;
                }
                state.next_at = Some(now + interval);
                due.push((
                    key,
                    crate::render::pool_socket_path(pool),
                    path,
                    timeout,
                    p.unhealthy_after,
                    fastcgi,
                ));
                continue;
            }
            let restarted = self.unhealthy_to_probe_again(pool);
            for &n in ns.iter().chain(restarted.iter()) {
                let unit = plan::service(pool, n);
                let state = self.probes.entry(unit.clone()).or_default();
                if state.next_at.map(|t| now < t).unwrap_or(false) {
                    continue;
                }
                state.next_at = Some(now + interval);
                due.push((
                    unit,
                    sock_path(pool, n),
                    path.clone(),
                    timeout,
                    p.unhealthy_after,
                    fastcgi.clone(),
                ));
            }
        }
        let results = futures_util::future::join_all(due.iter().map(
            |(unit, sock, path, timeout, _, fastcgi)| async move {
                if unit.ends_with(".socket") {
                    probe::probe_keeping(sock, path, *timeout, fastcgi.as_ref()).await
                } else {
                    (
                        probe::probe_named(sock, path, *timeout, fastcgi.as_ref()).await,
                        None,
                    )
                }
            },
        ))
        .await;
        for ((unit, _, path, _, limit, _), (probed, kept)) in due.into_iter().zip(results) {
            if unit.ends_with(".socket") {
                let pool = unit
                    .strip_prefix("cgipool-")
                    .and_then(|s| s.strip_suffix(".socket"))
                    .unwrap_or(&unit);
                let workers = active.get(pool).cloned().unwrap_or_default();
                self.shared_probe_result(systemd, &unit, &path, limit, probed, kept, &workers)
                    .await;
                continue;
            }
            let result = probed.result;
            let state = self.probes.entry(unit.clone()).or_default();
            match result {
                Ok(()) => {
                    state.failures = 0;
                    if self.unhealthy.remove(&unit) {
                        println!("watch: {unit}: probe {path} passed again; back into nginx");
                    }
                }
                Err(why) => {
                    state.failures += 1;
                    println!(
                        "watch: {unit}: probe {path} failed ({}/{limit}): {why}",
                        state.failures
                    );
                    if state.failures >= limit {
                        state.failures = 0;
                        self.unhealthy.insert(unit.clone());
                        self.take_out_and_restart(systemd, &unit).await;
                    }
                }
            }
        }
    }

    /// A probe through a shared queue's socket. A failed probe counts
    /// against the worker that answered it (`X-Cgipool-Worker`), else
    /// against the worker holding the other end of its connection (a
    /// worker that has not answered keeps it: see the module's doc), and
    /// systemd restarts that worker after `unhealthy_after` failures in a
    /// row (it stays in the pool: nginx routes to the pool's socket, not to
    /// workers). A probe no worker took counts against the pool: it is
    /// logged and restarts nothing, since no worker can be blamed (a hung
    /// worker that accepts nothing is systemd's to restart, through
    /// `watchdog_sec`).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn shared_probe_result(
        &mut self,
        systemd: &Systemd,
        socket_unit: &str,
        path: &str,
        limit: u32,
        probed: probe::Probed,
        kept: Option<UnixStream>,
        workers: &BTreeSet<u32>,
    ) {
        let pool = socket_unit
            .strip_prefix("cgipool-")
            .and_then(|s| s.strip_suffix(".socket"))
            .unwrap_or(socket_unit)
            .to_string();
        let named = probed
            .worker
            .as_deref()
            .and_then(|w| w.split_once('@'))
            .filter(|(p, _)| *p == pool)
            .and_then(|(_, n)| n.parse::<u32>().ok())
            .map(|n| plan::service(&pool, n));
        let holder = match (&probed.result, &named, &kept) {
            (Err(_), None, Some(connection)) => self.holder_of(&pool, workers, connection),
            _ => None,
        };
        match (probed.result, named, holder) {
            (Ok(()), worker, _) => {
                self.probes
                    .entry(socket_unit.to_string())
                    .or_default()
                    .failures = 0;
                if let Some(w) = worker {
                    self.probes.entry(w).or_default().failures = 0;
                }
            }
            (Err(why), Some(unit), _) => {
                let what = format!("probe {path} through the pool socket failed");
                self.shared_worker_failed(systemd, &unit, &what, &why, limit)
                    .await;
            }
            (Err(why), None, Some(unit)) => {
                if let (true, Some(Ok(connection))) =
                    (probed.unanswered, kept.map(|k| k.into_std()))
                {
                    let since = Instant::now();
                    let interval = self.probe_timing(&pool).0;
                    self.probes.entry(unit.clone()).or_default().held = Some(HeldProbe {
                        connection,
                        since,
                        next_at: since + interval,
                    });
                }
                let what = format!(
                    "probe {path} through the pool socket failed (this worker took it: it holds the probe's connection)"
                );
                self.shared_worker_failed(systemd, &unit, &what, &why, limit)
                    .await;
            }
            (Err(why), None, None) => {
                let state = self.probes.entry(socket_unit.to_string()).or_default();
                state.failures += 1;
                println!(
                    "watch: pool {pool}: probe {path} through the pool socket failed ({}/{limit}), no worker took it: {why}",
                    state.failures
                );
                if state.failures >= limit {
                    state.failures = 0;
                    println!(
                        "watch: pool {pool}: {limit} probes in a row failed with no worker to blame; restarting nothing (systemd restarts workers that crash or miss their watchdog)"
                    );
                }
            }
        }
    }

    /// Counts a failed probe against a worker of a shared queue; after
    /// `limit` in a row systemd restarts it (RestartUnit, under the lock)
    /// and watch lets go of a probe it held.
    async fn shared_worker_failed(
        &mut self,
        systemd: &Systemd,
        unit: &str,
        what: &str,
        why: &str,
        limit: u32,
    ) {
        let state = self.probes.entry(unit.to_string()).or_default();
        state.failures += 1;
        println!("watch: {unit}: {what} ({}/{limit}): {why}", state.failures);
        if state.failures < limit {
            return;
        }
        state.failures = 0;
        // Let go of a held probe first: php-cgi, stopping, waits for its
        // client to close before it exits (and the restart waits for that).
        state.held = None;
        println!(
            "watch: {unit}: unhealthy; restarting it (the pool's socket keeps its connections queued)"
        );
        self.converge(
            systemd,
            &format!("{unit} failed its probe"),
            Change::Restart(unit.to_string()),
        )
        .await;
    }

    /// Workers of shared queues holding a probe they took and did not
    /// answer: one more failure each `health_interval` while they still owe
    /// the answer; one that answered late or closed it counts from 0 again.
    async fn check_held_probes(&mut self, systemd: &Systemd, now: Instant) {
        let mut due = Vec::new();
        for (unit, state) in self.probes.iter_mut() {
            let Some(held) = &mut state.held else {
                continue;
            };
            let pool = plan::parse_instance(unit).map(|(p, _, _)| p);
            let probed = pool
                .and_then(|p| self.cfg.pools.get(p))
                .and_then(|p| Some((p.health_path.clone()?, p.unhealthy_after)));
            let Some((path, limit)) = probed else {
                state.held = None; // the pool or its probe is gone
                continue;
            };
            if !held.owes_answer() {
                state.held = None;
                state.failures = 0;
                println!("watch: {unit}: let go of the probe it held; counting again from 0");
                continue;
            }
            if now < held.next_at {
                continue;
            }
            due.push((
                unit.clone(),
                path,
                limit,
                now.saturating_duration_since(held.since),
            ));
        }
        for (unit, path, limit, since) in due {
            let interval = plan::parse_instance(&unit)
                .map(|(p, _, _)| self.probe_timing(p).0)
                .unwrap_or(Duration::from_secs(5));
            if let Some(held) = self.probes.get_mut(&unit).and_then(|s| s.held.as_mut()) {
                held.next_at = now + interval;
            }
            let why = format!(
                "it still holds the probe it took {:.1}s ago, unanswered",
                since.as_secs_f64()
            );
            let what = format!("probe {path} through the pool socket failed");
            self.shared_worker_failed(systemd, &unit, &what, &why, limit)
                .await;
        }
    }

    /// Lets go of every probe held by a worker, before a converge: php-cgi,
    /// stopping, waits for its client to close, and the converge may wait
    /// for that stop (a scale-down, a roll) while watch would hold it. The
    /// worker then holds a connection its peer closed, which the reaper
    /// takes for an abandoned request (killed through systemd).
    pub(super) fn release_held_probes(&mut self) {
        for (unit, state) in self.probes.iter_mut() {
            if state.held.take().is_some() {
                println!("watch: {unit}: letting go of the probe it holds before converging");
            }
        }
    }

    /// A pool's health_interval and health_timeout.
    fn probe_timing(&self, pool: &str) -> (Duration, Duration) {
        let dur = |s: &str| {
            config::duration_usec(s)
                .map(Duration::from_micros)
                .unwrap_or(Duration::from_secs(5))
        };
        match self.cfg.pools.get(pool) {
            Some(p) => (dur(&p.health_interval), dur(&p.health_timeout)),
            None => (Duration::from_secs(5), Duration::from_secs(2)),
        }
    }

    /// The running worker of `pool` whose main process holds the other end
    /// of a probe's connection (None while nobody accepted it, or when the
    /// kernel cannot say).
    fn holder_of(
        &self,
        pool: &str,
        workers: &BTreeSet<u32>,
        connection: &UnixStream,
    ) -> Option<String> {
        let own = std::fs::metadata(format!("/proc/self/fd/{}", connection.as_raw_fd()))
            .ok()
            .and_then(|m| u32::try_from(m.ino()).ok())?;
        let peer = match sockdiag::by_inode(&[own]) {
            Ok(s) => s.first().and_then(|s| s.peer)?,
            Err(e) => {
                eprintln!("watch: pool {pool}: finding who took the probe: {e:#}");
                return None;
            }
        };
        workers
            .iter()
            .map(|&n| plan::service(pool, n))
            .find(|unit| {
                self.details
                    .get(unit)
                    .and_then(|d| d.main_pid)
                    .filter(|&pid| pid > 0)
                    .is_some_and(|pid| reaper::socket_inodes(pid, unit).contains(&peer))
            })
    }

    /// The unhealthy workers of `pool` probed again: those systemd has
    /// running (active) by its latest list. Not while one starts (a slow
    /// start is no failure), and never once it failed (watch does not
    /// revive a failed worker).
    pub(super) fn unhealthy_to_probe_again(&self, pool: &str) -> BTreeSet<u32> {
        self.unhealthy_of(pool)
            .into_iter()
            .filter(|&n| {
                self.states
                    .get(&plan::service(pool, n))
                    .is_some_and(|u| u.active_state == "active")
            })
            .collect()
    }

    pub(super) fn unhealthy_of(&self, pool: &str) -> BTreeSet<u32> {
        self.unhealthy
            .iter()
            .filter_map(|u| plan::parse_instance(u))
            .filter(|(p, _, _)| *p == pool)
            .map(|(_, n, _)| n)
            .collect()
    }

    /// Routes around a worker the probe failed, then has systemd restart it
    /// (RestartUnit, under the lock): never a signal from watch itself.
    pub(super) async fn take_out_and_restart(&mut self, systemd: &Systemd, unit: &str) {
        println!("watch: {unit}: unhealthy; taking it out of nginx and restarting it");
        if self
            .converge(
                systemd,
                &format!("{unit} failed its probe"),
                Change::Restart(unit.to_string()),
            )
            .await
        {
            self.routed = None;
        }
    }
}

impl HeldProbe {
    /// The worker has written nothing and not closed the connection (a
    /// byte read here is an answer that came late: it is not needed).
    fn owes_answer(&self) -> bool {
        use std::io::Read;
        let mut byte = [0u8; 1];
        matches!(
            (&self.connection).read(&mut byte),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
        )
    }
}
