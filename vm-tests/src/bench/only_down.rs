//! `CGIPOOL_BENCH_ONLY=down make bench`: only `cgipool down` of N workers
//! (`CGIPOOL_BENCH_WORKERS`, 100 by default) against a batched
//! `systemctl stop` of the same units, `CGIPOOL_BENCH_ROUNDS` times (5 by
//! default), to iterate on the control plane's teardown in a few minutes.
//!
//! Each round is the full run's `size_round` (apply 0 → N, a batched stop
//! and start, then `cgipool down`); a last round runs `cgipool down` with
//! every line of its output stamped with the seconds since it started, to
//! show where the time goes. Prints the per-round figures and their medians;
//! writes target/bench-only/down.md, never the committed report.
use super::control::{cp_config, size_round, wait_active_within_default};
use super::only::env_u32;
use super::report::fmt_secs;
use super::runs::measure;
use super::setup::*;
use super::stats::{median, secs};
use super::Mode;
use crate::machine::{Env, Machine, Options, Tier};
use crate::scenarios::common::{write_config, CONFIG};
use anyhow::Result;
use std::fmt::Write as _;
use std::time::Instant;

/// Stamps every line on stdin with the seconds since the script started.
const STAMP_PY: &str = "import sys,time\nt0=time.monotonic()\nfor l in sys.stdin:\n    print(f'{time.monotonic()-t0:7.3f} {l}', end='', flush=True)\n";

pub(super) fn run_down(env: &Env) -> Result<()> {
    let t0 = Instant::now();
    let n = env_u32("CGIPOOL_BENCH_WORKERS", 100, 2..=1000)?;
    let rounds = env_u32("CGIPOOL_BENCH_ROUNDS", 5, 1..=20)?;
    eprintln!("bench (only down: {rounds} rounds at {n} workers): booting an nspawn container");
    let mut m = Machine::start(env, Tier::Nspawn, "bench-only-down", Options::default())?;
    let md = m.keeping_artifacts(|m| measure_down(m, n, rounds))?;
    m.save_transcript();
    drop(m);
    super::only::write_report("down.md", &md, t0)
}

fn measure_down(m: &mut Machine, n: u32, rounds: u32) -> Result<String> {
    prepare_guest(m)?;
    m.write_text(&format!("{GUEST_DIR}/measure.py"), MEASURE_PY)?;
    m.write_text(&format!("{GUEST_DIR}/stamp.py"), STAMP_PY)?;
    let mode = Mode {
        quick_reps: 1,
        ..Mode::defaults(false)
    };
    let mut md = format!(
        "# cgipool bench: only down (CGIPOOL_BENCH_ONLY=down), {n} workers\n\n\
         load average at the start: {}\n\n\
         | round | cgipool down (s) | batched systemctl stop (s) | ratio |\n|---|---|---|---|\n",
        m.succeed("cut -d' ' -f1-3 /proc/loadavg")?.trim()
    );
    let mut ratios = Vec::new();
    for round in 1..=rounds {
        let r = size_round(m, mode, n)?;
        let (down, stop) = (secs(&r["down"]), secs(&r["stop_all_batched"]));
        let ratio = down / stop;
        ratios.push(ratio);
        let _ = writeln!(
            md,
            "| {round} | {} | {} | {ratio:.2} |",
            fmt_secs(&r["down"]),
            fmt_secs(&r["stop_all_batched"])
        );
    }
    let _ = writeln!(
        md,
        "\nmedian ratio {:.2}, worst {:.2}; load average at the end: {}\n",
        median(ratios.clone()),
        ratios.iter().cloned().fold(0.0, f64::max),
        m.succeed("cut -d' ' -f1-3 /proc/loadavg")?.trim()
    );
    // Another way to stop the same units: the pool's target, whose stop
    // propagates to every worker (PartOf=) in one transaction.
    let mut target_stops = Vec::new();
    for _ in 0..3 {
        write_config(m, &cp_config(n))?;
        measure(m, &format!("exec cgipool apply {CONFIG}"))?;
        wait_active_within_default(m, n)?;
        let t = measure(m, "exec systemctl stop cgipool-cp.target")?;
        m.wait_until_succeeds(
            "test -z \"$(systemctl list-units --no-legend --plain --state=active,activating,deactivating 'cgipool-cp@*')\"",
            "every worker to stop after its target",
            std::time::Duration::from_secs(60),
        )?;
        target_stops.push(fmt_secs(&t));
        m.succeed(&format!("cgipool down {CONFIG}"))?;
    }
    let _ = writeln!(
        md,
        "`systemctl stop cgipool-cp.target` (s): {}\n",
        target_stops.join(", ")
    );
    // The fixed parts of a down, one by one.
    write_config(m, &cp_config(n))?;
    measure(m, &format!("exec cgipool apply {CONFIG}"))?;
    wait_active_within_default(m, n)?;
    for (what, cmd) in [
        ("systemctl reload nginx", "exec systemctl reload nginx"),
        (
            "kill -HUP nginx's main PID",
            "exec systemctl kill -s HUP --kill-whom=main nginx",
        ),
        ("nginx -t", "exec nginx -t -q"),
        (
            "daemon-reload, workers active",
            "exec systemctl daemon-reload",
        ),
    ] {
        let mut t = Vec::new();
        for _ in 0..3 {
            t.push(fmt_secs(&measure(m, cmd)?));
        }
        let _ = writeln!(md, "{what} (s): {}\n", t.join(", "));
    }
    m.succeed("systemctl stop 'cgipool-cp@*'")?;
    let mut t = Vec::new();
    for _ in 0..3 {
        t.push(fmt_secs(&measure(m, "exec systemctl daemon-reload")?));
    }
    let _ = writeln!(md, "daemon-reload, workers stopped (s): {}\n", t.join(", "));
    m.succeed(&format!("cgipool down {CONFIG}"))?;
    // Where the time goes: one more down, its output stamped.
    write_config(m, &cp_config(n))?;
    measure(m, &format!("exec cgipool apply {CONFIG}"))?;
    wait_active_within_default(m, n)?;
    let stamped = m.succeed(&format!(
        "cgipool down {CONFIG} 2>&1 | python3 {GUEST_DIR}/stamp.py"
    ))?;
    let _ = write!(
        md,
        "One more down, stamped:\n\n```\n{}\n```\n",
        stamped.trim_end()
    );
    Ok(md)
}
