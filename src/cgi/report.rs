//! The gateway's state report (README "The worker contract", format in
//! `worker_status`): `STATUS=cgipool requests=N busy …` when it takes a
//! request, `… idle` when it is done, over `$NOTIFY_SOCKET` (systemd keeps
//! the last one as the unit's `StatusText`, which watch reads).
//!
//! A datagram per request would be a message to PID 1 and a D-Bus
//! PropertiesChanged signal per request (measured: about 0.5 ms of PID 1's
//! CPU per report, and a wake-up of watch), so a thread of its own sends the
//! latest state at most once per `MIN_INTERVAL`: states that last shorter
//! are folded into the next report (the request count is never lost, a
//! request shorter than the interval may never show as current), and a
//! request that runs longer is reported at most `MIN_INTERVAL` after it
//! started, whatever the request thread is doing. Sends never block.
use crate::worker_status::{self, Current, Report};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// At most one report per this interval.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Latest {
    line: String,
    generation: u64,
}

/// Hands states to the sending thread; does nothing without `$NOTIFY_SOCKET`.
#[derive(Clone, Default)]
pub struct Reporter {
    shared: Option<Arc<(Mutex<Latest>, Condvar)>>,
}

impl Reporter {
    pub fn from_env() -> Reporter {
        let Some(addr) =
            std::env::var("NOTIFY_SOCKET")
                .ok()
                .and_then(|s| match s.strip_prefix('@') {
                    Some(name) => SocketAddr::from_abstract_name(name.as_bytes()).ok(),
                    None => SocketAddr::from_pathname(&s).ok(),
                })
        else {
            return Reporter::default();
        };
        let socket = match UnixDatagram::unbound().and_then(|s| {
            s.set_nonblocking(true)?;
            Ok(s)
        }) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("cgi-gateway: no state reports (sd_notify socket: {e})");
                return Reporter::default();
            }
        };
        let shared = Arc::new((Mutex::new(Latest::default()), Condvar::new()));
        let theirs = Arc::clone(&shared);
        let spawned = std::thread::Builder::new()
            .name("status-report".into())
            .spawn(move || send_loop(&socket, &addr, &theirs));
        if let Err(e) = spawned {
            eprintln!("cgi-gateway: no state reports (thread: {e})");
            return Reporter::default();
        }
        let r = Reporter {
            shared: Some(shared),
        };
        r.idle(0);
        r
    }

    /// A request was taken; `requests` were finished before it.
    pub fn busy(&self, requests: u64, method: &str, uri: &str, id: Option<&str>) {
        let since_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        self.set(&Report {
            requests,
            current: Some(Current {
                method: method.to_string(),
                uri: uri.to_string(),
                id: id.map(str::to_string),
                since_ms,
            }),
        });
    }

    pub fn idle(&self, requests: u64) {
        self.set(&Report {
            requests,
            current: None,
        });
    }

    fn set(&self, report: &Report) {
        let Some(shared) = &self.shared else { return };
        let (lock, wake) = &**shared;
        let mut latest = match lock.lock() {
            Ok(l) => l,
            Err(p) => p.into_inner(),
        };
        latest.line = worker_status::format(report);
        latest.generation += 1;
        wake.notify_one();
    }
}

fn send_loop(socket: &UnixDatagram, addr: &SocketAddr, shared: &(Mutex<Latest>, Condvar)) {
    let (lock, wake) = shared;
    let mut sent = 0;
    loop {
        let line = {
            let mut latest = match lock.lock() {
                Ok(l) => l,
                Err(p) => p.into_inner(),
            };
            while latest.generation == sent {
                latest = match wake.wait(latest) {
                    Ok(l) => l,
                    Err(p) => p.into_inner(),
                };
            }
            sent = latest.generation;
            format!("STATUS={}", latest.line)
        };
        // A full queue at systemd's end drops this report; the next one
        // carries the newer state.
        let _ = socket.send_to_addr(line.as_bytes(), addr);
        std::thread::sleep(MIN_INTERVAL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_the_latest_state_at_most_once_per_interval() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let systemd = UnixDatagram::bind(&path).unwrap();
        // Bounded: a sender that never sends fails here, not forever.
        systemd
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let socket = UnixDatagram::unbound().unwrap();
        let addr = SocketAddr::from_pathname(&path).unwrap();
        let shared = Arc::new((Mutex::new(Latest::default()), Condvar::new()));
        let theirs = Arc::clone(&shared);
        // Before anything can be sent: every datagram goes out after this.
        let started = std::time::Instant::now();
        std::thread::spawn(move || send_loop(&socket, &addr, &theirs));
        let r = Reporter {
            shared: Some(shared),
        };
        r.busy(0, "GET", "/a b", Some("id1"));
        let mut buf = [0u8; 4096];
        let mut recv = || {
            let n = systemd.recv(&mut buf).expect("a report within 60 s");
            let line = std::str::from_utf8(&buf[..n]).unwrap().to_string();
            let report = worker_status::parse(line.strip_prefix("STATUS=").unwrap()).unwrap();
            (line, report)
        };
        let (_, first) = recv();
        assert_eq!(first.current.unwrap().uri, "/a b");
        // Many changes: the reports that follow (how many depends on how
        // fast the changes come on this machine) end with the last state.
        for i in 1..=50 {
            r.idle(i);
        }
        let updated = started.elapsed();
        let mut reports = 1u32;
        let mut requests = 0;
        let last = loop {
            let (line, report) = recv();
            reports += 1;
            assert!(
                report.requests >= requests,
                "an older state after a newer one: {line}"
            );
            requests = report.requests;
            if requests == 50 {
                break line;
            }
            assert!(reports <= 51, "more reports than states, none the last one");
        };
        assert_eq!(last, "STATUS=cgipool requests=50 idle");
        // At most once per interval: the reports went out one MIN_INTERVAL
        // apart at least, all after `started` (a lower bound on the time
        // they took, however slow the machine is).
        let took = started.elapsed();
        assert!(
            took >= MIN_INTERVAL * (reports - 1),
            "{reports} reports within {took:?}, less than {MIN_INTERVAL:?} apart"
        );
        // The latest state, not each one: the reports before the last went
        // out while the changes were still coming (after the first and one
        // MIN_INTERVAL apart), so there are at most as many as intervals
        // passed by then.
        assert!(
            MIN_INTERVAL * reports.saturating_sub(2) <= updated,
            "{reports} reports for changes made within {updated:?}: states queued, not coalesced"
        );
        systemd.set_read_timeout(Some(MIN_INTERVAL * 3)).unwrap();
        assert!(systemd.recv(&mut buf).is_err(), "nothing more to say");
    }
}
