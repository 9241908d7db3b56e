//! cgipool: CGI-style process pools as systemd units behind nginx.
//!
//! config → validated model → desired state → plan → executor → observed state.
mod apply;
mod assets;
mod cgi;
mod config;
mod escape;
mod files;
mod lock;
mod nginx;
mod paths;
mod plan;
mod render;
mod status;
mod systemd;
mod watch;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
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
    /// Seconds to wait for systemd jobs and the nginx reload.
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
    /// Set a pool's running count within [min, max].
    Scale {
        pool: String,
        count: u32,
        #[arg(long, default_value = config::DEFAULT_CONFIG)]
        config: PathBuf,
        #[command(flatten)]
        target: Target,
    },
    /// Per worker state, restarts, PID, memory, CPU, as systemd reports them.
    Status {
        pool: Option<String>,
        #[arg(long)]
        json: bool,
        #[arg(long)]
        runtime: bool,
    },
    /// Stop and remove everything cgipool made for this config.
    Down {
        #[arg(default_value = config::DEFAULT_CONFIG)]
        config: PathBuf,
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
    Watch {
        #[arg(default_value = config::DEFAULT_CONFIG)]
        config: PathBuf,
        /// The units live in /run/systemd/system (they were applied with --runtime).
        #[arg(long)]
        runtime: bool,
    },
    /// Serve a classic CGI program (RFC 3875) on the worker's socket, one
    /// fresh process per request (what `protocol = "cgi"` workers run).
    CgiGateway(cgi::Args),
    /// Write man pages and shell completions into OUT (for packaging).
    #[command(hide = true)]
    GenerateAssets { out: PathBuf },
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

/// Loads and validates a config; its absolute path goes into the headers so
/// `apply demo.toml` and `apply ./demo.toml` render the same bytes.
fn load(path: &Path) -> Result<config::Config> {
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    config::load(&path).map_err(|e| anyhow::Error::new(Usage(e.to_string())))
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
            let cfg = load(&config)?;
            println!("{}: ok ({} pools)", config.display(), cfg.pools.len());
            Ok(())
        }
        Command::CgiGateway(args) => cgi::run(args),
        Command::GenerateAssets { out } => assets::generate(&out),
        Command::Watch {
            config,
            runtime: rt,
        } => {
            let config = std::path::absolute(&config).unwrap_or(config);
            let opts = watch::Options {
                config,
                unit_dir: unit_dir(rt),
                tick: Duration::from_millis(500),
                grace: Duration::from_secs(1),
            };
            runtime()?.block_on(watch::run(opts))
        }
        Command::Render { config, out } => {
            let cfg = load(&config)?;
            render_offline(&cfg, &out)
        }
        Command::Apply {
            config,
            dry_run,
            target,
        } => {
            let cfg = load(&config)?;
            let _lock = if dry_run {
                None
            } else {
                Some(lock::acquire(
                    Path::new(lock::LOCK_PATH),
                    Duration::from_secs(target.timeout),
                )?)
            };
            let opts = apply::Options {
                unit_dir: unit_dir(target.runtime),
                dry_run,
                counts: BTreeMap::new(),
                job_timeout: Duration::from_secs(target.timeout),
                leave_failed: false,
                exclude: Default::default(),
            };
            runtime()?.block_on(apply::apply(&cfg, &opts)).map(|_| ())
        }
        Command::Scale {
            pool,
            count,
            config,
            target,
        } => {
            let cfg = load(&config)?;
            let Some(p) = cfg.pools.get(&pool) else {
                let known: Vec<&String> = cfg.pools.keys().collect();
                return Err(Usage(format!(
                    "{}: no pool named {pool:?} (pools: {known:?})",
                    config.display()
                ))
                .into());
            };
            if count < p.min || count > p.max {
                return Err(Usage(format!(
                    "pool {pool}: {count} is outside [min, max] = [{}, {}] set in {}",
                    p.min,
                    p.max,
                    config.display()
                ))
                .into());
            }
            let _lock = lock::acquire(
                Path::new(lock::LOCK_PATH),
                Duration::from_secs(target.timeout),
            )?;
            let opts = apply::Options {
                unit_dir: unit_dir(target.runtime),
                dry_run: false,
                counts: BTreeMap::from([(pool, count)]),
                job_timeout: Duration::from_secs(target.timeout),
                leave_failed: false,
                exclude: Default::default(),
            };
            runtime()?.block_on(apply::apply(&cfg, &opts)).map(|_| ())
        }
        Command::Down { config, target } => {
            let cfg = load(&config)?;
            let _lock = lock::acquire(
                Path::new(lock::LOCK_PATH),
                Duration::from_secs(target.timeout),
            )?;
            runtime()?.block_on(apply::down(
                &cfg,
                &unit_dir(target.runtime),
                Duration::from_secs(target.timeout),
            ))
        }
        Command::Status {
            pool,
            json,
            runtime: rt,
        } => {
            let pools = runtime()?.block_on(status::collect(&unit_dir(rt), pool.as_deref()))?;
            if let Some(p) = &pool {
                if pools.is_empty() {
                    return Err(Usage(format!("no pool named {p:?} on this host")).into());
                }
            }
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({ "pools": pools }))?
                );
            } else {
                status::print_table(&pools);
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
    let active = counts
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
            eprintln!("cgipool: {e:#}");
            ExitCode::from(1)
        }
    }
}
