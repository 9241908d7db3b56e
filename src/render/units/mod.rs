//! The systemd units: askama unit templates and [`units()`], which lays out
//! the unit files and `.wants/` links.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use askama::Template;

use super::{
    finish, header, instance_name, pool_socket_name, service_name, socket_name, target_name, Entry,
    UnitTree, TOP_TARGET, WATCH_UNIT,
};
use crate::config::{Config, ListenFd, Pool, Protocol, Queue};
// The template filters (`exec_arg`, `env_quote`) are looked up as `filters::…`.
use crate::escape::filters;

const TOP_TARGET_BODY: &str = include_str!("../../../units/cgipool.target");

#[derive(Template)]
#[template(path = "watch.service")]
struct WatchTemplate<'a> {
    nginx_unit: &'a str,
    binary: &'a str,
    /// Other hosts are configured: watch reads root's ssh key.
    remote_hosts: bool,
}

#[derive(Template)]
#[template(path = "pool.service")]
struct ServiceTemplate<'a> {
    pool: &'a Pool,
    /// `protocol = "cgi"`: ExecStart runs `cgipool cgi-gateway -- exec args`.
    cgi: bool,
    /// A FastCGI pool whose `exec` is php-cgi.
    php: Option<PhpView>,
    /// `listen_fd = "stdin"`: `StandardInput=socket`.
    stdin: bool,
    /// False only for php-cgi pools with `pcre_jit = true`.
    memory_deny_write_execute: bool,
    /// `queue = "shared"`: the worker inherits the pool's socket.
    shared: bool,
    /// The nice value of each worker's autogroup (0: none is set); see
    /// [`autogroup_nice`].
    autogroup_nice: u8,
}

/// The autogroup nice that makes `workers` sessions weigh together about as
/// much as one session at nice 0 (1024): the kernel's weights fall by about
/// 1.25 per nice step, so each worker gets round(log1.25(workers)), at most
/// 19. systemd starts every service in a session of its own, and while no
/// cpu controller groups the units, the kernel schedules each session as a
/// group of its own (`sched_autogroup_enabled`): a pool of 4 workers would
/// weigh as 4 services against nginx's one, which under load starves nginx
/// and, measured, tripled the CGI pool's p99 against fcgiwrap (whose
/// workers share one session). `max` is the count used: the weights matter
/// only when the CPU is contended, which is when the pool runs near its max.
pub fn autogroup_nice(workers: u32) -> u8 {
    if workers <= 1 {
        return 0;
    }
    (f64::from(workers).ln() / 1.25f64.ln()).round().min(19.0) as u8
}

/// The php-cgi settings the pool's keys give (see templates/pool.service).
struct PhpView {
    /// `max_requests` (0: php-cgi never recycles, like php-fpm's default).
    max_requests: u32,
    /// request_timeout in whole seconds, rounded up: PHP's own limit
    /// (CPU time on Linux) stops a runaway script in the worker.
    max_execution_time: u64,
    /// `body_limit` for post_max_size and upload_max_filesize (none for
    /// nginx's "0", no limit: php's default then applies to uploads).
    body_limit: Option<String>,
    /// `pcre_jit = true`: no `pcre.jit=0`, and MemoryDenyWriteExecute=no.
    pcre_jit: bool,
}

impl PhpView {
    fn new(pool: &Pool) -> Option<PhpView> {
        let f = pool.fastcgi.as_ref().filter(|f| f.php)?;
        let usec = crate::config::duration_usec(&pool.request_timeout).unwrap_or(60_000_000);
        Some(PhpView {
            max_requests: pool.max_requests.unwrap_or(0),
            max_execution_time: usec.div_ceil(1_000_000).max(1),
            body_limit: (pool.body_limit != "0").then(|| pool.body_limit.to_uppercase()),
            pcre_jit: f.pcre_jit,
        })
    }
}

#[derive(Template)]
#[template(path = "pool.socket")]
struct SocketTemplate<'a> {
    pool: &'a Pool,
    socket_group: &'a str,
}

/// `queue = "shared"`: the pool's one socket, inherited by every worker.
#[derive(Template)]
#[template(path = "pool-shared.socket")]
struct SharedSocketTemplate<'a> {
    pool: &'a Pool,
    socket_group: &'a str,
}

/// A pool's shared queue on a host other than the front (render::hosts).
#[derive(Template)]
#[template(path = "pool-tcp.socket")]
struct TcpSocketTemplate<'a> {
    pool: &'a Pool,
    /// `ip:port`, brackets around IPv6.
    listen: String,
    front: std::net::IpAddr,
}

