//! watch: the daemon that keeps pools healthy and sized. It follows
//! systemd's signals (no tight polling for health), samples each worker
//! socket's queue (sock_diag) for load, takes unhealthy workers out of nginx
//! and puts them back, and scales pools between min and max. Every change
//! goes through `apply` — the same code path and lock as `cgipool apply` and
//! `cgipool scale` — so they never fight. Serves /pool-status and /metrics.
mod notify;
mod probe;
pub mod scaler;
mod server;
mod sockdiag;

use crate::apply;
use crate::config::{self, Config, Pool};
use crate::files;
use crate::lock;
use crate::plan;
use crate::systemd::{ServiceDetails, Systemd, UnitState};
use anyhow::{bail, Result};
use futures_util::StreamExt;
use scaler::{Decision, Policy, Sample, Scaler};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const SOCKET: &str = "/run/cgipool/watch.sock";
/// The last scaling decision per pool, for `cgipool status`.
pub const STATE_FILE: &str = "/run/cgipool/watch-state.json";
/// The config as last applied: watch acts on what the operator applied, not
/// on edits that were not applied yet.
pub const APPLIED_CONFIG: &str = "/var/lib/cgipool/applied.toml";
const SOCKET_ROOT: &str = "/run/cgipool/";

#[derive(Debug, Clone)]
pub struct Options {
    pub config: PathBuf,
    pub unit_dir: PathBuf,
    /// How often load is sampled.
    pub tick: Duration,
    /// How long a worker may be starting or restarting before it leaves nginx.
    pub grace: Duration,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Snapshot {
    pub generated_at: u64,
    pub pools: Vec<PoolView>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PoolView {
    pub pool: String,
    pub min: u32,
    pub max: u32,
    pub wanted: u32,
    pub healthy: u32,
    pub queue_depth: u32,
    pub scale_events: u64,
    pub last_decision: Option<DecisionRecord>,
    pub workers: Vec<WorkerView>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct WorkerView {
    pub worker: String,
    pub unit: String,
    pub active_state: String,
    pub sub_state: String,
    pub healthy: bool,
    pub busy: bool,
    pub waiting: u32,
    pub n_restarts: Option<u32>,
    pub main_pid: Option<u32>,
    pub memory_bytes: Option<u64>,
    pub cpu_nsec: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionRecord {
    pub from: u32,
    pub to: u32,
    pub reason: String,
    pub at_unix: u64,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The config watch acts on: the snapshot `apply` saved, parsed as if it
/// were the config file (so rendered headers stay the same), else the file.
pub fn load_applied(path: &Path) -> Result<Config> {
    match std::fs::read_to_string(APPLIED_CONFIG) {
        Ok(text) => config::parse(path, &text)
            .map_err(|e| anyhow::anyhow!("{APPLIED_CONFIG} (as {}): {e}", path.display())),
        Err(_) => config::load(path).map_err(|e| anyhow::anyhow!("{e}")),
    }
}

/// Saves the config text `apply` just carried out, for watch.
pub fn save_applied(cfg: &Config) -> Result<()> {
    let text = std::fs::read_to_string(&cfg.source)?;
    // Only if the file still says what was applied.
    let unchanged = std::fs::read_to_string(APPLIED_CONFIG)
        .map(|t| t == text)
        .unwrap_or(false);
    if !unchanged && config::parse(&cfg.source, &text).ok().as_ref() == Some(cfg) {
        files::write_atomic(Path::new(APPLIED_CONFIG), text.as_bytes(), 0o600)?;
    }
    Ok(())
}

fn policy(pool: &Pool) -> Policy {
    let dur = |s: &str, default: u64| {
        config::duration_usec(s)
            .map(Duration::from_micros)
            .unwrap_or(Duration::from_secs(default))
    };
    Policy {
        min: pool.min,
        max: pool.max,
        up_after: dur(&pool.scale_up_after, 2),
        down_after: dur(&pool.scale_down_after, 30),
    }
}

/// What watch keeps between ticks.
struct Watcher {
    opts: Options,
    cfg: Config,
    scalers: BTreeMap<String, Scaler>,
    /// Count per pool as last seen on disk (a change by anyone resets the window).
    counts: BTreeMap<String, u32>,
    /// Since when each non-active worker has been non-active.
    down_since: HashMap<String, Instant>,
    /// The active workers per pool the last time apply ran.
    routed: Option<BTreeMap<String, BTreeSet<u32>>>,
    decisions: BTreeMap<String, DecisionRecord>,
    scale_events: BTreeMap<String, u64>,
    details: BTreeMap<String, ServiceDetails>,
    details_at: Option<Instant>,
    /// ActiveState/SubState per service from the latest ListUnitsByPatterns
    /// (fresh every step; `details` lags up to 2 s).
    states: BTreeMap<String, UnitState>,
    /// Probe state per service unit, for pools with a health_path.
    probes: HashMap<String, ProbeState>,
    /// Services the probe failed: out of nginx until they answer again.
    unhealthy: BTreeSet<String>,
    /// mtime of the applied config last read: a later apply (new pools,
    /// other limits) is picked up on the next step.
    config_stamp: Option<std::time::SystemTime>,
}

#[derive(Debug, Default)]
struct ProbeState {
    failures: u32,
    next_at: Option<Instant>,
}

pub async fn run(opts: Options) -> Result<()> {
    let cfg = load_applied(&opts.config)?;
    let systemd = Systemd::connect().await?;
    // Drain systemd's signals in their own task: a stream nobody reads
    // fills up and stalls the whole bus connection (method replies too).
    let mut changes = systemd.changes().await?;
    let changed = Arc::new(tokio::sync::Notify::new());
    let signal = Arc::clone(&changed);
    let drain = tokio::spawn(async move {
        while changes.next().await.is_some() {
            signal.notify_one();
        }
    });
    let snapshot = Arc::new(Mutex::new(Snapshot::default()));
    let server_state = Arc::clone(&snapshot);
    let group = cfg.nginx.socket_group.clone();
    let server =
        tokio::spawn(async move { server::serve(Path::new(SOCKET), &group, server_state).await });
    let mut notifier = notify::Notifier::from_env();
    let mut w = Watcher {
        scalers: cfg
            .pools
            .iter()
            .map(|(n, p)| (n.clone(), Scaler::new(policy(p))))
            .collect(),
        cfg,
        opts,
        counts: BTreeMap::new(),
        down_since: HashMap::new(),
        routed: None,
        decisions: read_decisions(),
        scale_events: BTreeMap::new(),
        details: BTreeMap::new(),
        details_at: None,
        states: BTreeMap::new(),
        probes: HashMap::new(),
        unhealthy: BTreeSet::new(),
        config_stamp: applied_stamp(),
    };
    println!(
        "watch: watching {} pools ({})",
        w.cfg.pools.len(),
        w.cfg.pools.keys().cloned().collect::<Vec<_>>().join(", ")
    );
    notifier.send(&format!(
        "READY=1\nSTATUS=watching {} pools",
        w.cfg.pools.len()
    ));
    let mut tick = tokio::time::interval(w.opts.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let sample = tokio::select! {
            _ = tick.tick() => true,
            _ = changed.notified() => false,
        };
        if drain.is_finished() {
            bail!("systemd's signal stream ended (bus connection lost); exiting so systemd restarts watch");
        }
        if server.is_finished() {
            bail!("the status server stopped");
        }
        notifier.ping();
        w.step(&systemd, sample).await?;
        if let Ok(mut s) = snapshot.lock() {
            *s = w.snapshot_view();
        }
    }
}

impl Watcher {
    /// Re-reads the applied config when `apply` saved a new one.
    fn refresh_config(&mut self) {
        let stamp = applied_stamp();
        if stamp == self.config_stamp {
            return;
        }
        self.config_stamp = stamp;
        match load_applied(&self.opts.config) {
            Ok(cfg) => {
                println!(
                    "watch: the applied config changed; now watching {}",
                    cfg.pools.keys().cloned().collect::<Vec<_>>().join(", ")
                );
                self.set_config(cfg);
            }
            Err(e) => eprintln!("watch: cannot read the applied config: {e:#}"),
        }
    }

    /// Takes a config; pools whose limits did not change keep their window.
    fn set_config(&mut self, cfg: Config) {
        for (name, pool) in &cfg.pools {
            let p = policy(pool);
            if self
                .scalers
                .get(name)
                .map(|s| s.policy != p)
                .unwrap_or(true)
            {
                self.scalers.insert(name.clone(), Scaler::new(p));
            }
        }
        self.scalers.retain(|name, _| cfg.pools.contains_key(name));
        self.cfg = cfg;
    }

    async fn step(&mut self, systemd: &Systemd, sample: bool) -> Result<()> {
        self.refresh_config();
        let units: BTreeMap<String, UnitState> =
            crate::systemd::by_name(systemd.list(&["cgipool-*@*.service"]).await?);
        let wanted = plan::instances_on_disk(&files::read_unit_dir(&self.opts.unit_dir)?.entries);
        self.states = units.clone();
        let now = Instant::now();
        for (pool, ns) in &wanted {
            let n = ns.len() as u32;
            if self.counts.insert(pool.clone(), n) != Some(n) {
                if let Some(s) = self.scalers.get_mut(pool) {
                    s.reset(now);
                }
            }
        }
        let (mut active, in_grace) = self.active(&units, &wanted, now);
        self.probe_due(systemd, &active, now).await;
        for unit in &self.unhealthy {
            if let Some((pool, n, _)) = plan::parse_instance(unit) {
                if let Some(set) = active.get_mut(pool) {
                    set.remove(&n);
                }
            }
        }
        if sample {
            let queues = sockdiag::queues(SOCKET_ROOT).unwrap_or_default();
            self.refresh_details(systemd, &units).await;
            for (pool, ns) in &wanted {
                let waiting: u32 = ns
                    .iter()
                    .map(|n| {
                        queues
                            .get(&sock_path(pool, *n))
                            .map(|q| q.waiting())
                            .unwrap_or(0)
                    })
                    .sum();
                let Some(scaler) = self.scalers.get_mut(pool) else {
                    continue;
                };
                let decision = scaler.observe(Sample {
                    at: now,
                    workers: ns.len() as u32,
                    waiting,
                });
                if let Some(d) = decision {
                    self.scale(pool, d, &queues_summary(pool, ns, &queues))
                        .await;
                    return Ok(());
                }
            }
        }
        // nginx routes to the active workers (apply renders them); wait out
        // the grace period of a worker systemd is restarting.
        if self.routed.as_ref() != Some(&active) && !in_grace {
            let change = diff(&self.routed, &active);
            if self
                .converge(
                    BTreeMap::new(),
                    &format!("routes follow health ({})", change.join(", ")),
                )
                .await
            {
                self.routed = Some(active);
            }
        }
        Ok(())
    }

    /// Active workers per pool, and whether a worker that left `active` is
    /// still within its grace period (restarting after a crash: its socket
    /// keeps connections queued, so nginx need not be touched yet). A worker
    /// in a crash loop is active now and then and stays routed until systemd
    /// gives up on it (start-limit-hit), then leaves after the grace period.
    fn active(
        &mut self,
        units: &BTreeMap<String, UnitState>,
        wanted: &BTreeMap<String, BTreeSet<u32>>,
        now: Instant,
    ) -> (BTreeMap<String, BTreeSet<u32>>, bool) {
        let mut out = BTreeMap::new();
        let mut in_grace = false;
        for (pool, ns) in wanted {
            let mut up = BTreeSet::new();
            for &n in ns {
                let unit = plan::service(pool, n);
                match units
                    .get(&unit)
                    .map(|u| u.active_state.as_str())
                    .unwrap_or("inactive")
                {
                    "active" => {
                        self.down_since.remove(&unit);
                        up.insert(n);
                    }
                    _ => {
                        let since = *self.down_since.entry(unit).or_insert(now);
                        in_grace |= now.duration_since(since) < self.opts.grace;
                    }
                }
            }
            out.insert(pool.clone(), up);
        }
        (out, in_grace)
    }

    /// Probes the active workers of pools with a health_path whose interval
    /// is due, concurrently. A worker that failed `unhealthy_after` probes in
    /// a row leaves nginx (see `step`) and is restarted through systemd; it
    /// comes back once a probe succeeds.
    async fn probe_due(
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
                ));
            }
        }
        let results = futures_util::future::join_all(
            due.iter()
                .map(|(_, sock, path, timeout, _)| probe::probe(sock, path, *timeout)),
        )
        .await;
        for ((unit, _, path, _, limit), result) in due.into_iter().zip(results) {
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

    fn unhealthy_of(&self, pool: &str) -> BTreeSet<u32> {
        self.unhealthy
            .iter()
            .filter_map(|u| plan::parse_instance(u))
            .filter(|(p, _, _)| *p == pool)
            .map(|(_, n, _)| n)
            .collect()
    }

    /// Routes around a worker the probe failed, then has systemd restart it
    /// (RestartUnit): never a signal from watch itself.
    async fn take_out_and_restart(&mut self, systemd: &Systemd, unit: &str) {
        println!("watch: {unit}: unhealthy; taking it out of nginx and restarting it");
        if self
            .converge(BTreeMap::new(), &format!("{unit} failed its probe"))
            .await
        {
            self.routed = None;
        }
        let job = crate::systemd::Job::new(crate::systemd::JobKind::Restart, unit);
        if let Err(e) = systemd.run_jobs(&[job], Duration::from_secs(90)).await {
            eprintln!("watch: restarting {unit}: {e:#}");
        }
    }

    async fn refresh_details(&mut self, systemd: &Systemd, units: &BTreeMap<String, UnitState>) {
        if self
            .details_at
            .map(|t| t.elapsed() < Duration::from_secs(2))
            .unwrap_or(false)
        {
            return;
        }
        let list: Vec<UnitState> = units.values().cloned().collect();
        if let Ok(details) = systemd.service_details(&list).await {
            self.details = details.into_iter().map(|d| (d.unit.clone(), d)).collect();
            self.details_at = Some(Instant::now());
        }
    }

    async fn scale(&mut self, pool: &str, d: Decision, queues: &str) {
        println!(
            "watch: pool {pool}: scale {} -> {}: {}; queues: {queues}",
            d.from, d.to, d.reason
        );
        let counts = BTreeMap::from([(pool.to_string(), d.to)]);
        if self
            .converge(counts, &format!("scale {pool} {} -> {}", d.from, d.to))
            .await
        {
            *self.scale_events.entry(pool.to_string()).or_default() += 1;
            self.decisions.insert(
                pool.to_string(),
                DecisionRecord {
                    from: d.from,
                    to: d.to,
                    reason: d.reason,
                    at_unix: now_unix(),
                },
            );
            write_decisions(&self.decisions);
            self.routed = None;
        }
        if let Some(s) = self.scalers.get_mut(pool) {
            s.reset(Instant::now());
        }
    }

    /// One apply under the shared lock; false if it could not run or failed.
    async fn converge(&mut self, counts: BTreeMap<String, u32>, why: &str) -> bool {
        let _lock = match lock::acquire(Path::new(lock::LOCK_PATH), Duration::ZERO) {
            Ok(l) => l,
            Err(_) => return false, // an operator's apply/scale is running; next tick
        };
        match load_applied(&self.opts.config) {
            Ok(cfg) => self.set_config(cfg),
            Err(e) => {
                eprintln!("watch: {why}: cannot read the applied config: {e:#}");
                return false;
            }
        }
        let opts = apply::Options {
            unit_dir: self.opts.unit_dir.clone(),
            dry_run: false,
            counts,
            job_timeout: Duration::from_secs(90),
            leave_failed: true,
            exclude: self.unhealthy.clone(),
        };
        println!("watch: {why}: applying");
        match apply::apply(&self.cfg, &opts).await {
            Ok(_) => true,
            Err(e) => {
                eprintln!("watch: {why}: {e:#}");
                // Routes were still made to follow health; try again on the next change.
                true
            }
        }
    }

    fn snapshot_view(&self) -> Snapshot {
        let queues = sockdiag::queues(SOCKET_ROOT).unwrap_or_default();
        let pools = self
            .cfg
            .pools
            .values()
            .map(|p| {
                let n = self.counts.get(&p.name).copied().unwrap_or(0);
                let workers: Vec<WorkerView> = (1..=n)
                    .map(|i| {
                        let unit = plan::service(&p.name, i);
                        let d = self.details.get(&unit).cloned().unwrap_or_default();
                        let (active_state, sub_state) = match self.states.get(&unit) {
                            Some(u) => (u.active_state.clone(), u.sub_state.clone()),
                            None => ("inactive".to_string(), "dead".to_string()),
                        };
                        let healthy = active_state == "active" && !self.unhealthy.contains(&unit);
                        let waiting = queues
                            .get(&sock_path(&p.name, i))
                            .map(|q| q.waiting())
                            .unwrap_or(0);
                        WorkerView {
                            worker: format!("{}@{i}", p.name),
                            healthy,
                            busy: waiting > 0,
                            waiting,
                            unit,
                            active_state,
                            sub_state,
                            n_restarts: d.n_restarts,
                            main_pid: d.main_pid,
                            memory_bytes: d.memory_bytes,
                            cpu_nsec: d.cpu_nsec,
                        }
                    })
                    .collect();
                PoolView {
                    pool: p.name.clone(),
                    min: p.min,
                    max: p.max,
                    wanted: n,
                    healthy: workers.iter().filter(|w| w.healthy).count() as u32,
                    queue_depth: workers.iter().map(|w| w.waiting).sum(),
                    scale_events: self.scale_events.get(&p.name).copied().unwrap_or(0),
                    last_decision: self.decisions.get(&p.name).cloned(),
                    workers,
                }
            })
            .collect();
        Snapshot {
            generated_at: now_unix(),
            pools,
        }
    }
}

fn applied_stamp() -> Option<std::time::SystemTime> {
    std::fs::metadata(APPLIED_CONFIG)
        .and_then(|m| m.modified())
        .ok()
}

fn sock_path(pool: &str, n: u32) -> String {
    format!("{SOCKET_ROOT}{pool}/{n}.sock")
}

fn queues_summary(
    pool: &str,
    ns: &BTreeSet<u32>,
    queues: &BTreeMap<String, sockdiag::Queue>,
) -> String {
    ns.iter()
        .map(|n| {
            let q = queues
                .get(&sock_path(pool, *n))
                .copied()
                .unwrap_or_default();
            format!("{pool}@{n} backlog={} pending={}", q.backlog, q.pending)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn diff(
    before: &Option<BTreeMap<String, BTreeSet<u32>>>,
    after: &BTreeMap<String, BTreeSet<u32>>,
) -> Vec<String> {
    let Some(before) = before else {
        return vec!["first look".into()];
    };
    let mut out = Vec::new();
    for (pool, now) in after {
        let was = before.get(pool).cloned().unwrap_or_default();
        out.extend(was.difference(now).map(|n| format!("-{pool}@{n}")));
        out.extend(now.difference(&was).map(|n| format!("+{pool}@{n}")));
    }
    out
}

pub fn read_decisions() -> BTreeMap<String, DecisionRecord> {
    std::fs::read_to_string(STATE_FILE)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default()
}

fn write_decisions(d: &BTreeMap<String, DecisionRecord>) {
    if let Ok(text) = serde_json::to_string_pretty(d) {
        let _ = files::write_atomic(Path::new(STATE_FILE), text.as_bytes(), 0o644);
    }
}
