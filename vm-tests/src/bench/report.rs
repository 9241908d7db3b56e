//! The report: bench/results/latest.md and latest.json from the runs.
use super::setup::*;
use super::stats::*;
use super::summary::*;
use super::*;
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::time::Duration;

/// The CPU figures divided by the requests of the rows they served (the
/// CPU unit's name in `CPU_UNITS`, the rows' targets): what one request
/// costs each side of a comparison.
const PER_REQUEST: &[(&str, &[&str])] = &[
    ("pool workers", &["pool"]),
    ("TCP workers", &["tcp", "tcp_keepalive"]),
    ("cgi pool (gateways + programs)", &["pool_cgi"]),
    ("fcgiwrap (+ programs)", &["fcgiwrap"]),
    ("php pool (php-cgi)", &["pool_php"]),
    ("php-fpm", &["php_fpm"]),
];

/// A measure.py record as seconds for a table cell.
pub(super) fn fmt_secs(v: &Value) -> String {
    match v["rc"].as_i64() {
        None => "—".into(),
        Some(0) => format!("{:.3}", secs(v)),
        Some(rc) => format!("failed (exit {rc})"),
    }
}

pub(super) fn fmt_med(v: &Value) -> String {
    let m = median(nochange_secs(v));
    if m.is_finite() {
        format!("{m:.3}")
    } else {
        "—".into()
    }
}

/// A full round's figures (control.rs) as cells, in the order of the
/// report's table: apply 0→N, batched start, loop of starts, apply N→1,
/// batched stop of N-1, no-change apply and batched show (medians).
pub(super) fn full_round_cells(r: &Value) -> [String; 7] {
    [
        fmt_secs(&r["apply_up"]),
        fmt_secs(&r["start_batched"]),
        fmt_secs(&r["start_loop"]),
        fmt_secs(&r["apply_down"]),
        fmt_secs(&r["stop_batched"]),
        fmt_med(&r["apply_nochange"]),
        fmt_med(&r["show_batched"]),
    ]
}

/// A round at a further size's figures (control.rs) as cells, in the order
/// of the report's table: apply 0→N, batched start, `cgipool down` N→0,
/// batched stop of 2N units, no-change apply and batched show (medians).
pub(super) fn size_round_cells(r: &Value) -> [String; 6] {
    [
        fmt_secs(&r["apply_up"]),
        fmt_secs(&r["start_batched"]),
        fmt_secs(&r["down"]),
        fmt_secs(&r["stop_all_batched"]),
        fmt_med(&r["apply_nochange"]),
        fmt_med(&r["show_batched"]),
    ]
}

