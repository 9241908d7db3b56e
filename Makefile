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

.PHONY: all build deps test test-all cargo-test workers-test gateway-fuzz fuzz image payload vm-test demo demo-run bench bench-smoke bench-cpu clean lint \
        cargo-deb deb-assets deb deb-lint deb-payload

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
# BENCH_CGI_CC='musl-gcc -static' builds the bench's CGI program (hello_cgi)
# with another compiler, e.g. one whose start makes no CPUID (bench/README
# "CPUID"); the bench report names the build it ran.
payload: build
	rm -rf $(PAYLOAD) && mkdir -p $(PAYLOAD)/bin $(PAYLOAD)/lib/cgipool
	install -m 0755 target/$(PROFILE)/cgipool $(PAYLOAD)/bin/cgipool
	$(MAKE) -C cgi-src install DESTDIR=$(CURDIR)/$(PAYLOAD) PREFIX=/ LIBDIR=/lib/cgipool
	$(if $(BENCH_CGI_CC),$(BENCH_CGI_CC) -O2 -Wall -Wextra -Werror -o $(PAYLOAD)/lib/cgipool/hello_cgi cgi-src/hello_cgi.c)
	cp -r examples nginx units $(PAYLOAD)/
	cp -r vm-tests/fixtures $(PAYLOAD)/fixtures

# The Debian package (cargo-deb, installed into ~/.cargo/bin if missing):
# target/cgipool_<version>_amd64.deb. Release build; the C workers
# with Debian's hardening flags in their own build directory; man pages,
# completions and the example config (pointing at /usr/lib/cgipool) in
# target/deb-assets.
CARGO_DEB_VERSION := 3.8.0
DEB_VERSION ?= $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' Cargo.toml | head -1)
# Not under target/debian: cargo-deb empties that directory on every run.
DEB := target/cgipool_$(DEB_VERSION)_amd64.deb
DEB_ASSETS := target/deb-assets
DEB_CFLAGS := -O2 -fstack-protector-strong -Wformat -Werror=format-security \
              -D_FORTIFY_SOURCE=2 -fPIE -pie -Wl,-z,relro -Wl,-z,now -s

cargo-deb:
	@command -v cargo-deb >/dev/null || $(CARGO) install --locked cargo-deb --version $(CARGO_DEB_VERSION)

deb-assets:
	$(CARGO) build --release -p cgipool
	CFLAGS='$(DEB_CFLAGS)' $(MAKE) -C cgi-src BUILD=build/deb
	rm -rf $(DEB_ASSETS) && target/release/cgipool generate-assets $(DEB_ASSETS)
	gzip -9n $(DEB_ASSETS)/man/*
	gzip -9nc debian/changelog > $(DEB_ASSETS)/changelog.gz
	sed 's#/usr/local/lib/cgipool/#/usr/lib/cgipool/#g' examples/demo.toml > $(DEB_ASSETS)/cgipool.toml
	! grep -q /usr/local $(DEB_ASSETS)/cgipool.toml

deb: cargo-deb deb-assets
	$(CARGO) deb -p cgipool --no-build --deb-version $(DEB_VERSION) --output $(DEB)
	@ls -l $(DEB)

# lintian's errors fail; its warnings are printed.
deb-lint: deb
	lintian --fail-on error --info $(DEB)

# Two packages for the upgrade scenario, from the same build: the version and
# a higher one.
deb-payload: payload deb
	mkdir -p $(PAYLOAD)/debs
	cp $(DEB) $(PAYLOAD)/debs/
	$(CARGO) deb -p cgipool --no-build --deb-version $(DEB_VERSION)+upgrade1 \
	  --output $(PAYLOAD)/debs/cgipool_$(DEB_VERSION)+upgrade1_amd64.deb

vm-test: payload deb-payload image
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

# The CPU one CGI request costs on this host, outside any guest: cgipool's
# gateway against fcgiwrap, the same program, and the program alone
# (bench/host/cpu_per_request.py; root, fcgiwrap installed).
bench-cpu: export PROFILE = release
bench-cpu: build
	@mkdir -p target && cc -O2 -Wall -Wextra -Werror -o target/cpuid_cost bench/host/cpuid_cost.c && target/cpuid_cost
	python3 bench/host/cpu_per_request.py
	$(if $(BENCH_CGI_CC),$(BENCH_CGI_CC) -O2 -Wall -Wextra -Werror -o target/hello_cgi.other cgi-src/hello_cgi.c \
	  && python3 bench/host/cpu_per_request.py --program target/hello_cgi.other)

bench-smoke: payload image
	CGIPOOL_VM_IMAGE=$$(vm-tests/image/build.sh) CGIPOOL_VM_PAYLOAD=$(CURDIR)/$(PAYLOAD) \
	  CGIPOOL_BENCH_PROFILE=$(PROFILE) $(CARGO) run -q -p vm-tests -- bench --smoke

test:
	@start=$$(date +%s); if $(MAKE) --no-print-directory test-all; then \
	  echo "make test: all tiers passed in $$(( $$(date +%s) - start ))s"; \
	else echo "make test: FAILED after $$(( $$(date +%s) - start ))s"; exit 1; fi

test-all: deps lint cargo-test workers-test gateway-fuzz deb-lint vm-test bench-smoke

clean:
	$(CARGO) clean
	$(MAKE) -C cgi-src clean
	rm -rf fuzz/target
