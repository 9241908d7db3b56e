//! The executor: observes a [`Host`], plans once, and carries the plan out
//! in the order that never costs a request: check the nginx candidates,
//! write units and start new workers, route the workers that came up
//! (reloading nginx only if the generation it serves differs), drain, stop
//! what goes away, move the workers of pools that switched queues onto
//! their new sockets, remove files that are no longer wanted, then watch.
//!
//! Every step is idempotent and the plan is derived from what the host
//! really does, so a run cut short at any point (an error, SIGINT or
//! SIGTERM between steps, or SIGKILL anywhere) is finished by the next one.
pub mod host;
pub mod interrupt;
pub mod ssh_host;
mod unit_list;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;

use crate::plan::{self, Desired, Observed, Pending, Plan, WatchAction, WATCH_UNIT};
use crate::systemd::{Job, JobKind};
use anyhow::{bail, Context, Result};
use host::{Drain, Host};
use interrupt::Interrupt;
use std::collections::BTreeSet;
use std::path::PathBuf;
use unit_list::unit_list;

/// The nginx candidates failed `nginx -t` in phase 1, before anything on
/// the host changed. apply records the previous intent again on this error:
/// an intent nginx rejects could never converge, and watch would retry it.
#[derive(Debug)]
pub struct NginxRejected;

impl std::fmt::Display for NginxRejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("nginx's live files are as they were; no unit was changed")
    }
}

/// What a run did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Workers that did not come up or roll (reported, not fatal: nginx
    /// routes to the ones that did).
    pub problems: Vec<String>,
}

/// Reads what the host has now.
pub async fn observe(host: &mut impl Host) -> Result<(Observed, Vec<PathBuf>)> {
    let disk = host.read_unit_dir().await?;
    let units = host.list_units(&["cgipool.target", "cgipool-*"]).await?;
    let nginx = host.nginx().await?;
    let pending = host.read_pending().await?;
    Ok((
        Observed {
            pending,
            files: disk.entries,
            active: units
                .into_iter()
                .map(|u| (u.name, u.active_state))
                .collect(),
            nginx,
        },
        disk.foreign,
    ))
}

/// Plans without changing anything (`--dry-run`).
pub async fn plan_only(host: &mut impl Host, desired: &Desired) -> Result<Plan> {
    let (observed, foreign) = observe(host).await?;
    refuse_foreign(desired, &foreign)?;
    Ok(plan::plan(desired, &observed))
}

fn refuse_foreign(desired: &Desired, foreign: &[PathBuf]) -> Result<()> {
    if let Some(f) = foreign.iter().find(|f| {
        f.file_name()
            .map(|n| desired.units.entries.contains_key(&PathBuf::from(n)))
            .unwrap_or(false)
    }) {
        bail!(
            "{} exists without cgipool's header; refusing to overwrite it (move it away)",
            f.display()
        );
    }
    Ok(())
}

/// Converges the host to `desired`; prints what it does. A step that
/// fails once a signal came (a child it ran got the signal too) reports the
/// interruption, with the step's error as the reason.
pub async fn converge(
    host: &mut impl Host,
    desired: &Desired,
    stop: &Interrupt,
) -> Result<Outcome> {
    match converge_steps(host, desired, stop).await {
        Err(e) if e.downcast_ref::<interrupt::Interrupted>().is_none() => {
            match stop.check(&format!("a step, which then failed: {e:#}")) {
                Err(interrupted) => Err(interrupted),
                Ok(()) => Err(e),
            }
        }
        other => other,
    }
}

