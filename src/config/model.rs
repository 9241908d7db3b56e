//! The validated configuration model, with the defaults and limits that
//! parsing applies.

use std::collections::BTreeMap;
use std::path::PathBuf;

pub const DEFAULT_CONFIG: &str = "/etc/cgipool/cgipool.toml";

pub const DEFAULT_UPSTREAMS: &str = "/etc/nginx/conf.d/cgipool-upstreams.conf";
pub const DEFAULT_LOCATIONS: &str = "/etc/nginx/snippets/cgipool-locations.conf";

/// Routes cgipool keeps for itself (exact, or as a prefix for `/.cgipool`).
pub const RESERVED_ROUTES: &[&str] = &["/pool-status", "/metrics", "/.cgipool"];

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The config path as given (used in the headers of generated files).
    pub source: PathBuf,
    pub nginx: Nginx,
    pub watch_enabled: bool,
    pub pools: BTreeMap<String, Pool>,
    /// The `[host.NAME]` sections: hosts other than the front.
    pub hosts: BTreeMap<String, Host>,
}

impl Config {
    /// No pools, no hosts, nginx's defaults: what nothing applied looks like
    /// (a config file needs at least one pool).
    pub fn empty(source: &std::path::Path) -> Config {
        Config {
            source: source.to_path_buf(),
            nginx: Nginx::default(),
            watch_enabled: false,
            pools: BTreeMap::new(),
            hosts: BTreeMap::new(),
        }
    }
}

/// The name of the front (the host running `cgipool apply` and nginx) in a
/// pool's `hosts`.
pub const LOCAL_HOST: &str = "local";

/// A host other than the front (`[host.NAME]`, config::hosts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub name: String,
    /// How ssh and the remote transport reach it.
    pub address: crate::remote::RemoteHost,
    /// The IP address its workers listen on and nginx connects to.
    pub listen: std::net::IpAddr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nginx {
    pub upstreams: PathBuf,
    pub locations: PathBuf,
    pub unit: String,
    pub socket_group: String,
    /// host:port where cgipool reaches nginx over HTTP on loopback to read
    /// `/.cgipool/generation` after a reload.
    pub check_address: String,
    /// The front's IP address as other hosts see it: their worker sockets
    /// accept connections from it only (`IPAddressAllow=`).
    pub front_address: Option<std::net::IpAddr>,
}

/// `[nginx]` when the config leaves a key out.
impl Default for Nginx {
    fn default() -> Nginx {
        Nginx {
            upstreams: PathBuf::from(DEFAULT_UPSTREAMS),
            locations: PathBuf::from(DEFAULT_LOCATIONS),
            unit: "nginx.service".to_string(),
            socket_group: "www-data".to_string(),
            check_address: "127.0.0.1:80".to_string(),
            front_address: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http,
    Cgi,
    FastCgi,
}

/// How a FastCGI worker gets its listening socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ListenFd {
    /// fd 3 with `LISTEN_FDS=1` (sd_listen_fds), as for every other pool.
    Systemd,
    /// fd 0 (`StandardInput=socket`): php-cgi and programs built on libfcgi.
    Stdin,
}

/// What a `protocol = "fastcgi"` pool adds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FastCgi {
    pub listen_fd: ListenFd,
    /// nginx `fastcgi_keep_conn on`: only for workers that multiplex
    /// connections (never php-cgi).
    pub keep_conn: bool,
    /// PHP-style routing: nginx serves the static files under the route
    /// from here and passes `*.php` to the pool.
    pub document_root: Option<PathBuf>,
    pub index: String,
    /// `exec` is php-cgi: PHP_FCGI_CHILDREN=0, a shared dynamic user,
    /// session and upload directories, ini settings from the pool.
    pub php: bool,
    /// php-cgi only: PCRE's JIT on, which needs `MemoryDenyWriteExecute=no`
    /// (off by default: `pcre.jit=0` keeps the sandbox whole).
    pub pcre_jit: bool,
}

