//! What the bench sets up in the guest: the pools, fcgiwrap, the TCP
//! workers of the proof of concept and the nginx server of the baselines;
//! what it reads of the machine.
use crate::machine::{shell_quote, Machine};
use crate::scenarios::common::{apply, install, write_config};
use anyhow::{ensure, Result};
use serde_json::{json, Value};
use std::time::Duration;

pub(super) const REPORT_LUA: &str = include_str!("../../../bench/guest/report.lua");
pub(super) const MEASURE_PY: &str = include_str!("../../../bench/guest/measure.py");
pub(super) const RECOVER_PY: &str = include_str!("../../../bench/guest/recover.py");
pub(super) const SCALE_PY: &str = include_str!("../../../bench/guest/scale.py");
pub(super) const MIXED_PY: &str = include_str!("../../../bench/guest/mixed.py");

/// Where the guest-side helpers live (/run: no unit's PrivateTmp hides it).
pub(super) const GUEST_DIR: &str = "/run/bench";

/// What every bench guest needs first: no journal lines forwarded to the
/// console (the image forwards every line to the console the harness logs;
/// under load that pty stops draining, journald blocks on it, and every
/// worker then blocks writing its per-request log line to stderr; a
/// production host does not forward to a console), the payload installed,
/// and wrk's report script.
pub(super) fn prepare_guest(m: &mut Machine) -> Result<()> {
    m.write_text(
        "/etc/systemd/journald.conf.d/zz-bench.conf",
        "[Journal]\nForwardToConsole=no\n",
    )?;
    m.succeed("systemctl restart systemd-journald")?;
    install(m)?;
    m.write_text(&format!("{GUEST_DIR}/report.lua"), REPORT_LUA)?;
    Ok(())
}
pub(super) const WORKER: &str = "/usr/local/lib/cgipool/search";
/// The trivial C CGI program (cgi-src/hello_cgi.c) behind fcgiwrap and
/// behind the `protocol = "cgi"` pool.
pub(super) const CGI_PROGRAM: &str = "/usr/local/lib/cgipool/hello_cgi";

