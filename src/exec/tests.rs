//! The executor against the fake host: a clean run converges and the next
//! one has nothing to do; every call failing in turn, and the process dying
//! at every call, leave a host that the next run converges.
use super::fake::FakeHost;
use super::interrupt::Interrupt;
use super::*;
use crate::apply::desired;
use crate::config;
use std::collections::BTreeMap;
use std::path::Path;

const BEFORE: &str = r#"
[pool.search]
exec = "/usr/lib/cgipool/search"
route = "/api/search"
min = 2
max = 8

[pool.auth]
exec = "/usr/lib/cgipool/auth"
route = "/api/auth"
min = 2

[pool.old]
exec = "/usr/lib/cgipool/search"
route = "/api/old"
min = 1
"#;

/// Adds a pool, changes another (rolls it), scales one down, removes one.
const AFTER: &str = r#"
[pool.search]
exec = "/usr/lib/cgipool/search"
route = "/api/search"
min = 1
max = 8

[pool.auth]
exec = "/usr/lib/cgipool/auth"
route = "/api/auth"
min = 2
environment = { MODE = "strict" }

[pool.new]
exec = "/usr/lib/cgipool/search"
route = "/api/new"
min = 2
"#;

fn want(text: &str, counts: &[(&str, u32)]) -> Desired {
    let cfg = config::parse(Path::new("/etc/cgipool/cgipool.toml"), text).unwrap();
    let counts: BTreeMap<String, u32> = counts.iter().map(|(p, n)| (p.to_string(), *n)).collect();
    desired(&cfg, &counts, Path::new("/etc/systemd/system"))
}

fn before() -> Desired {
    want(BEFORE, &[("search", 4), ("auth", 2), ("old", 1)])
}

fn after() -> Desired {
    want(AFTER, &[("search", 1), ("auth", 2), ("new", 2)])
}

fn run(host: &mut FakeHost, d: &Desired) -> Result<Outcome> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(converge(host, d, &Interrupt::never()))
}

fn plan_of(host: &mut FakeHost, d: &Desired) -> Plan {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(plan_only(host, d))
        .unwrap()
}

/// A host converged to `d`, with nginx running.
fn host_at(d: &Desired) -> FakeHost {
    let mut h = FakeHost::default();
    let out = run(&mut h, d).unwrap();
    assert!(out.problems.is_empty(), "{:?}", out.problems);
    h.calls = 0;
    h.log.clear();
    h
}

/// Everything `d` wants is there: files, running units, nginx serving the
/// routes to every wanted worker, nothing of ours running that is not wanted.
fn assert_converged(h: &mut FakeHost, d: &Desired, context: &str) {
    assert_eq!(h.files, d.units.entries, "{context}: unit files");
    assert!(h.backup.is_none(), "{context}: an nginx backup is left");
    assert!(h.pending.is_empty(), "{context}: pending {:?}", h.pending);
    let expected = d.routes.as_ref().unwrap().render(&d.instances);
    assert_eq!(
        h.served.as_deref(),
        Some(expected.generation.as_str()),
        "{context}: served generation"
    );
    assert_eq!(
        h.nginx_disk.locations.as_deref(),
        Some(expected.locations.as_str()),
        "{context}: locations file"
    );
    let mut wanted: BTreeSet<String> = BTreeSet::from(["cgipool.target".to_string()]);
    if d.units.entries.contains_key(&PathBuf::from(WATCH_UNIT)) {
        wanted.insert(WATCH_UNIT.into());
    }
    for (pool, ns) in &d.instances {
        wanted.insert(plan::pool_target(pool));
        for &n in ns {
            wanted.insert(plan::socket(pool, n));
            wanted.insert(plan::service(pool, n));
        }
    }
    assert_eq!(h.active(), wanted, "{context}: active units");
    let p = plan_of(h, d);
    assert!(p.is_empty(), "{context}: the next run would still do:\n{p}");
}

#[test]
fn a_clean_run_converges_and_the_next_has_nothing_to_do() {
    let mut h = host_at(&before());
    assert_converged(&mut h, &before(), "before");
    let out = run(&mut h, &after()).unwrap();
    assert!(out.problems.is_empty(), "{:?}", out.problems);
    assert!(
        h.log.iter().any(|l| l == "1 jobs"),
        "no rolling restart in {:?}",
        h.log
    );
    assert_converged(&mut h, &after(), "after");
    // Order: check, units, starts, rolls, route, drain, stop, remove, watch.
    let pos = |what: &str| {
        h.log
            .iter()
            .position(|l| l.starts_with(what))
            .unwrap_or_else(|| panic!("no {what} in {:?}", h.log))
    };
    assert!(pos("nginx -t") < pos("write"));
    assert!(pos("daemon_reload") < pos("nginx reload"));
    assert!(pos("nginx reload") < pos("nginx drain"));
    assert!(pos("nginx drain") < pos("remove cgipool-old@.service"));
    assert!(h.pending.is_empty(), "{:?}", h.pending);
}

