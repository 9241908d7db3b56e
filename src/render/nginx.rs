//! The nginx files: askama nginx templates and [`nginx()`], which renders
//! the upstreams and locations files and their generation.

use std::collections::BTreeMap;

use askama::Template;
use sha2::{Digest, Sha256};

use super::{finish, header};
use crate::config::{format_nginx_usec, Config, FastCgi, Pool, Protocol, Queue};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NginxFiles {
    /// http-context file: zones and upstream blocks.
    pub upstreams: String,
    /// server-context file: location blocks.
    pub locations: String,
    /// What `location = /.cgipool/generation` answers (without newline).
    pub generation: String,
}

struct UpstreamView<'a> {
    pool: &'a Pool,
    /// `queue = "shared"`: one socket, not a server per worker.
    shared: bool,
    /// How often the shared socket is listed ([`SHARED_ENTRIES`]).
    shared_entries: u32,
    workers: Vec<u32>,
    /// `ip:port` of the pool's queue on each host other than the front.
    remote: Vec<String>,
    /// nginx keeps idle connections to the workers: HTTP workers unless the
    /// pool set `keepalive = false` (or its shared queue spans other
    /// hosts), CGI gateways on per-worker sockets.
    keepalive: bool,
    /// Shared memory for the upstream's peers: nginx needs about 1 KiB per
    /// server (64k fails at 100 servers), so the zone grows with `max`.
    zone_kb: u32,
}

struct LocationView<'a> {
    pool: &'a Pool,
    active: bool,
    /// nginx's proxy_connect_timeout (fastcgi_connect_timeout of a FastCGI
    /// pool): [`REMOTE_CONNECT_TIMEOUT`] when the upstream lists other
    /// hosts, so that a host that lost power costs a request that much
    /// before nginx tries the next host.
    connect_timeout: &'static str,
    /// A `protocol = "cgi"` pool (the gateway needs X-Forwarded-Port).
    cgi: bool,
    /// nginx's proxy_read_timeout/proxy_send_timeout: request_timeout, plus
    /// [`CGI_TIMEOUT_MARGIN`] for CGI pools so that the gateway's own 504
    /// (and its cleanup) reaches the client rather than nginx's.
    timeout: String,
    /// A `protocol = "fastcgi"` pool (templates/fastcgi-location.conf).
    fastcgi: Option<FastCgiView>,
}

/// What the FastCGI location needs besides the pool.
struct FastCgiView {
    /// The route without a trailing slash ("" for "/").
    base: String,
    /// The route with one trailing slash: the location of PHP-style routing.
    prefix: String,
    /// `prefix` as a PCRE literal (route characters: `.` is the only one
    /// special in a regex).
    prefix_regex: String,
    /// The document root with one trailing slash (nginx `alias`).
    document_root: Option<String>,
    index: String,
    keep_conn: bool,
    /// `fastcgi_next_upstream error timeout` instead of `error`: the
    /// upstream lists other hosts. A connect that times out (after
    /// [`REMOTE_CONNECT_TIMEOUT`]: a host that lost power) then goes to the
    /// next host, as for HTTP pools; so does a request whose script ran past
    /// request_timeout, if its method is idempotent (nginx never resends a
    /// POST), and the script runs again there. On the front only, a script
    /// that timed out is never re-run.
    retry_timeouts: bool,
}

impl FastCgiView {
    fn new(pool: &Pool, f: &FastCgi, has_remote: bool) -> FastCgiView {
        let base = pool.route.trim_end_matches('/').to_string();
        let prefix = format!("{base}/");
        FastCgiView {
            prefix_regex: prefix.replace('.', "\\."),
            base,
            prefix,
            document_root: f
                .document_root
                .as_ref()
                .map(|d| format!("{}/", d.display().to_string().trim_end_matches('/'))),
            index: f.index.clone(),
            keep_conn: f.keep_conn,
            retry_timeouts: has_remote,
        }
    }
}

