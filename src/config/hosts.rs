//! Many hosts: the `[host.NAME]` sections (where a pool's workers may run
//! besides the front, the machine that runs `cgipool apply` and nginx) and
//! the checks that tie them to the pools' `hosts` and `port` keys.
//!
//! A host is reached as `systemctl -H` reaches it (`address`, parsed by
//! [`RemoteHost`]); its workers listen on TCP at `listen:port`, which the
//! front's nginx connects to and which only the front's address
//! (`[nginx] front_address`) may reach.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use toml_edit::TableLike;

use super::diag::{entries, get_str, type_err, unknown_key, Cx, Src};
use super::model::{Host, Pool, Queue, LOCAL_HOST};
use super::values::pool_name_ok;
use crate::remote::RemoteHost;

pub(super) const HOST_KEYS: &[&str] = &["address", "listen"];

/// The `[host]` table: every host by name.
pub(super) fn parse_hosts(cx: &mut Cx<'_>, sec: Option<&Src<'_>>) -> BTreeMap<String, Host> {
    let mut hosts = BTreeMap::new();
    let Some(sec) = sec else { return hosts };
    let Some(t) = sec.item.as_table_like() else {
        type_err(cx, sec, "a table of hosts ([host.NAME])");
        return hosts;
    };
    for hsrc in entries("host", t) {
        let name = hsrc.name.clone();
        let at = hsrc.key_span.clone().or_else(|| hsrc.span());
        if name == LOCAL_HOST {
            cx.err(
                at,
                &hsrc.key,
                "`local` is the front (the host running cgipool apply): it needs no [host] section",
            );
            continue;
        }
        if !pool_name_ok(&name) {
            cx.err(
                at,
                &hsrc.key,
                format!(
                    "invalid host name {name:?}: use [a-z0-9][a-z0-9_]*, at most 32 characters"
                ),
            );
            continue;
        }
        let Some(table) = hsrc.item.as_table_like() else {
            type_err(cx, &hsrc, "a table");
            continue;
        };
        if let Some(h) = parse_host(cx, &name, &hsrc, table) {
            hosts.insert(name, h);
        }
    }
    hosts
}

fn parse_host(cx: &mut Cx<'_>, name: &str, hsrc: &Src<'_>, t: &dyn TableLike) -> Option<Host> {
    let before = cx.errors;
    let mut address: Option<RemoteHost> = None;
    let mut listen: Option<(IpAddr, Src<'_>)> = None;
    for src in entries(&hsrc.key, t) {
        match src.name.as_str() {
            "address" => {
                if let Some(s) = get_str(cx, &src) {
                    match s.parse::<RemoteHost>() {
                        Ok(h) => address = Some(h),
                        Err(e) => cx.err(src.span(), &src.key, format!("{e:#}")),
                    }
                }
            }
            "listen" => {
                if let Some(s) = get_str(cx, &src) {
                    match s.parse::<IpAddr>() {
                        Ok(ip) if !ip.is_unspecified() => listen = Some((ip, src.clone())),
                        _ => cx.err(
                            src.span(),
                            &src.key,
                            format!("invalid address {s:?}: expected the host's IP address, e.g. \"10.0.0.11\""),
                        ),
                    }
                }
            }
            _ => unknown_key(cx, &src, HOST_KEYS, &format!("[{}]", hsrc.key)),
        }
    }
    let here = hsrc.key_span.clone().or_else(|| hsrc.span());
    let Some(address) = address else {
        if cx.errors == before {
            cx.err(
                here,
                &format!("{}.address", hsrc.key),
                "missing required key `address` (\"user@host\" or \"user@host:port\", as `systemctl -H` takes it)",
            );
        }
        return None;
    };
    let listen = match listen {
        Some((ip, _)) => ip,
        None => match address.host.parse::<IpAddr>() {
            Ok(ip) => ip,
            Err(_) => {
                cx.err(
                    here,
                    &format!("{}.listen", hsrc.key),
                    format!("{:?} is a name, not an IP address: set `listen` to the address the front reaches it at", address.host),
                );
                return None;
            }
        },
    };
    (cx.errors == before).then(|| Host {
        name: name.to_string(),
        address,
        listen,
    })
}

/// Where each pool's `hosts` and `port` came from, for the cross checks.
pub(super) struct PoolSources<'d> {
    pub(super) hosts: Option<Src<'d>>,
    pub(super) port: Option<Src<'d>>,
    pub(super) header: Option<std::ops::Range<usize>>,
}

