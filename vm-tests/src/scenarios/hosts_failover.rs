//! Many hosts (issue 20), failover: a worker host goes away under load and
//! comes back; watch on the front takes it out of nginx's upstream and puts
//! it back, and nginx retries the requests it cannot take.
use super::hosts::{install_whoami, WHOAMI};
use crate::lab::Lab;
use crate::machine::Machine;
use crate::scenarios::common;
use crate::scenarios::edge::{read_errors, Load, WrkReport};
use anyhow::{ensure, Result};
use std::time::Duration;

pub(super) const UPSTREAMS: &str = "/etc/nginx/conf.d/cgipool-upstreams.conf";

/// The wall clock in seconds (host and nspawn guests share the kernel's).
pub(super) fn now_unix() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The front's locations file: its `/.cgipool/generation` answer names the
/// files on disk.
const LOCATIONS: &str = "/etc/nginx/snippets/cgipool-locations.conf";

/// A guest command that waits (at most `limit`) until nginx serves an
/// upstream with `server` (`present`) or without it, then writes the wall
/// clock into `/tmp/seen-at`. Served, not written: the upstreams file must
/// say so and nginx must serve the generation of the files on disk (a
/// converge writes the files before it reloads nginx, so the file alone
/// is ahead of what nginx serves for a moment).
pub(super) fn upstream_wait(server: &str, present: bool, limit: Duration) -> String {
    let listed = if present { "" } else { "! " };
    format!(
        "timeout {} sh -c 'until {listed}grep -qF {server} {UPSTREAMS} && \
           g=$(curl -sf http://127.0.0.1/.cgipool/generation) && [ -n \"$g\" ] && grep -qF \"$g\" {LOCATIONS}; \
         do sleep 0.05; done; date +%s.%N > /tmp/seen-at'",
        limit.as_secs().max(1)
    )
}

/// Seconds from `since` (wall clock) to what `upstream_wait` wrote.
pub(super) fn seen_after(m: &mut Machine, since: f64) -> Result<f64> {
    let at = m.succeed("cat /tmp/seen-at")?;
    let at: f64 = at
        .trim()
        .parse()
        .map_err(|e| anyhow::anyhow!("/tmp/seen-at reads {at:?}: {e}"))?;
    Ok(at - since)
}

/// A pool on web1 and web2 only (two workers each, `request_timeout` 3 s),
/// applied on the front, whose watch follows both hosts and whose upstream
/// lists both; returns their servers there.
pub(super) fn pool_on_web1_and_web2(lab: &mut Lab) -> Result<Servers> {
    lab.enable_ssh("front", &["web1", "web2"])?;
    install_whoami(lab, &["front", "web1", "web2"])?;
    let (web1, web2) = (lab.address("web1"), lab.address("web2"));
    // request_timeout: a request already on web2 when it goes away is
    // retried on web1 once this passes (GET is idempotent).
    let config = format!(
        "[nginx]\nfront_address = \"{}\"\n\n[host.web1]\naddress = \"root@{web1}\"\n\n\
         [host.web2]\naddress = \"root@{web2}\"\n\n[pool.hello]\nexec = \"{WHOAMI}\"\n\
         route = \"/api/hello\"\nhosts = [\"web1\", \"web2\"]\nport = 9101\nmin = 2\nmax = 2\n\
         request_timeout = \"3s\"\n",
        lab.address("front")
    );
    common::write_config(lab.machine("front"), &config)?;
    common::apply(lab.machine("front"))?;
    let front = lab.machine("front");
    super::hosts::wait_watch_follows(front, &["web1", "web2"])?;
    let servers = Servers {
        web1: format!("{web1}:9101"),
        web2: format!("{web2}:9101"),
    };
    let upstreams = front.succeed(&format!("cat {UPSTREAMS}"))?;
    ensure!(
        upstreams.contains(&servers.web1) && upstreams.contains(&servers.web2),
        "the front's upstreams before web2 goes away:\n{upstreams}"
    );
    Ok(servers)
}

/// The pool's servers (`ADDRESS:PORT`) in the front's upstream.
pub(super) struct Servers {
    pub web1: String,
    pub web2: String,
}

