//! `make bench` (and `make bench-smoke`): cgipool's performance figures, each
//! next to a baseline measured in the same run, inside one nspawn container
//! (clients, nginx and workers share its cores). See bench/README.md.
//!
//! Full mode writes bench/results/latest.{md,json}; `--smoke` runs the same
//! code with short runs and 10 workers instead of 100 and writes to
//! target/bench-smoke/, so it never touches the committed report. Missed
//! goals never make the run fail: only broken machinery does.
use crate::machine::{shell_quote, Env, Machine, Options, Tier};
use crate::scenarios::common::{apply, install, write_config, CONFIG};
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

const REPORT_LUA: &str = include_str!("../../bench/guest/report.lua");
const MEASURE_PY: &str = include_str!("../../bench/guest/measure.py");
const RECOVER_PY: &str = include_str!("../../bench/guest/recover.py");
const SCALE_PY: &str = include_str!("../../bench/guest/scale.py");

/// Where the guest-side helpers live (/run: no unit's PrivateTmp hides it).
const GUEST_DIR: &str = "/run/bench";
const WORKER: &str = "/usr/local/lib/cgipool/search";
/// The trivial C CGI program (cgi-src/hello_cgi.c) behind fcgiwrap and
/// behind the `protocol = "cgi"` pool.
const CGI_PROGRAM: &str = "/usr/local/lib/cgipool/hello_cgi";
const CGI_BODY: &str = "hello\n";
/// Our own fcgiwrap instance (`-c` = the pool size), in a directory its
/// user (www-data, nginx's) owns.
const FCGIWRAP_SOCKET: &str = "/run/bench-fcgiwrap/fcgiwrap.sock";
const SEARCH_PATH: &str = "/api/search?q=systemd";
const TCP_PORTS: [u16; 4] = [9001, 9002, 9003, 9004];
const POOL_SIZE: u32 = 4;

/// How long and how often; the only difference between full and smoke.
#[derive(Debug, Clone, Copy)]
struct Mode {
    smoke: bool,
    /// Seconds per wrk run on the data path.
    secs: u32,
    /// Rounds of the interleaved data-path runs (A B C A B C ...).
    reps: u32,
    /// Workers in the control-plane pool.
    workers: u32,
    /// Rounds of the control-plane sequence.
    cp_reps: u32,
    /// Repeats of the short no-change apply / batched show.
    quick_reps: u32,
    /// Seconds of load during the worker kill.
    recover_secs: u32,
    /// Seconds of the load step that watch scales the pool up under.
    step_secs: u32,
}

impl Mode {
    fn new(smoke: bool) -> Result<Mode> {
        let mut mode = Mode::defaults(smoke);
        // Override the control plane's pool size (e.g. to find where it breaks).
        if let Ok(w) = std::env::var("CGIPOOL_BENCH_WORKERS") {
            mode.workers = w
                .parse()
                .ok()
                .filter(|&n| (2..=512).contains(&n))
                .with_context(|| format!("CGIPOOL_BENCH_WORKERS={w}: want 2..=512"))?;
        }
        Ok(mode)
    }

    fn defaults(smoke: bool) -> Mode {
        if smoke {
            Mode {
                smoke,
                secs: 1,
                reps: 1,
                workers: 10,
                cp_reps: 1,
                quick_reps: 2,
                recover_secs: 2,
                step_secs: 8,
            }
        } else {
            Mode {
                smoke,
                secs: 10,
                reps: 2,
                workers: 100,
                cp_reps: 2,
                quick_reps: 5,
                recover_secs: 10,
                step_secs: 20,
            }
        }
    }

    fn name(&self) -> &'static str {
        if self.smoke {
            "smoke"
        } else {
            "full"
        }
    }
}

/// One configuration on the data path; `na` marks rows that cannot be
/// measured yet (the code that would serve them does not exist).
struct Target {
    key: &'static str,
    label: &'static str,
    url: &'static str,
    na: Option<&'static str>,
}

const TARGETS: &[Target] = &[
    Target {
        key: "ceiling",
        label: "nginx `return 200` (ceiling)",
        url: "http://127.0.0.1:8080/ceiling",
        na: None,
    },
    Target {
        key: "pool",
        label: "nginx → cgipool pool (4 workers, as `apply` writes it)",
        url: "http://127.0.0.1:80/api/search?q=systemd",
        na: None,
    },
    Target {
        key: "tcp",
        label: "nginx → 4 TCP workers, PoC layout (no keepalive)",
        url: "http://127.0.0.1:8080/api/search?q=systemd",
        na: None,
    },
    Target {
        key: "tcp_keepalive",
        label: "nginx → 4 TCP workers, keepalive like cgipool (info)",
        url: "http://127.0.0.1:8081/api/search?q=systemd",
        na: None,
    },
    Target {
        key: "fcgiwrap",
        label: "nginx → fcgiwrap (Debian's, -c 4) → C CGI program",
        url: "http://127.0.0.1:8080/fcgi",
        na: None,
    },
    Target {
        key: "pool_cgi",
        label: "nginx → cgipool `protocol = \"cgi\"` (4 workers) → C CGI program",
        url: "http://127.0.0.1:80/cgi",
        na: None,
    },
];

const CONNS: [u32; 2] = [16, 64];

/// The nginx side of the baselines, in the same nginx as the pool: the
/// ceiling and the proof of concept's layout (round robin over TCP, HTTP/1.0
/// to the upstream, no keepalive) on :8080, and the same TCP workers with
/// cgipool's upstream settings (least_conn, keepalive 16) on :8081. The
/// proxy headers and timeouts are cgipool's, so the rows differ only in the
/// layout.
const BENCH_NGINX: &str = r#"# written by vm-tests bench
upstream bench_tcp {
    server 127.0.0.1:9001;
    server 127.0.0.1:9002;
    server 127.0.0.1:9003;
    server 127.0.0.1:9004;
}
upstream bench_tcp_keepalive {
    zone bench_tcp_keepalive 64k;
    least_conn;
    server 127.0.0.1:9001 max_fails=0;
    server 127.0.0.1:9002 max_fails=0;
    server 127.0.0.1:9003 max_fails=0;
    server 127.0.0.1:9004 max_fails=0;
    keepalive 16;
    keepalive_timeout 5s;
}
server {
    listen 127.0.0.1:8080;
    location = /ceiling {
        default_type text/plain;
        return 200 "ok\n";
    }
    location /api/search {
        proxy_pass http://bench_tcp;
        proxy_set_header Host $host;
        proxy_set_header X-Request-ID $request_id;
        proxy_hide_header X-Request-ID;
        proxy_set_header X-Real-IP $remote_addr;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto $scheme;
        add_header X-Request-ID $request_id always;
        proxy_connect_timeout 2s;
        proxy_next_upstream error timeout;
        proxy_next_upstream_tries 3;
    }
    # fcgiwrap as nginx users run CGI programs: FastCGI to fcgiwrap, which
    # forks the program per request (no keep-alive to fcgiwrap, nginx's
    # default).
    location = /fcgi {
        include fastcgi_params;
        fastcgi_param SCRIPT_FILENAME /usr/local/lib/cgipool/hello_cgi;
        fastcgi_pass unix:/run/bench-fcgiwrap/fcgiwrap.sock;
        add_header X-Request-ID $request_id always;
    }
}
server {
    listen 127.0.0.1:8081;
    location /api/search {
        proxy_pass http://bench_tcp_keepalive;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $host;
        proxy_set_header X-Request-ID $request_id;
        proxy_hide_header X-Request-ID;
        proxy_set_header X-Real-IP $remote_addr;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto $scheme;
        add_header X-Request-ID $request_id always;
        proxy_connect_timeout 2s;
        proxy_next_upstream error timeout;
        proxy_next_upstream_tries 3;
    }
}
"#;

fn pool_config(name: &str, route: &str, min: u32, max: u32) -> String {
    format!(
        "[nginx]\nupstreams = \"/etc/nginx/conf.d/cgipool-upstreams.conf\"\n\
         locations = \"/etc/nginx/snippets/cgipool-locations.conf\"\n\
         unit = \"nginx.service\"\n\n\
         [pool.{name}]\nexec = \"{WORKER}\"\nroute = \"{route}\"\nmin = {min}\nmax = {max}\n"
    )
}

