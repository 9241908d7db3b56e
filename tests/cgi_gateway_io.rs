//! The CGI gateway's two streams at their edges: a request body that ends
//! before its Content-Length, output that comes slowly, a client that
//! half-closes its connection, a header block at its limit. The gateway and
//! its shell program are those of `cgi_gateway.rs` ([`common::gateway`]).

mod common;

use common::gateway::{get, Gateway, TIMEOUT, TIMEOUT_FLAG};
use std::io::Write;
use std::net::Shutdown;
use std::os::unix::process::CommandExt;
use std::time::Instant;

/// A request body that ends before its Content-Length (the client shuts
/// its side after 100 of 1000 bytes) never reaches the program as a whole
/// one: the program is killed before its stdin ends, so it stores nothing;
/// the client gets 400, not the program's 200, and the log says the request
/// was aborted.
#[test]
fn a_body_cut_short_is_never_taken_for_the_whole_one() {
    let gw = Gateway::start();
    let mut c = gw.connect();
    c.send(
        "POST /?store HTTP/1.1\r\nHost: t\r\nX-Request-ID: cut\r\nContent-Length: 1000\r\n\r\n",
        &[b'x'; 100],
    );
    // The program runs and reads its stdin when the body ends.
    gw.wait_log("cut stderr: store: started");
    c.stream.shutdown(Shutdown::Write).expect("shutdown");
    let r = c.response();
    assert_eq!(
        (r.status, r.header("Connection")),
        (400, Some("close")),
        "{r:?}"
    );
    assert!(c.closed(), "kept the connection of a cut body");
    let log = gw.wait_log("POST /?store 400");
    assert!(
        log.contains("aborted: request body ended after 100 of 1000 bytes"),
        "{log}"
    );
    // The log line is written once every process of the request is gone.
    assert!(!gw.stored(), "the program stored a body cut short:\n{log}");
}

/// A POST to `store` (`head`, then the start of its body, `partial`) whose
/// body stalls, on a gateway with the tests' request deadline: checks that
/// it gets 504 no earlier than the deadline, that its connection is closed
/// and that its log line says `timeout`. Returns the gateway and its log.
fn stalled_post(head: &str, partial: &[u8]) -> (Gateway, String) {
    let gw = Gateway::start_with(&["--timeout", TIMEOUT_FLAG]);
    let mut c = gw.connect();
    let started = Instant::now();
    c.send(head, partial);
    let r = c.response();
    assert_eq!(r.status, 504, "{r:?}");
    assert!(
        started.elapsed() >= TIMEOUT,
        "504 after {:?}, before the 10 s timeout",
        started.elapsed()
    );
    assert!(c.closed(), "kept the connection of a timed-out request");
    let log = gw.wait_log("POST /?store 504");
    assert!(log.contains("timeout"), "{log}");
    (gw, log)
}

/// A body that stalls until the request's deadline: 504 at the deadline,
/// and the program never sees the end of its stdin (it stores nothing).
#[test]
fn a_body_that_stalls_gets_504_at_the_deadline() {
    let (gw, log) = stalled_post(
        "POST /?store HTTP/1.1\r\nHost: t\r\nX-Request-ID: stall\r\nContent-Length: 100\r\n\r\n",
        b"0123456789",
    );
    assert!(!gw.stored(), "the program stored a body cut short:\n{log}");
}

/// The response body is streamed: a program that prints its header block
/// and a first line and then waits (until the test releases it) has that
/// line delivered while it waits, not when it exits.
#[test]
fn output_reaches_the_client_while_the_program_runs() {
    let gw = Gateway::start();
    let mut c = gw.connect();
    c.send(&get("/?ticks", ""), b"");
    let status = c.line();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let mut head = Vec::new();
    loop {
        let l = c.line();
        if l.is_empty() {
            break;
        }
        head.push(l);
    }
    assert!(
        head.iter().any(|h| h == "Transfer-Encoding: chunked"),
        "{head:?}"
    );
    // Read while the program waits for the release (bounded by the
    // client's read timeout).
    // (A chunk of "first\n": its size, the line, the chunk's CRLF.)
    for want in ["6", "first", ""] {
        assert_eq!(c.line(), want);
    }
    gw.release();
    for want in ["7", "second", "", "0", ""] {
        assert_eq!(c.line(), want);
    }
    let log = gw.wait_log("GET /?ticks 200");
    assert!(log.contains("exit=0"), "{log}");
}

