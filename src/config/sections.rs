//! The top level of the file: `[nginx]`, `[watch]`, `[defaults]` and the
//! `[pool.NAME]` tables (names, route uniqueness).

use std::collections::BTreeMap;
use std::path::Path;

use toml_edit::TableLike;

use super::diag::{entries, get_bool, get_str, type_err, unknown_key, Cx, Src};
use super::keys::{check_pool_key, parse_env, NGINX_KEYS, POOL_KEYS, TOP_KEYS, WATCH_SECTION_KEYS};
use super::model::{Config, LocationKind, Nginx, MAX_POOL_NAME};
use super::pool::{apply_field, parse_pool, PoolFields};
use super::values::{get_abs_path, pool_name_ok, unit_name_ok, user_name_ok};

// ---------------------------------------------------------------------------
// Sections

pub(super) fn parse_root(cx: &mut Cx<'_>, source: &Path, root: &dyn TableLike) -> Option<Config> {
    let top = entries("", root);
    let mut nginx = None;
    let mut watch = None;
    let mut defaults = Vec::new();
    let mut pool_section = None;
    let mut host_section = None;
    for src in &top {
        match src.name.as_str() {
            "nginx" => nginx = Some(src.clone()),
            "watch" => watch = Some(src.clone()),
            "defaults" => match src.item.as_table_like() {
                Some(t) => defaults = entries("defaults", t),
                None => type_err(cx, src, "a table"),
            },
            "pool" => pool_section = Some(src.clone()),
            "host" => host_section = Some(src.clone()),
            _ => unknown_key(cx, src, TOP_KEYS, "the top level"),
        }
    }

    // Where `front_address` is written, else the [nginx] header.
    let front_at = nginx.as_ref().and_then(|n| {
        n.item
            .as_table_like()
            .and_then(|t| {
                entries("nginx", t)
                    .into_iter()
                    .find(|s| s.name == "front_address")
            })
            .and_then(|s| s.span())
            .or_else(|| n.key_span.clone())
    });
    let nginx = parse_nginx(cx, nginx.as_ref());
    let hosts = super::hosts::parse_hosts(cx, host_section.as_ref());
    let watch_enabled = parse_watch(cx, watch.as_ref());
    if watch_enabled == Some(true) {
        if let Err(msg) = super::values::own_binary() {
            let span = watch.as_ref().and_then(|w| w.span());
            cx.err(
                span,
                "watch",
                format!("{msg}, or set `[watch] enabled = false`"),
            );
        }
    }

    // Validate [defaults] on its own so its errors show even without pools.
    let mut default_env = Vec::new();
    for src in &defaults {
        let name = src.name.as_str();
        if name == "route" {
            cx.err(
                src.key_span.clone(),
                &src.key,
                "route cannot be set in [defaults]: every pool needs its own route",
            );
        } else if name == "environment" {
            if let Some(env) = parse_env(cx, src) {
                default_env = env;
            }
        } else {
            check_pool_key(cx, src, "[defaults]");
        }
    }
    let default_values: Vec<&Src<'_>> = defaults
        .iter()
        .filter(|s| {
            let k = s.name.as_str();
            k != "route" && k != "environment" && POOL_KEYS.contains(&k)
        })
        .collect();
    // Validate each default once (errors dedup), independent of pools.
    let mut scratch = PoolFields::default();
    for src in &default_values {
        apply_field(cx, &mut scratch, src);
    }

    let mut pools = BTreeMap::new();
    // Every pool's nginx locations: the pool and its route.
    let mut routes: BTreeMap<(LocationKind, String), (String, String)> = BTreeMap::new();
    let mut pool_sources = BTreeMap::new();
    match &pool_section {
        None => cx.err(
            Some(0..0),
            "pool",
            "no pools defined: add at least one [pool.NAME] table",
        ),
        Some(sec) => match sec.item.as_table_like() {
            None => type_err(cx, sec, "a table of pools ([pool.NAME])"),
            Some(t) => {
                let list = entries("pool", t);
                if list.is_empty() {
                    cx.err(
                        sec.key_span.clone(),
                        "pool",
                        "no pools defined: add at least one [pool.NAME] table",
                    );
                }
                for psrc in &list {
                    let raw_name = psrc.name.clone();
                    if !pool_name_ok(&raw_name) {
                        cx.err(
                            psrc.key_span.clone().or_else(|| psrc.span()),
                            &psrc.key,
                            format!(
                                "invalid pool name {raw_name:?}: use [a-z0-9][a-z0-9_]*, at most {MAX_POOL_NAME} characters"
                            ),
                        );
                        continue;
                    }
                    let Some(ptable) = psrc.item.as_table_like() else {
                        type_err(cx, psrc, "a table");
                        continue;
                    };
                    if let Some(pool) =
                        parse_pool(cx, &raw_name, psrc, ptable, &default_values, &default_env)
                    {
                        // Route uniqueness, as nginx sees it: no location
                        // of this pool's may be another pool's.
                        let route_src = entries(&psrc.key, ptable)
                            .into_iter()
                            .find(|s| s.name == "route");
                        if let Some(rs) = route_src {
                            let mine = pool.nginx_locations();
                            let taken = mine.iter().find_map(|l| routes.get(l).map(|o| (l, o)));
                            if let Some(((_, at), (other, other_route))) = taken {
                                let how = if *at == pool.route && at == other_route {
                                    String::new()
                                } else {
                                    format!(
                                        " (nginx would get location {at:?} for both routes, {other_route:?} and this)"
                                    )
                                };
                                cx.err(
                                    rs.span(),
                                    &rs.key,
                                    format!(
                                        "route {:?} is already used by pool.{other}{how}",
                                        pool.route
                                    ),
                                );
                            } else {
                                for l in mine {
                                    routes.insert(l, (raw_name.clone(), pool.route.clone()));
                                }
                            }
                        }
                        pool_sources.insert(
                            raw_name.clone(),
                            pool_sources_of(psrc, ptable, &default_values),
                        );
                        pools.insert(raw_name, pool);
                    }
                }
            }
        },
    }

    let nginx = nginx?;
    super::hosts::check_pools(
        cx,
        &hosts,
        &pools,
        &pool_sources,
        nginx.front_address,
        front_at,
    );
    Some(Config {
        source: source.to_path_buf(),
        nginx,
        watch_enabled: watch_enabled?,
        pools,
        hosts,
    })
}