async fn converge_steps(
    host: &mut impl Host,
    desired: &Desired,
    stop: &Interrupt,
) -> Result<Outcome> {
    if host.nginx_recover().await? {
        println!("nginx: put back the files an interrupted run had begun to write");
    }
    let (observed, foreign) = observe(host).await?;
    refuse_foreign(desired, &foreign)?;
    let plan = plan::plan(desired, &observed);
    if plan.is_empty() {
        println!("no changes");
        return Ok(Outcome::default());
    }
    if desired.routes.is_some() && observed.nginx.is_none() {
        println!("nginx: skipped (its unit is not active or nginx is not installed)");
    }
    let mut problems = Vec::new();
    check_nginx(host, &plan, stop).await?;
    // Recorded before the unit files change: once written, they no longer
    // show that systemd must reload them and workers must roll.
    let mut pending = Pending {
        daemon_reload: plan.daemon_reload || plan.reload_after_stop,
        roll: plan.roll.clone(),
        restart_watch: plan.watch == Some(WatchAction::Restart),
        moves: plan.moves.clone(),
    };
    if pending != observed.pending {
        host.write_pending(&pending).await?;
    }
    write_units(host, &plan, desired, stop).await?;
    if plan.daemon_reload {
        pending.daemon_reload = false;
        host.write_pending(&pending).await?;
    }
    let recorded_watch = pending.restart_watch;
    start_and_roll(host, &plan, stop, &mut problems, &mut pending).await?;
    let drain = route(host, &plan, desired, &observed, stop).await?;
    stop_units(host, &plan, drain, stop).await?;
    move_workers(host, &plan, desired, stop, &mut problems, &mut pending).await?;
    remove_files(host, &plan, stop).await?;
    if plan.reload_after_stop {
        // remove_files reloaded already when it removed anything.
        if plan.remove.is_empty() {
            stop.check("daemon-reload")?;
            host.daemon_reload().await?;
            println!("systemd: daemon-reload");
        }
        pending.daemon_reload = false;
        host.write_pending(&pending).await?;
    }
    if recorded_watch {
        // Cleared before the restart: when watch itself converges, the
        // restart ends this process. Rolls that did not complete stay
        // recorded for the next run.
        pending.restart_watch = false;
        host.write_pending(&pending).await?;
    }
    watch(host, &plan, stop, &mut problems).await?;
    Ok(Outcome { problems })
}

/// Phase 1: the nginx files the plan expects pass `nginx -t` before any
/// unit changes (in a view of their own: routing comes later). Many
/// hosts: apply runs it on the front before any other host changes, too.
pub(crate) async fn check_nginx(host: &mut impl Host, plan: &Plan, stop: &Interrupt) -> Result<()> {
    let Some(route) = plan.route.as_ref().filter(|_| plan.nginx_check) else {
        return Ok(());
    };
    stop.check("checking the nginx files")?;
    // Only a rejection by nginx -t makes apply record the previous intent
    // again; any other failure is retried like one of any other step.
    host.nginx_install(&route.expected, false)
        .await
        .map_err(|e| {
            if e.downcast_ref::<crate::nginx::Rejected>().is_some() {
                e.context(NginxRejected)
            } else {
                e
            }
        })?;
    println!("nginx: candidate files pass nginx -t");
    Ok(())
}

/// Phase 2: unit files and links, then one daemon-reload.
async fn write_units(
    host: &mut impl Host,
    plan: &Plan,
    desired: &Desired,
    stop: &Interrupt,
) -> Result<()> {
    if plan.write.is_empty() && plan.unlink.is_empty() && !plan.daemon_reload {
        return Ok(());
    }
    stop.check("writing unit files")?;
    for rel in &plan.write {
        if let Some(entry) = desired.units.entries.get(rel) {
            host.write_entry(rel, entry).await?;
        }
    }
    for rel in &plan.unlink {
        host.remove_entry(rel).await?;
    }
    if !plan.write.is_empty() || !plan.unlink.is_empty() {
        println!(
            "units: wrote {} and unlinked {}",
            plan.write.len(),
            plan.unlink.len()
        );
    }
    if plan.daemon_reload {
        stop.check("daemon-reload")?;
        host.daemon_reload().await?;
        println!("systemd: daemon-reload");
    }
    Ok(())
}

fn services(units: &[String]) -> Vec<String> {
    units
        .iter()
        .filter(|u| u.ends_with(".service"))
        .cloned()
        .collect()
}

