#!/usr/bin/python3
"""Guest side of the vm-tests command channel.

Protocol: one JSON object per line in each direction.
  request  {"id": N, "cmd": "shell command", "timeout": seconds}
  response {"id": N, "rc": exit status, "out": base64 stdout, "err": base64 stderr}
A request {"id": N, "ping": true} is answered {"id": N, "pong": boot_id}.

Transport: the virtio-serial port org.cgipool.agent (QEMU tier: waited for,
since its driver may load after this starts), or a unix socket at
/mnt/agent/agent.sock, a directory the host bind-mounts (nspawn tier).
Every command runs under timeout(1), stdin from /dev/null, in its own session.
"""
import base64
import glob
import json
import os
import socket
import subprocess
import sys
import threading
import time

SOCKET_DIR = "/mnt/agent"
PORT_NAME = "org.cgipool.agent"


def boot_id():
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def run(req):
    if req.get("ping"):
        return {"id": req["id"], "pong": boot_id()}
    timeout = max(1, int(req.get("timeout", 60)))
    try:
        p = subprocess.run(
            ["timeout", "--kill-after=5", str(timeout), "/bin/sh", "-c", req["cmd"]],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            timeout=timeout + 30,
        )
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = 124, e.stdout or b"", (e.stderr or b"") + b"\nagent: command outlived its timeout\n"
    return {
        "id": req["id"],
        "rc": rc,
        "out": base64.b64encode(out).decode(),
        "err": base64.b64encode(err).decode(),
    }


def serve_stream(rfile, wfile):
    for line in rfile:
        line = line.strip()
        if not line:
            continue
        try:
            req = json.loads(line)
        except ValueError:
            continue  # noise from a previous boot or a half-written line
        resp = run(req)
        wfile.write((json.dumps(resp) + "\n").encode())
        wfile.flush()


def find_port():
    for name_file in glob.glob("/sys/class/virtio-ports/*/name"):
        with open(name_file) as f:
            if f.read().strip() == PORT_NAME:
                return "/dev/" + os.path.basename(os.path.dirname(name_file))
    return None


def in_container():
    # systemd (PID 1) writes the first in a container; nspawn makes the second.
    return os.path.exists("/run/systemd/container") or os.path.exists("/run/host/container-manager")


def main():
    port = find_port()
    if port is None and not in_container():
        # QEMU: the port appears once udev has loaded virtio_console, which
        # may be after this service starts; serving on the socket directory
        # instead would leave the host unanswered for the whole boot.
        print("agent: waiting for the virtio port", PORT_NAME, flush=True)
        while port is None:
            time.sleep(0.1)
            port = find_port()
    if port:
        print("agent: serving on", port, flush=True)
        while True:
            # A virtio port opens once: read and write through one O_RDWR fd;
            # the buffered writer loops over partial writes of long replies.
            fd = os.open(port, os.O_RDWR)
            with os.fdopen(fd, "rb", buffering=0) as r, os.fdopen(os.dup(fd), "wb") as w:
                serve_stream(r, w)
            time.sleep(0.2)  # EOF: the host side is not connected; reopen
    if not os.path.isdir(SOCKET_DIR):
        print("agent: no virtio port and no", SOCKET_DIR, file=sys.stderr)
        sys.exit(1)
    path = os.path.join(SOCKET_DIR, "agent.sock")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    os.chmod(path, 0o666)
    srv.listen(16)
    print("agent: serving on", path, flush=True)
    while True:
        conn, _ = srv.accept()

        def handle(c):
            with c:
                serve_stream(c.makefile("rb"), c.makefile("wb"))

        threading.Thread(target=handle, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
