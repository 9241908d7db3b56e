//! Many hosts (issue 20), failover of a FastCGI pool: php-cgi workers on
//! two hosts behind the front's nginx; one host goes away under load and
//! comes back. nginx retries the connects that time out on the other host
//! (`fastcgi_next_upstream error timeout`) until watch takes the host out.
use super::hosts_failover::{
    finish_failover, now_unix, print_retries, web2_leaves, web2_returns, Servers, UPSTREAMS,
};
use crate::lab::Lab;
use crate::scenarios::common;
use crate::scenarios::edge::Load;
use anyhow::{ensure, Result};
use std::time::Duration;

const LOCATIONS: &str = "/etc/nginx/snippets/cgipool-locations.conf";
/// The pool's document root, the same on the front (nginx checks that the
/// script exists) and on the hosts (php-cgi runs it).
const DOCROOT: &str = "/srv/hosts-php";
const URL: &str = "http://127.0.0.1/php/host.php";

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
    super::hosts::wait_watch_follows(front, &["web1", "web2"])?;
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
    let servers = Servers {
        web1: format!("{web1}:9103"),
        web2: server2.clone(),
    };
    let left = web2_leaves(front, &mut load, &servers, pulled, "unplugged")?;
    println!(
        "web2 left the front's upstream {left:.2}s after its cable was pulled (bound {:.1}s)",
        front.scaled(Duration::from_secs(3)).as_secs_f64()
    );

    lab.plug("web2")?;
    let plugged = now_unix();
    let front = lab.machine("front");
    let back = web2_returns(front, &mut load, &server2, plugged, "plugged back")?;
    println!("web2 returned to the front's upstream {back:.2}s after its cable was plugged back");
    load.step(
        front,
        "web2's php-cgi answers through the front again",
        &answered_by("web2"),
    )?;
    finish_failover(load, front, "FastCGI failover under load")?;
    print_retries(front)
}
