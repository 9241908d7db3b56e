//! The summary's control-plane rows: `cgipool apply` (0 → N, N → 1, no
//! change) and `cgipool down` next to systemctl doing the same to the same
//! units, at every size measured; how apply's time grows with N; the peak
//! memory of `cgipool apply` and `cgipool watch`.
use super::stats::*;
use super::summary::{Row, INFO};
use super::*;

const CP: &str = "control plane";

/// The control plane's rows, in the table's order: the figures at
/// `mode.workers`, those of the further sizes, then peak memory.
pub(super) fn control_plane_rows(rep: &Report, mode: Mode) -> Vec<Row> {
    let mut v = control_rows(rep, mode);
    v.extend(memory_rows(rep));
    v
}

/// The control plane's rows at `mode.workers` (every figure, median over
/// the rounds), then 0 → N and N → 0 at every further size, and how both
/// grow.
fn control_rows(rep: &Report, mode: Mode) -> Vec<Row> {
    let mut v = Vec::new();
    let n = mode.workers;
    let rounds: Vec<&Value> = rep
        .control
        .iter()
        .filter(|r| r["workers"].as_u64() == Some(u64::from(n)))
        .collect();
    let n = mode.workers;
    let med = |k: &str| median(rounds.iter().map(|r| secs(&r[k])).collect());
    let medl = |k: &str| median(rounds.iter().flat_map(|r| nochange_secs(&r[k])).collect());
    let up = med("apply_up");
    let start_b = med("start_batched");
    let start_l = med("start_loop");
    let down = med("apply_down");
    let stop_b = med("stop_batched");
    let noch = medl("apply_nochange");
    let show = medl("show_batched");
    // Why an apply failed in some round, if it did (one line, table-safe).
    let failed_of = |key: &str| -> Option<String> {
        rounds
            .iter()
            .find(|r| r[key].is_object() && r[key]["rc"].as_i64() != Some(0))
            .map(|r| {
                let err = r[key]["stderr_tail"].as_str().unwrap_or("");
                let line = err
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    // nginx's "2026/01/01 00:00:00 [crit] 141#141: " prefix
                    .map(|l| match l.find("] ") {
                        Some(i) if l.starts_with(|c: char| c.is_ascii_digit()) => {
                            let rest = &l[i + 2..];
                            rest.find(": ").map_or(rest, |j| &rest[j + 2..])
                        }
                        _ => l,
                    })
                    .collect::<Vec<_>>()
                    .join(" / ")
                    .replace('|', "\\|");
                let mut short: String = line.chars().take(220).collect();
                if short.len() < line.len() {
                    short.truncate(short.rfind(' ').unwrap_or(short.len()));
                    short.push_str(" …");
                }
                format!("FAILED (exit {}): {short}", r[key]["rc"])
            })
    };
    let up_failed = failed_of("apply_up");
    let down_failed = failed_of("apply_down");
    let time_row = |figure: String,
                    a: f64,
                    failed: Option<&str>,
                    base_label: &str,
                    b: f64,
                    goal: Option<f64>| {
        let goal_s = goal.map_or(INFO.into(), |g| format!("≤ {g}"));
        let baseline = format!("{b:.3} s ({base_label})");
        match failed {
            Some(why) => Row {
                section: CP,
                figure,
                value: None,
                shown: why.to_string(),
                baseline,
                baseline_value: Some(b),
                ratio: None,
                goal: goal_s,
                pass: goal.map(|_| false),
                stretch: None,
            },
            None => Row {
                section: CP,
                figure,
                value: Some(a),
                shown: format!("{a:.3} s"),
                baseline,
                baseline_value: Some(b),
                ratio: Some(a / b),
                goal: goal_s,
                pass: goal.map(|g| a / b <= g),
                stretch: None,
            },
        }
    };
    let not_run = up_failed
        .as_ref()
        .map(|_| format!("not measured: apply 0 → {n} failed"));
    v.push(time_row(
        format!("`cgipool apply` 0 → {n} workers"),
        up,
        up_failed.as_deref(),
        &format!("one batched `systemctl start` of {n}"),
        start_b,
        Some(1.5),
    ));
    v.push(time_row(
        format!("`cgipool apply` 0 → {n} workers"),
        up,
        up_failed.as_deref(),
        &format!("loop of {n} `systemctl start`"),
        start_l,
        None,
    ));
    let mut down_row = time_row(
        format!("`cgipool apply` {n} → 1 workers"),
        down,
        not_run.as_deref().or(down_failed.as_deref()),
        &format!("one batched `systemctl stop` of {}", n - 1),
        stop_b,
        None,
    );
    let mut noch_row = time_row(
        format!("no-change `cgipool apply`, {n} workers"),
        noch,
        not_run.as_deref(),
        &format!("one batched `systemctl show` of {} units", 2 * n),
        show,
        Some(3.0),
    );
    if not_run.is_some() {
        // Not measurable is not a verdict on the figure itself.
        down_row.pass = None;
        noch_row.pass = None;
    }
    v.push(down_row);
    v.push(noch_row);
    v.extend(size_rows(rep, n));
    v
}

