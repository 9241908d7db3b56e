//! Whole-machine scenarios (QEMU): what must survive a reboot.
use super::common::{apply, assert_pool_running, install};
use crate::machine::{Machine, Options, Tier};
use crate::Scenario;
use anyhow::{ensure, Result};

pub fn scenarios() -> Vec<Scenario> {
    vec![Scenario {
        name: "reboot_persistence",
        tiers: &[Tier::Qemu],
        opts: Options { reboots: true },
        expect_failure: false,
        run: reboot_persistence,
    }]
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
