#!/usr/bin/python3
"""mixed.py URL CONNS SECS EVERY: a mixed load on one route. CONNS client
loops for SECS seconds; every EVERY-th request (counted over all loops) asks
for `?slow` (the program then takes 50 ms), the rest for `?fast` (`&slow`,
`&fast` after a query the URL has). One
request per connection (`Connection: close`), as nginx's clients that do
not keep connections. Prints one JSON line: per kind, the count and the
latency percentiles (ms), and every failure (a non-2xx status or a socket
error) counted, never dropped.

Latencies are measured here, per request, from the connect to the end of the
response, which wrk cannot do per kind of request."""
import json, socket, sys, threading, time
from urllib.parse import urlsplit

url, conns, secs, every = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
u = urlsplit(url)
host, port = u.hostname, u.port or 80
target = (u.path or "/") + (f"?{u.query}&" if u.query else "?")
lock = threading.Lock()
counter = [0]
lat = {"fast": [], "slow": []}
errors = {"status": 0, "socket": 0}
deadline = time.monotonic() + secs


def one(kind):
    req = (f"GET {target}{kind} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").encode()
    t0 = time.monotonic()
    with socket.create_connection((host, port), timeout=30) as s:
        s.sendall(req)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    took = time.monotonic() - t0
    status = data.split(b" ", 2)[1] if data.startswith(b"HTTP/1.") else b"000"
    return took, status.startswith(b"2")


def loop():
    while time.monotonic() < deadline:
        with lock:
            counter[0] += 1
            kind = "slow" if counter[0] % every == 0 else "fast"
        try:
            took, ok = one(kind)
        except OSError:
            with lock:
                errors["socket"] += 1
            continue
        with lock:
            if ok:
                lat[kind].append(took)
            else:
                errors["status"] += 1


def pct(v, p):
    if not v:
        return None
    v = sorted(v)
    return round(v[min(len(v) - 1, int(p / 100 * len(v)))] * 1000, 3)


threads = [threading.Thread(target=loop) for _ in range(conns)]
t0 = time.monotonic()
for t in threads:
    t.start()
for t in threads:
    t.join()
wall = time.monotonic() - t0
out = {"url": url, "connections": conns, "secs": wall, "every": every, "errors": errors}
for kind, v in lat.items():
    out[kind] = {"count": len(v), "p50_ms": pct(v, 50), "p90_ms": pct(v, 90), "p99_ms": pct(v, 99),
                 "max_ms": pct(v, 100)}
print(json.dumps(out))
