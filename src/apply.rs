//! The commands that converge a host: `apply`, `scale` and `down`, and the
//! converge that watch runs. Each takes the lock, records its intent (see
//! [`crate::state`]) before it touches anything, builds the desired state
//! from the recorded intent, and runs the executor against the real host.
use crate::config::Config;
use crate::exec::host::{Bus, RealHost};
use crate::exec::interrupt::Interrupt;
use crate::exec::ssh_host::SshHost;
use crate::exec::{self, Outcome};
use crate::files;
use crate::hosts;
use crate::plan::{self, Desired, Routes, Workers};
use crate::render;
use crate::state::{self, Decision, Intent, Lock, Paths};
use crate::systemd::Systemd;
use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const SYSTEM_UNIT_DIR: &str = "/etc/systemd/system";
pub const RUNTIME_UNIT_DIR: &str = "/run/systemd/system";

/// How long old nginx workers may take to finish their requests after a
/// reload before a scale-down gives up (the intent stays recorded).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// The desired state of `cfg` at `counts` in `unit_dir`. Pure.
pub fn desired(cfg: &Config, counts: &BTreeMap<String, u32>, unit_dir: &Path) -> Desired {
    // The front's workers (every pool's, without `[host]` sections).
    let front = crate::hosts::front_counts(cfg, counts);
    Desired {
        units: render::units(cfg, unit_dir, counts),
        instances: plan::numbered(&front),
        routes: Some(routes(cfg.clone(), &BTreeMap::new())),
        exclude: BTreeSet::new(),
        leave_failed: false,
        shared: cfg
            .pools
            .values()
            .filter(|p| p.queue == crate::config::Queue::Shared && front.contains_key(&p.name))
            .map(|p| p.name.clone())
            .collect(),
    }
}

/// How nginx routes a set of workers of `cfg`, leaving out the other hosts
/// `hosts_out` names per pool (watch: hosts lost, or whose pool is down).
fn routes(cfg: Config, hosts_out: &BTreeMap<String, BTreeSet<String>>) -> Routes {
    let mut routed = cfg;
    for (pool, out) in hosts_out {
        if let Some(p) = routed.pools.get_mut(pool) {
            p.hosts
                .retain(|h| h == crate::config::LOCAL_HOST || !out.contains(h));
        }
    }
    Routes::new(move |w: &Workers| render::nginx(&routed, &as_lists(w)))
}

fn as_lists(w: &Workers) -> BTreeMap<String, Vec<u32>> {
    w.iter()
        .map(|(p, s)| (p.clone(), s.iter().copied().collect()))
        .collect()
}

/// Options every converging command shares.
#[derive(Debug, Clone)]
pub struct Options {
    pub job_timeout: Duration,
    /// Services nginx must not route to (watch's failed probes).
    pub exclude: BTreeSet<String>,
    /// Leave `failed` workers alone (watch).
    pub leave_failed: bool,
    /// Per pool, the other hosts nginx must not route to (watch: the hosts
    /// it lost, or where the pool's socket or workers are not active).
    pub hosts_out: BTreeMap<String, BTreeSet<String>>,
}

impl Options {
    pub fn operator(job_timeout: Duration) -> Options {
        Options {
            job_timeout,
            exclude: BTreeSet::new(),
            leave_failed: false,
            hosts_out: BTreeMap::new(),
        }
    }
}

async fn real_host(
    cfg: &Config,
    unit_dir: &Path,
    paths: &Paths,
    opts: &Options,
) -> Result<RealHost> {
    Ok(RealHost {
        bus: Bus {
            systemd: Systemd::connect().await?,
            job_timeout: opts.job_timeout,
        },
        unit_dir: unit_dir.to_path_buf(),
        nginx: cfg.nginx.clone(),
        paths: paths.clone(),
        drain_timeout: DRAIN_TIMEOUT,
    })
}

/// Converges the host to the recorded intent, under `lock`.
pub async fn converge(
    lock: &Lock,
    intent: &Intent,
    opts: &Options,
    stop: &Interrupt,
) -> Result<Outcome> {
    let cfg = intent.config()?;
    let mut remotes = hosts::connect_all(&cfg, &intent.unit_dir, opts.job_timeout).await?;
    converge_on(lock, intent, opts, stop, &mut remotes).await
}

