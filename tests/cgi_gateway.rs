//! The CGI gateway as nginx talks to it: `cgipool cgi-gateway --listen` on a
//! unix socket, a real shell CGI program, raw HTTP/1.1 over kept-alive
//! connections. (Sandbox, journal and nginx are the vm-tests' `cgi_*`.)

mod common;

use common::gateway::{get, still_serves, Gateway, TIMEOUT, TIMEOUT_FLAG};
use common::{Client, SoFar};
use std::io::Read;
use std::time::{Duration, Instant};

#[test]
fn one_connection_carries_many_requests() {
    let gw = Gateway::start();
    let mut c = gw.connect();
    for i in 0..3 {
        c.send(&get(&format!("/plain{i}"), ""), b"");
        let r = c.response();
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.body, "hello GET\n");
        assert_eq!(r.header("Connection"), None, "{r:?}");
    }
    // A body the program never reads is drained, and the next request on
    // the same connection is parsed where it starts.
    let big = vec![b'x'; 300_000];
    c.send(
        &format!(
            "POST /?noread HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
            big.len()
        ),
        &big,
    );
    let r = c.response();
    assert_eq!((r.status, r.body.as_str()), (201, "ok\n"), "{r:?}");
    // A chunked body: decoded, counted, same connection.
    c.send(
        "POST /?count HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    );
    let r = c.response();
    assert_eq!(r.body, "read 11 of 11\n", "{r:?}");
    c.send(
        "POST /?count HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n\r\n",
        b"abcd",
    );
    assert_eq!(c.response().body, "read 4 of 4\n");
    c.send(&get("/last", ""), b"");
    assert_eq!(c.response().body, "hello GET\n");
    let log = gw.wait_log("conn=1#7");
    assert!(log.contains("last stderr: serving GET"), "{log}");
    assert!(
        !log.contains("conn=2#"),
        "a second connection was used:\n{log}"
    );
}

#[test]
fn close_when_the_request_says_so() {
    let gw = Gateway::start();
    let mut c = gw.connect();
    c.send(&get("/bye", "Connection: close\r\n"), b"");
    let r = c.response();
    assert_eq!(r.header("Connection"), Some("close"), "{r:?}");
    assert!(c.closed(), "the connection stayed open");
    let mut c = gw.connect();
    c.send("GET /old HTTP/1.0\r\nHost: t\r\n\r\n", b"");
    let r = c.response();
    assert_eq!((r.status, r.header("Connection")), (200, Some("close")));
    assert!(c.closed(), "an HTTP/1.0 connection stayed open");
}

#[test]
fn timeouts_and_refusals_close_the_connection() {
    let gw = Gateway::start_with(&["--timeout", TIMEOUT_FLAG]);
    let mut c = gw.connect();
    let started = Instant::now();
    c.send(&get("/?hang", ""), b"");
    let r = c.response();
    assert_eq!(r.status, 504, "{r:?}");
    // The 504 at all proves the cut; not before the 10 s timeout (timed from
    // before the send, so never longer than the gateway's own clock).
    assert!(
        started.elapsed() >= TIMEOUT,
        "504 after {:?}, before the 10 s timeout",
        started.elapsed()
    );
    assert!(c.closed(), "kept the connection of a timed-out request");
    let log = gw.wait_log("GET /?hang 504");
    assert!(log.contains("-hang stderr: hanging"), "{log}");
    // Too large a body: 413 without reading it, then close.
    let mut c = gw.connect();
    c.send(
        "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5000000\r\n\r\n",
        b"",
    );
    let r = c.response();
    assert_eq!((r.status, r.header("Connection")), (413, Some("close")));
    assert!(c.closed());
    // And the gateway still serves.
    still_serves(&gw, "/after");
}

/// Requests waiting on several connections are all served (the gateway
/// serves one at a time, first come first served).
#[test]
fn several_connections_take_turns() {
    let gw = Gateway::start();
    let mut clients: Vec<Client> = (0..5).map(|_| gw.connect()).collect();
    for round in 0..3 {
        for (i, c) in clients.iter_mut().enumerate() {
            c.send(&get(&format!("/c{i}r{round}"), ""), b"");
        }
        for c in clients.iter_mut() {
            let r = c.response();
            assert_eq!((r.status, r.body.as_str()), (200, "hello GET\n"));
        }
    }
    let log = gw.wait_log("conn=5#3");
    assert_eq!(log.matches(" 200 ").count(), 15, "{log}");
}

