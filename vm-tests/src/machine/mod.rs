//! A guest with a real systemd as PID 1: an nspawn container or a QEMU VM,
//! driven through one API. Every wait is bounded and scaled by the run's
//! calibration (see calibration.rs) times VM_TEST_TIMEOUT_FACTOR; a wait that
//! runs out names its limit and the factor in force; failures keep artifacts
//! under target/vm-tests/.
use crate::agent::Agent;
use crate::calibration::{self, Measurement};
use anyhow::{anyhow, bail, ensure, Context, Result};
use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

mod boot;
mod commands;
mod disk;
mod power;
use boot::{qemu_monitor, spawn_nspawn, spawn_qemu};
pub use commands::shell_quote;
pub use disk::{remove_stale_mounts, still_mounted};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    Nspawn,
    Qemu,
}

impl Tier {
    pub fn name(self) -> &'static str {
        match self {
            Tier::Nspawn => "nspawn",
            Tier::Qemu => "qemu",
        }
    }
}

/// How a scenario wants its machine.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// QEMU: let the guest reboot (no `-no-reboot`).
    pub reboots: bool,
}

/// Where an nspawn guest's network lives: a private one of its own (loopback
/// only), or a network namespace prepared for it (a lab's, see lab.rs).
#[derive(Debug, Clone, Default)]
pub enum Network {
    #[default]
    Private,
    Namespace {
        path: PathBuf,
        hostname: String,
    },
}

/// Paths the harness needs, from the environment the Makefile sets.
#[derive(Clone)]
pub struct Env {
    pub image: PathBuf,
    pub payload: PathBuf,
    pub artifacts: PathBuf,
    pub factor: f64,
}

impl Env {
    pub fn from_env() -> Result<Env> {
        let var = |k: &str| {
            std::env::var(k)
                .map_err(|_| anyhow!("{k} is not set (run the VM tests through `make vm-test`)"))
        };
        let factor = match std::env::var("VM_TEST_TIMEOUT_FACTOR") {
            Ok(s) => s
                .parse::<f64>()
                .map_err(|_| anyhow!("VM_TEST_TIMEOUT_FACTOR={s} is not a number"))?,
            Err(_) => 1.0,
        };
        Ok(Env {
            image: PathBuf::from(var("CGIPOOL_VM_IMAGE")?),
            payload: PathBuf::from(var("CGIPOOL_VM_PAYLOAD")?),
            artifacts: std::env::var("CGIPOOL_VM_ARTIFACTS")
                .map(PathBuf::from)
                .unwrap_or_else(|_| {
                    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/vm-tests"))
                }),
            factor,
        })
    }

    pub fn scaled(&self, d: Duration) -> Duration {
        d.mul_f64(self.factor)
    }
}

