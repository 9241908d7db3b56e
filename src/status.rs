//! status: what systemd says about each pool and worker, read over D-Bus,
//! next to the count each pool runs in the recorded intent (or, with none,
//! what the unit directory's pool targets want), and the config it came from.
use crate::config::LOCAL_HOST;
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
    /// Where these workers run: "local" (the front) or a `[host.NAME]`.
    pub host: String,
    /// Why the host's workers could not be read (an unreachable host).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub wanted: usize,
    pub healthy: usize,
    /// The last change of the count (by apply, scale or watch), and why.
    pub last_decision: Option<Decision>,
    /// The pool's figures from watch's /pool-status (None: watch did not
    /// answer), without its workers.
    pub figures: Option<serde_json::Value>,
    /// On another host: how watch on the front sees it there (its `hosts`
    /// entry in /pool-status: up or lost, routed, active workers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub watch: Option<serde_json::Value>,
    pub workers: Vec<WorkerStatus>,
}

impl PoolStatus {
    /// A pool with `wanted` workers and none read yet (`error`: why they
    /// cannot be).
    fn unread(pool: &str, host: &str, wanted: usize, error: Option<String>) -> PoolStatus {
        PoolStatus {
            pool: pool.to_string(),
            host: host.to_string(),
            error,
            wanted,
            healthy: 0,
            last_decision: None,
            figures: None,
            watch: None,
            workers: Vec::new(),
        }
    }
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
    let intent = state::read_intent(&paths).ok().flatten();
    let cfg = intent.as_ref().and_then(|i| i.config().ok());
    let wanted = match (&intent, &cfg) {
        (Some(intent), Some(cfg)) => {
            plan::numbered(&crate::hosts::front_counts(cfg, &intent.counts))
        }
        (Some(intent), None) => plan::numbered(&intent.counts),
        _ => plan::instances_on_disk(&files::read_unit_dir(unit_dir)?.entries),
    };
    let mut out = pools_of(&systemd, LOCAL_HOST, &wanted, only).await?;
    let decisions = state::last_decisions(&paths);
    let snapshot = watch_snapshot(Path::new(state::WATCH_SOCKET));
    let figures = snapshot.as_ref().and_then(pool_figures);
    for p in &mut out {
        p.figures = figures.as_ref().and_then(|f| f.get(&p.pool)).cloned();
    }
    if let (Some(intent), Some(cfg)) = (&intent, &cfg) {
        out.extend(other_hosts(cfg, &intent.counts, only).await);
    }
    for p in out.iter_mut().filter(|p| p.host != LOCAL_HOST) {
        p.watch = snapshot
            .as_ref()
            .and_then(|s| host_view(s, &p.host, &p.pool));
    }
    // The count is per host: a decision shows under each host of its pool.
    for p in &mut out {
        p.last_decision = decisions.get(&p.pool).cloned();
    }
    Ok(out)
}