/// Where a pool's `hosts` and `port` were written (its own table, else `[defaults]`).
fn pool_sources_of<'d>(
    psrc: &Src<'d>,
    ptable: &'d dyn TableLike,
    defaults: &[&Src<'d>],
) -> super::hosts::PoolSources<'d> {
    let own = entries(&psrc.key, ptable);
    let find = |name: &str| {
        own.iter().find(|s| s.name == name).cloned().or_else(|| {
            defaults
                .iter()
                .find(|s| s.name == name)
                .map(|s| (*s).clone())
        })
    };
    super::hosts::PoolSources {
        hosts: find("hosts"),
        port: find("port"),
        header: psrc.key_span.clone().or_else(|| psrc.span()),
    }
}

fn parse_nginx(cx: &mut Cx<'_>, sec: Option<&Src<'_>>) -> Option<Nginx> {
    let mut n = Nginx::default();
    let Some(sec) = sec else { return Some(n) };
    let Some(t) = sec.item.as_table_like() else {
        type_err(cx, sec, "a table");
        return None;
    };
    let before = cx.errors;
    let mut upstreams_src = None;
    for src in entries("nginx", t) {
        match src.name.as_str() {
            "upstreams" => {
                if let Some(p) = get_abs_path(cx, &src) {
                    n.upstreams = p;
                    upstreams_src = Some(src.clone());
                }
            }
            "locations" => {
                if let Some(p) = get_abs_path(cx, &src) {
                    if p == n.upstreams {
                        cx.err(src.span(), &src.key, "must differ from nginx.upstreams");
                    }
                    n.locations = p;
                }
            }
            "unit" => {
                if let Some(s) = get_str(cx, &src) {
                    if unit_name_ok(&s) {
                        n.unit = s;
                    } else {
                        cx.err(
                            src.span(),
                            &src.key,
                            format!("invalid unit name {s:?}: expected e.g. \"nginx.service\""),
                        );
                    }
                }
            }
            "socket_group" => {
                if let Some(s) = get_str(cx, &src) {
                    if user_name_ok(&s) {
                        n.socket_group = s;
                    } else {
                        cx.err(
                            src.span(),
                            &src.key,
                            format!("invalid group name {s:?}: use [a-z_][a-z0-9_-]*"),
                        );
                    }
                }
            }
            "check_address" => {
                if let Some(s) = get_str(cx, &src) {
                    match s.parse::<std::net::SocketAddr>() {
                        Ok(a) if a.ip().is_loopback() && a.port() != 0 => n.check_address = s,
                        _ => cx.err(
                            src.span(),
                            &src.key,
                            format!("invalid address {s:?}: expected a loopback host:port such as \"127.0.0.1:80\""),
                        ),
                    }
                }
            }
            "front_address" => {
                if let Some(s) = get_str(cx, &src) {
                    match s.parse::<std::net::IpAddr>() {
                        Ok(ip) if !ip.is_unspecified() && !ip.is_loopback() => {
                            n.front_address = Some(ip)
                        }
                        _ => cx.err(
                            src.span(),
                            &src.key,
                            format!("invalid address {s:?}: expected the front's IP address as the other hosts see it, e.g. \"10.0.0.10\""),
                        ),
                    }
                }
            }
            _ => unknown_key(cx, &src, NGINX_KEYS, "[nginx]"),
        }
    }
    // locations may come before upstreams in the file.
    if n.locations == n.upstreams {
        if let Some(src) = upstreams_src {
            cx.err(src.span(), &src.key, "must differ from nginx.locations");
        }
    }
    (cx.errors == before).then_some(n)
}

