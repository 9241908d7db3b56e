//! End-to-end parse tests of whole files, and the helpers the per-module
//! tests share.

use super::model::{DEFAULT_LOCATIONS, DEFAULT_UPSTREAMS};
use super::*;
use pretty_assertions::assert_eq;
use std::collections::BTreeMap;
use std::path::PathBuf;

const DEMO: &str = include_str!("../../examples/demo.toml");

pub(super) fn ok(text: &str) -> Config {
    match parse(Path::new("t.toml"), text) {
        Ok(c) => c,
        Err(e) => panic!("unexpected errors:\n{e}"),
    }
}

/// Display lines of all diagnostics.
pub(super) fn errs(text: &str) -> Vec<String> {
    match parse(Path::new("t.toml"), text) {
        Ok(c) => panic!("expected errors, got {c:#?}"),
        Err(e) => e.diagnostics.iter().map(ToString::to_string).collect(),
    }
}

/// A valid pool plus `extra` lines inside it (line 4 on).
pub(super) fn pool_with(extra: &str) -> String {
    format!("[pool.p]\nexec = \"/bin/p\"\nroute = \"/p\"\n{extra}\n")
}

pub(super) fn one_err(extra: &str) -> String {
    let e = errs(&pool_with(extra));
    assert_eq!(e.len(), 1, "{e:#?}");
    e[0].clone()
}

#[test]
fn demo_parses_with_defaults() {
    let c = parse(Path::new("examples/demo.toml"), DEMO).unwrap();
    assert_eq!(c.source, PathBuf::from("examples/demo.toml"));
    assert_eq!(
        c.nginx,
        Nginx {
            upstreams: DEFAULT_UPSTREAMS.into(),
            locations: DEFAULT_LOCATIONS.into(),
            unit: "nginx.service".into(),
            socket_group: "www-data".into(),
            check_address: "127.0.0.1:80".into(),
            front_address: None,
        }
    );
    assert!(c.watch_enabled);
    assert_eq!(c.pools.keys().collect::<Vec<_>>(), ["auth", "search"]);
    let s = &c.pools["search"];
    assert_eq!((s.min, s.max), (2, 5));
    let a = &c.pools["auth"];
    assert_eq!(
        a,
        &Pool {
            name: "auth".into(),
            exec: "/usr/local/lib/cgipool/auth".into(),
            args: vec![],
            description: String::new(),
            environment: BTreeMap::new(),
            route: "/api/auth".into(),
            min: 2,
            max: 5,
            notify: false,
            watchdog_sec: None,
            restart_sec: "100ms".into(),
            runtime_max_sec: None,
            memory_max: "256M".into(),
            cpu_quota: None,
            tasks_max: "64".into(),
            user: None,
            read_write_paths: vec![],
            read_only_paths: vec![],
            private_network: true,
            access_log: false,
            keepalive: true,
            reap_abandoned: true,
            protocol: Protocol::Http,
            queue: super::Queue::Shared,
            gateway: crate::paths::cgipool_binary(),
            working_directory: None,
            request_timeout: "60s".into(),
            body_limit: "1m".into(),
            rate_limit: None,
            burst: 0,
            max_connections: None,
            scale_up_after: "2s".into(),
            scale_down_after: "30s".into(),
            health_path: None,
            health_interval: "5s".into(),
            health_timeout: "2s".into(),
            unhealthy_after: 3,
            max_requests: None,
            slow_request: None,
            fastcgi: None,
            hosts: vec!["local".into()],
            port: None,
        }
    );
}