/// The `protocol = "cgi"` pool next to the search pool: the gateway runs
/// the trivial C CGI program once per request.
fn cgi_pool_section() -> String {
    format!(
        "\n[pool.cgi]\nexec = \"{CGI_PROGRAM}\"\nroute = \"/cgi\"\nprotocol = \"cgi\"\n\
         min = {POOL_SIZE}\nmax = {POOL_SIZE}\n"
    )
}

/// The pool the scaling step loads: the search worker made slow (20 ms per
/// request), 2..6 workers, short windows (as the watch_autoscale_load_step
/// scenario has it).
const STEP_POOL: &str = "step";
const STEP_MIN: u32 = 2;
const STEP_MAX: u32 = 6;
const STEP_UP_AFTER_SECS: f64 = 2.0;
const STEP_DOWN_AFTER_SECS: f64 = 5.0;
const STEP_CONNS: u32 = 32;

fn step_pool_config() -> String {
    // The search worker answers /api/search only; the data path's pool with
    // that route is gone by then.
    pool_config(STEP_POOL, "/api/search", STEP_MIN, STEP_MAX)
        + &format!(
            "environment = {{ CGIPOOL_TEST_DELAY_MS = \"20\" }}\n\
             scale_up_after = \"{STEP_UP_AFTER_SECS}s\"\nscale_down_after = \"{STEP_DOWN_AFTER_SECS}s\"\n"
        )
}

pub fn run(env: &Env, smoke: bool) -> Result<()> {
    let mode = Mode::new(smoke)?;
    let t0 = Instant::now();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("vm-tests has no parent directory")?;
    let out_dir = if smoke {
        root.join("target/bench-smoke")
    } else {
        root.join("bench/results")
    };
    eprintln!("bench ({} mode): booting an nspawn container", mode.name());
    let mut m = Machine::start(
        env,
        Tier::Nspawn,
        &format!("bench-{}", mode.name()),
        Options::default(),
    )?;
    let result = measure_all(&mut m, mode);
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            let dir = m.collect_artifacts();
            bail!("{e:#}\nartifacts: {}", dir.display());
        }
    };
    m.save_transcript();
    drop(m);
    let (md, json) = render(&report, mode, t0.elapsed());
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let md_path = out_dir.join("latest.md");
    let json_path = out_dir.join("latest.json");
    std::fs::write(&md_path, &md).with_context(|| format!("writing {}", md_path.display()))?;
    std::fs::write(&json_path, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("writing {}", json_path.display()))?;
    println!("{md}");
    eprintln!(
        "bench: wrote {} and {} in {:.0}s",
        md_path.display(),
        json_path.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Everything one run measured.
struct Report {
    machine: Value,
    runs: Vec<Run>,
    control: Vec<Value>,
    recovery: Value,
    scaling: Value,
    /// Readings of cgipool-watch.service's main process (VmHWM, VmRSS).
    watch_rss: Vec<Value>,
}

/// One wrk run.
struct Run {
    target: &'static str,
    conns: u32,
    rep: u32,
    wrk: Value,
}

impl Run {
    fn rps(&self) -> f64 {
        let req = self.wrk["requests"].as_f64().unwrap_or(0.0);
        let us = self.wrk["duration_us"].as_f64().unwrap_or(0.0);
        if us > 0.0 {
            req / (us / 1e6)
        } else {
            0.0
        }
    }
    fn num(&self, k: &str) -> f64 {
        self.wrk[k].as_f64().unwrap_or(0.0)
    }
    fn errors(&self) -> u64 {
        wrk_errors(&self.wrk)
    }
}

/// Failed requests in a report.lua record: connect, read, write and
/// timeout errors, and non-2xx/3xx statuses.
fn wrk_errors(w: &Value) -> u64 {
    ["connect", "read", "write", "status", "timeout"]
        .iter()
        .map(|k| w[*k].as_u64().unwrap_or(0))
        .sum()
}

fn measure_all(m: &mut Machine, mode: Mode) -> Result<Report> {
    // The image forwards every journal line to the console the harness logs;
    // under load that pty stops draining, journald blocks on it, and every
    // worker then blocks writing its per-request log line to stderr. A
    // production host does not forward to a console: turn it off.
    m.write_text(
        "/etc/systemd/journald.conf.d/zz-bench.conf",
        "[Journal]\nForwardToConsole=no\n",
    )?;
    m.succeed("systemctl restart systemd-journald")?;
    install(m)?;
    m.write_text(&format!("{GUEST_DIR}/report.lua"), REPORT_LUA)?;
    m.write_text(&format!("{GUEST_DIR}/measure.py"), MEASURE_PY)?;
    m.write_text(&format!("{GUEST_DIR}/recover.py"), RECOVER_PY)?;
    m.write_text(&format!("{GUEST_DIR}/scale.py"), SCALE_PY)?;
    let mut machine = machine_info(m)?;
    // The control plane first, on a quiet machine with no pool yet ("from
    // nothing"); it leaves no pool behind. The machine is thrown away after
    // the load runs, so no teardown under load is timed.
    eprintln!("bench: control plane ({} workers)", mode.workers);
    let control = control_plane(m, mode)?;
    setup_data_path(m)?;
    eprintln!("bench: data path ({} s per run)", mode.secs);
    let cpu0 = cpu_usage(m)?;
    let wall0 = Instant::now();
    let runs = data_path(m, mode)?;
    let wall = wall0.elapsed().as_secs_f64();
    let cpu1 = cpu_usage(m)?;
    for i in 1..=TCP_PORTS.len() {
        m.succeed(&format!("systemctl stop bench-tcp-{i}.service"))?;
    }
    m.succeed("systemctl stop bench-fcgiwrap.service")?;
    let mut watch_rss = vec![watch_memory(m, "after the data path")?];
    machine["data_path_cpu_secs"] = json!({
        "wall_secs": wall,
        "units": CPU_UNITS.iter().zip(cpu0.iter().zip(cpu1.iter()))
            .map(|((name, _), (a, b))| json!({"what": name, "cpu_secs": (b - a).max(0.0)}))
            .collect::<Vec<_>>(),
    });
    eprintln!("bench: recovery (kill -9 under load)");
    let recovery = recovery(m, mode)?;
    eprintln!(
        "bench: scaling ({STEP_CONNS} conns for {} s on a pool of {STEP_MIN}..{STEP_MAX})",
        mode.step_secs
    );
    let scaling = scaling(m, mode)?;
    watch_rss.push(watch_memory(m, "after the scaling step")?);
    machine["loadavg_end"] = json!(m.succeed("cut -d' ' -f1-3 /proc/loadavg")?.trim());
    Ok(Report {
        machine,
        runs,
        control,
        recovery,
        scaling,
        watch_rss,
    })
}

fn setup_data_path(m: &mut Machine) -> Result<()> {
    // The pool exactly as `apply` writes it: 4 workers of the C search worker;
    // and a `protocol = "cgi"` pool of 4 running the trivial CGI program.
    write_config(
        m,
        &(pool_config("search", "/api/search", POOL_SIZE, POOL_SIZE) + &cgi_pool_section()),
    )?;
    apply(m)?;
    // fcgiwrap as Debian ships it, but our own instance with `-c` = the pool
    // size (the packaged fcgiwrap.socket runs -c 1), as nginx's user.
    m.succeed(&format!(
        "systemd-run --quiet --unit=bench-fcgiwrap -p User=www-data -p Group=www-data \
         -p RuntimeDirectory=bench-fcgiwrap /usr/sbin/fcgiwrap -c {POOL_SIZE} -s unix:{FCGIWRAP_SOCKET}"
    ))?;
    m.wait_until_succeeds(
        &format!("test -S {FCGIWRAP_SOCKET}"),
        "fcgiwrap's socket",
        Duration::from_secs(10),
    )?;
    // The proof of concept's layout: the same binary, 4 plain processes bound
    // to TCP ports (no socket activation, no sandbox; logging to the journal
    // like the pool's workers).
    for (i, port) in TCP_PORTS.iter().enumerate() {
        m.succeed(&format!(
            "systemd-run --quiet --unit=bench-tcp-{n} --setenv=CGIPOOL_WORKER=tcp@{n} \
             {WORKER} --listen 127.0.0.1:{port}",
            n = i + 1
        ))?;
    }
    m.write_text("/etc/nginx/conf.d/bench.conf", BENCH_NGINX)?;
    m.succeed("nginx -t -q && systemctl reload nginx")?;
    for t in TARGETS.iter().filter(|t| t.na.is_none()) {
        m.wait_until_succeeds(
            &format!("curl -sf -o /dev/null {}", shell_quote(t.url)),
            &format!("{} to answer 200", t.key),
            Duration::from_secs(15),
        )?;
    }
    for port in TCP_PORTS {
        m.succeed(&format!(
            "curl -sf -o /dev/null 'http://127.0.0.1:{port}{SEARCH_PATH}'"
        ))?;
    }
    let hdr = m.succeed(&format!(
        "curl -s -D - -o /dev/null 'http://127.0.0.1:80{SEARCH_PATH}'"
    ))?;
    ensure!(
        hdr.contains("X-Cgipool-Worker: search@"),
        "the pool route is not answered by a cgipool worker:\n{hdr}"
    );
    // Both CGI paths run the same program and answer the same body.
    for key in ["fcgiwrap", "pool_cgi"] {
        let url = TARGETS.iter().find(|t| t.key == key).map_or("", |t| t.url);
        let out = m.succeed(&format!("curl -s -i {}", shell_quote(url)))?;
        ensure!(
            out.starts_with("HTTP/1.1 200") && out.ends_with(&format!("\r\n\r\n{CGI_BODY}")),
            "{key} ({url}) does not answer the CGI program's body:\n{out}"
        );
        if key == "pool_cgi" {
            ensure!(
                out.contains("X-Cgipool-Worker: cgi@"),
                "the cgi route is not answered by cgipool's gateway:\n{out}"
            );
        }
    }
    Ok(())
}

/// Where the CPU goes during the data path: (label, units whose
/// CPUUsageNSec is summed). wrk runs under the guest agent's unit.
const CPU_UNITS: &[(&str, &str)] = &[
    ("wrk (agent)", "vmtest-agent.service"),
    ("nginx", "nginx.service"),
    ("journald", "systemd-journald.service"),
    ("pool workers", "system-cgipool\\x2dsearch.slice"),
    (
        "TCP workers",
        "bench-tcp-1.service bench-tcp-2.service bench-tcp-3.service bench-tcp-4.service",
    ),
    (
        "cgi pool (gateways + programs)",
        "system-cgipool\\x2dcgi.slice",
    ),
    ("fcgiwrap (+ programs)", "bench-fcgiwrap.service"),
    ("cgipool watch", "cgipool-watch.service"),
];

fn cpu_usage(m: &mut Machine) -> Result<Vec<f64>> {
    let mut v = Vec::new();
    for (_, units) in CPU_UNITS {
        let quoted: Vec<String> = units.split_whitespace().map(shell_quote).collect();
        let out = m.succeed(&format!(
            "systemctl show -P CPUUsageNSec {}",
            quoted.join(" ")
        ))?;
        let ns: f64 = out
            .split_whitespace()
            .filter_map(|x| x.parse::<f64>().ok())
            .sum();
        v.push(ns / 1e9);
    }
    Ok(v)
}

fn machine_info(m: &mut Machine) -> Result<Value> {
    let get =
        |m: &mut Machine, cmd: &str| -> Result<String> { Ok(m.succeed(cmd)?.trim().to_string()) };
    Ok(json!({
        "cores": get(m, "nproc")?,
        "cpu": get(m, "sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1")?,
        "kernel": get(m, "uname -r")?,
        "nginx": get(m, "nginx -v 2>&1")?,
        "wrk": get(m, "wrk -v 2>&1 | head -n1 | sed 's/ Copyright.*//' || true")?,
        "systemd": get(m, "systemctl --version | head -n1")?,
        // The CGI gateway is this binary: `make payload` installs the debug
        // build (target/debug/cgipool).
        "cgipool_binary_bytes": get(m, "stat -c %s /payload/bin/cgipool")?.parse::<u64>().ok(),
        "date": get(m, "date -u +%Y-%m-%dT%H:%M:%SZ")?,
        "loadavg_start": get(m, "cut -d' ' -f1-3 /proc/loadavg")?,
        // Other people's VM tests share the host's cores; this one excluded.
        "other_nspawn_containers": std::process::Command::new("pgrep")
            .args(["-c", "-x", "systemd-nspawn"])
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<u32>().ok())
            .map(|n| n.saturating_sub(1)),
    }))
}

