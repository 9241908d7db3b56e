//! Issue 14 acceptance: a control plane an operator can trust. The intent
//! is recorded first; an apply killed or interrupted anywhere is finished by
//! the next one with no failed request; watch never brings back an older
//! config; scale changes only the count; down touches only what cgipool
//! made; the config's path changes nothing; 1,000 workers in one apply.
use super::common::{apply, assert_pool_running, install, write_config, CONFIG};
use super::edge::Load;
use crate::machine::Machine;
use crate::Scenario;
use anyhow::{ensure, Context, Result};
use std::time::{Duration, Instant};

pub fn scenarios() -> Vec<Scenario> {
    let s = Scenario::nspawn;
    vec![
        s("control_kill_points_converge", kill_points),
        s("control_watch_never_reverts", watch_never_reverts),
        s("control_scale_changes_only_the_count", scale_only_count),
        s("control_scale_races_watch", scale_races_watch),
        s("control_long_drain_keeps_watchdog_fed", long_drain),
        s("control_down_and_paths_leave_others_alone", down_and_paths),
        s("control_apply_1000_workers", thousand_workers),
    ]
}

const DEMO: &str = include_str!("../../../examples/demo.toml");

/// The demo with auth pinned at 2 workers (the load below must not make
/// watch scale it).
fn demo_a() -> String {
    format!("{}\nmax = 2\n", DEMO.trim_end())
}

/// A plus a pool; auth's environment changes (its workers roll).
fn demo_b() -> String {
    format!(
        "{}environment = {{ CGIPOOL_TEST_B = \"1\" }}\n\n[pool.extra]\nexec = \"/usr/local/lib/cgipool/search\"\nroute = \"/api/extra\"\nmin = 2\nmax = 2\n",
        demo_a()
    )
}

/// InvocationID of each unit, in order.
fn invocations(m: &mut Machine, units: &[String]) -> Result<Vec<String>> {
    units
        .iter()
        .map(|u| m.unit_property(u, "InvocationID"))
        .collect()
}

/// The pool's socket (the demo's pools have the default shared queue) and
/// its workers.
fn workers(pools: &[(&str, u32)]) -> Vec<String> {
    pools
        .iter()
        .flat_map(|(p, n)| {
            std::iter::once(format!("cgipool-{p}.socket"))
                .chain((1..=*n).map(move |i| format!("cgipool-{p}@{i}.service")))
        })
        .collect()
}

/// nginx serves the generation its locations file carries.
pub(super) fn assert_serves_its_files(m: &mut Machine) -> Result<()> {
    let served = m.succeed("curl -sf http://127.0.0.1/.cgipool/generation")?;
    let file = m.succeed(
        "sed -n 's/.*return 200 \"\\([0-9a-f]*\\)\\\\n\";.*/\\1/p' /etc/nginx/snippets/cgipool-locations.conf",
    )?;
    ensure!(
        served.trim() == file.trim() && !file.trim().is_empty(),
        "nginx serves generation {:?}, its files say {:?}",
        served.trim(),
        file.trim()
    );
    Ok(())
}

/// B is fully there: workers, the new route, nginx on B's files; the next
/// apply has nothing to do.
fn assert_converged_to_b(m: &mut Machine, what: &str) -> Result<()> {
    assert_pool_running(m, "extra", 2).with_context(|| what.to_string())?;
    assert_pool_running(m, "auth", 2).with_context(|| what.to_string())?;
    m.succeed("grep -q CGIPOOL_TEST_B=1 /etc/systemd/system/cgipool-auth@.service")?;
    for i in 1..=2 {
        let env = m.succeed(&format!(
            "tr '\\0' '\\n' < /proc/$(systemctl show -P MainPID cgipool-auth@{i}.service)/environ"
        ))?;
        ensure!(
            env.contains("CGIPOOL_TEST_B=1"),
            "{what}: auth@{i} runs without B's environment (not rolled)"
        );
    }
    m.succeed("curl -sf -o /dev/null 'http://127.0.0.1/api/extra/api/search?q=x'")
        .with_context(|| format!("{what}: the new route"))?;
    assert_serves_its_files(m).with_context(|| what.to_string())?;
    let again = apply(m)?;
    ensure!(
        again.trim() == "no changes",
        "{what}: the apply after the one that converged still did:\n{again}"
    );
    Ok(())
}

