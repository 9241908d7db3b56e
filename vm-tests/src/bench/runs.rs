//! The measured runs: wrk on the data path, the kill under load, the load
//! step that watch scales, and commands timed by measure.py.
use super::setup::*;
use super::stats::*;
use super::*;
use crate::machine::{shell_quote, Machine};
use crate::scenarios::common::{apply, write_config};
use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use std::time::Duration;

/// Runs wrk in the guest and returns what report.lua printed.
pub(super) fn wrk(m: &mut Machine, url: &str, conns: u32, secs: u32) -> Result<Value> {
    let cmd = format!(
        "wrk -t2 -c{conns} -d{secs}s --latency -s {GUEST_DIR}/report.lua {}",
        shell_quote(url)
    );
    let out = m.succeed_within(&cmd, Duration::from_secs(u64::from(secs) + 60))?;
    parse_wrk(&out).with_context(|| format!("reading the output of `{cmd}`"))
}

pub(super) fn parse_wrk(out: &str) -> Result<Value> {
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("BENCHJSON "))
        .with_context(|| format!("no BENCHJSON line in wrk's output:\n{out}"))?;
    let v: Value =
        serde_json::from_str(line).with_context(|| format!("wrk summary is not JSON: {line}"))?;
    ensure!(
        v["requests"].is_u64() && v["duration_us"].as_u64().unwrap_or(0) > 0,
        "wrk summary lacks requests/duration: {line}"
    );
    Ok(v)
}

pub(super) fn data_path(m: &mut Machine, mode: Mode) -> Result<Vec<Run>> {
    let live: Vec<&Target> = TARGETS.iter().filter(|t| t.na.is_none()).collect();
    if !mode.smoke {
        // Warm up every path once (connections, page cache, nginx workers).
        for t in &live {
            wrk(m, t.url, 16, 2)?;
        }
    }
    let mut runs = Vec::new();
    for rep in 1..=mode.reps {
        for conns in CONNS {
            // Interleaved: every configuration once per round, so drift on
            // the (shared) machine hits all of them.
            for t in &live {
                let v = wrk(m, t.url, conns, mode.secs)?;
                let run = Run {
                    target: t.key,
                    conns,
                    rep,
                    wrk: v,
                };
                eprintln!(
                    "  {:<14} c={conns:<3} round {rep}: {:>8.0} req/s  p99 {:>6.2} ms  errors {}",
                    t.key,
                    run.rps(),
                    run.num("p99_us") / 1000.0,
                    run.errors()
                );
                runs.push(run);
            }
        }
    }
    Ok(runs)
}

pub(super) fn recovery(m: &mut Machine, mode: Mode) -> Result<Value> {
    let url = format!("http://127.0.0.1:80{SEARCH_PATH}");
    let out = format!("{GUEST_DIR}/recover-wrk.out");
    m.succeed(&format!(
        "systemd-run --quiet --collect --unit=bench-wrk-recover \
         -p StandardOutput=truncate:{out} -p StandardError=journal \
         /usr/bin/wrk -t2 -c16 -d{secs}s --latency -s {GUEST_DIR}/report.lua {url}",
        secs = mode.recover_secs,
        url = shell_quote(&url)
    ))?;
    let delay = f64::from(mode.recover_secs) / 3.0;
    let o = m.execute(
        &format!(
            "python3 {GUEST_DIR}/recover.py cgipool-search@1.service /run/cgipool/search/pool.sock {} {delay:.2}",
            shell_quote(SEARCH_PATH)
        ),
        Duration::from_secs(u64::from(mode.recover_secs) + 60),
    )?;
    let kill = last_json(&o, "recover.py")?;
    ensure!(
        o.rc == 0,
        "the killed worker did not come back: {kill}\n{}",
        o.stderr
    );
    let text = m.wait_until_succeeds(
        &format!("grep -q '^BENCHJSON ' {out} && cat {out}"),
        "the wrk run under the kill to finish",
        Duration::from_secs(u64::from(mode.recover_secs) + 30),
    )?;
    let load = parse_wrk(&text)?;
    Ok(json!({ "kill": kill, "wrk": load, "load_secs": mode.recover_secs, "connections": 16 }))
}

