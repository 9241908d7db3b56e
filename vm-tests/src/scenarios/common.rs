//! Steps many scenarios share: installing cgipool and the workers from the
//! payload, writing configs, applying, reading status.
use crate::machine::Machine;
use anyhow::{ensure, Context, Result};
use std::time::Duration;

pub const CONFIG: &str = "/etc/cgipool/cgipool.toml";
pub const UNIT_DIR: &str = "/etc/systemd/system";

/// Installs cgipool, the C workers and the Python example worker from the
/// payload, the example nginx site with a self-signed certificate, and the
/// demo config at /etc/cgipool/cgipool.toml. Synced to disk, as a host's
/// setup would be long before a power cut.
pub fn install(m: &mut Machine) -> Result<()> {
    m.succeed(
        "set -e
         install -m 0755 /payload/bin/cgipool /usr/local/bin/cgipool
         install -d /usr/local/lib/cgipool
         install -m 0755 /payload/lib/cgipool/* /usr/local/lib/cgipool/
         install -m 0755 /payload/examples/workers/hello.py /usr/local/lib/cgipool/hello.py
         install -d /etc/cgipool /etc/ssl/cgipool
         install -m 0644 /payload/examples/demo.toml /etc/cgipool/cgipool.toml
         openssl req -x509 -newkey rsa:2048 -nodes -subj /CN=localhost -days 2 \
             -keyout /etc/ssl/cgipool/key.pem -out /etc/ssl/cgipool/cert.pem 2>/dev/null
         install -m 0644 /payload/nginx/cgipool-site.conf /etc/nginx/sites-available/cgipool
         ln -sf ../sites-available/cgipool /etc/nginx/sites-enabled/cgipool
         rm -f /etc/nginx/sites-enabled/default
         nginx -t -q
         systemctl reload nginx
         sync",
    )?;
    m.wait_until_succeeds("curl -sf -o /dev/null -k https://127.0.0.1/ || curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1/ | grep -q 404", "the example site to answer", Duration::from_secs(10))?;
    Ok(())
}

pub fn write_config(m: &mut Machine, text: &str) -> Result<()> {
    m.write_text(CONFIG, text)
}

/// `cgipool apply`, which must succeed; returns its stdout.
pub fn apply(m: &mut Machine) -> Result<String> {
    m.succeed(&format!("cgipool apply {CONFIG}"))
        .context("cgipool apply")
}

pub fn status_json(m: &mut Machine) -> Result<serde_json::Value> {
    let out = m.succeed("cgipool status --json")?;
    serde_json::from_str(&out).with_context(|| format!("cgipool status --json is not JSON: {out}"))
}

/// How many steps (looks at the host) watch completed since it started,
/// from its /pool-status on its own socket.
pub fn watch_steps(m: &mut Machine) -> Result<u64> {
    let out = m.succeed(
        "curl -sf --unix-socket /run/cgipool/watch.sock http://watch/pool-status | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"steps\"])'",
    )?;
    out.trim()
        .parse()
        .with_context(|| format!("watch's steps: {out:?}"))
}

/// Waits until watch has completed `n` more steps than it had: what a
/// test waits for before it checks that watch changed nothing.
pub fn wait_watch_steps(m: &mut Machine, n: u64) -> Result<()> {
    let from = watch_steps(m)?;
    m.wait_until_succeeds(
        &format!(
            "test $(curl -sf --unix-socket /run/cgipool/watch.sock http://watch/pool-status | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"steps\"])') -ge {}",
            from + n
        ),
        &format!("watch to complete {n} more steps (it had {from})"),
        Duration::from_secs(20),
    )?;
    Ok(())
}

/// The names in the unit directory that cgipool generated, sorted.
pub fn unit_dir_listing(m: &mut Machine) -> Result<Vec<String>> {
    let out = m.succeed(&format!(
        "cd {UNIT_DIR} && find . \\( -name 'cgipool*' -o -path '*cgipool*.wants*' \\) | sort"
    ))?;
    Ok(out
        .lines()
        .map(|l| l.trim_start_matches("./").to_string())
        .filter(|l| !l.is_empty())
        .collect())
}

/// What the unit directory holds for pools with `counts` (each with the
/// default shared queue), as `unit_dir_listing` reads it.
pub fn expected_listing(counts: &[(&str, u32)]) -> Vec<String> {
    let mut v = vec![
        "cgipool.target".to_string(),
        "cgipool.target.wants".to_string(),
        "multi-user.target.wants/cgipool.target".to_string(),
        // [watch] enabled = true by default
        "cgipool-watch.service".to_string(),
        "cgipool.target.wants/cgipool-watch.service".to_string(),
    ];
    for (pool, n) in counts {
        v.push(format!("cgipool.target.wants/cgipool-{pool}.target"));
        v.push(format!("cgipool-{pool}.target"));
        v.push(format!("cgipool-{pool}.target.wants"));
        v.push(format!("cgipool-{pool}@.service"));
        v.push(format!("cgipool-{pool}.socket"));
        v.push(format!("cgipool-{pool}.target.wants/cgipool-{pool}.socket"));
        for i in 1..=*n {
            v.push(format!(
                "cgipool-{pool}.target.wants/cgipool-{pool}@{i}.service"
            ));
        }
    }
    v.sort();
    v
}

/// Whether `pool` runs with the shared queue (its one socket unit is loaded).
pub fn is_shared(m: &mut Machine, pool: &str) -> Result<bool> {
    Ok(m.unit_property(&format!("cgipool-{pool}.socket"), "LoadState")? == "loaded")
}

/// Checks that exactly workers 1..=n of `pool` run: sockets listening (the
/// pool's one socket, or each worker's), services active, and no higher
/// instance loaded and active.
pub fn assert_pool_running(m: &mut Machine, pool: &str, n: u32) -> Result<()> {
    let shared = is_shared(m, pool)?;
    if shared {
        let sock = m.unit_property(&format!("cgipool-{pool}.socket"), "ActiveState")?;
        ensure!(sock == "active", "cgipool-{pool}.socket is {sock}");
        m.succeed(&format!("test -S /run/cgipool/{pool}/pool.sock"))?;
    }
    for i in 1..=n {
        m.wait_for_unit(&format!("cgipool-{pool}@{i}.service"))?;
        if shared {
            continue;
        }
        let sock = m.unit_property(&format!("cgipool-{pool}@{i}.socket"), "ActiveState")?;
        ensure!(sock == "active", "cgipool-{pool}@{i}.socket is {sock}");
        m.succeed(&format!("test -S /run/cgipool/{pool}/{i}.sock"))?;
    }
    let running = m.succeed(&format!("systemctl list-units --no-legend --plain --state=active 'cgipool-{pool}@*.service' | awk '{{print $1}}' | sort -V"))?;
    let want: Vec<String> = (1..=n)
        .map(|i| format!("cgipool-{pool}@{i}.service"))
        .collect();
    let got: Vec<String> = running.lines().map(String::from).collect();
    ensure!(
        got == want,
        "pool {pool}: active services {got:?}, expected {want:?}"
    );
    Ok(())
}

/// A sha256 over every file and link in the unit dir and the nginx config
/// dir, to prove a command changed nothing.
pub fn host_fingerprint(m: &mut Machine) -> Result<String> {
    m.succeed(&format!(
        "cd / && find {UNIT_DIR} /etc/nginx \\( -type f -o -type l \\) -printf '%p %l\\n' -exec sh -c 'test -L \"$1\" || sha256sum \"$1\"' _ {{}} \\; | sha256sum"
    ))
}

/// `cgipool apply CONFIG` sent `signal` (`KILL` or `TERM`, to its process
/// group, as `timeout` does) after `delay` seconds: it exits 0 (it finished
/// first), 137 (killed), 143 (SIGTERM before its handler was installed) or
/// 1 (it stopped between steps, saying `interrupted_says`).
pub fn apply_cut_short(
    m: &mut Machine,
    signal: &str,
    delay: f64,
    interrupted_says: &str,
) -> Result<()> {
    let o = m.execute(
        &format!("timeout --preserve-status -s {signal} {delay:.3} cgipool apply {CONFIG}"),
        m.scaled(Duration::from_secs(120)),
    )?;
    let expected: &[i32] = if signal == "KILL" {
        &[0, 137]
    } else {
        &[0, 1, 143]
    };
    ensure!(
        expected.contains(&o.rc),
        "apply exited {}\n{}",
        o.rc,
        o.stderr
    );
    if o.rc == 1 {
        ensure!(
            o.stderr.contains(interrupted_says),
            "an interrupted apply does not say where it stopped:\n{}",
            o.stderr
        );
    }
    Ok(())
}

/// Runs `cmd` expecting exit status 2; returns its stderr.
pub fn expect_usage_error(m: &mut Machine, cmd: &str) -> Result<String> {
    let o = m.execute(cmd, m.scaled(Duration::from_secs(60)))?;
    ensure!(
        o.rc == 2,
        "`{cmd}` exited {}, expected 2 (bad config or usage)\nstdout: {}\nstderr: {}",
        o.rc,
        o.stdout,
        o.stderr
    );
    Ok(o.stderr)
}

/// PIDs of the nginx workers serving now (a reload replaces them all).
pub fn nginx_workers(m: &mut Machine) -> Result<String> {
    m.succeed("pgrep -f 'nginx: worker process$' | sort")
}

/// Status, headers and body (as text) of one request through nginx.
pub fn request(m: &mut Machine, curl_args: &str) -> Result<(u16, String, String)> {
    let out = m.succeed(&format!(
        "curl -sS -D /tmp/h -o /tmp/b -w '%{{http_code}}' {curl_args}; echo; cat /tmp/h; echo; cat /tmp/b"
    ))?;
    let mut parts = out.splitn(2, '\n');
    let code: u16 = parts
        .next()
        .unwrap_or("")
        .trim()
        .parse()
        .context("no status code from curl")?;
    let rest = parts.next().unwrap_or("");
    let (headers, body) = rest.split_once("\r\n\r\n").unwrap_or((rest, ""));
    // `echo` put a newline between the header dump and the body.
    let body = body.strip_prefix('\n').unwrap_or(body);
    Ok((code, headers.to_string(), body.to_string()))
}

pub fn header<'a>(headers: &'a str, name: &str) -> Option<&'a str> {
    headers.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Whether requests sent at once to `url` (on the guest) are answered by
/// more than one worker of a shared-queue pool. One curl opens all `n`
/// connections at once (curls forked by a shell may not overlap on a busy
/// machine, and then the worker that polled last answers every one); a
/// round that is answered by one worker is tried again, up to 5 rounds.
/// Every answer must be a 200 naming its worker. Fails naming each
/// round's worker when no round reached two.
pub fn assert_answered_by_several(m: &mut Machine, url: &str, n: u32) -> Result<()> {
    let mut one_worker_rounds = Vec::new();
    for _ in 0..5 {
        let answered = m.succeed(&format!(
            "curl -sS --no-progress-meter --parallel --parallel-immediate --parallel-max {n} \
             -o /dev/null -w '%{{http_code}} %header{{x-cgipool-worker}}\\n' '{url}&n=[1-{n}]'"
        ))?;
        let lines: Vec<&str> = answered.lines().collect();
        ensure!(
            lines.len() == n as usize && lines.iter().all(|l| l.len() > 4 && l.starts_with("200 ")),
            "{n} requests at once to {url} were not all answered 200 by a worker:\n{answered}"
        );
        let workers: std::collections::BTreeSet<&str> = lines.iter().map(|l| &l[4..]).collect();
        if workers.len() >= 2 {
            return Ok(());
        }
        one_worker_rounds.push(format!("{workers:?}"));
    }
    anyhow::bail!(
        "5 rounds of {n} requests at once to {url} were each answered by one worker: {}",
        one_worker_rounds.join(", ")
    )
}
