//! `CGIPOOL_BENCH_ONLY=cgi make bench`: only the CGI rows of the data path,
//! to iterate on the gateway in a few minutes instead of a full run.
//!
//! Boots the same nspawn container, applies the same `protocol = "cgi"`
//! pool and starts the same fcgiwrap (`-c 4`) as the full run, then runs
//! wrk on every row, interleaved (at 16 and then 64 connections,
//! `CGIPOOL_BENCH_ROUNDS` rounds of `CGIPOOL_BENCH_SECS` seconds). Rows
//! besides fcgiwrap and the pool, to locate a tail: every extra gateway of
//! `CGIPOOL_BENCH_CGI_GATEWAYS=name=PATH[:KEY=VALUE...],...` (a pool per
//! other cgipool binary on the host, e.g. a build from before a change, run
//! by that binary's gateway through the pool key `gateway`, its workers with
//! the given environment: an A/B of two builds in one run); the pool's
//! socket behind a plain `proxy_pass` (no upstream block, HTTP/1.0); and 4
//! gateways in one unsandboxed unit sharing a socket of their own. After the
//! runs, nginx's own timing per route (the whole request against the
//! upstream's connect, header and response times, p50/p99) and what nginx
//! and the gateways logged. Prints the per-round figures and the ratios to
//! fcgiwrap; writes target/bench-only/latest.md, never the committed report.
//! `CGIPOOL_BENCH_TIER=qemu` boots a QEMU guest instead (see [`bench_tier`]).
use super::runs::wrk;
use super::setup::*;
use super::stats::mean;
use crate::machine::{shell_quote, Env, Machine, Options, Tier};
use crate::scenarios::common::{apply, write_config};
use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const LAUNCH_PY: &str = include_str!("../../../bench/guest/issue16/launch.py");

