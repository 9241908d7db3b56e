//! How many requests wait for a pool's workers, read from the sock_diag
//! queues: on the pool's one socket (shared queue) or on every worker's
//! socket, and what watch's log lines say about them.
//!
//! A pool that also runs on other hosts (`hosts`) is sampled as a whole:
//! its front's queue plus, for each other host that answers and runs it,
//! the requests the front's nginx sent there beyond that host's workers
//! (its TCP connections to the host's queue, one per request, less the
//! pool's count: a worker serves one at a time). The count is per host, so
//! one decision scales every host.
use super::hosts::Seen;
use super::scaler::{Decision, Sample};
use super::{sock_path, sockdiag, Watcher};
use crate::config::{Config, Queue, LOCAL_HOST};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Instant;

/// One other host's share of a pool's load, as the front sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct HostLoad {
    pub host: String,
    /// The front's connections to the pool's queue there.
    pub connections: u32,
    /// Those beyond the host's workers: requests waiting there.
    pub waiting: u32,
}

/// Where the front's nginx connects for `pool` on each other host that
/// answers and runs it now (a lost host's connections are failing, not
/// waiting).
pub(super) fn remote_queues(
    cfg: &Config,
    pool: &str,
    seen: &BTreeMap<String, Seen>,
) -> Vec<(String, SocketAddr)> {
    let Some(p) = cfg.pools.get(pool) else {
        return Vec::new();
    };
    let Some(port) = p.port else {
        return Vec::new();
    };
    p.hosts
        .iter()
        .filter(|h| h.as_str() != LOCAL_HOST)
        .filter(|h| matches!(seen.get(h.as_str()), Some(Seen::Up(pools)) if pools.contains(pool)))
        .filter_map(|h| {
            cfg.hosts
                .get(h)
                .map(|host| (h.clone(), SocketAddr::new(host.listen, port)))
        })
        .collect()
}

/// Each other host's share of `pool`'s load from the front's connection
/// counts (`count` workers on each host).
pub(super) fn remote_load(
    queues: &[(String, SocketAddr)],
    count: u32,
    connections: &BTreeMap<SocketAddr, u32>,
) -> Vec<HostLoad> {
    queues
        .iter()
        .map(|(host, addr)| {
            let c = connections.get(addr).copied().unwrap_or(0);
            HostLoad {
                host: host.clone(),
                connections: c,
                waiting: c.saturating_sub(count),
            }
        })
        .collect()
}