/// Runs wrk in the guest and returns what report.lua printed.
fn wrk(m: &mut Machine, url: &str, conns: u32, secs: u32) -> Result<Value> {
    let cmd = format!(
        "wrk -t2 -c{conns} -d{secs}s --latency -s {GUEST_DIR}/report.lua {}",
        shell_quote(url)
    );
    let out = m.succeed_within(&cmd, Duration::from_secs(u64::from(secs) + 60))?;
    parse_wrk(&out).with_context(|| format!("reading the output of `{cmd}`"))
}

fn parse_wrk(out: &str) -> Result<Value> {
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("BENCHJSON "))
        .with_context(|| format!("no BENCHJSON line in wrk's output:\n{out}"))?;
    let v: Value =
        serde_json::from_str(line).with_context(|| format!("wrk summary is not JSON: {line}"))?;
    ensure!(
        v["requests"].is_u64() && v["duration_us"].as_u64().unwrap_or(0) > 0,
        "wrk summary lacks requests/duration: {line}"
    );
    Ok(v)
}

fn data_path(m: &mut Machine, mode: Mode) -> Result<Vec<Run>> {
    let live: Vec<&Target> = TARGETS.iter().filter(|t| t.na.is_none()).collect();
    if !mode.smoke {
        // Warm up every path once (connections, page cache, nginx workers).
        for t in &live {
            wrk(m, t.url, 16, 2)?;
        }
    }
    let mut runs = Vec::new();
    for rep in 1..=mode.reps {
        for conns in CONNS {
            // Interleaved: every configuration once per round, so drift on
            // the (shared) machine hits all of them.
            for t in &live {
                let v = wrk(m, t.url, conns, mode.secs)?;
                let run = Run {
                    target: t.key,
                    conns,
                    rep,
                    wrk: v,
                };
                eprintln!(
                    "  {:<14} c={conns:<3} round {rep}: {:>8.0} req/s  p99 {:>6.2} ms  errors {}",
                    t.key,
                    run.rps(),
                    run.num("p99_us") / 1000.0,
                    run.errors()
                );
                runs.push(run);
            }
        }
    }
    Ok(runs)
}

fn recovery(m: &mut Machine, mode: Mode) -> Result<Value> {
    let url = format!("http://127.0.0.1:80{SEARCH_PATH}");
    let out = format!("{GUEST_DIR}/recover-wrk.out");
    m.succeed(&format!(
        "systemd-run --quiet --collect --unit=bench-wrk-recover \
         -p StandardOutput=truncate:{out} -p StandardError=journal \
         /usr/bin/wrk -t2 -c16 -d{secs}s --latency -s {GUEST_DIR}/report.lua {url}",
        secs = mode.recover_secs,
        url = shell_quote(&url)
    ))?;
    let delay = f64::from(mode.recover_secs) / 3.0;
    let o = m.execute(
        &format!(
            "python3 {GUEST_DIR}/recover.py cgipool-search@1.service /run/cgipool/search/1.sock {} {delay:.2}",
            shell_quote(SEARCH_PATH)
        ),
        Duration::from_secs(u64::from(mode.recover_secs) + 60),
    )?;
    let kill = last_json(&o, "recover.py")?;
    ensure!(
        o.rc == 0,
        "the killed worker did not come back: {kill}\n{}",
        o.stderr
    );
    let text = m.wait_until_succeeds(
        &format!("grep -q '^BENCHJSON ' {out} && cat {out}"),
        "the wrk run under the kill to finish",
        Duration::from_secs(u64::from(mode.recover_secs) + 30),
    )?;
    let load = parse_wrk(&text)?;
    Ok(json!({ "kill": kill, "wrk": load, "load_secs": mode.recover_secs, "connections": 16 }))
}

