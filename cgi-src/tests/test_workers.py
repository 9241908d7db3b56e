#!/usr/bin/env python3
"""Tests for the cgipool C workers (ASan/UBSan builds) and the Python
example worker.  Standard library only.  Run: make -C cgi-src test

Workers run under systemd-socket-activate (socket as fd 3) or with
--listen, and are driven with raw HTTP over sockets.  Every wait is
bounded by a deadline; any sanitizer report on stderr fails the test.
"""
import concurrent.futures
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.dirname(HERE)
ASAN_DIR = os.path.join(SRC, "build", "asan")
SEARCH = os.path.join(ASAN_DIR, "search")
AUTH = os.path.join(ASAN_DIR, "auth")
HELLO = os.path.join(SRC, "..", "examples", "workers", "hello.py")
SSA = shutil.which("systemd-socket-activate") or "/usr/bin/systemd-socket-activate"
TIMEOUT = 10.0
READ_TIMEOUT = 5.0  # the workers' per-request read timeout
SAN_ENV = {
    "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0",
    "UBSAN_OPTIONS": "print_stacktrace=1",
}
SAN_MARKERS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer",
               "runtime error:", "SUMMARY: ", "Sanitizer")


def wait_until(pred, what, timeout=TIMEOUT, interval=0.01):
    """Poll pred() until truthy; fail with a clear message at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Response:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body.decode("utf-8"))


class Conn:
    """One client connection with its own read buffer."""

    def __init__(self, addr, timeout=TIMEOUT):
        family = socket.AF_UNIX if isinstance(addr, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(addr)
        self.buf = b""

    def close(self):
        self.sock.close()

    def send(self, data):
        self.sock.sendall(data)

    def _fill(self, what):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed while reading {what}")
        self.buf += chunk

    def read_response(self, head=False):
        while b"\r\n\r\n" not in self.buf:
            self._fill("response head")
        raw, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        n = 0 if head else int(headers.get("content-length", "0"))
        while len(self.buf) < n:
            self._fill("response body")
        body, self.buf = self.buf[:n], self.buf[n:]
        return Response(status, headers, body)

    def request(self, raw, head=False):
        self.send(raw)
        return self.read_response(head)

    def wait_closed(self, timeout=TIMEOUT):
        """True if the peer closes within timeout (data before EOF kept)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                return False
            except ConnectionResetError:
                return True
            if not chunk:
                return True
            self.buf += chunk
        return False


