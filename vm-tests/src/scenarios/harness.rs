//! Smoke scenarios for the harness itself: boot, bus, nginx, reboot, and a
//! self-test that a failing assertion leaves artifacts behind.
use crate::machine::{Machine, Options, Tier};
use crate::Scenario;
use anyhow::{ensure, Result};
use std::time::Duration;

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "smoke",
            tiers: &[Tier::Nspawn, Tier::Qemu],
            opts: Options::default(),
            expect_failure: false,
            run: smoke,
        },
        Scenario {
            name: "selftest_failure_keeps_artifacts",
            tiers: &[Tier::Nspawn, Tier::Qemu],
            opts: Options::default(),
            expect_failure: true,
            run: failing,
        },
        Scenario {
            name: "reboot",
            tiers: &[Tier::Qemu],
            opts: Options { reboots: true },
            expect_failure: false,
            run: reboot,
        },
    ]
}

fn smoke(m: &mut Machine) -> Result<()> {
    let target = m.unit_property("multi-user.target", "ActiveState")?;
    ensure!(
        target == "active",
        "multi-user.target is {target}, expected active"
    );
    let state = m.execute("systemctl is-system-running", Duration::from_secs(10))?;
    ensure!(
        state.stdout.trim() == "running",
        "systemctl is-system-running says {:?}; failed units:\n{}",
        state.stdout.trim(),
        m.succeed("systemctl --failed --no-legend")?
    );
    let owner = m.succeed("busctl call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus GetNameOwner s org.freedesktop.systemd1")?;
    ensure!(
        owner.starts_with("s \""),
        "the system bus has no owner for org.freedesktop.systemd1: {owner}"
    );
    let version = m.succeed("busctl get-property org.freedesktop.systemd1 /org/freedesktop/systemd1 org.freedesktop.systemd1.Manager Version")?;
    ensure!(
        version.contains('"'),
        "no systemd version over D-Bus: {version}"
    );
    m.wait_for_unit("nginx.service")?;
    let code = m.wait_until_succeeds(
        "curl -sS -o /dev/null -w '%{http_code}' http://127.0.0.1/",
        "nginx to answer on 127.0.0.1",
        Duration::from_secs(20),
    )?;
    ensure!(code == "200", "nginx answered {code}, expected 200");
    let payload = m.succeed("test -d /payload && ls /payload")?;
    ensure!(
        !payload.trim().is_empty(),
        "the payload is not visible at /payload"
    );
    Ok(())
}

fn failing(m: &mut Machine) -> Result<()> {
    let out = m.succeed("echo expected")?;
    ensure!(
        out.trim() == "unexpected",
        "self-test assertion: got {:?}, the harness expects this to fail",
        out.trim()
    );
    Ok(())
}

fn reboot(m: &mut Machine) -> Result<()> {
    let before = m.boot_id()?;
    m.succeed("echo persisted > /var/lib/cgipool-reboot-marker && sync")?;
    m.reboot()?;
    let after = m.boot_id()?;
    ensure!(
        before != after,
        "the boot id did not change across reboot ({before})"
    );
    let marker = m.succeed("cat /var/lib/cgipool-reboot-marker")?;
    ensure!(
        marker.trim() == "persisted",
        "the file written before reboot reads {:?}",
        marker.trim()
    );
    m.wait_for_unit("nginx.service")?;
    Ok(())
}