pub struct Machine {
    pub tier: Tier,
    /// What every wait is multiplied by: `manual` × the calibration.
    pub factor: f64,
    /// VM_TEST_TIMEOUT_FACTOR.
    manual: f64,
    name: String,
    dir: PathBuf,
    run_dir: PathBuf,
    child: Option<Child>,
    agent: Agent,
    opts: Options,
    transcript: String,
    units: BTreeSet<String>,
    calibration: String,
    /// What booting it again needs (power.rs).
    env: Env,
    network: Network,
    /// A lab guest's disk, which outlives its processes (disk.rs).
    disk: Option<disk::Disk>,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl Machine {
    /// Boots a fresh machine and waits until its agent answers and boot is done.
    pub fn start(env: &Env, tier: Tier, scenario: &str, opts: Options) -> Result<Machine> {
        Machine::start_on(env, tier, scenario, opts, &Network::Private)
    }

    /// `start`, with the guest on `network` (nspawn only).
    pub fn start_on(
        env: &Env,
        tier: Tier,
        scenario: &str,
        opts: Options,
        network: &Network,
    ) -> Result<Machine> {
        if tier == Tier::Qemu && !matches!(network, Network::Private) {
            bail!("a QEMU guest has no network but its own");
        }
        let name = format!("{}-{}", tier.name(), scenario);
        let dir = env.artifacts.join(&name);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let run_dir = PathBuf::from(format!(
            "{}{}-{n}",
            disk::RUN_DIR_PREFIX,
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&run_dir);
        fs::create_dir_all(run_dir.join("agent"))?;
        // A lab's guests get a disk that survives a power cut; a guest of
        // its own boots on nspawn's --volatile=overlay.
        let disk = match network {
            Network::Namespace { .. } => {
                Some(disk::Disk::mount(&run_dir, &env.image.join("rootfs"))?)
            }
            Network::Private => None,
        };
        let console = fs::File::create(dir.join("console.log"))?;
        let (child, agent_path) = match tier {
            Tier::Nspawn => spawn_nspawn(
                env,
                &run_dir,
                console,
                network,
                disk.as_ref().map(|d| d.root()),
            )?,
            Tier::Qemu => spawn_qemu(env, &run_dir, console, opts)?,
        };
        let mut m = Machine {
            tier,
            factor: env.factor * calibration::current(tier),
            manual: env.factor,
            name,
            dir,
            run_dir,
            child: Some(child),
            agent: Agent::new(&agent_path),
            opts,
            transcript: String::new(),
            units: BTreeSet::new(),
            calibration: String::new(),
            env: env.clone(),
            network: network.clone(),
            disk,
        };
        let boot_limit = match tier {
            Tier::Nspawn => Duration::from_secs(30),
            Tier::Qemu => Duration::from_secs(180),
        };
        let started = Instant::now();
        m.wait_for_agent(None, m.scaled(boot_limit))?;
        m.wait_boot_finished()?;
        let boot = started.elapsed();
        m.note(&format!("# booted in {:.1}s", boot.as_secs_f64()));
        m.calibrate(boot)?;
        Ok(m)
    }

    /// Times the calibration workload in the guest and sets the factor every
    /// later wait is scaled by.
    fn calibrate(&mut self, boot: Duration) -> Result<()> {
        let limit = self.scaled(Duration::from_secs(60));
        let out = self.succeed_within(calibration::WORKLOAD, limit)?;
        let ms: u64 = out
            .trim()
            .parse()
            .with_context(|| format!("the calibration workload printed {out:?}"))?;
        let measured = Measurement {
            tier: self.tier,
            workload: Duration::from_millis(ms),
            boot,
        };
        let in_force = calibration::record(&measured);
        self.factor = self.manual * in_force;
        self.calibration = calibration::describe(&measured, in_force);
        let line = format!(
            "# {} (x{} VM_TEST_TIMEOUT_FACTOR = {:.2})",
            self.calibration, self.manual, self.factor
        );
        self.note(&line);
        Ok(())
    }

    /// The calibration line of this boot, for the demo's output.
    pub fn calibration(&self) -> &str {
        &self.calibration
    }

    pub fn scaled(&self, d: Duration) -> Duration {
        d.mul_f64(self.factor)
    }

    /// How a scaled limit came about, for the message of a wait that ran out.
    pub fn limit_note(&self, base: Duration) -> String {
        format!(
            "limit {:.1}s = {:.0}s x factor {:.2} (calibration {:.2} x VM_TEST_TIMEOUT_FACTOR {})",
            self.scaled(base).as_secs_f64(),
            base.as_secs_f64(),
            self.factor,
            self.factor / self.manual,
            self.manual
        )
    }

    pub fn artifacts_dir(&self) -> &Path {
        &self.dir
    }

    fn note(&mut self, line: &str) {
        self.transcript.push_str(line);
        self.transcript.push('\n');
    }

    fn check_alive(&mut self) -> Result<()> {
        let Some(child) = self.child.as_mut() else {
            bail!("{} is powered off", self.name);
        };
        if let Some(status) = child.try_wait()? {
            bail!(
                "the {} machine exited ({status}); see {}",
                self.tier.name(),
                self.dir.join("console.log").display()
            );
        }
        Ok(())
    }

    /// Pings until the agent answers with a boot id other than `not`.
    fn wait_for_agent(&mut self, not: Option<&str>, limit: Duration) -> Result<String> {
        let deadline = Instant::now() + limit;
        loop {
            self.check_alive()?;
            match self.agent.ping(Duration::from_secs(1)) {
                Ok(Some(id)) if Some(id.as_str()) != not => return Ok(id),
                Ok(_) => {}
                Err(_) => {
                    self.agent.disconnect();
                    sleep(Duration::from_millis(100));
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "the guest agent did not answer within {:.0}s (booting {}); see {}",
                    limit.as_secs_f64(),
                    self.name,
                    self.dir.join("console.log").display()
                );
            }
        }
    }

    fn wait_boot_finished(&mut self) -> Result<()> {
        let limit = self.scaled(Duration::from_secs(120));
        let out = self.execute("systemctl is-system-running --wait", limit)?;
        let state = out.stdout.trim().to_string();
        self.note(&format!("# system state after boot: {state}"));
        Ok(())
    }

    /// Waits until `unit` is active; fails at once if it is failed.
    pub fn wait_for_unit(&mut self, unit: &str) -> Result<()> {
        self.units.insert(unit.to_string());
        let base = Duration::from_secs(30);
        let limit = self.scaled(base);
        let deadline = Instant::now() + limit;
        loop {
            let state = self.unit_property(unit, "ActiveState")?;
            match state.as_str() {
                "active" => return Ok(()),
                "failed" => bail!("unit {unit} failed while waiting for it to become active"),
                _ => {}
            }
            if Instant::now() >= deadline {
                bail!(
                    "timed out after {:.1}s waiting for unit {unit} to become active ({}; ActiveState={state})",
                    limit.as_secs_f64(),
                    self.limit_note(base)
                );
            }
            sleep(Duration::from_millis(200));
        }
    }

    pub fn unit_property(&mut self, unit: &str, prop: &str) -> Result<String> {
        self.units.insert(unit.to_string());
        let out = self.succeed(&format!(
            "systemctl show -P {} {}",
            shell_quote(prop),
            shell_quote(unit)
        ))?;
        Ok(out.trim_end_matches('\n').to_string())
    }

    /// The unit's main PID, waiting (bounded) while it reads 0 (the unit is
    /// between processes). Never 0, so `kill -9 {pid}` never means the
    /// calling shell's process group.
    pub fn main_pid(&mut self, unit: &str) -> Result<u32> {
        self.units.insert(unit.to_string());
        let out = self.wait_until_succeeds(
            &format!(
                "pid=$(systemctl show -P MainPID {0}); test \"$pid\" -gt 0 && echo \"$pid\"",
                shell_quote(unit)
            ),
            &format!("{unit} to have a main process"),
            Duration::from_secs(30),
        )?;
        out.trim()
            .parse()
            .with_context(|| format!("MainPID of {unit}: {out:?}"))
    }

    /// Copies a large host file into the guest through the directory the
    /// nspawn tier shares with the host (`/mnt/agent`); QEMU guests have
    /// none: use the payload there.
    pub fn copy_large_to(&mut self, host: &Path, guest: &str) -> Result<()> {
        ensure!(
            self.tier == Tier::Nspawn,
            "copy_large_to needs the nspawn tier"
        );
        let name = format!("copy-{}", COUNTER.fetch_add(1, Ordering::SeqCst));
        let shared = self.run_dir.join("agent").join(&name);
        fs::copy(host, &shared)
            .with_context(|| format!("copying {} to {}", host.display(), shared.display()))?;
        let q = shell_quote(guest);
        let r = self.succeed(&format!(
            "mkdir -p \"$(dirname {q})\" && cp /mnt/agent/{name} {q}"
        ));
        let _ = fs::remove_file(&shared);
        r.map(|_| ())
    }

    /// Copies a host file into the guest (through the agent; for small files —
    /// build outputs travel in the read-only payload instead).
    pub fn copy_to(&mut self, host: &Path, guest: &str) -> Result<()> {
        use base64::Engine;
        let data = fs::read(host).with_context(|| format!("reading {}", host.display()))?;
        let b64 = base64::engine::general_purpose::STANDARD.encode(data);
        self.write_file(guest, &b64, true)
    }

    /// Writes `contents` to a guest path.
    pub fn write_text(&mut self, guest: &str, contents: &str) -> Result<()> {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(contents.as_bytes());
        self.write_file(guest, &b64, true)
    }

    fn write_file(&mut self, guest: &str, b64: &str, _decode: bool) -> Result<()> {
        let q = shell_quote(guest);
        self.succeed(&format!(
            "mkdir -p \"$(dirname {q})\" && printf %s '{b64}' | base64 -d > {q}"
        ))?;
        Ok(())
    }

    pub fn journal(&mut self, unit: &str) -> Result<String> {
        self.units.insert(unit.to_string());
        self.succeed(&format!(
            "journalctl -b --no-pager -o short-precise -u {}",
            shell_quote(unit)
        ))
    }

    pub fn boot_id(&mut self) -> Result<String> {
        Ok(self
            .succeed("cat /proc/sys/kernel/random/boot_id")?
            .trim()
            .to_string())
    }

    /// Reboots the guest and waits until it is back with a new boot id.
    pub fn reboot(&mut self) -> Result<()> {
        if self.tier != Tier::Qemu || !self.opts.reboots {
            bail!("reboot() needs the QEMU tier with Options {{ reboots: true }}");
        }
        let old = self.boot_id()?;
        self.note("# reboot");
        self.execute("systemctl reboot --no-block", Duration::from_secs(10))?;
        let limit = self.scaled(Duration::from_secs(240));
        let new = self.wait_for_agent(Some(&old), limit)?;
        self.note(&format!("# rebooted: boot id {old} -> {new}"));
        self.wait_boot_finished()
    }

    /// Cuts the power and turns it back on (QEMU `system_reset`), then waits
    /// for the new boot.
    pub fn crash(&mut self) -> Result<()> {
        if self.tier != Tier::Qemu {
            bail!("crash() needs the QEMU tier");
        }
        let old = self.boot_id()?;
        self.note("# crash (system_reset)");
        qemu_monitor(&self.run_dir.join("monitor.sock"), "system_reset")?;
        self.agent.disconnect();
        let limit = self.scaled(Duration::from_secs(240));
        self.wait_for_agent(Some(&old), limit)?;
        self.wait_boot_finished()
    }

    /// Saves what a failed scenario leaves behind; returns the directory.
    pub fn collect_artifacts(&mut self) -> PathBuf {
        let units: Vec<String> = self.units.iter().map(|u| shell_quote(u)).collect();
        let probes = [
            (
                "journal.txt",
                "journalctl -b --no-pager -o short-precise".to_string(),
            ),
            (
                "failed-units.txt",
                "systemctl --failed --no-pager --all".to_string(),
            ),
            (
                "status.txt",
                format!(
                    "systemctl status --no-pager -l --all 'cgipool*' nginx.service {} 2>&1; true",
                    units.join(" ")
                ),
            ),
            ("nginx-T.txt", "nginx -T 2>&1; true".to_string()),
            (
                "nginx-logs.txt",
                "tail -n 300 /var/log/nginx/*.log 2>&1; true".to_string(),
            ),
        ];
        for (file, cmd) in probes {
            let text = match self.agent.run(&cmd, Duration::from_secs(30)) {
                Ok(o) => format!("{}{}", o.stdout, o.stderr),
                Err(e) => format!("(could not collect: {e:#})\n"),
            };
            let _ = fs::write(self.dir.join(file), text);
        }
        self.save_transcript();
        self.dir.clone()
    }

    /// Runs `f` on this machine; an error keeps the artifacts and says where.
    pub fn keeping_artifacts<T>(&mut self, f: impl FnOnce(&mut Machine) -> Result<T>) -> Result<T> {
        f(self).map_err(|e| {
            let dir = self.collect_artifacts();
            anyhow!("{e:#}\nartifacts: {}", dir.display())
        })
    }

    pub fn save_transcript(&self) {
        let _ = fs::write(self.dir.join("transcript.txt"), &self.transcript);
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.save_transcript();
        self.stop();
    }
}

/// A guest command that SIGKILLs a unit's main process. It waits (bounded)
/// for a MainPID: while systemd restarts the unit MainPID reads 0, and
/// `kill -9 0` would kill the calling shell's whole process group.
pub fn kill_main_pid(unit: &str) -> String {
    let unit = shell_quote(unit);
    format!(
        "for i in $(seq 300); do pid=$(systemctl show -P MainPID {unit}); \
         if [ \"$pid\" -gt 0 ]; then exec kill -9 \"$pid\"; fi; sleep 0.1; done; \
         echo \"no MainPID for {unit} within 30 s\" >&2; exit 1"
    )
}