def req(method, target, headers=None, body=b"", version="HTTP/1.1", host=True):
    lines = [f"{method} {target} {version}"]
    if host:
        lines.append("Host: test")
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    if body and not any(k.lower() in ("content-length", "transfer-encoding")
                        for k in (headers or {})):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Worker:
    """A worker process under systemd-socket-activate or --listen."""

    def __init__(self, tmp, argv, env=None, listen=None, args=()):
        self.tmp = tmp
        env = dict(SAN_ENV, **(env or {}))
        self.stderr_path = os.path.join(tmp, f"stderr.{id(self)}")
        self.stderr = open(self.stderr_path, "w+b")
        if listen is None:
            self.addr = os.path.join(tmp, f"w{id(self)}.sock")
            cmd = [SSA, "-l", self.addr]
            cmd += [f"--setenv={k}={v}" for k, v in env.items()]
            cmd += list(argv) + list(args)
            penv = dict(os.environ)
        else:
            self.addr = listen
            spec = listen if isinstance(listen, str) else "%s:%d" % listen
            cmd = list(argv) + ["--listen", spec] + list(args)
            penv = dict(os.environ, **env)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL,
                                     stderr=self.stderr, env=penv)
        try:
            wait_until(self._connectable, f"worker socket {self.addr}")
            # The first connection makes systemd-socket-activate exec the worker.
            r = self.get("/healthz")
            assert r.status == 200, r.status
        except BaseException:
            self.proc.kill()
            self.proc.wait(TIMEOUT)
            raise

    def _connectable(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"worker exited early: {self.proc.returncode}: "
                                 f"{self.log()}")
        if isinstance(self.addr, str):
            # The path exists from bind() on, but connections are refused
            # until listen(): probe with a real connection.
            if not os.path.exists(self.addr):
                return False
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.addr)
                return True
            except OSError:
                return False
            finally:
                s.close()
        try:
            socket.create_connection(self.addr, timeout=1).close()
            return True
        except OSError:
            return False

    def conn(self):
        return Conn(self.addr)

    def request(self, raw, head=False):
        c = self.conn()
        try:
            return c.request(raw, head)
        finally:
            c.close()

    def get(self, target, headers=None):
        return self.request(req("GET", target, headers))

    def log(self):
        with open(self.stderr_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def wait(self, timeout=TIMEOUT):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker did not exit within {timeout}s")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        rc = self.wait()
        self.stderr.close()
        return rc

    def check_clean(self, tc):
        log = self.log()
        for marker in SAN_MARKERS:
            tc.assertNotIn(marker, log, f"sanitizer report:\n{log}")


class WorkerCase(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="cgipool-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def start(self, argv, **kw):
        w = Worker(self.tmp, argv if isinstance(argv, list) else [argv], **kw)
        self.addCleanup(self._finish, w)
        return w

    def _finish(self, w):
        if w.proc.poll() is None:
            self.assertEqual(w.stop(), 0, w.log())
        w.check_clean(self)

    def assertError(self, r, status):
        self.assertEqual(r.status, status, r.body)
        body = r.json()
        self.assertEqual(body["status"], status)
        self.assertIn("error", body)


class SearchTests(WorkerCase):
    def setUp(self):
        super().setUp()
        self.w = self.start(SEARCH, env={"CGIPOOL_WORKER": "search@2"})

    def test_search_json_and_headers(self):
        r = self.w.get("/api/search?q=socket", {"X-Request-ID": "req-42"})
        self.assertEqual(r.status, 200)
        self.assertEqual(r.headers["content-type"], "application/json")
        self.assertEqual(r.headers["x-cgipool-worker"], "search@2")
        self.assertEqual(r.headers["x-request-id"], "req-42")
        body = r.json()
        self.assertEqual(body["query"], "socket")
        self.assertEqual(body["worker"], "search@2")
        self.assertEqual(body["pid"], self.w.proc.pid)
        self.assertGreaterEqual(len(body["results"]), 2)
        self.assertTrue(all("title" in d and "id" in d for d in body["results"]))
        # The worker logs after sending the response: wait for the line.
        wait_until(lambda: "rid=req-42" in self.w.log(), "request log line")

    def test_no_request_id_no_echo(self):
        r = self.w.get("/api/search?q=x")
        self.assertNotIn("x-request-id", r.headers)

    def test_case_insensitive_word_match(self):
        a = self.w.get("/api/search?q=SOCKET+Activation").json()["results"]
        b = self.w.get("/api/search?q=socket%20activation").json()["results"]
        self.assertEqual(a, b)
        self.assertEqual(len(a), 1)
        self.assertEqual(self.w.get("/api/search?q=sock").json()["results"], [])

    def test_missing_or_malformed_q(self):
        self.assertError(self.w.get("/api/search"), 400)
        self.assertError(self.w.get("/api/search?x=1"), 400)
        self.assertError(self.w.get("/api/search?q=%zz"), 400)

    def test_hostile_query_escaped(self):
        s = 'a "quoted" \\back\\ \x01\x1f\x7f\n\t</script> é ✓ 😀 +'
        r = self.w.get("/api/search?q=" + urllib.parse.quote(s, safe=""))
        self.assertEqual(r.status, 200)
        self.assertEqual(r.json()["query"], s)
        self.assertFalse(any(b < 0x20 for b in r.body.rstrip(b"\n")), r.body)
        self.assertEqual(self.w.get("/api/search?q=a+b").json()["query"], "a b")
        bad = self.w.get("/api/search?q=%FF%C0%80x").json()["query"]
        self.assertEqual(bad, "\ufffd\ufffd\ufffdx")

    def test_routes_and_prefixes(self):
        self.assertEqual(self.w.get("/healthz").status, 200)
        self.assertEqual(self.w.get("/pool/healthz").status, 200)
        self.assertEqual(self.w.get("/prefix/api/search?q=x").status, 200)
        for path in ("/", "/api/searchx?q=x", "/api/search/?q=x", "/nope"):
            self.assertError(self.w.get(path), 404)

    def test_method_not_allowed(self):
        r = self.w.request(req("POST", "/api/search?q=x", body=b"a=b"))
        self.assertError(r, 405)
        self.assertEqual(r.headers["allow"], "GET, HEAD")
        r = self.w.request(req("DELETE", "/healthz"))
        self.assertError(r, 405)

    def test_head(self):
        c = self.w.conn()
        r = c.request(req("HEAD", "/healthz"), head=True)
        self.assertEqual(r.status, 200)
        self.assertGreater(int(r.headers["content-length"]), 0)
        self.assertEqual(c.request(req("GET", "/healthz")).status, 200)
        c.close()

    def test_size_limits(self):
        r = self.w.get("/api/search?q=" + "a" * 9000)
        self.assertError(r, 414)
        r = self.w.get("/healthz", {f"X-Pad-{i}": "p" * 1000 for i in range(20)})
        self.assertError(r, 431)
        r = self.w.get("/healthz", {f"X-H-{i}": "1" for i in range(70)})
        self.assertError(r, 431)
        r = self.w.request(req("POST", "/api/search", {"Content-Length": "2000000"}))
        self.assertError(r, 413)
        r = self.w.request(req("POST", "/api/search",
                               {"Transfer-Encoding": "chunked"}, b"200000\r\n"))
        self.assertError(r, 413)
        self.assertEqual(self.w.get("/healthz").status, 200)

    def test_malformed_requests_get_4xx_and_close(self):
        cases = [
            (b"GARBAGE\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
            (b"GET noslash HTTP/1.1\r\nHost: x\r\n\r\n", 400),
            (b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
            (b"GET /healthz HTTP/2.0\r\nHost: x\r\n\r\n", 505),
            (b"GET /healthz HTTP/1.1\r\nHost : x\r\n\r\n", 400),
            (b"GET /healthz HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", 400),
            (b"GET /healthz HTTP/1.1\r\nHost: x\r\nA: \x01\r\n\r\n", 400),
            (b"GET /healthz HTTP/1.1\nHost: x\n\n", 400),
            (b"POST /api/auth HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
             b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
            (b"POST /api/auth HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
             b"Content-Length: 1\r\n\r\nab", 400),
            (b"POST /api/auth HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400),
            (b"POST /api/auth HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
            (b"POST /api/auth HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
             b"\r\nzz\r\n", 400),
            (b"POST /api/auth HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
             b"\r\n2\r\nabc\r\n0\r\n\r\n", 400),
        ]
        for raw, status in cases:
            with self.subTest(raw=raw):
                c = self.w.conn()
                c.send(raw)
                if b"\n\n" in raw and b"\r" not in raw:
                    c.sock.shutdown(socket.SHUT_WR)
                r = c.read_response()
                self.assertError(r, status)
                self.assertEqual(r.headers["connection"], "close")
                self.assertTrue(c.wait_closed(), "server kept a bad connection")
                c.close()
                self.assertEqual(self.w.get("/healthz").status, 200)

    def test_keepalive_several_requests(self):
        c = self.w.conn()
        for i in range(5):
            r = c.request(req("GET", f"/api/search?q=pool{i}",
                              {"X-Request-ID": f"ka-{i}"}))
            self.assertEqual(r.status, 200)
            self.assertEqual(r.headers["x-request-id"], f"ka-{i}")
            self.assertEqual(r.headers["connection"], "keep-alive")
        r = c.request(req("GET", "/healthz", {"Connection": "close"}))
        self.assertEqual(r.headers["connection"], "close")
        self.assertTrue(c.wait_closed(), "Connection: close not honoured")
        c.close()

    def test_http10_closes(self):
        c = self.w.conn()
        r = c.request(req("GET", "/healthz", version="HTTP/1.0", host=False))
        self.assertEqual(r.status, 200)
        self.assertEqual(r.headers["connection"], "close")
        self.assertTrue(c.wait_closed())
        c.close()

    def test_pipelined_requests(self):
        c = self.w.conn()
        c.send(req("GET", "/api/search?q=a") + req("GET", "/healthz"))
        self.assertEqual(c.read_response().json()["query"], "a")
        self.assertEqual(c.read_response().json()["status"], "ok")
        c.close()

    def test_many_concurrent_clients(self):
        conns = [self.w.conn() for _ in range(50)]
        for i, c in enumerate(conns):
            c.send(req("GET", f"/api/search?q=worker+{i}"))
        for i, c in enumerate(conns):
            self.assertEqual(c.read_response().json()["query"], f"worker {i}")
        for c in conns:
            c.close()

        def one(i):
            return self.w.get(f"/api/search?q=n{i}", {"X-Request-ID": str(i)})

        with concurrent.futures.ThreadPoolExecutor(50) as ex:
            rs = list(ex.map(one, range(200)))
        self.assertEqual([r.status for r in rs], [200] * 200)
        self.assertEqual([r.headers["x-request-id"] for r in rs],
                         [str(i) for i in range(200)])

    def test_slowloris_does_not_block_others(self):
        slow = self.w.conn()
        slow.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        start = time.monotonic()
        for i in range(8):
            slow.send(b"X")  # keep trickling
            t0 = time.monotonic()
            self.assertEqual(self.w.get(f"/api/search?q={i}").status, 200)
            self.assertLess(time.monotonic() - t0, 1.0, "request stalled")
        self.assertTrue(slow.wait_closed(READ_TIMEOUT + 3),
                        "slow connection not closed by the read timeout")
        self.assertGreaterEqual(time.monotonic() - start, READ_TIMEOUT - 0.5)
        self.assertIn(b" 408 ", slow.buf)
        slow.close()


class AuthTests(WorkerCase):
    def setUp(self):
        super().setUp()
        users = os.path.join(self.tmp, "users")
        with open(users, "w") as f:
            f.write("# test users\n\njohn:s3cret\ncarol:pa:ss word\n")
        self.w = self.start(AUTH, env={"CGIPOOL_WORKER": "auth@1",
                                       "CGIPOOL_AUTH_USERS": users})

    def post(self, body, ctype="application/x-www-form-urlencoded", extra=None):
        h = {"Content-Type": ctype, "X-Request-ID": "p1"}
        h.update(extra or {})
        return self.w.request(req("POST", "/api/auth", h, body))

    def test_get_user_exists(self):
        r = self.w.get("/api/auth?user=john")
        self.assertEqual(r.status, 200)
        self.assertEqual(r.headers["x-cgipool-worker"], "auth@1")
        self.assertEqual(r.json()["exists"], True)
        self.assertEqual(self.w.get("/api/auth?user=nobody").json()["exists"], False)
        self.assertEqual(self.w.get("/api/auth?user=alice").json()["exists"], False)
        self.assertError(self.w.get("/api/auth"), 400)
        self.assertError(self.w.get("/api/auth?user=%G1"), 400)

    def test_post_verdicts(self):
        r = self.post(b"user=john&password=s3cret")
        self.assertEqual(r.status, 200)
        self.assertEqual(r.headers["x-request-id"], "p1")
        self.assertEqual(r.json(), {"worker": "auth@1", "pid": self.w.proc.pid,
                                    "user": "john", "authenticated": True})
        r = self.post(b"user=carol&password=pa%3Ass+word")
        self.assertEqual(r.status, 200)
        for body in (b"user=john&password=wrong", b"user=john&password=s3cre",
                     b"user=john&password=s3cret0", b"user=ghost&password=x"):
            r = self.post(body)
            self.assertEqual(r.status, 401, body)
            self.assertIs(r.json()["authenticated"], False)

    def test_post_malformed(self):
        for body in (b"user=john", b"password=x", b"user=john&password=%zz",
                     b"user=&password=x", b""):
            self.assertError(self.post(body), 400)
        self.assertError(self.post(b"user=john&password=s3cret",
                                   ctype="application/json"), 415)

    def test_post_chunked(self):
        raw = (b"POST /api/auth HTTP/1.1\r\nHost: x\r\n"
               b"Content-Type: application/x-www-form-urlencoded\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n"
               b"5;ext=1\r\nuser=\r\n14\r\njohn&password=s3cret\r\n0\r\n"
               b"X-Trailer: t\r\n\r\n")
        r = self.w.request(raw)
        self.assertEqual(r.status, 200, r.body)
        self.assertIs(r.json()["authenticated"], True)

    def test_method_not_allowed(self):
        r = self.w.request(req("PUT", "/api/auth", body=b"x"))
        self.assertError(r, 405)
        self.assertEqual(r.headers["allow"], "GET, HEAD, POST")

    def test_hostile_user_escaped(self):
        s = 'x"\\\x00\x1b[31m'
        r = self.w.get("/api/auth?user=" + urllib.parse.quote(s))
        self.assertEqual(r.json()["user"], s)


class AuthConfigTests(WorkerCase):
    def test_default_table_has_john(self):
        w = self.start(AUTH)
        self.assertEqual(w.get("/healthz").headers["x-cgipool-worker"], "auth@dev")
        r = w.request(req("POST", "/api/auth",
                          {"Content-Type": "application/x-www-form-urlencoded"},
                          b"user=john&password=hunter2"))
        self.assertEqual(r.status, 200)

    def test_bad_users_file_is_fatal(self):
        bad = os.path.join(self.tmp, "bad")
        with open(bad, "w") as f:
            f.write("no colon here\n")
        for path in (bad, os.path.join(self.tmp, "missing")):
            p = subprocess.run([AUTH, "--listen", os.path.join(self.tmp, "x.sock")],
                               env=dict(os.environ, CGIPOOL_AUTH_USERS=path, **SAN_ENV),
                               capture_output=True, timeout=TIMEOUT)
            self.assertEqual(p.returncode, 1, p.stderr)
            self.assertIn(b"auth:", p.stderr)


class LifecycleTests(WorkerCase):
    def test_listen_tcp(self):
        w = self.start(SEARCH, listen=("127.0.0.1", free_port()))
        r = w.get("/api/search?q=tcp")
        self.assertEqual(r.headers["x-cgipool-worker"], "search@dev")

    def test_listen_unix_path(self):
        w = self.start(AUTH, listen=os.path.join(self.tmp, "dev.sock"))
        self.assertEqual(w.get("/api/auth?user=john").status, 200)

    def test_usage_and_missing_socket(self):
        env = dict(os.environ, **SAN_ENV)
        p = subprocess.run([SEARCH, "--bogus"], env=env, capture_output=True,
                           timeout=TIMEOUT)
        self.assertEqual(p.returncode, 2)
        p = subprocess.run([SEARCH], env=env, capture_output=True, timeout=TIMEOUT)
        self.assertEqual(p.returncode, 1)
        self.assertIn(b"LISTEN_FDS", p.stderr)

    def test_sigterm_finishes_request_in_flight(self):
        w = self.start(SEARCH, env={"CGIPOOL_TEST_DELAY_MS": "700"})
        idle = w.conn()
        c = w.conn()
        self.assertEqual(c.request(req("GET", "/healthz")).status, 200)
        t0 = time.monotonic()
        c.send(req("GET", "/api/search?q=drain", {"X-Request-ID": "inflight"}))
        w.proc.send_signal(signal.SIGTERM)
        r = c.read_response()
        self.assertEqual(r.status, 200)
        self.assertEqual(r.json()["query"], "drain")
        self.assertEqual(r.headers["connection"], "close")
        self.assertGreaterEqual(time.monotonic() - t0, 0.6)
        c.close()
        idle.close()
        self.assertEqual(w.wait(), 0)
        self.assertIn("rid=inflight", w.log())

    def test_sigterm_leaves_idle_kept_connections_to_their_peer(self):
        # nginx may be sending a request on an idle kept connection right
        # now: the stopping worker never closes one itself. It answers what
        # comes with "Connection: close", and exits once the peer closed the
        # rest.
        w = self.start(SEARCH)
        # One after the other: a connection still in the listening queue
        # when the other's response goes out would make that one close.
        sent = w.conn()
        self.assertEqual(sent.request(req("GET", "/healthz")).headers["connection"],
                         "keep-alive")
        quiet = w.conn()
        self.assertEqual(quiet.request(req("GET", "/healthz")).headers["connection"],
                         "keep-alive")
        w.proc.send_signal(signal.SIGTERM)
        self.assertFalse(sent.wait_closed(0.5), "the worker closed an idle kept connection")
        self.assertIsNone(w.proc.poll(), "the worker exited with kept connections open")
        r = sent.request(req("GET", "/api/search?q=late"))
        self.assertEqual((r.status, r.headers["connection"]), (200, "close"))
        self.assertTrue(sent.wait_closed(TIMEOUT), "answered with close but left open")
        self.assertIsNone(w.proc.poll(), "the worker exited before its peer closed")
        sent.close()
        quiet.close()
        self.assertEqual(w.wait(), 0)

    def test_health_knob(self):
        w = self.start(SEARCH, env={"CGIPOOL_WORKER": "search@3",
                                    "CGIPOOL_TEST_HEALTH_DIR": self.tmp})
        marker = os.path.join(self.tmp, "search@3")
        open(marker, "w").close()
        self.assertError(w.get("/healthz"), 503)
        self.assertEqual(w.get("/api/search?q=x").status, 200)
        os.unlink(marker)
        self.assertEqual(w.get("/healthz").status, 200)

    def test_slow_knob(self):
        w = self.start(SEARCH, env={"CGIPOOL_TEST_SLOW_MS": "400"})
        t0 = time.monotonic()
        self.assertEqual(w.get("/api/search?q=x&slow").status, 200)
        self.assertGreaterEqual(time.monotonic() - t0, 0.4)
        t0 = time.monotonic()
        self.assertEqual(w.get("/api/search?q=slowly").status, 200)
        self.assertLess(time.monotonic() - t0, 0.4, "only the word slow is slow")

    def test_max_requests(self):
        w = self.start(SEARCH, args=["--max-requests", "3"])  # probe is #1
        self.assertEqual(w.get("/api/search?q=1").status, 200)
        r = w.get("/api/search?q=2")
        self.assertEqual(r.headers["connection"], "close")
        self.assertEqual(w.wait(), 0)
        self.assertIn("exiting after 3 requests", w.log())

    def notify_socket(self, abstract):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(s.close)
        if abstract:
            name = f"@cgipool-test-{os.getpid()}-{id(self)}"
            s.bind("\0" + name[1:])
        else:
            name = os.path.join(self.tmp, "notify.sock")
            s.bind(name)
        s.settimeout(0.2)
        return s, name

    def collect(self, s, want, what, timeout=TIMEOUT):
        got = []

        def check():
            try:
                got.extend(s.recv(4096).decode().split("\n"))
            except socket.timeout:
                pass
            return want(got)

        wait_until(check, what, timeout, interval=0)
        return got

    def check_notify(self, argv, abstract, env=None):
        s, name = self.notify_socket(abstract)
        env = dict(env or {}, NOTIFY_SOCKET=name, WATCHDOG_USEC="100000")
        w = self.start(argv, env=env)
        got = self.collect(s, lambda g: "READY=1" in g and g.count("WATCHDOG=1") >= 3,
                           "READY=1 and 3x WATCHDOG=1")
        self.assertLess(got.index("READY=1"), got.index("WATCHDOG=1") + 1)
        w.proc.send_signal(signal.SIGTERM)
        self.collect(s, lambda g: "STOPPING=1" in g, "STOPPING=1")
        self.assertEqual(w.wait(), 0)

    def test_notify_path_socket(self):
        self.check_notify(SEARCH, abstract=False)

    def test_notify_abstract_socket(self):
        self.check_notify(AUTH, abstract=True)

    def test_watchdog_keeps_ticking_during_slow_request(self):
        s, name = self.notify_socket(False)
        w = self.start(SEARCH, env={"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "100000",
                                    "CGIPOOL_TEST_DELAY_MS": "600"})
        s.setblocking(False)
        for _ in range(100):  # drop what is queued now (bounded)
            try:
                s.recv(4096)
            except BlockingIOError:
                break
        s.settimeout(0.2)
        c = w.conn()
        c.send(req("GET", "/healthz"))
        self.collect(s, lambda g: g.count("WATCHDOG=1") >= 4, "watchdog")
        readable, _, _ = select.select([c.sock], [], [], 0)
        self.assertEqual(readable, [], "request finished before 4 watchdog pings")
        self.assertEqual(c.read_response().status, 200)
        c.close()

    def statuses(self, got):
        return [g[len("STATUS="):] for g in got if g.startswith("STATUS=cgipool ")]

    def test_state_report_busy_then_idle(self):
        s, name = self.notify_socket(False)
        # A request is shown busy once it has run 1 s (REPORT_INTERVAL_MS).
        w = self.start(SEARCH, env={"NOTIFY_SOCKET": name,
                                    "CGIPOOL_TEST_DELAY_MS": "1500"})
        # The probe of start() was request 1.
        self.collect(s, lambda g: "cgipool requests=1 idle" in self.statuses(g),
                     "idle after the probe")
        c = w.conn()
        t0 = time.time()
        c.send(req("GET", "/api/search?q=a%20b&x=~", {"X-Request-ID": "r-1"}))
        got = self.collect(s, lambda g: any(" busy " in x for x in self.statuses(g)),
                           "busy report")
        busy = [x for x in self.statuses(got) if " busy " in x][0]
        words = busy.split(" ")
        self.assertEqual(words[:3], ["cgipool", "requests=1", "busy"], busy)
        fields = dict(x.split("=", 1) for x in words[3:])
        self.assertEqual(fields["method"], "GET")
        self.assertEqual(fields["uri"], "/api/search?q=a%2520b&x=~")
        self.assertEqual(fields["id"], "r-1")
        self.assertLessEqual(abs(int(fields["since"]) / 1000 - t0), 2)
        self.assertGreaterEqual(time.time() - t0, 0.9, "busy reported before 1 s")
        self.assertTrue(all(0x21 <= b <= 0x7e or b == 0x20 for b in busy.encode()))
        self.assertEqual(c.read_response().status, 200)
        self.collect(s, lambda g: "cgipool requests=2 idle" in self.statuses(g),
                     "idle after the request")
        c.close()

    def test_state_reports_are_rate_limited(self):
        s, name = self.notify_socket(False)
        w = self.start(SEARCH, env={"NOTIFY_SOCKET": name})
        t0 = time.time()
        c = w.conn()
        for i in range(200):
            self.assertEqual(c.request(req("GET", f"/api/search?q={i}")).status, 200)
        elapsed = time.time() - t0
        # The last state is always reported, at most one interval late.
        got = self.collect(s, lambda g: "cgipool requests=201 idle" in self.statuses(g),
                           "the final idle report")
        n = len(self.statuses(got))
        self.assertLessEqual(n, elapsed / 1.0 + 3, f"{n} reports in {elapsed:.2f}s")
        self.assertFalse([x for x in self.statuses(got) if " busy " in x],
                         "short requests are never reported busy")
        c.close()


class HelloExampleTests(WorkerCase):
    def test_hello_worker_contract(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(s.close)
        name = os.path.join(self.tmp, "notify.sock")
        s.bind(name)
        s.settimeout(TIMEOUT)
        w = self.start([sys.executable, HELLO],
                       env={"CGIPOOL_WORKER": "hello@1", "NOTIFY_SOCKET": name})
        self.assertIn(b"READY=1", s.recv(4096))
        r = w.get("/api/hello?name=W%C3%B6rld", {"X-Request-ID": "py-1"})
        # The state report: busy (with the request) and idle once served,
        # folded into one when they come within 100 ms of each other.
        reports = []
        wait_until(lambda: reports.append(s.recv(4096).decode()) or
                   "STATUS=cgipool requests=2 idle" in reports,
                   "hello's idle report after the request")
        busy = [r for r in reports if "requests=1 busy " in r]
        for b in busy:
            self.assertIn("method=GET uri=/api/hello?name=W%25C3%25B6rld id=py-1", b)
        self.assertEqual(r.status, 200)
        self.assertEqual(r.headers["x-cgipool-worker"], "hello@1")
        self.assertEqual(r.headers["x-request-id"], "py-1")
        body = r.json()
        self.assertEqual((body["hello"], body["worker"], body["pid"]),
                         ("Wörld", "hello@1", w.proc.pid))
        self.assertEqual(w.get("/x/healthz").status, 200)
        self.assertEqual(w.get("/nope").status, 404)
        self.assertEqual(w.request(req("POST", "/api/hello", body=b"x")).status, 405)
        wait_until(lambda: "rid=py-1" in w.log(), "hello request log line")
        self.assertEqual(w.stop(), 0)
        wait_until(lambda: b"STOPPING=1" in s.recv(4096), "STOPPING=1")


def main():
    for path in (SEARCH, AUTH, SSA):
        if not os.access(path, os.X_OK):
            sys.exit(f"missing {path} (run make -C cgi-src asan)")
    prog = unittest.main(exit=False, verbosity=2)
    res = prog.result
    failed = len(res.failures) + len(res.errors) + len(res.unexpectedSuccesses)
    passed = res.testsRun - failed - len(res.skipped)
    print(f"workers: {passed} passed, {failed} failed")
    sys.exit(0 if failed == 0 and res.testsRun > 0 else 1)


if __name__ == "__main__":
    main()
