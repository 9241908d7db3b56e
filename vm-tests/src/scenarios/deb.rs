//! Issue 19 acceptance: cgipool as a Debian package. Installed with apt from
//! the payload's .deb into a guest that has no cgipool, its man pages and
//! bash completion work, the packaged example config answers through nginx,
//! an upgrade under load fails no request, and remove then purge leave only
//! what the README says stays.
use super::common::{assert_pool_running, host_fingerprint, request};
use super::edge::Load;
use crate::machine::{shell_quote, Machine};
use crate::Scenario;
use anyhow::{ensure, Context, Result};
use std::time::Duration;

pub fn scenarios() -> Vec<Scenario> {
    vec![Scenario::nspawn(
        "deb_install_upgrade_purge",
        deb_install_upgrade_purge,
    )]
}

const EXAMPLES: &str = "/usr/share/doc/cgipool/examples";

/// What there is of cgipool on the guest, by name: everything outside the
/// pseudo file systems, the payload and /tmp whose name says cgipool.
const LEFTOVERS: &str = "find / \\( -path /proc -o -path /sys -o -path /dev -o -path /payload -o -path /tmp -o -path /mnt \\) -prune -o -name '*cgipool*' -print | sort";

/// What the README says stays after `cgipool down` and `apt purge`: the
/// operator's config, the nginx site and certificate they installed, and
/// the two nginx files `cgipool down` leaves without routes (the site's
/// includes keep working).
const STAYS: &[&str] = &[
    "/etc/cgipool",
    "/etc/cgipool/cgipool.toml",
    "/etc/nginx/conf.d/cgipool-upstreams.conf",
    "/etc/nginx/snippets/cgipool-locations.conf",
    "/etc/nginx/sites-available/cgipool",
    "/etc/nginx/sites-enabled/cgipool",
    "/etc/ssl/cgipool",
];

fn apt(m: &mut Machine, args: &str) -> Result<String> {
    let limit = m.scaled(Duration::from_secs(180));
    m.succeed_within(
        &format!("cd /tmp && DEBIAN_FRONTEND=noninteractive apt-get -q -y {args} 2>&1"),
        limit,
    )
    .with_context(|| format!("apt-get {args}"))
}

fn main_pid(m: &mut Machine, unit: &str) -> Result<String> {
    let pid = m.unit_property(unit, "MainPID")?;
    ensure!(pid != "0", "{unit} has no main process");
    Ok(pid)
}