/// SIGTERM while a request runs and another waits on a kept connection:
/// both are answered (with `Connection: close`), then the gateway exits 0.
#[test]
fn sigterm_serves_what_waits_then_exits() {
    let mut gw = Gateway::start();
    let mut a = gw.connect();
    let mut b = gw.connect();
    b.send(&get("/b1", ""), b"");
    assert_eq!(b.response().status, 200);
    a.send(&get("/?slow", ""), b"");
    gw.wait_log("slow: started");
    b.send(&get("/b2", ""), b"");
    // The slow request runs until released: the gateway takes SIGTERM
    // while it runs, whatever the machine's load.
    common::sigterm_and_wait_taken(gw.child.id());
    assert_eq!(a.so_far(), SoFar::Nothing, "answered before the release");
    gw.release();
    let r = a.response();
    assert_eq!((r.status, r.body.as_str()), (200, "slow\n"), "{r:?}");
    assert_eq!(r.header("Connection"), Some("close"), "{r:?}");
    let r = b.response();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("Connection"), Some("close"), "{r:?}");
    assert!(b.closed() && a.closed());
    let status = gw.exit_status("SIGTERM");
    assert!(status.success(), "{status}; log:\n{}", gw.log());
    assert!(gw.log().contains("cgi-gateway: stopping"), "{}", gw.log());
}

/// SIGTERM with idle kept connections: nginx may be sending a request on
/// one right now (and does not retry a POST), so the gateway never closes
/// one itself. A request that comes on one is answered with `Connection:
/// close`; once the peers have closed the rest, the gateway exits 0.
#[test]
fn sigterm_leaves_idle_kept_connections_to_their_peer() {
    let mut gw = Gateway::start();
    let mut sent = gw.connect();
    let mut quiet = gw.connect();
    for c in [&mut sent, &mut quiet] {
        c.send(&get("/", ""), b"");
        let r = c.response();
        assert_eq!((r.status, r.header("Connection")), (200, None), "{r:?}");
    }
    common::sigterm_and_wait_taken(gw.child.id());
    sent.send(&get("/late", ""), b"");
    let r = sent.response();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("Connection"), Some("close"), "{r:?}");
    assert!(sent.closed(), "answered with close but left open");
    assert!(
        gw.child.try_wait().expect("wait").is_none(),
        "exited while a kept connection was still open; log:\n{}",
        gw.log()
    );
    drop(quiet);
    let status = gw.exit_status("its last connection closed");
    assert!(status.success(), "{status}; log:\n{}", gw.log());
}

/// A program that never stops writing is still cut off at the timeout,
/// and the gateway serves the next request.
#[test]
fn a_program_that_keeps_writing_times_out() {
    let gw = Gateway::start_with(&["--timeout", TIMEOUT_FLAG]);
    let mut c = gw.connect();
    let started = Instant::now();
    c.send(&get("/?flood", ""), b"");
    // Chunked and cut short: the head arrives, then the connection ends
    // without the last chunk.
    let status_line = c.line();
    assert!(status_line.starts_with("HTTP/1.1 200"), "{status_line}");
    // Read to the end, keeping only the tail (seconds of `yes`).
    let mut rest = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    while let Ok(n @ 1..) = c.reader.read(&mut buf) {
        rest.extend_from_slice(&buf[..n]);
        let keep = rest.len().saturating_sub(16);
        rest.drain(..keep);
    }
    // The end of the connection at all proves the cut; not before the
    // 10 s timeout (timed from before the send).
    assert!(
        started.elapsed() >= TIMEOUT,
        "cut off after {:?}, before the 10 s timeout",
        started.elapsed()
    );
    assert!(
        !rest.ends_with(b"0\r\n\r\n"),
        "a timed-out response looked complete"
    );
    gw.wait_log("GET /?flood 200");
    let log = gw.log();
    // The deadline is seen by the read of the program's output or by the
    // write to the client, whichever waits when it passes.
    assert!(
        log.contains("aborted: timeout")
            || log.contains("aborted: client: the request's deadline passed"),
        "{log}"
    );
    still_serves(&gw, "/after");
}

