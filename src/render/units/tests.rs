//! The unit templates' tests: what `units()` renders for the test configs.
use super::*;
use crate::render::tests::{all_active, cfg, line, unit_file, CGI, DEMO, FASTCGI, FULL};
use crate::render::{is_generated, nginx};
use pretty_assertions::assert_eq;
use std::fs;

#[test]
fn a_pools_workers_weigh_one_session_together() {
    // The kernel's weights by nice (kernel/sched/core.c).
    let weight = |nice: u8| 1024.0 / 1.25f64.powi(i32::from(nice));
    assert_eq!(autogroup_nice(0), 0);
    assert_eq!(autogroup_nice(1), 0);
    assert_eq!(autogroup_nice(2), 3);
    assert_eq!(autogroup_nice(4), 6);
    assert_eq!(autogroup_nice(1000), 19);
    for n in 2..=50 {
        let total = f64::from(n) * weight(autogroup_nice(n));
        assert!(
            (800.0..=1300.0).contains(&total),
            "{n} workers weigh {total:.0}, not about one session (1024)"
        );
    }
    let tree = units(
        &cfg("x.toml", DEMO),
        Path::new("/etc/systemd/system"),
        &BTreeMap::new(),
    );
    let search = unit_file(&tree, "cgipool-search@.service");
    assert_eq!(
        line(&search, "ExecStartPost="),
        ["ExecStartPost=-+/bin/sh -c 'echo 7 > /proc/$$MAINPID/autogroup'"] // max = 5
    );
}

#[test]
fn cgi_pools_run_the_gateway() {
    let c = cfg("x.toml", CGI);
    let tree = units(&c, Path::new("/etc/systemd/system"), &BTreeMap::new());
    assert_eq!(
        line(&unit_file(&tree, "cgipool-shell@.service"), "ExecStart="),
        [
            r#"ExecStart=/opt/cgipool/bin/cgipool cgi-gateway --route "/cgi/shell" --timeout "1500ms" --body-limit "1m" -- "/usr/local/lib/cgipool/cgi/shell.cgi" "100%%" "$$HOME" "say \"hi\"""#
        ]
    );
    let git = unit_file(&tree, "cgipool-git@.service");
    assert_eq!(
        line(&git, "ExecStart="),
        [
            r#"ExecStart=/usr/bin/cgipool cgi-gateway --route "/git" --timeout "90s" --body-limit "100m" -- "/usr/lib/git-core/git-http-backend""#
        ]
    );
    // Same sandbox as any pool, with the configured relaxations.
    for want in [
        "User=git",
        "ReadWritePaths=/srv/git",
        "ProtectSystem=strict",
        "TasksMax=64",
    ] {
        assert!(git.lines().any(|l| l == want), "git lacks {want}\n{git}");
    }
    // nginx waits 5s longer than the gateway, so the gateway's 504 wins.
    let ng = nginx(&c, &all_active(&c));
    assert!(
        ng.locations.contains("proxy_read_timeout 95s;"),
        "{}",
        ng.locations
    );
    assert!(
        ng.locations.contains("proxy_read_timeout 6500ms;"),
        "{}",
        ng.locations
    );
    assert!(ng
        .locations
        .contains("proxy_set_header X-Forwarded-Port $server_port;"));
    // HTTP pools keep their ExecStart and timeouts.
    let demo = cfg("x.toml", DEMO);
    let ng = nginx(&demo, &all_active(&demo));
    assert!(!ng.locations.contains("X-Forwarded-Port"));
}

