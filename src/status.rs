//! status: what systemd says about each pool and worker, read over D-Bus,
//! next to the count each pool runs in the recorded intent (or, with none,
//! what the unit directory's pool targets want), and the config it came from.
use crate::files;
use crate::plan;
use crate::state::{self, Decision, Paths};
use crate::systemd::{ServiceDetails, Systemd};
use anyhow::Result;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Serialize)]
pub struct PoolStatus {
    pub pool: String,
    pub wanted: usize,
    pub healthy: usize,
    /// What `cgipool watch` last decided for this pool, and why.
    /// The last change of the count (by apply, scale or watch), and why.
    pub last_decision: Option<Decision>,
    pub workers: Vec<WorkerStatus>,
}

#[derive(Debug, Serialize)]
pub struct WorkerStatus {
    pub worker: String,
    #[serde(flatten)]
    pub service: ServiceDetails,
}

pub async fn collect(unit_dir: &Path, only: Option<&str>) -> Result<Vec<PoolStatus>> {
    let systemd = Systemd::connect().await?;
    let paths = Paths::host();
    let wanted = match state::read_intent(&paths).ok().flatten() {
        Some(intent) => plan::numbered(&intent.counts),
        None => plan::instances_on_disk(&files::read_unit_dir(unit_dir)?.entries),
    };
    let units = systemd.list(&["cgipool-*@*.service"]).await?;
    let details = systemd.service_details(&units).await?;
    let mut pools: BTreeMap<String, PoolStatus> = wanted
        .iter()
        .map(|(p, ns)| {
            (
                p.clone(),
                PoolStatus {
                    pool: p.clone(),
                    wanted: ns.len(),
                    healthy: 0,
                    last_decision: None,
                    workers: Vec::new(),
                },
            )
        })
        .collect();
    for d in details {
        let Some((pool, n, _)) = plan::parse_instance(&d.unit) else {
            continue;
        };
        // A shared queue's socket names instance 0 (loaded, never wanted):
        // shown only if systemd ever started it as a stand-in.
        if n == 0 && d.active_state == "inactive" {
            continue;
        }
        let entry = pools.entry(pool.to_string()).or_insert_with(|| PoolStatus {
            pool: pool.to_string(),
            wanted: 0,
            healthy: 0,
            last_decision: None,
            workers: Vec::new(),
        });
        if d.active_state == "active" {
            entry.healthy += 1;
        }
        entry.workers.push(WorkerStatus {
            worker: format!("{pool}@{n}"),
            service: d,
        });
    }
    let mut out: Vec<PoolStatus> = pools
        .into_values()
        .filter(|p| only.map(|o| o == p.pool).unwrap_or(true))
        .collect();
    let decisions = state::last_decisions(&paths);
    for p in &mut out {
        p.last_decision = decisions.get(&p.pool).cloned();
        p.workers.sort_by_key(|w| {
            plan::parse_instance(&w.service.unit)
                .map(|(_, n, _)| n)
                .unwrap_or(0)
        });
    }
    Ok(out)
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn or_na<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "n/a".into())
}

fn bytes(b: Option<u64>) -> String {
    match b {
        None => "n/a".into(),
        Some(b) if b >= 1 << 20 => format!("{:.1}M", b as f64 / (1u64 << 20) as f64),
        Some(b) => format!("{:.0}K", b as f64 / 1024.0),
    }
}

fn since(usec: Option<u64>) -> String {
    let Some(us) = usec else { return "n/a".into() };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    let secs = now.saturating_sub(us) / 1_000_000;
    match secs {
        s if s < 120 => format!("{s}s ago"),
        s if s < 7200 => format!("{}min ago", s / 60),
        s => format!("{}h ago", s / 3600),
    }
}

/// Where the recorded intent came from, for the top of `cgipool status`.
pub fn intent_summary() -> Option<serde_json::Value> {
    let i = state::read_intent(&Paths::host()).ok().flatten()?;
    Some(serde_json::json!({
        "config": i.config_path,
        "serial": i.serial,
        "written_by": i.written_by,
        "at_unix": i.at_unix,
        "unit_dir": i.unit_dir,
    }))
}

/// The table `cgipool status` prints.
pub fn table(pools: &[PoolStatus]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if let Some(i) = intent_summary() {
        let _ = writeln!(
            out,
            "intent {} from {} (recorded by {}, units in {})",
            i["serial"],
            i["config"].as_str().unwrap_or("?"),
            i["written_by"].as_str().unwrap_or("?"),
            i["unit_dir"].as_str().unwrap_or("?")
        );
    }
    if pools.is_empty() {
        let _ = writeln!(out, "no cgipool pools on this host");
    }
    for p in pools {
        let _ = writeln!(
            out,
            "pool {}: {} healthy of {} wanted",
            p.pool, p.healthy, p.wanted
        );
        if let Some(d) = &p.last_decision {
            let ago = now_unix().saturating_sub(d.at_unix);
            let _ = writeln!(
                out,
                "  {} scaled {} -> {} {ago}s ago: {}",
                d.by, d.from, d.to, d.reason
            );
        }
        let _ = writeln!(
            out,
            "  {:<14} {:<22} {:>8} {:>8} {:>8} {:>9}  SINCE",
            "WORKER", "STATE", "RESTARTS", "PID", "MEMORY", "CPU"
        );
        for w in &p.workers {
            let s = &w.service;
            let _ = writeln!(
                out,
                "  {:<14} {:<22} {:>8} {:>8} {:>8} {:>9}  {}",
                w.worker,
                format!("{}/{}", s.active_state, s.sub_state),
                or_na(s.n_restarts),
                or_na(s.main_pid),
                bytes(s.memory_bytes),
                s.cpu_nsec
                    .map(|n| format!("{}ms", n / 1_000_000))
                    .unwrap_or_else(|| "n/a".into()),
                since(s.active_since_usec)
            );
        }
    }
    out
}