impl Watcher {
    /// One load sample of every pool; the first scaling decision, with the
    /// queues it saw, for the caller to carry out. A figure that cannot be
    /// read skips the pools it concerns (never "nothing waiting", which
    /// would shrink them).
    pub(super) fn sample_load(
        &mut self,
        now: Instant,
        wanted: &BTreeMap<String, BTreeSet<u32>>,
    ) -> Option<(String, Decision, String)> {
        let queues = match sockdiag::queues(&format!("{}/", super::RUN_DIR)) {
            Ok(q) => q,
            Err(e) => {
                eprintln!("watch: reading the socket queues failed, no load sample: {e:#}");
                return None;
            }
        };
        let seen = self.hosts.seen();
        let remote: BTreeMap<String, Vec<(String, SocketAddr)>> = self
            .cfg
            .pools
            .values()
            .filter(|p| p.is_remote())
            .map(|p| (p.name.clone(), remote_queues(&self.cfg, &p.name, &seen)))
            .collect();
        let dests: BTreeSet<SocketAddr> = remote.values().flatten().map(|(_, a)| *a).collect();
        let connections = match sockdiag::tcp_connections(&dests) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("watch: counting the connections to other hosts failed, no load sample of their pools: {e:#}");
                None
            }
        };
        let pools: Vec<String> = self.cfg.pools.keys().cloned().collect();
        let no_workers = BTreeSet::new();
        for pool in pools {
            let Some(&count) = self.counts.get(&pool) else {
                continue;
            };
            let on_front = self
                .cfg
                .pools
                .get(&pool)
                .is_some_and(|p| !p.is_remote() || p.on_host(LOCAL_HOST));
            let ns = wanted.get(&pool).unwrap_or(&no_workers);
            let mut waiting = if on_front {
                self.waiting(&pool, ns, &queues)
            } else {
                0
            };
            let mut hosts = Vec::new();
            if let Some(q) = remote.get(&pool) {
                let Some(c) = connections.as_ref() else {
                    continue;
                };
                hosts = remote_load(q, count, c);
                waiting += hosts.iter().map(|h| h.waiting).sum::<u32>();
                self.remote_connections
                    .retain(|(p, _), _| p.as_str() != pool.as_str());
                for h in &hosts {
                    self.remote_connections
                        .insert((pool.clone(), h.host.clone()), h.connections);
                }
            }
            let Some(scaler) = self.scalers.get_mut(&pool) else {
                continue;
            };
            let sample = Sample {
                at: now,
                workers: count,
                waiting,
            };
            if let Some(d) = scaler.observe(sample) {
                let mut summary = Vec::new();
                if on_front {
                    summary.push(self.queues_summary(&pool, ns, &queues));
                }
                summary.extend(hosts.iter().map(|h| {
                    format!(
                        "host {}: {} connections, {} waiting",
                        h.host, h.connections, h.waiting
                    )
                }));
                return Some((pool, d, summary.join("; ")));
            }
        }
        None
    }

    /// Requests waiting for a worker of `pool`: on its one socket (shared
    /// queue), or on each wanted worker's socket.
    pub(super) fn waiting(
        &self,
        pool: &str,
        ns: &BTreeSet<u32>,
        queues: &BTreeMap<String, sockdiag::Queue>,
    ) -> u32 {
        if self.is_shared(pool) {
            return queues
                .get(&crate::render::pool_socket_path(pool))
                .map(|q| self.waiting_in(pool, q))
                .unwrap_or(0);
        }
        ns.iter()
            .map(|n| {
                queues
                    .get(&sock_path(pool, *n))
                    .map(|q| self.waiting_in(pool, q))
                    .unwrap_or(0)
            })
            .sum()
    }

    /// Requests waiting in one socket's queue of `pool`. A FastCGI worker
    /// without `keep_conn` holds one connection, the request it is serving,
    /// and php-cgi leaves that request's closing (empty) STDIN record unread
    /// while the script runs: its unread bytes are a busy worker, not a
    /// request waiting, so only the listener's backlog counts there.
    pub(super) fn waiting_in(&self, pool: &str, q: &sockdiag::Queue) -> u32 {
        let one_connection = self
            .cfg
            .pools
            .get(pool)
            .and_then(|p| p.fastcgi.as_ref())
            .is_some_and(|f| !f.keep_conn);
        if one_connection {
            q.backlog
        } else {
            q.waiting()
        }
    }

    pub(super) fn is_shared(&self, pool: &str) -> bool {
        self.cfg
            .pools
            .get(pool)
            .map(|p| p.queue == Queue::Shared)
            .unwrap_or(false)
    }

    pub(super) fn queues_summary(
        &self,
        pool: &str,
        ns: &BTreeSet<u32>,
        queues: &BTreeMap<String, sockdiag::Queue>,
    ) -> String {
        if self.is_shared(pool) {
            let q = queues
                .get(&crate::render::pool_socket_path(pool))
                .copied()
                .unwrap_or_default();
            return format!(
                "{pool} (shared, {} workers) backlog={} pending={}",
                ns.len(),
                q.backlog,
                q.pending
            );
        }
        ns.iter()
            .map(|n| {
                let q = queues
                    .get(&sock_path(pool, *n))
                    .copied()
                    .unwrap_or_default();
                format!("{pool}@{n} backlog={} pending={}", q.backlog, q.pending)
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const CFG: &str = "[nginx]\nfront_address = \"10.0.0.10\"\n\
        [host.web1]\naddress = \"root@10.0.0.11\"\n[host.web2]\naddress = \"root@10.0.0.12\"\n\
        [pool.a]\nexec = \"/bin/a\"\nroute = \"/a\"\nhosts = [\"local\", \"web1\", \"web2\"]\nport = 9001\n";

    #[test]
    fn other_hosts_add_the_requests_sent_beyond_their_workers() {
        let cfg = crate::config::parse(Path::new("t.toml"), CFG).expect("parses");
        let up = |pools: &[&str]| Seen::Up(pools.iter().map(|p| p.to_string()).collect());
        let web1: SocketAddr = "10.0.0.11:9001".parse().expect("address");
        let web2: SocketAddr = "10.0.0.12:9001".parse().expect("address");
        // Both answer: both counted, never the front ("local").
        let seen = BTreeMap::from([
            ("web1".to_string(), up(&["a"])),
            ("web2".to_string(), up(&["a"])),
        ]);
        let queues = remote_queues(&cfg, "a", &seen);
        assert_eq!(
            queues,
            vec![("web1".to_string(), web1), ("web2".to_string(), web2)]
        );
        // 2 workers each: 5 connections to web1 are 3 waiting, 1 to web2 none.
        let connections = BTreeMap::from([(web1, 5), (web2, 1)]);
        let load = remote_load(&queues, 2, &connections);
        assert_eq!(
            load,
            vec![
                HostLoad {
                    host: "web1".into(),
                    connections: 5,
                    waiting: 3
                },
                HostLoad {
                    host: "web2".into(),
                    connections: 1,
                    waiting: 0
                },
            ]
        );
        // A lost host, or one whose pool is down, is not sampled; nor an
        // unknown pool.
        let seen = BTreeMap::from([
            ("web1".to_string(), Seen::Lost("gone".into())),
            ("web2".to_string(), up(&[])),
        ]);
        assert!(remote_queues(&cfg, "a", &seen).is_empty());
        assert!(remote_queues(&cfg, "nope", &seen).is_empty());
    }
}
