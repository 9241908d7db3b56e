//! A pool's fields as parsed ([`PoolFields`], [`apply_field`]) and
//! assembling a [`Pool`] with its defaults ([`parse_pool`]). The key
//! tables and `environment` are in `keys`.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::PathBuf;

use toml_edit::{Item, TableLike};

use super::diag::{entries, get_bool, get_str, get_str_list, get_u32, type_err, Cx, Src};
use super::duration::{format_nginx_usec, format_systemd_usec};
use super::fastcgi::{self, FastCgiFields};
use super::keys::{check_pool_key, key_fits, parse_env};
use super::model::{Pool, Protocol, Queue, MAX_WORKERS};
use super::values::{
    get_abs_path, get_abs_path_list, get_duration, get_program_path, health_path_problem,
    memory_ok, nginx_size_ok, percent, positive, rate_ok, route_problem, user_name_ok,
};

/// Fewest requests `max_requests` allows: every recycle is a start, and
/// systemd fails a worker after 20 starts within 10 s (StartLimitBurst in
/// pool.service), so a worker recycling after N requests may serve at most
/// 2·N requests per second.
pub(super) const MIN_MAX_REQUESTS: u32 = 5000;

/// Pool values as parsed; None = not given (or invalid, then an error was
/// reported).
#[derive(Default)]
pub(super) struct PoolFields {
    exec: Option<PathBuf>,
    args: Option<Vec<String>>,
    description: Option<String>,
    route: Option<String>,
    min: Option<(u32, Option<Range<usize>>, String)>,
    max: Option<u32>,
    notify: Option<bool>,
    watchdog_sec: Option<String>,
    restart_sec: Option<String>,
    runtime_max_sec: Option<String>,
    memory_max: Option<String>,
    cpu_quota: Option<String>,
    tasks_max: Option<String>,
    user: Option<String>,
    read_write_paths: Option<Vec<PathBuf>>,
    read_only_paths: Option<Vec<PathBuf>>,
    private_network: Option<bool>,
    access_log: Option<bool>,
    keepalive: Option<bool>,
    keepalive_at: Option<(Option<Range<usize>>, String)>,
    reap_abandoned: Option<bool>,
    protocol: Option<Protocol>,
    queue: Option<Queue>,
    gateway: Option<PathBuf>,
    working_directory: Option<PathBuf>,
    request_timeout: Option<String>,
    body_limit: Option<String>,
    scale_up_after: Option<String>,
    scale_down_after: Option<String>,
    health_path: Option<String>,
    health_interval: Option<String>,
    health_timeout: Option<String>,
    unhealthy_after: Option<u32>,
    rate_limit: Option<String>,
    burst: Option<u32>,
    max_connections: Option<u32>,
    max_requests: Option<u32>,
    slow_request: Option<String>,
    hosts: Option<Vec<String>>,
    port: Option<u16>,
    gateway_at: Option<(Option<Range<usize>>, String)>,
    notify_at: Option<(bool, Option<Range<usize>>, String)>,
    fastcgi: FastCgiFields,
}