/// Under `load`, waits until web2 has left the front's
/// upstream, which must take at most 3 s (scaled) from `since`, when it
/// went away (`how`); web1 must stay. Returns the seconds it took.
pub(super) fn web2_leaves(
    front: &mut Machine,
    load: &mut Load,
    servers: &Servers,
    since: f64,
    how: &str,
) -> Result<f64> {
    let bound = front.scaled(Duration::from_secs(3));
    let leaves = upstream_wait(&servers.web2, false, front.scaled(Duration::from_secs(30)));
    load.step(
        front,
        &format!("web2 {how}; wait for it to leave the upstream"),
        &leaves,
    )?;
    let left = seen_after(front, since)?;
    ensure!(
        left <= bound.as_secs_f64(),
        "web2 left the upstream {left:.2}s after it was {how}, over {:.1}s ({})",
        bound.as_secs_f64(),
        front.limit_note(Duration::from_secs(3))
    );
    let upstreams = front.succeed(&format!("cat {UPSTREAMS}"))?;
    ensure!(
        upstreams.contains(&servers.web1),
        "web1 left the upstream with web2:\n{upstreams}"
    );
    Ok(left)
}

/// wrk through the front (8 `Connection: close` clients, 30 s scaled),
/// once web2's workers report requests served: web2 serves part of the
/// load before it goes away.
pub(super) fn load_with_web2_serving(lab: &mut Lab) -> Result<Load> {
    let front = lab.machine("front");
    let secs = front.scaled(Duration::from_secs(30)).as_secs();
    let load = Load::start(front, 8, secs, "http://127.0.0.1/api/hello")?;
    lab.machine("web2").wait_until_succeeds(
        "systemctl show -P StatusText cgipool-hello@1.service cgipool-hello@2.service | grep -q 'requests=[1-9]'",
        "web2's workers to report requests served",
        Duration::from_secs(15),
    )?;
    Ok(load)
}

/// Under `load`, waits until web2's `server` is back in the front's
/// upstream after it `how` at `since`; returns the seconds it took.
pub(super) fn web2_returns(
    front: &mut Machine,
    load: &mut Load,
    server: &str,
    since: f64,
    how: &str,
) -> Result<f64> {
    let returns = upstream_wait(server, true, front.scaled(Duration::from_secs(30)));
    load.step(
        front,
        &format!("web2 {how}; wait for it to return to the upstream"),
        &returns,
    )?;
    seen_after(front, since)
}

/// Under `load`, `cgipool status` on the front still lists both hosts:
/// web1 healthy, web2 (`how`) with the reason it cannot be read.
pub(super) fn status_lists_web2_unreadable(
    front: &mut Machine,
    load: &mut Load,
    how: &str,
) -> Result<()> {
    let started = std::time::Instant::now();
    load.step(
        front,
        &format!("cgipool status, web2 {how}"),
        // watch publishes its view after each step: the step that took
        // web2 out may still be reloading nginx when the file changed.
        &format!(
            "timeout {} sh -c 'until cgipool status > /tmp/status.txt && grep -q \"not routed\" /tmp/status.txt; do sleep 0.2; done'; \
             curl -sf --unix-socket /run/cgipool/watch.sock http://watch/pool-status > /tmp/pool-status.json",
            front.scaled(Duration::from_secs(15)).as_secs()
        ),
    )?;
    let took = started.elapsed().as_secs_f64();
    let status = front.succeed("cat /tmp/status.txt")?;
    let pool_status = front.succeed(
        "python3 -c 'import json; d=json.load(open(\"/tmp/pool-status.json\")); print(json.dumps(d[\"hosts\"]))'",
    )?;
    // Read from each host, and watch's own view of it (web2 out of nginx).
    ensure!(
        status.contains("pool hello on host web1: 2 healthy of 2 wanted")
            && status.contains("pool hello on host web2: 0 healthy of 2 wanted")
            && status.contains("cannot read the host")
            && status.contains("watch: host up for")
            && status.contains("watch: host lost for")
            && status.contains("not routed by the front's nginx"),
        "cgipool status while web2 is {how}:\n{status}\nwatch's /pool-status hosts after it:\n{pool_status}"
    );
    println!("cgipool status with web2 {how} took {took:.1}s");
    Ok(())
}

/// Under `load`, one of (at most) 60 requests through the front is
/// answered by a worker of web2's.
pub(super) fn web2_answers_through_front(front: &mut Machine, load: &mut Load) -> Result<()> {
    load.step(
        front,
        "web2 answers through the front again",
        "for i in $(seq 1 60); do curl -sS -D - -o /dev/null -H 'Connection: close' http://127.0.0.1/api/hello | grep -qi '^x-cgipool-worker: web2/' && exit 0; done; exit 1",
    )
}