/// The load step: a pool of STEP_MIN..STEP_MAX slow workers that only
/// The pools named by watch's latest "watching" line: `watch: watching 2
/// pools (a, b)` at its start, `watch: intent 3 (recorded by apply):
/// watching a=2, b=4` when it follows a new intent.
fn watched_pools(line: &str) -> Vec<String> {
    let line = line.trim();
    if let Some((_, counts)) = line.split_once("): watching ") {
        return counts
            .split(", ")
            .map(|c| c.split_once('=').map_or(c, |(p, _)| p).to_string())
            .collect();
    }
    line.rsplit_once('(')
        .map(|(_, l)| l.trim_end_matches(')'))
        .unwrap_or_default()
        .split(", ")
        .map(String::from)
        .collect()
}

/// `cgipool watch` scales; wrk with STEP_CONNS connections for `step_secs`
/// (bench/guest/scale.py times it from inside the guest). Replaces the data
/// path's pools (nothing else runs meanwhile).
pub(super) fn scaling(m: &mut Machine, mode: Mode) -> Result<Value> {
    write_config(m, &step_pool_config())?;
    apply(m)?;
    let url = "http://127.0.0.1:80/api/search?q=load";
    m.wait_until_succeeds(
        &format!("curl -sf -o /dev/null {}", shell_quote(url)),
        "the step pool to answer 200",
        Duration::from_secs(15),
    )?;
    // watch re-reads the applied config on its next step; give it a few
    // seconds to log the new pool, and restart it (saying so) if it does not.
    let watching = |m: &mut Machine| -> Result<Vec<String>> {
        let _ = m.execute(
            &format!("for i in $(seq 50); do journalctl -b -o cat --no-pager -u cgipool-watch.service | grep -E '^watch: (watching|intent [0-9]+ .*: watching)' | tail -n 1 | grep -q '{STEP_POOL}' && exit 0; sleep 0.1; done; exit 1"),
            Duration::from_secs(10),
        )?;
        let line = m.succeed(
            "journalctl -b -o cat --no-pager -u cgipool-watch.service | grep -E '^watch: (watching|intent [0-9]+ .*: watching)' | tail -n 1",
        )?;
        Ok(watched_pools(&line))
    };
    let before = watching(m)?;
    let restarted = !before.iter().any(|p| p == STEP_POOL);
    if restarted {
        eprintln!(
            "  note: watch does not scale the new pool (it watches {before:?}): restarting it"
        );
        m.succeed("systemctl restart cgipool-watch.service")?;
        m.wait_until_succeeds(
            &format!(
                "journalctl -b -o cat --no-pager -u cgipool-watch.service | grep '^watch: watching' | tail -n 1 | grep -q '[(, ]{STEP_POOL}[,)]' && test -S /run/cgipool/watch.sock"
            ),
            "watch to watch the step pool",
            Duration::from_secs(15),
        )?;
    }
    let secs = mode.step_secs;
    // Scale-down takes about 2 windows of scale_down_after; give it 4 more.
    let down_limit = STEP_DOWN_AFTER_SECS * 6.0;
    let cmd = format!(
        "python3 {GUEST_DIR}/scale.py {STEP_POOL} {STEP_MIN} {STEP_MAX} {secs} {down_limit} -- \
         wrk -t2 -c{STEP_CONNS} -d{secs}s --timeout 10s --latency -H 'Connection: close' \
         -s {GUEST_DIR}/report.lua {}",
        shell_quote(url)
    );
    let limit = Duration::from_secs(u64::from(secs) + down_limit as u64 + 120);
    let o = m.execute(&cmd, limit)?;
    let step = last_json(&o, "scale.py")?;
    ensure!(o.rc == 0, "the load step did not run: {step}\n{}", o.stderr);
    let load = parse_wrk(&o.stdout)?;
    let decisions = m.succeed(
        "journalctl -b -o short-monotonic --no-pager -u cgipool-watch.service | grep -F ' scale ' | tail -n 20 || true",
    )?;
    eprintln!(
        "  at max after {} s, back at min {} s after the load; timeline {}",
        step["secs_to_max"], step["secs_back_to_min"], step["timeline"]
    );
    Ok(json!({
        "step": step,
        "wrk": load,
        "connections": STEP_CONNS,
        "load_secs": secs,
        "down_limit_secs": down_limit,
        "watch_decisions": decisions.lines().collect::<Vec<_>>(),
        "watch_pools_after_apply": before,
        "watch_restarted_by_bench": restarted,
    }))
}

