# hongbao — the two commands a new machine needs are `make smoke` and `make test`.
# Both create the virtualenv on first use from the project's own requirements files.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The compiled hot path (setup.py): rebuilt in place when its sources change;
# without a C compiler the install still succeeds and the pure-Python path runs.
EXT_SOURCES := setup.py app/hotslots.h app/server/_fastset.c app/client/_fastclient.c
BUILT  := $(VENV)/.built
FLEET_STAMP := $(VENV)/.fleet-installed

.PHONY: smoke test check lint bench bench-server bench-client bench-scale venv clean
.PHONY: monitor-install monitor-up monitor-down monitor-status report

venv: $(BUILT)

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

$(BUILT): $(STAMP) $(EXT_SOURCES)
	$(VENV)/bin/pip install --quiet --no-deps -e .
	$(PY) -c "from app import hotpath; print('hot path:', hotpath.describe())"
	touch $(BUILT)

## The main job: one machine, embedded defaults (server, 3 simulated hosts, phases, envelopes).
## With the monitor stack up (make monitor-up) the run also sends its metrics there.
smoke: $(BUILT)
	env $$($(PY) -m monitor.stack env) $(PY) -m app.local.smoke $(ARGS)

## The test suite (what .ci/run calls).
test: $(BUILT) $(FLEET_STAMP)
	$(PY) -m pytest -q $(ARGS)

## The fast tier (under a minute): lint and the pure tests (codec, session, ledger and
## journal, schedule, settings, the SET's parts), no servers or agents started.
CHECK_TESTS := tests/test_protocol.py tests/test_session.py tests/test_journal.py \
	tests/test_schedule.py tests/test_settings.py tests/test_process_model.py \
	tests/test_set_parts.py tests/test_fastpath.py
check: $(BUILT)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -m "not processes and not slow and not fleet" $(CHECK_TESTS) $(ARGS)

lint: $(BUILT)
	$(VENV)/bin/ruff check .

bench-server: $(BUILT)
	$(PY) -m app.bench server $(ARGS)

## Client agent costs: CPU µs per request, idle CPU, RSS per connection, restart convergence.
bench-client: $(BUILT)
	$(PY) -m app.bench.client $(ARGS)

bench-scale: $(BUILT)
	$(PY) -m app.bench scale $(ARGS)

clean:
	rm -rf $(VENV) runs var .pytest_cache .ruff_cache build *.egg-info app/*/_fast*.so

## The metrics stack: statsd -> carbon/whisper -> graphite-web on 127.0.0.1 (README "Monitoring").
monitor-install: $(BUILT)
	$(PY) -m monitor.stack install

monitor-up: $(BUILT)
	$(PY) -m monitor.stack up

monitor-down: $(BUILT)
	$(PY) -m monitor.stack down

monitor-status: $(BUILT)
	$(PY) -m monitor.stack status

## Graphs of a run: make report ARGS="--run runs/<timestamp>"
report: $(BUILT)
	$(PY) -m monitor.report $(ARGS)

## The fleet (README "Running on a fleet"): the Ansible controller in the venv,
## local test hosts in network namespaces (root), lint, any playbook against them:
##   make fleet-up; make fleet-run PLAYBOOK=ramp-qps.yml ARGS="-e qps=300"; make fleet-down
## The whole classic experiment on 19 local test hosts (root), or on a fleet:
##   make fleet-experiment [ARGS="--connections 1000 --rates 3000,6000 --hold 30"]
##   make fleet-experiment FLEET_INVENTORY=fleet/inventory/production
.PHONY: fleet-install fleet-up fleet-down fleet-status fleet-run fleet-lint fleet-experiment
CLIENTS ?= 17
FLEET_INVENTORY ?=

$(FLEET_STAMP): $(STAMP) requirements-fleet.txt
	$(VENV)/bin/pip install --quiet -r requirements-fleet.txt
	touch $(FLEET_STAMP)

fleet-install: $(FLEET_STAMP)

fleet-up: $(FLEET_STAMP)
	$(PY) -m fleet.local up --clients $(CLIENTS)

fleet-down:
	$(PY) -m fleet.local down

fleet-status:
	$(PY) -m fleet.local status

fleet-run: $(FLEET_STAMP)
	$(PY) -m fleet.local run $(PLAYBOOK) $(ARGS)

fleet-experiment: $(FLEET_STAMP)
	$(PY) -m fleet.experiment $(if $(FLEET_INVENTORY),--inventory $(FLEET_INVENTORY),--local --clients $(CLIENTS)) $(ARGS)

fleet-lint: $(FLEET_STAMP)
	cd fleet && PATH=$(CURDIR)/$(VENV)/bin:$$PATH ANSIBLE_CONFIG=ansible.cfg ansible-lint
