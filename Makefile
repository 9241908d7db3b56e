# cgipool — the two commands for a fresh Debian machine:
#   make demo   runs cgipool on the built-in example inside a QEMU machine
#   make test   runs every test: cargo tests, the C workers' tests and fuzzing,
#               the gateway's parsers fuzzed, and the vm-tests tiers (nspawn,
#               then QEMU)
SHELL := /bin/bash
CARGO ?= cargo
VM_TEST_TIMEOUT_FACTOR ?= 1
# Seconds per fuzz target: FUZZ_SECONDS in `make test`, FUZZ_LONG_SECONDS
# in `make fuzz` (>= 10 M executions per parser on this 2-core machine).
FUZZ_SECONDS ?= 60
FUZZ_LONG_SECONDS ?= 300
PAYLOAD := target/vm-payload
export VM_TEST_TIMEOUT_FACTOR

.PHONY: all build deps test test-all cargo-test workers-test gateway-fuzz fuzz image payload vm-test demo demo-run bench bench-smoke clean lint

all: build

deps:
	vm-tests/install-deps.sh

# PROFILE=release puts an optimised cgipool in the payload (`make bench`).
PROFILE ?= debug

build:
	$(CARGO) build --workspace
	$(if $(filter release,$(PROFILE)),$(CARGO) build --release -p cgipool)
	$(MAKE) -C cgi-src

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

cargo-test:
	$(CARGO) test --workspace

# The workers under ASan/UBSan over real sockets, then the HTTP parser
# fuzzed for FUZZ_SECONDS.
workers-test:
	$(MAKE) -C cgi-src test TEST_FUZZ_SECONDS=$(FUZZ_SECONDS)

# The gateway's request-head parser and chunked decoder under cargo-fuzz
# (installed by fuzz/run.sh if missing), FUZZ_SECONDS each.
gateway-fuzz:
	fuzz/run.sh $(FUZZ_SECONDS)

# The long runs: the gateway's two targets and the C workers' parser,
# FUZZ_LONG_SECONDS each.
fuzz:
	fuzz/run.sh $(FUZZ_LONG_SECONDS)
	$(MAKE) -C cgi-src fuzz FUZZ_SECONDS=$(FUZZ_LONG_SECONDS)

# The guest image lives outside the repo, keyed by the hash of its inputs.
image:
	@vm-tests/image/build.sh >/dev/null

# Build outputs travel to the guest separately from the image (read-only bind
# mount for nspawn, payload.ext4 for QEMU), so a code change never rebuilds it.
payload: build
	rm -rf $(PAYLOAD) && mkdir -p $(PAYLOAD)/bin $(PAYLOAD)/lib/cgipool
	install -m 0755 target/$(PROFILE)/cgipool $(PAYLOAD)/bin/cgipool
	$(MAKE) -C cgi-src install DESTDIR=$(CURDIR)/$(PAYLOAD) PREFIX=/ LIBDIR=/lib/cgipool
	cp -r examples nginx units $(PAYLOAD)/
	cp -r vm-tests/fixtures $(PAYLOAD)/fixtures

vm-test: payload image
	CGIPOOL_VM_IMAGE=$$(vm-tests/image/build.sh) CGIPOOL_VM_PAYLOAD=$(CURDIR)/$(PAYLOAD) \
	  $(CARGO) run -q -p vm-tests -- --test-threads=1 $(VM_TESTS_ARGS)

# Both README commands install what they need first and say how long they took.
demo:
	@start=$$(date +%s); if $(MAKE) --no-print-directory demo-run; then \
	  echo "make demo: passed in $$(( $$(date +%s) - start ))s (packages, build, image and the tour)"; \
	else echo "make demo: FAILED after $$(( $$(date +%s) - start ))s"; exit 1; fi

demo-run: deps payload image
	CGIPOOL_VM_IMAGE=$$(vm-tests/image/build.sh) CGIPOOL_VM_PAYLOAD=$(CURDIR)/$(PAYLOAD) \
	  $(CARGO) run -q -p vm-tests -- demo

# Benchmarks (bench/): figures next to baselines measured in the same run,
# written to bench/results/latest.{md,json}. Never a gate: `make test` only
# runs a few-second smoke of the same code.
bench: export PROFILE = release
bench: payload image
	CGIPOOL_VM_IMAGE=$$(vm-tests/image/build.sh) CGIPOOL_VM_PAYLOAD=$(CURDIR)/$(PAYLOAD) \
	  CGIPOOL_BENCH_PROFILE=$(PROFILE) $(CARGO) run -q -p vm-tests -- bench

bench-smoke: payload image
	CGIPOOL_VM_IMAGE=$$(vm-tests/image/build.sh) CGIPOOL_VM_PAYLOAD=$(CURDIR)/$(PAYLOAD) \
	  CGIPOOL_BENCH_PROFILE=$(PROFILE) $(CARGO) run -q -p vm-tests -- bench --smoke

test:
	@start=$$(date +%s); if $(MAKE) --no-print-directory test-all; then \
	  echo "make test: all tiers passed in $$(( $$(date +%s) - start ))s"; \
	else echo "make test: FAILED after $$(( $$(date +%s) - start ))s"; exit 1; fi

test-all: deps lint cargo-test workers-test gateway-fuzz vm-test bench-smoke

clean:
	$(CARGO) clean
	$(MAKE) -C cgi-src clean
	rm -rf fuzz/target
