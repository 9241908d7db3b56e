//! Issue 18 acceptance: the operator's figures in /pool-status and
//! /metrics, each checked against a source of its own — systemd's unit
//! properties, the kernel's socket queue (`ss -x`), nginx's access log —
//! under a load step and after it; a slow request logged once by watch; and
//! both endpoints answering while every worker of every pool is busy.
use super::common::{apply, install, write_config};
use crate::machine::Machine;
use crate::Scenario;
use anyhow::{ensure, Context, Result};
use std::time::{Duration, Instant};

pub fn scenarios() -> Vec<Scenario> {
    vec![Scenario::nspawn("watch_status_figures", status_figures)]
}

/// Two pools of two workers each, pinned (min = max, so a load saturates
/// them): the C search worker, 300 ms a request, and a CGI pool whose
/// program sleeps as long as it is told, with `slow_request`.
const CONFIG: &str = r#"[pool.search]
exec = "/usr/local/lib/cgipool/search"
route = "/api/search"
min = 2
max = 2
environment = { CGIPOOL_TEST_DELAY_MS = "300" }

[pool.sleepy]
protocol = "cgi"
exec = "/usr/local/lib/cgipool/sleep.cgi"
route = "/sleep"
min = 2
max = 2
request_timeout = "60s"
slow_request = "1s"
"#;

const SLEEP_CGI: &str = r#"#!/bin/sh
# sleeps ?s=N seconds (a whole number), then answers
s=${QUERY_STRING#s=}
case "$s" in ''|*[!0-9]*) s=0 ;; esac
sleep "$s"
printf 'Content-Type: text/plain\n\nslept %s\n' "$s"
"#;

/// A guest helper: one pool's figures from /pool-status (through nginx)
/// next to the kernel's queue for its socket (`ss -xl`: Recv-Q is the
/// accept queue, Send-Q the backlog), as one JSON line.
const SAMPLE_PY: &str = r#"import json, subprocess, sys, urllib.request
pool = sys.argv[1]
s = json.load(urllib.request.urlopen("http://127.0.0.1/pool-status", timeout=10))
p = [p for p in s["pools"] if p["pool"] == pool][0]
sock = "/run/cgipool/%s/pool.sock" % pool
ss = subprocess.run(["ss", "-xlnH"], capture_output=True, text=True, check=True).stdout
rows = [l.split() for l in ss.splitlines() if sock in l.split()]
at = rows[0].index(sock) if rows else None
p["ss_queue"], p["ss_backlog"] = (int(rows[0][at - 2]), int(rows[0][at - 1])) if rows else (None, None)
print(json.dumps(p))
"#;

fn sample(m: &mut Machine, pool: &str) -> Result<serde_json::Value> {
    let out = m.succeed(&format!("python3 /tmp/sample.py {pool}"))?;
    serde_json::from_str(&out).with_context(|| format!("sample of {pool}: {out}"))
}

fn num(v: &serde_json::Value, key: &str) -> Result<u64> {
    v[key]
        .as_u64()
        .with_context(|| format!("{key} is not a number in {v}"))
}

