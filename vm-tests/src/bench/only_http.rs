//! `CGIPOOL_BENCH_ONLY=http make bench`: only the HTTP pool's rows of the
//! data path, to weigh nginx's keep-alive to a shared queue in a few
//! minutes instead of a full run.
//!
//! Boots the same nspawn container, applies the same 4-worker pool of the C
//! `search` worker as the full run (nginx keeps its connections to the
//! workers, the default) and two more pools of 4 (`keep`, and `nokeep`
//! with `keepalive = false`), starts the same 4 TCP workers, and runs wrk
//! on: nginx's `return 200` (the ceiling, the first row, which the ratios
//! divide by), the pool as `apply` writes it, `nokeep` (a connection per
//! request), and the 4 TCP workers with keep-alive. Interleaved rounds
//! (`CGIPOOL_BENCH_ROUNDS`, `CGIPOOL_BENCH_SECS`) at 16 and 64
//! connections. Then a mixed load (bench/guest/mixed.py: 16 clients, 1
//! request in 20 takes 50 ms) on `keep` and `nokeep`: the fast requests'
//! p99 is what a kept connection to a busy worker costs. Writes
//! target/bench-only/latest.md, never the committed report.
use super::only::{env_u32, measure_rows, render, Head, Row};
use super::runs::last_json;
use super::setup::*;
use crate::machine::{shell_quote, Env, Machine, Options, Tier};
use crate::scenarios::common::{apply, write_config};
use anyhow::{ensure, Result};
use std::time::{Duration, Instant};

/// Two more pools of 4 `search` workers, (name, `keepalive`), for the
/// mixed load; `nokeep` is also the row of a connection per request (the
/// knob that slows its `slow` requests is idle in the wrk rows).
const MIXED_HTTP: [(&str, bool); 2] = [("keep", true), ("nokeep", false)];

pub(super) fn run_http(env: &Env) -> Result<()> {
    let t0 = Instant::now();
    let secs = env_u32("CGIPOOL_BENCH_SECS", 5, 1..=120)?;
    let rounds = env_u32("CGIPOOL_BENCH_ROUNDS", 3, 1..=20)?;
    eprintln!("bench (only http: {rounds} rounds of {secs} s): booting an nspawn container");
    let mut m = Machine::start(env, Tier::Nspawn, "bench-only-http", Options::default())?;
    let (rows, runs, mixed) = m.keeping_artifacts(|m| {
        let rows = setup(m)?;
        let runs = measure_rows(m, &rows, secs, rounds)?;
        let mixed = mixed_load(m, secs, rounds)?;
        Ok((rows, runs, mixed))
    })?;
    m.save_transcript();
    drop(m);
    let head = Head {
        title: "only the HTTP pool's rows (CGIPOOL_BENCH_ONLY=http)",
        base: "ceiling",
        notes:
            "- the pool: 4 C `search` workers on a shared queue, with keep-alive (the default)\n",
        secs,
        rounds,
        took: t0.elapsed(),
    };
    let md = render(&head, &rows, &runs) + &mixed;
    super::only::write_report("latest.md", &md, t0)
}

