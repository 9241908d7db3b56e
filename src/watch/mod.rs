//! watch: the daemon that keeps pools healthy and sized. It follows
//! systemd's signals (no tight polling for health), samples each pool's
//! queue (sock_diag: the pool socket of a shared queue, or every worker
//! socket) for load, takes unhealthy workers out of nginx and puts them back
//! (per-worker queues; a shared queue's upstream is the pool socket, so
//! routes change only when a pool has no healthy worker at all), and
//! scales pools between min and max.
//!
//! watch acts only on the intent `cgipool apply` recorded (never on the
//! config file, never on an older config): every change it makes is a
//! converge under the same lock as apply and scale, and a scaling decision
//! changes only a count in the intent, and only if that count is still the
//! one the decision was based on and the applied limits still hold its
//! target (intent.rs). A converge that fails is retried. Its
//! watchdog is fed by a task of its own, so a long drain inside a converge
//! does not look like a hang. Serves /pool-status and /metrics.
mod fcgi;
mod figures;
mod health;
mod host_converge;
mod hosts;
mod intent;
mod notify;
mod probe;
mod queues;
mod reaper;
pub mod scaler;
mod server;
mod sockdiag;
mod view;

use crate::apply;
use crate::config::{self, Config, Pool};
use crate::exec::interrupt::Interrupt;
use crate::plan;
use crate::state::{self, Decision, Intent, Paths, RUN_DIR, WATCH_SOCKET};
use crate::systemd::{Job, JobKind, ServiceDetails, Systemd, UnitState};
use anyhow::{bail, Result};
use futures_util::StreamExt;
use scaler::{Policy, Scaler};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
pub use view::{PoolView, Snapshot, WorkerView};

/// How long watch lets systemd's signals settle before a step they woke.
const SIGNAL_SETTLE: Duration = Duration::from_millis(50);

#[derive(Debug, Clone)]
pub struct Options {
    /// How often load is sampled.
    pub tick: Duration,
    /// How long a worker may be starting or restarting before it leaves nginx.
    pub grace: Duration,
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

/// What a converge changes in the intent first.
enum Change {
    None,
    /// A scaling decision, carried out only if the pool still runs `from`.
    Scale {
        pool: String,
        decision: scaler::Decision,
    },
    /// After converging, have systemd restart this unit (its probe failed).
    Restart(String),
}

/// What watch keeps between ticks.
pub(crate) struct Watcher {
    opts: Options,
    paths: Paths,
    cfg: Config,
    /// The intent watch last read (None: nothing applied yet).
    intent: Option<Intent>,
    /// The intent serial the last successful converge reached.
    converged: Option<u64>,
    /// After a failed converge: not before this instant, and how many failed in a row.
    retry_at: Option<Instant>,
    failures: u32,
    scalers: BTreeMap<String, Scaler>,
    /// Count per pool in the intent (a change by anyone resets the window).
    counts: BTreeMap<String, u32>,
    /// Since when each non-active worker has been non-active.
    down_since: HashMap<String, Instant>,
    /// The active workers per pool the last time a converge succeeded.
    routed: Option<plan::Workers>,
    decisions: BTreeMap<String, Decision>,
    scale_events: BTreeMap<String, u64>,
    /// Steps (looks at the host: every tick, and after signals) completed
    /// since watch started; /pool-status shows it, so a test can wait for
    /// watch to have looked again instead of sleeping.
    steps: u64,
    details: BTreeMap<String, ServiceDetails>,
    details_at: Option<Instant>,
    /// ActiveState/SubState per service from the latest ListUnitsByPatterns.
    states: BTreeMap<String, UnitState>,
    /// Probe state per service unit, for pools with a health_path.
    probes: HashMap<String, ProbeState>,
    /// Services the probe failed: out of nginx until they answer again.
    unhealthy: BTreeSet<String>,
    /// Workers holding connections nginx closed (see `reaper`).
    reaper: reaper::Reaper,
    /// The operator's figures kept over time (figures.rs).
    figures: figures::Figures,
    /// The other hosts (`[host.NAME]`), followed over the remote transport.
    hosts: hosts::Hosts,
    /// The intent serial each other host last reached through watch
    /// (forgotten when the host is lost: it may come back changed).
    host_serials: BTreeMap<String, u64>,
    /// The front's connections to each (pool, other host) at the last load
    /// sample.
    remote_connections: BTreeMap<(String, String), u32>,
    /// After a host's failed converge: not before this instant, and how
    /// many failed in a row.
    host_retry: BTreeMap<String, (Instant, u32)>,
    /// Hosts back from being lost that watch has not converged since: out
    /// of nginx until it has.
    host_returning: BTreeSet<String>,
    /// The hosts left out of nginx the last time a converge succeeded.
    routed_out: Option<BTreeMap<String, BTreeSet<String>>>,
    /// Why the lock could not be taken last time, other than another
    /// process holding it (logged when it changes, not every step).
    lock_error: Option<String>,
}

#[derive(Debug, Default)]
struct ProbeState {
    failures: u32,
    next_at: Option<Instant>,
    /// A shared queue's probe this worker took and has not answered.
    held: Option<health::HeldProbe>,
}

/// The empty config watch shows before anything is applied (no pools: a
/// config file would not parse without one).
fn no_config() -> Config {
    Config::empty(Path::new("(nothing applied yet)"))
}

pub async fn run(opts: Options) -> Result<()> {
    let paths = Paths::host();
    let intent = state::read_intent(&paths)?;
    let cfg = match &intent {
        Some(i) => i.config()?,
        None => no_config(),
    };
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
        tokio::spawn(
            async move { server::serve(Path::new(WATCH_SOCKET), &group, server_state).await },
        );
    // The watchdog is fed as long as the runtime runs, converges included
    // (they wait on systemd and nginx for up to minutes).
    let notifier = notify::Notifier::from_env();
    let pinger = notifier.clone();
    tokio::spawn(async move {
        let mut pinger = pinger;
        let mut every = tokio::time::interval(Duration::from_secs(1));
        loop {
            every.tick().await;
            pinger.ping();
        }
    });
    let mut w = Watcher::new(opts, paths, cfg, Arc::clone(&changed));
    if let Some(i) = intent {
        w.set_intent(i);
    }
    w.hosts.follow(&w.cfg);
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
            _ = changed.notified() => {
                // A burst of signals (workers' state reports among them:
                // see worker_status) makes one step, not one each.
                tokio::time::sleep(SIGNAL_SETTLE).await;
                false
            }
        };
        if drain.is_finished() {
            bail!("systemd's signal stream ended (bus connection lost); exiting so systemd restarts watch");
        }
        if server.is_finished() {
            bail!("the status server stopped");
        }
        w.step(&systemd, sample).await?;
        w.steps += 1;
        if let Ok(mut s) = snapshot.lock() {
            *s = w.snapshot_view();
        }
    }
}

