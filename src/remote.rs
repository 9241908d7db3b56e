//! The remote transport: a host's system bus reached the way `systemctl -H`
//! reaches it, through ssh and `systemd-stdio-bridge` on the other end
//! (D-Bus's `unixexec` transport, zbus's `unixexec` feature). SSH does the
//! authentication, polkit on the remote host the authorisation; cgipool runs
//! no agent of its own there.
//!
//! A host is named as systemctl takes it: `[user@]host[:port]`, the host a
//! DNS name, an IPv4 address or a bracketed IPv6 address (`[fd00::1]:2222`).
//! The name becomes ssh's arguments, so it is checked before anything runs:
//! only the characters those forms need are accepted (no leading `-`, which
//! ssh would take as an option; no spaces, quotes or shell metacharacters,
//! which the remote login shell would interpret). The D-Bus address escapes
//! every value byte outside the spec's optionally-escaped set.
//!
//! The address is systemd's (`bus_set_address_system_remote`) with two ssh
//! options more, because cgipool runs unattended: `BatchMode=yes` (a missing
//! key fails at once instead of asking for a password nobody types) and
//! `ConnectTimeout` (a host that does not answer fails in bounded time; the
//! whole connect is bounded by the caller's timeout as well).
//!
//! zbus 6.2 does not percent-decode the values of a `unixexec:` address it
//! parses (ssh would be handed `root%40web1`), so the connection is built from
//! the program and its arguments, and the address string — what `systemctl`
//! would print for the same host — serves for messages; a unit test holds
//! the two together.
use anyhow::{bail, Context, Result};
use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// How long ssh waits for a host: for the TCP connection and the server's
/// banner (`ConnectTimeout`), and, once connected, how often it asks a
/// silent server whether it is still there (`ServerAliveInterval`, giving up
/// after `ServerAliveCountMax` unanswered asks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SshTimeouts {
    pub connect_secs: u32,
    /// None: ssh's default (no keep-alive asks; TCP decides, after minutes).
    pub alive: Option<(u32, u32)>,
}

impl SshTimeouts {
    /// apply, status, down: an operator waits, a slow host may take its time.
    pub const OPERATOR: SshTimeouts = SshTimeouts {
        connect_secs: 10,
        alive: None,
    };
    /// status: an operator looks, and a host that does not answer within
    /// 3 s is shown as unreadable (watch's own view of it is shown too).
    pub const STATUS: SshTimeouts = SshTimeouts {
        connect_secs: 3,
        alive: Some((1, 3)),
    };
    /// watch: a host that lost power must be noticed within seconds (a
    /// connect that is not answered in 2 s fails, a connection that stops
    /// answering ends after 1 s x 2 unanswered keep-alives), so that its
    /// workers leave nginx quickly and no ssh of a dead host lingers.
    pub const WATCH: SshTimeouts = SshTimeouts {
        connect_secs: 2,
        alive: Some((1, 2)),
    };

    fn options(&self) -> Vec<String> {
        let mut o = vec![format!("ConnectTimeout={}", self.connect_secs)];
        if let Some((interval, count)) = self.alive {
            o.push(format!("ServerAliveInterval={interval}"));
            o.push(format!("ServerAliveCountMax={count}"));
        }
        o
    }
}

/// A remote host as `systemctl -H` takes it: `[user@]host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteHost {
    /// The login name; ssh's default (its config, or the local user) when None.
    pub user: Option<String>,
    /// A DNS name, an IPv4 address, or an IPv6 address without its brackets.
    pub host: String,
    pub port: Option<u16>,
}

impl FromStr for RemoteHost {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<RemoteHost> {
        parse(s).with_context(|| {
            format!("{s:?} is not a remote host (expected user@host or user@host:port)")
        })
    }
}