/// A complete request followed by the end of the client's side (request
/// bytes, then shutdown(SHUT_WR), like `nc -N`) is served, without
/// keep-alive. It is sent while the gateway is busy, so the gateway finds
/// the request and the end together when it takes the connection.
#[test]
fn a_request_then_a_half_close_is_served() {
    let gw = Gateway::start();
    let mut busy = gw.connect();
    busy.send(&get("/?slow", ""), b"");
    gw.wait_log("slow: started");
    let mut c = gw.connect();
    c.send(&get("/half", ""), b"");
    c.stream.shutdown(Shutdown::Write).expect("shutdown");
    gw.release();
    assert_eq!(busy.response().status, 200);
    let r = c.response();
    assert_eq!((r.status, r.body.as_str()), (200, "hello GET\n"), "{r:?}");
    assert_eq!(r.header("Connection"), Some("close"), "{r:?}");
    assert!(c.closed(), "the connection stayed open");
    // A head cut short by the end gets nothing, and the gateway serves on.
    let mut cut = gw.connect();
    cut.send("GET /cut HTTP/1.1\r\nHost:", b"");
    cut.stream.shutdown(Shutdown::Write).expect("shutdown");
    assert!(cut.closed(), "a head cut short was answered");
    gw.assert_serves_on();
}

/// The program's header block is at most `--max-header-bytes` (64 KiB by
/// default), its blank line included: one byte more gets 502, however the
/// gateway's reads of it fall.
#[test]
fn a_header_block_one_byte_over_the_limit_gets_502() {
    let gw = Gateway::start();
    for (size, want) in [(65536, 200), (65537, 502), (100_000, 502), (2000, 200)] {
        let mut c = gw.connect();
        c.send(&get("/?bighead", &format!("X-Size: {size}\r\n")), b"");
        let r = c.response();
        assert_eq!(r.status, want, "a block of {size} bytes: {}", r.body);
        if want == 200 {
            assert_eq!(r.body, "big\n");
            let pad = r.header("X-Pad").map_or(0, str::len);
            assert_eq!(pad, size - 34, "the block arrived whole");
        }
    }
    let log = gw.log();
    assert!(
        log.contains("header block larger than 65536 bytes"),
        "{log}"
    );
}

/// A chunked body that stalls until the request's deadline gets 504, as a
/// Content-Length one does (it is decoded before the program starts, so
/// the program never runs).
#[test]
fn a_chunked_body_that_stalls_gets_504_at_the_deadline() {
    let (_gw, log) = stalled_post(
        "POST /?store HTTP/1.1\r\nHost: t\r\nX-Request-ID: chunks\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"64\r\n0123456789",
    );
    assert!(!log.contains("store: started"), "the program ran:\n{log}");
}

/// Nothing of the response reaches the client before the request body was
/// read to its end, however early the program writes: nginx stops sending
/// a body once the response begins, so a program that answers its head
/// first and then reads (git http-backend receiving a push) would wait for
/// the rest of its body forever. Streaming starts after the body.
#[test]
fn nothing_is_sent_before_the_request_body_was_read() {
    let gw = Gateway::start();
    let mut c = gw.connect();
    c.send(
        "POST /?headfirst HTTP/1.1\r\nHost: t\r\nX-Request-ID: first\r\nContent-Length: 200000\r\n\r\n",
        &[b'x'; 100_000],
    );
    gw.wait_log("first stderr: headfirst: wrote its head");
    // Streaming flushes after 10 ms; 300 ms on: still nothing.
    c.stream
        .set_read_timeout(Some(std::time::Duration::from_millis(300)))
        .expect("read timeout");
    let mut byte = [0u8; 1];
    let early = std::io::Read::read(&mut c.stream, &mut byte);
    assert!(
        matches!(&early, Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)),
        "the response began before the request body was read: {early:?}"
    );
    c.stream
        .set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .expect("read timeout");
    std::io::Write::write_all(&mut c.stream, &[b'x'; 100_000]).expect("the rest of the body");
    let r = c.response();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, "first\nread 200000\n", "{r:?}");
}

