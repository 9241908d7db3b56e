//! The plan: a pure value saying what the executor will do to reach the
//! desired state from the observed one. No I/O; printed by `--dry-run`,
//! unit-tested. Computed once per run: where nginx must follow what really
//! started, the plan says so as a step ("route the workers that come up")
//! and the executor renders the files from what systemd reports then.
//!
//! A pool's queue is shared (one `cgipool-<pool>.socket` that every worker
//! inherits; scaling and rolls never change nginx's files) or per worker
//! (`cgipool-<pool>@<n>.socket`). A pool that switches between the two
//! *moves*: the new sockets start, nginx routes to them, the old nginx
//! workers drain, the old sockets stop, and then each running worker is
//! restarted, one at a time, onto its new socket.
use crate::render::{Entry, NginxFiles, UnitTree};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

/// Worker numbers per pool.
pub type Workers = BTreeMap<String, BTreeSet<u32>>;

/// Renders the nginx files that route to a given set of workers.
#[derive(Clone)]
pub struct Routes(Arc<dyn Fn(&Workers) -> NginxFiles + Send + Sync>);

impl Routes {
    pub fn new(f: impl Fn(&Workers) -> NginxFiles + Send + Sync + 'static) -> Routes {
        Routes(Arc::new(f))
    }

    pub fn render(&self, workers: &Workers) -> NginxFiles {
        (self.0)(workers)
    }
}

impl fmt::Debug for Routes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Routes(..)")
    }
}

/// What the intent wants on the host.
#[derive(Debug, Clone)]
pub struct Desired {
    pub units: UnitTree,
    /// pool → the worker numbers that should run.
    pub instances: Workers,
    /// How nginx routes a set of workers; None: nginx is not managed
    /// (not installed, or its unit is not active).
    pub routes: Option<Routes>,
    /// Services nginx must not route to although systemd says they are
    /// active (watch's health probe failed them).
    pub exclude: BTreeSet<String>,
    /// Don't reset and start workers that are `failed` (watch never revives
    /// what systemd gave up on: that is the operator's apply).
    pub leave_failed: bool,
    /// Pools with `queue = "shared"` (the others have a socket per worker).
    pub shared: BTreeSet<String>,
}

impl Desired {
    fn is_shared(&self, pool: &str) -> bool {
        self.shared.contains(pool)
    }

    /// The socket units a wanted worker needs, then its service.
    fn worker_units(&self, pool: &str, n: u32) -> Vec<String> {
        if self.is_shared(pool) {
            vec![service(pool, n)]
        } else {
            vec![socket(pool, n), service(pool, n)]
        }
    }
}

/// What nginx has now: its files, and the generation it really serves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObservedNginx {
    pub upstreams: Option<String>,
    pub locations: Option<String>,
    /// What `/.cgipool/generation` answered (None: no answer).
    pub served: Option<String>,
}

impl ObservedNginx {
    pub fn files_match(&self, files: &NginxFiles) -> bool {
        self.upstreams.as_deref() == Some(files.upstreams.as_str())
            && self.locations.as_deref() == Some(files.locations.as_str())
    }
}

/// Work an earlier run recorded before it began and did not finish: a
/// daemon-reload and rolling restarts that the unit files on disk no longer
/// show (they already carry the new bytes).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pending {
    pub daemon_reload: bool,
    pub roll: Vec<Vec<String>>,
    pub restart_watch: bool,
    /// Workers that move to another queue (see [`Plan::moves`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub moves: Vec<String>,
}

impl Pending {
    pub fn is_empty(&self) -> bool {
        *self == Pending::default()
    }
}

/// What the host has now.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// What an earlier run left to do.
    pub pending: Pending,
    /// The unit directory's entries that carry cgipool's header (and links).
    pub files: BTreeMap<PathBuf, Entry>,
    /// unit name → ActiveState, for every loaded cgipool-* unit.
    pub active: BTreeMap<String, String>,
    /// None: nginx is not installed or its unit is not active.
    pub nginx: Option<ObservedNginx>,
}

impl Observed {
    fn state(&self, unit: &str) -> Option<&str> {
        self.active.get(unit).map(String::as_str)
    }

    fn is_active(&self, unit: &str) -> bool {
        self.state(unit) == Some("active")
    }
}

