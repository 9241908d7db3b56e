//! vm-tests: scenarios run against a real systemd (PID 1), a real system bus
//! and a real nginx, in two tiers over one image: nspawn (fast) and QEMU
//! (whole machine). Trials are named `<tier>::<scenario>`; the committed list
//! in vm-tests/scenarios.txt must match what is registered, and a full run
//! fails if fewer trials ran than listed.
mod agent;
mod bench;
mod calibration;
mod demo;
mod lab;
mod machine;
mod scenarios;

use anyhow::{bail, Result};
use libtest_mimic::{Arguments, Failed, Trial};
use machine::{Env, Machine, Options, Tier};
use std::collections::BTreeSet;
use std::process::ExitCode;
use std::sync::Arc;

/// A scenario: a function run on a freshly booted machine of each tier listed.
pub struct Scenario {
    pub name: &'static str,
    pub tiers: &'static [Tier],
    pub opts: Options,
    /// A harness self-test: the body must fail, and leave artifacts behind.
    pub expect_failure: bool,
    pub run: fn(&mut Machine) -> Result<()>,
}

fn run_scenario(env: &Env, tier: Tier, s: &Scenario) -> Result<()> {
    let mut m = Machine::start(env, tier, s.name, s.opts)?;
    let result = (s.run)(&mut m);
    match (result, s.expect_failure) {
        (Ok(()), false) => Ok(()),
        (Err(e), false) => {
            let dir = m.collect_artifacts();
            bail!("{e:#}\nartifacts: {}", dir.display())
        }
        (Ok(()), true) => bail!(
            "self-test scenario {} was expected to fail but passed",
            s.name
        ),
        (Err(e), true) => {
            let dir = m.collect_artifacts();
            for f in [
                "console.log",
                "journal.txt",
                "failed-units.txt",
                "status.txt",
                "nginx-T.txt",
                "transcript.txt",
            ] {
                left_behind(&dir.join(f), &e)?;
            }
            println!(
                "self-test: expected failure seen ({}); artifacts in {}",
                first_line(&format!("{e:#}")),
                dir.display()
            );
            Ok(())
        }
    }
}

/// A scenario over several nspawn machines on one network (see lab.rs),
/// booted in the order named; trials are named `nspawn::<name>`.
pub struct LabScenario {
    pub name: &'static str,
    pub machines: &'static [&'static str],
    /// A harness self-test: the body must fail, leave artifacts, and the lab
    /// must still be torn down.
    pub expect_failure: bool,
    pub run: fn(&mut lab::Lab) -> Result<()>,
}

/// Runs a lab scenario; after it, passed or failed, checks that the lab's
/// network namespaces are gone.
fn run_lab_scenario(env: &Env, s: &LabScenario) -> Result<()> {
    let mut lab = lab::Lab::start(env, s.name, s.machines)?;
    let namespaces = lab.namespaces();
    let disks = lab.disk_mount_points();
    let result = (s.run)(&mut lab);
    let artifacts = result.as_ref().err().map(|_| lab.collect_artifacts(env));
    drop(lab);
    let mut left = lab::still_present(&namespaces);
    left.extend(
        machine::still_mounted(&disks)
            .iter()
            .map(|d| d.display().to_string()),
    );
    if !left.is_empty() {
        let body = match &result {
            Ok(()) => "the scenario passed".to_string(),
            Err(e) => format!("the scenario failed: {e:#}"),
        };
        bail!("the lab's network namespaces or disks are still there after its teardown: {left:?} ({body})");
    }
    let shown = |dirs: &[std::path::PathBuf]| {
        dirs.iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(" ")
    };
    match (result, artifacts, s.expect_failure) {
        (Ok(()), _, false) => Ok(()),
        (Ok(()), _, true) => bail!(
            "self-test scenario {} was expected to fail but passed",
            s.name
        ),
        (Err(e), dirs, false) => bail!("{e:#}\nartifacts: {}", shown(&dirs.unwrap_or_default())),
        (Err(e), dirs, true) => {
            let dirs = dirs.unwrap_or_default();
            for d in &dirs {
                if d.is_dir() {
                    left_behind(&d.join("transcript.txt"), &e)?;
                } else {
                    left_behind(d, &e)?;
                }
            }
            println!(
                "self-test: expected failure seen ({}); lab torn down; artifacts: {}",
                first_line(&format!("{e:#}")),
                shown(&dirs)
            );
            Ok(())
        }
    }
}

