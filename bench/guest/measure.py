#!/usr/bin/python3
"""measure.py CMD: runs `sh -c CMD`, prints one JSON line: wall time
(time.monotonic), exit status, the peak RSS of the process itself (VmHWM of
/proc/PID/status, sampled every 2 ms, so prefix CMD with `exec ` to measure
the program rather than the shell) and ru_maxrss of the whole tree (the
largest of the process and the children it waited for, e.g. `nginx -t`)."""
import json, os, resource, subprocess, sys, time

def hwm(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0

cmd = sys.argv[1]
t0 = time.monotonic()
p = subprocess.Popen(["sh", "-c", cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                     stdin=subprocess.DEVNULL)
peak = 0
# Read the pipes in threads so a chatty command never blocks on them.
import threading
bufs = {"out": b"", "err": b""}
def drain(name, f):
    bufs[name] = f.read()
ts = [threading.Thread(target=drain, args=(n, f)) for n, f in (("out", p.stdout), ("err", p.stderr))]
for t in ts:
    t.start()
while True:
    peak = max(peak, hwm(p.pid))
    pid, status, ru = os.wait4(p.pid, os.WNOHANG)
    if pid:
        break
    time.sleep(0.002)
secs = time.monotonic() - t0
for t in ts:
    t.join()
rc = os.waitstatus_to_exitcode(status)
print(json.dumps({
    "secs": secs, "rc": rc, "peak_rss_kb": peak, "tree_maxrss_kb": ru.ru_maxrss,
    "stdout_tail": bufs["out"].decode(errors="replace")[-2000:],
    "stderr_tail": bufs["err"].decode(errors="replace")[-2000:],
}))
