//! Statistics over the runs: rates, means, medians, failed requests.
use serde_json::Value;

/// One wrk run.
pub(super) struct Run {
    pub(super) target: &'static str,
    pub(super) conns: u32,
    pub(super) rep: u32,
    pub(super) wrk: Value,
}

impl Run {
    pub(super) fn rps(&self) -> f64 {
        let req = self.wrk["requests"].as_f64().unwrap_or(0.0);
        let us = self.wrk["duration_us"].as_f64().unwrap_or(0.0);
        if us > 0.0 {
            req / (us / 1e6)
        } else {
            0.0
        }
    }
    pub(super) fn num(&self, k: &str) -> f64 {
        self.wrk[k].as_f64().unwrap_or(0.0)
    }
    pub(super) fn errors(&self) -> u64 {
        wrk_errors(&self.wrk)
    }
}

/// Failed requests in a report.lua record: connect, read, write and
/// timeout errors, and non-2xx/3xx statuses.
pub(super) fn wrk_errors(w: &Value) -> u64 {
    ["connect", "read", "write", "status", "timeout"]
        .iter()
        .map(|k| w[*k].as_u64().unwrap_or(0))
        .sum()
}

/// The steps watch takes from `from` to `to`: doubling up (capped at max),
/// halving down (rounded up, floored at min), as src/watch/scaler.rs does.
pub(super) fn scale_steps(from: u32, to: u32) -> u32 {
    let (mut n, mut k) = (from, 0);
    while n != to && k < 32 {
        n = if n < to {
            (n.max(1) * 2).min(to)
        } else {
            n.div_ceil(2).max(to)
        };
        k += 1;
    }
    k
}

pub(super) fn secs(v: &Value) -> f64 {
    v["secs"].as_f64().unwrap_or(f64::NAN)
}

pub(super) fn nochange_secs(v: &Value) -> Vec<f64> {
    v.as_array()
        .map(|a| a.iter().map(secs).collect())
        .unwrap_or_default()
}

pub(super) fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let k = v.len();
    if k % 2 == 1 {
        v[k / 2]
    } else {
        (v[k / 2 - 1] + v[k / 2]) / 2.0
    }
}

pub(super) fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// Per (target, connections): the mean over the rounds.
pub(super) struct Agg {
    pub(super) rps: f64,
    pub(super) p50_ms: f64,
    pub(super) p99_ms: f64,
    pub(super) errors: u64,
    pub(super) per_round: Vec<f64>,
}

pub(super) fn aggregate(runs: &[Run], target: &str, conns: u32) -> Option<Agg> {
    let rs: Vec<&Run> = runs
        .iter()
        .filter(|r| r.target == target && r.conns == conns)
        .collect();
    if rs.is_empty() {
        return None;
    }
    let per_round: Vec<f64> = rs.iter().map(|r| r.rps()).collect();
    Some(Agg {
        rps: mean(&per_round),
        p50_ms: mean(
            &rs.iter()
                .map(|r| r.num("p50_us") / 1000.0)
                .collect::<Vec<_>>(),
        ),
        p99_ms: mean(
            &rs.iter()
                .map(|r| r.num("p99_us") / 1000.0)
                .collect::<Vec<_>>(),
        ),
        errors: rs.iter().map(|r| r.errors()).sum(),
        per_round,
    })
}