/// The steps watch takes from `from` to `to`: doubling up (capped at max),
/// halving down (rounded up, floored at min), as src/watch/scaler.rs does.
fn scale_steps(from: u32, to: u32) -> u32 {
    let (mut n, mut k) = (from, 0);
    while n != to && k < 32 {
        n = if n < to {
            (n.max(1) * 2).min(to)
        } else {
            n.div_ceil(2).max(to)
        };
        k += 1;
    }
    k
}

/// The load step: a pool of STEP_MIN..STEP_MAX slow workers that only
/// `cgipool watch` scales; wrk with STEP_CONNS connections for `step_secs`
/// (bench/guest/scale.py times it from inside the guest). Replaces the data
/// path's pools (nothing else runs meanwhile).
fn scaling(m: &mut Machine, mode: Mode) -> Result<Value> {
    write_config(m, &step_pool_config())?;
    apply(m)?;
    let url = "http://127.0.0.1:80/api/search?q=load";
    m.wait_until_succeeds(
        &format!("curl -sf -o /dev/null {}", shell_quote(url)),
        "the step pool to answer 200",
        Duration::from_secs(15),
    )?;
    // watch re-reads the applied config on its next step; give it a few
    // seconds to log the new pool, and restart it (saying so) if it does not.
    let watching = |m: &mut Machine| -> Result<Vec<String>> {
        let _ = m.execute(
            &format!("for i in $(seq 50); do journalctl -b -o cat --no-pager -u cgipool-watch.service | grep -E '^watch: (watching|intent [0-9]+ .*: watching)' | tail -n 1 | grep -q '{STEP_POOL}' && exit 0; sleep 0.1; done; exit 1"),
            Duration::from_secs(10),
        )?;
        let line = m.succeed(
            "journalctl -b -o cat --no-pager -u cgipool-watch.service | grep -E '^watch: (watching|intent [0-9]+ .*: watching)' | tail -n 1",
        )?;
        let list = match line.trim().rsplit_once('(') {
            Some((_, l)) => l.trim_end_matches(')').to_string(),
            None => line
                .trim()
                .rsplit_once("now watching ")
                .map(|(_, l)| l.to_string())
                .unwrap_or_default(),
        };
        Ok(list.split(", ").map(String::from).collect())
    };
    let before = watching(m)?;
    let restarted = !before.iter().any(|p| p == STEP_POOL);
    if restarted {
        eprintln!(
            "  note: watch does not scale the new pool (it watches {before:?}): restarting it"
        );
        m.succeed("systemctl restart cgipool-watch.service")?;
        m.wait_until_succeeds(
            &format!(
                "journalctl -b -o cat --no-pager -u cgipool-watch.service | grep '^watch: watching' | tail -n 1 | grep -q '[(, ]{STEP_POOL}[,)]' && test -S /run/cgipool/watch.sock"
            ),
            "watch to watch the step pool",
            Duration::from_secs(15),
        )?;
    }
    let secs = mode.step_secs;
    // Scale-down takes about 2 windows of scale_down_after; give it 4 more.
    let down_limit = STEP_DOWN_AFTER_SECS * 6.0;
    let cmd = format!(
        "python3 {GUEST_DIR}/scale.py {STEP_POOL} {STEP_MIN} {STEP_MAX} {secs} {down_limit} -- \
         wrk -t2 -c{STEP_CONNS} -d{secs}s --timeout 10s --latency -H 'Connection: close' \
         -s {GUEST_DIR}/report.lua {}",
        shell_quote(url)
    );
    let limit = Duration::from_secs(u64::from(secs) + down_limit as u64 + 120);
    let o = m.execute(&cmd, limit)?;
    let step = last_json(&o, "scale.py")?;
    ensure!(o.rc == 0, "the load step did not run: {step}\n{}", o.stderr);
    let load = parse_wrk(&o.stdout)?;
    let decisions = m.succeed(
        "journalctl -b -o short-monotonic --no-pager -u cgipool-watch.service | grep -F ' scale ' | tail -n 20 || true",
    )?;
    eprintln!(
        "  at max after {} s, back at min {} s after the load; timeline {}",
        step["secs_to_max"], step["secs_back_to_min"], step["timeline"]
    );
    Ok(json!({
        "step": step,
        "wrk": load,
        "connections": STEP_CONNS,
        "load_secs": secs,
        "down_limit_secs": down_limit,
        "watch_decisions": decisions.lines().collect::<Vec<_>>(),
        "watch_pools_after_apply": before,
        "watch_restarted_by_bench": restarted,
    }))
}

/// cgipool-watch.service's main process: VmHWM (peak RSS) and VmRSS in kB,
/// how long it has run and how often systemd restarted it.
fn watch_memory(m: &mut Machine, when: &str) -> Result<Value> {
    let out = m.succeed(
        "pid=$(systemctl show -P MainPID cgipool-watch.service); test \"$pid\" -gt 0; \
         echo $pid $(awk '/^VmHWM:/{print $2}' /proc/$pid/status) \
         $(awk '/^VmRSS:/{print $2}' /proc/$pid/status) \
         $(ps -o etimes= -p $pid) $(systemctl show -P NRestarts cgipool-watch.service)",
    )?;
    let f: Vec<u64> = out
        .split_whitespace()
        .map(|x| x.parse::<u64>())
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("reading cgipool watch's memory: {out}"))?;
    ensure!(f.len() == 5, "reading cgipool watch's memory: {out}");
    Ok(json!({
        "when": when, "pid": f[0], "vmhwm_kb": f[1], "vmrss_kb": f[2],
        "running_secs": f[3], "nrestarts": f[4],
    }))
}

/// Runs a command through measure.py and returns its record, whatever the
/// command's exit status (`rc`).
fn measure(m: &mut Machine, cmd: &str) -> Result<Value> {
    let o = m.succeed_within(
        &format!("python3 {GUEST_DIR}/measure.py {}", shell_quote(cmd)),
        Duration::from_secs(240),
    )?;
    let mut v: Value = o
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .with_context(|| format!("measure.py printed no JSON for `{cmd}`:\n{o}"))?;
    v["cmd"] = json!(cmd);
    Ok(v)
}

/// Runs a command through measure.py; it must exit 0.
fn timed(m: &mut Machine, cmd: &str) -> Result<Value> {
    let v = measure(m, cmd)?;
    ensure!(
        v["rc"].as_i64() == Some(0),
        "`{cmd}` failed (exit {}):\n{}\n{}",
        v["rc"],
        v["stdout_tail"].as_str().unwrap_or(""),
        v["stderr_tail"].as_str().unwrap_or("")
    );
    Ok(v)
}

fn secs(v: &Value) -> f64 {
    v["secs"].as_f64().unwrap_or(f64::NAN)
}

