//! Issue 3 acceptance: apply, idempotency, scaling, removal, bad configs,
//! systemd restarting killed workers, escaping, sandboxing, against a real
//! systemd.
use super::common::{
    self, apply, assert_pool_running, expect_usage_error, install, status_json, unit_dir_listing,
    write_config,
};
use crate::machine::Machine;
use crate::Scenario;
use anyhow::{ensure, Context, Result};
use std::time::Duration;

pub fn scenarios() -> Vec<Scenario> {
    let s = Scenario::nspawn;
    vec![
        s("core_apply_demo_idempotent", apply_demo_idempotent),
        s("core_scale_and_remove", scale_and_remove),
        s("core_bad_configs_change_nothing", bad_configs),
        s("core_kill_worker_restarts", kill_worker),
        s("core_escaping_round_trip", escaping),
        s("core_units_verify_and_sandbox", verify_and_sandbox),
        s("core_down_removes_everything", down),
        s("core_runtime_lock_and_no_nginx", runtime_lock_and_no_nginx),
    ]
}

fn apply_demo_idempotent(m: &mut Machine) -> Result<()> {
    install(m)?;
    let out = apply(m)?;
    ensure!(
        out.contains("daemon-reload") && out.contains("started"),
        "first apply output lacks its steps:\n{out}"
    );
    assert_pool_running(m, "search", 2)?;
    assert_pool_running(m, "auth", 2)?;
    ensure!(
        unit_dir_listing(m)? == common::expected_listing(&[("auth", 2), ("search", 2)]),
        "unit dir after apply: {:?}",
        unit_dir_listing(m)?
    );

    // status --json agrees with systemctl.
    let status = status_json(m)?;
    let pools = status["pools"]
        .as_array()
        .context("status has no pools array")?;
    ensure!(
        pools.len() == 2,
        "status lists {} pools, expected 2",
        pools.len()
    );
    for pool in pools {
        let name = pool["pool"].as_str().unwrap_or_default().to_string();
        ensure!(
            pool["wanted"] == 2 && pool["healthy"] == 2,
            "pool {name}: {pool}"
        );
        for w in pool["workers"].as_array().context("workers")? {
            let unit = w["unit"].as_str().unwrap_or_default().to_string();
            let mut show = Vec::new();
            for prop in ["ActiveState", "SubState", "MainPID", "NRestarts"] {
                show.push(m.unit_property(&unit, prop)?);
            }
            let show = show.join(" ");
            let ours = format!(
                "{} {} {} {}",
                w["active_state"].as_str().unwrap_or(""),
                w["sub_state"].as_str().unwrap_or(""),
                w["main_pid"],
                w["n_restarts"]
            );
            ensure!(
                show.trim() == ours,
                "{unit}: systemctl says {:?}, cgipool status says {ours:?}",
                show.trim()
            );
        }
    }

    // A second apply: no changes, no job, no daemon-reload, no nginx reload.
    let jobs_before = m.succeed("systemctl show -P NInstalledJobs")?;
    let reloads_before = m.succeed("journalctl -b _PID=1 -o cat | grep -c '^Reloading' || true")?;
    let nginx_before = common::nginx_workers(m)?;
    let out = apply(m)?;
    ensure!(
        out.trim() == "no changes",
        "second apply was not a no-op:\n{out}"
    );
    let jobs_after = m.succeed("systemctl show -P NInstalledJobs")?;
    ensure!(
        jobs_before == jobs_after,
        "NInstalledJobs went from {} to {}",
        jobs_before.trim(),
        jobs_after.trim()
    );
    let reloads_after = m.succeed("journalctl -b _PID=1 -o cat | grep -c '^Reloading' || true")?;
    ensure!(
        reloads_before == reloads_after,
        "systemd reloaded during a no-change apply ({} -> {})",
        reloads_before.trim(),
        reloads_after.trim()
    );
    ensure!(
        nginx_before == common::nginx_workers(m)?,
        "nginx workers changed during a no-change apply"
    );
    // --dry-run agrees.
    let dry = m.succeed(&format!("cgipool apply --dry-run {}", common::CONFIG))?;
    ensure!(
        dry.trim() == "no changes",
        "dry run after convergence: {dry}"
    );
    Ok(())
}

const DEMO_MIN3: &str = r#"[pool.search]
exec = "/usr/local/lib/cgipool/search"
route = "/api/search"
min = 3
max = 5

[pool.auth]
exec = "/usr/local/lib/cgipool/auth"
route = "/api/auth"
"#;

