#!/usr/bin/env python3
"""Workers as one of several: C workers (ASan/UBSan builds) and hello.py
sharing ONE listening socket, as systemd's Sockets= gives every instance
of a pool, each accepting only when free; and the worker contract's
environment (CGIPOOL_ACCESS_LOG, CGIPOOL_MAX_REQUESTS).

The listening socket belongs to the test, so what no worker accepted is
seen in its queue (ss -xl: the kernel's count). Run: make -C cgi-src test
"""
import os
import signal
import socket
import subprocess
import sys
import time
import unittest

from test_workers import (HELLO, SAN_ENV, SAN_MARKERS, SEARCH, TIMEOUT,
                          Conn, WorkerCase, req, wait_until)

# fd 0 (the shared socket) becomes fd 3, with LISTEN_PID = the worker's pid.
AS_FD3 = 'exec 3<&0 </dev/null; LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"'


class Shared:
    """Workers started on one listening unix socket held by the test."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.addr = os.path.join(tmp, "shared.sock")
        self.lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.lsock.bind(self.addr)
        self.lsock.listen(64)
        self.procs, self.logs = [], []

    def start(self, argv, env=None):
        n = len(self.procs) + 1
        log = os.path.join(self.tmp, f"shared-stderr.{n}")
        penv = dict(os.environ, **SAN_ENV, CGIPOOL_WORKER=f"w@{n}", **(env or {}))
        with open(log, "wb") as f:
            p = subprocess.Popen(["/bin/sh", "-c", AS_FD3, "sh"] + list(argv),
                                 stdin=self.lsock.fileno(), stdout=subprocess.DEVNULL,
                                 stderr=f, env=penv)
        self.procs.append(p)
        self.logs.append(log)
        wait_until(lambda: "ready" in self.log(n) or p.poll() is not None,
                   f"worker {n} to start")
        if p.poll() is not None:
            raise AssertionError(f"worker {n} exited: {self.log(n)}")
        return n

    def log(self, n):
        with open(self.logs[n - 1], "rb") as f:
            return f.read().decode("utf-8", "replace")

    def signal(self, n, sig):
        self.procs[n - 1].send_signal(sig)

    def wait(self, n):
        try:
            return self.procs[n - 1].wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker {n} did not exit within {TIMEOUT}s")

    def queued(self):
        """Connections waiting in the socket's queue (accepted by nobody)."""
        out = subprocess.run(["ss", "-xlH", "src", self.addr], capture_output=True,
                             text=True, timeout=TIMEOUT).stdout.split()
        if len(out) < 3:
            raise AssertionError(f"ss lists no listener at {self.addr}: {out}")
        return int(out[2])

    def conn(self):
        return Conn(self.addr, timeout=30)

    def finish(self, tc):
        for n, p in enumerate(self.procs, 1):
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.send_signal(signal.SIGTERM)
            tc.assertEqual(self.wait(n), 0, self.log(n))
            for marker in SAN_MARKERS:
                tc.assertNotIn(marker, self.log(n), f"sanitizer report:\n{self.log(n)}")
        self.lsock.close()


class SharedCase(WorkerCase):
    def setUp(self):
        super().setUp()
        self.pool = Shared(self.tmp)
        self.addCleanup(self.pool.finish, self)