#[test]
fn every_key_parses() {
    let c = ok(r#"
[nginx]
upstreams = "/etc/nginx/a.conf"
locations = "/etc/nginx/b.conf"
unit = "openresty.service"
socket_group = "nginx"

[watch]
enabled = false

[pool.x]
exec = "/bin/x"
args = ["a", "b c"]
description = "  X pool  "
environment = { A = "1", _b = "two words" }
route = "/x"
min = 1
max = 512
notify = true
watchdog_sec = 30
restart_sec = "0"
runtime_max_sec = "infinity"
memory_max = "50%"
cpu_quota = "150%"
tasks_max = 10
user = "www-x"
read_write_paths = ["/var/lib/x"]
read_only_paths = ["/srv"]
private_network = false
access_log = true
reap_abandoned = false
protocol = "http"
gateway = "/opt/cgipool/bin/cgipool"
working_directory = "/var/lib/x"
request_timeout = "2min"
body_limit = "10M"
rate_limit = "5r/m"
burst = 3
max_connections = 7
"#);
    assert_eq!(c.nginx.unit, "openresty.service");
    assert_eq!(c.nginx.socket_group, "nginx");
    assert!(!c.watch_enabled);
    let x = &c.pools["x"];
    assert_eq!(x.args, ["a", "b c"]);
    assert_eq!(x.description, "X pool");
    assert_eq!(
        x.environment.get("_b").map(String::as_str),
        Some("two words")
    );
    assert_eq!((x.min, x.max), (1, 512));
    assert_eq!(x.watchdog_sec.as_deref(), Some("30s"));
    assert_eq!(x.restart_sec, "0");
    assert_eq!(x.runtime_max_sec.as_deref(), Some("infinity"));
    assert_eq!(x.tasks_max, "10");
    assert_eq!(x.request_timeout, "2min");
    assert_eq!(x.burst, 3);
    assert_eq!(x.max_connections, Some(7));
    assert!(!x.private_network);
    assert!(x.access_log);
    assert!(!x.reap_abandoned);
    assert_eq!(x.protocol, Protocol::Http);
    assert_eq!(x.gateway, Path::new("/opt/cgipool/bin/cgipool"));
}

#[test]
fn defaults_merge() {
    let c = ok(r#"
[defaults]
min = 3
max = 9
memory_max = "1G"
environment = { A = "default", B = "default" }

[pool.a]
exec = "/bin/a"
route = "/a"
max = 4
environment = { B = "pool" }

[pool.b]
exec = "/bin/b"
route = "/b"
"#);
    let a = &c.pools["a"];
    assert_eq!((a.min, a.max, a.memory_max.as_str()), (3, 4, "1G"));
    assert_eq!(
        a.environment,
        BTreeMap::from([("A".into(), "default".into()), ("B".into(), "pool".into())])
    );
    let b = &c.pools["b"];
    assert_eq!((b.min, b.max), (3, 9));
    assert_eq!(b.environment["B"], "default");
}

#[test]
fn all_errors_at_once_with_positions() {
    let text = r#"[nginx]
upstreams = "relative.conf"
colour = "blue"

[pool.search]
exec = "bin/search"
route = "/api/search"
min = 6
max = 5
mim = 1

[pool.Bad-Name]
exec = "/bin/x"
route = "/x"

[pool.auth]
route = "/api/search"
health_path = "health"
"#;
    let e = errs(text);
    assert_eq!(
        e,
        [
            "t.toml:2:13: nginx.upstreams: must be an absolute path, got \"relative.conf\"",
            "t.toml:3:1: nginx.colour: unknown key `colour` in [nginx]",
            "t.toml:6:8: pool.search.exec: must be an absolute path, got \"bin/search\"",
            "t.toml:8:7: pool.search.min: min (6) must not be greater than max (5)",
            "t.toml:10:1: pool.search.mim: unknown key `mim` in [pool.search]; did you mean `min`?",
            "t.toml:12:7: pool.Bad-Name: invalid pool name \"Bad-Name\": use [a-z0-9][a-z0-9_]*, at most 32 characters",
            "t.toml:16:1: pool.auth.exec: missing required key `exec` (absolute path of the worker program)",
            "t.toml:18:15: pool.auth.health_path: must start with `/`, got \"health\"",
        ]
    );
}

#[test]
fn syntax_error_has_position() {
    let e = errs("[pool.a]\nexec = \"/bin/a\nroute = 1\n");
    assert_eq!(e.len(), 1);
    assert!(e[0].starts_with("t.toml:2:"), "{e:?}");
}

#[test]
fn io_error_names_file() {
    let e = load(Path::new("/nonexistent/cgipool.toml")).unwrap_err();
    let s = e.to_string();
    assert!(
        s.starts_with("/nonexistent/cgipool.toml: cannot read config file:"),
        "{s}"
    );
}

#[test]
fn odd_shapes_are_errors_not_panics() {
    for text in [
        "pool = 1\n",
        "[[pool]]\nexec = \"/bin/a\"\n",
        "pool.a = 1\n",
        "[pool]\n",
        "nginx = 1\n[pool.a]\nexec = \"/bin/a\"\nroute = \"/a\"\n",
        "watch = []\n[pool.a]\nexec = \"/bin/a\"\nroute = \"/a\"\n",
        "defaults = \"x\"\n[pool.a]\nexec = \"/bin/a\"\nroute = \"/a\"\n",
        "[defaults]\nenvironment = 1\n[pool.a]\nexec = \"/bin/a\"\nroute = \"/a\"\n",
        "[defaults]\nexec = \"rel\"\n[pool.a]\nroute = \"/a\"\n[pool.b]\nroute = \"/b\"\n",
        "[nginx]\nupstreams = 1\n[pool.a]\nexec = \"/bin/a\"\nroute = \"/a\"\n",
        "[pool.a]\nexec = \"/bin/a\"\nroute = \"/a\"\nenvironment.A.B = \"x\"\n",
        "[pool.a]\nexec = \"/bin/a\"\nroute = \"/a\"\nmin = 99999999999999\n",
        "[pool.a]\nexec = \"/bin/a\"\nroute = \"/a\"\nwatchdog_sec = 99999999999999999\n",
        "[pool.a]\nexec = \"/bin/a\"\nroute = \"/a\"\nrestart_sec = \"99999999999999999999h\"\n",
        "[pool.a]\nexec = \"/bin/a\"\nroute = \"/a\"\nrestart_sec = \"1.99999999999999999999s\"\nmin=0\n",
        "\u{feff}[pool.é]\n",
        "[pool.a]\nexec = \"/bin/a\"\nroute = \"/a\"\nexec = \"/bin/b\"\n",
    ] {
        let e = errs(text);
        assert!(!e.is_empty(), "{text:?}");
        for d in &e {
            assert!(d.starts_with("t.toml:"), "{text:?}: {d}");
        }
    }
    // An invalid default exec is reported once, not as "missing exec".
    let e =
        errs("[defaults]\nexec = \"rel\"\n[pool.a]\nroute = \"/a\"\n[pool.b]\nroute = \"/b\"\n");
    assert_eq!(
        e,
        ["t.toml:2:8: defaults.exec: must be an absolute path, got \"rel\""]
    );
}

#[test]
fn a_value_ending_in_a_backslash_is_refused() {
    let e = one_err(r#"description = "ends in \\""#);
    assert!(
        e.contains(":4:") && e.contains("pool.p.description") && e.contains("backslash"),
        "{e}"
    );
}

/// Values systemd or nginx would refuse, or silently ignore, when they read
/// the rendered files: refused here, at their key and line.
#[test]
fn values_the_host_would_refuse_are_refused_here() {
    // systemd drops a MemoryMax= past u64 and runs the worker unlimited.
    let e = one_err("memory_max = \"99999999999999999T\"");
    assert!(e.starts_with("t.toml:4:14: pool.p.memory_max:"), "{e}");
    ok(&pool_with("memory_max = \"16777215T\""));
    // nginx: client_max_body_size past i64, limit_conn past 65535.
    let e = one_err("body_limit = \"999999999999g\"");
    assert!(e.starts_with("t.toml:4:14: pool.p.body_limit:"), "{e}");
    ok(&pool_with("body_limit = \"8589934591g\""));
    let e = one_err("max_connections = 70000");
    assert!(
        e.contains("pool.p.max_connections") && e.contains("65535"),
        "{e}"
    );
    ok(&pool_with("max_connections = 65535"));
    // systemd refuses an ExecStart= that names a directory.
    let e = errs("[pool.p]\nexec = \"/usr/bin/\"\nroute = \"/p\"\n");
    assert!(
        e.iter()
            .any(|l| l.starts_with("t.toml:2:8: pool.p.exec:") && l.contains("directory")),
        "{e:#?}"
    );
    let e = one_err("protocol = \"cgi\"\ngateway = \"/opt/cgipool/\"");
    assert!(e.starts_with("t.toml:5:11: pool.p.gateway:"), "{e}");
    // The pool's environment comes after the unit's own Environment= and
    // systemd's: it must not replace what activation and php-cgi rely on.
    for name in [
        "LISTEN_FDS",
        "LISTEN_PID",
        "WATCHDOG_USEC",
        "PHP_FCGI_CHILDREN",
    ] {
        let e = one_err(&format!("environment = {{ {name} = \"8\" }}"));
        assert!(e.contains(&format!("{name} is reserved")), "{e}");
    }
}

/// Two routes that differ as text but give nginx the same location: a
/// PHP-style pool on /x has `^~ /x/`, the location of a pool on /x/.
#[test]
fn routes_are_unique_as_nginx_locations() {
    let php = "[pool.php]\nprotocol = \"fastcgi\"\nexec = \"/usr/local/bin/app\"\nroute = \"/x\"\n\
               document_root = \"/usr\"\n";
    let api = "[pool.api]\nexec = \"/bin/p\"\nroute = \"/x/\"\n";
    let e = errs(&format!("{php}{api}"));
    assert_eq!(
        e,
        [
            "t.toml:8:9: pool.api.route: route \"/x/\" is already used by pool.php \
          (nginx would get location \"/x/\" for both routes, \"/x\" and this)"
        ]
    );
    // Without document_root the FastCGI pool has one location, /x.
    ok(&format!(
        "{}{api}",
        php.replace("document_root = \"/usr\"\n", "")
    ));
    // The same route as text, as before.
    let e = errs(&format!("{api}{}", api.replace("pool.api", "pool.b")));
    assert_eq!(
        e,
        ["t.toml:6:9: pool.b.route: route \"/x/\" is already used by pool.api"]
    );
}

// Pool keys (pool.rs).
#[test]
fn burst_defaults_to_10_with_rate_limit() {
    let c = ok(&pool_with("rate_limit = \"20r/s\""));
    assert_eq!(c.pools["p"].burst, 10);
    let c = ok(&pool_with("rate_limit = \"20r/s\"\nburst = 0"));
    assert_eq!(c.pools["p"].burst, 0);
}

#[test]
fn ranges() {
    assert!(one_err("min = 0").contains("must be between 1 and 512, got 0"));
    assert!(one_err("max = 513").contains("must be between 1 and 512, got 513"));
    assert!(one_err("min = -1").contains("must be between 1 and 512"));
    // min > max where max comes from the default (5).
    assert!(one_err("min = 6").contains("min (6) must not be greater than max (5)"));
    // max < default min (2): reported at the pool header.
    assert_eq!(
        one_err("max = 1"),
        "t.toml:1:1: pool.p.min: min (2) must not be greater than max (1)"
    );
    ok(&pool_with("min = 1\nmax = 1"));
}

#[test]
fn queue_modes() {
    assert_eq!(ok(&pool_with("")).pools["p"].queue, Queue::Shared);
    let c = ok(&pool_with("queue = \"per-worker\""));
    assert_eq!(c.pools["p"].queue, Queue::PerWorker);
    let c = ok(&pool_with("queue = \"shared\""));
    assert_eq!(c.pools["p"].queue, Queue::Shared);
    let e = one_err("queue = \"perworker\"");
    assert!(e.starts_with("t.toml:"), "{e}");
    assert!(
        e.contains("pool.p.queue: expected \"shared\" or \"per-worker\", got \"perworker\""),
        "{e}"
    );
    assert!(one_err("queue = 1").contains("pool.p.queue"));
}

#[test]
fn cgi_pools() {
    let c = ok(&pool_with("protocol = \"cgi\""));
    assert_eq!(c.pools["p"].protocol, Protocol::Cgi);
    assert_eq!(c.pools["p"].gateway, crate::paths::cgipool_binary());
    for bad in ["notify = true", "watchdog_sec = \"5s\""] {
        let e = errs(&pool_with(&format!("protocol = \"cgi\"\n{bad}")));
        assert_eq!(e.len(), 1, "{bad}: {e:?}");
        assert!(
            e[0].contains("not available for protocol = \"cgi\""),
            "{e:?}"
        );
    }
}

#[test]
fn reap_abandoned_is_on_by_default_and_not_for_cgi() {
    assert!(ok(&pool_with("")).pools["p"].reap_abandoned);
    assert!(!ok(&pool_with("reap_abandoned = false")).pools["p"].reap_abandoned);
    let e = errs(&pool_with("protocol = \"cgi\"\nreap_abandoned = false"));
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].contains("pool.p.reap_abandoned"), "{e:?}");
}

#[test]
fn keepalive_is_on_for_http_pools_and_only_theirs() {
    assert!(ok(&pool_with("")).pools["p"].keepalive);
    assert!(!ok(&pool_with("keepalive = false")).pools["p"].keepalive);
    assert!(!ok(&pool_with("protocol = \"cgi\"")).pools["p"].keepalive);
    let e = errs(&pool_with("protocol = \"cgi\"\nkeepalive = true"));
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].contains("pool.p.keepalive: `keepalive` is only for protocol = \"http\""),
        "{e:?}"
    );
    assert!(one_err("keepalive = \"yes\"").contains("pool.p.keepalive"));
}