fn scale_and_remove(m: &mut Machine) -> Result<()> {
    install(m)?;
    apply(m)?;
    assert_pool_running(m, "search", 2)?;

    // min 2 → 3: the count is clamped up.
    write_config(m, DEMO_MIN3)?;
    let dry = m.succeed(&format!("cgipool apply --dry-run {}", common::CONFIG))?;
    ensure!(
        dry.contains("start   cgipool-search@3.service"),
        "dry run does not plan search@3:\n{dry}"
    );
    ensure!(
        m.unit_property("cgipool-search@3.service", "ActiveState")? != "active",
        "--dry-run started a worker"
    );
    apply(m)?;
    assert_pool_running(m, "search", 3)?;
    // min back to 2: the running count stays (it is within [min, max]).
    write_config(m, &DEMO_MIN3.replacen("min = 3", "min = 2", 1))?;
    let out = apply(m)?;
    assert_pool_running(m, "search", 3)?;
    ensure!(
        !out.contains("stopped"),
        "lowering min stopped workers:\n{out}"
    );

    m.succeed("cgipool scale search 5")?;
    assert_pool_running(m, "search", 5)?;
    let err = expect_usage_error(m, "cgipool scale search 6")?;
    ensure!(
        err.contains("[2, 5]"),
        "scale beyond max: unclear message {err:?}"
    );
    expect_usage_error(m, "cgipool scale search 1")?;
    expect_usage_error(m, "cgipool scale nosuchpool 2")?;
    m.succeed("cgipool scale search 2")?;
    assert_pool_running(m, "search", 2)?;
    ensure!(
        unit_dir_listing(m)? == common::expected_listing(&[("auth", 2), ("search", 2)]),
        "unit dir after scale down: {:?}",
        unit_dir_listing(m)?
    );

    // Remove the auth pool.
    write_config(
        m,
        "[pool.search]\nexec = \"/usr/local/lib/cgipool/search\"\nroute = \"/api/search\"\n",
    )?;
    apply(m)?;
    assert_pool_running(m, "search", 2)?;
    let left = m.succeed("systemctl list-units --no-legend --plain --all 'cgipool-auth*' | awk '$3 == \"active\" {print $1}'")?;
    ensure!(
        left.trim().is_empty(),
        "auth units still active after removing the pool: {left}"
    );
    ensure!(
        unit_dir_listing(m)? == common::expected_listing(&[("search", 2)]),
        "unit dir after removing auth: {:?}",
        unit_dir_listing(m)?
    );
    m.fail("test -e /run/cgipool/auth/pool.sock")?;
    let out = apply(m)?;
    ensure!(
        out.trim() == "no changes",
        "apply after removal is not converged:\n{out}"
    );
    Ok(())
}

/// (name, config, text the error must contain)
const BAD: &[(&str, &str, &str)] = &[
    ("unknown key", "[pool.search]\nexec = \"/usr/local/lib/cgipool/search\"\nroute = \"/api/search\"\nmaxx = 3\n", ":4:1: pool.search.maxx"),
    ("min above max", "[pool.search]\nexec = \"/usr/local/lib/cgipool/search\"\nroute = \"/api/search\"\nmin = 6\nmax = 5\n", "pool.search.min"),
    ("bad pool name", "[pool.Search-1]\nexec = \"/usr/local/lib/cgipool/search\"\nroute = \"/api/search\"\n", ":1:"),
    ("relative exec", "[pool.search]\nexec = \"bin/search\"\nroute = \"/api/search\"\n", ":2:8: pool.search.exec"),
    ("reserved route", "[pool.search]\nexec = \"/usr/local/lib/cgipool/search\"\nroute = \"/pool-status\"\n", "pool.search.route"),
    ("duplicate route", "[pool.a]\nexec = \"/bin/true\"\nroute = \"/x\"\n[pool.b]\nexec = \"/bin/true\"\nroute = \"/x\"\n", "pool.b.route"),
    ("newline in env", "[pool.search]\nexec = \"/bin/true\"\nroute = \"/x\"\nenvironment = { A = \"a\\nb\" }\n", "pool.search.environment.A"),
    ("brace in route", "[pool.search]\nexec = \"/bin/true\"\nroute = \"/x{\"\n", "pool.search.route"),
    ("bad duration", "[pool.search]\nexec = \"/bin/true\"\nroute = \"/x\"\nrestart_sec = \"soon\"\n", "pool.search.restart_sec"),
    ("toml syntax", "[pool.search\nexec = 1\n", ":1:"),
    ("relative probe", "[pool.search]\nexec = \"/bin/true\"\nroute = \"/x\"\nhealth_path = \"healthz\"\n", ":4:15: pool.search.health_path"),
    ("notify on cgi", "[pool.search]\nexec = \"/bin/true\"\nroute = \"/x\"\nprotocol = \"cgi\"\nnotify = true\n", "pool.search.protocol"),
];

