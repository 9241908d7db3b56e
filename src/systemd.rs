//! systemd over D-Bus: the one module that talks to org.freedesktop.systemd1
//! (list units, daemon-reload, queue jobs and wait for them, read health).
//! `src/` never runs systemctl.
use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::Duration;
use zbus::fdo::PropertiesProxy;
use zbus::names::InterfaceName;
use zbus::wire::{OwnedVariant, Variant};
use zbus_systemd::systemd1::ManagerProxy;

/// One line of ListUnitsByPatterns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitState {
    pub name: String,
    pub load_state: String,
    pub active_state: String,
    pub sub_state: String,
    pub path: String,
}

/// What `status` and the executor read back from a service unit, uncached.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ServiceDetails {
    pub unit: String,
    pub active_state: String,
    pub sub_state: String,
    pub result: String,
    pub n_restarts: Option<u32>,
    pub main_pid: Option<u32>,
    pub memory_bytes: Option<u64>,
    pub cpu_nsec: Option<u64>,
    /// Microseconds since the epoch when the unit last entered `active`.
    pub active_since_usec: Option<u64>,
    pub invocation_id: String,
    /// The worker's last sd_notify `STATUS=` (see `worker_status`).
    pub status_text: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    Start,
    Stop,
    Restart,
    Reload,
}

impl fmt::Display for JobKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            JobKind::Start => "start",
            JobKind::Stop => "stop",
            JobKind::Restart => "restart",
            JobKind::Reload => "reload",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub kind: JobKind,
    pub unit: String,
}

impl Job {
    pub fn new(kind: JobKind, unit: impl Into<String>) -> Job {
        Job {
            kind,
            unit: unit.into(),
        }
    }
}

/// Method calls one connection keeps in flight at most (dbus-daemon allows
/// 128 pending replies per connection).
const MAX_CALLS_IN_FLIGHT: usize = 64;

/// Jobs queued and not yet finished at most. systemd adds a D-Bus match rule
/// for every job a client is waiting on, and dbus-daemon refuses PID 1 more
/// than 512 (max_match_rules_per_connection): past that systemd loses the
/// bus (seen with 800 start jobs queued at once). And every job in the window
/// runs at once: systemd forks each worker, whose sandbox is set up in
/// parallel on the machine's cores, and a `Type=exec` start must be done
/// within the worker's start timeout (90 s by default). With 128 at once,
/// some of 1,000 workers on 2 busy cores ran out of it; a window of 32 keeps
/// every start short and the cores just as busy. Stop jobs fork nothing:
/// they take half of what the bus allows (256 of 512 match rules, leaving
/// room for other clients' jobs).
const MAX_PENDING_STARTS: usize = 32;
const MAX_PENDING_STOPS: usize = 256;

pub struct Systemd {
    conn: zbus::Connection,
    manager: ManagerProxy<'static>,
}

impl Systemd {
    /// Connects to the system bus and subscribes to systemd's signals.
    pub async fn connect() -> Result<Systemd> {
        let conn = zbus::Connection::system()
            .await
            .context("connecting to the D-Bus system bus (is systemd running as PID 1?)")?;
        Systemd::over(conn).await
    }

    /// systemd on the bus at the other end of `conn` (another host's, see
    /// `remote`), subscribed to its signals.
    pub async fn over(conn: zbus::Connection) -> Result<Systemd> {
        let manager = ManagerProxy::new(&conn)
            .await
            .context("creating the systemd1 Manager proxy")?;
        manager
            .subscribe()
            .await
            .context("subscribing to systemd's signals")?;
        Ok(Systemd { conn, manager })
    }

    /// All loaded units matching the glob patterns, in one round trip.
    pub async fn list(&self, patterns: &[&str]) -> Result<Vec<UnitState>> {
        let pats = patterns.iter().map(|p| p.to_string()).collect();
        let units = self
            .manager
            .list_units_by_patterns(Vec::new(), pats)
            .await
            .context("ListUnitsByPatterns")?;
        Ok(units
            .into_iter()
            .map(|u| UnitState {
                name: u.0,
                load_state: u.2,
                active_state: u.3,
                sub_state: u.4,
                path: u.6.to_string(),
            })
            .collect())
    }