#[test]
fn fastcgi_php_units() {
    let c = cfg("x.toml", FASTCGI);
    let tree = units(&c, Path::new("/etc/systemd/system"), &BTreeMap::new());
    let php = unit_file(&tree, "cgipool-php@.service");
    assert_eq!(
        line(&php, "ExecStart="),
        [
            r#"ExecStart=/usr/bin/php-cgi8.2 -d error_log=syslog -d syslog.ident=cgipool-php -d pcre.jit=0 -d cgi.fix_pathinfo=0 -d session.save_path=/var/lib/cgipool-php/sessions -d session.gc_probability=1 -d upload_tmp_dir=/run/cgipool-php/%i -d max_execution_time=2 -d post_max_size=16M -d upload_max_filesize=16M "-d" "memory_limit=64M""#
        ]
    );
    assert_eq!(
        line(&php, "Environment="),
        [
            "Environment=PHP_FCGI_CHILDREN=0 PHP_FCGI_MAX_REQUESTS=5000",
            "Environment=CGIPOOL_POOL=php CGIPOOL_WORKER=php@%i",
            "Environment=CGIPOOL_MAX_REQUESTS=5000",
            "Environment=CGIPOOL_ACCESS_LOG=0",
        ]
    );
    for want in [
        "StandardInput=socket",
        "StandardOutput=journal",
        "StateDirectory=cgipool-php/sessions",
        "RuntimeDirectory=cgipool-php/%i",
        "DynamicUser=yes",
        "User=cgipool-php",
        "MemoryDenyWriteExecute=yes",
        "Type=exec",
    ] {
        assert!(php.lines().any(|l| l == want), "php lacks {want}\n{php}");
    }
    // Another FastCGI program: LISTEN_FDS as usual, its own dynamic user.
    let app = unit_file(&tree, "cgipool-app@.service");
    assert_eq!(line(&app, "ExecStart="), ["ExecStart=/usr/local/bin/app"]);
    assert!(app
        .lines()
        .any(|l| l == "Environment=CGIPOOL_MAX_REQUESTS=7000"));
    for absent in ["StandardInput", "PHP_FCGI", "\nUser=", "StateDirectory"] {
        assert!(!app.contains(absent), "app has {absent}\n{app}");
    }
    // With `user`, php-cgi runs as that user (no shared dynamic one).
    let www = FASTCGI.replace("max_requests = 5000", "user = \"www-data\"");
    let tree = units(
        &cfg("x.toml", &www),
        Path::new("/etc/systemd/system"),
        &BTreeMap::new(),
    );
    let php = unit_file(&tree, "cgipool-php@.service");
    assert_eq!(line(&php, "User="), ["User=www-data"]);
    assert!(!php.contains("DynamicUser"));
    assert!(php.contains("PHP_FCGI_MAX_REQUESTS=0\n"));
    // pcre_jit: the one relaxation, and PHP's JIT on.
    let jit = FASTCGI.replace("max_requests = 5000", "pcre_jit = true");
    let tree = units(
        &cfg("x.toml", &jit),
        Path::new("/etc/systemd/system"),
        &BTreeMap::new(),
    );
    let php = unit_file(&tree, "cgipool-php@.service");
    assert_eq!(
        line(&php, "MemoryDenyWriteExecute="),
        ["MemoryDenyWriteExecute=no"]
    );
    assert!(!line(&php, "ExecStart=")[0].contains("pcre.jit"), "{php}");
}

#[test]
fn escaping_in_units() {
    let c = cfg("/tmp/100% $x.toml", FULL);
    let tree = units(&c, Path::new("/etc/systemd/system"), &BTreeMap::new());
    let svc = unit_file(&tree, "cgipool-search@.service");
    assert_eq!(
        line(&svc, "ExecStart="),
        [
            r#"ExecStart=/usr/local/lib/cgipool/search "--index" "/srv/index dir" "100%%" "$$HOME" "say \"hi\" \\ ;" """#
        ]
    );
    assert_eq!(
        line(&svc, "Environment="),
        [
            "Environment=CGIPOOL_POOL=search CGIPOOL_WORKER=search@%i",
            "Environment=CGIPOOL_ACCESS_LOG=0",
            r#"Environment="LANG=C.UTF-8""#,
            r#"Environment="SHARED=pool wins""#,
            r#"Environment="WEIRD=a %% $HOME \" \\ ; b""#,
        ]
    );
    assert_eq!(
        line(&svc, "Description="),
        ["Description=Search 100%% of things"]
    );
    assert!(svc.starts_with("# Generated by cgipool. Do not edit"));
    assert!(is_generated(&svc));
}