/// Kill points: while wrk loads the pool that rolls, an apply that adds a
/// pool and changes another is sent SIGKILL (then, in a second sweep,
/// SIGTERM) after delays spread over its run. One apply then converges and
/// the next says "no changes"; no request fails.
fn kill_points(m: &mut Machine) -> Result<()> {
    install(m)?;
    write_config(m, &demo_a())?;
    apply(m)?;
    // How long a clean A -> B apply takes here.
    write_config(m, &demo_b())?;
    let t = Instant::now();
    apply(m)?;
    let full = t.elapsed().as_secs_f64();
    assert_converged_to_b(m, "a clean apply")?;
    println!("a clean apply A -> B took {full:.2}s");
    for signal in ["KILL", "TERM"] {
        for i in 0..8 {
            let delay = 0.02 + full * f64::from(i) / 8.0;
            write_config(m, &demo_a())?;
            m.succeed_within(
                &format!("cgipool apply {CONFIG}"),
                m.scaled(Duration::from_secs(120)),
            )?;
            write_config(m, &demo_b())?;
            let load = Load::start(m, 16, 6, "http://127.0.0.1/api/auth?user=john")?;
            let what = format!("SIG{signal} after {delay:.2}s");
            super::common::apply_cut_short(m, signal, delay, "interrupted by SIGTERM while")
                .with_context(|| what.clone())?;
            m.succeed_within(
                &format!("cgipool apply {CONFIG}"),
                m.scaled(Duration::from_secs(120)),
            )
            .with_context(|| format!("{what}: the apply after it"))?;
            assert_converged_to_b(m, &what)?;
            load.finish(m, &what, 50)?;
        }
    }
    Ok(())
}

