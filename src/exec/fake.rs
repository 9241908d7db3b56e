//! A host in memory for the executor's tests: a unit directory, a systemd
//! that knows the units it loaded at the last daemon-reload, and an nginx
//! with its two files and the generation it serves. Any call can be made to
//! fail (`fail_at`: that call returns an error, the run's own error handling
//! goes on) or to be the moment the process dies (`die_at`: that call and
//! every later one fail and change nothing, as after SIGKILL). A service
//! that starts gets the listening sockets systemd would pass it (`holds`),
//! so a test sees a worker left on a socket nobody routes to.
use super::host::{Drain, Host, Units};
use crate::files::OnDisk;
use crate::plan::{ObservedNginx, Pending};
use crate::render::{Entry, NginxFiles};
use crate::systemd::{Job, JobKind, UnitState};
use anyhow::{bail, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NginxDisk {
    pub upstreams: Option<String>,
    pub locations: Option<String>,
    /// The generation those files carry.
    pub generation: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct FakeHost {
    pub files: BTreeMap<PathBuf, Entry>,
    /// Unit names systemd has definitions for (as of the last daemon-reload).
    pub loaded: BTreeSet<String>,
    /// ActiveState of units that are not inactive.
    pub states: BTreeMap<String, String>,
    pub nginx_disk: NginxDisk,
    pub served: Option<String>,
    pub backup: Option<NginxDisk>,
    pub nginx_t_fails: bool,
    pub pending: Pending,
    /// Units whose start fails (the job ends `failed`).
    pub broken: BTreeSet<String>,
    pub calls: usize,
    pub fail_at: Option<usize>,
    pub die_at: Option<usize>,
    pub log: Vec<String>,
    /// The sockets each service got when it last started (its process keeps
    /// them even when their socket units stop).
    pub holds: BTreeMap<String, BTreeSet<String>>,
}

fn glob(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((head, rest)) => {
            let Some(tail) = name.strip_prefix(head) else {
                return false;
            };
            (0..=tail.len()).any(|i| tail.is_char_boundary(i) && glob(rest, &tail[i..]))
        }
    }
}

impl FakeHost {
    fn tick(&mut self, what: &str) -> Result<()> {
        let n = self.calls;
        self.calls += 1;
        if self.die_at.map(|d| n >= d).unwrap_or(false) {
            bail!("the process died at call {n} ({what})");
        }
        if self.fail_at == Some(n) {
            bail!("injected failure at call {n} ({what})");
        }
        self.log.push(what.to_string());
        Ok(())
    }

    /// The unit file systemd would load `unit` from.
    fn definition(&self, unit: &str) -> Option<String> {
        let file = match crate::plan::parse_instance(unit) {
            Some((pool, _, kind)) => format!("cgipool-{pool}@.{kind}"),
            None => unit.to_string(),
        };
        self.files
            .contains_key(&PathBuf::from(&file))
            .then_some(file)
    }

    fn is_active(&self, unit: &str) -> bool {
        self.states.get(unit).map(String::as_str) == Some("active")
    }

    /// What systemd passes a starting worker: every active socket that
    /// triggers it: the pool socket its unit lists in `Sockets=` (or that
    /// names it in `Service=`), and its own per-worker socket.
    fn sockets_for(&self, service: &str) -> BTreeSet<String> {
        let Some((pool, n, "service")) = crate::plan::parse_instance(service) else {
            return BTreeSet::new();
        };
        let file = |name: String| match self.files.get(&PathBuf::from(name)) {
            Some(Entry::File(s)) => Some(s.clone()),
            _ => None,
        };
        let pool_socket = crate::plan::pool_socket(pool);
        let lists_pool = file(format!("cgipool-{pool}@.service"))
            .is_some_and(|s| s.contains(&format!("Sockets={pool_socket}")));
        let names_it =
            file(pool_socket.clone()).is_some_and(|s| s.contains(&format!("Service={service}")));
        let mut out = BTreeSet::new();
        if (lists_pool || names_it) && self.is_active(&pool_socket) {
            out.insert(pool_socket);
        }
        let own = crate::plan::socket(pool, n);
        if file(format!("cgipool-{pool}@.socket")).is_some() && self.is_active(&own) {
            out.insert(own);
        }
        out
    }

    /// The unit a socket's `Service=` names: a worker's own socket its
    /// worker, a pool's socket instance 0.
    fn socket_service(&self, socket: &str) -> Option<String> {
        if let Some((pool, n, "socket")) = crate::plan::parse_instance(socket) {
            return Some(crate::plan::service(pool, n));
        }
        let pool = socket.strip_prefix("cgipool-")?.strip_suffix(".socket")?;
        Some(crate::plan::service(pool, 0))
    }

    pub fn active(&self) -> BTreeSet<String> {
        self.states
            .iter()
            .filter(|(_, s)| s.as_str() == "active")
            .map(|(u, _)| u.clone())
            .collect()
    }
}

impl Units for FakeHost {
    async fn list_units(&mut self, patterns: &[&str]) -> Result<Vec<UnitState>> {
        self.tick("list_units")?;
        // Templates are definitions, not units systemd lists.
        let names: BTreeSet<&String> = self
            .loaded
            .iter()
            .filter(|n| !n.contains("@."))
            .chain(self.states.keys())
            .collect();
        Ok(names
            .into_iter()
            .filter(|n| patterns.iter().any(|p| glob(p, n)))
            .map(|n| UnitState {
                name: n.clone(),
                load_state: "loaded".into(),
                active_state: self
                    .states
                    .get(n)
                    .cloned()
                    .unwrap_or_else(|| "inactive".into()),
                sub_state: String::new(),
                path: String::new(),
            })
            .collect())
    }

    async fn daemon_reload(&mut self) -> Result<()> {
        self.tick("daemon_reload")?;
        let defined: Vec<String> = self
            .files
            .keys()
            .filter(|p| p.parent().map(|d| d.as_os_str().is_empty()).unwrap_or(true))
            .map(|p| p.display().to_string())
            .collect();
        self.loaded = defined.into_iter().collect();
        Ok(())
    }

    async fn reset_failed(&mut self, unit: &str) -> Result<()> {
        self.tick(&format!("reset-failed {unit}"))?;
        if self.states.get(unit).map(String::as_str) == Some("failed") {
            self.states.remove(unit);
        }
        Ok(())
    }

    async fn run_jobs(&mut self, jobs: &[Job]) -> Result<()> {
        self.tick(&format!("{} jobs", jobs.len()))?;
        let mut failed = Vec::new();
        for job in jobs {
            let known = self
                .definition(&job.unit)
                .map(|f| self.loaded.contains(&f))
                .unwrap_or(false);
            match job.kind {
                JobKind::Start | JobKind::Restart => {
                    // systemd refuses to start a socket whose Service= runs.
                    let service_runs = job.kind == JobKind::Start
                        && self
                            .socket_service(&job.unit)
                            .is_some_and(|s| self.is_active(&s));
                    if !known || self.broken.contains(&job.unit) || service_runs {
                        self.states.insert(job.unit.clone(), "failed".into());
                        self.holds.remove(&job.unit);
                        failed.push(job.unit.clone());
                    } else {
                        self.states.insert(job.unit.clone(), "active".into());
                        if job.unit.ends_with(".service") {
                            let got = self.sockets_for(&job.unit);
                            self.holds.insert(job.unit.clone(), got);
                        }
                    }
                }
                JobKind::Stop => {
                    self.states.remove(&job.unit);
                    self.holds.remove(&job.unit);
                }
                JobKind::Reload => {}
            }
        }
        if !failed.is_empty() {
            bail!("systemd jobs failed: {}", failed.join(", "));
        }
        Ok(())
    }

    async fn not_active(&mut self, services: &[String]) -> Result<Vec<String>> {
        self.tick("not_active")?;
        Ok(services
            .iter()
            .filter(|s| self.states.get(*s).map(String::as_str) != Some("active"))
            .map(|s| format!("{s} is not active"))
            .collect())
    }
}

impl Host for FakeHost {
    async fn read_unit_dir(&mut self) -> Result<OnDisk> {
        self.tick("read_unit_dir")?;
        Ok(OnDisk {
            entries: self.files.clone(),
            foreign: Vec::new(),
        })
    }

    async fn write_entry(&mut self, rel: &Path, entry: &Entry) -> Result<()> {
        self.tick(&format!("write {}", rel.display()))?;
        self.files.insert(rel.to_path_buf(), entry.clone());
        Ok(())
    }

    async fn remove_entry(&mut self, rel: &Path) -> Result<()> {
        self.tick(&format!("remove {}", rel.display()))?;
        self.files.remove(rel);
        Ok(())
    }

    async fn nginx(&mut self) -> Result<Option<ObservedNginx>> {
        self.tick("nginx")?;
        Ok(Some(ObservedNginx {
            upstreams: self.nginx_disk.upstreams.clone(),
            locations: self.nginx_disk.locations.clone(),
            served: self.served.clone(),
        }))
    }

    async fn nginx_recover(&mut self) -> Result<bool> {
        self.tick("nginx_recover")?;
        match self.backup.take() {
            Some(b) => {
                self.nginx_disk = b;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn nginx_install(&mut self, files: &NginxFiles, keep: bool) -> Result<()> {
        // Each part may be where the process dies. The check sees the
        // candidates in a view of its own: the files on disk do not change.
        self.tick("nginx recover")?;
        if let Some(b) = self.backup.take() {
            self.nginx_disk = b;
        }
        self.tick("nginx -t")?;
        if self.nginx_t_fails {
            return Err(crate::nginx::Rejected::new("[emerg] a fake rejection").into());
        }
        if !keep {
            return Ok(());
        }
        self.tick("nginx backup")?;
        self.backup = Some(self.nginx_disk.clone());
        self.tick("nginx write upstreams")?;
        self.nginx_disk.upstreams = Some(files.upstreams.clone());
        self.tick("nginx write locations")?;
        self.nginx_disk.locations = Some(files.locations.clone());
        self.nginx_disk.generation = Some(files.generation.clone());
        self.tick("nginx remove backup")?;
        self.backup = None;
        Ok(())
    }

    async fn nginx_reload(&mut self, generation: &str) -> Result<Drain> {
        self.tick("nginx reload")?;
        if self.nginx_disk.generation.as_deref() != Some(generation) {
            bail!("nginx did not start serving generation {generation}");
        }
        self.served = self.nginx_disk.generation.clone();
        Ok(Drain::default())
    }

    async fn nginx_drain(&mut self, _drain: &Drain) -> Result<()> {
        self.tick("nginx drain")
    }

    async fn read_pending(&mut self) -> Result<Pending> {
        self.tick("read_pending")?;
        Ok(self.pending.clone())
    }

    async fn write_pending(&mut self, pending: &Pending) -> Result<()> {
        self.tick("write_pending")?;
        self.pending = pending.clone();
        Ok(())
    }
}

#[test]
fn glob_matches_like_systemd_patterns() {
    assert!(glob("cgipool-*", "cgipool-search@1.service"));
    assert!(glob("cgipool-*@*.service", "cgipool-search@1.service"));
    assert!(!glob("cgipool-*@*.service", "cgipool-search@1.socket"));
    assert!(glob("cgipool.target", "cgipool.target"));
    assert!(!glob("cgipool-*", "cgipool.target"));
}