/// Phase 3: reset and start new workers, then roll changed ones one at a time.
async fn start_and_roll(
    host: &mut impl Host,
    plan: &Plan,
    stop: &Interrupt,
    problems: &mut Vec<String>,
    pending: &mut Pending,
) -> Result<()> {
    for unit in &plan.reset_failed {
        host.reset_failed(unit).await?;
    }
    if !plan.start.is_empty() {
        stop.check("starting workers")?;
        let jobs: Vec<Job> = plan
            .start
            .iter()
            .map(|u| Job::new(JobKind::Start, u))
            .collect();
        let started = match stop.guard("starting workers", host.run_jobs(&jobs)).await? {
            Ok(()) => host.not_active(&services(&plan.start)).await?,
            Err(e) => vec![format!("{e:#}")],
        };
        if started.is_empty() {
            println!("systemd: started {}", unit_list(&plan.start));
        } else {
            problems.push(format!(
                "workers are not healthy after starting: {}",
                started.join("; ")
            ));
        }
    }
    for group in &plan.roll {
        stop.check("rolling restarts")?;
        let jobs: Vec<Job> = group
            .iter()
            .map(|u| Job::new(JobKind::Restart, u))
            .collect();
        let rolled = match stop
            .guard("a rolling restart", host.run_jobs(&jobs))
            .await?
        {
            Ok(()) => host.not_active(&services(group)).await?,
            Err(e) => vec![format!("{e:#}")],
        };
        if !rolled.is_empty() {
            // Stop rolling: taking more workers down would cost capacity.
            problems.push(format!(
                "rolling restart stopped at {}: {}",
                group.join(" + "),
                rolled.join("; ")
            ));
            break;
        }
        println!("systemd: restarted {}", unit_list(group));
        pending.roll.retain(|g| g != group);
        host.write_pending(pending).await?;
    }
    Ok(())
}

/// Phase 4: nginx routes to the wanted workers that systemd reports active
/// now; files are installed (nginx -t) if they differ, and nginx reloads if
/// the generation it serves differs. Returns the old nginx workers to drain.
async fn route(
    host: &mut impl Host,
    plan: &Plan,
    desired: &Desired,
    observed: &Observed,
    stop: &Interrupt,
) -> Result<Option<Drain>> {
    let (Some(step), Some(routes), Some(before)) = (&plan.route, &desired.routes, &observed.nginx)
    else {
        return Ok(None);
    };
    stop.check("routing nginx")?;
    let units = host.list_units(&["cgipool-*@*.service"]).await?;
    let active: BTreeSet<String> = units
        .into_iter()
        .filter(|u| u.active_state == "active")
        .map(|u| u.name)
        .collect();
    let workers = plan::workers_where(&desired.instances, |unit| {
        active.contains(unit) && !desired.exclude.contains(unit)
    });
    let files = routes.render(&workers);
    if files != step.expected {
        let missing: Vec<String> = desired
            .instances
            .iter()
            .flat_map(|(p, ns)| ns.iter().map(move |n| (p, *n)))
            .filter(|(p, n)| !workers.get(*p).map(|w| w.contains(n)).unwrap_or(false))
            .map(|(p, n)| format!("{p}@{n}"))
            .collect();
        println!(
            "nginx: leaving out workers that are not active or not healthy: {}",
            missing.join(", ")
        );
    }
    // The files on disk now are the ones observed: the check put its
    // candidates back.
    if !before.files_match(&files) {
        host.nginx_install(&files, true).await?;
        println!("nginx: files written, nginx -t passed");
    }
    if before.served.as_deref() == Some(files.generation.as_str()) {
        return Ok(None);
    }
    stop.check("reloading nginx")?;
    let drain = stop
        .guard("reloading nginx", host.nginx_reload(&files.generation))
        .await??;
    println!("nginx: reloaded, serving generation {}", files.generation);
    Ok(Some(drain))
}

