//! The plan: a pure value saying what `apply` will do to reach the desired
//! state from the observed one. No I/O; printed by `--dry-run`, unit-tested.
use crate::render::{Entry, UnitTree};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;

/// What the config wants on the host.
#[derive(Debug, Clone)]
pub struct Desired {
    pub units: UnitTree,
    /// pool → the worker numbers that should run.
    pub instances: BTreeMap<String, BTreeSet<u32>>,
    /// The nginx files as they will be once every wanted worker is active.
    pub nginx: Option<(String, String)>,
}

/// What the host has now.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub files: BTreeMap<PathBuf, Entry>,
    /// unit name → ActiveState, for every loaded cgipool unit.
    pub active: BTreeMap<String, String>,
    pub nginx: Option<(Option<String>, Option<String>)>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Files and links to create or replace (relative to the unit dir).
    pub write: Vec<PathBuf>,
    /// Links of instances that go away (removed with the writes).
    pub unlink: Vec<PathBuf>,
    /// Unit files of pools that go away (removed at the end).
    pub remove: Vec<PathBuf>,
    pub daemon_reload: bool,
    /// Units to start, in order (targets, then sockets before services).
    pub start: Vec<String>,
    /// Services (or socket+service pairs) to restart one at a time.
    pub roll: Vec<Vec<String>>,
    /// Units to stop after nginx stopped sending them traffic.
    pub stop: Vec<String>,
    pub nginx_write: bool,
    /// Units in `start` that are `failed` now: reset first (start limits).
    pub reset_failed: Vec<String>,
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
pub fn instances_on_disk(files: &BTreeMap<PathBuf, Entry>) -> BTreeMap<String, BTreeSet<u32>> {
    let mut out: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
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

/// Units cgipool manages: its top target, and the pool targets and worker
/// instances of pools that are configured or still have generated files.
/// Anything else named cgipool-* is left alone.
fn is_ours(unit: &str, desired: &Desired, observed: &Observed) -> bool {
    let known = |pool: &str| {
        desired.instances.contains_key(pool)
            || observed
                .files
                .contains_key(&PathBuf::from(format!("cgipool-{pool}@.service")))
    };
    if unit == "cgipool.target" || unit == WATCH_UNIT {
        return true;
    }
    if let Some((pool, _, kind)) = parse_instance(unit) {
        return (kind == "service" || kind == "socket") && known(pool);
    }
    match unit
        .strip_prefix("cgipool-")
        .and_then(|r| r.strip_suffix(".target"))
    {
        Some(pool) => known(pool),
        None => false,
    }
}

pub fn plan(desired: &Desired, observed: &Observed) -> Plan {
    let mut p = Plan::default();
    let is_active = |u: &str| {
        observed
            .active
            .get(u)
            .map(|s| s == "active")
            .unwrap_or(false)
    };
    let is_link = |path: &PathBuf| {
        path.parent()
            .map(|d| !d.as_os_str().is_empty())
            .unwrap_or(false)
    };

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
    p.daemon_reload = !p.write.is_empty() || !p.unlink.is_empty();

    // Start: targets first, then each new worker's socket and service.
    let mut targets = vec!["cgipool.target".to_string()];
    targets.extend(desired.instances.keys().map(|pool| pool_target(pool)));
    p.start
        .extend(targets.into_iter().filter(|t| !is_active(t)));
    let mut starting = BTreeSet::new();
    for (pool, ns) in &desired.instances {
        for &n in ns {
            if !is_active(&socket(pool, n)) {
                p.start.push(socket(pool, n));
            }
            if !is_active(&service(pool, n)) {
                p.start.push(service(pool, n));
                starting.insert(service(pool, n));
            }
        }
    }

    p.reset_failed = p
        .start
        .iter()
        .filter(|u| {
            observed
                .active
                .get(*u)
                .map(|s| s == "failed")
                .unwrap_or(false)
        })
        .cloned()
        .collect();
    let watch_path = PathBuf::from(WATCH_UNIT);
    if desired.units.entries.contains_key(&watch_path) {
        if !is_active(WATCH_UNIT) {
            p.watch = Some(WatchAction::Start);
        } else if observed.files.contains_key(&watch_path) && p.write.contains(&watch_path) {
            p.watch = Some(WatchAction::Restart);
        }
    }

    // Roll: running workers whose template changed restart one at a time.
    for (pool, ns) in &desired.instances {
        let changed = |name: String| {
            let path = PathBuf::from(name);
            observed.files.contains_key(&path) && p.write.contains(&path)
        };
        let service_changed = changed(format!("cgipool-{pool}@.service"));
        let socket_changed = changed(format!("cgipool-{pool}@.socket"));
        if !service_changed && !socket_changed {
            continue;
        }
        for &n in ns {
            if starting.contains(&service(pool, n)) {
                continue;
            }
            if socket_changed {
                p.roll.push(vec![socket(pool, n), service(pool, n)]);
            } else {
                p.roll.push(vec![service(pool, n)]);
            }
        }
    }

    // Stop: every loaded cgipool unit that is running but not wanted.
    let mut wanted: BTreeSet<String> = BTreeSet::from(["cgipool.target".to_string()]);
    if desired
        .units
        .entries
        .contains_key(&PathBuf::from(WATCH_UNIT))
    {
        wanted.insert(WATCH_UNIT.to_string());
    }
    for (pool, ns) in &desired.instances {
        wanted.insert(pool_target(pool));
        for &n in ns {
            wanted.insert(socket(pool, n));
            wanted.insert(service(pool, n));
        }
    }
    let mut stop: Vec<&String> = observed
        .active
        .iter()
        .filter(|(unit, _)| is_ours(unit, desired, observed))
        .filter(|(unit, state)| {
            !wanted.contains(*unit) && state.as_str() != "inactive" && state.as_str() != "failed"
        })
        .map(|(unit, _)| unit)
        .collect();
    // Services before their sockets, targets last.
    stop.sort_by_key(|u| stop_order(u));
    p.stop = stop.into_iter().cloned().collect();

    if let (Some(want), Some(have)) = (&desired.nginx, &observed.nginx) {
        p.nginx_write = have.0.as_deref() != Some(want.0.as_str())
            || have.1.as_deref() != Some(want.1.as_str());
    }
    p
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return writeln!(f, "no changes");
        }
        for w in &self.write {
            writeln!(f, "write   {}", w.display())?;
        }
        for w in &self.unlink {
            writeln!(f, "unlink  {}", w.display())?;
        }
        if self.nginx_write {
            writeln!(f, "nginx   write upstreams and locations, nginx -t, reload")?;
        }
        if self.daemon_reload {
            writeln!(f, "systemd daemon-reload")?;
        }
        for u in &self.start {
            writeln!(f, "start   {u}")?;
        }
        for group in &self.roll {
            writeln!(f, "restart {}", group.join(" + "))?;
        }
        for u in &self.reset_failed {
            writeln!(f, "reset-failed {u}")?;
        }
        for u in &self.stop {
            writeln!(f, "stop    {u}")?;
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
mod tests {
    use super::*;

    fn tree(entries: &[(&str, Entry)]) -> UnitTree {
        UnitTree {
            entries: entries
                .iter()
                .map(|(p, e)| (PathBuf::from(p), e.clone()))
                .collect(),
        }
    }

    fn link(p: &str) -> Entry {
        Entry::Link(PathBuf::from(p))
    }

    fn desired_search(n: u32, template: &str) -> Desired {
        let mut entries = vec![
            (
                "cgipool.target".to_string(),
                Entry::File("# Generated by cgipool\n".into()),
            ),
            (
                "cgipool-search@.service".to_string(),
                Entry::File(template.to_string()),
            ),
            (
                "cgipool-search@.socket".to_string(),
                Entry::File("# Generated by cgipool\nsocket\n".into()),
            ),
            (
                "cgipool-search.target".to_string(),
                Entry::File("# Generated by cgipool\ntarget\n".into()),
            ),
        ];
        for i in 1..=n {
            entries.push((
                format!("cgipool-search.target.wants/cgipool-search@{i}.service"),
                link("/etc/systemd/system/cgipool-search@.service"),
            ));
            entries.push((
                format!("cgipool-search.target.wants/cgipool-search@{i}.socket"),
                link("/etc/systemd/system/cgipool-search@.socket"),
            ));
        }
        let refs: Vec<(&str, Entry)> = entries
            .iter()
            .map(|(p, e)| (p.as_str(), e.clone()))
            .collect();
        Desired {
            units: tree(&refs),
            instances: BTreeMap::from([("search".to_string(), (1..=n).collect())]),
            nginx: Some(("up".into(), "loc".into())),
        }
    }

    fn observed_from(d: &Desired) -> Observed {
        let mut active = BTreeMap::from([("cgipool.target".to_string(), "active".to_string())]);
        for (pool, ns) in &d.instances {
            active.insert(pool_target(pool), "active".into());
            for &n in ns {
                active.insert(socket(pool, n), "active".into());
                active.insert(service(pool, n), "active".into());
            }
        }
        Observed {
            files: d.units.entries.clone(),
            active,
            nginx: Some((Some("up".into()), Some("loc".into()))),
        }
    }

    #[test]
    fn converged_host_needs_nothing() {
        let d = desired_search(2, "# Generated by cgipool\nv1\n");
        let p = plan(&d, &observed_from(&d));
        assert!(p.is_empty(), "{p}");
        assert_eq!(p.to_string(), "no changes\n");
    }

    #[test]
    fn fresh_host_writes_reloads_and_starts_in_order() {
        let d = desired_search(2, "# Generated by cgipool\nv1\n");
        let p = plan(
            &d,
            &Observed {
                nginx: Some((None, None)),
                ..Observed::default()
            },
        );
        assert!(p.daemon_reload && p.nginx_write);
        assert_eq!(p.write.len(), d.units.entries.len());
        assert_eq!(
            p.start,
            vec![
                "cgipool.target",
                "cgipool-search.target",
                "cgipool-search@1.socket",
                "cgipool-search@1.service",
                "cgipool-search@2.socket",
                "cgipool-search@2.service"
            ]
        );
        assert!(p.stop.is_empty() && p.roll.is_empty());
    }

    #[test]
    fn scale_down_unlinks_and_stops_services_before_sockets() {
        let before = desired_search(4, "# Generated by cgipool\nv1\n");
        let after = desired_search(2, "# Generated by cgipool\nv1\n");
        let p = plan(&after, &observed_from(&before));
        assert!(p.daemon_reload);
        assert!(p.write.is_empty());
        assert_eq!(p.unlink.len(), 4);
        assert_eq!(
            p.stop,
            vec![
                "cgipool-search@3.service",
                "cgipool-search@4.service",
                "cgipool-search@3.socket",
                "cgipool-search@4.socket"
            ]
        );
        assert!(p.start.is_empty());
    }

    #[test]
    fn changed_template_rolls_running_workers_only() {
        let before = desired_search(2, "# Generated by cgipool\nv1\n");
        let after = desired_search(3, "# Generated by cgipool\nv2\n");
        let p = plan(&after, &observed_from(&before));
        assert_eq!(
            p.roll,
            vec![
                vec!["cgipool-search@1.service".to_string()],
                vec!["cgipool-search@2.service".to_string()]
            ]
        );
        assert_eq!(
            p.start,
            vec!["cgipool-search@3.socket", "cgipool-search@3.service"]
        );
    }

    #[test]
    fn removed_pool_stops_everything_and_removes_files_last() {
        let before = desired_search(2, "# Generated by cgipool\nv1\n");
        let after = Desired {
            units: tree(&[(
                "cgipool.target",
                Entry::File("# Generated by cgipool\n".into()),
            )]),
            instances: BTreeMap::new(),
            nginx: Some(("up".into(), "loc".into())),
        };
        let p = plan(&after, &observed_from(&before));
        assert_eq!(
            p.remove,
            vec![
                PathBuf::from("cgipool-search.target"),
                PathBuf::from("cgipool-search@.service"),
                PathBuf::from("cgipool-search@.socket")
            ]
        );
        assert_eq!(
            p.stop.last().map(String::as_str),
            Some("cgipool-search.target")
        );
        assert_eq!(p.stop.len(), 5);
    }

    #[test]
    fn restarting_worker_is_started_again_not_rolled() {
        let d = desired_search(2, "# Generated by cgipool\nv1\n");
        let mut o = observed_from(&d);
        o.active.insert(service("search", 2), "activating".into());
        let p = plan(&d, &o);
        assert_eq!(p.start, vec!["cgipool-search@2.service"]);
        assert!(!p.daemon_reload);
    }

    #[test]
    fn units_cgipool_did_not_make_are_never_stopped() {
        let d = desired_search(2, "# Generated by cgipool\nv1\n");
        let mut o = observed_from(&d);
        o.active
            .insert("cgipool-backup.service".into(), "active".into());
        o.active
            .insert("cgipool-other@1.service".into(), "active".into());
        o.active
            .insert("cgipool-other.target".into(), "active".into());
        let p = plan(&d, &o);
        assert!(p.is_empty(), "{p}");
    }

    #[test]
    fn watch_starts_last_restarts_on_change_and_stops_when_disabled() {
        let mut d = desired_search(2, "# Generated by cgipool\nv1\n");
        d.units.entries.insert(
            PathBuf::from(WATCH_UNIT),
            Entry::File("# Generated by cgipool\nw1\n".into()),
        );
        let mut o = observed_from(&d);
        o.active.remove(WATCH_UNIT);
        assert_eq!(plan(&d, &o).watch, Some(WatchAction::Start));
        o.active.insert(WATCH_UNIT.into(), "active".into());
        let p = plan(&d, &o);
        assert!(p.is_empty(), "{p:?}");
        let mut changed = d.clone();
        changed.units.entries.insert(
            PathBuf::from(WATCH_UNIT),
            Entry::File("# Generated by cgipool\nw2\n".into()),
        );
        assert_eq!(plan(&changed, &o).watch, Some(WatchAction::Restart));
        let disabled = desired_search(2, "# Generated by cgipool\nv1\n");
        let p = plan(&disabled, &o);
        assert_eq!(p.stop, vec![WATCH_UNIT.to_string()]);
        assert_eq!(p.remove, vec![PathBuf::from(WATCH_UNIT)]);
    }

    #[test]
    fn failed_workers_are_reset_before_they_are_started() {
        let d = desired_search(2, "# Generated by cgipool\nv1\n");
        let mut o = observed_from(&d);
        o.active.insert(service("search", 2), "failed".into());
        let p = plan(&d, &o);
        assert_eq!(p.start, vec!["cgipool-search@2.service"]);
        assert_eq!(p.reset_failed, vec!["cgipool-search@2.service"]);
        assert!(p
            .to_string()
            .contains("reset-failed cgipool-search@2.service"));
    }

    #[test]
    fn instances_are_read_from_the_pool_target_wants() {
        let d = desired_search(3, "x");
        let got = instances_on_disk(&d.units.entries);
        assert_eq!(got["search"], BTreeSet::from([1, 2, 3]));
        assert_eq!(
            parse_instance("cgipool-search@12.socket"),
            Some(("search", 12, "socket"))
        );
        assert_eq!(parse_instance("cgipool.target"), None);
    }
}