/// Parse one known pool key (not environment) into `f`.
pub(super) fn apply_field(cx: &mut Cx<'_>, f: &mut PoolFields, src: &Src<'_>) {
    let sp = src.span();
    let key = src.key.as_str();
    match src.name.as_str() {
        "exec" => f.exec = get_program_path(cx, src),
        "args" => f.args = get_str_list(cx, src).map(|l| l.into_iter().map(|(s, _)| s).collect()),
        "description" => {
            if let Some(s) = get_str(cx, src) {
                let s = s.trim().to_string();
                if s.ends_with('\\') {
                    cx.err(sp, key, "must not end with a backslash");
                } else {
                    f.description = Some(s);
                }
            }
        }
        "route" => {
            if let Some(s) = get_str(cx, src) {
                if let Some(msg) = route_problem(&s) {
                    cx.err(sp, key, msg);
                } else {
                    f.route = Some(s);
                }
            }
        }
        "min" => f.min = get_u32(cx, src, 1, MAX_WORKERS).map(|v| (v, sp, key.to_string())),
        "max" => f.max = get_u32(cx, src, 1, MAX_WORKERS),
        "notify" => {
            f.notify = get_bool(cx, src);
            f.notify_at = f.notify.map(|b| (b, sp, key.to_string()));
        }
        "watchdog_sec" => f.watchdog_sec = get_duration(cx, src, false).map(format_systemd_usec),
        "restart_sec" => f.restart_sec = get_duration(cx, src, true).map(format_systemd_usec),
        "scale_up_after" => {
            f.scale_up_after = get_duration(cx, src, false).map(format_systemd_usec)
        }
        "scale_down_after" => {
            f.scale_down_after = get_duration(cx, src, false).map(format_systemd_usec)
        }
        "runtime_max_sec" => {
            if src.item.as_str() == Some("infinity") {
                f.runtime_max_sec = Some("infinity".to_string());
            } else {
                f.runtime_max_sec = get_duration(cx, src, false).map(format_systemd_usec);
            }
        }
        "request_timeout" => {
            if let Some(us) = get_duration(cx, src, false) {
                if format_nginx_usec(us).is_some() {
                    f.request_timeout = Some(format_systemd_usec(us));
                } else {
                    cx.err(
                        sp,
                        key,
                        "must be a whole number of milliseconds (nginx's resolution)",
                    );
                }
            }
        }
        "memory_max" => {
            if let Some(s) = get_str(cx, src) {
                if memory_ok(&s) {
                    f.memory_max = Some(s);
                } else {
                    cx.err(
                        sp,
                        key,
                        format!("invalid memory size {s:?}: use e.g. \"256M\", \"1G\", \"50%\" or \"infinity\""),
                    );
                }
            }
        }
        "cpu_quota" => {
            if let Some(s) = get_str(cx, src) {
                if percent(&s).is_some_and(|p| p > 0 && p <= 100_000) {
                    f.cpu_quota = Some(s);
                } else {
                    cx.err(
                        sp,
                        key,
                        format!("invalid CPU quota {s:?}: use a percentage of one CPU, e.g. \"50%\" or \"200%\""),
                    );
                }
            }
        }
        "tasks_max" => {
            if let Some(i) = src.item.as_integer() {
                if i >= 1 {
                    f.tasks_max = Some(i.to_string());
                } else {
                    cx.err(sp, key, format!("must be at least 1, got {i}"));
                }
            } else if src.item.is_str() {
                if let Some(s) = get_str(cx, src) {
                    if s == "infinity" || positive(&s) {
                        f.tasks_max = Some(s);
                    } else {
                        cx.err(
                            sp,
                            key,
                            format!("expected an integer or \"infinity\", got {s:?}"),
                        );
                    }
                }
            } else {
                type_err(cx, src, "an integer or \"infinity\"");
            }
        }
        "user" => {
            if let Some(s) = get_str(cx, src) {
                if user_name_ok(&s) {
                    f.user = Some(s);
                } else {
                    cx.err(
                        sp,
                        key,
                        format!(
                            "invalid user name {s:?}: use [a-z_][a-z0-9_-]*, at most 32 characters"
                        ),
                    );
                }
            }
        }
        "read_write_paths" => f.read_write_paths = get_abs_path_list(cx, src),
        "read_only_paths" => f.read_only_paths = get_abs_path_list(cx, src),
        "private_network" => f.private_network = get_bool(cx, src),
        "access_log" => f.access_log = get_bool(cx, src),
        "keepalive" => {
            f.keepalive = get_bool(cx, src);
            f.keepalive_at = Some((sp, key.to_string()));
        }
        "reap_abandoned" => f.reap_abandoned = get_bool(cx, src),
        "protocol" => {
            if let Some(s) = get_str(cx, src) {
                let p = protocol_named(&s);
                match p {
                    Some(_) => f.protocol = p,
                    None => cx.err(
                        sp,
                        key,
                        format!("expected \"http\", \"cgi\" or \"fastcgi\", got {s:?}"),
                    ),
                }
            }
        }
        "queue" => {
            if let Some(s) = get_str(cx, src) {
                match s.as_str() {
                    "shared" => f.queue = Some(Queue::Shared),
                    "per-worker" => f.queue = Some(Queue::PerWorker),
                    _ => cx.err(
                        sp,
                        key,
                        format!("expected \"shared\" or \"per-worker\", got {s:?}"),
                    ),
                }
            }
        }
        "gateway" => {
            f.gateway = get_program_path(cx, src);
            f.gateway_at = Some((sp, key.to_string()));
        }
        "working_directory" => f.working_directory = get_abs_path(cx, src),
        "body_limit" => {
            if let Some(s) = get_str(cx, src) {
                if nginx_size_ok(&s) {
                    f.body_limit = Some(s);
                } else {
                    cx.err(
                        sp,
                        key,
                        format!("invalid size {s:?}: use nginx syntax, e.g. \"1m\", \"512k\""),
                    );
                }
            }
        }
        "rate_limit" => {
            if let Some(s) = get_str(cx, src) {
                if rate_ok(&s) {
                    f.rate_limit = Some(s);
                } else {
                    cx.err(
                        sp,
                        key,
                        format!("invalid rate {s:?}: use e.g. \"20r/s\" or \"600r/m\""),
                    );
                }
            }
        }
        "burst" => f.burst = get_u32(cx, src, 0, 1_000_000),
        // nginx's limit_conn takes at most 65535.
        "max_connections" => f.max_connections = get_u32(cx, src, 1, 65_535),
        "health_path" => {
            if let Some(s) = get_str(cx, src) {
                match health_path_problem(&s) {
                    Some(msg) => cx.err(sp, key, msg),
                    None => f.health_path = Some(s),
                }
            }
        }
        "health_interval" => {
            f.health_interval = get_duration(cx, src, false).map(format_systemd_usec)
        }
        "health_timeout" => {
            f.health_timeout = get_duration(cx, src, false).map(format_systemd_usec)
        }
        "unhealthy_after" => f.unhealthy_after = get_u32(cx, src, 1, 1000),
        "slow_request" => f.slow_request = get_duration(cx, src, false).map(format_systemd_usec),
        "max_requests" => match src.item.as_integer() {
            Some(i) if i >= i64::from(MIN_MAX_REQUESTS) && i <= i64::from(u32::MAX) => {
                f.max_requests = u32::try_from(i).ok()
            }
            Some(i) => cx.err(
                sp,
                key,
                format!("must be at least {MIN_MAX_REQUESTS}, got {i}: every recycle is a start, and systemd fails a worker after 20 starts within 10 s (a worker may serve at most 2 x max_requests requests per second)"),
            ),
            None => type_err(cx, src, "an integer"),
        },
        "hosts" => f.hosts = get_str_list(cx, src).map(|l| l.into_iter().map(|(s, _)| s).collect()),
        "port" => f.port = get_u32(cx, src, 1024, 65535).and_then(|p| u16::try_from(p).ok()),
        k if fastcgi::FASTCGI_KEYS.contains(&k) => fastcgi::apply_field(cx, &mut f.fastcgi, src),
        _ => {}
    }
}

