//! /pool-status (JSON) and /metrics on a unix socket that the generated
//! nginx locations route to (loopback clients only). /metrics answers
//! OpenMetrics 1.0 when the client asks for it (`Accept:
//! application/openmetrics-text`, as Prometheus does), and Prometheus text
//! 0.0.4 otherwise.
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
            let format = Format::negotiate(&request);
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
                ("200 OK", format.content_type(), metrics(&snapshot, format))
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

/// The two text expositions /metrics speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text 0.0.4: counters are named with `_total` throughout.
    Prometheus,
    /// OpenMetrics 1.0: a counter's family has no `_total` (its samples
    /// do), and the exposition ends with `# EOF`.
    OpenMetrics,
}

impl Format {
    /// OpenMetrics when the request's Accept header names it.
    pub fn negotiate(request: &str) -> Format {
        let asks = request.lines().skip(1).any(|line| {
            line.split_once(':').is_some_and(|(name, value)| {
                name.trim().eq_ignore_ascii_case("accept")
                    && value
                        .to_ascii_lowercase()
                        .contains("application/openmetrics-text")
            })
        });
        if asks {
            Format::OpenMetrics
        } else {
            Format::Prometheus
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// The exposition of a snapshot in `format`; every family has HELP and TYPE.
pub fn metrics(s: &Snapshot, format: Format) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, String)>| {
        let family_name = match (format, kind) {
            (Format::OpenMetrics, "counter") => name.strip_suffix("_total").unwrap_or(name),
            _ => name,
        };
        let _ = writeln!(
            out,
            "# HELP {family_name} {help}\n# TYPE {family_name} {kind}"
        );
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
    let opt_pool_rows = |f: &dyn Fn(&super::PoolView) -> Option<String>| -> Vec<(String, String)> {
        s.pools
            .iter()
            .filter_map(|p| f(p).map(|v| (format!("pool=\"{}\"", label(&p.pool)), v)))
            .collect()
    };
    for (name, kind, help, rows) in [
        ("cgipool_pool_min", "gauge", "The pool's configured min.", pool_rows(&|p| p.min.to_string())),
        ("cgipool_pool_max", "gauge", "The pool's configured max.", pool_rows(&|p| p.max.to_string())),
        ("cgipool_pool_started_at_unix", "gauge", "When watch started counting this pool's figures (Unix seconds).", pool_rows(&|p| p.started_at_unix.to_string())),
        ("cgipool_pool_accepted_total", "counter", "Requests the pool's workers reported served since watch started (workers that report nothing are not counted).", opt_pool_rows(&|p| p.accepted_total.map(|n| n.to_string()))),
        ("cgipool_pool_max_queue_depth", "gauge", "The longest queue seen since watch started.", pool_rows(&|p| p.max_queue_depth.to_string())),
        ("cgipool_pool_backlog", "gauge", "The pool socket's effective listen backlog (Backlog=, capped by net.core.somaxconn).", opt_pool_rows(&|p| p.backlog.map(|n| n.to_string()))),
        ("cgipool_pool_idle_workers", "gauge", "Active workers not serving a request.", pool_rows(&|p| p.idle.to_string())),
        ("cgipool_pool_busy_workers", "gauge", "Active workers serving a request.", pool_rows(&|p| p.busy.to_string())),
        ("cgipool_pool_total_workers", "gauge", "Active workers.", pool_rows(&|p| p.total.to_string())),
        ("cgipool_pool_max_busy_workers", "gauge", "The most workers busy at once since watch started.", pool_rows(&|p| p.max_busy.to_string())),
        ("cgipool_pool_saturated_total", "counter", "Times the pool was seen at max with every worker busy and a queue.", pool_rows(&|p| p.saturated_total.to_string())),
        ("cgipool_pool_slow_requests_total", "counter", "Requests seen running longer than slow_request.", pool_rows(&|p| p.slow_requests_total.to_string())),
        ("cgipool_pool_restarts_total", "counter", "Sum of the workers' NRestarts.", pool_rows(&|p| p.restarts_total.to_string())),
        ("cgipool_worker_since_unix", "gauge", "When the worker last became active (ActiveEnterTimestamp, Unix seconds).", per_worker(&|w| w.since_unix.map(|n| n.to_string()))),
        ("cgipool_worker_requests_total", "counter", "Requests the worker process reported served.", per_worker(&|w| w.requests_total.map(|n| n.to_string()))),
        ("cgipool_worker_busy", "gauge", "1 while the worker serves a request.", per_worker(&|w| Some(u8::from(w.busy).to_string()))),
        ("cgipool_worker_current_duration_ms", "gauge", "How long the request in flight has run, in milliseconds (only busy workers that report it).", per_worker(&|w| w.current.as_ref().map(|c| c.duration_ms.to_string()))),
    ] {
        family(name, kind, help, rows);
    }
    let host_rows: Vec<(String, String)> = s
        .hosts
        .iter()
        .filter(|h| h.state != "unknown")
        .map(|h| {
            (
                format!("host=\"{}\"", label(&h.host)),
                u8::from(h.state == "up").to_string(),
            )
        })
        .collect();
    family(
        "cgipool_host_up",
        "gauge",
        "1 while another host's systemd answers watch, 0 once it is lost (hosts not read yet are left out).",
        host_rows,
    );
    let host_pool =
        |f: &dyn Fn(&super::view::HostPoolView) -> Option<String>| -> Vec<(String, String)> {
            s.hosts
                .iter()
                .flat_map(|h| {
                    h.pools.iter().filter_map(move |p| {
                        f(p).map(|v| {
                            (
                                format!("host=\"{}\",pool=\"{}\"", label(&h.host), label(&p.pool)),
                                v,
                            )
                        })
                    })
                })
                .collect()
        };
    family(
        "cgipool_host_pool_routed",
        "gauge",
        "1 while the front's nginx routes the pool to the host.",
        host_pool(&|p| Some(u8::from(p.routed).to_string())),
    );
    family(
        "cgipool_host_pool_active_workers",
        "gauge",
        "Active workers of the pool on the host at watch's last read.",
        host_pool(&|p| Some(p.active.to_string())),
    );
    family(
        "cgipool_host_pool_connections",
        "gauge",
        "The front's connections to the pool's queue on the host at the last load sample.",
        host_pool(&|p| p.connections.map(|n| n.to_string())),
    );
    if format == Format::OpenMetrics {
        out.push_str("# EOF\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::watch::{PoolView, WorkerView};

    fn snapshot() -> Snapshot {
        Snapshot {
            generated_at: 1,
            steps: 7,
            pools: vec![PoolView {
                pool: "a\"b".into(),
                min: 1,
                max: 4,
                wanted: 2,
                healthy: 1,
                queue_depth: 3,
                scale_events: 5,
                last_decision: None,
                workers: vec![WorkerView {
                    worker: "a@1".into(),
                    unit: "cgipool-a@1.service".into(),
                    active_state: "active".into(),
                    sub_state: "running".into(),
                    healthy: true,
                    n_restarts: Some(2),
                    memory_bytes: Some(1024),
                    cpu_nsec: Some(1_500_000_000),
                    ..WorkerView::default()
                }],
                ..PoolView::default()
            }],
            hosts: vec![crate::watch::view::HostView {
                host: "web1".into(),
                address: "root@10.0.0.11".into(),
                state: "up".into(),
                pools: vec![crate::watch::view::HostPoolView {
                    pool: "a\"b".into(),
                    wanted: 2,
                    active: 2,
                    routed: true,
                    connections: Some(3),
                }],
                ..Default::default()
            }],
        }
    }

    #[test]
    fn openmetrics_only_when_asked() {
        let plain = "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n";
        let om = "GET /metrics HTTP/1.1\r\naccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n\r\n";
        assert_eq!(Format::negotiate(plain), Format::Prometheus);
        assert_eq!(Format::negotiate(om), Format::OpenMetrics);
        // A path that merely mentions it is no Accept header.
        let path = "GET /metrics?application/openmetrics-text HTTP/1.1\r\n\r\n";
        assert_eq!(Format::negotiate(path), Format::Prometheus);
    }

    #[test]
    fn every_family_has_help_and_type_and_counters_follow_the_format() {
        for format in [Format::Prometheus, Format::OpenMetrics] {
            let text = metrics(&snapshot(), format);
            let helps = text.lines().filter(|l| l.starts_with("# HELP ")).count();
            let types = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
            assert!(helps >= 9 && helps == types, "{text}");
            assert!(
                text.contains("cgipool_worker_restarts_total{pool=\"a\\\"b\",worker=\"a@1\"} 2")
            );
            assert!(text.contains("cgipool_host_up{host=\"web1\"} 1"), "{text}");
            assert!(
                text.contains("cgipool_host_pool_connections{host=\"web1\",pool=\"a\\\"b\"} 3"),
                "{text}"
            );
            match format {
                Format::Prometheus => {
                    assert!(text.contains("# TYPE cgipool_worker_restarts_total counter"));
                    assert!(!text.contains("# EOF"));
                }
                Format::OpenMetrics => {
                    assert!(text.contains("# TYPE cgipool_worker_restarts counter"));
                    assert!(text.ends_with("# EOF\n"));
                }
            }
        }
    }
}
