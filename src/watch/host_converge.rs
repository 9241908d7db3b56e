//! watch converges the other hosts itself: one that answers and is behind
//! the recorded intent (or back from being lost) is converged over ssh
//! before nginx routes to it again, each host on its own and bounded, so a
//! host that does not answer never holds the front, and one that fails
//! slowly is tried again only after 4 times its attempt (see `hosts` for
//! how they are followed).
use super::hosts::{hosts_out, Seen};
use super::Watcher;
use crate::config::{Config, Host};
use crate::exec::interrupt::Interrupt;
use crate::exec::ssh_host::SshHost;
use crate::remote::SshTimeouts;
use crate::state::Intent;
use anyhow::Result;
use futures_util::future::{FutureExt, LocalBoxFuture};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// Converges one other host (its name, its `[host.NAME]`) to the intent:
/// over ssh in the daemon ([`converge_over_ssh`]), a fake in the tests.
pub(super) type ConvergeHost =
    for<'a> fn(&'a Config, &'a str, &'a Host, &'a Intent) -> LocalBoxFuture<'a, Result<()>>;

impl Watcher {
    /// True when `name` answers, is behind the intent `serial`, and its
    /// last failed converge's backoff (if any) is over.
    fn host_behind(&self, name: &str, seen: Option<&Seen>, serial: u64, now: Instant) -> bool {
        matches!(seen, Some(Seen::Up(_)))
            && self.host_serials.get(name) != Some(&serial)
            && self
                .host_retry
                .get(name)
                .map(|(at, _)| now >= *at)
                .unwrap_or(true)
    }

    /// True when a host that answers may be converged to `serial` now.
    pub(super) fn host_due(&self, seen: &BTreeMap<String, Seen>, serial: u64) -> bool {
        let now = Instant::now();
        seen.iter()
            .any(|(name, s)| self.host_behind(name, Some(s), serial, now))
    }

    /// Converges each other host that answers and is behind `intent`, all
    /// at once over ssh (watch's short timeouts: a host that goes away
    /// meanwhile fails within seconds, one that hangs within
    /// [`HOST_CONVERGE_TIMEOUT`]); a host that fails is logged and tried
    /// again after a backoff (a host back from being lost stays out of nginx
    /// until it converged). Returns, per pool, the
    /// hosts nginx must not route to. Call under the lock.
    pub(super) async fn converge_hosts(
        &mut self,
        intent: &Intent,
    ) -> BTreeMap<String, BTreeSet<String>> {
        self.converge_hosts_with(intent, converge_over_ssh).await
    }

    /// [`Self::converge_hosts`], each host converged by `converge_host`.
    pub(super) async fn converge_hosts_with(
        &mut self,
        intent: &Intent,
        converge_host: ConvergeHost,
    ) -> BTreeMap<String, BTreeSet<String>> {
        let cfg = self.cfg.clone();
        let seen = self.hosts.seen();
        let now = Instant::now();
        let due: Vec<(&String, &Host)> = cfg
            .hosts
            .iter()
            .filter(|(name, _)| self.host_behind(name, seen.get(*name), intent.serial, now))
            .collect();
        // All at once: the loop (and the lock) is held as long as the
        // slowest, not the sum, however many hosts hang.
        let attempts = due.iter().map(|(name, host)| {
            let converging = converge_host(&cfg, name, host, intent);
            async move {
                let attempt = tokio::time::Instant::now();
                // A host whose sshd answers but whose systemd hangs must not
                // hold the loop (and the lock): bound the whole converge.
                let done = tokio::time::timeout(HOST_CONVERGE_TIMEOUT, converging)
                    .await
                    .unwrap_or_else(|_| {
                        Err(anyhow::anyhow!(
                            "no converge within {} s",
                            HOST_CONVERGE_TIMEOUT.as_secs()
                        ))
                    });
                (attempt.elapsed(), done)
            }
        });
        let results = futures_util::future::join_all(attempts).await;
        for ((name, host), (took, done)) in due.iter().zip(results) {
            let name = *name;
            match done {
                Ok(()) => {
                    println!(
                        "watch: host {name} ({}): converged to intent {}",
                        host.address, intent.serial
                    );
                    self.host_serials.insert(name.clone(), intent.serial);
                    self.host_retry.remove(name);
                    self.host_returning.remove(name);
                }
                Err(e) => {
                    let failures = self.host_retry.get(name).map(|(_, n)| n + 1).unwrap_or(1);
                    // An attempt holds the loop and the lock as long as it
                    // takes: one that took long to fail (a hang, up to the
                    // bound) waits 4 times as long before the next, so
                    // hosts that hang keep watch from routing at most a
                    // fifth of its time.
                    let wait = Duration::from_secs(1 << failures.min(5)).max(took * HOLD_BACKOFF);
                    let routed = if self.host_returning.contains(name) {
                        "it stays out of nginx"
                    } else {
                        "nginx routes to what it runs"
                    };
                    eprintln!(
                        "watch: host {name} ({}): {e:#}; {routed}, trying again in {}s",
                        host.address,
                        wait.as_secs()
                    );
                    self.host_retry
                        .insert(name.clone(), (Instant::now() + wait, failures));
                }
            }
        }
        self.host_retry
            .retain(|name, _| cfg.hosts.contains_key(name));
        self.host_serials
            .retain(|name, _| cfg.hosts.contains_key(name));
        self.host_returning
            .retain(|name| cfg.hosts.contains_key(name));
        hosts_out(&cfg, &self.hosts.seen(), &self.host_returning)
    }
}

/// Converges `name` to `intent` over ssh, with watch's short timeouts.
fn converge_over_ssh<'a>(
    cfg: &'a Config,
    name: &'a str,
    host: &'a Host,
    intent: &'a Intent,
) -> LocalBoxFuture<'a, Result<()>> {
    async move {
        let mut h = SshHost::connect_with(
            name,
            &host.address,
            &intent.unit_dir,
            HOST_JOB_TIMEOUT,
            SshTimeouts::WATCH,
        )
        .await?;
        let goal = crate::hosts::Goal {
            cfg,
            counts: &intent.counts,
            unit_dir: &intent.unit_dir,
            leave_failed: true,
        };
        crate::hosts::converge_one(&mut h, goal, &Interrupt::never()).await
    }
    .boxed_local()
}

/// How long watch waits for a job on another host, and for its bus.
const HOST_JOB_TIMEOUT: Duration = Duration::from_secs(30);

/// A failed attempt's next try waits at least this many times as long as
/// the attempt took.
pub(super) const HOLD_BACKOFF: u32 = 4;

/// How long one host's whole converge may take (a few jobs' worth).
pub(super) const HOST_CONVERGE_TIMEOUT: Duration = Duration::from_secs(120);