/// How a pool's connections queue for its workers (`queue`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Queue {
    /// One socket unit per pool (`cgipool-<pool>.socket`) that every worker
    /// inherits: the kernel hands each connection to the next worker that
    /// accepts; nginx's upstream names that one socket.
    Shared,
    /// A socket unit per worker (`cgipool-<pool>@<n>.socket`); nginx's
    /// upstream lists every routed worker.
    PerWorker,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    pub name: String,
    pub exec: PathBuf,
    pub args: Vec<String>,
    pub description: String,
    pub environment: BTreeMap<String, String>,
    pub route: String,
    pub min: u32,
    pub max: u32,
    pub notify: bool,
    /// Normalised systemd duration.
    pub watchdog_sec: Option<String>,
    /// Normalised systemd duration.
    pub restart_sec: String,
    /// Normalised systemd duration or "infinity".
    pub runtime_max_sec: Option<String>,
    pub memory_max: String,
    pub cpu_quota: Option<String>,
    pub tasks_max: String,
    pub user: Option<String>,
    pub read_write_paths: Vec<PathBuf>,
    pub read_only_paths: Vec<PathBuf>,
    pub private_network: bool,
    /// The workers log one line per request (`CGIPOOL_ACCESS_LOG=1`);
    /// errors are logged either way.
    pub access_log: bool,
    /// nginx keeps idle connections to the workers: `protocol = "http"`
    /// pools unless `keepalive = false`; never set for the other protocols,
    /// whose rule is their queue's (render::nginx).
    pub keepalive: bool,
    /// watch kills a worker still on a request nginx gave up on (src/watch/reaper.rs).
    pub reap_abandoned: bool,
    pub protocol: Protocol,
    pub queue: Queue,
    /// The cgipool binary whose `cgi-gateway` subcommand runs a
    /// `protocol = "cgi"` pool's program (unused for "http" pools).
    pub gateway: PathBuf,
    pub working_directory: Option<PathBuf>,
    /// Normalised systemd duration (render converts it to nginx syntax).
    pub request_timeout: String,
    pub body_limit: String,
    pub rate_limit: Option<String>,
    pub burst: u32,
    pub max_connections: Option<u32>,
    /// Normalised systemd duration: how long the pool must be saturated
    /// before `cgipool watch` grows it.
    pub scale_up_after: String,
    /// Normalised systemd duration: how long the pool must be idle before
    /// `cgipool watch` shrinks it.
    pub scale_down_after: String,
    /// Path `cgipool watch` probes on each worker's socket (none: no probe).
    pub health_path: Option<String>,
    /// Normalised systemd durations.
    pub health_interval: String,
    pub health_timeout: String,
    /// Failed probes in a row before a worker is taken out and restarted.
    pub unhealthy_after: u32,
    /// Requests a worker serves before it exits and systemd starts a fresh
    /// one (`CGIPOOL_MAX_REQUESTS`, and `PHP_FCGI_MAX_REQUESTS` for php-cgi).
    pub max_requests: Option<u32>,
    /// Normalised systemd duration: watch logs (once) and counts requests
    /// a worker reports running longer (None: off).
    pub slow_request: Option<String>,
    /// Some iff `protocol = "fastcgi"`.
    pub fastcgi: Option<FastCgi>,
    /// Where the workers run: [`LOCAL_HOST`] and `[host.NAME]` names; each
    /// host runs the pool's count of workers (min/max are per host).
    pub hosts: Vec<String>,
    /// The TCP port the workers listen on on hosts other than the front.
    pub port: Option<u16>,
}

/// How nginx tells two locations apart when it looks for duplicates: `=`
/// locations among themselves, prefix locations (with or without `^~`)
/// among themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LocationKind {
    Exact,
    Prefix,
}

impl Pool {
    /// Every location nginx may get for this pool's route (render::nginx):
    /// the route as a prefix (every pool, and a pool without workers); with
    /// PHP-style routing (`document_root`) also `^~ /blog/` and `= /blog`
    /// (the redirect; none for `/`).
    pub fn nginx_locations(&self) -> Vec<(LocationKind, String)> {
        let mut v = vec![(LocationKind::Prefix, self.route.clone())];
        if self
            .fastcgi
            .as_ref()
            .is_some_and(|f| f.document_root.is_some())
        {
            let base = self.route.trim_end_matches('/');
            v.push((LocationKind::Prefix, format!("{base}/")));
            if !base.is_empty() {
                v.push((LocationKind::Exact, base.to_string()));
            }
        }
        v.sort();
        v.dedup();
        v
    }

    /// True when some of the workers run on a host other than the front.
    pub fn is_remote(&self) -> bool {
        self.hosts.iter().any(|h| h != LOCAL_HOST)
    }

    /// True when `host` ([`LOCAL_HOST`] for the front) runs workers of this pool.
    pub fn on_host(&self, host: &str) -> bool {
        self.hosts.iter().any(|h| h == host)
    }
}

pub const MAX_POOL_NAME: usize = 32;
pub const MAX_WORKERS: u32 = 512;