impl Watcher {
    /// A watcher of `cfg` that has looked at nothing yet; `changed` wakes
    /// its loop when a followed host's verdict changes.
    fn new(opts: Options, paths: Paths, cfg: Config, changed: Arc<tokio::sync::Notify>) -> Watcher {
        Watcher {
            scalers: BTreeMap::new(),
            counts: BTreeMap::new(),
            decisions: state::last_decisions(&paths),
            cfg,
            intent: None,
            converged: None,
            retry_at: None,
            failures: 0,
            paths,
            opts,
            down_since: HashMap::new(),
            routed: None,
            scale_events: BTreeMap::new(),
            steps: 0,
            details: BTreeMap::new(),
            details_at: None,
            states: BTreeMap::new(),
            probes: HashMap::new(),
            unhealthy: BTreeSet::new(),
            reaper: reaper::Reaper::default(),
            figures: figures::Figures::new(state::now_unix()),
            hosts: hosts::Hosts::new(changed),
            host_serials: BTreeMap::new(),
            remote_connections: BTreeMap::new(),
            host_retry: BTreeMap::new(),
            host_returning: BTreeSet::new(),
            routed_out: None,
            lock_error: None,
        }
    }

    async fn step(&mut self, systemd: &Systemd, sample: bool) -> Result<()> {
        self.refresh_intent();
        self.hosts.follow(&self.cfg);
        // A host lost since the last step may come back changed (rebooted,
        // its runtime units gone): converge it again before routing to it,
        // even if it answers again by now.
        for name in self.hosts.take_lost() {
            self.host_serials.remove(&name);
            self.host_returning.insert(name);
        }
        let Some(intent) = self.intent.clone() else {
            return Ok(());
        };
        let units: BTreeMap<String, UnitState> =
            crate::systemd::by_name(systemd.list(&["cgipool-*@*.service"]).await?);
        // The front's own workers: other hosts are followed by `hosts`.
        let wanted = plan::numbered(&crate::hosts::front_counts(&self.cfg, &intent.counts));
        self.states = units.clone();
        let now = Instant::now();
        let (mut active, in_grace) = self.active(&units, &wanted, now);
        self.probe_due(systemd, &active, now).await;
        for unit in &self.unhealthy {
            if let Some((pool, n, _)) = plan::parse_instance(unit) {
                if let Some(set) = active.get_mut(pool) {
                    set.remove(&n);
                }
            }
        }
        self.reap(systemd, now).await;
        if sample {
            self.refresh_details(systemd, &units).await;
            self.refresh_backlogs(systemd).await;
            if let Some((pool, d, queues)) = self.sample_load(now, &wanted) {
                println!(
                    "watch: pool {pool}: scale {} -> {}: {}; queues: {queues}",
                    d.from, d.to, d.reason
                );
                let why = format!("scale {pool} {} -> {}", d.from, d.to);
                let change = Change::Scale {
                    pool: pool.clone(),
                    decision: d,
                };
                self.converge(systemd, &why, change).await;
                if let Some(s) = self.scalers.get_mut(&pool) {
                    s.reset(Instant::now());
                }
                return Ok(());
            }
        }
        if self.retry_at.map(|t| now < t).unwrap_or(false) {
            return Ok(());
        }
        // Converge when the intent is newer than what the last converge
        // reached (an apply was cut short, or ours failed), and when routes
        // must follow health (after a restarting worker's grace period).
        let behind = self.converged != Some(intent.serial);
        let seen = self.hosts.seen();
        for (name, s) in &seen {
            if matches!(s, hosts::Seen::Lost(_)) {
                self.host_serials.remove(name);
                self.host_returning.insert(name.clone());
            }
        }
        let out = hosts::hosts_out(&self.cfg, &seen, &self.host_returning);
        if behind {
            let why = format!("intent {} is not converged yet", intent.serial);
            if self.converge(systemd, &why, Change::None).await {
                self.routed = Some(active);
            }
        } else if self.routed_out.as_ref() != Some(&out) || self.host_due(&seen, intent.serial) {
            let why = format!("hosts follow health ({})", hosts::describe(&out));
            if self.converge(systemd, &why, Change::None).await {
                self.routed = Some(active);
            }
        } else if self.routed.as_ref() != Some(&active) && !in_grace {
            let why = format!(
                "routes follow health ({})",
                diff(&self.routed, &active).join(", ")
            );
            if self.converge(systemd, &why, Change::None).await {
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
}

fn sock_path(pool: &str, n: u32) -> String {
    crate::render::worker_socket_path(pool, n)
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

#[cfg(test)]
mod tests;