const ONLY_NGINX: &str = "log_format bench_timing '$uri $request_time $upstream_connect_time $upstream_header_time $upstream_response_time';
access_log /var/log/nginx/bench-timing.log bench_timing;
server {
    listen 127.0.0.1:8082;
    proxy_set_header X-Request-ID $request_id;
    location = /cgi { proxy_pass http://unix:/run/cgipool/cgi/pool.sock:/cgi; }
    location = /gw1unit { proxy_pass http://unix:/run/bench-gw1unit/gw.sock:/gw1unit; }
}
";

/// One configuration of this run: fcgiwrap, the pool, or an extra pool.
pub(super) struct Row {
    pub(super) key: String,
    pub(super) label: String,
    pub(super) url: String,
}

impl Row {
    pub(super) fn new(key: &str, label: &str, url: &str) -> Row {
        Row {
            key: key.into(),
            label: label.into(),
            url: url.into(),
        }
    }

    /// Waits (bounded) until the row's URL answers 200; its shell-quoted URL.
    pub(super) fn answering(&self, m: &mut Machine) -> Result<String> {
        let url = shell_quote(&self.url);
        m.wait_until_succeeds(
            &format!("curl -sf -o /dev/null {url}"),
            &format!("{} to answer 200", self.key),
            Duration::from_secs(15),
        )?;
        Ok(url)
    }
}

/// One wrk run of a row.
pub(super) struct Measured {
    row: usize,
    conns: u32,
    round: u32,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
}

/// What `CGIPOOL_BENCH_ONLY` asks for; None: the full run.
pub(super) fn only() -> Result<Option<String>> {
    match std::env::var("CGIPOOL_BENCH_ONLY") {
        Err(_) => Ok(None),
        Ok(v) if v.is_empty() => Ok(None),
        Ok(v) if ["cgi", "down", "http"].contains(&v.as_str()) => Ok(Some(v)),
        Ok(v) => bail!("CGIPOOL_BENCH_ONLY={v:?}: the subsets are \"cgi\", \"http\" and \"down\""),
    }
}

pub(super) fn env_u32(
    name: &str,
    default: u32,
    range: std::ops::RangeInclusive<u32>,
) -> Result<u32> {
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(v) => v
            .parse()
            .ok()
            .filter(|n| range.contains(n))
            .with_context(|| format!("{name}={v:?}: want {range:?}")),
    }
}

/// `CGIPOOL_BENCH_TIER`: `nspawn` (the default) or `qemu`, whose guest
/// kernel has the cgroup cpu controller the nspawn tier lacks (so the
/// pool's slice is one CPU group there, README "CPU share"); under TCG its
/// figures are slow, only its ratios mean anything.
fn bench_tier() -> Result<Tier> {
    let Ok(v) = std::env::var("CGIPOOL_BENCH_TIER") else {
        return Ok(Tier::Nspawn);
    };
    [Tier::Nspawn, Tier::Qemu]
        .into_iter()
        .find(|t| t.name() == v)
        .with_context(|| format!("CGIPOOL_BENCH_TIER={v:?}: want nspawn or qemu"))
}

/// An extra pool: its name, the host path of its cgipool binary, and
/// environment variables for its workers.
type Extra = (String, PathBuf, Vec<(String, String)>);

/// The extra gateways: `name=PATH[:KEY=VALUE...]` separated by commas.
fn extra_gateways() -> Result<Vec<Extra>> {
    match std::env::var("CGIPOOL_BENCH_CGI_GATEWAYS") {
        Ok(spec) => parse_gateways(&spec),
        Err(_) => Ok(Vec::new()),
    }
}

fn parse_gateways(spec: &str) -> Result<Vec<Extra>> {
    let mut out = Vec::new();
    for item in spec.split(',').filter(|s| !s.is_empty()) {
        let (name, path) = item
            .split_once('=')
            .with_context(|| format!("CGIPOOL_BENCH_CGI_GATEWAYS: {item:?} is not name=PATH"))?;
        ensure!(
            !name.is_empty()
                && name.len() <= 16
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
            "CGIPOOL_BENCH_CGI_GATEWAYS: name {name:?} must be 1-16 of [a-z0-9]"
        );
        let mut parts = path.split(':');
        let path = PathBuf::from(parts.next().unwrap_or_default());
        let mut vars = Vec::new();
        for kv in parts {
            let (k, v) = kv
                .split_once('=')
                .with_context(|| format!("CGIPOOL_BENCH_CGI_GATEWAYS: {kv:?} is not KEY=VALUE"))?;
            ensure!(
                !k.is_empty()
                    && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                    && v.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_-./".contains(&b)),
                "CGIPOOL_BENCH_CGI_GATEWAYS: {kv:?}: plain KEY=VALUE only"
            );
            vars.push((k.to_string(), v.to_string()));
        }
        ensure!(
            path.is_file(),
            "CGIPOOL_BENCH_CGI_GATEWAYS: {} is not a file",
            path.display()
        );
        out.push((name.to_string(), path, vars));
    }
    Ok(out)
}

pub(super) fn run_cgi(env: &Env) -> Result<()> {
    let t0 = Instant::now();
    let secs = env_u32("CGIPOOL_BENCH_SECS", 5, 1..=120)?;
    let rounds = env_u32("CGIPOOL_BENCH_ROUNDS", 3, 1..=20)?;
    let extra = extra_gateways()?;
    let tier = bench_tier()?;
    eprintln!(
        "bench (only cgi: {rounds} rounds of {secs} s): booting the {} guest",
        tier.name()
    );
    let mut m = Machine::start(env, tier, "bench-only-cgi", Options::default())?;
    let (rows, runs, diag) = m.keeping_artifacts(|m| measure(m, secs, rounds, &extra))?;
    m.save_transcript();
    drop(m);
    let notes = format!(
        "- tier: {}\n- CGI program: {CGI_PROGRAM} ({})\n- extra gateways: {}\n",
        tier.name(),
        super::setup::cgi_program_build(),
        if extra.is_empty() {
            "none".to_string()
        } else {
            extra
                .iter()
                .map(|(n, p, _)| format!("gw{n} = {}", p.display()))
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    let head = Head {
        title: "only the CGI rows (CGIPOOL_BENCH_ONLY=cgi)",
        base: "fcgiwrap",
        notes: &notes,
        secs,
        rounds,
        took: t0.elapsed(),
    };
    let mut md = render(&head, &rows, &runs);
    let _ = write!(md, "\n```\n{}\n```\n", diag.trim_end());
    write_report("latest.md", &md, t0)
}

/// Writes a subset's report to target/bench-only/`name` (never the
/// committed report) and prints it.
pub(super) fn write_report(name: &str, md: &str, t0: Instant) -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("vm-tests has no parent directory")?;
    let out_dir = root.join("target/bench-only");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let path = out_dir.join(name);
    std::fs::write(&path, md).with_context(|| format!("writing {}", path.display()))?;
    println!("{md}");
    eprintln!(
        "bench: wrote {} in {:.0}s",
        path.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

fn measure(
    m: &mut Machine,
    secs: u32,
    rounds: u32,
    extra: &[Extra],
) -> Result<(Vec<Row>, Vec<Measured>, String)> {
    prepare_guest(m)?;
    let by_key = |k: &str| TARGETS.iter().find(|t| t.key == k);
    let (Some(fcgi), Some(pool)) = (by_key("fcgiwrap"), by_key("pool_cgi")) else {
        bail!("the bench has no fcgiwrap or pool_cgi row");
    };
    let mut rows = vec![
        Row {
            key: fcgi.key.into(),
            label: fcgi.label.into(),
            url: fcgi.url.into(),
        },
        Row {
            key: pool.key.into(),
            label: pool.label.into(),
            url: pool.url.into(),
        },
    ];
    let mut config = "[nginx]\nupstreams = \"/etc/nginx/conf.d/cgipool-upstreams.conf\"\n\
         locations = \"/etc/nginx/snippets/cgipool-locations.conf\"\n\
         unit = \"nginx.service\"\n"
        .to_string()
        + &cgi_pool_section();
    for (name, path, vars) in extra {
        let bin = format!("/usr/local/bin/cgipool-{name}");
        m.copy_large_to(path, &bin)?;
        m.succeed(&format!("chmod 0755 {bin} && {bin} --version"))?;
        let _ = write!(
            config,
            "\n[pool.gw{name}]\nexec = \"{CGI_PROGRAM}\"\nroute = \"/gw{name}\"\nprotocol = \"cgi\"\n\
             gateway = \"{bin}\"\nmin = {POOL_SIZE}\nmax = {POOL_SIZE}\nenvironment = {{ {} }}\n",
            vars.iter()
                .map(|(k, v)| format!("{k} = \"{v}\""))
                .collect::<Vec<_>>()
                .join(", ")
        );
        rows.push(Row {
            key: format!("gw{name}"),
            label: format!(
                "the same pool, gateway {}{}",
                path.display(),
                vars.iter()
                    .map(|(k, v)| format!(" {k}={v}"))
                    .collect::<String>()
            ),
            url: format!("http://127.0.0.1:80/gw{name}"),
        });
    }
    write_config(m, &config)?;
    apply(m)?;
    m.succeed(&format!(
        "systemd-run --quiet --unit=bench-fcgiwrap -p User=www-data -p Group=www-data \
         -p RuntimeDirectory=bench-fcgiwrap /usr/sbin/fcgiwrap -c {POOL_SIZE} -s unix:{FCGIWRAP_SOCKET}"
    ))?;
    m.wait_until_succeeds(
        &format!("test -S {FCGIWRAP_SOCKET}"),
        "fcgiwrap's socket",
        Duration::from_secs(10),
    )?;
    // Where the tail comes from: the same pool's socket behind a plain
    // `proxy_pass` (no upstream block, HTTP/1.0, nginx's defaults), and 4
    // gateways in ONE unsandboxed unit (one cgroup) sharing a socket of
    // their own (bench/guest/issue16/launch.py), behind the same.
    m.write_text(&format!("{GUEST_DIR}/launch.py"), LAUNCH_PY)?;
    m.succeed(&format!(
        "systemd-run --quiet --unit=bench-gw1unit -p RuntimeDirectory=bench-gw1unit \
         -E CGIPOOL_ACCESS_LOG=0 python3 {GUEST_DIR}/launch.py /run/bench-gw1unit/gw.sock {POOL_SIZE} \
         /usr/local/bin/cgipool cgi-gateway --route /gw1unit -- {CGI_PROGRAM}"
    ))?;
    m.wait_until_succeeds(
        "test -S /run/bench-gw1unit/gw.sock",
        "the one-unit gateways' socket",
        Duration::from_secs(10),
    )?;
    m.write_text("/etc/nginx/conf.d/bench-only.conf", ONLY_NGINX)?;
    for (key, label, url) in [
        (
            "direct",
            "the same pool's socket, plain proxy_pass (HTTP/1.0, no upstream block)",
            "http://127.0.0.1:8082/cgi",
        ),
        (
            "gw1unit",
            "4 gateways in one unsandboxed unit, plain proxy_pass",
            "http://127.0.0.1:8082/gw1unit",
        ),
    ] {
        rows.push(Row {
            key: key.into(),
            label: label.into(),
            url: url.into(),
        });
    }
    m.write_text("/etc/nginx/conf.d/bench.conf", BENCH_NGINX)?;
    m.succeed("nginx -t -q && systemctl reload nginx")?;
    for r in &rows {
        let url = r.answering(m)?;
        let out = m.succeed(&format!("curl -s -i {url}"))?;
        ensure!(
            out.starts_with("HTTP/1.1 200") && out.ends_with(&format!("\r\n\r\n{CGI_BODY}")),
            "{} ({}) does not answer the CGI program's body:\n{out}",
            r.key,
            r.url
        );
        ensure!(
            r.key != "pool_cgi" || out.contains("X-Cgipool-Worker: cgi@"),
            "{} is not answered by cgipool's gateway:\n{out}",
            r.key
        );
    }
    let runs = measure_rows(m, &rows, secs, rounds)?;
    // Where the time went, per route: nginx's whole request against the
    // upstream's part (connect, header, response), p50 / p99 in ms.
    let timing = m.succeed(
        "python3 -c '\nimport collections\nd=collections.defaultdict(lambda:[[],[],[],[]])\nfor l in open(\"/var/log/nginx/bench-timing.log\"):\n  f=l.split()\n  if len(f)!=5 or \"-\" in f[1:] or \",\" in l: continue\n  for i in range(4): d[f[0]][i].append(float(f[i+1]))\nfor u,v in sorted(d.items()):\n  if len(v[0])<1000: continue\n  q=lambda a,p: sorted(a)[int(len(a)*p)]*1000\n  print(u,len(v[0]),\" \".join(\"%s %.0f/%.0f\"%(n,q(a,.5),q(a,.99)) for n,a in zip([\"request\",\"connect\",\"header\",\"response\"],v)))\n'",
    )?;
    eprintln!("{timing}");
    // What nginx and the gateways said meanwhile (retries on a closed
    // connection are invisible to wrk but cost latency).
    let diag = m.succeed(
        "echo \"cgroup controllers: $(cat /sys/fs/cgroup/cgroup.controllers) / system.slice subtree: $(cat /sys/fs/cgroup/system.slice/cgroup.subtree_control)\"; \
         echo \"pool socket: $(systemctl show -P SubState cgipool-cgi.socket)\"; \
         echo \"nginx error.log lines: $(wc -l < /var/log/nginx/error.log)\"; \
         tail -n 5 /var/log/nginx/error.log; \
         echo \"gateway journal lines: $(journalctl -b -o cat --no-pager -u 'cgipool-*@*' | wc -l)\"; \
         journalctl -b -o cat --no-pager -u 'cgipool-*@*' | grep -v '^cgi-gateway: ' | tail -n 5",
    )?;
    eprintln!("{diag}");
    Ok((rows, runs, format!("{timing}\n{diag}")))
}

/// wrk on every row after a warm-up, interleaved: `rounds` rounds, each at
/// 16 and then 64 connections, `secs` seconds per run.
pub(super) fn measure_rows(
    m: &mut Machine,
    rows: &[Row],
    secs: u32,
    rounds: u32,
) -> Result<Vec<Measured>> {
    for r in rows {
        wrk(m, &r.url, 16, 2)?;
    }
    let mut runs = Vec::new();
    for round in 1..=rounds {
        for conns in CONNS {
            for (i, r) in rows.iter().enumerate() {
                let v: Value = wrk(m, &r.url, conns, secs)?;
                let ms = |k: &str| v[k].as_f64().unwrap_or(f64::NAN) / 1000.0;
                let req = v["requests"].as_f64().unwrap_or(0.0);
                let us = v["duration_us"].as_f64().unwrap_or(f64::NAN);
                let run = Measured {
                    row: i,
                    conns,
                    round,
                    rps: req / (us / 1e6),
                    p50_ms: ms("p50_us"),
                    p99_ms: ms("p99_us"),
                    errors: super::stats::wrk_errors(&v),
                };
                eprintln!(
                    "  {:<10} c={conns:<3} round {round}: {:>7.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms  errors {}",
                    r.key, run.rps, run.p50_ms, run.p99_ms, run.errors
                );
                runs.push(run);
            }
        }
    }
    Ok(runs)
}

/// What a subset's report says above its table.
pub(super) struct Head<'a> {
    pub(super) title: &'a str,
    /// The first row's name, which every ratio divides by.
    pub(super) base: &'a str,
    /// Markdown list lines about the run.
    pub(super) notes: &'a str,
    pub(super) secs: u32,
    pub(super) rounds: u32,
    pub(super) took: Duration,
}

/// The markdown report: every row against the first (`head.base`).
pub(super) fn render(head: &Head<'_>, rows: &[Row], runs: &[Measured]) -> String {
    let Head {
        title,
        base,
        notes,
        secs,
        rounds,
        took,
    } = *head;
    let mut md = format!(
        "# cgipool bench: {title}\n\n\
         - {rounds} round(s) of {secs} s per wrk run, interleaved; took {:.0} s\n\
         {notes}\n\
         | configuration | conns | req/s (mean) | req/s vs {base} | p99 (mean) | p99 vs {base} | p99 per round | errors |\n\
         |---|---|---|---|---|---|---|---|\n",
        took.as_secs_f64(),
    );
    for conns in CONNS {
        let of = |row: usize| -> Vec<&Measured> {
            runs.iter()
                .filter(|r| r.row == row && r.conns == conns)
                .collect()
        };
        let base = of(0);
        let base_rps = mean(&base.iter().map(|r| r.rps).collect::<Vec<_>>());
        let base_p99 = mean(&base.iter().map(|r| r.p99_ms).collect::<Vec<_>>());
        for (i, row) in rows.iter().enumerate() {
            let these = of(i);
            let rps = mean(&these.iter().map(|r| r.rps).collect::<Vec<_>>());
            let p99 = mean(&these.iter().map(|r| r.p99_ms).collect::<Vec<_>>());
            let per_round = these
                .iter()
                .map(|r| format!("{:.1}", r.p99_ms))
                .collect::<Vec<_>>()
                .join(", ");
            let errors: u64 = these.iter().map(|r| r.errors).sum();
            let _ = writeln!(
                md,
                "| {} | {conns} | {rps:.0} | {:.2} | {p99:.2} ms | {:.2} | {per_round} | {errors} |",
                row.label,
                rps / base_rps,
                p99 / base_p99
            );
        }
    }
    let _ = writeln!(
        md,
        "\np50 per run (ms): {}",
        runs.iter()
            .map(|r| format!(
                "{}/c{}/r{}={:.1}",
                rows[r.row].key, r.conns, r.round, r.p50_ms
            ))
            .collect::<Vec<_>>()
            .join(" ")
    );
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_gateways_are_parsed_and_checked() {
        let v = parse_gateways("old=/bin/sh,exp=/bin/sh:A_B=1:C=x.y").unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].0, "old");
        assert_eq!(v[0].1, PathBuf::from("/bin/sh"));
        assert!(v[0].2.is_empty());
        assert_eq!(
            v[1].2,
            vec![("A_B".into(), "1".into()), ("C".into(), "x.y".into())]
        );
        assert!(parse_gateways("").unwrap().is_empty());
        for bad in [
            "old",
            "Old=/bin/sh",
            "=/bin/sh",
            "old=/nonexistent/cgipool",
            "old=/bin/sh:A",
            "old=/bin/sh:A=\"x\"",
            "old=/bin/sh:A B=1",
        ] {
            assert!(parse_gateways(bad).is_err(), "{bad}");
        }
    }
}