/// watch's converge: the front alone, routing to no host of
/// `opts.hosts_out`. watch converges the other hosts that answer itself,
/// each on its own (see `watch::hosts`), so a host that does not answer
/// never holds the front.
pub async fn converge_front(
    lock: &Lock,
    intent: &Intent,
    opts: &Options,
    stop: &Interrupt,
) -> Result<Outcome> {
    converge_on(lock, intent, opts, stop, &mut []).await
}

/// Converges the other hosts (each checked) and then the front, which
/// routes to them last.
async fn converge_on(
    lock: &Lock,
    intent: &Intent,
    opts: &Options,
    stop: &Interrupt,
    remotes: &mut [SshHost],
) -> Result<Outcome> {
    let cfg = intent.config()?;
    let mut d = desired(&cfg, &intent.counts, &intent.unit_dir);
    d.exclude = opts.exclude.clone();
    d.leave_failed = opts.leave_failed;
    if !opts.hosts_out.is_empty() {
        d.routes = Some(routes(cfg.clone(), &opts.hosts_out));
    }
    let mut host = real_host(&cfg, &intent.unit_dir, lock.paths(), opts).await?;
    if !remotes.is_empty() {
        // The front's nginx takes the new files before any host changes.
        let plan = exec::plan_only(&mut host, &d).await?;
        exec::check_nginx(&mut host, &plan, stop).await?;
    }
    let goal = hosts::Goal {
        cfg: &cfg,
        counts: &intent.counts,
        unit_dir: &intent.unit_dir,
        leave_failed: opts.leave_failed,
    };
    hosts::converge_all(remotes, goal, stop).await?;
    exec::converge(&mut host, &d, stop).await
}

/// Fails with the workers that did not come up (the host is otherwise
/// converged: nginx routes to the ones that did).
fn finish(outcome: Outcome) -> Result<()> {
    if !outcome.problems.is_empty() {
        bail!(
            "some workers are not healthy (nginx routes only to the healthy ones): {}",
            outcome.problems.join("; ")
        );
    }
    Ok(())
}

/// The counts of the previous intent, or (no intent recorded: a host set up
/// by an older cgipool, or whose state was lost) what the unit directory's
/// pool targets want.
fn previous_counts(previous: Option<&Intent>, unit_dir: &Path) -> Result<Option<Intent>> {
    if previous.is_some() {
        return Ok(previous.cloned());
    }
    let on_disk = plan::instances_on_disk(&files::read_unit_dir(unit_dir)?.entries);
    if on_disk.is_empty() {
        return Ok(None);
    }
    Ok(Some(Intent {
        serial: 0,
        config_path: PathBuf::new(),
        config_text: String::new(),
        counts: on_disk
            .into_iter()
            .map(|(p, ns)| (p, ns.len() as u32))
            .collect(),
        unit_dir: unit_dir.to_path_buf(),
        written_by: "disk".into(),
        at_unix: 0,
    }))
}

/// What `cgipool apply` was asked for.
pub struct ApplyRequest {
    pub cfg: Config,
    pub config_path: PathBuf,
    pub config_text: String,
    pub unit_dir: PathBuf,
    pub dry_run: bool,
}