fn bad_configs(m: &mut Machine) -> Result<()> {
    install(m)?;
    apply(m)?;
    let before = common::host_fingerprint(m)?;
    for (name, text, needle) in BAD {
        let path = "/etc/cgipool/bad.toml";
        m.write_text(path, text)?;
        for cmd in [
            format!("cgipool apply {path}"),
            format!("cgipool validate {path}"),
            format!("cgipool apply --dry-run {path}"),
        ] {
            let err =
                expect_usage_error(m, &cmd).with_context(|| format!("bad config case: {name}"))?;
            ensure!(
                err.contains(path) && err.contains(needle),
                "{name}: `{cmd}` said {err:?}; expected the file and {needle:?}"
            );
        }
    }
    // Several errors are reported at once.
    m.write_text(
        "/etc/cgipool/bad.toml",
        "[pool.search]\nexec = \"bin\"\nroute = \"x\"\nmin = 0\n",
    )?;
    let err = expect_usage_error(m, "cgipool validate /etc/cgipool/bad.toml")?;
    ensure!(
        err.matches("/etc/cgipool/bad.toml:").count() >= 3,
        "expected three errors at once, got:\n{err}"
    );
    ensure!(
        common::host_fingerprint(m)? == before,
        "a rejected config changed files on the host"
    );
    assert_pool_running(m, "search", 2)?;
    Ok(())
}

fn kill_worker(m: &mut Machine) -> Result<()> {
    install(m)?;
    apply(m)?;
    let pid = m.main_pid("cgipool-search@1.service")?;
    m.succeed(&format!("kill -9 {pid}"))?;
    m.wait_until_succeeds(
        &format!("test \"$(systemctl show -P MainPID cgipool-search@1.service)\" != {pid} && test \"$(systemctl show -P ActiveState cgipool-search@1.service)\" = active"),
        "systemd to restart search@1 after kill -9",
        Duration::from_secs(15),
    )?;
    let status = status_json(m)?;
    let w = status["pools"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["pool"] == "search"))
        .and_then(|p| p["workers"].as_array())
        .and_then(|ws| ws.iter().find(|w| w["worker"] == "search@1"))
        .cloned()
        .context("search@1 missing from status")?;
    ensure!(
        w["n_restarts"] == 1,
        "status shows NRestarts {} for search@1, expected 1",
        w["n_restarts"]
    );
    let text = m.succeed("cgipool status search")?;
    ensure!(
        text.contains("search@1") && text.contains("active/running"),
        "status text:\n{text}"
    );
    Ok(())
}

const WEIRD: &str = r#"100% $HOME "quoted" back\slash; semi  two  spaces"#;

fn escaping(m: &mut Machine) -> Result<()> {
    install(m)?;
    let toml_str = WEIRD.replace('\\', "\\\\").replace('"', "\\\"");
    write_config(
        m,
        &format!(
            "[pool.hello]\nexec = \"/usr/bin/python3\"\nargs = [\"/usr/local/lib/cgipool/hello.py\", \"{toml_str}\"]\nroute = \"/api/hello\"\nmin = 1\nmax = 1\nenvironment = {{ WEIRD = \"{toml_str}\" }}\ndescription = \"hello {toml_str}\"\n"
        ),
    )?;
    apply(m)?;
    m.wait_for_unit("cgipool-hello@1.service")?;
    let pid = m.unit_property("cgipool-hello@1.service", "MainPID")?;
    let argv = m.succeed(&format!("tr '\\0' '\\n' < /proc/{pid}/cmdline"))?;
    let args: Vec<&str> = argv.lines().collect();
    ensure!(
        args.last() == Some(&WEIRD),
        "argv of the worker: {args:?}, expected the last one to be {WEIRD:?}"
    );
    let env = m.succeed(&format!(
        "tr '\\0' '\\n' < /proc/{pid}/environ | grep '^WEIRD='"
    ))?;
    ensure!(
        env.trim_end_matches('\n') == format!("WEIRD={WEIRD}"),
        "environment of the worker: {env:?}"
    );
    let show =
        m.succeed("systemctl show -p Environment,ExecStart,Description cgipool-hello@1.service")?;
    ensure!(
        show.contains("hello 100% $HOME"),
        "Description lost its specifiers: {show}"
    );
    ensure!(
        show.contains("semi  two  spaces"),
        "systemctl show lost the spaces: {show}"
    );
    Ok(())
}

