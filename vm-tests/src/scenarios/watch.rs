//! Issue 8 acceptance: `cgipool watch` scales a pool under a load step and
//! back, takes a worker that hit its start limit out of nginx, survives its
//! own kill -9 without touching a healthy pool, and serves /pool-status and
//! /metrics through nginx.
use super::common::{self, apply, assert_pool_running, install, write_config};
use crate::machine::Machine;
use crate::Scenario;
use anyhow::{bail, ensure, Context, Result};
use std::time::{Duration, Instant};

/// With the shared queue a probe goes through the pool's socket; the worker
/// whose answers fail (it names itself) is restarted by systemd, and nginx,
/// which routes to the pool's socket, is not touched.
fn shared_probe_restarts_the_worker_that_answers(m: &mut Machine) -> Result<()> {
    install(m)?;
    write_config(m, &PROBED_POOL.replace("queue = \"per-worker\"\n", ""))?;
    apply(m)?;
    wait_watch(m)?;
    ensure!(
        common::is_shared(m, "search")?,
        "search has no shared queue"
    );
    let before = m.unit_property("cgipool-search@2.service", "InvocationID")?;
    let nginx = common::nginx_workers(m)?;
    m.succeed("mkdir -p /run/cgipool-test && touch /run/cgipool-test/search@2")?;
    m.wait_until_succeeds(
        &format!("test \"$(systemctl show -P InvocationID cgipool-search@2.service)\" != {before}"),
        "systemd to restart the worker whose probes failed",
        Duration::from_secs(20),
    )?;
    let codes = m.succeed("for i in $(seq 20); do curl -s -o /dev/null -w '%{http_code}\\n' 'http://127.0.0.1/api/search?q=x'; done | sort | uniq -c")?;
    ensure!(codes.trim() == "20 200", "requests meanwhile: {codes}");
    let log = m.succeed("journalctl -b -o cat -u cgipool-watch.service | grep 'search@2'")?;
    ensure!(
        log.contains("through the pool socket failed (2/2): answered 503")
            && log.contains("restarting"),
        "watch's log:\n{log}"
    );
    let search1 = m.succeed("journalctl -b -o cat -u cgipool-watch.service | grep -c 'search@1.service failed its probe' || true")?;
    ensure!(search1.trim() == "0", "watch blamed the healthy search@1");
    ensure!(common::nginx_workers(m)? == nginx, "nginx was reloaded");
    m.succeed("rm /run/cgipool-test/search@2")?;
    assert_pool_running(m, "search", 2)?;
    Ok(())
}

pub fn scenarios() -> Vec<Scenario> {
    let s = Scenario::nspawn;
    vec![
        s("watch_autoscale_load_step", autoscale_load_step),
        s(
            "watch_failed_worker_leaves_upstream",
            failed_worker_leaves_upstream,
        ),
        s(
            "watch_kill_resumes_without_change",
            kill_resumes_without_change,
        ),
        s("watch_pool_status_and_metrics", pool_status_and_metrics),
        s(
            "watch_probe_restarts_unhealthy_worker",
            probe_restarts_unhealthy_worker,
        ),
        s(
            "watch_shared_probe_restarts_the_worker_that_answers",
            shared_probe_restarts_the_worker_that_answers,
        ),
    ]
}

const SLOW_POOL: &str = r#"[pool.search]
exec = "/usr/local/lib/cgipool/search"
route = "/api/search"
min = 2
max = 6
environment = { CGIPOOL_TEST_DELAY_MS = "20" }
scale_up_after = "2s"
scale_down_after = "5s"
"#;

fn active_workers(m: &mut Machine, pool: &str) -> Result<u32> {
    let out = m.succeed(&format!("systemctl list-units --no-legend --plain --state=active 'cgipool-{pool}@*.service' | wc -l"))?;
    out.trim().parse().context("counting active workers")
}

