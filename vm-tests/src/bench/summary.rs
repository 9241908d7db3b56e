//! The summary table: every figure next to its baseline, ratio and goal.
use super::setup::*;
use super::stats::*;
use super::*;

/// One line of the summary table.
pub(super) struct Row {
    pub(super) section: &'static str,
    pub(super) figure: String,
    pub(super) value: Option<f64>,
    pub(super) shown: String,
    pub(super) baseline: String,
    pub(super) baseline_value: Option<f64>,
    pub(super) ratio: Option<f64>,
    pub(super) goal: String,
    pub(super) pass: Option<bool>,
    /// Whether a stretch goal (past `goal`) was met, where there is one.
    pub(super) stretch: Option<bool>,
}

const CP: &str = "control plane";
pub(super) const INFO: &str = "— (info)";

impl Row {
    /// A figure next to a baseline from the same run, with their ratio;
    /// `goal` is its text and whether the ratio meets it.
    pub(super) fn vs(
        section: &'static str,
        figure: String,
        (value, shown): (f64, String),
        (base, base_shown): (f64, String),
        goal: Option<(&str, bool)>,
    ) -> Row {
        Row {
            section,
            figure,
            value: Some(value),
            shown,
            baseline: base_shown,
            baseline_value: Some(base),
            ratio: Some(value / base),
            goal: goal.map_or(INFO, |(g, _)| g).into(),
            pass: goal.map(|(_, ok)| ok),
            stretch: None,
        }
    }

    /// A figure without a baseline, for information.
    pub(super) fn info(section: &'static str, figure: String, value: f64, shown: String) -> Row {
        Row {
            section,
            figure,
            value: Some(value),
            shown,
            baseline: "—".into(),
            baseline_value: None,
            ratio: None,
            goal: INFO.into(),
            pass: None,
            stretch: None,
        }
    }

    /// A count of failed requests (next to a baseline's, if there is one);
    /// with `must_be_zero` anything but 0 fails.
    pub(super) fn failures(
        section: &'static str,
        figure: String,
        n: u64,
        base: Option<(u64, String)>,
        must_be_zero: bool,
    ) -> Row {
        let (baseline_value, baseline) = match base {
            Some((b, shown)) => (Some(b as f64), shown),
            None => (None, "—".into()),
        };
        Row {
            section,
            figure,
            value: Some(n as f64),
            shown: n.to_string(),
            baseline,
            baseline_value,
            ratio: None,
            goal: if must_be_zero { "0" } else { INFO }.into(),
            pass: must_be_zero.then_some(n == 0),
            stretch: None,
        }
    }
}

