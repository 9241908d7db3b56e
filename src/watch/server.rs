//! /pool-status (JSON) and /metrics (Prometheus text) on a unix socket that
//! the generated nginx locations route to (loopback clients only).
use super::Snapshot;
use anyhow::{Context, Result};
use std::fmt::Write as _;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;

/// Binds `path` (mode 0660, group `group`, so nginx can connect) and serves forever.
pub async fn serve(path: &Path, group: &str, state: Arc<Mutex<Snapshot>>) -> Result<()> {
    let _ = std::fs::remove_file(path);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    if let Ok(Some(g)) = nix::unistd::Group::from_name(group) {
        nix::unistd::chown(path, None, Some(g.gid))
            .with_context(|| format!("giving {} to group {group}", path.display()))?;
    }
    loop {
        let (mut conn, _) = listener.accept().await?;
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            let n =
                match tokio::time::timeout(std::time::Duration::from_secs(5), conn.read(&mut buf))
                    .await
                {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
            let request = String::from_utf8_lossy(&buf[..n]);
            let path = request.split_whitespace().nth(1).unwrap_or("/");
            let path = path.split('?').next().unwrap_or(path);
            let snapshot = match state.lock() {
                Ok(s) => s.clone(),
                Err(p) => p.into_inner().clone(),
            };
            let (status, kind, body) = if path.ends_with("/pool-status") {
                (
                    "200 OK",
                    "application/json",
                    serde_json::to_string_pretty(&snapshot).unwrap_or_default() + "\n",
                )
            } else if path.ends_with("/metrics") {
                ("200 OK", "text/plain; version=0.0.4", metrics(&snapshot))
            } else {
                (
                    "404 Not Found",
                    "application/json",
                    "{\"error\":\"not found\"}\n".to_string(),
                )
            };
            let head = format!("HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            let _ = conn.write_all(head.as_bytes()).await;
            let _ = conn.write_all(body.as_bytes()).await;
        });
    }
}

fn label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The Prometheus text exposition of a snapshot.
pub fn metrics(s: &Snapshot) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, String)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in rows {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    };
    let mut by_state = Vec::new();
    for p in &s.pools {
        let mut states: std::collections::BTreeMap<&str, u32> = std::collections::BTreeMap::new();
        for w in &p.workers {
            *states.entry(w.active_state.as_str()).or_default() += 1;
        }
        for (state, n) in states {
            by_state.push((
                format!("pool=\"{}\",state=\"{}\"", label(&p.pool), label(state)),
                n.to_string(),
            ));
        }
    }
    family(
        "cgipool_workers",
        "gauge",
        "Workers of a pool by systemd ActiveState.",
        by_state,
    );
    let per_worker = |f: &dyn Fn(&super::WorkerView) -> Option<String>| -> Vec<(String, String)> {
        s.pools
            .iter()
            .flat_map(|p| {
                p.workers.iter().filter_map(move |w| {
                    f(w).map(|v| {
                        (
                            format!(
                                "pool=\"{}\",worker=\"{}\"",
                                label(&p.pool),
                                label(&w.worker)
                            ),
                            v,
                        )
                    })
                })
            })
            .collect()
    };
    family(
        "cgipool_worker_restarts_total",
        "counter",
        "Restarts systemd made (NRestarts).",
        per_worker(&|w| w.n_restarts.map(|n| n.to_string())),
    );
    family(
        "cgipool_worker_memory_bytes",
        "gauge",
        "MemoryCurrent of the worker's cgroup.",
        per_worker(&|w| w.memory_bytes.map(|n| n.to_string())),
    );
    family(
        "cgipool_worker_cpu_seconds_total",
        "counter",
        "CPU time of the worker's cgroup.",
        per_worker(&|w| w.cpu_nsec.map(|n| format!("{:.3}", n as f64 / 1e9))),
    );
    family(
        "cgipool_worker_queue_depth",
        "gauge",
        "Requests waiting on this worker's socket.",
        per_worker(&|w| Some(w.waiting.to_string())),
    );
    let pool_rows = |f: &dyn Fn(&super::PoolView) -> String| -> Vec<(String, String)> {
        s.pools
            .iter()
            .map(|p| (format!("pool=\"{}\"", label(&p.pool)), f(p)))
            .collect()
    };
    family(
        "cgipool_pool_queue_depth",
        "gauge",
        "Requests waiting for a worker, summed over the pool.",
        pool_rows(&|p| p.queue_depth.to_string()),
    );
    family(
        "cgipool_pool_wanted_workers",
        "gauge",
        "Workers the pool target wants.",
        pool_rows(&|p| p.wanted.to_string()),
    );
    family(
        "cgipool_pool_healthy_workers",
        "gauge",
        "Workers that are active.",
        pool_rows(&|p| p.healthy.to_string()),
    );
    family(
        "cgipool_scale_events_total",
        "counter",
        "Scaling decisions watch carried out.",
        pool_rows(&|p| p.scale_events.to_string()),
    );
    out
}
