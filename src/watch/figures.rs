//! The operator's figures of a pool that need memory of the past (issue 18,
//! PHP-FPM's status fields): watch's start, the longest queue and the most
//! busy workers seen, how often the pool was saturated, requests served by
//! processes that are gone, slow requests already logged, and the pool
//! socket's backlog. Every figure is derived from a source the operator can
//! check by hand: systemd's unit properties (states, `NRestarts`,
//! `ActiveEnterTimestamp`, the socket's `Backlog`, the worker's
//! `StatusText`), and the kernel's socket queue (`ss -x`).
use super::{PoolView, Watcher, WorkerView};
use crate::plan;
use crate::worker_status;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// How often the sockets' `Backlog=` is read again (it changes only with a
/// unit file).
const BACKLOG_REFRESH: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub(crate) struct Figures {
    pub started_at_unix: u64,
    pools: BTreeMap<String, PoolFigures>,
    /// Effective listen backlog per pool (its socket unit's `Backlog=`,
    /// capped by `net.core.somaxconn` as the kernel does).
    backlogs: BTreeMap<String, u32>,
    backlogs_at: Option<Instant>,
}

#[derive(Debug, Default)]
struct PoolFigures {
    max_queue_depth: u32,
    max_busy: u32,
    saturated_total: u64,
    saturated_now: bool,
    /// Requests reported by worker processes that have since been replaced.
    retired_requests: u64,
    /// Per worker unit: its InvocationID and the last requests it reported.
    last_report: BTreeMap<String, (String, u64)>,
    slow_requests_total: u64,
    /// Requests in flight already logged as slow: (unit, since_ms).
    slow_logged: BTreeSet<(String, u64)>,
}

/// What a pool's figures are computed from, besides its view.
pub(crate) struct PoolInputs {
    pub shared: bool,
    pub route: String,
    pub slow_request: Option<Duration>,
}

impl Figures {
    pub fn new(started_at_unix: u64) -> Figures {
        Figures {
            started_at_unix,
            pools: BTreeMap::new(),
            backlogs: BTreeMap::new(),
            backlogs_at: None,
        }
    }

    /// Fills the pool's figures into its view (its workers' views are
    /// complete) and updates what is remembered; logs slow requests once.
    pub fn fill(&mut self, view: &mut PoolView, inputs: &PoolInputs) {
        let f = self.pools.entry(view.pool.clone()).or_default();
        let mut accepted = f.retired_requests;
        let mut any_report = f.retired_requests > 0;
        let mut seen = BTreeMap::new();
        for w in &view.workers {
            let Some(requests) = w.requests_total else {
                continue;
            };
            any_report = true;
            if let Some((inv, last)) = f.last_report.get(&w.unit) {
                if *inv != w.invocation_id {
                    // A new process: what the old one served is history.
                    f.retired_requests += last;
                    accepted += last;
                }
            }
            accepted += requests;
            seen.insert(w.unit.clone(), (w.invocation_id.clone(), requests));
        }
        // Workers that report nothing now keep their last figure until a
        // new process of theirs reports.
        for (unit, last) in std::mem::take(&mut f.last_report) {
            if let std::collections::btree_map::Entry::Vacant(e) = seen.entry(unit) {
                accepted += last.1;
                e.insert(last);
            }
        }
        f.last_report = seen;
        view.accepted_total = any_report.then_some(accepted);

        let total = view
            .workers
            .iter()
            .filter(|w| w.active_state == "active")
            .count() as u32;
        let mut busy = view
            .workers
            .iter()
            .filter(|w| w.active_state == "active" && w.busy)
            .count() as u32;
        // A worker takes a connection only when free (the contract), so a
        // connection waiting on a shared socket means none is.
        if inputs.shared && view.queue_depth > 0 {
            busy = total;
        }
        view.total = total;
        view.busy = busy;
        view.idle = total - busy;
        view.restarts_total = view
            .workers
            .iter()
            .filter_map(|w| w.n_restarts)
            .map(u64::from)
            .sum();
        view.backlog = self.backlogs.get(&view.pool).copied();
        view.started_at_unix = self.started_at_unix;

        f.max_queue_depth = f.max_queue_depth.max(view.queue_depth);
        f.max_busy = f.max_busy.max(busy);
        let saturated =
            total > 0 && view.wanted >= view.max && busy >= total && view.queue_depth > 0;
        if saturated && !f.saturated_now {
            f.saturated_total += 1;
        }
        f.saturated_now = saturated;
        view.max_queue_depth = f.max_queue_depth;
        view.max_busy = f.max_busy;
        view.saturated_total = f.saturated_total;

        if let Some(limit) = inputs.slow_request {
            let mut in_flight = BTreeSet::new();
            for w in &view.workers {
                let Some(c) = &w.current else { continue };
                let key = (w.unit.clone(), c.since_ms);
                if c.duration_ms >= limit.as_millis() as u64 && !f.slow_logged.contains(&key) {
                    f.slow_requests_total += 1;
                    println!(
                        "watch: slow request: id={} route={} worker={} duration={}ms (slow_request {}ms): {} {}",
                        c.request_id.as_deref().unwrap_or("-"),
                        inputs.route,
                        w.worker,
                        c.duration_ms,
                        limit.as_millis(),
                        c.method,
                        c.uri
                    );
                    f.slow_logged.insert(key.clone());
                }
                in_flight.insert(key);
            }
            f.slow_logged.retain(|k| in_flight.contains(k));
        }
        view.slow_requests_total = f.slow_requests_total;
    }