/// The mixed load: the fast requests' p99 with the shared queue against a
/// socket per worker (mean over rounds), and every failure of either.
fn mixed_rows(rep: &Report) -> Vec<Row> {
    let mut v = Vec::new();
    let Some(runs) = rep.mixed.as_array() else {
        return v;
    };
    let of = |queue: &str| -> Vec<&Value> { runs.iter().filter(|r| r["queue"] == queue).collect() };
    let (shared, per_worker) = (of("shared"), of("per-worker"));
    let p99 = |rs: &[&Value]| {
        mean(
            &rs.iter()
                .filter_map(|r| r["fast"]["p99_ms"].as_f64())
                .collect::<Vec<_>>(),
        )
    };
    let (a, b) = (p99(&shared), p99(&per_worker));
    if a.is_finite() && b.is_finite() {
        v.push(Row::vs(
            "data path",
            "fast requests' p99, mixed load (1 in 20 takes 50 ms, 16 conns): shared queue vs a socket per worker".into(),
            (a, format!("{a:.2} ms")),
            (b, format!("{b:.2} ms (per-worker sockets)")),
            None,
        ));
    }
    let failed = |rs: &[&Value]| -> u64 {
        rs.iter()
            .map(|r| {
                r["errors"]["status"].as_u64().unwrap_or(0)
                    + r["errors"]["socket"].as_u64().unwrap_or(0)
            })
            .sum()
    };
    if !shared.is_empty() {
        v.push(Row::failures(
            "data path",
            "mixed load errors, shared queue (all rounds)".into(),
            failed(&shared),
            Some((
                failed(&per_worker),
                format!("{} (per-worker)", failed(&per_worker)),
            )),
            true,
        ));
    }
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

pub(super) fn rows(rep: &Report, mode: Mode) -> Vec<Row> {
    let mut v = Vec::new();
    let dp = "data path";
    let rps = |a: &Agg| format!("{:.0}", a.rps);
    for conns in CONNS {
        let get = |k: &str| aggregate(&rep.runs, k, conns);
        let (pool, ceil, tcp, tcpk) = (
            get("pool"),
            get("ceiling"),
            get("tcp"),
            get("tcp_keepalive"),
        );
        if let (Some(p), Some(c)) = (&pool, &ceil) {
            // The goal is for 16 connections; 64 is for information.
            let goal = (conns == 16).then_some(("≥ 0.40", p.rps / c.rps >= 0.40));
            v.push(Row::vs(
                dp,
                format!("pool req/s, {conns} conns, vs nginx `return 200`"),
                (p.rps, rps(p)),
                (c.rps, rps(c)),
                goal,
            ));
        }
        if let (Some(p), Some(t)) = (&pool, &tcp) {
            v.push(Row::vs(
                dp,
                format!("pool req/s, {conns} conns, vs PoC TCP layout"),
                (p.rps, rps(p)),
                (t.rps, rps(t)),
                Some(("≥ 1.2", p.rps / t.rps >= 1.2)),
            ));
        }
        if let (Some(p), Some(t)) = (&pool, &tcpk) {
            v.push(Row::vs(
                dp,
                format!("pool req/s, {conns} conns, vs TCP + keepalive"),
                (p.rps, rps(p)),
                (t.rps, rps(t)),
                // Issue 16: at least as fast as the four TCP keep-alive workers.
                (conns == 16).then_some(("≥ 1.0", p.rps / t.rps >= 1.0)),
            ));
        }
        if let Some(p) = &pool {
            v.push(Row::failures(
                dp,
                format!("pool errors, {conns} conns (all rounds)"),
                p.errors,
                None,
                true,
            ));
        }
    }
    for conns in CONNS {
        let (cgi, fcgi) = (
            aggregate(&rep.runs, "pool_cgi", conns),
            aggregate(&rep.runs, "fcgiwrap", conns),
        );
        let (Some(c), Some(f)) = (cgi, fcgi) else {
            continue;
        };
        let ratio = c.rps / f.rps;
        let mut row = Row::vs(
            dp,
            format!("cgipool-cgi req/s, {conns} conns, vs fcgiwrap (-c 4)"),
            (c.rps, rps(&c)),
            (f.rps, rps(&f)),
            // Issue 16's goal (issue 9's was 1.0).
            Some(("≥ 1.3", ratio >= 1.3)),
        );
        row.stretch = None;
        v.push(row);
        let ms = |x: f64| format!("{x:.2} ms");
        v.push(Row::vs(
            dp,
            format!("cgipool-cgi p99, {conns} conns, vs fcgiwrap (-c 4)"),
            (c.p99_ms, ms(c.p99_ms)),
            (f.p99_ms, ms(f.p99_ms)),
            Some(("≤ 1.0", c.p99_ms / f.p99_ms <= 1.0)),
        ));
        v.push(Row::failures(
            dp,
            format!("cgipool-cgi errors, {conns} conns (all rounds)"),
            c.errors,
            Some((f.errors, format!("{} (fcgiwrap)", f.errors))),
            true,
        ));
    }
    for conns in CONNS {
        let (php, fpm) = (
            aggregate(&rep.runs, "pool_php", conns),
            aggregate(&rep.runs, "php_fpm", conns),
        );
        let (Some(c), Some(f)) = (php, fpm) else {
            continue;
        };
        v.push(Row::vs(
            dp,
            format!("cgipool-php req/s, {conns} conns, vs php-fpm (static, 4)"),
            (c.rps, rps(&c)),
            (f.rps, rps(&f)),
            Some(("≥ 1.0", c.rps / f.rps >= 1.0)),
        ));
        let ms = |x: f64| format!("{x:.2} ms");
        v.push(Row::vs(
            dp,
            format!("cgipool-php p99, {conns} conns, vs php-fpm (static, 4)"),
            (c.p99_ms, ms(c.p99_ms)),
            (f.p99_ms, ms(f.p99_ms)),
            Some(("≤ 1.2", c.p99_ms / f.p99_ms <= 1.2)),
        ));
        v.push(Row::failures(
            dp,
            format!("cgipool-php errors, {conns} conns (all rounds)"),
            c.errors,
            Some((f.errors, format!("{} (php-fpm)", f.errors))),
            true,
        ));
    }
    v.extend(mixed_rows(rep));
    v.extend(control_rows(rep, mode));
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
    let rc = "recovery";
    let kill = &rep.recovery["kill"];
    let ans = kill["secs_to_answer"].as_f64().unwrap_or(f64::NAN);
    v.push(Row::info(
        rc,
        "kill -9 of a worker under load: until it is active and its pool's socket answers".into(),
        ans,
        format!("{:.0} ms", ans * 1000.0),
    ));
    let w = &rep.recovery["wrk"];
    v.push(Row::failures(
        rc,
        format!(
            "failed requests during the kill ({} requests, 16 conns)",
            w["requests"].as_u64().unwrap_or(0)
        ),
        wrk_errors(w),
        None,
        true,
    ));
    let sc = "scaling";
    let step = &rep.scaling["step"];
    let up_base = f64::from(scale_steps(STEP_MIN, STEP_MAX)) * STEP_UP_AFTER_SECS;
    let down_base = f64::from(scale_steps(STEP_MAX, STEP_MIN)) * STEP_DOWN_AFTER_SECS;
    let timed_row =
        |figure: String, got: Option<f64>, missing: String, base: f64, why: String| Row {
            section: sc,
            figure,
            value: got,
            shown: got.map_or(missing, |x| format!("{x:.1} s")),
            baseline: format!("{base:.1} s ({why})"),
            baseline_value: Some(base),
            ratio: got.map(|x| x / base),
            goal: INFO.into(),
            pass: None,
            stretch: None,
        };
    v.push(timed_row(
        format!(
            "load step ({STEP_CONNS} conns, 20 ms/request) → pool at max ({STEP_MIN} → {STEP_MAX})"
        ),
        step["secs_to_max"].as_f64(),
        format!(
            "not reached in {} s of load",
            rep.scaling["load_secs"].as_u64().unwrap_or(0)
        ),
        up_base,
        format!(
            "{} × scale_up_after = {STEP_UP_AFTER_SECS}s",
            scale_steps(STEP_MIN, STEP_MAX)
        ),
    ));
    v.push(timed_row(
        format!("end of the load → pool back at min ({STEP_MAX} → {STEP_MIN})"),
        step["secs_back_to_min"].as_f64(),
        if step["left_min"].as_bool() == Some(false) {
            "n/a (never scaled up)".into()
        } else {
            format!(
                "not back within {} s",
                rep.scaling["down_limit_secs"].as_f64().unwrap_or(0.0)
            )
        },
        down_base,
        format!(
            "{} × scale_down_after = {STEP_DOWN_AFTER_SECS}s",
            scale_steps(STEP_MAX, STEP_MIN)
        ),
    ));
    let w = &rep.scaling["wrk"];
    v.push(Row::failures(
        sc,
        format!(
            "failed requests during the load step ({} requests)",
            w["requests"].as_u64().unwrap_or(0)
        ),
        wrk_errors(w),
        None,
        false,
    ));
    v
}

pub(super) fn verdict(r: &Row) -> &'static str {
    match (r.pass, r.stretch) {
        (Some(true), Some(true)) => "pass (stretch met)",
        (Some(true), Some(false)) => "pass (stretch not met)",
        (Some(true), None) => "pass",
        (Some(false), _) => "FAIL",
        (None, _) => "—",
    }
}
