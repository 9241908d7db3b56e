//! cgipool: CGI-style process pools as systemd units behind nginx.
//!
//! config → validated model → desired state → plan → executor → observed state.
mod apply;
mod assets;
mod cgi;
mod config;
mod escape;
mod exec;
mod files;
mod hosts;
mod nginx;
mod paths;
mod plan;
mod remote;
mod render;
mod state;
mod status;
mod systemd;
mod watch;
mod worker_status;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use exec::interrupt::{self, Interrupt};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "cgipool",
    version = assets::VERSION,
    about = "CGI-style process pools as systemd units behind nginx"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct Target {
    /// Write units to /run/systemd/system (gone after reboot) instead of /etc/systemd/system.
    #[arg(long)]
    runtime: bool,
    /// Seconds to wait for the lock, for the nginx reload, and for systemd
    /// jobs to make progress (a wait fails when no job finished for that long).
    #[arg(long, default_value_t = 90)]
    timeout: u64,
}

#[derive(Subcommand)]
enum Command {
    /// Converge the host to the config: units, workers, nginx.
    Apply {
        #[arg(default_value = config::DEFAULT_CONFIG)]
        config: PathBuf,
        /// Print the plan and change nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Set a pool's running count within [min, max] of the applied config
    /// (only the count changes: edits of the file that were not applied stay so).
    Scale {
        pool: String,
        count: u32,
        /// The config file, only to say whether it has edits not applied yet.
        #[arg(long, default_value = config::DEFAULT_CONFIG)]
        config: PathBuf,
        /// Seconds to wait for the lock, for the nginx reload, and for systemd
        /// jobs to make progress (a wait fails when no job finished for that long).
        #[arg(long, default_value_t = 90)]
        timeout: u64,
    },
    /// Per worker state, restarts, PID, memory, CPU, as systemd reports them.
    Status {
        pool: Option<String>,
        #[arg(long)]
        json: bool,
        #[arg(long)]
        runtime: bool,
        /// Show the table again every --interval seconds, in place (like top), until Ctrl-C.
        #[arg(long, conflicts_with = "json")]
        watch: bool,
        /// Seconds between two tables of --watch.
        #[arg(long, default_value_t = 1.0, requires = "watch")]
        interval: f64,
    },
    /// Stop and remove everything cgipool made on this host (the config is
    /// needed only if nothing was recorded).
    Down {
        #[arg(default_value = config::DEFAULT_CONFIG)]
        config: PathBuf,
        /// Go on when a `[host.NAME]` does not answer: the front and the
        /// hosts that answer are taken down, the others keep their units
        /// (named on stderr) until `cgipool down CONFIG` reaches them.
        #[arg(long)]
        skip_unreachable: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Check a config and report every error with file:line:col.
    Validate { config: PathBuf },
    /// Render the units and nginx files into a directory, offline (count = min).
    Render {
        config: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// The daemon behind cgipool-watch.service: nginx routes follow worker
    /// health, pools scale between min and max, /pool-status and /metrics.
    Watch,
    /// Serve a classic CGI program (RFC 3875) on the worker's socket, one
    /// fresh process per request (what `protocol = "cgi"` workers run).
    CgiGateway(cgi::Args),
    /// Write man pages and shell completions into OUT (for packaging).
    #[command(hide = true)]
    GenerateAssets { out: PathBuf },
    /// Diagnostics for developers and the vm-tests (no man page).
    #[command(hide = true, subcommand)]
    Debug(Debug),
}

#[derive(Subcommand)]
enum Debug {
    /// Read one unit's state on another host over systemd's remote transport
    /// (ssh to the host, systemd-stdio-bridge there: what `systemctl -H` does)
    /// and print `HOST UNIT LOAD ACTIVE SUB`.
    RemoteUnit {
        /// `[user@]host[:port]`, as `systemctl -H` takes it.
        #[arg(long)]
        host: String,
        unit: String,
        /// Seconds to wait for the host's system bus to answer.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
}

/// Exit status 2: bad usage or a bad config; nothing was touched.
#[derive(Debug)]
struct Usage(String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// Loads and validates a config (exit 2 on any error, nothing touched);
/// returns it with its absolute path and the exact bytes parsed.
fn load(path: &Path) -> Result<(config::Config, PathBuf, String)> {
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let (cfg, text) = config::load(&path).map_err(|e| Usage(e.to_string()))?;
    render::check(&cfg).map_err(|e| Usage(format!("{}: {e}", path.display())))?;
    Ok((cfg, path, text))
}

fn unit_dir(runtime: bool) -> PathBuf {
    PathBuf::from(if runtime {
        apply::RUNTIME_UNIT_DIR
    } else {
        apply::SYSTEM_UNIT_DIR
    })
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Validate { config } => {
            let (cfg, _, _) = load(&config)?;
            println!("{}: ok ({} pools)", config.display(), cfg.pools.len());
            Ok(())
        }
        Command::CgiGateway(args) => cgi::run(args),
        Command::GenerateAssets { out } => assets::generate(&out),
        Command::Debug(Debug::RemoteUnit {
            host,
            unit,
            timeout,
        }) => {
            let host: remote::RemoteHost = host.parse().map_err(|e| Usage(format!("{e:#}")))?;
            let state = runtime()?.block_on(async {
                let conn = host.connect(Duration::from_secs(timeout)).await?;
                let systemd = systemd::Systemd::over(conn).await?;
                systemd.unit_state(&unit).await
            })?;
            println!(
                "{host} {} {} {} {}",
                state.name, state.load_state, state.active_state, state.sub_state
            );
            Ok(())
        }
        Command::Watch => {
            let opts = watch::Options {
                tick: Duration::from_millis(500),
                grace: Duration::from_secs(1),
            };
            runtime()?.block_on(watch::run(opts))
        }
        Command::Render { config, out } => {
            let (cfg, _, _) = load(&config)?;
            render_offline(&cfg, &out)
        }
        Command::Apply {
            config,
            dry_run,
            target,
        } => {
            let (cfg, config_path, config_text) = load(&config)?;
            let req = apply::ApplyRequest {
                cfg,
                config_path,
                config_text,
                unit_dir: unit_dir(target.runtime),
                dry_run,
            };
            let opts = apply::Options::operator(Duration::from_secs(target.timeout));
            runtime()?.block_on(async {
                let stop = Interrupt::on_signals()?;
                apply::apply(req, &opts, &stop).await
            })
        }
        Command::Scale {
            pool,
            count,
            config,
            timeout,
        } => {
            let opts = apply::Options::operator(Duration::from_secs(timeout));
            runtime()?.block_on(async {
                let stop = Interrupt::on_signals()?;
                apply::scale(&pool, count, &config, &opts, &stop).await
            })
        }
        Command::Down {
            config,
            skip_unreachable,
            target,
        } => {
            let fallback = load(&config).ok().map(|(cfg, _, _)| cfg);
            let opts = apply::Options::operator(Duration::from_secs(target.timeout));
            runtime()?.block_on(async {
                let stop = Interrupt::on_signals()?;
                apply::down(
                    fallback,
                    &unit_dir(target.runtime),
                    skip_unreachable,
                    &opts,
                    &stop,
                )
                .await
            })
        }
        Command::Status {
            pool,
            json,
            runtime: rt,
            watch,
            interval,
        } => {
            let rt_ = runtime()?;
            let read = || -> Result<Vec<status::PoolStatus>> {
                let pools = rt_.block_on(status::collect(&unit_dir(rt), pool.as_deref()))?;
                if let Some(p) = &pool {
                    if pools.is_empty() {
                        return Err(Usage(format!("no pool named {p:?} on this host")).into());
                    }
                }
                Ok(pools)
            };
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({ "intent": status::intent_summary(), "pools": read()? })
                    )?
                );
            } else if watch {
                // Like top: the table again every interval, in place on a
                // terminal (one table after another when piped), until Ctrl-C.
                let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
                // Between 0.2 s and a day (from_secs_f64 panics on NaN, inf, 1e20).
                let secs = if interval.is_nan() {
                    0.2
                } else {
                    interval.clamp(0.2, 86_400.0)
                };
                let every = Duration::from_secs_f64(secs);
                loop {
                    let table = status::table(&read()?);
                    if tty {
                        print!("\x1b[H\x1b[2J{table}");
                    } else {
                        println!("{table}");
                    }
                    std::io::Write::flush(&mut std::io::stdout())?;
                    std::thread::sleep(every);
                }
            } else {
                print!("{}", status::table(&read()?));
            }
            Ok(())
        }
    }
}

fn render_offline(cfg: &config::Config, out: &Path) -> Result<()> {
    let counts: BTreeMap<String, u32> = cfg.pools.iter().map(|(n, p)| (n.clone(), p.min)).collect();
    let tree = render::units(cfg, Path::new(apply::SYSTEM_UNIT_DIR), &counts);
    let units_dir = out.join("units");
    for (rel, entry) in &tree.entries {
        files::write_entry(&units_dir, rel, entry)?;
    }
    // Many hosts: each `[host.NAME]`'s units in hosts/NAME/units.
    for h in cfg.hosts.values() {
        let tree = render::host_units(cfg, h, Path::new(apply::SYSTEM_UNIT_DIR), &counts);
        let dir = out.join("hosts").join(&h.name).join("units");
        for (rel, entry) in &tree.entries {
            files::write_entry(&dir, rel, entry)?;
        }
    }
    let active = hosts::front_counts(cfg, &counts)
        .iter()
        .map(|(n, &c)| (n.clone(), (1..=c).collect()))
        .collect();
    let ng = render::nginx(cfg, &active);
    files::write_atomic(
        &out.join("nginx/cgipool-upstreams.conf"),
        ng.upstreams.as_bytes(),
        0o644,
    )?;
    files::write_atomic(
        &out.join("nginx/cgipool-locations.conf"),
        ng.locations.as_bytes(),
        0o644,
    )?;
    println!(
        "rendered {} unit entries and 2 nginx files into {}",
        tree.entries.len(),
        out.display()
    );
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(u) = e.downcast_ref::<Usage>() {
                eprintln!("cgipool: {u}");
                return ExitCode::from(2);
            }
            if let Some(r) = e.downcast_ref::<apply::Refused>() {
                eprintln!("cgipool: {r}");
                return ExitCode::from(2);
            }
            let interrupted = e.downcast_ref::<interrupt::Interrupted>().is_some();
            match interrupt::caught() {
                Some(signal) if !interrupted => eprintln!(
                    "cgipool: interrupted by {signal} (which reached its ssh connections too): {e:#}; the intent, if one was recorded, stays: run the command again to finish"
                ),
                _ => eprintln!("cgipool: {e:#}"),
            }
            ExitCode::from(1)
        }
    }
}