fn status_figures(m: &mut Machine) -> Result<()> {
    install(m)?;
    m.write_text("/usr/local/lib/cgipool/sleep.cgi", SLEEP_CGI)?;
    m.succeed("chmod 0755 /usr/local/lib/cgipool/sleep.cgi")?;
    m.write_text("/tmp/sample.py", SAMPLE_PY)?;
    write_config(m, CONFIG)?;
    apply(m)?;
    m.wait_for_unit("cgipool-watch.service")?;
    // Watch reads the units every 2 s: wait until it has seen every
    // worker active and reporting.
    m.wait_until_succeeds(
        "curl -sf http://127.0.0.1/pool-status | python3 -c 'import json,sys; s=json.load(sys.stdin); sys.exit(not all(w[\"since_unix\"] and w[\"requests_total\"] == 0 for p in s[\"pools\"] for w in p[\"workers\"]))'",
        "every worker's first report in /pool-status",
        Duration::from_secs(15),
    )?;

    // At rest, every figure against systemd and the kernel.
    let started = m.succeed("date +%s")?.trim().parse::<u64>()?;
    for pool in ["search", "sleepy"] {
        let p = sample(m, pool)?;
        ensure!(
            num(&p, "min")? == 2 && num(&p, "max")? == 2,
            "{pool}: min/max {p}"
        );
        ensure!(
            num(&p, "total")? == 2 && num(&p, "idle")? == 2 && num(&p, "busy")? == 0,
            "{pool}: at rest {p}"
        );
        ensure!(num(&p, "started_at_unix")? <= started, "{pool}: {p}");
        let backlog = m.unit_property(&format!("cgipool-{pool}.socket"), "Backlog")?;
        let somaxconn = m.succeed("cat /proc/sys/net/core/somaxconn")?;
        let want = backlog
            .trim()
            .parse::<u64>()?
            .min(somaxconn.trim().parse()?);
        ensure!(
            num(&p, "backlog")? == want && p["ss_backlog"] == want,
            "{pool}: backlog {} (Backlog={backlog}, somaxconn {somaxconn}, ss -xl {})",
            p["backlog"],
            p["ss_backlog"]
        );
        let mut restarts = 0;
        for w in p["workers"].as_array().context("workers")? {
            let unit = w["unit"].as_str().context("unit")?.to_string();
            restarts += m.unit_property(&unit, "NRestarts")?.trim().parse::<u64>()?;
            let since = m.succeed(&format!(
                "systemctl show -P ActiveEnterTimestamp --timestamp=unix {unit}"
            ))?;
            let since = since.trim().trim_start_matches('@').parse::<u64>()?;
            ensure!(
                w["since_unix"] == since,
                "{unit}: since_unix {} but ActiveEnterTimestamp @{since}",
                w["since_unix"]
            );
            ensure!(w["current"].is_null(), "{unit} idle but {w}");
        }
        ensure!(num(&p, "restarts_total")? == restarts, "{pool}: {p}");
    }

    // A load step on search: 16 connections for 300 ms requests on 2 workers.
    let nginx_before = m
        .succeed("grep -c 'GET /api/search' /var/log/nginx/access.log || true")?
        .trim()
        .parse::<u64>()?;
    let accepted_before = num(&sample(m, "search")?, "accepted_total")?;
    // What the state reports cost: PID 1's and watch's CPU over the load.
    let cpu = "echo $(awk '{print $14+$15}' /proc/1/stat) $(awk '{print $14+$15}' /proc/$(systemctl show -P MainPID cgipool-watch.service)/stat) $(getconf CLK_TCK)";
    let cpu_before = m.succeed(cpu)?;
    m.succeed(
        "systemd-run --quiet --collect --unit=vmtest-wrk -p StandardOutput=truncate:/tmp/wrk.out wrk -t2 -c16 -d8s --timeout 20s -H 'Connection: close' 'http://127.0.0.1:80/api/search?q=load'",
    )?;
    let start = Instant::now();
    let (mut queues, mut kernel_queue_seen, mut saturated_seen) = (Vec::new(), false, false);
    while start.elapsed() < Duration::from_secs(7) {
        let p = sample(m, "search")?;
        let q = num(&p, "queue_depth")?;
        queues.push(q);
        ensure!(
            num(&p, "max_queue_depth")? >= queues.iter().copied().max().unwrap_or(0),
            "max_queue_depth below a queue seen: {p} after {queues:?}"
        );
        kernel_queue_seen |= p["ss_queue"].as_u64().unwrap_or(0) > 0 && q > 0;
        saturated_seen |= q > 0
            && num(&p, "busy")? == 2
            && num(&p, "total")? == 2
            && num(&p, "saturated_total")? >= 1;
        std::thread::sleep(Duration::from_millis(250));
    }
    ensure!(
        saturated_seen,
        "never saw queue > 0 with busy = total and a saturation counted; queues {queues:?}"
    );
    ensure!(
        kernel_queue_seen,
        "ss -x never showed the queue /pool-status showed; queues {queues:?}"
    );
    m.wait_until_succeeds(
        "systemctl is-active --quiet vmtest-wrk.service; test $? -ne 0 && grep -q 'requests in' /tmp/wrk.out",
        "wrk to finish",
        Duration::from_secs(30),
    )?;
    let cpu_after = m.succeed(cpu)?;
    m.succeed(&format!(
        "echo 'CPU ticks (PID 1, watch, CLK_TCK) before the load: {} after: {}'",
        cpu_before.trim(),
        cpu_after.trim()
    ))?;
    m.wait_until_succeeds(
        "python3 /tmp/sample.py search | python3 -c 'import json,sys; p=json.load(sys.stdin); sys.exit(not (p[\"idle\"] == p[\"total\"] == 2 and p[\"queue_depth\"] == 0))'",
        "search to be idle after the load",
        Duration::from_secs(20),
    )?;
    let p = sample(m, "search")?;
    ensure!(
        num(&p, "saturated_total")? >= 1 && num(&p, "max_busy")? == 2,
        "after the load: {p}"
    );
    ensure!(
        num(&p, "max_queue_depth")? >= queues.iter().copied().max().unwrap_or(0),
        "{p}"
    );
    // Requests the workers reported against nginx's log: every request
    // nginx passed on was served; ones a client gave up on (499) may or may
    // not have reached a worker.
    let log = m.succeed(
        "grep 'GET /api/search' /var/log/nginx/access.log | awk '{print $9}' | sort | uniq -c",
    )?;
    let (mut ok, mut all) = (0u64, 0u64);
    for line in log.lines() {
        let mut words = line.split_whitespace();
        let n: u64 = words.next().context("count")?.parse()?;
        all += n;
        if words.next() != Some("499") {
            ok += n;
        }
    }
    let (ok, all) = (ok - nginx_before, all - nginx_before);
    // The workers' last count arrives within their report interval (1 s)
    // and watch's read of the units (2 s).
    let deadline = Instant::now() + m.scaled(Duration::from_secs(10));
    let p = loop {
        let p = sample(m, "search")?;
        let accepted = num(&p, "accepted_total")? - accepted_before;
        if ok <= accepted && accepted <= all && ok > 0 {
            break p;
        }
        ensure!(
            Instant::now() < deadline,
            "search served {accepted} requests by its reports; nginx logged {all} ({ok} not 499):\n{log}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let served: u64 = p["workers"]
        .as_array()
        .context("workers")?
        .iter()
        .filter_map(|w| w["requests_total"].as_u64())
        .sum();
    ensure!(
        served == num(&p, "accepted_total")?,
        "workers' requests_total {served} vs {p}"
    );

    // A slow request: in watch's journal once, with its request id (nginx's
    // $request_id, which the worker reports), and in the counter; while it
    // runs, it is the worker's `current`.
    m.succeed("systemd-run --quiet --collect --unit=vmtest-slow curl -s -D /tmp/slow.head -o /tmp/slow.out 'http://127.0.0.1/sleep?s=3'")?;
    m.wait_until_succeeds(
        "curl -s http://127.0.0.1/pool-status | grep -q '\"uri\": \"/sleep?s=3\"'",
        "the slow request as a worker's current request",
        Duration::from_secs(10),
    )?;
    let p = sample(m, "sleepy")?;
    let current = p["workers"]
        .as_array()
        .context("workers")?
        .iter()
        .find_map(|w| w["current"].as_object().cloned())
        .with_context(|| format!("no current request in {p}"))?;
    ensure!(
        current["method"] == "GET" && current["uri"] == "/sleep?s=3",
        "current: {current:?}"
    );
    let id = current["request_id"]
        .as_str()
        .filter(|id| id.len() >= 16 && id.bytes().all(|b| b.is_ascii_hexdigit()))
        .with_context(|| format!("no request id of nginx's in {current:?}"))?
        .to_string();
    m.wait_until_succeeds(
        &format!("journalctl -o cat -u cgipool-watch.service | grep -q 'slow request: id={id} route=/sleep worker=sleepy@'"),
        "watch to log the slow request",
        Duration::from_secs(15),
    )?;
    m.wait_until_succeeds(
        "grep -q 'slept 3' /tmp/slow.out",
        "the slow request to be answered",
        Duration::from_secs(15),
    )?;
    let p = sample(m, "sleepy")?;
    let logged = m.succeed(&format!(
        "journalctl -o cat -u cgipool-watch.service | grep -c 'slow request: id={id} '"
    ))?;
    ensure!(logged.trim() == "1", "logged {logged} times");
    m.succeed(&format!(
        "tr -d '\\r' < /tmp/slow.head | grep -qix 'x-request-id: {id}'"
    ))
    .context("the id watch logged is not the one nginx answered with")?;
    ensure!(num(&p, "slow_requests_total")? == 1, "{p}");

    // Every worker of every pool busy: the 30 s requests on sleepy, a load
    // on search; both endpoints answer within 200 ms (measured by curl in
    // the guest, through nginx).
    for i in 1..=2 {
        m.succeed(&format!("systemd-run --quiet --collect --unit=vmtest-long{i} curl -s -o /dev/null 'http://127.0.0.1/sleep?s=30'"))?;
    }
    m.succeed(
        "systemd-run --quiet --collect --unit=vmtest-wrk2 -p StandardOutput=truncate:/tmp/wrk2.out wrk -t1 -c16 -d20s --timeout 30s -H 'Connection: close' 'http://127.0.0.1:80/api/search?q=busy'",
    )?;
    m.wait_until_succeeds(
        "curl -s http://127.0.0.1/pool-status | python3 -c 'import json,sys; s=json.load(sys.stdin); sys.exit(not all(p[\"busy\"] == p[\"total\"] == 2 for p in s[\"pools\"]))'",
        "every worker of every pool to be busy",
        Duration::from_secs(15),
    )?;
    let times = m.succeed(
        "for i in 1 2 3 4 5; do for p in pool-status metrics; do curl -s -o /dev/null -w \"$p %{http_code} %{time_total}\\n\" http://127.0.0.1/$p; done; done",
    )?;
    let bound = m.scaled(Duration::from_millis(200)).as_secs_f64();
    for line in times.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        ensure!(
            words.len() == 3 && words[1] == "200",
            "{line}\nall:\n{times}"
        );
        let took: f64 = words[2].parse()?;
        ensure!(
            took < bound,
            "{} took {took:.3}s while every worker was busy (bound {bound:.3}s, {}):\n{times}",
            words[0],
            m.limit_note(Duration::from_millis(200))
        );
    }
    m.succeed(&format!(
        "echo 'endpoint times while saturated: {}'",
        times.replace('\n', "; ")
    ))?;

    // The same figures in /metrics, in both formats, and in cgipool status.
    let out = m.succeed(
        r#"curl -sf -H 'Accept: application/openmetrics-text; version=1.0.0' http://127.0.0.1/metrics | python3 -c '
import sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
fams = {f.name: f for f in text_string_to_metric_families(sys.stdin.read())}
for name in ["cgipool_pool_min", "cgipool_pool_max", "cgipool_pool_started_at_unix", "cgipool_pool_accepted", "cgipool_pool_max_queue_depth", "cgipool_pool_backlog", "cgipool_pool_idle_workers", "cgipool_pool_busy_workers", "cgipool_pool_total_workers", "cgipool_pool_max_busy_workers", "cgipool_pool_saturated", "cgipool_pool_slow_requests", "cgipool_pool_restarts", "cgipool_worker_since_unix", "cgipool_worker_requests", "cgipool_worker_current_duration_ms"]:
    assert name in fams and fams[name].documentation, (name, sorted(fams))
slow = [s for s in fams["cgipool_pool_slow_requests"].samples if s.labels["pool"] == "sleepy" and s.name.endswith("_total")]
assert slow and slow[0].value >= 1, slow
print("openmetrics figures ok")
'"#,
    )?;
    ensure!(out.contains("openmetrics figures ok"), "{out}");
    let out = m.succeed(
        r#"curl -sf http://127.0.0.1/metrics | python3 -c '
import sys
from prometheus_client.parser import text_string_to_metric_families
fams = {f.name: f for f in text_string_to_metric_families(sys.stdin.read())}
assert "cgipool_pool_saturated" in fams and "cgipool_worker_busy" in fams, sorted(fams)
print("text figures ok")
'"#,
    )?;
    ensure!(out.contains("text figures ok"), "{out}");
    let status = m.succeed("cgipool status")?;
    ensure!(
        status.contains("busy 2 idle 0 of 2") && status.contains("GET /sleep?s=30"),
        "cgipool status:\n{status}"
    );
    Ok(())
}
