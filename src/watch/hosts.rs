//! watch follows the other hosts (`[host.NAME]`): one task per host keeps a
//! connection to its systemd over the remote transport (ssh with watch's
//! short timeouts, `systemd-stdio-bridge`) and reads its cgipool units every
//! [`POLL`]. A read that fails or takes longer than [`CALL_TIMEOUT`] loses
//! the host: the task drops the connection and connects again, waiting
//! [`BACKOFF_MIN`], doubling up to [`BACKOFF_MAX`] while the host stays
//! away. Each verdict is kept in a map the watch loop reads ([`Hosts::seen`])
//! and a change of verdict wakes the loop; the tasks never run inside the
//! loop, so a dead host never holds it (nor its watchdog, fed elsewhere).
//!
//! [`hosts_out`] is the pure part: which hosts nginx must not route to,
//! per pool. Before a host that answers goes back into nginx, watch
//! converges it to the recorded intent (host_converge.rs, under the lock,
//! over ssh with the same short timeouts): it may have missed a scale or an
//! apply while it was away.
use crate::config::{Config, LOCAL_HOST};
use crate::remote::{RemoteHost, SshTimeouts};
use crate::state::now_unix;
use crate::systemd::{Systemd, UnitState};
use anyhow::anyhow;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// How often a connected host's units are read.
pub const POLL: Duration = Duration::from_millis(500);
/// A read of a host's units that takes longer loses the host: a host that
/// lost power is noticed within POLL + CALL_TIMEOUT.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(1);
/// Connecting (ssh's ConnectTimeout is 2 s, then the bus's hello).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(4);
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// What watch knows of a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// Not read yet since watch began to follow it: routed as before.
    Unknown,
    /// Its systemd answers; the pools whose socket and at least one worker
    /// are active there.
    Up(BTreeSet<String>),
    /// Its systemd did not answer (why).
    Lost(String),
}

/// What a host's task follows: a change restarts the task.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Followed {
    address: RemoteHost,
    pools: BTreeSet<String>,
}

/// What the tasks share with the watch loop, per host.
#[derive(Default)]
struct Shared {
    seen: BTreeMap<String, Seen>,
    /// When the verdict last changed (unix seconds).
    since: BTreeMap<String, u64>,
    /// Active numbered workers per pool at the last read.
    active: BTreeMap<String, BTreeMap<String, u32>>,
    /// Hosts lost since the watch loop last asked ([`Hosts::take_lost`]):
    /// one lost and back while the loop was busy is still converged again.
    lost: BTreeSet<String>,
}

type SeenMap = Arc<Mutex<Shared>>;

/// A host's verdict, since when, and its active workers per pool, for
/// /pool-status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostReading {
    pub seen: Seen,
    pub since_unix: u64,
    pub active: BTreeMap<String, u32>,
}

/// The tasks that follow the hosts of the recorded intent.
pub struct Hosts {
    seen: SeenMap,
    tasks: BTreeMap<String, (Followed, JoinHandle<()>)>,
    changed: Arc<Notify>,
}

impl Hosts {
    /// `changed` is notified whenever a host's verdict changes.
    pub fn new(changed: Arc<Notify>) -> Hosts {
        Hosts {
            seen: Arc::new(Mutex::new(Shared::default())),
            tasks: BTreeMap::new(),
            changed,
        }
    }

