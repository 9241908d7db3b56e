//! apply: the executor. Observes the host, plans, and converges it in the
//! order that never costs a request: validate and render everything, check
//! nginx candidates, write units and start new workers, reload nginx, drain,
//! stop what goes away, remove files that are no longer wanted.
use crate::config::Config;
use crate::files::{self, OnDisk};
use crate::nginx;
use crate::plan::{self, Desired, Observed, Plan, WatchAction, WATCH_UNIT};
use crate::render::{self, NginxFiles};
use crate::systemd::{by_name, Job, JobKind, Systemd};
use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const SYSTEM_UNIT_DIR: &str = "/etc/systemd/system";
pub const RUNTIME_UNIT_DIR: &str = "/run/systemd/system";

#[derive(Debug, Clone)]
pub struct Options {
    pub unit_dir: PathBuf,
    pub dry_run: bool,
    /// pool → count requested by `cgipool scale` (already checked against min/max).
    pub counts: BTreeMap<String, u32>,
    pub job_timeout: Duration,
    /// Don't reset and start workers that are `failed` (watch's applies).
    pub leave_failed: bool,
    /// Services nginx must not route to although systemd says they are
    /// active (watch's health probe failed them).
    pub exclude: BTreeSet<String>,
}

/// Everything `plan` needs, read from the host.
struct Host {
    disk: OnDisk,
    observed: Observed,
    nginx_active: bool,
}

async fn observe(systemd: &Systemd, cfg: &Config, unit_dir: &Path) -> Result<Host> {
    let disk = files::read_unit_dir(unit_dir)?;
    let units = systemd.list(&["cgipool.target", "cgipool-*"]).await?;
    let active = units
        .into_iter()
        .map(|u| (u.name, u.active_state))
        .collect();
    let nginx_unit = systemd.list(&[cfg.nginx.unit.as_str()]).await?;
    let nginx_active = nginx::installed() && nginx_unit.iter().any(|u| u.active_state == "active");
    let nginx_files = if nginx_active {
        Some(nginx::current(&cfg.nginx)?)
    } else {
        None
    };
    let observed = Observed {
        files: disk.entries.clone(),
        active,
        nginx: nginx_files,
    };
    Ok(Host {
        disk,
        observed,
        nginx_active,
    })
}

/// The count each pool should run: `scale`'s request, else what the pool
/// target wants on disk, else min; always clamped to [min, max].
fn counts(cfg: &Config, disk: &OnDisk, requested: &BTreeMap<String, u32>) -> BTreeMap<String, u32> {
    let on_disk = plan::instances_on_disk(&disk.entries);
    cfg.pools
        .iter()
        .map(|(name, pool)| {
            let current = on_disk.get(name).map(|s| s.len() as u32).filter(|&n| n > 0);
            let n = requested.get(name).copied().or(current).unwrap_or(pool.min);
            (name.clone(), n.clamp(pool.min, pool.max))
        })
        .collect()
}

/// The plan, less the start of failed workers when `leave_failed` (watch
/// never revives what systemd gave up on: that is the operator's apply).
fn plan_with(desired: &Desired, observed: &Observed, opts: &Options) -> Plan {
    let mut p = plan::plan(desired, observed);
    if opts.leave_failed {
        let failed = |u: &String| {
            observed
                .active
                .get(u)
                .map(|s| s == "failed")
                .unwrap_or(false)
        };
        p.start.retain(|u| !failed(u));
        p.reset_failed.clear();
    }
    p
}

/// Workers that will be active after `plan`: running now, or started by it.
fn expected_active(
    wanted: &BTreeMap<String, BTreeSet<u32>>,
    plan: &Plan,
    observed: &Observed,
    exclude: &BTreeSet<String>,
) -> BTreeMap<String, BTreeSet<u32>> {
    wanted_where(wanted, |unit| {
        let active = observed.active.get(unit).map(|s| s == "active");
        !exclude.contains(unit) && (plan.start.iter().any(|u| u == unit) || active.unwrap_or(false))
    })
}

/// The wanted workers whose service unit satisfies `pred`.
fn wanted_where(
    wanted: &BTreeMap<String, BTreeSet<u32>>,
    pred: impl Fn(&str) -> bool,
) -> BTreeMap<String, BTreeSet<u32>> {
    wanted
        .iter()
        .map(|(pool, ns)| {
            let up = ns
                .iter()
                .copied()
                .filter(|&n| pred(&plan::service(pool, n)))
                .collect();
            (pool.clone(), up)
        })
        .collect()
}

