#!/usr/bin/python3
"""scale.py POOL MIN MAX SECS DOWN_LIMIT -- WRK_ARGV...: a load step against
a pool that `cgipool watch` autoscales. Waits until the pool runs MIN
workers, starts WRK_ARGV (the load, SECS seconds long), and counts the
pool's active worker services every 100 ms (time.monotonic, 0 = the moment
wrk was started): when the count first reaches MAX, when wrk has exited (the
end of the load step), and when the count is back at MIN (given up
DOWN_LIMIT seconds after the end of the load; not timed if the pool never
left MIN). Prints wrk's output, then one JSON line."""
import json, subprocess, sys, time

pool, lo, hi, secs, down_limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \
    float(sys.argv[4]), float(sys.argv[5])
assert sys.argv[6] == "--"
wrk_argv = sys.argv[7:]

def active():
    out = subprocess.run(
        ["systemctl", "list-units", "--no-legend", "--plain", "--state=active",
         f"cgipool-{pool}@*.service"],
        capture_output=True, text=True, check=True).stdout
    return sum(1 for l in out.splitlines() if l.strip())

deadline = time.monotonic() + 30
while active() != lo:
    if time.monotonic() > deadline:
        print(json.dumps({"error": f"the pool does not run {lo} workers before the load"}))
        sys.exit(1)
    time.sleep(0.1)

t0 = time.monotonic()
wrk = subprocess.Popen(wrk_argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       stdin=subprocess.DEVNULL)
timeline = [[0.0, lo]]
last = lo
at_max = load_end = back_at_min = None
left_min = False
while True:
    now = time.monotonic() - t0
    n = active()
    if n != last:
        timeline.append([round(now, 3), n])
        last = n
    if n == hi and at_max is None:
        at_max = now
    left_min |= n != lo
    if load_end is None and wrk.poll() is not None:
        load_end = now
    if load_end is not None:
        if n == lo or not left_min:
            back_at_min = now
            break
        if now > load_end + down_limit:
            break
    elif now > secs + 60:
        wrk.kill()
    time.sleep(0.1)
out = wrk.stdout.read().decode(errors="replace")
print(out)
print(json.dumps({
    "load_secs_planned": secs,
    "load_end_secs": load_end,
    "secs_to_max": at_max,
    "left_min": left_min,
    "secs_back_to_min": None if back_at_min is None or not left_min else back_at_min - load_end,
    "timeline": timeline,
    "wrk_rc": wrk.returncode,
}))
