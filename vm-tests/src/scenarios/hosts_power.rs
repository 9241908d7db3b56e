//! Many hosts (issue 20), a power cut: a worker host loses its power under
//! load and boots again on its disk; watch on the front takes it out of
//! nginx's upstream within 3 s and puts it back once its workers run again.
use super::hosts_failover::{
    finish_failover, load_with_web2_serving, now_unix, pool_on_web1_and_web2,
    status_lists_web2_unreadable, web2_answers_through_front, web2_leaves, web2_returns,
};
use crate::lab::Lab;
use anyhow::{ensure, Context, Result};
use std::time::Duration;

const WORKERS: &str = "cgipool-hello.socket cgipool-hello@1.service cgipool-hello@2.service";

/// A pool on web1 and web2 only, served through the front under wrk
/// (`Connection: close`, GETs): web2's power is cut (all of it stops at
/// once); watch on the front takes it out of nginx's upstream within 3 s
/// (scaled), no request fails, `cgipool status` lists web2 as unreadable.
/// web2 boots again on its disk: its workers start with the boot (their
/// units and `.wants` links are on its disk, cgipool.target is wanted by
/// multi-user.target), its ssh host key is the one the front knows, and it
/// returns to the upstream and answers through the front.
pub(super) fn power_cycle(lab: &mut Lab) -> Result<()> {
    let servers = pool_on_web1_and_web2(lab)?;
    let web2_address = lab.address("web2");
    let host_key = lab
        .machine("web2")
        .succeed("cat /etc/ssh/ssh_host_ed25519_key.pub")?;

    let mut load = load_with_web2_serving(lab)?;

    lab.power_off("web2")?;
    let cut = now_unix();
    let front = lab.machine("front");
    let left = web2_leaves(front, &mut load, &servers, cut, "powered off")?;
    println!(
        "web2 left the front's upstream {left:.2}s after its power was cut (bound {:.1}s)",
        front.scaled(Duration::from_secs(3)).as_secs_f64()
    );
    status_lists_web2_unreadable(front, &mut load, "powered off")?;

    let powered_on = now_unix();
    lab.boot("web2")?;
    let booted = now_unix();
    println!(
        "web2 booted again in {:.2}s (power on to boot finished)",
        booted - powered_on
    );
    // The workers came up with the boot itself, before watch could
    // converge web2: active, and active since before boot finished.
    let web2 = lab.machine("web2");
    let states = web2.succeed(&format!("systemctl is-active {WORKERS}"))?;
    ensure!(
        states.lines().all(|s| s == "active"),
        "web2's pool after its boot ({WORKERS}):\n{states}"
    );
    let started = web2.succeed(
        "f=$(systemctl show -P FinishTimestampMonotonic); \
         for u in cgipool-hello@1.service cgipool-hello@2.service; do \
           a=$(systemctl show -P ActiveEnterTimestampMonotonic $u); \
           echo \"$u active at $a, boot finished at $f\"; test \"$a\" -gt 0 && test \"$a\" -le \"$f\" || exit 1; \
         done",
    )
    .context("web2's workers were not started by its boot")?;
    println!("{}", started.trim_end());

    let front = lab.machine("front");
    let back = web2_returns(front, &mut load, &servers.web2, booted, "booted again")?;
    println!("web2 returned to the front's upstream {back:.2}s after its boot finished");
    web2_answers_through_front(front, &mut load)?;
    // The disk survived: web2 has the host key the front's known_hosts
    // lists (ssh in BatchMode refuses a key it does not know).
    let key_now = front
        .succeed(&format!(
            "ssh -o BatchMode=yes -o StrictHostKeyChecking=yes root@{web2_address} cat /etc/ssh/ssh_host_ed25519_key.pub"
        ))
        .context("the front logging in to web2 after its boot")?;
    ensure!(
        key_now == host_key,
        "web2's host key changed over the power cut:\nbefore: {host_key}after: {key_now}"
    );
    finish_failover(load, front, "power cut under load")?;
    // What watch did about web2, for the record.
    let watch = front
        .succeed("journalctl -q -o cat -u cgipool-watch.service | grep 'host web2' | tail -n 8")?;
    println!("watch on web2:\n{}", watch.trim_end());
    Ok(())
}
