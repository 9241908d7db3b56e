//! Many hosts (issue 20), failover of a FastCGI pool: php-cgi workers on
//! two hosts behind the front's nginx; one host goes away under load and
//! comes back. nginx retries the connects that time out on the other host
//! (`fastcgi_next_upstream error timeout`) until watch takes the host out.
use crate::lab::Lab;
use crate::machine::Machine;
use crate::scenarios::common;
use crate::scenarios::edge::Load;
use anyhow::{ensure, Result};
use std::time::Duration;

const UPSTREAMS: &str = "/etc/nginx/conf.d/cgipool-upstreams.conf";
const LOCATIONS: &str = "/etc/nginx/snippets/cgipool-locations.conf";
/// The pool's document root, the same on the front (nginx checks that the
/// script exists) and on the hosts (php-cgi runs it).
const DOCROOT: &str = "/srv/hosts-php";
const URL: &str = "http://127.0.0.1/php/host.php";

/// The wall clock in seconds (host and nspawn guests share the kernel's).
fn now_unix() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// A guest command that waits (at most `limit`) until `server` is in the
/// front's upstreams file (`present`) or not, then writes the wall clock
/// into `/tmp/seen-at` (as in hosts_failover.rs).
fn upstream_wait(server: &str, present: bool, limit: Duration) -> String {
    let until = if present { "until" } else { "while" };
    format!(
        "timeout {} sh -c '{until} grep -qF {server} {UPSTREAMS}; do sleep 0.05; done; date +%s.%N > /tmp/seen-at'",
        limit.as_secs().max(1)
    )
}

/// Seconds from `since` (wall clock) to what `upstream_wait` wrote.
fn seen_after(m: &mut Machine, since: f64) -> Result<f64> {
    let at = m.succeed("cat /tmp/seen-at")?;
    let at: f64 = at
        .trim()
        .parse()
        .map_err(|e| anyhow::anyhow!("/tmp/seen-at reads {at:?}: {e}"))?;
    Ok(at - since)
}

/// A guest command that succeeds once a request through the front is
/// answered by `host` (the name its script prints), within 60 tries.
fn answered_by(host: &str) -> String {
    format!(
        "for i in $(seq 1 60); do curl -sS -H 'Connection: close' {URL} | grep -qx {host} && exit 0; done; exit 1"
    )
}

/// `host.php`, which prints the name of the host that ran it, in
/// [`DOCROOT`] on each of `names`.
fn install_host_script(lab: &mut Lab, names: &[&str]) -> Result<()> {
    for name in names {
        let m = lab.machine(name);
        m.succeed(&format!("install -d -m 0755 {DOCROOT}"))?;
        m.write_text(
            &format!("{DOCROOT}/host.php"),
            "<?php echo gethostname(), \"\\n\";\n",
        )?;
        m.succeed(&format!("chmod 0644 {DOCROOT}/host.php"))?;
    }
    Ok(())
}

/// A php-cgi pool on web1 and web2 only, served through the front under
/// wrk (`Connection: close`, GETs): web2's cable is pulled (no answer, no
/// reset, as for a power loss); no request fails (nginx's connects to web2
/// time out after 1 s and go to web1), watch takes web2 out of the front's
/// upstream within 3 s (scaled); plugged back, web2 returns to the
/// upstream and its php-cgi answers again.
pub(super) fn fastcgi_failover(lab: &mut Lab) -> Result<()> {
    lab.enable_ssh("front", &["web1", "web2"])?;
    common::install(lab.machine("front"))?;
    install_host_script(lab, &["front", "web1", "web2"])?;
    let (web1, web2) = (lab.address("web1"), lab.address("web2"));
    // request_timeout: a script already running on web2 when it goes away
    // is re-run on web1 once this passes (GET is idempotent).
    let config = format!(
        "[nginx]\nfront_address = \"{}\"\n\n[host.web1]\naddress = \"root@{web1}\"\n\n\
         [host.web2]\naddress = \"root@{web2}\"\n\n[pool.php]\nprotocol = \"fastcgi\"\n\
         exec = \"/usr/bin/php-cgi\"\nroute = \"/php\"\ndocument_root = \"{DOCROOT}\"\n\
         hosts = [\"web1\", \"web2\"]\nport = 9103\nmin = 2\nmax = 2\nrequest_timeout = \"3s\"\n",
        lab.address("front")
    );
    common::write_config(lab.machine("front"), &config)?;
    common::apply(lab.machine("front"))?;
    let front = lab.machine("front");
    front.wait_for_unit("cgipool-watch.service")?;
    for h in ["web1", "web2"] {
        front.wait_until_succeeds(
            &format!("journalctl -q -u cgipool-watch.service | grep -q 'host {h} (root@.*): converged to intent'"),
            &format!("watch to follow {h}"),
            Duration::from_secs(30),
        )?;
    }
    let server2 = format!("{web2}:9103");
    let upstreams = front.succeed(&format!("cat {UPSTREAMS}"))?;
    ensure!(
        upstreams.contains(&format!("{web1}:9103")) && upstreams.contains(&server2),
        "the front's upstreams before the failover:\n{upstreams}"
    );
    // What nginx does with a connect that times out (for the record: the
    // load below is the test).
    let settings = front.succeed(&format!(
        "grep -E 'fastcgi_(connect_timeout|next_upstream) ' {LOCATIONS} | sort -u"
    ))?;
    println!("the pool's location on the front:\n{}", settings.trim_end());
    for h in ["web1", "web2"] {
        front.wait_until_succeeds(
            &answered_by(h),
            &format!("{h}'s php-cgi to answer through the front"),
            Duration::from_secs(15),
        )?;
    }

    let secs = front.scaled(Duration::from_secs(20)).as_secs();
    let mut load = Load::start(front, 8, secs, URL)?;
    load.step(front, "web2 answers under load", &answered_by("web2"))?;

    lab.unplug("web2")?;
    let pulled = now_unix();
    let front = lab.machine("front");
    let bound = front.scaled(Duration::from_secs(3));
    let leaves = upstream_wait(&server2, false, front.scaled(Duration::from_secs(30)));
    load.step(
        front,
        "web2 unplugged; wait for it to leave the upstream",
        &leaves,
    )?;
    let left = seen_after(front, pulled)?;
    println!(
        "web2 left the front's upstream {left:.2}s after its cable was pulled (bound {:.1}s)",
        bound.as_secs_f64()
    );
    ensure!(
        left <= bound.as_secs_f64(),
        "web2 left the upstream {left:.2}s after it went away, over {:.1}s ({})",
        bound.as_secs_f64(),
        front.limit_note(Duration::from_secs(3))
    );

    lab.plug("web2")?;
    let plugged = now_unix();
    let front = lab.machine("front");
    let returns = upstream_wait(&server2, true, front.scaled(Duration::from_secs(30)));
    load.step(
        front,
        "web2 plugged back; wait for it to return to the upstream",
        &returns,
    )?;
    let back = seen_after(front, plugged)?;
    println!("web2 returned to the front's upstream {back:.2}s after its cable was plugged back");
    load.step(
        front,
        "web2's php-cgi answers through the front again",
        &answered_by("web2"),
    )?;
    let report = load.finish(front, "FastCGI failover under load", 500)?;
    println!(
        "FastCGI failover: {} requests, {} non-2xx, {} socket errors",
        report.requests, report.non_2xx, report.socket_errors
    );
    // What nginx retried on the other host (for the record, not asserted).
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
