//! The gateway of the host tests: `cgipool cgi-gateway --listen` on a unix
//! socket in a temporary directory, running a shell CGI program
//! ([`PROGRAM`]) with cases chosen by the query string, its log in a file.

use super::Client;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The program's cases, after the shebang and `wait_release`
/// ([`super::write_program`]).
pub const PROGRAM: &str = r#"case "$QUERY_STRING" in
  noread) printf 'Status: 201 Created\nContent-Length: 3\n\nok\n' ;;
  count) printf 'Content-Type: text/plain\n\n'; echo "read $(wc -c | tr -d ' ') of $CONTENT_LENGTH" ;;
  hang) echo "hanging" >&2; sleep 30 & sleep 30 ;;
  slow) echo "slow: started" >&2
        # Until the test creates "release" next to this program.
        wait_release
        printf 'Content-Type: text/plain\n\nslow\n' ;;
  ticks) printf 'Content-Type: text/plain\n\nfirst\n'
         # Then waits until released, like "slow".
         wait_release
         printf 'second\n' ;;
  headfirst) # Its head and a first line before it reads its body (as git
         # http-backend does for a push), then what it read.
         printf 'Content-Type: text/plain\n\nfirst\n'; echo "headfirst: wrote its head" >&2
         echo "read $(wc -c | tr -d ' ')" ;;
  bighead) # A header block of $HTTP_X_SIZE bytes, its blank line included.
         pad=$(head -c $((HTTP_X_SIZE - 34)) /dev/zero | tr '\0' a)
         printf 'Content-Type: text/plain\nX-Pad: %s\n\nbig\n' "$pad" ;;
  flood) echo "flooding" >&2; printf 'Content-Type: text/plain\n\n'; exec yes ;;
  store) echo "store: started" >&2
         # What a CGI program does with its body once stdin ends: takes it
         # for the whole one (here: stores it next to this program).
         body=$(cat); printf '%s' "$body" > "${0%/*}/stored"
         printf 'Content-Type: text/plain\n\nstored %s\n' "${#body}" ;;
  traced) # Its pid, then a sleep in its place: no child and no signal
         # that would stop it under a tracer (the test's), until killed.
         echo "traced: pid $$" >&2; exec sleep 30 ;;
  bytes*) # A header with Latin-1 e-acute (octal 351) in its value and its
         # reason phrase, then its inputs in hex, one a line.
         printf 'Status: 200 Caf\351\nContent-Type: text/plain\nX-Latin: caf\351\n\n'
         for v in "$HTTP_X_LATIN" "$REQUEST_URI" "$PATH_INFO" "$QUERY_STRING" "$CONTENT_TYPE"; do
           printf '%s' "$v" | od -An -tx1 | tr -d ' \n'; echo
         done ;;
  *) echo "serving $REQUEST_METHOD" >&2; printf 'Content-Type: text/plain\n\nhello %s\n' "$REQUEST_METHOD" ;;
esac
"#;

pub struct Gateway {
    pub child: Child,
    pub dir: tempfile::TempDir,
}

impl Gateway {
    /// How the gateway exited, waiting at most 60 s (`since`: what
    /// should have ended it, for the message).
    pub fn exit_status(&mut self, since: &str) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "still running 60 s after {since}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn start() -> Gateway {
        Gateway::start_with(&[])
    }

    /// With more flags (replacing the defaults here).
    pub fn start_with(extra: &[&str]) -> Gateway {
        Gateway::start_configured(extra, |_| {})
    }

    /// With more flags, and `configure` given the gateway's command before
    /// it starts (its environment, resource limits, ...).
    pub fn start_configured(extra: &[&str], configure: impl FnOnce(&mut Command)) -> Gateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let program = dir.path().join("t.cgi");
        super::write_program(&program, PROGRAM);
        let log = std::fs::File::create(dir.path().join("log")).expect("log file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_cgipool"));
        command
            .arg("cgi-gateway")
            .args(
                // A request deadline no request outlives on a loaded
                // machine; the tests of the deadline pass `--timeout 10s`.
                [("--timeout", "600s"), ("--body-limit", "1m")]
                    .iter()
                    .filter(|(flag, _)| !extra.contains(flag))
                    .flat_map(|(flag, value)| [flag, value]),
            )
            .args(extra)
            .arg("--listen")
            .arg(dir.path().join("sock"))
            .arg("--")
            .arg(&program)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        configure(&mut command);
        let child = command.spawn().expect("starting cgipool cgi-gateway");
        let gw = Gateway { child, dir };
        // Logged once it listens.
        gw.wait_log("one request at a time");
        gw
    }

    pub fn sock(&self) -> PathBuf {
        self.dir.path().join("sock")
    }

    /// Whether a `store` request stored its body.
    pub fn stored(&self) -> bool {
        self.dir.path().join("stored").exists()
    }

    /// Lets every `slow` and `ticks` request finish.
    pub fn release(&self) {
        std::fs::write(self.dir.path().join("release"), b"").expect("creating the release file");
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    pub fn connect(&self) -> Client {
        let s = UnixStream::connect(self.sock()).expect("connecting to the gateway");
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        s.set_write_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        Client::new(s)
    }

    /// A plain GET on a new connection gets 200: the gateway serves on
    /// after whatever the test did to it.
    pub fn assert_serves_on(&self) {
        let mut c = self.connect();
        c.send(&get("/after", ""), b"");
        assert_eq!(c.response().status, 200, "the gateway does not serve on");
    }

    /// Waits until the log has a line containing `want`.
    pub fn wait_log(&self, want: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let log = self.log();
            if log.contains(want) {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "no {want:?} in the gateway's log within 60 s:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // A `slow` program left running by a failed test ends too.
        let _ = std::fs::write(self.dir.path().join("release"), b"");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn get(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: t\r\nX-Request-ID: {}\r\n{extra}\r\n",
        id(path)
    )
}

/// The request deadline of the tests that are about it: long enough for a
/// loaded machine to start the program and let it speak before the cut
/// (what these tests check it said), the one wall-clock assumption left.
pub const TIMEOUT_FLAG: &str = "10s";
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// After a request was cut at the deadline (`--timeout 10s`), the gateway
/// still serves: a GET on a new connection gets 200, or, when the loaded
/// machine started the program too late, a 504 no earlier than the
/// deadline (a gateway that gave up on requests would answer at once).
pub fn still_serves(gw: &Gateway, target: &str) {
    let mut c = gw.connect();
    let started = Instant::now();
    c.send(&get(target, ""), b"");
    let r = c.response();
    match r.status {
        200 => assert_eq!(r.body, "hello GET\n", "{r:?}"),
        504 => assert!(
            started.elapsed() >= TIMEOUT,
            "504 after {:?}, before the deadline: {r:?}",
            started.elapsed()
        ),
        _ => panic!("{target}: {r:?}"),
    }
}

pub fn id(path: &str) -> String {
    path.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}