    pub fn forget_pools_except(&mut self, pools: &BTreeSet<String>) {
        self.pools.retain(|p, _| pools.contains(p));
    }
}

/// A worker's report, read from its unit's `StatusText`, into its view.
pub(crate) fn fill_worker(view: &mut WorkerView, status_text: &str, now_ms: u64) {
    let Some(report) = worker_status::parse(status_text) else {
        return;
    };
    view.requests_total = Some(report.requests);
    view.reports = true;
    if let Some(c) = report.current {
        view.busy = true;
        view.current = Some(super::view::CurrentView {
            duration_ms: now_ms.saturating_sub(c.since_ms),
            method: c.method,
            uri: c.uri,
            request_id: c.id,
            since_ms: c.since_ms,
        });
    } else {
        view.busy = false;
    }
}

impl Watcher {
    /// Re-reads each pool socket's `Backlog=` (every 30 s; a failed read
    /// leaves the figure out).
    pub(super) async fn refresh_backlogs(&mut self, systemd: &crate::systemd::Systemd) {
        if self
            .figures
            .backlogs_at
            .is_some_and(|t| t.elapsed() < BACKLOG_REFRESH)
        {
            return;
        }
        let somaxconn = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        let mut out = BTreeMap::new();
        for (name, ns) in plan::numbered(&self.counts) {
            let unit = if self.is_shared(&name) {
                plan::pool_socket(&name)
            } else {
                match ns.iter().next() {
                    Some(n) => plan::socket(&name, *n),
                    None => continue,
                }
            };
            match systemd.socket_backlog(&unit).await {
                Ok(b) => {
                    out.insert(name, somaxconn.map(|m| b.min(m)).unwrap_or(b));
                }
                Err(e) => eprintln!("watch: pool {name}: {e:#}"),
            }
        }
        self.figures.backlogs = out;
        self.figures.backlogs_at = Some(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(unit: &str, inv: &str, status: &str) -> WorkerView {
        let mut w = WorkerView {
            worker: unit.into(),
            unit: unit.into(),
            active_state: "active".into(),
            invocation_id: inv.into(),
            n_restarts: Some(1),
            ..WorkerView::default()
        };
        fill_worker(&mut w, status, 10_000);
        w
    }

    fn pool(workers: Vec<WorkerView>, queue: u32) -> PoolView {
        PoolView {
            pool: "p".into(),
            min: 1,
            max: 2,
            wanted: 2,
            queue_depth: queue,
            workers,
            ..PoolView::default()
        }
    }

    const BUSY: &str = "cgipool requests=4 busy since=1000 method=GET uri=/x id=r1";

    #[test]
    fn saturation_counts_episodes_and_maxima_only_grow() {
        let mut f = Figures::new(7);
        let inputs = PoolInputs {
            shared: false,
            route: "/p".into(),
            slow_request: None,
        };
        let busy = || vec![worker("a", "i", BUSY), worker("b", "i", BUSY)];
        for (workers, queue, saturated, max_queue) in [
            (busy(), 3, 1, 3),
            (busy(), 5, 1, 5),
            (busy(), 0, 1, 5),
            (busy(), 1, 2, 5),
            (
                vec![
                    worker("a", "i", "cgipool requests=5 idle"),
                    worker("b", "i", BUSY),
                ],
                2,
                2,
                5,
            ),
        ] {
            let mut v = pool(workers, queue);
            f.fill(&mut v, &inputs);
            assert_eq!(v.saturated_total, saturated);
            assert_eq!(v.max_queue_depth, max_queue);
            assert_eq!(v.max_busy, 2);
            assert_eq!(v.total, 2);
            assert_eq!(v.idle + v.busy, 2);
            assert_eq!(v.restarts_total, 2);
            assert_eq!(v.started_at_unix, 7);
        }
    }

    #[test]
    fn a_shared_queue_with_waiting_connections_means_every_worker_is_busy() {
        let mut f = Figures::new(0);
        let inputs = PoolInputs {
            shared: true,
            route: "/p".into(),
            slow_request: None,
        };
        let mut v = pool(vec![worker("a", "i", ""), worker("b", "i", "garbage")], 1);
        f.fill(&mut v, &inputs);
        assert_eq!((v.busy, v.idle, v.accepted_total), (2, 0, None));
    }

    #[test]
    fn accepted_survives_a_new_process_and_slow_requests_log_once() {
        let mut f = Figures::new(0);
        let inputs = PoolInputs {
            shared: true,
            route: "/p".into(),
            slow_request: Some(Duration::from_secs(5)),
        };
        let mut v = pool(vec![worker("a", "i1", BUSY)], 0);
        f.fill(&mut v, &inputs);
        assert_eq!((v.accepted_total, v.slow_requests_total), (Some(4), 1));
        let mut v = pool(vec![worker("a", "i1", BUSY)], 0);
        f.fill(&mut v, &inputs);
        assert_eq!(v.slow_requests_total, 1, "logged once");
        let mut v = pool(vec![worker("a", "i2", "cgipool requests=1 idle")], 0);
        f.fill(&mut v, &inputs);
        assert_eq!((v.accepted_total, v.slow_requests_total), (Some(5), 1));
    }
}