/// Every pool's hosts are declared; a pool with a remote host has a
/// `port`, unique among pools, and the shared queue; the front's address is
/// known when any pool runs elsewhere.
pub(super) fn check_pools(
    cx: &mut Cx<'_>,
    hosts: &BTreeMap<String, Host>,
    pools: &BTreeMap<String, Pool>,
    sources: &BTreeMap<String, PoolSources<'_>>,
    front_address: Option<IpAddr>,
    front_at: Option<std::ops::Range<usize>>,
) {
    let mut ports: BTreeMap<u16, &str> = BTreeMap::new();
    let mut any_remote = false;
    for (name, pool) in pools {
        let Some(src) = sources.get(name) else {
            continue;
        };
        let hosts_at = src.hosts.as_ref().and_then(|s| s.span());
        let hosts_key = src
            .hosts
            .as_ref()
            .map_or(format!("pool.{name}.hosts"), |s| s.key.clone());
        if pool.hosts.is_empty() {
            cx.err(
                hosts_at.clone(),
                &hosts_key,
                "names no host: list at least one (\"local\" is the front)",
            );
        }
        let mut seen = BTreeSet::new();
        for h in &pool.hosts {
            if !seen.insert(h) {
                cx.err(
                    hosts_at.clone(),
                    &hosts_key,
                    format!("{h:?} is listed twice"),
                );
            } else if h != LOCAL_HOST && !hosts.contains_key(h) {
                let known: Vec<&str> = hosts.keys().map(String::as_str).collect();
                cx.err(
                    hosts_at.clone(),
                    &hosts_key,
                    format!("no [host.{h}] section (hosts: \"local\" and {known:?})"),
                );
            }
        }
        if !pool.is_remote() {
            continue;
        }
        any_remote = true;
        let here = src.header.clone();
        if pool.queue != Queue::Shared {
            cx.err(
                hosts_at.clone(),
                &hosts_key,
                "workers on other hosts need queue = \"shared\" (one TCP port per pool and host)",
            );
        }
        match (pool.port, &src.port) {
            (None, _) => cx.err(
                here,
                &format!("pool.{name}.port"),
                "missing required key `port`: the TCP port this pool's workers listen on on every other host",
            ),
            (Some(p), psrc) => {
                if let Some(other) = ports.insert(p, name) {
                    let (at, key) = psrc.as_ref().map_or((here, format!("pool.{name}.port")), |s| (s.span(), s.key.clone()));
                    cx.err(at, &key, format!("port {p} is already used by pool.{other}"));
                }
            }
        }
    }
    match front_address {
        None if any_remote => cx.err(
            front_at.or(Some(0..0)),
            "nginx.front_address",
            "missing required key `front_address`: the front's IP address as the other hosts see it (their workers accept connections from it only)",
        ),
        // nginx reaches a host's `listen` address from an address of the
        // same family, and its workers accept only `front_address`.
        Some(front) => {
            for h in hosts.values().filter(|h| h.listen.is_ipv4() != front.is_ipv4()) {
                cx.err(
                    front_at.clone().or(Some(0..0)),
                    "nginx.front_address",
                    format!(
                        "{front} and host {}'s address {} are not of one family (IPv4, IPv6): nginx would connect to it from an address its workers refuse",
                        h.name, h.listen
                    ),
                );
            }
        }
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{errs, ok};
    use pretty_assertions::assert_eq;

    const TWO: &str = "[nginx]\nfront_address = \"10.0.0.10\"\n\n[host.web1]\naddress = \"root@10.0.0.11\"\n\n[host.web2]\naddress = \"root@web2.example:2222\"\nlisten = \"10.0.0.12\"\n\n";

    fn with(pool: &str) -> String {
        format!("{TWO}[pool.p]\nexec = \"/bin/p\"\nroute = \"/p\"\n{pool}\n")
    }

    #[test]
    fn hosts_and_ports_parse() {
        let c = ok(&with(
            "hosts = [\"web1\", \"local\", \"web2\"]\nport = 9001",
        ));
        let p = &c.pools["p"];
        assert_eq!(p.hosts, ["web1", "local", "web2"]);
        assert_eq!(p.port, Some(9001));
        assert!(p.is_remote() && p.on_host("local") && p.on_host("web2"));
        assert_eq!(c.hosts["web1"].listen.to_string(), "10.0.0.11");
        assert_eq!(c.hosts["web2"].listen.to_string(), "10.0.0.12");
        assert_eq!(
            c.hosts["web2"].address.to_string(),
            "root@web2.example:2222"
        );
        assert_eq!(
            c.nginx.front_address.map(|a| a.to_string()).as_deref(),
            Some("10.0.0.10")
        );
        // No hosts key: the front only, no port needed.
        let c = ok(&with(""));
        assert_eq!(c.pools["p"].hosts, ["local"]);
        assert!(!c.pools["p"].is_remote());
        // watch follows other hosts: it may run (the default) or not.
        for watch in ["", "[watch]\nenabled = false\n"] {
            let c = ok(&format!(
                "{watch}{}",
                with("hosts = [\"web1\"]\nport = 9001")
            ));
            assert_eq!(c.watch_enabled, watch.is_empty());
        }
    }

    #[test]
    fn bad_hosts_are_reported_where_they_are_written() {
        assert_eq!(
            errs(&format!("{TWO}[host.web3]\naddress = \"root@web3;reboot\"\n[pool.p]\nexec = \"/bin/p\"\nroute = \"/p\"\n")),
            ["t.toml:12:11: host.web3.address: \"root@web3;reboot\" is not a remote host (expected user@host or user@host:port): the host name contains ';'"]
        );
        assert_eq!(
            errs(&with("hosts = [\"web1\", \"web9\"]\nport = 9001")),
            ["t.toml:14:9: pool.p.hosts: no [host.web9] section (hosts: \"local\" and [\"web1\", \"web2\"])"]
        );
        assert_eq!(
            errs(&with("hosts = [\"web1\"]")),
            ["t.toml:11:7: pool.p.port: missing required key `port`: the TCP port this pool's workers listen on on every other host"]
        );
        let e = errs(&with(
            "hosts = [\"web1\"]\nport = 9001\nqueue = \"per-worker\"",
        ));
        assert!(
            e.len() == 1 && e[0].contains("need queue = \"shared\""),
            "{e:?}"
        );
        let e = errs(&with("port = 80"));
        assert!(
            e.len() == 1 && e[0].contains("pool.p.port: must be between 1024 and 65535"),
            "{e:?}"
        );
        let e = errs("[host.web1]\naddress = \"root@10.0.0.11\"\n[pool.p]\nexec = \"/bin/p\"\nroute = \"/p\"\nhosts = [\"web1\"]\nport = 9001\n");
        assert!(
            e.len() == 1 && e[0].contains("nginx.front_address: missing required key"),
            "{e:?}"
        );
        // An IPv6 host behind an IPv4 front: its sockets would refuse nginx.
        let e = errs(&format!(
            "{}[host.web3]\naddress = \"root@[fd00::13]\"\n[pool.p]\nexec = \"/bin/p\"\nroute = \"/p\"\n",
            TWO
        ));
        assert_eq!(
            e,
            ["t.toml:2:17: nginx.front_address: 10.0.0.10 and host web3's address fd00::13 are not of one family (IPv4, IPv6): nginx would connect to it from an address its workers refuse"]
        );
        let e = errs(&format!(
            "{TWO}[host.local]\naddress = \"x\"\n[pool.p]\nexec = \"/bin/p\"\nroute = \"/p\"\n"
        ));
        assert!(
            e.len() == 1 && e[0].contains("it needs no [host] section"),
            "{e:?}"
        );
        let e = errs(&format!("{TWO}[host.web3]\naddress = \"root@web3.example\"\n[pool.p]\nexec = \"/bin/p\"\nroute = \"/p\"\n"));
        assert!(
            e.len() == 1 && e[0].contains("host.web3.listen: \"web3.example\" is a name"),
            "{e:?}"
        );
        let e = errs(&format!("{TWO}[host.web3]\nlisten = \"10.0.0.13\"\n[pool.p]\nexec = \"/bin/p\"\nroute = \"/p\"\n"));
        assert!(
            e.len() == 1 && e[0].contains("host.web3.address: missing required key"),
            "{e:?}"
        );
        let e = errs(&format!("{TWO}[pool.p]\nexec = \"/bin/p\"\nroute = \"/p\"\nhosts = [\"web1\"]\nport = 9001\n[pool.q]\nexec = \"/bin/q\"\nroute = \"/q\"\nhosts = [\"web2\"]\nport = 9001\n"));
        assert!(
            e.len() == 1 && e[0].contains("pool.q.port: port 9001 is already used by pool.p"),
            "{e:?}"
        );
    }
}
