//! The watcher's own state across intents: what it keeps per worker, which
//! unhealthy workers it probes again, the guard on scaling decisions, and
//! starting with nothing applied, the bound on converging another host,
//! and how a lock that cannot be taken is told apart from one held.
use super::host_converge::{HOLD_BACKOFF, HOST_CONVERGE_TIMEOUT};
use super::hosts::Seen;
use super::intent::{restart_stale, stale};
use super::*;
use futures_util::future::{FutureExt, LocalBoxFuture};

fn watcher(dir: &Path) -> Watcher {
    let opts = Options {
        tick: Duration::from_millis(500),
        grace: Duration::from_secs(1),
    };
    let paths = Paths::under(&dir.join("run"), &dir.join("state"));
    Watcher::new(
        opts,
        paths,
        no_config(),
        Arc::new(tokio::sync::Notify::new()),
    )
}

fn intent(serial: u64, text: &str, count: u32) -> Intent {
    Intent {
        serial,
        config_path: "/etc/cgipool/cgipool.toml".into(),
        config_text: text.into(),
        counts: BTreeMap::from([("a".to_string(), count)]),
        unit_dir: "/etc/systemd/system".into(),
        written_by: "apply".into(),
        at_unix: 0,
    }
}

const PROBED: &str = "[pool.a]\nexec = \"/bin/a\"\nroute = \"/a\"\nmin = 2\nmax = 4\n\
                      queue = \"per-worker\"\nhealth_path = \"/healthz\"\n";
const PLAIN: &str = "[pool.a]\nexec = \"/bin/a\"\nroute = \"/a\"\nmin = 2\nmax = 4\n";

#[test]
fn watch_starts_with_nothing_applied() {
    let c = no_config();
    assert!(c.pools.is_empty() && c.hosts.is_empty());
}

#[test]
fn a_worker_is_unhealthy_only_while_its_pool_probes_and_wants_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = watcher(dir.path());
    w.set_intent(intent(1, PROBED, 3));
    for n in [2, 3] {
        w.unhealthy.insert(plan::service("a", n));
        w.probes
            .insert(plan::service("a", n), ProbeState::default());
        w.down_since.insert(plan::service("a", n), Instant::now());
    }
    // A scale to 2 takes a@3 away: nothing of it stays.
    w.set_intent(intent(2, PROBED, 2));
    assert_eq!(w.unhealthy_of("a"), BTreeSet::from([2]));
    assert!(!w.probes.contains_key(&plan::service("a", 3)));
    assert!(!w.down_since.contains_key(&plan::service("a", 3)));
    // The pool stops probing: a@2 comes back into nginx.
    w.set_intent(intent(3, PLAIN, 2));
    assert!(w.unhealthy_of("a").is_empty(), "{:?}", w.unhealthy);
    assert!(w.probes.is_empty());
    assert!(w.down_since.contains_key(&plan::service("a", 2)));
}

#[test]
fn a_restart_decided_on_an_older_intent_holds_only_for_a_worker_still_run_and_probed() {
    let a2 = plan::service("a", 2);
    assert_eq!(restart_stale(&intent(1, PROBED, 2), &a2), None);
    // `cgipool scale a 1` recorded meanwhile: restarting a@2 would start
    // it again beyond the count.
    assert_eq!(
        restart_stale(&intent(2, PROBED, 1), &a2).as_deref(),
        Some("the intent counts 1 for pool a here now")
    );
    // `cgipool apply` dropped the pool's health_path meanwhile.
    assert_eq!(
        restart_stale(&intent(2, PLAIN, 2), &a2).as_deref(),
        Some("pool a no longer probes")
    );
    assert!(restart_stale(&intent(2, PROBED, 2), &plan::service("b", 1)).is_some());
}

fn unit_in(pool: &str, n: u32, active_state: &str) -> (String, UnitState) {
    let name = plan::service(pool, n);
    let state = UnitState {
        name: name.clone(),
        load_state: "loaded".into(),
        active_state: active_state.into(),
        sub_state: String::new(),
        path: String::new(),
    };
    (name, state)
}

#[test]
fn an_unhealthy_worker_is_probed_again_only_while_systemd_has_it_active() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = watcher(dir.path());
    w.set_intent(intent(1, PROBED, 4));
    for n in 1..=4 {
        w.unhealthy.insert(plan::service("a", n));
    }
    // a@1 runs again after its restart; a@2 is still starting (a slow
    // start is no failure); a@3 failed (watch does not revive it); a@4 is
    // not in systemd's list at all.
    w.states = BTreeMap::from([
        unit_in("a", 1, "active"),
        unit_in("a", 2, "activating"),
        unit_in("a", 3, "failed"),
    ]);
    assert_eq!(w.unhealthy_to_probe_again("a"), BTreeSet::from([1]));
    // Once systemd has a@2 running, it is probed again.
    w.states.extend([unit_in("a", 2, "active")]);
    assert_eq!(w.unhealthy_to_probe_again("a"), BTreeSet::from([1, 2]));
    assert!(w.unhealthy_to_probe_again("b").is_empty());
}

#[test]
fn a_scaling_decision_holds_only_within_the_applied_limits() {
    let wide = "[pool.a]\nexec = \"/bin/a\"\nroute = \"/a\"\nmin = 2\nmax = 8\n";
    let narrow = "[pool.a]\nexec = \"/bin/a\"\nroute = \"/a\"\nmin = 2\nmax = 4\n";
    let up = scaler::Decision {
        from: 4,
        to: 8,
        reason: "saturated".into(),
    };
    assert_eq!(stale(&intent(1, wide, 4), "a", &up), None);
    // `cgipool apply` narrowed max to 4 meanwhile, keeping the count.
    assert_eq!(
        stale(&intent(2, narrow, 4), "a", &up).as_deref(),
        Some("the applied config's [min, max] is [2, 4] now")
    );
    // Someone else changed the count.
    assert_eq!(
        stale(&intent(2, wide, 5), "a", &up).as_deref(),
        Some("the intent says 5 now")
    );
    assert!(stale(&intent(2, wide, 4), "b", &up).is_some());
}

