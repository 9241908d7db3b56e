//! Many hosts: what each host gets (the pools whose `hosts` name it) and
//! how the front's nginx reaches the workers elsewhere. The front keeps its
//! unix sockets; on another host a pool's shared queue is a TCP socket at
//! `listen:port` that accepts connections from the front's address only.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use super::units::units_with;
use super::UnitTree;
use crate::config::{Config, Host, Pool, LOCAL_HOST};

/// A pool's queue on a host other than the front.
pub(super) struct TcpListen {
    /// The host's own address (`[host.NAME] listen`).
    pub(super) listen: IpAddr,
    /// The only address that may connect (`[nginx] front_address`).
    pub(super) front: IpAddr,
}

/// `cfg` as one host sees it: the pools that run there; watch runs on the
/// front only.
pub fn on_host(cfg: &Config, host: &str) -> Config {
    let mut view = cfg.clone();
    view.pools.retain(|_, p| p.on_host(host));
    if host != LOCAL_HOST {
        view.watch_enabled = false;
    }
    view
}

/// The unit files and links of a host other than the front (each pool at
/// its count from `counts`, or its `min`).
pub fn host_units(
    cfg: &Config,
    host: &Host,
    unit_dir: &Path,
    counts: &BTreeMap<String, u32>,
) -> UnitTree {
    // Validated: a config with a remote pool has a front address. Without
    // one no pool runs on `host`, and the tree has no socket to protect.
    let front = cfg
        .nginx
        .front_address
        .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
    let tcp = TcpListen {
        listen: host.listen,
        front,
    };
    units_with(&on_host(cfg, &host.name), unit_dir, counts, Some(&tcp))
}

/// The `ip:port` nginx connects to for `pool` on each host other than the
/// front, in the order of its `hosts`.
pub fn remote_servers(cfg: &Config, pool: &Pool) -> Vec<String> {
    let Some(port) = pool.port else {
        return Vec::new();
    };
    pool.hosts
        .iter()
        .filter_map(|h| cfg.hosts.get(h))
        .map(|h| SocketAddr::new(h.listen, port).to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::tests::{cfg, check_golden, line, rendered, unit_file};
    use crate::render::{nginx, units};
    use pretty_assertions::assert_eq;

    /// A pool on two worker hosts and the front, one on a worker host only,
    /// one on the front only.
    pub(in crate::render) const HOSTS: &str = r#"
[watch]
enabled = false

[nginx]
front_address = "fd00::10"

[host.web1]
address = "root@[fd00::11]"

[host.web2]
address = "deploy@web2.example:2222"
listen = "fd00::12"

[pool.hello]
exec = "/usr/lib/cgipool/examples/hello.py"
route = "/hello"
hosts = ["web1", "web2", "local"]
port = 9101
min = 1

[pool.search]
exec = "/usr/lib/cgipool/search"
route = "/api/search"
hosts = ["web2"]
port = 9102
min = 1

[pool.auth]
exec = "/usr/lib/cgipool/auth"
route = "/api/auth"
min = 1
"#;

    #[test]
    fn golden_hosts() {
        let c = cfg("/etc/cgipool/hosts.toml", HOSTS);
        let front_active = BTreeMap::from([
            ("hello".to_string(), vec![1]),
            ("auth".to_string(), vec![1]),
        ]);
        let mut files = rendered(&c, &front_active);
        for h in c.hosts.values() {
            let tree = host_units(&c, h, Path::new("/etc/systemd/system"), &BTreeMap::new());
            for (k, v) in crate::render::tests::tree_files(&tree) {
                files.insert(format!("{}/{k}", h.name), v);
            }
        }
        check_golden("hosts", &files);
    }

    #[test]
    fn each_host_gets_its_pools_and_only_the_front_routes() {
        let c = cfg("/etc/cgipool/hosts.toml", HOSTS);
        let dir = Path::new("/etc/systemd/system");
        let front = units(&c, dir, &BTreeMap::new());
        assert!(front
            .entries
            .contains_key(Path::new("cgipool-hello.socket")));
        assert!(!front
            .entries
            .contains_key(Path::new("cgipool-watch.service")));
        assert!(!front
            .entries
            .contains_key(Path::new("cgipool-search@.service")));
        let web2 = host_units(&c, &c.hosts["web2"], dir, &BTreeMap::new());
        assert!(!web2
            .entries
            .contains_key(Path::new("cgipool-auth@.service")));
        assert!(!web2
            .entries
            .contains_key(Path::new("cgipool-watch.service")));
        let sock = unit_file(&web2, "cgipool-search.socket");
        assert_eq!(
            line(&sock, "ListenStream="),
            ["ListenStream=[fd00::12]:9102"]
        );
        assert_eq!(
            line(&sock, "IPAddress"),
            ["IPAddressAllow=fd00::10", "IPAddressDeny=any"]
        );
        let web1 = host_units(
            &c,
            &c.hosts["web1"],
            dir,
            &BTreeMap::from([("hello".to_string(), 3)]),
        );
        assert_eq!(
            line(&unit_file(&web1, "cgipool-hello.socket"), "ListenStream="),
            ["ListenStream=[fd00::11]:9101"]
        );
        assert!(web1.entries.contains_key(Path::new(
            "cgipool-hello.target.wants/cgipool-hello@3.service"
        )));
        // The front routes to every host, its own workers over the unix socket.
        let ng = nginx(&c, &BTreeMap::new());
        assert!(
            ng.upstreams
                .contains("server [fd00::11]:9101 max_fails=1 fail_timeout=5s;"),
            "{}",
            ng.upstreams
        );
        assert!(
            ng.upstreams
                .contains("server [fd00::12]:9102 max_fails=1 fail_timeout=5s;"),
            "{}",
            ng.upstreams
        );
        assert!(!ng.upstreams.contains("unix:"), "{}", ng.upstreams);
        // A dead host costs a request 1 s before nginx tries the next one,
        // and every nginx worker skips it for 5 s (the zone shares it).
        assert!(
            ng.upstreams.contains("zone cgipool_hello "),
            "{}",
            ng.upstreams
        );
        assert!(
            ng.locations.contains("proxy_connect_timeout 1s;"),
            "{}",
            ng.locations
        );
        assert!(!ng.upstreams.contains("cgipool_auth"), "{}", ng.upstreams);
    }

    #[test]
    fn watch_sees_roots_ssh_directory_only_when_other_hosts_are_configured() {
        let dir = Path::new("/etc/systemd/system");
        let c = cfg(
            "/etc/cgipool/hosts.toml",
            &HOSTS.replace("[watch]\nenabled = false\n", ""),
        );
        let w = unit_file(&units(&c, dir, &BTreeMap::new()), "cgipool-watch.service");
        assert_eq!(line(&w, "ProtectHome="), ["ProtectHome=tmpfs"]);
        assert_eq!(
            line(&w, "BindReadOnlyPaths="),
            ["BindReadOnlyPaths=-/root/.ssh"]
        );
        let demo = cfg("examples/demo.toml", crate::render::tests::DEMO);
        let w = unit_file(
            &units(&demo, dir, &BTreeMap::new()),
            "cgipool-watch.service",
        );
        assert_eq!(line(&w, "ProtectHome="), ["ProtectHome=yes"]);
        assert!(line(&w, "BindReadOnlyPaths=").is_empty());
    }

    #[test]
    fn one_host_configs_render_as_before() {
        let c = cfg("examples/demo.toml", crate::render::tests::DEMO);
        assert_eq!(on_host(&c, LOCAL_HOST), c);
        assert!(on_host(&c, "web1").pools.is_empty());
    }
}