fn deb_install_upgrade_purge(m: &mut Machine) -> Result<()> {
    ensure!(
        m.execute("command -v cgipool", Duration::from_secs(10))?.rc != 0,
        "the guest already has a cgipool"
    );
    // The two packages of one build: the version and a higher one.
    let listing = m.succeed("cd /payload/debs && ls cgipool_*_amd64.deb")?;
    let debs: Vec<&str> = listing.lines().collect();
    let (Some(new), Some(old), 2) = (
        debs.iter().find(|d| d.contains("+upgrade1")),
        debs.iter().find(|d| !d.contains("+upgrade1")),
        debs.len(),
    ) else {
        anyhow::bail!("expected two packages in the payload (version and +upgrade1), got {debs:?}");
    };
    let (old, new) = (old.to_string(), new.to_string());
    m.succeed("cp /payload/debs/*.deb /tmp/ && chmod 0644 /tmp/*.deb")?;
    let version = |deb: &str| {
        deb.trim_start_matches("cgipool_")
            .trim_end_matches("_amd64.deb")
            .to_string()
    };

    // Installing changes nothing on the host until the first apply.
    let before = host_fingerprint(m)?;
    // The image's own test helpers (cgipool-test) are there from the start.
    let baseline = m.succeed(LEFTOVERS)?;
    apt(m, &format!("install /tmp/{old}"))?;
    ensure!(
        host_fingerprint(m)? == before,
        "installing the package changed units or nginx files"
    );
    m.succeed("test ! -e /var/lib/cgipool && test ! -e /run/cgipool && test ! -e /etc/cgipool")
        .context("installing the package created cgipool's state directories")?;
    let units = m.succeed("systemctl list-units --all --no-legend --plain 'cgipool*'")?;
    ensure!(units.trim().is_empty(), "units after the install:\n{units}");
    let v = m.succeed("cgipool --version")?;
    ensure!(
        v.starts_with(&format!("cgipool {}", version(&old)))
            && v.contains("(commit ")
            && m.succeed("command -v cgipool")?.trim() == "/usr/bin/cgipool",
        "cgipool --version: {v}"
    );

    // Man pages render without warnings; bash completes subcommands.
    let page = m.succeed("MANPAGER=cat MANWIDTH=80 man cgipool-apply 2>&1")?;
    ensure!(
        page.contains("cgipool-apply") && page.contains("--dry-run"),
        "man cgipool-apply:\n{page}"
    );
    let page = m.succeed("MANPAGER=cat MANWIDTH=80 man 5 cgipool.toml 2>&1")?;
    ensure!(
        page.contains("CGIPOOL.TOML(5)") && page.contains("unhealthy_after"),
        "man 5 cgipool.toml:\n{page}"
    );
    let warnings = m.succeed(
        "for p in $(dpkg -L cgipool | grep '^/usr/share/man/.*\\.gz$'); do man --warnings -E UTF-8 -l \"$p\" 2>&1 >/dev/null; done",
    )?;
    ensure!(warnings.trim().is_empty(), "man warnings:\n{warnings}");
    let completed = m.succeed(
        "bash -c '. /usr/share/bash-completion/bash_completion; _completion_loader cgipool; \
         f=$(complete -p cgipool | sed -n \"s/.*-F \\([^ ]*\\) .*/\\1/p\"); \
         COMP_WORDS=(cgipool sc); COMP_CWORD=1; COMP_LINE=\"cgipool sc\"; COMP_POINT=${#COMP_LINE}; \
         \"$f\" cgipool sc cgipool; printf \"%s\\n\" \"${COMPREPLY[@]}\"'",
    )?;
    ensure!(
        completed.trim() == "scale",
        "bash completes `cgipool sc` to {completed:?}"
    );

    // The packaged example config and nginx site.
    m.succeed(&format!(
        "set -e
         install -D -m 0644 {EXAMPLES}/cgipool.toml /etc/cgipool/cgipool.toml
         install -d /etc/ssl/cgipool
         openssl req -x509 -newkey rsa:2048 -nodes -subj /CN=localhost -days 2 \
             -keyout /etc/ssl/cgipool/key.pem -out /etc/ssl/cgipool/cert.pem 2>/dev/null
         install -m 0644 {EXAMPLES}/cgipool-site.conf /etc/nginx/sites-available/cgipool
         ln -sf ../sites-available/cgipool /etc/nginx/sites-enabled/cgipool
         rm -f /etc/nginx/sites-enabled/default
         nginx -t -q && systemctl reload nginx"
    ))?;
    m.succeed("cgipool apply")?;
    assert_pool_running(m, "search", 2)?;
    assert_pool_running(m, "auth", 2)?;
    m.wait_for_unit("cgipool-watch.service")?;
    for (unit, want) in [
        ("cgipool-watch.service", "path=/usr/bin/cgipool "),
        ("cgipool-search@1.service", "path=/usr/lib/cgipool/search "),
    ] {
        let exec = m.unit_property(unit, "ExecStart")?;
        ensure!(exec.contains(want), "{unit}: ExecStart {exec}");
        let docs = m.unit_property(unit, "Documentation")?;
        ensure!(
            docs.contains("man:cgipool.toml(5)") && docs.contains("man:cgipool-apply(1)"),
            "{unit}: Documentation={docs}"
        );
    }
    for (path, pool) in [
        ("/api/search?q=deb", "search@"),
        ("/api/auth?user=john", "auth@"),
    ] {
        let (code, headers, body) = request(m, &shell_quote(&format!("http://127.0.0.1{path}")))?;
        ensure!(
            code == 200 && headers.contains(&format!("X-Cgipool-Worker: {pool}")),
            "{path} answered {code}:\n{headers}\n{body}"
        );
    }

    // Upgrade under load: watch and the workers whose binary the package
    // replaced are restarted, and no request fails.
    let watch_pid = main_pid(m, "cgipool-watch.service")?;
    let worker_pids: Vec<String> = ["search@1", "search@2", "auth@1", "auth@2"]
        .iter()
        .map(|w| main_pid(m, &format!("cgipool-{w}.service")))
        .collect::<Result<_>>()?;
    let mut load = Load::start(m, 16, 30, "http://127.0.0.1:80/api/search?q=upgrade")?;
    load.step(
        m,
        &format!("apt-get install /tmp/{new}"),
        &format!("cd /tmp && DEBIAN_FRONTEND=noninteractive apt-get -q -y install /tmp/{new}"),
    )?;
    let report = load.finish(m, "upgrade under load", 2_000)?;
    println!(
        "upgrade under load: {} requests, {} non-2xx, {} socket errors",
        report.requests, report.non_2xx, report.socket_errors
    );
    let installed = m.succeed("dpkg-query -W -f '${Version}' cgipool")?;
    ensure!(installed == version(&new), "installed version {installed}");
    m.wait_for_unit("cgipool-watch.service")?;
    ensure!(
        main_pid(m, "cgipool-watch.service")? != watch_pid,
        "the upgrade did not restart cgipool-watch"
    );
    for (w, old_pid) in ["search@1", "search@2", "auth@1", "auth@2"]
        .iter()
        .zip(&worker_pids)
    {
        let unit = format!("cgipool-{w}.service");
        m.wait_for_unit(&unit)?;
        let pid = main_pid(m, &unit)?;
        ensure!(
            &pid != old_pid,
            "{unit} still runs the replaced binary (pid {pid})"
        );
        m.succeed(&format!(
            "test \"$(readlink /proc/{pid}/exe)\" = /usr/lib/cgipool/{}",
            w.split('@').next().unwrap_or("")
        ))
        .with_context(|| format!("{unit} does not run the new binary"))?;
    }
    let again = m.succeed("cgipool apply")?;
    ensure!(
        again.trim() == "no changes",
        "apply after the upgrade:\n{again}"
    );

    // Remove: watch stops, the pools keep answering, cgipool says how to
    // take them down.
    let out = apt(m, "remove cgipool")?;
    ensure!(
        out.contains("cgipool down"),
        "remove did not say how to take the pools down:\n{out}"
    );
    ensure!(
        m.unit_property("cgipool-watch.service", "ActiveState")? != "active",
        "cgipool-watch still runs after remove"
    );
    m.succeed("test ! -e /usr/bin/cgipool")?;
    let (code, _, body) = request(m, "'http://127.0.0.1/api/search?q=removed'")?;
    ensure!(
        code == 200,
        "the pools stopped answering after remove: {code} {body}"
    );

    // Take them down the way the message says, then purge.
    apt(m, &format!("install /tmp/{new}"))?;
    m.succeed("cgipool down")?;
    apt(m, "purge cgipool")?;
    let state = m.succeed("dpkg-query -W -f '${db:Status-Abbrev}' cgipool 2>/dev/null || true")?;
    ensure!(
        state.trim().is_empty() || state.starts_with("un"),
        "dpkg still knows cgipool after purge: {state:?}"
    );
    let units = m.succeed("systemctl list-units --all --no-legend --plain 'cgipool*'")?;
    ensure!(units.trim().is_empty(), "units after purge:\n{units}");
    m.succeed("! grep -q 'server unix:' /etc/nginx/conf.d/cgipool-upstreams.conf")
        .context("the nginx upstreams file that stays still names workers")?;
    let left = m.succeed(LEFTOVERS)?;
    let unexpected: Vec<&str> = left
        .lines()
        .filter(|l| !STAYS.contains(l) && !baseline.lines().any(|b| b == *l))
        .collect();
    ensure!(
        unexpected.is_empty(),
        "left after cgipool down and purge, and not in the README: {unexpected:?}"
    );
    // `cgipool down` leaves the two files with no route in them: the
    // pool's route is gone from nginx.
    let (code, _, body) = request(m, "'http://127.0.0.1/api/search?q=gone'")?;
    ensure!(
        code == 404,
        "the route answers {code} after down and purge: {body}"
    );
    Ok(())
}
