//! watch on PHP pools (issue 17): a shared queue's probe, whose FastCGI
//! answer names no worker, is blamed on the worker holding its connection;
//! a php-cgi pool scales up under load and back down when idle, without a
//! failed request.
use super::common::write_config;
use super::edge::Load;
use super::fastcgi::{apply_and_route, install_php, php_pool};
use crate::machine::Machine;
use crate::Scenario;
use anyhow::{ensure, Context, Result};
use std::time::{Duration, Instant};

pub fn scenarios() -> Vec<Scenario> {
    let s = Scenario::nspawn;
    vec![
        s(
            "fastcgi_php_shared_probe_names_the_worker",
            php_shared_probe_names_the_worker,
        ),
        s("fastcgi_php_autoscale_under_load", php_autoscale_under_load),
    ]
}

/// On a shared queue php-cgi's answer names no worker: a probe one worker
/// takes and never answers is counted against that worker (the one holding
/// the probe's connection), once per interval while it holds it, and
/// systemd restarts it; the other worker is left alone.
fn php_shared_probe_names_the_worker(m: &mut Machine) -> Result<()> {
    install_php(m)?;
    write_config(
        m,
        &php_pool(
            "php",
            "/php",
            "min = 2\nmax = 2\nqueue = \"shared\"\nhealth_path = \"/health.php\"\nhealth_interval = \"1s\"\nhealth_timeout = \"1s\"\nunhealthy_after = 3",
        ),
    )?;
    apply_and_route(m, "http://127.0.0.1/php/hello.php")?;
    let hung = m.main_pid("cgipool-php@1.service")?;
    let other = m.main_pid("cgipool-php@2.service")?;
    // php@1's process hangs on the probe once it takes one (the kernel
    // hands the pool's connections to its two idle workers in turn).
    m.succeed(&format!("touch /srv/php-hang-{hung}"))?;
    m.wait_until_succeeds(
        "journalctl -u cgipool-watch -o cat | grep -q 'cgipool-php@1.service: unhealthy; restarting it'",
        "watch to restart the worker that hangs on the probe",
        Duration::from_secs(30),
    )?;
    let journal = m.journal("cgipool-watch.service")?;
    for want in [
        "cgipool-php@1.service: probe /health.php through the pool socket failed (this worker took it: it holds the probe's connection) (1/3): no answer within 1000ms",
        "cgipool-php@1.service: probe /health.php through the pool socket failed (3/3): it still holds the probe it took",
    ] {
        ensure!(journal.contains(want), "watch did not log {want:?}:\n{journal}");
    }
    for line in journal
        .lines()
        .filter(|l| l.contains("cgipool-php@1.service"))
    {
        println!("fastcgi shared probe: {line}");
    }
    for unwanted in ["cgipool-php@2.service: probe", "pool php: probe"] {
        ensure!(
            !journal.contains(unwanted),
            "a probe failed against the healthy worker or the pool ({unwanted:?}):\n{journal}"
        );
    }
    m.wait_until_succeeds(
        &format!(
            "systemctl is-active -q cgipool-php@1.service && test \"$(systemctl show -P MainPID cgipool-php@1.service)\" != {hung}"
        ),
        "php@1 to run a fresh process",
        Duration::from_secs(15),
    )?;
    ensure!(
        m.main_pid("cgipool-php@2.service")? == other,
        "the healthy worker php@2 was restarted too"
    );
    // Both serve again; the fresh php@1 passes its probes.
    m.wait_until_succeeds(
        "for i in 1 2 3 4; do curl -sf http://127.0.0.1/php/health.php; done | grep -q '^ok from php@1'",
        "the restarted php@1 to answer through nginx",
        Duration::from_secs(15),
    )?;
    Ok(())
}

/// Active workers of a pool, as systemd lists them.
fn active_workers(m: &mut Machine, pool: &str) -> Result<u32> {
    let out = m.succeed(&format!(
        "systemctl list-units --no-legend --plain --state=active 'cgipool-{pool}@*.service' | wc -l"
    ))?;
    out.trim().parse().context("counting active workers")
}

/// Polls the pool's active workers until `want` (or `limit` runs out),
/// noting every change in the timeline; the time it took, if reached.
fn watch_count(
    m: &mut Machine,
    start: Instant,
    want: u32,
    limit: Duration,
    timeline: &mut Vec<String>,
) -> Result<Option<Duration>> {
    let from = Instant::now();
    let mut last = timeline.last().cloned();
    while from.elapsed() < limit {
        let n = active_workers(m, "php")?;
        let line = format!("{n} workers");
        if last.as_deref().map(|l| !l.ends_with(&line)).unwrap_or(true) {
            timeline.push(format!("{:5.1}s {line}", start.elapsed().as_secs_f64()));
            last = timeline.last().cloned();
        }
        if n == want {
            return Ok(Some(from.elapsed()));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    Ok(None)
}

/// A php-cgi pool (min 2, max 4, shared queue) under 16 `Connection: close`
/// clients of a 20 ms script: watch doubles it to max; then two keep-alive
/// clients, which never make a request wait, while watch halves it back to
/// min. Not one request fails in either phase.
fn php_autoscale_under_load(m: &mut Machine) -> Result<()> {
    install_php(m)?;
    write_config(
        m,
        &php_pool(
            "php",
            "/php",
            "min = 2\nmax = 4\nscale_up_after = \"2s\"\nscale_down_after = \"5s\"",
        ),
    )?;
    apply_and_route(m, "http://127.0.0.1/php/hello.php")?;
    m.wait_for_unit("cgipool-watch.service")?;
    let url = "http://127.0.0.1:80/php/work.php";
    let start = Instant::now();
    let mut timeline = vec!["  0.0s 2 workers".to_string()];
    let secs = 20;
    let load = Load::start(m, 16, secs, url)?;
    let up_limit = m.scaled(Duration::from_secs(10));
    let up = watch_count(m, start, 4, up_limit, &mut timeline)?;
    let report = load.finish(m, "php pool scaling up", 500)?;
    let up = up.with_context(|| {
        format!(
            "the pool did not reach max = 4 within {:.0}s of load: {timeline:?}",
            up_limit.as_secs_f64()
        )
    })?;
    // Idle but for two keep-alive clients (wrk's two threads), never more
    // requests at once than workers: nothing waits, so watch halves the
    // pool after scale_down_after (5 s).
    let idle_secs = 15;
    let light = Load::keep_alive(m, 2, idle_secs, url)?;
    let down_limit = Duration::from_secs(5) + m.scaled(Duration::from_secs(15));
    let down = watch_count(m, start, 2, down_limit, &mut timeline)?;
    let light_report = light.finish(m, "php pool scaling down", 100)?;
    println!("fastcgi autoscale timeline:\n  {}", timeline.join("\n  "));
    let down = down.with_context(|| {
        format!(
            "the pool did not return to min = 2 within {:.0}s: {timeline:?}",
            down_limit.as_secs_f64()
        )
    })?;
    let log = m.succeed("journalctl -b -o cat -u cgipool-watch.service | grep 'scale '")?;
    ensure!(
        log.contains("scale 2 -> 4") && log.contains("scale 4 -> 2"),
        "watch's log lacks its decisions:\n{log}"
    );
    println!(
        "fastcgi autoscale: max after {:.1}s of load ({} requests, 0 failed); min {:.1}s into the idle phase ({} keep-alive requests, 0 failed)",
        up.as_secs_f64(),
        report.requests,
        down.as_secs_f64(),
        light_report.requests
    );
    Ok(())
}
