//! How a guest stops: shut down when the machine is dropped; and, for a
//! lab guest (an nspawn guest with a disk of its own, see disk.rs), a power
//! cut and a boot again on the same disk and network namespace.
//!
//! nspawn guests share the host kernel's boot id, so a new boot is told by
//! `/run` instead: a tmpfs of each boot's, in which the power cut leaves a
//! marker that the next boot must not have.
use super::boot::{nspawn_cgroup, remove_cgroup, spawn_nspawn};
use super::{Machine, Tier};
use anyhow::{bail, ensure, Context, Result};
use std::fs;
use std::io::Write as _;
use std::path::Path;
use std::thread::sleep;
use std::time::{Duration, Instant};

/// Written into `/run` just before a power cut; a new boot has none.
const BEFORE_POWER_CUT: &str = "/run/vmtest-before-power-cut";

impl Machine {
    /// Cuts the power: every process of the guest (nspawn, the guest's
    /// systemd and all it runs) is SIGKILLed at once through its cgroup
    /// subtree, without a shutdown. Its disk and its network namespace stay
    /// as they are; [`Machine::power_on`] boots it again.
    pub fn power_off(&mut self) -> Result<()> {
        ensure!(
            self.tier == Tier::Nspawn && self.disk.is_some(),
            "power_off needs a lab machine (an nspawn guest with a disk of its own)"
        );
        let Some(cgroup) = nspawn_cgroup(&self.run_dir) else {
            bail!("power_off needs the host's cgroup v2 hierarchy at /sys/fs/cgroup/unified");
        };
        self.succeed(&format!("touch {BEFORE_POWER_CUT}"))?;
        self.note("# power cut (cgroup.kill)");
        fs::write(cgroup.join("cgroup.kill"), "1")
            .with_context(|| format!("writing 1 to {}/cgroup.kill", cgroup.display()))?;
        self.agent.disconnect();
        let base = Duration::from_secs(10);
        let deadline = Instant::now() + self.scaled(base);
        let mut child = self.child.take();
        loop {
            if let Some(c) = child.as_mut() {
                if let Ok(Some(_)) = c.try_wait() {
                    child = None;
                }
            }
            if child.is_none() && !populated(&cgroup) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let procs = fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
                self.child = child;
                bail!(
                    "processes of {} still run after the power cut ({}; nspawn {}, cgroup.procs: {})",
                    self.name,
                    self.limit_note(base),
                    if self.child.is_some() { "runs" } else { "is gone" },
                    procs.split_whitespace().collect::<Vec<_>>().join(" ")
                );
            }
            sleep(Duration::from_millis(20));
        }
    }

    /// Boots a machine whose power was cut again, on the same disk and
    /// network namespace; waits until its agent answers from a new boot and
    /// boot is finished. Its console log goes on in the same file.
    pub fn power_on(&mut self) -> Result<()> {
        ensure!(
            self.child.is_none(),
            "power_on: {} is running (power_off first)",
            self.name
        );
        let Some(disk) = self.disk.as_ref() else {
            bail!("power_on needs a lab machine (an nspawn guest with a disk of its own)");
        };
        let console_log = self.dir.join("console.log");
        let mut console = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&console_log)
            .with_context(|| format!("opening {}", console_log.display()))?;
        writeln!(console, "\n--- vm-tests: power on after a power cut ---")?;
        let (child, _) = spawn_nspawn(
            &self.env,
            &self.run_dir,
            console,
            &self.network,
            Some(disk.root()),
        )?;
        self.child = Some(child);
        self.note("# power on");
        let started = Instant::now();
        let limit = self.scaled(Duration::from_secs(30));
        self.wait_for_agent(None, limit)?;
        let fresh = self.execute(&format!("test ! -e {BEFORE_POWER_CUT}"), limit)?;
        ensure!(
            fresh.rc == 0,
            "{} answered after power on with {BEFORE_POWER_CUT} still there: not a new boot",
            self.name
        );
        self.wait_boot_finished()?;
        let took = started.elapsed().as_secs_f64();
        self.note(&format!("# booted again in {took:.1}s"));
        Ok(())
    }

    /// Where a lab guest's disk is mounted (nothing for other guests).
    pub fn disk_mount_points(&self) -> Vec<std::path::PathBuf> {
        self.disk.iter().flat_map(|d| d.mount_points()).collect()
    }

    /// Shuts the guest down (nspawn: halt, then terminate; QEMU: quit),
    /// killing what is left, and removes what it had on the host.
    pub(super) fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = child.id() as i32;
            let signals: &[i32] = match self.tier {
                // nspawn: first SIGTERM halts the container, a second one terminates it at once.
                Tier::Nspawn => &[libc::SIGTERM, libc::SIGTERM, libc::SIGKILL],
                Tier::Qemu => &[libc::SIGTERM, libc::SIGKILL],
            };
            'signals: for &sig in signals {
                unsafe { libc::kill(pid, sig) };
                let deadline = Instant::now() + Duration::from_secs(5);
                while Instant::now() < deadline {
                    if let Ok(Some(_)) = child.try_wait() {
                        break 'signals;
                    }
                    sleep(Duration::from_millis(50));
                }
            }
            let _ = child.wait();
        }
        self.cleanup();
    }

    /// An nspawn guest's cgroup subtree (what still runs there is killed
    /// first) and disk, then the run directory.
    fn cleanup(&self) {
        if self.tier == Tier::Nspawn {
            if let Some(cg) = nspawn_cgroup(&self.run_dir) {
                if populated(&cg) {
                    let _ = fs::write(cg.join("cgroup.kill"), "1");
                    let deadline = Instant::now() + Duration::from_secs(5);
                    while populated(&cg) && Instant::now() < deadline {
                        sleep(Duration::from_millis(20));
                    }
                }
                remove_cgroup(&cg);
            }
        }
        if let Some(disk) = &self.disk {
            disk.unmount();
            if disk.is_mounted() {
                // Never remove files through a disk that is still mounted.
                eprintln!(
                    "vm-tests: {} stays mounted; {} is left behind",
                    disk.root().display(),
                    self.run_dir.display()
                );
                return;
            }
        }
        let _ = fs::remove_dir_all(&self.run_dir);
    }
}

/// Whether a process still runs in cgroup `dir` or below it.
fn populated(dir: &Path) -> bool {
    fs::read_to_string(dir.join("cgroup.events"))
        .map(|e| e.lines().any(|l| l == "populated 1"))
        .unwrap_or(false)
}
