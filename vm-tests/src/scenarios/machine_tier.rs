//! Whole-machine scenarios (QEMU): what must survive a reboot, and what
//! needs the kernel's cgroup controllers (the nspawn tier's unified
//! hierarchy has none delegated: MemoryMax= and TasksMax= are not enforced
//! there).
use super::common::{apply, assert_pool_running, install, request, write_config};
use crate::machine::{Machine, Options, Tier};
use crate::Scenario;
use anyhow::{ensure, Context, Result};
use std::time::Duration;

pub fn scenarios() -> Vec<Scenario> {
    let s = |name, run| Scenario {
        name,
        tiers: &[Tier::Qemu],
        opts: Options { reboots: true },
        expect_failure: false,
        run,
    };
    vec![
        s("reboot_persistence", reboot_persistence),
        s("power_loss_after_scale", power_loss_after_scale),
        s("resource_limits_hold", resource_limits_hold),
    ]
}

/// The default sandbox's resource limits hold: a CGI program that
/// allocates past `memory_max` is OOM-killed inside the worker's cgroup
/// (the client gets 502), one that forks past `tasks_max` is refused; the
/// gateway survives both, leaves nothing behind and serves the next request.
/// The pool's slice is a CPU scheduling group beside nginx's service.
fn resource_limits_hold(m: &mut Machine) -> Result<()> {
    install(m)?;
    m.succeed(
        "install -d /usr/local/lib/cgipool/cgi && install -m 0755 /payload/examples/cgi/hog.cgi /usr/local/lib/cgipool/cgi/",
    )?;
    write_config(
        m,
        "[pool.hog]\nprotocol = \"cgi\"\nexec = \"/usr/local/lib/cgipool/cgi/hog.cgi\"\nroute = \"/hog\"\nmin = 1\nmax = 1\nmemory_max = \"64M\"\ntasks_max = 16\n",
    )?;
    apply(m)?;
    let unit = "cgipool-hog@1.service";
    m.wait_for_unit(unit)?;
    m.wait_until_succeeds(
        "curl -sf -o /dev/null http://127.0.0.1/hog/ok",
        "nginx to route /hog to the gateway",
        Duration::from_secs(30),
    )?;
    // Quoted for the shell: the slice's name has a `\x2d`.
    let cg = format!("'/sys/fs/cgroup{}'", m.unit_property(unit, "ControlGroup")?);
    let limits = m.succeed(&format!("cat {cg}/memory.max {cg}/pids.max"))?;
    ensure!(
        limits.split_whitespace().collect::<Vec<_>>() == ["67108864", "16"],
        "memory.max and pids.max of {cg} are {limits:?}, want 64M and 16"
    );
    // The pool weighs one service: its CPUWeight= made systemd enable the
    // cpu controller down to the pool's slice, a scheduling group of its own
    // beside nginx's service (README "CPU share").
    let slice = m.unit_property(unit, "Slice")?;
    let weight_file = |m: &mut Machine, unit: &str| -> Result<String> {
        let cg = m.unit_property(unit, "ControlGroup")?;
        Ok(format!("'/sys/fs/cgroup{cg}/cpu.weight'"))
    };
    let (slice_weight, nginx_weight) = (weight_file(m, &slice)?, weight_file(m, "nginx.service")?);
    let weights = m.succeed(&format!(
        "cat {cg}/cpu.weight {slice_weight} {nginx_weight}"
    ))?;
    ensure!(
        weights.split_whitespace().collect::<Vec<_>>() == ["100", "100", "100"],
        "cpu.weight of the worker, its slice {slice} and nginx.service are {weights:?}, want 100 each"
    );
    let gateway = m.unit_property(unit, "MainPID")?;
    let events = |m: &mut Machine, file: &str, key: &str| -> Result<u64> {
        let out = m.succeed(&format!("awk '$1 == \"{key}\" {{print $2}}' {cg}/{file}"))?;
        out.trim()
            .parse()
            .with_context(|| format!("no {key} in {cg}/{file}: {out:?}"))
    };

    // 256 MiB under memory_max = 64M: the kernel kills the program.
    let ooms_before = events(m, "memory.events", "oom_kill")?;
    let (code, _, body) = request(m, "http://127.0.0.1/hog/memory?mb=256")?;
    ensure!(
        code == 502,
        "256 MiB under memory_max=64M answered {code}: {body}"
    );
    ensure!(
        m.unit_property(unit, "MainPID")? == gateway,
        "the worker was stopped or restarted when the kernel killed its CGI program (OOMPolicy=)"
    );
    let ooms = events(m, "memory.events", "oom_kill")?;
    ensure!(
        ooms > ooms_before,
        "no OOM kill counted in {cg}/memory.events"
    );
    let peak = m.succeed(&format!("cat {cg}/memory.peak 2>/dev/null || echo 0"))?;
    let peak: u64 = peak.trim().parse().unwrap_or(0);
    ensure!(peak <= 64 << 20, "memory.peak {peak} is above memory_max");
    // Within the limit it works.
    let (code, _, body) = request(m, "http://127.0.0.1/hog/memory?mb=8")?;
    ensure!(
        code == 200 && body.contains("\"allocated_mib\": 8"),
        "8 MiB answered {code}: {body}"
    );

    // 40 children under tasks_max = 16: forks are refused.
    let refusals_before = events(m, "pids.events", "max")?;
    let (code, _, body) = request(m, "http://127.0.0.1/hog/tasks?n=40")?;
    ensure!(code == 200, "forking 40 answered {code}: {body}");
    let v: serde_json::Value =
        serde_json::from_str(body.trim()).with_context(|| format!("not JSON: {body}"))?;
    let started = v["started"].as_u64().unwrap_or(99);
    let refused = v["refused"].as_u64().unwrap_or(0);
    ensure!(
        started < 16 && refused > 0 && started + refused == 40,
        "tasks_max=16 did not hold: {body}"
    );
    ensure!(
        events(m, "pids.events", "max")? > refusals_before,
        "no refused fork counted in {cg}/pids.events"
    );
    // The gateway killed the children after the request: it is alone again.
    m.wait_until_succeeds(
        &format!("test $(wc -l < {cg}/cgroup.procs) -eq 1"),
        "the hog's children to be gone from the worker's cgroup",
        Duration::from_secs(10),
    )?;

    ensure!(
        m.unit_property(unit, "MainPID")? == gateway,
        "the gateway itself was killed or restarted"
    );
    let (code, _, body) = request(m, "http://127.0.0.1/hog/ok")?;
    ensure!(
        code == 200,
        "after the abuse /hog/ok answered {code}: {body}"
    );
    let log = m.journal(unit)?;
    ensure!(
        log.contains("GET /hog/memory?mb=256 502") && log.contains("signal=9"),
        "no log line for the OOM-killed request:\n{log}"
    );
    println!(
        "limits: 256 MiB → 502 (oom_kill {ooms_before} → {ooms}, memory.peak {} MiB); 40 forks → {started} started, {refused} refused",
        peak >> 20
    );
    Ok(())
}

