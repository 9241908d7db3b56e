//! `make bench` (and `make bench-smoke`): cgipool's performance figures, each
//! next to a baseline measured in the same run, inside one nspawn container
//! (clients, nginx and workers share its cores). See bench/README.md.
//!
//! Full mode writes bench/results/latest.{md,json}; `--smoke` runs the same
//! code with short runs and 10 workers instead of 100 and writes to
//! target/bench-smoke/, so it never touches the committed report. Missed
//! goals never make the run fail: only broken machinery does.
mod control;
mod only;
mod only_down;
mod only_http;
mod report;
mod runs;
mod setup;
mod stats;
mod summary;
mod summary_control;
mod summary_data_path;

use control::*;
use report::*;
use runs::*;
use setup::*;
use stats::*;

use crate::machine::{Env, Machine, Options, Tier};
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::path::Path;
use std::time::Instant;

/// How long and how often; the only difference between full and smoke.
#[derive(Debug, Clone, Copy)]
struct Mode {
    smoke: bool,
    /// Seconds per wrk run on the data path.
    secs: u32,
    /// Rounds of the interleaved data-path runs (A B C A B C ...).
    reps: u32,
    /// Workers in the control-plane pool: the first size, the one measured
    /// `cp_reps` times with every figure.
    workers: u32,
    /// Rounds of the control-plane sequence at `workers`.
    cp_reps: u32,
    /// Further sizes of the control-plane pool (0 → N and N → 0 once each).
    more_sizes: &'static [u32],
    /// Repeats of the short no-change apply / batched show.
    quick_reps: u32,
    /// Seconds of load during the worker kill.
    recover_secs: u32,
    /// Seconds of the load step that watch scales the pool up under.
    step_secs: u32,
}

impl Mode {
    fn new(smoke: bool) -> Result<Mode> {
        let mut mode = Mode::defaults(smoke);
        // Override the control plane's pool size (e.g. to find where it breaks).
        if let Ok(w) = std::env::var("CGIPOOL_BENCH_WORKERS") {
            mode.workers = w
                .parse()
                .ok()
                .filter(|&n| (2..=2000).contains(&n))
                .with_context(|| format!("CGIPOOL_BENCH_WORKERS={w}: want 2..=2000"))?;
            mode.more_sizes = &[];
        }
        Ok(mode)
    }

    fn defaults(smoke: bool) -> Mode {
        if smoke {
            Mode {
                smoke,
                secs: 1,
                reps: 1,
                workers: 10,
                cp_reps: 1,
                more_sizes: &[10, 20],
                quick_reps: 2,
                recover_secs: 2,
                step_secs: 8,
            }
        } else {
            Mode {
                smoke,
                secs: 10,
                reps: 2,
                workers: 100,
                cp_reps: 2,
                more_sizes: &[100, 200, 500, 1000],
                quick_reps: 5,
                recover_secs: 10,
                step_secs: 20,
            }
        }
    }

    fn name(&self) -> &'static str {
        if self.smoke {
            "smoke"
        } else {
            "full"
        }
    }
}