/// A connection that says nothing does not hold the gateway: a request on
/// a later connection is served while the silent one is still unanswered
/// (the head deadline is far away, so nothing can have expired it).
#[test]
fn a_silent_connection_does_not_block_others() {
    let gw = Gateway::start_with(&["--head-timeout", "600s"]);
    let mut silent = gw.connect();
    let mut c = gw.connect();
    c.send(&get("/talk", ""), b"");
    assert_eq!(c.response().status, 200);
    assert_eq!(
        silent.so_far(),
        SoFar::Nothing,
        "the silent connection was answered or closed before the request behind it"
    );
}

/// A client that sends part of a head and stalls holds nothing: complete
/// requests on another connection are served while the stalled heads are
/// still unanswered (their deadline is far away: a gateway that waited for
/// them would never answer the complete requests).
#[test]
fn a_partial_head_does_not_delay_others() {
    let gw = Gateway::start_with(&["--head-timeout", "600s"]);
    let mut slow = gw.connect();
    slow.send("G", b"");
    let mut slower = gw.connect();
    slower.send("GET /x HTTP/1.1\r\nHost: t\r\nX-Half", b"");
    let mut c = gw.connect();
    for i in 0..3 {
        c.send(&get(&format!("/quick{i}"), ""), b"");
        let r = c.response();
        assert_eq!(r.status, 200, "{r:?}");
    }
    for s in [&mut slow, &mut slower] {
        assert_eq!(
            s.so_far(),
            SoFar::Nothing,
            "a stalled head was answered or closed before the complete requests"
        );
    }
}

/// A head that stalls gets 408 and the end of its connection, not before
/// the head timeout.
#[test]
fn a_partial_head_gets_408_at_the_head_timeout() {
    let gw = Gateway::start_with(&["--head-timeout", "3s"]);
    // Before the first byte can be sent, so never later than the
    // gateway's start of the head deadline.
    let started = Instant::now();
    let mut slow = gw.connect();
    slow.send("G", b"");
    let mut slower = gw.connect();
    slower.send("GET /x HTTP/1.1\r\nHost: t\r\nX-Half", b"");
    for s in [&mut slow, &mut slower] {
        let r = s.response();
        assert_eq!(r.status, 408, "{r:?}");
        assert!(s.closed(), "kept a connection whose head timed out");
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(3),
        "408 after {took:?}, before the 3 s head timeout"
    );
}

/// A client that stops reading a large response is cut at the request's
/// deadline (10 s here), and the next request is served.
#[test]
fn a_stalled_reader_is_cut_at_the_deadline() {
    let gw = Gateway::start_with(&["--timeout", TIMEOUT_FLAG]);
    let mut stalled = gw.connect();
    let started = Instant::now();
    stalled.send(&get("/?flood", ""), b"");
    gw.wait_log("flooding");
    let mut next = gw.connect();
    next.send(&get("/next", ""), b"");
    let r = next.response();
    let cut = started.elapsed();
    // 504 only when the loaded machine started the program too late (its
    // own deadline, also timed from after `started`).
    assert!(matches!(r.status, 200 | 504), "{r:?}");
    // Served at all proves the cut (one request at a time); not before
    // the 10 s deadline (timed from before the stalled request's send).
    assert!(
        cut >= TIMEOUT,
        "the next request was served after {cut:?}, before the stalled reader's 10 s deadline"
    );
    let log = gw.wait_log("GET /?flood 200");
    assert!(log.contains("deadline passed"), "{log}");
    // The stalled connection was closed without the last chunk.
    let mut rest = Vec::new();
    stalled
        .reader
        .read_to_end(&mut rest)
        .expect("the stalled connection is closed, not left open");
    assert!(rest.starts_with(b"HTTP/1.1 200"), "{:?}", &rest[..20]);
    assert!(
        !rest.ends_with(b"0\r\n\r\n"),
        "a cut response looked complete"
    );
    eprintln!("stalled reader: next request served after {cut:?}");
}