#[test]
fn sandbox_defaults_and_relaxations() {
    let c = cfg("x.toml", FULL);
    let tree = units(&c, Path::new("/etc/systemd/system"), &BTreeMap::new());
    let auth = unit_file(&tree, "cgipool-auth@.service");
    for want in [
        "Type=exec",
        "DynamicUser=yes",
        "PrivateNetwork=yes",
        "IPAddressDeny=any",
        "RestrictAddressFamilies=AF_UNIX",
        "CapabilityBoundingSet=",
        "MemoryMax=512M",
        "TasksMax=64",
        "RestartSec=100ms",
        "Restart=always",
        "StartLimitIntervalSec=10s",
        "StartLimitBurst=20",
        "Description=cgipool worker %i of pool auth",
    ] {
        assert!(auth.lines().any(|l| l == want), "auth lacks {want}\n{auth}");
    }
    let search = unit_file(&tree, "cgipool-search@.service");
    for want in [
        "Type=notify",
        "User=search",
        "PrivateNetwork=no",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "WatchdogSec=90s",
        "RestartSec=1500ms",
        "RuntimeMaxSec=2h",
        "CPUQuota=200%",
        "TasksMax=infinity",
        "ReadWritePaths=/var/lib/search /var/cache/search",
        "ReadOnlyPaths=/srv/index",
        "WorkingDirectory=/srv",
    ] {
        assert!(
            search.lines().any(|l| l == want),
            "search lacks {want}\n{search}"
        );
    }
    assert!(!search.contains("DynamicUser"));
    assert!(!search.contains("IPAddressDeny"));
    // search has the shared queue (the default), auth a socket per worker.
    let sock = unit_file(&tree, "cgipool-search.socket");
    assert!(sock.lines().any(|l| l == "SocketGroup=nginx"));
    assert!(sock
        .lines()
        .any(|l| l == "ListenStream=/run/cgipool/search/pool.sock"));
    assert!(sock
        .lines()
        .any(|l| l == "Service=cgipool-search@0.service"));
    assert!(!sock.contains("Accept=yes"));
    for want in [
        "Sockets=cgipool-search.socket",
        "Requires=cgipool-search.socket",
        "After=cgipool-search.socket",
    ] {
        assert!(search.lines().any(|l| l == want), "search lacks {want}");
    }
    let sock = unit_file(&tree, "cgipool-auth@.socket");
    assert!(sock.lines().any(|l| l == "SocketGroup=nginx"));
    assert!(sock
        .lines()
        .any(|l| l == "ListenStream=/run/cgipool/auth/%i.sock"));
    assert!(auth.lines().any(|l| l == "Requires=cgipool-auth@%i.socket"));
    assert!(!auth.contains("Sockets="));
    assert!(!tree.entries.contains_key(Path::new("cgipool-auth.socket")));
    assert!(!tree
        .entries
        .contains_key(Path::new("cgipool-search@.socket")));
}