/// Routing the workers that come up: after the starts, the executor asks
/// systemd which wanted workers are active, renders the files for them,
/// installs them (nginx -t) if they differ, and reloads nginx if the
/// generation it serves differs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The files if every worker the plan starts comes up.
    pub expected: NginxFiles,
    /// How many workers that is.
    pub workers: usize,
    pub write: bool,
    pub reload: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// `nginx -t` of the expected files before any unit changes.
    pub nginx_check: bool,
    /// Files and links to create or replace (relative to the unit dir).
    pub write: Vec<PathBuf>,
    /// Links of instances that go away (removed with the writes).
    pub unlink: Vec<PathBuf>,
    pub daemon_reload: bool,
    /// The daemon-reload that links alone need comes after the stops (see
    /// [`plan`]).
    pub reload_after_stop: bool,
    /// Units in `start` that are `failed` now: reset first (start limits).
    pub reset_failed: Vec<String>,
    /// Units to start, in order (targets, then sockets before services).
    pub start: Vec<String>,
    /// Services (or socket+service pairs) to restart one at a time.
    pub roll: Vec<Vec<String>>,
    /// nginx follows the workers that came up.
    pub route: Option<Route>,
    /// Units to stop once nginx no longer sends them traffic.
    pub stop: Vec<String>,
    /// Running workers of pools that switch queues (shared ↔ per-worker):
    /// restarted one at a time once nginx routes to the new sockets, its
    /// old workers have drained and the old sockets stopped, so that each
    /// comes back holding only its new socket.
    pub moves: Vec<String>,
    /// Unit files of pools that go away (removed at the end).
    pub remove: Vec<PathBuf>,
    /// Start or restart the watch daemon, last of all.
    pub watch: Option<WatchAction>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchAction {
    Start,
    Restart,
}

pub use crate::render::WATCH_UNIT;

impl Plan {
    pub fn is_empty(&self) -> bool {
        *self == Plan::default()
    }
}

pub fn service(pool: &str, n: u32) -> String {
    format!("cgipool-{pool}@{n}.service")
}

pub fn socket(pool: &str, n: u32) -> String {
    format!("cgipool-{pool}@{n}.socket")
}

/// `queue = "shared"`: the pool's one socket unit.
pub fn pool_socket(pool: &str) -> String {
    crate::render::pool_socket_name(pool)
}

pub fn pool_target(pool: &str) -> String {
    format!("cgipool-{pool}.target")
}

/// Stop order: services before their sockets, targets last.
pub fn stop_order(unit: &str) -> (u8, String) {
    let rank = if unit.ends_with(".service") {
        0
    } else if unit.ends_with(".socket") {
        1
    } else {
        2
    };
    (rank, unit.to_string())
}

/// Parses `cgipool-<pool>@<n>.<kind>` into its parts.
pub fn parse_instance(unit: &str) -> Option<(&str, u32, &str)> {
    let rest = unit.strip_prefix("cgipool-")?;
    let (pool, rest) = rest.split_once('@')?;
    let (n, kind) = rest.split_once('.')?;
    Some((pool, n.parse().ok()?, kind))
}

/// The worker numbers a pool target wants, read from its `.wants` links.
pub fn instances_on_disk(files: &BTreeMap<PathBuf, Entry>) -> Workers {
    let mut out: Workers = BTreeMap::new();
    for path in files.keys() {
        let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else {
            continue;
        };
        if let Some((pool, n, "service")) = parse_instance(&name) {
            let in_own_target = path
                .parent()
                .map(|p| p.to_string_lossy() == format!("{}.wants", pool_target(pool)))
                .unwrap_or(false);
            if in_own_target {
                out.entry(pool.to_string()).or_default().insert(n);
            }
        }
    }
    out
}

/// `1..=n` per pool.
pub fn numbered(counts: &BTreeMap<String, u32>) -> Workers {
    counts
        .iter()
        .map(|(p, &n)| (p.clone(), (1..=n).collect()))
        .collect()
}

/// The wanted workers whose service unit satisfies `pred`.
pub fn workers_where(wanted: &Workers, pred: impl Fn(&str) -> bool) -> Workers {
    wanted
        .iter()
        .map(|(pool, ns)| {
            let up = ns
                .iter()
                .copied()
                .filter(|&n| pred(&service(pool, n)))
                .collect();
            (pool.clone(), up)
        })
        .collect()
}

/// Units cgipool made: those whose own unit file, or whose template's,
/// carries cgipool's header. Anything else named cgipool-* is left alone.
pub fn is_ours(unit: &str, files: &BTreeMap<PathBuf, Entry>) -> bool {
    let file = match parse_instance(unit) {
        Some((pool, _, kind)) => format!("cgipool-{pool}@.{kind}"),
        None => unit.to_string(),
    };
    matches!(files.get(&PathBuf::from(file)), Some(Entry::File(_)))
}