/// `cgipool apply`: record the config and the counts, then converge.
pub async fn apply(req: ApplyRequest, opts: &Options, stop: &Interrupt) -> Result<()> {
    let paths = Paths::host();
    if req.dry_run {
        let previous = state::read_intent(&paths).ok().flatten();
        let previous = previous_counts(previous.as_ref(), &req.unit_dir)?;
        let counts = Intent::counts_for(previous.as_ref(), &req.cfg);
        let d = desired(&req.cfg, &counts, &req.unit_dir);
        let mut remotes = hosts::connect_all(&req.cfg, &req.unit_dir, opts.job_timeout).await?;
        let goal = hosts::Goal {
            cfg: &req.cfg,
            counts: &counts,
            unit_dir: &req.unit_dir,
            leave_failed: false,
        };
        for (name, plan) in hosts::plans(&mut remotes, goal).await? {
            print!("{name}:\n{plan}");
        }
        let mut host = real_host(&req.cfg, &req.unit_dir, &paths, opts).await?;
        if !remotes.is_empty() {
            println!("front:");
        }
        print!("{}", exec::plan_only(&mut host, &d).await?);
        return Ok(());
    }
    let lock = state::lock(&paths, opts.job_timeout)?;
    let recorded = match state::read_intent(&paths) {
        Ok(i) => i,
        Err(e) => {
            println!("note: {e:#}; recording a new intent");
            None
        }
    };
    // Every host answers before anything is recorded or changed: those of
    // the config, and those the applied config had that it no longer names.
    let mut remotes = hosts::connect_all(&req.cfg, &req.unit_dir, opts.job_timeout).await?;
    let before = recorded
        .as_ref()
        .and_then(|i| i.config().ok().map(|c| (c, i.unit_dir.clone())));
    let mut gone = match &before {
        Some((old, dir)) => hosts::connect_gone(old, &req.cfg, dir, opts.job_timeout).await?,
        None => Vec::new(),
    };
    let previous = previous_counts(recorded.as_ref(), &req.unit_dir)?;
    let counts = Intent::counts_for(previous.as_ref(), &req.cfg);
    let intent = state::write_intent(
        &lock,
        Intent {
            serial: 0,
            config_path: req.config_path,
            config_text: req.config_text,
            counts,
            unit_dir: req.unit_dir,
            written_by: "apply".into(),
            at_unix: 0,
        },
    )?;
    let outcome = match converge_on(&lock, &intent, opts, stop, &mut remotes).await {
        Err(e) if e.downcast_ref::<exec::NginxRejected>().is_some() => {
            return Err(record_again(&lock, recorded, e));
        }
        outcome => outcome?,
    };
    // The front no longer routes to the hosts the config dropped.
    hosts::down_all(&mut gone, stop).await?;
    finish(outcome)
}

/// After nginx rejected the new config before anything changed: the
/// intent recorded before this apply becomes the intent again (with a new
/// serial), so that watch does not keep retrying a config that can never
/// converge. Returns `rejected` with what was recorded.
fn record_again(lock: &Lock, recorded: Option<Intent>, rejected: anyhow::Error) -> anyhow::Error {
    let again = match recorded {
        Some(previous) => {
            let from = previous.serial;
            state::write_intent(lock, previous).map(|i| {
                format!(
                    "the previous intent ({from}) is recorded again as {}",
                    i.serial
                )
            })
        }
        None => state::remove_intent(lock).map(|()| "no intent is recorded".to_string()),
    };
    match again {
        Ok(what) => rejected.context(format!("nothing changed, {what}")),
        Err(e) => rejected.context(format!(
            "nothing changed, but the rejected config stays recorded (watch will retry it): {e:#}"
        )),
    }
}

/// Bad usage (exit 2): nothing was changed.
#[derive(Debug)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

/// `cgipool scale POOL N`: changes only the count in the recorded intent
/// (never rolls out edits of the config file that were not applied).
pub async fn scale(
    pool: &str,
    count: u32,
    config_file: &Path,
    opts: &Options,
    stop: &Interrupt,
) -> Result<()> {
    let paths = Paths::host();
    let lock = state::lock(&paths, opts.job_timeout)?;
    let Some(mut intent) = state::read_intent(&paths)? else {
        return Err(Refused(
            "nothing has been applied on this host yet: run `cgipool apply` first".into(),
        )
        .into());
    };
    let cfg = intent.config()?;
    let Some(p) = cfg.pools.get(pool) else {
        let known: Vec<&String> = cfg.pools.keys().collect();
        return Err(Refused(format!(
            "no pool named {pool:?} in the applied config (pools: {known:?})"
        ))
        .into());
    };
    if count < p.min || count > p.max {
        return Err(Refused(format!(
            "pool {pool}: {count} is outside [min, max] = [{}, {}] of the applied config ({})",
            p.min,
            p.max,
            intent.config_path.display()
        ))
        .into());
    }
    if let Ok(text) = std::fs::read_to_string(config_file) {
        if text != intent.config_text {
            println!(
                "note: {} differs from the applied config; scale changes only the count (run `cgipool apply` to roll the edits out)",
                config_file.display()
            );
        }
    }
    let from = intent.counts.get(pool).copied().unwrap_or(p.min);
    intent.counts.insert(pool.to_string(), count);
    intent.written_by = "scale".into();
    let intent = state::write_intent(&lock, intent)?;
    state::log_decision(
        &paths,
        &Decision {
            at_unix: intent.at_unix,
            by: "scale".into(),
            pool: pool.to_string(),
            from,
            to: count,
            reason: "cgipool scale".into(),
            serial: intent.serial,
        },
    )
    .context("logging the decision")?;
    let outcome = converge(&lock, &intent, opts, stop).await?;
    finish(outcome)
}