fn parse(s: &str) -> Result<RemoteHost> {
    if s.is_empty() {
        bail!("it is empty");
    }
    if let Some(c) = s.chars().find(|c| c.is_whitespace() || c.is_control()) {
        bail!("it contains {c:?}");
    }
    let (user, rest) = match s.split_once('@') {
        Some((user, rest)) => (Some(user), rest),
        None => (None, s),
    };
    if let Some(user) = user {
        check_user(user)?;
    }
    let (host, port) = split_port(rest)?;
    check_host(host)?;
    Ok(RemoteHost {
        user: user.map(String::from),
        host: host.to_string(),
        port,
    })
}

/// Login names as useradd takes them (and `$` at the end, for machine accounts).
fn check_user(user: &str) -> Result<()> {
    let body = user.strip_suffix('$').unwrap_or(user);
    let Some(first) = body.chars().next() else {
        bail!("the user name is empty");
    };
    if !(first.is_ascii_alphanumeric() || first == '_') {
        bail!("the user name must start with a letter, a digit or '_', not {first:?}");
    }
    if let Some(c) = body
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        bail!("the user name contains {c:?}");
    }
    if user.len() > 32 {
        bail!("the user name is longer than 32 characters");
    }
    Ok(())
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn split_port(rest: &str) -> Result<(&str, Option<u16>)> {
    let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
        let Some((v6, after)) = bracketed.split_once(']') else {
            bail!("'[' opens an IPv6 address that ']' does not close");
        };
        if v6.parse::<std::net::Ipv6Addr>().is_err() {
            bail!("{v6:?} in brackets is not an IPv6 address");
        }
        match after {
            "" => (v6, None),
            _ => match after.strip_prefix(':') {
                Some(port) => (v6, Some(port)),
                None => bail!("only ':port' may follow the bracketed address, not {after:?}"),
            },
        }
    } else {
        match rest.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (rest, None),
        }
    };
    let port = match port {
        None => None,
        Some(p) => Some(check_port(p)?),
    };
    Ok((host, port))
}

fn check_port(p: &str) -> Result<u16> {
    if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
        bail!("the port {p:?} is not a number");
    }
    match p.parse::<u16>() {
        Ok(n) if n > 0 => Ok(n),
        _ => bail!("the port {p} is outside 1..65535"),
    }
}

/// A DNS name (letters, digits, '-' inside labels, dots between them), an
/// IPv4 address, or an IPv6 address (already out of its brackets).
fn check_host(host: &str) -> Result<()> {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    if host.is_empty() {
        bail!("the host name is empty");
    }
    if host.len() > 253 {
        bail!("the host name is longer than 253 characters");
    }
    for label in host.split('.') {
        if label.is_empty() {
            bail!("the host name has an empty label");
        }
        if label.starts_with('-') || label.ends_with('-') {
            bail!("the host name's label {label:?} starts or ends with '-'");
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
        {
            bail!("the host name contains {c:?}");
        }
    }
    Ok(())
}

impl fmt::Display for RemoteHost {
    /// The form it was given in (`user@host:port`, brackets around IPv6).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(user) = &self.user {
            write!(f, "{user}@")?;
        }
        if self.host.contains(':') {
            write!(f, "[{}]", self.host)?;
        } else {
            f.write_str(&self.host)?;
        }
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        Ok(())
    }
}

impl RemoteHost {
    /// What ssh runs as: its arguments after the program name.
    #[cfg(test)]
    pub fn ssh_args(&self) -> Vec<String> {
        self.ssh_args_with("systemd-stdio-bridge", &SshTimeouts::OPERATOR)
    }

    /// ssh's arguments to run `command` (one string, which the remote login
    /// shell interprets: quote what goes into it) on the host, with
    /// `timeouts`.
    pub fn ssh_args_with(&self, command: &str, timeouts: &SshTimeouts) -> Vec<String> {
        let mut args = vec![
            "-xT".to_string(),
            "-o".to_string(),
            "BatchMode=yes".to_string(),
        ];
        for option in timeouts.options() {
            args.push("-o".to_string());
            args.push(option);
        }
        if let Some(port) = self.port {
            args.push("-p".to_string());
            args.push(port.to_string());
        }
        args.push("--".to_string());
        args.push(match &self.user {
            Some(user) => format!("{user}@{}", self.host),
            None => self.host.clone(),
        });
        args.push(command.to_string());
        args
    }

