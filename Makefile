# sluice: every target sets up what it needs on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv run test conformance bench check clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# Debian tools the tests drive as real clients/servers (curl; h2load from
# nghttp2-client for HTTP/2; nginx as an HTTP/2 upstream, started per test
# on a free port; its packaged service is not needed and may fail to start;
# promtool from prometheus checks the alerts plugin's rules, and a real
# Alertmanager from prometheus-alertmanager takes its webhook: their tests
# skip, saying so, when these are missing; redis-server for sluice.shared's
# Redis backend, started per test session on a free port, its service unused;
# etcd from etcd-server and ZooKeeper's jars from zookeeperd, each started by
# tests/servers/ on free loopback ports with a temp data dir, their packaged
# services unused; openssl's s_client -servername for the SNI tests).
test-deps:
	@command -v curl >/dev/null || (apt-get update -qq && apt-get install -y -qq curl)
	@command -v openssl >/dev/null || (apt-get update -qq && apt-get install -y -qq openssl)
	@command -v h2load >/dev/null || (apt-get update -qq && apt-get install -y -qq nghttp2-client)
	@command -v nginx >/dev/null || (apt-get update -qq && apt-get install -y -qq nginx || command -v nginx)
	@command -v promtool >/dev/null || (apt-get update -qq && apt-get install -y -qq prometheus || true)
	@command -v prometheus-alertmanager >/dev/null || (apt-get update -qq && apt-get install -y -qq prometheus-alertmanager || true)
	@command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server || command -v redis-server)
	@command -v etcd >/dev/null || (apt-get update -qq && apt-get install -y -qq etcd-server || command -v etcd)
	@test -e /usr/share/java/zookeeper.jar || (apt-get update -qq && apt-get install -y -qq zookeeperd || test -e /usr/share/java/zookeeper.jar)

run: venv
	$(VENV)/bin/sluice run

test: venv test-deps
	$(PY) -m pytest tests conformance

conformance: venv
	$(PY) -m pytest conformance

# Benchmarks (benchmarks/README.md): the peers from apt (nginx, wrk, haproxy,
# caddy), then matplotlib (plots), httptools (the floor) and watchfiles
# (watch_cost.py, the watcher sluice no longer uses) into the venv.
# `make bench` is the quick set (~4 min), `make bench-full` every scenario;
# BENCH_ARGS passes flags to run.py, e.g. BENCH_ARGS="--plugins my_filter,router".
.PHONY: bench-deps bench-full
bench-deps: venv
	bash benchmarks/setup.sh
	$(PY) -c "import matplotlib, httptools, watchfiles" 2>/dev/null || $(PY) -m pip install -q matplotlib httptools watchfiles

bench: bench-deps
	$(PY) benchmarks/run.py $(BENCH_ARGS)

bench-full: bench-deps
	$(PY) benchmarks/run.py --full $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