/// `cgipool down`: forget the intent (so nothing converges back), route
/// nothing, stop every unit that carries cgipool's header, remove its files.
pub async fn down(
    fallback: Option<Config>,
    unit_dir: &Path,
    skip_unreachable: bool,
    opts: &Options,
    stop: &Interrupt,
) -> Result<()> {
    let paths = Paths::host();
    let lock = state::lock(&paths, opts.job_timeout)?;
    let intent = state::read_intent(&paths).ok().flatten();
    let (cfg, unit_dir) = match &intent {
        Some(i) => (i.config()?, i.unit_dir.clone()),
        None => match fallback {
            Some(cfg) => (cfg, unit_dir.to_path_buf()),
            None => bail!("nothing is recorded on this host and no config was given"),
        },
    };
    // Every host answers before the intent is forgotten, unless the
    // operator said to go on without the ones that do not.
    let (mut remotes, unreachable) =
        hosts::connect_reachable(&cfg, &unit_dir, opts.job_timeout).await;
    if !unreachable.is_empty() && !skip_unreachable {
        bail!(
            "{}; nothing was changed on any host (`cgipool down --skip-unreachable` takes down the front and the hosts that answer)",
            unreachable.join("; ")
        );
    }
    let config_path = intent.as_ref().map(|i| i.config_path.clone());
    state::remove_intent(&lock)?;
    let mut empty = cfg.clone();
    empty.pools.clear();
    empty.watch_enabled = false;
    // Not even cgipool.target: every unit file of ours goes.
    let d = Desired {
        units: render::UnitTree::default(),
        ..desired(&empty, &BTreeMap::new(), &unit_dir)
    };
    let mut host = real_host(&cfg, &unit_dir, &paths, opts).await?;
    if !remotes.is_empty() {
        println!("front:");
    }
    // The front stops routing first, then the other hosts stop their workers.
    finish(exec::converge(&mut host, &d, stop).await?)?;
    hosts::down_all(&mut remotes, stop).await?;
    for why in &unreachable {
        let again = match &config_path {
            Some(p) => format!("cgipool down {}", p.display()),
            None => "cgipool down CONFIG".to_string(),
        };
        eprintln!(
            "warning: {why}: cgipool's units stay there (its workers take requests from nobody: the front no longer routes to it); once it answers, `{again}` removes them"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_watch_left_out_leave_the_upstream() {
        let cfg = crate::config::parse(
            Path::new("t.toml"),
            "[nginx]\nfront_address = \"10.0.0.10\"\n\
             [host.web1]\naddress = \"root@10.0.0.11\"\n[host.web2]\naddress = \"root@10.0.0.12\"\n\
             [pool.a]\nexec = \"/bin/a\"\nroute = \"/a\"\nhosts = [\"web1\", \"web2\"]\nport = 9001\n",
        )
        .expect("parses");
        let none = Workers::new();
        let out = |hosts: &[&str]| {
            BTreeMap::from([(
                "a".to_string(),
                hosts.iter().map(|h| h.to_string()).collect::<BTreeSet<_>>(),
            )])
        };
        let all = routes(cfg.clone(), &BTreeMap::new()).render(&none);
        assert!(
            all.upstreams.contains("server 10.0.0.11:9001 ")
                && all.upstreams.contains("server 10.0.0.12:9001 "),
            "{}",
            all.upstreams
        );
        let one = routes(cfg.clone(), &out(&["web2"])).render(&none);
        assert!(
            one.upstreams.contains("server 10.0.0.11:9001 ")
                && !one.upstreams.contains("10.0.0.12"),
            "{}",
            one.upstreams
        );
        assert_ne!(one.generation, all.generation);
        // Every host out and none on the front: the route answers 503.
        let neither = routes(cfg, &out(&["web1", "web2"])).render(&none);
        assert!(
            !neither.upstreams.contains("upstream cgipool_a"),
            "{}",
            neither.upstreams
        );
        assert!(neither.locations.contains("no healthy workers"));
    }
}
