//! What /pool-status, /metrics and `cgipool status` show of watch's view:
//! per pool and per worker, from systemd's unit list and properties, the
//! kernel's socket queues, the workers' own reports (`StatusText`, see
//! `worker_status`) and the decision log; the figures that need memory of
//! the past come from `figures`.
use super::figures::{self, PoolInputs};
use super::{sock_path, sockdiag, Watcher};
use crate::plan;
use crate::state::{now_unix, Decision, RUN_DIR};
use serde::Serialize;

#[derive(Debug, Clone, Default, Serialize)]
pub struct Snapshot {
    pub generated_at: u64,
    /// Steps watch completed since it started (each a look at the host).
    pub steps: u64,
    /// This host's (the front's) pools and workers; a pool that runs only
    /// on other hosts shows no worker here (see `hosts`).
    pub pools: Vec<PoolView>,
    /// The other hosts (`[host.NAME]`) as watch follows them.
    pub hosts: Vec<HostView>,
}

/// Another host as watch sees it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HostView {
    pub host: String,
    pub address: String,
    /// "up" (its systemd answers), "lost" or "unknown" (not read yet).
    pub state: String,
    /// Why it is lost.
    pub reason: Option<String>,
    /// When `state` last changed.
    pub since_unix: u64,
    /// The intent watch last converged it to (None: not since watch began).
    pub converged_serial: Option<u64>,
    pub pools: Vec<HostPoolView>,
}

/// One pool on another host.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HostPoolView {
    pub pool: String,
    pub wanted: u32,
    /// Active workers at watch's last read of the host.
    pub active: u32,
    /// The front's nginx routes to it.
    pub routed: bool,
    /// The front's connections to its queue at the last load sample.
    pub connections: Option<u32>,
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
    pub last_decision: Option<Decision>,
    /// When watch started (the figures below count from then).
    pub started_at_unix: u64,
    /// Requests the workers reported served (None: no worker reports).
    pub accepted_total: Option<u64>,
    pub max_queue_depth: u32,
    /// The pool socket's effective listen backlog (None: not read yet).
    pub backlog: Option<u32>,
    pub idle: u32,
    pub busy: u32,
    /// Active workers.
    pub total: u32,
    pub max_busy: u32,
    /// Times the pool was seen at max with every worker busy and a queue.
    pub saturated_total: u64,
    pub slow_requests_total: u64,
    /// Sum of the workers' NRestarts.
    pub restarts_total: u64,
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
    /// When the worker last became active (ActiveEnterTimestamp), Unix seconds.
    pub since_unix: Option<u64>,
    /// Requests this worker process served, as it reported them.
    pub requests_total: Option<u64>,
    /// The request in flight, as the worker reported it; None while idle
    /// (or when the worker reports nothing).
    pub current: Option<CurrentView>,
    /// Whether the worker reports its state (the contract's STATUS= lines).
    pub reports: bool,
    #[serde(skip)]
    pub invocation_id: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct CurrentView {
    pub method: String,
    pub uri: String,
    pub duration_ms: u64,
    pub request_id: Option<String>,
    /// Unix time in milliseconds when the worker took the request.
    pub since_ms: u64,
}

impl Watcher {
    pub(super) fn snapshot_view(&mut self) -> Snapshot {
        // A failed read shows no queue figures rather than wrong ones.
        let queues = sockdiag::queues(&format!("{RUN_DIR}/")).unwrap_or_default();
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let mut pools: Vec<PoolView> = self
            .cfg
            .pools
            .values()
            .map(|p| {
                let on_front = !p.is_remote() || p.on_host(crate::config::LOCAL_HOST);
                let n = if on_front {
                    self.counts.get(&p.name).copied().unwrap_or(0)
                } else {
                    0
                };
                // A shared queue is one socket: its figures are the pool's,
                // no single worker's (those show 0 waiting).
                let shared = self.is_shared(&p.name);
                let workers: Vec<WorkerView> = (1..=n)
                    .map(|i| {
                        let unit = plan::service(&p.name, i);
                        let d = self.details.get(&unit).cloned().unwrap_or_default();
                        let (active_state, sub_state) = match self.states.get(&unit) {
                            Some(u) => (u.active_state.clone(), u.sub_state.clone()),
                            None => ("inactive".to_string(), "dead".to_string()),
                        };
                        let healthy = active_state == "active" && !self.unhealthy.contains(&unit);
                        let waiting = if shared {
                            0
                        } else {
                            queues
                                .get(&sock_path(&p.name, i))
                                .map(|q| self.waiting_in(&p.name, q))
                                .unwrap_or(0)
                        };
                        let mut view = WorkerView {
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
                            since_unix: d.active_since_usec.map(|us| us / 1_000_000),
                            invocation_id: d.invocation_id.clone(),
                            ..WorkerView::default()
                        };
                        figures::fill_worker(&mut view, &d.status_text, now_ms);
                        view
                    })
                    .collect();
                PoolView {
                    pool: p.name.clone(),
                    min: p.min,
                    max: p.max,
                    wanted: n,
                    healthy: workers.iter().filter(|w| w.healthy).count() as u32,
                    queue_depth: self.waiting(&p.name, &(1..=n).collect(), &queues),
                    scale_events: self.scale_events.get(&p.name).copied().unwrap_or(0),
                    last_decision: self.decisions.get(&p.name).cloned(),
                    workers,
                    ..PoolView::default()
                }
            })
            .collect();
        for view in &mut pools {
            let Some(p) = self.cfg.pools.get(&view.pool) else {
                continue;
            };
            let inputs = PoolInputs {
                shared: self.is_shared(&p.name),
                route: p.route.clone(),
                slow_request: p
                    .slow_request
                    .as_deref()
                    .and_then(crate::config::duration_usec)
                    .map(std::time::Duration::from_micros),
            };
            self.figures.fill(view, &inputs);
        }
        self.figures
            .forget_pools_except(&self.cfg.pools.keys().cloned().collect());
        Snapshot {
            generated_at: now_unix(),
            steps: self.steps,
            pools,
            hosts: self.hosts_view(),
        }
    }

    fn hosts_view(&self) -> Vec<HostView> {
        let readings = self.hosts.readings();
        let out = self.routed_out.clone().unwrap_or_default();
        self.cfg
            .hosts
            .values()
            .map(|h| {
                let r = readings.get(&h.name);
                let (state, reason) = match r.map(|r| &r.seen) {
                    Some(super::hosts::Seen::Up(_)) => ("up", None),
                    Some(super::hosts::Seen::Lost(why)) => ("lost", Some(why.clone())),
                    _ => ("unknown", None),
                };
                let pools = self
                    .cfg
                    .pools
                    .values()
                    .filter(|p| p.on_host(&h.name))
                    .map(|p| HostPoolView {
                        pool: p.name.clone(),
                        wanted: self.counts.get(&p.name).copied().unwrap_or(0),
                        active: r.and_then(|r| r.active.get(&p.name).copied()).unwrap_or(0),
                        routed: !out.get(&p.name).is_some_and(|o| o.contains(&h.name)),
                        connections: self
                            .remote_connections
                            .get(&(p.name.clone(), h.name.clone()))
                            .copied(),
                    })
                    .collect();
                HostView {
                    host: h.name.clone(),
                    address: h.address.to_string(),
                    state: state.to_string(),
                    reason,
                    since_unix: r.map(|r| r.since_unix).unwrap_or(0),
                    converged_serial: self.host_serials.get(&h.name).copied(),
                    pools,
                }
            })
            .collect()
    }
}
