//! The summary table: its row (a figure next to its baseline, ratio and
//! goal) and verdict, and every row in the table's order. The data path's
//! rows are built in summary_data_path.rs, the control plane's in
//! summary_control.rs; the few of recovery and scaling here.
use super::setup::*;
use super::stats::*;
use super::summary_control::control_plane_rows;
use super::summary_data_path::data_path_rows;
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

/// Every row of the summary table, in its order: data path, control plane,
/// recovery, scaling.
pub(super) fn rows(rep: &Report, mode: Mode) -> Vec<Row> {
    let mut v = data_path_rows(rep);
    v.extend(control_plane_rows(rep, mode));
    v.extend(recovery_rows(rep));
    v.extend(scaling_rows(rep));
    v
}

/// The worker killed under load: how long until it answers again, and the
/// requests that failed meanwhile.
fn recovery_rows(rep: &Report) -> Vec<Row> {
    let mut v = Vec::new();
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
    v
}

/// The load step: how long watch took to scale the pool to its max and
/// back to its min (next to the least its steps and their delays allow),
/// and the requests that failed meanwhile.
fn scaling_rows(rep: &Report) -> Vec<Row> {
    let mut v = Vec::new();
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