/// How the payload's CGI program was linked: "dynamic" (glibc's ld.so, the
/// default build) or "static" (`make bench BENCH_CGI_CC='musl-gcc
/// -static'`): an ELF with a PT_INTERP segment is dynamic. The program's
/// start differs a lot between the two on a VM where CPUID traps (bench/README
/// "CPUID").
pub(super) fn cgi_program_build() -> String {
    let Ok(payload) = std::env::var("CGIPOOL_VM_PAYLOAD") else {
        return "unknown (no CGIPOOL_VM_PAYLOAD)".into();
    };
    let path = std::path::Path::new(&payload).join("lib/cgipool/hello_cgi");
    let Ok(elf) = std::fs::read(&path) else {
        return format!("unknown ({} unreadable)", path.display());
    };
    let u16_at = |o: usize| {
        elf.get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(|b: [u8; 8]| u64::from_le_bytes(b) as usize)
    };
    let (Some(phoff), Some(size), Some(count)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else {
        return "unknown (not a 64-bit ELF)".into();
    };
    let interp = (0..count).any(|i| {
        elf.get(phoff + i * size..phoff + i * size + 4)
            .is_some_and(|t| t == 3u32.to_le_bytes())
    });
    if interp {
        "dynamic: glibc's ld.so".into()
    } else {
        "static".into()
    }
}
pub(super) const CGI_BODY: &str = "hello\n";
/// Our own fcgiwrap instance (`-c` = the pool size), in a directory its
/// user (www-data, nginx's) owns.
pub(super) const FCGIWRAP_SOCKET: &str = "/run/bench-fcgiwrap/fcgiwrap.sock";
pub(super) const SEARCH_PATH: &str = "/api/search?q=systemd";
pub(super) const TCP_PORTS: [u16; 4] = [9001, 9002, 9003, 9004];
pub(super) const POOL_SIZE: u32 = 4;

/// One configuration on the data path; `na` marks rows that cannot be
/// measured yet (the code that would serve them does not exist).
pub(super) struct Target {
    pub(super) key: &'static str,
    pub(super) label: &'static str,
    pub(super) url: &'static str,
    pub(super) na: Option<&'static str>,
}

pub(super) const TARGETS: &[Target] = &[
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
    Target {
        key: "php_fpm",
        label: "nginx → php-fpm (Debian's, `pm = static`, 4 children) → one-line PHP script",
        url: "http://127.0.0.1:8080/fpm/hello.php",
        na: None,
    },
    Target {
        key: "pool_php",
        label: "nginx → cgipool `protocol = \"fastcgi\"` (4 php-cgi workers) → the same script",
        url: "http://127.0.0.1:80/php/hello.php",
        na: None,
    },
];

pub(super) const CONNS: [u32; 2] = [16, 64];

/// The PHP comparison: one script, behind our own php-fpm instance and
/// behind a FastCGI pool of php-cgi workers.
pub(super) const PHP_ROOT: &str = "/run/bench/php";
pub(super) const PHP_SCRIPT: &str = "<?php echo \"hello\\n\";\n";
pub(super) const FPM_SOCKET: &str = "/run/bench-fpm/fpm.sock";
/// php-fpm as Debian ships it, our own instance: `pm = static` with as many
/// children as the pool has workers, on a unix socket, as nginx's user.
pub(super) const FPM_CONF: &str = "[global]
error_log = syslog
daemonize = no

[bench]
user = www-data
group = www-data
listen = /run/bench-fpm/fpm.sock
listen.owner = www-data
listen.group = www-data
pm = static
pm.max_children = 4
";

/// The FastCGI pool of php-cgi workers next to the others.
pub(super) fn php_pool_section() -> String {
    format!(
        "\n[pool.php]\nexec = \"/usr/bin/php-cgi\"\nroute = \"/php\"\nprotocol = \"fastcgi\"\n\
         document_root = \"{PHP_ROOT}\"\nmin = {POOL_SIZE}\nmax = {POOL_SIZE}\n"
    )
}

/// The nginx side of the baselines, in the same nginx as the pool: the
/// ceiling and the proof of concept's layout (round robin over TCP, HTTP/1.0
/// to the upstream, no keepalive) on :8080, and the same TCP workers with
/// cgipool's upstream settings (least_conn, keepalive 16) on :8081. The
/// proxy headers and timeouts are cgipool's, so the rows differ only in the
/// layout.
pub(super) const BENCH_NGINX: &str = r#"# written by vm-tests bench
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
    # php-fpm as Debian's nginx + PHP-FPM setups run it: a regex location
    # with Debian's snippets/fastcgi-php.conf (split_path_info, the try_files
    # guard, fastcgi.conf), the work cgipool's PHP location does too; no
    # keep-alive to php-fpm. /run/bench/fpm is a link to the pool's document
    # root: the same script file.
    location ~ ^/fpm/.+\.php(/|$) {
        root /run/bench;
        include snippets/fastcgi-php.conf;
        fastcgi_pass unix:/run/bench-fpm/fpm.sock;
        add_header X-Request-ID $request_id always;
    }
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

pub(super) fn pool_config(name: &str, route: &str, min: u32, max: u32) -> String {
    format!(
        "[nginx]\nupstreams = \"/etc/nginx/conf.d/cgipool-upstreams.conf\"\n\
         locations = \"/etc/nginx/snippets/cgipool-locations.conf\"\n\
         unit = \"nginx.service\"\n\n\
         [pool.{name}]\nexec = \"{WORKER}\"\nroute = \"{route}\"\nmin = {min}\nmax = {max}\n"
    )
}

/// The `protocol = "cgi"` pool next to the search pool: the gateway runs
/// the trivial C CGI program once per request.
pub(super) fn cgi_pool_section() -> String {
    format!(
        "\n[pool.cgi]\nexec = \"{CGI_PROGRAM}\"\nroute = \"/cgi\"\nprotocol = \"cgi\"\n\
         min = {POOL_SIZE}\nmax = {POOL_SIZE}\n"
    )
}

/// The mixed load's program: a shell CGI script that takes 50 ms when asked
/// for `?slow` and answers at once otherwise; the same behind both queue
/// modes.
pub(super) const MIXED_CGI: &str = "/run/bench/mixed.cgi";
pub(super) const MIXED_CGI_TEXT: &str = "#!/bin/sh\n[ \"$QUERY_STRING\" = slow ] && sleep 0.05\nprintf 'Content-Type: text/plain\\r\\n\\r\\n%s\\n' \"$QUERY_STRING\"\n";
/// The two pools of the mixed load: (pool, route, queue mode).
pub(super) const MIXED_POOLS: [(&str, &str, &str); 2] =
    [("mixs", "/mixs", "shared"), ("mixp", "/mixp", "per-worker")];

/// Whether the mixed load runs (`CGIPOOL_BENCH_MIXED=0` leaves it out).
pub(super) fn mixed_load_on() -> bool {
    std::env::var("CGIPOOL_BENCH_MIXED").map_or(true, |v| v != "0")
}

/// Both mixed-load pools: 4 gateways each, one sharing a queue, one with a
/// socket per worker.
pub(super) fn mixed_pool_sections() -> String {
    MIXED_POOLS
        .iter()
        .map(|(pool, route, queue)| {
            format!(
                "\n[pool.{pool}]\nexec = \"{MIXED_CGI}\"\nroute = \"{route}\"\nprotocol = \"cgi\"\n\
                 queue = \"{queue}\"\nmin = {POOL_SIZE}\nmax = {POOL_SIZE}\n"
            )
        })
        .collect()
}

/// The pool the scaling step loads: the search worker made slow (20 ms per
/// request), 2..6 workers, short windows (as the watch_autoscale_load_step
/// scenario has it).
pub(super) const STEP_POOL: &str = "step";
pub(super) const STEP_MIN: u32 = 2;
pub(super) const STEP_MAX: u32 = 6;
pub(super) const STEP_UP_AFTER_SECS: f64 = 2.0;
pub(super) const STEP_DOWN_AFTER_SECS: f64 = 5.0;
pub(super) const STEP_CONNS: u32 = 32;

pub(super) fn step_pool_config() -> String {
    // The search worker answers /api/search only; the data path's pool with
    // that route is gone by then.
    pool_config(STEP_POOL, "/api/search", STEP_MIN, STEP_MAX)
        + &format!(
            "environment = {{ CGIPOOL_TEST_DELAY_MS = \"20\" }}\n\
             scale_up_after = \"{STEP_UP_AFTER_SECS}s\"\nscale_down_after = \"{STEP_DOWN_AFTER_SECS}s\"\n"
        )
}

pub(super) fn setup_data_path(m: &mut Machine) -> Result<()> {
    // The pool exactly as `apply` writes it: 4 workers of the C search worker;
    // and a `protocol = "cgi"` pool of 4 running the trivial CGI program.
    m.write_text(MIXED_CGI, MIXED_CGI_TEXT)?;
    m.succeed(&format!("chmod 0755 {MIXED_CGI}"))?;
    m.succeed(&format!(
        "mkdir -p {PHP_ROOT} && chmod 0755 {PHP_ROOT} && ln -sfn {PHP_ROOT} /run/bench/fpm"
    ))?;
    m.write_text(&format!("{PHP_ROOT}/hello.php"), PHP_SCRIPT)?;
    m.succeed(&format!("chmod 0644 {PHP_ROOT}/hello.php"))?;
    let mixed = if mixed_load_on() {
        mixed_pool_sections()
    } else {
        String::new()
    };
    write_config(
        m,
        &(pool_config("search", "/api/search", POOL_SIZE, POOL_SIZE)
            + &cgi_pool_section()
            + &php_pool_section()
            + &mixed),
    )?;
    apply(m)?;
    // fcgiwrap as Debian ships it, but our own instance with `-c` = the pool
    // size (the packaged fcgiwrap.socket runs -c 1), as nginx's user.
    m.succeed(&format!(
        "systemd-run --quiet --unit=bench-fcgiwrap -p User=www-data -p Group=www-data \
         -p RuntimeDirectory=bench-fcgiwrap /usr/sbin/fcgiwrap -c {POOL_SIZE} -s unix:{FCGIWRAP_SOCKET}"
    ))?;
    m.write_text(&format!("{GUEST_DIR}/php-fpm.conf"), FPM_CONF)?;
    m.succeed(&format!(
        "systemd-run --quiet --unit=bench-php-fpm -p RuntimeDirectory=bench-fpm \
         $(ls /usr/sbin/php-fpm* | head -n1) -F -y {GUEST_DIR}/php-fpm.conf"
    ))?;
    m.wait_until_succeeds(
        &format!("test -S {FPM_SOCKET}"),
        "php-fpm's socket",
        Duration::from_secs(10),
    )?;
    m.wait_until_succeeds(
        &format!("test -S {FCGIWRAP_SOCKET}"),
        "fcgiwrap's socket",
        Duration::from_secs(10),
    )?;
    start_tcp_workers(m)?;
    m.write_text("/etc/nginx/conf.d/bench.conf", BENCH_NGINX)?;
    m.succeed("nginx -t -q && systemctl reload nginx")?;
    for t in TARGETS.iter().filter(|t| t.na.is_none()) {
        m.wait_until_succeeds(
            &format!("curl -sf -o /dev/null {}", shell_quote(t.url)),
            &format!("{} to answer 200", t.key),
            Duration::from_secs(15),
        )?;
    }
    for (pool, route, _) in MIXED_POOLS.iter().filter(|_| mixed_load_on()) {
        let out = m.succeed(&format!("curl -s -i 'http://127.0.0.1:80{route}?fast'"))?;
        ensure!(
            out.starts_with("HTTP/1.1 200") && out.contains(&format!("X-Cgipool-Worker: {pool}@")),
            "the mixed-load pool {pool} does not answer on {route}:\n{out}"
        );
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
    // Both PHP paths run the same script.
    for key in ["php_fpm", "pool_php"] {
        let url = TARGETS.iter().find(|t| t.key == key).map_or("", |t| t.url);
        let out = m.succeed(&format!("curl -s -i {}", shell_quote(url)))?;
        ensure!(
            out.starts_with("HTTP/1.1 200") && out.ends_with("\r\n\r\nhello\n"),
            "{key} ({url}) does not answer the PHP script's body:\n{out}"
        );
    }
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
pub(super) const CPU_UNITS: &[(&str, &str)] = &[
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
    ("php-fpm", "bench-php-fpm.service"),
    ("php pool (php-cgi)", "system-cgipool\\x2dphp.slice"),
    ("cgipool watch", "cgipool-watch.service"),
];

pub(super) fn cpu_usage(m: &mut Machine) -> Result<Vec<f64>> {
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

pub(super) fn machine_info(m: &mut Machine) -> Result<Value> {
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
        "cgipool_profile": std::env::var("CGIPOOL_BENCH_PROFILE").ok(),
        "cgi_program_build": cgi_program_build(),
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

/// The proof of concept's layout: the same binary, 4 plain processes bound
/// to TCP ports (no socket activation, no sandbox), logging like the pool's
/// workers by default (errors only: `CGIPOOL_ACCESS_LOG=0`).
pub(super) fn start_tcp_workers(m: &mut Machine) -> Result<()> {
    for (i, port) in TCP_PORTS.iter().enumerate() {
        m.succeed(&format!(
            "systemd-run --quiet --unit=bench-tcp-{n} --setenv=CGIPOOL_WORKER=tcp@{n} \
             --setenv=CGIPOOL_ACCESS_LOG=0 {WORKER} --listen 127.0.0.1:{port}",
            n = i + 1
        ))?;
    }
    Ok(())
}