fn protocol_named(s: &str) -> Option<Protocol> {
    match s {
        "http" => Some(Protocol::Http),
        "cgi" => Some(Protocol::Cgi),
        "fastcgi" => Some(Protocol::FastCgi),
        _ => None,
    }
}

pub(super) fn parse_pool(
    cx: &mut Cx<'_>,
    name: &str,
    psrc: &Src<'_>,
    table: &dyn TableLike,
    defaults: &[&Src<'_>],
    default_env: &[(String, String)],
) -> Option<Pool> {
    let errors_before = cx.errors;
    let own = entries(&psrc.key, table);
    let mut f = PoolFields::default();
    // `[defaults]` keys of another protocol's pools are left out here.
    let protocol = own
        .iter()
        .chain(defaults.iter().copied())
        .find(|s| s.name == "protocol")
        .and_then(|s| s.item.as_str().and_then(protocol_named))
        .unwrap_or(Protocol::Http);
    for src in defaults.iter().filter(|s| key_fits(&s.name, protocol)) {
        apply_field(cx, &mut f, src);
    }
    let mut environment: BTreeMap<String, String> = default_env.iter().cloned().collect();
    let mut has_exec = defaults.iter().any(|s| s.name == "exec");
    let mut has_route = false;
    for src in &own {
        let k = src.name.as_str();
        if k == "environment" {
            if let Some(env) = parse_env(cx, src) {
                environment.extend(env);
            }
            continue;
        }
        if !check_pool_key(cx, src, &format!("[{}]", psrc.key)) {
            continue;
        }
        match k {
            "exec" => has_exec = true,
            "route" => has_route = true,
            _ => {}
        }
        apply_field(cx, &mut f, src);
    }
    // Where to point at for "missing key": the [pool.NAME] header.
    let here = table_span(psrc);
    if !has_exec {
        cx.err(
            here.clone(),
            &format!("{}.exec", psrc.key),
            "missing required key `exec` (absolute path of the worker program)",
        );
    }
    if !has_route {
        cx.err(
            here,
            &format!("{}.route", psrc.key),
            "missing required key `route` (e.g. \"/api/NAME\")",
        );
    }
    let min = f.min.as_ref().map_or(2, |m| m.0);
    let max = f.max.unwrap_or(5);
    if min > max {
        let (span, key) = match &f.min {
            Some((_, span, key)) => (span.clone(), key.clone()),
            None => (here_or(psrc), format!("{}.min", psrc.key)),
        };
        cx.err(
            span,
            &key,
            format!("min ({min}) must not be greater than max ({max})"),
        );
    }
    if f.protocol == Some(Protocol::Cgi) && f.gateway.is_none() {
        if let Err(msg) = super::values::own_binary() {
            cx.err(
                here_or(psrc),
                &format!("{}.gateway", psrc.key),
                format!("{msg}, or set `gateway`"),
            );
        }
    }
    if f.protocol == Some(Protocol::Cgi) && (f.notify == Some(true) || f.watchdog_sec.is_some()) {
        cx.err(
            here_or(psrc),
            &format!("{}.protocol", psrc.key),
            "notify and watchdog_sec are not available for protocol = \"cgi\" (the gateway does not send READY=1 or WATCHDOG=1)",
        );
    }
    if f.protocol == Some(Protocol::Cgi) && f.reap_abandoned.is_some() {
        cx.err(
            here_or(psrc),
            &format!("{}.reap_abandoned", psrc.key),
            "reap_abandoned is not for protocol = \"cgi\" (the gateway kills its programs at request_timeout itself)",
        );
    }
    let protocol = f.protocol.unwrap_or(Protocol::Http);
    if let (Protocol::FastCgi, Some((span, key))) = (protocol, &f.gateway_at) {
        cx.err(
            span.clone(),
            key,
            "`gateway` is only for protocol = \"cgi\" pools (a FastCGI worker serves its socket itself)",
        );
    }
    if let (Protocol::Cgi | Protocol::FastCgi, Some((span, key))) = (protocol, &f.keepalive_at) {
        cx.err(
            span.clone(),
            key,
            "`keepalive` is only for protocol = \"http\" pools (a CGI gateway gets a connection per request; a FastCGI pool has keep_conn)",
        );
    }
    let fastcgi = fastcgi::finish(
        cx,
        std::mem::take(&mut f.fastcgi),
        protocol,
        f.exec.as_deref(),
        name,
        f.user.is_none(),
        f.notify_at.clone(),
        (here_or(psrc), psrc.key.clone()),
    );
    if cx.errors != errors_before {
        return None;
    }
    let rate_limit = f.rate_limit;
    let burst = f.burst.unwrap_or(if rate_limit.is_some() { 10 } else { 0 });
    Some(Pool {
        name: name.to_string(),
        exec: f.exec?,
        args: f.args.unwrap_or_default(),
        description: f.description.unwrap_or_default(),
        environment,
        route: f.route?,
        min,
        max,
        notify: f.notify.unwrap_or(false),
        watchdog_sec: f.watchdog_sec,
        restart_sec: f.restart_sec.unwrap_or_else(|| "100ms".to_string()),
        runtime_max_sec: f.runtime_max_sec,
        memory_max: f.memory_max.unwrap_or_else(|| "256M".to_string()),
        cpu_quota: f.cpu_quota,
        tasks_max: f.tasks_max.unwrap_or_else(|| "64".to_string()),
        user: f.user,
        read_write_paths: f.read_write_paths.unwrap_or_default(),
        read_only_paths: f.read_only_paths.unwrap_or_default(),
        private_network: f.private_network.unwrap_or(true),
        access_log: f.access_log.unwrap_or(false),
        keepalive: protocol == Protocol::Http && f.keepalive.unwrap_or(true),
        reap_abandoned: f.reap_abandoned.unwrap_or(true),
        protocol,
        queue: f.queue.unwrap_or(Queue::Shared),
        gateway: f.gateway.unwrap_or_else(crate::paths::cgipool_binary),
        working_directory: f.working_directory,
        request_timeout: f.request_timeout.unwrap_or_else(|| "60s".to_string()),
        body_limit: f.body_limit.unwrap_or_else(|| "1m".to_string()),
        rate_limit,
        burst,
        max_connections: f.max_connections,
        scale_up_after: f.scale_up_after.unwrap_or_else(|| "2s".to_string()),
        scale_down_after: f.scale_down_after.unwrap_or_else(|| "30s".to_string()),
        health_path: f.health_path,
        health_interval: f.health_interval.unwrap_or_else(|| "5s".to_string()),
        health_timeout: f.health_timeout.unwrap_or_else(|| "2s".to_string()),
        unhealthy_after: f.unhealthy_after.unwrap_or(3),
        max_requests: f.max_requests,
        slow_request: f.slow_request,
        fastcgi,
        hosts: f
            .hosts
            .unwrap_or_else(|| vec![super::model::LOCAL_HOST.to_string()]),
        port: f.port,
    })
}

fn table_span(psrc: &Src<'_>) -> Option<Range<usize>> {
    match psrc.item {
        Item::Table(t) => t.span().or_else(|| psrc.key_span.clone()),
        _ => psrc.key_span.clone().or_else(|| psrc.item.span()),
    }
}

fn here_or(psrc: &Src<'_>) -> Option<Range<usize>> {
    table_span(psrc)
}