/// How often a shared pool socket is listed in its upstream: nginx tries
/// a request on at most as many servers as the upstream lists (a lone
/// server is never retried), so this matches `proxy_next_upstream_tries 3`.
/// With keep-alive, [`KEEPALIVE_CONNECTIONS`] more: after a worker was
/// killed, each kept connection of its that nginx picks for a retry fails
/// too; nginx does not count such a failure against the tries, but it
/// marks the entry tried, and with every entry tried it answers 502 ("no
/// live upstreams").
pub const SHARED_ENTRIES: u32 = 3;

/// nginx's `keepalive`: idle connections each nginx worker keeps per
/// upstream.
pub const KEEPALIVE_CONNECTIONS: u32 = 16;

/// proxy_connect_timeout of a pool on other hosts: a connect on a working
/// network takes well under a millisecond, and a host that does not answer
/// delays the request this long before nginx retries it on the next host.
pub const REMOTE_CONNECT_TIMEOUT: &str = "1s";
/// proxy_connect_timeout of a pool on the front only (unix sockets).
pub const LOCAL_CONNECT_TIMEOUT: &str = "2s";
/// How long every nginx worker skips another host after a failed connect
/// (`fail_timeout`, with `max_fails=1`): watch takes a lost host out of the
/// upstream within a few seconds, so this only bridges that time.
pub const REMOTE_FAIL_TIMEOUT: &str = "5s";

/// How much longer nginx waits for a CGI pool than the gateway's timeout.
pub const CGI_TIMEOUT_MARGIN_USEC: u64 = 5_000_000;

#[derive(Template)]
#[template(path = "upstreams.conf")]
struct UpstreamsTemplate<'a> {
    upstreams: Vec<UpstreamView<'a>>,
    remote_fail_timeout: &'static str,
    keepalive_connections: u32,
}

#[derive(Template)]
#[template(path = "locations.conf")]
struct LocationsTemplate<'a> {
    locations: Vec<LocationView<'a>>,
    generation: &'a str,
    /// Route /pool-status and /metrics to `cgipool watch`.
    watch: bool,
}

/// systemd duration (as stored in the config) plus `extra_usec` → nginx time.
fn nginx_time(systemd: &str, extra_usec: u64) -> String {
    crate::config::duration_usec(systemd)
        .and_then(|us| us.checked_add(extra_usec))
        .and_then(format_nginx_usec)
        // Unreachable for a validated config; the escaper keeps it one token
        // and `nginx -t` rejects it.
        .unwrap_or_else(|| systemd.to_string())
}

