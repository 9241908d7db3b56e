//! Watch's reaper (src/watch/reaper.rs): a PHP script that sleeps far past
//! request_timeout gets a 504 from nginx and its worker is killed through
//! systemd and replaced; workers idle on nginx's kept-alive connections are
//! never touched.
use super::common::{apply, assert_pool_running, install, request, write_config};
use super::edge::Load;
use super::fastcgi::{apply_and_route, install_php, php_pool};
use crate::machine::Machine;
use crate::Scenario;
use anyhow::{ensure, Result};
use std::time::{Duration, Instant};

pub fn scenarios() -> Vec<Scenario> {
    let s = Scenario::nspawn;
    vec![
        s("fastcgi_php_sleep_past_timeout", php_sleep_past_timeout),
        s("watch_reaper_spares_keepalive", reaper_spares_keepalive),
    ]
}

/// sleep(600) under request_timeout = 2s: 504 at about 2 s, then watch
/// kills the worker (it still holds the connection nginx closed) and
/// systemd starts a fresh one, which serves.
fn php_sleep_past_timeout(m: &mut Machine) -> Result<()> {
    install_php(m)?;
    write_config(
        m,
        &php_pool("php", "/php", "min = 1\nmax = 1\nrequest_timeout = \"2s\""),
    )?;
    apply_and_route(m, "http://127.0.0.1/php/hello.php")?;
    let unit = "cgipool-php@1.service";
    let pid = m.unit_property(unit, "MainPID")?;
    let restarts = m.unit_property(unit, "NRestarts")?;

    let t = Instant::now();
    let (code, _, body) = request(m, "http://127.0.0.1/php/sleep.php")?;
    let took = t.elapsed().as_secs_f64();
    ensure!(code == 504, "sleep.php answered {code}: {body}");
    let most = m.scaled(Duration::from_secs(8)).as_secs_f64();
    ensure!(
        (1.5..most).contains(&took),
        "504 after {took:.1}s, expected about 2s (at most {most:.1}s, scaled)"
    );
    // Two observations a second apart, a kill and a restart.
    m.wait_until_succeeds(
        &format!(
            "test \"$(systemctl show -p MainPID --value {unit})\" != {pid} && \
             test \"$(systemctl show -p NRestarts --value {unit})\" -gt {restarts} && \
             systemctl is-active -q {unit}"
        ),
        "watch to kill the worker that sleeps on an abandoned request, and systemd to restart it",
        Duration::from_secs(10),
    )?;
    let replaced = t.elapsed().as_secs_f64();
    let line = m.wait_until_succeeds(
        &format!(
            "journalctl -q -o cat -u cgipool-watch.service | grep '{unit} (pool php): killed'"
        ),
        "watch's line about the kill",
        Duration::from_secs(5),
    )?;
    ensure!(line.contains("seen for"), "the line says how long: {line}");
    m.fail(&format!("kill -0 {pid}"))?; // the old php-cgi is gone
    let (code, _, body) = request(m, "http://127.0.0.1/php/hello.php")?;
    ensure!(
        code == 200 && body.contains("hello from php@1"),
        "after the kill: {code} {body}"
    );
    println!(
        "reaper: sleep.php answered 504 after {took:.2}s; worker replaced {replaced:.2}s after the request; {}",
        line.trim()
    );
    Ok(())
}

/// An HTTP pool with per-worker sockets (nginx keeps connections to each
/// worker): after a keep-alive load the workers sit idle on nginx's kept
/// connections until nginx closes them (keepalive_timeout 5 s); through
/// those seconds of observations, and the closes, nothing is killed.
fn reaper_spares_keepalive(m: &mut Machine) -> Result<()> {
    install(m)?;
    write_config(
        m,
        "[pool.web]\nexec = \"/usr/local/lib/cgipool/search\"\nroute = \"/api/search\"\nmin = 2\nmax = 2\nqueue = \"per-worker\"\n",
    )?;
    apply(m)?;
    assert_pool_running(m, "web", 2)?;
    let units = ["cgipool-web@1.service", "cgipool-web@2.service"];
    let before: Vec<(String, String)> = units
        .iter()
        .map(|u| {
            Ok((
                m.unit_property(u, "MainPID")?,
                m.unit_property(u, "NRestarts")?,
            ))
        })
        .collect::<Result<_>>()?;
    let load = Load::keep_alive(m, 8, 3, "http://127.0.0.1:80/api/search?q=x")?;
    let report = load.finish(m, "keep-alive load on a per-worker pool", 100)?;
    // The kept connections, idle now, are the workers'.
    let held = m.succeed("ss -xH state established | grep -c '/run/cgipool/web/' || true")?;
    ensure!(
        held.trim().parse::<u32>().unwrap_or(0) > 0,
        "no kept-alive connection to the workers after the load (ss -x): {held}"
    );
    // nginx closes them after its keepalive_timeout; the idle workers close theirs.
    m.wait_until_succeeds(
        "test \"$(ss -xH state established | grep -c '/run/cgipool/web/')\" = 0",
        "nginx to close its idle connections to the workers",
        Duration::from_secs(15),
    )?;
    for (u, (pid, restarts)) in units.iter().zip(&before) {
        ensure!(
            &m.unit_property(u, "MainPID")? == pid && &m.unit_property(u, "NRestarts")? == restarts,
            "{u} was restarted (MainPID was {pid}, NRestarts {restarts})"
        );
    }
    let log = m.journal("cgipool-watch.service")?;
    ensure!(
        !log.contains("killed (SIGKILL"),
        "watch killed a worker: {log}"
    );
    println!(
        "reaper: {} requests over keep-alive, {} kept connections idle until nginx closed them; no worker killed",
        report.requests,
        held.trim()
    );
    Ok(())
}