fn instances(counts: &BTreeMap<String, u32>) -> BTreeMap<String, BTreeSet<u32>> {
    counts
        .iter()
        .map(|(p, &n)| (p.clone(), (1..=n).collect()))
        .collect()
}

fn nginx_for(cfg: &Config, active: &BTreeMap<String, BTreeSet<u32>>) -> NginxFiles {
    let lists = active
        .iter()
        .map(|(p, s)| (p.clone(), s.iter().copied().collect()))
        .collect();
    render::nginx(cfg, &lists)
}

/// Runs `apply` (or `scale`); prints what it does. Returns the plan carried out.
pub async fn apply(cfg: &Config, opts: &Options) -> Result<Plan> {
    // Phase 1: observe, render everything in memory, plan.
    let systemd = Systemd::connect().await?;
    let host = observe(&systemd, cfg, &opts.unit_dir).await?;
    let counts = counts(cfg, &host.disk, &opts.counts);
    let wanted = instances(&counts);
    let units = render::units(cfg, &opts.unit_dir, &counts);
    if let Some(f) = host.disk.foreign.iter().find(|f| {
        f.strip_prefix(&opts.unit_dir)
            .map(|rel| units.entries.contains_key(rel))
            .unwrap_or(false)
    }) {
        bail!(
            "{} exists without cgipool's header; refusing to overwrite it (move it away)",
            f.display()
        );
    }
    // nginx will list the workers that are active once the planned jobs ran.
    let mut desired = Desired {
        units,
        instances: wanted.clone(),
        nginx: None,
    };
    let first = plan_with(&desired, &host.observed, opts);
    let candidate = nginx_for(
        cfg,
        &expected_active(&wanted, &first, &host.observed, &opts.exclude),
    );
    desired.nginx = host
        .nginx_active
        .then(|| (candidate.upstreams.clone(), candidate.locations.clone()));
    let plan = plan_with(&desired, &host.observed, opts);
    if opts.dry_run {
        print!("{plan}");
        if !host.nginx_active {
            println!(
                "note: nginx is not installed or {} is not active; nginx would be skipped",
                cfg.nginx.unit
            );
        }
        return Ok(plan);
    }
    if plan.is_empty() {
        println!("no changes");
        crate::watch::save_applied(cfg).ok();
        return Ok(plan);
    }
    if !host.nginx_active {
        println!(
            "nginx: skipped ({} is not active or nginx is not installed)",
            cfg.nginx.unit
        );
    }

    // Phase 2: nginx candidates, checked before any unit changes.
    let saved = if plan.nginx_write {
        let saved = nginx::install(&cfg.nginx, &candidate)?;
        if let Err(e) = nginx::test_config() {
            nginx::restore(&saved).context("putting the previous nginx files back")?;
            bail!("{e:#}\nthe previous nginx files were put back; no unit was changed");
        }
        println!("nginx: candidate files pass nginx -t");
        Some(saved)
    } else {
        None
    };

    // Phase 3: unit files, daemon-reload, start and roll workers.
    let mut problems = match converge_units(&systemd, &desired, &plan, opts).await {
        Ok(problems) => problems,
        Err(e) => {
            if let Some(saved) = &saved {
                nginx::restore(saved)?;
            }
            return Err(e.context(
                "applying units failed (nginx files left as they were); run apply again once fixed",
            ));
        }
    };

    // Phase 4: nginx lists only workers that are really active.
    let mut reloaded = None;
    if host.nginx_active {
        let active = active_instances(&systemd, &wanted, &opts.exclude).await?;
        let final_files = nginx_for(cfg, &active);
        if final_files != candidate {
            let missing: Vec<String> = wanted
                .iter()
                .flat_map(|(p, ns)| {
                    ns.iter()
                        .filter(|n| !active.get(p).map(|a| a.contains(n)).unwrap_or(false))
                        .map(move |n| format!("{p}@{n}"))
                })
                .collect();
            println!(
                "nginx: leaving out workers that are not active: {}",
                missing.join(", ")
            );
            nginx::install(&cfg.nginx, &final_files)?;
            nginx::test_config()?;
        }
        let before = &host.observed.nginx;
        let changed = before
            .as_ref()
            .map(|b| {
                b.0.as_deref() != Some(&final_files.upstreams)
                    || b.1.as_deref() != Some(&final_files.locations)
            })
            .unwrap_or(true);
        if changed {
            let old = nginx::reload_and_verify(
                &systemd,
                &cfg.nginx,
                &final_files.generation,
                opts.job_timeout,
            )
            .await?;
            println!(
                "nginx: reloaded {}, serving generation {}",
                cfg.nginx.unit, final_files.generation
            );
            reloaded = Some(old);
        }
    }

    // Phase 5: drain, then stop what goes away.
    if !plan.stop.is_empty() {
        if let Some(old) = &reloaded {
            nginx::wait_old_workers(old, Duration::from_secs(60))
                .await
                .context("draining nginx before stopping workers")?;
        }
        let jobs: Vec<Job> = plan
            .stop
            .iter()
            .map(|u| Job::new(JobKind::Stop, u))
            .collect();
        systemd.run_jobs(&jobs, opts.job_timeout).await?;
        println!("systemd: stopped {}", plan.stop.join(" "));
    }

    // Phase 6: remove unit files that are no longer wanted.
    if !plan.remove.is_empty() {
        for rel in &plan.remove {
            files::remove_entry(&opts.unit_dir, rel)?;
        }
        systemd.daemon_reload().await?;
        println!(
            "systemd: removed {} unit files, daemon-reload",
            plan.remove.len()
        );
    }
    // Last: the watch daemon, once everything it watches is in place.
    if let Some(action) = plan.watch {
        let kind = match action {
            WatchAction::Start => JobKind::Start,
            WatchAction::Restart => JobKind::Restart,
        };
        match systemd
            .run_jobs(&[Job::new(kind, WATCH_UNIT)], opts.job_timeout)
            .await
        {
            Ok(()) => println!("systemd: {kind}ed {WATCH_UNIT}"),
            Err(e) => problems.push(format!("{e:#}")),
        }
    }
    if let Err(e) = crate::watch::save_applied(cfg) {
        println!("note: could not save the applied config for watch: {e:#}");
    }
    if !problems.is_empty() {
        bail!(
            "some workers are not healthy (nginx routes only to the healthy ones): {}",
            problems.join("; ")
        );
    }
    Ok(plan)
}

