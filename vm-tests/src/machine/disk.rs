//! A lab guest's disk: an overlayfs the harness mounts itself (lower: the
//! image's rootfs, read-only and shared by every guest; upper and work dirs
//! on a tmpfs of the guest's own in its run directory), given to nspawn as
//! its root directory. nspawn's `--volatile=overlay` mounts the same inside
//! the container, where it goes when nspawn exits; this one outlives the
//! guest's processes, so a guest whose power is cut boots again on what it
//! had written (see power.rs). Unmounted, lazily, with the machine; the
//! mounts of a harness that was killed are removed by the next lab's start
//! ([`remove_stale_mounts`]).
use anyhow::{bail, ensure, Context, Result};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where every run directory lives: `/tmp/cgipool-vm-<harness pid>-<n>`.
pub(super) const RUN_DIR_PREFIX: &str = "/tmp/cgipool-vm-";

pub(super) struct Disk {
    /// The tmpfs that holds the overlay's upper and work directories.
    tmpfs: PathBuf,
    /// The overlay: the guest's root directory.
    root: PathBuf,
}

impl Disk {
    /// Mounts a fresh disk for the guest of `run_dir` over `rootfs`.
    pub(super) fn mount(run_dir: &Path, rootfs: &Path) -> Result<Disk> {
        let lower = rootfs.display().to_string();
        // overlayfs separates its options with commas and layers with colons.
        ensure!(
            !lower.contains([',', ':']),
            "the image's rootfs {lower} has a ',' or ':' in its path, which overlayfs cannot take"
        );
        let disk = Disk {
            tmpfs: run_dir.join("disk"),
            root: run_dir.join("root"),
        };
        for dir in [&disk.tmpfs, &disk.root] {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        mount(
            &["-t", "tmpfs", "-o", "mode=0755", "cgipool-vm-disk"],
            &disk.tmpfs,
        )?;
        for dir in ["upper", "work"] {
            let dir = disk.tmpfs.join(dir);
            if let Err(e) = fs::create_dir(&dir) {
                disk.unmount();
                return Err(e).with_context(|| format!("creating {}", dir.display()));
            }
        }
        let options = format!(
            "lowerdir={lower},upperdir={},workdir={}",
            disk.tmpfs.join("upper").display(),
            disk.tmpfs.join("work").display()
        );
        if let Err(e) = mount(
            &["-t", "overlay", "-o", &options, "cgipool-vm-root"],
            &disk.root,
        ) {
            disk.unmount();
            return Err(e.context("overlayfs on the image's rootfs (modprobe overlay)"));
        }
        Ok(disk)
    }

    /// The guest's root directory.
    pub(super) fn root(&self) -> &Path {
        &self.root
    }

    /// Lazily unmounts the overlay, then its tmpfs (what is written on the
    /// disk goes with it).
    pub(super) fn unmount(&self) {
        for dir in [&self.root, &self.tmpfs] {
            if is_mounted(dir) {
                if let Err(e) = umount_lazily(dir) {
                    eprintln!("vm-tests: {e:#}");
                }
            }
        }
    }

    /// Its two mount points.
    pub(super) fn mount_points(&self) -> Vec<PathBuf> {
        vec![self.root.clone(), self.tmpfs.clone()]
    }

    /// Whether anything of the disk is still mounted.
    pub(super) fn is_mounted(&self) -> bool {
        is_mounted(&self.root) || is_mounted(&self.tmpfs)
    }
}

/// Runs `mount ARGS TARGET`; fails with what mount said.
fn mount(args: &[&str], target: &Path) -> Result<()> {
    let out = Command::new("mount")
        .args(args)
        .arg(target)
        .output()
        .context("running mount (apt-get install mount)")?;
    if !out.status.success() {
        bail!(
            "`mount {} {}` failed ({}): {}",
            args.join(" "),
            target.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn umount_lazily(target: &Path) -> Result<()> {
    let out = Command::new("umount")
        .arg("--lazy")
        .arg(target)
        .output()
        .context("running umount")?;
    if !out.status.success() {
        bail!(
            "`umount --lazy {}` failed ({}): {}",
            target.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The mount points of this mount namespace (mountinfo's fifth field; the
/// harness's paths have no characters that mountinfo escapes).
fn mount_points() -> Vec<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(PathBuf::from)
        .collect()
}

fn is_mounted(dir: &Path) -> bool {
    mount_points().iter().any(|p| p == dir)
}

/// Which of `dirs` are still mount points (none should be, once their
/// machines are dropped).
pub fn still_mounted(dirs: &[PathBuf]) -> Vec<PathBuf> {
    let points = mount_points();
    dirs.iter()
        .filter(|d| points.contains(d))
        .cloned()
        .collect()
}

/// Unmounts the disks of harnesses that are gone (killed before their
/// machines dropped): mounts under `/tmp/cgipool-vm-<pid>-*` whose pid no
/// longer runs, deepest first; then removes their run directories. Call it
/// once their guests are killed.
pub fn remove_stale_mounts() {
    let mut stale: Vec<PathBuf> = mount_points()
        .into_iter()
        .filter(|p| {
            let Some(rest) = p.to_str().and_then(|s| s.strip_prefix(RUN_DIR_PREFIX)) else {
                return false;
            };
            match rest
                .split('-')
                .next()
                .and_then(|pid| pid.parse::<u32>().ok())
            {
                Some(pid) => !Path::new(&format!("/proc/{pid}")).exists(),
                None => false,
            }
        })
        .collect();
    stale.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    for p in &stale {
        if let Err(e) = umount_lazily(p) {
            eprintln!("vm-tests: removing a stale mount: {e:#}");
        }
    }
    // Then their run directories, once nothing under them is mounted.
    let mut run_dirs: Vec<&Path> = stale.iter().filter_map(|p| p.parent()).collect();
    run_dirs.sort();
    run_dirs.dedup();
    let points = mount_points();
    for dir in run_dirs {
        if !points.iter().any(|p| p.starts_with(dir)) {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        self.unmount();
    }
}
