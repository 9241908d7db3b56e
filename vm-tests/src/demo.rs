//! `make demo`: cgipool doing its whole job in a QEMU machine, as a short
//! tour a newcomer can read. Uses the same harness as the scenarios.
use crate::machine::{Env, Machine, Options, Tier};
use crate::scenarios::common::{apply, assert_pool_running, install};
use crate::scenarios::edge::Load;
use anyhow::Result;
use std::time::{Duration, Instant};

/// How long the load of step 4 runs, and how many requests it must see at
/// least for "none failed" to mean anything (a slow TCG guest still answers
/// a few hundred per second: the load is one wrk process, not a process per
/// request).
const LOAD_SECS: u64 = 20;
const MIN_REQUESTS: u64 = 200;

fn section(title: &str) {
    println!("\n\x1b[1m== {title}\x1b[0m");
}

fn show(m: &mut Machine, cmd: &str) -> Result<String> {
    println!("\x1b[2m$ {cmd}\x1b[0m");
    let out = m.succeed(cmd)?;
    print!("{out}");
    Ok(out)
}

pub fn run(env: &Env) -> Result<()> {
    let t0 = Instant::now();
    section("Booting a Debian machine under QEMU (systemd as PID 1, nginx installed)");
    let mut m = Machine::start(env, Tier::Qemu, "demo", Options::default())?;
    println!("booted in {:.1}s", t0.elapsed().as_secs_f64());
    println!("{}", m.calibration());
    let result = tour(&mut m);
    if let Err(e) = &result {
        let dir = m.collect_artifacts();
        eprintln!("demo failed: {e:#}\nartifacts: {}", dir.display());
    }
    result?;
    println!(
        "\ndemo finished in {:.0}s; the machine is shut down and nothing is left running",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

fn tour(m: &mut Machine) -> Result<()> {
    install(m)?;
    section("1. cgipool apply /etc/cgipool/cgipool.toml (examples/demo.toml)");
    show(m, "cat /etc/cgipool/cgipool.toml")?;
    println!("\x1b[2m$ cgipool apply\x1b[0m");
    print!("{}", apply(m)?);
    assert_pool_running(m, "search", 2)?;

    section("2. cgipool status, and what systemctl says about the same units");
    show(m, "cgipool status")?;
    show(m, "systemctl list-units --no-pager 'cgipool*'")?;

    section("3. Requests through nginx: different workers answer");
    for q in ["systemd", "nginx", "process"] {
        show(m, &format!("curl -s -D - 'http://127.0.0.1/api/search?q={q}' | grep -E '^X-Cgipool-Worker|^X-Request-ID|^\\{{' | cut -c1-160"))?;
    }
    show(m, "curl -s 'http://127.0.0.1/api/auth?user=john'; echo")?;
    show(m, "for i in $(seq 8); do curl -s -o /dev/null -D - 'http://127.0.0.1/api/search?q=x' | grep X-Cgipool-Worker; done | sort | uniq -c")?;

    section("4. kill -9 a worker under load: systemd brings it back, no request fails");
    println!(
        "\x1b[2m$ wrk -c4 -d{LOAD_SECS}s -H 'Connection: close' http://127.0.0.1/api/search?q=kill  # in the background\x1b[0m"
    );
    let mut load = Load::start(m, 4, LOAD_SECS, "http://127.0.0.1/api/search?q=kill")?;
    let pid = m.main_pid("cgipool-search@1.service")?;
    println!("\x1b[2m$ kill -9 {pid}  # MainPID of cgipool-search@1.service\x1b[0m");
    load.step(m, "kill -9 search@1", &format!("kill -9 {pid}"))?;
    m.wait_until_succeeds(
        &format!("test \"$(systemctl show -P MainPID cgipool-search@1.service)\" != {pid} && systemctl is-active -q cgipool-search@1.service"),
        "systemd to restart search@1",
        Duration::from_secs(20),
    )?;
    show(
        m,
        "systemctl show -p ActiveState,MainPID,NRestarts cgipool-search@1.service",
    )?;
    let report = load.finish(m, "requests during the kill", MIN_REQUESTS)?;
    println!(
        "wrk: {} requests answered, {} non-2xx, {} socket errors",
        report.requests, report.non_2xx, report.socket_errors
    );

    section("5. cgipool scale search 5");
    show(m, "cgipool scale search 5")?;
    show(m, "cgipool status search")?;

    section("6. /pool-status and /metrics, served by cgipool watch through nginx");
    show(m, "curl -s http://127.0.0.1/pool-status | python3 -c 'import json,sys; [print(p[\"pool\"], p[\"healthy\"], \"healthy of\", p[\"wanted\"], \"wanted; queue\", p[\"queue_depth\"]) for p in json.load(sys.stdin)[\"pools\"]]'")?;
    show(
        m,
        "curl -s http://127.0.0.1/metrics | grep -E '^cgipool_(workers|pool_queue_depth)'",
    )?;
    Ok(())
}