pub(super) fn render(rep: &Report, mode: Mode, took: Duration) -> (String, Value) {
    let rows = rows(rep, mode);
    let mi = &rep.machine;
    let s = |v: &Value| v.as_str().unwrap_or("?").to_string();
    let mut md = String::new();
    let _ = writeln!(md, "# cgipool bench: {} run\n", mode.name());
    let _ = writeln!(
        md,
        "- date: {}\n- machine: {} cores ({}), kernel {}, {}, {}\n- {}\n- load average (1/5/15 min) at start {}, at end {}; other nspawn containers on the host at start: {}\n- mode: {} ({} s per wrk run, {} round(s) interleaved; control plane with {} workers, {} round(s)); took {:.0} s\n",
        s(&mi["date"]),
        s(&mi["cores"]),
        s(&mi["cpu"]),
        s(&mi["kernel"]),
        s(&mi["nginx"]),
        s(&mi["wrk"]),
        s(&mi["systemd"]),
        s(&mi["loadavg_start"]),
        s(&mi["loadavg_end"]),
        mi["other_nspawn_containers"],
        mode.name(),
        mode.secs,
        mode.reps,
        mode.workers,
        mode.cp_reps,
        took.as_secs_f64(),
    );
    if mode.smoke {
        let _ = writeln!(md, "**Smoke run: the figures only show that the machinery works; they are not the report.**\n");
    }
    let _ = writeln!(md, "## Summary\n");
    let _ = writeln!(
        md,
        "| section | figure | value | baseline (same run) | ratio | goal | result |\n|---|---|---|---|---|---|---|"
    );
    for r in &rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.section,
            r.figure,
            r.shown,
            r.baseline,
            r.ratio.map_or("—".into(), |x| format!("{x:.2}")),
            r.goal,
            verdict(r)
        );
    }
    let _ = writeln!(md, "\n## Data path (wrk -t2, mean over rounds)\n");
    let _ = writeln!(
        md,
        "| configuration | conns | req/s | req/s per round | p50 | p99 | errors |\n|---|---|---|---|---|---|---|"
    );
    for conns in CONNS {
        for t in TARGETS {
            if let Some(na) = t.na {
                let _ = writeln!(md, "| {} | {conns} | {na} | | | | |", t.label);
                continue;
            }
            if let Some(a) = aggregate(&rep.runs, t.key, conns) {
                let rounds: Vec<String> = a.per_round.iter().map(|x| format!("{x:.0}")).collect();
                let _ = writeln!(
                    md,
                    "| {} | {conns} | {:.0} | {} | {:.2} ms | {:.2} ms | {} |",
                    t.label,
                    a.rps,
                    rounds.join(", "),
                    a.p50_ms,
                    a.p99_ms,
                    a.errors
                );
            }
        }
    }
    if let Some(cpu) = mi["data_path_cpu_secs"].as_object() {
        let wall = cpu
            .get("wall_secs")
            .and_then(Value::as_f64)
            .unwrap_or(f64::NAN);
        let parts: Vec<String> = cpu
            .get("units")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|u| {
                format!(
                    "{} {:.1} s",
                    u["what"].as_str().unwrap_or("?"),
                    u["cpu_secs"].as_f64().unwrap_or(f64::NAN)
                )
            })
            .collect();
        let _ = writeln!(
            md,
            "\nCPU time used during the data path ({wall:.0} s wall, all configurations): {}.",
            parts.join(", ")
        );
        let per_request: Vec<String> = PER_REQUEST
            .iter()
            .filter_map(|&(what, targets)| {
                let cpu = cpu
                    .get("units")?
                    .as_array()?
                    .iter()
                    .find(|u| u["what"].as_str() == Some(what))?["cpu_secs"]
                    .as_f64()?;
                let requests: f64 = rep
                    .runs
                    .iter()
                    .filter(|r| targets.contains(&r.target))
                    .map(|r| r.num("requests"))
                    .sum();
                (requests > 0.0).then(|| format!("{what} {:.0} µs", cpu / requests * 1e6))
            })
            .collect();
        if !per_request.is_empty() {
            let _ = writeln!(
                md,
                "\nThe same per request served by its rows (each service's CPU over the whole data path, idle between its rows): {}.",
                per_request.join(", ")
            );
        }
    }
    let _ = writeln!(
        md,
        "\nThe HTTP rows: the pool is 4 C `search` workers sharing the pool's socket, nginx keeping its connections to them (keep-alive, the default for HTTP pools: a worker answers `Connection: close` when a connection waits in the queue) and no per-request journal line (`access_log` off, the default); the TCP workers are the same binary, also logging errors only.\n\nThe CGI rows: the same program ({CGI_PROGRAM}, cgi-src/hello_cgi.c, {}) behind both. cgipool's gateway is the payload's `cgipool` ({:.0} MB, {} build): it runs the program inside the worker's sandbox; the pool has the default shared queue (one socket for its 4 gateways, each accepting only when free, nginx opening a connection per request) and no per-request journal line (`access_log` off, the default). fcgiwrap runs it unsandboxed as www-data, its 4 processes accept from one socket, nginx connects to it anew per request (`fastcgi_keep_conn` off, the default), and it logs nothing per request. The PHP rows: the same one-line script behind php-fpm (`pm = static`, 4 children; its nginx location is Debian's `snippets/fastcgi-php.conf`, the same routing work as cgipool's PHP location: a regex, `fastcgi_split_path_info`, the `try_files` guard) and behind a FastCGI pool of 4 php-cgi workers on the pool's shared socket (`StandardInput=socket`).",
        mi["cgi_program_build"]
            .as_str()
            .unwrap_or("dynamic: glibc's ld.so"),
        mi["cgipool_binary_bytes"].as_f64().unwrap_or(f64::NAN) / 1e6,
        // Recorded by the run; a report rendered again from an older JSON
        // falls back to the environment.
        mi["cgipool_profile"]
            .as_str()
            .map(str::to_string)
            .or_else(|| std::env::var("CGIPOOL_BENCH_PROFILE").ok())
            .unwrap_or_else(|| "unknown".into())
    );
    let _ = writeln!(md, "\n## Control plane (seconds, per round)\n");
    let _ = writeln!(
        md,
        "| round | apply 0→N | batched start | loop of starts | apply N→1 | batched stop of N-1 | no-change apply (median) | batched show (median) | apply peak RSS (self / with children) |\n|---|---|---|---|---|---|---|---|---|"
    );
    for r in rep
        .control
        .iter()
        .filter(|r| r["workers"].as_u64() == Some(u64::from(mode.workers)))
    {
        let up = &r["apply_up"];
        let _ = writeln!(
            md,
            "| {} | {} | {:.1} / {:.1} MiB |",
            r["round"],
            full_round_cells(r).join(" | "),
            up["peak_rss_kb"].as_f64().unwrap_or(0.0) / 1024.0,
            up["tree_maxrss_kb"].as_f64().unwrap_or(0.0) / 1024.0,
        );
    }
    let sized: Vec<&Value> = rep
        .control
        .iter()
        .filter(|r| r["down"].is_object())
        .collect();
    if !sized.is_empty() {
        let _ = writeln!(
            md,
            "\n### By size (seconds; one round each)\n\n| workers | apply 0→N | batched start of 2N units | `cgipool down` N→0 | batched stop of 2N units | no-change apply (median) | batched show (median) | apply peak RSS |\n|---|---|---|---|---|---|---|---|"
        );
        for r in sized {
            let _ = writeln!(
                md,
                "| {} | {} | {:.1} MiB |",
                r["workers"],
                size_round_cells(r).join(" | "),
                r["apply_up"]["peak_rss_kb"].as_f64().unwrap_or(0.0) / 1024.0,
            );
        }
    }
    let k = &rep.recovery["kill"];
    let ms = |v: &Value| {
        v.as_f64()
            .map_or("—".to_string(), |x| format!("{:.0} ms", x * 1000.0))
    };
    let _ = writeln!(
        md,
        "\n## Recovery\n\n`kill -9` of cgipool-search@1 (PID {} → {}) {:.1} s into {} s of wrk at 16 connections on the pool: new main PID active after {}, a request sent to the pool's socket after that answered at {}, a request sent to it right at the kill answered at {}; NRestarts {} → {}.\n",
        k["old_pid"],
        k["new_pid"],
        f64::from(mode.recover_secs) / 3.0,
        mode.recover_secs,
        ms(&k["secs_to_active"]),
        ms(&k["secs_to_answer"]),
        ms(&k["secs_queued_request_answered"]),
        k["nrestarts_before"],
        k["nrestarts_after"],
    );
    let sc = &rep.scaling;
    let st = &sc["step"];
    let timeline: Vec<String> = st["timeline"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| format!("{:.1} s: {}", p[0].as_f64().unwrap_or(f64::NAN), p[1]))
        .collect();
    let sw = &sc["wrk"];
    let step_rps = sw["requests"].as_f64().unwrap_or(0.0)
        / (sw["duration_us"].as_f64().unwrap_or(f64::NAN) / 1e6);
    let _ = writeln!(
        md,
        "## Scaling

Pool `{STEP_POOL}` (the search worker with CGIPOOL_TEST_DELAY_MS=20, min {STEP_MIN}, max {STEP_MAX}, scale_up_after {STEP_UP_AFTER_SECS}s, scale_down_after {STEP_DOWN_AFTER_SECS}s), scaled only by `cgipool watch`; wrk with {} connections (`Connection: close`) for {} s, {:.0} req/s, p99 {:.1} ms. Active workers, polled every 100 ms from the start of the load (it ended at {:.1} s): {}.
",
        sc["connections"],
        sc["load_secs"],
        step_rps,
        sw["p99_us"].as_f64().unwrap_or(f64::NAN) / 1000.0,
        st["load_end_secs"].as_f64().unwrap_or(f64::NAN),
        timeline.join(", "),
    );
    let decisions: Vec<&str> = sc["watch_decisions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if sc["watch_restarted_by_bench"].as_bool() == Some(true) {
        let _ = writeln!(
            md,
            "**Note:** after the `cgipool apply` that added pool `{STEP_POOL}`, `cgipool watch` did not report watching it within 5 s (it still watched {}), so the bench restarted cgipool-watch.service before the load step.\n",
            sc["watch_pools_after_apply"]
        );
    }
    if !decisions.is_empty() {
        let _ = writeln!(
            md,
            "watch's decisions (journal, monotonic clock):

```
{}
```
",
            decisions.join(
                "
"
            )
        );
    }
    let readings: Vec<String> = rep
        .watch_rss
        .iter()
        .map(|w| {
            format!(
                "{}: PID {}, VmHWM {:.1} MiB, VmRSS {:.1} MiB, running {} s, NRestarts {}",
                w["when"].as_str().unwrap_or("?"),
                w["pid"],
                w["vmhwm_kb"].as_f64().unwrap_or(f64::NAN) / 1024.0,
                w["vmrss_kb"].as_f64().unwrap_or(f64::NAN) / 1024.0,
                w["running_secs"],
                w["nrestarts"],
            )
        })
        .collect();
    let _ = writeln!(
        md,
        "`cgipool watch` (cgipool-watch.service's main process): {}.
",
        readings.join("; ")
    );
    let _ = writeln!(md, "How to read this: bench/README.md.");
    let json = json!({
        "mode": mode.name(),
        "machine": rep.machine,
        "settings": {
            "wrk_secs": mode.secs, "rounds": mode.reps, "connections": CONNS,
            "control_plane_workers": mode.workers, "control_plane_rounds": mode.cp_reps,
            "control_plane_more_sizes": mode.more_sizes,
            "quick_repeats": mode.quick_reps, "recovery_load_secs": mode.recover_secs,
            "scaling_load_secs": mode.step_secs,
        },
        "summary": rows.iter().map(|r| json!({
            "section": r.section, "figure": r.figure, "value": r.value, "shown": r.shown,
            "baseline": r.baseline, "baseline_value": r.baseline_value, "ratio": r.ratio,
            "goal": r.goal, "pass": r.pass, "stretch_pass": r.stretch,
        })).collect::<Vec<_>>(),
        "data_path": rep.runs.iter().map(|r| json!({
            "target": r.target, "connections": r.conns, "round": r.rep,
            "rps": r.rps(), "errors": r.errors(), "wrk": r.wrk,
        })).collect::<Vec<_>>(),
        "data_path_not_measured": TARGETS.iter().filter_map(|t| t.na.map(|na| json!({"target": t.key, "why": na}))).collect::<Vec<_>>(),
        "mixed_load": rep.mixed,
        "control_plane": rep.control,
        "recovery": rep.recovery,
        "scaling": rep.scaling,
        "watch_memory": rep.watch_rss,
        "took_secs": took.as_secs_f64(),
    });
    (md, json)
}

