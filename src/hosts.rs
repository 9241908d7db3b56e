//! Many hosts during a converge: the `[host.NAME]` sections of a config,
//! reached before anything changes (every one must answer, or nothing is
//! touched anywhere), and what each of them should run. The front (this
//! machine) keeps its own path in `apply`; a host elsewhere is converged by
//! the same executor through [`SshHost`], without nginx, before the front
//! routes to it.
use crate::config::{Config, Host, LOCAL_HOST};
use crate::exec::interrupt::Interrupt;
use crate::exec::ssh_host::SshHost;
use crate::exec::{self, Outcome};
use crate::plan::{self, Desired, Plan};
use crate::render::{self, UnitTree};
use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

/// Connects to every host of `cfg` at once; fails naming every host that
/// did not answer (its systemd over ssh, and its unit directory over ssh).
pub async fn connect_all(cfg: &Config, unit_dir: &Path, timeout: Duration) -> Result<Vec<SshHost>> {
    connect(cfg.hosts.values(), unit_dir, timeout).await
}

/// Connects to the hosts of the applied config `old` that `new` no longer
/// names (their units go once the front stops routing to them).
pub async fn connect_gone(
    old: &Config,
    new: &Config,
    unit_dir: &Path,
    timeout: Duration,
) -> Result<Vec<SshHost>> {
    let gone = old
        .hosts
        .values()
        .filter(|h| !new.hosts.contains_key(&h.name));
    connect(gone, unit_dir, timeout).await
}

async fn connect<'a>(
    hosts: impl Iterator<Item = &'a Host>,
    unit_dir: &Path,
    timeout: Duration,
) -> Result<Vec<SshHost>> {
    let (hosts, failed) = connect_each(hosts, unit_dir, timeout).await;
    if !failed.is_empty() {
        bail!("{}; nothing was changed on any host", failed.join("; "));
    }
    Ok(hosts)
}

/// Connects to every host of `cfg` at once: the ones that answered, and
/// why each other one did not (naming it).
pub async fn connect_reachable(
    cfg: &Config,
    unit_dir: &Path,
    timeout: Duration,
) -> (Vec<SshHost>, Vec<String>) {
    connect_each(cfg.hosts.values(), unit_dir, timeout).await
}

async fn connect_each<'a>(
    hosts: impl Iterator<Item = &'a Host>,
    unit_dir: &Path,
    timeout: Duration,
) -> (Vec<SshHost>, Vec<String>) {
    let tries = hosts.map(|h| async move {
        SshHost::connect(&h.name, &h.address, unit_dir, timeout)
            .await
            .with_context(|| format!("host {} ({}) cannot be reached", h.name, h.address))
    });
    let mut hosts = Vec::new();
    let mut failed = Vec::new();
    for r in futures_util::future::join_all(tries).await {
        match r {
            Ok(h) => hosts.push(h),
            Err(e) => failed.push(format!("{e:#}")),
        }
    }
    (hosts, failed)
}

/// The pools of `cfg` that run on `host` at their counts.
fn counts_on(cfg: &Config, host: &str, counts: &BTreeMap<String, u32>) -> BTreeMap<String, u32> {
    cfg.pools
        .values()
        .filter(|p| p.on_host(host))
        .map(|p| {
            (
                p.name.clone(),
                counts.get(&p.name).copied().unwrap_or(p.min),
            )
        })
        .collect()
}

/// What every host converges to: `cfg` at the pools' `counts`, its units
/// under `unit_dir`; `leave_failed` as in [`Desired`].
#[derive(Clone, Copy)]
pub struct Goal<'a> {
    pub cfg: &'a Config,
    pub counts: &'a BTreeMap<String, u32>,
    pub unit_dir: &'a Path,
    pub leave_failed: bool,
}

/// What `host` should run: its pools' units and workers; no routes (nginx
/// is the front's).
pub fn desired_on(goal: Goal<'_>, host: &Host) -> Desired {
    let counts = counts_on(goal.cfg, &host.name, goal.counts);
    Desired {
        units: render::host_units(goal.cfg, host, goal.unit_dir, &counts),
        instances: plan::numbered(&counts),
        routes: None,
        exclude: BTreeSet::new(),
        leave_failed: goal.leave_failed,
        shared: counts.keys().cloned().collect(),
    }
}