pub fn run(env: &Env, smoke: bool) -> Result<()> {
    // `CGIPOOL_BENCH_ONLY=cgi`: the CGI rows only (bench/only.rs).
    // `CGIPOOL_BENCH_ONLY=down`: `cgipool down` only (bench/only_down.rs).
    // `CGIPOOL_BENCH_ONLY=http`: the HTTP pool's rows only (bench/only_http.rs).
    match only::only()?.as_deref() {
        Some("down") => return only_down::run_down(env),
        Some("http") => return only_http::run_http(env),
        Some(_) => return only::run_cgi(env),
        None => {}
    }
    let mode = Mode::new(smoke)?;
    let t0 = Instant::now();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("vm-tests has no parent directory")?;
    let out_dir = if smoke {
        root.join("target/bench-smoke")
    } else {
        root.join("bench/results")
    };
    eprintln!("bench ({} mode): booting an nspawn container", mode.name());
    let mut m = Machine::start(
        env,
        Tier::Nspawn,
        &format!("bench-{}", mode.name()),
        Options::default(),
    )?;
    let report = m.keeping_artifacts(|m| measure_all(m, mode))?;
    m.save_transcript();
    drop(m);
    let (md, json) = render(&report, mode, t0.elapsed());
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let md_path = out_dir.join("latest.md");
    let json_path = out_dir.join("latest.json");
    std::fs::write(&md_path, &md).with_context(|| format!("writing {}", md_path.display()))?;
    std::fs::write(&json_path, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("writing {}", json_path.display()))?;
    println!("{md}");
    eprintln!(
        "bench: wrote {} and {} in {:.0}s",
        md_path.display(),
        json_path.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Writes bench/results/latest.{md,json} again from the raw figures in
/// latest.json, with today's summary code (after a change of a goal or a
/// row, without measuring again).
pub fn rerender() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("vm-tests has no parent directory")?;
    let out_dir = root.join("bench/results");
    let json_path = out_dir.join("latest.json");
    let text = std::fs::read_to_string(&json_path)
        .with_context(|| format!("reading {}", json_path.display()))?;
    let j: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not JSON", json_path.display()))?;
    let (report, mode) = from_json(&j)?;
    let took = std::time::Duration::from_secs_f64(j["took_secs"].as_f64().unwrap_or(0.0));
    let (md, json) = render(&report, mode, took);
    std::fs::write(out_dir.join("latest.md"), &md)?;
    std::fs::write(&json_path, serde_json::to_string_pretty(&json)? + "\n")?;
    eprintln!("bench: rendered {} again", json_path.display());
    Ok(())
}

/// Everything one run measured.
struct Report {
    machine: Value,
    runs: Vec<Run>,
    /// mixed.py's records, per queue mode and round.
    mixed: Value,
    control: Vec<Value>,
    recovery: Value,
    scaling: Value,
    /// Readings of cgipool-watch.service's main process (VmHWM, VmRSS).
    watch_rss: Vec<Value>,
}

fn measure_all(m: &mut Machine, mode: Mode) -> Result<Report> {
    prepare_guest(m)?;
    m.write_text(&format!("{GUEST_DIR}/measure.py"), MEASURE_PY)?;
    m.write_text(&format!("{GUEST_DIR}/recover.py"), RECOVER_PY)?;
    m.write_text(&format!("{GUEST_DIR}/scale.py"), SCALE_PY)?;
    m.write_text(&format!("{GUEST_DIR}/mixed.py"), MIXED_PY)?;
    let mut machine = machine_info(m)?;
    // The control plane first, on a quiet machine with no pool yet ("from
    // nothing"); it leaves no pool behind. The machine is thrown away after
    // the load runs, so no teardown under load is timed.
    eprintln!(
        "bench: control plane ({} workers, then {:?})",
        mode.workers, mode.more_sizes
    );
    let control = control_plane(m, mode)?;
    setup_data_path(m)?;
    eprintln!("bench: data path ({} s per run)", mode.secs);
    let cpu0 = cpu_usage(m)?;
    let wall0 = Instant::now();
    let runs = data_path(m, mode)?;
    let wall = wall0.elapsed().as_secs_f64();
    let cpu1 = cpu_usage(m)?;
    for i in 1..=TCP_PORTS.len() {
        m.succeed(&format!("systemctl stop bench-tcp-{i}.service"))?;
    }
    m.succeed("systemctl stop bench-fcgiwrap.service bench-php-fpm.service")?;
    eprintln!(
        "bench: mixed load (1 request in 20 takes 50 ms), shared queue vs a socket per worker"
    );
    let mixed = if mixed_load_on() {
        mixed(m, mode)?
    } else {
        Value::Null
    };
    let mut watch_rss = vec![watch_memory(m, "after the data path")?];
    machine["data_path_cpu_secs"] = json!({
        "wall_secs": wall,
        "units": CPU_UNITS.iter().zip(cpu0.iter().zip(cpu1.iter()))
            .map(|((name, _), (a, b))| json!({"what": name, "cpu_secs": (b - a).max(0.0)}))
            .collect::<Vec<_>>(),
    });
    eprintln!("bench: recovery (kill -9 under load)");
    let recovery = recovery(m, mode)?;
    eprintln!(
        "bench: scaling ({STEP_CONNS} conns for {} s on a pool of {STEP_MIN}..{STEP_MAX})",
        mode.step_secs
    );
    let scaling = scaling(m, mode)?;
    watch_rss.push(watch_memory(m, "after the scaling step")?);
    machine["loadavg_end"] = json!(m.succeed("cut -d' ' -f1-3 /proc/loadavg")?.trim());
    Ok(Report {
        machine,
        runs,
        mixed,
        control,
        recovery,
        scaling,
        watch_rss,
    })
}
