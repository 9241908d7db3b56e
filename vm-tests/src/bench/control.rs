//! The control plane: `cgipool apply` from nothing and back, next to
//! systemctl doing the same to the same units.
use super::report::*;
use super::runs::*;
use super::setup::*;
use super::*;
use crate::machine::{shell_quote, Machine};
use crate::scenarios::common::{write_config, CONFIG};
use anyhow::{ensure, Result};
use serde_json::{json, Value};
use std::time::Duration;

/// The control plane: `cp_reps` rounds at `mode.workers` with every figure
/// (`full_round`), then one round at each of `mode.more_sizes` (`size_round`).
/// Each round starts and ends with no worker running.
pub(super) fn control_plane(m: &mut Machine, mode: Mode) -> Result<Vec<Value>> {
    let mut rounds = Vec::new();
    for rep in 1..=mode.cp_reps {
        rounds.push(full_round(m, mode, rep)?);
    }
    for &n in mode.more_sizes {
        rounds.push(size_round(m, mode, n)?);
    }
    Ok(rounds)
}

const POOL: &str = "cp";

/// The control-plane pools at N workers: `cp`, and past 500 workers (a
/// pool has at most 512) `cp2`, `cp3`, … of 500 each, each with a socket
/// per worker. watch is off: the
/// baselines stop and start the pools' units behind the intent's back, and a
/// converge of watch would cancel their jobs (seen: "Job for
/// cgipool-cp@30.service canceled").
pub(super) fn cp_config(n: u32) -> String {
    let mut cfg = String::from("[watch]\nenabled = false\n\n");
    for (i, (pool, k)) in split(n).into_iter().enumerate() {
        if i == 0 {
            cfg.push_str(&pool_config(&pool, "/api/cp", k, k));
        } else {
            cfg.push_str(&format!(
                "\n[pool.{pool}]\nexec = \"{WORKER}\"\nroute = \"/api/{pool}\"\nmin = {k}\nmax = {k}\n"
            ));
        }
        // A socket per worker: 2N units, the same units as the baselines
        // (and the figures of earlier reports).
        cfg.push_str("queue = \"per-worker\"\n");
    }
    cfg
}

/// N workers as (pool, count) of at most 500 each.
fn split(n: u32) -> Vec<(String, u32)> {
    (0..n.div_ceil(500))
        .map(|i| {
            let name = if i == 0 {
                POOL.to_string()
            } else {
                format!("{POOL}{}", i + 1)
            };
            (name, (n - i * 500).min(500))
        })
        .collect()
}

/// The socket and service units of workers `range` of the first pool, for
/// bash's brace expansion.
fn units_range(range: std::ops::RangeInclusive<u32>) -> String {
    let (a, b) = (range.start(), range.end());
    format!("cgipool-{POOL}@{{{a}..{b}}}.socket cgipool-{POOL}@{{{a}..{b}}}.service")
}