/// cgipool-watch.service's main process: VmHWM (peak RSS) and VmRSS in kB,
/// how long it has run and how often systemd restarted it.
pub(super) fn watch_memory(m: &mut Machine, when: &str) -> Result<Value> {
    let out = m.succeed(
        "pid=$(systemctl show -P MainPID cgipool-watch.service); test \"$pid\" -gt 0; \
         echo $pid $(awk '/^VmHWM:/{print $2}' /proc/$pid/status) \
         $(awk '/^VmRSS:/{print $2}' /proc/$pid/status) \
         $(ps -o etimes= -p $pid) $(systemctl show -P NRestarts cgipool-watch.service)",
    )?;
    let f: Vec<u64> = out
        .split_whitespace()
        .map(|x| x.parse::<u64>())
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("reading cgipool watch's memory: {out}"))?;
    ensure!(f.len() == 5, "reading cgipool watch's memory: {out}");
    Ok(json!({
        "when": when, "pid": f[0], "vmhwm_kb": f[1], "vmrss_kb": f[2],
        "running_secs": f[3], "nrestarts": f[4],
    }))
}

/// Runs a command through measure.py and returns its record, whatever the
/// command's exit status (`rc`).
pub(super) fn measure(m: &mut Machine, cmd: &str) -> Result<Value> {
    // 1,000 workers take minutes on a slow machine.
    let limit = m.scaled(Duration::from_secs(600));
    let o = m.succeed_within(
        &format!("python3 {GUEST_DIR}/measure.py {}", shell_quote(cmd)),
        limit,
    )?;
    let mut v: Value = o
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .with_context(|| format!("measure.py printed no JSON for `{cmd}`:\n{o}"))?;
    v["cmd"] = json!(cmd);
    Ok(v)
}

/// Runs a command through measure.py; it must exit 0.
pub(super) fn timed(m: &mut Machine, cmd: &str) -> Result<Value> {
    let v = measure(m, cmd)?;
    ensure!(
        v["rc"].as_i64() == Some(0),
        "`{cmd}` failed (exit {}):\n{}\n{}",
        v["rc"],
        v["stdout_tail"].as_str().unwrap_or(""),
        v["stderr_tail"].as_str().unwrap_or("")
    );
    Ok(v)
}

/// The JSON object a guest helper prints as its last line of output.
pub(super) fn last_json(o: &crate::agent::Output, helper: &str) -> Result<Value> {
    o.stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .with_context(|| {
            format!(
                "{helper} printed no JSON (exit {}):\n{}\n{}",
                o.rc, o.stdout, o.stderr
            )
        })
}

/// The mixed load (1 request in 20 takes 50 ms, 16 connections) on the pool
/// of each queue mode, interleaved, `reps` rounds of `secs` seconds.
pub(super) fn mixed(m: &mut Machine, mode: Mode) -> Result<Value> {
    let mut runs = Vec::new();
    for rep in 1..=mode.reps {
        for (pool, route, queue) in MIXED_POOLS {
            let url = format!("http://127.0.0.1:80{route}");
            let o = m.execute(
                &format!(
                    "python3 {GUEST_DIR}/mixed.py {} 16 {} 20",
                    shell_quote(&url),
                    mode.secs
                ),
                Duration::from_secs(u64::from(mode.secs) + 60),
            )?;
            let mut v = last_json(&o, "mixed.py")?;
            ensure!(o.rc == 0, "mixed.py failed: {v}\n{}", o.stderr);
            eprintln!(
                "  {pool:<5} ({queue}) round {rep}: fast p99 {} ms ({} requests), slow p99 {} ms, errors {}",
                v["fast"]["p99_ms"], v["fast"]["count"], v["slow"]["p99_ms"], v["errors"]
            );
            v["pool"] = json!(pool);
            v["queue"] = json!(queue);
            v["round"] = json!(rep);
            runs.push(v);
        }
    }
    Ok(json!(runs))
}

#[cfg(test)]
mod tests {
    use super::watched_pools;

    #[test]
    fn both_kinds_of_watching_lines_name_their_pools() {
        assert_eq!(
            watched_pools("watch: watching 2 pools (search, step)"),
            ["search", "step"]
        );
        assert_eq!(
            watched_pools("watch: intent 3 (recorded by apply): watching step=2, cgi=4\n"),
            ["step", "cgi"]
        );
    }
}