fn wait_watch(m: &mut Machine) -> Result<()> {
    m.wait_for_unit("cgipool-watch.service")?;
    m.wait_until_succeeds(
        "test -S /run/cgipool/watch.sock",
        "watch's status socket",
        Duration::from_secs(10),
    )?;
    Ok(())
}

fn autoscale_load_step(m: &mut Machine) -> Result<()> {
    install(m)?;
    write_config(m, SLOW_POOL)?;
    apply(m)?;
    assert_pool_running(m, "search", 2)?;
    wait_watch(m)?;
    let secs = 20;
    m.succeed(&format!(
        "systemd-run --quiet --collect --unit=vmtest-wrk -p StandardOutput=truncate:/tmp/wrk.out wrk -t2 -c32 -d{secs}s --timeout 10s --latency -H 'Connection: close' 'http://127.0.0.1:80/api/search?q=load'"
    ))?;
    let start = Instant::now();
    let mut timeline = Vec::new();
    let mut last = 0;
    let mut reached_max = None;
    let up_limit = m.scaled(Duration::from_secs(10));
    while start.elapsed() < Duration::from_secs(secs) {
        let n = active_workers(m, "search")?;
        if n != last {
            timeline.push(format!(
                "{:5.1}s {n} workers",
                start.elapsed().as_secs_f64()
            ));
            last = n;
        }
        if n == 6 && reached_max.is_none() {
            reached_max = Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let out = m.wait_until_succeeds(
        "grep -q 'requests in' /tmp/wrk.out && cat /tmp/wrk.out",
        "wrk to finish",
        Duration::from_secs(30),
    )?;
    let load_end = start.elapsed();
    let down_limit = Duration::from_secs(5) + m.scaled(Duration::from_secs(10));
    let mut back_at_min = None;
    while start.elapsed() < load_end + down_limit + Duration::from_secs(2) {
        let n = active_workers(m, "search")?;
        if n != last {
            timeline.push(format!(
                "{:5.1}s {n} workers",
                start.elapsed().as_secs_f64()
            ));
            last = n;
        }
        if n == 2 {
            back_at_min = Some(start.elapsed() - load_end);
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    println!(
        "autoscale timeline (load 0s..{:.1}s):\n  {}",
        load_end.as_secs_f64(),
        timeline.join("\n  ")
    );
    let tail: Vec<&str> = out
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("50%") || l.starts_with("99%"))
        .collect();
    println!("latency (wrk, 20 ms requests): {}", tail.join(", "));
    let report = super::edge::parse_wrk(&out)?;
    if report.non_2xx != 0 || report.socket_errors != 0 {
        bail!(
            "{} non-2xx and {} socket errors in {} requests during the load step:\n{}",
            report.non_2xx,
            report.socket_errors,
            report.requests,
            out
        );
    }
    let reached = reached_max.with_context(|| {
        format!("the pool never reached max=6 under load; timeline: {timeline:?}")
    })?;
    ensure!(
        reached <= up_limit,
        "the pool reached max after {:.1}s (limit {:.1}s)",
        reached.as_secs_f64(),
        up_limit.as_secs_f64()
    );
    let back = back_at_min.with_context(|| {
        format!(
            "the pool did not return to min within {:.0}s after the load; timeline: {timeline:?}",
            down_limit.as_secs_f64()
        )
    })?;
    println!(
        "reached max in {:.1}s; back at min {:.1}s after the load stopped; {} requests, 0 failed",
        reached.as_secs_f64(),
        back.as_secs_f64(),
        report.requests
    );
    let log = m.succeed("journalctl -b -o cat -u cgipool-watch.service | grep 'scale '")?;
    ensure!(
        log.contains("scale 2 -> 4") && log.contains("queues: search (shared, 2 workers) backlog="),
        "watch's decision log lacks the figures:\n{log}"
    );
    ensure!(
        log.contains("idle for"),
        "no scale-down decision logged:\n{log}"
    );
    let status = m.succeed("cgipool status search")?;
    ensure!(
        status.contains("watch scaled"),
        "cgipool status does not show watch's last decision:\n{status}"
    );
    Ok(())
}

/// The demo with search on a socket per worker (a single worker can leave
/// nginx only then).
fn per_worker_demo(m: &mut Machine) -> Result<()> {
    let demo = m.succeed(&format!("cat {}", common::CONFIG))?;
    write_config(
        m,
        &demo.replacen("max = 5\n", "max = 5\nqueue = \"per-worker\"\n", 1),
    )
}

fn failed_worker_leaves_upstream(m: &mut Machine) -> Result<()> {
    install(m)?;
    per_worker_demo(m)?;
    apply(m)?;
    wait_watch(m)?;
    m.succeed(
        "mkdir -p /etc/systemd/system/cgipool-search@2.service.d && printf '[Service]\\nExecStart=\\nExecStart=/bin/false\\n' > /etc/systemd/system/cgipool-search@2.service.d/fail.conf && systemctl daemon-reload && systemctl kill -s KILL cgipool-search@2.service",
    )?;
    m.wait_until_succeeds(
        "systemctl is-failed -q cgipool-search@2.service && journalctl -b -u cgipool-search@2.service | grep -q 'Start request repeated too quickly'",
        "search@2 to hit its start limit",
        Duration::from_secs(30),
    )?;
    let failed_at = Instant::now();
    m.wait_until_succeeds(
        "! grep -q 'search/2.sock' /etc/nginx/conf.d/cgipool-upstreams.conf && test \"$(curl -s http://127.0.0.1/.cgipool/generation)\" = \"$(grep -o 'return 200 \"[0-9a-f]*' /etc/nginx/snippets/cgipool-locations.conf | cut -d'\"' -f2)\"",
        "search@2 to leave the upstream nginx serves",
        Duration::from_secs(3),
    )?;
    println!(
        "failed worker left the upstream {:.1}s after it failed",
        failed_at.elapsed().as_secs_f64()
    );
    // watch's sandbox lets its nginx -t have a mount namespace of its own
    // (RestrictNamespaces=mnt): no candidate was written in place.
    let log = m.succeed("journalctl -b -o cat -u cgipool-watch.service")?;
    ensure!(
        log.contains("nginx: files written, nginx -t passed")
            && !log.contains("checking the candidate files in place"),
        "watch's nginx -t did not run in a view of its own:\n{log}"
    );
    let codes = m.succeed("for i in $(seq 40); do curl -s -o /dev/null -w '%{http_code}\\n' 'http://127.0.0.1/api/search?q=x'; done | sort | uniq -c")?;
    ensure!(
        codes.trim() == "40 200",
        "requests while search@2 is failed: {codes}"
    );
    let status = m.succeed("cgipool status --json")?;
    ensure!(
        status.contains("\"failed\""),
        "status does not show the failed worker:\n{status}"
    );
    m.wait_until_succeeds(
        "curl -s http://127.0.0.1/metrics | grep -q 'cgipool_workers{pool=\"search\",state=\"failed\"} 1'",
        "metrics to show the failed worker",
        Duration::from_secs(10),
    )?;
    m.succeed("rm -r /etc/systemd/system/cgipool-search@2.service.d && systemctl daemon-reload")?;
    apply(m)?;
    assert_pool_running(m, "search", 2)?;
    m.wait_until_succeeds(
        "grep -q 'search/2.sock' /etc/nginx/conf.d/cgipool-upstreams.conf",
        "search@2 to be back in the upstream",
        Duration::from_secs(10),
    )?;
    Ok(())
}

fn kill_resumes_without_change(m: &mut Machine) -> Result<()> {
    install(m)?;
    apply(m)?;
    wait_watch(m)?;
    // Let watch's first look settle, then kill it.
    m.wait_until_succeeds(
        "journalctl -b -o cat -u cgipool-watch.service | grep -q 'converging to intent'",
        "watch's first look",
        Duration::from_secs(10),
    )?;
    let nginx = common::nginx_workers(m)?;
    let jobs_units = m.succeed("find /etc/systemd/system -path '*cgipool*' | sort | sha256sum")?;
    let pid = m.main_pid("cgipool-watch.service")?;
    m.succeed(&format!("kill -9 {pid}"))?;
    m.wait_until_succeeds(
        &format!("test \"$(systemctl show -P MainPID cgipool-watch.service)\" != {pid} && systemctl is-active -q cgipool-watch.service"),
        "systemd to restart watch",
        Duration::from_secs(15),
    )?;
    ensure!(
        m.unit_property("cgipool-watch.service", "NRestarts")? == "1",
        "watch was not restarted by systemd"
    );
    m.wait_until_succeeds(
        "test $(journalctl -b -o cat -u cgipool-watch.service | grep -c 'watching 2 pools') -ge 2",
        "the restarted watch to report in",
        Duration::from_secs(10),
    )?;
    // Watch looks at the host a few more times: the chances of a wrong decision.
    common::wait_watch_steps(m, 4)?;
    assert_pool_running(m, "search", 2)?;
    assert_pool_running(m, "auth", 2)?;
    ensure!(
        nginx == common::nginx_workers(m)?,
        "nginx was reloaded after watch restarted"
    );
    ensure!(
        jobs_units == m.succeed("find /etc/systemd/system -path '*cgipool*' | sort | sha256sum")?,
        "unit files changed after watch restarted"
    );
    Ok(())
}

fn pool_status_and_metrics(m: &mut Machine) -> Result<()> {
    install(m)?;
    apply(m)?;
    wait_watch(m)?;
    m.wait_until_succeeds(
        "curl -sf http://127.0.0.1/pool-status | grep -q search@2",
        "/pool-status through nginx",
        Duration::from_secs(10),
    )?;
    m.succeed(
        r#"curl -sf http://127.0.0.1/pool-status | python3 -c '
import json, sys
s = json.load(sys.stdin)
pools = {p["pool"]: p for p in s["pools"]}
assert set(pools) == {"search", "auth"}, pools.keys()
for p in pools.values():
    assert p["wanted"] == 2 and p["healthy"] == 2, p
    for w in p["workers"]:
        assert w["active_state"] == "active" and "queue" not in w and "waiting" in w and "busy" in w, w
        assert w["n_restarts"] == 0 and w["main_pid"] > 0, w
print("pool-status ok")
'"#,
    )?;
    let out = m.succeed(
        r#"curl -sf http://127.0.0.1/metrics | python3 -c '
import sys
from prometheus_client.parser import text_string_to_metric_families
fams = {f.name: f for f in text_string_to_metric_families(sys.stdin.read())}
for name in ["cgipool_workers", "cgipool_worker_restarts", "cgipool_worker_memory_bytes", "cgipool_pool_queue_depth", "cgipool_scale_events"]:
    assert name in fams, (name, sorted(fams))
active = [s for s in fams["cgipool_workers"].samples if s.labels.get("state") == "active"]
assert sum(s.value for s in active) == 4, active
print("metrics ok:", len(fams), "families")
'"#,
    )?;
    ensure!(out.contains("metrics ok"), "{out}");
    // OpenMetrics when asked for it (as Prometheus asks), checked by the
    // client library's own OpenMetrics parser (it requires `# EOF`, HELP and
    // TYPE before the samples, and counters' samples named `_total`).
    let out = m.succeed(
        r#"curl -sf -D /tmp/om.head -H 'Accept: application/openmetrics-text; version=1.0.0' http://127.0.0.1/metrics | python3 -c '
import sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
fams = {f.name: f for f in text_string_to_metric_families(sys.stdin.read())}
assert fams["cgipool_worker_restarts"].type == "counter", fams["cgipool_worker_restarts"]
assert all(f.documentation for f in fams.values()), [f.name for f in fams.values() if not f.documentation]
print("openmetrics ok:", len(fams), "families")
' && grep -qi '^content-type: application/openmetrics-text' /tmp/om.head"#,
    )?;
    ensure!(out.contains("openmetrics ok"), "{out}");
    // `cgipool status --watch` shows the table again and again (piped: one
    // after another) until it is stopped.
    let out = m.execute(
        "timeout -s INT 3 cgipool status --watch --interval 0.5",
        m.scaled(Duration::from_secs(30)),
    )?;
    let tables = out.stdout.matches("pool search:").count();
    ensure!(
        tables >= 2,
        "status --watch showed {tables} tables in 3 s:\n{}{}",
        out.stdout,
        out.stderr
    );
    // A pool added by a later apply is watched without restarting watch.
    let demo = m.succeed(&format!("cat {}", super::common::CONFIG))?;
    write_config(m, &format!("{demo}\n[pool.extra]\nexec = \"/usr/local/lib/cgipool/search\"\nroute = \"/api/extra\"\nmin = 1\n"))?;
    apply(m)?;
    m.wait_until_succeeds(
        "curl -sf http://127.0.0.1/pool-status | grep -q extra@1",
        "watch to pick up a pool added by a later apply",
        Duration::from_secs(10),
    )?;
    let pid = m.unit_property("cgipool-watch.service", "NRestarts")?;
    ensure!(
        pid == "0",
        "watch was restarted to pick up the new pool (NRestarts {pid})"
    );
    Ok(())
}

const PROBED_POOL: &str = r#"[pool.search]
exec = "/usr/local/lib/cgipool/search"
route = "/api/search"
queue = "per-worker"
environment = { CGIPOOL_TEST_HEALTH_DIR = "/run/cgipool-test" }
health_path = "/healthz"
health_interval = "500ms"
health_timeout = "1s"
unhealthy_after = 2
"#;

/// A worker whose /healthz fails leaves nginx and is restarted by systemd
/// (a new InvocationID, no signal from watch); it comes back once healthy.
fn probe_restarts_unhealthy_worker(m: &mut Machine) -> Result<()> {
    install(m)?;
    write_config(m, PROBED_POOL)?;
    apply(m)?;
    wait_watch(m)?;
    let before = m.unit_property("cgipool-search@2.service", "InvocationID")?;
    // The C worker's test knob: /healthz answers 503 while this file exists.
    m.succeed("mkdir -p /run/cgipool-test && touch /run/cgipool-test/search@2")?;
    m.wait_until_succeeds(
        "! grep -q 'search/2.sock' /etc/nginx/conf.d/cgipool-upstreams.conf",
        "the unhealthy worker to leave the upstream",
        Duration::from_secs(10),
    )?;
    m.wait_until_succeeds(
        &format!("test \"$(systemctl show -P InvocationID cgipool-search@2.service)\" != {before}"),
        "systemd to restart the unhealthy worker",
        Duration::from_secs(10),
    )?;
    let codes = m.succeed("for i in $(seq 20); do curl -s -o /dev/null -w '%{http_code}\\n' 'http://127.0.0.1/api/search?q=x'; done | sort | uniq -c")?;
    ensure!(
        codes.trim() == "20 200",
        "requests while search@2 is unhealthy: {codes}"
    );
    let log = m.succeed("journalctl -b -o cat -u cgipool-watch.service | grep 'search@2'")?;
    ensure!(
        log.contains("probe /healthz failed (2/2): answered 503") && log.contains("restarting"),
        "watch's log:\n{log}"
    );
    m.succeed("rm /run/cgipool-test/search@2")?;
    m.wait_until_succeeds(
        "grep -q 'search/2.sock' /etc/nginx/conf.d/cgipool-upstreams.conf",
        "the worker to come back once its probe passes",
        Duration::from_secs(10),
    )?;
    assert_pool_running(m, "search", 2)?;
    Ok(())
}