/// watch acts on the recorded intent: apply A, apply B, leave an unapplied
/// edit C in the file, kill a worker: the units still say B. The same after
/// an apply of B that was killed while it drained.
fn watch_never_reverts(m: &mut Machine) -> Result<()> {
    install(m)?;
    // A socket per worker: a killed worker then changes nginx's routes, and
    // watch converges (with the shared queue it has nothing to do).
    let demo = DEMO.replacen("max = 5\n", "max = 5\nqueue = \"per-worker\"\n", 1);
    write_config(m, &demo)?;
    apply(m)?;
    let b = format!(
        "{}\nenvironment = {{ CGIPOOL_TEST_B = \"1\" }}\n",
        demo.trim_end()
    );
    let c = format!(
        "{}\nenvironment = {{ CGIPOOL_TEST_C = \"1\" }}\n",
        demo.trim_end()
    );
    write_config(m, &b)?;
    apply(m)?;
    write_config(m, &c)?;
    let acted = |m: &mut Machine| -> Result<u32> {
        let n = m.succeed(
            "journalctl -b -o cat -u cgipool-watch.service | grep -c 'converging to intent' || true",
        )?;
        Ok(n.trim().parse().unwrap_or(0))
    };
    let check = |m: &mut Machine, what: &str| -> Result<()> {
        let seen = acted(m)?;
        let before = m.main_pid("cgipool-search@1.service")?;
        m.succeed(&format!("kill -9 {before}"))?;
        m.wait_until_succeeds(
            &format!("test \"$(systemctl show -P MainPID cgipool-search@1.service)\" != {before} && systemctl is-active -q cgipool-search@1.service"),
            "systemd to restart search@1",
            Duration::from_secs(20),
        )?;
        // watch takes it out and puts it back (routes follow health) when
        // the restart outlasts its grace period; a fast restart inside it
        // changes no route. So watch is restarted too: a new watch always
        // converges once, to the recorded intent.
        m.succeed("systemctl restart cgipool-watch.service")?;
        m.wait_until_succeeds(
            &format!("test $(journalctl -b -o cat -u cgipool-watch.service | grep -c 'converging to intent') -gt {seen}"),
            "watch to converge after the killed worker and its own restart",
            Duration::from_secs(20),
        )?;
        m.wait_until_succeeds(
            "! systemctl list-jobs --no-legend | grep -q cgipool",
            "watch's converge to finish",
            Duration::from_secs(30),
        )?;
        let unit = m.succeed("cat /etc/systemd/system/cgipool-auth@.service")?;
        ensure!(
            unit.contains("CGIPOOL_TEST_B=1") && !unit.contains("CGIPOOL_TEST_C"),
            "{what}: the units do not say B:\n{unit}"
        );
        Ok(())
    };
    check(m, "after apply A, apply B, edit C")?;
    // B again, from A, killed while it waits for the old nginx workers: a
    // slow request holds one of them.
    write_config(
        m,
        &format!(
            "{demo}\n[pool.slow]\nexec = \"/usr/local/lib/cgipool/search\"\nroute = \"/api/slow\"\nmin = 1\nrequest_timeout = \"60s\"\nenvironment = {{ CGIPOOL_TEST_DELAY_MS = \"8000\" }}\n"
        ),
    )?;
    apply(m)?;
    write_config(m, &b)?;
    m.succeed("systemd-run --quiet --collect --unit=vmtest-slow curl -s -o /dev/null http://127.0.0.1/api/slow/api/search?q=x")?;
    m.wait_until_succeeds(
        "journalctl -b -o cat -u 'cgipool-slow@*' | grep -q . || ss -x | grep -q slow",
        "the slow request to reach its worker",
        Duration::from_secs(10),
    )?;
    let o = m.execute(
        &format!("timeout --preserve-status -s KILL 4 cgipool apply {CONFIG}"),
        m.scaled(Duration::from_secs(30)),
    )?;
    ensure!(
        o.rc == 137,
        "the apply of B was not killed during its drain (exit {}):\n{}",
        o.rc,
        o.stdout
    );
    write_config(m, &c)?;
    check(m, "after an apply of B killed during its drain")?;
    Ok(())
}

/// `cgipool scale` with an unapplied edit in the file changes only the count.
fn scale_only_count(m: &mut Machine) -> Result<()> {
    install(m)?;
    apply(m)?;
    let running = workers(&[("search", 2), ("auth", 2)]);
    let before = invocations(m, &running)?;
    write_config(
        m,
        &format!(
            "{}\nenvironment = {{ CGIPOOL_TEST_C = \"1\" }}\n",
            DEMO.trim_end()
        ),
    )?;
    let out = m.succeed("cgipool scale search 4")?;
    ensure!(
        out.contains("differs from the applied config"),
        "scale does not say the file has unapplied edits:\n{out}"
    );
    assert_pool_running(m, "search", 4)?;
    ensure!(
        invocations(m, &running)? == before,
        "a worker restarted during the scale"
    );
    m.fail("grep -q CGIPOOL_TEST_C /etc/systemd/system/cgipool-auth@.service")?;
    Ok(())
}