/// A figure's time next to a baseline's; a failed command (its measure.py
/// record) is shown as such and fails the goal.
fn time_vs(figure: String, a: &Value, base: &Value, base_label: &str, goal: f64) -> Row {
    let failed = |v: &Value| v["rc"].as_i64() != Some(0);
    let (av, bv) = (secs(a), secs(base));
    let goal_s = format!("≤ {goal}");
    let shown_b = if failed(base) {
        format!("failed (exit {}) ({base_label})", base["rc"])
    } else {
        format!("{bv:.3} s ({base_label})")
    };
    let ok = !failed(a) && !failed(base);
    // A failed baseline leaves no ratio and no verdict (the figure itself
    // still says whether cgipool did the work).
    let pass = if failed(base) {
        None
    } else {
        Some(ok && av / bv <= goal)
    };
    Row {
        section: CP,
        figure,
        value: (!failed(a)).then_some(av),
        shown: if failed(a) {
            format!("FAILED (exit {})", a["rc"])
        } else {
            format!("{av:.3} s")
        },
        baseline: shown_b,
        baseline_value: (!failed(base)).then_some(bv),
        ratio: ok.then_some(av / bv),
        goal: goal_s,
        pass,
        stretch: None,
    }
}

/// Rows of the rounds at sizes other than `first`: apply 0 → N against a
/// batched `systemctl start`, `cgipool down` N → 0 against a batched
/// `systemctl stop` of the same 2N units, the no-change apply; then how
/// apply and its baseline grew from the smallest size to the largest.
fn size_rows(rep: &Report, first: u32) -> Vec<Row> {
    let mut v = Vec::new();
    let sized: Vec<&Value> = rep
        .control
        .iter()
        .filter(|r| r["down"].is_object())
        .collect();
    for r in &sized {
        let n = r["workers"].as_u64().unwrap_or(0);
        // At the first size the full rounds' rows say the rest.
        let again = n == u64::from(first);
        if !again {
            v.push(time_vs(
                format!("`cgipool apply` 0 → {n} workers"),
                &r["apply_up"],
                &r["start_batched"],
                &format!("one batched `systemctl start` of {n}"),
                1.5,
            ));
        }
        v.push(time_vs(
            format!("`cgipool down` {n} → 0 workers"),
            &r["down"],
            &r["stop_all_batched"],
            &format!("one batched `systemctl stop` of {} units", 2 * n),
            1.5,
        ));
        let noch = median(nochange_secs(&r["apply_nochange"]));
        let show = median(nochange_secs(&r["show_batched"]));
        if noch.is_finite() && show.is_finite() && !again {
            v.push(Row::vs(
                CP,
                format!("no-change `cgipool apply`, {n} workers"),
                (noch, format!("{noch:.3} s")),
                (
                    show,
                    format!(
                        "{show:.3} s (one batched `systemctl show` of {} units)",
                        2 * n
                    ),
                ),
                Some(("≤ 3", noch / show <= 3.0)),
            ));
        }
    }
    // Growth: from the smallest size measured (the first rounds) to the
    // largest, apply's time against the batched start's.
    let at = |n: u64, key: &str| -> f64 {
        median(
            rep.control
                .iter()
                .filter(|r| r["workers"].as_u64() == Some(n) && r[key]["rc"].as_i64() == Some(0))
                .map(|r| secs(&r[key]))
                .collect(),
        )
    };
    // The largest size where both apply and the batched start did the job.
    let largest = sized
        .iter()
        .filter(|r| {
            r["apply_up"]["rc"].as_i64() == Some(0) && r["start_batched"]["rc"].as_i64() == Some(0)
        })
        .filter_map(|r| r["workers"].as_u64())
        .max();
    if let Some(big) = largest {
        let small = u64::from(first);
        let apply_growth = at(big, "apply_up") / at(small, "apply_up");
        let base_growth = at(big, "start_batched") / at(small, "start_batched");
        if apply_growth.is_finite() && base_growth.is_finite() {
            v.push(Row::vs(
                CP,
                format!("growth of `cgipool apply` 0 → N from {small} to {big} workers"),
                (apply_growth, format!("× {apply_growth:.2}")),
                (
                    base_growth,
                    format!("× {base_growth:.2} (batched `systemctl start`)"),
                ),
                Some((
                    "≤ 1.1 (no faster, ±10 % noise)",
                    apply_growth / base_growth <= 1.1,
                )),
            ));
        }
    }
    v
}

/// The peak RSS of `cgipool apply` (over every apply measured) and of
/// `cgipool watch` (its largest reading).
fn memory_rows(rep: &Report) -> Vec<Row> {
    let mut v = Vec::new();
    let rss = rep
        .control
        .iter()
        .flat_map(|r| {
            [&r["apply_up"], &r["apply_down"]]
                .into_iter()
                .chain(r["apply_nochange"].as_array().into_iter().flatten())
                .map(|v| v["peak_rss_kb"].as_f64().unwrap_or(0.0))
                .collect::<Vec<_>>()
        })
        .fold(0.0, f64::max);
    v.push(Row::info(
        CP,
        "peak RSS of `cgipool apply` (VmHWM)".into(),
        rss,
        format!("{:.1} MiB", rss / 1024.0),
    ));
    // The largest reading of watch's VmHWM (the same process unless systemd
    // restarted it; then the readings say so).
    if let Some(w) = rep
        .watch_rss
        .iter()
        .max_by_key(|w| w["vmhwm_kb"].as_u64().unwrap_or(0))
    {
        let kb = w["vmhwm_kb"].as_f64().unwrap_or(f64::NAN);
        v.push(Row::info(
            CP,
            format!(
                "peak RSS of `cgipool watch` (VmHWM, {} s running, {})",
                w["running_secs"],
                w["when"].as_str().unwrap_or("?")
            ),
            kb,
            format!("{:.1} MiB", kb / 1024.0),
        ));
    }
    v
}