const HOSTED: &str = "[nginx]\nfront_address = \"10.0.0.10\"\n\
    [host.web1]\naddress = \"root@10.0.0.11\"\n[host.web2]\naddress = \"root@10.0.0.12\"\n\
    [pool.a]\nexec = \"/bin/a\"\nroute = \"/a\"\nmin = 2\nmax = 4\n\
    hosts = [\"local\", \"web1\", \"web2\"]\nport = 9001\n";

/// A converge of another host where web1's systemd hangs behind a live
/// sshd (it never answers) and web2 converges at once.
fn web1_hangs<'a>(
    _: &'a Config,
    name: &'a str,
    _: &'a config::Host,
    _: &'a Intent,
) -> LocalBoxFuture<'a, Result<()>> {
    let hangs = name == "web1";
    async move {
        if hangs {
            std::future::pending::<()>().await;
        }
        Ok(())
    }
    .boxed_local()
}

/// A watcher of HOSTED at intent 1, to which web1 and web2 both answer.
fn watching_two_hosts(dir: &Path) -> (Watcher, Intent) {
    let mut w = watcher(dir);
    let intent = intent(1, HOSTED, 2);
    w.set_intent(intent.clone());
    for (name, address) in [("web1", "root@10.0.0.11"), ("web2", "root@10.0.0.12")] {
        let pools = Seen::Up(BTreeSet::from(["a".to_string()]));
        w.hosts.saw(name, &address.parse().unwrap(), pools);
    }
    (w, intent)
}

#[tokio::test(start_paused = true)]
async fn a_host_whose_converge_hangs_is_given_up_after_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, intent) = watching_two_hosts(dir.path());
    // web1 is back from being lost: out of nginx until it converged.
    w.host_returning.insert("web1".to_string());
    let started = tokio::time::Instant::now();
    let out = tokio::time::timeout(
        HOST_CONVERGE_TIMEOUT * 10,
        w.converge_hosts_with(&intent, web1_hangs),
    )
    .await
    .expect("converging the hosts ends although web1 hangs");
    let took = started.elapsed();
    assert!(
        took >= HOST_CONVERGE_TIMEOUT && took < HOST_CONVERGE_TIMEOUT + Duration::from_secs(1),
        "took {took:?}"
    );
    // web1 failed: tried again after a backoff, still out of nginx; the
    // host after it was converged all the same.
    assert_eq!(
        w.host_retry.get("web1").map(|(_, failures)| *failures),
        Some(1)
    );
    // Not after the usual 2 s: the hang held watch for the bound, so the
    // next try waits 4 times that.
    let retry_in = w.host_retry["web1"].0 - std::time::Instant::now();
    assert!(
        retry_in > HOST_CONVERGE_TIMEOUT * (HOLD_BACKOFF - 1),
        "web1 is tried again in {retry_in:?}"
    );
    assert!(!w.host_serials.contains_key("web1"));
    assert_eq!(w.host_serials.get("web2"), Some(&1));
    assert!(!w.host_retry.contains_key("web2"));
    assert_eq!(
        out,
        BTreeMap::from([("a".to_string(), BTreeSet::from(["web1".to_string()]))])
    );
}

/// A converge where every host's systemd hangs behind a live sshd.
fn every_host_hangs<'a>(
    _: &'a Config,
    _: &'a str,
    _: &'a config::Host,
    _: &'a Intent,
) -> LocalBoxFuture<'a, Result<()>> {
    std::future::pending().boxed_local()
}

#[tokio::test(start_paused = true)]
async fn hosts_that_hang_hold_watch_as_long_as_one() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, intent) = watching_two_hosts(dir.path());
    let started = tokio::time::Instant::now();
    w.converge_hosts_with(&intent, every_host_hangs).await;
    let took = started.elapsed();
    // Converged side by side: one bound, not one per host.
    assert!(
        took >= HOST_CONVERGE_TIMEOUT && took < HOST_CONVERGE_TIMEOUT + Duration::from_secs(1),
        "took {took:?}"
    );
    for name in ["web1", "web2"] {
        assert_eq!(w.host_retry.get(name).map(|(_, n)| *n), Some(1), "{name}");
    }
}

#[test]
fn the_lock_held_elsewhere_is_quiet_and_any_other_failure_is_logged_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = watcher(dir.path());
    let held = state::lock(&w.paths, Duration::ZERO).unwrap();
    assert!(w.try_lock().is_none(), "taken while another holds it");
    assert_eq!(w.lock_error, None, "a held lock is no failure");
    drop(held);
    assert!(w.try_lock().is_some());
    // The run directory is a file: the lock cannot be made at all.
    let run = dir.path().join("run");
    std::fs::remove_dir_all(&run).unwrap();
    std::fs::write(&run, "").unwrap();
    assert!(w.try_lock().is_none());
    let why = w.lock_error.clone().expect("the failure is remembered");
    assert!(why.contains(&run.display().to_string()), "{why}");
    std::fs::remove_file(&run).unwrap();
    assert!(w.try_lock().is_some());
    assert_eq!(w.lock_error, None, "cleared once the lock is taken");
}