#[derive(Template)]
#[template(path = "pool.target")]
struct TargetTemplate<'a> {
    pool: &'a Pool,
}

/// All unit files and `.wants/` links for `cfg`. `counts` gives the number
/// of workers per pool (the caller clamps to [min, max]); a pool missing
/// from `counts` gets `pool.min`.
/// Only the pools whose `hosts` include the front are rendered (all of them
/// in a config without `[host]` sections); see [`super::host_units`] for the others.
pub fn units(cfg: &Config, unit_dir: &Path, counts: &BTreeMap<String, u32>) -> UnitTree {
    let front = super::on_host(cfg, crate::config::LOCAL_HOST);
    units_with(&front, unit_dir, counts, None)
}

/// The units of every pool in `cfg`, with TCP queues when `tcp` is given.
pub(super) fn units_with(
    cfg: &Config,
    unit_dir: &Path,
    counts: &BTreeMap<String, u32>,
    tcp: Option<&super::hosts::TcpListen>,
) -> UnitTree {
    let header = header();
    let mut entries = BTreeMap::new();
    for (name, pool) in &cfg.pools {
        let service = service_name(name);
        let shared = pool.queue == Queue::Shared;
        let socket = if shared {
            pool_socket_name(name)
        } else {
            socket_name(name)
        };
        let target = target_name(name);
        entries.insert(
            PathBuf::from(&service),
            Entry::File(finish(
                &header,
                ServiceTemplate {
                    pool,
                    cgi: pool.protocol == Protocol::Cgi,
                    php: PhpView::new(pool),
                    stdin: pool
                        .fastcgi
                        .as_ref()
                        .is_some_and(|f| f.listen_fd == ListenFd::Stdin),
                    memory_deny_write_execute: !pool.fastcgi.as_ref().is_some_and(|f| f.pcre_jit),
                    shared,
                    autogroup_nice: autogroup_nice(pool.max),
                }
                .render(),
            )),
        );
        let socket_group = &cfg.nginx.socket_group;
        let socket_unit = if let (Some(tcp), Some(port)) = (tcp, pool.port) {
            TcpSocketTemplate {
                pool,
                listen: std::net::SocketAddr::new(tcp.listen, port).to_string(),
                front: tcp.front,
            }
            .render()
        } else if shared {
            SharedSocketTemplate { pool, socket_group }.render()
        } else {
            SocketTemplate { pool, socket_group }.render()
        };
        entries.insert(
            PathBuf::from(&socket),
            Entry::File(finish(&header, socket_unit)),
        );
        entries.insert(
            PathBuf::from(&target),
            Entry::File(finish(&header, TargetTemplate { pool }.render())),
        );
        let wants = PathBuf::from(format!("{target}.wants"));
        let count = counts.get(name).copied().unwrap_or(pool.min);
        if shared {
            entries.insert(wants.join(&socket), Entry::Link(unit_dir.join(&socket)));
        }
        for n in 1..=count {
            if !shared {
                entries.insert(
                    wants.join(instance_name(name, n, "socket")),
                    Entry::Link(unit_dir.join(&socket)),
                );
            }
            entries.insert(
                wants.join(instance_name(name, n, "service")),
                Entry::Link(unit_dir.join(&service)),
            );
        }
        entries.insert(
            PathBuf::from(format!("{TOP_TARGET}.wants")).join(&target),
            Entry::Link(unit_dir.join(&target)),
        );
    }
    if cfg.watch_enabled {
        let watch = WatchTemplate {
            nginx_unit: &cfg.nginx.unit,
            binary: &crate::paths::cgipool_binary().display().to_string(),
            remote_hosts: !cfg.hosts.is_empty(),
        };
        entries.insert(
            PathBuf::from(WATCH_UNIT),
            Entry::File(finish(&header, watch.render())),
        );
        entries.insert(
            PathBuf::from(format!("{TOP_TARGET}.wants")).join(WATCH_UNIT),
            Entry::Link(unit_dir.join(WATCH_UNIT)),
        );
    }
    entries.insert(
        PathBuf::from(TOP_TARGET),
        Entry::File(finish(&header, Ok(TOP_TARGET_BODY.to_string()))),
    );
    entries.insert(
        PathBuf::from("multi-user.target.wants").join(TOP_TARGET),
        Entry::Link(unit_dir.join(TOP_TARGET)),
    );
    UnitTree { entries }
}

#[cfg(test)]
mod tests;
