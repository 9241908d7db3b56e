//! Many hosts (issue 20): scenarios over a front and two worker hosts on a
//! lab network (lab.rs), the front reaching the workers' systemd over ssh
//! and systemd-stdio-bridge.
use crate::lab::Lab;
use crate::LabScenario;
use anyhow::{ensure, Result};
use std::time::{Duration, Instant};

pub fn scenarios() -> Vec<LabScenario> {
    vec![
        LabScenario {
            name: "hosts_transport",
            machines: &["front", "web1", "web2"],
            expect_failure: false,
            run: transport,
        },
        LabScenario {
            name: "hosts_selftest_failure_tears_down",
            machines: &["front", "web1"],
            expect_failure: true,
            run: failing,
        },
    ]
}

/// A harness self-test: the machines see each other, then an assertion
/// fails; the runner checks the artifacts and that the network is gone.
fn failing(lab: &mut Lab) -> Result<()> {
    let web1 = lab.address("web1");
    lab.machine("front").wait_until_succeeds(
        &format!("curl -sS -o /dev/null http://{web1}/"),
        "web1's nginx to answer the front over the lab network",
        Duration::from_secs(10),
    )?;
    let seen = lab.machine("front").succeed("hostname")?;
    ensure!(
        seen.trim() == "web1",
        "self-test assertion: the front's hostname is {:?}, the harness expects this to fail",
        seen.trim()
    );
    Ok(())
}

const CGIPOOL: &str = "/payload/bin/cgipool";
const PROBE: &str = "hosts-probe.service";

/// The front reads a unit on each worker host through cgipool's remote
/// transport and gets what that host's own systemd says; a host that cannot
/// be reached, or refuses the key, fails in bounded time naming it.
fn transport(lab: &mut Lab) -> Result<()> {
    // The lab network is all the front has: no route leads out of it.
    let routes = lab.machine("front").succeed("ip -4 route")?;
    ensure!(
        routes.lines().count() == 1 && routes.starts_with("10.231.0.0/24 dev host0 "),
        "the front's routes are not just the lab network: {routes}"
    );
    lab.enable_ssh("front", &["web1", "web2"])?;

    // One unit, a different state on each host: running on web1, failed on
    // web2, unknown on the front.
    lab.machine("web1")
        .succeed(&format!("systemd-run --unit={PROBE} sleep infinity"))?;
    lab.machine("web2")
        .succeed(&format!("systemd-run --unit={PROBE} false"))?;
    lab.machine("web2").wait_until_succeeds(
        &format!("test \"$(systemctl show -P ActiveState {PROBE})\" = failed"),
        "the probe on web2 to fail",
        Duration::from_secs(10),
    )?;

    for (web, expected) in [("web1", "active running"), ("web2", "failed failed")] {
        let addr = lab.address(web);
        let m = lab.machine(web);
        let own = [
            m.unit_property(PROBE, "LoadState")?,
            m.unit_property(PROBE, "ActiveState")?,
            m.unit_property(PROBE, "SubState")?,
        ]
        .join(" ");
        ensure!(
            own == format!("loaded {expected}"),
            "{web} says {PROBE} is {own:?}, the scenario set up {expected:?}"
        );
        let seen = lab.machine("front").succeed(&format!(
            "{CGIPOOL} debug remote-unit --host root@{addr} {PROBE}"
        ))?;
        ensure!(
            seen.trim() == format!("root@{addr} {PROBE} {own}"),
            "over the remote transport the front read {:?}; {web} itself says {own:?}",
            seen.trim()
        );
    }
    // systemd's own client on the same path agrees.
    let web1 = lab.address("web1");
    let said = lab
        .machine("front")
        .succeed(&format!("systemctl -H root@{web1} is-active {PROBE}"))?;
    ensure!(
        said.trim() == "active",
        "systemctl -H root@{web1} says {PROBE} is {:?}",
        said.trim()
    );
    let local = lab.machine("front").succeed(&format!(
        "systemctl show -P LoadState {PROBE}; systemctl show -P ActiveState {PROBE}"
    ))?;
    ensure!(
        local.split_whitespace().collect::<Vec<_>>() == ["not-found", "inactive"],
        "the front has a {PROBE} of its own ({local:?}): the reads above prove nothing"
    );

    // A host nobody answers for, and one that refuses the key: exit 1 within
    // a bounded time, naming the host.
    let nobody = lab.unused_address();
    for (host, what) in [
        (format!("root@{nobody}"), "an address nobody answers"),
        (format!("nobody@{web1}"), "a user without the key"),
    ] {
        let front = lab.machine("front");
        let bound = front.scaled(Duration::from_secs(30));
        let started = Instant::now();
        let out = front.fail(&format!(
            "{CGIPOOL} debug remote-unit --timeout 20 --host {host} {PROBE}"
        ))?;
        let took = started.elapsed();
        ensure!(
            out.rc == 1,
            "{what} ({host}): exit {}, expected 1; stderr: {}",
            out.rc,
            out.stderr
        );
        ensure!(
            out.stderr.contains(&format!("cgipool: {host}: ")),
            "{what}: the error does not name {host}: {}",
            out.stderr
        );
        ensure!(
            took < bound,
            "{what} ({host}) took {:.1}s to fail, over {:.1}s",
            took.as_secs_f64(),
            bound.as_secs_f64()
        );
    }

    // A port that accepts the connection and never speaks: the whole connect
    // is bounded by --timeout (and ssh reaches the port given after ':').
    // cgipool fails after 5 s; zbus does not kill the ssh it started, which
    // keeps the command's stderr open until its ConnectTimeout (10 s).
    let web1_m = lab.machine("web1");
    web1_m.succeed(
        "systemd-run --unit=silent-port.service python3 -c \
         'import socket, time; s = socket.create_server((\"\", 2222)); c = s.accept(); time.sleep(600)'",
    )?;
    web1_m.wait_until_succeeds(
        "ss -Hltn 'sport = :2222' | grep -q LISTEN",
        "a silent listener on web1:2222",
        Duration::from_secs(10),
    )?;
    let host = format!("root@{web1}:2222");
    let front = lab.machine("front");
    let bound = front.scaled(Duration::from_secs(30));
    let started = Instant::now();
    let out = front.fail(&format!(
        "{CGIPOOL} debug remote-unit --timeout 5 --host {host} {PROBE}"
    ))?;
    let took = started.elapsed();
    ensure!(
        out.rc == 1
            && out.stderr.contains(&format!(
                "cgipool: {host}: its system bus did not answer over ssh within 5s"
            )),
        "a silent port ({host}): exit {}, stderr {}",
        out.rc,
        out.stderr
    );
    ensure!(
        took < bound,
        "a silent port ({host}) took {:.1}s to fail, over {:.1}s",
        took.as_secs_f64(),
        bound.as_secs_f64()
    );

    // A host name that ssh would take as an option is refused before
    // anything runs (exit 2, bad usage).
    let out = lab.machine("front").fail(&format!(
        "{CGIPOOL} debug remote-unit --host=-oProxyCommand=/tmp/x {PROBE}"
    ))?;
    ensure!(
        out.rc == 2
            && out.stderr.contains("is not a remote host")
            && out.stderr.contains("starts or ends with '-'"),
        "a host starting with '-': exit {}, stderr {}",
        out.rc,
        out.stderr
    );
    Ok(())
}