    /// One unit's state, loaded or not (LoadUnit: a unit nobody loaded
    /// reads `not-found`/`inactive`, like `systemctl show` says).
    pub async fn unit_state(&self, unit: &str) -> Result<UnitState> {
        let path = self
            .manager
            .load_unit(unit.to_string())
            .await
            .with_context(|| format!("LoadUnit({unit})"))?;
        let props = PropertiesProxy::builder(&self.conn)
            .destination("org.freedesktop.systemd1")
            .path(path.clone())
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await?;
        let all = props
            .get_all(InterfaceName::from_static_str(
                "org.freedesktop.systemd1.Unit",
            )?)
            .await
            .with_context(|| format!("reading properties of {unit}"))?;
        Ok(UnitState {
            name: unit.to_string(),
            load_state: string(&all, "LoadState"),
            active_state: string(&all, "ActiveState"),
            sub_state: string(&all, "SubState"),
            path: path.to_string(),
        })
    }

    /// daemon-reload; systemd answers once the reload is done.
    pub async fn daemon_reload(&self) -> Result<()> {
        self.manager
            .reload()
            .await
            .context("daemon-reload (Manager.Reload)")
    }

    /// Clears a unit's failed state and start-limit counter.
    pub async fn reset_failed(&self, unit: &str) -> Result<()> {
        self.manager
            .reset_failed_unit(unit.to_string())
            .await
            .with_context(|| format!("reset-failed {unit}"))
    }

    /// Sends SIGKILL to every process of a unit (KillUnit, whom "all");
    /// systemd then restarts the unit as its `Restart=` says.
    pub async fn kill_all(&self, unit: &str) -> Result<()> {
        self.manager
            .kill_unit(unit.to_string(), "all".to_string(), nix::libc::SIGKILL)
            .await
            .with_context(|| format!("KillUnit({unit}, all, SIGKILL)"))
    }

    /// Queues `jobs` (mode "replace") and waits for every one of them to be
    /// removed. `stall` bounds the progress, not the whole run: the wait
    /// fails when no job was queued or finished for that long (1,000 workers
    /// take longer than any fixed limit for one, and each job has systemd's
    /// own timeout). Any result but `done` is an error naming the unit. The
    /// JobRemoved stream is opened before the first job is queued.
    /// Stop jobs go through `stop_units` (the targets' transactions).
    pub async fn run_jobs(&self, jobs: &[Job], stall: Duration) -> Result<()> {
        if !jobs.is_empty() && jobs.iter().all(|j| j.kind == JobKind::Stop) {
            let units: Vec<String> = jobs.iter().map(|j| j.unit.clone()).collect();
            return self.stop_units(&units, stall).await;
        }
        self.queue_jobs(jobs, stall).await
    }

    /// `run_jobs`, one job (and transaction) each.
    async fn queue_jobs(&self, jobs: &[Job], stall: Duration) -> Result<()> {
        if jobs.is_empty() {
            return Ok(());
        }
        let (mut rx, drain) = self.job_removed().await?;
        let mut pending: HashMap<String, Job> = HashMap::new();
        let outcome = self
            .queue_and_wait(jobs, &mut pending, &mut rx, stall)
            .await;
        drain.abort();
        jobs_outcome(outcome, &pending, stall)
    }

    /// Stops `units` and waits until each one is stopped, like `run_jobs`
    /// with a stop job for each, but the targets among them go first: the
    /// transaction of a target's stop job already holds a stop job for every
    /// unit that is `PartOf=` it (a pool's workers and sockets; every pool
    /// and watch for `cgipool.target`), so those are waited for, not queued
    /// again one transaction each (a pool of 100 workers stopped in 0.25 s
    /// instead of 0.35–0.5 s). Units that are left running with no stop job
    /// get one of their own.
    pub async fn stop_units(&self, units: &[String], stall: Duration) -> Result<()> {
        let (targets, rest): (Vec<&String>, Vec<&String>) =
            units.iter().partition(|u| u.ends_with(".target"));
        if targets.is_empty() || rest.is_empty() {
            let jobs: Vec<Job> = units.iter().map(|u| Job::new(JobKind::Stop, u)).collect();
            return self.queue_jobs(&jobs, stall).await;
        }
        let (mut rx, drain) = self.job_removed().await?;
        let mut pending: HashMap<String, Job> = HashMap::new();
        let outcome = async {
            for target in &targets {
                let job = tokio::time::timeout(
                    stall,
                    self.manager
                        .stop_unit(target.to_string(), "replace".to_string()),
                )
                .await
                .with_context(|| {
                    format!(
                        "queuing stop of {target}: no answer for {}s",
                        stall.as_secs()
                    )
                })?
                .with_context(|| format!("queuing stop of {target}"))?;
                pending.insert(job.to_string(), Job::new(JobKind::Stop, target.as_str()));
            }
            // Every job of those transactions exists now; the ones already
            // finished show no job and a stopped unit.
            let names = rest.iter().map(|u| u.to_string()).collect();
            let listed = self
                .manager
                .list_units_by_names(names)
                .await
                .context("ListUnitsByNames")?;
            let mut more = Vec::new();
            for u in listed {
                let (name, active, job_type, job_path) = (u.0, u.3, u.8, u.9.to_string());
                if job_type == "stop" && job_path != "/" {
                    pending.insert(job_path, Job::new(JobKind::Stop, &name));
                } else if active != "inactive" && active != "failed" {
                    more.push(Job::new(JobKind::Stop, &name));
                }
            }
            self.queue_and_wait(&more, &mut pending, &mut rx, stall)
                .await
        }
        .await;
        drain.abort();
        jobs_outcome(outcome, &pending, stall)
    }