/// The control plane, `cp_reps` rounds of: nothing → apply N → no-change
/// applies and batched shows → apply 1 → batched start of the same N
/// workers → batched stop of N-1 → a loop of N starts.
fn control_plane(m: &mut Machine, mode: Mode) -> Result<Vec<Value>> {
    let n = mode.workers;
    let pool = "cp";
    let units = |range: std::ops::RangeInclusive<u32>| -> String {
        let (a, b) = (range.start(), range.end());
        format!("cgipool-{pool}@{{{a}..{b}}}.socket cgipool-{pool}@{{{a}..{b}}}.service")
    };
    // Brace expansion needs bash.
    let bash = |s: String| format!("exec bash -c {}", shell_quote(&s));
    let apply_cmd = format!("exec cgipool apply {CONFIG}");
    let mut rounds = Vec::new();
    for rep in 1..=mode.cp_reps {
        let mut r = json!({ "round": rep, "workers": n });
        write_config(m, &pool_config(pool, "/api/cp", n, n))?;
        // A failing apply is a finding, not broken machinery: it is reported
        // (FAIL) and the baselines are still measured.
        let up = measure(m, &apply_cmd)?;
        let up_ok = up["rc"].as_i64() == Some(0);
        r["apply_up"] = up;
        if up_ok {
            wait_active(m, pool, n)?;
            let mut nochange = Vec::new();
            for _ in 0..mode.quick_reps {
                let v = timed(m, &apply_cmd)?;
                ensure!(
                    v["stdout_tail"]
                        .as_str()
                        .unwrap_or("")
                        .contains("no changes"),
                    "a second apply changed something: {}",
                    v["stdout_tail"]
                );
                nochange.push(v);
            }
            r["apply_nochange"] = json!(nochange);
        }
        write_config(m, &pool_config(pool, "/api/cp", 1, 1))?;
        // Failing applies are findings here too (reported, not fatal).
        let down = measure(m, &apply_cmd)?;
        let down_ok = down["rc"].as_i64() == Some(0);
        if up_ok {
            r["apply_down"] = down;
        } else {
            // Only to get the unit files (templates) the baselines start.
            r["apply_down_unmeasured"] = down;
        }
        if !down_ok {
            // Stop whatever the failed applies left running, so the
            // baselines start from no running worker on the same templates
            // (jobs the failed apply queued may still cancel the first stop).
            m.wait_until_succeeds(
                &format!(
                    "systemctl stop 'cgipool-{pool}@*' && test -z \"$(systemctl list-units --no-legend --plain --state=active,activating,deactivating,reloading 'cgipool-{pool}@*')\""
                ),
                &format!("every unit of {pool} to stop after the failed apply"),
                Duration::from_secs(60),
            )?;
        }
        m.succeed(&format!(
            "test -f /etc/systemd/system/cgipool-{pool}@.service && test -f /etc/systemd/system/cgipool-{pool}@.socket"
        ))?;
        // Baselines on the same unit files: no unit of the pool runs, then
        // systemctl starts the same N workers (socket and service each).
        m.succeed(&format!(
            "systemctl stop cgipool-{pool}@1.service cgipool-{pool}@1.socket"
        ))?;
        r["start_batched"] = timed(m, &bash(format!("systemctl start {}", units(1..=n))))?;
        wait_active(m, pool, n)?;
        let mut show = Vec::new();
        for _ in 0..mode.quick_reps {
            show.push(timed(
                m,
                &bash(format!("systemctl show {} >/dev/null", units(1..=n))),
            )?);
        }
        r["show_batched"] = json!(show);
        r["stop_batched"] = timed(m, &bash(format!("systemctl stop {}", units(2..=n))))?;
        m.succeed(&format!("systemctl stop 'cgipool-{pool}@*'"))?;
        r["start_loop"] = timed(
            m,
            &bash(format!(
                "for i in $(seq 1 {n}); do systemctl start cgipool-{pool}@$i.socket cgipool-{pool}@$i.service || exit 1; done"
            )),
        )?;
        wait_active(m, pool, n)?;
        m.succeed(&format!("systemctl stop 'cgipool-{pool}@*'"))?;
        // Back to nothing for the next round and the data path.
        m.succeed_within(&format!("cgipool down {CONFIG}"), Duration::from_secs(120))?;
        eprintln!(
            "  round {rep}: apply 0→{n} {}, batched start {}, loop {}, apply {n}→1 {}, no-change apply {}, batched show {} (s)",
            fmt_secs(&r["apply_up"]),
            fmt_secs(&r["start_batched"]),
            fmt_secs(&r["start_loop"]),
            fmt_secs(&r["apply_down"]),
            fmt_med(&r["apply_nochange"]),
            fmt_med(&r["show_batched"]),
        );
        rounds.push(r);
    }
    Ok(rounds)
}

fn wait_active(m: &mut Machine, pool: &str, n: u32) -> Result<()> {
    m.wait_until_succeeds(
        &format!(
            "test $(systemctl list-units --no-legend --plain --state=active 'cgipool-{pool}@*.service' | wc -l) -eq {n}"
        ),
        &format!("{n} workers of {pool} to be active"),
        Duration::from_secs(60),
    )?;
    Ok(())
}