/// The nginx files. `active` lists, per pool, the worker numbers that are in
/// the upstream (sorted and deduplicated here); a pool with none (or missing
/// from `active`) gets no upstream and its route answers 503 with JSON. A
/// `queue = "shared"` pool's upstream names its one socket, so its files
/// do not change with the number of workers (only with none or some).
///
/// `generation` is the first 16 hex digits of
/// sha256(upstreams ‖ locations-with-an-empty-generation), i.e. it covers
/// everything in both files except itself.
pub fn nginx(cfg: &Config, active: &BTreeMap<String, Vec<u32>>) -> NginxFiles {
    let header = header();
    let mut upstreams = Vec::new();
    let mut locations = Vec::new();
    for (name, pool) in &cfg.pools {
        let mut workers = active.get(name).cloned().unwrap_or_default();
        workers.sort_unstable();
        workers.dedup();
        let remote = super::remote_servers(cfg, pool);
        let has_remote = !remote.is_empty();
        let is_active = !workers.is_empty() || has_remote;
        if is_active {
            let zone_kb = 64 + pool.max;
            let shared = pool.queue == Queue::Shared;
            // HTTP workers give a kept connection back when the queue has
            // one waiting (README "Queues"); a CGI gateway forks per request
            // and gets a connection per request from a shared queue.
            let keepalive = match pool.protocol {
                Protocol::Http => pool.keepalive && !(shared && has_remote),
                _ => !shared,
            };
            upstreams.push(UpstreamView {
                pool,
                shared,
                keepalive,
                shared_entries: SHARED_ENTRIES + if keepalive { KEEPALIVE_CONNECTIONS } else { 0 },
                workers,
                remote,
                zone_kb,
            });
        }
        let cgi = pool.protocol == Protocol::Cgi;
        locations.push(LocationView {
            pool,
            active: is_active,
            connect_timeout: if has_remote {
                REMOTE_CONNECT_TIMEOUT
            } else {
                LOCAL_CONNECT_TIMEOUT
            },
            cgi,
            timeout: nginx_time(
                &pool.request_timeout,
                if cgi { CGI_TIMEOUT_MARGIN_USEC } else { 0 },
            ),
            fastcgi: pool
                .fastcgi
                .as_ref()
                .map(|f| FastCgiView::new(pool, f, has_remote)),
        });
    }
    let upstreams = finish(
        &header,
        UpstreamsTemplate {
            upstreams,
            remote_fail_timeout: REMOTE_FAIL_TIMEOUT,
            keepalive_connections: KEEPALIVE_CONNECTIONS,
        }
        .render(),
    );
    let mut loc = LocationsTemplate {
        locations,
        generation: "",
        watch: cfg.watch_enabled,
    };
    let unhashed = finish(&header, loc.render());
    let mut hasher = Sha256::new();
    hasher.update(upstreams.as_bytes());
    hasher.update(unhashed.as_bytes());
    let generation: String = hasher
        .finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect();
    loc.generation = &generation;
    let locations = finish(&header, loc.render());
    NginxFiles {
        upstreams,
        locations,
        generation: generation.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::tests::{all_active, cfg, CGI, DEMO, FASTCGI, FULL};
    use pretty_assertions::assert_eq;
    use std::fs;

    /// FastCGI pools on other hosts (PHP-style and flat) beside one on the
    /// front only.
    const FASTCGI_HOSTS: &str = r#"
[nginx]
front_address = "10.231.0.10"

[host.web1]
address = "root@10.231.0.11"

[host.web2]
address = "root@10.231.0.12"

[pool.php]
protocol = "fastcgi"
exec = "/usr/bin/php-cgi"
route = "/php"
document_root = "/usr"
hosts = ["web1", "web2"]
port = 9103

[pool.app]
protocol = "fastcgi"
exec = "/usr/local/bin/app"
route = "/app"
hosts = ["local", "web1"]
port = 9104

[pool.local]
protocol = "fastcgi"
exec = "/usr/local/bin/app"
route = "/local"
"#;

    #[test]
    fn nginx_inactive_pool_and_generation() {
        let c = cfg("x.toml", DEMO);
        let none = nginx(&c, &BTreeMap::new());
        assert!(!none.upstreams.contains("upstream"));
        assert!(none
            .locations
            .contains(r#"return 503 '{"error":"no healthy workers","pool":"search"}\n';"#));
        assert!(!none.locations.contains("proxy_pass http://cgipool_"));
        let some = nginx(&c, &all_active(&c));
        assert_ne!(none.generation, some.generation);
        assert_eq!(some.generation.len(), 16);
        assert!(some.generation.bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(some
            .locations
            .contains(&format!("return 200 \"{}\\n\";", some.generation)));
        // The hash covers both files without the generation value itself.
        let without = some.locations.replace(&some.generation, "");
        let mut h = Sha256::new();
        h.update(some.upstreams.as_bytes());
        h.update(without.as_bytes());
        let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(&hex[..16], some.generation);
    }

    #[test]
    fn keepalive_only_where_a_connection_may_be_kept() {
        let pools = "[pool.http]\nexec = \"/bin/w\"\nroute = \"/http\"\n\
            [pool.on]\nexec = \"/bin/w\"\nroute = \"/on\"\nkeepalive = true\n\
            [pool.pw]\nexec = \"/bin/w\"\nroute = \"/pw\"\nqueue = \"per-worker\"\n\
            [pool.off]\nexec = \"/bin/w\"\nroute = \"/off\"\nkeepalive = false\n\
            [pool.offpw]\nexec = \"/bin/w\"\nroute = \"/offpw\"\nkeepalive = false\nqueue = \"per-worker\"\n\
            [pool.cgi]\nexec = \"/bin/w\"\nroute = \"/cgi\"\nprotocol = \"cgi\"\ngateway = \"/bin/g\"\n\
            [pool.cgipw]\nexec = \"/bin/w\"\nroute = \"/cgipw\"\nprotocol = \"cgi\"\ngateway = \"/bin/g\"\nqueue = \"per-worker\"\n";
        let c = cfg("x.toml", pools);
        let up = nginx(&c, &all_active(&c)).upstreams;
        let kept = |pool: &str| {
            let start = up
                .find(&format!("upstream cgipool_{pool} {{"))
                .unwrap_or_else(|| panic!("no upstream for {pool}:\n{up}"));
            let block = &up[start..];
            block[..block.find('}').unwrap_or(block.len())].contains("keepalive 16;")
        };
        assert!(
            kept("http"),
            "a shared queue of HTTP workers keeps them:\n{up}"
        );
        assert!(kept("on"), "keepalive = true keeps a shared queue's:\n{up}");
        assert!(kept("pw"), "per-worker HTTP workers keep theirs:\n{up}");
        assert!(kept("cgipw"), "per-worker CGI gateways keep theirs:\n{up}");
        for pool in ["off", "offpw", "cgi"] {
            assert!(
                !kept(pool),
                "{pool} must get a connection per request:\n{up}"
            );
        }
    }

    #[test]
    fn nginx_durations() {
        let c = cfg("x.toml", FULL);
        let ng = nginx(&c, &all_active(&c));
        assert!(ng.locations.contains("proxy_read_timeout 90s;"));
        assert!(ng.locations.contains("proxy_read_timeout 60s;"));
        assert!(ng
            .locations
            .contains("limit_req zone=cgipool_search-req burst=10 nodelay;"));
        assert!(ng
            .locations
            .contains("limit_req zone=cgipool_auth-req nodelay;"));
        assert!(ng
            .upstreams
            .contains("limit_req_zone $binary_remote_addr zone=cgipool_auth-req:10m rate=600r/m;"));
        assert_eq!(nginx_time("1min 30s", 0), "90s");
        assert_eq!(nginx_time("1500ms", 0), "1500ms");
        assert_eq!(nginx_time("2h", 0), "7200s");
        assert_eq!(nginx_time("2h", CGI_TIMEOUT_MARGIN_USEC), "7205s");
    }

    /// Both FastCGI locations read like hand-written nginx: every line of
    /// a block one level (4 spaces) deeper than its `location`, and the
    /// nested *.php location carries the same FastCGI settings as the flat
    /// one (templates/fastcgi-params.conf and its copy one level deeper).
    #[test]
    fn fastcgi_locations_are_indented_and_agree() {
        let both = |keep: bool| {
            format!(
                "[pool.php]\nprotocol = \"fastcgi\"\nexec = \"/usr/local/bin/app\"\nroute = \"/php\"\n\
                 document_root = \"/usr\"\nkeep_conn = {keep}\n\
                 [pool.app]\nprotocol = \"fastcgi\"\nexec = \"/usr/local/bin/app\"\nroute = \"/app\"\nkeep_conn = {keep}\n"
            )
        };
        for keep in [false, true] {
            let c = cfg("x.toml", &both(keep));
            let l = nginx(&c, &all_active(&c)).locations;
            // The settings: from HTTP_X_REQUEST_ID to the end of the block.
            let settings = |open: &str, indent: &str| -> Vec<String> {
                let block = l
                    .split(open)
                    .nth(1)
                    .unwrap_or_else(|| panic!("no {open:?}:\n{l}"));
                block
                    .lines()
                    .skip_while(|x| !x.contains("fastcgi_param HTTP_X_REQUEST_ID"))
                    .take_while(|x| x.trim_start().starts_with("fastcgi_"))
                    .map(|x| {
                        let rest = x
                            .strip_prefix(indent)
                            .unwrap_or_else(|| panic!("{x:?} is not indented by {indent:?}:\n{l}"));
                        assert!(!rest.starts_with(' '), "{x:?} is indented too deep:\n{l}");
                        rest.to_string()
                    })
                    .collect()
            };
            let flat = settings("location /app {", "    ");
            let nested = settings("location ~ ^/php/.+?\\.php(/|$) {", "        ");
            assert!(flat.len() >= 9, "{flat:?}");
            assert_eq!(flat, nested, "the two FastCGI locations differ:\n{l}");
            assert_eq!(flat.contains(&"fastcgi_keep_conn on;".to_string()), keep);
            let app = l
                .split("location /app {\n")
                .nth(1)
                .and_then(|b| b.split("\n}\n").next());
            for line in app.unwrap_or_default().lines() {
                assert!(
                    line.starts_with("    ") && !line.starts_with("     "),
                    "{line:?} in location /app is not indented by 4:\n{l}"
                );
            }
        }
    }

    #[test]
    fn fastcgi_locations() {
        let c = cfg("x.toml", FASTCGI);
        let ng = nginx(&c, &all_active(&c));
        let l = &ng.locations;
        for want in [
            "location = /blog.v2 {\n    add_header X-Request-ID $request_id always;\n    return 301 /blog.v2/;\n}",
            "location ^~ /blog.v2/ {\n    alias /usr/;\n    index main.php;",
            // The route's dot is a literal in the regex (nginx unescapes \\).
            "location ~ ^/blog\\\\.v2/.+?\\.php(/|$) {",
            "fastcgi_split_path_info ^(.+?\\.php)(/.*)$;",
            "set $cgipool_path_info $fastcgi_path_info;",
            "try_files $fastcgi_script_name =404;",
            "fastcgi_pass cgipool_php;",
            "include /etc/nginx/fastcgi_params;",
            "fastcgi_param SCRIPT_FILENAME $request_filename;",
            "fastcgi_param PATH_INFO $cgipool_path_info;",
            "fastcgi_read_timeout 1500ms;",
            "client_max_body_size 16m;",
            "limit_req zone=cgipool_php-req burst=10 nodelay;",
            "location /app {\n    fastcgi_pass cgipool_app;",
            "fastcgi_keep_conn on;",
        ] {
            assert!(l.contains(want), "locations lack {want:?}:\n{l}");
        }
        // keep_conn only where asked for.
        assert_eq!(l.matches("fastcgi_keep_conn").count(), 1, "{l}");

        assert!(!l.contains("proxy_pass http://cgipool_"), "{l}");
        // Inactive: the route answers 503 like any pool.
        let none = nginx(&c, &BTreeMap::new());
        assert!(none
            .locations
            .contains(r#"return 503 '{"error":"no healthy workers","pool":"php"}\n';"#));
    }

    /// FastCGI pools on other hosts: the connect timeout of proxy pools on
    /// other hosts and `error timeout`, in both FastCGI locations, so that a
    /// host that lost power costs a request 1 s, not a 504; a pool on the
    /// front only keeps `2s` and `error`.
    #[test]
    fn fastcgi_on_other_hosts_fails_over() {
        let c = cfg("x.toml", FASTCGI_HOSTS);
        let l = nginx(&c, &all_active(&c)).locations;
        // Each location from its opening line to the end of its settings.
        let settings = |open: &str| -> String {
            let block = l
                .split(open)
                .nth(1)
                .unwrap_or_else(|| panic!("no {open:?}:\n{l}"));
            block
                .lines()
                .take_while(|x| {
                    !x.trim_start().starts_with("limit_")
                        && !x.trim_start().starts_with("error_page")
                })
                .map(|x| format!("{}\n", x.trim()))
                .collect()
        };
        for (open, remote) in [
            ("location ~ ^/php/.+?\\.php(/|$) {", true),
            ("location /app {", true),
            ("location /local {", false),
        ] {
            let block = settings(open);
            let (connect, next) = if remote {
                (
                    "fastcgi_connect_timeout 1s;",
                    "fastcgi_next_upstream error timeout;",
                )
            } else {
                (
                    "fastcgi_connect_timeout 2s;",
                    "fastcgi_next_upstream error;",
                )
            };
            for want in [connect, next] {
                assert!(
                    block.lines().any(|x| x == want),
                    "{open} lacks {want:?}:\n{block}"
                );
            }
            assert_eq!(
                block.matches("fastcgi_next_upstream ").count(),
                1,
                "{block}"
            );
        }
        assert_eq!(REMOTE_CONNECT_TIMEOUT, "1s");
        assert_eq!(
            l.matches("fastcgi_next_upstream error timeout;").count(),
            2,
            "{l}"
        );
    }

    #[test]
    fn the_dotfile_rule_applies_below_the_route() {
        let c = cfg(
            "x.toml",
            "[pool.wk]\nprotocol = \"fastcgi\"\nexec = \"/bin/true\"\n\
             route = \"/.well-known/\"\ndocument_root = \"/usr\"\n",
        );
        let ng = nginx(&c, &all_active(&c));
        assert!(
            ng.locations
                .contains("    location ~ ^/\\\\.well-known/(.*/)?\\. {\n        return 404;"),
            "{}",
            ng.locations
        );
    }

    /// `nginx -t` on the rendered files (skipped with a notice when nginx is
    /// not installed).
    #[test]
    fn nginx_accepts_rendered_files() {
        const LARGEST: &str =
            "[pool.big]\nexec = \"/bin/true\"\nroute = \"/big\"\nmin = 512\nmax = 512\n";
        // Zone names that a join with `_` would make the same: pool `a`'s
        // limit zones and pools `a_req` and `a_conn`'s upstream zones.
        const ZONES: &str = "[pool.a]\nexec = \"/bin/true\"\nroute = \"/a\"\n\
             rate_limit = \"10r/s\"\nmax_connections = 10\n\
             [pool.a_req]\nexec = \"/bin/true\"\nroute = \"/b\"\nqueue = \"per-worker\"\n\
             [pool.a_conn]\nexec = \"/bin/true\"\nroute = \"/c\"\nqueue = \"per-worker\"\n";
        // A PHP-style pool on a route with a dot segment.
        const DOTTED: &str = "[pool.wk]\nprotocol = \"fastcgi\"\nexec = \"/bin/true\"\n\
             route = \"/.well-known/\"\ndocument_root = \"/usr\"\nrate_limit = \"1r/s\"\n";
        if std::process::Command::new("nginx")
            .arg("-v")
            .output()
            .is_err()
        {
            eprintln!("NOTICE: nginx not on PATH; skipping nginx -t check");
            return;
        }
        for (text, active) in [
            (DEMO, None),
            (FULL, None),
            (CGI, None),
            (FASTCGI, None),
            (FASTCGI, Some(BTreeMap::new())),
            (FASTCGI_HOSTS, None),
            (
                FULL,
                Some(BTreeMap::from([("search".to_string(), vec![1, 3])])),
            ),
            (DEMO, Some(BTreeMap::new())),
            // The largest pool the config allows, every worker active: the
            // upstream zone must hold 512 servers.
            (LARGEST, None),
            (ZONES, None),
            (DOTTED, None),
        ] {
            let c = cfg("x.toml", text);
            let active = active.unwrap_or_else(|| all_active(&c));
            let ng = nginx(&c, &active);
            let dir = tempfile::tempdir().unwrap();
            let d = dir.path();
            fs::write(d.join("upstreams.conf"), &ng.upstreams).unwrap();
            fs::write(d.join("locations.conf"), &ng.locations).unwrap();
            fs::write(
                d.join("nginx.conf"),
                format!(
                    "pid {p}/nginx.pid;\nerror_log stderr;\nevents {{}}\nhttp {{\n    \
                     access_log off;\n    include {p}/upstreams.conf;\n    server {{\n        \
                     listen 127.0.0.1:18080;\n        include {p}/locations.conf;\n    }}\n}}\n",
                    p = d.display()
                ),
            )
            .unwrap();
            let out = std::process::Command::new("nginx")
                .arg("-t")
                .arg("-q")
                .arg("-e")
                .arg("stderr")
                .arg("-p")
                .arg(d)
                .arg("-c")
                .arg(d.join("nginx.conf"))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "nginx -t failed:\n{}\n--- upstreams\n{}\n--- locations\n{}",
                String::from_utf8_lossy(&out.stderr),
                ng.upstreams,
                ng.locations
            );
        }
    }
}