/// A `cgipool scale` racing watch's autoscaler: both decisions are logged,
/// and the count that runs is the later writer's.
fn scale_races_watch(m: &mut Machine) -> Result<()> {
    install(m)?;
    write_config(
        m,
        &format!(
            "{DEMO}\n[pool.busy]\nexec = \"/usr/local/lib/cgipool/search\"\nroute = \"/api/busy\"\nmin = 1\nmax = 6\nscale_up_after = \"1s\"\nscale_down_after = \"3s\"\nenvironment = {{ CGIPOOL_TEST_DELAY_MS = \"30\" }}\n"
        ),
    )?;
    apply(m)?;
    let load = Load::start(m, 8, 12, "http://127.0.0.1/api/busy/api/search?q=x")?;
    m.wait_until_succeeds(
        "grep -q '\"by\":\"watch\"' /var/lib/cgipool/decisions.jsonl",
        "watch to scale the busy pool",
        Duration::from_secs(15),
    )?;
    // Right after watch's decision, and again while it may decide again.
    m.succeed("cgipool scale busy 2")?;
    m.succeed("cgipool scale busy 5")?;
    load.finish(m, "load on the busy pool", 50)?;
    // Once watch has scaled the idle pool down to min, the last decision in
    // the log must be what runs.
    m.wait_until_succeeds(
        "python3 -c 'import json,sys; sys.exit(json.load(open(\"/var/lib/cgipool/intent.json\"))[\"counts\"][\"busy\"] != 1)'",
        "watch to scale the idle pool down to min",
        Duration::from_secs(30),
    )?;
    m.wait_until_succeeds(
        "! systemctl list-jobs --no-legend | grep -q cgipool",
        "the last converge to finish",
        Duration::from_secs(30),
    )?;
    let log = m.succeed("cat /var/lib/cgipool/decisions.jsonl")?;
    ensure!(
        log.contains("\"by\":\"scale\"") && log.contains("\"by\":\"watch\""),
        "both writers should be logged:\n{log}"
    );
    let last: serde_json::Value = serde_json::from_str(log.lines().last().unwrap_or("{}"))?;
    let intent: serde_json::Value =
        serde_json::from_str(&m.succeed("cat /var/lib/cgipool/intent.json")?)?;
    let to = last["to"]
        .as_u64()
        .context("the last decision has no count")?;
    ensure!(
        intent["counts"]["busy"].as_u64() == Some(to),
        "the intent says {} but the last decision was {to}:\n{log}",
        intent["counts"]["busy"]
    );
    ensure!(
        intent["serial"] == last["serial"],
        "the intent was written after the last decision: {intent}\n{log}"
    );
    // watch's last converge drains nginx before it stops the worker.
    m.wait_until_succeeds(
        &format!("test $(systemctl list-units --no-legend --plain --state=active 'cgipool-busy@*.service' | wc -l) -eq {to}"),
        "the pool to run the last decision's count",
        Duration::from_secs(30),
    )?;
    assert_pool_running(m, "busy", to as u32)?;
    Ok(())
}

/// A drain of about 50 s inside watch's converge (a slow request holds an
/// old nginx worker while watch scales a pool down) does not trip watch's
/// 30 s watchdog.
fn long_drain(m: &mut Machine) -> Result<()> {
    install(m)?;
    write_config(
        m,
        &format!(
            "{DEMO}\n[pool.slow]\nexec = \"/usr/local/lib/cgipool/search\"\nroute = \"/api/slow\"\nmin = 1\nmax = 2\nscale_down_after = \"6s\"\nrequest_timeout = \"120s\"\nenvironment = {{ CGIPOOL_TEST_DELAY_MS = \"50000\" }}\n"
        ),
    )?;
    apply(m)?;
    m.succeed("cgipool scale slow 2")?;
    let restarts = m.unit_property("cgipool-watch.service", "NRestarts")?;
    m.succeed("systemd-run --quiet --collect --unit=vmtest-slow curl -s -o /tmp/slow.out -w '%{http_code}' http://127.0.0.1/api/slow/api/search?q=x")?;
    m.wait_until_succeeds(
        "journalctl -b -o cat -u cgipool-watch.service | grep -q 'scale slow 2 -> 1: converging'",
        "watch to scale the slow pool down",
        Duration::from_secs(30),
    )?;
    m.wait_until_succeeds(
        "journalctl -b -o cat -u cgipool-watch.service | grep -q 'systemd: stopped cgipool-slow@2.service'",
        "watch's converge to get past the drain",
        Duration::from_secs(90),
    )?;
    let journal = m.journal("cgipool-watch.service")?;
    ensure!(
        !journal.to_lowercase().contains("watchdog"),
        "watch's journal mentions its watchdog:\n{journal}"
    );
    let now = m.unit_property("cgipool-watch.service", "NRestarts")?;
    ensure!(
        now == restarts,
        "cgipool-watch restarted ({restarts} -> {now}) during the drain"
    );
    m.wait_until_succeeds(
        "test \"$(cat /tmp/slow.out 2>/dev/null)\" = 200 || ! systemctl is-active -q vmtest-slow",
        "the slow request to finish",
        Duration::from_secs(60),
    )?;
    Ok(())
}

