//! The CGI gateway as one worker among several: gateways sharing ONE
//! listening socket (what systemd's `Sockets=` gives every instance of a
//! pool), each taking a connection only when it is free; and the worker
//! contract's environment (`CGIPOOL_ACCESS_LOG`, `CGIPOOL_MAX_REQUESTS`).
//! The listening socket belongs to the test, so what no gateway accepted
//! is seen in its queue (`ss -xl`, the kernel's count).

mod common;

use common::Client;
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The program's cases, after the shebang and `wait_release`
/// ([`common::write_program`]).
const PROGRAM: &str = r#"case "$QUERY_STRING" in
  long) echo "long: started" >&2
        # Until the test creates "release" next to this program.
        wait_release
        printf 'Content-Type: text/plain\n\nlong\n' ;;
  fail) echo "failing" >&2; exit 3 ;;
  *) printf 'Content-Type: text/plain\n\nhello\n' ;;
esac
"#;

/// Gateways sharing one listening socket that the test holds.
struct Pool {
    dir: tempfile::TempDir,
    listener: UnixListener,
    gateways: Vec<Child>,
}

impl Pool {
    /// `n` gateways on one socket, with these environment variables.
    fn start(n: usize, env: &[(&str, &str)]) -> Pool {
        let dir = tempfile::tempdir().expect("tempdir");
        let program = dir.path().join("t.cgi");
        common::write_program(&program, PROGRAM);
        let listener = UnixListener::bind(dir.path().join("sock")).expect("bind");
        let mut pool = Pool {
            dir,
            listener,
            gateways: Vec::new(),
        };
        for i in 1..=n {
            let log = std::fs::File::create(pool.log_path(i)).expect("log file");
            let fd: OwnedFd = pool.listener.try_clone().expect("dup").into();
            // The socket arrives as fd 3 with LISTEN_PID/LISTEN_FDS, as
            // systemd passes it: through stdin, moved to 3 by the shell.
            let child = Command::new("/bin/sh")
                .arg("-c")
                .arg(r#"exec 3<&0 </dev/null; LISTEN_PID=$$ LISTEN_FDS=1 exec "$@""#)
                .arg("sh")
                .arg(env!("CARGO_BIN_EXE_cgipool"))
                .args(["cgi-gateway", "--timeout", "600s", "--"])
                .arg(&program)
                .env("CGIPOOL_WORKER", format!("gw@{i}"))
                .envs(env.iter().copied())
                .stdin(Stdio::from(fd))
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("starting cgipool cgi-gateway");
            pool.gateways.push(child);
            pool.wait_log(i, "one request at a time");
        }
        pool
    }

    /// Lets every `long` request finish.
    fn release(&self) {
        std::fs::write(self.dir.path().join("release"), b"").expect("creating the release file");
    }

    fn sock(&self) -> PathBuf {
        self.dir.path().join("sock")
    }

    fn log_path(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("log{i}"))
    }

    fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.log_path(i)).unwrap_or_default()
    }

    fn logs(&self) -> String {
        (1..=self.gateways.len()).map(|i| self.log(i)).collect()
    }

    fn wait_log(&self, i: usize, want: &str) -> String {
        wait_for(&format!("{want:?} in gateway {i}'s log"), || {
            let log = self.log(i);
            log.contains(want).then_some(log)
        })
    }

    fn signal(&self, i: usize, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.gateways[i - 1].id() as i32);
        nix::sys::signal::kill(pid, sig).expect("kill");
    }

    fn wait_exit(&mut self, i: usize) -> ExitStatus {
        let child = &mut self.gateways[i - 1];
        wait_for(&format!("gateway {i} to exit"), || {
            child.try_wait().expect("wait")
        })
    }

    /// Connections waiting in the socket's queue, not accepted by anyone.
    fn queued(&self) -> u32 {
        queued(&self.sock())
    }

    fn connect(&self) -> Client {
        let s = UnixStream::connect(self.sock()).expect("connecting");
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        Client::new(s)
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // A `long` program left running by a failed test ends too.
        let _ = std::fs::write(self.dir.path().join("release"), b"");
        for c in &mut self.gateways {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The accept queue of the unix listener at `path`, as `ss -xl` reports it.
fn queued(path: &Path) -> u32 {
    let out = Command::new("ss")
        .args(["-xlH", "src"])
        .arg(path)
        .output()
        .expect("running ss (iproute2) to read the listen queue");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .next()
        .unwrap_or_else(|| panic!("ss lists no listener at {}: {text:?}", path.display()));
    // u_str LISTEN <Recv-Q> <Send-Q> <path> ...
    line.split_whitespace()
        .nth(2)
        .and_then(|q| q.parse().ok())
        .unwrap_or_else(|| panic!("unexpected ss output: {line:?}"))
}

/// Polls `f` until it gives Some, at most 60 s.
fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "no {what} within 60 s");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Two connections queue while both gateways are stopped: a long request
/// first, then a short one. Each gateway takes one: the short one is
/// answered while the long one still runs (it runs until the test releases
/// it; a gateway that took both would serve them in turn, the long one
/// first, and the short one would never be answered before the release).
#[test]
fn a_long_request_never_delays_a_connection_another_gateway_can_take() {
    use nix::sys::signal::Signal::{SIGCONT, SIGSTOP};
    let pool = Pool::start(2, &[]);
    pool.signal(1, SIGSTOP);
    pool.signal(2, SIGSTOP);
    let mut long = pool.connect();
    long.get("/?long", "long-1");
    let mut short = pool.connect();
    short.get("/", "short-1");
    assert_eq!(pool.queued(), 2, "both connections wait in the queue");
    pool.signal(1, SIGCONT);
    pool.signal(2, SIGCONT);
    let short_r = short.response();
    assert_eq!(
        (short_r.status, short_r.body.as_str()),
        (200, "hello\n"),
        "{short_r:?}"
    );
    assert_eq!(
        long.so_far(),
        common::SoFar::Nothing,
        "the long request was answered before its release:\n{}",
        pool.logs()
    );
    pool.release();
    let long_r = long.response();
    assert_eq!(
        (long_r.status, long_r.body.as_str()),
        (200, "long\n"),
        "{long_r:?}"
    );
    assert_ne!(
        short_r.header("X-Cgipool-Worker"),
        long_r.header("X-Cgipool-Worker"),
        "one gateway served both:\n{}",
        pool.logs()
    );
}

/// While every gateway runs a program, a new connection stays in the
/// socket's queue (no gateway accepts it); the first one that is free
/// takes it.
#[test]
fn a_busy_gateway_accepts_nothing() {
    let pool = Pool::start(2, &[]);
    let mut first = pool.connect();
    first.get("/?long", "long-1");
    wait_for("a long request running", || {
        pool.logs().contains("long: started").then_some(())
    });
    let mut second = pool.connect();
    second.get("/?long", "long-2");
    // The free gateway took it: both run a program now.
    pool.wait_log(1, "long: started");
    pool.wait_log(2, "long: started");
    let mut third = pool.connect();
    third.get("/", "third");
    // Both run until released, so the third connection must be in the
    // queue at every look (a few looks, to give a gateway that would
    // accept while busy the chance to show it; none depends on time).
    for _ in 0..10 {
        assert_eq!(
            pool.queued(),
            1,
            "the third connection must wait in the queue while both gateways are busy:\n{}",
            pool.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(third.so_far(), common::SoFar::Nothing);
    pool.release();
    let r = third.response();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(pool.queued(), 0);
    assert_eq!(first.response().status, 200);
    assert_eq!(second.response().status, 200);
}

/// SIGTERM on a busy gateway: it finishes its request and exits 0 without
/// taking the connection that waits in the shared queue; another gateway
/// serves it.
#[test]
fn sigterm_leaves_the_queue_to_the_other_gateways() {
    use nix::sys::signal::Signal::{SIGCONT, SIGSTOP};
    let mut pool = Pool::start(2, &[]);
    pool.signal(2, SIGSTOP);
    let mut busy = pool.connect();
    busy.get("/?long", "long-1");
    pool.wait_log(1, "long: started");
    let mut waiting = pool.connect();
    waiting.get("/", "waiting");
    // The long request runs until released: gateway 1 takes SIGTERM while
    // it is busy, whatever the machine's load.
    common::sigterm_and_wait_taken(pool.gateways[0].id());
    pool.release();
    let r = busy.response();
    assert_eq!((r.status, r.header("Connection")), (200, Some("close")));
    let st = pool.wait_exit(1);
    assert!(st.success(), "{st}:\n{}", pool.log(1));
    assert_eq!(pool.queued(), 1, "the stopping gateway took a connection");
    pool.signal(2, SIGCONT);
    let r = waiting.response();
    assert_eq!(
        (r.status, r.header("X-Cgipool-Worker")),
        (200, Some("gw@2")),
        "{r:?}"
    );
}

/// `CGIPOOL_ACCESS_LOG=0`: no line for a request that went well; one for
/// a request that failed.
#[test]
fn access_log_off_logs_only_errors() {
    let pool = Pool::start(1, &[("CGIPOOL_ACCESS_LOG", "0")]);
    let mut c = pool.connect();
    c.get("/?fine", "quiet-1");
    assert_eq!(c.response().status, 200);
    c.get("/?fail", "loud-1");
    assert_eq!(c.response().status, 502);
    // The error is logged, after the quiet request would have been.
    let log = pool.wait_log(1, "loud-1 GET /?fail 502");
    assert!(log.contains("access log off"), "{log}");
    assert!(
        !log.contains("quiet-1"),
        "a request that went well was logged:\n{log}"
    );

    let pool = Pool::start(1, &[("CGIPOOL_ACCESS_LOG", "1")]);
    let mut c = pool.connect();
    c.get("/?fine", "quiet-2");
    assert_eq!(c.response().status, 200);
    pool.wait_log(1, "quiet-2 GET /?fine 200");
}

/// `CGIPOOL_MAX_REQUESTS=3`: the third response says `Connection: close`,
/// the gateway exits 0, and a connection that waits in the queue is left
/// there for the next worker.
#[test]
fn max_requests_exits_0_after_n() {
    let mut pool = Pool::start(1, &[("CGIPOOL_MAX_REQUESTS", "3")]);
    let mut c = pool.connect();
    for i in 1..=3 {
        c.get("/", &format!("r{i}"));
        let r = c.response();
        assert_eq!(r.status, 200, "{r:?}");
        let want = if i < 3 { None } else { Some("close") };
        assert_eq!(r.header("Connection"), want, "request {i}: {r:?}");
    }
    assert!(
        c.closed(),
        "the connection stays open after the last request"
    );
    let st = pool.wait_exit(1);
    assert!(st.success(), "{st}:\n{}", pool.log(1));
    assert!(
        pool.log(1).contains("stopping after 3 requests"),
        "{}",
        pool.log(1)
    );
    let mut next = pool.connect();
    next.get("/", "next");
    assert_eq!(pool.queued(), 1, "left in the queue for the next worker");
}

/// A bad value stops the gateway at start with a clear message.
#[test]
fn bad_contract_values_are_refused() {
    for (k, v) in [
        ("CGIPOOL_MAX_REQUESTS", "ten"),
        ("CGIPOOL_ACCESS_LOG", "yes"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_cgipool"))
            .args([
                "cgi-gateway",
                "--listen",
                "/nonexistent/dir/s",
                "--",
                "/bin/true",
            ])
            .env(k, v)
            .output()
            .expect("running the gateway");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains(k), "{k}={v}: {err}");
    }
}
