//! A host other than the front (`[host.NAME]`), as the executor sees it:
//! its systemd over the remote transport (ssh, `systemd-stdio-bridge`), and
//! its unit directory and pending record over the same ssh access, every
//! call under `BatchMode` (see [`RemoteHost::ssh_args_with`]). nginx
//! runs on the front only, so every nginx call is a no-op here.
//!
//! Files are written the way the front writes them, atomically: the bytes go
//! to a hidden temporary name in the same directory (`.NAME.cgipool-tmp`,
//! which is never a cgipool name), then `mv` puts them in place. The unit
//! directory is read as a tar stream of cgipool's names (its files and the
//! links in `.wants` directories), unpacked into a local temporary
//! directory and read there exactly as the front's own directory is read.
use super::host::{Bus, Drain, Host, OnBus};
use crate::files::{self, OnDisk};
use crate::plan::{ObservedNginx, Pending};
use crate::remote::{RemoteHost, SshTimeouts};
use crate::render::{Entry, NginxFiles};
use crate::systemd::Systemd;
use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Where a host's pending record lives (as on the front, see crate::state).
const PENDING: &str = "/var/lib/cgipool/pending.json";

/// A `[host.NAME]` reached over ssh.
pub struct SshHost {
    /// The section's name (what messages call the host).
    pub name: String,
    pub address: RemoteHost,
    pub bus: Bus,
    pub unit_dir: PathBuf,
    /// ssh's own timeouts, for the bus and for every file operation.
    pub timeouts: SshTimeouts,
}

impl SshHost {
    /// Connects to the host's systemd and reads its unit directory once, so
    /// that both ways in are proven before anything changes anywhere.
    pub async fn connect(
        name: &str,
        address: &RemoteHost,
        unit_dir: &Path,
        timeout: Duration,
    ) -> Result<SshHost> {
        SshHost::connect_with(name, address, unit_dir, timeout, SshTimeouts::OPERATOR).await
    }

    /// [`SshHost::connect`] with ssh's `timeouts` (watch's are short).
    pub async fn connect_with(
        name: &str,
        address: &RemoteHost,
        unit_dir: &Path,
        timeout: Duration,
        timeouts: SshTimeouts,
    ) -> Result<SshHost> {
        let conn = address.connect_with(timeout, &timeouts).await?;
        let systemd = Systemd::over(conn).await?;
        let mut host = SshHost {
            name: name.to_string(),
            address: address.clone(),
            bus: Bus {
                systemd,
                job_timeout: timeout,
            },
            unit_dir: unit_dir.to_path_buf(),
            timeouts,
        };
        host.read_unit_dir()
            .await
            .context("reading its unit directory over ssh")?;
        Ok(host)
    }

    /// Runs `script` on the host (through its login shell) with `input` on
    /// its stdin; returns its stdout, or fails with its stderr.
    async fn run(&self, script: String, input: Vec<u8>) -> Result<Vec<u8>> {
        let args = self.address.ssh_args_with(&script, &self.timeouts);
        let who = format!("host {} ({})", self.name, self.address);
        tokio::task::spawn_blocking(move || run_ssh(&args, &input))
            .await
            .context("running ssh")?
            .with_context(|| format!("{who}: `{script}` over ssh"))
    }

    fn path(&self, rel: &Path) -> PathBuf {
        self.unit_dir.join(rel)
    }
}