/// `down` leaves a unit it did not make running; the same config applied
/// from another path restarts nothing.
fn down_and_paths(m: &mut Machine) -> Result<()> {
    install(m)?;
    m.write_text(
        "/etc/systemd/system/cgipool-foreign.service",
        "[Unit]\nDescription=not cgipool's\n[Service]\nExecStart=/bin/sleep infinity\n",
    )?;
    m.succeed("systemctl daemon-reload && systemctl start cgipool-foreign.service")?;
    apply(m)?;
    let units = workers(&[("search", 2), ("auth", 2)]);
    let before = invocations(m, &units)?;
    m.succeed(&format!("cp {CONFIG} /tmp/elsewhere.toml"))?;
    let out = m.succeed("cd /tmp && cgipool apply elsewhere.toml")?;
    ensure!(
        out.trim() == "no changes",
        "the same config from another path changed something:\n{out}"
    );
    ensure!(
        invocations(m, &units)? == before,
        "the same config from another path restarted units"
    );
    let status = m.succeed("cgipool status")?;
    ensure!(
        status.contains("/tmp/elsewhere.toml"),
        "status does not name the config the intent came from:\n{status}"
    );
    m.succeed("cgipool down")?;
    m.wait_for_unit("cgipool-foreign.service")?;
    m.succeed("test -f /etc/systemd/system/cgipool-foreign.service")?;
    m.fail("test -e /etc/systemd/system/cgipool-search@.service")?;
    m.fail("test -e /var/lib/cgipool/intent.json")?;
    Ok(())
}

/// 1,000 workers over four pools (2,000 units) in one apply on a fresh boot:
/// systemd keeps its bus connection.
fn thousand_workers(m: &mut Machine) -> Result<()> {
    install(m)?;
    let mut cfg = String::from("[watch]\nenabled = false\n");
    for p in ["a", "b", "c", "d"] {
        cfg.push_str(&format!(
            "\n[pool.{p}]\nexec = \"/usr/local/lib/cgipool/search\"\nroute = \"/api/{p}\"\nmin = 250\nmax = 250\n"
        ));
    }
    write_config(m, &cfg)?;
    let t = Instant::now();
    m.succeed_within(
        &format!("cgipool apply {CONFIG}"),
        m.scaled(Duration::from_secs(600)),
    )?;
    println!("apply of 1,000 workers: {:.1}s", t.elapsed().as_secs_f64());
    let active = m.succeed(
        "systemctl list-units --no-legend --plain --state=active 'cgipool-*@*.service' | wc -l",
    )?;
    ensure!(
        active.trim() == "1000",
        "{} workers active, expected 1000",
        active.trim()
    );
    let bad = m.execute(
        "journalctl -b --no-pager | grep -E 'max_match_rules_per_connection|disconnect on API bus|Got disconnect'",
        m.scaled(Duration::from_secs(60)),
    )?;
    ensure!(
        bad.rc != 0,
        "systemd lost or nearly lost the bus:\n{}",
        bad.stdout
    );
    m.succeed("curl -sf -o /dev/null 'http://127.0.0.1/api/d/api/search?q=x'")?;
    Ok(())
}
