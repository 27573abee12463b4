# mirror-agent: the README's two commands are `make demo` and `make test`.
PY := .venv/bin/python
.DEFAULT_GOAL := help

.PHONY: help setup demo test unit integration lint image test-image bench bench-offline \
	bench-http bench-bulk bench-memory bench-idle bench-overload bench-replay bench-churn soak clean

help:
	@echo "make demo   set up, then mirror a built-in example end to end"
	@echo "make test   set up, then run every test (integration tests need root)"
	@echo "make lint   ruff + mypy;  make bench   benchmarks (see bench/)"
	@echo "make soak   15 min of everything at once: leaks (RSS, fds, threads) and accounting (root)"
	@echo "make image  build the container image into build/image/ (root; no registry needed)"
	@echo "make test-image  build it, then run it under Docker and containerd (root)"

setup:
	@scripts/setup.sh

demo: setup
	@$(PY) -m lab.demo

test: setup
	$(PY) -m pytest -q tests --ignore=tests/image
	$(PY) -m ruff check agent lab tests bench
	$(PY) -m mypy

unit: setup
	$(PY) -m pytest -q tests/unit

integration: setup
	$(PY) -m pytest -q tests/integration

# The container image (deploy/Dockerfile), built with a private dockerd from a base made by
# mmdebstrap: build/image/mirror-agent-VERSION.tar. See docs/container.md.
image:
	@scripts/build-image.sh

test-image: setup image
	$(PY) -m pytest -q tests/image

lint: setup
	$(PY) -m ruff check agent lab tests bench
	$(PY) -m mypy

# Each benchmark is one command; `make bench` runs them all (about 15 minutes, root).
bench: bench-offline bench-http bench-bulk bench-memory bench-idle bench-overload

bench-offline: setup
	$(PY) bench/offline_replay.py

bench-replay: setup
	$(PY) bench/replay_rate.py

.PHONY: bench-nats
bench-nats: setup
	$(PY) bench/nats_publish.py

bench-http: setup
	$(PY) bench/http_overhead.py

bench-bulk: setup
	$(PY) bench/bulk_rate.py

bench-memory: setup
	$(PY) bench/scale_memory.py

bench-idle: setup
	$(PY) bench/idle_rss.py

bench-churn: setup
	$(PY) bench/churn.py --rates 1000,3000,6000,12000 --duration 20 --modes connection,request

bench-overload: setup
	$(PY) bench/overload_memory.py

# Load, churn, Prometheus, port flips and pcap jobs at once; fails on growth or on anything
# unaccounted (bench/soak.py; under 20 minutes, root). SOAK_ARGS='--duration 120' for a quick look.
soak: setup
	$(PY) bench/soak.py $(SOAK_ARGS)

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache bench/out