/// The pools of every `[host.NAME]` of the applied config, read over the
/// remote transport; a host that does not answer shows its pools with the
/// error and no worker.
async fn other_hosts(
    cfg: &crate::config::Config,
    counts: &BTreeMap<String, u32>,
    only: Option<&str>,
) -> Vec<PoolStatus> {
    // Every host at once: one that does not answer costs its timeout once.
    let reads = cfg.hosts.values().map(|h| async move {
        let wanted: plan::Workers = plan::numbered(
            &cfg.pools
                .values()
                .filter(|p| p.on_host(&h.name))
                .map(|p| {
                    (
                        p.name.clone(),
                        counts.get(&p.name).copied().unwrap_or(p.min),
                    )
                })
                .collect(),
        );
        let read = async {
            let conn = h
                .address
                .connect_with(REMOTE_TIMEOUT, &crate::remote::SshTimeouts::STATUS)
                .await?;
            let systemd = Systemd::over(conn).await?;
            pools_of(&systemd, &h.name, &wanted, only).await
        };
        // A host that stops answering after the connect holds status no
        // longer than one that never answered.
        let read = async {
            tokio::time::timeout(REMOTE_TIMEOUT, read)
                .await
                .unwrap_or_else(|_| {
                    Err(anyhow::anyhow!(
                        "{}: its systemd did not answer within {}s",
                        h.address,
                        REMOTE_TIMEOUT.as_secs()
                    ))
                })
        };
        match read.await {
            Ok(pools) => pools,
            Err(e) => wanted
                .iter()
                .filter(|(p, _)| only.map(|o| o == p.as_str()).unwrap_or(true))
                .map(|(p, ns)| PoolStatus::unread(p, &h.name, ns.len(), Some(format!("{e:#}"))))
                .collect(),
        }
    });
    futures_util::future::join_all(reads)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// How long `status` waits for another host's system bus and its answers
/// (ssh's own connect timeout is shorter: SshTimeouts::STATUS).
const REMOTE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The pools and workers one host's systemd reports, next to the wanted ones.
async fn pools_of(
    systemd: &Systemd,
    host: &str,
    wanted: &plan::Workers,
    only: Option<&str>,
) -> Result<Vec<PoolStatus>> {
    let units = systemd.list(&["cgipool-*@*.service"]).await?;
    let details = systemd.service_details(&units).await?;
    let mut pools: BTreeMap<String, PoolStatus> = wanted
        .iter()
        .map(|(p, ns)| (p.clone(), PoolStatus::unread(p, host, ns.len(), None)))
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
        let entry = pools
            .entry(pool.to_string())
            .or_insert_with(|| PoolStatus::unread(pool, host, 0, None));
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
    for p in &mut out {
        p.workers.sort_by_key(|w| {
            plan::parse_instance(&w.service.unit)
                .map(|(_, n, _)| n)
                .unwrap_or(0)
        });
    }
    Ok(out)
}

/// watch's /pool-status, or None when watch does not answer within a
/// second.
fn watch_snapshot(socket: &Path) -> Option<serde_json::Value> {
    use std::io::{Read, Write};
    let mut conn = std::os::unix::net::UnixStream::connect(socket).ok()?;
    let limit = Some(std::time::Duration::from_secs(1));
    conn.set_read_timeout(limit).ok()?;
    conn.set_write_timeout(limit).ok()?;
    conn.write_all(b"GET /pool-status HTTP/1.0\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut answer = Vec::new();
    conn.take(16 << 20).read_to_end(&mut answer).ok()?;
    let text = String::from_utf8_lossy(&answer);
    let (_, body) = text.split_once("\r\n\r\n")?;
    serde_json::from_str(body).ok()
}

/// How watch sees `pool` on the other host `host`: the host's state, why
/// it is lost, since when, and the pool's entry there.
fn host_view(snapshot: &serde_json::Value, host: &str, pool: &str) -> Option<serde_json::Value> {
    let h = snapshot
        .get("hosts")?
        .as_array()?
        .iter()
        .find(|h| h.get("host").and_then(|n| n.as_str()) == Some(host))?;
    let p = h
        .get("pools")?
        .as_array()?
        .iter()
        .find(|p| p.get("pool").and_then(|n| n.as_str()) == Some(pool))?;
    let mut v = p.clone();
    let o = v.as_object_mut()?;
    for k in ["state", "reason", "since_unix", "converged_serial"] {
        if let Some(x) = h.get(k) {
            o.insert(k.to_string(), x.clone());
        }
    }
    Some(v)
}

/// Each pool's figures from watch's /pool-status (its workers left out:
/// systemd's own view is shown for those).
fn pool_figures(snapshot: &serde_json::Value) -> Option<BTreeMap<String, serde_json::Value>> {
    let pools = snapshot.get("pools")?.as_array()?;
    Some(
        pools
            .iter()
            .filter_map(|p| {
                let name = p.get("pool")?.as_str()?.to_string();
                let mut p = p.clone();
                p.as_object_mut()?.remove("workers");
                Some((name, p))
            })
            .collect(),
    )
}

/// How watch on the front sees a pool on another host, in one line.
fn host_watch_line(w: &serde_json::Value) -> String {
    let state = w.get("state").and_then(|s| s.as_str()).unwrap_or("?");
    let routed = w.get("routed").and_then(|r| r.as_bool()).unwrap_or(false);
    let ago = w
        .get("since_unix")
        .and_then(|s| s.as_u64())
        .filter(|s| *s > 0)
        .map(|s| {
            let since = since(Some(s * 1_000_000));
            format!(" for {}", since.trim_end_matches(" ago"))
        })
        .unwrap_or_default();
    let mut line = format!(
        "watch: host {state}{ago}, {} by the front's nginx",
        if routed { "routed" } else { "not routed" }
    );
    if let Some(n) = w.get("active").and_then(|a| a.as_u64()) {
        line.push_str(&format!(", {n} active at its last read"));
    }
    if let Some(n) = w.get("connections").and_then(|a| a.as_u64()) {
        line.push_str(&format!(", {n} connections from the front"));
    }
    if let Some(why) = w.get("reason").and_then(|r| r.as_str()) {
        line.push_str(&format!(" (lost: {why})"));
    }
    line
}

/// One line of a pool's figures (issue 18), as `cgipool status` prints them.
fn figures_line(f: &serde_json::Value) -> String {
    let n = |k: &str| match f.get(k) {
        Some(serde_json::Value::Number(n)) => n.to_string(),
        _ => "n/a".to_string(),
    };
    format!(
        "min {} max {}; busy {} idle {} of {} (max busy {}); queue {} (max {}, backlog {}); saturated {}x; accepted {}; slow {}; restarts {}; since watch started {}",
        n("min"),
        n("max"),
        n("busy"),
        n("idle"),
        n("total"),
        n("max_busy"),
        n("queue_depth"),
        n("max_queue_depth"),
        n("backlog"),
        n("saturated_total"),
        n("accepted_total"),
        n("slow_requests_total"),
        n("restarts_total"),
        since(f.get("started_at_unix").and_then(|v| v.as_u64()).map(|s| s * 1_000_000)),
    )
}

/// A worker's REQUESTS and CURRENT columns, from its own report.
fn worker_report(status_text: &str) -> (String, String) {
    match crate::worker_status::parse(status_text) {
        None => ("n/a".into(), "".into()),
        Some(r) => {
            let current = match r.current {
                None => "idle".to_string(),
                Some(c) => {
                    let now_ms = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_millis() as u64)
                        .unwrap_or(0);
                    let uri: String = c.uri.chars().take(60).collect();
                    format!("{} {uri} {}ms", c.method, now_ms.saturating_sub(c.since_ms))
                }
            };
            (r.requests.to_string(), current)
        }
    }
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
        let on = if p.host == LOCAL_HOST {
            String::new()
        } else {
            format!(" on host {}", p.host)
        };
        let _ = writeln!(
            out,
            "pool {}{on}: {} healthy of {} wanted",
            p.pool, p.healthy, p.wanted
        );
        if let Some(e) = &p.error {
            let _ = writeln!(out, "  (cannot read the host: {e})");
            if let Some(w) = &p.watch {
                let _ = writeln!(out, "  {}", host_watch_line(w));
            }
            continue;
        }
        match &p.figures {
            Some(f) => {
                let _ = writeln!(out, "  {}", figures_line(f));
            }
            // Another host: how watch on the front sees it.
            None if p.host != LOCAL_HOST => {
                if let Some(w) = &p.watch {
                    let _ = writeln!(out, "  {}", host_watch_line(w));
                }
            }
            None => {
                let _ = writeln!(
                    out,
                    "  (no figures: cgipool-watch does not answer on {})",
                    state::WATCH_SOCKET
                );
            }
        }
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
            "  {:<14} {:<22} {:>8} {:>8} {:>8} {:>9} {:>12} {:>8}  CURRENT",
            "WORKER", "STATE", "RESTARTS", "PID", "MEMORY", "CPU", "SINCE", "REQUESTS"
        );
        for w in &p.workers {
            let s = &w.service;
            let (requests, current) = worker_report(&s.status_text);
            let _ = writeln!(
                out,
                "  {:<14} {:<22} {:>8} {:>8} {:>8} {:>9} {:>12} {:>8}  {}",
                w.worker,
                format!("{}/{}", s.active_state, s.sub_state),
                or_na(s.n_restarts),
                or_na(s.main_pid),
                bytes(s.memory_bytes),
                s.cpu_nsec
                    .map(|n| format!("{}ms", n / 1_000_000))
                    .unwrap_or_else(|| "n/a".into()),
                since(s.active_since_usec),
                requests,
                current
            );
        }
    }
    out
}