/// How many host calls a clean run from `before` to `after` makes.
fn calls_of_a_clean_run() -> usize {
    let mut h = host_at(&before());
    run(&mut h, &after()).unwrap();
    h.calls
}

#[test]
fn every_call_failing_in_turn_leaves_a_host_the_next_run_converges() {
    let n = calls_of_a_clean_run();
    assert!(n > 20, "only {n} calls");
    for k in 0..n {
        let mut h = host_at(&before());
        h.fail_at = Some(k);
        let first = run(&mut h, &after());
        // The failure is reported, or (a worker that did not start) listed.
        let reported = match &first {
            Err(e) => format!("{e:#}").contains("injected failure"),
            Ok(o) => o.problems.iter().any(|p| p.contains("injected failure")),
        };
        assert!(reported, "call {k}: the failure vanished: {first:?}");
        // nginx's files are the ones it serves, or the ones the next run
        // puts back (a check's backup is recovered first).
        h.fail_at = None;
        let second = run(&mut h, &after()).unwrap();
        assert!(
            second.problems.is_empty(),
            "call {k}: {:?}",
            second.problems
        );
        assert_converged(&mut h, &after(), &format!("failure at call {k}"));
    }
}

#[test]
fn dying_at_any_call_leaves_a_host_the_next_run_converges() {
    let n = calls_of_a_clean_run();
    for k in 0..=n {
        let mut h = host_at(&before());
        h.die_at = Some(h.calls + k);
        let _ = run(&mut h, &after());
        h.die_at = None;
        let second = run(&mut h, &after()).unwrap();
        assert!(
            second.problems.is_empty(),
            "death at {k}: {:?}",
            second.problems
        );
        assert_converged(&mut h, &after(), &format!("death at call {k}"));
    }
}

#[test]
fn nginx_rejecting_the_candidates_changes_no_unit() {
    let mut h = host_at(&before());
    let files_before = h.files.clone();
    let nginx_before = h.nginx_disk.clone();
    h.nginx_t_fails = true;
    let err = run(&mut h, &after()).unwrap_err();
    assert!(
        format!("{err:#}").contains("no unit was changed"),
        "{err:#}"
    );
    assert_eq!(h.files, files_before);
    assert_eq!(h.nginx_disk, nginx_before);
    assert!(h.backup.is_none());
}

#[test]
fn a_worker_that_does_not_start_is_reported_and_left_out_of_nginx() {
    let mut h = host_at(&before());
    h.broken.insert("cgipool-new@2.service".into());
    let out = run(&mut h, &after()).unwrap();
    assert!(
        out.problems
            .iter()
            .any(|p| p.contains("cgipool-new@2.service")),
        "{:?}",
        out.problems
    );
    let d = after();
    let mut routed = d.instances.clone();
    routed.get_mut("new").unwrap().remove(&2);
    let expected = d.routes.as_ref().unwrap().render(&routed);
    assert_eq!(h.served.as_deref(), Some(expected.generation.as_str()));
}

#[test]
fn an_interrupt_stops_between_steps_and_the_next_run_finishes() {
    let mut h = host_at(&before());
    let stop = Interrupt::never();
    stop.raise("SIGTERM");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let err = rt.block_on(converge(&mut h, &after(), &stop)).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("interrupted by SIGTERM while"), "{msg}");
    run(&mut h, &after()).unwrap();
    assert_converged(&mut h, &after(), "after an interrupt");
}

#[test]
fn nginx_files_written_but_not_served_are_reloaded_next_time() {
    let mut h = host_at(&before());
    let d = after();
    let expected = d.routes.as_ref().unwrap().render(&d.instances);
    // As if a run had written the files and died before the reload.
    run(&mut h, &d).unwrap();
    h.served = Some("0000".into());
    assert_eq!(
        h.nginx_disk.generation.as_deref(),
        Some(expected.generation.as_str())
    );
    let p = plan_of(&mut h, &d);
    let route = p.route.as_ref().expect("a route step");
    assert!(route.reload && !route.write, "{p}");
    run(&mut h, &d).unwrap();
    assert_converged(&mut h, &d, "reloaded");
}