/// A chunked body of 64 KiB, sent whole (what the gateway leaves unread
/// when it gives up is dropped: the client's send may fail then).
fn send_chunked_64k(c: &mut common::Client, rid: &str) {
    let head = format!(
        "POST /?count HTTP/1.1\r\nHost: t\r\nX-Request-ID: {rid}\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    let mut body = b"10000\r\n".to_vec();
    body.extend([b'x'; 0x10000]);
    body.extend(b"\r\n0\r\n\r\n");
    let _ = c.stream.write_all(head.as_bytes());
    let _ = c.stream.write_all(&body);
}

/// A chunked body the gateway cannot spool (its temporary file cannot be
/// created, or writing it fails) is the server's fault, not the client's:
/// 500, the cause in the log, the program never runs, and the gateway
/// serves on. Real failures: a TMPDIR that does not exist, and a file size
/// limit (RLIMIT_FSIZE, SIGXFSZ ignored) under the body's size, so the
/// write fails with EFBIG.
#[test]
fn a_chunked_body_that_cannot_be_spooled_gets_500() {
    let no_dir = Gateway::start_configured(&[], |cmd| {
        cmd.env("TMPDIR", "/nonexistent/cgipool-test");
    });
    let small_files = Gateway::start_configured(&[], |cmd| {
        // SAFETY: setrlimit and signal are async-signal-safe; nothing else
        // runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                use nix::libc;
                let limit = libc::rlimit {
                    rlim_cur: 16 * 1024,
                    rlim_max: 16 * 1024,
                };
                if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0
                    || libc::signal(libc::SIGXFSZ, libc::SIG_IGN) == libc::SIG_ERR
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
    for (gw, cause) in [
        (&no_dir, "No such file or directory"),
        (&small_files, "File too large"),
    ] {
        let mut c = gw.connect();
        send_chunked_64k(&mut c, "spool");
        let r = c.response();
        assert_eq!(
            (r.status, r.header("Connection")),
            (500, Some("close")),
            "{r:?}\n{}",
            gw.log()
        );
        let log = gw.wait_log("POST /?count 500");
        assert!(
            log.lines()
                .any(|l| l.contains("server error") && l.contains(cause)),
            "no server-side cause ({cause}) in the log:\n{log}"
        );
        assert!(!log.contains("spool stderr"), "the program ran:\n{log}");
        gw.assert_serves_on();
    }
}

/// A killed program that does not exit (to its parent) does not hold up
/// the gateway: it waits a few seconds, logs that the program did not
/// exit, serves on without waiting for it again, and reaps it once it
/// exits. A process in uninterruptible sleep would do that; here it is a
/// real one held by a tracer: the test ptraces the program and does not
/// wait for it, so once killed it is a zombie only the tracer sees.
#[test]
fn a_killed_program_that_does_not_exit_does_not_stop_the_gateway() {
    use nix::libc;
    let gw = Gateway::start();
    let mut c = gw.connect();
    c.send(
        "POST /?traced HTTP/1.1\r\nHost: t\r\nX-Request-ID: traced\r\nContent-Length: 1000\r\n\r\n",
        &[b'x'; 100],
    );
    let log = gw.wait_log("traced stderr: traced: pid ");
    let pid: libc::pid_t = log
        .split("traced: pid ")
        .nth(1)
        .and_then(|rest| rest.lines().next())
        .and_then(|pid| pid.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pid in the log:\n{log}"));
    // SAFETY: PTRACE_SEIZE takes a pid and null address and data; it only
    // makes this thread the program's tracer.
    let seized = unsafe {
        libc::ptrace(
            libc::PTRACE_SEIZE,
            pid,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_void>(),
        )
    };
    assert_eq!(
        seized,
        0,
        "PTRACE_SEIZE {pid}: {}",
        std::io::Error::last_os_error()
    );
    // The body ends early: the gateway kills the program, answers 400.
    c.stream.shutdown(Shutdown::Write).expect("shutdown");
    assert_eq!(c.response().status, 400);
    // The next request is served (the client's read timeout bounds it).
    let mut next = gw.connect();
    next.send(&get("/next", ""), b"");
    assert_eq!(next.response().status, 200, "{}", gw.log());
    let log = gw.wait_log("GET /next 200");
    assert!(
        log.contains(&format!("the CGI program (pid {pid}) did not exit")),
        "{log}"
    );
    // Not waited for again, nor counted as a leftover of its request or
    // of the next.
    for request in ["POST /?traced 400", "GET /next 200"] {
        let line = log.lines().find(|l| l.contains(request)).unwrap_or("");
        assert!(
            !line.contains("killed=") && !line.contains("UNKILLABLE"),
            "{request}: {log}"
        );
    }
    // The tracer lets go of it; the gateway reaps it after its next request.
    let mut status = 0;
    // SAFETY: waitpid on the tracee, with a valid status pointer.
    let waited = unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
    assert_eq!(waited, pid, "{}", std::io::Error::last_os_error());
    let mut again = gw.connect();
    again.send(&get("/again", ""), b"");
    assert_eq!(again.response().status, 200);
    let proc_dir = format!("/proc/{pid}");
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    while std::path::Path::new(&proc_dir).exists() {
        assert!(
            Instant::now() < deadline,
            "the gateway did not reap {pid}:\n{}",
            gw.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