fn run_ssh(args: &[String], input: &[u8]) -> Result<Vec<u8>> {
    let mut child = Command::new("ssh")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting ssh")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input).context("writing to ssh")?;
    }
    let out = child.wait_with_output().context("waiting for ssh")?;
    if !out.status.success() {
        bail!(
            "failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

/// `s` as one word of a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The temporary name an entry is written under before `mv` puts it in place.
fn tmp_of(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.cgipool-tmp"))
}

/// The script that prints the unit directory's cgipool entries as tar:
/// `cgipool*` files and directories at the top, and `cgipool*` entries one
/// level down (links in `.wants` directories). Nothing when the directory
/// does not exist.
fn read_script(unit_dir: &Path) -> String {
    format!(
        "cd {} 2>/dev/null || exit 0; find . -mindepth 1 -maxdepth 2 -name 'cgipool*' -print0 | tar --null --no-recursion -cf - -T -",
        shell_quote(&unit_dir.display().to_string())
    )
}

fn write_script(path: &Path, entry: &Entry) -> String {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let q = |p: &Path| shell_quote(&p.display().to_string());
    let tmp = tmp_of(path);
    match entry {
        Entry::File(_) => format!(
            "mkdir -p {dir} && cat > {tmp} && chmod 0644 {tmp} && mv -f {tmp} {path}",
            dir = q(dir),
            tmp = q(&tmp),
            path = q(path)
        ),
        Entry::Link(target) => format!(
            "mkdir -p {dir} && ln -sfn {target} {tmp} && mv -Tf {tmp} {path}",
            dir = q(dir),
            target = q(target),
            tmp = q(&tmp),
            path = q(path)
        ),
    }
}

impl OnBus for SshHost {
    fn bus(&self) -> &Bus {
        &self.bus
    }
}

impl Host for SshHost {
    async fn read_unit_dir(&mut self) -> Result<OnDisk> {
        let tar = self.run(read_script(&self.unit_dir), Vec::new()).await?;
        let local = tempfile::tempdir().context("a temporary directory")?;
        if !tar.is_empty() {
            let mut child = Command::new("tar")
                .arg("-xf")
                .arg("-")
                .arg("-C")
                .arg(local.path())
                .stdin(Stdio::piped())
                .spawn()
                .context("starting tar")?;
            if let Some(mut stdin) = child.stdin.take() {
                stdin.write_all(&tar).context("writing to tar")?;
            }
            let status = child.wait().context("waiting for tar")?;
            if !status.success() {
                bail!(
                    "tar could not unpack host {}'s unit directory ({status})",
                    self.name
                );
            }
        }
        let mut disk = files::read_unit_dir(local.path())?;
        // Foreign files are named as they are on the host.
        for f in &mut disk.foreign {
            if let Ok(rel) = f.strip_prefix(local.path()) {
                *f = self.unit_dir.join(rel);
            }
        }
        Ok(disk)
    }

    async fn write_entry(&mut self, rel: &Path, entry: &Entry) -> Result<()> {
        let input = match entry {
            Entry::File(text) => text.as_bytes().to_vec(),
            Entry::Link(_) => Vec::new(),
        };
        self.run(write_script(&self.path(rel), entry), input)
            .await?;
        Ok(())
    }

    async fn remove_entry(&mut self, rel: &Path) -> Result<()> {
        let path = self.path(rel);
        let mut script = format!("rm -f {}", shell_quote(&path.display().to_string()));
        if let Some(dir) = path.parent().filter(|d| *d != self.unit_dir) {
            // The `.wants` directory goes once empty (rmdir refuses otherwise).
            script.push_str(&format!(
                "; rmdir {} 2>/dev/null; true",
                shell_quote(&dir.display().to_string())
            ));
        }
        self.run(script, Vec::new()).await?;
        Ok(())
    }

    async fn nginx(&mut self) -> Result<Option<ObservedNginx>> {
        Ok(None)
    }

    async fn nginx_recover(&mut self) -> Result<bool> {
        Ok(false)
    }

    async fn nginx_install(&mut self, _files: &NginxFiles, _keep: bool) -> Result<()> {
        bail!("host {}: nginx runs on the front only", self.name)
    }

    async fn nginx_reload(&mut self, _generation: &str) -> Result<Drain> {
        bail!("host {}: nginx runs on the front only", self.name)
    }

    async fn nginx_drain(&mut self, _drain: &Drain) -> Result<()> {
        Ok(())
    }

    async fn read_pending(&mut self) -> Result<Pending> {
        let text = self
            .run(format!("cat {PENDING} 2>/dev/null; true"), Vec::new())
            .await?;
        if text.is_empty() {
            return Ok(Pending::default());
        }
        serde_json::from_slice(&text).with_context(|| {
            format!(
                "host {}: {PENDING} is not a cgipool pending record",
                self.name
            )
        })
    }

    async fn write_pending(&mut self, pending: &Pending) -> Result<()> {
        let path = Path::new(PENDING);
        if pending.is_empty() {
            self.run(format!("rm -f {PENDING}"), Vec::new()).await?;
            return Ok(());
        }
        let text = serde_json::to_vec_pretty(pending)?;
        self.run(write_script(path, &Entry::File(String::new())), text)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_quote_every_path_and_write_through_a_hidden_temporary_name() {
        assert_eq!(shell_quote("a'b"), "'a'\\''b'");
        let p = Path::new("/etc/systemd/system/cgipool-x.target.wants/cgipool-x@1.service");
        assert_eq!(
            write_script(p, &Entry::Link("/etc/systemd/system/cgipool-x@.service".into())),
            "mkdir -p '/etc/systemd/system/cgipool-x.target.wants' && ln -sfn '/etc/systemd/system/cgipool-x@.service' \
             '/etc/systemd/system/cgipool-x.target.wants/.cgipool-x@1.service.cgipool-tmp' && mv -Tf \
             '/etc/systemd/system/cgipool-x.target.wants/.cgipool-x@1.service.cgipool-tmp' \
             '/etc/systemd/system/cgipool-x.target.wants/cgipool-x@1.service'"
        );
        let f = write_script(
            Path::new("/etc/systemd/system/cgipool.target"),
            &Entry::File(String::new()),
        );
        assert!(f.starts_with("mkdir -p '/etc/systemd/system' && cat > '/etc/systemd/system/.cgipool.target.cgipool-tmp'"), "{f}");
        assert!(!files::is_cgipool_name(".cgipool.target.cgipool-tmp"));
        assert!(read_script(Path::new("/run/systemd/system"))
            .starts_with("cd '/run/systemd/system' 2>/dev/null || exit 0;"));
    }
}