/// Nothing of cgipool's on the host (`down`).
pub fn nothing() -> Desired {
    Desired {
        units: UnitTree::default(),
        instances: BTreeMap::new(),
        routes: None,
        exclude: BTreeSet::new(),
        leave_failed: false,
        shared: BTreeSet::new(),
    }
}

/// The front's counts: only the pools that run on it.
pub fn front_counts(cfg: &Config, counts: &BTreeMap<String, u32>) -> BTreeMap<String, u32> {
    if cfg.hosts.is_empty() {
        return counts.clone();
    }
    counts_on(cfg, LOCAL_HOST, counts)
}

/// Converges every host to the goal, one after the other, and fails
/// (before the front routes to any of them) when a worker on one of them
/// did not come up.
pub async fn converge_all(hosts: &mut [SshHost], goal: Goal<'_>, stop: &Interrupt) -> Result<()> {
    for h in hosts.iter_mut() {
        println!("host {} ({}):", h.name, h.address);
        converge_one(h, goal, stop).await?;
    }
    if !hosts.is_empty() {
        println!("front:");
    }
    Ok(())
}

/// Converges one host to the goal; fails naming it when it could not be
/// converged or a worker there did not come up.
pub async fn converge_one(h: &mut SshHost, goal: Goal<'_>, stop: &Interrupt) -> Result<()> {
    let Some(spec) = goal.cfg.hosts.get(&h.name) else {
        return Ok(());
    };
    let d = desired_on(goal, spec);
    let Outcome { problems } = exec::converge(h, &d, stop)
        .await
        .with_context(|| format!("host {}", h.name))?;
    if !problems.is_empty() {
        bail!(
            "host {}: some workers are not healthy, the front's nginx was not changed: {}",
            h.name,
            problems.join("; ")
        );
    }
    Ok(())
}

/// Every host's plan (`--dry-run`), each under its name.
pub async fn plans(hosts: &mut [SshHost], goal: Goal<'_>) -> Result<Vec<(String, Plan)>> {
    let mut out = Vec::new();
    for h in hosts.iter_mut() {
        let Some(spec) = goal.cfg.hosts.get(&h.name) else {
            continue;
        };
        let d = desired_on(goal, spec);
        let plan = exec::plan_only(h, &d)
            .await
            .with_context(|| format!("host {}", h.name))?;
        out.push((format!("host {} ({})", h.name, h.address), plan));
    }
    Ok(out)
}

/// Removes everything cgipool made from every host (`down`).
pub async fn down_all(hosts: &mut [SshHost], stop: &Interrupt) -> Result<()> {
    for h in hosts.iter_mut() {
        println!("host {} ({}):", h.name, h.address);
        let Outcome { problems } = exec::converge(h, &nothing(), stop)
            .await
            .with_context(|| format!("host {}", h.name))?;
        if !problems.is_empty() {
            bail!("host {}: {}", h.name, problems.join("; "));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const CFG: &str = "[watch]\nenabled = false\n[nginx]\nfront_address = \"10.0.0.10\"\n[host.web1]\naddress = \"root@10.0.0.11\"\n\
        [pool.a]\nexec = \"/bin/a\"\nroute = \"/a\"\nhosts = [\"web1\", \"local\"]\nport = 9001\nmin = 2\n\
        [pool.b]\nexec = \"/bin/b\"\nroute = \"/b\"\nhosts = [\"web1\"]\nport = 9002\nmin = 1\n\
        [pool.c]\nexec = \"/bin/c\"\nroute = \"/c\"\nmin = 1\n";

    #[test]
    fn each_host_runs_its_pools_at_the_pool_count() {
        let cfg = crate::config::parse(Path::new("t.toml"), CFG).expect("parses");
        let counts = BTreeMap::from([
            ("a".to_string(), 3),
            ("b".to_string(), 1),
            ("c".to_string(), 1),
        ]);
        let goal = Goal {
            cfg: &cfg,
            counts: &counts,
            unit_dir: Path::new("/etc/systemd/system"),
            leave_failed: false,
        };
        let d = desired_on(goal, &cfg.hosts["web1"]);
        assert_eq!(d.instances.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(d.instances["a"].len(), 3);
        assert!(d.routes.is_none());
        assert_eq!(
            front_counts(&cfg, &counts),
            BTreeMap::from([("a".to_string(), 3), ("c".to_string(), 1)])
        );
    }
}