async fn converge_units(
    systemd: &Systemd,
    desired: &Desired,
    plan: &Plan,
    opts: &Options,
) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    for rel in &plan.write {
        if let Some(entry) = desired.units.entries.get(rel) {
            files::write_entry(&opts.unit_dir, rel, entry)?;
        }
    }
    for rel in &plan.unlink {
        files::remove_entry(&opts.unit_dir, rel)?;
    }
    if !plan.write.is_empty() || !plan.unlink.is_empty() {
        println!(
            "units: wrote {} and unlinked {} in {}",
            plan.write.len(),
            plan.unlink.len(),
            opts.unit_dir.display()
        );
    }
    if plan.daemon_reload {
        systemd.daemon_reload().await?;
        println!("systemd: daemon-reload");
    }
    for unit in &plan.reset_failed {
        systemd.reset_failed(unit).await?;
    }
    if !plan.start.is_empty() {
        let jobs: Vec<Job> = plan
            .start
            .iter()
            .map(|u| Job::new(JobKind::Start, u))
            .collect();
        let services: Vec<&String> = plan
            .start
            .iter()
            .filter(|u| u.ends_with(".service"))
            .collect();
        // A worker that does not come up is reported, not fatal: nginx will
        // route to the workers that did.
        let started = match systemd.run_jobs(&jobs, opts.job_timeout).await {
            Ok(()) => check_active(systemd, &services).await,
            Err(e) => Err(e),
        };
        match started {
            Ok(()) => println!("systemd: started {}", plan.start.join(" ")),
            Err(e) => problems.push(format!("{e:#}")),
        }
    }
    for group in &plan.roll {
        let jobs: Vec<Job> = group
            .iter()
            .map(|u| Job::new(JobKind::Restart, u))
            .collect();
        let services: Vec<&String> = group.iter().filter(|u| u.ends_with(".service")).collect();
        let restarted = match systemd.run_jobs(&jobs, opts.job_timeout).await {
            Ok(()) => check_active(systemd, &services).await,
            Err(e) => Err(e),
        };
        if let Err(e) = restarted {
            // Stop rolling: taking more workers down would cost capacity.
            problems.push(format!(
                "rolling restart stopped at {}: {e:#}",
                group.join(" + ")
            ));
            break;
        }
        println!("systemd: restarted {}", group.join(" "));
    }
    Ok(problems)
}