    /// JobRemoved signals as (job path, result), read by a task of their
    /// own: a signal stream nobody reads while jobs are being queued fills
    /// up and stalls the whole bus connection, method replies included
    /// (seen with 100+ jobs). Abort the task when done.
    async fn job_removed(
        &self,
    ) -> Result<(
        tokio::sync::mpsc::UnboundedReceiver<(String, String)>,
        tokio::task::JoinHandle<()>,
    )> {
        let mut removed = self
            .manager
            .receive_job_removed()
            .await
            .context("listening for JobRemoved")?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<(String, String)>();
        let drain = tokio::spawn(async move {
            while let Some(signal) = removed.next().await {
                if let Ok(args) = signal.args() {
                    if tx
                        .send((args.job.to_string(), args.result.to_string()))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        });
        Ok((rx, drain))
    }

    /// Queues the jobs in order, at most MAX_PENDING_STARTS (or, for stop
    /// jobs only, MAX_PENDING_STOPS) unfinished at a time (the bus pipelines the calls), and waits until each one is
    /// removed; returns the ones that did not end `done`, or None when
    /// nothing moved for `stall`.
    async fn queue_and_wait(
        &self,
        jobs: &[Job],
        pending: &mut HashMap<String, Job>,
        removed: &mut tokio::sync::mpsc::UnboundedReceiver<(String, String)>,
        stall: Duration,
    ) -> Result<Option<Vec<String>>> {
        let mut failures = Vec::new();
        let mut finished = |pending: &mut HashMap<String, Job>, path: String, result: String| {
            if let Some(job) = pending.remove(&path) {
                if result != "done" {
                    failures.push(format!(
                        "{} of {} ended with result '{result}'",
                        job.kind, job.unit
                    ));
                }
            }
        };
        let window = if jobs.iter().all(|j| j.kind == JobKind::Stop) {
            MAX_PENDING_STOPS
        } else {
            MAX_PENDING_STARTS
        };
        let mut next = 0;
        while next < jobs.len() || !pending.is_empty() {
            let room = window.saturating_sub(pending.len());
            if next < jobs.len() && room > 0 {
                let batch = &jobs[next..jobs.len().min(next + room)];
                next += batch.len();
                // At most 64 calls in flight: the bus refuses more than 128
                // pending replies per connection.
                let queueing = futures_util::stream::iter(batch)
                    .map(|job| async move {
                        let (name, mode) = (job.unit.clone(), "replace".to_string());
                        let path = match job.kind {
                            JobKind::Start => self.manager.start_unit(name, mode).await,
                            JobKind::Stop => self.manager.stop_unit(name, mode).await,
                            JobKind::Restart => self.manager.restart_unit(name, mode).await,
                            JobKind::Reload => self.manager.reload_unit(name, mode).await,
                        };
                        (job, path)
                    })
                    .buffer_unordered(MAX_CALLS_IN_FLIGHT)
                    .collect::<Vec<(&Job, zbus::Result<zbus::OwnedObjectPath>)>>();
                let Ok(queued) = tokio::time::timeout(stall, queueing).await else {
                    return Ok(None);
                };
                for (job, path) in queued {
                    let path =
                        path.with_context(|| format!("queuing {} of {}", job.kind, job.unit))?;
                    pending.insert(path.to_string(), job.clone());
                }
                // Jobs of this batch may be gone already: their signals wait here.
                while let Ok((path, result)) = removed.try_recv() {
                    finished(pending, path, result);
                }
                continue;
            }
            let Ok(signal) = tokio::time::timeout(stall, removed.recv()).await else {
                return Ok(None);
            };
            let Some((path, result)) = signal else {
                bail!("the JobRemoved stream ended");
            };
            finished(pending, path, result);
        }
        failures.sort();
        Ok(Some(failures))
    }

    /// PIDs of every process in a unit's control group.
    ///
    /// GetUnitProcesses fails with EIO when systemd cannot read one of the
    /// group's processes (seen in the test harness while a second container's
    /// processes shared the cgroup tree; systemd#22089 is another case):
    /// then the group's own `cgroup.procs` answers.
    pub async fn unit_pids(&self, unit: &str) -> Result<Vec<u32>> {
        match self.manager.get_unit_processes(unit.to_string()).await {
            Ok(procs) => Ok(procs.into_iter().map(|(_, pid, _)| pid).collect()),
            Err(e) => self
                .cgroup_pids(unit)
                .await
                .with_context(|| format!("GetUnitProcesses({unit}) failed ({e}); then")),
        }
    }

    /// One property of a loaded unit, read uncached.
    async fn property(
        &self,
        unit: &str,
        interface: &'static str,
        name: &str,
    ) -> Result<zbus::OwnedVariant> {
        let path = self
            .manager
            .get_unit(unit.to_string())
            .await
            .with_context(|| format!("GetUnit({unit})"))?;
        let props = PropertiesProxy::builder(&self.conn)
            .destination("org.freedesktop.systemd1")
            .path(path)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await?;
        props
            .get(InterfaceName::from_static_str(interface)?, name)
            .await
            .with_context(|| format!("reading {name} of {unit}"))
    }

    /// PIDs in a unit's control group, read from the cgroup file system.
    async fn cgroup_pids(&self, unit: &str) -> Result<Vec<u32>> {
        let cg = self
            .property(unit, "org.freedesktop.systemd1.Service", "ControlGroup")
            .await?;
        let cg: String = String::try_from(cg).context("ControlGroup is not a string")?;
        let file = format!("/sys/fs/cgroup{cg}/cgroup.procs");
        let text = std::fs::read_to_string(&file).with_context(|| format!("reading {file}"))?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// Fresh (uncached) Unit and Service properties of each unit, fetched
    /// concurrently.
    pub async fn service_details(&self, units: &[UnitState]) -> Result<Vec<ServiceDetails>> {
        // Two calls per unit; keep within the bus's pending-reply limit.
        let results: Vec<Result<ServiceDetails>> = futures_util::stream::iter(units)
            .map(|u| self.one_service(u))
            .buffered(MAX_CALLS_IN_FLIGHT / 2)
            .collect()
            .await;
        results.into_iter().collect()
    }

    async fn one_service(&self, u: &UnitState) -> Result<ServiceDetails> {
        let props = PropertiesProxy::builder(&self.conn)
            .destination("org.freedesktop.systemd1")
            .path(zbus::wire::ObjectPath::try_from(u.path.clone())?)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await?;
        let unit = props
            .get_all(InterfaceName::from_static_str(
                "org.freedesktop.systemd1.Unit",
            )?)
            .await
            .with_context(|| format!("reading properties of {}", u.name))?;
        let service = props
            .get_all(InterfaceName::from_static_str(
                "org.freedesktop.systemd1.Service",
            )?)
            .await
            .with_context(|| format!("reading service properties of {}", u.name))?;
        Ok(ServiceDetails {
            unit: u.name.clone(),
            active_state: string(&unit, "ActiveState"),
            sub_state: string(&unit, "SubState"),
            result: string(&service, "Result"),
            n_restarts: number(&service, "NRestarts").map(|n| n as u32),
            main_pid: number(&service, "MainPID")
                .filter(|&p| p != 0)
                .map(|p| p as u32),
            memory_bytes: number(&service, "MemoryCurrent").filter(|&m| m != u64::MAX),
            cpu_nsec: number(&service, "CPUUsageNSec").filter(|&c| c != u64::MAX),
            active_since_usec: number(&unit, "ActiveEnterTimestamp").filter(|&t| t != 0),
            invocation_id: bytes_hex(&unit, "InvocationID"),
            status_text: string(&service, "StatusText"),
        })
    }

    /// A socket unit's configured `Backlog=` (systemd's default when unset).
    pub async fn socket_backlog(&self, unit: &str) -> Result<u32> {
        let v = self
            .property(unit, "org.freedesktop.systemd1.Socket", "Backlog")
            .await?;
        u32::try_from(v).with_context(|| format!("Backlog of {unit} is not a u32"))
    }
}

fn string(map: &HashMap<String, OwnedVariant>, key: &str) -> String {
    match map.get(key).map(|v| &**v) {
        Some(Variant::Str(s)) => s.as_str().to_string(),
        _ => String::new(),
    }
}

fn number(map: &HashMap<String, OwnedVariant>, key: &str) -> Option<u64> {
    match map.get(key).map(|v| &**v) {
        Some(Variant::U64(n)) => Some(*n),
        Some(Variant::U32(n)) => Some(u64::from(*n)),
        Some(Variant::I32(n)) => u64::try_from(*n).ok(),
        Some(Variant::I64(n)) => u64::try_from(*n).ok(),
        _ => None,
    }
}

fn bytes_hex(map: &HashMap<String, OwnedVariant>, key: &str) -> String {
    let Some(v) = map.get(key) else {
        return String::new();
    };
    match v.try_clone().ok().and_then(|v| Vec::<u8>::try_from(v).ok()) {
        Some(bytes) => bytes.iter().map(|b| format!("{b:02x}")).collect(),
        None => String::new(),
    }
}

/// A stream that yields once for every change systemd reports that may
/// alter a worker's health: job completions, units appearing or going away,
/// daemon-reloads, and property changes of any unit (ActiveState and
/// SubState among them). Signals flow because `connect` subscribed.
pub type Changes =
    futures_util::stream::SelectAll<futures_util::stream::BoxStream<'static, &'static str>>;

impl Systemd {
    pub async fn changes(&self) -> Result<Changes> {
        use futures_util::stream::{select_all, BoxStream};
        let rule = zbus::MatchRule::builder()
            .msg_type(zbus::message::Type::Signal)
            .sender("org.freedesktop.systemd1")
            .interface("org.freedesktop.DBus.Properties")
            .member("PropertiesChanged")
            .path_namespace("/org/freedesktop/systemd1/unit")
            .build()?;
        let props = zbus::MessageStream::for_match_rule(rule, &self.conn, None)
            .await
            .context("listening for PropertiesChanged")?;
        let streams: Vec<BoxStream<'static, &'static str>> = vec![
            Box::pin(
                self.manager
                    .receive_job_removed()
                    .await?
                    .map(|_| "JobRemoved"),
            ),
            Box::pin(self.manager.receive_unit_new().await?.map(|_| "UnitNew")),
            Box::pin(
                self.manager
                    .receive_unit_removed()
                    .await?
                    .map(|_| "UnitRemoved"),
            ),
            Box::pin(self.manager.receive_reloading().await?.map(|_| "Reloading")),
            Box::pin(props.map(|_| "PropertiesChanged")),
        ];
        Ok(select_all(streams))
    }
}

/// Groups unit states by name for quick lookups.
pub fn by_name(units: Vec<UnitState>) -> BTreeMap<String, UnitState> {
    units.into_iter().map(|u| (u.name.clone(), u)).collect()
}

/// The result of `queue_and_wait`: an error naming what did not end `done`,
/// or what was still running when nothing moved for `stall`.
fn jobs_outcome(
    outcome: Result<Option<Vec<String>>>,
    pending: &HashMap<String, Job>,
    stall: Duration,
) -> Result<()> {
    let failures = match outcome? {
        Some(failures) => failures,
        None => {
            let mut left: Vec<String> = pending
                .values()
                .map(|j| format!("{} {}", j.kind, j.unit))
                .collect();
            left.sort();
            let shown = left.len().min(20);
            bail!(
                "timed out: no systemd job finished for {}s; {} still running: {}{}",
                stall.as_secs(),
                left.len(),
                left[..shown].join(", "),
                if left.len() > shown { ", …" } else { "" }
            );
        }
    };
    if !failures.is_empty() {
        bail!("systemd jobs failed: {}", failures.join("; "));
    }
    Ok(())
}