/// Every socket and service unit of N workers (over the pools of `split`).
fn units(n: u32) -> String {
    split(n)
        .iter()
        .map(|(pool, k)| {
            format!("cgipool-{pool}@{{1..{k}}}.socket cgipool-{pool}@{{1..{k}}}.service")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The glob that matches the units of every control-plane pool.
const POOLS_GLOB: &str = "cp*";

/// Brace expansion needs bash.
fn bash(s: String) -> String {
    format!("exec bash -c {}", shell_quote(&s))
}

fn apply_cmd() -> String {
    format!("exec cgipool apply {CONFIG}")
}

/// `quick_reps` no-change applies (each must say so) and as many batched
/// `systemctl show` of the same units.
fn quick(m: &mut Machine, mode: Mode, n: u32, r: &mut Value) -> Result<()> {
    let mut nochange = Vec::new();
    for _ in 0..mode.quick_reps {
        let v = timed(m, &apply_cmd())?;
        ensure!(
            v["stdout_tail"]
                .as_str()
                .unwrap_or("")
                .contains("no changes"),
            "a second apply changed something: {}",
            v["stdout_tail"]
        );
        nochange.push(v);
    }
    r["apply_nochange"] = json!(nochange);
    r["show_batched"] = batched_shows(m, mode, n)?;
    Ok(())
}

/// `quick_reps` batched `systemctl show` of the units of N workers.
fn batched_shows(m: &mut Machine, mode: Mode, n: u32) -> Result<Value> {
    let mut show = Vec::new();
    for _ in 0..mode.quick_reps {
        show.push(timed(
            m,
            &bash(format!("systemctl show {} >/dev/null", units(n))),
        )?);
    }
    Ok(json!(show))
}

/// One round at N = `mode.workers`: nothing → apply N → no-change applies
/// and batched shows → apply 1 → batched start of the same N workers →
/// batched stop of N-1 → a loop of N starts.
fn full_round(m: &mut Machine, mode: Mode, rep: u32) -> Result<Value> {
    let n = mode.workers;
    let mut r = json!({ "round": rep, "workers": n });
    write_config(m, &cp_config(n))?;
    // A failing apply is a finding, not broken machinery: it is reported
    // (FAIL) and the baselines are still measured.
    let up = measure(m, &apply_cmd())?;
    let up_ok = up["rc"].as_i64() == Some(0);
    r["apply_up"] = up;
    if up_ok {
        wait_active(m, POOL, n)?;
        let mut nochange = json!({});
        quick(m, mode, n, &mut nochange)?;
        r["apply_nochange"] = nochange["apply_nochange"].take();
    }
    write_config(m, &cp_config(1))?;
    // Failing applies are findings here too (reported, not fatal).
    let down = measure(m, &apply_cmd())?;
    let down_ok = down["rc"].as_i64() == Some(0);
    if up_ok {
        r["apply_down"] = down;
    } else {
        // Only to get the unit files (templates) the baselines start.
        r["apply_down_unmeasured"] = down;
    }
    if !down_ok {
        stop_all_after_failure(m)?;
    }
    m.succeed(&format!(
        "test -f /etc/systemd/system/cgipool-{POOL}@.service && test -f /etc/systemd/system/cgipool-{POOL}@.socket"
    ))?;
    // Baselines on the same unit files: no unit of the pool runs, then
    // systemctl starts the same N workers (socket and service each).
    m.succeed(&format!(
        "systemctl stop cgipool-{POOL}@1.service cgipool-{POOL}@1.socket"
    ))?;
    r["start_batched"] = timed(m, &bash(format!("systemctl start {}", units(n))))?;
    wait_active(m, POOL, n)?;
    r["show_batched"] = batched_shows(m, mode, n)?;
    r["stop_batched"] = timed(m, &bash(format!("systemctl stop {}", units_range(2..=n))))?;
    m.succeed(&format!("systemctl stop 'cgipool-{POOL}@*'"))?;
    r["start_loop"] = timed(
        m,
        &bash(format!(
            "for i in $(seq 1 {n}); do systemctl start cgipool-{POOL}@$i.socket cgipool-{POOL}@$i.service || exit 1; done"
        )),
    )?;
    wait_active(m, POOL, n)?;
    m.succeed(&format!("systemctl stop 'cgipool-{POOL}@*'"))?;
    // Back to nothing for the next round and the data path.
    m.succeed_within(&format!("cgipool down {CONFIG}"), Duration::from_secs(120))?;
    let [up, start, start_loop, down, _, nochange, show] = full_round_cells(&r);
    eprintln!(
        "  round {rep}: apply 0→{n} {up}, batched start {start}, loop {start_loop}, apply {n}→1 {down}, no-change apply {nochange}, batched show {show} (s)"
    );
    Ok(r)
}

/// One round at a larger N: apply 0 → N, no-change applies and batched
/// shows, a batched stop and a batched start of the same 2N units, then
/// `cgipool down` (N → 0). Failing steps are findings (reported), and the
/// round goes on from a clean state.
pub(super) fn size_round(m: &mut Machine, mode: Mode, n: u32) -> Result<Value> {
    let mut r = json!({ "round": 1, "workers": n });
    write_config(m, &cp_config(n))?;
    let up = measure(m, &apply_cmd())?;
    let up_ok = up["rc"].as_i64() == Some(0);
    r["apply_up"] = up;
    if up_ok {
        wait_active_within(m, POOLS_GLOB, n, jobs_limit(n))?;
        quick(m, mode, n, &mut r)?;
    } else {
        stop_all_after_failure(m)?;
    }
    // The baselines, on the unit files apply wrote.
    let stop = measure(m, &bash(format!("systemctl stop {}", units(n))))?;
    let stop_ok = stop["rc"].as_i64() == Some(0);
    r["stop_all_batched"] = stop;
    if !stop_ok {
        stop_all_after_failure(m)?;
    }
    let start = measure(m, &bash(format!("systemctl start {}", units(n))))?;
    let start_ok = start["rc"].as_i64() == Some(0);
    r["start_batched"] = start;
    if start_ok {
        wait_active_within(m, POOLS_GLOB, n, jobs_limit(n))?;
    }
    // N → 0: everything cgipool made goes, as an operator takes it down.
    r["down"] = measure(m, &format!("exec cgipool down {CONFIG}"))?;
    m.wait_until_succeeds(
        &format!(
            "test -z \"$(systemctl list-units --no-legend --plain --state=active,activating,deactivating 'cgipool-{POOLS_GLOB}@*')\""
        ),
        &format!("every unit of {POOLS_GLOB} to be gone after down"),
        jobs_limit(n),
    )?;
    let [up, start, down, stop, nochange, show] = size_round_cells(&r);
    eprintln!(
        "  {n} workers: apply 0→{n} {up}, batched start {start}, down {down}, batched stop {stop}, no-change apply {nochange}, batched show {show} (s)"
    );
    Ok(r)
}

/// How long the jobs of N workers may take: a minute per 100 workers (the
/// harness scales it by the machine's calibration).
fn jobs_limit(n: u32) -> Duration {
    Duration::from_secs(60 * u64::from(n.div_ceil(100)))
}

/// Stops whatever a failed apply or systemctl left running, so the next
/// step starts from no running worker (jobs the failed command queued may
/// still cancel the first stop).
fn stop_all_after_failure(m: &mut Machine) -> Result<()> {
    m.wait_until_succeeds(
        &format!(
            "systemctl stop 'cgipool-{POOLS_GLOB}@*' && test -z \"$(systemctl list-units --no-legend --plain --state=active,activating,deactivating,reloading 'cgipool-{POOLS_GLOB}@*')\""
        ),
        &format!("every unit of {POOLS_GLOB} to stop after the failure"),
        Duration::from_secs(120),
    )?;
    Ok(())
}

pub(super) fn wait_active(m: &mut Machine, pool: &str, n: u32) -> Result<()> {
    wait_active_within(m, pool, n, Duration::from_secs(60))
}

/// Every worker of the control-plane pools at N, within the jobs' limit.
pub(super) fn wait_active_within_default(m: &mut Machine, n: u32) -> Result<()> {
    wait_active_within(m, POOLS_GLOB, n, jobs_limit(n))
}

fn wait_active_within(m: &mut Machine, pool: &str, n: u32, limit: Duration) -> Result<()> {
    m.wait_until_succeeds(
        &format!(
            "test $(systemctl list-units --no-legend --plain --state=active 'cgipool-{pool}@*.service' | wc -l) -eq {n}"
        ),
        &format!("{n} workers of {pool} to be active"),
        limit,
    )?;
    Ok(())
}
