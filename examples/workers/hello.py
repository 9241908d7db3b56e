#!/usr/bin/env python3
"""hello.py - a cgipool worker in Python, standard library only.

It meets the worker contract (see README.md in this directory):
  * the listening socket is fd 3 (LISTEN_FDS=1, LISTEN_PID=our pid);
  * CGIPOOL_WORKER names the instance, sent back in X-Cgipool-Worker;
  * READY=1 (and WATCHDOG=1 if WATCHDOG_USEC is set) go to $NOTIFY_SOCKET;
  * SIGTERM: finish the request in flight, then exit 0 (never accept again);
  * one request at a time, answered with Connection: close: it accepts a
    connection only when free, so several instances can share one socket
    (an accept another instance won is silent);
  * X-Request-ID is echoed; one log line per request on stderr unless
    CGIPOOL_ACCESS_LOG=0 (then only errors);
  * CGIPOOL_MAX_REQUESTS=N: exit 0 after N requests;
  * its state goes to $NOTIFY_SOCKET as STATUS=cgipool requests=N idle, or
    ... busy since=MS method=M uri=U id=I (percent-encoded), at most once
    per second (a newer state replaces one held back).

Routes: GET /api/hello?name=NAME (any path ending in /api/hello), /healthz.
"""
import json
import os
import select
import signal
import socket
import sys
import time
import urllib.parse

WORKER = os.environ.get("CGIPOOL_WORKER") or "hello@dev"
MAX_HEAD = 16384
READ_TIMEOUT = 5.0
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found",
           405: "Method Not Allowed", 408: "Request Timeout",
           431: "Request Header Fields Too Large"}


def contract():
    """CGIPOOL_ACCESS_LOG (0|1, default 1), CGIPOOL_MAX_REQUESTS (0: none)."""
    access = os.environ.get("CGIPOOL_ACCESS_LOG", "1")
    limit = os.environ.get("CGIPOOL_MAX_REQUESTS", "") or "0"
    if access not in ("0", "1"):
        sys.exit(f"{WORKER}: CGIPOOL_ACCESS_LOG={access!r}: expected 0 or 1")
    if not limit.isdigit():
        sys.exit(f"{WORKER}: CGIPOOL_MAX_REQUESTS={limit!r}: expected a number")
    return access == "1", int(limit)


ACCESS_LOG, MAX_REQUESTS = contract()


def log(msg):
    sys.stderr.write(f"{WORKER}: {msg}\n")
    sys.stderr.flush()


def notify(msg):
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if not addr or addr[0] not in "/@":
        return
    if addr[0] == "@":
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(msg.encode(), addr)
    except OSError as e:
        log(f"sd_notify: {e}")


def encode(value, limit):
    """Percent-encode bytes outside '!'..'~' and '%', cut between characters."""
    out = ""
    for ch in value:
        piece = "".join(c if c.isascii() and "!" <= c <= "~" and c != "%"
                        else "".join(f"%{b:02X}" for b in c.encode("utf-8", "surrogateescape"))
                        for c in ch)
        if len(out) + len(piece) > limit:
            break
        out += piece
    return out


class Report:
    """The contract's state report, at most one datagram per INTERVAL."""
    INTERVAL = 1.0
    line = None
    sent_at = -1.0

    @classmethod
    def idle(cls, served):
        cls.set(f"cgipool requests={served} idle")

    @classmethod
    def busy(cls, served, method, target, rid):
        since = int(time.time() * 1000)
        line = (f"cgipool requests={served} busy since={since} "
                f"method={encode(method, 32) or '-'} uri={encode(target, 1024) or '/'}")
        if rid:
            line += f" id={encode(rid, 128)}"
        cls.set(line)

    @classmethod
    def set(cls, line):
        cls.line = line
        cls.flush()

    @classmethod
    def flush(cls):
        if cls.line and time.monotonic() - cls.sent_at >= cls.INTERVAL:
            notify("STATUS=" + cls.line)
            cls.line, cls.sent_at = None, time.monotonic()

    @classmethod
    def due_in(cls):
        """Seconds until a held-back report is due, or None."""
        if not cls.line:
            return None
        return max(0.0, cls.sent_at + cls.INTERVAL - time.monotonic())


def listen_socket():
    if (os.environ.get("LISTEN_PID") != str(os.getpid())
            or os.environ.get("LISTEN_FDS", "0") == "0"):
        sys.exit(f"{WORKER}: no socket from systemd (LISTEN_FDS/LISTEN_PID)")
    for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(k, None)
    return socket.socket(fileno=3)


