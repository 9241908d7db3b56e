//! How many requests wait for a pool's workers, read from the sock_diag
//! queues: on the pool's one socket (shared queue) or on every worker's
//! socket, and what watch's log lines say about them.
use super::{sock_path, sockdiag, Watcher};
use crate::config::Queue;
use std::collections::{BTreeMap, BTreeSet};

impl Watcher {
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
