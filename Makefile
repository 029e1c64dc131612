# Set-up and everyday commands. Run as root on Debian 12: the apt step
# installs the toolchain, the rest builds the package into .venv.

PYTHON ?= python3
VENV := .venv
APT_PACKAGES := clang llvm gcc make pkg-config libxdp-dev libbpf-dev libelf-dev \
	zlib1g-dev xdp-tools iproute2 python3-venv python3-dev libclang-rt-14-dev

.PHONY: all deps venv demo test fuzz bench bench-quick soak clean

all: venv

# apt only when a package is missing, so repeated runs stay offline and fast.
deps:
	@missing=$$(for package in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$package 2>/dev/null | grep -q 'ok installed' \
			|| echo $$package; done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

# The editable install compiles the cffi extension and the XDP object. It runs again only
# when what it builds from changed (Python sources need no reinstall: the install is
# editable), so a repeated `make test` goes straight to the tests, offline too.
INSTALLED := $(VENV)/.installed
BUILD_INPUTS := pyproject.toml setup.py $(wildcard csrc/*.c csrc/*.h csrc/*.py bpf/*.c bpf/*.h)

venv: deps $(INSTALLED)

$(INSTALLED): $(BUILD_INPUTS) | deps
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

demo: venv
	$(VENV)/bin/pgwfwd demo

# The bounded fuzz run first, so that pytest's summary is the last thing printed.
test: venv
	$(MAKE) fuzz
	$(VENV)/bin/python -m pytest

# The per-frame C path under libFuzzer with ASan and UBSan (fuzz/fuzz_process.c) for
# FUZZ_SECONDS; any crash or broken promise fails, and its input is left in build/fuzz/.
# The seeds are built with scapy each time; the corpus grows in build/fuzz/corpus.
FUZZ_SECONDS ?= 60
FUZZ_DIR := build/fuzz

fuzz: venv
	mkdir -p $(FUZZ_DIR)/corpus
	clang-14 -g -O1 -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined \
		-fno-sanitize-recover=all -Wall -Wextra -Icsrc \
		fuzz/fuzz_process.c csrc/process.c -o $(FUZZ_DIR)/fuzz_process
	rm -rf $(FUZZ_DIR)/seeds
	$(VENV)/bin/python fuzz/make_seeds.py $(FUZZ_DIR)/seeds
	$(FUZZ_DIR)/fuzz_process -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
		-artifact_prefix=$(FUZZ_DIR)/ $(FUZZ_DIR)/corpus $(FUZZ_DIR)/seeds

clean:
	rm -rf build *.egg-info pgwfwd/_native.* pgwfwd/pgwfwd.bpf.o

# The benchmark suite (bench/README.md): micro-benchmarks, then pgwfwd side by side with
# its baselines in a lab of its own. Writes bench/results/latest.{json,md,png}.
BENCH_PYTEST := $(VENV)/bin/python -m pytest bench -m benchmark -p no:cacheprovider -q \
	--benchmark-json bench/results/micro.json

bench: venv
	$(MAKE) -C bench deps all
	mkdir -p bench/results
	$(BENCH_PYTEST)
	$(VENV)/bin/python bench/suite.py --micro-json bench/results/micro.json

bench-quick: venv
	$(MAKE) -C bench deps all
	mkdir -p bench/results
	$(BENCH_PYTEST) --benchmark-max-time 0.1 --benchmark-min-rounds 3
	$(VENV)/bin/python bench/suite.py --quick --micro-json bench/results/micro.json

# pgwfwd at one rate for 10 minutes, then frame conservation, RSS, wrong packets and the
# accounting checked (bench/README.md). Writes bench/results/soak.{json,md}.
soak: venv
	$(MAKE) -C bench all
	mkdir -p bench/results
	$(VENV)/bin/python bench/soak.py
