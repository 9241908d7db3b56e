//! Many hosts (issue 20), autoscaling across hosts: watch on the front
//! samples a pool that runs on other hosts as a whole (the front's TCP
//! connections to each host's queue beyond its workers) and scales every
//! host at once, up under load and back down when it is idle.
use crate::lab::Lab;
use crate::machine::Machine;
use crate::scenarios::common;
use crate::scenarios::edge::Load;
use anyhow::{ensure, Result};
use std::time::Duration;

const POOL: &str = "search";

/// A guest command on the front that waits until `cgipool status` shows
/// `n` healthy of `n` wanted workers of the pool on each of `hosts`.
fn every_host_runs(hosts: &[&str], n: u32, limit: Duration) -> String {
    let checks: Vec<String> = hosts
        .iter()
        .map(|h| format!("grep -q \"on host {h}: {n} healthy of {n} wanted\" /tmp/status.txt"))
        .collect();
    format!(
        "timeout {} sh -c 'until cgipool status {POOL} > /tmp/status.txt 2>&1 && {}; do sleep 0.3; done'",
        limit.as_secs().max(1),
        checks.join(" && ")
    )
}

/// Seconds since `since`, for the record.
fn secs_since(since: std::time::Instant) -> f64 {
    since.elapsed().as_secs_f64()
}

/// The pool's active workers on one host.
fn active_on(m: &mut Machine) -> Result<u32> {
    let out = m.succeed(&format!(
        "systemctl list-units --no-legend --plain --state=active 'cgipool-{POOL}@*.service' | wc -l"
    ))?;
    Ok(out.trim().parse()?)
}

/// A slow pool (20 ms a request) on web1 and web2 only, min 2 and max 6
/// per host, under 32 `Connection: close` clients through the front: watch
/// scales it 2 -> 4 -> 6 on both hosts, no request fails; once the load
/// stops it scales both back to 2. Its log names each host's share.
pub(super) fn autoscale(lab: &mut Lab) -> Result<()> {
    lab.enable_ssh("front", &["web1", "web2"])?;
    for name in ["front", "web1", "web2"] {
        common::install(lab.machine(name))?;
    }
    let (web1, web2) = (lab.address("web1"), lab.address("web2"));
    let config = format!(
        "[nginx]\nfront_address = \"{}\"\n\n[host.web1]\naddress = \"root@{web1}\"\n\n\
         [host.web2]\naddress = \"root@{web2}\"\n\n[pool.{POOL}]\n\
         exec = \"/usr/local/lib/cgipool/search\"\nroute = \"/api/search\"\n\
         hosts = [\"web1\", \"web2\"]\nport = 9102\nmin = 2\nmax = 6\n\
         environment = {{ CGIPOOL_TEST_DELAY_MS = \"20\" }}\n\
         scale_up_after = \"2s\"\nscale_down_after = \"5s\"\n",
        lab.address("front")
    );
    let front = lab.machine("front");
    common::write_config(front, &config)?;
    common::apply(front)?;
    super::hosts::wait_watch_follows(front, &["web1", "web2"])?;
    for h in ["web1", "web2"] {
        let n = active_on(lab.machine(h))?;
        ensure!(
            n == 2,
            "{h} runs {n} workers of {POOL} before the load, not min=2"
        );
    }

    let front = lab.machine("front");
    let secs = front.scaled(Duration::from_secs(45)).as_secs();
    let up_bound = front.scaled(Duration::from_secs(30));
    let mut load = Load::start(front, 32, secs, "http://127.0.0.1/api/search?q=load")?;
    let started = std::time::Instant::now();
    load.step(
        front,
        "wait for 6 workers on both hosts",
        &every_host_runs(&["web1", "web2"], 6, up_bound),
    )?;
    let grown = secs_since(started);
    // watch's view of the other hosts, under the load: both up and routed,
    // the front's connections to each counted.
    load.step(
        front,
        "read watch's view of the hosts",
        "cgipool status search > /tmp/status-hosts.txt && \
         curl -sf --unix-socket /run/cgipool/watch.sock http://watch/metrics > /tmp/metrics.txt",
    )?;
    let status = front.succeed("cat /tmp/status-hosts.txt")?;
    let metrics = front.succeed("cat /tmp/metrics.txt")?;
    for h in ["web1", "web2"] {
        ensure!(
            status.contains(&format!("pool {POOL} on host {h}:"))
                && metrics.contains(&format!("cgipool_host_up{{host=\"{h}\"}} 1"))
                && metrics.contains(&format!(
                    "cgipool_host_pool_routed{{host=\"{h}\",pool=\"{POOL}\"}} 1"
                ))
                && metrics.contains(&format!(
                    "cgipool_host_pool_connections{{host=\"{h}\",pool=\"{POOL}\"}}"
                )),
            "watch's view of {h} under load:\n{status}\n{metrics}"
        );
    }
    ensure!(
        status.matches("watch: host up for").count() == 2
            && status.matches("routed by the front's nginx, ").count() == 2
            && status.contains(" active at its last read, "),
        "cgipool status lacks watch's view of the hosts:\n{status}"
    );
    println!(
        "both hosts reached max=6 workers {grown:.1}s into the load (bound {:.0}s)",
        up_bound.as_secs_f64()
    );
    let report = load.finish(front, "autoscaling across hosts", 500)?;
    println!(
        "autoscaling across hosts: {} requests, {} non-2xx, {} socket errors",
        report.requests, report.non_2xx, report.socket_errors
    );

    // Idle: halved after 5 s, then again, down to min on both hosts.
    let idle = std::time::Instant::now();
    let down_bound = Duration::from_secs(10) + front.scaled(Duration::from_secs(20));
    front.succeed_within(
        &every_host_runs(&["web1", "web2"], 2, down_bound),
        down_bound + Duration::from_secs(5),
    )?;
    println!(
        "both hosts back at min=2 workers {:.1}s after the load stopped",
        secs_since(idle)
    );
    for h in ["web1", "web2"] {
        let n = active_on(lab.machine(h))?;
        ensure!(n == 2, "{h} runs {n} workers of {POOL} after scaling down");
    }
    let front = lab.machine("front");
    let log = front.succeed("journalctl -b -o cat -u cgipool-watch.service | grep 'scale '")?;
    ensure!(
        log.contains(&format!("pool {POOL}: scale 2 -> 4"))
            && log.contains("host web1: ")
            && log.contains("host web2: ")
            && log.contains("idle for"),
        "watch's log lacks a decision up with each host's share and one down:\n{log}"
    );
    println!("watch's decisions:\n{}", log.trim_end());
    let status = front.succeed(&format!("cgipool status {POOL}"))?;
    ensure!(
        status.contains("watch scaled"),
        "cgipool status does not show watch's last decision:\n{status}"
    );
    Ok(())
}
