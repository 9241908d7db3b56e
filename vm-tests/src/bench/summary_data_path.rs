//! The summary's data-path rows: the HTTP pool against nginx's `return 200`
//! and the proof of concept's TCP layouts, the CGI pool against fcgiwrap,
//! the PHP pool against php-fpm (req/s, p99 and errors at each connection
//! count), and the mixed load's shared queue against a socket per worker.
use super::stats::*;
use super::summary::Row;
use super::*;

/// The data path's rows, in the table's order: HTTP, CGI and PHP at each
/// connection count, then the mixed load.
pub(super) fn data_path_rows(rep: &Report) -> Vec<Row> {
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
    v
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
