//! The key tables (which keys each section takes; the README's key table is
//! checked against `POOL_KEYS`) and a pool's `environment`.

use super::diag::{entries, get_str, type_err, unknown_key, Cx, Src};
use super::fastcgi::FASTCGI_KEYS;
use super::model::Protocol;
use super::values::env_key_ok;

pub(super) const TOP_KEYS: &[&str] = &["nginx", "watch", "defaults", "pool", "host"];
pub(super) const NGINX_KEYS: &[&str] = &[
    "upstreams",
    "locations",
    "unit",
    "socket_group",
    "check_address",
    "front_address",
];
pub(super) const WATCH_SECTION_KEYS: &[&str] = &["enabled"];
pub(super) const POOL_KEYS: &[&str] = &[
    "exec",
    "args",
    "description",
    "environment",
    "route",
    "min",
    "max",
    "notify",
    "watchdog_sec",
    "restart_sec",
    "runtime_max_sec",
    "memory_max",
    "cpu_quota",
    "tasks_max",
    "user",
    "read_write_paths",
    "read_only_paths",
    "private_network",
    "access_log",
    "keepalive",
    "reap_abandoned",
    "protocol",
    "queue",
    "gateway",
    "working_directory",
    "request_timeout",
    "body_limit",
    "rate_limit",
    "burst",
    "max_connections",
    "scale_up_after",
    "scale_down_after",
    "health_path",
    "health_interval",
    "health_timeout",
    "unhealthy_after",
    "max_requests",
    "slow_request",
    "hosts",
    "port",
    // protocol = "fastcgi" (config::fastcgi)
    "listen_fd",
    "keep_conn",
    "document_root",
    "index",
    "pcre_jit",
];
/// Environment variables the units or systemd set for the workers: a
/// pool's `environment` would override them (systemd puts Environment=
/// after its own), breaking socket activation, the watchdog or php-cgi's
/// one process per unit.
const RESERVED_ENV: &[&str] = &[
    "NOTIFY_SOCKET",
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "WATCHDOG_PID",
    "WATCHDOG_USEC",
    "CGIPOOL_POOL",
    "CGIPOOL_WORKER",
    "CGIPOOL_MAX_REQUESTS",
    "CGIPOOL_ACCESS_LOG",
    "PHP_FCGI_CHILDREN",
    "PHP_FCGI_MAX_REQUESTS",
];

/// Whether a pool key means something for pools of `protocol`. A
/// `[defaults]` key that does not is left out for those pools; in a pool's
/// own table it is an error (see pool.rs and fastcgi.rs).
pub(super) fn key_fits(key: &str, protocol: Protocol) -> bool {
    match key {
        "keepalive" => protocol == Protocol::Http,
        "gateway" => protocol == Protocol::Cgi,
        "notify" | "watchdog_sec" | "reap_abandoned" => protocol != Protocol::Cgi,
        k if FASTCGI_KEYS.contains(&k) => protocol == Protocol::FastCgi,
        _ => true,
    }
}

/// Reject keys that are not pool keys. Returns true when the key is one.
pub(super) fn check_pool_key(cx: &mut Cx<'_>, src: &Src<'_>, what: &str) -> bool {
    if POOL_KEYS.contains(&src.name.as_str()) {
        true
    } else {
        unknown_key(cx, src, POOL_KEYS, what);
        false
    }
}

pub(super) fn parse_env(cx: &mut Cx<'_>, src: &Src<'_>) -> Option<Vec<(String, String)>> {
    let Some(t) = src.item.as_table_like() else {
        type_err(cx, src, "a table of strings");
        return None;
    };
    let mut out = Vec::new();
    let mut ok = true;
    for e in entries(&src.key, t) {
        let raw_key = e.name.clone();
        if !env_key_ok(&raw_key) {
            cx.err(
                e.key_span.clone(),
                &e.key,
                format!(
                    "invalid environment variable name {raw_key:?}: use [A-Za-z_][A-Za-z0-9_]*"
                ),
            );
            ok = false;
            continue;
        }
        if RESERVED_ENV.contains(&raw_key.as_ref()) {
            cx.err(
                e.key_span.clone(),
                &e.key,
                format!("{raw_key} is reserved (cgipool or systemd sets it)"),
            );
            ok = false;
            continue;
        }
        match get_str(cx, &e) {
            Some(v) => out.push((raw_key, v)),
            None => ok = false,
        }
    }
    ok.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README's config reference cannot drift from the code.
    #[test]
    fn readme_documents_every_config_key() {
        let readme = include_str!("../../README.md");
        let rows: Vec<(&str, &str)> = readme
            .lines()
            .filter_map(|l| {
                let cells: Vec<&str> = l.split('|').map(str::trim).collect();
                let key = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
                Some((key, *cells.get(2)?))
            })
            .collect();
        let documented =
            |key: &str, section: &str| rows.iter().any(|(k, s)| *k == key && *s == section);
        for key in NGINX_KEYS {
            assert!(
                documented(key, "`[nginx]`"),
                "README lacks [nginx] key {key}"
            );
        }
        for key in WATCH_SECTION_KEYS {
            assert!(
                documented(key, "`[watch]`"),
                "README lacks [watch] key {key}"
            );
        }
        for key in POOL_KEYS {
            assert!(documented(key, "pool"), "README lacks pool key {key}");
        }
        let known = rows.iter().filter(|(_, s)| *s == "pool").count();
        assert_eq!(
            known,
            POOL_KEYS.len(),
            "README documents pool keys the code does not know"
        );
    }
}