class SharedSocketTests(SharedCase):
    def test_a_busy_worker_never_delays_a_connection_a_free_one_can_take(self):
        slow = self.pool.start([SEARCH], {"CGIPOOL_TEST_DELAY_MS": "3000"})
        fast = self.pool.start([SEARCH])
        self.pool.signal(fast, signal.SIGSTOP)
        busy = self.pool.conn()
        busy.send(req("GET", "/api/search?q=slow"))
        wait_until(lambda: self.pool.queued() == 0, "the slow worker to accept")
        self.pool.signal(fast, signal.SIGCONT)
        t0 = time.monotonic()
        r = self.pool.conn().request(req("GET", "/api/search?q=fast"))
        took = time.monotonic() - t0
        self.assertEqual((r.status, r.headers["x-cgipool-worker"]), (200, f"w@{fast}"))
        self.assertLess(took, 2.0, "the new connection waited for the busy worker")
        r = busy.read_response()
        self.assertEqual((r.status, r.headers["x-cgipool-worker"]), (200, f"w@{slow}"))

    def test_busy_workers_leave_new_connections_in_the_queue(self):
        for _ in range(2):
            self.pool.start([SEARCH], {"CGIPOOL_TEST_DELAY_MS": "2000"})
        first, second = self.pool.conn(), self.pool.conn()
        first.send(req("GET", "/api/search?q=one"))
        second.send(req("GET", "/api/search?q=two"))
        wait_until(lambda: self.pool.queued() == 0, "both workers to accept")
        third = self.pool.conn()
        third.send(req("GET", "/api/search?q=three"))
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            self.assertEqual(self.pool.queued(), 1,
                             "a busy worker accepted the third connection")
            time.sleep(0.05)
        workers = {c.read_response().headers["x-cgipool-worker"] for c in (first, second)}
        self.assertEqual(workers, {"w@1", "w@2"})
        self.assertEqual(third.read_response().status, 200)
        self.assertEqual(self.pool.queued(), 0)

    def test_sigterm_leaves_the_queue_to_the_others(self):
        a = self.pool.start([SEARCH], {"CGIPOOL_TEST_DELAY_MS": "1000"})
        b = self.pool.start([SEARCH])
        self.pool.signal(b, signal.SIGSTOP)
        busy = self.pool.conn()
        busy.send(req("GET", "/api/search?q=busy"))
        wait_until(lambda: self.pool.queued() == 0, "worker a to accept")
        waiting = self.pool.conn()
        waiting.send(req("GET", "/api/search?q=waiting"))
        self.pool.signal(a, signal.SIGTERM)
        r = busy.read_response()
        self.assertEqual((r.status, r.headers["connection"]), (200, "close"))
        self.assertEqual(self.pool.wait(a), 0)
        self.assertEqual(self.pool.queued(), 1, "the stopping worker took a connection")
        self.pool.signal(b, signal.SIGCONT)
        r = waiting.read_response()
        self.assertEqual((r.status, r.headers["x-cgipool-worker"]), (200, f"w@{b}"))

    def test_a_kept_connection_is_given_back_while_the_queue_waits(self):
        self.pool.start([SEARCH], {"CGIPOOL_TEST_DELAY_MS": "1500"})
        kept = self.pool.conn()
        r = kept.request(req("GET", "/api/search?q=first"))
        self.assertEqual((r.status, r.headers["connection"]), (200, "keep-alive"),
                         "with nobody waiting a connection stays kept")
        kept.send(req("GET", "/api/search?q=busy"))
        wait_until(lambda: self.pool.queued() == 0, "the worker to take the request")
        waiting = self.pool.conn()
        waiting.send(req("GET", "/api/search?q=waiting"))
        wait_until(lambda: self.pool.queued() == 1, "the new connection to queue")
        r = kept.read_response()
        self.assertEqual((r.status, r.headers["connection"]), (200, "close"),
                         "a kept connection was kept while another waited in the queue")
        r = waiting.read_response()
        self.assertEqual(r.status, 200)
        self.assertEqual(self.pool.queued(), 0)

    def test_many_connections_spread_without_errors(self):
        for _ in range(3):
            self.pool.start([SEARCH])
        seen = set()
        for i in range(60):
            r = self.pool.conn().request(req("GET", f"/api/search?q=n{i}",
                                             {"Connection": "close"}))
            self.assertEqual(r.status, 200)
            seen.add(r.headers["x-cgipool-worker"])
        for n in range(1, 4):
            self.assertNotIn("accept:", self.pool.log(n))
        self.assertGreaterEqual(len(seen), 1)


