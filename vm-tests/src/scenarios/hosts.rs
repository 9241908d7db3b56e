//! Many hosts (issue 20): scenarios over a front and two worker hosts on a
//! lab network (lab.rs), the front reaching the workers' systemd over ssh
//! and systemd-stdio-bridge.
use crate::lab::Lab;
use crate::machine::Machine;
use crate::scenarios::common::{self, CONFIG};
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
            name: "hosts_apply_serves_from_both",
            machines: &["front", "web1", "web2"],
            expect_failure: false,
            run: apply_serves_from_both,
        },
        LabScenario {
            name: "hosts_unreachable_changes_nothing",
            machines: &["front", "web1"],
            expect_failure: false,
            run: super::hosts_unreachable::unreachable_changes_nothing,
        },
        LabScenario {
            name: "hosts_failed_worker_keeps_front",
            machines: &["front", "web1"],
            expect_failure: false,
            run: failed_worker_keeps_front,
        },
        LabScenario {
            name: "hosts_failover",
            machines: &["front", "web1", "web2"],
            expect_failure: false,
            run: super::hosts_failover::failover,
        },
        LabScenario {
            name: "hosts_fastcgi_failover",
            machines: &["front", "web1", "web2"],
            expect_failure: false,
            run: super::hosts_fastcgi::fastcgi_failover,
        },
        LabScenario {
            name: "hosts_autoscale",
            machines: &["front", "web1", "web2"],
            expect_failure: false,
            run: super::hosts_scale::autoscale,
        },
        LabScenario {
            name: "hosts_kill_points_converge",
            machines: &["front", "web1", "web2"],
            expect_failure: false,
            run: super::hosts_kill::kill_points,
        },
        LabScenario {
            name: "hosts_power_cycle",
            machines: &["front", "web1", "web2"],
            expect_failure: false,
            run: super::hosts_power::power_cycle,
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

/// Waits until watch on the front has converged each of `hosts` (it
/// follows them).
pub(super) fn wait_watch_follows(front: &mut Machine, hosts: &[&str]) -> Result<()> {
    front.wait_for_unit("cgipool-watch.service")?;
    for h in hosts {
        front.wait_until_succeeds(
            &format!("journalctl -q -u cgipool-watch.service | grep -q 'host {h} (root@.*): converged to intent'"),
            &format!("watch to follow {h}"),
            Duration::from_secs(30),
        )?;
    }
    Ok(())
}

/// A worker that names its host: hello.py with the host name in front of
/// the instance (`web1/hello@1`), installed on every machine.
pub(super) const WHOAMI: &str = "/usr/local/lib/cgipool/whoami";

pub(super) fn install_whoami(lab: &mut Lab, names: &[&str]) -> Result<()> {
    for name in names {
        let m = lab.machine(name);
        common::install(m)?;
        m.write_text(
            WHOAMI,
            "#!/bin/sh\nCGIPOOL_WORKER=\"$(uname -n)/$CGIPOOL_WORKER\" exec /usr/local/lib/cgipool/hello.py \"$@\"\n",
        )?;
        m.succeed(&format!("chmod 0755 {WHOAMI}"))?;
    }
    Ok(())
}

/// One pool on the front, web1 and web2 (`hosts`), `port` its TCP queue
/// on the workers' hosts; extra `[host]` sections and lines after it.
pub(super) fn hosts_config(lab: &Lab, hosts: &[&str], extra: &str) -> String {
    let mut text = format!(
        "[watch]\nenabled = false\n\n[nginx]\nfront_address = \"{}\"\n\n",
        lab.address("front")
    );
    for h in hosts {
        text.push_str(&format!(
            "[host.{h}]\naddress = \"root@{}\"\n\n",
            lab.address(h)
        ));
    }
    let list: Vec<String> = std::iter::once("local")
        .chain(hosts.iter().copied())
        .map(|h| format!("{h:?}"))
        .collect();
    text.push_str(&format!(
        "[pool.hello]\nexec = \"{WHOAMI}\"\nroute = \"/api/hello\"\nhosts = [{}]\nport = 9101\nmin = 1\nmax = 2\n{extra}\n",
        list.join(", ")
    ));
    text
}

/// The worker (`host/hello@n`) that answered each of `n` requests through
/// the front's nginx; every one must be a 200.
pub(super) fn answered_by(lab: &mut Lab, n: usize) -> Result<Vec<String>> {
    let mut by = Vec::new();
    for _ in 0..n {
        let (code, headers, body) = common::request(
            lab.machine("front"),
            "-H 'Connection: close' http://127.0.0.1/api/hello",
        )?;
        ensure!(
            code == 200,
            "a request through the front got {code}: {headers}\n{body}"
        );
        let worker = common::header(&headers, "X-Cgipool-Worker")
            .unwrap_or("")
            .to_string();
        by.push(worker);
    }
    Ok(by)
}

/// One config, workers on the front, web1 and web2: apply from the front
/// starts them on every host, nginx on the front routes to all three, a
/// worker's TCP queue takes connections from the front only, and `down`
/// leaves nothing of cgipool's on any host.
fn apply_serves_from_both(lab: &mut Lab) -> Result<()> {
    lab.enable_ssh("front", &["web1", "web2"])?;
    install_whoami(lab, &["front", "web1", "web2"])?;
    let config = hosts_config(lab, &["web1", "web2"], "");
    common::write_config(lab.machine("front"), &config)?;
    // --dry-run: every host's plan, then the front's; nothing written anywhere.
    let plan = lab
        .machine("front")
        .succeed(&format!("cgipool apply --dry-run {CONFIG}"))?;
    for h in ["web1", "web2"] {
        let heading = format!("host {h} (root@{}):", lab.address(h));
        ensure!(
            plan.contains(&heading),
            "the dry run has no {heading:?}:\n{plan}"
        );
    }
    ensure!(
        plan.contains("front:") && plan.contains("cgipool-hello.socket"),
        "the dry run:\n{plan}"
    );
    for h in ["front", "web1", "web2"] {
        let left = common::unit_dir_listing(lab.machine(h))?;
        ensure!(left.is_empty(), "the dry run wrote {left:?} on {h}");
    }
    let out = common::apply(lab.machine("front"))?;
    for h in ["web1", "web2"] {
        ensure!(
            out.contains(&format!("host {h} (root@")),
            "apply's output names no host {h}:\n{out}"
        );
    }

    // Every host runs one worker of the pool (min = 1 per host).
    for h in ["front", "web1", "web2"] {
        let m = lab.machine(h);
        let state = m.unit_property("cgipool-hello@1.service", "ActiveState")?;
        ensure!(state == "active", "{h}: cgipool-hello@1.service is {state}");
    }
    let sock = lab
        .machine("web1")
        .succeed("systemctl show -P Listen cgipool-hello.socket")?;
    ensure!(
        sock.trim() == format!("{}:9101 (Stream)", lab.address("web1")),
        "web1's queue listens on {sock:?}"
    );

    // status on the front lists every host's workers.
    let status = lab.machine("front").succeed("cgipool status")?;
    for line in [
        "pool hello: 1 healthy of 1 wanted",
        "pool hello on host web1: 1 healthy of 1 wanted",
        "pool hello on host web2: 1 healthy of 1 wanted",
    ] {
        ensure!(
            status.contains(line),
            "cgipool status lacks {line:?}:\n{status}"
        );
    }

    // Requests through the front are answered on every host (nginx takes
    // its servers in turn: each host's queue is listed once).
    let by = answered_by(lab, 12)?;
    for h in ["front", "web1", "web2"] {
        ensure!(
            by.iter().any(|w| w.starts_with(&format!("{h}/hello@"))),
            "no request was answered on {h}: {by:?}"
        );
    }

    // web1's queue answers the front and no one else (web2 is on the same network).
    let web1 = lab.address("web1");
    let (code, _, _) = common::request(
        lab.machine("front"),
        &format!("--max-time 10 http://{web1}:9101/api/hello"),
    )?;
    ensure!(
        code == 200,
        "the front connecting to web1:9101 directly got {code}"
    );
    // systemd loaded the filter on web1's queue as rendered ...
    let web1_m = lab.machine("web1");
    let allow = web1_m.unit_property("cgipool-hello.socket", "IPAddressAllow")?;
    let deny = web1_m.unit_property("cgipool-hello.socket", "IPAddressDeny")?;
    let front_addr = lab.address("front");
    ensure!(
        allow
            .split_whitespace()
            .map(|a| a.trim_end_matches("/32"))
            .collect::<Vec<_>>()
            == [front_addr.as_str()]
            && deny.contains("0.0.0.0/0")
            && deny.contains("::/0"),
        "web1's queue filters IPAddressAllow={allow:?} IPAddressDeny={deny:?}, expected the front only"
    );
    // ... and enforces it. systemd attaches IP filters as cgroup BPF
    // programs; where it cannot (nspawn's default seccomp filter refuses
    // bpf(), which lab.rs allows), it loads the filter and proceeds without
    // it. So first a unit of web2's own that may not talk to anyone: it
    // must not reach the front.
    let front_addr = lab.address("front");
    let web2 = lab.machine("web2");
    let probe = web2.execute(
        &format!("systemd-run --wait -q -p IPAddressDeny=any curl -sS -o /dev/null --connect-timeout 3 --max-time 5 http://{front_addr}/"),
        web2.scaled(Duration::from_secs(30)),
    )?;
    // The lab's guests may load cgroup BPF (lab.rs): a failure here is a
    // harness that lost it, not a pass.
    ensure!(
        probe.rc != 0,
        "a unit with IPAddressDeny=any on web2 reached the front: systemd does not enforce IP filters in these guests, so the worker port's filter cannot be checked"
    );
    let refused = web2.execute(
        &format!(
            "curl -sS -o /dev/null --connect-timeout 3 --max-time 5 http://{web1}:9101/api/hello"
        ),
        web2.scaled(Duration::from_secs(30)),
    )?;
    ensure!(
        refused.rc != 0,
        "web2 reached web1's worker port (curl exit 0): IPAddressAllow= lets more than the front in"
    );
    println!(
        "web2 -> web1:9101 refused (curl exit {}: {}), the front's connections answered",
        refused.rc,
        refused.stderr.trim()
    );

    // A second apply changes nothing anywhere.
    let again = common::apply(lab.machine("front"))?;
    ensure!(
        again.matches("no changes").count() == 3,
        "a second apply changed something: {again}"
    );

    // scale: the count is per host, every host follows.
    lab.machine("front").succeed("cgipool scale hello 2")?;
    for h in ["front", "web1", "web2"] {
        let state = lab
            .machine(h)
            .unit_property("cgipool-hello@2.service", "ActiveState")?;
        ensure!(
            state == "active",
            "{h}: after scale, cgipool-hello@2.service is {state}"
        );
    }

    // A config without web2: the front stops routing to it, then web2 is
    // left with nothing of cgipool's.
    let config = hosts_config(lab, &["web1"], "");
    common::write_config(lab.machine("front"), &config)?;
    common::apply(lab.machine("front"))?;
    let web2_addr = lab.address("web2");
    let upstreams = lab
        .machine("front")
        .succeed("cat /etc/nginx/conf.d/cgipool-upstreams.conf")?;
    ensure!(
        !upstreams.contains(&web2_addr) && upstreams.contains(&web1),
        "the front's upstreams after dropping web2:\n{upstreams}"
    );
    let left = common::unit_dir_listing(lab.machine("web2"))?;
    ensure!(
        left.is_empty(),
        "web2 keeps {left:?} after the config dropped it"
    );
    let by = answered_by(lab, 6)?;
    ensure!(
        by.iter().all(|w| !w.starts_with("web2/")),
        "web2 still answers after the config dropped it: {by:?}"
    );

    // down: nothing of cgipool's on any host, no route on the front.
    lab.machine("front")
        .succeed(&format!("cgipool down {CONFIG}"))?;
    for h in ["front", "web1", "web2"] {
        let left = common::unit_dir_listing(lab.machine(h))?;
        ensure!(left.is_empty(), "{h} keeps {left:?} after down");
        let units = lab
            .machine(h)
            .succeed("systemctl list-units --all --plain --no-legend 'cgipool*'")?;
        ensure!(
            units.trim().is_empty(),
            "{h} keeps units loaded after down: {units}"
        );
    }
    let upstreams = lab
        .machine("front")
        .succeed("cat /etc/nginx/conf.d/cgipool-upstreams.conf")?;
    ensure!(
        !upstreams.contains("upstream"),
        "the front still routes after down: {upstreams}"
    );
    Ok(())
}

/// A pool whose workers cannot start on web1: apply fails naming web1
/// before the front changes (no route to workers that never came up), and
/// the next good apply takes web1's broken units away again.
fn failed_worker_keeps_front(lab: &mut Lab) -> Result<()> {
    lab.enable_ssh("front", &["web1"])?;
    install_whoami(lab, &["front", "web1"])?;
    let good = hosts_config(lab, &["web1"], "");
    common::write_config(lab.machine("front"), &good)?;
    common::apply(lab.machine("front"))?;
    let front_before = common::host_fingerprint(lab.machine("front"))?;

    let broken = format!(
        "{good}\n[pool.broken]\nexec = \"/usr/local/lib/cgipool/missing\"\nroute = \"/api/broken\"\nhosts = [\"web1\"]\nport = 9102\nmin = 1\nmax = 1\n"
    );
    common::write_config(lab.machine("front"), &broken)?;
    let out = lab
        .machine("front")
        .fail(&format!("cgipool apply {CONFIG}"))?;
    ensure!(
        out.rc == 1 && out.stderr.contains("host web1"),
        "apply with workers that cannot start on web1: exit {}, stderr {}",
        out.rc,
        out.stderr
    );
    ensure!(
        common::host_fingerprint(lab.machine("front"))? == front_before,
        "the front's unit directory or nginx files changed although web1's workers failed"
    );
    let by = answered_by(lab, 4)?;
    ensure!(
        by.iter().any(|w| w == "web1/hello@1") && by.iter().any(|w| w == "front/hello@1"),
        "after the failed apply the front and web1 do not both answer: {by:?}"
    );

    // The good config again: web1's broken pool goes, nothing else moves.
    common::write_config(lab.machine("front"), &good)?;
    common::apply(lab.machine("front"))?;
    let left = common::unit_dir_listing(lab.machine("web1"))?;
    ensure!(
        !left.iter().any(|l| l.contains("broken")),
        "web1 keeps the broken pool's units: {left:?}"
    );
    ensure!(
        common::host_fingerprint(lab.machine("front"))? == front_before,
        "the front changed although the config it ends with is the one it started with"
    );
    Ok(())
}