/// HTTP/1.0 responses are never chunked: Content-Length or the end of the
/// connection delimits them.
#[test]
fn http10_gets_no_chunked_framing() {
    let gw = Gateway::start();
    for extra in ["", "Connection: keep-alive\r\n"] {
        let mut c = gw.connect();
        c.send(&format!("GET /old HTTP/1.0\r\nHost: t\r\n{extra}\r\n"), b"");
        let mut raw = Vec::new();
        c.reader.read_to_end(&mut raw).expect("reading to the end");
        let raw = String::from_utf8_lossy(&raw);
        let (head, body) = raw.split_once("\r\n\r\n").expect("a response head");
        assert!(head.starts_with("HTTP/1.1 200"), "{raw}");
        assert!(
            !head.to_ascii_lowercase().contains("transfer-encoding"),
            "{raw}"
        );
        assert!(head.contains("Connection: close"), "{raw}");
        assert_eq!(body, "hello GET\n", "{raw}");
    }
    // With the program's Content-Length, the connection may stay open.
    let mut c = gw.connect();
    c.send(
        "GET /?noread HTTP/1.0\r\nHost: t\r\nConnection: keep-alive\r\n\r\n",
        b"",
    );
    let r = c.response();
    assert_eq!((r.status, r.header("Content-Length")), (201, Some("3")));
    assert_eq!(r.header("Transfer-Encoding"), None, "{r:?}");
    c.send(&get("/again", ""), b"");
    assert_eq!(c.response().status, 200);
}

/// Requests that nginx would never send, each on its own connection: 4xx
/// and the connection closed; the gateway serves on.
#[test]
fn hostile_requests_get_4xx() {
    let gw = Gateway::start();
    let cases: &[(&str, &[u8], u16)] = &[
        ("GET /a%+2 HTTP/1.1\r\nHost: t\r\n\r\n", b"", 400),
        ("GET /a%2 HTTP/1.1\r\nHost: t\r\n\r\n", b"", 400),
        ("GET /a%zz HTTP/1.1\r\nHost: t\r\n\r\n", b"", 400),
        ("GET /a/../b HTTP/1.1\r\nHost: t\r\n\r\n", b"", 400),
        ("GET / HTTP/1.1\r\nHost: t\rX: y\r\n\r\n", b"", 400),
        ("GET / HTTP/1.1\r\nX: a\rb\r\n\r\n", b"", 400),
        (
            "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"3\r\nabc\r\n0\r\n\r\n",
            400,
        ),
        (
            "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            b"abcd",
            400,
        ),
        (
            "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
            b"abc",
            400,
        ),
    ];
    let chunked = "POST /?count HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n";
    let bad_chunks: &[&[u8]] = &[
        b"zz\r\nab\r\n0\r\n\r\n",
        b"+5\r\nhello\r\n0\r\n\r\n",
        b"0x5\r\nhello\r\n0\r\n\r\n",
        b"-1\r\n",
        b"ffffffffffffffffff\r\n",
        b"5\r\nhelloXX\r\n0\r\n\r\n",
        b" 5\r\nhello\r\n0\r\n\r\n",
    ];
    let all = cases
        .iter()
        .copied()
        .chain(bad_chunks.iter().map(|b| (chunked, *b, 400)));
    for (head, body, want) in all {
        let mut c = gw.connect();
        c.send(head, body);
        let r = c.response();
        assert_eq!(
            r.status,
            want,
            "{head:?} {:?}: {r:?}",
            String::from_utf8_lossy(body)
        );
        assert!(c.closed(), "{head:?}: the connection stayed open");
    }
    gw.assert_serves_on();
}

