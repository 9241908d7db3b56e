#!/bin/sh
# Issue 16, measured by hand in one nspawn guest of the vm-tests image (not
# part of make bench): 4 cgi-gateways on ONE socket (launch.py), the same 4
# on a socket each, Debian's fcgiwrap -c 4, all running the same C CGI
# program behind nginx (nginx.conf: keep-alive or a connection per request);
# then 4 C search workers on one socket with CGIPOOL_ACCESS_LOG=0 and 1, and
# the CPU journald spent. The payload (release cgipool, workers) at /payload.
# Usage in the guest: [TARGETS="fcgi gw-shared-ka gw-shared gw-pw-ka"] [AR=N]
#   [H=dir of these files] sh measure.sh SECONDS ROUNDS
set -e
S=${1:-8}; R=${2:-2}
H=${H:-/mnt/agent/h16}  # where these files are in the guest
mkdir -p /run/h16 && chmod 755 /run/h16
sed -i 's/^ForwardToConsole=yes/ForwardToConsole=no/' /etc/systemd/journald.conf.d/cgipool-test.conf
systemctl restart systemd-journald
cp $H/nginx.conf /etc/nginx/conf.d/h16.conf
systemctl reload nginx || systemctl restart nginx
GW=/payload/bin/cgipool
mkdir -p /usr/local/lib/h16 && cp /payload/lib/cgipool/hello_cgi /usr/local/lib/h16/ && chmod 755 /usr/local/lib/h16/hello_cgi
unit() { systemctl stop "$1" 2>/dev/null || true; systemctl reset-failed "$1" 2>/dev/null || true; shift_unit=$1; shift; systemd-run --quiet --unit="$shift_unit" "$@"; }
start_all() { # $1 = access log for gateways and C workers
  for u in h16-gw h16-pw h16-c h16-fcgi; do systemctl stop $u 2>/dev/null || true; systemctl reset-failed $u 2>/dev/null || true; done
  systemd-run --quiet --unit=h16-gw -E CGIPOOL_ACCESS_LOG=$1 python3 $H/launch.py /run/h16/gw.sock 4 $GW cgi-gateway --route /hello -- /usr/local/lib/h16/hello_cgi
  systemd-run --quiet --unit=h16-pw -E CGIPOOL_ACCESS_LOG=$1 python3 $H/launch.py /run/h16/pw%d.sock 4 $GW cgi-gateway --route /hello -- /usr/local/lib/h16/hello_cgi
  systemd-run --quiet --unit=h16-c -E CGIPOOL_ACCESS_LOG=$1 python3 $H/launch.py /run/h16/c.sock 4 /payload/lib/cgipool/search
  systemd-run --quiet --unit=h16-fcgi -p User=www-data -p Group=www-data -p RuntimeDirectory=h16-fcgi /usr/sbin/fcgiwrap -c 4 -s unix:/run/h16-fcgi/fcgi.sock
  for i in $(seq 100); do [ -S /run/h16-fcgi/fcgi.sock ] && [ -S /run/h16/pw4.sock ] && [ -S /run/h16/gw.sock ] && [ -S /run/h16/c.sock ] && break; sleep 0.1; done
  sleep 0.5
  for p in gw-shared-ka gw-shared gw-pw-ka c-shared-ka fcgi; do curl -fsS -o /dev/null http://127.0.0.1:8089/$p || echo "WARN $p failed"; done
}
cpu() { systemctl show -p CPUUsageNSec --value "$1"; }
wrk_run() { # label path conns
  out=$(wrk -t2 -c$3 -d${S}s --latency -s $H/report.lua http://127.0.0.1:8089/$2 | grep BENCHJSON | sed 's/BENCHJSON //')
  echo "$1 $2 c=$3 $out"
}
start_all 0
for r in $(seq $R); do
  for c in 16 64; do
    for p in ${TARGETS:-fcgi gw-shared gw-shared-ka gw-pw-ka}; do wrk_run "round=$r" $p $c; done
  done
done
# The cost of the access log on the C worker pool (journald), both ways.
for r in $(seq ${AR:-$R}); do
  for a in 0 1; do
    start_all $a
    j0=$(cpu systemd-journald.service); w0=$(cpu h16-c.service); n0=$(cpu nginx.service)
    res=$(wrk_run "round=$r access_log=$a" c-shared-ka 16)
    j1=$(cpu systemd-journald.service); w1=$(cpu h16-c.service); n1=$(cpu nginx.service)
    echo "$res cpu_ms journald=$(( (j1-j0)/1000000 )) workers=$(( (w1-w0)/1000000 )) nginx=$(( (n1-n0)/1000000 ))"
  done
done
