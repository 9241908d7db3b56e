#!/usr/bin/python3
"""cpu_per_request.py: the CPU one CGI request costs, on this host, outside
any guest: cgipool's gateway against fcgiwrap, the same program behind
both, and the program alone (`make bench-cpu`).

Each side runs in a cgroup of its own (cgroup v2's cpu.stat, which every
cgroup has, controllers or not) and serves REQUESTS requests one after
another, a connection each, from a client outside the cgroup. The cgroup's
CPU over those requests, divided by their number, is the side's cost per
request: the server and the programs it started. "program alone" is the
program spawned by a small loop in the same kind of cgroup (posix_spawn
and waitpid from Python: its loop costs a few microseconds); "own" is a
side's cost less that. Rounds alternate the sides, so a neighbour's load
falls on all of them alike. Neither side is sandboxed here (the bench's
gateway is); no per-request log on either side.

Needs root (cgroups), fcgiwrap on PATH or /usr/sbin, a cgroup2 mount.
Every reply is checked (status 200 and the program's body); a failed one
stops the run."""
import argparse
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

BODY = b"hello\n"


def cgroup2_root():
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split()[0] == "cgroup2":
                return left.split()[4]
    sys.exit("cpu_per_request: no cgroup2 mount (cpu.stat is read from cgroup v2)")


class Group:
    """A cgroup the measured processes are moved into."""

    def __init__(self, root, name):
        self.path = os.path.join(root, f"cgipool-bench-cpu-{os.getpid()}-{name}")
        os.mkdir(self.path)

    def add(self, pid):
        with open(os.path.join(self.path, "cgroup.procs"), "w") as f:
            f.write(str(pid))

    def usage_us(self):
        with open(os.path.join(self.path, "cpu.stat")) as f:
            for line in f:
                k, v = line.split()
                if k == "usage_usec":
                    return int(v)
        raise RuntimeError(f"{self.path}/cpu.stat has no usage_usec")

    def remove(self, parent):
        with open(os.path.join(self.path, "cgroup.procs")) as f:
            left = [p for p in f.read().split()]
        for pid in left:
            try:
                with open(os.path.join(parent, "cgroup.procs"), "w") as f:
                    f.write(pid)
            except OSError:
                pass
        os.rmdir(self.path)


def wait_for(path, proc, what, limit=10.0):
    deadline = time.monotonic() + limit
    while not os.path.exists(path):
        if proc.poll() is not None:
            sys.exit(f"cpu_per_request: {what} exited ({proc.returncode}) before listening")
        if time.monotonic() > deadline:
            sys.exit(f"cpu_per_request: {what} did not create {path} within {limit} s")
        time.sleep(0.01)


