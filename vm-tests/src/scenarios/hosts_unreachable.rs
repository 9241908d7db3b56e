//! Many hosts (issue 20), a host that does not answer: `apply` fails
//! naming it and changes nothing anywhere; `down` does the same unless told
//! to go on without it.
use super::hosts::{answered_by, hosts_config, install_whoami};
use crate::lab::Lab;
use crate::machine::Machine;
use crate::scenarios::common::{self, CONFIG};
use anyhow::{ensure, Result};
use std::time::{Duration, Instant};

/// A host in the config that nobody answers for: apply fails naming it,
/// and neither the front nor the host that answers changes a byte. Then
/// web1 goes away: `down` fails naming it and changes nothing either;
/// `down --skip-unreachable` takes the front down and names what stays on
/// web1; once web1 is back, `down CONFIG` removes that too.
pub(super) fn unreachable_changes_nothing(lab: &mut Lab) -> Result<()> {
    lab.enable_ssh("front", &["web1"])?;
    install_whoami(lab, &["front", "web1"])?;
    let config = hosts_config(lab, &["web1"], "");
    common::write_config(lab.machine("front"), &config)?;
    common::apply(lab.machine("front"))?;
    let before = [
        common::host_fingerprint(lab.machine("front"))?,
        common::host_fingerprint(lab.machine("web1"))?,
    ];
    let intent_before = lab
        .machine("front")
        .succeed("cat /var/lib/cgipool/intent.json")?;

    // The same pool, one more worker each, and on a host that is not there.
    let ghost = lab.unused_address();
    let text = hosts_config(lab, &["web1"], "")
        .replace("min = 1", "min = 2")
        .replace(
            "hosts = [\"local\", \"web1\"]",
            "hosts = [\"local\", \"web1\", \"ghost\"]",
        )
        + &format!("\n[host.ghost]\naddress = \"root@{ghost}\"\n");
    common::write_config(lab.machine("front"), &text)?;
    let front = lab.machine("front");
    let bound = front.scaled(Duration::from_secs(40));
    let started = Instant::now();
    let out = front.fail(&format!("cgipool apply {CONFIG}"))?;
    let took = started.elapsed();
    ensure!(
        out.rc == 1,
        "apply with an unreachable host exited {}: {}",
        out.rc,
        out.stderr
    );
    ensure!(
        out.stderr
            .contains(&format!("host ghost (root@{ghost}) cannot be reached"))
            && out.stderr.contains("nothing was changed on any host"),
        "apply's error does not name the host: {}",
        out.stderr
    );
    ensure!(
        took < bound,
        "apply took {:.1}s to fail, over {:.1}s",
        took.as_secs_f64(),
        bound.as_secs_f64()
    );
    let after = [
        common::host_fingerprint(lab.machine("front"))?,
        common::host_fingerprint(lab.machine("web1"))?,
    ];
    ensure!(
        before[0] == after[0],
        "the front's unit directory or nginx files changed"
    );
    ensure!(
        before[1] == after[1],
        "web1's unit directory or nginx files changed"
    );
    let intent_after = lab
        .machine("front")
        .succeed("cat /var/lib/cgipool/intent.json")?;
    ensure!(
        intent_before == intent_after,
        "the failed apply recorded an intent"
    );
    // Still one worker on each host, still served.
    let by = answered_by(lab, 4)?;
    ensure!(
        by.iter().any(|w| w == "web1/hello@1") && by.iter().any(|w| w == "front/hello@1"),
        "after the failed apply the front and web1 do not both answer: {by:?}"
    );
    down_without_a_host(lab)
}

fn down_without_a_host(lab: &mut Lab) -> Result<()> {
    let good = hosts_config(lab, &["web1"], "");
    common::write_config(lab.machine("front"), &good)?;
    let web1 = lab.address("web1");
    lab.unplug("web1")?;
    let front = lab.machine("front");
    let before = common::host_fingerprint(front)?;
    let out = front.fail(&format!("cgipool down {CONFIG}"))?;
    ensure!(
        out.stderr
            .contains(&format!("host web1 (root@{web1}) cannot be reached"))
            && out.stderr.contains("--skip-unreachable"),
        "down with web1 away does not name it and the way on: {}",
        out.stderr
    );
    ensure!(
        common::host_fingerprint(front)? == before,
        "the failed down changed the front's unit directory or nginx files"
    );
    front.succeed("test -s /var/lib/cgipool/intent.json")?;

    let out = front.execute(
        &format!("cgipool down --skip-unreachable {CONFIG}"),
        front.scaled(Duration::from_secs(60)),
    )?;
    ensure!(
        out.rc == 0
            && out
                .stderr
                .contains(&format!("host web1 (root@{web1}) cannot be reached"))
            && out
                .stderr
                .contains(&format!("`cgipool down {CONFIG}` removes them")),
        "down --skip-unreachable exited {}, stderr: {}",
        out.rc,
        out.stderr
    );
    nothing_left(front, "the front, after down --skip-unreachable")?;
    let upstreams = front.succeed("cat /etc/nginx/conf.d/cgipool-upstreams.conf")?;
    ensure!(
        !upstreams.contains("upstream"),
        "the front still routes after down --skip-unreachable: {upstreams}"
    );
    front.fail("test -e /var/lib/cgipool/intent.json")?;

    lab.plug("web1")?;
    let web1m = lab.machine("web1");
    let kept = web1m
        .succeed("systemctl list-units --no-legend --plain --state=active 'cgipool-hello*'")?;
    ensure!(
        kept.contains("cgipool-hello@1.service"),
        "web1, away during the down, no longer runs its worker: {kept}"
    );
    let front = lab.machine("front");
    front.wait_until_succeeds(
        &format!("ssh -o BatchMode=yes -o ConnectTimeout=2 root@{web1} true"),
        "the front to reach web1 again",
        Duration::from_secs(20),
    )?;
    front.succeed(&format!("cgipool down {CONFIG}"))?;
    nothing_left(lab.machine("web1"), "web1, after the second down")?;
    nothing_left(lab.machine("front"), "the front, after the second down")
}

/// No unit file of cgipool's and no cgipool unit loaded on `m`.
fn nothing_left(m: &mut Machine, what: &str) -> Result<()> {
    let files = common::unit_dir_listing(m)?;
    ensure!(files.is_empty(), "{what} keeps {files:?}");
    let units = m.succeed("systemctl list-units --all --plain --no-legend 'cgipool*'")?;
    ensure!(
        units.trim().is_empty(),
        "{what} keeps units loaded: {units}"
    );
    Ok(())
}