#[test]
fn max_requests_and_protocols() {
    assert_eq!(
        ok(&pool_with("max_requests = 5000")).pools["p"].max_requests,
        Some(5000)
    );
    assert_eq!(ok(&pool_with("")).pools["p"].max_requests, None);
    let e = one_err("max_requests = 4999");
    assert!(
        e.starts_with("t.toml:4:16: pool.p.max_requests: must be at least 5000, got 4999")
            && e.contains("20 starts within 10 s"),
        "{e}"
    );
    assert!(one_err("max_requests = \"5\"").contains("expected an integer"));
    assert!(one_err("environment = { CGIPOOL_MAX_REQUESTS = \"5\" }").contains("reserved"));
    assert!(one_err("protocol = \"scgi\"")
        .contains("expected \"http\", \"cgi\" or \"fastcgi\", got \"scgi\""));
    let c = ok(&pool_with("protocol = \"fastcgi\""));
    assert_eq!(c.pools["p"].protocol, Protocol::FastCgi);
    assert!(c.pools["p"].fastcgi.is_some());
    assert!(ok(&pool_with("")).pools["p"].fastcgi.is_none());
}

/// A `[defaults]` key that is only for some protocols applies to the pools
/// of those protocols and is left out for the others.
#[test]
fn defaults_apply_where_they_fit_the_protocol() {
    let c = ok("[defaults]\nkeepalive = false\nreap_abandoned = false\n\
                gateway = \"/opt/cgipool/bin/cgipool\"\nkeep_conn = true\n\
                [pool.web]\nexec = \"/bin/p\"\nroute = \"/web\"\n\
                [pool.cgi]\nprotocol = \"cgi\"\nexec = \"/bin/p\"\nroute = \"/cgi\"\n\
                [pool.app]\nprotocol = \"fastcgi\"\nexec = \"/usr/local/bin/app\"\nroute = \"/app\"\n");
    let (web, cgi, app) = (&c.pools["web"], &c.pools["cgi"], &c.pools["app"]);
    assert!(!web.keepalive && !web.reap_abandoned && web.fastcgi.is_none());
    assert_eq!(cgi.gateway, PathBuf::from("/opt/cgipool/bin/cgipool"));
    assert!(!app.reap_abandoned);
    assert!(app.fastcgi.as_ref().is_some_and(|f| f.keep_conn));
    // In a pool's own table the same key is still an error.
    let e = one_err("protocol = \"cgi\"\nreap_abandoned = true");
    assert!(
        e.contains("reap_abandoned is not for protocol = \"cgi\""),
        "{e}"
    );
}

#[test]
fn a_duplicate_key_is_named_and_nginx_keys_are_checked() {
    let e = errs(&pool_with("min = 1\nmin = 2"));
    assert_eq!(e, ["t.toml:5:1: duplicate key `min`"]);
    let e = errs(&format!(
        "[nginx]\nunit = \"nginx@.service\"\ncheck_address = \"127.0.0.1:0\"\n{}",
        pool_with("")
    ));
    assert_eq!(e.len(), 2, "{e:#?}");
    assert!(
        e[0].starts_with("t.toml:2:8: nginx.unit: invalid unit name"),
        "{e:#?}"
    );
    assert!(
        e[1].starts_with("t.toml:3:17: nginx.check_address:"),
        "{e:#?}"
    );
    ok(&format!(
        "[nginx]\nunit = \"nginx@main.service\"\n{}",
        pool_with("")
    ));
}