    /// The D-Bus address of the host's system bus:
    /// `unixexec:path=ssh,argv1=-xT,…,argvN=systemd-stdio-bridge`.
    #[cfg(test)]
    pub fn bus_address(&self) -> String {
        self.bus_address_with(&SshTimeouts::OPERATOR)
    }

    /// [`RemoteHost::bus_address`] with ssh's `timeouts`.
    pub fn bus_address_with(&self, timeouts: &SshTimeouts) -> String {
        let mut address = String::from("unixexec:path=ssh");
        for (i, arg) in self
            .ssh_args_with("systemd-stdio-bridge", timeouts)
            .iter()
            .enumerate()
        {
            address.push_str(&format!(",argv{}={}", i + 1, escape_value(arg)));
        }
        address
    }

    /// The same address as zbus's value, built from the arguments (not parsed).
    fn zbus_address(&self, timeouts: &SshTimeouts) -> zbus::Address {
        use zbus::address::{transport::Unixexec, Transport};
        let args = self
            .ssh_args_with("systemd-stdio-bridge", timeouts)
            .into_iter()
            .map(OsString::from)
            .collect();
        zbus::Address::new(Transport::Unixexec(Unixexec::new(
            PathBuf::from("ssh"),
            None,
            args,
        )))
    }

    /// Connects to the host's system bus over ssh; fails naming the host when
    /// it cannot be reached, refuses the key, has no systemd-stdio-bridge, or
    /// does not answer within `timeout`.
    pub async fn connect(&self, timeout: Duration) -> Result<zbus::Connection> {
        self.connect_with(timeout, &SshTimeouts::OPERATOR).await
    }

    /// [`RemoteHost::connect`] with ssh's `timeouts`.
    pub async fn connect_with(
        &self,
        timeout: Duration,
        timeouts: &SshTimeouts,
    ) -> Result<zbus::Connection> {
        let address = self.bus_address_with(timeouts);
        let building = zbus::connection::Builder::address(self.zbus_address(timeouts)).build();
        match tokio::time::timeout(timeout, building).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(e).with_context(|| {
                format!("{self}: cannot reach its system bus over ssh (see ssh's message above; address {address})")
            }),
            Err(_) => bail!(
                "{self}: its system bus did not answer over ssh within {}s (address {address})",
                timeout.as_secs()
            ),
        }
    }
}