/// A body over the limit gets 413 without being read (Content-Length) or
/// spooled (chunked) whole: the gateway answers before the body ends.
#[test]
fn a_body_over_the_limit_gets_413_early() {
    let gw = Gateway::start_with(&["--body-limit", "64k"]);
    let mut c = gw.connect();
    c.send(
        "POST /?count HTTP/1.1\r\nHost: t\r\nContent-Length: 65537\r\n\r\n",
        b"",
    );
    let r = c.response();
    assert_eq!((r.status, r.header("Connection")), (413, Some("close")));
    assert!(c.closed());
    // Chunked: 80 KiB sent, no last chunk: the answer comes anyway.
    let mut c = gw.connect();
    c.send(
        "POST /?count HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"",
    );
    for _ in 0..20 {
        c.send("1000\r\n", &[b'x'; 4096]);
        c.send("\r\n", b"");
    }
    let r = c.response();
    assert_eq!((r.status, r.header("Connection")), (413, Some("close")));
    // At the limit exactly: accepted.
    let mut c = gw.connect();
    c.send(
        "POST /?count HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"",
    );
    for _ in 0..16 {
        c.send("1000\r\n", &[b'x'; 4096]);
        c.send("\r\n", b"");
    }
    c.send("0\r\n\r\n", b"");
    let r = c.response();
    assert_eq!(r.body, "read 65536 of 65536\n", "{r:?}");
}

/// 200 connections that say nothing, or only part of a head, do not starve
/// a request on a new connection.
#[test]
fn many_idle_connections_do_not_starve_a_request() {
    // A long head deadline: a gateway that served the request only after
    // the partial heads timed out would answer them (408) first.
    let gw = Gateway::start_with(&["--head-timeout", "600s"]);
    let mut idle = Vec::new();
    for i in 0..200 {
        let mut c = gw.connect();
        if i % 2 == 1 {
            c.send("GET /par", b"");
        }
        idle.push(c);
    }
    let mut c = gw.connect();
    c.send(&get("/through", ""), b"");
    let r = c.response();
    assert_eq!(r.status, 200, "{r:?}");
    // Beyond 64 waiting connections the longest idle ones are closed; none
    // was answered (a 408 would mean the head deadline passed first).
    for (i, waiting) in idle.iter_mut().enumerate() {
        assert_ne!(
            waiting.so_far(),
            SoFar::Data,
            "idle connection {i} was answered before the request behind it"
        );
    }
    drop(idle);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes that are not UTF-8 (Latin-1 e-acute, 0xE9, and 0xFF) pass as they
/// are: meta-variables are byte strings (RFC 3875), header values and the
/// reason phrase may carry obs-text (RFC 9110 §5.5, RFC 9112 §4), and nginx
/// passes a raw 0xE9 in a request target on. So the program gets them in
/// HTTP_*, CONTENT_TYPE, REQUEST_URI, PATH_INFO and QUERY_STRING, and the
/// client gets the program's header bytes back, none refused, dropped or
/// turned into U+FFFD.
#[test]
fn bytes_that_are_not_utf8_pass_unchanged() {
    let gw = Gateway::start();
    let mut c = gw.connect();
    let target = b"/caf\xe9/%E9?bytes&q=\xe9";
    let mut head = b"GET ".to_vec();
    head.extend(target);
    // HTTP/1.0: the body is what comes before the end of the connection.
    head.extend(b" HTTP/1.0\r\nHost: t\r\nX-Request-ID: bytes\r\nX-Latin: caf\xe9 \xff\r\n");
    head.extend(b"Content-Type: text/plain; charset=\xe9\r\n\r\n");
    std::io::Write::write_all(&mut c.stream, &head).expect("sending the head");
    let mut response = Vec::new();
    c.reader
        .read_to_end(&mut response)
        .expect("reading the response");
    let text = String::from_utf8_lossy(&response).into_owned();
    assert!(
        response.starts_with(b"HTTP/1.1 200 Caf\xe9\r\n"),
        "{text}\n{}",
        gw.log()
    );
    let field = b"\r\nX-Latin: caf\xe9\r\n";
    assert!(response.windows(field.len()).any(|w| w == field), "{text}");
    let body_at = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
        .unwrap_or_else(|| panic!("no end of the head: {text}"));
    let body = String::from_utf8_lossy(&response[body_at..]).into_owned();
    let want = [
        hex(b"caf\xe9 \xff"),
        hex(target),
        hex(b"/caf\xe9/\xe9"),
        hex(b"bytes&q=\xe9"),
        hex(b"text/plain; charset=\xe9"),
    ];
    assert_eq!(body.lines().collect::<Vec<_>>(), want, "{text}");
}
