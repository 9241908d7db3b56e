#!/usr/bin/python3
"""recover.py UNIT SOCKET PATH DELAY: waits DELAY seconds (the load is
running), sends SIGKILL to UNIT's main process, then measures (time.monotonic
from the kill) when systemd reports a new main PID with the unit active, and
when a request sent to the socket given (the pool's, with the default
shared queue: whichever worker accepts answers) after that is
answered 200 (the socket itself never stops accepting: systemd holds it, so
a request sent at the kill is also timed: it waits in the socket's backlog).
Prints one JSON line."""
import json, os, signal, socket, subprocess, sys, time

unit, sock_path, path, delay = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])

def show():
    out = subprocess.run(["systemctl", "show", "-p", "MainPID,ActiveState,NRestarts", unit],
                         capture_output=True, text=True, check=True).stdout
    return dict(l.split("=", 1) for l in out.splitlines() if "=" in l)

def ask(timeout=2):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(sock_path)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return data.split(b"\r\n", 1)[0].split(b" ")[1:2] == [b"200"]
    except OSError:
        return False
    finally:
        s.close()

time.sleep(delay)
before = show()
old = int(before["MainPID"])
if old <= 0:
    print(json.dumps({"error": f"{unit} has no main PID: {before}"}))
    sys.exit(1)
t0 = time.monotonic()
os.kill(old, signal.SIGKILL)
# Also a request sent right after the kill: it waits on the socket systemd
# holds and is answered by the new worker.
queued = {}
def queued_request():
    ok = ask(timeout=20)
    queued["secs"] = time.monotonic() - t0 if ok else None
import threading
qt = threading.Thread(target=queued_request)
qt.start()
t_active = None
new = None
deadline = t0 + 30
while time.monotonic() < deadline:
    st = show()
    pid = int(st["MainPID"])
    if pid not in (0, old) and st["ActiveState"] == "active":
        t_active, new = time.monotonic() - t0, pid
        break
    time.sleep(0.005)
t_answer = None
while t_active is not None and time.monotonic() < deadline:
    if ask():
        t_answer = time.monotonic() - t0
        break
    time.sleep(0.005)
qt.join()
after = show()
print(json.dumps({
    "secs_queued_request_answered": queued.get("secs"),
    "unit": unit, "old_pid": old, "new_pid": new,
    "secs_to_active": t_active, "secs_to_answer": t_answer,
    "nrestarts_before": int(before["NRestarts"]), "nrestarts_after": int(after["NRestarts"]),
}))
sys.exit(0 if t_answer is not None else 1)