fn nochange_secs(v: &Value) -> Vec<f64> {
    v.as_array()
        .map(|a| a.iter().map(secs).collect())
        .unwrap_or_default()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let k = v.len();
    if k % 2 == 1 {
        v[k / 2]
    } else {
        (v[k / 2 - 1] + v[k / 2]) / 2.0
    }
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// One line of the summary table.
struct Row {
    section: &'static str,
    figure: String,
    value: Option<f64>,
    shown: String,
    baseline: String,
    baseline_value: Option<f64>,
    ratio: Option<f64>,
    goal: String,
    pass: Option<bool>,
    /// Whether a stretch goal (past `goal`) was met, where there is one.
    stretch: Option<bool>,
}

const INFO: &str = "— (info)";

impl Row {
    /// A figure next to a baseline from the same run, with their ratio;
    /// `goal` is its text and whether the ratio meets it.
    fn vs(
        section: &'static str,
        figure: String,
        (value, shown): (f64, String),
        (base, base_shown): (f64, String),
        goal: Option<(&str, bool)>,
    ) -> Row {
        Row {
            section,
            figure,
            value: Some(value),
            shown,
            baseline: base_shown,
            baseline_value: Some(base),
            ratio: Some(value / base),
            goal: goal.map_or(INFO, |(g, _)| g).into(),
            pass: goal.map(|(_, ok)| ok),
            stretch: None,
        }
    }

    /// A figure without a baseline, for information.
    fn info(section: &'static str, figure: String, value: f64, shown: String) -> Row {
        Row {
            section,
            figure,
            value: Some(value),
            shown,
            baseline: "—".into(),
            baseline_value: None,
            ratio: None,
            goal: INFO.into(),
            pass: None,
            stretch: None,
        }
    }

    /// A count of failed requests (next to a baseline's, if there is one);
    /// with `must_be_zero` anything but 0 fails.
    fn failures(
        section: &'static str,
        figure: String,
        n: u64,
        base: Option<(u64, String)>,
        must_be_zero: bool,
    ) -> Row {
        let (baseline_value, baseline) = match base {
            Some((b, shown)) => (Some(b as f64), shown),
            None => (None, "—".into()),
        };
        Row {
            section,
            figure,
            value: Some(n as f64),
            shown: n.to_string(),
            baseline,
            baseline_value,
            ratio: None,
            goal: if must_be_zero { "0" } else { INFO }.into(),
            pass: must_be_zero.then_some(n == 0),
            stretch: None,
        }
    }
}

/// Per (target, connections): the mean over the rounds.
struct Agg {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
    per_round: Vec<f64>,
}

fn aggregate(runs: &[Run], target: &str, conns: u32) -> Option<Agg> {
    let rs: Vec<&Run> = runs
        .iter()
        .filter(|r| r.target == target && r.conns == conns)
        .collect();
    if rs.is_empty() {
        return None;
    }
    let per_round: Vec<f64> = rs.iter().map(|r| r.rps()).collect();
    Some(Agg {
        rps: mean(&per_round),
        p50_ms: mean(
            &rs.iter()
                .map(|r| r.num("p50_us") / 1000.0)
                .collect::<Vec<_>>(),
        ),
        p99_ms: mean(
            &rs.iter()
                .map(|r| r.num("p99_us") / 1000.0)
                .collect::<Vec<_>>(),
        ),
        errors: rs.iter().map(|r| r.errors()).sum(),
        per_round,
    })
}

fn rows(rep: &Report, mode: Mode) -> Vec<Row> {
    let mut v = Vec::new();
    let dp = "data path";
    let rps = |a: &Agg| format!("{:.0}", a.rps);
    for conns in CONNS {
        let get = |k: &str| aggregate(&rep.runs, k, conns);
        let (pool, ceil, tcp, tcpk) = (
            get("pool"),
            get("ceiling"),
            get("tcp"),
            get("tcp_keepalive"),
        );
        if let (Some(p), Some(c)) = (&pool, &ceil) {
            // The goal is for 16 connections; 64 is for information.
            let goal = (conns == 16).then_some(("≥ 0.40", p.rps / c.rps >= 0.40));
            v.push(Row::vs(
                dp,
                format!("pool req/s, {conns} conns, vs nginx `return 200`"),
                (p.rps, rps(p)),
                (c.rps, rps(c)),
                goal,
            ));
        }
        if let (Some(p), Some(t)) = (&pool, &tcp) {
            v.push(Row::vs(
                dp,
                format!("pool req/s, {conns} conns, vs PoC TCP layout"),
                (p.rps, rps(p)),
                (t.rps, rps(t)),
                Some(("≥ 1.2", p.rps / t.rps >= 1.2)),
            ));
        }
        if let (Some(p), Some(t)) = (&pool, &tcpk) {
            v.push(Row::vs(
                dp,
                format!("pool req/s, {conns} conns, vs TCP + keepalive"),
                (p.rps, rps(p)),
                (t.rps, rps(t)),
                None,
            ));
        }
        if let Some(p) = &pool {
            v.push(Row::failures(
                dp,
                format!("pool errors, {conns} conns (all rounds)"),
                p.errors,
                None,
                true,
            ));
        }
    }
    for conns in CONNS {
        let (cgi, fcgi) = (
            aggregate(&rep.runs, "pool_cgi", conns),
            aggregate(&rep.runs, "fcgiwrap", conns),
        );
        let (Some(c), Some(f)) = (cgi, fcgi) else {
            continue;
        };
        let ratio = c.rps / f.rps;
        let mut row = Row::vs(
            dp,
            format!("cgipool-cgi req/s, {conns} conns, vs fcgiwrap (-c 4)"),
            (c.rps, rps(&c)),
            (f.rps, rps(&f)),
            Some(("≥ 1.0 (stretch ≥ 1.3)", ratio >= 1.0)),
        );
        row.stretch = Some(ratio >= 1.3);
        v.push(row);
        let ms = |x: f64| format!("{x:.2} ms");
        v.push(Row::vs(
            dp,
            format!("cgipool-cgi p99, {conns} conns, vs fcgiwrap (-c 4)"),
            (c.p99_ms, ms(c.p99_ms)),
            (f.p99_ms, ms(f.p99_ms)),
            None,
        ));
        v.push(Row::failures(
            dp,
            format!("cgipool-cgi errors, {conns} conns (all rounds)"),
            c.errors,
            Some((f.errors, format!("{} (fcgiwrap)", f.errors))),
            true,
        ));
    }
    let cp = "control plane";
    let n = mode.workers;
    let med = |k: &str| median(rep.control.iter().map(|r| secs(&r[k])).collect());
    let medl = |k: &str| {
        median(
            rep.control
                .iter()
                .flat_map(|r| nochange_secs(&r[k]))
                .collect(),
        )
    };
    let up = med("apply_up");
    let start_b = med("start_batched");
    let start_l = med("start_loop");
    let down = med("apply_down");
    let stop_b = med("stop_batched");
    let noch = medl("apply_nochange");
    let show = medl("show_batched");
    // Why an apply failed in some round, if it did (one line, table-safe).
    let failed_of = |key: &str| -> Option<String> {
        rep.control
            .iter()
            .find(|r| r[key].is_object() && r[key]["rc"].as_i64() != Some(0))
            .map(|r| {
                let err = r[key]["stderr_tail"].as_str().unwrap_or("");
                let line = err
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    // nginx's "2026/01/01 00:00:00 [crit] 141#141: " prefix
                    .map(|l| match l.find("] ") {
                        Some(i) if l.starts_with(|c: char| c.is_ascii_digit()) => {
                            let rest = &l[i + 2..];
                            rest.find(": ").map_or(rest, |j| &rest[j + 2..])
                        }
                        _ => l,
                    })
                    .collect::<Vec<_>>()
                    .join(" / ")
                    .replace('|', "\\|");
                let mut short: String = line.chars().take(220).collect();
                if short.len() < line.len() {
                    short.truncate(short.rfind(' ').unwrap_or(short.len()));
                    short.push_str(" …");
                }
                format!("FAILED (exit {}): {short}", r[key]["rc"])
            })
    };
    let up_failed = failed_of("apply_up");
    let down_failed = failed_of("apply_down");
    let time_row = |figure: String,
                    a: f64,
                    failed: Option<&str>,
                    base_label: &str,
                    b: f64,
                    goal: Option<f64>| {
        let goal_s = goal.map_or(INFO.into(), |g| format!("≤ {g}"));
        let baseline = format!("{b:.3} s ({base_label})");
        match failed {
            Some(why) => Row {
                section: cp,
                figure,
                value: None,
                shown: why.to_string(),
                baseline,
                baseline_value: Some(b),
                ratio: None,
                goal: goal_s,
                pass: goal.map(|_| false),
                stretch: None,
            },
            None => Row {
                section: cp,
                figure,
                value: Some(a),
                shown: format!("{a:.3} s"),
                baseline,
                baseline_value: Some(b),
                ratio: Some(a / b),
                goal: goal_s,
                pass: goal.map(|g| a / b <= g),
                stretch: None,
            },
        }
    };
    let not_run = up_failed
        .as_ref()
        .map(|_| format!("not measured: apply 0 → {n} failed"));
    v.push(time_row(
        format!("`cgipool apply` 0 → {n} workers"),
        up,
        up_failed.as_deref(),
        &format!("one batched `systemctl start` of {n}"),
        start_b,
        Some(1.5),
    ));
    v.push(time_row(
        format!("`cgipool apply` 0 → {n} workers"),
        up,
        up_failed.as_deref(),
        &format!("loop of {n} `systemctl start`"),
        start_l,
        None,
    ));
    let mut down_row = time_row(
        format!("`cgipool apply` {n} → 1 workers"),
        down,
        not_run.as_deref().or(down_failed.as_deref()),
        &format!("one batched `systemctl stop` of {}", n - 1),
        stop_b,
        None,
    );
    let mut noch_row = time_row(
        format!("no-change `cgipool apply`, {n} workers"),
        noch,
        not_run.as_deref(),
        &format!("one batched `systemctl show` of {} units", 2 * n),
        show,
        Some(3.0),
    );
    if not_run.is_some() {
        // Not measurable is not a verdict on the figure itself.
        down_row.pass = None;
        noch_row.pass = None;
    }
    v.push(down_row);
    v.push(noch_row);
    let rss = rep
        .control
        .iter()
        .flat_map(|r| {
            [&r["apply_up"], &r["apply_down"]]
                .into_iter()
                .chain(r["apply_nochange"].as_array().into_iter().flatten())
                .map(|v| v["peak_rss_kb"].as_f64().unwrap_or(0.0))
                .collect::<Vec<_>>()
        })
        .fold(0.0, f64::max);
    v.push(Row::info(
        cp,
        "peak RSS of `cgipool apply` (VmHWM)".into(),
        rss,
        format!("{:.1} MiB", rss / 1024.0),
    ));
    // The largest reading of watch's VmHWM (the same process unless systemd
    // restarted it; then the readings say so).
    if let Some(w) = rep
        .watch_rss
        .iter()
        .max_by_key(|w| w["vmhwm_kb"].as_u64().unwrap_or(0))
    {
        let kb = w["vmhwm_kb"].as_f64().unwrap_or(f64::NAN);
        v.push(Row::info(
            cp,
            format!(
                "peak RSS of `cgipool watch` (VmHWM, {} s running, {})",
                w["running_secs"],
                w["when"].as_str().unwrap_or("?")
            ),
            kb,
            format!("{:.1} MiB", kb / 1024.0),
        ));
    }
    let rc = "recovery";
    let kill = &rep.recovery["kill"];
    let ans = kill["secs_to_answer"].as_f64().unwrap_or(f64::NAN);
    v.push(Row::info(
        rc,
        "kill -9 of a worker under load: until it answers again".into(),
        ans,
        format!("{:.0} ms", ans * 1000.0),
    ));
    let w = &rep.recovery["wrk"];
    v.push(Row::failures(
        rc,
        format!(
            "failed requests during the kill ({} requests, 16 conns)",
            w["requests"].as_u64().unwrap_or(0)
        ),
        wrk_errors(w),
        None,
        true,
    ));
    let sc = "scaling";
    let step = &rep.scaling["step"];
    let up_base = f64::from(scale_steps(STEP_MIN, STEP_MAX)) * STEP_UP_AFTER_SECS;
    let down_base = f64::from(scale_steps(STEP_MAX, STEP_MIN)) * STEP_DOWN_AFTER_SECS;
    let timed_row =
        |figure: String, got: Option<f64>, missing: String, base: f64, why: String| Row {
            section: sc,
            figure,
            value: got,
            shown: got.map_or(missing, |x| format!("{x:.1} s")),
            baseline: format!("{base:.1} s ({why})"),
            baseline_value: Some(base),
            ratio: got.map(|x| x / base),
            goal: INFO.into(),
            pass: None,
            stretch: None,
        };
    v.push(timed_row(
        format!(
            "load step ({STEP_CONNS} conns, 20 ms/request) → pool at max ({STEP_MIN} → {STEP_MAX})"
        ),
        step["secs_to_max"].as_f64(),
        format!(
            "not reached in {} s of load",
            rep.scaling["load_secs"].as_u64().unwrap_or(0)
        ),
        up_base,
        format!(
            "{} × scale_up_after = {STEP_UP_AFTER_SECS}s",
            scale_steps(STEP_MIN, STEP_MAX)
        ),
    ));
    v.push(timed_row(
        format!("end of the load → pool back at min ({STEP_MAX} → {STEP_MIN})"),
        step["secs_back_to_min"].as_f64(),
        if step["left_min"].as_bool() == Some(false) {
            "n/a (never scaled up)".into()
        } else {
            format!(
                "not back within {} s",
                rep.scaling["down_limit_secs"].as_f64().unwrap_or(0.0)
            )
        },
        down_base,
        format!(
            "{} × scale_down_after = {STEP_DOWN_AFTER_SECS}s",
            scale_steps(STEP_MAX, STEP_MIN)
        ),
    ));
    let w = &rep.scaling["wrk"];
    v.push(Row::failures(
        sc,
        format!(
            "failed requests during the load step ({} requests)",
            w["requests"].as_u64().unwrap_or(0)
        ),
        wrk_errors(w),
        None,
        false,
    ));
    v
}

/// A measure.py record as seconds for a table cell.
fn fmt_secs(v: &Value) -> String {
    match v["rc"].as_i64() {
        None => "—".into(),
        Some(0) => format!("{:.3}", secs(v)),
        Some(rc) => format!("failed (exit {rc})"),
    }
}

fn fmt_med(v: &Value) -> String {
    let m = median(nochange_secs(v));
    if m.is_finite() {
        format!("{m:.3}")
    } else {
        "—".into()
    }
}

fn verdict(r: &Row) -> &'static str {
    match (r.pass, r.stretch) {
        (Some(true), Some(true)) => "pass (stretch met)",
        (Some(true), Some(false)) => "pass (stretch not met)",
        (Some(true), None) => "pass",
        (Some(false), _) => "FAIL",
        (None, _) => "—",
    }
}

