//! The executor against the fake host: a clean run converges and the next
//! one has nothing to do; every call failing in turn, and the process dying
//! at every call, leave a host that the next run converges. The run between
//! `BEFORE` and `AFTER` covers both queue modes and a switch between them:
//! every worker must end up holding exactly its wanted socket.
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
queue = "per-worker"
min = 2

[pool.old]
exec = "/usr/lib/cgipool/search"
route = "/api/old"
queue = "per-worker"
min = 1
"#;

/// Adds a pool, moves another to the shared queue (with a change of its
/// environment), scales a shared one down, removes a per-worker one.
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
        let shared = d.shared.contains(pool);
        if shared {
            wanted.insert(plan::pool_socket(pool));
        }
        for &n in ns {
            let socket = if shared {
                plan::pool_socket(pool)
            } else {
                plan::socket(pool, n)
            };
            wanted.insert(socket.clone());
            wanted.insert(plan::service(pool, n));
            assert_eq!(
                h.holds.get(&plan::service(pool, n)),
                Some(&BTreeSet::from([socket])),
                "{context}: the sockets {pool}@{n} holds"
            );
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
        "no move (a restart at a time) in {:?}",
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

const SHARED: &str = r#"
[pool.search]
exec = "/usr/lib/cgipool/search"
route = "/api/search"
min = 2
max = 8
"#;

fn shared_at(n: u32) -> Desired {
    want(SHARED, &[("search", n)])
}

fn per_worker_at(n: u32) -> Desired {
    want(
        &SHARED.replace("max = 8", "max = 8\nqueue = \"per-worker\""),
        &[("search", n)],
    )
}

#[test]
fn shared_queue_converges_with_one_socket_and_the_next_run_has_nothing_to_do() {
    let mut h = FakeHost::default();
    run(&mut h, &shared_at(3)).unwrap();
    assert_converged(&mut h, &shared_at(3), "shared");
    assert!(h.active().contains("cgipool-search.socket"));
    assert!(!h
        .active()
        .iter()
        .any(|u| u.starts_with("cgipool-search@") && u.ends_with(".socket")));
    let upstreams = h.nginx_disk.upstreams.clone().unwrap_or_default();
    assert!(
        upstreams.contains("server unix:/run/cgipool/search/pool.sock"),
        "{upstreams}"
    );
    assert!(!upstreams.contains("/1.sock"), "{upstreams}");
}

#[test]
fn scaling_and_rolling_a_shared_queue_never_reload_nginx() {
    let mut h = host_at(&shared_at(2));
    for (n, what) in [(5, "up"), (2, "down"), (8, "up"), (2, "down")] {
        let p = plan_of(&mut h, &shared_at(n));
        assert!(!p.nginx_check, "scale {what} to {n}: {p}");
        if let Some(r) = &p.route {
            assert!(!r.write && !r.reload, "scale {what} to {n}: {p}");
        }
        h.log.clear();
        run(&mut h, &shared_at(n)).unwrap();
        assert!(
            !h.log
                .iter()
                .any(|l| l.starts_with("nginx reload") || l.starts_with("nginx write")),
            "scale {what} to {n} touched nginx: {:?}",
            h.log
        );
        assert_converged(&mut h, &shared_at(n), &format!("scaled {what} to {n}"));
    }
    // A rolling restart (the environment changes): one worker at a time,
    // the socket is never restarted, nginx is not touched.
    let changed = want(
        &SHARED.replace("max = 8", "max = 8\nenvironment = { MODE = \"b\" }"),
        &[("search", 2)],
    );
    let p = plan_of(&mut h, &changed);
    assert_eq!(
        p.roll,
        vec![
            vec!["cgipool-search@1.service".to_string()],
            vec!["cgipool-search@2.service".to_string()]
        ],
        "{p}"
    );
    assert!(
        p.route.is_none() && p.stop.is_empty() && p.moves.is_empty(),
        "{p}"
    );
    h.log.clear();
    run(&mut h, &changed).unwrap();
    assert!(
        !h.log.iter().any(|l| l.starts_with("nginx reload")),
        "{:?}",
        h.log
    );
    assert_converged(&mut h, &changed, "rolled");
}

#[test]
fn switching_queues_routes_first_then_moves_each_worker() {
    for (from, to, what) in [
        (per_worker_at(3), shared_at(3), "per-worker to shared"),
        (
            per_worker_at(2),
            shared_at(4),
            "per-worker to shared, growing",
        ),
    ] {
        let mut h = host_at(&from);
        let p = plan_of(&mut h, &to);
        assert!(p.roll.is_empty(), "{what}: {p}");
        assert!(!p.moves.is_empty(), "{what}: {p}");
        run(&mut h, &to).unwrap();
        // The new socket starts before nginx routes to it; nginx reloads and
        // drains before the old sockets stop; the workers move after that,
        // one job at a time.
        let pos = |pred: &dyn Fn(&str) -> bool, name: &str| {
            h.log
                .iter()
                .position(|l| pred(l))
                .unwrap_or_else(|| panic!("{what}: no {name} in {:?}", h.log))
        };
        let reload = pos(&|l| l == "nginx reload", "reload");
        let drain = pos(&|l| l == "nginx drain", "drain");
        let last_job = h.log.iter().rposition(|l| l == "1 jobs").unwrap();
        assert!(reload < drain && drain < last_job, "{what}: {:?}", h.log);
        assert_converged(&mut h, &to, what);
    }
}

#[test]
fn a_switch_cut_short_after_the_units_were_written_still_moves_the_workers() {
    let mut h = host_at(&per_worker_at(3));
    let to = shared_at(3);
    // Die right after the first daemon-reload: the files no longer show the move.
    let n = {
        let mut probe = host_at(&per_worker_at(3));
        run(&mut probe, &to).unwrap();
        probe.log.iter().position(|l| l == "daemon_reload").unwrap()
    };
    h.die_at = Some(n + 1);
    let _ = run(&mut h, &to);
    h.die_at = None;
    assert_eq!(h.pending.moves.len(), 3, "{:?}", h.pending);
    run(&mut h, &to).unwrap();
    assert_converged(&mut h, &to, "after the cut");
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
    // apply records the previous intent again on this error only.
    assert!(err.downcast_ref::<NginxRejected>().is_some(), "{err:#}");
}

#[test]
fn a_check_that_fails_without_nginx_rejecting_is_no_rejection() {
    // The check's own steps failing (nginx could not be run, a file could
    // not be written) says nothing about the files: not NginxRejected, so
    // apply keeps the intent and the next run tries again.
    let clean = {
        let mut h = host_at(&before());
        run(&mut h, &after()).unwrap();
        h.log
    };
    let at = clean
        .iter()
        .position(|c| c == "nginx -t")
        .expect("a clean run checks nginx");
    let mut h = host_at(&before());
    h.fail_at = Some(h.calls + at);
    let err = run(&mut h, &after()).unwrap_err();
    assert!(format!("{err:#}").contains("injected failure"), "{err:#}");
    assert!(err.downcast_ref::<NginxRejected>().is_none(), "{err:#}");
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

/// The way back is not supported on a running pool (README "Queues"):
/// systemd refuses to start a worker's own socket while the worker runs. The
/// apply says so instead of reporting success.
#[test]
fn switching_a_running_pool_back_to_per_worker_is_reported() {
    let mut h = host_at(&shared_at(2));
    let out = run(&mut h, &per_worker_at(2));
    let said = match &out {
        Err(e) => format!("{e:#}"),
        Ok(o) => o.problems.join("; "),
    };
    assert!(said.contains("cgipool-search@1.socket"), "{said}");
}

#[test]
fn a_scale_down_reloads_systemd_after_the_stops_and_any_cut_converges() {
    let (from, to) = (per_worker_at(4), per_worker_at(2));
    let mut probe = host_at(&from);
    run(&mut probe, &to).unwrap();
    let reload = probe.log.iter().position(|l| l == "daemon_reload");
    let last_job = probe.log.iter().rposition(|l| l.ends_with(" jobs"));
    assert!(
        matches!((last_job, reload), (Some(j), Some(r)) if j < r),
        "links alone: the daemon-reload comes after the stops: {:?}",
        probe.log
    );
    assert_converged(&mut probe, &to, "clean scale-down");
    let n = probe.calls;
    for k in 0..=n {
        let mut h = host_at(&from);
        h.die_at = Some(h.calls + k);
        let _ = run(&mut h, &to);
        h.die_at = None;
        run(&mut h, &to).unwrap();
        assert_converged(&mut h, &to, &format!("death at call {k}"));
    }
    for k in 0..n {
        let mut h = host_at(&from);
        h.fail_at = Some(k);
        let _ = run(&mut h, &to);
        h.fail_at = None;
        run(&mut h, &to).unwrap();
        assert_converged(&mut h, &to, &format!("failure at call {k}"));
    }
}
