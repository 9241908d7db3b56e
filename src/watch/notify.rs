//! sd_notify for the watch daemon: READY=1, WATCHDOG=1, STATUS= over
//! $NOTIFY_SOCKET (a path, or an abstract socket written as @name).
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::{Duration, Instant};

#[derive(Clone)]
pub struct Notifier {
    target: Option<SocketAddr>,
    watchdog: Option<Duration>,
    last_ping: Option<Instant>,
}

impl Notifier {
    pub fn from_env() -> Notifier {
        let target = std::env::var("NOTIFY_SOCKET")
            .ok()
            .and_then(|s| match s.strip_prefix('@') {
                Some(name) => SocketAddr::from_abstract_name(name.as_bytes()).ok(),
                None => SocketAddr::from_pathname(&s).ok(),
            });
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|u| u.parse::<u64>().ok())
            .map(Duration::from_micros);
        Notifier {
            target,
            watchdog,
            last_ping: None,
        }
    }

    pub fn send(&self, state: &str) {
        let Some(addr) = &self.target else { return };
        if let Ok(sock) = UnixDatagram::unbound() {
            let _ = sock.send_to_addr(state.as_bytes(), addr);
        }
    }

    /// WATCHDOG=1, at most every half of WatchdogSec.
    pub fn ping(&mut self) {
        let Some(period) = self.watchdog else { return };
        if self
            .last_ping
            .map(|t| t.elapsed() >= period / 2)
            .unwrap_or(true)
        {
            self.send("WATCHDOG=1");
            self.last_ping = Some(Instant::now());
        }
    }
}