/// A self-test's expected failure `e` must have left `artifact`, not empty.
fn left_behind(artifact: &std::path::Path, e: &anyhow::Error) -> Result<()> {
    let len = std::fs::metadata(artifact).map(|m| m.len()).unwrap_or(0);
    if len == 0 {
        bail!(
            "self-test: the expected failure ({e:#}) left no {} behind",
            artifact.display()
        );
    }
    Ok(())
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

fn tier_tools(tier: Tier) -> Result<()> {
    let (tool, pkg) = match tier {
        Tier::Nspawn => ("systemd-nspawn", "systemd-container"),
        Tier::Qemu => ("qemu-system-x86_64", "qemu-system-x86 qemu-utils"),
    };
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    if !found {
        bail!(
            "the {} tier cannot run: {tool} is missing (apt-get install {pkg})",
            tier.name()
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("demo") {
        let result = Env::from_env().and_then(|env| demo::run(&env));
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("demo: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if std::env::args().nth(1).as_deref() == Some("bench") {
        let smoke = std::env::args().skip(2).any(|a| a == "--smoke");
        let result = if std::env::args().skip(2).any(|a| a == "--rerender") {
            bench::rerender()
        } else {
            Env::from_env().and_then(|env| bench::run(&env, smoke))
        };
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bench: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let args = Arguments::from_args();
    let env = match Env::from_env() {
        Ok(e) => Arc::new(e),
        Err(e) => {
            eprintln!("vm-tests: {e:#}");
            return ExitCode::from(2);
        }
    };
    let mut trials = Vec::new();
    let mut names = BTreeSet::new();
    for s in scenarios::all() {
        for &tier in s.tiers {
            let name = format!("{}::{}", tier.name(), s.name);
            names.insert(name.clone());
            let env = Arc::clone(&env);
            let s = Arc::new(s.clone_ref());
            trials.push(Trial::test(name, move || {
                tier_tools(tier).map_err(|e| Failed::from(format!("{e:#}")))?;
                run_scenario(&env, tier, &s).map_err(|e| Failed::from(format!("{e:#}")))
            }));
        }
    }
    for s in scenarios::labs() {
        let name = format!("{}::{}", Tier::Nspawn.name(), s.name);
        names.insert(name.clone());
        let env = Arc::clone(&env);
        trials.push(Trial::test(name, move || {
            tier_tools(Tier::Nspawn).map_err(|e| Failed::from(format!("{e:#}")))?;
            run_lab_scenario(&env, &s).map_err(|e| Failed::from(format!("{e:#}")))
        }));
    }
    let listed: BTreeSet<String> = include_str!("../scenarios.txt")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect();
    if listed != names {
        let missing: Vec<_> = listed.difference(&names).collect();
        let extra: Vec<_> = names.difference(&listed).collect();
        eprintln!("vm-tests: vm-tests/scenarios.txt does not match the registered scenarios; listed but missing: {missing:?}; registered but not listed: {extra:?}");
        return ExitCode::from(1);
    }
    let full_run = args.filter.is_none() && args.skip.is_empty() && !args.list;
    let conclusion = libtest_mimic::run(&args, trials);
    if full_run && conclusion.num_passed + conclusion.num_failed < listed.len() as u64 {
        eprintln!(
            "vm-tests: only {} of the {} listed scenarios ran",
            conclusion.num_passed + conclusion.num_failed,
            listed.len()
        );
        return ExitCode::from(1);
    }
    conclusion.exit_code()
}

impl Scenario {
    /// A scenario for the nspawn tier with default options.
    pub fn nspawn(name: &'static str, run: fn(&mut Machine) -> Result<()>) -> Scenario {
        Scenario {
            name,
            tiers: &[Tier::Nspawn],
            opts: Options::default(),
            expect_failure: false,
            run,
        }
    }

    fn clone_ref(&self) -> Scenario {
        Scenario {
            name: self.name,
            tiers: self.tiers,
            opts: self.opts,
            expect_failure: self.expect_failure,
            run: self.run,
        }
    }
}
