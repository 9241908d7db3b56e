#!/usr/bin/env bash
# Fuzzes the CGI gateway's request-head parser and chunked decoder with
# cargo-fuzz (libFuzzer) for SECONDS each: `fuzz/run.sh SECONDS`.
# Installs cargo-fuzz if missing. Release build with debug assertions and
# overflow checks, no ASan (the parsers are safe Rust; a panic or an
# overflow is the crash). New inputs go to fuzz/target/corpus/TARGET, the
# committed seeds (fuzz/corpus/TARGET, captured from nginx) stay untouched;
# a crash leaves its input in fuzz/target/artifacts/TARGET/.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-60}
targets=(gateway_head gateway_chunked fcgi_response worker_status)
export RUSTC_BOOTSTRAP=1   # cargo-fuzz's -Z flags on the stable toolchain
export PATH="$HOME/.cargo/bin:$PATH"
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install --locked cargo-fuzz
fi
flags=(-O -a -s none)
cargo fuzz build "${flags[@]}"
total=0
for t in "${targets[@]}"; do
    mkdir -p "target/corpus/$t" "target/artifacts/$t"
    log=target/fuzz-$t.log
    rc=0
    # Heads from nginx are well under 4 KiB (the target varies its limit up
    # to that); chunked inputs go past the 4 KiB chunk-line limit.
    case $t in gateway_head) max_len=4096 ;; *) max_len=8192 ;; esac
    cargo fuzz run "${flags[@]}" "$t" "target/corpus/$t" "corpus/$t" -- \
        -max_total_time="$seconds" -print_final_stats=1 -max_len=$max_len \
        -timeout=10 -rss_limit_mb=2048 -artifact_prefix="target/artifacts/$t/" \
        >"$log" 2>&1 || rc=$?
    runs=$(awk '/^stat::number_of_executed_units:/ {print $2}' "$log")
    if [ "$rc" -ne 0 ] || [ -z "$runs" ]; then
        tail -40 "$log"
        echo "fuzz: $t FAILED (rc=$rc); input in fuzz/target/artifacts/$t/"
        exit 1
    fi
    echo "fuzz: $t: $runs executions in ${seconds}s, no crashes"
    total=$((total + runs))
done
echo "fuzz: gateway parsers: $total executions in all, no crashes"