def connect(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    return s


def read_all(s):
    chunks = []
    while True:
        b = s.recv(65536)
        if not b:
            return b"".join(chunks)
        chunks.append(b)


def http_get(path):
    s = connect(path)
    s.sendall(b"GET /hello HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
    reply = read_all(s)
    s.close()
    if not reply.startswith(b"HTTP/1.1 200") or b"\r\n\r\n6\r\nhello\n\r\n0\r\n" not in reply:
        sys.exit(f"cpu_per_request: the gateway answered {reply[:200]!r}")


def fcgi_record(kind, content, req=1):
    return struct.pack("!BBHHBx", 1, kind, req, len(content), 0) + content


def fcgi_params(pairs):
    out = b""
    for k, v in pairs.items():
        k, v = k.encode(), v.encode()
        out += bytes([len(k), len(v)]) + k + v  # every name and value < 128 bytes
    return out


def fcgi_get(path, program):
    params = fcgi_params({
        "SCRIPT_FILENAME": program, "SCRIPT_NAME": "/hello", "REQUEST_METHOD": "GET",
        "QUERY_STRING": "", "SERVER_PROTOCOL": "HTTP/1.1", "GATEWAY_INTERFACE": "CGI/1.1",
        "SERVER_NAME": "bench", "SERVER_PORT": "80", "REMOTE_ADDR": "127.0.0.1",
    })
    s = connect(path)
    s.sendall(fcgi_record(1, struct.pack("!HB5x", 1, 0)) + fcgi_record(4, params)
              + fcgi_record(4, b"") + fcgi_record(5, b""))
    reply = read_all(s)
    s.close()
    out, ended, i = b"", False, 0
    while i + 8 <= len(reply):
        _, kind, _, n, pad = struct.unpack("!BBHHBx", reply[i:i + 8])
        if kind == 6:
            out += reply[i + 8:i + 8 + n]
        ended |= kind == 3
        i += 8 + n + pad
    if not ended or not out.endswith(BODY) or b"Status:" in out:
        sys.exit(f"cpu_per_request: fcgiwrap answered {reply[:200]!r}")


SPAWN_LOOP = """
import os, sys
n, argv = int(sys.argv[1]), sys.argv[2:]
sys.stdin.read(1)
null = os.open("/dev/null", os.O_WRONLY)
for _ in range(n):
    pid = os.posix_spawn(argv[0], argv, {"GATEWAY_INTERFACE": "CGI/1.1"},
                         file_actions=[(os.POSIX_SPAWN_DUP2, null, 1)])
    _, status = os.waitpid(pid, 0)
    if status != 0:
        sys.exit(f"the program exited with {status}")
"""


def program_alone(group, program, n):
    """CPU of spawning the program n times, and the wall time."""
    p = subprocess.Popen([sys.executable, "-c", SPAWN_LOOP, str(n), program],
                         stdin=subprocess.PIPE)
    group.add(p.pid)
    before, t = group.usage_us(), time.monotonic()
    p.stdin.write(b"go")
    p.stdin.close()
    if p.wait() != 0:
        sys.exit("cpu_per_request: the spawn loop failed")
    return group.usage_us() - before, time.monotonic() - t


def serve(group, argv, sock, ask, n, warmup, what):
    """Starts a server in `group`, warms it up, measures n requests."""
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         env=dict(os.environ, CGIPOOL_ACCESS_LOG="0"))
    try:
        group.add(p.pid)
        wait_for(sock, p, what)
        for _ in range(warmup):
            ask()
        before, t = group.usage_us(), time.monotonic()
        for _ in range(n):
            ask()
        return group.usage_us() - before, time.monotonic() - t
    finally:
        p.terminate()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cgipool", default="target/release/cgipool")
    ap.add_argument("--program", default="cgi-src/build/hello_cgi")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=100)
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("cpu_per_request: run as root (it makes cgroups)")
    fcgiwrap = shutil.which("fcgiwrap") or shutil.which("fcgiwrap", path="/usr/sbin")
    if not fcgiwrap:
        sys.exit("cpu_per_request: fcgiwrap is not installed (apt-get install fcgiwrap)")
    cgipool, program = os.path.abspath(a.cgipool), os.path.abspath(a.program)
    for f in (cgipool, program):
        if not os.access(f, os.X_OK):
            sys.exit(f"cpu_per_request: {f} is not an executable (make build)")
    root = cgroup2_root()
    with open("/proc/self/cgroup") as f:
        mine = [l.split(":", 2)[2].strip() for l in f if l.startswith("0::")]
    parent = os.path.join(root, mine[0].lstrip("/")) if mine else root
    tmp = tempfile.mkdtemp(prefix="cgipool-bench-cpu-")
    gw_sock, fw_sock = os.path.join(tmp, "gateway.sock"), os.path.join(tmp, "fcgiwrap.sock")
    sides = {
        "program alone": lambda g: program_alone(g, program, a.requests),
        "cgipool cgi-gateway": lambda g: serve(
            g, [cgipool, "cgi-gateway", "--route", "/hello", "--listen", gw_sock, "--", program],
            gw_sock, lambda: http_get(gw_sock), a.requests, a.warmup, "the gateway"),
        "fcgiwrap -c 1": lambda g: serve(
            g, [fcgiwrap, "-c", "1", "-s", f"unix:{fw_sock}"],
            fw_sock, lambda: fcgi_get(fw_sock, program), a.requests, a.warmup, "fcgiwrap"),
    }
    cpu = {k: [] for k in sides}
    wall = {k: [] for k in sides}
    groups = []
    try:
        for r in range(a.rounds):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for name in order:
                g = Group(root, f"r{r}-{len(groups)}")
                groups.append(g)
                for s in (gw_sock, fw_sock):
                    if os.path.exists(s):
                        os.unlink(s)
                us, secs = sides[name](g)
                cpu[name].append(us / a.requests)
                wall[name].append(secs * 1e6 / a.requests)
                print(f"round {r + 1}: {name}: {us / a.requests:.0f} us CPU, "
                      f"{secs * 1e6 / a.requests:.0f} us wall per request", flush=True)
    finally:
        for g in groups:
            try:
                g.remove(parent)
            except OSError as e:
                print(f"cpu_per_request: could not remove {g.path}: {e}", file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)
    alone = statistics.median(cpu["program alone"])
    print(f"\n{a.requests} requests a round, a connection each, {a.rounds} rounds; "
          f"CPU per request (median of the rounds, min-max):")
    for name in sides:
        med = statistics.median(cpu[name])
        own = "" if name == "program alone" else f"; own (less the program alone) {med - alone:.0f} us"
        print(f"  {name:20} {med:5.0f} us ({min(cpu[name]):.0f}-{max(cpu[name]):.0f}){own}; "
              f"wall {statistics.median(wall[name]):.0f} us")


if __name__ == "__main__":
    main()