fn verify_and_sandbox(m: &mut Machine) -> Result<()> {
    install(m)?;
    apply(m)?;
    let verify = m.execute("cd /etc/systemd/system && systemd-analyze verify --man=no cgipool.target cgipool-search.target cgipool-search.socket cgipool-search@1.service 2>&1", Duration::from_secs(60))?;
    ensure!(
        verify.rc == 0 && verify.stdout.trim().is_empty(),
        "systemd-analyze verify complained (exit {}):\n{}",
        verify.rc,
        verify.stdout
    );
    let sec = m.execute(
        "systemd-analyze security --no-pager cgipool-search@1.service 2>&1 | tail -1",
        Duration::from_secs(60),
    )?;
    let score: f64 = sec
        .stdout
        .split_whitespace()
        .find_map(|w| w.parse::<f64>().ok())
        .with_context(|| format!("no exposure score in: {}", sec.stdout))?;
    println!(
        "systemd-analyze security cgipool-search@1.service: {}",
        sec.stdout.trim()
    );
    ensure!(
        score <= 1.0,
        "exposure score {score} is above 1.0: {}",
        sec.stdout
    );
    // The sandbox holds at runtime, not only on paper.
    let props = m.succeed("systemctl show -p DynamicUser,ProtectSystem,PrivateTmp,PrivateNetwork,NoNewPrivileges,RestrictAddressFamilies,MemoryMax,TasksMax cgipool-search@1.service")?;
    for want in [
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "PrivateNetwork=yes",
        "NoNewPrivileges=yes",
        "RestrictAddressFamilies=AF_UNIX",
    ] {
        ensure!(
            props.contains(want),
            "{want} missing from the running unit:\n{props}"
        );
    }
    let pid = m.unit_property("cgipool-search@1.service", "MainPID")?;
    let uid = m.succeed(&format!("awk '/^Uid:/ {{print $2}}' /proc/{pid}/status"))?;
    ensure!(uid.trim() != "0", "the worker runs as root");
    // The pool's 5 workers (max) weigh one session together: each worker's
    // session (autogroup) runs at nice 7 (ExecStartPost, as root).
    let autogroup = m.succeed(&format!("cat /proc/{pid}/autogroup"))?;
    ensure!(
        autogroup.trim().ends_with(" nice 7"),
        "the worker's autogroup is not at nice 7: {autogroup}"
    );
    let mode = m.succeed("stat -c '%a %G' /run/cgipool/search/pool.sock")?;
    ensure!(
        mode.trim() == "660 www-data",
        "worker socket is {}, expected 660 www-data",
        mode.trim()
    );
    Ok(())
}

fn down(m: &mut Machine) -> Result<()> {
    install(m)?;
    apply(m)?;
    m.succeed("cgipool down")?;
    let left =
        m.succeed("systemctl list-units --no-legend --plain 'cgipool*' | awk '$3 == \"active\"'")?;
    ensure!(
        left.trim().is_empty(),
        "units still active after down: {left}"
    );
    let files = unit_dir_listing(m)?;
    ensure!(files.is_empty(), "files left after down: {files:?}");
    m.succeed("nginx -t -q")?;
    Ok(())
}

/// `--runtime` units live in /run/systemd/system; a second apply waits for
/// the lock and gives up clearly; without nginx, apply manages the units and
/// says that nginx was skipped.
fn runtime_lock_and_no_nginx(m: &mut Machine) -> Result<()> {
    install(m)?;
    m.succeed("systemctl stop nginx.service")?;
    let out = m.succeed(&format!("cgipool apply --runtime {}", common::CONFIG))?;
    ensure!(
        out.contains("nginx: skipped"),
        "apply without nginx does not say it skipped nginx:\n{out}"
    );
    assert_pool_running(m, "search", 2)?;
    m.succeed("test -f /run/systemd/system/cgipool-search@.service && test -L /run/systemd/system/cgipool-search.target.wants/cgipool-search@2.service")?;
    m.fail("test -e /etc/systemd/system/cgipool-search@.service")?;
    let status = m.succeed("cgipool status --runtime search")?;
    ensure!(
        status.contains("2 healthy of 2 wanted"),
        "status --runtime:\n{status}"
    );
    // Another apply holds the lock: this one waits --timeout, then says so.
    m.succeed("systemd-run --quiet --unit=vmtest-lock flock /run/cgipool/.lock sleep 30")?;
    m.wait_until_succeeds(
        "pgrep -f 'flock /run/cgipool/.lock'",
        "the lock holder",
        Duration::from_secs(5),
    )?;
    let o = m.execute(
        &format!(
            "cgipool scale search 3 --timeout 1 --config {}",
            common::CONFIG
        ),
        Duration::from_secs(30),
    )?;
    ensure!(
        o.rc == 1 && o.stderr.contains("another cgipool"),
        "scale while the lock is held: exit {}, {}",
        o.rc,
        o.stderr
    );
    m.succeed("systemctl stop vmtest-lock")?;
    assert_pool_running(m, "search", 2)?;
    m.succeed(&format!("cgipool down --runtime {}", common::CONFIG))?;
    m.fail("test -e /run/systemd/system/cgipool-search@.service")?;
    Ok(())
}