    /// Follows exactly the hosts of `cfg`: a task for each new host (or one
    /// whose address or pools changed), none for hosts `cfg` dropped.
    pub fn follow(&mut self, cfg: &Config) {
        let want: BTreeMap<String, Followed> = cfg
            .hosts
            .values()
            .map(|h| {
                let pools = cfg
                    .pools
                    .values()
                    .filter(|p| p.on_host(&h.name))
                    .map(|p| p.name.clone())
                    .collect();
                (
                    h.name.clone(),
                    Followed {
                        address: h.address.clone(),
                        pools,
                    },
                )
            })
            .collect();
        let seen = Arc::clone(&self.seen);
        self.tasks.retain(|name, (followed, task)| {
            let keep = want.get(name) == Some(&*followed);
            if !keep {
                task.abort();
                if let Ok(mut s) = seen.lock() {
                    s.seen.remove(name);
                    s.since.remove(name);
                    s.active.remove(name);
                }
            }
            keep
        });
        for (name, followed) in want {
            if self.tasks.contains_key(&name) {
                continue;
            }
            if let Ok(mut s) = self.seen.lock() {
                s.seen.insert(name.clone(), Seen::Unknown);
                s.since.insert(name.clone(), now_unix());
            }
            let task = tokio::spawn(follow(
                name.clone(),
                followed.clone(),
                Arc::clone(&self.seen),
                Arc::clone(&self.changed),
            ));
            self.tasks.insert(name, (followed, task));
        }
    }

    /// Every followed host's verdict now.
    pub fn seen(&self) -> BTreeMap<String, Seen> {
        self.seen.lock().map(|s| s.seen.clone()).unwrap_or_default()
    }

    /// The hosts lost since the last call, whatever they are now.
    pub fn take_lost(&self) -> BTreeSet<String> {
        self.seen
            .lock()
            .map(|mut s| std::mem::take(&mut s.lost))
            .unwrap_or_default()
    }

    /// Records a verdict for `name` as its task would.
    #[cfg(test)]
    pub(super) fn saw(&self, name: &str, address: &RemoteHost, now: Seen) {
        record(&self.seen, &self.changed, name, address, now);
    }

    /// Every followed host's verdict, since when, and active workers.
    pub fn readings(&self) -> BTreeMap<String, HostReading> {
        let Ok(s) = self.seen.lock() else {
            return BTreeMap::new();
        };
        s.seen
            .iter()
            .map(|(name, seen)| {
                (
                    name.clone(),
                    HostReading {
                        seen: seen.clone(),
                        since_unix: s.since.get(name).copied().unwrap_or(0),
                        active: s.active.get(name).cloned().unwrap_or_default(),
                    },
                )
            })
            .collect()
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for (_, task) in self.tasks.values() {
            task.abort();
        }
    }
}

/// Records `now` for `name`; wakes the watch loop and logs when it changed.
fn record(seen: &SeenMap, changed: &Notify, name: &str, address: &RemoteHost, now: Seen) {
    let before = match seen.lock() {
        Ok(mut s) => {
            let before = s.seen.insert(name.to_string(), now.clone());
            if before.as_ref() != Some(&now) {
                s.since.insert(name.to_string(), now_unix());
            }
            if matches!(now, Seen::Lost(_)) {
                s.active.remove(name);
                s.lost.insert(name.to_string());
            }
            before
        }
        Err(_) => return,
    };
    if before.as_ref() == Some(&now) {
        return;
    }
    match (&before, &now) {
        (Some(Seen::Lost(_)), Seen::Lost(_)) => {} // still away: the first reason was logged
        (_, Seen::Lost(why)) => println!("watch: host {name} ({address}) lost: {why}"),
        (_, Seen::Up(pools)) => println!(
            "watch: host {name} ({address}) answers; active pools: {}",
            if pools.is_empty() {
                "none".to_string()
            } else {
                pools.iter().cloned().collect::<Vec<_>>().join(", ")
            }
        ),
        (_, Seen::Unknown) => {}
    }
    changed.notify_one();
}