class ContractEnvTests(SharedCase):
    def test_access_log_off_logs_errors_only(self):
        n = self.pool.start([SEARCH], {"CGIPOOL_ACCESS_LOG": "0"})
        c = self.pool.conn()
        r = c.request(req("GET", "/api/search?q=x", {"X-Request-ID": "quiet-1"}))
        self.assertEqual(r.status, 200)
        self.assertEqual(c.request(req("GET", "/nope", {"X-Request-ID": "quiet-2"})).status,
                         404)
        c.send(b"GARBAGE\r\n\r\n")
        self.assertEqual(c.read_response().status, 400)
        wait_until(lambda: " 400 " in self.pool.log(n), "the error's log line")
        self.assertNotIn("quiet-", self.pool.log(n))

    def test_access_log_on(self):
        n = self.pool.start([SEARCH], {"CGIPOOL_ACCESS_LOG": "1"})
        self.pool.conn().request(req("GET", "/healthz", {"X-Request-ID": "loud-1"}))
        wait_until(lambda: "rid=loud-1" in self.pool.log(n), "the request's log line")

    def test_max_requests_from_the_environment(self):
        n = self.pool.start([SEARCH], {"CGIPOOL_MAX_REQUESTS": "3"})
        c = self.pool.conn()
        for i in range(3):
            r = c.request(req("GET", "/healthz"))
            self.assertEqual(r.headers["connection"], "close" if i == 2 else "keep-alive")
        self.assertTrue(c.wait_closed(), "connection left open after the last request")
        self.assertEqual(self.pool.wait(n), 0)
        self.assertIn("exiting after 3 requests", self.pool.log(n))
        self.pool.conn().send(req("GET", "/healthz"))
        self.assertEqual(self.pool.queued(), 1, "left in the queue for the next worker")

    def test_bad_values_are_refused(self):
        for k, v in (("CGIPOOL_ACCESS_LOG", "yes"), ("CGIPOOL_MAX_REQUESTS", "-1")):
            for argv in ([SEARCH], [sys.executable, HELLO]):
                p = subprocess.run(["/bin/sh", "-c", AS_FD3, "sh"] + argv,
                                   stdin=self.pool.lsock.fileno(), capture_output=True,
                                   env=dict(os.environ, **SAN_ENV, **{k: v}),
                                   timeout=TIMEOUT)
                self.assertNotEqual(p.returncode, 0, (argv, k))
                self.assertIn(k.encode(), p.stderr, (argv, k))


class HelloSharedTests(SharedCase):
    def test_two_hello_workers_share_a_socket(self):
        env = {"CGIPOOL_ACCESS_LOG": "0"}
        a = self.pool.start([sys.executable, HELLO], env)
        b = self.pool.start([sys.executable, HELLO], env)
        seen = set()
        for i in range(40):
            r = self.pool.conn().request(req("GET", f"/api/hello?name=n{i}",
                                             {"X-Request-ID": f"py-{i}"}))
            self.assertEqual(r.status, 200)
            seen.add(r.headers["x-cgipool-worker"])
        # Both were woken for every connection; the loser's accept is silent.
        for n in (a, b):
            log = self.pool.log(n)
            self.assertNotIn("Traceback", log)
            self.assertNotIn("rid=py-", log)
        self.assertGreaterEqual(len(seen), 1)

    def test_hello_max_requests(self):
        n = self.pool.start([sys.executable, HELLO], {"CGIPOOL_MAX_REQUESTS": "2"})
        for _ in range(2):
            self.assertEqual(self.pool.conn().request(req("GET", "/healthz")).status, 200)
        self.assertEqual(self.pool.wait(n), 0)
        self.assertIn("exiting after 2 requests", self.pool.log(n))


if __name__ == "__main__":
    prog = unittest.main(exit=False, verbosity=2)
    res = prog.result
    failed = len(res.failures) + len(res.errors) + len(res.unexpectedSuccesses)
    print(f"shared socket: {res.testsRun - failed} passed, {failed} failed")
    sys.exit(0 if failed == 0 and res.testsRun > 0 else 1)