/// A pool on web1 and web2 only, served through the front under wrk
/// (`Connection: close`, GETs): web2's cable is pulled (for the front it
/// is as if it lost power: no answer, no reset); watch on the front loses
/// it and takes it out of nginx's upstream within 3 s (scaled), no request
/// fails (nginx retries the other host), `cgipool status` still lists both
/// hosts; plugged back, web2 returns to the upstream and answers again.
pub(super) fn failover(lab: &mut Lab) -> Result<()> {
    let servers = pool_on_web1_and_web2(lab)?;
    let front = lab.machine("front");
    // watch reads root's ssh key through the one hole in ProtectHome.
    let home = front.unit_property("cgipool-watch.service", "ProtectHome")?;
    ensure!(
        home == "tmpfs",
        "cgipool-watch.service has ProtectHome={home}"
    );
    // Its exposure next to the same unit with ProtectHome=yes (no hosts),
    // both read offline from the files.
    let score = front.succeed(
        "systemd-analyze security --offline=true --no-pager /etc/systemd/system/cgipool-watch.service | grep -E 'ProtectHome|Overall'; \
         sed -e 's/^ProtectHome=tmpfs/ProtectHome=yes/' -e '/^BindReadOnlyPaths=/d' \
           /etc/systemd/system/cgipool-watch.service > /tmp/cgipool-watch.service; \
         systemd-analyze security --offline=true --no-pager /tmp/cgipool-watch.service | grep -E 'ProtectHome|Overall' | sed 's/^/without hosts: /'",
    )?;
    println!(
        "systemd-analyze security cgipool-watch.service (hosts configured):\n{}",
        score.trim_end()
    );

    let mut load = load_with_web2_serving(lab)?;

    lab.unplug("web2")?;
    let pulled = now_unix();
    let front = lab.machine("front");
    let left = web2_leaves(front, &mut load, &servers, pulled, "unplugged")?;
    println!(
        "web2 left the front's upstream {left:.2}s after its cable was pulled (bound {:.1}s)",
        front.scaled(Duration::from_secs(3)).as_secs_f64()
    );
    status_lists_web2_unreadable(front, &mut load, "unplugged")?;

    lab.plug("web2")?;
    let plugged = now_unix();
    let front = lab.machine("front");
    let back = web2_returns(front, &mut load, &servers.web2, plugged, "plugged back")?;
    println!("web2 returned to the front's upstream {back:.2}s after its cable was plugged back");
    web2_answers_through_front(front, &mut load)?;
    finish_failover(load, front, "failover under load")?;
    print_retries(front)
}

/// Waits for wrk after a host went away under it: no non-2xx response and
/// no socket error, except one kind that no proxy can retry: a response
/// whose header nginx had already sent to the client when the rest of it
/// was lost with the host (nginx logs "upstream timed out … while reading
/// upstream" at request_timeout and closes the client's connection, which
/// wrk counts as a read error). Those are counted and printed, and there
/// may be no more read errors than nginx logged such cuts.
pub(super) fn finish_failover(load: Load, front: &mut Machine, what: &str) -> Result<WrkReport> {
    let report = load.finish_allowing_read_errors(front, what, 500)?;
    let cut: u64 = front
        .succeed("grep -c 'while reading upstream' /var/log/nginx/error.log || true")?
        .trim()
        .parse()
        .unwrap_or(0);
    let read = read_errors(&report.text);
    ensure!(
        read <= cut,
        "{what}: {read} read errors, but nginx cut only {cut} responses mid-body:\n{}",
        report.text
    );
    println!(
        "{what}: {} requests, {} non-2xx, {} socket errors ({cut} responses cut mid-body by the lost host, which no proxy can retry)",
        report.requests, report.non_2xx, report.socket_errors
    );
    Ok(report)
}

/// What nginx retried on the other host (for the record, not asserted).
pub(super) fn print_retries(front: &mut Machine) -> Result<()> {
    let retried = front.succeed(
        "echo connect: $(grep -c 'while connecting to upstream' /var/log/nginx/error.log); \
         echo response: $(grep -c 'while reading response header from upstream' /var/log/nginx/error.log)",
    )?;
    println!(
        "nginx's upstream errors during the failover (each retried on the next host): {}",
        retried.split_whitespace().collect::<Vec<_>>().join(" ")
    );
    Ok(())
}