fn render(rep: &Report, mode: Mode, took: Duration) -> (String, Value) {
    let rows = rows(rep, mode);
    let mi = &rep.machine;
    let s = |v: &Value| v.as_str().unwrap_or("?").to_string();
    let mut md = String::new();
    let _ = writeln!(md, "# cgipool bench: {} run\n", mode.name());
    let _ = writeln!(
        md,
        "- date: {}\n- machine: {} cores ({}), kernel {}, {}, {}\n- {}\n- load average (1/5/15 min) at start {}, at end {}; other nspawn containers on the host at start: {}\n- mode: {} ({} s per wrk run, {} round(s) interleaved; control plane with {} workers, {} round(s)); took {:.0} s\n",
        s(&mi["date"]),
        s(&mi["cores"]),
        s(&mi["cpu"]),
        s(&mi["kernel"]),
        s(&mi["nginx"]),
        s(&mi["wrk"]),
        s(&mi["systemd"]),
        s(&mi["loadavg_start"]),
        s(&mi["loadavg_end"]),
        mi["other_nspawn_containers"],
        mode.name(),
        mode.secs,
        mode.reps,
        mode.workers,
        mode.cp_reps,
        took.as_secs_f64(),
    );
    if mode.smoke {
        let _ = writeln!(md, "**Smoke run: the figures only show that the machinery works; they are not the report.**\n");
    }
    let _ = writeln!(md, "## Summary\n");
    let _ = writeln!(
        md,
        "| section | figure | value | baseline (same run) | ratio | goal | result |\n|---|---|---|---|---|---|---|"
    );
    for r in &rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.section,
            r.figure,
            r.shown,
            r.baseline,
            r.ratio.map_or("—".into(), |x| format!("{x:.2}")),
            r.goal,
            verdict(r)
        );
    }
    let _ = writeln!(md, "\n## Data path (wrk -t2, mean over rounds)\n");
    let _ = writeln!(
        md,
        "| configuration | conns | req/s | req/s per round | p50 | p99 | errors |\n|---|---|---|---|---|---|---|"
    );
    for conns in CONNS {
        for t in TARGETS {
            if let Some(na) = t.na {
                let _ = writeln!(md, "| {} | {conns} | {na} | | | | |", t.label);
                continue;
            }
            if let Some(a) = aggregate(&rep.runs, t.key, conns) {
                let rounds: Vec<String> = a.per_round.iter().map(|x| format!("{x:.0}")).collect();
                let _ = writeln!(
                    md,
                    "| {} | {conns} | {:.0} | {} | {:.2} ms | {:.2} ms | {} |",
                    t.label,
                    a.rps,
                    rounds.join(", "),
                    a.p50_ms,
                    a.p99_ms,
                    a.errors
                );
            }
        }
    }
    if let Some(cpu) = mi["data_path_cpu_secs"].as_object() {
        let wall = cpu
            .get("wall_secs")
            .and_then(Value::as_f64)
            .unwrap_or(f64::NAN);
        let parts: Vec<String> = cpu
            .get("units")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|u| {
                format!(
                    "{} {:.1} s",
                    u["what"].as_str().unwrap_or("?"),
                    u["cpu_secs"].as_f64().unwrap_or(f64::NAN)
                )
            })
            .collect();
        let _ = writeln!(
            md,
            "\nCPU time used during the data path ({wall:.0} s wall, all configurations): {}.",
            parts.join(", ")
        );
    }
    let _ = writeln!(
        md,
        "\nThe CGI rows: the same program ({CGI_PROGRAM}, cgi-src/hello_cgi.c) behind both. cgipool's gateway is the payload's `cgipool` ({:.0} MB, {} build): it runs the program inside the worker's sandbox, logs one journal line per request, and keeps nginx's connections open between requests (the pool's upstream has `keepalive 16`). fcgiwrap runs it unsandboxed as www-data, nginx connects to it anew per request (`fastcgi_keep_conn` off, the default), and it logs nothing per request. Each cgipool worker has its own socket, so nginx (`least_conn`) queues a request behind that worker's request in flight, while fcgiwrap's 4 processes take the next request from one shared socket: the likely reason for cgipool's longer p99.",
        mi["cgipool_binary_bytes"].as_f64().unwrap_or(f64::NAN) / 1e6,
        std::env::var("CGIPOOL_BENCH_PROFILE").unwrap_or_else(|_| "unknown".into())
    );
    let _ = writeln!(md, "\n## Control plane (seconds, per round)\n");
    let _ = writeln!(
        md,
        "| round | apply 0→N | batched start | loop of starts | apply N→1 | batched stop of N-1 | no-change apply (median) | batched show (median) | apply peak RSS (self / with children) |\n|---|---|---|---|---|---|---|---|---|"
    );
    for r in &rep.control {
        let up = &r["apply_up"];
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.1} / {:.1} MiB |",
            r["round"],
            fmt_secs(up),
            fmt_secs(&r["start_batched"]),
            fmt_secs(&r["start_loop"]),
            fmt_secs(&r["apply_down"]),
            fmt_secs(&r["stop_batched"]),
            fmt_med(&r["apply_nochange"]),
            fmt_med(&r["show_batched"]),
            up["peak_rss_kb"].as_f64().unwrap_or(0.0) / 1024.0,
            up["tree_maxrss_kb"].as_f64().unwrap_or(0.0) / 1024.0,
        );
    }
    let k = &rep.recovery["kill"];
    let ms = |v: &Value| {
        v.as_f64()
            .map_or("—".to_string(), |x| format!("{:.0} ms", x * 1000.0))
    };
    let _ = writeln!(
        md,
        "\n## Recovery\n\n`kill -9` of cgipool-search@1 (PID {} → {}) {:.1} s into {} s of wrk at 16 connections on the pool: new main PID active after {}, a request sent to its socket after that answered at {}, a request sent to its socket right at the kill answered at {}; NRestarts {} → {}.\n",
        k["old_pid"],
        k["new_pid"],
        f64::from(mode.recover_secs) / 3.0,
        mode.recover_secs,
        ms(&k["secs_to_active"]),
        ms(&k["secs_to_answer"]),
        ms(&k["secs_queued_request_answered"]),
        k["nrestarts_before"],
        k["nrestarts_after"],
    );
    let sc = &rep.scaling;
    let st = &sc["step"];
    let timeline: Vec<String> = st["timeline"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| format!("{:.1} s: {}", p[0].as_f64().unwrap_or(f64::NAN), p[1]))
        .collect();
    let sw = &sc["wrk"];
    let step_rps = sw["requests"].as_f64().unwrap_or(0.0)
        / (sw["duration_us"].as_f64().unwrap_or(f64::NAN) / 1e6);
    let _ = writeln!(
        md,
        "## Scaling

Pool `{STEP_POOL}` (the search worker with CGIPOOL_TEST_DELAY_MS=20, min {STEP_MIN}, max {STEP_MAX}, scale_up_after {STEP_UP_AFTER_SECS}s, scale_down_after {STEP_DOWN_AFTER_SECS}s), scaled only by `cgipool watch`; wrk with {} connections (`Connection: close`) for {} s, {:.0} req/s, p99 {:.1} ms. Active workers, polled every 100 ms from the start of the load (it ended at {:.1} s): {}.
",
        sc["connections"],
        sc["load_secs"],
        step_rps,
        sw["p99_us"].as_f64().unwrap_or(f64::NAN) / 1000.0,
        st["load_end_secs"].as_f64().unwrap_or(f64::NAN),
        timeline.join(", "),
    );
    let decisions: Vec<&str> = sc["watch_decisions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if sc["watch_restarted_by_bench"].as_bool() == Some(true) {
        let _ = writeln!(
            md,
            "**Note:** after the `cgipool apply` that added pool `{STEP_POOL}`, `cgipool watch` did not report watching it within 5 s (it still watched {}), so the bench restarted cgipool-watch.service before the load step.\n",
            sc["watch_pools_after_apply"]
        );
    }
    if !decisions.is_empty() {
        let _ = writeln!(
            md,
            "watch's decisions (journal, monotonic clock):

```
{}
```
",
            decisions.join(
                "
"
            )
        );
    }
    let readings: Vec<String> = rep
        .watch_rss
        .iter()
        .map(|w| {
            format!(
                "{}: PID {}, VmHWM {:.1} MiB, VmRSS {:.1} MiB, running {} s, NRestarts {}",
                w["when"].as_str().unwrap_or("?"),
                w["pid"],
                w["vmhwm_kb"].as_f64().unwrap_or(f64::NAN) / 1024.0,
                w["vmrss_kb"].as_f64().unwrap_or(f64::NAN) / 1024.0,
                w["running_secs"],
                w["nrestarts"],
            )
        })
        .collect();
    let _ = writeln!(
        md,
        "`cgipool watch` (cgipool-watch.service's main process): {}.
",
        readings.join("; ")
    );
    let _ = writeln!(md, "How to read this: bench/README.md.");
    let json = json!({
        "mode": mode.name(),
        "machine": rep.machine,
        "settings": {
            "wrk_secs": mode.secs, "rounds": mode.reps, "connections": CONNS,
            "control_plane_workers": mode.workers, "control_plane_rounds": mode.cp_reps,
            "quick_repeats": mode.quick_reps, "recovery_load_secs": mode.recover_secs,
            "scaling_load_secs": mode.step_secs,
        },
        "summary": rows.iter().map(|r| json!({
            "section": r.section, "figure": r.figure, "value": r.value, "shown": r.shown,
            "baseline": r.baseline, "baseline_value": r.baseline_value, "ratio": r.ratio,
            "goal": r.goal, "pass": r.pass, "stretch_pass": r.stretch,
        })).collect::<Vec<_>>(),
        "data_path": rep.runs.iter().map(|r| json!({
            "target": r.target, "connections": r.conns, "round": r.rep,
            "rps": r.rps(), "errors": r.errors(), "wrk": r.wrk,
        })).collect::<Vec<_>>(),
        "data_path_not_measured": TARGETS.iter().filter_map(|t| t.na.map(|na| json!({"target": t.key, "why": na}))).collect::<Vec<_>>(),
        "control_plane": rep.control,
        "recovery": rep.recovery,
        "scaling": rep.scaling,
        "watch_memory": rep.watch_rss,
        "took_secs": took.as_secs_f64(),
    });
    (md, json)
}

