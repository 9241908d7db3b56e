//! Many hosts (issue 20), kill points: an apply that changes every host is
//! killed at points spread over its run (while it writes another host's
//! files over ssh, while it waits for their jobs, while the front
//! converges); the next apply finishes the job on every host, the one
//! after it has nothing to do, and no request through the front fails.
use super::hosts::{hosts_config, install_whoami, WHOAMI};
use crate::lab::Lab;
use crate::machine::Machine;
use crate::scenarios::common::{self, CONFIG};
use crate::scenarios::edge::Load;
use anyhow::{ensure, Context, Result};
use std::time::{Duration, Instant};

const HOSTS: [&str; 3] = ["front", "web1", "web2"];

/// hello on the front, web1 and web2 (one worker each).
fn config_a(lab: &Lab) -> String {
    hosts_config(lab, &["web1", "web2"], "")
}

/// A, with hello's environment changed (its workers roll on every host)
/// and a pool `extra` on web1 and web2 only.
fn config_b(lab: &Lab) -> String {
    format!(
        "{}\n[pool.extra]\nexec = \"{WHOAMI}\"\nroute = \"/api/extra\"\n\
         hosts = [\"web1\", \"web2\"]\nport = 9102\nmin = 2\nmax = 2\n",
        hosts_config(
            lab,
            &["web1", "web2"],
            "environment = { CGIPOOL_TEST_B = \"1\" }"
        )
    )
}

/// `cgipool apply` on the front, within a bound that follows the machine.
fn apply(lab: &mut Lab) -> Result<String> {
    let front = lab.machine("front");
    let limit = front.scaled(Duration::from_secs(120));
    front.succeed_within(&format!("cgipool apply {CONFIG}"), limit)
}

/// The environment of a unit's main process.
fn environ(m: &mut Machine, unit: &str) -> Result<String> {
    m.succeed(&format!(
        "tr '\\0' '\\n' < /proc/$(systemctl show -P MainPID {unit})/environ"
    ))
}

/// B everywhere: extra's workers on web1 and web2, hello rolled on every
/// host, the front routes extra to both hosts and serves the files it
/// has; the next apply changes nothing.
fn assert_converged_to_b(lab: &mut Lab, what: &str) -> Result<()> {
    for h in HOSTS {
        let m = lab.machine(h);
        let env = environ(m, "cgipool-hello@1.service")?;
        ensure!(
            env.contains("CGIPOOL_TEST_B=1"),
            "{what}: hello@1 on {h} runs without B's environment (not rolled)"
        );
    }
    for h in ["web1", "web2"] {
        let m = lab.machine(h);
        for unit in [
            "cgipool-extra.socket",
            "cgipool-extra@1.service",
            "cgipool-extra@2.service",
        ] {
            let state = m.unit_property(unit, "ActiveState")?;
            ensure!(state == "active", "{what}: {unit} on {h} is {state}");
        }
    }
    let front = lab.machine("front");
    super::control::assert_serves_its_files(front).with_context(|| what.to_string())?;
    let by = front.succeed(
        "for i in $(seq 1 12); do curl -sf -D - -o /dev/null -H 'Connection: close' http://127.0.0.1/api/extra | tr -d '\\r' | sed -n 's/^[Xx]-[Cc]gipool-[Ww]orker: //p'; done",
    )?;
    for h in ["web1", "web2"] {
        ensure!(
            by.contains(&format!("{h}/extra@")),
            "{what}: /api/extra is not answered by {h}: {by}"
        );
    }
    let again = apply(lab)?;
    // Each host's heading, then "no changes" for it.
    let did: Vec<&str> = again
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && *l != "front:" && !l.starts_with("host ") && *l != "no changes"
        })
        .collect();
    ensure!(
        did.is_empty() && again.matches("no changes").count() == HOSTS.len(),
        "{what}: the apply after the one that converged still did:\n{again}"
    );
    Ok(())
}

/// While wrk loads hello through the front, an apply from A to B is sent
/// SIGKILL (then SIGTERM) after delays spread over a clean apply's run;
/// the next apply converges every host.
pub(super) fn kill_points(lab: &mut Lab) -> Result<()> {
    lab.enable_ssh("front", &["web1", "web2"])?;
    install_whoami(lab, &HOSTS)?;
    let (a, b) = (config_a(lab), config_b(lab));
    common::write_config(lab.machine("front"), &a)?;
    apply(lab)?;
    common::write_config(lab.machine("front"), &b)?;
    let t = Instant::now();
    apply(lab)?;
    let full = t.elapsed().as_secs_f64();
    assert_converged_to_b(lab, "a clean apply")?;
    let again = apply(lab)?;
    println!("a clean apply A -> B over three hosts took {full:.2}s; one with nothing to do prints:\n{again}");
    for (signal, points) in [("KILL", 4), ("TERM", 1)] {
        for i in 0..points {
            // SIGKILL at the start, a quarter, half and three quarters of
            // a clean run; SIGTERM halfway.
            let at = if points == 1 {
                0.5
            } else {
                f64::from(i) / f64::from(points)
            };
            let delay = 0.05 + full * at;
            common::write_config(lab.machine("front"), &a)?;
            apply(lab).with_context(|| format!("back to A before SIG{signal} at {delay:.2}s"))?;
            common::write_config(lab.machine("front"), &b)?;
            let front = lab.machine("front");
            let secs = (full + 2.0).ceil() as u64;
            let load = Load::start(front, 8, secs, "http://127.0.0.1/api/hello")?;
            let what = format!("SIG{signal} after {delay:.2}s");
            // A step on another host may fail on its ssh transport, which
            // the signal reached too, before it sees the flag.
            common::apply_cut_short(front, signal, delay, "interrupted by SIGTERM")
                .with_context(|| what.clone())?;
            let out = apply(lab).with_context(|| format!("{what}: the apply after it"))?;
            assert_converged_to_b(lab, &what)
                .with_context(|| format!("the apply after it printed:\n{out}"))?;
            load.finish(lab.machine("front"), &what, 50)?;
            println!("{what}: converged by the next apply");
        }
    }
    Ok(())
}
