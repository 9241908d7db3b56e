//! Whole-machine scenarios (QEMU): what must survive a reboot.
use super::common::{apply, assert_pool_running, install};
use crate::machine::{Machine, Options, Tier};
use crate::Scenario;
use anyhow::{ensure, Result};

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
    ]
}

/// Power cut (QEMU system_reset) right after a scale: the files apply wrote
/// (fsync, rename, fsync of the directory) are all there, so the machine
/// comes back with the new count.
fn power_loss_after_scale(m: &mut Machine) -> Result<()> {
    install(m)?;
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