/// Phase 5: once the old nginx workers have finished, stop what goes away.
async fn stop_units(
    host: &mut impl Host,
    plan: &Plan,
    drain: Option<Drain>,
    stop: &Interrupt,
) -> Result<()> {
    if plan.stop.is_empty() && plan.moves.is_empty() {
        return Ok(());
    }
    if let Some(d) = &drain {
        stop.guard("draining nginx", host.nginx_drain(d))
            .await?
            .context("draining nginx before stopping workers")?;
    }
    if plan.stop.is_empty() {
        return Ok(());
    }
    stop.check("stopping units")?;
    let jobs: Vec<Job> = plan
        .stop
        .iter()
        .map(|u| Job::new(JobKind::Stop, u))
        .collect();
    stop.guard("stopping units", host.run_jobs(&jobs)).await??;
    println!("systemd: stopped {}", unit_list(&plan.stop));
    Ok(())
}

/// Phase 5b: workers of pools that switched queues restart one at a time;
/// nginx routes to their new sockets and their old sockets are stopped, so
/// each comes back holding only its new socket, which has queued the
/// connections meanwhile.
async fn move_workers(
    host: &mut impl Host,
    plan: &Plan,
    desired: &Desired,
    stop: &Interrupt,
    problems: &mut Vec<String>,
    pending: &mut Pending,
) -> Result<()> {
    if plan.moves.is_empty() {
        return Ok(());
    }
    let sockets = host.list_units(&["cgipool-*.socket"]).await?;
    let listening: BTreeSet<String> = sockets
        .into_iter()
        .filter(|u| u.active_state == "active")
        .map(|u| u.name)
        .collect();
    for unit in &plan.moves {
        stop.check("moving workers to their new sockets")?;
        let target = plan::parse_instance(unit).and_then(|(pool, n, _)| {
            desired
                .shared
                .contains(pool)
                .then(|| plan::pool_socket(pool))
                .or_else(|| Some(plan::socket(pool, n)))
        });
        if let Some(socket) = target.filter(|s| !listening.contains(s)) {
            // Restarting it now would leave it with no socket; it stays
            // recorded and moves once its socket runs.
            problems.push(format!("{unit} stays where it is: {socket} is not active"));
            continue;
        }
        let job = [Job::new(JobKind::Restart, unit)];
        let moved = match stop.guard("moving a worker", host.run_jobs(&job)).await? {
            Ok(()) => {
                // Restarted: it holds its new socket (or failed, and the
                // next run starts it like any worker that is not active).
                pending.moves.retain(|u| u != unit);
                host.write_pending(pending).await?;
                host.not_active(std::slice::from_ref(unit)).await?
            }
            // Stays recorded: the next run moves it.
            Err(e) => vec![format!("{e:#}")],
        };
        if !moved.is_empty() {
            // The others still move: each one left holds only its old
            // socket, which nginx no longer routes to.
            problems.push(format!(
                "{unit} did not come back on its new socket: {}",
                moved.join("; ")
            ));
            continue;
        }
        println!("systemd: restarted {unit} (moved to its new socket)");
    }
    Ok(())
}

/// Phase 6: unit files of what went away, then a daemon-reload.
async fn remove_files(host: &mut impl Host, plan: &Plan, stop: &Interrupt) -> Result<()> {
    if plan.remove.is_empty() {
        return Ok(());
    }
    stop.check("removing unit files")?;
    for rel in &plan.remove {
        host.remove_entry(rel).await?;
    }
    host.daemon_reload().await?;
    println!(
        "systemd: removed {} unit files, daemon-reload",
        plan.remove.len()
    );
    Ok(())
}

/// Last: the watch daemon, once everything it watches is in place.
async fn watch(
    host: &mut impl Host,
    plan: &Plan,
    stop: &Interrupt,
    problems: &mut Vec<String>,
) -> Result<()> {
    let Some(action) = plan.watch else {
        return Ok(());
    };
    stop.check("starting watch")?;
    let kind = match action {
        WatchAction::Start => JobKind::Start,
        WatchAction::Restart => JobKind::Restart,
    };
    match stop
        .guard(
            "starting watch",
            host.run_jobs(&[Job::new(kind, WATCH_UNIT)]),
        )
        .await?
    {
        Ok(()) => println!("systemd: {kind}ed {WATCH_UNIT}"),
        Err(e) => problems.push(format!("{e:#}")),
    }
    Ok(())
}
