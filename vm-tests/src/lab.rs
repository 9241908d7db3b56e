//! Several machines on one network, for the scenarios of many hosts: nspawn
//! guests on a bridge inside a network namespace the test creates (nothing
//! routes out of it), each guest in a namespace of its own joined to the
//! bridge by a veth pair, with a static address (`10.231.0.10` for the first
//! machine, `.11` for the second, …). `enable_ssh` makes a key pair on one
//! machine and lets it log in as root on others, as an operator would set up
//! cgipool's hosts. Each guest boots on a disk that outlives its processes
//! (machine/disk.rs): `power_off` cuts a machine's power, `boot` boots it
//! again on what it had written. Everything is torn down on drop, after a
//! failure too; the namespaces and disks of a harness that was killed are
//! removed by the next start.
use crate::machine::{remove_stale_mounts, shell_quote, Env, Machine, Network, Options, Tier};
use anyhow::{anyhow, bail, ensure, Context, Result};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// The lab network's first three octets; machine `i` is `.{10 + i}`.
const SUBNET: &str = "10.231.0";
/// What names every namespace a lab creates: `cgipool-lab-<pid>-<n>-<what>`.
const NETNS_PREFIX: &str = "cgipool-lab-";

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub struct Lab {
    /// Declared first: dropped (stopped) before the network goes away.
    machines: Vec<(String, Machine)>,
    net: LabNetwork,
    /// The scenario's name, for the network's artifacts.
    scenario: String,
    /// Machines whose cable is pulled, with their host0's MAC address.
    unplugged: Vec<(String, String)>,
}