/// A `done` job is not a healthy worker: read the state back.
async fn check_active(systemd: &Systemd, services: &[&String]) -> Result<()> {
    if services.is_empty() {
        return Ok(());
    }
    let patterns: Vec<&str> = services.iter().map(|s| s.as_str()).collect();
    let units = systemd.list(&patterns).await?;
    let details = systemd.service_details(&units).await?;
    let bad: Vec<String> = details
        .iter()
        .filter(|d| d.active_state != "active")
        .map(|d| {
            format!(
                "{} is {}/{} (result {})",
                d.unit, d.active_state, d.sub_state, d.result
            )
        })
        .collect();
    let seen: BTreeSet<&str> = units.iter().map(|u| u.name.as_str()).collect();
    let gone: Vec<String> = services
        .iter()
        .filter(|s| !seen.contains(s.as_str()))
        .map(|s| format!("{s} is not loaded"))
        .collect();
    if !bad.is_empty() || !gone.is_empty() {
        bail!(
            "workers are not healthy after starting: {}",
            bad.into_iter().chain(gone).collect::<Vec<_>>().join("; ")
        );
    }
    Ok(())
}

async fn active_instances(
    systemd: &Systemd,
    wanted: &BTreeMap<String, BTreeSet<u32>>,
    exclude: &BTreeSet<String>,
) -> Result<BTreeMap<String, BTreeSet<u32>>> {
    let units = by_name(systemd.list(&["cgipool-*@*.service"]).await?);
    Ok(wanted_where(wanted, |unit| {
        let active = units.get(unit).map(|u| u.active_state == "active");
        !exclude.contains(unit) && active.unwrap_or(false)
    }))
}

/// `cgipool down`: stop routing, stop every unit cgipool made, remove its files.
pub async fn down(cfg: &Config, unit_dir: &Path, job_timeout: Duration) -> Result<()> {
    let systemd = Systemd::connect().await?;
    let host = observe(&systemd, cfg, unit_dir).await?;
    if host.nginx_active {
        let empty = render::nginx(cfg, &BTreeMap::new());
        let before = host.observed.nginx.clone().unwrap_or((None, None));
        if before.0.as_deref() != Some(&empty.upstreams)
            || before.1.as_deref() != Some(&empty.locations)
        {
            let saved = nginx::install(&cfg.nginx, &empty)?;
            if let Err(e) = nginx::test_config() {
                nginx::restore(&saved)?;
                return Err(e);
            }
            let old =
                nginx::reload_and_verify(&systemd, &cfg.nginx, &empty.generation, job_timeout)
                    .await?;
            nginx::wait_old_workers(&old, Duration::from_secs(60)).await?;
            println!("nginx: routes removed, reloaded");
        }
    }
    let mut running: Vec<&String> = host
        .observed
        .active
        .iter()
        .filter(|(_, s)| s.as_str() != "inactive")
        .map(|(u, _)| u)
        .collect();
    running.sort_by_key(|u| plan::stop_order(u));
    if !running.is_empty() {
        let jobs: Vec<Job> = running
            .iter()
            .map(|u| Job::new(JobKind::Stop, u.as_str()))
            .collect();
        systemd.run_jobs(&jobs, job_timeout).await?;
        println!("systemd: stopped {} units", jobs.len());
    }
    if !host.disk.entries.is_empty() {
        // Links first, then the files they point at.
        let mut paths: Vec<&PathBuf> = host.disk.entries.keys().collect();
        paths.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for rel in paths {
            files::remove_entry(unit_dir, rel)?;
        }
        systemd.daemon_reload().await?;
        let _ = std::fs::remove_file(crate::watch::APPLIED_CONFIG);
        println!(
            "units: removed {} files and links, daemon-reload",
            host.disk.entries.len()
        );
    }
    Ok(())
}