/// The demo, but watch does not scale `search` down while a slow guest
/// reboots (an idle pool halves after `scale_down_after`, 30 s by default).
fn demo_without_scale_down() -> String {
    include_str!("../../../examples/demo.toml").replace(
        "route = \"/api/search\"\n",
        "route = \"/api/search\"\nscale_down_after = \"1h\"\n",
    )
}

/// Power cut (QEMU system_reset) right after a scale: the files apply wrote
/// (fsync, rename, fsync of the directory) are all there, so the machine
/// comes back with the new count.
fn power_loss_after_scale(m: &mut Machine) -> Result<()> {
    install(m)?;
    write_config(m, &demo_without_scale_down())?;
    apply(m)?;
    m.succeed("cgipool scale search 3")?;
    m.crash()?;
    assert_pool_running(m, "search", 3)?;
    m.wait_until_succeeds(
        "curl -sf 'http://127.0.0.1/api/search?q=power' >/dev/null",
        "nginx to route /api/search after the power cut",
        std::time::Duration::from_secs(30),
    )?;
    Ok(())
}

/// apply, scale to 4, delete the cgipool binary, reboot: systemd and the
/// generated files alone bring back exactly 4 warm workers and the routes.
fn reboot_persistence(m: &mut Machine) -> Result<()> {
    install(m)?;
    write_config(m, &demo_without_scale_down())?;
    apply(m)?;
    m.succeed("cgipool scale search 4")?;
    assert_pool_running(m, "search", 4)?;
    m.succeed("rm /usr/local/bin/cgipool && sync")?;
    m.reboot()?;
    m.fail("command -v cgipool")?;
    assert_pool_running(m, "search", 4)?;
    assert_pool_running(m, "auth", 2)?;
    for n in 1..=4 {
        // Warm: the service runs without having been activated by a connection.
        let pid = m.unit_property(&format!("cgipool-search@{n}.service"), "MainPID")?;
        ensure!(pid != "0", "search@{n} is not running after reboot");
    }
    let code = m.wait_until_succeeds(
        "curl -s -o /dev/null -w '%{http_code}' 'http://127.0.0.1/api/search?q=reboot' | grep -x 200",
        "nginx to route /api/search after reboot",
        std::time::Duration::from_secs(30),
    )?;
    ensure!(code.trim() == "200", "search after reboot: {code}");
    m.succeed("curl -sf 'http://127.0.0.1/api/auth?user=john' >/dev/null")?;
    Ok(())
}