impl Lab {
    /// Creates the network and boots one nspawn guest per name, in order.
    pub fn start(env: &Env, scenario: &str, names: &[&str]) -> Result<Lab> {
        for name in names {
            // The bridge port is named after the machine (at most 15 bytes).
            ensure!(
                !name.is_empty()
                    && name.len() <= 15
                    && name.bytes().all(|b| b.is_ascii_alphanumeric()),
                "lab machine name {name:?}: 1-15 letters or digits"
            );
        }
        remove_stale_namespaces();
        remove_stale_mounts();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let mut net = LabNetwork {
            prefix: format!("{NETNS_PREFIX}{}-{n}-", std::process::id()),
            namespaces: Vec::new(),
        };
        net.create_bridge()?;
        let mut networks = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let path = net.attach(name, &address(i))?;
            networks.push(Network::Namespace {
                path,
                hostname: name.to_string(),
            });
        }
        // All at once: on a busy machine one boot can take half a minute.
        // (Each still calibrates itself; they slow each other a little,
        // which can only lengthen the waits.)
        let booted: Vec<Result<Machine>> = std::thread::scope(|scope| {
            let boots: Vec<_> = names
                .iter()
                .zip(&networks)
                .map(|(name, network)| {
                    scope.spawn(move || {
                        Machine::start_on(
                            env,
                            Tier::Nspawn,
                            &format!("{scenario}-{name}"),
                            Options::default(),
                            network,
                        )
                        .with_context(|| format!("booting lab machine {name}"))
                    })
                })
                .collect();
            boots
                .into_iter()
                .map(|b| match b.join() {
                    Ok(result) => result,
                    Err(_) => Err(anyhow!("a lab machine's boot panicked")),
                })
                .collect()
        });
        let mut machines = Vec::new();
        for (name, m) in names.iter().zip(booted) {
            // On an error the machines booted so far stop as `machines` drops.
            let mut m = m?;
            // systemd set the image's /etc/hostname over nspawn's --hostname.
            m.succeed(&format!("hostname {name} && echo {name} > /etc/hostname"))?;
            machines.push((name.to_string(), m));
        }
        Ok(Lab {
            machines,
            net,
            scenario: scenario.to_string(),
            unplugged: Vec::new(),
        })
    }

    /// The network namespaces this lab created (see `still_present`).
    pub fn namespaces(&self) -> Vec<String> {
        self.net.namespaces.clone()
    }

    /// Where the lab's disks are mounted (see `machine::still_mounted`).
    pub fn disk_mount_points(&self) -> Vec<PathBuf> {
        self.machines
            .iter()
            .flat_map(|(_, m)| m.disk_mount_points())
            .collect()
    }

    pub fn machine(&mut self, name: &str) -> &mut Machine {
        let names: Vec<String> = self.machines.iter().map(|(n, _)| n.clone()).collect();
        match self.machines.iter_mut().find(|(n, _)| n == name) {
            Some((_, m)) => m,
            None => panic!("the lab has no machine {name:?} (it has {names:?})"),
        }
    }

    /// A machine's address on the lab network.
    pub fn address(&self, name: &str) -> String {
        match self.machines.iter().position(|(n, _)| n == name) {
            Some(i) => address(i),
            None => panic!("the lab has no machine {name:?}"),
        }
    }

    /// Pulls machine `name`'s cable: its veth pair goes (the bridge's end,
    /// and `host0` inside the machine with it), so that for the others it
    /// is as if it lost power: nothing answers, not even a reset. The
    /// machine itself keeps running. [`Lab::plug`] puts the cable back.
    pub fn unplug(&mut self, name: &str) -> Result<()> {
        let _ = self.address(name); // a machine of the lab
        ensure!(
            !self.unplugged.iter().any(|(n, _)| n == name),
            "{name} is unplugged already"
        );
        let mac = self.net.mac(name)?;
        ip(&["-n", &self.net.bridge_ns(), "link", "del", name])?;
        self.unplugged.push((name.to_string(), mac));
        Ok(())
    }

    /// Plugs machine `name` back in: a new veth pair, `host0` with its old
    /// address and MAC (the others' neighbour caches stay right).
    pub fn plug(&mut self, name: &str) -> Result<()> {
        let Some(i) = self.unplugged.iter().position(|(n, _)| n == name) else {
            bail!("{name} is not unplugged");
        };
        let (_, mac) = self.unplugged.remove(i);
        let addr = self.address(name);
        self.net.link(name, &addr, Some(&mac))
    }

    /// Cuts machine `name`'s power: its `host0` goes down first (a NIC
    /// without power: for the others nothing answers, not even a reset, and
    /// the connections its processes had are never closed), then all of it
    /// stops at once, without a shutdown. Its disk, its namespace and its
    /// veth pair stay for [`Lab::boot`].
    pub fn power_off(&mut self, name: &str) -> Result<()> {
        self.host0(name, "down")?;
        self.machine(name).power_off()
    }

    /// Boots machine `name` again after [`Lab::power_off`], on its disk and
    /// network, and waits until boot is finished. `host0` comes up with the
    /// address it had: the lab sets it from outside, in the machine's
    /// namespace, and nothing in the image configures it
    /// (systemd-networkd is not enabled); checked from inside.
    pub fn boot(&mut self, name: &str) -> Result<()> {
        self.host0(name, "up")?;
        let addr = self.address(name);
        let m = self.machine(name);
        m.power_on()?;
        m.succeed(&format!(
            "ip -br addr show host0 | grep -qF {}",
            shell_quote(&format!(" {addr}/24"))
        ))
        .with_context(|| format!("{name}'s host0 after its boot"))?;
        Ok(())
    }

    /// Sets machine `name`'s host0 `up` or `down` (nothing while it is
    /// unplugged: it has no host0 then).
    fn host0(&self, name: &str, state: &str) -> Result<()> {
        if self.unplugged.iter().any(|(n, _)| n == name) {
            return Ok(());
        }
        ip(&[
            "-n",
            &self.net.machine_ns(name),
            "link",
            "set",
            "host0",
            state,
        ])
    }

    /// An address on the lab network that no machine answers.
    pub fn unused_address(&self) -> String {
        format!("{SUBNET}.99")
    }

    /// A fresh key pair on `from` (root's `~/.ssh/id_ed25519`), installed as
    /// root's authorized key on every machine of `to`, each of which gets a
    /// host key of its own (they all boot one image) that `from`'s
    /// known_hosts lists under its address; then waits until `from` logs in
    /// to each.
    pub fn enable_ssh(&mut self, from: &str, to: &[&str]) -> Result<()> {
        let public = self.machine(from).succeed(
            "set -e
             install -d -m 0700 /root/.ssh
             rm -f /root/.ssh/id_ed25519 /root/.ssh/id_ed25519.pub
             ssh-keygen -q -t ed25519 -N '' -C cgipool-lab -f /root/.ssh/id_ed25519
             cat /root/.ssh/id_ed25519.pub",
        )?;
        let mut known_hosts = String::new();
        for name in to {
            let addr = self.address(name);
            let m = self.machine(name);
            m.write_text("/root/.ssh/authorized_keys", &public)?;
            m.write_text(
                "/etc/ssh/sshd_config.d/cgipool-lab.conf",
                "HostKey /etc/ssh/ssh_host_ed25519_key\n",
            )?;
            let host_key = m.succeed(
                "set -e
                 chmod 0700 /root/.ssh && chmod 0600 /root/.ssh/authorized_keys
                 rm -f /etc/ssh/ssh_host_*
                 ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/ssh_host_ed25519_key
                 systemctl restart ssh.service
                 cat /etc/ssh/ssh_host_ed25519_key.pub",
            )?;
            m.wait_for_unit("ssh.service")?;
            let mut fields = host_key.split_whitespace();
            let (Some(kind), Some(key)) = (fields.next(), fields.next()) else {
                bail!("{name}'s host key reads {host_key:?}");
            };
            known_hosts.push_str(&format!("{addr} {kind} {key}\n"));
        }
        let m = self.machine(from);
        m.write_text("/root/.ssh/known_hosts", &known_hosts)?;
        for name in to {
            let addr = self.address(name);
            self.machine(from).wait_until_succeeds(
                &format!(
                    "ssh -o BatchMode=yes -o ConnectTimeout=5 root@{} true",
                    shell_quote(&addr)
                ),
                &format!("{from} to log in to {name} ({addr}) over ssh"),
                Duration::from_secs(20),
            )?;
        }
        Ok(())
    }

    /// Saves every machine's artifacts and the network's state; returns the
    /// directories.
    pub fn collect_artifacts(&mut self, env: &Env) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = self
            .machines
            .iter_mut()
            .map(|(_, m)| m.collect_artifacts())
            .collect();
        let file = env
            .artifacts
            .join(format!("nspawn-{}-network.txt", self.scenario));
        let _ = fs::write(&file, self.net.describe());
        dirs.push(file);
        dirs
    }
}

