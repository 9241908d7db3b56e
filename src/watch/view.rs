//! What /pool-status, /metrics and `cgipool status` show of watch's view:
//! per pool and per worker, from systemd's unit list and properties, the
//! kernel's socket queues and the decision log.
use super::{sock_path, sockdiag, Watcher};
use crate::plan;
use crate::state::{now_unix, Decision, RUN_DIR};
use serde::Serialize;

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
    pub last_decision: Option<Decision>,
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

impl Watcher {
    pub(super) fn snapshot_view(&self) -> Snapshot {
        // A failed read shows no queue figures rather than wrong ones.
        let queues = sockdiag::queues(&format!("{RUN_DIR}/")).unwrap_or_default();
        let pools = self
            .cfg
            .pools
            .values()
            .map(|p| {
                let n = self.counts.get(&p.name).copied().unwrap_or(0);
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
                                .map(|q| q.waiting())
                                .unwrap_or(0)
                        };
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
                    queue_depth: self.waiting(&p.name, &(1..=n).collect(), &queues),
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