def read_head(conn):
    """Read up to the end of the header block; None on EOF, int on error."""
    buf = b""
    deadline = time.monotonic() + READ_TIMEOUT
    while b"\r\n\r\n" not in buf:
        if len(buf) > MAX_HEAD:
            return 431
        left = deadline - time.monotonic()
        if left <= 0:
            return 408
        conn.settimeout(left)
        try:
            chunk = conn.recv(4096)
        except socket.timeout:
            return 408
        if not chunk:
            return None if not buf else 400
        buf += chunk
    return buf.split(b"\r\n\r\n", 1)[0].decode("latin-1")


def parse(head):
    lines = head.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[1].startswith("/") \
            or parts[2] not in ("HTTP/1.0", "HTTP/1.1"):
        return None
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            return None
        headers[name.lower()] = value.strip()
    return parts[0], parts[1], headers


def route(method, target):
    url = urllib.parse.urlsplit(target)
    if url.path.endswith("/healthz"):
        routed = {"status": "ok"}
    elif url.path.endswith("/api/hello"):
        qs = urllib.parse.parse_qs(url.query)
        routed = {"hello": qs.get("name", ["world"])[0]}
    else:
        return 404, {"error": "not found"}
    if method not in ("GET", "HEAD"):
        return 405, {"error": "method not allowed"}
    return 200, routed


def respond(conn, status, body, rid, head_only=False):
    body = dict(body, worker=WORKER, pid=os.getpid())
    data = (json.dumps(body) + "\n").encode()
    hdrs = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}",
            "Content-Type: application/json",
            f"Content-Length: {len(data)}",
            f"X-Cgipool-Worker: {WORKER}", "Connection: close"]
    if rid:
        hdrs.append(f"X-Request-ID: {rid}")
    if status == 405:
        hdrs.append("Allow: GET, HEAD")
    out = ("\r\n".join(hdrs) + "\r\n\r\n").encode()
    conn.settimeout(READ_TIMEOUT)
    conn.sendall(out if head_only else out + data)


def handle(conn, served):
    start = time.monotonic()
    head = read_head(conn)
    if head is None:
        return False
    method, path, rid, status = "-", "-", "", 400
    req = parse(head) if isinstance(head, str) else None
    if isinstance(head, int):
        status, body = head, {"error": REASONS[head]}
    elif req is None:
        body = {"error": "malformed request"}
    else:
        method, target, headers = req
        path = target.split("?", 1)[0]
        rid = headers.get("x-request-id", "")
        if not rid.isprintable() or len(rid) > 128:
            rid = ""
        Report.busy(served, method, target, rid)
        status, body = route(method, target)
    respond(conn, status, body, rid, method == "HEAD")
    Report.idle(served + 1)
    ms = (time.monotonic() - start) * 1000
    if ACCESS_LOG or status >= 500 or isinstance(head, int) or req is None:
        log(f"{method} {path} {status} {ms:.3f}ms rid={rid or '-'}")
    return True


class Stop:
    requested = False


def main():
    lsock = listen_socket()
    # Shared with other workers: the accept after select may lose the race.
    lsock.setblocking(False)
    served = 0
    rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wfd)
    signal.signal(signal.SIGTERM, lambda *_: setattr(Stop, "requested", True))
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    wd = int(os.environ.get("WATCHDOG_USEC", "0") or 0) / 2e6 or None
    notify("READY=1\nSTATUS=cgipool requests=0 idle")
    log(f"ready (pid {os.getpid()})")
    while not Stop.requested and not (MAX_REQUESTS and served >= MAX_REQUESTS):
        due = Report.due_in()
        timeout = min(t for t in (wd, due) if t is not None) \
            if (wd or due is not None) else None
        ready, _, _ = select.select([lsock, rfd], [], [], timeout)
        Report.flush()
        if wd:
            notify("WATCHDOG=1")
        if lsock in ready and not Stop.requested:
            try:
                conn, _ = lsock.accept()
            except (BlockingIOError, ConnectionAbortedError, InterruptedError):
                continue  # another worker took it
            with conn:
                try:
                    served += handle(conn, served)
                except OSError as e:
                    log(f"connection error: {e}")
    notify("STOPPING=1")
    log(f"exiting after {served} requests")
    return 0


if __name__ == "__main__":
    sys.exit(main())
