#!/usr/bin/python3
"""launch.py SOCK N ARGV...: bind one unix listener at SOCK (0666) and run N
copies of ARGV sharing it as fd 3 (LISTEN_FDS=1, LISTEN_PID), CGIPOOL_WORKER
=w@i; SOCK ending in '%d' gives each its own socket instead (per-worker).
SIGTERM is forwarded; exits when all children did."""
import os, signal, socket, subprocess, sys

AS_FD3 = 'exec 3<&0 </dev/null; LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"'
sock, n, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]


def listener(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    l = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    l.bind(path)
    os.chmod(path, 0o666)
    l.listen(4096)
    return l


shared = None if "%d" in sock else listener(sock)
procs = []
for i in range(1, n + 1):
    l = shared or listener(sock % i)
    procs.append(subprocess.Popen(["/bin/sh", "-c", AS_FD3, "sh"] + argv, stdin=l.fileno(),
                                  env=dict(os.environ, CGIPOOL_WORKER=f"w@{i}")))
signal.signal(signal.SIGTERM, lambda *_: [p.send_signal(signal.SIGTERM) for p in procs])
for p in procs:
    p.wait()