/// The JSON object a guest helper prints as its last line of output.
fn last_json(o: &crate::agent::Output, helper: &str) -> Result<Value> {
    o.stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .with_context(|| {
            format!(
                "{helper} printed no JSON (exit {}):\n{}\n{}",
                o.rc, o.stdout, o.stderr
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed report's summary is what `rows` computes from the
    /// committed raw figures (the summary code cannot drift silently).
    #[test]
    fn summary_recomputes_from_the_committed_raw_figures() {
        let text = include_str!("../../bench/results/latest.json");
        let j: Value = serde_json::from_str(text).expect("latest.json");
        let runs = j["data_path"]
            .as_array()
            .expect("data_path")
            .iter()
            .map(|r| Run {
                target: TARGETS
                    .iter()
                    .find(|t| t.key == r["target"])
                    .map(|t| t.key)
                    .expect("a known target"),
                conns: r["connections"].as_u64().expect("connections") as u32,
                rep: r["round"].as_u64().expect("round") as u32,
                wrk: r["wrk"].clone(),
            })
            .collect();
        let rep = Report {
            machine: j["machine"].clone(),
            runs,
            control: j["control_plane"].as_array().expect("control").clone(),
            recovery: j["recovery"].clone(),
            scaling: j["scaling"].clone(),
            watch_rss: j["watch_memory"].as_array().expect("watch").clone(),
        };
        let mut mode = Mode::defaults(j["mode"] == "smoke");
        mode.workers = j["settings"]["control_plane_workers"]
            .as_u64()
            .expect("workers") as u32;
        let (_, again) = render(&rep, mode, Duration::ZERO);
        assert!(
            same(&again["summary"], &j["summary"]),
            "recomputed:\n{:#}\ncommitted:\n{:#}",
            again["summary"],
            j["summary"]
        );
    }

    /// Equal, numbers up to the last bits JSON's decimal form loses.
    fn same(a: &Value, b: &Value) -> bool {
        match (a, b) {
            (Value::Number(x), Value::Number(y)) => {
                let (x, y) = (
                    x.as_f64().unwrap_or(f64::NAN),
                    y.as_f64().unwrap_or(f64::NAN),
                );
                (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0)
            }
            (Value::Array(x), Value::Array(y)) => {
                x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y))
            }
            (Value::Object(x), Value::Object(y)) => {
                x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
            }
            _ => a == b,
        }
    }
}