fn parse_watch(cx: &mut Cx<'_>, sec: Option<&Src<'_>>) -> Option<bool> {
    let Some(sec) = sec else { return Some(true) };
    let Some(t) = sec.item.as_table_like() else {
        type_err(cx, sec, "a table");
        return None;
    };
    let mut enabled = Some(true);
    for src in entries("watch", t) {
        match src.name.as_str() {
            "enabled" => enabled = get_bool(cx, &src),
            _ => unknown_key(cx, &src, WATCH_SECTION_KEYS, "[watch]"),
        }
    }
    enabled
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{errs, ok, one_err, pool_with};
    use pretty_assertions::assert_eq;

    #[test]
    fn duplicate_route_is_reported_at_the_second() {
        let e = errs(
            "[pool.a]\nexec = \"/bin/a\"\nroute = \"/r\"\n[pool.b]\nexec = \"/bin/b\"\nroute = \"/r\"\n",
        );
        assert_eq!(
            e,
            ["t.toml:6:9: pool.b.route: route \"/r\" is already used by pool.a"]
        );
    }

    #[test]
    fn no_pools() {
        assert_eq!(
            errs("[nginx]\n"),
            ["t.toml:1:1: pool: no pools defined: add at least one [pool.NAME] table"]
        );
    }

    #[test]
    fn unknown_top_level_and_typo() {
        let e = errs(&format!("{}\n[pools.x]\nexec = 1\n", pool_with("")));
        assert_eq!(e.len(), 1);
        assert!(e[0].contains("unknown key `pools` in the top level; did you mean `pool`?"));
    }

    #[test]
    fn defaults_errors_reported_once_at_defaults() {
        let text = "[defaults]\nmin = 0\nroute = \"/x\"\nbogus = 1\n\n[pool.a]\nexec = \"/bin/a\"\nroute = \"/a\"\n\n[pool.b]\nexec = \"/bin/b\"\nroute = \"/b\"\n";
        assert_eq!(
            errs(text),
            [
                "t.toml:2:7: defaults.min: must be between 1 and 512, got 0",
                "t.toml:3:1: defaults.route: route cannot be set in [defaults]: every pool needs its own route",
                "t.toml:4:1: defaults.bogus: unknown key `bogus` in [defaults]",
            ]
        );
    }

    #[test]
    fn pool_names() {
        ok("[pool.a_1]\nexec = \"/bin/a\"\nroute = \"/a\"\n");
        ok("[pool.9lives]\nexec = \"/bin/a\"\nroute = \"/a\"\n");
        for bad in ["_a", "A", "a-b", "\"a b\"", "\"\"", &"x".repeat(33)] {
            let e = errs(&format!(
                "[pool.{bad}]\nexec = \"/bin/a\"\nroute = \"/a\"\n"
            ));
            assert_eq!(e.len(), 1, "{bad}: {e:?}");
            assert!(e[0].contains("invalid pool name"), "{bad}: {e:?}");
        }
        ok(&format!(
            "[pool.{}]\nexec = \"/bin/a\"\nroute = \"/a\"\n",
            "x".repeat(32)
        ));
    }

    #[test]
    fn watch_keys() {
        let c = ok(&pool_with(
            "health_path = \"/healthz\"\nhealth_interval = \"1500ms\"\nunhealthy_after = 2",
        ));
        let p = &c.pools["p"];
        assert_eq!(p.health_path.as_deref(), Some("/healthz"));
        assert_eq!(
            (
                p.health_interval.as_str(),
                p.health_timeout.as_str(),
                p.unhealthy_after
            ),
            ("1500ms", "2s", 2)
        );
        assert!(one_err("health_path = \"healthz\"").contains("must start with `/`"));
        assert!(one_err("health_path = \"/a b\"").contains("only letters"));
        assert!(one_err("unhealthy_after = 0").contains("pool.p.unhealthy_after"));
        assert!(one_err("health_timeout = \"0\"").contains("pool.p.health_timeout"));
        assert!(
            errs("[watch]\nenabled = \"yes\"\n[pool.p]\nexec = \"/bin/p\"\nroute = \"/p\"\n")[0]
                .contains("watch.enabled: expected a boolean")
        );
        assert!(
            errs("[watch]\ninterval = 1\n[pool.p]\nexec = \"/bin/p\"\nroute = \"/p\"\n")[0]
                .contains("unknown key `interval` in [watch]")
        );
    }

    #[test]
    fn nginx_section() {
        for (bad, msg) in [
            ("unit = \"nginx\"", "invalid unit name"),
            ("unit = \"ng inx.service\"", "invalid unit name"),
            ("socket_group = \"www data\"", "invalid group name"),
            (
                "check_address = \"192.0.2.1:80\"",
                "expected a loopback host:port",
            ),
            (
                "check_address = \"localhost\"",
                "expected a loopback host:port",
            ),
            (
                "upstreams = \"/etc/nginx/snippets/cgipool-locations.conf\"",
                "must differ",
            ),
        ] {
            let e = errs(&format!(
                "[nginx]\n{bad}\n[pool.p]\nexec = \"/bin/p\"\nroute = \"/p\"\n"
            ));
            assert_eq!(e.len(), 1, "{bad}: {e:?}");
            assert!(e[0].contains(msg), "{bad}: {e:?}");
        }
    }

    #[test]
    fn inline_and_dotted_pools() {
        let c = ok("pool.a = { exec = \"/bin/a\", route = \"/a\" }\n[pool.b]\nexec = \"/bin/b\"\nroute = \"/b\"\n");
        assert_eq!(c.pools.len(), 2);
        let e = errs("pool.a = { exec = \"/bin/a\" }\n");
        assert_eq!(
            e,
            ["t.toml:1:6: pool.a.route: missing required key `route` (e.g. \"/api/NAME\")"]
        );
    }
}
