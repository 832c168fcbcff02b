# mirrorfw: `make run` and `make test` set themselves up on a fresh machine.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
WORK    ?= work
JOBS    ?= auto
PYTEST_ARGS ?=

DEBS      := fio qemu-utils libnbd-bin nbdkit chromium
DEB_TOOLS := fio qemu-io qemu-img nbdinfo nbdcopy nbdkit chromium

.PHONY: venv deps run test lint bench faults clean

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py drivers/osio/_ioctl_build.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# io_uring (liburing, built from source) is optional: without it its tests skip and say so.
	# atheris (coverage-guided fuzzing in make faults) is optional too: without it a mutation fuzzer runs.
	$(BIN)/python -m pip install -q -e '.[test,fast,uring,fuzz]' || $(BIN)/python -m pip install -q -e '.[test,fast,uring]' \
	  || $(BIN)/python -m pip install -q -e '.[test,fast]'
	# labgrid (harness/lab) is optional as well: without it the lab tests skip and say so.
	$(BIN)/python -m pip install -q -e '.[lab]' || echo "venv: labgrid not installed; the lab tests will skip"
	# Dask (the campaign extra: mirrorfw sim and faults on a LocalCluster or lab servers) is optional too:
	# without it campaigns run in one process and the Dask test skips.
	$(BIN)/python -m pip install -q -e '.[campaign]' || echo "venv: dask not installed; campaigns run in one process"
	touch $@

# Debian packages the tests drive as real peers. Apt when root; otherwise say
# what is missing (the tests that need them skip and print why).
deps:
	@missing=""; for t in $(DEB_TOOLS); do command -v $$t >/dev/null 2>&1 || missing="$$missing $$t"; done; \
	if [ -z "$$missing" ]; then echo "deps: all present ($(DEB_TOOLS))"; \
	elif [ "$$(id -u)" = 0 ]; then echo "deps: installing $(DEBS) (missing:$$missing)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEBS) >/dev/null; \
	else echo "deps: missing$$missing; run 'sudo apt-get install $(DEBS)' (tests that need them will skip)"; fi

run: venv deps
	$(BIN)/mirrorfw demo --workdir $(WORK)

test: venv deps
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -n $(JOBS) $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check firmware hal drivers harness testbench tests
	$(BIN)/lint-imports

bench: venv deps
	$(BIN)/mirrorfw bench --out bench/results.json

faults: venv deps
	$(BIN)/mirrorfw faults --out faults/results.json

clean:
	rm -rf $(VENV) build *.egg-info drivers/osio/_ioctl*.so drivers/osio/_ioctl.c drivers/osio/_ioctl.o $(WORK)