/// A D-Bus address value: bytes outside the spec's optionally-escaped set
/// (`-`, `0-9`, `A-Z`, `a-z`, `_`, `/`, `\`, `.`, `*`, as libdbus reads it)
/// as `%xx`.
fn escape_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'/' | b'\\' | b'.' | b'*') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02x}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(s: &str) -> RemoteHost {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e:#}"))
    }

    fn refused(s: &str) -> String {
        match s.parse::<RemoteHost>() {
            Ok(h) => panic!("{s:?} was taken as {h:?}"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn user_at_host_is_systemds_address_with_batch_mode_and_a_connect_timeout() {
        assert_eq!(
            host("root@web1").bus_address(),
            "unixexec:path=ssh,argv1=-xT,argv2=-o,argv3=BatchMode%3dyes,argv4=-o,\
             argv5=ConnectTimeout%3d10,argv6=--,argv7=root%40web1,argv8=systemd-stdio-bridge"
        );
    }

    #[test]
    fn a_port_becomes_dash_p_before_the_double_dash() {
        let h = host("deploy@10.231.0.11:2222");
        assert_eq!(h.port, Some(2222));
        assert_eq!(
            h.ssh_args(),
            [
                "-xT",
                "-o",
                "BatchMode=yes",
                "-o",
                "ConnectTimeout=10",
                "-p",
                "2222",
                "--",
                "deploy@10.231.0.11",
                "systemd-stdio-bridge"
            ]
        );
        assert!(h.bus_address().ends_with(
            ",argv6=-p,argv7=2222,argv8=--,argv9=deploy%4010.231.0.11,argv10=systemd-stdio-bridge"
        ));
    }

    #[test]
    fn the_address_zbus_connects_with_prints_as_the_address_string() {
        for h in [
            "root@[fd00::11]:22",
            "root@web1",
            "web1.example.org:2222",
            "a.b-c_d@10.0.0.1",
        ] {
            let h = host(h);
            let address = h.zbus_address(&SshTimeouts::OPERATOR);
            assert_eq!(address.to_string(), h.bus_address());
            let zbus::address::Transport::Unixexec(exec) = address.transport() else {
                panic!("{address} is not a unixexec address");
            };
            assert_eq!(exec.path(), std::path::Path::new("ssh"));
            let args: Vec<String> = exec
                .args()
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            assert_eq!(args, h.ssh_args());
        }
        let args = host("root@[fd00::11]:22").ssh_args();
        assert!(args.contains(&"root@fd00::11".to_string()), "{args:?}");
    }

    #[test]
    fn watch_asks_a_silent_host_every_second_and_connects_within_two() {
        let args = host("root@web1").ssh_args_with("true", &SshTimeouts::WATCH);
        assert_eq!(
            args,
            [
                "-xT",
                "-o",
                "BatchMode=yes",
                "-o",
                "ConnectTimeout=2",
                "-o",
                "ServerAliveInterval=1",
                "-o",
                "ServerAliveCountMax=2",
                "--",
                "root@web1",
                "true"
            ]
        );
    }

    #[test]
    fn host_alone_and_ipv6_forms() {
        assert_eq!(
            host("web1.example.org"),
            RemoteHost {
                user: None,
                host: "web1.example.org".into(),
                port: None
            }
        );
        assert_eq!(host("[::1]").host, "::1");
        assert_eq!(host("root@[::1]:22").to_string(), "root@[::1]:22");
        assert_eq!(host("root@10.0.0.1:22").to_string(), "root@10.0.0.1:22");
        assert!(host("web1").bus_address().contains(",argv7=web1,"));
    }

    #[test]
    fn bad_hosts_are_refused_with_the_reason() {
        for (input, reason) in [
            ("", "empty"),
            ("-oProxyCommand=sh", "starts or ends with '-'"),
            ("web1=x", "contains '='"),
            ("root@-oProxyCommand=x", "starts or ends with '-'"),
            ("-root@web1", "must start with"),
            ("root@-web1", "starts or ends with '-'"),
            ("root@web1 ; reboot", "contains ' '"),
            ("root@web1\treboot", "contains '\\t'"),
            ("root@web1\n", "contains '\\n'"),
            ("root@web1;reboot", "contains ';'"),
            ("root@web1&&reboot", "contains '&'"),
            ("root@$(reboot)", "contains '$'"),
            ("root@`reboot`", "contains '`'"),
            ("root@'web1'", "contains '\\''"),
            ("root@web1|x", "contains '|'"),
            ("ro ot@web1", "contains ' '"),
            ("ro;ot@web1", "contains ';'"),
            ("a@b@web1", "contains '@'"),
            ("root@", "empty"),
            ("@web1", "user name is empty"),
            ("root@web1:", "not a number"),
            ("root@web1:0", "outside"),
            ("root@web1:65536", "outside"),
            ("root@web1:22x", "not a number"),
            ("root@web1:-22", "not a number"),
            ("root@web1..example", "empty label"),
            ("root@[fd00::1", "does not close"),
            ("root@[not-v6]:22", "not an IPv6 address"),
            ("root@[::1]x", "only ':port'"),
            ("root@fd00::1", "not a number"),
        ] {
            let e = refused(input);
            assert!(e.contains(reason), "{input:?}: {e}");
            assert!(e.contains("is not a remote host"), "{input:?}: {e}");
        }
    }

    #[test]
    fn escaping_keeps_the_spec_set_and_encodes_the_rest() {
        assert_eq!(escape_value("a-Z_0/.\\*"), "a-Z_0/.\\*");
        assert_eq!(
            escape_value("root@h:22,x=y;%"),
            "root%40h%3a22%2cx%3dy%3b%25"
        );
        assert_eq!(escape_value("é"), "%c3%a9");
    }
}
