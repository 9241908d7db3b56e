//! Health: watch probes the workers of pools with a `health_path`
//! (`probe` speaks the protocols), takes a worker that failed
//! `unhealthy_after` probes in a row out of nginx and has systemd restart
//! it; it comes back once a probe succeeds.
use super::{probe, sock_path, Change, Watcher};
use crate::config::{self, Queue};
use crate::plan;
use crate::systemd::Systemd;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

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
        let mut due = Vec::new();
        for (pool, ns) in active {
            let Some(p) = self.cfg.pools.get(pool) else {
                continue;
            };
            let Some(path) = p.health_path.clone() else {
                continue;
            };
            let dur = |s: &str| {
                config::duration_usec(s)
                    .map(Duration::from_micros)
                    .unwrap_or(Duration::from_secs(5))
            };
            let (interval, timeout) = (dur(&p.health_interval), dur(&p.health_timeout));
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
            for &n in ns.iter().chain(self.unhealthy_of(pool).iter()) {
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
            |(_, sock, path, timeout, _, fastcgi)| {
                probe::probe_named(sock, path, *timeout, fastcgi.as_ref())
            },
        ))
        .await;
        for ((unit, _, path, _, limit, _), probed) in due.into_iter().zip(results) {
            if unit.ends_with(".socket") {
                self.shared_probe_result(systemd, &unit, &path, limit, probed)
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

    /// A probe through a shared queue's socket. A failed answer that names
    /// its worker (`X-Cgipool-Worker`) counts against that worker, which
    /// systemd restarts after `unhealthy_after` of them in a row (it stays
    /// in the pool: nginx routes to the pool's socket, not to workers). A
    /// probe nobody answered counts against the pool: it is logged and
    /// restarts nothing, since no worker can be blamed (a hung worker is
    /// systemd's to restart, through `watchdog_sec`).
    pub(super) async fn shared_probe_result(
        &mut self,
        systemd: &Systemd,
        socket_unit: &str,
        path: &str,
        limit: u32,
        probed: probe::Probed,
    ) {
        let pool = socket_unit
            .strip_prefix("cgipool-")
            .and_then(|s| s.strip_suffix(".socket"))
            .unwrap_or(socket_unit)
            .to_string();
        let worker_unit = probed
            .worker
            .as_deref()
            .and_then(|w| w.split_once('@'))
            .filter(|(p, _)| *p == pool)
            .and_then(|(_, n)| n.parse::<u32>().ok())
            .map(|n| plan::service(&pool, n));
        match (probed.result, worker_unit) {
            (Ok(()), worker) => {
                self.probes
                    .entry(socket_unit.to_string())
                    .or_default()
                    .failures = 0;
                if let Some(w) = worker {
                    self.probes.entry(w).or_default().failures = 0;
                }
            }
            (Err(why), Some(unit)) => {
                let state = self.probes.entry(unit.clone()).or_default();
                state.failures += 1;
                println!(
                    "watch: {unit}: probe {path} through the pool socket failed ({}/{limit}): {why}",
                    state.failures
                );
                if state.failures >= limit {
                    state.failures = 0;
                    println!("watch: {unit}: unhealthy; restarting it (the pool's socket keeps its connections queued)");
                    self.converge(
                        systemd,
                        &format!("{unit} failed its probe"),
                        Change::Restart(unit.clone()),
                    )
                    .await;
                }
            }
            (Err(why), None) => {
                let state = self.probes.entry(socket_unit.to_string()).or_default();
                state.failures += 1;
                println!(
                    "watch: pool {pool}: probe {path} through the pool socket failed ({}/{limit}), no worker named: {why}",
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