/// A report back from its JSON (the raw figures; the summary is computed
/// again), with the mode it ran in.
pub(super) fn from_json(j: &Value) -> Result<(Report, Mode)> {
    let runs = j["data_path"]
        .as_array()
        .context("no data_path")?
        .iter()
        .map(|r| {
            Ok(Run {
                target: TARGETS
                    .iter()
                    .find(|t| t.key == r["target"])
                    .map(|t| t.key)
                    .with_context(|| format!("unknown target {}", r["target"]))?,
                conns: r["connections"].as_u64().context("connections")? as u32,
                rep: r["round"].as_u64().context("round")? as u32,
                wrk: r["wrk"].clone(),
            })
        })
        .collect::<Result<Vec<Run>>>()?;
    let rep = Report {
        machine: j["machine"].clone(),
        runs,
        mixed: j["mixed_load"].clone(),
        control: j["control_plane"]
            .as_array()
            .context("no control_plane")?
            .clone(),
        recovery: j["recovery"].clone(),
        scaling: j["scaling"].clone(),
        watch_rss: j["watch_memory"]
            .as_array()
            .context("no watch_memory")?
            .clone(),
    };
    let mut mode = Mode::defaults(j["mode"] == "smoke");
    mode.workers = j["settings"]["control_plane_workers"]
        .as_u64()
        .context("no settings.control_plane_workers")? as u32;
    Ok((rep, mode))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed report's summary is what `rows` computes from the
    /// committed raw figures (the summary code cannot drift silently).
    #[test]
    pub(super) fn summary_recomputes_from_the_committed_raw_figures() {
        let text = include_str!("../../../bench/results/latest.json");
        let j: Value = serde_json::from_str(text).expect("latest.json");
        let (rep, mode) = from_json(&j).expect("latest.json holds a report");
        let (_, again) = render(&rep, mode, Duration::ZERO);
        assert!(
            same(&again["summary"], &j["summary"]),
            "recomputed:\n{:#}\ncommitted:\n{:#}",
            again["summary"],
            j["summary"]
        );
    }

    /// Equal, numbers up to the last bits JSON's decimal form loses.
    pub(super) fn same(a: &Value, b: &Value) -> bool {
        match (a, b) {
            (Value::Number(x), Value::Number(y)) => {
                let (x, y) = (
                    x.as_f64().unwrap_or(f64::NAN),
                    y.as_f64().unwrap_or(f64::NAN),
                );
                (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0)
            }
            (Value::Array(x), Value::Array(y)) => {
                x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y))
            }
            (Value::Object(x), Value::Object(y)) => {
                x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
            }
            _ => a == b,
        }
    }
}