pub fn plan(desired: &Desired, observed: &Observed) -> Plan {
    let mut p = Plan::default();
    let is_link = |path: &PathBuf| {
        path.parent()
            .map(|d| !d.as_os_str().is_empty())
            .unwrap_or(false)
    };
    let failed = |u: &str| observed.state(u) == Some("failed");

    for (path, entry) in &desired.units.entries {
        if observed.files.get(path) != Some(entry) {
            p.write.push(path.clone());
        }
    }
    for path in observed.files.keys() {
        if !desired.units.entries.contains_key(path) {
            if is_link(path) {
                p.unlink.push(path.clone());
            } else {
                p.remove.push(path.clone());
            }
        }
    }
    // Removing only links (a scale-down, a pool or `down` going away) needs
    // no daemon-reload before the stops: nothing new must be loaded, and
    // reloading while every unit is still loaded was the slowest step of a
    // large `down` (1.5 s of 5.9 s at 500 workers). It comes after the
    // stops, recorded in pending work like any other.
    let links_only = p.write.is_empty() && !p.unlink.is_empty() && !observed.pending.daemon_reload;
    p.daemon_reload = !links_only
        && (!p.write.is_empty() || !p.unlink.is_empty() || observed.pending.daemon_reload);
    p.reload_after_stop = links_only;

    // Start: targets first, then each new worker's socket and service.
    let mut targets = Vec::new();
    if desired
        .units
        .entries
        .contains_key(&PathBuf::from("cgipool.target"))
    {
        targets.push("cgipool.target".to_string());
    }
    targets.extend(desired.instances.keys().map(|pool| pool_target(pool)));
    p.start
        .extend(targets.into_iter().filter(|t| !observed.is_active(t)));
    let mut starting = BTreeSet::new();
    for (pool, ns) in &desired.instances {
        let pool_socket = desired
            .is_shared(pool)
            .then(|| pool_socket(pool))
            .filter(|u| !(observed.is_active(u) || (desired.leave_failed && failed(u))));
        p.start.extend(pool_socket);
        for &n in ns {
            for unit in desired.worker_units(pool, n) {
                if observed.is_active(&unit) || (desired.leave_failed && failed(&unit)) {
                    continue;
                }
                if unit.ends_with(".service") {
                    starting.insert(unit.clone());
                }
                p.start.push(unit);
            }
        }
    }
    p.reset_failed = p.start.iter().filter(|u| failed(u)).cloned().collect();

    let watch_path = PathBuf::from(WATCH_UNIT);
    if desired.units.entries.contains_key(&watch_path) {
        if !observed.is_active(WATCH_UNIT) {
            p.watch = Some(WatchAction::Start);
        } else if (observed.files.contains_key(&watch_path) && p.write.contains(&watch_path))
            || observed.pending.restart_watch
        {
            p.watch = Some(WatchAction::Restart);
        }
    }

    // Roll: running workers whose template changed restart one at a time.
    // Workers of a pool that switches queues move instead (after routing).
    for (pool, ns) in &desired.instances {
        let on_disk = |name: &str| observed.files.contains_key(&PathBuf::from(name));
        let changed = |name: String| on_disk(&name) && p.write.contains(&PathBuf::from(name));
        let shared = desired.is_shared(pool);
        let new_socket_file = if shared {
            pool_socket(pool)
        } else {
            format!("cgipool-{pool}@.socket")
        };
        let moving = on_disk(&format!("cgipool-{pool}@.service")) && !on_disk(&new_socket_file);
        let service_changed = changed(format!("cgipool-{pool}@.service"));
        let socket_changed = changed(new_socket_file);
        let running: Vec<u32> = ns
            .iter()
            .copied()
            .filter(|&n| {
                !starting.contains(&service(pool, n)) && observed.is_active(&service(pool, n))
            })
            .collect();
        if moving {
            p.moves.extend(running.iter().map(|&n| service(pool, n)));
        } else if shared && socket_changed {
            // The pool's one socket is recreated with its workers (they
            // require it): the one change that costs the connections that
            // arrive meanwhile (README: only socket_group changes it).
            let mut group = vec![pool_socket(pool)];
            group.extend(running.iter().map(|&n| service(pool, n)));
            p.roll.push(group);
        } else if socket_changed {
            p.roll.extend(
                running
                    .iter()
                    .map(|&n| vec![socket(pool, n), service(pool, n)]),
            );
        } else if service_changed {
            p.roll
                .extend(running.iter().map(|&n| vec![service(pool, n)]));
        }
    }
    // Rolls an earlier run recorded and did not get to, for workers that
    // are still wanted and running (the others start fresh anyway).
    let wanted_service = |unit: &str| {
        parse_instance(unit)
            .map(|(pool, n, _)| {
                desired
                    .instances
                    .get(pool)
                    .map(|ns| ns.contains(&n))
                    .unwrap_or(false)
            })
            .unwrap_or(false)
    };
    for group in &observed.pending.roll {
        let Some(svc) = group.iter().find(|u| u.ends_with(".service")) else {
            continue;
        };
        if wanted_service(svc)
            && observed.is_active(svc)
            && !starting.contains(svc)
            && !p.roll.iter().any(|g| g.contains(svc))
            && !p.moves.contains(svc)
        {
            p.roll.push(group.clone());
        }
    }
    for svc in &observed.pending.moves {
        if wanted_service(svc)
            && observed.is_active(svc)
            && !starting.contains(svc)
            && !p.moves.contains(svc)
        {
            p.roll.retain(|g| !g.contains(svc));
            p.moves.push(svc.clone());
        }
    }

    // Stop: every unit of ours that is running but not wanted.
    let mut wanted: BTreeSet<String> = BTreeSet::new();
    for unit in ["cgipool.target", WATCH_UNIT] {
        if desired.units.entries.contains_key(&PathBuf::from(unit)) {
            wanted.insert(unit.to_string());
        }
    }
    for (pool, ns) in &desired.instances {
        wanted.insert(pool_target(pool));
        if desired.is_shared(pool) {
            wanted.insert(pool_socket(pool));
        }
        for &n in ns {
            wanted.extend(desired.worker_units(pool, n));
        }
    }
    let mut stop: Vec<&String> = observed
        .active
        .iter()
        .filter(|(unit, _)| is_ours(unit, &observed.files))
        .filter(|(unit, state)| {
            !wanted.contains(*unit) && state.as_str() != "inactive" && state.as_str() != "failed"
        })
        .map(|(unit, _)| unit)
        .collect();
    stop.sort_by_key(|u| stop_order(u));
    p.stop = stop.into_iter().cloned().collect();

    // nginx: the workers that are active now or started by this plan.
    if let (Some(routes), Some(have)) = (&desired.routes, &observed.nginx) {
        let expected_workers = workers_where(&desired.instances, |unit| {
            !desired.exclude.contains(unit) && (starting.contains(unit) || observed.is_active(unit))
        });
        let expected = routes.render(&expected_workers);
        let write = !have.files_match(&expected);
        let reload = have.served.as_deref() != Some(expected.generation.as_str());
        if write || reload || !starting.is_empty() || !p.moves.is_empty() {
            p.nginx_check = write;
            p.route = Some(Route {
                workers: expected_workers.values().map(BTreeSet::len).sum(),
                expected,
                write,
                reload,
            });
        }
    }
    p
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return writeln!(f, "no changes");
        }
        if self.nginx_check {
            writeln!(
                f,
                "nginx   check the new upstreams and locations (nginx -t)"
            )?;
        }
        for w in &self.write {
            writeln!(f, "write   {}", w.display())?;
        }
        for w in &self.unlink {
            writeln!(f, "unlink  {}", w.display())?;
        }
        if self.daemon_reload {
            writeln!(f, "systemd daemon-reload")?;
        }
        if self.reload_after_stop {
            writeln!(f, "systemd daemon-reload, after the stops")?;
        }
        for u in &self.reset_failed {
            writeln!(f, "reset-failed {u}")?;
        }
        for u in &self.start {
            writeln!(f, "start   {u}")?;
        }
        for group in &self.roll {
            writeln!(f, "restart {}", group.join(" + "))?;
        }
        if let Some(r) = &self.route {
            let mut what = Vec::new();
            if r.write {
                what.push("write the files");
            }
            if r.reload {
                what.push("reload");
            }
            if what.is_empty() {
                what.push("check");
            }
            writeln!(
                f,
                "nginx   route the workers that come up ({} expected): {}, generation {}",
                r.workers,
                what.join(", "),
                r.expected.generation
            )?;
        }
        for u in &self.stop {
            writeln!(f, "stop    {u}")?;
        }
        for u in &self.moves {
            writeln!(f, "restart {u} (moves to its new socket)")?;
        }
        match self.watch {
            Some(WatchAction::Start) => writeln!(f, "start   {WATCH_UNIT}")?,
            Some(WatchAction::Restart) => writeln!(f, "restart {WATCH_UNIT}")?,
            None => {}
        }
        for w in &self.remove {
            writeln!(f, "remove  {}", w.display())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
