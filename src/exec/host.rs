//! The host the executor converges, behind one interface: the unit
//! directory, systemd (over D-Bus) and nginx. `RealHost` is the machine;
//! tests use a fake that can fail any chosen call (see `fake.rs`).
use crate::config::Nginx;
use crate::files::{self, OnDisk};
use crate::nginx;
use crate::plan::{ObservedNginx, Pending};
use crate::render::{Entry, NginxFiles};
use crate::state::Paths;
use crate::systemd::{Job, Systemd, UnitState};
use anyhow::Result;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The nginx worker processes that served before a reload; the drain waits
/// for them to exit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Drain(pub BTreeSet<u32>);

/// What the executor asks of a host's systemd. The front and the other
/// hosts both answer it from a systemd on D-Bus ([`OnBus`]); the fake
/// answers it from memory.
#[allow(async_fn_in_trait)]
pub trait Units {
    async fn list_units(&mut self, patterns: &[&str]) -> Result<Vec<UnitState>>;
    async fn daemon_reload(&mut self) -> Result<()>;
    async fn reset_failed(&mut self, unit: &str) -> Result<()>;
    /// Queues the jobs and waits until every one ended `done`.
    async fn run_jobs(&mut self, jobs: &[Job]) -> Result<()>;
    /// For each service that is not active now, why ("x is failed/failed (result exit-code)").
    async fn not_active(&mut self, services: &[String]) -> Result<Vec<String>>;
}

/// Everything the executor does to a host: its systemd ([`Units`]), its
/// unit directory, nginx and the pending record. Each call is one step that
/// may fail on its own; none of them is partial on success.
#[allow(async_fn_in_trait)]
pub trait Host: Units {
    /// cgipool's entries in the unit directory (and foreign files with our names).
    async fn read_unit_dir(&mut self) -> Result<OnDisk>;
    async fn write_entry(&mut self, rel: &Path, entry: &Entry) -> Result<()>;
    async fn remove_entry(&mut self, rel: &Path) -> Result<()>;
    /// None when nginx is not managed here (not installed or not active).
    async fn nginx(&mut self) -> Result<Option<ObservedNginx>>;
    /// Puts back the nginx files an interrupted check or install left
    /// behind; true if there was something to put back.
    async fn nginx_recover(&mut self) -> Result<bool>;
    /// Checks the files with `nginx -t` and, if they pass and `keep`,
    /// installs them; the live files are as they were otherwise.
    async fn nginx_install(&mut self, files: &NginxFiles, keep: bool) -> Result<()>;
    /// Reloads nginx and waits until it serves `generation` and no old
    /// worker accepts connections; returns the old workers.
    async fn nginx_reload(&mut self, generation: &str) -> Result<Drain>;
    /// Waits until the old workers have finished their requests and exited.
    async fn nginx_drain(&mut self, drain: &Drain) -> Result<()>;
    /// What an earlier run recorded and did not finish.
    async fn read_pending(&mut self) -> Result<Pending>;
    /// Records (synced) what this run is about to do; empty clears it.
    async fn write_pending(&mut self, pending: &Pending) -> Result<()>;
}

/// A systemd on D-Bus and how long its jobs may take.
pub struct Bus {
    pub systemd: Systemd,
    pub job_timeout: Duration,
}

/// A host whose units are a systemd's on D-Bus: the front's own bus, or
/// another host's through ssh. Its [`Units`] are that systemd's.
pub trait OnBus {
    fn bus(&self) -> &Bus;
}

impl<T: OnBus> Units for T {
    async fn list_units(&mut self, patterns: &[&str]) -> Result<Vec<UnitState>> {
        self.bus().systemd.list(patterns).await
    }

    async fn daemon_reload(&mut self) -> Result<()> {
        self.bus().systemd.daemon_reload().await
    }

    async fn reset_failed(&mut self, unit: &str) -> Result<()> {
        self.bus().systemd.reset_failed(unit).await
    }

    async fn run_jobs(&mut self, jobs: &[Job]) -> Result<()> {
        let bus = self.bus();
        bus.systemd.run_jobs(jobs, bus.job_timeout).await
    }

    async fn not_active(&mut self, services: &[String]) -> Result<Vec<String>> {
        not_active(&self.bus().systemd, services).await
    }
}

/// The machine cgipool runs on.
pub struct RealHost {
    pub bus: Bus,
    pub unit_dir: PathBuf,
    pub nginx: Nginx,
    pub paths: Paths,
    pub drain_timeout: Duration,
}

impl OnBus for RealHost {
    fn bus(&self) -> &Bus {
        &self.bus
    }
}

impl Host for RealHost {
    async fn read_unit_dir(&mut self) -> Result<OnDisk> {
        files::read_unit_dir(&self.unit_dir)
    }

    async fn write_entry(&mut self, rel: &Path, entry: &Entry) -> Result<()> {
        files::write_entry(&self.unit_dir, rel, entry)
    }

    async fn remove_entry(&mut self, rel: &Path) -> Result<()> {
        files::remove_entry(&self.unit_dir, rel)
    }

    async fn nginx(&mut self) -> Result<Option<ObservedNginx>> {
        if !nginx::installed() {
            return Ok(None);
        }
        let unit = self.bus.systemd.list(&[self.nginx.unit.as_str()]).await?;
        if !unit.iter().any(|u| u.active_state == "active") {
            return Ok(None);
        }
        let (upstreams, locations) = nginx::current(&self.nginx)?;
        let served = nginx::fetch_generation(&self.nginx.check_address).ok();
        Ok(Some(ObservedNginx {
            upstreams,
            locations,
            served,
        }))
    }

    async fn nginx_recover(&mut self) -> Result<bool> {
        nginx::recover(&self.paths.nginx_backup)
    }

    async fn nginx_install(&mut self, files: &NginxFiles, keep: bool) -> Result<()> {
        nginx::install_checked(&self.nginx, &self.paths.nginx_backup, files, keep)
    }

    async fn nginx_reload(&mut self, generation: &str) -> Result<Drain> {
        nginx::reload_and_verify(
            &self.bus.systemd,
            &self.nginx,
            generation,
            self.bus.job_timeout,
        )
        .await
        .map(Drain)
    }

    async fn nginx_drain(&mut self, drain: &Drain) -> Result<()> {
        nginx::wait_old_workers(&drain.0, self.drain_timeout).await
    }

    async fn read_pending(&mut self) -> Result<Pending> {
        crate::state::read_pending(&self.paths)
    }

    async fn write_pending(&mut self, pending: &Pending) -> Result<()> {
        crate::state::write_pending(&self.paths, pending)
    }
}

/// For each service that is not active now on `systemd`'s host, why.
pub async fn not_active(systemd: &Systemd, services: &[String]) -> Result<Vec<String>> {
    if services.is_empty() {
        return Ok(Vec::new());
    }
    let patterns: Vec<&str> = services.iter().map(String::as_str).collect();
    let units = systemd.list(&patterns).await?;
    let details = systemd.service_details(&units).await?;
    let mut bad: Vec<String> = details
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
    bad.extend(
        services
            .iter()
            .filter(|s| !seen.contains(s.as_str()))
            .map(|s| format!("{s} is not loaded")),
    );
    Ok(bad)
}