fn address(index: usize) -> String {
    format!("{SUBNET}.{}", 10 + index)
}

/// The lab's namespaces; deleting them on drop removes the bridge and every
/// veth pair with them.
struct LabNetwork {
    prefix: String,
    /// Created ones, the bridge's first.
    namespaces: Vec<String>,
}

impl LabNetwork {
    fn bridge_ns(&self) -> String {
        format!("{}bridge", self.prefix)
    }

    fn add_namespace(&mut self, ns: &str) -> Result<()> {
        ip(&["netns", "add", ns])?;
        self.namespaces.push(ns.to_string());
        ip(&["-n", ns, "link", "set", "lo", "up"])
    }

    fn create_bridge(&mut self) -> Result<()> {
        let ns = self.bridge_ns();
        self.add_namespace(&ns)?;
        ip(&["-n", &ns, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &ns, "link", "set", "br0", "up"])
    }

    /// A namespace for machine `name` with `host0` at `addr`/24 on the
    /// bridge; returns the path nspawn joins.
    fn attach(&mut self, name: &str, addr: &str) -> Result<PathBuf> {
        let ns = self.machine_ns(name);
        self.add_namespace(&ns)?;
        self.link(name, addr, None)?;
        Ok(Path::new("/run/netns").join(ns))
    }

    fn machine_ns(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// The veth pair of machine `name`: its end `name` on the bridge, its
    /// `host0` (with `mac`, when given) at `addr`/24 in the machine's namespace.
    fn link(&self, name: &str, addr: &str, mac: Option<&str>) -> Result<()> {
        let bridge = self.bridge_ns();
        let ns = self.machine_ns(name);
        ip(&[
            "-n", &bridge, "link", "add", name, "type", "veth", "peer", "name", "host0", "netns",
            &ns,
        ])?;
        ip(&["-n", &bridge, "link", "set", name, "master", "br0", "up"])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "host0",
        ])?;
        if let Some(mac) = mac {
            ip(&["-n", &ns, "link", "set", "host0", "address", mac])?;
        }
        ip(&["-n", &ns, "link", "set", "host0", "up"])
    }

    /// The MAC address of machine `name`'s host0.
    fn mac(&self, name: &str) -> Result<String> {
        let out = ip_output(&["-n", &self.machine_ns(name), "-o", "link", "show", "host0"])?;
        let mut words = out.split_whitespace();
        words
            .find(|w| *w == "link/ether")
            .and_then(|_| words.next())
            .map(String::from)
            .with_context(|| format!("no MAC address in `ip link show host0` of {name}: {out}"))
    }

    fn describe(&self) -> String {
        let mut out = String::new();
        for ns in &self.namespaces {
            for args in [
                vec!["-n", ns.as_str(), "-br", "addr"],
                vec!["-n", ns.as_str(), "-br", "link"],
            ] {
                out.push_str(&format!("$ ip {}\n", args.join(" ")));
                match Command::new("ip").args(&args).output() {
                    Ok(o) => {
                        out.push_str(&String::from_utf8_lossy(&o.stdout));
                        out.push_str(&String::from_utf8_lossy(&o.stderr));
                    }
                    Err(e) => out.push_str(&format!("(could not run ip: {e})\n")),
                }
            }
        }
        out
    }
}

impl Drop for LabNetwork {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            if let Err(e) = ip(&["netns", "delete", ns]) {
                eprintln!("lab: {e:#}");
            }
        }
    }
}

/// Runs `ip ARGS`; fails with the command and what ip said.
fn ip(args: &[&str]) -> Result<()> {
    ip_output(args).map(|_| ())
}

/// Runs `ip ARGS`; returns what it printed.
fn ip_output(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (apt-get install iproute2)")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Which of `namespaces` still exist (none should, once a lab is dropped).
pub fn still_present(namespaces: &[String]) -> Vec<String> {
    namespaces
        .iter()
        .filter(|ns| Path::new("/run/netns").join(ns).exists())
        .cloned()
        .collect()
}

/// Deletes the namespaces of labs whose harness process is gone (killed
/// before its drop ran), after killing what still runs in them: the guests
/// of such a lab outlive their harness.
fn remove_stale_namespaces() {
    let Ok(entries) = fs::read_dir("/run/netns") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(NETNS_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            if let Ok(out) = Command::new("ip").args(["netns", "pids", &name]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse::<i32>() {
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
            }
            if let Err(e) = ip(&["netns", "delete", &name]) {
                eprintln!("lab: removing a stale namespace: {e:#}");
            }
        }
    }
}