/// The pool, the TCP workers and nginx's extra upstream; the rows, each
/// checked to answer from the workers it names.
fn setup(m: &mut Machine) -> Result<Vec<Row>> {
    prepare_guest(m)?;
    let mixed: String = MIXED_HTTP
        .iter()
        .map(|(pool, keepalive)| {
            format!(
                "\n[pool.{pool}]\nexec = \"{WORKER}\"\nroute = \"/{pool}\"\n\
                 min = {POOL_SIZE}\nmax = {POOL_SIZE}\nkeepalive = {keepalive}\n\
                 environment = {{ CGIPOOL_TEST_SLOW_MS = \"50\" }}\n"
            )
        })
        .collect();
    write_config(
        m,
        &(pool_config("search", "/api/search", POOL_SIZE, POOL_SIZE) + &mixed),
    )?;
    apply(m)?;
    let upstreams = m.succeed("cat /etc/nginx/conf.d/cgipool-upstreams.conf")?;
    ensure!(
        upstreams.contains("keepalive 16;"),
        "the pool's upstream has no keepalive:\n{upstreams}"
    );
    start_tcp_workers(m)?;
    m.write_text("/etc/nginx/conf.d/bench.conf", BENCH_NGINX)?;
    m.succeed("nginx -t -q && systemctl reload nginx")?;
    let rows = vec![
        Row::new(
            "ceiling",
            "nginx `return 200` (ceiling)",
            "http://127.0.0.1:8080/ceiling",
        ),
        Row::new(
            "pool",
            "nginx → cgipool pool (4 workers, keep-alive: the default)",
            &format!("http://127.0.0.1:80{SEARCH_PATH}"),
        ),
        Row::new(
            "per_request",
            "nginx → 4 more workers with `keepalive = false` (a connection per request)",
            &format!("http://127.0.0.1:80/nokeep{SEARCH_PATH}"),
        ),
        Row::new(
            "tcp_keepalive",
            "nginx → 4 TCP workers, keepalive",
            &format!("http://127.0.0.1:8081{SEARCH_PATH}"),
        ),
    ];
    for r in &rows {
        let url = r.answering(m)?;
        let want = match r.key.as_str() {
            "pool" => "X-Cgipool-Worker: search@",
            "per_request" => "X-Cgipool-Worker: nokeep@",
            "tcp_keepalive" => "X-Cgipool-Worker: tcp@",
            _ => "HTTP/1.1 200",
        };
        let head = m.succeed(&format!("curl -s -D - -o /dev/null {url}"))?;
        ensure!(
            head.contains(want),
            "{} ({}) is not answered as expected ({want}):\n{head}",
            r.key,
            r.url
        );
    }
    Ok(rows)
}

/// mixed.py on both mixed pools, interleaved rounds; a markdown section.
fn mixed_load(m: &mut Machine, secs: u32, rounds: u32) -> Result<String> {
    m.write_text(&format!("{GUEST_DIR}/mixed.py"), MIXED_PY)?;
    let mut md = String::from(
        "\n## Mixed load (16 clients, `Connection: close`, 1 request in 20 takes 50 ms)\n\n\
         | pool | round | fast p50 ms | fast p99 ms | slow p99 ms | requests | errors |\n\
         |---|---|---|---|---|---|---|\n",
    );
    let upstreams = m.succeed("cat /etc/nginx/conf.d/cgipool-upstreams.conf")?;
    for (pool, keepalive) in MIXED_HTTP {
        let row = Row::new(
            pool,
            pool,
            &format!("http://127.0.0.1:80/{pool}/api/search?q=x"),
        );
        let url = row.answering(m)?;
        let head = m.succeed(&format!("curl -s -D - -o /dev/null {url}"))?;
        ensure!(
            head.contains(&format!("X-Cgipool-Worker: {pool}@")),
            "{pool} is not answered by its workers:\n{head}"
        );
        let block = upstreams
            .split("upstream ")
            .find(|b| b.starts_with(&format!("cgipool_{pool} ")))
            .unwrap_or_default();
        ensure!(
            block.contains("keepalive 16;") == keepalive,
            "{pool}'s upstream does not match keepalive = {keepalive}:\n{block}"
        );
    }
    for round in 1..=rounds {
        for (pool, keepalive) in MIXED_HTTP {
            let url = format!("http://127.0.0.1:80/{pool}/api/search?q=mixed");
            let o = m.execute(
                &format!(
                    "python3 {GUEST_DIR}/mixed.py {} 16 {secs} 20",
                    shell_quote(&url)
                ),
                Duration::from_secs(u64::from(secs) + 60),
            )?;
            let v = last_json(&o, "mixed.py")?;
            ensure!(o.rc == 0, "mixed.py failed on {pool}: {v}\n{}", o.stderr);
            let errors = &v["errors"];
            eprintln!(
                "  {pool} (keepalive = {keepalive}) round {round}: fast p99 {} ms, slow p99 {} ms, errors {errors}",
                v["fast"]["p99_ms"], v["slow"]["p99_ms"]
            );
            md += &format!(
                "| {pool} (`keepalive = {keepalive}`) | {round} | {} | {} | {} | {} | {errors} |\n",
                v["fast"]["p50_ms"],
                v["fast"]["p99_ms"],
                v["slow"]["p99_ms"],
                v["fast"]["count"].as_u64().unwrap_or(0) + v["slow"]["count"].as_u64().unwrap_or(0),
            );
        }
    }
    Ok(md)
}
