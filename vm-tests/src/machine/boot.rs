//! Booting a guest: the nspawn container (in a cgroup v2 subtree of its
//! own when the host has one to give) and the QEMU VM (its payload image,
//! its monitor).
use super::{Env, Network, Options};
use anyhow::{anyhow, bail, Context, Result};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
/// The cgroup v2 subtree of one nspawn guest, on a host that keeps cgroup v2
/// beside v1 (`/sys/fs/cgroup/unified`) without systemd as PID 1. Without it
/// every guest's systemd uses the root of that hierarchy, so two guests at
/// once share `/system.slice/nginx.service` and the like: each sees the
/// other's processes as pid 0 and GetUnitProcesses fails with EIO.
pub(super) fn nspawn_cgroup(run_dir: &Path) -> Option<PathBuf> {
    let root = Path::new("/sys/fs/cgroup/unified");
    if !root.join("cgroup.procs").exists() {
        return None;
    }
    Some(root.join(run_dir.file_name()?))
}

/// Removes a guest's cgroup subtree once its processes are gone (deepest
/// first: a cgroup with children cannot be removed).
pub(super) fn remove_cgroup(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup(&e.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

/// Starts nspawn on `disk` (a lab guest's root directory, see disk.rs), or
/// without one on the image's rootfs under `--volatile=overlay`.
pub(super) fn spawn_nspawn(
    env: &Env,
    run_dir: &Path,
    console: fs::File,
    network: &Network,
    disk: Option<&Path>,
) -> Result<(Child, PathBuf)> {
    let (root, volatile) = match disk {
        Some(root) => (root.to_path_buf(), None),
        None => (env.image.join("rootfs"), Some("--volatile=overlay")),
    };
    // In its own cgroup v2 subtree when the host has one to give (see
    // nspawn_cgroup): the shell moves itself there, then becomes nspawn.
    let mut cmd = match nspawn_cgroup(run_dir) {
        Some(cg) => {
            remove_cgroup(&cg);
            fs::create_dir_all(&cg).with_context(|| format!("creating {}", cg.display()))?;
            let mut c = Command::new("/bin/sh");
            c.arg("-c")
                .arg(r#"echo $$ > "$0" && exec "$@""#)
                .arg(cg.join("cgroup.procs"))
                .arg("systemd-nspawn");
            c
        }
        None => Command::new("systemd-nspawn"),
    };
    let child = cmd
        .env("SYSTEMD_NSPAWN_UNIFIED_HIERARCHY", "1")
        .args(["--register=no", "--keep-unit", "--console=read-only"])
        .args(volatile)
        .args(match network {
            Network::Private => vec!["--private-network".to_string()],
            Network::Namespace { path, hostname } => vec![
                format!("--network-namespace-path={}", path.display()),
                format!("--hostname={hostname}"),
                // systemd's IP filters (IPAddressAllow=/Deny=) are cgroup
                // BPF programs: the lab's guests may load them.
                "--capability=CAP_BPF".to_string(),
                "--system-call-filter=bpf".to_string(),
            ],
        })
        .arg(format!(
            "--bind={}:/mnt/agent",
            run_dir.join("agent").display()
        ))
        .arg(format!("--bind-ro={}:/payload", env.payload.display()))
        .arg("-D")
        .arg(&root)
        .arg("-b")
        .stdin(Stdio::null())
        .stdout(console.try_clone()?)
        .stderr(console)
        .spawn()
        .context("starting systemd-nspawn (apt-get install systemd-container)")?;
    Ok((child, run_dir.join("agent/agent.sock")))
}

/// The payload packed once per run into a read-only ext4 image.
static QEMU_PAYLOAD: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();

fn qemu_payload(env: &Env) -> Result<PathBuf> {
    let res = QEMU_PAYLOAD.get_or_init(|| {
        let img = env.artifacts.join("payload.ext4");
        let _ = fs::remove_file(&img);
        let status = Command::new("mkfs.ext4")
            .args(["-q", "-L", "cgipayload", "-d"])
            .arg(&env.payload)
            .arg(&img)
            .arg("256M")
            .status();
        match status {
            Ok(s) if s.success() => Ok(img),
            Ok(s) => Err(format!(
                "mkfs.ext4 -d {} failed: {s}",
                env.payload.display()
            )),
            Err(e) => Err(format!("running mkfs.ext4: {e}")),
        }
    });
    res.clone().map_err(|e| anyhow!(e))
}

pub(super) fn spawn_qemu(
    env: &Env,
    run_dir: &Path,
    console: fs::File,
    opts: Options,
) -> Result<(Child, PathBuf)> {
    let payload = qemu_payload(env)?;
    let overlay = run_dir.join("overlay.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(env.image.join("disk.raw"))
        .arg(&overlay)
        .status()
        .context("running qemu-img (apt-get install qemu-utils)")?;
    if !st.success() {
        bail!("qemu-img create failed: {st}");
    }
    let agent = run_dir.join("agent/qemu-agent.sock");
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-accel",
        "tcg",
        "-m",
        "1536",
        "-smp",
        "2",
        "-nographic",
        "-nic",
        "none",
        "-display",
        "none",
    ])
    .arg("-kernel")
    .arg(env.image.join("vmlinuz"))
    .arg("-initrd")
    .arg(env.image.join("initrd.img"))
    .args([
        "-append",
        "root=/dev/vda rw console=ttyS0 panic=-1 systemd.show_status=0 loglevel=4",
    ])
    .arg("-drive")
    .arg(format!("file={},if=virtio,format=qcow2", overlay.display()))
    .arg("-drive")
    .arg(format!(
        "file={},if=virtio,format=raw,readonly=on",
        payload.display()
    ))
    .args(["-device", "virtio-serial"])
    .arg("-chardev")
    .arg(format!(
        "socket,id=agent,path={},server=on,wait=off",
        agent.display()
    ))
    .args([
        "-device",
        "virtserialport,chardev=agent,name=org.cgipool.agent",
    ])
    .arg("-monitor")
    .arg(format!(
        "unix:{},server=on,wait=off",
        run_dir.join("monitor.sock").display()
    ))
    .arg("-serial")
    .arg("stdio");
    if !opts.reboots {
        cmd.arg("-no-reboot");
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(console.try_clone()?)
        .stderr(console)
        .spawn()
        .context("starting qemu-system-x86_64 (apt-get install qemu-system-x86)")?;
    Ok((child, agent))
}

pub(super) fn qemu_monitor(sock: &Path, command: &str) -> Result<()> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock)
        .with_context(|| format!("connecting to the QEMU monitor {}", sock.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    // Wait for the prompt, send the command, wait for the next prompt: the
    // monitor drops a command whose connection closes before it is read.
    let mut seen = String::new();
    let mut prompts = 0;
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + Duration::from_secs(10);
    while prompts < 2 {
        let n = s
            .read(&mut buf)
            .with_context(|| format!("waiting for the QEMU monitor to take {command}"))?;
        if n == 0 {
            bail!("the QEMU monitor closed the connection before taking {command}");
        }
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        let now = seen.matches("(qemu)").count();
        if now > prompts {
            if prompts == 0 {
                s.write_all(format!("{command}\n").as_bytes())?;
            }
            prompts = now;
        }
        if Instant::now() >= deadline {
            bail!("the QEMU monitor did not confirm {command}: {seen}");
        }
    }
    Ok(())
}