/// One host's task: connect, read its units every POLL until a read fails
/// or is late, then connect again after a backoff.
async fn follow(name: String, followed: Followed, seen: SeenMap, changed: Arc<Notify>) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let (was_up, e) = read_until_lost(&name, &followed, &seen, &changed).await;
        record(
            &seen,
            &changed,
            &name,
            &followed.address,
            Seen::Lost(format!("{e:#}")),
        );
        if was_up {
            backoff = BACKOFF_MIN;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Reads the host's units until that fails; returns whether it answered at
/// least once, and why it stopped.
async fn read_until_lost(
    name: &str,
    followed: &Followed,
    seen: &SeenMap,
    changed: &Notify,
) -> (bool, anyhow::Error) {
    let connecting = async {
        let conn = followed
            .address
            .connect_with(CONNECT_TIMEOUT, &SshTimeouts::WATCH)
            .await?;
        Systemd::over(conn).await
    };
    let systemd = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return (false, e),
        Err(_) => {
            return (
                false,
                anyhow!(
                    "its system bus did not answer within {}s",
                    CONNECT_TIMEOUT.as_secs()
                ),
            )
        }
    };
    let mut answered = false;
    loop {
        let units = match tokio::time::timeout(CALL_TIMEOUT, systemd.list(&["cgipool-*"])).await {
            Ok(Ok(units)) => units,
            Ok(Err(e)) => return (answered, e.context("reading its units")),
            Err(_) => {
                return (
                    answered,
                    anyhow!(
                        "its systemd did not answer within {} ms",
                        CALL_TIMEOUT.as_millis()
                    ),
                )
            }
        };
        answered = true;
        if let Ok(mut s) = seen.lock() {
            s.active
                .insert(name.to_string(), active_workers(&followed.pools, &units));
        }
        record(
            seen,
            changed,
            name,
            &followed.address,
            Seen::Up(pools_up(&followed.pools, &units)),
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Active numbered workers of each of `pools` among `units`.
fn active_workers(pools: &BTreeSet<String>, units: &[UnitState]) -> BTreeMap<String, u32> {
    let mut out: BTreeMap<String, u32> = pools.iter().map(|p| (p.clone(), 0)).collect();
    for u in units.iter().filter(|u| u.active_state == "active") {
        if let Some((p, n, "service")) = crate::plan::parse_instance(&u.name) {
            if n > 0 {
                if let Some(c) = out.get_mut(p) {
                    *c += 1;
                }
            }
        }
    }
    out
}

/// The pools of `pools` whose socket and at least one numbered worker are
/// active among `units`.
fn pools_up(pools: &BTreeSet<String>, units: &[UnitState]) -> BTreeSet<String> {
    let active = |name: &str| {
        units
            .iter()
            .any(|u| u.name == name && u.active_state == "active")
    };
    pools
        .iter()
        .filter(|pool| active(&format!("cgipool-{pool}.socket")))
        .filter(|pool| {
            units.iter().any(|u| {
                u.active_state == "active"
                    && matches!(crate::plan::parse_instance(&u.name),
                        Some((p, n, "service")) if p == pool.as_str() && n > 0)
            })
        })
        .cloned()
        .collect()
}

/// Per pool, the other hosts nginx must not route to: hosts lost, hosts
/// where the pool's socket or every worker is down, and hosts back from
/// being lost that watch has not converged since (`returning`: they may
/// have missed a scale or an apply). A host not read yet is routed as
/// before. Pools with nothing out are left out.
pub fn hosts_out(
    cfg: &Config,
    seen: &BTreeMap<String, Seen>,
    returning: &BTreeSet<String>,
) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for pool in cfg.pools.values() {
        for h in pool.hosts.iter().filter(|h| h.as_str() != LOCAL_HOST) {
            let gone = match seen.get(h) {
                None | Some(Seen::Unknown) => false,
                Some(Seen::Lost(_)) => true,
                Some(Seen::Up(pools)) => !pools.contains(&pool.name) || returning.contains(h),
            };
            if gone {
                out.entry(pool.name.clone()).or_default().insert(h.clone());
            }
        }
    }
    out
}

/// `out` as a log line: `hello: -web2`, or `none`.
pub fn describe(out: &BTreeMap<String, BTreeSet<String>>) -> String {
    if out.is_empty() {
        return "every host routed".into();
    }
    out.iter()
        .map(|(pool, hosts)| {
            format!(
                "pool {pool} without {}",
                hosts.iter().cloned().collect::<Vec<_>>().join(", ")
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const CFG: &str = "[nginx]\nfront_address = \"10.0.0.10\"\n\
        [host.web1]\naddress = \"root@10.0.0.11\"\n[host.web2]\naddress = \"root@10.0.0.12\"\n\
        [pool.a]\nexec = \"/bin/a\"\nroute = \"/a\"\nhosts = [\"local\", \"web1\", \"web2\"]\nport = 9001\n\
        [pool.b]\nexec = \"/bin/b\"\nroute = \"/b\"\nhosts = [\"web2\"]\nport = 9002\n";

    fn unit(name: &str, state: &str) -> UnitState {
        UnitState {
            name: name.into(),
            load_state: "loaded".into(),
            active_state: state.into(),
            sub_state: String::new(),
            path: String::new(),
        }
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_host_lost_and_back_between_two_looks_is_still_reported() {
        let hosts = Hosts::new(Arc::new(Notify::new()));
        let address: RemoteHost = "root@10.0.0.11".parse().unwrap();
        let up = Seen::Up(BTreeSet::new());
        record(&hosts.seen, &hosts.changed, "web1", &address, up.clone());
        assert!(hosts.take_lost().is_empty());
        record(
            &hosts.seen,
            &hosts.changed,
            "web1",
            &address,
            Seen::Lost("gone".into()),
        );
        record(&hosts.seen, &hosts.changed, "web1", &address, up);
        assert_eq!(hosts.seen()["web1"], Seen::Up(BTreeSet::new()));
        assert_eq!(hosts.take_lost(), BTreeSet::from(["web1".to_string()]));
        assert!(hosts.take_lost().is_empty());
    }

    #[test]
    fn a_pool_is_up_with_its_socket_and_one_active_worker() {
        let pools = set(&["a", "b", "c"]);
        let units = [
            unit("cgipool-a.socket", "active"),
            unit("cgipool-a@1.service", "failed"),
            unit("cgipool-a@2.service", "active"),
            unit("cgipool-b.socket", "failed"),
            unit("cgipool-b@1.service", "active"),
            unit("cgipool-c.socket", "active"),
            // The stand-in instance 0 is not a worker of the count.
            unit("cgipool-c@0.service", "active"),
            unit("cgipool-c@1.service", "activating"),
        ];
        assert_eq!(pools_up(&pools, &units), set(&["a"]));
        assert!(pools_up(&pools, &[]).is_empty());
    }

    #[test]
    fn lost_and_down_hosts_leave_the_pools_they_serve_unknown_ones_stay() {
        let cfg = crate::config::parse(Path::new("t.toml"), CFG).expect("parses");
        let none = BTreeSet::new();
        let up = |pools: &[&str]| Seen::Up(set(pools));
        // Both answer with everything active: nothing out.
        let seen = BTreeMap::from([
            ("web1".to_string(), up(&["a"])),
            ("web2".to_string(), up(&["a", "b"])),
        ]);
        assert!(hosts_out(&cfg, &seen, &none).is_empty());
        // Not read yet: routed as before.
        let seen = BTreeMap::from([("web1".to_string(), Seen::Unknown)]);
        assert!(hosts_out(&cfg, &seen, &none).is_empty());
        // web2 lost: out of both pools it serves.
        let seen = BTreeMap::from([
            ("web1".to_string(), up(&["a"])),
            ("web2".to_string(), Seen::Lost("gone".into())),
        ]);
        let out = hosts_out(&cfg, &seen, &none);
        assert_eq!(
            out,
            BTreeMap::from([
                ("a".to_string(), set(&["web2"])),
                ("b".to_string(), set(&["web2"]))
            ])
        );
        assert_eq!(describe(&out), "pool a without web2; pool b without web2");
        // web2 answers but its pool b is down; web1 is back from being
        // lost and not converged yet.
        let seen = BTreeMap::from([
            ("web1".to_string(), up(&["a"])),
            ("web2".to_string(), up(&["a"])),
        ]);
        assert_eq!(
            hosts_out(&cfg, &seen, &set(&["web1"])),
            BTreeMap::from([
                ("a".to_string(), set(&["web1"])),
                ("b".to_string(), set(&["web2"]))
            ])
        );
        assert_eq!(describe(&BTreeMap::new()), "every host routed");
    }
}
