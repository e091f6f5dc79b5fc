# Corvid: `make run` starts a one-node registry, `make test` runs every test.
# One cargo profile (release) serves running, testing and benchmarking, so
# RocksDB's C++ is compiled once; the build lives outside the clone.

export CARGO_TARGET_DIR ?= $(HOME)/.cache/corvid-target
CARGO ?= cargo
BIN := $(CARGO_TARGET_DIR)/release
ARGS ?=

.PHONY: run build test lint unit monitoring interop jepsen-short jepsen bench bench-find bench-proxy bench-failover bench-join bench-scale bench-bulk-leader docs deps-build deps-test clean-data fuzz

deps-build:
	@bash scripts/install-deps.sh build

deps-test:
	@bash scripts/install-deps.sh test

build: deps-build
	$(CARGO) build --release --locked --bins

## Start a one-node registry with embedded defaults (data in ./data).
run: build
	$(BIN)/corvid-registry $(ARGS)

## Everything CI runs: formatting, lints, unit and integration tests, and
## interop with real Cyrus 3.6.
test: deps-test lint unit monitoring interop jepsen-short

lint: deps-build
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --locked --all-targets -- -D warnings

unit: deps-build
	$(CARGO) test --release --locked --workspace

## Monitoring and deployment files (a few seconds): the alert rules' promtool
## unit tests, every metric the rules and the Grafana dashboard use is in
## docs/src/metrics.md, and the systemd units pass systemd-analyze verify.
## The real Prometheus run is tests/interop/prometheus.sh (in interop).
monitoring: build deps-test
	promtool check rules docs/monitoring/alerts.yml
	promtool test rules tests/monitoring/alerts_test.yml
	python3 tests/monitoring/check_metrics.py docs/src/metrics.md docs/monitoring/alerts.yml docs/monitoring/corvid-dashboard.json
	CORVID_BIN_DIR=$(BIN) bash tests/monitoring/systemd.sh

interop: build deps-test
	CORVID_BIN_DIR=$(BIN) bash tests/interop/run-all.sh

## Jepsen-style runs (root: each run makes its own network namespace).
## jepsen-short (in make test, about 8 minutes): 45 s with partitions and
## kills must show no anomaly; each test-only unsafe switch runs 20 s with
## the one fault that exposes it (anomalies expected) and 20 s without it
## (none expected); the real code under power loss must lose nothing; a
## replica must leave a master cut off from the others; the lifecycle
## workload under small snapshots and leader partitions must stay valid.
JEPSEN_OUT ?= $(CARGO_TARGET_DIR)/jepsen-runs
JEPSEN_ARGS ?=
jepsen-short: build deps-test
	CORVID_BIN_DIR=$(BIN) JEPSEN_OUT=$(JEPSEN_OUT) bash jepsen/short.sh

## Ten 60 s runs with every nemesis; results in jepsen/runs, the table in
## docs/src/jepsen-runs.md.
jepsen: build deps-test
	CORVID_BIN_DIR=$(BIN) bash jepsen/ten-runs.sh $(JEPSEN_ARGS)

## Benchmarks against a real Cyrus master; writes docs/src/benchmarks.md.
bench: build deps-test
	CORVID_BIN_DIR=$(BIN) bash bench/run.sh

## Server CPU per FIND at 32 connections on a node, a replica, and a 3-node
## cluster's leader and follower (about 2 min). Knobs: bench/find.sh.
bench-find: build deps-test
	CORVID_BIN_DIR=$(BIN) bash bench/find.sh

## IMAP through corvid-proxy, a real Cyrus 3.6 frontend and directly to a
## backend (sessions/s, FETCH and APPEND MB/s, idle sessions' memory and CPU);
## writes its section of docs/src/benchmarks.md. Knobs: bench/proxy.sh.
bench-proxy: build deps-test
	CORVID_BIN_DIR=$(BIN) bash bench/proxy.sh

## A node and a replica join a cluster of 1,000,000 mailboxes; UPDATE dump time.
bench-join: build deps-test
	CORVID_BIN_DIR=$(BIN) bash bench/join.sh

## 10,000,000 mailboxes (SCALE_MAILBOXES=N for another size): bulk load, a
## node joining by snapshot, a replica's cold sync, the UPDATE dump, LIST of
## one backend, node RSS; writes bench/scale-results.md (docs/src/benchmarks.md).
bench-scale: build deps-test
	CORVID_BIN_DIR=$(BIN) bash bench/scale.sh

## A bulk load at 1,000 commands per log entry, 4 entries in flight, must keep
## the cluster's leader (BULK_MAILBOXES, default 1,000,000, which lost the
## leader before AppendEntries were bounded by bytes). About 30 s at 1M.
bench-bulk-leader: build deps-test
	CORVID_BIN_DIR=$(BIN) bash bench/bulk-leader.sh

## Kill -9 the leader of a 3-node cluster 20 times; writes docs/src/failover.md.
bench-failover: deps-build
	CORVID_FAILOVER_REPORT=$(CURDIR)/docs/src/failover.md \
		$(CARGO) test --release --locked --test failover -- --ignored --nocapture

## Coverage-guided fuzzing (cargo fuzz, libFuzzer): each target for
## FUZZ_SECONDS (docs/src/security.md, "Fuzzing"). cargo fuzz needs nightly
## compiler flags; RUSTC_BOOTSTRAP=1 lets the stable toolchain accept them.
## Builds in its own target dir outside the clone (RocksDB's C++ is compiled
## once more there, ~11 min on 2 cores, then reused); point ROCKSDB_LIB_DIR
## at a directory holding a librocksdb.a of the same version to link that
## instead. New inputs go to FUZZ_CORPUS; fuzz/corpus keeps the seeds only.
## Crashes land in fuzz/artifacts/<target>/.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= mupdate_request mupdate_response sasl frames config
FUZZ_TARGET_DIR ?= $(HOME)/.cache/corvid-fuzz-target
FUZZ_CORPUS ?= $(HOME)/.cache/corvid-fuzz-corpus
FUZZ_SANITIZER ?= address
fuzz:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	cd fuzz && for t in $(FUZZ_TARGETS); do \
		mkdir -p $(FUZZ_CORPUS)/$$t && \
		RUSTC_BOOTSTRAP=1 $(if $(ROCKSDB_LIB_DIR),ROCKSDB_LIB_DIR=$(ROCKSDB_LIB_DIR) ROCKSDB_STATIC=1) nice -n 10 \
			$(CARGO) fuzz run -s $(FUZZ_SANITIZER) --target-dir $(FUZZ_TARGET_DIR) \
			$$t $(FUZZ_CORPUS)/$$t corpus/$$t -- -max_total_time=$(FUZZ_SECONDS) \
			|| exit 1; \
	done

docs:
	@command -v mdbook >/dev/null || $(CARGO) install --locked mdbook --version "~0.4"
	mdbook build docs

clean-data:
	rm -rf ./data