#[test]
fn unit_tree_shape_and_counts() {
    let c = cfg("x.toml", DEMO);
    let dir = Path::new("/run/systemd/system");
    let counts = BTreeMap::from([("search".to_string(), 4)]);
    let tree = units(&c, dir, &counts);
    let links: Vec<(String, String)> = tree
        .entries
        .iter()
        .filter_map(|(p, e)| match e {
            Entry::Link(t) => Some((p.display().to_string(), t.display().to_string())),
            Entry::File(_) => None,
        })
        .collect();
    let wanted = |pool: &str, kind: &str| {
        links
            .iter()
            .filter(|(p, _)| {
                p.starts_with(&format!("cgipool-{pool}.target.wants/")) && p.ends_with(kind)
            })
            .count()
    };
    // The shared queue (the default): one socket for the pool.
    assert_eq!(wanted("search", ".socket"), 1);
    assert_eq!(wanted("search", ".service"), 4);
    assert_eq!(wanted("auth", ".service"), 2); // missing → min
    assert!(links.contains(&(
        "cgipool-search.target.wants/cgipool-search.socket".into(),
        "/run/systemd/system/cgipool-search.socket".into()
    )));
    // A socket per worker: one per instance.
    let per_worker = cfg(
        "x.toml",
        &DEMO.replace("[pool.search]", "[pool.search]\nqueue = \"per-worker\""),
    );
    let tree = units(&per_worker, dir, &counts);
    assert!(tree.entries.contains_key(Path::new(
        "cgipool-search.target.wants/cgipool-search@3.socket"
    )));
    assert!(!tree.entries.contains_key(Path::new(
        "cgipool-search.target.wants/cgipool-search.socket"
    )));
    let tree = units(&c, dir, &counts);
    assert!(links.contains(&(
        "cgipool.target.wants/cgipool-auth.target".into(),
        "/run/systemd/system/cgipool-auth.target".into()
    )));
    assert!(links.contains(&(
        "multi-user.target.wants/cgipool.target".into(),
        "/run/systemd/system/cgipool.target".into()
    )));
    let files: Vec<String> = tree
        .entries
        .iter()
        .filter(|(_, e)| matches!(e, Entry::File(_)))
        .map(|(p, _)| p.display().to_string())
        .collect();
    assert_eq!(
        files,
        [
            "cgipool-auth.socket",
            "cgipool-auth.target",
            "cgipool-auth@.service",
            "cgipool-search.socket",
            "cgipool-search.target",
            "cgipool-search@.service",
            "cgipool-watch.service",
            "cgipool.target"
        ]
    );
    for (p, e) in &tree.entries {
        if let Entry::File(s) = e {
            assert!(is_generated(s), "{}", p.display());
            assert!(s.ends_with('\n') && !s.ends_with("\n\n"), "{}", p.display());
        }
    }
}

/// `systemd-analyze verify` and `security --offline` on the rendered
/// units (skipped with a notice when systemd-analyze is not installed).
/// The exec paths are replaced by /bin/true because verify checks them.
#[test]
fn systemd_analyze_accepts_units() {
    if std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("NOTICE: systemd-analyze not on PATH; skipping unit verification");
        return;
    }
    let full = FULL
        .replace("/usr/local/lib/cgipool/search", "/bin/true")
        .replace("/usr/local/lib/cgipool/auth", "/bin/true")
        .replace("socket_group = \"nginx\"", "socket_group = \"root\"")
        .replace("user = \"search\"", "user = \"root\"");
    let c = cfg("x.toml", &full);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tree = units(&c, d, &BTreeMap::new());
    let mut check = Vec::new();
    for (p, e) in &tree.entries {
        if let Entry::File(s) = e {
            // Instances of the templates, as systemd would load them;
            // the watch unit runs a cgipool that is not installed here.
            let s = &s.replace(crate::paths::PACKAGED_BINARY, "/bin/true");
            let name = p.display().to_string();
            let inst = name.replace("@.", "@1.");
            fs::write(d.join(&inst), s).unwrap();
            check.push(d.join(&inst));
            // A shared queue's socket names instance 0 (never wanted).
            if name.ends_with("@.service") {
                fs::write(d.join(name.replace("@.", "@0.")), s).unwrap();
            }
        }
    }
    let out = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&check)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stderr.contains(&d.display().to_string()),
        "systemd-analyze verify:\n{stderr}"
    );
    // The default (fully sandboxed) template: exposure 0.2 on systemd
    // 252, i.e. 2 on the 0..100 scale that --threshold uses.
    let out = std::process::Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--threshold=2", "--no-pager"])
        .arg(d.join("cgipool-auth@1.service"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "systemd-analyze security:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
